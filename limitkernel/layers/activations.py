"""Activations in closed form: each one's class and its per-entry kernel, side by side.

An activation φ maps the covariance of its input pre-activations to that of its
outputs: with (u, v) ~ N(0, [[q11, q12], [q12, q22]]),
K ← E[φ(u)φ(v)] and Θ ← Θ · E[φ'(u)φ'(v)]. Each class here declares

* ``forward(x)`` and ``derivative(x)``, φ and φ' on numpy arrays (finite
  networks, tests);
* ``diag(q)`` -> ``(E[φ(u)²], E[φ'(u)²])`` for u ~ N(0, q), vectorised over q;
* ``code`` and ``kernel_params()``: which row kernel of this module the fused
  pass runs for it, and its parameters by name (``row_params``).

Each row kernel takes one row of Gram entries — ``q12`` (K), ``one_minus_rho``
(1 − ρ, carried accurately) and ``ntk`` (Θ) — with the roots of the diagonals
entering the layer (``r11`` for the row input, ``r22`` for the columns) and
leaving it (``n11``, ``n22``), and updates them in place.

Adding a closed-form activation: one class and one row kernel here, a new
opcode below, and one line in the dispatch of :mod:`limitkernel._fused` (its
tests fail until every registered opcode is dispatched).

Activations without a closed form are :class:`limitkernel.layers.numerical.Numerical`.
"""

import math
from typing import ClassVar

import numpy as np
from scipy import special

from .._numba import jit
from .._program import OpKind
from ..spec import Layer, SpecError, layer_from_name, register
from ._angle import INV_2PI, INV_PI, angle, arccos_j, atan2_right, sin_minus_theta_cos_pair

__all__ = [
    "ABRelu",
    "Abs",
    "Activation",
    "Cos",
    "Erf",
    "Exp",
    "Gaussian",
    "Gelu",
    "Identity",
    "LeakyRelu",
    "OP_ABRELU",
    "OP_ERF",
    "OP_EXP",
    "OP_GAUSSIAN",
    "OP_GELU",
    "OP_RELU_POW",
    "OP_SIGN",
    "OP_STEP",
    "OP_TRIG",
    "Rbf",
    "Relu",
    "ReluPow",
    "SigmoidLike",
    "Sign",
    "Sin",
    "Step",
    "abrelu_row",
    "erf_row",
    "exp_row",
    "gaussian_row",
    "gelu_row",
    "generic_one_minus_rho",
    "get_activation",
    "relu_pow_row",
    "sign_row",
    "step_row",
    "trig_row",
]

_EPS = float(np.finfo(np.float64).eps)

OP_ABRELU = 1
OP_STEP = 2
OP_SIGN = 3
OP_RELU_POW = 4
OP_ERF = 5
OP_GELU = 6
OP_TRIG = 7
OP_GAUSSIAN = 8
OP_EXP = 9


class Activation(Layer, OpKind):
    """Base class of element-wise nonlinearities."""

    method = ""
    # The torch.nn module of the same function: (class name, ((spec parameter,
    # module attribute), ...), required module attributes), or None.
    torch = None

    def forward(self, x):
        raise NotImplementedError

    def derivative(self, x):
        raise NotImplementedError

    def diag(self, q):
        raise NotImplementedError

    def kernel_params(self):
        """The parameters of the row kernel, by the names of ``row_params``."""
        return {}

    def antiparallel_error(self, q):
        """Bounds (on K, on Θ) of the relative error this layer leaves between
        nearly antiparallel inputs of variance up to ``q``, beyond rounding.

        1 − ρ is carried to full relative precision near ρ = 1 but to an absolute
        ε near ρ = −1, so 1 + ρ there errs by about ε (float64's 2.2e-16).
        Layers whose kernels take 1 − ρ² scaled by a large multiple s of the
        variances (erf, gaussian, GELU) turn that into errors that grow with s.
        """
        return 0.0, 0.0

    # ------------------------------------------------------------ lowering

    def lower(self, builder, where):
        identity = isinstance(self, Identity)
        if not identity:
            builder.require_gaussian(where, "an activation needs a mean-zero Gaussian input")
        builder.emit(self, where, **self.kernel_params())
        if not identity:
            builder.gaussian, builder.independent = False, False

    def diag_update(self, op, state):
        state.q, kd = self.diag(state.q)
        state.theta = state.theta * kd
        state.grad = state.grad * kd

    # ------------------------------------------------------------ finite network

    def finite_forward(self, op, params, h, run):
        return self.forward(h), (self.derivative(h) if run.keep else None)

    def finite_backward(self, op, params, delta, record, run):
        return delta * record[:, None]


def get_activation(name, **params):
    """The activation called ``name`` (see ``limitkernel activations``)."""
    layer = layer_from_name(name, params)
    if not isinstance(layer, Activation):
        raise SpecError(f"{name!r} is not an activation")
    return layer


# ------------------------------------------------------------ ReLU family


@register
class ABRelu(Activation):
    """φ(x) = a·min(x, 0) + b·max(x, 0) (arc-cosine kernel of order 1).

    Neural Tangents' ``ABRelu(a, b)``. At 0 the derivative is taken as (a + b)/2,
    the mean of the one-sided slopes, as Neural Tangents' kernel does (an input of
    zero variance enters at the angle π/2) and as JAX differentiates
    ``max(x, 0)``: E[φ'(u)²] = (a + b)²/4 for u ≡ 0.
    """

    name = "abrelu"
    code = OP_ABRELU
    row_params = ("a", "b")
    defaults: ClassVar[dict] = {"a": 0.0, "b": 1.0}
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
        x = np.asarray(x, dtype=float)
        return np.where(x < 0, a, np.where(x > 0, b, 0.5 * (a + b)))

    def diag(self, q):
        a, b = self._ab()
        q = np.asarray(q, dtype=float)
        half = 0.5 * (a * a + b * b)
        return half * q, np.where(q > 0, half, 0.25 * (a + b) ** 2)

    def kernel_params(self):
        a, b = self._ab()
        return {"a": a, "b": b}


@register
class Relu(ABRelu):
    """φ(x) = max(x, 0) (Neural Tangents' ``Relu()``)."""

    name = "relu"
    torch = ("ReLU", (), {})
    defaults: ClassVar[dict] = {}

    def _ab(self):
        return 0.0, 1.0


@register
class LeakyRelu(ABRelu):
    """φ(x) = x for x ≥ 0, alpha·x otherwise (Neural Tangents' ``LeakyRelu(alpha)``).

    Neural Tangents has no default for alpha; 0.01 is that of ``jax.nn.leaky_relu``.
    """

    name = "leaky_relu"
    torch = ("LeakyReLU", (("alpha", "negative_slope"),), {})
    defaults: ClassVar[dict] = {"alpha": 0.01}

    def _ab(self):
        return self.params["alpha"], 1.0


@register
class Abs(ABRelu):
    """φ(x) = |x| (Neural Tangents' ``Abs()``)."""

    name = "abs"
    defaults: ClassVar[dict] = {}

    def _ab(self):
        return -1.0, 1.0


@register
class Identity(ABRelu):
    """φ(x) = x."""

    name = "identity"
    torch = ("Identity", (), {})
    defaults: ClassVar[dict] = {}
    method = "closed form (exact)"

    def _ab(self):
        return 1.0, 1.0


@jit
def abrelu_row(q12, one_minus_rho, ntk, r11, r22, n11, n22, p, want_ntk):
    """φ(x) = a·x for x < 0, b·x for x ≥ 0 (ReLU, leaky ReLU, abs, identity).

    With S = sin θ − θ cos θ, for u, v of variances q11, q22 and angle θ:
    E[φ(u)φ(v)] = √(q11 q22) [(a²+b²) S(π−θ) − 2ab S(θ)] / (2π),
    E[φ'(u)φ'(v)] = [(a²+b²)(π−θ) + 2ab θ] / (2π),
    1 − ρ' = (1 − cos θ) − (a−b)² S / (π (a²+b²)).
    An input of zero variance is independent of the other: it is taken at
    θ = π/2, which makes E[φ'(u)φ'(v)] = (a+b)²/4, i.e. φ'(0) = (a+b)/2, the
    convention of Neural Tangents (and of JAX's derivative of max(x, 0) at 0).
    """
    a, b = p[0], p[1]
    n = q12.shape[0]
    apb2 = a * a + b * b
    ab2 = 2.0 * a * b
    shrink = (a - b) * (a - b) * INV_PI / apb2
    for j in range(n):
        cj = one_minus_rho[j] if r11 * r22[j] > 0.0 else 1.0
        theta, sin_t, cos_t = angle(cj)
        # S(π − θ) = sin θ + (π − θ) cos θ keeps its relative precision as
        # θ → π, where it vanishes like (π − θ)³/3.
        s, s_sup = sin_minus_theta_cos_pair(theta, sin_t, cos_t)
        q12[j] = r11 * r22[j] * (apb2 * s_sup - ab2 * s) * INV_2PI
        if want_ntk:
            ntk[j] *= (apb2 * (math.pi - theta) + ab2 * theta) * INV_2PI
        one_minus_rho[j] = min(max(cj - shrink * s, 0.0), 2.0)


@register
class Step(Activation):
    """Heaviside step, φ(x) = 1 for x > 0 else 0; φ' = 0 almost everywhere.

    The NTK factor E[φ'φ'] is 0 (the a.e. derivative, not the δ of the
    distributional one), as in Neural Tangents' ``Sign`` and
    ``RectifiedMonomial(0)``. That layer is (x ≥ 0)·1, so it differs from this
    one only on inputs of zero variance, where this one gives step(0) = 0.
    """

    name = "step"
    code = OP_STEP
    defaults: ClassVar[dict] = {}
    method = "closed form (arc-cosine, order 0)"

    def forward(self, x):
        return (x > 0).astype(float)

    def derivative(self, x):
        return np.zeros_like(x, dtype=float)

    def diag(self, q):
        return np.where(q > 0, 0.5, 0.0), np.zeros_like(q)

    def kernel_params(self):
        return {}


@register
class Sign(Activation):
    """φ(x) = sign(x), sign(0) = 0 (Neural Tangents' ``Sign``).

    As there, the NTK factor E[φ'φ'] is 0 (the a.e. derivative).
    """

    name = "sign"
    code = OP_SIGN
    defaults: ClassVar[dict] = {}
    method = "closed form (arc-cosine, order 0)"

    def forward(self, x):
        return np.sign(x).astype(float)

    def derivative(self, x):
        return np.zeros_like(x, dtype=float)

    def diag(self, q):
        return np.where(q > 0, 1.0, 0.0), np.zeros_like(q)

    def kernel_params(self):
        return {}


@jit
def _step_or_sign(q12, one_minus_rho, ntk, r11, r22, signed, want_ntk):
    """Heaviside step (signed=False) or sign (signed=True); φ' = 0 almost everywhere.

    step: E[φφ] = (π − θ)/(2π), 1 − ρ' = θ/π;  sign: E[φφ] = 1 − 2θ/π, 1 − ρ' = 2θ/π.
    An input of zero variance gives φ = 0 (step(0) = sign(0) = 0), uncorrelated
    with anything (ρ' = 0). The NTK factor is 0, as in Neural Tangents' ``Sign``
    (and its ``RectifiedMonomial(0)``), not the δ of the distributional derivative.
    """

    n = q12.shape[0]
    for j in range(n):
        theta = angle(one_minus_rho[j])[0]
        live = r11 * r22[j] > 0.0
        if signed:
            q12[j] = 1.0 - 2.0 * theta * INV_PI if live else 0.0
            one_minus_rho[j] = 2.0 * theta * INV_PI if live else 1.0
        else:
            q12[j] = (math.pi - theta) * INV_2PI if live else 0.0
            one_minus_rho[j] = theta * INV_PI if live else 1.0
        if want_ntk:
            ntk[j] = 0.0


@jit
def step_row(q12, one_minus_rho, ntk, r11, r22, n11, n22, p, want_ntk):
    """Heaviside step on one row (see :func:`_step_or_sign`)."""
    _step_or_sign(q12, one_minus_rho, ntk, r11, r22, False, want_ntk)


@jit
def sign_row(q12, one_minus_rho, ntk, r11, r22, n11, n22, p, want_ntk):
    """sign on one row (see :func:`_step_or_sign`)."""
    _step_or_sign(q12, one_minus_rho, ntk, r11, r22, True, want_ntk)


def _double_factorial(n):
    return math.prod(range(n, 0, -2)) if n > 0 else 1


@register
class ReluPow(Activation):
    """φ(x) = max(x, 0)^k for k = 2, 3, 4 (Cho–Saul arc-cosine kernel of order k).

    Neural Tangents' ``RectifiedMonomial(k)``; see :func:`limitkernel._kernels._arccos_j`
    for J_k and the derivation.
    """

    name = "relu_pow"
    code = OP_RELU_POW
    row_params = ("k",)
    defaults: ClassVar[dict] = {"k": 2.0}
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

    def kernel_params(self):
        return {"k": self.k}


@jit
def relu_pow_row(q12, one_minus_rho, ntk, r11, r22, n11, n22, p, want_ntk):
    """φ(x) = max(x, 0)^k, k = 2, 3, 4 (Cho & Saul 2009, arc-cosine kernel of order k).

    E[φφ] = (q11 q22)^{k/2} J_k(θ)/(2π), E[φ'φ'] = k² (q11 q22)^{(k−1)/2} J_{k−1}(θ)/(2π),
    1 − ρ' = 1 − J_k(θ)/J_k(0) (see :func:`_arccos_j`). An input of zero variance is
    independent of the other (θ = π/2), as in :func:`_abrelu_row`.
    """
    k = p[0]
    n = q12.shape[0]
    kk = int(k)
    for j in range(n):
        nrm = r11 * r22[j]
        cj = one_minus_rho[j] if nrm > 0.0 else 1.0
        theta, sin_t, cos_t = angle(cj)
        jk, jk1, ck = arccos_j(kk, theta, sin_t, cos_t, cj)
        q12[j] = nrm ** kk * jk * INV_2PI
        if want_ntk:
            ntk[j] *= kk * kk * nrm ** (kk - 1) * jk1 * INV_2PI
        one_minus_rho[j] = min(max(ck, 0.0), 2.0)


# ------------------------------------------------------------ smooth closed forms


@register
class Erf(Activation):
    """φ(x) = a·erf(b·x) + c (Williams 1997; Neural Tangents' ``Erf(a, b, c)``)."""

    name = "erf"
    code = OP_ERF
    row_params = ("a", "b", "offset")
    defaults: ClassVar[dict] = {"a": 1.0, "b": 1.0, "c": 0.0}
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

    def kernel_params(self):
        return dict(zip(self.row_params, self._abc()))

    def antiparallel_error(self, q):
        # Δ = 1 + s (q11 + q22)/q + s² (1 − ρ²)/4 … with s = 2b² q: Θ's factor
        # 1/√Δ moves by about ε s/2 relative, K's arcsine by about ε √s (measured
        # against mpmath: 3e-12 and 1e-12 at s = 2e4 and 2e8, 7e-5 at s = 2e12).
        s = 2.0 * self._abc()[1] ** 2 * float(q)
        return 2.0 * _EPS * math.sqrt(s), 2.0 * _EPS * s


@register
class SigmoidLike(Erf):
    """φ(x) = ½ erf(x / 2.4020563531719796) + ½ (Neural Tangents' ``Sigmoid_like()``)."""

    name = "sigmoid_like"
    defaults: ClassVar[dict] = {}

    def _abc(self):
        return 0.5, 1.0 / 2.4020563531719796, 0.5


@jit
def erf_row(q12, one_minus_rho, ntk, r11, r22, n11, n22, p, want_ntk):
    """φ(x) = a·erf(b x) + c (Williams 1997; Neural Tangents ``Erf(a, b, c)``).

    With Δ = (1 + 2b² q11)(1 + 2b² q22) − 4b⁴ q12² ≥ 1:
    E[φφ] = (2a²/π) atan2(2b² q12, √Δ) + c²
          = (2a²/π) asin(2b² q12 / √((1 + 2b² q11)(1 + 2b² q22))) + c²,
    E[φ'φ'] = (4a²b²/π) / √Δ.
    Δ = 1 + 2b²(q11 + q22) + 4b⁴ q11 q22 (1 − ρ²) is a sum of non-negative
    terms, so neither formula cancels, even at ρ = ±1. Where 4b⁴ q11 q22 would
    overflow, both arguments of atan2 are divided by s = 2b² √(q11 q22) first:
    Δ/s² = 1/s² + (1/q11 + 1/q22)/(2b²) + (1 − ρ²).
    """
    a, b, offset_c = p[0], p[1], p[2]
    q11 = r11 * r11
    n = q12.shape[0]
    b2 = 2.0 * b * b
    amp = 2.0 * a * a * INV_PI
    slope = 4.0 * a * a * b * b * INV_PI
    offset = offset_c * offset_c
    for j in range(n):
        q22 = r22[j] * r22[j]
        cj = one_minus_rho[j]
        scale = b2 * r11 * r22[j]
        if scale < 1e100:
            det = 1.0 + b2 * (q11 + q22) + b2 * b2 * q11 * q22 * cj * (2.0 - cj)
            root = math.sqrt(det)
            q12[j] = amp * atan2_right(b2 * q12[j], root) + offset
            if want_ntk:
                ntk[j] *= slope / root
        else:
            inv = 1.0 / scale
            det = inv * inv + (1.0 / q11 + 1.0 / q22) / b2 + cj * (2.0 - cj)
            root = math.sqrt(det)
            q12[j] = amp * atan2_right((q12[j] / r11) / r22[j], root) + offset
            if want_ntk:
                ntk[j] *= slope * inv / root
    generic_one_minus_rho(q12, one_minus_rho, r11, r22, n11, n22)


@register
class Sin(Activation):
    """φ(x) = a·sin(b·x + c) (Neural Tangents' ``Sin(a, b, c)``)."""

    name = "sin"
    code = OP_TRIG
    row_params = ("a", "b", "phase")
    defaults: ClassVar[dict] = {"a": 1.0, "b": 1.0, "c": 0.0}
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

    def kernel_params(self):
        return dict(zip(self.row_params, self._abc()))


@register
class Cos(Sin):
    """φ(x) = a·cos(b·x + c) = a·sin(b·x + c + π/2) (Neural Tangents' ``Cos(a, b, c)``)."""

    name = "cos"

    def _abc(self):
        return self.params["a"], self.params["b"], self.params["c"] + 0.5 * math.pi


@register
class Rbf(Sin):
    """φ(x) = √2 sin(√(2γ) x + π/4): E[φ(u)φ(v)] = exp(−γ E[(u − v)²]).

    Neural Tangents' ``Rbf(gamma)``.
    """

    name = "rbf"
    defaults: ClassVar[dict] = {"gamma": 1.0}

    def __init__(self, **params):
        super().__init__(**params)
        if self.gamma <= 0:
            raise SpecError(f"rbf: gamma must be > 0, got {self.gamma}")

    def _abc(self):
        return math.sqrt(2.0), math.sqrt(2.0 * self.params["gamma"]), 0.25 * math.pi


@jit
def trig_row(q12, one_minus_rho, ntk, r11, r22, n11, n22, p, want_ntk):
    """φ(x) = a·sin(b x + c) (sin, cos, rbf), and an accurate 1 − ρ'.

    With y = b²(q11 + q22 − 2 q12)/2, E− = e^{−y}, E+ = exp(−b²(q11 + q22 + 2 q12)/2)
    and C = cos 2c:
    E[φφ] = a²/2 (E− − C E+),  E[φ'φ'] = a²b²/2 (E− + C E+).
    q11 + q22 − 2 q12 = (√q11 − √q22)² + 2√(q11 q22)(1 − ρ) is formed without
    cancellation. With e_i = exp(−b² q_ii), G = √((1 − C e1²)(1 − C e2²)) (so that
    √(K11' K22') = a² G/2) and M = 1 − C e1 e2, the new correlation satisfies
    (1 − ρ') G = −expm1(−y)(1 + C E+) − C (e1 − e2)² / (G + M),
    whose terms are each accurate (for rbf, C = 0 and 1 − ρ' = −expm1(−y)).
    """
    a, b, phase = p[0], p[1], p[2]
    q11 = r11 * r11
    n = q12.shape[0]
    h = 0.5 * b * b
    b2 = b * b
    cos2c = math.cos(2.0 * phase)
    # 1 − C and 1 + C without cancellation (C = 1 for sin, −1 for cos).
    one_minus_c = 2.0 * math.sin(phase) ** 2
    one_plus_c = 2.0 * math.cos(phase) ** 2
    half_a2 = 0.5 * a * a
    root11 = math.sqrt(q11)
    e1 = math.exp(-b2 * q11)
    # 1 − C e1² = (1 − C) − C (e1² − 1): small variances keep their precision.
    big_a = one_minus_c - cos2c * math.expm1(-2.0 * b2 * q11)
    for j in range(n):
        q = q12[j]
        q22 = r22[j] * r22[j]
        root22 = math.sqrt(q22)
        gap = root11 - root22
        gap_sq = gap * gap
        cross = 2.0 * root11 * root22
        y = h * (gap_sq + cross * one_minus_rho[j])
        minus = math.exp(-y)
        # q11 + q22 + 2 q12 = (√q11 − √q22)² + 2√(q11 q22)(1 + ρ) ≥ 0 as well: formed
        # from the covariance it could round below 0 for antiparallel inputs of
        # large variance, and exp of it overflow (found by fuzzing: NaN at 1e119).
        raw_plus = math.exp(-h * (gap_sq + cross * (2.0 - one_minus_rho[j])))
        plus = raw_plus * cos2c
        # E− − E+ = −E− expm1(−2 b² q12), exactly as the exponents differ by
        # 2 b² q12; then E− ∓ C E+ = (E− − E+) + (1 ∓ C) E+ has no cancellation
        # at small variances (sin's K, cos's Θ).
        # (directly where the exponents differ by more than 1: no cancellation to
        # avoid there, and expm1 would overflow against an E− that underflows)
        gap2 = 2.0 * b2 * q
        diff = -minus * math.expm1(-gap2) if abs(gap2) < 1.0 else minus - raw_plus
        q12[j] = half_a2 * (diff + one_minus_c * raw_plus)
        if want_ntk:
            ntk[j] *= half_a2 * b2 * (diff + one_plus_c * raw_plus)
        # e1 − e2 = ±e_max (1 − exp(−b²|q22 − q11|)), e_max the larger of the two,
        # without cancellation, overflow or 0·inf.
        e2 = math.exp(-b2 * q22)
        if q22 >= q11:
            de = -e1 * math.expm1(-b2 * (q22 - q11))
        else:
            de = e2 * math.expm1(-b2 * (q11 - q22))
        g = math.sqrt(big_a * (one_minus_c - cos2c * math.expm1(-2.0 * b2 * q22)))
        m = one_minus_c - cos2c * math.expm1(-b2 * (q11 + q22))
        num = -math.expm1(-y) * (1.0 + plus) - cos2c * de * de / (g + m)
        one_minus_rho[j] = min(max(num / g, 0.0), 2.0) if g > 0.0 else 0.0


@register
class Exp(Activation):
    """φ(x) = a·exp(b·x) (Neural Tangents' ``Exp(a, b)``)."""

    name = "exp"
    code = OP_EXP
    row_params = ("a", "b")
    defaults: ClassVar[dict] = {"a": 1.0, "b": 1.0}
    method = "closed form (log-normal moments)"

    def forward(self, x):
        return self.a * np.exp(self.b * x)

    def derivative(self, x):
        return self.a * self.b * np.exp(self.b * x)

    def diag(self, q):
        k = self.a ** 2 * np.exp(2.0 * self.b ** 2 * q)
        return k, self.b ** 2 * k

    def kernel_params(self):
        return {"a": self.a, "b": self.b}


@jit
def exp_row(q12, one_minus_rho, ntk, r11, r22, n11, n22, p, want_ntk):
    """φ(x) = a·exp(b x) (Neural Tangents ``Exp(a, b)``).

    E[φφ] = a² exp(b²(q11 + q22 + 2 q12)/2), E[φ'φ'] = b² E[φφ], and
    ρ' = exp(−b²(q11 + q22 − 2 q12)/2), so 1 − ρ' = −expm1(−y) exactly as in
    :func:`_trig_row`.
    """
    a, b = p[0], p[1]
    q11 = r11 * r11
    n = q12.shape[0]
    h = 0.5 * b * b
    a2 = a * a
    b2 = b * b
    root11 = math.sqrt(q11)
    for j in range(n):
        q22 = r22[j] * r22[j]
        val = a2 * math.exp(h * (q11 + q22 + 2.0 * q12[j]))
        q12[j] = val
        if want_ntk:
            ntk[j] *= b2 * val
        root22 = math.sqrt(q22)
        gap = root11 - root22
        one_minus_rho[j] = min(-math.expm1(-h * (gap * gap + 2.0 * root11 * root22
                                                   * one_minus_rho[j])), 2.0)


@register
class Gaussian(Activation):
    """φ(x) = a·exp(b·x²) (Neural Tangents' ``Gaussian(a, b)``).

    E[φ(u)²] is finite only for b < 1/(4 q): a positive b needs small variances.
    """

    name = "gaussian"
    code = OP_GAUSSIAN
    row_params = ("a", "b")
    defaults: ClassVar[dict] = {"a": 1.0, "b": -1.0}
    method = "closed form (Gaussian integral)"

    def forward(self, x):
        return self.a * np.exp(self.b * x * x)

    def derivative(self, x):
        return 2.0 * self.a * self.b * x * np.exp(self.b * x * x)

    def diag(self, q):
        a, b = self.a, self.b
        q = np.asarray(q, dtype=float)
        det = 1.0 - 4.0 * b * q
        if np.any(det <= 0):
            raise SpecError(
                f"gaussian(b={b}): E[φ(u)²] is infinite for input variance "
                f"{float(np.max(q)):.3g} (needs b < 1/(4·variance)); lower b or the weight scale"
            )
        return a * a / np.sqrt(det), 4.0 * a * a * b * b * q / det ** 1.5

    def kernel_params(self):
        return {"a": self.a, "b": self.b}

    def antiparallel_error(self, q):
        # Δ = 1 − 2b (q11 + q22) + 4b² q11 q22 (1 − ρ²), s = 2|b| q: K and Θ both
        # move by about ε s relative (measured 3e-8 and 8e-8 at s = 2e8).
        s = 2.0 * abs(self.b) * float(q) if self.b < 0 else 0.0
        return 2.0 * _EPS * s, 4.0 * _EPS * s


@jit
def gaussian_row(q12, one_minus_rho, ntk, r11, r22, n11, n22, p, want_ntk):
    """φ(x) = a·exp(b x²) (Neural Tangents ``Gaussian(a, b)``), for 4b·q < 1.

    With Δ = (1 − 2b q11)(1 − 2b q22) − 4b² q12²
           = 1 − 2b(q11 + q22) + 4b² q11 q22 (1 − ρ²)  (formed that way):
    E[φφ] = a² / √Δ,  E[φ'φ'] = 4a²b² q12 / Δ^{3/2}.
    For b ≤ 0 every term of Δ is ≥ 0; for b > 0 the caller has checked
    4b q < 1 on the diagonals, which makes Δ > 1 − 2b(q11 + q22) > 0.
    """
    a, b = p[0], p[1]
    q11 = r11 * r11
    n = q12.shape[0]
    a2 = a * a
    slope = 4.0 * a2 * b * b
    for j in range(n):
        q22 = r22[j] * r22[j]
        cj = one_minus_rho[j]
        if max(q11, q22) < _GAUSSIAN_SCALED:
            det = (1.0 - 2.0 * b * (q11 + q22)
                   + 4.0 * b * b * q11 * q22 * cj * (2.0 - cj))
            root = math.sqrt(det)
            if want_ntk:
                ntk[j] *= slope * q12[j] / (det * root)
            q12[j] = a2 / root
        else:
            # Variances this large only occur for b < 0; q11 q22 would overflow
            # (inf · 0 for identical inputs), so Δ is formed as Δ s², s = 1/max q.
            s = 1.0 / max(q11, q22)
            u1 = q11 * s
            u2 = q22 * s
            det_s = s * s - 2.0 * b * (u1 + u2) * s + 4.0 * b * b * u1 * u2 * cj * (2.0 - cj)
            root_s = math.sqrt(det_s)
            if want_ntk:
                ntk[j] *= slope * ((((q12[j] * s) / root_s) * s) / det_s) * s
            q12[j] = (a2 * s) / root_s
    generic_one_minus_rho(q12, one_minus_rho, r11, r22, n11, n22)


# Above this variance the gaussian layer forms its determinant scaled.
_GAUSSIAN_SCALED = 1e100


@register
class Gelu(Activation):
    """φ(x) = x Φ(x), Φ the standard normal CDF (Neural Tangents' ``Gelu()``).

    The exact GELU; Neural Tangents' ``approximate=True`` changes only its finite
    network (tanh approximation), never its kernel, so it is not offered here.
    For u ~ N(0, q), with A = asin(q/(1 + q)):

    .. math::

        E[φ(u)^2] = \\frac{q}{4} + \\frac{q A}{2π} + \\frac{q^2}{π (1 + q)\\sqrt{1 + 2q}},
        \\quad
        E[φ'(u)^2] = \\frac14 + \\frac{A}{2π}
            + \\frac{q}{2π\\sqrt{1 + 2q}} \\left(\\frac{2}{1 + q} + \\frac{1}{1 + 2q}\\right),

    the diagonal of the kernel in :func:`limitkernel._kernels._gelu_row`.
    """

    name = "gelu"
    torch = ("GELU", (), {"approximate": "none"})
    code = OP_GELU
    defaults: ClassVar[dict] = {}
    method = "closed form (Gaussian orthant integrals)"

    def forward(self, x):
        return x * special.ndtr(x)

    def derivative(self, x):
        return special.ndtr(x) + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)

    def diag(self, q):
        q = np.asarray(q, dtype=float)
        root = np.sqrt(1.0 + 2.0 * q)
        angle = np.arctan2(q, root) / (2.0 * math.pi)
        k = q * (0.25 + angle) + q * (q / (1.0 + q)) / (math.pi * root)
        kd = (0.25 + angle
              + q / (2.0 * math.pi * root) * (2.0 / (1.0 + q) + 1.0 / (1.0 + 2.0 * q)))
        return k, kd

    def kernel_params(self):
        return {}

    def antiparallel_error(self, q):
        # 1 + q11 + q22 + q11 q22 (1 − ρ²) enters Θ's factor under a root and an
        # arcsine: about ε √q relative (measured 6e-13 at q = 1e8, 4e-11 at 1e12).
        return 0.0, 2.0 * _EPS * math.sqrt(float(q))





@jit
def gelu_row(q12, one_minus_rho, ntk, r11, r22, n11, n22, p, want_ntk):
    """φ(x) = x Φ(x), Φ the standard normal CDF (exact GELU).

    With P = 1 + q11, Q = 1 + q22, R = P Q − q12² = 1 + q11 + q22 + q11 q22 (1 − ρ²)
    (≥ 1, formed without cancellation) and A = atan2(q12, √R) = asin(q12/√(PQ)):
    E[φφ]   = q12/4 + q12 A/(2π) + (q11 q22 R + q12²) / (2π P Q √R),
    E[φ'φ'] = 1/4 + A/(2π) + q12 (1/R + (2 + q11 + q22)/(P Q)) / (2π √R)
    (1 + (1 − q11 q22)/(P Q) written without its cancellation at large q).
    The first follows from x Φ(x) = E_g[x 1{x − g ≥ 0}], g ~ N(0, 1), and
    Stein's lemma; the second is its derivative in q12 (Price's theorem).
    Where q11 q22 would overflow, everything is divided by √(PQ) first
    (s = 1/√(PQ), r = R s² = 1/P + 1/Q − s² + (q11/P)(q22/Q)(1 − ρ²)).
    """
    q11 = r11 * r11
    n = q12.shape[0]
    p1 = 1.0 + q11
    for j in range(n):
        q = q12[j]
        q22 = r22[j] * r22[j]
        cj = one_minus_rho[j]
        # (q11 q22)² ~ prod·R must not overflow: direct below r11 r22 = 1e60.
        if r11 * r22[j] < 1e60:
            prod = q11 * q22
            pq = p1 * (1.0 + q22)
            big_r = 1.0 + q11 + q22 + prod * cj * (2.0 - cj)
            root = math.sqrt(big_r)
            ang = atan2_right(q, root) * INV_2PI
            q12[j] = 0.25 * q + q * ang + (prod * big_r + q * q) * INV_2PI / (pq * root)
            if want_ntk:
                # 1 + (1 − q11 q22)/(P Q) = (2 + q11 + q22)/(P Q): no cancellation
                ntk[j] *= (0.25 + ang + q * INV_2PI / root
                           * (1.0 / big_r + (2.0 + q11 + q22) / pq))
        else:
            p2 = 1.0 + q22
            s = (1.0 / math.sqrt(p1)) / math.sqrt(p2)
            u1 = q11 / p1
            u2 = q22 / p2
            r = 1.0 / p1 + 1.0 / p2 - s * s + u1 * u2 * cj * (2.0 - cj)
            root_r = math.sqrt(r)
            qs = q * s
            ang = atan2_right(qs, root_r) * INV_2PI
            prod_s = (q11 / math.sqrt(p1)) * (q22 / math.sqrt(p2))
            q12[j] = (0.25 * q + q * ang
                      + (prod_s * root_r + qs * qs * s / root_r) * INV_2PI)
            if want_ntk:
                # 1 + s² − u1 u2 = (2 + q11 + q22)/(P Q) = u1/Q + u2/P + 2 s²
                ntk[j] *= (0.25 + ang + qs * INV_2PI / root_r
                           * (s * s / r + u1 / p2 + u2 / p1 + 2.0 * s * s))
    generic_one_minus_rho(q12, one_minus_rho, r11, r22, n11, n22)


@jit
def generic_one_minus_rho(q12, one_minus_rho, r11, r22, n11, n22):
    """1 − ρ' from the new covariance, for activations smooth in ρ.

    Identical inputs (1 − ρ = 0 and equal variances on entry) stay identical:
    exactly 0, so that their entries equal the diagonal. Otherwise
    1 − K'/√(K'(x, x) K'(x', x')), whose absolute error is a few ulps (see the
    README on nearly identical inputs).
    """
    n = q12.shape[0]
    for j in range(n):
        nrm = n11 * n22[j]
        cn = min(max(1.0 - q12[j] / nrm, 0.0), 2.0) if nrm > 0.0 else 0.0
        one_minus_rho[j] = 0.0 if one_minus_rho[j] == 0.0 and r11 == r22[j] else cn
