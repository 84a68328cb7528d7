"""Nearly identical inputs against a 50-digit mpmath evaluation of the recursion.

The reference (:mod:`reference`) shares no numerical code with the package: it
applies the textbook recursion in mpmath at 50 significant digits, with the angle
from mpmath's own acos, so rounding in the correlation costs it nothing. A plain
float64 arccos implementation loses about half the digits of 1 - ρ here and errs
by ~1e-8 on the NTK; the package must stay within 1e-13.
"""

import numpy as np
import pytest
from reference import kernel_mp

import limitkernel as lk

def _pairs(rng, d=16):
    base = rng.standard_normal(d)
    out = []
    for eps in (1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4):
        direction = rng.standard_normal(d)
        direction *= eps * np.linalg.norm(base) / np.linalg.norm(direction)
        out.append(base + direction)
    return base, np.array(out)


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("w_std, b_std, a, b", [
    (1.5, 0.05, 0.0, 1.0),    # relu with bias
    (2.0 ** 0.5, 0.0, 0.0, 1.0),  # relu, no bias (critical)
    (1.0, 0.3, 0.1, 1.0),     # leaky relu
    (1.0, 0.1, -1.0, 1.0),    # abs
])
def test_near_duplicates_match_mpmath(depth, w_std, b_std, a, b):
    rng = np.random.default_rng(depth)
    base, others = _pairs(rng)
    act = f"abrelu(a={a!r}, b={b!r})"
    spec = f"{depth} * [dense(w_std={w_std!r}, b_std={b_std!r}), {act}], " \
           f"dense(w_std={w_std!r}, b_std={b_std!r})"
    got = lk.kernel(spec, base[None, :], others)
    for j, other in enumerate(others):
        (_, ref_k, _), (_, ref_t, _) = kernel_mp(spec, base, other, dps=50)
        np.testing.assert_allclose(got["nngp"][0, j], ref_k, rtol=1e-13, atol=0)
        np.testing.assert_allclose(got["ntk"][0, j], ref_t, rtol=1e-13, atol=0)


def test_symmetric_and_cross_agree_on_near_duplicates():
    rng = np.random.default_rng(7)
    base, others = _pairs(rng)
    x = np.vstack([base, others])
    spec = "3 * [dense(w_std=1.5, b_std=0.05), relu], dense(w_std=1.5, b_std=0.05)"
    sym = lk.kernel(spec, x)
    cross = lk.kernel(spec, x, x.copy())
    for kind in ("nngp", "ntk"):
        np.testing.assert_allclose(sym[kind], cross[kind], rtol=1e-14, atol=0)
