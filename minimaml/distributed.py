"""The meta-batch over MPI ranks: the only module that talks to MPI (mpi4py, the optional ``.[mpi]`` extra).

    mpiexec -n 2 python -m minimaml.experiments.omniglot --profile quick

Data parallelism as MAML's equation has it: the meta-gradient is a sum over tasks,

    grad L(theta) = sum_i grad L_{Q_i}(theta_i^K)   =   sum_r  sum_{i in share_r} grad L_{Q_i}(theta_i^K),

so every rank draws the same global meta-batch from the same generator (the results do not depend on
the number of ranks R), computes the summed meta-gradient of its contiguous share of the tasks
(``share_tasks``), an all-reduce adds the R partial sums (``sum_over_ranks``), and every rank takes the
same optimizer step. Rank 0 alone writes checkpoints and results (``train.save_checkpoint`` and
``experiments.common.write_text`` ask ``is_root``), logs and holds the output folder's lock
(``root_lock``). With ``MINIMAML_DEVICE=gpu`` each rank takes the GPU of its local rank (``root_lock``
calls ``use_local_gpu``): one rank per GPU. MAML-TRPO splits the same way: each rank samples its share
of the tasks (``rl.sampler.rank_share``, the sampler's early stops decided by ``any_over_ranks`` /
``all_over_ranks``) and TRPO all-reduces its gradient, Fisher products and line-search values
(``rl.trpo.trpo_step(..., over_ranks=True)``).

Without ``mpiexec`` there is one rank: ``rank() == 0``, ``size() == 1``, every function here gives
back what it was given, and mpi4py is never imported, so nothing changes for a single process (under
``mpiexec`` without mpi4py, the first call says to install the extra).

Arrays are all-reduced through host memory as float64 (CuPy arrays are copied to the host and back;
simple and always correct; ``MINIMAML_ALL_REDUCE=cuda-aware`` or ``nccl`` keeps CuPy arrays on the
device, ``all_reduce_path``), so a sum over R ranks differs from one process's only in rounding
(a few 1e-15 relative in float64, the last bits of float32). A rank that dies or raises stops the whole run:
an uncaught exception calls ``MPI.COMM_WORLD.Abort`` (``_abort_on_error``), and ``mpiexec`` kills
the other ranks when one is killed, instead of leaving them blocked in a collective.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import traceback as tb
from contextlib import contextmanager

import numpy as np

from minimaml import backend

_COMM = None  # MPI.COMM_WORLD under mpiexec with more than one rank, else None


def _launched_by_mpi() -> bool:
    """Whether an MPI launcher started this process (its environment says so): mpi4py is imported
    only then, so a plain ``python`` run never initialises MPI."""
    return any(name in os.environ for name in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK"))


def _comm():
    global _COMM
    if _COMM is None and _launched_by_mpi():
        try:
            from mpi4py import MPI
        except ImportError as err:
            raise ImportError("minimaml.distributed: this process was started by an MPI launcher but mpi4py is "
                              "missing; install the extra: pip install -e '.[mpi]'") from err
        if MPI.COMM_WORLD.Get_size() > 1:
            _COMM = MPI.COMM_WORLD
            sys.excepthook = _abort_on_error
    return _COMM


def _abort_on_error(kind, value, traceback, one_line: bool = False) -> None:
    """An uncaught exception on one rank: print it (``one_line``: its message alone, for an error the user
    caused), then abort every rank (the others would wait in their next collective for ever). The report
    goes out in one write, and the launcher gets a moment to pass it on before the abort ends the
    processes that forward it."""
    report = f"error: {value}\n" if one_line else "".join(tb.format_exception(kind, value, traceback))
    sys.stderr.flush()
    os.write(sys.stderr.fileno(), f"rank {_COMM.Get_rank()}: {report}".encode())
    time.sleep(0.5)
    _COMM.Abort(1)


def size() -> int:
    """The number of ranks R (1 without mpiexec)."""
    comm = _comm()
    return 1 if comm is None else comm.Get_size()


def rank() -> int:
    """This process's rank, 0 .. R-1 (0 without mpiexec)."""
    comm = _comm()
    return 0 if comm is None else comm.Get_rank()


def is_root() -> bool:
    """Rank 0: the one that writes files and logs."""
    return rank() == 0


def local_rank() -> int:
    """This rank's index among the ranks on its host (picks its GPU: one rank per GPU)."""
    for name in ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "PMIX_LOCAL_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    comm = _comm()
    if comm is None:
        return 0
    from mpi4py import MPI
    return comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()


def share(n_items: int) -> slice:
    """This rank's contiguous share of ``n_items`` (tasks): ``share_of(n_items, size(), rank())``."""
    return share_of(n_items, size(), rank())


def check_ranks(counts: dict, ranks: int | None = None) -> None:
    """Refuse, before any work, a count of tasks split over the ranks that is smaller than the number of
    ``ranks`` (default ``size()``), which would leave a rank with nothing to do; ``counts``: setting name
    (``meta_batch_size``) -> count."""
    ranks = size() if ranks is None else ranks
    for name, count in counts.items():
        if count < ranks:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} {count} is smaller than the {ranks} MPI ranks: every rank needs at least one "
                             f"of those tasks (use mpiexec -n {count} or fewer, or a larger {flag})")


def share_of(n_items: int, ranks: int, me: int) -> slice:
    """Rank ``me``'s share of ``n_items`` among ``ranks``: contiguous shares, in rank order, whose sizes
    differ by at most one, the first ``n_items mod ranks`` one larger. Refuses ranks > n_items (a rank
    with nothing to do)."""
    if ranks > n_items:
        raise ValueError(f"distributed: {ranks} ranks for {n_items} tasks; a meta-batch needs at least one task "
                         f"per rank (use mpiexec -n {n_items} or fewer, or a larger --meta-batch-size)")
    base, extra = divmod(n_items, ranks)
    start = me * base + min(me, extra)
    return slice(start, start + base + (1 if me < extra else 0))


def _take(data, part: slice):
    """A set (``Examples``, ``Trajectories``: a dataclass of arrays with the task axis first) cut to the
    tasks ``part``."""
    return type(data)(**{field.name: getattr(data, field.name)[part] for field in dataclasses.fields(data)})


def share_tasks(tasks):
    """This rank's share of a ``TaskBatch`` (``share``); the whole batch on one rank."""
    if size() == 1:
        return tasks
    part = share(tasks.n_tasks)
    return type(tasks)(support=_take(tasks.support, part), query=_take(tasks.query, part))


ALL_REDUCE_PATHS = ("host", "cuda-aware", "nccl")
_NCCL = None  # cupyx.distributed's NCCL communicator, made at the first all-reduce that needs it


def all_reduce_path() -> str:
    """How CuPy arrays are summed over the ranks, ``MINIMAML_ALL_REDUCE``: ``host`` (the default: through
    host memory, simple and always correct), ``cuda-aware`` (MPI's ``Allreduce`` on the device buffer;
    needs an MPI built with CUDA support, which the mpich wheel of the ``.[mpi]`` extra is not) or
    ``nccl`` (``cupyx.distributed``'s NCCL communicator, bootstrapped over MPI). NumPy arrays always
    take the host path."""
    path = os.environ.get("MINIMAML_ALL_REDUCE", "host")
    if path not in ALL_REDUCE_PATHS:
        raise ValueError(f"MINIMAML_ALL_REDUCE={path!r}: expected one of {', '.join(ALL_REDUCE_PATHS)}")
    return path


def _sum_on_device(flat, path: str, comm):
    """The sum over ranks of the float64 CuPy vector ``flat``, by ``path`` (``all_reduce_path``), on the
    device."""
    import cupy
    total = cupy.empty_like(flat)
    if path == "cuda-aware":
        cupy.cuda.get_current_stream().synchronize()  # MPI reads the buffer outside CuPy's stream
        comm.Allreduce(flat, total)
        return total
    global _NCCL
    if _NCCL is None:
        from cupyx import distributed as cupy_distributed
        _NCCL = cupy_distributed.init_process_group(comm.Get_size(), comm.Get_rank(), use_mpi=True)
    _NCCL.all_reduce(flat, total, op="sum")
    return total


def all_reduce(arrays: dict) -> dict:
    """The sum over ranks of each array of ``arrays`` (NumPy or CuPy, any shapes), the same on every
    rank, each in its own dtype and device. One all-reduce of all of them packed into one float64
    buffer: on the host (CuPy arrays are copied there and back), or for CuPy arrays on the device if
    ``MINIMAML_ALL_REDUCE`` says so (``all_reduce_path``)."""
    comm = _comm()
    if comm is None:
        return arrays
    names = list(arrays)
    path = all_reduce_path()
    devices = [xp for xp in map(backend.array_namespace, arrays.values()) if xp is not np]
    if path != "host" and devices:  # every array into one device buffer (a NumPy scalar loss too)
        xp = devices[0]
        flat = xp.concatenate([xp.asarray(arrays[n], dtype=xp.float64).ravel() for n in names])
        total = _sum_on_device(flat, path, comm)
    else:
        flat = np.concatenate([backend.to_numpy(arrays[n]).astype(np.float64).ravel() for n in names])
        total = np.empty_like(flat)
        comm.Allreduce(flat, total)
    out, start = {}, 0
    for n in names:
        a = arrays[n]
        out[n] = _placed_like(total[start:start + a.size].reshape(a.shape), a)
        start += a.size
    return out


def _placed_like(piece, like):
    """``piece`` (NumPy or CuPy) in ``like``'s namespace and dtype."""
    xp = backend.array_namespace(like)
    if xp is np:
        return np.asarray(backend.to_numpy(piece), dtype=like.dtype)
    return xp.asarray(piece, dtype=like.dtype)


def sum_over_ranks(loss: float, grads: dict) -> tuple:
    """(sum over ranks of ``loss``, sum over ranks of each gradient), the same on every rank: the
    meta-batch's summed loss and meta-gradient from each rank's share. ``grads``: dict of arrays."""
    if _comm() is None:
        return loss, grads
    total = all_reduce({"loss": np.asarray(float(loss)), **{f"grad/{n}": g for n, g in grads.items()}})
    return float(total["loss"]), {n: total[f"grad/{n}"] for n in grads}


def gather_tasks(per_task: np.ndarray, axis: int = -1) -> np.ndarray:
    """Each rank's per-task results (host array, tasks along ``axis``, in ``share`` order) joined into
    the whole meta-batch's, on every rank."""
    comm = _comm()
    if comm is None:
        return per_task
    return np.concatenate(comm.allgather(np.asarray(per_task)), axis=axis)


def any_over_ranks(flag: bool) -> bool:
    """Whether ``flag`` holds on some rank: the same answer on every rank (``flag`` itself in one
    process). For a loop that must stop at the same pass on every rank (the RL sampler's early stops)."""
    comm = _comm()
    return bool(flag) if comm is None else any(comm.allgather(bool(flag)))


def all_over_ranks(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank: the same answer on every rank (``flag`` itself in one
    process)."""
    comm = _comm()
    return bool(flag) if comm is None else all(comm.allgather(bool(flag)))


def broadcast(value):
    """Rank 0's ``value`` on every rank (any picklable object)."""
    comm = _comm()
    return value if comm is None else comm.bcast(value, root=0)


def barrier() -> None:
    """Wait until every rank gets here."""
    comm = _comm()
    if comm is not None:
        comm.Barrier()


def use_local_gpu() -> None:
    """With ``MINIMAML_DEVICE=gpu`` under MPI: make GPU ``local_rank() mod (GPUs on this host)`` this
    rank's current CuPy device (one rank per GPU). Nothing otherwise."""
    if _comm() is None or os.environ.get("MINIMAML_DEVICE", "cpu").strip().lower() != "gpu":
        return
    import cupy
    cupy.cuda.Device(local_rank() % cupy.cuda.runtime.getDeviceCount()).use()


@contextmanager
def root_lock(folder, one_line=()):
    """``files.folder_lock(folder)`` held by rank 0 for the whole run; the other ranks wait until it is
    held. An error that leaves the run on any rank aborts every rank, even if a command catches it
    later (a folder that another run holds, a bad setting), instead of leaving the others waiting; one of
    the types ``one_line`` is reported as its message alone. Each rank first takes its GPU
    (``use_local_gpu``)."""
    from minimaml import files

    use_local_gpu()
    try:
        if is_root():
            with files.folder_lock(folder):
                barrier()
                yield
                barrier()
        else:
            barrier()
            yield
            barrier()
    except BaseException as err:  # caught or not later (a command's error exit), it must not leave the
        if size() > 1:            # other ranks waiting in a collective: stop them all
            _abort_on_error(type(err), err, err.__traceback__, one_line=isinstance(err, one_line))
        raise
