"""Blockwise passes shared out over the CPU cores.

The convolution and batch-norm primitives (``autodiff/nnops.py``) walk over big arrays a cache-sized
block at a time. NumPy runs each call on one core, so on the CPU those blocks are split into one
contiguous share per thread and the shares run at once: NumPy and BLAS release Python's GIL while they
compute, so plain threads use separate cores. From the first such parallel pass on, the BLAS library
that NumPy uses is held to one thread, process-wide (``threadpoolctl``): with its usual one thread per
core it would oversubscribe the cores during the passes, and between BLAS calls its idle threads spin
and take the cores from ours (measured: the W2 meta-step went from 469 to 559 ms when BLAS kept two
threads outside the passes). ``MINIMAML_THREADS=1`` leaves BLAS's threads alone.

- ``cpu_threads()``: how many threads: ``MINIMAML_THREADS`` if set, else the cores this process may use.
- ``threads_for(n_bytes)``: the threads a pass over ``n_bytes`` is worth: one for a small pass while BLAS
  still has its own threads (they parallelise a small pass's matrix products better than shares do:
  the Omniglot quick profile's meta-step, 8 tasks of 30 images, took ~100 ms with its passes shared
  out and ~70 ms with them whole and BLAS's two threads), else all.
- ``map_shares(work, blocks, threads)``: ``[work(share) for share in shares]``, the shares run in parallel.

Results do not depend on timing: every share writes its own part of an output or returns a partial sum,
and partial sums are added in share order. They do depend, in the last bits, on how a pass was cut and
shared: on ``MINIMAML_THREADS``, and for passes under ``SHARE_MIN_BYTES`` on whether an earlier pass of
the process had already held BLAS to one thread. So a run resumed from a checkpoint starts from the
same parameters but may part from the uninterrupted run in the last bits of its first steps, when a big
pass follows small ones (MiniImagenet, W2-sized meta-batches); small models never hold BLAS and resume
bitwise.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

SHARE_MIN_BYTES = 32 << 20  # passes over less than this stay on one thread while BLAS has its own threads

_pool = None  # worker threads (the calling thread works too), made on first use
_pool_size = 0
_blas_limit = None  # threadpoolctl's limit of BLAS to one thread, set on the first parallel pass


def cpu_threads() -> int:
    """Threads for blockwise passes: ``MINIMAML_THREADS`` (a positive integer), else the number of cores
    this process may run on."""
    value = os.environ.get("MINIMAML_THREADS", "").strip()
    if not value:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"MINIMAML_THREADS={value!r}: expected a positive integer (the CPU threads to use)")
    return int(value)


def threads_for(n_bytes: int) -> int:
    """The threads a blockwise pass over ``n_bytes`` of data should run on: ``cpu_threads()``, except
    one for a pass under ``SHARE_MIN_BYTES`` as long as BLAS has not been held to one thread."""
    threads = cpu_threads()
    if threads > 1 and n_bytes < SHARE_MIN_BYTES and _blas_limit is None:
        return 1
    return threads


def map_shares(work, blocks: list, threads: int) -> list:
    """Split ``blocks`` into ``threads`` contiguous shares (fewer if there are fewer blocks) and return
    ``[work(share) for share in shares]``, each share on its own thread, the first on the calling one.
    With a single share this is a plain call (e.g. on the GPU, where the primitives make one block)."""
    n_shares = min(threads, len(blocks))
    if n_shares < 2:
        return [work(blocks)]
    size = -(-len(blocks) // n_shares)
    shares = [blocks[start:start + size] for start in range(0, len(blocks), size)]
    _hold_blas_to_one_thread()
    futures = [_workers(len(shares) - 1).submit(work, share) for share in shares[1:]]
    first = work(shares[0])
    return [first] + [future.result() for future in futures]


def _workers(count: int) -> ThreadPoolExecutor:
    """The pool of worker threads, grown when more are asked for than it has."""
    global _pool, _pool_size
    if _pool_size < count:
        if _pool is not None:
            _pool.shutdown(wait=True)
        _pool, _pool_size = ThreadPoolExecutor(max_workers=count, thread_name_prefix="minimaml"), count
    return _pool


def _hold_blas_to_one_thread() -> None:
    """Limit the BLAS library NumPy uses to one thread, once, for the rest of the process."""
    global _blas_limit
    if _blas_limit is None:
        from threadpoolctl import threadpool_limits

        _blas_limit = threadpool_limits(limits=1, user_api="blas")
