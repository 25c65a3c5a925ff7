r"""Verification of Ritz pairs against their true residuals.

A Ritz value is reported converged only when the pair it comes with passes a check that
does not trust the recurrence: its residual :math:`\rho_i = \|A y_i - \theta_i y_i\| /
\|y_i\|`, measured with products of the operator itself. For a symmetric :math:`A`,
:math:`\min_\lambda |\theta_i - \lambda| \le \rho_i^{\text{true}}`, so a passing value lies
within its residual (plus the noise of the measuring product) of an eigenvalue of
:math:`A`, however the Lanczos vectors lost orthogonality or the products erred. Copies of
one eigenvector (ghosts) pass the residual test, so the Ritz vectors are also checked for
being distinct: two pairs with :math:`|\hat y_i^\top \hat y_j| > 1/2` are one eigenvector.

Where the Lanczos relation :math:`A V = V C + w e_m^\top + F` is known (the recorded
coefficients :math:`C` of every step, :math:`F` the products' errors), the prediction
:math:`P = V C s + w s_m` of :math:`A y` tells the operator's noise
:math:`\|A y - P\| = \|F s + f(y)\|` apart from a genuine residual: the noise is allowed
for, and measured (the full-norm relative accuracy of a product).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ._tridiagonal import EPS64

__all__ = ["Verification", "verify_ritz_pairs"]

#: Two unit Ritz vectors with a larger overlap are copies of one eigenvector.
DUPLICATE_OVERLAP = 0.5

#: A residual within this many times the largest measured noise (besides its own) is
#: noise: the floor the operator's accuracy puts under ``tol``.
NOISE_FLOOR = 3.0


@dataclass
class Verification:
    """What the check found.

    Attributes:
        converged: Per pair, whether it passed (and its bound had converged).
        residuals: :math:`\\rho_i`, the measured true residual norms.
        noise: Full-norm relative accuracy of the products, :math:`\\max_i\\|A y_i -
            P_i\\| / (\\|T\\|\\|y_i\\|)`; NaN where no prediction was given.
        notes: Why a pair failed.
    """

    converged: np.ndarray
    residuals: np.ndarray
    noise: float
    notes: list[str] = field(default_factory=list)


def _row_norms(X: torch.Tensor) -> np.ndarray:
    return torch.linalg.vector_norm(X.double(), dim=1).cpu().numpy()


def verify_ritz_pairs(
    Y: torch.Tensor,
    AY: torch.Tensor,
    theta: np.ndarray,
    bound_converged: np.ndarray,
    tnorm: float,
    tol: float,
    eps_a: float,
    predicted: torch.Tensor | None = None,
) -> Verification:
    r"""Check Ritz pairs :math:`(\theta_i, y_i)` against :math:`A y_i`.

    Args:
        Y: Ritz vectors as rows, (p, n), not necessarily unit.
        AY: The operator's products of those rows (same scaling), (p, n).
        theta: The Ritz values, length p.
        bound_converged: Whether each value's residual bound met ``tol``.
        tnorm: :math:`\|T\|`, the scale of the spectrum.
        tol: The convergence tolerance in force.
        eps_a: The process precision (slack for the arithmetic of forming the residual).
        predicted: The Lanczos relation's prediction of ``AY`` (p, n), or None.

    Returns:
        A :class:`Verification`. A pair passes when its bound converged, its residual is
        at most :math:`\text{tol}\max(|\theta_i|, \varepsilon^{2/3}\|T\|)` plus its measured
        noise, three times the largest measured noise and :math:`10\,\varepsilon_A\|T\|`,
        and it is no copy of a better-ranked pair.
    """
    p = theta.size
    if p == 0:
        return Verification(np.zeros(0, dtype=bool), np.zeros(0), float("nan"))
    ynorm = _row_norms(Y)
    th = torch.as_tensor(theta, dtype=Y.dtype, device=Y.device)[:, None]
    rho = _row_norms(AY.to(Y.dtype) - th * Y) / np.maximum(ynorm, np.finfo(float).tiny)
    noise_abs = np.zeros(p)
    noise = float("nan")
    if predicted is not None:
        # The noise of A y_i; divided by ||y_i|| but never by less than 1/2, so a Ritz
        # vector that lost its norm (orthogonality lost) cannot inflate the allowance.
        noise_abs = _row_norms(AY.to(Y.dtype) - predicted.to(Y.dtype)) / np.maximum(ynorm, 0.5)
        noise = float(np.max(noise_abs)) / max(tnorm, np.finfo(float).tiny)
    scale = np.maximum(np.abs(theta), EPS64 ** (2.0 / 3.0) * tnorm)
    # The residual of a perfect pair is the noise of its own product: what was asked
    # below that floor (a few times the measured noise) is what the noise allows.
    thr = tol * scale + noise_abs + NOISE_FLOOR * float(np.max(noise_abs)) + 10.0 * eps_a * tnorm
    conv = np.asarray(bound_converged, dtype=bool) & (rho <= thr)
    notes = []
    for i in np.flatnonzero(np.asarray(bound_converged, dtype=bool) & ~conv):
        notes.append(
            f"value {theta[i]:.10g} failed verification: true residual {rho[i]:.3g} > "
            f"{thr[i]:.3g} (its bound had converged); reported not converged"
        )
    Yn = Y / torch.as_tensor(np.maximum(ynorm, np.finfo(float).tiny), dtype=Y.dtype,
                             device=Y.device)[:, None]
    G = (Yn.double() @ Yn.double().T).cpu().numpy()
    for j in range(1, p):
        for i in range(j):
            if abs(G[i, j]) > DUPLICATE_OVERLAP and conv[j]:
                conv[j] = False
                notes.append(
                    f"value {theta[j]:.10g} is a copy of {theta[i]:.10g} (Ritz vectors overlap "
                    f"{abs(G[i, j]):.2f}): a ghost, reported not converged"
                )
                break
    return Verification(conv, rho, noise, notes)
