"""Algorithms that work on any operator: Lanczos, estimators, linear solves, metrics, blocks.

Every function accepts a curvops operator, a ``scipy.sparse.linalg.LinearOperator``, a numpy
array, a torch tensor, or anything with ``shape`` and ``matvec``.
"""

from ._as_operator import NonFiniteProductError, NonSymmetricOperatorError
from ._checkpoint import CheckpointError
from .blocks import assign_blocks, layer_block, layer_index, module_type
from .lanczos import LanczosConfig, LanczosResult, lanczos
from .lanczos_coefficients import LanczosCoefficients, lanczos_coefficients
from .linear_solve import (
    DiagonalPreconditioner,
    LowRankPreconditioner,
    NaturalGradient,
    SolveResult,
    cg,
    minres,
    natural_gradient,
)
from .metrics import condition_number, effective_rank, spectrum_metrics
from .slq import (
    QuadratureRule,
    SpectralDensity,
    log_determinant,
    slq_quadrature,
    spectral_density,
    trace_function,
)
from .trace import (
    DiagonalEstimate,
    TraceEstimate,
    exact_diagonal,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
)

__all__ = [
    "CheckpointError",
    "DiagonalEstimate",
    "DiagonalPreconditioner",
    "LanczosCoefficients",
    "LanczosConfig",
    "LanczosResult",
    "LowRankPreconditioner",
    "NaturalGradient",
    "NonFiniteProductError",
    "NonSymmetricOperatorError",
    "QuadratureRule",
    "SolveResult",
    "SpectralDensity",
    "TraceEstimate",
    "assign_blocks",
    "cg",
    "condition_number",
    "effective_rank",
    "exact_diagonal",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "lanczos_coefficients",
    "layer_block",
    "layer_index",
    "log_determinant",
    "minres",
    "module_type",
    "natural_gradient",
    "slq_quadrature",
    "spectral_density",
    "spectrum_metrics",
    "trace_function",
]
