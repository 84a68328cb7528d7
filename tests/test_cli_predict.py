"""End-to-end tests of ``limitkernel predict`` and ``limitkernel check``."""

import numpy as np
import pytest
from numpy.testing import assert_allclose

import limitkernel as lk
from limitkernel.cli import main

SPEC = "dense(w_std=1.5, b_std=0.05), relu, dense(w_std=1.5, b_std=0.05)"


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    x, xs = rng.standard_normal((30, 3)), rng.standard_normal((8, 3))
    y = np.sin(x @ np.array([1.0, -0.5, 0.3]))
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez(tmp_path / "test.npz", x=xs)
    return tmp_path, x, y, xs


def run(*argv):
    return main([str(a) for a in argv])


def test_predict_writes_one_slice_per_time(files, capsys):
    path, x, y, xs = files
    out = path / "pred.npz"
    assert run("predict", "--arch", SPEC, "--train", path / "train.npz", "--test",
               path / "test.npz", "--time", "10,100", "--time", "inf", "--lr", "0.5",
               "--diag-reg", "1e-6", "--out", out) == 0
    assert "ntk_mean" in capsys.readouterr().out
    with np.load(out) as data:
        assert sorted(data.files) == ["nngp_cov", "nngp_mean", "ntk_cov", "ntk_mean", "times"]
        assert_allclose(data["times"], [10.0, 100.0, np.inf])
        ref = lk.predict_ensemble(SPEC, x, y, xs, t=[10.0, 100.0, np.inf], learning_rate=0.5,
                                  diag_reg=1e-6, cov="full")
        for mode in ("ntk", "nngp"):
            assert data[f"{mode}_mean"].shape == (3, 8)
            assert data[f"{mode}_cov"].shape == (3, 8, 8)
            assert_allclose(data[f"{mode}_mean"], ref[mode].mean, rtol=1e-12)
            assert_allclose(data[f"{mode}_cov"], ref[mode].cov, rtol=1e-12, atol=1e-15)


def test_predict_from_csv_with_target_columns(files):
    path, x, _, xs = files
    y2 = np.stack([np.cos(x[:, 0]), x[:, 1] ** 2], axis=1)
    np.savetxt(path / "train.csv", np.hstack([x, y2]), delimiter=",",
               header="a,b,c,y1,y2", comments="")
    np.savetxt(path / "test.csv", xs, delimiter=",")
    out = path / "pred.npz"
    assert run("predict", "--arch", SPEC, "--train", path / "train.csv", "--y-columns", 2,
               "--test", path / "test.csv", "--mode", "ntk", "--var-only", "--out", out) == 0
    with np.load(out) as data:
        assert sorted(data.files) == ["ntk_mean", "ntk_var", "times"]
        ref = lk.predict_ensemble(SPEC, x, y2, xs, t=[np.inf], get="ntk", cov="var")["ntk"]
        assert data["ntk_mean"].shape == (1, 8, 2)
        assert_allclose(data["ntk_mean"], ref.mean, rtol=1e-10)
        assert_allclose(data["ntk_var"], ref.var, rtol=1e-8, atol=1e-14)


def test_predict_mean_only(files):
    path, *_ = files
    out = path / "pred.npz"
    assert run("predict", "--arch", SPEC, "--train", path / "train.npz", "--test",
               path / "test.npz", "--mode", "nngp", "--mean-only", "--out", out) == 0
    with np.load(out) as data:
        assert sorted(data.files) == ["nngp_mean", "times"]


@pytest.mark.parametrize("extra, message", [
    (["--time", "soon"], "--time: cannot read 'soon'"),
    (["--mode", "gp"], "--mode must name ntk and/or nngp"),
    (["--diag-reg", "-1"], "diag_reg must be a finite number >= 0"),
])
def test_predict_bad_arguments(files, capsys, extra, message):
    path, *_ = files
    out = path / "pred.npz"
    assert run("predict", "--arch", SPEC, "--train", path / "train.npz", "--test",
               path / "test.npz", "--out", out, *extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_predict_duplicate_inputs_fail_naming_the_fix(files, capsys):
    path, x, y, _ = files
    np.savez(path / "dup.npz", x=np.vstack([x, x[4]]), y=np.append(y, 0.0))
    out = path / "pred.npz"
    assert run("predict", "--arch", SPEC, "--train", path / "dup.npz", "--test",
               path / "test.npz", "--out", out) == 2
    err = capsys.readouterr().err
    assert "inputs 4 and 30 are identical" in err and "diag_reg=" in err
    assert err.count("\n") == 1 and not out.exists()


def test_predict_training_file_needs_targets(files, capsys):
    path, *_ = files
    assert run("predict", "--arch", SPEC, "--train", path / "test.npz", "--test",
               path / "test.npz", "--out", path / "p.npz") == 2
    assert "must hold arrays x and y" in capsys.readouterr().err


def test_check_prints_report_and_exit_status(files, capsys):
    path, x, _, _ = files
    assert run("check", "--arch", SPEC, "--x", path / "train.npz") == 0
    text = capsys.readouterr().out
    assert "NTK on 30 inputs: positive definite" in text
    assert "NNGP on 30 inputs: positive definite" in text and "condition number" in text
    np.save(path / "dup.npy", np.vstack([x, x[:2]]))
    with pytest.raises(SystemExit) as exit_info:
        run("check", "--arch", SPEC, "--x", path / "dup.npy", "--mode", "ntk")
    assert exit_info.value.code == 1
    text = capsys.readouterr().out
    assert "NOT positive definite" in text and "identical inputs" in text
    assert run("check", "--arch", SPEC, "--x", path / "dup.npy", "--mode", "ntk",
               "--diag-reg", "1e-6") == 0
