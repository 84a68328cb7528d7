"""Convolutions and pooling: conv, avg_pool, global_avg_pool and flatten.

Inputs are channels-last, images (N, H, W, C) or sequences (N, L, C) (a
sequence is an image of height 1). The state of a pair of inputs (x, x') is one
covariance per pair of positions (p, p'): K_{pp'}(x, x'), Θ_{pp'}(x, x'), and
1 − ρ_{pp'} carried accurately as everywhere else. Neural Tangents' conventions:

* input: K⁰_{pp'} = x_p · x'_{p'} / C;
* ``conv`` with k_y × k_x taps δ: K_{pp'} ← σ_w² mean_δ K_{p+δ, p'+δ} + σ_b², and
  Θ ← σ_w² mean_δ Θ_{p+δ, p'+δ} + K_new ("ntk"); the same tap on both sides, so
  it is a stencil along the diagonals of the (p, p') array. "same" padding
  counts positions outside the image as zeros in the mean, "valid" shrinks the
  image, "circular" wraps around; a stride subsamples p and p' alike;
* ``avg_pool``: the mean of K over the windows of p and of p';
  ``global_avg_pool``: the mean over all (p, p'); ``flatten`` (then a dense
  layer): the mean over the same-position entries K_{pp}.

Without pooling only the same-position entries are ever needed, so a pair
carries P numbers per layer (the "diagonal" regime); with pooling it carries all
P² position pairs. :mod:`limitkernel._fused_spatial` runs both.

1 − ρ through a convolution. The output is a sum of independent terms (one per
tap, with its own weights, plus the bias), so with a_t, b_t the standard
deviations of tap t on either side, A, B those of the output and â_t = a_t/A,
b̂_t = b_t/B, the identity

    1 − ρ' = Σ_t w â_t b̂_t (1 − ρ_t) + ½ Σ_t w (â_t − b̂_t)² + ½ σ_b² (1/A − 1/B)²,

w = σ_w²/(k_y k_x), holds exactly and has no cancellation. ``flatten`` is the
same sum over positions with w = 1/P. Pooling averages correlated terms, for
which no such form exists: after a pool, 1 − ρ is 1 − K/√(K(x, x) K(x', x'))
(absolute error of order 1e-16, and exactly 0 for identical inputs).
"""

import math
from typing import ClassVar

import numpy as np

from .._numba import jit
from .._program import OpKind
from ..spec import PARAMETERIZATIONS, Layer, SpecError, register
from ._positions import ConvParams, Window, gather, scatter, window_sum

__all__ = [
    "OP_AVG_POOL",
    "OP_CONV",
    "OP_FLATTEN",
    "OP_GLOBAL_AVG_POOL",
    "AvgPool",
    "Conv",
    "Flatten",
    "GlobalAvgPool",
    "axis_map",
]

OP_CONV = 30
OP_AVG_POOL = 31
OP_GLOBAL_AVG_POOL = 32
OP_FLATTEN = 33

PADDINGS = ("same", "valid", "circular")


def axis_map(size, k, stride, padding):
    """Input index of output o, tap t along one axis (−1 for a padding zero).

    "same" and "circular": ceil(size/stride) outputs, the padding split as
    JAX does (the smaller half before); "valid": (size − k)//stride + 1.
    """
    if padding == "valid":
        out = (size - k) // stride + 1
        before = 0
    else:
        out = -(-size // stride)
        before = max((out - 1) * stride + k - size, 0) // 2
    if out < 1:
        return None
    idx = np.arange(out)[:, None] * stride + np.arange(k)[None, :] - before
    if padding == "circular":
        return idx % size
    return np.where((idx >= 0) & (idx < size), idx, -1)


class _Spatial(Layer, OpKind):
    """What the spatial layers share: sizes given as an int or one per axis."""

    sized = ("k", "stride")

    def _check(self, key, value):
        if key not in self.sized:
            return super()._check(key, value)
        if value is None:
            return None
        values = value if isinstance(value, (tuple, list)) else (value,)
        out = []
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(v) or v != int(v) or v < 1:
                raise SpecError(f"{self.name}: {key} must be a positive integer or one per "
                                f"axis (e.g. {key}=3 or {key}=3:2), got {value!r}")
            out.append(float(v))
        if len(out) > 2:
            raise SpecError(f"{self.name}: {key} gives {len(out)} sizes; images have two "
                            "axes and sequences one")
        return out[0] if len(out) == 1 else tuple(out)

    def _sizes(self, key, sequence, where):
        """(k_y, k_x) of ``key`` on sequences (1, k) or images (k_y, k_x).

        Whether the network runs on sequences is a matter of its inputs, never
        of the current shape: an image that strides down to one row stays an
        image, and ``k=3`` there is still 3×3.
        """
        value = self.params[key]
        if isinstance(value, tuple):
            if sequence and len(value) == 2 and value[0] != 1:
                raise SpecError(f"{where}: {key}={value} has two axes, but the input is a "
                                "sequence (N, L, C); give one size")
            if len(value) == 2:
                return int(value[0]), int(value[1])
            value = value[0]
        if sequence:
            return 1, int(value)
        return int(value), int(value)

    def _geometry(self, builder, where, k, stride, padding, what):
        if builder.spatial is None:
            raise SpecError(
                f"{where}: {self.name} needs a spatial input — images (N, H, W, C) or "
                f"sequences (N, L, C) — but its input is a vector (after flatten, "
                "global_avg_pool or on vector inputs); move it before the flatten or give "
                "image or sequence inputs")
        shape_in = builder.spatial
        my = axis_map(shape_in[0], k[0], stride[0], padding) if shape_in[0] > 1 or k[0] > 1 \
            else np.zeros((1, 1), dtype=np.int64)
        mx = axis_map(shape_in[1], k[1], stride[1], padding)
        if my is None or mx is None:
            shown = shape_in[1:] if shape_in[0] == 1 else shape_in
            size = k[1:] if shape_in[0] == 1 else k
            raise SpecError(
                f"{where}: the {what} {'x'.join(map(str, size))} is larger than its input "
                f"{'x'.join(map(str, shown))} with padding={padding}; use a smaller k, "
                "padding=same, or fewer pooling layers before it")
        shape_out = (my.shape[0], mx.shape[0])
        return builder.add_geometry((shape_in, shape_out, my.astype(np.int64),
                                     mx.astype(np.int64), stride)), shape_out


@register
class Conv(_Spatial):
    """Convolution over positions, channels-last (Neural Tangents' ``Conv``).

    Parameters
    ----------
    k : int or (int, int)
        Filter size (square for an int); one int for sequences. Text form
        ``k=3`` or ``k=3:2``.
    padding : {"same", "valid", "circular"}
    stride : int or (int, int)
    w_std, b_std : float
        σ_w (the fan-in is k_y·k_x·C) and σ_b.
    parameterization : {"ntk", "standard"}
        As for :class:`~limitkernel.layers.dense.Dense`; "standard" needs the
        layer's ``width`` (output channels) for the next layer's NTK.
    width : int, optional
        Output channels (finite networks, and the standard parameterisation).
    """

    name = "conv"
    defaults: ClassVar[dict] = {"k": 3.0, "padding": "same", "stride": 1.0, "w_std": 1.0,
                                "b_std": 0.0, "parameterization": "ntk", "width": None}
    code = OP_CONV
    row_params = ("w_var", "b_var", "theta_k", "theta_b", "geometry")
    has_params = True

    def __init__(self, k=3, padding="same", stride=1, w_std=1.0, b_std=0.0,
                 parameterization="ntk", width=None):
        super().__init__(k=k, padding=padding, stride=stride, w_std=w_std, b_std=b_std,
                         parameterization=parameterization, width=width)
        if self.padding not in PADDINGS:
            raise SpecError(f"conv: padding must be one of {', '.join(PADDINGS)}, got "
                            f"{self.padding!r}")
        if self.w_std < 0 or self.b_std < 0:
            raise SpecError(f"conv: w_std and b_std are standard deviations and must be "
                            f">= 0, got w_std={self.w_std}, b_std={self.b_std}")
        if self.parameterization not in PARAMETERIZATIONS:
            raise SpecError(f"conv: parameterization must be 'ntk' or 'standard', got "
                            f"{self.parameterization!r}")
        if self.width is not None and (self.width < 1 or self.width != int(self.width)):
            raise SpecError(f"conv: width must be a positive integer, got {self.width}")

    def lower(self, builder, where):
        spatial = builder.spatial
        if spatial is None:
            self._geometry(builder, where, (1, 1), (1, 1), self.padding, "filter")
        k = self._sizes("k", builder.sequence, where)
        stride = self._sizes("stride", builder.sequence, where)
        geometry, shape_out = self._geometry(builder, where, k, stride, self.padding,
                                             "filter")
        w_var, b_var = self.w_std ** 2, self.b_std ** 2
        if self.parameterization == "ntk":
            theta_k, theta_b = w_var, b_var
        else:
            # Θ ← n mean_δ K + 1 + σ_w² mean_δ Θ with n = k_y k_x C, the fan-in.
            theta_k, theta_b = k[0] * k[1] * builder.fan_in, 1.0
            if self.width is None:
                raise SpecError(f"{where}: the standard parameterisation needs the layer's "
                                "width (output channels) for the NTK of the next layer; "
                                "add width=...")
        builder.emit(self, where, w_var=w_var, b_var=b_var, theta_k=theta_k,
                     theta_b=theta_b, geometry=geometry, taps=k)
        builder.spatial = shape_out
        if self.width is not None:
            builder.fan_in = self.width
        builder.gaussian, builder.independent = True, True

    def diag_update(self, op, state):
        p = op.params
        sum_q, taps = tap_sum(state.program, p["geometry"], state.q)
        sum_t, _ = tap_sum(state.program, p["geometry"], state.theta)
        sum_g, _ = tap_sum(state.program, p["geometry"], state.grad)
        w = p["w_var"] / taps
        state.theta = (p["theta_k"] / taps) * sum_q + p["theta_b"] + w * sum_t
        state.q = w * sum_q + p["b_var"]
        state.grad = w * sum_g

    # ------------------------------------------------------------ finite network
    #
    # A conv layer is a dense layer on the patches of its input: z_o = w_mul ·
    # patch_o W + b_mul · b, the patch holding the k_y × k_x taps of output
    # position o (zeros in the padding), so its parameters, update and input
    # signal are those of a dense layer with fan-in k_y·k_x·C.

    def finite_init(self, op, fan_in, fan_out, rng):
        ky, kx = op.params["taps"]
        return ConvParams(self, ky * kx * fan_in, fan_out, rng)

    def finite_width(self, op, width, stash):
        raise RuntimeError("the finite width of a conv layer is set by the network")

    def finite_forward(self, op, params, h, run):
        window = Window(run.program, op.params["geometry"], self.padding == "circular")
        taps = gather(h, window)
        patches = taps.reshape(taps.shape[:3] + (-1,))
        return params(patches), (patches if run.keep else None)

    def finite_backward(self, op, params, delta, record, run):
        d_in = run.dense(params, record, delta)
        if d_in is None:
            return None
        window = Window(run.program, op.params["geometry"], self.padding == "circular")
        return scatter(d_in.reshape(d_in.shape[:4] + window.k + (-1,)), window)


@register
class AvgPool(_Spatial):
    """Average pooling over windows of positions (Neural Tangents' ``AvgPool``).

    Parameters
    ----------
    k : int or (int, int)
        Window size.
    stride : int or (int, int), optional
        Default: the window size.
    padding : {"valid", "same"}
        "same" counts positions outside the image as zeros in the mean
        (Neural Tangents' ``normalize_edges=False``).
    """

    name = "avg_pool"
    defaults: ClassVar[dict] = {"k": 2.0, "stride": None, "padding": "valid"}
    code = OP_AVG_POOL
    row_params = ("geometry",)
    needs_pairs = True

    def __init__(self, k=2, stride=None, padding="valid"):
        super().__init__(k=k, stride=stride, padding=padding)
        if self.padding not in ("valid", "same"):
            raise SpecError(f"avg_pool: padding must be valid or same, got {self.padding!r}")

    def lower(self, builder, where):
        spatial = builder.spatial
        if spatial is None:
            self._geometry(builder, where, (1, 1), (1, 1), self.padding, "window")
        k = self._sizes("k", builder.sequence, where)
        stride = k if self.stride is None else self._sizes("stride", builder.sequence, where)
        geometry, shape_out = self._geometry(builder, where, k, stride, self.padding,
                                             "window")
        builder.emit(self, where, geometry=geometry)
        builder.spatial = shape_out

    # ------------------------------------------------------------ finite network

    def finite_forward(self, op, params, h, run):
        window = Window(run.program, op.params["geometry"], False)
        out = window_sum(h, window)
        out /= window.k[0] * window.k[1]
        return out, None

    def finite_backward(self, op, params, delta, record, run):
        window = Window(run.program, op.params["geometry"], False)
        return scatter(delta / (window.k[0] * window.k[1]), window)


@register
class GlobalAvgPool(Layer, OpKind):
    """The mean over all positions (Neural Tangents' ``GlobalAvgPool``).

    K ← mean over all position pairs (p, p'); the result is a vector of
    channels, Gaussian again, which any layer may follow.
    """

    name = "global_avg_pool"
    defaults: ClassVar[dict] = {}
    code = OP_GLOBAL_AVG_POOL
    needs_pairs = True
    collapses = True

    def lower(self, builder, where):
        _check_collapse(self, builder, where)
        builder.emit(self, where)
        builder.spatial = None

    # ------------------------------------------------------------ finite network

    def finite_forward(self, op, params, h, run):
        return h.mean(axis=(1, 2)), None

    def finite_backward(self, op, params, delta, record, run):
        # Every position gets 1/P of the signal at the mean.
        h, w = op.shape
        share = delta / (h * w)
        return np.ascontiguousarray(np.broadcast_to(
            share[:, :, None, None, :], share.shape[:2] + (h, w, share.shape[-1])))


@register
class Flatten(Layer, OpKind):
    """Positions and channels into one vector (Neural Tangents' ``Flatten``).

    The next dense layer sees K ← mean_p K_{pp}: only same-position entries are
    needed. Units at different positions have different variances, so a dense
    layer must follow (as after ``concat``).
    """

    name = "flatten"
    defaults: ClassVar[dict] = {}
    code = OP_FLATTEN
    collapses = True

    def lower(self, builder, where):
        _check_collapse(self, builder, where)
        builder.emit(self, where)
        shape = builder.spatial
        builder.fan_in = builder.fan_in * shape[0] * shape[1]
        builder.spatial = None
        if builder.gaussian is True:
            builder.gaussian = "flatten"

    def diag_update(self, op, state):
        state.q = state.q.mean(axis=1)
        state.theta = state.theta.mean(axis=1)
        state.grad = state.grad.mean(axis=1)

    # ------------------------------------------------------------ finite network
    #
    # Positions in row-major order, channels fastest (Neural Tangents' Flatten of
    # channels-last arrays).

    def finite_width(self, op, width, stash):
        return None if width is None else width * op.positions

    def finite_forward(self, op, params, h, run):
        return h.reshape(h.shape[0], -1), None

    def finite_backward(self, op, params, delta, record, run):
        return delta.reshape(delta.shape[:2] + tuple(op.shape) + (-1,))


def _check_collapse(layer, builder, where):
    if builder.spatial is None:
        raise SpecError(f"{where}: {layer.name} needs a spatial input — images (N, H, W, C) "
                        "or sequences (N, L, C) — but its input is already a vector")
    if builder.depth > 0:
        raise SpecError(f"{where}: {layer.name} inside a block is not supported; put it "
                        "after the block")


def tap_sum(program, geometry, q):
    """Σ over the taps of each output position of q (n, P_in), zeros in the padding;
    returns (n, P_out) and the number of taps."""
    hi, wi, ho, wo, ky, kx, oy_map, ox_map = program.geo[geometry][:8]
    my = program.imap[oy_map:oy_map + ho * ky].reshape(ho, ky)
    mx = program.imap[ox_map:ox_map + wo * kx].reshape(wo, kx)
    grid = q.reshape(q.shape[0], hi, wi)
    out = np.zeros((q.shape[0], ho, wo))
    for ty in range(ky):
        iy = my[:, ty]
        for tx in range(kx):
            ix = mx[:, tx]
            vals = grid[:, np.maximum(iy, 0)][:, :, np.maximum(ix, 0)]
            keep = (iy >= 0)[:, None] & (ix >= 0)[None, :]
            out += np.where(keep, vals, 0.0)
    return out.reshape(q.shape[0], ho * wo), ky * kx


# ------------------------------------------------------------ kernels, pairs of positions
#
# States of one pair of inputs, (P, P) arrays with P = H·W, positions in row-major
# order; ``a``, ``b`` the roots of the diagonals of the two inputs at each
# position entering the op, ``A``, ``B`` those leaving it.


@jit
def _y_pass(x, u, wi, ky, sy, imap, runs):
    """u[(oy, px), (o2y, qx)] = Σ_ty x[(iy, px), (jy, qx)] (the same tap on both sides).

    Over the runs of each tap, so that every inner loop is a contiguous add:
    with stride 1 it spans all the columns of a run at once.
    """
    for ty in range(ky):
        for ra in range(2):
            base_a = runs + (ty * 2 + ra) * 3
            a0, a1, ai = imap[base_a], imap[base_a + 1], imap[base_a + 2]
            for oy in range(a0, a1):
                iy = ai + sy * (oy - a0)
                for px in range(wi):
                    dst = u[oy * wi + px]
                    src = x[iy * wi + px]
                    for rb in range(2):
                        base_b = runs + (ty * 2 + rb) * 3
                        b0, b1, bi = imap[base_b], imap[base_b + 1], imap[base_b + 2]
                        # Slices indexed from 0 let the compiler vectorise.
                        if sy == 1:
                            n = (b1 - b0) * wi
                            d = dst[b0 * wi:b0 * wi + n]
                            q = src[bi * wi:bi * wi + n]
                            for m in range(n):
                                d[m] += q[m]
                        else:
                            for o2y in range(b0, b1):
                                s0 = (bi + sy * (o2y - b0)) * wi
                                d = dst[o2y * wi:o2y * wi + wi]
                                q = src[s0:s0 + wi]
                                for m in range(wi):
                                    d[m] += q[m]


@jit
def _x_pass(u_k, u_g, u_t, v_k, v_g, v_t, wi, ho, wo, kx, sx, imap, runs, want_ntk):
    """v[(oy, ox), (o2y, o2x)] = Σ_tx u[(oy, ix), (o2y, jx)], for K, G and Θ at once."""
    for tx in range(kx):
        for ra in range(2):
            base_a = runs + (tx * 2 + ra) * 3
            a0, a1, ai = imap[base_a], imap[base_a + 1], imap[base_a + 2]
            for ox in range(a0, a1):
                ix = ai + sx * (ox - a0)
                for oy in range(ho):
                    dst = oy * wo + ox
                    src = oy * wi + ix
                    for rb in range(2):
                        base_b = runs + (tx * 2 + rb) * 3
                        b0, b1, bi = imap[base_b], imap[base_b + 1], imap[base_b + 2]
                        n = b1 - b0
                        if n <= 0:
                            continue
                        for o2y in range(ho):
                            d0 = o2y * wo + b0
                            s0 = o2y * wi + bi
                            s1 = s0 + sx * (n - 1) + 1
                            dk = v_k[dst, d0:d0 + n]
                            dg = v_g[dst, d0:d0 + n]
                            qk = u_k[src, s0:s1:sx]
                            qg = u_g[src, s0:s1:sx]
                            for m in range(n):
                                dk[m] += qk[m]
                                dg[m] += qg[m]
                            if want_ntk:
                                dt = v_t[dst, d0:d0 + n]
                                qt = u_t[src, s0:s1:sx]
                                for m in range(n):
                                    dt[m] += qt[m]


@jit
def conv_pairs(k_in, c_in, t_in, k_out, c_out, t_out, a, b, big_a, big_b, geo, imap, p,
               want_ntk, u_k, u_g, u_t, g_in, ahat, bhat):
    """Convolution of one pair's (P_in, P_in) state into its (P_out, P_out) state.

    The stencil is separable: sums over the y taps into ``u_*`` (H_out·W_in)²,
    then over the x taps. 1 − ρ' by the identity of the module docstring, its
    first term a stencil of a_p b_q (1 − ρ_pq) (``g_in``), the others from the
    normalised tap roots ``ahat`` (P_out, taps), ``bhat`` (taps, P_out).
    """
    w_var, b_var, theta_k, theta_b = p[0], p[1], p[2], p[3]
    hi, wi, ho, wo, ky, kx = geo[0], geo[1], geo[2], geo[3], geo[4], geo[5]
    oy_map, ox_map, sy, sx, runs_y, runs_x = geo[6], geo[7], geo[8], geo[9], geo[10], \
        geo[11]
    pi = hi * wi
    po = ho * wo
    taps = ky * kx
    w = w_var / taps
    for r in range(pi):
        ar = a[r]
        cr = c_in[r]
        gr = g_in[r]
        for s in range(pi):
            gr[s] = ar * b[s] * cr[s]
    rows_u = ho * wi
    u_k[:rows_u, :rows_u] = 0.0
    u_g[:rows_u, :rows_u] = 0.0
    k_out[:po, :po] = 0.0
    c_out[:po, :po] = 0.0
    _y_pass(k_in, u_k, wi, ky, sy, imap, runs_y)
    _y_pass(g_in, u_g, wi, ky, sy, imap, runs_y)
    if want_ntk:
        u_t[:rows_u, :rows_u] = 0.0
        t_out[:po, :po] = 0.0
        _y_pass(t_in, u_t, wi, ky, sy, imap, runs_y)
    _x_pass(u_k, u_g, u_t, k_out, c_out, t_out, wi, ho, wo, kx, sx, imap, runs_x, want_ntk)
    # Normalised tap roots: â[o, t] = a_{in(o, t)} / A_o (0 in the padding).
    for o in range(po):
        oy = o // wo
        ox = o - oy * wo
        inv_a = 1.0 / big_a[o] if big_a[o] > 0.0 else 0.0
        inv_b = 1.0 / big_b[o] if big_b[o] > 0.0 else 0.0
        for ty in range(ky):
            iy = imap[oy_map + oy * ky + ty]
            for tx in range(kx):
                ix = imap[ox_map + ox * kx + tx]
                t = ty * kx + tx
                if iy < 0 or ix < 0:
                    ahat[o, t] = 0.0
                    bhat[t, o] = 0.0
                else:
                    ahat[o, t] = a[iy * wi + ix] * inv_a
                    bhat[t, o] = b[iy * wi + ix] * inv_b
    theta_scale = theta_k / taps
    half_w = 0.5 * w
    for o in range(po):
        big = big_a[o]
        inv_a = 1.0 / big if big > 0.0 else 0.0
        ko = k_out[o]
        co = c_out[o]
        if want_ntk:
            to = t_out[o]
            for o2 in range(po):
                to[o2] = theta_scale * ko[o2] + theta_b + w * to[o2]
        for o2 in range(po):
            ko[o2] = w * ko[o2] + b_var
        for o2 in range(po):
            inv_b = 1.0 / big_b[o2] if big_b[o2] > 0.0 else 0.0
            gap = inv_a - inv_b
            co[o2] = w * co[o2] * inv_a * inv_b + 0.5 * b_var * gap * gap
        for t in range(taps):
            av = ahat[o, t]
            bt = bhat[t]
            for o2 in range(po):
                d = av - bt[o2]
                co[o2] += half_w * d * d
        for o2 in range(po):
            if big > 0.0 and big_b[o2] > 0.0:
                co[o2] = min(max(co[o2], 0.0), 2.0)
            else:
                co[o2] = 0.0


@jit
def _root_of_product(u, v):
    """√(u v) for u, v ≥ 0, exactly u when u = v (so that 1 − ρ of identical inputs
    is 0), and without overflow or underflow of the product."""
    if u == v:
        return u
    prod = u * v
    if 1e-300 < prod < 1e300:
        return math.sqrt(prod)
    return math.sqrt(u) * math.sqrt(v)


@jit
def pool_pairs(k_in, t_in, k_out, c_out, t_out, var_a, var_b, geo, imap, want_ntk, u_k, u_t):
    """Average pooling of one pair's state: the mean over the windows of p and of p'.

    1 − ρ' = 1 − K'/√(K'(x, x) K'(x', x')) from the pooled variances ``var_a``,
    ``var_b`` (exactly 0 for identical inputs).
    """
    hi, wi, ho, wo, ky, kx, oy_map, ox_map = geo[0], geo[1], geo[2], geo[3], geo[4], \
        geo[5], geo[6], geo[7]
    pi = hi * wi
    po = ho * wo
    scale = 1.0 / (ky * kx * ky * kx)
    # first the windows of p' (columns), then those of p (rows)
    for r in range(pi):
        for o2 in range(po):
            o2y = o2 // wo
            o2x = o2 - o2y * wo
            sk = 0.0
            st = 0.0
            for ty in range(ky):
                jy = imap[oy_map + o2y * ky + ty]
                if jy < 0:
                    continue
                for tx in range(kx):
                    jx = imap[ox_map + o2x * kx + tx]
                    if jx < 0:
                        continue
                    sk += k_in[r, jy * wi + jx]
                    if want_ntk:
                        st += t_in[r, jy * wi + jx]
            u_k[r, o2] = sk
            u_t[r, o2] = st
    for o in range(po):
        oy = o // wo
        ox = o - oy * wo
        for o2 in range(po):
            k_out[o, o2] = 0.0
            t_out[o, o2] = 0.0
        for ty in range(ky):
            iy = imap[oy_map + oy * ky + ty]
            if iy < 0:
                continue
            for tx in range(kx):
                ix = imap[ox_map + ox * kx + tx]
                if ix < 0:
                    continue
                src = iy * wi + ix
                for o2 in range(po):
                    k_out[o, o2] += u_k[src, o2]
                if want_ntk:
                    for o2 in range(po):
                        t_out[o, o2] += u_t[src, o2]
        for o2 in range(po):
            kk = k_out[o, o2] * scale
            k_out[o, o2] = kk
            t_out[o, o2] *= scale
            nrm = _root_of_product(var_a[o], var_b[o2])
            c_out[o, o2] = min(max(1.0 - kk / nrm, 0.0), 2.0) if nrm > 0.0 else 0.0


@jit
def global_pool_pairs(k_in, t_in, positions, var_a, var_b, want_ntk):
    """Global average pooling of one pair's state: (K, 1 − ρ, Θ) of the pair."""
    sk = 0.0
    st = 0.0
    for r in range(positions):
        for s in range(positions):
            sk += k_in[r, s]
        if want_ntk:
            for s in range(positions):
                st += t_in[r, s]
    scale = 1.0 / (positions * positions)
    kk = sk * scale
    nrm = _root_of_product(var_a, var_b)
    c = min(max(1.0 - kk / nrm, 0.0), 2.0) if nrm > 0.0 else 0.0
    return kk, c, st * scale


@jit
def flatten_entry(k, c, t, a, b, big_a, big_b, positions, want_ntk):
    """Flatten of one pair from the same-position entries of its (P, P) state.

    K ← mean_p K_pp, Θ likewise, and 1 − ρ by the identity of the module
    docstring with w = 1/P and no bias.
    """
    w = 1.0 / positions
    sk = 0.0
    st = 0.0
    sc = 0.0
    inv_a = 1.0 / big_a if big_a > 0.0 else 0.0
    inv_b = 1.0 / big_b if big_b > 0.0 else 0.0
    for r in range(positions):
        sk += k[r, r]
        if want_ntk:
            st += t[r, r]
        av = a[r] * inv_a
        bv = b[r] * inv_b
        d = av - bv
        sc += av * bv * c[r, r] + 0.5 * d * d
    cc = min(max(w * sc, 0.0), 2.0) if big_a > 0.0 and big_b > 0.0 else 0.0
    return w * sk, cc, w * st


# ------------------------------------------------------------ kernels, same positions
#
# The state of a row of pairs (one row input, n column inputs) at every position:
# (P, n) arrays. ``a`` (P,) holds the row input's roots, ``b`` (P, n) the
# columns', entering the op; ``big_a`` (P_out,), ``big_b`` (P_out, n) leaving it.


@jit
def conv_rows(k_in, c_in, t_in, k_out, c_out, t_out, a, b, big_a, big_b, geo, imap, p,
              want_ntk, inv_b):
    """Convolution of the same-position state: (P_in, n) into (P_out, n)."""
    w_var, b_var, theta_k, theta_b = p[0], p[1], p[2], p[3]
    wi, ho, wo, ky, kx, oy_map, ox_map = geo[1], geo[2], geo[3], geo[4], geo[5], \
        geo[6], geo[7]
    taps = ky * kx
    w = w_var / taps
    n = k_in.shape[1]
    for o in range(ho * wo):
        oy = o // wo
        ox = o - oy * wo
        big = big_a[o]
        inv_a = 1.0 / big if big > 0.0 else 0.0
        ko = k_out[o]
        co = c_out[o]
        to = t_out[o]
        bo = big_b[o]
        for j in range(n):
            ko[j] = 0.0
            co[j] = 0.0
            if want_ntk:
                to[j] = 0.0
            inv_b[j] = 1.0 / bo[j] if bo[j] > 0.0 else 0.0
        for ty in range(ky):
            iy = imap[oy_map + oy * ky + ty]
            if iy < 0:
                continue
            for tx in range(kx):
                ix = imap[ox_map + ox * kx + tx]
                if ix < 0:
                    continue
                src = iy * wi + ix
                av = a[src] * inv_a
                ks = k_in[src]
                cs = c_in[src]
                bs = b[src]
                for j in range(n):
                    ko[j] += ks[j]
                    bv = bs[j] * inv_b[j]
                    d = av - bv
                    co[j] += av * bv * cs[j] + 0.5 * d * d
                if want_ntk:
                    ts = t_in[src]
                    for j in range(n):
                        to[j] += ts[j]
        for j in range(n):
            kk = ko[j]
            ko[j] = w * kk + b_var
            if want_ntk:
                to[j] = (theta_k / taps) * kk + theta_b + w * to[j]
            if big > 0.0 and bo[j] > 0.0:
                gap = inv_a - inv_b[j]
                co[j] = min(max(w * co[j] + 0.5 * b_var * gap * gap, 0.0), 2.0)
            else:
                co[j] = 0.0


@jit
def flatten_rows(k_in, c_in, t_in, k_out, c_out, t_out, a, b, big_a, big_b, want_ntk):
    """Flatten of the same-position state (P, n) into vectors (n,)."""
    positions, n = k_in.shape
    w = 1.0 / positions
    inv_a = 1.0 / big_a if big_a > 0.0 else 0.0
    for j in range(n):
        k_out[j] = 0.0
        c_out[j] = 0.0
        if want_ntk:
            t_out[j] = 0.0
    for r in range(positions):
        av = a[r] * inv_a
        ks = k_in[r]
        cs = c_in[r]
        bs = b[r]
        for j in range(n):
            k_out[j] += ks[j]
            inv_b = 1.0 / big_b[j] if big_b[j] > 0.0 else 0.0
            bv = bs[j] * inv_b
            d = av - bv
            c_out[j] += av * bv * cs[j] + 0.5 * d * d
        if want_ntk:
            ts = t_in[r]
            for j in range(n):
                t_out[j] += ts[j]
    for j in range(n):
        k_out[j] *= w
        if want_ntk:
            t_out[j] *= w
        if big_a > 0.0 and big_b[j] > 0.0:
            c_out[j] = min(max(w * c_out[j], 0.0), 2.0)
        else:
            c_out[j] = 0.0
