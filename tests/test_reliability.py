"""No silent wrong numbers: the corner cases a fuzzing pass found, each pinned.

References are the mpmath recursion of :mod:`reference` (independent of the
package's closed forms) or values the maths fixes exactly (identical inputs give
the diagonal; a layer that is invariant to the input scale gives the same
kernel at every scale).
"""

import re
import warnings

import numpy as np
import pytest
from reference import kernel_mp

import limitkernel as lk

# The PrecisionWarning of these steep layers bounds their worst case, between
# nearly antiparallel inputs; these inputs (checked against mpmath) do not reach it.
_NOT_ANTIPARALLEL = pytest.mark.filterwarnings("ignore::limitkernel.gram.PrecisionWarning")


def _close_to_mp(spec, x, rtol=1e-13):
    got = lk.kernel(spec, x)
    for i in range(len(x)):
        for j in range(len(x)):
            (k11, k12, k22), (t11, t12, t22) = kernel_mp(spec, x[i], x[j])
            assert abs(got["nngp"][i, j] - k12) <= rtol * np.sqrt(k11 * k22), (i, j)
            assert abs(got["ntk"][i, j] - t12) <= rtol * np.sqrt(t11 * t22), (i, j)


@pytest.mark.parametrize("act", ["sin", "cos", "rbf"])
def test_trig_layers_on_large_inputs_are_finite_and_right(act):
    """e1·expm1(...) was 0·inf: NaN off the diagonal for inputs 345 and 330."""
    _close_to_mp(f"dense, {act}, dense, relu, dense", np.array([[345.0], [330.0]]))
    x = np.random.default_rng(0).standard_normal((200, 5)) * 30
    if act == "rbf":
        # At this scale rbf decorrelates every pair: a degenerate kernel, said so.
        with pytest.warns(lk.gram.DegenerateKernelWarning, match="chaotic"):
            out = lk.kernel(f"dense, {act}, dense, relu, dense", x)
    else:
        out = lk.kernel(f"dense, {act}, dense, relu, dense", x)
    assert np.all(np.isfinite(out["nngp"])) and np.all(np.isfinite(out["ntk"]))


@pytest.mark.parametrize("spec", [
    "dense, softsign, dense, step, dense, step, dense",
    "dense, elu, dense, relu, dense",
    "dense, elu, dense, step, dense, relu, dense",
    "dense, tanh, dense, relu, dense",
    "dense(b_std=0.5), erf, dense, relu, dense",
    "dense, layernorm, erf, dense, sign, dense, relu, dense",
    "dense(b_std=0.2), gelu, dense, gaussian(b=-0.3), dense, relu, dense",
    "dense, 3 * [residual[relu, dense(b_std=0.1)]], tanh, dense",
])
def test_identical_inputs_give_exactly_the_diagonal(spec):
    """Before: 0.4872 where every entry is 0.5 (softsign → step), NTK errors up to
    5e-3: 1 − ρ was recomputed with rounding after smooth and series layers."""
    x = np.random.default_rng(0).standard_normal((3, 8))
    x[1] = x[0]
    out = lk.kernel(spec, x)
    # The same inputs on both sides (a Hermite series is cut after the same number
    # of terms for every input of one call, chosen from all of them).
    cross = lk.kernel(spec, x, x.copy())
    for kind in ("nngp", "ntk"):
        assert out[kind][0, 1] == out[kind][0, 0] == out[kind][1, 1]
        assert cross[kind][0, 1] == cross[kind][1, 0] == out[kind][0, 0]
        assert lk.kernel_diag(spec, x)[kind][0] == out[kind][0, 0]


@_NOT_ANTIPARALLEL
def test_huge_inputs_of_erf_and_gelu_do_not_overflow():
    """Δ = (1 + 2b²q11)(1 + 2b²q22) − 4b⁴q12² overflowed at inputs of 1e78: K = Θ = 0.
    The kernel of these networks depends on the inputs only through their
    correlation at such scales, so 1e76 and 1e78 must agree to rounding (all of K,
    and Θ between the two inputs; Θ(x, x) grows like |x|, through the first
    layer's share)."""
    x = np.array([[1.0, 0.0], [0.6, 0.8]])
    for spec in ("dense, erf, dense", "dense(b_std=0.1), erf(b=0.5), dense, relu, dense"):
        big, ref = lk.kernel(spec, x * 1e78), lk.kernel(spec, x * 1e76)
        np.testing.assert_allclose(big["nngp"], ref["nngp"], rtol=1e-13)
        np.testing.assert_allclose(big["ntk"][0, 1], ref["ntk"][0, 1], rtol=1e-13)
    np.testing.assert_allclose(lk.kernel("dense, erf, dense", x * 1e78)["nngp"][0, 1],
                               0.4096655293982689, rtol=1e-13)  # (2/π) asin(0.6)
    gelu = "dense, gelu, dense, relu, dense"
    for kind in ("nngp", "ntk"):
        a = lk.kernel(gelu, x * 1e78)[kind] / 1e156
        b = lk.kernel(gelu, x * 1e76)[kind] / 1e152
        np.testing.assert_allclose(a, b, rtol=1e-12)


@_NOT_ANTIPARALLEL
def test_gaussian_on_large_inputs_with_mixed_signs():
    """Entries were off by 6–37 % and the kernel was not positive semi-definite."""
    x = np.random.default_rng(0).standard_normal((4, 1)) * 1e7
    _close_to_mp("dense, gaussian(a=1, b=-1), dense", x)


@_NOT_ANTIPARALLEL
def test_gaussian_at_variances_whose_product_overflows():
    """Found by fuzzing: q11 q22 overflowed above variances of ~1e154 (inf · 0 for an
    input with itself), and a decaying gaussian (b < 0), whose kernel is finite at
    every variance, was refused as an overflow."""
    spec = ("dense(parameterization=standard, width=1), gaussian(a=1.0, b=-1.0), "
            "dense(parameterization=standard)")
    _close_to_mp(spec, np.array([[0.1257302210933933], [-1.3210486329130188e+77]]))
    _close_to_mp(spec, np.array([[3e80], [-1e79]]))


# At this scale cos's kernel is the same for every pair, which a warning says.
@pytest.mark.filterwarnings("ignore::limitkernel.gram.DegenerateKernelWarning")
@pytest.mark.parametrize("act", ["rbf(gamma=0.646)", "sin", "cos"])
def test_trig_layers_on_huge_antiparallel_inputs(act):
    """Found by fuzzing: q11 + q22 + 2 q12 rounded below 0 for x and −x at variances
    of 1e119, exp of it overflowed, and rbf's K came out NaN (refused)."""
    x = np.array([[-3.0103019816147397e+56], [3.0103019816147397e+56]])
    _close_to_mp(f"dense(w_std=3.0), dense(w_std=1.63), {act}, dense", x)


def test_scale_invariant_layernorm_refuses_underflowing_inputs():
    """layernorm(eps=0) on x·1e-165 gave an all-zero kernel (x·x/d underflows)."""
    x = np.random.default_rng(0).standard_normal((4, 3))
    spec = "dense, layernorm(eps=0), relu, dense"
    with pytest.raises(FloatingPointError, match="too small"):
        lk.kernel(spec, x * 1e-165)
    ref = lk.kernel(spec, x)["nngp"]
    np.testing.assert_allclose(lk.kernel(spec, x * 1e-120)["nngp"], ref, rtol=1e-13)


def test_tiny_weights_are_refused_not_rounded_away():
    """dense(w_std=1.1e-101) gave a non-PSD kernel that differed between kernel(x)
    and kernel(x, x) by 2.3 %: the variances left float64's precise range."""
    x = np.random.default_rng(0).standard_normal((4, 3))
    with pytest.raises(FloatingPointError, match="underflow at layer"):
        lk.kernel("dense(w_std=1.1e-101), relu, dense(w_std=1.1e-101), relu, "
                  "dense(w_std=1.1e-101)", x)


def test_complex_and_masked_inputs_are_refused():
    x = np.ones((3, 2))
    with pytest.raises(ValueError, match="complex"):
        lk.kernel("dense, relu, dense", x + 1j)
    with pytest.raises(ValueError, match="masked"):
        lk.kernel("dense, relu, dense", np.ma.masked_array(x, mask=[[1, 0]] * 3))


def test_a_kernel_that_is_not_finite_names_the_layer():
    """exp(b=30) on inputs of size 30 overflows in the pass, not on the diagonal's
    scale alone: the error names the layer instead of returning inf."""
    x = np.array([[1.0, 0.0], [0.0, 1.0]]) * 30
    with pytest.raises(FloatingPointError, match=r"layer 2 \(exp"):
        lk.kernel("dense, exp(b=3), dense", x)


@pytest.mark.parametrize("act", ["sin", "cos", "sin(a=1.5, b=0.5, c=0.3)", "rbf"])
@pytest.mark.parametrize("scale", [1e-3, 1e-6, 1e-9])
# cos and rbf of tiny inputs are 1 to working precision for every pair, which the
# kernel rightly warns about; their entries are still checked here.
@pytest.mark.filterwarnings("ignore::limitkernel.gram.DegenerateKernelWarning")
def test_trig_layers_on_small_inputs_keep_their_precision(act, scale):
    """E[sin²] = (1 − e^(−2q))/2 was formed by cancellation (found by fuzzing): K
    of sin off by 8e-8 at q = 1e-10 and 8e-4 at q = 1e-14, Θ of cos likewise."""
    x = scale * np.array([[1.0, 0.5], [0.7, -0.2], [-0.3, 0.9]])
    _close_to_mp(f"dense, {act}, dense", x)


@_NOT_ANTIPARALLEL
@pytest.mark.parametrize("scale", [1e20, 1e30, 1e43, 1e70])
def test_gelu_at_large_variances_is_finite_and_right(scale):
    """Found by fuzzing: below the scaled branch (r11 r22 < 1e100) (q11 q22)² R
    overflowed, and variances of ~1e86 were refused as not finite. (The mpmath
    reference needed more digits there too.)"""
    x = scale * np.array([[1.0, 0.5], [0.7, -0.2], [-0.3, 0.9]])
    _close_to_mp("dense, gelu, dense", x)


def test_a_zero_input_through_a_block_is_not_an_underflow():
    """Found by fuzzing: a zero input has variance 0 again when a block's branch
    starts (LOAD), after positive variances in the previous branch; that was
    refused as an underflow."""
    spec = ("dense, parallel[identity; dense(b_std=1.0), relu, dense; dense, relu, dense], "
            "dense")
    x = np.array([[0.5, -0.2], [0.0, 0.0]])
    _close_to_mp(spec, x)


@pytest.mark.parametrize(("act", "scale"), [("erf", 100.0), ("erf", 1e4),
                                            ("gaussian(b=-1)", 100.0), ("gaussian(b=-1)", 1e4),
                                            ("gelu", 1e4), ("gelu", 1e6)])
def test_steep_layers_warn_with_a_bound_that_holds_between_antiparallel_inputs(act, scale):
    """1 + ρ is known to ε only; erf, gaussian and GELU scale 1 − ρ² by the variance.

    The warning's bound is checked against the mpmath recursion on inputs that
    are antiparallel (exactly and to 1e-9) at this layer."""
    spec = f"dense, {act}, dense"
    x = np.random.default_rng(0).standard_normal((1, 5)) * scale
    x = np.vstack([x, -x, -0.884 * x * (1 + 1e-9), 0.3 * x[0, ::-1]])
    with pytest.warns(lk.PrecisionWarning, match=r"layer 2 .*antiparallel") as record:
        got = lk.kernel(spec, x)
    bounds = [float(v) for v in
              re.findall(r"([0-9.e+-]+) \((?:K|Θ)\)", str(record[0].message))]
    k_bound, t_bound = bounds
    for j in range(1, len(x)):
        (k11, k12, k22), (t11, t12, t22) = kernel_mp(spec, x[0], x[j], dps=60)
        assert abs(got["nngp"][0, j] - k12) <= (k_bound + 1e-13) * np.sqrt(k11 * k22), j
        assert abs(got["ntk"][0, j] - t12) <= (t_bound + 1e-13) * np.sqrt(t11 * t22), j


def test_ordinary_erf_does_not_warn():
    x = np.random.default_rng(1).standard_normal((30, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", lk.PrecisionWarning)
        lk.kernel("dense(w_std=1.5), erf, dense, gelu, dense, gaussian(b=-1), dense", x)


def test_an_erf_too_steep_for_float64_says_so():
    """Found by fuzzing: inputs of scale 1e64 made erf's Θ factor depend on 1 + ρ at
    1e-128; the NTK came out 6% away from positive semi-definite, silently."""
    x = np.array([[1.0078846473146884e+64, -9.541417790467454e+63],
                  [-8.909700282261845e+63, 8.43461332677323e+63],
                  [-1.0078846473146884e+64, 9.541417790467454e+63]])
    with pytest.warns(lk.PrecisionWarning, match=r"layer 2 \(erf.*and \d+e\+\d+ \(Θ\)"):
        lk.kernel("dense, erf(a=0.258, b=-2.19), dense", x)


@pytest.mark.parametrize("shape, spec", [((5,), "dense, erf, dense"),
                                         ((2, 2, 1), "conv, erf, flatten, dense")])
def test_a_cross_kernel_warns_once_with_the_larger_variance(shape, spec):
    # Pairs take one input from each set: one warning, at the largest variance
    # of either (each set used to warn on its own).
    rng = np.random.default_rng(3)
    x1 = rng.standard_normal((3,) + shape) * 1e4
    x2 = rng.standard_normal((2,) + shape) * 1e5
    with pytest.warns(lk.PrecisionWarning) as record:
        lk.kernel(spec, x1, x2)
    messages = [str(r.message) for r in record if r.category is lk.PrecisionWarning]
    assert len(messages) == 1, messages
    with pytest.warns(lk.PrecisionWarning) as alone:
        lk.kernel(spec, x2)
    assert messages[0] == str(alone[0].message)
