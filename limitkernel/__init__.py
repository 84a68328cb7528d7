"""limitkernel: exact infinite-width NNGP and NTK kernels of fully-connected networks."""

from .activations import REGISTRY as ACTIVATIONS
from .activations import Numerical, get_activation
from .gram import Kernel, MemoryBudgetError, kernel, kernel_diag
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
from .spec import Dense, Serial, SpecError, mlp, parse, serial

__all__ = [
    "ACTIVATIONS",
    "CrossEntropyFlow",
    "Dense",
    "GradientFlowEnsemble",
    "Kernel",
    "KernelReport",
    "MemoryBudgetError",
    "NNGPRegressor",
    "NTKClassifier",
    "NTKRegressor",
    "NotPositiveDefiniteError",
    "Numerical",
    "Prediction",
    "Serial",
    "SpecError",
    "check_kernel",
    "cross_entropy_flow",
    "get_activation",
    "kernel",
    "kernel_diag",
    "mlp",
    "nngp_posterior",
    "parse",
    "predict_ensemble",
    "serial",
]

__version__ = "0.1.0"

_LAZY = ("NTKRegressor", "NNGPRegressor", "NTKClassifier")


def __getattr__(name):
    # The scikit-learn estimators are built on first use, so that importing
    # limitkernel does not import scikit-learn.
    if name in _LAZY:
        from . import predict

        return getattr(predict, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
