"""The meta-gradient doctor: check anyone's MAML meta-gradient against the exact one and name the bug.

    python -m minimaml.doctor export DIR          # small seeded float64 cases: case.json + case.npz
    python -m minimaml.doctor check CASE GRADS    # your meta-gradient (an .npz) against the exact one

The same from Python: ``export``, ``load_case``, ``check`` (a ``Report``; ``print`` it). The modules:
``cases`` (the format), ``models`` (the architectures the doctor knows), ``standard`` (its own cases),
``gradients`` (the exact meta-gradients, correct and of each classic mistake), ``diagnosis`` (the verdict
and the diagnosis). docs/doctor.md walks through it with PyTorch and JAX.
"""

from .cases import Case, check_case, load_case, save_case
from .diagnosis import Report, check, mistake_table, precision_floor, relative_error
from .gradients import mistakes, reference
from .standard import STANDARD, export, standard_case
