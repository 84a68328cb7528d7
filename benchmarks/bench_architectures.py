"""Gram time of residual and LayerNorm MLPs against a plain MLP of the same depth.

All networks have the same 22 dense and 20 ReLU layers ("ntk" parameterisation,
σ_w = 1.4, σ_b = 0.05); they differ only in what surrounds them:

* ``plain``      ``dense, 20 * [relu, dense], dense``
* ``residual``   ``dense, 20 * [residual(beta=0.5)[relu, dense]], dense``
* ``layernorm``  ``dense, 20 * [layernorm, relu, dense], dense``
* ``parallel``   ``dense, 10 * [parallel[relu, dense; relu, dense]], dense``
                 (shown for reference)

and ``floor``, numpy's ``x @ x.T`` alone. NNGP + NTK of x (N × 784, standard
normal, fixed seed) with itself, float64, in this process, after one warm-up
call on 200 inputs (numba compilation). The rounds interleave the networks, so
that a change in machine load hits all of them alike; each time is the best of
``--repeats`` rounds. Ratios are to the plain MLP; the target is within 1.5×.

    python benchmarks/bench_architectures.py [--n 4000] [--repeats 3]
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if (REPO_ROOT / "limitkernel").is_dir():
    sys.path.insert(0, str(REPO_ROOT))

import limitkernel as lk

DENSE = "dense(w_std=1.4, b_std=0.05)"
SPECS = {
    "plain": f"{DENSE}, 20 * [relu, {DENSE}], {DENSE}",
    "residual": f"{DENSE}, 20 * [residual(beta=0.5)[relu, {DENSE}]], {DENSE}",
    "layernorm": f"{DENSE}, 20 * [layernorm, relu, {DENSE}], {DENSE}",
    "parallel": f"{DENSE}, 10 * [parallel[relu, {DENSE}; relu, {DENSE}]], {DENSE}",
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="number of inputs")
    parser.add_argument("--d", type=int, default=784, help="input dimension")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (best is kept)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    x = np.random.default_rng(args.seed).standard_normal((args.n, args.d))
    for text in SPECS.values():
        lk.kernel(text, x[:200])
    best = {name: float("inf") for name in ["floor", *SPECS]}
    for _ in range(args.repeats):
        start = time.perf_counter()
        x @ x.T
        best["floor"] = min(best["floor"], time.perf_counter() - start)
        for name, text in SPECS.items():
            start = time.perf_counter()
            out = lk.kernel(text, x)
            best[name] = min(best[name], time.perf_counter() - start)
            assert np.all(np.isfinite(out["ntk"]))
            del out

    print(f"NNGP + NTK, x ({args.n}, {args.d}) with itself, float64, best of "
          f"{args.repeats}")
    print(f"{'network':<11} {'time (s)':>9} {'/ plain':>8} {'/ floor':>8}   spec")
    for name, seconds in best.items():
        text = SPECS.get(name, "x @ x.T")
        print(f"{name:<11} {seconds:9.3f} {seconds / best['plain']:8.2f} "
              f"{seconds / best['floor']:8.2f}   {text}")
    worst = max(best[name] / best["plain"] for name in ("residual", "layernorm"))
    verdict = "within" if worst <= 1.5 else "NOT within"
    print(f"residual and layernorm: at most {worst:.2f}x the plain MLP ({verdict} 1.5x)")


if __name__ == "__main__":
    main()
