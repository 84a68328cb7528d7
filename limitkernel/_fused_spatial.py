"""The fused passes of networks on images and sequences: two regimes, one op loop each.

Positions are flattened row-major (a sequence of length L is an image of height
1), and every table of diagonals is indexed by an offset per op: ``offsets[l]``
is where the positions of the state entering op l start in the (N, R) tables
``var`` (K(x, x) at each position) and ``root`` (their square roots), and
``positions[l]`` how many there are (1 once the network works on vectors).

* Same positions (no pooling): a row input i against columns j0 … j1 carries a
  (P, n) state — one row of entries per position — and every entry-wise op is
  the row kernel of its layer kind applied position by position
  (:func:`run_rows`).
* Pairs of positions (pooling): each pair of inputs carries its (P, P) state
  (:func:`run_pair`), one pair at a time so that it stays in cache; after
  ``global_avg_pool`` or ``flatten`` the pairs of a row are gathered into a
  (1, n) state that :func:`run_rows` finishes.

The diagonals of networks that pool come from the pairs of every input with
itself (:func:`self_pairs`), run through the same code, so that identical inputs
give exactly the diagonal.
"""

import math

import numpy as np
from numba import prange

from ._fused import NEAR_DUPLICATE, apply_row_op, unit_difference
from ._numba import jit, jit_parallel
from .layers.blocks import OP_ADD, OP_LOAD, OP_SAVE, add_row
from .layers.conv import (
    LANES,
    OP_AVG_POOL,
    OP_CONV,
    OP_FLATTEN,
    OP_GLOBAL_AVG_POOL,
    conv_corr_row,
    conv_rows,
    conv_x_row,
    conv_y_lanes,
    flatten_corr_lanes,
    flatten_lanes,
    flatten_rows,
    global_pool_corr_lanes,
    global_pool_lanes,
    inverse_roots,
    pool_corr_lanes,
    pool_lanes,
    tap_map,
)
from .layers.dense import OP_DENSE
from .layers.normalization import OP_DROPOUT, OP_LAYERNORM
from .layers.numerical import OP_HERMITE

__all__ = ["pairs_block", "rows_block", "self_pairs"]

# Constants handed to jitted callees are wrapped (np.int64(0), np.bool_(True)):
# numba compiles a callee once per literal argument value, and the op loops
# below are large.

# Columns of a row carried through the same-position regime at once (its state
# is (P, ROW_CHUNK) per quantity, so that it stays in cache).
ROW_CHUNK = 256


# ------------------------------------------------------------ inputs


@jit
def init_rows(k, c, x1, x1n, i, x2t, x2nt, j0, j1, root_row, root_colt):
    """Input layer, same positions: K⁰[p, j] = x_p · x'_p / C and an accurate 1 − ρ."""
    positions = x1.shape[1]
    channels = x1.shape[2]
    n = j1 - j0
    scale = 1.0 / channels
    for p in range(positions):
        kp = k[p]
        for j in range(n):
            kp[j] = 0.0
        for ch in range(channels):
            xv = x1[i, p, ch]
            col = x2t[p, ch]
            for j in range(n):
                kp[j] += xv * col[j0 + j]
        a = root_row[p]
        bcol = root_colt[p]
        cp = c[p]
        for j in range(n):
            kp[j] *= scale
            nrm = a * bcol[j0 + j]
            cp[j] = 1.0 - kp[j] / nrm if nrm > 0.0 else 1.0
        for j in range(n):
            if cp[j] < NEAR_DUPLICATE:
                # 1 − ρ = |x̂ − x̂'|²/2 for unit vectors: no cancellation.
                acc = 0.0
                for ch in range(channels):
                    d = unit_difference(x1n[i, p, ch], x2nt[p, ch, :, j0 + j])
                    acc += d * d
                cp[j] = 0.5 * acc


# ------------------------------------------------------------ same positions


@jit
def _keeps_theta_zero(code):
    """Ops that leave Θ = 0 as it is (they scale it), so that it need not be stored."""
    return (OP_DENSE < code <= OP_HERMITE or code == OP_DROPOUT or code == OP_LAYERNORM
            or code == OP_AVG_POOL)


@jit
def run_rows(l0, l1, state, spare, stash, i, j0, j1, same, codes, prm, geo, imap, offsets,
             positions, root1, root2t, want_ntk, inv_b, status):
    """Ops l0 … l1 − 1 on the (P, n) state of row input i against columns j0 … j1.

    ``state`` and ``spare`` are (3, Pmax, n) buffers (K, 1 − ρ, Θ); returns them
    as (the one holding the result, the other). ``same``: the row input is
    column j0 (dropout scales its same-position entries). From the input layer
    (l0 = 0) Θ is 0 and its buffer is not read until the first op that needs it
    (see :func:`_keeps_theta_zero`).
    """
    n = j1 - j0
    theta_zero = l0 == 0
    for layer in range(l0, l1):
        code = codes[layer]
        p = prm[layer]
        size = positions[layer]
        off = offsets[layer]
        offn = offsets[layer + 1]
        k = state[0]
        c = state[1]
        t = state[2]
        if code == OP_CONV:
            g = int(p[4])
            size_out = positions[layer + 1]
            conv_rows(k[:size], c[:size], t[:size], spare[0, :size_out], spare[1, :size_out],
                      spare[2, :size_out], root1[i, off:off + size],
                      root2t[off:off + size, j0:j1], root1[i, offn:offn + size_out],
                      root2t[offn:offn + size_out, j0:j1], geo[g], imap, p, want_ntk,
                      theta_zero, inv_b[:n])
            state, spare = spare, state
            theta_zero = False
            continue
        if code == OP_FLATTEN:
            flatten_rows(k[:size], c[:size], t[:size], spare[0, 0], spare[1, 0], spare[2, 0],
                         root1[i, off:off + size], root2t[off:off + size, j0:j1],
                         root1[i, offn], root2t[offn, j0:j1], want_ntk and not theta_zero)
            if want_ntk and theta_zero:
                spare[2, 0, :n] = 0.0
            state, spare = spare, state
            theta_zero = False
            continue
        if theta_zero and not _keeps_theta_zero(code):
            # the first op that reads Θ: it is 0
            state[2, :size, :n] = 0.0
            theta_zero = False
        if code == OP_SAVE or code == OP_LOAD or code == OP_ADD:
            slot = int(p[0])
            if code == OP_SAVE:
                for m in range(3):
                    for r in range(size):
                        for jj in range(n):
                            stash[3 * slot + m, r, jj] = state[m, r, jj]
            elif code == OP_LOAD:
                for m in range(3):
                    for r in range(size):
                        for jj in range(n):
                            state[m, r, jj] = stash[3 * slot + m, r, jj]
            else:
                offs = offsets[int(p[3])]
                for r in range(size):
                    add_row(k[r, :n], c[r, :n], t[r, :n], stash[3 * slot, r, :n],
                            stash[3 * slot + 1, r, :n], stash[3 * slot + 2, r, :n],
                            root1[i, off + r], root2t[off + r, j0:j1],
                            root1[i, offs + r], root2t[offs + r, j0:j1],
                            root1[i, offn + r], root2t[offn + r, j0:j1], p[1], p[2],
                            want_ntk)
            continue
        handled = True
        for r in range(size):
            handled = apply_row_op(code, p, k[r, :n], c[r, :n], t[r, :n], root1[i, off + r],
                                   root2t[off + r, j0:j1], root1[i, offn + r],
                                   root2t[offn + r, j0:j1], same, want_ntk and not theta_zero)
            if not handled:
                break
        if not handled:
            status[0] = code
    return state, spare


@jit_parallel
def rows_block(r0, r1, c0, c1, sym, x1, x1n, x2t, x2nt, root1, root2t, codes, prm, geo,
               imap, offsets, positions, n_slots, k_out, t_out, status, want_ntk):
    """Rows r0 … r1 − 1 against columns c0 … c1 − 1, same-position regime.

    With ``sym`` only the entries with column >= row are computed. The outputs
    are indexed like the rows and columns (global indices).
    """
    nb = r1 - r0
    width = c1 - c0
    pmax = 0
    for layer in range(positions.shape[0]):
        pmax = max(pmax, positions[layer])
    n_ops = codes.shape[0]
    for step in prange(nb):
        kk = np.int64(step)
        half = kk // 2
        paired = half if kk % 2 == 0 else nb - 1 - half
        i = r0 + (paired if sym else kk)
        start = min(max(i - c0, 0), width) if sym else 0
        j0 = c0 + start
        n = c1 - j0
        if n <= 0:
            continue
        inv_b = np.empty(min(n, ROW_CHUNK))
        for ja in range(j0, c1, ROW_CHUNK):
            jb = min(ja + ROW_CHUNK, c1)
            m = jb - ja
            st = np.empty((3, pmax, m))
            sp = np.empty((3, pmax, m))
            stash = np.empty((3 * max(n_slots, 1), pmax, m))
            init_rows(st[0], st[1], x1, x1n, i, x2t, x2nt, ja, jb, root1[i], root2t)
            st, sp = run_rows(np.int64(0), n_ops, st, sp, stash, i, ja, jb, sym and ja == i,
                              codes, prm, geo, imap, offsets, positions, root1, root2t,
                              want_ntk, inv_b, status)
            for jj in range(m):
                k_out[i, ja + jj] = st[0, 0, jj]
            if want_ntk:
                for jj in range(m):
                    t_out[i, ja + jj] = st[2, 0, jj]


# ------------------------------------------------------------ pairs of positions


@jit
def init_lanes(k, c, x1, x1n, i, xl, xln, a, b):
    """Input layer for a row input and the LANES columns gathered in ``xl`` (C, P·LANES).

    K⁰ = x_p · x'_q / C; 1 − ρ = |x̂_p − x̂'_q|²/2 for the unit vectors (no
    cancellation), 1 where an input vector is 0. Θ⁰ = 0 is implied
    (:func:`run_lanes` starts with Θ marked as 0).
    """
    positions = x1.shape[1]
    channels = x1.shape[2]
    n = positions * LANES
    scale = 1.0 / channels
    for p in range(positions):
        kp = k[p]
        cp = c[p]
        for m in range(n):
            kp[m] = 0.0
            cp[m] = 0.0
        for ch in range(channels):
            xv = x1[i, p, ch]
            high, low = x1n[i, p, ch, 0], x1n[i, p, ch, 1]
            col = xl[ch]
            col_high, col_low = xln[ch, 0], xln[ch, 1]
            for m in range(n):
                kp[m] += xv * col[m]
                # x̂ − x̂' from the two parts of each unit vector.
                d = (high - col_high[m]) + (low - col_low[m])
                cp[m] += d * d
        ap = a[p]
        for m in range(n):
            kp[m] *= scale
            cp[m] = min(0.5 * cp[m], 2.0) if ap * b[m] > 0.0 else 1.0


@jit
def _lanes(buf, m, rows):
    """State array m of a (3, ·) buffer as (rows, rows·LANES)."""
    return buf[m, :rows * rows * LANES].reshape((rows, rows * LANES))


@jit
def _set_tables(var_a, root_a, var_b, root_b, pos, v):
    """Record the variance v of position ``pos`` of an input paired with itself."""
    var_a[pos] = v
    root_a[pos] = math.sqrt(v)
    for lane in range(LANES):
        var_b[pos * LANES + lane] = v
        root_b[pos * LANES + lane] = root_a[pos]


@jit
def run_lanes(l0, l1, state, spare, stash, same, codes, prm, geo, imap, offsets, positions,
              root_a, var_a, root_b, var_b, want_ntk, theta_zero, u_k, u_t, inv_b, taps_of,
              status, self_pair):
    """Ops l0 … l1 − 1 on the lanes' (P, P·LANES) states, up to the collapse.

    ``state``, ``spare``: (3, Pmax²·LANES) buffers (K, 1 − ρ, Θ). ``root_a``,
    ``var_a`` (R,): the row input's tables; ``root_b``, ``var_b`` (R·LANES,):
    the columns', lane innermost. ``same[l]``: lane l pairs the row input with
    itself (dropout scales its same-position entries). With ``self_pair`` (every
    lane is the row input with itself) the variances leaving a convolution,
    pooling or collapse are read from K and recorded in the tables before 1 − ρ
    is computed. Returns (the buffer holding the result, the other, whether Θ
    is still 0); after global_avg_pool or flatten the lanes' (K, 1 − ρ, Θ) are
    in ``state[:, :LANES]``.
    """
    layer = l0
    while layer < l1:
        code = codes[layer]
        p = prm[layer]
        size = positions[layer]
        off = offsets[layer]
        offn = offsets[layer + 1]
        size_out = positions[layer + 1]
        k = _lanes(state, 0, size)
        c = _lanes(state, 1, size)
        t = _lanes(state, 2, size)
        a_in = root_a[off:off + size]
        b_in = root_b[off * LANES:(off + size) * LANES]
        a_out = root_a[offn:offn + size_out]
        b_out = root_b[offn * LANES:(offn + size_out) * LANES]
        layer += 1
        if code == OP_CONV:
            geo_g = geo[int(p[4])]
            k_out = _lanes(spare, 0, size_out)
            c_out = _lanes(spare, 1, size_out)
            t_out = _lanes(spare, 2, size_out)
            taps = geo_g[4] * geo_g[5]
            conv_y_lanes(k, t, u_k, u_t, geo_g, imap, want_ntk and not theta_zero)
            tap_map(geo_g, imap, taps_of)
            inv = inv_b[:size_out * LANES]
            if self_pair:
                for o in range(size_out):
                    conv_x_row(u_k, u_t, k_out[o], t_out[o], o, geo_g, imap, p, want_ntk,
                               theta_zero)
                for r in range(size_out):
                    _set_tables(var_a, root_a, var_b, root_b, offn + r, k_out[r, r * LANES])
                inverse_roots(b_out, inv)
                for o in range(size_out):
                    conv_corr_row(k_out[o], c_out[o], c, a_in, b_in, a_out[o], inv, o, taps_of,
                                  taps, p)
            else:
                # Output position by output position, while it is in cache: the x
                # taps, 1 − ρ, and the activation that follows, if any.
                fused = layer < l1 and OP_DENSE < codes[layer] < OP_HERMITE
                act = codes[layer] if fused else -1
                off_act = offsets[layer + 1] if fused else offn
                b_act = root_b[off_act * LANES:(off_act + size_out) * LANES]
                inverse_roots(b_out, inv)
                for o in range(size_out):
                    conv_x_row(u_k, u_t, k_out[o], t_out[o], o, geo_g, imap, p, want_ntk,
                               theta_zero)
                    conv_corr_row(k_out[o], c_out[o], c, a_in, b_in, a_out[o], inv, o, taps_of,
                                  taps, p)
                    if fused:
                        apply_row_op(act, prm[layer], k_out[o], c_out[o], t_out[o], a_out[o],
                                     b_out, root_a[off_act + o], b_act, np.bool_(False),
                                     want_ntk)
                if fused:
                    layer += 1
            state, spare = spare, state
            theta_zero = False
            continue
        if code == OP_AVG_POOL:
            g = int(p[0])
            k_out = _lanes(spare, 0, size_out)
            c_out = _lanes(spare, 1, size_out)
            t_out = _lanes(spare, 2, size_out)
            pool_lanes(k, t, k_out, t_out, geo[g], imap, want_ntk, theta_zero, u_k, u_t)
            if self_pair:
                for r in range(size_out):
                    _set_tables(var_a, root_a, var_b, root_b, offn + r, k_out[r, r * LANES])
            pool_corr_lanes(k_out, c_out, var_a[offn:offn + size_out],
                            var_b[offn * LANES:(offn + size_out) * LANES])
            state, spare = spare, state
            continue
        if code == OP_GLOBAL_AVG_POOL or code == OP_FLATTEN:
            out = spare[:, :LANES]
            if code == OP_GLOBAL_AVG_POOL:
                global_pool_lanes(k, t, size, want_ntk and not theta_zero, out)
            else:
                flatten_lanes(k, t, size, want_ntk and not theta_zero, out)
            if self_pair:
                _set_tables(var_a, root_a, var_b, root_b, offn, out[0, 0])
            if code == OP_GLOBAL_AVG_POOL:
                global_pool_corr_lanes(out, var_a[offn], var_b[offn * LANES:(offn + 1) * LANES])
            else:
                flatten_corr_lanes(c, a_in, b_in, root_a[offn],
                                   root_b[offn * LANES:(offn + 1) * LANES], size, out)
            state, spare = spare, state
            theta_zero = False
            continue
        if theta_zero and not _keeps_theta_zero(code):
            # the first op that reads Θ: it is 0
            state[2, :size * size * LANES] = 0.0
            theta_zero = False
        if code == OP_SAVE or code == OP_LOAD or code == OP_ADD:
            slot = int(p[0])
            count = size * size * LANES
            if code == OP_SAVE:
                for m in range(3):
                    stash[3 * slot + m, :count] = state[m, :count]
            elif code == OP_LOAD:
                for m in range(3):
                    state[m, :count] = stash[3 * slot + m, :count]
            else:
                offs = offsets[int(p[3])]
                sk = _lanes(stash, 3 * slot, size)
                sc = _lanes(stash, 3 * slot + 1, size)
                st = _lanes(stash, 3 * slot + 2, size)
                for r in range(size):
                    add_row(k[r], c[r], t[r], sk[r], sc[r], st[r], a_in[r], b_in,
                            root_a[offs + r], root_b[offs * LANES:(offs + size) * LANES],
                            a_out[r], b_out, p[1], p[2], want_ntk)
            continue
        handled = True
        for r in range(size):
            handled = apply_row_op(code, p, k[r], c[r], t[r], a_in[r], b_in, a_out[r], b_out,
                                   np.bool_(False), want_ntk and not theta_zero)
            if not handled:
                break
        if not handled:
            status[0] = code
        elif code == OP_DROPOUT:
            # Entries between different positions, or different examples, keep K
            # and Θ; the same unit of the same example has its variance scaled.
            for lane in range(LANES):
                if same[lane]:
                    for r in range(size):
                        m = r * LANES + lane
                        k[r, m] *= p[0]
                        c[r, m] = 0.0
                        if want_ntk and not theta_zero:
                            t[r, m] *= p[0]
    return state, spare, theta_zero


@jit
def _lane_buffers(positions, work_size, n_slots, table_width, channels):
    pmax = 0
    for layer in range(positions.shape[0]):
        pmax = max(pmax, positions[layer])
    size = pmax * pmax * LANES
    state = np.empty((3, size))
    spare = np.empty((3, size))
    stash = np.empty((3 * max(n_slots, 1), size))
    u_k = np.empty((work_size, work_size * LANES))
    u_t = np.empty((work_size, work_size * LANES))
    inv_b = np.empty(pmax * LANES)
    taps_of = np.empty((pmax, work_size), dtype=np.int64)
    root_b = np.empty(table_width * LANES)
    var_b = np.empty(table_width * LANES)
    xl = np.empty((channels, positions[0] * LANES))
    xln = np.empty((channels, 2, positions[0] * LANES))
    return state, spare, stash, u_k, u_t, inv_b, taps_of, root_b, var_b, xl, xln


@jit
def _gather_lanes(x, xn, root, var, cols, xl, xln, root_b, var_b):
    """The inputs and tables of the columns ``cols`` (LANES,), lane innermost."""
    for lane in range(LANES):
        j = cols[lane]
        for q in range(x.shape[1]):
            for ch in range(x.shape[2]):
                xl[ch, q * LANES + lane] = x[j, q, ch]
                xln[ch, 0, q * LANES + lane] = xn[j, q, ch, 0]
                xln[ch, 1, q * LANES + lane] = xn[j, q, ch, 1]
        for pos in range(root.shape[1]):
            root_b[pos * LANES + lane] = root[j, pos]
            var_b[pos * LANES + lane] = var[j, pos]


@jit_parallel
def pairs_block(r0, r1, c0, c1, sym, collapse, x1, x1n, x2, x2n, root1, root2, var1, var2,
                root2t, codes, prm, geo, imap, offsets, positions, n_slots, work_size,
                k_out, t_out, status, want_ntk):
    """Rows r0 … r1 − 1 against columns c0 … c1 − 1, pairs-of-positions regime.

    Each row input runs the ops up to and including ``collapse`` against LANES
    columns at a time (the last group filled up with copies of its last column);
    the row's pairs then finish the program together as a (1, n) state.
    """
    nb = r1 - r0
    width = c1 - c0
    n_ops = codes.shape[0]
    for step in prange(nb):
        kk = np.int64(step)
        half = kk // 2
        paired = half if kk % 2 == 0 else nb - 1 - half
        i = r0 + (paired if sym else kk)
        start = min(max(i - c0, 0), width) if sym else 0
        j0 = c0 + start
        n = c1 - j0
        if n <= 0:
            continue
        state, spare, stash, u_k, u_t, inv_b, taps_of, root_b, var_b, xl, xln = _lane_buffers(
            positions, work_size, n_slots, root1.shape[1], x1.shape[2])
        cols = np.empty(LANES, dtype=np.int64)
        same = np.empty(LANES, dtype=np.bool_)
        row = np.empty((3, 1, n))
        row_spare = np.empty((3, 1, n))
        row_stash = np.empty((3 * max(n_slots, 1), 1, n))
        inv_row = np.empty(n)
        for jc in range(j0, c1, LANES):
            for lane in range(LANES):
                cols[lane] = min(jc + lane, c1 - 1)
                same[lane] = sym and cols[lane] == i
            _gather_lanes(x2, x2n, root2, var2, cols, xl, xln, root_b, var_b)
            init_lanes(_lanes(state, 0, positions[0]), _lanes(state, 1, positions[0]), x1, x1n,
                       i, xl, xln, root1[i], root_b)
            out, _, _ = run_lanes(np.int64(0), collapse + 1, state, spare, stash, same, codes,
                                  prm, geo, imap, offsets, positions, root1[i], var1[i],
                                  root_b, var_b, want_ntk, np.bool_(True), u_k, u_t, inv_b,
                                  taps_of, status, np.bool_(False))
            for lane in range(min(LANES, c1 - jc)):
                for m in range(3):
                    row[m, 0, jc - j0 + lane] = out[m, lane]
        row, _ = run_rows(collapse + 1, n_ops, row, row_spare, row_stash, i, j0, c1,
                          sym and j0 == i, codes, prm, geo, imap, offsets, positions, root1,
                          root2t, want_ntk, inv_row, status)
        for jj in range(n):
            k_out[i, j0 + jj] = row[0, 0, jj]
        if want_ntk:
            for jj in range(n):
                t_out[i, j0 + jj] = row[2, 0, jj]


@jit_parallel
def self_pairs(x, xn, root, var, codes, prm, geo, imap, offsets, positions, n_slots,
               work_size, collapse, status):
    """The state of every input with itself: fills ``var`` and ``root`` (N, R).

    Op by op, each input's pair learns the variances the op leaves before it
    computes 1 − ρ: convolutions, pooling and the collapse read them from K
    between the two; any other op runs once on a copy with unit variances (K
    never depends on them) and then for real, exactly as the pair of two
    identical inputs will. Every lane holds the same pair, so that the
    arithmetic is that of the Gram pass. Returns the final K and Θ.
    """
    n_inputs = x.shape[0]
    n_ops = codes.shape[0]
    nngp = np.empty(n_inputs)
    ntk = np.empty(n_inputs)
    width = root.shape[1]
    for i in prange(n_inputs):
        state, spare, stash, u_k, u_t, inv_b, taps_of, root_b, var_b, xl, xln = _lane_buffers(
            positions, work_size, n_slots, width, x.shape[2])
        probe = np.empty_like(state)
        probe_spare = np.empty_like(state)
        probe_stash = np.empty_like(stash)
        same = np.ones(LANES, dtype=np.bool_)
        cols = np.full(LANES, i, dtype=np.int64)
        p0 = positions[0]
        for p in range(p0):
            acc = 0.0
            for ch in range(x.shape[2]):
                acc += x[i, p, ch] * x[i, p, ch]
            var[i, p] = acc / x.shape[2]
            root[i, p] = math.sqrt(var[i, p])
        _gather_lanes(x, xn, root, var, cols, xl, xln, root_b, var_b)
        init_lanes(_lanes(state, 0, p0), _lanes(state, 1, p0), x, xn, i, xl, xln, root[i],
                   root_b)
        theta_zero = np.bool_(True)
        for layer in range(n_ops):
            code = codes[layer]
            offn = offsets[layer + 1]
            size_out = positions[layer + 1]
            if layer > collapse:
                state = run_pair_tail(layer, state, spare, stash, i, codes, prm, geo, imap,
                                      offsets, positions, root, var, status)
                continue
            if not (code == OP_CONV or code == OP_AVG_POOL or code == OP_GLOBAL_AVG_POOL
                    or code == OP_FLATTEN):
                probe[:, :] = state[:, :]
                probe_stash[:, :] = stash[:, :]
                for r in range(size_out):
                    _set_tables(var[i], root[i], var_b, root_b, offn + r, 1.0)
                out, _, _ = run_lanes(layer, layer + 1, probe, probe_spare, probe_stash, same,
                                      codes, prm, geo, imap, offsets, positions, root[i],
                                      var[i], root_b, var_b, np.bool_(True), theta_zero, u_k,
                                      u_t, inv_b, taps_of, status, np.bool_(False))
                for r in range(size_out):
                    _set_tables(var[i], root[i], var_b, root_b, offn + r,
                                out[0, (r * size_out + r) * LANES])
            state, spare, theta_zero = run_lanes(
                layer, layer + 1, state, spare, stash, same, codes, prm, geo, imap, offsets,
                positions, root[i], var[i], root_b, var_b, np.bool_(True), theta_zero, u_k, u_t,
                inv_b, taps_of, status, np.bool_(True))
            if layer == collapse:
                # vectors from here: the lanes' entry is the state
                state[1, 0] = 0.0
        nngp[i] = state[0, 0]
        ntk[i] = state[2, 0]
    return nngp, ntk


@jit
def run_pair_tail(layer, state, spare, stash, i, codes, prm, geo, imap, offsets, positions,
                  root, var, status):
    """One vector op of an input with itself, on lane 0 of ``state`` as a (1, 1) row.

    Records the variance it leaves in ``var`` and ``root``.
    """
    inv_b = np.empty(1)
    rows = np.empty((3, 1, 1))
    rows_spare = np.empty((3, 1, 1))
    rows_stash = np.empty((stash.shape[0], 1, 1))
    for m in range(3):
        rows[m, 0, 0] = state[m, 0]
    for m in range(stash.shape[0]):
        rows_stash[m, 0, 0] = stash[m, 0]
    offn = offsets[layer + 1]
    probe = rows.copy()
    probe_stash = rows_stash.copy()
    root[i, offn] = 1.0
    root_t = root.T[:, i:i + 1].copy()
    zero, one, true = np.int64(0), np.int64(1), np.bool_(True)
    out, _ = run_rows(layer, layer + 1, probe, rows_spare, probe_stash, i, zero, one, true,
                      codes, prm, geo, imap, offsets, positions, root, root_t, true, inv_b,
                      status)
    var[i, offn] = out[0, 0, 0]
    root[i, offn] = math.sqrt(out[0, 0, 0])
    root_t = root.T[:, i:i + 1].copy()
    out, _ = run_rows(layer, layer + 1, rows, rows_spare, rows_stash, i, zero, one, true,
                      codes, prm, geo, imap, offsets, positions, root, root_t, true, inv_b,
                      status)
    out[1, 0, 0] = 0.0
    for m in range(3):
        state[m, 0] = out[m, 0, 0]
    for m in range(stash.shape[0]):
        stash[m, 0] = rows_stash[m, 0, 0]
    return state


@jit_parallel
def self_rows(x, xn, xt, xnt, var, root, root_t, codes, prm, geo, imap, offsets, positions,
              n_slots, status):
    """The same-position state of every input with itself: fills ``var``, ``root``
    (N, R) and ``root_t`` (R, N) for every op after the input layer (whose
    entries the caller has set), through the same code as :func:`rows_block`, so
    that identical inputs give exactly the diagonal. Returns the final K and Θ.
    """
    n_inputs = x.shape[0]
    n_ops = codes.shape[0]
    pmax = 0
    for layer in range(positions.shape[0]):
        pmax = max(pmax, positions[layer])
    nngp = np.empty(n_inputs)
    ntk = np.empty(n_inputs)
    for i in prange(n_inputs):
        state = np.empty((3, pmax, 1))
        spare = np.empty((3, pmax, 1))
        stash = np.zeros((3 * max(n_slots, 1), pmax, 1))
        probe = np.empty((3, pmax, 1))
        probe_spare = np.empty((3, pmax, 1))
        inv_b = np.empty(1)
        init_rows(state[0], state[1], x, xn, i, xt, xnt, i, i + 1, root[i], root_t)
        state[2, :, :] = 0.0
        for layer in range(n_ops):
            offn = offsets[layer + 1]
            size_out = positions[layer + 1]
            probe[:, :, :] = state[:, :, :]
            probe_stash = stash.copy()
            for r in range(size_out):
                root[i, offn + r] = 1.0
                root_t[offn + r, i] = 1.0
            out, _ = run_rows(layer, layer + 1, probe, probe_spare, probe_stash, i, i, i + 1,
                              np.bool_(True), codes, prm, geo, imap, offsets, positions, root,
                              root_t, np.bool_(True), inv_b, status)
            for r in range(size_out):
                v = out[0, r, 0]
                var[i, offn + r] = v
                root[i, offn + r] = math.sqrt(v)
                root_t[offn + r, i] = math.sqrt(v)
            state, spare = run_rows(layer, layer + 1, state, spare, stash, i, i, i + 1,
                                    np.bool_(True), codes, prm, geo, imap, offsets, positions,
                                    root, root_t, np.bool_(True), inv_b, status)
        nngp[i] = state[0, 0, 0]
        ntk[i] = state[2, 0, 0]
    return nngp, ntk
