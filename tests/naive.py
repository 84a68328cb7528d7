"""Slow, obviously correct references for the activation kernels (no package code).

Everything here is written from the definitions, not from the closed forms in
:mod:`limitkernel._kernels`:

* the activations and their derivatives, straight from their formulas
  (``ACTIVATIONS``);
* E[f(u) g(v)] for (u, v) ~ N(0, [[q11, q12], [q12, q22]]) by two-dimensional
  quadrature (:func:`expect`). In polar coordinates of the standard normal pair
  (z1, z2) = r (cos α, sin α), u = √q11 r cos α and v = √q22 r cos(α − θ) with
  θ = arccos ρ. The only kinks of our non-smooth activations are at 0, so in
  these coordinates they lie on rays (fixed α): the α-range is split there and
  each arc gets Gauss–Legendre nodes, and so does the radial integral
  ∫_0^R r e^{−r²/2} F(r) dr, whose integrand is smooth in r for every α
  (R = 14 leaves out less than e^{−98} times a polynomial). Both converge
  geometrically;
* the layer-by-layer network recursion on one pair of inputs
  (:func:`network_kernel`), using those expectations, in float64.

The high-precision recursion (nearly identical inputs, where float64 cannot
even represent the correlation 1 − ρ accurately through a layer) is
:mod:`reference`, in mpmath.
"""

import itertools
import math

import numpy as np
from scipy import special

SIGMOID_LIKE_SCALE = 2.4020563531719796


# ------------------------------------------------------------ activations


def _abrelu(a, b):
    def phi(x):
        return a * np.minimum(x, 0.0) + b * np.maximum(x, 0.0)

    def dphi(x):
        # (a + b)/2 at 0: the mean of the one-sided slopes (Neural Tangents).
        return np.where(x < 0, a, np.where(x > 0, b, 0.5 * (a + b)))

    return phi, dphi, 1


def _relu_pow(k):
    k = int(k)

    def phi(x):
        return np.maximum(x, 0.0) ** k

    def dphi(x):
        return k * np.maximum(x, 0.0) ** (k - 1)

    return phi, dphi, k


def _step():
    return (lambda x: (x > 0).astype(float)), (lambda x: np.zeros_like(x)), 0


def _sign():
    return (lambda x: np.sign(x)), (lambda x: np.zeros_like(x)), 0


def _erf(a=1.0, b=1.0, c=0.0):
    def phi(x):
        return a * special.erf(b * x) + c

    def dphi(x):
        return a * b * 2.0 / math.sqrt(math.pi) * np.exp(-(b * x) ** 2)

    return phi, dphi, None


def _gelu():
    def cdf(x):
        return 0.5 * special.erfc(-x / math.sqrt(2.0))

    def phi(x):
        return x * cdf(x)

    def dphi(x):
        return cdf(x) + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)

    return phi, dphi, None


def _sin(a=1.0, b=1.0, c=0.0):
    return (lambda x: a * np.sin(b * x + c)), (lambda x: a * b * np.cos(b * x + c)), None


def _cos(a=1.0, b=1.0, c=0.0):
    return (lambda x: a * np.cos(b * x + c)), (lambda x: -a * b * np.sin(b * x + c)), None


def _rbf(gamma=1.0):
    w = math.sqrt(2.0 * gamma)
    return _sin(math.sqrt(2.0), w, math.pi / 4)


def _gaussian(a=1.0, b=-1.0):
    def phi(x):
        return a * np.exp(b * x * x)

    def dphi(x):
        return 2.0 * a * b * x * np.exp(b * x * x)

    return phi, dphi, None


def _exp(a=1.0, b=1.0):
    return (lambda x: a * np.exp(b * x)), (lambda x: a * b * np.exp(b * x)), None


# name -> constructor(**params) -> (φ, φ', degree of positive homogeneity or None)
ACTIVATIONS = {
    "relu": lambda: _abrelu(0.0, 1.0),
    "leaky_relu": lambda alpha=0.01: _abrelu(alpha, 1.0),
    "abrelu": lambda a=0.0, b=1.0: _abrelu(a, b),
    "abs": lambda: _abrelu(-1.0, 1.0),
    "identity": lambda: _abrelu(1.0, 1.0),
    "step": _step,
    "sign": _sign,
    "relu_pow": lambda k=2: _relu_pow(k),
    "erf": _erf,
    "sigmoid_like": lambda: _erf(0.5, 1.0 / SIGMOID_LIKE_SCALE, 0.5),
    "gelu": _gelu,
    "sin": _sin,
    "cos": _cos,
    "rbf": _rbf,
    "gaussian": _gaussian,
    "exp": _exp,
}


def activation(name, **params):
    """(φ, φ', degree) of the activation ``name`` (degree None if not homogeneous)."""
    return ACTIVATIONS[name](**params)


# ------------------------------------------------------------ quadrature


def expect(f, g, q11, q22, theta, n_angle=48, n_radial=160, radius=14.0):
    """E[f(u) g(v)], (u, v) ~ N(0, [[q11, q12], [q12, q22]]), q12 = √(q11 q22) cos θ.

    Polar quadrature (module docstring): Gauss–Legendre in α on [0, 2π) split at
    the rays u = 0 and v = 0, and Gauss–Legendre in r on [0, ``radius``] for
    ∫ r e^{−r²/2} F dr (the tail beyond r = 14 weighs below e^{−98} r^{2k}).
    """
    two_pi = 2.0 * math.pi
    cuts = {0.0, two_pi, 0.5 * math.pi, 1.5 * math.pi,
            math.fmod(theta + 0.5 * math.pi, two_pi), math.fmod(theta + 1.5 * math.pi, two_pi)}
    breaks = sorted(cuts)
    x_leg, w_leg = special.roots_legendre(n_angle)
    alphas, a_weights = [], []
    for lo, hi in itertools.pairwise(breaks):
        if hi - lo > 0:
            alphas.append(0.5 * (hi - lo) * x_leg + 0.5 * (hi + lo))
            a_weights.append(0.5 * (hi - lo) * w_leg)
    alpha = np.concatenate(alphas)[:, None]
    a_w = np.concatenate(a_weights)[:, None]
    x_r, w_r = special.roots_legendre(n_radial)
    r = 0.5 * radius * (x_r + 1.0)
    r_w = 0.5 * radius * w_r * r * np.exp(-0.5 * r * r)
    r = r[None, :]
    cu = math.sqrt(q11) * np.cos(alpha)
    cv = math.sqrt(q22) * np.cos(alpha - theta)
    total = f(r * cu) * g(r * cv)
    return float(np.sum(a_w * (total @ r_w[:, None]))) / two_pi


def layer(name, params, q11, q22, theta, **quad):
    """One activation on a pair: E[φφ], E[φ'φ'] and the two new variances and E[φ'²]."""
    phi, dphi, _ = activation(name, **params)
    return (expect(phi, phi, q11, q22, theta, **quad),
            expect(dphi, dphi, q11, q22, theta, **quad),
            expect(phi, phi, q11, q11, 0.0, **quad),
            expect(phi, phi, q22, q22, 0.0, **quad),
            expect(dphi, dphi, q11, q11, 0.0, **quad),
            expect(dphi, dphi, q22, q22, 0.0, **quad))


def input_angle(x1, x2):
    """The angle between x1 and x2, accurate also for nearly (anti)parallel inputs."""
    n1, n2 = np.linalg.norm(x1), np.linalg.norm(x2)
    if n1 == 0 or n2 == 0:
        return 0.5 * math.pi
    u, v = x1 / n1, x2 / n2
    return 2.0 * math.atan2(np.linalg.norm(u - v), np.linalg.norm(u + v))


def network_kernel(layers, x1, x2, **quad):
    """K and Θ of a network for one input pair, layer by layer (the README's conventions).

    ``layers`` is a list of ``("dense", w_std, b_std)`` and ``(name, params)``
    items, NTK parameterisation. Returns ((K11, K12, K22), (Θ11, Θ12, Θ22)).
    """
    x1, x2 = np.asarray(x1, float), np.asarray(x2, float)
    d = x1.shape[0]
    q11, q22, q12 = x1 @ x1 / d, x2 @ x2 / d, x1 @ x2 / d
    theta = input_angle(x1, x2)
    t11 = t12 = t22 = 0.0
    for item in layers:
        if item[0] == "dense":
            _, w, b = item
            w2, b2 = w * w, b * b
            t11, t12, t22 = (w2 * q11 + b2 + w2 * t11, w2 * q12 + b2 + w2 * t12,
                             w2 * q22 + b2 + w2 * t22)
            keep = b2 == 0.0  # a dense layer without bias keeps the angle
            q11, q12, q22 = w2 * q11 + b2, w2 * q12 + b2, w2 * q22 + b2
        else:
            name, params = item
            k12, kd12, k11, k22, kd11, kd22 = layer(name, params, q11, q22, theta, **quad)
            q11, q12, q22 = k11, k12, k22
            t11, t12, t22 = t11 * kd11, t12 * kd12, t22 * kd22
            keep = False
        if not keep:
            nrm = math.sqrt(q11 * q22)
            theta = math.acos(min(max(q12 / nrm, -1.0), 1.0)) if nrm > 0 else 0.5 * math.pi
    return (q11, q12, q22), (t11, t12, t22)


# ------------------------------------------------------------ specs


def spec_text(layers):
    """The limitkernel text form of ``layers`` (as in :func:`network_kernel`)."""
    parts = []
    for item in layers:
        if item[0] == "dense":
            parts.append(f"dense(w_std={item[1]!r}, b_std={item[2]!r})")
        else:
            name, params = item
            args = ", ".join(f"{k}={v!r}" for k, v in params.items())
            parts.append(f"{name}({args})" if args else name)
    return ", ".join(parts)


def net_params(net):
    """Every dense layer's (w, b) arrays of a finite network, in order."""
    return [p for layer in net.dense for p in (layer.w, layer.b)]


def _central_differences(arrays, fn, h):
    """(fn(θ + h e_i) − fn(θ − h e_i)) / 2h for every entry θ_i of ``arrays``, in order.

    The arrays are perturbed in place and restored: truncation error h²·f‴/6 ~
    1e-12 and rounding ε/h ~ 1e-10 for h = 1e-6, so agreement to about 1e-8
    relative is expected where no kink is crossed.
    """
    for arr in arrays:
        flat = arr.reshape(-1)
        for i in range(flat.size):
            old = flat[i]
            flat[i] = old + h
            plus = fn()
            flat[i] = old - h
            minus = fn()
            flat[i] = old
            yield (plus - minus) / (2 * h)


def fd_jacobian(net, x, h=1e-6, **forward_kwargs):
    """(N·c, P) Jacobian of a finite network's outputs by central differences.

    ``forward_kwargs`` go to ``net.forward`` (e.g. a fixed ``dropout_seed``).
    """
    cols = _central_differences(net_params(net), lambda: net.forward(x, **forward_kwargs), h)
    return np.array([np.ravel(col) for col in cols]).T


def fd_gradient(net, loss, h=1e-6):
    """Gradient of ``loss()`` with respect to each of :func:`net_params`, by central differences."""
    arrays = net_params(net)
    flat = np.fromiter(_central_differences(arrays, loss, h), dtype=float)
    grads, start = [], 0
    for arr in arrays:
        grads.append(flat[start:start + arr.size].reshape(arr.shape))
        start += arr.size
    return grads
