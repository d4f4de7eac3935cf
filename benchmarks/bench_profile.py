"""Where a meta-step's time goes, by tape primitive: W1 (sinusoid, 1 inner step, second order), W1b (5
inner steps), W2 (Omniglot Conv4, 32 tasks, second order), W2fo (the same, first order) and one
navigation MAML-TRPO iteration (quick settings).

    BENCH_DATA=/tmp/bench-data python benchmarks/bench_profile.py [--only W1 W1b W2 W2fo RL] [--repeats 3]

The library holds no timing code: for the timed calls this script replaces every tape primitive of
``ops`` and ``nnops``, every array kernel of ``kernels`` (``PRIMITIVES``), the tape's reverse pass
(``grad``, ``_nodes_between``) and the Tensor operators bound to them by timing wrappers, and puts the
originals back afterwards. A function's *self* time is its wall time less that of the wrapped
functions it calls (``_conv``'s self time is its bookkeeping; ``kernels.conv``'s is the im2col
copies and blocking, its GEMMs are counted under ``kernels.matmul``). Rows:

- ``kernels.*``: the array kernels (convolution, im2col / col2im, batch norm and its VJP, matmul):
  array work, measured;
- each primitive: calls per step, self ms per step, us per call: its bookkeeping plus any array
  work it does inline (``add``'s ``a + b``);
- ``grad (reverse loop)``: the reverse pass less the functions its VJPs call (cotangent dicts, the
  VJP closures' own Python), and ``_nodes_between`` (the topological sort);
- ``outside the tape``: everything else in the step (model code, ``maml``, the sampler, CG's NumPy).
- ``matrix products``: the GFLOP of every ``kernels.matmul`` call (2 m k n per matrix), their rate, and
  the time they would take at the machine's square float32 GEMM rate (printed in the header): a floor
  for the step as long as its arithmetic is the same.

Bookkeeping vs array work: the kernels' time is array work; for the primitives the script measures
the tape's fixed cost per recorded primitive (an ``add`` of two (1, 1) float32 Tensors, minus the
bare NumPy add, as ``bench_tape.py`` does) and estimates their bookkeeping as calls x that cost, the
rest of their self time being inline array work; the reverse loop and the sort are bookkeeping. An
estimate, stated as such in the output. The profile runs on one thread (``MINIMAML_THREADS=1`` and
one BLAS thread, unless set), so that each kernel's time is its own, and with glibc's malloc keeping
freed blocks (``allocator.keep_freed_memory``, as the experiments' commands run). Timing wrappers add their
own cost (~1 us a call), so the total here is somewhat above an unwrapped step. Numbers are printed,
never asserted.
"""

from __future__ import annotations

import os

for _variable in ("MINIMAML_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")  # before NumPy loads: one thread, so each kernel's time is its own

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402

import numpy  # noqa: E402

from bench_tape import per_call_us  # noqa: E402
from common import square_gemm_gflops  # noqa: E402
from minimaml import allocator  # noqa: E402
from minimaml import autodiff as ad  # noqa: E402
from minimaml.autodiff import kernels, nnops, ops, tensor  # noqa: E402

PRIMITIVES = {
    ops: ("add", "subtract", "multiply", "divide", "negative", "power", "exp", "log", "sqrt", "tanh",
          "sigmoid", "where", "sum", "max", "broadcast_to", "reshape", "transpose", "swapaxes", "getitem",
          "scatter_add", "concatenate", "matmul", "matmul_nt", "matmul_tn", "affine", "gradient_step"),
    nnops: ("im2col", "col2im", "_conv", "_conv_input_grad", "_conv_filter_grad", "channel_dot",
            "channel_scale", "batch_normalize", "mean_square"),
    kernels: ("im2col", "col2im", "conv", "conv_input_grad", "conv_filter_grad", "batch_norm",
              "batch_norm_vjp", "matmul"),
    tensor: ("grad", "_nodes_between"),
}


class Profile:
    """The self time and calls of every function of ``PRIMITIVES``, by timing wrappers (``profiled``)."""

    def __init__(self):
        self.seconds, self.calls = defaultdict(float), defaultdict(int)
        self.matmul_flops = 0.0  # 2 m k n per matrix of every kernels.matmul call
        self._local = threading.local()  # .stack: per active wrapped call, seconds in wrapped calls below it

    def _wrap(self, function, name):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            stack = self._local.__dict__.setdefault("stack", [])
            stack.append(0.0)
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                inner = stack.pop()
                self.seconds[name] += elapsed - inner
                self.calls[name] += 1
                if name == "kernels.matmul":
                    self.matmul_flops += product_flops(*args[:2])
                if stack:
                    stack[-1] += elapsed
        return timed

    def replacements(self) -> list:
        """``(owner, attribute, timing wrapper)`` for every function of ``PRIMITIVES``, where the library
        looks it up: its module, the ``autodiff`` package, the Tensor operators bound to it."""
        wrapped, out = {}, []
        for module, names in PRIMITIVES.items():
            for name in names:
                original = getattr(module, name)
                label = f"kernels.{name}" if module is kernels else name
                wrapped[original] = self._wrap(original, label)
                out.append((module, name, wrapped[original]))
                if getattr(ad, name, None) is original:
                    out.append((ad, name, wrapped[original]))
        for attribute, value in list(vars(ad.Tensor).items()):
            if callable(value) and value in wrapped:  # Tensor.__add__ = add, ...
                out.append((ad.Tensor, attribute, wrapped[value]))
        return out


def product_flops(a, b) -> float:
    """2 m k n for every matrix of the (batched, broadcast) product ``a @ b``."""
    batch = numpy.prod(numpy.broadcast_shapes(a.shape[:-2], b.shape[:-2]), dtype=float)
    return 2.0 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]


@contextlib.contextmanager
def profiled():
    """``with profiled() as profile:`` the functions of ``PRIMITIVES`` timed within the block."""
    profile = Profile()
    replacements = profile.replacements()
    originals = [(owner, attribute, getattr(owner, attribute)) for owner, attribute, _ in replacements]
    for owner, attribute, wrapper in replacements:
        setattr(owner, attribute, wrapper)
    try:
        yield profile
    finally:
        for owner, attribute, original in originals:
            setattr(owner, attribute, original)


def record_cost_us(repeats: int = 20000) -> float:
    """The tape's fixed cost of one recorded primitive: ``add`` of (1, 1) float32 Tensors (one needing a
    gradient) less the bare NumPy add (``bench_tape.per_call_us``)."""
    a_np, b_np = numpy.ones((1, 1), numpy.float32), numpy.ones((1, 1), numpy.float32)
    a, b = ad.Tensor(a_np, requires_grad=True), ad.Tensor(b_np)
    return per_call_us(lambda: ops.add(a, b), repeats) - per_call_us(lambda: a_np + b_np, repeats)


def profile_step(step, repeats: int) -> tuple:
    """(total ms per step unwrapped, total ms wrapped, Profile) of ``repeats`` calls after one warm-up."""
    step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    plain_ms = 1e3 * (time.perf_counter() - start) / repeats
    with profiled() as profile:
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        wrapped_ms = 1e3 * (time.perf_counter() - start) / repeats
    return plain_ms, wrapped_ms, profile


def report(name: str, plain_ms: float, wrapped_ms: float, profile: Profile, repeats: int, cost_us: float,
           gemm_gflops: float):
    per_step = {k: 1e3 * s / repeats for k, s in profile.seconds.items()}
    calls = {k: c / repeats for k, c in profile.calls.items()}
    tape = per_step.get("grad", 0.0) + per_step.get("_nodes_between", 0.0)
    kernel_names = [k for k in per_step if k.startswith("kernels.")]
    primitive_names = [k for k in per_step if k not in ("grad", "_nodes_between") and k not in kernel_names]
    kernels_ms = sum(per_step[k] for k in kernel_names)
    primitives_ms = sum(per_step[k] for k in primitive_names)
    n_calls = sum(calls[k] for k in primitive_names)
    outside = wrapped_ms - kernels_ms - primitives_ms - tape
    print(f"\n## {name}: {plain_ms:.2f} ms per step unwrapped, {wrapped_ms:.2f} ms wrapped, "
          f"{n_calls:.0f} primitive calls per step")
    print(f"{'function':24s} {'calls':>8s} {'self ms':>9s} {'share':>6s} {'us/call':>8s}")
    for key in sorted(kernel_names, key=lambda k: -per_step[k]) + sorted(primitive_names, key=lambda k: -per_step[k]):
        print(f"{key:24s} {calls[key]:8.0f} {per_step[key]:9.2f} {100 * per_step[key] / wrapped_ms:5.1f}% "
              f"{1e3 * per_step[key] / max(calls[key], 1):8.1f}")
    for key, label in (("grad", "grad (reverse loop)"), ("_nodes_between", "_nodes_between (sort)")):
        print(f"{label:24s} {calls.get(key, 0):8.0f} {per_step.get(key, 0.0):9.2f} "
              f"{100 * per_step.get(key, 0.0) / wrapped_ms:5.1f}%")
    print(f"{'outside the tape':24s} {'':8s} {outside:9.2f} {100 * outside / wrapped_ms:5.1f}%")
    bookkeeping = min(primitives_ms, n_calls * cost_us / 1e3) + tape
    inline = primitives_ms + tape - bookkeeping
    gemm = per_step.get("kernels.matmul", 0.0)
    print(f"array work: kernels {kernels_ms:.2f} ms ({100 * kernels_ms / wrapped_ms:.0f}%; of it matmul "
          f"{gemm:.2f} ms, {100 * gemm / wrapped_ms:.0f}%), inline in primitives ~{inline:.2f} ms "
          f"({100 * inline / wrapped_ms:.0f}%, estimate)")
    print(f"bookkeeping: ~{bookkeeping:.2f} ms ({100 * bookkeeping / wrapped_ms:.0f}%, estimate: {n_calls:.0f} "
          f"calls x {cost_us:.2f} us + reverse loop and sort); outside the tape {outside:.2f} ms "
          f"({100 * outside / wrapped_ms:.0f}%)")
    gflop = profile.matmul_flops / repeats / 1e9
    print(f"matrix products: {gflop:.3g} GFLOP per step, at {gflop / max(gemm, 1e-9) * 1e3:.1f} GFLOP/s in "
          f"kernels.matmul; at the square GEMM's {gemm_gflops:.1f} GFLOP/s they would take "
          f"{gflop / gemm_gflops * 1e3:.2f} ms, a floor for the step at this arithmetic")


def w1_step(workload="W1"):
    from bench_w1 import meta_step, workload_inputs
    params, tasks = workload_inputs(numpy.float32)
    return lambda: meta_step(params, tasks, workload, "second_order")


def w2_step(mode="second_order"):
    from bench_w2 import meta_step, workload_inputs
    params, tasks = workload_inputs(numpy.float32)
    return lambda: meta_step(params, tasks, mode)


def rl_step():
    from minimaml import algorithms
    from minimaml.experiments import navigation
    from minimaml.experiments.rl_common import build_env, init_policy
    from minimaml.rl import maml_rl
    cfg = navigation.config("quick")
    env = build_env(cfg)
    params = init_policy(env, seed=0)
    seeds = iter(range(1000))
    maml = algorithms.make("maml", cfg.inner_lr, 1)
    return lambda: maml_rl.meta_iteration(env, params, numpy.random.default_rng(next(seeds)), cfg.trpo(),
                                          cfg.meta_batch_size, cfg.n_traj, maml, cfg.discount, cfg.gae_lambda)


STEPS = {"W1": (w1_step, "W1 sinusoid, 25 tasks, 1 inner step, second order"),
         "W1b": (lambda: w1_step("W1b"), "W1b sinusoid, 25 tasks, 5 inner steps, second order"),
         "W2": (w2_step, "W2 Omniglot Conv4, 32 tasks 5-way 1-shot, second order"),
         "W2fo": (lambda: w2_step("first_order"), "W2fo Omniglot Conv4, 32 tasks 5-way 1-shot, first order"),
         "RL": (rl_step, "navigation MAML-TRPO iteration, quick settings (20 tasks x 20 trajectories)")}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", default=list(STEPS), choices=list(STEPS))
    parser.add_argument("--repeats", type=int, default=3, help="steps timed per workload (W1: x 100, W1b: x 20)")
    args = parser.parse_args()
    kept = allocator.keep_freed_memory()  # as the experiments' commands do: freed arrays reused, no page faults
    cost_us = record_cost_us()
    gemm_gflops = square_gemm_gflops()
    print(f"# MINIMAML_THREADS={os.environ['MINIMAML_THREADS']} OPENBLAS_NUM_THREADS="
          f"{os.environ['OPENBLAS_NUM_THREADS']}; malloc keeps freed blocks: {kept}; tape cost per recorded "
          f"primitive ((1, 1) add less NumPy's): {cost_us:.2f} us; float32 GEMM (2000 x 2000 x 2000, NumPy's "
          f"BLAS): {gemm_gflops:.1f} GFLOP/s")
    for key in args.only:
        make, title = STEPS[key]
        repeats = args.repeats * {"W1": 100, "W1b": 20}.get(key, 1)
        plain_ms, wrapped_ms, profile = profile_step(make(), repeats)
        report(title, plain_ms, wrapped_ms, profile, repeats, cost_us, gemm_gflops)


if __name__ == "__main__":
    main()
