"""Plain-numpy, layer-by-layer NNGP and NTK of a fully-connected ReLU network.

This is the baseline that ``bench_gram.py`` times: every layer is applied to
the whole N x N Gram matrix with ordinary numpy calls, holding full N x N
arrays. It follows the conventions of docs/design.rst (Neural Tangents' "ntk"
parameterisation):

* input:  K0 = x . x' / d,  Theta0 = 0
* dense:  K <- w^2 K + b^2,  Theta <- K_new + w^2 Theta
* relu:   theta = arccos(clip(K12 / sqrt(K11 K22), -1, 1)),
          K <- sqrt(K11 K22) (sin theta + (pi - theta) cos theta) / (2 pi),
          Theta <- Theta (pi - theta) / (2 pi)

Only the case "x against itself" is implemented (that is what the benchmark
measures). The correlation on the diagonal is set to exactly 1: arccos of a
correlation that rounded to 1 - eps would otherwise give an angle of order
sqrt(eps) there. Off-diagonal entries use the formula as written.

It is deliberately simple, but not wasteful: it works in place where numpy
allows it, so at most five N x N arrays are alive at once (see
:func:`estimate_bytes`).
"""

import math

import numpy as np

#: The network that the benchmark measures, as (kind, w_std, b_std) layers.
DEFAULT_LAYERS = 3 * [("dense", 1.5, 0.05), ("relu", None, None)] + [
    ("dense", 1.5, 0.05)
]

#: N x N arrays alive at the peak (K, Theta, sqrt(K11 K22), theta, scratch).
_FULL_ARRAYS = 5


def estimate_bytes(n, d, itemsize):
    """Approximate peak memory of :func:`nngp_ntk` for n inputs of dimension d."""
    return _FULL_ARRAYS * n * n * itemsize + 2 * n * d * itemsize + 64 * 2**20


def _dense(k, theta, w_std, b_std):
    k *= w_std * w_std
    k += b_std * b_std
    if theta is None:
        # Theta0 = 0, so after the first dense layer Theta = K.
        theta = k.copy()
    else:
        theta *= w_std * w_std
        theta += k
    return k, theta


def _relu(k, theta, buffers):
    """One ReLU layer applied in place; ``buffers`` are two N x N scratch arrays."""
    scale, angle = buffers
    diag = np.diagonal(k).copy()
    np.sqrt(diag, out=diag)
    np.multiply.outer(diag, diag, out=scale)  # sqrt(K11 K22)

    rho = k  # reuse K's storage for the correlation
    np.divide(rho, scale, out=rho)
    np.clip(rho, -1.0, 1.0, out=rho)
    np.fill_diagonal(rho, 1.0)
    np.arccos(rho, out=angle)

    two_pi = 2.0 * math.pi
    # Theta <- Theta (pi - theta) / (2 pi)
    pi_minus = np.subtract(math.pi, angle)  # fifth array, freed below
    theta *= pi_minus
    theta /= two_pi

    # K <- sqrt(K11 K22) (sin theta + (pi - theta) cos theta) / (2 pi)
    pi_minus *= rho  # cos theta = rho
    np.sin(angle, out=angle)
    pi_minus += angle
    pi_minus *= scale
    pi_minus /= two_pi
    # The new K lives in pi_minus; the old K storage becomes scratch.
    return pi_minus, theta, (scale, rho)


def gram(x, method="syrk"):
    """``x @ x.T``; ``method="gemm"`` multiplies by a contiguous copy of x.T.

    numpy sends ``x @ x.T`` to BLAS ``syrk`` (one triangle, then mirrored);
    with a copy of ``x.T`` it is a plain ``gemm``. Some OpenBLAS builds crash
    in the threaded ``dsyrk`` for large N, which the copy avoids.
    """
    if method == "gemm":
        return x @ np.ascontiguousarray(x.T)
    if method != "syrk":
        raise ValueError(f"unknown Gram method {method!r}")
    return x @ x.T


def nngp_ntk(x, layers=DEFAULT_LAYERS, gram_method="syrk"):
    """NNGP and NTK Gram matrices of ``x`` with itself.

    ``x`` is an (N, d) float32 or float64 array; the result has its dtype.
    ``gram_method`` chooses how ``x @ x.T`` is computed (see :func:`gram`).
    Returns ``{"nngp": K, "ntk": Theta}``.
    """
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    d = x.shape[1]
    k = gram(x, gram_method)
    k /= d
    theta = None
    buffers = None
    for kind, w_std, b_std in layers:
        if kind == "dense":
            k, theta = _dense(k, theta, w_std, b_std)
        elif kind == "relu":
            if theta is None:
                theta = np.zeros_like(k)
            if buffers is None:
                buffers = (np.empty_like(k), np.empty_like(k))
            k, theta, buffers = _relu(k, theta, buffers)
        else:
            raise ValueError(f"unknown layer kind {kind!r}")
    if theta is None:
        theta = np.zeros_like(k)
    return {"nngp": k, "ntk": theta}
