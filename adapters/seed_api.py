r"""The seed's high-level spectrum API, on curvops operators and the in-house Lanczos.

Four entry points keep the seed's names, signatures, defaults and result keys:

* :func:`compute_fisher_eigenvalues_lanczos` — top eigenvalues of a Fisher-type matrix
  (empirical Fisher, exact GGN = exact Fisher, or MC Fisher);
* :func:`compute_hessian_eigenvalues_lanczos` — eigenvalues of the Hessian, with
  ``has_negative_eigenvalues`` decided from the smallest eigenvalue actually found;
* :func:`compute_spectrum` — the operator chosen by name;
* :func:`compute_spectrum_comparison` — Hessian and Fisher/GGN side by side.

What differs from the seed (and why):

* The operator is the curvature of the loss over *all* the data, with the
  normalisation recorded (``normalization``, ``sample_unit``). Language models
  (transformers models with dict batches) use
  :class:`curvops.linops.hf.LanguageModelObjective`: per-sequence loss = sum of its
  target tokens' cross-entropies, normalised by the number of target tokens.
* Batches too large for memory are split into micro-batches that are accumulated
  (``batch_size_used`` is the micro-batch size); the seed's "reduce the batch size"
  would change the matrix.
* No ``max_iter`` reduction for large models: ``max_iter`` is a hard cap and Lanczos
  stops earlier once the wanted Ritz values have converged (``tol``).
* No regularization by default (the seed added 1e-8 to Fisher); the solver uses
  ``config.regularization`` only as jitter after a failure, and reports it.

Mapping of the seed's switches: ``use_ggn=False`` → empirical Fisher; ``ggn_mode``:
``"empirical"`` → empirical Fisher, ``"true"`` → exact GGN, ``"mc"`` → Monte-Carlo
Fisher, ``"auto"`` → exact GGN for cross-entropy / MSE / BCE (every supported loss).
``config.reorth_period = 0`` → full reorthogonalization, ``> 0`` → selective (unless
``config.reorth`` is given). Function arguments (``k``, ``max_iter``) win over the
config's fields.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ..linops import FisherOperator, select_parameters
from ..linops.checks import check_int, check_real
from ..linops.data import DataSource
from ..linops.distributed import (
    check_process_group,
    collective_step,
    group_size,
    wrapped_module,
)
from ..linops.dtypes import dtype_name
from ..linops.hf import hf_objective, is_hf_model
from ..linops.host_allocator import reuse_freed_memory
from ..linops.memory import MicroBatchPlan, plan_micro_batches
from ..linops.memory_probe import available_memory_bytes
from ..linops.objective import Objective, as_objective
from ..linops.params import model_dtype
from ..linops.registry import OperatorSpec, operator_names, operator_spec
from ..solvers.lanczos import LanczosConfig, LanczosResult, lanczos
from ..solvers.memory_estimate import lanczos_memory_bytes
from ..solvers.metrics import spectrum_metrics

__all__ = [
    "compute_fisher_eigenvalues_lanczos",
    "compute_hessian_eigenvalues_lanczos",
    "compute_spectrum",
    "compute_spectrum_comparison",
    "ggn_mode_of",
]

#: The seed's ``ggn_mode`` -> the operator (a registry name) it selects in place of the GGN;
#: ``"auto"`` is the exact GGN for every supported loss (each has a closed-form GGN).
_GGN_MODE_OPERATOR = {"empirical": "empirical_fisher", "true": "ggn", "mc": "fisher_mc",
                      "auto": "ggn"}
GGN_MODES = tuple(_GGN_MODE_OPERATOR)
#: Every ``operator_type`` accepted: the names of :mod:`curvops.linops.registry` (the seed
#: documents ``"ggn"``, ``"empirical_fisher"``, ``"hessian"`` and ``"fisher"``).
OPERATOR_TYPES = operator_names()
_LARGE_MODEL = 10**9  # where the seed cut max_iter (we do not)
#: Share of the device's free memory a run may use when no ``memory_budget_bytes`` is given.
MEMORY_BUDGET_SHARE = 0.7
#: The strategies tried, in order, when the call names none: full reorthogonalization
#: (its basis grows with the iterations), full with a thick restart (a basis of at most
#: ``ncv`` vectors, :data:`RESTART_NCV` preferred), then none (a constant number of vectors).
_STRATEGY_PREFERENCE = ("full", "restarted", "none")
_STRATEGY_CODE = {"full": 0, "selective": 1, "partial": 2, "none": 3}
#: The basis bound a thick restart prefers: max(2k + 2, 12) vectors (about as few products
#: as an unbounded basis on the GPT-2 GGNs measured, docs/lanczos.md); fewer when only
#: fewer fit, down to k + 2.
RESTART_NCV = 12
#: A thick restart keeps the product cache while at least k + CACHE_FIRST_EXTRA vectors fit
#: beside it; below that, the basis gets the memory and products run fresh.
CACHE_FIRST_EXTRA = 4

# Keyword arguments the entry points accept besides their named ones.
_OPTIONS = {
    "loss_fn": None,  # torch loss or curvops Objective; default: HF objective for dict batches
    "normalization": "token",  # language models: "token" | "sequence" | "sum"
    "params": None,  # parameter selection (objects or names / globs)
    "micro_batch_size": "auto",  # int, None (no split) or "auto" (memory budget)
    "memory_budget_bytes": None,  # the run's budget: solver + product + cache (default: a share
    # of the free memory, MEMORY_BUDGET_SHARE)
    "which": None,  # "LA" | "SA" | "LM" | "BE"; default "LA"
    "tol": None,  # convergence tolerance; default the config's
    "seed": None,  # start vector and MC labels; default the config's (0)
    "reorth": None,  # "full" | "selective" | "partial" | "none"; default the config's (full)
    "ncv": None,  # thick restart's basis bound (reorth="full"); default: the memory plan's
    "dtype_compute": None,  # Krylov-vector dtype; default the model's dtype
    "mc_samples": 1,  # MC Fisher draws per example
    "return_eigenvectors": False,  # keep the Ritz vectors (needed for eigenspace overlap)
    "check_deterministic": True,  # refuse models whose outputs differ between passes
    "progress": False,  # tqdm progress bar (rank 0 only in a distributed run)
    "process_group": None,  # torch.distributed group whose ranks each hold a shard of data
}


# --- argument handling ---------------------------------------------------------------------
def _options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword options with defaults filled in; numbers (numpy scalars too) as Python's."""
    unknown = sorted(set(kwargs) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}; accepted: {sorted(_OPTIONS)}")
    opts = {**_OPTIONS, **kwargs}
    opts["tol"] = check_real("tol", opts["tol"], minimum=0, allow_none=True)
    opts["seed"] = check_int("seed", opts["seed"], allow_none=True)
    opts["mc_samples"] = check_int("mc_samples", opts["mc_samples"], minimum=1)
    opts["memory_budget_bytes"] = check_int(
        "memory_budget_bytes", opts["memory_budget_bytes"], minimum=1, allow_none=True
    )
    if opts["micro_batch_size"] != "auto":
        opts["micro_batch_size"] = check_int(
            "micro_batch_size", opts["micro_batch_size"], minimum=1, allow_none=True
        )
    opts["process_group"] = check_process_group(opts["process_group"])
    return opts


def _config(config: Any) -> LanczosConfig | None:
    """``config`` as a :class:`LanczosConfig`: one as it is, or a dict of its fields.

    Numpy scalars among a dict's values become Python numbers.

    Raises:
        TypeError: For another type, or a dict with keys that are not ``LanczosConfig``
            fields (named in the message).
    """
    if config is None or isinstance(config, LanczosConfig):
        return config
    if isinstance(config, Mapping):
        fields = [f.name for f in dataclasses.fields(LanczosConfig)]
        unknown = [key for key in config if key not in fields]
        if unknown:
            raise TypeError(
                f"config has unknown key(s) {', '.join(map(repr, unknown))}; "
                f"LanczosConfig fields are: {', '.join(fields)}"
            )
        return LanczosConfig(
            **{key: v.item() if isinstance(v, np.generic) else v for key, v in config.items()}
        )
    raise TypeError(
        f"config must be a LanczosConfig or a dict of its fields, got {type(config).__name__}"
    )


def _check_no_dropout_in_train_mode(model: nn.Module) -> None:
    """Refuse active dropout up front: every product would see a different matrix."""
    for name, module in model.named_modules():
        if (
            module.training
            and isinstance(module, nn.modules.dropout._DropoutNd)
            and float(module.p) > 0.0
        ):
            raise ValueError(
                "the model is in train mode with active dropout "
                f"({name or type(module).__name__!r}, p={module.p}); "
                "the curvature would change between products: call model.eval()"
            )


def _is_dict_data(data: Any) -> bool:
    if isinstance(data, Mapping):
        return True
    if isinstance(data, (list, tuple)) and data:
        return isinstance(data[0], Mapping)
    return False


def _objective(model: nn.Module, data: Any, opts: dict[str, Any]) -> Objective:
    loss_fn = opts["loss_fn"]
    if loss_fn is not None:
        if opts["normalization"] != "token" and not isinstance(loss_fn, Objective):
            raise ValueError(
                "normalization= applies to language models; a torch loss's normalisation is its "
                "reduction ('mean' or 'sum')"
            )
        return as_objective(loss_fn)
    if is_hf_model(model):
        return hf_objective(model, opts["normalization"])
    kind = "dict batches" if _is_dict_data(data) else "(inputs, targets) batches"
    raise TypeError(
        f"no loss_fn given and {type(model).__name__} is not a transformers model; for "
        f"{kind} pass loss_fn= (nn.CrossEntropyLoss(), nn.MSELoss(), nn.BCEWithLogitsLoss() "
        "or a curvops Objective)"
    )


def _check_ggn_mode(ggn_mode: str | None) -> None:
    if ggn_mode is not None and ggn_mode not in GGN_MODES:
        raise ValueError(f"ggn_mode must be one of {GGN_MODES}, got {ggn_mode!r}")


def _operator_spec(operator_type: str, ggn_mode: str | None) -> OperatorSpec:
    """The operator an ``operator_type`` (a registry name) and a ``ggn_mode`` select.

    ``ggn_mode`` picks among the GGN's relatives only when ``operator_type`` names the GGN
    (``"ggn"``, ``"fisher"``); every other name selects its own operator.
    """
    spec = operator_spec(operator_type, argument="operator_type")
    _check_ggn_mode(ggn_mode)
    if spec.name == "ggn" and ggn_mode is not None:
        return operator_spec(_GGN_MODE_OPERATOR[ggn_mode])
    return spec


def ggn_mode_of(operator: str) -> str:
    """The ``ggn_mode`` with which :func:`compute_fisher_eigenvalues_lanczos` computes
    ``operator`` (a name of :mod:`curvops.linops.registry`): ``"ef"`` -> ``"empirical"``.

    Raises:
        ValueError: For an unknown name, or the Hessian (it has its own entry point).
    """
    name = operator_spec(operator).name
    for mode, target in _GGN_MODE_OPERATOR.items():
        if target == name:
            return mode
    raise ValueError(
        f"no ggn_mode selects {operator!r}; use compute_hessian_eigenvalues_lanczos"
    )


def _lanczos_config(
    config: LanczosConfig | None,
    *,
    k: int,
    max_iter: int | None,
    op_dtype: torch.dtype,
    opts: dict[str, Any],
    which: str,
) -> LanczosConfig:
    """The solver settings: config fields, overridden by the function's arguments."""
    if config is not None and not isinstance(config, LanczosConfig):
        raise TypeError(f"config must be a LanczosConfig, got {type(config).__name__}")
    dtype_compute = opts["dtype_compute"]
    if dtype_compute is None and config is not None:
        dtype_compute = config.dtype_compute
    if dtype_compute is None:
        dtype_compute = op_dtype  # the seed keeps bf16 Krylov vectors for bf16 models
    # Without a config, LanczosConfig()'s full reorthogonalization, for every operator: it
    # keeps the same basis as selective (the others that keep one save no memory), its Ritz
    # vectors pass the true-residual check at the operator's own accuracy where
    # semi-orthogonal ones may not, and it has the Rayleigh-Ritz recovery of a bf16 basis.
    base = LanczosConfig() if config is None else config
    changes: dict[str, Any] = {"k": k, "which": which, "dtype_compute": dtype_compute}
    if max_iter is not None:
        changes["max_iters"] = max_iter
    for name in ("tol", "seed", "reorth", "ncv"):
        if opts[name] is not None:
            changes[name] = opts[name]
    changes["return_eigenvectors"] = bool(opts["return_eigenvectors"])
    changes["progress"] = bool(opts["progress"])
    return dataclasses.replace(base, **changes)


# --- the shared pipeline -------------------------------------------------------------------
def _prepare(
    model: nn.Module, data: Any, op_cls: type, op_kwargs: dict[str, Any], k: int,
    opts: dict[str, Any],
) -> tuple[int, Objective]:
    """Cheap checks before any forward pass (``model``: the module a DDP wrapper wraps).

    Returns:
        The number of selected parameters and the objective.
    """
    _, tensors = select_parameters(model, opts["params"])
    n = sum(t.numel() for t in tensors)
    if k >= n:
        raise ValueError(f"k={k} must be smaller than the number of selected parameters n={n}")
    _check_no_dropout_in_train_mode(model)
    DataSource(data)  # refuses one-shot generators and empty collections early
    return n, _objective(model, data, opts)


def _plan_memory(
    model: nn.Module, data: Any, op_cls: type, op_kwargs: dict[str, Any], objective: Objective,
    n: int, cfg: LanczosConfig, strategy_given: bool, opts: dict[str, Any],
) -> tuple[LanczosConfig, int | None, Any, dict[str, Any]]:
    r"""Choose the solver strategy and the micro-batch size that fit the run's memory budget.

    The budget :math:`B` (``memory_budget_bytes``, else :data:`MEMORY_BUDGET_SHARE` of the
    device's free memory) is what the run may add to the memory in use when it starts
    (the model, its data). It covers the solver's own tensors :math:`S` (estimated by
    :func:`~curvops.solvers.memory_estimate.lanczos_memory_bytes` for ``max_iter``
    iterations), one product and the product cache, all measured by the micro-batch
    plan's probe: the first product's peak :math:`P` (the building of its micro-batch's
    cache state :math:`H` included), the state itself and a cached product's peak
    :math:`P_c`. The whole cache :math:`C` (every micro-batch's state) fits when both
    :math:`S_1 + C + (P - H) \le B` (the first product, which builds it, beside what the
    solver holds then: all of :math:`S` on CUDA; on CPU the start vector and the first
    basis row, the other rows taking memory as they are written) and
    :math:`S + C + P_c \le B` (every later product). The strategy the call
    names is kept; otherwise, in order, the first that leaves :math:`B - S` room for a
    product of at least one example: full reorthogonalization; full with a thick restart
    (a float32/float64 basis only), its basis bounded by the largest ``ncv`` from
    ``max(2k + 2, RESTART_NCV)`` down whose estimate fits beside the cache while at least
    ``k + CACHE_FIRST_EXTRA`` vectors do, else beside a fresh product down to ``k + 2``;
    ``none``. A strategy that cannot fit raises before any product.

    Returns:
        The settings (strategy and ``ncv`` possibly changed), the micro-batch size, the
        plan (None unless ``micro_batch_size="auto"``) and the ``metadata["memory"]``
        record.

    Raises:
        MemoryError: When no allowed strategy leaves room for a one-example product.
    """
    device = next(iter(model.parameters())).device
    budget = opts["memory_budget_bytes"]
    source = "memory_budget_bytes"
    if budget is None:
        free = available_memory_bytes(device)
        budget = int(MEMORY_BUDGET_SHARE * free) if free > 0 else None
        source = f"{MEMORY_BUDGET_SHARE:g} of the free memory ({free} bytes)"
    mbs = opts["micro_batch_size"]
    op_dtype = model_dtype(model)

    def estimate(strategy: str, ncv: int | None, part: str = "total") -> int:
        return lanczos_memory_bytes(n, strategy, op_dtype, cfg.dtype_compute, cfg.max_iters,
                                    cfg.k, ncv=ncv,
                                    return_eigenvectors=cfg.return_eigenvectors)[part]

    # What a thick restart holds at its first product: on CPU the basis's rows take memory
    # only as they are written; CUDA allocates the whole basis at once.
    at_first = "total" if device.type == "cuda" else "at_first_product"
    # A thick restart's recurrence writes its products into its residual buffer (the
    # operator's own dtype, one process): they allocate no output vector. Its verification
    # then needs that buffer (the residual is part of each pair's prediction): a verified
    # run's peak is a verification product with its own output beside the whole basis.
    into = (cfg.dtype_compute == op_dtype and opts["process_group"] is None
            and not cfg.verify)

    # (label, strategy, ncv) in order of preference; a thick restart's ncv is sized after
    # its product (None until then): micro-batches would slow every product, a smaller
    # basis costs only a few more of them.
    why: list[str] = []
    preferred = min(max(2 * cfg.k + 2, RESTART_NCV), n)
    if strategy_given:
        candidates = [(cfg.strategy, cfg.strategy, cfg.ncv)]
    else:
        candidates = [("full", "full", None)]
        if cfg.dtype_compute not in (torch.float32, torch.float64):
            why.append(f"no thick restart: its basis must be float32/float64, not "
                       f"{cfg.dtype_compute}")
        elif preferred < min(cfg.max_iters, n):
            candidates.append((f"full, ncv={preferred}", "full", "restart"))
        candidates.append(("none", "none", None))
    estimates = {label: estimate(strategy, preferred if ncv == "restart" else ncv)
                 for label, strategy, ncv in candidates}
    record: dict[str, Any] = {"budget_bytes": budget, "budget_from": source,
                              "solver_estimate_bytes": estimates}
    plan = None
    cache_total = 0.0
    for label, strategy, ncv in candidates:
        # A restart is tried with its smallest basis first; the basis then takes what the
        # product leaves.
        need = estimate(strategy, cfg.k + 2) if ncv == "restart" else estimates[label]
        rest = None if budget is None else budget - need
        if rest is not None and rest <= 0:
            why.append(f"reorth={label!r} needs {need / 2**30:.2f} GiB for "
                       f"max_iter={cfg.max_iters}, over the budget")
            continue
        if mbs == "auto":
            try:
                plan = plan_micro_batches(op_cls, model, objective, data, opts["params"],
                                          memory_budget_bytes=rest, operator_kwargs=op_kwargs)
            except MemoryError as err:
                why.append(f"reorth={label!r}: {err}")
                continue
            cache_total = _cache_total(plan, objective, data)
        if ncv == "restart":
            ncv, cached = _restart_size(plan, budget, rest, cache_total, preferred, cfg.k,
                                        lambda c: estimate("full", c),
                                        lambda c: estimate("full", c, at_first), into)
            if ncv != preferred or not cached:
                why.append(f"reorth={label!r} needs {estimates[label] / 2**30:.2f} GiB with "
                           "its product" + (" and cache" if cached else "") + ", over the "
                           "budget" + ("" if cached else "; no room for the product cache "
                                       f"with at least {cfg.k + CACHE_FIRST_EXTRA} vectors"))
                label = f"full, ncv={ncv}"
                estimates[label] = estimate("full", ncv)
        chosen = (label, strategy, ncv)
        break
    else:
        raise MemoryError(
            "no solver strategy fits the memory budget of "
            f"{budget / 2**30:.2f} GiB ({source}): " + "; ".join(why)
            + ". Lower max_iter, pass a smaller ncv (at least k + 2) or reorth='none', a bf16 "
            "dtype_compute, or a larger memory_budget_bytes"
        )
    label, strategy, ncv = chosen
    if mbs == "auto":
        mbs = plan.micro_batch_size
    record["strategy"] = strategy
    record["ncv"] = ncv
    record["strategy_from"] = "argument" if strategy_given else "memory budget"
    if why:
        record["rejected"] = why
    if plan is not None:
        record["product_peak_bytes"] = int(plan.product_bytes())
        record["cached_product_peak_bytes"] = int(plan.cached_product_bytes())
        record["cache_estimate_bytes"] = int(cache_total)
    if budget is not None:
        rest = budget - estimates[label]
        restarted = strategy == "full" and ncv is not None
        record["cache_budget_bytes"] = max(
            int(rest - _cached_product_bytes(plan, rest, into and restarted)), 0)
    if (strategy, ncv) != (cfg.strategy, cfg.ncv):
        cfg = dataclasses.replace(cfg, reorth=strategy, ncv=ncv)
    return cfg, mbs, plan, record


def _cache_total(plan: MicroBatchPlan, objective: Objective, data: Any) -> float:
    """The product cache of the whole data: every micro-batch's measured state."""
    total = 0.0
    for batch in DataSource(data):
        examples = objective.count(batch).examples
        full, part = divmod(examples, plan.batch_size_used)
        total += full * plan.held_bytes() + (plan.held_bytes(part) if part else 0.0)
    return total


def _cached_product_bytes(plan: MicroBatchPlan | None, rest: float, into: bool) -> float:
    """A cached product's memory beside the cache (measured by the plan's probe; ``into``:
    written into the solver's buffer); half of what is left when nothing was measured."""
    if plan is None:
        return rest / 2
    return plan.cached_product_bytes(into=into)


def _restart_size(
    plan: MicroBatchPlan | None, budget: int | None, rest: float | None, cache_total: float,
    preferred: int, k: int, solver_bytes: Callable[[int], int],
    solver_bytes_at_first: Callable[[int], int], into: bool = False,
) -> tuple[int, bool]:
    """The thick restart's ``ncv`` and whether the product cache fits beside it.

    With the cache, two moments must fit: the first product, which builds the cache
    (every micro-batch's state, and the peak of the last one's building beyond its state)
    beside what the solver holds then (``solver_bytes_at_first``), and every later product
    (the cache and a cached product's peak) beside the whole basis (``solver_bytes``). The
    cache comes first while at least ``k + CACHE_FIRST_EXTRA`` vectors fit beside it (a
    cached product costs about two thirds of a fresh one on the GPT-2 GGNs measured, where
    each vector below that adds a tenth or more products); else the largest basis that
    fits with fresh products. A basis never goes below ``k + 2``. ``into``: the products
    are written into the solver's residual buffer (part of ``solver_bytes``), so they
    allocate no output vector of their own.
    """
    if budget is None:
        return preferred, True
    sizes = range(preferred, k + 1, -1)
    if plan is not None:
        steady = _cached_product_bytes(plan, 0.0, into) + cache_total
        building = max(plan.product_bytes(into=into) - plan.held_bytes(), 0.0) + cache_total
        for c in sizes:
            if (c >= k + CACHE_FIRST_EXTRA and solver_bytes(c) + steady <= budget
                    and solver_bytes_at_first(c) + building <= budget):
                return c, True
        fresh = plan.product_bytes(into=into)
    else:
        fresh = rest / 2
    return next((c for c in sizes if solver_bytes(c) + fresh <= budget), k + 2), False


def _spectrum(
    model: nn.Module,
    data: Any,
    *,
    operator_type: str,
    ggn_mode: str | None,
    k: int,
    max_iter: int | None,
    config: LanczosConfig | None,
    opts: dict[str, Any],
) -> tuple[dict[str, Any], Any, LanczosResult]:
    """Build the operator, run Lanczos, and assemble the seed's result dict."""
    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    k = check_int("k", k, minimum=1)
    max_iter = check_int("max_iter", max_iter, minimum=1, allow_none=True)
    spec = _operator_spec(operator_type, ggn_mode)
    op_cls, op_kwargs, operator_used = spec.cls, dict(spec.kwargs), spec.name
    which = opts["which"] or (config.which if config is not None else "LA")
    if op_cls is FisherOperator:
        op_kwargs = {**op_kwargs, "mc_samples": opts["mc_samples"]}
        if opts["seed"] is not None:
            op_kwargs["seed"] = opts["seed"]
        elif config is not None:
            op_kwargs["seed"] = int(config.seed)

    group = opts["process_group"]
    inner = wrapped_module(model)
    cfg = _lanczos_config(
        config, k=k, max_iter=max_iter, op_dtype=model_dtype(inner), opts=opts, which=which,
    )
    strategy_given = (opts["reorth"] is not None or opts["ncv"] is not None
                      or config is not None)
    # Each rank plans for its own shard; a rank that fails here tells the others.
    on_cpu = next(iter(inner.parameters())).device.type == "cpu"
    with collective_step(group, torch.device("cpu"), "the checks and the memory plan"):
        n, objective = _prepare(inner, data, op_cls, op_kwargs, k, opts)
        t_plan = time.perf_counter()
        # The probes' products reuse each other's freed memory, as the run's do (the
        # measurements count torch's allocations, not pages: they do not change).
        with reuse_freed_memory(on_cpu and cfg.reuse_freed_memory):
            cfg, mbs, plan, memory = _plan_memory(inner, data, op_cls, op_kwargs, objective,
                                                  n, cfg, strategy_given, opts)
        t_plan = time.perf_counter() - t_plan
    # The ranks may plan different micro-batches (their shards differ), never different
    # solvers: the strategy must be the same on every rank.
    with collective_step(group, torch.device("cpu"), "the memory plan",
                         [_STRATEGY_CODE[cfg.strategy], cfg.ncv or 0],
                         "the solver strategy (the ranks' memory budgets differ: pass reorth)"):
        pass
    t_build = time.perf_counter()
    op = op_cls(
        model, objective, data, opts["params"],
        micro_batch_size=mbs, check_deterministic=opts["check_deterministic"],
        process_group=group, cache_budget_bytes=memory.get("cache_budget_bytes"),
        **op_kwargs,
    )
    t_build = time.perf_counter() - t_build
    res = lanczos(op, k, config=cfg)
    memory.update({
        "solver_peak_bytes": int(res.peak_memory_bytes),
        "operator_cache_bytes": int(op.cache_bytes),
        "process_peak_bytes": int(res.process_peak_bytes),
        "process_peak_measured_as": ("cuda max_memory_allocated above the start"
                                     if op.device.type == "cuda"
                                     else "sampled resident set size above the start"),
    })

    batch_sizes = [objective.count(b).examples for b in op.data]
    full_batch = max(batch_sizes)
    batch_size_used = full_batch if mbs is None else min(mbs, full_batch)
    eigs = np.asarray(res.eigenvalues, dtype=np.float64)
    metrics = spectrum_metrics(
        eigs, is_psd=op.is_psd, dtype_eps=float(torch.finfo(op.dtype).eps)
    )
    notes = [str(metrics["note"])]
    if not res.all_converged:
        notes.append(
            f"{int(np.sum(~res.converged))} of {eigs.size} Ritz values had not converged to "
            f"tol={cfg.tol:g} within max_iter={cfg.max_iters}: increase max_iter"
        )
    if n > _LARGE_MODEL:
        notes.append(
            "max_iter is not reduced for models over 1e9 parameters (that would change the "
            "result); Lanczos stops early once the wanted values have converged (tol)"
        )
    if memory["strategy_from"] == "memory budget" and (memory["strategy"] != "full"
                                                       or memory["ncv"] is not None):
        chosen = (f"reorth='full' with a thick restart (ncv={memory['ncv']})"
                  if memory["ncv"] is not None else f"reorth={memory['strategy']!r}")
        notes.append(
            f"{chosen} chosen to fit the memory budget "
            f"({memory['budget_bytes'] / 2**30:.2f} GiB, {memory['budget_from']}): "
            + "; ".join(memory.get("rejected", []))
        )
    if operator_used == "ggn" and operator_type == "fisher":
        notes.append("exact Fisher = GGN for this loss")
    if res.rayleigh_ritz:
        notes.append("eigenvalues refined by Rayleigh–Ritz on the low-precision Krylov basis")
    notes.extend(res.notes)
    result: dict[str, Any] = {
        "top_eigenvalues": [float(x) for x in eigs],
        "max_eigenvalue": metrics["max_eigenvalue"],
        "min_computed_eigenvalue": metrics["min_computed_eigenvalue"],
        "condition_number": metrics["condition_number"],
        "effective_rank": metrics["effective_rank"],
        "spectral_gap": metrics["spectral_gap"],
        "spectral_range": metrics["spectral_range"],
        "lanczos_iterations": int(res.iterations),
        "k_requested": k,
        "k_computed": int(eigs.size),
        "batch_size_used": int(batch_size_used),
        "operator_used": operator_used,
        "is_psd": bool(op.is_psd),
        "note": "; ".join(notes),
    }
    result["metadata"] = {
        "which": res.which,
        "converged": [bool(c) for c in res.converged],
        "k_converged": int(np.sum(res.converged)),
        "residual_norms": [float(r) for r in res.residual_norms],
        "sample_unit": objective.sample_unit,
        "normalization": objective.normalization,
        "normalizer": float(op.normalizer),
        "num_examples": int(op.total.examples),
        "num_loss_terms": int(op.total.terms),
        "ranks": group_size(group),
        "rank_examples": int(op.local_total.examples),
        "micro_batch_size": mbs,
        "micro_batch_plan": None if plan is None else plan.as_dict(),
        "memory": memory,
        "n_params": int(n),
        "dtype": dtype_name(op.dtype),
        "dtype_compute": dtype_name(cfg.dtype_compute),
        "seed": int(cfg.seed),
        "tol": float(cfg.tol),
        "max_iter": int(cfg.max_iters),
        "reorth": res.strategy,
        "ncv": res.ncv,
        "restarts": int(res.restarts),
        "operator_accuracy": float(res.operator_accuracy),
        "tol_used": float(res.tol_used),
        "rayleigh_ritz": bool(res.rayleigh_ritz),
        "regularization_used": float(res.regularization_used),
        "spurious_removed": int(res.spurious_removed),
        "orthogonality_loss": float(res.orthogonality_loss),
        "matvecs": int(res.matvecs),
        "time": time.perf_counter() - t0,
        "time_matvec": float(res.seconds_matvec),
        # Where the rest went: the memory plan's probes, building the operator (its checks),
        # and the solver's own work (basis passes, restarts, verification arithmetic).
        "time_memory_plan": float(t_plan),
        "time_operator_build": float(t_build),
        "time_solver_other": float(res.seconds_other),
        "solver_peak_memory_bytes": int(res.peak_memory_bytes),
    }
    if op_cls is FisherOperator:
        result["metadata"]["mc_samples"] = int(op.mc_samples)
        result["metadata"]["mc_seed"] = int(op.seed)
    if res.eigenvectors is not None:
        result["eigenvectors"] = res.eigenvectors
    return result, op, res


def _smallest_eigenvalue(op: Any, res: LanczosResult, cfg_opts: dict[str, Any],
                         config: LanczosConfig | None, max_iter: int | None) -> dict[str, Any]:
    """The smallest eigenvalue: from ``res`` if it reached that end, else a run with ``SA``.

    A value counts as negative when it is certainly below zero: ``θ + r < 0`` with ``r``
    its residual norm (for symmetric matrices an eigenvalue lies within ``r`` of ``θ``),
    beyond round-off of the operator's dtype.
    """
    eigs = np.asarray(res.eigenvalues, dtype=np.float64)
    resid = np.asarray(res.residual_norms, dtype=np.float64)
    if res.which in ("SA", "BE") and eigs.size:
        i = int(np.argmin(eigs))
        theta, r, extra = float(eigs[i]), float(resid[i]), 0
    else:
        cfg = _lanczos_config(
            config, k=1, max_iter=max_iter, op_dtype=op.dtype,
            opts={**cfg_opts, "return_eigenvectors": False}, which="SA",
        )
        low = lanczos(op, 1, config=cfg)
        theta, r, extra = float(low.eigenvalues[0]), float(low.residual_norms[0]), low.matvecs
        if eigs.size and float(eigs.min()) < theta:  # the first run may already be lower
            i = int(np.argmin(eigs))
            theta, r = float(eigs[i]), float(resid[i])
    scale = float(np.abs(eigs).max()) if eigs.size else abs(theta)
    roundoff = math.sqrt(op.shape[0]) * float(torch.finfo(op.dtype).eps) * scale
    return {
        "smallest_eigenvalue": theta,
        "smallest_eigenvalue_residual": r,
        "has_negative_eigenvalues": bool(theta + r < -roundoff),
        "extra_matvecs": int(extra),
    }


# --- public entry points ---------------------------------------------------------------------
def compute_fisher_eigenvalues_lanczos(
    model: nn.Module,
    data_batch: Any,
    k: int = 5,
    max_iter: int = 20,
    use_ggn: bool = True,
    ggn_mode: str = "empirical",
    config: LanczosConfig | Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    r"""Top eigenvalues of a Fisher-type matrix by Lanczos (the seed's entry point).

    With :math:`L = c\sum_n \ell_n`: the empirical Fisher :math:`c\sum_n \nabla\ell_n
    \nabla\ell_n^\top` (``use_ggn=False`` or ``ggn_mode="empirical"``, the seed's default),
    the GGN :math:`c\sum_r J_r^\top H_r J_r` = exact Fisher (``"true"``, ``"auto"``) or the
    MC Fisher with labels sampled once per example (``"mc"``).

    Args:
        model: A ``torch.nn.Module`` (in eval mode) — a transformers model with dict
            batches, or any module with ``(inputs, targets)`` batches and ``loss_fn=``.
        data_batch: One batch, or a re-iterable of batches (list, DataLoader, callable).
        k: Number of eigenvalues.
        max_iter: Hard cap on Lanczos iterations (stops earlier once converged).
        use_ggn: ``False`` selects the empirical Fisher whatever ``ggn_mode`` says.
        ggn_mode: ``"empirical"``, ``"true"``, ``"mc"`` or ``"auto"``.
        config: A :class:`LanczosConfig` or a dict of its fields (unknown keys raise
            ``TypeError``); ``k`` and ``max_iter`` arguments win over its fields.
        **kwargs: ``loss_fn``, ``normalization`` (``"token"`` | ``"sequence"`` | ``"sum"``),
            ``params``, ``micro_batch_size`` (int, None or ``"auto"``), ``memory_budget_bytes``,
            ``which``, ``tol``, ``seed``, ``reorth``, ``dtype_compute``, ``mc_samples``,
            ``return_eigenvectors``, ``check_deterministic``, ``progress``.

    Returns:
        The seed's keys (``top_eigenvalues``, ``max_eigenvalue``, ``min_computed_eigenvalue``,
        ``condition_number``, ``effective_rank``, ``spectral_gap``, ``spectral_range``,
        ``lanczos_iterations``, ``k_requested``, ``k_computed``, ``batch_size_used``,
        ``operator_used``, ``is_psd``, ``note``) plus metadata (``sample_unit``,
        ``normalization``, ``dtype``, ``seed``, ``reorth``, ``matvecs``, ``time``, ...).

    Raises:
        ValueError: k >= n, an unknown ggn_mode, empty data, bad batches, active dropout.
        TypeError: Unknown keyword arguments, a plain module without ``loss_fn``.
    """
    _check_ggn_mode(ggn_mode)
    config = _config(config)
    opts = _options(kwargs)
    mode = "empirical" if not use_ggn else ggn_mode
    result, _, _ = _spectrum(
        model, data_batch, operator_type="ggn", ggn_mode=mode, k=k, max_iter=max_iter,
        config=config, opts=opts,
    )
    result["metadata"]["ggn_mode"] = mode
    return result


def compute_hessian_eigenvalues_lanczos(
    model: nn.Module,
    data_batch: Any,
    k: int = 5,
    max_iter: int = 20,
    config: LanczosConfig | Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    r"""Eigenvalues of the Hessian :math:`\nabla^2 L` by Lanczos.

    ``top_eigenvalues`` are the ``k`` largest algebraic eigenvalues (``which="LA"``)
    unless ``which=`` says otherwise. ``has_negative_eigenvalues`` comes from the smallest
    eigenvalue found — by a second Lanczos run from the other end (``which="SA"``, one
    value) when the first run did not reach it — and is True only when that eigenvalue
    is certainly negative (Ritz value plus residual norm below zero).

    Args:
        model: The model (see :func:`compute_fisher_eigenvalues_lanczos`).
        data_batch: One batch or a re-iterable of batches.
        k: Number of eigenvalues.
        max_iter: Hard cap on Lanczos iterations (per run).
        config: A :class:`LanczosConfig` or a dict of its fields; ``k`` and ``max_iter`` win
            over its fields.
        **kwargs: As for :func:`compute_fisher_eigenvalues_lanczos`.

    Returns:
        The seed's keys plus ``has_negative_eigenvalues``, ``smallest_eigenvalue`` and its
        residual, and the metadata.
    """
    config = _config(config)
    opts = _options(kwargs)
    result, op, res = _spectrum(
        model, data_batch, operator_type="hessian", ggn_mode=None, k=k, max_iter=max_iter,
        config=config, opts=opts,
    )
    low = _smallest_eigenvalue(op, res, opts, config, max_iter)
    result["smallest_eigenvalue"] = low["smallest_eigenvalue"]
    result["metadata"]["smallest_eigenvalue_residual"] = low["smallest_eigenvalue_residual"]
    result["has_negative_eigenvalues"] = low["has_negative_eigenvalues"]
    result["metadata"]["matvecs"] += low["extra_matvecs"]
    return result


def compute_spectrum(
    model: nn.Module,
    batch: Any,
    operator_type: str = "ggn",
    config: LanczosConfig | Mapping[str, Any] | None = None,
    ggn_mode: str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Eigenvalues of the operator named by ``operator_type`` (the seed's unified entry).

    ``operator_type``: ``"ggn"`` (exact GGN; ``ggn_mode`` may pick ``"empirical"`` or
    ``"mc"`` instead, as in :func:`compute_fisher_eigenvalues_lanczos`), ``"fisher"``
    (exact Fisher = GGN, or MC with ``ggn_mode="mc"``), ``"empirical_fisher"`` or
    ``"hessian"``; the other names of :mod:`curvops.linops.registry` (``"ef"``,
    ``"fisher_mc"``) work too. ``k`` and ``max_iters`` come from ``config`` (default
    :class:`LanczosConfig` values, ``k=5``).

    Args:
        model: The model.
        batch: One batch or a re-iterable of batches.
        operator_type: Which operator.
        config: Solver settings: a :class:`LanczosConfig` or a dict of its fields.
        ggn_mode: ``None`` (exact), ``"empirical"``, ``"true"``, ``"mc"`` or ``"auto"``.
        **kwargs: As for :func:`compute_fisher_eigenvalues_lanczos`, plus ``k`` and
            ``max_iter`` (which win over the config's).

    Returns:
        The seed's result dict (Hessian: with ``has_negative_eigenvalues``).
    """
    config = _config(config)
    defaults = config if config is not None else LanczosConfig()
    k = kwargs.pop("k", defaults.k)
    max_iter = kwargs.pop("max_iter", defaults.max_iters)
    if operator_spec(operator_type, argument="operator_type").name == "hessian":
        if ggn_mode is not None:
            raise ValueError("ggn_mode does not apply to operator_type='hessian'")
        return compute_hessian_eigenvalues_lanczos(
            model, batch, k=k, max_iter=max_iter, config=config, **kwargs
        )
    opts = _options(kwargs)
    result, _, _ = _spectrum(
        model, batch, operator_type=operator_type, ggn_mode=ggn_mode, k=k, max_iter=max_iter,
        config=config, opts=opts,
    )
    return result


def _eigenspace_overlap(U: torch.Tensor, W: torch.Tensor) -> float:
    r""":math:`\|U^\top W\|_F^2 / \min(k_U, k_W)`: 1 for equal spans, 0 for orthogonal ones."""
    U64, W64 = U.detach().double().cpu(), W.detach().double().cpu()
    return float((U64.T @ W64).pow(2).sum() / min(U64.shape[1], W64.shape[1]))


def compute_spectrum_comparison(
    model: nn.Module,
    data_batch: Any,
    k: int = 10,
    ggn_mode: str = "auto",
    **kwargs: Any,
) -> dict[str, Any]:
    """Hessian and Fisher/GGN spectra side by side (the seed's comparison).

    Args:
        model: The model.
        data_batch: One batch or a re-iterable of batches.
        k: Eigenvalues of each operator.
        ggn_mode: The Fisher side's mode (``"auto"`` = exact GGN).
        **kwargs: As for :func:`compute_fisher_eigenvalues_lanczos`, plus ``max_iter``
            (default 20) and ``config``. With ``return_eigenvectors=True`` the comparison
            includes the overlap of the two top-k eigenspaces.

    Returns:
        ``{"hessian": ..., "fisher_ggn": ..., "comparison": {...}}`` where the comparison
        holds ``hessian_has_negative``, ``fisher_condition``, both top eigenvalues, their
        ratio and (with eigenvectors) ``top_eigenspace_overlap``.
    """
    max_iter = kwargs.pop("max_iter", 20)
    config = kwargs.pop("config", None)
    hess = compute_hessian_eigenvalues_lanczos(
        model, data_batch, k=k, max_iter=max_iter, config=config, **kwargs
    )
    fisher = compute_fisher_eigenvalues_lanczos(
        model, data_batch, k=k, max_iter=max_iter, ggn_mode=ggn_mode, config=config, **kwargs
    )
    h_max, f_max = hess["max_eigenvalue"], fisher["max_eigenvalue"]
    comparison: dict[str, Any] = {
        "hessian_has_negative": hess["has_negative_eigenvalues"],
        "hessian_smallest_eigenvalue": hess["smallest_eigenvalue"],
        "fisher_condition": fisher["condition_number"],
        "hessian_max_eigenvalue": h_max,
        "fisher_max_eigenvalue": f_max,
        "max_eigenvalue_ratio": h_max / f_max if f_max != 0 else float("nan"),
        "fisher_operator": fisher["operator_used"],
    }
    if "eigenvectors" in hess and "eigenvectors" in fisher:
        comparison["top_eigenspace_overlap"] = _eigenspace_overlap(
            hess["eigenvectors"], fisher["eigenvectors"]
        )
    return {"hessian": hess, "fisher_ggn": fisher, "comparison": comparison}
