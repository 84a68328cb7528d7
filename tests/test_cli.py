"""End-to-end command line: real subprocesses, files in a temporary directory."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import limitkernel as lk
from limitkernel import _numba, cli
from limitkernel.cli import main

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


def test_kernel_with_float32_products(tmp_path, inputs):
    x, _ = inputs
    out = tmp_path / "k.npz"
    result = run("kernel", "--arch", SPEC, "--x", str(tmp_path / "x.npy"), "--dtype",
                 "float32", "--precision", "float32", "--out", str(out))
    assert result.returncode == 0, result.stderr
    expected = lk.kernel(SPEC, x, dtype="float32", precision="float32")
    with np.load(out) as data:
        for kind in ("nngp", "ntk"):
            np.testing.assert_array_equal(data[kind], expected[kind])


@pytest.mark.parametrize("args, fragment", [
    (["--arch", SPEC, "--precision", "float32"],
     "--precision float32 (input products in float32) is for float32 output only: add "
     "--dtype float32"),
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
    # A cold kernel cache adds its one notice line before the work starts.
    lines = [line for line in result.stderr.strip().splitlines()
             if not line.startswith("limitkernel: compiling kernels")]
    assert len(lines) == 1
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


# ---------------------------------------------------------------- robustness


def call(argv, capsys):
    """Run the command line in this process: (exit status, stdout, stderr)."""
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status, err, fragment):
    assert status == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("limitkernel"), err
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("arch, fragment", [
    ("dense(w_std=1e200), relu, dense", "lower w_std"),
    ("dense, leaky_relu(alpha=1e308), dense", "lower alpha"),
    ("dense, exp(b=1e300), dense", "lower b"),
    ("dense, sin(b=1e300), dense", "lower b"),
    ("dense, residual(alpha=1e200)[relu, dense], dense", "lower alpha"),
    ("99999999999999999999 * [dense]", "100000 layers a spec may hold"),
    ("100000000 * [dense, relu], dense", "100000 layers a spec may hold"),
    ('{"layers": [{"layer": 5}]}', "NAME a string"),
    ('{"layers": [{"layer": null}]}', "NAME a string"),
    ('{"layers": [{"layer": ["dense"]}]}', "NAME a string"),
    ("[" * 500 + "dense" + "]" * 500, "nest more than 50 deep"),
    ('{"layers": ' + "[" * 100000 + "]" * 100000 + "}", "nests too deeply"),
    ("dense(w_std=1, w_std=2), dense", "given twice"),
    ("dense, 2 * [sin(b=1e100), dense]", "the NTK Θ(x, x) overflows"),
], ids=lambda value: value if len(value) < 40 else value[:37] + "...")
def test_bad_specs_fail_on_one_line(tmp_path, inputs, capsys, arch, fragment):
    status, _, err = call(["kernel", "--arch", arch, "--x", tmp_path / "x.npy", "--out",
                           tmp_path / "k.npz"], capsys)
    assert_one_line_error(status, err, fragment)
    assert not os.path.exists(tmp_path / "k.npz")


def test_bad_files_and_options_fail_on_one_line(tmp_path, inputs, capsys):
    x = tmp_path / "x.npy"
    (tmp_path / "text.npy").write_text("1,2\n3,4\n")
    (tmp_path / "text.npz").write_text("1,2\n3,4\n")
    (tmp_path / "spec.json").write_bytes(b"\x93\xff\x00binary")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object))
    np.save(tmp_path / "complex.npy", np.ones((3, 2)) + 1j)
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("dense, relu, dense\n")
    cases = [
        (["--arch", SPEC, "--x", tmp_path / "text.npy"], "is not a .npy file"),
        (["--arch", SPEC, "--x", tmp_path / "text.npz"], "is not a .npz file"),
        (["--arch", SPEC, "--x", tmp_path / "objects.npy"], "holds Python objects"),
        (["--arch", SPEC, "--x", tmp_path / "complex.npy"], "not real numbers"),
        (["--arch", SPEC, "--x", tmp_path], "is a directory"),
        (["--arch", tmp_path / "spec.json", "--x", x], "cannot read the spec file"),
        (["--arch", tmp_path / "missing.json", "--x", x], "is neither a file nor a spec"),
        # found by fuzzing: numpy's "input contained no data" warning, an
        # internal error under warnings as errors
        (["--arch", SPEC, "--x", tmp_path / "empty.csv"], "holds no rows of numbers"),
        (["--arch", SPEC, "--x", tmp_path / "header.csv"], "after its first line"),
    ]
    for args, fragment in cases:
        status, _, err = call(["kernel", *args, "--out", tmp_path / "k.npz"], capsys)
        assert_one_line_error(status, err, fragment)
    store = tmp_path / "store"
    for memory in ("1e999", "inf", "nan", "-1GB", "lots"):
        with pytest.raises(SystemExit) as info:
            main(["kernel", "--arch", SPEC, "--x", str(x), "--out", str(store),
                  f"--memory={memory}"])
        assert info.value.code == 2
        assert_one_line_error(2, capsys.readouterr().err, "expected a finite size")
    assert not store.exists()


def test_usage_errors_are_one_line(capsys):
    # (an argument with a line break, found by fuzzing, is quoted back escaped)
    for argv in (["kernel", "--bogus"], ["nonsense"], [], ["predict", "--arch", "dense"],
                 ["activations", "--arch", "0 * [abrelu],\n0 * [abrelu]"],
                 ["predict", "--lr", "nan", "--arch", "dense", "--train", "a.npz",
                  "--test", "b.npz", "--out", "c.npz"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert "error:" in err and "--help" in err


def test_an_unexpected_exception_is_one_line_asking_for_a_report(monkeypatch, capsys):
    def broken(args):
        raise KeyError("boom")

    monkeypatch.setattr(cli, "_cmd_activations", broken)
    status, _, err = call(["activations"], capsys)
    assert_one_line_error(status, err, "internal error: KeyError: 'boom'; this is a bug, "
                                       "please report it")
    assert "--debug" in err
    for argv in (["--debug", "activations"], ["activations", "--debug"]):
        with pytest.raises(KeyError):
            main(argv)
    monkeypatch.setenv("LIMITKERNEL_DEBUG", "1")
    with pytest.raises(KeyError):
        main(["activations"])


# The CLI's own handler prints the warnings; let them reach it.
@pytest.mark.filterwarnings("default::limitkernel.gram.DegenerateKernelWarning")
def test_warnings_print_one_line_each(tmp_path, capsys):
    np.save(tmp_path / "same.npy", np.ones((4, 3)))
    status, out, err = call(["kernel", "--arch", "dense, relu, dense", "--x",
                             tmp_path / "same.npy", "--out", tmp_path / "k.npz"], capsys)
    assert status == 0 and "wrote" in out
    lines = [line for line in err.splitlines() if "compiling" not in line]
    assert len(lines) == 2, err
    assert all(line.startswith("limitkernel: warning: the ") and
               line.endswith("(DegenerateKernelWarning)") for line in lines)


@pytest.mark.parametrize("cold", [["gram_block"], []])
def test_a_cold_cache_is_announced(tmp_path, inputs, capsys, monkeypatch, cold):
    monkeypatch.setattr(_numba, "cold_kernels", lambda: cold)
    status, _, err = call(["kernel", "--arch", SPEC, "--x", tmp_path / "x.npy", "--out",
                           tmp_path / "k.npz"], capsys)
    assert status == 0
    assert ("limitkernel: compiling kernels (first use only)…" in err) == bool(cold)
