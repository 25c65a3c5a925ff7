"""Algorithms that work on any operator: Lanczos, estimators, solves, Gram analysis, the seed API.

Every function accepts a curvops operator, a ``scipy.sparse.linalg.LinearOperator``, a numpy
array, a torch tensor, or anything with ``shape`` and ``matvec``.
"""

from .blocks import assign_blocks, layer_block, layer_index, module_type
from .fisher_spectral import FisherSpectral, SpectralConfig, stable_int_hash
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
from .seed_api import (
    compute_fisher_eigenvalues_lanczos,
    compute_hessian_eigenvalues_lanczos,
    compute_spectrum,
    compute_spectrum_comparison,
)
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
    "DiagonalEstimate",
    "DiagonalPreconditioner",
    "FisherSpectral",
    "LanczosCoefficients",
    "LanczosConfig",
    "LanczosResult",
    "LowRankPreconditioner",
    "NaturalGradient",
    "QuadratureRule",
    "SolveResult",
    "SpectralConfig",
    "SpectralDensity",
    "TraceEstimate",
    "assign_blocks",
    "cg",
    "compute_fisher_eigenvalues_lanczos",
    "compute_hessian_eigenvalues_lanczos",
    "compute_spectrum",
    "compute_spectrum_comparison",
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
    "stable_int_hash",
    "trace_function",
]
