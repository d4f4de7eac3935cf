"""MiniImagenet 5-way few-shot classification (paper Table 1), second- and first-order.

The paper's hyper-parameters (PROTOCOL.md): 5 inner steps, alpha 0.01, meta-batch 4 (1-shot) or 2
(5-shot), 10 steps at test, meta-gradients clipped to [-10, 10], 60,000 meta-iterations, Adam 1e-3,
early stopping on validation. The net: 4 x [3x3 conv, 32 filters, batch norm, ReLU, 2x2 max-pool],
800 features. The data: ``MINIMAML_DATA/miniimagenet`` in the Ravi & Larochelle layout (see
docs/data.md for assembling the 60,000 images); ``--sample-data`` uses the 12-image sample set.

    python -m minimaml.experiments.miniimagenet --k-shot 1 --profile full --resume
    python -m minimaml.experiments.miniimagenet --k-shot 5 --mode first_order --n-iterations 2000
"""

from __future__ import annotations

import argparse

from .. import allocator
from . import classification
from .classification import ClassificationConfig

PAPER = {"miniimagenet-5way-1shot": "48.70 ± 1.84", "miniimagenet-5way-5shot": "63.11 ± 0.92",
         "miniimagenet-5way-1shot-fo": "48.07 ± 1.75", "miniimagenet-5way-5shot-fo": "63.15 ± 0.91"}

# "quick" fits a few minutes on 2 cores: a smoke run on the real images, far from convergence.
QUICK = dict(n_iterations=200, val_every=100, n_val_tasks=50, n_test_tasks=100, eval_steps=5)


def config(k_shot: int = 1, mode: str = "second_order", profile: str = "quick",
           **overrides) -> ClassificationConfig:
    """The paper's hyper-parameters for 5-way ``k_shot``, at a profile, with overrides."""
    settings = dict(dataset="miniimagenet", model="conv", n_way=5, k_shot=k_shot, profile=profile,
                    mode=mode, inner_lr=0.01, inner_steps=5, eval_steps=10, grad_clip=10.0,
                    meta_batch_size=4 if k_shot == 1 else 2, n_iterations=60_000, eval_batch=10)
    if profile == "quick":
        settings.update(QUICK)
    return classification.make_config(settings, overrides)


def run_profile(profile: str, resume: bool = False, progress: bool = True) -> tuple:
    """run_all's entry: 1- and 5-shot, second- and first-order. Returns (markdown, [folders])."""
    results, folders = [], []
    for k_shot in (1, 5):
        for mode in ("second_order", "first_order"):
            cfg = config(k_shot, mode, profile)
            results.append(classification.run(cfg, resume=resume, progress=progress))
            folders.append(cfg.out_dir)
    return classification.results_table(results, PAPER, f"MiniImagenet ({profile} profile)"), folders


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k-shot", type=int, default=1)
    parser.add_argument("--mode", choices=("second_order", "hvp", "first_order"), default="second_order")
    parser.add_argument("--profile", choices=("quick", "full"), default="quick")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--sample-data", action="store_true", help="the 12-image-per-class sample set")
    for field in ("n_iterations", "meta_batch_size", "q_train", "inner_steps", "eval_steps", "val_every",
                  "n_val_tasks", "n_test_tasks", "seed", "checkpoint_every"):
        parser.add_argument("--" + field.replace("_", "-"), type=int)
    for field in ("inner_lr", "meta_lr", "grad_clip", "max_train_minutes"):
        parser.add_argument("--" + field.replace("_", "-"), type=float)
    parser.add_argument("--out-dir")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items()
                 if v not in (None, False) and k not in ("k_shot", "mode", "profile", "resume", "no_progress")}
    cfg = config(args.k_shot, args.mode, args.profile, **overrides)
    results = classification.run(cfg, resume=args.resume, progress=not args.no_progress)
    print(classification.results_table([results], PAPER, f"MiniImagenet ({args.profile} profile)"))


if __name__ == "__main__":
    allocator.keep_freed_memory()  # big arrays reused from step to step
    main()
