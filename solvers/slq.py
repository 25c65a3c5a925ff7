r"""Stochastic Lanczos quadrature: spectral density, trace of :math:`f(A)`, log-determinant.

For a symmetric :math:`A = \sum_i \lambda_i u_i u_i^\top` and a unit vector :math:`q`,
:math:`q^\top f(A)\, q = \sum_i (u_i^\top q)^2 f(\lambda_i)` is an integral against the
discrete measure :math:`\mu_q = \sum_i (u_i^\top q)^2 \delta_{\lambda_i}`. ``m`` Lanczos
steps from :math:`q` give the tridiagonal :math:`T_m = S \Theta S^\top`, and the
Gauss quadrature rule with nodes :math:`\theta_j` and weights
:math:`\tau_j^2 = (e_1^\top s_j)^2` (they sum to 1) integrates polynomials of degree
:math:`\le 2m-1` against :math:`\mu_q` exactly (Golub & Meurant 2010; Ubaru, Chen & Saad
2017). With :math:`q = v/\|v\|` for Rademacher or Gaussian probes :math:`v`, :math:`q`'s
expected outer product is :math:`I/n` (Gaussian: :math:`q` is uniform on the sphere;
Rademacher: :math:`\|v\|^2 = n`), so

* the **spectral density** :math:`\phi(t) = \tfrac1n \sum_i \delta(t - \lambda_i)` is
  estimated by :math:`\tfrac1P \sum_p \sum_j \tau_{pj}^2\, g_\sigma(t - \theta_{pj})`
  with a Gaussian kernel :math:`g_\sigma` (Lin, Saad & Yang 2016; Ghorbani, Krishnan &
  Xiao 2019); it integrates to 1;
* :math:`\operatorname{tr} f(A) \approx \tfrac{n}{P} \sum_p \sum_j \tau_{pj}^2
  f(\theta_{pj})`, and :math:`\log\det(A + \lambda I)` is the case
  :math:`f(x) = \log(x + \lambda)` for PSD :math:`A`.

Standard errors are the sample standard deviation across probes over :math:`\sqrt P`.

Reorthogonalization: ``"full"`` (classical Gram–Schmidt twice against the stored basis)
or ``"none"`` (three vectors only). Without reorthogonalization the tridiagonal grows
ghost copies of converged Ritz values; for quadrature they are harmless: the ghosts of
one eigenvalue *share* its weight (Golub & Meurant 2010, ch. 4; Knizhnerman 1996), so
no Cullum–Willoughby filtering is applied here. All probes run as one block: every
Lanczos step is one batched product ``A @ V`` with ``V`` of shape ``(n, P)``.

A run stops early for a probe whose :math:`\beta_{j+1} \le \varepsilon^{3/4}\|T_j\|`
(:math:`\varepsilon` of the working dtype): its Krylov space is invariant and the
quadrature is already exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from curvops.linops.checks import check_int, check_real

from ._as_operator import as_operator, with_parameters_fixed
from ._tridiagonal import tridiag_eigh
from .lanczos_coefficients import COEFFICIENT_REORTH, lanczos_coefficients
from .trace import TraceEstimate, dots, rademacher_or_gaussian_probes

__all__ = [
    "QuadratureRule",
    "SpectralDensity",
    "log_determinant",
    "slq_quadrature",
    "spectral_density",
    "trace_function",
]

@dataclass(frozen=True)
class QuadratureRule:
    r"""The Gauss quadrature rules of an SLQ run, one per probe.

    Attributes:
        nodes: Per probe, the Ritz values :math:`\theta_{pj}` (float64, ascending).
        weights: Per probe, :math:`\tau_{pj}^2` (float64, summing to 1).
        probe_norms_sq: :math:`\|v_p\|^2` of each probe (``n`` for Rademacher).
        n: Dimension of the operator.
        lanczos_steps: Steps requested; a probe whose Krylov space became invariant has
            fewer nodes.
        matvecs: Products with the operator (probes × steps run).
        probe: ``"rademacher"`` or ``"gaussian"``.
        reorth: ``"full"`` or ``"none"``.
        seed: Seed of the probes.
    """

    nodes: tuple[np.ndarray, ...]
    weights: tuple[np.ndarray, ...]
    probe_norms_sq: np.ndarray
    n: int
    lanczos_steps: int
    matvecs: int
    probe: str
    reorth: str
    seed: int

    @property
    def num_probes(self) -> int:
        """Number of probes P."""
        return len(self.nodes)

    def per_probe(self, f: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        r""":math:`\sum_j \tau_{pj}^2 f(\theta_{pj})` for each probe: estimates of
        :math:`\tfrac1n \operatorname{tr} f(A)`."""
        return np.array([float(np.dot(w, f(x))) for x, w in zip(self.nodes, self.weights)])

    def measure(self) -> tuple[np.ndarray, np.ndarray]:
        """All probes' nodes and weights pooled into one discrete measure of total mass 1."""
        nodes = np.concatenate(self.nodes)
        weights = np.concatenate(self.weights) / self.num_probes
        return nodes, weights


@dataclass(frozen=True)
class SpectralDensity:
    r"""An SLQ estimate of the spectral density :math:`\phi(t) = \tfrac1n\sum_i\delta(t-\lambda_i)`.

    On the linear scale, ``density`` is per unit of :math:`\lambda` on ``grid``. On the log
    scale (PSD operators), ``grid`` holds :math:`\lambda` values spaced geometrically and
    ``density`` is per unit of :math:`\ln\lambda` (the density of :math:`\ln\lambda`):
    either way :meth:`integral` is 1 up to the kernel's tails beyond the grid.

    Attributes:
        grid: Where the density is evaluated (:math:`\lambda` values, ascending).
        density: The estimate on ``grid`` (mean over probes).
        standard_error: Per grid point, across probes (``nan`` for a single probe).
        sigma: Width of the Gaussian kernel, in units of :math:`\lambda` (linear scale) or
            of :math:`\ln\lambda` (log scale).
        scale: ``"linear"`` or ``"log"``.
        log_floor: On the log scale, nodes below this value were placed at it (their
            total weight is ``weight_below_floor``); ``None`` on the linear scale.
        weight_below_floor: Fraction of the spectral mass placed at ``log_floor``.
        quadrature: The quadrature rules behind the estimate (nodes and weights).
    """

    grid: np.ndarray
    density: np.ndarray
    standard_error: np.ndarray
    sigma: float
    scale: str
    log_floor: float | None
    weight_below_floor: float
    quadrature: QuadratureRule

    @property
    def nodes(self) -> tuple[np.ndarray, ...]:
        """Ritz values per probe."""
        return self.quadrature.nodes

    @property
    def weights(self) -> tuple[np.ndarray, ...]:
        """Quadrature weights per probe (each sums to 1)."""
        return self.quadrature.weights

    def integral(self) -> float:
        """Trapezoidal integral of ``density`` over the grid variable (λ or ln λ)."""
        x = np.log(self.grid) if self.scale == "log" else self.grid
        return float(np.trapezoid(self.density, x))


@with_parameters_fixed
def slq_quadrature(
    A: object,
    *,
    num_probes: int = 4,
    lanczos_steps: int = 80,
    probe: str = "rademacher",
    reorth: str = "full",
    seed: int = 0,
) -> QuadratureRule:
    r"""The per-probe Gauss quadrature rules of stochastic Lanczos quadrature.

    Args:
        A: A symmetric operator: curvops operator, scipy ``LinearOperator``, numpy or torch
            matrix, or an object with ``shape``/``dtype``/``matvec``.
        num_probes: Number of probes P.
        lanczos_steps: Lanczos steps m per probe (at most n); the rule is exact for
            polynomials of degree up to 2m - 1.
        probe: ``"rademacher"`` or ``"gaussian"``.
        reorth: ``"full"`` (stores m vectors per probe) or ``"none"`` (three; ghosts
            only split weight).
        seed: Seed of the probes.

    Returns:
        The quadrature rules.

    Raises:
        ValueError: For ``lanczos_steps > n``, unknown ``probe``/``reorth``;
            :class:`~curvops.solvers.NonFiniteProductError` (a ValueError) for a product
            with NaN/Inf.
    """
    op = as_operator(A)
    num_probes = check_int("num_probes", num_probes, minimum=1)
    lanczos_steps = check_int("lanczos_steps", lanczos_steps, minimum=1)
    seed = check_int("seed", seed)
    if lanczos_steps > op.n:
        raise ValueError(
            f"lanczos_steps={lanczos_steps} exceeds the dimension n={op.n} (a Krylov space has "
            "at most n dimensions)"
        )
    if reorth not in COEFFICIENT_REORTH:
        raise ValueError(f"reorth must be one of {COEFFICIENT_REORTH} for SLQ, got {reorth!r}")
    probes = rademacher_or_gaussian_probes(op.n, num_probes, probe, seed, op.dtype, op.device)
    norms_sq = dots(probes, probes).cpu().numpy()
    coefs = lanczos_coefficients(op, probes, lanczos_steps, reorth=reorth)
    nodes, weights = [], []
    for a, b in zip(coefs.alphas, coefs.betas):
        theta, S = tridiag_eigh(a, b)
        nodes.append(np.asarray(theta, dtype=np.float64))
        weights.append(np.asarray(S[0, :], dtype=np.float64) ** 2)
    return QuadratureRule(
        tuple(nodes), tuple(weights), norms_sq, op.n, lanczos_steps, coefs.matvecs, probe,
        reorth, seed,
    )


# --------------------------------------------------------------------------------------
# Spectral density
# --------------------------------------------------------------------------------------


def _gaussian_kernel(x: np.ndarray, centers: np.ndarray, sigma: float) -> np.ndarray:
    z = (x[:, None] - centers[None, :]) / sigma
    return np.exp(-0.5 * z * z) / (sigma * math.sqrt(2.0 * math.pi))


def spectral_density(
    A: object,
    *,
    num_probes: int = 4,
    lanczos_steps: int = 80,
    probe: str = "rademacher",
    reorth: str = "full",
    seed: int = 0,
    sigma: float | None = None,
    grid: np.ndarray | None = None,
    num_points: int = 1000,
    log_scale: bool = False,
    log_floor: float | None = None,
    quadrature: QuadratureRule | None = None,
) -> SpectralDensity:
    r"""The spectral density of ``A`` by stochastic Lanczos quadrature, Gaussian-broadened.

    .. math::

        \hat\phi(t) = \frac1P \sum_{p=1}^P \sum_{j=1}^{m} \tau_{pj}^2\,
            \frac{1}{\sigma\sqrt{2\pi}} e^{-(t - \theta_{pj})^2 / 2\sigma^2}

    with :math:`t = \lambda` (linear scale) or :math:`t = \ln\lambda` and
    :math:`\theta \to \ln\max(\theta, \text{log\_floor})` (log scale, PSD operators).

    Args:
        A: The symmetric operator.
        num_probes: Number of probes P.
        lanczos_steps: Lanczos steps per probe.
        probe: ``"rademacher"`` or ``"gaussian"``.
        reorth: ``"full"`` or ``"none"``.
        seed: Seed of the probes.
        sigma: Kernel width in grid-variable units; default 1 % of the nodes' spread in
            that variable (at least ``1e-3`` times their largest magnitude, or 1).
        grid: Evaluation points (λ values, ascending; positive on the log scale); default
            ``num_points`` points spanning the nodes ± 5 σ (geometric on the log scale).
        num_points: Size of the default grid.
        log_scale: Density of :math:`\ln\lambda` on a geometric grid (for PSD operators).
        log_floor: Log scale only: nodes below it are placed at it and the fraction of the
            mass so placed is reported. Default ``1e-12 ×`` the largest node; required
            positive.
        quadrature: Reuse the rules of an earlier :func:`slq_quadrature` run (then ``A`` and
            the run arguments are ignored; pass ``A=None``).

    Returns:
        The density on the grid, its standard error and the quadrature behind it.

    Raises:
        ValueError: Bad sizes, a non-positive ``sigma``/grid, or a log scale whose largest
            node is not positive.
    """
    num_points = check_int("num_points", num_points, minimum=2)
    sigma = check_real("sigma", sigma, above=0, allow_none=True)
    if log_floor is not None and not log_scale:
        raise ValueError("log_floor applies to the log scale only (log_scale=True)")
    if grid is not None:
        grid = np.asarray(grid, dtype=np.float64)
        if grid.ndim != 1 or grid.size < 2 or not np.all(np.diff(grid) > 0):
            raise ValueError("grid must be a 1-D ascending array of at least 2 points")
        if log_scale and grid[0] <= 0:
            raise ValueError("a log-scale grid must be positive")
    rule = quadrature or slq_quadrature(
        A,
        num_probes=num_probes,
        lanczos_steps=lanczos_steps,
        probe=probe,
        reorth=reorth,
        seed=seed,
    )
    nodes = [x.copy() for x in rule.nodes]
    weight_below_floor = 0.0
    if log_scale:
        top = max(float(x.max()) for x in nodes)
        if top <= 0:
            raise ValueError("log scale needs a positive spectrum; the largest Ritz value is <= 0")
        floor = 1e-12 * top if log_floor is None else float(log_floor)
        if not floor > 0:
            raise ValueError(f"log_floor must be positive, got {log_floor}")
        weight_below_floor = float(
            sum(w[x < floor].sum() for x, w in zip(nodes, rule.weights)) / rule.num_probes
        )
        nodes = [np.log(np.maximum(x, floor)) for x in nodes]
    else:
        floor = None
    all_nodes = np.concatenate(nodes)
    lo, hi = float(all_nodes.min()), float(all_nodes.max())
    if sigma is None:
        sigma = max(0.01 * (hi - lo), 1e-3 * max(abs(lo), abs(hi))) or 1.0
    if grid is None:
        t = np.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points)
        grid = np.exp(t) if log_scale else t
    else:
        t = np.log(grid) if log_scale else grid
    per_probe = np.stack(
        [_gaussian_kernel(t, x, sigma) @ w for x, w in zip(nodes, rule.weights)]
    )
    density = per_probe.mean(axis=0)
    P = rule.num_probes
    se = per_probe.std(axis=0, ddof=1) / math.sqrt(P) if P > 1 else np.full_like(density, np.nan)
    return SpectralDensity(
        grid=grid,
        density=density,
        standard_error=se,
        sigma=float(sigma),
        scale="log" if log_scale else "linear",
        log_floor=floor,
        weight_below_floor=weight_below_floor,
        quadrature=rule,
    )


# --------------------------------------------------------------------------------------
# tr f(A) and log-determinant
# --------------------------------------------------------------------------------------


def _estimate(
    rule: QuadratureRule, f: Callable[[np.ndarray], np.ndarray], method: str
) -> TraceEstimate:
    samples = rule.n * rule.per_probe(f)
    if not np.all(np.isfinite(samples)):
        raise ValueError(f"f is not finite at some Ritz value (nodes span "
                         f"[{min(x.min() for x in rule.nodes):.3e}, "
                         f"{max(x.max() for x in rule.nodes):.3e}])")
    P = samples.size
    se = float(samples.std(ddof=1) / math.sqrt(P)) if P > 1 else math.nan
    return TraceEstimate(float(samples.mean()), se, rule.matvecs, P, samples, method)


def trace_function(
    A: object,
    f: Callable[[np.ndarray], np.ndarray],
    *,
    num_probes: int = 10,
    lanczos_steps: int = 30,
    probe: str = "rademacher",
    reorth: str = "full",
    seed: int = 0,
    quadrature: QuadratureRule | None = None,
) -> TraceEstimate:
    r""":math:`\operatorname{tr} f(A) \approx \tfrac nP \sum_p \sum_j \tau_{pj}^2 f(\theta_{pj})`.

    Args:
        A: The symmetric operator.
        f: A vectorised function on float64 numpy arrays, smooth on the spectrum's
            interval (the quadrature error falls with how well a degree-(2m-1)
            polynomial approximates ``f`` there).
        num_probes: Number of probes P.
        lanczos_steps: Lanczos steps per probe.
        probe: ``"rademacher"`` or ``"gaussian"``.
        reorth: ``"full"`` or ``"none"``.
        seed: Seed of the probes.
        quadrature: Reuse an earlier :func:`slq_quadrature` run (``A`` ignored).

    Returns:
        The estimate with its standard error across probes.
    """
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    rule = quadrature or slq_quadrature(
        A, num_probes=num_probes, lanczos_steps=lanczos_steps, probe=probe, reorth=reorth,
        seed=seed,
    )
    return _estimate(rule, f, "slq")


def log_determinant(
    A: object,
    *,
    damping: float = 0.0,
    num_probes: int = 10,
    lanczos_steps: int = 30,
    probe: str = "rademacher",
    reorth: str = "full",
    seed: int = 0,
    quadrature: QuadratureRule | None = None,
) -> TraceEstimate:
    r""":math:`\log\det(A + \lambda I) = \operatorname{tr}\log(A + \lambda I)` for PSD ``A`` (SLQ).

    Args:
        A: A symmetric positive semi-definite operator.
        damping: :math:`\lambda \ge 0`, added to every node (no extra product).
        num_probes: Number of probes P.
        lanczos_steps: Lanczos steps per probe.
        probe: ``"rademacher"`` or ``"gaussian"``.
        reorth: ``"full"`` or ``"none"``.
        seed: Seed of the probes.
        quadrature: Reuse an earlier :func:`slq_quadrature` run (``A`` ignored).

    Returns:
        The estimate with its standard error across probes.

    Raises:
        ValueError: If ``damping < 0`` or some Ritz value plus damping is not positive
            (``A + λI`` is then not positive definite: increase ``damping``).
    """
    damping = check_real("damping", damping, minimum=0)
    rule = quadrature or slq_quadrature(
        A, num_probes=num_probes, lanczos_steps=lanczos_steps, probe=probe, reorth=reorth,
        seed=seed,
    )
    smallest = min(float(x.min()) for x in rule.nodes) + damping
    if smallest <= 0:
        raise ValueError(
            f"A + damping*I is not positive definite: its smallest Ritz value is {smallest:.3e}; "
            "the log-determinant needs a PSD A and damping > 0 when A is singular"
        )
    return _estimate(rule, lambda x: np.log(x + damping), "slq-logdet")
