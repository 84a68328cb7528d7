"""Numba kernels: the fused per-entry pass through all layers.

Everything here computes; nothing validates. :mod:`limitkernel.gram` checks the
inputs, fixes dtypes and layouts, and calls :func:`gram_block` with
preallocated outputs.

The state of one Gram entry (x, x') between layers is

* ``q12`` — the covariance K(x, x') of the current layer,
* ``c``   — ``1 - ρ`` with ``ρ = q12 / sqrt(q11 q22)``, carried *separately and
  accurately*: for nearly identical inputs ``1 - ρ`` is far below the rounding
  error of ``q12``, and every closed form that depends on the angle
  ``θ = arccos ρ`` (ReLU and its relatives) needs it to full relative precision;
* ``th``  — the NTK Θ(x, x').

The diagonals ``q11``, ``q22`` of every layer are computed once per input set
(:mod:`limitkernel.gram`) and read here. The pass works one output row at a
time: each layer is a simple loop over the row's entries, which the compiler
vectorises, and the only buffers are a few rows.
"""

import math

import numpy as np
from numba import njit, prange

FASTMATH = {"nsz", "arcp", "contract"}

# Layer opcodes; the parameter rows are documented in limitkernel.gram.
OP_DENSE = 0
OP_ABRELU = 1
OP_STEP = 2
OP_SIGN = 3
OP_RELU_POW = 4
OP_ERF = 5
OP_GELU = 6
OP_TRIG = 7
OP_GAUSSIAN = 8
OP_EXP = 9
OP_HERMITE = 10
# Branches and normalisation (see "branches" below); every opcode from
# OP_SAVE on is dispatched to :func:`_branch_op`.
OP_SAVE = 20
OP_LOAD = 21
OP_ADD = 22
OP_LAYERNORM = 23
OP_DROPOUT = 24

# Below this value of 1 - ρ, the input correlation is recomputed from the
# difference of the normalised inputs rather than from the Gram matrix entry,
# whose rounding error (~1e-16 relative) would dominate 1 - ρ.
NEAR_DUPLICATE = 1e-3

_INV_PI = 1.0 / math.pi
_INV_2PI = 0.5 / math.pi

_jit = njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")


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


@_jit
def _atan2_upper(y, x):
    """atan2(y, x) for y ≥ 0, in [0, π], without a library call.

    Branch-free range reduction (octant, then tan(π/8)) and one polynomial, so the
    loops that call it vectorise; accurate to a few ulps, and to full relative
    precision for small angles.
    """
    ax = abs(x)
    num = min(y, ax)
    den = max(y, ax)
    t = num / den if den > 0.0 else 0.0
    big = t > _TAN_PI_8
    u = (t - 1.0) / (t + 1.0) if big else t
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


@_jit
def _angle(c):
    """θ = arccos(1 - c), from c = 1 - cos θ without cancellation."""
    cos_t = 1.0 - c
    sin_t = math.sqrt(max(c * (2.0 - c), 0.0))
    return _atan2_upper(sin_t, cos_t), sin_t, cos_t


@_jit
def _sin_minus_theta_cos(theta, sin_t, cos_t):
    """S(θ) = sin θ − θ cos θ, by its Taylor series where the two terms cancel.

    S(θ) = Σ_{k≥1} (−1)^{k+1} 2k θ^{2k+1} / (2k+1)!; below θ = 0.6 nine terms
    leave a relative truncation error under 1e-19, and above it the direct
    difference loses at most three bits.
    """
    if theta < 0.6:
        t2 = theta * theta
        poly = (1.0 / 3.0) + t2 * (-1.0 / 30.0 + t2 * (1.0 / 840.0 + t2 * (
            -1.0 / 45360.0 + t2 * (1.0 / 3991680.0 + t2 * (
                -1.0 / 518918400.0 + t2 * (1.0 / 93405312000.0 + t2 * (
                    -1.0 / 22230464256000.0 + t2 * (1.0 / 6758061133824000.0))))))))
        return theta * t2 * poly
    return sin_t - theta * cos_t


# ---------------------------------------------------------------- row ops


@_jit
def _init_row(q12, c, scale, i, j0, x1n, x2n, s1, s2, sym):
    """Input layer: q12 = x·x'/d from the GEMM, and an accurate 1 - ρ."""
    n = q12.shape[0]
    for j in range(n):
        q = q12[j] * scale
        q12[j] = q
        norm = s1 * s2[j]
        c[j] = 1.0 - q / norm if norm > 0.0 else 1.0
    d = x1n.shape[1]
    for j in range(n):
        if c[j] < NEAR_DUPLICATE:
            # 1 - ρ = |x̂ - x̂'|² / 2 for unit vectors x̂, x̂': no cancellation.
            acc = 0.0
            for k in range(d):
                diff = x1n[i, k] - x2n[j0 + j, k]
                acc += diff * diff
            c[j] = 0.5 * acc
    if sym and j0 == i:
        c[0] = 0.0
        q12[0] = s1 * s1


@_jit
def _dense_row(q12, c, th, s11, s22, t11, t22, w2, b2, alpha, beta, want_ntk):
    """K ← σ_w² K + σ_b²; Θ ← α K_old + β + σ_w² Θ (α, β by parameterisation).

    1 - ρ is updated through the Gram determinant, which has no cancellation:
    q11' q22' − q12'² = σ_w⁴ q11 q22 (1 − ρ²) + σ_w² σ_b² (q11 + q22 − 2 q12).
    """
    n = q12.shape[0]
    for j in range(n):
        q = q12[j]
        new = w2 * q + b2
        if want_ntk:
            th[j] = alpha * q + beta + w2 * th[j]
        cj = c[j]
        if t11 > 0.0 and t22[j] > 0.0:
            # Every term is scaled by 1/√(q11' q22') before it is squared, and
            # that factor is applied one root at a time, so tiny (even
            # subnormal) or huge variances neither underflow nor overflow.
            inv1 = 1.0 / t11
            inv2 = 1.0 / t22[j]
            rho_new = (new * inv1) * inv2
            if rho_new > 0.0:
                r = (s11 * inv1) * (s22[j] * inv2)
                u = (s11 - s22[j]) * (math.sqrt(inv1) * math.sqrt(inv2))
                det = w2 * w2 * r * r * cj * (2.0 - cj) + w2 * (b2 * inv1) * inv2 * (
                    u * u + 2.0 * r * cj)
                cn = det / (1.0 + rho_new)
            else:
                cn = 1.0 - rho_new
        else:
            cn = 0.0
        q12[j] = new
        c[j] = min(max(cn, 0.0), 2.0)


@_jit
def _abrelu_row(q12, c, th, s11, s22, a, b, want_ntk):
    """φ(x) = a·x for x < 0, b·x for x ≥ 0 (ReLU, leaky ReLU, abs, identity).

    With S = sin θ − θ cos θ, for u, v of variances q11, q22 and angle θ:
    E[φ(u)φ(v)] = √(q11 q22) [(a²+b²) S(π−θ) − 2ab S(θ)] / (2π),
    E[φ'(u)φ'(v)] = [(a²+b²)(π−θ) + 2ab θ] / (2π),
    1 − ρ' = (1 − cos θ) − (a−b)² S / (π (a²+b²)).
    An input of zero variance is independent of the other: it is taken at
    θ = π/2, which makes E[φ'(u)φ'(v)] = (a+b)²/4, i.e. φ'(0) = (a+b)/2, the
    convention of Neural Tangents (and of JAX's derivative of max(x, 0) at 0).
    """
    n = q12.shape[0]
    apb2 = a * a + b * b
    ab2 = 2.0 * a * b
    shrink = (a - b) * (a - b) * _INV_PI / apb2
    for j in range(n):
        cj = c[j] if s11 * s22[j] > 0.0 else 1.0
        theta, sin_t, cos_t = _angle(cj)
        s = _sin_minus_theta_cos(theta, sin_t, cos_t)
        # sin θ + (π − θ) cos θ = S(π − θ): evaluated as such, it keeps its
        # relative precision as θ → π, where it vanishes like (π − θ)³/3.
        s_sup = _sin_minus_theta_cos(math.pi - theta, sin_t, -cos_t)
        q12[j] = s11 * s22[j] * (apb2 * s_sup - ab2 * s) * _INV_2PI
        if want_ntk:
            th[j] *= (apb2 * (math.pi - theta) + ab2 * theta) * _INV_2PI
        c[j] = min(max(cj - shrink * s, 0.0), 2.0)


@_jit
def _step_row(q12, c, th, s11, s22, signed, want_ntk):
    """Heaviside step (signed=False) or sign (signed=True); φ' = 0 almost everywhere.

    step: E[φφ] = (π − θ)/(2π), 1 − ρ' = θ/π;  sign: E[φφ] = 1 − 2θ/π, 1 − ρ' = 2θ/π.
    An input of zero variance gives φ = 0 (step(0) = sign(0) = 0), uncorrelated
    with anything (ρ' = 0). The NTK factor is 0, as in Neural Tangents' ``Sign``
    (and its ``RectifiedMonomial(0)``), not the δ of the distributional derivative.
    """
    n = q12.shape[0]
    for j in range(n):
        theta = _angle(c[j])[0]
        live = s11 * s22[j] > 0.0
        if signed:
            q12[j] = 1.0 - 2.0 * theta * _INV_PI if live else 0.0
            c[j] = 2.0 * theta * _INV_PI if live else 1.0
        else:
            q12[j] = (math.pi - theta) * _INV_2PI if live else 0.0
            c[j] = theta * _INV_PI if live else 1.0
        if want_ntk:
            th[j] = 0.0


@_jit
def _generic_c(q12, c, t11, t22):
    """1 − ρ' from the new covariance, for activations smooth in ρ."""
    n = q12.shape[0]
    for j in range(n):
        nrm = t11 * t22[j]
        c[j] = min(max(1.0 - q12[j] / nrm, 0.0), 2.0) if nrm > 0.0 else 0.0


@_jit
def _erf_row(q12, c, th, q11, q22, a, b, cc, want_ntk):
    """φ(x) = a·erf(b x) + c (Williams 1997; Neural Tangents ``Erf(a, b, c)``).

    With Δ = (1 + 2b² q11)(1 + 2b² q22) − 4b⁴ q12² ≥ 1:
    E[φφ] = (2a²/π) atan2(2b² q12, √Δ) + c²
          = (2a²/π) asin(2b² q12 / √((1 + 2b² q11)(1 + 2b² q22))) + c²,
    E[φ'φ'] = (4a²b²/π) / √Δ.
    Δ = 1 + 2b²(q11 + q22) + 4b⁴ q11 q22 (1 − ρ²) is a sum of non-negative
    terms, so neither formula cancels, even at ρ = ±1.
    """
    n = q12.shape[0]
    b2 = 2.0 * b * b
    amp = 2.0 * a * a * _INV_PI
    slope = 4.0 * a * a * b * b * _INV_PI
    offset = cc * cc
    for j in range(n):
        cj = c[j]
        det = 1.0 + b2 * (q11 + q22[j]) + b2 * b2 * q11 * q22[j] * cj * (2.0 - cj)
        root = math.sqrt(det)
        q12[j] = amp * math.atan2(b2 * q12[j], root) + offset
        if want_ntk:
            th[j] *= slope / root


@_jit
def _trig_row(q12, c, th, q11, q22, a, b, cc, want_ntk):
    """φ(x) = a·sin(b x + c) (sin, cos, rbf), and an accurate 1 − ρ'.

    With y = b²(q11 + q22 − 2 q12)/2, E− = e^{−y}, E+ = exp(−b²(q11 + q22 + 2 q12)/2)
    and C = cos 2c:
    E[φφ] = a²/2 (E− − C E+),  E[φ'φ'] = a²b²/2 (E− + C E+).
    q11 + q22 − 2 q12 = (√q11 − √q22)² + 2√(q11 q22)(1 − ρ) is formed without
    cancellation. With e_i = exp(−b² q_ii), G = √((1 − C e1²)(1 − C e2²)) (so that
    √(K11' K22') = a² G/2) and M = 1 − C e1 e2, the new correlation satisfies
    (1 − ρ') G = −expm1(−y)(1 + C E+) − C (e1 − e2)² / (G + M),
    whose terms are each accurate (for rbf, C = 0 and 1 − ρ' = −expm1(−y)).
    """
    n = q12.shape[0]
    h = 0.5 * b * b
    b2 = b * b
    cos2c = math.cos(2.0 * cc)
    half_a2 = 0.5 * a * a
    r11 = math.sqrt(q11)
    e1 = math.exp(-b2 * q11)
    big_a = 1.0 - cos2c * e1 * e1
    for j in range(n):
        q = q12[j]
        r22 = math.sqrt(q22[j])
        gap = r11 - r22
        y = h * (gap * gap + 2.0 * r11 * r22 * c[j])
        minus = math.exp(-y)
        plus = math.exp(-h * (q11 + q22[j] + 2.0 * q)) * cos2c
        q12[j] = half_a2 * (minus - plus)
        if want_ntk:
            th[j] *= half_a2 * b2 * (minus + plus)
        # e1 − e2 = e1 (1 − exp(−b²(q22 − q11))), without cancellation.
        e2 = math.exp(-b2 * q22[j])
        de = -e1 * math.expm1(-b2 * (q22[j] - q11))
        g = math.sqrt(big_a * (1.0 - cos2c * e2 * e2))
        m = 1.0 - cos2c * e1 * e2
        num = -math.expm1(-y) * (1.0 + plus) - cos2c * de * de / (g + m)
        c[j] = min(max(num / g, 0.0), 2.0) if g > 0.0 else 0.0


@_jit
def _gaussian_row(q12, c, th, q11, q22, a, b, want_ntk):
    """φ(x) = a·exp(b x²) (Neural Tangents ``Gaussian(a, b)``), for 4b·q < 1.

    With Δ = (1 − 2b q11)(1 − 2b q22) − 4b² q12²
           = 1 − 2b(q11 + q22) + 4b² q11 q22 (1 − ρ²)  (formed that way):
    E[φφ] = a² / √Δ,  E[φ'φ'] = 4a²b² q12 / Δ^{3/2}.
    For b ≤ 0 every term of Δ is ≥ 0; for b > 0 the caller has checked
    4b q < 1 on the diagonals, which makes Δ > 1 − 2b(q11 + q22) > 0.
    """
    n = q12.shape[0]
    a2 = a * a
    slope = 4.0 * a2 * b * b
    for j in range(n):
        cj = c[j]
        det = (1.0 - 2.0 * b * (q11 + q22[j])
               + 4.0 * b * b * q11 * q22[j] * cj * (2.0 - cj))
        root = math.sqrt(det)
        if want_ntk:
            th[j] *= slope * q12[j] / (det * root)
        q12[j] = a2 / root


@_jit
def _exp_row(q12, c, th, q11, q22, a, b, want_ntk):
    """φ(x) = a·exp(b x) (Neural Tangents ``Exp(a, b)``).

    E[φφ] = a² exp(b²(q11 + q22 + 2 q12)/2), E[φ'φ'] = b² E[φφ], and
    ρ' = exp(−b²(q11 + q22 − 2 q12)/2), so 1 − ρ' = −expm1(−y) exactly as in
    :func:`_trig_row`.
    """
    n = q12.shape[0]
    h = 0.5 * b * b
    a2 = a * a
    b2 = b * b
    r11 = math.sqrt(q11)
    for j in range(n):
        val = a2 * math.exp(h * (q11 + q22[j] + 2.0 * q12[j]))
        q12[j] = val
        if want_ntk:
            th[j] *= b2 * val
        r22 = math.sqrt(q22[j])
        gap = r11 - r22
        c[j] = min(-math.expm1(-h * (gap * gap + 2.0 * r11 * r22 * c[j])), 2.0)


@_jit
def _gelu_row(q12, c, th, q11, q22, want_ntk):
    """φ(x) = x Φ(x), Φ the standard normal CDF (exact GELU).

    With P = 1 + q11, Q = 1 + q22, R = P Q − q12² = 1 + q11 + q22 + q11 q22 (1 − ρ²)
    (≥ 1, formed without cancellation) and A = atan2(q12, √R) = asin(q12/√(PQ)):
    E[φφ]   = q12/4 + q12 A/(2π) + (q11 q22 R + q12²) / (2π P Q √R),
    E[φ'φ'] = 1/4 + A/(2π) + q12 (1 + 1/R + (1 − q11 q22)/(P Q)) / (2π √R).
    The first follows from x Φ(x) = E_g[x 1{x − g ≥ 0}], g ~ N(0, 1), and
    Stein's lemma; the second is its derivative in q12 (Price's theorem).
    """
    n = q12.shape[0]
    p = 1.0 + q11
    for j in range(n):
        q = q12[j]
        cj = c[j]
        prod = q11 * q22[j]
        pq = p * (1.0 + q22[j])
        big_r = 1.0 + q11 + q22[j] + prod * cj * (2.0 - cj)
        root = math.sqrt(big_r)
        ang = math.atan2(q, root) * _INV_2PI
        q12[j] = 0.25 * q + q * ang + (prod * big_r + q * q) * _INV_2PI / (pq * root)
        if want_ntk:
            th[j] *= (0.25 + ang + q * _INV_2PI / root
                      * (1.0 + 1.0 / big_r + (1.0 - prod) / pq))


@_jit
def _relu_pow_row(q12, c, th, s11, s22, k, want_ntk):
    """φ(x) = max(x, 0)^k, k = 2, 3, 4 (Cho & Saul 2009, arc-cosine kernel of order k).

    E[φφ] = (q11 q22)^{k/2} J_k(θ)/(2π), E[φ'φ'] = k² (q11 q22)^{(k−1)/2} J_{k−1}(θ)/(2π),
    1 − ρ' = 1 − J_k(θ)/J_k(0) (see :func:`_arccos_j`). An input of zero variance is
    independent of the other (θ = π/2), as in :func:`_abrelu_row`.
    """
    n = q12.shape[0]
    kk = int(k)
    for j in range(n):
        nrm = s11 * s22[j]
        cj = c[j] if nrm > 0.0 else 1.0
        theta, sin_t, cos_t = _angle(cj)
        jk, jk1, ck = _arccos_j(kk, theta, sin_t, cos_t, cj)
        q12[j] = nrm ** kk * jk * _INV_2PI
        if want_ntk:
            th[j] *= kk * kk * nrm ** (kk - 1) * jk1 * _INV_2PI
        c[j] = min(max(ck, 0.0), 2.0)


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


@_jit
def _poly10(coef, w):
    """Σ_j coef[j] w^j for a 10-tuple, by Horner."""
    acc = coef[9]
    for i in range(8, -1, -1):
        acc = acc * w + coef[i]
    return acc


@_jit
def _arccos_j(k, theta, sin_t, cos_t, c):
    """J_k(θ), J_{k−1}(θ) and 1 − J_k(θ)/J_k(0) for k = 2, 3, 4 (c = 1 − cos θ).

    The last keeps its full relative precision as θ → 0 (see the note above).
    """
    pt = math.pi - theta
    x = cos_t
    x2 = x * x
    small = theta < _T_SERIES_BELOW
    t2 = theta * theta
    if k == 2:
        p, q, p_prev, q_prev = 1.0 + 2.0 * x2, 3.0 * x, x, 1.0
        r = 2.0 * (2.0 - c)
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
        r = 24.0 * (2.0 - c) * (4.0 + x2)
        tk = theta * (t2 * t2) * (t2 * t2) * _poly10(_T4, t2) if small else sin_t * q - theta * p
        jk0 = 105.0 * math.pi
    jk = math.pi * p + tk
    jk_prev = pt * p_prev + sin_t * q_prev
    return jk, jk_prev, (math.pi * c * r - tk) / jk0


# Columns per block of a Hermite row: the block's ρ, ρ² and partial sums stay in
# the L1 cache while the coefficient rows stream past.
HERMITE_BLOCK = 128
# A block stops its series at the first k with max |ρ|^k ≤ 2⁻⁵⁴.
_LOG_TINY = -54.0 * math.log(2.0)


@_jit
def _hermite_row(q12, c, th, a_row, b_cols, ad_row, bd_cols, terms, rho, acc, want_ntk):
    """Numerical activation by its Mehler (Hermite) expansion in ρ.

    E[φ(u)φ(v)] = Σ_{k<T} a_k(q11) b_k(q22) ρ^k and likewise for φ', with the
    normalised Hermite coefficients of φ(√q ·) precomputed per input
    (:meth:`limitkernel.activations.Numerical.coefficients`): ``a_row`` (T,) for
    this row's input, ``b_cols`` (T, n) for the columns'. Horner's rule in ρ,
    vectorised over a block of columns, with two savings that change no result
    beyond rounding:

    * a block stops at the first K with r^K ≤ 2⁻⁵⁴, r = max |ρ| over the block:
      by Cauchy–Schwarz and Parseval, |Σ_{k≥K} a_k b_k ρ^k| ≤ r^K √(E[φ(u)²]
      E[φ(v)²]), so what is left is below rounding;
    * a series whose row coefficients vanish at every odd (even) k — an even
      (odd) φ, stored with exact zeros — runs in ρ² over the other half.

    ``c`` (1 − ρ) is only read; the caller recomputes it from the new ``q12``.
    ``rho`` and ``acc`` are scratch rows of length n.
    """
    n = q12.shape[0]
    first_a, step_a = _hermite_parity(a_row, terms)
    first_d, step_d = _hermite_parity(ad_row, terms)
    square = np.empty(HERMITE_BLOCK)
    # An identical input at the start of the row (the diagonal, in the
    # symmetric case) needs every term: it gets a block of its own.
    lone = n > 0 and c[0] == 0.0
    j1 = 0
    while j1 < n:
        j0 = j1
        j1 = 1 if lone and j0 == 0 else min(j0 + HERMITE_BLOCK, n)
        width = j1 - j0
        # Views indexed from 0 let the compiler vectorise the loops.
        x = rho[j0:j1]
        x2 = square[:width]
        cj = c[j0:j1]
        r = 0.0
        for jj in range(width):
            v = 1.0 - cj[jj]
            x[jj] = v
            x2[jj] = v * v
            r = max(r, abs(v))
        count = terms
        if r < 1.0:
            count = min(terms, int(_LOG_TINY / math.log(max(r, 1e-300))) + 1)
        out = q12[j0:j1]
        _hermite_horner(out, a_row, b_cols, j0, j1, x, x2, first_a, step_a, count)
        if want_ntk:
            d = acc[j0:j1]
            _hermite_horner(d, ad_row, bd_cols, j0, j1, x, x2, first_d, step_d, count)
            t = th[j0:j1]
            for jj in range(width):
                t[jj] *= d[jj]


@_jit
def _hermite_parity(coef, terms):
    """(first k, step) of the nonzero terms: (0, 2) even, (1, 2) odd, (0, 1) neither."""
    even = True
    odd = True
    for k in range(terms):
        if coef[k] != 0.0:
            if k % 2 == 0:
                odd = False
            else:
                even = False
    if odd and not even:
        return 1, 2
    if even:
        return 0, 2
    return 0, 1


@_jit
def _hermite_horner(out, coef, cols, j0, j1, x, x2, first, step, count):
    """out = Σ coef[k] cols[k, j0:j1] ρ^k over k = first, first + step, ... < count.

    ``x`` holds ρ and ``x2`` ρ² for the block; step 2 runs Horner in ρ².
    """
    width = out.shape[0]
    for jj in range(width):
        out[jj] = 0.0
    if count <= first:
        return
    last = first + ((count - 1 - first) // step) * step
    z = x if step == 1 else x2
    for k in range(last, first - 1, -step):
        ak = coef[k]
        col = cols[k, j0:j1]
        for jj in range(width):
            out[jj] = out[jj] * z[jj] + ak * col[jj]
    if step == 2 and first == 1:
        for jj in range(width):
            out[jj] *= x[jj]


# ---------------------------------------------------------------- branches
#
# A block with branches is a straight program over the entry state: SAVE copies
# the state (q12, 1 − ρ, Θ) into a stash slot, LOAD restores it (to start the
# next branch from the block input), ADD forms a weighted sum of the stashed
# state and the current one. Stash slots are rows of a per-row scratch array
# with three rows (q12, c, Θ) per slot.


@_jit
def _copy_state(q12, c, th, dq, dc, dt, want_ntk):
    n = q12.shape[0]
    for j in range(n):
        dq[j] = q12[j]
        dc[j] = c[j]
    if want_ntk:
        for j in range(n):
            dt[j] = th[j]


@_jit
def _add_row(q12, c, th, aq, ac, at, s11, s22, r11, r22, t11, t22, wa2, wb2, want_ntk):
    """State ← wa²·(stashed state) + wb²·(current state), for independent terms.

    K and Θ add. With x = wa·√q_a and y = wb·√q_b the standard deviations of the
    two terms (row input 1, column input 2) and t = √(x² + y²) that of the sum,
    1 − ρ of the sum is, exactly,
    [(x1 y2 − x2 y1)² / (t1 t2 + x1 x2 + y1 y2) + x1 x2 (1 − ρ_a) + y1 y2 (1 − ρ_b)] / (t1 t2)
    (Lagrange's identity for the first term), a sum of non-negative terms.
    """
    n = q12.shape[0]
    wa = math.sqrt(wa2)
    wb = math.sqrt(wb2)
    x1 = wa * r11
    y1 = wb * s11
    for j in range(n):
        x2 = wa * r22[j]
        y2 = wb * s22[j]
        q12[j] = wa2 * aq[j] + wb2 * q12[j]
        if want_ntk:
            th[j] = wa2 * at[j] + wb2 * th[j]
        nrm = t11 * t22[j]
        xx = x1 * x2
        yy = y1 * y2
        lag = x1 * y2 - x2 * y1
        if nrm > 0.0:
            cn = (lag * lag / (nrm + xx + yy) + xx * ac[j] + yy * c[j]) / nrm
        else:
            cn = 0.0
        c[j] = min(max(cn, 0.0), 2.0)


@_jit
def _layernorm_row(q12, th, s11, s22, eps, want_ntk):
    """K ← K/√((q11 + ε)(q22 + ε)), Θ likewise; ρ (and 1 − ρ) is unchanged."""
    n = q12.shape[0]
    r1 = math.sqrt(s11 * s11 + eps)
    for j in range(n):
        den = r1 * math.sqrt(s22[j] * s22[j] + eps)
        inv = 1.0 / den if den > 0.0 else 0.0
        q12[j] *= inv
        if want_ntk:
            th[j] *= inv


@_jit
def _dropout_row(q12, c, th, scale, first_is_diagonal, want_ntk):
    """Dropout, keep probability 1/scale: the variance of an input with itself
    grows by ``scale``; entries between different inputs keep K and Θ, and
    1 − ρ' = (1 − 1/scale) + c/scale."""
    n = q12.shape[0]
    keep = 1.0 / scale
    for j in range(n):
        c[j] = min((1.0 - keep) + keep * c[j], 2.0)
    if first_is_diagonal and n > 0:
        q12[0] *= scale
        c[0] = 0.0
        if want_ntk:
            th[0] *= scale


@_jit
def _branch_op(op, q12, c, th, stash, layer, i, j0, s1, s2, p, first_is_diagonal,
               want_ntk):
    """Run one branch or normalisation op on a row; returns the (grown) stash.

    Parameter rows: SAVE, LOAD (slot, number of slots); ADD (slot, wa², wb²,
    layer whose entering diagonals are those of the stashed state); LAYERNORM
    (ε); DROPOUT (1/(1 − p)).
    """
    n = q12.shape[0]
    if op == OP_LAYERNORM:
        _layernorm_row(q12, th, s1[layer, i], s2[layer, j0:j0 + n], p[0], want_ntk)
        return stash
    if op == OP_DROPOUT:
        _dropout_row(q12, c, th, p[0], first_is_diagonal, want_ntk)
        return stash
    slot = int(p[0])
    if op == OP_SAVE and stash.shape[1] < n:
        stash = np.empty((3 * int(p[1]), n))
    aq = stash[3 * slot, :n]
    ac = stash[3 * slot + 1, :n]
    at = stash[3 * slot + 2, :n]
    if op == OP_SAVE:
        _copy_state(q12, c, th, aq, ac, at, want_ntk)
    elif op == OP_LOAD:
        _copy_state(aq, ac, at, q12, c, th, want_ntk)
    else:
        row = int(p[3])
        _add_row(q12, c, th, aq, ac, at, s1[layer, i], s2[layer, j0:j0 + n],
                 s1[row, i], s2[row, j0:j0 + n], s1[layer + 1, i],
                 s2[layer + 1, j0:j0 + n], p[1], p[2], want_ntk)
    return stash


# ---------------------------------------------------------------- the pass


@njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy", nogil=True)
def gram_block(g, k_out, t_out, r0, c0, sym, scale, x1n, x2n, s1, s2,
               ops, prm, h1, h2, hd1, hd2, want_ntk):
    """Fill rows r0 .. r0 + len(g) of the outputs, columns c0 .. c0 + g.shape[1].

    ``g[ii, jj]`` holds x_{r0+ii} · x'_{c0+jj} (unscaled) on entry (a scratch
    buffer, overwritten). ``s1[l], s2[l]`` are the square roots of the diagonals
    entering layer l (row l = 0 is the input layer). With ``sym`` only the
    entries with column >= row are computed. ``h1[m]`` (N, terms) and ``h2[m]``
    (terms, M) hold the Hermite coefficients of the m-th numerical layer for
    rows and columns, ``hd1``, ``hd2`` those of its derivative.
    """
    nb, m = g.shape
    n_layers = ops.shape[0]
    for step in prange(nb):
        # With ``sym``, row lengths fall from m to m - nb; taking rows from both
        # ends in turn gives each thread's contiguous chunk of steps equal work.
        k = np.int64(step)
        half = k // 2
        paired = half if k % 2 == 0 else nb - 1 - half
        ii = paired if sym else k
        i = r0 + ii
        start = min(max(i - c0, 0), m) if sym else 0
        n = m - start
        j0 = c0 + start
        q12 = np.empty(n)
        c = np.empty(n)
        th = np.zeros(n)
        for jj in range(n):
            q12[jj] = g[ii, start + jj]
        _init_row(q12, c, scale, i, j0, x1n, x2n, s1[0, i], s2[0, j0:j0 + n], sym)
        rho = np.empty(0)
        acc = np.empty(0)
        stash = np.empty((0, 0))
        for layer in range(n_layers):
            op = ops[layer]
            a11 = s1[layer, i]
            a22 = s2[layer, j0:j0 + n]
            p = prm[layer]
            if op == OP_DENSE:
                _dense_row(q12, c, th, a11, a22, s1[layer + 1, i],
                           s2[layer + 1, j0:j0 + n], p[0], p[1], p[2], p[3], want_ntk)
                continue
            if op == OP_ABRELU:
                _abrelu_row(q12, c, th, a11, a22, p[0], p[1], want_ntk)
                continue
            if op == OP_STEP or op == OP_SIGN:
                _step_row(q12, c, th, a11, a22, op == OP_SIGN, want_ntk)
                continue
            if op == OP_RELU_POW:
                _relu_pow_row(q12, c, th, a11, a22, p[0], want_ntk)
                continue
            if op >= OP_SAVE:
                stash = _branch_op(op, q12, c, th, stash, layer, i, j0, s1, s2, p,
                                   sym and j0 == i, want_ntk)
                continue
            q11 = a11 * a11
            q22 = a22 * a22
            # trig and exp update 1 − ρ themselves, accurately.
            if op == OP_TRIG:
                _trig_row(q12, c, th, q11, q22, p[0], p[1], p[2], want_ntk)
                continue
            if op == OP_EXP:
                _exp_row(q12, c, th, q11, q22, p[0], p[1], want_ntk)
                continue
            if op == OP_ERF:
                _erf_row(q12, c, th, q11, q22, p[0], p[1], p[2], want_ntk)
            elif op == OP_GELU:
                _gelu_row(q12, c, th, q11, q22, want_ntk)
            elif op == OP_GAUSSIAN:
                _gaussian_row(q12, c, th, q11, q22, p[0], p[1], want_ntk)
            elif op == OP_HERMITE:
                if rho.shape[0] < n:
                    rho = np.empty(n)
                    acc = np.empty(n)
                h = int(p[0])
                _hermite_row(q12, c, th, h1[h, i], h2[h, :, j0:j0 + n],
                             hd1[h, i], hd2[h, :, j0:j0 + n], int(p[1]),
                             rho[:n], acc[:n], want_ntk)
            b11 = s1[layer + 1, i]
            _generic_c(q12, c, b11, s2[layer + 1, j0:j0 + n])
        for jj in range(n):
            k_out[i, j0 + jj] = q12[jj]
        if want_ntk:
            for jj in range(n):
                t_out[i, j0 + jj] = th[jj]


@njit(parallel=True, cache=True, nogil=True)
def mirror_upper(a):
    """Copy the upper triangle of a square matrix onto its lower triangle."""
    n = a.shape[0]
    block = 64
    nblocks = (n + block - 1) // block
    for bi in prange(nblocks):
        r0 = bi * block
        r1 = min(r0 + block, n)
        for bj in range(bi + 1):
            c0 = bj * block
            c1 = min(c0 + block, n)
            for r in range(r0, r1):
                for col in range(c0, min(c1, r)):
                    a[r, col] = a[col, r]
