"""The derivative verification report, on fixed random float64 inputs:

1. every primitive of the tape at first and second order against finite differences (``check_grads``);
2. the MAML meta-gradient in each of the three modes for the three problem settings (a small MLP
   regression, a small conv + batch-norm + max-pool classifier, the RL REINFORCE step through a small
   Gaussian policy), and the MAML-TRPO Fisher-vector product, against central finite differences.

3. the follow-ups (``minimaml.algorithms``): Meta-SGD, MAML++, Reptile and iMAML checks.

    python -m minimaml.verify          # prints the three tables; exit status 1 if any check fails
"""

from __future__ import annotations

import sys

import numpy

from . import autodiff as ad
from . import maml
from .nn import conv4, mlp
from .nn import policy as pol
from .rl import reinforce, trpo
from .rl.maml_rl import meta_objective


def _cases(rng, to_device=lambda a: a) -> list:
    """(name, function, inputs): inputs are float64 arrays kept away from kinks and ties; the constants
    the functions hold (a mask, labels) put where ``to_device`` says (the inputs are the caller's to place)."""
    def normal(*shape):
        return rng.standard_normal(shape)

    def positive(*shape):
        return rng.uniform(0.5, 2.0, shape)

    def away_from_zero(*shape):
        return rng.uniform(0.2, 1.5, shape) * rng.choice([-1.0, 1.0], shape)

    def distinct(*shape):  # entries far from one another: max and max-pool have no ties
        return rng.permutation(numpy.arange(numpy.prod(shape), dtype=float)).reshape(shape) * 0.1

    labels = to_device(rng.integers(0, 4, (2, 3)))
    mask = to_device(rng.random((3, 4)) > 0.5)
    return [
        ("add (broadcast)", lambda a, b: a + b, [normal(2, 3, 4), normal(3, 1)]),
        ("subtract (broadcast)", lambda a, b: a - b, [normal(3, 4), normal(4)]),
        ("multiply (broadcast)", lambda a, b: a * b, [normal(2, 1, 4), normal(3, 4)]),
        ("divide", lambda a, b: a / b, [normal(3, 4), positive(3, 4)]),
        ("negative", lambda a: -a, [normal(3, 4)]),
        ("power (constant)", lambda a: a ** 3, [normal(3, 4)]),
        ("power (tensor)", lambda a, b: ad.power(a, b), [positive(3, 4), normal(3, 4)]),
        ("exp", ad.exp, [normal(3, 4)]),
        ("log", ad.log, [positive(3, 4)]),
        ("sqrt", ad.sqrt, [positive(3, 4)]),
        ("tanh", ad.tanh, [normal(3, 4)]),
        ("sigmoid", ad.sigmoid, [normal(3, 4)]),
        ("relu", ad.relu, [away_from_zero(3, 4)]),
        ("abs", ad.abs, [away_from_zero(3, 4)]),
        ("where (constant mask)", lambda a, b: ad.where(mask, a, b), [normal(3, 4), normal(4)]),
        ("maximum", ad.maximum, [distinct(3, 4), distinct(3, 4) + 0.05]),
        ("sum (axis, keepdims)", lambda a: ad.sum(a * a, axis=1, keepdims=True), [normal(2, 3, 4)]),
        ("mean (axes)", lambda a: ad.mean(a * a, axis=(0, 2)), [normal(2, 3, 4)]),
        ("max (axis)", lambda a: ad.max(a * a, axis=-1), [distinct(2, 3, 4) + 1.0]),
        ("broadcast_to", lambda a: ad.broadcast_to(a, (2, 3, 4)) ** 2, [normal(3, 1)]),
        ("reshape", lambda a: ad.reshape(a, (4, 6)) ** 2, [normal(2, 3, 4)]),
        ("transpose", lambda a: ad.transpose(a, (2, 0, 1)) ** 2, [normal(2, 3, 4)]),
        ("getitem (slices)", lambda a: a[:, 1:, ::2] ** 2, [normal(2, 3, 4)]),
        ("getitem (repeated ints)", lambda a: a[numpy.array([0, 2, 2, 1])] ** 2, [normal(3, 4)]),
        ("scatter_add", lambda a: ad.scatter_add(a, numpy.array([0, 2, 2]), (4, 2)) ** 2, [normal(3, 2)]),
        ("concatenate", lambda a, b: ad.concatenate([a, b], axis=1) ** 2, [normal(2, 3), normal(2, 2)]),
        ("stack", lambda a, b: ad.stack([a, b], axis=-1) ** 2, [normal(2, 3), normal(2, 3)]),
        ("matmul (batch broadcast)", ad.matmul, [normal(2, 3, 4), normal(4, 5)]),
        ("matmul (task axis)", lambda a, b: ad.tanh(ad.matmul(a, b)), [normal(3, 2, 4), normal(3, 4, 2)]),
        ("im2col", lambda x: ad.im2col(x, 3, 3, 2, ((1, 1), (0, 1))) ** 2, [normal(2, 5, 5, 2)]),
        ("col2im", lambda c: ad.col2im(c, (2, 5, 5, 2), 3, 3, 2, ((1, 1), (0, 1))) ** 2,
         [normal(2, 3, 2, 18)]),
        ("conv2d (stride 2, SAME)", lambda x, w: ad.tanh(ad.conv2d(x, w, stride=2)),
         [normal(2, 6, 6, 2), normal(3, 3, 2, 3)]),
        ("conv2d (task axis)", lambda x, w: ad.tanh(ad.conv2d(x, w, stride=1, padding=1)),
         [normal(2, 3, 5, 5, 2), normal(2, 3, 3, 2, 3)]),
        ("batch_normalize (+ ReLU)", lambda x, s: ad.batch_normalize(x * x, s, eps=1e-3, relu=True) * x,
         [normal(2, 6, 3), normal(2, 1, 3)]),
        ("max_pool2x2 (odd size)", lambda x: ad.max_pool2x2(x * x), [distinct(2, 5, 5, 2) + 1.0]),
        ("logsumexp", lambda a: ad.logsumexp(a, axis=-1), [normal(3, 5)]),
        ("log_softmax", ad.log_softmax, [normal(3, 5)]),
        ("mse", ad.mse, [normal(2, 4, 3), normal(2, 4, 3)]),
        ("softmax_cross_entropy", lambda z: ad.softmax_cross_entropy(z, labels), [normal(2, 3, 4)]),
        ("matmul_nt (a @ b^T)", lambda a, b: ad.tanh(ad.ops.matmul_nt(a, b)), [normal(3, 2, 4), normal(5, 4)]),
        ("matmul_tn (a^T @ b)", lambda a, b: ad.tanh(ad.ops.matmul_tn(a, b)), [normal(4, 2), normal(3, 4, 5)]),
        ("affine (dense layer)", lambda x, w, b: ad.tanh(ad.affine(x, w, b)),
         [normal(3, 2, 4), normal(3, 4, 5), normal(3, 5)]),
        ("gradient_step (theta - lr g)", lambda t, g, lr: ad.tanh(ad.gradient_step(t, g * g, lr)),
         [normal(3, 4), normal(3, 4), normal(4)]),
    ]


def _directional_fd(f, theta: dict, direction: dict, h: float = 1e-6) -> float:
    """(-f(theta + 2h v) + 8 f(theta + h v) - 8 f(theta - h v) + f(theta - 2h v)) / (12 h): the
    five-point central difference of ``f`` along ``v``. The step is small so that no ReLU of the conv
    net crosses its kink within it (roundoff stays near 1e-10 in float64)."""
    def at(t):
        return f({n: theta[n] + t * direction[n] for n in theta})
    return (-at(2 * h) + 8 * at(h) - 8 * at(-h) + at(-2 * h)) / (12 * h)


def _meta_objective(task_loss, tasks, inner_lr, inner_steps, mode, theta0, names):
    """The function whose gradient ``meta_gradient(mode)`` is: the unrolled L(theta) for the exact
    modes; for first order, the query loss at theta + delta_i with the inner displacement delta_i
    frozen at ``theta0``."""
    names = list(theta0) if names is None else names
    if mode != "first_order":
        def unrolled(theta):
            adapted = maml.adapt(task_loss, theta, tasks.support, inner_lr, inner_steps, names)
            return float(ad.sum(task_loss(adapted, tasks.query)).data)
        return unrolled
    final = maml.adapt(task_loss, theta0, tasks.support, inner_lr, inner_steps, names)
    delta = {n: final[n].data - theta0[n] for n in names}

    def frozen(theta):
        with ad.no_grad():
            shifted = {n: (theta[n] + delta[n]) if n in names else theta[n] for n in theta}
            return float(ad.sum(task_loss(shifted, tasks.query)).data)
    return frozen


def _meta_gradient_cases(rng) -> list:
    """(name, task_loss, params, tasks, inner_lr, inner_steps, inner_param_names) in float64."""
    def normal(*shape):
        return rng.standard_normal(shape)

    regression = (maml.supervised_loss(mlp.apply, ad.mse),
                  mlp.init(rng, sizes=(1, 8, 8, 1), scheme="uniform", dtype=numpy.float64),
                  maml.TaskBatch(maml.Examples(normal(3, 5, 1), normal(3, 5, 1)),
                                 maml.Examples(normal(3, 6, 1), normal(3, 6, 1))), 0.05, 2, None)
    net = conv4.Conv4(image_size=16, filters=3, stride=1, max_pool=True, features="flatten")
    params = net.init(rng, 3, dtype=numpy.float64)
    images = maml.TaskBatch(maml.Examples(normal(2, 3, 16, 16, 1), rng.integers(0, 3, (2, 3))),
                            maml.Examples(normal(2, 6, 16, 16, 1), rng.integers(0, 3, (2, 6))))
    classification = (maml.supervised_loss(net.apply, ad.softmax_cross_entropy), params, images, 0.1, 2,
                      conv4.inner_param_names(params, adapt_bn_shift=False))
    policy = pol.init(rng, obs_dim=2, act_dim=2, hidden=(8,), dtype=numpy.float64)

    def trajectories():
        return reinforce.Trajectories(normal(3, 4, 5, 2), normal(3, 4, 5, 2),
                                      (rng.random((3, 4, 5)) > 0.2).astype(numpy.float64), normal(3, 4, 5))
    rl = (reinforce.reinforce_loss, policy, maml.TaskBatch(trajectories(), trajectories()), 0.1, 1, None)
    return [("MLP regression", *regression), ("conv + BN + max-pool classifier", *classification),
            ("RL REINFORCE, Gaussian policy", *rl)]


def _fisher_vector_product_check(rng) -> float:
    """The MAML-TRPO Fisher-vector product F v (the Hessian of the post-update KL through the inner
    step, ``trpo.fisher_vector_product``) against central differences of the tape's grad D along v."""
    params = pol.init(rng, obs_dim=2, act_dim=2, hidden=(6,), dtype=numpy.float64)
    params = {n: p + 0.1 * rng.standard_normal(p.shape) for n, p in params.items()}

    def trajectories():
        return reinforce.Trajectories(rng.standard_normal((3, 4, 5, 2)), rng.standard_normal((3, 4, 5, 2)),
                                      numpy.ones((3, 4, 5)), rng.standard_normal((3, 4, 5)))
    pre, post = trajectories(), trajectories()
    old = maml.adapt(reinforce.reinforce_loss, params, pre, 0.1, 1)
    objective = meta_objective(pre, post, old, 0.1)
    names = list(params)

    def kl_gradient(flat):
        leaves = [ad.Tensor(a, requires_grad=True) for a in trpo.unflatten(flat, [params[n] for n in names])]
        _, kl = objective(dict(zip(names, leaves)), create_graph=True)
        return trpo.flatten(ad.grad(kl, leaves))

    theta = trpo.flatten([params[n] for n in names])
    leaves = [ad.Tensor(params[n], requires_grad=True) for n in names]
    _, kl = objective(dict(zip(names, leaves)), create_graph=True)
    v = rng.standard_normal(theta.size)
    tape = trpo.fisher_vector_product(kl, leaves, damping=0.0)(v)
    h = 1e-4
    fd = (-kl_gradient(theta + 2 * h * v) + 8 * kl_gradient(theta + h * v) - 8 * kl_gradient(theta - h * v)
          + kl_gradient(theta - 2 * h * v)) / (12 * h)
    return float(numpy.max(numpy.abs(tape - fd)) / numpy.max(numpy.abs(fd)))


def meta_gradient_report(seed: int = 0, rtol: float = 1e-6, file=sys.stdout) -> bool:
    """Each setting's meta-gradient in each mode, along a random direction, against five-point central
    differences of its objective; the Fisher-vector product against differences of grad D. Prints one
    row each; returns True when all pass."""
    rng = numpy.random.default_rng(seed)
    all_ok = True
    print(f"{'meta-gradient':32s} {'mode':>13s} {'rel. error':>11s}  result", file=file)
    for name, task_loss, params, tasks, inner_lr, inner_steps, names in _meta_gradient_cases(rng):
        direction = {n: rng.standard_normal(p.shape) for n, p in params.items()}
        for mode in maml.MODES:
            _, grads, _ = maml.meta_gradient(task_loss, params, tasks, inner_lr, inner_steps, mode=mode,
                                             inner_param_names=names)
            tape = float(sum(numpy.sum(grads[n] * direction[n]) for n in params))
            fd = _directional_fd(_meta_objective(task_loss, tasks, inner_lr, inner_steps, mode, params, names),
                                 params, direction)
            error = abs(tape - fd) / max(abs(tape), abs(fd), 1e-12)
            all_ok &= error <= rtol
            print(f"{name:32s} {mode:>13s} {error:11.2e}  {'ok' if error <= rtol else 'FAIL'}", file=file)
    error = _fisher_vector_product_check(rng)
    all_ok &= error <= rtol
    print(f"{'MAML-TRPO Fisher-vector product':32s} {'(third order)':>13s} {error:11.2e}  "
          f"{'ok' if error <= rtol else 'FAIL'}", file=file)
    print(f"relative error of the meta-gradient along a random direction (the Fisher product: largest entry) "
          f"against 5-point central differences (float64); {'all passed' if all_ok else 'FAILURES'}", file=file)
    return all_ok


def followups_report(seed: int = 0, rtol: float = 1e-6, file=sys.stdout) -> bool:
    """The follow-ups' checks (``algorithms.checks``): Meta-SGD and MAML++ meta-gradients against central
    differences, Reptile against a per-task loop, iMAML against the least-squares closed form and, on an
    MLP, its convergence to differences of L_Q(phi*(theta)) (the last row of the curve must pass); iMAML at
    its defaults either converges or says that it did not (``checks.imaml_at_defaults``)."""
    from .algorithms import checks

    rows = [(f"Meta-SGD w.r.t. {part}", error) for part, error in checks.meta_sgd_error(seed).items()]
    rows += [(f"MAML++ MSL w.r.t. {part}", error) for part, error in checks.maml_pp_error(seed).items()]
    rows += [(f"MAML++ MSL first order, {part}", error)
             for part, error in checks.maml_pp_error(seed, second_order=False).items()]
    rows += [(f"Reptile ({opt}) vs per-task loop", checks.reptile_error(seed, opt)) for opt in ("sgd", "adam")]
    rows += [(f"iMAML least squares, {part}", error) for part, error in checks.imaml_least_squares_error(seed).items()]
    rows += [("iMAML least squares, damped system", checks.imaml_least_squares_error(seed, cg_damping=1.0,
                                                                                   lambda_damping=10.0)["gradient"])]
    curve = checks.imaml_convergence(seed)
    all_ok = True
    print(f"{'follow-up check':40s} {'rel. error':>11s}  result", file=file)
    for name, error in rows:
        ok = error <= rtol
        all_ok &= ok
        print(f"{name:40s} {error:11.2e}  {'ok' if ok else 'FAIL'}", file=file)
    for i, (inner_steps, cg_steps, error, residual) in enumerate(curve):
        last = i == len(curve) - 1
        ok = error <= rtol if last else True
        all_ok &= ok
        print(f"{'iMAML MLP: ' + str(inner_steps) + ' inner, ' + str(cg_steps) + ' CG':40s} {error:11.2e}  "
              f"{('ok' if ok else 'FAIL') if last else 'curve'} (CG residual {residual:.1e})", file=file)
    defaults = checks.imaml_at_defaults(seed)
    says = "says not converged" if defaults.get("failure") else "says converged"
    honest = bool(defaults.get("failure")) or defaults["error"] <= 1e-3  # never silently wrong
    all_ok &= honest
    print(f"{'iMAML at its defaults, tanh MLP':40s} {defaults['error']:11.2e}  {'ok' if honest else 'FAIL'} "
          f"({says}: stationarity {defaults['imaml_stationarity']:.2g}, CG residual {defaults['cg_residual']:.2g}; "
          f"against a tight solve)", file=file)
    print(f"relative error along random directions against 5-point central differences (float64; Reptile: "
          f"largest entry; iMAML at its defaults: largest entry against a tight solve, ok when it converged or "
          f"says it did not); {'all passed' if all_ok else 'FAILURES'}", file=file)
    return all_ok


def report(order: int = 2, seed: int = 0, file=sys.stdout) -> bool:
    """Check every case at orders 1..``order``; print a table; return True when all pass."""
    rng = numpy.random.default_rng(seed)
    all_ok = True
    header = f"{'primitive':28s}" + "".join(f" {'order ' + str(k):>12s}" for k in range(1, order + 1))
    print(header + "  result", file=file)
    for name, fn, inputs in _cases(rng):
        result = ad.check_grads(fn, inputs, order=order, raise_on_failure=False)
        all_ok &= result.ok
        errors = "".join(f" {result.max_rel_error(k):12.2e}" for k in range(1, order + 1))
        print(f"{name:28s}{errors}  {'ok' if result.ok else 'FAIL'}", file=file)
    print(f"max relative error between the tape's directional derivatives and 5-point central "
          f"differences (float64); {'all passed' if all_ok else 'FAILURES'}", file=file)
    return all_ok


def main() -> int:
    primitives_ok = report()
    print()
    meta_ok = meta_gradient_report()
    print()
    return 0 if primitives_ok and meta_ok and followups_report() else 1


if __name__ == "__main__":
    sys.exit(main())
