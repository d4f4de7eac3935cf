"""The GPU side of the primitives' device branches, run on the CPU.

Where an array is a CuPy array, the conv and batch-norm primitives make one block per pass and batched
products go to a single ``@``; on NumPy they run in cache-sized blocks shared out over threads. CI has
no GPU, so here NumPy stands in for CuPy (``backend._cupy`` points at a copy of the ``numpy``
namespace): every ``backend.is_gpu_array`` test then takes its GPU side, and the meta-gradients must
equal those of the CPU path. The ``gpu``-marked tests are the checks on real CuPy.
"""

import types

import numpy as np
import pytest

from minimaml import autodiff as ad
from minimaml import backend, maml, parallel
from minimaml.autodiff import kernels
from minimaml.nn.conv4 import miniimagenet_conv4, omniglot_conv4


def numpy_standing_in_for_cupy() -> types.ModuleType:
    """A module with NumPy's namespace and CuPy's ``asnumpy``: set as ``backend._cupy``, it makes every
    NumPy array count as a GPU array."""
    stand_in = types.ModuleType("numpy_standing_in_for_cupy")
    stand_in.__dict__.update({name: getattr(np, name) for name in dir(np) if not name.startswith("__")})
    stand_in.asnumpy = np.asarray
    return stand_in


NETS = {"omniglot": omniglot_conv4(image_size=12, filters=6, features="flatten"),
        "miniimagenet": miniimagenet_conv4(image_size=20, filters=5)}


@pytest.mark.parametrize("mode", ["second_order", "first_order"])
@pytest.mark.parametrize("net", list(NETS))
def test_gpu_branches_give_the_cpu_meta_gradient(monkeypatch, net, mode):
    """A Conv4 meta-gradient (3 tasks, 5-way 1-shot, 2 inner steps, float64) through the GPU branches
    equals the CPU path's, which runs its passes in several blocks on two threads."""
    model = NETS[net]
    monkeypatch.setenv("MINIMAML_THREADS", "2")
    monkeypatch.setattr(kernels, "BLOCK_BYTES_CONV", 1 << 10)  # several blocks per pass on the CPU path
    monkeypatch.setattr(kernels, "BLOCK_BYTES", 1 << 10)
    monkeypatch.setattr(parallel, "SHARE_MIN_BYTES", 0)
    rng = np.random.default_rng(0)
    params = model.init(rng, 5, np.float64)
    size, channels = model.image_size, model.in_channels
    tasks = maml.TaskBatch(
        maml.Examples(rng.standard_normal((3, 5, size, size, channels)), np.tile(np.arange(5), (3, 1))),
        maml.Examples(rng.standard_normal((3, 10, size, size, channels)), np.tile(np.arange(5), (3, 2))))
    task_loss = maml.supervised_loss(model.apply, ad.softmax_cross_entropy)

    def meta_gradient():
        return maml.meta_gradient(task_loss, params, tasks, 0.1, 2, mode=mode)

    cpu_loss, cpu_grads, _ = meta_gradient()
    monkeypatch.setattr(backend, "_cupy", numpy_standing_in_for_cupy())
    geometry = kernels.Geometry(3, 3, 1, ((1, 1), (1, 1)), (size, size))
    assert len(kernels.conv_blocks(tasks.query.x, channels, geometry).pieces) == 1  # the GPU side: one block
    gpu_loss, gpu_grads, _ = meta_gradient()
    np.testing.assert_allclose(gpu_loss, cpu_loss, rtol=1e-13)
    for name in cpu_grads:
        np.testing.assert_allclose(gpu_grads[name], cpu_grads[name], rtol=1e-10, atol=1e-13, err_msg=name)
