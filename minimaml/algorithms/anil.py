"""ANIL, Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals, ICLR 2020, "Rapid Learning or Feature
Reuse?"): MAML with only the head adapted in the inner loop,

    head_i = head - alpha grad_head L_{S_i}(body, head)   (K steps),   L = sum_i L_{Q_i}(body, head_i),

the body (every other parameter) meta-learned through the query loss and the inner gradients but never
adapted. It is ``maml.meta_gradient`` with ``inner_param_names`` = the head's names.
"""

from __future__ import annotations

from .maml import MAML


def head_names(params: dict) -> list:
    """The head: ``head.*`` of the conv and batch-norm MLP classifiers (``nn.conv4``), else the last
    ``layer{i}.*`` of ``nn.mlp``."""
    head = [n for n in params if n.startswith("head.")]
    if head:
        return head
    layers = [int(n[len("layer"):].split(".")[0]) for n in params if n.startswith("layer") and n.endswith(".w")]
    if not layers:
        raise KeyError(f"anil: no head among the parameters {list(params)}: expected head.* or layer{{i}}.*")
    return [n for n in params if n.startswith(f"layer{max(layers)}.")]


class ANIL(MAML):
    """MAML adapting only the head, ``head_names(params)``."""

    name = "anil"

    def __init__(self, inner_lr: float, inner_steps: int, *, mode: str = "second_order"):
        super().__init__(inner_lr, inner_steps, mode=mode)

    def adapted_names(self, params: dict) -> list:
        return head_names(params)
