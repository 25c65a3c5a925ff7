"""Benchmark: per-example gradients by vmap, by a per-example loop and by the Jacobian trick.

Two cases, each timed interleaved in one process (method A, method B, A, B, ...), reported
as the median time per method and as ratios against the loop:

* a ~1 M-parameter plain-torch MLP classifier, N = 64 examples (goal: vmap >= 5x the loop);
* a tiny GPT-2 (2 layers, 16 wide, vocabulary 64), N = 64 right-padded sequences of 16
  tokens: the mask code defeats vmap, so the loop and the Jacobian trick are compared; vmap
  is also timed on the same sequences without an attention mask.

Every method's result is checked against the loop's before timing. Thread settings are
read from ``OMP_NUM_THREADS`` (torch) and recorded with the machine's load average.

Usage::

    OMP_NUM_THREADS=2 python -m curvops.validation.bench_per_example [--repeats 5]

Writes ``validation/results/bench_per_example.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from curvops.linops.hf import hf_objective
from curvops.linops.per_example import per_example_gradients
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results" / "bench_per_example.json"


def _time_interleaved(calls: dict[str, Any], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _check_same(results: dict[str, torch.Tensor], reference: str) -> dict[str, float]:
    ref = results[reference]
    scale = float(ref.abs().max())
    return {k: float((v - ref).abs().max()) / scale for k, v in results.items()}


def bench_mlp(repeats: int, n: int = 64) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 768), nn.ReLU(), nn.Linear(768, 10)
    ).eval()
    P = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(n, 256, generator=g), torch.randint(0, 10, (n,), generator=g))
    loss = nn.CrossEntropyLoss()
    methods = ("loop", "vmap", "jacobian")
    calls = {m: (lambda m=m: per_example_gradients(model, loss, batch, method=m)) for m in methods}
    errors = _check_same({m: fn() for m, fn in calls.items()}, "loop")
    times = _time_interleaved(calls, repeats)
    return {
        "model": "MLP 256-1024-768-10, ReLU, float32",
        "n_params": P,
        "n_examples": n,
        "seconds_median": times,
        "speedup_vs_loop": {m: times["loop"] / t for m, t in times.items()},
        "max_relative_difference_vs_loop": errors,
        "goal_vmap_speedup": 5.0,
        "goal_met": times["loop"] / times["vmap"] >= 5.0,
    }


def bench_gpt2(repeats: int, n: int = 64, T: int = 16) -> dict[str, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel  # optional: the hf extra

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2,
        n_embd=16,
        n_head=2,
        vocab_size=64,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(cfg).eval()
    obj = hf_objective(model)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 64, (n, T), generator=g)
    lengths = torch.randint(4, T + 1, (n,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    padded = {"input_ids": ids, "attention_mask": mask}
    unmasked = {"input_ids": ids}
    calls = {
        "loop": lambda: per_example_gradients(model, obj, padded, method="loop"),
        "jacobian": lambda: per_example_gradients(model, obj, padded, method="jacobian"),
        "jacobian_chunk16": lambda: per_example_gradients(
            model, obj, padded, method="jacobian", chunk_size=16
        ),
        "auto": lambda: per_example_gradients(model, obj, padded, method="auto"),
    }
    errors = _check_same({m: fn() for m, fn in calls.items()}, "loop")
    times = _time_interleaved(calls, repeats)
    nomask = {
        "loop": lambda: per_example_gradients(model, obj, unmasked, method="loop"),
        "vmap": lambda: per_example_gradients(model, obj, unmasked, method="vmap"),
        "jacobian": lambda: per_example_gradients(model, obj, unmasked, method="jacobian"),
    }
    errors_nomask = _check_same({m: fn() for m, fn in nomask.items()}, "loop")
    times_nomask = _time_interleaved(nomask, repeats)
    best = min(times, key=times.get)
    return {
        "model": "GPT-2 2 layers, n_embd 16, vocab 64, float32",
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_sequences": n,
        "seq_len": T,
        "padded": {
            "seconds_median": times,
            "speedup_vs_loop": {m: times["loop"] / t for m, t in times.items()},
            "max_relative_difference_vs_loop": errors,
            "best_method": best,
            "note": "with an attention_mask, GPT-2's mask code branches on tensor values: no vmap",
        },
        "no_attention_mask": {
            "seconds_median": times_nomask,
            "speedup_vs_loop": {m: times_nomask["loop"] / t for m, t in times_nomask.items()},
            "max_relative_difference_vs_loop": errors_nomask,
        },
    }


def main() -> None:
    """Run both cases and write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    out: dict[str, Any] = {
        "benchmark": "per-example gradients",
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": {
            "OMP_NUM_THREADS": threads,
            "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
            "torch.get_num_threads": torch.get_num_threads(),
        },
        "load_average_before": os.getloadavg(),
        "repeats": args.repeats,
        "mlp": bench_mlp(args.repeats),
    }
    if not args.skip_hf:
        out["gpt2"] = bench_gpt2(args.repeats)
    out["load_average_after"] = os.getloadavg()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
