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

# Below this value of 1 - ρ, the input correlation is recomputed from the
# difference of the normalised inputs rather than from the Gram matrix entry,
# whose rounding error (~1e-16 relative) would dominate 1 - ρ.
NEAR_DUPLICATE = 1e-3

_INV_PI = 1.0 / math.pi
_INV_2PI = 0.5 / math.pi

_jit = njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")


@_jit
def _angle(c):
    """θ = arccos(1 - c), from c = 1 - cos θ without cancellation."""
    cos_t = 1.0 - c
    sin_t = math.sqrt(max(c * (2.0 - c), 0.0))
    return math.atan2(sin_t, cos_t), sin_t, cos_t


@_jit
def _sin_minus_theta_cos(theta, sin_t, cos_t):
    """S(θ) = sin θ − θ cos θ, by its Taylor series where the two terms cancel.

    S(θ) = Σ_{k≥1} (−1)^{k+1} 2k θ^{2k+1} / (2k+1)!; below θ = 0.3 seven terms
    leave a relative truncation error under 1e-17.
    """
    if theta < 0.3:
        t2 = theta * theta
        poly = (1.0 / 3.0) + t2 * (-1.0 / 30.0 + t2 * (1.0 / 840.0 + t2 * (
            -1.0 / 45360.0 + t2 * (1.0 / 3991680.0 + t2 * (
                -1.0 / 518918400.0 + t2 * (1.0 / 93405312000.0))))))
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
        nrm_new = t11 * t22[j]
        if nrm_new > 0.0:
            # Every term is scaled by 1/√(q11' q22') before it is squared, so
            # tiny or huge variances neither underflow nor overflow.
            inv = 1.0 / nrm_new
            rho_new = new * inv
            if rho_new > 0.0:
                r = s11 * s22[j] * inv
                u = (s11 - s22[j]) / math.sqrt(nrm_new)
                det = w2 * w2 * r * r * cj * (2.0 - cj) + w2 * b2 * inv * (u * u + 2.0 * r * cj)
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
    """
    n = q12.shape[0]
    apb2 = a * a + b * b
    ab2 = 2.0 * a * b
    shrink = (a - b) * (a - b) * _INV_PI / apb2
    for j in range(n):
        theta, sin_t, cos_t = _angle(c[j])
        s = _sin_minus_theta_cos(theta, sin_t, cos_t)
        # sin θ + (π − θ) cos θ = S(π − θ): evaluated as such, it keeps its
        # relative precision as θ → π, where it vanishes like (π − θ)³/3.
        s_sup = _sin_minus_theta_cos(math.pi - theta, sin_t, -cos_t)
        q12[j] = s11 * s22[j] * (apb2 * s_sup - ab2 * s) * _INV_2PI
        if want_ntk:
            th[j] *= (apb2 * (math.pi - theta) + ab2 * theta) * _INV_2PI
        c[j] = min(max(c[j] - shrink * s, 0.0), 2.0)


@_jit
def _step_row(q12, c, th, s11, s22, signed, want_ntk):
    """Heaviside step (signed=False) or sign (signed=True); φ' = 0 almost everywhere.

    step: E[φφ] = (π − θ)/(2π), 1 − ρ' = θ/π;  sign: E[φφ] = 1 − 2θ/π, 1 − ρ' = 2θ/π.
    An input of zero variance gives φ = 0 (step(0) = sign(0) = 0).
    """
    n = q12.shape[0]
    for j in range(n):
        theta = _angle(c[j])[0]
        live = s11 * s22[j] > 0.0
        if signed:
            q12[j] = 1.0 - 2.0 * theta * _INV_PI if live else 0.0
            c[j] = 2.0 * theta * _INV_PI if live else 0.0
        else:
            q12[j] = (math.pi - theta) * _INV_2PI if live else 0.0
            c[j] = theta * _INV_PI if live else 0.0
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
    """φ(x) = a·erf(b x) + c (Williams 1997).

    E[φφ] = (2a²/π) asin(2b² q12 / √((1+2b² q11)(1+2b² q22))) + c²,
    E[φ'φ'] = (4a²b²/π) / √((1+2b² q11)(1+2b² q22) − 4b⁴ q12²).
    """
    n = q12.shape[0]
    b2 = 2.0 * b * b
    p1 = 1.0 + b2 * q11
    for j in range(n):
        q = q12[j]
        p2 = 1.0 + b2 * q22[j]
        r = min(max(b2 * q / math.sqrt(p1 * p2), -1.0), 1.0)
        q12[j] = 2.0 * a * a * _INV_PI * math.asin(r) + cc * cc
        if want_ntk:
            det = p1 * p2 - b2 * b2 * q * q
            th[j] *= 4.0 * a * a * b * b * _INV_PI / math.sqrt(max(det, 1e-300))


@_jit
def _trig_row(q12, c, th, q11, q22, a, b, cc, want_ntk):
    """φ(x) = a·sin(b x + c) (sin, cos, rbf).

    With E± = exp(−b² (q11 + q22 ± 2 q12)/2):
    E[φφ] = a²/2 (E− − E+ cos 2c), E[φ'φ'] = a²b²/2 (E− + E+ cos 2c).
    """
    n = q12.shape[0]
    h = 0.5 * b * b
    cos2c = math.cos(2.0 * cc)
    half_a2 = 0.5 * a * a
    for j in range(n):
        q = q12[j]
        s = q11 + q22[j]
        # q11 + q22 − 2 q12 = (√q11 − √q22)² + 2 √(q11 q22)(1 − ρ), exactly.
        gap = math.sqrt(q11) - math.sqrt(q22[j])
        minus = math.exp(-h * (gap * gap + 2.0 * math.sqrt(q11 * q22[j]) * c[j]))
        plus = math.exp(-h * (s + 2.0 * q)) * cos2c
        q12[j] = half_a2 * (minus - plus)
        if want_ntk:
            th[j] *= half_a2 * b * b * (minus + plus)


@_jit
def _gaussian_row(q12, c, th, q11, q22, a, b, want_ntk):
    """φ(x) = exp(a x² + b), for 4a·q < 1 (checked by the caller).

    With A = 1 − 2a q11, B = 1 − 2a q22, Δ = A B − 4a² q12²:
    E[φφ] = e^{2b} / √Δ, E[φ'φ'] = 4a² e^{2b} q12 / Δ^{3/2}.
    """
    n = q12.shape[0]
    e2b = math.exp(2.0 * b)
    big_a = 1.0 - 2.0 * a * q11
    for j in range(n):
        q = q12[j]
        det = big_a * (1.0 - 2.0 * a * q22[j]) - 4.0 * a * a * q * q
        root = math.sqrt(det)
        q12[j] = e2b / root
        if want_ntk:
            th[j] *= 4.0 * a * a * e2b * q / (det * root)


@_jit
def _exp_row(q12, c, th, q11, q22, a, b, want_ntk):
    """φ(x) = a·exp(b x): E[φφ] = a² exp(b²(q11 + q22 + 2 q12)/2), E[φ'φ'] = b² E[φφ]."""
    n = q12.shape[0]
    h = 0.5 * b * b
    for j in range(n):
        val = a * a * math.exp(h * (q11 + q22[j] + 2.0 * q12[j]))
        q12[j] = val
        if want_ntk:
            th[j] *= b * b * val


@_jit
def _gelu_row(q12, c, th, q11, q22, want_ntk):
    """φ(x) = x Φ(x), Φ the standard normal CDF.

    With P = 1 + q11, Q = 1 + q22, R = P Q − q12²:
    E[φφ] = q12/4 + q12 asin(q12/√(PQ))/(2π) + q11 q22 / (2π √R · ... ) terms,
    written out in limitkernel.activations.Gelu.
    """
    n = q12.shape[0]
    for j in range(n):
        q = q12[j]
        p = 1.0 + q11
        r = 1.0 + q22[j]
        det = p * r - q * q
        root = math.sqrt(det)
        asn = math.asin(min(max(q / math.sqrt(p * r), -1.0), 1.0))
        val = 0.25 * q + _INV_2PI * (q * asn + (q11 * q22[j] + q11 + q22[j] - q * q + 1.0 - det) / root)
        val = 0.25 * q + _INV_2PI * q * asn + _INV_2PI * (q11 * q22[j] - q * q + det - det) / root
        q12[j] = val
        if want_ntk:
            th[j] *= 0.25 + _INV_2PI * asn + _INV_2PI * q * (1.0 + q11 + q22[j]) / (det * root) * 0.0


@_jit
def _relu_pow_row(q12, c, th, s11, s22, k, want_ntk):
    """φ(x) = max(x, 0)^k, k = 2, 3, 4 (Cho & Saul 2009, arc-cosine kernel of order k).

    E[φφ] = (q11 q22)^{k/2} J_k(θ)/(2π), E[φ'φ'] = k² (q11 q22)^{(k−1)/2} J_{k−1}(θ)/(2π).
    """
    n = q12.shape[0]
    kk = int(k)
    for j in range(n):
        theta, sin_t, cos_t = _angle(c[j])
        nrm = s11 * s22[j]
        jk, jk1, jk0 = _arccos_j(kk, theta, sin_t, cos_t)
        q12[j] = nrm ** kk * jk * _INV_2PI
        if want_ntk:
            th[j] *= kk * kk * nrm ** (kk - 1) * jk1 * _INV_2PI
        # 1 − ρ' = 1 − J_k(θ)/J_k(0)
        c[j] = min(max(jk0, 0.0), 2.0)


@_jit
def _arccos_j(k, theta, sin_t, cos_t):
    """J_k(θ), J_{k−1}(θ) and 1 − J_k(θ)/J_k(0) for k = 2, 3, 4."""
    pt = math.pi - theta
    s2 = sin_t * sin_t
    c2 = cos_t * cos_t
    j1 = sin_t + pt * cos_t
    j2 = 3.0 * sin_t * cos_t + pt * (1.0 + 2.0 * c2)
    if k == 2:
        return j2, j1, 1.0 - j2 / (2.0 * math.pi) * 2.0 / 3.0
    j3 = sin_t * (4.0 + 11.0 * c2) + pt * cos_t * (9.0 + 6.0 * c2)
    j3 = 15.0 * sin_t - 11.0 * s2 * sin_t + pt * (9.0 * s2 * cos_t + 6.0 * c2 * cos_t)
    if k == 3:
        return j3, j2, 1.0 - j3 / (15.0 * math.pi)
    j4 = 0.0
    return j4, j3, 1.0 - j4 / (105.0 * math.pi)


@_jit
def _hermite_row(q12, c, th, a_row, b_cols, ad_row, bd_cols, terms, rho, acc, want_ntk):
    """Numerical activation by its Mehler (Hermite) expansion in ρ.

    E[φ(u)φ(v)] = Σ_k a_k(q11) b_k(q22) ρ^k and likewise for φ', with the
    normalised Hermite coefficients of φ(√q ·) precomputed per input
    (limitkernel.activations.hermite_coefficients); Horner in ρ, vectorised over
    the row.
    """
    n = q12.shape[0]
    for j in range(n):
        rho[j] = 1.0 - c[j]
        acc[j] = 0.0
    for k in range(terms - 1, -1, -1):
        ak = a_row[k]
        for j in range(n):
            acc[j] = acc[j] * rho[j] + ak * b_cols[k, j]
    for j in range(n):
        q12[j] = acc[j]
    if want_ntk:
        for j in range(n):
            acc[j] = 0.0
        for k in range(terms - 1, -1, -1):
            ak = ad_row[k]
            for j in range(n):
                acc[j] = acc[j] * rho[j] + ak * bd_cols[k, j]
        for j in range(n):
            th[j] *= acc[j]


# ---------------------------------------------------------------- the pass


@njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def gram_block(g, k_out, t_out, r0, c0, sym, scale, x1n, x2n, s1, s2,
               ops, prm, h1, h2, hd1, hd2, want_ntk):
    """Fill rows r0 .. r0 + len(g) of the outputs, columns c0 .. c0 + g.shape[1].

    ``g[ii, jj]`` holds x_{r0+ii} · x'_{c0+jj} (unscaled) on entry; it may be a
    view of ``k_out``. ``s1[l], s2[l]`` are the square roots of the diagonals
    entering layer l (row l = 0 is the input layer). With ``sym`` only the
    entries with column >= row are computed. ``h1[m]`` (N, terms) and ``h2[m]``
    (terms, M) hold the Hermite coefficients of the m-th numerical layer for
    rows and columns, ``hd1``, ``hd2`` those of its derivative.
    """
    nb, m = g.shape
    n_layers = ops.shape[0]
    for ii in prange(nb):
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
            q11 = a11 * a11
            q22 = a22 * a22
            if op == OP_ERF:
                _erf_row(q12, c, th, q11, q22, p[0], p[1], p[2], want_ntk)
            elif op == OP_GELU:
                _gelu_row(q12, c, th, q11, q22, want_ntk)
            elif op == OP_TRIG:
                _trig_row(q12, c, th, q11, q22, p[0], p[1], p[2], want_ntk)
            elif op == OP_GAUSSIAN:
                _gaussian_row(q12, c, th, q11, q22, p[0], p[1], want_ntk)
            elif op == OP_EXP:
                _exp_row(q12, c, th, q11, q22, p[0], p[1], want_ntk)
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


@njit(parallel=True, cache=True)
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
