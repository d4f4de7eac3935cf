"""Shared pieces of the meta-step benchmarks: the peers' inputs, timing, the reference check, and
running a peer implementation from the peer benchmark folder in its own process, alternately with
minimaml.

Environment: ``BENCH_PEERS`` (``peers.py`` in the peer benchmark folder, by default
``../shared/bench`` beside the clone), ``BENCH_DATA`` (the folder that folder's ``gen_data.py`` wrote:
W1.npz, W2.npz, ref_<W>.npz) and ``BENCH_PYTHON`` (the Python of the peers' virtual environment).
The peer benchmark folder's ``README.md`` says how to set them up.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time

import numpy

from minimaml import backend

DATA = os.environ.get("BENCH_DATA", "/tmp/bench-data")
PEERS = os.environ.get("BENCH_PEERS", os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                                   "bench", "peers.py"))
PEER_PYTHON = os.environ.get("BENCH_PYTHON", "/tmp/benchvenv/bin/python")
PEER_DIR = os.path.normpath(os.path.dirname(PEERS))  # the peer benchmark folder


def load_workload(name: str) -> dict:
    """The seeded arrays of ``W1.npz`` or ``W2.npz`` (``W1b`` reuses W1's, ``W2fo`` W2's)."""
    path = os.path.join(DATA, f"{name}.npz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: run {os.path.join(PEER_DIR, 'gen_data.py')} with "
                                f"BENCH_DATA set (see {os.path.join(PEER_DIR, 'README.md')})")
    with numpy.load(path) as z:
        return {k: z[k] for k in z.files}


def load_reference(workload: str) -> list:
    """The float64 reference meta-gradient (``ref_<W>.npz``), in the peers' parameter order."""
    path = os.path.join(DATA, f"ref_{workload}.npz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: run peers.py --impl jax64 --save-ref for {workload}")
    with numpy.load(path) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


def max_rel_diff(grads: list, reference: list) -> float:
    """max over arrays of ||g - g_ref||_inf / ||g_ref||_inf, as peers.py checks."""
    return max(float(numpy.max(numpy.abs(numpy.asarray(g, numpy.float64) - r)) / numpy.max(numpy.abs(r)))
               for g, r in zip(grads, reference))


def time_calls(fn, repeats: int, warmup: int = 2) -> list:
    """Milliseconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones; on the GPU each call is
    timed until its kernels have finished (``backend.synchronize``)."""
    for _ in range(warmup):
        fn()
    backend.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        backend.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return times


def run_peer(impl: str, workload: str, repeats: int, extra_env: dict | None = None):
    """(median_ms, min_ms) of a peer from ``peers.py``, or None when the peers are not set up.
    ``extra_env``: environment variables to add for the peer's process."""
    if not (os.path.exists(PEER_PYTHON) and os.path.exists(PEERS)):
        return None
    env = dict(os.environ, BENCH_DATA=DATA, **(extra_env or {}))
    out = subprocess.run([PEER_PYTHON, PEERS, "--workload", workload, "--impl", impl,
                          "--repeats", str(repeats)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        print(f"# peer {impl} {workload} failed: {out.stderr.strip().splitlines()[-1:]}")
        return None
    _, _, median, best = out.stdout.split()
    return float(median), float(best)


def summary(times: list) -> tuple:
    return statistics.median(times), min(times)


def square_gemm_gflops(n: int = 2000) -> float:
    """The machine's float32 GEMM rate in GFLOP/s: the median of 5 products of two n x n matrices with
    NumPy's BLAS, at this process's thread settings (what a reader can judge the meta-steps' times by)."""
    a = numpy.random.default_rng(0).standard_normal((n, n), dtype=numpy.float32)
    median, _ = summary(time_calls(lambda: a @ a, 5, warmup=1))
    return 2 * n**3 / (median / 1e3) / 1e9
