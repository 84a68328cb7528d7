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

from ._fused import NEAR_DUPLICATE, apply_row_op
from ._numba import jit, jit_parallel
from .layers.blocks import OP_ADD, OP_LOAD, OP_SAVE, add_row
from .layers.conv import (
    OP_AVG_POOL,
    OP_CONV,
    OP_FLATTEN,
    OP_GLOBAL_AVG_POOL,
    conv_pairs,
    conv_rows,
    flatten_entry,
    flatten_rows,
    global_pool_pairs,
    pool_pairs,
)
from .layers.normalization import OP_DROPOUT

__all__ = ["pairs_block", "rows_block", "self_pairs"]


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
                    d = x1n[i, p, ch] - x2nt[p, ch, j0 + j]
                    acc += d * d
                cp[j] = 0.5 * acc


@jit
def init_pair(k, c, x1, x1n, i, x2, x2n, j, root_a, root_b):
    """Input layer, pairs of positions: K⁰[p, q] = x_p · x'_q / C, accurate 1 − ρ."""
    positions = x1.shape[1]
    channels = x1.shape[2]
    scale = 1.0 / channels
    for p in range(positions):
        for q in range(positions):
            acc = 0.0
            for ch in range(channels):
                acc += x1[i, p, ch] * x2[j, q, ch]
            k[p, q] = acc * scale
        a = root_a[p]
        for q in range(positions):
            nrm = a * root_b[q]
            cv = 1.0 - k[p, q] / nrm if nrm > 0.0 else 1.0
            if cv < NEAR_DUPLICATE:
                acc = 0.0
                for ch in range(channels):
                    d = x1n[i, p, ch] - x2n[j, q, ch]
                    acc += d * d
                cv = 0.5 * acc
            c[p, q] = cv


# ------------------------------------------------------------ same positions


@jit
def run_rows(l0, l1, state, spare, stash, i, j0, j1, same, codes, prm, geo, imap, offsets,
             positions, root1, root2t, want_ntk, inv_b, status):
    """Ops l0 … l1 − 1 on the (P, n) state of row input i against columns j0 … j1.

    ``state`` and ``spare`` are (3, Pmax, n) buffers (K, 1 − ρ, Θ); returns them
    as (the one holding the result, the other). ``same``: the row input is
    column j0 (dropout scales its same-position entries).
    """
    n = j1 - j0
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
                      inv_b[:n])
            state, spare = spare, state
            continue
        if code == OP_FLATTEN:
            flatten_rows(k[:size], c[:size], t[:size], spare[0, 0], spare[1, 0], spare[2, 0],
                         root1[i, off:off + size], root2t[off:off + size, j0:j1],
                         root1[i, offn], root2t[offn, j0:j1], want_ntk)
            state, spare = spare, state
            continue
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
                                   root2t[offn + r, j0:j1], same, want_ntk)
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
        state = np.empty((3, pmax, n))
        spare = np.empty((3, pmax, n))
        stash = np.empty((3 * max(n_slots, 1), pmax, n))
        inv_b = np.empty(n)
        init_rows(state[0], state[1], x1, x1n, i, x2t, x2nt, j0, c1, root1[i], root2t)
        state[2, :, :] = 0.0
        state, spare = run_rows(0, n_ops, state, spare, stash, i, j0, c1, sym and j0 == i,
                                codes, prm, geo, imap, offsets, positions, root1, root2t,
                                want_ntk, inv_b, status)
        for jj in range(n):
            k_out[i, j0 + jj] = state[0, 0, jj]
        if want_ntk:
            for jj in range(n):
                t_out[i, j0 + jj] = state[2, 0, jj]


# ------------------------------------------------------------ pairs of positions


@jit
def run_pair(l0, l1, state, spare, stash, work, i, j, same, codes, prm, geo, imap, offsets,
             positions, root1, root2, var1, var2, want_ntk, status):
    """Ops l0 … l1 − 1 on the (P, P) state of the pair (i, j), up to the collapse.

    ``state``, ``spare``: (3, Pmax, Pmax) buffers; ``work``: (6, U, U) scratch
    (U the largest intermediate of a convolution). Returns the buffers as (the
    one holding the result, the other); after global_avg_pool or flatten the
    pair's (K, 1 − ρ, Θ) is in entry [:, 0, 0].
    """
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
            conv_pairs(k[:size, :size], c[:size, :size], t[:size, :size],
                       spare[0, :size_out, :size_out], spare[1, :size_out, :size_out],
                       spare[2, :size_out, :size_out], root1[i, off:off + size],
                       root2[j, off:off + size], root1[i, offn:offn + size_out],
                       root2[j, offn:offn + size_out], geo[g], imap, p, want_ntk,
                       work[0], work[1], work[2], work[3], work[4], work[5])
            state, spare = spare, state
            continue
        if code == OP_AVG_POOL:
            g = int(p[0])
            size_out = positions[layer + 1]
            pool_pairs(k[:size, :size], t[:size, :size], spare[0, :size_out, :size_out],
                       spare[1, :size_out, :size_out], spare[2, :size_out, :size_out],
                       var1[i, offn:offn + size_out], var2[j, offn:offn + size_out],
                       geo[g], imap, want_ntk, work[0], work[2])
            state, spare = spare, state
            continue
        if code == OP_GLOBAL_AVG_POOL:
            kk, cc, tt = global_pool_pairs(k, t, size, var1[i, offn], var2[j, offn], want_ntk)
            state[0, 0, 0] = kk
            state[1, 0, 0] = cc
            state[2, 0, 0] = tt
            continue
        if code == OP_FLATTEN:
            kk, cc, tt = flatten_entry(k, c, t, root1[i, off:off + size],
                                       root2[j, off:off + size], root1[i, offn],
                                       root2[j, offn], size, want_ntk)
            state[0, 0, 0] = kk
            state[1, 0, 0] = cc
            state[2, 0, 0] = tt
            continue
        if code == OP_SAVE or code == OP_LOAD or code == OP_ADD:
            slot = int(p[0])
            if code == OP_SAVE:
                for m in range(3):
                    for r in range(size):
                        for s in range(size):
                            stash[3 * slot + m, r, s] = state[m, r, s]
            elif code == OP_LOAD:
                for m in range(3):
                    for r in range(size):
                        for s in range(size):
                            state[m, r, s] = stash[3 * slot + m, r, s]
            else:
                offs = offsets[int(p[3])]
                for r in range(size):
                    add_row(k[r, :size], c[r, :size], t[r, :size], stash[3 * slot, r, :size],
                            stash[3 * slot + 1, r, :size], stash[3 * slot + 2, r, :size],
                            root1[i, off + r], root2[j, off:off + size],
                            root1[i, offs + r], root2[j, offs:offs + size],
                            root1[i, offn + r], root2[j, offn:offn + size], p[1], p[2],
                            want_ntk)
            continue
        if code == OP_DROPOUT:
            # Entries between different positions, or different examples, keep K
            # and Θ; the same unit of the same example has its variance scaled.
            for r in range(size):
                apply_row_op(code, p, k[r, :size], c[r, :size], t[r, :size],
                             root1[i, off + r], root2[j, off:off + size],
                             root1[i, offn + r], root2[j, offn:offn + size], False, want_ntk)
            if same:
                for r in range(size):
                    k[r, r] *= p[0]
                    c[r, r] = 0.0
                    if want_ntk:
                        t[r, r] *= p[0]
            continue
        handled = True
        for r in range(size):
            handled = apply_row_op(code, p, k[r, :size], c[r, :size], t[r, :size],
                                   root1[i, off + r], root2[j, off:off + size],
                                   root1[i, offn + r], root2[j, offn:offn + size], False,
                                   want_ntk)
            if not handled:
                break
        if not handled:
            status[0] = code
    return state, spare


@jit
def _pair_buffers(positions, work_size, n_slots):
    pmax = 0
    for layer in range(positions.shape[0]):
        pmax = max(pmax, positions[layer])
    state = np.empty((3, pmax, pmax))
    spare = np.empty((3, pmax, pmax))
    stash = np.empty((3 * max(n_slots, 1), pmax, pmax))
    work = np.empty((6, work_size, work_size))
    return state, spare, stash, work


@jit_parallel
def pairs_block(r0, r1, c0, c1, sym, collapse, x1, x1n, x2, x2n, root1, root2, var1, var2,
                root2t, codes, prm, geo, imap, offsets, positions, n_slots, work_size,
                k_out, t_out, status, want_ntk):
    """Rows r0 … r1 − 1 against columns c0 … c1 − 1, pairs-of-positions regime.

    Every pair runs the ops up to and including ``collapse`` on its (P, P)
    state; the row's pairs then finish the program together as a (1, n) state.
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
        state, spare, stash, work = _pair_buffers(positions, work_size, n_slots)
        row = np.empty((3, 1, n))
        row_spare = np.empty((3, 1, n))
        row_stash = np.empty((3 * max(n_slots, 1), 1, n))
        inv_b = np.empty(n)
        for jj in range(n):
            j = j0 + jj
            init_pair(state[0], state[1], x1, x1n, i, x2, x2n, j, root1[i], root2[j])
            state[2, :, :] = 0.0
            out, _ = run_pair(0, collapse + 1, state, spare, stash, work, i, j,
                              sym and i == j, codes, prm, geo, imap, offsets, positions,
                              root1, root2, var1, var2, want_ntk, status)
            row[0, 0, jj] = out[0, 0, 0]
            row[1, 0, jj] = out[1, 0, 0]
            row[2, 0, jj] = out[2, 0, 0]
        row, _ = run_rows(collapse + 1, n_ops, row, row_spare, row_stash, i, j0, c1,
                          sym and j0 == i, codes, prm, geo, imap, offsets, positions, root1,
                          root2t, want_ntk, inv_b, status)
        for jj in range(n):
            k_out[i, j0 + jj] = row[0, 0, jj]
        if want_ntk:
            for jj in range(n):
                t_out[i, j0 + jj] = row[2, 0, jj]


@jit_parallel
def self_pairs(x, xn, root, var, codes, prm, geo, imap, offsets, positions, n_slots,
               work_size, collapse, status):
    """The state of every input with itself: fills ``var`` and ``root`` (N, R).

    Op by op, each input's pair runs the op once to learn the variances it
    leaves (K never depends on them), records them, and runs it again with them,
    exactly as the pair of two identical inputs will. Returns the final K and Θ.
    """
    n_inputs = x.shape[0]
    n_ops = codes.shape[0]
    nngp = np.empty(n_inputs)
    ntk = np.empty(n_inputs)
    for i in prange(n_inputs):
        state, spare, stash, work = _pair_buffers(positions, work_size, n_slots)
        probe = np.empty_like(state)
        probe_spare = np.empty_like(state)
        probe_stash = np.empty_like(stash)
        p0 = positions[0]
        for p in range(p0):
            acc = 0.0
            for ch in range(x.shape[2]):
                acc += x[i, p, ch] * x[i, p, ch]
            var[i, p] = acc / x.shape[2]
            root[i, p] = math.sqrt(var[i, p])
        init_pair(state[0], state[1], x, xn, i, x, xn, i, root[i], root[i])
        state[2, :, :] = 0.0
        for layer in range(n_ops):
            offn = offsets[layer + 1]
            size_out = positions[layer + 1]
            for m in range(3):
                probe[m, :, :] = state[m, :, :]
            probe_stash[:, :, :] = stash[:, :, :]
            for r in range(size_out):
                var[i, offn + r] = 1.0
                root[i, offn + r] = 1.0
            if layer <= collapse:
                out, _ = run_pair(layer, layer + 1, probe, probe_spare, probe_stash, work, i,
                                  i, True, codes, prm, geo, imap, offsets, positions, root,
                                  root, var, var, True, status)
            else:
                out = run_pair_tail(layer, probe, probe_spare, probe_stash, i, codes, prm,
                                    geo, imap, offsets, positions, root, status)
            for r in range(size_out):
                v = out[0, r, r] if layer < collapse else out[0, 0, 0]
                var[i, offn + r] = v
                root[i, offn + r] = math.sqrt(v)
            if layer <= collapse:
                state, spare = run_pair(layer, layer + 1, state, spare, stash, work, i, i,
                                        True, codes, prm, geo, imap, offsets, positions, root,
                                        root, var, var, True, status)
            else:
                state = run_pair_tail(layer, state, spare, stash, i, codes, prm, geo, imap,
                                      offsets, positions, root, status)
            if layer == collapse or layer > collapse:
                # vectors from here: the pair's entry [0, 0] is the state
                state[1, 0, 0] = 0.0
        nngp[i] = state[0, 0, 0]
        ntk[i] = state[2, 0, 0]
    return nngp, ntk


@jit
def run_pair_tail(layer, state, spare, stash, i, codes, prm, geo, imap, offsets, positions,
                  root, status):
    """One vector op of an input with itself: ``state[:, 0, :1]`` as a (1, 1) row."""
    inv_b = np.empty(1)
    rows = state[:, :1, :1].copy()
    rows_spare = spare[:, :1, :1].copy()
    rows_stash = stash[:, :1, :1].copy()
    root_t = root.T[:, i:i + 1].copy()
    out, _ = run_rows(layer, layer + 1, rows, rows_spare, rows_stash, i, 0, 1, True, codes,
                      prm, geo, imap, offsets, positions, root, root_t, True, inv_b, status)
    for m in range(3):
        state[m, 0, 0] = out[m, 0, 0]
    for m in range(stash.shape[0]):
        stash[m, 0, 0] = rows_stash[m, 0, 0]
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
                              True, codes, prm, geo, imap, offsets, positions, root, root_t,
                              True, inv_b, status)
            for r in range(size_out):
                v = out[0, r, 0]
                var[i, offn + r] = v
                root[i, offn + r] = math.sqrt(v)
                root_t[offn + r, i] = math.sqrt(v)
            state, spare = run_rows(layer, layer + 1, state, spare, stash, i, i, i + 1, True,
                                    codes, prm, geo, imap, offsets, positions, root, root_t,
                                    True, inv_b, status)
        nngp[i] = state[0, 0, 0]
        ntk[i] = state[2, 0, 0]
    return nngp, ntk
