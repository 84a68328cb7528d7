"""PyTorch models as specs, specs as PyTorch models, and empirical NTKs of torch models.

torch is an optional extra (``pip install 'limitkernel[torch]'``), imported on
first use.

* :func:`from_torch` turns an ``nn.Sequential`` of Linear, activation,
  LayerNorm and Dropout modules (and the block modules :class:`Residual`,
  :class:`Parallel`, :class:`Concat` defined here) into a spec.
* :func:`to_torch` builds the torch network of a spec at a given width,
  initialised as the spec says.
* :func:`empirical_ntk_torch` computes the empirical NTK of any torch module on
  a batch with ``torch.func``, to put beside the limit.

Conventions. ``nn.Linear`` computes ``W x + b`` with the weights as they are: it
is a dense layer in the *standard* parameterisation, whose NNGP is that of the
default "ntk" parameterisation but whose NTK grows with the widths (see
:class:`limitkernel.spec.Dense`); from_torch records each layer's output width.
Its scales σ_w = std(W)·√fan_in and σ_b = std(b) are read from the weights
(root mean squares, the weights being taken as zero-mean), unless the module
states them (``to_torch`` stores them as ``module.limitkernel_std``) or the
caller does (``w_std=``, ``b_std=``). PyTorch's default initialisation,
U(−1/√fan_in, 1/√fan_in) for both, has σ_w = 1/√3 and σ_b → 0 as the width
grows. :class:`NTKLinear` is the "ntk" parameterisation as a module.
"""

import math
import warnings

import numpy as np

from .layers import Concat as _ConcatSpec
from .layers import Dense, Dropout, LayerNorm, get_activation
from .layers import Parallel as _ParallelSpec
from .layers import Residual as _ResidualSpec
from .layers.activations import Activation
from .spec import REGISTRY, SpecError, as_spec

# The module classes are defined on first use (see __getattr__).
__all__ = [
    "Concat",  # noqa: F822
    "NTKLinear",  # noqa: F822
    "Parallel",  # noqa: F822
    "Residual",  # noqa: F822
    "empirical_ntk_torch",
    "from_torch",
    "to_torch",
]

_INSTALL = "pip install 'limitkernel[torch]'"


def _torch():
    try:
        import torch
    except ImportError:
        raise ImportError(f"this needs PyTorch: {_INSTALL}") from None
    return torch


# ------------------------------------------------------------ block modules

_CLASSES = {}


def _classes():
    """The torch module classes, defined on first use (torch is imported lazily)."""
    if _CLASSES:
        return _CLASSES
    torch = _torch()
    nn = torch.nn

    class Residual(nn.Module):
        """``alpha · x + beta · branch(x)``; ``branch`` is a module (or modules,
        chained)."""

        def __init__(self, *branch, alpha=1.0, beta=1.0):
            super().__init__()
            self.branch = branch[0] if len(branch) == 1 else nn.Sequential(*branch)
            self.alpha, self.beta = float(alpha), float(beta)

        def forward(self, x):
            return self.alpha * x + self.beta * self.branch(x)

        def extra_repr(self):
            return f"alpha={self.alpha}, beta={self.beta}"

    class Parallel(nn.Module):
        """The sum of the branches, each applied to the input."""

        def __init__(self, *branches):
            super().__init__()
            self.branches = nn.ModuleList(branches)

        def forward(self, x):
            out = self.branches[0](x)
            for branch in self.branches[1:]:
                out = out + branch(x)
            return out

    class Concat(nn.Module):
        """The concatenation of the branches' outputs along the last axis."""

        def __init__(self, *branches):
            super().__init__()
            self.branches = nn.ModuleList(branches)

        def forward(self, x):
            return torch.cat([branch(x) for branch in self.branches], dim=-1)

    class NTKLinear(nn.Module):
        """Dense layer in the NTK parameterisation: ``σ_w/√n · W x + σ_b · b``,
        with W, b ~ N(0, 1) at initialisation."""

        def __init__(self, in_features, out_features, w_std=1.0, b_std=0.0,
                     generator=None):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.w_std, self.b_std = float(w_std), float(b_std)
            self.weight = nn.Parameter(torch.randn(out_features, in_features,
                                                   generator=generator))
            self.bias = nn.Parameter(torch.randn(out_features, generator=generator))

        def forward(self, x):
            scale = self.w_std / math.sqrt(self.in_features)
            return scale * x @ self.weight.T + self.b_std * self.bias

        def extra_repr(self):
            return (f"in_features={self.in_features}, out_features={self.out_features}, "
                    f"w_std={self.w_std}, b_std={self.b_std}")

    for cls in (Residual, Parallel, Concat, NTKLinear):
        cls.__module__ = __name__
        _CLASSES[cls.__name__] = cls
    return _CLASSES


def __getattr__(name):
    if name in ("Residual", "Parallel", "Concat", "NTKLinear"):
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------ torch → spec

# torch activation class name -> (spec text, parameters read from the module)
def _activations():
    """torch module name -> activation class, from each activation's ``torch`` attribute."""
    return {cls.torch[0]: cls for cls in set(REGISTRY.values())
            if isinstance(cls, type) and issubclass(cls, Activation) and cls.torch}


def _describe(cls):
    module, _, required = cls.torch
    fixed = ", ".join(f"{k}={v!r}" for k, v in required.items())
    return f"{module}({fixed})" if fixed else module


def _supported():
    return ("Linear, NTKLinear, " + ", ".join(sorted(_describe(c) for c in _activations().values()))
            + ", LayerNorm (over the last axis), Dropout, and nn.Sequential, "
            "limitkernel.torch_interop.Residual, Parallel and Concat of these")


def _rms(t):
    return math.sqrt(float((t.detach().double() ** 2).mean())) if t.numel() else 0.0


def from_torch(model, w_std=None, b_std=None):
    """The limitkernel spec of a PyTorch model.

    Parameters
    ----------
    model : torch.nn.Module
        An ``nn.Sequential`` (or one supported module) ending with a Linear
        readout. Nested Sequentials are flattened.
    w_std, b_std : float, optional
        State the scales of every Linear layer instead of reading them from the
        weights (see the module notes).

    Returns
    -------
    Serial

    Raises
    ------
    SpecError
        For a module with no infinite-width counterpart here, naming it, its
        place in the model, and what is supported.

    Notes
    -----
    Dropout counts only in training mode (``model.train()``); in eval mode it
    is the identity and is left out. LayerNorm's affine parameters are taken at
    their initial values (γ = 1, β = 0); in the empirical NTK their gradients add
    a share that is O(1/width) next to nn.Linear layers (standard
    parameterisation), but O(1) next to :class:`NTKLinear` layers, so compare
    those with ``elementwise_affine=False``.
    """
    torch = _torch()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"from_torch expects a torch.nn.Module, got {type(model).__name__}")
    layers = _convert(model, "model", w_std, b_std, model.training)
    if layers and isinstance(layers[-1], Dense) and layers[-1].width is not None:
        # The readout's own width enters no kernel.
        last = layers[-1]
        layers[-1] = Dense(last.w_std, last.b_std, last.parameterization)
    return as_spec(layers)


def _convert(module, where, w_std, b_std, training):
    torch = _torch()
    nn = torch.nn
    classes = _classes()
    name = type(module).__name__
    if isinstance(module, nn.Sequential):
        out = []
        for key, child in module.named_children():
            out.extend(_convert(child, f"{where}[{key}]", w_std, b_std, training))
        return out
    if isinstance(module, classes["Residual"]):
        branch = _convert(module.branch, f"{where}.branch", w_std, b_std, training)
        return [_ResidualSpec(branch, alpha=module.alpha, beta=module.beta)]
    if isinstance(module, (classes["Parallel"], classes["Concat"])):
        branches = [_convert(b, f"{where}.branches[{i}]", w_std, b_std, training)
                    for i, b in enumerate(module.branches)]
        if isinstance(module, classes["Parallel"]):
            return [_ParallelSpec(*branches)]
        widths = [_out_width(b, f"{where}.branches[{i}]")
                  for i, b in enumerate(module.branches)]
        common = math.gcd(*widths)
        widths = None if len(set(widths)) == 1 else tuple(w // common for w in widths)
        return [_ConcatSpec(*branches, widths=widths)]
    if isinstance(module, classes["NTKLinear"]):
        return [Dense(module.w_std if w_std is None else w_std,
                      module.b_std if b_std is None else b_std)]
    if isinstance(module, nn.Linear):
        stated = getattr(module, "limitkernel_std", None)
        sw = w_std if w_std is not None else (
            stated[0] if stated else _rms(module.weight) * math.sqrt(module.in_features))
        sb = b_std if b_std is not None else (
            stated[1] if stated else (_rms(module.bias) if module.bias is not None else 0.0))
        return [Dense(sw, sb, "standard", width=module.out_features)]
    if isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1:
            raise SpecError(f"{where} ({module}): only LayerNorm over the last axis "
                            "(normalized_shape=(features,)) has a limit here")
        if module.elementwise_affine and not _at_init(module):
            warnings.warn(f"{where} ({module}): its affine weight and bias differ from "
                          "1 and 0; the spec describes the network at initialisation "
                          "and leaves them out", stacklevel=3)
        # The affine parameters, if any, are not part of the limit: next to
        # nn.Linear layers their share of the NTK is O(1/width). Beside NTKLinear
        # layers it is not, so to_torch builds LayerNorm without them.
        return [LayerNorm(eps=module.eps)]
    if isinstance(module, nn.Dropout):
        return [Dropout(p=module.p)] if training and module.p > 0 else []
    cls = _activations().get(name)
    if cls is not None:
        _, params, required = cls.torch
        if all(getattr(module, k, None) == v for k, v in required.items()):
            return [get_activation(cls.name, **{k: getattr(module, attr) for k, attr in params})]
    raise SpecError(
        f"from_torch: unsupported module {name} at {where} ({module}); supported: "
        f"{_supported()}"
    )


def _at_init(module):
    weight_ok = module.weight is None or bool((module.weight == 1).all())
    bias_ok = module.bias is None or bool((module.bias == 0).all())
    return weight_ok and bias_ok


def _out_width(module, where):
    """Output width of a Concat branch: that of its last linear layer."""
    torch = _torch()
    linear = (torch.nn.Linear, _classes()["NTKLinear"])
    found = [m for m in module.modules() if isinstance(m, linear)]
    if not found:
        raise SpecError(f"{where}: the width of a Concat branch is read from its last "
                        "Linear layer; end every branch with one")
    return int(found[-1].out_features)


# ------------------------------------------------------------ spec → torch


def to_torch(spec, d, width, seed=0, dtype=None):
    """The finite network of ``spec`` as a torch module, freshly initialised.

    Dense layers in the "ntk" parameterisation become :class:`NTKLinear`; in the
    "standard" one, ``nn.Linear`` with weights N(0, σ_w²/fan_in) and biases
    N(0, σ_b²) (their ``width``, when the spec gives one, overrides ``width``).
    The readout has one output.

    Parameters
    ----------
    spec : str or Serial
    d : int
        Input dimension.
    width : int
        Width of every hidden dense layer without its own ``width``.
    seed : int
        Seed of the initialisation.
    dtype : torch.dtype, optional
        Defaults to torch's default dtype.
    """
    torch = _torch()
    gen = torch.Generator().manual_seed(int(seed))
    layers = list(as_spec(spec))
    modules, _ = _build(layers, int(d), int(width), gen, top=True)
    model = torch.nn.Sequential(*modules)
    return model.to(dtype) if dtype is not None else model


def _build(layers, n_in, width, gen, top=False, final=None):
    torch = _torch()
    nn = torch.nn
    classes = _classes()
    out = []
    for pos, layer in enumerate(layers):
        last = pos == len(layers) - 1
        if isinstance(layer, Dense):
            n_out = 1 if top and last else int(layer.width or final or width)
            if layer.parameterization == "ntk":
                out.append(classes["NTKLinear"](n_in, n_out, layer.w_std, layer.b_std,
                                                generator=gen))
            else:
                lin = nn.Linear(n_in, n_out)
                with torch.no_grad():
                    lin.weight.normal_(0.0, layer.w_std / math.sqrt(n_in), generator=gen)
                    lin.bias.normal_(0.0, layer.b_std, generator=gen)
                lin.limitkernel_std = (layer.w_std, layer.b_std)
                out.append(lin)
            n_in = n_out
        elif isinstance(layer, _ResidualSpec):
            branch, _ = _build(list(layer.branches[0]), n_in, width, gen, final=n_in)
            out.append(classes["Residual"](*branch, alpha=layer.alpha, beta=layer.beta))
        elif isinstance(layer, _ParallelSpec):
            branches = [nn.Sequential(*_build(list(b), n_in, width, gen, final=width)[0])
                        for b in layer.branches]
            out.append(classes["Parallel"](*branches))
            n_in = width
        elif isinstance(layer, _ConcatSpec):
            k = len(layer.branches)
            widths = [max(1, round(width * k * f)) for f in layer.fractions()]
            built = [_build(list(b), n_in, width, gen, final=w)
                     for b, w in zip(layer.branches, widths)]
            out.append(classes["Concat"](*[nn.Sequential(*m) for m, _ in built]))
            n_in = sum(n for _, n in built)
        elif isinstance(layer, LayerNorm):
            out.append(nn.LayerNorm(n_in, eps=layer.eps, elementwise_affine=False))
        elif isinstance(layer, Dropout):
            out.append(nn.Dropout(layer.p))
        else:
            out.append(_torch_activation(layer))
    return out, n_in


def _torch_activation(layer):
    nn = _torch().nn
    if layer.torch is None:
        known = ", ".join(sorted(c.name for c in _activations().values()))
        raise SpecError(f"to_torch: no torch module for {layer}; available: {known}")
    module, params, required = layer.torch
    kwargs = {attr: layer.params[key] for key, attr in params}
    kwargs.update({k: v for k, v in required.items() if k != "approximate" or v != "none"})
    return getattr(nn, module)(**kwargs)


# ------------------------------------------------------------ empirical NTK


def empirical_ntk_torch(model, x1, x2=None, batch_size=64):
    """Empirical NTK Σ_p ∂f(x)/∂p · ∂f(x')/∂p of a torch module, with torch.func.

    Parameters
    ----------
    model : torch.nn.Module
        Maps a batch (n, d) to outputs (n, k) (or (n,)).
    x1 : (n1, d) array_like or torch.Tensor
    x2 : (n2, d) array_like or torch.Tensor, optional
        ``None`` means x1 with itself.
    batch_size : int
        Inputs per Jacobian: memory is about batch_size × (number of
        parameters) × k numbers.

    Returns
    -------
    (n1, n2) numpy array
        The NTK averaged over the k outputs, Σ_c Θ̂_cc / k (the limit is the same
        kernel for every output and zero between outputs).

    Notes
    -----
    Per-example Jacobians come from ``torch.func.vmap(torch.func.jacrev(...))``
    with the model's parameters at their current values, in the model's mode:
    in training mode every example draws its own dropout mask, and x1 and x2
    count as different examples.
    """
    torch = _torch()
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameters, so its NTK is 0")
    dtype = next(iter(params.values())).dtype

    def as_tensor(x, name):
        t = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x, dtype=dtype)
        if t.ndim != 2:
            raise ValueError(f"{name} must be a 2D array (n_inputs, n_features), "
                             f"got shape {tuple(t.shape)}")
        return t

    def single(p, xi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return out.reshape(-1)

    jac = vmap(jacrev(single), in_dims=(None, 0), randomness="different")

    def jacobians(x):
        blocks = []
        for start in range(0, x.shape[0], batch_size):
            j = jac(params, x[start:start + batch_size])
            blocks.append(torch.cat([v.reshape(v.shape[0], v.shape[1], -1)
                                     for v in j.values()], dim=2))
        return torch.cat(blocks, dim=0)  # (n, k, P)

    a = as_tensor(x1, "x1")
    ja = jacobians(a)
    jb = ja if x2 is None else jacobians(as_tensor(x2, "x2"))
    ntk = torch.einsum("ikp,jkp->ij", ja, jb) / ja.shape[1]
    return ntk.detach().cpu().numpy().astype(np.float64)
