"""Wide finite networks built from a spec, for Monte Carlo tests of the limit kernels.

A slow, obviously correct reference that shares no code with the kernel pass:
it draws every weight, runs the network on a batch, and backpropagates by hand
to get the empirical NTK exactly,

    Θ̂(x, x') = Σ_dense [s_w² (δ·δ')(a·a') + s_b² (δ·δ')],

with a the input of a dense layer, δ = ∂f/∂z its output gradient and (s_w, s_b)
the factors multiplying W and b (σ_w/√n and σ_b in the NTK parameterisation).
The empirical NNGP is σ_w² a·a'/n + σ_b² at the readout's input. Every hidden
dense layer has width ``width`` (inside ``concat``, branch b has width
``width · k · w_b / Σ w``), the readout has width 1. Dropout draws an
independent mask for every row of the batch, so a row is one example.
"""

import numpy as np
from scipy.special import erf

from limitkernel.layers import Concat, Dense, Dropout, LayerNorm, Parallel, Residual
from limitkernel.spec import as_spec

_PHI = {
    "relu": (lambda x: np.maximum(x, 0.0), lambda x: (x > 0).astype(float)),
    "erf": (erf, lambda x: 2.0 / np.sqrt(np.pi) * np.exp(-x * x)),
    "tanh": (np.tanh, lambda x: 1.0 - np.tanh(x) ** 2),
    "identity": (lambda x: x, np.ones_like),
}


def _phi(layer):
    if layer.name in _PHI:
        return _PHI[layer.name]
    return layer.forward, layer.derivative


class FiniteNetwork:
    """One random draw of the network of ``spec`` at the given width."""

    def __init__(self, spec, d, width, rng):
        self.spec = as_spec(spec)
        self.rng = rng
        self.width = width
        self.params = []
        self.tree = self._build(list(self.spec), d, top=True)

    def _build(self, layers, n_in, top=False, final_width=None):
        nodes = []
        for pos, layer in enumerate(layers):
            last = pos == len(layers) - 1
            if isinstance(layer, Dense):
                n_out = 1 if (top and last) else (final_width or self.width)
                w = self.rng.standard_normal((n_out, n_in))
                b = self.rng.standard_normal(n_out)
                if layer.parameterization == "ntk":
                    sw, sb = layer.w_std / np.sqrt(n_in), layer.b_std
                else:
                    w *= layer.w_std / np.sqrt(n_in)
                    b *= layer.b_std
                    sw, sb = 1.0, 1.0
                nodes.append(("dense", w, b, sw, sb, layer))
                n_in = n_out
            elif isinstance(layer, Residual):
                branch, n_out = self._build(list(layer.branches[0]), n_in,
                                            final_width=n_in), n_in
                nodes.append(("residual", layer.alpha, layer.beta, branch))
            elif isinstance(layer, Parallel):
                branches = [self._build(list(b), n_in, final_width=self.width)
                            for b in layer.branches]
                nodes.append(("parallel", branches))
                n_in = self.width
            elif isinstance(layer, Concat):
                fr = layer.fractions()
                k = len(layer.branches)
                widths = [round(self.width * k * f) for f in fr]
                branches = [self._build(list(b), n_in, final_width=w)
                            for b, w in zip(layer.branches, widths)]
                nodes.append(("concat", branches, widths))
                n_in = sum(widths)
            elif isinstance(layer, LayerNorm):
                nodes.append(("layernorm", layer.eps))
            elif isinstance(layer, Dropout):
                nodes.append(("dropout", layer.p))
            else:
                nodes.append(("act",) + _phi(layer))
        return nodes

    # -------------------------------------------------------- forward / backward

    def _forward(self, nodes, h, tape):
        for node in nodes:
            kind = node[0]
            if kind == "dense":
                _, w, b, sw, sb, _ = node
                tape.append(h)
                h = sw * h @ w.T + sb * b
            elif kind == "act":
                tape.append(h)
                h = node[1](h)
            elif kind == "layernorm":
                mu = h.mean(1, keepdims=True)
                sd = np.sqrt(h.var(1, keepdims=True) + node[1])
                y = (h - mu) / sd
                tape.append((y, sd))
                h = y
            elif kind == "dropout":
                keep = self.rng.random(h.shape) >= node[1]
                m = keep / (1.0 - node[1])
                tape.append(m)
                h = h * m
            elif kind == "residual":
                sub = []
                tape.append(sub)
                h = node[1] * h + node[2] * self._forward(node[3], h, sub)
            elif kind == "parallel":
                subs = [[] for _ in node[1]]
                tape.append(subs)
                h = sum(self._forward(br, h, s) for br, s in zip(node[1], subs))
            elif kind == "concat":
                subs = [[] for _ in node[1]]
                tape.append(subs)
                h = np.concatenate([self._forward(br, h, s) for br, s in zip(node[1], subs)], 1)
        return h

    def _backward(self, nodes, tape, delta, grads):
        """δ (B, n_out) → δ of the input; appends (a, δ_z, sw, sb) per dense layer."""
        for node, rec in zip(reversed(nodes), reversed(tape)):
            kind = node[0]
            if kind == "dense":
                _, w, _, sw, sb, _ = node
                grads.append((rec, delta, sw, sb))
                delta = sw * delta @ w
            elif kind == "act":
                delta = delta * node[2](rec)
            elif kind == "layernorm":
                y, sd = rec
                delta = (delta - delta.mean(1, keepdims=True)
                         - y * (delta * y).mean(1, keepdims=True)) / sd
            elif kind == "dropout":
                delta = delta * rec
            elif kind == "residual":
                inner = self._backward(node[3], rec, node[2] * delta, grads)
                delta = node[1] * delta + inner
            elif kind == "parallel":
                delta = sum(self._backward(br, s, delta, grads) for br, s in zip(node[1], rec))
            elif kind == "concat":
                edges = np.cumsum([0] + list(node[2]))
                delta = sum(self._backward(br, s, delta[:, lo:hi], grads)
                            for br, s, lo, hi in zip(node[1], rec, edges[:-1], edges[1:]))
        return delta

    def kernels(self, x):
        """Empirical NNGP (readout input) and NTK of this draw on the batch x."""
        tape = []
        out = self._forward(self.tree, np.asarray(x, dtype=float), tape)
        grads = []
        self._backward(self.tree, tape, np.ones_like(out), grads)
        ntk = np.zeros((x.shape[0], x.shape[0]))
        for a, dz, sw, sb in grads:
            dd = dz @ dz.T
            ntk += sw * sw * dd * (a @ a.T) + sb * sb * dd
        a_last, _, _, _ = grads[0]
        readout = self.tree[-1]
        layer = readout[5]
        nngp = layer.w_std ** 2 * (a_last @ a_last.T) / a_last.shape[1] + layer.b_std ** 2
        return nngp, ntk, out[:, 0]


def monte_carlo(spec, x, width, draws, seed):
    """Per-draw empirical NNGP and NTK: two (draws, n, n) arrays."""
    rng = np.random.default_rng(seed)
    nngp, ntk = [], []
    for _ in range(draws):
        k, t, _ = FiniteNetwork(spec, x.shape[1], width, rng).kernels(x)
        nngp.append(k)
        ntk.append(t)
    return np.array(nngp), np.array(ntk)


# ------------------------------------------------------------ convolutional


def _conv_same(x, w, b):
    """'same' convolution of images x (N, H, W, C) with a k×k filter w (k, k, C, n):
    out[p] = Σ_taps x[p + δ] · w[δ] + b, positions outside the image being zero,
    the smaller half of the padding first (k odd: (k − 1)/2 on each side)."""
    k = w.shape[0]
    pad = (k - 1) // 2
    n, h, wd, _ = x.shape
    padded = np.zeros((n, h + k - 1, wd + k - 1, x.shape[3]))
    padded[:, pad:pad + h, pad:pad + wd] = x
    out = np.zeros((n, h, wd, w.shape[3]))
    for dy in range(k):
        for dx in range(k):
            out += padded[:, dy:dy + h, dx:dx + wd] @ w[dy, dx]
    return out + b


def conv_readout_nngp(x, k, w_std, b_std, readout, width, draws, seed):
    """Empirical NNGP of ``conv(k, same, w_std, b_std), relu, READOUT, dense``
    (READOUT ``flatten`` or ``global_avg_pool``) at the readout's input, for
    ``draws`` independent networks of ``width`` channels (NTK parameterisation:
    W, b ~ N(0, 1) behind σ_w/√(k²C) and σ_b). Over the readout's weights this is
    the covariance of the output, whose mean over the hidden weights is the
    limit's NNGP exactly (one hidden layer: no 1/width bias). Returns (draws, N, N).
    """
    rng = np.random.default_rng(seed)
    n, h, wd, c = x.shape
    out = np.empty((draws, n, n))
    for d in range(draws):
        w = rng.standard_normal((k, k, c, width)) * (w_std / np.sqrt(k * k * c))
        b = rng.standard_normal(width) * b_std
        a = np.maximum(_conv_same(x, w, b), 0.0)
        if readout == "flatten":
            feats = a.reshape(n, -1)
            out[d] = feats @ feats.T / (width * h * wd)
        else:
            feats = a.mean(axis=(1, 2))
            out[d] = feats @ feats.T / width
    return out
