"""First use against later use: ``limitkernel kernel`` with a cold and a warm kernel cache.

Every run is a fresh process of the command line ::

    python -m limitkernel.cli kernel --arch SPEC --x x.npy --out k.npz

with ``SPEC = "3 * [dense(w_std=1.5, b_std=0.05), relu], dense(w_std=1.5, b_std=0.05)"``
and x of shape (N, 784) (standard normal, seed 0), so each time includes the
interpreter's start and the imports. ``NUMBA_CACHE_DIR`` points at a new empty
folder for the whole benchmark:

* ``cold``  the first run: numba compiles every kernel and writes the cache;
* ``warm``  the next ``--repeats`` runs (best shown): the kernels are loaded
  from the cache;
* ``import``  ``python -c "import limitkernel"`` alone, with the warm cache:
  the part of ``warm`` that is not the kernel call.

The command line prints "compiling kernels (first use only)…" on stderr when
the cache is cold; the table says whether each run did. The package is taken
from the working tree next to this folder.

Run: ``python benchmarks/bench_compile.py [--n 200] [--repeats 3]``.
"""

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SPEC = "3 * [dense(w_std=1.5, b_std=0.05), relu], dense(w_std=1.5, b_std=0.05)"
INPUT_DIM = 784
TREE = Path(__file__).resolve().parent.parent


def _timed(argv, env):
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(argv)}\n{result.stderr}")
    return elapsed, "compiling kernels" in result.stderr


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="inputs (default 200)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="warm runs, best shown (default 3)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        x = np.random.default_rng(0).standard_normal((args.n, INPUT_DIM))
        np.save(work / "x.npy", x)
        env = dict(os.environ, NUMBA_CACHE_DIR=str(work / "cache"),
                   PYTHONPATH=os.pathsep.join(
                       [str(TREE)] + [p for p in os.environ.get("PYTHONPATH", "").split(
                           os.pathsep) if p]))
        cli = [sys.executable, "-m", "limitkernel.cli", "kernel", "--arch", SPEC,
               "--x", str(work / "x.npy"), "--out", str(work / "k.npz")]
        cold, cold_said = _timed(cli, env)
        warm = [_timed(cli, env) for _ in range(args.repeats)]
        imports = min(_timed([sys.executable, "-c", "import limitkernel"], env)[0]
                      for _ in range(args.repeats))

    best, warm_said = min(t for t, _ in warm), any(said for _, said in warm)
    print(f"limitkernel kernel, N = {args.n}, d = {INPUT_DIM}, spec {SPEC}")
    print(f"python {platform.python_version()}, {platform.machine()}, "
          f"{os.cpu_count()} cpus; each time is a whole process")
    print(f"{'run':<8} {'seconds':>9}  announced 'compiling kernels'")
    print(f"{'cold':<8} {cold:>9.2f}  {'yes' if cold_said else 'no'}")
    print(f"{'warm':<8} {best:>9.2f}  {'yes' if warm_said else 'no'}  "
          f"(best of {args.repeats})")
    print(f"{'import':<8} {imports:>9.2f}  (python -c 'import limitkernel', warm cache)")
    print(f"cold / warm = {cold / best:.1f}; compilation costs about {cold - best:.1f} s "
          "once per cache")


if __name__ == "__main__":
    main()
