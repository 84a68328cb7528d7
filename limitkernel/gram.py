"""Public Gram API: validation, diagonals, tiling, memory, dtype, symmetric case.

:func:`kernel` computes the infinite-width NNGP covariance and NTK between two
input sets in one GEMM (x·x'ᵀ, row block by row block, written straight into the
output) and one fused numba pass that carries every entry through all layers
(:mod:`limitkernel._fused`). With ``x2=None`` only the upper triangle is
computed and then mirrored.
"""

import functools
import math
import numbers
import os
import warnings

import numpy as np

from . import _fused, _fused_spatial, _rows
from ._program import Program
from .layers.numerical import _caller_level
from .spec import SpecError

__all__ = ["KINDS", "GramPlan", "MemoryBudgetError", "kernel", "kernel_diag",
           "prepare"]

KINDS = ("nngp", "ntk")
# The precisions of the input products x·x' (the one GEMM): "float32" multiplies
# the unit vectors rounded to float32 (about twice as fast, float32 output only).
PRECISIONS = ("float64", "float32")
# With input products in float32, 1 − ρ is recomputed in float64 from the unit
# vectors below this value rather than below _fused.NEAR_DUPLICATE: the angle's
# slope (1/sin θ) would amplify the products' float32 error there (at 1e-3, up
# to 5.6e-5 of the NTK's scale was measured; at 1e-2, 9.3e-6).
NEAR_DUPLICATE_FLOAT32 = 1e-2
# The stated error of kernels from float32 input products, in units of
# √(K(x, x) K(x', x')) and per unit of the network's correlation slope χ at
# ρ = 1 (at least 1): the products' ρ errs by a few 1e-7 and a layer passes an
# error in ρ on by at most its slope. The largest error measured per unit χ was
# 8.3e-6 (d from 4 to 4096, 1 − ρ from 3e-3 to 2, networks of the ReLU family,
# step, sign, erf, tanh, gelu, layernorm and residual blocks of 1 to 100 layers,
# the largest on 20 ReLU layers; tests/test_kernel_fuzz.py checks the bound on
# random networks). Above _FLOAT32_PRODUCTS_WARN, the call warns with its bound.
# The products' error grows like √d past d ≈ 1.6e4 (float32 accumulation; on 20
# ReLU layers 2.8e-6 at d = 16384, 6.3e-6 at 1e5, 1.3e-5 at 4e5), so the bound
# carries max(1, √(d / _FLOAT32_PRODUCTS_D)) as well.
FLOAT32_PRODUCTS_ERROR = 2e-5
_FLOAT32_PRODUCTS_D = 65536
_FLOAT32_PRODUCTS_WARN = 1e-4

# Row blocks are sized so that one block of the GEMM holds about this many bytes.
_BLOCK_BYTES = 64 << 20
# A float32 output takes its rows in chunks whose float64 GEMM holds about this.
_SCRATCH_BYTES = 256 << 20


class MemoryBudgetError(MemoryError):
    """The requested matrices would not fit in the memory available."""


class DegenerateKernelWarning(RuntimeWarning):
    """All entries of a kernel are equal to working precision."""


class PrecisionWarning(RuntimeWarning):
    """Some entries may err beyond the stated accuracy; the message gives the bound."""


# ------------------------------------------------------------ validation


def check_inputs(x, name="x", spatial=False):
    """Return x as a C-contiguous float64 array, or raise a clear ValueError.

    Vectors are (n, d); with ``spatial``, images (n, H, W, C) and sequences
    (n, L, C) are accepted too (channels last).
    """
    if isinstance(x, np.ma.MaskedArray):
        raise ValueError(f"{name} is a masked array; its masked entries would be used as "
                         "numbers. Remove or impute them and pass a plain array "
                         "(x.filled(value) or x.compressed())")
    if np.iscomplexobj(x):
        raise ValueError(f"{name} is complex; kernels take real inputs. Pass the real part "
                         "(x.real) or stack real and imaginary parts as features")
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a numeric (n, d) array: {err}") from None
    allowed = (2, 3, 4) if spatial else (2,)
    if arr.ndim not in allowed:
        hint = (" Reshape it with x.reshape(-1, 1) if it holds one feature per "
                "input, or x.reshape(1, -1) if it is a single input.") if arr.ndim == 1 else ""
        if arr.ndim in (3, 4):
            hint = (" Images (n, H, W, C) and sequences (n, L, C) need a network with "
                    "positions (conv, avg_pool, global_avg_pool or flatten); flatten "
                    "them with x.reshape(len(x), -1) for a fully-connected one.")
        more = (", or images (n, H, W, C) and sequences (n, L, C) for a network with "
                "positions" if spatial else "")
        raise ValueError(
            f"{name} must be a 2D array of shape (n_inputs, n_features){more}; got "
            f"{arr.ndim}D with shape {arr.shape}.{hint}"
        )
    if 0 in arr.shape:
        raise ValueError(f"{name} is empty (shape {arr.shape}); give at least one input "
                         "with at least one feature")
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        where = "row {}, column {}".format(bad[0], bad[1]) if arr.ndim == 2 else \
            "index {}".format(tuple(int(v) for v in bad))
        raise ValueError(
            f"{name} contains NaN or inf (first at {where}: "
            f"{arr[tuple(bad)]}); remove or impute those values"
        )
    return np.ascontiguousarray(arr)


def _check_get(get):
    """``get`` as a tuple of kernel names, or a clear TypeError/ValueError."""
    if isinstance(get, str):
        kinds = (get,)
    else:
        try:
            kinds = tuple(get)
        except TypeError:
            raise TypeError(f"get must name 'nngp' and/or 'ntk' (a string or a tuple of "
                            f"them), got {get!r}") from None
    bad = [k for k in kinds if not isinstance(k, str) or k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"get must name 'nngp' and/or 'ntk', got {get!r}")
    return kinds


def _check_dtype(dtype):
    """``dtype`` as numpy float64 or float32, or a clear ValueError."""
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError):
        raise ValueError(f"dtype must be float64 or float32, got {dtype!r}") from None
    if dt not in (np.float64, np.float32):
        raise ValueError(f"dtype must be float64 or float32, got {dt}")
    return dt


def _check_precision(precision, dt):
    """``precision`` (of the input products) as "float64" or "float32", or a clear
    ValueError; "float32" only for float32 output."""
    try:
        name = np.dtype(precision).name
    except (TypeError, ValueError):
        name = None
    if name not in PRECISIONS or isinstance(precision, (bool, np.bool_)):
        raise ValueError(f"precision must be 'float64' or 'float32' (of the input products "
                         f"x·x'), got {precision!r}")
    precision = name
    if precision == "float32" and dt != np.float32:
        raise ValueError("precision='float32' (input products in float32) is for float32 "
                         "output only; pass dtype='float32' as well, or leave precision at "
                         "'float64'")
    return precision


def _check_memory_limit(memory_limit):
    """``memory_limit`` as a positive number of bytes (or None), or a clear error."""
    if memory_limit is None:
        return None
    if isinstance(memory_limit, (bool, np.bool_)) or not isinstance(memory_limit,
                                                                     numbers.Real):
        raise TypeError(f"memory_limit must be a number of bytes such as 4e9 or 2**32, got "
                        f"{memory_limit!r}")
    if not memory_limit > 0:
        raise ValueError(f"memory_limit must be a positive number of bytes, got "
                         f"{memory_limit!r}")
    return memory_limit


def available_memory():
    """Bytes of memory available to this process (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _format_bytes(n):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.3g} {unit}"
        n /= 1000.0


def _stack_tables(tables, n, transpose):
    """The Hermite tables of the numerical ops, one array per kind (φ, φ'), of
    shape (ops, n, terms), or (ops, terms, n) with ``transpose``."""
    terms = max([t[0].shape[1] for t in tables], default=1)
    shape = (max(len(tables), 1),) + ((terms, n) if transpose else (n, terms))
    out = (np.zeros(shape), np.zeros(shape))
    for index, pair in enumerate(tables):
        for dest, coef in zip(out, pair):
            width = coef.shape[1]
            if transpose:
                _rows.transpose_into(dest[index, :width], coef)
            else:
                dest[index, :, :width] = coef
    return out


def self_diagonals(program, xs):
    """Every input with itself, through the row kernels of the fused pass.

    ``xs``: one or two input sets (rows, columns), vectors (n, d). Returns one
    dict per set: ``var`` and ``roots`` (L + 1, n) — the diagonals entering
    each op and their roots —, ``nngp``, ``ntk`` (n,) and ``tables`` (the
    Hermite coefficients of each numerical op, cut at the same number of
    terms for both sets). Running the same kernels as the Gram entries makes
    a pair of identical inputs give exactly the diagonal.
    """
    n_ops = len(program.ops)
    sides = []
    for x in xs:
        n = x.shape[0]
        var = np.zeros((n_ops + 1, n))
        var[0] = np.einsum("ij,ij->i", x, x) / x.shape[1]
        small = (var[0] < _TINY_VARIANCE) & np.any(x != 0, axis=1)
        if small.any():
            raise FloatingPointError(
                f"the inputs are too small: x·x/d of input {int(np.argmax(small))} is "
                f"{float(var[0][small].min()):.3g}, where float64 loses relative "
                "precision; rescale them (e.g. x / x.std())")
        sides.append({"var": var, "roots": np.sqrt(var), "k": var[0].copy(),
                      "c": np.zeros(n), "t": np.zeros(n),
                      "stash": np.zeros((n, 3 * max(program.n_slots, 1), 1)),
                      "tables": []})
    numerical = [index for index, op in enumerate(program.ops)
                 if getattr(op.kind, "series", False)]
    start = 0
    for stop in numerical + [n_ops]:
        for side in sides:
            _run_self(program, side, start, stop)
        if stop == n_ops:
            break
        kind = program.ops[stop].kind
        for side in sides:  # the series needs finite variances entering it
            _check_finite(program, side["var"][:stop + 1], side["t"])
        # One call for both sets: an input's coefficients are then the same
        # whichever set it is in (kernel(x, x.copy()) == kernel(x)).
        coef, dcoef = kind.coefficients(np.concatenate([side["var"][stop] for side in sides]))
        terms = coef.shape[1]
        cut = [sides[0]["var"].shape[1]]
        for side, a, b in zip(sides, np.split(coef, cut), np.split(dcoef, cut)):
            side["tables"].append((a, b))
        program.ops[stop].params["table"] = len(sides[0]["tables"]) - 1
        program.ops[stop].params["terms"] = terms
        program.prm[stop, :len(kind.row_params)] = program.ops[stop].row()
        start = stop
    for side in sides:
        _check_range(program, side["var"], side["t"])
        side["nngp"], side["ntk"] = side.pop("k"), side.pop("t")
    # Once for both sets (a pair takes one input from each).
    _check_antiparallel(program, np.concatenate([side["var"] for side in sides], axis=1))
    return sides

# Below this, float64 variances lose relative precision (products of two of them
# reach the subnormal range): refuse rather than return rounded-away numbers.
_TINY_VARIANCE = 1e-280


def _check_range(program, var, ntk, small=None):
    """Refuse diagonals that overflowed or underflowed, naming the first such op.

    ``var`` (ops + 1, N): the variances entering each op (row 0 the inputs') and
    leaving the last; ``small``, of the same shape, the ones to test for
    underflow (default ``var``).
    """
    ops = program.ops
    small = var if small is None else small
    _check_finite(program, var, ntk)
    tiny = (small > 0) & (small < _TINY_VARIANCE)
    lost = np.zeros_like(tiny)
    lost[1:] = (small[1:] == 0) & (small[:-1] > 0)
    for index, op in enumerate(ops):
        if getattr(op.kind, "w_std", None) == 0 and getattr(op.kind, "b_std", None) == 0:
            lost[index + 1] = False  # a layer of zero weights and biases outputs 0
        if getattr(op.kind, "name", None) in ("SAVE", "LOAD", "ADD"):
            lost[index + 1] = False  # the stash: its state is not the previous op's
    if tiny[0].any():
        raise FloatingPointError(
            f"the inputs are too small: x·x/d reaches {float(small[0][tiny[0]].min()):.3g}, "
            "where float64 loses relative precision; rescale them (e.g. x / x.std())")
    if (tiny | lost).any():
        index = int(np.argmax((tiny | lost).any(axis=1)))
        raise FloatingPointError(
            f"the variances underflow at layer {index} ({ops[index - 1]}): they reach "
            f"{float(small[index][(tiny | lost)[index]].min()):.3g}, where float64 loses "
            "relative precision; raise w_std or b_std, or rescale the inputs")


# The accuracy the README states for closed forms: past it, a warning.
_STATED_ACCURACY = 1e-13


def _check_antiparallel(program, var):
    """Warn where a layer's kernels between nearly antiparallel inputs are less
    accurate than stated, with the bound
    (:meth:`~limitkernel.layers.activations.Activation.antiparallel_error`, at the
    largest variance entering the layer)."""
    for index, op in enumerate(program.ops):
        bound = getattr(op.kind, "antiparallel_error", None)
        if bound is None:
            continue
        q = float(np.max(var[index]))
        k_err, t_err = bound(q)
        if max(k_err, t_err) <= _STATED_ACCURACY:
            continue
        warnings.warn(
            f"layer {index + 1} ({op}) at variances up to {q:.3g}: between nearly "
            "antiparallel inputs (x' ≈ −λx as this layer sees them) its kernels depend "
            "on 1 + ρ below float64's rounding, so such entries may be off by up to "
            f"{k_err:.1g} (K) and {t_err:.1g} (Θ) relative; other pairs keep full "
            "accuracy. Lower b or the input scale if your inputs hold such pairs",
            PrecisionWarning, stacklevel=_caller_level())


def _check_finite(program, var, ntk):
    """Refuse diagonals that are not finite, naming the first op that made them so;
    ``var`` holds the variances entering the ops so far (row 0 the inputs')."""
    ops = program.ops
    bad = ~np.isfinite(var).all(axis=1)
    if bad.any() or not np.all(np.isfinite(ntk)):
        index = int(np.argmax(bad)) if bad.any() else len(var) - 1
        raise FloatingPointError(
            f"the kernel overflows at layer {max(index, 1)} ({ops[max(index - 1, 0)]}): "
            f"variances reach {float(np.max(np.abs(var[:index]))):.3g} before it; lower "
            "w_std, b_std or the input scale")


def _check_spatial_range(program, var, ntk):
    """:func:`_check_range` of a network on positions, whose table ``var`` (N, R)
    holds each op's variances at every position: per op, the largest of an
    input's positions (inf if one is not finite) is tested for overflow, the
    smallest non-zero one (0 if all are) for underflow. Returns the largest
    ones, (ops + 1, N)."""
    big, small = [], []
    for layer in range(len(program.ops) + 1):
        start = program.offsets[layer]
        block = var[:, start:start + program.positions[layer]]
        finite = np.isfinite(block).all(axis=1)
        big.append(np.where(finite, np.abs(block).max(axis=1), np.inf))
        low = np.where(block > 0, block, np.inf).min(axis=1)
        small.append(np.where(np.isinf(low), 0.0, low))
    big = np.array(big)
    _check_range(program, big, ntk, np.array(small))
    return big


def _run_self(program, side, start, stop):
    if stop <= start:
        return
    prm = program.prm
    # The columns' tables serve Gram rows only (a series op on the diagonal
    # sums its own coefficients).
    h2 = hd2 = np.zeros((1, 1, 1))
    if side["tables"]:
        # A stretch holds at most one numerical op, at its start: the newest
        # table, passed alone (as table 0).
        coef, dcoef = side["tables"][-1]
        h1, hd1 = coef[None], dcoef[None]
        if program.codes[start] == _fused.OP_HERMITE:
            prm = prm.copy()
            prm[start, 0] = 0.0
    else:
        h1 = hd1 = np.zeros((1, 1, 1))
    status = np.full(1, -1, dtype=np.int64)
    _fused.self_rows(start, stop, side["var"], side["roots"], side["k"], side["c"],
                     side["t"], side["stash"], program.codes, prm, h1, h2, hd1, hd2,
                     status)
    _check_status(status)


# ------------------------------------------------------------ public API


class _Side:
    """What the fused pass needs of the rows (or the columns) of a Gram matrix.

    ``x`` the inputs, ``xn`` (n, d, 2) their unit vectors in two parts
    (:func:`_normalise`), ``unit32`` (n, d) those rounded to float32 for a float32
    GEMM (or None), ``roots`` (L + 1, n)
    the square roots of the diagonals entering each layer, ``var0`` (n,) the
    input layer's diagonals, ``h``, ``hd`` the Hermite tables of the numerical
    layers: (T, n, terms) for rows, (T, terms, n) for columns (``axis`` is the
    axis of ``h`` that runs over inputs).
    """

    def __init__(self, x, xn, roots, var0, h, hd, axis, unit32=None):
        self.x, self.xn, self.roots, self.var0 = x, xn, roots, var0
        self.h, self.hd, self.axis = h, hd, axis
        self.unit32 = unit32

    def __len__(self):
        return self.x.shape[0]

    @property
    def nbytes(self):
        """Bytes held: inputs, unit-norm copies, diagonals, Hermite tables."""
        arrays = (self.x, self.xn, self.roots, self.var0, self.h, self.hd, self.unit32)
        return sum(a.nbytes for a in arrays if a is not None)

    def part(self, a, b):
        """Inputs a .. b - 1, as C-contiguous copies (one compiled layout)."""
        if a == 0 and b == len(self):
            return self
        cut = (slice(None),) * self.axis + (slice(a, b),)
        return _Side(self.x[a:b], self.xn[a:b], np.ascontiguousarray(self.roots[:, a:b]),
                     self.var0[a:b], np.ascontiguousarray(self.h[cut]),
                     np.ascontiguousarray(self.hd[cut]), self.axis,
                     None if self.unit32 is None else self.unit32[a:b])


class _SpatialSide:
    """What the spatial passes need of the rows (or columns) of a Gram matrix.

    ``x`` (n, P, C) the inputs with positions flattened, ``xn`` (n, P, C, 2)
    each position's channel vector at unit norm in two parts, ``var``/``root``
    (n, R) the per-position diagonals of every op and their roots. Transposed copies for the column
    side are made on first use.
    """

    def __init__(self, x, xn, var, root):
        self.x, self.xn, self.var, self.root = x, xn, var, root
        self._t = {}

    def __len__(self):
        return self.x.shape[0]

    @property
    def nbytes(self):
        """Bytes held, counting the transposed copies of the column side."""
        own = sum(a.nbytes for a in (self.x, self.xn, self.var, self.root))
        return 2 * own

    def part(self, a, b):
        if a == 0 and b == len(self):
            return self
        return _SpatialSide(self.x[a:b], self.xn[a:b], self.var[a:b], self.root[a:b])

    def _transposed(self, name, make):
        if name not in self._t:
            self._t[name] = np.ascontiguousarray(make())
        return self._t[name]

    def x_t(self):
        return self._transposed("x", lambda: self.x.transpose(1, 2, 0))

    def xn_t(self):
        return self._transposed("xn", lambda: self.xn.transpose(1, 2, 3, 0))

    def root_t(self):
        return self._transposed("root", lambda: self.root.T)


def _check_status(status):
    if status[0] >= 0:
        raise RuntimeError(f"the fused pass has no kernel for opcode {status[0]} here; "
                           "every op kind must be dispatched in limitkernel._fused "
                           "(and _fused_spatial for networks on images and sequences)")


class GramPlan:
    """Everything a tile of the Gram matrices needs, computed once per input set.

    Built by :func:`prepare`. A plan holds the validated inputs, their unit-norm
    copies, the per-layer diagonals and the Hermite tables of numerical layers;
    any tile (rows r0:r1, columns c0:c1) then costs one GEMM and one fused pass,
    and tiles are independent. The plan is picklable (it holds arrays and the
    lowered program only), so the same tile function serves the in-process loop
    of :func:`kernel`, the out-of-core writer and Dask workers
    (:mod:`limitkernel.distributed`).

    Attributes
    ----------
    shape : (int, int)
        (n1, n2) of the Gram matrices.
    symmetric : bool
        ``x2`` was ``None``: the matrices are symmetric.
    kinds : tuple of str
        The kernels computed ("nngp", "ntk").
    dtype : numpy.dtype
        Output dtype.
    precision : str
        Of the input products x·x' ("float64", or "float32": a float32 GEMM of
        the unit vectors, float32 output only).
    products_error : float
        With float32 products, the stated bound of their error in the kernels,
        relative to √(K(x, x) K(x', x')) (``FLOAT32_PRODUCTS_ERROR`` · max(1, χ)
        · max(1, √(d / 65536)), d the number of features); 0 otherwise.
    nngp_diag, ntk_diag : (n1,) arrays
        K(x, x) and Θ(x, x) of the row inputs.
    """

    def __init__(self, spec, x1, x2, kinds, dtype, precision="float64"):
        program = Program(spec, x1.shape[1:])
        self.kinds, self.dtype = kinds, dtype
        self.precision = _check_precision(precision, dtype)
        self.products_error = 0.0
        # The GEMM is of the float32 unit vectors (and holds ρ), or of the inputs.
        self.unit = self.precision == "float32" and program.spatial is None
        self.near = NEAR_DUPLICATE_FLOAT32 if self.unit else _fused.NEAR_DUPLICATE
        self.symmetric = x2 is None
        self.want_ntk = "ntk" in kinds
        self.n_features = int(np.prod(x1.shape[1:]))
        self.shape = (len(x1), len(x1 if x2 is None else x2))
        self.codes, self.prm = program.codes, program.prm
        self.program = program
        # With dropout, two equal rows are two examples (independent masks).
        dropout = any(getattr(op.kind, "p", 0) > 0 for op in program.ops)
        self.twins = _twin_pairs(x1, x2) if not dropout else (np.empty(0, int),) * 2
        if program.spatial is not None:
            self._init_spatial(program, x1, x2)
            return
        self.spatial = None
        self.scale = 1.0 / x1.shape[1]
        x2 = x1 if self.symmetric else x2
        try:
            sides = self_diagonals(program, [x1] if self.symmetric else [x1, x2])
        except (ArithmeticError, ValueError):
            # The layer-by-layer walk names the cause of an overflow more
            # precisely (K or Θ, and which layer); it raises first if it sees one.
            program.diagonals(x1)
            raise
        self.nngp_diag, self.ntk_diag = sides[0]["nngp"], sides[0]["ntk"]
        self._check_output_range([(side["nngp"], side["ntk"]) for side in sides])
        x1n = _normalise(x1)
        x2n = x1n if self.symmetric else _normalise(x2)
        u1 = np.ascontiguousarray(x1n[..., 0], dtype=np.float32) if self.unit else None
        u2 = None if not self.unit else u1 if self.symmetric else \
            np.ascontiguousarray(x2n[..., 0], dtype=np.float32)
        first, last = sides[0], sides[-1]
        self.rows = _Side(x1, x1n, first["roots"], first["var"][0],
                          *_stack_tables(first["tables"], len(x1), False), 1, u1)
        self.cols = _Side(x2, x2n, last["roots"], last["var"][0],
                          *_stack_tables(last["tables"], len(x2), True), 2, u2)
        if self.unit:
            self._check_float32_products(program, x1, x2)

    def _check_output_range(self, diags):
        """float32 output: refuse kernels that may not fit in float32, and warn
        where their scale is below its normal range (relative precision lost).

        ``diags`` holds (K, Θ) diagonals of the rows' inputs and, for two input
        sets, of the columns'; an entry is at most √(K(x, x) K(x', x')) in size.
        """
        if self.dtype != np.float32:
            return
        info = np.finfo(np.float32)
        for index, kind in enumerate(("K", "Θ")):
            sides = [np.abs(d[index]) for d in diags]
            high = [float(np.max(d)) for d in sides]
            largest = math.sqrt(high[0]) * math.sqrt(high[-1])
            if largest > float(info.max):
                raise FloatingPointError(
                    f"{kind} reaches {max(high):.3g} on the diagonal, beyond float32's range "
                    f"({float(info.max):.3g}), so entries would be inf in float32; use "
                    "dtype='float64', or rescale the inputs (or lower w_std, b_std)")
            positive = [d[d > 0] for d in sides]
            if not all(len(d) for d in positive):
                continue
            low = [float(np.min(d)) for d in positive]
            smallest = math.sqrt(low[0]) * math.sqrt(low[-1])
            if smallest < 2.0 * float(info.tiny):
                # Rounding below the normal range errs by up to half a subnormal.
                bound = min(float(info.smallest_subnormal) / 2 / smallest + 2.0 ** -24, 1.0)
                warnings.warn(
                    f"float32 output: {kind} falls to {min(low):.3g} on the diagonal, below "
                    f"float32's normal range ({float(info.tiny):.3g}), where it keeps no "
                    f"relative precision: entries may be off by up to {bound:.1g} of "
                    f"√({kind}(x, x) {kind}(x', x')); use dtype='float64', or rescale the "
                    "inputs", PrecisionWarning, stacklevel=_caller_level())

    def _check_float32_products(self, program, x1, x2):
        """Warn when float32 input products may cost more than
        ``_FLOAT32_PRODUCTS_WARN`` of the kernels' scale, with the bound."""
        slopes = []
        for x in (x1,) if self.symmetric else (x1, x2):
            program.diagonals(x)
            slopes.append(program.chi_max or 0.0)
        chi = max(slopes)
        self.products_error = FLOAT32_PRODUCTS_ERROR * max(1.0, chi) * max(
            1.0, math.sqrt(self.n_features / _FLOAT32_PRODUCTS_D))
        if self.products_error > _FLOAT32_PRODUCTS_WARN:
            warnings.warn(
                f"precision='float32': this network multiplies errors in its inputs' "
                f"correlations by up to χ = {chi:.3g} (its correlation slope at ρ = 1), and "
                f"float32 products of {self.n_features} features err by a few 1e-7 or "
                f"more, so its kernels may err by up to "
                f"{self.products_error:.1g} of sqrt(K(x, x) K(x', x')); use "
                "precision='float64' (the default)", PrecisionWarning,
                stacklevel=_caller_level())

    def _init_spatial(self, program, x1, x2):
        """Images or sequences: per-position tables of diagonals for both sides."""
        if any(getattr(op.kind, "series", False) for op in program.ops):
            raise SpecError("activations by Hermite series (tanh, softplus, silu, elu, "
                            "softsign, Numerical) are not yet supported in networks on "
                            "images or sequences; use a closed-form activation (erf, gelu, "
                            "relu, ...)")
        self.spatial = program
        self.geo, self.imap = program.geo, program.imap
        self.offsets, self.positions = program.offsets, program.positions
        self.collapse = program.collapse
        self.n_slots = max(program.n_slots, 1)
        self.work_size = program.work_size()
        sides, diags, largest = [], [], []
        for x in (x1,) if self.symmetric else (x1, x2):
            flat = np.ascontiguousarray(x.reshape(len(x), -1, x.shape[-1]))
            xn = _normalise(flat)
            if program.pairs:
                var = np.zeros((len(x), program.table_width))
                root = np.zeros_like(var)
                status = np.full(1, -1, dtype=np.int64)
                nngp, ntk = _fused_spatial.self_pairs(
                    flat, xn, root, var, program.codes, program.prm, program.geo,
                    program.imap, program.offsets, program.positions, self.n_slots,
                    self.work_size, program.collapse, status)
                _check_status(status)
            else:
                var = np.zeros((len(x), program.table_width))
                var[:, :program.positions[0]] = np.einsum("npc,npc->np", flat, flat) / \
                    flat.shape[2]
                root = np.sqrt(var)
                root_t = np.ascontiguousarray(root.T)
                status = np.full(1, -1, dtype=np.int64)
                nngp, ntk = _fused_spatial.self_rows(
                    flat, xn, np.ascontiguousarray(flat.transpose(1, 2, 0)),
                    np.ascontiguousarray(xn.transpose(1, 2, 3, 0)), var, root, root_t,
                    program.codes, program.prm, program.geo, program.imap, program.offsets,
                    program.positions, self.n_slots, status)
                _check_status(status)
            largest.append(_check_spatial_range(program, var, ntk))
            sides.append(_SpatialSide(flat, xn, var, root))
            diags.append((nngp, ntk))
        _check_antiparallel(program, np.concatenate(largest, axis=1))
        self.nngp_diag, self.ntk_diag = diags[0]
        self._check_output_range(diags)
        self.rows = sides[0]
        self.cols = sides[-1]

    @functools.cached_property
    def chi(self):
        """The network's correlation slope at ρ = 1 (:attr:`Program.chi`) over the
        row inputs, for the degenerate-kernel warning only: computed when that
        asks for it (a walk of every layer's diagonals; None on positions)."""
        if self.spatial is not None:
            return None
        try:
            self.program.diagonals(self.rows.x)
        except (ArithmeticError, ValueError):  # a warning's detail never raises
            return None
        return self.program.chi

    def gemm(self, rows, cols, r0, r1, c0, c1, out):
        """x_i · x'_j (unscaled) for rows r0:r1 and columns c0:c1 into ``out``
        (float64, (r1 - r0, c1 - c0), rows of unit stride); with input products
        in float32, x̂_i · x̂'_j of the unit vectors into a float32 ``out``. Inputs
        on positions need none."""
        if self.spatial is not None:
            return
        if self.unit:
            np.matmul(rows.unit32[r0:r1], cols.unit32[c0:c1].T, out=out)
        else:
            np.matmul(rows.x[r0:r1], cols.x[c0:c1].T, out=out)

    @property
    def in_place(self):
        """The outputs can hold the GEMM itself (float64, or products in float32)."""
        return self.dtype == np.float64 or self.unit

    def block(self, rows, cols, r0, r1, c0, c1, g, k_out, t_out, sym, mirror=False,
              want_nngp=True):
        """Rows r0:r1, columns c0:c1 of ``rows`` × ``cols`` into the outputs.

        Indices are relative to the two sides (:meth:`_Side.part`) and the
        outputs are indexed the same way; ``g`` holds the products of
        :meth:`gemm` for these rows and columns (vectors only; it may be the
        rows r0:r1 of an output itself, whose entries each row reads before
        it writes them). With ``sym`` only entries with column >= row are
        written; with ``mirror`` too (rows and columns the same inputs, c0 ==
        r0 or 0), each of them also at its mirror place. Without
        ``want_nngp`` (vectors only), ``k_out`` is not written.
        """
        status = np.full(3, -1, dtype=np.int64)
        if self.spatial is not None:
            if self.spatial.pairs:
                _fused_spatial.pairs_block(
                    r0, r1, c0, c1, sym, self.collapse, rows.x, rows.xn, cols.x, cols.xn,
                    rows.root, cols.root, rows.var, cols.var, cols.root_t(), self.codes,
                    self.prm, self.geo, self.imap, self.offsets, self.positions,
                    self.n_slots, self.work_size, k_out, t_out, status, self.want_ntk)
            else:
                _fused_spatial.rows_block(
                    r0, r1, c0, c1, sym, rows.x, rows.xn, cols.x_t(), cols.xn_t(), rows.root,
                    cols.root_t(), self.codes, self.prm, self.geo, self.imap, self.offsets,
                    self.positions, self.n_slots, k_out, t_out, status, self.want_ntk)
            _check_status(status)
            if mirror:
                for out in (k_out, t_out) if self.want_ntk else (k_out,):
                    _mirror_block(out, r0, r1, c1)
            return
        _fused.gram_block(g, k_out, t_out, r0, c0, sym, mirror, self.scale, self.unit,
                          self.near, rows.xn, cols.xn, rows.roots, cols.roots, rows.var0,
                          cols.var0, self.codes, self.prm, rows.h, cols.h, rows.hd, cols.hd,
                          status, want_nngp, self.want_ntk)
        _check_status(status)
        if status[1] >= 0:
            self._not_finite(rows, cols, int(status[1]), int(status[2]))

    def _not_finite(self, rows, cols, i, j):
        """Raise for the entry (i, j) that is not finite, naming the op that made it so."""
        one = np.full(1, float(rows.unit32[i] @ cols.unit32[j]) if self.unit
                      else float(rows.x[i] @ cols.x[j]))
        omr, ntk = np.empty(1), np.zeros(1)
        status = np.full(3, -1, dtype=np.int64)
        _fused.init_row(one, omr, self.scale, i, j, rows.xn, cols.xn, rows.roots[0, i],
                        cols.roots[0, j:j + 1], rows.var0[i], cols.var0[j:j + 1], False,
                        self.unit, self.near)
        stash, rho, acc = np.empty((0, 0)), np.empty(0), np.empty(0)
        for layer in range(len(self.codes)):
            stash, rho, acc = _fused.run_ops(
                layer, layer + 1, one, omr, ntk, stash, rho, acc, i, j, rows.roots,
                cols.roots, self.codes, self.prm, rows.h, cols.h, rows.hd, cols.hd,
                False, self.want_ntk, status)
            if not (np.isfinite(one[0]) and np.isfinite(ntk[0])):
                raise FloatingPointError(
                    f"the kernel is not finite between inputs {i} and {j}: layer "
                    f"{layer + 1} ({self.program.ops[layer]}) gives "
                    f"{'K' if not np.isfinite(one[0]) else 'Θ'} = "
                    f"{one[0] if not np.isfinite(one[0]) else ntk[0]} from finite values; "
                    "lower the input scale, w_std or b_std (and please report it if they "
                    "are moderate)")
        raise FloatingPointError(f"the kernel is not finite between inputs {i} and {j}; "
                                 "lower the input scale, w_std or b_std")

    def copy_twins(self, outs, r0, c0):
        """Entries of identical inputs ← the diagonal, in ``outs`` ({kind: array}
        holding rows r0… and columns c0… of the Gram matrices).

        The passes compute such an entry with the same operations as the
        diagonal, but a vectorised loop may round one of them differently;
        identical inputs have, by definition, exactly the same kernel values.
        """
        i, j = self.twins
        if not len(i):
            return
        height, width = next(iter(outs.values())).shape
        inside = (i >= r0) & (i < r0 + height) & (j >= c0) & (j < c0 + width)
        i, j = i[inside], j[inside]
        diags = {"nngp": self.nngp_diag, "ntk": self.ntk_diag}
        for kind, out in outs.items():
            out[i - r0, j - c0] = diags[kind][i]

    def tile(self, r0, r1, c0, c1):
        """The Gram matrices on rows r0:r1 and columns c0:c1.

        Returns ``{kind: (r1 - r0, c1 - c0) array}`` for the kinds of the plan.
        In the symmetric case a square tile on the diagonal computes its upper
        triangle and mirrors it; entries on the matrix diagonal are always the
        exact diagonals, as in :func:`kernel`.
        """
        n, m = self.shape
        if not (0 <= r0 < r1 <= n and 0 <= c0 < c1 <= m):
            raise ValueError(f"tile rows {r0}:{r1}, columns {c0}:{c1} are not inside the "
                             f"{n} x {m} Gram matrix")
        nr, nc = r1 - r0, c1 - c0
        on_diag = self.symmetric and (r0, r1) == (c0, c1)
        want_nngp = "nngp" in self.kinds or self.spatial is not None
        k_out = _output((nr, nc) if want_nngp else (1, 1), self.dtype)
        t_out = _output((nr, nc) if self.want_ntk else (1, 1), self.dtype)
        rows, cols = self.rows.part(r0, r1), self.cols.part(c0, c1)
        # The output holds the GEMM itself where it can (each row is read before
        # written).
        g = (k_out if want_nngp else t_out) if self.in_place else np.empty((nr, nc))
        self.gemm(rows, cols, 0, nr, 0, nc, g)
        self.block(rows, cols, 0, nr, 0, nc, g, k_out, t_out, on_diag, on_diag, want_nngp)
        outs = {"nngp": (k_out, self.nngp_diag), "ntk": (t_out, self.ntk_diag)}
        result = {}
        for kind in self.kinds:
            out, diag = outs[kind]
            if self.symmetric:
                lo, hi = max(r0, c0), min(r1, c1)
                idx = np.arange(lo, hi)
                out[idx - r0, idx - c0] = diag[lo:hi]
            result[kind] = out
        self.copy_twins(result, r0, c0)
        return result


def prepare(spec, x1, x2=None, get=KINDS, dtype="float64", precision="float64"):
    """Validate inputs and build the :class:`GramPlan` that computes any tile.

    Parameters are those of :func:`kernel`. The work is O((n1 + n2)·d): the
    diagonals of every layer, unit-norm copies of the inputs and, for numerical
    activations, their Hermite tables.
    """
    kinds = _check_get(get)
    dt = _check_dtype(dtype)
    _check_precision(precision, dt)
    x1 = check_inputs(x1, "x1", spatial=True)
    if x2 is not None:
        x2 = check_inputs(x2, "x2", spatial=True)
        if x2.shape[1:] != x1.shape[1:]:
            what = ("number of features" if x1.ndim == 2 == x2.ndim
                    else "shape per input (positions and channels)")
            got = (f"{x1.shape[1]} and {x2.shape[1]}" if x1.ndim == 2 == x2.ndim
                   else f"{x1.shape[1:]} and {x2.shape[1:]}")
            raise ValueError(f"x1 and x2 must have the same {what}, got {got}")
    return GramPlan(spec, x1, x2, kinds, dt, precision)


def kernel(spec, x1, x2=None, get=KINDS, dtype="float64", memory_limit=None,
           progress=False, precision="float64"):
    """Infinite-width NNGP covariance and NTK of a fully-connected network.

    Parameters
    ----------
    spec : str or Serial or list of layers
        The architecture, e.g. ``"3 * [dense(w_std=1.5, b_std=0.05), relu], dense"``.
        It must end with a dense readout layer.
    x1 : (n1, d) array_like
        Inputs. Integer and non-contiguous arrays are converted.
    x2 : (n2, d) array_like, optional
        Second input set; ``None`` means ``x1`` with itself (only half is computed).
    get : {"nngp", "ntk"} or tuple of them
        Which kernels to return.
    dtype : {"float64", "float32"}
        Output dtype. Arithmetic is float64 either way, so float32 output carries
        only its own rounding (relative error ≤ 6e-8), unless ``precision`` is
        "float32".
    memory_limit : int or float, optional
        Bytes the outputs may use; defaults to the memory available now.
    progress : bool
        Show a progress bar (needs tqdm).
    precision : {"float64", "float32"}
        Precision of the input products x·x' (the one matrix product; all
        arithmetic after it is float64). "float32" (with ``dtype="float32"``
        only) multiplies the inputs' unit vectors rounded to float32, about
        twice as fast, and recomputes ρ in float64 for nearly identical and
        nearly antiparallel pairs (1 ∓ ρ < 1e-2). Its kernels err by at most
        2e-5 · max(1, χ) · max(1, √(d/65536)) of √(K(x, x) K(x', x')) (χ: the
        network's correlation slope at ρ = 1; d: the number of features; a
        PrecisionWarning gives the bound where it exceeds 1e-4), against 6e-8
        of each entry with "float64". Networks on positions have no input
        product, and there it changes nothing.

    Returns
    -------
    dict
        ``{"nngp": (n1, n2) array, "ntk": (n1, n2) array}`` (those requested).

    Notes
    -----
    Conventions follow Neural Tangents: K⁰ = x·x'/d, Θ⁰ = 0, and per dense layer

    .. math::

        K \\leftarrow \\sigma_w^2 K + \\sigma_b^2, \\qquad
        \\Theta \\leftarrow K_{\\text{new}} + \\sigma_w^2 \\Theta \\quad (\\text{ntk}),

    per activation K ← E[φ(u)φ(v)], Θ ← Θ · E[φ'(u)φ'(v)] (Jacot et al. 2018).
    """
    memory_limit = _check_memory_limit(memory_limit)
    plan = prepare(spec, x1, x2, get, dtype, precision)
    sym, dt = plan.symmetric, plan.dtype
    n, m = plan.shape
    # Vectors write only the kernels asked for; the passes over positions
    # always carry K.
    want_nngp = "nngp" in plan.kinds or plan.spatial is not None
    _check_memory(n, m, plan.n_features, dt, int(want_nngp) + int(plan.want_ntk),
                  memory_limit, scratch=plan.spatial is None and not plan.in_place,
                  unit32=plan.unit)

    k_out = _output((n, m) if want_nngp else (1, 1), dt)
    t_out = _output((n, m) if plan.want_ntk else (1, 1), dt)
    rows = _block_rows(n, m)
    bar = _progress(n) if progress else None
    if plan.spatial is not None:
        # The passes over positions need no GEMM; each block's mirror image
        # is copied after it.
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            plan.block(plan.rows, plan.cols, r0, r1, r0 if sym else 0, m, None, k_out,
                       t_out, sym, sym, want_nngp)
            _advance(bar, r1 - r0)
    else:
        # All the GEMM first, then all the passes: BLAS and the passes each
        # keep their own threads, which spin for a while after their work, so
        # alternating between them block by block costs both. A float64 output
        # holds the GEMM itself (each row of the pass reads its products
        # before it writes the row), and so does a float32 output whose
        # products are float32; otherwise float32 output takes chunks of rows
        # through a float64 scratch. With x2 = None only the upper triangle is
        # formed (row block r0:r1 against columns r0:m), and the pass writes
        # its mirror image below the diagonal while it is in cache; the
        # outputs' pages are first touched by the threads of the GEMM and of
        # the pass.
        in_place = plan.in_place
        scratch = None
        for c_start, c_stop in _chunks(n, m, in_place):
            if in_place:
                g = k_out if want_nngp else t_out
            else:
                # One scratch for every chunk: its pages are touched once.
                if scratch is None:
                    scratch = np.empty((c_stop - c_start, m))
                g = scratch[:c_stop - c_start]
            base = 0 if in_place else c_start
            for r0 in range(c_start, c_stop, rows):
                r1 = min(r0 + rows, c_stop)
                c0 = r0 if sym else 0
                plan.gemm(plan.rows, plan.cols, r0, r1, c0, m, g[r0 - base:r1 - base, c0:])
            for r0 in range(c_start, c_stop, rows):
                r1 = min(r0 + rows, c_stop)
                plan.block(plan.rows, plan.cols, r0, r1, 0, m, g[r0 - base:r1 - base],
                           k_out, t_out, sym, sym, want_nngp)
                _advance(bar, r1 - r0)
            del g
        del scratch
    if bar is not None:
        bar.close()
    if sym:
        if want_nngp:
            np.fill_diagonal(k_out, plan.nngp_diag)
        if plan.want_ntk:
            np.fill_diagonal(t_out, plan.ntk_diag)
    out = {"nngp": k_out, "ntk": t_out}
    result = {kind: out[kind] for kind in plan.kinds}
    plan.copy_twins(result, 0, 0)
    for kind, value in result.items():
        _warn_if_degenerate(kind, value, lambda: plan.chi)
    return result


def kernel_diag(spec, x, get=KINDS):
    """The diagonals K(x, x) and Θ(x, x) only, in O(n·d) time."""
    kinds = _check_get(get)
    x = check_inputs(x, "x", spatial=True)
    plan = GramPlan(spec, x, None, KINDS, np.dtype(np.float64))
    nngp, ntk = plan.nngp_diag, plan.ntk_diag
    out = {"nngp": nngp, "ntk": ntk}
    return {kind: out[kind] for kind in kinds}


def _mirror_block(out, r0, r1, stop):
    """Copy the entries (i, j), r0 <= i < r1, i < j < stop, of ``out`` to (j, i)."""
    square = out[r0:r1, r0:r1]
    lower = np.tril_indices(r1 - r0, -1)
    square[lower] = square.T[lower]
    out[r1:stop, r0:r1] = out[r0:r1, r1:stop].T


def _normalise(x):
    """The inputs' unit vectors as two parts each (rows, features, 2): see
    :func:`limitkernel._rows.unit_rows`; a zero input stays 0. Rows of x are the
    last axis's vectors: (n, d) vectors, or (n, P, C) channels per position."""
    flat = np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float64)
    out = np.empty(flat.shape + (2,))
    _rows.unit_rows(flat, out)
    return out.reshape(x.shape + (2,))


def _twin_pairs(x1, x2):
    """(i, j) index arrays of the identical inputs x1[i] = x2[j] (i ≠ j when x2 is
    None: x1 with itself)."""
    n = len(x1)
    flat = x1.reshape(n, -1)
    if x2 is not None:
        flat = np.concatenate([flat, x2.reshape(len(x2), -1)])
    groups = {}
    for first, later in _identical_rows(flat):
        groups.setdefault(first, [first]).append(later)
    rows, cols = [], []
    for members in groups.values():
        members = np.array(members)
        if x2 is None:
            a, b = np.meshgrid(members, members, indexing="ij")
            off = a != b
            rows.append(a[off])
            cols.append(b[off])
        else:
            a, b = np.meshgrid(members[members < n], members[members >= n] - n,
                               indexing="ij")
            rows.append(a.ravel())
            cols.append(b.ravel())
    if not rows:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    return np.concatenate(rows).astype(np.int64), np.concatenate(cols).astype(np.int64)


def _row_hashes(x):
    """A 64-bit hash of each row's bits (-0.0 read as 0.0): Σ_k bits_k · m_k mod 2⁶⁴
    with fixed random odd multipliers m_k. Equal rows have equal hashes."""
    n, d = x.shape
    mult = np.random.default_rng(0x5EED).integers(1, 2 ** 63, size=d, dtype=np.uint64)
    mult |= np.uint64(1)
    out = np.empty(n, dtype=np.uint64)
    _rows.row_hashes(x.view(np.uint64), mult, out)
    return out


def _identical_rows(x):
    """Pairs (i, j), i < j, of rows of x equal in every feature; i the first such row.

    Equal means equal as numbers (x has no NaN; -0.0 equals 0.0). Rows are grouped
    by a hash of their bits (one pass over x, then a sort of N hashes) and every
    candidate pair is confirmed by comparing the rows; a run of equal hashes that
    holds different rows is split exactly by sorting its rows.
    """
    x = np.ascontiguousarray(x, dtype=np.float64)
    n = x.shape[0]
    empty = np.empty((0, 2), dtype=np.int64)
    if n < 2:
        return empty
    hashes = _row_hashes(x)
    order = np.argsort(hashes, kind="stable")  # ascending index within a run
    sorted_hashes = hashes[order]
    starts = np.r_[True, sorted_hashes[1:] != sorted_hashes[:-1]]
    run = np.cumsum(starts) - 1
    first = order[starts][run]
    later = np.nonzero(~starts)[0]
    i, j = first[later], order[later]
    equal = np.empty(i.size, dtype=bool)
    rows = max(1, (1 << 20) // x.shape[1])
    for r0 in range(0, i.size, rows):
        equal[r0:r0 + rows] = np.all(x[i[r0:r0 + rows]] == x[j[r0:r0 + rows]], axis=1)
    pairs = [np.stack([i, j], axis=1)]
    if not np.all(equal):
        mixed = np.unique(run[later[~equal]])
        keep = ~np.isin(run[later], mixed)
        pairs = [pairs[0][keep]]
        for r in mixed:
            members = order[run == r]
            pairs.append(_identical_rows_by_sorting(x[members], members))
    pairs = np.concatenate(pairs).astype(np.int64)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def _identical_rows_by_sorting(x, index):
    """:func:`_identical_rows` of the rows x (labelled by index, ascending), by sorting
    them as byte strings."""
    x = np.ascontiguousarray(x, dtype=np.float64) + 0.0  # -0.0 + 0.0 == +0.0
    rows = x.view(np.dtype((np.void, x.itemsize * x.shape[1]))).ravel()
    _, first, inverse, counts = np.unique(rows, return_index=True, return_inverse=True,
                                          return_counts=True)
    inverse = inverse.reshape(-1)
    j = np.nonzero(counts[inverse] > 1)[0]
    i = first[inverse[j]]
    keep = i != j
    return np.stack([index[i[keep]], index[j[keep]]], axis=1)


def _block_rows(n, m):
    """Rows per GEMM block: about _BLOCK_BYTES of float64, a multiple of 16 (so
    that the pass's groups of rows start on a cache line of the output)."""
    return max(1, min(n, 16 * max(1, _BLOCK_BYTES // (8 * m * 16))))


def _output(shape, dtype):
    """An uninitialised array whose data start on a cache line (64 bytes).

    The pass writes the mirror image of a group of rows one cache line per
    output row; numpy's own allocations start 16 bytes into a line, so each
    of those writes would touch two lines.
    """
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(size + _fused.CACHE_LINE, dtype=np.uint8)
    start = -raw.ctypes.data % _fused.CACHE_LINE
    return raw[start:start + size].view(dtype).reshape(shape)


def _chunk_rows(n, m):
    """Rows of a float32 output whose float64 GEMM scratch (rows × m) holds
    about _SCRATCH_BYTES, at least one GEMM block."""
    return min(n, max(_block_rows(n, m), _SCRATCH_BYTES // (8 * m)))


def _chunks(n, m, in_place):
    """Row ranges whose GEMM is formed before their passes run: all rows when
    the output holds the GEMM itself, else chunks of :func:`_chunk_rows`."""
    if in_place:
        return [(0, n)]
    rows = _chunk_rows(n, m)
    return [(r0, min(r0 + rows, n)) for r0 in range(0, n, rows)]


def _check_memory(n, m, d, dt, count, memory_limit, scratch=True, unit32=False):
    """Refuse ``count`` (n, m) outputs of dtype ``dt`` that would not fit, with
    the float64 GEMM scratch of a float32 output (``scratch``) and the float32
    unit vectors of products in float32 (``unit32``)."""
    # the inputs and their unit vectors (two parts each)
    need = count * n * m * dt.itemsize + 3 * (n + m) * d * 8
    if unit32:
        need += (n + m) * d * 4
    if scratch and dt != np.float64:
        need += 8 * _chunk_rows(n, m) * m
    limit = memory_limit if memory_limit is not None else available_memory()
    if limit is not None and need > limit:
        raise MemoryBudgetError(
            f"the requested {'nngp and ntk' if count == 2 else 'kernel'} for {n} x {m} "
            f"inputs need {_format_bytes(need)} but only {_format_bytes(limit)} is "
            "available; ask for one kernel (get='ntk'), use dtype='float32', or "
            "compute it in row blocks of x1"
        )


def _progress(n):
    """A progress bar over the n rows of the output, or None without tqdm."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        warnings.warn("progress=True needs tqdm: pip install 'limitkernel[progress]'",
                      stacklevel=3)
        return None
    return tqdm(total=n, unit="row", desc="gram")


def _advance(bar, rows):
    if bar is not None:
        bar.update(rows)


def _warn_if_degenerate(kind, value, chi=None):
    """Warn when a kernel cannot tell its inputs apart, and say why.

    ``chi`` is the network's correlation slope at ρ = 1 (:attr:`Program.chi`),
    or a function that returns it (called only if a sample looks degenerate):
    below 1 the layers pull all inputs together (ordered phase, ρ → 1), above 1
    they push every pair to one common correlation (chaotic phase).
    """
    sample = np.asarray(value[: min(64, value.shape[0])], dtype=np.float64)
    if sample.size < 2 or value.shape == (1, 1):
        return
    top = np.max(np.abs(sample))
    if top == 0:
        return
    if np.ptp(sample) <= 1e-13 * top:
        chi = _known(chi)
        if chi is not None and chi < 1:
            why = ("the ordered phase: every layer pulls the inputs' correlations towards 1 "
                   f"(χ = {_compared(chi, 1.0)} < 1), so all inputs end at the same point; "
                   "lower the depth or b_std, or raise w_std")
        else:
            why = ("the inputs look identical to the network, or it is so deep that its "
                   "correlations reach 1; lower the depth")
        warnings.warn(
            f"the {kind} kernel is degenerate: all its entries equal "
            f"{float(sample.flat[0]):.6g} to working precision, so it cannot tell inputs "
            f"apart ({why})",
            DegenerateKernelWarning, stacklevel=3,
        )
        return
    size = min(sample.shape)
    if size < 3:
        return
    square = sample[:size, :size]
    off = square[~np.eye(size, dtype=bool)]
    if np.ptp(off) > 1e-13 * top:
        return
    chi = _known(chi)
    if chi is not None and chi > 10:
        warnings.warn(
            f"the {kind} kernel is degenerate: every pair of distinct inputs has the same "
            f"entry {float(off[0]):.6g} to working precision, so it cannot tell inputs "
            f"apart (the chaotic phase: every layer pushes the correlations of nearby "
            f"inputs apart (χ = {_compared(chi, 1.0)} > 1), until all pairs share one "
            "correlation; lower the depth or w_std, or raise b_std)",
            DegenerateKernelWarning, stacklevel=3,
        )


def _known(chi):
    """χ (calling it if it is a function), or None where it is not known."""
    chi = chi() if callable(chi) else chi
    return chi if chi is not None and np.isfinite(chi) else None


def _compared(value, bound):
    """``value`` with the fewest significant digits (at least 3) that keep it on
    its side of ``bound``, so that a printed "χ = ... < 1" is true as printed."""
    for digits in range(3, 18):
        text = f"{value:.{digits}g}"
        if (float(text) < bound) == (value < bound) and float(text) != bound:
            return text
    return repr(value)
