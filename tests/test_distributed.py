"""The meta-batch over MPI ranks (minimaml.distributed): one process is unchanged, and under
``mpiexec -n 2`` and ``-n 3`` (tasks that do not split evenly) the meta-gradients, a short training run
and a resume under another R equal one process's, for the supervised settings and for MAML-TRPO (its
sampled trajectories, gradient, Fisher products, meta-iterations, evaluation and a 2D-navigation run);
a rank that dies stops the run with an error.

The multi-rank tests start ``mpiexec -n R python tests/mpi_worker.py ...`` (the ``.[mpi]`` extra) and skip
where it is missing."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minimaml import distributed, files, maml, train
from minimaml.tasks import sinusoid as sinusoid_tasks

WORKER = Path(__file__).with_name("mpi_worker.py")
ENV = {**os.environ, "MINIMAML_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
       "MINIMAML_DEVICE": "cpu"}


def _mpiexec():
    """The ``mpiexec`` beside this Python (the mpich wheel's) or on PATH, or None."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    beside = Path(sys.executable).with_name("mpiexec")
    return str(beside) if beside.exists() else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason="mpi4py or mpiexec missing: install the extra, "
                                                       "pip install -e '.[mpi]'")


def _launch(ranks: int, *args, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """``tests/mpi_worker.py args`` under ``mpiexec -n ranks`` (plain ``python`` for ranks == 0)."""
    command = [sys.executable, str(WORKER), *map(str, args)]
    if ranks:
        command = [MPIEXEC, "-n", str(ranks)] + command
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done


# --- one process: nothing changes ------------------------------------------------------------------
def test_one_process_is_rank_0_of_1_and_keeps_its_arrays():
    assert (distributed.rank(), distributed.size(), distributed.local_rank()) == (0, 1, 0)
    assert distributed.is_root()
    tasks = sinusoid_tasks.sample_batch(np.random.default_rng(0), 3, 5)
    assert distributed.share_tasks(tasks) is tasks
    grads = {"w": np.ones((2, 3), dtype=np.float32)}
    assert distributed.sum_over_ranks(1.5, grads) == (1.5, grads)
    assert distributed.all_reduce(grads) is grads
    assert distributed.broadcast({"a": 1}) == {"a": 1}
    assert distributed.share(7) == slice(0, 7)
    assert distributed.any_over_ranks(True) is True and distributed.any_over_ranks(False) is False
    assert distributed.all_over_ranks(np.bool_(True)) is True and distributed.all_over_ranks(False) is False


@pytest.mark.parametrize("n_items, ranks", [(7, 2), (7, 3), (5, 3), (600, 8), (3, 3)])
def test_shares_cover_the_tasks_once_in_order_and_differ_by_at_most_one(monkeypatch, n_items, ranks):
    monkeypatch.setattr(distributed, "size", lambda: ranks)
    parts = []
    for me in range(ranks):
        monkeypatch.setattr(distributed, "rank", lambda me=me: me)
        parts.append(distributed.share(n_items))
    assert [i for part in parts for i in range(n_items)[part]] == list(range(n_items))
    sizes = [part.stop - part.start for part in parts]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_more_ranks_than_tasks_is_refused_with_the_counts(monkeypatch):
    monkeypatch.setattr(distributed, "size", lambda: 4)
    with pytest.raises(ValueError, match="4 ranks for 3 tasks"):
        distributed.share(3)


# --- several ranks -----------------------------------------------------------------------------------
@needs_mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_meta_gradients_over_ranks_equal_one_process(tmp_path, ranks):
    """W1-like (sinusoid MLP, 7 tasks) and W2-like (Omniglot Conv4, 5 tasks) meta-batches in float64,
    every MAML mode: the loss and each gradient to float64 round-off."""
    _launch(0, "gradients", tmp_path / "one.npz")
    _launch(ranks, "gradients", tmp_path / "split.npz")
    with np.load(tmp_path / "one.npz") as one, np.load(tmp_path / "split.npz") as split:
        assert sorted(one.files) == sorted(split.files)
        assert {key.split("/")[1] for key in one.files} == set(maml.MODES)
        for key in one.files:
            assert split[key].dtype == np.float64
            scale = max(float(np.max(np.abs(one[key]))), 1e-12)
            assert float(np.max(np.abs(split[key] - one[key]))) <= 1e-13 * scale, key


def _bn_cancelled_biases(params: dict) -> set:
    """Biases that feed a batch norm: the normalisation removes them, so their meta-gradient is zero up
    to round-off, and Adam's first steps (about ``meta_lr x`` its sign) differ between any two ways of
    summing it. Everything else must agree."""
    return {name for name in params if name.endswith(".b") and name[:-2] + ".bn.shift" in params}


@needs_mpi
def test_training_over_ranks_equals_one_process_and_resumes_under_another_count(tmp_path):
    """4 iterations of a toy Omniglot-MLP run (5 tasks a meta-batch, validation and test tasks split
    too): in one process; and 2 iterations under 2 ranks resumed to 4 under 3 ranks."""
    _launch(0, "train", tmp_path / "one", 4)
    _launch(2, "train", tmp_path / "split", 2)
    assert train.load_checkpoint(tmp_path / "split" / "maml.ckpt.npz").iteration == 2
    _launch(3, "train", tmp_path / "split", 4, "resume")
    one = train.load_checkpoint(tmp_path / "one" / "maml.ckpt.npz")
    split = train.load_checkpoint(tmp_path / "split" / "maml.ckpt.npz")
    assert split.iteration == one.iteration == 4
    assert [r["iteration"] for r in split.history] == [0, 1, 2, 3]
    for column in ("loss", "query_ce"):
        np.testing.assert_allclose([r[column] for r in split.history], [r[column] for r in one.history],
                                   rtol=1e-5)
    for name in set(one.params) - _bn_cancelled_biases(one.params):
        np.testing.assert_allclose(split.params[name], one.params[name], rtol=0, atol=1e-5, err_msg=name)
    assert [r["score"] for r in split.validation] == [r["score"] for r in one.validation]
    one_results = json.loads((tmp_path / "one" / "results.json").read_text())
    split_results = json.loads((tmp_path / "split" / "results.json").read_text())
    assert split_results["test_accuracy"] == one_results["test_accuracy"]


def _relative_difference(split: np.ndarray, one: np.ndarray) -> float:
    """max |split - one| / max |one| (0 for equal arrays, also empty or all-zero ones)."""
    if np.array_equal(split, one):
        return 0.0
    return float(np.max(np.abs(split - one))) / max(float(np.max(np.abs(one))), 1e-300)


@pytest.fixture(scope="module")
def rl_one_process(tmp_path_factory):
    """``mpi_worker.py rl`` in one process, the reference of the RL tests (navigation)."""
    path = tmp_path_factory.mktemp("rl") / "one.npz"
    _launch(0, "rl", path, "navigation")
    return path


def _check_rl_against_one_process(one, split, iteration_rtol: float) -> None:
    """The RL worker's results over ranks against one process's. The sampled batches: the episodes
    (mask, kept) and the generator's next draws bit for bit, the trajectories to float64 round-off (BLAS
    may round the shared policy's products in the last bit when it has fewer rows). The summed loss,
    KL, g and F v (both paths) to 1e-13. A whole meta-iteration's params to ``iteration_rtol``: CG
    amplifies the round-off of F v (one process whose products get 1e-16 relative noise moves as far)."""
    assert sorted(one.files) == sorted(split.files)
    for key in one.files:
        assert split[key].dtype == one[key].dtype and split[key].shape == one[key].shape, key
        if key.endswith(("/mask", "/kept")) or key == "draws_after" or key.endswith(("accepted", "backtracks")):
            np.testing.assert_array_equal(split[key], one[key], err_msg=key)
        elif key.startswith(("pre/", "post/", "sum/", "evaluation/")) or key.endswith(("_return", "grad_norm",
                                                                                       "loss_before")):
            assert _relative_difference(split[key], one[key]) <= 1e-13, key
        else:  # the meta-iterations' new params, KL and loss after the step
            assert key.startswith("iteration_"), key
            assert _relative_difference(split[key], one[key]) <= iteration_rtol, key


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_maml_trpo_over_ranks_equals_one_process(tmp_path, rl_one_process, ranks):
    """2D navigation, 5 tasks of 12-step episodes (some reach the goal early), float64: the sampled
    batches, g and the Fisher-vector products of ``meta_fisher_product`` and of the tape, two whole
    meta-iterations (one with each) and an evaluation of 7 test tasks in chunks of 4."""
    _launch(ranks, "rl", tmp_path / "split.npz", "navigation")
    with np.load(rl_one_process) as one, np.load(tmp_path / "split.npz") as split:
        assert "evaluation/returns" in one.files and one["pre/mask"].shape[0] == 5
        assert not one["pre/mask"].all()  # some episodes ended early
        _check_rl_against_one_process(one, split, iteration_rtol=1e-6)


@needs_mpi
def test_maml_trpo_on_mujoco_over_ranks_equals_one_process(tmp_path):
    """The half-cheetah (its reset seeds drawn through the task share's stream) under 2 ranks. Its F is
    far worse conditioned (eigenvalues 4e-5 .. 9e5), so CG takes the round-off of F v to ~1e-5 of the
    step: the meta-iterations are compared loosely, everything else as on navigation."""
    pytest.importorskip("mujoco")
    pytest.importorskip("gymnasium")
    _launch(0, "rl", tmp_path / "one.npz", "cheetah_direction")
    _launch(2, "rl", tmp_path / "split.npz", "cheetah_direction")
    with np.load(tmp_path / "one.npz") as one, np.load(tmp_path / "split.npz") as split:
        _check_rl_against_one_process(one, split, iteration_rtol=1e-2)


@needs_mpi
def test_navigation_training_over_ranks_equals_one_process_and_resumes_under_another_count(tmp_path):
    """The navigation command's three methods, 4 iterations each, float64: in one process; and 2
    iterations under 2 ranks resumed to 4 under 3 ranks. Params, training history and test returns
    agree to float64 round-off (the pretrained baseline, which gathers its trajectories and steps on
    all of them on every rank, bit for bit)."""
    _launch(0, "rl_train", tmp_path / "one", 4)
    _launch(2, "rl_train", tmp_path / "split", 2)
    assert train.load_checkpoint(tmp_path / "split" / "maml.ckpt.npz").iteration == 2
    _launch(3, "rl_train", tmp_path / "split", 4, "resume")
    for method in ("maml", "pretrained"):
        one = train.load_checkpoint(tmp_path / "one" / f"{method}.ckpt.npz")
        split = train.load_checkpoint(tmp_path / "split" / f"{method}.ckpt.npz")
        assert split.iteration == one.iteration == 4
        assert [r["iteration"] for r in split.history] == [0, 1, 2, 3]
        for column in set(one.history[0]) - {"iteration", "seconds"}:
            np.testing.assert_allclose([r[column] for r in split.history], [r[column] for r in one.history],
                                       rtol=1e-10, atol=1e-14, err_msg=f"{method} {column}")
        for name in one.params:
            assert split.params[name].dtype == np.float64
            assert _relative_difference(split.params[name], one.params[name]) <= 1e-10, f"{method} {name}"
    one_results = json.loads((tmp_path / "one" / "results.json").read_text())
    split_results = json.loads((tmp_path / "split" / "results.json").read_text())
    for method, per_task in one_results["per_task"].items():
        np.testing.assert_allclose(split_results["per_task"][method], per_task, rtol=1e-10, err_msg=method)
    for figure in ("navigation_steps.png", "navigation_training.png", "navigation_trajectories.png"):
        assert (tmp_path / "split" / figure).stat().st_size > 0


@needs_mpi
def test_rl_settings_that_leave_a_rank_without_tasks_are_refused_at_once(tmp_path):
    """A last chunk of 2 test tasks for 3 ranks: every rank says so and exits before any work."""
    done = subprocess.run([MPIEXEC, "-n", "3", sys.executable, "-m", "minimaml.experiments.navigation",
                           "--profile", "smoke", "--meta-batch-size", "5", "--n-test-tasks", "7",
                           "--out-dir", str(tmp_path / "run"), "--no-progress"],
                          env=ENV, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "last chunk of 2 test tasks for 3 MPI ranks" in done.stderr
    assert not (tmp_path / "run").exists()


def _wait_for_the_lock_owner_to_go(folder: Path, seconds: float = 20) -> None:
    """An aborted rank 0 is reaped a moment after mpiexec returns (a zombie until then, which the
    folder lock counts as running): wait for it, as a user restarting the run would."""
    lock = folder / files.LOCK_NAME
    deadline = time.monotonic() + seconds
    while lock.exists() and files.process_running(int(lock.read_text().split()[0])):
        assert time.monotonic() < deadline, f"{lock}: its owner is still running {seconds} s after the abort"
        time.sleep(0.1)


@needs_mpi
@pytest.mark.parametrize("how", ["kill", "raise"])
def test_a_rank_that_dies_stops_the_run_with_an_error_and_the_checkpoint_stays_usable(tmp_path, how):
    """Rank 1 is SIGKILLed (or raises) at iteration 3 of a 10000-iteration run: mpiexec ends with an
    error within the timeout instead of hanging in a collective; the run resumes from the checkpoint."""
    done = _launch(2, "die", tmp_path / "run", how, check=False, timeout=60)
    assert done.returncode != 0
    if how == "raise":
        assert "rank 1 fails on purpose" in done.stderr
    ckpt = train.load_checkpoint(tmp_path / "run" / "maml.ckpt.npz")
    assert 1 <= ckpt.iteration <= 3
    _wait_for_the_lock_owner_to_go(tmp_path / "run")
    _launch(0, "train", tmp_path / "run", ckpt.iteration + 1, "resume")
    assert train.load_checkpoint(tmp_path / "run" / "maml.ckpt.npz").iteration == ckpt.iteration + 1


@needs_mpi
def test_a_folder_held_by_another_run_stops_every_rank_at_once(tmp_path):
    """Rank 0 cannot take the folder's lock and the command reports it (a caught error, exit 1): the
    other rank must not wait for it in a collective."""
    with files.folder_lock(tmp_path):  # this test process holds the folder, as a live run would
        start = time.monotonic()
        done = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "minimaml.experiments.sinusoid",
                               "--profile", "smoke", "--out-dir", str(tmp_path), "--no-progress"],
                              env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and time.monotonic() - start < 60
    assert "is in use by another run" in done.stderr + done.stdout


# --- the all-reduce's device paths ---------------------------------------------------------------------
def test_an_unknown_all_reduce_path_is_refused(monkeypatch):
    monkeypatch.setenv("MINIMAML_ALL_REDUCE", "gloo")
    with pytest.raises(ValueError, match="MINIMAML_ALL_REDUCE='gloo': expected one of host, cuda-aware, nccl"):
        distributed.all_reduce_path()
    monkeypatch.delenv("MINIMAML_ALL_REDUCE")
    assert distributed.all_reduce_path() == "host"


def _gpus() -> int:
    from minimaml import backend
    return backend._import_cupy().cuda.runtime.getDeviceCount() if backend.gpu_available() else 0


@needs_mpi
@pytest.mark.parametrize("path, device", [
    ("host", "cpu"), ("nccl", "cpu"),  # NumPy arrays take the host path whatever the setting
    pytest.param("host", "gpu", marks=pytest.mark.gpu),
    pytest.param("nccl", "gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(
        _gpus() < 2, reason="NCCL needs one GPU per rank: fewer than 2 GPUs")]),
    pytest.param("cuda-aware", "gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(
        os.environ.get("MINIMAML_TEST_CUDA_AWARE_MPI") != "1",
        reason="set MINIMAML_TEST_CUDA_AWARE_MPI=1 where mpi4py runs on a CUDA-aware MPI")]),
])
def test_each_all_reduce_path_sums_over_ranks_in_place(tmp_path, path, device):
    """2 ranks: the sums of a float32 matrix, a float64 vector and a NumPy scalar, each back in its own
    namespace and dtype, the same by every path."""
    out = tmp_path / "sums.npz"
    command = [MPIEXEC, "-n", "2", sys.executable, str(WORKER), "all_reduce_path", str(out), path]
    done = subprocess.run(command, env={**ENV, "MINIMAML_DEVICE": device}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    sums = np.load(out)
    assert bool(sums["placed"])
    np.testing.assert_array_equal(sums["matrix"], np.arange(12, dtype=np.float32).reshape(3, 4) * 3)
    np.testing.assert_allclose(sums["vector"], 2 * np.linspace(0, 1, 5) + 1, rtol=1e-15)
    assert float(sums["loss"]) == 0.5


@needs_mpi
@pytest.mark.parametrize("experiment, flags, message", [
    ("sinusoid", ["--meta-batch-size", "1"], "--meta-batch-size 1 is smaller than the 2 MPI ranks"),
    ("omniglot", ["--n-val-tasks", "1"], "--n-val-tasks 1 is smaller than the 2 MPI ranks"),
])
def test_fewer_tasks_than_ranks_is_one_line_from_rank_0_before_any_work(tmp_path, experiment, flags, message):
    """The audit's cases: Omniglot with one validation task under 2 ranks crashed at the first validation
    and blamed --meta-batch-size; more ranks than tasks printed one traceback per rank."""
    done = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", f"minimaml.experiments.{experiment}", *flags,
                           "--out-dir", str(tmp_path / "run"), "--no-progress"],
                          env=ENV, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "run").exists()
