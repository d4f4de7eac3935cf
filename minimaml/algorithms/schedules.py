"""Learning-rate schedules for the outer step: Reptile's linear annealing of epsilon and MAML++'s
cosine annealing of the meta-learning rate, as an optimizer whose step size follows the step counter."""

from __future__ import annotations

import math

import numpy


def linear(start: float, final: float, n_steps: int):
    """lr(t) = start + (final - start) t / n_steps, t = 0, 1, ... (Reptile's ``--meta-step``,
    ``--meta-step-final``: the authors anneal epsilon linearly over the training iterations)."""
    if n_steps < 1:
        raise ValueError(f"schedules.linear: n_steps must be >= 1, got {n_steps}")
    return lambda t: start + (final - start) * min(t, n_steps) / n_steps


def cosine(start: float, final: float, n_steps: int):
    """lr(t) = final + (start - final) (1 + cos(pi t / n_steps)) / 2 (MAML++'s cosine annealing,
    Loshchilov & Hutter's SGDR without restarts)."""
    if n_steps < 1:
        raise ValueError(f"schedules.cosine: n_steps must be >= 1, got {n_steps}")
    return lambda t: final + (start - final) * (1 + math.cos(math.pi * min(t, n_steps) / n_steps)) / 2


class Scheduled:
    """``make_optimizer(lr)`` (e.g. ``optim.Adam``) with ``lr = schedule(t)`` at the t-th update
    (t = 0, 1, ...: the optimizer state's ``step``); the state is the wrapped optimizer's."""

    def __init__(self, make_optimizer, schedule):
        self.make_optimizer, self.schedule = make_optimizer, schedule
        self.lr = schedule(0)

    def init(self, params: dict) -> dict:
        return self.make_optimizer(self.schedule(0)).init(params)

    def update(self, params: dict, grads: dict, state: dict) -> tuple:
        lr = self.schedule(int(state["step"]))
        if lr <= 0:  # the end of a schedule annealed to 0: no step, but the counter moves on
            params, state = dict(params), {**state, "step": numpy.asarray(int(state["step"]) + 1, dtype=numpy.int64)}
            return params, state
        return self.make_optimizer(lr).update(params, grads, state)
