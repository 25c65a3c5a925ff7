r"""Benchmark: does ``torch.compile`` speed up curvature products, and do compiled products agree?

Models and data are those of :mod:`curvops.validation.bench_products` (the MLP
784-256-256-10 on a batch of 256, and the 2-layer, 64-wide GPT-like language model on
8 x 64 tokens; cross-entropy, mean). Every *variant* is one way to compute a
Hessian-vector or GGN-vector product ``v -> A v`` on flat vectors:

* ``hvp_double_backward``: ``torch.autograd.grad(create_graph=True)``, then the grad of
  ``<g, v>`` (reverse over reverse, plain autograd);
* ``hvp_func_fwd_over_rev``: ``torch.func.jvp(torch.func.grad(loss_of_params), ...)``;
* ``hvp_func_rev_over_rev``: ``torch.func.vjp(torch.func.grad(loss_of_params), ...)``;
* ``ggn_double_vjp``: the double-vjp trick with plain autograd (``Jv`` as the grad of
  ``Jᵀu`` w.r.t. ``u``), the closed-form softmax cross-entropy Hessian, one ``Jᵀ`` backward;
* ``ggn_double_vjp_leaf``: the same with the dummy cotangent ``u`` created once outside the
  product (dynamo breaks the graph at a tensor created with ``requires_grad=True``);
* ``ggn_double_vjp_func``: the same with ``torch.func.vjp`` only;
* ``ggn_forward_mode``: ``Jv`` from dual parameters (``torch.autograd.forward_ad``), then one
  backward (what curvops' uncached single-vector GGN product does);
* ``ggn_func_jvp_vjp``: ``Jv`` by ``torch.func.jvp`` over ``functional_call``, then
  ``torch.func.vjp`` (two forward passes);
* ``curvops_{ggn,hessian}_{auto,none}``: the curvops operators (``cache="auto"`` with the
  cache built by the first product, and ``cache="none"``); "compiled" means the operator is
  built on ``torch.compile(model)`` instead of the model (no library file changes).

For the plain/func variants "compiled" means ``torch.compile(product_fn, mode=...)`` of the
whole product function. ``--modes`` adds ``mode="reduce-overhead"``,
``mode="max-autotune-no-cudagraphs"``, ``compiled_autograd`` (``torch._dynamo.config.
compiled_autograd = True`` around the compiled function) and ``trace_autograd_ops``
(``torch._dynamo.config.trace_autograd_ops = True``: dynamo traces ``torch.autograd.grad``
calls instead of breaking the graph there).

Each (model, variant, mode, dtype) job runs in its own subprocess with a time limit
(``--timeout``, default 240 s) and a fresh, empty inductor cache directory, so the first
call's time is the true compile time and a hang cannot stall the run. In the job:

1. the reference is the eager curvops product (``GGNOperator`` / ``HessianOperator`` with
   ``cache="none"``) of the same ``v``; relative errors ``|Av - ref| / |ref|`` are reported
   for the eager and the compiled variant (bar: 1e-6 in float32, 1e-10 in float64);
2. the compiled product's first call is timed (compile time; for curvops rows it includes
   building the operator), a compile error is recorded by its first line;
3. steady state: after two warm-up calls each, ``--rounds`` (default 11) interleaved rounds
   in a new seeded order time a gradient pass, the eager and the compiled product; the
   table gives medians of ``compiled / eager`` (per round, back to back in one process)
   and of each product divided by the gradient pass.

Float64 jobs (``--float64``) check agreement only (compile + error, a few timed calls).

Run (thread settings are recorded in the JSON)::

    OMP_NUM_THREADS=2 python -m curvops.validation.bench_compile            # all variants
    python -m curvops.validation.bench_compile --variants hvp_func_fwd_over_rev --modes
    python -m curvops.validation.bench_compile --float64 --append           # add float64 rows

Results go to ``validation/results/bench_compile.json`` and a Markdown table beside it
(``bench_compile.md``); ``--append`` merges new jobs into an existing JSON (same key
replaced).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn

RESULTS = Path(__file__).resolve().parent / "results"
HESSIAN_VARIANTS = (
    "hvp_double_backward",
    "hvp_func_fwd_over_rev",
    "hvp_func_rev_over_rev",
    "curvops_hessian_auto",
    "curvops_hessian_none",
)
GGN_VARIANTS = (
    "ggn_double_vjp",
    "ggn_double_vjp_leaf",
    "ggn_double_vjp_func",
    "ggn_forward_mode",
    "ggn_func_jvp_vjp",
    "curvops_ggn_auto",
    "curvops_ggn_none",
)
VARIANTS = HESSIAN_VARIANTS + GGN_VARIANTS
MODELS = ("mlp_784-256-256-10_b256", "gpt_2x64d_8x64tok")
EXTRA_MODES = (
    "reduce-overhead", "max-autotune-no-cudagraphs", "compiled_autograd", "trace_autograd_ops"
)
BAR = {"float32": 1e-6, "float64": 1e-10}


# --- products --------------------------------------------------------------------------------
def _ce_hessian_matmul(out: Tensor, u: Tensor) -> Tensor:
    """Softmax cross-entropy output Hessian on rows: ``(diag p - p pᵀ) u`` along dim 1."""
    p = torch.softmax(out.detach(), dim=1)
    return p * u - p * (p * u).sum(1, keepdim=True)


def plain_variant(
    name: str, model: nn.Module, batch: tuple[Tensor, Tensor]
) -> tuple[Callable[[Tensor], Tensor], Callable[[], None]]:
    """The flat product ``v -> A v`` of a plain-torch / torch.func variant, and a gradient pass."""
    X, y = batch
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    params = [p for _, p in named]
    shapes = [p.shape for p in params]
    numels = [p.numel() for p in params]
    detached = {n: p.detach() for n, p in named}
    terms = y.numel()

    def split(v: Tensor) -> list[Tensor]:
        return [b.view(s) for b, s in zip(v.split(numels), shapes)]

    def flat(ts: Any) -> Tensor:
        return torch.cat([t.reshape(-1) for t in ts])

    def f(p: dict[str, Tensor]) -> Tensor:
        return torch.func.functional_call(model, p, (X,))

    def loss_of_params(p: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(f(p), y)

    def gradient() -> None:
        torch.autograd.grad(F.cross_entropy(model(X), y), params)

    def hvp_double_backward(v: Tensor) -> Tensor:
        g = torch.autograd.grad(F.cross_entropy(model(X), y), params, create_graph=True)
        return flat(torch.autograd.grad(g, params, split(v)))

    def hvp_func_fwd_over_rev(v: Tensor) -> Tensor:
        tangents = dict(zip(names, split(v)))
        _, hv = torch.func.jvp(torch.func.grad(loss_of_params), (detached,), (tangents,))
        return flat(hv[n] for n in names)

    def hvp_func_rev_over_rev(v: Tensor) -> Tensor:
        _, vjp_fn = torch.func.vjp(torch.func.grad(loss_of_params), detached)
        (hv,) = vjp_fn(dict(zip(names, split(v))))
        return flat(hv[n] for n in names)

    def ggn_double_vjp(v: Tensor) -> Tensor:
        out = model(X)
        u = torch.zeros_like(out, requires_grad=True)
        JTu = torch.autograd.grad(out, params, u, create_graph=True)
        (Jv,) = torch.autograd.grad(JTu, u, split(v))
        return flat(torch.autograd.grad(out, params, _ce_hessian_matmul(out, Jv) / terms))

    u_leaf: list[Tensor] = []
    if name == "ggn_double_vjp_leaf":
        with torch.no_grad():
            u_leaf.append(torch.zeros_like(model(X)).requires_grad_())

    def ggn_double_vjp_leaf(v: Tensor) -> Tensor:
        out = model(X)
        JTu = torch.autograd.grad(out, params, u_leaf[0], create_graph=True)
        (Jv,) = torch.autograd.grad(JTu, u_leaf[0], split(v))
        return flat(torch.autograd.grad(out, params, _ce_hessian_matmul(out, Jv) / terms))

    def ggn_double_vjp_func(v: Tensor) -> Tensor:
        out, vjp_fn = torch.func.vjp(f, detached)
        _, vjp_of_vjp = torch.func.vjp(vjp_fn, torch.zeros_like(out))
        (Jv,) = vjp_of_vjp((dict(zip(names, split(v))),))
        (gv,) = vjp_fn(_ce_hessian_matmul(out, Jv) / terms)
        return flat(gv[n] for n in names)

    def ggn_forward_mode(v: Tensor) -> Tensor:
        with fwAD.dual_level():
            dual = {n: fwAD.make_dual(p, t) for n, p, t in zip(names, params, split(v))}
            primal, Jv = fwAD.unpack_dual(torch.func.functional_call(model, dual, (X,)))
        return flat(torch.autograd.grad(primal, params, _ce_hessian_matmul(primal, Jv) / terms))

    def ggn_func_jvp_vjp(v: Tensor) -> Tensor:
        _, Jv = torch.func.jvp(f, (detached,), (dict(zip(names, split(v))),))
        out, vjp_fn = torch.func.vjp(f, detached)
        (gv,) = vjp_fn(_ce_hessian_matmul(out, Jv) / terms)
        return flat(gv[n] for n in names)

    products = {
        "hvp_double_backward": hvp_double_backward,
        "hvp_func_fwd_over_rev": hvp_func_fwd_over_rev,
        "hvp_func_rev_over_rev": hvp_func_rev_over_rev,
        "ggn_double_vjp": ggn_double_vjp,
        "ggn_double_vjp_leaf": ggn_double_vjp_leaf,
        "ggn_double_vjp_func": ggn_double_vjp_func,
        "ggn_forward_mode": ggn_forward_mode,
        "ggn_func_jvp_vjp": ggn_func_jvp_vjp,
    }
    return products[name], gradient


def curvops_operator(name: str, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Any:
    """``curvops_{ggn,hessian}_{auto,none}`` on ``model`` (which may be a compiled module)."""
    from curvops.linops import GGNOperator, HessianOperator

    _, kind, cache = name.split("_")
    cls = GGNOperator if kind == "ggn" else HessianOperator
    return cls(model, nn.CrossEntropyLoss(), batch, cache=cache)


def workload(model_name: str, dtype: torch.dtype) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """The bench_products model and batch (seed 0) in ``dtype``."""
    from curvops.validation.bench_products import workloads

    model, (X, y) = workloads(0)[model_name]
    model = model.to(dtype)
    if X.is_floating_point():
        X = X.to(dtype)
    return model, (X, y)


def _first_line(exc: BaseException) -> str:
    lines = [s for s in str(exc).strip().splitlines() if s.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:400]


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _rel(a: Tensor, ref: Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm())


def steady_state(
    contenders: dict[str, Callable[[], Any]], gradient: Callable[[], None], rounds: int
) -> dict[str, Any]:
    """Medians over interleaved rounds (new seeded order each round) of every contender's
    time, its ratio to the gradient pass timed in the same round, and of compiled / eager
    and compiled / eager curvops (per round, back to back)."""
    for fn in contenders.values():  # warm-up (and builds the curvops cache)
        fn()
        fn()
    order = list(contenders)
    shuffle = random.Random(0)
    times: dict[str, list[float]] = {k: [] for k in contenders}
    grad_times: list[float] = []
    for _ in range(rounds):
        shuffle.shuffle(order)
        grad_times.append(_timed(gradient))
        for key in order:
            times[key].append(_timed(contenders[key]))
    out: dict[str, Any] = {"rounds": rounds, "gradient_seconds": statistics.median(grad_times)}
    for key, ts in times.items():
        out[f"{key}_seconds"] = statistics.median(ts)
        out[f"{key}_over_gradient"] = statistics.median(t / g for t, g in zip(ts, grad_times))
    if "compiled" in times:
        for key in ("eager", "curvops_auto", "curvops_none"):
            if key in times:
                out[f"compiled_over_{key}"] = statistics.median(
                    c / e for c, e in zip(times["compiled"], times[key])
                )
    return out


# --- one job (in a subprocess) ---------------------------------------------------------------
def run_job(model_name: str, variant: str, mode: str, dtype_name: str, rounds: int) -> dict:
    """Eager vs compiled for one variant; returns the JSON record."""
    from curvops.linops import GGNOperator, HessianOperator

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    model, batch = workload(model_name, dtype)
    is_hessian = variant in HESSIAN_VARIANTS
    ref_cls = HessianOperator if is_hessian else GGNOperator
    ref_op = ref_cls(model, nn.CrossEntropyLoss(), batch, cache="none")
    n = ref_op.shape[0]
    v = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=dtype)
    ref = ref_op @ v
    rec: dict[str, Any] = {
        "model": model_name, "variant": variant, "mode": mode, "dtype": dtype_name,
        "num_params": n,
    }
    X, y = batch
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient() -> None:
        torch.autograd.grad(F.cross_entropy(model(X), y), params)

    if variant.startswith("curvops_"):
        eager_op = curvops_operator(variant, model, batch)
        eager: Callable[[Tensor], Tensor] = lambda w: eager_op @ w  # noqa: E731
    else:
        eager, _ = plain_variant(variant, model, batch)
    eager(v)
    rec["eager_rel_err"] = _rel(eager(v), ref)
    kind = "hessian" if is_hessian else "ggn"
    reference_ops = {f"curvops_{c}": curvops_operator(f"curvops_{kind}_{c}", model, batch)
                     for c in ("auto", "none")}
    references = {k: (lambda op=op: op @ v) for k, op in reference_ops.items()}

    # Compile (first call).
    opts: dict[str, Any] = {}
    if mode not in ("default", "compiled_autograd", "trace_autograd_ops"):
        opts["mode"] = mode
    if mode == "compiled_autograd":
        torch._dynamo.config.compiled_autograd = True
    if mode == "trace_autograd_ops":  # let dynamo trace torch.autograd.grad (no graph break)
        torch._dynamo.config.trace_autograd_ops = True
    torch._dynamo.utils.counters.clear()
    t0 = time.perf_counter()
    try:
        if variant.startswith("curvops_"):
            cmodel = torch.compile(model, **opts)
            compiled_op = curvops_operator(variant, cmodel, batch)
            out = compiled_op @ v
            compiled: Callable[[Tensor], Tensor] = lambda w: compiled_op @ w  # noqa: E731
        else:
            compiled = torch.compile(eager, **opts)
            out = compiled(v)
    except Exception as exc:  # the error is the result
        rec["compiles"] = False
        rec["error"] = _first_line(exc)
        rec["error_tail"] = traceback.format_exc()[-1500:]
        rec["seconds_until_error"] = time.perf_counter() - t0
        # The eager products' costs still serve as the reference point.
        if dtype_name == "float32":
            rec.update(steady_state({"eager": lambda: eager(v), **references}, gradient, rounds))
        return rec
    rec["compiles"] = True
    rec["compile_seconds"] = time.perf_counter() - t0
    rec["compiled_rel_err"] = _rel(out, ref)
    rec["compiled_vs_eager_rel_diff"] = _rel(out, eager(v))
    rec["agrees"] = rec["compiled_rel_err"] <= BAR[dtype_name]
    # A second call with another vector must give its product too (no stale guard / trace).
    w = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=dtype)
    rec["second_vector_rel_err"] = _rel(compiled(w), ref_op @ w)
    counters = torch._dynamo.utils.counters
    rec["graph_breaks"] = sum(counters["graph_break"].values())
    rec["graph_break_reasons"] = sorted(counters["graph_break"])[:5]
    rec["unique_graphs"] = counters["stats"].get("unique_graphs", 0)

    # Steady state: interleaved rounds, beside the eager curvops operators of the same kind.
    contenders = {"eager": lambda: eager(v), "compiled": lambda: compiled(v), **references}
    rec.update(steady_state(contenders, gradient, rounds if dtype_name == "float32" else 3))
    rec["recompiles"] = sum(counters["recompiles"].values()) if "recompiles" in counters else 0
    return rec


# --- driver ----------------------------------------------------------------------------------
def _key(rec: dict) -> str:
    return f"{rec['model']}|{rec['variant']}|{rec['mode']}|{rec['dtype']}"


def spawn(model: str, variant: str, mode: str, dtype: str, rounds: int, timeout: float) -> dict:
    """One job in a subprocess with a time limit and a fresh inductor cache."""
    base = {"model": model, "variant": variant, "mode": mode, "dtype": dtype}
    with tempfile.TemporaryDirectory(prefix="bench_compile_") as cache_dir:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
        cmd = [sys.executable, "-m", "curvops.validation.bench_compile", "--child",
               model, variant, mode, dtype, str(rounds)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {**base, "compiles": False, "error": f"timeout after {timeout:.0f} s"}
        wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return {**json.loads(line[7:]), "job_wall_seconds": wall}
    tail = (proc.stderr or proc.stdout)[-1500:]
    return {**base, "compiles": False, "error": f"job failed (rc {proc.returncode})",
            "error_tail": tail, "job_wall_seconds": wall}


def _fmt(x: Any, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def break_even(rec: dict) -> float | None:
    """Products after which the compile time is paid back against the eager cached curvops
    product (``compile s / (curvops auto s - compiled s)``); None if compiled is not faster."""
    try:
        saved = rec["curvops_auto_seconds"] - rec["compiled_seconds"]
        return rec["compile_seconds"] / saved if saved > 0 else None
    except KeyError:
        return None


def markdown(records: list[dict]) -> str:
    """One row per job (ratios: medians of per-round ratios; break-even: :func:`break_even`)."""
    head = ("| model | variant | mode | dtype | compiles | compile s | compiled/eager | "
            "compiled/curvops auto | eager/grad | compiled/grad | curvops auto/grad | "
            "curvops none/grad | rel err eager | rel err compiled | graph breaks | "
            "break-even products |")
    lines = [head, "|" + " --- |" * 16]
    for r in records:
        model = "mlp" if r["model"].startswith("mlp") else "gpt"
        ok = "yes" if r.get("compiles") else f"no: {r.get('error', '')[:160]}"
        lines.append(
            f"| {model} | {r['variant']} | {r['mode']} | {r['dtype']} | {ok} | "
            f"{_fmt(r.get('compile_seconds'), '.1f')} | {_fmt(r.get('compiled_over_eager'), '.2f')}"
            f" | {_fmt(r.get('compiled_over_curvops_auto'), '.2f')}"
            f" | {_fmt(r.get('eager_over_gradient'), '.2f')} | "
            f"{_fmt(r.get('compiled_over_gradient'), '.2f')} | "
            f"{_fmt(r.get('curvops_auto_over_gradient'), '.2f')} | "
            f"{_fmt(r.get('curvops_none_over_gradient'), '.2f')} | "
            f"{_fmt(r.get('eager_rel_err'), '.1e')} | {_fmt(r.get('compiled_rel_err'), '.1e')} | "
            f"{_fmt(r.get('graph_breaks'), 'd')} | {_fmt(break_even(r), '.0f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the jobs (each in a subprocess) and write the JSON and Markdown results."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        model, variant, mode, dtype, rounds = argv[1:6]
        rec = run_job(model, variant, mode, dtype, int(rounds))
        print("RESULT " + json.dumps(rec), flush=True)
        return rec
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--modes", nargs="*", default=None,
                        help="compile modes; default 'default'; bare --modes adds "
                             + ", ".join(EXTRA_MODES))
    parser.add_argument("--float64", action="store_true", help="float64 agreement jobs")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--timeout", type=float, default=240.0)
    parser.add_argument("--append", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_compile.json")
    args = parser.parse_args(argv)
    modes = ["default"] if args.modes is None else (args.modes or list(EXTRA_MODES))
    dtype = "float64" if args.float64 else "float32"
    report: dict[str, Any] = {"records": []}
    if args.append and args.out.exists():
        report = json.loads(args.out.read_text())
    records = {_key(r): r for r in report["records"]}
    report.update({
        "benchmark": "torch.compile vs eager curvature products (medians of interleaved "
                     "rounds, one subprocess per job, fresh inductor cache)",
        "torch": torch.__version__,
        "threads": {"torch.get_num_threads": torch.get_num_threads(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "machine": {"processor": platform.processor(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "timeout_seconds": args.timeout,
    })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for model in args.models:
        for variant in args.variants:
            for mode in modes:
                print(f"{model} {variant} {mode} {dtype} ...", flush=True)
                rec = spawn(model, variant, mode, dtype, args.rounds, args.timeout)
                rec["load_average_1min"] = os.getloadavg()[0]
                records[_key(rec)] = rec
                print("   ", {k: rec.get(k) for k in (
                    "compiles", "error", "compile_seconds", "compiled_over_eager",
                    "compiled_rel_err", "graph_breaks")}, flush=True)
                report["records"] = list(records.values())
                args.out.write_text(json.dumps(report, indent=2))
                args.out.with_suffix(".md").write_text(markdown(report["records"]) + "\n")
    print(markdown(report["records"]))
    return report


if __name__ == "__main__":
    main()
