"""End-to-end command line: real subprocesses, files in a temporary directory."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import limitkernel as lk

SPEC = "3 * [dense(w_std=1.5, b_std=0.05), relu], dense(w_std=1.5, b_std=0.05)"


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "limitkernel.cli", *args],
                          capture_output=True, text=True, cwd=cwd, check=False)


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    x, x2 = rng.standard_normal((20, 5)), rng.standard_normal((7, 5))
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "x2.npz", x=x2)
    np.savetxt(tmp_path / "x.csv", x, delimiter=",", header="a,b,c,d,e", comments="")
    return x, x2


def test_kernel_writes_npz_matching_python(tmp_path, inputs):
    x, x2 = inputs
    out = tmp_path / "k.npz"
    result = run("kernel", "--arch", SPEC, "--x", str(tmp_path / "x.npy"),
                 "--x2", str(tmp_path / "x2.npz"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    expected = lk.kernel(SPEC, x, x2)
    with np.load(out) as data:
        assert sorted(data.files) == ["nngp", "ntk"]
        np.testing.assert_array_equal(data["ntk"], expected["ntk"])
        np.testing.assert_array_equal(data["nngp"], expected["nngp"])


def test_kernel_csv_json_spec_float32_and_get(tmp_path, inputs):
    x, _ = inputs
    spec_file = tmp_path / "arch.json"
    spec_file.write_text(lk.spec.to_json(SPEC))
    out = tmp_path / "k.npz"
    result = run("kernel", "--arch", str(spec_file), "--x", str(tmp_path / "x.csv"),
                 "--get", "ntk", "--dtype", "float32", "--out", str(out))
    assert result.returncode == 0, result.stderr
    with np.load(out) as data:
        assert data.files == ["ntk"]
        assert data["ntk"].dtype == np.float32
        np.testing.assert_allclose(data["ntk"], lk.kernel(SPEC, x)["ntk"], rtol=1e-7)


@pytest.mark.parametrize("args, fragment", [
    (["--arch", "dense, rleu, dense"], "unknown layer 'rleu'"),
    (["--arch", "dense(w_std=1.5 b_std=0.1), dense"], "bad spec at character 17"),
    (["--arch", SPEC, "--x2", "missing.npy"], "input file not found: missing.npy"),
    (["--arch", SPEC, "--get", "cov"], "get must name"),
])
def test_errors_are_one_line_without_traceback_or_output(tmp_path, inputs, args, fragment):
    argv = ["kernel", "--x", str(tmp_path / "x.npy"), "--out", str(tmp_path / "k.npz")]
    result = run(*argv, *args, cwd=tmp_path)
    assert result.returncode == 2
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "k.npz")
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".npz") and f != "x2.npz"]


def test_bad_input_values(tmp_path):
    np.save(tmp_path / "bad.npy", np.array([[1.0, np.nan], [0.0, 1.0]]))
    result = run("kernel", "--arch", SPEC, "--x", str(tmp_path / "bad.npy"),
                 "--out", str(tmp_path / "k.npz"))
    assert result.returncode == 2
    assert "NaN or inf (first at row 0, column 1" in result.stderr


def test_activations_lists_every_activation():
    result = run("activations")
    assert result.returncode == 0
    names = {line.split()[0] for line in result.stdout.splitlines()[1:] if line.strip()}
    assert set(lk.ACTIVATIONS) <= names
    assert "Hermite" in result.stdout and "closed form" in result.stdout


def test_demo_summarises_the_unit_circle(tmp_path):
    out = tmp_path / "demo.npz"
    result = run("demo", "--quick", "--points", "64", "--out", str(out),
                 "--out-dir", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr
    assert "unit circle" in result.stdout
    with np.load(out) as data:
        x = data["x"]
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0)
        expected = lk.kernel("4 * [dense(b_std=0.1), relu], dense(b_std=0.1)", x)
        np.testing.assert_array_equal(data["ntk"], expected["ntk"])


def test_spec_json_round_trip_via_cli_file(tmp_path, inputs):
    spec_file = tmp_path / "arch.txt"
    spec_file.write_text(SPEC)
    out = tmp_path / "k.npz"
    result = run("kernel", "--arch", str(spec_file), "--x", str(tmp_path / "x.npy"),
                 "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert json.loads(lk.spec.to_json(SPEC))["layers"][0]["layer"] == "dense"
