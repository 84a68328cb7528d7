"""Public Gram API: validation, diagonals, tiling, memory, dtype, symmetric case.

:func:`kernel` computes the infinite-width NNGP covariance and NTK between two
input sets in one GEMM (x·x'ᵀ, row block by row block, written straight into the
output) and one fused numba pass that carries every entry through all layers
(:mod:`limitkernel._fused`). With ``x2=None`` only the upper triangle is
computed and then mirrored.
"""

import math
import numbers
import os
import warnings

import numpy as np

from . import _fused
from ._program import Program

__all__ = ["KINDS", "GramPlan", "MemoryBudgetError", "kernel", "kernel_diag",
           "prepare"]

KINDS = ("nngp", "ntk")

# Row blocks are sized so that one block of the GEMM holds about this many bytes.
_BLOCK_BYTES = 64 << 20


class MemoryBudgetError(MemoryError):
    """The requested matrices would not fit in the memory available."""


class DegenerateKernelWarning(RuntimeWarning):
    """All entries of a kernel are equal to working precision."""


# ------------------------------------------------------------ validation


def check_inputs(x, name="x"):
    """Return x as a C-contiguous float64 (n, d) array, or raise a clear ValueError."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a numeric (n, d) array: {err}") from None
    if arr.ndim != 2:
        hint = (" Reshape it with x.reshape(-1, 1) if it holds one feature per "
                "input, or x.reshape(1, -1) if it is a single input.") if arr.ndim == 1 else ""
        raise ValueError(
            f"{name} must be a 2D array of shape (n_inputs, n_features), got "
            f"{arr.ndim}D with shape {arr.shape}.{hint}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); give at least one input "
                         "with at least one feature")
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(
            f"{name} contains NaN or inf (first at row {bad[0]}, column {bad[1]}: "
            f"{arr[bad[0], bad[1]]}); remove or impute those values"
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
    terms = max([t[0].shape[1] for t in tables], default=1)
    shape = (max(len(tables), 1),) + ((terms, n) if transpose else (n, terms))
    out = (np.zeros(shape), np.zeros(shape))
    for index, pair in enumerate(tables):
        for dest, coef in zip(out, pair):
            width = coef.shape[1]
            if transpose:
                dest[index, :width] = coef.T
            else:
                dest[index, :, :width] = coef
    return out


# ------------------------------------------------------------ public API


class _Side:
    """What the fused pass needs of the rows (or the columns) of a Gram matrix.

    ``x`` the inputs, ``xn`` the inputs scaled to unit norm, ``roots`` (L + 1, n)
    the square roots of the diagonals entering each layer, ``h``, ``hd`` the
    Hermite tables of the numerical layers: (T, n, terms) for rows, (T, terms, n)
    for columns (``axis`` is the axis of ``h`` that runs over inputs).
    """

    def __init__(self, x, xn, roots, h, hd, axis):
        self.x, self.xn, self.roots, self.h, self.hd, self.axis = x, xn, roots, h, hd, axis

    def __len__(self):
        return self.x.shape[0]

    def part(self, a, b):
        """Inputs a .. b - 1, as C-contiguous copies (one compiled layout)."""
        if a == 0 and b == len(self):
            return self
        cut = (slice(None),) * self.axis + (slice(a, b),)
        return _Side(self.x[a:b], self.xn[a:b], np.ascontiguousarray(self.roots[:, a:b]),
                     np.ascontiguousarray(self.h[cut]), np.ascontiguousarray(self.hd[cut]),
                     self.axis)


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
    nngp_diag, ntk_diag : (n1,) arrays
        K(x, x) and Θ(x, x) of the row inputs.
    """

    def __init__(self, spec, x1, x2, kinds, dtype):
        program = Program(spec, x1.shape[1])
        self.kinds, self.dtype = kinds, dtype
        self.symmetric = x2 is None
        self.want_ntk = "ntk" in kinds
        self.n_features = x1.shape[1]
        self.scale = 1.0 / x1.shape[1]
        roots1, self.nngp_diag, self.ntk_diag = program.diagonals(x1)
        roots2 = roots1 if self.symmetric else program.diagonals(x2)[0]
        tables1 = program.hermite_tables(roots1)
        tables2 = tables1 if self.symmetric else program.hermite_tables(roots2)
        x1n = _normalise(x1)
        x2n = x1n if self.symmetric else _normalise(x2)
        self.rows = _Side(x1, x1n, roots1, *_stack_tables(tables1, len(x1), False), 1)
        x2 = x1 if self.symmetric else x2
        self.cols = _Side(x2, x2n, roots2, *_stack_tables(tables2, len(x2), True), 2)
        self.codes, self.prm = program.codes, program.prm
        self.chi = program.chi
        self.shape = (len(x1), len(x2))

    def block(self, rows, cols, r0, r1, c0, c1, buffer, k_out, t_out, sym):
        """Rows r0:r1, columns c0:c1 of ``rows`` × ``cols`` into the outputs.

        Indices are relative to the two sides (:meth:`_Side.part`) and the
        outputs are indexed the same way; ``buffer`` is float64 scratch with at
        least (r1 - r0)(c1 - c0) entries. With ``sym`` only entries with
        column >= row are written.
        """
        dest = buffer[:(r1 - r0) * (c1 - c0)].reshape(r1 - r0, c1 - c0)
        np.matmul(rows.x[r0:r1], cols.x[c0:c1].T, out=dest)
        status = np.full(1, -1, dtype=np.int64)
        _fused.gram_block(dest, k_out, t_out, r0, c0, sym, self.scale, rows.xn, cols.xn,
                          rows.roots, cols.roots, self.codes, self.prm, rows.h, cols.h,
                          rows.hd, cols.hd, status, self.want_ntk)
        if status[0] >= 0:
            raise RuntimeError(f"the fused pass has no kernel for opcode {status[0]}; "
                               "every op kind must be dispatched in limitkernel._fused")

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
        k_out = np.empty((nr, nc), dtype=self.dtype)
        t_out = np.empty((nr, nc) if self.want_ntk else (1, 1), dtype=self.dtype)
        self.block(self.rows.part(r0, r1), self.cols.part(c0, c1), 0, nr, 0, nc,
                   np.empty(nr * nc), k_out, t_out, on_diag)
        outs = {"nngp": (k_out, self.nngp_diag), "ntk": (t_out, self.ntk_diag)}
        result = {}
        for kind in self.kinds:
            out, diag = outs[kind]
            if on_diag:
                _fused.mirror_upper(out)
            if self.symmetric:
                lo, hi = max(r0, c0), min(r1, c1)
                idx = np.arange(lo, hi)
                out[idx - r0, idx - c0] = diag[lo:hi]
            result[kind] = out
        return result


def prepare(spec, x1, x2=None, get=KINDS, dtype="float64"):
    """Validate inputs and build the :class:`GramPlan` that computes any tile.

    Parameters are those of :func:`kernel`. The work is O((n1 + n2)·d): the
    diagonals of every layer, unit-norm copies of the inputs and, for numerical
    activations, their Hermite tables.
    """
    kinds = _check_get(get)
    dt = _check_dtype(dtype)
    x1 = check_inputs(x1, "x1")
    if x2 is not None:
        x2 = check_inputs(x2, "x2")
        if x2.shape[1] != x1.shape[1]:
            raise ValueError(
                f"x1 and x2 must have the same number of features, got {x1.shape[1]} "
                f"and {x2.shape[1]}"
            )
    return GramPlan(spec, x1, x2, kinds, dt)


def kernel(spec, x1, x2=None, get=KINDS, dtype="float64", memory_limit=None,
           progress=False):
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
        only its own rounding (relative error ≤ 6e-8).
    memory_limit : int or float, optional
        Bytes the outputs may use; defaults to the memory available now.
    progress : bool
        Show a progress bar (needs tqdm).

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
    plan = prepare(spec, x1, x2, get, dtype)
    sym, dt = plan.symmetric, plan.dtype
    n, m = plan.shape
    _check_memory(n, m, plan.n_features, dt, plan.want_ntk, memory_limit)

    k_out = np.empty((n, m), dtype=dt)
    t_out = np.empty((n, m), dtype=dt) if plan.want_ntk else np.empty((1, 1), dtype=dt)
    rows = _block_rows(n, m)
    # The GEMM of each row block lands in one C-contiguous scratch buffer, so the
    # numba pass always sees the same array layout (one compiled specialisation)
    # and float32 output needs no second buffer.
    buffer = np.empty(rows * m)
    blocks = range(0, n, rows)
    if progress:
        blocks = _progress(blocks, n, rows)
    for r0 in blocks:
        r1 = min(r0 + rows, n)
        plan.block(plan.rows, plan.cols, r0, r1, r0 if sym else 0, m, buffer,
                   k_out, t_out, sym)
    if sym:
        _fused.mirror_upper(k_out)
        np.fill_diagonal(k_out, plan.nngp_diag)
        if plan.want_ntk:
            _fused.mirror_upper(t_out)
            np.fill_diagonal(t_out, plan.ntk_diag)
    out = {"nngp": k_out, "ntk": t_out}
    result = {kind: out[kind] for kind in plan.kinds}
    for kind, value in result.items():
        _warn_if_degenerate(kind, value, plan.chi)
    return result


def kernel_diag(spec, x, get=KINDS):
    """The diagonals K(x, x) and Θ(x, x) only, in O(n·d) time."""
    kinds = _check_get(get)
    x = check_inputs(x, "x")
    _, nngp, ntk = Program(spec, x.shape[1]).diagonals(x)
    out = {"nngp": nngp, "ntk": ntk}
    return {kind: out[kind] for kind in kinds}


def _normalise(x):
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    return x / np.where(norms > 0, norms, 1.0)[:, None]


def _block_rows(n, m):
    """Rows per GEMM block: about _BLOCK_BYTES of float64, at least 16."""
    return max(1, min(n, max(16, _BLOCK_BYTES // (8 * m))))


def _check_memory(n, m, d, dt, want_ntk, memory_limit):
    count = 2 if want_ntk else 1
    need = count * n * m * dt.itemsize + 2 * (n + m) * d * 8 + 8 * _block_rows(n, m) * m
    limit = memory_limit if memory_limit is not None else available_memory()
    if limit is not None and need > limit:
        raise MemoryBudgetError(
            f"the requested {'nngp and ntk' if want_ntk else 'kernel'} for {n} x {m} "
            f"inputs need {_format_bytes(need)} but only {_format_bytes(limit)} is "
            "available; ask for one kernel (get='ntk'), use dtype='float32', or "
            "compute it in row blocks of x1"
        )


def _progress(blocks, n, rows):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        warnings.warn("progress=True needs tqdm: pip install 'limitkernel[progress]'",
                      stacklevel=3)
        return blocks
    return tqdm(blocks, total=math.ceil(n / rows), unit="block", desc="gram")


def _warn_if_degenerate(kind, value, chi=None):
    """Warn when a kernel cannot tell its inputs apart, and say why.

    ``chi`` is the network's correlation slope at ρ = 1 (:attr:`Program.chi`):
    below 1 the layers pull all inputs together (ordered phase, ρ → 1), above 1
    they push every pair to one common correlation (chaotic phase).
    """
    sample = np.asarray(value[: min(64, value.shape[0])], dtype=np.float64)
    if sample.size < 2 or value.shape == (1, 1):
        return
    top = np.max(np.abs(sample))
    if top == 0:
        return
    known = chi is not None and np.isfinite(chi)
    if np.ptp(sample) <= 1e-13 * top:
        if known and chi < 1:
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
    if not known or chi <= 10 or size < 3:
        return
    square = sample[:size, :size]
    off = square[~np.eye(size, dtype=bool)]
    if np.ptp(off) <= 1e-13 * top:
        warnings.warn(
            f"the {kind} kernel is degenerate: every pair of distinct inputs has the same "
            f"entry {float(off[0]):.6g} to working precision, so it cannot tell inputs "
            f"apart (the chaotic phase: every layer pushes the correlations of nearby "
            f"inputs apart (χ = {_compared(chi, 1.0)} > 1), until all pairs share one "
            "correlation; lower the depth or w_std, or raise b_std)",
            DegenerateKernelWarning, stacklevel=3,
        )


def _compared(value, bound):
    """``value`` with the fewest significant digits (at least 3) that keep it on
    its side of ``bound``, so that a printed "χ = ... < 1" is true as printed."""
    for digits in range(3, 18):
        text = f"{value:.{digits}g}"
        if (float(text) < bound) == (value < bound) and float(text) != bound:
            return text
    return repr(value)
