"""Passes over the rows of an input set that the Gram engine needs before its GEMM.

Everything here computes; :mod:`limitkernel.gram` validates and calls.
"""

import math

import numpy as np
from numba import prange

from ._numba import fma, jit_parallel

__all__ = ["row_hashes", "transpose_into", "unit_rows"]

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


@jit_parallel
def unit_rows(x, out):
    """x[i] / |x[i]| to about twice float64's precision, as out[i, :, 0] + out[i, :, 1].

    The first parts are x/|x| rounded, the second their error: |x|² is summed
    with every product and every sum's rounding error carried (fma and
    TwoSum), its root taken with its error, and each quotient's remainder is
    exact (fma). A zero row is left as it is. The difference of two nearly
    identical unit vectors then keeps its relative precision, which x/|x|
    rounded loses (its error ε is as large as the difference at distance ε).
    """
    n, d = x.shape
    for i in prange(n):
        s = 0.0
        err = 0.0
        for k in range(d):
            v = x[i, k]
            p = v * v
            t = s + p
            back = t - s
            err += (s - (t - back)) + (p - back) + fma(v, v, -p)
            s = t
        if s == 0.0:
            for k in range(d):
                out[i, k, 0] = x[i, k]
                out[i, k, 1] = 0.0
            continue
        high = s + err
        low = err - (high - s)
        root = math.sqrt(high)
        root_low = (fma(-root, root, high) + low) / (2.0 * root)
        for k in range(d):
            v = x[i, k]
            q = v / root
            out[i, k, 0] = q
            out[i, k, 1] = (fma(-q, root, v) - q * root_low) / root
