"""Torch-native curvature operators over the flattened, concatenated parameters."""

from .algebra import IdentityOperator, ScaledOperator, SumOperator
from .base import LinearOperatorBase
from .curvature import (
    CurvatureOperator,
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
)
from .gram import GramOperator
from .losses import LossKind, TorchLoss
from .objective import Count, Objective, Rows, TorchObjective
from .params import ParameterSpace, select_parameters
from .per_example import GradientChunk, per_example_gradient_chunks, per_example_gradients

__all__ = [
    "Count",
    "CurvatureOperator",
    "EmpiricalFisherOperator",
    "FisherOperator",
    "GGNOperator",
    "GradientChunk",
    "GramOperator",
    "HessianOperator",
    "IdentityOperator",
    "LinearOperatorBase",
    "LossKind",
    "Objective",
    "ParameterSpace",
    "Rows",
    "ScaledOperator",
    "SumOperator",
    "TorchLoss",
    "TorchObjective",
    "per_example_gradient_chunks",
    "per_example_gradients",
    "select_parameters",
]
