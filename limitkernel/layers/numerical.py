"""Activations without a closed form: the Hermite (Mehler) series, class and kernel.

Their Gram entries come from the Mehler expansion
E[φ(u)φ(v)] = Σ_k a_k(q11) a_k(q22) ρ^k, with the normalised Hermite coefficients
a_k computed once per input by Gaussian quadrature and the series truncated where
a proven bound on its tail falls below ``tol`` (see :class:`Numerical`).
"""

import functools
import math
import os
import sys
import warnings
from typing import ClassVar

import numpy as np
from scipy import special

from .._numba import fma, jit
from ..spec import Layer, SpecError, register
from .activations import Activation, generic_one_minus_rho

__all__ = [
    "OP_HERMITE",
    "Elu",
    "Numerical",
    "SeriesTruncationWarning",
    "Silu",
    "Softplus",
    "Softsign",
    "Tanh",
    "hermite_coefficients",
    "hermite_diagonal",
    "hermite_row",
    "hermite_rows",
]

OP_HERMITE = 10

class SeriesTruncationWarning(RuntimeWarning):
    """A Hermite series reached its term cap before its requested tolerance."""


# Gauss–Legendre on [−L, 0] and [0, L] with the Gaussian weight: the split at 0
# keeps the rule spectrally accurate for activations with a kink there (ELU,
# softsign, ReLU-like callables). With L = 14 the neglected mass is below
# e^{−L²/4} ≈ 5e-22 for every Hermite function, which are bounded by 1 after
# the factor e^{−z²/4}. The rule starts at _QUAD_NODES nodes a side and doubles
# until representative inputs give the same moments (and coefficients) with
# twice the nodes; about 128 a side resolve the first 400 Hermite functions.
_QUAD_HALF_WIDTH = 14.0
_QUAD_NODES = 32
_QUAD_MAX_NODES = 3200
_QUAD_TOL = 1e-13
# Inputs whose coefficients are computed up to the cap to choose the term count.
_REPRESENTATIVES = 17
# The first number of terms tried for them (then 4x, 16x, ... up to max_terms).
_FIRST_TERMS = 128
_EPS = np.finfo(float).eps

# 8th-order finite differences for φ' when no derivative is given.
_FD_STEP = 2.0 ** -6
_FD_CENTRAL = (4.0 / 5.0, -1.0 / 5.0, 4.0 / 105.0, -1.0 / 280.0)
_FD_ONE_SIDED = (-761.0 / 280.0, 8.0, -14.0, 56.0 / 3.0, -35.0 / 2.0, 56.0 / 5.0,
                 -14.0 / 3.0, 8.0 / 7.0, -1.0 / 8.0)


class Numerical(Activation):
    """An activation without a closed form, by its Hermite (Mehler) expansion.

    For (u, v) ~ N(0, [[q11, q12], [q12, q22]]) and ρ = q12 / √(q11 q22),

    .. math::

        E[φ(u)φ(v)] = \\sum_{k \\ge 0} a_k(q_{11})\\, a_k(q_{22})\\, ρ^k, \\qquad
        a_k(q) = E[φ(\\sqrt{q}\\, z)\\, He_k(z)] / \\sqrt{k!},\\ z \\sim N(0, 1),

    and likewise for φ' (Mehler's formula). The coefficients are computed once
    per input and layer by Gauss–Legendre quadrature of the Gaussian integral
    (split at 0), and the Gram pass evaluates the series by Horner's rule in ρ.

    **Accuracy.** The series is cut after T terms, the fewest for which, on every
    input, tail(T) = E[φ(u)²] − Σ_{k<T} a_k² ≤ ``tol`` · E[φ(u)²], and the same
    for φ'. By Cauchy–Schwarz and Parseval the neglected part of a Gram entry is

    .. math::

        \\Big|\\sum_{k \\ge T} a_k b_k ρ^k\\Big| \\le |ρ|^T \\sqrt{\\text{tail}_a(T)\\,
        \\text{tail}_b(T)} \\le |ρ|^T\\, \\text{tol} \\sqrt{E[φ(u)^2]\\, E[φ(v)^2]}.

    This is a proven bound, not an estimate (the tails are exact sums, up to the
    quadrature's ~1e-14 relative error), and it is attained: by identical inputs
    (ρ = 1), where the neglected part *is* tail(T), and within a few times by
    nearly parallel pairs of equal variance. Pairs with |ρ| < 1 gain the factor
    |ρ|^T (0.95^400 ≈ 1e-9). The Gram pass
    adds no error of its own beyond rounding (see :func:`hermite_row`), and the
    diagonal K(x, x) of a symmetric Gram matrix is the exact 1-D quadrature.

    **Defaults.** ``tol`` = 1e-12 and ``max_terms`` = 2000 for smooth
    activations (tanh, softplus, SiLU, your own callables): 1e-12 is met at input
    variances up to about 17 (tanh), 79 (SiLU), 118 (softplus). When ``max_terms``
    cannot meet ``tol`` on some inputs, a :class:`SeriesTruncationWarning` says
    which inputs, the worst-case bound (at |ρ| → 1), and the largest |ρ| within
    ``tol``; it does not fire for series that meet ``tol``. ELU and softsign have
    a kink in φ' at 0 (φ'' jumps), so their coefficients decay only algebraically
    (tail(T) falls like a power of T, about T^(−2)) and 1e-12 would take
    millions of terms: they default to ``tol`` = 1e-4 and 3e-3 with
    ``max_terms`` = 400, met up to variances of about 10 and 4.7; at |ρ| ≤ 0.94
    their bound is below 1e-12 anyway.
    :meth:`error_bound` reports T and the bound on given variances, at any |ρ|.

    Parameters
    ----------
    fn : callable
        φ, applied element-wise to numpy arrays of any shape.
    dfn : callable, optional
        φ'. Without it φ' is an 8th-order finite difference of φ (step 1/64,
        one-sided within 4 steps of 0, so a kink at 0 is respected), which
        agrees with the exact derivative to about 1e-12 for smooth φ.
    name : str, optional
        Name shown in specs and messages.
    tol : float
        Bound on the relative truncation error per layer at |ρ| → 1 (above).
    max_terms : int
        Cap on T (at most 10000). The tables take 16 · n · T bytes per layer
        for n inputs.

    Notes
    -----
    The cost of a Gram entry is at most 2T multiply-adds per numerical layer
    (nearly identical inputs); less correlated entries stop far earlier, where
    |ρ|^K times the row input's own remaining tail falls below rounding.
    Odd and even φ (tanh, softsign) store exact zeros for the vanishing
    coefficients, and the pass then evaluates the series in ρ².
    """

    name = "numerical"
    code = OP_HERMITE
    row_params = ("table", "terms")
    series = True
    defaults: ClassVar[dict] = {"tol": 1e-12, "max_terms": 2000.0}
    method = "Hermite (Mehler) series; error ≤ tol as |ρ| → 1, |ρ|^T·tol below (proven)"
    _fn = None
    _dfn = None

    def __init__(self, fn=None, dfn=None, name=None, **params):
        super().__init__(**params)
        if fn is not None:
            if not callable(fn) or (dfn is not None and not callable(dfn)):
                raise SpecError(f"{name or self.name}: fn and dfn must be callables, "
                                f"got fn={fn!r}, dfn={dfn!r}")
            self._fn, self._dfn = fn, dfn
        if name is not None:
            self.name = name
        if self._fn is None:
            raise SpecError(f"{self.name}: give the activation as Numerical(fn=..., "
                            "dfn=None, name=...)")
        if not 0.0 < self.tol < 1.0:
            raise SpecError(f"{self.name}: tol must lie in (0, 1), got {self.tol}")
        if self.max_terms != int(self.max_terms) or not 1 <= self.max_terms <= 10000:
            raise SpecError(f"{self.name}: max_terms must be an integer in [1, 10000], "
                            f"got {self.max_terms}")

    def forward(self, x):
        return self._fn(np.asarray(x, dtype=float))

    def derivative(self, x):
        return self._derivative_fn()(np.asarray(x, dtype=float))

    def _derivative_fn(self):
        return self._dfn if self._dfn is not None else _FiniteDifference(self._fn)

    def __eq__(self, other):
        return (type(self) is type(other) and self.params == other.params
                and self.name == other.name and self._fn is other._fn
                and self._dfn is other._dfn)

    __hash__ = Layer.__hash__

    def kernel_params(self):
        # The table index and the number of terms are set per program, once the
        # inputs are known (:meth:`limitkernel._program.Program.hermite_tables`).
        return {"table": 0.0, "terms": 0.0}

    def diag(self, q):
        """(E[φ(u)²], E[φ'(u)²]) for u ~ N(0, q), by the 1-D quadrature."""
        q = _as_variances(q, self.name)
        rule = self._rule(q, 1)[0]
        return tuple(_sample(f, q, rule, self.name).second for f in self._functions())

    def coefficients(self, q, terms=None):
        """Hermite coefficients of φ and φ' for inputs of variances ``q``.

        Parameters
        ----------
        q : (n,) array_like
            Variances of the pre-activations entering the layer, one per input.
        terms : int, optional
            Number of terms T; by default the fewest that meet ``tol`` on every
            input (at most ``max_terms``).

        Returns
        -------
        coef, dcoef : (n, T) arrays
            a_k(q_i) of φ and of φ', k = 0 .. T − 1.
        """
        coef, dcoef, _ = self._expand(q, terms)
        return coef, dcoef

    def error_bound(self, q, rho=1.0):
        """Terms used on inputs of variances ``q`` and the truncation bound achieved.

        Parameters
        ----------
        q : (n,) array_like
            Variances of the pre-activations entering the layer.
        rho : float
            Largest |ρ| of the pairs the bound is for (1: any pair).

        Returns
        -------
        dict
            ``terms`` (T); ``phi`` and ``dphi``: rho^T times the largest
            tail(T)/E over the inputs, so that every Gram entry of this layer
            with |ρ| ≤ rho satisfies |E[φ(u)φ(v)] − series| ≤
            phi · √(E[φ(u)²] E[φ(v)²]), and the same for φ' with dphi (attained
            by identical inputs at rho = 1); ``rho_within_tol``: the largest |ρ|
            whose bound is at most ``tol`` (1 when every pair is).
        """
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"{self.name}: rho must lie in [0, 1], got {rho}")
        coef, _, bounds = self._expand(q, None)
        terms = coef.shape[1]
        return {"terms": terms, "phi": rho ** terms * bounds[0],
                "dphi": rho ** terms * bounds[1],
                "rho_within_tol": _rho_within(max(bounds), self.tol, terms)}

    # -------------------------------------------------------- internals

    def _functions(self):
        return self._fn, self._derivative_fn()

    def _rule(self, q, terms):
        """The quadrature rule, checked against one with twice the nodes.

        Starting from a few nodes, the rule is doubled until, on representative
        inputs, E[φ²] and E[φ'²] and the first ``terms`` coefficients of both
        agree with those of the doubled rule to ``_QUAD_TOL``. Returns the rule,
        the representatives and their coefficients (with ``terms`` columns).
        """
        rows = _representatives(q)
        nodes = _QUAD_NODES
        while True:
            rule = _half_rule(nodes, terms)
            fine = _half_rule(2 * nodes, terms)
            coefs, worst = [], 0.0
            for fn in self._functions():
                coarse = _sample(fn, q[rows], rule, self.name)
                ref = _sample(fn, q[rows], fine, self.name)
                worst = max(worst, float(np.max(np.abs(coarse.second - ref.second)
                                                / _floor(ref.second))))
                if terms > 1:
                    coef = _project(coarse, rule, terms)
                    diff = coef - _project(ref, fine, terms)
                    worst = max(worst, float(np.max(np.linalg.norm(diff, axis=1)
                                                    / np.sqrt(_floor(ref.second)))))
                    coefs.append(coef)
            if worst <= _QUAD_TOL or 2 * nodes > _QUAD_MAX_NODES:
                break
            nodes *= 2
        if worst > _QUAD_TOL:
            warnings.warn(
                f"{self.name}: the Gaussian quadrature changes by {worst:.2g} (relative) "
                f"between {nodes} and {2 * nodes} nodes a side; φ may have a kink away "
                "from 0 or vary on a scale far below the input's standard deviation "
                f"(variances up to {float(np.max(q)):.3g})",
                SeriesTruncationWarning, stacklevel=_caller_level(),
            )
        return rule, rows, coefs

    def _expand(self, q, terms):
        q = _as_variances(q, self.name)
        # Once per distinct variance: numpy's and BLAS's loops may round a row
        # by its place in the array, and identical inputs must get identical
        # coefficients, bit for bit (found by fuzzing: the last of two identical
        # inputs had another diagonal, and the Gram matrix was not symmetric).
        distinct, inverse = np.unique(q, return_inverse=True)
        coefs, tails, size = self._expand_distinct(distinct, terms)
        coefs = [c[inverse] for c in coefs]
        tails = [t[inverse] for t in tails]
        bounds = tuple(float(np.max(t)) for t in tails)
        if terms is None and max(bounds) > self.tol:
            self._warn_truncated(q, tails, size)
        return coefs[0], coefs[1], bounds

    def _expand_distinct(self, q, terms):
        """Coefficients and relative tails of φ and φ' for the variances ``q``, and T."""
        cap = int(self.max_terms)
        if terms is not None:
            size = int(terms)
            if not 1 <= size <= cap:
                raise ValueError(f"{self.name}: terms must be an integer in [1, max_terms="
                                 f"{cap}], got {terms}")
        else:
            size, rule = self._terms_for(q, cap)
        while True:
            if terms is not None or rule is None or rule.terms < size:
                rule = self._rule(q, size)[0]
            samples = [_sample(f, q, rule, self.name) for f in self._functions()]
            coefs = [_project(s, rule, size) for s in samples]
            tails = [np.maximum(_tail(c, s.second), 0.0) / _floor(s.second)
                     for c, s in zip(coefs, samples)]
            bad = (tails[0] > self.tol) | (tails[1] > self.tol)
            if terms is not None or size >= cap or not np.any(bad):
                break
            # The representatives only estimate T: inputs that miss tol choose again.
            # (Their rule was checked on them only: check it again on all inputs.)
            need, rule = self._terms_for(q[bad], cap)[0], None
            size = min(cap, max(size + 1, need))
        return coefs, tails, size

    def _terms_for(self, q, cap):
        """The fewest terms meeting ``tol`` on representatives of q (at most ``cap``).

        Tries 128, 512, 2048, ... terms, each with a quadrature rule checked for
        that many coefficients, until the representatives' tails fall below tol.
        Returns the number of terms and the last rule (good for at least that many).
        """
        size = min(cap, _FIRST_TERMS)
        while True:
            rule, rows, coefs = self._rule(q, size)
            if size == 1:
                return 1, rule
            need = max(int(np.max(_terms_needed(c, _sample(f, q[rows], rule, self.name).second,
                                                self.tol)))
                       for c, f in zip(coefs, self._functions()))
            if need <= size or size >= cap:
                return min(need, cap), rule
            size = min(cap, 4 * size)

    def _warn_truncated(self, q, tails, size):
        worst = [float(np.max(t)) for t in tails]
        count = int(np.count_nonzero((tails[0] > self.tol) | (tails[1] > self.tol)))
        rho_ok = _rho_within(max(worst), self.tol, size)
        affected = q[(tails[0] > self.tol) | (tails[1] > self.tol)]
        warnings.warn(
            f"{self.name}: max_terms={size} Hermite terms leave, for {count} of "
            f"{q.shape[0]} inputs (variances {float(np.min(affected)):.3g} to "
            f"{float(np.max(affected)):.3g}), a truncation error above tol={self.tol:g} "
            f"on pairs of nearly parallel inputs: at most {worst[0]:.2g} (NNGP, E[φφ]) "
            f"and {worst[1]:.2g} (NTK, E[φ'φ']) relative to √(E[φ(u)²] E[φ(v)²]) as "
            f"|ρ| → 1, and |ρ|^{size} times that below. Entries with |ρ| ≤ {rho_ok:.6g} "
            "are within tol. Raise max_terms (the tables take 16·n·max_terms bytes per "
            "layer), lower the variance (w_std, b_std, input scale), or set "
            f"tol={max(worst):.1g} to accept this",
            SeriesTruncationWarning, stacklevel=_caller_level(),
        )


class _Sampled:
    """φ(±√q z_j) at a rule's positive nodes, split into even and odd parts."""

    def __init__(self, even, odd, second):
        self.even, self.odd, self.second = even, odd, second


class _FiniteDifference:
    """φ' by 8th-order central differences; one-sided near 0, averaged at 0."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x):
        x = np.asarray(x, dtype=float)
        fn, h = self.fn, _FD_STEP
        out = np.zeros(x.shape)
        for m, cm in enumerate(_FD_CENTRAL, 1):
            out += cm * (fn(x + m * h) - fn(x - m * h))
        out /= h
        near = np.abs(x) < 4.0 * h
        if np.any(near):
            xs, hs = x[near], 0.5 * h
            up = sum(cm * fn(xs + m * hs) for m, cm in enumerate(_FD_ONE_SIDED)) / hs
            down = -sum(cm * fn(xs - m * hs) for m, cm in enumerate(_FD_ONE_SIDED)) / hs
            out[near] = np.where(xs > 0, up, np.where(xs < 0, down, 0.5 * (up + down)))
        return out

    def __repr__(self):
        return f"finite difference of {self.fn!r}"


def _caller_level():
    """``stacklevel`` of the first frame outside this package (for warnings)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _as_variances(q, name):
    q = np.asarray(q, dtype=np.float64)
    if q.ndim != 1:
        q = q.reshape(-1)
    if not np.all(np.isfinite(q)) or np.any(q < 0):
        raise ValueError(f"{name}: input variances must be finite and >= 0, got "
                         f"values in [{float(np.min(q)):.3g}, {float(np.max(q)):.3g}]")
    return q


def _floor(x):
    """Divisor for relative errors: x, or 1 where x is 0."""
    return np.where(x > 0, x, 1.0)


def _representatives(q):
    """Indices of inputs at evenly spaced quantiles of q, min and max included."""
    order = np.argsort(q, kind="stable")
    picks = np.linspace(0, q.shape[0] - 1, min(_REPRESENTATIVES, q.shape[0]))
    return np.unique(order[np.round(picks).astype(np.int64)])


@functools.cache
def _legendre(n):
    """Gauss–Legendre nodes and weights on [−1, 1], by Newton's method to rounding.

    (scipy.special.roots_legendre errs by ~1e-13 in the weights above n ≈ 100.)
    """
    x = np.cos(math.pi * (np.arange(1, n + 1) - 0.25) / (n + 0.5))
    for _ in range(100):
        p, dp = _legendre_eval(n, x)
        step = p / dp
        x = x - step
        if np.max(np.abs(step)) <= 2.0 * _EPS:
            break
    _, dp = _legendre_eval(n, x)
    return x[::-1].copy(), (2.0 / ((1.0 - x * x) * dp * dp))[::-1].copy()


def _legendre_eval(n, x):
    p0, p1 = np.ones_like(x), x
    for k in range(2, n + 1):
        p0, p1 = p1, ((2 * k - 1) * x * p1 - (k - 1) * p0) / k
    return p1, n * (x * p1 - p0) / (x * x - 1.0)


class _HalfRule:
    """Positive nodes of the split rule and what is needed to project on them.

    ``proj`` weights give a_k = Σ_j proj_j f_par(z_j) ψ_k(z_j), with ψ_k the
    normalised Hermite function He_k(z) e^{−z²/4}/√(k!) and f_par the even (odd)
    part of φ(√q ·) for even (odd) k; ``second`` weights give E[φ²] from
    φ(z_j)² + φ(−z_j)².
    """

    def __init__(self, nodes, terms, width=_QUAD_HALF_WIDTH):
        self.terms = terms
        x, w = _legendre(nodes)
        half = 0.5 * width
        self.z = half * (x + 1.0)
        w = half * w / math.sqrt(2.0 * math.pi)
        gauss = np.exp(-0.25 * self.z * self.z)
        self.proj = 2.0 * w * gauss
        self.second = w * gauss * gauss
        basis = np.empty((terms, nodes))
        basis[0] = gauss
        if terms > 1:
            basis[1] = self.z * gauss
        for k in range(1, terms - 1):
            basis[k + 1] = (self.z * basis[k] - math.sqrt(k) * basis[k - 1]) / math.sqrt(k + 1)
        # ψ_k at even and at odd k, each contiguous (so that slices of them are
        # BLAS-compatible).
        self.basis = (np.ascontiguousarray(basis[0::2].T), np.ascontiguousarray(basis[1::2].T))
        for arr in (self.z, self.proj, self.second) + self.basis:
            arr.flags.writeable = False


@functools.lru_cache(maxsize=12)
def _half_rule(nodes, terms):
    return _HalfRule(nodes, terms)


def _sample(fn, q, rule, name):
    """φ(±√q_i z_j); an odd or even φ (to rounding) gets an exactly zero part."""
    x = np.sqrt(q)[:, None] * rule.z
    plus, minus = _real(fn(x), name), _real(fn(-x), name)
    if plus.shape != x.shape or minus.shape != x.shape:
        raise ValueError(f"{name}: φ must act element-wise on arrays; given shape "
                         f"{x.shape} it returned {plus.shape}")
    if not (np.all(np.isfinite(plus)) and np.all(np.isfinite(minus))):
        raise ValueError(f"{name}: φ (or φ') returned NaN or inf on inputs of variance up "
                         f"to {float(np.max(q)):.3g} (|x| up to "
                         f"{float(np.max(np.abs(x))):.3g})")
    scale = 4.0 * _EPS * max(float(np.max(np.abs(plus), initial=0.0)),
                             float(np.max(np.abs(minus), initial=0.0)))
    even, odd = 0.5 * (plus + minus), 0.5 * (plus - minus)
    if np.all(np.abs(even) <= scale):
        even = None
    elif np.all(np.abs(odd) <= scale):
        odd = None
    second = (plus * plus + minus * minus) @ rule.second
    return _Sampled(even, odd, second)


def _real(values, name):
    """φ's values as floats; complex (or non-numeric) values are refused, not cut."""
    values = np.asarray(values)
    if np.iscomplexobj(values):
        raise TypeError(f"{name}: φ (or φ') returned complex values; the kernels need a "
                        "real-valued activation (return np.real(...) if the imaginary "
                        "part is zero)")
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: φ (or φ') must return real numbers, it returned an "
                        f"array of {values.dtype}") from None


def _project(sampled, rule, terms, rows=None):
    """Coefficients a_0 .. a_{terms−1} of the sampled inputs (or of ``rows``)."""
    pick = (lambda a: a) if rows is None else (lambda a: a[rows])
    n = sampled.second.shape[0] if rows is None else len(rows)
    out = np.zeros((n, terms))
    for parity, part in ((0, sampled.even), (1, sampled.odd)):
        count = (terms - parity + 1) // 2
        if part is not None and count > 0:
            out[:, parity::2] = (pick(part) * rule.proj) @ rule.basis[parity][:, :count]
    return out


def _tail(coef, second):
    """tail(T) = E[φ²] − Σ_{k<T} a_k², per input."""
    return second - np.einsum("ij,ij->i", coef, coef)


def _terms_needed(coef, second, tol):
    """Per input, the fewest terms K with tail(K) ≤ tol E[φ²]; T + 1 if none."""
    ok = second[:, None] - np.cumsum(coef * coef, axis=1) <= tol * second[:, None]
    return np.where(ok.any(axis=1), ok.argmax(axis=1) + 1, coef.shape[1] + 1)


def _rho_within(bound, tol, terms):
    """The largest r ≤ 1 with r^terms · bound ≤ tol."""
    if bound <= tol:
        return 1.0
    return math.exp(math.log(tol / bound) / terms)


def _gauss_expect(fn, q, nodes=200):
    """E[fn(√q z)²] for z ~ N(0, 1), by the split Gauss–Legendre rule."""
    q = _as_variances(q, getattr(fn, "__name__", "fn"))
    return _sample(fn, q, _half_rule(nodes, 1), "fn").second


def hermite_coefficients(fn, q, terms, nodes=200):
    """Normalised Hermite coefficients a_k(q) = E[φ(√q z) He_k(z)] / √(k!).

    By Gauss–Legendre quadrature on [−14, 0] and [0, 14] with ``nodes`` nodes
    each. Returns an array of shape (len(q), terms).
    """
    q = _as_variances(q, getattr(fn, "__name__", "fn"))
    rule = _half_rule(nodes, terms)
    return _project(_sample(fn, q, rule, "fn"), rule, terms)


_KINKED = ("Hermite (Mehler) series, slow (kink in φ' at 0); error ≤ tol as |ρ| → 1, "
           "|ρ|^T·tol below (proven)")


def _make_numerical(name, fn, dfn, doc, tol=1e-12, max_terms=2000.0, aliases=(), torch=None,
                    method=Numerical.method):
    cls = type(name.title().replace("_", ""), (Numerical,), {
        "method": method,
        "name": name,
        "aliases": aliases,
        "torch": torch,
        "__doc__": doc,
        "defaults": {"tol": tol, "max_terms": max_terms},
        "_fn": staticmethod(fn),
        "_dfn": staticmethod(dfn),
    })
    return register(cls)


def _sigmoid(x):
    return special.expit(x)


def _sech2(x):
    t = np.tanh(x)
    return (1.0 - t) * (1.0 + t)


Tanh = _make_numerical("tanh", np.tanh, _sech2, "φ(x) = tanh(x).", torch=("Tanh", (), {}))
Softplus = _make_numerical("softplus", lambda x: np.logaddexp(0.0, x), _sigmoid,
                           "φ(x) = log(1 + eˣ).", torch=("Softplus", (), {"beta": 1.0}))
Silu = _make_numerical("silu", lambda x: x * _sigmoid(x),
                       lambda x: _sigmoid(x) * (1.0 + x * (1.0 - _sigmoid(x))),
                       "φ(x) = x σ(x) (SiLU, swish).", aliases=("swish",),
                       torch=("SiLU", (), {}))
Elu = _make_numerical(
    "elu", lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))),
    lambda x: np.where(x > 0, 1.0, np.exp(np.minimum(x, 0.0))),
    "φ(x) = x for x > 0, eˣ − 1 otherwise.\n\n"
    "φ'' jumps at 0 (φ' has a kink), so the Hermite coefficients decay only\n"
    "algebraically and the defaults are tol=1e-4, max_terms=400: met at input\n"
    "variances up to about 10 (set by E[φ'φ']; the bound on E[φφ] is then about\n"
    "2e-7), and below 1e-12 for pairs with |ρ| ≤ 0.94.",
    tol=1e-4, max_terms=400.0, method=_KINKED, torch=("ELU", (), {"alpha": 1.0}))
Softsign = _make_numerical(
    "softsign", lambda x: x / (1.0 + np.abs(x)), lambda x: 1.0 / (1.0 + np.abs(x)) ** 2,
    "φ(x) = x / (1 + |x|).\n\n"
    "φ'' jumps at 0 (φ' has a kink), so the Hermite coefficients decay only\n"
    "algebraically and the defaults are tol=3e-3, max_terms=400: met at input\n"
    "variances up to about 4.7 (set by E[φ'φ']; the bound on E[φφ] is then about\n"
    "7e-6), and below 1e-12 for pairs with |ρ| ≤ 0.94.",
    tol=3e-3, max_terms=400.0, method=_KINKED, torch=("Softsign", (), {}))


# Columns per block of a Hermite row: the block's ρ, ρ² and partial sums stay in
# the L1 cache while the coefficient rows stream past.
HERMITE_BLOCK = 128
# A block stops its series once what it leaves out is below this, relative to
# √(E[φ(u)²] E[φ(v)²]) (squared here).
_STOP2 = 2.0 ** -108


@jit
def hermite_row(q12, one_minus_rho, ntk, r11, r22, n11, n22, a_row, b_cols, ad_row, bd_cols,
                terms, rho, acc, want_ntk, col0=0):
    """Numerical activation by its Mehler (Hermite) expansion in ρ.

    E[φ(u)φ(v)] = Σ_{k<T} a_k(q11) b_k(q22) ρ^k and likewise for φ', with the
    normalised Hermite coefficients of φ(√q ·) precomputed per input
    (:meth:`limitkernel.layers.numerical.Numerical.coefficients`): ``a_row`` (T,)
    for this row's input, ``b_cols[:, col0:col0 + n]`` for the columns'. Pass the
    whole C-contiguous column table and the offset ``col0`` rather than a slice
    ``b_cols[:, j0:j0 + n]``: the compiler cannot prove a slice's last axis
    contiguous and then does not vectorise the inner loop (about 1.5x slower).
    Horner's rule in ρ, vectorised over a block of columns (the blocks fall on
    multiples of :data:`HERMITE_BLOCK` in the column tables, so that the rows
    of :func:`hermite_rows` share them), with two savings that change no
    result beyond rounding:

    * a block with r = max |ρ| < 1 stops at the first K with
      r^K √(S(K) / S(0)) ≤ 2⁻⁵⁴, S(K) = Σ_{K≤k<T} a_k² the row's own tail: by
      Cauchy–Schwarz, |Σ_{K≤k<T} a_k b_k ρ^k| ≤ r^K √(S(K)) √(E[φ(v)²]), and
      S(0) ≤ E[φ(u)²], so what is left is below rounding relative to
      √(E[φ(u)²] E[φ(v)²]) — the coefficients' own decay shortens the sum, and
      a column whose series is long costs nothing more when the row's is short;
    * a series whose row coefficients vanish at every odd (even) k — an even
      (odd) φ, stored with exact zeros — runs in ρ² over the other half.

    ``one_minus_rho`` is read, then recomputed from the new ``q12`` and the roots
    of the diagonals entering (``r11``, ``r22``) and leaving (``n11``, ``n22``)
    the layer. ``rho`` and ``acc`` are
    scratch rows of length n.
    """
    n = q12.shape[0]
    first_a, step_a = _hermite_parity(a_row, terms)
    first_d, step_d = _hermite_parity(ad_row, terms)
    tail_a = _suffix_squares(a_row, terms)
    tail_d = _suffix_squares(ad_row, terms)
    square = np.empty(HERMITE_BLOCK)
    # An identical input at the start of the row (the diagonal, in the
    # symmetric case) needs every term: it gets a block of its own.
    lone = n > 0 and one_minus_rho[0] == 0.0
    j1 = 0
    while j1 < n:
        j0 = j1
        j1 = 1 if lone and j0 == 0 else min(_block_end(col0 + j0) - col0, n)
        width = j1 - j0
        # Views indexed from 0 let the compiler vectorise the loops.
        _hermite_block(q12[j0:j1], acc[j0:j1], ntk[j0:j1], one_minus_rho[j0:j1],
                       rho[j0:j1], square[:width], a_row, b_cols, ad_row, bd_cols,
                       col0 + j0, first_a, step_a, tail_a, first_d, step_d, tail_d, terms,
                       want_ntk)
    generic_one_minus_rho(q12, one_minus_rho, r11, r22, n11, n22)


@jit
def _block_end(col):
    """The first column after ``col`` on a multiple of HERMITE_BLOCK."""
    return (col // HERMITE_BLOCK + 1) * HERMITE_BLOCK


@jit
def hermite_rows(q12, one_minus_rho, ntk, lengths, rows, col0s, layer, roots1, roots2, h,
                 h1, h2, hd1, hd2, terms, want_ntk):
    """:func:`hermite_row` on several rows at once.

    Row g of the (G, ·) state holds ``lengths[g]`` entries of input ``rows[g]``
    against the columns ``col0s[g]`` … ``col0s[g] + lengths[g] - 1``; ``h`` is
    the op's index in the Hermite tables. Every row is cut into the blocks
    ``hermite_row`` would cut it into and each block gets the same sums, so the
    result is the same bit for bit. But the rows take turns block by block, so
    a block of column coefficients (up to terms × 128 numbers) is read from
    memory once for the whole group and then reused from cache; and two rows
    that cover the same block take it together (:func:`_hermite_pair`), each
    column coefficient then loaded once for both.
    """
    n_rows = lengths.shape[0]
    first_a = np.empty(n_rows, dtype=np.int64)
    step_a = np.empty(n_rows, dtype=np.int64)
    first_d = np.empty(n_rows, dtype=np.int64)
    step_d = np.empty(n_rows, dtype=np.int64)
    tail_a = np.empty((n_rows, terms + 1))
    tail_d = np.empty((n_rows, terms + 1))
    # Each row's columns after its lone block (if any), as column indices.
    starts = np.empty(n_rows, dtype=np.int64)
    ends = np.empty(n_rows, dtype=np.int64)
    x = np.empty((2, HERMITE_BLOCK))
    square = np.empty((2, HERMITE_BLOCK))
    deriv = np.empty((2, HERMITE_BLOCK))
    first_block = 1 << 62
    last_block = -1
    for g in range(n_rows):
        i = rows[g]
        first_a[g], step_a[g] = _hermite_parity(h1[h, i], terms)
        first_d[g], step_d[g] = _hermite_parity(hd1[h, i], terms)
        tail_a[g] = _suffix_squares(h1[h, i], terms)
        tail_d[g] = _suffix_squares(hd1[h, i], terms)
        n = lengths[g]
        col = col0s[g]
        # As in hermite_row: an identical input first in the row gets a block
        # of its own, then blocks end on multiples of HERMITE_BLOCK.
        lone = n > 0 and one_minus_rho[g, 0] == 0.0
        if lone:
            _hermite_block(q12[g, :1], deriv[0, :1], ntk[g, :1], one_minus_rho[g, :1],
                           x[0, :1], square[0, :1], h1[h, i], h2[h], hd1[h, i], hd2[h], col,
                           first_a[g], step_a[g], tail_a[g], first_d[g], step_d[g],
                           tail_d[g], terms, want_ntk)
        starts[g] = col + 1 if lone else col
        ends[g] = col + n
        if starts[g] < ends[g]:
            first_block = min(first_block, starts[g] // HERMITE_BLOCK)
            last_block = max(last_block, (ends[g] - 1) // HERMITE_BLOCK)
    for b in range(first_block, last_block + 1):
        # A row waits for a partner that covers the same columns of this block
        # with series of the same parity; a row left without one goes alone.
        waiting, w0, w1 = -1, 0, 0
        for g in range(n_rows + 1):
            if g < n_rows:
                c0 = max(b * HERMITE_BLOCK, starts[g])
                c1 = min((b + 1) * HERMITE_BLOCK, ends[g])
                if c0 >= c1:
                    continue
                if waiting >= 0 and c0 == w0 and c1 == w1 and \
                        first_a[g] == first_a[waiting] and step_a[g] == step_a[waiting] and \
                        first_d[g] == first_d[waiting] and step_d[g] == step_d[waiting]:
                    _hermite_pair(q12, one_minus_rho, ntk, waiting, g, rows, col0s, c0, c1,
                                  h, h1, h2, hd1, hd2, x, square, deriv, first_a[g],
                                  step_a[g], tail_a, first_d[g], step_d[g], tail_d, terms,
                                  want_ntk)
                    waiting = -1
                    continue
            if waiting >= 0:
                j0, j1 = w0 - col0s[waiting], w1 - col0s[waiting]
                i = rows[waiting]
                _hermite_block(q12[waiting, j0:j1], deriv[0, :j1 - j0], ntk[waiting, j0:j1],
                               one_minus_rho[waiting, j0:j1], x[0, :j1 - j0],
                               square[0, :j1 - j0], h1[h, i], h2[h], hd1[h, i], hd2[h], w0,
                               first_a[waiting], step_a[waiting], tail_a[waiting],
                               first_d[waiting], step_d[waiting], tail_d[waiting], terms,
                               want_ntk)
            waiting = -1
            if g < n_rows:
                waiting, w0, w1 = g, c0, c1
    for g in range(n_rows):
        n = lengths[g]
        i = rows[g]
        col = col0s[g]
        generic_one_minus_rho(q12[g, :n], one_minus_rho[g, :n], roots1[layer, i],
                              roots2[layer, col:col + n], roots1[layer + 1, i],
                              roots2[layer + 1, col:col + n])


@jit
def hermite_diagonal(coef, terms):
    """Σ_{k<terms} coef[k]²: a series of :func:`hermite_row` at ρ = 1 between an
    input and itself (E[φ(u)²] from φ's coefficients, E[φ'(u)²] from φ''s),
    summed from the last term as Horner's rule sums it."""
    total = 0.0
    for k in range(terms - 1, -1, -1):
        total += coef[k] * coef[k]
    return total


@jit
def _hermite_block(out, deriv, ntk, cj, x, x2, a_row, b_cols, ad_row, bd_cols, col, first_a,
                   step_a, tail_a, first_d, step_d, tail_d, terms, want_ntk):
    """One block of a Hermite row, for :func:`hermite_row` and :func:`hermite_rows`
    alike: ``out`` ← E[φφ], ``ntk`` ×= E[φ'φ'] on the columns ``col`` … ``col +
    len(cj) − 1`` of the tables, from their 1 − ρ ``cj``; ``x``, ``x2`` receive
    ρ and ρ², ``deriv`` the E[φ'φ'] (scratch of the block's width). The series
    stop at the terms the block's largest |ρ| needs (:func:`_hermite_count`).
    """
    r = _block_powers(cj, x, x2)
    _hermite_horner(out, a_row, b_cols, col, x, x2, first_a, step_a,
                    _hermite_count(tail_a, r, terms))
    if want_ntk:
        _hermite_horner(deriv, ad_row, bd_cols, col, x, x2, first_d, step_d,
                        _hermite_count(tail_d, r, terms))
        for jj in range(cj.shape[0]):
            ntk[jj] *= deriv[jj]


@jit
def _hermite_pair(q12, one_minus_rho, ntk, g1, g2, rows, col0s, c0, c1, h, h1, h2, hd1, hd2,
                  x, square, deriv, first_a, step_a, tail_a, first_d, step_d, tail_d, terms,
                  want_ntk):
    """:func:`_hermite_block` for rows g1 and g2 of the state on the same columns
    c0 … c1 − 1, whose series have the same parity: the terms both rows need
    run together (:func:`_horner_pair`), those that only one needs run first
    on that row alone. Each row gets the bits it would get alone.
    """
    width = c1 - c0
    i1, i2 = rows[g1], rows[g2]
    a1, a2 = c0 - col0s[g1], c0 - col0s[g2]
    r1 = _block_powers(one_minus_rho[g1, a1:a1 + width], x[0, :width], square[0, :width])
    r2 = _block_powers(one_minus_rho[g2, a2:a2 + width], x[1, :width], square[1, :width])
    _horner_pair(q12[g1, a1:a1 + width], q12[g2, a2:a2 + width], h1[h, i1], h1[h, i2], h2[h],
                 c0, x[0, :width], square[0, :width], x[1, :width], square[1, :width],
                 first_a, step_a, _hermite_count(tail_a[g1], r1, terms),
                 _hermite_count(tail_a[g2], r2, terms))
    if want_ntk:
        _horner_pair(deriv[0, :width], deriv[1, :width], hd1[h, i1], hd1[h, i2], hd2[h], c0,
                     x[0, :width], square[0, :width], x[1, :width], square[1, :width],
                     first_d, step_d, _hermite_count(tail_d[g1], r1, terms),
                     _hermite_count(tail_d[g2], r2, terms))
        t1 = ntk[g1, a1:a1 + width]
        t2 = ntk[g2, a2:a2 + width]
        for jj in range(width):
            t1[jj] *= deriv[0, jj]
            t2[jj] *= deriv[1, jj]


@jit
def _block_powers(cj, x, x2):
    """x ← ρ = 1 − cj, x2 ← ρ²; returns the largest |ρ|."""
    r = 0.0
    for jj in range(cj.shape[0]):
        v = 1.0 - cj[jj]
        x[jj] = v
        x2[jj] = v * v
        r = max(r, abs(v))
    return r


@jit
def _suffix_squares(coef, terms):
    """S(K) = Σ_{K≤k<terms} coef[k]², K = 0 .. terms (summed from the small end)."""
    out = np.empty(terms + 1)
    out[terms] = 0.0
    for k in range(terms - 1, -1, -1):
        out[k] = out[k + 1] + coef[k] * coef[k]
    return out


@jit
def _hermite_count(tail, r, terms):
    """The fewest terms K with r^(2K) S(K) ≤ 2⁻¹⁰⁸ S(0); all of them if r ≥ 1."""
    if r >= 1.0:
        return terms
    limit = _STOP2 * tail[0]
    power = 1.0
    r2 = r * r
    for k in range(terms):
        if power * tail[k] <= limit:
            return k
        power *= r2
    return terms


@jit
def _hermite_parity(coef, terms):
    """(first k, step) of the nonzero terms: (0, 2) even, (1, 2) odd, (0, 1) neither."""
    even = True
    odd = True
    for k in range(terms):
        if coef[k] != 0.0:
            if k % 2 == 0:
                odd = False
            else:
                even = False
    if odd and not even:
        return 1, 2
    if even:
        return 0, 2
    return 0, 1


@jit
def _last_term(first, step, count):
    """The largest k = first + m·step below ``count`` (first − step if none)."""
    if count <= first:
        return first - step
    return first + ((count - 1 - first) // step) * step


@jit
def _hermite_horner(out, coef, cols, col, x, x2, first, step, count):
    """out = Σ coef[k] cols[k, col + jj] ρ_jj^k over k = first, first + step, ... < count.

    ``x`` holds ρ and ``x2`` ρ² for the block; step 2 runs Horner in ρ².
    """
    for jj in range(out.shape[0]):
        out[jj] = 0.0
    _horner_steps(out, coef, cols, col, x if step == 1 else x2,
                  _last_term(first, step, count), first, step)
    if step == 2 and first == 1:
        for jj in range(out.shape[0]):
            out[jj] *= x[jj]


@jit
def _horner_pair(out1, out2, coef1, coef2, cols, col, x1, sq1, x2, sq2, first, step, count1,
                 count2):
    """:func:`_hermite_horner` for two rows on the same columns (coefficients
    ``coef1``, ``coef2``, ρ and ρ² ``x1``, ``sq1`` and ``x2``, ``sq2``, ``count1``
    and ``count2`` terms)."""
    for jj in range(out1.shape[0]):
        out1[jj] = 0.0
        out2[jj] = 0.0
    z1 = x1 if step == 1 else sq1
    z2 = x2 if step == 1 else sq2
    top1 = _last_term(first, step, count1)
    top2 = _last_term(first, step, count2)
    if top1 > top2:
        _horner_steps(out1, coef1, cols, col, z1, top1, top2 + step, step)
    elif top2 > top1:
        _horner_steps(out2, coef2, cols, col, z2, top2, top1 + step, step)
    _horner_steps_pair(out1, out2, coef1, coef2, cols, col, z1, z2, min(top1, top2), first,
                       step)
    if step == 2 and first == 1:
        for jj in range(out1.shape[0]):
            out1[jj] *= x1[jj]
            out2[jj] *= x2[jj]


@jit
def _horner_steps(out, coef, cols, col, z, top, bottom, step):
    """out ← out·z + coef[k] cols[k, col:col + n] for k = top, top − step, … ≥ bottom.

    Each sweep over the block takes four terms, so each partial sum is loaded
    and stored once per four steps rather than once per step (the steps
    themselves, and their rounding, are those of one term at a time). A step
    is out·z + fl(coef·col) rounded once, written out
    (:func:`~limitkernel._numba.fma`): the compiler's own fusing may round
    alike-spelled steps differently in two loops, and a row must get the same
    bits alone and paired (:func:`_horner_steps_pair`).
    """
    if top < bottom:
        return
    width = out.shape[0]
    end = col + width
    k = top
    for _ in range(((top - bottom) // step + 1) % 4):
        ak = coef[k]
        c = cols[k, col:end]
        for jj in range(width):
            out[jj] = fma(out[jj], z[jj], ak * c[jj])
        k -= step
    while k >= bottom:
        a0, a1, a2, a3 = coef[k], coef[k - step], coef[k - 2 * step], coef[k - 3 * step]
        c0 = cols[k, col:end]
        c1 = cols[k - step, col:end]
        c2 = cols[k - 2 * step, col:end]
        c3 = cols[k - 3 * step, col:end]
        for jj in range(width):
            zj = z[jj]
            o = fma(out[jj], zj, a0 * c0[jj])
            o = fma(o, zj, a1 * c1[jj])
            o = fma(o, zj, a2 * c2[jj])
            out[jj] = fma(o, zj, a3 * c3[jj])
        k -= 4 * step


@jit
def _horner_steps_pair(out1, out2, coef1, coef2, cols, col, z1, z2, top, bottom, step):
    """:func:`_horner_steps` for two rows, each column coefficient loaded once."""
    if top < bottom:
        return
    width = out1.shape[0]
    end = col + width
    k = top
    for _ in range(((top - bottom) // step + 1) % 4):
        a, b = coef1[k], coef2[k]
        c = cols[k, col:end]
        for jj in range(width):
            out1[jj] = fma(out1[jj], z1[jj], a * c[jj])
            out2[jj] = fma(out2[jj], z2[jj], b * c[jj])
        k -= step
    while k >= bottom:
        a0, a1, a2, a3 = coef1[k], coef1[k - step], coef1[k - 2 * step], coef1[k - 3 * step]
        b0, b1, b2, b3 = coef2[k], coef2[k - step], coef2[k - 2 * step], coef2[k - 3 * step]
        c0 = cols[k, col:end]
        c1 = cols[k - step, col:end]
        c2 = cols[k - 2 * step, col:end]
        c3 = cols[k - 3 * step, col:end]
        for jj in range(width):
            y = z1[jj]
            w = z2[jj]
            o = fma(out1[jj], y, a0 * c0[jj])
            p = fma(out2[jj], w, b0 * c0[jj])
            o = fma(o, y, a1 * c1[jj])
            p = fma(p, w, b1 * c1[jj])
            o = fma(o, y, a2 * c2[jj])
            p = fma(p, w, b2 * c2[jj])
            out1[jj] = fma(o, y, a3 * c3[jj])
            out2[jj] = fma(p, w, b3 * c3[jj])
        k -= 4 * step
