"""Width sweeps against the limit, the built-in demo, and their command line.

The statistical checks use fixed seeds and tolerances from the seeds' spread:
the slope of experiment 1 against the theoretical −1/2 with its standard error,
and the fraction of trained outputs inside the limiting 10–90 % band against
0.8 with a binomial error. Command-line runs are real subprocesses writing into
a temporary directory.
"""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from limitkernel import experiments
from limitkernel.experiments import compare, loglog_slope, ntk_distance_at_init
from limitkernel.plot import have_matplotlib


def test_loglog_slope_error_is_calibrated():
    # Synthetic sweeps with a known slope −1/2 and log-normal scatter: the
    # interval slope ± 2 se must hold the truth in about 95 % of 400 sweeps
    # (binomial sd √(0.95·0.05/400) = 0.011; 3 sd either side).
    rng = np.random.default_rng(0)
    widths = np.array([50, 100, 200, 400, 800, 1600])
    hits = 0
    for _ in range(400):
        values = 2.0 * widths[:, None] ** -0.5 * np.exp(0.3 * rng.standard_normal((6, 20)))
        slope, se = loglog_slope(widths, values)
        hits += abs(slope + 0.5) <= 2 * se
    assert 0.95 - 0.033 <= hits / 400 <= 0.95 + 0.033
    assert all(math.isnan(v) for v in loglog_slope([10], [[1.0, 2.0]]))


def test_init_distance_falls_as_width_to_the_minus_one_half():
    # Experiment 1 on a depth-2 ReLU network: the fitted slope is within 3 of its
    # standard errors (from the spread over 16 seeds per width) of −1/2, and that
    # error is small enough (< 0.1) for the test to tell −1/2 from −1/4 or −1.
    x = np.random.default_rng(0).standard_normal((8, 3))
    spec = "2 * [dense(w_std=1.4, b_std=0.2), relu], dense(w_std=1.4, b_std=0.2)"
    sweep = ntk_distance_at_init(spec, x, (64, 128, 256, 512, 1024), seeds=16, seed=0)
    assert sweep.distance.shape == (5, 16)
    assert sweep.slope_se < 0.1
    assert abs(sweep.slope + 0.5) <= 3 * sweep.slope_se
    assert np.all(np.diff(sweep.distance.mean(axis=1)) < 0)
    json.dumps(sweep.to_dict(), allow_nan=False)


@pytest.fixture(scope="module")
def band_run():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3))
    y = np.sin(x[:, 0]) + 0.5 * x[:, 1]
    x_test = rng.standard_normal((3, 3))
    spec = "dense(w_std=1.5, b_std=0.1), erf, dense(w_std=1.5, b_std=0.1)"
    return compare(spec, x, y, x_test, widths=(64, 512), seeds=200, steps=100,
                   learning_rate=0.5, seed=1)


def test_trained_outputs_fall_in_the_band_as_often_as_it_says(band_run):
    # Each seed contributes the fraction of its 3 test outputs inside [p10, p90];
    # those fractions are independent over seeds with mean 0.8 in the limit and
    # variance at most 0.8·0.2 (however the 3 points correlate), so the mean over
    # 200 seeds is within 3·√(0.16/200) = 0.085 of 0.8. Per test point the count
    # is Binomial(200, 0.8), within 3·√(200·0.16) = 17 of 160.
    wide = band_run.run(512)
    assert abs(wide.inside - 0.8) <= 3 * math.sqrt(0.16 / 200)
    inside = (wide.outputs >= wide.p10) & (wide.outputs <= wide.p90)
    assert np.all(np.abs(inside.sum(axis=0) - 160) <= 17)
    # The percentiles are those of the limiting Gaussian.
    sd = (wide.p90 - wide.mean) / 1.2815515655446004
    np.testing.assert_allclose(wide.p10, wide.mean - 1.2815515655446004 * sd)
    np.testing.assert_array_equal(wide.p50, wide.mean)


def test_ntk_moves_less_in_wider_networks(band_run):
    narrow, wide = band_run.run(64), band_run.run(512)
    assert wide.movement.mean() < narrow.movement.mean()
    assert band_run.movement_slope + 3 * band_run.movement_slope_se < 0
    assert band_run.init_slope + 3 * band_run.init_slope_se < 0


def test_comparison_is_plain_json(band_run):
    data = json.loads(json.dumps(band_run.to_dict(), allow_nan=False))
    assert data["widths"] == [64, 512] and data["seeds"] == 200
    assert [row["width"] for row in data["summary"]] == [64, 512]
    assert len(data["runs"][1]["outputs"]) == 200
    assert "log-log slope" in band_run.table()


def test_too_large_learning_rate_is_refused_with_the_fix():
    x = np.random.default_rng(0).standard_normal((4, 3))
    with pytest.raises(ValueError, match="use a learning rate below"):
        compare("dense(w_std=1.5), relu, dense(w_std=1.5)", x, x[:, 0], widths=(8,),
                seeds=1, steps=1, learning_rate=100.0)


def test_multi_output_compare_runs():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((5, 2)), rng.standard_normal((5, 2))
    result = compare("dense(b_std=0.1), relu, dense(b_std=0.1)", x, y, widths=(16, 32),
                     seeds=2, steps=5, learning_rate=0.5)
    assert result.run(16).outputs.shape == (2, 5, 2)
    assert result.run(16).mean.shape == (5, 2)


def test_quick_demo_in_python():
    result = experiments.jacot_demo("quick")
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["scale"] == "quick" and data["scaled_down"]
    gamma = np.asarray(result.fig1.coordinates["kernel"])
    assert gamma[0] == 0.0  # x0 = (1, 0) is the first kernel input
    assert result.fig2.n_train == 4 and result.fig1.widths == [50, 200]


# ------------------------------------------------------------ command line


def run(*args):
    return subprocess.run([sys.executable, "-m", "limitkernel.cli", *args],
                          capture_output=True, text=True, check=False)


def test_cli_demo_quick_writes_summary_and_figures(tmp_path):
    out = tmp_path / "demo"
    result = run("demo", "--quick", "--out-dir", str(out))
    assert result.returncode == 0, result.stderr
    assert "experiment 1" in result.stdout and "Figure 2" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"experiment_1_sweep", "figure_1", "figure_2", "scaled_down"}
    figures = ["figure1_ntk.png", "figure2_outputs.png", "convergence.png"]
    if have_matplotlib():
        for name in figures:
            assert (out / name).read_bytes()[:4] == b"\x89PNG"
    else:
        assert "pip install 'limitkernel[plot]'" in result.stdout


def test_cli_compare_on_npz_and_csv(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3))
    y = np.tanh(x[:, 0])
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savetxt(tmp_path / "train.csv", np.column_stack([x, y]), delimiter=",")
    np.save(tmp_path / "test.npy", rng.standard_normal((4, 3)))
    spec = "dense(w_std=1.2, b_std=0.1), relu, dense(w_std=1.2, b_std=0.1)"
    for data in ("train.npz", "train.csv"):
        out = tmp_path / f"out-{data}"
        result = run("compare", "--arch", spec, "--data", str(tmp_path / data),
                     "--test", str(tmp_path / "test.npy"), "--widths", "16,64",
                     "--seeds", "3", "--steps", "10", "--lr", "0.5", "--out-dir", str(out))
        assert result.returncode == 0, result.stderr
        summary = json.loads((out / "summary.json").read_text())
        assert summary["widths"] == [16, 64] and summary["n_test"] == 4
        assert summary["steps"] == 10 and summary["learning_rate"] == 0.5
        if have_matplotlib():
            assert (out / "outputs.png").exists() and (out / "convergence.png").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--widths", "16,abc"], "--widths: expected comma-separated integers"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--data", "MISSING"], "input file not found"),
    (["--lr", "1000"], "use a learning rate below"),
])
def test_cli_compare_errors_are_one_line(tmp_path, args, fragment):
    x = np.random.default_rng(0).standard_normal((4, 2))
    np.savez(tmp_path / "train.npz", x=x, y=x[:, 0])
    base = {"--arch": "dense(w_std=2), relu, dense(w_std=2)",
            "--data": str(tmp_path / "train.npz"), "--widths": "8", "--seeds": "1",
            "--steps": "2", "--out-dir": str(tmp_path / "out")}
    for key, value in zip(args[::2], args[1::2]):
        base[key] = str(tmp_path / "missing.npz") if value == "MISSING" else value
    result = run("compare", *[item for pair in base.items() for item in pair])
    assert result.returncode == 2
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "summary.json").exists()


def test_without_matplotlib_the_table_and_json_still_come(tmp_path, monkeypatch):
    monkeypatch.setattr("limitkernel.plot.have_matplotlib", lambda: False)
    lines = []
    x = np.random.default_rng(0).standard_normal((4, 2))
    experiments.run_compare("dense, relu, dense", x, x[:, 0], widths=(8,), seeds=2, steps=2,
                            learning_rate=0.5, out_dir=str(tmp_path), echo=lines.append)
    text = "\n".join(lines)
    assert "figures skipped" in text and "pip install 'limitkernel[plot]'" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
