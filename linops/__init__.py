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
from .losses import LossKind, TorchLoss
from .objective import Count, Objective, Rows, TorchObjective
from .params import ParameterSpace, select_parameters

__all__ = [
    "Count",
    "CurvatureOperator",
    "EmpiricalFisherOperator",
    "FisherOperator",
    "GGNOperator",
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
    "select_parameters",
]
