"""Finite networks: empirical NTK and training throughput against the GEMMs they reduce to.

For each width n (default 512, 1024, 2048, 4096, 8192) one network

    3 * [dense(w_std=1.5, b_std=0.05), relu], dense(w_std=1.5, b_std=0.05)

(NTK parameterisation, d = 784 inputs drawn from a standard normal with a fixed
seed) is built with :class:`limitkernel.FiniteNetwork`, and two jobs are timed
side by side in this one process:

* ``ntk``: the empirical NTK of P inputs with themselves (``net.ntk(x)``,
  default P = 256), against its floor: numpy's ``@`` on exactly the matrix
  products the exact computation needs — the forward pass (x W per dense
  layer), the backward signals (δ Wᵀ for every dense layer but the first) and
  the two Gram matrices per dense layer (a aᵀ and δ δᵀ, full products).
* ``step``: one full-batch gradient-descent step on B examples (default
  B = 64; ``net.train(x, y, steps)`` divided by the steps, which counts the
  forward pass after the last step too, about a tenth of a step), against two
  baselines: the floor — numpy's ``@`` on the step's products (forward x W,
  backward g Wᵀ, weight gradient aᵀ g) — and a plain numpy step, which adds to
  those the element-wise work and the update ``W -= lr * G`` with its
  temporary, as a straightforward implementation does.

Times are the best of ``--repeats`` runs after one warm-up, the runs of the
methods interleaved so that they share whatever else loads the machine; ratios are
limitkernel / baseline (below 1 means faster). Both libraries' BLAS threads are
left at their defaults. Run from the repository root::

    python benchmarks/bench_finite.py
    python benchmarks/bench_finite.py --widths 512,1024 --points 128 --batch 32
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if (REPO_ROOT / "limitkernel" / "__init__.py").exists():
    sys.path.insert(0, str(REPO_ROOT))

import limitkernel as lk

SPEC = "3 * [dense(w_std=1.5, b_std=0.05), relu], dense(w_std=1.5, b_std=0.05)"
INPUT_DIM = 784


def best_of(fns, repeats):
    """Best time of each function, the calls interleaved so all see the same load."""
    for fn in fns:
        fn()  # warm-up: thread pools, caches
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [min(spent) for spent in times]


def ntk_floor(net, x):
    """The matrix products of the exact empirical NTK, with numpy's @."""
    mats = [layer.w for layer in net.dense]
    acts = [x]
    a = x
    for w in mats[:-1]:
        a = np.maximum(a @ w, 0.0)
        acts.append(a)
    delta = np.ones((x.shape[0], 1))
    for index in range(len(mats) - 1, -1, -1):
        _ = acts[index] @ acts[index].T
        _ = delta @ delta.T
        if index > 0:
            delta = delta @ mats[index].T


def step_floor(net, x, g_out):
    """The matrix products of one gradient step, with numpy's @."""
    mats = [layer.w for layer in net.dense]
    acts = [x]
    for w in mats[:-1]:
        acts.append(acts[-1] @ w)
    _ = acts[-1] @ mats[-1]
    g = g_out
    for index in range(len(mats) - 1, -1, -1):
        _ = acts[index].T @ g
        if index > 0:
            g = g @ mats[index].T


def numpy_step(params, x, y, lr):
    """A plain numpy gradient step on ½·mean squared error (NTK parameterisation)."""
    acts, pre = [x], []
    a = x
    for index, (w, b, wm, bm) in enumerate(params):
        z = wm * (a @ w) + bm * b
        if index < len(params) - 1:
            pre.append(z)
            a = np.maximum(z, 0.0)
            acts.append(a)
        else:
            out = z
    g = (out - y) / out.size
    for index in range(len(params) - 1, -1, -1):
        w, b, wm, bm = params[index]
        grad_w = wm * (acts[index].T @ g)
        grad_b = bm * g.sum(axis=0)
        if index > 0:
            g = (wm * (g @ w.T)) * (pre[index - 1] > 0)
        w -= lr * grad_w
        b -= lr * grad_b


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="512,1024,2048,4096,8192")
    parser.add_argument("--points", type=int, default=256, help="inputs of the NTK (P)")
    parser.add_argument("--batch", type=int, default=64, help="training batch (B)")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed training run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",") if w.strip()]
    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.points, INPUT_DIM))
    xb = rng.standard_normal((args.batch, INPUT_DIM))
    yb = rng.standard_normal((args.batch, 1))
    print(f"network {SPEC}, d = {INPUT_DIM}, NTK of P = {args.points} inputs, "
          f"training batch B = {args.batch}; best of {args.repeats}, float64")
    head = (f"{'width':>6} | {'NTK s':>8} {'floor s':>8} {'ratio':>6} | "
            f"{'step s':>8} {'floor s':>8} {'ratio':>6} {'numpy s':>8} {'ratio':>6}")
    print(head)
    print("-" * len(head))
    for width in widths:
        net = lk.FiniteNetwork(SPEC, width, INPUT_DIM, seed=args.seed)
        # Inputs scaled as the network's first layer sees them: the floor then
        # runs the same magnitudes (irrelevant for speed, kept for honesty).
        x_scaled = x * net.dense[0].w_mul
        t_ntk, t_ntk_floor = best_of(
            [lambda net=net: net.ntk(x), lambda net=net, xs=x_scaled: ntk_floor(net, xs)],
            args.repeats)

        def train(net=net):
            net.train(xb, yb, args.steps, learning_rate=1e-3, record_at=[args.steps])

        g_out = rng.standard_normal((args.batch, 1))
        params = [(layer.w.copy(), layer.b.copy(), layer.w_mul, layer.b_mul)
                  for layer in net.dense]
        t_train, t_step_floor, t_numpy = best_of(
            [train, lambda net=net, g=g_out: step_floor(net, xb, g),
             lambda params=params: numpy_step(params, xb, yb, 1e-3)], args.repeats)
        t_step = t_train / args.steps
        print(f"{width:>6} | {t_ntk:8.3f} {t_ntk_floor:8.3f} {t_ntk / t_ntk_floor:6.2f} | "
              f"{t_step:8.4f} {t_step_floor:8.4f} {t_step / t_step_floor:6.2f} "
              f"{t_numpy:8.4f} {t_step / t_numpy:6.2f}", flush=True)
        del net, params


if __name__ == "__main__":
    main()
