"""Dense: the fully-connected layer, the readout, and Neural Tangents' conventions.

Everything a dense layer is: its spec, its lowering, its diagonal update, its
per-entry kernel and its finite-network forward and backward.

Limit ("ntk" parameterisation, the default): K ← σ_w² K + σ_b²,
Θ ← K_new + σ_w² Θ. "standard": the same K, Θ ← n K_old + 1 + σ_w² Θ with n the
layer's input width. Finite network: z = w_mul · a W + b_mul · b with the
trained W, b and (w_mul, b_mul) = (σ_w/√n, σ_b) ("ntk") or (1, 1) ("standard",
W ~ N(0, σ_w²/n), b ~ N(0, σ_b²)).
"""

import math
from typing import ClassVar

import numpy as np
from scipy.linalg.blas import dgemm

from .._numba import jit
from .._program import OpKind
from ..spec import PARAMETERIZATIONS, Layer, SpecError, register

__all__ = ["OP_DENSE", "Dense", "dense_row", "mm"]

OP_DENSE = 0


@register
class Dense(Layer, OpKind):
    """Fully-connected layer ``z = W x + b`` (the readout is one too).

    Parameters
    ----------
    w_std, b_std : float
        Weight and bias scales σ_w, σ_b.
    parameterization : {"ntk", "standard"}
        "ntk": ``z = σ_w/√n · W x + σ_b · b`` with W, b ~ N(0, 1) (default).
        "standard": W ~ N(0, σ_w²/n), b ~ N(0, σ_b²); the NTK then depends on
        the input width n of the layer, which the previous dense layer's
        ``width`` (or the input dimension, for the first) supplies.
    width : float or None
        Output width of this layer; needed only by the "standard"
        parameterisation, for the next dense layer's NTK.
    """

    name = "dense"
    defaults: ClassVar[dict] = {"w_std": 1.0, "b_std": 0.0, "parameterization": "ntk",
                                "width": None}
    readout = True
    code = OP_DENSE
    # Θ ← theta_k · K_old + theta_b + w_var · Θ; K ← w_var · K + b_var.
    row_params = ("w_var", "b_var", "theta_k", "theta_b")
    has_params = True

    def __init__(self, w_std=1.0, b_std=0.0, parameterization="ntk", width=None):
        super().__init__(
            w_std=w_std, b_std=b_std, parameterization=parameterization, width=width
        )
        if self.w_std < 0 or self.b_std < 0:
            raise SpecError(
                f"dense: w_std and b_std are standard deviations and must be >= 0, "
                f"got w_std={self.w_std}, b_std={self.b_std}"
            )
        if self.parameterization not in PARAMETERIZATIONS:
            raise SpecError(
                f"dense: parameterization must be 'ntk' or 'standard', "
                f"got {self.parameterization!r}"
            )
        if self.width is not None and (self.width < 1 or self.width != int(self.width)):
            raise SpecError(f"dense: width must be a positive integer, got {self.width}")

    # ------------------------------------------------------------ lowering

    def lower(self, builder, where):
        if builder.final and builder.spatial is not None:
            raise SpecError(
                f"{where}: the readout gets positions (images or sequences), but a "
                "network on them must end with flatten or global_avg_pool before its "
                "readout dense layer; add one (e.g. '..., global_avg_pool, dense'), or "
                "flatten the inputs for a fully-connected network")
        w_var, b_var = self.w_std ** 2, self.b_std ** 2
        if self.parameterization == "ntk":
            theta_k, theta_b = w_var, b_var
        else:
            theta_k = builder.require_fan_in(where)
            theta_b = 1.0
        builder.emit(self, where, w_var=w_var, b_var=b_var, theta_k=theta_k,
                     theta_b=theta_b)
        builder.set_width(self.width, where)
        builder.gaussian, builder.independent = True, True

    def diag_update(self, op, state):
        p = op.params
        state.theta = p["theta_k"] * state.q + p["theta_b"] + p["w_var"] * state.theta
        state.q = p["w_var"] * state.q + p["b_var"]
        state.grad = p["w_var"] * state.grad

    # ------------------------------------------------------------ finite network

    def finite_init(self, op, fan_in, fan_out, rng):
        return DenseParams(self, fan_in, fan_out, rng)

    def finite_width(self, op, width, stash):
        raise RuntimeError("the finite width of a dense layer is set by the network")

    def finite_forward(self, op, params, h, run):
        return params(h), (h if run.keep else None)

    def finite_backward(self, op, params, delta, record, run):
        return run.dense(params, record, delta)


@jit
def dense_row(q12, one_minus_rho, ntk, r11, r22, n11, n22, p, want_ntk):
    """K ← σ_w² K + σ_b²; Θ ← θ_k K_old + θ_b + σ_w² Θ, on one row of entries.

    ``r11``, ``r22`` are the roots of the diagonals entering the layer (row
    input, column inputs), ``n11``, ``n22`` those leaving it. 1 − ρ is updated
    through the Gram determinant, which has no cancellation:
    q11' q22' − q12'² = σ_w⁴ q11 q22 (1 − ρ²) + σ_w² σ_b² (q11 + q22 − 2 q12).
    """
    w_var, b_var, theta_k, theta_b = p[0], p[1], p[2], p[3]
    n = q12.shape[0]
    for j in range(n):
        q = q12[j]
        new = w_var * q + b_var
        if want_ntk:
            ntk[j] = theta_k * q + theta_b + w_var * ntk[j]
        cj = one_minus_rho[j]
        if n11 > 0.0 and n22[j] > 0.0:
            # Every term is scaled by 1/√(q11' q22') before it is squared, and
            # that factor is applied one root at a time, so tiny (even
            # subnormal) or huge variances neither underflow nor overflow.
            inv1 = 1.0 / n11
            inv2 = 1.0 / n22[j]
            # The two factors in the same order for (x, x') and (x', x), so that
            # this layer gives the pair the same ρ whichever input is the row.
            first = min(inv1, inv2)
            second = max(inv1, inv2)
            rho_new = (new * first) * second
            if rho_new > 0.0:
                r = (r11 * inv1) * (r22[j] * inv2)
                u = (r11 - r22[j]) * (math.sqrt(inv1) * math.sqrt(inv2))
                det = w_var * w_var * r * r * cj * (2.0 - cj) + w_var * (
                    b_var * first) * second * (u * u + 2.0 * r * cj)
                cn = det / (1.0 + rho_new)
            else:
                cn = 1.0 - rho_new
        else:
            cn = 0.0
        q12[j] = new
        one_minus_rho[j] = min(max(cn, 0.0), 2.0)


# ------------------------------------------------------------ finite network
#
# Every GEMM goes through scipy's BLAS, operands passed as Fortran-ordered views
# (a C-ordered array is the transpose of one) so that nothing is copied. Mixing
# numpy's and scipy's BLAS in one loop can be slow: they may be two OpenBLAS
# builds whose thread pools then compete for the cores.


def mm(x, y):
    """x @ y through scipy's dgemm (result in Fortran order)."""
    ax, tx = (x, False) if x.flags.f_contiguous else (x.T, True)
    ay, ty = (y, False) if y.flags.f_contiguous else (y.T, True)
    return dgemm(1.0, ax, ay, trans_a=tx, trans_b=ty)


class DenseParams:
    """Trained parameters of one dense layer and its fixed multipliers."""

    __slots__ = ("b", "b_mul", "layer", "w", "w_mul")

    def __init__(self, layer, fan_in, fan_out, rng):
        self.layer = layer
        # Stored (fan_in, fan_out), C order, so that z = a @ w and the update
        # w ← w − η w_mul aᵀg runs in place as one GEMM on wᵀ (Fortran order).
        self.w = rng.standard_normal((fan_in, fan_out))
        self.b = rng.standard_normal(fan_out)
        if layer.parameterization == "ntk":
            self.w_mul, self.b_mul = layer.w_std / math.sqrt(fan_in), layer.b_std
        else:
            self.w *= layer.w_std / math.sqrt(fan_in)
            self.b *= layer.b_std
            self.w_mul, self.b_mul = 1.0, 1.0

    @property
    def fan_in(self):
        return self.w.shape[0]

    @property
    def fan_out(self):
        return self.w.shape[1]

    def __call__(self, a):
        flat = a.reshape(-1, a.shape[-1])
        z = mm(flat, self.w)
        if self.w_mul != 1.0:
            z *= self.w_mul
        if self.b_mul != 0.0:
            z += self.b_mul * self.b
        return z if a.ndim == 2 else z.reshape(a.shape[:-1] + (self.fan_out,))

    def input_signal(self, delta):
        """δ at the layer's input from δ (N, r, ..., fan_out) at its output."""
        flat = delta.reshape(-1, self.fan_out)
        # (w flatᵀ)ᵀ comes out of BLAS in C order, so the reshape is a view.
        out = mm(self.w, flat.T).T
        if self.w_mul != 1.0:
            out *= self.w_mul
        return out.reshape(delta.shape[:-1] + (self.fan_in,))

    def step(self, a, g, eta):
        """w ← w − η w_mul aᵀ g and b ← b − η b_mul Σ g, in place (g: (N, ..., fan_out))."""
        a = a.reshape(-1, self.fan_in)
        g = g.reshape(-1, self.fan_out)
        # w ← w − η w_mul aᵀ g, as (wᵀ) ← (wᵀ) − η w_mul gᵀ a in place.
        ga, ta = (g, True) if g.flags.f_contiguous else (g.T, False)
        aa, tb = (a, False) if a.flags.f_contiguous else (a.T, True)
        wt = dgemm(-eta * self.w_mul, ga, aa, beta=1.0, c=self.w.T,
                   trans_a=ta, trans_b=tb, overwrite_c=True)
        if not np.shares_memory(wt, self.w):
            self.w = np.ascontiguousarray(wt.T)
        if self.b_mul != 0.0:
            self.b -= (eta * self.b_mul) * g.sum(axis=0)
