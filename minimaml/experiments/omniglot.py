"""Omniglot few-shot classification (paper Table 1): 5-way and 20-way, 1- and 5-shot, conv and "no conv".

The paper's hyper-parameters (Finn, Abbeel & Levine 2017, App. A.1): 5-way: 1 inner step, alpha 0.4,
meta-batch 32, 3 steps at test; 20-way: 5 inner steps, alpha 0.1, meta-batch 16, 5 steps at test;
60,000 meta-iterations. Adam 1e-3 is ``meta_lr`` in the authors' ``main.py`` (github.com/cbfinn/maml).
Training takes 15 query images per class, as App. A.1 says for MiniImagenet; the authors' Omniglot runs
took K (``main.py`` samples ``2 K`` images per class, K of them support). The data:
``MINIMAML_DATA/omniglot`` (see docs/data.md; ``--download`` fetches the official zips that are missing
there).

    python -m minimaml.experiments.omniglot --n-way 5 --k-shot 1 --profile quick
    python -m minimaml.experiments.omniglot --n-way 20 --k-shot 5 --profile full --resume
"""

from __future__ import annotations

from .. import allocator
from . import classification
from .classification import ClassificationConfig
from .common import COMMAND_ERRORS, allowed_changes, config_parser, exit_with_error, log, overrides_from_args

PAPER = {"omniglot-5way-1shot": "98.7 ± 0.4", "omniglot-5way-5shot": "99.9 ± 0.1",
         "omniglot-20way-1shot": "95.8 ± 0.3", "omniglot-20way-5shot": "98.9 ± 0.2",
         "omniglot-mlp-5way-1shot": "89.7 ± 1.1", "omniglot-mlp-5way-5shot": "97.5 ± 0.6",
         "omniglot-5way-1shot-fo": "98.3 (FOMAML, follow-up)"}

# The profiles: "full" is the paper's schedule; "quick" is 5-way 1-shot in about 10 minutes on 2 cores
# (8 tasks per meta-batch and 5 query images per class instead of 32 and 15; the authors' Omniglot code
# itself used K query images per class).
QUICK = dict(n_iterations=4_000, meta_batch_size=8, q_train=5, val_every=500, n_val_tasks=100,
             n_test_tasks=600)
# MAML++'s learned rates start at 0.1 in its authors' Omniglot configs (``init_inner_loop_learning_rate``;
# HowToTrainYourMAMLPytorch), not at MAML's 0.4
MAML_PP_INNER_LR = 0.1
SELECTORS = ("n_way", "k_shot", "model")  # flags that pick the paper's settings, not overrides
SMOKE = dict(QUICK, n_iterations=300, val_every=100, n_val_tasks=20, n_test_tasks=100)  # everything runs
PROFILES = ("quick", "smoke", "full")
FULL_SETTINGS = [(5, 1, "conv"), (5, 5, "conv"), (20, 1, "conv"), (20, 5, "conv"), (5, 1, "mlp"),
                 (5, 5, "mlp")]


def config(n_way: int = 5, k_shot: int = 1, model: str = "conv", profile: str = "quick",
           **overrides) -> ClassificationConfig:
    """The paper's hyper-parameters for one setting, at a profile, with overrides."""
    paper = (dict(inner_lr=0.4, inner_steps=1, meta_batch_size=32, eval_steps=3) if n_way <= 5 else
             dict(inner_lr=0.1, inner_steps=5, meta_batch_size=16, eval_steps=5))
    paper.update(maml_pp_inner_lr=MAML_PP_INNER_LR)
    settings = dict(dataset="omniglot", model=model, n_way=n_way, k_shot=k_shot, profile=profile,
                    n_iterations=60_000, **paper)
    if profile not in PROFILES:
        raise ValueError(f"omniglot: unknown profile {profile!r}; expected one of {PROFILES}")
    settings.update({"quick": QUICK, "smoke": SMOKE}.get(profile, {}))
    return classification.make_config(settings, overrides)


def run_profile(profile: str, resume: bool = False, progress: bool = True, download: bool = False,
                overwrite: bool = False) -> tuple:
    """run_all's entry: quick (and smoke) = 5-way 1-shot; full = every Table 1 Omniglot setting.
    ``download``: first fetch the official zips missing from <data>/omniglot. Returns (markdown, [output folders])."""
    settings = FULL_SETTINGS if profile == "full" else [(5, 1, "conv")]
    results, folders = [], []
    for n_way, k_shot, model in settings:
        cfg = config(n_way, k_shot, model, profile)
        results.append(classification.run(cfg, resume=resume, progress=progress, download=download,
                                          overwrite=overwrite))
        folders.append(cfg.out_dir)
    title = f"Omniglot ({profile} profile)"
    return classification.results_table(results, PAPER, title), folders


def main(argv=None):
    examples = {"5-way": lambda p: config(5, 1, "conv", p), "20-way": lambda p: config(20, 1, "conv", p)}
    parser = config_parser(ClassificationConfig, __doc__, examples, PROFILES,
                           skip=SELECTORS + ("dataset", "sample_data"))
    parser.add_argument("--n-way", type=int, default=5, help="classes per task: 5 or 20 pick the paper's "
                        "settings for that many (default 5)")
    parser.add_argument("--k-shot", type=int, default=1, help="support images per class (default 1)")
    parser.add_argument("--model", choices=("conv", "mlp"), default="conv",
                        help="the conv net, or the 'no conv' MLP (default conv)")
    parser.add_argument("--download", action="store_true", help="first fetch the official Omniglot zips missing "
                        "from <data>/omniglot (md5-checked; see docs/data.md)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in overrides_from_args(ClassificationConfig, args).items() if k not in SELECTORS}
    try:
        cfg = config(args.n_way, args.k_shot, args.model, args.profile, **overrides)
        results = classification.run(cfg, resume=args.resume, progress=not args.no_progress,
                                     allow_changes=allowed_changes(args), overwrite=args.overwrite,
                                     download=args.download)
    except COMMAND_ERRORS as err:
        exit_with_error(parser, err)
    log(classification.results_table([results], PAPER, f"Omniglot ({args.profile} profile)"))


if __name__ == "__main__":
    allocator.keep_freed_memory()  # big arrays reused from step to step
    main()
