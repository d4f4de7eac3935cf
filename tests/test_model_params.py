"""Parameters passed as a list instead of a dict of named arrays: the models and MAML refuse them with
a TypeError that says so (they used to fail deep inside, e.g. NumPy's "truth value ... is ambiguous")."""

import numpy
import pytest

from minimaml import autodiff as ad
from minimaml import backend, maml
from minimaml.nn import mlp
from minimaml.nn.conv4 import omniglot_conv4, omniglot_mlp
from minimaml.tasks.batch import Examples, TaskBatch


def test_mlp_apply_refuses_a_list_of_params():
    params = mlp.init(backend.rng(0))
    with pytest.raises(TypeError, match="mlp.apply: params must be a dict of named arrays.*got a list"):
        mlp.apply(list(params.values()), numpy.ones((3, 1), numpy.float32))


@pytest.mark.parametrize("model, x_shape", [(omniglot_conv4(), (2, 28, 28, 1)), (omniglot_mlp(), (2, 784))])
def test_classifiers_refuse_a_list_of_params(model, x_shape):
    params = model.init(backend.rng(0), n_way=5)
    with pytest.raises(TypeError, match=rf"{type(model).__name__}.apply: params must be a dict.*got a list"):
        model.apply(list(params.values()), numpy.ones(x_shape, numpy.float32))


def test_maml_refuses_a_list_of_params():
    params = mlp.init(backend.rng(0))
    examples = Examples(numpy.ones((2, 3, 1), numpy.float32), numpy.ones((2, 3, 1), numpy.float32))
    task_loss = maml.supervised_loss(mlp.apply, ad.mse)
    with pytest.raises(TypeError, match="meta_gradient: params must be a non-empty dict"):
        maml.meta_gradient(task_loss, list(params.values()), TaskBatch(examples, examples), 0.01, 1)
    with pytest.raises(TypeError, match="maml: params must be a dict of named arrays.*got a list"):
        maml.adapt(task_loss, list(params.values()), examples, 0.01, 1, inner_param_names=list(params))
