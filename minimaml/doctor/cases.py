"""A doctor case: ``case.npz`` (plain arrays) and ``case.json`` (what is differentiated), read and written.

``case.json``'s fields (docs/doctor.md shows a whole file; the exported cases spell out every layout):

- ``algorithm``: ``"maml"`` (default), ``"anil"``, ``"meta_sgd"``, ``"maml_pp"`` or ``"imaml"``;
- ``model``: ``family`` (``models.FAMILIES``), ``activation`` (default relu) and, for ``conv_bn``,
  ``stride``, ``padding``, ``max_pool``, ``features``, ``bn_eps``;
- ``loss``: ``"mse"``, ``"cross_entropy"`` or ``"reinforce"``;
- ``parameters``: the model's parameter names (strings, or objects with a ``name``), each an array of
  ``case.npz``; ``meta_parameters``: the algorithm's own (Meta-SGD's ``alpha/<name>``, MAML++'s
  ``lslr/<name>``), also arrays of ``case.npz``;
- ``inner``: ``steps``, ``lr`` (MAML, ANIL, iMAML), ``adapted`` (default: every parameter; ANIL: the
  head), ``lambda`` and ``cg_steps`` (iMAML);
- ``step_weights`` (MAML++: the multi-step loss's w_1..w_K);
- ``meta_objective``: ``"sum"`` or ``"mean"`` over the tasks.

The tasks are the arrays ``support.x``, ``support.y``, ``query.x``, ``query.y`` (a leading task axis), or
for ``reinforce`` ``{support,query}.{obs,actions,mask,advantages}``. Anything else in ``case.json``
(layouts, conversions, prose) is for the reader.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy

from ..rl.reinforce import Trajectories
from ..tasks.batch import Examples, TaskBatch
from . import models

ALGORITHMS = ("maml", "anil", "meta_sgd", "maml_pp", "imaml")
OWN_PREFIX = {"meta_sgd": "alpha/", "maml_pp": "lslr/"}  # the algorithm's own meta-parameters
SETS = {"reinforce": ("obs", "actions", "mask", "advantages")}
CONV_SETTINGS = ("stride", "padding", "max_pool", "features", "bn_eps")


@dataclass(frozen=True)
class Case:
    """A case: ``spec`` (``case.json``'s content, checked) and ``arrays`` (``case.npz``'s, by name)."""

    spec: dict
    arrays: dict

    @property
    def name(self) -> str:
        return self.spec.get("name", "case")

    @property
    def algorithm(self) -> str:
        return self.spec.get("algorithm", "maml")

    @property
    def param_names(self) -> list:
        """The model's parameters, in ``case.json``'s order."""
        return [p if isinstance(p, str) else p["name"] for p in self.spec["parameters"]]

    @property
    def meta_names(self) -> list:
        """Every array the meta-gradient has: the model's parameters, then the algorithm's own."""
        own = [p if isinstance(p, str) else p["name"] for p in self.spec.get("meta_parameters", [])]
        return self.param_names + own

    @property
    def meta_params(self) -> dict:
        return {n: self.arrays[n] for n in self.meta_names}

    @property
    def inner_steps(self) -> int:
        return int(self.spec["inner"]["steps"])

    @property
    def inner_lr(self):
        return self.spec["inner"].get("lr")

    @property
    def adapted(self) -> list:
        return list(self.spec["inner"].get("adapted") or self.param_names)

    @property
    def tasks(self) -> TaskBatch:
        fields = SETS.get(self.spec["loss"])
        if fields:
            return TaskBatch(*(Trajectories(*(self.arrays[f"{s}.{f}"] for f in fields)) for s in ("support", "query")))
        return TaskBatch(*(Examples(self.arrays[f"{s}.x"], self.arrays[f"{s}.y"]) for s in ("support", "query")))

    @property
    def n_tasks(self) -> int:
        return self.tasks.n_tasks

    @property
    def scale(self) -> float:
        """The meta-objective's factor on the sum over tasks: 1 (sum) or 1/T (mean)."""
        return 1.0 if self.spec["meta_objective"] == "sum" else 1.0 / self.n_tasks

    @property
    def dtype(self):
        return self.arrays[self.param_names[0]].dtype

    def task_loss(self, batch_norm: str = "batch"):
        return models.task_loss(self.spec["model"], self.spec["loss"], batch_norm)

    def has_batch_norm(self) -> bool:
        return any(".bn." in n for n in self.param_names)

    def astype(self, dtype) -> "Case":
        """The same case with every floating array in ``dtype`` (labels stay integers)."""
        return Case(self.spec, {n: a.astype(dtype) if a.dtype.kind == "f" else a for n, a in self.arrays.items()})


def _required(spec: dict, key: str, where: str):
    if key not in spec:
        raise ValueError(f"{where}: missing the field {key!r}")
    return spec[key]


def check_case(spec: dict, arrays: dict, where: str = "case") -> Case:
    """The case, with defaults filled in, or a one-line error naming the first problem found."""
    spec = dict(spec)
    spec["algorithm"] = spec.get("algorithm", "maml")
    if spec["algorithm"] not in ALGORITHMS:
        raise ValueError(f"{where}: unknown algorithm {spec['algorithm']!r}: expected one of {ALGORITHMS}")
    model = dict(_required(spec, "model", where))
    family = _required(model, "family", where + ": model")
    if family not in models.FAMILIES:
        raise ValueError(f"{where}: unknown model family {family!r}: the doctor knows {models.FAMILIES}")
    model["activation"] = model.get("activation", "relu")
    if model["activation"] not in models.ACTIVATIONS:
        raise ValueError(f"{where}: unknown activation {model['activation']!r}: expected one of "
                         f"{tuple(models.ACTIVATIONS)}")
    if family == "conv_bn":
        for key in CONV_SETTINGS:
            _required(model, key, where + ": model")
        if model["features"] not in ("flatten", "mean"):
            raise ValueError(f"{where}: model.features must be 'flatten' or 'mean', got {model['features']!r}")
    spec["model"] = model
    if _required(spec, "loss", where) not in models.LOSSES[family]:
        raise ValueError(f"{where}: loss {spec['loss']!r} does not fit model family {family!r}: expected one of "
                         f"{models.LOSSES[family]}")
    if _required(spec, "meta_objective", where) not in ("sum", "mean"):
        raise ValueError(f"{where}: meta_objective must be 'sum' or 'mean', got {spec['meta_objective']!r}")
    inner = _required(spec, "inner", where)
    steps = _required(inner, "steps", where + ": inner")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{where}: inner.steps must be an integer >= 1, got {steps!r}")
    if spec["algorithm"] in ("maml", "anil", "imaml") and not _required(inner, "lr", where + ": inner") > 0:
        raise ValueError(f"{where}: inner.lr must be positive, got {inner['lr']!r}")
    if spec["algorithm"] == "imaml":
        for key in ("lambda", "cg_steps"):
            _required(inner, key, where + ": inner")
    if spec["algorithm"] == "maml_pp" and len(_required(spec, "step_weights", where)) != steps:
        raise ValueError(f"{where}: step_weights needs one weight per inner step ({steps}), got "
                         f"{spec['step_weights']}")
    case = Case(spec, dict(arrays))
    data = [f"{s}.{f}" for s in ("support", "query") for f in SETS.get(spec["loss"], ("x", "y"))]
    missing = [n for n in case.meta_names + data if n not in arrays]
    if missing:
        raise ValueError(f"{where}: case.npz lacks the arrays {missing}")
    unknown = [n for n in case.adapted if n not in case.param_names]
    if unknown or inner.get("adapted") == []:
        raise ValueError(f"{where}: inner.adapted must name parameters, at least one; got {inner.get('adapted')}")
    prefix = OWN_PREFIX.get(spec["algorithm"])
    own = case.meta_names[len(case.param_names):]
    if prefix and sorted(own) != sorted(prefix + n for n in case.adapted):
        raise ValueError(f"{where}: {spec['algorithm']} needs meta_parameters {[prefix + n for n in case.adapted]}, "
                         f"got {own}")
    for name in own:
        expected = (steps,) if prefix == "lslr/" else arrays[name[len(prefix):]].shape
        if arrays[name].shape != expected:
            raise ValueError(f"{where}: {name} has shape {arrays[name].shape}, expected {expected}")
    floats = {str(a.dtype) for n, a in arrays.items() if n in case.meta_names or a.dtype.kind == "f"}
    if floats - {"float32", "float64"} or len(floats) > 1:
        raise ValueError(f"{where}: the parameters and the data must all be float32 or all float64 (labels "
                         f"integers), got {sorted(floats)}")
    return case


def load_case(directory) -> Case:
    """The case in ``directory`` (``case.json`` + ``case.npz``), checked."""
    directory = Path(directory)
    for name in ("case.json", "case.npz"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"doctor: no {name} in {directory} (a case is a folder with case.json and "
                                    f"case.npz; `python -m minimaml.doctor export DIR` writes some)")
    try:
        spec = json.loads((directory / "case.json").read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"doctor: {directory / 'case.json'} is not valid JSON: {error}") from None
    with numpy.load(directory / "case.npz") as npz:
        arrays = {n: npz[n] for n in npz.files}
    return check_case(spec, arrays, str(directory))


def save_case(directory, case: Case) -> None:
    """Write ``case.json`` and ``case.npz`` into a new (or empty) ``directory``."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"doctor: {directory} exists and is not empty: export writes only new folders")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "case.json").write_text(json.dumps(case.spec, indent=2) + "\n")
    numpy.savez(directory / "case.npz", **case.arrays)
