r"""Ritz values of the Lanczos tridiagonal, their error bounds, and the Cullum–Willoughby test.

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
    "cullum_willoughby",
    "residual_bounds",
    "select_which",
    "tridiag_eigh",
    "tridiag_eigvals",
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


def _dense(alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    return np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)


def residual_bounds(S_last_row: np.ndarray, beta_next: float) -> np.ndarray:
    r"""Residual norms :math:`\|A y_i - \theta_i y_i\| = \beta_{m+1} |e_m^\top s_i|`."""
    return abs(beta_next) * np.abs(S_last_row)


def convergence_thresholds(theta: np.ndarray, tnorm: float, tol: float) -> np.ndarray:
    r"""The convergence threshold of each Ritz value (DECISIONS.md, ARPACK's floor).

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


def cullum_willoughby(
    alpha: np.ndarray,
    beta: np.ndarray,
    theta: np.ndarray | None = None,
    rel_tol: float | None = None,
    merge_rel_tol: float | None = None,
    genuine: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    r"""Cullum–Willoughby identification test for Lanczos without reorthogonalization.

    Without reorthogonalization, :math:`T_m` has (a) good Ritz values, (b) numerically
    multiple copies ("ghosts") of converged good values, and (c) spurious values.
    Cullum and Willoughby (1985, ch. 4) show that the spurious ones are exactly the
    *simple* eigenvalues of :math:`T_m` that are also eigenvalues of :math:`\hat T_m`
    (:math:`T_m` without its first row and column): their Ritz vector has a negligible
    component along the starting vector. The test:

    1. merge eigenvalues of :math:`T_m` closer than the merge tolerance into one (ghosts);
    2. among the simple ones, drop those within the tolerance of an eigenvalue of
       :math:`\hat T_m`.

    The two tolerances differ when the process is noisier than the arithmetic of
    :math:`T` (a bf16 operator): ghost copies of one eigenvalue then agree only to about
    the process precision :math:`\varepsilon_A\|T\|`, while the spurious test compares two
    float64 eigenvalue computations on the same :math:`T` and stays tight (a tolerance of
    :math:`\varepsilon_A\|T\|` there would drop genuine values whose start-vector
    component is small).

    The T-hat test alone cannot tell a spurious value from a genuine one whose eigenvector
    of :math:`T_m` has a small first component (a weakly represented eigenvalue, or one
    just emerging): :math:`|\theta_i - \hat\theta| \approx |s_{1i}|^2\|T\|`, so a
    genuine value with :math:`|s_{1i}| \sim 10^{-4}` matches :math:`\hat T_m` to
    :math:`10^{-8}\|T\|`. ``genuine`` marks values known to be good by another
    argument: a Ritz value whose residual bound :math:`\beta_{m+1}|e_m^\top s_i|` has
    converged is within that bound of an eigenvalue of :math:`A` (Paige), so it is never
    dropped as spurious.

    Args:
        alpha: Diagonal of :math:`T_m`.
        beta: Off-diagonal of :math:`T_m`.
        theta: Eigenvalues of :math:`T_m` (ascending), if already known.
        rel_tol: Tolerance of the spurious test relative to :math:`\|T_m\|`; default
            :math:`100\, m\, \varepsilon` (float64).
        merge_rel_tol: Tolerance for merging copies, relative to :math:`\|T_m\|`;
            default ``rel_tol``.
        genuine: Optional boolean mask over ``theta``: values that must not be dropped
            as spurious (e.g. those whose residual bound has converged).

    Returns:
        ``(values, representatives, n_spurious)``: the distinct good values (ascending),
        the index into ``theta`` of one copy of each (the copy the Ritz vector is taken
        from), and how many eigenvalues were dropped as spurious (ghost copies not counted).
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    beta = np.asarray(beta, dtype=np.float64)
    m = alpha.size
    if theta is None:
        theta = tridiag_eigvals(alpha, beta)
    if m == 1:
        return theta.copy(), np.zeros(1, dtype=np.int64), 0
    tnorm = float(np.max(np.abs(theta)))
    scale = max(tnorm, np.finfo(float).tiny)
    tol = (100.0 * m * EPS64 if rel_tol is None else rel_tol) * scale
    merge_tol = tol if merge_rel_tol is None else max(merge_rel_tol * scale, tol)
    theta_hat = tridiag_eigvals(alpha[1:], beta[1:])

    # Group numerically multiple copies (theta is ascending).
    starts = np.flatnonzero(np.concatenate([[True], np.diff(theta) > merge_tol]))
    ends = np.concatenate([starts[1:], [m]])
    values, reps, n_spurious = [], [], 0
    for s, e in zip(starts, ends):
        if e - s == 1:
            pos = np.searchsorted(theta_hat, theta[s])
            near = [
                abs(theta_hat[i] - theta[s]) for i in (pos - 1, pos) if 0 <= i < theta_hat.size
            ]
            if near and min(near) <= tol and not (genuine is not None and genuine[s]):
                n_spurious += 1
                continue
        values.append(theta[s:e].mean())
        reps.append(s)
    return np.asarray(values), np.asarray(reps, dtype=np.int64), n_spurious
