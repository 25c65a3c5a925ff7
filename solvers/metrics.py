r"""Metrics of a computed (partial) spectrum.

All metrics are computed on the eigenvalues actually computed, and say so:

* spectral gap :math:`\lambda_1 - \lambda_2` and range :math:`\lambda_1 - \lambda_k` of the
  values sorted in descending order;
* for PSD operators, the condition number :math:`\lambda_{\max} / \lambda_{\min}` over the
  values above :math:`\varepsilon \lambda_{\max}` (smaller ones are numerically zero), and
  the effective rank :math:`\exp(H(p))`, :math:`p = \lambda / \sum \lambda` (over the
  values above that threshold);
* for indefinite spectra both use :math:`|\lambda|` and ``note`` says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from curvops.linops.checks import check_real


def _check_eps(eps: float) -> float:
    """``eps``, a relative threshold in ``[0, 1)``."""
    return check_real("eps", eps, minimum=0, below=1)


def _nonnegative(values: np.ndarray | Sequence[float], eps: float) -> np.ndarray:
    """``values`` as float64, refusing NaN/Inf and negatives beyond round-off (``eps · max|λ|``)."""
    values = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError("eigenvalues contain NaN/Inf")
    if values.size and values.min() < -eps * np.abs(values).max():
        raise ValueError(
            f"negative eigenvalue {values.min():.3e}: condition number and effective rank are "
            "defined here on nonnegative values; pass np.abs(values) for an indefinite "
            "spectrum (spectrum_metrics does, and says so)"
        )
    return values


def _eps_filter(values: np.ndarray, eps: float) -> np.ndarray:
    """The values above ``eps · max`` (the numerically nonzero ones)."""
    if values.size == 0:
        return values
    top = float(values.max())
    if top <= 0.0:
        return values[:0]
    return values[values > eps * top]


def condition_number(values: np.ndarray | Sequence[float], eps: float) -> float:
    """``max / min`` over the (nonnegative) values above ``eps · max``; ``inf`` when none is.

    Raises:
        ValueError: NaN/Inf, negative values beyond round-off, or ``eps`` outside [0, 1).
    """
    eps = _check_eps(eps)
    kept = _eps_filter(_nonnegative(values, eps), eps)
    return float(kept.max() / kept.min()) if kept.size else math.inf


def effective_rank(values: np.ndarray | Sequence[float], eps: float) -> float:
    """``exp`` of the Shannon entropy of ``p = λ / Σλ`` over the values above ``eps · max``.

    Between 1 (one dominant value) and the number of kept values (all equal); 0 when no
    value is kept.

    Raises:
        ValueError: NaN/Inf, negative values beyond round-off, or ``eps`` outside [0, 1).
    """
    eps = _check_eps(eps)
    kept = _eps_filter(_nonnegative(values, eps), eps)
    if kept.size == 0:
        return 0.0
    p = kept / kept.sum()
    return float(math.exp(-(p * np.log(p)).sum()))


def spectrum_metrics(
    eigenvalues: Sequence[float] | np.ndarray,
    *,
    is_psd: bool,
    eps: float | None = None,
    dtype_eps: float = float(np.finfo(np.float64).eps),
) -> dict[str, object]:
    """Metrics of the computed eigenvalues.

    Args:
        eigenvalues: The computed eigenvalues (any order).
        is_psd: Whether the operator is positive semi-definite (GGN, Fisher, EF).
        eps: Relative threshold below which a value counts as zero; default
            ``n_computed · dtype_eps``, but at least ``dtype_eps``.
        dtype_eps: Machine epsilon of the dtype the eigenvalues were computed in.

    Returns:
        ``max_eigenvalue``, ``min_computed_eigenvalue``, ``smallest_eigenvalue`` (same),
        ``spectral_gap``, ``spectral_range``, ``condition_number``, ``effective_rank``,
        ``trace_of_computed``, ``n_computed``, ``n_numerically_zero``, ``eps`` and ``note``.
    """
    lam = np.sort(np.asarray(eigenvalues, dtype=np.float64).ravel())[::-1]
    if not np.all(np.isfinite(lam)):
        raise ValueError("eigenvalues contain NaN/Inf")
    if lam.size == 0:
        nan = float("nan")
        return {
            "max_eigenvalue": nan,
            "min_computed_eigenvalue": nan,
            "smallest_eigenvalue": nan,
            "spectral_gap": nan,
            "spectral_range": nan,
            "condition_number": nan,
            "effective_rank": 0.0,
            "trace_of_computed": 0.0,
            "n_computed": 0,
            "n_numerically_zero": 0,
            "eps": float("nan"),
            "note": "no eigenvalues were computed",
        }
    if eps is None:
        eps = max(lam.size * dtype_eps, dtype_eps)
    eps = _check_eps(eps)
    notes = ["metrics are over the computed eigenvalues only"]
    has_negative = bool((lam < -eps * np.abs(lam).max()).any())
    if is_psd or not has_negative:
        basis = np.clip(lam, 0.0, None) if is_psd else lam
        if is_psd and has_negative:
            notes.append(
                "negative values of a PSD operator (round-off) count as zero here "
                f"(most negative: {lam[-1]:.3e})"
            )
    else:
        basis = np.abs(lam)
        notes.append("the spectrum is indefinite: condition number and effective rank use |λ|")
    kept = _eps_filter(basis, eps)
    return {
        "max_eigenvalue": float(lam[0]),
        "min_computed_eigenvalue": float(lam[-1]),
        "smallest_eigenvalue": float(lam[-1]),
        "spectral_gap": float(lam[0] - lam[1]) if lam.size > 1 else float("nan"),
        "spectral_range": float(lam[0] - lam[-1]),
        "condition_number": condition_number(basis, eps),
        "effective_rank": effective_rank(basis, eps),
        "trace_of_computed": float(lam.sum()),
        "n_computed": int(lam.size),
        "n_numerically_zero": int(basis.size - kept.size),
        "eps": float(eps),
        "note": "; ".join(notes),
    }
