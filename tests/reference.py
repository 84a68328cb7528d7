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

import limitkernel as lk

__all__ = ["kernel_mp", "pair_state"]


def pair_state(x1, x2):
    """(q11, q22, q12, Θ11, Θ22, Θ12) of the input layer, in mpmath."""
    x1 = [mpmath.mpf(float(v)) for v in x1]
    x2 = [mpmath.mpf(float(v)) for v in x2]
    d = len(x1)
    zero = mpmath.mpf(0)
    return (mpmath.fsum(u * u for u in x1) / d, mpmath.fsum(v * v for v in x2) / d,
            mpmath.fsum(u * v for u, v in zip(x1, x2)) / d, zero, zero, zero)


def kernel_mp(spec, x1, x2, dps=40):
    """K and Θ of ``spec`` for the pair (x1, x2), at ``dps`` digits.

    Returns ``((K11, K12, K22), (Θ11, Θ12, Θ22))`` as floats; x1 and x2 are
    different examples (dropout scales only the diagonal terms).
    """
    with mpmath.workdps(dps):
        layers = lk.parse(spec).layers if isinstance(spec, str) else lk.serial(spec).layers
        state, _ = _run(layers, pair_state(x1, x2), len(x1))
        q11, q22, q12, t11, t22, t12 = (float(v) for v in state)
        return (q11, q12, q22), (t11, t12, t22)


def _run(layers, state, fan_in):
    q11, q22, q12, t11, t22, t12 = state
    for layer in layers:
        if isinstance(layer, lk.Dense):
            w2, b2 = mpmath.mpf(layer.w_std) ** 2, mpmath.mpf(layer.b_std) ** 2
            if layer.parameterization == "ntk":
                k, b = w2, b2
            else:
                k, b = mpmath.mpf(fan_in), mpmath.mpf(1)
            t11, t22, t12 = k * q11 + b + w2 * t11, k * q22 + b + w2 * t22, k * q12 + b + w2 * t12
            q11, q22, q12 = w2 * q11 + b2, w2 * q22 + b2, w2 * q12 + b2
            fan_in = layer.width if layer.width is not None else fan_in
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
            out, _ = _run(layer.branches[0].layers, start, fan_in)
            q11, q22, q12, t11, t22, t12 = (a2 * u + b2 * v for u, v in zip(start, out))
        elif isinstance(layer, (lk.Parallel, lk.Concat)):
            start = (q11, q22, q12, t11, t22, t12)
            if isinstance(layer, lk.Concat):
                weights = [mpmath.mpf(w) for w in (layer.widths or [1] * len(layer.branches))]
                weights = [w / mpmath.fsum(weights) for w in weights]
            else:
                weights = [mpmath.mpf(1)] * len(layer.branches)
            outs = [_run(b.layers, start, fan_in) for b in layer.branches]
            q11, q22, q12, t11, t22, t12 = (
                mpmath.fsum(w * out[0][i] for w, out in zip(weights, outs)) for i in range(6))
            fan_in = (sum(out[1] for out in outs) if isinstance(layer, lk.Concat)
                      else outs[0][1])
        else:
            (k12, k11, k22), (d12, d11, d22) = _activation(layer, q11, q22, q12)
            q11, q22, q12 = k11, k22, k12
            t11, t22, t12 = t11 * d11, t22 * d22, t12 * d12
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
    kern = _smooth(layer)
    (k12, d12), (k11, d11), (k22, d22) = kern(q11, q22, q12), kern(q11, q11, q11), \
        kern(q22, q22, q22)
    return (k12, k11, k22), (d12, d11, d22)


def _smooth(layer):
    """(x, y, z) = (q11, q22, q12) -> (E[φφ], E[φ'φ']) by a textbook closed form."""
    mp, name, p = mpmath, layer.name, layer.params
    if name in ("erf", "sigmoid_like"):
        a, b, c = ((mp.mpf(p["a"]), mp.mpf(p["b"]), mp.mpf(p["c"])) if name == "erf" else
                   (mp.mpf(0.5), 1 / mp.mpf(2.4020563531719796), mp.mpf(0.5)))

        def kern(x, y, z):
            t = 2 * b * b
            det = (1 + t * x) * (1 + t * y) - (t * z) ** 2
            return (2 * a * a / mp.pi * mp.asin(t * z / mp.sqrt((1 + t * x) * (1 + t * y)))
                    + c * c, 4 * a * a * b * b / mp.pi / mp.sqrt(det))
        return kern
    if name == "exp":
        a, b = mp.mpf(p["a"]), mp.mpf(p["b"])

        def kern(x, y, z):
            val = a * a * mp.exp(b * b * (x + y + 2 * z) / 2)
            return val, b * b * val
        return kern
    if name == "gaussian":
        a, b = mp.mpf(p["a"]), mp.mpf(p["b"])

        def kern(x, y, z):
            det = (1 - 2 * b * x) * (1 - 2 * b * y) - 4 * b * b * z * z
            return a * a / mp.sqrt(det), 4 * a * a * b * b * z / det ** mp.mpf(1.5)
        return kern
    if name in ("sin", "cos", "rbf"):
        if name == "rbf":
            a, b, c = mp.sqrt(2), mp.sqrt(2 * mp.mpf(p["gamma"])), mp.pi / 4
        else:
            a, b, c = mp.mpf(p["a"]), mp.mpf(p["b"]), mp.mpf(p["c"])
            c = c + mp.pi / 2 if name == "cos" else c

        def kern(x, y, z):
            minus = mp.exp(-b * b * (x + y - 2 * z) / 2)
            plus = mp.cos(2 * c) * mp.exp(-b * b * (x + y + 2 * z) / 2)
            return a * a / 2 * (minus - plus), a * a * b * b / 2 * (minus + plus)
        return kern
    raise AssertionError(f"no mpmath reference for {layer}")
