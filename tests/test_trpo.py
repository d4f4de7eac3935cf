"""MAML-TRPO: the inner REINFORCE step, the meta-gradient through it, exact Fisher-vector products
(checked three ways), conjugate gradient and the KL-constrained line search. Float64, tiny policy."""

import numpy as np
import pytest

from minimaml import autodiff as ad
from minimaml import algorithms, maml
from minimaml.algorithms import anil
from minimaml.nn import policy as pol
from minimaml.rl import maml_rl, trpo
from minimaml.rl.maml_rl import meta_iteration, meta_objective
from minimaml.rl.reinforce import (Trajectories, evaluation_step_sizes, masked_task_mean, reinforce_loss,
                                   trajectories)

T, B, H, OBS_DIM, ACT_DIM = 3, 4, 5, 2, 2
ALPHA = 0.5


def _data(rng):
    """Fixed synthetic trajectories (T, B, H, ...) with some masked (finished) steps, as ``Trajectories``."""
    mask = np.ones((T, B, H))
    mask[0, 1, 3:] = 0
    mask[2, 0, 2:] = 0
    batch = {"obs": rng.standard_normal((T, B, H, OBS_DIM)), "actions": rng.standard_normal((T, B, H, ACT_DIM)),
             "mask": mask}
    return trajectories(batch, rng.standard_normal((T, B, H)) * mask, np.float64)


def _task(data: Trajectories, t: int) -> Trajectories:
    """Task t alone (a task axis of 1)."""
    return Trajectories(data.obs[t:t + 1], data.actions[t:t + 1], data.mask[t:t + 1], data.advantages[t:t + 1])


@pytest.fixture(scope="module")
def problem():
    """theta, pre- and post-update data, and the meta-objective with pi_old = theta'(theta)."""
    rng = np.random.default_rng(0)
    params = pol.init(rng, OBS_DIM, ACT_DIM, hidden=(8, 8), dtype=np.float64)
    params = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in params.items()}
    pre, post = _data(rng), _data(rng)
    old = maml.adapt(reinforce_loss, params, pre, ALPHA, 1)
    return params, pre, post, {k: v.data for k, v in old.items()}, meta_objective(pre, post, old, ALPHA)


def _kl_grad(objective, names, values):
    leaves = [ad.Tensor(v, requires_grad=True) for v in values]
    _, kl = objective(dict(zip(names, leaves)), create_graph=True)
    return trpo.flatten(ad.grad(kl, leaves))


def _fvp_at(objective, params):
    names = list(params)
    leaves = [ad.Tensor(params[k], requires_grad=True) for k in names]
    _, kl = objective(dict(zip(names, leaves)), create_graph=True)
    return trpo.fisher_vector_product(kl, leaves, damping=0.0)


def test_trajectories_record():
    rng = np.random.default_rng(5)
    batch = {"obs": rng.standard_normal((2, 3, 4, OBS_DIM)), "actions": rng.standard_normal((2, 3, 4, ACT_DIM)),
             "mask": np.ones((2, 3, 4)), "episode_returns": np.zeros((2, 3))}
    adv = rng.standard_normal((2, 3, 4))
    data = trajectories(batch, adv, np.float32)
    assert data.n_tasks == 2
    for name, expected in (("obs", batch["obs"]), ("actions", batch["actions"]), ("mask", batch["mask"]),
                           ("advantages", adv)):
        value = getattr(data, name)
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, expected.astype(np.float32))


def test_adapt_is_one_reinforce_step_per_task(problem):
    """``maml.adapt(reinforce_loss, ...)`` (all tasks in one batched call) = a loop over the tasks, each
    theta - alpha grad L_i(theta) on its own trajectories only; with and without a recorded graph."""
    params, pre, _, old, _ = problem
    names = list(params)
    recorded = maml.adapt(reinforce_loss, {k: ad.Tensor(v, requires_grad=True) for k, v in params.items()},
                          pre, ALPHA, 1, create_graph=True)
    assert all(recorded[k].requires_grad for k in names)  # still a function of theta
    stepped = maml.inner_step(reinforce_loss, maml.per_task(params, T), pre, ALPHA)
    for t in range(T):
        leaves = [ad.Tensor(params[k], requires_grad=True) for k in names]
        loss = reinforce_loss(dict(zip(names, leaves)), _task(pre, t))  # shared params, one task: (1,)
        assert loss.shape == (1,)
        for k, g in zip(names, ad.grad(ad.sum(loss), leaves)):
            expected = params[k] - ALPHA * g.data
            assert np.abs(g.data).max() > 1e-6  # every parameter really moves
            np.testing.assert_allclose(old[k][t], expected, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(recorded[k].data[t], expected, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(stepped[k].data[t], expected, rtol=1e-12, atol=1e-14)
    assert all(old[k].shape == (T,) + params[k].shape for k in names)


def test_reinforce_loss_matches_closed_form(problem):
    """L_i = -sum m log pi(a|s) A / sum m per task, with the Gaussian log-density written out in NumPy."""
    params, pre, _, _, _ = problem
    x = pre.obs
    for i in range(3):
        x = x @ params[f"layer{i}.w"] + params[f"layer{i}.b"]
        x = np.maximum(x, 0) if i < 2 else x
    std = np.exp(params["log_std"])
    log_prob = np.sum(-0.5 * ((pre.actions - x) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi), axis=-1)
    expected = -(pre.mask * log_prob * pre.advantages).sum(axis=(1, 2)) / pre.mask.sum(axis=(1, 2))
    np.testing.assert_allclose(reinforce_loss(params, pre).data, expected, rtol=1e-12)


def test_inner_loss_is_masked_mean():
    x = ad.Tensor(np.arange(2 * 2 * 3, dtype=np.float64).reshape(2, 2, 3))
    mask = np.ones((2, 2, 3))
    mask[1, :, 1:] = 0
    np.testing.assert_allclose(masked_task_mean(x, mask).data, [np.arange(6).mean(), (6 + 9) / 2])


def test_meta_gradient_matches_finite_differences(problem):
    """The surrogate's gradient through the inner step (second order) against finite differences, and
    its Hessian (third order) too."""
    params, _, _, _, objective = problem
    names = list(params)
    ad.check_grads(lambda *v: objective(dict(zip(names, v)), True)[0], [params[k] for k in names], order=2)


def test_at_theta_old_ratio_is_one_and_kl_is_flat(problem):
    params, _, post, _, objective = problem
    names = list(params)
    leaves = [ad.Tensor(params[k], requires_grad=True) for k in names]
    loss, kl = objective(dict(zip(names, leaves)), create_graph=True)
    expected = -masked_task_mean(ad.Tensor(post.advantages), post.mask).data.mean()
    assert loss.item() == pytest.approx(expected, rel=1e-12) and abs(kl.item()) < 1e-14
    assert np.abs(trpo.flatten(ad.grad(kl, leaves))).max() < 1e-12


def test_fisher_vector_product_matches_finite_differences(problem):
    """(a) F v (reverse over reverse through the inner step) = d/dh grad D(theta + h v), central FD."""
    params, _, _, _, objective = problem
    names = list(params)
    v = np.random.default_rng(1).standard_normal(trpo.flatten(params.values()).size)
    h = 1e-5
    theta = trpo.flatten(params.values())
    plus = _kl_grad(objective, names, trpo.unflatten(theta + h * v, params.values()))
    minus = _kl_grad(objective, names, trpo.unflatten(theta - h * v, params.values()))
    np.testing.assert_allclose(_fvp_at(objective, params)(v), (plus - minus) / (2 * h), rtol=1e-6, atol=1e-10)


def test_fisher_vector_product_equals_jt_fprime_j(problem):
    """(b) F v = J^T F' J v with J = I - alpha H_inner, from exact Hessian-vector products (ad.hvp):
    per task, u_i = v - alpha H_i v; w_i = F'_i u_i at theta'_i; F v = sum_i (w_i - alpha H_i w_i)."""
    params, pre, post, old, objective = problem
    names = list(params)
    rng = np.random.default_rng(2)
    v = {k: rng.standard_normal(params[k].shape) for k in names}
    per_task = [np.broadcast_to(params[k], (T,) + params[k].shape).copy() for k in names]

    def inner(*values):
        return ad.sum(reinforce_loss(dict(zip(names, values)), pre))

    def inner_jacobian(vectors):  # (J_i x_i)_i = x_i - alpha H_i x_i, H block-diagonal over tasks
        return [x - ALPHA * hx for x, hx in zip(vectors, ad.hvp(inner, per_task, vectors))]

    with ad.no_grad():
        old_mean, old_log_std = pol.apply(old, post.obs)

    def kl_adapted(*values):  # D as a function of the adapted (batched) parameters theta'
        mean, log_std = pol.apply(dict(zip(names, values)), post.obs)
        return ad.mean(masked_task_mean(pol.gaussian_kl(old_mean, old_log_std, mean, log_std), post.mask))

    u = inner_jacobian([np.broadcast_to(v[k], (T,) + v[k].shape) for k in names])
    w = ad.hvp(kl_adapted, [old[k] for k in names], u)
    explicit = [x.sum(axis=0) for x in inner_jacobian(w)]
    fvp = _fvp_at(objective, params)(trpo.flatten(v[k] for k in names))
    np.testing.assert_allclose(fvp, trpo.flatten(explicit), rtol=1e-9, atol=1e-12)


def test_kl_hessian_check_grads_to_second_order(problem):
    """(c) ``check_grads`` on D up to order 2: the tape's reverse-over-reverse pass through the inner
    step (third derivatives of the policy) against finite differences along random directions."""
    params, _, _, _, objective = problem
    names = list(params)
    ad.check_grads(lambda *v: objective(dict(zip(names, v)), True)[1], [params[k] for k in names], order=2)


def test_conjugate_gradient_solves_spd_system():
    rng = np.random.default_rng(3)
    m = rng.standard_normal((6, 6))
    a = m @ m.T + 6 * np.eye(6)
    b = rng.standard_normal(6)
    x, ax, residual = trpo.conjugate_gradient(lambda v: a @ v, b, iters=6)
    np.testing.assert_allclose(x, np.linalg.solve(a, b), rtol=1e-8)
    np.testing.assert_allclose(ax, b, rtol=1e-8)
    assert residual == np.linalg.norm(b - a @ x) / np.linalg.norm(b) and residual < 1e-8


def test_conjugate_gradient_returns_the_product_of_its_truncated_solution():
    """After fewer iterations than the dimension, x is not A^-1 b, yet the returned A x is A times x."""
    rng = np.random.default_rng(4)
    m = rng.standard_normal((20, 20))
    a = m @ m.T + np.eye(20)
    b = rng.standard_normal(20)
    x, ax, residual = trpo.conjugate_gradient(lambda v: a @ v, b, iters=5)
    assert np.linalg.norm(a @ x - b) > 1e-3 * np.linalg.norm(b)
    assert residual == np.linalg.norm(b - a @ x) / np.linalg.norm(b)  # the true residual, not CG's estimate
    np.testing.assert_allclose(ax, a @ x, rtol=1e-9, atol=1e-9 * np.linalg.norm(b))


def _toy_objective(center, quartic):
    """loss = <c, theta>, KL = 1/2 |theta - theta0|^2 + quartic |theta - theta0|^4 (theta0 = center)."""
    c = np.array([1.0, -2.0, 0.5])

    def objective(params, create_graph):
        d = ad.subtract(params["theta"], center)
        sq = ad.sum(ad.multiply(d, d))
        kl = ad.add(ad.multiply(sq, 0.5), ad.multiply(ad.multiply(sq, sq), quartic))
        return ad.sum(ad.multiply(params["theta"], c)), kl

    return objective


def test_trpo_step_on_quadratic_kl_takes_the_full_step():
    center = np.array([0.3, 0.1, -0.2])
    new, stats = trpo.trpo_step(_toy_objective(center, 0.0), {"theta": center.copy()}, max_kl=0.01)
    assert stats["accepted"] and stats["backtracks"] == 0
    np.testing.assert_allclose(stats["kl"], 0.01, rtol=1e-4)  # sqrt(2 delta / x^T F x) reaches delta exactly
    direction = -np.array([1.0, -2.0, 0.5]) / np.linalg.norm([1.0, -2.0, 0.5])
    np.testing.assert_allclose(new["theta"] - center, np.sqrt(0.02) * direction, rtol=1e-4)


def test_line_search_backtracks_until_kl_constraint_holds():
    center = np.zeros(3)
    new, stats = trpo.trpo_step(_toy_objective(center, 50.0), {"theta": center.copy()}, max_kl=0.01)
    assert stats["accepted"] and stats["backtracks"] > 0
    assert stats["kl"] <= 0.01 and stats["loss_after"] < stats["loss_before"]
    d = new["theta"] - center
    assert 0.5 * d @ d + 50.0 * (d @ d) ** 2 <= 0.01


def test_line_search_rejects_when_nothing_qualifies():
    theta = np.array([1.0, 2.0])
    evaluated = []

    def evaluate(flat):
        evaluated.append(flat)
        return 0.0, 1.0  # never improves, always too far

    out, info = trpo.line_search(evaluate, theta, np.ones(2), loss_before=0.0, max_kl=0.01)
    assert not info["accepted"] and np.array_equal(out, theta) and len(evaluated) == 15
    np.testing.assert_allclose(evaluated[1], theta - 0.8)


def test_trpo_step_on_meta_objective_improves_within_trust_region(problem):
    params, _, _, _, objective = problem
    new, stats = trpo.trpo_step(objective, params, max_kl=0.01)
    assert stats["accepted"] and stats["loss_after"] < stats["loss_before"] and 0 < stats["kl"] <= 0.01
    names = list(params)
    loss, kl = objective({k: ad.Tensor(new[k], requires_grad=True) for k in names}, create_graph=False)
    assert kl.item() == pytest.approx(stats["kl"]) and new["layer0.w"].dtype == np.float64


def test_flatten_roundtrip():
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, dtype=np.float32)]
    flat = trpo.flatten(arrays)
    assert flat.dtype == np.float64 and flat.shape == (10,)
    back = trpo.unflatten(flat, arrays)
    assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(arrays, back))


def test_evaluation_step_sizes_halve_after_first():
    assert evaluation_step_sizes(0.5, 3) == [0.5, 0.25, 0.25]


class _Corridor:
    """A tiny 1-task-parameter env for a smoke test of the whole meta-iteration: move towards goal g."""

    obs_dim, act_dim, task_shape, horizon = 2, 2, (2,), 4

    def sample_tasks(self, rng, n):
        return rng.uniform(-1, 1, size=(n, 2))

    def reset(self, goals, rng):
        self.goals, self.pos = goals, np.zeros_like(goals)
        return self.pos.copy()

    def step(self, actions):
        self.pos = self.pos + np.clip(actions, -0.1, 0.1)
        return self.pos.copy(), -np.linalg.norm(self.pos - self.goals, axis=1), np.zeros(len(actions), bool)


def test_meta_iteration_runs_and_reports_stats():
    rng = np.random.default_rng(0)
    params = pol.init(rng, 2, 2, hidden=(8, 8))
    settings = trpo.TRPO(max_kl=0.01)
    new, stats = meta_iteration(_Corridor(), params, rng, settings, meta_batch_size=3, n_traj=4,
                                algorithm=algorithms.make("maml", 0.5, 1))
    assert set(new) == set(params) and all(new[k].dtype == np.float32 for k in new)
    assert set(stats) == {"pre_return", "post_return", "loss_before", "loss_after", "accepted", "backtracks",
                          "kl", "grad_norm", "cg_residual"}  # no timing: the library's bodies hold none
    for key in ("pre_return", "post_return", "loss_before", "loss_after", "kl", "grad_norm"):
        assert np.isfinite(stats[key])
    assert stats["kl"] <= settings.max_kl
    if stats["accepted"]:
        assert any(not np.array_equal(new[k], params[k]) for k in params)


def test_trpo_settings_step_is_trpo_step_with_them(problem):
    """``TRPO(...).step`` passes every setting on: the same result as ``trpo_step`` with them, and a
    different one than the defaults (so a dropped setting would show)."""
    params, _, _, _, objective = problem
    settings = trpo.TRPO(max_kl=0.003, cg_iters=3, damping=1e-3, backtrack_ratio=0.5, max_backtracks=7)
    new, stats = settings.step(objective, params)
    expected, expected_stats = trpo.trpo_step(objective, params, max_kl=0.003, cg_iters=3, damping=1e-3,
                                              backtrack_ratio=0.5, max_backtracks=7)
    assert stats == expected_stats and "time_cg" not in stats
    assert all(np.array_equal(new[k], expected[k]) for k in params)
    default, _ = trpo.TRPO().step(objective, params)
    assert any(not np.allclose(new[k], default[k]) for k in params)


def test_meta_fisher_product_equals_the_third_order_one(problem):
    """(d) The fast path, F = sum_i J_i^T F'_i J_i from second-order products (``meta_fisher_product``),
    equals the tape's reverse over reverse through the inner step, for several directions."""
    params, pre, post, old, objective = problem
    names = list(params)
    product = maml_rl.meta_fisher_product(pre, post, old, ALPHA)(params)
    reference = _fvp_at(objective, params)
    rng = np.random.default_rng(3)
    for _ in range(3):
        v = {k: rng.standard_normal(params[k].shape) for k in names}
        fast = product(v)
        assert all(fast[k].shape == params[k].shape and fast[k].dtype == np.float64 for k in names)
        np.testing.assert_allclose(trpo.flatten(fast[k] for k in names), reference(trpo.flatten(v[k] for k in names)),
                                   rtol=1e-9, atol=1e-12)


def test_anil_meta_fisher_product_equals_the_third_order_one(problem):
    """With only the head adapted (ANIL), J_i = I - P alpha H_i is not symmetric: the product uses J and J^T
    and still equals the tape's reverse over reverse through the head-only inner step."""
    params, pre, post, _, _ = problem
    names, head = list(params), anil.head_names(params)
    old = maml.adapt(reinforce_loss, params, pre, ALPHA, 1, head)
    objective = meta_objective(pre, post, old, ALPHA, inner_param_names=head)
    product = maml_rl.meta_fisher_product(pre, post, old, ALPHA, inner_param_names=head)(params)
    reference = _fvp_at(objective, params)
    v = {k: np.random.default_rng(4).standard_normal(params[k].shape) for k in names}
    np.testing.assert_allclose(trpo.flatten(product(v)[k] for k in names), reference(trpo.flatten(v[k] for k in names)),
                               rtol=1e-9, atol=1e-12)


def test_meta_iteration_takes_maml_or_anil_from_the_one_door():
    rng = np.random.default_rng(0)
    params = pol.init(rng, 2, 2, hidden=(8, 8))
    new, stats = meta_iteration(_Corridor(), params, rng, trpo.TRPO(), 3, 4, algorithms.make("anil", 0.5, 1))
    assert np.isfinite(stats["cg_residual"]) and set(new) == set(params)
    with pytest.raises(ValueError, match="maml or anil"):
        meta_iteration(_Corridor(), params, rng, trpo.TRPO(), 3, 4, algorithms.make("reptile", 0.5, 1))


def test_trpo_step_with_the_meta_fisher_product_takes_the_same_step(problem):
    """A whole TRPO step with the fast Fisher products lands where the third-order one does: the products
    agree to ~1e-12; CG's 10 iterations on a nearly singular F amplify that to ~1e-7 relative here."""
    params, pre, post, old, objective = problem
    slow, slow_stats = trpo.trpo_step(objective, params, max_kl=0.01)
    fast, fast_stats = trpo.trpo_step(objective, params, max_kl=0.01,
                                      fisher_product=maml_rl.meta_fisher_product(pre, post, old, ALPHA))
    assert fast_stats["backtracks"] == slow_stats["backtracks"] and fast_stats["accepted"]
    for k in params:
        np.testing.assert_allclose(fast[k], slow[k], rtol=1e-6, atol=1e-8)


# --- the meta-batch split into shares of tasks (minimaml.distributed) --------------------------------
def _share(data: Trajectories, part: slice) -> Trajectories:
    return Trajectories(data.obs[part], data.actions[part], data.mask[part], data.advantages[part])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_task_mean_is_ad_mean_bit_for_bit(dtype):
    """What one process computes: (1/T) sum_i over all T tasks, value and gradient, exactly ``ad.mean``."""
    values = np.random.default_rng(0).standard_normal(7).astype(dtype)
    x, y = ad.Tensor(values, requires_grad=True), ad.Tensor(values, requires_grad=True)
    ours, reference = maml_rl.task_mean(x, 7), ad.mean(y)
    assert ours.dtype == reference.dtype == dtype and ours.item() == reference.item()
    np.testing.assert_array_equal(ad.grad(ours, [x])[0].data, ad.grad(reference, [y])[0].data)


def test_the_shares_objectives_and_fisher_products_add_up_to_the_whole(problem):
    """The 3 tasks split as over 2 ranks (tasks 0..1 and 2): L, D, g and F v of the shares, each with the
    global T, add up to the whole meta-batch's to round-off."""
    params, pre, post, old, objective = problem
    names = list(params)
    v = {k: np.random.default_rng(6).standard_normal(params[k].shape) for k in names}

    def parts(pre_share, post_share, old_share, n_tasks):
        leaves = [ad.Tensor(params[k], requires_grad=True) for k in names]
        loss, kl = maml_rl.meta_objective(pre_share, post_share, old_share, ALPHA, n_tasks)(
            dict(zip(names, leaves)), create_graph=True)
        fisher_v = maml_rl.meta_fisher_product(pre_share, post_share, old_share, ALPHA, n_tasks)(params)(v)
        return np.concatenate([[loss.item(), kl.item()], trpo.flatten(ad.grad(loss, leaves)),
                               trpo.flatten(fisher_v[k] for k in names)])

    whole = parts(pre, post, old, None)
    shares = [parts(_share(pre, part), _share(post, part), {k: old[k][part] for k in names}, T)
              for part in (slice(0, 2), slice(2, 3))]
    np.testing.assert_allclose(shares[0] + shares[1], whole, rtol=1e-13, atol=1e-15)


def test_trpo_step_over_ranks_is_the_same_step_in_one_process(problem):
    """In one process the all-reduces of ``over_ranks`` are the identity: the same step, bit for bit,
    with either Fisher product; and the damped product is the Hessian product plus damping v."""
    params, pre, post, old, objective = problem
    for fisher in (None, maml_rl.meta_fisher_product(pre, post, old, ALPHA)):
        plain, plain_stats = trpo.trpo_step(objective, params, fisher_product=fisher)
        split, split_stats = trpo.trpo_step(objective, params, fisher_product=fisher, over_ranks=True)
        assert split_stats == plain_stats
        assert all(np.array_equal(split[k], plain[k]) for k in params)
    names = list(params)
    leaves = [ad.Tensor(params[k], requires_grad=True) for k in names]
    _, kl = objective(dict(zip(names, leaves)), create_graph=True)
    v = np.random.default_rng(7).standard_normal(trpo.flatten(params.values()).size)
    np.testing.assert_array_equal(trpo.fisher_vector_product(kl, leaves, damping=0.1)(v),
                                  trpo.kl_hessian_product(kl, leaves)(v) + 0.1 * v)
