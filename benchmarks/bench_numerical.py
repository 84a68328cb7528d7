"""Numerical activations: a tanh network's Gram matrices against a ReLU network's.

For every N this times, in this process,

* ``relu``  ``limitkernel.kernel(SPEC % "relu", x)`` (closed form),
* ``tanh``  ``limitkernel.kernel(SPEC % "tanh", x)`` (Hermite series),

with ``SPEC = "3 * [dense(w_std=1.5, b_std=0.05), %s], dense(w_std=1.5, b_std=0.05)"``,
both kernels (NNGP and NTK), x against itself, float64, x of shape (N, 784).
Two kinds of inputs, because the cost of the series depends on the
correlations: ``gaussian`` (i.i.d. N(0, 1) entries, |ρ| ≈ 0.03 between inputs,
where every entry stops after a few terms) and ``clustered`` (a shared
component plus one of 20 cluster centres plus noise, ρ ≈ 0.6–0.8 at the input
and higher after the layers, like real data sets, where most entries need many
terms). Each measurement is the best of ``--repeats`` calls after a warm-up
call (JIT compilation), in wall-clock seconds and in CPU seconds of this
process (all threads; on a machine shared with other work the CPU time is the
steadier of the two). The table also shows, for the tanh network, the largest
number of series terms T of its three tanh layers and the proven per-layer
bounds on the truncation error of E[φφ] and E[φ'φ'] as |ρ| → 1, relative to
√(E[φ(u)²] E[φ(v)²]) (``Numerical.error_bound``).

When ``--nt-python`` (default ``/work/nt-venv/bin/python``) exists, Neural
Tangents' ``stax.ElementwiseNumerical(jnp.tanh, deg=25)`` network (the same
architecture, float32, JAX on the CPU, jitted, warmed up) is timed in a
subprocess of that Python for N in ``--nt-ns``, with its peak resident memory
and its largest error against the limitkernel result, relative to
√(K(x, x) K(x', x')).

Run: ``python benchmarks/bench_numerical.py [--ns 1000 2000 4000 8000]``.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if (REPO_ROOT / "limitkernel").is_dir():
    sys.path.insert(0, str(REPO_ROOT))

SPEC = "3 * [dense(w_std=1.5, b_std=0.05), {}], dense(w_std=1.5, b_std=0.05)"
INPUT_DIM = 784
DEFAULT_NS = (1000, 2000, 4000, 8000)
DEFAULT_NT_NS = (500, 1000)
DEFAULT_NT_PYTHON = Path("/work/nt-venv/bin/python")
MARKER = "NT_RESULT "


def make_inputs(n, kind, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, INPUT_DIM))
    if kind == "clustered":
        centres = rng.standard_normal((20, INPUT_DIM))
        x = rng.standard_normal((1, INPUT_DIM)) + 0.5 * centres[rng.integers(0, 20, n)] + 0.6 * x
        x /= np.sqrt(1.0 + 0.25 + 0.36)  # unit variance per feature, as for gaussian
    return x


def best_time(fn, args, repeats, cpu=False):
    """Best of ``repeats`` calls after a warm-up: wall seconds, or (wall, CPU) with ``cpu``."""
    fn(*args)  # warm-up: JIT compilation, thread pools, page faults
    walls, cpus = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn(*args)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - start_cpu)
    return (min(walls), min(cpus)) if cpu else min(walls)


def tanh_bounds(x):
    """Largest T and per-layer bounds over the tanh layers of the network on x."""
    from limitkernel._program import Program

    program = Program(SPEC.format("tanh"), x.shape[1])
    roots = program.diagonals(x)[0]
    terms, phi, dphi = 0, 0.0, 0.0
    for index, layer in enumerate(program.layers):
        if layer.name == "tanh":
            bound = layer.error_bound(roots[index] ** 2)
            terms = max(terms, bound["terms"])
            phi, dphi = max(phi, bound["phi"]), max(dphi, bound["dphi"])
    return terms, phi, dphi


def median_abs_rho(x, sample=500):
    x = x[:sample]
    norms = np.linalg.norm(x, axis=1)
    rho = (x @ x.T) / np.outer(norms, norms)
    return float(np.median(np.abs(rho[np.triu_indices(len(x), 1)])))


# ---------------------------------------------------------------- Neural Tangents


NT_WORKER = """
import json, os, resource, sys, time
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np
import jax
import jax.numpy as jnp
from neural_tangents import stax
x = np.load(sys.argv[1]).astype(np.float32)
layers = []
for _ in range(3):
    layers += [stax.Dense(512, W_std=1.5, b_std=0.05),
               stax.ElementwiseNumerical(jnp.tanh, deg=25)]
_, _, kernel_fn = stax.serial(*layers, stax.Dense(1, W_std=1.5, b_std=0.05))
kernel_fn = jax.jit(kernel_fn, static_argnames="get")
out = kernel_fn(x, None, get=("nngp", "ntk"))
jax.block_until_ready(out)
start = time.perf_counter()
out = kernel_fn(x, None, get=("nngp", "ntk"))
jax.block_until_ready(out)
seconds = time.perf_counter() - start
np.savez(sys.argv[2], nngp=np.asarray(out.nngp), ntk=np.asarray(out.ntk))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("NT_RESULT " + json.dumps({"seconds": seconds, "peak_rss": rss}), flush=True)
"""


def run_nt(python, x, ours):
    with tempfile.TemporaryDirectory() as tmp:
        inputs, kernels = os.path.join(tmp, "x.npy"), os.path.join(tmp, "k.npz")
        np.save(inputs, x)
        proc = subprocess.run([str(python), "-c", NT_WORKER, inputs, kernels],
                              capture_output=True, text=True, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER)]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return {"error": f"exit {proc.returncode}: {tail}"}
        result = json.loads(lines[-1][len(MARKER):])
        with np.load(kernels) as nt:
            for kind in ("nngp", "ntk"):
                diag = np.sqrt(np.diag(ours[kind]))
                err = np.abs(nt[kind].astype(np.float64) - ours[kind]) / np.outer(diag, diag)
                result[f"err_{kind}"] = float(err.max())
        return result


# ---------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", type=int, nargs="+", default=DEFAULT_NS)
    parser.add_argument("--inputs", nargs="+", default=("gaussian", "clustered"),
                        choices=("gaussian", "clustered"))
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed calls per case (the best is kept; default 3)")
    parser.add_argument("--nt-python", type=Path, default=DEFAULT_NT_PYTHON)
    parser.add_argument("--nt-ns", type=int, nargs="*", default=DEFAULT_NT_NS)
    args = parser.parse_args(argv)

    import limitkernel as lk

    print(f"limitkernel {lk.__version__}, numpy {np.__version__}, python "
          f"{platform.python_version()}, {os.cpu_count()} cores")
    print(f"network: {SPEC.format('ACT')}; d = {INPUT_DIM}; nngp + ntk; float64\n")
    header = (f"{'inputs':>9} {'N':>6} {'med|ρ|':>7} {'relu s':>8} {'tanh s':>8} "
              f"{'tanh/relu':>9} {'relu cpu':>9} {'tanh cpu':>9} {'cpu ratio':>9} "
              f"{'T':>4} {'bound E[φφ]':>12} {'bound E[φ′φ′]':>13}")
    print(header)
    print("-" * len(header))
    for kind in args.inputs:
        for n in args.ns:
            x = make_inputs(n, kind)
            # One call above N = 2000 was not enough: a single call's time
            # swings by up to 30% with where the allocator finds the output's pages.
            times = {act: best_time(lk.kernel, (SPEC.format(act), x), args.repeats, cpu=True)
                     for act in ("relu", "tanh")}
            (relu, relu_cpu), (tanh, tanh_cpu) = times["relu"], times["tanh"]
            terms, phi, dphi = tanh_bounds(x)
            print(f"{kind:>9} {n:>6} {median_abs_rho(x):>7.2f} {relu:>8.3f} {tanh:>8.3f} "
                  f"{tanh / relu:>9.2f} {relu_cpu:>9.3f} {tanh_cpu:>9.3f} "
                  f"{tanh_cpu / relu_cpu:>9.2f} {terms:>4} {phi:>12.1e} {dphi:>13.1e}",
                  flush=True)

    if not args.nt_ns:
        return 0
    if not args.nt_python.exists():
        print(f"\nNeural Tangents: {args.nt_python} not found, skipped")
        return 0
    print("\nNeural Tangents ElementwiseNumerical(jnp.tanh, deg=25), float32, gaussian inputs")
    header = (f"{'N':>6} {'NT s':>8} {'NT peak RSS':>12} {'limitkernel s':>14} "
              f"{'NT/limitkernel':>15} {'NT err nngp':>12} {'NT err ntk':>11}")
    print(header)
    print("-" * len(header))
    for n in args.nt_ns:
        x = make_inputs(n, "gaussian")
        ours = lk.kernel(SPEC.format("tanh"), x)
        mine = best_time(lk.kernel, (SPEC.format("tanh"), x), args.repeats)
        result = run_nt(args.nt_python, x, ours)
        if "error" in result:
            print(f"{n:>6} failed: {result['error']}")
            continue
        print(f"{n:>6} {result['seconds']:>8.2f} {result['peak_rss'] / 1e9:>9.2f} GB "
              f"{mine:>14.3f} {result['seconds'] / mine:>15.0f} "
              f"{result['err_nngp']:>12.1e} {result['err_ntk']:>11.1e}", flush=True)
    print(f"\n(peak RSS of this process: "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
