"""Passes over the rows of an input set that the Gram engine needs before its GEMM.

Everything here computes; :mod:`limitkernel.gram` validates and calls.
"""

import numpy as np
from numba import prange

from ._numba import jit_parallel

__all__ = ["row_hashes", "transpose_into"]

_NEGATIVE_ZERO = np.float64(-0.0).view(np.uint64)


@jit_parallel
def row_hashes(bits, mult, out):
    """out[i] = Σ_k bits[i, k] · mult[k] mod 2⁶⁴, the bits of -0.0 read as those of 0.0.

    ``bits`` (n, d) are the float64 inputs viewed as uint64; the products and
    the sum wrap (uint64 arithmetic).
    """
    n, d = bits.shape
    for i in prange(n):
        acc = np.uint64(0)
        for k in range(d):
            b = bits[i, k]
            if b == _NEGATIVE_ZERO:
                b = np.uint64(0)
            acc += b * mult[k]
        out[i] = acc


# Side of the square tiles of transpose_into (32 × 32 float64: 8 KB read, 8 KB written).
_TILE = 32


@jit_parallel
def transpose_into(dest, src):
    """dest[k, i] = src[i, k] for the (n, t) array ``src``, tile by tile, in parallel."""
    n, t = src.shape
    for block in prange((n + _TILE - 1) // _TILE):
        i0 = block * _TILE
        i1 = min(i0 + _TILE, n)
        for k0 in range(0, t, _TILE):
            for k in range(k0, min(k0 + _TILE, t)):
                for i in range(i0, i1):
                    dest[k, i] = src[i, k]
