"""The passes of networks on images and sequences (limitkernel._fused_spatial):
the paths that the layer tests of test_conv.py do not single out, against the
mpmath recursion of :mod:`reference`.

Tolerance: 1e-13 relative to √(K(x,x) K(x',x')), as in test_conv.py.
"""

import numpy as np
import pytest
from reference import spatial_kernel_mp

import limitkernel as lk
from limitkernel._fused_spatial import LANES

RTOL = 1e-13


def _assert_matches(spec, x1, x2, rtol=RTOL):
    got = lk.kernel(spec, x1, x2)
    for i in range(len(x1)):
        for j in range(len(x2)):
            (k11, k12, k22), (t11, t12, t22) = spatial_kernel_mp(spec, x1[i], x2[j], dps=25)
            for kind, ref, scale in (("nngp", k12, np.sqrt(k11 * k22)),
                                     ("ntk", t12, np.sqrt(t11 * t22))):
                err = abs(got[kind][i, j] - ref)
                assert err <= rtol * scale, f"{kind}[{i},{j}] off by {err / scale:.2e}: {spec}"


@pytest.mark.parametrize("spec", [
    # ops before the first layer with weights, where Θ is 0 and not stored
    "avg_pool, conv(b_std=0.1), relu, global_avg_pool, dense",
    "erf, conv(w_std=1.3, b_std=0.1), relu, global_avg_pool, dense",
    "erf, conv(w_std=1.3, b_std=0.1), relu, flatten, dense",
    "global_avg_pool, dense(b_std=0.1), relu, dense",
    "relu, flatten, dense(b_std=0.1)",
    "layernorm, conv(b_std=0.1), relu, global_avg_pool, dense",
    "parallel[conv(b_std=0.1); conv(k=1)], relu, global_avg_pool, dense",
    "parallel[conv(b_std=0.1); conv(k=1)], relu, flatten, dense",
])
def test_ops_before_the_first_layer_with_weights_match_mpmath(spec):
    x = np.random.default_rng(11).standard_normal((3, 3, 4, 2))
    _assert_matches(spec, x[:1], x[1:])


@pytest.mark.parametrize("spec", [
    "conv(w_std=1.5, b_std=0.1), relu, conv(b_std=0.1), relu, global_avg_pool, dense",
    "conv(w_std=1.5, b_std=0.1), relu, conv(b_std=0.1), relu, flatten, dense",
])
def test_correlations_on_both_sides_of_the_direct_form_threshold(spec):
    """Images whose positions reach 1 − ρ from about 1e-4 to 1e-1 after the first
    convolution: 1 − ρ comes from 1 − K/(A B) above 1/64 and from the exact
    identity below, and the NTK of the ReLUs that follow is sensitive to either
    (its error grows like that of 1 − ρ over θ)."""
    rng = np.random.default_rng(12)
    base = rng.standard_normal((4, 4, 2))
    others = []
    for eps in (0.01, 0.05, 0.15, 0.4):
        d = rng.standard_normal(base.shape)
        others.append(base + eps * d * np.linalg.norm(base) / np.linalg.norm(d))
    _assert_matches(spec, base[None], np.array(others))


@pytest.mark.parametrize("n1, n2", [(1, 1), (2, LANES - 1), (3, LANES), (2, LANES + 1),
                                    (LANES + 3, 2 * LANES + 5)])
def test_groups_of_columns_give_the_entries_one_at_a_time(n1, n2):
    """Columns go through the pairs pass LANES at a time, the last group filled
    up with copies; every entry equals the one computed on its own."""
    spec = "conv(b_std=0.1), relu, avg_pool, conv(b_std=0.2), relu, global_avg_pool, dense"
    rng = np.random.default_rng(13)
    x1 = rng.standard_normal((n1, 4, 4, 1))
    x2 = rng.standard_normal((n2, 4, 4, 1))
    whole = lk.kernel(spec, x1, x2)
    for i in range(n1):
        for j in range(n2):
            alone = lk.kernel(spec, x1[i:i + 1], x2[j:j + 1])
            for kind in ("nngp", "ntk"):
                assert whole[kind][i, j] == alone[kind][0, 0]


def test_symmetric_gram_of_many_inputs_matches_its_cross_form():
    spec = "conv(b_std=0.1), relu, avg_pool, conv(b_std=0.2), relu, global_avg_pool, dense"
    x = np.random.default_rng(14).standard_normal((2 * LANES + 3, 4, 4, 1))
    sym = lk.kernel(spec, x)
    cross = lk.kernel(spec, x, x.copy())
    for kind in ("nngp", "ntk"):
        np.testing.assert_array_equal(sym[kind], sym[kind].T)
        np.testing.assert_allclose(cross[kind], sym[kind], rtol=1e-14, atol=0)
        np.testing.assert_allclose(np.diag(cross[kind]), np.diag(sym[kind]), rtol=0, atol=0)


def test_sequences_in_groups_of_columns_match_mpmath():
    spec = ("conv(k=3, w_std=1.4, b_std=0.1), relu, conv(k=2, stride=2), relu, "
            "global_avg_pool, dense")
    x = np.random.default_rng(15).standard_normal((LANES + 2, 6, 2))
    _assert_matches(spec, x[:1], x[1:])
