"""One MAML-RL meta-iteration (Finn et al. 2017, Algorithm 3) with a TRPO meta-optimizer.

For a meta-batch of T tasks:

    1. sample B pre-update trajectories per task with pi_theta               D_i
    2. inner REINFORCE step per task: theta'_i = theta - alpha grad L_i(theta; D_i)
    3. sample B post-update trajectories per task with pi_theta'_i           D'_i
    4. TRPO on the meta-parameters theta, through the inner step:

        L(theta) = -(1/T) sum_i mean_{D'_i} [ pi_{theta'_i(theta)}(a|s) / pi_{theta'_i(theta_old)}(a|s) A'_i ]
        D(theta) =  (1/T) sum_i mean_{D'_i} KL( pi_{theta'_i(theta_old)}(.|s) || pi_{theta'_i(theta)}(.|s) )

Advantages (both sets): GAE(lambda = 1) against a linear baseline fitted per task, centred per task.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from minimaml import autodiff as ad
from minimaml.nn import policy as pol
from minimaml.rl.reinforce import (INNER_LR, NAVIGATION_INNER_LR, adapt, device_batch, evaluation_step_sizes,
                                   masked_task_mean)
from minimaml.rl.sampler import advantages, average_returns, sample_steps, sample_trajectories
from minimaml.rl.trpo import trpo_step


@dataclass
class MamlRLConfig:
    """The paper's MAML-TRPO settings (2D navigation: meta-batch 20, 20 trajectories, alpha 0.5)."""

    meta_batch_size: int = 20
    n_traj: int = 20  # trajectories per task, for the inner step and for the meta-objective
    inner_lr: float = INNER_LR
    discount: float = 0.99
    gae_lambda: float = 1.0
    max_kl: float = 0.01
    cg_iters: int = 10
    cg_damping: float = 1e-5
    backtrack_ratio: float = 0.8
    max_backtracks: int = 15
    # Evaluation (``adaptation_batches``): time steps of whole trajectories per task and step, as the
    # authors' test scripts (VPG with batch_size 4000); 0 = ``n_traj`` trajectories, as in training.
    test_batch_steps: int = 4000

    @classmethod
    def navigation(cls, **overrides) -> "MamlRLConfig":
        """2D navigation as in the authors' code: alpha = 0.5."""
        return cls(**{"inner_lr": NAVIGATION_INNER_LR, **overrides})


def _sample(env, params, tasks, cfg: MamlRLConfig, rng, dtype, min_steps: int = 0):
    """Trajectories of ``params`` (batched or not) on ``tasks``: ``cfg.n_traj`` per task, or whole ones
    adding up to ``min_steps`` time steps if given. Returns (raw batch, device data with advantages)."""
    policy = pol.sampler_policy(params)
    batch = (sample_steps(env, policy, tasks, min_steps, rng) if min_steps else
             sample_trajectories(env, policy, tasks, cfg.n_traj, rng))
    adv = advantages(batch, cfg.discount, cfg.gae_lambda)
    return batch, device_batch(batch, adv, dtype)


def surrogate_objective(data: dict, old_params: dict, acting_policy=None):
    """TRPO's objective ``(params, create_graph) -> (L, D)`` on trajectories ``data`` sampled by
    ``old_params``, for the policy ``acting_policy(params, create_graph)`` (default: ``params`` itself):

        L(theta) = -mean_i E[pi_theta(a|s) / pi_old(a|s) A_i],   D(theta) = mean_i E[KL(pi_old || pi_theta)]
    """
    with ad.no_grad():
        old_mean, old_log_std = pol.apply(old_params, data["obs"])
        old_log_prob = pol.gaussian_log_prob(old_mean, old_log_std, ad.as_tensor(data["actions"]))

    def objective(params, create_graph):
        acting = params if acting_policy is None else acting_policy(params, create_graph)
        mean, log_std = pol.apply(acting, data["obs"])
        log_prob = pol.gaussian_log_prob(mean, log_std, ad.as_tensor(data["actions"]))
        ratio = ad.exp(ad.subtract(log_prob, old_log_prob))
        surrogate = ad.negative(ad.mean(masked_task_mean(ad.multiply(ratio, data["advantages"]), data["mask"])))
        kl = pol.gaussian_kl(old_mean, old_log_std, mean, log_std)
        return surrogate, ad.mean(masked_task_mean(kl, data["mask"]))

    return objective


def meta_objective(pre: dict, post: dict, old_params: dict, inner_lr: float):
    """The MAML-TRPO objective: the surrogate of the post-update trajectories ``post`` for the adapted
    policies theta'_i(theta) = theta - alpha grad L_i(theta) (the inner step on ``pre``, differentiated
    through), pi_old = the post-update policies ``old_params`` that sampled ``post``."""
    return surrogate_objective(post, old_params,
                               lambda params, create_graph: adapt(params, pre, inner_lr, create_graph))


def meta_iteration(env, params: dict, rng: np.random.Generator, cfg: MamlRLConfig):
    """One MAML-TRPO update. params: policy dict of arrays. Returns (new params, stats) with the average
    undiscounted pre- and post-update returns and the seconds spent sampling, in the inner step, on
    the meta-gradient, in CG and in the line search."""
    dtype = params["log_std"].dtype
    clock = time.perf_counter
    start = clock()
    tasks = env.sample_tasks(rng, cfg.meta_batch_size)
    pre_batch, pre = _sample(env, params, tasks, cfg, rng, dtype)
    time_sampling = clock() - start

    start = clock()
    adapted = adapt(params, pre, cfg.inner_lr, create_graph=False)
    time_inner = clock() - start

    start = clock()
    post_batch, post = _sample(env, adapted, tasks, cfg, rng, dtype)
    time_sampling += clock() - start

    objective = meta_objective(pre, post, adapted, cfg.inner_lr)
    new_params, trpo_stats = trpo_step(objective, params, cfg.max_kl, cfg.cg_iters, cfg.cg_damping,
                                       cfg.backtrack_ratio, cfg.max_backtracks)
    stats = {"pre_return": float(average_returns(pre_batch).mean()),
             "post_return": float(average_returns(post_batch).mean()),
             "time_sampling": time_sampling, "time_inner": time_inner, **trpo_stats}
    return new_params, stats


def adaptation_batches(env, params: dict, tasks, n_steps: int, cfg: MamlRLConfig, rng: np.random.Generator) -> list:
    """The trajectories of each task's policy after 0, 1, ..., n_steps inner steps (step size alpha, then
    alpha / 2), each step on fresh trajectories of the current adapted policies (``cfg.test_batch_steps``
    time steps per task, as the authors' test scripts). Returns n_steps + 1 raw batches of
    ``sample_steps`` (``episode_returns (T, B)``, ``kept (T, B)``, ``obs (T, B, H, obs_dim)``, ...)."""
    dtype = params["log_std"].dtype
    batches = []
    for lr in evaluation_step_sizes(cfg.inner_lr, n_steps) + [None]:
        batch, data = _sample(env, params, tasks, cfg, rng, dtype, cfg.test_batch_steps)
        batches.append(batch)
        if lr is not None:
            params = adapt(params, data, lr, create_graph=False)
    return batches


def evaluate(env, params: dict, tasks, n_steps: int, cfg: MamlRLConfig, rng: np.random.Generator) -> list:
    """Average return on ``tasks`` after 0, 1, ..., n_steps inner steps (``adaptation_batches``).
    Returns n_steps + 1 floats."""
    return [float(average_returns(batch).mean())
            for batch in adaptation_batches(env, params, tasks, n_steps, cfg, rng)]
