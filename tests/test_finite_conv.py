"""Finite convolutional networks: forward pass, exact empirical kernels, training.

References, all independent of the code under test: a loop over output
positions and taps for the forward pass, central finite differences over every
parameter for the empirical NTK and one gradient step, and the infinite-width
kernels of :func:`limitkernel.kernel` for the means over seeds.
"""

import math

import numpy as np
import pytest
from naive import fd_gradient, fd_jacobian, net_params
from scipy.special import erf

import limitkernel as lk
import limitkernel.finite as finite_module
from limitkernel.finite import FiniteNetwork, limit_spec
from limitkernel.layers import _positions

# Every spatial layer kind, each padding, strides, pooling, blocks, layernorm
# over channels, dense on positions, sequences and images, both
# parameterisations.
SPECS = {
    "same-valid-pool-circular": (
        ("conv(k=3, w_std=1.3, b_std=0.2), relu, conv(k=2, stride=2, padding=valid), erf, "
        "avg_pool(k=2, padding=same), conv(k=3, padding=circular, b_std=0.3), layernorm, "
        "global_avg_pool, dense(b_std=0.1)"), (5, 5, 2)),
    "strided-rect-flatten": (
        ("conv(k=3:2, stride=2:1, w_std=1.2, b_std=0.1), gelu, avg_pool(k=2, stride=1), "
        "flatten, dense(b_std=0.2)"), (5, 4, 2)),
    "sequence-standard-residual": (
        ("conv(k=3, w_std=1.3, b_std=0.2, parameterization=standard), relu, "
        "residual[conv(k=3, parameterization=standard, b_std=0.2)], "
        "dense(parameterization=standard, b_std=0.3), relu, flatten, "
        "dense(parameterization=standard, b_std=0.1)"), (4, 3)),
    "sequence-circular-strided": (
        ("conv(k=2, stride=2, padding=circular, w_std=1.1), tanh, conv(k=3, b_std=0.4), "
        "relu, global_avg_pool, dense(w_std=1.2), erf, dense"), (5, 2)),
}


def _fd_ntk(net, x1, x2, c):
    j1, j2 = fd_jacobian(net, x1), fd_jacobian(net, x2)
    n1, n2 = len(x1), len(x2)
    cross = (j1 @ j2.T).reshape(n1, c, n2, c).transpose(0, 2, 1, 3)
    same = (j1 @ j1.T).reshape(n1, c, n1, c).transpose(0, 2, 1, 3)
    return (cross[:, :, 0, 0], same[:, :, 0, 0]) if c == 1 else (cross, same)


def _force(path):
    """shared_layer_ntk forced to one of its two identities."""
    def shared(params, a1, a2, d1, d2, c):
        sym = a2 is None
        a2, d2 = (a1, d1) if sym else (a2, d2)
        if path == "gradients":
            return _positions._by_gradients(params, a1, a2, d1, d2, c, sym)
        return _positions._by_positions(params, a1, a2, d1, d2, c)
    return shared


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("n_outputs", [1, 2])
def test_ntk_equals_brute_force_jacobian_product(name, n_outputs, monkeypatch):
    # Central differences (error ~1e-10 relative, see naive.py) against both
    # exact identities of a shared layer's share.
    spec, shape = SPECS[name]
    net = FiniteNetwork(spec, 3, input_shape=shape, n_outputs=n_outputs, seed=1)
    rng = np.random.default_rng(2)
    x1, x2 = rng.standard_normal((3,) + shape), rng.standard_normal((2,) + shape)
    cross, same = _fd_ntk(net, x1, x2, n_outputs)
    scale = np.abs(same).max()
    for path in ("gradients", "positions"):
        monkeypatch.setattr(finite_module, "shared_layer_ntk", _force(path))
        np.testing.assert_allclose(net.ntk(x1, x2), cross, rtol=0, atol=1e-7 * scale)
        np.testing.assert_allclose(net.ntk(x1), same, rtol=0, atol=1e-7 * scale)


def test_the_cheaper_identity_is_chosen():
    # Many positions, few channels: per-example gradients; the reverse: positions.
    class P:
        w_mul, b_mul = 1.0, 1.0

    calls = []
    for n_pos, width, expected in ((64, 4, "_by_gradients"), (2, 256, "_by_positions")):
        rng = np.random.default_rng(0)
        a, d = rng.standard_normal((3, n_pos, width)), rng.standard_normal((3, 1, n_pos, width))
        original = getattr(_positions, expected)

        def spy(*args, original=original, expected=expected):
            calls.append(expected)
            return original(*args)

        setattr(_positions, expected, spy)
        try:
            out = _positions.shared_layer_ntk(P, a, None, d, None, 1)
        finally:
            setattr(_positions, expected, original)
        brute = np.einsum("ipf,jqf,ipo,jqo->ij", a, a, d[:, 0], d[:, 0]) + \
            np.einsum("ipo,jqo->ij", d[:, 0], d[:, 0])
        np.testing.assert_allclose(out, brute, rtol=1e-12)
    assert calls == ["_by_gradients", "_by_positions"]


def _axis(size, k, stride, padding):
    """(input index or None) for each output and tap: JAX's padding (smaller half before)."""
    if padding == "valid":
        out, before = (size - k) // stride + 1, 0
    else:
        out = -(-size // stride)
        before = max((out - 1) * stride + k - size, 0) // 2
    rows = []
    for o in range(out):
        taps = []
        for t in range(k):
            i = o * stride + t - before
            taps.append(i % size if padding == "circular" else (i if 0 <= i < size else None))
        rows.append(taps)
    return rows


def test_forward_matches_a_position_by_position_loop():
    spec = "conv(k=3:2, stride=2:1, w_std=1.3, b_std=0.4), erf, " \
           "conv(k=2, padding=circular, b_std=0.2), avg_pool(k=2, stride=1, padding=same), " \
           "flatten, dense(b_std=0.3)"
    net = FiniteNetwork(spec, [3, 2], input_shape=(5, 4, 2), n_outputs=2, seed=0)
    x = np.random.default_rng(1).standard_normal((2, 5, 4, 2))
    layers = list(net.spec)
    expected = []
    for image in x:
        params = iter(net.dense)
        h = image
        for layer in layers:
            if isinstance(layer, lk.Conv):
                p = next(params)
                ky, kx = (int(v) for v in (layer.k if isinstance(layer.k, tuple)
                                           else (layer.k, layer.k)))
                sy, sx = (int(v) for v in (layer.stride if isinstance(layer.stride, tuple)
                                           else (layer.stride, layer.stride)))
                rows = _axis(h.shape[0], ky, sy, layer.padding)
                cols = _axis(h.shape[1], kx, sx, layer.padding)
                w = p.w.reshape(ky, kx, h.shape[2], -1)
                out = np.zeros((len(rows), len(cols), w.shape[3]))
                for oy, ry in enumerate(rows):
                    for ox, rx in enumerate(cols):
                        for ty, iy in enumerate(ry):
                            for tx, ix in enumerate(rx):
                                if iy is not None and ix is not None:
                                    out[oy, ox] += h[iy, ix] @ w[ty, tx]
                n = ky * kx * h.shape[2]
                h = layer.w_std / math.sqrt(n) * out + layer.b_std * p.b
            elif isinstance(layer, lk.AvgPool):
                rows = _axis(h.shape[0], 2, 1, "same")
                cols = _axis(h.shape[1], 2, 1, "same")
                out = np.zeros((len(rows), len(cols), h.shape[2]))
                for oy, ry in enumerate(rows):
                    for ox, rx in enumerate(cols):
                        for iy in ry:
                            for ix in rx:
                                if iy is not None and ix is not None:
                                    out[oy, ox] += h[iy, ix] / 4
                h = out
            elif isinstance(layer, lk.Flatten):
                h = h.reshape(-1)
            elif isinstance(layer, lk.Dense):
                p = next(params)
                h = layer.w_std / math.sqrt(h.size) * h @ p.w + layer.b_std * p.b
            else:
                h = erf(h)
        expected.append(h)
    np.testing.assert_allclose(net.forward(x), np.array(expected), rtol=1e-12)


# ------------------------------------------------------------ against the limit


def _draws(spec, x, width, seeds, base):
    nets = [FiniteNetwork(spec, width, input_shape=x.shape[1:], seed=[base, s, width])
            for s in range(seeds)]
    kernels = [net.kernels(x) for net in nets]
    iu = np.triu_indices(x.shape[0])
    return {k: np.array([d[k][iu] for d in kernels]) for k in ("nngp", "ntk")}, iu, nets[0]


@pytest.mark.parametrize("spec, shape", [
    ("conv(k=3, w_std=1.4, b_std=0.3), relu, flatten, dense(w_std=1.1, b_std=0.2)",
     (4, 4, 2)),
    (("conv(k=2, stride=2, padding=valid, w_std=1.3, b_std=0.1), erf, "
     "avg_pool(k=2, stride=1), global_avg_pool, dense(b_std=0.3)"), (5, 5, 2)),
    (("conv(k=3, padding=circular, w_std=1.2, b_std=0.2, parameterization=standard), "
     "relu, global_avg_pool, dense(parameterization=standard, b_std=0.1)"), (6, 2)),
])
def test_one_hidden_layer_kernels_are_unbiased(spec, shape):
    # One hidden conv layer: both empirical kernels are averages over its
    # channels of i.i.d. terms whose expectation is the limit (the readout's
    # weights are independent of them), so there is no 1/width bias and the
    # mean over 100 seeds is within 4 standard errors (se = sd/√M) of the limit.
    x = np.random.default_rng(0).standard_normal((3,) + shape)
    draws, iu, net = _draws(spec, x, 24, 100, base=3)
    limit = lk.kernel(net.limit_spec(), x)
    for kind in ("nngp", "ntk"):
        mean = draws[kind].mean(0)
        se = draws[kind].std(0, ddof=1) / math.sqrt(100)
        assert np.all(np.abs(mean - limit[kind][iu]) <= 4 * se), kind


@pytest.mark.parametrize("spec, shape", [
    (("conv(k=3, w_std=1.4, b_std=0.2), relu, conv(k=2, stride=2, w_std=1.3), relu, "
     "global_avg_pool, dense(w_std=1.2, b_std=0.1)"), (4, 4, 1)),
    (("conv(k=3, padding=circular, w_std=1.3, b_std=0.2), "
     "residual[erf, conv(k=3, b_std=0.1)], layernorm, relu, flatten, dense(b_std=0.2)"),
     (5, 2)),
])
def test_deep_kernels_converge_after_removing_the_1_over_width_bias(spec, shape):
    # Two hidden layers: E[K̂] = K + b/n + O(1/n²). Richardson extrapolation
    # from widths n and 4n, (4 m_4n − m_n)/3, cancels b/n; its standard error
    # is √(16 se_4n² + se_n²)/3 (independent seeds), and the extrapolate is
    # within 4 of them of the limit.
    x = np.random.default_rng(1).standard_normal((3,) + shape)
    seeds = 300
    small, iu, _ = _draws(spec, x, 8, seeds, base=5)
    large, _, net = _draws(spec, x, 32, seeds, base=5)
    limit = lk.kernel(net.limit_spec(), x)
    for kind in ("nngp", "ntk"):
        m1, m4 = small[kind].mean(0), large[kind].mean(0)
        se1 = small[kind].std(0, ddof=1) / math.sqrt(seeds)
        se4 = large[kind].std(0, ddof=1) / math.sqrt(seeds)
        extrapolated = (4 * m4 - m1) / 3
        se = np.sqrt(16 * se4 ** 2 + se1 ** 2) / 3
        assert np.all(np.abs(extrapolated - limit[kind][iu]) <= 4 * se), kind


# ------------------------------------------------------------ training


def _loss(net, x, targets, kind):
    f = net.forward(x)
    n, c = f.shape
    if kind == "mse":
        return 0.5 * np.sum((f - targets) ** 2) / (n * c)
    log_p = f - np.log(np.exp(f).sum(axis=1, keepdims=True))
    return -np.sum(targets * log_p) / (n * c)


@pytest.mark.parametrize("kind", ["mse", "cross_entropy"])
@pytest.mark.parametrize("name", ["same-valid-pool-circular", "sequence-standard-residual"])
def test_one_step_moves_every_parameter_by_minus_lr_times_gradient(kind, name):
    spec, shape = SPECS[name]
    net = FiniteNetwork(spec, 3, input_shape=shape, n_outputs=3, seed=2)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4,) + shape)
    y = rng.standard_normal((4, 3)) if kind == "mse" else np.array([0, 2, 1, 1])
    targets = y if kind == "mse" else np.eye(3)[y]
    eta = 0.7
    grads = fd_gradient(net, lambda: _loss(net, x, targets, kind))
    before = [p.copy() for p in net_params(net)]
    net.train(x, y, 1, learning_rate=eta, loss=kind)
    for p0, p1, g in zip(before, net_params(net), grads):
        np.testing.assert_allclose(p1, p0 - eta * g, rtol=0, atol=1e-8)


def test_training_records_outputs_and_ntk_of_images():
    spec, shape = SPECS["strided-rect-flatten"]
    net = FiniteNetwork(spec, 6, input_shape=shape, seed=0)
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((5,) + shape), rng.standard_normal(5)
    start = net.copy()
    h = net.train(x, y, 30, learning_rate=0.5, x_test=x[:2], record_at=[0, 30], ntk_x=x[:3])
    assert h.loss[-1] < h.loss[0]
    np.testing.assert_allclose(h.test_outputs[0], start(x[:2]), rtol=1e-14)
    np.testing.assert_allclose(h.ntk[0], start.ntk(x[:3]), rtol=1e-13)
    np.testing.assert_allclose(h.ntk[-1], net.ntk(x[:3]), rtol=1e-13)


# ------------------------------------------------------------ widths, shapes, errors


def test_widths_and_limit_spec_of_conv_layers():
    spec = "conv(parameterization=standard), relu, conv(k=2, parameterization=standard), " \
           "relu, flatten, dense(parameterization=standard), relu, " \
           "dense(parameterization=standard)"
    net = FiniteNetwork(spec, [4, 5, 6], input_shape=(3, 3, 2), seed=0)
    assert [p.w.shape for p in net.dense] == [(18, 4), (16, 5), (45, 6), (6, 1)]
    widths = [layer.width for layer in net.limit_spec() if isinstance(layer, (lk.Conv, lk.Dense))]
    assert widths == [4, 5, 6, None]
    assert limit_spec(spec, [4, 5, 6]) == net.limit_spec()
    # One int: every conv and hidden dense layer; residual branches keep the
    # block input's channels, also after a flatten.
    res = "conv, relu, residual[conv, relu, conv], flatten, residual[dense], dense"
    net = FiniteNetwork(res, 7, input_shape=(4, 2), seed=0)
    assert net.widths == (7, 7, 7, 28)


def test_sequences_images_and_vectors_are_told_apart():
    net = FiniteNetwork("conv, relu, global_avg_pool, dense", 4, input_shape=(6, 2), seed=0)
    assert net.forward(np.ones((3, 6, 2))).shape == (3, 1)
    with pytest.raises(ValueError, match=r"inputs of shape \(5, 2\) but the network was "
                                         r"built with input_shape=\(6, 2\)"):
        net.forward(np.ones((3, 5, 2)))
    with pytest.raises(ValueError, match="disagrees with input_shape"):
        FiniteNetwork("conv, flatten, dense", 4, n_features=2, input_shape=(6, 2))
    with pytest.raises(ValueError, match="input_shape must be"):
        FiniteNetwork("conv, flatten, dense", 4, input_shape=(6, 0))
    with pytest.raises(ValueError, match="give input_shape"):
        FiniteNetwork("conv, flatten, dense", 4)
    with pytest.raises(lk.SpecError, match="needs a spatial input"):
        FiniteNetwork("conv, flatten, dense", 4, n_features=3)
    # n_features keeps working for vectors, and equals input_shape=(d,).
    a = FiniteNetwork("dense, relu, dense", 4, n_features=3, seed=1)
    b = FiniteNetwork("dense, relu, dense", 4, input_shape=(3,), seed=1)
    x = np.ones((2, 3))
    np.testing.assert_array_equal(a(x), b(x))


# ------------------------------------------------------------ against the limit: experiments


def test_flow_on_images_equals_the_flow_on_vectors_of_the_same_network():
    # On 1 × 1 images a conv with k = 1 is a dense layer on the channels, so the
    # limiting Gaussian of "conv(k=1), relu, flatten, dense" on them is that of
    # "dense, relu, dense" on the channel vectors, which GradientFlowEnsemble
    # computes by its own path.
    from limitkernel.experiments import flow_ensemble, flow_predict

    rng = np.random.default_rng(0)
    x, xt, y = rng.standard_normal((6, 3)), rng.standard_normal((4, 3)), rng.standard_normal((6, 2))
    image = "conv(k=1, w_std=1.3, b_std=0.2), relu, flatten, dense(b_std=0.1)"
    vector = "dense(w_std=1.3, b_std=0.2), relu, dense(b_std=0.1)"
    ens = flow_ensemble(image, x[:, None, None, :], y, 0.7)
    mean, var = flow_predict(ens, xt[:, None, None, :], 5.0)
    ref = lk.GradientFlowEnsemble(vector, x, y, learning_rate=0.7).predict(
        xt, t=5.0, get="ntk", cov="var")["ntk"]
    np.testing.assert_allclose(mean, ref.mean, rtol=1e-10)
    np.testing.assert_allclose(var, ref.var, rtol=1e-10)


def test_compare_runs_the_three_experiments_on_sequences():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 5, 2)), rng.standard_normal(6)
    spec = "conv(k=3, w_std=1.3, b_std=0.1), relu, conv(k=2, stride=2), relu, flatten, dense"
    result = lk.compare(spec, x, y, x_test=x[:3], widths=(8, 32), seeds=3, steps=20,
                        learning_rate=0.5, x_kernel=x[:4], n_jobs=1)
    run = result.run(32)
    assert run.init_distance.shape == (3,) and run.outputs.shape == (3, 3)
    assert np.isfinite(result.init_slope) and 0 <= run.inside <= 1
    # The recorded distance is that of a network built the same way.
    net = FiniteNetwork(spec, 32, input_shape=(5, 2),
                        seed=np.random.default_rng([0, 0, 32]))
    theta = lk.kernel(spec, x[:4])["ntk"]
    assert run.init_distance[0] == pytest.approx(
        np.linalg.norm(net.ntk(x[:4]) - theta) / np.linalg.norm(theta), rel=1e-12)
    sweep = lk.ntk_distance_at_init(spec, x[:4], widths=(8, 32), seeds=2, n_jobs=1)
    assert sweep.distance.shape == (2, 2)


def test_cli_compare_on_images(tmp_path):
    import subprocess
    import sys

    rng = np.random.default_rng(1)
    np.savez(tmp_path / "images.npz", x=rng.standard_normal((5, 4, 4, 1)),
             y=rng.standard_normal(5))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "limitkernel.cli", "compare", "--arch",
         "conv(k=3, w_std=1.2), relu, global_avg_pool, dense", "--data",
         str(tmp_path / "images.npz"), "--widths", "8,16", "--seeds", "2", "--steps", "10",
         "--lr", "0.5", "--kernel-inputs", "3", "--out-dir", str(out)],
        capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "log-log slope" in proc.stdout and (out / "summary.json").exists()
    bad = subprocess.run(
        [sys.executable, "-m", "limitkernel.cli", "compare", "--arch", "conv, flatten, dense",
         "--data", str(tmp_path / "images.npz"), "--kernel-inputs", "0"],
        capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
