"""Arguments of :func:`limitkernel.kernel` and the messages of its warnings and errors."""

import re
import warnings

import numpy as np
import pytest

import limitkernel as lk
from limitkernel.gram import DegenerateKernelWarning, _warn_if_degenerate

X = np.random.default_rng(0).standard_normal((6, 3))
SPEC = "dense, relu, dense"


@pytest.mark.parametrize("kwargs, error, fragment", [
    ({"memory_limit": "1GB"}, TypeError, "memory_limit must be a number of bytes"),
    ({"memory_limit": True}, TypeError, "memory_limit must be a number of bytes"),
    ({"memory_limit": -5}, ValueError, "memory_limit must be a positive number"),
    ({"memory_limit": float("nan")}, ValueError, "memory_limit must be a positive number"),
    ({"dtype": "foo"}, ValueError, "dtype must be float64 or float32, got 'foo'"),
    ({"dtype": object()}, ValueError, "dtype must be float64 or float32"),
    ({"dtype": "int32"}, ValueError, "dtype must be float64 or float32, got int32"),
    ({"get": None}, TypeError, "get must name 'nngp' and/or 'ntk'"),
    ({"get": 5}, TypeError, "get must name 'nngp' and/or 'ntk'"),
    ({"get": ["ntk", 5]}, ValueError, "get must name 'nngp' and/or 'ntk'"),
    ({"get": ()}, ValueError, "get must name 'nngp' and/or 'ntk'"),
    ({"precision": "float16", "dtype": "float32"}, ValueError,
     "precision must be 'float64' or 'float32' (of the input products x·x'), got 'float16'"),
    ({"precision": True, "dtype": "float32"}, ValueError, "precision must be 'float64'"),
    ({"precision": "float32"}, ValueError,
     "precision='float32' (input products in float32) is for float32 output only; pass "
     "dtype='float32' as well"),
])
def test_bad_arguments_raise_clear_errors(kwargs, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        lk.kernel(SPEC, X, **kwargs)


def test_a_numeric_memory_limit_is_still_honoured():
    with pytest.raises(lk.MemoryBudgetError):
        lk.kernel(SPEC, X, memory_limit=100)
    assert lk.kernel(SPEC, X, memory_limit=1e9)["ntk"].shape == (6, 6)
    assert lk.kernel(SPEC, X, memory_limit=np.int64(10 ** 9))["ntk"].shape == (6, 6)


@pytest.mark.parametrize("fn, fragment", [
    (lambda v: v + 1j, "returned complex values"),
    (lambda v: np.exp(1j * v).real + 0j, "returned complex values"),
    (lambda v: np.where(v > 0, "a", "b"), "must return real numbers"),
])
def test_a_numerical_activation_must_be_real_valued(fn, fragment):
    spec = lk.serial(lk.Dense(), lk.Numerical(fn=fn), lk.Dense())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ComplexWarning either: refused, not cut
        with pytest.raises(TypeError, match=fragment):
            lk.kernel(spec, X)


def test_the_overflow_message_names_the_real_cause():
    # sin's derivative kernel is about a²b²/2: two such layers multiply Θ by 1e400
    # while the variances stay at most a²/2 = 0.5.
    with pytest.raises(FloatingPointError) as info:
        lk.kernel("dense, 2 * [sin(b=1e100), dense]", X)
    message = str(info.value)
    assert "layer 4 (sin(b=1e+100))" in message
    assert "the NTK Θ(x, x) overflows" in message and "variances reach" not in message
    with pytest.raises(FloatingPointError,
                       match=re.escape("layer 2 (exp(b=10000000000)): the variances K(x, x) "
                                       "overflow")):
        lk.kernel("dense, exp(b=1e10), dense", X)


def _chi_in(message):
    return float(re.search(r"χ = ([-+0-9.e]+) [<>] 1", message).group(1))


@pytest.mark.parametrize("chi", [0.9996, 0.99999999, 1 - 2 ** -52, 0.5])
def test_the_ordered_phase_prints_chi_below_one(chi):
    with pytest.warns(DegenerateKernelWarning) as record:
        _warn_if_degenerate("ntk", np.full((4, 4), 2.0), chi)
    message = str(record[0].message)
    assert "ordered phase" in message
    assert _chi_in(message) < 1


@pytest.mark.parametrize("chi", [10.0004, 10 + 1e-9])
def test_the_chaotic_phase_prints_chi_above_one(chi):
    value = np.full((4, 4), 1.0)
    np.fill_diagonal(value, 2.0)
    with pytest.warns(DegenerateKernelWarning) as record:
        _warn_if_degenerate("nngp", value, chi)
    assert _chi_in(str(record[0].message)) > 1


def test_without_a_known_slope_the_warning_makes_no_comparison():
    for chi in (None, float("nan")):
        with pytest.warns(DegenerateKernelWarning) as record:
            _warn_if_degenerate("ntk", np.full((4, 4), 2.0), chi)
        message = str(record[0].message)
        assert "χ" not in message and "1 < 1" not in message
