"""Inputs, torch-native curvature operators and their array views (the lowest layer).

* Inputs and objectives: parameter selection (:mod:`.params`), losses (:mod:`.losses`),
  objectives and data sources (:mod:`.objective`, :mod:`.data`), HuggingFace models
  (:mod:`.hf`; transformers itself is imported only when a model is wrapped).
* Views: the scipy and cupy ``LinearOperator`` views (:mod:`.scipy_view`,
  :mod:`.cupy_view`, both built on :mod:`.array_view`; cupy is imported only when used).
* Operators over the flattened, concatenated parameters: the base class and its algebra
  (:mod:`.base`), Hessian/GGN/Fisher (:mod:`.curvature`), the Gram operator
  (:mod:`.gram`), per-example gradients (:mod:`.per_example`).
* The operators by name (:mod:`.registry`): canonical names, short names, aliases.
* Micro-batch memory planning (:mod:`.memory`), on the measuring primitives of
  :mod:`.memory_probe` (peak memory, bytes saved for backward, bytes held); reuse of freed
  host memory across products (:mod:`.host_allocator`).
* Shared pieces: the number checks (:mod:`.checks`), the dtype table (:mod:`.dtypes`), the
  set-up of operators built from a model, a loss and data (:mod:`.empirical_risk`).

Nothing here imports :mod:`curvops.solvers`, :mod:`curvops.adapters` or anything above.
"""

from .array_view import view_dtype
from .base import IdentityOperator, LinearOperatorBase, ScaledOperator, SumOperator
from .cupy_view import to_cupy
from .curvature import (
    CurvatureOperator,
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
)
from .data import shard_batches
from .distributed import RankFailedError, RanksDisagreeError
from .gram import GramOperator
from .hf import LanguageModelObjective, attention_product_context, hf_objective, is_hf_model
from .host_allocator import reuse_freed_memory
from .losses import LossKind, TorchLoss
from .memory import MicroBatchPlan, plan_micro_batches
from .objective import Count, Objective, Rows, TorchObjective
from .params import ParameterSpace, select_parameters
from .per_example import GradientChunk, per_example_gradient_chunks, per_example_gradients
from .registry import OperatorSpec, make_operator, operator_spec
from .scipy_view import ScipyView, to_scipy

__all__ = [
    "RankFailedError",
    "RanksDisagreeError",
    "shard_batches",
    "Count",
    "CurvatureOperator",
    "EmpiricalFisherOperator",
    "FisherOperator",
    "GGNOperator",
    "GradientChunk",
    "GramOperator",
    "HessianOperator",
    "IdentityOperator",
    "LanguageModelObjective",
    "LinearOperatorBase",
    "LossKind",
    "MicroBatchPlan",
    "Objective",
    "OperatorSpec",
    "ParameterSpace",
    "Rows",
    "ScaledOperator",
    "ScipyView",
    "SumOperator",
    "TorchLoss",
    "TorchObjective",
    "attention_product_context",
    "hf_objective",
    "is_hf_model",
    "make_operator",
    "operator_spec",
    "per_example_gradient_chunks",
    "per_example_gradients",
    "plan_micro_batches",
    "reuse_freed_memory",
    "select_parameters",
    "to_cupy",
    "to_scipy",
    "view_dtype",
]
