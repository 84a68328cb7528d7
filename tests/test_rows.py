"""limitkernel._rows: passes over input rows."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from limitkernel import _rows


def numpy_hashes(x, mult):
    """Σ_k bits_k · mult_k mod 2⁶⁴ by numpy's wrapping uint64 arithmetic, -0.0 as 0.0."""
    bits = (x + 0.0).view(np.uint64)  # -0.0 + 0.0 == +0.0
    return (bits * mult).sum(axis=1, dtype=np.uint64)


@given(arrays(np.float64, st.tuples(st.integers(1, 20), st.integers(1, 40)),
              elements=st.floats(allow_nan=False, allow_infinity=False)),
       st.integers(0, 2 ** 32))
def test_row_hashes_match_numpy_wrapping_arithmetic(x, seed):
    mult = np.random.default_rng(seed).integers(1, 2 ** 63, size=x.shape[1], dtype=np.uint64)
    out = np.empty(len(x), dtype=np.uint64)
    _rows.row_hashes(np.ascontiguousarray(x).view(np.uint64), mult, out)
    np.testing.assert_array_equal(out, numpy_hashes(x, mult))


def test_negative_zero_hashes_as_zero():
    x = np.array([[0.0, 1.5, -0.0], [-0.0, 1.5, 0.0]])
    mult = np.array([3, 5, 7], dtype=np.uint64)
    out = np.empty(2, dtype=np.uint64)
    _rows.row_hashes(x.view(np.uint64), mult, out)
    expected = (np.array([1.5]).view(np.uint64) * mult[1:2])[0]  # arrays wrap silently
    assert out[0] == out[1] == expected


@given(st.integers(1, 100), st.integers(1, 80), st.integers(0, 2 ** 32))
def test_transpose_into_matches_numpy(n, t, seed):
    # Shapes on both sides of the 32 × 32 tiles, and a destination that is a
    # slice of a larger table (as the stacked Hermite tables are).
    src = np.random.default_rng(seed).standard_normal((n, t))
    dest = np.full((2, t + 3, n), np.nan)
    _rows.transpose_into(dest[1, :t], src)
    np.testing.assert_array_equal(dest[1, :t], src.T)
    assert np.isnan(dest[1, t:]).all() and np.isnan(dest[0]).all()


def test_unit_rows_hold_unit_vectors_to_twice_float64():
    # Against 60-digit mpmath: the two parts sum to x/|x| within about ε² (1e-32),
    # at scales 1e-100 to 1e100; a zero row stays 0.
    import mpmath

    rng = np.random.default_rng(8)
    x = rng.standard_normal((6, 9)) * np.array([1.0, 1e100, 1e-100, 3.0, 1e-5, 0.0])[:, None]
    x[3, :4] = 0.0
    out = np.empty(x.shape + (2,))
    _rows.unit_rows(x, out)
    with mpmath.workdps(60):
        for row, parts in zip(x[:5], out[:5]):
            norm = mpmath.sqrt(mpmath.fsum(mpmath.mpf(v) ** 2 for v in row))
            for v, (high, low) in zip(row, parts):
                assert abs(mpmath.mpf(high) + mpmath.mpf(low) - mpmath.mpf(v) / norm) <= 1e-31
                assert abs(low) <= 2.0 ** -52 * abs(high)
    np.testing.assert_array_equal(out[5], 0.0)
