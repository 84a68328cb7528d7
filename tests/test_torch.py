"""PyTorch interoperability: specs from torch models and back, empirical NTKs.

References: per-example gradients from ``torch.autograd.grad`` (a brute-force
Jacobian, no torch.func), Monte Carlo over torch networks at initialisation
(tolerances from the standard error), and the exact statistics of PyTorch's
default initialisation.
"""

import math
import sys

import numpy as np
import pytest

import limitkernel as lk
from limitkernel.finite import FiniteNetwork
from limitkernel.spec import SpecError, parse


def test_missing_torch_says_how_to_install(monkeypatch):
    from limitkernel import torch_interop

    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"pip install 'limitkernel\[torch\]'"):
        torch_interop.from_torch(object())


torch = pytest.importorskip("torch")
ti = pytest.importorskip("limitkernel.torch_interop")
nn = torch.nn

ROUND_TRIP = [
    "dense(w_std=1.3, b_std=0.2), relu, dense",
    "dense(parameterization=standard, width=48), tanh, dense(parameterization=standard)",
    "dense, leaky_relu(alpha=0.2), dense, gelu, dense, silu, dense",
    "dense, elu, dense, softplus, dense, softsign, identity, dense",
    "dense(b_std=0.3), layernorm(eps=1e-05), relu, dense",
    "dense, relu, dropout(p=0.2), dense",
    "dense, 3 * [residual(alpha=0.5, beta=0.7)[relu, dense(b_std=0.1)]], relu, dense",
    "dense, parallel[relu, dense; tanh, dense], relu, dense",
    "dense, concat(widths=1:3)[relu, dense; tanh, dense], dense",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_through_torch(text):
    model = ti.to_torch(text, d=5, width=32, seed=1)
    assert ti.from_torch(model) == parse(text)


def test_hand_built_model_of_every_kind():
    model = nn.Sequential(
        nn.Linear(6, 40), nn.ReLU(),
        nn.Sequential(nn.Linear(40, 40), nn.LeakyReLU(0.1)),
        ti.Residual(nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 40), beta=0.5),
        nn.LayerNorm(40), nn.GELU(), nn.Linear(40, 40), nn.Dropout(0.1),
        ti.Concat(nn.Sequential(nn.ReLU(), nn.Linear(40, 10)),
                  nn.Sequential(nn.ELU(), nn.Linear(40, 30))),
        nn.Linear(40, 3),
    )
    std = ("parameterization=standard", "width=")
    expected = parse(
        "dense(w_std=2, b_std=0.5, {0}, {1}40), relu, dense(w_std=2, b_std=0.5, {0}, {1}40), "
        "leaky_relu(alpha=0.1), residual(beta=0.5)[dense(w_std=2, b_std=0.5, {0}, {1}40), tanh, "
        "dense(w_std=2, b_std=0.5, {0}, {1}40)], layernorm(eps=1e-05), gelu, "
        "dense(w_std=2, b_std=0.5, {0}, {1}40), dropout(p=0.1), "
        "concat(widths=1:3)[relu, dense(w_std=2, b_std=0.5, {0}, {1}10); elu, "
        "dense(w_std=2, b_std=0.5, {0}, {1}30)], dense(w_std=2, b_std=0.5, {0})".format(*std))
    assert ti.from_torch(model, w_std=2, b_std=0.5) == expected
    # in eval mode dropout is the identity and drops out of the spec
    model.eval()
    assert "dropout" not in str(ti.from_torch(model, w_std=2, b_std=0.5))


def test_scales_are_read_from_default_initialisation():
    """nn.Linear draws W and b from U(−1/√fan_in, 1/√fan_in): σ_w = 1/√3 and
    σ_b = 1/√(3 fan_in). For N draws of U(−a, a), the mean square has relative
    standard error √(0.8/N) (Var w² = 4a⁴/45, E w² = a²/3), so the root mean
    square has half that; check within 5 of them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 400), nn.ReLU(), nn.Linear(400, 1))
    spec = ti.from_torch(model)
    first, last = spec.layers[0], spec.layers[-1]
    for got, want, count in [(first.w_std, 1 / math.sqrt(3), 64 * 400),
                             (first.b_std, 1 / math.sqrt(3 * 64), 400),
                             (last.w_std, 1 / math.sqrt(3), 400)]:
        assert abs(got / want - 1) <= 5 * 0.5 * math.sqrt(0.8 / count)
    assert (first.parameterization, first.width, last.width) == ("standard", 400, None)


@pytest.mark.parametrize("module, words", [
    (nn.MaxPool1d(2), "MaxPool1d"),
    (nn.GELU(approximate="tanh"), "GELU"),
    (nn.ELU(alpha=2.0), "ELU"),
    (nn.LayerNorm((4, 4)), "last axis"),
    (nn.Sigmoid(), "Sigmoid"),
])
def test_unsupported_modules_are_named(module, words):
    model = nn.Sequential(nn.Linear(4, 4), module, nn.Linear(4, 1))
    with pytest.raises(SpecError, match=words) as err:
        ti.from_torch(model)
    assert "model[1]" in str(err.value)
    if words != "last axis":
        assert "supported: Linear" in str(err.value)


# ------------------------------------------------------------ empirical NTK


def _brute_force_ntk(model, x):
    """Σ_p ∂f_c(x_i)/∂p ∂f_c(x_j)/∂p / k from one autograd.grad per example and output."""
    params = [p for p in model.parameters()]
    grads = []
    for xi in torch.as_tensor(x, dtype=torch.float64):
        out = model(xi[None, :])[0]
        rows = []
        for c in range(out.shape[0]):
            g = torch.autograd.grad(out[c], params, retain_graph=True)
            rows.append(torch.cat([t.reshape(-1) for t in g]))
        grads.append(torch.stack(rows))
    g = torch.stack(grads)  # (n, k, P)
    return (torch.einsum("ikp,jkp->ij", g, g) / g.shape[1]).numpy()


def test_empirical_ntk_equals_brute_force_jacobians():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), ti.Residual(nn.Linear(16, 16)),
                          nn.LayerNorm(16), nn.Linear(16, 3)).double()
    x = np.random.default_rng(0).standard_normal((7, 5))
    ref = _brute_force_ntk(model, x)
    np.testing.assert_allclose(ti.empirical_ntk_torch(model, x, batch_size=3), ref,
                               rtol=1e-12, atol=1e-12)
    cross = ti.empirical_ntk_torch(model, x[:3], x[3:])
    np.testing.assert_allclose(cross, ref[:3, 3:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("text", [
    "dense(w_std=1.3, b_std=0.2), relu, dense(w_std=1.3)",
    "dense, residual(alpha=0.5)[relu, dense(b_std=0.1)], layernorm, tanh, dense",
    "dense, relu, dense, dropout(p=0.2), dense",
    "dense(parameterization=standard, width=512), tanh, dense(parameterization=standard)",
])
def test_wide_torch_models_approach_the_limit(text):
    """Empirical NTK of 30 torch networks of width 512 at initialisation (float64,
    training mode): each is unbiased up to the O(1/width) finite-width correction,
    so |mean − limit| ≤ 5 se + scale/width, se the standard error of the mean
    (with 29 degrees of freedom, a 5-se deviation has probability 3e-5)."""
    x = np.random.default_rng(0).standard_normal((5, 8))
    limit = lk.kernel(text, x)["ntk"]
    draws, width = 30, 512
    est = []
    for seed in range(draws):
        model = ti.to_torch(text, d=8, width=width, seed=seed, dtype=torch.float64)
        torch.manual_seed(seed)  # dropout masks
        est.append(ti.empirical_ntk_torch(model.train(), x))
    est = np.array(est)
    se = est.std(0, ddof=1) / math.sqrt(draws)
    err = np.abs(est.mean(0) - limit)
    assert np.all(err <= 5 * se + np.max(np.abs(limit)) / width), err / se


def test_default_torch_model_approaches_its_spec():
    """A plain nn.Linear model with PyTorch's own initialisation: its spec (scales
    read from the weights, standard parameterisation with its widths) predicts its
    empirical NTK. Over 30 seeds the mean is within 5 se + scale/width."""
    x = np.random.default_rng(1).standard_normal((5, 8))
    est, limits = [], []
    for seed in range(30):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(8, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                              nn.Linear(512, 1)).double()
        est.append(ti.empirical_ntk_torch(model, x))
        # the limit of the law the weights were drawn from: σ_w = 1/√3, σ_b = 1/√(3 fan_in)
        w, b0, b1 = 1 / math.sqrt(3), 1 / math.sqrt(24), 1 / math.sqrt(3 * 512)
        spec = (f"dense(w_std={w}, b_std={b0}, parameterization=standard, width=512), relu, "
                f"dense(w_std={w}, b_std={b1}, parameterization=standard, width=512), relu, "
                f"dense(w_std={w}, b_std={b1}, parameterization=standard)")
        limits.append(lk.kernel(spec, x)["ntk"])
        read = lk.kernel(ti.from_torch(model), x)["ntk"]
        # the read scales are within sampling error of the true ones
        np.testing.assert_allclose(read, limits[-1], rtol=0.05)
    est, limit = np.array(est), limits[0]
    se = est.std(0, ddof=1) / math.sqrt(len(est))
    err = np.abs(est.mean(0) - limit)
    assert np.all(err <= 5 * se + np.max(np.abs(limit)) / 512), err / se


# ------------------------------------------------------------ convolutional models

CONV_ROUND_TRIP = [
    (("conv(k=3, w_std=1.3, b_std=0.2), relu, conv(k=2, padding=valid, stride=2), tanh, "
     "avg_pool(k=2), conv(k=3:2, padding=circular), global_avg_pool, dense"), (8, 8, 2)),
    ("conv(k=3, stride=2), relu, residual[conv, relu, conv], flatten, dense", (7, 6, 1)),
    (("conv(parameterization=standard, width=16), relu, "
     "conv(k=4, padding=circular, parameterization=standard, width=16), relu, "
     "avg_pool(k=3, stride=1, padding=same), flatten, dense(parameterization=standard)"),
     (10, 3)),
    (("conv(k=2, padding=valid, stride=2, parameterization=standard, width=8), gelu, "
     "global_avg_pool, dense(parameterization=standard, width=8), relu, "
     "dense(parameterization=standard)"), (9, 9, 2)),
]


@pytest.mark.parametrize("text, shape", CONV_ROUND_TRIP)
def test_conv_round_trip_through_torch(text, shape):
    model = ti.to_torch(text, width=16 if "width" not in text else 8, input_shape=shape,
                        seed=1)
    assert ti.from_torch(model) == parse(text)
    x = np.random.default_rng(0).standard_normal((2,) + shape)
    out = model(torch.as_tensor(np.moveaxis(x, -1, 1), dtype=torch.float32))
    assert out.shape == (2, 1)


def test_hand_built_conv_model():
    model = nn.Sequential(
        nn.Conv2d(3, 20, 3, padding=1), nn.ReLU(),
        nn.Conv2d(20, 20, 5, padding="same", padding_mode="circular"), nn.ReLU(),
        nn.Conv2d(20, 20, (2, 3), stride=2), nn.ReLU(),
        nn.AvgPool2d(3, stride=1, padding=1), nn.AvgPool2d(2),
        ti.Residual(nn.Conv2d(20, 20, 3, padding=1)),
        nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(20, 2))
    std = "parameterization=standard, width=20"
    expected = parse(
        f"conv(w_std=2, b_std=0.5, {std}), relu, "
        f"conv(k=5, padding=circular, w_std=2, b_std=0.5, {std}), relu, "
        f"conv(k=2:3, padding=valid, stride=2, w_std=2, b_std=0.5, {std}), relu, "
        "avg_pool(k=3, stride=1, padding=same), avg_pool(k=2), "
        f"residual[conv(w_std=2, b_std=0.5, {std})], global_avg_pool, "
        "dense(w_std=2, b_std=0.5, parameterization=standard)")
    assert ti.from_torch(model, w_std=2, b_std=0.5) == expected
    seq = nn.Sequential(nn.Conv1d(2, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6, 1))
    assert ti.from_torch(seq, w_std=1, b_std=0) == parse(
        "conv(padding=valid, parameterization=standard, width=8), relu, flatten, "
        "dense(parameterization=standard)")


@pytest.mark.parametrize("module, words", [
    (nn.Conv2d(4, 4, 3, stride=2, padding=1), "stride"),
    (nn.Conv2d(4, 4, 3, dilation=2), "dilation"),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode"),
    (nn.AvgPool2d(3, stride=2, padding=1), "average pooling"),
    (nn.AdaptiveAvgPool2d(2), "output_size=1"),
    (nn.LayerNorm(4), "last axis"),
    (nn.Linear(4, 4), "last axis"),
])
def test_unsupported_conv_modules_are_named(module, words):
    model = nn.Sequential(nn.Conv2d(4, 4, 3), module, nn.Flatten(), nn.Linear(4, 1))
    with pytest.raises(SpecError, match=words) as err:
        ti.from_torch(model)
    assert "model[1]" in str(err.value)


def _copy_into_finite(model, net):
    """The torch model's parameters, in the finite network's layout (channels last,
    conv weights as (k_y·k_x·C_in, C_out))."""
    convs = (nn.Conv1d, nn.Conv2d, ti.NTKConv)
    mods = [m for m in model.modules() if isinstance(m, convs + (nn.Linear, ti.NTKLinear))]
    assert len(mods) == len(net.dense)
    for m, p in zip(mods, net.dense):
        w = m.weight.detach().double()
        if isinstance(m, convs):
            w = w.reshape(w.shape[0], w.shape[1], -1, w.shape[-1])  # (out, in, ky, kx)
            w = w.permute(2, 3, 1, 0).reshape(-1, w.shape[0])
        else:
            w = w.T
        p.w[...] = w.numpy()
        p.b[...] = m.bias.detach().double().numpy()


@pytest.mark.parametrize("text, shape", [
    (("conv(k=3, stride=2, w_std=1.3, b_std=0.2), relu, conv(k=2:3, padding=circular), "
     "tanh, avg_pool(k=3, stride=1, padding=same), conv(k=2, padding=valid, b_std=0.3), "
     "global_avg_pool, dense(b_std=0.1)"), (7, 6, 2)),
    (("conv(k=4, padding=circular, parameterization=standard, b_std=0.2), relu, "
     "conv(k=3, stride=2, padding=valid, parameterization=standard), relu, "
     "global_avg_pool, dense(parameterization=standard, b_std=0.1)"), (9, 3)),
])
def test_torch_cnn_equals_the_finite_network_of_its_spec(text, shape):
    # The same weights in both: outputs, and the finite network's exact NTK
    # against the torch model's per-example autograd Jacobians (an independent
    # implementation of the layouts and paddings).
    model = ti.to_torch(text, width=5, input_shape=shape, seed=2, dtype=torch.float64)
    net = FiniteNetwork(ti.from_torch(model) if "standard" in text else text, 5,
                        input_shape=shape, seed=0)
    _copy_into_finite(model, net)
    x = np.random.default_rng(3).standard_normal((4,) + shape)
    xt = np.moveaxis(x, -1, 1)
    with torch.no_grad():
        out = model(torch.as_tensor(xt)).numpy()
    np.testing.assert_allclose(net.forward(x), out, rtol=1e-12, atol=1e-14)
    ref = _brute_force_ntk(model, xt)
    np.testing.assert_allclose(net.ntk(x), ref, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(ti.empirical_ntk_torch(model, x, channels_last=True), ref,
                               rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(ti.empirical_ntk_torch(model, xt[:2], xt[2:], batch_size=1),
                               ref[:2, 2:], rtol=1e-12, atol=1e-13)


def test_compare_puts_a_torch_cnn_beside_the_limit():
    text = "conv(k=3, w_std=1.3, b_std=0.1), relu, global_avg_pool, dense"
    model = ti.to_torch(text, width=64, input_shape=(5, 2), seed=0, dtype=torch.float64)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 5, 2)), rng.standard_normal(6)
    result = lk.compare(None, x, y, widths=(8, 32), seeds=2, steps=5, learning_rate=0.5,
                        torch_model=model, n_jobs=1)
    theta = lk.kernel(text, x)["ntk"]
    empirical = ti.empirical_ntk_torch(model, x, channels_last=True)
    assert result.spec == str(parse(text))
    assert result.torch["init_distance"] == pytest.approx(
        np.linalg.norm(empirical - theta) / np.linalg.norm(theta), rel=1e-12)
