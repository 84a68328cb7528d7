"""Gram matrices larger than memory, on disk and on a 2-worker Dask cluster; CG on 50000.

Every phase runs in a fresh subprocess so that its peak resident memory
(``ru_maxrss``) is its own:

* ``memory``   ``limitkernel.kernel(spec, x)`` at ``--n-mem`` (in memory, where it
               fits): the throughput reference, in matrix entries per second;
* ``store``    ``kernel_to_store(spec, x, path, memory=--memory)`` at ``--n``
               (NNGP + NTK, float64: 2·8·N² bytes on disk), in this process;
* ``dask``     the same on an embedded LocalCluster of 2 single-threaded worker
               processes (peak RSS per worker reported);
* ``predict``  an NTK store of ``--n-predict`` training points in float32, then
               ``solve_cg(..., store=...)`` for the t = ∞ mean on ``--n-test`` test
               points; and, on the first ``--n-subset`` training points, the same
               (float32 store + CG) against the dense float64 Cholesky solve of
               ``GradientFlowEnsemble``.

Network and inputs as in bench_gram.py: ``3 * [dense(w_std=1.5, b_std=0.05), relu],
dense(w_std=1.5, b_std=0.05)``, x ~ N(0, 1) of dimension 784 with a fixed seed.
Stores go under ``--dir`` (checked for free space first) and are deleted after
each phase unless ``--keep``. Throughput counts all N² entries of a matrix pair
(the symmetric case computes half and mirrors, in memory as on disk).
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if (REPO_ROOT / "limitkernel").is_dir():
    sys.path.insert(0, str(REPO_ROOT))

HERE = Path(__file__).resolve().parent
# Benchmark the source tree, not an installed copy (Dask's spawned workers
# inherit sys.path).
sys.path.insert(0, str(HERE.parent))
SPEC_TEXT = "3 * [dense(w_std=1.5, b_std=0.05), relu], dense(w_std=1.5, b_std=0.05)"
INPUT_DIM = 784
MARKER = "BENCH_RESULT "
GB = 1e9


def _inputs(n, seed):
    return np.random.default_rng(seed).standard_normal((n, INPUT_DIM))


def _targets(x):
    w = np.random.default_rng(1).standard_normal(INPUT_DIM) / np.sqrt(INPUT_DIM)
    return np.sin(2 * x @ w)


def _rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _warm():
    from limitkernel import kernel

    kernel(SPEC_TEXT, _inputs(256, 99))
    kernel(SPEC_TEXT, _inputs(256, 99), dtype="float32", get="ntk")


def _check_rows(out, x, kinds, count=300):
    """Max relative error of sampled entries of the store against kernel()."""
    from limitkernel import kernel

    idx = np.sort(np.random.default_rng(2).choice(len(x), count, replace=False))
    ref = kernel(SPEC_TEXT, x[idx], get=kinds)
    return max(float(np.max(np.abs(np.asarray(out[k][idx][:, idx]) - ref[k])
                            / np.abs(ref[k]).max())) for k in kinds)


def worker_memory(args):
    from limitkernel import kernel

    _warm()
    x = _inputs(args.n, 0)
    start = time.perf_counter()
    kernel(SPEC_TEXT, x)
    elapsed = time.perf_counter() - start
    return {"time": elapsed, "rate": args.n ** 2 / elapsed, "rss": _rss()}


def worker_store(args):
    from limitkernel import kernel_to_store, store_status

    _warm()
    x = _inputs(args.n, 0)
    scheduler = None
    extra = {}
    if args.dask:
        import distributed

        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1,
                                           processes=True, dashboard_address=None)
        scheduler = distributed.Client(cluster)
        scheduler.run(_warm)
    start = time.perf_counter()
    out = kernel_to_store(SPEC_TEXT, x, path=args.path, memory=args.memory,
                          scheduler=scheduler, progress=False)
    elapsed = time.perf_counter() - start
    if args.dask:
        extra["worker_rss"] = list(scheduler.run(_rss).values())
        scheduler.close()
        cluster.close()
    state = store_status(args.path)
    return {"time": elapsed, "rate": args.n ** 2 / elapsed, "rss": _rss(),
            "tile": state.tile, "tiles": state.total,
            "disk": sum(f.stat().st_size for f in Path(args.path).glob("*.npy")),
            "sample_err": _check_rows(out, x, ("nngp", "ntk")), **extra}


def worker_predict(args):
    from limitkernel import GradientFlowEnsemble, kernel_to_store, solve_cg

    _warm()
    x = _inputs(args.n, 0)
    y = _targets(x)
    x_test = _inputs(args.n_test, 5)
    result = {}
    start = time.perf_counter()
    kernel_to_store(SPEC_TEXT, x, path=args.path, get="ntk", dtype="float32",
                    memory=args.memory, progress=False)
    result["store_time"] = time.perf_counter() - start
    start = time.perf_counter()
    sol = solve_cg(SPEC_TEXT, x, y, x_test, store=args.path, tol=args.cg_tol,
                   rank=args.cg_rank, memory=args.memory)
    result.update(cg_time=time.perf_counter() - start, iterations=sol.iterations,
                  residual=sol.residual, converged=sol.converged, rank=sol.rank,
                  rss=_rss())
    if args.dense:
        start = time.perf_counter()
        dense = GradientFlowEnsemble(SPEC_TEXT, x, y).predict(
            x_test, np.inf, get="ntk", cov=None)["ntk"].mean
        result["dense_time"] = time.perf_counter() - start
        result["max_abs_err"] = float(np.max(np.abs(sol.mean - dense)))
        result["max_abs_mean"] = float(np.max(np.abs(dense)))
    return result


WORKERS = {"memory": worker_memory, "store": worker_store, "predict": worker_predict}


def run_worker(kind, **options):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind]
    for key, value in options.items():
        if value is True:
            cmd.append(f"--{key.replace('_', '-')}")
        elif value is not None and value is not False:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    raise RuntimeError(f"{kind} worker failed:\n{proc.stderr[-3000:]}")


def _remove(path, keep):
    if not keep:
        shutil.rmtree(path, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--dask", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dense", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=30000, help="N written to disk (30000)")
    parser.add_argument("--n-mem", type=int, default=8000,
                        help="N of the in-memory reference (8000)")
    parser.add_argument("--n-dask", type=int, help="N on the LocalCluster (default --n)")
    parser.add_argument("--n-predict", type=int, default=50000,
                        help="training points of the CG prediction (50000)")
    parser.add_argument("--n-subset", type=int, default=8000,
                        help="training points of the CG vs dense comparison (8000)")
    parser.add_argument("--n-test", type=int, default=1000, help="test points (1000)")
    parser.add_argument("--memory", default="2GB", help="memory budget (2GB)")
    parser.add_argument("--cg-tol", type=float, default=1e-6,
                        help="CG relative residual (1e-6)")
    parser.add_argument("--cg-rank", type=int, default=200,
                        help="preconditioner rank (200)")
    parser.add_argument("--dir", default="/work/tmp/bench_outofcore",
                        help="directory for the stores (deleted after each phase)")
    parser.add_argument("--skip", default="", help="phases to skip: store,dask,predict")
    parser.add_argument("--keep", action="store_true", help="keep the stores")
    args = parser.parse_args()
    if args.worker:
        result = WORKERS[args.worker](args)
        print(MARKER + json.dumps(result), flush=True)
        return

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    n_dask = args.n_dask or args.n
    need = 16 * max(args.n, n_dask) ** 2 + 4 * args.n_predict ** 2
    free = shutil.disk_usage(base).free
    print(f"bench_outofcore: {SPEC_TEXT}, x ~ N(0, 1), d = {INPUT_DIM}, budget "
          f"{args.memory}")
    print(f"  stores under {base}: largest needs {need / GB:.1f} GB, {free / GB:.1f} GB free")
    if need > free:
        sys.exit(f"not enough disk space under {base}: give --dir elsewhere or smaller --n")

    ref = run_worker("memory", n=args.n_mem)
    print(f"\nin memory  N = {args.n_mem:6d}: {ref['time']:8.2f} s, "
          f"{ref['rate'] / 1e6:7.2f} M entries/s, peak RSS {ref['rss'] / GB:.2f} GB")
    rows = [("in memory", args.n_mem, ref)]
    for phase, n, dask in (("store", args.n, False), ("dask", n_dask, True)):
        if phase in skip:
            continue
        path = base / phase
        _remove(path, False)
        res = run_worker("store", n=n, path=path, memory=args.memory, dask=dask)
        _remove(path, args.keep)
        rows.append((phase, n, res))
        label = "on disk   " if phase == "store" else "2-worker  "
        workers = ""
        if dask:
            workers = ", workers " + " / ".join(f"{r / GB:.2f}" for r in res["worker_rss"]) + " GB"
        print(f"{label} N = {n:6d}: {res['time']:8.2f} s, {res['rate'] / 1e6:7.2f} M "
              f"entries/s = {res['rate'] / ref['rate']:.2f} x in-memory; peak RSS "
              f"{res['rss'] / GB:.2f} GB{workers}; {res['disk'] / GB:.1f} GB on disk in "
              f"{res['tiles']} tiles of edge {res['tile']}; sampled entries vs kernel(): "
              f"max rel err {res['sample_err']:.1e}")
    if "predict" not in skip:
        for n, dense in ((args.n_subset, True), (args.n_predict, False)):
            path = base / f"predict{n}"
            _remove(path, False)
            res = run_worker("predict", n=n, path=path, memory=args.memory, dense=dense,
                             n_test=args.n_test, cg_tol=args.cg_tol, cg_rank=args.cg_rank)
            _remove(path, args.keep)
            line = (f"CG        N = {n:6d}: float32 NTK store {res['store_time']:7.1f} s; CG "
                    f"{res['cg_time']:6.1f} s, {res['iterations']} iterations, residual "
                    f"{res['residual']:.1e} (tol {args.cg_tol:g}, rank {res['rank']}), "
                    f"peak RSS {res['rss'] / GB:.2f} GB")
            if dense:
                line += (f"\n           vs dense float64 solve ({res['dense_time']:.1f} s): "
                         f"max |Δ mean| {res['max_abs_err']:.1e} (max |mean| "
                         f"{res['max_abs_mean']:.2f})")
            print(line, flush=True)


if __name__ == "__main__":
    main()
