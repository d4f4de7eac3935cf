"""The tape: a ``Tensor`` that remembers how it was computed, and the reverse pass over that record.

Every operation (in ``ops.py`` and ``nnops.py``) computes its result on raw arrays and, when gradients
are being recorded, returns a Tensor that holds

- ``parents``: the input Tensors, and
- ``vjp``: a function from the output's cotangent ``g`` to one cotangent per parent
  (``None`` for a parent that needs no gradient), written with the tape's own operations.

Because ``vjp`` uses tape operations, running the reverse pass while recording (``create_graph=True``)
records the reverse pass itself, so a gradient is again a differentiable function of the inputs:
that is how second-order MAML, Hessian-vector products and third-order checks come out of one tape.

There is no global tape object: the graph is the web of ``parents`` links, and it is freed by Python's
reference counting as soon as the output is dropped (closures never refer to their own output, so the
graph has no reference cycles).
"""

from __future__ import annotations

import contextlib
import itertools

from .. import backend

_creation_order = itertools.count()  # every Tensor is numbered as it is made (see ``_nodes_between``)

_recording = True  # False inside ``no_grad()``: operations then record nothing


@contextlib.contextmanager
def no_grad():
    """Within this block operations record nothing (their results have no parents)."""
    global _recording
    previous, _recording = _recording, False
    try:
        yield
    finally:
        _recording = previous


@contextlib.contextmanager
def _recording_if(flag: bool):
    global _recording
    previous, _recording = _recording, flag
    try:
        yield
    finally:
        _recording = previous


def is_recording() -> bool:
    return _recording


class Tensor:
    """An array plus, when it was computed from tensors that need gradients, how it was computed.

    ``data``: the NumPy or CuPy array. ``requires_grad``: whether gradients flow to this tensor.
    ``parents`` and ``vjp``: set by operations (see the module docstring); empty for leaves and constants.
    """

    __slots__ = ("data", "requires_grad", "parents", "vjp", "index", "__weakref__")
    __array_priority__ = 1000  # make ``ndarray + Tensor`` call Tensor.__radd__

    def __init__(self, data, requires_grad: bool = False, parents: tuple = (), vjp=None):
        if isinstance(data, Tensor):
            raise TypeError("Tensor(data): data is already a Tensor; use it directly or .detach() it")
        if not hasattr(data, "dtype"):
            data = backend.xp().asarray(data)
        self.data = data
        self.requires_grad = requires_grad
        self.parents = parents
        self.vjp = vjp
        self.index = next(_creation_order)

    # --- array-like properties -------------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        flag = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({self.data!r}{flag})"

    def item(self) -> float:
        return self.data.item()

    def numpy(self):
        """A host NumPy copy of the data."""
        return backend.to_numpy(self.data)

    def detach(self) -> "Tensor":
        """The same values as a constant: gradients do not flow through it."""
        return Tensor(self.data)


def _result(data, requires_grad: bool = False, parents: tuple = (), vjp=None) -> Tensor:
    """A Tensor around an operation's result array, without ``__init__``'s input checks (the hot path:
    a meta-step creates hundreds of these)."""
    t = Tensor.__new__(Tensor)
    t.data, t.requires_grad, t.parents, t.vjp = data, requires_grad, parents, vjp
    t.index = next(_creation_order)
    return t


def record(data, parents: tuple, vjp) -> Tensor:
    """The result of an operation: a recorded node if any parent needs a gradient, else a constant."""
    if _recording:
        for parent in parents:
            if parent.requires_grad:
                return _result(data, True, parents, vjp)
    return _result(data)


def _nodes_between(output: Tensor, inputs) -> list:
    """The recorded nodes on some path from ``inputs`` to ``output``, parents before children.

    An iterative depth-first search (graphs of many inner steps are deep): a node is settled once its
    parents are, and kept when it is one of the inputs or one of its parents was kept. A node made
    before the oldest input cannot depend on any input, so the search never goes past it: the inner
    gradient of MAML's step k then visits step k's graph, not the k - 1 steps recorded before it.
    (Tensors are dict keys and set members by identity: ``Tensor`` defines no ``==``.)
    """
    inputs = set(inputs)
    oldest = min(x.index for x in inputs)
    kept = {}  # node -> whether it lies on a path from an input
    order = []
    stack = [output]
    while stack:
        node = stack[-1]
        if node in kept:
            stack.pop()
            continue
        waiting = False
        for parent in node.parents:
            if parent.requires_grad and parent.index >= oldest and parent not in kept:
                stack.append(parent)
                waiting = True
        if waiting:
            continue
        stack.pop()
        keep = node in inputs
        if not keep:
            for parent in node.parents:
                if kept.get(parent):
                    keep = True
                    break
        kept[node] = keep
        if keep:
            order.append(node)
    return order


def grad(output: Tensor, inputs, create_graph: bool = False) -> list:
    """Gradients of the scalar ``output`` with respect to each tensor in ``inputs``.

    Reverse accumulation: visit the recorded nodes from ``output`` back towards ``inputs``; each node
    hands its cotangent to its parents through its ``vjp``, and cotangents arriving at the same tensor
    from several uses are summed. The walk stops at an input unless another input lies behind it (MAML's
    inner gradient stops at the adapted parameters, not at what they were computed from). With
    ``create_graph=True`` that pass is recorded, so the returned gradients can be differentiated again;
    otherwise they are constants. An input that ``output`` does not depend on gets a zero gradient.
    """
    inputs = list(inputs)
    for i, x in enumerate(inputs):
        if not isinstance(x, Tensor):
            raise TypeError(f"grad: inputs[{i}] is a {type(x).__name__}, expected a Tensor")
        if not x.requires_grad:
            raise ValueError(f"grad: inputs[{i}] (shape {x.shape}) does not require grad")
    if not isinstance(output, Tensor):
        raise TypeError(f"grad: output is a {type(output).__name__}, expected a Tensor")
    if output.size != 1:
        raise ValueError(f"grad: output must be a scalar, got shape {output.shape}")

    xp = backend.array_namespace(output.data)
    cotangents = {output: Tensor(xp.ones_like(output.data))}  # node -> the sum of the cotangents it received
    wanted = set(inputs)
    results = {}
    order = _nodes_between(output, inputs)
    on_a_path = set(order)
    with _recording_if(create_graph):
        for node in reversed(order):
            g = cotangents.pop(node, None)
            if g is None:
                continue
            if node in wanted:
                results[node] = g
                if not any(parent in on_a_path for parent in node.parents):
                    continue  # no input behind this one: its cotangent goes no further
            for parent, parent_g in zip(node.parents, node.vjp(g)):
                if parent_g is not None:
                    previous = cotangents.get(parent)
                    cotangents[parent] = parent_g if previous is None else previous + parent_g
    out = []
    for x in inputs:
        g = results.get(x)
        out.append(g if g is not None else Tensor(backend.array_namespace(x.data).zeros_like(x.data)))
    return out
