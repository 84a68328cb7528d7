"""Prediction: gradient-flow ensembles, NNGP posterior, diagnostics, estimators."""

import sys

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from numpy.testing import assert_allclose

import limitkernel as lk
import limitkernel.gram as G
import limitkernel.predict as P

RELU2 = "2 * [dense(w_std=1.5, b_std=0.05), relu], dense(w_std=1.5, b_std=0.05)"
RELU1 = "dense(w_std=1.5, b_std=0.05), relu, dense(w_std=1.5, b_std=0.05)"


def data(n=24, m=7, d=5, c=None, seed=0):
    rng = np.random.default_rng(seed)
    x, xs = rng.standard_normal((n, d)), rng.standard_normal((m, d))
    y = rng.standard_normal(n if c is None else (n, c))
    return x, y, xs


def rel(a, b):
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


# ------------------------------------------------------------ Neural Tangents


def test_matches_neural_tangents_reference_values():
    # Produced with neural-tangents 0.6.5 (jax 0.4.23, x64 enabled):
    #   x = np.sin(np.arange(18.0).reshape(6, 3) * 0.7 + 0.3)
    #   y = np.cos(np.arange(12.0).reshape(6, 2) * 1.3)
    #   xs = np.cos(np.arange(6.0).reshape(2, 3) * 0.9 + 0.1)
    #   _, _, kfn = stax.serial(stax.Dense(1, W_std=1.5, b_std=0.05), stax.Relu(),
    #                           stax.Dense(1, W_std=1.5, b_std=0.05))
    #   pf = nt.predict.gradient_descent_mse_ensemble(kfn, x, y, learning_rate=2.0,
    #                                                 diag_reg=1e-2)
    #   r = getattr(pf(t=np.array([3.0, 30.0]), x_test=xs, get=(g,),
    #                  compute_cov=True), g)          # g in ("ntk", "nngp")
    x = np.sin(np.arange(18.0).reshape(6, 3) * 0.7 + 0.3)
    y = np.cos(np.arange(12.0).reshape(6, 2) * 1.3)
    xs = np.cos(np.arange(6.0).reshape(2, 3) * 0.9 + 0.1)
    ref = {
        "ntk": (
            [[[-0.419731538317875, -0.14796855111084262],
              [0.6117774196717259, 0.34738285496734533]],
             [[-0.6129977729951372, -0.2741143490906828],
              [0.6655053847951224, 0.3328089854953257]]],
            [[[0.26756538842541877, 0.013064464615423946],
              [0.013064464615423932, 0.049258057682699086]],
             [[0.20325402037915896, 0.0176303546340031],
              [0.0176303546340031, 0.0416105936065323]]],
        ),
        "nngp": (
            [[[-0.23683804364262856, -0.13314143383899613],
              [0.5044278816289134, 0.28597004526474623]],
             [[-0.6579128588127862, -0.22319081067265956],
              [0.708948405559291, 0.3606044924819006]]],
            [[[0.3793206182242196, -0.019663799758249098],
              [-0.019663799758249098, 0.10460959030895767]],
             [[0.2014358660880352, 0.018623862135120364],
              [0.018623862135120364, 0.04387722685050788]]],
        ),
    }
    out = lk.predict_ensemble(RELU1, x, y, xs, t=[3.0, 30.0], learning_rate=2.0,
                              diag_reg=1e-2, cov="full")
    for kind, (mean, cov) in ref.items():
        assert_allclose(out[kind].mean, mean, rtol=1e-12, atol=1e-14)
        assert_allclose(out[kind].cov, cov, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------ exact limits


@pytest.mark.parametrize("kind", ["ntk", "nngp"])
def test_time_zero_is_the_prior(kind):
    x, y, xs = data(c=3)
    pred = lk.predict_ensemble(RELU2, x, y, xs, t=0.0, get=kind, cov="full")[kind]
    assert np.all(pred.mean == 0.0)
    assert_allclose(pred.cov, lk.kernel(RELU2, xs, get="nngp")["nngp"], rtol=1e-14)
    var = lk.predict_ensemble(RELU2, x, y, xs, t=0.0, get=kind, cov="var")[kind].var
    assert_allclose(var, lk.kernel_diag(RELU2, xs)["nngp"], rtol=1e-14)


@pytest.mark.parametrize("kind", ["ntk", "nngp"])
@pytest.mark.parametrize("t", [np.inf, [np.inf, 1.0]])
@pytest.mark.parametrize("c", [None, 2])
def test_infinite_time_interpolates_training_targets(kind, t, c):
    x, y, _ = data(c=c)
    pred = lk.predict_ensemble(RELU2, x, y, x, t=t, get=kind, cov="full")[kind]
    mean = pred.mean if np.ndim(t) == 0 else pred.mean[0]
    cov = pred.cov if np.ndim(t) == 0 else pred.cov[0]
    assert mean.shape == y.shape
    assert_allclose(mean, y, atol=1e-9)
    scale = np.max(lk.kernel_diag(RELU2, x)["nngp"])
    assert np.max(np.abs(cov)) < 1e-9 * scale


def linear_features(x, w1, b1, w2, b2):
    """Features of "dense(w1, b1), identity, dense(w2, b2)": φφᵀ = Θ, ψψᵀ = K."""
    d = x.shape[1]
    ones = np.ones((x.shape[0], 1))
    psi = np.hstack([w2 * w1 * x / np.sqrt(d), w2 * b1 * ones, b2 * ones])
    phi = np.hstack([np.sqrt(2) * w2 * w1 * x / np.sqrt(d), np.sqrt(2) * w2 * b1 * ones,
                     b2 * ones])
    return phi, psi


LINEAR = "dense(w_std=1.3, b_std=0.4), identity, dense(w_std=0.7, b_std=0.2)"
LINEAR_PARAMS = (1.3, 0.4, 0.7, 0.2)


def test_identity_network_at_convergence_is_ridge_and_min_norm_regression():
    rng = np.random.default_rng(3)
    # More inputs than features: the NTK has rank d + 2 and needs a ridge.
    x, xs = rng.standard_normal((40, 4)), rng.standard_normal((9, 4))
    y = rng.standard_normal((40, 2))
    phi, _ = linear_features(x, *LINEAR_PARAMS)
    phis, _ = linear_features(xs, *LINEAR_PARAMS)
    lam = 0.3
    ridge = np.linalg.solve(phi.T @ phi + lam * np.eye(phi.shape[1]), phi.T @ y)
    got = lk.predict_ensemble(LINEAR, x, y, xs, get="ntk", diag_reg=lam,
                              diag_reg_absolute=True, cov=None)["ntk"].mean
    assert_allclose(got, phis @ ridge, rtol=1e-10)
    # Fewer inputs than features: minimum-norm interpolation (numpy's lstsq).
    x, xs = rng.standard_normal((5, 12)), rng.standard_normal((6, 12))
    y = rng.standard_normal(5)
    phi, _ = linear_features(x, *LINEAR_PARAMS)
    phis, _ = linear_features(xs, *LINEAR_PARAMS)
    coef = np.linalg.lstsq(phi, y, rcond=None)[0]
    got = lk.predict_ensemble(LINEAR, x, y, xs, get="ntk", cov=None)["ntk"].mean
    assert_allclose(got, phis @ coef, rtol=1e-10)


def test_identity_network_at_finite_time_is_gradient_flow_of_linear_regression():
    # θ' = −η/(N c) Φᵀ(Φθ − Y) from θ = 0, solved by the exponential of the
    # augmented matrix [[A, B], [0, 0]]: an independent check of the time scale.
    rng = np.random.default_rng(4)
    x, xs = rng.standard_normal((6, 10)), rng.standard_normal((4, 10))
    y = rng.standard_normal((6, 3))
    lr, t = 0.7, 5.0
    phi, _ = linear_features(x, *LINEAR_PARAMS)
    phis, _ = linear_features(xs, *LINEAR_PARAMS)
    p = phi.shape[1]
    a = -lr / y.size * phi.T @ phi
    b = lr / y.size * phi.T @ y
    block = np.zeros((p + 3, p + 3))
    block[:p, :p], block[:p, p:] = a, b
    theta = scipy.linalg.expm(block * t)[:p, p:]
    got = lk.predict_ensemble(LINEAR, x, y, xs, t=t, get="ntk", learning_rate=lr)["ntk"]
    assert_allclose(got.mean, phis @ theta, rtol=1e-10)


def test_nngp_posterior_is_bayesian_linear_regression_for_identity_network():
    rng = np.random.default_rng(5)
    x, xs = rng.standard_normal((30, 3)), rng.standard_normal((8, 3))
    y = rng.standard_normal(30)
    noise = 0.05
    _, psi = linear_features(x, *LINEAR_PARAMS)
    _, psis = linear_features(xs, *LINEAR_PARAMS)
    # Prior θ ~ N(0, I): posterior precision I + ψᵀψ/σ².
    post_cov = np.linalg.inv(np.eye(psi.shape[1]) + psi.T @ psi / noise)
    post_mean = post_cov @ psi.T @ y / noise
    got = lk.nngp_posterior(LINEAR, x, y, xs, noise=noise, cov="full")
    assert_allclose(got.mean, psis @ post_mean, rtol=1e-10)
    assert_allclose(got.cov, psis @ post_cov @ psis.T, rtol=1e-9, atol=1e-13)
    var = lk.nngp_posterior(LINEAR, x, y, xs, noise=noise, cov="var").var
    assert_allclose(var, np.diag(psis @ post_cov @ psis.T), rtol=1e-9)


@pytest.mark.parametrize("kind", ["ntk", "nngp"])
def test_covariance_equals_linear_map_of_the_prior(kind):
    # f_t = f_0(X*) − Θ*X A (f_0(X) − Y) with A = Θ⁻¹(I − e^{−sΘ}) from scipy's
    # expm and a linear solve, applied to the joint prior of (f_0(X), f_0(X*)).
    x, y, xs = data(n=15, m=6, c=2)
    lr, t, reg = 1.5, 40.0, 1e-3
    both = np.vstack([x, xs])
    k_all = lk.kernel(RELU2, both)
    prior = k_all["nngp"]
    train = k_all[kind][:15, :15] + reg * np.trace(k_all[kind][:15, :15]) / 15 * np.eye(15)
    s = lr * t / y.size
    a = np.linalg.solve(train, np.eye(15) - scipy.linalg.expm(-s * train))
    lin = np.hstack([-k_all[kind][15:, :15] @ a, np.eye(6)])
    got = lk.predict_ensemble(RELU2, x, y, xs, t=t, get=kind, learning_rate=lr,
                              diag_reg=reg, cov="full")[kind]
    if kind == "ntk":
        assert_allclose(got.cov, lin @ prior @ lin.T, rtol=1e-9, atol=1e-12)
    else:
        # Neural Tangents' NNGP form uses the regularised K throughout.
        k_reg = prior.copy()
        k_reg[:15, :15] = train
        assert_allclose(got.cov, lin @ k_reg @ lin.T, rtol=1e-9, atol=1e-12)
    assert_allclose(got.mean, k_all[kind][15:, :15] @ a @ y, rtol=1e-10)


@pytest.mark.parametrize("kind", ["ntk", "nngp"])
def test_finite_time_converges_to_infinite_time(kind):
    x, y, xs = data(c=2)
    times = [1e1, 1e2, 1e3, 1e4, 1e6, 1e9]
    inf = lk.predict_ensemble(RELU2, x, y, xs, get=kind, cov="full")[kind]
    fin = lk.predict_ensemble(RELU2, x, y, xs, t=times, get=kind, cov="full")[kind]
    errors = [rel(m, inf.mean) for m in fin.mean]
    assert np.all(np.diff(errors) <= 0)
    assert errors[0] > 1e-3 and errors[-1] < 1e-9
    assert rel(fin.cov[-1], inf.cov) < 1e-8


@pytest.mark.parametrize("kind", ["ntk", "nngp"])
def test_eigendecomposition_at_infinity_agrees_with_cholesky(kind):
    x, y, xs = data(n=60, m=10, c=3, seed=2)
    chol = lk.predict_ensemble(RELU2, x, y, xs, t=np.inf, get=kind, diag_reg=1e-6,
                               cov="full")[kind]
    eigh = lk.predict_ensemble(RELU2, x, y, xs, t=[1e30, np.inf], get=kind,
                               diag_reg=1e-6, cov="full")[kind]
    for k in range(2):
        assert_allclose(eigh.mean[k], chol.mean, rtol=1e-8, atol=1e-10)
        assert_allclose(eigh.cov[k], chol.cov, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kind", ["ntk", "nngp"])
def test_times_whose_products_overflow_are_the_infinite_time_limit(kind):
    """Found by fuzzing the command line: --time 1e308 overflowed λ·2t to inf with a
    RuntimeWarning (an "internal error" under warnings as errors); e^{−∞} = 0 is the
    t → ∞ limit, which the Cholesky solve at t = ∞ gives independently."""
    x, y, xs = data(n=60, m=10, c=3, seed=2)
    chol = lk.predict_ensemble(RELU2, x, y, xs, t=np.inf, get=kind, diag_reg=1e-6,
                               cov="full")[kind]
    # η = N c makes the exponent's time scale 1: s = t = 1e308, and 2s overflows.
    huge = lk.predict_ensemble(RELU2, x, y, xs, t=[1e308], get=kind, diag_reg=1e-6,
                               learning_rate=60 * 3, cov="full")[kind]
    assert_allclose(huge.mean[0], chol.mean, rtol=1e-8, atol=1e-10)
    assert_allclose(huge.cov[0], chol.cov, rtol=1e-8, atol=1e-10)


def test_multiple_outputs_share_one_time_scale_n_times_c():
    # Loss ½·mean over N·c targets: with c outputs, each column at time t equals a
    # single-output fit of that column at time t / c.
    x, y, xs = data(c=3)
    multi = lk.predict_ensemble(RELU2, x, y, xs, t=30.0, get="ntk", cov="full")["ntk"]
    for j in range(3):
        single = lk.predict_ensemble(RELU2, x, y[:, j], xs, t=10.0, get="ntk",
                                     cov="full")["ntk"]
        assert_allclose(multi.mean[:, j], single.mean, rtol=1e-12)
        assert_allclose(multi.cov, single.cov, rtol=1e-12)


def test_shapes_times_and_variance_without_test_test_matrix(monkeypatch):
    x, y, xs = data(c=2)
    full = lk.predict_ensemble(RELU2, x, y, xs, t=[0.0, 5.0, np.inf], cov="full")
    calls = []
    real_kernel = P.kernel

    def spy(spec, x1, x2=None, **kwargs):
        calls.append((x1.shape[0], None if x2 is None else x2.shape[0]))
        return real_kernel(spec, x1, x2, **kwargs)

    monkeypatch.setattr(P, "kernel", spy)
    var = lk.predict_ensemble(RELU2, x, y, xs, t=[0.0, 5.0, np.inf], cov="var")
    assert (xs.shape[0], None) not in calls  # no M × M matrix
    for kind in ("ntk", "nngp"):
        assert full[kind].mean.shape == (3, 7, 2)
        assert full[kind].cov.shape == (3, 7, 7)
        assert_allclose(full[kind].t, [0.0, 5.0, np.inf])
        assert var[kind].cov is None
        assert_allclose(var[kind].var, np.stack([np.diag(c) for c in full[kind].cov]),
                        rtol=1e-10, atol=1e-13)
        assert_allclose(var[kind].mean, full[kind].mean, rtol=1e-13)
    mean_only = lk.predict_ensemble(RELU2, x, y[:, 0], xs, t=2.0, get="ntk", cov=None)["ntk"]
    assert mean_only.mean.shape == (7,) and mean_only.cov is None and mean_only.var is None


def test_default_is_the_mean_only_without_test_test_kernel_or_nngp(monkeypatch):
    x, y, xs = data(c=2)
    calls = []
    real_kernel, real_diag = P.kernel, P.kernel_diag

    def spy(spec, x1, x2=None, get=("nngp", "ntk"), **kwargs):
        calls.append((x1.shape[0], None if x2 is None else x2.shape[0], get))
        return real_kernel(spec, x1, x2, get=get, **kwargs)

    def spy_diag(*args, **kwargs):
        calls.append("diag")
        return real_diag(*args, **kwargs)

    monkeypatch.setattr(P, "kernel", spy)
    monkeypatch.setattr(P, "kernel_diag", spy_diag)
    for t in (np.inf, [1.0, np.inf]):
        calls.clear()
        pred = lk.predict_ensemble(RELU2, x, y, xs, t=t, get="ntk")["ntk"]
        assert pred.cov is None and pred.var is None
        assert "diag" not in calls and (7, None, "nngp") not in calls
        assert all("nngp" not in call[2] for call in calls)  # the NTK alone
        full = lk.predict_ensemble(RELU2, x, y, xs, t=t, get="ntk", cov="full")["ntk"]
        assert_allclose(pred.mean, full.mean, rtol=1e-14)
    assert lk.nngp_posterior(RELU2, x, y, xs, noise=0.1).cov is None
    assert lk.GradientFlowEnsemble(RELU2, x, y).predict(xs)["nngp"].var is None


def test_ensemble_reuses_one_factorisation_for_all_times(monkeypatch):
    x, y, xs = data()
    ens = lk.GradientFlowEnsemble(RELU2, x, y)
    count = {"eigh": 0}
    real = scipy.linalg.eigh

    def counting(*args, **kwargs):
        count["eigh"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(P.scipy.linalg, "eigh", counting)
    ens.predict(xs, t=[1.0, 2.0], get="ntk")
    ens.predict(xs[:3], t=[3.0, 4.0, 5.0], get="ntk")
    assert count["eigh"] == 1


def test_learning_rate_only_scales_time():
    x, y, xs = data()
    a = lk.predict_ensemble(RELU2, x, y, xs, t=8.0, learning_rate=0.25)
    b = lk.predict_ensemble(RELU2, x, y, xs, t=2.0, learning_rate=1.0)
    for kind in ("ntk", "nngp"):
        assert_allclose(a[kind].mean, b[kind].mean, rtol=1e-13)


# ------------------------------------------------------------ positive definiteness


def test_duplicate_inputs_fail_with_cause_and_fix_never_nan():
    x, y, xs = data()
    xd, yd = np.vstack([x, x[5]]), np.append(y, 0.5)
    for t in (np.inf, [1.0, 100.0]):
        for kind in ("ntk", "nngp"):
            with pytest.raises(lk.NotPositiveDefiniteError) as err:
                lk.predict_ensemble(RELU2, xd, yd, xs, t=t, get=kind)
            message = str(err.value)
            assert "inputs 5 and 24 are identical" in message
            assert "diag_reg=" in message and "\n" not in message
            assert err.value.report.pairs[0][:2] == (5, 24)
    out = lk.predict_ensemble(RELU2, xd, yd, xs, t=[1.0, np.inf], diag_reg=1e-8,
                              cov="full")
    for pred in out.values():
        assert np.all(np.isfinite(pred.mean)) and np.all(np.isfinite(pred.cov))
    with pytest.raises(lk.NotPositiveDefiniteError, match="noise="):
        lk.nngp_posterior(RELU2, xd, yd, xs)
    assert np.all(np.isfinite(lk.nngp_posterior(RELU2, xd, yd, xs, noise=1e-6).mean))


def brute_force_identical_pairs(x):
    """Every (i, j), i < j, with x[i] == x[j] in every feature, j paired with its first i."""
    pairs = []
    for j in range(len(x)):
        for i in range(j):
            if np.all(x[i] == x[j]):
                pairs.append((i, j))
                break
    return pairs


@given(arrays(np.float64, st.tuples(st.integers(1, 30), st.integers(1, 3)),
              elements=st.sampled_from([0.0, -0.0, 1.0, -2.5, 1e-300])))
def test_identical_rows_match_a_brute_force_search(x):
    # Few distinct values: many repeated rows; -0.0 equals 0.0 as a number.
    expected = sorted(brute_force_identical_pairs(x))
    assert [tuple(p) for p in P._identical_rows(x)] == expected
    # Hash collisions between different rows are split exactly: here every row
    # collides with every other, or with every other with as many zeros.
    real = G._row_hashes
    for fake in (lambda x: np.zeros(len(x), dtype=np.uint64),
                 lambda x: np.count_nonzero(x == 0, axis=1).astype(np.uint64)):
        G._row_hashes = fake
        try:
            assert [tuple(p) for p in P._identical_rows(x)] == expected
        finally:
            G._row_hashes = real


# Networks whose computed kernel at two identical inputs is not exactly its
# diagonal (the rows differ by rounding or quadrature error), so the eigenvalues
# alone call it positive definite.
SPREAD_SPECS = ["dense, elu, dense, relu, dense", "dense, softsign, dense, relu, dense",
                "dense, erf, dense"]


@pytest.mark.parametrize("spec", SPREAD_SPECS)
def test_identical_inputs_make_the_kernel_singular_whatever_its_eigenvalues(spec):
    x, _, _ = data(n=20)
    xd = np.vstack([x, x[3]])
    for kind, report in lk.check_kernel(spec, xd).items():
        assert report.duplicates == ((3, 20),)
        assert not report.positive_definite, (kind, report.smallest, report.tol)
        assert report.condition == np.inf and report.rank <= 20
        assert "inputs 3 and 20 are identical" in report.summary()
        assert "remove the repeated inputs" in report.fix() and "diag_reg=" in report.fix()
        assert "identical inputs     1 pairs: (3, 20)" in str(report)
        # A regulariser makes the exact kernel positive definite (as for any
        # singular kernel); the suggested one outweighs the spread at the pair.
        fixed = lk.check_kernel(spec, xd, get=kind, diag_reg=report.suggested_diag_reg)
        assert fixed[kind].positive_definite
        assert report.suggested_diag_reg * report.mean_diagonal >= 100 * \
            report.duplicate_spread
    clean = lk.check_kernel(spec, x)
    assert all(r.positive_definite and r.duplicates == () for r in clean.values())


@pytest.mark.parametrize("t", [np.inf, [1.0, 100.0]])
def test_predictions_refuse_identical_inputs_without_regulariser(t):
    x, y, xs = data(n=20)
    xd = np.vstack([x, x[3]])
    spec = SPREAD_SPECS[0]
    for kind in ("ntk", "nngp"):
        with pytest.raises(lk.NotPositiveDefiniteError) as err:
            lk.predict_ensemble(spec, xd, np.append(y, y[3]), xs, t=t, get=kind)
        message = str(err.value)
        assert "inputs 3 and 20 are identical" in message and "\n" not in message
        assert "diag_reg=" in message and "remove the repeated inputs" in message
        assert "different targets" not in message
        with pytest.raises(lk.NotPositiveDefiniteError,
                           match="inputs 3 and 20 are identical but have different targets"):
            lk.predict_ensemble(spec, xd, np.append(y, y[3] + 1.0), xs, t=t, get=kind)
    out = lk.predict_ensemble(spec, xd, np.append(y, y[3]), xs, t=t, diag_reg=1e-2)
    assert all(np.all(np.isfinite(p.mean)) for p in out.values())


def test_every_prediction_path_refuses_identical_inputs():
    x, y, xs = data(n=20, c=2)
    xd, yd = np.vstack([x, x[7], x[2]]), np.vstack([y, y[7], y[2] + [0.0, 1.0]])
    spec = SPREAD_SPECS[1]
    with pytest.raises(lk.NotPositiveDefiniteError, match="noise=") as err:
        lk.nngp_posterior(spec, xd, yd, xs)
    assert "inputs 2 and 21 are identical but have different targets" in str(err.value)
    assert "2 pairs of identical inputs in all, 1 of them" in str(err.value)
    assert err.value.report.duplicates == ((2, 21), (7, 20))
    assert err.value.report.conflicts == ((2, 21),)
    ens = lk.GradientFlowEnsemble(spec, xd, yd)
    with pytest.raises(lk.NotPositiveDefiniteError, match="identical"):
        ens.factorise("ntk", finite=True)
    for estimator in (lk.NTKRegressor(spec, diag_reg=0.0),
                      lk.NNGPRegressor(spec, diag_reg=0.0, normalize_y=True)):
        with pytest.raises(lk.NotPositiveDefiniteError, match="inputs 2 and 21"):
            estimator.fit(xd, yd)
        estimator.set_params(diag_reg=1e-3).fit(xd, yd)
    labels = np.append(np.arange(20) % 3, [7 % 3, 2 % 3 + 1])
    with pytest.raises(lk.NotPositiveDefiniteError, match="different targets"):
        lk.NTKClassifier(spec, diag_reg=0.0).fit(xd, labels)


def test_identical_inputs_with_dropout_are_distinct_examples():
    # Independent dropout masks: the kernel is larger on its diagonal, genuinely
    # positive definite at identical inputs.
    x, y, xs = data(n=20)
    xd = np.vstack([x, x[3]])
    spec = "dense(b_std=0.1), relu, dropout(p=0.2), dense, relu, dense"
    report = lk.check_kernel(spec, xd, get="ntk")["ntk"]
    assert report.duplicates == ((3, 20),) and report.positive_definite
    assert "with dropout they are distinct examples" in str(report)
    pred = lk.predict_ensemble(spec, xd, np.append(y, -y[3]), xs, get="ntk")["ntk"]
    assert np.all(np.isfinite(pred.mean))


def test_check_command_fails_on_identical_inputs(tmp_path, capsys):
    from limitkernel.cli import main

    x, _, _ = data(n=20)
    np.save(tmp_path / "x.npy", np.vstack([x, x[3]]))
    with pytest.raises(SystemExit) as exit_info:
        main(["check", "--arch", SPREAD_SPECS[0], "--x", str(tmp_path / "x.npy")])
    assert exit_info.value.code == 1
    assert "inputs 3 and 20 are identical" in capsys.readouterr().out
    assert main(["check", "--arch", SPREAD_SPECS[0], "--x", str(tmp_path / "x.npy"),
                 "--diag-reg", "1e-2"]) == 0


def test_degenerate_deep_kernel_fails_with_its_cause():
    x, y, xs = data(n=20)
    deep = "30 * [dense(w_std=1.0, b_std=2.0), erf], dense"
    with pytest.warns(RuntimeWarning, match="degenerate"), \
            pytest.raises(lk.NotPositiveDefiniteError, match="kernel is degenerate"):
        lk.predict_ensemble(deep, x, y, xs, get="ntk")


def test_parallel_inputs_of_a_homogeneous_network_are_indistinguishable():
    x, y, xs = data()
    xd = np.vstack([x, 3.0 * x[2]])
    with pytest.raises(lk.NotPositiveDefiniteError, match="indistinguishable to the kernel"):
        lk.predict_ensemble("dense, relu, dense", xd, np.append(y, 1.0), xs, get="ntk")


def test_low_rank_kernel_is_reported_as_such():
    x, y, xs = data(n=20, d=3)
    with pytest.raises(lk.NotPositiveDefiniteError, match="rank 3 on 20 inputs"):
        lk.predict_ensemble("dense, identity, dense", x, y, xs, get="ntk", t=[5.0])


def test_check_kernel_report():
    x, _, _ = data(n=30)
    reports = lk.check_kernel(RELU2, x)
    for kind, report in reports.items():
        evals = np.linalg.eigvalsh(lk.kernel(RELU2, x)[kind])
        assert report.positive_definite and report.rank == 30 and report.n_pairs == 0
        assert_allclose([report.smallest, report.largest], evals[[0, -1]], rtol=1e-8)
        assert_allclose(report.condition, evals[-1] / evals[0], rtol=1e-8)
        assert "positive definite" in str(report) and "condition number" in str(report)
    bad = lk.check_kernel(RELU2, np.vstack([x, x[:3]]), get="ntk")["ntk"]
    assert not bad.positive_definite and bad.rank == 30 and bad.n_pairs == 3
    assert {p[:2] for p in bad.pairs} == {(0, 30), (1, 31), (2, 32)}
    assert all(p[3] for p in bad.pairs)
    assert "NOT positive definite" in str(bad) and "fix:" in str(bad)
    fixed = lk.check_kernel(RELU2, np.vstack([x, x[:3]]), get="ntk",
                            diag_reg=bad.suggested_diag_reg)["ntk"]
    assert fixed.positive_definite


def test_report_from_matrix_with_known_spectrum():
    rng = np.random.default_rng(0)
    q = np.linalg.qr(rng.standard_normal((6, 6)))[0]
    evals = np.array([1e-20, 1e-3, 0.1, 1.0, 2.0, 5.0])
    report = lk.KernelReport.from_matrix(q @ np.diag(evals) @ q.T)
    assert report.rank == 5 and not report.positive_definite
    assert_allclose(report.largest, 5.0, rtol=1e-12)
    assert "no pair of inputs explains it" in report.summary()
    zero = lk.KernelReport.from_matrix(np.zeros((3, 3)))
    assert "zero" in zero.summary() and "b_std > 0" in zero.summary()


# ------------------------------------------------------------ cross-entropy flow


def test_cross_entropy_flow_loss_rate_and_start():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 4))
    labels = (x[:, 0] + 0.3 * x[:, 1] > 0).astype(int) + (x[:, 2] > 1).astype(int)
    lr, h = 0.8, 1e-3
    times = [50.0, 0.0, 5.0, 5.0 - h, 5.0 + h, 1e-6]
    flow = lk.cross_entropy_flow(RELU2, x, labels, x[:5], t=times, learning_rate=lr,
                                 rtol=1e-12, atol=1e-14)
    c = 3
    assert_allclose(flow.loss[1], np.log(c) / c, rtol=1e-14)
    assert_allclose(flow.proba_train[1], 1.0 / c)
    # dC/dt from the trajectory matches ΔC = −η ⟨∇C, Θ ∇C⟩.
    slope = (flow.loss[4] - flow.loss[3]) / (2 * h)
    assert_allclose(slope, flow.loss_rate[2], rtol=1e-6)
    assert np.all(flow.loss_rate <= 0) and flow.loss[0] < flow.loss[2] < flow.loss[1]
    # Start of the flow: f(δ) ≈ −η δ Θ (p₀ − Y) / (N c).
    theta = lk.kernel(RELU2, x, get="ntk")["ntk"]
    onehot = np.eye(c)[labels]
    start = -lr * 1e-6 * theta @ (1.0 / c - onehot) / onehot.size
    assert_allclose(flow.logits_train[5], start, rtol=1e-5, atol=1e-14)
    assert_allclose(flow.proba_test.sum(-1), 1.0)
    assert_allclose(flow.logits_test[0], flow.logits_train[0][:5], rtol=1e-8)
    assert list(flow.classes) == [0, 1, 2]
    with pytest.raises(ValueError, match="finite"):
        lk.cross_entropy_flow(RELU2, x, labels, t=np.inf)


# ------------------------------------------------------------ estimators


def test_regressors_match_the_functions():
    x, y, xs = data(c=2)
    ntk = lk.NTKRegressor(RELU2, t=7.0, diag_reg=1e-4).fit(x, y)
    ref = lk.predict_ensemble(RELU2, x, y, xs, t=7.0, get="ntk", diag_reg=1e-4,
                              cov="full")["ntk"]
    mean, std = ntk.predict(xs, return_std=True)
    assert_allclose(mean, ref.mean, rtol=1e-12)
    assert std.shape == (7, 2)
    assert_allclose(std[:, 1], np.sqrt(np.diag(ref.cov)), rtol=1e-9)
    assert ntk.predict(xs, return_cov=True)[1].shape == (7, 7, 2)
    nngp = lk.NNGPRegressor(RELU2, diag_reg=0.01, diag_reg_absolute=True).fit(x, y[:, 0])
    post = lk.nngp_posterior(RELU2, x, y[:, 0], xs, noise=0.01, cov="full")
    mean, cov = nngp.predict(xs, return_cov=True)
    assert_allclose(mean, post.mean, rtol=1e-12)
    assert_allclose(cov, post.cov, rtol=1e-12)
    assert nngp.score(x, y[:, 0]) > 0.95
    with pytest.raises(ValueError, match="at most one"):
        nngp.predict(xs, return_std=True, return_cov=True)


def diabetes_split():
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x = x / np.std(x, axis=0)  # unit-variance features: K⁰ = x·x'/d of order 1
    return x[:300], y[:300], x[300:360], y[300:360]


def test_normalize_y_puts_mean_and_std_in_target_units():
    pytest.importorskip("sklearn")
    x, y, xs, ys = diabetes_split()
    mu, sigma = y.mean(), y.std()
    assert 100 < mu < 200 and sigma > 50
    for cls in (lk.NTKRegressor, lk.NNGPRegressor):
        raw = cls(RELU2, diag_reg=0.1, normalize_y=True).fit(x, y)
        unit = cls(RELU2, diag_reg=0.1).fit(x, (y - mu) / sigma)
        mean, std = raw.predict(xs, return_std=True)
        mean_u, std_u = unit.predict(xs, return_std=True)
        assert_allclose(mean, sigma * mean_u + mu, rtol=1e-12)
        assert_allclose(std, sigma * std_u, rtol=1e-12)
        _, cov = raw.predict(xs, return_cov=True)
        assert_allclose(cov, sigma ** 2 * unit.predict(xs, return_cov=True)[1], rtol=1e-12)
        assert_allclose(raw.y_train_mean_, mu) and assert_allclose(raw.y_train_std_, sigma)
        # The same std from the ensemble function on standardised targets.
        kind = "ntk" if cls is lk.NTKRegressor else "nngp"
        ref = lk.predict_ensemble(RELU2, x, (y - mu) / sigma, xs, get=kind, diag_reg=0.1,
                                  cov="var")[kind]
        assert_allclose(std, sigma * np.sqrt(ref.var), rtol=1e-9)
        assert np.mean(np.abs(mean - ys)) < sigma  # it learns something
    # Untrained (t = 0): the prior, the targets' mean ± σ_y √K(x, x).
    prior = lk.NTKRegressor(RELU2, t=0.0, normalize_y=True).fit(x, y)
    mean, std = prior.predict(xs, return_std=True)
    assert_allclose(mean, mu, rtol=1e-14)
    assert_allclose(std, sigma * np.sqrt(lk.kernel_diag(RELU2, xs)["nngp"]), rtol=1e-12)
    # Without normalize_y the std is that of the network, whatever the targets.
    assert_allclose(lk.NTKRegressor(RELU2, t=0.0).fit(x, y).predict(xs, return_std=True)[1],
                    np.sqrt(lk.kernel_diag(RELU2, xs)["nngp"]), rtol=1e-12)


def test_normalize_y_scales_each_output_column():
    x, y, xs = data(c=3)
    y = y * [1.0, 1000.0, 0.0] + [0.0, -5.0, 42.0]  # the last column is constant
    reg = lk.NTKRegressor(RELU2, t=5.0, normalize_y=True).fit(x, y)
    assert_allclose(reg.y_train_std_, [y[:, 0].std(), y[:, 1].std(), 1.0])
    mean, std = reg.predict(xs, return_std=True)
    cov = reg.predict(xs, return_cov=True)[1]
    ref = lk.predict_ensemble(RELU2, x, (y - y.mean(0)) / reg.y_train_std_, xs, t=5.0,
                              get="ntk", diag_reg=1e-6, cov="full")["ntk"]
    for j in range(3):
        scale = reg.y_train_std_[j]
        assert_allclose(mean[:, j], scale * ref.mean[:, j] + y[:, j].mean(), rtol=1e-12)
        assert_allclose(std[:, j], scale * np.sqrt(np.diag(ref.cov)), rtol=1e-9)
        assert_allclose(cov[:, :, j], scale ** 2 * ref.cov, rtol=1e-12)
    assert_allclose(mean[:, 2], 42.0, rtol=1e-12)


def test_classifiers():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((120, 3))
    labels = np.where(x[:, 0] > 0.4, "b", np.where(x[:, 1] > 0, "a", "c"))
    for clf in (lk.NTKClassifier(RELU2),
                lk.NTKClassifier(RELU2, mode="nngp"),
                lk.NTKClassifier(RELU2, loss="cross_entropy", t=1e4)):
        clf.fit(x[:80], labels[:80])
        assert list(clf.classes_) == ["a", "b", "c"]
        assert clf.score(x[80:], labels[80:]) > 0.8
    assert not hasattr(lk.NTKClassifier(), "predict_proba")
    proba = clf.predict_proba(x[80:])
    assert_allclose(proba.sum(1), 1.0)
    assert np.all(clf.classes_[proba.argmax(1)] == clf.predict(x[80:]))
    binary = lk.NTKClassifier(RELU2).fit(x, x[:, 0] > 0)
    assert binary.decision_function(x).shape == (120,)
    with pytest.raises(ValueError, match="finite training time"):
        lk.NTKClassifier(loss="cross_entropy").fit(x, labels)


def test_estimators_without_scikit_learn(monkeypatch):
    # Built again with scikit-learn hidden: the stand-in bases must do the same job.
    for name in ("sklearn", "sklearn.base"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(P, "_ESTIMATORS", {})
    reg_cls, clf_cls = P.NTKRegressor, P.NTKClassifier
    assert not reg_cls._uses_sklearn
    x, y, xs = data()
    reg = reg_cls(RELU2, diag_reg=0.0)
    assert reg.get_params()["arch"] == RELU2
    assert reg.set_params(t=3.0) is reg and reg.t == 3.0 and "t=3.0" in repr(reg)
    with pytest.raises(ValueError, match="not fitted"):
        reg.predict(xs)
    reg.fit(x, y)
    ref = lk.predict_ensemble(RELU2, x, y, xs, t=3.0, get="ntk")["ntk"]
    assert_allclose(reg.predict(xs), ref.mean, rtol=1e-12)
    assert reg.score(x, y) > 0.5
    with pytest.raises(ValueError, match="expecting 5 features"):
        reg.predict(xs[:, :3])
    with pytest.raises(ValueError, match="invalid parameter"):
        reg.set_params(width=3)
    clf = clf_cls(RELU2).fit(x, y > 0)
    assert clf.score(x, y > 0) == 1.0


try:
    from sklearn.utils.estimator_checks import parametrize_with_checks
except ImportError:  # scikit-learn is optional
    parametrize_with_checks = None

if parametrize_with_checks is not None:
    @parametrize_with_checks([lk.NTKRegressor(), lk.NNGPRegressor(normalize_y=True),
                              lk.NTKClassifier(),
                              lk.NTKClassifier(loss="cross_entropy", t=100.0)])
    def test_scikit_learn_estimator_checks(estimator, check):
        check(estimator)
else:
    @pytest.mark.skip(reason="scikit-learn is not installed")
    def test_scikit_learn_estimator_checks():
        pass


# ------------------------------------------------------------ validation


@pytest.mark.parametrize("kwargs, match", [
    ({"t": -1.0}, "times must be >= 0"),
    ({"t": [1.0, np.nan]}, "times must be >= 0"),
    ({"t": []}, "t is empty"),
    ({"t": "soon"}, "t must be a number"),
    ({"cov": "diag"}, "cov must be"),
    ({"get": "gp"}, "get must name"),
    ({"diag_reg": -1e-3}, "diag_reg must be"),
    ({"learning_rate": 0.0}, "learning_rate must be"),
])
def test_invalid_arguments(kwargs, match):
    x, y, xs = data()
    with pytest.raises(ValueError, match=match):
        lk.predict_ensemble(RELU2, x, y, xs, **kwargs)


def test_invalid_shapes():
    x, y, xs = data()
    with pytest.raises(ValueError, match=r"y_train must have shape \(24,\)"):
        lk.predict_ensemble(RELU2, x, y[:5], xs)
    with pytest.raises(ValueError, match="x_test has 3 features"):
        lk.predict_ensemble(RELU2, x, y, xs[:, :3])
    with pytest.raises(ValueError, match="NaN"):
        lk.predict_ensemble(RELU2, x, np.where(y > 1, np.nan, y), xs)


# ------------------------------------------------------------ images


CNN = "conv(b_std=0.1), relu, avg_pool, conv, relu, global_avg_pool, dense(b_std=0.1)"


def test_predictions_on_images_are_kernel_regression():
    """The t = ∞ mean on images is Θ(x*, X) Θ⁻¹ y, from the same kernel matrices
    (scipy's solve, independent of the prediction code's factorisations)."""
    rng = np.random.default_rng(0)
    x, xs = rng.standard_normal((12, 4, 4, 1)), rng.standard_normal((5, 4, 4, 1))
    y = rng.standard_normal(12)
    pred = lk.predict_ensemble(CNN, x, y, xs, t=np.inf, get="ntk")["ntk"]
    theta = lk.kernel(CNN, x, get="ntk")["ntk"]
    cross = lk.kernel(CNN, xs, x, get="ntk")["ntk"]
    np.testing.assert_allclose(pred.mean, cross @ np.linalg.solve(theta, y), rtol=1e-9)


def test_estimators_take_flattened_images_with_input_shape():
    rng = np.random.default_rng(1)
    x, xs = rng.standard_normal((12, 4, 4, 1)), rng.standard_normal((5, 4, 4, 1))
    y = rng.standard_normal(12)
    reg = lk.NTKRegressor(arch=CNN, input_shape=(4, 4, 1), diag_reg=0.0)
    got = reg.fit(x.reshape(12, -1), y).predict(xs.reshape(5, -1))
    ref = lk.predict_ensemble(CNN, x, y, xs, get="ntk")["ntk"].mean
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    with pytest.raises(ValueError, match="input_shape"):
        lk.NTKRegressor(arch=CNN, input_shape=(4, 5, 1)).fit(x.reshape(12, -1), y)
    labels = (y > 0).astype(int)
    clf = lk.NTKClassifier(arch=CNN, input_shape=(4, 4, 1)).fit(x.reshape(12, -1), labels)
    assert clf.predict(xs.reshape(5, -1)).shape == (5,)


def test_duplicate_images_are_reported():
    x = np.random.default_rng(2).standard_normal((6, 4, 4, 1))
    x[4] = x[1]
    report = lk.check_kernel(CNN, x, get="ntk")["ntk"]
    assert not report.positive_definite
    assert [1, 4] in np.asarray(report.duplicates).tolist()
