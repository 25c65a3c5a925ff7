r"""Stochastic trace and diagonal estimators, with standard errors.

For a symmetric :math:`A \in \mathbb{R}^{n\times n}` and random probes :math:`v` with
:math:`\mathbb{E}[v v^\top] = I`:

* **Hutchinson** (1989): :math:`\operatorname{tr} A = \mathbb{E}[v^\top A v]`; the estimate is
  the mean of :math:`v_p^\top A v_p` over :math:`P` probes and its standard error the sample
  standard deviation over :math:`\sqrt P`. Rademacher probes have variance
  :math:`2(\|A\|_F^2 - \sum_i A_{ii}^2)`, Gaussian ones :math:`2\|A\|_F^2`.
* **Hutch++** (Meyer, Musco, Musco & Woodruff 2021): with a budget of :math:`3k`
  products, sketch :math:`Q = \operatorname{orth}(A S)` from :math:`k` probes :math:`S`,
  take the top part exactly, :math:`\operatorname{tr}(Q^\top A Q)`, and Hutchinson on the
  deflated rest, :math:`\tfrac1k \operatorname{tr}(G^\top (I-QQ^\top) A (I-QQ^\top) G)`.
  The error falls as :math:`O(1/\text{matvecs})` instead of :math:`O(1/\sqrt{\text{matvecs}})`
  when the spectrum decays. The standard error is the one of the Hutchinson part
  (the exact part is deterministic given :math:`Q`).
* **Diagonal** (Bekas, Kokiopoulou & Saad 2007): :math:`\operatorname{diag} A =
  \mathbb{E}[v \odot A v]`, entry by entry, with a standard error per entry; and the
  exact diagonal :math:`A_{ii} = e_i^\top A e_i` from products with blocks of unit vectors
  (:math:`n` products: for small operators and for checking).

Probes are drawn in float64 on the CPU from ``torch.Generator().manual_seed(seed)``, so
one seed gives the same probes on every device and in every dtype, then cast to the
operator's dtype and moved to its device. Products run in the operator's dtype; every
scalar and every accumulation is float64. A product that returns NaN/Inf raises
:class:`~curvops.solvers.NonFiniteProductError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from curvops.linops.checks import check_int
from torch import Tensor

from ._as_operator import as_operator, non_finite_product, with_parameters_fixed

__all__ = [
    "DiagonalEstimate",
    "TraceEstimate",
    "exact_diagonal",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hutchpp_trace",
    "rademacher_or_gaussian_probes",
]

PROBES = ("rademacher", "gaussian")


@dataclass(frozen=True)
class TraceEstimate:
    """A stochastic estimate of a trace (or of :math:`\\operatorname{tr} f(A)`).

    Attributes:
        value: The estimate.
        standard_error: Sample standard deviation of the per-probe samples over
            :math:`\\sqrt{P}` (``nan`` for a single probe).
        matvecs: Products with the operator spent.
        num_probes: Number of random probes of the stochastic part.
        samples: The per-probe samples of the stochastic part (float64 numpy), whose mean
            is the stochastic part of ``value``.
        method: ``"hutchinson"``, ``"hutch++"``, ``"slq"``, ...
    """

    value: float
    standard_error: float
    matvecs: int
    num_probes: int
    samples: np.ndarray
    method: str


@dataclass(frozen=True)
class DiagonalEstimate:
    """An estimate of :math:`\\operatorname{diag} A`.

    Attributes:
        diagonal: The estimate (float64 tensor on the operator's device).
        standard_error: Per-entry standard error (zeros for the exact diagonal).
        matvecs: Products with the operator spent.
        num_probes: Number of probes (``n`` unit vectors for the exact diagonal).
        method: ``"hutchinson"`` or ``"exact"``.
    """

    diagonal: Tensor
    standard_error: Tensor
    matvecs: int
    num_probes: int
    method: str


# --------------------------------------------------------------------------------------
# Block products go through ``_as_operator.TorchOperator.matmat`` (one batched product
# for curvops operators, torch/numpy matrices and scipy LinearOperators).
# --------------------------------------------------------------------------------------


def dots(X: Tensor, Y: Tensor) -> Tensor:
    """Column-wise inner products of two ``(n, m)`` blocks, in float64."""
    return (X.to(torch.float64) * Y.to(torch.float64)).sum(dim=0)


# --------------------------------------------------------------------------------------
# Probes and argument checks
# --------------------------------------------------------------------------------------


def rademacher_or_gaussian_probes(
    n: int, num: int, kind: str, seed: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``num`` probe vectors as the columns of an ``(n, num)`` block.

    Drawn in float64 on the CPU from ``torch.Generator().manual_seed(seed)`` (same probes on
    every device and in every dtype), then cast and moved.

    Args:
        n: Length of each probe.
        num: Number of probes.
        kind: ``"rademacher"`` (entries ±1) or ``"gaussian"`` (standard normal).
        seed: The seed.
        dtype: Target dtype.
        device: Target device.
    """
    if kind not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {kind!r}")
    gen = torch.Generator().manual_seed(int(seed))
    if kind == "rademacher":
        block = torch.randint(0, 2, (n, num), generator=gen).to(torch.float64).mul_(2).sub_(1)
    else:
        block = torch.randn(n, num, generator=gen, dtype=torch.float64)
    return block.to(dtype=dtype, device=device)


def _finite(values: np.ndarray | Tensor, solver: str) -> None:
    """Refuse results of products that hold NaN/Inf (one reduction)."""
    ok = bool(torch.isfinite(values).all()) if isinstance(values, Tensor) else bool(
        np.all(np.isfinite(values)))
    if not ok:
        raise non_finite_product(solver, "in a product with the probes")


def _mean_and_error(samples: np.ndarray) -> tuple[float, float]:
    mean = float(samples.mean())
    if samples.size < 2:
        return mean, math.nan
    return mean, float(samples.std(ddof=1) / math.sqrt(samples.size))


def _probe_blocks(num: int, block_size: int | None) -> list[tuple[int, int]]:
    size = num if block_size is None else check_int("block_size", block_size, minimum=1)
    return [(s, min(s + size, num)) for s in range(0, num, size)]


# --------------------------------------------------------------------------------------
# Trace
# --------------------------------------------------------------------------------------


@with_parameters_fixed
def hutchinson_trace(
    A: object,
    *,
    num_probes: int = 100,
    probe: str = "rademacher",
    seed: int = 0,
    block_size: int | None = None,
) -> TraceEstimate:
    r"""Hutchinson's estimate :math:`\tfrac1P \sum_p v_p^\top A v_p` of :math:`\operatorname{tr} A`.

    Args:
        A: The operator (curvops operator, scipy ``LinearOperator``, numpy/torch matrix).
        num_probes: Number of probes P (= products).
        probe: ``"rademacher"`` or ``"gaussian"``.
        seed: Seed of the probes.
        block_size: Probes per batched product (default all at once).

    Returns:
        The estimate with its standard error.
    """
    op = as_operator(A)
    num_probes = check_int("num_probes", num_probes, minimum=1)
    seed = check_int("seed", seed)
    V_all = rademacher_or_gaussian_probes(op.n, num_probes, probe, seed, op.dtype, op.device)
    samples = torch.empty(num_probes, dtype=torch.float64)
    for start, stop in _probe_blocks(num_probes, block_size):
        V = V_all[:, start:stop]
        samples[start:stop] = dots(V, op.matmat(V)).cpu()
    s = samples.numpy()
    _finite(s, "hutchinson_trace")
    value, se = _mean_and_error(s)
    return TraceEstimate(value, se, num_probes, num_probes, s, "hutchinson")


@with_parameters_fixed
def hutchpp_trace(
    A: object,
    *,
    matvecs: int = 99,
    probe: str = "rademacher",
    seed: int = 0,
) -> TraceEstimate:
    r"""Hutch++ estimate of :math:`\operatorname{tr} A` with a budget of ``matvecs`` products.

    With :math:`k = \lfloor \text{matvecs}/3 \rfloor`: :math:`Q = \operatorname{orth}(A S)`
    for :math:`k` sketch probes :math:`S`;

    .. math::

        \widehat{\operatorname{tr}} = \operatorname{tr}(Q^\top A Q)
            + \frac1k \sum_{p=1}^{k} g_p^\top (I - QQ^\top) A (I - QQ^\top) g_p .

    The orthogonalization (a QR of an ``(n, k)`` block) runs in float64.

    Args:
        A: The operator.
        matvecs: Total number of products, at least 3 (a multiple of 3 uses all of them).
        probe: ``"rademacher"`` or ``"gaussian"`` (for both ``S`` and ``G``).
        seed: Seed; ``S`` and ``G`` are independent columns of one seeded draw.

    Returns:
        The estimate; ``standard_error`` is the one of the deflated Hutchinson part.
    """
    op = as_operator(A)
    matvecs = check_int("matvecs", matvecs, minimum=3)
    seed = check_int("seed", seed)
    k = matvecs // 3
    if k > op.n:
        raise ValueError(f"Hutch++ with matvecs={matvecs} needs k = {k} <= n = {op.n} probes")
    probes = rademacher_or_gaussian_probes(op.n, 2 * k, probe, seed, op.dtype, op.device)
    S, G = probes[:, :k], probes[:, k:]
    Q, _ = torch.linalg.qr(op.matmat(S).to(torch.float64))
    Qd = Q.to(op.dtype)
    exact_part = float(dots(Qd, op.matmat(Qd)).sum())
    G64 = G.to(torch.float64)
    G_perp = (G64 - Q @ (Q.T @ G64)).to(op.dtype)
    samples = dots(G_perp, op.matmat(G_perp)).cpu().numpy()
    _finite(np.append(samples, exact_part), "hutchpp_trace")
    mean, se = _mean_and_error(samples)
    return TraceEstimate(exact_part + mean, se, 3 * k, k, samples, "hutch++")


# --------------------------------------------------------------------------------------
# Diagonal
# --------------------------------------------------------------------------------------


@with_parameters_fixed
def hutchinson_diagonal(
    A: object,
    *,
    num_probes: int = 100,
    probe: str = "rademacher",
    seed: int = 0,
    block_size: int | None = None,
) -> DiagonalEstimate:
    r"""Estimate :math:`\operatorname{diag} A` by :math:`\tfrac1P \sum_p v_p \odot A v_p`.

    Unbiased for both probe kinds; Rademacher probes have per-entry variance
    :math:`\sum_{j \ne i} A_{ij}^2` (Gaussian ones add :math:`2A_{ii}^2`).

    Args:
        A: The operator.
        num_probes: Number of probes P (= products); at least 2 for a standard error.
        probe: ``"rademacher"`` or ``"gaussian"``.
        seed: Seed of the probes.
        block_size: Probes per batched product (default all at once).

    Returns:
        The estimate and its per-entry standard error (float64, on the operator's device).
    """
    op = as_operator(A)
    num_probes = check_int("num_probes", num_probes, minimum=2)
    seed = check_int("seed", seed)
    V_all = rademacher_or_gaussian_probes(op.n, num_probes, probe, seed, op.dtype, op.device)
    total = torch.zeros(op.n, dtype=torch.float64, device=op.device)
    total_sq = torch.zeros_like(total)
    for start, stop in _probe_blocks(num_probes, block_size):
        V = V_all[:, start:stop]
        Z = V.to(torch.float64) * op.matmat(V).to(torch.float64)
        total += Z.sum(dim=1)
        total_sq += (Z * Z).sum(dim=1)
    _finite(total_sq, "hutchinson_diagonal")
    mean = total / num_probes
    # Sample variance from the running sums (float64; P is small next to 1/eps).
    var = (total_sq - num_probes * mean * mean).clamp_min(0.0) / (num_probes - 1)
    return DiagonalEstimate(mean, (var / num_probes).sqrt(), num_probes, num_probes, "hutchinson")


@with_parameters_fixed
def exact_diagonal(A: object, *, chunk_size: int = 64) -> DiagonalEstimate:
    """The exact diagonal :math:`A_{ii} = e_i^\\top A e_i`, from ``n`` unit-vector products.

    Costs ``n`` products (``ceil(n / chunk_size)`` batched calls): for small operators
    and as a reference.

    Args:
        A: The operator.
        chunk_size: Unit vectors per batched product.

    Returns:
        The diagonal (float64, on the operator's device), with zero standard error.
    """
    op = as_operator(A)
    chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    diag = torch.empty(op.n, dtype=torch.float64, device=op.device)
    for start in range(0, op.n, chunk_size):
        stop = min(start + chunk_size, op.n)
        cols = torch.arange(stop - start, device=op.device)
        E = torch.zeros(op.n, stop - start, dtype=op.dtype, device=op.device)
        E[start + cols, cols] = 1
        diag[start:stop] = op.matmat(E)[start + cols, cols].to(torch.float64)
    _finite(diag, "exact_diagonal")
    return DiagonalEstimate(diag, torch.zeros_like(diag), op.n, op.n, "exact")
