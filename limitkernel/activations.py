"""Activation registry: closed forms and the numerical (Hermite) fallback.

Every activation is a layer that maps the covariance of its input pre-activations
to that of its outputs. Closed forms are evaluated entry by entry in
:mod:`limitkernel._kernels`; here each activation declares

* ``forward(x)`` and ``derivative(x)`` on numpy arrays (finite networks, tests),
* ``diag(q)`` -> ``(E[φ(u)²], E[φ'(u)²])`` for u ~ N(0, q), vectorised over q,
* ``code()`` -> ``(opcode, p0, p1, p2)`` for the fused Gram pass.

Activations without a closed form are :class:`Numerical`: their Gram entries
come from the Mehler expansion E[φ(u)φ(v)] = Σ_k a_k(q11) a_k(q22) ρ^k, with the
normalised Hermite coefficients a_k computed once per input by Gauss–Hermite
quadrature and the series truncated where a proven bound on its tail falls
below ``tol`` (see :func:`hermite_coefficients`).
"""

import math

import numpy as np
from scipy import special

from . import _kernels as K
from .spec import Layer, SpecError

__all__ = [
    "Activation",
    "Numerical",
    "REGISTRY",
    "get_activation",
    "hermite_coefficients",
]

REGISTRY = {}


def _register(cls):
    REGISTRY[cls.name] = cls
    return cls


class Activation(Layer):
    """Base class of element-wise nonlinearities."""

    method = ""

    def forward(self, x):
        raise NotImplementedError

    def derivative(self, x):
        raise NotImplementedError

    def diag(self, q):
        raise NotImplementedError

    def code(self):
        raise NotImplementedError


def get_activation(name, **params):
    """The activation called ``name`` (see ``limitkernel activations``)."""
    from .spec import layer_from_name

    layer = layer_from_name(name, params)
    if not isinstance(layer, Activation):
        raise SpecError(f"{name!r} is not an activation")
    return layer


# ------------------------------------------------------------ ReLU family


@_register
class ABRelu(Activation):
    """φ(x) = a·x for x < 0 and b·x for x ≥ 0 (arc-cosine kernel of order 1)."""

    name = "abrelu"
    defaults = {"a": 0.0, "b": 1.0}
    method = "closed form (arc-cosine, order 1)"

    def __init__(self, **params):
        super().__init__(**params)
        a, b = self._ab()
        if a == 0 and b == 0:
            raise SpecError(f"{self.name}: a and b are both zero; the layer outputs 0")

    def _ab(self):
        return self.params["a"], self.params["b"]

    def forward(self, x):
        a, b = self._ab()
        return np.where(x < 0, a * x, b * x)

    def derivative(self, x):
        a, b = self._ab()
        return np.where(x < 0, a, b) * np.ones_like(x)

    def diag(self, q):
        a, b = self._ab()
        half = 0.5 * (a * a + b * b)
        return half * q, np.full_like(q, half)

    def code(self):
        a, b = self._ab()
        return K.OP_ABRELU, a, b, 0.0


@_register
class Relu(ABRelu):
    """φ(x) = max(x, 0)."""

    name = "relu"
    defaults = {}

    def _ab(self):
        return 0.0, 1.0


@_register
class LeakyRelu(ABRelu):
    """φ(x) = x for x ≥ 0, alpha·x otherwise."""

    name = "leaky_relu"
    defaults = {"alpha": 0.01}

    def _ab(self):
        return self.params["alpha"], 1.0


@_register
class Abs(ABRelu):
    """φ(x) = |x|."""

    name = "abs"
    defaults = {}

    def _ab(self):
        return -1.0, 1.0


@_register
class Identity(ABRelu):
    """φ(x) = x."""

    name = "identity"
    defaults = {}
    method = "closed form (exact)"

    def _ab(self):
        return 1.0, 1.0


@_register
class Step(Activation):
    """Heaviside step, φ(x) = 1 for x > 0 else 0; φ' = 0 almost everywhere."""

    name = "step"
    defaults = {}
    method = "closed form (arc-cosine, order 0)"

    def forward(self, x):
        return (x > 0).astype(float)

    def derivative(self, x):
        return np.zeros_like(x, dtype=float)

    def diag(self, q):
        return np.where(q > 0, 0.5, 0.0), np.zeros_like(q)

    def code(self):
        return K.OP_STEP, 0.0, 0.0, 0.0


@_register
class Sign(Activation):
    """φ(x) = sign(x); φ' = 0 almost everywhere."""

    name = "sign"
    defaults = {}
    method = "closed form (arc-cosine, order 0)"

    def forward(self, x):
        return np.sign(x).astype(float)

    def derivative(self, x):
        return np.zeros_like(x, dtype=float)

    def diag(self, q):
        return np.where(q > 0, 1.0, 0.0), np.zeros_like(q)

    def code(self):
        return K.OP_SIGN, 0.0, 0.0, 0.0


def _double_factorial(n):
    return math.prod(range(n, 0, -2)) if n > 0 else 1


@_register
class ReluPow(Activation):
    """φ(x) = max(x, 0)^k for k = 2, 3, 4 (Cho–Saul arc-cosine kernel of order k)."""

    name = "relu_pow"
    defaults = {"k": 2.0}
    method = "closed form (arc-cosine, order k)"

    def __init__(self, **params):
        super().__init__(**params)
        if self.k not in (2.0, 3.0, 4.0):
            raise SpecError(
                f"relu_pow: k must be 2, 3 or 4 (k = 1 is relu, k = 0 is step), got {self.k}"
            )

    def forward(self, x):
        return np.maximum(x, 0.0) ** int(self.k)

    def derivative(self, x):
        k = int(self.k)
        return k * np.maximum(x, 0.0) ** (k - 1)

    def diag(self, q):
        k = int(self.k)
        # E[relu(u)^{2k}] = q^k (2k−1)!!/2
        return (0.5 * _double_factorial(2 * k - 1) * q ** k,
                0.5 * k * k * _double_factorial(2 * k - 3) * q ** (k - 1))

    def code(self):
        return K.OP_RELU_POW, self.k, 0.0, 0.0


# ------------------------------------------------------------ smooth closed forms


@_register
class Erf(Activation):
    """φ(x) = a·erf(b·x) + c (Williams 1997)."""

    name = "erf"
    defaults = {"a": 1.0, "b": 1.0, "c": 0.0}
    method = "closed form (arcsine)"

    def _abc(self):
        return self.params["a"], self.params["b"], self.params["c"]

    def forward(self, x):
        a, b, c = self._abc()
        return a * special.erf(b * x) + c

    def derivative(self, x):
        a, b, _ = self._abc()
        return a * b * 2.0 / math.sqrt(math.pi) * np.exp(-(b * x) ** 2)

    def diag(self, q):
        a, b, c = self._abc()
        t = 2.0 * b * b * q
        k = 2.0 * a * a / math.pi * np.arcsin(t / (1.0 + t)) + c * c
        kd = 4.0 * a * a * b * b / math.pi / np.sqrt(1.0 + 2.0 * t)
        return k, kd

    def code(self):
        return (K.OP_ERF,) + self._abc()


@_register
class SigmoidLike(Erf):
    """φ(x) = ½ erf(x / 2.4020563531719796) + ½, an erf close to the logistic sigmoid."""

    name = "sigmoid_like"
    defaults = {}

    def _abc(self):
        return 0.5, 1.0 / 2.4020563531719796, 0.5


@_register
class Sin(Activation):
    """φ(x) = a·sin(b·x + c)."""

    name = "sin"
    defaults = {"a": 1.0, "b": 1.0, "c": 0.0}
    method = "closed form (Gaussian characteristic function)"

    def _abc(self):
        return self.params["a"], self.params["b"], self.params["c"]

    def forward(self, x):
        a, b, c = self._abc()
        return a * np.sin(b * x + c)

    def derivative(self, x):
        a, b, c = self._abc()
        return a * b * np.cos(b * x + c)

    def diag(self, q):
        a, b, c = self._abc()
        plus = np.exp(-2.0 * b * b * q) * math.cos(2.0 * c)
        return 0.5 * a * a * (1.0 - plus), 0.5 * a * a * b * b * (1.0 + plus)

    def code(self):
        a, b, c = self._abc()
        return K.OP_TRIG, a, b, c


@_register
class Cos(Sin):
    """φ(x) = a·cos(b·x + c) = a·sin(b·x + c + π/2)."""

    name = "cos"

    def _abc(self):
        return self.params["a"], self.params["b"], self.params["c"] + 0.5 * math.pi


@_register
class Rbf(Sin):
    """φ(x) = √2 sin(√(2γ) x + π/4): E[φ(u)φ(v)] = exp(−γ E[(u − v)²])."""

    name = "rbf"
    defaults = {"gamma": 1.0}

    def __init__(self, **params):
        super().__init__(**params)
        if self.gamma <= 0:
            raise SpecError(f"rbf: gamma must be > 0, got {self.gamma}")

    def _abc(self):
        return math.sqrt(2.0), math.sqrt(2.0 * self.params["gamma"]), 0.25 * math.pi


@_register
class Exp(Activation):
    """φ(x) = a·exp(b·x)."""

    name = "exp"
    defaults = {"a": 1.0, "b": 1.0}
    method = "closed form (log-normal moments)"

    def forward(self, x):
        return self.a * np.exp(self.b * x)

    def derivative(self, x):
        return self.a * self.b * np.exp(self.b * x)

    def diag(self, q):
        k = self.a ** 2 * np.exp(2.0 * self.b ** 2 * q)
        return k, self.b ** 2 * k

    def code(self):
        return K.OP_EXP, self.a, self.b, 0.0


@_register
class Gaussian(Activation):
    """φ(x) = exp(a·x² + b); finite kernels need a < 1/(4 q) on the data."""

    name = "gaussian"
    defaults = {"a": -0.5, "b": 0.0}
    method = "closed form (Gaussian integral)"

    def forward(self, x):
        return np.exp(self.a * x * x + self.b)

    def derivative(self, x):
        return 2.0 * self.a * x * np.exp(self.a * x * x + self.b)

    def diag(self, q):
        a, b = self.a, self.b
        det = 1.0 - 4.0 * a * q
        if np.any(det <= 0):
            raise SpecError(
                f"gaussian(a={a}): E[φ(u)²] is infinite for input variance "
                f"{float(np.max(q)):.3g} (needs a < 1/(4·variance)); lower a or the weight scale"
            )
        return (math.exp(2.0 * b) / np.sqrt(det),
                4.0 * a * a * math.exp(2.0 * b) * q / det ** 1.5)

    def code(self):
        return K.OP_GAUSSIAN, self.a, self.b, 0.0


@_register
class Gelu(Activation):
    """φ(x) = x Φ(x), Φ the standard normal CDF."""

    name = "gelu"
    defaults = {}
    method = "closed form"

    def forward(self, x):
        return x * special.ndtr(x)

    def derivative(self, x):
        return special.ndtr(x) + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)

    def diag(self, q):
        raise NotImplementedError

    def code(self):
        return K.OP_GELU, 0.0, 0.0, 0.0


# ------------------------------------------------------------ numerical


class Numerical(Activation):
    """Any Lipschitz activation, by its Hermite expansion (see module docstring).

    Parameters
    ----------
    fn : callable
        φ, applied to numpy arrays.
    dfn : callable, optional
        φ'. Without it the derivative's coefficients follow from φ's by Stein's
        identity, a'_k(q) = √(k+1) a_{k+1}(q) / √q.
    tol : float
        Bound on the truncation error of the series, relative to
        √(E[φ(u)²] E[φ(v)²]) (and likewise for φ').
    """

    name = "numerical"
    defaults = {"tol": 1e-13}
    method = "Hermite expansion (Gauss–Hermite coefficients, proven tail bound)"
    max_terms = 400

    def __init__(self, fn=None, dfn=None, name=None, **params):
        super().__init__(**params)
        if fn is not None:
            self._fn, self._dfn = fn, dfn
        if name is not None:
            self.name = name

    def forward(self, x):
        return self._fn(np.asarray(x, dtype=float))

    def derivative(self, x):
        if self._dfn is None:
            raise SpecError(f"{self.name}: no derivative given")
        return self._dfn(np.asarray(x, dtype=float))

    def __eq__(self, other):
        return (type(self) is type(other) and self.params == other.params
                and self.name == other.name and self._fn is other._fn)

    __hash__ = Layer.__hash__

    def diag(self, q):
        return _gauss_expect(self._fn, q), _gauss_expect(self._dfn, q)

    def code(self):
        return K.OP_HERMITE, 0.0, 0.0, 0.0


def _gauss_expect(fn, q, degree=200):
    """E[fn(√q z)²] for z ~ N(0, 1), by Gauss–Hermite quadrature of ``degree`` nodes."""
    z, w = special.roots_hermitenorm(degree)
    w = w / math.sqrt(2.0 * math.pi)
    values = fn(np.sqrt(np.asarray(q, dtype=float))[..., None] * z)
    return (values * values) @ w


def hermite_coefficients(fn, q, terms, degree=None):
    """Normalised Hermite coefficients a_k(q) = E[φ(√q z) He_k(z)] / √(k!).

    Returns an array of shape (len(q), terms).
    """
    degree = degree or max(2 * terms + 60, 120)
    z, w = special.roots_hermitenorm(degree)
    w = w / math.sqrt(2.0 * math.pi)
    basis = np.empty((degree, terms))
    basis[:, 0] = 1.0
    if terms > 1:
        basis[:, 1] = z
    for k in range(1, terms - 1):
        basis[:, k + 1] = (z * basis[:, k] - math.sqrt(k) * basis[:, k - 1]) / math.sqrt(k + 1)
    values = fn(np.sqrt(np.asarray(q, dtype=float))[:, None] * z)
    return (values * w) @ basis


def _make_numerical(name, fn, dfn, doc):
    cls = type(name.title().replace("_", ""), (Numerical,), {
        "name": name,
        "__doc__": doc,
        "_fn": staticmethod(fn),
        "_dfn": staticmethod(dfn),
    })
    return _register(cls)


def _sigmoid(x):
    return special.expit(x)


Tanh = _make_numerical("tanh", np.tanh, lambda x: 1.0 / np.cosh(x) ** 2, "φ(x) = tanh(x).")
Softplus = _make_numerical("softplus", lambda x: np.logaddexp(0.0, x), _sigmoid,
                           "φ(x) = log(1 + eˣ).")
Silu = _make_numerical("silu", lambda x: x * _sigmoid(x),
                       lambda x: _sigmoid(x) * (1.0 + x * (1.0 - _sigmoid(x))),
                       "φ(x) = x σ(x) (SiLU, swish).")
REGISTRY["swish"] = Silu
Elu = _make_numerical("elu", lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))),
                      lambda x: np.where(x > 0, 1.0, np.exp(np.minimum(x, 0.0))),
                      "φ(x) = x for x > 0, eˣ − 1 otherwise.")
Softsign = _make_numerical("softsign", lambda x: x / (1.0 + np.abs(x)),
                           lambda x: 1.0 / (1.0 + np.abs(x)) ** 2,
                           "φ(x) = x / (1 + |x|).")
