"""Layer kinds: one module per kind, holding everything that kind is.

=================  ==========================================================
module             layer kinds
=================  ==========================================================
``dense``          ``dense`` (hidden layers and the readout)
``activations``    every activation in closed form (ReLU family, step, sign,
                   erf, GELU, sin/cos/rbf, gaussian, exp)
``numerical``      activations by Hermite series (tanh, softplus, silu, elu,
                   softsign, any Python function)
``normalization``  ``layernorm``, ``dropout``
``blocks``         ``residual``, ``parallel``, ``concat`` and their stash ops
``conv``           ``conv``, ``avg_pool``, ``global_avg_pool``, ``flatten``
=================  ==========================================================

A layer kind is a class deriving from :class:`limitkernel.spec.Layer` (its spec
name and named parameters) and :class:`limitkernel._program.OpKind`, which
lists the rest of the protocol: ``lower`` (its ops and the checks of the
Gaussian and independence rules), ``diag_update`` (every input with itself),
``code``/``row_params`` with a numba row kernel beside the class (dispatched by
:mod:`limitkernel._fused`), and ``finite_*`` (the finite network's forward and
backward). Importing this package registers every kind with the spec parser.
"""

from ..spec import Serial, SpecError
from . import activations, blocks, conv, dense, normalization, numerical
from .activations import Activation, get_activation
from .blocks import Concat, Parallel, Residual
from .conv import AvgPool, Conv, Flatten, GlobalAvgPool
from .dense import Dense
from .normalization import Dropout, LayerNorm
from .numerical import Numerical, SeriesTruncationWarning, hermite_coefficients

__all__ = [
    "Activation",
    "AvgPool",
    "Conv",
    "Flatten",
    "GlobalAvgPool",
    "Concat",
    "Dense",
    "Dropout",
    "LayerNorm",
    "Numerical",
    "Parallel",
    "Residual",
    "SeriesTruncationWarning",
    "activations",
    "blocks",
    "conv",
    "dense",
    "get_activation",
    "hermite_coefficients",
    "mlp",
    "normalization",
    "numerical",
]


def mlp(depth, activation="relu", w_std=1.0, b_std=0.0, parameterization="ntk",
        width=None):
    """The common MLP: ``depth`` hidden [dense, activation] pairs and a dense readout.

    ``activation`` is a name (``"relu"``, ``"erf"``...) or an activation layer.
    """
    if int(depth) != depth or depth < 0:
        raise SpecError(f"mlp: depth must be a non-negative integer, got {depth!r}")
    act = get_activation(activation) if isinstance(activation, str) else activation

    def hidden_dense():
        return Dense(w_std, b_std, parameterization, width)

    hidden = [layer for _ in range(int(depth)) for layer in (hidden_dense(), act)]
    return Serial(hidden + [Dense(w_std, b_std, parameterization, None)])
