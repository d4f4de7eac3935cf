"""MAML's follow-ups, each a short module on the one core (``minimaml.maml``):

=============  =======================================================================  ==================
module         what changes                                                             paper
=============  =======================================================================  ==================
``reptile``    no query loss, no derivative of the inner loop: theta += eps mean(phi-theta)  Nichol et al. 2018
``meta_sgd``   a learned step size per parameter entry, meta-learned with theta         Li et al. 2017
``maml_pp``    multi-step loss, per-layer per-step rates, per-step BN, DA, cosine lr    Antoniou et al. 2019
``anil``       only the head is adapted in the inner loop                               Raghu et al. 2020
``imaml``      proximal inner problem, implicit gradient by conjugate gradient          Rajeswaran et al. 2019
=============  =======================================================================  ==================

Every algorithm is an object with the interface of ``base.MAML`` (``init``, ``model_params``,
``meta_gradient``, ``optimizer``, ``adaptation_steps``), so an experiment trains and evaluates any of
them with the same loop; ``make(config)`` builds one from an experiment's settings.
"""

from __future__ import annotations

from .anil import ANIL
from .base import MAML
from .imaml import IMAML
from .maml_pp import MAMLPlusPlus
from .meta_sgd import MetaSGD
from .reptile import Reptile
from .settings import ALGORITHMS, Settings, followup_setting


def make(config, inner_param_names=None):
    """The algorithm ``config.algorithm`` built from an experiment's settings: ``inner_lr``, ``inner_steps``,
    ``mode`` and the fields of ``Settings``; ``inner_param_names``: MAML's, Meta-SGD's and MAML++'s
    adapted parameters (default: all)."""
    name = config.algorithm
    if name not in ALGORITHMS:
        raise ValueError(f"followups: unknown algorithm {name!r}: expected one of {ALGORITHMS}")
    if name == "reptile":
        return Reptile(config.reptile_inner_lr, config.reptile_inner_steps, config.reptile_inner_optimizer,
                       config.reptile_epsilon, config.reptile_epsilon_final)
    if name == "meta_sgd":
        return MetaSGD(config.inner_steps, (config.meta_sgd_alpha_low, config.meta_sgd_alpha_high),
                       inner_param_names)
    if name == "maml_pp":
        return MAMLPlusPlus(config.inner_lr, config.maml_pp_inner_steps, msl_epochs=config.maml_pp_msl_epochs,
                            learned_rates=config.maml_pp_learned_rates,
                            per_step_bn=config.maml_pp_per_step_bn,
                            first_order_epochs=config.maml_pp_first_order_epochs,
                            min_meta_lr=config.maml_pp_min_meta_lr,
                            iterations_per_epoch=config.maml_pp_iterations_per_epoch,
                            inner_param_names=inner_param_names)
    if name == "anil":
        return ANIL(config.inner_lr, config.inner_steps, config.mode)
    if name == "imaml":
        return IMAML(config.imaml_inner_lr, config.imaml_inner_steps, config.imaml_lambda, config.imaml_cg_steps,
                     config.imaml_cg_damping, config.imaml_lambda_damping, config.imaml_backtracking)
    return MAML(config.inner_lr, config.inner_steps, config.mode, inner_param_names)
