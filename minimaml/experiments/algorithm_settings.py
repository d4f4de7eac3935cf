"""The algorithms' settings, shared by the sinusoid and few-shot classification experiments: each
experiment's ``Config`` derives from ``Settings``, so ``--algorithm`` and the ``--reptile-*``,
``--meta-sgd-*``, ``--maml-pp-*`` and ``--imaml-*`` flags are declared once (``--help`` lists them in a
group of their own, after the experiment's). The defaults are the authors' (docs/followups.md);
an experiment overrides the few that differ by re-declaring the field. ``make_algorithm(config)``
builds the configured algorithm through ``algorithms.make``, MAML included: the experiments' one door.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..algorithms import ALGORITHMS, make
from .common import setting

GROUP = "MAML's follow-ups (docs/followups.md)"


def algorithm_setting(default, help: str, **checks):
    """A ``setting`` listed under the follow-ups' heading of ``--help``."""
    return setting(default, help, group=GROUP, **checks)


def overridden(name: str, default, why: str = ""):
    """``Settings``' field ``name`` with another default, for an experiment whose setting differs (its
    help, checks and heading kept; ``why`` appended to its help)."""
    base = Settings.__dataclass_fields__[name]
    help_text = f"{base.metadata['help']}. {why}" if why else base.metadata["help"]
    return dataclasses.field(default=default, metadata={**base.metadata, "help": help_text})


@dataclass
class Settings:
    algorithm: str = algorithm_setting("maml", "MAML (with the experiment's baselines) or one of its follow-ups",
                                      choices=ALGORITHMS)
    allow_solver_failures: bool = algorithm_setting(False, "go on, with a warning, when an algorithm's solver "
                                                   "fails 3 iterations in a row (iMAML's inner solve or CG, "
                                                   "MAML++'s rates); the count goes into results.json",
                                                   training=False)
    reptile_inner_lr: float = algorithm_setting(0.01, "Reptile: the inner optimizer's step size (training and test)",
                                               positive=True)
    reptile_inner_steps: int = algorithm_setting(5, "Reptile: inner steps in training (on support + query)", least=1)
    reptile_inner_optimizer: str = algorithm_setting("sgd", "Reptile: inner optimizer", choices=("sgd", "adam"))
    reptile_epsilon: float = algorithm_setting(1.0, "Reptile: outer step size epsilon, annealed linearly ...",
                                              positive=True)
    reptile_epsilon_final: float = algorithm_setting(0.0, "... to this at the last iteration", least=0.0,
                                                    at_most="reptile_epsilon")
    meta_sgd_alpha_low: float = algorithm_setting(0.005, "Meta-SGD: alpha's entries drawn from U(low, high)",
                                                 positive=True)
    meta_sgd_alpha_high: float = algorithm_setting(0.1, "Meta-SGD: the high end of alpha's initial interval",
                                                  positive=True)
    maml_pp_inner_lr: float = algorithm_setting(0.0, "MAML++: the per-step rates' initial value (fixed value with "
                                               "--maml-pp-learned-rates false); 0: --inner-lr", least=0.0)
    maml_pp_inner_steps: int = algorithm_setting(5, "MAML++: inner steps in training (the rates are per step)",
                                                least=1)
    maml_pp_msl_epochs: float = algorithm_setting(10.0, "MAML++: epochs of the multi-step loss annealing",
                                                 positive=True)
    maml_pp_first_order_epochs: float = algorithm_setting(0.0, "MAML++: first-order epochs before second order",
                                                         least=0.0)
    maml_pp_min_meta_lr: float = algorithm_setting(1e-5, "MAML++: the cosine-annealed meta-lr's final value",
                                                  positive=True)
    maml_pp_iterations_per_epoch: int = algorithm_setting(500, "MAML++: meta-iterations per epoch", least=1)
    maml_pp_learned_rates: bool = algorithm_setting(True, "MAML++: learn the per-layer per-step rates (LSLR), "
                                                   "else fixed at alpha")
    maml_pp_per_step_bn: bool = algorithm_setting(True, "MAML++: batch-norm scale and shift per inner step (BNWB; "
                                                 "nets with batch norm)")
    anil_inner_lr: float = algorithm_setting(0.0, "ANIL: the head's inner step size (training and test); 0: "
                                            "--inner-lr (the ANIL paper keeps MAML's)", least=0.0)
    anil_inner_steps: int = algorithm_setting(0, "ANIL: inner steps in training; 0: --inner-steps", least=0)
    imaml_inner_lr: float = algorithm_setting(0.01, "iMAML: the step size of the inner steps (training and test)",
                                             positive=True)
    imaml_backtracking: bool = algorithm_setting(False, "iMAML: halve a task's inner step size (and skip the step) "
                                                "whenever it would raise its proximal loss; false: plain gradient "
                                                "descent (the authors')")
    imaml_inner_steps: int = algorithm_setting(16, "iMAML: inner steps on the proximal problem", least=1)
    imaml_lambda: float = algorithm_setting(2.0, "iMAML: the proximal regularisation lambda", positive=True)
    imaml_cg_steps: int = algorithm_setting(5, "iMAML: conjugate-gradient steps of the implicit gradient", least=1)
    imaml_cg_damping: float = algorithm_setting(0.0, "iMAML: CG solves ((1 + this) I + H / (lambda + "
                                               "--imaml-lambda-damping)) x = g; 0 and 0: the paper's system, "
                                               "the authors' code: 1 and 10", least=0.0)
    imaml_lambda_damping: float = algorithm_setting(0.0, "iMAML: added to lambda in CG's system (see "
                                                   "--imaml-cg-damping)", least=0.0)
    imaml_tolerance: float = algorithm_setting(1e-3, "iMAML: the largest inner-solve stationarity (the proximal "
                                               "gradient's norm relative to its start) and CG residual a step may "
                                               "end with; above it the step failed", positive=True, training=False)


def make_algorithm(config, inner_param_names=None):
    """The algorithm ``config.algorithm`` from an experiment's settings (``inner_lr``, ``inner_steps``,
    ``mode`` and the fields of ``Settings``); ``inner_param_names``: the adapted parameters of MAML,
    Meta-SGD and MAML++ (default: all; ANIL adapts the head, Reptile and iMAML every parameter)."""
    name = config.algorithm
    if name == "reptile":
        return make(name, config.reptile_inner_lr, config.reptile_inner_steps,
                    optimizer=config.reptile_inner_optimizer, epsilon=config.reptile_epsilon,
                    epsilon_final=config.reptile_epsilon_final)
    if name == "meta_sgd":
        return make(name, (config.meta_sgd_alpha_low, config.meta_sgd_alpha_high), config.inner_steps,
                    inner_param_names=inner_param_names)
    if name == "maml_pp":
        return make(name, config.maml_pp_inner_lr or config.inner_lr, config.maml_pp_inner_steps,
                    msl_epochs=config.maml_pp_msl_epochs,
                    learned_rates=config.maml_pp_learned_rates, per_step_bn=config.maml_pp_per_step_bn,
                    first_order_epochs=config.maml_pp_first_order_epochs, min_meta_lr=config.maml_pp_min_meta_lr,
                    iterations_per_epoch=config.maml_pp_iterations_per_epoch, inner_param_names=inner_param_names)
    if name == "anil":
        return make(name, config.anil_inner_lr or config.inner_lr, config.anil_inner_steps or config.inner_steps,
                    mode=config.mode)
    if name == "imaml":
        return make(name, config.imaml_inner_lr, config.imaml_inner_steps, lam=config.imaml_lambda,
                    cg_steps=config.imaml_cg_steps, cg_damping=config.imaml_cg_damping,
                    lambda_damping=config.imaml_lambda_damping, backtracking=config.imaml_backtracking,
                    tolerance=config.imaml_tolerance)
    return make(name, config.inner_lr, config.inner_steps, mode=config.mode, inner_param_names=inner_param_names)
