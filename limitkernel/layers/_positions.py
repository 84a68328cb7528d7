"""Finite networks on positions: gathering taps, scattering signals back, and the
empirical NTK of a layer whose weights are shared across positions.

Activations of a finite network on images or sequences are (N, H, W, C) arrays,
channels last (a sequence is an image of height 1), and backward signals
(N, r, H, W, C). The taps of a spatial op are those of the lowered program's
index maps (:func:`limitkernel.layers.conv.axis_map`), read as strided slices
of the padded input (:class:`Window`).
"""

import numpy as np

from .dense import DenseParams, mm

__all__ = ["ConvParams", "Window", "gather", "scatter", "shared_layer_ntk", "window_sum"]

# Largest scratch array of the NTK of a shared layer, in float64 entries (256 MiB).
_BUDGET = 1 << 25


class Window:
    """Where the taps of a spatial op read its input, as strided slices of the
    padded input.

    The index maps of the lowered program (``my`` (H_out, k_y), ``mx``
    (W_out, k_x), input index or −1 for a padding zero; circular padding wraps)
    become, after padding the input by (before, after) rows and columns —
    zeros, or the wrapped-around input for circular padding — the slices
    ``start = tap, step = stride``: tap t of output o reads padded index
    o·stride + t. The construction checks that against the maps.
    """

    def __init__(self, program, geometry, circular):
        hi, wi, ho, wo, ky, kx, oy, ox, sy, sx = (int(v) for v in program.geo[geometry][:10])
        my = program.imap[oy:oy + ho * ky].reshape(ho, ky)
        mx = program.imap[ox:ox + wo * kx].reshape(wo, kx)
        self.shape_in, self.shape_out = (hi, wi), (ho, wo)
        self.k, self.stride, self.circular = (ky, kx), (sy, sx), circular
        self.pads = (_pads(my, hi, sy, circular), _pads(mx, wi, sx, circular))

    def slices(self):
        """(tap row, tap column, index of the padded input) for every tap."""
        (ho, wo), (sy, sx) = self.shape_out, self.stride
        for ty in range(self.k[0]):
            for tx in range(self.k[1]):
                yield ty, tx, (slice(ty, ty + sy * (ho - 1) + 1, sy),
                               slice(tx, tx + sx * (wo - 1) + 1, sx))

    def pad(self, h):
        """(N, H, W, C) → the padded (N, H_p, W_p, C)."""
        (by, ay), (bx, ax) = self.pads
        if not (by or ay or bx or ax):
            return h
        return np.pad(h, ((0, 0), (by, ay), (bx, ax), (0, 0)),
                      mode="wrap" if self.circular else "constant")

    def unpad(self, g):
        """The adjoint of :meth:`pad` on signals (N, r, H_p, W_p, C) → (N, r, H, W, C)."""
        for axis, (before, _), size in zip((2, 3), self.pads, self.shape_in):
            g = np.moveaxis(g, axis, 0)
            out = g[before:before + size].copy()
            if self.circular:
                for i in list(range(before)) + list(range(before + size, g.shape[0])):
                    out[(i - before) % size] += g[i]
            g = np.moveaxis(out, 0, axis)
        return g

    def padded_shape(self):
        return tuple(size + b + a for size, (b, a) in zip(self.shape_in, self.pads))


def _pads(m, size, stride, circular):
    """(before, after) padding along one axis such that tap t of output o reads
    padded index o·stride + t, checked against the index map ``m``."""
    out, k = m.shape
    if circular or (m < 0).any():
        before = max((out - 1) * stride + k - size, 0) // 2
    else:
        before = 0
    after = max((out - 1) * stride + k - before - size, 0)
    index = np.arange(out)[:, None] * stride + np.arange(k)[None, :] - before
    expected = index % size if circular else np.where((index >= 0) & (index < size), index, -1)
    if not np.array_equal(expected, m):
        raise RuntimeError("the index map of a spatial op is not a strided window")
    return before, after


def gather(h, window):
    """Taps of every output position: (N, H, W, C) → (N, H_out, W_out, k_y, k_x, C)."""
    hp = window.pad(h)
    (ho, wo), (ky, kx) = window.shape_out, window.k
    out = np.empty((h.shape[0], ho, wo, ky, kx, h.shape[3]))
    for ty, tx, (rows, cols) in window.slices():
        out[:, :, :, ty, tx, :] = hp[:, rows, cols, :]
    return out


def window_sum(h, window):
    """Σ over the taps of each output position: (N, H, W, C) → (N, H_out, W_out, C)."""
    hp = window.pad(h)
    out = None
    for _, _, (rows, cols) in window.slices():
        out = hp[:, rows, cols, :].copy() if out is None else out + hp[:, rows, cols, :]
    return out


def scatter(taps, window):
    """The adjoint of :func:`gather` on signals: (N, r, H_out, W_out, k_y, k_x, C)
    summed into (N, r, H, W, C); a (N, r, H_out, W_out, C) array is the same
    signal at every tap (the adjoint of :func:`window_sum`)."""
    n, r, c = taps.shape[0], taps.shape[1], taps.shape[-1]
    out = np.zeros((n, r) + window.padded_shape() + (c,))
    shared = taps.ndim == 5
    for ty, tx, (rows, cols) in window.slices():
        out[:, :, rows, cols, :] += taps if shared else taps[:, :, :, :, ty, tx, :]
    return window.unpad(out)


class ConvParams(DenseParams):
    """Trained parameters of a conv layer: ``w`` (k_y·k_x·C_in, C_out), rows in
    (tap row, tap column, input channel) order, and ``b`` (C_out,).

    A conv layer is a dense layer on the patches of its input (the k_y × k_x
    taps of every output position, channels last), with the fan-in
    n = k_y·k_x·C_in of both parameterisations, so everything but the patches
    is that of :class:`~limitkernel.layers.dense.DenseParams`.
    """

    __slots__ = ()


def shared_layer_ntk(params, a1, a2, d1, d2, c):
    """A layer's share of the empirical NTK when its weights act at every position.

    ``a`` (N, P, fan_in) are the layer's inputs at its P positions (a conv
    layer's patches), ``d`` (N, c, P, fan_out) the backward signals at its
    outputs; ``a2 = d2 = None`` for the inputs with themselves. Returns the
    (N·c, M·c) share, rows (example, output unit).

    Two exact identities; the cheaper one (in flops) is used:

    * per-example gradients G(x) = w_mul Σ_p a_p(x) ⊗ δ_p(x) (fan_in × fan_out)
      and b_mul Σ_p δ_p(x), then their inner products: O((N + M)·c·P·fan_in·fan_out)
      to form them and O(N·M·c²·fan_in·fan_out) to multiply them;
    * Gram matrices over positions,
      Σ_{p,q} (w_mul² a_p(x)·a_q(x') + b_mul²)(δ_p(x)·δ_q(x')):
      O(N·M·P²·(fan_in + c²·fan_out)).

    The second wins when P² < c²·fan_out·fan_in/(fan_in + c²·fan_out), roughly
    when the positions are few next to the widths. Both run in blocks of
    examples whose scratch stays below 256 MiB.
    """
    sym = a2 is None
    a2 = a1 if sym else a2
    d2 = d1 if sym else d2
    n1, p, fi = a1.shape
    n2 = a2.shape[0]
    fo = d1.shape[-1]
    per_example = (n1 + n2) * c * p * fi * fo + n1 * n2 * c * c * fi * fo
    positions = n1 * n2 * p * p * (fi + c * c * fo + c * c)
    if per_example <= positions:
        return _by_gradients(params, a1, a2, d1, d2, c, sym)
    return _by_positions(params, a1, a2, d1, d2, c)


def _gradients(params, a, d, c):
    """Per-example gradients (n·c, fan_in·fan_out + fan_out) of the block a, d."""
    n, p, fi = a.shape
    fo = d.shape[-1]
    dt = np.ascontiguousarray(d.transpose(0, 2, 1, 3)).reshape(n, p, c * fo)
    g = np.matmul(a.transpose(0, 2, 1), dt)  # (n, fi, c·fo)
    g = g.reshape(n, fi, c, fo).transpose(0, 2, 1, 3).reshape(n * c, fi * fo)
    out = np.empty((n * c, fi * fo + fo))
    np.multiply(g, params.w_mul, out=out[:, :fi * fo])
    out[:, fi * fo:] = params.b_mul * d.sum(axis=2).reshape(n * c, fo)
    return out


def _blocks(n, per_example):
    size = max(1, int(_BUDGET // max(per_example, 1)))
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _by_gradients(params, a1, a2, d1, d2, c, sym):
    n1, n2 = a1.shape[0], a2.shape[0]
    width = a1.shape[2] * d1.shape[-1] + d1.shape[-1]
    theta = np.empty((n1 * c, n2 * c))
    rows = _blocks(n1, 2 * c * width)
    cols = rows if sym else _blocks(n2, 2 * c * width)
    cache = {}
    for lo, hi in rows:
        g1 = _gradients(params, a1[lo:hi], d1[lo:hi], c)
        for clo, chi in cols:
            if sym and clo < lo:
                theta[lo * c:hi * c, clo * c:chi * c] = theta[clo * c:chi * c, lo * c:hi * c].T
                continue
            if sym and clo == lo:
                g2 = g1
            elif len(cols) == 1 and (clo, chi) in cache:
                g2 = cache[clo, chi]
            else:
                g2 = _gradients(params, a2[clo:chi], d2[clo:chi], c)
                if len(cols) == 1:
                    cache[clo, chi] = g2
            theta[lo * c:hi * c, clo * c:chi * c] = mm(g1, g2.T)
    return theta


def _by_positions(params, a1, a2, d1, d2, c):
    n1, p, fi = a1.shape
    n2 = a2.shape[0]
    fo = d1.shape[-1]
    theta = np.empty((n1 * c, n2 * c))
    right_a = a2.reshape(n2 * p, fi)
    right_d = d2.reshape(n2 * c * p, fo)
    w2, b2 = params.w_mul ** 2, params.b_mul ** 2
    for lo, hi in _blocks(n1, p * n2 * p * (1 + 2 * c * c)):
        m = hi - lo
        gram_a = mm(a1[lo:hi].reshape(m * p, fi), right_a.T)
        gram_a *= w2
        gram_a += b2
        gram_a = gram_a.reshape(m, p, n2, p)
        gram_d = mm(d1[lo:hi].reshape(m * c * p, fo), right_d.T).reshape(m, c, p, n2, c, p)
        block = np.einsum("ipjq,ispjtq->isjt", gram_a, gram_d, optimize=True)
        theta[lo * c:hi * c] = block.reshape(m * c, n2 * c)
    return theta
