"""Optimizers over parameter dicts ``dict[str, array]``: plain SGD and Adam.

Functional API, shared by both::

    state = opt.init(params)
    params, state = opt.update(params, grads, state)

``update`` returns new dicts and new arrays; its inputs are never modified. The state is a flat
``dict[str, array]`` (keys such as ``"step"``, ``"m/layer0.w"``, ``"v/layer0.w"``), so a checkpoint
can store it in an ``.npz`` file without pickle. Arrays may be NumPy or CuPy (each update runs in the
namespace of its parameter) and keep their dtype: a gradient of another dtype is cast to the
parameter's dtype, never the other way round.

``clip_value=c`` clips every gradient entry to ``[-c, c]`` before the update (the authors' code,
cbfinn/maml ``maml.py``, clips the MiniImagenet meta-gradients to ``[-10, 10]``).
"""

from __future__ import annotations

import numpy

from minimaml.backend import array_namespace


class Optimizer:
    """Shared by SGD and Adam: gradient checking, clipping and the step counter."""

    def __init__(self, lr: float, clip_value: float | None = None):
        if not lr > 0:
            raise ValueError(f"{type(self).__name__}: learning rate must be positive, got {lr}")
        if clip_value is not None and not clip_value > 0:
            raise ValueError(f"{type(self).__name__}: clip_value must be positive or None, got {clip_value}")
        self.lr = float(lr)
        self.clip_value = None if clip_value is None else float(clip_value)

    def init(self, params: dict) -> dict:
        """The initial state: ``{"step": 0}`` (a host int64 scalar array)."""
        return {"step": numpy.asarray(0, dtype=numpy.int64)}

    def _prepared_grads(self, params: dict, grads: dict) -> dict:
        """``grads`` checked against ``params`` (same keys and shapes), cast to the parameters'
        dtypes and clipped to ``[-clip_value, clip_value]`` when clipping is on."""
        name = type(self).__name__
        missing = sorted(set(params) - set(grads))
        extra = sorted(set(grads) - set(params))
        if missing:
            raise KeyError(f"{name}.update: grads lack parameter(s) {missing}")
        if extra:
            raise KeyError(f"{name}.update: grads have key(s) {extra} that are not parameters")
        prepared = {}
        for key, p in params.items():
            g = grads[key]
            if g.shape != p.shape:
                raise ValueError(
                    f"{name}.update: gradient of {key!r} has shape {tuple(g.shape)}, "
                    f"parameter has shape {tuple(p.shape)}"
                )
            xp = array_namespace(p)
            g = xp.asarray(g, dtype=p.dtype)
            if self.clip_value is not None:
                g = xp.clip(g, -self.clip_value, self.clip_value)
            prepared[key] = g
        return prepared

    @staticmethod
    def _next_step(state: dict) -> numpy.ndarray:
        return numpy.asarray(int(state["step"]) + 1, dtype=numpy.int64)


class SGD(Optimizer):
    """Plain gradient descent: ``theta <- theta - lr * g``."""

    def update(self, params: dict, grads: dict, state: dict) -> tuple[dict, dict]:
        grads = self._prepared_grads(params, grads)
        new_params = {key: p - self.lr * grads[key] for key, p in params.items()}
        return new_params, {"step": self._next_step(state)}


class Adam(Optimizer):
    """Adam (Kingma & Ba, 2015) with bias correction; at step ``t = 1, 2, ...``::

        m <- b1 m + (1 - b1) g            v <- b2 v + (1 - b2) g^2
        m_hat = m / (1 - b1^t)            v_hat = v / (1 - b2^t)
        theta <- theta - lr * m_hat / (sqrt(v_hat) + eps)

    This is PyTorch's form. TensorFlow's ``AdamOptimizer`` (the authors' code) adds ``eps`` to
    ``sqrt(v)`` before the bias correction, i.e. uses ``eps * sqrt(1 - b2^t)``; with ``eps = 1e-8``
    the two differ only while ``sqrt(v_hat)`` is of order ``eps``.
    """

    def __init__(self, lr: float = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                 clip_value: float | None = None):
        super().__init__(lr, clip_value)
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"Adam: b1 and b2 must lie in [0, 1), got b1={b1}, b2={b2}")
        if not eps > 0:
            raise ValueError(f"Adam: eps must be positive, got {eps}")
        self.b1, self.b2, self.eps = float(b1), float(b2), float(eps)

    def init(self, params: dict) -> dict:
        """``step = 0`` and zero moments ``m/<name>``, ``v/<name>`` shaped like each parameter."""
        state = super().init(params)
        for key, p in params.items():
            xp = array_namespace(p)
            state[f"m/{key}"] = xp.zeros_like(p)
            state[f"v/{key}"] = xp.zeros_like(p)
        return state

    def update(self, params: dict, grads: dict, state: dict) -> tuple[dict, dict]:
        grads = self._prepared_grads(params, grads)
        for key in params:
            for moment in ("m", "v"):
                if f"{moment}/{key}" not in state:
                    raise KeyError(f"Adam.update: state lacks {moment}/{key!r}; was it made by Adam.init "
                                   f"for these parameters?")
        step = self._next_step(state)
        t = int(step)
        m_scale = 1.0 / (1.0 - self.b1**t)
        v_scale = 1.0 / (1.0 - self.b2**t)
        new_params, new_state = {}, {"step": step}
        for key, p in params.items():
            xp = array_namespace(p)
            g = grads[key]
            m = self.b1 * state[f"m/{key}"] + (1.0 - self.b1) * g
            v = self.b2 * state[f"v/{key}"] + (1.0 - self.b2) * (g * g)
            new_params[key] = p - self.lr * (m * m_scale) / (xp.sqrt(v * v_scale) + self.eps)
            new_state[f"m/{key}"] = m
            new_state[f"v/{key}"] = v
        return new_params, new_state
