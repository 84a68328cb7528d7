"""Convolutional kernels: limitkernel against Neural Tangents, and what they are worth.

Part 1, speed. Three networks of ``_nt_conv_worker.py`` (every layer σ_w = 1.4142,
σ_b = 0.05, "ntk" parameterisation), NNGP + NTK of N inputs with themselves,
float64:

* ``myrtle``     scikit-learn's digits as (N, 8, 8, 1) images (N = ``--n``):
                 conv, relu, conv, relu, avg_pool(k=2), conv, relu,
                 global_avg_pool, dense (3×3 convolutions, "same" padding);
* ``flatten2d``  the same images (N = ``--n-fast``): 3 * [conv, relu], flatten,
                 dense;
* ``cnn1d``      the digits as (N, 8, 8) sequences (the 8 rows of an image, one
                 after the other, 8 pixels each): 3 * [conv(k=3), relu],
                 global_avg_pool, dense.

limitkernel runs in this process (after a warm-up call on 8 inputs, which
compiles the kernels), Neural Tangents in its own environment (``--nt-python``,
``$LIMITKERNEL_NT_PYTHON`` or /work/nt-venv/bin/python) under ``nt.batch`` with
jit. Each time is the best of ``--repeats`` calls (Neural Tangents: after its own
warm-up call at full size, which compiles); the CPU time (all threads) is shown
too, being less sensitive to other load on the machine. The two results are
compared entry by entry (largest difference relative to √(K(x,x) K(x',x'))).

Part 2, the whole digits set: the 1797 × 1797 NNGP + NTK of ``myrtle``, with its
time, the arithmetic per entry of the algorithm (an estimate from the layer
shapes, counting each square root, arc cosine or sine as one operation) and the
rate that makes against the rate of a float64 matrix product on this machine.

Part 3, accuracy. Kernel regression on one-hot labels (NTK: the trained network
at t = ∞; NNGP: the posterior mean), trained on 1000 digits and tested on the
other 797 (a fixed permutation, seed 0), for the CNN kernels above against the
fully-connected network of the same depth on the 64 pixels
(``3 * [dense, relu], dense``), with a small ridge (1e-6 × the mean diagonal) for
numerical safety only. The images are the 1797 of Part 2; the kernels of
flatten2d and cnn1d are computed for it here, and their times printed.

    python benchmarks/bench_conv.py [--n 400] [--n-fast 1600] [--repeats 2] [--skip-nt]
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
if (REPO_ROOT / "limitkernel").is_dir():
    sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(HERE))

import limitkernel as lk  # noqa: E402
from bench_gram import _nt_python, run_worker  # noqa: E402

W, B = 1.4142, 0.05
CONV = f"conv(k=3, padding=same, w_std={W!r}, b_std={B!r})"
DENSE = f"dense(w_std={W!r}, b_std={B!r})"
SPECS = {
    "myrtle": f"{CONV}, relu, {CONV}, relu, avg_pool(k=2), {CONV}, relu, global_avg_pool, "
              f"{DENSE}",
    "flatten2d": f"3 * [{CONV}, relu], flatten, {DENSE}",
    "cnn1d": f"3 * [{CONV}, relu], global_avg_pool, {DENSE}",
    "mlp": f"3 * [{DENSE}, relu], {DENSE}",
}
GB = 1e9


def digits():
    """(images (1797, 8, 8, 1) in [0, 1], labels)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images[:, :, :, None] / 16.0, data.target


def inputs(case, images):
    if case == "cnn1d":
        return np.ascontiguousarray(images[:, :, :, 0])   # (N, 8 rows, 8 pixels)
    if case == "mlp":
        return images.reshape(len(images), -1)
    return images


def time_limitkernel(spec, x, repeats):
    """(kernels, best wall time, CPU time of that call)."""
    lk.kernel(spec, x[:8])
    best, cpu, out = np.inf, np.nan, None
    for _ in range(repeats):
        out = None
        t0, c0 = time.perf_counter(), time.process_time()
        out = lk.kernel(spec, x)
        wall = time.perf_counter() - t0
        if wall < best:
            best, cpu = wall, time.process_time() - c0
    return out, best, cpu


def time_nt(case, x, nt_python, repeats, workdir, timeout):
    """Neural Tangents' result dict (with its kernels under "kernels" when ok)."""
    path = Path(workdir) / f"{case}_x.npy"
    saved = Path(workdir) / f"{case}_nt.npz"
    np.save(path, x)
    n = len(x)
    batch = max(b for b in range(1, min(n, 40) + 1) if n % b == 0)
    cmd = [nt_python, str(HERE / "_nt_conv_worker.py"), "--case", case, "--x", str(path),
           "--batch-size", str(batch), "--repeats", str(repeats), "--save", str(saved)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = run_worker(cmd, timeout, 20 * GB, env=env)
    if result.get("status") == "ok":
        with np.load(saved) as data:
            result["kernels"] = {k: data[k] for k in ("nngp", "ntk")}
    return result


def max_scaled_difference(a, b):
    """max |a − b| / √(a_ii a_jj) over the entries of NNGP and NTK."""
    worst = 0.0
    for kind in ("nngp", "ntk"):
        d = np.sqrt(np.abs(np.diag(a[kind])))
        worst = max(worst, float(np.max(np.abs(a[kind] - b[kind]) / np.outer(d, d))))
    return worst


def operations_per_pair(spec, shape):
    """Arithmetic of one pair of inputs in the pairs-of-positions algorithm (an
    estimate from the layer shapes; a square root, arc cosine or sine counts as
    one operation)."""
    program = lk.gram.prepare(spec, np.zeros((1,) + shape) + 1.0).spatial
    ops = 0
    for layer, op in enumerate(program.ops):
        p_in, p_out = program.positions[layer], program.positions[layer + 1]
        name = op.kind.name
        if name == "conv":
            g = program.geo[int(program.prm[layer][4])]
            wi, ho, ky, kx = g[1], g[2], g[4], g[5]
            # y pass, then x pass, of K, G = a b (1 − ρ) and Θ; 1 − ρ' by its identity
            ops += 3 * ky * (ho * wi) ** 2 + 3 * kx * p_out ** 2
            ops += 2 * p_in ** 2 + 3 * ky * kx * p_out ** 2 + 8 * p_out ** 2
        elif name in ("avg_pool", "global_avg_pool"):
            ops += 2 * p_in ** 2 + 4 * p_out ** 2
        elif name == "relu":
            # angle (acos, sqrt, sin), S(θ), S(π − θ), K, Θ factor, 1 − ρ
            ops += 30 * p_in ** 2
        elif name == "flatten":
            ops += 10 * p_in
        else:
            ops += 10 * max(p_in, 1) ** 2
    return ops


def gemm_rate():
    """float64 matrix-product operations per second on this machine (2n³ / time)."""
    a = np.random.default_rng(0).standard_normal((2000, 2000))
    a @ a
    best = np.inf
    for _ in range(3):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * 2000 ** 3 / best


def regression_accuracy(kern, labels, train, test):
    """Test accuracy of kernel regression on one-hot labels."""
    targets = np.eye(10)[labels]
    k_train = kern[np.ix_(train, train)]
    ridge = 1e-6 * np.mean(np.diag(k_train))
    coef = np.linalg.solve(k_train + ridge * np.eye(len(train)), targets[train])
    guess = kern[np.ix_(test, train)] @ coef
    return float(np.mean(np.argmax(guess, axis=1) == labels[test]))


def part_speed(args, images, nt_python):
    print(f"\nPart 1: NNGP + NTK of N digits with themselves, float64, best of "
          f"{args.repeats}")
    print(f"  {'network':<10} {'N':>5} {'limitkernel':>20} {'Neural Tangents':>20} "
          f"{'ratio':>14} {'NT peak RSS':>12} {'max difference':>15}")
    with tempfile.TemporaryDirectory() as workdir:
        for case in ("myrtle", "flatten2d", "cnn1d"):
            n = args.n if case == "myrtle" else args.n_fast
            x = inputs(case, images[:n])
            out, wall, cpu = time_limitkernel(SPECS[case], x, args.repeats)
            lk_text = f"{wall:7.2f} s ({cpu:5.1f} cpu)"
            if args.skip_nt or nt_python is None:
                nt_text, ratio, rss, diff = "n/a", "", "", ""
            else:
                result = time_nt(case, x, nt_python, args.repeats, workdir, args.nt_timeout)
                if result.get("status") != "ok":
                    nt_text = result.get("status", "failed")
                    ratio = rss = diff = ""
                else:
                    nt_wall = result["time"]
                    nt_cpu = result["cpu_times"][int(np.argmin(result["times"]))]
                    nt_text = f"{nt_wall:8.2f} s ({nt_cpu:6.1f} cpu)"
                    ratio = f"{nt_wall / wall:5.1f}× ({nt_cpu / cpu:4.1f}×)"
                    rss = f"{result['peak_rss_bytes'] / GB:.1f} GB"
                    diff = f"{max_scaled_difference(out, result['kernels']):.1e}"
            print(f"  {case:<10} {n:>5} {lk_text:>20} {nt_text:>20} {ratio:>14} {rss:>12} "
                  f"{diff:>15}", flush=True)
    print("  ratio: Neural Tangents' time over limitkernel's, wall clock (CPU time).")
    print("  max difference: largest |limitkernel − NT| / √(K(x,x) K(x',x')), NNGP and NTK.")


def part_full(images):
    print("\nPart 2: the 1797 × 1797 NNGP + NTK of myrtle on all the digits")
    spec = SPECS["myrtle"]
    lk.kernel(spec, images[:8])
    t0, c0 = time.perf_counter(), time.process_time()
    out = lk.kernel(spec, images)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = len(images)
    pairs = n * (n + 1) // 2
    ops = operations_per_pair(spec, images.shape[1:])
    rate = gemm_rate()
    print(f"  time {wall:.1f} s wall, {cpu:.1f} s CPU; {pairs} pairs (the upper half), "
          f"{wall / pairs * 1e6:.1f} µs per pair")
    print(f"  arithmetic: ~{ops / 1e6:.2f} M operations per pair (estimate); "
          f"{ops * pairs / wall / 1e9:.1f} G operations/s, against {rate / 1e9:.1f} G "
          f"flop/s of a float64 matrix product here: at that rate the kernel would take "
          f"{ops * pairs / rate:.1f} s")
    return out, wall


def part_accuracy(images, labels, myrtle, myrtle_time):
    print("\nPart 3: kernel regression on digits (1000 train, 797 test, one-hot targets)")
    order = np.random.default_rng(0).permutation(len(images))
    train, test = order[:1000], order[1000:]
    print(f"  {'kernel':<10} {'NTK acc':>8} {'NNGP acc':>9} {'kernel time':>12}")
    for case in ("myrtle", "flatten2d", "cnn1d", "mlp"):
        if case == "myrtle":
            out, wall = myrtle, myrtle_time
        else:
            x = inputs(case, images)
            lk.kernel(SPECS[case], x[:8])
            t0 = time.perf_counter()
            out = lk.kernel(SPECS[case], x)
            wall = time.perf_counter() - t0
        ntk = regression_accuracy(out["ntk"], labels, train, test)
        nngp = regression_accuracy(out["nngp"], labels, train, test)
        print(f"  {case:<10} {ntk:8.3f} {nngp:9.3f} {wall:10.1f} s", flush=True)
    print("  mlp: the fully-connected network of the same depth on the 64 pixels.")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400, help="inputs of Part 1 (myrtle)")
    parser.add_argument("--n-fast", type=int, default=1600,
                        help="inputs of Part 1 for flatten2d and cnn1d, whose pairs "
                             "carry P numbers, not P × P")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls (best kept)")
    parser.add_argument("--skip-nt", action="store_true", help="do not run Neural Tangents")
    parser.add_argument("--nt-python", help="Python of the environment with Neural Tangents")
    parser.add_argument("--nt-timeout", type=float, default=3600.0,
                        help="seconds before a Neural Tangents run is stopped")
    parser.add_argument("--parts", default="1,2,3", help="which parts to run")
    args = parser.parse_args(argv)
    parts = {int(p) for p in args.parts.split(",")}
    images, labels = digits()
    nt_python = None if args.skip_nt else _nt_python(args.nt_python)
    print(f"limitkernel {lk.__version__}, numpy {np.__version__}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(f"Neural Tangents python: {nt_python or 'not used'}")
    if 1 in parts:
        part_speed(args, images, nt_python)
    myrtle = myrtle_time = None
    if 2 in parts or 3 in parts:
        myrtle, myrtle_time = part_full(images)
    if 3 in parts:
        part_accuracy(images, labels, myrtle, myrtle_time)
    print(json.dumps({"load_after": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
