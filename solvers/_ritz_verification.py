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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ._reductions import dot, row_norms, vector_norm
from ._reductions import gram as gram_matrix
from ._tridiagonal import EPS64

__all__ = ["Verification", "verify_ritz_pairs", "verify_ritz_pairs_one_by_one"]

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


def _row_norms(X: torch.Tensor) -> torch.Tensor:
    r"""Row norms as float64, reduced in ``X``'s own dtype block by block
    (:func:`~._reductions.row_norms`): no float64 copy of ``X`` (a (p, n) temporary that
    costs more than the rest of the check together), and no float32 accumulation over the
    whole row (off by 1.5e-2 relative at n = 1.24e8 on the CPU).
    """
    return row_norms(X)


def verify_ritz_pairs(
    Y: torch.Tensor,
    AY: torch.Tensor,
    theta: np.ndarray,
    bound_converged: np.ndarray,
    tnorm: float,
    tol: float,
    eps_a: float,
    predicted: torch.Tensor | None = None,
    scale: np.ndarray | None = None,
    scratch: torch.Tensor | None = None,
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
        scale: When the rows of ``Y``, ``AY`` and ``predicted`` are the Ritz vectors
            divided by ``scale`` (length p; e.g. scaled to unit length for the product),
            the noise is measured on the vectors themselves; None: the rows are the
            vectors. The residuals and the duplicate test do not depend on it.
        scratch: A (p, n) tensor of ``Y``'s dtype and device the check may overwrite
            (it may be ``predicted``, or ``AY`` when it is not needed afterwards); None
            allocates one.

    Returns:
        A :class:`Verification`. A pair passes when its bound converged, its residual is
        at most :math:`\text{tol}\max(|\theta_i|, \varepsilon^{2/3}\|T\|)` plus its measured
        noise, three times the largest measured noise and :math:`10\,\varepsilon_A\|T\|`,
        and it is no copy of a better-ranked pair.
    """
    p = theta.size
    if p == 0:
        return Verification(np.zeros(0, dtype=bool), np.zeros(0), float("nan"))
    # Every n-long quantity is reduced on the device; one host transfer brings the row
    # norms, the residual norms, the noise norms and the Gram matrix of the Ritz vectors.
    ynorm, noise_norm, rho_abs, G = _measure(Y, AY, theta, predicted, scratch, gram=True)
    return _decide(theta, bound_converged, tnorm, tol, eps_a, ynorm, rho_abs,
                   noise_norm, G, scale)


def verify_ritz_pairs_one_by_one(
    rows: Sequence[torch.Tensor],
    product: Callable[[torch.Tensor], torch.Tensor],
    predict: Callable[[int, int, int], torch.Tensor] | None,
    theta: np.ndarray,
    bound_converged: np.ndarray,
    tnorm: float,
    tol: float,
    eps_a: float,
    slice_cols: int = 1 << 16,
) -> Verification:
    r""":func:`verify_ritz_pairs` with one product alive at a time and nothing else n-long.

    For a basis as large as memory allows (a thick restart's): the Ritz vectors are the
    basis's own rows; each pair's product is formed, and the norms of the pair, of its
    noise :math:`A y - P` and of its residual :math:`A y - \theta y` are summed column
    slice by column slice (the prediction made slice by slice too), so the check adds one
    vector, the product, to the basis. The decision is the same function's.

    Args:
        rows: The Ritz vectors, (n,) each (e.g. views of basis rows; not changed).
        product: ``y -> A y`` (counts as one product with the operator).
        predict: ``(i, c0, c1) -> P_i[c0:c1]``, the Lanczos relation's prediction of
            ``A rows[i]`` on one column slice, as a fresh tensor the check may overwrite;
            None measures no noise.
        theta: The Ritz values, length p.
        bound_converged: Whether each value's residual bound met ``tol``.
        tnorm: :math:`\|T\|`, the scale of the spectrum.
        tol: The convergence tolerance in force.
        eps_a: The process precision.
        slice_cols: Columns per slice.

    Returns:
        A :class:`Verification`, decided as by :func:`verify_ritz_pairs`.
    """
    p = theta.size
    if p == 0:
        return Verification(np.zeros(0, dtype=bool), np.zeros(0), float("nan"))
    sums = []
    for i, y in enumerate(rows):
        Ay = product(y).to(y.dtype)
        acc = torch.zeros(3, dtype=torch.float64, device=y.device)
        for c0 in range(0, y.numel(), slice_cols):
            c1 = min(y.numel(), c0 + slice_cols)
            ys, As = y[c0:c1], Ay[c0:c1]
            acc[0] += vector_norm(ys).square()
            if predict is not None:
                acc[1] += vector_norm(predict(i, c0, c1).sub_(As)).square()
            acc[2] += vector_norm(As - float(theta[i]) * ys).square()
        sums.append(acc)
        del Ay, As  # the last slice is a view: it would keep Ay alive through the next product
    host = torch.stack(sums).sqrt().cpu().numpy()
    ynorm, noise_norm, rho_abs = host[:, 0], host[:, 1], host[:, 2]
    # The Gram matrix of the Ritz vectors, for the duplicate test (p^2 / 2 dot products).
    G = np.diag(ynorm**2)
    for j in range(p):
        for i in range(j):
            G[i, j] = G[j, i] = float(dot(rows[i], rows[j]))
    return _decide(theta, bound_converged, tnorm, tol, eps_a, ynorm, rho_abs,
                   noise_norm if predict is not None else None, G, None)


def _measure(Y, AY, theta, predicted, scratch, gram: bool):
    """Row norms of Y, of AY - predicted (None without a prediction), of AY - theta Y, and
    the Gram matrix of Y (None unless ``gram``), in one host transfer."""
    p = theta.size
    AYw = AY.to(Y.dtype)
    th = torch.as_tensor(theta, dtype=Y.dtype, device=Y.device)[:, None]
    # Fresh (p, n) temporaries cost page faults on the CPU: one scratch block at most,
    # reused for AY - predicted and then for the residuals AY - theta Y.
    buf = torch.empty_like(Y) if scratch is None else scratch
    parts = [_row_norms(Y)]
    if predicted is not None:
        parts.append(_row_norms(torch.sub(AYw, predicted.to(Y.dtype), out=buf)))
    parts.append(_row_norms(torch.addcmul(AYw, th, Y, value=-1.0, out=buf)))
    if gram:
        # Duplicate test only (threshold 1/2): the Gram matrix in the vectors' own dtype
        # is ample, and the rows are scaled to unit length on the host.
        parts.append(gram_matrix(Y).reshape(-1))
    host = torch.cat(parts).cpu().numpy()
    ynorm = host[:p]
    noise_norm = host[p : 2 * p] if predicted is not None else None
    start = 2 * p if predicted is not None else p
    rho_abs = host[start : start + p]
    G = host[start + p :].reshape(p, p) if gram else None
    return ynorm, noise_norm, rho_abs, G


def _decide(theta, bound_converged, tnorm, tol, eps_a, ynorm, rho_abs, noise_norm, G,
            scale) -> Verification:
    """The verdict on each pair from its measured norms (see :func:`verify_ritz_pairs`)."""
    p = theta.size
    rho = rho_abs / np.maximum(ynorm, np.finfo(float).tiny)
    noise_abs = np.zeros(p)
    noise = float("nan")
    if noise_norm is not None:
        s = np.ones(p) if scale is None else np.asarray(scale, dtype=np.float64)
        # The noise of A y_i; divided by ||y_i|| but never by less than 1/2, so a Ritz
        # vector that lost its norm (orthogonality lost) cannot inflate the allowance.
        noise_abs = noise_norm * s / np.maximum(ynorm * s, 0.5)
        noise = float(np.max(noise_abs)) / max(tnorm, np.finfo(float).tiny)
    yscale = np.maximum(ynorm, np.finfo(float).tiny)
    G = G / np.outer(yscale, yscale)
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
