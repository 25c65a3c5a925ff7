r"""The bare Lanczos recurrence: tridiagonal coefficients from given start vectors.

The building block of Gauss quadrature and stochastic Lanczos quadrature (slq.py):
no stopping test, no restart, no filtering of ghosts. Every start vector runs as one column
of a block, so each step is one batched product.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from curvops.linops.checks import check_int

from ._as_operator import as_operator, check_vector, non_finite_product, with_parameters_fixed

__all__ = ["COEFFICIENT_REORTH", "LanczosCoefficients", "lanczos_coefficients"]

COEFFICIENT_REORTH = ("full", "none")


@dataclass(frozen=True)
class LanczosCoefficients:
    r"""The tridiagonals of an m-step Lanczos run from each of P start vectors.

    Attributes:
        alphas: Per start vector, the diagonal :math:`\alpha_1..\alpha_{m_p}` (float64).
        betas: Per start vector, the off-diagonal :math:`\beta_2..\beta_{m_p}` (length
            :math:`m_p - 1`). :math:`m_p < m` when that start vector's Krylov space became
            invariant (:math:`\beta_{j+1} \le \varepsilon^{3/4}\|T_j\|`, :math:`\varepsilon`
            of the operator's dtype): its tridiagonal is then complete.
        matvecs: Products with the operator (columns of the blocks, active ones only).
    """

    alphas: tuple[np.ndarray, ...]
    betas: tuple[np.ndarray, ...]
    matvecs: int


def _block_cgs2(B: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Classical Gram–Schmidt twice of each column of ``W`` (n, P) against its own basis
    ``B[p]`` (j, n): ``w <- w - B^T (B w)``, all columns in one batched product."""
    Wt = W.T.unsqueeze(2)  # (P, n, 1)
    for _ in range(2):  # "twice is enough" (Giraud et al. 2005)
        Wt = Wt - torch.bmm(B.transpose(1, 2), torch.bmm(B, Wt))
    return Wt.squeeze(2).T


def _column_dots(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    return (X.to(torch.float64) * Y.to(torch.float64)).sum(dim=0)


@with_parameters_fixed
def lanczos_coefficients(
    A: object, start: torch.Tensor, steps: int, *, reorth: str = "full"
) -> LanczosCoefficients:
    r"""The Lanczos tridiagonal :math:`T_m` from given start vectors, without any filtering.

    From each column :math:`q_p = v_p/\|v_p\|` of ``start``, ``steps`` iterations of

    .. math::

        \beta_{j+1} q_{j+1} = A q_j - \alpha_j q_j - \beta_j q_{j-1},\qquad
        \alpha_j = q_j^\top A q_j,

    all columns as one block: every step is one batched product :math:`A Q` with
    :math:`Q` of shape (n, P). This is the building block of Gauss quadrature
    (:math:`q^\top f(A) q \approx e_1^\top f(T_m) e_1`, stochastic Lanczos quadrature).
    Unlike :func:`lanczos` it has no stopping test, no restart after a breakdown, and no
    Cullum–Willoughby filtering: ghosts of converged values stay in :math:`T_m` (for
    quadrature they only split their weight).

    Args:
        A: The symmetric operator (anything :func:`lanczos` accepts).
        start: A start vector (n,) or a block of them (n, P), in the operator's dtype and
            on its device (nothing is cast); none may be zero.
        steps: Iterations m per start vector, 1 <= m <= n.
        reorth: ``"full"`` (classical Gram–Schmidt twice against the start vector's own
            stored basis: P·m vectors of memory) or ``"none"`` (three blocks).

    Returns:
        The coefficients per start vector (a single vector gives tuples of length 1).

    Raises:
        ValueError: Bad shapes, ``steps`` outside [1, n], unknown ``reorth``, a zero or
            non-finite start vector, a start vector on another device;
            :class:`~curvops.solvers.NonFiniteProductError` (a ValueError) for a product
            with NaN/Inf.
        TypeError: ``start`` not a tensor of the operator's dtype.
    """
    op = as_operator(A)
    if reorth not in COEFFICIENT_REORTH:
        raise ValueError(f"reorth must be one of {COEFFICIENT_REORTH}, got {reorth!r}")
    check_vector(start, "start", op.n, dtype=op.dtype, device=op.device, block=True,
                 nonzero=True)
    steps = check_int("steps", steps, minimum=1, maximum=op.n)
    V = start[:, None] if start.ndim == 1 else start
    norms = _column_dots(V, V).sqrt()
    n, P = V.shape
    eps = torch.finfo(op.dtype).eps
    V = V / norms.to(op.dtype)
    V_prev = torch.zeros_like(V)
    beta_prev = torch.zeros(P, dtype=torch.float64, device=op.device)
    # Basis as (P, steps, n): each column's vectors contiguous, for batched Gram–Schmidt.
    basis = (torch.empty(P, steps, n, dtype=op.dtype, device=op.device) if reorth == "full"
             else None)
    alpha = np.zeros((steps, P))
    beta = np.zeros((steps, P))
    length = np.full(P, steps)
    active = np.ones(P, dtype=bool)
    tnorm = np.zeros(P)
    matvecs = 0
    for j in range(steps):
        if basis is not None:
            basis[:, j] = V.T
        W = op.matmat(V)
        matvecs += int(active.sum())
        a = _column_dots(V, W)
        W = W - V * a.to(op.dtype) - V_prev * beta_prev.to(op.dtype)
        if basis is not None:
            W = _block_cgs2(basis[:, : j + 1], W)
        b = _column_dots(W, W).sqrt()
        a_np, b_np = a.cpu().numpy(), b.cpu().numpy()  # one host synchronisation per step
        if not (np.all(np.isfinite(a_np[active])) and np.all(np.isfinite(b_np[active]))):
            raise non_finite_product("lanczos_coefficients", f"at step {j + 1}")
        alpha[j] = np.where(active, a_np, 0.0)
        tnorm = np.maximum(tnorm, np.abs(a_np) + b_np + (beta[j - 1] if j else 0.0))
        if j == steps - 1:
            break
        stop = active & (b_np <= eps**0.75 * np.maximum(tnorm, np.finfo(float).tiny))
        length[stop] = j + 1
        active &= ~stop
        if not active.any():
            break
        beta[j] = np.where(active, b_np, 0.0)
        keep = torch.as_tensor(active, device=op.device)
        b_safe = torch.where(keep, b, torch.ones_like(b))
        V_prev, V = V, torch.where(keep, W / b_safe.to(op.dtype), torch.zeros_like(W))
        beta_prev = torch.where(keep, b, torch.zeros_like(b))
    return LanczosCoefficients(
        tuple(alpha[: length[p], p].copy() for p in range(P)),
        tuple(beta[: length[p] - 1, p].copy() for p in range(P)),
        matvecs,
    )
