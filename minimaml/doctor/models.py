"""The architectures the doctor knows, as ``case.json`` describes them, and their task losses.

Three families (``model.family``), each a forward pass built from ``nn.layers`` (the layers MAML's
experiments use), with any leading task axis on the parameters (``nn.layers``' convention):

- ``"mlp"``: ``layer{i}.w (in, out)``, ``layer{i}.b (out,)``; y = x w + b, ``activation`` between layers.
- ``"conv_bn"``: blocks ``conv{i}.w (kh, kw, C_in, C_out)`` [+ ``conv{i}.b``] -> batch norm
  (``conv{i}.bn.scale``, ``conv{i}.bn.shift``) -> ReLU [-> 2x2 max-pool], then the features (``flatten``
  in (H, W, C) order, or the spatial ``mean``) -> ``head.w (features, n_way)``, ``head.b``. Batch norm in
  training mode: the statistics of each forward call, per task, over (N, H, W), biased variance.
- ``"gaussian_policy"``: the ``mlp`` family for the mean action plus ``log_std (act_dim,)``.

The task losses (``loss``): ``"mse"`` (mean over examples and outputs), ``"cross_entropy"`` (mean over
examples) and ``"reinforce"`` (``rl.reinforce``: -sum m log pi(a|s) A / sum m).

``batch_norm`` other than ``"batch"`` builds the forward pass of a classic mistake: ``"constant"``, batch
norm whose batch mean and variance are constants (no derivative flows through them); ``"running"``,
batch norm in evaluation mode with fresh running statistics (mean 0, variance 1, PyTorch's initial ones).
"""

from __future__ import annotations

from .. import autodiff as ad
from .. import maml
from ..nn import layers
from ..nn import policy as gaussian
from ..rl import reinforce

FAMILIES = ("mlp", "conv_bn", "gaussian_policy")
ACTIVATIONS = {"relu": ad.relu, "tanh": ad.tanh, "sigmoid": ad.sigmoid}
LOSSES = {"mlp": ("mse", "cross_entropy"), "conv_bn": ("cross_entropy", "mse"), "gaussian_policy": ("reinforce",)}


def mlp_forward(params: dict, x, activation: str = "relu"):
    """y = W_L act(... act(x W_0 + b_0) ...) + b_L for ``x: (*task, ..., in)``."""
    n_layers = sum(1 for n in params if n.startswith("layer") and n.endswith(".w"))
    h = x
    for i in range(n_layers):
        h = layers.linear(h, params[f"layer{i}.w"], params[f"layer{i}.b"])
        if i < n_layers - 1:
            h = ACTIVATIONS[activation](h)
    return h


def _per_channel(param, like):
    """A per-channel parameter ``(*task, C)`` shaped to broadcast against ``like: (*task, N, H, W, C)``."""
    param = ad.as_tensor(param)
    return ad.reshape(param, param.shape[:-1] + (1,) * (like.ndim - param.ndim) + param.shape[-1:])


def batch_norm_fixed_statistics(h, scale, shift, eps: float, statistics: str):
    """The mistakes: scale (h - mean) / sqrt(var + eps) + shift, then ReLU, with the mean and variance
    constants: the batch's (per task, over N, H, W; ``"constant"``) or fresh running ones, 0 and 1
    (``"running"``). No derivative flows through them."""
    axes = tuple(range(h.ndim - 4, h.ndim - 1))
    if statistics == "running":
        y = h * (1 / (1 + eps) ** 0.5)
    else:
        mean = h.data.mean(axis=axes, keepdims=True)
        inverse_std = 1 / (h.data.var(axis=axes, keepdims=True) + eps) ** 0.5
        y = (h - ad.Tensor(mean)) * ad.Tensor(inverse_std)
    if scale is not None:
        y = y * _per_channel(scale, h)
    return ad.relu(y + _per_channel(shift, h))


def conv_bn_forward(params: dict, x, model: dict, batch_norm: str = "batch"):
    """Logits ``(*task, N, n_way)`` of images ``x: (*task, N, H, W, C)`` (``model``: the case's settings)."""
    n_blocks = sum(1 for n in params if n.startswith("conv") and n.endswith(".w"))
    h = ad.as_tensor(x)
    for i in range(n_blocks):
        h = layers.conv2d(h, params[f"conv{i}.w"], params.get(f"conv{i}.b"), model["stride"], model["padding"])
        scale, shift = params.get(f"conv{i}.bn.scale"), params[f"conv{i}.bn.shift"]
        if batch_norm != "batch":
            h = batch_norm_fixed_statistics(h, scale, shift, model["bn_eps"], batch_norm)
        else:
            h = layers.batch_norm(h, scale, shift, model["bn_eps"], relu=True)
        if model["max_pool"]:
            h = layers.max_pool2x2(h)
    h = ad.mean(h, axis=(-3, -2)) if model["features"] == "mean" else layers.flatten(h, keep=h.ndim - 3)
    return layers.linear(h, params["head.w"], params["head.b"])


def policy_loss(activation: str):
    """The REINFORCE task loss of a Gaussian MLP policy with ``activation``: per task
    -sum_{b,t} m log N(a; mean(s), exp(log_std)^2) A / sum_{b,t} m."""
    def task_loss(params, data):
        weights = {n: p for n, p in params.items() if n != "log_std"}
        mean = mlp_forward(weights, data.obs, activation)
        log_prob = gaussian.gaussian_log_prob(mean, ad.as_tensor(params["log_std"]), ad.as_tensor(data.actions))
        return -reinforce.masked_task_mean(log_prob * data.advantages, data.mask)
    return task_loss


def task_loss(model: dict, loss: str, batch_norm: str = "batch"):
    """``task_loss(params, data) -> (T,)`` of a case's ``model`` settings and ``loss`` name (``batch_norm``:
    the module docstring)."""
    family = model["family"]
    if family == "gaussian_policy":
        return policy_loss(model["activation"])
    if family == "mlp":
        def forward(params, x):
            return mlp_forward(params, x, model["activation"])
    else:
        def forward(params, x):
            return conv_bn_forward(params, x, model, batch_norm)
    return maml.supervised_loss(forward, ad.mse if loss == "mse" else ad.softmax_cross_entropy)
