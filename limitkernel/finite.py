"""Finite-width networks: the same spec as the kernels, at a width you choose.

A :class:`FiniteNetwork` is the real network that a spec describes: dense
layers with random Gaussian parameters in the spec's parameterisation, and the
spec's activations applied element-wise. It runs forward on a batch, computes
its empirical NTK and NNGP exactly, and trains by full-batch gradient descent
on the MSE or cross-entropy loss — everything in float64 GEMMs.

Parameterisations (those of :mod:`limitkernel.gram`, i.e. Neural Tangents'):

* ``"ntk"``: z = σ_w/√n · a W + σ_b · b with W, b ~ N(0, 1) trained;
* ``"standard"``: z = a W + b with W ~ N(0, σ_w²/n), b ~ N(0, σ_b²) trained.

Both are written z = w_mul · a W + b_mul · b with the trained W, b and the fixed
multipliers (w_mul, b_mul) = (σ_w/√n, σ_b) or (1, 1), n the layer's fan-in (the
input dimension d for the first layer).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
from scipy.linalg.blas import dgemm, dsyrk

from .activations import Activation
from .gram import check_inputs
from .spec import Dense, Serial, SpecError, as_spec

__all__ = ["LOSSES", "FiniteNetwork", "TrainingHistory", "limit_spec"]

LOSSES = ("mse", "cross_entropy")


# Every GEMM here goes through scipy's BLAS, operands passed as Fortran-ordered
# views (a C-ordered array is the transpose of one) so that nothing is copied.
# Mixing numpy's and scipy's BLAS in one loop can be slow: they may be two
# OpenBLAS builds whose thread pools then compete for the cores.


def _mm(x, y):
    """x @ y through scipy's dgemm (result in Fortran order)."""
    ax, tx = (x, False) if x.flags.f_contiguous else (x.T, True)
    ay, ty = (y, False) if y.flags.f_contiguous else (y.T, True)
    return dgemm(1.0, ax, ay, trans_a=tx, trans_b=ty)


def _gram(x, y=None):
    """x @ y.T, or x @ x.T (one triangle through dsyrk, then mirrored)."""
    if y is not None:
        return _mm(x, y.T)
    ax, trans = (x, False) if x.flags.f_contiguous else (x.T, True)
    upper = dsyrk(1.0, ax, trans=trans)
    return np.triu(upper) + np.triu(upper, 1).T


class _DenseParams:
    """Trained parameters of one dense layer and its fixed multipliers."""

    __slots__ = ("b", "b_mul", "layer", "w", "w_mul")

    def __init__(self, layer, fan_in, fan_out, rng):
        self.layer = layer
        # Stored (fan_in, fan_out), C order, so that z = a @ w and the update
        # w ← w − η w_mul aᵀg runs in place as one GEMM on wᵀ (Fortran order).
        self.w = rng.standard_normal((fan_in, fan_out))
        self.b = rng.standard_normal(fan_out)
        if layer.parameterization == "ntk":
            self.w_mul, self.b_mul = layer.w_std / math.sqrt(fan_in), layer.b_std
        else:
            self.w *= layer.w_std / math.sqrt(fan_in)
            self.b *= layer.b_std
            self.w_mul, self.b_mul = 1.0, 1.0

    @property
    def fan_in(self):
        return self.w.shape[0]

    @property
    def fan_out(self):
        return self.w.shape[1]

    def __call__(self, a):
        z = _mm(a, self.w)
        if self.w_mul != 1.0:
            z *= self.w_mul
        if self.b_mul != 0.0:
            z += self.b_mul * self.b
        return z


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


def limit_spec(spec, width):
    """The spec whose :func:`limitkernel.kernel` is the limit of networks of this width.

    In the standard parameterisation the NTK depends on the widths, so every
    standard hidden dense layer gets its width (``width``: one int, or one per
    hidden dense layer); NTK-parameterised layers are unchanged.
    """
    spec = as_spec(spec)
    hidden = [layer for layer in spec.layers[:-1] if isinstance(layer, Dense)]
    widths = iter(_check_widths(width, len(hidden)))
    layers = []
    for layer in spec.layers[:-1]:
        if isinstance(layer, Dense):
            w = next(widths)
            if layer.parameterization == "standard":
                layer = Dense(layer.w_std, layer.b_std, "standard", w)
        layers.append(layer)
    return Serial(layers + list(spec.layers[-1:]))


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
                f"layer(s) (every dense layer but the readout); give one int for all, "
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
    """A finite fully-connected network built from a spec.

    Parameters
    ----------
    spec : str or Serial or list of layers
        The architecture, as for :func:`limitkernel.kernel`; it must end with a
        dense readout.
    width : int or sequence of int, optional
        Width of every hidden dense layer (all dense layers but the readout), or
        one width per hidden dense layer. Default: the layers' ``width``
        parameters (then required).
    n_features : int
        Input dimension d.
    n_outputs : int
        Width c of the readout.
    seed : int, None or numpy.random.Generator
        Source of the initial parameters (drawn layer by layer, W then b).

    Attributes
    ----------
    widths : tuple of int
        Hidden widths.
    dense : list
        Per dense layer, an object with the trained arrays ``w`` (fan_in,
        fan_out) and ``b`` (fan_out,) and the multipliers ``w_mul``, ``b_mul``.

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
    """

    def __init__(self, spec, width=None, n_features=None, n_outputs=1, seed=None):
        self.spec = as_spec(spec)
        layers = list(self.spec)
        if not layers or not isinstance(layers[-1], Dense):
            last = layers[-1] if layers else "nothing"
            raise SpecError(f"the network must end with a dense readout layer, but its last "
                            f"layer is {last}; append ', dense'")
        for index, layer in enumerate(layers):
            if not isinstance(layer, (Dense, Activation)):
                raise SpecError(f"layer {index + 1} ({layer}) is not supported by finite "
                                "networks, which are built from dense layers and "
                                "activations only")
        if n_features is None or isinstance(n_features, bool) or int(n_features) != n_features \
                or n_features < 1:
            raise ValueError(f"n_features must be a positive integer (the input dimension d), "
                             f"got {n_features!r}")
        if isinstance(n_outputs, bool) or int(n_outputs) != n_outputs or n_outputs < 1:
            raise ValueError(f"n_outputs must be a positive integer, got {n_outputs!r}")
        self.n_features, self.n_outputs = int(n_features), int(n_outputs)
        hidden = [layer for layer in layers[:-1] if isinstance(layer, Dense)]
        widths = _check_widths(width, len(hidden))
        if widths is None:
            missing = [i + 1 for i, layer in enumerate(layers[:-1])
                       if isinstance(layer, Dense) and layer.width is None]
            if missing:
                raise ValueError(f"give width=... (one int, or one per hidden dense layer): "
                                 f"dense layer(s) at position {missing} have no width")
            widths = [int(layer.width) for layer in hidden]
        self.widths = tuple(widths)
        rng = _check_rng(seed)
        self._layers, self.dense = [], []
        fan_in, next_width = self.n_features, iter(self.widths + (self.n_outputs,))
        for layer in layers:
            if isinstance(layer, Dense):
                params = _DenseParams(layer, fan_in, next(next_width), rng)
                fan_in = params.fan_out
                self.dense.append(params)
                self._layers.append(params)
            else:
                self._layers.append(layer)

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
        return limit_spec(self.spec, self.widths)

    def _check_x(self, x, name="x"):
        x = check_inputs(x, name)
        if x.shape[1] != self.n_features:
            raise ValueError(f"{name} has {x.shape[1]} features but the network was built "
                             f"with n_features={self.n_features}")
        return x

    def forward(self, x):
        """Outputs on a batch.

        Parameters
        ----------
        x : (N, d) array_like

        Returns
        -------
        (N, c) array
        """
        return self._forward(self._check_x(x))[0]

    __call__ = forward

    def _forward(self, x, keep=False, check=True):
        """Outputs and, with ``keep``, per layer the dense input or the activation's φ'."""
        cache = []
        a = x
        for layer in self._layers:
            if isinstance(layer, _DenseParams):
                if keep:
                    cache.append(a)
                a = layer(a)
            else:
                if keep:
                    cache.append(layer.derivative(a))
                a = layer.forward(a)
        if check and not np.all(np.isfinite(a)):
            raise FloatingPointError("the network's outputs overflow (inf or NaN); lower "
                                     "w_std, b_std or the input scale")
        return a, cache

    # ---------------------------------------------------------------- kernels

    def nngp(self, x1, x2=None):
        """Empirical NNGP: the output covariance given the readout's input a.

        ``σ_w²/n · a(x)·a(x') + σ_b²`` (n the readout's fan-in), in either
        parameterisation: over the readout's random weights this is the
        covariance of each output, whose infinite-width limit is the NNGP kernel
        of :func:`limitkernel.kernel`.

        Returns
        -------
        (N, M) array
        """
        return self.kernels(x1, x2, get="nngp")["nngp"]

    def ntk(self, x1, x2=None):
        """Empirical NTK ⟨∂f(x)/∂θ, ∂f(x')/∂θ⟩, exactly.

        Returns
        -------
        (N, M) array for one output; (N, M, c, c) for c outputs, entry
        [i, j, k, l] = ⟨∂f_k(x_i)/∂θ, ∂f_l(x_j)/∂θ⟩ (its limit is Θ ⊗ I_c).
        """
        return self.kernels(x1, x2, get="ntk")["ntk"]

    def kernels(self, x1, x2=None, get=("nngp", "ntk")):
        """Empirical NNGP and/or NTK, as a dict like :func:`limitkernel.kernel`."""
        kinds = (get,) if isinstance(get, str) else tuple(get)
        if not kinds or any(k not in ("nngp", "ntk") for k in kinds):
            raise ValueError(f"get must name 'nngp' and/or 'ntk', got {get!r}")
        x1 = self._check_x(x1, "x1")
        sym = x2 is None
        _, cache1 = self._forward(x1, keep=True)
        if sym:
            cache2 = cache1
        else:
            _, cache2 = self._forward(self._check_x(x2, "x2"), keep=True)
        out = {}
        if "nngp" in kinds:
            head = self.dense[-1]
            a1, a2 = cache1[-1], cache2[-1]
            scale = head.layer.w_std ** 2 / head.fan_in
            out["nngp"] = scale * _gram(a1, None if sym else a2) + head.layer.b_std ** 2
        if "ntk" in kinds:
            out["ntk"] = self._ntk(cache1, cache2, sym, x1.shape[0],
                                   x1.shape[0] if sym else x2.shape[0])
        return {k: out[k] for k in kinds}

    def _ntk(self, cache1, cache2, sym, n1, n2):
        c = self.n_outputs
        # Backward signals, rows (example, output unit): start at ∂f_k/∂f = e_k.
        delta1 = np.tile(np.eye(c), (n1, 1))
        delta2 = delta1 if sym else np.tile(np.eye(c), (n2, 1))
        theta = np.zeros((n1 * c, n2 * c))
        first_dense = next(i for i, layer in enumerate(self._layers)
                           if isinstance(layer, _DenseParams))
        for index in range(len(self._layers) - 1, first_dense - 1, -1):
            layer = self._layers[index]
            if isinstance(layer, _DenseParams):
                a1, a2 = cache1[index], cache2[index]
                gram_a = _gram(a1, None if sym else a2)
                gram_a *= layer.w_mul ** 2
                gram_a += layer.b_mul ** 2
                gram_d = _gram(delta1, None if sym else delta2)
                if c == 1:
                    gram_d *= gram_a
                else:
                    gram_d = (gram_d.reshape(n1, c, n2, c)
                              * gram_a[:, None, :, None]).reshape(n1 * c, n2 * c)
                theta += gram_d
                if index > first_dense:
                    delta1 = _mm(delta1, layer.w.T)
                    delta1 *= layer.w_mul
                    if not sym:
                        delta2 = _mm(delta2, layer.w.T)
                        delta2 *= layer.w_mul
                    else:
                        delta2 = delta1
            else:
                d1 = cache1[index]
                delta1 = (delta1.reshape(n1, c, -1) * d1[:, None, :]).reshape(n1 * c, -1)
                if sym:
                    delta2 = delta1
                else:
                    d2 = cache2[index]
                    delta2 = (delta2.reshape(n2, c, -1) * d2[:, None, :]).reshape(n2 * c, -1)
        if c == 1:
            return theta
        return np.ascontiguousarray(theta.reshape(n1, c, n2, c).transpose(0, 2, 1, 3))

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
        g = grad
        first = len(self._layers)
        for index, layer in enumerate(self._layers):
            if isinstance(layer, _DenseParams):
                first = index
                break
        for index in range(len(self._layers) - 1, first - 1, -1):
            layer = self._layers[index]
            if isinstance(layer, _DenseParams):
                a = cache[index]
                g_in = None
                if index > first:
                    g_in = _mm(g, layer.w.T)
                    g_in *= layer.w_mul
                # w ← w − η w_mul aᵀ g, as (wᵀ) ← (wᵀ) − η w_mul gᵀ a in place.
                ga, ta = (g, True) if g.flags.f_contiguous else (g.T, False)
                aa, tb = (a, False) if a.flags.f_contiguous else (a.T, True)
                wt = dgemm(-eta * layer.w_mul, ga, aa, beta=1.0, c=layer.w.T,
                           trans_a=ta, trans_b=tb, overwrite_c=True)
                if not np.shares_memory(wt, layer.w):
                    layer.w = np.ascontiguousarray(wt.T)
                if layer.b_mul != 0.0:
                    layer.b -= (eta * layer.b_mul) * g.sum(axis=0)
                g = g_in
            else:
                g = g * cache[index]
