"""How kernels compile: the cache and its fallbacks, cold-cache detection, threads."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import limitkernel as lk
from limitkernel import _numba

PACKAGE = Path(lk.__file__).resolve().parent


def _env(**changes):
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME", "NUMBA_THREADING_LAYER")}
    env["PYTHONPATH"] = str(PACKAGE.parent)
    env.update(changes)
    return env


def test_threads_take_turns_under_the_workqueue_layer():
    # numba's workqueue layer aborts the process (SIGABRT) when two threads run
    # parallel kernels at once.
    script = textwrap.dedent("""
        import threading
        import numba
        import numpy as np
        import limitkernel as lk

        x = np.random.default_rng(0).standard_normal((300, 5))
        spec = "2 * [dense(b_std=0.1), relu], dense"
        expected = lk.kernel(spec, x)["ntk"]
        results = []

        def work():
            for _ in range(5):
                results.append(lk.kernel(spec, x)["ntk"])

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 40
        assert all(np.array_equal(r, expected) for r in results)
        print(numba.threading_layer())
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=_env(NUMBA_THREADING_LAYER="workqueue"), check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "workqueue"


def test_a_fresh_cache_is_cold_and_a_used_one_is_warm(tmp_path):
    script = "from limitkernel import _numba; print(_numba.CACHE, _numba.cold_kernels())"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=_env(NUMBA_CACHE_DIR=str(tmp_path)), check=True)
    assert result.stdout.startswith("True [") and "'gram_block'" in result.stdout
    lk.kernel("dense, relu, dense", np.eye(3) + 0.5)
    if _numba.CACHE:
        assert _numba.cold_kernels() == []
    else:  # nothing is cached: every kernel compiles in every process
        assert "gram_block" in _numba.cold_kernels()


def _cannot_write_prefix(folder):
    """A command prefix under which a folder without write permission cannot be
    written, even by root (which ignores permissions unless it drops
    CAP_DAC_OVERRIDE); skips when there is none."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: a read-only folder cannot be "
                    "simulated (root writes through permissions)")
    prefix = [setpriv, "--bounding-set=-dac_override"]
    probe = subprocess.run([*prefix, sys.executable, "-c",
                            "import sys; open(sys.argv[1] + '/probe', 'w')", str(folder)],
                           capture_output=True, check=False)
    if probe.returncode == 0:
        pytest.skip("running as root and CAP_DAC_OVERRIDE cannot be dropped here: a "
                    "read-only folder cannot be simulated")
    return prefix


@pytest.mark.slow  # compiles every kernel into a fresh cache (about 20 s)
def test_a_read_only_install_without_a_home_imports_caches_and_warns_once(tmp_path):
    ro = tmp_path / "ro"
    shutil.copytree(PACKAGE, ro / "limitkernel",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    temp = tmp_path / "tmp"
    temp.mkdir()
    x = np.random.default_rng(1).standard_normal((5, 3))
    np.save(tmp_path / "x.npy", x)
    folders = [ro] + [p for p in ro.rglob("*") if p.is_dir()]
    for path in [p for p in ro.rglob("*") if p.is_file()]:
        path.chmod(0o444)
    for folder in folders:
        folder.chmod(0o555)
    try:
        prefix = _cannot_write_prefix(ro)
        env = _env(PYTHONPATH=str(ro), HOME=str(ro / "home"), TMPDIR=str(temp))
        cli = [*prefix, sys.executable, "-m", "limitkernel.cli", "kernel", "--arch",
               "dense, relu, dense", "--x", str(tmp_path / "x.npy")]
        first = subprocess.run([*cli, "--out", str(tmp_path / "a.npz")], capture_output=True,
                               text=True, env=env, cwd=tmp_path, check=False)
        assert first.returncode == 0, first.stderr[-2000:]
        assert first.stderr.count("KernelCacheWarning") == 1, first.stderr
        assert "compiling kernels (first use only)" in first.stderr
        # The kernels were cached in the user's temporary directory: a second
        # process loads them.
        second = subprocess.run([*cli, "--out", str(tmp_path / "b.npz")], capture_output=True,
                                text=True, env=env, cwd=tmp_path, check=False)
        assert second.returncode == 0, second.stderr[-2000:]
        assert second.stderr.count("KernelCacheWarning") == 1, second.stderr
        assert "compiling" not in second.stderr
        script = textwrap.dedent("""
            import warnings
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                import numpy as np
                import limitkernel as lk
                lk.kernel("dense, relu, dense", np.eye(3) + 0.5)
            print([w.category.__name__ for w in caught])
        """)
        third = subprocess.run([*prefix, sys.executable, "-c", script], capture_output=True,
                               text=True, env=env, cwd=tmp_path, check=False)
        assert third.returncode == 0, third.stderr[-2000:]
        assert third.stdout.strip() == "['KernelCacheWarning']"
        assert not (ro / "limitkernel" / "__pycache__").exists()
        assert list(temp.glob("limitkernel-numba-cache-*/limitkernel_*/*.nbi"))
    finally:
        for folder in folders:
            folder.chmod(0o755)
    expected = lk.kernel("dense, relu, dense", x)
    for name in ("a.npz", "b.npz"):
        with np.load(tmp_path / name) as data:
            np.testing.assert_array_equal(data["ntk"], expected["ntk"])


def test_fma_rounds_once():
    # (1 + 2⁻³⁰)(1 − 2⁻³⁰) = 1 − 2⁻⁶⁰: rounded to float64 first, the product is
    # 1 and the sum 0; fused, the sum is exactly −2⁻⁶⁰. Vectorised and scalar
    # loops alike.
    from numba import njit

    @njit
    def fused(x, y, z, out):
        for j in range(x.shape[0]):
            out[j] = _numba.fma(x[j], y[j], z[j])

    n = 37
    x, y, z = np.full(n, 1 + 2.0 ** -30), np.full(n, 1 - 2.0 ** -30), np.full(n, -1.0)
    out = np.empty(n)
    fused(x, y, z, out)
    assert (x * y + z == 0.0).all()
    np.testing.assert_array_equal(out, -(2.0 ** -60))
