"""Finite-width networks: the same spec as the kernels, at a width you choose.

A :class:`FiniteNetwork` is the real network that a spec describes: dense and
conv layers with random Gaussian parameters in the spec's parameterisation,
pooling and flatten as the kernels define them, and the spec's activations
applied element-wise. It runs forward on a batch of vectors, images or
sequences (channels last), computes its empirical NTK and NNGP exactly, and
trains by full-batch gradient descent on the MSE or cross-entropy loss —
everything in float64 GEMMs.

Parameterisations (those of :mod:`limitkernel.gram`, i.e. Neural Tangents'):

* ``"ntk"``: z = σ_w/√n · a W + σ_b · b with W, b ~ N(0, 1) trained;
* ``"standard"``: z = a W + b with W ~ N(0, σ_w²/n), b ~ N(0, σ_b²) trained.

Both are written z = w_mul · a W + b_mul · b with the trained W, b and the fixed
multipliers (w_mul, b_mul) = (σ_w/√n, σ_b) or (1, 1), n the layer's fan-in (the
input dimension d for the first layer; k_y·k_x·C for a conv layer, which is a
dense layer on the patches of its input).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
from scipy.linalg.blas import dsyrk

from ._program import Program
from .gram import check_inputs
from .layers import (
    AvgPool,
    Concat,
    Conv,
    Dense,
    Flatten,
    GlobalAvgPool,
    Parallel,
    Residual,
)
from .layers._positions import shared_layer_ntk
from .layers.conv import axis_map
from .layers.dense import mm as _mm
from .spec import Block, Serial, SpecError, as_spec

__all__ = ["LOSSES", "FiniteNetwork", "TrainingHistory", "limit_spec"]

LOSSES = ("mse", "cross_entropy")


def _gram(x, y=None):
    """x @ y.T, or x @ x.T (one triangle through dsyrk, then mirrored)."""
    if y is not None:
        return _mm(x, y.T)
    ax, trans = (x, False) if x.flags.f_contiguous else (x.T, True)
    upper = dsyrk(1.0, ax, trans=trans)
    return np.triu(upper) + np.triu(upper, 1).T


@dataclass
class TrainingHistory:
    """What :meth:`FiniteNetwork.train` recorded.

    Attributes
    ----------
    steps : (R,) int array
        The steps at which outputs (and kernels) were recorded; step k is time
        t = k in the convention of :mod:`limitkernel.predict` (learning rate η,
        loss ½·mean over the N·c targets), so ``GradientFlowEnsemble(...,
        learning_rate=η).predict(x, t=k)`` is the matching infinite-width
        prediction.
    loss : (steps + 1,) array
        Training loss before every step and after the last.
    outputs : (R, N, c) array
        Outputs on the training inputs at the recorded steps.
    test_outputs : (R, M, c) array or None
        Outputs on ``x_test`` at the recorded steps.
    ntk : (R, ...) array or None
        Empirical NTK on ``ntk_x`` at the recorded steps (shape as returned by
        :meth:`FiniteNetwork.ntk`).
    learning_rate : float
    loss_name : {"mse", "cross_entropy"}
    """

    steps: np.ndarray
    loss: np.ndarray
    outputs: np.ndarray
    test_outputs: np.ndarray | None
    ntk: np.ndarray | None
    learning_rate: float
    loss_name: str

    @property
    def t(self):
        """Recorded times, t = step (see ``steps``)."""
        return self.steps.astype(np.float64)


def limit_spec(spec, width, n_features=None, input_shape=None):
    """The spec whose :func:`limitkernel.kernel` is the limit of networks of this width.

    In the standard parameterisation the NTK depends on the widths, so every
    standard hidden dense or conv layer gets its width (``width``: one int, or
    one per hidden dense or conv layer, depth first through blocks, as for
    :class:`FiniteNetwork`); NTK-parameterised layers are unchanged.
    ``n_features`` (or ``input_shape``, for images and sequences) is needed
    only when a residual block comes before the first dense or conv layer, or
    after a flatten (its branch then has the width of the block input).
    """
    shape = _input_shape(n_features, input_shape, required=False)
    return _Sizing(as_spec(spec), width, shape, None).limit


def _input_shape(n_features, input_shape, required=True):
    """The input shape, (d,), (L, C) or (H, W, C), from either argument."""
    def positive(v):
        return not isinstance(v, bool) and isinstance(v, (int, float, np.integer)) \
            and v == int(v) and v >= 1

    if input_shape is not None:
        shape = (input_shape,) if np.ndim(input_shape) == 0 else tuple(input_shape)
        if not 1 <= len(shape) <= 3 or not all(positive(v) for v in shape):
            raise ValueError(f"input_shape must be (d,) for vectors, (L, C) for sequences "
                             f"or (H, W, C) for images (channels last), positive integers; "
                             f"got {input_shape!r}")
        shape = tuple(int(v) for v in shape)
        if n_features is not None and (len(shape) > 1 or n_features != shape[0]):
            raise ValueError(f"n_features={n_features!r} disagrees with input_shape="
                             f"{shape}; give input_shape only")
        return shape
    if n_features is None and not required:
        return None
    if not positive(n_features):
        raise ValueError(f"n_features must be a positive integer (the input dimension d), "
                         f"got {n_features!r}; for images or sequences give "
                         "input_shape=(H, W, C) or (L, C)")
    return (int(n_features),)


def _spatial_out(layer, shape, sequence, where):
    """Spatial shape (H, W) after a conv or avg_pool layer (None if it does not fit;
    lowering then says why)."""
    k = layer._sizes("k", sequence, where)
    stride = k if isinstance(layer, AvgPool) and layer.stride is None else \
        layer._sizes("stride", sequence, where)
    rows = axis_map(shape[0], k[0], stride[0], layer.padding) if shape[0] > 1 or k[0] > 1 \
        else np.zeros((1, 1))
    cols = axis_map(shape[1], k[1], stride[1], layer.padding)
    return None if rows is None or cols is None else (rows.shape[0], cols.shape[0])


def _count_dense(layers):
    count = 0
    for layer in layers:
        if isinstance(layer, (Dense, Conv)):
            count += 1
        elif isinstance(layer, Block):
            count += sum(_count_dense(b.layers) for b in layer.branches)
    return count


class _Sizing:
    """Walks a spec with blocks depth first: the hidden widths and the limit spec.

    Widths (as in the Monte Carlo reference of the tests): with one int ``width``
    every hidden dense layer (and every conv layer: its output channels) has
    that width, except inside a residual branch, whose dense and conv layers
    have the block input's width (so the skip connection adds up), and inside
    ``concat``, whose branch b has width ``round(width · k · w_b / Σ w)`` (k
    branches; the limit weighs the branches by these shares). With a list, one
    width per hidden dense or conv layer, depth first; without ``width``, the
    layers' own ``width`` parameters. The order is that of the dense and conv
    ops of the lowered program. ``input_shape`` is (d,), (L, C) or (H, W, C),
    or None when unknown.
    """

    def __init__(self, spec, width, input_shape, n_outputs):
        layers = list(spec.layers)
        n_hidden = _count_dense(layers) - 1
        self.explicit = _check_widths(width, n_hidden) if np.ndim(width) else None
        self.scalar = None if width is None or np.ndim(width) else _check_widths(width, 1)[0]
        self._next = iter(self.explicit or ())
        self.n_outputs = n_outputs
        self.widths = []
        n_features = None if input_shape is None else input_shape[-1]
        self.shape = None if input_shape is None or len(input_shape) == 1 else \
            ((1,) + tuple(input_shape[:1]) if len(input_shape) == 2 else tuple(input_shape[:2]))
        self.sequence = input_shape is not None and len(input_shape) == 2
        fan_in, limit_layers = self._walk(layers, n_features, self.scalar, "", top=True)
        self.limit = Serial(limit_layers)
        self.out_width = fan_in

    def _width(self, layer, default, where):
        if self.explicit is not None:
            return next(self._next)
        if self.scalar is not None:
            if default is None:
                raise ValueError(f"{where}: a residual block before the first dense layer "
                                 "has the input's width; pass n_features=... (or "
                                 "input_shape=...)")
            return int(default)
        if layer.width is None:
            raise ValueError(f"give width=... (one int, or one per hidden dense or conv "
                             f"layer): {where} has no width")
        return int(layer.width)

    def _walk(self, layers, fan_in, default, path, top=False):
        limit = []
        for pos, layer in enumerate(layers):
            where = f"{path}layer {pos + 1} ({layer})"
            if isinstance(layer, Dense):
                if top and pos == len(layers) - 1:
                    fan_out = self.n_outputs
                else:
                    fan_out = self._width(layer, default, where)
                    self.widths.append(fan_out)
                    if layer.parameterization == "standard":
                        layer = Dense(layer.w_std, layer.b_std, "standard", fan_out)
                fan_in = fan_out
            elif isinstance(layer, Conv):
                fan_out = self._width(layer, default, where)
                self.widths.append(fan_out)
                if self.shape is not None:
                    self.shape = _spatial_out(layer, self.shape, self.sequence, where)
                if layer.parameterization == "standard":
                    layer = Conv(**{**layer.params, "width": fan_out})
                fan_in = fan_out
            elif isinstance(layer, AvgPool):
                if self.shape is not None:
                    self.shape = _spatial_out(layer, self.shape, self.sequence, where)
            elif isinstance(layer, Flatten):
                fan_in = None if fan_in is None or self.shape is None else \
                    fan_in * self.shape[0] * self.shape[1]
                self.shape = None
            elif isinstance(layer, GlobalAvgPool):
                self.shape = None
            elif isinstance(layer, Residual):
                out, sub = self._walk(layer.branches[0].layers, fan_in, fan_in, f"{where}: ")
                if fan_in is not None and out != fan_in:
                    raise ValueError(
                        f"{where}: the branch outputs width {out} but the block input "
                        f"has width {fan_in}; the skip connection needs them equal "
                        f"(give the branch's dense layers width {fan_in})")
                layer = Residual(sub, layer.alpha, layer.beta)
            elif isinstance(layer, (Parallel, Concat)):
                k = len(layer.branches)
                if isinstance(layer, Concat):
                    shares = [None if default is None else max(1, round(default * k * f))
                              for f in layer.fractions()]
                else:
                    shares = [default] * k
                outs, subs = [], []
                start = self.shape
                for index, (b, share) in enumerate(zip(layer.branches, shares)):
                    self.shape = start
                    out, sub = self._walk(b.layers, fan_in, share,
                                          f"{where}, branch {index + 1}: ")
                    outs.append(out)
                    subs.append(sub)
                if isinstance(layer, Parallel):
                    if len(set(outs)) > 1:
                        raise ValueError(f"{where}: the branches output widths {outs}, but a "
                                         "sum needs them equal; give their last dense "
                                         "layers one width")
                    fan_in = outs[0]
                    layer = Parallel(*subs)
                else:
                    fan_in = None if None in outs else sum(outs)
                    layer = Concat(*subs, widths=layer.widths)
            elif isinstance(layer, Block):
                raise SpecError(f"{where}: {layer!r} is not supported by finite networks")
            limit.append(layer)
        return fan_in, limit


def _check_widths(width, n_hidden):
    if width is None:
        return None
    if np.ndim(width) == 0:
        widths = [width] * n_hidden
    else:
        widths = list(width)
        if len(widths) != n_hidden:
            raise ValueError(
                f"width has {len(widths)} entries but the spec has {n_hidden} hidden dense "
                f"or conv layer(s) (every dense layer but the readout, and every conv "
                f"layer); give one int for all, "
                f"or {n_hidden} ints"
            )
    out = []
    for w in widths:
        if isinstance(w, bool) or not isinstance(w, (int, np.integer, float)) or w != int(w) \
                or w < 1:
            raise ValueError(f"widths must be positive integers, got {width!r}")
        out.append(int(w))
    return out


def _check_rng(seed):
    if isinstance(seed, np.random.Generator):
        return seed
    try:
        return np.random.default_rng(seed)
    except (TypeError, ValueError):
        raise ValueError(f"seed must be an int, None or a numpy Generator, got {seed!r}") \
            from None


def _loss_and_gradient(f, targets, loss):
    """The loss (½·mean squared error or mean cross-entropy) and N·c times its gradient."""
    scale = 1.0 / f.size
    if loss == "mse":
        resid = f - targets
        return 0.5 * scale * float(np.einsum("ij,ij->", resid, resid)), resid
    shifted = f - f.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    value = -scale * float(np.einsum("ij,ij->", targets, log_p))
    return value, np.exp(log_p) * targets.sum(axis=1, keepdims=True) - targets


class FiniteNetwork:
    """A finite network built from a spec: fully-connected or convolutional.

    Parameters
    ----------
    spec : str or Serial or list of layers
        The architecture, as for :func:`limitkernel.kernel`; it must end with a
        dense readout.
    width : int or sequence of int, optional
        Width of every hidden dense layer (all dense layers but the readout) and
        output channels of every conv layer, or one width per such layer (depth
        first through blocks). Default: the layers' ``width`` parameters (then
        required). With one int, the dense and conv layers of a residual branch
        take the block input's width and those of concat branch b
        ``round(width · k · w_b / Σ w)``.
    n_features : int, optional
        Input dimension d of vectors (the same as ``input_shape=(d,)``).
    n_outputs : int
        Width c of the readout.
    seed : int, None or numpy.random.Generator
        Source of the initial parameters (drawn layer by layer, W then b).
    input_shape : tuple of int, optional
        Shape of one input: (d,) for vectors, (L, C) for sequences, (H, W, C)
        for images — channels last, as for :func:`limitkernel.kernel`. Give
        this or ``n_features``.

    Attributes
    ----------
    widths : tuple of int
        Hidden widths (dense widths and conv output channels).
    input_shape : tuple of int
    dense : list
        Per dense or conv layer, an object with the trained arrays ``w``
        (fan_in, fan_out) and ``b`` (fan_out,) and the multipliers ``w_mul``,
        ``b_mul``; a conv layer's ``w`` is (k_y·k_x·C_in, C_out), rows in
        (tap row, tap column, input channel) order.

    Notes
    -----
    The empirical NTK is computed without per-example Jacobians. For a dense
    layer with input a and backward signal δ = ∂f/∂z at its output,

    .. math::

        \\hat\\Theta(x, x') = \\sum_{\\text{dense } l}
            \\big(w_{mul}^2\\, a_l(x) \\cdot a_l(x') + b_{mul}^2\\big)\\,
            \\delta_l(x) \\cdot \\delta_l(x'),

    with (w_mul², b_mul²) = (σ_w²/n, σ_b²) in the NTK and (1, 1) in the standard
    parameterisation: two Gram matrices per layer and one backward pass per
    output unit.

    A layer whose weights act at P positions (a conv layer on the patches
    a_p of its input, or a dense layer on positions) contributes
    Σ_{p,q} (w_mul² a_p(x)·a_q(x') + b_mul²) δ_p(x)·δ_q(x'), computed exactly
    by whichever of two forms costs fewer flops (fan-in n, fan-out m, c
    outputs, N × M inputs): per-example gradients w_mul Σ_p a_p ⊗ δ_p and
    their inner products, O((N + M)·c·P·n·m + N·M·c²·n·m), or Gram matrices
    over positions, O(N·M·P²·(n + c²·m)); both in blocks of inputs with at most
    256 MiB of scratch, never a Jacobian of the whole network. For a conv
    layer n = k_y·k_x·C_in and P its output positions; its forward pass, input
    signal and gradient step are those of a dense layer on the patches.

    Blocks: ``residual`` is α·x + β·f(x), ``parallel`` the sum and ``concat``
    the concatenation of its branches; ``layernorm`` normalises over the
    features without affine parameters, (z − mean z)/√(var z + ε); ``dropout``
    is in training mode, a mask per input and unit (see :meth:`forward`). A
    spec of dense layers and activations only takes a faster path.
    """

    def __init__(self, spec, width=None, n_features=None, n_outputs=1, seed=None,
                 input_shape=None):
        self.spec = as_spec(spec)
        layers = list(self.spec)
        if not layers or not isinstance(layers[-1], Dense):
            last = layers[-1] if layers else "nothing"
            raise SpecError(f"the network must end with a dense readout layer, but its last "
                            f"layer is {last}; append ', dense'")
        self.input_shape = _input_shape(n_features, input_shape)
        if isinstance(n_outputs, bool) or int(n_outputs) != n_outputs or n_outputs < 1:
            raise ValueError(f"n_outputs must be a positive integer, got {n_outputs!r}")
        self.n_features, self.n_outputs = self.input_shape[-1], int(n_outputs)
        sizing = _Sizing(self.spec, width, self.input_shape, self.n_outputs)
        self.widths, self._limit = tuple(sizing.widths), sizing.limit
        # The same lowered program as the kernels; the limit's rules (Gaussian
        # inputs of activations, independent branches) are not required here.
        self._program = Program(self._limit, self.input_shape, check_limit=False)
        rng = _check_rng(seed)
        self._params, self.dense = [], []
        fan_outs = iter(self.widths + (self.n_outputs,))
        width, stash = self.n_features, {}
        for op in self._program.ops:
            params = None
            if op.kind.has_params:
                params = op.kind.finite_init(op, width, next(fan_outs), rng)
                self.dense.append(params)
                width = params.fan_out
            else:
                width = op.kind.finite_width(op, width, stash)
            self._params.append(params)
        self._first = next(i for i, p in enumerate(self._params) if p is not None)
        # Dropout masks: a stream of their own, so parameters do not depend on p.
        self._masks = np.random.default_rng(rng.integers(2 ** 63))

    # ---------------------------------------------------------------- basics

    @property
    def n_params(self):
        """Number of trained parameters."""
        return sum(p.w.size + p.b.size for p in self.dense)

    def copy(self):
        """An independent copy (same parameters)."""
        return copy.deepcopy(self)

    def limit_spec(self):
        """The spec whose :func:`limitkernel.kernel` is this network's limit.

        See :func:`limit_spec`.
        """
        return self._limit

    def _check_x(self, x, name="x"):
        """Inputs as float64, images and sequences as (N, H, W, C) (H = 1 for sequences)."""
        spatial = len(self.input_shape) > 1
        x = check_inputs(x, name, spatial=spatial)
        if len(self.input_shape) == 2 and x.shape[1:] == (1,) + self.input_shape:
            return x  # already checked
        if x.shape[1:] != self.input_shape:
            if not spatial:
                raise ValueError(f"{name} has {x.shape[1]} features but the network was "
                                 f"built with n_features={self.n_features}")
            raise ValueError(f"{name} has inputs of shape {x.shape[1:]} but the network was "
                             f"built with input_shape={self.input_shape} (channels last); "
                             "give inputs of that shape")
        return x[:, None] if x.ndim == 3 else x

    def forward(self, x, dropout_seed=None):
        """Outputs on a batch.

        Parameters
        ----------
        x : (N, d) array_like
        dropout_seed : int, optional
            Dropout (training mode) draws a mask per input and unit from the
            network's own stream, new at every call; with a seed the masks come
            from ``numpy.random.default_rng(dropout_seed)`` instead, the same at
            every call with that seed and batch size.

        Returns
        -------
        (N, c) array
        """
        return self._forward(self._check_x(x), masks=_mask_rng(dropout_seed))[0]

    __call__ = forward

    def _forward(self, x, keep=False, check=True, masks=None):
        """Outputs and, with ``keep``, the tape: what each op records for backward."""
        run = _Run(keep, masks or self._masks, program=self._program)
        tape = []
        h = x
        for op, params in zip(self._program.ops, self._params):
            h, record = op.kind.finite_forward(op, params, h, run)
            tape.append(record)
        if check and not np.all(np.isfinite(h)):
            raise FloatingPointError("the network's outputs overflow (inf or NaN); lower "
                                     "w_std, b_std or the input scale")
        return h, tape

    def _backward(self, tape, delta, eta=None):
        """Backward signals δ (N, r, ..., width) from the outputs, op by op in reverse.

        Without ``eta``, returns [(dense params, input a, δ at its output)] for
        every dense layer; with ``eta``, takes a gradient step of learning rate
        η on each dense layer as its signal arrives (δ: N·c times ∂L/∂f).
        """
        run = _Run(False, None, eta=eta, program=self._program)
        ops, params = self._program.ops, self._params
        for index in range(len(ops) - 1, self._first - 1, -1):
            run.stop = index == self._first
            delta = ops[index].kind.finite_backward(ops[index], params[index], delta,
                                                     tape[index], run)
        return run.grads

    # ---------------------------------------------------------------- kernels

    def nngp(self, x1, x2=None, dropout_seed=None):
        """Empirical NNGP: the output covariance given the readout's input a.

        ``σ_w²/n · a(x)·a(x') + σ_b²`` (n the readout's fan-in), in either
        parameterisation: over the readout's random weights this is the
        covariance of each output, whose infinite-width limit is the NNGP kernel
        of :func:`limitkernel.kernel`.

        Returns
        -------
        (N, M) array
        """
        return self.kernels(x1, x2, get="nngp", dropout_seed=dropout_seed)["nngp"]

    def ntk(self, x1, x2=None, dropout_seed=None):
        """Empirical NTK ⟨∂f(x)/∂θ, ∂f(x')/∂θ⟩, exactly.

        Returns
        -------
        (N, M) array for one output; (N, M, c, c) for c outputs, entry
        [i, j, k, l] = ⟨∂f_k(x_i)/∂θ, ∂f_l(x_j)/∂θ⟩ (its limit is Θ ⊗ I_c).
        """
        return self.kernels(x1, x2, get="ntk", dropout_seed=dropout_seed)["ntk"]

    def kernels(self, x1, x2=None, get=("nngp", "ntk"), dropout_seed=None):
        """Empirical NNGP and/or NTK, as a dict like :func:`limitkernel.kernel`.

        With dropout, every input of ``x1`` (and of ``x2``) draws its own masks
        (see :meth:`forward` for ``dropout_seed``); x1 and x2 are different
        examples, as in the limit.
        """
        kinds = (get,) if isinstance(get, str) else tuple(get)
        if not kinds or any(k not in ("nngp", "ntk") for k in kinds):
            raise ValueError(f"get must name 'nngp' and/or 'ntk', got {get!r}")
        x1 = self._check_x(x1, "x1")
        sym = x2 is None
        masks = _mask_rng(dropout_seed)
        _, cache1 = self._forward(x1, keep=True, masks=masks)
        if sym:
            cache2 = cache1
        else:
            _, cache2 = self._forward(self._check_x(x2, "x2"), keep=True, masks=masks)
        out = {}
        if "nngp" in kinds:
            head = self.dense[-1]
            a1, a2 = cache1[-1], cache2[-1]
            scale = head.layer.w_std ** 2 / head.fan_in
            out["nngp"] = scale * _gram(a1, None if sym else a2) + head.layer.b_std ** 2
        if "ntk" in kinds:
            out["ntk"] = self._ntk(cache1, None if sym else cache2, x1.shape[0],
                                   x1.shape[0] if sym else x2.shape[0])
        return {k: out[k] for k in kinds}

    def _ntk(self, tape1, tape2, n1, n2):
        """Empirical NTK from the tapes: backward signals per dense layer, two Gram
        matrices each."""
        c = self.n_outputs
        grads1 = self._backward(tape1, np.tile(np.eye(c), (n1, 1)).reshape(n1, c, c))
        grads2 = grads1 if tape2 is None else \
            self._backward(tape2, np.tile(np.eye(c), (n2, 1)).reshape(n2, c, c))
        sym = tape2 is None
        theta = np.zeros((n1 * c, n2 * c))
        for (layer, a1, d1), (_, a2, d2) in zip(grads1, grads2):
            if a1.ndim > 2:
                # Weights shared across positions (conv, or dense on positions).
                def positions(a, d):
                    return (a.reshape(a.shape[0], -1, a.shape[-1]),
                            d.reshape(d.shape[:2] + (-1, d.shape[-1])))

                pa1, pd1 = positions(a1, d1)
                pa2, pd2 = (None, None) if sym else positions(a2, d2)
                theta += shared_layer_ntk(layer, pa1, pa2, pd1, pd2, c)
                continue
            _add_layer_ntk(theta, layer, a1, None if sym else a2, d1.reshape(n1 * c, -1),
                           None if sym else d2.reshape(n2 * c, -1), c)
        return _by_output_pair(theta, n1, n2, c)

    # ---------------------------------------------------------------- training

    def train(self, x, y, steps, learning_rate=1.0, loss="mse", x_test=None,
              record_at=None, ntk_x=None, callback=None):
        """Full-batch gradient descent, in place.

        Parameters
        ----------
        x : (N, d) array_like
            Training inputs.
        y : array_like
            MSE: targets (N,) (one output) or (N, c). Cross-entropy: integer
            labels (N,) in [0, c) or class probabilities (N, c).
        steps : int
            Number of gradient-descent steps.
        learning_rate : float
            η.
        loss : {"mse", "cross_entropy"}
            ½·mean over the N·c targets of (f − y)², or
            −(1/(N c)) Σ y log softmax(f) — the normalisations of
            :mod:`limitkernel.predict`, so that k steps of learning rate η are
            time t = k there (up to the discretisation of the flow).
        x_test : (M, d) array_like, optional
            Inputs whose outputs are recorded too.
        record_at : iterable of int, optional
            Steps (0 … ``steps``) at which to record outputs (and the NTK).
            Default: about 100 evenly spaced steps, always 0 and ``steps``.
        ntk_x : (P, d) array_like or a pair of them, optional
            Record the empirical NTK on these inputs (or between the pair).
        callback : callable, optional
            Called as ``callback(step)`` after every step (e.g. a progress bar).

        Returns
        -------
        TrainingHistory

        Notes
        -----
        The parameters are updated in place (``copy()`` first to keep the
        initial network). With a small batch the GEMMs are skinny and a
        multi-threaded BLAS gains little; on a busy machine
        ``threadpoolctl.threadpool_limits(1)`` around the call can be much faster.
        """
        x = self._check_x(x, "x")
        n, c = x.shape[0], self.n_outputs
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        targets = self._targets(y, n, loss)
        if isinstance(steps, bool) or int(steps) != steps or steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
        steps = int(steps)
        eta = float(learning_rate)
        if not math.isfinite(eta) or eta <= 0:
            raise ValueError(f"learning_rate must be a finite number > 0, got {learning_rate!r}")
        x_test = None if x_test is None else self._check_x(x_test, "x_test")
        if ntk_x is not None:
            pair = isinstance(ntk_x, (tuple, list)) and len(ntk_x) == 2
            ntk_pair = (self._check_x(ntk_x[0], "ntk_x[0]"), self._check_x(ntk_x[1], "ntk_x[1]")) \
                if pair else (self._check_x(ntk_x, "ntk_x"), None)
        if record_at is None:
            record = np.unique(np.linspace(0, steps, min(steps, 100) + 1).round().astype(int))
        else:
            record = np.unique(np.asarray(list(record_at), dtype=np.int64))
            if record.size == 0 or record[0] < 0 or record[-1] > steps:
                raise ValueError(f"record_at must list steps between 0 and {steps}, "
                                 f"got {list(record_at)!r}")
        record_set = set(record.tolist())
        losses = np.empty(steps + 1)
        outputs, test_outputs, ntks = [], [], []
        scale = 1.0 / (n * c)
        for step in range(steps + 1):
            with np.errstate(over="ignore", invalid="ignore"):
                f, cache = self._forward(x, keep=step < steps, check=False)
                losses[step], grad = _loss_and_gradient(f, targets, loss)
            if not math.isfinite(losses[step]):
                raise FloatingPointError(
                    f"training diverged at step {step} (loss {losses[step]}); lower the "
                    f"learning rate (gradient descent is stable below about 2·N·c/λ_max of "
                    f"the empirical NTK on the training inputs, here {eta:g} was used)")
            if step in record_set:
                outputs.append(f.copy())
                if x_test is not None:
                    test_outputs.append(self._forward(x_test)[0])
                if ntk_x is not None:
                    ntks.append(self.ntk(*ntk_pair))
            if step == steps:
                break
            grad *= scale
            self._step(grad, cache, eta)
            if callback is not None:
                callback(step + 1)
        return TrainingHistory(
            steps=record, loss=losses, outputs=np.stack(outputs),
            test_outputs=np.stack(test_outputs) if x_test is not None else None,
            ntk=np.stack(ntks) if ntk_x is not None else None,
            learning_rate=eta, loss_name=loss)

    def _targets(self, y, n, loss):
        c = self.n_outputs
        if loss == "mse":
            try:
                arr = np.asarray(y, dtype=np.float64)
            except (TypeError, ValueError) as err:
                raise ValueError(f"y must be a numeric array: {err}") from None
            if arr.ndim == 1 and c == 1:
                arr = arr[:, None]
            if arr.shape != (n, c):
                raise ValueError(f"y must have shape ({n}, {c})"
                                 f"{f' or ({n},)' if c == 1 else ''} for {n} inputs and "
                                 f"{c} output(s), got {arr.shape}")
            if not np.all(np.isfinite(arr)):
                raise ValueError("y contains NaN or inf; remove or impute those values")
            return arr
        arr = np.asarray(y)
        if arr.ndim == 1:
            if arr.shape[0] != n or not np.issubdtype(arr.dtype, np.integer) \
                    or arr.min() < 0 or arr.max() >= c:
                raise ValueError(f"cross-entropy labels must be {n} integers in [0, {c}) "
                                 f"for a network with n_outputs={c}; got dtype {arr.dtype}, "
                                 f"shape {arr.shape}")
            onehot = np.zeros((n, c))
            onehot[np.arange(n), arr] = 1.0
            return onehot
        arr = np.asarray(arr, dtype=np.float64)
        if arr.shape != (n, c) or np.any(arr < 0) or not np.allclose(arr.sum(axis=1), 1.0):
            raise ValueError(f"cross-entropy targets must be labels (N,) or class "
                             f"probabilities of shape ({n}, {c}) whose rows are >= 0 and "
                             f"sum to 1; got shape {arr.shape}")
        return arr

    def _step(self, grad, cache, eta):
        """One gradient step from ∂L/∂f = grad (N, c), updating the parameters in place."""
        self._backward(cache, grad[:, None, :], eta=eta)


def _add_layer_ntk(theta, layer, a1, a2, d1, d2, c):
    """θ += one dense layer's share: (w_mul² a·a' + b_mul²) times δ·δ' per output pair.

    ``a`` (N, fan_in) are the layer's inputs, ``d`` (N·c, fan_out) its backward
    signals, rows (example, output unit); ``a2 = d2 = None`` for x with itself.
    """
    gram_a = _gram(a1, a2)
    gram_a *= layer.w_mul ** 2
    gram_a += layer.b_mul ** 2
    gram_d = _gram(d1, d2)
    if c == 1:
        gram_d *= gram_a
    else:
        n1, n2 = gram_a.shape
        gram_d = (gram_d.reshape(n1, c, n2, c)
                  * gram_a[:, None, :, None]).reshape(n1 * c, n2 * c)
    theta += gram_d


def _by_output_pair(theta, n1, n2, c):
    """(N·c, M·c) → (N, M, c, c); unchanged for one output."""
    if c == 1:
        return theta
    return np.ascontiguousarray(theta.reshape(n1, c, n2, c).transpose(0, 2, 1, 3))


# ------------------------------------------------------------ the interpreter


def _mask_rng(seed):
    return None if seed is None else _check_rng(seed)


class _Run:
    """What one pass through the program carries besides the activations.

    Forward: ``keep`` (record what backward needs), the stash slots of blocks and
    the dropout ``masks``; the lowered ``program`` (the index maps of spatial ops). Backward: the stash of signals, ``stop`` (the current
    op is the first with parameters: its input signal is not needed) and, per
    dense layer, either the collected ``grads`` or an in-place step of ``eta``.
    """

    def __init__(self, keep, masks, eta=None, program=None):
        self.keep, self.masks, self.eta, self.program = keep, masks, eta, program
        self.stash, self.gstash, self.grads = {}, {}, []
        self.stop = False

    def dense(self, params, a, delta):
        """A dense layer's share of backward: its input signal, then its gradient."""
        d_in = None if self.stop else params.input_signal(delta)
        if self.eta is None:
            self.grads.append((params, a, delta))
        else:
            params.step(a, delta, self.eta)
        return d_in
