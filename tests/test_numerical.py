"""Numerical activations (Hermite/Mehler expansion) against independent references.

* Smooth activations (tanh, softplus, SiLU), one layer: Gram entries against
  2-D mpmath quadrature at 34 digits (hard-coded below with the snippet that
  made them), including ρ near ±1 and q11 ≠ q22. The default must be within
  1e-10 of them relative to √(K11 K22); the proven per-layer bound is 1e-12.
* The same at input variances up to 10, without a warning, and fuzzed with
  hypothesis (variances, correlations up to |ρ| = 1 − 1e-12, activations)
  against a tensor Gauss–Legendre rule in rotated coordinates (itself checked
  against the mpmath values); the truncation bound against the true error
  (it must hold and be within 10× of it) and the warning's content.
* A user's callable without derivative (finite differences) against the
  built-in tanh; ELU and softsign (kinks at 0) against polar 2-D quadrature
  (``tests/naive.py``) within their stated tolerances and proven bounds.
* The quadrature itself: against a rule with 4× the nodes and 3× the range,
  Stein's identity between φ's and φ''s coefficients, parity zeros.
* The fused pass against the plain truncated series in numpy, and the usual
  kernel properties on a depth-3 numerical network.
"""

import functools
import math
import warnings

import naive
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy import special

import limitkernel as lk
from limitkernel._program import Program as _Program
from limitkernel.layers import numerical as A

# ---------------------------------------------------------------- references

# Input pairs in d = 2, so "dense, φ, dense" (w_std = 1, b_std = 0) sees
# q11 = |x1|²/2, q22 = |x2|²/2, q12 = x1·x2/2. They cover ρ = 0.6, 0.8, −0.67,
# 1 − 5e-9 (q11 = 4 q22), −1 + 1.6e-10, 0 and exactly 1, and variances 0.5–4.5.
PAIRS = [
    ((1.0, 0.0), (0.6, 0.8)),
    ((2.1213203435596424, 0.0), (1.2, 0.9)),
    ((1.0, 1.0), (-2.0, -1.9)),
    ((2.0, 0.0), (1.0, 1e-4)),
    ((1.0, 0.0), (-1.7, 3e-5)),
    ((1.3, 0.0), (0.0, 2.0)),
    ((1.2, -0.4), (1.2, -0.4)),
    ((3.0, 0.0), (2.5, 1.0)),
]

# (K, Θ) for each pair: K = E[φ(u)φ(v)], Θ = K + q12 E[φ'(u)φ'(v)], made by
#
#   import mpmath as mp
#   mp.mp.dps = 34
#   sig = lambda x: 1 / (1 + mp.exp(-x))
#   ACTS = {"tanh": (mp.tanh, lambda x: 1 / mp.cosh(x) ** 2),
#           "softplus": (lambda x: mp.log1p(mp.exp(x)), sig),
#           "silu": (lambda x: x * sig(x), lambda x: sig(x) * (1 + x * (1 - sig(x))))}
#
#   def expect2(f, g, q11, q22, q12):
#       a, b = mp.sqrt(q11), mp.sqrt(q22)
#       rho = q12 / (a * b)
#       s = mp.sqrt((1 - rho) * (1 + rho))
#       return mp.quad(lambda z1, z2: f(a * z1) * g(b * (rho * z1 + s * z2))
#                      * mp.exp(-(z1 * z1 + z2 * z2) / 2),
#                      [-mp.inf, mp.inf], [-mp.inf, mp.inf]) / (2 * mp.pi)
#
#   for x1, x2 in PAIRS:
#       f, df = ACTS[name]
#       x1, x2 = [mp.mpf(v) for v in x1], [mp.mpf(v) for v in x2]
#       q11, q22, q12 = mp.fdot(x1, x1) / 2, mp.fdot(x2, x2) / 2, mp.fdot(x1, x2) / 2
#       k = expect2(f, f, q11, q22, q12)
#       t = k + q12 * expect2(df, df, q11, q22, q12)
#       print(mp.nstr(mp.re(k), 20), mp.nstr(mp.re(t), 20))  # ρ = 1 ± ulp: s may be 1e-17 i
#
# (tanh-sinh in 2-D, about 30 s per integral; at 50 digits the first tanh value
# changes by 3e-34.)
REFERENCE = {
    "tanh": [
        (0.16023772216465360345, 0.32458690488060035024),
        (0.36200073447432757701, 0.77296893113565909229),
        (-0.49040020383037546643, -1.1275352482488425677),
        (0.37202736430316623378, 0.80245429400560548832),
        (-0.35255919260993126529, -0.75428436722848431222),
        (0.0, 0.0),
        (0.35408706819408605911, 0.75795320015564954761),
        (0.56892848421102936402, 1.3745192687738343257),
    ],
    "softplus": [
        (0.6431724633873614437, 0.72272297329295487119),
        (1.1049640881138028654, 1.4822443064593087161),
        (0.42248837697541591675, 0.059727022883474777762),
        (0.94957893533908704842, 1.2409612087086247493),
        (0.44321897046548714393, 0.2626097144208915356),
        (0.71297065502404407833, 0.71297065502404407833),
        (0.83097174436770934344, 1.0604081078697033785),
        (2.2501499712584601841, 3.5278231904625253454),
    ],
    "silu": [
        (0.095111836777868680773, 0.18516118068004211504),
        (0.48502888319916104459, 0.95934262517109480119),
        (-0.21557436044381463661, -0.38599367067313093662),
        (0.34952042603663547031, 0.7197246516964693834),
        (-0.13370628325760182059, -0.24974305285396219037),
        (0.064952510411906759128, 0.064952510411906759128),
        (0.27392462435467721971, 0.56536029793380766699),
        (1.6444297743196655957, 3.310188563719282384),
    ],
}


def _one_layer(name, x1, x2):
    """(K, Θ) of "dense, φ, dense" for one pair and the scales √(K11 K22), √(Θ11 Θ22)."""
    spec = f"dense, {name}, dense"
    pair = np.array([x1, x2], dtype=float)
    got = lk.kernel(spec, pair[:1], pair[1:])
    diag = lk.kernel_diag(spec, pair)
    return ((got["nngp"][0, 0], got["ntk"][0, 0]),
            (math.sqrt(diag["nngp"][0] * diag["nngp"][1]),
             math.sqrt(diag["ntk"][0] * diag["ntk"][1])))


@pytest.mark.parametrize("name", ["tanh", "softplus", "silu"])
def test_smooth_activations_match_mpmath(name):
    """Every entry within 1e-10 of the 34-digit value, relative to √(K11 K22).

    The series is cut where the proven bound is 1e-12 (tol), attained only by
    identical inputs (measured: 4e-13 there, ≤ 3e-15 elsewhere); the
    quadrature of the coefficients adds ~1e-15. No warning: tanh at variances
    3.8 and 4.5 is within the default number of terms.
    """
    worst = 0.0
    for (x1, x2), ref in zip(PAIRS, REFERENCE[name]):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got, scale = _one_layer(name, x1, x2)
        for value, expected, norm in zip(got, ref, scale):
            worst = max(worst, abs(value - expected) / norm)
    assert worst <= 1e-10, worst
    # ... and in fact within the default per-layer bound, plus rounding.
    assert worst <= 1e-12, worst


# ---------------------------------------------------------------- callables


def test_callable_without_derivative_matches_builtin_tanh():
    """φ' by 8th-order finite differences: within 1e-10 of the exact derivative."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 6))
    x *= np.sqrt(6 * rng.uniform(0.5, 1.2, (40, 1))) / np.linalg.norm(x, axis=1, keepdims=True)
    x[0] = 0.0  # an input of zero variance (no bias before the activation)
    x[1] = x[2] * (1.0 + 1e-9)
    user = lk.Numerical(fn=lambda t: np.tanh(t), name="my_tanh")
    dense = lk.Dense(1.3, 0.0)
    spec_user = lk.serial(dense, user, lk.Dense(1.2, 0.1), user, lk.Dense())
    spec_builtin = "dense(w_std=1.3), tanh, dense(w_std=1.2, b_std=0.1), tanh, dense"
    got = lk.kernel(spec_user, x)
    ref = lk.kernel(spec_builtin, x)
    for kind in ("nngp", "ntk"):
        scale = np.sqrt(np.outer(np.diag(ref[kind]), np.diag(ref[kind])))
        assert np.all(np.isfinite(got[kind]))
        worst = np.max(np.abs(got[kind] - ref[kind]) / np.where(scale > 0, scale, 1.0))
        assert worst <= 1e-10, worst


def test_callable_with_derivative_is_the_builtin():
    q = np.linspace(0.0, 3.0, 31)
    user = lk.Numerical(fn=np.tanh, dfn=A._sech2, name="tanh2")
    for mine, theirs in zip(user.coefficients(q), lk.ACTIVATIONS["tanh"]().coefficients(q)):
        np.testing.assert_array_equal(mine, theirs)


def test_finite_difference_derivative_respects_a_kink_at_zero():
    """ELU without φ': one-sided stencils near 0 keep the error at rounding level."""
    elu = lk.ACTIVATIONS["elu"]()
    fd = A._FiniteDifference(elu.forward)
    x = np.concatenate([np.linspace(-3, 3, 2001), [-1e-9, 1e-9, 0.0]])
    exact = elu.derivative(x)
    exact[-1] = 1.0  # both one-sided derivatives are 1
    np.testing.assert_allclose(fd(x), exact, rtol=0, atol=1e-11)


def test_zero_variance_input_softplus():
    """u ≡ 0: E[φ(0)φ(v)] = log 2 · E[softplus(v)], by Gauss–Hermite (numpy)."""
    x = np.array([[0.0, 0.0], [1.2, -0.3]])
    got = lk.kernel("dense, softplus, dense", x[:1], x[1:])["nngp"][0, 0]
    z, w = np.polynomial.hermite_e.hermegauss(200)
    q22 = np.dot(x[1], x[1]) / 2
    expected = math.log(2.0) * np.dot(w, np.logaddexp(0.0, math.sqrt(q22) * z)) / math.sqrt(2 * math.pi)
    assert abs(got - expected) <= 1e-13


# ---------------------------------------------------------------- kinks


def _naive_elu():
    return (lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))),
            lambda x: np.where(x > 0, 1.0, np.exp(np.minimum(x, 0.0))))


def _naive_softsign():
    return (lambda x: x / (1.0 + np.abs(x)), lambda x: 1.0 / (1.0 + np.abs(x)) ** 2)


@pytest.mark.parametrize("name, make, stated", [
    ("elu", _naive_elu, 1e-4),
    ("softsign", _naive_softsign, 3e-3),
])
def test_kinked_activations_match_polar_quadrature(name, make, stated):
    """Within the stated tolerance (the default tol) and within the proven bound.

    The polar reference splits its angles at the kinks and is accurate to ~1e-12.
    """
    phi, dphi = make()
    for q11, q22, rho in [(0.5, 0.5, 0.3), (2.25, 1.0, 0.9), (1.0, 3.0, -0.6),
                          (1.5, 1.5, 1.0 - 1e-8), (0.7, 2.0, -0.999)]:
        theta = math.acos(rho)
        x1 = np.array([[math.sqrt(2 * q11), 0.0]])
        x2 = np.array([[math.sqrt(2 * q22) * rho, math.sqrt(2 * q22) * math.sin(theta)]])
        got = lk.kernel(f"dense, {name}, dense", x1, x2)
        q12 = float(x1[0] @ x2[0]) / 2
        layer = lk.ACTIVATIONS[name]()
        bound = layer.error_bound(np.array([q11, q22]))
        e11, d11 = layer.diag(np.array([q11]))
        e22, d22 = layer.diag(np.array([q22]))
        k_ref = naive.expect(phi, phi, q11, q22, theta)
        d_ref = naive.expect(dphi, dphi, q11, q22, theta)
        k_err = abs(got["nngp"][0, 0] - k_ref) / math.sqrt(e11[0] * e22[0])
        d_err = abs((got["ntk"][0, 0] - got["nngp"][0, 0]) / q12 - d_ref) / math.sqrt(d11[0] * d22[0])
        assert k_err <= bound["phi"] + 1e-11 and d_err <= bound["dphi"] + 1e-11, (k_err, d_err)
        assert max(k_err, d_err) <= stated


# ---------------------------------------------------------------- truncation


@functools.cache
def _gl_rule(n, half_width=12.0):
    """Gauss–Legendre on [−L, L] with the standard normal density in the weights."""
    x, w = np.polynomial.legendre.leggauss(n)
    return half_width * x, half_width * w * np.exp(-0.5 * (half_width * x) ** 2) / math.sqrt(2 * math.pi)


def _nodes(*variances):
    """Nodes a side for :func:`expect_rotated`: enough for φ(√q ·) with poles at ±iπ/2."""
    return 200 + 50 * math.ceil(1.2 * max(variances))


def expect_rotated(f, g, q11, q22, theta, n=None):
    """E[f(u) g(v)] for (u, v) ~ N(0, [[q11, q12], [q12, q22]]), q12 = √(q11 q22) cos θ.

    An independent reference (no package code): u = √q11 (c z1 + s z2),
    v = √q22 (c z1 − s z2) with c = cos(θ/2), s = sin(θ/2), so that
    corr(u, v) = c² − s² = cos θ with 1 ∓ ρ never formed by cancellation; a
    tensor Gauss–Legendre rule on [−12, 12]² (the mass outside is below
    e^{−72}), one-dimensional at θ = 0. For φ analytic in a strip |Im x| < π/2
    (tanh, the sigmoid) it converges geometrically; with the default nodes it
    agrees with the 34-digit mpmath values above (of size up to 3.5) to 1.5e-13,
    and with 1.5× the nodes to 1e-13 at variances up to 10 (both checked in
    :func:`test_rotated_reference_against_mpmath`).
    """
    z, w = _gl_rule(n or _nodes(q11, q22))
    if theta == 0.0:
        return float(np.dot(w, f(math.sqrt(q11) * z) * g(math.sqrt(q22) * z)))
    c, s = math.cos(0.5 * theta), math.sin(0.5 * theta)
    a, b = c * z[:, None], s * z[None, :]
    return float(np.sum((w[:, None] * w[None, :]) * f(math.sqrt(q11) * (a + b))
                        * g(math.sqrt(q22) * (a - b))))


def _sigmoid(x):
    return special.expit(x)


SMOOTH = {
    "tanh": (np.tanh, lambda x: 1.0 / np.cosh(x) ** 2),
    "softplus": (lambda x: np.logaddexp(0.0, x), _sigmoid),
    "silu": (lambda x: x * _sigmoid(x), lambda x: _sigmoid(x) * (1.0 + x * (1.0 - _sigmoid(x)))),
}


def _pair(q11, q22, theta):
    """Inputs in d = 2 for "dense, φ, dense": variances q11, q22 and angle θ."""
    x1 = np.array([[math.sqrt(2.0 * q11), 0.0]])
    x2 = math.sqrt(2.0 * q22) * np.array([[math.cos(theta), math.sin(theta)]])
    return x1, x2


def _errors(layer, f, df, q11, q22, theta, n=None):
    """Relative errors of E[φφ] and E[φ'φ'] of one layer against the rotated rule."""
    x1, x2 = _pair(q11, q22, theta)
    got = lk.kernel(lk.serial(lk.Dense(), layer, lk.Dense()), x1, x2)
    q12 = math.sqrt(q11 * q22) * math.cos(theta)
    k = expect_rotated(f, f, q11, q22, theta, n)
    d = expect_rotated(df, df, q11, q22, theta, n)
    k_scale = math.sqrt(expect_rotated(f, f, q11, q11, 0.0, n) * expect_rotated(f, f, q22, q22, 0.0, n))
    d_scale = math.sqrt(expect_rotated(df, df, q11, q11, 0.0, n)
                        * expect_rotated(df, df, q22, q22, 0.0, n))
    k_err = abs(got["nngp"][0, 0] - k) / k_scale
    # Θ − K = q12 E[φ'φ'] (the dense layer before φ contributes K to Θ and the
    # input layer Θ⁰ = 0): compared without dividing by a small q12.
    d_err = abs(got["ntk"][0, 0] - got["nngp"][0, 0] - q12 * d) / (math.sqrt(q11 * q22) * d_scale)
    return k_err, d_err


def test_rotated_reference_against_mpmath():
    worst = 0.0
    for name, (f, df) in SMOOTH.items():
        for (x1, x2), (k_ref, t_ref) in zip(PAIRS, REFERENCE[name]):
            x1, x2 = np.array(x1), np.array(x2)
            q11, q22 = x1 @ x1 / 2, x2 @ x2 / 2
            theta = math.atan2(x1[0] * x2[1] - x1[1] * x2[0], x1 @ x2)
            k = expect_rotated(f, f, q11, q22, theta)
            t = k + x1 @ x2 / 2 * expect_rotated(df, df, q11, q22, theta)
            worst = max(worst, abs(k - k_ref), abs(t - t_ref))
    assert worst <= 2e-13, worst
    f, df = SMOOTH["tanh"]
    for theta in (0.0, 1e-6, 0.3):
        for g in (f, df):
            assert abs(expect_rotated(g, g, 10.0, 7.0, theta)
                       - expect_rotated(g, g, 10.0, 7.0, theta, n=1200)) <= 1e-13


@pytest.mark.filterwarnings("ignore::limitkernel.layers.SeriesTruncationWarning")
@pytest.mark.parametrize("name, max_terms, q", [("tanh", 60, 4.0), ("silu", 40, 6.0)])
def test_truncation_bound_holds_and_is_tight(name, max_terms, q):
    """The bound at |ρ| (``error_bound(q, rho)``) against the true error.

    Too few terms on purpose, so that the truncation error (1e-11 to 4e-4) is far
    above the reference's 1e-13: the bound must hold and be within 10× of the
    error; the warning must state it and the |ρ| within tol.
    """
    f, df = SMOOTH[name]
    layer = lk.ACTIVATIONS[name](max_terms=max_terms)
    with pytest.warns(A.SeriesTruncationWarning) as record:
        bound = layer.error_bound(np.array([q, 0.7 * q]))
    message = str(record[0].message)
    assert f"at most {bound['phi']:.2g} (NNGP" in message
    assert f"and {bound['dphi']:.2g} (NTK" in message
    assert f"|ρ| ≤ {bound['rho_within_tol']:.6g} are within tol" in message
    for q22 in (q, 0.7 * q):
        for theta in (0.0, 1e-4, 0.05, 0.2, 0.6):
            errors = _errors(layer, f, df, q, q22, theta)
            at = layer.error_bound(np.array([q, q22]), rho=math.cos(theta))
            for err, key in zip(errors, ("phi", "dphi")):
                assert err <= at[key] * (1.0 + 1e-6) + 1e-13, (theta, key, err, at[key])
                assert at[key] <= 10.0 * err, (theta, key, err, at[key])
    # Below rho_within_tol every entry is within tol.
    theta = math.acos(bound["rho_within_tol"])
    assert max(_errors(layer, f, df, q, q, theta)) <= layer.tol


@pytest.mark.filterwarnings("ignore::limitkernel.layers.SeriesTruncationWarning")
def test_kinked_truncation_warning():
    layer = lk.ACTIVATIONS["elu"](tol=1e-10)
    with pytest.warns(A.SeriesTruncationWarning, match=r"\(NTK, E\[φ'φ'\]\)"):
        bound = layer.error_bound(np.array([1.0, 2.0]))
    assert bound["terms"] == 400 and 1e-10 < bound["dphi"] < 1e-3
    assert layer.error_bound(np.array([1.0, 2.0]), rho=0.9)["dphi"] == pytest.approx(
        0.9 ** 400 * bound["dphi"], rel=1e-12)


@pytest.mark.parametrize("name", ["tanh", "softplus", "silu"])
def test_default_within_1e10_up_to_variance_10_without_warning(name):
    """Variances 0.5 to 10, ρ from −1 + 1e-10 to exactly 1: no warning, ≤ 1e-10.

    Measured: ≤ 1e-12 (the bound, attained at ρ → 1) plus the reference's 1e-13.
    """
    f, df = SMOOTH[name]
    layer = lk.ACTIVATIONS[name]()
    worst = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert layer.error_bound(np.array([0.5, 10.0]))["dphi"] <= layer.tol
        for q11, q22 in ((10.0, 10.0), (10.0, 3.0), (0.5, 10.0)):
            for theta in (0.0, 1e-6, 0.03, 0.5, 2.0, math.pi - 1e-5):
                worst = max(worst, *_errors(layer, f, df, q11, q22, theta))
    assert worst <= 1e-10, worst
    assert worst <= 2e-12, worst


def _arctan():
    return lk.Numerical(fn=np.arctan, dfn=lambda x: 1.0 / (1.0 + x * x), name="arctan")


_ANGLES = st.one_of(
    st.floats(0.0, math.pi),
    st.floats(-12.0, -1.0).map(lambda e: 10.0 ** e),              # ρ → 1
    st.floats(-12.0, -1.0).map(lambda e: math.pi - 10.0 ** e),    # ρ → −1
    st.just(0.0),
)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(["tanh", "softplus", "silu", "arctan"]),
       q11=st.floats(0.05, 10.0), q22=st.floats(0.05, 10.0), theta=_ANGLES)
@example(name="tanh", q11=10.0, q22=10.0, theta=1e-12)
@example(name="arctan", q11=10.0, q22=9.0, theta=math.pi - 1e-9)
def test_fuzz_smooth_against_quadrature(name, q11, q22, theta):
    """Within the stated bound at this |ρ| (≤ tol = 1e-12) plus the reference's error.

    The built-ins meet tol up to variance 10 and must not warn; arctan (a
    user's callable, poles at ±i, so slower than tanh) may not meet it there,
    and is then held to ``error_bound(q, |ρ|)``.
    """
    if name == "arctan":
        layer, (f, df) = _arctan(), (np.arctan, lambda x: 1.0 / (1.0 + x * x))
    else:
        layer, (f, df) = lk.ACTIVATIONS[name](), SMOOTH[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if name == "arctan" else "error")
        bound = layer.error_bound(np.array([q11, q22]), rho=abs(math.cos(theta)))
        errors = _errors(layer, f, df, q11, q22, theta)
    for err, key in zip(errors, ("phi", "dphi")):
        assert err <= bound[key] + 3e-13, (err, bound[key])
    if name != "arctan":
        assert max(errors) <= 2e-12


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(["elu", "softsign"]), q11=st.floats(0.05, 4.0),
       q22=st.floats(0.05, 4.0), theta=_ANGLES)
def test_fuzz_kinked_against_polar_quadrature(name, q11, q22, theta):
    """ELU, softsign: within ``error_bound(q, |ρ|)`` of the polar rule (split at the kinks)."""
    phi, dphi = (_naive_elu if name == "elu" else _naive_softsign)()
    layer = lk.ACTIVATIONS[name]()
    x1, x2 = _pair(q11, q22, theta)
    got = lk.kernel(f"dense, {name}, dense", x1, x2)
    bound = layer.error_bound(np.array([q11, q22]), rho=abs(math.cos(theta)))
    q12 = math.sqrt(q11 * q22) * math.cos(theta)
    k_scale = math.sqrt(naive.expect(phi, phi, q11, q11, 0.0) * naive.expect(phi, phi, q22, q22, 0.0))
    d_scale = math.sqrt(naive.expect(dphi, dphi, q11, q11, 0.0)
                        * naive.expect(dphi, dphi, q22, q22, 0.0))
    k_err = abs(got["nngp"][0, 0] - naive.expect(phi, phi, q11, q22, theta)) / k_scale
    d_err = abs(got["ntk"][0, 0] - got["nngp"][0, 0] - q12 * naive.expect(dphi, dphi, q11, q22, theta)) \
        / (math.sqrt(q11 * q22) * d_scale)
    assert k_err <= bound["phi"] + 1e-11 and d_err <= bound["dphi"] + 1e-11, (k_err, d_err, bound)


# ---------------------------------------------------------------- quadrature


@pytest.mark.parametrize("name", ["tanh", "softplus", "silu", "elu", "softsign"])
def test_coefficients_against_a_finer_wider_rule(name):
    """L = 14 and the adaptive node count against 4× the nodes on [−42, 42]."""
    layer = lk.ACTIVATIONS[name]()
    q = np.array([0.0, 0.05, 0.7, 2.25, 6.0])
    coef, dcoef = layer.coefficients(q, terms=400)
    for fn, got in ((layer._fn, coef), (layer._dfn, dcoef)):
        for rule in (A._HalfRule(1024, 400), A._HalfRule(2048, 400, width=42.0)):
            sampled = A._sample(fn, q, rule, name)
            ref = A._project(sampled, rule, 400)
            worst = np.max(np.abs(got - ref) / np.sqrt(np.maximum(sampled.second, 1.0))[:, None])
            assert worst <= 1e-14, worst


def test_legendre_rule_to_rounding():
    for n in (32, 128, 512):
        x, w = A._legendre(n)
        assert abs(w.sum() - 2.0) <= 1e-14
        assert abs(np.dot(w, x ** 10) - 2.0 / 11.0) <= 1e-15


@pytest.mark.parametrize("name", ["tanh", "softplus", "silu"])
def test_stein_identity_links_the_two_tables(name):
    """a'_k(q) = √(k+1) a_{k+1}(q) / √q: φ''s table agrees with φ's."""
    q = np.array([0.3, 1.0, 2.5])
    coef, dcoef = lk.ACTIVATIONS[name]().coefficients(q, terms=120)
    k = np.arange(119)
    stein = np.sqrt(k + 1) * coef[:, 1:] / np.sqrt(q)[:, None]
    np.testing.assert_allclose(dcoef[:, :119], stein, rtol=0, atol=2e-14)


def test_odd_and_even_parts_are_exact_zeros():
    coef, dcoef = lk.ACTIVATIONS["tanh"]().coefficients(np.array([0.5, 2.0]))
    assert np.all(coef[:, 0::2] == 0.0) and np.all(dcoef[:, 1::2] == 0.0)
    assert np.all(coef[:, 1::2] != 0.0)
    coef, _ = lk.ACTIVATIONS["silu"]().coefficients(np.array([1.0]))
    assert np.all(coef[0, :6] != 0.0)


# ---------------------------------------------------------------- the fused pass


@pytest.mark.parametrize("name", ["tanh", "softplus"])
def test_pass_equals_the_plain_truncated_series(name):
    """Blocks, early stops and the ρ² form change nothing beyond rounding."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal((1, 30))
    x = np.vstack([rng.standard_normal((300, 30)),          # |ρ| ~ 0.2
                   base + 0.3 * rng.standard_normal((100, 30)),  # ρ ~ 0.9
                   base + 1e-6 * rng.standard_normal((5, 30))])  # ρ ~ 1
    x = rng.permutation(x)
    spec = f"dense(w_std=1.4, b_std=0.1), {name}, dense"
    program = _Program(spec, x.shape[1])
    roots = program.diagonals(x)[0]
    coef, dcoef = program.hermite_tables(roots)[0]
    got = lk.kernel(spec, x, x)
    n = x.shape[0]
    q12 = 1.96 * (x @ x.T) / x.shape[1] + 0.01
    rho = np.clip(q12 / np.outer(roots[1], roots[1]), -1.0, 1.0)
    series = np.zeros((n, n))
    dseries = np.zeros((n, n))
    for k in range(coef.shape[1] - 1, -1, -1):
        series = series * rho + np.outer(coef[:, k], coef[:, k])
        dseries = dseries * rho + np.outer(dcoef[:, k], dcoef[:, k])
    scale = np.sqrt(np.outer(np.diag(series), np.diag(series)))
    np.testing.assert_allclose(got["nngp"], series, rtol=0, atol=1e-13 * scale.max())
    ntk = series + (1.96 * (x @ x.T) / x.shape[1] + 0.01) * dseries
    np.testing.assert_allclose(got["ntk"], ntk, rtol=0, atol=1e-13 * np.abs(ntk).max())


def test_inputs_the_representatives_miss_still_meet_tol(monkeypatch):
    """T is first chosen on representatives; every other input is checked and can raise it."""
    q = np.array([0.5, 1.0, 3.0, 0.7])
    layer = lk.ACTIVATIONS["tanh"]()
    expected = layer.error_bound(q)
    monkeypatch.setattr(A, "_representatives", lambda q: np.array([int(np.argmin(q))]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = layer.error_bound(q)
    assert got["terms"] >= expected["terms"] > layer.error_bound(q[:1])["terms"]
    assert max(got["phi"], got["dphi"]) <= layer.tol


def test_block_stop_is_rigorous_and_minimal():
    """The pass stops a block at the fewest K with r^K √(S(K)/S(0)) ≤ 2⁻⁵⁴ (S: row tail)."""
    rng = np.random.default_rng(11)
    for trial in range(200):
        terms = int(rng.integers(1, 300))
        coef = rng.standard_normal(terms) * np.exp(-rng.uniform(0.0, 0.5) * np.arange(terms))
        if trial % 7 == 0:
            coef[::2] = 0.0
        tail = A._suffix_squares(coef, terms)
        np.testing.assert_allclose(tail[:-1], np.cumsum((coef ** 2)[::-1])[::-1], rtol=1e-14)
        for r in (0.0, 0.1, 0.5, 0.9, 0.99, 0.999999, 1.0):
            count = A._hermite_count(tail, r, terms)
            if r >= 1.0:
                assert count == terms
                continue
            if tail[0] == 0.0:
                assert count == 0
                continue
            left = r ** count * math.sqrt(tail[count] / tail[0])
            assert left <= 2.0 ** -54 * (1 + 1e-12)
            if count > 0:
                assert r ** (count - 1) * math.sqrt(tail[count - 1] / tail[0]) > 2.0 ** -54


def test_depth_three_kernel_properties():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((120, 12))
    # |x|²/d in [0.6, 1.2]: variances up to 2.7 keep tanh's series under its cap.
    x *= np.sqrt(12 * rng.uniform(0.6, 1.2, (120, 1))) / np.linalg.norm(x, axis=1, keepdims=True)
    x[7] = x[3]
    spec = ("dense(w_std=1.5, b_std=0.05), tanh, dense(w_std=1.5, b_std=0.05), silu, "
            "dense(w_std=1.5, b_std=0.05), softplus, dense(w_std=1.5, b_std=0.05)")
    sym = lk.kernel(spec, x)
    cross = lk.kernel(spec, x[:50], x)
    both = lk.kernel(spec, x, x)
    diag = lk.kernel_diag(spec, x)
    for kind in ("nngp", "ntk"):
        k = sym[kind]
        top = np.abs(k).max()
        np.testing.assert_array_equal(k, k.T)
        np.testing.assert_array_equal(np.diag(k), diag[kind])
        # Off the diagonal k(X) and k(X, X) differ only by rounding; on it (and
        # for the duplicate pair 3, 7) by at most the proven bound (1e-12).
        np.testing.assert_allclose(both[kind], k, rtol=0, atol=5e-12 * top)
        np.testing.assert_allclose(cross[kind], k[:50], rtol=0, atol=5e-12 * top)
        assert np.linalg.eigvalsh(k).min() >= -1e-12 * top


def test_row_and_column_tables_share_the_term_count():
    """x1 needs fewer terms than x2: both tables must be cut at the larger T."""
    rng = np.random.default_rng(6)
    x1 = 0.5 * rng.standard_normal((30, 20))
    x2 = rng.standard_normal((25, 20))
    x2 *= np.sqrt(20) / np.linalg.norm(x2, axis=1, keepdims=True)
    spec = "dense(w_std=1.5, b_std=0.05), tanh, dense"
    program = _Program(spec, 20)
    short = program.hermite_tables(program.diagonals(x1)[0])
    first = short[0][0].shape[1]
    long = program.hermite_tables(program.diagonals(x2)[0])
    assert first < long[0][0].shape[1] == short[0][0].shape[1] == program.prm[1, 1]
    both = lk.kernel(spec, np.vstack([x1, x2]))
    for a, b in ((x1, x2), (x2, x1)):
        got = lk.kernel(spec, a, b)
        block = both["ntk"][:30, 30:] if a is x1 else both["ntk"][30:, :30]
        np.testing.assert_allclose(got["ntk"], block, rtol=0, atol=1e-14 * both["ntk"].max())


def _check_group_against_rows(name, rng, col0s, lengths, omr):
    """hermite_rows on rows of the given first columns, lengths and 1 − ρ must
    give every row exactly what hermite_row gives it alone: the same blocks,
    the same sums, whether or not the row is paired with another."""
    from limitkernel.layers.numerical import hermite_row, hermite_rows

    kind = lk.spec.layer_from_name(name, {})
    n, m = omr.shape
    q_rows, q_cols = rng.uniform(0.3, 3.0, n), rng.uniform(0.3, 3.0, m)
    a, ad = kind.coefficients(q_rows)
    terms = a.shape[1]
    b, bd = kind.coefficients(q_cols, terms=terms)
    h1, hd1 = a[None], ad[None]
    h2, hd2 = np.ascontiguousarray(b.T[None]), np.ascontiguousarray(bd.T[None])
    roots1 = np.sqrt(rng.uniform(0.3, 3.0, (2, n)))
    roots1[0] = np.sqrt(q_rows)
    roots2 = np.sqrt(rng.uniform(0.3, 3.0, (2, m)))
    roots2[0] = np.sqrt(q_cols)
    rows = np.arange(n, dtype=np.int64)
    ntk = rng.uniform(0.5, 2.0, (n, m))
    for want_ntk in (True, False):
        group = (np.zeros((n, m)), omr.copy(), ntk.copy())
        hermite_rows(*group, lengths, rows, col0s, 0, roots1, roots2, 0, h1, h2, hd1, hd2,
                     terms, want_ntk)
        for g in range(n):
            k, j0 = lengths[g], col0s[g]
            alone = (np.zeros(k), omr[g, :k].copy(), ntk[g, :k].copy())
            hermite_row(*alone, roots1[0, g], roots2[0, j0:j0 + k], roots1[1, g],
                        roots2[1, j0:j0 + k], h1[0, g], h2[0], hd1[0, g], hd2[0], terms,
                        np.empty(k), np.empty(k), want_ntk, j0)
            for together, single in zip(group, alone):
                np.testing.assert_array_equal(together[g, :k], single)


@pytest.mark.parametrize("name", ["tanh", "softplus", "elu"])
def test_rows_in_a_group_give_the_bits_of_one_row_at_a_time(name):
    # hermite_rows takes a group of rows block by block (each block of column
    # coefficients then serves the whole group from cache) and two rows on the
    # same block together.
    rng = np.random.default_rng(5)
    n, m = 11, 700
    # Rows of different lengths and first columns, as in the symmetric case;
    # some start with an identical input (1 - ρ = 0), some run close to ρ = ±1.
    col0s = np.array([0, 3, 3, 10, 128, 129, 250, 500, 640, 699, 5], dtype=np.int64)
    lengths = (m - col0s).astype(np.int64)
    omr = rng.uniform(0.2, 1.8, (n, m))
    omr[:, 300:310:2] = rng.uniform(0.0, 1e-6, (n, 5))
    omr[:, 301:311:2] = 2.0 - rng.uniform(0.0, 1e-6, (n, 5))
    omr[[1, 4, 9], 0] = 0.0
    _check_group_against_rows(name, rng, col0s, lengths, omr)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(["tanh", "softplus", "softsign"]), st.integers(1, 18),
       st.integers(1, 400), st.integers(0, 2 ** 32))
def test_groups_of_any_layout_give_the_bits_of_one_row_at_a_time(name, n, m, seed):
    # Random first columns and lengths (cross kernels: all rows alike; symmetric
    # ones: staggered), 1 − ρ anywhere in [0, 2] with near-identical and
    # near-antiparallel pairs, so that partners need different numbers of terms.
    rng = np.random.default_rng(seed)
    col0s = rng.integers(0, m, n) if rng.random() < 0.7 else np.zeros(n, dtype=np.int64)
    lengths = np.array([rng.integers(1, m - c + 1) for c in col0s], dtype=np.int64)
    omr = rng.uniform(0.0, 2.0, (n, m))
    near = rng.random((n, m)) < 0.1
    omr[near] = rng.choice([0.0, 1e-9, 2.0 - 1e-9, 2.0], near.sum())
    omr[rng.random(n) < 0.4, 0] = 0.0
    _check_group_against_rows(name, rng, col0s.astype(np.int64), lengths, omr)


@pytest.mark.parametrize("name", ["tanh", "softplus", "elu"])
def test_equal_variances_get_equal_coefficients_wherever_they_stand(name):
    """Found by fuzzing: the last of two identical inputs got coefficients 2e-19
    away from the first's (loops round a row by its place in the array), hence
    another diagonal and a Gram matrix that was not symmetric."""
    layer = lk.get_activation(name)
    rng = np.random.default_rng(4)
    for n in (3, 5, 8, 17, 33, 100):
        q = rng.uniform(1e-4, 3.0, n)
        q[-1], q[n // 2] = q[0], q[1]
        coef, dcoef = layer.coefficients(q)
        for table in (coef, dcoef):
            assert np.array_equal(table[-1], table[0]), (n, np.abs(table[-1] - table[0]).max())
            assert np.array_equal(table[n // 2], table[1])


def test_identical_inputs_give_a_symmetric_gram_with_equal_diagonals():
    # The fuzz reproducer: rows 0 and 2 are the same input.
    x = np.array([[0.1257302210933933], [-0.1321048632913019], [0.1257302210933933]])
    spec = "dense(w_std=0.25), dense(w_std=0.25), dense(w_std=0.102), tanh, dense"
    for k in (lk.kernel(spec, x), lk.kernel(spec, x, x.copy())):
        for kind in ("nngp", "ntk"):
            assert np.array_equal(k[kind], k[kind].T), kind
            assert k[kind][0, 0] == k[kind][2, 2] == k[kind][0, 2], kind
