"""Out-of-core stores, resumption after SIGKILL, Dask, and CG kernel regression.

References: the in-memory :func:`limitkernel.kernel` (whose entries are checked
against closed forms and mpmath in test_gram.py / test_exactness.py) for the
tiles; an uninterrupted run for the bytes of a resumed one; a dense Cholesky
solve (:class:`limitkernel.GradientFlowEnsemble`) for conjugate gradients.
"""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.testing import assert_allclose

import limitkernel
from limitkernel import GradientFlowEnsemble, kernel
from limitkernel.cli import main as cli_main
from limitkernel.distributed import (
    StoreError,
    StoreWarning,
    kernel_to_store,
    open_store,
    parse_memory,
    solve_cg,
    status,
)
from limitkernel.gram import MemoryBudgetError, prepare

SPEC = "2 * [dense(w_std=1.5, b_std=0.1), relu], dense(w_std=1.5, b_std=0.1)"
NUMERICAL = "dense(w_std=1.2, b_std=0.1), tanh, dense(w_std=1.2, b_std=0.1), erf, dense"
REPO = Path(__file__).resolve().parents[1]


def _x(n, d=6, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d))


def _bytes(path):
    return {kind: (Path(path) / f"{kind}.npy").read_bytes() for kind in ("nngp", "ntk")}


# ------------------------------------------------------------ tiles and stores


def _assert_store_matches(out, ref, sym):
    """A store's matrices against the in-memory kernel."""
    for kind in ("nngp", "ntk"):
        # Tiles run the same fused pass on GEMMs of other shapes, whose sums
        # may round differently: a few ulps of the largest entry.
        scale = np.abs(ref[kind]).max()
        assert_allclose(out[kind], ref[kind], rtol=0, atol=1e-13 * scale)
        if sym:
            assert np.array_equal(out[kind], out[kind].T)
            assert np.array_equal(np.diag(out[kind]), np.diag(ref[kind]))


@pytest.mark.parametrize("spec, shape", [
    ("conv, relu, avg_pool, conv, relu, global_avg_pool, dense", (4, 4, 2)),
    ("conv(k=3), relu, conv(k=3), relu, flatten, dense", (7, 3))])
@pytest.mark.parametrize("sym", [True, False])
def test_store_of_images_and_sequences_equals_in_memory_kernel(tmp_path, spec, shape, sym):
    """Convolutional specs go through the same plan, tiles and store; the memory
    budget counts their per-pair buffers."""
    rng = np.random.default_rng(3)
    x1 = rng.standard_normal((37,) + shape)
    x2 = None if sym else rng.standard_normal((21,) + shape)
    out = kernel_to_store(spec, x1, x2, path=tmp_path / "s", tile=16, memory="200MB",
                          progress=False)
    ref = kernel(spec, x1, x2)
    _assert_store_matches(out, ref, sym)


@pytest.mark.parametrize("spec", [SPEC, NUMERICAL])
@pytest.mark.parametrize("sym", [True, False])
def test_store_equals_in_memory_kernel(tmp_path, spec, sym):
    x1, x2 = _x(150), (None if sym else _x(97, seed=1))
    # tile 40 leaves ragged last tiles (150 = 3·40 + 30, 97 = 2·40 + 17).
    out = kernel_to_store(spec, x1, x2, path=tmp_path / "s", tile=40, progress=False)
    ref = kernel(spec, x1, x2)
    _assert_store_matches(out, ref, sym)
    state = status(tmp_path / "s")
    assert state.complete and state.done == state.total == (10 if sym else 12)


def test_plan_tiles_anywhere_match_kernel():
    x = _x(60)
    ref = kernel(NUMERICAL, x)
    plan = prepare(NUMERICAL, x)
    for r0, r1, c0, c1 in [(0, 60, 0, 60), (7, 23, 7, 23), (5, 30, 12, 50), (40, 60, 0, 9),
                           (17, 18, 0, 60)]:
        tile = plan.tile(r0, r1, c0, c1)
        for kind in ("nngp", "ntk"):
            block = ref[kind][r0:r1, c0:c1]
            assert_allclose(tile[kind], block, rtol=0, atol=1e-13 * np.abs(block).max())
    with pytest.raises(ValueError, match="not inside"):
        plan.tile(0, 61, 0, 5)


def test_float32_and_single_kind(tmp_path):
    x = _x(90)
    out = kernel_to_store(SPEC, x, path=tmp_path / "s", get="ntk", dtype="float32", tile=32,
                          progress=False)
    assert set(out) == {"ntk"} and out["ntk"].dtype == np.float32
    ref = kernel(SPEC, x, get="ntk")["ntk"]
    # float32 output carries only its own rounding: half an ulp, 2^-24 relative.
    assert_allclose(out["ntk"], ref, rtol=2.0 ** -24 * 1.01, atol=0)
    assert not (tmp_path / "s" / "nngp.npy").exists()


def test_refuses_other_computations(tmp_path):
    x = _x(50)
    path = tmp_path / "s"
    kernel_to_store(SPEC, x, path=path, tile=16, progress=False)
    cases = [
        {"spec": NUMERICAL, "x1": x}, {"spec": SPEC, "x1": x + 1e-9},
        {"spec": SPEC, "x1": x, "dtype": "float32"}, {"spec": SPEC, "x1": x, "get": "ntk"},
        {"spec": SPEC, "x1": x, "x2": x},
    ]
    for case in cases:
        with pytest.raises(StoreError, match="holds a different computation"):
            kernel_to_store(path=path, progress=False, **case)
    # The same computation again is a no-op resume.
    calls = []
    kernel_to_store(SPEC, x, path=path, progress=lambda done, total: calls.append(done))
    assert calls == []


def test_a_store_of_float32_products_is_its_own_computation(tmp_path):
    x = _x(50)
    path = tmp_path / "s"
    out = kernel_to_store(SPEC, x, path=path, tile=16, progress=False, dtype="float32",
                          precision="float32")
    plan = prepare(SPEC, x, dtype="float32", precision="float32")
    exact = kernel(SPEC, x)
    for kind in ("nngp", "ntk"):
        root = np.sqrt(np.diag(exact[kind]))
        err = np.abs(np.asarray(out[kind], dtype=np.float64) - exact[kind])
        assert np.max(err / np.outer(root, root)) <= plan.products_error
    with pytest.raises(StoreError, match=r"differs in: precision \(of the input products\)"):
        kernel_to_store(SPEC, x, path=path, progress=False, dtype="float32")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a limitkernel store"):
        kernel_to_store(SPEC, x, path=other, progress=False)
    with pytest.raises(StoreError, match="not a limitkernel Gram store"):
        status(other)


def test_memory_budget_sets_tile(tmp_path):
    assert parse_memory("4GB") == 4 * 10 ** 9
    assert parse_memory("512 MiB") == 512 << 20
    assert parse_memory(1000) == 1000
    for bad in ("lots", "-1GB", 0):
        with pytest.raises(ValueError, match="memory"):
            parse_memory(bad)
    x = _x(2000, d=50)
    with pytest.raises(MemoryBudgetError, match="too small"):
        kernel_to_store(SPEC, x, path=tmp_path / "a", memory="100MB")
    # 256 MiB for the interpreter + 1.6 MB of inputs + 3 MB for tiles: the working
    # set per tile entry is 8 (GEMM) + 2 tiles in flight · (2·8 outputs + 8 mirror)
    # = 56 bytes, so the edge is the multiple of 64 below √(2.97e6 / 56) = 230.
    budget = (256 << 20) + 2 * x.nbytes + 3 * 10 ** 8 // 100 + 10 ** 5
    kernel_to_store(SPEC, x, path=tmp_path / "b", memory=budget, progress=False)
    assert status(tmp_path / "b").tile == 192


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    x = _x(400, d=8)
    np.save(tmp_path / "x.npy", x)
    store = tmp_path / "killed"
    # The child sleeps after every tile so that the kill lands mid-run.
    script = textwrap.dedent(f"""
        import time, numpy as np
        from limitkernel.distributed import kernel_to_store
        x = np.load({str(tmp_path / "x.npy")!r})
        kernel_to_store({NUMERICAL!r}, x, path={str(store)!r}, tile=32,
                        progress=lambda done, total: time.sleep(0.05))
    """)
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done = store / "done"
            if done.is_dir() and len(os.listdir(done)) >= 10:
                break
            assert child.poll() is None, "the child exited before it could be killed"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    state = status(store)
    assert 10 <= state.done < state.total == 13 * 14 // 2
    with pytest.raises(StoreError, match="incomplete"):
        open_store(store)
    resumed = []
    kernel_to_store(NUMERICAL, x, path=store, tile=32,
                    progress=lambda done, total: resumed.append(done))
    assert len(resumed) == state.total - state.done  # only the missing tiles
    kernel_to_store(NUMERICAL, x, path=tmp_path / "whole", tile=32, progress=False)
    assert _bytes(store) == _bytes(tmp_path / "whole")


# ------------------------------------------------------------ identity, damage, locks


def _small_store(tmp_path, name="s", n=50, spec=SPEC, tile=16, **kwargs):
    x = _x(n)
    path = tmp_path / name
    kernel_to_store(spec, x, path=path, tile=tile, progress=False, **kwargs)
    return x, path


def _counting():
    calls = []
    return calls, lambda done, total: calls.append(done)


def _poke(path, kind, row, col, value):
    """Overwrite entry (row, col) of a store's matrix in place, as a disk error would."""
    meta = json.loads((Path(path) / "manifest.json").read_text())
    m = meta["shape"][1]
    item = np.dtype(meta["dtype"]).itemsize
    with open(Path(path) / f"{kind}.npy", "r+b") as fh:
        fh.seek(meta["offsets"][kind] + (row * m + col) * item)
        fh.write(np.array([value], dtype=meta["dtype"]).tobytes())


def test_numerical_activations_are_identified_by_their_values(tmp_path):
    x = 0.5 * _x(40)  # small variances: the series converge within max_terms
    path = tmp_path / "s"

    def spec(fn):
        return [limitkernel.Dense(), limitkernel.Numerical(fn=fn), limitkernel.Dense()]

    first = kernel_to_store(spec(np.arctan), x, path=path, tile=16, progress=False)
    assert_allclose(first["ntk"], kernel(spec(np.arctan), x)["ntk"], rtol=1e-13)
    # Same text ("dense, numerical, dense"), other function: refused, and says why.
    with pytest.raises(StoreError, match="different computation.*activation function"):
        kernel_to_store(spec(np.sin), x, path=path, tile=16, progress=False)
    # Another object computing the same function is the same computation: resumed.
    calls, count = _counting()
    kernel_to_store(spec(lambda v: np.arctan(v)), x, path=path, progress=count)
    assert calls == []
    # A derivative given explicitly is part of the computation.
    with pytest.raises(StoreError, match="activation function"):
        kernel_to_store([limitkernel.Dense(), limitkernel.Numerical(
            fn=np.arctan, dfn=lambda v: 1.0 / (1.0 + v * v) + 1e-3), limitkernel.Dense()],
            x, path=path, progress=False)


def test_unidentifiable_activation_is_never_resumed(tmp_path, monkeypatch):
    from limitkernel import distributed

    x = _x(30)

    def picky(v):
        if np.any(np.abs(v) > 1e6):
            raise ValueError("too large")
        return np.tanh(v)

    spec = [limitkernel.Dense(), limitkernel.Numerical(fn=picky), limitkernel.Dense()]
    monkeypatch.setattr(distributed, "_PROBES", np.array([0.5, 2e6]))
    path = tmp_path / "s"
    out = kernel_to_store(spec, x, path=path, tile=16, progress=False)
    assert_allclose(out["nngp"], kernel(spec, x)["nngp"], rtol=1e-13)
    with pytest.raises(StoreError, match="cannot be identified"):
        kernel_to_store(spec, x, path=path, tile=16, progress=False)


@pytest.mark.parametrize("row,col", [(3, 40), (40, 3), (20, 20)])
def test_corrupted_entry_is_caught_and_recomputed(tmp_path, row, col):
    x, path = _small_store(tmp_path)
    pristine = _bytes(path)
    _poke(path, "nngp", row, col, np.nan)
    with pytest.raises(StoreError, match=r"damaged.*checksum.*rerun"):
        open_store(path)
    state = status(path, verify=True)
    assert not state.ok and len(state.bad_tiles) == 1
    i, j = sorted((row // 16, col // 16))
    assert state.bad_tiles[0][:2] == (i, j) and "nngp" in state.bad_tiles[0][2]
    assert "damaged" in str(state) and f"({i}, {j})" in str(state)
    assert status(path).done == state.total  # without verify only the markers count
    calls, count = _counting()
    with pytest.warns(StoreWarning, match=f"tile \\({i}, {j}\\): nngp.npy"):
        kernel_to_store(SPEC, x, path=path, progress=count)
    assert len(calls) == 1  # only the damaged tile
    assert _bytes(path) == pristine
    assert status(path, verify=True).ok
    open_store(path)


def test_verify_false_trusts_the_markers(tmp_path):
    x, path = _small_store(tmp_path)
    _poke(path, "ntk", 0, 1, 7.0)
    assert open_store(path, verify=False)["ntk"][0, 1] == 7.0
    calls, count = _counting()
    kernel_to_store(SPEC, x, path=path, progress=count, verify=False)
    assert calls == []


def _truncate(path):
    file = path / "ntk.npy"
    os.truncate(file, file.stat().st_size // 2)


def _delete_done(path):
    shutil.rmtree(path / "done")


def _delete_ntk(path):
    (path / "ntk.npy").unlink()


def _header(path):
    with open(path / "ntk.npy", "r+b") as fh:
        fh.write(b"garbage!")


def _marker(path):
    (path / "done" / "1_2").write_text("{not json")


def _edit_manifest(change):
    def damage(path):
        meta = json.loads((path / "manifest.json").read_text())
        change(meta)
        (path / "manifest.json").write_text(json.dumps(meta))
    return damage


def _set_shape(meta):
    meta["shape"] = [60, 60]


def _drop_key(meta):
    del meta["tile"]


def _garbage_manifest(path):
    (path / "manifest.json").write_text("[1, 2")


# Damage a rerun repairs: (how, what the message names).
REPAIRABLE = [
    (_truncate, "ntk.npy is .* bytes long, expected"),
    (_delete_done, "done/ .*missing"),
    (_delete_ntk, "ntk.npy is missing"),
    (_header, "ntk.npy does not start with the .npy header it was written with"),
    (_marker, "the marker done/1_2 is unreadable"),
]
# Damage that leaves nothing to trust: the message says to delete the store.
FATAL = [
    (_edit_manifest(_set_shape), "manifest.json .*modified or damaged"),
    (_edit_manifest(_drop_key), "manifest.json .*modified or damaged"),
    (_garbage_manifest, "manifest.json is not valid JSON"),
]


@pytest.mark.parametrize("damage,fragment", REPAIRABLE, ids=lambda v: getattr(v, "__name__", ""))
def test_damaged_store_says_what_and_rerun_repairs(tmp_path, damage, fragment):
    x, path = _small_store(tmp_path)
    pristine = _bytes(path)
    damage(path)
    with pytest.raises(StoreError, match=f"damaged.*{fragment}.*rerun"):
        open_store(path)
    state = status(path)
    assert not state.ok and any(re.search(fragment, p) for p in state.problems)
    with pytest.warns(StoreWarning, match=f"was damaged: {fragment}"):
        kernel_to_store(SPEC, x, path=path, progress=False)
    assert _bytes(path) == pristine
    assert status(path, verify=True).ok


@pytest.mark.parametrize("damage,fragment", FATAL, ids=lambda v: getattr(v, "__name__", ""))
def test_damaged_manifest_is_refused_with_the_way_out(tmp_path, damage, fragment):
    x, path = _small_store(tmp_path)
    damage(path)
    for call in (lambda: open_store(path), lambda: status(path),
                 lambda: kernel_to_store(SPEC, x, path=path, progress=False)):
        with pytest.raises(StoreError, match=f"{fragment}.*delete the directory"):
            call()


def test_store_of_another_format_is_refused_with_the_way_out(tmp_path):
    x, path = _small_store(tmp_path)
    meta = json.loads((path / "manifest.json").read_text())
    meta["format_version"] = 1
    (path / "manifest.json").write_text(json.dumps(meta))
    # A changed digit in a checksummed manifest is damage, not another format.
    with pytest.raises(StoreError, match="manifest.json was modified or damaged"):
        status(path)
    # Format 1 stores had no checksums (nor headers).
    del meta["checksum"], meta["headers"]
    (path / "manifest.json").write_text(json.dumps(meta))
    for call in (lambda: open_store(path), lambda: status(path),
                 lambda: kernel_to_store(SPEC, x, path=path, progress=False)):
        with pytest.raises(StoreError, match=r"format 1, .*np\.load\(.*or delete it"):
            call()


def test_deleted_manifest_never_serves_old_markers(tmp_path, capsys):
    # The run of the report: 6 tiles at --memory 300MB, manifest deleted, rerun.
    np.save(tmp_path / "x.npy", _x(1500, d=5))
    store = str(tmp_path / "S")
    argv = ["kernel", "--arch", "dense, relu, dense", "--x", str(tmp_path / "x.npy"),
            "--out", store, "--memory", "300MB"]
    assert cli_main(argv) == 0
    assert "6 tiles" in capsys.readouterr().out
    os.remove(os.path.join(store, "manifest.json"))
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "manifest.json is missing" in err and "6 tile markers" in err
    assert "delete the directory" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(StoreError, match="manifest.json is missing"):
        open_store(store)


def test_an_interrupted_creation_starts_afresh(tmp_path):
    # Killed between laying out the files and writing the manifest: no markers yet.
    x, path = _small_store(tmp_path)
    pristine = _bytes(path)
    _poke(path, "nngp", 0, 0, 5.0)
    (path / "manifest.json").unlink()
    shutil.rmtree(path / "done")
    (path / "done").mkdir()
    kernel_to_store(SPEC, x, path=path, tile=16, progress=False)
    assert _bytes(path) == pristine


def test_second_writer_is_refused_while_the_first_runs(tmp_path, monkeypatch):
    from limitkernel import distributed

    monkeypatch.setattr(distributed, "_LOCK_PATIENCE", 0.2)
    x = _x(80)
    path = tmp_path / "s"
    started, release = threading.Event(), threading.Event()
    errors = []

    def slow(done, total):
        started.set()
        release.wait(60)

    def first():
        try:
            kernel_to_store(SPEC, x, path=path, tile=16, progress=slow)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert started.wait(60)
        # Another tile grid (memory) and another spec: both refused, with the holder named.
        for spec, kw in ((SPEC, {"tile": 32}), ("dense, erf, dense", {})):
            with pytest.raises(StoreError, match=r"being written by another writer \(pid"):
                kernel_to_store(spec, x, path=path, progress=False, **kw)
        assert "being written" in str(status(path))
    finally:
        release.set()
        thread.join()
    assert not errors
    assert status(path, verify=True).ok and status(path).complete
    assert "being written" not in str(status(path))
    assert np.array_equal(open_store(path)["ntk"], kernel_to_store(
        SPEC, x, path=tmp_path / "alone", tile=16, progress=False)["ntk"])


def test_file_system_without_locks_warns_and_writes(tmp_path, monkeypatch):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    x = _x(30)
    with pytest.warns(StoreWarning, match="cannot lock .*only one writer"):
        out = kernel_to_store(SPEC, x, path=tmp_path / "s", tile=16, progress=False)
    monkeypatch.undo()
    assert np.array_equal(out["ntk"], kernel_to_store(
        SPEC, x, path=tmp_path / "t", tile=16, progress=False)["ntk"])


def test_store_paths_that_name_files_are_refused(tmp_path):
    x = _x(20)
    for name in ("K.npy", "e.txt", "k.npz", "kernel.csv", "meta.json"):
        with pytest.raises(StoreError, match=f"{re.escape(name)} names a file"):
            kernel_to_store(SPEC, x, path=tmp_path / name, progress=False)
        assert not (tmp_path / name).exists()


def test_bad_arguments_leave_nothing_on_disk(tmp_path):
    import dask
    import distributed  # noqa: F401 - its config must exist before dask.config.set

    x = _x(20)
    path = tmp_path / "s"
    with pytest.raises(ValueError, match="expected a finite size|memory must be a finite"):
        kernel_to_store(SPEC, x, path=path, memory="1e999")
    with pytest.raises(ValueError, match="tile must be"):
        kernel_to_store(SPEC, x, path=path, tile=0)
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(OSError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
            kernel_to_store(SPEC, x, path=path, scheduler="tcp://127.0.0.1:9")
    assert not path.exists()


def test_memory_text_is_checked():
    for bad in ("1e999", "inf", "1e999GB", "nan"):
        with pytest.raises(ValueError, match="memory must be"):
            parse_memory(bad)


def test_store_entries_agree_with_kernel_within_the_dot_product_rounding(tmp_path):
    """Stores and kernel() run one fused pass on x·x' from BLAS calls of other shapes.

    BLAS rounds a dot product differently depending on the shape of the call it
    sits in; both results are within γ_d Σ_k |x_k x'_k| of the exact dot product
    (γ_d = dε/(1 - dε), ε = 2⁻⁵³, any summation order, with or without FMA), so
    they differ by at most twice that. For ``dense`` alone the kernel is
    σ_w² x·x'/d + σ_b², which carries that difference through unchanged.
    """
    x = _x(700, d=20, seed=5)
    spec = "dense(w_std=1.3, b_std=0.2)"
    out = kernel_to_store(spec, x, path=tmp_path / "s", tile=64, progress=False)
    ref = kernel(spec, x)
    d = x.shape[1]
    eps = 2.0 ** -53
    gamma = d * eps / (1 - d * eps)
    # Each side also rounds q = (x·x')·(1/d) once (≤ ε|q|) and σ_w² q + σ_b² at most
    # twice (≤ 2ε of the result, counting the product's rounding against it).
    bound = 1.3 ** 2 * (2 * gamma + 2 * eps) * (np.abs(x) @ np.abs(x).T) / d
    bound += 2 * 2 * eps * np.abs(ref["nngp"]) * (1 + 4 * eps)
    assert np.all(np.abs(out["nngp"] - ref["nngp"]) <= bound)
    assert np.all(np.abs(out["ntk"] - ref["ntk"]) <= bound)


# ------------------------------------------------------------ fuzzing


class _Interrupted(Exception):
    pass


_DAMAGE = st.one_of(
    st.tuples(st.just("flip"), st.sampled_from(["manifest.json", "nngp.npy", "ntk.npy",
                                                "marker"]),
              st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.sampled_from(["manifest.json", "nngp.npy", "ntk.npy",
                                                    "marker"]),
              st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("extend"), st.sampled_from(["nngp.npy", "ntk.npy"]),
              st.integers(1, 64)),
    st.tuples(st.just("delete"), st.sampled_from(["manifest.json", "nngp.npy", "ntk.npy",
                                                  "done", "lock", "marker"]),
              st.floats(0, 1, exclude_max=True)),
    # A marker of the finished store (right fingerprint) for a tile maybe not written.
    st.tuples(st.just("plant"), st.just("marker"), st.floats(0, 1, exclude_max=True)),
    # The other kernel's file, or the finished store's manifest, in its place.
    st.tuples(st.just("swap"), st.sampled_from(["nngp.npy", "ntk.npy", "manifest.json"])),
)


def _damage(path, action, finished):
    """Apply one damage; a target that does not exist is left alone."""
    how, target = action[0], action[1]
    if how == "plant":
        names = sorted(os.listdir(finished / "done"))
        name = names[int(action[2] * len(names))]
        if (path / "done").is_dir():
            shutil.copy(finished / "done" / name, path / "done" / name)
        return
    if how == "swap":
        other = {"nngp.npy": "ntk.npy", "ntk.npy": "nngp.npy"}.get(target, target)
        if (finished / other).exists() and path.is_dir():
            shutil.copy(finished / other, path / target)
        return
    if target == "marker":
        names = sorted(os.listdir(path / "done")) if (path / "done").is_dir() else []
        if not names:
            return
        target = f"done/{names[int(action[2] * len(names))]}"
    file = path / target
    if not file.exists():
        return
    if how == "delete":
        shutil.rmtree(file) if file.is_dir() else file.unlink()
    elif how == "extend":
        with open(file, "ab") as fh:
            fh.write(b"\0" * action[2])
    elif how == "truncate":
        os.truncate(file, int(action[2] * file.stat().st_size))
    elif file.stat().st_size:
        with open(file, "r+b") as fh:
            fh.seek(int(action[2] * file.stat().st_size))
            byte = fh.read(1)[0]
            fh.seek(-1, os.SEEK_CUR)
            fh.write(bytes([byte ^ action[3]]))


@given(n=st.integers(1, 14), m=st.none() | st.integers(1, 14), tile=st.integers(2, 8),
       kinds=st.sampled_from([("nngp",), ("ntk",), ("nngp", "ntk")]),
       dtype=st.sampled_from(["float64", "float32"]), stop=st.none() | st.integers(0, 6),
       damages=st.lists(_DAMAGE, max_size=3), seed=st.integers(0, 1000))
def test_fuzz_damaged_stores_never_serve_wrong_numbers(n, m, tile, kinds, dtype, stop,
                                                      damages, seed):
    """Interrupted runs and random damage: readers refuse or serve the right bytes;
    a rerun repairs the store, or refuses with the way out; another spec is refused."""
    rng = np.random.default_rng(seed)
    x1 = rng.normal(size=(n, 3))
    x2 = None if m is None else rng.normal(size=(m, 3))
    spec = "dense(b_std=0.1), relu, dense"
    args = dict(get=kinds, dtype=dtype, tile=tile)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", StoreWarning)
        tmp = Path(tmp)
        kernel_to_store(spec, x1, x2, path=tmp / "ref", progress=False, **args)
        reference = {kind: (tmp / "ref" / f"{kind}.npy").read_bytes() for kind in kinds}
        path = tmp / "s"
        calls = []

        def interrupt(done, total):
            calls.append(done)
            if stop is not None and len(calls) > stop:
                raise _Interrupted

        try:
            kernel_to_store(spec, x1, x2, path=path, progress=interrupt, **args)
        except _Interrupted:
            pass
        with pytest.raises(StoreError, match="different computation"):
            kernel_to_store("dense, erf, dense", x1, x2, path=path, progress=False, **args)
        for action in damages:
            _damage(path, action, tmp / "ref")

        def same(arrays):
            return all(np.asarray(arrays[k]).tobytes() == np.load(
                tmp / "ref" / f"{k}.npy").tobytes() for k in kinds)

        try:
            assert same(open_store(path))
        except StoreError:
            pass
        try:
            state = status(path, verify=True)
            if state.ok and state.complete:
                assert all((path / f"{k}.npy").read_bytes() == reference[k] for k in kinds)
        except StoreError:
            pass
        try:
            out = kernel_to_store(spec, x1, x2, path=path, progress=False, **args)
        except StoreError as err:
            assert "delete the directory" in str(err) or "not a limitkernel" in str(err)
            shutil.rmtree(path)
            out = kernel_to_store(spec, x1, x2, path=path, progress=False, **args)
        assert same(out)
        assert all((path / f"{k}.npy").read_bytes() == reference[k] for k in kinds)
        assert status(path, verify=True).ok


# ------------------------------------------------------------ Dask


@pytest.fixture(scope="module")
def client():
    # Not importorskip: the test extra installs dask[distributed], and CI must run these.
    import distributed

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as cl:
        yield cl


def _one_blas_thread():
    """BLAS on one thread, as on Dask workers (their nanny sets OPENBLAS_NUM_THREADS=1):
    OpenBLAS may round a dot product differently with another thread count."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def test_dask_matches_in_process(tmp_path, client, monkeypatch):
    from limitkernel import distributed

    monkeypatch.setattr(distributed, "_LOCK_PATIENCE", 0.1)
    x = _x(300, d=8)
    with _one_blas_thread():
        kernel_to_store(NUMERICAL, x, path=tmp_path / "local", tile=48, progress=False)
    refused = []

    def second_writer(done, total):
        # The driver holds the lock while the workers write; another writer is refused.
        if not refused:
            with pytest.raises(StoreError, match="being written"):
                kernel_to_store(SPEC, x, path=tmp_path / "dask", tile=48, progress=False)
            refused.append(done)

    kernel_to_store(NUMERICAL, x, path=tmp_path / "dask", tile=48, scheduler=client,
                    progress=second_writer)
    assert refused
    # Same code, same tiles, same BLAS threads: same bytes, whichever process computed them.
    assert _bytes(tmp_path / "dask") == _bytes(tmp_path / "local")
    y = _x(70, d=8, seed=3)
    out = kernel_to_store(SPEC, x, y, path=tmp_path / "rect", tile=48, scheduler=client,
                          progress=False)
    ref = kernel(SPEC, x, y)
    for kind in ("nngp", "ntk"):
        assert_allclose(out[kind], ref[kind], rtol=0, atol=1e-13 * np.abs(ref[kind]).max())


def test_dask_survives_a_killed_worker(tmp_path, client):
    x = _x(600, d=8)
    pids = client.run(os.getpid)
    victim = min(pids.values())
    seen = {}

    def kill_one(done, total):
        if done == 5:
            seen["done_at_kill"] = status(tmp_path / "dask").done
            os.kill(victim, signal.SIGKILL)

    kernel_to_store(NUMERICAL, x, path=tmp_path / "dask", tile=40, scheduler=client,
                    progress=kill_one)
    assert seen["done_at_kill"] < 15 * 16 // 2  # the kill came mid-run
    client.wait_for_workers(2, timeout=60)
    assert victim not in client.run(os.getpid).values()  # it did die (and was replaced)
    with _one_blas_thread():
        kernel_to_store(NUMERICAL, x, path=tmp_path / "local", tile=40, progress=False)
    assert _bytes(tmp_path / "dask") == _bytes(tmp_path / "local")


# ------------------------------------------------------------ conjugate gradients


def _cg_bound(sol, a_reg, cross, y):
    """Bound on |mean_cg − mean_dense| from the CG residual and the conditioning.

    ‖Δα‖ ≤ ‖r‖ / λ_min(A + λI) with ‖r‖ = residual · ‖y‖, and Δmean = A*X Δα;
    the dense Cholesky solve itself is off by about κ·ε·‖α‖ (backward stable).
    """
    evals = np.linalg.eigvalsh(a_reg)
    alpha = np.linalg.solve(a_reg, y)
    cg_part = np.linalg.norm(cross, 2) * sol.residual * np.linalg.norm(y) / evals[0]
    dense_part = (np.linalg.norm(cross, 2) * 10 * evals[-1] / evals[0]
                  * np.finfo(float).eps * np.linalg.norm(alpha))
    return cg_part + dense_part


@pytest.mark.parametrize("kind,diag_reg", [("ntk", 0.0), ("nngp", 1e-3)])
def test_cg_matches_dense_solve(kind, diag_reg):
    x, xt = _x(250, d=5), _x(40, d=5, seed=2)
    y = np.sin(x @ np.arange(1, 6) / 5)
    sol = solve_cg(SPEC, x, y, xt, kind=kind, diag_reg=diag_reg, tol=1e-10, rank=40,
                   memory=(256 << 20) + 10 ** 6)
    assert sol.converged and sol.residual <= 1e-10 and sol.iterations == len(sol.history)
    dense = GradientFlowEnsemble(SPEC, x, y, diag_reg=diag_reg).predict(
        xt, np.inf, get=kind, cov=None)[kind].mean
    a = kernel(SPEC, x, get=kind)[kind]
    a_reg = a + diag_reg * np.mean(np.diag(a)) * np.eye(len(x))
    cross = kernel(SPEC, xt, x, get=kind)[kind]
    bound = _cg_bound(sol, a_reg, cross, y)
    assert np.max(np.abs(sol.mean - dense)) <= bound
    assert bound < 1e-3 * np.abs(dense).max()  # the bound itself is tight enough to matter


def test_cg_from_store_and_several_outputs(tmp_path):
    x, xt = _x(200, d=5), _x(30, d=5, seed=2)
    y = np.stack([np.sin(x[:, 0]), np.cos(x[:, 1])], axis=1)
    kernel_to_store(SPEC, x, path=tmp_path / "s", get="ntk", tile=64, progress=False)
    sol = solve_cg(SPEC, x, y, xt, store=tmp_path / "s", tol=1e-10, rank=20)
    assert sol.mean.shape == (30, 2) and sol.converged
    dense = GradientFlowEnsemble(SPEC, x, y).predict(xt, np.inf, get="ntk", cov=None)
    a = kernel(SPEC, x, get="ntk")["ntk"]
    cross = kernel(SPEC, xt, x, get="ntk")["ntk"]
    for col in range(2):
        bound = _cg_bound(sol, a, cross, y[:, col])
        assert np.max(np.abs(sol.mean[:, col] - dense["ntk"].mean[:, col])) <= bound
    with pytest.raises(StoreError, match="does not hold"):
        solve_cg(SPEC, x + 1, y, xt, store=tmp_path / "s")


def test_float32_store_products_and_cg(tmp_path):
    from limitkernel.distributed import _rows_times

    rng = np.random.default_rng(4)
    block = rng.normal(size=(7, 103)).astype(np.float32)
    v = rng.normal(size=(103, 2))
    out = np.empty((7, 2))
    _rows_times(block, np.ascontiguousarray(v.T), out)
    # float64 sums of exactly representable products: error ≤ n·ε·Σ|b||v|.
    exact = block.astype(np.float64) @ v
    assert np.all(np.abs(out - exact) <= 103 * 2.0 ** -52 * (np.abs(block) @ np.abs(v)))
    x, xt = _x(200, d=5), _x(30, d=5, seed=2)
    y = np.sin(x[:, 0])
    kernel_to_store(SPEC, x, path=tmp_path / "s", get="ntk", dtype="float32", tile=64,
                    progress=False)
    sol = solve_cg(SPEC, x, y, xt, store=tmp_path / "s", tol=1e-6, rank=20)
    assert sol.converged
    # The float32 store is A + E with |E| ≤ 2^-24 |A| entrywise; the residual is
    # measured against the stored matrix, so against the exact A the weights are
    # off by ‖(A + E)⁻¹‖(‖E‖‖α‖ + residual·‖y‖), ‖(A + E)⁻¹‖ ≤ 1/(λ_min − ‖E‖).
    a = kernel(SPEC, x, get="ntk")["ntk"]
    cross = kernel(SPEC, xt, x, get="ntk")["ntk"]
    evals = np.linalg.eigvalsh(a)
    alpha = np.linalg.solve(a, y)
    err_a = 2.0 ** -24 * np.linalg.norm(a)  # Frobenius bounds the 2-norm of E
    bound = np.linalg.norm(cross, 2) / (evals[0] - err_a) * (
        err_a * np.linalg.norm(alpha) + sol.residual * np.linalg.norm(y))
    assert np.max(np.abs(sol.mean - cross @ alpha)) <= bound


# ------------------------------------------------------------ command line


def test_cli_store_status_and_cg(tmp_path, capsys):
    x = _x(120, d=4)
    np.save(tmp_path / "x.npy", x)
    y = np.cos(x[:, 0])
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.save(tmp_path / "test.npy", x[:10] + 0.1)
    store = str(tmp_path / "store")
    assert cli_main(["kernel", "--arch", SPEC, "--x", str(tmp_path / "x.npy"),
                     "--out", store, "--memory", "1GB"]) == 0
    assert cli_main(["kernel", "--status", store]) == 0
    text = capsys.readouterr().out
    assert "tiles" in text and "complete" in text
    assert np.array_equal(np.load(Path(store) / "ntk.npy"), kernel(SPEC, x)["ntk"])
    # Another spec into the same store: one line, exit 2.
    assert cli_main(["kernel", "--arch", NUMERICAL, "--x", str(tmp_path / "x.npy"),
                     "--out", store]) == 2
    assert "different computation" in capsys.readouterr().err
    assert cli_main(["kernel", "--status", str(tmp_path)]) == 2
    assert cli_main(["kernel", "--arch", SPEC]) == 2
    assert "needs --x, --out" in capsys.readouterr().err
    out = str(tmp_path / "pred.npz")
    args = ["predict", "--arch", SPEC, "--train", str(tmp_path / "train.npz"), "--test",
            str(tmp_path / "test.npy"), "--mode", "ntk"]
    assert cli_main(args + ["--out", out, "--solver", "cg", "--cg-tol", "1e-11"]) == 0
    assert "CG converged" in capsys.readouterr().out
    assert cli_main(args + ["--out", str(tmp_path / "dense.npz"), "--mean-only"]) == 0
    cg, dense = np.load(out), np.load(tmp_path / "dense.npz")
    assert cg["ntk_mean"].shape == dense["ntk_mean"].shape
    # The command runs solve_cg (checked against the dense solve above) with its options.
    sol = solve_cg(SPEC, x, y, x[:10] + 0.1, tol=1e-11)
    assert np.array_equal(cg["ntk_mean"][0], sol.mean)
    assert cli_main(args + ["--out", out, "--solver", "cg", "--time", "1"]) == 2


def test_cli_store_flag_file_names_and_what_was_written(tmp_path, capsys):
    np.save(tmp_path / "x.npy", _x(30, d=4))
    base = ["kernel", "--arch", SPEC, "--x", str(tmp_path / "x.npy")]
    # A name whose extension says "file" is never turned into a store directory.
    for name in ("K.npy", "e.txt", "k.csv"):
        assert cli_main(base + ["--out", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert f"{name} names a file" in err and "--store DIR" in err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / name).exists()
    assert cli_main(base + ["--store", str(tmp_path / "k.npz")]) == 2
    assert "k.npz names a file" in capsys.readouterr().err
    assert cli_main(base + ["--out", str(tmp_path / "k.npz"), "--memory", "1GB"]) == 2
    assert "--store DIR" in capsys.readouterr().err
    assert cli_main(base + ["--out", str(tmp_path / "k.npz"), "--store",
                            str(tmp_path / "s")]) == 2
    assert "not both" in capsys.readouterr().err
    assert not (tmp_path / "k.npz").exists() and not (tmp_path / "s").exists()
    # --store DIR: a store, and the line says so, with the tiles in good English.
    assert cli_main(base + ["--store", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert f"to the tile store {tmp_path / 's'}" in out and "(30x30, float64)" in out
    assert "1 tile of edge 30" in out
    # --out DIR (with or without --memory) still writes a store, as it always did.
    assert cli_main(base + ["--out", str(tmp_path / "old"), "--memory", "1GB"]) == 0
    assert "to the tile store" in capsys.readouterr().out
    assert cli_main(base + ["--out", str(tmp_path / "k.npz")]) == 0
    assert f"to the file {tmp_path / 'k.npz'}" in capsys.readouterr().out
    assert _bytes(tmp_path / "s") == _bytes(tmp_path / "old")


def test_cli_one_line_errors_for_paths_memory_manifests_schedulers(tmp_path, capsys):
    import dask
    import distributed  # noqa: F401 - its config must exist before dask.config.set

    np.save(tmp_path / "x.npy", _x(30, d=4))
    base = ["kernel", "--arch", SPEC, "--x", str(tmp_path / "x.npy")]
    (tmp_path / "dir.npz").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text(json.dumps(
        {"format": "limitkernel-gram-store"}))
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        for args, fragment in [
            (["--out", str(tmp_path / "dir.npz")], "dir.npz is a directory"),
            (["--store", str(tmp_path / "s"), "--memory=1e999"], "expected a finite size|memory must be a finite"),
            (["--store", str(tmp_path / "bad")], "manifest.json .*modified or damaged"),
            (["--status", str(tmp_path / "bad")], "manifest.json .*modified or damaged"),
            (["--store", str(tmp_path / "s"), "--scheduler", "tcp://127.0.0.1:9"],
             "cannot reach the Dask scheduler"),
            (["--store", str(tmp_path / "s"), "--verify"], "--verify goes with --status"),
        ]:
            argv = base + args if "--status" not in args else ["kernel"] + args
            try:
                status = cli_main(argv)
            except SystemExit as exit_:  # argparse's own checks exit the same way
                status = exit_.code
            assert status == 2, args
            err = capsys.readouterr().err
            assert re.search(fragment, err), (args, err)
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "s").exists()
    assert not os.listdir(tmp_path / "dir.npz")


def test_cli_status_verify(tmp_path, capsys):
    np.save(tmp_path / "x.npy", _x(300, d=4))  # 270MB: tiles of edge 128, 6 of them
    store = tmp_path / "s"
    assert cli_main(["kernel", "--arch", SPEC, "--x", str(tmp_path / "x.npy"), "--store",
                     str(store), "--memory", "270MB"]) == 0
    tiles = status(store).total
    assert tiles == 6 and "6 tiles of edge 128" in capsys.readouterr().out
    assert cli_main(["kernel", "--status", str(store), "--verify"]) == 0
    out = capsys.readouterr().out
    assert f"all {tiles} tiles match their checksums" in out
    _poke(store, "ntk", 1, 2, 0.5)
    assert cli_main(["kernel", "--status", str(store)]) == 0  # markers only: looks complete
    with pytest.raises(SystemExit) as exit_:  # status 1, as for 'limitkernel check'
        cli_main(["kernel", "--status", str(store), "--verify"])
    assert exit_.value.code == 1
    out = capsys.readouterr().out
    assert "damaged" in out and "tile (0, 0)" in out and "rerun" in out


def test_exports():
    assert limitkernel.kernel_to_store is kernel_to_store
    assert limitkernel.open_store is open_store
