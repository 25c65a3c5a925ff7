r"""The cross-check of one operator: every applicable method, against the best reference.

Each eigen-method is a small registered :class:`MethodRunner`: a name, an
applicability test, a tolerance per dtype and a ``run`` that returns the top-k
eigenvalues with its cost. :func:`cross_check` runs the selected methods on one
operator and compares each against a reference spectrum, element by element:

.. math::

    \text{rel\_error} = \frac{\max_{i \le k} |\lambda_i - \lambda_i^{\text{ref}}|}
                             {\max_{i \le k} |\lambda_i^{\text{ref}}|},

with both lists in descending order (``which="LA"``). The element-wise comparison is
what catches *ghosts*: a spurious copy of :math:`\lambda_1` pushes
:math:`\lambda_2, \dots` down by one place, so the error is at least the gap
:math:`|\lambda_1 - \lambda_2| / |\lambda_1|`. A method that returns fewer than ``k``
values fails too.

The reference is, in order of preference: a spectrum passed in (e.g. the fp32 run of
the same model for a bf16 operator), the dense ``eigvalsh`` of ``to_dense()`` (small
n), ``scipy.sparse.linalg.eigsh`` on ``to_scipy()``, and last the in-house Lanczos with
full reorthogonalization (models too big for the others: then only the in-house
strategies are compared with each other). The reference method's own row is checked
against the next reference available, so no row is compared with itself.

On operators less exact than their dtype (``accept_unconverged=True``, the ladder's
inexact rungs) a method may honestly say it did not converge: a row whose values outside
the tolerance are all flagged *not converged* is ``unconverged``, not a failure; one
value outside the tolerance flagged converged (a wrong value, a ghost, a swapped rank)
fails the row.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from unittest import mock

import numpy as np
import torch
from curvops.adapters.fisher_spectral import FisherSpectral, SpectralConfig
from curvops.linops.checks import check_int
from curvops.linops.dtypes import LOW_PRECISION, dtype_name
from curvops.linops.memory_probe import peak_memory
from curvops.linops.registry import OPERATORS
from curvops.solvers import _lanczos_strategies, _operator_accuracy
from curvops.solvers.lanczos import LanczosConfig, lanczos
from scipy.sparse.linalg import LinearOperator, eigsh, lobpcg

__all__ = [
    "METHODS",
    "CheckContext",
    "CrossCheckResult",
    "MethodOutcome",
    "MethodRunner",
    "Reference",
    "cross_check",
    "register_method",
    "relative_error",
    "wrong_and_converged",
]


class _CountingScipyOperator:
    """Wrap a scipy LinearOperator and count the vectors it is applied to."""

    def __init__(self, view: Any) -> None:
        self.count = 0

        def matmat(X: np.ndarray) -> np.ndarray:
            X = np.asarray(X)
            self.count += 1 if X.ndim == 1 else X.shape[1]
            return view.matmat(X.reshape(X.shape[0], -1)).reshape(X.shape)

        self.linop = LinearOperator(
            shape=view.shape, dtype=view.dtype, matvec=matmat, matmat=matmat, rmatvec=matmat,
            rmatmat=matmat,
        )


# --- the method interface -------------------------------------------------------------------
@dataclass
class CheckContext:
    """What a method runner may use.

    Attributes:
        operator: The curvops operator.
        k: Number of top eigenvalues.
        problem: The zoo problem (model, loss, data) the operator was built from, or None;
            the Gram trick needs it.
        operator_name: Short operator name (``hessian``, ``ggn``, ``ef``, ``fisher_mc``).
        max_dense_n: Largest n for which the dense matrix is formed.
        lanczos_max_iters: Iteration cap of the in-house Lanczos (default: min(n, 300);
            three times that for ``none``, which needs more iterations).
        lanczos_tol: Convergence tolerance of the in-house Lanczos.
        seed: Seed of every start vector.
        record_history: Record the Ritz values per iteration (for the convergence figure).
    """

    operator: Any
    k: int
    problem: Any = None
    operator_name: str = ""
    max_dense_n: int = 2500
    lanczos_max_iters: int | None = None
    lanczos_tol: float = 1e-10
    seed: int = 0
    record_history: bool = True

    @property
    def n(self) -> int:
        """Operator size."""
        return int(self.operator.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        """Operator dtype."""
        return self.operator.dtype

    def start_vector(self, columns: int = 1) -> np.ndarray:
        """A seeded Gaussian start block ``(n, columns)`` in float64."""
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randn(self.n, columns, generator=gen, dtype=torch.float64).numpy()


@dataclass
class MethodOutcome:
    """What one method produced.

    Attributes:
        eigenvalues: Top values, descending (float64).
        residual_norms: Per value, :math:`\\|A y - \\theta y\\|` (or the solver's estimate).
        matvecs: Products with the operator (one column = one product).
        seconds: Wall time.
        peak_mb: Peak memory added while it ran (see :func:`peak_memory`).
        ghosts_removed: Spurious Ritz values removed (Cullum–Willoughby), if applicable.
        iterations: Solver iterations, if applicable.
        history: Ritz values per iteration (Lanczos), for the convergence figure.
        all_eigenvalues: The whole spectrum (dense only), for the density figure.
        converged: Per value, whether the method reports it converged (aligned with
            ``eigenvalues``); None for methods that give no per-value flag.
        note: Remarks.
    """

    eigenvalues: np.ndarray
    residual_norms: np.ndarray | None = None
    matvecs: int = 0
    seconds: float = 0.0
    peak_mb: float = 0.0
    ghosts_removed: int | None = None
    iterations: int | None = None
    history: list[np.ndarray] | None = None
    all_eigenvalues: np.ndarray | None = None
    converged: np.ndarray | None = None
    note: str = ""


@dataclass(frozen=True)
class MethodRunner:
    """One registered eigen-method.

    Attributes:
        name: Row label (e.g. ``lanczos-selective``).
        description: One line for the report.
        tolerances: Relative-error tolerance per operator dtype (``"float64"``,
            ``"float32"``, ``"bfloat16"``); a dtype missing here means "not applicable".
        applies: ``applies(ctx) -> None`` when it can run, else the reason to skip.
        run: ``run(ctx) -> MethodOutcome``.
        reference_rank: Lower ranks make better references; None = never a reference.
        expected_to_fail: A deliberately broken method (proves the harness catches it):
            its rows pass when they *fail* the tolerance.
    """

    name: str
    description: str
    tolerances: dict[str, float]
    applies: Callable[[CheckContext], str | None]
    run: Callable[[CheckContext], MethodOutcome]
    reference_rank: int | None = None
    expected_to_fail: bool = False

    def tolerance(self, dtype: torch.dtype) -> float | None:
        """The tolerance for an operator of ``dtype`` (None: no tolerance stated)."""
        return self.tolerances.get(dtype_name(dtype))


METHODS: dict[str, MethodRunner] = {}


def register_method(runner: MethodRunner) -> MethodRunner:
    """Add ``runner`` to :data:`METHODS` (replacing one of the same name)."""
    METHODS[runner.name] = runner
    return runner


def _module_missing(module: str) -> str | None:
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"{module} is not importable yet"


def _descending(values: Any) -> np.ndarray:
    return np.sort(np.asarray(values, dtype=np.float64))[::-1]


def _true_residuals(op: Any, values: np.ndarray, Y: torch.Tensor) -> np.ndarray:
    """``‖A y_i − θ_i y_i‖`` for unit columns ``Y`` (one batched product, not counted)."""
    Y = Y.to(device=op.device, dtype=op.dtype)
    AY = op.matmat(Y).to(torch.float64)
    theta = torch.as_tensor(values, dtype=torch.float64, device=AY.device)
    return torch.linalg.vector_norm(AY - Y.to(torch.float64) * theta, dim=0).cpu().numpy()


# --- the methods ----------------------------------------------------------------------------
def _dense_applies(ctx: CheckContext) -> str | None:
    if ctx.n > ctx.max_dense_n:
        return f"n={ctx.n} > max_dense_n={ctx.max_dense_n}"
    return None


def _run_dense(ctx: CheckContext) -> MethodOutcome:
    t0 = time.perf_counter()
    with peak_memory(ctx.operator.device) as mem:
        D = ctx.operator.to_dense().to(torch.float64)
        asym = float((D - D.T).abs().max())
        evals, evecs = torch.linalg.eigh((D + D.T) / 2)
    seconds = time.perf_counter() - t0
    order = torch.argsort(evals, descending=True)
    evals, evecs = evals[order], evecs[:, order]
    top = evals[: ctx.k]
    res = torch.linalg.vector_norm(D @ evecs[:, : ctx.k] - evecs[:, : ctx.k] * top, dim=0)
    return MethodOutcome(
        eigenvalues=top.cpu().numpy(), residual_norms=res.cpu().numpy(), matvecs=ctx.n,
        seconds=seconds, peak_mb=mem["peak_mb"], all_eigenvalues=evals.cpu().numpy(),
        note=f"max|A-Aᵀ| = {asym:.1e}",
    )


def _scipy_view(ctx: CheckContext) -> Any:
    return ctx.operator.to_scipy()


def _run_eigsh(ctx: CheckContext) -> MethodOutcome:
    view = _scipy_view(ctx)
    counted = _CountingScipyOperator(view)
    v0 = ctx.start_vector()[:, 0].astype(view.dtype)
    ncv = min(ctx.n - 1, max(2 * ctx.k + 1, 20))
    t0 = time.perf_counter()
    with peak_memory(ctx.operator.device) as mem:
        vals, vecs = eigsh(counted.linop, k=ctx.k, which="LA", v0=v0, ncv=ncv, tol=0)
    seconds = time.perf_counter() - t0
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order].astype(np.float64), vecs[:, order]
    res = _true_residuals(ctx.operator, vals, torch.from_numpy(np.ascontiguousarray(vecs)))
    return MethodOutcome(vals, res, counted.count, seconds, mem["peak_mb"],
                         note=f"ARPACK, ncv={ncv}, tol=0 (machine precision), {view.dtype}")


def _run_lobpcg(ctx: CheckContext) -> MethodOutcome:
    r"""scipy's lobpcg, block k + 2, doubled (at most twice) when it stops early with bad pairs.

    scipy's lobpcg gives up (a ``UserWarning`` "not reaching the requested tolerance", and
    the values of its best early iteration) on operators whose rank is a little above the
    block size: the basis ``[X, R, P]`` becomes linearly dependent. Empirical Fisher and MC
    Fisher matrices of a dozen examples are such operators (bert-cls: rank 12, block 7
    gives 1e-3 errors, block ≥ 10 converges). A user would enlarge the block; so does this
    runner when lobpcg warned *and* its pairs cannot guarantee the row's tolerance, i.e.
    :math:`\max_i \|A y_i - \theta_i y_i\| > \text{tol}\,|\theta_1|` (for a symmetric
    matrix each :math:`\theta_i` lies within its residual norm of an eigenvalue). The row's
    note and matvec count say so. (fp32 Hessians also make lobpcg warn, at its round-off
    floor, with pairs good to 1e-6: no retry there.)
    """
    view = _scipy_view(ctx)
    counted = _CountingScipyOperator(view)
    block = ctx.k + 2  # two guard vectors speed up convergence of the k-th value
    tol = 1e-9 if view.dtype == np.float64 else 1e-5
    accept = _LOBPCG_TOL.get(dtype_name(ctx.dtype), 0.0)
    notes: list[str] = []
    t0 = time.perf_counter()
    with peak_memory(ctx.operator.device) as mem:
        for attempt in range(3):
            X = ctx.start_vector(block).astype(view.dtype)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                vals, vecs = lobpcg(counted.linop, X, largest=True, tol=tol, maxiter=500)
            warned = any("requested tolerance" in str(w.message) for w in caught)
            order = np.argsort(vals)[::-1][: ctx.k]
            top, Y = np.asarray(vals)[order].astype(np.float64), vecs[:, order]
            res = _true_residuals(ctx.operator, top, torch.from_numpy(np.ascontiguousarray(Y)))
            bad = float(res.max()) > accept * max(abs(float(top[0])), 1e-300)
            if not (warned and bad) or attempt == 2 or 2 * block > ctx.n // 3:
                break
            notes.append(f"block {block} stopped early, residual {float(res.max()):.1e} "
                         "(lobpcg's tolerance warning)")
            block *= 2
    seconds = time.perf_counter() - t0
    if warned:
        notes.append("lobpcg warned it did not reach its tolerance")
    notes.append(f"block size {block}, residual tol {tol:g}")
    return MethodOutcome(top, res, counted.count, seconds, mem["peak_mb"],
                         note="; ".join(notes))


def _lanczos_runner(
    strategy: str, *, cullum_willoughby: bool = True, dtype_compute: torch.dtype | None = None,
    verify: bool = True, unguarded: bool = False,
) -> Callable[[CheckContext], MethodOutcome]:
    def run(ctx: CheckContext) -> MethodOutcome:
        cap = ctx.lanczos_max_iters or min(ctx.n, 300)
        if strategy == "none":
            cap = min(3 * cap, 3 * ctx.n)  # no basis: needs more steps, and n is no cap
        with_basis = strategy != "none"
        config = LanczosConfig(
            k=ctx.k, max_iters=max(cap, ctx.k), tol=ctx.lanczos_tol, reorth=strategy,
            seed=ctx.seed, dtype_compute=dtype_compute, record_history=ctx.record_history,
            return_eigenvectors=with_basis, cullum_willoughby=cullum_willoughby, verify=verify,
        )
        t0 = time.perf_counter()
        guards = _guards_removed() if unguarded else contextlib.nullcontext()
        with guards, peak_memory(ctx.operator.device) as mem:
            res = lanczos(ctx.operator, config=config)
        seconds = time.perf_counter() - t0
        vals = np.asarray(res.eigenvalues, dtype=np.float64)
        order = np.argsort(vals)[::-1]
        vals = vals[order]
        converged = np.asarray(res.converged, dtype=bool)[order]
        if res.eigenvectors is not None:
            residuals = _true_residuals(ctx.operator, vals, res.eigenvectors[:, order.copy()])
        else:
            residuals = np.asarray(res.residual_norms, dtype=np.float64)[order]
        notes = [f"{res.iterations} iterations"]
        if not res.all_converged:
            notes.append(f"{int(np.sum(res.converged))}/{len(res.converged)} converged")
        if res.rayleigh_ritz:
            notes.append("Rayleigh–Ritz")
        if res.operator_accuracy > 1e3 * torch.finfo(ctx.dtype).eps:
            notes.append(f"measured operator accuracy {res.operator_accuracy:.1e}")
        if not with_basis:
            notes.append("residuals are bounds β|eₘᵀs|")
        notes.extend(res.notes)
        return MethodOutcome(
            eigenvalues=vals, residual_norms=residuals, matvecs=res.matvecs, seconds=seconds,
            peak_mb=max(mem["peak_mb"], res.peak_memory_bytes / 2**20),
            ghosts_removed=res.spurious_removed, iterations=res.iterations,
            history=res.history, converged=converged, note="; ".join(notes),
        )

    return run


@contextlib.contextmanager
def _guards_removed() -> Iterator[None]:
    """Lanczos with its measurement of the operator and its orthogonality probes off.

    For the deliberately broken control only: thresholds then come from the dtype alone,
    as if every product were exact to it. The solver's private hooks are replaced for the
    duration of the call (validation's one reach into solver internals, on purpose).
    """
    with mock.patch.object(_operator_accuracy.AccuracyMonitor, "observe",
                           lambda self, *args: 1.0), \
         mock.patch.object(_lanczos_strategies._BasisStrategy, "probe",
                           lambda self, *args: None), \
         mock.patch.object(_lanczos_strategies._BasisStrategy, "_grew",
                           lambda self, *args: False):
        yield


def _bf16_basis_applies(ctx: CheckContext) -> str | None:
    if ctx.dtype in LOW_PRECISION:
        return "the operator is already low precision (the lanczos-* rows use a bf16 basis)"
    return None


def _uncached_applies(ctx: CheckContext) -> str | None:
    if ctx.problem is None or not ctx.operator_name:
        return "needs the model and data (not only an operator)"
    return None


def _run_uncached(ctx: CheckContext) -> MethodOutcome:
    # The same matrix through the other product path: every product fresh (forward-mode Jv
    # for GGN/Fisher, a new first-order graph for the Hessian), against the cached products
    # every other row uses.
    fresh = ctx.problem.operator(ctx.operator_name, cache="none")
    out = _lanczos_runner("partial")(replace(ctx, operator=fresh))
    return replace(out, note=f"{out.note}; products uncached (cache='none')")


def _gram_applies(ctx: CheckContext) -> str | None:
    if ctx.operator_name not in OPERATORS["empirical_fisher"].names:
        return "the Gram trick computes the empirical Fisher only"
    if ctx.problem is None:
        return "needs the model and data (not only an operator)"
    return None


def _run_gram(ctx: CheckContext) -> MethodOutcome:
    problem, op = ctx.problem, ctx.operator
    batch = list(problem.data)  # every batch: the same examples as the operator
    spectral = FisherSpectral(SpectralConfig(seed=ctx.seed, top_k_eigenvalues=ctx.k,
                                             eigensolver="dense"))
    t0 = time.perf_counter()
    with peak_memory(op.device) as mem:
        out = spectral.compute_fisher_spectrum(problem.model, batch, loss_fn=problem.loss_fn)
    seconds = time.perf_counter() - t0
    # F̂ = (1/N) Σ gᵢgᵢᵀ and EF = c Σ gᵢgᵢᵀ: EF = c·N·F̂ (DECISIONS.md, Gram module).
    N = int(out["metadata"].get("n_samples", op.total.examples))
    scale = op.normalizer * N
    vals = _descending(out["eigenvalues"])[: ctx.k] * scale
    return MethodOutcome(vals, None, matvecs=0, seconds=seconds, peak_mb=mem["peak_mb"],
                         note=f"N={N} per-example gradients, dense Gram eigh; × c·N = {scale:.4g}")


def _cupy_applies(ctx: CheckContext) -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if ctx.operator.device.type != "cuda":
        return "the operator lives on the CPU"
    return _module_missing("cupy")


def _run_cupy_eigsh(ctx: CheckContext) -> MethodOutcome:
    import cupy  # optional: the gpu extra
    from cupyx.scipy.sparse.linalg import eigsh as cupy_eigsh

    view = ctx.operator.to_cupy()
    t0 = time.perf_counter()
    with peak_memory(ctx.operator.device) as mem:
        vals, vecs = cupy_eigsh(view, k=ctx.k, which="LA", tol=0)
        cupy.cuda.get_current_stream().synchronize()
    seconds = time.perf_counter() - t0
    vals = cupy.asnumpy(vals).astype(np.float64)
    order = np.argsort(vals)[::-1]
    Y = torch.from_dlpack(vecs[:, order.copy()])
    res = _true_residuals(ctx.operator, vals[order], Y)
    return MethodOutcome(vals[order], res, matvecs=-1, seconds=seconds, peak_mb=mem["peak_mb"],
                         note="cupyx eigsh on to_cupy() (matvecs not counted)")


def _always(ctx: CheckContext) -> str | None:
    return None


# Tolerances on the relative error of the top-k list (see the module docstring). fp64:
# the methods converge to ~1e-12 on these small problems; 1e-8 leaves room for the
# conditioning of clustered values. fp32 operators: products carry ~1e-7 relative
# round-off. bf16 operators are compared with the fp32 run of the same (bf16-rounded)
# weights, so the tolerance covers the bf16 products themselves: 8 mantissa bits,
# eps = 2^-7 ≈ 7.8e-3 per product; measured errors of the top 3 are 6e-4 to 4e-3 (MLP,
# tiny GPT-2; Hessian, GGN, EF), so 2e-2 is about 2.5 eps and 5x the worst measured.
_BF16_TOL = 2e-2
_EXACT = {"float64": 1e-8, "float32": 1e-4, "bfloat16": _BF16_TOL, "float16": _BF16_TOL}
_LOBPCG_TOL = {"float64": 1e-6, "float32": 1e-3, "bfloat16": _BF16_TOL, "float16": _BF16_TOL}
for _runner in [
    MethodRunner("dense", "torch.linalg.eigh of to_dense() (float64)",
                 {"float64": 1e-10, "float32": 1e-5}, _dense_applies, _run_dense,
                 reference_rank=0),
    MethodRunner("eigsh", "scipy.sparse.linalg.eigsh (ARPACK) on to_scipy()", dict(_EXACT),
                 _always, _run_eigsh, reference_rank=1),
    MethodRunner("lobpcg", "scipy.sparse.linalg.lobpcg on to_scipy()",
                 dict(_LOBPCG_TOL),
                 _always, _run_lobpcg),
    MethodRunner("lanczos-full", "in-house Lanczos, full reorthogonalization", dict(_EXACT),
                 _always, _lanczos_runner("full"), reference_rank=2),
    MethodRunner("lanczos-selective", "in-house Lanczos, selective (Parlett–Scott)",
                 dict(_EXACT), _always, _lanczos_runner("selective"),
                 reference_rank=3),
    MethodRunner("lanczos-partial", "in-house Lanczos, partial (Simon ω-recurrence)",
                 dict(_EXACT), _always, _lanczos_runner("partial")),
    MethodRunner("lanczos-none", "in-house Lanczos, no basis + Cullum–Willoughby filter",
                 dict(_EXACT), _always, _lanczos_runner("none")),
    MethodRunner("lanczos-uncached", "in-house Lanczos (partial) on the operator rebuilt "
                 "with cache='none' (forward-mode Jv for GGN/Fisher)", dict(_EXACT),
                 _uncached_applies, _run_uncached),
    MethodRunner("lanczos-bf16-basis", "full reorthogonalization, bf16 Krylov basis, "
                 "Rayleigh–Ritz recovery", {"float64": 1e-5, "float32": 1e-4},
                 _bf16_basis_applies, _lanczos_runner("full", dtype_compute=torch.bfloat16)),
    MethodRunner("gram", "Gram trick: eigenvalues of (1/N)·G Gᵀ from per-example gradients "
                 "(empirical Fisher only)", {"float64": 1e-8, "float32": 1e-4},
                 _gram_applies, _run_gram),
    MethodRunner("cupy-eigsh", "cupyx.scipy.sparse.linalg.eigsh on to_cupy() (GPU)",
                 dict(_EXACT), _cupy_applies, _run_cupy_eigsh),
]:
    register_method(_runner)

BROKEN_METHOD = MethodRunner(
    "lanczos-none-no-cw",
    "BROKEN ON PURPOSE: Lanczos without reorthogonalization and without Cullum–Willoughby "
    "(the seed's 'keep 2-3 vectors'); its ghosts must make it fail",
    dict(_EXACT), _always, _lanczos_runner("none", cullum_willoughby=False),
    expected_to_fail=True,
)

UNGUARDED_METHOD = MethodRunner(
    "lanczos-unguarded",
    "BROKEN ON PURPOSE: selective Lanczos trusting the dtype (no measurement of the "
    "operator, no orthogonality probes, no verification of what it calls converged); on an "
    "operator less exact than its dtype it must return a wrong value flagged converged",
    dict(_EXACT), _always, _lanczos_runner("selective", verify=False, unguarded=True),
    expected_to_fail=True,
)

DEFAULT_METHODS = (
    "dense", "eigsh", "lobpcg", "lanczos-full", "lanczos-selective", "lanczos-partial",
    "lanczos-none", "lanczos-uncached", "lanczos-bf16-basis", "gram", "cupy-eigsh",
)


# --- the cross-check ------------------------------------------------------------------------
@dataclass(frozen=True)
class Reference:
    """A reference spectrum supplied from outside (e.g. the fp32 run of the same model).

    Attributes:
        eigenvalues: Top values, descending.
        source: Where they come from, for the report (e.g. ``"eigsh (fp32 model)"``).
    """

    eigenvalues: np.ndarray
    source: str


def relative_error(values: np.ndarray, reference: np.ndarray, k: int) -> float:
    """Element-wise relative error of the top-k lists (see the module docstring).

    Returns ``inf`` when either list has fewer than ``k`` values.
    """
    values, reference = _descending(values), _descending(reference)
    if values.size < k or reference.size < k:
        return math.inf
    scale = float(np.abs(reference[:k]).max())
    if scale == 0.0:
        return float(np.abs(values[:k]).max())
    return float(np.abs(values[:k] - reference[:k]).max() / scale)


@dataclass
class CrossCheckResult:
    """All rows of one operator's cross-check.

    Attributes:
        rows: One dict per method (see :func:`cross_check` for the keys).
        outcomes: Method name → its :class:`MethodOutcome` (figures use the history).
        reference: The reference spectrum and its source.
    """

    rows: list[dict[str, Any]]
    outcomes: dict[str, MethodOutcome] = field(default_factory=dict)
    reference: Reference | None = None

    @property
    def passed(self) -> bool:
        """Whether no row failed (skipped rows do not fail)."""
        return all(r["status"] != "fail" for r in self.rows)


def _status(checked: bool, passed: bool, expected_to_fail: bool) -> str:
    """``pass``/``fail``; ``caught`` for a broken-on-purpose method the check rejected."""
    if not checked:
        return "unchecked"
    if expected_to_fail:  # "uncaught": it happened to be right (no ghost formed)
        return "caught" if passed else "uncaught"
    return "pass" if passed else "fail"


def wrong_and_converged(
    values: np.ndarray, converged: np.ndarray | None, reference: np.ndarray, k: int,
    tolerance: float,
) -> int:
    """How many of the top ``k`` values are outside the tolerance yet flagged converged.

    Both lists descending; the tolerance is relative to ``max_i |reference_i|`` as in
    :func:`relative_error`. Without per-value flags every value counts as flagged
    converged; a value the method did not return is not flagged.
    """
    values, reference = _descending(values)[:k], _descending(reference)[:k]
    m = min(values.size, reference.size)
    scale = float(np.abs(reference).max()) if reference.size else 0.0
    wrong = np.abs(values[:m] - reference[:m]) > tolerance * (scale or 1.0)
    flags = np.ones(m, dtype=bool) if converged is None else np.asarray(converged)[:m]
    return int(np.sum(wrong & flags))


def cross_check(
    operator: Any,
    k: int = 5,
    *,
    methods: Sequence[str | MethodRunner] = DEFAULT_METHODS,
    reference: Reference | None = None,
    problem: Any = None,
    labels: dict[str, Any] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    tolerance: float | None = None,
    accept_unconverged: bool = False,
    **context: Any,
) -> CrossCheckResult:
    """Run every selected, applicable method on ``operator`` and compare with a reference.

    Args:
        operator: A curvops operator.
        k: Number of top eigenvalues compared (``which="LA"``).
        methods: Names in :data:`METHODS` or :class:`MethodRunner` objects.
        reference: A reference from outside; default the best method that ran (dense,
            then eigsh, then Lanczos-full, then Lanczos-selective).
        problem: The zoo problem behind the operator (the Gram trick needs it).
        labels: Extra keys copied into every row (``model``, ``operator``, ``rung``).
        on_row: Called with each finished row (for printing as it goes).
        tolerance: One relative tolerance for every method (e.g. the accuracy contract
            on an operator of known accuracy); default each method's own for the dtype.
        accept_unconverged: A row outside the tolerance whose wrong values are all
            flagged not converged by the method is ``unconverged`` (honest), not
            ``fail``; a broken-on-purpose method is then ``caught`` only when it flags a
            wrong value converged.
        **context: Fields of :class:`CheckContext` (``max_dense_n``, ``lanczos_tol``, ...).

    Returns:
        A :class:`CrossCheckResult`. Each row has ``model``, ``operator``, ``method``,
        ``dtype``, ``n``, ``k``, ``eigenvalues``, ``reference``, ``rel_error``,
        ``tolerance``, ``residual_max``, ``ghosts_removed``, ``iterations``, ``matvecs``,
        ``seconds``, ``peak_mb``, ``converged`` (values flagged converged, or None),
        ``passed``, ``status`` (pass / unconverged / fail / skipped / error; caught /
        uncaught for a broken-on-purpose method) and ``note``.

    Raises:
        ValueError: ``k`` not in ``[1, n)`` or an unknown method name.
    """
    n = int(operator.shape[0])
    k = check_int("k", k, minimum=1, maximum=n - 1)
    runners = []
    for m in methods:
        if isinstance(m, MethodRunner):
            runners.append(m)
        elif m in METHODS:
            runners.append(METHODS[m])
        else:
            raise ValueError(f"unknown method {m!r}; registered: {', '.join(METHODS)}")
    ctx = CheckContext(operator=operator, k=k, problem=problem, **context)
    base = {"model": "", "operator": ctx.operator_name or getattr(operator, "name", ""),
            **(labels or {}), "dtype": dtype_name(operator.dtype), "n": n, "k": k}

    # Reference-grade methods run first, so every row can be judged when it is printed.
    order = sorted(range(len(runners)), key=lambda i: (
        runners[i].reference_rank if runners[i].reference_rank is not None else 99, i))
    outcomes: dict[str, MethodOutcome] = {}
    skipped: dict[str, str] = {}
    errors: dict[str, str] = {}
    for i in order:
        runner = runners[i]
        reason = runner.applies(ctx)
        if reason is None and tolerance is None and runner.tolerance(operator.dtype) is None:
            reason = f"no tolerance stated for {dtype_name(operator.dtype)}"
        if reason is not None:
            skipped[runner.name] = reason
            continue
        try:
            outcomes[runner.name] = runner.run(ctx)
        except Exception as err:  # a crashing method is a failed row, not a crashed harness
            errors[runner.name] = f"{type(err).__name__}: {err}"

    ref = reference
    ref_name = second = None
    if ref is None:
        ranked = sorted((r for r in runners if r.reference_rank is not None
                         and r.name in outcomes), key=lambda r: r.reference_rank)
        if ranked:
            ref_name = ranked[0].name
            ref = Reference(outcomes[ref_name].eigenvalues, ref_name)
            second = ranked[1].name if len(ranked) > 1 else None
    rows = []
    for runner in runners:
        row = dict(base, method=runner.name, eigenvalues=None, reference=None,
                   rel_error=None, tolerance=(runner.tolerance(operator.dtype)
                                              if tolerance is None else tolerance),
                   residual_max=None, ghosts_removed=None, iterations=None, matvecs=None,
                   seconds=None, peak_mb=None, converged=None, passed=None,
                   status="skipped", note="")
        if runner.name in skipped:
            row["note"] = skipped[runner.name]
        elif runner.name in errors:
            row.update(status="error", passed=False, note=errors[runner.name])
        else:
            out = outcomes[runner.name]
            against, source = (ref.eigenvalues, ref.source) if ref is not None else (None, None)
            if runner.name == ref_name:  # never judge the reference by itself
                against, source = ((outcomes[second].eigenvalues, second) if second
                                   else (None, None))
            rel = relative_error(out.eigenvalues, against, k) if against is not None else None
            tol = row["tolerance"]
            within = rel is not None and rel <= tol
            passed = (not within) if runner.expected_to_fail else within
            honest = False
            if accept_unconverged and rel is not None and not within:
                liars = wrong_and_converged(out.eigenvalues, out.converged, against, k, tol)
                honest = liars == 0
                passed = (not honest) if runner.expected_to_fail else honest
            row.update(
                eigenvalues=[float(v) for v in out.eigenvalues], reference=source,
                rel_error=rel, residual_max=(float(np.max(out.residual_norms))
                                             if out.residual_norms is not None
                                             and len(out.residual_norms) else None),
                ghosts_removed=out.ghosts_removed, iterations=out.iterations,
                matvecs=out.matvecs, seconds=out.seconds, peak_mb=out.peak_mb,
                converged=(int(np.sum(out.converged[:k])) if out.converged is not None
                           else None),
                passed=passed if rel is not None else None,
                status=("unconverged" if honest and not runner.expected_to_fail
                        else _status(rel is not None, passed, runner.expected_to_fail)),
                note=out.note + ("; expected to fail (deliberately broken)"
                                 if runner.expected_to_fail else ""),
            )
            if out.eigenvalues.size < k:
                row["note"] += f"; only {out.eigenvalues.size} of k={k} values"
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return CrossCheckResult(rows, outcomes, ref)
