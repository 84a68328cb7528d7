"""Closed-form smooth activations (erf, GELU) against ReLU and Neural Tangents.

For each activation φ in ``relu``, ``erf`` and ``gelu`` (the exact GELU, x Φ(x))
this times, in one run,

* ``limitkernel.kernel(SPEC.format(φ), x)`` in this process, and
* Neural Tangents' same network (``stax.Relu()``, ``stax.Erf()``,
  ``stax.Gelu(approximate=False)``, jitted, warmed up) in a subprocess of its own
  Python (``_nt_worker.py --activation φ``), float64,

with ``SPEC = "3 * [dense(w_std=1.5, b_std=0.05), {}], dense(w_std=1.5, b_std=0.05)"``,
NNGP and NTK of x against itself, float64. It prints each time (best of
``--repeats`` after a warm-up), the ratio to the ReLU network of the same
package (erf and GELU are closed forms like ReLU; their arctangent is a
polynomial the compiler vectorises), Neural Tangents' time over ours, and the
largest difference between the two packages' kernels relative to
√(K(x, x) K(x', x')).

Inputs: ``digits`` (scikit-learn's 1797 digit images, 64 pixels, each scaled to
unit mean square) and ``gaussian`` (``--n`` × 784 standard normal, fixed seed).

    python benchmarks/bench_activations.py [--n 4000] [--repeats 3]
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if (HERE.parent / "limitkernel").is_dir():
    sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_gram import _nt_python, run_worker

import limitkernel as lk

SPEC = "3 * [dense(w_std=1.5, b_std=0.05), {}], dense(w_std=1.5, b_std=0.05)"
ACTIVATIONS = ("relu", "erf", "gelu")


def inputs(name, n, seed):
    if name == "digits":
        from sklearn.datasets import load_digits

        x = load_digits().data
        return x / np.sqrt(np.mean(x ** 2, axis=1, keepdims=True))
    return np.random.default_rng(seed).standard_normal((n, 784))


def time_ours(spec, x, repeats):
    lk.kernel(spec, x[:200])  # compilation
    best, out = float("inf"), None
    for _ in range(repeats):
        out = None
        start = time.perf_counter()
        out = lk.kernel(spec, x)
        best = min(best, time.perf_counter() - start)
    return best, out


def time_nt(python, activation, x, repeats, workdir):
    if python is None:
        return None, None
    xs, saved = os.path.join(workdir, "x.npy"), os.path.join(workdir, "nt.npz")
    np.save(xs, x)
    cmd = [python, str(HERE / "_nt_worker.py"), "--x", xs, "--dtype", "float64",
           "--repeats", str(repeats), "--activation", activation, "--save", saved]
    res = run_worker(cmd, timeout=1800, mem_limit=None)
    if res.get("status") != "ok":
        return res.get("status", "failed"), None
    with np.load(saved) as nt:
        return res["time"], {kind: nt[kind] for kind in ("nngp", "ntk")}


def largest_difference(ours, theirs):
    worst = 0.0
    for kind in ("nngp", "ntk"):
        root = np.sqrt(np.diag(ours[kind]))
        worst = max(worst, float(np.max(np.abs(ours[kind] - theirs[kind])
                                        / np.outer(root, root))))
    return worst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="gaussian inputs")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many")
    parser.add_argument("--inputs", nargs="+", default=("digits", "gaussian"),
                        choices=("digits", "gaussian"))
    parser.add_argument("--nt-python", help="Python with Neural Tangents (default: "
                        "$LIMITKERNEL_NT_PYTHON, else /work/nt-venv/bin/python)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    python = _nt_python(args.nt_python)
    print(f"network: {SPEC.format('φ')}; NNGP + NTK, float64, best of {args.repeats}")
    print(f"Neural Tangents python: {python or 'not found (its columns show n/a)'}")
    header = (f"{'inputs':>16} {'φ':>5} {'limitkernel':>12} {'/ relu':>7} "
              f"{'NT':>9} {'NT / lk':>8} {'max |lk − NT|':>14}")
    print(header)
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.inputs:
            x = inputs(name, args.n, args.seed)
            label = f"{name} {x.shape[0]}×{x.shape[1]}"
            relu_time = None
            for activation in ACTIVATIONS:
                ours, out = time_ours(SPEC.format(activation), x, args.repeats)
                relu_time = relu_time or ours
                theirs, nt = time_nt(python, activation, x, args.repeats, workdir)
                if isinstance(theirs, float):
                    ratio = f"{theirs / ours:8.2f}"
                    theirs_text = f"{theirs:8.3f}s"
                    diff = f"{largest_difference(out, nt):14.1e}"
                else:
                    ratio, theirs_text, diff = f"{'n/a':>8}", f"{theirs or 'n/a':>9}", ""
                print(f"{label:>16} {activation:>5} {ours:11.3f}s {ours / relu_time:7.2f} "
                      f"{theirs_text} {ratio} {diff}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
