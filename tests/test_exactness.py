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

def _pairs(rng, d=16, distances=(1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4)):
    base = rng.standard_normal(d)
    out = []
    for eps in distances:
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


@pytest.mark.parametrize("spec", [
    "dense, sign, dense, relu, dense",
    "dense(w_std=0.7), step, dense(w_std=1.5, b_std=0.2), relu, dense",
    "dense(w_std=1.3), sign, dense, abs, dense(b_std=0.1), relu, dense",
])
def test_inputs_closer_than_1e9_through_step_and_sign_match_mpmath(spec):
    # Step and sign turn 1 − ρ ≈ d² into 1 − ρ' ≈ d, and a later ReLU takes its
    # root: the inputs' 1 − ρ must hold its relative precision at any distance
    # (from unit vectors in two parts; with one part it held about 1e-16/d,
    # and Θ erred by 1.7e-11 at d = 1e-14).
    rng = np.random.default_rng(12)
    base, others = _pairs(rng, distances=(1e-10, 1e-12, 1e-14, 1e-15))
    others = np.vstack([others, 3.0 * others[:2]])  # and scaled: only the angle counts
    got = lk.kernel(spec, base[None, :], others)
    for j, other in enumerate(others):
        (_, ref_k, _), (_, ref_t, _) = kernel_mp(spec, base, other, dps=50)
        np.testing.assert_allclose(got["nngp"][0, j], ref_k, rtol=1e-13, atol=0)
        np.testing.assert_allclose(got["ntk"][0, j], ref_t, rtol=1e-13, atol=0)


@pytest.mark.parametrize("spec", [
    "dense(b_std=0.05), sign, dense(b_std=0.3), relu, dense",
    "dense(b_std=0.2), step, dense(w_std=1.5), relu, dense",
])
def test_a_bias_before_step_or_sign_meets_the_documented_bound(spec):
    # With a bias, the first dense layer's 1 − ρ depends on the difference of
    # the inputs' norms, taken from the two norms rounded apart; the README
    # states Θ to about 2e-13 at distance 1e-10, 1e-12 at 1e-12, 6e-11 at 1e-15.
    # Bounds here: twice those, over random directions and scales.
    rng = np.random.default_rng(14)
    for trial in range(4):
        base = rng.standard_normal(int(rng.integers(2, 20))) * 10.0 ** rng.uniform(-3, 3)
        for dist, bound in ((1e-10, 4e-13), (1e-12, 2e-12), (1e-15, 1.2e-10)):
            step = rng.standard_normal(base.shape)
            other = base + step * dist * np.linalg.norm(base) / np.linalg.norm(step)
            got = lk.kernel(spec, base[None], other[None])
            (_, ref_k, _), (_, ref_t, _) = kernel_mp(spec, base, other, dps=50)
            np.testing.assert_allclose(got["nngp"][0, 0], ref_k, rtol=1e-13, atol=0)
            np.testing.assert_allclose(got["ntk"][0, 0], ref_t, rtol=bound, atol=0)
