"""The kernel of an infinitely wide network as a scikit-learn kernel object.

``Kernel(spec, kind="ntk", w_std=None, b_std=None)`` evaluates the NNGP or NTK of
a spec on inputs, ``k(X, Y=None, eval_gradient=False)`` and ``k.diag(X)``, with
σ_w and σ_b as hyperparameters that set every dense layer of the spec. With
scikit-learn installed it is a ``sklearn.gaussian_process.kernels.Kernel``, so it
goes into ``GaussianProcessRegressor``, combines with other kernels
(``Kernel(...) + WhiteKernel()``) and is cloned and searched like them; without
scikit-learn it is a plain class with the same methods (no ``+``/``*``). The
class is built on first access, so ``import limitkernel`` does not import
scikit-learn.
"""

import copy
import inspect
import math
from typing import NamedTuple

import numpy as np

from .layers import AvgPool, Conv, Dense, Flatten, GlobalAvgPool
from .layers.activations import ABRelu
from .gram import check_inputs, kernel, kernel_diag
from .spec import Block, Serial, SpecError, as_spec

__all__ = ["Kernel"]  # noqa: F822 (built on first access by __getattr__)

_EPS = np.finfo(np.float64).eps
# Central differences take the step _STEP in log σ_b and _STEP / (2 L) in log σ_w,
# L the number of dense layers: it balances the truncation error h²/6 |∂³K|
# against the rounding error δ/h, K growing like σ_w^(2L) (see Kernel, Notes).
_STEP = (3 * _EPS) ** (1 / 3)
_KINDS = ("ntk", "nngp")


def scaled_spec(spec, w_std=None, b_std=None):
    """The spec with every dense and conv layer's σ_w and σ_b replaced (None keeps
    them).

    Layers inside blocks (residual, parallel, concat branches) are replaced too;
    their parameterisation, width and (for conv) filter, padding and stride are
    kept.
    """
    layers = []
    for layer in as_spec(spec):
        if isinstance(layer, Dense):
            layer = Dense(layer.w_std if w_std is None else float(w_std),
                          layer.b_std if b_std is None else float(b_std),
                          layer.parameterization, layer.width)
        elif isinstance(layer, Conv):
            layer = Conv(layer.k, layer.padding, layer.stride,
                         layer.w_std if w_std is None else float(w_std),
                         layer.b_std if b_std is None else float(b_std),
                         layer.parameterization, layer.width)
        elif isinstance(layer, Block):
            branches = tuple(scaled_spec(b, w_std, b_std) for b in layer.branches)
            layer = copy.copy(layer)
            layer.branches = branches
        layers.append(layer)
    return Serial(layers)


def _dense_count(spec):
    count = 0
    for layer in spec:
        if isinstance(layer, (Dense, Conv)):
            count += 1
        elif isinstance(layer, Block):
            count += sum(_dense_count(b) for b in layer.branches)
    return count


def _homogeneous_degree(spec, kind):
    """2L if the kernel is exactly σ_w^(2L) times its value at σ_w = 1, else None.

    That holds for a serial of bias-free dense layers (NTK parameterisation, or any
    for the NNGP) and positively homogeneous activations of degree 1 (ReLU, leaky
    ReLU, abs, identity, abrelu): each dense layer multiplies K and Θ by σ_w² and
    each activation keeps their scale, its derivative kernel being scale-free.
    """
    count = 0
    for layer in spec:
        if isinstance(layer, (Dense, Conv)):
            if layer.b_std != 0 or (kind == "ntk" and layer.parameterization != "ntk"):
                return None
            count += 1
        elif isinstance(layer, (AvgPool, GlobalAvgPool, Flatten)):
            continue  # linear and free of σ_w
        elif not isinstance(layer, ABRelu):
            return None
    return 2 * count


class _Hyperparameter(NamedTuple):
    """Stand-in for scikit-learn's ``Hyperparameter`` (same fields)."""

    name: str
    value_type: str
    bounds: object
    n_elements: int = 1
    fixed: bool = False


def _hyperparameter_standin(name, value_type, bounds):
    fixed = isinstance(bounds, str) and bounds == "fixed"
    if not fixed:
        bounds = np.atleast_2d(np.asarray(bounds, dtype=np.float64))
    return _Hyperparameter(name, value_type, bounds, 1, fixed)


def _same(a, b):
    if isinstance(a, str) or isinstance(b, str) or a is None or b is None:
        return type(a) is type(b) and a == b
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and bool(np.all(a == b))


class _NetworkKernel:
    """The NNGP or NTK of an infinitely wide network, as a scikit-learn kernel.

    ``k(X, Y=None, eval_gradient=False)`` is ``lk.kernel(spec, X, Y)[kind]`` for the
    spec with every dense layer's σ_w and σ_b set to ``w_std`` and ``b_std``;
    ``k.diag(X)`` its diagonal. With scikit-learn installed this is a
    ``sklearn.gaussian_process.kernels.Kernel``: it goes into
    ``GaussianProcessRegressor`` (whose optimiser tunes log σ_w and log σ_b),
    ``+``/``*`` combine it with other kernels, and ``clone``, ``get_params`` and
    ``GridSearchCV`` (``kernel__w_std``) work as for scikit-learn's kernels.

    Parameters
    ----------
    spec : str or Serial
        The architecture, a template: its dense layers' σ_w and σ_b are replaced by
        ``w_std`` and ``b_std`` when those are given (all dense layers, in blocks
        too, the readout included; parameterisation and widths are kept).
    kind : {"ntk", "nngp"}, default="ntk"
        Which kernel to evaluate.
    w_std : float or None, default=None
        σ_w of every dense layer; a hyperparameter (θ = log σ_w) within
        ``w_std_bounds``. None keeps each layer's own σ_w and fixes it.
    b_std : float or None, default=None
        σ_b of every dense layer; a hyperparameter (θ = log σ_b) within
        ``b_std_bounds``. None keeps each layer's own σ_b and fixes it; 0 (no
        bias) is fixed too, having no logarithm.
    w_std_bounds, b_std_bounds : pair of float or "fixed"
        Bounds of the hyperparameters (default (0.1, 10) and (1e-4, 10)), or
        "fixed" to keep the value out of ``theta``.
    input_shape : tuple of int, default=None
        For a network on images or sequences, the shape (H, W, C) or (L, C) of
        one input; X holds each input flattened in C order, as scikit-learn
        wants 2-D arrays. σ_w and σ_b then also replace those of conv layers.

    Notes
    -----
    The gradient with respect to θ = (log σ_b, log σ_w) (the free ones, in that
    order, as scikit-learn orders hyperparameters by name) is

    * exact for log σ_w when the kernel is homogeneous in σ_w: a serial of
      bias-free dense or conv layers, pooling and flatten, and activations
      positively homogeneous of degree 1 (relu, leaky_relu, abs, identity,
      abrelu), NTK parameterisation or ``kind="nngp"``; there
      K = σ_w^(2L) K|σ_w=1 with L dense and conv layers, so ∂K/∂log σ_w = 2L K;
    * otherwise a central difference, two more kernel evaluations per free
      hyperparameter, with step h = (3ε)^(1/3) ≈ 8.7e-6 in log σ_b and h/(2L)
      in log σ_w. Its error is the truncation h²/6 |∂³K/∂θ³| plus the rounding
      δ/h, δ the absolute error of the kernel. For closed-form activations
      (δ a few ε·max|K|) this is about 1e-11 to 1e-10 of the largest entry of
      ∂K/∂log σ_w (which is about 2L·K), and of max|K| for ∂K/∂log σ_b; the
      tests hold both within 1e-9 for ReLU and erf networks with bias and 2 to
      11 dense layers, σ_b up to 3, against a 50-digit mpmath derivative.
      Activations evaluated by Hermite series (tanh, softplus, ...) carry δ up
      to tol·max|K| (tol = 1e-13 by default), which bounds the error by about
      1e-8·2L·max|K|; on a tanh network it measures 1e-10 of max|K| against a
      quadrature reference (tested within 1e-8).

    A GP with the NNGP kernel is the Bayesian posterior of the infinitely wide
    network; with the NTK it is kernel regression with that kernel. The kernel is
    not stationary and needs feature vectors (``requires_vector_input``).

    Examples
    --------
    >>> import numpy as np, limitkernel as lk
    >>> from sklearn.gaussian_process import GaussianProcessRegressor
    >>> from sklearn.gaussian_process.kernels import WhiteKernel
    >>> X = np.random.default_rng(0).standard_normal((50, 3)); y = np.sin(X[:, 0])
    >>> k = lk.Kernel("3 * [dense, relu], dense", kind="nngp", w_std=1.5, b_std=0.05)
    >>> gp = GaussianProcessRegressor(k + WhiteKernel(1e-2), normalize_y=True).fit(X, y)
    >>> fitted = gp.kernel_.k1.w_std, gp.kernel_.k1.b_std   # σ_w, σ_b after fitting
    >>> mean, std = gp.predict(X[:5], return_std=True)
    """

    def __init__(self, spec, kind="ntk", w_std=None, b_std=None,
                 w_std_bounds=(1e-1, 1e1), b_std_bounds=(1e-4, 1e1), input_shape=None):
        self.spec = spec
        self.kind = kind
        self.w_std = w_std
        self.b_std = b_std
        self.w_std_bounds = w_std_bounds
        self.b_std_bounds = b_std_bounds
        self.input_shape = input_shape

    def _inputs(self, X, name):
        """X as the network takes it: rows of flattened images or sequences are
        given their ``input_shape`` (scikit-learn passes 2-D arrays)."""
        X = check_inputs(X, name)
        if self.input_shape is None:
            return X
        shape = tuple(int(v) for v in np.atleast_1d(self.input_shape))
        if len(shape) not in (2, 3) or int(np.prod(shape)) != X.shape[1]:
            raise ValueError(f"input_shape {shape} must be (H, W, C) or (L, C) with as "
                             f"many values per input as {name} has features ({X.shape[1]})")
        return X.reshape((X.shape[0],) + shape)

    # -------------------------------------------------- hyperparameters

    def _declare(self, name, value, bounds):
        free = value is not None and value != 0 and not (isinstance(bounds, str)
                                                          and bounds == "fixed")
        return self._hyperparameter(name, "numeric", bounds if free else "fixed")

    @property
    def hyperparameter_w_std(self):
        """σ_w of every dense layer (fixed when ``w_std`` is None)."""
        return self._declare("w_std", self.w_std, self.w_std_bounds)

    @property
    def hyperparameter_b_std(self):
        """σ_b of every dense layer (fixed when ``b_std`` is None or 0)."""
        return self._declare("b_std", self.b_std, self.b_std_bounds)

    # -------------------------------------------------- evaluation

    def network(self):
        """The spec this kernel evaluates: the template with ``w_std``, ``b_std`` set."""
        for name in ("w_std", "b_std"):
            value = getattr(self, name)
            number = (isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
                      and math.isfinite(value) and value >= 0)
            if value is not None and not number:
                raise ValueError(f"{name} must be a number >= 0 or None (keep the "
                                 f"spec's own), got {value!r}")
        return scaled_spec(self.spec, self.w_std, self.b_std)

    def _kind(self):
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be 'ntk' or 'nngp', got {self.kind!r}")
        return self.kind

    def __call__(self, X, Y=None, eval_gradient=False):
        """The kernel k(X, Y), and its gradient with respect to theta if asked.

        Parameters
        ----------
        X : (n, d) array_like
            Inputs.
        Y : (m, d) array_like, optional
            Second inputs; None for k(X, X) (then only half is computed).
        eval_gradient : bool
            Also return the gradient with respect to the log-hyperparameters
            ``theta`` (only for ``Y=None``).

        Returns
        -------
        K : (n, m) ndarray
        K_gradient : (n, n, n_dims) ndarray, only with ``eval_gradient``
        """
        kind = self._kind()
        spec = self.network()
        X = self._inputs(X, "X")
        Y = None if Y is None else self._inputs(Y, "Y")
        if eval_gradient and Y is not None:
            raise ValueError("the gradient is computed only for k(X) with Y=None "
                             "(as for scikit-learn's kernels); drop Y or eval_gradient")
        K = kernel(spec, X, Y, get=kind)[kind]
        if not eval_gradient:
            return K
        return K, self._gradient(spec, X, K, kind)

    def _gradient(self, spec, X, K, kind):
        free = [h.name for h in self.hyperparameters if not h.fixed]
        grad = np.empty(K.shape + (len(free),))
        degree = _homogeneous_degree(spec, kind)
        step_w = _STEP / (2 * max(_dense_count(spec), 1))
        for k, name in enumerate(free):
            if name == "w_std" and degree is not None:
                grad[..., k] = degree * K
                continue
            value = float(getattr(self, name))
            step = step_w if name == "w_std" else _STEP
            up, down = value * math.exp(step), value * math.exp(-step)
            values = {"w_std": self.w_std, "b_std": self.b_std}
            sides = []
            for moved in (up, down):
                values[name] = moved
                sides.append(kernel(scaled_spec(self.spec, **values), X, get=kind)[kind])
            grad[..., k] = (sides[0] - sides[1]) / (math.log(up) - math.log(down))
        return grad

    def diag(self, X):
        """The diagonal of k(X), (n,), without the rest of the matrix."""
        kind = self._kind()
        return kernel_diag(self.network(), self._inputs(X, "X"), get=kind)[kind]

    def is_stationary(self):
        """False: the kernel depends on the inputs, not only on their difference."""
        return False

    @property
    def requires_vector_input(self):
        """True: inputs are feature vectors."""
        return True

    def __eq__(self, other):
        if type(self) is not type(other):
            return False
        a, b = self.get_params(deep=False), other.get_params(deep=False)
        try:
            same_spec = as_spec(a.pop("spec")) == as_spec(b.pop("spec"))
        except SpecError:
            return False
        return same_spec and all(_same(a[key], b[key]) for key in a)

    __hash__ = None

    def __repr__(self):
        try:
            spec = str(as_spec(self.spec))
        except SpecError:
            spec = self.spec
        args = [repr(spec), f"kind={self.kind!r}"]
        defaults = inspect.signature(_NetworkKernel.__init__).parameters
        for name in ("w_std", "b_std", "w_std_bounds", "b_std_bounds"):
            value = getattr(self, name)
            if not _same(value, defaults[name].default):
                if isinstance(value, (float, np.floating)):
                    value = float(value)  # 1.5, not np.float64(1.5)
                args.append(f"{name}={value!r}")
        return f"Kernel({', '.join(args)})"


class _StandInKernelBase:
    """What scikit-learn's ``Kernel`` base provides, for use without scikit-learn."""

    def get_params(self, deep=True):
        """Parameters of the kernel (the arguments of ``__init__``)."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {name: getattr(self, name) for name in names}

    def set_params(self, **params):
        """Set parameters; returns self."""
        valid = self.get_params()
        for key, value in params.items():
            if key not in valid:
                raise ValueError(f"invalid parameter {key!r} for kernel "
                                 f"{type(self).__name__}; valid parameters are "
                                 f"{sorted(valid)}")
            setattr(self, key, value)
        return self

    @property
    def hyperparameters(self):
        """The hyperparameter declarations, sorted by name."""
        return [getattr(self, a) for a in dir(self) if a.startswith("hyperparameter_")]

    @property
    def theta(self):
        """Log of the free hyperparameters."""
        values = [self.get_params()[h.name] for h in self.hyperparameters if not h.fixed]
        return np.log(np.hstack(values)) if values else np.array([])

    @theta.setter
    def theta(self, theta):
        free = [h.name for h in self.hyperparameters if not h.fixed]
        theta = np.asarray(theta, dtype=np.float64).reshape(-1)
        if theta.size != len(free):
            raise ValueError(f"theta has {theta.size} entries, expected {len(free)} "
                             f"({', '.join(free) or 'no free hyperparameters'})")
        self.set_params(**{name: float(np.exp(v)) for name, v in zip(free, theta)})

    @property
    def bounds(self):
        """Log of the bounds of the free hyperparameters, (n_dims, 2)."""
        bounds = [h.bounds for h in self.hyperparameters if not h.fixed]
        return np.log(np.vstack(bounds)) if bounds else np.array([])

    @property
    def n_dims(self):
        """Number of free hyperparameters."""
        return self.theta.shape[0]

    def clone_with_theta(self, theta):
        """A copy with the given log-hyperparameters."""
        cloned = type(self)(**self.get_params())
        cloned.theta = theta
        return cloned


_CLASSES = {}


def _build():
    try:
        from sklearn.gaussian_process.kernels import Hyperparameter
        from sklearn.gaussian_process.kernels import Kernel as Base
        uses_sklearn = True
    except ImportError:
        Hyperparameter, Base, uses_sklearn = _hyperparameter_standin, _StandInKernelBase, False

    class Kernel(_NetworkKernel, Base):
        __doc__ = _NetworkKernel.__doc__
        __module__ = __name__
        __qualname__ = "Kernel"
        _hyperparameter = staticmethod(Hyperparameter)
        _uses_sklearn = uses_sklearn

    _CLASSES["Kernel"] = Kernel


def __getattr__(name):
    if name == "Kernel":
        if not _CLASSES:
            _build()
        return _CLASSES["Kernel"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
