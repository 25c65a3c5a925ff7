r"""Benchmark: the top-5 GGN of a GPT-2-small-shaped model, curvops against scipy ``eigsh``.

The run a new user makes: a randomly initialised ``GPT2LMHeadModel`` of the GPT-2-small
shape (12 layers, width 768, vocabulary 50 257: 124 M parameters) in float32, one batch of
4 x 128 tokens, 2 threads, and

* **curvops**: ``compute_fisher_eigenvalues_lanczos(model, batch, k=5, ggn_mode="true",
  max_iter=120, tol=1e-4)`` with its defaults otherwise: the memory budget (70 % of the
  free memory) chooses the strategy (here full reorthogonalization with a thick restart
  of 12 vectors: the unbounded basis would not fit), ``micro_batch_size="auto"``, the
  product cache, every value verified by its true residual;
* **eigsh**: ``scipy.sparse.linalg.eigsh(k=5, which="LA", ncv=12, tol=1e-4)`` on the same
  curvops operator (``GGNOperator(...).to_scipy()``, cached products): ncv·n stays below
  OpenBLAS's 2³¹-element limit. It runs inside ``curvops.linops.reuse_freed_memory()``, the
  allocator setting ``lanczos`` applies to its own CPU runs, so both sides' products cost
  the same.

Both ask for the same relative tolerance (``--tol``, default 1e-4: ARPACK's
:math:`\|r\| \le \text{tol}\,|\theta|` and curvops' bound are the same test).

Each side runs in its own process, so its peak resident set size (``ru_maxrss``, model and
data included) is its own. Reported: wall time (construction included), products, peak
RSS, the strategy, the solver's measured operator accuracy, convergence flags, and the
agreement of the eigenvalues (curvops' against eigsh's, relative to the largest).

Run::

    OMP_NUM_THREADS=2 python -m curvops.validation.bench_lm_top5          # 124M, ~10 min
    OMP_NUM_THREADS=2 python -m curvops.validation.bench_lm_top5 --small  # 2 layers, 64 wide

Writes ``validation/results/bench_lm_top5.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {
    "gpt2-small": {"layers": 12, "width": 768, "heads": 12, "vocab": 50257},
    "small": {"layers": 2, "width": 64, "heads": 2, "vocab": 1000},
}


def _problem(shape: dict[str, int], batch: int, seq: int):
    import torch
    import transformers  # optional: the hf extra

    transformers.utils.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(
        n_layer=shape["layers"], n_embd=shape["width"], n_head=shape["heads"],
        vocab_size=shape["vocab"], n_positions=max(seq, 8), resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab"], (batch, seq), generator=gen)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _side(side: str, shape_name: str, batch: int, seq: int, threads: int,
          tol: float, memory_budget_bytes: int | None = None,
          process_limit_bytes: int | None = None) -> dict[str, Any]:
    """One side's run, in this process."""
    import numpy as np
    import torch
    from curvops.linops.memory_probe import rss_bytes

    torch.set_num_threads(threads)
    model, data = _problem(SHAPES[shape_name], batch, seq)
    n = sum(p.numel() for p in model.parameters())
    rss_at_call = rss_bytes()
    if process_limit_bytes is not None:
        # The budget is what the run may add: the limit less what the process holds now
        # (the interpreter, torch, the model and its data).
        memory_budget_bytes = process_limit_bytes - rss_at_call
    t0 = time.perf_counter()
    if side == "curvops":
        from curvops.adapters.seed_api import compute_fisher_eigenvalues_lanczos

        out = compute_fisher_eigenvalues_lanczos(model, data, k=5, ggn_mode="true",
                                                 max_iter=120, tol=tol,
                                                 memory_budget_bytes=memory_budget_bytes)
        meta = out["metadata"]
        row = {"top": out["top_eigenvalues"], "matvecs": meta["matvecs"],
               "converged": meta["converged"], "strategy": meta["reorth"],
               "ncv": meta["ncv"], "restarts": meta["restarts"],
               "residual_norms": meta["residual_norms"], "tol_used": meta["tol_used"],
               "operator_accuracy": meta["operator_accuracy"],
               "seconds_matvec": meta["time_matvec"],
               "seconds_memory_plan": meta["time_memory_plan"],
               "seconds_operator_build": meta["time_operator_build"],
               "seconds_solver_other": meta["time_solver_other"],
               "iterations": out["lanczos_iterations"], "memory": meta["memory"],
               "micro_batch_size": meta["micro_batch_size"], "note": out["note"]}
    else:
        import scipy.sparse.linalg as sla
        from curvops.linops import GGNOperator, reuse_freed_memory
        from curvops.linops.hf import hf_objective

        op = GGNOperator(model, hf_objective(model), [data])
        A = op.to_scipy()
        count = [0]

        def matvec(x):
            count[0] += 1
            return A.matvec(x)

        counted = sla.LinearOperator(A.shape, matvec=matvec, dtype=A.dtype)
        v0 = np.random.default_rng(0).standard_normal(n).astype(A.dtype)
        with reuse_freed_memory():
            vals = sla.eigsh(counted, k=5, which="LA", ncv=12, tol=tol, v0=v0,
                             return_eigenvectors=False)
        row = {"top": sorted(map(float, vals), reverse=True), "matvecs": count[0]}
    row["seconds"] = time.perf_counter() - t0
    row["n"] = n
    row["rss_at_call_bytes"] = rss_at_call
    row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row["threads"] = torch.get_num_threads()
    return row


def run(shape: str, batch: int, seq: int, threads: int, timeout: float, tol: float,
        memory_budget_bytes: int | None = None,
        sides: tuple[str, ...] = ("curvops", "eigsh"),
        process_limit_bytes: int | None = None) -> dict[str, Any]:
    """Both sides, each in a fresh process; then their agreement."""
    out: dict[str, Any] = {"shape": {"name": shape, **SHAPES[shape]},
                           "batch": [batch, seq], "threads": threads, "tol": tol,
                           "allocator": "reuse_freed_memory on both sides",
                           "memory_budget_bytes": memory_budget_bytes,
                           "process_limit_bytes": process_limit_bytes,
                           "load_average_before": os.getloadavg()}
    for side in sides:
        cmd = [sys.executable, "-m", "curvops.validation.bench_lm_top5", "--side", side,
               "--shape", shape, "--batch", str(batch), "--seq", str(seq),
               "--threads", str(threads), "--tol", repr(tol)]
        if memory_budget_bytes is not None:
            cmd += ["--memory-budget-bytes", str(memory_budget_bytes)]
        if process_limit_bytes is not None:
            cmd += ["--process-limit-bytes", str(process_limit_bytes)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads),
               "OPENBLAS_NUM_THREADS": str(threads)}
        t0 = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env=env)
        except subprocess.TimeoutExpired:
            out[side] = {"error": f"not finished within {timeout:g} s",
                         "seconds": time.perf_counter() - t0}
            continue
        if done.returncode != 0:
            out[side] = {"error": done.stderr[-2000:], "seconds": time.perf_counter() - t0}
            continue
        out[side] = json.loads(done.stdout.strip().splitlines()[-1])
        print(side, json.dumps(out[side])[:400], flush=True)
    if "top" in out.get("curvops", {}) and "top" in out.get("eigsh", {}):
        ours, ref = out["curvops"]["top"], out["eigsh"]["top"]
        scale = max(abs(x) for x in ref)
        out["max_abs_difference_over_largest"] = max(abs(a - b) for a, b in zip(ours, ref)) / scale
        out["seconds_ratio_curvops_over_eigsh"] = (out["curvops"]["seconds"]
                                                   / out["eigsh"]["seconds"])
        out["rss_ratio_curvops_over_eigsh"] = (out["curvops"]["peak_rss_bytes"]
                                               / out["eigsh"]["peak_rss_bytes"])
    out["load_average_after"] = os.getloadavg()
    return out


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark (or, with ``--side``, one side of it) and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", choices=("curvops", "eigsh"), default=None)
    p.add_argument("--shape", choices=tuple(SHAPES), default="gpt2-small")
    p.add_argument("--small", action="store_true", help="the 2-layer 64-wide shape")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--memory-budget-bytes", type=int, default=None,
                   help="curvops' memory_budget_bytes (default: the seed API's share)")
    p.add_argument("--process-limit-bytes", type=int, default=None,
                   help="curvops' budget = this less the process's resident set at the call")
    p.add_argument("--sides", nargs="+", choices=("curvops", "eigsh"),
                   default=["curvops", "eigsh"])
    p.add_argument("--timeout", type=float, default=1500.0)
    p.add_argument("--out", default=str(RESULTS / "bench_lm_top5.json"))
    a = p.parse_args(argv)
    shape = "small" if a.small else a.shape
    if a.side is not None:
        print(json.dumps(_side(a.side, shape, a.batch, a.seq, a.threads, a.tol,
                               a.memory_budget_bytes, a.process_limit_bytes)))
        return
    result = run(shape, a.batch, a.seq, a.threads, a.timeout, a.tol, a.memory_budget_bytes,
                 tuple(a.sides), a.process_limit_bytes)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("curvops", "eigsh")}))


if __name__ == "__main__":
    main()
