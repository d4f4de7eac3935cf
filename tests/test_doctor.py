"""The meta-gradient doctor (minimaml/doctor, docs/doctor.md): the exact gradient passes in float64 and
float32, every planted mistake is named first in both precisions, a case written with NumPy and json
alone is checked like an exported one, every exported case round-trips through a NumPy-only forward
pass, and (where PyTorch is installed) a plain PyTorch MAML passes and its create_graph=False twin is
diagnosed as first order."""

import functools
import json

import numpy
import pytest

from minimaml import autodiff as ad
from minimaml import doctor
from minimaml.doctor import __main__ as command
from minimaml.doctor import gradients, models
from minimaml.nn import conv4

CASES = list(doctor.STANDARD)


@functools.lru_cache(maxsize=None)
def standard(name):
    return doctor.standard_case(name)


@functools.lru_cache(maxsize=None)
def exact(name):
    return gradients.reference(standard(name))[1]


@functools.lru_cache(maxsize=None)
def floor(name, dtype):
    return doctor.precision_floor(standard(name), dtype, exact(name))


@functools.lru_cache(maxsize=None)
def table(name):
    return doctor.mistake_table(standard(name))


def checked(name, grads):
    dtype = "float32" if next(iter(grads.values())).dtype == numpy.float32 else "float64"
    return doctor.check(standard(name), grads, exact(name), floor(name, dtype), table(name))


# --- the exact gradient --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n in CASES if n != "imaml"])
def test_the_unrolled_loop_without_a_mistake_is_the_algorithms_gradient(name):
    """The mistakes are computed by ``gradients.unrolled``; without a switch it is minimaml's algorithm."""
    unrolled = gradients.unrolled(standard(name), gradients.Mistake("none", ""))
    assert doctor.relative_error(unrolled, exact(name)) < 1e-12


@pytest.mark.parametrize("name", CASES)
def test_the_exact_gradient_passes_in_float64_and_float32(name):
    report = checked(name, exact(name))
    assert report.exact and report.overall < 1e-12 and "EXACT to float64" in str(report)
    float32 = gradients.reference(standard(name).astype(numpy.float32))[1]
    report = checked(name, float32)
    assert report.dtype == "float32" and report.exact, str(report)
    assert floor(name, "float64") < 1e-12 < 1e-6 < floor(name, "float32") < 1e-3


def test_the_imaml_reference_is_the_implicit_gradient_by_a_dense_solve():
    """phi_i by plain gradient descent on the proximal loss, then (I + H_i / lambda) x = grad L_Q(phi_i) solved
    densely (H_i column by column from Hessian-vector products): the doctor's CG reference to 1e-10. The
    case's inner problem is solved: its proximal gradient ends 1e-12 below where it starts."""
    case = standard("imaml")
    inner, names, loss = case.spec["inner"], case.param_names, case.task_loss()
    theta = case.meta_params
    phi = {n: numpy.broadcast_to(p, (case.n_tasks,) + p.shape).copy() for n, p in theta.items()}
    norms = []
    for _ in range(inner["steps"]):
        leaves = [ad.Tensor(phi[n], requires_grad=True) for n in names]
        grads = ad.grad(ad.sum(loss(dict(zip(names, leaves)), case.tasks.support)), leaves)
        proximal = {n: g.data + inner["lambda"] * (phi[n] - theta[n]) for n, g in zip(names, grads)}
        norms.append(numpy.sqrt(sum(numpy.sum(p ** 2) for p in proximal.values())))
        phi = {n: phi[n] - inner["lr"] * proximal[n] for n in names}
    assert norms[-1] < 1e-12 * norms[0]
    leaves = [ad.Tensor(phi[n], requires_grad=True) for n in names]
    query = [g.data for g in ad.grad(ad.sum(loss(dict(zip(names, leaves)), case.tasks.query)), leaves)]
    hessian = ad.hessian_product(lambda *p: ad.sum(loss(dict(zip(names, p)), case.tasks.support)),
                                 [phi[n] for n in names])
    sizes = [theta[n].size for n in names]
    columns = []
    for j in range(sum(sizes)):
        unit = numpy.zeros(sum(sizes))
        unit[j] = 1
        parts = numpy.split(unit, numpy.cumsum(sizes)[:-1])
        vector = [numpy.broadcast_to(v.reshape(theta[n].shape), phi[n].shape).copy() for v, n in zip(parts, names)]
        columns.append(numpy.concatenate([h.reshape(case.n_tasks, -1) for h in hessian(vector)], axis=1))
    h = numpy.stack(columns, axis=2)  # (T, P, P)
    g = numpy.concatenate([q.reshape(case.n_tasks, -1) for q in query], axis=1)
    x = numpy.linalg.solve(numpy.eye(sum(sizes)) + h / inner["lambda"], g[..., None])[..., 0].sum(axis=0)
    parts = numpy.split(x, numpy.cumsum(sizes)[:-1])
    dense = {n: part.reshape(theta[n].shape) for part, n in zip(parts, names)}
    assert doctor.relative_error(dense, exact("imaml")) < 1e-10


def test_the_doctors_conv_family_is_minimamls_conv4():
    net = conv4.Conv4(image_size=8, in_channels=2, filters=3, stride=1, padding=1, max_pool=False,
                      features="mean", bn_eps=1e-3)
    rng = numpy.random.default_rng(0)
    params = net.init(rng, 4, numpy.float64)
    x = rng.standard_normal((2, 5, 8, 8, 2))
    settings = {"stride": 1, "padding": 1, "max_pool": False, "features": "mean", "bn_eps": 1e-3}
    assert numpy.allclose(models.conv_bn_forward(params, x, settings).data, net.apply(params, x).data,
                          rtol=1e-13, atol=1e-13)


# --- planted mistakes ----------------------------------------------------------------------------------

def _query_loss_gradient(case):
    """The gradient of the query loss at theta (no adaptation), directly."""
    leaves = {n: ad.Tensor(p, requires_grad=True) for n, p in case.meta_params.items()}
    loss = ad.sum(case.task_loss()({n: leaves[n] for n in case.param_names}, case.tasks.query)) * case.scale
    return {n: g.data for n, g in zip(leaves, ad.grad(loss, list(leaves.values())))}


def planted(case, mistake):
    """The gradient a user with ``mistake`` computes, by minimaml's own routes where one exists (the
    algorithm classes with a changed setting), else by ``gradients.unrolled`` with the switch on."""
    k, maml_like = case.inner_steps, case.algorithm in ("maml", "anil", "imaml")
    if mistake.key == "no adaptation":
        return _query_loss_gradient(case)
    if mistake.extra_steps:
        return gradients.reference(case, inner_steps=k + mistake.extra_steps, inner_solution=False)[1]
    if mistake.swapped:
        return gradients.reference(case, tasks=gradients.swapped(case.tasks), inner_solution=False)[1]
    if mistake.first_order and case.algorithm != "meta_sgd":
        return gradients.reference(case, first_order=True)[1]
    if mistake.rate in ("alpha^2", "1") and maml_like:
        lr = case.inner_lr ** 2 if mistake.rate == "alpha^2" else 1.0
        return gradients.reference(case, inner_lr=lr, inner_solution=False)[1]
    if mistake.rate == "constant":
        return {n: g * 0 if n not in case.param_names else g for n, g in gradients.reference(case)[1].items()}
    if mistake.left_out and case.algorithm in ("maml", "anil"):
        inner = {**case.spec["inner"], "adapted": [n for n in case.adapted if n not in mistake.left_out]}
        return gradients.reference(doctor.Case({**case.spec, "inner": inner}, case.arrays))[1]
    return gradients.unrolled(case, mistake)


PLANTED = [(name, m.key) for name in CASES for m in gradients.mistakes(standard(name))]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name, key", PLANTED)
def test_each_planted_mistake_is_named_first(name, key, dtype):
    if key not in table(name):
        pytest.skip(f"{key} has no exact gradient on {name} (it diverges, or its iMAML solve does not converge)")
    mistake = table(name)[key][0]
    case = standard(name).astype(getattr(numpy, dtype))
    with numpy.errstate(over="ignore", invalid="ignore"):
        try:
            grads = planted(case, mistake)
        except gradients.NoExactReference as error:  # minimaml refuses a gradient it cannot compute
            pytest.skip(f"{key} has no exact gradient on {name} in {dtype}: {error}")
    report = checked(name, grads)
    assert not report.exact
    if not all(numpy.isfinite(g).all() for g in grads.values()):  # the mistake overflows this precision
        assert report.not_finite and "NaN or infinite" in str(report)
        return
    assert report.match is not None and report.match.key == key and report.match.scale == 1.0, str(report)
    assert f"it matches: {key}. Likely cause:" in str(report)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", CASES)
def test_a_mean_instead_of_the_sum_is_named_with_its_scale(name, dtype):
    case = standard(name).astype(getattr(numpy, dtype))
    grads = {n: g / case.n_tasks for n, g in gradients.reference(case)[1].items()}
    if case.spec["meta_objective"] == "mean":  # the case wants the mean: the mistake is the sum
        grads = {n: g * case.n_tasks ** 2 for n, g in grads.items()}
    report = checked(name, grads)
    assert report.match.key == "exact", str(report)
    expected = 1 / case.n_tasks if case.spec["meta_objective"] == "sum" else case.n_tasks
    assert report.match.scale == pytest.approx(expected, rel=1e-4)
    assert "the mean over the" in str(report) or "the sum over the" in str(report)


def test_a_square_weights_gradient_in_pytorchs_layout_is_named():
    grads = {n: g.T if n == "layer1.w" else g for n, g in exact("mlp_1step").items()}  # layer1.w is 12 x 12
    report = checked("mlp_1step", grads)
    assert report.match.key == "square weights transposed" and "save weight.grad.T" in str(report)


def test_a_gradient_with_nan_is_said_to_be_wrong_without_a_diagnosis():
    grads = dict(exact("mlp_1step"), **{"layer2.b": numpy.array([numpy.nan])})
    report = checked("mlp_1step", grads)
    assert not report.exact and report.not_finite == ["layer2.b"] and not report.candidates
    assert "NaN or infinite entries in ['layer2.b']" in str(report)


def test_a_gradient_that_is_no_mistake_is_said_to_match_none():
    rng = numpy.random.default_rng(5)
    grads = {n: g + 0.3 * numpy.linalg.norm(g) * rng.standard_normal(g.shape) / numpy.sqrt(g.size)
             for n, g in exact("mlp_1step").items()}
    report = checked("mlp_1step", grads)
    assert report.match is None and "none matches" in str(report)
    assert len(report.candidates) == len(table("mlp_1step")) + 2  # the exact one and the transposed one
    assert [c.error for c in report.candidates] == sorted(c.error for c in report.candidates)


# --- a user's own case, written with NumPy and json only ---------------------------------------------

def write_user_cases(folder):
    """Two cases as a user would write them, without minimaml: a tanh MLP classifier (mean over tasks,
    two steps, the first layer not adapted) and a two-block conv + batch-norm net with spatial-mean features."""
    rng = numpy.random.default_rng(11)
    mlp = {"layer0.w": rng.normal(0, 0.5, (2, 6)), "layer0.b": rng.normal(0, 0.1, 6),
           "layer1.w": rng.normal(0, 0.5, (6, 3)), "layer1.b": rng.normal(0, 0.1, 3)}
    data = {f"{s}.x": rng.standard_normal((3, 6, 2)) for s in ("support", "query")}
    data.update({f"{s}.y": rng.integers(0, 3, (3, 6)) for s in ("support", "query")})
    spec = {"algorithm": "maml", "model": {"family": "mlp", "activation": "tanh"}, "loss": "cross_entropy",
            "parameters": list(mlp), "inner": {"steps": 2, "lr": 0.3, "adapted": ["layer1.w", "layer1.b"]},
            "meta_objective": "mean"}
    conv = {}
    for i, c_in in enumerate((1, 3)):
        conv[f"conv{i}.w"] = rng.normal(0, 0.4, (3, 3, c_in, 3))
        conv[f"conv{i}.bn.scale"] = rng.uniform(0.5, 1.5, 3)
        conv[f"conv{i}.bn.shift"] = rng.normal(0, 0.1, 3)
    conv.update({"head.w": rng.normal(0, 0.5, (3, 2)), "head.b": numpy.zeros(2)})
    images = {f"{s}.x": rng.standard_normal((2, 4, 6, 6, 1)) for s in ("support", "query")}
    images.update({f"{s}.y": numpy.array([[0, 1, 0, 1]] * 2) for s in ("support", "query")})
    conv_spec = {"model": {"family": "conv_bn", "stride": 2, "padding": "SAME", "max_pool": False,
                           "features": "mean", "bn_eps": 1e-3}, "loss": "cross_entropy",
                 "parameters": list(conv), "inner": {"steps": 1, "lr": 0.2}, "meta_objective": "sum"}
    for name, spec, arrays in (("user_mlp", spec, {**mlp, **data}), ("user_conv", conv_spec, {**conv, **images})):
        (folder / name).mkdir()
        (folder / name / "case.json").write_text(json.dumps(spec))
        numpy.savez(folder / name / "case.npz", **arrays)
    return [folder / "user_mlp", folder / "user_conv"]


def test_a_user_written_case_is_checked_like_an_exported_one(tmp_path):
    for folder in write_user_cases(tmp_path):
        case = doctor.load_case(folder)
        right = gradients.reference(case)[1]
        assert doctor.check(case, right).exact
        wrong = gradients.reference(case, first_order=True)[1]
        report = doctor.check(case, {n: g.astype(numpy.float32) for n, g in wrong.items()})
        assert report.match.key == "first order", str(report)
        # the exact gradient agrees with central differences of the meta-objective, along a random direction
        rng = numpy.random.default_rng(3)
        direction = {n: rng.standard_normal(a.shape) for n, a in case.meta_params.items()}

        def meta_loss(t):
            moved = {**case.arrays, **{n: case.arrays[n] + t * direction[n] for n in direction}}
            return gradients.reference(doctor.Case(case.spec, moved))[0]
        h = 1e-5
        difference = (meta_loss(-2 * h) - 8 * meta_loss(-h) + 8 * meta_loss(h) - meta_loss(2 * h)) / (12 * h)
        along = sum(float(numpy.sum(right[n] * direction[n])) for n in direction)
        assert abs(difference - along) < 1e-7 * max(1.0, abs(along))


def test_bad_cases_and_gradients_get_one_line_errors(tmp_path):
    folder = write_user_cases(tmp_path)[0]
    spec = json.loads((folder / "case.json").read_text())
    with pytest.raises(ValueError, match="missing the field 'meta_objective'"):
        doctor.check_case({k: v for k, v in spec.items() if k != "meta_objective"}, {}, "mine")
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        doctor.check_case({**spec, "model": {"family": "mlp", "activation": "gelu"}}, {}, "mine")
    with numpy.load(folder / "case.npz") as npz:
        arrays = {n: npz[n] for n in npz.files if n != "layer1.b"}
    with pytest.raises(ValueError, match=r"mine: case.npz lacks the arrays \['layer1.b'\]"):
        doctor.check_case(spec, arrays, "mine")
    mixed = {**arrays, "layer1.b": numpy.zeros(3), "query.x": arrays["query.x"].astype(numpy.float32)}
    with pytest.raises(ValueError, match=r"all float64 \(labels integers\), got \[.float32., .float64.\]"):
        doctor.check_case(spec, mixed)
    meta_sgd = standard("meta_sgd")
    with pytest.raises(ValueError, match=r"alpha/layer0.b has shape \(\), expected \(12,\)"):
        doctor.check_case(meta_sgd.spec, {**meta_sgd.arrays, "alpha/layer0.b": numpy.float64(0.1)})
    case = doctor.load_case(folder)
    grads = dict(gradients.reference(case)[1])
    with pytest.raises(ValueError, match=r"missing \['layer0.b'\]"):
        doctor.check(case, {n: g for n, g in grads.items() if n != "layer0.b"})
    with pytest.raises(ValueError, match="the gradient of layer0.w has shape"):
        doctor.check(case, {**grads, "layer0.w": grads["layer0.w"].T})
    diverging = doctor.Case({**case.spec, "inner": {**case.spec["inner"], "lr": float("inf")}}, case.arrays)
    with pytest.raises(gradients.NoExactReference, match="the meta-gradient is not finite"):
        doctor.check(diverging, grads)
    with pytest.raises(FileNotFoundError, match="no case.json"):
        doctor.load_case(tmp_path)


# --- the exported cases round-trip through a NumPy-only forward pass --------------------------------

def numpy_forward(spec, params, x):
    """The model of ``case.json`` in plain NumPy, as a foreign user would write it from the description."""
    model = spec["model"]
    act = {"relu": lambda h: numpy.maximum(h, 0), "tanh": numpy.tanh,
           "sigmoid": lambda h: 1 / (1 + numpy.exp(-h))}[model.get("activation", "relu")]
    if model["family"] != "conv_bn":
        n = sum(1 for k in params if k.startswith("layer") and k.endswith(".w"))
        for i in range(n):
            x = x @ params[f"layer{i}.w"] + params[f"layer{i}.b"]
            x = act(x) if i < n - 1 else x
        return x
    i = 0
    while f"conv{i}.w" in params:  # x: (N, H, W, C), one task
        w, pad, stride = params[f"conv{i}.w"], model["padding"], model["stride"]
        x = numpy.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        out = (x.shape[1] - 3) // stride + 1
        x = sum(numpy.einsum("nhwc,co->nhwo", x[:, a:a + stride * out:stride, b:b + stride * out:stride], w[a, b])
                for a in range(3) for b in range(3))
        mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
        x = params[f"conv{i}.bn.scale"] * (x - mean) / numpy.sqrt(var + model["bn_eps"]) + params[f"conv{i}.bn.shift"]
        x = numpy.maximum(x, 0)
        if model["max_pool"]:
            n, h, w_, c = x.shape
            x = x[:, :h // 2 * 2, :w_ // 2 * 2].reshape(n, h // 2, 2, w_ // 2, 2, c).max(axis=(2, 4))
        i += 1
    features = x.reshape(len(x), -1) if model["features"] == "flatten" else x.mean(axis=(1, 2))
    return features @ params["head.w"] + params["head.b"]


def numpy_task_losses(spec, arrays, part):
    """Each task's loss on set ``part`` at the stored parameters."""
    names = [p if isinstance(p, str) else p["name"] for p in spec["parameters"]]
    params = {n: arrays[n] for n in names}
    losses = []
    for t in range(arrays[f"{part}.{'obs' if spec['loss'] == 'reinforce' else 'x'}"].shape[0]):
        if spec["loss"] == "reinforce":
            mean = numpy_forward(spec, params, arrays[f"{part}.obs"][t])
            log_std = params["log_std"]
            z = (arrays[f"{part}.actions"][t] - mean) / numpy.exp(log_std)
            log_prob = -(0.5 * z ** 2 + log_std).sum(-1) - 0.5 * len(log_std) * numpy.log(2 * numpy.pi)
            mask = arrays[f"{part}.mask"][t]
            losses.append(-(mask * log_prob * arrays[f"{part}.advantages"][t]).sum() / mask.sum())
            continue
        out, y = numpy_forward(spec, params, arrays[f"{part}.x"][t]), arrays[f"{part}.y"][t]
        if spec["loss"] == "mse":
            losses.append(((out - y) ** 2).mean())
        else:
            shifted = out - out.max(axis=1, keepdims=True)
            log_softmax = shifted - numpy.log(numpy.exp(shifted).sum(axis=1, keepdims=True))
            losses.append(-log_softmax[numpy.arange(len(y)), y].mean())
    return numpy.array(losses)


def test_every_exported_case_round_trips_through_a_numpy_forward_pass(tmp_path):
    command.main(["export", str(tmp_path)])
    for name in CASES:
        spec = json.loads((tmp_path / name / "case.json").read_text())
        with numpy.load(tmp_path / name / "case.npz") as npz:
            arrays = {n: npz[n] for n in npz.files}
        assert all(a.dtype in (numpy.float64, numpy.int64) for a in arrays.values())
        for entry in spec["parameters"] + spec.get("meta_parameters", []):
            assert list(arrays[entry["name"]].shape) == entry["shape"] and entry["pytorch"] and entry["jax"]
        case = doctor.load_case(tmp_path / name)
        for part in ("support", "query"):
            ours = case.task_loss()(case.meta_params, getattr(case.tasks, part)).data
            assert numpy.allclose(numpy_task_losses(spec, arrays, part), ours, rtol=1e-12, atol=0), (name, part)


# --- the command line ------------------------------------------------------------------------------------

def test_the_command_exports_checks_and_refuses(tmp_path, capsys):
    assert command.main(["export", str(tmp_path), "--case", "mlp_1step"]) == 0
    folder = tmp_path / "mlp_1step"
    numpy.savez(tmp_path / "right.npz", **exact("mlp_1step"))
    assert command.main(["check", str(folder), str(tmp_path / "right.npz")]) == 0
    assert "verdict: EXACT to float64 precision." in capsys.readouterr().out
    numpy.savez(tmp_path / "wrong.npz", **table("mlp_1step")["first order"][1])
    assert command.main(["check", str(folder), str(tmp_path / "wrong.npz")]) == 1
    assert "it matches: first order." in capsys.readouterr().out
    assert command.main(["export", str(tmp_path), "--case", "mlp_1step"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert command.main(["reference", str(folder), str(tmp_path / "exact.npz")]) == 0
    with numpy.load(tmp_path / "exact.npz") as written:
        assert doctor.relative_error(dict(written), exact("mlp_1step")) == 0
    assert command.main(["reference", str(folder), str(tmp_path / "exact.npz")]) == 2
    assert "must be a new .npz file" in capsys.readouterr().err


# --- a plain PyTorch MAML ------------------------------------------------------------------------------

def torch_maml_gradient(folder, create_graph):
    """MAML on the MLP case in plain PyTorch, from case.json and case.npz (the code of docs/doctor.md)."""
    torch = pytest.importorskip("torch")
    spec = json.loads((folder / "case.json").read_text())
    data = numpy.load(folder / "case.npz")
    names = [p["name"] for p in spec["parameters"]]
    theta = {n: torch.tensor(data[n], requires_grad=True) for n in names}

    def forward(params, x):
        n = len(names) // 2
        for i in range(n):
            x = x @ params[f"layer{i}.w"] + params[f"layer{i}.b"]
            x = torch.relu(x) if i < n - 1 else x
        return x
    meta_loss = 0
    for t in range(data["support.x"].shape[0]):
        xs, ys, xq, yq = (torch.tensor(data[k][t]) for k in ("support.x", "support.y", "query.x", "query.y"))
        params = dict(theta)
        for _ in range(spec["inner"]["steps"]):
            loss = torch.nn.functional.mse_loss(forward(params, xs), ys)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
            params = {n: p - spec["inner"]["lr"] * g for (n, p), g in zip(params.items(), grads)}
        meta_loss = meta_loss + torch.nn.functional.mse_loss(forward(params, xq), yq)
    meta_loss.backward()
    return {n: p.grad.numpy() for n, p in theta.items()}


def test_a_plain_pytorch_maml_passes_and_without_create_graph_is_first_order(tmp_path):
    pytest.importorskip("torch")
    doctor.export(tmp_path, ["mlp_1step"])
    case = doctor.load_case(tmp_path / "mlp_1step")
    report = doctor.check(case, torch_maml_gradient(tmp_path / "mlp_1step", create_graph=True))
    assert report.exact and report.overall < 1e-12, str(report)
    report = doctor.check(case, torch_maml_gradient(tmp_path / "mlp_1step", create_graph=False))
    assert report.match.key == "first order", str(report)
