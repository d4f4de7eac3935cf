"""MAML and its follow-ups, one module each on the one core (``minimaml.maml``), all in one shape:

=============  =======================================================================  ==================
module         what changes                                                             paper
=============  =======================================================================  ==================
``maml``       MAML itself: K inner steps, then the query loss (``minimaml.maml``)      Finn et al. 2017
``reptile``    no query loss, no derivative of the inner loop: theta += eps mean(phi-theta)  Nichol et al. 2018
``meta_sgd``   a learned step size per parameter entry, meta-learned with theta         Li et al. 2017
``maml_pp``    multi-step loss, per-layer per-step rates, per-step BN, DA, cosine lr    Antoniou et al. 2019
``anil``       only the head is adapted in the inner loop                               Raghu et al. 2020
``imaml``      proximal inner problem, implicit gradient by conjugate gradient          Rajeswaran et al. 2019
=============  =======================================================================  ==================

One door: ``make(name, inner_lr, inner_steps, **options)`` builds any of them; every class takes the same
two leading arguments, ``inner_lr`` (the inner step size; Meta-SGD's and MAML++'s learned rates start
from it) and ``inner_steps``, and its own options by keyword. Every algorithm has the interface of
``maml.MAML`` (``init``, ``model_params``, ``meta_gradient``, ``optimizer``, ``adaptation_steps``);
every ``meta_gradient``, ``minimaml.maml``'s and the modules' functions included, returns
``(loss, grads, metrics)``, ``metrics`` a dict of floats (solver diagnostics; ``{}`` for MAML) plus
``metrics["failure"]``, a one-line message, when the step's numerics failed.

    >>> from minimaml import algorithms
    >>> algorithms.make("imaml", 0.05, 16, lam=2.0).name
    'imaml'

The experiments' settings and command line (``minimaml.experiments.algorithm_settings``) map onto
``make``; nothing here imports from ``minimaml.experiments``.
"""

from __future__ import annotations

from .anil import ANIL
from .imaml import IMAML
from .maml import MAML
from .maml_pp import MAMLPlusPlus
from .meta_sgd import MetaSGD
from .reptile import Reptile

CLASSES = {"maml": MAML, "reptile": Reptile, "meta_sgd": MetaSGD, "maml_pp": MAMLPlusPlus, "anil": ANIL,
           "imaml": IMAML}
ALGORITHMS = tuple(CLASSES)


def make(name: str, inner_lr, inner_steps: int, **options):
    """The algorithm ``name`` (one of ``ALGORITHMS``): ``CLASSES[name](inner_lr, inner_steps, **options)``."""
    if name not in CLASSES:
        raise ValueError(f"algorithms: unknown algorithm {name!r}: expected one of {ALGORITHMS}")
    return CLASSES[name](inner_lr, inner_steps, **options)
