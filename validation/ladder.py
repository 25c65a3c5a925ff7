"""The validation ladder: from tiny fp64 models to models only the in-house solver can do.

Each rung trusts the one below it:

1. ``fp64-dense`` — tiny float64 models whose dense matrix is the reference; every
   method (dense, eigsh, lobpcg, the four Lanczos strategies, the bf16-basis variant,
   the Gram trick, and a deliberately broken Lanczos that must be *caught*).
2. ``fp32-eigsh`` — small float32 models (n in the tens of thousands) where scipy's
   eigsh on ``to_scipy()`` is the reference.
3. ``bf16-vs-fp32`` — bfloat16 models whose reference is the fp32 run of the same
   weights (the bf16-rounded weights, widened exactly to fp32); all four Lanczos
   strategies and eigsh run on the bf16 operator, and the tolerance covers the bf16
   products themselves.
4. ``in-house`` — models too big for a dense matrix or for eigsh in reasonable time
   (≈1 M parameters): only the in-house strategies, compared with full
   reorthogonalization.

Two rungs hold the solver to its accuracy contract on operators less exact than their
dtype (docs/lanczos.md: with products of relative accuracy δ, each wanted eigenvalue
within 5 δ ‖A‖, or reported not converged):

* ``noisy`` — a float64 matrix of known spectrum whose products carry fresh relative
  noise δ = 1e-7, 1e-5, 1e-3; the closed-form spectrum is the reference;
* ``fp64-inexact`` — float64 models that compute inside in float32 (an MLP with a
  float32 LayerNorm, a LLaMA whose RMSNorm is float32): δ ≈ 1e-7, the dense matrix is
  the reference.

There a row is ``unconverged`` (not a failure) when every value outside the contract is
flagged not converged, and fails when one wrong value is flagged converged; a
deliberately unguarded Lanczos (dtype thresholds, no verification) must be caught
returning one.

:func:`run_ladder` runs the rungs (``quick``: rung 1 on the MLP and CNN, a small bf16
rung and the two contract rungs on their smallest cases), prints each row as it finishes
under a progress bar, and returns the rows with what the figures need (Ritz histories,
SLQ densities, dense spectra).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from curvops.solvers.slq import spectral_density

from .crosscheck import (
    BROKEN_METHOD,
    UNGUARDED_METHOD,
    CrossCheckResult,
    MethodRunner,
    Reference,
    cross_check,
)
from .zoo import (
    NOISE_LEVELS,
    SYNTHETIC,
    ZOO,
    SpectrumProblem,
    ZooProblem,
    build,
    build_problem,
    noise_operator_name,
)

#: C of the accuracy contract (docs/lanczos.md): each wanted eigenvalue within C δ ‖A‖ of
#: the truth, or reported not converged.
CONTRACT_FACTOR = 5.0

__all__ = ["FULL_LADDER", "QUICK_LADDER", "CheckRecord", "LadderRun", "Rung", "run_ladder"]

_ALL_LANCZOS = ("lanczos-full", "lanczos-selective", "lanczos-partial", "lanczos-none")


@dataclass(frozen=True)
class Rung:
    """One rung of the ladder.

    Attributes:
        name: Row label.
        description: What the rung proves, for the report.
        dtype: The models' dtype.
        models: Zoo names.
        operators: Operator short names.
        methods: Method names (or runners).
        reference: ``"best"`` (the best method that ran: dense > eigsh > Lanczos-full),
            ``"fp32"`` (the fp32 run of the same weights) or ``"exact"`` (the known
            spectrum of a synthetic problem).
        k: Top eigenvalues compared.
        context: Extra :class:`~curvops.validation.crosscheck.CheckContext` fields.
        density: Whether to estimate the SLQ density (figure).
        contract_delta: When set, the rung checks the accuracy contract on operators of
            relative accuracy δ: every method's tolerance is ``CONTRACT_FACTOR`` δ (an
            operator's own ``relative_accuracy`` attribute, when it has one, is its δ),
            and a row whose wrong values are all flagged not converged is
            ``unconverged``, not failed.
        threads: torch intra-op threads while the rung runs (None: leave as is). Products
            of models with a few hundred parameters do not parallelise; on a loaded
            2-core machine a second thread made them up to 100x slower (measured: the
            llama-tiny Hessian's eigsh took 65 s with 2 threads, 0.8 s with one; the
            gpt2-1m rung 560 s with 2 threads beside another busy process, 11 s with one).
    """

    name: str
    description: str
    dtype: torch.dtype
    models: tuple[str, ...]
    operators: tuple[str, ...]
    methods: tuple[str | MethodRunner, ...]
    reference: str = "best"
    k: int = 5
    context: dict[str, Any] = field(default_factory=dict)
    density: bool = True
    contract_delta: float | None = None
    threads: int | None = None


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_FP64_METHODS = ("dense", "eigsh", "lobpcg", *_ALL_LANCZOS, "lanczos-uncached",
                 "lanczos-bf16-basis", "gram", "cupy-eigsh", BROKEN_METHOD)

_NOISE_OPERATORS = tuple(noise_operator_name(d) for d in NOISE_LEVELS)
# Products of a float64 model with float32 internals: float32's unit round-off, doubled.
_FP32_INTERNALS_DELTA = 1.2e-7
_CONTRACT_METHODS = (*_ALL_LANCZOS, UNGUARDED_METHOD)


def _noisy_rung(operators: tuple[str, ...]) -> Rung:
    return Rung("noisy", "products with relative noise δ: within 5 δ ‖A‖ or flagged not "
                "converged (closed-form spectrum)", torch.float64, ("noisy-spectrum",),
                operators, _CONTRACT_METHODS, reference="exact", density=False,
                context={"lanczos_tol": 1e-8}, contract_delta=0.0)


def _inexact_rung(models: tuple[str, ...], operators: tuple[str, ...]) -> Rung:
    return Rung("fp64-inexact", "float64 models with float32 internals: within 5 δ ‖A‖ "
                "(δ = 1.2e-7) or flagged not converged", torch.float64, models, operators,
                ("dense", "eigsh", *_CONTRACT_METHODS), density=False,
                context={"lanczos_tol": 1e-10}, contract_delta=_FP32_INTERNALS_DELTA,
                threads=1)


QUICK_LADDER: tuple[Rung, ...] = (
    Rung("fp64-dense", "tiny float64 models; the dense matrix is the reference",
         torch.float64, ("mlp", "cnn"), ("hessian", "ggn", "ef"), _FP64_METHODS, threads=1),
    Rung("bf16-vs-fp32", "bfloat16 model; the fp32 run of the same weights is the reference",
         torch.bfloat16, ("mlp",), ("ggn",), ("eigsh", *_ALL_LANCZOS), reference="fp32",
         k=3, density=False, context={"lanczos_tol": 1e-3}, threads=1),
    _noisy_rung(_NOISE_OPERATORS),
    _inexact_rung(("mlp-fp32-norm", "llama-tiny"), ("ggn",)),
)

FULL_LADDER: tuple[Rung, ...] = (
    Rung("fp64-dense", "tiny float64 models; the dense matrix is the reference",
         torch.float64, ("mlp", "cnn", "gpt2-tiny", "bert-cls"),
         ("hessian", "ggn", "ef", "fisher_mc"), _FP64_METHODS, threads=1),
    Rung("fp32-eigsh", "small float32 models; scipy eigsh is the reference",
         torch.float32, ("llama-tiny", "gpt2-small"), ("hessian", "ggn", "ef"),
         ("eigsh", "lobpcg", *_ALL_LANCZOS, "lanczos-uncached", "lanczos-bf16-basis", "gram",
          "cupy-eigsh"),
         context={"lanczos_tol": 1e-8}, threads=1),
    Rung("bf16-vs-fp32", "bfloat16 models; the fp32 run of the same weights is the reference",
         torch.bfloat16, ("mlp", "gpt2-tiny"), ("hessian", "ggn", "ef"),
         ("eigsh", *_ALL_LANCZOS), reference="fp32", k=3, density=False,
         context={"lanczos_tol": 1e-3}, threads=1),
    Rung("in-house", "≈1 M parameters: too big for dense or eigsh in reasonable time; the "
         "in-house strategies must agree with full reorthogonalization",
         torch.float32, ("gpt2-1m",), ("ggn",), _ALL_LANCZOS, k=3, density=False,
         context={"lanczos_tol": 1e-6, "lanczos_max_iters": 60, "record_history": True},
         threads=1),
    _noisy_rung(_NOISE_OPERATORS),
    _inexact_rung(("mlp-fp32-norm", "llama-tiny"), ("hessian", "ggn", "ef")),
)


@dataclass
class CheckRecord:
    """One (rung, model, operator) cross-check and what the figures need.

    Attributes:
        rung: Rung name.
        model: Zoo name.
        operator: Operator short name.
        dtype: Operator dtype name.
        n: Operator size.
        result: The cross-check.
        density: SLQ density ``{"grid", "density", "matvecs", "seconds"}`` or None.
    """

    rung: str
    model: str
    operator: str
    dtype: str
    n: int
    result: CrossCheckResult
    density: dict[str, Any] | None = None


@dataclass
class LadderRun:
    """The whole run: records (in order), flat rows, timing.

    Attributes:
        records: One per cross-checked operator.
        rungs: The rungs run (after filtering).
        seconds: Total wall time.
        skipped_models: Model → reason it was not built (e.g. transformers missing).
    """

    records: list[CheckRecord]
    rungs: list[Rung]
    seconds: float = 0.0
    skipped_models: dict[str, str] = field(default_factory=dict)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """Every row of every record."""
        return [row for rec in self.records for row in rec.result.rows]

    @property
    def passed(self) -> bool:
        """No row failed or errored."""
        return all(row["status"] not in ("fail", "error") for row in self.rows)


def _slq_density(op: Any, n: int) -> dict[str, Any]:
    """SLQ density of ``op`` (4 probes)."""
    t0 = time.perf_counter()
    dens = spectral_density(op, num_probes=4, lanczos_steps=min(40, n - 1), seed=0)
    return {"grid": np.asarray(dens.grid), "density": np.asarray(dens.density),
            "matvecs": int(dens.quadrature.matvecs), "seconds": time.perf_counter() - t0}


def select_rungs(
    rungs: Sequence[Rung],
    models: Sequence[str] | None = None,
    operators: Sequence[str] | None = None,
) -> list[Rung]:
    """Restrict ``rungs`` to the given models/operators (None keeps all); drop empty rungs.

    Raises:
        ValueError: For a model name that is not in the zoo.
    """
    if models is not None:
        unknown = [m for m in models if m not in ZOO and m not in SYNTHETIC]
        if unknown:
            raise ValueError(f"unknown zoo model(s) {unknown}; choose from "
                             f"{', '.join([*ZOO, *SYNTHETIC])}")
    out = []
    for rung in rungs:
        ms = tuple(m for m in rung.models if models is None or m in models)
        ops = tuple(o for o in rung.operators if operators is None or o in operators)
        if ms and ops:
            out.append(replace(rung, models=ms, operators=ops))
    return out


def run_ladder(
    rungs: Sequence[Rung],
    *,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
    seed: int = 0,
) -> LadderRun:
    """Run every (rung, model, operator) cross-check in order.

    Args:
        rungs: The rungs (see :data:`QUICK_LADDER`, :data:`FULL_LADDER`, :func:`select_rungs`).
        on_row: Called with each finished row (printing as it goes).
        progress: Show a tqdm bar over the cross-checks (if tqdm is installed).
        seed: Seed of the models, data and start vectors.

    Returns:
        A :class:`LadderRun`.
    """
    t0 = time.perf_counter()
    tasks = [(r, m, o) for r in rungs for m in r.models for o in r.operators]
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm  # optional: the progress extra

            bar = tqdm(total=len(tasks), desc="curvops validate", unit="check", leave=False)
        except ImportError:  # the progress extra is optional
            bar = None
    run = LadderRun(records=[], rungs=list(rungs))
    problems: dict[tuple[str, str], ZooProblem | SpectrumProblem] = {}
    for rung, model, op_name in tasks:
        if bar is not None:
            bar.set_postfix_str(f"{rung.name} {model} {op_name}")
        with _torch_threads(rung.threads):
            record = _run_task(rung, model, op_name, problems, run, seed, on_row)
        if record is not None:
            run.records.append(record)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    run.seconds = time.perf_counter() - t0
    return run


def _run_task(
    rung: Rung, model: str, op_name: str,
    problems: dict[tuple[str, str], ZooProblem | SpectrumProblem],
    run: LadderRun, seed: int, on_row: Callable[[dict[str, Any]], None] | None,
) -> CheckRecord | None:
    """Cross-check one (rung, model, operator); None when the model cannot be built."""
    try:
        key = (model, str(rung.dtype))
        if key not in problems:
            problems[key] = _build_for(rung, model, seed)
        problem = problems[key]
    except ImportError as err:
        run.skipped_models[model] = str(err)
        return None
    labels = {"rung": rung.name, "model": model}
    context = {"operator_name": op_name, "seed": seed, **rung.context}
    reference = None
    if rung.reference == "fp32":
        reference = _fp32_reference(rung, problems, model, op_name, seed, run, labels,
                                    context, on_row)
    elif rung.reference == "exact":
        reference = Reference(np.asarray(problem.eigenvalues), "closed form")
    op = problem.operator(op_name)
    contract: dict[str, Any] = {}
    if rung.contract_delta is not None:
        delta = getattr(op, "relative_accuracy", rung.contract_delta)
        contract = {"tolerance": CONTRACT_FACTOR * delta, "accept_unconverged": True}
    result = cross_check(op, rung.k, methods=rung.methods, reference=reference,
                         problem=problem, labels=labels, on_row=on_row, **contract, **context)
    density = _slq_density(op, op.shape[0]) if rung.density else None
    return CheckRecord(rung.name, model, op_name, str(op.dtype)[6:], op.shape[0], result,
                       density)


def _build_for(rung: Rung, model: str, seed: int) -> ZooProblem | SpectrumProblem:
    if rung.reference == "fp32":  # the bf16 problem is the fp32 one, rounded once
        return build(model, torch.float32, seed).to(rung.dtype)
    return build_problem(model, rung.dtype, seed)


def _fp32_reference(
    rung: Rung, problems: dict[tuple[str, str], ZooProblem], model: str, op_name: str,
    seed: int, run: LadderRun, labels: dict[str, Any], context: dict[str, Any],
    on_row: Callable[[dict[str, Any]], None] | None,
) -> Reference:
    """Cross-check the fp32 model (its rows are reported too) and return its reference."""
    # The bf16 weights, widened to fp32 exactly: the reference differs from the bf16 run
    # only by the arithmetic of the products, not by the rounding of the weights.
    key = (model, "torch.float32 (rounded to bfloat16)")
    if key not in problems:
        problems[key] = problems[(model, str(rung.dtype))].to(torch.float32)
    problem32 = problems[key]
    op32 = problem32.operator(op_name)
    methods = ("dense", "eigsh", "lanczos-full") if ZOO[model].dense_ok else (
        "eigsh", "lanczos-full")
    ctx32 = {**context, "lanczos_tol": 1e-10}
    res32 = cross_check(op32, rung.k, methods=methods, problem=problem32,
                        labels={**labels, "rung": f"{rung.name} (fp32 ref)"}, on_row=on_row,
                        **ctx32)
    run.records.append(CheckRecord(f"{rung.name} (fp32 ref)", model, op_name, "float32",
                                   op32.shape[0], res32, None))
    if res32.reference is None:
        raise RuntimeError(f"no fp32 reference could be computed for {model}/{op_name}")
    return Reference(res32.reference.eigenvalues, f"{res32.reference.source} (fp32 model)")
