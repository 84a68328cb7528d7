"""Out-of-core stores, resumption after SIGKILL, Dask, and CG kernel regression.

References: the in-memory :func:`limitkernel.kernel` (whose entries are checked
against closed forms and mpmath in test_gram.py / test_exactness.py) for the
tiles; an uninterrupted run for the bytes of a resumed one; a dense Cholesky
solve (:class:`limitkernel.GradientFlowEnsemble`) for conjugate gradients.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose

import limitkernel
from limitkernel import GradientFlowEnsemble, kernel
from limitkernel.cli import main as cli_main
from limitkernel.distributed import (
    StoreError,
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


@pytest.mark.parametrize("spec", [SPEC, NUMERICAL])
@pytest.mark.parametrize("sym", [True, False])
def test_store_equals_in_memory_kernel(tmp_path, spec, sym):
    x1, x2 = _x(150), (None if sym else _x(97, seed=1))
    # tile 40 leaves ragged last tiles (150 = 3·40 + 30, 97 = 2·40 + 17).
    out = kernel_to_store(spec, x1, x2, path=tmp_path / "s", tile=40, progress=False)
    ref = kernel(spec, x1, x2)
    for kind in ("nngp", "ntk"):
        # Tiles run the same fused pass on GEMMs of other shapes, whose sums
        # may round differently: a few ulps of the largest entry.
        scale = np.abs(ref[kind]).max()
        assert_allclose(out[kind], ref[kind], rtol=0, atol=1e-13 * scale)
        if sym:
            assert np.array_equal(out[kind], out[kind].T)
            assert np.array_equal(np.diag(out[kind]), np.diag(ref[kind]))
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


# ------------------------------------------------------------ Dask


@pytest.fixture(scope="module")
def client():
    # Not importorskip: the test extra installs dask[distributed], and CI must run these.
    import distributed

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as cl:
        yield cl


def test_dask_matches_in_process(tmp_path, client):
    x = _x(300, d=8)
    kernel_to_store(NUMERICAL, x, path=tmp_path / "local", tile=48, progress=False)
    kernel_to_store(NUMERICAL, x, path=tmp_path / "dask", tile=48, scheduler=client,
                    progress=False)
    # Same code, same tiles, same bytes, whichever process computed them.
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


def test_exports():
    assert limitkernel.kernel_to_store is kernel_to_store
    assert limitkernel.open_store is open_store
