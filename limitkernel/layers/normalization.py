"""Normalisation layers: layernorm and dropout, each with its kernel and finite forms."""

import math
from typing import ClassVar

import numpy as np

from .._numba import jit
from .._program import OpKind
from ..spec import Layer, SpecError, register

__all__ = ["OP_DROPOUT", "OP_LAYERNORM", "Dropout", "LayerNorm", "dropout_row",
           "layernorm_row"]

OP_LAYERNORM = 23
OP_DROPOUT = 24


@register
class LayerNorm(Layer, OpKind):
    """Normalisation over the features: ``(z - mean(z)) / √(var(z) + eps)``.

    In the limit the feature mean of a zero-mean Gaussian layer vanishes and its
    variance is the diagonal K(x, x), so K(x, x') ← K(x, x')/√((q11 + ε)(q22 + ε))
    and Θ likewise (Neural Tangents' ``LayerNorm(eps=1e-12)`` on a fully-connected
    layer). Its input must be a mean-zero Gaussian layer (after a dense layer).
    """

    name = "layernorm"
    defaults: ClassVar[dict] = {"eps": 1e-12}
    code = OP_LAYERNORM
    row_params = ("eps",)

    def __init__(self, eps=1e-12):
        super().__init__(eps=eps)
        if self.eps < 0:
            raise SpecError(f"layernorm: eps must be >= 0, got {self.eps}")

    def lower(self, builder, where):
        builder.require_gaussian(
            where, "layernorm needs a mean-zero Gaussian input (its limit drops the "
            "feature mean)")
        builder.emit(self, where, eps=self.eps)

    def diag_update(self, op, state):
        den = state.q + op.params["eps"]
        inv = np.divide(1.0, den, out=np.zeros_like(den), where=den > 0)
        state.q, state.theta, state.grad = state.q * inv, state.theta * inv, state.grad * inv

    def finite_forward(self, op, params, h, run):
        h = h - h.mean(axis=-1, keepdims=True)
        sd = np.sqrt(np.einsum("...j,...j->...", h, h)[..., None] / h.shape[-1]
                     + self.eps)
        h = h / sd
        return h, ((h, sd) if run.keep else None)

    def finite_backward(self, op, params, delta, record, run):
        y, sd = record
        y = y[:, None]
        delta = (delta - delta.mean(axis=-1, keepdims=True)
                 - y * (delta * y).mean(axis=-1, keepdims=True))
        delta /= sd[:, None]
        return delta


@jit
def layernorm_row(q12, one_minus_rho, ntk, r11, r22, n11, n22, p, want_ntk):
    """K ← K/√((q11 + ε)(q22 + ε)), Θ likewise; ρ (and 1 − ρ) is unchanged."""
    eps = p[0]
    n = q12.shape[0]
    r1 = math.sqrt(r11 * r11 + eps)
    for j in range(n):
        den = r1 * math.sqrt(r22[j] * r22[j] + eps)
        inv = 1.0 / den if den > 0.0 else 0.0
        q12[j] *= inv
        if want_ntk:
            ntk[j] *= inv



@register
class Dropout(Layer, OpKind):
    """Dropout in training mode: each unit is zeroed with probability ``p`` and the
    others scaled by 1/(1 - p), independently for every input.

    In the limit only the variance of an input with itself changes:
    K(x, x) ← K(x, x)/(1 - p), and likewise Θ(x, x); entries between different
    inputs are unchanged. Neural Tangents' ``Dropout(rate=1 - p, mode="train")``
    (its ``rate`` is the keep rate). As there, only the kernel of an input set
    with itself (``x2=None``) has its diagonal scaled: two input sets are
    different examples, so their masks are independent.
    """

    name = "dropout"
    defaults: ClassVar[dict] = {"p": 0.5}
    code = OP_DROPOUT
    row_params = ("scale",)

    def __init__(self, p=0.5):
        super().__init__(p=p)
        if not 0.0 <= self.p < 1.0:
            raise SpecError(f"dropout: p is the probability to drop a unit and must be "
                            f"in [0, 1), got {self.p}")

    def lower(self, builder, where):
        builder.emit(self, where, scale=1.0 / (1.0 - self.p))
        if builder.gaussian is True and self.p > 0:
            builder.gaussian = "dropout"

    def diag_update(self, op, state):
        scale = op.params["scale"]
        state.q, state.theta = state.q * scale, state.theta * scale

    def finite_forward(self, op, params, h, run):
        if self.p == 0:
            return h, None
        # Training mode: drop each unit of each input with probability p and
        # scale the others by 1/(1 - p), as torch.nn.Dropout does.
        mask = (run.masks.random(h.shape) >= self.p) / (1.0 - self.p)
        return h * mask, (mask if run.keep else None)

    def finite_backward(self, op, params, delta, record, run):
        return delta if self.p == 0 else delta * record[:, None]


@jit
def dropout_row(q12, one_minus_rho, ntk, scale, first_is_diagonal, want_ntk):
    """Dropout, keep probability 1/scale: the variance of an input with itself
    grows by ``scale``; entries between different inputs keep K and Θ, and
    1 − ρ' = (1 − 1/scale) + (1 − ρ)/scale."""
    n = q12.shape[0]
    keep = 1.0 / scale
    for j in range(n):
        one_minus_rho[j] = min((1.0 - keep) + keep * one_minus_rho[j], 2.0)
    if first_is_diagonal and n > 0:
        q12[0] *= scale
        one_minus_rho[0] = 0.0
        if want_ntk:
            ntk[0] *= scale

