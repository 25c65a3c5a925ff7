r"""Section ``scale_ladder``: top-k eigenvalues of the exact Fisher = GGN of language models.

Randomly initialised models built from configs (:mod:`.language_models`), in the ladder's
dtype, on one batch of tokens. For each, the top-k eigenvalues of
:class:`~curvops.linops.GGNOperator` with every feasible Lanczos strategy, with wall time,
matvecs, seconds per matvec and peak memory (``torch.cuda.max_memory_allocated``, reset
before each run); the agreement of the strategies,
:math:`\max_i|\lambda_i - \lambda_i^\text{ref}| / \max_i|\lambda_i^\text{ref}|` against the
best strategy that ran (full > selective > partial > none); and of the main dtype against
a run of the comparison dtype on the same (rounded) weights where it fits.

A basis strategy runs with the largest iteration cap that fits memory (:mod:`.estimates`)
and is ``skipped: memory`` below :math:`k + 10` iterations; ``restarted`` is full
reorthogonalization with a thick restart (``ncv`` = :data:`RESTART_NCV` or 2k + 2, a
float32 basis for a bf16 model), whose memory does not grow with the iterations; ``none``
is always tried. A
run gets at most as many iterations as its share of the time allows at the measured
seconds per product, and is ``skipped: budget`` below :math:`k + 10`. An out-of-memory
error is recorded as ``OOM`` with the memory figures, and the ladder goes on.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from curvops.solvers.memory_estimate import lanczos_memory_bytes

from ...linops import GGNOperator
from ...linops.hf import hf_objective
from ...solvers import LanczosConfig, lanczos
from ..crosscheck import METHODS, relative_error
from ..report import json_ready
from ..zoo import token_data
from .context import Run
from .device import GIB, error_record, free, measured, memory_figures, move
from .estimates import fit_iters, iters_in_time
from .language_models import build_lm, count_parameters
from .report import count_text
from .settings import LadderSpec, dtype_name

__all__ = ["run_section"]

STRATEGY_PREFERENCE = ("full", "restarted", "selective", "partial", "none")
# The thick restart's basis bound (the seed API's preference for k = 5).
RESTART_NCV = 12


def solver_settings(strategy: str, dtype: torch.dtype, k: int, n: int
                    ) -> tuple[str, int | None, torch.dtype]:
    """``(reorth, ncv, basis dtype)`` of a ladder strategy: ``restarted`` is full with a
    thick restart and a float32 basis where the model's dtype is lower (a restart would
    round every kept Ritz vector to bf16); the others keep the model's dtype."""
    if strategy != "restarted":
        return strategy, None, dtype
    basis = torch.float32 if torch.empty(0, dtype=dtype).element_size() < 4 else dtype
    return "full", min(max(2 * k + 2, RESTART_NCV), n - 1), basis
# Share of the device memory a run may plan to use.
MEMORY_HEADROOM = 0.97
# The orthogonality measurement costs j^2 n flops: skipped above this many parameters.
MEASURE_ORTHOGONALITY_MAX_N = 200_000_000


def _make_operator(model: torch.nn.Module, data: list[Any]) -> tuple[Any, str]:
    """``GGNOperator`` with the HF objective; if the two-pass determinism check fails on this
    device, again without it (and say so: it is a finding, not a reason to lose the case)."""
    try:
        return GGNOperator(model, hf_objective(model, normalization="token"), data), ""
    except ValueError as err:
        if "differ between two identical passes" not in str(err):
            raise
        return (GGNOperator(model, hf_objective(model, normalization="token"), data,
                            check_deterministic=False),
                "determinism check failed on this device (outputs of two identical passes "
                "differ); operator built with check_deterministic=False")


def _warm_products(op: Any, run: Run) -> dict[str, Any]:
    """Two products with a seeded vector: the first builds the cache, the second is timed
    as a Lanczos step sees it; the second's peak above its start is ``P``."""
    n = int(op.shape[0])
    gen = torch.Generator(device=run.device).manual_seed(run.settings.seed + 7)
    x = torch.randn(n, generator=gen, device=run.device, dtype=op.dtype)
    with measured(run.device) as first:
        y = op @ x
        del y
    with measured(run.device) as second:
        y = op @ x
        del y
    del x
    out = {"first_s": first["seconds"], "cached_s": second["seconds"],
           "first_peak_above_before_bytes": first["peak_above_before_bytes"],
           "cached_peak_above_before_bytes": second["peak_above_before_bytes"],
           "cache": json_ready(getattr(op, "cache_info", None))}
    free(run.device)
    return out


def _lanczos_case(run: Run, spec: LadderSpec, model_rec: dict[str, Any], op: Any,
                  dtype: torch.dtype, strategy: str, product: dict[str, Any],
                  allot_s: float) -> None:
    """One Lanczos run with the memory and time checks; appends its record."""
    s = run.settings
    n = int(op.shape[0])
    case: dict[str, Any] = {"model": spec.name, "dtype": dtype_name(dtype),
                            "strategy": strategy, "n": n, "k": s.k}
    with run.recorder.change():
        model_rec["cases"].append(case)
    min_iters = min(s.k + 10, n - 1)
    cap = min(spec.max_iters, n - 1)
    product_peak = product["cached_peak_above_before_bytes"]
    # Memory: the iteration cap that fits (basis strategies), or the plain estimate.
    mem_note = ""
    reorth, ncv, basis_dtype = solver_settings(strategy, dtype, s.k, n)
    if run.device.type == "cuda":
        total = torch.cuda.mem_get_info(run.device)[1]
        now = torch.cuda.memory_allocated(run.device)
        usable = MEMORY_HEADROOM * total - now - product_peak
        if ncv is not None:
            est = lanczos_memory_bytes(n, reorth, dtype, basis_dtype, cap, s.k, ncv=ncv,
                                       return_eigenvectors=False)
            case["memory_estimate"] = dict(est, allocated_now=now, product_peak=product_peak,
                                           total_device=total,
                                           fits=est["total"] <= usable)
            if est["total"] > usable:
                run.recorder.end(case, status="skipped: memory",
                                 note=f"{ncv} basis vectors need {est['total'] / GIB:.1f} GiB")
                return
        elif strategy != "none":
            fit = fit_iters(n, strategy, dtype, cap, s.k, usable)
            est = lanczos_memory_bytes(n, strategy, dtype, dtype, max(fit, min_iters), s.k)
            case["memory_estimate"] = dict(est, allocated_now=now, product_peak=product_peak,
                                           total_device=total, iters_that_fit=fit)
            if fit < min_iters:
                need = (now + product_peak + est["total"]) / GIB
                run.recorder.end(case, status="skipped: memory",
                                 note=f"the basis fits {fit} iterations (< {min_iters}): needs "
                                      f"{need:.1f} GiB of {total / GIB:.1f} GiB")
                return
            if fit < cap:
                mem_note = f"iterations capped at {fit} by memory"
            cap = fit
        else:
            est = lanczos_memory_bytes(n, strategy, dtype, dtype, cap, s.k)
            need = now + product_peak + est["total"]
            case["memory_estimate"] = dict(est, allocated_now=now, product_peak=product_peak,
                                           total_device=total,
                                           fits=need <= MEMORY_HEADROOM * total)
    # Time: the start vector (drawn on the CPU), the products, the reorthogonalization.
    start_s = n / 3e8 if run.device.type == "cuda" else 0.0
    avail_s = min(allot_s, run.remaining() - 5.0) - start_s - 2.0
    budget_iters = iters_in_time(avail_s, n, reorth, basis_dtype, product["cached_s"],
                                 run.device, cap, ncv=ncv)
    if budget_iters < min_iters:
        run.recorder.end(case, status="skipped: budget",
                         note=f"{budget_iters} iterations fit the time left ({allot_s:.0f} s "
                              f"allotted, {product['cached_s']:.3g} s per product)")
        return
    iters = min(cap, budget_iters)
    notes = [t for t in (mem_note, f"iterations capped at {iters} by time"
                         if budget_iters < cap else "") if t]
    tol = s.tol[dtype_name(dtype)]
    config = LanczosConfig(k=s.k, max_iters=iters, tol=tol, reorth=reorth, seed=s.seed,
                           ncv=ncv if ncv is not None and ncv < iters else None,
                           dtype_compute=basis_dtype,
                           return_eigenvectors=False, record_history=False,
                           measure_orthogonality=n <= MEASURE_ORTHOGONALITY_MAX_N)
    with run.recorder.change():
        case.update(status="running", max_iters=iters, tol_requested=tol)
    run.say(f"ladder {spec.name} {dtype_name(dtype)} {strategy}: max_iters {iters}")
    res = None
    mem: dict[str, Any] = {}
    try:
        with measured(run.device) as mem:
            res = lanczos(op, config=config)
        estimate = lanczos_memory_bytes(n, reorth, dtype, basis_dtype, iters, s.k,
                                        ncv=config.ncv, return_eigenvectors=False)
        updates: dict[str, Any] = {
            "status": "ok",
            "eigenvalues": [float(v) for v in res.eigenvalues],
            "converged": [bool(c) for c in res.converged],
            "all_converged": bool(res.all_converged),
            "residual_norms": [float(r) for r in res.residual_norms],
            "iterations": int(res.iterations), "matvecs": int(res.matvecs),
            "verification_matvecs": int(res.verification_matvecs),
            "seconds": mem["seconds"], "seconds_matvec": float(res.seconds_matvec),
            "seconds_other": float(res.seconds_other),
            "seconds_per_matvec": float(res.seconds_matvec) / max(1, int(res.matvecs)),
            "max_memory_allocated_bytes": mem["max_memory_allocated_bytes"],
            "peak_above_before_bytes": mem["peak_above_before_bytes"],
            "solver_peak_bytes": int(res.peak_memory_bytes),
            "solver_estimate_bytes": estimate["total"],
            "solver_estimate_covers_peak": estimate["total"] >= int(res.peak_memory_bytes),
            "spurious_removed": int(res.spurious_removed),
            "orthogonality_loss": float(res.orthogonality_loss),
            "reorthogonalizations": int(res.reorthogonalizations),
            "rayleigh_ritz": bool(res.rayleigh_ritz), "tol_used": float(res.tol_used),
            "process_eps": float(res.process_eps),
            "operator_accuracy": float(res.operator_accuracy),
            "verified": bool(res.verified),
            "breakdowns": int(res.breakdowns), "notes": notes + list(res.notes),
            "ncv": res.ncv, "restarts": int(res.restarts),
        }
    except Exception as err:
        updates = dict(error_record(err, run.device), notes=notes,
                       seconds=mem.get("seconds"),
                       max_memory_allocated_bytes=mem.get("max_memory_allocated_bytes"))
    res = None
    free(run.device)
    run.recorder.end(case, **updates)
    lam = case.get("eigenvalues") or [None]
    run.say(f"ladder {spec.name} {dtype_name(dtype)} {strategy}: {case['status']} "
            f"λ1={lam[0]} mv={case.get('matvecs')} {case.get('seconds') or 0:.1f} s")


def _agreement(cases: list[dict[str, Any]], spec: LadderSpec, k: int) -> dict[str, Any]:
    """Strategies against the best one that ran; the comparison dtype against each run.

    The tolerance is the cross-check's for the Lanczos methods in the main dtype
    (``METHODS["lanczos-full"].tolerance``).
    """
    main = [c for c in cases if c["dtype"] == dtype_name(spec.dtype) and c["status"] == "ok"]
    ref = next((c for name in STRATEGY_PREFERENCE for c in main if c["strategy"] == name),
               None)
    tol = METHODS["lanczos-full"].tolerance(spec.dtype)
    out: dict[str, Any] = {"tolerance": tol, "reference": ref["strategy"] if ref else None,
                           "strategies": []}
    for c in main:
        if c is ref or ref is None:
            continue
        rel = relative_error(np.asarray(c["eigenvalues"]), np.asarray(ref["eigenvalues"]), k)
        c["rel_diff_vs_reference"] = rel
        out["strategies"].append({
            "strategy": c["strategy"], "rel_error": rel, "agree": rel <= tol,
            "both_converged": bool(c["all_converged"] and ref["all_converged"])})
    if spec.compare_dtype is not None:
        other = next((c for c in cases if c["dtype"] == dtype_name(spec.compare_dtype)
                      and c["status"] == "ok"), None)
        out["dtype_reference"] = (f"{dtype_name(spec.compare_dtype)} {other['strategy']}"
                                  if other else None)
        out["dtype"] = []
        for c in main if other is not None else []:
            rel = relative_error(np.asarray(c["eigenvalues"]), np.asarray(other["eigenvalues"]),
                                 k)
            c["rel_diff_vs_compare_dtype"] = rel
            out["dtype"].append({"strategy": c["strategy"], "rel_error": rel,
                                 "agree": rel <= tol})
    return out


def _ladder_model(run: Run, spec: LadderSpec, rec: dict[str, Any], end_time: float) -> None:
    """Build one model, run its strategies, then the comparison dtype; record everything."""
    s = run.settings
    n_params = count_parameters(spec)
    weight_bytes = n_params * torch.empty(0, dtype=spec.dtype).element_size()
    with run.recorder.change():
        rec.update(n_params=n_params, weights_bytes=weight_bytes)
    n_cases = len(spec.strategies) + (spec.compare_dtype is not None)
    if run.device.type == "cuda" and weight_bytes > 0.9 * torch.cuda.mem_get_info()[1]:
        run.recorder.end(rec, status="skipped: memory",
                         note=f"weights alone need {weight_bytes / GIB:.1f} GiB")
        return
    model = op = data = None
    try:
        run.recorder.begin(rec)
        with measured(run.device) as built:
            model = build_lm(spec, run.device, s.seed)
        vocab = int(model.config.vocab_size)
        data = move(token_data(s.batch, s.seq, vocab, seed=s.seed + 1), run.device)
        with measured(run.device) as made:
            op, note = _make_operator(model, data)
        product = _warm_products(op, run)
        with run.recorder.change():
            rec.update(build_s=built["seconds"], operator_s=made["seconds"],
                       operator_note=note, product={dtype_name(spec.dtype): product},
                       memory_after_build=memory_figures(run.device))
        run.say(f"ladder {spec.name}: {count_text(n_params)} parameters, built in "
                f"{built['seconds']:.1f} s, product {product['cached_s'] * 1e3:.1f} ms")
        done = 0
        for strategy in spec.strategies:
            allot = (end_time - time.monotonic()) / max(1, n_cases - done)
            _lanczos_case(run, spec, rec, op, spec.dtype, strategy, product, allot)
            done += 1
        n = int(op.shape[0])
        op.clear_cache()
        op = None
        free(run.device)
        if spec.compare_dtype is not None:
            _compare_run(run, spec, rec, model, data, n, end_time)
        with run.recorder.change():
            rec.update(status="done", agreement=_agreement(rec["cases"], spec, s.k))
    except Exception as err:
        run.recorder.end(rec, **error_record(err, run.device))
        run.say(f"ladder {spec.name}: {rec['status']} {rec.get('error', '')}")
    finally:
        model = op = data = None
        free(run.device)


def _compare_run(run: Run, spec: LadderSpec, rec: dict[str, Any], model: torch.nn.Module,
                 data: list[Any], n: int, end_time: float) -> None:
    """The comparison dtype on the same (rounded) weights, converted in place."""
    s = run.settings
    assert spec.compare_dtype is not None
    name = dtype_name(spec.compare_dtype)
    if run.device.type == "cuda":
        # Before converting: the weights, the product scaled by the dtype ratio, the solver.
        ratio = (torch.empty(0, dtype=spec.compare_dtype).element_size()
                 / torch.empty(0, dtype=spec.dtype).element_size())
        total = torch.cuda.mem_get_info(run.device)[1]
        product_peak = rec["product"][dtype_name(spec.dtype)]["cached_peak_above_before_bytes"]
        est = lanczos_memory_bytes(n, spec.compare_strategy, spec.compare_dtype,
                                    spec.compare_dtype, spec.max_iters, s.k)
        need = ratio * (rec["weights_bytes"] + product_peak) + est["total"]
        if need > MEMORY_HEADROOM * total:
            with run.recorder.change():
                rec["cases"].append({
                    "model": spec.name, "dtype": name, "strategy": spec.compare_strategy,
                    "n": n, "k": s.k, "status": "skipped: memory",
                    "memory_estimate": dict(est, weights_and_product=ratio * (
                        rec["weights_bytes"] + product_peak), total_device=total),
                    "note": f"{name} needs ~{need / GIB:.1f} GiB of {total / GIB:.1f} GiB"})
            return
    op2 = None
    try:
        model.to(spec.compare_dtype)  # exact: every bf16 value is a float32 value
        op2, note = _make_operator(model, data)
        product = _warm_products(op2, run)
        with run.recorder.change():
            rec["product"][name] = product
            if note:
                rec["operator_note_compare"] = note
        allot = end_time - time.monotonic()
        _lanczos_case(run, spec, rec, op2, spec.compare_dtype, spec.compare_strategy, product,
                      allot)
    except Exception as err:  # converting or the warm-up products failed (e.g. OOM)
        with run.recorder.change():
            rec["cases"].append(dict({"model": spec.name, "dtype": name,
                                      "strategy": spec.compare_strategy, "n": n, "k": s.k},
                                     **error_record(err, run.device)))
    finally:
        if op2 is not None:
            op2.clear_cache()
        op2 = None
        free(run.device)


def run_section(run: Run, section: dict[str, Any], end_time: float) -> None:
    """Every ladder model in turn, each with its weighted share of the time left."""
    specs = run.settings.ladder
    models = section.setdefault("models", [])
    for i, spec in enumerate(specs):
        rec: dict[str, Any] = {"name": spec.name, "family": spec.family, "config": spec.config,
                               "dtype": dtype_name(spec.dtype),
                               "compare_dtype": dtype_name(spec.compare_dtype),
                               "tokens": [run.settings.batch, run.settings.seq], "cases": []}
        with run.recorder.change():
            models.append(rec)
        weights = [t.weight for t in specs[i:]]
        share = (end_time - time.monotonic()) * spec.weight / sum(weights)
        if share < 5.0:
            run.recorder.end(rec, status="skipped: budget", note=f"{share:.0f} s left for it")
            continue
        _ladder_model(run, spec, rec, time.monotonic() + share)
