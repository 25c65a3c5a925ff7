r"""Damped linear solves :math:`(A + \lambda I)\,x = b` with Krylov methods, in torch.

* :func:`cg`: preconditioned conjugate gradients (Hestenes & Stiefel 1952) for
  :math:`A + \lambda I` symmetric positive definite. Each step costs one product; the
  error in the :math:`(A+\lambda I)`-norm falls at least like
  :math:`2\big((\sqrt\kappa - 1)/(\sqrt\kappa + 1)\big)^k`, :math:`\kappa` the condition number
  of the preconditioned operator.
* :func:`minres`: preconditioned MINRES (Paige & Saunders 1975) for symmetric
  *indefinite* :math:`A + \lambda I` (a Hessian away from a minimum); it minimises the
  residual norm over the Krylov space. This is scipy's algorithm, on torch vectors.
* Preconditioners :math:`M^{-1} \approx (A + \lambda I)^{-1}`, symmetric positive definite:
  :class:`DiagonalPreconditioner` (Jacobi: :math:`M^{-1} = \operatorname{diag}(d + \lambda)^{-1}`)
  and :class:`LowRankPreconditioner` from k eigenpairs :math:`(\lambda_i, u_i)` (Lanczos):

  .. math::

      M^{-1} = U (\Lambda + \lambda I)^{-1} U^\top + \frac{1}{\lambda_k + \lambda}
               (I - U U^\top),

  :math:`\lambda_k` the smallest of the k values. On the span of U the preconditioned
  operator is the identity; on the rest, its eigenvalues are
  :math:`(\lambda_j + \lambda)/(\lambda_k + \lambda) \le 1`, so the condition number drops
  from :math:`(\lambda_1 + \lambda)/(\lambda_n + \lambda)` to
  :math:`(\lambda_k + \lambda)/(\lambda_n + \lambda)` when the pairs are exact.
* :func:`natural_gradient`: :math:`(F + \lambda I)^{-1} g` for a gradient in parameter shape.

Vectors stay in the operator's dtype on its device; every scalar of the recurrences is
float64. ``maxiter`` caps the iterations (scipy's name). A product that returns NaN/Inf
raises :class:`~curvops.solvers.NonFiniteProductError`. Stopping:
:math:`\|r_k\| \le \max(\text{tol}\,\|b\|, \text{atol})` on the
recursively updated residual (CG: 2-norm; MINRES: the :math:`M^{-1}`-norm, the 2-norm
without a preconditioner). ``final_residual_norm`` is the true :math:`\|b - (A+\lambda
I)x\|_2`, from one extra product.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from curvops.linops.checks import check_int, check_real
from torch import Tensor

from ._as_operator import (
    TorchOperator,
    as_operator,
    check_vector,
    non_finite_product,
    with_parameters_fixed,
)
from .lanczos import LanczosConfig, lanczos

__all__ = [
    "DiagonalPreconditioner",
    "LowRankPreconditioner",
    "NaturalGradient",
    "SolveResult",
    "cg",
    "minres",
    "natural_gradient",
]

Preconditioner = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class SolveResult:
    r"""The outcome of a damped solve :math:`(A + \lambda I) x = b`.

    Attributes:
        x: The solution (operator's dtype and device).
        iterations: Krylov iterations run.
        converged: Whether the recursive residual met the tolerance.
        residual_norms: Recursive residual norm after each iteration (index 0: initial),
            float64; see the module docstring for the norm.
        final_residual_norm: True :math:`\|b - (A+\lambda I)x\|_2`.
        b_norm: :math:`\|b\|_2`.
        matvecs: Products with ``A`` (the final check included).
        method: ``"cg"`` or ``"minres"``.
        damping: :math:`\lambda`.
    """

    x: Tensor
    iterations: int
    converged: bool
    residual_norms: np.ndarray
    final_residual_norm: float
    b_norm: float
    matvecs: int
    method: str
    damping: float

    @property
    def relative_residual(self) -> float:
        """``final_residual_norm / b_norm`` (the residual itself when b = 0)."""
        if self.b_norm > 0:
            return self.final_residual_norm / self.b_norm
        return self.final_residual_norm


# --------------------------------------------------------------------------------------
# Preconditioners
# --------------------------------------------------------------------------------------


class DiagonalPreconditioner:
    r"""Jacobi preconditioner :math:`M^{-1} r = r \oslash (d + \lambda)`.

    Args:
        diagonal: The diagonal :math:`d` of ``A`` (exact or estimated, e.g. from
            :func:`~curvops.solvers.trace.exact_diagonal` or ``hutchinson_diagonal``).
        damping: :math:`\lambda` of the system being solved.

    Raises:
        ValueError: If some :math:`d_i + \lambda \le 0` or is not finite (the preconditioner
            must be positive definite).
    """

    def __init__(self, diagonal: Tensor, damping: float = 0.0) -> None:
        if not isinstance(diagonal, Tensor) or diagonal.dim() != 1:
            raise TypeError("diagonal must be a 1-D torch tensor")
        shifted = diagonal.to(torch.float64) + float(damping)
        if not bool(torch.isfinite(shifted).all()):
            raise ValueError("diagonal + damping has NaN/Inf entries")
        smallest = float(shifted.min())
        if smallest <= 0:
            raise ValueError(
                f"diagonal + damping must be positive for a positive definite preconditioner; "
                f"its smallest entry is {smallest:.3e} (increase damping)"
            )
        self.inverse = 1.0 / shifted
        self.damping = float(damping)

    def __call__(self, r: Tensor) -> Tensor:
        return (r.to(torch.float64) * self.inverse.to(r.device)).to(r.dtype)


class LowRankPreconditioner:
    r"""Spectral preconditioner from k eigenpairs of ``A``.

    .. math::

        M^{-1} r = U (\Lambda + \lambda I)^{-1} U^\top r
                   + \frac{1}{\lambda_k + \lambda}\,(r - U U^\top r)

    Args:
        eigenvalues: The k eigenvalues :math:`\Lambda` (any order; typically the largest).
        eigenvectors: (n, k) orthonormal eigenvectors :math:`U` (columns).
        damping: :math:`\lambda` of the system being solved.

    Raises:
        ValueError: If shapes differ, U is not orthonormal (to 1e-4), or some
            :math:`\lambda_i + \lambda \le 0`.
    """

    def __init__(
        self, eigenvalues: Sequence[float] | np.ndarray | Tensor, eigenvectors: Tensor,
        damping: float = 0.0,
    ) -> None:
        if isinstance(eigenvalues, Tensor):  # maybe on a GPU: scalars live on the host
            lam = eigenvalues.detach().to(device="cpu", dtype=torch.float64)
        else:
            lam = torch.as_tensor(np.asarray(eigenvalues, dtype=np.float64))
        if not isinstance(eigenvectors, Tensor) or eigenvectors.dim() != 2:
            raise TypeError("eigenvectors must be an (n, k) torch tensor")
        if lam.dim() != 1 or lam.numel() != eigenvectors.shape[1] or lam.numel() == 0:
            raise ValueError(
                f"got {lam.numel()} eigenvalues for {eigenvectors.shape[1]} eigenvectors"
            )
        shifted = lam + float(damping)
        if not bool(torch.isfinite(shifted).all()) or float(shifted.min()) <= 0:
            raise ValueError(
                "eigenvalues + damping must be positive and finite; the smallest is "
                f"{float(shifted.min()):.3e} (use the largest eigenpairs of a PSD operator, "
                "or increase damping)"
            )
        U64 = eigenvectors.to(torch.float64)
        gram_error = float(
            (U64.T @ U64 - torch.eye(U64.shape[1], dtype=torch.float64, device=U64.device))
            .abs()
            .max()
        )
        if gram_error > 1e-4:
            raise ValueError(
                f"eigenvectors are not orthonormal (max |UᵀU - I| = {gram_error:.2e}); "
                "the preconditioner would not be positive definite"
            )
        self.U = eigenvectors
        self.eigenvalues = lam.numpy()
        self.damping = float(damping)
        self._inv_top = (1.0 / shifted).to(eigenvectors.device)
        self._inv_rest = 1.0 / float(shifted.min())
        self.lanczos_matvecs = 0  # set by from_lanczos

    @classmethod
    def from_lanczos(
        cls, A: object, k: int, *, damping: float = 0.0, config: LanczosConfig | None = None
    ) -> LowRankPreconditioner:
        """Build it from the top ``k`` Lanczos eigenpairs of ``A``.

        Args:
            A: The (PSD) operator.
            k: Number of eigenpairs.
            damping: :math:`\\lambda` of the system being solved.
            config: A :class:`~curvops.solvers.lanczos.LanczosConfig`; default
                ``which="LA"``, full reorthogonalization, ``tol=1e-6`` (a preconditioner
                needs no more). ``k`` always wins, and eigenvectors are always returned.

        Returns:
            The preconditioner; ``lanczos_matvecs`` records what Lanczos spent.
        """
        if config is None:
            config = LanczosConfig(which="LA", tol=1e-6, reorth="full")
        result = lanczos(A, k, config=config, return_eigenvectors=True)
        if result.eigenvectors is None:  # pragma: no cover - return_eigenvectors is forced
            raise ValueError("Lanczos returned no eigenvectors")
        out = cls(result.eigenvalues, result.eigenvectors, damping)
        out.lanczos_matvecs = int(result.matvecs)
        return out

    def __call__(self, r: Tensor) -> Tensor:
        U = self.U.to(r.dtype)
        c = U.T @ r
        top = U @ (c.to(torch.float64) * self._inv_top).to(r.dtype)
        return top + (r - U @ c) * self._inv_rest


# --------------------------------------------------------------------------------------
# Shared checks
# --------------------------------------------------------------------------------------


def _check_rhs(op: TorchOperator, b: object, name: str = "b") -> Tensor:
    return check_vector(b, name, op.n, dtype=op.dtype, device=op.device)


def _check_settings(
    op: TorchOperator,
    damping: object,
    tol: object,
    atol: object,
    maxiter: object,
    preconditioner: object,
) -> tuple[float, float, float, int]:
    """Every setting of a solve, checked before any product: ``(damping, tol, atol,
    maxiter)`` with ``maxiter`` defaulting to 10 n."""
    damping = check_real("damping", damping)
    tol = check_real("tol", tol, minimum=0)
    atol = check_real("atol", atol, minimum=0)
    checked = check_int("maxiter", maxiter, minimum=1, allow_none=True)
    if tol == 0 and atol == 0 and checked is None:
        raise ValueError("tol = atol = 0 needs an explicit maxiter")
    if preconditioner is not None and not callable(preconditioner):
        raise TypeError(f"preconditioner must be callable, got {type(preconditioner).__name__}")
    return damping, tol, atol, 10 * op.n if checked is None else checked


def _finite(value: float, solver: str, where: str) -> float:
    """``value`` (a scalar of a product), or the one non-finite-product error."""
    if not math.isfinite(value):
        raise non_finite_product(solver, where)
    return value


def _dot(x: Tensor, y: Tensor) -> float:
    return float(torch.dot(x.to(torch.float64), y.to(torch.float64)))


def _norm(x: Tensor) -> float:
    return float(torch.linalg.vector_norm(x.to(torch.float64)))


def _damped(op: TorchOperator, damping: float) -> Callable[[Tensor], Tensor]:
    if damping == 0.0:
        return op.apply
    return lambda v: op.apply(v) + damping * v


def _initial(op: TorchOperator, x0: Tensor | None, b: Tensor) -> Tensor:
    return torch.zeros_like(b) if x0 is None else _check_rhs(op, x0, "x0").clone()


# --------------------------------------------------------------------------------------
# Conjugate gradients
# --------------------------------------------------------------------------------------


@with_parameters_fixed
def cg(
    A: object,
    b: Tensor,
    *,
    damping: float = 0.0,
    preconditioner: Preconditioner | None = None,
    tol: float = 1e-6,
    atol: float = 0.0,
    maxiter: int | None = None,
    x0: Tensor | None = None,
) -> SolveResult:
    r"""Solve :math:`(A + \lambda I) x = b` by preconditioned conjugate gradients.

    Args:
        A: Symmetric operator with :math:`A + \lambda I` positive definite (curvops operator,
            scipy ``LinearOperator``, numpy/torch matrix).
        b: Right-hand side, 1-D, in the operator's dtype and on its device.
        damping: :math:`\lambda`.
        preconditioner: :math:`M^{-1}`, a callable on vectors (symmetric positive definite),
            e.g. :class:`DiagonalPreconditioner` or :class:`LowRankPreconditioner`.
        tol: Relative tolerance on :math:`\|r\|_2 / \|b\|_2`.
        atol: Absolute tolerance on :math:`\|r\|_2`.
        maxiter: Iteration cap (default 10 n).
        x0: Start vector (default zero).

    Returns:
        The solution and its history.

    Raises:
        ValueError: If a search direction has :math:`p^\top (A + \lambda I) p \le 0` (not
            positive definite: use :func:`minres` or more damping), or
            :math:`r^\top M^{-1} r \le 0` (preconditioner not positive definite), or a bad
            argument (checked before any product).
        NonFiniteProductError: A product returned NaN/Inf (a ValueError).
        TypeError: Arguments of the wrong type.
    """
    op = as_operator(A)
    b = _check_rhs(op, b)
    damping, tol, atol, maxiter = _check_settings(op, damping, tol, atol, maxiter,
                                                  preconditioner)
    apply = _damped(op, damping)
    precond = preconditioner if preconditioner is not None else (lambda r: r)

    x = _initial(op, x0, b)
    b_norm = _norm(b)
    matvecs = 0
    if x0 is None:
        r = b.clone()
    else:
        r = b - apply(x)
        matvecs += 1
    threshold = max(tol * b_norm, atol)
    history = [_finite(_norm(r), "cg", "in the product with x0")]
    converged = history[0] <= threshold
    iterations = 0
    if not converged:
        z = precond(r)
        rz = _dot(r, z)
        if not rz > 0:
            raise ValueError(f"the preconditioner is not positive definite (rᵀM⁻¹r = {rz:.3e})")
        p = z
        for iterations in range(1, maxiter + 1):
            q = apply(p)
            matvecs += 1
            pq = _finite(_dot(p, q), "cg", f"at iteration {iterations}")
            if not pq > 0:
                raise ValueError(
                    f"A + damping*I is not positive definite: pᵀ(A + λI)p = {pq:.3e} at "
                    f"iteration {iterations}; use minres for indefinite operators or increase "
                    "damping"
                )
            step = rz / pq
            x = x + step * p
            r = r - step * q
            history.append(_norm(r))
            if history[-1] <= threshold:
                converged = True
                break
            z = precond(r)
            rz_new = _dot(r, z)
            if not rz_new > 0:
                raise ValueError(
                    f"the preconditioner is not positive definite (rᵀM⁻¹r = {rz_new:.3e})"
                )
            p = z + (rz_new / rz) * p
            rz = rz_new
    final = _finite(_norm(b - apply(x)), "cg", "in the final residual's product")
    matvecs += 1
    return SolveResult(
        x, iterations, converged, np.asarray(history), final, b_norm, matvecs, "cg", damping
    )


# --------------------------------------------------------------------------------------
# MINRES
# --------------------------------------------------------------------------------------


@with_parameters_fixed
def minres(
    A: object,
    b: Tensor,
    *,
    damping: float = 0.0,
    preconditioner: Preconditioner | None = None,
    tol: float = 1e-6,
    atol: float = 0.0,
    maxiter: int | None = None,
    x0: Tensor | None = None,
) -> SolveResult:
    r"""Solve :math:`(A + \lambda I) x = b` by preconditioned MINRES (symmetric, maybe indefinite).

    The Lanczos process on :math:`M^{-1}(A+\lambda I)` in the :math:`M`-inner product, with
    Givens rotations on its tridiagonal (Paige & Saunders 1975; the recurrence of
    ``scipy.sparse.linalg.minres``). The recursive residual estimate
    :math:`\bar\phi_k = \|r_k\|_{M^{-1}}` is monotone.

    Args:
        A: Symmetric operator (curvops operator, scipy ``LinearOperator``, numpy/torch
            matrix); :math:`A + \lambda I` may be indefinite but should be nonsingular.
        b: Right-hand side, 1-D, in the operator's dtype and on its device.
        damping: :math:`\lambda`.
        preconditioner: :math:`M^{-1}`, symmetric positive definite.
        tol: Relative tolerance on :math:`\bar\phi_k / \bar\phi_0`.
        atol: Absolute tolerance on :math:`\bar\phi_k`.
        maxiter: Iteration cap (default 10 n).
        x0: Start vector (default zero).

    Returns:
        The solution and its history.

    Raises:
        ValueError: If the preconditioner is not positive definite, or a bad argument
            (checked before any product).
        NonFiniteProductError: A product returned NaN/Inf (a ValueError).
        TypeError: Arguments of the wrong type.
    """
    op = as_operator(A)
    b = _check_rhs(op, b)
    damping, tol, atol, maxiter = _check_settings(op, damping, tol, atol, maxiter,
                                                  preconditioner)
    apply = _damped(op, damping)
    precond = preconditioner if preconditioner is not None else (lambda r: r)
    eps = float(np.finfo(np.float64).eps)

    x = _initial(op, x0, b)
    b_norm = _norm(b)
    matvecs = 0
    if x0 is None:
        r1 = b.clone()
    else:
        r1 = b - apply(x)
        matvecs += 1
        _finite(_norm(r1), "minres", "in the product with x0")
    y = precond(r1)
    beta1 = _dot(r1, y)
    if beta1 < 0:
        raise ValueError(f"the preconditioner is not positive definite (rᵀM⁻¹r = {beta1:.3e})")
    beta1 = math.sqrt(beta1)
    history = [beta1]
    threshold = max(tol * beta1, atol)
    converged = beta1 <= threshold
    iterations = 0
    if not converged:
        old_beta, beta = 0.0, beta1
        dbar = epsln = 0.0
        phibar = beta1
        cs, sn = -1.0, 0.0
        w = torch.zeros_like(b)
        w2 = torch.zeros_like(b)
        r2 = r1
        for iterations in range(1, maxiter + 1):
            v = y / beta
            y = apply(v)
            matvecs += 1
            if iterations >= 2:
                y = y - (beta / old_beta) * r1
            alpha = _finite(_dot(v, y), "minres", f"at iteration {iterations}")
            y = y - (alpha / beta) * r2
            r1, r2 = r2, y
            y = precond(r2)
            old_beta = beta
            beta_sq = _dot(r2, y)
            if beta_sq < 0:
                raise ValueError(
                    f"the preconditioner is not positive definite (rᵀM⁻¹r = {beta_sq:.3e})"
                )
            beta = math.sqrt(beta_sq)
            # Apply the previous rotation, then compute and apply the next one.
            old_eps = epsln
            delta = cs * dbar + sn * alpha
            gbar = sn * dbar - cs * alpha
            epsln = sn * beta
            dbar = -cs * beta
            gamma = max(math.hypot(gbar, beta), eps)
            cs, sn = gbar / gamma, beta / gamma
            phi = cs * phibar
            phibar = sn * phibar
            w1, w2 = w2, w
            w = (v - old_eps * w1 - delta * w2) / gamma
            x = x + phi * w
            history.append(phibar)
            if phibar <= threshold:
                converged = True
                break
            if beta <= eps * beta1:  # invariant Krylov space: x is the minimiser already
                break
    final = _finite(_norm(b - apply(x)), "minres", "in the final residual's product")
    matvecs += 1
    return SolveResult(
        x, iterations, converged, np.asarray(history), final, b_norm, matvecs, "minres", damping
    )


# --------------------------------------------------------------------------------------
# Natural gradient
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NaturalGradient:
    r"""The natural-gradient direction :math:`(F + \lambda I)^{-1} g`.

    Attributes:
        direction: In parameter shape: a list in the operator's parameter order, or a dict
            keyed by parameter name when the gradient was given as one.
        solve: The underlying :class:`SolveResult` (flat ``x``).
    """

    direction: list[Tensor] | dict[str, Tensor]
    solve: SolveResult


def natural_gradient(
    F: Any,
    gradient: Sequence[Tensor] | Mapping[str, Tensor] | None = None,
    *,
    damping: float,
    method: str = "cg",
    preconditioner: Preconditioner | None = None,
    tol: float = 1e-6,
    maxiter: int | None = None,
) -> NaturalGradient:
    r"""Solve :math:`(F + \lambda I)\,x = g` for a gradient :math:`g` in parameter shape.

    Args:
        F: A curvops operator (Fisher, GGN, EF, ...) with ``flatten``/``unflatten``.
        gradient: Per-parameter tensors in ``F``'s parameter order, a dict keyed by
            ``F.param_names``, or ``None`` to use the ``.grad`` of ``F.params``.
        damping: :math:`\lambda` (required: the curvature of a network is usually singular).
        method: ``"cg"`` (PSD ``F``) or ``"minres"``.
        preconditioner: Optional :math:`M^{-1}` (built with the same damping).
        tol: Relative residual tolerance.
        maxiter: Iteration cap (default 10 n).

    Returns:
        The direction in parameter shape and the solve's record.

    Raises:
        TypeError: If ``F`` is not a curvops operator or a gradient has the wrong dtype.
        ValueError: Missing ``.grad``, wrong names or shapes, unknown method.
    """
    if isinstance(F, Tensor) or not all(
        hasattr(F, attr) for attr in ("param_names", "params", "flatten", "unflatten")
    ):
        raise TypeError(
            "natural_gradient needs a curvops operator (param_names, params, flatten, "
            f"unflatten); got {type(F).__name__}"
        )
    if method not in ("cg", "minres"):
        raise ValueError(f"method must be 'cg' or 'minres', got {method!r}")
    maxiter = check_int("maxiter", maxiter, minimum=1, allow_none=True)
    names = tuple(F.param_names)
    as_dict = isinstance(gradient, Mapping)
    if gradient is None:
        grads = []
        for name, p in zip(names, F.params):
            if p.grad is None:
                raise ValueError(f"parameter {name!r} has no .grad; call backward() first")
            grads.append(p.grad)
    elif as_dict:
        missing = set(names) - set(gradient)
        extra = set(gradient) - set(names)
        if missing or extra:
            raise ValueError(
                f"gradient keys differ from the operator's parameters: missing "
                f"{sorted(missing)}, unexpected {sorted(extra)}"
            )
        grads = [gradient[name] for name in names]
    else:
        grads = list(gradient)
        if len(grads) != len(names):
            raise ValueError(f"expected {len(names)} gradient tensors, got {len(grads)}")
    dtypes = getattr(getattr(F, "space", None), "dtypes", None)
    for i, (name, g) in enumerate(zip(names, grads)):
        if not isinstance(g, Tensor):
            raise TypeError(f"gradient for {name!r} must be a torch.Tensor")
        if dtypes is not None and g.dtype != dtypes[i]:
            raise TypeError(
                f"gradient for {name!r} has dtype {g.dtype}, its parameter {dtypes[i]}"
            )
    g_flat = F.flatten([g.detach() for g in grads])
    solver = cg if method == "cg" else minres
    result = solver(
        F, g_flat, damping=damping, preconditioner=preconditioner, tol=tol, maxiter=maxiter
    )
    blocks = F.unflatten(result.x)
    direction = dict(zip(names, blocks)) if as_dict else list(blocks)
    return NaturalGradient(direction, result)
