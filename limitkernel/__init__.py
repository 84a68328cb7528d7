"""limitkernel: exact infinite-width NNGP and NTK kernels of fully-connected networks."""

from ._version import __version__  # noqa: F401
from .activations import REGISTRY as ACTIVATIONS
from .layers import (
    AvgPool,
    Concat,
    Conv,
    Dense,
    Dropout,
    Flatten,
    GlobalAvgPool,
    LayerNorm,
    Numerical,
    Parallel,
    Residual,
    get_activation,
    mlp,
)
from .distributed import CGSolution, StoreError, kernel_to_store, open_store, solve_cg
from .distributed import status as store_status
from .experiments import (
    Comparison,
    InitSweep,
    compare,
    jacot_demo,
    ntk_distance_at_init,
)
from .finite import FiniteNetwork, TrainingHistory
from .gram import MemoryBudgetError, PrecisionWarning, kernel, kernel_diag
from .predict import (
    CrossEntropyFlow,
    GradientFlowEnsemble,
    KernelReport,
    NotPositiveDefiniteError,
    Prediction,
    check_kernel,
    cross_entropy_flow,
    nngp_posterior,
    predict_ensemble,
)
from .spec import Serial, SpecError, parse, serial
from .torch_interop import empirical_ntk_torch, from_torch, to_torch

__all__ = [
    "ACTIVATIONS",
    "AvgPool",
    "CGSolution",
    "Comparison",
    "Concat",
    "Conv",
    "CrossEntropyFlow",
    "Dense",
    "Dropout",
    "FiniteNetwork",
    "Flatten",
    "GlobalAvgPool",
    "GradientFlowEnsemble",
    "InitSweep",
    "Kernel",
    "KernelReport",
    "LayerNorm",
    "MemoryBudgetError",
    "NNGPRegressor",
    "NTKClassifier",
    "NTKRegressor",
    "NotPositiveDefiniteError",
    "Numerical",
    "Parallel",
    "PrecisionWarning",
    "Prediction",
    "Residual",
    "Serial",
    "SpecError",
    "StoreError",
    "TrainingHistory",
    "check_kernel",
    "compare",
    "cross_entropy_flow",
    "empirical_ntk_torch",
    "from_torch",
    "get_activation",
    "jacot_demo",
    "kernel",
    "kernel_diag",
    "kernel_to_store",
    "mlp",
    "nngp_posterior",
    "ntk_distance_at_init",
    "open_store",
    "parse",
    "predict_ensemble",
    "serial",
    "solve_cg",
    "store_status",
    "to_torch",
]


_LAZY = ("NTKRegressor", "NNGPRegressor", "NTKClassifier")


def __getattr__(name):
    # The scikit-learn estimators and kernel are built on first use, so that
    # importing limitkernel does not import scikit-learn.
    if name in _LAZY:
        from . import predict

        return getattr(predict, name)
    if name == "Kernel":
        from . import sklearn_kernel

        return sklearn_kernel.Kernel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
