"""The doctor's own cases: small, seeded, float64, each ``case.json`` spelling out every array's layout
and its conversion to PyTorch's and JAX's usual layouts (``export`` writes them).

=====================  ==========================================================================
case                   what is differentiated
=====================  ==========================================================================
``mlp_1step``          MAML, MLP 1-12-12-1 (ReLU), sinusoid regression, MSE, 1 inner step
``mlp_3steps``         the same with 3 inner steps
``conv_bn``            MAML, 3 x (conv 3x3 -> batch norm (training mode) -> ReLU -> max-pool) + linear
                       head, 3-way 1-shot 8x8 images, cross-entropy, 1 step
``policy_reinforce``   MAML-RL's REINFORCE inner step, Gaussian MLP policy 2-8-8-2, mean over tasks
``anil``               ANIL: only the head adapted, 2 steps
``meta_sgd``           Meta-SGD: a learned rate per parameter entry
``maml_pp``            MAML++: per-layer per-step rates, multi-step loss, 3 steps
``imaml``              iMAML: proximal inner problem, implicit gradient (tanh MLP)
=====================  ==========================================================================
"""

from __future__ import annotations

from pathlib import Path

import numpy

from . import cases

LINEAR = ("(in, out): y = x @ w + b", "torch.nn.Linear(in, out).weight is (out, in): weight = w.T",
          "as stored (x @ w + b; flax.linen.Dense's kernel is (in, out))")
VECTOR = ("(out,)", "as stored (torch.nn.Linear's bias)", "as stored")
CONV = ("(kh, kw, C_in, C_out) (HWIO): out[n, p, o] = sum_{i, j, c} x_pad[n, p + (i, j), c] w[i, j, c, o]",
        "torch.nn.Conv2d's weight is (C_out, C_in, kh, kw): weight = w.transpose(3, 2, 0, 1)",
        "as stored: jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))")
BN = ("(C,): y = scale (x - mean) / sqrt(var + eps) + shift", "F.batch_norm's weight (scale) and bias (shift)",
      "as stored")
LOG_STD = ("(act_dim,): the policy's std is exp(log_std), the same in every state", "as stored", "as stored")
MLP_FORMULA = "f(x) = W_L act(... act(x W_0 + b_0) ...) + b_L, x: (examples, in) rows"


def _entry(name: str, shape, description) -> dict:
    layout, pytorch, jax = description
    return {"name": name, "shape": list(shape), "layout": layout, "pytorch": pytorch, "jax": jax}


def _describe(name: str, shape) -> dict:
    if name.endswith(".w"):
        return _entry(name, shape, CONV if len(shape) == 4 else LINEAR)
    if ".bn." in name:
        return _entry(name, shape, BN)
    return _entry(name, shape, LOG_STD if name == "log_std" else VECTOR)


def _own(prefix: str, name: str, shape, meaning: str) -> dict:
    return {"name": prefix + name, "shape": list(shape), "layout": meaning, "pytorch": "as stored",
            "jax": "as stored"}


def _uniform_mlp(rng, sizes) -> dict:
    """PyTorch's nn.Linear initialisation: weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        bound = 1 / numpy.sqrt(fan_in)
        params[f"layer{i}.w"] = rng.uniform(-bound, bound, (fan_in, fan_out))
        params[f"layer{i}.b"] = rng.uniform(-bound, bound, fan_out)
    return params


def _sinusoid(rng, n_tasks: int, n_examples: int, amplitude=(0.1, 5)) -> dict:
    amplitude, phase = rng.uniform(*amplitude, (n_tasks, 1, 1)), rng.uniform(0, numpy.pi, (n_tasks, 1, 1))
    data = {}
    for part in ("support", "query"):
        x = rng.uniform(-5, 5, (n_tasks, n_examples, 1))
        data[f"{part}.x"], data[f"{part}.y"] = x, amplitude * numpy.sin(x + phase)
    return data


def _data_entries(data: dict, meaning: dict) -> dict:
    return {n: {"shape": list(a.shape), "dtype": str(a.dtype), "layout": meaning[n.split(".")[1]]}
            for n, a in data.items()}


REGRESSION_DATA = {"x": "(task, example, in), float", "y": "(task, example, out), float"}
MSE = "mse: L_i = mean over the set's examples and outputs of (f(x) - y)^2 (torch.nn.functional.mse_loss)"


def _spec(name: str, description: str, model: dict, params: dict, data: dict, data_meaning: dict, loss: str,
          inner: dict, algorithm: str = "maml", meta_objective: str = "sum", **extra) -> dict:
    n_tasks = next(iter(data.values())).shape[0]
    return {
        "format": "minimaml doctor case 1 (docs/doctor.md)",
        "name": name, "description": description, "algorithm": algorithm, "model": model,
        "parameters": [_describe(n, p.shape) for n, p in params.items()],
        "data": _data_entries(data, data_meaning),
        "loss": loss.split(":")[0], "loss_definition": loss,
        "inner": inner,
        "meta_objective": meta_objective,
        "meta_objective_definition": (f"L = {'' if meta_objective == 'sum' else f'(1/{n_tasks}) '}sum over the "
                                      f"{n_tasks} tasks i of L_i(query_i, adapted_i)"),
        "meta_gradient": "d L / d (every array of parameters and meta_parameters), float64 or float32, one "
                         "array per name, shaped as stored here",
        "seed": 0, **extra}


def _mlp_case(name: str, description: str, steps: int, algorithm: str = "maml", activation: str = "relu",
              sizes=(1, 12, 12, 1), amplitude=(0.1, 5), **inner) -> cases.Case:
    rng = numpy.random.default_rng(0)
    params = _uniform_mlp(rng, sizes)
    data = _sinusoid(rng, n_tasks=4, n_examples=5, amplitude=amplitude)
    inner = {"steps": steps, "update": "theta_i <- theta_i - lr * grad L_i(support_i, theta_i), each task i "
             "from theta, only the adapted parameters", "adapted": list(params), **inner}
    model = {"family": "mlp", "sizes": list(sizes), "activation": activation, "formula": MLP_FORMULA}
    spec = _spec(name, description, model, params, data, REGRESSION_DATA, MSE, inner, algorithm)
    return cases.Case(spec, {**params, **data})


def mlp_1step():
    return _mlp_case("mlp_1step", "MAML (second order), sinusoid regression, one inner step", 1, lr=0.05)


def mlp_3steps():
    return _mlp_case("mlp_3steps", "MAML (second order), sinusoid regression, three inner steps", 3, lr=0.05)


def anil():
    return _mlp_case("anil", "ANIL: only the head (the last layer) adapted, two inner steps", 2, "anil", lr=0.05,
                     adapted=["layer2.w", "layer2.b"])


def meta_sgd():
    case = _mlp_case("meta_sgd", "Meta-SGD: theta_i = theta - alpha * grad L_i(support_i, theta), alpha a "
                     "learned array per parameter (elementwise product), one step", 1, "meta_sgd")
    rng = numpy.random.default_rng(1)
    alpha = {"alpha/" + n: rng.uniform(0.02, 0.1, case.arrays[n].shape) for n in case.param_names}
    case.spec["meta_parameters"] = [_own("", n, a.shape, f"the elementwise inner rate of {n[len('alpha/'):]}")
                                    for n, a in alpha.items()]
    case.spec["inner"]["update"] = "theta_i <- theta_i - alpha/<name> * grad L_i(support_i, theta_i) (elementwise)"
    return cases.Case(case.spec, {**case.arrays, **alpha})


def maml_pp():
    steps = 3
    case = _mlp_case("maml_pp", "MAML++: per-layer per-step rates lslr/<name>[k], the multi-step loss "
                     "sum_k w_k L_query(theta^k), 3 steps (no batch norm here)", steps, "maml_pp")
    rng = numpy.random.default_rng(1)
    rates = {"lslr/" + n: rng.uniform(0.03, 0.07, steps) for n in case.param_names}
    case.spec["meta_parameters"] = [_own("", n, a.shape, f"the inner rate of {n[len('lslr/'):]} at steps 1..K")
                                    for n, a in rates.items()]
    case.spec["inner"]["update"] = ("theta_i^{k+1} = theta_i^k - lslr/<name>[k] * grad L_i(support_i, theta_i^k), "
                                    "k = 0..K-1")
    case.spec["step_weights"] = [0.2, 0.3, 0.5]
    case.spec["meta_objective_definition"] = ("L = sum over tasks i and steps k = 1..K of step_weights[k-1] "
                                              "L_i(query_i, theta_i^k)")
    return cases.Case(case.spec, {**case.arrays, **rates})


def imaml():
    case = _mlp_case("imaml", "iMAML: phi_i = 80 steps of gradient descent on L_i(support_i, phi) + lambda/2 "
                     "||phi - theta||^2 from theta (stationary: the proximal gradient 1e-15 of its start); "
                     "meta-gradient sum_i (I + H_i / lambda)^{-1} grad L_i(query_i, phi_i), H_i the Hessian of "
                     "L_i(support_i, .) at phi_i, the system solved exactly",
                     80, "imaml", "tanh", (1, 8, 8, 1), (0.1, 1.0), lr=0.1, **{"lambda": 5.0, "cg_steps": 60})
    case.spec["inner"]["update"] = ("phi_i <- phi_i - lr * (grad L_i(support_i, phi_i) + lambda (phi_i - theta)), "
                                    "from phi_i = theta; cg_steps: conjugate-gradient steps minimaml takes")
    return case


def conv_bn(seed: int = 0):
    """MAML on 3 conv blocks (4 filters, stride 1, padding 1, batch norm in training mode, ReLU, 2x2 max-pool):
    8x8 -> 4x4 -> 2x2 -> 1x1, so the flattened features (H, W, C order) are the 4 channels in either order."""
    rng = numpy.random.default_rng(seed)
    n_tasks, n_way, filters, size = 2, 3, 4, 8
    params, c_in = {}, 1
    for i in range(3):
        bound = 1 / numpy.sqrt(9 * c_in)
        params[f"conv{i}.w"] = rng.uniform(-bound, bound, (3, 3, c_in, filters))
        params[f"conv{i}.bn.scale"] = rng.uniform(0.5, 1.5, filters)
        params[f"conv{i}.bn.shift"] = rng.normal(0, 0.1, filters)
        c_in = filters
    params["head.w"] = rng.uniform(-0.5, 0.5, (filters, n_way))
    params["head.b"] = rng.uniform(-0.5, 0.5, n_way)
    data = {}
    for part, shots in (("support", 1), ("query", 2)):
        data[f"{part}.x"] = rng.standard_normal((n_tasks, n_way * shots, size, size, 1))
        data[f"{part}.y"] = numpy.tile(numpy.repeat(numpy.arange(n_way), shots), (n_tasks, 1))
    model = {"family": "conv_bn", "stride": 1, "padding": 1, "max_pool": True, "features": "flatten",
             "bn_eps": 1e-5, "activation": "relu",
             "formula": "3 blocks of conv 3x3 (no bias) -> batch norm -> ReLU -> 2x2 max-pool (stride 2), then "
                        "flatten (H, W, C order; here 1x1x4) -> x @ head.w + head.b",
             "batch_norm": "training mode: mean and biased variance of each forward call's batch, per task, over "
                           "(examples, H, W), no running statistics; derivatives flow through mean and variance "
                           "(PyTorch: F.batch_norm(x, None, None, scale, shift, training=True, eps=1e-5) per task)"}
    meaning = {"x": "(task, example, H, W, C) channel-last images; PyTorch's NCHW: x[i].transpose(0, 3, 1, 2)",
               "y": "(task, example) integer class labels"}
    inner = {"steps": 1, "lr": 0.1, "update": "theta_i <- theta - lr * grad L_i(support_i, theta), every "
             "parameter adapted", "adapted": list(params)}
    spec = _spec("conv_bn", "MAML (second order), few-shot classification with conv + batch norm + pooling", model,
                 params, data, meaning,
                 "cross_entropy: L_i = mean over the set's examples of -log softmax(f(x))[y] "
                 "(torch.nn.functional.cross_entropy)", inner)
    return cases.Case(spec, {**params, **data})


def policy_reinforce(seed: int = 0):
    """MAML-RL's inner step: REINFORCE on fixed trajectories (support: before adaptation, query: after)."""
    rng = numpy.random.default_rng(seed)
    n_tasks, batch, horizon, obs_dim, act_dim = 3, 4, 5, 2, 2
    params = _uniform_mlp(rng, (obs_dim, 8, 8, act_dim))
    params["log_std"] = rng.uniform(-0.5, 0.0, act_dim)
    data = {}
    for part in ("support", "query"):
        data[f"{part}.obs"] = rng.standard_normal((n_tasks, batch, horizon, obs_dim))
        data[f"{part}.actions"] = rng.standard_normal((n_tasks, batch, horizon, act_dim))
        lengths = rng.integers(2, horizon + 1, (n_tasks, batch, 1))
        data[f"{part}.mask"] = (numpy.arange(horizon) < lengths).astype(numpy.float64)
        data[f"{part}.advantages"] = rng.standard_normal((n_tasks, batch, horizon)) * data[f"{part}.mask"]
    meaning = {"obs": "(task, trajectory, time, obs_dim)", "actions": "(task, trajectory, time, act_dim)",
               "mask": "(task, trajectory, time): 1 on valid steps, 0 after the episode ended",
               "advantages": "(task, trajectory, time): fixed numbers (not differentiated)"}
    model = {"family": "gaussian_policy", "sizes": [obs_dim, 8, 8, act_dim], "activation": "relu",
             "formula": "mean(s) = " + MLP_FORMULA.split(" = ")[1]
                        + "; pi(a | s) = N(a; mean(s), diag(exp(log_std))^2)"}
    loss = ("reinforce: L_i = - sum_{b,t} mask log pi(a | s) advantages / sum_{b,t} mask, log pi the full "
            "Gaussian log-density (with its -log(2 pi)/2 terms)")
    inner = {"steps": 1, "lr": 0.1, "update": "theta_i <- theta - lr * grad L_i(support_i, theta), every "
             "parameter adapted (log_std too)", "adapted": list(params)}
    spec = _spec("policy_reinforce", "MAML-RL's inner step (REINFORCE) on a Gaussian MLP policy, the meta-objective "
                 "the REINFORCE loss of the query trajectories, averaged over the tasks", model, params, data,
                 meaning, loss, inner, meta_objective="mean")
    return cases.Case(spec, {**params, **data})


STANDARD = {"mlp_1step": mlp_1step, "mlp_3steps": mlp_3steps, "conv_bn": conv_bn,
            "policy_reinforce": policy_reinforce, "anil": anil, "meta_sgd": meta_sgd, "maml_pp": maml_pp,
            "imaml": imaml}


def standard_case(name: str) -> cases.Case:
    """One of the doctor's cases, checked as a loaded one is."""
    if name not in STANDARD:
        raise ValueError(f"doctor: unknown case {name!r}: expected one of {tuple(STANDARD)}")
    case = STANDARD[name]()
    return cases.check_case(case.spec, case.arrays, name)


def export(directory, names=None) -> list:
    """Write the cases ``names`` (default all) into ``directory/<name>/``; returns the folders written."""
    written = []
    for name in names or STANDARD:
        case = standard_case(name)
        cases.save_case(Path(directory) / name, case)
        written.append(Path(directory) / name)
    return written
