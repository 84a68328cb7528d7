"""Finite networks with residual, parallel, concat, layernorm and dropout layers.

References, all independent of the code under test: central finite differences
over every parameter (the empirical NTK and one gradient step), the slow
per-layer network of ``tests/mc_networks.py`` run on the same weights, and the
infinite-width kernels of :func:`limitkernel.kernel` for means over seeds.
"""

import math

import numpy as np
import pytest
from mc_networks import FiniteNetwork as ReferenceNetwork
from naive import fd_gradient, fd_jacobian, net_params

import limitkernel as lk
from limitkernel.finite import FiniteNetwork, limit_spec

SPECS = {
    "residual": "dense(w_std=1.2, b_std=0.3), relu, "
                "residual(alpha=0.8, beta=0.6)[dense(b_std=0.2), erf, dense(w_std=1.1)], "
                "dense(b_std=0.1)",
    "parallel": "dense(b_std=0.2), parallel[relu, dense(w_std=1.3); erf, dense(b_std=0.4)], "
                "tanh, dense",
    "concat": "dense(w_std=1.1), concat(widths=1:3)[relu, dense; erf, dense(b_std=0.3)], "
              "dense(b_std=0.2)",
    "layernorm": "dense(w_std=1.3, b_std=0.4), layernorm(eps=0.01), erf, dense(b_std=0.1)",
    "dropout": "dense(w_std=1.2, b_std=0.3), relu, dropout(p=0.3), dense(b_std=0.2)",
    "standard-residual": "dense(parameterization=standard, b_std=0.2), relu, "
                         "residual[dense(parameterization=standard), erf, "
                         "dense(parameterization=standard)], identity, "
                         "dense(parameterization=standard, b_std=0.1)",
}


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("n_outputs", [1, 2])
def test_ntk_equals_brute_force_jacobian_product(name, n_outputs):
    # Dropout: a fixed dropout_seed gives the same masks in every forward pass,
    # so the network is a deterministic function of its parameters.
    net = FiniteNetwork(SPECS[name], 4, n_features=3, n_outputs=n_outputs, seed=5)
    x = np.random.default_rng(6).standard_normal((3, 3))
    jac = fd_jacobian(net, x, dropout_seed=9)
    brute = (jac @ jac.T).reshape(3, n_outputs, 3, n_outputs).transpose(0, 2, 1, 3)
    ntk = net.ntk(x, dropout_seed=9)
    np.testing.assert_allclose(ntk.reshape(brute.shape), brute, rtol=1e-6, atol=1e-7)
    # Two input sets: their own masks (drawn one after the other), the same
    # Jacobian product between the two halves of one batch drawn the same way.
    x2 = np.random.default_rng(7).standard_normal((2, 3))
    j1 = fd_jacobian(net, x, dropout_seed=11)
    cross = net.ntk(x, x2, dropout_seed=11)
    if name != "dropout":
        j2 = fd_jacobian(net, x2)
        brute = (j1 @ j2.T).reshape(3, n_outputs, 2, n_outputs).transpose(0, 2, 1, 3)
        np.testing.assert_allclose(cross.reshape(brute.shape), brute, rtol=1e-6, atol=1e-7)
    else:
        assert np.all(np.isfinite(cross))


def test_dropout_masks_differ_between_calls_without_a_seed():
    net = FiniteNetwork(SPECS["dropout"], 16, n_features=3, seed=1)
    x = np.ones((2, 3))
    a, b = net.forward(x), net.forward(x)
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(net.forward(x, dropout_seed=3), net.forward(x, dropout_seed=3))


def _reference_weights(nodes):
    """The reference network's dense layers, depth first (its own build order)."""
    out = []
    for node in nodes:
        if node[0] == "dense":
            out.append(node)
        elif node[0] == "residual":
            out += _reference_weights(node[3])
        elif node[0] in ("parallel", "concat"):
            for branch in node[1]:
                out += _reference_weights(branch)
    return out


@pytest.mark.parametrize("name", ["residual", "parallel", "concat", "layernorm",
                                  "standard-residual"])
def test_same_weights_as_the_reference_network_give_the_same_kernels(name):
    # The reference draws its own weights and widths; copying them into a
    # FiniteNetwork of the same spec and width must give the same outputs and
    # kernels up to rounding (the widths must therefore agree too).
    x = np.random.default_rng(2).standard_normal((5, 3))
    ref = ReferenceNetwork(SPECS[name], 3, 24, np.random.default_rng(3))
    nngp_ref, ntk_ref, out_ref = ref.kernels(x)
    net = FiniteNetwork(SPECS[name], 24, n_features=3, seed=0)
    dense = _reference_weights(ref.tree)
    assert [p.w.shape for p in net.dense] == [node[1].T.shape for node in dense]
    for params, node in zip(net.dense, dense):
        params.w[...] = node[1].T
        params.b[...] = node[2]
    kernels = net.kernels(x)
    np.testing.assert_allclose(net.forward(x)[:, 0], out_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(kernels["nngp"], nngp_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(kernels["ntk"], ntk_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["residual", "concat", "layernorm"])
def test_one_step_moves_every_parameter_by_minus_lr_times_gradient(name):
    # ½·mean squared error; its gradient by central differences.
    net = FiniteNetwork(SPECS[name], 3, n_features=3, n_outputs=2, seed=4)
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))

    def loss():
        return 0.5 * np.mean((net.forward(x) - y) ** 2)

    eta = 0.6
    grads = fd_gradient(net, loss)
    before = [p.copy() for p in net_params(net)]
    net.train(x, y, 1, learning_rate=eta)
    for p0, p1, g in zip(before, net_params(net), grads):
        np.testing.assert_allclose(p1, p0 - eta * g, rtol=0, atol=1e-8)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_mean_over_seeds_is_the_limit(name):
    # M = 60 networks of width n = 256. The empirical kernels' mean differs from
    # the limit by the sampling error (se = sd/√M; 4 se allowed) plus the
    # finite-width bias E[K̂] − K = b/n + O(1/n²). For these networks (two or
    # three hidden layers) the bias constant was measured once from 400 seeds at
    # width 32: max |b| = n·max|m_n − K| is at most 0.93·max|K|, with a
    # sampling error of about 0.6·max|K|; 4·max|K|/n is allowed for it.
    seeds, width = 60, 256
    x = np.random.default_rng(0).standard_normal((4, 3))
    draws = {"nngp": [], "ntk": []}
    for s in range(seeds):
        net = FiniteNetwork(SPECS[name], width, n_features=3, seed=[17, s])
        k = net.kernels(x)
        for kind, values in draws.items():
            values.append(k[kind])
        limit = lk.kernel(net.limit_spec(), x)
    for kind, values in draws.items():
        d = np.array(values)
        mean, se = d.mean(0), d.std(0, ddof=1) / math.sqrt(seeds)
        allowance = 4 * se + 4 * np.abs(limit[kind]).max() / width
        assert np.all(np.abs(mean - limit[kind]) <= allowance), (kind, mean, limit[kind])


def test_widths_in_branches_and_their_errors():
    spec = "dense, residual[dense, relu, dense], concat(widths=1:3)[relu, dense; dense], dense"
    net = FiniteNetwork(spec, 8, n_features=2, seed=0)
    # Residual branch: the block input's width; concat: 8·2·(1/4, 3/4).
    assert net.widths == (8, 8, 8, 4, 12)
    assert net.dense[-1].fan_in == 16
    net = FiniteNetwork(spec, [5, 7, 5, 2, 3], n_features=2, seed=0)
    assert net.dense[-1].fan_in == 5
    with pytest.raises(ValueError, match="skip connection needs them equal"):
        FiniteNetwork(spec, [5, 7, 6, 2, 3], n_features=2)
    with pytest.raises(ValueError, match="sum needs them equal"):
        FiniteNetwork("dense, parallel[dense; relu, dense], dense", [4, 5, 6], n_features=2)
    with pytest.raises(ValueError, match="5 hidden dense"):
        FiniteNetwork(spec, [5, 7], n_features=2)


def test_limit_spec_carries_standard_widths_into_branches():
    spec = SPECS["standard-residual"]
    limit = limit_spec(spec, 6, n_features=3)
    assert limit == FiniteNetwork(spec, 6, n_features=3).limit_spec()
    expected = lk.parse(
        "dense(parameterization=standard, b_std=0.2, width=6), relu, "
        "residual[dense(parameterization=standard, width=6), erf, "
        "dense(parameterization=standard, width=6)], identity, "
        "dense(parameterization=standard, b_std=0.1)")
    assert limit == expected
    with pytest.raises(ValueError, match="n_features"):
        limit_spec("residual[dense, relu, dense], dense", 6)


# ------------------------------------------------------------ a torch model beside the limit


def _torch_model(width):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, 1)).double()


def _brute_force_torch_ntk(model, x):
    """Per-example gradients by torch.autograd.grad, one input at a time."""
    import torch

    params = list(model.parameters())
    rows = []
    for xi in torch.as_tensor(x):
        out = model(xi[None]).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(out, params)]))
    jac = torch.stack(rows).numpy()
    return jac @ jac.T


def test_compare_puts_a_torch_model_beside_the_limit():
    from limitkernel.experiments import compare
    from limitkernel.torch_interop import from_torch

    model = _torch_model(256)
    x = np.random.default_rng(0).standard_normal((5, 3))
    y = np.sin(x[:, 0])
    result = compare(None, x, y, widths=(16, 32), seeds=2, steps=3, learning_rate=0.5,
                     torch_model=model)
    spec = from_torch(model)
    assert result.spec == str(spec) and result.torch["spec"] == str(spec)
    # Independent reference: brute-force Jacobians against the limit of the spec
    # whose scales are those of PyTorch's default initialisation.
    limit = lk.kernel(spec, x)["ntk"]
    brute = _brute_force_torch_ntk(model, x)
    expected = np.linalg.norm(brute - limit) / np.linalg.norm(limit)
    assert result.torch["init_distance"] == pytest.approx(expected, rel=1e-8)
    assert result.torch["n_params"] == sum(p.numel() for p in model.parameters())
    assert "torch" in result.table().splitlines()[4 + len(result.widths)]
    assert result.to_dict()["torch"]["init_distance"] == result.torch["init_distance"]
    with pytest.raises(ValueError, match="input features"):
        compare(None, np.ones((3, 4)), np.ones(3), widths=(8,), seeds=1, steps=1,
                torch_model=model)


def test_a_wider_torch_model_is_closer_to_its_limit():
    # The relative distance falls like c/√width, with a large spread between
    # seeds (8 seeds at width 64: 0.14–0.26; at 4096: 0.016–0.047). Means over
    # 6 seeds at widths 64 and 2048 differ by about √32 ≈ 5.7; a factor 2 is asked.
    torch = pytest.importorskip("torch")
    from limitkernel.experiments import _torch_row
    from limitkernel.torch_interop import from_torch

    nn = torch.nn
    x = np.random.default_rng(1).standard_normal((6, 3))
    means = []
    for width in (64, 2048):
        distances = []
        for s in range(6):
            torch.manual_seed(s)
            model = nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, 1)).double()
            distances.append(_torch_row(model, from_torch(model), x)["init_distance"])
        means.append(np.mean(distances))
    assert means[1] < means[0] / 2, means


def test_cli_compare_with_a_saved_torch_model(tmp_path):
    import json
    import subprocess
    import sys

    torch = pytest.importorskip("torch")
    model = _torch_model(128)
    torch.save(model, tmp_path / "model.pt")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    x = np.random.default_rng(2).standard_normal((5, 3))
    np.savez(tmp_path / "train.npz", x=x, y=np.cos(x[:, 1]))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "limitkernel.cli", "compare", "--data",
                               str(tmp_path / "train.npz"), "--widths", "8", "--seeds", "1",
                               "--steps", "2", "--lr", "0.5", *args],
                              capture_output=True, text=True, check=False)

    out = tmp_path / "out"
    result = run("--torch-model", str(tmp_path / "model.pt"), "--out-dir", str(out))
    assert result.returncode == 0, result.stderr
    assert "torch" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    limit = lk.kernel(lk.parse(summary["torch"]["spec"]), x)["ntk"]
    brute = _brute_force_torch_ntk(model, x)
    expected = np.linalg.norm(brute - limit) / np.linalg.norm(limit)
    assert summary["torch"]["init_distance"] == pytest.approx(expected, rel=1e-8)
    assert summary["spec"] == summary["torch"]["spec"]
    # With --arch the finite networks follow it; the torch row keeps its own spec.
    result = run("--torch-model", str(tmp_path / "model.pt"), "--arch", "dense, relu, dense",
                 "--out-dir", str(tmp_path / "out2"))
    assert result.returncode == 0, result.stderr
    summary2 = json.loads((tmp_path / "out2" / "summary.json").read_text())
    assert summary2["spec"] == "dense, relu, dense"
    assert summary2["torch"]["init_distance"] == pytest.approx(expected, rel=1e-8)
    for args, fragment in [(("--torch-model", str(tmp_path / "weights.pt")), "not a torch"),
                           (("--torch-model", str(tmp_path / "none.pt")), "file not found"),
                           ((), "give --arch SPEC, or --torch-model")]:
        result = run(*args, "--out-dir", str(tmp_path / "bad"))
        assert result.returncode == 2 and fragment in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
