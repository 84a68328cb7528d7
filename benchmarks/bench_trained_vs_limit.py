"""Trained finite CNNs and MLPs against the kernel prediction, on digits images.

Data: scikit-learn's digits, ``load_digits().images[..., None] / 16`` (8 × 8 × 1
images in [0, 1]), a random split of ``--n-train`` training and ``--n-test``
test images; targets are the one-hot labels (10 outputs, MSE loss ½·mean over
the N·10 targets). The MLP sees the same images flattened (64 features).

For every width, ``--seeds`` networks are trained by full-batch gradient
descent (learning rate η, ``--steps`` steps), and their test outputs are set
against the limiting Gaussian of :class:`limitkernel.GradientFlowEnsemble` at
the same time t = steps and learning rate (the networks' own limit spec, NTK
parameterisation). Printed per width:

* ``raw``: RMSE over the test outputs between the networks' mean output and
  the kernel mean μ_t. It cannot fall below the Monte Carlo error of a mean of
  S random initial functions, ``mc`` = √(mean variance / S), which does not
  shrink with width: printed beside it.
* ``cv``: the same with a control variate: each network's output minus the
  limit's linear response to its own initial function,
  r = f_t(x*) − f_0(x*) + Θ*X A_t f_0(X) (A_t = Θ⁻¹(I − e^{−ηtΘ/(Nc)})),
  which has mean zero at every width (E f_0 = 0) and removes the initial
  function's randomness. Theory (Lee et al. 2019; Dyer & Gur-Ari 2019): each
  network deviates from its linearised limit by O(n^{-1/2}) (the empirical NTK
  fluctuates by O(n^{-1/2}) about Θ), zero-mean to first order, and the mean
  deviation is O(1/n); the mean over S networks is therefore off by
  O(n^{-1/2} S^{-1/2}) + O(n^{-1}), so the fitted log–log slope of ``cv`` is
  −1/2 (−1 only while the 1/n bias dominates). Its standard error comes from
  a bootstrap over the seeds.
* ``per-net``: the mean over seeds of each network's RMSE from μ_t after the
  same correction (theory: slope −1/2; standard error by the delta method, as
  :func:`limitkernel.experiments.loglog_slope`).
* ``band``: the fraction of trained test outputs inside the predicted 10–90
  band (0.80 in the limit).
* test accuracy of the trained networks (``acc nets``, mean over seeds), of
  their mean output (``acc mean``, the finite counterpart of the kernel
  predictor) and of the kernel predictor (argmax of μ_t). A single network
  carries its random initial function, so ``acc nets`` stays below the
  kernel predictor's at any width; ``acc mean`` approaches it.

Gradient descent is the Euler discretisation of the flow the limit describes;
``floor`` is the RMSE between the kernel mean of gradient descent with the same
η and steps and μ_t, the distance that no width removes (set η by ``--rate``,
η·λ_max(Θ)/(N·c), to make it small).

Run: ``python benchmarks/bench_trained_vs_limit.py`` (``--quick`` for a smoke test).
"""

import argparse
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from scipy.linalg import eigh
from scipy.special import ndtri
from sklearn.datasets import load_digits
from threadpoolctl import threadpool_limits

REPO_ROOT = Path(__file__).resolve().parent.parent
if (REPO_ROOT / "limitkernel").is_dir():
    sys.path.insert(0, str(REPO_ROOT))

import limitkernel as lk
from limitkernel.experiments import flow_ensemble, flow_predict, loglog_slope
from limitkernel.finite import FiniteNetwork

CNN = ("conv(k=3, w_std=1.4, b_std=0.1), relu, conv(k=3, stride=2, w_std=1.4, b_std=0.1), "
       "relu, flatten, dense(w_std=1.4, b_std=0.1)")
MLP = ("dense(w_std=1.4, b_std=0.1), relu, dense(w_std=1.4, b_std=0.1), relu, "
       "dense(w_std=1.4, b_std=0.1)")
Z90 = float(ndtri(0.9))


def rmse(a):
    return float(np.sqrt(np.mean(np.square(a))))


def limit_prediction(spec, x, y, xt, steps, rate):
    """Learning rate, kernel mean μ_t, its sd, the linear response A (M, N) to the
    initial outputs, and the gradient-descent kernel mean."""
    ens = flow_ensemble(spec, x, y, 1.0)
    theta = ens.train_kernel("ntk")
    n, c = y.shape
    evals, evecs = eigh(theta)
    eta = rate * n * c / evals[-1]
    ens = flow_ensemble(spec, x, y, eta)
    mean, var = flow_predict(ens, xt, float(steps))
    cross = lk.kernel(spec, xt, x, get="ntk")["ntk"]
    s = eta * steps / (n * c)
    phi = -np.expm1(-s * evals) / evals
    response = cross @ (evecs * phi) @ evecs.T
    # The same mean by the formula, as a check of the two paths.
    np.testing.assert_allclose(response @ y, mean, rtol=1e-8, atol=1e-10)
    u = eta * evals / (n * c)
    gd = cross @ (evecs * (-np.expm1(steps * np.log1p(-u)) / evals)) @ evecs.T @ y
    return eta, mean, np.sqrt(np.maximum(var, 0.0))[:, None], response, gd


def train(spec, shape, width, seed, x, y, xt, steps, eta):
    net = FiniteNetwork(spec, width, input_shape=shape, n_outputs=y.shape[1],
                        seed=[seed, width])
    hist = net.train(x, y, steps, eta, x_test=xt, record_at=[0, steps])
    return hist.outputs[0], hist.test_outputs[0], hist.test_outputs[-1]


def run(name, spec, x, y, xt, labels_t, widths, seeds, steps, rate, jobs):
    start = time.perf_counter()
    shape = x.shape[1:]
    eta, mean, sd, response, gd = limit_prediction(spec, x, y, xt, steps, rate)
    limit_seconds = time.perf_counter() - start
    kernel_acc = float(np.mean(mean.argmax(1) == labels_t))
    mc_var = float(np.mean(sd ** 2))
    print(f"\n{name}: {spec}")
    print(f"  input {shape}, N = {len(x)} train, M = {len(xt)} test, c = {y.shape[1]}; "
          f"{steps} steps of η = {eta:.4g} (η·λ_max/(N·c) = {rate}); limit in "
          f"{limit_seconds:.1f} s")
    print(f"  GD-vs-flow floor (kernel means) = {rmse(gd - mean):.2e}; "
          f"kernel accuracy = {kernel_acc:.3f}")
    print(f"  {'width':>6} {'raw':>9} {'mc':>9} {'cv':>9} {'per-net':>9} {'band':>6} "
          f"{'acc nets':>9} {'acc mean':>9} {'s/net':>7}")
    rows = []
    for width in widths:
        t0 = time.perf_counter()
        with threadpool_limits(1), ThreadPoolExecutor(jobs) as pool:
            outs = list(pool.map(
                lambda s, w=width: train(spec, shape, w, s, x, y, xt, steps, eta),
                range(seeds)))
        seconds = (time.perf_counter() - t0) * jobs / seeds
        f0, f0t, ft = (np.array(v) for v in zip(*outs))
        corrected = ft - f0t + np.einsum("mn,snc->smc", response, f0)
        inside = float(np.mean((ft >= mean - Z90 * sd) & (ft <= mean + Z90 * sd)))
        acc = float(np.mean(ft.argmax(2) == labels_t[None]))
        acc_mean = float(np.mean(ft.mean(0).argmax(1) == labels_t))
        per_net = np.array([rmse(r - mean) for r in corrected])
        row = {"width": width, "raw": rmse(ft.mean(0) - mean),
               "mc": math.sqrt(mc_var / seeds), "cv": rmse(corrected.mean(0) - mean),
               "per_net": per_net, "inside": inside, "acc": acc, "corrected": corrected,
               "seconds": seconds}
        rows.append(row)
        print(f"  {width:>6d} {row['raw']:9.2e} {row['mc']:9.2e} {row['cv']:9.2e} "
              f"{per_net.mean():9.2e} {inside:6.2f} {acc:9.3f} {acc_mean:9.3f} {seconds:7.1f}")
    w = np.array(widths, dtype=float)
    logw = np.log(w)
    cv = np.log([r["cv"] for r in rows])
    slope = np.polyfit(logw, cv, 1)[0]
    rng = np.random.default_rng(0)
    boot = []
    for _ in range(400):
        pick = rng.integers(0, seeds, seeds)
        vals = [rmse(r["corrected"][pick].mean(0) - mean) for r in rows]
        boot.append(np.polyfit(logw, np.log(vals), 1)[0])
    se = float(np.std(boot, ddof=1))
    pn_slope, pn_se = loglog_slope(w, [r["per_net"] for r in rows])
    print(f"  slope of cv vs width: {slope:+.3f} ± {se:.3f} (bootstrap over seeds; "
          f"theory -1/2)")
    print(f"  slope of per-net vs width: {pn_slope:+.3f} ± {pn_se:.3f} (theory -1/2)")
    print(f"  {name} took {time.perf_counter() - start:.0f} s")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cnn-widths", default="16,32,64,128")
    parser.add_argument("--mlp-widths", default="64,256,1024,4096")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rate", type=float, default=0.5,
                        help="η·λ_max(Θ)/(N·c): sets the learning rate (default 0.5)")
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=2, help="networks trained at once")
    parser.add_argument("--quick", action="store_true", help="small smoke test")
    args = parser.parse_args()
    if args.quick:
        args.cnn_widths, args.mlp_widths, args.seeds, args.steps = "8,16", "32,64", 2, 10
        args.n_train = args.n_test = 40
    digits = load_digits()
    images = digits.images[..., None] / 16.0
    order = np.random.default_rng(0).permutation(len(images))
    train_idx, test_idx = order[:args.n_train], order[args.n_train:args.n_train + args.n_test]
    y = np.eye(10)[digits.target[train_idx]]
    x, xt, labels_t = images[train_idx], images[test_idx], digits.target[test_idx]
    start = time.perf_counter()
    for name, spec, a, b, widths in (
            ("CNN", CNN, x, xt, args.cnn_widths),
            ("MLP", MLP, x.reshape(len(x), -1), xt.reshape(len(xt), -1), args.mlp_widths)):
        run(name, spec, a, y, b, labels_t, [int(v) for v in widths.split(",")], args.seeds,
            args.steps, args.rate, args.jobs)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
