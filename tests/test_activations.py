"""Closed-form activations against quadrature, finite networks and high precision.

References (``tests/naive.py``) share no code with the package: Gaussian
expectations by polar 2-D quadrature split at the kinks, the layer recursion
written out per pair, and for positively homogeneous activations the same
recursion in 40-digit mpmath. Tolerances are stated where they are used.
"""

import math

import mpmath
import naive
import numpy as np
import pytest
from reference import kernel_mp

import limitkernel as lk
from limitkernel.activations import get_activation
from limitkernel.layers import _angle as K

EPS = np.finfo(float).eps

# (test id, name, params, (w_std, b_std) keeping variances O(1) down to depth 5)
ACTS = [
    ("relu", "relu", {}, (1.4, 0.3)),
    ("leaky_relu", "leaky_relu", {"alpha": 0.2}, (1.3, 0.3)),
    ("abrelu", "abrelu", {"a": -0.5, "b": 1.5}, (0.9, 0.3)),
    ("abs", "abs", {}, (1.0, 0.3)),
    ("identity", "identity", {}, (1.0, 0.3)),
    ("step", "step", {}, (1.2, 0.3)),
    ("sign", "sign", {}, (1.2, 0.3)),
    ("relu_pow2", "relu_pow", {"k": 2}, (0.8, 0.3)),
    ("relu_pow3", "relu_pow", {"k": 3}, (0.6, 0.3)),
    ("relu_pow4", "relu_pow", {"k": 4}, (0.5, 0.3)),
    ("erf", "erf", {"a": 1.3, "b": 0.7, "c": 0.2}, (1.2, 0.3)),
    ("erf_default", "erf", {}, (1.2, 0.3)),
    ("sigmoid_like", "sigmoid_like", {}, (1.5, 0.3)),
    ("gelu", "gelu", {}, (1.2, 0.3)),
    ("sin", "sin", {"a": 1.1, "b": 1.7, "c": 0.4}, (1.0, 0.3)),
    ("cos", "cos", {"a": 0.9, "b": 1.3, "c": -0.2}, (1.0, 0.3)),
    ("gaussian", "gaussian", {"a": 1.2, "b": -0.6}, (1.0, 0.3)),
    ("gaussian_default", "gaussian", {}, (1.0, 0.3)),
    ("exp", "exp", {"a": 0.8, "b": 0.6}, (0.8, 0.3)),
    ("rbf", "rbf", {"gamma": 0.7}, (1.0, 0.3)),
]
IDS = [a[0] for a in ACTS]
HOMOGENEOUS = {"relu", "leaky_relu", "abrelu", "abs", "identity", "step", "sign", "relu_pow"}


def _act(name, params):
    return (name, params)


def _spec(layers):
    return naive.spec_text(layers)


def _scale(k11, k22):
    return math.sqrt(abs(k11 * k22))


# ------------------------------------------------------------ (a) one layer


def _pair(theta, r1, r2, d=3):
    """Inputs with x·x/d = r1², x'·x'/d = r2² at the angle θ (exactly 0 or π allowed)."""
    x1 = np.zeros(d)
    x2 = np.zeros(d)
    x1[0] = r1 * math.sqrt(d)
    if theta == math.pi:
        x2[0] = -r2 * math.sqrt(d)
    else:
        x2[0], x2[1] = math.cos(theta) * r2 * math.sqrt(d), math.sin(theta) * r2 * math.sqrt(d)
    return x1, x2


ANGLES_NO_BIAS = [0.0, 1e-12, 1e-8, 1e-4, 0.3, 1.0, 0.5 * math.pi, 2.0, 3.0,
                  math.pi - 1e-6, math.pi]
# With a bias the reference recomputes the angle as arccos(q12/√(q11 q22)), which
# is only accurate away from near-duplicates; the package is checked there
# against mpmath below.
ANGLES_BIAS = [0.0, 0.3, 1.0, 0.5 * math.pi, 2.0, 3.0, math.pi]


@pytest.mark.parametrize("tid, name, params, wb", ACTS, ids=IDS)
def test_one_layer_matches_quadrature(tid, name, params, wb):
    """K and Θ of ``dense, ACT, dense`` against 2-D quadrature, over ρ ∈ [−1, 1].

    The quadrature is accurate to ~2e-14 relative (checked against node doubling
    and known closed forms when it was written), the package to a few ulps; a
    wrong formula is off by O(1). Both are compared relative to the diagonal
    scale √(K(x,x) K(x',x')), since K(x,x') itself may vanish (orthogonal inputs):
    tolerance 1e-12 of that scale.

    The one exception is nearly antipodal inputs (π − θ = 1e-6, not exactly π):
    the pass carries 1 − ρ, and 1 + ρ is then known only to an absolute eps
    (from the rounding of ρ itself), so π − θ = √(2(1 + ρ)) errs by ~eps/(π − θ);
    kernels with an O(1) slope in θ there (step, sign, the ReLU NTK) inherit it:
    tolerance 1e-12 + 2 eps/(π − θ) of the scale.
    """
    cases = []
    for w, b, angles in ((1.1, 0.0, ANGLES_NO_BIAS), (0.9, 0.5, ANGLES_BIAS)):
        for theta in angles:
            gap = math.pi - theta
            slack = 2 * EPS / gap if 0 < gap < 1e-3 else 0.0
            for r1, r2 in ((1.0, 1.0), (0.7, 1.4)):
                cases.append((w, b, slack, *_pair(theta, r1, r2)))
    cases.append((1.0, 0.0, 0.0, np.zeros(3), _pair(0.0, 1.0, 1.0)[0]))  # zero variance
    for w, b, slack, x1, x2 in cases:
        layers = [("dense", w, b), _act(name, params), ("dense", 1.0, 0.0)]
        got = lk.kernel(_spec(layers), x1[None], x2[None])
        (k11, k12, k22), (t11, t12, t22) = naive.network_kernel(layers, x1, x2)
        ctx = f"{tid}: w={w}, b={b}, x1={x1}, x2={x2}"
        tol = 1e-12 + slack
        assert abs(got["nngp"][0, 0] - k12) <= tol * _scale(k11, k22), ctx
        assert abs(got["ntk"][0, 0] - t12) <= tol * _scale(t11, t22), ctx


@pytest.mark.parametrize("tid, name, params, wb", ACTS, ids=IDS)
def test_zero_variance_input_uses_derivative_at_zero(tid, name, params, wb):
    """An input of zero variance meets the activation with Θ ≠ 0.

    In the standard parameterisation a dense layer adds 1 to Θ (its bias
    gradient) even where K = 0, so for x = 0 and b_std = 0 the activation sees
    u ≡ 0 with Θ(x, x') = 1, and Θ ← Θ · φ'(0) E[φ'(v)]: this pins the value of
    φ'(0), which must agree between the row code, diag() and derivative()
    ((a + b)/2 for ABReLU, as in Neural Tangents). The readout (fan-in n = 50)
    gives Θ_out = n K_act + 1 + Θ_act. Quadrature tolerance as above.
    """
    d, width = 3, 50
    x = np.array([[0.0, 0.0, 0.0], [0.9, -1.2, 0.4]])
    spec = (f"dense(parameterization=standard, width={width}), {_spec([_act(name, params)])}, "
            "dense(parameterization=standard)")
    got = lk.kernel(spec, x)
    phi, dphi, _ = naive.activation(name, **params)
    q = float(x[1] @ x[1]) / d
    k_act = naive.expect(phi, phi, 0.0, q, 0.5 * math.pi)
    kd_act = naive.expect(dphi, dphi, 0.0, q, 0.5 * math.pi)
    kd_00 = naive.expect(dphi, dphi, 0.0, 0.0, 0.0)
    scale = math.sqrt(got["ntk"][1, 1] * (width * phi(np.zeros(1))[0] ** 2 + 1 + kd_00))
    assert abs(got["ntk"][0, 1] - (width * k_act + 1 + kd_act)) <= 1e-12 * scale
    assert abs(got["ntk"][0, 0] - (width * phi(np.zeros(1))[0] ** 2 + 1 + kd_00)) <= 1e-12 * scale


# ------------------------------------------------------------ (b) finite networks


@pytest.mark.parametrize("tid, name, params, wb", ACTS, ids=IDS)
def test_one_hidden_layer_monte_carlo(tid, name, params, wb):
    """The kernels against one random network of width n = 40 000.

    f(x) = σ_w/√n Σ_i v_i φ(z_i(x)) + σ_b β, z_i = σ_w/√d W_i·x + σ_b b_i, all
    parameters N(0, 1) (NTK parameterisation). Given the hidden layer,
    Cov_v[f(x), f(x')] = σ_w² (1/n) Σ_i φ(z_i)φ(z_i') + σ_b² =: K̂, and the
    empirical NTK (sum over all parameters of ∂f ∂f') is exactly
    Θ̂ = (1/n) Σ_i σ_w² [φ(z_i)φ(z_i') + v_i² φ'(z_i)φ'(z_i') (σ_w² x·x'/d + σ_b²)] + σ_b².
    Both are means of n i.i.d. terms whose expectation is the limit kernel
    (E v_i² = 1), so they are unbiased with standard error sd/√n from the sample
    itself. We allow 5 standard errors (two-sided normal tail 6e-7 per entry, so
    over the ~600 entries of this test a false failure has probability < 4e-4;
    the seed is fixed besides), plus 1e-12 of the scale where a term has zero
    variance (e.g. sign(z)² = 1).
    """
    w, b = 1.2, 0.3
    n, d = 40_000, 3
    rng = np.random.default_rng(2024)
    base = rng.standard_normal((3, d))
    x = np.concatenate([base, base[:1] + 1e-3 * rng.standard_normal((1, d)), -base[:1]])
    act = get_activation(name, **params)
    z = w / math.sqrt(d) * rng.standard_normal((n, d)) @ x.T + b * rng.standard_normal((n, 1))
    v2 = rng.standard_normal((n, 1, 1)) ** 2
    phi, dphi = act.forward(z), act.derivative(z)
    theta1 = w * w * (x @ x.T) / d + b * b
    k_terms = w * w * phi[:, :, None] * phi[:, None, :] + b * b
    t_terms = k_terms + w * w * v2 * dphi[:, :, None] * dphi[:, None, :] * theta1
    spec = f"dense(w_std={w}, b_std={b}), {_spec([_act(name, params)])}, dense(w_std={w}, b_std={b})"
    exact = lk.kernel(spec, x)
    for key, terms in (("nngp", k_terms), ("ntk", t_terms)):
        est = terms.mean(0)
        se = terms.std(0, ddof=1) / math.sqrt(n)
        scale = np.sqrt(np.outer(np.diag(exact[key]), np.diag(exact[key])))
        err = np.abs(est - exact[key])
        bound = 5.0 * se + 1e-12 * scale
        assert np.all(err <= bound), (key, err / np.maximum(se, 1e-300))


@pytest.mark.parametrize("tid, name, params, wb", ACTS, ids=IDS)
def test_forward_and_derivative_definitions(tid, name, params, wb):
    """forward/derivative agree with the textbook definitions, including φ'(0)."""
    act = get_activation(name, **params)
    phi, dphi, _ = naive.activation(name, **params)
    x = np.array([-3.0, -1.0, -1e-3, 0.0, 1e-3, 0.5, 2.0])
    np.testing.assert_allclose(act.forward(x), phi(x), rtol=1e-14, atol=1e-300)
    np.testing.assert_allclose(act.derivative(x), dphi(x), rtol=1e-14, atol=1e-300)


# ------------------------------------------------------------ (c) diagonal, depth


def _depth_inputs():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4))
    near = x[0] + 1e-9 * rng.standard_normal(4)
    return np.vstack([x, x[:1], near, -x[:1], 2.0 * x[:1], np.zeros((1, 4))])


@pytest.mark.parametrize("tid, name, params, wb", ACTS, ids=IDS)
# Deep chaotic stacks (ReLU³, ReLU⁴) degenerate, which the kernel rightly warns
# about; this test checks finiteness and exactness there, not the warning.
@pytest.mark.filterwarnings("ignore::limitkernel.gram.DegenerateKernelWarning")
def test_deep_kernels_finite_and_diagonal_exact(tid, name, params, wb):
    """Depth 2–5, with duplicates, near-duplicates, ±x, 2x and a zero input.

    Everything is finite; the cross-set pass (x2 = copy of x1), which carries the
    diagonal entries through the per-entry code at ρ = 1, equals kernel_diag,
    computed by each activation's own diag(). The two paths round differently,
    and a relative perturbation of a variance grows by at most the degree of the
    activation per layer (ReLU⁴: 4⁵ ≈ 1e3 at depth 5), hence rtol 1e-12 ≈ 4e3 eps.
    The symmetric pass (x2 = None) computes the same upper triangle: rtol 4 eps.
    """
    x = _depth_inputs()
    w, b = wb
    for bias in (b, 0.0):
        for depth in (2, 3, 4, 5):
            spec = _spec([("dense", w, bias), _act(name, params)] * depth + [("dense", w, bias)])
            try:
                cross = lk.kernel(spec, x, x.copy())
            except FloatingPointError as err:
                # Refused, rightly: some input's variance leaves float64's precise
                # range (the mpmath recursion says how far it falls).
                assert "underflow" in str(err), err
                tiny = min(kernel_mp(spec, x[k], x[k], dps=30)[0][0] for k in range(3))
                assert tiny < 1e-250, (tid, depth, bias, tiny)
                continue
            sym = lk.kernel(spec, x)
            diag = lk.kernel_diag(spec, x)
            for key in ("nngp", "ntk"):
                ctx = f"{tid} depth={depth} bias={bias} {key}"
                assert np.all(np.isfinite(cross[key])), ctx
                assert np.all(np.isfinite(sym[key])), ctx
                np.testing.assert_allclose(np.diag(cross[key]), diag[key], rtol=1e-12,
                                           atol=1e-300, err_msg=ctx)
                np.testing.assert_allclose(sym[key], cross[key], rtol=4 * EPS,
                                           atol=1e-300 + 4 * EPS * np.max(np.abs(diag[key])),
                                           err_msg=ctx)
                # duplicates: exactly the diagonal's value, and a symmetric kernel
                np.testing.assert_allclose(cross[key][0, 3], diag[key][0], rtol=1e-12,
                                           err_msg=ctx)
                np.testing.assert_allclose(cross[key], cross[key].T, rtol=4 * EPS,
                                           atol=4 * EPS * np.max(np.abs(diag[key])),
                                           err_msg=ctx)


# ------------------------------------------------------------ (d) diag()


@pytest.mark.parametrize("tid, name, params, wb", ACTS, ids=IDS)
def test_diag_matches_quadrature(tid, name, params, wb):
    """diag(q) = (E[φ(u)²], E[φ'(u)²]), u ~ N(0, q), including q = 0 (u ≡ 0).

    Same quadrature accuracy as above: rtol 1e-12, plus 1e-13 of the largest
    value for entries that vanish.
    """
    q = np.array([0.0, 1e-4, 0.05, 0.5, 1.0, 3.0])
    k, kd = get_activation(name, **params).diag(q)
    phi, dphi, _ = naive.activation(name, **params)
    ref_k = np.array([naive.expect(phi, phi, v, v, 0.0) for v in q])
    ref_kd = np.array([naive.expect(dphi, dphi, v, v, 0.0) for v in q])
    for got, ref in ((k, ref_k), (kd, ref_kd)):
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-13 * np.max(np.abs(ref)))


# ------------------------------------------------------------ near-duplicates, depth


def _exact_near_duplicates(d=4):
    """Pairs whose normalisation is exact in float64, so 1 − ρ is known exactly.

    x = (2, 0, ..., 0) and x' = x + (0, ε, 0, ...): for ε ≤ 2e-8 the norm of x'
    rounds to 2, so the normalised inputs and their difference are exact, and
    the reference and the package start from the same correlation. (For general
    near-duplicates the rounding of the normalised inputs themselves limits
    1 − ρ to a relative accuracy of ~eps·|x|/|x − x'|; see the report.)
    """
    x = np.zeros(d)
    x[0] = 2.0
    others = []
    for eps in (2e-10, 2e-8):
        y = x.copy()
        y[1] = eps
        others.append(y)
    y = x.copy()
    y[1] = 1e-3
    others.append(y)
    y = -x
    y[1] = 1e-4
    others.append(y)
    return x, np.array(others)


HOMOGENEOUS_ACTS = [a for a in ACTS if a[1] in HOMOGENEOUS and a[1] not in ("relu", "identity")]


@pytest.mark.parametrize("tid, name, params, wb", HOMOGENEOUS_ACTS,
                         ids=[a[0] for a in HOMOGENEOUS_ACTS])
def test_near_duplicates_through_depth_match_mpmath(tid, name, params, wb):
    """1 − ρ carried accurately: ReLU^k, step, sign, abs... at depth 2 and 4.

    The reference is the recursion in 50-digit mpmath (:mod:`reference`) with the
    angular integrals done by mpmath.quad (no closed form). Layers of ReLU^k raise variances to the
    power k, which multiplies any relative perturbation by up to k per layer; so
    20 k^depth eps (step and sign: k = 1) of the diagonal scale √(K11 K22), which
    for the near-duplicates is the value itself (the near-antipodal pair can
    make K(x, x') small by cancellation, like any rounded sum).
    The last network follows ACT by a step, whose kernel (π − θ)/(2π) has an
    infinite slope at ρ = 1: it fails unless ACT passed on 1 − ρ to full relative
    precision, even where ACT's own kernel is insensitive to it.
    """
    x, others = _exact_near_duplicates()
    w, b = wb
    k = int(params.get("k", 1))
    probe = [("dense", w, b), _act(name, params), ("dense", 1.0, 0.1), ("step", {}),
             ("dense", 1.0, 0.1)]
    for depth, layers in ((2, None), (4, None), (2, probe)):
        layers = layers or [("dense", w, b), _act(name, params)] * depth + [("dense", w, b)]
        got = lk.kernel(_spec(layers), x[None], others)
        rtol = 20 * k ** depth * EPS
        for j, other in enumerate(others):
            (k11, k12, k22), (t11, t12, t22) = kernel_mp(_spec(layers), x, other, dps=50)
            ctx = f"{tid} depth={depth} pair={j}"
            assert abs(got["nngp"][0, j] - k12) <= rtol * _scale(k11, k22), ctx
            assert abs(got["ntk"][0, j] - t12) <= rtol * _scale(t11, t22), ctx


@pytest.mark.parametrize("k", [2, 3, 4])
def test_arccos_integrals_match_mpmath(k):
    """J_k, J_{k−1} and 1 − J_k/J_k(0) of the row code over θ ∈ (0, π].

    Reference: J_k(θ) = 2^k k! ∫ cos^k α cos^k(α − θ) dα over α ∈ [θ − π/2, π/2]
    (where both factors are positive), by mpmath.quad at 40 digits. θ covers
    tiny angles, both sides of the switch to the Taylor series of T_k at θ = 1/2,
    and θ → π. J values: 8 eps of J_k(0); 1 − J_k/J_k(0): 8 eps relative, which a
    direct evaluation misses by orders of magnitude below θ ≈ 1e-3.
    """
    thetas = np.concatenate([np.logspace(-9, -0.5, 12), [0.4999999, 0.5, 0.5000001],
                             [1.0, 2.0, 3.0, math.pi - 1e-3, math.pi]])
    with mpmath.workdps(40):
        def j_ref(order, theta):
            th = mpmath.mpf(float(theta))
            if th == mpmath.pi:
                return mpmath.mpf(0)
            val = mpmath.quad(lambda a: (mpmath.cos(a) * mpmath.cos(a - th)) ** order,
                              [th - mpmath.pi / 2, mpmath.pi / 2])
            return 2 ** order * mpmath.factorial(order) * val

        jk0 = j_ref(k, 0.0)
        for theta in thetas:
            half = math.sin(0.5 * theta)
            got = K.arccos_j(k, theta, math.sin(theta), math.cos(theta), 2.0 * half * half)
            jk, jk_prev = j_ref(k, theta), j_ref(k - 1, theta)
            ctx = f"k={k}, theta={theta!r}"
            assert abs(got[0] - float(jk)) <= 8 * EPS * float(jk0), ctx
            assert abs(got[1] - float(jk_prev)) <= 8 * EPS * float(j_ref(k - 1, 0.0)), ctx
            np.testing.assert_allclose(got[2], float(1 - jk / jk0), rtol=8 * EPS, err_msg=ctx)


SMOOTH_C_ACTS = [a for a in ACTS if a[1] in ("sin", "cos", "rbf", "exp")]


@pytest.mark.parametrize("tid, name, params, wb", SMOOTH_C_ACTS, ids=[a[0] for a in SMOOTH_C_ACTS])
def test_trig_and_exp_carry_an_accurate_correlation(tid, name, params, wb):
    """``dense, ACT, dense, relu, dense`` on near-duplicates, against mpmath.

    The ReLU's NTK factor (π − θ)/(2π) needs θ, i.e. 1 − ρ after ACT, to full
    relative precision; computed as 1 − K12/√(K11 K22) it would lose ~1e-9 here.
    rtol 8 eps: a handful of roundings, nothing amplified.
    """
    x, others = _exact_near_duplicates()
    layers = [("dense", 1.1, 0.3), _act(name, params), ("dense", 1.2, 0.3), ("relu", {}),
              ("dense", 1.0, 0.1)]
    got = lk.kernel(_spec(layers), x[None], others)
    for j, other in enumerate(others):
        (_, k12, _), (_, t12, _) = kernel_mp(_spec(layers), x, other, dps=50)
        ctx = f"{tid} pair={j}"
        np.testing.assert_allclose(got["nngp"][0, j], k12, rtol=8 * EPS, err_msg=ctx)
        np.testing.assert_allclose(got["ntk"][0, j], t12, rtol=8 * EPS, err_msg=ctx)
