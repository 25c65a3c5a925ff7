"""Front doors: from a model and its data to a result.

The seed API (:func:`compute_fisher_eigenvalues_lanczos`,
:func:`compute_hessian_eigenvalues_lanczos`, :func:`compute_spectrum`,
:func:`compute_spectrum_comparison`) builds the operator for a torch or HuggingFace model
and runs Lanczos on it; :class:`FisherSpectral` runs the Gram-trick spectral analysis of the
empirical Fisher. Both sit above :mod:`curvops.linops` and :mod:`curvops.solvers` and below
:mod:`curvops.validation` and the command line.
"""

from .fisher_spectral import FisherSpectral, SpectralConfig, stable_int_hash
from .seed_api import (
    compute_fisher_eigenvalues_lanczos,
    compute_hessian_eigenvalues_lanczos,
    compute_spectrum,
    compute_spectrum_comparison,
)

__all__ = [
    "FisherSpectral",
    "SpectralConfig",
    "compute_fisher_eigenvalues_lanczos",
    "compute_hessian_eigenvalues_lanczos",
    "compute_spectrum",
    "compute_spectrum_comparison",
    "stable_int_hash",
]
