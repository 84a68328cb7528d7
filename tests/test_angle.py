"""The numba building blocks against mpmath: the angle and S(θ) = sin θ − θ cos θ."""

import math

import mpmath
import numpy as np
import pytest
from numba import njit

from limitkernel.layers import _angle as K

mpmath.mp.dps = 40


@njit
def _angles(c):
    out = np.empty((c.shape[0], 2))
    for i in range(c.shape[0]):
        theta, sin_t, cos_t = K.angle(c[i])
        out[i, 0] = theta
        out[i, 1] = K.sin_minus_theta_cos(theta, sin_t, cos_t)
    return out


def test_angle_and_s_match_mpmath():
    # c = 1 − cos θ over its whole range, with many tiny values (near-duplicates)
    # and values next to 2 (antiparallel).
    rng = np.random.default_rng(0)
    c = np.concatenate([np.logspace(-300, -1, 400), rng.uniform(0, 2, 2000),
                        2.0 - np.logspace(-16, -1, 100), [0.0, 1.0, 2.0]])
    got = _angles(c)
    for value, (theta, s) in zip(c, got):
        # θ = 2 asin(√(c/2)) exactly; mpmath's acos(1 − c) would round 1 − c.
        ref = 2 * mpmath.asin(mpmath.sqrt(mpmath.mpf(float(value)) / 2))
        # The angle is exact to a few ulps relative, except at θ → π, where
        # 2 − c = 1 + cos θ has lost its digits to rounding already.
        tol = 4 * np.finfo(float).eps * float(ref)
        assert abs(theta - float(ref)) <= tol, value
        # sin θ − θ cos θ ≈ θ³/3 cancels: give mpmath the digits it loses.
        with mpmath.workdps(40 + int(max(0.0, -3 * math.log10(float(ref) + 1e-320)))):
            theta_hp = 2 * mpmath.asin(mpmath.sqrt(mpmath.mpf(float(value)) / 2))
            ref_s = mpmath.sin(theta_hp) - theta_hp * mpmath.cos(theta_hp)
        assert abs(s - float(ref_s)) <= 8 * np.finfo(float).eps * float(ref_s) + 1e-300, value


def test_s_pair_matches_mpmath_at_both_ends():
    # S(θ) and S(π − θ) from one series, against mpmath at the exact angle of c.
    @njit
    def pairs(c):
        out = np.empty((c.shape[0], 2))
        for i in range(c.shape[0]):
            theta, sin_t, cos_t = K.angle(c[i])
            out[i, 0], out[i, 1] = K.sin_minus_theta_cos_pair(theta, sin_t, cos_t)
        return out

    rng = np.random.default_rng(2)
    c = np.concatenate([np.logspace(-300, -1, 200), rng.uniform(0, 2, 1000),
                        2.0 - np.logspace(-16, -0.2, 200), [0.0, 1.0, 2.0]])
    got = pairs(c)
    eps = np.finfo(float).eps
    for value, (s, s_sup) in zip(c, got):
        # sin θ − θ cos θ ≈ θ³/3 cancels: give mpmath the digits it loses.
        theta = float(K.angle(value)[0])
        with mpmath.workdps(40 + int(max(0.0, -3 * math.log10(theta + 1e-320)))):
            t = 2 * mpmath.asin(mpmath.sqrt(mpmath.mpf(float(value)) / 2))
            ref = mpmath.sin(t) - t * mpmath.cos(t)
            ref_sup = mpmath.sin(t) + (mpmath.pi - t) * mpmath.cos(t)
            gap = float(mpmath.pi - t)
        # S(θ): a few ulps relative, as sin_minus_theta_cos. S(π − θ) ≈ (π − θ)³/3
        # also carries the angle's own absolute error δθ ≤ 4 eps π (tested
        # above) as a relative error 3 δθ / (π − θ).
        assert abs(s - float(ref)) <= 8 * eps * float(ref) + 1e-300, value
        angle_part = 3 * 4 * eps * math.pi / gap if gap > 0 else math.inf
        tol_sup = (8 * eps + angle_part) * float(ref_sup) + 1e-300
        assert abs(s_sup - float(ref_sup)) <= tol_sup, value


@pytest.mark.parametrize("name, low, high", [
    ("atan2_upper", 0.0, math.pi),  # y ≥ 0, every octant
    ("atan2_right", -math.pi / 2, math.pi / 2),  # x > 0 (erf, GELU), y of either sign
])
def test_polynomial_atan2_matches_mpmath(name, low, high):
    atan2 = getattr(K, name)

    @njit
    def many(y, x):
        out = np.empty(y.shape[0])
        for i in range(y.shape[0]):
            out[i] = atan2(y[i], x[i])
        return out

    rng = np.random.default_rng(1)
    angle = rng.uniform(low, high, 5000)
    radius = 10.0 ** rng.uniform(-100, 100, 5000)
    y, x = radius * np.sin(angle), radius * np.cos(angle)
    y[:3], x[:3] = [0.0, -0.0 if low < 0 else 0.0, 1e-300], [1.0, 2.0, 1.0]
    got = many(y, x)
    ref = np.array([float(mpmath.atan2(mpmath.mpf(a), mpmath.mpf(b))) for a, b in zip(y, x)])
    np.testing.assert_allclose(got, ref, rtol=4 * np.finfo(float).eps, atol=0)
    assert np.all(np.sign(got) == np.sign(ref))
