r"""Benchmark: the matrix-product FLOPs of a curvature product against a gradient pass.

What bounds a product's speed from below: the floating-point operations of its matrix
products (``aten::mm``, ``bmm``, ``addmm``, counted by torch's profiler with
``with_flops=True``), as a multiple of a gradient pass's, on the models of
``validation/bench_products.py`` (the 269 k MLP and the 2×64d GPT). A cached product is
compared (the cache is built by a first product outside the count), as in the product
benchmark.

Per linear layer :math:`y = x W^\top`, a gradient pass makes three matrix products
(:math:`y`, :math:`g_x = g_y W`, :math:`g_W = g_y^\top x`). A cached GGN product makes four
(:math:`J v`: :math:`\dot x W^\top + x \dot W^\top`; :math:`J^\top u`: two), a cached Hessian
product six (the backward of :math:`g_W` and :math:`g_x` in all their inputs, and of
:math:`y` in :math:`x` and :math:`W`). So where matrix products dominate, an exact
Hessian-vector product costs about twice a gradient pass, whatever the order of
differentiation (forward-over-reverse makes those six and the primal pass on top).

Run::

    OMP_NUM_THREADS=2 python -m curvops.validation.bench_flops

Writes ``validation/results/bench_flops.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from curvops.linops import GGNOperator, HessianOperator
from curvops.validation.bench_products import workloads
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
_MATRIX_PRODUCTS = ("aten::mm", "aten::bmm", "aten::addmm")


def _counted(fn) -> dict[str, float]:
    """FLOPs and CPU milliseconds of the matrix products ``fn`` runs, and its total CPU ms."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        fn()
    events = prof.key_averages()
    return {
        "gflops": sum(e.flops for e in events) / 1e9,
        "matrix_product_ms": sum(e.self_cpu_time_total for e in events
                                 if e.key in _MATRIX_PRODUCTS) / 1e3,
        "cpu_ms": sum(e.self_cpu_time_total for e in events) / 1e3,
    }


def _count_model(model: nn.Module, X: torch.Tensor, y: torch.Tensor,
                 seed: int) -> dict[str, dict[str, float]]:
    """A gradient pass, a cached GGN product and a cached Hessian product of one model."""
    loss = nn.CrossEntropyLoss()

    def gradient_pass() -> None:
        model.zero_grad(set_to_none=True)
        loss(model(X), y).backward()

    ops = {"ggn": GGNOperator(model, loss, [(X, y)]),
           "hessian": HessianOperator(model, loss, [(X, y)])}
    v = torch.randn(ops["ggn"].shape[0], generator=torch.Generator().manual_seed(seed))
    for op in ops.values():
        op @ v  # builds the cache
    gradient_pass()
    counts = {"gradient_pass": _counted(gradient_pass)}
    for label, op in ops.items():
        counts[f"cached_{label}"] = _counted(lambda op=op: op @ v)
    base = counts["gradient_pass"]["gflops"]
    for c in counts.values():
        c["flops_over_gradient_pass"] = c["gflops"] / base
    model.zero_grad(set_to_none=True)
    return counts


def run(seed: int = 0) -> dict[str, Any]:
    """Count a gradient pass, a cached GGN product and a cached Hessian product per model."""
    out: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                           "models": {}}
    for name, (model, (X, y)) in workloads(seed).items():
        counts = _count_model(model, X, y, seed)
        out["models"][name] = counts
        print(name, json.dumps({k: round(c["flops_over_gradient_pass"], 3)
                                for k, c in counts.items()}), flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    """Run the count and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(RESULTS / "bench_flops.json"))
    a = p.parse_args(argv)
    result = run()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
