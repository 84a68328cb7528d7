"""The reference recursion in mpmath: the one high-precision evaluation every exactness test uses.

Shares no numerical code with the package: for one pair of inputs it applies
the textbook recursion layer by layer at ``dps`` significant digits (set
locally with ``mpmath.workdps``), with the angle from mpmath's own ``acos``, so
rounding in the correlation costs it nothing. Only the spec parser of the
package is used, to read the layers and their parameters.

* dense (both parameterisations), layernorm, dropout (x and x' different
  examples), residual, parallel, concat: their definitions;
* positively homogeneous activations (the ReLU family, step, sign, ReLU^k):
  E[φ(u)φ(v)] = 2^m m!/(2π) ∫ φ(cos α) φ(cos(α − θ)) dα for unit variances,
  by ``mpmath.quad`` split at the kinks — no closed form;
* erf (Williams 1997), sin/cos/rbf and exp (the Gaussian characteristic
  function), gaussian (a Gaussian integral): the textbook closed forms, each
  checked against quadrature in ``test_activations``.
"""

import mpmath
import numpy as np

import limitkernel as lk

__all__ = ["UnsaidWidth", "kernel_mp", "pair_state"]


class UnsaidWidth(ValueError):
    """A "standard" layer's fan-in is a width the spec leaves out, or branches
    summed end with different widths: the kernel is not defined by the spec."""


def _fan_in(fan_in):
    """The fan-in a "standard" layer's NTK multiplies by (n, the input width)."""
    if fan_in is None:
        raise UnsaidWidth("a standard layer follows a layer of unsaid width")
    return mpmath.mpf(fan_in)


def _sum_width(widths):
    """The width of a sum of branches: the one those that state it agree on."""
    known = {w for w in widths if w is not None}
    if len(known) > 1:
        raise UnsaidWidth(f"branches summed end with widths {sorted(known)}")
    return known.pop() if known else None


def pair_state(x1, x2):
    """(q11, q22, q12, Θ11, Θ22, Θ12) of the input layer, in mpmath."""
    x1 = [mpmath.mpf(float(v)) for v in x1]
    x2 = [mpmath.mpf(float(v)) for v in x2]
    d = len(x1)
    zero = mpmath.mpf(0)
    return (mpmath.fsum(u * u for u in x1) / d, mpmath.fsum(v * v for v in x2) / d,
            mpmath.fsum(u * v for u, v in zip(x1, x2)) / d, zero, zero, zero)


def kernel_mp(spec, x1, x2, dps=40, trace=None):
    """K and Θ of ``spec`` for the pair (x1, x2), at ``dps`` digits.

    Returns ``((K11, K12, K22), (Θ11, Θ12, Θ22))`` as floats; x1 and x2 are
    different examples (dropout scales only the diagonal terms). With a list
    ``trace``, every layer (those inside blocks too, in the order they run) is
    appended to it as ``(layer, before, after)``, the states ``(q11, q22, q12,
    Θ11, Θ22, Θ12)`` entering and leaving it in mpmath numbers (whose exponents
    do not overflow).
    """
    with mpmath.workdps(dps):
        layers = lk.parse(spec).layers if isinstance(spec, str) else lk.serial(spec).layers
        state, _ = _run(layers, pair_state(x1, x2), len(x1), trace)
        q11, q22, q12, t11, t22, t12 = (float(v) for v in state)
        return (q11, q12, q22), (t11, t12, t22)


def _run(layers, state, fan_in, trace=None):
    q11, q22, q12, t11, t22, t12 = state
    for layer in layers:
        before = (q11, q22, q12, t11, t22, t12)
        if isinstance(layer, lk.Dense):
            w2, b2 = mpmath.mpf(layer.w_std) ** 2, mpmath.mpf(layer.b_std) ** 2
            if layer.parameterization == "ntk":
                k, b = w2, b2
            else:
                k, b = _fan_in(fan_in), mpmath.mpf(1)
            t11, t22, t12 = k * q11 + b + w2 * t11, k * q22 + b + w2 * t22, k * q12 + b + w2 * t12
            q11, q22, q12 = w2 * q11 + b2, w2 * q22 + b2, w2 * q12 + b2
            fan_in = layer.width
        elif isinstance(layer, lk.LayerNorm):
            eps = mpmath.mpf(layer.eps)
            n1, n2 = q11 + eps, q22 + eps
            root = mpmath.sqrt(n1 * n2)
            q12, t12 = q12 / root, t12 / root
            q11, q22, t11, t22 = q11 / n1, q22 / n2, t11 / n1, t22 / n2
        elif isinstance(layer, lk.Dropout):
            s = 1 / (1 - mpmath.mpf(layer.p))
            q11, q22, t11, t22 = q11 * s, q22 * s, t11 * s, t22 * s
        elif isinstance(layer, lk.Residual):
            a2, b2 = mpmath.mpf(layer.alpha) ** 2, mpmath.mpf(layer.beta) ** 2
            start = (q11, q22, q12, t11, t22, t12)
            out, branch_width = _run(layer.branches[0].layers, start, fan_in, trace)
            fan_in = _sum_width([fan_in, branch_width])
            q11, q22, q12, t11, t22, t12 = (a2 * u + b2 * v for u, v in zip(start, out))
        elif isinstance(layer, (lk.Parallel, lk.Concat)):
            start = (q11, q22, q12, t11, t22, t12)
            if isinstance(layer, lk.Concat):
                weights = [mpmath.mpf(w) for w in (layer.widths or [1] * len(layer.branches))]
                weights = [w / mpmath.fsum(weights) for w in weights]
            else:
                weights = [mpmath.mpf(1)] * len(layer.branches)
            outs = [_run(b.layers, start, fan_in, trace) for b in layer.branches]
            q11, q22, q12, t11, t22, t12 = (
                mpmath.fsum(w * out[0][i] for w, out in zip(weights, outs)) for i in range(6))
            widths = [out[1] for out in outs]
            if isinstance(layer, lk.Concat):
                fan_in = None if None in widths else sum(widths)
            else:
                fan_in = _sum_width(widths)
        else:
            (k12, k11, k22), (d12, d11, d22) = _activation(layer, q11, q22, q12)
            q11, q22, q12 = k11, k22, k12
            t11, t22, t12 = t11 * d11, t22 * d22, t12 * d12
        if trace is not None:
            trace.append((layer, before, (q11, q22, q12, t11, t22, t12)))
    return (q11, q22, q12, t11, t22, t12), fan_in


# ------------------------------------------------------------ activations

_HOMOGENEOUS = {"relu": (0, 1), "abs": (-1, 1), "identity": (1, 1)}
# E[φ(u)²] and E[φ'(u)²] at unit variance, per activation and precision.
_SAME = {}


def _homogeneous(layer):
    """(φ, φ', degree m) in mpmath, or None when φ is not positively homogeneous."""
    name, p = layer.name, layer.params
    if name == "relu_pow":
        k = int(p["k"])
        return (lambda x: x ** k if x > 0 else 0), (lambda x: k * x ** (k - 1) if x > 0 else 0), k
    if name == "step":
        return (lambda x: 1 if x > 0 else 0), (lambda x: 0), 0
    if name == "sign":
        return (lambda x: mpmath.sign(x)), (lambda x: 0), 0
    if name in _HOMOGENEOUS or name in ("leaky_relu", "abrelu"):
        a, b = _HOMOGENEOUS.get(name) or ((p["alpha"], 1) if name == "leaky_relu"
                                          else (p["a"], p["b"]))
        a, b = mpmath.mpf(a), mpmath.mpf(b)
        return (lambda x: a * x if x < 0 else b * x), (lambda x: a if x < 0 else b), 1
    return None


def _angular(f, g, m, theta):
    """E[f(u) g(v)] for unit variances at angle θ, f and g homogeneous of degree m.

    = 2^m m! / (2π) ∫_0^{2π} f(cos α) g(cos(α − θ)) dα, split at the kinks.
    """
    pi = mpmath.pi
    cuts = sorted({mpmath.mpf(0), 2 * pi, pi / 2, 3 * pi / 2,
                   mpmath.fmod(theta + pi / 2, 2 * pi), mpmath.fmod(theta + 3 * pi / 2, 2 * pi)})
    val = mpmath.quad(lambda t: f(mpmath.cos(t)) * g(mpmath.cos(t - theta)), cuts)
    return 2 ** m * mpmath.factorial(m) * val / (2 * pi)


def _activation(layer, q11, q22, q12):
    """((E[φ(u)φ(v)], E[φ(u)²], E[φ(v)²]), (the same for φ'))."""
    homogeneous = _homogeneous(layer)
    if homogeneous is not None:
        f, df, m = homogeneous
        md = max(m - 1, 0)
        zero = mpmath.mpf(0)
        s = mpmath.sqrt(q11 * q22)
        # An input of zero variance is independent of the other (θ = π/2).
        theta = mpmath.acos(max(min(q12 / s, 1), -1)) if s > 0 else mpmath.pi / 2
        key = (layer.name, tuple(sorted(layer.params.items())), mpmath.mp.dps)
        if key not in _SAME:
            _SAME[key] = _angular(f, f, m, zero), _angular(df, df, md, zero)
        same, dsame = _SAME[key]
        cross, dcross = _angular(f, f, m, theta), _angular(df, df, md, theta)

        def diagonal(q):
            # φ(0) = 0 for every homogeneous φ here; φ'(0) = (a + b)/2 for degree 1
            # (the package's convention, Neural Tangents' and JAX's), else 0.
            if q > 0:
                return same * q ** m, dsame * q ** md
            slope = (f(mpmath.mpf(1)) - f(mpmath.mpf(-1))) / 2 if m == 1 else 0
            return mpmath.mpf(0), mpmath.mpf(slope) ** 2

        (k11, d11), (k22, d22) = diagonal(q11), diagonal(q22)
        k12 = cross * s ** m if s > 0 else mpmath.mpf(0)
        return (k12, k11, k22), (dcross * s ** md, d11, d22)
    if getattr(layer, "series", False):
        return _series_same(layer, q11, q22, q12)
    kern = _pair_closed_form(layer) if layer.name == "gelu" else _smooth(layer)
    (k12, d12), (k11, d11), (k22, d22) = kern(q11, q22, q12), kern(q11, q11, q11), \
        kern(q22, q22, q22)
    return (k12, k11, k22), (d12, d11, d22)


# φ and φ' in mpmath of the activations computed by Hermite series.
_SERIES = {
    "tanh": (mpmath.tanh, lambda x: 1 - mpmath.tanh(x) ** 2),
    "softplus": (lambda x: mpmath.log1p(mpmath.exp(x)), lambda x: 1 / (1 + mpmath.exp(-x))),
    "silu": (lambda x: x / (1 + mpmath.exp(-x)),
             lambda x: (1 + mpmath.exp(-x) + x * mpmath.exp(-x)) / (1 + mpmath.exp(-x)) ** 2),
    "elu": (lambda x: x if x > 0 else mpmath.expm1(x), lambda x: 1 if x > 0 else mpmath.exp(x)),
    "softsign": (lambda x: x / (1 + abs(x)), lambda x: 1 / (1 + abs(x)) ** 2),
}
_SERIES["swish"] = _SERIES["silu"]


def _series_same(layer, q11, q22, q12):
    """E[φ(u)φ(v)] and E[φ'(u)φ'(v)] of a Hermite-series activation: for identical
    inputs (u = v) a one-dimensional Gaussian integral by ``mpmath.quad``, at full
    precision; for an input with itself under dropout (equal variances, a smaller
    covariance) a two-dimensional Gauss–Hermite rule (about 1e-11 on tanh, 1e-5 on
    the kinked elu and softsign) — enough to
    follow the variances of single inputs through a network (how large or small
    they get). Pairs of different inputs are not supported.
    """
    f, df = _SERIES[layer.name]
    if q11 == q22 == q12:
        root = mpmath.sqrt(q11)
        k, d = _gauss(lambda z: f(root * z) ** 2), _gauss(lambda z: df(root * z) ** 2)
        return (k, k, k), (d, d, d)
    if q11 != q22 or q11 <= 0:
        raise AssertionError(f"no mpmath reference for {layer} between different inputs")
    root, rho = mpmath.sqrt(q11), q12 / q11
    side = mpmath.sqrt(1 - rho * rho)

    def pair(g):
        return _gauss2(lambda a, b: g(root * a) * g(root * (rho * a + side * b)))
    k, d = pair(f), pair(df)
    same = _series_same(layer, q11, q11, q11)
    return (k, same[0][1], same[0][2]), (d, same[1][1], same[1][2])


def _gauss(h):
    """E[h(z)], z ~ N(0, 1), scaled to order 1 first: quad's tolerance is absolute
    (1e-dps), so at tiny variances (tanh(u)² ~ q = 1e-78) an unscaled integral is
    off by percents."""
    size = max(abs(h(mpmath.mpf(1))), abs(h(mpmath.mpf(-1))), abs(h(mpmath.mpf(0))))
    size = size if size > 0 else mpmath.mpf(1)
    return size * mpmath.quad(lambda z: h(z) / size * mpmath.npdf(z),
                              [-mpmath.inf, 0, mpmath.inf])


def _gauss2(h, nodes=96):
    """E[h(a, b)], a, b independent N(0, 1), by the product Gauss–Hermite rule of
    ``nodes`` points a side (an mpmath 2-D quad takes about a minute per integral;
    this rule half a second)."""
    z, w = np.polynomial.hermite.hermgauss(nodes)
    z = [mpmath.sqrt(2) * mpmath.mpf(float(v)) for v in z]
    w = [mpmath.mpf(float(v)) / mpmath.sqrt(mpmath.pi) for v in w]
    return mpmath.fsum(w[i] * w[j] * h(z[i], z[j]) for i in range(nodes) for j in range(nodes))


def _smooth(layer):
    """(x, y, z) = (q11, q22, q12) -> (E[φφ], E[φ'φ']) by a textbook closed form."""
    mp, name, p = mpmath, layer.name, layer.params
    if name in ("erf", "sigmoid_like"):
        a, b, c = ((mp.mpf(p["a"]), mp.mpf(p["b"]), mp.mpf(p["c"])) if name == "erf" else
                   (mp.mpf(0.5), 1 / mp.mpf(2.4020563531719796), mp.mpf(0.5)))

        def kern(x, y, z):
            t = 2 * b * b
            # (1 + t x)(1 + t y) − (t z)², without its cancellation at large t x
            det = 1 + t * (x + y) + t * t * (x * y - z * z)
            return (2 * a * a / mp.pi * mp.asin(t * z / mp.sqrt((1 + t * x) * (1 + t * y)))
                    + c * c, 4 * a * a * b * b / mp.pi / mp.sqrt(det))
        return kern
    if name == "exp":
        a, b = mp.mpf(p["a"]), mp.mpf(p["b"])

        def kern(x, y, z):
            val = a * a * _exp(b * b * (x + y + 2 * z) / 2)
            return val, b * b * val
        return kern
    if name == "gaussian":
        a, b = mp.mpf(p["a"]), mp.mpf(p["b"])

        def kern(x, y, z):
            det = 1 - 2 * b * (x + y) + 4 * b * b * (x * y - z * z)
            if det <= 0:
                raise ValueError("gaussian: E[φ(u)φ(v)] is infinite (1 - 4 b q <= 0)")
            return a * a / mp.sqrt(det), 4 * a * a * b * b * z / det ** mp.mpf(1.5)
        return kern
    if name in ("sin", "cos", "rbf"):
        if name == "rbf":
            a, b, c = mp.sqrt(2), mp.sqrt(2 * mp.mpf(p["gamma"])), mp.pi / 4
        else:
            a, b, c = mp.mpf(p["a"]), mp.mpf(p["b"]), mp.mpf(p["c"])
            c = c + mp.pi / 2 if name == "cos" else c

        def kern(x, y, z):
            minus = _exp(-b * b * (x + y - 2 * z) / 2)
            plus = mp.cos(2 * c) * _exp(-b * b * (x + y + 2 * z) / 2)
            return a * a / 2 * (minus - plus), a * a * b * b / 2 * (minus + plus)
        return kern
    raise AssertionError(f"no mpmath reference for {layer}")


def _exp(x):
    """mpmath's exp, but exactly 0 below e^(-10^5) and an error above e^(10^5):
    no float comes near either, and mpmath would spend minutes and gigabytes on
    arguments like 10^25."""
    if x < -10 ** 5:
        return mpmath.mpf(0)
    if x > 10 ** 5:
        raise ValueError(f"exp({mpmath.nstr(x, 3)}) is infinite to any float precision")
    return mpmath.exp(x)


# ------------------------------------------------------------ images and sequences


def spatial_kernel_mp(spec, x1, x2, dps=30, trace=None):
    """K and Θ of a network on two images (H, W, C) or sequences (L, C), in mpmath.

    The whole joint covariance of the positions of both inputs is carried
    (2P × 2P, NNGP and NTK), layer by layer from the definitions: the input
    covariance x_p · x'_q / C; a convolution averages the covariances of the
    same tap on both sides (positions outside the image are zeros; "circular"
    wraps; strides subsample), with the bias added and Θ ← K_new + σ_w² mean Θ
    (or n mean K + 1 + σ_w² mean Θ, n = k_y k_x C, "standard"); pooling
    averages over windows; flatten keeps the mean of the same-position
    covariances; activations act on every entry with closed forms (the ReLU
    family by the Cho–Saul formula of order 1, the others as in ``_smooth``);
    dropout scales the variance of each unit with itself (same input, same
    position). Returns ((K11, K12, K22), (Θ11, Θ12, Θ22)) as floats. With a
    list ``trace``, every layer (inside blocks too) is appended to it as
    ``(layer, (K, Θ) before, (K, Θ) after)``, K and Θ the joint matrices over
    both inputs' positions (first x1's, then x2's) in mpmath numbers.
    """
    import numpy as np

    with mpmath.workdps(dps):
        x1 = np.asarray(x1, dtype=float)
        x2 = np.asarray(x2, dtype=float)
        sequence = x1.ndim == 2
        if sequence:
            x1, x2 = x1[None], x2[None]
        h, w, ch = x1.shape
        pts = [(y, xx) for y in range(h) for xx in range(w)]
        vecs = [[mpmath.mpf(float(v)) for v in x[y, xx]] for x in (x1, x2) for y, xx in pts]
        n = len(vecs)
        k = [[mpmath.fsum(a * b for a, b in zip(vecs[u], vecs[v])) / ch for v in range(n)]
             for u in range(n)]
        t = [[mpmath.mpf(0)] * n for _ in range(n)]
        state = {"k": k, "t": t, "shape": (h, w), "fan_in": ch, "vector": False,
                 "sequence": sequence}
        state["trace"] = trace
        for layer in (lk.parse(spec) if isinstance(spec, str) else lk.serial(spec)).layers:
            state = _spatial_layer(layer, state)
        k, t = state["k"], state["t"]
        return ((float(k[0][0]), float(k[0][1]), float(k[1][1])),
                (float(t[0][0]), float(t[0][1]), float(t[1][1])))


def _axis(size, k, stride, padding):
    """Input index (or None for a zero) of every output and tap along one axis."""
    if padding == "valid":
        outs = range(0, size - k + 1, stride)
        return [[o + d for d in range(k)] for o in outs]
    n_out = -(-size // stride)
    total = max((n_out - 1) * stride + k - size, 0)
    before = total // 2
    rows = []
    for o in range(n_out):
        row = []
        for d in range(k):
            idx = o * stride + d - before
            if padding == "circular":
                row.append(idx % size)
            else:
                row.append(idx if 0 <= idx < size else None)
        rows.append(row)
    return rows


def _sizes(value, sequence):
    """(k_y, k_x): sequences have one axis, images two (even one row high)."""
    if isinstance(value, tuple):
        return (int(value[0]), int(value[1])) if len(value) == 2 else (1, int(value[0]))
    return (1, int(value)) if sequence else (int(value), int(value))


def _windows(shape, k, stride, padding):
    """For each output position, the list of input positions (None for a zero)."""
    ay = _axis(shape[0], k[0], stride[0], padding) if shape[0] > 1 or k[0] > 1 else [[0]]
    ax = _axis(shape[1], k[1], stride[1], padding)
    out = []
    for ry in ay:
        for rx in ax:
            out.append([None if iy is None or ix is None else iy * shape[1] + ix
                        for iy in ry for ix in rx])
    return out, (len(ay), len(ax))


def _spatial_layer(layer, state):
    out = _spatial_step(layer, state)
    out["trace"] = state["trace"]
    if state["trace"] is not None:
        state["trace"].append((layer, (state["k"], state["t"]), (out["k"], out["t"])))
    return out


def _spatial_step(layer, state):
    k, t, shape = state["k"], state["t"], state["shape"]
    n = len(k)
    per = n // 2
    if isinstance(layer, (lk.Conv, lk.AvgPool)):
        size = _sizes(layer.k, state["sequence"])
        if isinstance(layer, lk.Conv):
            stride = _sizes(layer.stride, state["sequence"])
        else:
            stride = size if layer.stride is None else _sizes(layer.stride, state["sequence"])
        wins, out_shape = _windows(shape, size, stride, layer.padding)
        m = len(wins)
        index = [(side, o) for side in range(2) for o in range(m)]

        def src(side, pos):
            return None if pos is None else side * per + pos

        def avg(mat, u, v, same_tap):
            (su, ou), (sv, ov) = index[u], index[v]
            terms = []
            if same_tap:
                for a, b in zip(wins[ou], wins[ov]):
                    a, b = src(su, a), src(sv, b)
                    terms.append(mat[a][b] if a is not None and b is not None else 0)
                return mpmath.fsum(terms) / len(wins[ou])
            for a in wins[ou]:
                for b in wins[ov]:
                    a2, b2 = src(su, a), src(sv, b)
                    terms.append(mat[a2][b2] if a2 is not None and b2 is not None else 0)
            return mpmath.fsum(terms) / (len(wins[ou]) * len(wins[ov]))

        conv = isinstance(layer, lk.Conv)
        mk = [[avg(k, u, v, conv) for v in range(2 * m)] for u in range(2 * m)]
        mt = [[avg(t, u, v, conv) for v in range(2 * m)] for u in range(2 * m)]
        if conv:
            w2, b2 = mpmath.mpf(layer.w_std) ** 2, mpmath.mpf(layer.b_std) ** 2
            if layer.parameterization == "ntk":
                kk, bb = w2, b2
            else:
                kk, bb = size[0] * size[1] * _fan_in(state["fan_in"]), mpmath.mpf(1)
            t = [[kk * mk[u][v] + bb + w2 * mt[u][v] for v in range(2 * m)]
                 for u in range(2 * m)]
            k = [[w2 * mk[u][v] + b2 for v in range(2 * m)] for u in range(2 * m)]
            fan_in = layer.width
        else:
            k, t, fan_in = mk, mt, state["fan_in"]
        return {"k": k, "t": t, "shape": out_shape, "fan_in": fan_in, "vector": False,
                "sequence": state["sequence"]}
    if isinstance(layer, (lk.GlobalAvgPool, lk.Flatten)):
        out_k = [[0, 0], [0, 0]]
        out_t = [[0, 0], [0, 0]]
        for a in range(2):
            for b in range(2):
                if isinstance(layer, lk.GlobalAvgPool):
                    cells = [(a * per + p, b * per + q) for p in range(per) for q in range(per)]
                else:
                    cells = [(a * per + p, b * per + p) for p in range(per)]
                out_k[a][b] = mpmath.fsum(k[u][v] for u, v in cells) / len(cells)
                out_t[a][b] = mpmath.fsum(t[u][v] for u, v in cells) / len(cells)
        fan_in = state["fan_in"]
        if fan_in is not None and isinstance(layer, lk.Flatten):
            fan_in *= per
        return {"k": out_k, "t": out_t, "shape": (1, 1), "fan_in": fan_in, "vector": True,
                "sequence": state["sequence"]}
    if isinstance(layer, lk.Dense):
        w2, b2 = mpmath.mpf(layer.w_std) ** 2, mpmath.mpf(layer.b_std) ** 2
        kk, bb = (w2, b2) if layer.parameterization == "ntk" else \
            (_fan_in(state["fan_in"]), mpmath.mpf(1))
        t = [[kk * k[u][v] + bb + w2 * t[u][v] for v in range(n)] for u in range(n)]
        k = [[w2 * k[u][v] + b2 for v in range(n)] for u in range(n)]
        return {**state, "k": k, "t": t, "fan_in": layer.width}
    if isinstance(layer, lk.LayerNorm):
        eps = mpmath.mpf(layer.eps)
        d = [k[u][u] + eps for u in range(n)]
        k = [[k[u][v] / mpmath.sqrt(d[u] * d[v]) for v in range(n)] for u in range(n)]
        t = [[t[u][v] / mpmath.sqrt(d[u] * d[v]) for v in range(n)] for u in range(n)]
        return {**state, "k": k, "t": t}
    if isinstance(layer, (lk.Residual, lk.Parallel)):
        if isinstance(layer, lk.Residual):
            out = state
            for inner in layer.branches[0].layers:
                out = _spatial_layer(inner, out)
            a2, b2 = mpmath.mpf(layer.alpha) ** 2, mpmath.mpf(layer.beta) ** 2
            parts = [(a2, state), (b2, out)]
        else:
            parts = []
            for branch in layer.branches:
                out = state
                for inner in branch.layers:
                    out = _spatial_layer(inner, out)
                parts.append((mpmath.mpf(1), out))
        size = len(parts[0][1]["k"])
        k = [[mpmath.fsum(wt * p["k"][u][v] for wt, p in parts) for v in range(size)]
             for u in range(size)]
        t = [[mpmath.fsum(wt * p["t"][u][v] for wt, p in parts) for v in range(size)]
             for u in range(size)]
        return {**parts[-1][1], "k": k, "t": t,
                "fan_in": _sum_width([p["fan_in"] for _, p in parts])}
    if isinstance(layer, lk.Dropout):
        s = 1 / (1 - mpmath.mpf(layer.p))
        k = [[k[u][v] * (s if u == v else 1) for v in range(n)] for u in range(n)]
        t = [[t[u][v] * (s if u == v else 1) for v in range(n)] for u in range(n)]
        return {**state, "k": k, "t": t}
    # an activation, entry by entry
    kern = _pair_closed_form(layer)
    nk = [[None] * n for _ in range(n)]
    nt = [[None] * n for _ in range(n)]
    for u in range(n):
        for v in range(n):
            val, der = kern(k[u][u], k[v][v], k[u][v])
            nk[u][v] = val
            nt[u][v] = t[u][v] * der
    return {**state, "k": nk, "t": nt}


def _pair_closed_form(layer):
    """(q11, q22, q12) -> (E[φ(u)φ(v)], E[φ'(u)φ'(v)]) in closed form."""
    homogeneous = {"relu": (0, 1), "abs": (-1, 1), "identity": (1, 1)}
    name, p = layer.name, layer.params
    if name in homogeneous or name in ("leaky_relu", "abrelu"):
        a, b = homogeneous.get(name) or ((p["alpha"], 1) if name == "leaky_relu"
                                         else (p["a"], p["b"]))
        a, b = mpmath.mpf(a), mpmath.mpf(b)

        def kern(x, y, z):
            s = mpmath.sqrt(x * y)
            th = mpmath.acos(max(min(z / s, 1), -1)) if s > 0 else mpmath.pi / 2
            j1 = mpmath.sin(th) + (mpmath.pi - th) * mpmath.cos(th)  # Cho–Saul J_1(θ)
            j1_sup = mpmath.sin(th) - th * mpmath.cos(th)            # J_1(π − θ)
            val = s * ((a * a + b * b) * j1 - 2 * a * b * j1_sup) / (2 * mpmath.pi)
            der = ((a * a + b * b) * (mpmath.pi - th) + 2 * a * b * th) / (2 * mpmath.pi)
            return val, der
        return kern
    if name in ("step", "sign"):
        def kern(x, y, z):
            s = mpmath.sqrt(x * y)
            if s == 0:
                return mpmath.mpf(0), mpmath.mpf(0)
            th = mpmath.acos(max(min(z / s, 1), -1))
            val = (mpmath.pi - th) / (2 * mpmath.pi) if name == "step" else 1 - 2 * th / mpmath.pi
            return val, mpmath.mpf(0)
        return kern
    if name == "gelu":
        def kern(x, y, z):
            # Large variances cancel in R and in the derivative: more digits.
            extra = 2 * int(mpmath.log10(max(abs(x), abs(y), 1))) + 10
            with mpmath.workdps(mpmath.mp.dps + extra):
                val, der = gelu(x, y, z)
            return +val, +der

        def gelu(x, y, z):
            # x Φ(x): E = z/4 + z A/(2π) + (x y R + z²)/(2π P Q √R) with P = 1 + x,
            # Q = 1 + y, R = P Q − z², A = asin(z/√(PQ)) (Stein's lemma on
            # E[u 1{u ≥ g}] forms); E' by differentiating in z (Price).
            pp, qq = 1 + x, 1 + y
            r = 1 + x + y + (x * y - z * z)
            ang = mpmath.asin(z / mpmath.sqrt(pp * qq))
            val = z / 4 + z * ang / (2 * mpmath.pi) + (x * y * r + z * z) / (
                2 * mpmath.pi * pp * qq * mpmath.sqrt(r))
            der = mpmath.diff(lambda zz: zz / 4 + zz * mpmath.asin(zz / mpmath.sqrt(pp * qq)) /
                              (2 * mpmath.pi) + (x * y * (1 + x + y + (x * y - zz * zz)) + zz * zz) /
                              (2 * mpmath.pi * pp * qq * mpmath.sqrt(1 + x + y + (x * y - zz * zz))), z)
            return val, der
        return kern
    if name == "relu_pow":
        f, df, m = _homogeneous(layer)

        def kern(x, y, z):
            # by quadrature, as for vectors (slow: one integral per entry)
            s = mpmath.sqrt(x * y)
            if s == 0:
                return mpmath.mpf(0), mpmath.mpf(0)
            th = mpmath.acos(max(min(z / s, 1), -1))
            return _angular(f, f, m, th) * s ** m, _angular(df, df, m - 1, th) * s ** (m - 1)
        return kern
    smooth = _smooth(layer)
    return smooth
