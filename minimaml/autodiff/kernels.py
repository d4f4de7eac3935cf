"""The fast array kernels behind the rules of ``nnops`` and ``ops.matmul``, each beside a plain
reference version that the tests check it against (``tests/test_kernels.py``).

The rules say what is computed and what its derivative is; the kernels here say how, on raw arrays
(NumPy or CuPy): in cache-sized blocks shared out over the CPU cores (``minimaml.parallel``), writing
into preallocated outputs, reading the unpadded image instead of a padded copy. On the GPU one block
covers everything (one launch per pass). Each ``reference_*`` function computes the same result the
obvious way (a padded copy, one big product, the formula as written): slow, there to be read and to
check the fast kernel.

    im2col, col2im                         patches of images and their adjoint
    conv, conv_input_grad, conv_filter_grad  im2col + GEMM, blockwise
    batch_norm, batch_norm_vjp             batch-norm forward and its VJP, two passes over the data
    matmul                                 ``a @ b`` with NumPy's slow stacked paths avoided
    broadcast_to                           a broadcast view, without NumPy's general machinery
"""

from __future__ import annotations

import numpy

from .. import backend, parallel

BLOCK_BYTES_CONV = 2 << 20  # a block of im2col / conv2d covers about this many bytes of patches
BLOCK_BYTES = 256 << 10  # a block of batch_norm: its input, output and temporary stay in L2
CHUNK_BYTES = 128 << 10  # an elementwise step of batch_norm: the per-channel factors repeated down its rows


# --- blocks -----------------------------------------------------------------------------------------


class Blocks:
    """The blocks ``(lead, rows)`` of a pass over an array ``(L, R, ...)``, and the threads to share
    them out over (``parallel.map_shares``)."""

    def __init__(self, pieces: list, threads: int):
        self.pieces, self.threads = pieces, threads


def blocks(n_lead: int, n_rows: int, row_bytes: int, block_bytes: int, on_gpu: bool) -> Blocks:
    """Cut an array ``(L, R, ...)`` into blocks of about ``block_bytes``: several whole ``(R, ...)`` slabs
    when one slab is small, else equal row ranges of one slab. Passes run a block at a time so that a
    block's data and temporaries stay in the CPU cache, and the blocks are shared out over
    ``parallel.threads_for`` threads (``for_each_block``, ``sum_over_blocks``); a shared pass has at
    least two blocks per thread, of equal size, to keep the threads equally busy. A pass on one thread
    over less than ``parallel.SHARE_MIN_BYTES`` is cut into whole slabs only (at least one a block), so
    that its per-slab sums come out as over the whole array. On the GPU one block covers everything
    (one kernel launch per pass)."""
    if on_gpu:
        return Blocks([(slice(None), slice(None))], 1)
    n_bytes = n_lead * n_rows * row_bytes
    threads = parallel.threads_for(n_bytes)
    if threads == 1 and n_bytes < parallel.SHARE_MIN_BYTES:  # a small pass: whole slabs, never cut
        slabs = max(1, block_bytes // max(1, n_rows * row_bytes))
        return Blocks([(slice(start, start + slabs), slice(None)) for start in range(0, n_lead, slabs)], 1)
    rows = max(1, block_bytes // max(1, row_bytes))
    if threads > 1:
        rows = min(rows, -(-n_lead * n_rows // (2 * threads)))
    if rows >= n_rows:
        slabs = rows // n_rows
        pieces = [(slice(start, start + slabs), slice(None)) for start in range(0, n_lead, slabs)]
        return Blocks(pieces, threads)
    rows = -(-n_rows // -(-n_rows // rows))  # equal ranges: R split into ceil(R / rows) parts
    pieces = [(slice(lead, lead + 1), slice(start, start + rows))
              for lead in range(n_lead) for start in range(0, n_rows, rows)]
    return Blocks(pieces, threads)


def for_each_block(work, pass_blocks: Blocks) -> None:
    """``work(lead, rows)`` for every block, the blocks shared out over the CPU threads
    (``parallel.map_shares``); each block writes its own part of the output."""
    parallel.map_shares(lambda share: [work(lead, rows) for lead, rows in share], pass_blocks.pieces,
                        pass_blocks.threads)


def sum_over_blocks(per_block, pass_blocks: Blocks, shapes: tuple, xp, dtype) -> tuple:
    """Sums over the blocks of ``per_block(lead, rows)``, a tuple of arrays each added at ``[lead]`` of a
    zero array of the matching shape in ``shapes``. The blocks are shared out over the CPU threads; each
    share sums into arrays of its own, and the shares' sums are added in order."""
    def share_sums(share):
        sums = tuple(xp.zeros(shape, dtype=dtype) for shape in shapes)
        for lead, rows in share:
            for total, value in zip(sums, per_block(lead, rows)):
                total[lead] += value
        return sums

    partials = parallel.map_shares(share_sums, pass_blocks.pieces, pass_blocks.threads)
    for sums in partials[1:]:
        for total, value in zip(partials[0], sums):
            total += value
    return partials[0]


# --- where a kernel reads an image ----------------------------------------------------------------


def output_size(size: int, kernel: int, stride: int, pad: tuple) -> int:
    return (size + pad[0] + pad[1] - kernel) // stride + 1


def _valid_range(offset: int, size: int, out: int, stride: int, before: int) -> tuple:
    """Along one axis, for kernel offset ``k``: output positions ``p`` in ``[lo, hi)`` read the input
    position ``stride p + k - before`` inside ``[0, size)`` (the others read padding zeros), and
    ``start`` is the input position of ``p = lo``. Returns ``(lo, hi, start)``."""
    lo = max(0, -(-(before - offset) // stride))
    hi = max(lo, min(out, (size - 1 + before - offset) // stride + 1))
    return lo, hi, stride * lo + offset - before


def _offset_windows(kh: int, kw: int, stride: int, image_shape: tuple, ho: int, wo: int, padding: tuple):
    """For each kernel offset (i, j): ``(i, j, out_window, in_window, borders)``, where the patch entries
    ``cols[..., out_window, i, j, :]`` are read from the unpadded image ``x[in_window]`` and the
    entries ``cols[..., border, i, j, :]`` of each border window read padding (zero).
    Working on the unpadded image saves the padded copy of ``x`` (im2col) or of the result (col2im)."""
    h, w = image_shape
    for i in range(kh):
        p_lo, p_hi, r0 = _valid_range(i, h, ho, stride, padding[0][0])
        rows_in = slice(r0, r0 + stride * (p_hi - p_lo - 1) + 1, stride) if p_hi > p_lo else slice(0, 0)
        for j in range(kw):
            q_lo, q_hi, c0 = _valid_range(j, w, wo, stride, padding[1][0])
            cols_in = slice(c0, c0 + stride * (q_hi - q_lo - 1) + 1, stride) if q_hi > q_lo else slice(0, 0)
            borders = [(slice(0, p_lo), slice(None)), (slice(p_hi, ho), slice(None)),
                       (slice(p_lo, p_hi), slice(0, q_lo)), (slice(p_lo, p_hi), slice(q_hi, wo))]
            yield (i, j, (Ellipsis, slice(p_lo, p_hi), slice(q_lo, q_hi), slice(None)),
                   (Ellipsis, rows_in, cols_in, slice(None)),
                   [(Ellipsis, *b, slice(None)) for b in borders if b[0].stop > b[0].start and
                    (b[1].stop is None or b[1].stop > b[1].start)])


class Geometry:
    """Where a ``kh x kw`` kernel with ``stride`` and ``padding = ((top, bottom), (left, right))`` reads
    an ``h x w`` image: output size ``ho x wo`` and, per kernel offset, the windows of ``_offset_windows``."""

    def __init__(self, kh: int, kw: int, stride: int, padding: tuple, image_hw: tuple):
        self.kh, self.kw, self.stride, self.padding = kh, kw, stride, padding
        self.h, self.w = image_hw
        self.ho = output_size(self.h, kh, stride, padding[0])
        self.wo = output_size(self.w, kw, stride, padding[1])
        self.windows = list(_offset_windows(kh, kw, stride, image_hw, self.ho, self.wo, padding))

    def patches(self, images, out):
        """im2col of ``images: (..., H, W, C)`` into ``out: (..., Ho, Wo, kh, kw, C)`` (padding read as 0)."""
        for i, j, out_window, in_window, borders in self.windows:
            target = out[..., i, j, :]
            target[out_window] = images[in_window]
            for border in borders:
                target[border] = 0
        return out

    def fold_patches(self, patches, images):
        """col2im: ``images: (..., H, W, C)`` set to zero, then ``patches: (..., Ho, Wo, kh, kw, C)`` added
        onto them (entries that read padding are dropped). Zeroed here, a block at a time, the images are
        still in the CPU's cache for the adds (a whole zero array written up front is read back from memory)."""
        images[...] = 0
        for i, j, out_window, in_window, _ in self.windows:
            images[in_window] += patches[..., i, j, :][out_window]
        return images


# --- im2col and col2im ------------------------------------------------------------------------------


def im2col(x, geometry: Geometry):
    """Patches of ``x: (..., H, W, C)`` as rows ``(..., Ho, Wo, kh kw C)``: each offset's strided window
    of ``x`` copied straight into the patches (padding entries written as zeros), a cache-sized block
    of images at a time."""
    xp = backend.array_namespace(x)
    *lead, h, w, c = x.shape
    images = x.reshape(1, -1, h, w, c)
    cols = xp.empty((*images.shape[:2], geometry.ho, geometry.wo, geometry.kh, geometry.kw, c), dtype=x.dtype)
    on_gpu = backend.is_gpu_array(cols)
    for _, rows in blocks(1, images.shape[1], cols[0, 0].nbytes, BLOCK_BYTES_CONV, on_gpu).pieces:
        geometry.patches(images[0, rows], cols[0, rows])
    return cols.reshape(*lead, geometry.ho, geometry.wo, geometry.kh * geometry.kw * c)


def col2im(cols, image_shape: tuple, geometry: Geometry):
    """The adjoint of ``im2col``: patch rows ``(..., Ho, Wo, kh kw C)`` added back onto zero images of
    ``image_shape`` (entries that read padding dropped), a cache-sized block of images at a time, each
    block zeroed just before its adds."""
    xp = backend.array_namespace(cols)
    *lead, h, w, c = image_shape
    image = xp.empty((*lead, h, w, c), dtype=cols.dtype)
    images = image.reshape(-1, h, w, c)
    patches = cols.reshape(-1, geometry.ho, geometry.wo, geometry.kh, geometry.kw, c)
    on_gpu = backend.is_gpu_array(image)
    for _, rows in blocks(1, images.shape[0], patches[0].nbytes, BLOCK_BYTES_CONV, on_gpu).pieces:
        geometry.fold_patches(patches[rows], images[rows])
    return image


# --- convolution: im2col + GEMM, blockwise ----------------------------------------------------------


def conv_blocks(a5, c_in: int, geometry: Geometry) -> Blocks:
    """Blocks (task slice, image slice) of ``a5: (L, n, ...)``, images or their outputs' cotangents,
    with ~``BLOCK_BYTES_CONV`` of patches (``kh kw c_in`` numbers per output position) each."""
    patch_bytes = geometry.ho * geometry.wo * geometry.kh * geometry.kw * c_in * a5.itemsize
    return blocks(a5.shape[0], a5.shape[1], patch_bytes, BLOCK_BYTES_CONV, backend.is_gpu_array(a5))


def _block_patches(x5, lead, rows, geometry: Geometry):
    """im2col of one block: ``(l, rows n' Ho Wo, kh kw C)`` for ``x5[lead, rows]``."""
    xp = backend.array_namespace(x5)
    block = x5[lead, rows]
    l, n = block.shape[:2]
    out = xp.empty((l, n, geometry.ho, geometry.wo, geometry.kh, geometry.kw, block.shape[-1]), dtype=x5.dtype)
    return geometry.patches(block, out).reshape(l, n * geometry.ho * geometry.wo, -1)


def _matrix_view(block):
    """A block ``(l, n, Ho, Wo, C)`` of a result as the matrices ``(l, n Ho Wo, C)`` that a product is
    written into: a view (a block of ``blocks`` is contiguous; anything else is refused, since a
    reshaped copy would lose the writes)."""
    if not block.flags.c_contiguous:
        raise ValueError(f"kernels: a block {block.shape} of a result is not contiguous")
    return block.reshape(block.shape[0], -1, block.shape[-1])


def conv(x5, w3, geometry: Geometry):
    """out[t] = im2col(x[t]) @ w[t] for ``x5: (L, n, H, W, C_in)``, ``w3: (L, K, C_out)``:
    ``(L, n, Ho, Wo, C_out)``, each block's product written straight into its part of the result."""
    xp = backend.array_namespace(x5)
    n_tasks, n = x5.shape[:2]
    out = xp.empty((n_tasks, n, geometry.ho, geometry.wo, w3.shape[-1]), dtype=x5.dtype)

    def multiply(lead, rows):
        matmul(_block_patches(x5, lead, rows, geometry), w3[lead], out=_matrix_view(out[lead, rows]))

    for_each_block(multiply, conv_blocks(x5, x5.shape[-1], geometry))
    return out


def conv_input_grad(g5, w3, geometry: Geometry, c_in: int):
    """dx[t] = col2im(g[t] @ w[t]^T) for ``g5: (L, n, Ho, Wo, C_out)``, ``w3: (L, K, C_out)``:
    ``(L, n, H, W, c_in)``."""
    xp = backend.array_namespace(g5)
    n_tasks, n = g5.shape[:2]
    dx = xp.empty((n_tasks, n, geometry.h, geometry.w, c_in), dtype=g5.dtype)  # zeroed a block at a time
    w_t = xp.swapaxes(w3, -1, -2)

    def multiply_and_add_back(lead, rows):
        g_block = g5[lead, rows]
        l, n_block = g_block.shape[:2]
        patches = matmul(g_block.reshape(l, -1, g_block.shape[-1]), w_t[lead])
        patches = patches.reshape(l, n_block, geometry.ho, geometry.wo, geometry.kh, geometry.kw, c_in)
        geometry.fold_patches(patches, dx[lead, rows])

    for_each_block(multiply_and_add_back, conv_blocks(g5, c_in, geometry))
    return dx


def conv_filter_grad(x5, g5, geometry: Geometry):
    """dw[t] = im2col(x[t])^T @ g[t] for ``x5: (L, n, H, W, C_in)``, ``g5: (L, n, Ho, Wo, C_out)``:
    ``(L, kh kw C_in, C_out)``."""
    xp = backend.array_namespace(x5)

    def patches_times_g(lead, rows):
        patches = _block_patches(x5, lead, rows, geometry)
        g_block = g5[lead, rows].reshape(*patches.shape[:2], -1)
        return (matmul(xp.swapaxes(patches, -1, -2), g_block),)

    shape = (x5.shape[0], geometry.kh * geometry.kw * x5.shape[-1], g5.shape[-1])
    (dw,) = sum_over_blocks(patches_times_g, conv_blocks(x5, x5.shape[-1], geometry), (shape,), xp, x5.dtype)
    return dw


# --- batch norm -------------------------------------------------------------------------------------


def slab_groups(pass_blocks: Blocks) -> list:
    """The blocks of a pass grouped by their leading slice, each group's row ranges in order: one group
    per slab split into row ranges, or per block of whole slabs."""
    groups = []
    for lead, rows in pass_blocks.pieces:
        if groups and groups[-1][0][0] == lead:
            groups[-1].append((lead, rows))
        else:
            groups.append([(lead, rows)])
    return groups


def for_each_group(work, pass_blocks: Blocks) -> None:
    """``work(group)`` for every group of ``slab_groups``, the groups shared out over the CPU threads. A
    kernel whose passes each need the sums of the one before (batch norm: mean, variance, y) runs them
    all over one group before the next, so the group, a few MB, is still in the CPU's last cache for its
    second and third pass; and each group's sums are its own, so they do not depend on the threads."""
    parallel.map_shares(lambda share: [work(group) for group in share], slab_groups(pass_blocks),
                        pass_blocks.threads)


def row_chunks(x3, lead: slice) -> tuple:
    """Row ranges of about ``CHUNK_BYTES`` covering ``x3[lead]``, all the rows of a group's slabs (a
    group of ``slab_groups`` covers every row of its leading slice), for the elementwise steps, and the
    most rows of any range; one range on the GPU. Cut once per group, not per block: an elementwise
    step does not care where the blocks of the sums end."""
    n_rows = x3.shape[1]
    if backend.is_gpu_array(x3):
        return [slice(0, n_rows)], n_rows
    n_lead = len(range(*lead.indices(x3.shape[0])))
    step = max(1, CHUNK_BYTES // (n_lead * x3.shape[2] * x3.itemsize))
    return [slice(first, min(first + step, n_rows)) for first in range(0, n_rows, step)], min(step, n_rows)


def down_rows(values, x3, n_rows: int):
    """Per-channel ``values: (l, 1, C)`` repeated down ``n_rows`` rows, ``(l, n_rows, C)`` (a chunk of r
    rows uses ``[:, :r]``): NumPy's elementwise loops run about twice as fast over two whole arrays as
    over an array and a broadcast row, whose inner loops are one row long. On the GPU the broadcast row
    is kept."""
    xp = backend.array_namespace(values)
    if backend.is_gpu_array(x3):
        return values
    return xp.ascontiguousarray(xp.broadcast_to(values, (values.shape[0], n_rows, values.shape[2])))


def channel_sums(block):
    """``sum_p block`` per channel, ``(l, 1, C)``, for a block ``(l, rows, C)`` of a NumPy array with
    C > 1: the rows added one after the other, as ``block.sum(axis=1)`` adds them, but through
    ``einsum``, whose loop over the rows runs ~1.4x faster than the reduction's on these shapes. Same
    order, so the same bits once added onto a zero total (which turns a sum of -0.0 into 0.0 either
    way). With one channel both sum a contiguous column in their own (different) orders, and on the
    GPU the library's own sum is kept: there the reduction is used as it is."""
    if backend.is_gpu_array(block) or block.shape[-1] == 1:
        return block.sum(axis=1, keepdims=True)
    return numpy.einsum("lpc->lc", block)[:, None]


def _centred_dot(x_block, mean_rows, centred, other=None):
    """``sum_p other (x - mean)`` per channel, ``(l, 1, C)``, for a block ``x_block: (l, rows, C)``;
    ``other`` None: ``sum_p (x - mean)^2``. ``mean_rows``: the mean repeated down at least ``rows`` rows
    (``down_rows``); ``centred``: a scratch buffer of at least the block's size, that x - mean is
    written into (one contiguous ``(l, rows, C)`` array, as ``x_block - mean`` would make)."""
    xp = backend.array_namespace(x_block)
    n = x_block.shape[1]
    centred = centred.reshape(-1)[:x_block.size].reshape(x_block.shape)
    xp.subtract(x_block, mean_rows[:, :n], out=centred)
    return xp.einsum("lpc,lpc->lc", centred if other is None else other, centred)[:, None]


def _centring_buffers(x3, group, mean) -> tuple:
    """For ``_centred_dot`` over a group's blocks ``(lead, rows)`` of ``x3``: ``mean`` ``(l, 1, C)``
    repeated down the most rows of any block, and a scratch buffer of that block's size."""
    lead = group[0][0]
    block_rows = max(len(range(*rows.indices(x3.shape[1]))) for _, rows in group)
    return down_rows(mean, x3, block_rows), backend.array_namespace(x3).empty_like(x3[lead, :block_rows])


def batch_norm(x3, scale3, shift3, eps: float, relu: bool) -> tuple:
    """Batch norm of ``x3: (L, P, C)`` over its P examples, per leading index and channel, with
    per-channel ``scale3, shift3: (L, 1, C)`` or None: ``(y3, mean, inv_std, a)`` where
    ``y3 = a x + b`` (then ``max(y3, 0)`` when ``relu``), a = scale / sqrt(var + eps), b = shift - a mean.
    Three passes over x (mean; variance; y), a cache-sized block at a time, the three over one group of
    blocks before the next (``for_each_group``)."""
    xp = backend.array_namespace(x3)
    n_tasks, n_rows, channels = x3.shape
    pass_blocks = blocks(n_tasks, n_rows, channels * x3.itemsize, BLOCK_BYTES, backend.is_gpu_array(x3))
    mean, sum_squares = (xp.zeros((n_tasks, 1, channels), dtype=x3.dtype) for _ in range(2))
    inv_std, a = (xp.empty((n_tasks, 1, channels), dtype=x3.dtype) for _ in range(2))
    y3 = xp.empty_like(x3)

    def normalize(group):
        lead = group[0][0]
        for _, rows in group:
            mean[lead] += channel_sums(x3[lead, rows])
        mean[lead] /= n_rows
        mean_rows, centred = _centring_buffers(x3, group, mean[lead])
        for _, rows in group:
            sum_squares[lead] += _centred_dot(x3[lead, rows], mean_rows, centred)
        del mean_rows, centred  # let go before the elementwise step's buffers are made
        inv_std[lead] = 1 / xp.sqrt(sum_squares[lead] / n_rows + eps)
        a[lead] = inv_std[lead] if scale3 is None else inv_std[lead] * scale3[lead]
        b = -mean[lead] * a[lead] if shift3 is None else shift3[lead] - mean[lead] * a[lead]
        chunks, chunk_rows = row_chunks(x3, lead)
        a_rows, b_rows = down_rows(a[lead], x3, chunk_rows), down_rows(b, x3, chunk_rows)
        zeros = xp.zeros_like(a_rows)  # NumPy's maximum runs ~3x faster against an array than against 0
        for chunk in chunks:
            out, n = y3[lead, chunk], chunk.stop - chunk.start
            xp.multiply(x3[lead, chunk], a_rows[:, :n], out=out)
            out += b_rows[:, :n]
            if relu:
                xp.maximum(out, zeros[:, :n], out=out)

    for_each_group(normalize, pass_blocks)
    return y3, mean, inv_std, a


def batch_norm_vjp(g3, x3, relu_output, mean, inv_std, a) -> tuple:
    """``batch_norm``'s VJP on ``(L, P, C)`` arrays: ``(dx, d scale, d shift)``, the two per channel
    ``(L, 1, C)``. Two passes over g and x, a block at a time (the sums, then dx), both over one group
    of blocks before the next (``for_each_group``), where
    dx = a g' - k (x - mean) - a (sum_p g') / P with k = a d_scale / (P std), and g' = g [y > 0] when
    ``relu_output`` y is given (else g' = g)."""
    xp = backend.array_namespace(x3)
    n_tasks, n_rows, channels = x3.shape
    pass_blocks = blocks(n_tasks, n_rows, channels * x3.itemsize, BLOCK_BYTES, backend.is_gpu_array(x3))
    g_sum, g_dot = (xp.zeros(mean.shape, dtype=x3.dtype) for _ in range(2))
    dscale = xp.empty(mean.shape, dtype=x3.dtype)
    dx = xp.empty_like(x3)  # after a ReLU, it holds g' until the second pass overwrites it with dx
    g_masked = g3 if relu_output is None else dx

    def input_grad(group):
        lead = group[0][0]
        mean_rows, centred = _centring_buffers(x3, group, mean[lead])
        for _, rows in group:  # sum_p g' and sum_p g' (x - mean)
            g_in = g_masked[lead, rows]
            if relu_output is not None:  # g' = g [y > 0]: the mask written as 1.0 / 0.0, then times g
                xp.greater(relu_output[lead, rows], 0, out=g_in)
                g_in *= g3[lead, rows]
            g_sum[lead] += channel_sums(g_in)
            g_dot[lead] += _centred_dot(x3[lead, rows], mean_rows, centred, g_in)
        del mean_rows, centred  # let go before the elementwise step's buffers are made
        dscale[lead] = g_dot[lead] * inv_std[lead]  # sum_p g' x_hat
        k = a[lead] * inv_std[lead] * dscale[lead] / n_rows
        offset = k * mean[lead] - a[lead] * g_sum[lead] / n_rows
        chunks, chunk_rows = row_chunks(x3, lead)
        a_rows, k_rows, offset_rows = (down_rows(v, x3, chunk_rows) for v in (a[lead], k, offset))
        x_k = xp.empty_like(x3[lead, :chunk_rows])  # x (x) k, a chunk at a time
        for chunk in chunks:
            out, n = dx[lead, chunk], chunk.stop - chunk.start
            xp.multiply(g_masked[lead, chunk], a_rows[:, :n], out=out)
            out -= xp.multiply(x3[lead, chunk], k_rows[:, :n], out=x_k[:, :n])
            out += offset_rows[:, :n]

    for_each_group(input_grad, pass_blocks)
    return dx, dscale, g_sum


# --- matrix product ---------------------------------------------------------------------------------


def matmul(a, b, out=None):
    """``a @ b`` on raw arrays, fast on NumPy too; written into ``out`` when it is given (a C-contiguous
    array of the product's shape, e.g. a block of a bigger result: no copy of the product is made).

    CuPy's batched GEMM, and NumPy's own ``@`` on 2-D operands, are used as they are. On NumPy:

    - an inner dimension of 1 (the sinusoid MLP's input layer, (10, 1) @ (1, 40)) is an outer product:
      ``a * b`` broadcast, each entry the one product a GEMM would compute, at a third of the time;
    - small matrices (``m k n`` below ``LOOP_MIN_WORK``, e.g. the sinusoid MLP's 10x40 @ 40x40) go to
      NumPy's stacked ``@``: one call, where a Python loop would cost ~1 us per matrix;
    - otherwise a batch that ``b`` does not vary over (a broadcast weight, stride 0) is folded into the
      rows of a single 2-D product: ``(B, m, k) @ (k, n)`` as ``(B m, k) @ (k, n)``, one BLAS call;
    - other large matrices, or an operand that BLAS cannot read directly (neither of its last two axes has
      unit stride, so the stacked ``@`` would fall back to its slow non-BLAS loop), run as a loop of
      2-D products, one BLAS call per batch entry (NumPy copies a non-BLAS 2-D operand once).
    """
    if backend.is_gpu_array(a) or b.ndim == 2 and a.ndim == 2:
        return _written(a @ b, out)
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    if k == 1:
        return _written(a * b, out)
    if m * k * n < LOOP_MIN_WORK and _blas_readable(a) and _blas_readable(b):
        return _written(a @ b, out)
    batch = numpy.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    b_is_shared = all(stride == 0 for stride in b.strides[:-2])
    if b_is_shared and a.shape[:-2] == batch:
        b2 = b[(0,) * (b.ndim - 2)]
        return _written((a.reshape(-1, k) @ b2).reshape(*a.shape[:-1], n), out)
    a = numpy.broadcast_to(a, batch + a.shape[-2:])
    b = numpy.broadcast_to(b, batch + b.shape[-2:])
    if out is None:
        out = numpy.empty(batch + (m, n), dtype=numpy.result_type(a, b))
    elif out.shape != batch + (m, n) or not out.flags.c_contiguous:
        raise ValueError(f"matmul: out {out.shape} must be a C-contiguous array of the product's shape {batch + (m, n)}")
    for index in numpy.ndindex(*batch):
        numpy.matmul(a[index], b[index], out=out[index])
    return out


def _written(product, out):
    """``product``, copied into ``out`` when one is given."""
    if out is None:
        return product
    out[...] = product
    return out


LOOP_MIN_WORK = 1 << 17  # multiply-adds per matrix above which a loop of 2-D BLAS calls is used


def _blas_readable(x) -> bool:
    """Whether each matrix of ``x`` (its last two axes) has a unit stride along one of them, so that
    BLAS can read it in place (as stored or transposed)."""
    return x.strides[-1] == x.itemsize or x.strides[-2] == x.itemsize or x.shape[-1] == 1 or x.shape[-2] == 1


# --- broadcast view -----------------------------------------------------------------------------------


def broadcast_to(x, shape: tuple):
    """``x`` repeated along broadcast axes to ``shape``: a read-only view with stride 0 along the new and
    the stretched axes, exactly the view ``numpy.broadcast_to`` returns (same strides, so every later
    operation reads it the same way).

    NumPy's ``broadcast_to`` builds it through ``nditer``, at several times the cost of a small array
    operation, and the tape's task-axis bookkeeping (``per_task``, the VJPs of sums) makes a dozen or more
    per sinusoid meta-step; for a C-contiguous NumPy array the view is made here directly. Anything
    else (CuPy, a strided array, shapes that do not broadcast) goes to the library's own.
    """
    lead = len(shape) - x.ndim
    if backend.is_gpu_array(x) or not (isinstance(x, numpy.ndarray) and x.flags.c_contiguous and x.size) \
            or lead < 0:
        return backend.array_namespace(x).broadcast_to(x, shape)
    strides = [0] * lead
    for n_x, n, stride in zip(x.shape, shape[lead:], x.strides):
        if n_x == 1:  # NumPy gives every axis of length 1 stride 0, stretched or not
            strides.append(0)
        elif n_x == n:
            strides.append(stride)
        else:
            return numpy.broadcast_to(x, shape)  # raises NumPy's error
    view = numpy.ndarray(shape, x.dtype, buffer=x, strides=strides)
    view.flags.writeable = False
    return view


# --- reference kernels: the same results the obvious way (tests/test_kernels.py compares) ------------


def reference_im2col(x, geometry: Geometry):
    """``im2col`` from a zero-padded copy of ``x``: cols[..., p, q, (i, j, c)] = x_pad[..., s p + i, s q + j, c]."""
    xp = backend.array_namespace(x)
    (top, bottom), (left, right) = geometry.padding
    padded = xp.pad(x, [(0, 0)] * (x.ndim - 3) + [(top, bottom), (left, right), (0, 0)])
    s, ho, wo = geometry.stride, geometry.ho, geometry.wo
    rows = [xp.stack([padded[..., i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s, :]
                      for j in range(geometry.kw)], axis=-2) for i in range(geometry.kh)]
    cols = xp.stack(rows, axis=-3)  # (..., Ho, Wo, kh, kw, C)
    return cols.reshape(*cols.shape[:-3], -1)


def reference_col2im(cols, image_shape: tuple, geometry: Geometry):
    """``col2im`` onto a zero-padded image, then cropped."""
    xp = backend.array_namespace(cols)
    (top, bottom), (left, right) = geometry.padding
    *lead, h, w, c = image_shape
    padded = xp.zeros((*lead, h + top + bottom, w + left + right, c), dtype=cols.dtype)
    patches = cols.reshape(*cols.shape[:-1], geometry.kh, geometry.kw, c)
    s, ho, wo = geometry.stride, geometry.ho, geometry.wo
    for i in range(geometry.kh):
        for j in range(geometry.kw):
            padded[..., i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s, :] += patches[..., i, j, :]
    return padded[..., top:top + h, left:left + w, :]


def reference_conv(x5, w3, geometry: Geometry):
    """``conv``: the whole patch matrix, one product."""
    patches = reference_im2col(x5, geometry)
    out = patches.reshape(x5.shape[0], -1, patches.shape[-1]) @ w3
    return out.reshape(*patches.shape[:-1], w3.shape[-1])


def reference_conv_input_grad(g5, w3, geometry: Geometry, c_in: int):
    """``conv_input_grad``: col2im(g @ w^T) on the whole batch."""
    xp = backend.array_namespace(g5)
    patches = g5.reshape(g5.shape[0], -1, g5.shape[-1]) @ xp.swapaxes(w3, -1, -2)
    patches = patches.reshape(*g5.shape[:-1], -1)
    return reference_col2im(patches, (*g5.shape[:2], geometry.h, geometry.w, c_in), geometry)


def reference_conv_filter_grad(x5, g5, geometry: Geometry):
    """``conv_filter_grad``: im2col(x)^T @ g on the whole batch."""
    xp = backend.array_namespace(x5)
    patches = reference_im2col(x5, geometry)
    patches = patches.reshape(x5.shape[0], -1, patches.shape[-1])
    return xp.swapaxes(patches, -1, -2) @ g5.reshape(g5.shape[0], -1, g5.shape[-1])


def reference_batch_norm(x3, scale3, shift3, eps: float, relu: bool) -> tuple:
    """``batch_norm`` as written: y = scale (x - mean) / sqrt(var + eps) + shift, then the ReLU."""
    xp = backend.array_namespace(x3)
    mean = x3.mean(axis=1, keepdims=True)
    inv_std = 1 / xp.sqrt(((x3 - mean) ** 2).mean(axis=1, keepdims=True) + eps)
    a = inv_std if scale3 is None else inv_std * scale3
    y3 = (x3 - mean) * a + (0 if shift3 is None else shift3)
    return (xp.maximum(y3, 0) if relu else y3), mean, inv_std, a


def reference_batch_norm_vjp(g3, x3, relu_output, mean, inv_std, a) -> tuple:
    """``batch_norm_vjp`` as written: with x_hat = (x - mean) inv_std and g' = g [y > 0] (or g),
    d shift = sum_p g', d scale = sum_p g' x_hat, dx = a (g' - d shift / P - x_hat d scale / P)."""
    g = g3 if relu_output is None else g3 * (relu_output > 0)
    x_hat = (x3 - mean) * inv_std
    n_rows = x3.shape[1]
    g_sum = g.sum(axis=1, keepdims=True)
    dscale = (g * x_hat).sum(axis=1, keepdims=True)
    return a * (g - g_sum / n_rows - x_hat * dscale / n_rows), dscale, g_sum


def reference_matmul(a, b):
    """``matmul``: the array library's own ``@``."""
    return a @ b


def reference_broadcast_to(x, shape: tuple):
    """``broadcast_to``: the array library's own."""
    return backend.array_namespace(x).broadcast_to(x, shape)
