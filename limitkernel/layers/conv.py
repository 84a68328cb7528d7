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

w = σ_w²/(k_y k_x), holds exactly and has no cancellation. The passes take it
only where it matters: where the direct 1 − K/(A B) is at least 1/64 they keep
that (an absolute error of at most taps + 4 ulp, below 1e-13 of 1 − ρ), below
it, and for identical inputs, the identity. ``flatten`` is the
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
            theta_k = k[0] * k[1] * builder.require_fan_in(where)
            theta_b = 1.0
        builder.emit(self, where, w_var=w_var, b_var=b_var, theta_k=theta_k,
                     theta_b=theta_b, geometry=geometry, taps=k)
        builder.spatial = shape_out
        builder.set_width(self.width, where)
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
        if builder.fan_in is not None:
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
# A row input against LANES column inputs at once. Each state (K, 1 − ρ, Θ) is
# a (P, P·LANES) array: entry [p, q·LANES + l] belongs to positions (p, q) of the
# pair (row input, column input l), so every loop over positions runs over
# contiguous blocks of LANES pairs. ``a`` (P,) holds the row input's roots at the
# positions entering an op, ``b`` (P·LANES,) the columns' (same indexing), and
# ``big_a``, ``big_b`` those leaving it.

LANES = 8

# Below this value of the direct 1 − K/(A B) after a convolution, 1 − ρ is
# recomputed from the identity of the module docstring. Above it the direct form
# errs by at most (taps + 4) ulp in absolute terms (K is a sum of terms bounded
# by A B), below 1e-13 of 1 − ρ itself.
CORR_DIRECT = 1.0 / 64.0


@jit
def _add_run(d, q, n):
    """d[:n] += q[:n]."""
    for m in range(n):
        d[m] += q[m]


@jit
def _sum_rows(dst, x, rows, offs, count, n):
    """dst[:n] = Σ_{j < count} x[rows[j], offs[j]:offs[j] + n], up to three terms
    per pass over dst (one store per entry for three taps or fewer)."""
    if count == 0:
        dst[:n] = 0.0
        return
    q0 = x[rows[0], offs[0]:]
    if count == 1:
        for m in range(n):
            dst[m] = q0[m]
        return
    q1 = x[rows[1], offs[1]:]
    if count == 2:
        for m in range(n):
            dst[m] = q0[m] + q1[m]
        return
    q2 = x[rows[2], offs[2]:]
    for m in range(n):
        dst[m] = q0[m] + q1[m] + q2[m]
    for j in range(3, count, 3):
        q0 = x[rows[j], offs[j]:]
        if j + 1 == count:
            for m in range(n):
                dst[m] += q0[m]
            continue
        q1 = x[rows[j + 1], offs[j + 1]:]
        if j + 2 == count:
            for m in range(n):
                dst[m] += q0[m] + q1[m]
            continue
        q2 = x[rows[j + 2], offs[j + 2]:]
        for m in range(n):
            dst[m] += q0[m] + q1[m] + q2[m]


@jit
def _first_tap(k, out, imap, runs):
    """A tap whose runs cover all ``out`` outputs along an axis, or -1."""
    for t in range(k):
        covered = 0
        for ra in range(2):
            base = runs + (t * 2 + ra) * 3
            covered += max(imap[base + 1] - imap[base], 0)
        if covered == out:
            return t
    return -1


@jit
def _tap_order(step, first):
    """The tap of a step when tap ``first`` (if >= 0) goes first."""
    if first < 0 or step > first:
        return step
    return first if step == 0 else step - 1


@jit
def _copy_or_add(d, q, n, assign):
    """d[:n] = q[:n] with ``assign``, else d[:n] += q[:n]."""
    if assign:
        for m in range(n):
            d[m] = q[m]
    else:
        for m in range(n):
            d[m] += q[m]


@jit
def _y_pass(x, u, wi, ho, ky, sy, oy_map, imap, runs):
    """u[(oy, px), (o2y, qx)] = Σ_ty x[(iy, px), (jy, qx)]: the same tap on both sides.

    Output row by output row, so that it and the few input rows it reads stay
    in cache. Per tap, the columns come in up to two runs whose inputs advance
    by the stride, so with stride 1 each is one contiguous add over whole rows
    of positions. A tap that reaches every output goes first and assigns (no
    zeroing).
    """
    row = wi * LANES
    first = _first_tap(ky, ho, imap, runs)
    for px in range(wi):
        for oy in range(ho):
            dst = u[oy * wi + px]
            if first < 0:
                dst[:ho * row] = 0.0
            for step in range(ky):
                ty = _tap_order(step, first)
                iy = imap[oy_map + oy * ky + ty]
                if iy < 0:
                    continue
                assign = step == 0 and first >= 0
                src = x[iy * wi + px]
                for rb in range(2):
                    base_b = runs + (ty * 2 + rb) * 3
                    b0, b1, bi = imap[base_b], imap[base_b + 1], imap[base_b + 2]
                    if b1 <= b0:
                        continue
                    if sy == 1:
                        _copy_or_add(dst[b0 * row:], src[bi * row:], (b1 - b0) * row, assign)
                    else:
                        for o2y in range(b0, b1):
                            _copy_or_add(dst[o2y * row:], src[(bi + sy * (o2y - b0)) * row:],
                                         row, assign)


@jit
def conv_y_lanes(k_in, t_in, u_k, u_t, geo, imap, ntk_pass):
    """First half of a convolution of the lanes' states: the y taps of K (and Θ
    with ``ntk_pass``) into ``u_k``, ``u_t`` (H_out·W_in rows)."""
    wi, ho, ky, oy_map, sy, runs_y = geo[1], geo[2], geo[4], geo[6], geo[8], geo[10]
    _y_pass(k_in, u_k, wi, ho, ky, sy, oy_map, imap, runs_y)
    if ntk_pass:
        _y_pass(t_in, u_t, wi, ho, ky, sy, oy_map, imap, runs_y)


@jit
def _x_row(u, dst, oy, ox, wi, ho, wo, kx, sx, ox_map, imap, runs):
    """dst[(o2y, o2x)] = Σ_tx u[(oy, ix), (o2y, jx)]: the x taps of output (oy, ox).

    Per tap, the columns come in up to two runs whose inputs advance by the
    stride (one contiguous add per o2y with stride 1); a tap that reaches every
    output goes first and assigns.
    """
    first = _first_tap(kx, wo, imap, runs)
    if first < 0:
        dst[:ho * wo * LANES] = 0.0
    for step in range(kx):
        tx = _tap_order(step, first)
        ix = imap[ox_map + ox * kx + tx]
        if ix < 0:
            continue
        assign = step == 0 and first >= 0
        src = u[oy * wi + ix]
        for rb in range(2):
            base_b = runs + (tx * 2 + rb) * 3
            b0, b1, bi = imap[base_b], imap[base_b + 1], imap[base_b + 2]
            n = b1 - b0
            if n <= 0:
                continue
            if sx == 1 and n == wo and wo == wi:
                # whole rows of positions: one run over all of them
                _copy_or_add(dst, src, ho * wo * LANES, assign)
                continue
            for o2y in range(ho):
                d0 = (o2y * wo + b0) * LANES
                s0 = (o2y * wi + bi) * LANES
                if sx == 1:
                    _copy_or_add(dst[d0:], src[s0:], n * LANES, assign)
                else:
                    for m in range(n):
                        _copy_or_add(dst[d0 + m * LANES:], src[s0 + sx * m * LANES:], LANES,
                                     assign)


@jit
def conv_x_row(u_k, u_t, ko, to, o, geo, imap, p, want_ntk, theta_zero):
    """Second half of a convolution, output position o: the x taps of K (and Θ),
    then K ← σ_w² mean + σ_b² and Θ ← (θ_k/taps) ΣK + θ_b + σ_w² mean Θ."""
    w_var, b_var, theta_k, theta_b = p[0], p[1], p[2], p[3]
    wi, ho, wo, ky, kx, ox_map, sx, runs_x = geo[1], geo[2], geo[3], geo[4], geo[5], \
        geo[7], geo[9], geo[11]
    taps = ky * kx
    w = w_var / taps
    theta_scale = theta_k / taps
    oy = o // wo
    ox = o - oy * wo
    n = ho * wo * LANES
    _x_row(u_k, ko, oy, ox, wi, ho, wo, kx, sx, ox_map, imap, runs_x)
    if want_ntk and not theta_zero:
        _x_row(u_t, to, oy, ox, wi, ho, wo, kx, sx, ox_map, imap, runs_x)
        for m in range(n):
            to[m] = theta_scale * ko[m] + theta_b + w * to[m]
    elif want_ntk:
        for m in range(n):
            to[m] = theta_scale * ko[m] + theta_b
    for m in range(n):
        ko[m] = w * ko[m] + b_var


@jit
def tap_map(geo, imap, taps_of):
    """taps_of[o, t]: the input position of output o at tap t, or -1 (padding)."""
    wi, ho, wo, ky, kx, oy_map, ox_map = geo[1], geo[2], geo[3], geo[4], geo[5], geo[6], \
        geo[7]
    for o in range(ho * wo):
        oy = o // wo
        ox = o - oy * wo
        for ty in range(ky):
            iy = imap[oy_map + oy * ky + ty]
            for tx in range(kx):
                ix = imap[ox_map + ox * kx + tx]
                taps_of[o, ty * kx + tx] = iy * wi + ix if iy >= 0 and ix >= 0 else -1


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
def _conv_corr_entry(c_in, a, b, inv_a, inv_b, rows, cols, lane, w, b_var):
    """1 − ρ of one output entry by the identity of the module docstring; ``rows``,
    ``cols`` the input positions of its taps on either side (-1 in the padding)."""
    acc = 0.0
    dev = 0.0
    for t in range(rows.shape[0]):
        r = rows[t]
        s = cols[t]
        av = a[r] * inv_a if r >= 0 else 0.0
        bv = b[s * LANES + lane] * inv_b if s >= 0 else 0.0
        if r >= 0 and s >= 0:
            acc += av * bv * c_in[r, s * LANES + lane]
        d = av - bv
        dev += d * d
    gap = inv_a - inv_b
    return min(max(w * (acc + 0.5 * dev) + 0.5 * b_var * gap * gap, 0.0), 2.0)


@jit
def inverse_roots(big, inv):
    """inv = 1/big, 0 where big is 0."""
    for m in range(big.shape[0]):
        inv[m] = 1.0 / big[m] if big[m] > 0.0 else 0.0


@jit
def conv_corr_row(ko, co, c_in, a, b, big_a, inv_b, o, taps_of, taps, p):
    """1 − ρ of output position o after a convolution, from its K (``ko``) and
    the roots leaving it: the row input's ``big_a``, the inverses ``inv_b`` of
    the columns' (:func:`inverse_roots`).

    1 − K/(A B) where that is at least ``CORR_DIRECT``, otherwise the identity
    of the module docstring (no cancellation); 0 where a variance is 0.
    ``taps_of`` is :func:`tap_map` of the geometry.
    """
    b_var = p[1]
    w = p[0] / taps
    n = ko.shape[0]
    inv_a = 1.0 / big_a if big_a > 0.0 else 0.0
    low = 0
    for m in range(n):
        scale = inv_a * inv_b[m]
        cm = min(max(1.0 - ko[m] * scale, 0.0), 2.0)
        co[m] = cm if scale > 0.0 else 0.0
        low += 1 if cm < CORR_DIRECT and scale > 0.0 else 0
    if low == 0:
        return
    for m in range(n):
        if co[m] < CORR_DIRECT and inv_a * inv_b[m] > 0.0:
            o2 = m // LANES
            co[m] = _conv_corr_entry(c_in, a, b, inv_a, inv_b[m], taps_of[o, :taps],
                                     taps_of[o2, :taps], m - o2 * LANES, w, b_var)


@jit
def pool_lanes(k_in, t_in, k_out, t_out, geo, imap, want_ntk, theta_zero, u_k, u_t):
    """K and Θ of average pooling: the mean over the windows of p and of p'.

    First over the windows of p (whole rows, contiguous), into ``u_*``
    (P_out rows), then over those of p'.
    """
    hi, wi, ho, wo, ky, kx, oy_map, ox_map = geo[0], geo[1], geo[2], geo[3], geo[4], \
        geo[5], geo[6], geo[7]
    pi = hi * wi
    po = ho * wo
    scale = 1.0 / (ky * kx * ky * kx)
    ntk_pass = want_ntk and not theta_zero
    rows = np.empty(ky * kx, dtype=np.int64)
    offs = np.zeros(ky * kx, dtype=np.int64)
    for o in range(po):
        oy = o // wo
        ox = o - oy * wo
        count = 0
        for ty in range(ky):
            iy = imap[oy_map + oy * ky + ty]
            for tx in range(kx):
                ix = imap[ox_map + ox * kx + tx]
                if iy >= 0 and ix >= 0:
                    rows[count] = iy * wi + ix
                    count += 1
        _sum_rows(u_k[o], k_in, rows, offs, count, pi * LANES)
        if ntk_pass:
            _sum_rows(u_t[o], t_in, rows, offs, count, pi * LANES)
    for o in range(po):
        ko = k_out[o]
        to = t_out[o]
        for o2 in range(po):
            o2y = o2 // wo
            o2x = o2 - o2y * wo
            count = 0
            for ty in range(ky):
                jy = imap[oy_map + o2y * ky + ty]
                for tx in range(kx):
                    jx = imap[ox_map + o2x * kx + tx]
                    if jy >= 0 and jx >= 0:
                        rows[count] = o
                        offs[count] = (jy * wi + jx) * LANES
                        count += 1
            _sum_rows(ko[o2 * LANES:], u_k, rows, offs, count, LANES)
            if ntk_pass:
                _sum_rows(to[o2 * LANES:], u_t, rows, offs, count, LANES)
        for m in range(po * LANES):
            ko[m] *= scale
        if ntk_pass:
            for m in range(po * LANES):
                to[m] *= scale


@jit
def pool_corr_lanes(k_out, c_out, var_a, var_b):
    """1 − ρ' = 1 − K'/√(K'(x, x) K'(x', x')) after pooling, from the variances
    leaving it (exactly 0 for identical inputs)."""
    po = k_out.shape[0]
    n = k_out.shape[1]
    for o in range(po):
        va = var_a[o]
        ko = k_out[o]
        co = c_out[o]
        for m in range(n):
            nrm = _root_of_product(va, var_b[m])
            co[m] = min(max(1.0 - ko[m] / nrm, 0.0), 2.0) if nrm > 0.0 else 0.0


@jit
def global_pool_lanes(k_in, t_in, positions, want_ntk, out):
    """Global average pooling: K and Θ of each lane into ``out[0]``, ``out[2]`` (LANES,)."""
    sk = out[0]
    st = out[2]
    sk[:] = 0.0
    st[:] = 0.0
    n = positions * LANES
    for r in range(positions):
        kr = k_in[r]
        for s in range(0, n, LANES):
            _add_run(sk, kr[s:], LANES)
        if want_ntk:
            tr = t_in[r]
            for s in range(0, n, LANES):
                _add_run(st, tr[s:], LANES)
    scale = 1.0 / (positions * positions)
    for lane in range(LANES):
        sk[lane] *= scale
        st[lane] *= scale


@jit
def global_pool_corr_lanes(out, var_a, var_b):
    """1 − ρ after global pooling, into ``out[1]``, from the variances leaving it."""
    for lane in range(LANES):
        nrm = _root_of_product(var_a, var_b[lane])
        out[1, lane] = min(max(1.0 - out[0, lane] / nrm, 0.0), 2.0) if nrm > 0.0 else 0.0


@jit
def flatten_lanes(k, t, positions, want_ntk, out):
    """Flatten: K ← mean_p K_pp and Θ likewise, per lane, into ``out[0]``, ``out[2]``."""
    w = 1.0 / positions
    for lane in range(LANES):
        sk = 0.0
        st = 0.0
        for r in range(positions):
            sk += k[r, r * LANES + lane]
            if want_ntk:
                st += t[r, r * LANES + lane]
        out[0, lane] = w * sk
        out[2, lane] = w * st


@jit
def flatten_corr_lanes(c, a, b, big_a, big_b, positions, out):
    """1 − ρ after flatten by the identity of the module docstring (w = 1/P, no bias)."""
    w = 1.0 / positions
    inv_a = 1.0 / big_a if big_a > 0.0 else 0.0
    for lane in range(LANES):
        inv_b = 1.0 / big_b[lane] if big_b[lane] > 0.0 else 0.0
        sc = 0.0
        for r in range(positions):
            m = r * LANES + lane
            av = a[r] * inv_a
            bv = b[m] * inv_b
            d = av - bv
            sc += av * bv * c[r, m] + 0.5 * d * d
        out[1, lane] = min(max(w * sc, 0.0), 2.0) if big_a > 0.0 and big_b[lane] > 0.0 \
            else 0.0


# ------------------------------------------------------------ kernels, same positions
#
# The state of a row of pairs (one row input, n column inputs) at every position:
# (P, n) arrays. ``a`` (P,) holds the row input's roots, ``b`` (P, n) the
# columns', entering the op; ``big_a`` (P_out,), ``big_b`` (P_out, n) leaving it.


@jit
def conv_rows(k_in, c_in, t_in, k_out, c_out, t_out, a, b, big_a, big_b, geo, imap, p,
              want_ntk, theta_zero, inv_b):
    """Convolution of the same-position state: (P_in, n) into (P_out, n).

    K and Θ sum the taps (Θ only when it is not 0 entering, ``theta_zero``);
    1 − ρ is 1 − K/(A B) where that is at least ``CORR_DIRECT``, otherwise, for
    the positions that have such entries, the identity of the module docstring.
    """
    w_var, b_var, theta_k, theta_b = p[0], p[1], p[2], p[3]
    wi, ho, wo, ky, kx, oy_map, ox_map = geo[1], geo[2], geo[3], geo[4], geo[5], \
        geo[6], geo[7]
    taps = ky * kx
    w = w_var / taps
    theta_scale = theta_k / taps
    ntk_pass = want_ntk and not theta_zero
    n = k_in.shape[1]
    rows = np.empty(taps, dtype=np.int64)
    offs = np.zeros(taps, dtype=np.int64)
    for o in range(ho * wo):
        oy = o // wo
        ox = o - oy * wo
        big = big_a[o]
        inv_a = 1.0 / big if big > 0.0 else 0.0
        ko = k_out[o]
        co = c_out[o]
        to = t_out[o]
        bo = big_b[o]
        count = 0
        for ty in range(ky):
            iy = imap[oy_map + oy * ky + ty]
            for tx in range(kx):
                ix = imap[ox_map + ox * kx + tx]
                if iy >= 0 and ix >= 0:
                    rows[count] = iy * wi + ix
                    count += 1
        _sum_rows(ko, k_in, rows, offs, count, n)
        if ntk_pass:
            _sum_rows(to, t_in, rows, offs, count, n)
        if ntk_pass:
            for j in range(n):
                to[j] = theta_scale * ko[j] + theta_b + w * to[j]
        elif want_ntk:
            for j in range(n):
                to[j] = theta_scale * ko[j] + theta_b
        low = 0
        for j in range(n):
            kk = w * ko[j] + b_var
            ko[j] = kk
            inv_b[j] = 1.0 / bo[j] if bo[j] > 0.0 else 0.0
            scale = inv_a * inv_b[j]
            cm = min(max(1.0 - kk * scale, 0.0), 2.0)
            co[j] = cm if scale > 0.0 else 0.0
            low += 1 if cm < CORR_DIRECT and scale > 0.0 else 0
        if low == 0:
            continue
        # The identity for the whole position, kept where the direct form is short.
        acc = np.zeros(n)
        for ty in range(ky):
            iy = imap[oy_map + oy * ky + ty]
            for tx in range(kx):
                ix = imap[ox_map + ox * kx + tx]
                if iy < 0 or ix < 0:
                    continue  # padding on both sides: â = b̂ = 0
                src = iy * wi + ix
                av = a[src] * inv_a
                cs = c_in[src]
                bs = b[src]
                for j in range(n):
                    bv = bs[j] * inv_b[j]
                    d = av - bv
                    acc[j] += av * bv * cs[j] + 0.5 * d * d
        for j in range(n):
            if co[j] < CORR_DIRECT and inv_a * inv_b[j] > 0.0:
                gap = inv_a - inv_b[j]
                co[j] = min(max(w * acc[j] + 0.5 * b_var * gap * gap, 0.0), 2.0)


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
