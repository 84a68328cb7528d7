"""The scikit-learn kernel object: hyperparameters, gradients, GaussianProcessRegressor."""

import pickle
import subprocess
import sys
import warnings

import mpmath
import numpy as np
import pytest
from numpy.testing import assert_allclose

import limitkernel as lk
import limitkernel.sklearn_kernel as SK

sklearn = pytest.importorskip("sklearn")
from sklearn.base import clone
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import ConstantKernel, WhiteKernel
from sklearn.model_selection import GridSearchCV, KFold

RELU = "2 * [dense, relu], dense"


def inputs(n=6, d=3, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d))


# ------------------------------------------------------------ references


def _mp_relu(q11, q12, q22):
    s = mpmath.sqrt(q11 * q22)
    theta = mpmath.acos(max(min(q12 / s, 1), -1))
    return (s * (mpmath.sin(theta) + (mpmath.pi - theta) * mpmath.cos(theta)) / (2 * mpmath.pi),
            (mpmath.pi - theta) / (2 * mpmath.pi))


def _mp_erf(q11, q12, q22):
    # Williams (1997): E[erf(u) erf(v)] and E[erf'(u) erf'(v)].
    det = (1 + 2 * q11) * (1 + 2 * q22)
    return (2 / mpmath.pi * mpmath.asin(2 * q12 / mpmath.sqrt(det)),
            4 / (mpmath.pi * mpmath.sqrt(det - 4 * q12 ** 2)))


MP_ACTIVATIONS = {"relu": _mp_relu, "erf": _mp_erf}


def mp_kernels(activation, hidden, x1, x2, log_w, log_b):
    """(K, Θ) between x1 and x2 of [dense(w, b), activation] * hidden, dense(w, b)."""
    w2, b2 = mpmath.exp(2 * log_w), mpmath.exp(2 * log_b)
    x1 = [mpmath.mpf(float(v)) for v in x1]
    x2 = [mpmath.mpf(float(v)) for v in x2]
    d = len(x1)
    q = [mpmath.fsum(a * b for a, b in zip(u, v)) / d for u, v in ((x1, x1), (x1, x2), (x2, x2))]
    t = [mpmath.mpf(0)] * 3
    phi = MP_ACTIVATIONS[activation]
    for layer in range(hidden + 1):
        q = [w2 * v + b2 for v in q]
        t = [qn + w2 * tv for qn, tv in zip(q, t)]
        if layer == hidden:
            return q[1], t[1]
        pairs = [phi(q[0], q[0], q[0]), phi(q[0], q[1], q[2]), phi(q[2], q[2], q[2])]
        t = [tv * p[1] for tv, p in zip(t, pairs)]
        q = [p[0] for p in pairs]


def mp_gradient(activation, hidden, x, w, b, kind):
    """K and ∂K/∂(log b, log w) on x, by a 50-digit central difference (step 1e-15:
    truncation ~1e-30 and rounding ~1e-35 relative, negligible here)."""
    index = 0 if kind == "nngp" else 1
    n = len(x)
    out = np.zeros((n, n, 3))
    with mpmath.workdps(50):
        lw, lb, h = mpmath.log(w), mpmath.log(b), mpmath.mpf("1e-15")
        for i in range(n):
            for j in range(i, n):
                def f(dlw, dlb, x1=x[i], x2=x[j]):
                    return mp_kernels(activation, hidden, x1, x2, lw + dlw, lb + dlb)[index]
                values = (f(0, 0), (f(0, h) - f(0, -h)) / (2 * h), (f(h, 0) - f(-h, 0)) / (2 * h))
                out[i, j] = out[j, i] = [float(v) for v in values]
    return out[..., 0], out[..., 1:]


# ------------------------------------------------------------ scikit-learn kernel


def test_import_does_not_import_scikit_learn():
    code = ("import sys, limitkernel as lk; assert 'sklearn' not in sys.modules; "
            "lk.Kernel; assert 'sklearn' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_is_a_scikit_learn_kernel_and_a_gaussian_process_takes_it():
    from sklearn.gaussian_process.kernels import Kernel as SkKernel

    k = lk.Kernel(RELU, kind="nngp", w_std=1.2, b_std=0.1)
    assert isinstance(k, SkKernel) and not k.is_stationary() and k.requires_vector_input
    x = inputs(20)
    y = np.sin(x[:, 0])
    gp = GaussianProcessRegressor(kernel=k, alpha=1e-6, optimizer=None).fit(x, y)
    mean, std = gp.predict(x[:4] + 0.1, return_std=True)
    post = lk.nngp_posterior(lk.mlp(2, "relu", w_std=1.2, b_std=0.1), x, y, x[:4] + 0.1,
                             noise=1e-6, cov="var")
    assert_allclose(mean, post.mean, rtol=1e-7)
    assert_allclose(std, np.sqrt(post.var), rtol=1e-6)


def test_values_hyperparameters_and_theta_on_log_scale():
    x = inputs()
    k = lk.Kernel(RELU, kind="ntk", w_std=1.3, b_std=0.2)
    spec = "2 * [dense(w_std=1.3, b_std=0.2), relu], dense(w_std=1.3, b_std=0.2)"
    assert k.network() == lk.parse(spec)
    assert_allclose(k(x), lk.kernel(spec, x)["ntk"], rtol=0, atol=0)
    assert_allclose(k(x[:2], x), lk.kernel(spec, x[:2], x)["ntk"], rtol=0, atol=0)
    assert_allclose(k.diag(x), np.diag(k(x)), rtol=1e-14)
    # scikit-learn orders hyperparameters by name: b_std, then w_std.
    assert [h.name for h in k.hyperparameters] == ["b_std", "w_std"]
    assert_allclose(k.theta, np.log([0.2, 1.3]))
    assert_allclose(k.bounds, np.log([[1e-4, 10.0], [0.1, 10.0]]))
    k.theta = np.log([0.5, 2.0])
    assert_allclose([k.b_std, k.w_std], [0.5, 2.0])
    assert k.clone_with_theta(np.log([0.2, 1.3])) == lk.Kernel(RELU, w_std=1.3, b_std=0.2)
    # None keeps the spec's own values; 0 and "fixed" stay out of theta.
    own = lk.Kernel(spec)
    assert own.n_dims == 0 and own.network() == lk.parse(spec)
    assert lk.Kernel(RELU, w_std=1.0, b_std=0.0).hyperparameter_b_std.fixed
    assert lk.Kernel(RELU, w_std=1.0, w_std_bounds="fixed").n_dims == 0
    blocks = lk.Kernel("dense, residual[relu, dense], dense(parameterization=standard)",
                       w_std=0.7, b_std=0.3)
    assert blocks.network() == lk.parse(
        "dense(w_std=0.7, b_std=0.3), residual[relu, dense(w_std=0.7, b_std=0.3)], "
        "dense(w_std=0.7, b_std=0.3, parameterization=standard)")


def test_params_clone_equality_repr_and_pickle():
    k = lk.Kernel(RELU, kind="nngp", w_std=1.5, b_std=0.05, w_std_bounds=(0.5, 3.0))
    params = k.get_params()
    assert params == {"spec": RELU, "kind": "nngp", "w_std": 1.5, "b_std": 0.05,
                      "w_std_bounds": (0.5, 3.0), "b_std_bounds": (1e-4, 10.0),
                      "input_shape": None}
    copy = clone(k)
    assert copy == k and copy is not k
    assert k == lk.Kernel(lk.parse(RELU), kind="nngp", w_std=1.5, b_std=0.05,
                          w_std_bounds=(0.5, 3.0))
    assert k != lk.Kernel(RELU, kind="ntk", w_std=1.5, b_std=0.05, w_std_bounds=(0.5, 3.0))
    assert k != copy.set_params(w_std=1.6)
    assert k != WhiteKernel()
    assert repr(k) == ("Kernel('2 * [dense, relu], dense', kind='nngp', w_std=1.5, "
                       "b_std=0.05, w_std_bounds=(0.5, 3.0))")
    assert pickle.loads(pickle.dumps(k)) == k
    with pytest.raises(TypeError):
        hash(k)


def test_sums_and_products_with_other_kernels():
    x = inputs()
    k = lk.Kernel(RELU, kind="nngp", w_std=1.3, b_std=0.2)
    combo = ConstantKernel(2.0) * k + WhiteKernel(0.1)
    assert_allclose(combo(x), 2.0 * k(x) + 0.1 * np.eye(len(x)), rtol=1e-14)
    assert_allclose(combo.diag(x), 2.0 * k.diag(x) + 0.1, rtol=1e-14)
    assert combo.n_dims == 4
    _, grad = combo(x, eval_gradient=True)
    own = k(x, eval_gradient=True)[1]
    # theta: log constant, log b_std, log w_std, log noise.
    assert_allclose(grad[..., 1:3], 2.0 * own, rtol=1e-14)
    assert_allclose(grad[..., 0], 2.0 * k(x), rtol=1e-14)


def test_errors():
    x = inputs()
    with pytest.raises(ValueError, match="kind must be 'ntk' or 'nngp'"):
        lk.Kernel(RELU, kind="gp")(x)
    with pytest.raises(ValueError, match="w_std must be a number >= 0"):
        lk.Kernel(RELU, w_std=-1.0)(x)
    with pytest.raises(ValueError, match="only for k\\(X\\) with Y=None"):
        lk.Kernel(RELU, w_std=1.0)(x, x, eval_gradient=True)


# ------------------------------------------------------------ gradients


@pytest.mark.parametrize("activation, hidden, w, b", [
    ("relu", 1, 1.3, 0.2), ("relu", 3, 1.3, 0.2), ("relu", 6, 1.4, 0.1),
    ("relu", 10, 1.4, 0.1), ("relu", 2, 1.0, 3.0), ("relu", 2, 0.5, 0.01),
    ("erf", 1, 1.1, 0.3), ("erf", 3, 1.6, 0.05), ("erf", 2, 0.8, 2.5),
])
@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_gradient_against_mpmath(activation, hidden, w, b, kind):
    # The documented error of the central difference: 1e-11 to 1e-10 of the
    # largest entry of ∂K/∂log σ_w, and of max|K| for ∂K/∂log σ_b; held here
    # within 1e-9 of them.
    x = inputs(4)
    k = lk.Kernel(f"{hidden} * [dense, {activation}], dense", kind=kind, w_std=w, b_std=b)
    value, grad = k(x, eval_gradient=True)
    ref_value, ref_grad = mp_gradient(activation, hidden, x, w, b, kind)
    scale = np.max(np.abs(ref_value))
    assert_allclose(value, ref_value, rtol=0, atol=1e-14 * scale)
    assert grad.shape == (4, 4, 2)  # theta = (log b_std, log w_std)
    assert np.max(np.abs(grad[..., 0] - ref_grad[..., 0])) <= 1e-9 * scale
    assert (np.max(np.abs(grad[..., 1] - ref_grad[..., 1]))
            <= 1e-9 * np.max(np.abs(ref_grad[..., 1])))


@pytest.mark.parametrize("spec", ["3 * [dense, relu], dense",
                                  "dense, leaky_relu(alpha=0.2), dense, abs, dense"])
@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_gradient_of_a_homogeneous_network_is_exact(spec, kind, monkeypatch):
    # Bias-free, positively homogeneous: K(σ_w) = σ_w^(2L) K(1), so
    # ∂K/∂log σ_w = 2L K, with no further kernel evaluation.
    x = inputs(5)
    k = lk.Kernel(spec, kind=kind, w_std=1.7)
    assert k.n_dims == 1
    value, grad = k(x, eval_gradient=True)
    n_dense = sum(1 for layer in lk.parse(spec) if isinstance(layer, lk.Dense))
    assert_allclose(value, 1.7 ** (2 * n_dense) * lk.Kernel(spec, kind=kind, w_std=1.0)(x),
                    rtol=1e-13)
    calls = []
    real = SK.kernel
    monkeypatch.setattr(SK, "kernel", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    value, grad = k(x, eval_gradient=True)
    assert len(calls) == 1
    assert_allclose(grad[..., 0], 2 * n_dense * value, rtol=1e-15)
    if spec.startswith("3 * [dense, relu]"):
        ref_value, ref_grad = mp_gradient("relu", 3, x, 1.7, 1e-30, kind)
        assert_allclose(grad[..., 0], ref_grad[..., 1], rtol=1e-12,
                        atol=1e-14 * np.max(np.abs(ref_value)))


def tanh_nngp_and_gradient(x1, x2, w, b, step=0.08):
    """K of dense(w, b), tanh, dense(w, b) and ∂K/∂(log b, log w), by quadrature.

    K = w² E[tanh(u) tanh(v)] + b², (u, v) ~ N(0, Q), Q = w² X Xᵀ/d + b². With
    u = √q11 z1, v = √q22 (ρ z1 + √(1 − ρ²) z2), Price's theorem gives
    ∂E/∂q12 = E[φ'φ'], ∂E/∂q11 = ½ E[φ''(u) φ(v)], ∂E/∂q22 = ½ E[φ(u) φ''(v)].
    The trapezoidal rule on [-12, 12]² converges geometrically for these analytic
    integrands (error ~exp(−2π a/step), a the distance of tanh's poles from the
    real axis); the test compares two steps.
    """
    z = np.arange(-12.0, 12.0 + step / 2, step)
    wts = np.exp(-0.5 * z * z)
    wts /= wts.sum()
    z1, z2 = np.meshgrid(z, z, indexing="ij")
    ww = np.outer(wts, wts)
    d = len(x1)
    q11, q22 = w * w * (x1 @ x1) / d + b * b, w * w * (x2 @ x2) / d + b * b
    q12 = w * w * (x1 @ x2) / d + b * b
    rho = q12 / np.sqrt(q11 * q22)
    u = np.sqrt(q11) * z1
    v = np.sqrt(q22) * (rho * z1 + np.sqrt(max(1 - rho * rho, 0.0)) * z2)
    f = np.tanh
    d1 = 1 - np.tanh(u) ** 2, 1 - np.tanh(v) ** 2
    d2 = -2 * np.tanh(u) * d1[0], -2 * np.tanh(v) * d1[1]
    e = np.sum(ww * f(u) * f(v))
    de = np.array([np.sum(ww * 0.5 * d2[0] * f(v)), np.sum(ww * d1[0] * d1[1]),
                   np.sum(ww * 0.5 * f(u) * d2[1])])
    dq_dlogw = 2 * (np.array([q11, q12, q22]) - b * b)
    dq_dlogb = np.full(3, 2 * b * b)
    k = w * w * e + b * b
    return k, np.array([w * w * de @ dq_dlogb + 2 * b * b,
                        2 * w * w * e + w * w * de @ dq_dlogw])


def test_gradient_of_a_hermite_series_activation():
    # tanh has no closed form: the kernel is good to tol = 1e-13 relative, which
    # bounds the central difference's error by about 1e-8·2L·max|K| (documented);
    # held here within 1e-8·max|K|.
    x = inputs(4)
    w, b = 1.4, 0.3
    value, grad = lk.Kernel("dense, tanh, dense", kind="nngp", w_std=w, b_std=b)(
        x, eval_gradient=True)
    for i in range(4):
        for j in range(4):
            ref_value, ref_grad = tanh_nngp_and_gradient(x[i], x[j], w, b)
            again = tanh_nngp_and_gradient(x[i], x[j], w, b, step=0.06)
            assert_allclose(again[1], ref_grad, rtol=0, atol=1e-13)
            assert_allclose(value[i, j], ref_value, rtol=1e-12)
            assert np.max(np.abs(grad[i, j] - ref_grad)) <= 1e-8 * np.max(np.abs(value))


# ------------------------------------------------------------ fitting and searching


def regression_data(n=40, seed=3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3))
    noise = 0.05 * rng.standard_normal(n)
    return x, np.maximum(x[:, 0] + 0.5, 0.0) + 0.3 * x[:, 1] + noise


def test_gaussian_process_fit_optimises_the_hyperparameters():
    x, y = regression_data()
    start = lk.Kernel(RELU, kind="nngp", w_std=0.5, b_std=0.5)
    kern = start + WhiteKernel(0.1, noise_level_bounds=(1e-4, 1.0))
    gp = GaussianProcessRegressor(kern, normalize_y=True, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no convergence or bound warnings
        gp.fit(x, y)
    fitted = gp.kernel_
    assert fitted.k1.w_std != 0.5 and fitted.k1.b_std != 0.5
    lml0 = gp.log_marginal_likelihood(kern.theta)
    lml, lml_grad = gp.log_marginal_likelihood(fitted.theta, eval_gradient=True)
    assert lml > lml0 + 1.0
    # An interior optimum: the gradient, from the kernel's, vanishes there.
    assert np.all((fitted.bounds[:, 0] < fitted.theta) & (fitted.theta < fitted.bounds[:, 1]))
    assert np.max(np.abs(lml_grad)) < 1e-3 * abs(lml)
    # The marginal likelihood's gradient agrees with its own central difference.
    for k in range(fitted.n_dims):
        step = np.zeros(fitted.n_dims)
        step[k] = 1e-5
        fd = (gp.log_marginal_likelihood(fitted.theta + step)
              - gp.log_marginal_likelihood(fitted.theta - step)) / 2e-5
        assert abs(fd - lml_grad[k]) < 1e-5 * max(1.0, abs(lml))
    mean, std = gp.predict(x[:5], return_std=True)
    assert mean.shape == std.shape == (5,) and np.all(std > 0)
    assert np.max(np.abs(mean - y[:5])) < 0.3 * np.std(y)


def manual_cv_score(estimator, x, y, folds):
    scores = []
    for train, test in folds.split(x):
        scores.append(clone(estimator).fit(x[train], y[train]).score(x[test], y[test]))
    return np.mean(scores)


def test_grid_search_over_w_std_and_regulariser():
    x, y = regression_data(36)
    folds = KFold(3)
    gp = GaussianProcessRegressor(lk.Kernel(RELU, kind="nngp", w_std=1.0, b_std=0.1),
                                  optimizer=None, normalize_y=True)
    grid = {"kernel__w_std": [0.8, 1.6], "alpha": [1e-3, 1e-1]}
    search = GridSearchCV(gp, grid, cv=folds).fit(x, y)
    assert search.best_params_["kernel__w_std"] in (0.8, 1.6)
    for params, score in zip(search.cv_results_["params"],
                             search.cv_results_["mean_test_score"]):
        assert_allclose(score, manual_cv_score(clone(gp).set_params(**params), x, y, folds),
                        rtol=1e-10)
    # The estimators: a list of specs for σ_w, and diag_reg.
    grid = {"arch": [lk.mlp(2, "relu", w_std=w, b_std=0.05) for w in (1.0, 2.0)],
            "diag_reg": [1e-4, 1e-1]}
    search = GridSearchCV(lk.NTKRegressor(normalize_y=True), grid, cv=folds).fit(x, y)
    for params, score in zip(search.cv_results_["params"],
                             search.cv_results_["mean_test_score"]):
        expected = manual_cv_score(lk.NTKRegressor(normalize_y=True, **params), x, y, folds)
        assert_allclose(score, expected, rtol=1e-10)
    assert search.best_estimator_.predict(x[:3]).shape == (3,)


# ------------------------------------------------------------ without scikit-learn


def test_without_scikit_learn(monkeypatch):
    for name in ("sklearn", "sklearn.gaussian_process", "sklearn.gaussian_process.kernels"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(SK, "_CLASSES", {})
    plain = SK.Kernel
    assert not plain._uses_sklearn
    monkeypatch.undo()
    x = inputs()
    k = plain("2 * [dense, erf], dense", kind="nngp", w_std=1.2, b_std=0.3)
    ref = lk.Kernel("2 * [dense, erf], dense", kind="nngp", w_std=1.2, b_std=0.3)
    assert_allclose(k(x), ref(x), rtol=0, atol=0)
    assert_allclose(k(x, eval_gradient=True)[1], ref(x, eval_gradient=True)[1], rtol=0, atol=0)
    assert_allclose(k.diag(x), ref.diag(x), rtol=0, atol=0)
    assert_allclose(k.theta, ref.theta) and assert_allclose(k.bounds, ref.bounds)
    assert [h.name for h in k.hyperparameters] == ["b_std", "w_std"]
    assert k.get_params() == ref.get_params() and k.n_dims == 2
    moved = k.clone_with_theta(np.log([0.5, 2.0]))
    assert (moved.b_std, moved.w_std) == pytest.approx((0.5, 2.0)) and k.w_std == 1.2
    assert moved == plain("2 * [dense, erf], dense", kind="nngp", w_std=2.0, b_std=0.5)
    assert k.set_params(w_std=1.0) is k and k.w_std == 1.0
    with pytest.raises(ValueError, match="invalid parameter"):
        k.set_params(width=3)
    with pytest.raises(ValueError, match="theta has 1 entries, expected 2"):
        k.theta = [0.0]
    with pytest.raises(TypeError):
        k + k  # combining kernels needs scikit-learn


def test_images_through_input_shape_and_conv_scales():
    """Flattened images with input_shape give the kernel of the images; σ_w and σ_b
    replace those of conv layers too; the exact log σ_w gradient of a bias-free
    ReLU CNN (2L·K, L = 3 conv and dense layers) matches a central difference."""
    x = np.random.default_rng(0).standard_normal((5, 4, 4, 1))
    spec = "conv, relu, avg_pool, conv, relu, global_avg_pool, dense"
    k = lk.Kernel(spec, kind="nngp", w_std=1.3, input_shape=(4, 4, 1))
    scaled = "conv(w_std=1.3), relu, avg_pool, conv(w_std=1.3), relu, global_avg_pool, " \
             "dense(w_std=1.3)"
    np.testing.assert_allclose(k(x.reshape(5, -1)), lk.kernel(scaled, x)["nngp"], rtol=1e-14)
    K, grad = k(x.reshape(5, -1), eval_gradient=True)
    up = lk.kernel(scaled.replace("1.3", repr(float(1.3 * np.exp(1e-5)))), x)["nngp"]
    down = lk.kernel(scaled.replace("1.3", repr(float(1.3 * np.exp(-1e-5)))), x)["nngp"]
    np.testing.assert_allclose(grad[..., 0], (up - down) / 2e-5, rtol=1e-8)
    np.testing.assert_allclose(grad[..., 0], 6 * K, rtol=1e-14)
    with pytest.raises(ValueError, match="input_shape"):
        lk.Kernel(spec, input_shape=(4, 5, 1))(x.reshape(5, -1))
