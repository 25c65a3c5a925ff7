r"""Benchmark of the data-parallel product: 2 ranks x 1 thread against 1 process x 2 threads.

The GGN of the MLP 784-256-256-10 (ReLU, 269,322 parameters, float32, cross-entropy) on
2048 examples, cached (the prepared states built by the first product, as in a Lanczos
run). One process with 2 threads holds all 2048; two processes with one thread each (gloo
on loopback) hold 1024 each, and a product is the local product plus one ``all_reduce`` of
the ``n`` values. On this 2-core machine the two should be at parity: the point is that
the distributed product is right (its relative difference from the single process is
listed) and what the all-reduce costs, the path to many GPUs.

Also: the top-5 by ``lanczos`` (full reorthogonalization, tol 1e-6) on both, wall time and
products, and whether the ranks return the same bits.

Run::

    python -m curvops.validation.bench_distributed

Writes ``validation/results/bench_distributed.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp
from curvops.linops import GGNOperator
from curvops.solvers import lanczos
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
EXAMPLES = 2048


def _problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10)).eval()
    X = torch.randn(EXAMPLES, 784, generator=gen)
    y = torch.randint(0, 10, (EXAMPLES,), generator=gen)
    return model, X, y


def _vectors(n: int, count: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(n, generator=gen) for _ in range(count)]


def _time_products(op: GGNOperator, vs: list[torch.Tensor], barrier=None) -> list[float]:
    times = []
    for v in vs:
        if barrier is not None:
            barrier()
        t0 = time.perf_counter()
        op.matvec(v)
        times.append(time.perf_counter() - t0)
    return times


def _measure(op: GGNOperator, repeats: int, barrier=None) -> dict[str, Any]:
    vs = _vectors(op.shape[0], repeats)
    first = op.matvec(vs[0])  # builds the cache
    times = _time_products(op, vs, barrier)
    t0 = time.perf_counter()
    res = lanczos(op, 5, reorth="full", tol=1e-6, seed=0)
    wall = time.perf_counter() - t0
    return {"product_s": statistics.median(times), "product_all_s": times,
            "first_product": first, "lanczos_s": wall, "matvecs": res.matvecs,
            "eigenvalues": np.asarray(res.eigenvalues), "converged": bool(res.all_converged)}


def _single(threads: int, repeats: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    model, X, y = _problem()
    op = GGNOperator(model, nn.CrossEntropyLoss(), [(X, y)])
    return _measure(op, repeats)


def _rank(rank: int, world: int, port: int, repeats: int, out: Any) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        model, X, y = _problem()
        share = EXAMPLES // world
        shard = (X[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share])
        op = GGNOperator(model, nn.CrossEntropyLoss(), [shard], process_group=dist.group.WORLD)
        row = _measure(op, repeats, barrier=dist.barrier)
        buf = torch.randn(op.shape[0])
        reduce_times = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(buf)
            reduce_times.append(time.perf_counter() - t0)
        row["all_reduce_s"] = statistics.median(reduce_times)
        out.put((rank, row))
    finally:
        dist.destroy_process_group()


def _distributed(world: int, repeats: int) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank, args=(r, world, port, repeats, out))
             for r in range(world)]
    for p in procs:
        p.start()
    rows = dict(out.get(timeout=600) for _ in range(world))
    for p in procs:
        p.join(60)
    return [rows[r] for r in range(world)]


def run(repeats: int = 15) -> dict[str, Any]:
    """Measure both set-ups; the single process first, then the ranks (not concurrently)."""
    single = _single(2, repeats)
    ranks = _distributed(2, repeats)
    ref = single.pop("first_product")
    n = int(ref.numel())
    for row in ranks:
        got = row.pop("first_product")
        row["rel_diff_vs_single"] = float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref))
    eig_same = all(np.array_equal(ranks[0]["eigenvalues"], r["eigenvalues"]) for r in ranks)
    result = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "problem": {"model": "MLP 784-256-256-10 ReLU", "n": n, "examples": EXAMPLES,
                    "dtype": "float32", "operator": "ggn (cached)"},
        "single_2_threads": {k: _jsonable(v) for k, v in single.items()},
        "ranks_2x1_thread": [{k: _jsonable(v) for k, v in r.items()} for r in ranks],
        "product_ratio_distributed_over_single": ranks[0]["product_s"] / single["product_s"],
        "lanczos_ratio_distributed_over_single": ranks[0]["lanczos_s"] / single["lanczos_s"],
        "all_reduce_share_of_product": ranks[0]["all_reduce_s"] / ranks[0]["product_s"],
        "all_reduce_values_per_product": n,
        "all_reduce_bytes_per_product": n * 4,
        "ranks_return_the_same_eigenvalues": bool(eig_same),
        "eigenvalue_rel_diff_vs_single": float(
            np.max(np.abs(ranks[0]["eigenvalues"] - single["eigenvalues"])
                   / np.abs(single["eigenvalues"]))),
    }
    return result


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def _markdown(r: dict[str, Any]) -> str:
    s, d = r["single_2_threads"], r["ranks_2x1_thread"][0]
    return "\n".join([
        f"# Distributed product: {r['problem']['model']}, n = {r['problem']['n']}, "
        f"{r['problem']['examples']} examples, GGN cached, float32",
        "",
        "| set-up | product (ms) | all_reduce (ms) | top-5 wall (s) | matvecs |",
        "| --- | --- | --- | --- | --- |",
        f"| 1 process x 2 threads | {1e3 * s['product_s']:.1f} | | {s['lanczos_s']:.2f} "
        f"| {s['matvecs']} |",
        f"| 2 ranks x 1 thread (gloo) | {1e3 * d['product_s']:.1f} | "
        f"{1e3 * d['all_reduce_s']:.2f} | {d['lanczos_s']:.2f} | {d['matvecs']} |",
        "",
        f"- product ratio (2 ranks / 1 process): "
        f"{r['product_ratio_distributed_over_single']:.2f}; Lanczos ratio "
        f"{r['lanczos_ratio_distributed_over_single']:.2f}",
        f"- all-reduce per product: {r['all_reduce_values_per_product']} values "
        f"({r['all_reduce_bytes_per_product'] / 1e6:.2f} MB), "
        f"{100 * r['all_reduce_share_of_product']:.1f} % of the product",
        f"- product's relative difference from the single process: "
        f"{max(x['rel_diff_vs_single'] for x in r['ranks_2x1_thread']):.1e}; top-5 relative "
        f"difference {r['eigenvalue_rel_diff_vs_single']:.1e}; ranks return the same bits: "
        f"{r['ranks_return_the_same_eigenvalues']}",
        "",
    ])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and write its JSON and Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    result = run(args.repeats)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_distributed.json").write_text(json.dumps(result, indent=1))
    (out / "bench_distributed.md").write_text(_markdown(result))
    print(_markdown(result))
    return result


if __name__ == "__main__":
    main()
