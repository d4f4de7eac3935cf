"""What tests/test_distributed.py runs under ``mpiexec -n R`` (and, for the reference, in one process):

    python tests/mpi_worker.py gradients OUT.npz        the split meta-gradients of W1- and W2-like batches
    python tests/mpi_worker.py train OUT_DIR N_ITER [resume]   a toy Omniglot-MLP run on random images
    python tests/mpi_worker.py die OUT_DIR kill|raise   that run, with rank 1 killed (or raising) mid-run

Rank 0 writes the results; the meta-batches split unevenly over 2 and 3 ranks (7 and 5 tasks).
"""

import os
import signal
import sys

import numpy as np

from minimaml import distributed, maml
from minimaml.experiments import classification, omniglot, sinusoid
from minimaml.nn import conv4, mlp
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
    loss, grads = maml.meta_gradient(task_loss, params, distributed.share_tasks(tasks), inner_lr, inner_steps,
                                     mode=mode, inner_param_names=names)
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


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "gradients":
        gradients(args[0])
    elif command == "train":
        train_run(args[0], int(args[1]), resume=args[2:] == ["resume"])
    elif command == "die":
        die(*args)
    else:
        raise SystemExit(f"mpi_worker: unknown command {command!r}")
