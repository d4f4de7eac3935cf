"""MiniImagenet 5-way few-shot classification (paper Table 1), second- and first-order.

The paper's hyper-parameters (Finn, Abbeel & Levine 2017, App. A.1): 5 inner steps, alpha 0.01,
meta-batch 4 (1-shot) or 2 (5-shot), 10 steps at test, 15 query images per class, 60,000
meta-iterations. From the authors' code (github.com/cbfinn/maml): meta-gradients clipped to [-10, 10]
(``maml.py``), Adam 1e-3 (``main.py``'s ``meta_lr``). The best-validation parameters are tested (early
stopping, ``classification.py``). The net (Sec. 5.2; ``main.py``'s ``--num_filters=32 --max_pool=True``):
4 x [3x3 conv, 32 filters, batch norm, ReLU, 2x2 max-pool], 800 features. The data:
``MINIMAML_DATA/miniimagenet`` in the Ravi & Larochelle layout (see docs/data.md for assembling the
60,000 images); ``--sample-data`` uses the 12-image sample set.

    python -m minimaml.experiments.miniimagenet --k-shot 1 --profile full --resume
    python -m minimaml.experiments.miniimagenet --k-shot 5 --mode first_order --n-iterations 2000
"""

from __future__ import annotations

from .. import allocator
from . import classification
from .classification import ClassificationConfig
from .common import COMMAND_ERRORS, allowed_changes, config_parser, exit_with_error, log, overrides_from_args

PAPER = {"miniimagenet-5way-1shot": "48.70 ± 1.84", "miniimagenet-5way-5shot": "63.11 ± 0.92",
         "miniimagenet-5way-1shot-fo": "48.07 ± 1.75", "miniimagenet-5way-5shot-fo": "63.15 ± 0.91"}

SELECTORS = ("k_shot", "mode")  # flags that pick the paper's settings, not overrides
# "quick" fits a few minutes on 2 cores: a smoke run on the real images, far from convergence.
QUICK = dict(n_iterations=200, val_every=100, n_val_tasks=50, n_test_tasks=100, eval_steps=5)
SMOKE = dict(QUICK, n_iterations=10, val_every=5, n_val_tasks=5, n_test_tasks=10)  # everything runs
PROFILES = ("quick", "smoke", "full")


def config(k_shot: int = 1, mode: str = "second_order", profile: str = "quick",
           **overrides) -> ClassificationConfig:
    """The paper's hyper-parameters for 5-way ``k_shot``, at a profile, with overrides."""
    settings = dict(dataset="miniimagenet", model="conv", n_way=5, k_shot=k_shot, profile=profile,
                    mode=mode, inner_lr=0.01, inner_steps=5, eval_steps=10, grad_clip=10.0,
                    meta_batch_size=4 if k_shot == 1 else 2, n_iterations=60_000, eval_batch=10)
    if profile not in PROFILES:
        raise ValueError(f"miniimagenet: unknown profile {profile!r}; expected one of {PROFILES}")
    settings.update({"quick": QUICK, "smoke": SMOKE}.get(profile, {}))
    return classification.make_config(settings, overrides)


def run_profile(profile: str, resume: bool = False, progress: bool = True, overwrite: bool = False) -> tuple:
    """run_all's entry: 1- and 5-shot, second- and first-order. Returns (markdown, [folders])."""
    results, folders = [], []
    for k_shot in (1, 5):
        for mode in ("second_order", "first_order"):
            cfg = config(k_shot, mode, profile)
            results.append(classification.run(cfg, resume=resume, progress=progress, overwrite=overwrite))
            folders.append(cfg.out_dir)
    return classification.results_table(results, PAPER, f"MiniImagenet ({profile} profile)"), folders


def main(argv=None):
    examples = {"1-shot": lambda p: config(1, "second_order", p), "5-shot": lambda p: config(5, "second_order", p)}
    parser = config_parser(ClassificationConfig, __doc__, examples, PROFILES,
                           skip=SELECTORS + ("dataset", "n_way", "model"))
    parser.add_argument("--k-shot", type=int, default=1, help="support images per class: 1 or 5 pick the "
                        "paper's settings for it (default 1)")
    parser.add_argument("--mode", choices=("second_order", "hvp", "first_order"), default="second_order",
                        help="meta-gradient (default second_order)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in overrides_from_args(ClassificationConfig, args).items() if k not in SELECTORS}
    try:
        cfg = config(args.k_shot, args.mode, args.profile, **overrides)
        results = classification.run(cfg, resume=args.resume, progress=not args.no_progress,
                                     allow_changes=allowed_changes(args), overwrite=args.overwrite)
    except COMMAND_ERRORS as err:
        exit_with_error(parser, err)
    log(classification.results_table([results], PAPER, f"MiniImagenet ({args.profile} profile)"))


if __name__ == "__main__":
    allocator.keep_freed_memory()  # big arrays reused from step to step
    main()
