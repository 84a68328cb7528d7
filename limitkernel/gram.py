"""Public Gram API: validation, diagonals, tiling, memory, dtype, symmetric case.

:func:`kernel` computes the infinite-width NNGP covariance and NTK between two
input sets in one GEMM (x·x'ᵀ, row block by row block, written straight into the
output) and one fused numba pass that carries every entry through all layers
(:mod:`limitkernel._kernels`). With ``x2=None`` only the upper triangle is
computed and then mirrored.
"""

import math
import os
import warnings

import numpy as np

from . import _kernels as K
from .activations import Activation, Numerical
from .spec import Dense, SpecError, as_spec

__all__ = ["KINDS", "Kernel", "MemoryBudgetError", "kernel", "kernel_diag"]

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
    kinds = (get,) if isinstance(get, str) else tuple(get)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"get must name 'nngp' and/or 'ntk', got {get!r}")
    return kinds


def _check_dtype(dtype):
    dt = np.dtype(dtype)
    if dt not in (np.float64, np.float32):
        raise ValueError(f"dtype must be float64 or float32, got {dt}")
    return dt


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


# ------------------------------------------------------------ the program


class _Program:
    """A spec lowered to opcodes and parameter rows for the fused pass.

    Parameter rows: dense (σ_w², σ_b², α, β) with Θ ← α K + β + σ_w² Θ;
    activations (p0, p1, p2) from ``Activation.code``; Hermite layers (index,
    number of terms).
    """

    def __init__(self, spec, n_features):
        self.layers = list(as_spec(spec))
        if not self.layers:
            raise SpecError("empty spec: give layers such as 'dense, relu, dense'")
        if not isinstance(self.layers[-1], Dense):
            raise SpecError(
                f"the network must end with a dense readout layer, but its last layer "
                f"is {self.layers[-1]}; append ', dense'"
            )
        ops = np.zeros(len(self.layers), dtype=np.int64)
        prm = np.zeros((len(self.layers), 4))
        fan_in = float(n_features)
        for index, layer in enumerate(self.layers):
            if isinstance(layer, Dense):
                w2, b2 = layer.w_std ** 2, layer.b_std ** 2
                if layer.parameterization == "ntk":
                    prm[index] = (w2, b2, w2, b2)
                else:
                    prm[index] = (w2, b2, fan_in, 1.0)
                    if layer.width is None and index != len(self.layers) - 1:
                        raise SpecError(
                            f"layer {index + 1} ({layer}): the standard parameterisation "
                            "needs the layer's width for the NTK of the next dense layer; "
                            "add width=..."
                        )
                fan_in = layer.width if layer.width is not None else fan_in
                ops[index] = K.OP_DENSE
            elif isinstance(layer, Activation):
                code = layer.code()
                ops[index] = code[0]
                prm[index, :3] = code[1:]
            else:
                raise SpecError(f"layer {index + 1} ({layer!r}) is not supported here")
        self.ops, self.prm = ops, prm

    def diagonals(self, x):
        """Square roots of the diagonals entering each layer; final K and Θ diagonals.

        Returns ``(roots, nngp, ntk)`` with ``roots`` of shape (L + 1, n).
        """
        q = np.einsum("ij,ij->i", x, x) / x.shape[1]
        roots = np.empty((len(self.layers) + 1, x.shape[0]))
        roots[0] = np.sqrt(q)
        theta = np.zeros_like(q)
        for index, layer in enumerate(self.layers):
            w2, b2, alpha, beta = self.prm[index]
            if isinstance(layer, Dense):
                theta = alpha * q + beta + w2 * theta
                q = w2 * q + b2
            else:
                q, kd = layer.diag(q)
                theta = theta * kd
            if not np.all(np.isfinite(q)) or not np.all(np.isfinite(theta)):
                raise FloatingPointError(
                    f"the kernel overflows at layer {index + 1} ({layer}): variances reach "
                    f"{float(np.max(q)):.3g}; lower w_std, b_std or the input scale"
                )
            roots[index + 1] = np.sqrt(q)
        return roots, q, theta

    def hermite_tables(self, roots):
        """Hermite coefficients of every numerical layer, for the given inputs.

        Returns a list with one ``(coef, dcoef)`` pair of (n, T) arrays per
        numerical layer and records the layer's table index and T in ``prm``.
        Row and column tables (two calls, for x1 and x2) must cut each series
        after the same T for the tail bound to hold, so every call raises T to
        the largest yet chosen on this program and recomputes, in place, the
        tables of earlier calls that are shorter.
        """
        calls = self.__dict__.setdefault("_hermite_calls", [])
        tables = []
        for index, layer in enumerate(self.layers):
            if isinstance(layer, Numerical):
                self.prm[index, 0] = len(tables)
                tables.append(layer.coefficients(roots[index] ** 2))
        calls.append((roots, tables))
        slot = 0
        for index, layer in enumerate(self.layers):
            if isinstance(layer, Numerical):
                terms = max(t[slot][0].shape[1] for _, t in calls)
                for past_roots, past in calls:
                    if past[slot][0].shape[1] < terms:
                        past[slot] = layer.coefficients(past_roots[index] ** 2, terms=terms)
                self.prm[index, 1] = terms
                slot += 1
        return tables


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
    memory_limit : int, optional
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
    kinds = _check_get(get)
    dt = _check_dtype(dtype)
    x1 = check_inputs(x1, "x1")
    sym = x2 is None
    x2 = x1 if sym else check_inputs(x2, "x2")
    if x2.shape[1] != x1.shape[1]:
        raise ValueError(
            f"x1 and x2 must have the same number of features, got {x1.shape[1]} "
            f"and {x2.shape[1]}"
        )
    program = _Program(spec, x1.shape[1])
    n, m = x1.shape[0], x2.shape[0]
    want_ntk = "ntk" in kinds
    _check_memory(n, m, x1.shape[1], dt, want_ntk, memory_limit)

    roots1, nngp_diag, ntk_diag = program.diagonals(x1)
    roots2 = roots1 if sym else program.diagonals(x2)[0]
    tables1 = program.hermite_tables(roots1)
    tables2 = tables1 if sym else program.hermite_tables(roots2)
    h1, hd1 = _stack_tables(tables1, n, transpose=False)
    h2, hd2 = _stack_tables(tables2, m, transpose=True)

    k_out = np.empty((n, m), dtype=dt)
    t_out = np.empty((n, m), dtype=dt) if want_ntk else np.empty((1, 1), dtype=dt)
    x1n = _normalise(x1)
    x2n = x1n if sym else _normalise(x2)

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
        c0 = r0 if sym else 0
        dest = buffer[:(r1 - r0) * (m - c0)].reshape(r1 - r0, m - c0)
        np.matmul(x1[r0:r1], x2[c0:].T, out=dest)
        K.gram_block(dest, k_out, t_out, r0, c0, sym, 1.0 / x1.shape[1], x1n, x2n,
                     roots1, roots2, program.ops, program.prm, h1, h2, hd1, hd2,
                     want_ntk)
    if sym:
        K.mirror_upper(k_out)
        np.fill_diagonal(k_out, nngp_diag)
        if want_ntk:
            K.mirror_upper(t_out)
            np.fill_diagonal(t_out, ntk_diag)
    out = {"nngp": k_out, "ntk": t_out}
    result = {kind: out[kind] for kind in kinds}
    for kind, value in result.items():
        _warn_if_degenerate(kind, value)
    return result


def kernel_diag(spec, x, get=KINDS):
    """The diagonals K(x, x) and Θ(x, x) only, in O(n·d) time."""
    kinds = _check_get(get)
    x = check_inputs(x, "x")
    _, nngp, ntk = _Program(spec, x.shape[1]).diagonals(x)
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


def _warn_if_degenerate(kind, value):
    sample = np.asarray(value[: min(64, value.shape[0])], dtype=np.float64)
    if sample.size < 2:
        return
    top = np.max(np.abs(sample))
    if top > 0 and np.ptp(sample) <= 1e-13 * top and value.shape != (1, 1):
        warnings.warn(
            f"the {kind} kernel is degenerate: all its entries equal {float(sample.flat[0]):.6g} "
            "to working precision, so it cannot tell inputs apart (typically a deep "
            "network in the ordered phase; lower the depth or b_std, or raise w_std)",
            DegenerateKernelWarning, stacklevel=3,
        )


class Kernel:
    """scikit-learn style kernel object: ``k(X, Y=None)`` and ``k.diag(X)``.

    Parameters
    ----------
    spec : str or Serial
        The architecture.
    kind : {"ntk", "nngp"}
        Which kernel the object evaluates.
    """

    def __init__(self, spec, kind="ntk"):
        self.spec = spec
        self.kind = kind

    def __call__(self, X, Y=None):
        return kernel(self.spec, X, Y, get=(self.kind,))[self.kind]

    def diag(self, X):
        return kernel_diag(self.spec, X, get=(self.kind,))[self.kind]

    def is_stationary(self):
        return False

    def __repr__(self):
        return f"Kernel({str(as_spec(self.spec))!r}, kind={self.kind!r})"
