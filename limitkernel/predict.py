"""Prediction without training: gradient-flow ensembles, NNGP posterior, diagnostics.

An infinitely wide network trained by gradient flow on the MSE loss evolves as its
linearisation (Lee et al. 2019, "Wide neural networks of any depth evolve as linear
models under gradient descent"), so over random initialisations its outputs on test
inputs are Gaussian with a mean and covariance that depend only on the NNGP kernel K
and the NTK Θ. This module computes them for any set of times (one
eigendecomposition of the training kernel serves them all; t = ∞ needs only a
Cholesky factorisation), the NNGP posterior, the cross-entropy flow of function
space, a positive-definiteness report, and scikit-learn estimators on top.

Conventions follow Neural Tangents (``predict.gradient_descent_mse_ensemble``): the
loss is ½ · mean over the N·c training targets, so time enters as
s = η t / (N c); ``diag_reg`` is relative to the mean diagonal of the training
kernel unless ``diag_reg_absolute=True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import scipy.linalg

from .gram import KINDS, _check_get, _identical_rows, check_inputs, kernel, kernel_diag
from .layers import Dropout
from .spec import Block, as_spec

__all__ = [
    "CrossEntropyFlow",
    "GradientFlowEnsemble",
    "KernelReport",
    "NNGPRegressor",  # noqa: F822 (built on first access by __getattr__)
    "NTKClassifier",  # noqa: F822 (built on first access by __getattr__)
    "NTKRegressor",  # noqa: F822 (built on first access by __getattr__)
    "NotPositiveDefiniteError",
    "Prediction",
    "check_kernel",
    "cross_entropy_flow",
    "nngp_posterior",
    "predict_ensemble",
]

_EPS = np.finfo(np.float64).eps
# Near-duplicate pairs are those whose 2x2 block alone is within this factor of the
# rank tolerance; reports list at most _MAX_PAIRS of them, worst first.
_PAIR_FACTOR = 100.0
_MAX_PAIRS = 10
COV_CHOICES = ("full", "var", None)


# ------------------------------------------------------------ diagnostics


class NotPositiveDefiniteError(np.linalg.LinAlgError):
    """A training kernel is not numerically positive definite.

    The message names the cause (duplicate inputs, a degenerate kernel, low rank)
    and the fix; the full :class:`KernelReport` is in ``.report``.
    """

    def __init__(self, message, report):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class KernelReport:
    """Positive definiteness and conditioning of a kernel on a set of inputs.

    Attributes
    ----------
    kind : str
        "ntk", "nngp" or "kernel" (a matrix given directly).
    n : int
        Number of inputs.
    smallest, largest : float
        Extreme eigenvalues of the (regularised) kernel matrix.
    rank : int
        Numerical rank: eigenvalues above ``tol``.
    tol : float
        Rank tolerance ``n · ε · max |λ|`` (the convention of
        ``numpy.linalg.matrix_rank``).
    diag_reg : float
        Absolute amount added to the diagonal before the check.
    mean_diagonal : float
        Mean diagonal of the kernel without regularisation (the scale of a relative
        ``diag_reg``).
    pairs : tuple of (int, int, float, bool)
        Near-duplicate pairs ``(i, j, λ₂, identical)``, worst first (at most 10):
        λ₂ is the smallest eigenvalue of the pair's 2×2 block, which bounds the
        smallest eigenvalue of the whole matrix; ``identical`` says whether the two
        inputs are equal (``False``: different inputs the kernel cannot tell apart,
        or inputs not given).
    n_pairs : int
        Number of near-duplicate pairs in all.
    duplicates : tuple of (int, int)
        Every pair ``(i, j)``, i < j, of exactly identical inputs (equal in every
        feature), found from the inputs themselves (a hash of each row, a sort of
        the hashes, every candidate confirmed); i is the first occurrence. Empty
        when the inputs were not given.
    conflicts : tuple of (int, int)
        The pairs of ``duplicates`` whose targets differ (when targets were given):
        no function fits both.
    duplicate_spread : float
        Largest |smallest eigenvalue| of the 2×2 blocks of the identical pairs,
        without regulariser (0 when ``duplicates_singular`` is false). It is zero
        for an exactly evaluated kernel, whose rows at identical inputs are equal;
        anything else is the kernel's own error.
    duplicates_singular : bool
        Whether identical inputs make the kernel singular: true unless the network
        has dropout, whose kernel treats identical inputs as distinct examples
        (independent masks) and is larger on the diagonal.

    Notes
    -----
    Identical inputs give the kernel two equal rows, so it is singular however its
    computed eigenvalues come out: without a regulariser (``diag_reg == 0``) the
    report is not positive definite, its condition number is infinite and its rank
    at most n minus the number of repeated inputs. Any ``diag_reg > 0`` makes the
    exact kernel positive definite, and the eigenvalues decide, as for any other
    singular kernel.
    """

    kind: str
    n: int
    smallest: float
    largest: float
    rank: int
    tol: float
    diag_reg: float
    mean_diagonal: float
    pairs: tuple
    n_pairs: int
    duplicates: tuple = ()
    conflicts: tuple = ()
    duplicate_spread: float = 0.0
    duplicates_singular: bool = True

    @property
    def singular_duplicates(self):
        """Whether identical inputs make this (unregularised) kernel singular."""
        return bool(self.duplicates) and self.duplicates_singular and self.diag_reg == 0

    @property
    def positive_definite(self):
        """Whether every eigenvalue exceeds the rank tolerance and no two inputs are
        identical (without a regulariser)."""
        return bool(self.smallest > self.tol) and not self.singular_duplicates

    @property
    def condition(self):
        """Condition number λ_max / λ_min (inf when λ_min ≤ 0 or identical inputs
        make the kernel singular)."""
        if self.smallest <= 0 or self.singular_duplicates:
            return math.inf
        return self.largest / self.smallest

    @property
    def suggested_diag_reg(self):
        """A relative ``diag_reg`` (power of ten) that makes the kernel well posed."""
        if self.mean_diagonal <= 0:
            return math.nan
        shift = (_PAIR_FACTOR * max(self.tol, _EPS * self.mean_diagonal,
                                    self.duplicate_spread)
                 + max(-self.smallest, 0))
        relative = shift / self.mean_diagonal + self.diag_reg / self.mean_diagonal
        return 10.0 ** math.ceil(math.log10(relative))

    @classmethod
    def from_matrix(cls, matrix, x=None, diag_reg=0.0, diag_reg_absolute=False,
                    kind="kernel", y=None, duplicates_singular=True):
        """Report on a symmetric kernel matrix (one symmetric eigendecomposition).

        Parameters
        ----------
        matrix : (n, n) array_like
            The kernel on n inputs.
        x : (n, d) array_like, optional
            The inputs: identical ones are found from them (and make the kernel
            singular), and near-duplicate pairs are told apart into identical
            inputs and ones the kernel cannot distinguish.
        diag_reg : float
            Regulariser added to the diagonal first, relative to the mean diagonal
            unless ``diag_reg_absolute``.
        diag_reg_absolute : bool
            Take ``diag_reg`` in absolute units.
        kind : str
            Name of the kernel in the report.
        y : (n,) or (n, c) array_like, optional
            Targets, to name identical inputs with different targets.
        duplicates_singular : bool
            Whether identical inputs make the kernel singular (false for a network
            with dropout).
        """
        matrix = np.asarray(matrix, dtype=np.float64)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"expected a square kernel matrix, got shape {matrix.shape}")
        if x is not None:
            x = check_inputs(x, "x", spatial=True)
            if x.shape[0] != matrix.shape[0]:
                raise ValueError(f"x has {x.shape[0]} inputs but the kernel matrix is "
                                 f"{matrix.shape[0]} x {matrix.shape[0]}")
        return _matrix_report(kind, matrix, diag_reg, diag_reg_absolute, x,
                              _Duplicates.of(x, y, duplicates_singular))

    def summary(self, knob="diag_reg"):
        """One line: what was found and, on failure, why and what to do.

        ``knob`` names the regulariser in the advice: "diag_reg" (relative) or
        "noise" (absolute, as in :func:`nngp_posterior`).
        """
        head = (f"the {self.kind.upper() if self.kind != 'kernel' else 'kernel'} "
                f"of {self.n} inputs")
        numbers = (f"smallest eigenvalue {self.smallest:.3g}, largest {self.largest:.3g}, "
                   f"numerical rank {self.rank} of {self.n}")
        if self.positive_definite:
            return (f"{head} is positive definite ({numbers}, condition number "
                    f"{self.condition:.3g})")
        return (f"{head} is not positive definite ({numbers}): {self.cause()}; "
                f"{self.fix(knob)}")

    def cause(self):
        """Why the kernel is singular, in words (empty when it is not)."""
        if self.positive_definite:
            return ""
        if self.largest <= 0:
            return ("the kernel is zero on these inputs (all-zero inputs and no bias: "
                    "b_std = 0)")
        if self._degenerate():
            total = self.n * (self.n - 1) // 2
            return (f"the kernel is degenerate: {self.n_pairs} of {total} pairs of inputs "
                    "are indistinguishable to it (a deep network in the ordered phase: "
                    "lower the depth or b_std, or raise w_std)")
        if self.singular_duplicates:
            count, n_conflicts = len(self.duplicates), len(self.conflicts)
            more = f" ({count} pairs of identical inputs in all" if count > 1 else ""
            if n_conflicts:
                i, j = self.conflicts[0]
                if more:
                    more += f", {n_conflicts} of them with different targets)"
                return (f"inputs {i} and {j} are identical but have different targets, "
                        f"which no function fits{more}")
            i, j = self.duplicates[0]
            more += ")" if more else ""
            return f"inputs {i} and {j} are identical{more}, so the kernel has equal rows"
        if self.pairs:
            i, j, _, identical = self.pairs[0]
            what = "identical" if identical else "indistinguishable to the kernel"
            more = (f" ({self.n_pairs} such pairs in all)" if self.n_pairs > 1 else "")
            return f"inputs {i} and {j} are {what}{more}"
        return (f"no pair of inputs explains it: the kernel has rank {self.rank} on "
                f"{self.n} inputs (e.g. linear activations with more inputs than features)")

    def fix(self, knob="diag_reg"):
        """The knob to turn: "diag_reg" (relative) or "noise" (absolute)."""
        suggestion = self.suggested_diag_reg
        if not math.isfinite(suggestion):
            return ("use a network with b_std > 0, or an absolute regulariser "
                    "(diag_reg_absolute=True)")
        if knob == "noise":
            advice = f"give observation noise noise={suggestion * self.mean_diagonal:.1e} or more"
        else:
            advice = (f"regularise with diag_reg={suggestion:.0e} or more (relative to the "
                      f"mean diagonal {self.mean_diagonal:.3g})")
        if self.singular_duplicates and not self._degenerate():
            return ("remove the repeated inputs (averaging the targets of identical "
                    f"inputs), or {advice}")
        if self._degenerate() or not self.pairs:
            return advice
        return f"remove the duplicate inputs or {advice}"

    def _degenerate(self):
        total = self.n * (self.n - 1) // 2
        return self.n > 2 and self.n_pairs >= total // 2

    def __str__(self):
        status = "positive definite" if self.positive_definite else "NOT positive definite"
        name = self.kind.upper() if self.kind != "kernel" else "kernel"
        lines = [
            f"{name} on {self.n} inputs: {status}",
            f"  smallest eigenvalue  {self.smallest:.6e}",
            f"  largest eigenvalue   {self.largest:.6e}",
            f"  condition number     {self.condition:.3e}",
            f"  numerical rank       {self.rank} of {self.n} (tolerance {self.tol:.3e})",
            f"  diag_reg added       {self.diag_reg:.3e} (mean diagonal {self.mean_diagonal:.6g})",
        ]
        if self.duplicates:
            shown = ", ".join(f"({i}, {j})" for i, j in self.duplicates[:_MAX_PAIRS])
            more = ", ..." if len(self.duplicates) > _MAX_PAIRS else ""
            lines.append(f"  identical inputs     {len(self.duplicates)} pairs: {shown}{more}")
            if self.duplicates_singular:
                lines.append(f"    kernel spread at them {self.duplicate_spread:.3e} (zero "
                             "for an exact kernel)")
            else:
                lines.append("    with dropout they are distinct examples (independent "
                             "masks)")
            if self.conflicts:
                shown = ", ".join(f"({i}, {j})" for i, j in self.conflicts[:_MAX_PAIRS])
                more = ", ..." if len(self.conflicts) > _MAX_PAIRS else ""
                lines.append(f"    with different targets {len(self.conflicts)}: "
                             f"{shown}{more}")
        if self.n_pairs:
            lines.append(f"  near-duplicate pairs {self.n_pairs} (i, j: smallest eigenvalue "
                         "of the 2x2 block)")
            for i, j, small, identical in self.pairs:
                lines.append(f"    {i:>6d} {j:>6d}: {small:.3e}"
                             f"{'  identical inputs' if identical else ''}")
        if not self.positive_definite:
            lines.append(f"  cause: {self.cause()}")
            lines.append(f"  fix:   {self.fix()}")
        return "\n".join(lines)


def check_kernel(spec, x, get=KINDS, diag_reg=0.0, diag_reg_absolute=False):
    """Is the kernel of a network positive definite on inputs x, and how well conditioned?

    Parameters
    ----------
    spec : str or Serial
        The architecture.
    x : (n, d) array_like
        Inputs (typically the training inputs).
    get : {"nngp", "ntk"} or tuple of them
        Which kernels to check.
    diag_reg : float
        Regulariser to include, as in :func:`predict_ensemble`.
    diag_reg_absolute : bool
        Whether ``diag_reg`` is absolute rather than relative to the mean diagonal.

    Returns
    -------
    dict
        ``{kind: KernelReport}``; ``str(report)`` prints it.

    Notes
    -----
    Identical inputs are found from x (one hash of each row, then a sort) and,
    without a regulariser, make the report not positive definite whatever the
    computed eigenvalues: the exact kernel has equal rows there, while its computed
    value may differ from its diagonal by rounding or quadrature error. A network
    with dropout is the exception (independent masks make them distinct examples).
    """
    kinds = _check_get(get)
    spec = as_spec(spec)
    x = check_inputs(x, "x", spatial=True)
    mats = kernel(spec, x, get=kinds)
    duplicates = _Duplicates.of(x, None, not _has_dropout(spec))
    return {kind: _matrix_report(kind, mats[kind], diag_reg, diag_reg_absolute, x,
                                 duplicates)
            for kind in kinds}


def _check_diag_reg(diag_reg):
    diag_reg = float(diag_reg)
    if not math.isfinite(diag_reg) or diag_reg < 0:
        raise ValueError(f"diag_reg must be a finite number >= 0, got {diag_reg!r}")
    return diag_reg


def _regularise(matrix, diag_reg, absolute):
    """A copy of matrix with diag_reg on its diagonal; the amount added; mean diagonal."""
    diag_reg = _check_diag_reg(diag_reg)
    n = matrix.shape[0]
    mean_diag = float(np.trace(matrix)) / n
    added = diag_reg if absolute else diag_reg * mean_diag
    out = np.array(matrix, dtype=np.float64, order="C", copy=True)
    out.flat[:: n + 1] += added
    return out, added, mean_diag


class _Duplicates(NamedTuple):
    """Identical inputs (pairs (i, j), an (k, 2) array), those with different targets,
    and whether they make the kernel singular."""

    pairs: np.ndarray
    conflicts: np.ndarray
    singular: bool

    @classmethod
    def of(cls, x, y=None, singular=True):
        pairs = (np.empty((0, 2), dtype=np.int64) if x is None
                 else _identical_rows(np.asarray(x, dtype=np.float64).reshape(len(x), -1)))
        conflicts = pairs[:0]
        if y is not None and pairs.size:
            y = np.asarray(y)
            y = y.reshape(y.shape[0], -1)
            differ = np.any(y[pairs[:, 0]] != y[pairs[:, 1]], axis=1)
            conflicts = pairs[differ]
        return cls(pairs, conflicts, bool(singular))


def _has_dropout(spec):
    """Whether any layer of spec (blocks included) is dropout with p > 0."""
    for layer in as_spec(spec):
        if isinstance(layer, Dropout) and layer.p > 0:
            return True
        if isinstance(layer, Block) and any(_has_dropout(b) for b in layer.branches):
            return True
    return False


def _block_smallest(diag_a, diag_c, off):
    """Smallest eigenvalue of the 2x2 blocks [[a, b], [b, c]], computed stably."""
    big = 0.5 * (diag_a + diag_c) + np.hypot(0.5 * (diag_a - diag_c), off)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(big > 0, (diag_a * diag_c - off * off) / big, 0.0)


def _matrix_report(kind, matrix, diag_reg, absolute, x, duplicates):
    """:class:`KernelReport` of matrix plus diag_reg: one symmetric eigendecomposition."""
    reg_matrix, added, mean_diag = _regularise(matrix, diag_reg, absolute)
    evals = scipy.linalg.eigh(reg_matrix, eigvals_only=True, driver="evd",
                              check_finite=False)
    return _report(kind, evals, reg_matrix, added, mean_diag, x, duplicates)


def _report(kind, evals, reg_matrix, added, mean_diag, x=None, duplicates=None):
    n = reg_matrix.shape[0]
    largest = float(evals[-1])
    tol = n * _EPS * float(np.max(np.abs(evals)))
    threshold = _PAIR_FACTOR * tol
    n_pairs, pairs = _near_duplicates(reg_matrix, threshold, x)
    rank = int(np.count_nonzero(evals > tol))
    if duplicates is None:
        duplicates = _Duplicates.of(None)
    dup = duplicates.pairs
    spread = 0.0
    if dup.size:
        i, j = dup[:, 0], dup[:, 1]
        blocks = _block_smallest(reg_matrix[i, i] - added, reg_matrix[j, j] - added,
                                 reg_matrix[i, j])
        spread = float(np.max(np.abs(blocks))) if duplicates.singular else 0.0
        if duplicates.singular and added == 0:
            rank = min(rank, n - len(dup))  # each repeated row once
    return KernelReport(kind=kind, n=n, smallest=float(evals[0]), largest=largest,
                        rank=rank, tol=tol, diag_reg=added, mean_diagonal=mean_diag,
                        pairs=pairs, n_pairs=n_pairs,
                        duplicates=tuple((int(a), int(b)) for a, b in dup),
                        conflicts=tuple((int(a), int(b)) for a, b in duplicates.conflicts),
                        duplicate_spread=spread, duplicates_singular=duplicates.singular)


def _near_duplicates(matrix, threshold, x=None, limit=_MAX_PAIRS):
    """Pairs (i < j) whose 2x2 principal block has smallest eigenvalue ≤ threshold.

    By eigenvalue interlacing each such pair alone bounds the smallest eigenvalue of
    the matrix by its own. O(n²) time in row blocks of about 8 MB.
    """
    n = matrix.shape[0]
    diag = np.diag(matrix).copy()
    cols = np.arange(n)
    rows = max(1, min(n, (1 << 20) // max(n, 1)))
    count = 0
    best_val = np.empty(0)
    best_ij = np.empty((0, 2), dtype=np.int64)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        small = _block_smallest(diag[r0:r1, None], diag[None, :], matrix[r0:r1])
        mask = (cols[None, :] > np.arange(r0, r1)[:, None]) & (small <= threshold)
        ii, jj = np.nonzero(mask)
        if ii.size == 0:
            continue
        count += ii.size
        vals = small[ii, jj]
        best_val = np.concatenate([best_val, vals])
        best_ij = np.concatenate([best_ij, np.stack([ii + r0, jj], axis=1)])
        if best_val.size > limit:
            keep = np.argsort(best_val, kind="stable")[:limit]
            best_val, best_ij = best_val[keep], best_ij[keep]
    order = np.argsort(best_val, kind="stable")
    xs = None if x is None else np.asarray(x)
    pairs = []
    for k in order:
        i, j = (int(v) for v in best_ij[k])
        identical = bool(xs is not None and np.array_equal(xs[i], xs[j]))
        pairs.append((i, j, float(best_val[k]), identical))
    return count, tuple(pairs)


# ------------------------------------------------------------ gradient-flow ensemble


class Prediction(NamedTuple):
    """Gaussian prediction on test inputs.

    ``mean`` has shape (T, M) or (T, M, c) following the targets, ``cov`` (T, M, M)
    and ``var`` (T, M) — the same for every output column — with the leading time
    axis dropped when ``t`` was a scalar. ``cov`` or ``var`` is ``None`` when not
    requested; ``t`` holds the times.
    """

    mean: np.ndarray
    cov: np.ndarray | None
    var: np.ndarray | None
    t: np.ndarray


def _check_times(t):
    """Times as a flat float array (None means ∞) and whether t was a scalar."""
    if t is None:
        t = np.inf
    try:
        arr = np.asarray(t, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"t must be a number, a list of numbers or inf, got {t!r}") from None
    flat = arr.reshape(-1)
    if flat.size == 0:
        raise ValueError("t is empty; give at least one time (inf for convergence)")
    if np.any(np.isnan(flat)) or np.any(flat < 0):
        raise ValueError(f"times must be >= 0 (or inf), got {flat.tolist()}")
    return flat, arr.ndim == 0


def _check_cov(cov):
    if cov not in COV_CHOICES:
        raise ValueError(f"cov must be 'full', 'var' or None, got {cov!r}")
    return cov


def _check_targets(y, n):
    try:
        arr = np.asarray(y, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"y_train must be a numeric (n,) or (n, c) array: {err}") from None
    if arr.ndim not in (1, 2) or arr.shape[0] != n:
        raise ValueError(f"y_train must have shape ({n},) or ({n}, c) to match the {n} "
                         f"training inputs, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("y_train has no columns")
    if not np.all(np.isfinite(arr)):
        raise ValueError("y_train contains NaN or inf; remove or impute those values")
    return arr


def _check_positive(value, name):
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


class GradientFlowEnsemble:
    """Infinite ensemble of infinitely wide networks trained by gradient flow on MSE.

    The training kernels and their factorisations are computed on first use and
    kept, so predictions at many times or on many test sets cost one
    eigendecomposition (finite t) or one Cholesky factorisation (t = ∞) in all.

    Parameters
    ----------
    spec : str or Serial
        The architecture; it must end with a dense readout.
    x_train : (N, d) array_like
        Training inputs.
    y_train : (N,) or (N, c) array_like
        Training targets.
    learning_rate : float
        η. Only the product η t matters.
    diag_reg : float
        Added to the diagonal of the training kernel before it is factorised:
        relative to its mean diagonal (Neural Tangents' default), or absolute.
    diag_reg_absolute : bool
        Take ``diag_reg`` in absolute units.

    Notes
    -----
    With the loss ½·mean over the N·c targets, the linearised outputs on the
    training set follow f_t(X) − Y = e^{−sΘ}(f_0(X) − Y) with s = η t / (N c), and
    on test inputs f_t(x*) = f_0(x*) − Θ*X A_s (f_0(X) − Y) with
    A_s = Θ⁻¹(I − e^{−sΘ}). Since f_0 ~ GP(0, K) (Lee et al. 2019):

    .. math::

        \\mu_t = \\Theta_{*X} A_s Y, \\qquad
        \\Sigma_t = K_{**} + \\Theta_{*X} A_s K A_s \\Theta_{X*}
                  - \\Theta_{*X} A_s K_{X*} - K_{*X} A_s \\Theta_{X*}.

    At s = 0 this is the prior (0, K**); at s = ∞, A = Θ⁻¹. Training only the
    readout replaces Θ by K, and the covariance simplifies to
    K** − K*X K⁻¹(I − e^{−2sK}) KX*, the NNGP posterior at s = ∞. With
    ``diag_reg`` the factorised kernel (Θ or K) is regularised and the K between
    the two A's is not, as in Neural Tangents.
    """

    def __init__(self, spec, x_train, y_train, learning_rate=1.0, diag_reg=0.0,
                 diag_reg_absolute=False):
        self.spec = as_spec(spec)
        self.x_train = check_inputs(x_train, "x_train", spatial=True)
        self.y_train = _check_targets(y_train, self.x_train.shape[0])
        self.learning_rate = _check_positive(learning_rate, "learning_rate")
        self.diag_reg = _check_diag_reg(diag_reg)
        self.diag_reg_absolute = bool(diag_reg_absolute)
        self._knob = "diag_reg"
        self._train = {}
        self._factors = {}
        self._duplicates = _Duplicates.of(self.x_train, self.y_train,
                                          not _has_dropout(self.spec))

    @property
    def n_train(self):
        return self.x_train.shape[0]

    @property
    def n_outputs(self):
        return 1 if self.y_train.ndim == 1 else self.y_train.shape[1]

    def time_scale(self):
        """s / t = η / (N c): multiply a time by this to get the exponent's scale."""
        return self.learning_rate / (self.n_train * self.n_outputs)

    def train_kernel(self, kind):
        """The training kernel ``kind`` (N × N), computed once."""
        self._compute_train((kind,))
        return self._train[kind]

    def _compute_train(self, kinds):
        missing = tuple(k for k in KINDS if k in kinds and k not in self._train)
        if missing:
            self._train.update(kernel(self.spec, self.x_train, get=missing))

    def report(self, kind="ntk"):
        """:class:`KernelReport` of the regularised training kernel ``kind``."""
        return _matrix_report(kind, self.train_kernel(kind), self.diag_reg,
                              self.diag_reg_absolute, self.x_train, self._duplicates)

    def _failure(self, kind, report=None):
        if report is None:
            report = self.report(kind)
        return NotPositiveDefiniteError(report.summary(self._knob), report)

    def factorise(self, kind, finite):
        """Factorise the regularised training kernel, once per kind and method.

        ``finite=True``: the eigendecomposition used for finite times (and any
        time); ``finite=False``: the Cholesky factorisation used for t = ∞. Raises
        :class:`NotPositiveDefiniteError` when the kernel is numerically singular,
        and, without a regulariser, when two training inputs are identical.
        """
        key = (kind, "eigh" if finite else "cholesky")
        if key in self._factors:
            return self._factors[key]
        matrix, added, _ = _regularise(self.train_kernel(kind), self.diag_reg,
                                       self.diag_reg_absolute)
        if added == 0 and self._duplicates.singular and self._duplicates.pairs.size:
            raise self._failure(kind)
        n = matrix.shape[0]
        if finite:
            evals, evecs = scipy.linalg.eigh(matrix, driver="evd", overwrite_a=True,
                                             check_finite=False)
            tol = n * _EPS * float(np.max(np.abs(evals)))
            if not evals[0] > tol:
                matrix, added, mean_diag = _regularise(
                    self.train_kernel(kind), self.diag_reg, self.diag_reg_absolute)
                raise self._failure(kind, _report(kind, evals, matrix, added, mean_diag,
                                                  self.x_train, self._duplicates))
            factor = (evals, evecs)
        else:
            tol = n * _EPS * float(np.max(np.diag(matrix)))
            try:
                chol, lower = scipy.linalg.cho_factor(matrix, lower=True, overwrite_a=True,
                                                      check_finite=False)
            except np.linalg.LinAlgError:
                raise self._failure(kind) from None
            # The squared pivots bound the smallest eigenvalue from above.
            if not np.min(np.diag(chol)) ** 2 > tol:
                raise self._failure(kind)
            factor = (chol, lower)
        self._factors[key] = factor
        return factor

    def predict(self, x_test, t=np.inf, get=KINDS, cov=None):
        """Mean and covariance of the trained networks' outputs at times t.

        Parameters
        ----------
        x_test : (M, d) array_like
            Test inputs.
        t : float or array_like of float
            Training time(s) ≥ 0; ``inf`` (or ``None``) for convergence. All-infinite
            requests use a Cholesky factorisation, anything else one
            eigendecomposition for every time.
        get : {"nngp", "ntk"} or tuple of them
            "ntk": all layers trained; "nngp": only the readout trained (at t = ∞ the
            NNGP posterior with noise variance equal to the regulariser).
        cov : {None, "full", "var"}
            None (default): the mean only, as Neural Tangents' default; "full": the
            M × M covariance and its diagonal; "var": only the variances, without
            forming an M × M matrix.

        Returns
        -------
        dict
            ``{kind: Prediction}``.
        """
        kinds = _check_get(get)
        times, scalar = _check_times(t)
        cov = _check_cov(cov)
        x_test = check_inputs(x_test, "x_test", spatial=True)
        if x_test.shape[1:] != self.x_train.shape[1:]:
            if x_test.ndim == 2 == self.x_train.ndim:
                raise ValueError(f"x_test has {x_test.shape[1]} features but x_train has "
                                 f"{self.x_train.shape[1]}")
            raise ValueError(f"x_test has shape {x_test.shape[1:]} per input but x_train "
                             f"has {self.x_train.shape[1:]}")
        need = set(kinds) | ({"nngp"} if cov is not None else set())
        self._compute_train(need)
        need = tuple(k for k in KINDS if k in need)
        cross = {k: v.T for k, v in kernel(self.spec, x_test, self.x_train,
                                             get=need).items()}  # (N, M)
        if cov == "full":
            prior = kernel(self.spec, x_test, get="nngp")["nngp"]
        elif cov == "var":
            prior = kernel_diag(self.spec, x_test, get="nngp")["nngp"]
        else:
            prior = None
        finite = not np.all(np.isinf(times))
        out = {}
        for kind in kinds:
            if finite:
                mean, covs, var = self._predict_eigh(kind, times, cross, prior, cov)
            else:
                mean, covs, var = self._predict_cholesky(kind, len(times), cross, prior, cov)
            if self.y_train.ndim == 1:
                mean = mean[..., 0]
            if scalar:
                mean = mean[0]
                covs = None if covs is None else covs[0]
                var = None if var is None else var[0]
            out[kind] = Prediction(mean, covs, var, times.copy())
        return out

    def _predict_eigh(self, kind, times, cross, prior, cov):
        evals, evecs = self.factorise(kind, finite=True)
        y = self.y_train.reshape(self.n_train, -1)
        s = times * self.time_scale()
        # φ(λ, s) = (1 − e^{−λs}) / λ, so that A_s = V diag(φ) Vᵀ; exact at s = 0 and ∞.
        # A product λs beyond float64 (times like 1e308) is ∞, whose e^{−∞} = 0 is
        # the t → ∞ limit it stands for: no overflow to report.
        with np.errstate(over="ignore"):
            phi = -np.expm1(-np.outer(s, evals)) / evals
            phi2 = -np.expm1(-np.outer(2 * s, evals)) / evals
        vty = evecs.T @ y
        mean = np.stack([cross[kind].T @ (evecs @ (p[:, None] * vty)) for p in phi])
        if cov is None:
            return mean, None, None
        covs, var = [], []
        if kind == "nngp":
            proj = evecs.T @ cross["nngp"]  # Vᵀ K_X*
            for p2 in phi2:
                if cov == "full":
                    c = prior - proj.T @ (p2[:, None] * proj)
                    covs.append(0.5 * (c + c.T))
                else:
                    var.append(prior - np.einsum("n,nm,nm->m", p2, proj, proj))
        else:
            proj = evecs.T @ cross["ntk"]  # Vᵀ Θ_X*
            k_train = self._train["nngp"]
            for p in phi:
                b = evecs @ (p[:, None] * proj)  # A_s Θ_X*
                covs_var = self._ntk_cov(b, k_train, cross["nngp"], prior, cov)
                (covs if cov == "full" else var).append(covs_var)
        if cov == "full":
            covs = np.stack(covs)
            return mean, covs, np.stack([np.diag(c).copy() for c in covs])
        return mean, None, np.stack(var)

    def _predict_cholesky(self, kind, n_times, cross, prior, cov):
        factor = self.factorise(kind, finite=False)
        y = self.y_train.reshape(self.n_train, -1)
        alpha = scipy.linalg.cho_solve(factor, y, check_finite=False)
        mean = cross[kind].T @ alpha
        covs = var = None
        if cov is not None:
            if kind == "nngp":
                w = scipy.linalg.cho_solve(factor, cross["nngp"], check_finite=False)
                if cov == "full":
                    c = prior - cross["nngp"].T @ w
                    covs = 0.5 * (c + c.T)
                else:
                    var = prior - np.einsum("nm,nm->m", cross["nngp"], w)
            else:
                b = scipy.linalg.cho_solve(factor, cross["ntk"], check_finite=False)
                result = self._ntk_cov(b, self._train["nngp"], cross["nngp"], prior, cov)
                covs, var = (result, None) if cov == "full" else (None, result)
            if covs is not None:
                var = np.diag(covs).copy()
        def per_time(a):
            return None if a is None else np.repeat(a[None], n_times, axis=0)

        return per_time(mean), per_time(covs), per_time(var)

    @staticmethod
    def _ntk_cov(b, k_train, k_cross, prior, cov):
        """K** + Bᵀ K B − Bᵀ K_X* − K_*X B with B = A Θ_X* (N × M)."""
        kb = k_train @ b
        if cov == "full":
            mixed = b.T @ k_cross
            c = prior + b.T @ kb - mixed - mixed.T
            return 0.5 * (c + c.T)
        return prior + np.einsum("nm,nm->m", b, kb) - 2 * np.einsum("nm,nm->m", b, k_cross)


def predict_ensemble(spec, x_train, y_train, x_test, t=np.inf, get=KINDS,
                     learning_rate=1.0, diag_reg=0.0, diag_reg_absolute=False, cov=None):
    """Outputs of infinitely wide networks trained by gradient flow on MSE, over inits.

    Parameters
    ----------
    spec : str or Serial
        The architecture.
    x_train : (N, d) array_like
        Training inputs.
    y_train : (N,) or (N, c) array_like
        Training targets.
    x_test : (M, d) array_like
        Test inputs.
    t : float or array_like of float
        Training time(s); ``inf`` for convergence. Time enters as
        s = η t / (N c) (Neural Tangents' convention: loss ½·mean over N·c targets).
    get : {"nngp", "ntk"} or tuple of them
        "ntk": all layers trained; "nngp": only the readout.
    learning_rate : float
        η.
    diag_reg : float
        Diagonal regulariser of the training kernel, relative to its mean diagonal.
    diag_reg_absolute : bool
        Take ``diag_reg`` in absolute units.
    cov : {None, "full", "var"}
        None (default, as in Neural Tangents): the mean only, which needs neither
        the test-test kernel nor the NNGP when ``get="ntk"``; "full": the M × M
        covariance too; "var": the variances only (no M × M matrix).

    Returns
    -------
    dict
        ``{kind: Prediction(mean, cov, var, t)}``; ``cov`` and ``var`` are None
        unless requested.

    Raises
    ------
    NotPositiveDefiniteError
        When the regularised training kernel is numerically singular, or, with
        ``diag_reg=0``, when two training inputs are identical; the message names
        the pair (and whether their targets differ) and the fix.

    See Also
    --------
    GradientFlowEnsemble : the same, keeping the factorisations for more calls.
    """
    ensemble = GradientFlowEnsemble(spec, x_train, y_train, learning_rate, diag_reg,
                                    diag_reg_absolute)
    return ensemble.predict(x_test, t, get, cov)


def nngp_posterior(spec, x_train, y_train, x_test, noise=0.0, cov=None):
    """Bayesian posterior of an infinitely wide network (a GP with the NNGP kernel).

    .. math::

        \\mu = K_{*X}(K + \\sigma^2 I)^{-1} Y, \\qquad
        \\Sigma = K_{**} - K_{*X}(K + \\sigma^2 I)^{-1} K_{X*}

    Parameters
    ----------
    spec : str or Serial
        The architecture.
    x_train : (N, d) array_like
        Training inputs.
    y_train : (N,) or (N, c) array_like
        Training targets.
    x_test : (M, d) array_like
        Test inputs.
    noise : float
        Observation noise variance σ² (absolute). With ``noise=0`` the training
        kernel must be positive definite, and no two training inputs identical.
    cov : {None, "full", "var"}
        The mean only (default), also the full covariance of the latent outputs,
        or their variances only.

    Returns
    -------
    Prediction
        The posterior; identical to the "nngp" ensemble at t = ∞ with
        ``diag_reg=noise, diag_reg_absolute=True``.
    """
    ensemble = GradientFlowEnsemble(spec, x_train, y_train, diag_reg=noise,
                                    diag_reg_absolute=True)
    ensemble._knob = "noise"
    return ensemble.predict(x_test, np.inf, "nngp", cov)["nngp"]


# ------------------------------------------------------------ cross-entropy flow


class CrossEntropyFlow(NamedTuple):
    """Function-space gradient flow of the cross-entropy loss, sampled at times t.

    ``loss[k]`` is C(f_t) and ``loss_rate[k]`` its time derivative
    ΔC = −η ⟨∇C, Θ ∇C⟩; logits and probabilities have shape (T, N, c) on the
    training inputs and (T, M, c) on the test inputs (``None`` without them);
    ``classes`` labels the c columns.
    """

    t: np.ndarray
    loss: np.ndarray
    loss_rate: np.ndarray
    logits_train: np.ndarray
    proba_train: np.ndarray
    logits_test: np.ndarray | None
    proba_test: np.ndarray | None
    classes: np.ndarray


def _softmax(f):
    z = f - f.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _log_softmax(f):
    z = f - f.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _class_targets(y):
    """One-hot (or probability) targets (N, c) and the class labels."""
    arr = np.asarray(y)
    if arr.ndim == 1:
        classes, index = np.unique(arr, return_inverse=True)
        onehot = np.zeros((arr.shape[0], classes.size))
        onehot[np.arange(arr.shape[0]), index] = 1.0
        return onehot, classes
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim != 2 or np.any(arr < 0) or not np.allclose(arr.sum(axis=1), 1.0):
        raise ValueError("y_train must be class labels (N,) or class probabilities (N, c) "
                         "whose rows are >= 0 and sum to 1")
    return arr, np.arange(arr.shape[1])


# Implicit solvers get the exact Jacobian when it has at most this many rows
# (a dense (N c)² matrix); larger ones fall back to finite differences.
_MAX_JACOBIAN = 2000


def _solve_cross_entropy(theta, targets, times, learning_rate, method, rtol, atol):
    """Integrals H(t) = ∫₀ᵗ (softmax(f) − Y) dτ at the given times, f = −η/(Nc) Θ H.

    Returns an array (T, N, c). The flow starts at f = 0, the mean output at
    initialisation. Badly scaled inputs make it stiff (a large common mode of Θ
    next to slow discriminative ones), so ``method="auto"`` uses LSODA with the
    exact Jacobian while that is small, and RK45 otherwise (LSODA's
    finite-difference Jacobian costs N·c evaluations of the flow).
    """
    from scipy.integrate import solve_ivp

    n, c = targets.shape
    scale = learning_rate / (n * c)

    def rhs(_, h):
        f = -scale * (theta @ h.reshape(n, c))
        return (_softmax(f) - targets).ravel()

    def jac(_, h):
        p = _softmax(-scale * (theta @ h.reshape(n, c)))
        hess = p[:, :, None] * np.eye(c) - p[:, :, None] * p[:, None, :]  # (N, c, c)
        return (-scale * np.einsum("ikl,ij->ikjl", hess, theta)).reshape(n * c, n * c)

    if method == "auto":
        method = "LSODA" if n * c <= _MAX_JACOBIAN else "RK45"
    options = {}
    if method in ("LSODA", "BDF", "Radau") and n * c <= _MAX_JACOBIAN:
        options["jac"] = jac
    order = np.argsort(times, kind="stable")
    out = np.zeros((times.size, n, c))
    t_max = float(times[order[-1]])
    if t_max > 0:
        sol = solve_ivp(rhs, (0.0, t_max), np.zeros(n * c), method=method,
                        t_eval=times[order], rtol=rtol, atol=atol, **options)
        if not sol.success:
            raise RuntimeError(f"the cross-entropy flow could not be integrated: "
                               f"{sol.message}; try another method or a looser rtol")
        out[order] = sol.y.T.reshape(times.size, n, c)
    return out


def cross_entropy_flow(spec, x_train, y_train, x_test=None, t=(0.0, 1.0, 10.0, 100.0),
                       get="ntk", learning_rate=1.0, method="auto", rtol=1e-8, atol=1e-10):
    """Train an infinitely wide network on the cross-entropy loss in function space.

    Integrates the kernel gradient flow df/dt = −η Θ ∇C(f) (scipy's ``solve_ivp``)
    from f = 0 with

    .. math::

        C(f) = -\\frac{1}{N c} \\sum_{i, k} y_{ik} \\log \\operatorname{softmax}(f_i)_k,
        \\qquad \\frac{dC}{dt} = -\\eta \\, \\langle \\nabla C, \\Theta \\nabla C \\rangle,

    the same normalisation as the MSE loss of :func:`predict_ensemble` (mean over the
    N·c targets), so times are comparable. Test outputs follow
    df*/dt = −η Θ*X ∇C(f).

    Parameters
    ----------
    y_train : (N,) labels or (N, c) class probabilities
    x_test : (M, d) array_like, optional
    t : float or array_like of float
        Finite times ≥ 0, in any order.
    get : {"ntk", "nngp"}
        All layers trained, or only the readout.
    method : str
        ``scipy.integrate.solve_ivp`` method. "auto": LSODA with the exact Jacobian
        (which handles stiff flows, e.g. from badly scaled inputs) for N·c ≤ 2000,
        RK45 above.
    rtol, atol : float
        Tolerances of ``solve_ivp``.

    Returns
    -------
    CrossEntropyFlow
    """
    kinds = _check_get(get)
    if len(kinds) != 1:
        raise ValueError(f"get must name one kernel ('ntk' or 'nngp'), got {get!r}")
    kind = kinds[0]
    times, _ = _check_times(t)
    if np.any(np.isinf(times)):
        raise ValueError("cross-entropy training does not converge to finite outputs on "
                         "separable data; give finite times")
    x_train = check_inputs(x_train, "x_train", spatial=True)
    targets, classes = _class_targets(y_train)
    if targets.shape[0] != x_train.shape[0]:
        raise ValueError(f"y_train has {targets.shape[0]} rows but x_train has "
                         f"{x_train.shape[0]}")
    learning_rate = _check_positive(learning_rate, "learning_rate")
    theta = kernel(spec, x_train, get=kind)[kind]
    n, c = targets.shape
    scale = learning_rate / (n * c)
    h = _solve_cross_entropy(theta, targets, times, learning_rate, method, rtol, atol)
    logits = -scale * np.einsum("ij,tjk->tik", theta, h)
    grads = (_softmax(logits) - targets) / (n * c)
    loss = -np.einsum("ik,tik->t", targets, _log_softmax(logits)) / (n * c)
    rate = -learning_rate * np.einsum("tik,ij,tjk->t", grads, theta, grads)
    logits_test = proba_test = None
    if x_test is not None:
        x_test = check_inputs(x_test, "x_test", spatial=True)
        cross = kernel(spec, x_test, x_train, get=kind)[kind]
        logits_test = -scale * np.einsum("ij,tjk->tik", cross, h)
        proba_test = _softmax(logits_test)
    return CrossEntropyFlow(times.copy(), loss, rate, logits, _softmax(logits),
                            logits_test, proba_test, classes)


# ------------------------------------------------------------ scikit-learn estimators
#
# The estimator classes derive from scikit-learn's BaseEstimator and mixins when
# scikit-learn is installed, and from small stand-ins otherwise. They are built on
# first access (module __getattr__), so ``import limitkernel`` does not pay for
# importing scikit-learn.

DEFAULT_ARCH = "3 * [dense(w_std=1.5, b_std=0.05), relu], dense(w_std=1.5, b_std=0.05)"


_ESTIMATOR_PARAMS = """arch : str or Serial, default=DEFAULT_ARCH
        The architecture spec; the default, ``"3 * [dense(w_std=1.5, b_std=0.05),
        relu], dense(w_std=1.5, b_std=0.05)"``, equals ``lk.mlp(3, "relu",
        w_std=1.5, b_std=0.05)``. To tune σ_w or σ_b, search over a list of
        specs, e.g. ``{"arch": [lk.mlp(3, "relu", w_std=w, b_std=0.05) for w in
        (1.0, 1.5, 2.0)]}``.
    t : float, default=inf
        Training time of the network; ``inf`` trains to convergence. Time enters
        as s = η t / (N c) (loss ½·mean over the N·c training targets), so only
        ``learning_rate * t`` matters.
    input_shape : tuple of int, default=None
        For a network on images or sequences: the shape of one input, (H, W, C)
        or (L, C), channels last. ``X`` keeps scikit-learn's (N, features)
        form, each row the input flattened in C order (``images.reshape(N,
        -1)``)."""


class _KernelRegression:
    """Shared fit/predict of the regressors; ``_mode`` is "ntk" or "nngp"."""

    _mode = "ntk"

    def __init__(self, arch=DEFAULT_ARCH, t=np.inf, learning_rate=1.0, diag_reg=1e-6,
                 diag_reg_absolute=False, normalize_y=False, input_shape=None):
        self.arch = arch
        self.t = t
        self.learning_rate = learning_rate
        self.diag_reg = diag_reg
        self.diag_reg_absolute = diag_reg_absolute
        self.normalize_y = normalize_y
        self.input_shape = input_shape

    def fit(self, X, y):
        """Compute and factorise the training kernel.

        Parameters
        ----------
        X : (N, d) array_like
            Training inputs.
        y : (N,) or (N, c) array_like
            Training targets.

        Returns
        -------
        self
            The fitted estimator.

        Raises
        ------
        NotPositiveDefiniteError
            When the regularised training kernel is numerically singular, or, with
            ``diag_reg=0``, when two training inputs are identical.
        """
        X, y = _validate(self, X, y, reset=True, multi_output=True, y_numeric=True)
        times, scalar = _check_times(self.t)
        if not scalar:
            raise ValueError(f"t must be one time for an estimator, got {self.t!r}")
        y = np.asarray(y, dtype=np.float64)
        if self.normalize_y:
            # scikit-learn's GaussianProcessRegressor: a constant column keeps scale 1.
            self.y_train_mean_ = np.mean(y, axis=0)
            std = np.std(y, axis=0)
            constant = std <= 10 * _EPS * np.abs(self.y_train_mean_)
            self.y_train_std_ = np.where(constant | (std == 0), 1.0, std)
        else:
            self.y_train_mean_ = np.zeros(y.shape[1:])
            self.y_train_std_ = np.ones(y.shape[1:])
        targets = (y - self.y_train_mean_) / self.y_train_std_
        ensemble = GradientFlowEnsemble(self.arch, X, targets, self.learning_rate,
                                        self.diag_reg, self.diag_reg_absolute)
        ensemble.factorise(self._mode, finite=not np.isinf(times[0]))
        self.ensemble_ = ensemble
        return self

    def predict(self, X, return_std=False, return_cov=False):
        """Mean output of the trained ensemble, and optionally its std or covariance.

        Parameters
        ----------
        X : (M, d) array_like
            Test inputs.
        return_std : bool
            Also return the standard deviation over initialisations, shape (M,) or
            (M, c), in the units of the targets.
        return_cov : bool
            Also return the covariance, shape (M, M) or (M, M, c), in the squared
            units of the targets.

        Returns
        -------
        mean : (M,) or (M, c) ndarray
            Mean output, in the units of the targets.
        std or cov : ndarray, only if requested
            Without ``normalize_y`` the same for every output column; with it,
            column k is scaled by the standard deviation of target column k.
        """
        if return_std and return_cov:
            raise ValueError("at most one of return_std and return_cov can be requested")
        _check_fitted(self)
        X = _validate(self, X, reset=False)
        cov = "full" if return_cov else "var" if return_std else None
        pred = self.ensemble_.predict(X, self.t, self._mode, cov)[self._mode]
        scale, shift = self.y_train_std_, self.y_train_mean_
        mean = pred.mean * scale + shift
        if not (return_std or return_cov):
            return mean
        if return_std:
            std = np.sqrt(np.maximum(pred.var, 0.0))
            return mean, (std * scale if mean.ndim == 1 else std[:, None] * scale)
        if mean.ndim == 1:
            return mean, pred.cov * scale ** 2
        return mean, pred.cov[:, :, None] * scale ** 2


class _NTKRegressor(_KernelRegression):
    __doc__ = f"""Infinitely wide network trained by gradient flow on MSE (all layers).

    Predicts the mean, over random initialisations, of the network ``arch``
    trained by gradient flow for time ``t`` (``inf``: to convergence, which is
    kernel regression with the NTK Θ), and its standard deviation or covariance
    (Lee et al. 2019). Fitting computes and factorises the N × N training NTK
    once; prediction costs one M × N kernel (and the test-test NNGP for the
    uncertainty).

    Parameters
    ----------
    {_ESTIMATOR_PARAMS}
    learning_rate : float, default=1.0
        η of gradient flow; only ``learning_rate * t`` matters.
    diag_reg : float, default=1e-6
        Added to the diagonal of the training NTK before it is factorised,
        relative to its mean diagonal (Neural Tangents' ``diag_reg``); 0 requires
        a positive definite kernel, and so distinct training inputs.
    diag_reg_absolute : bool, default=False
        Take ``diag_reg`` in absolute units.
    normalize_y : bool, default=False
        As in scikit-learn's ``GaussianProcessRegressor``: subtract the mean of
        the training targets and divide by their standard deviation (per column)
        before fitting, and undo both on the mean and the std or covariance of
        ``predict``. Without it the targets are fitted as they are by a network
        whose outputs at initialisation have variance K(x, x): the std of
        ``predict`` is then the spread over initialisations of that network, of
        the kernel's scale whatever the targets' scale. With it, the network is
        trained on standardised targets and its outputs rescaled, so the std is
        in proportion to the targets' spread.

    Attributes
    ----------
    ensemble_ : GradientFlowEnsemble
        Training kernels and their factorisation (of the standardised targets
        with ``normalize_y``).
    y_train_mean_, y_train_std_ : ndarray, shape () or (c,)
        The shift and scale of the targets (0 and 1 without ``normalize_y``).
    n_features_in_ : int
        Number of input features seen in ``fit``.

    See Also
    --------
    NNGPRegressor : only the readout trained; at t = inf the NNGP posterior.
    GradientFlowEnsemble : the same predictions, at many times at once.

    Examples
    --------
    >>> import numpy as np, limitkernel as lk
    >>> from sklearn.model_selection import GridSearchCV
    >>> rng = np.random.default_rng(0)
    >>> X = rng.standard_normal((60, 3)); y = np.sin(X[:, 0]) + 0.1 * X[:, 1]
    >>> grid = {{"arch": [lk.mlp(2, "relu", w_std=w, b_std=0.05) for w in (1.0, 2.0)],
    ...         "diag_reg": [1e-4, 1e-1]}}
    >>> search = GridSearchCV(lk.NTKRegressor(normalize_y=True), grid, cv=3).fit(X, y)
    >>> mean, std = search.best_estimator_.predict(X[:5], return_std=True)
    """

    _mode = "ntk"


class _NNGPRegressor(_KernelRegression):
    __doc__ = f"""NNGP regression: only the readout trained; at t = inf the Bayesian posterior.

    Predicts the mean, over random initialisations, of the network ``arch`` of
    which only the readout layer is trained by gradient flow for time ``t``,
    and its standard deviation or covariance. At ``t=inf`` this is Gaussian
    process regression with the NNGP kernel K: mean K*X (K + σ² I)⁻¹ y and the
    posterior covariance of the latent function, σ² being ``diag_reg``.

    Parameters
    ----------
    {_ESTIMATOR_PARAMS}
    learning_rate : float, default=1.0
        η of gradient flow; only ``learning_rate * t`` matters.
    diag_reg : float, default=1e-6
        Added to the diagonal of the training NNGP kernel before it is
        factorised, relative to its mean diagonal; at ``t=inf`` it is the
        observation noise variance σ² (absolute with ``diag_reg_absolute``, or
        after ``normalize_y`` in units of the standardised targets). 0 requires
        a positive definite kernel, and so distinct training inputs.
    diag_reg_absolute : bool, default=False
        Take ``diag_reg`` in absolute units.
    normalize_y : bool, default=False
        As in scikit-learn's ``GaussianProcessRegressor``: fit the standardised
        targets (mean 0, std 1 per column) and undo the standardisation on the
        mean and the std or covariance of ``predict``. Without it the prior
        variance is K(x, x) whatever the targets' scale, and so is the std.

    Attributes
    ----------
    ensemble_ : GradientFlowEnsemble
        Training kernels and their factorisation.
    y_train_mean_, y_train_std_ : ndarray, shape () or (c,)
        The shift and scale of the targets (0 and 1 without ``normalize_y``).
    n_features_in_ : int
        Number of input features seen in ``fit``.

    See Also
    --------
    NTKRegressor : all layers trained.
    nngp_posterior : the posterior as a function.
    """

    _mode = "nngp"


class _NTKClassifier:
    __doc__ = f"""Classifier from infinitely wide networks: one-hot MSE or cross-entropy flow.

    With ``loss="mse"`` (default) the network regresses one-hot targets and the
    class is the largest mean output over random initialisations (for two
    classes, the sign of their difference). With ``loss="cross_entropy"`` the
    outputs follow the function-space gradient flow of the cross-entropy loss
    from f = 0, and ``predict_proba`` gives softmax(f).

    Parameters
    ----------
    {_ESTIMATOR_PARAMS}
        Must be finite for ``loss="cross_entropy"``, whose flow does not
        converge on separable data.
    learning_rate : float, default=1.0
        η of gradient flow; only ``learning_rate * t`` matters.
    diag_reg : float, default=1e-6
        ``loss="mse"`` only: added to the diagonal of the training kernel before
        it is factorised, relative to its mean diagonal; 0 requires a positive
        definite kernel, and so distinct training inputs.
    diag_reg_absolute : bool, default=False
        Take ``diag_reg`` in absolute units.
    loss : {{"mse", "cross_entropy"}}, default="mse"
        "mse": the ensemble mean of a network regressing one-hot targets;
        "cross_entropy": the cross-entropy flow (then ``predict_proba`` exists).
    mode : {{"ntk", "nngp"}}, default="ntk"
        Train all layers (NTK), or only the readout (NNGP kernel).

    Attributes
    ----------
    classes_ : ndarray, shape (c,)
        The class labels, sorted.
    ensemble_ : GradientFlowEnsemble
        ``loss="mse"``: training kernel and factorisation.
    flow_ : ndarray, shape (N, c)
        ``loss="cross_entropy"``: the integral ∫₀ᵗ (softmax(f) − Y) dτ, from
        which the outputs on any input follow.
    X_train_ : ndarray, shape (N, d)
        ``loss="cross_entropy"``: the training inputs.
    n_features_in_ : int
        Number of input features seen in ``fit``.

    See Also
    --------
    cross_entropy_flow : the flow as a function, with the loss along the way.
    """

    def __init__(self, arch=DEFAULT_ARCH, t=np.inf, learning_rate=1.0, diag_reg=1e-6,
                 diag_reg_absolute=False, loss="mse", mode="ntk", input_shape=None):
        self.arch = arch
        self.t = t
        self.learning_rate = learning_rate
        self.diag_reg = diag_reg
        self.diag_reg_absolute = diag_reg_absolute
        self.loss = loss
        self.mode = mode
        self.input_shape = input_shape

    def fit(self, X, y):
        """Fit on inputs X (N, d) and class labels y (N,)."""
        X, y = _validate(self, X, y, reset=True)
        _check_classification_targets(self, y)
        if self.loss not in ("mse", "cross_entropy"):
            raise ValueError(f"loss must be 'mse' or 'cross_entropy', got {self.loss!r}")
        if self.mode not in KINDS:
            raise ValueError(f"mode must be 'ntk' or 'nngp', got {self.mode!r}")
        times, scalar = _check_times(self.t)
        if not scalar:
            raise ValueError(f"t must be one time for an estimator, got {self.t!r}")
        targets, self.classes_ = _class_targets(y)
        for name in ("ensemble_", "flow_", "X_train_"):
            self.__dict__.pop(name, None)
        if self.loss == "mse":
            ensemble = GradientFlowEnsemble(self.arch, X, targets, self.learning_rate,
                                            self.diag_reg, self.diag_reg_absolute)
            ensemble.factorise(self.mode, finite=not np.isinf(times[0]))
            self.ensemble_ = ensemble
        else:
            if np.isinf(times[0]):
                raise ValueError("loss='cross_entropy' needs a finite training time t")
            learning_rate = _check_positive(self.learning_rate, "learning_rate")
            theta = kernel(self.arch, X, get=self.mode)[self.mode]
            self.flow_ = _solve_cross_entropy(theta, targets, times, learning_rate,
                                              "auto", 1e-8, 1e-10)[0]
            self.X_train_ = X
        return self

    def decision_function(self, X):
        """Network outputs (M, c); for two classes the difference, (M,)."""
        _check_fitted(self)
        X = _validate(self, X, reset=False)
        if self.loss == "mse":
            scores = self.ensemble_.predict(X, self.t, self.mode, cov=None)[self.mode].mean
        else:
            n, c = self.flow_.shape
            scale = float(self.learning_rate) / (n * c)
            cross = kernel(self.arch, X, self.X_train_, get=self.mode)[self.mode]
            scores = -scale * (cross @ self.flow_)
        if scores.shape[1] == 2:
            return scores[:, 1] - scores[:, 0]
        return scores

    def predict(self, X):
        """Predicted class labels (M,)."""
        scores = self.decision_function(X)
        if scores.ndim == 1:
            return self.classes_[(scores > 0).astype(int)]
        return self.classes_[np.argmax(scores, axis=1)]

    @property
    def predict_proba(self):
        """Class probabilities softmax(f) (M, c); only for ``loss="cross_entropy"``."""
        if self.loss != "cross_entropy":
            raise AttributeError("predict_proba needs loss='cross_entropy': outputs "
                                 "regressed on one-hot targets are not probabilities")
        return self._predict_proba

    def _predict_proba(self, X):
        scores = self.decision_function(X)
        if scores.ndim == 1:
            scores = np.stack([np.zeros_like(scores), scores], axis=1)
        return _softmax(scores)


def _validate(estimator, X, y=None, reset=True, **kwargs):
    """scikit-learn's input validation (or a minimal equivalent), then the
    estimator's ``input_shape`` applied to the rows."""
    out = _validate_2d(estimator, X, y, reset, **kwargs)
    if isinstance(out, tuple):
        return _shaped(estimator, out[0]), out[1]
    return _shaped(estimator, out)


def _shaped(estimator, X):
    shape = getattr(estimator, "input_shape", None)
    if shape is None:
        return X
    try:
        shape = tuple(int(v) for v in np.atleast_1d(shape))
    except (TypeError, ValueError):
        raise ValueError(f"input_shape must be a tuple of ints such as (8, 8, 1), got "
                         f"{shape!r}") from None
    size = int(np.prod(shape))
    if len(shape) not in (2, 3) or min(shape) < 1 or size != X.shape[1]:
        raise ValueError(f"input_shape {shape} must be (H, W, C) or (L, C) with as many "
                         f"values per input as X has features ({X.shape[1]}); X holds "
                         "each input flattened in C order")
    return np.ascontiguousarray(X).reshape((X.shape[0],) + shape)


def _validate_2d(estimator, X, y=None, reset=True, **kwargs):
    """scikit-learn's input validation when available, else a minimal equivalent."""
    if getattr(estimator, "_uses_sklearn", False):
        try:
            from sklearn.utils.validation import validate_data
        except ImportError:  # scikit-learn < 1.6
            if y is None:
                return estimator._validate_data(X, reset=reset)
            return estimator._validate_data(X, y, reset=reset, **kwargs)
        if y is None and not reset:
            return validate_data(estimator, X, reset=False)
        return validate_data(estimator, X, y, reset=reset, **kwargs)
    X = check_inputs(X, "X")
    if reset:
        estimator.n_features_in_ = X.shape[1]
    elif X.shape[1] != estimator.n_features_in_:
        raise ValueError(f"X has {X.shape[1]} features, but {type(estimator).__name__} "
                         f"is expecting {estimator.n_features_in_} features as input")
    if y is None and reset:
        raise ValueError(f"{type(estimator).__name__} requires y to be passed, but the "
                         "target y is None")
    if y is None:
        return X
    y = np.asarray(y)
    if y.shape[0] != X.shape[0]:
        raise ValueError(f"X has {X.shape[0]} samples but y has {y.shape[0]}")
    return X, y


def _check_classification_targets(estimator, y):
    if getattr(estimator, "_uses_sklearn", False):
        from sklearn.utils.multiclass import check_classification_targets

        check_classification_targets(y)
    elif np.asarray(y).ndim != 1:
        raise ValueError("y must hold one class label per sample, shape (N,)")


class _NotFittedError(ValueError, AttributeError):
    """The estimator is used before fit (stand-in for scikit-learn's NotFittedError)."""


def _check_fitted(estimator):
    if getattr(estimator, "_uses_sklearn", False):
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(estimator)
    elif not any(k.endswith("_") and not k.startswith("_") for k in vars(estimator)):
        raise _NotFittedError(f"this {type(estimator).__name__} instance is not fitted yet; "
                              "call fit first")


class _ParamsBase:
    """get_params / set_params / repr for use without scikit-learn."""

    @classmethod
    def _param_names(cls):
        import inspect

        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def get_params(self, deep=True):
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params):
        valid = self._param_names()
        for key, value in params.items():
            if key not in valid:
                raise ValueError(f"invalid parameter {key!r} for {type(self).__name__}; "
                                 f"valid parameters are {valid}")
            setattr(self, key, value)
        return self

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


class _RegressorScore:
    def score(self, X, y):
        """Coefficient of determination R² (averaged over outputs)."""
        y = np.asarray(y, dtype=np.float64)
        pred = np.asarray(self.predict(X)).reshape(y.shape)
        resid = ((y - pred) ** 2).sum(axis=0)
        total = ((y - y.mean(axis=0)) ** 2).sum(axis=0)
        return float(np.mean(1.0 - resid / total))


class _ClassifierScore:
    def score(self, X, y):
        """Accuracy."""
        return float(np.mean(self.predict(X) == np.asarray(y)))


_ESTIMATOR_IMPLS = {
    "NTKRegressor": (_NTKRegressor, "regressor"),
    "NNGPRegressor": (_NNGPRegressor, "regressor"),
    "NTKClassifier": (_NTKClassifier, "classifier"),
}
_ESTIMATORS = {}


def _build_estimators():
    try:
        from sklearn.base import (
            BaseEstimator,
            ClassifierMixin,
            MultiOutputMixin,
            RegressorMixin,
        )
        bases = {"regressor": (MultiOutputMixin, RegressorMixin),
                 "classifier": (ClassifierMixin,)}
        base, uses_sklearn = BaseEstimator, True
    except ImportError:
        bases = {"regressor": (_RegressorScore,), "classifier": (_ClassifierScore,)}
        base, uses_sklearn = _ParamsBase, False
    for name, (impl, role) in _ESTIMATOR_IMPLS.items():
        namespace = {"__doc__": impl.__doc__, "__module__": __name__,
                     "__qualname__": name, "_uses_sklearn": uses_sklearn}
        _ESTIMATORS[name] = type(name, (*bases[role], impl, base), namespace)


def __getattr__(name):
    if name in _ESTIMATOR_IMPLS:
        if not _ESTIMATORS:
            _build_estimators()
        return _ESTIMATORS[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
