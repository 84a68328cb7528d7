"""Residual, parallel and concatenated branches, layernorm, dropout, deep stacks.

References, none sharing code with the kernel pass:

* Monte Carlo over wide finite networks drawn from the same spec
  (``tests/mc_networks.py``: explicit weights, hand-written backpropagation);
* Neural Tangents' ``stax`` kernels, as reference values produced by the
  snippet quoted below (its conventions are the ones this package follows);
* the per-pair recursion evaluated in 40-digit mpmath (:mod:`reference`), with the
  angle from mpmath's own ``acos``, for nearly identical inputs and deep stacks.
"""

import json
import math
import warnings

import mc_networks
import numpy as np
import pytest
from reference import kernel_mp

import limitkernel as lk
from limitkernel.gram import DegenerateKernelWarning
from limitkernel.layers import Concat, Dense, Dropout, LayerNorm, Parallel, Residual
from limitkernel.spec import SpecError, from_json, parse, to_json

# ------------------------------------------------------------------ syntax

ROUND_TRIP = [
    "dense, residual[relu, dense], dense",
    "dense(b_std=0.1), 20 * [residual(alpha=0.5, beta=0.25)[relu, dense(w_std=1.3)]], dense",
    "dense, parallel[relu, dense; erf(a=2), dense; identity], relu, dense",
    "dense, concat(widths=1:3)[relu, dense; tanh, dense], dense",
    "dense, concat[relu, dense; erf, dense; gelu, dense], dense",
    "dense(b_std=0.5), layernorm, relu, dropout(p=0.1), dense",
    "dense, layernorm(eps=1e-05), relu, dense",
    "dense, residual[relu, dense, residual(beta=0.5)[relu, dense], relu, dense], relu, dense",
    "dense, 3 * [residual[relu, dense, layernorm, dropout(p=0.2)]], dense",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_text_and_json_round_trip(text):
    spec = parse(text)
    assert parse(str(spec)) == spec
    assert from_json(to_json(spec)) == spec
    assert from_json(to_json(spec, indent=2)) == spec
    assert parse(str(spec)) != parse("dense, relu, dense")


def test_python_objects_equal_text():
    relu, erf = lk.get_activation("relu"), lk.get_activation("erf")
    built = lk.serial(
        Dense(),
        Residual([relu, Dense(1.3)], alpha=0.5),
        Parallel([relu, Dense()], [erf, Dense()]),
        Concat([relu, Dense()], "erf, dense", widths=(1, 3)),
        LayerNorm(),
        Dropout(0.25),
        Dense(),
    )
    text = ("dense, residual(alpha=0.5)[relu, dense(w_std=1.3)], "
            "parallel[relu, dense; erf, dense], concat(widths=1:3)[relu, dense; erf, dense], "
            "layernorm, dropout(p=0.25), dense")
    assert built == parse(text)
    assert str(built) == text
    data = json.loads(to_json(built))
    assert data["layers"][1] == {"layer": "residual", "alpha": 0.5, "beta": 1.0, "branches": [
        [{"layer": "relu"}, {"layer": "dense", "w_std": 1.3, "b_std": 0.0,
                             "parameterization": "ntk", "width": None}]]}


@pytest.mark.parametrize("text, where, words", [
    ("dense, residual[relu, dense; dense], dense", "character 8", "one branch"),
    ("dense, relu[dense], dense", "character 12", "'[' follows only"),
    ("dense, parallel[relu, dense], dense", "character 8", "at least two branches"),
    ("dense, residual, dense", "character 8", "needs its branches"),
    ("dense, residual[relu, dense", "character 28", "']'"),
    ("dense, residual[], dense", "character 17", "layer name"),
    ("dense, concat(widths=1:2:3)[relu, dense; erf, dense], dense", "character 8", "one per branch"),
    ("dense, concat(widths=1:-2)[relu, dense; erf, dense], dense", "character 8", "positive"),
    ("dense, dropout(p=1), dense", "character 8", "[0, 1)"),
    ("dense, layernorm(eps=-1), dense", "character 8", ">= 0"),
    ("dense; relu, dense", "character 6", "end of spec"),
    ("dense, residul[relu, dense], dense", "character", "residual"),
])
def test_bad_text_names_the_place_and_the_fix(text, where, words):
    with pytest.raises(SpecError) as err:
        parse(text)
    assert where in str(err.value)
    assert words in str(err.value)


def test_bad_json_blocks():
    with pytest.raises(SpecError, match="list of layer lists"):
        from_json('{"layers": [{"layer": "residual", "branches": [{"layer": "relu"}]}]}')
    with pytest.raises(SpecError, match="needs its branches"):
        from_json('{"layers": [{"layer": "parallel"}, {"layer": "dense"}]}')
    with pytest.raises(SpecError, match="takes no branches"):
        from_json('{"layers": [{"layer": "relu", "branches": [[]]}]}')


@pytest.mark.parametrize("text, words", [
    # an activation needs a mean-zero Gaussian input
    ("dense, concat[relu, dense; erf, dense], relu, dense", "concatenation"),
    ("dense, relu, dense, dropout(p=0.3), relu, dense", "dropout"),
    ("dense, relu, residual[dense, relu, dense], relu, dense", "sum with a non-Gaussian"),
    ("dense, relu, layernorm, dense", "layernorm needs"),
    # a sum of correlated terms is not the sum of their kernels
    ("dense, residual[relu], dense", "skip connection and the branch"),
    ("dense, parallel[relu; erf], dense", "branches 1 and 2"),
    ("dense, residual[relu, dense, residual[relu, dense]], dense", "skip connection"),
])
def test_structure_errors_name_the_layer(text, words):
    with pytest.raises(SpecError, match="layer") as err:
        lk.kernel(text, np.eye(3))
    assert words in str(err.value)


# ------------------------------------------------------------ Neural Tangents

X_NT = np.array([[1.0, -0.5, 2.0], [0.3, 1.2, -0.7], [1.1, -0.4, 1.9]])

# Upper triangles (row-major) of nngp and ntk, from neural-tangents 0.6.5 with
# jax_enable_x64 (kernel_fn(X_NT, None, ("nngp", "ntk"))), D = stax.Dense(n, W_std=w,
# b_std=b) with n = 512 unless stated (the kernels do not depend on it):
#   residual:  serial(D(), FanOut(2), parallel(Identity(), serial(Relu(), D(b=0.3))),
#                     FanInSum(), Relu(), D(n=1))
#   parallel:  serial(D(), FanOut(2), parallel(serial(Relu(), D()), serial(Erf(), D())),
#                     FanInSum(), Relu(), D(n=1))
#   concat:    serial(D(), FanOut(2), parallel(serial(Relu(), D(n=100)),
#                     serial(Erf(), D(n=300))), FanInConcat(), D(n=1))
#   layernorm: serial(D(b=0.5), LayerNorm(), Relu(), D(n=1))
#   dropout:   serial(D(), Relu(), D(), Dropout(0.7), D(b=0.1, n=1))  (0.7 = keep rate)
NT_REFERENCE = {
    "dense, residual[relu, dense(b_std=0.3)], relu, dense": (
        [1.3575, 0.17790253629296654, 1.320066335815728, 0.5499999999999999,
         0.18865682983912238, 1.29],
        [3.1525, 0.06964484026833712, 3.016319939191633, 1.268333333333333,
         0.0961539451428784, 2.995]),
    "dense, parallel[relu, dense; erf, dense], relu, dense": (
        [0.7211531040612145, 0.12223835220169452, 0.7053626776148774, 0.3628893929902365,
         0.12698760478962612, 0.6940057715053458],
        [2.273694596441163, 0.01051102043703589, 2.1743612384481588, 1.1171614810655974,
         0.028928163035044613, 2.1853443204358376]),
    "dense, concat(widths=1:3)[relu, dense; erf, dense], dense": (
        [0.6442296560918217, -0.15628971899132088, 0.6329749041474557, 0.3760007561520214,
         -0.13453531229697122, 0.6260086572580187],
        [2.0980418946617445, -0.5132888482258602, 2.0518904376068816, 1.1707422215983962,
         -0.4459951538576896, 2.0330164806537563]),
    "dense(b_std=0.5), layernorm, relu, dense": (
        [0.49999999999975, 0.1052390449941071, 0.4988698773775017, 0.4999999999994585,
         0.11602582158150893, 0.4999999999997382],
        [0.9999999999995, 0.055704678112319904, 0.9869674786943267, 0.999999999998917,
         0.07559129542677614, 0.9999999999994764]),
    "dense, relu, dense, dropout(p=0.3), dense(b_std=0.1)": (
        [1.26, 0.06522254099147867, 0.8600336192753224, 0.4909523809523809,
         0.07360542459336702, 1.1957142857142857],
        [3.76, 0.028311956133904692, 2.5406084377951252, 1.4528571428571428,
         0.051995290873503935, 3.567142857142857]),
}


@pytest.mark.parametrize("text", list(NT_REFERENCE))
def test_matches_neural_tangents(text):
    got = lk.kernel(text, X_NT)
    upper = np.triu_indices(3)
    for kind, ref in zip(("nngp", "ntk"), NT_REFERENCE[text]):
        # Both sides are a handful of float64 operations from the same formulas.
        np.testing.assert_allclose(got[kind][upper], ref, rtol=1e-13, atol=1e-15)


def test_dropout_scales_only_the_diagonal_of_a_set_with_itself():
    x = np.random.default_rng(3).standard_normal((5, 4))
    with_drop = "dense, relu, dense, dropout(p=0.25), dense(b_std=0.1)"
    plain = "dense, relu, dense, dense(b_std=0.1)"
    sym, cross, ref = lk.kernel(with_drop, x), lk.kernel(with_drop, x, x), lk.kernel(plain, x)
    off = ~np.eye(5, dtype=bool)
    for kind in ("nngp", "ntk"):
        np.testing.assert_allclose(sym[kind][off], ref[kind][off], rtol=1e-14)
        np.testing.assert_allclose(cross[kind], ref[kind], rtol=1e-14)
    # the readout adds σ_b² = 0.01 to K and to Θ; the rest of the diagonal grows by 1/(1 - p)
    np.testing.assert_allclose(np.diag(sym["nngp"]) - 0.01,
                               (np.diag(ref["nngp"]) - 0.01) / 0.75, rtol=1e-14)
    np.testing.assert_allclose(lk.kernel_diag(with_drop, x)["ntk"], np.diag(sym["ntk"]),
                               rtol=1e-14)


# ------------------------------------------------------------------ Monte Carlo

MC_SPECS = [
    "dense(b_std=0.1), residual(alpha=0.8, beta=0.6)[relu, dense(w_std=1.2, b_std=0.3)], relu, dense",
    "dense, parallel[relu, dense; erf, dense(b_std=0.2)], relu, dense",
    "dense, parallel[identity; relu, dense], relu, dense",
    "dense, concat(widths=1:3)[relu, dense; tanh, dense], dense(b_std=0.1)",
    "dense(b_std=0.5), layernorm, relu, dense",
    "dense, relu, dense, dropout(p=0.3), dense(b_std=0.1)",
    "dense, residual[relu, dense, residual[relu, dense], relu, dense], relu, dense",
    "dense, residual[relu, dense, layernorm, dropout(p=0.2)], dense",
]


@pytest.mark.parametrize("text", MC_SPECS)
def test_monte_carlo_over_finite_networks(text):
    """Mean of the empirical NNGP and NTK over 40 networks of width 512.

    Each draw's kernels are unbiased up to the O(1/width) finite-width correction
    (relative size a few times 1/width for these shallow nets), and the draws are
    independent, so |mean − limit| ≤ 5 se + scale/width with se the standard
    error of the mean: about 300 entries are checked in this module, and a 5-se
    deviation has probability 6e-7 each.
    """
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 6))
    x[3] = x[0] + 0.05 * rng.standard_normal(6)  # a close pair
    limit = lk.kernel(text, x)
    width, draws = 512, 40
    nngp, ntk = mc_networks.monte_carlo(text, x, width, draws, seed=2024)
    for kind, est in (("nngp", nngp), ("ntk", ntk)):
        mean = est.mean(0)
        se = est.std(0, ddof=1) / math.sqrt(draws)
        scale = np.max(np.abs(limit[kind]))
        err = np.abs(mean - limit[kind])
        assert np.all(err <= 5 * se + scale / width), (kind, err / se)


def test_monte_carlo_fails_on_a_wrong_convention():
    """The same test rejects a kernel off by one convention (concat weights 1:1)."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 6))
    wrong = lk.kernel("dense, concat[relu, dense; tanh, dense], dense(b_std=0.1)", x)
    nngp, _ = mc_networks.monte_carlo(
        "dense, concat(widths=1:3)[relu, dense; tanh, dense], dense(b_std=0.1)", x, 512, 40, 2024)
    se = nngp.std(0, ddof=1) / math.sqrt(40)
    assert np.any(np.abs(nngp.mean(0) - wrong["nngp"]) > 5 * se + 1 / 512)


# ------------------------------------------------------ high-precision reference

def _mp_kernel(text, x1, x2):
    (_, k12, _), (_, t12, _) = kernel_mp(text, x1, x2)
    return k12, t12


def _near_pairs(rng, d=16):
    base = rng.standard_normal(d)
    out = []
    for eps in (1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4):
        direction = rng.standard_normal(d)
        out.append(base + direction * eps * np.linalg.norm(base) / np.linalg.norm(direction))
    return base, np.array(out)


@pytest.mark.parametrize("text", [
    ("dense(w_std=1.5, b_std=0.05), 3 * [residual[relu, dense(w_std=1.5, b_std=0.05)]], "
    "relu, dense"),
    "dense(w_std=1.2), 4 * [residual(alpha=0.9, beta=0.4)[relu, dense(w_std=1.4)]], relu, dense",
    "dense(b_std=0.3), layernorm, 2 * [residual[relu, dense(b_std=0.1), layernorm]], relu, dense",
    "dense, relu, dense(b_std=0.2), residual(beta=0.7)[relu, dense, dropout(p=0.2)], dense",
])
def test_near_duplicates_match_mpmath_in_residual_nets(text):
    """Pairs 1e-9 … 1e-4 apart, whose correlation rounds to within a few ulps of 1,
    so an angle taken from it would lose about half its digits; the pass carries
    1 − ρ through every block (and every sum of branches) and stays within 1e-13."""
    base, others = _near_pairs(np.random.default_rng(5))
    got = lk.kernel(text, base[None, :], others)
    for j, other in enumerate(others):
        ref_k, ref_t = _mp_kernel(text, base, other)
        np.testing.assert_allclose(got["nngp"][0, j], ref_k, rtol=1e-13, atol=0)
        np.testing.assert_allclose(got["ntk"][0, j], ref_t, rtol=1e-13, atol=0)


@pytest.mark.parametrize("text", [
    ("dense(w_std=1.4, b_std=0.1), 100 * [residual(alpha=1, beta=0.3)[relu, dense(w_std=1.4)]], "
    "relu, dense"),
    "dense, 50 * [residual[relu, dense(b_std=0.1), layernorm]], relu, dense",
    "dense(b_std=0.05), 50 * [relu, dense(w_std=1.414, b_std=0.05)]",
    "dense, 100 * [relu, dense(w_std=1.5), layernorm], relu, dense",
])
def test_deep_stacks_stay_finite_and_accurate(text):
    """50–100 blocks: finite, symmetric, and equal to the mpmath recursion."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((5, 8))
    got = lk.kernel(text, x)
    for kind in ("nngp", "ntk"):
        assert np.all(np.isfinite(got[kind]))
        np.testing.assert_array_equal(got[kind], got[kind].T)
    for i, j in [(0, 1), (1, 4), (2, 3)]:
        ref_k, ref_t = _mp_kernel(text, x[i], x[j])
        # rounding accumulates over ~300 float64 operations per entry
        np.testing.assert_allclose(got["nngp"][i, j], ref_k, rtol=1e-11)
        np.testing.assert_allclose(got["ntk"][i, j], ref_t, rtol=1e-11)


def test_ordered_phase_warning_says_why():
    x = np.random.default_rng(0).standard_normal((6, 5))
    with pytest.warns(DegenerateKernelWarning, match="ordered phase") as record:
        lk.kernel("100 * [dense(w_std=1, b_std=1), erf], dense", x)
    assert "lower the depth or b_std, or raise w_std" in str(record[0].message)


def test_chaotic_phase_warning_says_why():
    x = np.random.default_rng(0).standard_normal((6, 5))
    with pytest.warns(DegenerateKernelWarning, match="chaotic phase"):
        lk.kernel("100 * [dense(w_std=3), erf], dense", x)


@pytest.mark.parametrize("text", [
    "dense, dense",
    "dense, relu, dense",
    "20 * [dense(w_std=1.414), relu], dense",
    "dense, 30 * [residual(beta=0.3)[relu, dense]], dense",
])
def test_healthy_kernels_do_not_warn(text):
    for x in (np.eye(4), np.random.default_rng(1).standard_normal((6, 5))):
        with warnings.catch_warnings():
            warnings.simplefilter("error", DegenerateKernelWarning)
            lk.kernel(text, x)


# ------------------------------------------------------------------ properties

PROPERTY_SPECS = [
    "dense(b_std=0.1), 3 * [residual(beta=0.6)[relu, dense(w_std=1.3, b_std=0.1)]], relu, dense",
    "dense, parallel[relu, dense; tanh, dense; identity], layernorm, gelu, dense",
    "dense, concat(widths=2:1)[relu, dense; erf, dense], dropout(p=0.2), dense",
    ("dense(parameterization=standard, width=50), residual[relu, "
    "dense(parameterization=standard, width=50)], relu, dense(parameterization=standard)"),
]


@pytest.mark.parametrize("text", PROPERTY_SPECS)
def test_kernel_properties(text):
    """Symmetry, diagonal = kernel_diag, positive semi-definiteness, permutation
    equivariance, and the cross kernel equal to the symmetric one off the diagonal."""
    rng = np.random.default_rng(21)
    x = rng.standard_normal((30, 6))
    sym = lk.kernel(text, x)
    diag = lk.kernel_diag(text, x)
    perm = rng.permutation(30)
    shuffled = lk.kernel(text, x[perm])
    cross = lk.kernel(text, x[:10], x[10:])
    for kind in ("nngp", "ntk"):
        k = sym[kind]
        np.testing.assert_array_equal(k, k.T)
        np.testing.assert_allclose(np.diag(k), diag[kind], rtol=1e-13)
        assert np.linalg.eigvalsh(k).min() >= -1e-12 * np.abs(k).max()
        np.testing.assert_allclose(shuffled[kind], k[np.ix_(perm, perm)], rtol=1e-13)
        np.testing.assert_allclose(cross[kind], k[:10, 10:], rtol=1e-13)


@pytest.mark.parametrize("shape", [(2,), (2, 1)])
def test_parallel_keeps_identical_inputs_at_one_minus_rho_zero(shape):
    # Found by fuzzing: the sum's 1 − ρ had a term x1 y2 − x2 y1 that the compiler
    # may fuse into fma(x1, y2, −x2 y1), which keeps the rounding error of x1 y1
    # for identical inputs: 1 − ρ = 4e-34 instead of 0, and at variances of 1e36
    # an rbf layer (E[φ²] = 1 at every variance) then gave a diagonal of 0.
    if len(shape) == 2:
        spec = ("conv(k=1, padding=same), parallel[abs, conv(k=1, padding=same); abs, "
                "conv(k=1, padding=same, w_std=0.75)], rbf(gamma=1.0), flatten, dense")
    else:
        spec = "dense, parallel[abs, dense; abs, dense(w_std=0.75)], rbf(gamma=1.0), dense"
    x = np.array([1.257302210933933e18, -1.321048632913019e18]).reshape((1,) + shape)
    # rbf's diagonal is 1 at every input scale, so the network's is the same at
    # 1e18 as at 1 (the last dense layer maps that 1 the same way).
    expected = lk.kernel_diag(spec, x / 1e18)["nngp"][0]
    assert lk.kernel_diag(spec, x)["nngp"][0] == expected
    assert lk.kernel(spec, x)["nngp"][0, 0] == expected


# erf's PrecisionWarning at these variances bounds nearly antiparallel pairs; this
# pair is not one (held to mpmath below).
@pytest.mark.filterwarnings("ignore::limitkernel.gram.PrecisionWarning")
def test_parallel_between_inputs_of_very_different_norms():
    # Found by fuzzing: 1 − ρ of a sum written as ((x1 − x2)(y1 + y2) − (x1 + x2)(y1 − y2))/2
    # cancelled catastrophically between inputs of norms 1e18 and 5 (K off by 0.4, a
    # kernel with a negative eigenvalue); each entry is held to mpmath here.
    spec = "dense, parallel[abs, dense; relu, dense], erf, dense"
    x = np.array([[1.257302210933933e18, -1.321048632913019e18], [-5.356693731611109,
                                                                  3.6159505490948476]])
    got = lk.kernel(spec, x)
    (k11, k12, k22), (t11, t12, t22) = kernel_mp(spec, x[0], x[1], dps=120)
    assert abs(got["nngp"][0, 1] - k12) <= 1e-13 * np.sqrt(float(k11 * k22))
    assert abs(got["ntk"][0, 1] - t12) <= 1e-13 * np.sqrt(float(t11 * t22))


@pytest.mark.parametrize("shape", [(3,), (3, 1)])
def test_a_sum_of_branches_at_variances_of_1e182_matches_mpmath(shape):
    # Found by fuzzing: the sum's 1 − ρ squared a difference of products of
    # roots (of the order of the variances), which overflowed from variances of
    # 1e154 on; 1 − ρ became 2 and the ReLU after the block gave K = 0 where
    # mpmath has 4.5e181. Vectors and sequences go through the same sum.
    from reference import kernel_mp, spatial_kernel_mp

    base = np.array([[-6.31141575765397e+91, 9.29137500973796e+91, 3.381451618345425e+90],
                     [-7.160322751623924e+91, 1.7553212806147815e+92, -9.488855761079737e+91]])
    if len(shape) == 1:
        x, head, run = base, "dense(w_std=0.1)", kernel_mp
    else:
        x, head, run = base.reshape((2,) + shape), "conv(k=1, w_std=0.1)", spatial_kernel_mp
    tail = ", flatten, dense" if len(shape) > 1 else ", dense"
    spec = f"{head}, residual(beta=-1.26)[relu, {head.replace('0.1', '0.591')}], relu" + tail
    got = lk.kernel(spec, x)
    (_, k12, _), (_, t12, _) = run(spec, x[0], x[1], dps=60)
    np.testing.assert_allclose(got["nngp"][0, 1], k12, rtol=1e-13, atol=0)
    np.testing.assert_allclose(got["ntk"][0, 1], t12, rtol=1e-13, atol=0)
