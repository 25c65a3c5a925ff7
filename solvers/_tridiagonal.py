r"""Ritz values of the Lanczos tridiagonal and their error bounds.

Everything here is float64 numpy on the host: the tridiagonal

.. math::

    T_m = \begin{pmatrix} \alpha_1 & \beta_2 & & \\ \beta_2 & \alpha_2 & \ddots & \\
          & \ddots & \ddots & \beta_m \\ & & \beta_m & \alpha_m \end{pmatrix}

is tiny (m is tens to hundreds) and its eigen-decomposition
:math:`T_m = S \Theta S^\top` is done by LAPACK through
``scipy.linalg.eigh_tridiagonal``. The Lanczos relation
:math:`A V_m = V_m T_m + \beta_{m+1} v_{m+1} e_m^\top` gives every Ritz pair
:math:`(\theta_i, V_m s_i)` the residual norm :math:`\beta_{m+1} |e_m^\top s_i|`
without touching a vector of length n.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg

__all__ = [
    "EPS64",
    "convergence_thresholds",
    "residual_bounds",
    "select_which",
    "tridiag_eigh",
    "tridiag_eigvals",
    "wanted_ritz",
]

EPS64 = float(np.finfo(np.float64).eps)
WHICH = ("LA", "SA", "LM", "BE")


def tridiag_eigvals(alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Eigenvalues of the symmetric tridiagonal (diag ``alpha``, off-diag ``beta``), ascending."""
    alpha = np.asarray(alpha, dtype=np.float64)
    if alpha.size == 0:
        return np.zeros(0)
    if alpha.size == 1:
        return alpha.copy()
    try:
        return scipy.linalg.eigh_tridiagonal(alpha, beta, eigvals_only=True)
    except (np.linalg.LinAlgError, ValueError):  # pragma: no cover - LAPACK failure is rare
        return np.linalg.eigvalsh(_dense(alpha, beta))


def tridiag_eigh(
    alpha: np.ndarray, beta: np.ndarray, index_range: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of the symmetric tridiagonal, ascending.

    Args:
        alpha: Diagonal, length m.
        beta: Off-diagonal, length m - 1.
        index_range: Optional inclusive range ``(lo, hi)`` of ascending indices to compute
            (cheaper than all pairs when m is large and only the ends are wanted).

    Returns:
        ``(theta, S)``: eigenvalues and the (m, p) matrix of eigenvectors.
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    beta = np.asarray(beta, dtype=np.float64)
    m = alpha.size
    if m == 1:
        return alpha.copy(), np.ones((1, 1))
    try:
        if index_range is None:
            return scipy.linalg.eigh_tridiagonal(alpha, beta)
        try:
            # MRRR on the range: O(m p) work (bisection and inverse iteration cost more).
            return scipy.linalg.eigh_tridiagonal(
                alpha, beta, select="i", select_range=index_range, lapack_driver="stemr"
            )
        except (np.linalg.LinAlgError, ValueError):  # pragma: no cover - MRRR declined
            return scipy.linalg.eigh_tridiagonal(
                alpha, beta, select="i", select_range=index_range
            )
    except (np.linalg.LinAlgError, ValueError):  # pragma: no cover - LAPACK failure is rare
        warnings.warn("eigh_tridiagonal failed; falling back to dense eigh", stacklevel=2)
        theta, S = np.linalg.eigh(_dense(alpha, beta))
        if index_range is not None:
            lo, hi = index_range
            theta, S = theta[lo : hi + 1], S[:, lo : hi + 1]
        return theta, S


def wanted_ritz(
    alpha: np.ndarray, beta: np.ndarray, k: int, which: str
) -> tuple[np.ndarray, np.ndarray, float]:
    r"""The Ritz pairs a convergence test reads, without all :math:`m` eigenvectors.

    The ``k`` values ``which`` selects are among the ``k`` smallest and the ``k`` largest
    eigenvalues of :math:`T_m` ("LA": the top ``k``; "SA": the bottom ``k``; "LM" and
    "BE": some of the top and the rest of the bottom ones), and :math:`\|T_m\|` is
    :math:`\max(|\theta_{\min}|, |\theta_{\max}|)`. So only those end ranges need
    eigenvectors (MRRR on an index range: :math:`O(km)` instead of the :math:`O(m^2)` of
    all pairs), plus one end eigenvalue by bisection where its range is not computed.
    ``select_which(theta, k, which)`` on the returned values picks the same values as on
    the whole spectrum.

    Args:
        alpha: Diagonal, length m.
        beta: Off-diagonal, length m - 1.
        k: Number of wanted values; needs ``2k <= m`` (disjoint end ranges).
        which: "LA", "SA", "LM" or "BE".

    Returns:
        ``(theta, S, tnorm)``: the end-range eigenvalues (ascending), their eigenvectors
        (columns), and :math:`\|T_m\|`.
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    beta = np.asarray(beta, dtype=np.float64)
    m = alpha.size
    if not 2 * k <= m:
        raise ValueError(f"wanted_ritz needs 2k <= m (k={k}, m={m})")
    thetas, vecs, ends = [], [], []
    for lo, hi, wanted in ((0, k - 1, which in ("SA", "LM", "BE")),
                           (m - k, m - 1, which in ("LA", "LM", "BE"))):
        if wanted:
            th, S = tridiag_eigh(alpha, beta, (lo, hi))
            thetas.append(th)
            vecs.append(S)
            ends.append(th[0] if lo == 0 else th[-1])
        else:  # only the end eigenvalue, for the norm
            end = lo if lo == 0 else hi
            ends.append(float(scipy.linalg.eigh_tridiagonal(
                alpha, beta, eigvals_only=True, select="i", select_range=(end, end))[0]))
    theta = np.concatenate(thetas)
    S = np.concatenate(vecs, axis=1)
    return theta, S, float(max(abs(ends[0]), abs(ends[1])))


def _dense(alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    return np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)


def residual_bounds(S_last_row: np.ndarray, beta_next: float) -> np.ndarray:
    r"""Residual norms :math:`\|A y_i - \theta_i y_i\| = \beta_{m+1} |e_m^\top s_i|`."""
    return abs(beta_next) * np.abs(S_last_row)


def convergence_thresholds(theta: np.ndarray, tnorm: float, tol: float) -> np.ndarray:
    r"""The convergence threshold of each Ritz value (ARPACK's floor; see docs/decisions.md).

    A Ritz value has converged when its residual bound is at most
    :math:`\text{tol}\cdot\max(|\theta|, \varepsilon^{2/3}\|T\|)`, :math:`\varepsilon` of float64.
    """
    return tol * np.maximum(np.abs(theta), EPS64 ** (2.0 / 3.0) * tnorm)


def select_which(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices of the ``k`` wanted values of ``theta`` (ascending input), in output order.

    LA: largest algebraic, descending. SA: smallest algebraic, ascending. LM: largest
    magnitude, by descending magnitude. BE: scipy's split, ceil(k/2) from the top and
    floor(k/2) from the bottom, returned in descending algebraic order.
    """
    m = theta.size
    k = min(k, m)
    order = np.argsort(theta, kind="stable")
    if which == "LA":
        return order[::-1][:k]
    if which == "SA":
        return order[:k]
    if which == "LM":
        return np.argsort(-np.abs(theta), kind="stable")[:k]
    if which == "BE":
        top, bottom = k - k // 2, k // 2
        chosen = np.concatenate([order[m - top :], order[:bottom]]) if bottom else order[m - top :]
        return chosen[np.argsort(-theta[chosen], kind="stable")]
    raise ValueError(f"unknown which={which!r}; expected one of {WHICH}")
