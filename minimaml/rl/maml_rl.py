"""One MAML-RL meta-iteration (Finn et al. 2017, Algorithm 3) with a TRPO meta-optimizer.

For a meta-batch of T tasks:

    1. sample B pre-update trajectories per task with pi_theta               D_i
    2. inner REINFORCE step per task: theta'_i = theta - alpha grad L_i(theta; D_i)   (``maml.adapt``)
    3. sample B post-update trajectories per task with pi_theta'_i           D'_i
    4. TRPO on the meta-parameters theta, through the inner step:

        L(theta) = -(1/T) sum_i mean_{D'_i} [ pi_{theta'_i(theta)}(a|s) / pi_{theta'_i(theta_old)}(a|s) A'_i ]
        D(theta) =  (1/T) sum_i mean_{D'_i} KL( pi_{theta'_i(theta_old)}(.|s) || pi_{theta'_i(theta)}(.|s) )

TRPO's Fisher-vector products are exact and second order (``meta_fisher_product``): D has zero gradient
at theta_old, so its Hessian there is F = sum_i J_i^T F'_i J_i, with J_i = I - alpha H_i the inner step's
Jacobian and F'_i the KL's Hessian at the adapted policy; no third derivative of the policy is needed.

Advantages (both sets): GAE(lambda = 1) against a linear baseline fitted per task, centred per task.
The inner step is ``maml``'s, with the REINFORCE task loss; nothing here adapts parameters itself.
"""

from __future__ import annotations

import numpy as np

from minimaml import autodiff as ad
from minimaml import backend, maml
from minimaml.nn import policy as pol
from minimaml.rl.reinforce import evaluation_step_sizes, masked_task_mean, reinforce_loss, trajectories
from minimaml.rl.sampler import advantages, average_returns, sample_steps, sample_trajectories
from minimaml.rl.trpo import TRPO


def sample(env, params, tasks, rng, n_traj: int = 0, min_steps: int = 0, discount: float = 0.99,
           gae_lambda: float = 1.0):
    """Trajectories of ``params`` (shared, or one policy per task) on ``tasks``: ``n_traj`` per task, or
    whole ones adding up to ``min_steps`` time steps if given. Returns (raw host batch, ``Trajectories``
    with their advantages)."""
    policy = pol.sampler_policy(params)
    batch = (sample_steps(env, policy, tasks, min_steps, rng) if min_steps else
             sample_trajectories(env, policy, tasks, n_traj, rng))
    return batch, trajectories(batch, advantages(batch, discount, gae_lambda), params["log_std"].dtype)


def surrogate_objective(data, old_params: dict, acting_policy=None):
    """TRPO's objective ``(params, create_graph) -> (L, D)`` on ``Trajectories`` ``data`` sampled by
    ``old_params``, for the policy ``acting_policy(params, create_graph)`` (default: ``params`` itself):

        L(theta) = -mean_i E[pi_theta(a|s) / pi_old(a|s) A_i],   D(theta) = mean_i E[KL(pi_old || pi_theta)]
    """
    with ad.no_grad():
        old_mean, old_log_std = pol.apply(old_params, data.obs)
        old_log_prob = pol.gaussian_log_prob(old_mean, old_log_std, ad.as_tensor(data.actions))

    def objective(params, create_graph):
        acting = params if acting_policy is None else acting_policy(params, create_graph)
        mean, log_std = pol.apply(acting, data.obs)
        log_prob = pol.gaussian_log_prob(mean, log_std, ad.as_tensor(data.actions))
        ratio = ad.exp(log_prob - old_log_prob)
        surrogate = -ad.mean(masked_task_mean(ratio * data.advantages, data.mask))
        kl = pol.gaussian_kl(old_mean, old_log_std, mean, log_std)
        return surrogate, ad.mean(masked_task_mean(kl, data.mask))

    return objective


def meta_objective(pre, post, old_params: dict, inner_lr: float):
    """The MAML-TRPO objective: the surrogate of the post-update trajectories ``post`` for the adapted
    policies theta'_i(theta) = theta - alpha grad L_i(theta) (``maml.adapt`` on ``pre``, differentiated
    through), pi_old = the post-update policies ``old_params`` that sampled ``post``."""
    def adapted_policy(params, create_graph):
        return maml.adapt(reinforce_loss, params, pre, inner_lr, 1, create_graph=create_graph)
    return surrogate_objective(post, old_params, adapted_policy)


def meta_fisher_product(pre, post, old_params: dict, inner_lr):
    """MAML-TRPO's Fisher-vector product, exact, from second-order products only, for ``trpo_step``.

    D(theta) = mean_i E_{D'_i}[KL(pi_{theta'_i(theta_old)} || pi_{theta'_i(theta)})] has zero gradient at
    theta_old (each KL is at its minimum), so the curvature of the inner step drops out of its Hessian:

        F v = sum_i J_i^T F'_i J_i v,    J_i = d theta'_i / d theta = I - alpha H_i,

    H_i the Hessian of the inner loss L_i (``reinforce_loss`` on ``pre``) at theta (J_i is symmetric),
    F'_i the Hessian of D with respect to theta'_i at ``old_params`` = theta'_i(theta_old) (the Gaussian
    policy's Fisher, with D's 1/T). Per product: two Hessian-vector products of the inner loss and one of
    the KL, each a reverse pass through a gradient recorded once per TRPO step; the tape's default
    (reverse over reverse through the whole inner step) needs third derivatives and was measured ~1.2x
    slower per product, with ~20% more memory (``benchmarks/bench_rl.py``, docs/rl.md).
    ``inner_lr``: alpha, a number or a dict per parameter.

    Returns ``fisher_product(params) -> (v -> F v)``: at theta_old = ``params``, on dicts of arrays.
    """
    names = list(old_params)
    old = {n: p.data if isinstance(p, ad.Tensor) else p for n, p in old_params.items()}
    with ad.no_grad():
        old_mean, old_log_std = pol.apply(old, post.obs)

    def mean_kl(*adapted):
        mean, log_std = pol.apply(dict(zip(names, adapted)), post.obs)
        return ad.mean(masked_task_mean(pol.gaussian_kl(old_mean, old_log_std, mean, log_std), post.mask))

    def inner_loss(*per_task_params):
        return ad.sum(reinforce_loss(dict(zip(names, per_task_params)), pre))

    kl_hessian = ad.hessian_product(mean_kl, [old[n] for n in names])
    alpha = [inner_lr[n] if isinstance(inner_lr, dict) else inner_lr for n in names]

    def fisher_product(params):
        xp = backend.array_namespace(params[names[0]])
        per_task = [xp.broadcast_to(params[n], (pre.n_tasks,) + params[n].shape) for n in names]
        inner_hessian = ad.hessian_product(inner_loss, per_task)

        def jacobian(vectors):  # (J_i x_i)_i = x_i - alpha H_i x_i, H block-diagonal over the tasks
            return [x - a * hx for x, a, hx in zip(vectors, alpha, inner_hessian(vectors))]

        def product(v):
            u = jacobian([xp.broadcast_to(v[n], (pre.n_tasks,) + v[n].shape) for n in names])
            return {n: x.sum(axis=0) for n, x in zip(names, jacobian(kl_hessian(u)))}

        return product

    return fisher_product


def meta_iteration(env, params: dict, rng: np.random.Generator, trpo: TRPO, meta_batch_size: int, n_traj: int,
                   inner_lr: float, discount: float = 0.99, gae_lambda: float = 1.0, third_order_fisher: bool = False):
    """One MAML-TRPO update. params: policy dict of arrays. Returns (new params, stats) with the average
    undiscounted pre- and post-update returns and TRPO's statistics (``trpo_step``).
    ``third_order_fisher=True``: the tape's reverse-over-reverse Fisher products through the inner step
    (the reference the tests check ``meta_fisher_product`` against; the same F, several times slower)."""
    tasks = env.sample_tasks(rng, meta_batch_size)
    pre_batch, pre = sample(env, params, tasks, rng, n_traj, discount=discount, gae_lambda=gae_lambda)
    adapted = maml.adapt(reinforce_loss, params, pre, inner_lr, 1)
    post_batch, post = sample(env, adapted, tasks, rng, n_traj, discount=discount, gae_lambda=gae_lambda)
    fisher_product = None if third_order_fisher else meta_fisher_product(pre, post, adapted, inner_lr)
    new_params, trpo_stats = trpo.step(meta_objective(pre, post, adapted, inner_lr), params, fisher_product)
    stats = {"pre_return": float(average_returns(pre_batch).mean()),
             "post_return": float(average_returns(post_batch).mean()), **trpo_stats}
    return new_params, stats


def adaptation_batches(env, params: dict, tasks, inner_lr: float, n_steps: int, rng: np.random.Generator,
                       test_batch_steps: int = 4000, n_traj: int = 20) -> list:
    """The trajectories of each task's policy after 0, 1, ..., n_steps inner steps (step size alpha, then
    alpha / 2), each step on fresh trajectories of the current adapted policies: ``test_batch_steps``
    time steps per task, as the authors' test scripts (0: ``n_traj`` trajectories). Returns n_steps + 1
    raw batches of ``sample_steps`` (``episode_returns (T, B)``, ``kept (T, B)``, ``obs (T, B, H, obs_dim)``, ...)."""
    batches, theta = [], params  # shared until the first step gives every task its own policy
    for step, lr in enumerate(evaluation_step_sizes(inner_lr, n_steps) + [None]):
        batch, data = sample(env, theta, tasks, rng, n_traj, test_batch_steps)
        batches.append(batch)
        if lr is not None:
            start = maml.per_task(params, len(tasks)) if step == 0 else theta
            theta = maml.inner_step(reinforce_loss, start, data, lr)
    return batches
