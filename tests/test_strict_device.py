"""The GPU path's CPU-side contract, run in CI on the tests' strict stand-in for CuPy (``strict_xp``).

With ``backend.set_device("strict")`` every array minimaml makes is a device array that NumPy cannot
read implicitly and that refuses to meet a NumPy array, as CuPy's do; a NumPy-only call on the way
(``numpy.asarray`` of a device array, ``numpy.add.at``, a host array mixed in) raises here, in CI, not in
a GPU window. Each check runs the same computation on the CPU and on the stand-in: the results are the
same numbers (NumPy does both), so what is checked is that the GPU path runs, stays on the device, and
keeps its dtypes. Fast: a few seconds each."""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
import pytest

import strict_xp
from minimaml import autodiff as ad
from minimaml import algorithms, backend, distributed, maml, optim, train, verify
from minimaml.experiments import classification, navigation, omniglot, sinusoid
from minimaml.algorithms import ALGORITHMS, ANIL, IMAML, MAML, MAMLPlusPlus, MetaSGD, Reptile
from minimaml.nn import conv4, mlp
from minimaml.nn import policy as pol
from minimaml.rl import maml_rl, sampler, trpo
from minimaml.rl.envs import Navigation2D, make_env
from minimaml.tasks import sinusoid as sinusoid_tasks


@pytest.fixture
def strict(monkeypatch):
    """The default device is the stand-in for the test; the backend is put back afterwards."""
    monkeypatch.setattr(backend, "_cupy", backend._cupy)
    monkeypatch.setattr(backend, "_device", backend._device)
    monkeypatch.setitem(sys.modules, "cupyx", strict_xp.cupyx)
    backend.set_device("strict")
    strict_xp.reset()
    return strict_xp


def on_cpu(function, *args, **kwargs):
    """``function`` run with NumPy as the default device (the reference), then the stand-in again."""
    backend.set_device("cpu")
    try:
        return function(*args, **kwargs)
    finally:
        backend.set_device("strict")


def to_device(value):
    """NumPy arrays in ``value`` (dicts, lists, the task records) as device arrays."""
    if isinstance(value, np.ndarray):
        return backend.asarray(value)
    if isinstance(value, dict):
        return {k: to_device(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v) for v in value)
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{f.name: to_device(getattr(value, f.name))
                                             for f in dataclasses.fields(value)})
    return value


def assert_same_on_device(device_arrays: dict, cpu_arrays: dict, rtol: float = 1e-10):
    assert set(device_arrays) == set(cpu_arrays)
    for name, cpu in cpu_arrays.items():
        got = device_arrays[name]
        assert backend.is_gpu_array(got), f"{name}: a host array came back from the GPU path"
        assert got.dtype == cpu.dtype, f"{name}: dtype {got.dtype}, on the CPU {cpu.dtype}"
        np.testing.assert_allclose(backend.to_numpy(got), cpu, rtol=rtol, atol=1e-12, err_msg=name)


def maml_step(config):
    """The sinusoid experiment's MAML training step."""
    return sinusoid.meta_step(config, sinusoid.make_algorithm(config))


# --- the stand-in itself ---------------------------------------------------------------------------------


def test_the_stand_in_refuses_what_cupy_refuses_and_counts_host_transfers(strict):
    xp = backend.xp()
    a = xp.asarray(np.arange(6.0).reshape(2, 3))
    assert backend.get_device() == "gpu" and backend.is_gpu_array(a) and not isinstance(a, np.ndarray)
    for implicit in (lambda: np.asarray(a), lambda: np.exp(a), lambda: np.sum(a), lambda: np.ones(3) + a,
                     lambda: a * np.ones(3), lambda: xp.maximum(a, np.ones(3))):
        with pytest.raises(TypeError):
            implicit()
    b = a * np.float32(2) + 1.0  # NumPy and Python scalars are allowed
    assert backend.is_gpu_array(b) and strict.count() == 0
    assert float(b.sum()) == 36.0 and bool(b.all()) and b[1, 2].item() == 11.0
    np.testing.assert_array_equal(backend.to_numpy(b), np.arange(6.0).reshape(2, 3) * 2 + 1)
    assert {kind for kind, _ in strict.transfers} == {"float", "bool", "item", "asnumpy"}
    assert strict.count() == 4 and all(line.startswith("tests/test_strict_device.py:") for _, line in strict.transfers)


def test_the_stand_in_has_only_cupys_random_generator_methods(strict):
    rng = backend.rng(0)
    assert backend.is_gpu_array(rng.standard_normal((2, 3))) and backend.is_gpu_array(rng.uniform(0, 1, 4))
    with pytest.raises(AttributeError, match="choice"):
        rng.choice(3, 2)


# --- the tape and the meta-gradients ---------------------------------------------------------------------


@pytest.mark.parametrize("case", range(len(verify._cases(np.random.default_rng(0)))))
def test_every_primitive_at_second_order(strict, case):
    name, fn, inputs = verify._cases(np.random.default_rng(0), to_device=backend.asarray)[case]
    inputs = [backend.asarray(x) for x in inputs]
    assert backend.is_gpu_array(fn(*[ad.Tensor(x) for x in inputs]).data), name
    report = ad.check_grads(fn, inputs, order=2, raise_on_failure=False)
    assert report.ok, f"{name}: {report}"


@pytest.mark.parametrize("mode", maml.MODES)
@pytest.mark.parametrize("case", range(3))
def test_meta_gradient_in_each_mode(strict, case, mode):
    """The MLP, the conv + batch-norm classifier and the RL loss (``verify``'s three settings)."""
    _, task_loss, params, tasks, inner_lr, inner_steps, names = on_cpu(verify._meta_gradient_cases,
                                                                       np.random.default_rng(0))[case]
    cpu_loss, cpu_grads, _ = on_cpu(maml.meta_gradient, task_loss, params, tasks, inner_lr, inner_steps, mode=mode,
                                    inner_param_names=names)
    loss, grads, _ = maml.meta_gradient(task_loss, to_device(params), to_device(tasks), inner_lr, inner_steps,
                                        mode=mode, inner_param_names=names)
    assert loss == pytest.approx(cpu_loss, rel=1e-12)
    assert_same_on_device(grads, cpu_grads)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_each_followups_meta_gradient(strict, name):
    algorithm = {"maml": MAML(0.01, 1), "reptile": Reptile(inner_lr=0.01, inner_steps=3, optimizer="sgd"),
                 "meta_sgd": MetaSGD(), "maml_pp": MAMLPlusPlus(inner_lr=0.01, inner_steps=2),
                 "anil": ANIL(0.01, 1), "imaml": IMAML(inner_lr=0.01, inner_steps=3, lam=1.0, cg_steps=3)}[name]
    loss = maml.supervised_loss(mlp.apply, ad.mse)

    def meta_gradient():
        rng = np.random.default_rng(0)
        meta = algorithm.init(mlp.init(rng, sizes=(1, 8, 1), dtype=np.float64), rng)
        return algorithm.meta_gradient(loss, meta, sinusoid_tasks.sample_batch(rng, 4, 5, dtype=np.float64), 0)
    cpu_value, cpu_grads, cpu_metrics = on_cpu(meta_gradient)
    value, grads, metrics = meta_gradient()
    assert value == pytest.approx(cpu_value, rel=1e-10) and metrics.keys() == cpu_metrics.keys()
    assert_same_on_device(grads, cpu_grads, rtol=1e-9)


@pytest.mark.parametrize("env_name", ["navigation", "cheetah_direction"])
def test_a_trpo_meta_iteration(strict, env_name):
    """One MAML-TRPO meta-iteration: sampling, the inner REINFORCE step, the Fisher-vector products
    through it, conjugate gradients and the line search (MuJoCo's cheetah where it is installed)."""
    if env_name != "navigation":
        pytest.importorskip("mujoco", reason="MuJoCo is not installed (pip install -e '.[mujoco]')")
    env = make_env(env_name)
    env.horizon = 20  # short episodes: a quick check

    def iteration():
        params = pol.init(np.random.default_rng(0), env.obs_dim, env.act_dim, hidden=(16, 16), dtype=np.float64)
        return maml_rl.meta_iteration(env, params, np.random.default_rng(1), trpo.TRPO(damping=0.1), 3, 2,
                                      algorithms.make("maml", 0.1, 1))
    cpu_params, cpu_stats = on_cpu(iteration)
    params, stats = iteration()
    assert_same_on_device(params, cpu_params, rtol=1e-8)
    assert stats.keys() == cpu_stats.keys()


class OneRank:
    """An MPI communicator of one process, as the all-reduce's host path uses it (MPI reads and writes
    host memory: the buffers must be NumPy arrays)."""

    def Get_size(self):
        return 1

    def Get_rank(self):
        return 0

    def Allreduce(self, send, receive):
        assert isinstance(send, np.ndarray) and isinstance(receive, np.ndarray), "MPI was handed a device array"
        receive[...] = send

    def allgather(self, value):
        return [value]

    def bcast(self, value, root=0):
        return value


def test_the_all_reduce_on_one_rank(strict, monkeypatch):
    monkeypatch.setattr(distributed, "_COMM", OneRank())
    rng = np.random.default_rng(0)
    host = {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(4)}
    assert_same_on_device(distributed.all_reduce(to_device(host)), host)
    loss, grads = distributed.sum_over_ranks(1.5, to_device(host))
    assert loss == 1.5
    assert_same_on_device(grads, host)
    config = sinusoid.Config.for_profile("quick", meta_batch_size=4)
    params = mlp.init(np.random.default_rng(0))
    result = train.run(params, maml_step(config), 1, seed=0, progress=False)
    assert all(backend.is_gpu_array(p) for p in result.params.values()) and np.isfinite(result.history[0]["loss"])


# --- one training step of each experiment, start to finish -------------------------------------------------


def test_a_sinusoid_run(strict, tmp_path):
    config = sinusoid.Config.for_profile("quick", n_iterations=2, meta_batch_size=2, n_test_tasks=2,
                                         out_dir=str(tmp_path))
    results = sinusoid.run(config, progress=False)
    assert np.isfinite(results["mse"]["maml/k5"][-1]["mean"])


def _tiny_omniglot(out_dir, model="conv"):
    return omniglot.config(5, 1, model, "quick", out_dir=str(out_dir), n_iterations=1, meta_batch_size=2,
                           q_train=2, q_eval=2, val_every=1, n_val_tasks=2, n_test_tasks=2, eval_batch=2,
                           checkpoint_every=1)


def test_a_conv_classifier_run_on_random_images(strict, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    splits = {name: rng.integers(0, 256, size=(n, 4, 28, 28, 1), dtype=np.uint8)
              for name, n in (("train", 8), ("val", 6), ("test", 6))}
    monkeypatch.setattr(classification, "load_splits", lambda config: splits)
    config = dataclasses.replace(_tiny_omniglot(tmp_path), grad_clip=10.0)  # MiniImagenet's clipped Adam too
    results = classification.run(config, progress=False)
    assert results["iterations"] == 1 and np.isfinite(results["test_accuracy"][-1]["mean"])


def test_an_omniglot_run(strict, tmp_path):
    data = os.environ.get("MINIMAML_DATA")
    if not data or not os.path.isdir(os.path.join(data, "omniglot")):
        pytest.skip("no Omniglot here: set MINIMAML_DATA to a folder with omniglot/ (docs/data.md)")
    results = classification.run(_tiny_omniglot(tmp_path), progress=False)
    assert results["iterations"] == 1 and np.isfinite(results["test_accuracy"][-1]["mean"])


def test_a_navigation_run(strict, tmp_path, monkeypatch):
    monkeypatch.setattr(Navigation2D, "horizon", 20)  # short episodes: a quick check
    cfg = navigation.config("quick", out_dir=str(tmp_path), maml_iterations=1, pretrain_iterations=1,
                            meta_batch_size=2, n_traj=2, n_test_tasks=2, eval_steps=1, test_batch_steps=0,
                            checkpoint_every=1)
    results = navigation.run(cfg, progress=False)
    assert set(results["returns"]) == {"maml", "pretrained", "random"}


def test_a_training_step_stays_on_the_device(strict):
    """``train.GradientStep`` on device parameters: Adam's state and the new parameters stay there."""
    params = mlp.init(np.random.default_rng(0), sizes=(1, 8, 1))

    def loss_and_grads(at, rng, iteration):
        tasks = sinusoid_tasks.sample_batch(rng, 2, 5)
        return maml.meta_gradient(sinusoid.TASK_LOSS, at, tasks, 0.01, 1)
    step = train.GradientStep(loss_and_grads, optim.Adam(1e-3))
    new, state, record = step(params, step.init(params), np.random.default_rng(1), 0)
    assert all(backend.is_gpu_array(a) for name, a in [*new.items(), *state.items()] if name != "step")
    assert np.isfinite(record["loss"])


@pytest.mark.parametrize("algorithm", [a for a in ALGORITHMS if a != "maml"])
def test_a_followups_sinusoid_run(strict, tmp_path, algorithm):
    config = sinusoid.Config.for_profile("quick", algorithm=algorithm, n_iterations=2, meta_batch_size=2,
                                         n_test_tasks=2, out_dir=str(tmp_path))
    results = sinusoid.run(config, progress=False)
    assert np.isfinite(results["mse"][f"{algorithm}/k5"][-1]["mean"])


@pytest.mark.parametrize("algorithm", [a for a in ALGORITHMS if a != "maml"])
def test_a_followups_classifier_run_on_random_images(strict, tmp_path, monkeypatch, algorithm):
    """A small Conv4 (6 filters) on random 12 x 12 images: the follow-ups' code, quickly."""
    rng = np.random.default_rng(0)
    splits = {name: rng.integers(0, 256, size=(n, 4, 12, 12, 1), dtype=np.uint8)
              for name, n in (("train", 8), ("val", 6), ("test", 6))}
    monkeypatch.setattr(classification, "load_splits", lambda config: splits)
    monkeypatch.setattr(classification, "make_model", lambda config: conv4.omniglot_conv4(image_size=12, filters=6))
    config = dataclasses.replace(_tiny_omniglot(tmp_path), algorithm=algorithm)
    results = classification.run(config, progress=False)
    assert results["iterations"] == 1 and np.isfinite(results["test_accuracy"][-1]["mean"])


# --- host synchronisations (benchmarks/bench_host_sync.py prints them for the full-size steps) ----------------


def test_a_maml_training_step_syncs_three_times(strict):
    """The meta-loss (for the progress line) and the NaN guard (the gradients before the update, the
    parameters after it): nothing else in a step of ``train.run`` waits for the GPU."""
    config = sinusoid.Config.for_profile("quick", meta_batch_size=4)
    params = mlp.init(np.random.default_rng(0))
    train.run(params, maml_step(config), 1, seed=0, progress=False)
    strict.reset()
    train.run(params, maml_step(config), 2, seed=0, progress=False)
    assert sorted(kind for (kind, _), n in strict.transfers.items() for _ in range(n)) == ["bool"] * 4 + ["float"] * 2


def test_the_sampler_syncs_once_per_rollout_not_per_time_step(strict):
    env = make_env("navigation")
    params = pol.init(np.random.default_rng(0), env.obs_dim, env.act_dim)
    counts = []
    for horizon in (5, 20):
        strict.reset()
        sampler.sample_trajectories(env, pol.sampler_policy(params), env.sample_tasks(np.random.default_rng(1), 3),
                                    2, np.random.default_rng(2), horizon)
        counts.append(strict.count())
    assert counts[0] == counts[1] == len(params)  # one host copy of each parameter array


def test_the_strict_device_without_the_stand_in_on_the_path_says_where_it_is(monkeypatch, restore_device):
    monkeypatch.setitem(sys.modules, "strict_xp", None)  # `import strict_xp` now fails, as outside the tests
    monkeypatch.setattr(backend, "_cupy", backend._cupy)
    with pytest.raises(backend.BackendError, match=r"tests/strict_xp\.py"):
        backend.set_device("strict")


def test_a_sinusoid_run_resumed_from_its_checkpoint(strict, tmp_path):
    config = sinusoid.Config.for_profile("quick", n_iterations=1, meta_batch_size=2, n_test_tasks=2,
                                         out_dir=str(tmp_path))
    sinusoid.run(config, progress=False)
    resumed = sinusoid.run(dataclasses.replace(config, n_iterations=2), resume=True, progress=False)
    assert [i for i, _ in resumed["training_loss"]["maml"]] == [0, 1]


def test_a_classifier_run_one_query_at_a_time(strict, tmp_path, monkeypatch):
    """Evaluation without transduction (each query image classified on its own)."""
    rng = np.random.default_rng(0)
    splits = {name: rng.integers(0, 256, size=(n, 4, 12, 12, 1), dtype=np.uint8)
              for name, n in (("train", 8), ("val", 6), ("test", 6))}
    monkeypatch.setattr(classification, "load_splits", lambda config: splits)
    monkeypatch.setattr(classification, "make_model", lambda config: conv4.omniglot_conv4(image_size=12, filters=6))
    results = classification.run(dataclasses.replace(_tiny_omniglot(tmp_path), transductive=False), progress=False)
    assert np.isfinite(results["test_accuracy"][-1]["mean"])
