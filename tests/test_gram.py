"""The public Gram API: properties, agreement with a plain reference, errors."""

import re
import warnings

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import limitkernel as lk
from limitkernel.gram import DegenerateKernelWarning
from limitkernel.layers.numerical import SeriesTruncationWarning

RELU3 = "3 * [dense(w_std=1.5, b_std=0.05), relu], dense(w_std=1.5, b_std=0.05)"
SPECS = [
    RELU3,
    "dense(w_std=1.3, b_std=0.2), erf(a=1.3, b=0.7, c=0.2), dense",
    "2 * [dense(w_std=1.4142135623730951), leaky_relu(alpha=0.1)], dense",
    "dense(b_std=0.3), abs, dense(w_std=0.8), relu, dense",
]


def plain_relu_reference(x1, x2, depth, w_std, b_std):
    """Layer-by-layer numpy recursion with full matrices and a plain arccos."""
    d = x1.shape[1]
    w2, b2 = w_std ** 2, b_std ** 2
    k = x1 @ x2.T / d
    k1, k2 = (x1 * x1).sum(1) / d, (x2 * x2).sum(1) / d
    t = np.zeros_like(k)
    for _ in range(depth):
        k, k1, k2 = w2 * k + b2, w2 * k1 + b2, w2 * k2 + b2
        t = k + w2 * t
        norm = np.sqrt(np.outer(k1, k2))
        angle = np.arccos(np.clip(k / norm, -1, 1))
        k = norm * (np.sin(angle) + (np.pi - angle) * np.cos(angle)) / (2 * np.pi)
        t = t * (np.pi - angle) / (2 * np.pi)
        k1, k2 = k1 / 2, k2 / 2
    k = w2 * k + b2
    return k, k + w2 * t


def test_relu_matches_plain_reference_off_diagonal():
    rng = np.random.default_rng(0)
    x1, x2 = rng.standard_normal((40, 12)), rng.standard_normal((30, 12))
    got = lk.kernel(RELU3, x1, x2)
    ref_k, ref_t = plain_relu_reference(x1, x2, 3, 1.5, 0.05)
    # Well-separated random inputs: the plain arccos is accurate to ~1e-15 here.
    np.testing.assert_allclose(got["nngp"], ref_k, rtol=1e-12)
    np.testing.assert_allclose(got["ntk"], ref_t, rtol=1e-12)


@pytest.mark.parametrize("spec", SPECS)
def test_symmetric_equals_cross_and_diag(spec):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((37, 9))
    sym = lk.kernel(spec, x)
    cross = lk.kernel(spec, x, x.copy())
    diag = lk.kernel_diag(spec, x)
    for kind in ("nngp", "ntk"):
        np.testing.assert_allclose(sym[kind], sym[kind].T, rtol=0, atol=0)
        np.testing.assert_allclose(sym[kind], cross[kind], rtol=1e-13)
        np.testing.assert_allclose(np.diag(sym[kind]), diag[kind], rtol=1e-14)
        np.testing.assert_allclose(np.diag(cross[kind]), diag[kind], rtol=1e-13)


@pytest.mark.parametrize("spec", SPECS)
def test_positive_semidefinite_and_permutation_equivariant(spec):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 6))
    out = lk.kernel(spec, x)
    perm = rng.permutation(50)
    permuted = lk.kernel(spec, x[perm])
    for kind in ("nngp", "ntk"):
        eig = np.linalg.eigvalsh(out[kind])
        assert eig[0] > -1e-12 * eig[-1]
        np.testing.assert_allclose(permuted[kind], out[kind][np.ix_(perm, perm)],
                                   rtol=1e-13)


@given(arrays(np.float64, (6, 4), elements=st.floats(-3, 3)),
       st.floats(0.1, 10.0), st.integers(1, 4))
# An input of subnormal variance once turned 1/√(q11 q22) into inf and the entry
# of the input with itself into NaN; such inputs are now refused.
@example(x=np.diag([2.06113605e-161, 0.0, 0.0, 0.0])[[0, 1, 1, 1, 1, 1]], scale=0.125,
         depth=1)
# Random inputs (all rows equal) may leave the kernel degenerate, which it rightly
# warns about; homogeneity holds either way.
@pytest.mark.filterwarnings("ignore::limitkernel.gram.DegenerateKernelWarning")
def test_relu_without_bias_is_homogeneous(x, scale, depth):
    # K(λx, μx') = λμ K(x, x') for ReLU without biases, and the same for Θ.
    spec = f"{depth} * [dense(w_std=1.4142135623730951), relu], dense"
    tiny = (np.einsum("ij,ij->i", x, x) / x.shape[1] < 1e-280) & np.any(x != 0, axis=1)
    if tiny.any():
        # Variances below float64's precise range are refused, never rounded away.
        with pytest.raises(FloatingPointError, match="too small"):
            lk.kernel(spec, x, x[::-1].copy())
        return
    base = lk.kernel(spec, x, x[::-1].copy())
    scaled = lk.kernel(spec, scale * x, x[::-1].copy())
    for kind in ("nngp", "ntk"):
        # Entries that vanish (antiparallel inputs) are compared on the kernel's
        # scale. Only 1 − ρ is carried accurately, not 1 + ρ, so at exactly
        # antiparallel inputs θ ≈ π has an absolute error of √eps ≈ 1.5e-8 and
        # the NTK an error of that order relative to its scale (README, Accuracy).
        # Subnormal entries carry an absolute error up to the smallest normal.
        assert np.all(np.isfinite(base[kind])) and np.all(np.isfinite(scaled[kind]))
        atol = 3e-8 * scale * np.abs(base[kind]).max() + np.finfo(float).tiny
        np.testing.assert_allclose(scaled[kind], scale * base[kind], rtol=1e-12, atol=atol)


@given(arrays(np.float64, st.tuples(st.integers(1, 8), st.integers(1, 5)),
              elements=st.floats(-5, 5)))
# Random inputs (constant rows, one feature) may leave the kernel degenerate, which
# it rightly warns about; the property checked here holds either way.
@pytest.mark.filterwarnings("ignore::limitkernel.gram.DegenerateKernelWarning")
def test_k_of_x_equals_k_of_x_x_and_diag(x):
    kern = lk.Kernel(RELU3, kind="ntk")
    if np.any((np.einsum("ij,ij->i", x, x) / x.shape[1] < 1e-280) & np.any(x != 0, axis=1)):
        # Variances below float64's precise range are refused, never rounded away.
        with pytest.raises(FloatingPointError, match="too small"):
            kern(x)
        return
    full = kern(x)
    assert np.all(np.isfinite(full))
    np.testing.assert_allclose(full, kern(x, x.copy()), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(np.diag(full), kern.diag(x), rtol=1e-14, atol=1e-300)


def test_zero_inputs_and_duplicates_stay_finite():
    x = np.array([[0.0, 0.0], [1.0, 2.0], [1.0, 2.0], [-1.0, -2.0]])
    for spec in SPECS:
        out = lk.kernel(spec, x)
        for value in out.values():
            assert np.all(np.isfinite(value))
        np.testing.assert_allclose(out["ntk"][1, 2], out["ntk"][1, 1], rtol=1e-14)


def test_float32_output_is_rounded_float64():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 10))
    f64 = lk.kernel(RELU3, x)
    f32 = lk.kernel(RELU3, x, dtype="float32")
    for kind in ("nngp", "ntk"):
        assert f32[kind].dtype == np.float32
        # Arithmetic is float64, so only the final rounding (2^-24) remains.
        np.testing.assert_allclose(f32[kind], f64[kind], rtol=2 ** -24, atol=0)


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_float32_output_outside_float32s_range(precision):
    # Found by fuzzing: K = 1.6e40 came out as inf in float32, and K = 1.6e-42 kept
    # 3 digits. Beyond the range is refused; below the normal range warns with
    # the bound (half a subnormal over the smallest scale).
    spec = "dense(parameterization=standard), dense"
    with pytest.raises(FloatingPointError, match=r"K reaches 1\.58e\+40 on the diagonal, "
                       r"beyond float32's range \(3\.4e\+38\)"):
        lk.kernel(spec, np.array([[1.257302210933933e20], [1.0]]), dtype="float32",
                  precision=precision)
    x = np.array([[1.257302210933933e-21], [6e-22]])
    with pytest.warns(lk.PrecisionWarning, match=r"K falls to 3\.6e-43 on the diagonal.*"
                      r"off by up to 0\.002 of √\(K\(x, x\) K\(x', x'\)\)"):
        out = lk.kernel(spec, x, get="nngp", dtype="float32", precision=precision)
    exact = lk.kernel(spec, x, get="nngp")["nngp"]
    error = np.abs(out["nngp"] - exact) / np.sqrt(np.outer(np.diag(exact), np.diag(exact)))
    assert 1e-4 < error.max() <= 0.002
    # Nothing to say at ordinary scales, or in float64.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lk.kernel(spec, x * 1e12, get="nngp", dtype="float32", precision=precision)
        lk.kernel(spec, x, get="nngp")


def test_a_dense_layer_gives_a_pair_the_same_correlation_in_either_order():
    # Found by fuzzing: 1-d inputs are exactly antiparallel here, and a dense
    # layer rounded the pair's ρ differently as (x, x') and as (x', x) (its two
    # inverse roots applied in argument order); tanh's 2000-term series at
    # |ρ| = 1 then turned that ulp into 4.4e-14 of the NTK between kernel(x)
    # and kernel(x, x.copy()).
    spec = ("dense(w_std=1.25, parameterization=standard, width=1), tanh, "
            "dense(parameterization=standard)")
    x = np.array([[12.57302210933933], [-13.21048632913019]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SeriesTruncationWarning)  # variance 250
        sym, cross = lk.kernel(spec, x), lk.kernel(spec, x, x.copy())
    for kind in ("nngp", "ntk"):
        np.testing.assert_array_equal(cross[kind], cross[kind].T)
        np.testing.assert_array_equal(sym[kind], cross[kind])


def test_outputs_start_on_a_cache_line():
    # The pass mirrors a group of rows one 64-byte line per output row; the
    # outputs are C-contiguous arrays of their own, whatever the dtype.
    x = np.random.default_rng(4).standard_normal((40, 6))
    plan = lk.gram.prepare(RELU3, x)
    for out in (*lk.kernel(RELU3, x).values(), *lk.kernel(RELU3, x, dtype="float32").values(),
                *plan.tile(3, 17, 5, 40).values()):
        assert out.ctypes.data % 64 == 0
        assert out.flags["C_CONTIGUOUS"] and out.flags["WRITEABLE"]


def test_get_one_kernel_and_many_row_blocks(monkeypatch):
    from limitkernel import gram

    rng = np.random.default_rng(4)
    x = rng.standard_normal((100, 5))
    whole = lk.kernel(RELU3, x)
    monkeypatch.setattr(gram, "_BLOCK_BYTES", 8 * 100 * 16)  # 16-row blocks
    blocked = lk.kernel(RELU3, x)
    only = lk.kernel(RELU3, x, get="ntk")
    assert list(only) == ["ntk"]
    # Different row blocks change only the GEMM's summation order.
    np.testing.assert_allclose(blocked["ntk"], whole["ntk"], rtol=1e-13)
    np.testing.assert_array_equal(only["ntk"], blocked["ntk"])


@pytest.mark.parametrize("x2_rows", [None, 37])
def test_float32_output_in_chunks_of_rows(monkeypatch, x2_rows):
    from limitkernel import gram

    rng = np.random.default_rng(8)
    x = rng.standard_normal((100, 5))
    x2 = None if x2_rows is None else rng.standard_normal((x2_rows, 5))
    whole = lk.kernel(RELU3, x, x2, dtype="float32")
    monkeypatch.setattr(gram, "_BLOCK_BYTES", 8 * 100 * 16)  # 16-row GEMM blocks
    monkeypatch.setattr(gram, "_SCRATCH_BYTES", 8 * 100 * 40)  # 40-row chunks
    assert gram._chunks(100, 100, False)[:2] == [(0, 40), (40, 80)]
    chunked = lk.kernel(RELU3, x, x2, dtype="float32")
    f64 = lk.kernel(RELU3, x, x2)
    for kind in ("nngp", "ntk"):
        # Chunks change only the GEMM's summation order, well below float32's rounding.
        np.testing.assert_allclose(chunked[kind], whole[kind], rtol=2 ** -23, atol=0)
        np.testing.assert_allclose(chunked[kind], f64[kind], rtol=2 ** -24, atol=0)
        if x2 is None:
            np.testing.assert_array_equal(chunked[kind], chunked[kind].T)


def test_integer_and_noncontiguous_inputs_are_converted():
    x = np.arange(60).reshape(6, 10)
    as_float = np.ascontiguousarray(x[:, ::2], dtype=float)
    np.testing.assert_array_equal(lk.kernel(RELU3, x[:, ::2])["ntk"],
                                  lk.kernel(RELU3, as_float)["ntk"])


@pytest.mark.parametrize("x1, x2, message", [
    (np.ones(5), None, "2D array"),
    (np.ones((0, 3)), None, "empty"),
    (np.array([[1.0, np.nan]]), None, "NaN or inf .first at row 0, column 1"),
    (np.ones((2, 3)), np.ones((2, 4)), "same number of features"),
    (np.ones((2, 3)), np.array([[1, 2, np.inf]]), "x2 contains NaN or inf"),
])
def test_bad_inputs_get_clear_errors(x1, x2, message):
    with pytest.raises(ValueError, match=message):
        lk.kernel(RELU3, x1, x2)


def test_bad_arguments():
    x = np.ones((3, 2))
    with pytest.raises(ValueError, match="get must name"):
        lk.kernel(RELU3, x, get="cov")
    with pytest.raises(ValueError, match="dtype must be float64 or float32"):
        lk.kernel(RELU3, x, dtype="int32")
    with pytest.raises(lk.SpecError, match="dense readout"):
        lk.kernel("dense, relu", x)
    with pytest.raises(lk.SpecError, match="width"):
        lk.kernel("dense(parameterization=standard), relu, dense(parameterization=standard)", x)


def test_refuses_what_will_not_fit():
    x = np.ones((1000, 3))
    # two 1000 x 1000 float64 outputs (16 MB; the GEMM is formed in one of them)
    # and the inputs and their normalised copies (2 x 2000 x 3 x 8 B)
    with pytest.raises(lk.MemoryBudgetError, match="need 16.1 MB but only 1 MB is available"):
        lk.kernel(RELU3, x, memory_limit=1_000_000)
    # float32: two 4 MB outputs, the inputs, and the float64 GEMM of the rows (8 MB)
    with pytest.raises(lk.MemoryBudgetError, match="need 16.1 MB but only 1 MB is available"):
        lk.kernel(RELU3, x, dtype="float32", memory_limit=1_000_000)
    # float32 products: the outputs hold the GEMM; the unit vectors in float32 (24 kB)
    with pytest.raises(lk.MemoryBudgetError, match="need 8.17 MB but only 1 MB is available"):
        lk.kernel(RELU3, x, dtype="float32", memory_limit=1_000_000, precision="float32")


def test_one_kernel_needs_one_output():
    # The refusal above advises get='ntk': one 1000 x 1000 output (8 MB) then
    # fits in 12 MB, where both kernels (16.1 MB) do not.
    x = np.random.default_rng(8).standard_normal((1000, 3))
    with pytest.raises(lk.MemoryBudgetError, match="need 16.1 MB"):
        lk.kernel(RELU3, x, memory_limit=12_000_000)
    only = lk.kernel(RELU3, x, get="ntk", memory_limit=12_000_000)
    assert list(only) == ["ntk"]
    np.testing.assert_array_equal(only["ntk"], lk.kernel(RELU3, x)["ntk"])


def test_overflow_is_reported():
    with pytest.raises(FloatingPointError, match="overflows at layer"):
        lk.kernel("200 * [dense(w_std=100), relu], dense", np.ones((2, 2)))


# The gaussian's PrecisionWarning bounds pairs of nearly antiparallel inputs; this
# test holds the diagonals only.
@pytest.mark.filterwarnings("ignore::limitkernel.gram.PrecisionWarning")
def test_series_after_a_gaussian_at_huge_variances():
    # Found by fuzzing: the gaussian layer of b = -1 (finite at every variance)
    # gave NaN variances at input scale 1e78, and the tanh after it raised a bare
    # ValueError. Now each input's K(x, x) and Θ(x, x) match mpmath (the series'
    # bound, tol = 1e-12, relative).
    from reference import kernel_mp

    spec = ("dense(parameterization=standard, width=1), gaussian(a=1.0, b=-1.0), "
            "dense(parameterization=standard, width=1), residual[dense(parameterization="
            "standard, width=1), tanh, dense(parameterization=standard, width=1)], "
            "dense(parameterization=standard)")
    x = np.array([[0.1257302210933933], [6.404226504432821e+77]])
    got = lk.kernel(spec, x)
    for i in range(2):
        (k, _, _), (t, _, _) = kernel_mp(spec, x[i], x[i], dps=60)
        assert abs(got["nngp"][i, i] - k) <= 1e-11 * k
        assert abs(got["ntk"][i, i] - t) <= 1e-11 * t


def test_degenerate_deep_kernel_warns():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 3))
    spec = "60 * [dense(w_std=0.5, b_std=1.0), erf], dense"
    with pytest.warns(DegenerateKernelWarning, match="degenerate"):
        lk.kernel(spec, x, get="nngp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lk.kernel(RELU3, x)


def test_standard_parameterisation_follows_fan_in():
    # Standard: Θ ← n_in K_in + 1 + σ_w² Θ, with n_in the previous layer's width
    # (the input dimension for the first); K is the same as in "ntk".
    rng = np.random.default_rng(6)
    x = rng.standard_normal((5, 4))
    std = lk.kernel("dense(w_std=1.5, b_std=0.1, parameterization=standard, width=64), "
                    "relu, dense(w_std=1.5, b_std=0.1, parameterization=standard)", x)
    ntk = lk.kernel("dense(w_std=1.5, b_std=0.1), relu, dense(w_std=1.5, b_std=0.1)", x)
    np.testing.assert_allclose(std["nngp"], ntk["nngp"], rtol=1e-14)
    k0 = x @ x.T / 4
    k1 = 2.25 * k0 + 0.01
    norm = np.sqrt(np.outer(np.diag(k1), np.diag(k1)))
    angle = np.arccos(np.clip(k1 / norm, -1, 1))
    relu_k = norm * (np.sin(angle) + (np.pi - angle) * np.cos(angle)) / (2 * np.pi)
    relu_dot = (np.pi - angle) / (2 * np.pi)
    expected = 64 * relu_k + 1 + 2.25 * (4 * k0 + 1) * relu_dot
    np.testing.assert_allclose(std["ntk"], expected, rtol=1e-9)


@pytest.mark.parametrize("spec, unsaid", [
    # the standard readout's NTK is n·K + ..., n the hidden width: never said
    ("dense, relu, dense(parameterization=standard)", "layer 1 (dense)"),
    ("dense(width=8), relu, dense, dense(parameterization=standard)", "layer 3 (dense)"),
    # a concat's width is the sum of its branches': one unsaid leaves it unsaid
    (("dense(width=3), concat[relu, dense(width=4); erf, dense], "
      "dense(parameterization=standard)"), "branch 2: layer 2 (dense)"),
])
def test_standard_layer_after_an_unsaid_width_is_refused(spec, unsaid):
    x = np.random.default_rng(6).standard_normal((3, 4))
    with pytest.raises(lk.SpecError, match="leaves its width unsaid") as err:
        lk.kernel(spec, x)
    assert unsaid in str(err.value) and "width=" in str(err.value)


def test_a_standard_layer_states_its_width_only_for_a_standard_layer_after_it():
    # Its own NTK needs its input width, not its output width: that enters only
    # the NTK of a later "standard" layer. Before it, an "ntk" layer reads none.
    x = np.random.default_rng(6).standard_normal((5, 4))
    for tail in ("relu, dense", "erf, dense(width=3), relu, dense(parameterization=standard)"):
        spec = "dense(w_std=1.5, b_std=0.1, parameterization=standard{}), " + tail
        said = lk.kernel(spec.format(", width=64"), x)
        for kind, value in lk.kernel(spec.format(""), x).items():
            np.testing.assert_array_equal(value, said[kind])
    with pytest.raises(lk.SpecError, match=r"layer 1 \(dense\(parameterization=standard\)\) "
                       "leaves its width unsaid"):
        lk.kernel("dense(parameterization=standard), relu, dense(parameterization=standard)",
                  x)


def test_a_sum_takes_the_width_its_branches_state():
    # Summed branches have one width in every network, so the one the skip
    # connection or a branch states is the fan-in of the next standard layer
    # (Θ ← n K + 1 + σ_w² Θ, K the block's output); different stated widths are
    # refused.
    x = np.random.default_rng(6).standard_normal((3, 4))
    # An ntk readout (σ_w = 1, σ_b = 0) gives K and K + Θ of the block's output.
    ntk = lk.kernel("dense(width=5), residual[relu, dense], dense", x)
    block_k, block_t = ntk["nngp"], ntk["ntk"] - ntk["nngp"]
    for stated_by in ("dense, residual[relu, dense(width=5)]",
                      "dense(width=5), residual[relu, dense]"):
        got = lk.kernel(f"{stated_by}, dense(parameterization=standard)", x)
        np.testing.assert_allclose(got["ntk"], 5 * block_k + 1 + block_t, rtol=1e-14)
    with pytest.raises(lk.SpecError, match="widths 3 and 5, but a sum needs them equal"):
        lk.kernel("dense(width=3), residual[relu, dense(width=5)], "
                  "dense(parameterization=standard)", x)
    with pytest.raises(lk.SpecError, match="the branches end with widths 2 and 7"):
        lk.kernel("dense, parallel[relu, dense(width=7); erf, dense(width=2)], "
                  "dense(parameterization=standard)", x)


# ------------------------------------------------- input products in float32

# Networks of each kind of slope in ρ: ReLU's Θ (1/sin θ near ρ = 1), step and
# sign (K itself), erf and tanh (χ > 1: errors in ρ grow layer by layer).
PRODUCT_SPECS = [
    RELU3,
    "dense, step, dense",
    "dense(b_std=0), sign, dense, sign, dense",
    "3 * [dense, erf], dense",
    "3 * [dense(w_std=1.5, b_std=0.05), tanh], dense",
]


def spread_inputs(n, d, seed):
    """Inputs around one point whose pairs' 1 − ρ spread from about 1e-5 to 2
    (many just above the 1e-2 where float32 products take over, where the
    angle's slope is largest), at norms from 0.5 to 2 times each other, and
    the negatives of a few of them scaled and nudged (nearly antiparallel pairs)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(d)
    x = base + 10 ** rng.uniform(-2.5, 0.5, (n, 1)) * rng.standard_normal((n, d))
    x *= 2 ** rng.uniform(-1, 1, (n, 1))
    flip = x[:n // 8] * -rng.uniform(0.5, 2, (n // 8, 1))
    return np.concatenate([x, flip + 1e-5 * rng.standard_normal(flip.shape)])


def scaled_error(a, b, d1=None, d2=None):
    """max |a − b| / √(K(x, x) K(x', x')), the diagonals ``d1``, ``d2`` those of b's
    rows and columns (by default b's own)."""
    d1 = np.diag(b) if d1 is None else d1
    d2 = d1 if d2 is None else d2
    scale = np.outer(np.sqrt(np.abs(d1)), np.sqrt(np.abs(d2)))
    return float(np.max(np.abs(a.astype(np.float64) - b) / scale))


@pytest.mark.parametrize("spec", PRODUCT_SPECS)
def test_float32_products_stay_within_the_stated_bound(spec):
    x = spread_inputs(240, 784, 11)
    with warnings.catch_warnings():
        # erf's variances reach 300: its antiparallel bound (3e-13) is stated.
        warnings.simplefilter("ignore", lk.PrecisionWarning)
        warnings.simplefilter("ignore", SeriesTruncationWarning)
        plan = lk.gram.prepare(spec, x, dtype="float32", precision="float32")
        fast = lk.kernel(spec, x, dtype="float32", precision="float32")
        exact = lk.kernel(spec, x)
    assert plan.rows.unit32.dtype == np.float32
    # The README's bound, FLOAT32_PRODUCTS_ERROR · max(1, χ) (2e-5 to 2e-4 here;
    # d = 784 adds no factor),
    # plus the output's own rounding; 1e-5 to 6e-5 was measured on such specs
    # with 1 − ρ recomputed only below 1e-3, 2e-6 to 1e-5 with 1e-2.
    bound = plan.products_error + 2 ** -24
    assert 2e-5 <= plan.products_error <= 2e-4
    for kind in ("nngp", "ntk"):
        assert fast[kind].dtype == np.float32
        assert scaled_error(fast[kind], exact[kind]) <= bound, kind


def test_float32_products_keep_nearly_identical_and_antiparallel_pairs_exact():
    # Pairs within 1 − ρ < 1e-2 of each other or of each other's negative take ρ
    # from the unit vectors in float64: they equal the float64 kernels rounded
    # to float32, to an ulp (the same ρ by another float64 route). At such pairs
    # a sign layer's slope in ρ is 1/√(1 − ρ²): the float32 product's error
    # (~1e-7) would become 1e-4 or more. (Two sign layers would not do as a
    # test: there float64 itself loses 1 + ρ, as the README states.)
    rng = np.random.default_rng(12)
    base = rng.standard_normal((6, 50))
    near = [base * rng.uniform(0.5, 2, (6, 1)) + e * rng.standard_normal((6, 50))
            for e in (1e-12, 1e-8, 1e-5, 1e-3)]
    x = np.concatenate([base, *near, *(-v for v in near)])
    for spec in ("dense(b_std=0), sign, dense", RELU3):
        fast = lk.kernel(spec, x, dtype="float32", precision="float32")
        exact = lk.kernel(spec, x)
        for kind in ("nngp", "ntk"):
            rows = np.arange(6)
            for block in range(1, 9):
                cols = rows + 6 * block
                got = fast[kind][rows, cols]
                np.testing.assert_allclose(got, exact[kind][rows, cols], rtol=2 ** -23,
                                           atol=0, err_msg=f"{spec} {kind} block {block}")


def test_float32_products_give_exact_diagonals_and_identical_pairs():
    x = np.random.default_rng(13).standard_normal((30, 7))
    x[5] = x[2]
    fast = lk.kernel(RELU3, x, dtype="float32", precision="float32")
    diag = lk.kernel_diag(RELU3, x)
    for kind in ("nngp", "ntk"):
        want = diag[kind].astype(np.float32)
        np.testing.assert_array_equal(np.diag(fast[kind]), want)
        assert fast[kind][2, 5] == fast[kind][5, 2] == want[2]
        np.testing.assert_array_equal(fast[kind], fast[kind].T)


@pytest.mark.parametrize("x2_rows", [None, 23])
def test_float32_products_in_blocks_and_tiles(monkeypatch, x2_rows):
    from limitkernel import gram

    rng = np.random.default_rng(14)
    x = rng.standard_normal((100, 40))
    x2 = None if x2_rows is None else rng.standard_normal((x2_rows, 40))
    exact = lk.kernel(RELU3, x, x2)
    whole = lk.kernel(RELU3, x, x2, dtype="float32", precision="float32")
    monkeypatch.setattr(gram, "_BLOCK_BYTES", 8 * 100 * 16)  # 16-row GEMM blocks
    blocked = lk.kernel(RELU3, x, x2, dtype="float32", precision="float32")
    plan = lk.gram.prepare(RELU3, x, x2, dtype="float32", precision="float32")
    m = len(x if x2 is None else x2)
    tile = plan.tile(10, 70, 3, m)
    d1 = lk.kernel_diag(RELU3, x)
    d2 = d1 if x2 is None else lk.kernel_diag(RELU3, x2)
    for kind in ("nngp", "ntk"):
        for got in (whole[kind], blocked[kind]):
            assert got.dtype == np.float32
            assert scaled_error(got, exact[kind], d1[kind], d2[kind]) <= \
                plan.products_error
        assert scaled_error(tile[kind], exact[kind][10:70, 3:m], d1[kind][10:70],
                            d2[kind][3:m]) <= plan.products_error


def test_float32_products_warn_where_the_network_amplifies_them():
    # χ ≈ 1e4: errors in the inputs' correlations grow layer by layer. The
    # warning states the bound, and the error stays within it.
    spec = "10 * [dense(w_std=3), erf], dense"
    x = spread_inputs(120, 64, 15)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = lk.gram.prepare(spec, x, dtype="float32", precision="float32")
        fast = lk.kernel(spec, x, dtype="float32", precision="float32")
        exact = lk.kernel(spec, x)
    said = [str(w.message) for w in caught if "precision='float32'" in str(w.message)]
    assert len(said) == 2 and all(m == said[0] for m in said)
    assert re.search(r"by up to χ = 1\.\d+e\+04 .* may err by up to 0\.3 of sqrt", said[0])
    assert plan.products_error == pytest.approx(0.27, abs=0.005)
    for kind in ("nngp", "ntk"):
        assert scaled_error(fast[kind], exact[kind]) <= plan.products_error


def test_float32_products_change_nothing_on_positions():
    x = np.random.default_rng(16).standard_normal((9, 5, 5, 2))
    spec = "conv(k=3), relu, flatten, dense"
    plain = lk.kernel(spec, x, dtype="float32")
    fast = lk.kernel(spec, x, dtype="float32", precision="float32")
    for kind in ("nngp", "ntk"):
        np.testing.assert_array_equal(fast[kind], plain[kind])


def test_float32_products_bound_grows_with_the_number_of_features():
    # float32 sums of d products err like √d past d ≈ 1.6e4 (1.3e-5 measured on
    # 20 ReLU layers at d = 4e5): the bound carries max(1, √(d / 65536)).
    rng = np.random.default_rng(17)
    for d, factor in ((784, 1.0), (65536, 1.0), (262144, 2.0)):
        plan = lk.gram.prepare("dense(b_std=0), relu, dense", rng.standard_normal((3, d)),
                               dtype="float32", precision="float32")
        assert plan.products_error == pytest.approx(lk.gram.FLOAT32_PRODUCTS_ERROR * factor)
