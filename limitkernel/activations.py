"""Every activation, by name: the public face of the activation layer kinds.

The activations themselves live with their kernels in
:mod:`limitkernel.layers.activations` (closed forms) and
:mod:`limitkernel.layers.numerical` (Hermite series); the parser's registry is
:data:`limitkernel.spec.REGISTRY`. ``REGISTRY`` here is its activations only.
"""

from .layers.activations import *  # noqa: F401,F403
from .layers.activations import Activation, get_activation
from .layers.numerical import *  # noqa: F401,F403
from .layers.numerical import Numerical, SeriesTruncationWarning, hermite_coefficients
from .spec import REGISTRY as _LAYERS

__all__ = ["REGISTRY", "Activation", "Numerical", "SeriesTruncationWarning",
           "get_activation", "hermite_coefficients"]

REGISTRY = {name: cls for name, cls in _LAYERS.items() if issubclass(cls, Activation)}
