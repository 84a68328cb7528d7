"""PyTorch models as specs, specs as PyTorch models, and empirical NTKs of torch models.

torch is an optional extra (``pip install 'limitkernel[torch]'``), imported on
first use.

* :func:`from_torch` turns an ``nn.Sequential`` of Linear, activation,
  LayerNorm and Dropout modules, of Conv1d/Conv2d, AvgPool1d/2d,
  AdaptiveAvgPool1d/2d(1) and Flatten modules (and the block modules
  :class:`Residual`, :class:`Parallel`, :class:`Concat` defined here) into a
  spec.
* :func:`to_torch` builds the torch network of a spec at a given width,
  initialised as the spec says.
* :func:`empirical_ntk_torch` computes the empirical NTK of any torch module on
  a batch with ``torch.func``, to put beside the limit.

Layouts. limitkernel (like Neural Tangents) puts channels last: images
(N, H, W, C), sequences (N, L, C). PyTorch puts them first: (N, C, H, W),
(N, C, L). The specs are the same; only the arrays differ, by
``np.moveaxis(x, -1, 1)``. :func:`empirical_ntk_torch` takes the model's own
layout, or limitkernel's with ``channels_last=True``, and
:func:`limitkernel.compare` converts its channels-last data for a torch model.
``nn.Flatten`` orders a channels-first array channel by channel, limitkernel's
``flatten`` position by position: the kernels do not depend on that order.
A torch ``Linear`` or ``LayerNorm`` acts on the last axis, which in a
channels-first convolutional stack is not the channels, so neither has a spec
between a convolution and the flatten or global pooling.

Convolutions. The limit's paddings are Neural Tangents' (JAX's): "same" and
"circular" keep ceil(size/stride) outputs and put the smaller half of the
padding first, "valid" pads nothing. A torch convolution with stride 1 and
``padding="same"`` (or (k − 1)/2 on each side, k odd) is "same", or
"circular" with ``padding_mode="circular"``; with ``padding=0`` it is "valid"
at any stride. Torch's symmetric padding with a stride above 1 has no
counterpart (JAX's padding then depends on the input size): from_torch refuses
it, and to_torch builds such layers only as :class:`NTKConv`, which pads as
JAX does at run time.

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

from .finite import _spatial_out
from .layers import (
    AvgPool,
    Conv,
    Dense,
    Dropout,
    Flatten,
    GlobalAvgPool,
    LayerNorm,
    get_activation,
)
from .layers import Concat as _ConcatSpec
from .layers import Parallel as _ParallelSpec
from .layers import Residual as _ResidualSpec
from .layers.activations import Activation
from .spec import REGISTRY, SpecError, as_spec

# The module classes are defined on first use (see __getattr__).
__all__ = [
    "Concat",  # noqa: F822
    "NTKConv",  # noqa: F822
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

    class NTKConv(nn.Module):
        """Convolution in the NTK parameterisation, channels first:
        ``σ_w/√n · conv(x, W) + σ_b · b`` with W, b ~ N(0, 1) at
        initialisation and n = (taps)·in_channels, padded as Neural Tangents
        (JAX) pads: "same", "circular" or "valid" (see the module notes).

        ``kernel_size`` and ``stride`` are tuples of one entry (sequences,
        (N, C, L)) or two (images, (N, C, H, W)).
        """

        def __init__(self, in_channels, out_channels, kernel_size, stride=None,
                     padding="same", w_std=1.0, b_std=0.0, generator=None):
            super().__init__()
            self.in_channels, self.out_channels = in_channels, out_channels
            self.kernel_size = tuple(int(k) for k in kernel_size)
            self.stride = tuple(int(v) for v in (stride or (1,) * len(self.kernel_size)))
            self.padding = padding
            self.w_std, self.b_std = float(w_std), float(b_std)
            self.weight = nn.Parameter(torch.randn(out_channels, in_channels,
                                                   *self.kernel_size, generator=generator))
            self.bias = nn.Parameter(torch.randn(out_channels, generator=generator))

        def forward(self, x):
            fn = torch.nn.functional
            pads = []
            if self.padding != "valid":
                for size, k, s in zip(reversed(x.shape[2:]), reversed(self.kernel_size),
                                      reversed(self.stride)):
                    out = -(-size // s)
                    total = max((out - 1) * s + k - size, 0)
                    pads += [total // 2, total - total // 2]
                mode = "circular" if self.padding == "circular" else "constant"
                x = fn.pad(x, pads, mode=mode)
            conv = fn.conv1d if len(self.kernel_size) == 1 else fn.conv2d
            fan_in = self.in_channels * math.prod(self.kernel_size)
            out = conv(x, self.weight, stride=self.stride) * (self.w_std / math.sqrt(fan_in))
            shape = (1, -1) + (1,) * len(self.kernel_size)
            return out + self.b_std * self.bias.reshape(shape)

        def extra_repr(self):
            return (f"{self.in_channels}, {self.out_channels}, kernel_size="
                    f"{self.kernel_size}, stride={self.stride}, padding={self.padding!r}, "
                    f"w_std={self.w_std}, b_std={self.b_std}")

    for cls in (Residual, Parallel, Concat, NTKLinear, NTKConv):
        cls.__module__ = __name__
        _CLASSES[cls.__name__] = cls
    return _CLASSES


def __getattr__(name):
    if name in ("Residual", "Parallel", "Concat", "NTKLinear", "NTKConv"):
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
            + ", LayerNorm (over the last axis), Dropout, Conv1d, Conv2d, NTKConv, "
            "AvgPool1d, AvgPool2d, AdaptiveAvgPool1d(1), AdaptiveAvgPool2d(1), Flatten, and "
            "nn.Sequential, limitkernel.torch_interop.Residual, Parallel and Concat of these")


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
    layers = _convert(model, "model", w_std, b_std, model.training, {"spatial": False})
    if layers and isinstance(layers[-1], Dense) and layers[-1].width is not None:
        # The readout's own width enters no kernel.
        last = layers[-1]
        layers[-1] = Dense(last.w_std, last.b_std, last.parameterization)
    return as_spec(layers)


def _convert(module, where, w_std, b_std, training, state):
    """The spec layers of ``module``. ``state["spatial"]``: the activations have
    positions (after a convolution, before the flatten or global pooling);
    ``"pooled"`` right after an adaptive pooling, whose Flatten is part of it."""
    torch = _torch()
    nn = torch.nn
    classes = _classes()
    name = type(module).__name__
    pooled = state.pop("pooled", False)
    if isinstance(module, nn.Sequential):
        out = []
        for key, child in module.named_children():
            out.extend(_convert(child, f"{where}[{key}]", w_std, b_std, training, state))
        return out
    if isinstance(module, classes["Residual"]):
        branch = _convert(module.branch, f"{where}.branch", w_std, b_std, training, state)
        return [_ResidualSpec(branch, alpha=module.alpha, beta=module.beta)]
    if isinstance(module, (classes["Parallel"], classes["Concat"])):
        start = dict(state)
        branches = []
        for i, b in enumerate(module.branches):
            state.clear()
            state.update(start)
            branches.append(_convert(b, f"{where}.branches[{i}]", w_std, b_std, training,
                                     state))
        if isinstance(module, classes["Parallel"]):
            return [_ParallelSpec(*branches)]
        widths = [_out_width(b, f"{where}.branches[{i}]")
                  for i, b in enumerate(module.branches)]
        common = math.gcd(*widths)
        widths = None if len(set(widths)) == 1 else tuple(w // common for w in widths)
        return [_ConcatSpec(*branches, widths=widths)]
    spatial = _convert_spatial(module, where, w_std, b_std, state, pooled)
    if spatial is not None:
        return spatial
    if isinstance(module, (nn.Linear, nn.LayerNorm)) and state["spatial"]:
        raise SpecError(
            f"from_torch: {where} ({module}) acts on the last axis of a channels-first "
            "convolutional activation (a position axis, not the channels), which has no "
            "limit here; put it after the Flatten or the global pooling")
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


def _convert_spatial(module, where, w_std, b_std, state, pooled):
    """The spec of a convolution, pooling or flatten module (None for other modules)."""
    nn = _torch().nn
    classes = _classes()
    if isinstance(module, classes["NTKConv"]):
        state["spatial"] = True
        k, stride = module.kernel_size, module.stride
        return [Conv(k=_size(k), stride=_size(stride), padding=module.padding,
                     w_std=module.w_std if w_std is None else w_std,
                     b_std=module.b_std if b_std is None else b_std)]
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if any(d != 1 for d in module.dilation) or module.groups != 1:
            raise SpecError(f"from_torch: {where} ({module}): only dilation 1 and groups 1 "
                            "have a limit here")
        k, stride = module.kernel_size, module.stride
        fan_in = module.in_channels * math.prod(k)
        stated = getattr(module, "limitkernel_std", None)
        sw = w_std if w_std is not None else (
            stated[0] if stated else _rms(module.weight) * math.sqrt(fan_in))
        sb = b_std if b_std is not None else (
            stated[1] if stated else (_rms(module.bias) if module.bias is not None else 0.0))
        state["spatial"] = True
        return [Conv(k=_size(k), stride=_size(stride), padding=_conv_padding(module, where), w_std=sw, b_std=sb,
                     parameterization="standard", width=module.out_channels)]
    if isinstance(module, (nn.AvgPool1d, nn.AvgPool2d)):
        k = _pair(module.kernel_size, module)
        stride = _pair(module.stride, module)
        pad = _pair(module.padding, module)
        if module.ceil_mode:
            raise SpecError(f"from_torch: {where} ({module}): ceil_mode=True has no limit "
                            "here; use ceil_mode=False")
        if all(p == 0 for p in pad):
            padding = "valid"
        elif all(s == 1 for s in stride) and all(2 * p == kk - 1 for p, kk in zip(pad, k)) \
                and module.count_include_pad:
            padding = "same"
        else:
            raise SpecError(
                f"from_torch: {where} ({module}): average pooling with padding {pad} and "
                f"stride {stride} has no limit here; use padding=0, or stride 1 with "
                "padding (k - 1)/2 and count_include_pad=True")
        state["spatial"] = True
        return [AvgPool(k=_size(k), stride=None if stride == k else _size(stride),
                        padding=padding)]
    if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        size = module.output_size
        sizes = size if isinstance(size, tuple) else (size,)
        if any(v != 1 for v in sizes):
            raise SpecError(f"from_torch: {where} ({module}): only output_size=1 (global "
                            "average pooling) has a limit here")
        state["spatial"], state["pooled"] = False, True
        return [GlobalAvgPool()]
    if isinstance(module, nn.Flatten):
        if module.start_dim != 1 or module.end_dim != -1:
            raise SpecError(f"from_torch: {where} ({module}): only Flatten(start_dim=1, "
                            "end_dim=-1) has a limit here")
        if pooled:  # (N, C, 1, 1) to (N, C): part of the global pooling
            return []
        state["spatial"] = False
        return [Flatten()]
    return None


def _size(sizes):
    """One size for all axes when they agree (the spec's k=3), else one per axis."""
    sizes = tuple(int(v) for v in sizes)
    return sizes[0] if len(set(sizes)) == 1 else sizes


def _pair(value, module):
    """A pooling size as a tuple (one entry per spatial axis)."""
    n = 1 if type(module).__name__.endswith("1d") else 2
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * n


def _conv_padding(module, where):
    """The spec padding of a torch convolution, or a SpecError saying why there is none."""
    k, stride, pad, mode = module.kernel_size, module.stride, module.padding, \
        module.padding_mode
    if mode not in ("zeros", "circular"):
        raise SpecError(f"from_torch: {where} ({module}): padding_mode={mode!r} has no limit "
                        "here; use 'zeros' or 'circular'")
    if pad == "valid" or (not isinstance(pad, str) and all(p == 0 for p in pad)):
        return "valid"
    same = pad == "same" or all(2 * p == kk - 1 for p, kk in zip(pad, k))
    if same and all(s == 1 for s in stride):
        return "same" if mode == "zeros" else "circular"
    raise SpecError(
        f"from_torch: {where} ({module}): padding {pad!r} with stride {stride} has no limit "
        "here: the limit pads as Neural Tangents (JAX) does (stride 1 with padding='same' "
        "or (k - 1)/2 per side, or padding=0 at any stride); for a strided 'same' "
        "convolution use limitkernel.torch_interop.NTKConv")


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


def to_torch(spec, d=None, width=None, seed=0, dtype=None, input_shape=None):
    """The finite network of ``spec`` as a torch module, freshly initialised.

    Dense layers in the "ntk" parameterisation become :class:`NTKLinear`; in the
    "standard" one, ``nn.Linear`` with weights N(0, σ_w²/fan_in) and biases
    N(0, σ_b²) (their ``width``, when the spec gives one, overrides ``width``).
    Conv layers become :class:`NTKConv` ("ntk") or ``nn.Conv1d``/``nn.Conv2d``
    ("standard", fan-in taps·channels); avg_pool ``nn.AvgPool1d/2d``,
    global_avg_pool ``nn.AdaptiveAvgPool1d/2d(1)`` then ``nn.Flatten``, flatten
    ``nn.Flatten``. The readout has one output.

    Parameters
    ----------
    spec : str or Serial
    d : int, optional
        Input dimension (vectors).
    width : int
        Width of every hidden dense layer, and output channels of every conv
        layer, without its own ``width``.
    seed : int
        Seed of the initialisation.
    dtype : torch.dtype, optional
        Defaults to torch's default dtype.
    input_shape : tuple of int, optional
        For a convolutional spec: the shape of one input in limitkernel's layout,
        (H, W, C) or (L, C), channels last. The torch model takes them
        channels first, (N, C, H, W) or (N, C, L) (``np.moveaxis(x, -1, 1)``).
    """
    torch = _torch()
    gen = torch.Generator().manual_seed(int(seed))
    layers = list(as_spec(spec))
    if input_shape is None and d is None:
        raise ValueError("give d (the input dimension) or input_shape (channels last) ")
    if width is None:
        raise ValueError("give width, the width of the hidden layers")
    shape = None
    if input_shape is not None:
        input_shape = tuple(int(v) for v in input_shape)
        if len(input_shape) not in (1, 2, 3):
            raise ValueError(f"input_shape must be (d,), (L, C) or (H, W, C), got "
                             f"{input_shape}")
        d = input_shape[-1]
        shape = None if len(input_shape) == 1 else (
            (1, input_shape[0]) if len(input_shape) == 2 else input_shape[:2])
    state = {"shape": shape, "dims": 1 if shape is not None and len(input_shape) == 2 else 2}
    modules, _ = _build(layers, int(d), int(width), gen, top=True, state=state)
    model = torch.nn.Sequential(*modules)
    return model.to(dtype) if dtype is not None else model


def _build(layers, n_in, width, gen, top=False, final=None, state=None):
    torch = _torch()
    nn = torch.nn
    classes = _classes()
    state = {"shape": None, "dims": 2} if state is None else state
    out = []
    for pos, layer in enumerate(layers):
        last = pos == len(layers) - 1
        where = f"to_torch: layer {pos + 1} ({layer})"
        if isinstance(layer, (Conv, AvgPool, GlobalAvgPool, Flatten)):
            if state["shape"] is None:
                raise SpecError(f"{where} needs images or sequences: give "
                                "input_shape=(H, W, C) or (L, C)")
            n_in = _build_spatial(layer, n_in, width, gen, final, state, where, out)
            continue
        if isinstance(layer, (Dense, LayerNorm)) and state["shape"] is not None:
            raise SpecError(f"{where}: a torch Linear or LayerNorm acts on the last axis, "
                            "which in a channels-first convolutional stack is a position "
                            "axis, not the channels; put the layer after the flatten or "
                            "global_avg_pool")
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
            branch, _ = _build(list(layer.branches[0]), n_in, width, gen, final=n_in,
                               state=state)
            out.append(classes["Residual"](*branch, alpha=layer.alpha, beta=layer.beta))
        elif isinstance(layer, _ParallelSpec):
            start = dict(state)
            branches = []
            for b in layer.branches:
                state.update(start)
                branches.append(nn.Sequential(*_build(list(b), n_in, width, gen,
                                                      final=width, state=state)[0]))
            out.append(classes["Parallel"](*branches))
            n_in = width
        elif isinstance(layer, _ConcatSpec):
            k = len(layer.branches)
            widths = [max(1, round(width * k * f)) for f in layer.fractions()]
            start = dict(state)
            built = []
            for b, w in zip(layer.branches, widths):
                state.update(start)
                built.append(_build(list(b), n_in, width, gen, final=w, state=state))
            out.append(classes["Concat"](*[nn.Sequential(*m) for m, _ in built]))
            n_in = sum(n for _, n in built)
        elif isinstance(layer, LayerNorm):
            out.append(nn.LayerNorm(n_in, eps=layer.eps, elementwise_affine=False))
        elif isinstance(layer, Dropout):
            out.append(nn.Dropout(layer.p))
        else:
            out.append(_torch_activation(layer))
    return out, n_in


def _build_spatial(layer, n_in, width, gen, final, state, where, out):
    """Append the torch modules of a conv, pooling or flatten layer; returns the width
    (channels, or features after a flatten)."""
    torch = _torch()
    nn = torch.nn
    shape, one = state["shape"], state["dims"] == 1
    if isinstance(layer, GlobalAvgPool):
        out += [nn.AdaptiveAvgPool1d(1) if one else nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        state["shape"] = None
        return n_in
    if isinstance(layer, Flatten):
        out.append(nn.Flatten())
        state["shape"] = None
        return n_in * shape[0] * shape[1]
    k = layer._sizes("k", one, where)
    state["shape"] = _spatial_out(layer, shape, one, where)
    if state["shape"] is None:
        raise SpecError(f"{where}: the window is larger than its input {shape}")
    if isinstance(layer, AvgPool):
        stride = k if layer.stride is None else layer._sizes("stride", one, where)
        pad = (0, 0)
        if layer.padding == "same":
            if any(s != 1 for s in stride) or any(kk % 2 == 0 for kk in k):
                raise SpecError(f"{where}: torch's AvgPool pads symmetrically, which is "
                                "padding=same only with stride 1 and odd k")
            pad = tuple((kk - 1) // 2 for kk in k)
        if one:
            out.append(nn.AvgPool1d(k[1], stride[1], pad[1], count_include_pad=True))
        else:
            out.append(nn.AvgPool2d(k, stride, pad, count_include_pad=True))
        return n_in
    stride = layer._sizes("stride", one, where)
    n_out = int(layer.width or final or width)
    ks, ss = (k[1:], stride[1:]) if one else (k, stride)
    if layer.parameterization == "ntk":
        out.append(_classes()["NTKConv"](n_in, n_out, ks, ss, layer.padding, layer.w_std,
                                         layer.b_std, generator=gen))
        return n_out
    if any(s != 1 for s in stride) and layer.padding != "valid":
        raise SpecError(f"{where}: torch's Conv pads symmetrically, which with a stride above "
                        "1 is not padding=same or circular (JAX's rule); use "
                        "parameterization=ntk (NTKConv pads as JAX does) or padding=valid")
    cls = nn.Conv1d if one else nn.Conv2d
    conv = cls(n_in, n_out, ks, ss, padding="valid" if layer.padding == "valid" else "same",
               padding_mode="circular" if layer.padding == "circular" else "zeros")
    fan_in = n_in * math.prod(ks)
    with torch.no_grad():
        conv.weight.normal_(0.0, layer.w_std / math.sqrt(fan_in), generator=gen)
        conv.bias.normal_(0.0, layer.b_std, generator=gen)
    conv.limitkernel_std = (layer.w_std, layer.b_std)
    out.append(conv)
    return n_out


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


def empirical_ntk_torch(model, x1, x2=None, batch_size=64, channels_last=False):
    """Empirical NTK Σ_p ∂f(x)/∂p · ∂f(x')/∂p of a torch module, with torch.func.

    Parameters
    ----------
    model : torch.nn.Module
        Maps a batch (n, d) — or (n, C, L), (n, C, H, W) for a convolutional
        model — to outputs (n, k) (or (n,)).
    x1 : (n1, ...) array_like or torch.Tensor
        Inputs in the model's layout, or channels last with ``channels_last``.
    x2 : (n2, ...) array_like or torch.Tensor, optional
        ``None`` means x1 with itself.
    batch_size : int
        Inputs per Jacobian: memory is about batch_size × (number of
        parameters) × k numbers.
    channels_last : bool
        The inputs are images (n, H, W, C) or sequences (n, L, C) in
        limitkernel's layout; they are moved to torch's (n, C, H, W), (n, C, L).

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
        if t.ndim not in (2, 3, 4):
            raise ValueError(f"{name} must be a 2D array (n_inputs, n_features), or 3D/4D "
                             f"for sequences and images; got shape {tuple(t.shape)}")
        return torch.movedim(t, -1, 1).contiguous() if channels_last and t.ndim > 2 else t

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
