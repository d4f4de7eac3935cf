"""What tests/test_distributed.py runs under ``mpiexec -n R`` (and, for the reference, in one process):

    python tests/mpi_worker.py gradients OUT.npz        the split meta-gradients of W1- and W2-like batches
    python tests/mpi_worker.py train OUT_DIR N_ITER [resume]   a toy Omniglot-MLP run on random images
    python tests/mpi_worker.py die OUT_DIR kill|raise   that run, with rank 1 killed (or raising) mid-run
    python tests/mpi_worker.py rl OUT.npz navigation|cheetah_direction   MAML-TRPO's g, F v, a meta-iteration
                                                        and (navigation) an evaluation, float64
    python tests/mpi_worker.py rl_train OUT_DIR N_ITER [resume]   a toy 2D-navigation run, float64

Rank 0 writes the results; the meta-batches split unevenly over 2 and 3 ranks (7 and 5 tasks).
"""

import os
import signal
import sys

import numpy as np

from minimaml import autodiff as ad
from minimaml import algorithms, backend, distributed, maml
from minimaml.experiments import classification, navigation, omniglot, rl_common, sinusoid
from minimaml.nn import conv4, mlp
from minimaml.nn import policy as pol
from minimaml.rl import maml_rl, trpo
from minimaml.rl.envs import Navigation2D, make_env
from minimaml.rl.reinforce import reinforce_loss
from minimaml.rl.sampler import rank_share
from minimaml.tasks import episodes
from minimaml.tasks import sinusoid as sinusoid_tasks

TRAIN = dict(meta_batch_size=5, q_train=2, q_eval=2, val_every=2, n_val_tasks=3, n_test_tasks=5, eval_batch=2,
             checkpoint_every=1)


def random_images(n_classes: int, seed: int) -> np.ndarray:
    """``n_classes`` classes of 4 random 28x28 one-channel images, standing in for Omniglot."""
    return np.random.default_rng(seed).integers(0, 256, size=(n_classes, 4, 28, 28, 1), dtype=np.uint8)


def in_float64(tasks: maml.TaskBatch) -> maml.TaskBatch:
    def cast(examples):
        return maml.Examples(np.asarray(examples.x, dtype=np.float64), examples.y)
    return maml.TaskBatch(cast(tasks.support), cast(tasks.query))


def split_meta_gradient(task_loss, params, tasks, inner_lr, inner_steps, mode, names=None):
    """What the experiments' ``loss_and_grads`` do: this rank's share, then the sum over ranks."""
    loss, grads, _ = maml.meta_gradient(task_loss, params, distributed.share_tasks(tasks), inner_lr,
                                        inner_steps, mode=mode, inner_param_names=names)
    return distributed.sum_over_ranks(loss, grads)


def gradients(out_path: str) -> None:
    rng = np.random.default_rng(0)
    results = {}
    # W1-like: the sinusoid MLP (1-40-40-1), 7 tasks of 5 points, 2 inner steps
    params = mlp.init(rng, dtype=np.float64)
    tasks = sinusoid_tasks.sample_batch(rng, 7, 5, dtype=np.float64)
    for mode in maml.MODES:
        loss, grads = split_meta_gradient(sinusoid.TASK_LOSS, params, tasks, 0.01, 2, mode)
        results[f"w1/{mode}/loss"] = np.asarray(loss)
        results.update({f"w1/{mode}/{n}": g for n, g in grads.items()})
    # W2-like: the Omniglot Conv4, 5 tasks of 5-way 1-shot with 2 queries per class, 1 inner step
    model = conv4.omniglot_conv4()
    params = model.init(rng, 5, dtype=np.float64)
    names = conv4.inner_param_names(params)
    tasks = in_float64(episodes.sample_episodes(random_images(10, 1), 5, 5, 1, 2, rng))
    for mode in maml.MODES:
        loss, grads = split_meta_gradient(classification.task_loss(model, 5), params, tasks, 0.4, 1, mode, names)
        results[f"w2/{mode}/loss"] = np.asarray(loss)
        results.update({f"w2/{mode}/{n}": g for n, g in grads.items()})
    if distributed.is_root():
        np.savez(out_path, **results)


def fake_splits(config):
    return {"train": random_images(12, 2), "val": random_images(6, 3), "test": random_images(6, 4)}


def train_run(out_dir: str, n_iterations: int, resume: bool):
    classification.load_splits = fake_splits
    config = omniglot.config(5, 1, "mlp", "quick", out_dir=out_dir, n_iterations=n_iterations, **TRAIN)
    return classification.run(config, resume=resume, progress=False)


def die(out_dir: str, how: str) -> None:
    """A long run whose rank 1 dies at its 4th meta-batch (after 3 checkpoints)."""
    draws = {"n": 0}
    sample = episodes.sample_episodes

    def sample_or_die(*args):
        draws["n"] += 1
        if distributed.rank() == 1 and draws["n"] == 4:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("rank 1 fails on purpose")
        return sample(*args)

    episodes.sample_episodes = sample_or_die
    train_run(out_dir, 10_000, resume=False)


# --- RL: MAML-TRPO on 5 tasks of short episodes, float64 ---------------------------------------------
RL_TASKS, RL_TRAJ, RL_ALPHA = 5, 3, 0.5
RL_HORIZON, RL_GOAL_TOLERANCE = 12, 0.2  # navigation: a wide goal, so episodes end at different steps


def rl_env(name: str):
    """``make_env(name)`` with a 12-step horizon; 2D navigation with a goal 0.2 wide, reached by some
    episodes (so the early stops and extra rounds of the sampler happen on some ranks only)."""
    env = make_env(name)
    env.horizon = RL_HORIZON
    if name == "navigation":
        env.goal_tolerance = RL_GOAL_TOLERANCE
    return env


def rl_policy(env, rng) -> dict:
    """A tiny float64 policy (hidden 8, 8), moved away from the quiet initialisation."""
    params = pol.init(rng, env.obs_dim, env.act_dim, hidden=(8, 8), dtype=np.float64)
    return {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in params.items()}


def rl(out_path: str, env_name: str) -> None:
    """On one meta-batch, as ``maml_rl.meta_iteration`` splits it: the gathered pre- and post-update
    batches, the summed loss, KL, gradient g and F v (``meta_fisher_product`` and the tape's), the next
    draws of the generator; then whole meta-iterations (both Fisher products) and, on navigation, an
    evaluation of 7 test tasks in chunks of 4."""
    env = rl_env(env_name)
    rng = np.random.default_rng(0)
    params = rl_policy(env, rng)
    names = list(params)
    tasks = env.sample_tasks(rng, RL_TASKS)
    my_tasks, my_rng = rank_share(tasks, rng)
    pre_batch, pre = maml_rl.sample(env, params, my_tasks, my_rng, RL_TRAJ)
    adapted = maml.adapt(reinforce_loss, params, pre, RL_ALPHA, 1)
    post_batch, post = maml_rl.sample(env, adapted, my_tasks, my_rng, RL_TRAJ)
    results = {f"{when}/{k}": distributed.gather_tasks(v, axis=0)
               for when, batch in (("pre", pre_batch), ("post", post_batch)) for k, v in batch.items()}
    results["draws_after"] = rng.standard_normal(4)  # the generator advanced as in one process

    leaves = [ad.Tensor(params[n], requires_grad=True) for n in names]
    objective = maml_rl.meta_objective(pre, post, adapted, RL_ALPHA, RL_TASKS)
    loss, kl = objective(dict(zip(names, leaves)), create_graph=True)
    v = np.random.default_rng(1).standard_normal(trpo.flatten(params.values()).size)
    fast = maml_rl.meta_fisher_product(pre, post, adapted, RL_ALPHA, RL_TASKS)(params)
    fast_v = fast(dict(zip(names, trpo.unflatten(v, params.values()))))
    parts = {"loss": np.asarray(loss.item()), "kl": np.asarray(kl.item()),
             "g": trpo.flatten(ad.grad(loss, leaves)), "fisher_v": trpo.flatten(fast_v[n] for n in names),
             "tape_fisher_v": trpo.kl_hessian_product(kl, leaves)(v)}
    results.update({f"sum/{k}": x for k, x in distributed.all_reduce(parts).items()})

    # F is singular here (116 parameters, its smallest eigenvalues ~0): with the default damping 1e-5, CG
    # amplifies round-off of ~1e-16 in F v to ~1e-7 in the step, in one process as over ranks; 0.1 does not
    settings = trpo.TRPO(damping=0.1)
    for fisher, third_order in (("fast", False), ("tape", True)):
        new, stats = maml_rl.meta_iteration(env, params, np.random.default_rng(2), settings, RL_TASKS, RL_TRAJ,
                                            algorithms.make("maml", RL_ALPHA, 1), third_order_fisher=third_order)
        results.update({f"iteration_{fisher}/{k}": x for k, x in new.items()})
        results.update({f"iteration_{fisher}/stats/{k}": np.asarray(float(x)) for k, x in stats.items()})
    if env_name == "navigation":
        cfg = navigation.config("quick", meta_batch_size=4, n_test_tasks=7, eval_steps=2, test_batch_steps=30,
                                n_traj=RL_TRAJ)
        returns, shown = rl_common.evaluate_policy(env, params, cfg, n_show=3, inner_lr=RL_ALPHA)
        results["evaluation/returns"] = returns
        for step, paths in enumerate(shown):
            results.update({f"evaluation/shown/{step}/{k}": x for k, x in paths.items()})
    if distributed.is_root():
        np.savez(out_path, **results)


def float64_policy(env, seed: int, output_scale: float = 0.01) -> dict:
    """The experiments' initial policy in float64 (so that a run over ranks can be compared with one
    process's to float64 round-off: TRPO's CG amplifies float32's)."""
    return {k: v.astype(np.float64) for k, v in pol.init(np.random.default_rng([seed, 0]), env.obs_dim, env.act_dim,
                                                         output_scale=output_scale).items()}


def rl_train(out_dir: str, n_iterations: int, resume: bool):
    """2D navigation's three methods, ``n_iterations`` of MAML-TRPO and of the pretrained baseline on 5
    tasks a batch, 10 test tasks in 2 chunks; short episodes, some reaching the goal. CG damping 1: the
    quiet initial policy's F is singular, and with the default 1e-5 CG amplifies the round-off of a sum
    (over ranks, or over BLAS threads) to a percent of the step."""
    Navigation2D.horizon, Navigation2D.goal_tolerance = RL_HORIZON, RL_GOAL_TOLERANCE
    rl_common.init_policy = float64_policy
    cfg = navigation.config("quick", out_dir=out_dir, maml_iterations=n_iterations, pretrain_iterations=n_iterations,
                            meta_batch_size=5, n_traj=2, n_test_tasks=10, eval_steps=1, test_batch_steps=30,
                            cg_damping=1.0, checkpoint_every=1)
    return navigation.run(cfg, resume=resume, progress=False)


def all_reduce_path(out_path: str, path: str) -> None:
    """``distributed.all_reduce`` with ``MINIMAML_ALL_REDUCE=path`` of rank-dependent arrays on the
    default device (a float32 matrix, a float64 vector, a NumPy scalar as ``sum_over_ranks`` sends);
    rank 0 saves the sums on the host."""
    os.environ["MINIMAML_ALL_REDUCE"] = path
    distributed.use_local_gpu()
    xp = backend.array_namespace(backend.asarray(np.zeros(1)))
    r = distributed.rank()
    arrays = {"matrix": xp.asarray(np.arange(12, dtype=np.float32).reshape(3, 4) * (r + 1)),
              "vector": xp.asarray(np.linspace(0, 1, 5) + r), "loss": np.asarray(0.5 * r)}
    total = distributed.all_reduce(arrays)
    placed = {n: (backend.array_namespace(t) is backend.array_namespace(arrays[n]), t.dtype == arrays[n].dtype)
              for n, t in total.items()}
    if distributed.is_root():
        np.savez(out_path, placed=all(all(p) for p in placed.values()),
                 **{n: backend.to_numpy(t) for n, t in total.items()})


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "gradients":
        gradients(args[0])
    elif command == "train":
        train_run(args[0], int(args[1]), resume=args[2:] == ["resume"])
    elif command == "die":
        die(*args)
    elif command == "rl":
        rl(*args)
    elif command == "all_reduce_path":
        all_reduce_path(*args)
    elif command == "rl_train":
        rl_train(args[0], int(args[1]), resume=args[2:] == ["resume"])
    else:
        raise SystemExit(f"mpi_worker: unknown command {command!r}")
