"""The fused pass: every Gram entry carried through every op of a program, by rows.

Everything here computes; nothing validates. :mod:`limitkernel.gram` checks the
inputs, fixes dtypes and layouts, and calls :func:`gram_block` with
preallocated outputs.

The state of one Gram entry (x, x') between ops is

* ``q12`` — the covariance K(x, x') of the current layer,
* ``one_minus_rho`` — ``1 - ρ`` with ``ρ = q12 / sqrt(q11 q22)``, carried
  *separately and accurately*: for nearly identical inputs ``1 - ρ`` is far
  below the rounding error of ``q12``, and every closed form that depends on the
  angle ``θ = arccos ρ`` (ReLU and its relatives) needs it to full relative
  precision;
* ``ntk`` — the NTK Θ(x, x').

The diagonals ``q11``, ``q22`` of every op are computed once per input set
(:meth:`limitkernel._program.Program.diagonals`) and read here as their roots.
The pass works one output row at a time: each op is a simple loop over the
row's entries (a row kernel, defined beside its layer kind in
:mod:`limitkernel.layers`), which the compiler vectorises, and the only buffers
are a few rows. Rows are taken in groups: in the symmetric case each group
writes its mirror image below the diagonal, a cache line (:data:`CACHE_LINE`)
per output row, and with Hermite series (:data:`ROW_GROUP_SERIES` rows) the
group shares each block of column coefficients while it is in cache.
"""

import math

import numpy as np
from numba import prange

from ._numba import jit, jit_parallel
from .layers.activations import (
    OP_ABRELU,
    OP_ERF,
    OP_EXP,
    OP_GAUSSIAN,
    OP_GELU,
    OP_RELU_POW,
    OP_SIGN,
    OP_STEP,
    OP_TRIG,
    abrelu_row,
    erf_row,
    exp_row,
    gaussian_row,
    gelu_row,
    relu_pow_row,
    sign_row,
    step_row,
    trig_row,
)
from .layers.blocks import OP_ADD, OP_LOAD, OP_SAVE, stash_op
from .layers.conv import OP_AVG_POOL, OP_CONV, OP_FLATTEN, OP_GLOBAL_AVG_POOL
from .layers.dense import OP_DENSE, dense_row
from .layers.normalization import OP_DROPOUT, OP_LAYERNORM, dropout_row, layernorm_row
from .layers.numerical import OP_HERMITE, hermite_diagonal, hermite_row, hermite_rows

__all__ = ["DISPATCHED", "NEAR_DUPLICATE", "CACHE_LINE", "ROW_GROUP_SERIES", "apply_row_op",
           "gram_block", "init_row", "run_ops", "self_rows", "unit_difference"]

# Every opcode the passes run (this one, and those of positions in
# :mod:`limitkernel._fused_spatial`); an op a pass does not know leaves its code
# in ``status`` and :mod:`limitkernel.gram` refuses the result.
DISPATCHED = (OP_DENSE, OP_ABRELU, OP_STEP, OP_SIGN, OP_RELU_POW, OP_ERF, OP_GELU,
              OP_TRIG, OP_GAUSSIAN, OP_EXP, OP_HERMITE, OP_SAVE, OP_LOAD, OP_ADD,
              OP_LAYERNORM, OP_DROPOUT, OP_CONV, OP_AVG_POOL, OP_GLOBAL_AVG_POOL,
              OP_FLATTEN)

# Below this value of 1 - ρ, the input correlation is recomputed from the
# difference of the normalised inputs rather than from the Gram matrix entry,
# whose rounding error (~1e-16 relative) would dominate 1 - ρ.
NEAR_DUPLICATE = 1e-3

# The largest finite float64: |v| <= it fails for inf and NaN alone.
_LARGEST = float(np.finfo(np.float64).max)

# Rows per task of the Gram pass: the mirrored entries of a group fill one
# cache line (64 bytes) of each row below it, 8 float64 or 16 float32 (float32
# output at N = 8000, 3 ReLU layers: 16 rows 9% faster than 8; float64: 16 rows
# 6% slower than 8). With Hermite series a group has 16 rows whatever the
# dtype: its rows share each block of column coefficients while it is in
# cache, and those tables (terms × columns) are read from memory once per group
# (measured at N = 8000, 3 tanh layers: groups of 16 rows are 1.2x faster than
# 8, 32 no faster than 16).
CACHE_LINE = 64
ROW_GROUP_SERIES = 16


@jit
def unit_difference(a, b, sign=1.0):
    """x̂ − sign · x̂' (sign ±1, exact) in one component, from the two parts (2,)
    of each unit vector's (:func:`limitkernel._rows.unit_rows`)."""
    return (a[0] - sign * b[0]) + (a[1] - sign * b[1])


@jit
def _unit_gap(x1n, i, x2n, j, sign):
    """|x̂_i − sign · x̂'_j|² = 2 (1 − sign · ρ), without cancellation."""
    acc = 0.0
    for k in range(x1n.shape[1]):
        gap = unit_difference(x1n[i, k], x2n[j, k], sign)
        acc += gap * gap
    return acc


@jit
def init_row(q12, one_minus_rho, scale, i, j0, x1n, x2n, s1, s2, v1, v2, sym, unit=False,
             near=NEAR_DUPLICATE):
    """Input layer: q12 = x·x'/d from the GEMM, and an accurate 1 - ρ.

    ``s1``, ``s2`` are the inputs' norms/√d, ``v1``, ``v2`` their squares as
    the diagonals hold them: a pair of identical inputs (the same unit vector
    and norm) takes exactly the diagonal's value, not the GEMM's. With
    ``unit`` the GEMM is of the unit vectors (it holds ρ itself, and ``scale``
    is not used). 1 − ρ is recomputed from the unit vectors below ``near``,
    and with ``unit`` 1 + ρ too.
    """
    n = q12.shape[0]
    if unit:
        for j in range(n):
            rho = q12[j]
            q12[j] = rho * (s1 * s2[j])
            one_minus_rho[j] = 1.0 - rho
    else:
        for j in range(n):
            q = q12[j] * scale
            q12[j] = q
            norm = s1 * s2[j]
            one_minus_rho[j] = 1.0 - q / norm if norm > 0.0 else 1.0
    for j in range(n):
        if one_minus_rho[j] < near:
            # 1 - ρ = |x̂ - x̂'|² / 2 for unit vectors x̂, x̂': no cancellation,
            # and each held in two parts, so that their difference keeps its
            # relative precision however close the inputs are.
            acc = _unit_gap(x1n, i, x2n, j0 + j, 1.0)
            one_minus_rho[j] = 0.5 * acc
            if unit:
                # The float32 product's ρ, replaced by the float64 one.
                q12[j] = (1.0 - one_minus_rho[j]) * (s1 * s2[j])
            if acc == 0.0 and s1 == s2[j]:
                q12[j] = v1
    if unit:
        for j in range(n):
            if one_minus_rho[j] > 2.0 - near:
                # Nearly antiparallel: the angle's slope at θ ≈ π would amplify
                # the float32 product's error too, so ρ = |x̂ + x̂'|²/2 − 1 in
                # float64, as accurate as float64 products give it.
                acc = _unit_gap(x1n, i, x2n, j0 + j, -1.0)
                one_minus_rho[j] = 2.0 - 0.5 * acc
                q12[j] = (0.5 * acc - 1.0) * (s1 * s2[j])
    if sym and j0 == i:
        one_minus_rho[0] = 0.0
        q12[0] = v1


@jit
def apply_row_op(code, p, q12, one_minus_rho, ntk, r11, r22, n11, n22, first_is_diagonal,
                 want_ntk):
    """Run an op that acts entry by entry on one row; False if ``code`` is not one.

    ``r11``, ``r22`` are the roots of the diagonals entering the op (row input,
    column inputs), ``n11``, ``n22`` those leaving it.
    """
    if code == OP_DENSE:
        dense_row(q12, one_minus_rho, ntk, r11, r22, n11, n22, p, want_ntk)
    elif code == OP_ABRELU:
        abrelu_row(q12, one_minus_rho, ntk, r11, r22, n11, n22, p, want_ntk)
    elif code == OP_STEP:
        step_row(q12, one_minus_rho, ntk, r11, r22, n11, n22, p, want_ntk)
    elif code == OP_SIGN:
        sign_row(q12, one_minus_rho, ntk, r11, r22, n11, n22, p, want_ntk)
    elif code == OP_RELU_POW:
        relu_pow_row(q12, one_minus_rho, ntk, r11, r22, n11, n22, p, want_ntk)
    elif code == OP_TRIG:
        trig_row(q12, one_minus_rho, ntk, r11, r22, n11, n22, p, want_ntk)
    elif code == OP_EXP:
        exp_row(q12, one_minus_rho, ntk, r11, r22, n11, n22, p, want_ntk)
    elif code == OP_ERF:
        erf_row(q12, one_minus_rho, ntk, r11, r22, n11, n22, p, want_ntk)
    elif code == OP_GELU:
        gelu_row(q12, one_minus_rho, ntk, r11, r22, n11, n22, p, want_ntk)
    elif code == OP_GAUSSIAN:
        gaussian_row(q12, one_minus_rho, ntk, r11, r22, n11, n22, p, want_ntk)
    elif code == OP_LAYERNORM:
        layernorm_row(q12, one_minus_rho, ntk, r11, r22, n11, n22, p, want_ntk)
    elif code == OP_DROPOUT:
        dropout_row(q12, one_minus_rho, ntk, p[0], first_is_diagonal, want_ntk)
    else:
        return False
    return True


@jit
def run_ops(l0, l1, q12, one_minus_rho, ntk, stash, rho, acc, i, j0, roots1, roots2, codes,
            prm, h1, h2, hd1, hd2, same, want_ntk, status):
    """Ops l0 … l1 − 1 on one row of entries (row input i, columns j0 … j0 + n).

    Returns the stash and the Hermite scratch rows, which grow on demand.
    ``same``: the row input is column j0 (the same example: dropout scales it).
    """
    n = q12.shape[0]
    for layer in range(l0, l1):
        code = codes[layer]
        p = prm[layer]
        r11 = roots1[layer, i]
        r22 = roots2[layer, j0:j0 + n]
        n11 = roots1[layer + 1, i]
        n22 = roots2[layer + 1, j0:j0 + n]
        if apply_row_op(code, p, q12, one_minus_rho, ntk, r11, r22, n11, n22, same,
                        want_ntk):
            continue
        if code == OP_HERMITE:
            if rho.shape[0] < n:
                rho = np.empty(n)
                acc = np.empty(n)
            h = int(p[0])
            # The whole column tables and an offset: a slice's last axis would not
            # be known contiguous, and the series loop would not vectorise.
            hermite_row(q12, one_minus_rho, ntk, r11, r22, n11, n22, h1[h, i], h2[h],
                        hd1[h, i], hd2[h], int(p[1]), rho[:n], acc[:n], want_ntk, j0)
        elif code == OP_SAVE or code == OP_LOAD or code == OP_ADD:
            stash = stash_op(code, q12, one_minus_rho, ntk, stash, layer, i, j0, roots1,
                             roots2, p, want_ntk)
        else:
            status[0] = code
    return stash, rho, acc


@jit_parallel
def gram_block(g, k_out, t_out, r0, c0, sym, mirror, scale, unit, near, x1n, x2n, roots1,
               roots2, var1, var2, codes, prm, h1, h2, hd1, hd2, status, want_nngp, want_ntk):
    """Fill rows r0 .. r0 + len(g) of the outputs, columns c0 .. c0 + g.shape[1].

    ``g[ii, jj]`` holds x_{r0+ii} · x'_{c0+jj} (unscaled) on entry (a scratch
    buffer, read only), or with ``unit`` x̂_{r0+ii} · x̂'_{c0+jj} of the unit vectors;
    1 − ρ is recomputed from the unit vectors ``x1n``, ``x2n`` where it is below
    ``near`` (:func:`init_row`). ``roots1[l], roots2[l]`` are the square roots of the
    diagonals entering op l (row l = 0 is the input layer), ``var1``, ``var2``
    the input layer's diagonals themselves. With ``sym`` only the entries with
    column >= row are computed; with ``mirror`` as well (a square output whose
    rows and columns are the same inputs), each is also written at its mirror
    place (column, row), right after its group of rows, while it is in cache.
    ``h1[m]`` (N, terms) and ``h2[m]`` (terms, M) hold the Hermite coefficients
    of the m-th numerical layer for rows and columns, ``hd1``, ``hd2`` those of
    its derivative. ``status[0]`` receives the code of an op this pass does not
    know (-1 if none), ``status[1:3]`` the row and column of an entry that is
    not finite. ``k_out`` (``t_out``) is only written with ``want_nngp``
    (``want_ntk``).

    Rows are taken in groups that fill a cache line of the output
    (:data:`CACHE_LINE`; :data:`ROW_GROUP_SERIES` with Hermite series), one
    group per task; with
    ``sym``, groups are taken from both ends in turn (row lengths fall from m
    to m - nb), which gives each thread's contiguous chunk of tasks equal work.
    Each row runs through the ops on its own, except at Hermite-series ops,
    which the rows of a group take together
    (:func:`~limitkernel.layers.numerical.hermite_rows`).
    """
    nb, m = g.shape
    n_ops = codes.shape[0]
    slots = 0
    size = CACHE_LINE // k_out.itemsize
    for layer in range(n_ops):
        if codes[layer] == OP_SAVE:
            slots = max(slots, 3 * int(prm[layer, 1]))
        elif codes[layer] == OP_HERMITE:
            size = ROW_GROUP_SERIES
    n_groups = (nb + size - 1) // size
    for step in prange(n_groups):
        k = np.int64(step)
        half = k // 2
        group = (half if k % 2 == 0 else n_groups - 1 - half) if sym else k
        a = group * size
        n_rows = min(a + size, nb) - a
        q12 = np.empty((n_rows, m))
        one_minus_rho = np.empty((n_rows, m))
        ntk = np.zeros((n_rows, m))
        stash = np.empty((n_rows, slots, m if slots > 0 else 0))
        lengths = np.empty(n_rows, dtype=np.int64)
        rows = np.empty(n_rows, dtype=np.int64)
        col0s = np.empty(n_rows, dtype=np.int64)
        for gg in range(n_rows):
            ii = a + gg
            i = r0 + ii
            start = min(max(i - c0, 0), m) if sym else 0
            n = m - start
            j0 = c0 + start
            lengths[gg], rows[gg], col0s[gg] = n, i, j0
            q = q12[gg, :n]
            for jj in range(n):
                q[jj] = g[ii, start + jj]
            init_row(q, one_minus_rho[gg, :n], scale, i, j0, x1n, x2n, roots1[0, i],
                     roots2[0, j0:j0 + n], var1[i], var2[j0:j0 + n], sym, unit, near)
        # The ops in stretches between Hermite-series ops: each row runs a
        # stretch on its own (its state stays in cache), the group runs the
        # series together.
        l0 = 0
        while l0 < n_ops:
            l1 = l0
            while l1 < n_ops and codes[l1] != OP_HERMITE:
                l1 += 1
            for gg in range(n_rows):
                n = lengths[gg]
                run_ops(l0, l1, q12[gg, :n], one_minus_rho[gg, :n], ntk[gg, :n], stash[gg],
                        np.empty(0), np.empty(0), rows[gg], col0s[gg], roots1, roots2,
                        codes, prm, h1, h2, hd1, hd2, sym and col0s[gg] == rows[gg],
                        want_ntk, status)
            if l1 < n_ops:
                p = prm[l1]
                hermite_rows(q12, one_minus_rho, ntk, lengths, rows, col0s, l1, roots1,
                             roots2, int(p[0]), h1, h2, hd1, hd2, int(p[1]), want_ntk)
            l0 = l1 + 1
        for gg in range(n_rows):
            i, j0 = rows[gg], col0s[gg]
            q = q12[gg, :lengths[gg]]
            t = ntk[gg, :lengths[gg]]
            # An integer reduction the compiler vectorises; the entry is then
            # looked for only in a row that has one.
            finite = True
            for jj in range(lengths[gg]):
                finite &= (abs(q[jj]) <= _LARGEST) & (abs(t[jj]) <= _LARGEST)
            if not finite:
                for jj in range(lengths[gg]):
                    if not (math.isfinite(q[jj]) and math.isfinite(t[jj])):
                        status[1] = i
                        status[2] = j0 + jj
            if want_nngp:
                out = k_out[i, j0:j0 + lengths[gg]]
                for jj in range(lengths[gg]):
                    out[jj] = q[jj]
            if want_ntk:
                out = t_out[i, j0:j0 + lengths[gg]]
                for jj in range(lengths[gg]):
                    out[jj] = t[jj]
        if mirror:
            _mirror_group(q12, ntk, rows, col0s, k_out, t_out, c0 + m, want_nngp, want_ntk)


@jit
def _mirror_group(q12, ntk, rows, col0s, k_out, t_out, stop, want_nngp, want_ntk):
    """Write the entries (i, j), j > i, of a group of rows at (j, i) as well.

    Row g of the state starts at column ``col0s[g]`` = ``rows[g]`` (the
    diagonal) and the group's rows are consecutive, so output row j receives
    one contiguous run of the group's columns.
    """
    n_rows = rows.shape[0]
    first = rows[0]
    for j in range(first + 1, stop):
        # Rows i < j of the group (all of them once j is past the group).
        count = min(j - first, n_rows)
        if want_nngp:
            out = k_out[j, first:first + count]
            for gg in range(count):
                out[gg] = q12[gg, j - col0s[gg]]
        if want_ntk:
            out = t_out[j, first:first + count]
            for gg in range(count):
                out[gg] = ntk[gg, j - col0s[gg]]


@jit_parallel
def self_rows(l0, l1, var, roots, k, c, t, stash, codes, prm, h1, h2, hd1, hd2, status):
    """Ops l0 … l1 − 1 of every input with itself; fills ``var``, ``roots`` (L + 1, N).

    ``k``, ``c``, ``t`` (N,) hold each input's state (K, 1 − ρ = 0, Θ) and
    ``stash`` (N, 3·slots, 1) its stash, carried from one call to the next (the
    caller stops at each Hermite op to compute its tables). Each op runs once
    to learn the variance it leaves (K never depends on it) and once for real,
    exactly as a pair of identical inputs will, so that their entries equal
    the diagonal. A Hermite-series op sums its squared coefficients instead
    (:func:`~limitkernel.layers.numerical.hermite_diagonal`); the Gram
    matrices take their diagonals, and the entries of identical inputs, from
    here (:meth:`limitkernel.gram.GramPlan.copy_twins`).
    """
    n_inputs = k.shape[0]
    for i in prange(n_inputs):
        q12 = k[i:i + 1]
        omr = c[i:i + 1]
        ntk = t[i:i + 1]
        own = stash[i]
        probe_k = np.empty(1)
        probe_c = np.empty(1)
        probe_t = np.empty(1)
        probe_stash = np.empty_like(own)
        rho = np.empty(1)
        acc = np.empty(1)
        for layer in range(l0, l1):
            if codes[layer] == OP_HERMITE:
                # At ρ = 1 a series is the sum of its squared coefficients, and
                # 1 − ρ stays 0: no probe is needed.
                h, terms = int(prm[layer, 0]), int(prm[layer, 1])
                q12[0] = hermite_diagonal(h1[h, i], terms)
                ntk[0] *= hermite_diagonal(hd1[h, i], terms)
                var[layer + 1, i] = q12[0]
                roots[layer + 1, i] = math.sqrt(q12[0])
                continue
            probe_k[0] = q12[0]
            probe_c[0] = omr[0]
            probe_t[0] = ntk[0]
            probe_stash[:] = own
            roots[layer + 1, i] = 1.0
            run_ops(layer, layer + 1, probe_k, probe_c, probe_t, probe_stash, rho, acc, i, i,
                    roots, roots, codes, prm, h1, h2, hd1, hd2, True, True, status)
            var[layer + 1, i] = probe_k[0]
            roots[layer + 1, i] = math.sqrt(probe_k[0])
            run_ops(layer, layer + 1, q12, omr, ntk, own, rho, acc, i, i, roots, roots, codes,
                    prm, h1, h2, hd1, hd2, True, True, status)
            omr[0] = 0.0

