"""limitkernel: exact infinite-width NNGP and NTK kernels of fully-connected networks."""

from .activations import REGISTRY as ACTIVATIONS
from .activations import Numerical, get_activation
from .gram import Kernel, MemoryBudgetError, kernel, kernel_diag
from .spec import Dense, Serial, SpecError, mlp, parse, serial

__all__ = [
    "ACTIVATIONS",
    "Dense",
    "Kernel",
    "MemoryBudgetError",
    "Numerical",
    "Serial",
    "SpecError",
    "get_activation",
    "kernel",
    "kernel_diag",
    "mlp",
    "parse",
    "serial",
]

__version__ = "0.1.0"
