"""The check: a user's meta-gradient against the exact one, per parameter and overall, a verdict that
knows the precision it was computed in, and a diagnosis naming the classic mistake it matches.

Relative error: ||g - g*|| / ||g*|| (2-norms; per parameter, or over all of them at once).

The precision floor of a case (``precision_floor``) is how close an honest gradient in that precision
can be expected to come, measured on the case itself rather than guessed: the larger of (a) the exact
gradient's own change when every parameter and input is perturbed by that precision's unit roundoff
(relative noise 2^-24 for float32, 2^-53 for float64, two seeds) and (b) minimaml's own result computed in
that precision against the float64 one; times 10, and at least 100 unit roundoffs. ReLU kinks are what
make (a) large on a conv net: a rounding that moves a pre-activation across zero switches a path.

The diagnosis compares the user's gradient with the exact gradient of each mistake (``gradients``) and
with the exact gradient whose square weights are transposed (a layout slip the shapes cannot catch), each
also at its best constant scale c = <g, m> / <m, m> (a mean instead of a sum over T tasks is c = 1/T), and
names the best; one matches when its error is within the floor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy

from . import gradients

UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "float64": 2.0 ** -53}


def _norm(vector) -> float:
    """The 2-norm, scaled first so that huge entries (a diverging mistake's) do not overflow."""
    largest = numpy.max(numpy.abs(vector), initial=0.0)
    return float(largest * numpy.sqrt(numpy.sum((vector / largest) ** 2))) if 0 < largest < numpy.inf else largest


def relative_error(grads: dict, exact: dict, names=None) -> float:
    """||g - g*|| / ||g*|| over ``names`` (default all of ``exact``); ||g - g*|| when g* is 0."""
    names = list(exact) if names is None else names
    user = numpy.concatenate([numpy.ravel(numpy.asarray(grads[n], numpy.float64)) for n in names])
    reference = numpy.concatenate([numpy.ravel(numpy.asarray(exact[n], numpy.float64)) for n in names])
    with numpy.errstate(invalid="ignore"):  # inf - inf: NaN, reported as such
        difference, norm = _norm(user - reference), _norm(reference)
    return difference / norm if norm > 0 else difference


def _perturbed(case, unit: float, seed: int):
    rng = numpy.random.default_rng(seed)
    arrays = {n: a * (1 + unit * rng.standard_normal(a.shape)) if a.dtype.kind == "f" and not n.endswith(".mask")
              else a for n, a in case.arrays.items()}
    return type(case)(case.spec, arrays)


def precision_floor(case, dtype: str, exact: dict = None) -> float:
    """The relative error an honest ``dtype`` ("float32" or "float64") meta-gradient can reach on ``case``
    (module docstring). ``exact``: the float64 reference, if already computed."""
    case64 = case.astype(numpy.float64)
    exact = gradients.reference(case64)[1] if exact is None else exact
    unit = UNIT_ROUNDOFF[dtype]
    measured = [relative_error(gradients.reference(_perturbed(case64, unit, seed))[1], exact) for seed in (1, 2)]
    if dtype == "float32":
        measured.append(relative_error(gradients.reference(case.astype(numpy.float32))[1], exact))
    return max(10 * max(measured), 100 * unit)


@dataclass
class Candidate:
    """One explanation of the user's gradient: a mistake (or none), the constant ``scale`` it is taken
    at, and the relative ``error`` that leaves."""

    key: str
    cause: str
    error: float
    scale: float = 1.0

    def label(self, n_tasks: int) -> str:
        name = "no mistake (the exact meta-gradient)" if self.key == "exact" else self.key
        if self.scale == 1.0:
            return name
        return f"{name}, times {self.scale:.6g}{scale_hint(self.scale, n_tasks)}"


def scale_hint(scale: float, n_tasks: int) -> str:
    if abs(scale * n_tasks - 1) < 1e-3:
        return f" (= 1/{n_tasks}: the mean over the {n_tasks} tasks instead of the sum)"
    if abs(scale / n_tasks - 1) < 1e-3:
        return f" (= {n_tasks}: the sum over the {n_tasks} tasks instead of the mean)"
    return " (a constant factor)"


def _candidate(key: str, cause: str, grads: dict, candidate: dict, floor: float) -> Candidate:
    """The candidate at scale 1, or at its best scale when that is clearly not 1 and fits better."""
    unscaled = relative_error(grads, candidate)
    flat_user = numpy.concatenate([numpy.ravel(numpy.asarray(grads[n], numpy.float64)) for n in candidate])
    flat = numpy.concatenate([numpy.ravel(candidate[n]) for n in candidate])
    largest = numpy.max(numpy.abs(flat), initial=0.0)
    unit = flat / largest if largest > 0 else flat  # scaled, so that a diverging mistake's numbers cannot overflow
    scale = float(flat_user @ unit) / float(unit @ unit) / largest if largest > 0 else 1.0
    scaled = relative_error(grads, {n: scale * g for n, g in candidate.items()}) if scale else unscaled
    if abs(scale - 1) > 10 * floor and scaled < unscaled:
        return Candidate(key, cause, scaled, scale)
    return Candidate(key, cause, numpy.inf if numpy.isnan(unscaled) else unscaled)  # NaN sorts last


@dataclass
class Report:
    """What ``check`` found; ``str(report)`` is the text the command prints."""

    case: str
    dtype: str
    n_tasks: int
    floor: float
    overall: float
    per_parameter: dict
    candidates: list = field(default_factory=list)
    not_finite: list = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return self.overall <= self.floor

    @property
    def match(self):
        """The best candidate if it is within the floor, else None."""
        best = self.candidates[0] if self.candidates else None
        return best if best is not None and best.error <= self.floor else None

    def shown(self, error: float) -> str:
        """An error as printed: below the floor, only that (the digits there are rounding)."""
        return f"{error:.3e}" if error > self.floor else f"< {self.floor:.0e}"

    def __str__(self) -> str:
        lines = [f"case {self.case}: your meta-gradient is {self.dtype}; an exact {self.dtype} gradient reaches a "
                 f"relative error of about {self.floor:.0e} here",
                 f"{'parameter':<24} relative error"]
        lines += [f"{name:<24} {self.shown(error)}" for name, error in self.per_parameter.items()]
        lines.append(f"{'overall':<24} {self.shown(self.overall)}")
        if self.exact:
            lines.append(f"verdict: EXACT to {self.dtype} precision.")
            return "\n".join(lines)
        if self.not_finite:
            lines.append(f"verdict: WRONG: your gradient has NaN or infinite entries in {self.not_finite}; an inner "
                         f"loop that diverges in your code would do that. No diagnosis without finite numbers.")
            return "\n".join(lines)
        lines.append(f"verdict: WRONG: {self.overall:.1e} is above the {self.dtype} floor {self.floor:.0e}.")
        lines.append("diagnosis: the exact meta-gradient of each classic mistake against yours, best first:")
        lines += [f"  {self.shown(c.error):>9}  {c.label(self.n_tasks)}" for c in self.candidates]
        match = self.match
        if match is None:
            lines.append("none matches: your gradient is none of these mistakes (nor a constant multiple of one); "
                         "check the case's description (case.json) against your code.")
        elif match.key == "exact":
            lines.append(f"it matches the exact meta-gradient times {match.scale:.6g}"
                         f"{scale_hint(match.scale, self.n_tasks)}: check how you reduce over the tasks.")
        else:
            lines.append(f"it matches: {match.label(self.n_tasks)}. Likely cause: {match.cause}.")
        return "\n".join(lines)


def check_names(case, grads: dict) -> str:
    """The gradient's precision ("float32" or "float64"), after refusing missing, unknown or misshapen arrays."""
    missing = [n for n in case.meta_names if n not in grads]
    unknown = [n for n in grads if n not in case.meta_names]
    if missing or unknown:
        raise ValueError(f"doctor: the gradient must have one array per name of case.json; missing {missing}, "
                         f"unknown {unknown}")
    for n in case.meta_names:
        if tuple(numpy.shape(grads[n])) != case.arrays[n].shape:
            raise ValueError(f"doctor: the gradient of {n} has shape {numpy.shape(grads[n])}, the parameter "
                             f"{case.arrays[n].shape} (layouts: case.json)")
    dtypes = {numpy.asarray(g).dtype for g in grads.values()}
    if not all(d.kind == "f" and d.itemsize in (4, 8) for d in dtypes):
        raise ValueError(f"doctor: the gradient's arrays must be float32 or float64, got {sorted(map(str, dtypes))}")
    return "float32" if any(d.itemsize == 4 for d in dtypes) else "float64"


def check(case, grads: dict, exact: dict = None, floor: float = None, variants: dict = None) -> Report:
    """Compare ``grads`` (name -> array) with ``case``'s exact meta-gradient; diagnose when they differ.
    ``exact``, ``floor`` and ``variants`` (``mistake_table``) may be given when already computed."""
    dtype = check_names(case, grads)
    case64 = case.astype(numpy.float64)
    exact = gradients.reference(case64)[1] if exact is None else exact
    floor = precision_floor(case64, dtype, exact) if floor is None else floor
    report = Report(case.name, dtype, case.n_tasks, floor, relative_error(grads, exact),
                    {n: relative_error(grads, exact, [n]) for n in case.meta_names})
    report.not_finite = [n for n in case.meta_names if not numpy.isfinite(grads[n]).all()]
    if report.exact or report.not_finite:
        return report
    variants = mistake_table(case64) if variants is None else variants
    report.candidates = [_candidate("exact", "no mistake: the exact meta-gradient", grads, exact, floor)]
    report.candidates += [_candidate(m.key, m.cause, grads, g, floor) for m, g in variants.values()]
    square = [n for n in case.meta_names if exact[n].ndim == 2 and exact[n].shape[0] == exact[n].shape[1]]
    if square:  # a transposed gradient of a square weight has the right shape: its layout is the only sign
        transposed = {n: g.T if n in square else g for n, g in exact.items()}
        report.candidates.append(_candidate(
            "square weights transposed", f"the gradients of {', '.join(square)} in PyTorch's (out, in) layout: "
            f"case.json stores linear weights (in, out), so save weight.grad.T", grads, transposed, floor))
    report.candidates.sort(key=lambda c: c.error)
    return report


def mistake_table(case) -> dict:
    """{key: (Mistake, its exact meta-gradient)} for every mistake that fits ``case`` (float64), leaving out
    any whose gradient is not finite (an inner loop the mistake makes diverge) or cannot be had exactly
    (iMAML's solve not converging on the mistaken problem)."""
    table = {}
    with numpy.errstate(over="ignore", invalid="ignore"):
        for mistake in gradients.mistakes(case):
            try:
                grads = gradients.mistake_gradient(case, mistake)
            except gradients.NoExactReference:
                continue
            if all(numpy.isfinite(g).all() for g in grads.values()):
                table[mistake.key] = (mistake, grads)
    return table
