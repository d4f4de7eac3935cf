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

Under MPI (``minimaml.distributed``) every rank draws the same T tasks, then samples, adapts and
differentiates its contiguous share of them (``sampler.rank_share``). L, D and F are sums over the
tasks, (1/T) sum_i = sum_r (1/T) sum_{i in share_r}: each rank computes its share's part with the global
T (``task_mean``) and TRPO adds the parts (``trpo_step(..., over_ranks=True)``), so every rank takes the
same step; in one process the arithmetic is exactly the mean over the T tasks.
"""

from __future__ import annotations

import numpy as np

from minimaml import autodiff as ad
from minimaml import backend, distributed, maml
from minimaml.nn import policy as pol
from minimaml.rl.reinforce import evaluation_step_sizes, masked_task_mean, reinforce_loss, trajectories
from minimaml.rl.sampler import advantages, average_returns, rank_share, sample_steps, sample_trajectories
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


def task_mean(per_task, n_tasks: int):
    """(1/T) sum_i x_i over the T = ``n_tasks`` tasks of a meta-batch, of which ``per_task`` (Tensor
    (T_r,)) holds this rank's share: summed over the ranks, the mean. It is ``ad.mean``'s own arithmetic
    (the sum, then x 1/T), so in one process it is the mean over the tasks, bit for bit."""
    return ad.multiply(ad.sum(per_task), 1.0 / n_tasks)


def surrogate_objective(data, old_params: dict, acting_policy=None, n_tasks: int | None = None):
    """TRPO's objective ``(params, create_graph) -> (L, D)`` on ``Trajectories`` ``data`` sampled by
    ``old_params``, for the policy ``acting_policy(params, create_graph)`` (default: ``params`` itself):

        L(theta) = -(1/T) sum_i E[pi_theta(a|s) / pi_old(a|s) A_i],   D(theta) = (1/T) sum_i E[KL(pi_old || pi_theta)]

    T = ``n_tasks``, the meta-batch's tasks, of which ``data`` holds this rank's share (``task_mean``);
    default: all of them, ``data.n_tasks``.
    """
    n_tasks = data.n_tasks if n_tasks is None else n_tasks
    with ad.no_grad():
        old_mean, old_log_std = pol.apply(old_params, data.obs)
        old_log_prob = pol.gaussian_log_prob(old_mean, old_log_std, ad.as_tensor(data.actions))

    def objective(params, create_graph):
        acting = params if acting_policy is None else acting_policy(params, create_graph)
        mean, log_std = pol.apply(acting, data.obs)
        log_prob = pol.gaussian_log_prob(mean, log_std, ad.as_tensor(data.actions))
        ratio = ad.exp(log_prob - old_log_prob)
        surrogate = -task_mean(masked_task_mean(ratio * data.advantages, data.mask), n_tasks)
        kl = pol.gaussian_kl(old_mean, old_log_std, mean, log_std)
        return surrogate, task_mean(masked_task_mean(kl, data.mask), n_tasks)

    return objective


def meta_objective(pre, post, old_params: dict, inner_lr: float, n_tasks: int | None = None, inner_param_names=None):
    """The MAML-TRPO objective: the surrogate of the post-update trajectories ``post`` for the adapted
    policies theta'_i(theta) = theta - alpha grad L_i(theta) (``maml.adapt`` on ``pre``, differentiated
    through), pi_old = the post-update policies ``old_params`` that sampled ``post``. ``n_tasks``: the
    meta-batch's T (``surrogate_objective``); ``inner_param_names``: the adapted parameters (default: all;
    ANIL: the head)."""
    def adapted_policy(params, create_graph):
        return maml.adapt(reinforce_loss, params, pre, inner_lr, 1, inner_param_names, create_graph=create_graph)
    return surrogate_objective(post, old_params, adapted_policy, n_tasks)


def meta_fisher_product(pre, post, old_params: dict, inner_lr, n_tasks: int | None = None, inner_param_names=None):
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
    ``inner_lr``: alpha, a number or a dict per parameter. ``n_tasks``: the meta-batch's T, of which
    ``pre`` and ``post`` hold this rank's share (default: all of it); the sum over i is then the share's
    part of F v (``trpo_step(..., over_ranks=True)`` adds the parts). ``inner_param_names``: the adapted
    parameters (default: all); with only some adapted (ANIL), J_i = I - P alpha H_i with P keeping the
    adapted ones, no longer symmetric: J_i^T = I - H_i P alpha.

    Returns ``fisher_product(params) -> (v -> F v)``: at theta_old = ``params``, on dicts of arrays.
    """
    names = list(old_params)
    adapted = set(names if inner_param_names is None else inner_param_names)
    n_tasks = post.n_tasks if n_tasks is None else n_tasks
    old = {n: p.data if isinstance(p, ad.Tensor) else p for n, p in old_params.items()}
    # every parameter with a task axis, so that the KL's Hessian is per task (block diagonal)
    old = {n: p if n in adapted else backend.array_namespace(p).broadcast_to(p, (post.n_tasks,) + p.shape)
           for n, p in old.items()}
    with ad.no_grad():
        old_mean, old_log_std = pol.apply(old, post.obs)

    def mean_kl(*adapted):
        mean, log_std = pol.apply(dict(zip(names, adapted)), post.obs)
        return task_mean(masked_task_mean(pol.gaussian_kl(old_mean, old_log_std, mean, log_std), post.mask), n_tasks)

    def inner_loss(*per_task_params):
        return ad.sum(reinforce_loss(dict(zip(names, per_task_params)), pre))

    kl_hessian = ad.hessian_product(mean_kl, [old[n] for n in names])
    alpha = [(inner_lr[n] if isinstance(inner_lr, dict) else inner_lr) if n in adapted else 0.0 for n in names]

    def fisher_product(params):
        xp = backend.array_namespace(params[names[0]])
        per_task = [xp.broadcast_to(params[n], (pre.n_tasks,) + params[n].shape) for n in names]
        inner_hessian = ad.hessian_product(inner_loss, per_task)

        # J is written out from H rather than differentiated through maml.inner_step (which would give the same
        # matrix, J^T u = grad_theta <theta'(theta), u>): that would record the inner step once more per TRPO
        # step and round differently (u + H(-alpha u) for u - alpha H u), moving every RL number in docs/; the
        # tests check this J against the tape through maml.adapt (meta_iteration's third_order_fisher).
        def jacobian(vectors):  # (J_i x_i)_i = x_i - alpha H_i x_i, H block-diagonal over the tasks
            return [x - a * hx for x, a, hx in zip(vectors, alpha, inner_hessian(vectors))]

        def jacobian_transpose(vectors):  # J_i^T x_i = x_i - H_i (alpha x_i): J itself when all are adapted
            if len(adapted) == len(names):
                return jacobian(vectors)
            return [x - hx for x, hx in zip(vectors, inner_hessian([a * x for x, a in zip(vectors, alpha)]))]

        def product(v):
            u = jacobian([xp.broadcast_to(v[n], (pre.n_tasks,) + v[n].shape) for n in names])
            return {n: x.sum(axis=0) for n, x in zip(names, jacobian_transpose(kl_hessian(u)))}

        return product

    return fisher_product


RL_ALGORITHMS = ("maml", "anil")  # one inner REINFORCE step, TRPO on the post-update surrogate


def meta_iteration(env, params: dict, rng: np.random.Generator, trpo: TRPO, meta_batch_size: int, n_traj: int,
                   algorithm, discount: float = 0.99, gae_lambda: float = 1.0, third_order_fisher: bool = False):
    """One MAML-TRPO update. params: policy dict of arrays. Returns (new params, stats) with the average
    undiscounted pre- and post-update returns and TRPO's statistics (``trpo_step``).
    ``third_order_fisher=True``: the tape's reverse-over-reverse Fisher products through the inner step
    (the reference the tests check ``meta_fisher_product`` against; the same F, several times slower).
    ``algorithm``: from ``algorithms.make``, MAML or ANIL (``RL_ALGORITHMS``) with one inner step: its
    ``inner_lr`` and the parameters it adapts (``adapted_names``). (Meta-SGD and MAML++ would need the
    Fisher product through their learned rates, Reptile has no post-update objective for TRPO, and iMAML's
    proximal solve has no fixed point on a surrogate of sampled trajectories: not offered here.)
    Under MPI each rank works on its share of the tasks (module docstring); the new params and the stats
    are the whole meta-batch's, the same on every rank."""
    if algorithm.name not in RL_ALGORITHMS or algorithm.inner_steps != 1:
        raise ValueError(f"maml_rl: MAML-TRPO takes {' or '.join(RL_ALGORITHMS)} with one inner step; got "
                         f"{algorithm.name} with {algorithm.inner_steps}")
    inner_lr, names = algorithm.inner_lr, algorithm.adapted_names(params)
    tasks = env.sample_tasks(rng, meta_batch_size)  # the whole meta-batch, the same on every rank
    my_tasks, my_rng = rank_share(tasks, rng)
    pre_batch, pre = sample(env, params, my_tasks, my_rng, n_traj, discount=discount, gae_lambda=gae_lambda)
    adapted = maml.adapt(reinforce_loss, params, pre, inner_lr, 1, names)
    post_batch, post = sample(env, adapted, my_tasks, my_rng, n_traj, discount=discount, gae_lambda=gae_lambda)
    n_tasks = len(tasks)
    fisher_product = (None if third_order_fisher else
                      meta_fisher_product(pre, post, adapted, inner_lr, n_tasks, inner_param_names=names))
    new_params, trpo_stats = trpo.step(meta_objective(pre, post, adapted, inner_lr, n_tasks, inner_param_names=names),
                                       params, fisher_product, over_ranks=True)
    pre_returns, post_returns = (distributed.gather_tasks(average_returns(b)) for b in (pre_batch, post_batch))
    stats = {"pre_return": float(pre_returns.mean()), "post_return": float(post_returns.mean()), **trpo_stats}
    return new_params, stats


def adaptation_batches(env, params: dict, tasks, inner_lr: float, n_steps: int, rng: np.random.Generator,
                       test_batch_steps: int = 4000, n_traj: int = 20, inner_param_names=None) -> list:
    """The trajectories of each task's policy after 0, 1, ..., n_steps inner steps (step size alpha, then
    alpha / 2), each step on fresh trajectories of the current adapted policies: ``test_batch_steps``
    time steps per task, as the authors' test scripts (0: ``n_traj`` trajectories). Returns n_steps + 1
    raw batches of ``sample_steps`` (``episode_returns (T, B)``, ``kept (T, B)``, ``obs (T, B, H, obs_dim)``, ...).
    Under MPI: ``tasks`` and ``rng`` are this rank's share and its generator (``sampler.rank_share``).
    ``inner_param_names``: the adapted parameters (default: all; ANIL: ``algorithm.adapted_names``)."""
    batches, theta = [], params  # shared until the first step gives every task its own policy
    for step, lr in enumerate(evaluation_step_sizes(inner_lr, n_steps) + [None]):
        batch, data = sample(env, theta, tasks, rng, n_traj, test_batch_steps)
        batches.append(batch)
        if lr is not None:
            start = maml.per_task(params, len(tasks), inner_param_names) if step == 0 else theta
            theta = maml.inner_step(reinforce_loss, start, data, lr, inner_param_names)
    return batches
