"""Figures of the finite-width experiments (optional: needs matplotlib).

Each function draws one PNG from a result of :mod:`limitkernel.experiments`
and returns the path. Figures are made with matplotlib's object interface and
the Agg canvas, so no global pyplot state or display is touched.
``pip install 'limitkernel[plot]'`` installs matplotlib.
"""

from __future__ import annotations

import os

import numpy as np

from ._io import atomic_path

__all__ = [
    "have_matplotlib",
    "plot_convergence",
    "plot_demo",
    "plot_ntk_rows",
    "plot_outputs",
]

_INSTALL = "figures need matplotlib: pip install 'limitkernel[plot]'"
_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def have_matplotlib():
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(ncols=1, width=6.4, height=4.4):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(_INSTALL) from None
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save(fig, path):
    """Write the PNG atomically: a failed run leaves no half-written file."""
    path = os.fspath(path)
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return path


def _axis(comparison, key, values):
    """x coordinate for plotting: the stored coordinate, else order by ``values``."""
    coord = comparison.coordinates.get(key)
    if coord is not None:
        coord = np.asarray(coord)
        return coord, np.argsort(coord, kind="stable"), "γ (angle on the circle)"
    return np.argsort(np.argsort(values, kind="stable")), np.argsort(values, kind="stable"), \
        "input, ordered by the limit"


def plot_ntk_rows(comparison, path):
    """Jacot et al. Figure 1: Θ̂(x0, x) at t = 0 and after training, and Θ(x0, x).

    One thin line per network: solid at initialisation, dashed after
    ``comparison.steps`` steps; colour by width; the limit in black.
    """
    fig, (ax,) = _figure()
    limit = comparison.runs[0].limit_row
    coord, order, label = _axis(comparison, "kernel", -limit)
    for run, colour in zip(comparison.runs, _COLOURS * 4):
        for s in range(run.ntk_row_init.shape[0]):
            first = s == 0
            ax.plot(coord[order], run.ntk_row_init[s, order], color=colour, lw=0.8,
                    alpha=0.7, label=f"n = {run.width}, t = 0" if first else None)
            ax.plot(coord[order], run.ntk_row_final[s, order], color=colour, lw=0.8,
                    ls="--", alpha=0.7,
                    label=f"n = {run.width}, t = {comparison.steps}" if first else None)
    for run in comparison.runs[1:]:
        if not np.allclose(run.limit_row, limit):
            ax.plot(coord[order], run.limit_row[order], color="0.4", lw=1.5)
    ax.plot(coord[order], limit[order], color="black", lw=2.0, label="n = ∞ (limit)")
    ax.set_xlabel(label)
    ax.set_ylabel("Θ(x₀, x)")
    ax.set_title(comparison.title or "empirical NTK against the limit", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_outputs(comparison, path):
    """Jacot et al. Figure 2: trained outputs against the limiting percentiles.

    Thin lines: the trained networks (colour by width); black: the limiting
    mean (= median) with the 10–90% band shaded; dots: training targets when
    the inputs have a coordinate. Only the first output is drawn.
    """
    fig, (ax,) = _figure()
    widest = comparison.runs[-1]

    def col0(a):
        return a if a.ndim == 1 else a[..., 0]

    coord, order, label = _axis(comparison, "test", col0(widest.mean))
    for run, colour in zip(comparison.runs, _COLOURS * 4):
        outputs = run.outputs if run.outputs.ndim == 2 else run.outputs[..., 0]
        for s in range(outputs.shape[0]):
            ax.plot(coord[order], outputs[s, order], color=colour, lw=0.8, alpha=0.7,
                    label=f"n = {run.width}" if s == 0 else None)
    mean, p10, p90 = col0(widest.mean), col0(widest.p10), col0(widest.p90)
    ax.fill_between(coord[order], p10[order], p90[order], color="0.6", alpha=0.35,
                    label="limit: 10–90%")
    ax.plot(coord[order], mean[order], color="black", lw=2.0, label="limit: mean = 50%")
    train = comparison.coordinates.get("train")
    if train is not None:
        y = comparison.y_train if comparison.y_train.ndim == 1 else comparison.y_train[:, 0]
        ax.plot(np.asarray(train), y, "o", color="black", ms=6, label="training points")
    ax.set_xlabel(label)
    ax.set_ylabel("f(x)")
    ax.set_title(comparison.title or f"outputs after {comparison.steps} steps", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _loglog(ax, widths, values, slope, se, title, ylabel, reference=-0.5):
    widths = np.asarray(widths, dtype=float)
    values = np.asarray(values, dtype=float)
    mean = values.mean(axis=1)
    sd = values.std(axis=1, ddof=1) if values.shape[1] > 1 else np.zeros_like(mean)
    ax.errorbar(widths, mean, yerr=sd, fmt="o", color="tab:blue", capsize=3,
                label="mean ± sd over seeds")
    if np.isfinite(slope):
        logw = np.log(widths)
        intercept = np.mean(np.log(mean)) - slope * np.mean(logw)
        ax.plot(widths, np.exp(intercept + slope * logw), color="tab:blue",
                label=f"fit: slope {slope:+.2f} ± {se:.2f}")
        ref = np.exp(np.mean(np.log(mean)) + reference * (logw - np.mean(logw)))
        ax.plot(widths, ref, color="0.5", ls=":", label=f"slope {reference:g}")
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(widths, [f"{w:g}" for w in widths])
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("width n")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)


def plot_convergence(sweep, path, comparison=None):
    """Experiment 1 (and 2): relative distances against width on log–log axes.

    ``sweep`` is an :class:`~limitkernel.experiments.InitSweep` or a
    :class:`~limitkernel.experiments.Comparison` (then its init distances);
    with ``comparison`` (or a Comparison as ``sweep``), a second panel shows the
    NTK's movement during training.
    """
    if hasattr(sweep, "runs"):  # a Comparison
        comparison = sweep if comparison is None else comparison
        widths = sweep.widths
        values = [r.init_distance for r in sweep.runs]
        slope, se = sweep.init_slope, sweep.init_slope_se
    else:
        widths, values, slope, se = sweep.widths, sweep.distance, sweep.slope, sweep.slope_se
    fig, axes = _figure(ncols=2 if comparison is not None else 1)
    _loglog(axes[0], widths, values, slope, se, "(1) at initialisation",
            "‖NTK(n) − NTK(∞)‖ / ‖NTK(∞)‖")
    if comparison is not None:
        _loglog(axes[1], comparison.widths, [r.movement for r in comparison.runs],
                comparison.movement_slope, comparison.movement_slope_se,
                f"(2) during training ({comparison.steps} steps)", "‖NTK(t) − NTK(0)‖ / ‖NTK(0)‖",
                reference=-1.0)
    return _save(fig, path)


def plot_demo(result, out_dir):
    """The demo's three figures; returns their paths."""
    return [
        plot_ntk_rows(result.fig1, os.path.join(out_dir, "figure1_ntk.png")),
        plot_outputs(result.fig2, os.path.join(out_dir, "figure2_outputs.png")),
        plot_convergence(result.sweep, os.path.join(out_dir, "convergence.png"),
                         comparison=result.fig1),
    ]
