"""The angle between two inputs, to full relative precision: shared numerics.

The kernels carry 1 − ρ (``one_minus_rho``) instead of ρ = cos θ, because for
nearly identical inputs 1 − ρ is far below the rounding error of ρ. These
helpers turn it into θ and into the Cho–Saul arc-cosine terms without
cancellation; the ReLU family (:mod:`limitkernel.layers.activations`) and the
tests use them.
"""

import math

from .._numba import jit

__all__ = ["angle", "arccos_j", "atan2_right", "atan2_upper", "sin_minus_theta_cos",
           "sin_minus_theta_cos_pair"]

INV_PI = 1.0 / math.pi
INV_2PI = 0.5 / math.pi



# atan(u)/u = Σ_k ATAN_POLY[k] (u²)^k on 0 ≤ u² ≤ tan²(π/8): the polynomial that
# interpolates it at 14 Chebyshev nodes of that interval, solved in 50-digit
# mpmath and rounded to float64 (max relative error 2.4e-18 there):
#   a = mp.tan(mp.pi/8)**2; nodes = [a/2*(1 + mp.cos(mp.pi*(k + 0.5)/14)) ...]
#   mp.lu_solve(vandermonde(nodes), [mp.atan(mp.sqrt(w))/mp.sqrt(w) for w in nodes])
# tests/test_kernels.py checks the resulting angle against mpmath.
ATAN_POLY = (
    1.0, -0.3333333333333333, 0.1999999999999985, -0.14285714285692105,
    0.11111111109374344, -0.09090909009273804, 0.07692305199589404,
    -0.06666614813536087, 0.058815973499589294, -0.052553408501062854,
    0.047044349347049826, -0.04051145565673609, 0.029533108747433718,
    -0.012911256782015863,
)
_TAN_PI_8 = 0.41421356237309503


@jit
def atan2_upper(y, x):
    """atan2(y, x) for y ≥ 0, in [0, π], without a library call.

    Branch-free range reduction (octant, then tan(π/8)) and one polynomial, so the
    loops that call it vectorise; accurate to a few ulps, and to full relative
    precision for small angles. For y and |x| below 8e307 (y + |x| must not
    overflow); the kernels pass sin θ and cos θ.
    """
    ax = abs(x)
    num = min(y, ax)
    den = max(y, ax)
    # t = num/den, reduced past tan(π/8) to (t − 1)/(t + 1) = (num − den)/(num + den):
    # one division either way.
    big = num > _TAN_PI_8 * den
    u = (num - den if big else num) / (num + den if big else (den if den > 0.0 else 1.0))
    w = u * u
    p = ATAN_POLY[13]
    p = p * w + ATAN_POLY[12]
    p = p * w + ATAN_POLY[11]
    p = p * w + ATAN_POLY[10]
    p = p * w + ATAN_POLY[9]
    p = p * w + ATAN_POLY[8]
    p = p * w + ATAN_POLY[7]
    p = p * w + ATAN_POLY[6]
    p = p * w + ATAN_POLY[5]
    p = p * w + ATAN_POLY[4]
    p = p * w + ATAN_POLY[3]
    p = p * w + ATAN_POLY[2]
    p = p * w + ATAN_POLY[1]
    p = p * w + ATAN_POLY[0]
    a = u * p + (0.7853981633974483 if big else 0.0)
    a = 1.5707963267948966 - a if y > ax else a
    return math.pi - a if x < 0.0 else a


@jit
def atan2_right(y, x):
    """atan2(y, x) for x > 0, in (−π/2, π/2): :func:`atan2_upper` of |y|, signed
    (vectorises where ``math.atan2``, a library call, does not)."""
    a = atan2_upper(abs(y), x)
    return -a if y < 0.0 else a


@jit
def angle(one_minus_rho):
    """θ = arccos(1 − one_minus_rho), without cancellation; returns (θ, sin θ, cos θ)."""
    cos_t = 1.0 - one_minus_rho
    sin_t = math.sqrt(max(one_minus_rho * (2.0 - one_minus_rho), 0.0))
    return atan2_upper(sin_t, cos_t), sin_t, cos_t


@jit
def sin_minus_theta_cos(theta, sin_t, cos_t):
    """S(θ) = sin θ − θ cos θ, by its Taylor series where the two terms cancel.

    S(θ) = Σ_{k≥1} (−1)^{k+1} 2k θ^{2k+1} / (2k+1)!; below θ = 0.6 nine terms
    leave a relative truncation error under 1e-19, and above it the direct
    difference loses at most three bits.
    """
    if theta < _S_SERIES_BELOW:
        return _s_series(theta)
    return sin_t - theta * cos_t


@jit
def _s_series(theta):
    t2 = theta * theta
    poly = (1.0 / 3.0) + t2 * (-1.0 / 30.0 + t2 * (1.0 / 840.0 + t2 * (
        -1.0 / 45360.0 + t2 * (1.0 / 3991680.0 + t2 * (
            -1.0 / 518918400.0 + t2 * (1.0 / 93405312000.0 + t2 * (
                -1.0 / 22230464256000.0 + t2 * (1.0 / 6758061133824000.0))))))))
    return theta * t2 * poly


_S_SERIES_BELOW = 0.6


@jit
def sin_minus_theta_cos_pair(theta, sin_t, cos_t):
    """(S(θ), S(π − θ)), with one Taylor series between them.

    S(π − θ) = sin θ + (π − θ) cos θ vanishes like (π − θ)³/3 as θ → π, as S(θ)
    does as θ → 0. With φ = min(θ, π − θ) and c = cos φ ≥ 0, S(φ) is taken as
    :func:`sin_minus_theta_cos` takes it, and the other as S(φ) + π c (by the
    series, φ < 0.6) or sin φ + (π − φ) c: sums of terms ≥ 0, no cancellation.
    """
    far = theta > 0.5 * math.pi
    phi = math.pi - theta if far else theta
    c = -cos_t if far else cos_t
    near_s = sin_minus_theta_cos(phi, sin_t, c)
    if phi < _S_SERIES_BELOW:
        far_s = near_s + math.pi * c
    else:
        far_s = sin_t + (math.pi - phi) * c
    if far:
        return far_s, near_s
    return near_s, far_s


# Cho–Saul arc-cosine integrals, J_k(θ) = (π − θ) P_k(cos θ) + sin θ Q_k(cos θ):
#   J_0 = π − θ,  J_1 = sin θ + (π − θ) cos θ,
#   J_2 = 3 sin θ cos θ + (π − θ)(1 + 2 cos²θ),
#   J_3 = sin θ (4 + 11 cos²θ) + (π − θ) cos θ (9 + 6 cos²θ),
#   J_4 = sin θ cos θ (55 + 50 cos²θ) + (π − θ)(9 + 72 cos²θ + 24 cos⁴θ).
# They follow from κ_k(ρ) = J_k(θ)/(2π) = E[relu(u)^k relu(v)^k] for unit
# variances and correlation ρ = cos θ: Price's theorem gives dκ_k/dρ = k² κ_{k−1}
# and κ_k(−1) = 0, so J_k(θ) = k² ∫_θ^π J_{k−1}(t) sin t dt, and J_k(0) = (2k−1)!! π.
# Split J_k = π P_k(cos θ) + T_k(θ) with T_k = sin θ Q_k(cos θ) − θ P_k(cos θ);
# then (P_k' = k² P_{k−1}) T_k' = −k² sin θ T_{k−1}, T_0 = −θ, so T_k = O(θ^{2k+1})
# and
#   1 − J_k(θ)/J_k(0) = [π c R_k(cos θ) − T_k(θ)] / J_k(0),  c = 1 − cos θ,
# with R_k(x) = (P_k(1) − P_k(x))/(1 − x):  R_2 = 2(1 + x), R_3 = 15 + 6x + 6x²,
# R_4 = 24(1 + x)(4 + x²). Computed directly, T_k is a difference of terms of
# size θ; below θ = 1/2 it comes from its Taylor series
# T_k = θ^{2k+1} Σ_j t_{k,j} θ^{2j} (exact rationals from sympy's
# series(sin(t)*Q_k(cos(t)) - t*P_k(cos(t)), t, 0, 2k+21)); ten terms leave a
# relative truncation error below 1e-17 there.
_T2 = (-4 / 15, 16 / 315, -4 / 945, 32 / 155925, -8 / 1216215, 32 / 212837625,
       -4 / 1550674125, 64 / 1856156927625, -8 / 21655164155625,
       32 / 9861761756471625)
_T3 = (12 / 35, -2 / 21, 47 / 3850, -173 / 180180, 39443 / 756756000,
       -3581 / 1715313600, 1135021 / 17599117536000, -234571 / 147832587302400,
       10593529 / 332459063000064000, -47807083 / 89763947010017280000)
_T4 = (-64 / 105, 256 / 1155, -8576 / 225225, 19456 / 4729725,
       -126272 / 402026625, 248576 / 13749310575, -1967744 / 2406129350625,
       729088 / 24350029028325, -637312 / 702404683509375,
       44540416 / 1923043542511966875)
_T_SERIES_BELOW = 0.5


@jit
def _poly10(coef, w):
    """Σ_j coef[j] w^j for a 10-tuple, by Horner."""
    acc = coef[9]
    for i in range(8, -1, -1):
        acc = acc * w + coef[i]
    return acc


@jit
def arccos_j(k, theta, sin_t, cos_t, one_minus_rho):
    """J_k(θ), J_{k−1}(θ) and 1 − J_k(θ)/J_k(0) for k = 2, 3, 4 (one_minus_rho = 1 − cos θ).

    The last keeps its full relative precision as θ → 0 (see the note above).
    """
    pt = math.pi - theta
    x = cos_t
    x2 = x * x
    small = theta < _T_SERIES_BELOW
    t2 = theta * theta
    if k == 2:
        p, q, p_prev, q_prev = 1.0 + 2.0 * x2, 3.0 * x, x, 1.0
        r = 2.0 * (2.0 - one_minus_rho)
        tk = theta * t2 * t2 * _poly10(_T2, t2) if small else sin_t * q - theta * p
        jk0 = 3.0 * math.pi
    elif k == 3:
        p, q = x * (9.0 + 6.0 * x2), 4.0 + 11.0 * x2
        p_prev, q_prev = 1.0 + 2.0 * x2, 3.0 * x
        r = 15.0 + 6.0 * x + 6.0 * x2
        tk = theta * (t2 * t2 * t2) * _poly10(_T3, t2) if small else sin_t * q - theta * p
        jk0 = 15.0 * math.pi
    else:
        p, q = 9.0 + x2 * (72.0 + 24.0 * x2), x * (55.0 + 50.0 * x2)
        p_prev, q_prev = x * (9.0 + 6.0 * x2), 4.0 + 11.0 * x2
        r = 24.0 * (2.0 - one_minus_rho) * (4.0 + x2)
        tk = theta * (t2 * t2) * (t2 * t2) * _poly10(_T4, t2) if small else sin_t * q - theta * p
        jk0 = 105.0 * math.pi
    jk = math.pi * p + tk
    jk_prev = pt * p_prev + sin_t * q_prev
    return jk, jk_prev, (math.pi * one_minus_rho * r - tk) / jk0


