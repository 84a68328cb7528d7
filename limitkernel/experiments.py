"""Finite networks against the infinite-width limit: the three claims, measured.

For a spec, data, and widths × seeds (Jacot et al. 2018; Lee et al. 2019):

1. **At initialisation** the empirical NTK Θ̂ approaches the limit Θ: the relative
   Frobenius distance ‖Θ̂ − Θ‖/‖Θ‖ per width (mean and spread over seeds) and its
   fitted log–log slope, −1/2 in theory.
2. **During training** Θ̂ hardly moves: ‖Θ̂_T − Θ̂_0‖/‖Θ̂_0‖ per width, shrinking
   with width: at most as width^−1/2 (Lee et al. 2019), and as width^−1 for
   smooth networks (Dyer & Gur-Ari 2019, "Asymptotics of wide networks from
   Feynman diagrams").
3. **After training** the outputs follow the limiting Gaussian of
   :class:`limitkernel.GradientFlowEnsemble` at the same time t = steps: its mean
   and 10/50/90 percentiles, and the fraction of trained outputs inside the
   10–90 band (0.8 in the limit).

:func:`compare` runs all three; :func:`ntk_distance_at_init` runs the first alone
(cheap: no training); :func:`jacot_demo` is the built-in Figures 1 and 2 of
Jacot et al. All results are plain objects with ``to_dict()`` for JSON.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from scipy.special import ndtri

from ._io import atomic_path
from .finite import FiniteNetwork, limit_spec
from .gram import check_inputs, kernel
from .predict import GradientFlowEnsemble
from .spec import as_spec

__all__ = [
    "DEMO_SCALES",
    "DEMO_SPEC",
    "Comparison",
    "InitSweep",
    "WidthRun",
    "compare",
    "jacot_demo",
    "loglog_slope",
    "ntk_distance_at_init",
    "run_compare",
    "run_demo",
]

DEMO_SPEC = "4 * [dense(w_std=1, b_std=0.1), relu], dense(w_std=1, b_std=0.1)"
# The 90th percentile of the standard normal (the 10th is its negative), and the
# probability mass between them.
_Z90 = float(ndtri(0.9))
NOMINAL_COVERAGE = 0.8


# ------------------------------------------------------------ statistics


def loglog_slope(widths, values):
    """Weighted least-squares slope of log(mean value) against log(width).

    Parameters
    ----------
    widths : (W,) array_like
    values : (W, S) array_like
        S positive values per width (one per seed).

    Returns
    -------
    slope, se : float
        The slope and its standard error. Each width's log-mean has variance
        (sd/(mean √S))² (delta method, sd over seeds); the fit weights by its
        inverse, and when more than two widths scatter more than those errors
        allow (reduced χ² > 1) the error is scaled by √χ²_red, so that a model
        that does not fit (e.g. O(1/width) corrections at small widths) widens
        the error instead of hiding. NaN when fewer than two widths or seeds.
    """
    widths = np.asarray(widths, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    if widths.size < 2 or values.ndim != 2 or values.shape[1] < 2:
        return math.nan, math.nan
    mean = values.mean(axis=1)
    if not np.all(mean > 0):
        return math.nan, math.nan
    var = (values.std(axis=1, ddof=1) / (mean * math.sqrt(values.shape[1]))) ** 2
    if not np.all(var > 0):
        return math.nan, math.nan
    design = np.stack([np.ones_like(widths), np.log(widths)], axis=1)
    weights = 1.0 / var
    normal = design.T @ (weights[:, None] * design)
    cov = np.linalg.inv(normal)
    coef = cov @ (design.T @ (weights * np.log(mean)))
    se = math.sqrt(cov[1, 1])
    dof = widths.size - 2
    if dof > 0:
        chi2 = float(np.sum(weights * (np.log(mean) - design @ coef) ** 2)) / dof
        se *= math.sqrt(max(1.0, chi2))
    return float(coef[1]), se


def _summary(values):
    values = np.asarray(values, dtype=np.float64)
    sd = float(values.std(ddof=1)) if values.size > 1 else math.nan
    return float(values.mean()), sd


def _jsonable(value):
    """Arrays to lists, non-finite floats to None (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _relative_distance(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _limit_like(theta, n_outputs):
    """Θ as an array shaped like the empirical NTK of a c-output network (Θ ⊗ I)."""
    if n_outputs == 1:
        return theta
    return theta[:, :, None, None] * np.eye(n_outputs)


def _row(theta):
    """Θ(x_0, ·) of the first output, from an empirical or limiting NTK."""
    return theta[0] if theta.ndim == 2 else theta[0, :, 0, 0]


def _progress(total, enabled, desc):
    """A tqdm bar on a terminal (quiet otherwise, or without tqdm)."""
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="net", leave=False)


def _seed(base, index, width):
    return np.random.default_rng([int(base), int(index), int(width)])


def _blas_limit():
    """A context that keeps BLAS to one thread, or None without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(limits=1, user_api="blas")


def _map_seeds(task, seeds, n_jobs, bar):
    """``[task(s) for s in range(seeds)]``, on ``n_jobs`` threads when possible.

    The networks of one width are independent, and their GEMMs are skinny (a few
    training inputs against a wide layer), where a multi-threaded BLAS mostly
    waits on its own threads — badly so on a busy machine. So seeds run on
    parallel threads (numpy and scipy release the GIL in their kernels), each
    with a single-threaded BLAS, which needs threadpoolctl
    (``pip install 'limitkernel[progress]'``); without it they run one after
    another with the BLAS defaults. Results do not depend on ``n_jobs``
    beyond rounding.
    """
    if n_jobs is None:
        try:
            n_jobs = len(os.sched_getaffinity(0))
        except AttributeError:
            n_jobs = os.cpu_count() or 1
    if isinstance(n_jobs, bool) or int(n_jobs) != n_jobs or n_jobs < 1:
        raise ValueError(f"n_jobs must be a positive integer or None, got {n_jobs!r}")
    limit = _blas_limit() if min(int(n_jobs), seeds) > 1 else None

    def run(s):
        out = task(s)
        if bar is not None:
            bar.update()
        return out

    if limit is None:
        return [run(s) for s in range(seeds)]
    with limit, ThreadPoolExecutor(min(int(n_jobs), seeds)) as pool:
        return list(pool.map(run, range(seeds)))


# ------------------------------------------------------------ experiment 1 alone


@dataclass
class InitSweep:
    """Experiment 1: distance of the empirical NTK at initialisation from the limit.

    Attributes
    ----------
    widths : list of int
    distance : (W, S) array
        ‖Θ̂ − Θ‖_F / ‖Θ‖_F per width and seed.
    slope, slope_se : float
        Fitted log–log slope of the mean distance against width (theory −1/2)
        and its standard error (:func:`loglog_slope`).
    """

    spec: str
    widths: list
    distance: np.ndarray
    slope: float
    slope_se: float
    n_inputs: int
    seconds: float = 0.0

    def to_dict(self):
        return _jsonable({
            "experiment": "ntk distance at initialisation",
            "spec": self.spec, "widths": self.widths, "n_inputs": self.n_inputs,
            "distance": self.distance,
            "distance_mean": self.distance.mean(axis=1),
            "distance_sd": self.distance.std(axis=1, ddof=1) if self.distance.shape[1] > 1
            else np.full(len(self.widths), np.nan),
            "slope": self.slope, "slope_se": self.slope_se, "slope_theory": -0.5,
            "seconds": self.seconds,
        })

    def table(self):
        lines = [("experiment 1: ||NTK_hat - NTK|| / ||NTK|| at initialisation "
                 f"({self.distance.shape[1]} seeds, {self.n_inputs} inputs)"),
                 f"  {'width':>7} {'mean':>10} {'sd':>10}"]
        for width, row in zip(self.widths, self.distance):
            mean, sd = _summary(row)
            lines.append(f"  {width:>7d} {mean:10.4f} {sd:10.4f}")
        lines.append(f"  log-log slope {self.slope:+.3f} ± {self.slope_se:.3f} "
                     "(theory -0.5)")
        return "\n".join(lines)


def _check_widths(widths):
    try:
        out = [int(w) for w in widths]
    except (TypeError, ValueError):
        raise ValueError(f"widths must be a list of positive integers, got {widths!r}") \
            from None
    if not out or any(w < 1 for w in out) or out != [float(w) for w in widths]:
        raise ValueError(f"widths must be a non-empty list of positive integers, got {widths!r}")
    return sorted(set(out))


def _check_seeds(seeds):
    if isinstance(seeds, bool) or int(seeds) != seeds or seeds < 1:
        raise ValueError(f"seeds must be a positive integer (networks per width), got {seeds!r}")
    return int(seeds)


def ntk_distance_at_init(spec, x, widths, seeds=10, seed=0, n_outputs=1, progress=False,
                         n_jobs=None):
    """Experiment 1 alone: ‖Θ̂ − Θ‖/‖Θ‖ at initialisation, per width and seed.

    Parameters
    ----------
    spec : str or Serial
    x : (P, d), (P, L, C) or (P, H, W, C) array_like
        Inputs on which both kernels are compared: vectors, or sequences and
        images channels last for a convolutional spec.
    widths : sequence of int
    seeds : int
        Networks per width.
    seed : int
        Base seed; network s at width n uses ``default_rng([seed, s, n])``.
    n_outputs : int
        Readout width c (the limit is then Θ ⊗ I_c).
    progress : bool
        tqdm progress bar on a terminal.
    n_jobs : int, optional
        Networks built in parallel (threads; default all cores), see
        :func:`compare`.

    Returns
    -------
    InitSweep
    """
    start = time.perf_counter()
    spec = as_spec(spec)
    x = check_inputs(x, "x", spatial=True)
    shape = x.shape[1:]
    widths, seeds = _check_widths(widths), _check_seeds(seeds)
    bar = _progress(len(widths) * seeds, progress, "init NTK")
    distance = np.empty((len(widths), seeds))
    limits = {}
    try:
        for i, width in enumerate(widths):
            key = str(limit_spec(spec, width, input_shape=shape))
            if key not in limits:
                theta = kernel(limit_spec(spec, width, input_shape=shape), x,
                               get="ntk")["ntk"]
                limits[key] = _limit_like(theta, n_outputs)

            def task(s, width=width, theta=limits[key]):
                net = FiniteNetwork(spec, width, n_outputs=n_outputs, input_shape=shape,
                                    seed=_seed(seed, s, width))
                return _relative_distance(net.ntk(x), theta)

            distance[i] = _map_seeds(task, seeds, n_jobs, bar)
    finally:
        if bar is not None:
            bar.close()
    slope, se = loglog_slope(widths, distance)
    return InitSweep(str(spec), widths, distance, slope, se, x.shape[0],
                     time.perf_counter() - start)


# ------------------------------------------------------------ all three


@dataclass
class WidthRun:
    """All three experiments at one width (arrays over seeds first).

    Attributes
    ----------
    init_distance : (S,) array
        ‖Θ̂_0 − Θ‖/‖Θ‖ on the kernel inputs.
    movement : (S,) array
        ‖Θ̂_T − Θ̂_0‖/‖Θ̂_0‖ after the training steps.
    final_loss : (S,) array
        Training loss after the last step.
    ntk_row_init, ntk_row_final : (S, P) arrays
        Θ̂(x_0, ·) on the kernel inputs, at t = 0 and t = steps.
    limit_row : (P,) array
        Θ(x_0, ·).
    outputs : (S, M) or (S, M, c) array
        Trained outputs on the test inputs.
    mean, p10, p50, p90 : (M,) or (M, c) arrays
        Limiting Gaussian at t = steps: mean and percentiles.
    inside : float
        Fraction of trained outputs within [p10, p90] (0.8 in the limit).
    """

    width: int
    init_distance: np.ndarray
    movement: np.ndarray
    final_loss: np.ndarray
    ntk_row_init: np.ndarray
    ntk_row_final: np.ndarray
    limit_row: np.ndarray
    outputs: np.ndarray
    mean: np.ndarray
    p10: np.ndarray
    p50: np.ndarray
    p90: np.ndarray

    @property
    def inside(self):
        within = (self.outputs >= self.p10) & (self.outputs <= self.p90)
        return float(within.mean())

    def to_dict(self):
        d = {name: getattr(self, name) for name in self.__dataclass_fields__}
        d["inside"] = self.inside
        return d


@dataclass
class Comparison:
    """Result of :func:`compare`: the three experiments for each width.

    ``to_dict()`` gives everything as JSON-ready lists, ``table()`` the numbers
    as text. ``coordinates`` optionally maps "kernel", "train" and "test" to a
    scalar coordinate of those inputs (the angle on the circle in the demo),
    used by :mod:`limitkernel.plot`.
    """

    spec: str
    widths: list
    seeds: int
    steps: int
    learning_rate: float
    n_train: int
    n_test: int
    n_kernel: int
    runs: list
    init_slope: float
    init_slope_se: float
    movement_slope: float
    movement_slope_se: float
    y_train: np.ndarray
    coordinates: dict = field(default_factory=dict)
    title: str = ""
    seconds: float = 0.0
    torch: dict | None = None

    def run(self, width):
        """The :class:`WidthRun` of one width."""
        for r in self.runs:
            if r.width == width:
                return r
        raise KeyError(f"width {width} was not run; widths: {self.widths}")

    def to_dict(self):
        return _jsonable({
            "title": self.title, "spec": self.spec, "widths": self.widths,
            "seeds": self.seeds, "steps": self.steps, "learning_rate": self.learning_rate,
            "time_t": self.steps, "n_train": self.n_train, "n_test": self.n_test,
            "n_kernel": self.n_kernel, "nominal_coverage": NOMINAL_COVERAGE,
            "init_slope": self.init_slope, "init_slope_se": self.init_slope_se,
            "movement_slope": self.movement_slope,
            "movement_slope_se": self.movement_slope_se, "init_slope_theory": -0.5,
            "summary": [self._row_summary(r) for r in self.runs],
            "runs": [r.to_dict() for r in self.runs],
            "y_train": self.y_train, "coordinates": self.coordinates,
            "seconds": self.seconds, "torch": self.torch,
        })

    @staticmethod
    def _row_summary(r):
        d_mean, d_sd = _summary(r.init_distance)
        m_mean, m_sd = _summary(r.movement)
        return {"width": r.width, "init_distance_mean": d_mean, "init_distance_sd": d_sd,
                "movement_mean": m_mean, "movement_sd": m_sd, "inside_band": r.inside,
                "final_loss_mean": float(np.mean(r.final_loss))}

    def table(self):
        head = self.title or f"spec {self.spec}"
        lines = [
            f"{head}",
            (f"  {self.seeds} seeds per width, {self.steps} steps of learning rate "
            f"{self.learning_rate:g} (time t = {self.steps}), N = {self.n_train} training, "
            f"{self.n_kernel} kernel, {self.n_test} test inputs"),
            (f"  {'width':>7} | {'(1) init distance':>19} | {'(2) NTK movement':>19} | "
            f"{'(3) in 10-90% band':>18} | {'final loss':>10}"),
            (f"  {'':>7} | {'mean':>9} {'sd':>9} | {'mean':>9} {'sd':>9} | "
            f"{'(limit 0.80)':>18} |"),
        ]
        for r in self.runs:
            s = self._row_summary(r)
            lines.append(
                f"  {r.width:>7d} | {s['init_distance_mean']:9.4f} {s['init_distance_sd']:9.4f} | "
                f"{s['movement_mean']:9.2e} {s['movement_sd']:9.2e} | {r.inside:18.2f} | "
                f"{s['final_loss_mean']:10.3e}")
        if self.torch is not None:
            t = self.torch
            lines.append(f"  {'torch':>7} | {t['init_distance']:9.4f} {'':>9} | {'-':>19} | "
                         f"{'-':>18} | {'-':>10}")
            lines.append(f"    torch: the given model as it is, {t['n_params']} parameters, "
                         f"against the limit of its spec {t['spec']}")
        lines.append(f"  log-log slope vs width: (1) {self.init_slope:+.3f} ± "
                     f"{self.init_slope_se:.3f} (theory -1/2); (2) "
                     f"{self.movement_slope:+.3f} ± {self.movement_slope_se:.3f} "
                     "(must be < 0; between -1/2 and -1 expected)")
        return "\n".join(lines)


def compare(spec, x_train, y_train, x_test=None, widths=(64, 256, 1024), seeds=5,
            steps=1000, learning_rate=1.0, x_kernel=None, seed=0, diag_reg=0.0,
            progress=False, title="", n_jobs=None, torch_model=None):
    """Train finite networks of several widths and compare them with the limit.

    Parameters
    ----------
    spec : str or Serial or None
        The architecture (as for :func:`limitkernel.kernel`); None takes that of
        ``torch_model``.
    x_train : (N, d), (N, L, C) or (N, H, W, C) array_like
        Vectors, or for a convolutional spec sequences or images, channels last
        (Neural Tangents' layout; a torch model's inputs are converted to its
        channels-first layout).
    y_train : (N,) or (N, c) array_like
        Regression targets (MSE loss, ½·mean over the N·c targets).
    x_test : (M, ...) array_like, optional
        Inputs for experiment 3, shaped like x_train; default the training inputs.
    widths : sequence of int
        Hidden widths (one per network, shared by its hidden dense layers and
        the output channels of its conv layers).
    seeds : int
        Networks per width.
    steps : int
        Full-batch gradient-descent steps; the limit is evaluated at t = steps
        with the same learning rate (:mod:`limitkernel.predict`'s convention).
    learning_rate : float
    x_kernel : (P, ...) array_like, optional
        Inputs on which the NTKs are compared (experiments 1 and 2); default the
        training inputs. For a CNN the empirical NTK costs more than its
        training steps (see :class:`limitkernel.FiniteNetwork`), so a few dozen
        inputs are usually enough here. Θ(x_kernel[0], ·) is kept for plots.
    seed : int
        Base seed; network s at width n uses ``default_rng([seed, s, n])``.
    diag_reg : float
        Relative diagonal regulariser of the limiting NTK in experiment 3 (see
        :class:`limitkernel.GradientFlowEnsemble`); needed when the training NTK
        is singular.
    progress : bool
        tqdm progress bar on a terminal (``pip install 'limitkernel[progress]'``).
    title : str
        Shown by ``table()`` and the figures.
    n_jobs : int, optional
        Networks trained at once (default: all cores). With more than one, the
        seeds of a width train on parallel threads with a single-threaded BLAS
        each (needs threadpoolctl, in ``pip install 'limitkernel[progress]'``;
        without it they train one after another).
    torch_model : torch.nn.Module, optional
        A PyTorch model to put beside the limit (``pip install
        'limitkernel[torch]'``): its spec is :func:`limitkernel.from_torch`'s,
        its empirical NTK :func:`limitkernel.empirical_ntk_torch`'s on
        ``x_kernel``, with its parameters as they are (initial or trained) and
        in its mode (dropout counts in training mode). The relative distance
        from the limit of its spec is ``Comparison.torch["init_distance"]``,
        one more row of the table.

    Returns
    -------
    Comparison

    Notes
    -----
    Gradient descent with learning rate η is the Euler discretisation of the
    gradient flow the limit describes; the two agree to O(η λ_max / (N c)),
    λ_max the largest eigenvalue of the training NTK. A learning rate with
    η λ_max / (N c) ≥ 2, for which gradient descent on the limiting model
    diverges, is refused with the largest one that is not.
    """
    start = time.perf_counter()
    torch_spec = None
    if torch_model is not None:
        from .torch_interop import from_torch

        torch_spec = from_torch(torch_model)
    if spec is None and torch_spec is None:
        raise ValueError("give a spec, or a torch_model whose spec to use")
    spec = torch_spec if spec is None else as_spec(spec)
    x_train = check_inputs(x_train, "x_train", spatial=True)
    y = np.asarray(y_train, dtype=np.float64)
    if y.ndim not in (1, 2) or y.shape[0] != x_train.shape[0]:
        raise ValueError(f"y_train must have shape ({x_train.shape[0]},) or "
                         f"({x_train.shape[0]}, c), got {y.shape}")
    n_outputs = 1 if y.ndim == 1 else y.shape[1]
    x_test = x_train if x_test is None else check_inputs(x_test, "x_test", spatial=True)
    x_kernel = x_train if x_kernel is None else check_inputs(x_kernel, "x_kernel",
                                                               spatial=True)
    for name, arr in (("x_test", x_test), ("x_kernel", x_kernel)):
        if arr.shape[1:] != x_train.shape[1:]:
            what = "features" if x_train.ndim == 2 == arr.ndim else "input shape"
            got = (arr.shape[1], x_train.shape[1]) if what == "features" else \
                (arr.shape[1:], x_train.shape[1:])
            raise ValueError(f"{name} has {got[0]} {what} but x_train has {got[1]}; give "
                             "inputs of one shape")
    widths, seeds = _check_widths(widths), _check_seeds(seeds)
    if isinstance(steps, bool) or int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    steps = int(steps)
    torch_row = None if torch_model is None else _torch_row(torch_model, torch_spec, x_kernel)
    bar = _progress(len(widths) * seeds, progress, "train")
    runs, limits = [], {}
    try:
        for width in widths:
            runs.append(_run_width(spec, x_train, y, x_test, x_kernel, width, seeds, steps,
                                   learning_rate, seed, diag_reg, n_outputs, limits, bar,
                                   n_jobs))
    finally:
        if bar is not None:
            bar.close()
    init_slope = loglog_slope(widths, [r.init_distance for r in runs])
    move_slope = loglog_slope(widths, [r.movement for r in runs])
    return Comparison(str(spec), widths, seeds, steps, float(learning_rate),
                      x_train.shape[0], x_test.shape[0], x_kernel.shape[0], runs,
                      init_slope[0], init_slope[1], move_slope[0], move_slope[1], y,
                      title=title, seconds=time.perf_counter() - start, torch=torch_row)


def _torch_row(model, spec, x_kernel):
    """The torch model's empirical NTK on x_kernel against the limit of its spec."""
    from .torch_interop import empirical_ntk_torch

    attr = "in_features" if x_kernel.ndim == 2 else "in_channels"
    n_in = getattr(next((m for m in model.modules() if hasattr(m, attr)), None), attr, None)
    if n_in is not None and n_in != x_kernel.shape[-1]:
        what = "input features" if attr == "in_features" else "input channels"
        raise ValueError(f"the torch model takes {n_in} {what} but the data has "
                         f"{x_kernel.shape[-1]}; give data of the model's input shape "
                         "(channels last)")
    theta = kernel(spec, x_kernel, get="ntk")["ntk"]
    # The data is channels last; a torch model's convolutions take channels first.
    empirical = empirical_ntk_torch(model, x_kernel, channels_last=x_kernel.ndim > 2)
    return {"spec": str(spec), "init_distance": _relative_distance(empirical, theta),
            "n_params": int(sum(p.numel() for p in model.parameters())),
            "ntk_row": _row(empirical), "limit_row": _row(theta)}


def _limit(limit_spec, x_train, y, x_test, x_kernel, steps, learning_rate, diag_reg,
           n_outputs, cache):
    """Limiting NTK on x_kernel and the Gaussian at t = steps, once per limit spec."""
    key = str(limit_spec)
    if key not in cache:
        theta = kernel(limit_spec, x_kernel, get="ntk")["ntk"]
        ensemble = flow_ensemble(limit_spec, x_train, y, learning_rate, diag_reg)
        top = float(np.linalg.eigvalsh(ensemble.train_kernel("ntk"))[-1])
        ratio = top * ensemble.time_scale()
        if ratio >= 2.0:
            raise ValueError(
                f"learning rate {learning_rate:g} is too large: gradient descent on the "
                f"limiting model diverges when η·λ_max(Θ)/(N·c) >= 2, here {ratio:.3g} "
                f"(λ_max = {top:.3g}); use a learning rate below "
                f"{2.0 / ensemble.time_scale() / top * learning_rate:.3g}")
        mean, var = flow_predict(ensemble, x_test, float(steps))
        sd = np.sqrt(np.maximum(var, 0.0))
        if mean.ndim == 2:
            sd = sd[:, None]
        cache[key] = (_limit_like(theta, n_outputs), mean, sd)
    return cache[key]


def flow_ensemble(spec, x_train, y, learning_rate, diag_reg=0.0):
    """A :class:`GradientFlowEnsemble` for vectors, images or sequences."""
    return GradientFlowEnsemble(spec, x_train, y, learning_rate=learning_rate,
                                diag_reg=diag_reg)


def flow_predict(ensemble, x_test, t):
    """Mean (M,) or (M, c) and variance (M,) of the ensemble's outputs at time t."""
    pred = ensemble.predict(x_test, t=t, get="ntk", cov="var")["ntk"]
    return pred.mean, pred.var


def _run_width(spec, x_train, y, x_test, x_kernel, width, seeds, steps, learning_rate,
               seed, diag_reg, n_outputs, cache, bar, n_jobs):
    shape = x_train.shape[1:]
    theta, mean, sd = _limit(limit_spec(spec, width, input_shape=shape), x_train, y, x_test,
                             x_kernel, steps, learning_rate, diag_reg, n_outputs, cache)

    def task(s):
        net = FiniteNetwork(spec, width, n_outputs=n_outputs, input_shape=shape,
                            seed=_seed(seed, s, width))
        hist = net.train(x_train, y, steps, learning_rate, x_test=x_test,
                         record_at=(0, steps), ntk_x=x_kernel)
        ntk0, ntk1 = hist.ntk[0], hist.ntk[-1]
        out = hist.test_outputs[-1]
        return {"init_distance": _relative_distance(ntk0, theta),
                "movement": _relative_distance(ntk1, ntk0),
                "final_loss": hist.loss[-1],
                "ntk_row_init": _row(ntk0), "ntk_row_final": _row(ntk1),
                "outputs": out[:, 0] if y.ndim == 1 else out}

    results = _map_seeds(task, seeds, n_jobs, bar)
    arrays = {k: np.asarray([r[k] for r in results]) for k in results[0]}
    return WidthRun(width=width, limit_row=_row(theta), mean=mean, p10=mean - _Z90 * sd,
                    p50=mean, p90=mean + _Z90 * sd, **arrays)


# ------------------------------------------------------------ Jacot et al., Figures 1 and 2


@dataclass(frozen=True)
class DemoScale:
    """Sizes of the built-in demo (see :data:`DEMO_SCALES`)."""

    fig1_widths: tuple
    fig1_seeds: int
    fig1_steps: int
    fig2_widths: tuple
    fig2_seeds: int
    fig2_steps: int
    sweep_widths: tuple
    sweep_seeds: int
    points: int
    note: str


DEMO_SCALES = {
    "paper": DemoScale((500, 10000), 10, 200, (50, 1000), 10, 1000,
                       (125, 250, 500, 1000, 2000, 4000, 10000), 10, 200,
                       "the sizes of Jacot et al. (2018); estimated at roughly 40 minutes "
                       "and 5 GB of memory on 2 cores"),
    "laptop": DemoScale((500, 2000), 10, 200, (50, 1000), 10, 250,
                        (125, 250, 500, 1000, 2000, 4000), 10, 64,
                        "Figure 1 at widths 500 and 2000 instead of 500 and 10000; "
                        "Figure 2 for 250 steps instead of 1000 (by then the residual on "
                        "the training points has decayed by e^-6 in the limit); "
                        "experiment 1 up to width 4000; 64 points on the circle"),
    "quick": DemoScale((50, 200), 3, 20, (20, 100), 3, 50, (50, 100, 200), 3, 24,
                       "a smoke test: widths up to 200, 3 seeds, 20 and 50 steps"),
}


# Figure 1 trains on f*(x) = x1·x2 at N1 uniformly random angles; Figure 2 on the
# same target at four fixed angles.
_FIG1_N_TRAIN = 4
_FIG2_ANGLES = (-2.4, -0.9, 0.6, 2.0)


def circle(gamma):
    """Points x = (cos γ, sin γ) on the unit circle."""
    gamma = np.asarray(gamma, dtype=np.float64)
    return np.stack([np.cos(gamma), np.sin(gamma)], axis=1)


def _target(x):
    return x[:, 0] * x[:, 1]


@dataclass
class DemoResult:
    """The built-in demo: experiment 1 sweep and the Figure 1 and 2 comparisons."""

    scale: str
    note: str
    sweep: InitSweep
    fig1: Comparison
    fig2: Comparison
    seconds: float

    def to_dict(self):
        return _jsonable({"scale": self.scale, "scaled_down": self.note,
                          "spec": self.fig1.spec, "seconds": self.seconds,
                          "experiment_1_sweep": self.sweep.to_dict(),
                          "figure_1": self.fig1.to_dict(), "figure_2": self.fig2.to_dict()})

    def table(self):
        return f"{self.sweep.table()}\n\n{self.fig1.table()}\n\n{self.fig2.table()}"


def jacot_demo(scale="laptop", spec=DEMO_SPEC, progress=False, seed=0, points=None,
               report=None):
    """Jacot et al. (2018), Figures 1 and 2, and experiment 1 over more widths.

    ReLU, depth 4, w_std = 1, b_std = 0.1 (NTK parameterisation), learning rate
    1, loss ½·MSE, inputs on the unit circle x = (cos γ, sin γ), target
    f*(x) = x1·x2.

    * Figure 1: Θ̂(x0, x), x0 = (1, 0), at t = 0 and after the training steps
      on 4 random points of the circle, for two widths.
    * Figure 2: outputs after training on 4 points, against the limiting
      Gaussian's percentiles.
    * Experiment 1 over a sweep of widths at initialisation.

    Parameters
    ----------
    scale : {"quick", "laptop", "paper"}
        Sizes (:data:`DEMO_SCALES`); "laptop" takes about two minutes on 2 cores.
    points : int, optional
        Points on the circle where kernels and outputs are compared (default
        from the scale).
    report : callable, optional
        Called with each part's result (sweep, Figure 1, Figure 2) as it is done.

    Returns
    -------
    DemoResult
    """
    if scale not in DEMO_SCALES:
        raise ValueError(f"scale must be one of {sorted(DEMO_SCALES)}, got {scale!r}")
    sizes = DEMO_SCALES[scale]
    start = time.perf_counter()
    points = sizes.points if points is None else int(points)
    if points < 2:
        raise ValueError(f"points must be at least 2, got {points}")
    gamma = np.linspace(-np.pi, np.pi, points + 1)[:-1]
    gamma = np.roll(gamma, -int(np.argmin(np.abs(gamma))))  # x0 = (1, 0) first
    grid = circle(gamma)
    report = report or (lambda part: None)
    sweep = ntk_distance_at_init(spec, grid, sizes.sweep_widths, sizes.sweep_seeds, seed,
                                 progress=progress)
    report(sweep)
    gamma1 = np.random.default_rng(seed).uniform(-np.pi, np.pi, _FIG1_N_TRAIN)
    x1 = circle(gamma1)
    fig1 = compare(spec, x1, _target(x1), grid, sizes.fig1_widths, sizes.fig1_seeds,
                   sizes.fig1_steps, 1.0, x_kernel=grid, seed=seed, progress=progress,
                   title="Figure 1: NTK at init and after training (f* = x1 x2, "
                         f"{_FIG1_N_TRAIN} points)")
    fig1.coordinates = {"kernel": gamma, "test": gamma, "train": gamma1}
    report(fig1)
    gamma2 = np.array(_FIG2_ANGLES)
    x2 = circle(gamma2)
    fig2 = compare(spec, x2, _target(x2), grid, sizes.fig2_widths, sizes.fig2_seeds,
                   sizes.fig2_steps, 1.0, x_kernel=grid, seed=seed, progress=progress,
                   title="Figure 2: trained outputs against the limiting Gaussian "
                         "(4 points)")
    fig2.coordinates = {"kernel": gamma, "test": gamma, "train": gamma2}
    report(fig2)
    return DemoResult(scale, sizes.note, sweep, fig1, fig2, time.perf_counter() - start)


# ------------------------------------------------------------ command-line runners


def write_json(path, data):
    """Write ``data`` as JSON atomically (temporary file, then rename)."""
    with atomic_path(path, ".json") as tmp, open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, allow_nan=False)
    return path


def _prepare_dir(out_dir):
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create the output directory {out_dir}: {err.strerror}") \
            from None
    return out_dir


def _figures(draw, echo):
    """Draw figures if matplotlib is there; say how to get them otherwise."""
    from .plot import have_matplotlib

    if not have_matplotlib():
        echo("figures skipped: matplotlib is not installed "
             "(pip install 'limitkernel[plot]' to get them)")
        return []
    return draw()


def run_demo(out_dir="limitkernel-demo", scale="laptop", spec=DEMO_SPEC, points=None,
             progress=True, echo=print):
    """``limitkernel demo``: run :func:`jacot_demo`, print its table, write files.

    Writes ``summary.json`` and, with matplotlib, ``figure1_ntk.png``,
    ``figure2_outputs.png`` and ``convergence.png`` into ``out_dir``.
    """
    from .plot import plot_demo

    sizes = DEMO_SCALES.get(scale)
    if sizes is None:
        raise ValueError(f"scale must be one of {sorted(DEMO_SCALES)}, got {scale!r}")
    _prepare_dir(out_dir)
    echo(f"limitkernel demo: finite networks against the infinite-width limit\n"
         f"network: {as_spec(spec)}\n"
         f"inputs on the unit circle x = (cos γ, sin γ), target f*(x) = x1·x2, learning "
         f"rate 1, loss ½·MSE (Jacot et al. 2018, Figures 1 and 2)\n"
         f"scale {scale!r}: {sizes.note}"
         + ("" if scale == "paper" else "; --scale paper for the paper's sizes") + "\n")
    result = jacot_demo(scale, spec, progress=progress, points=points,
                        report=lambda part: echo(part.table() + "\n"))
    written = [write_json(os.path.join(out_dir, "summary.json"), result.to_dict())]
    written += _figures(lambda: plot_demo(result, out_dir), echo)
    echo(f"\nfinished in {result.seconds:.1f} s; wrote {', '.join(written)}")
    return result


def run_compare(spec, x_train, y_train, x_test=None, widths=(64, 256, 1024), seeds=5,
                steps=1000, learning_rate=1.0, out_dir="limitkernel-compare", diag_reg=0.0,
                progress=True, echo=print, torch_model=None, x_kernel=None):
    """``limitkernel compare``: run :func:`compare`, print its table, write files.

    Writes ``summary.json`` and, with matplotlib, ``ntk_rows.png``,
    ``outputs.png`` and ``convergence.png`` into ``out_dir``.
    """
    from .plot import plot_convergence, plot_ntk_rows, plot_outputs

    _prepare_dir(out_dir)
    result = compare(spec, x_train, y_train, x_test, widths, seeds, steps, learning_rate,
                     x_kernel=x_kernel, diag_reg=diag_reg, progress=progress,
                     torch_model=torch_model,
                     title="" if spec is None else f"{as_spec(spec)}")
    echo(result.table())

    def draw():
        return [plot_ntk_rows(result, os.path.join(out_dir, "ntk_rows.png")),
                plot_outputs(result, os.path.join(out_dir, "outputs.png")),
                plot_convergence(result, os.path.join(out_dir, "convergence.png"))]

    written = [write_json(os.path.join(out_dir, "summary.json"), result.to_dict())]
    written += _figures(draw, echo)
    echo(f"\nfinished in {result.seconds:.1f} s; wrote {', '.join(written)}")
    return result
