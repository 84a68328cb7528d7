"""Finite networks: forward pass, exact empirical kernels, gradient descent.

References are independent of the code under test: a per-unit loop for the
forward pass, central finite differences over every parameter for the NTK and
the gradients, Monte Carlo over the readout's weights for the NNGP, the limit
kernels of :func:`limitkernel.kernel` for the means over seeds, and the network's
own linearisation (closed form) for gradient descent with a small step.
"""

import math

import numpy as np
import pytest
from naive import fd_gradient, fd_jacobian, net_params
from scipy.special import erf

import limitkernel as lk
from limitkernel.finite import FiniteNetwork

TANH = lk.Numerical(fn=np.tanh, name="tanh_numerical")

SPECS = {
    "ntk-erf-tanh": "dense(w_std=1.3, b_std=0.4), erf, dense(w_std=0.9, b_std=0.2), tanh, "
                    "dense(b_std=0.3)",
    "standard-gelu-sin": "dense(w_std=1.3, b_std=0.4, parameterization=standard), gelu, "
                         "dense(w_std=0.9, b_std=0.2, parameterization=standard), sin, "
                         "dense(b_std=0.3, parameterization=standard)",
    "standard-no-bias-relu": "dense(w_std=1.5, parameterization=standard), relu, "
                             "dense(parameterization=standard)",
    "ntk-leaky-dense-dense": "dense(w_std=1.2, b_std=0.1), leaky_relu(alpha=0.2), "
                             "dense(b_std=0.5), dense(w_std=0.8, b_std=0.3)",
    "numerical": [lk.Dense(1.4, 0.2), TANH, lk.Dense(1.1, 0.3)],
}


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("n_outputs", [1, 2])
def test_ntk_equals_brute_force_jacobian_product(name, n_outputs):
    net = FiniteNetwork(SPECS[name], [4, 5] if name != "numerical" and
                        name != "standard-no-bias-relu" else 6,
                        n_features=3, n_outputs=n_outputs, seed=1)
    rng = np.random.default_rng(2)
    x1, x2 = rng.standard_normal((4, 3)), rng.standard_normal((3, 3))
    j1, j2 = fd_jacobian(net, x1), fd_jacobian(net, x2)
    assert j1.shape[1] == net.n_params
    c = n_outputs
    cross = (j1 @ j2.T).reshape(4, c, 3, c).transpose(0, 2, 1, 3)
    same = (j1 @ j1.T).reshape(4, c, 4, c).transpose(0, 2, 1, 3)
    if c == 1:
        cross, same = cross[:, :, 0, 0], same[:, :, 0, 0]
    scale = np.abs(same).max()
    np.testing.assert_allclose(net.ntk(x1, x2), cross, rtol=0, atol=1e-7 * scale)
    np.testing.assert_allclose(net.ntk(x1), same, rtol=0, atol=1e-7 * scale)
    # The symmetric path (one triangle, mirrored) equals the general one.
    np.testing.assert_allclose(net.ntk(x1), net.ntk(x1, x1.copy()), rtol=1e-13, atol=0)


def test_forward_matches_a_unit_by_unit_loop():
    net = FiniteNetwork(SPECS["ntk-erf-tanh"], [4, 5], n_features=3, n_outputs=2, seed=0)
    x = np.random.default_rng(1).standard_normal((3, 3))
    layers = list(net.spec)
    expected = []
    for row in x:
        a = list(row)
        dense = iter(net.dense)
        for layer in layers:
            if isinstance(layer, lk.Dense):
                p = next(dense)
                sw, sb = layer.w_std / math.sqrt(len(a)), layer.b_std
                a = [sw * sum(a[i] * p.w[i, j] for i in range(len(a))) + sb * p.b[j]
                     for j in range(p.w.shape[1])]
            else:
                f = {"erf": erf, "tanh": math.tanh}[layer.name]
                a = [float(f(v)) for v in a]
        expected.append(a)
    np.testing.assert_allclose(net.forward(x), np.array(expected), rtol=1e-13)


def test_nngp_is_the_output_covariance_over_readout_weights():
    # Monte Carlo over fresh readout parameters, the rest of the network fixed:
    # Cov[f(x), f(x')] is the empirical NNGP. 20000 draws; 5 standard errors.
    spec = "dense(w_std=1.3, b_std=0.2), relu, dense(w_std=1.6, b_std=0.7)"
    net = FiniteNetwork(spec, 7, n_features=2, seed=3)
    x = np.random.default_rng(4).standard_normal((3, 2))
    rng = np.random.default_rng(5)
    head = net.dense[-1]
    draws = []
    for _ in range(20000):
        head.w[...] = rng.standard_normal(head.w.shape)
        head.b[...] = rng.standard_normal(head.b.shape)
        draws.append(net.forward(x)[:, 0])
    draws = np.array(draws)
    prods = draws[:, :, None] * draws[:, None, :]  # the mean output is 0 exactly
    mc, se = prods.mean(0), prods.std(0, ddof=1) / math.sqrt(len(draws))
    assert np.all(np.abs(net.nngp(x) - mc) <= 5 * se)


def _kernel_draws(spec, x, width, seeds, base):
    draws = [FiniteNetwork(spec, width, x.shape[1], seed=[base, s, width]).kernels(x)
             for s in range(seeds)]
    iu = np.triu_indices(x.shape[0])
    return {k: np.array([d[k][iu] for d in draws]) for k in ("nngp", "ntk")}, iu


@pytest.mark.parametrize("spec", [
    "dense(w_std=1.5, b_std=0.3), relu, dense(w_std=1.2, b_std=0.2)",
    ("dense(w_std=1.5, b_std=0.3, parameterization=standard, width=64), erf, "
    "dense(w_std=1.2, b_std=0.2, parameterization=standard)"),
    [lk.Dense(1.4, 0.2), TANH, lk.Dense(1.1, 0.3)],
])
def test_one_hidden_layer_kernels_are_unbiased(spec):
    # With one hidden layer both empirical kernels are averages of `width` i.i.d.
    # terms whose expectation is exactly the limit (no O(1/width) bias), so the
    # mean over 100 seeds is within 4 standard errors (se = sd/√M) of the limit.
    x = np.random.default_rng(0).standard_normal((4, 3))
    draws, iu = _kernel_draws(spec, x, 64, 100, base=11)
    limit = lk.kernel(spec, x)
    for kind in ("nngp", "ntk"):
        mean = draws[kind].mean(0)
        se = draws[kind].std(0, ddof=1) / math.sqrt(100)
        assert np.all(np.abs(mean - limit[kind][iu]) <= 4 * se), kind


def test_deep_kernels_converge_after_removing_the_1_over_width_bias():
    # With three hidden layers E[K̂] = K + b/n + O(1/n²). Richardson
    # extrapolation from widths n and 4n, (4 m_4n − m_n)/3, cancels b/n; its
    # standard error is √(16 se_4n² + se_n²)/3 (independent seeds), and the
    # extrapolate is within 4 of them of the limit. The plain mean at width n
    # is biased by several of its standard errors, which this removes.
    spec = "3 * [dense(w_std=1.4, b_std=0.2), relu], dense(w_std=1.4, b_std=0.2)"
    x = np.random.default_rng(0).standard_normal((4, 3))
    seeds = 200
    small, iu = _kernel_draws(spec, x, 32, seeds, base=7)
    large, _ = _kernel_draws(spec, x, 128, seeds, base=7)
    limit = lk.kernel(spec, x)
    for kind in ("nngp", "ntk"):
        m1, m4 = small[kind].mean(0), large[kind].mean(0)
        se1 = small[kind].std(0, ddof=1) / math.sqrt(seeds)
        se4 = large[kind].std(0, ddof=1) / math.sqrt(seeds)
        extrapolated = (4 * m4 - m1) / 3
        se = np.sqrt(16 * se4 ** 2 + se1 ** 2) / 3
        assert np.all(np.abs(extrapolated - limit[kind][iu]) <= 4 * se), kind


def test_limit_spec_carries_standard_widths():
    spec = ("dense(parameterization=standard), relu, dense(parameterization=standard), "
            "relu, dense(parameterization=standard)")
    net = FiniteNetwork(spec, [30, 40], n_features=2)
    widths = [layer.width for layer in net.limit_spec() if isinstance(layer, lk.Dense)]
    assert widths == [30, 40, None]
    ntk_spec = "dense, relu, dense"
    assert FiniteNetwork(ntk_spec, 10, n_features=2).limit_spec() == lk.parse(ntk_spec)


# ------------------------------------------------------------ training


def _loss(net, x, targets, kind):
    f = net.forward(x)
    n, c = f.shape
    if kind == "mse":
        return 0.5 * np.sum((f - targets) ** 2) / (n * c)
    log_p = f - np.log(np.exp(f).sum(axis=1, keepdims=True))
    return -np.sum(targets * log_p) / (n * c)


@pytest.mark.parametrize("kind", ["mse", "cross_entropy"])
def test_one_step_moves_every_parameter_by_minus_lr_times_gradient(kind):
    # Gradient of the loss by central differences (an independent reference for
    # the backward pass and the in-place BLAS update).
    net = FiniteNetwork(SPECS["ntk-erf-tanh"], [4, 5], n_features=3, n_outputs=3, seed=2)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 3))
    if kind == "mse":
        y = rng.standard_normal((5, 3))
        targets = y
    else:
        y = np.array([0, 2, 1, 1, 0])
        targets = np.eye(3)[y]
    eta = 0.7
    grads = fd_gradient(net, lambda: _loss(net, x, targets, kind))
    before = [p.copy() for p in net_params(net)]
    history = net.train(x, y, 1, learning_rate=eta, loss=kind)
    for p0, p1, g in zip(before, net_params(net), grads):
        np.testing.assert_allclose(p1, p0 - eta * g, rtol=0, atol=1e-8)
    assert history.loss[0] == pytest.approx(_loss_of(before, net, x, targets, kind), rel=1e-12)


def _loss_of(params, net, x, targets, kind):
    other = net.copy()
    for dest, src in zip(net_params(other), params):
        dest[...] = src
    return _loss(other, x, targets, kind)


def test_small_steps_track_the_linearised_network():
    # Gradient descent with learning rate η for k steps against the network's own
    # linearisation at time t = k in predict's convention (s = η k / (N c)):
    #   f_lin(x*) = f0(x*) − Θ̂0(x*, X) Θ̂0⁻¹ (I − e^{−sΘ̂0}) (f0(X) − Y),
    # computed in closed form from the initial empirical NTK. With
    # η λ_max / (N c) = 0.02 the Euler error of every mode is below
    # η λ/(2 N c) · max_u u e^{−u} < 0.4 % of the movement; the rest is the
    # network's nonlinearity, which vanishes with width: the deviation is below
    # 1 % of the movement at width 512 and shrinks from width 128 to 512.
    spec = "dense(w_std=1.5, b_std=0.3), erf, dense(w_std=1.2, b_std=0.2), tanh, " \
           "dense(w_std=1.1, b_std=0.1)"
    rng = np.random.default_rng(0)
    x, x_test = rng.standard_normal((5, 3)), rng.standard_normal((4, 3))
    y = np.stack([np.sin(x[:, 0]), x[:, 1] * x[:, 2]], axis=1)
    n, c = y.shape
    deviations = []
    for width in (128, 512):
        net = FiniteNetwork(spec, width, 3, n_outputs=2, seed=1)
        theta = net.ntk(x).transpose(0, 2, 1, 3).reshape(n * c, n * c)
        cross = net.ntk(x_test, x).transpose(0, 2, 1, 3).reshape(4 * c, n * c)
        f0, f0_test = net(x).ravel(), net(x_test).ravel()
        evals, evecs = np.linalg.eigh(theta)
        eta = 0.02 * n * c / evals[-1]
        steps = 150
        s = eta * steps / (n * c)
        a = evecs @ np.diag(-np.expm1(-s * evals) / evals) @ evecs.T
        linear = f0_test - cross @ a @ (f0 - y.ravel())
        history = net.train(x, y, steps, eta, x_test=x_test, record_at=[steps])
        trained = history.test_outputs[-1].ravel()
        deviations.append(np.abs(trained - linear).max() / np.abs(trained - f0_test).max())
    assert deviations[1] < 0.01
    assert deviations[1] < 0.5 * deviations[0]


def test_history_records_outputs_loss_and_ntk():
    net = FiniteNetwork("dense(w_std=1.2, b_std=0.1), relu, dense", 32, n_features=2, seed=0)
    rng = np.random.default_rng(1)
    x, y, xt = rng.standard_normal((6, 2)), rng.standard_normal(6), rng.standard_normal((3, 2))
    start = net.copy()
    h = net.train(x, y, 40, learning_rate=0.5, x_test=xt, record_at=[0, 10, 40], ntk_x=xt)
    assert h.steps.tolist() == [0, 10, 40] and h.t.tolist() == [0.0, 10.0, 40.0]
    assert h.loss.shape == (41,) and h.loss[-1] < h.loss[0]
    assert h.outputs.shape == (3, 6, 1) and h.test_outputs.shape == (3, 3, 1)
    np.testing.assert_allclose(h.outputs[0], start(x), rtol=1e-14)
    np.testing.assert_allclose(h.test_outputs[-1], net(xt), rtol=1e-14)
    np.testing.assert_allclose(h.ntk[0], start.ntk(xt), rtol=1e-13)
    np.testing.assert_allclose(h.ntk[-1], net.ntk(xt), rtol=1e-13)
    # Recorded losses are those of the recorded outputs.
    np.testing.assert_allclose(h.loss[[0, 10, 40]],
                               0.5 * np.mean((h.outputs[:, :, 0] - y) ** 2, axis=1),
                               rtol=1e-12)


def test_same_seed_same_network_and_widths_per_layer():
    spec = "dense, relu, dense, relu, dense"
    a = FiniteNetwork(spec, [3, 7], n_features=2, seed=5)
    b = FiniteNetwork(spec, [3, 7], n_features=2, seed=np.random.default_rng(5))
    assert [layer.w.shape for layer in a.dense] == [(2, 3), (3, 7), (7, 1)]
    for p, q in zip(net_params(a), net_params(b)):
        np.testing.assert_array_equal(p, q)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"width": [3]}, "width has 1 entries but the spec has 2 hidden dense"),
    ({"width": 0}, "positive integers"),
    ({"width": None}, "give width="),
    ({"width": 4, "n_features": 0}, "n_features must be a positive integer"),
])
def test_bad_construction_is_explained(kwargs, fragment):
    kwargs.setdefault("n_features", 2)
    with pytest.raises(ValueError, match=fragment):
        FiniteNetwork("dense, relu, dense, relu, dense", **kwargs)


def test_bad_spec_and_inputs_are_explained():
    with pytest.raises(lk.SpecError, match="append ', dense'"):
        FiniteNetwork("dense, relu", 4, n_features=2)
    net = FiniteNetwork("dense, relu, dense", 4, n_features=2, n_outputs=2)
    with pytest.raises(ValueError, match="x has 3 features but the network was built"):
        net.forward(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"y must have shape \(2, 2\)"):
        net.train(np.ones((2, 2)), np.ones(2), 3)
    with pytest.raises(ValueError, match=r"integers in \[0, 2\)"):
        net.train(np.ones((2, 2)), np.array([0, 2]), 3, loss="cross_entropy")
    with pytest.raises(ValueError, match="loss must be one of"):
        net.train(np.ones((2, 2)), np.ones((2, 2)), 3, loss="hinge")


def test_divergence_is_reported_with_the_fix():
    net = FiniteNetwork("dense(w_std=2), relu, dense(w_std=2)", 64, n_features=2, seed=0)
    x = np.random.default_rng(0).standard_normal((4, 2)) * 10
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        net.train(x, np.ones(4), 500, learning_rate=1e3)
