"""Kernels of networks on images and sequences (limitkernel.layers.conv and the
spatial passes), against the mpmath recursion of :mod:`reference`, which carries
the whole joint covariance of both inputs' positions from the definitions.

Tolerances: the pass does a handful of roundings per entry and layer, and keeps
1 − ρ accurate through convolutions, so 1e-13 relative to √(K(x,x) K(x',x'))
(the scale of an entry) holds everywhere but where the docs say otherwise
(nearly identical inputs after a pooling layer).
"""

import numpy as np
import pytest
from reference import spatial_kernel_mp

import limitkernel as lk

RTOL = 1e-13

CASES = [
    # same positions (flatten)
    (("conv(w_std=1.5, b_std=0.1), relu, conv(w_std=1.3, b_std=0.2), relu, flatten, "
     "dense(w_std=1.2, b_std=0.1)"), (4, 4, 2)),
    (("conv(padding=valid, w_std=1.5, b_std=0.1), erf, conv(stride=2, w_std=1.3), relu, "
     "flatten, dense"), (5, 5, 2)),
    (("conv(padding=circular, b_std=0.3), relu, conv(padding=circular, stride=2), relu, "
     "flatten, dense"), (4, 5, 1)),
    ("conv(k=3:2, b_std=0.2), relu, flatten, dense", (4, 5, 1)),
    ("conv(k=3, stride=2, b_std=0.2), relu, conv(k=2, padding=valid), relu, flatten, dense",
     (9, 2)),
    ("conv, relu, dense(b_std=0.3), relu, flatten, dense", (3, 4, 2)),
    (("conv(b_std=0.1), parallel[relu, conv; erf, conv(padding=circular)], relu, flatten, "
     "dense"), (3, 3, 2)),
    # pairs of positions (pooling)
    (("conv(padding=circular, w_std=1.5, b_std=0.1), relu, avg_pool, conv, relu, "
     "global_avg_pool, dense"), (4, 4, 1)),
    ("conv(k=3, b_std=0.2), relu, conv(k=5, padding=valid), gelu, global_avg_pool, dense",
     (8, 2)),
    ("conv(b_std=0.1), residual[relu, conv, relu, conv], relu, global_avg_pool, dense",
     (3, 3, 2)),
    ("conv, layernorm, relu, conv, global_avg_pool, dense", (3, 3, 2)),
    (("conv(stride=2), relu, avg_pool(k=3, stride=1, padding=same), conv, global_avg_pool, "
     "dense"), (5, 5, 1)),
    ("conv(b_std=0.2), relu, avg_pool(k=2:1), conv(k=1), relu, flatten, dense", (4, 3, 2)),
    ("conv(b_std=0.1), relu, global_avg_pool, dense(b_std=0.1), relu, dense", (3, 3, 2)),
]

ACTIVATIONS = ["relu", "leaky_relu(alpha=0.1)", "abrelu(a=-0.3, b=1.2)", "abs", "identity",
               "step", "sign", "erf(a=1.1, b=0.7, c=0.2)", "sigmoid_like", "gelu",
               "sin(a=1, b=0.8, c=0.3)", "cos", "rbf(gamma=0.5)", "gaussian(a=1, b=-0.5)",
               "exp(a=0.5, b=0.3)"]


def _assert_matches(spec, x, pairs, rtol=RTOL):
    got = lk.kernel(spec, x)
    for i, j in pairs:
        (k11, k12, k22), (t11, t12, t22) = spatial_kernel_mp(spec, x[i], x[j], dps=25)
        for kind, ref, scale in (("nngp", k12, np.sqrt(k11 * k22)),
                                 ("ntk", t12, np.sqrt(t11 * t22))):
            err = abs(got[kind][i, j] - ref)
            assert err <= rtol * scale, f"{kind}[{i},{j}] off by {err / scale:.2e}: {spec}"


@pytest.mark.parametrize("spec, shape", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_matches_mpmath(spec, shape):
    x = np.random.default_rng(1).standard_normal((3,) + shape)
    _assert_matches(spec, x, [(0, 1), (1, 2), (0, 0)])


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("readout", ["global_avg_pool", "flatten"])
def test_every_closed_form_activation_matches_mpmath(act, readout):
    spec = f"conv(w_std=1.2, b_std=0.2), {act}, conv(k=2, b_std=0.1), {act}, {readout}, dense"
    x = 0.7 * np.random.default_rng(2).standard_normal((2, 3, 3, 2))
    _assert_matches(spec, x, [(0, 1)])


def _near(rng, base, distances):
    out = []
    for eps in distances:
        d = rng.standard_normal(base.shape)
        out.append(base + d * eps * np.linalg.norm(base) / np.linalg.norm(d))
    return np.array(out)


@pytest.mark.parametrize("spec", [
    "conv(w_std=1.5, b_std=0.1), relu, conv(b_std=0.1), relu, flatten, dense",
    "conv(w_std=1.5), relu, conv, relu, flatten, dense",
    "conv(w_std=1.5, b_std=0.1), relu, conv(b_std=0.1), relu, global_avg_pool, dense",
])
def test_nearly_identical_images_keep_full_precision(spec):
    """Images 1e-9 … 1e-3 apart (relative), and one scaled by 2.5: the NTK of the
    second ReLU needs 1 − ρ to full relative precision after the convolutions."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal((4, 4, 2))
    others = np.concatenate([_near(rng, base, (1e-9, 1e-7, 1e-5, 1e-3)), 2.5 * base[None]])
    got = lk.kernel(spec, base[None], others)
    for j, other in enumerate(others):
        (_, k12, _), (_, t12, _) = spatial_kernel_mp(spec, base, other, dps=40)
        np.testing.assert_allclose(got["nngp"][0, j], k12, rtol=RTOL, atol=0)
        np.testing.assert_allclose(got["ntk"][0, j], t12, rtol=RTOL, atol=0)


def test_sequences_closer_than_1e9_through_sign_keep_full_precision():
    # Found by the mpmath fuzz campaign: two sequences 1e-10 apart, whose NTK
    # erred by 1.2e-12 while each position's unit vector was held in one part.
    x = np.array([[[0.1257302210933933, -0.1321048632913019],
                   [0.6404226504432821, 0.10490011715303971]],
                  [[0.1257302210725978, -0.1321048632772642],
                   [0.6404226504939053, 0.10490011718980685]]])
    spec = ("conv(k=1, padding=same, width=1), sign, conv(k=1, padding=same, width=3), "
            "abs, flatten, dense")
    got = lk.kernel(spec, x)
    (_, k12, _), (_, t12, _) = spatial_kernel_mp(spec, x[0], x[1], dps=50)
    np.testing.assert_allclose(got["nngp"][0, 1], k12, rtol=RTOL, atol=0)
    np.testing.assert_allclose(got["ntk"][0, 1], t12, rtol=RTOL, atol=0)


def test_after_pooling_nearly_identical_images_meet_the_documented_bound():
    """Pooling averages correlated terms, so 1 − ρ after it has an absolute error
    of about 1e-16; a later ReLU's NTK factor (π − θ)/(2π) then errs by about
    1e-16/θ relative, θ ≈ √(2(1 − ρ)). At relative distance 1e-9 … 1e-5, 1e-6
    relative bounds it with room; at 1e-3 the full 1e-13 holds again."""
    spec = ("conv(w_std=1.5, b_std=0.1), relu, avg_pool, conv(b_std=0.1), relu, "
            "global_avg_pool, dense")
    rng = np.random.default_rng(4)
    base = rng.standard_normal((4, 4, 2))
    others = _near(rng, base, (1e-9, 1e-7, 1e-5, 1e-3))
    got = lk.kernel(spec, base[None], others)
    for j, (other, rtol) in enumerate(zip(others, (1e-6, 1e-6, 1e-6, 1e-12))):
        (_, k12, _), (_, t12, _) = spatial_kernel_mp(spec, base, other, dps=40)
        np.testing.assert_allclose(got["nngp"][0, j], k12, rtol=RTOL, atol=0)
        np.testing.assert_allclose(got["ntk"][0, j], t12, rtol=rtol, atol=0)


@pytest.mark.parametrize("spec", [
    "conv(b_std=0.1), relu, avg_pool, conv, erf, global_avg_pool, dense(b_std=0.2), relu, dense",
    "conv, relu, conv(padding=valid), relu, global_avg_pool, dense",
])
def test_identical_images_give_exactly_the_diagonal_when_pooling(spec):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 5, 5, 1))
    x[2] = x[0]
    out = lk.kernel(spec, x)
    for kind in ("nngp", "ntk"):
        assert out[kind][0, 2] == out[kind][0, 0] == out[kind][2, 2]
        cross = lk.kernel(spec, x[:1], x[2:3])[kind]
        assert cross[0, 0] == out[kind][0, 0]


def test_an_image_strided_to_one_row_is_still_an_image():
    """k=3 stays 3×3 on an image one row high (found by fuzzing: it was taken for a
    sequence, and its kernel was 1×3, three times too large). Reference: Neural
    Tangents 0.6.5, float64::

        x = np.random.default_rng(0).standard_normal((2, 2, 2, 1))
        _, _, kf = stax.serial(stax.Conv(8, (1, 1), strides=(2, 2), padding="SAME"),
                               stax.Relu(), stax.Conv(8, (3, 3), padding="SAME"),
                               stax.Relu(), stax.Flatten(), stax.Dense(1))
        kf(x, None, ("nngp", "ntk"))
    """
    x = np.random.default_rng(0).standard_normal((2, 2, 2, 1))
    out = lk.kernel("conv(k=1, stride=2), relu, conv(k=3), relu, flatten, dense", x)
    nngp = [[0.00043911356933871, 0.0005955032309589452],
            [0.0005955032309589452, 0.0079706021484116]]
    ntk = [[0.00131734070801613, 0.0005955032309589452],
           [0.0005955032309589452, 0.023911806445234798]]
    np.testing.assert_allclose(out["nngp"], nngp, rtol=1e-13)
    np.testing.assert_allclose(out["ntk"], ntk, rtol=1e-13)
    with pytest.raises(lk.SpecError, match="has two axes, but the input is a sequence"):
        lk.kernel("conv(k=3:2), relu, flatten, dense", np.ones((2, 5, 1)))


@pytest.mark.parametrize("spec, shape", [
    ("conv(k=2), flatten, dense", (1, 3)),
    ("conv(k=2), global_avg_pool, dense", (1, 3)),
    ("conv, avg_pool(k=3, padding=same), global_avg_pool, dense", (2, 2, 1)),
    ("avg_pool(k=3, padding=same), conv, global_avg_pool, dense", (2, 2, 1)),
])
def test_window_larger_than_the_input_with_same_padding(spec, shape):
    """Some taps of the window only ever meet the padding (found by fuzzing: the
    index runs of such a tap crashed)."""
    x = np.random.default_rng(0).standard_normal((2,) + shape)
    (k11, k12, k22), (t11, t12, t22) = spatial_kernel_mp(spec, x[0], x[1], dps=20)
    out = lk.kernel(spec, x)
    np.testing.assert_allclose(out["nngp"], [[k11, k12], [k12, k22]], rtol=1e-13)
    np.testing.assert_allclose(out["ntk"], [[t11, t12], [t12, t22]], rtol=1e-13)


@pytest.mark.parametrize("scale", [1e80, 1e-80])
@pytest.mark.parametrize("spec", ["conv, relu, global_avg_pool, dense, relu, dense",
                                  "conv, relu, avg_pool, conv, relu, flatten, dense"])
def test_pooling_keeps_the_correlation_at_large_and_small_variances(spec, scale):
    """Bias-free ReLU networks are positively homogeneous: K(s x, s x') = s² K(x, x').
    (Found by fuzzing: pooling took 1 − ρ from √(var·var'), whose product overflowed
    above ~1e154 and underflowed below ~1e-154.)"""
    x = np.random.default_rng(1).standard_normal((3, 4, 4, 2))
    unit = lk.kernel(spec, x)
    scaled = lk.kernel(spec, scale * x)
    for kind in ("nngp", "ntk"):
        np.testing.assert_allclose(scaled[kind] / scale ** 2, unit[kind], rtol=1e-13)


@pytest.mark.parametrize("spec, shape", [CASES[0], CASES[4], CASES[7], CASES[9]])
def test_symmetric_psd_and_same_as_cross(spec, shape):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((12,) + shape)
    sym = lk.kernel(spec, x)
    cross = lk.kernel(spec, x, x.copy())
    perm = rng.permutation(len(x))
    permuted = lk.kernel(spec, x[perm])
    for kind in ("nngp", "ntk"):
        np.testing.assert_array_equal(sym[kind], sym[kind].T)
        np.testing.assert_allclose(cross[kind], sym[kind], rtol=1e-14, atol=0)
        np.testing.assert_allclose(permuted[kind], sym[kind][np.ix_(perm, perm)], rtol=1e-14)
        evals = np.linalg.eigvalsh(sym[kind])
        assert evals[0] >= -1e-13 * evals[-1]
        np.testing.assert_allclose(np.diag(sym[kind]),
                                   lk.kernel_diag(spec, x)[kind], rtol=1e-15)


def test_tiles_of_a_large_gram_agree_with_small_calls():
    spec = CASES[7][0]
    x = np.random.default_rng(7).standard_normal((9, 4, 4, 1))
    full = lk.kernel(spec, x)
    part = lk.kernel(spec, x[:4], x[5:])
    for kind in ("nngp", "ntk"):
        np.testing.assert_allclose(part[kind], full[kind][:4, 5:], rtol=1e-15)


@pytest.mark.parametrize("spec, shape, message", [
    ("dense, conv, relu, flatten, dense", (5,), "conv needs a spatial input"),
    ("conv, relu, flatten, conv, dense", (4, 4, 1), "conv needs a spatial input"),
    ("dense, relu, dense", (4, 4, 1), "flatten or global_avg_pool"),
    ("conv, relu, avg_pool(k=5), global_avg_pool, dense", (4, 4, 1), "larger than its input"),
    ("conv(padding=valid, k=5), relu, flatten, dense", (4, 4, 1), "larger than its input"),
    ("conv, flatten, relu, dense", (4, 4, 1), "flatten of positions"),
    ("conv, residual[relu, conv, flatten], dense", (4, 4, 1), "inside a block"),
    ("conv(parameterization=standard), relu, flatten, dense(parameterization=standard)",
     (4, 4, 1), r"layer 1 \(conv\(parameterization=standard\)\) leaves its width unsaid"),
    # a standard layer's fan-in is the previous layer's width, never given here
    ("conv, relu, conv(parameterization=standard, width=2), flatten, dense", (4, 4, 1),
     r"layer 1 \(conv\) leaves its width unsaid"),
    ("conv, relu, flatten, dense(parameterization=standard)", (4, 4, 1),
     r"layer 1 \(conv\) leaves its width unsaid"),
    (("conv(k=1), residual[abs, conv(k=1, parameterization=standard, width=1)], flatten, "
      "dense(parameterization=standard)"), (2, 2, 2), r"layer 1 \(conv\(k=1\)\) leaves"),
    ("conv(width=3), residual[relu, conv(width=2)], flatten, dense", (4, 4, 1),
     "widths 2 and 3, but a sum needs them equal"),
    ("conv(k=3:3), relu, flatten, dense", (6, 1), "sequence"),
])
def test_mismatched_specs_and_inputs_are_explained(spec, shape, message):
    x = np.ones((2,) + shape)
    with pytest.raises((lk.SpecError, ValueError), match=message):
        lk.kernel(spec, x)


def test_a_standard_conv_states_its_width_only_for_a_standard_layer_after_it():
    # Its output channels enter only a later "standard" layer's fan-in.
    x = np.random.default_rng(2).standard_normal((3, 4, 4, 2))
    spec = "conv(b_std=0.2, parameterization=standard{}), relu, conv, flatten, dense"
    said = lk.kernel(spec.format(", width=5"), x)
    for kind, value in lk.kernel(spec.format(""), x).items():
        np.testing.assert_array_equal(value, said[kind])


def test_input_shapes_must_agree():
    with pytest.raises(ValueError, match="same shape per input"):
        lk.kernel("conv, relu, flatten, dense", np.ones((2, 4, 4, 1)), np.ones((2, 4, 5, 1)))


@pytest.mark.parametrize("readout", ["flatten", "global_avg_pool"])
def test_monte_carlo_over_finite_cnns(readout):
    """The mean empirical NNGP of 400 finite CNNs (64 channels) at the readout's
    input is unbiased for the limit (one hidden layer); the tolerance is 4
    standard errors of the mean over draws, entry by entry."""
    import mc_networks

    x = np.random.default_rng(8).standard_normal((4, 5, 5, 2))
    spec = f"conv(w_std=1.4, b_std=0.3), relu, {readout}, dense"
    limit = lk.kernel(spec, x, get="nngp")["nngp"]
    draws = mc_networks.conv_readout_nngp(x, 3, 1.4, 0.3, readout, 64, 400, seed=9)
    mean = draws.mean(axis=0)
    se = draws.std(axis=0, ddof=1) / np.sqrt(len(draws))
    assert np.all(np.abs(mean - limit) <= 4 * se + 1e-12), (mean - limit) / se
