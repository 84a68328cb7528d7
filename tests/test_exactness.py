"""Nearly identical inputs against a 50-digit mpmath evaluation of the recursion.

The reference below shares no code with the package: it applies the textbook
recursion (DESIGN.md) in mpmath at 50 significant digits, with the angle from
mpmath's own acos, so rounding in the correlation costs it nothing. A plain
float64 arccos implementation loses about half the digits of 1 - ρ here and errs
by ~1e-8 on the NTK; the package must stay within 1e-13.
"""

import mpmath
import numpy as np
import pytest

import limitkernel as lk

mpmath.mp.dps = 50


def _mp_kernel(x1, x2, depth, w_std, b_std, a, b):
    """K and Θ of ``depth * [dense, abrelu(a, b)], dense`` for one pair, in mpmath."""
    x1 = [mpmath.mpf(float(v)) for v in x1]
    x2 = [mpmath.mpf(float(v)) for v in x2]
    d = len(x1)
    w2, b2 = mpmath.mpf(w_std) ** 2, mpmath.mpf(b_std) ** 2
    a, b = mpmath.mpf(a), mpmath.mpf(b)
    q11 = mpmath.fsum(u * u for u in x1) / d
    q22 = mpmath.fsum(v * v for v in x2) / d
    q12 = mpmath.fsum(u * v for u, v in zip(x1, x2)) / d
    theta_ntk = mpmath.mpf(0)
    for _ in range(depth):
        q11, q22, q12 = w2 * q11 + b2, w2 * q22 + b2, w2 * q12 + b2
        theta_ntk = q12 + w2 * theta_ntk
        norm = mpmath.sqrt(q11 * q22)
        angle = mpmath.acos(q12 / norm)
        s, c = mpmath.sin(angle), mpmath.cos(angle)
        # E[φ(u)φ(v)] for φ = a x (x < 0), b x (x ≥ 0): Cho–Saul order 1 terms.
        same = (s + (mpmath.pi - angle) * c) / (2 * mpmath.pi)
        cross = (s - angle * c) / (2 * mpmath.pi)
        q12 = norm * ((a * a + b * b) * same - 2 * a * b * cross)
        deriv = ((a * a + b * b) * (mpmath.pi - angle) + 2 * a * b * angle) / (2 * mpmath.pi)
        theta_ntk = theta_ntk * deriv
        q11 = q11 * (a * a + b * b) / 2
        q22 = q22 * (a * a + b * b) / 2
    q12 = w2 * q12 + b2
    theta_ntk = q12 + w2 * theta_ntk
    return float(q12), float(theta_ntk)


def _pairs(rng, d=16):
    base = rng.standard_normal(d)
    out = []
    for eps in (1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4):
        direction = rng.standard_normal(d)
        direction *= eps * np.linalg.norm(base) / np.linalg.norm(direction)
        out.append(base + direction)
    return base, np.array(out)


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("w_std, b_std, a, b", [
    (1.5, 0.05, 0.0, 1.0),    # relu with bias
    (2.0 ** 0.5, 0.0, 0.0, 1.0),  # relu, no bias (critical)
    (1.0, 0.3, 0.1, 1.0),     # leaky relu
    (1.0, 0.1, -1.0, 1.0),    # abs
])
def test_near_duplicates_match_mpmath(depth, w_std, b_std, a, b):
    rng = np.random.default_rng(depth)
    base, others = _pairs(rng)
    act = f"abrelu(a={a!r}, b={b!r})"
    spec = f"{depth} * [dense(w_std={w_std!r}, b_std={b_std!r}), {act}], " \
           f"dense(w_std={w_std!r}, b_std={b_std!r})"
    got = lk.kernel(spec, base[None, :], others)
    for j, other in enumerate(others):
        ref_k, ref_t = _mp_kernel(base, other, depth, w_std, b_std, a, b)
        np.testing.assert_allclose(got["nngp"][0, j], ref_k, rtol=1e-13, atol=0)
        np.testing.assert_allclose(got["ntk"][0, j], ref_t, rtol=1e-13, atol=0)


def test_symmetric_and_cross_agree_on_near_duplicates():
    rng = np.random.default_rng(7)
    base, others = _pairs(rng)
    x = np.vstack([base, others])
    spec = "3 * [dense(w_std=1.5, b_std=0.05), relu], dense(w_std=1.5, b_std=0.05)"
    sym = lk.kernel(spec, x)
    cross = lk.kernel(spec, x, x.copy())
    for kind in ("nngp", "ntk"):
        np.testing.assert_allclose(sym[kind], cross[kind], rtol=1e-14, atol=0)
