"""The algorithms (minimaml.algorithms): their derivative checks, schedules, one meta-step of each, the
one convention they share, and the numerics that say when they failed."""

import inspect

import numpy
import pytest

from minimaml import autodiff as ad
from minimaml import algorithms, maml
from minimaml.algorithms import ALGORITHMS, ANIL, IMAML, MAML, MAMLPlusPlus, MetaSGD, Reptile, checks, maml_pp
from minimaml.algorithms import anil, imaml, meta_sgd, schedules
from minimaml.nn import mlp
from minimaml.tasks import sinusoid


def test_meta_sgd_gradient_matches_differences_for_theta_and_alpha():
    errors = checks.meta_sgd_error(seed=1)
    assert errors["theta"] < 1e-6 and errors["alpha"] < 1e-6


@pytest.mark.parametrize("second_order", [True, False])
def test_maml_pp_multi_step_gradient_matches_differences(second_order):
    errors = checks.maml_pp_error(seed=2, second_order=second_order)
    assert max(errors.values()) < 1e-6, errors


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_reptile_batched_update_equals_a_loop_over_tasks(optimizer):
    assert checks.reptile_error(seed=3, optimizer=optimizer) < 1e-12


def test_imaml_equals_the_least_squares_closed_form():
    errors = checks.imaml_least_squares_error(seed=4)
    assert errors["phi*"] < 1e-10 and errors["gradient"] < 1e-10


def test_imaml_with_the_authors_damping_solves_their_system():
    errors = checks.imaml_least_squares_error(seed=4, cg_damping=1.0, lambda_damping=10.0)
    assert errors["phi*"] < 1e-10 and errors["gradient"] < 1e-10


def test_imaml_converges_to_differences_as_inner_solve_and_cg_tighten():
    curve = checks.imaml_convergence(seed=5, settings=((4, 1), (64, 6), (512, 16)), reference_steps=1500)
    errors = [row[2] for row in curve]
    assert errors[-1] < 1e-6 and errors[0] > 1e-3 and errors[1] > errors[-1]


def test_a_wrong_step_size_gradient_is_caught(monkeypatch):
    real = meta_sgd.meta_gradient

    def wrong(*args, **kwargs):
        loss, grads, metrics = real(*args, **kwargs)
        return loss, {n: g * (1.01 if n.startswith(meta_sgd.ALPHA) else 1.0) for n, g in grads.items()}, metrics
    monkeypatch.setattr(meta_sgd, "meta_gradient", wrong)
    assert checks.meta_sgd_error()["alpha"] > 1e-3


def test_meta_sgd_with_uniform_alpha_is_maml():
    rng = numpy.random.default_rng(0)
    loss, params, tasks = checks._regression(rng)
    meta = MetaSGD(0.05, 2).init(params, rng)
    _, grads, _ = meta_sgd.meta_gradient(loss, meta, tasks, 2)
    _, expected, _ = maml.meta_gradient(loss, params, tasks, 0.05, 2)
    for n in params:
        numpy.testing.assert_allclose(grads[n], expected[n], rtol=1e-10, atol=1e-12)


def test_anil_adapts_only_the_head():
    rng = numpy.random.default_rng(0)
    loss, params, tasks = checks._regression(rng)
    assert anil.head_names(params) == ["layer2.w", "layer2.b"]
    algorithm = ANIL(0.1, 2)
    _, grads, _ = algorithm.meta_gradient(loss, algorithm.init(params, rng), tasks, 0)
    _, expected, _ = maml.meta_gradient(loss, params, tasks, 0.1, 2, inner_param_names=["layer2.w", "layer2.b"])
    for n in params:
        numpy.testing.assert_allclose(grads[n], expected[n], rtol=1e-12)
    *_, adapted = algorithm.adaptation_steps(loss, params, tasks.support, 3)
    assert adapted["layer0.w"].shape == params["layer0.w"].shape  # the body has no task axis: not adapted
    assert adapted["layer2.w"].shape == (3,) + params["layer2.w"].shape


def test_step_weights_anneal_from_uniform_to_the_last_step():
    numpy.testing.assert_allclose(maml_pp.step_weights(5, 0, 10), numpy.full(5, 0.2))
    middle = maml_pp.step_weights(5, 5, 10)
    assert middle[-1] > 0.2 and numpy.all(middle[:-1] < 0.2) and numpy.all(middle[:-1] >= 0.03 / 5)
    numpy.testing.assert_allclose(maml_pp.step_weights(5, 10, 10), [0, 0, 0, 0, 1])


def test_schedules():
    linear = schedules.linear(1.0, 0.0, 10)
    assert linear(0) == 1.0 and linear(5) == 0.5 and linear(20) == 0.0
    cosine = schedules.cosine(1e-3, 1e-5, 100)
    assert cosine(0) == pytest.approx(1e-3) and cosine(50) == pytest.approx((1e-3 + 1e-5) / 2)
    assert cosine(100) == pytest.approx(1e-5)


def _algorithms():
    return {"maml": MAML(0.01, 1), "reptile": Reptile(inner_lr=0.01, inner_steps=3, optimizer="sgd"),
            "meta_sgd": MetaSGD(), "maml_pp": MAMLPlusPlus(inner_lr=0.01, inner_steps=2, msl_epochs=1,
                                                          iterations_per_epoch=2),
            "anil": ANIL(0.01, 1), "imaml": IMAML(inner_lr=0.01, inner_steps=3, lam=1.0, cg_steps=3)}


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_algorithm_takes_a_finite_meta_step_and_adapts(name):
    rng = numpy.random.default_rng(0)
    algorithm = _algorithms()[name]
    loss = maml.supervised_loss(mlp.apply, ad.mse)
    meta = algorithm.init(mlp.init(rng, sizes=(1, 8, 1)), rng)
    tasks = sinusoid.sample_batch(rng, 4, 5)
    optimizer = algorithm.optimizer(1e-3, 10)
    state = optimizer.init(meta)
    for iteration in range(3):
        value, grads, metrics = algorithm.meta_gradient(loss, meta, tasks, iteration)
        assert numpy.isfinite(value) and set(grads) == set(meta)
        assert all(grads[n].shape == meta[n].shape and grads[n].dtype == meta[n].dtype for n in meta)
        new, state = optimizer.update(meta, grads, state)
        assert any(not numpy.array_equal(new[n], meta[n]) for n in meta)
        meta = new
    steps = list(algorithm.adaptation_steps(loss, meta, tasks.support, 4))
    assert len(steps) == 5
    with ad.no_grad():
        losses = [float(ad.mean(loss(theta, tasks.support)).data) for theta in steps]
    assert numpy.all(numpy.isfinite(losses))
    assert set(algorithm.model_params(meta)) == set(mlp.init(rng, sizes=(1, 8, 1)))


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="inner optimizer"):
        Reptile(optimizer="rmsprop")
    with pytest.raises(ValueError, match="inner_lr"):
        MetaSGD((0.1, 0.01))
    with pytest.raises(ValueError, match="lambda"):
        IMAML(lam=0.0)
    with pytest.raises(ValueError, match="CG dampings"):
        IMAML(cg_damping=-1.0)
    with pytest.raises(ValueError, match="inner_steps"):
        MAMLPlusPlus(inner_steps=0)


@pytest.mark.parametrize("name", [a for a in ALGORITHMS if a != "maml"])
def test_each_follow_up_runs_in_the_sinusoid_experiment(tmp_path, name):
    from minimaml.experiments import sinusoid as experiment
    config = experiment.Config.for_profile("smoke", algorithm=name, n_iterations=3, n_test_tasks=4,
                                           out_dir=str(tmp_path), maml_pp_inner_steps=2, imaml_inner_steps=2,
                                           allow_solver_failures=True)  # 2 inner steps: iMAML's solve says not converged
    results = experiment.run(config, progress=False)
    assert set(results["mse"]) == {f"{name}/k{k}" for k in (5, 10, 20)}
    assert (tmp_path / f"{name}.ckpt.npz").exists()
    table = experiment.results_markdown(results)
    assert f"| {name} | 5 |" in table
    says = {"reptile": "Reptile's inner optimizer (sgd, 0.01)", "meta_sgd": "Meta-SGD's learned alpha",
            "maml_pp": "MAML++'s fixed rate 0.001", "anil": "ANIL's head steps (0.1)",
            "imaml": "iMAML's proximal steps (0.02, lambda 50.0, backtracking)"}
    assert f"fine-tuning on K points with {says[name]}" in table


@pytest.mark.parametrize("name", [a for a in ALGORITHMS if a != "maml"])
def test_each_follow_up_runs_in_the_classification_experiment(tmp_path, monkeypatch, name):
    from minimaml.experiments import classification, omniglot
    rng = numpy.random.default_rng(0)
    splits = {split: rng.integers(0, 256, size=(n, 4, 28, 28, 1), dtype=numpy.uint8)
              for split, n in (("train", 12), ("val", 6), ("test", 6))}
    monkeypatch.setattr(classification, "load_splits", lambda config: splits)
    config = omniglot.config(5, 1, "mlp", "quick", out_dir=str(tmp_path), algorithm=name, n_iterations=2,
                             meta_batch_size=2, q_train=2, q_eval=2, val_every=2, n_val_tasks=2, n_test_tasks=2,
                             eval_batch=2, maml_pp_inner_steps=2, imaml_inner_steps=2, reptile_inner_steps=2)
    results = classification.run(config, progress=False)
    scored = 1 if name == "meta_sgd" else config.eval_steps  # Meta-SGD: only the step its alpha is learned for
    assert results["key"].endswith(f"-{name}") and len(results["test_accuracy"]) == scored + 1
    assert all(0.0 <= row["mean"] <= 1.0 for row in results["test_accuracy"])


def _sinusoid_problem(seed=0):
    rng = numpy.random.default_rng(seed)
    params = mlp.init(rng, scheme="uniform")
    tasks = sinusoid.sample_batch(rng, meta_batch_size=4, k_shot=10)
    return maml.supervised_loss(mlp.apply, ad.mse), params, tasks


def test_backtracking_inner_steps_never_raise_a_tasks_proximal_loss():
    """With a step size at which plain gradient descent diverges, every task's proximal loss falls or
    stays along the path; with a small one, no step is refused and the path is plain descent's."""
    loss, params, tasks = _sinusoid_problem()
    proximal = imaml.proximal_loss(loss, params, 2.0)
    with numpy.errstate(all="ignore"):
        guarded_path = list(imaml.backtracking_proximal_adapt(loss, params, tasks.support, 1.0, 12, 2.0))
        plain_path = list(imaml.proximal_adapt(loss, params, tasks.support, 1.0, 12, 2.0))
        with ad.no_grad():
            path = [proximal(phi, tasks.support).data for phi in guarded_path]
            plain = [proximal(phi, tasks.support).data for phi in plain_path]
    assert all((later <= earlier).all() for earlier, later in zip(path, path[1:]))
    assert (path[-1] < path[0]).all()
    assert not numpy.all(numpy.isfinite(plain[-1]) & (plain[-1] <= plain[0]))  # plain descent blows up here
    small = list(imaml.backtracking_proximal_adapt(loss, params, tasks.support, 1e-3, 5, 2.0))
    for got, expected in zip(small, imaml.proximal_adapt(loss, params, tasks.support, 1e-3, 5, 2.0)):
        for n in got:
            numpy.testing.assert_array_equal(got[n].data, expected[n].data)


def test_imaml_with_backtracking_keeps_a_finite_gradient_where_plain_descent_diverges():
    loss, params, tasks = _sinusoid_problem(1)
    with numpy.errstate(all="ignore"):
        _, plain, _ = imaml.implicit_meta_gradient(loss, params, tasks, 1.0, 12, 2.0, 3)
    _, guarded, metrics = imaml.implicit_meta_gradient(loss, params, tasks, 1.0, 12, 2.0, 3, backtracking=True)
    assert not all(numpy.isfinite(g).all() for g in plain.values())
    assert all(numpy.isfinite(g).all() for g in guarded.values()) and numpy.isfinite(metrics["cg_residual"])


def test_the_followups_table_reports_a_diverged_run_and_goes_on(monkeypatch):
    from minimaml.experiments import sinusoid as experiment
    from minimaml.experiments import followups as experiments
    from minimaml.train import NonFiniteError, SolverError
    ran = []

    def fake_run(config, resume=False, progress=True, overwrite=False):
        ran.append((config.algorithm, config.imaml_backtracking))
        if config.algorithm == "maml_pp":
            raise NonFiniteError("iteration 7: gradient 'layer0.w' has 40 non-finite value(s). The checkpoint ...")
        if config.algorithm == "reptile":
            raise SolverError("iteration 3: its solve did not converge: raise --x (3 iterations in a row); no "
                              "checkpoint was written before it")
        row = {"mean": 0.5, "ci95": 0.1, "n_diverged": 0}
        failed = 2 if config.algorithm == "imaml" else 0
        return {"mse": {f"{config.algorithm}/k5": [row] * 11}, "train_seconds": 1.0,
                "solver_failures": {config.algorithm: {"iterations": failed, "first": None, "last": None}}}

    monkeypatch.setattr(experiment, "run", fake_run)
    table, folders = experiments.run_profile("smoke")
    assert [name for name, _ in ran] == ["maml", *experiments.FOLLOWUPS] and len(folders) == len(ran)
    assert ("imaml", True) in ran  # backtracking for iMAML
    assert "| imaml | 0.500 ± 0.100 | 0.500 ± 0.100 | 0.500 ± 0.100 | 1 | 2 |" in table  # isolated failures counted
    assert "| maml_pp | training diverged (iteration 7: gradient 'layer0.w' has 40 non-finite value(s)) |" in table
    assert ("| reptile | its solver failed (iteration 3: its solve did not converge: raise --x (3 iterations in a row); "
            "no checkpoint was written before it) |") in table


# --- one convention -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_algorithm_follows_the_one_convention(name):
    """make(name, inner_lr, inner_steps, **options) is the class; every constructor starts with inner_lr,
    inner_steps (the rest keyword-only); meta_gradient returns (float, grads like the meta-parameters,
    metrics of floats, plus a one-line str "failure" only when the step failed)."""
    cls = algorithms.CLASSES[name]
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert [p.name for p in parameters[:2]] == ["inner_lr", "inner_steps"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters[2:])
    algorithm = algorithms.make(name, 0.01 if name != "meta_sgd" else (0.01, 0.02), 2)
    assert type(algorithm) is cls and algorithm.name == name
    loss, params, tasks = _sinusoid_problem(0)
    meta_params = algorithm.init(params, numpy.random.default_rng(1))
    result = algorithm.meta_gradient(loss, meta_params, tasks, 0)
    assert len(result) == 3
    value, grads, metrics = result
    assert isinstance(value, float) and set(grads) == set(meta_params)
    assert all(grads[n].shape == meta_params[n].shape for n in grads)
    assert all(isinstance(v, float) for k, v in metrics.items() if k != "failure")
    assert "failure" not in metrics or ("\n" not in metrics["failure"] and metrics["failure"])


def test_the_module_meta_gradients_return_the_classes_structure():
    """The core's and the modules' meta_gradient functions return (loss, grads, metrics) too."""
    loss, params, tasks = _sinusoid_problem(0)
    for mode in maml.MODES:
        value, grads, metrics = maml.meta_gradient(loss, params, tasks, 0.01, 2, mode=mode)
        assert isinstance(value, float) and set(grads) == set(params) and metrics == {}
    meta = MetaSGD(0.01, 1).init(params, numpy.random.default_rng(1))
    assert len(meta_sgd.meta_gradient(loss, meta, tasks, 1)) == 3
    value, grads, metrics = imaml.implicit_meta_gradient(loss, params, tasks, 0.01, 3, 2.0, 3)
    assert set(metrics) == {"imaml_stationarity", "cg_residual"}
    phi, stationarity = imaml.proximal_solve(loss, params, tasks.support, 0.01, 3, 2.0)  # phi* without a 2nd solve
    again = imaml.implicit_gradient(loss, phi, tasks, 2.0, 3)
    assert again[0] == value and all((again[1][n] == grads[n]).all() for n in grads)
    assert stationarity == metrics["imaml_stationarity"]


# --- numerics that say when they failed -----------------------------------------------------------------
def test_imaml_default_step_cycles_and_says_not_converged_and_the_loop_stops(tmp_path):
    """The support Hessian makes 0.1 too long a step: plain descent does not converge, the metrics say so
    (a one-line failure naming the settings), and the training loop stops as on NaN."""
    from minimaml import optim, train
    loss, params, tasks = checks.tanh_sinusoid(0)
    algorithm = IMAML()
    with numpy.errstate(all="ignore"):
        _, _, metrics = algorithm.meta_gradient(loss, params, tasks, 0)
    assert metrics["imaml_stationarity"] > 1e-3 and "did not converge" in metrics["failure"]
    assert "--imaml-inner-lr" in metrics["failure"] and "\n" not in metrics["failure"]

    def loss_and_grads(p, rng, iteration):
        with numpy.errstate(all="ignore"):
            return algorithm.meta_gradient(loss, p, tasks, iteration)
    with pytest.raises(train.SolverError, match="iMAML's inner solve did not converge"):
        train.run(params, train.GradientStep(loss_and_grads, optim.Adam(1e-3)), 10, seed=0,
                  checkpoint_path=str(tmp_path / "imaml.ckpt.npz"), progress=False, logger=lambda line: None)
    assert checks.imaml_at_defaults(0)["failure"]  # the verify row's case


def test_backtracking_inner_solve_reaches_roundoff():
    loss, params, tasks = checks.tanh_sinusoid(0)
    _, plain = imaml.proximal_solve(loss, params, tasks.support, 0.02, 300, 2.0)
    _, tight = imaml.proximal_solve(loss, params, tasks.support, 0.1, 3000, 2.0, backtracking=True)
    assert tight < 1e-12 < plain


def test_conjugate_gradient_reports_the_true_residual_not_its_estimate():
    from minimaml import linalg
    rng = numpy.random.default_rng(0)
    m = rng.standard_normal((2, 8, 8))
    a = m @ m.transpose(0, 2, 1) + 1e-3 * numpy.eye(8)  # badly conditioned: CG's estimate runs away from the truth
    b = {"x": rng.standard_normal((2, 8))}
    result = linalg.conjugate_gradient(lambda v: {"x": numpy.einsum("tij,tj->ti", a, v["x"])}, b, 60)
    true = max(numpy.linalg.norm(b["x"][i] - a[i] @ result.x["x"][i]) / numpy.linalg.norm(b["x"][i]) for i in range(2))
    assert result.residual == pytest.approx(true, rel=1e-6) and result.steps == 60


def test_maml_pp_reports_inner_steps_that_climb_and_takes_fixed_step_weights():
    """A learned rate a little below zero on one parameter is reported, not a failure (the steps still
    descend); rates that make the inner steps climb are a failure naming the lowest rate."""
    loss, params, tasks = _sinusoid_problem(0)
    algorithm = MAMLPlusPlus(0.01, 2, step_weights=(0.25, 0.75))
    assert list(algorithm.weights(0)) == [0.25, 0.75] == list(algorithm.weights(10**6))
    meta = algorithm.init(params, numpy.random.default_rng(1))
    _, _, healthy = algorithm.meta_gradient(loss, meta, tasks, 0)
    assert healthy["min_inner_lr"] == pytest.approx(0.01) and "failure" not in healthy
    assert 0 < healthy["support_descent"] < 1
    meta[maml_pp.LSLR + "layer1.b"] = meta[maml_pp.LSLR + "layer1.b"] * numpy.array([1.0, -0.1], dtype=numpy.float32)
    _, _, drifted = algorithm.meta_gradient(loss, meta, tasks, 0)
    assert drifted["min_inner_lr"] < 0 and "failure" not in drifted
    climbing = {n: -p if n.startswith(maml_pp.LSLR) else p for n, p in meta.items()}
    _, _, failed = algorithm.meta_gradient(loss, climbing, tasks, 0)
    assert failed["support_descent"] > 1 and "climbed" in failed["failure"] and "--meta-lr" in failed["failure"]
    with pytest.raises(ValueError, match="step_weights"):
        MAMLPlusPlus(0.01, 2, step_weights=(1.0,))


def test_mlp_takes_an_activation():
    params = mlp.init(numpy.random.default_rng(0), sizes=(1, 3, 1), scheme="uniform", dtype=numpy.float64)
    x = numpy.linspace(-1, 1, 5)[None, :, None]
    expected = numpy.tanh(x @ params["layer0.w"] + params["layer0.b"]) @ params["layer1.w"] + params["layer1.b"]
    numpy.testing.assert_allclose(mlp.apply(params, x, activation=ad.tanh).data, expected, rtol=1e-14)


def test_meta_sgd_is_scored_after_the_steps_it_trains_with():
    assert MetaSGD(0.01, 1).test_steps(10) == 1 and MetaSGD(0.01, 3).test_steps(2) == 2
    assert all(algorithms.make(name, 0.01, 1).test_steps(10) == 10 for name in ALGORITHMS if name != "meta_sgd")


def test_the_sinusoid_trains_imaml_on_a_smooth_mlp_unless_told_otherwise():
    from minimaml.experiments import sinusoid as experiment
    assert experiment.Config.for_profile("quick", algorithm="imaml").activation == "tanh"
    assert experiment.Config.for_profile("quick", algorithm="imaml", activation="relu").activation == "relu"
    assert experiment.Config.for_profile("quick").activation == "relu"  # the paper's MLP for the others


def test_the_failures_note_says_why_training_went_on():
    from minimaml.experiments.common import failures_note
    failed = {"imaml": {"iterations": 2, "first": "iteration 5: not converged", "last": "iteration 9: not converged"}}
    assert "never 3 iterations in a row" in failures_note(failed, allowed=False)
    assert "allowed by --allow-solver-failures" in failures_note(failed, allowed=True)
    assert failures_note({"imaml": {"iterations": 0, "first": None, "last": None}}, allowed=True) == ""


def test_an_experiment_overrides_a_follow_up_default_keeping_its_help_and_checks():
    import dataclasses
    from minimaml.experiments import sinusoid as experiment
    from minimaml.experiments.algorithm_settings import Settings
    base, here = Settings.__dataclass_fields__["imaml_lambda"], experiment.Config.__dataclass_fields__["imaml_lambda"]
    assert here.default == 50.0 and base.default == 2.0
    assert here.metadata["help"].startswith(base.metadata["help"]) and "50 here" in here.metadata["help"]
    checks = [{k: v for k, v in field.metadata.items() if k != "help"} for field in (base, here)]
    assert checks[0] == checks[1]
    with pytest.raises(ValueError, match="--imaml-lambda must be positive"):
        experiment.Config.for_profile("quick", imaml_lambda=0.0)
    assert [f.name for f in dataclasses.fields(experiment.Config)].count("imaml_lambda") == 1
