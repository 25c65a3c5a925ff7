r"""Benchmark: one curvature product divided by one gradient pass, interleaved in one process.

For each model, every round visits the contenders in a new seeded order; each is run once
untimed (warm, as in a Lanczos run that repeats the product), then a gradient pass
(forward + backward on the batch) and one product are timed back to back.
The table reports the median over rounds of ``time(product) / time(gradient pass)``, so
slow drifts of the machine cancel.

Contenders (float32):

* ``curvops`` with ``cache="none"`` (every product fresh) and with ``cache="auto"`` (the
  prepared per-micro-batch states reused; the cache is built before timing starts, as by
  the first product of a Lanczos run), and
  ``auto_in_solver``: the same inside ``parameters_fixed()``, as ``lanczos``/``cg``/``minres``
  run them (the check for updated parameters once per run, not per product);
* plain torch's Hessian with the first-order graph kept across products (one double
  backward each: what curvops' Hessian cache does, without curvops around it);
* the best fresh plain-torch products: Hessian by autograd double backward; GGN by the
  double-vjp trick with one forward pass (the usual plain-torch baseline) and by forward mode
  (``Jv`` from dual parameters, then one backward: what curvops' uncached single-vector
  GGN/Fisher products do); empirical Fisher from ``torch.func.vmap`` per-example
  gradients, :math:`G^\top (G v)`;
* curvlinops (optional: ``pip install curvlinops-for-pytorch``; its rows are skipped
  with a message when it is missing).

``matmat`` rows give the time of an 8-column ``matmat`` divided by 8 matvecs of the
same contender (below 1 means batching the columns pays).

Models: the MLP 784-256-256-10 (ReLU) with batch 256 and cross-entropy, and a GPT-2-like
language model in plain torch (2 layers, width 64, 4 heads, vocabulary 1024, context 64,
untied head) on 8 x 64 tokens with next-token cross-entropy (mean over tokens).

Run (thread settings are part of the result and recorded in the JSON)::

    OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 python -m curvops.validation.bench_products

Results go to ``validation/results/bench_products.json`` (and a Markdown table to
``bench_products.md`` beside it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from curvops.linops import (
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
)
from torch import Tensor, nn

RESULTS = Path(__file__).resolve().parent / "results"
MATMAT_COLUMNS = 8


# --- models ----------------------------------------------------------------------------------
def mlp() -> nn.Module:
    """The MLP 784-256-256-10 with ReLU."""
    return nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with plain matmuls and softmax."""

    def __init__(self, width: int, heads: int, context: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        mask = torch.tril(torch.ones(context, context, dtype=torch.bool))
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        N, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        q, k, v = (t.view(N, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(D // self.heads)
        scores = scores.masked_fill(~self.mask[:T, :T], float("-inf"))
        y = torch.softmax(scores, dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(N, T, D))


class Block(nn.Module):
    """Pre-LayerNorm transformer block (attention and a GELU MLP)."""

    def __init__(self, width: int, heads: int, context: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, context)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A GPT-2-like language model; returns logits as ``(N, V, T)`` (cross-entropy layout)."""

    def __init__(
        self, vocab: int = 1024, width: int = 64, layers: int = 2, heads: int = 4, context: int = 64
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads, context) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        T = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(T, device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x)).transpose(1, 2)


def workloads(seed: int) -> dict[str, tuple[nn.Module, tuple[Tensor, Tensor]]]:
    """The benchmark models with one batch each (random init and data from ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model_a = mlp().eval()
    X = torch.randn(256, 784, generator=gen)
    y = torch.randint(0, 10, (256,), generator=gen)
    model_b = TinyGPT().eval()
    tokens = torch.randint(0, 1024, (8, 65), generator=gen)
    return {
        "mlp_784-256-256-10_b256": (model_a, (X, y)),
        "gpt_2x64d_8x64tok": (model_b, (tokens[:, :-1], tokens[:, 1:])),
    }


# --- plain-torch baselines -------------------------------------------------------------------
def _ce_hessian_matmul(F_: Tensor, U: Tensor) -> Tensor:
    """Cross-entropy output Hessian on rows: ``(diag p - p pᵀ) u`` along dim 1 (classes)."""
    p = torch.softmax(F_.detach(), dim=1)
    return p * U - p * (p * U).sum(1, keepdim=True)


def plain_torch(model: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, Callable]:
    """Fresh plain-torch products ``v -> A v`` (flat vectors) and the gradient pass."""
    X, y = batch
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for p in params]
    numels = [p.numel() for p in params]

    def split(v: Tensor) -> list[Tensor]:
        return [b.view(s) for b, s in zip(v.split(numels), shapes)]

    def flat(ts: Any) -> Tensor:
        return torch.cat([t.reshape(-1) for t in ts])

    def gradient() -> None:
        loss = F.cross_entropy(model(X), y)
        torch.autograd.grad(loss, params)

    def hessian(v: Tensor) -> Tensor:
        loss = F.cross_entropy(model(X), y)
        g = torch.autograd.grad(loss, params, create_graph=True)
        return flat(torch.autograd.grad(g, params, split(v)))

    def ggn(v: Tensor) -> Tensor:
        out = model(X)
        u = torch.zeros_like(out, requires_grad=True)
        JTu = torch.autograd.grad(out, params, u, create_graph=True)
        (Jv,) = torch.autograd.grad(JTu, u, split(v))
        terms = y.numel()
        return flat(torch.autograd.grad(out, params, _ce_hessian_matmul(out, Jv) / terms))

    reused: dict[str, Any] = {}

    def hessian_reused_graph(v: Tensor) -> Tensor:
        # The "first-order graph reused" row: one double backward per product.
        if "g" not in reused:
            loss = F.cross_entropy(model(X), y)
            reused["g"] = torch.autograd.grad(loss, params, create_graph=True)
        return flat(torch.autograd.grad(reused["g"], params, split(v), retain_graph=True))

    def ggn_forward_mode(v: Tensor) -> Tensor:
        # Jv by forward mode (dual parameters), then one backward: no create_graph pass.
        with fwAD.dual_level():
            dual = {n: fwAD.make_dual(p, t) for n, p, t in zip(names, params, split(v))}
            primal, Jv = fwAD.unpack_dual(torch.func.functional_call(model, dual, (X,)))
        terms = y.numel()
        return flat(torch.autograd.grad(primal, params, _ce_hessian_matmul(primal, Jv) / terms))

    def ef(v: Tensor) -> Tensor:
        def loss_one(p: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
            out = torch.func.functional_call(model, p, (x.unsqueeze(0),))
            return F.cross_entropy(out, t.unsqueeze(0), reduction="sum")

        detached = {n: p.detach() for n, p in zip(names, params)}
        grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(detached, X, y)
        G = torch.cat([grads[n].reshape(X.shape[0], -1) for n in names], dim=1)
        return G.T @ (G @ v) / y.numel()

    return {"gradient": gradient, "hessian": hessian, "hessian_reused_graph": hessian_reused_graph,
            "ggn": ggn, "ggn_forward_mode": ggn_forward_mode, "ef": ef}


def curvlinops_ops(model: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, Any] | None:
    """curvlinops' Hessian, GGN and EF operators, or ``None`` when it is not installed."""
    try:
        import curvlinops  # optional peer: the bench extra
    except ImportError:
        print("curvlinops is not installed (pip install curvlinops-for-pytorch): rows skipped")
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    loss = nn.CrossEntropyLoss()
    data = [batch]
    kw = {"check_deterministic": False}
    return {
        "version": getattr(curvlinops, "__version__", "unknown"),
        "hessian": curvlinops.HessianLinearOperator(model, loss, params, data, **kw),
        "ggn": curvlinops.GGNLinearOperator(model, loss, params, data, **kw),
        "ef": curvlinops.EFLinearOperator(model, loss, params, data, **kw),
    }


# --- timing ----------------------------------------------------------------------------------
def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_model(
    name: str, model: nn.Module, batch: tuple[Tensor, Tensor], rounds: int, seed: int
) -> dict[str, Any]:
    """Interleaved timings of every contender on one model; ratios to the gradient pass."""
    loss = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    ops: dict[str, Any] = {}
    for cache in ("none", "auto"):
        ops[f"hessian/{cache}"] = HessianOperator(model, loss, batch, cache=cache)
        ops[f"ggn/{cache}"] = GGNOperator(model, loss, batch, cache=cache)
        ops[f"fisher_mc/{cache}"] = FisherOperator(model, loss, batch, mode="mc", cache=cache)
        ops[f"ef/{cache}"] = EmpiricalFisherOperator(model, loss, batch, cache=cache)
    # Cached products as a solver run makes them: inside parameters_fixed(), which checks
    # the parameters once per run instead of once per product.
    in_solver = {
        "hessian/auto_in_solver": HessianOperator(model, loss, batch),
        "ggn/auto_in_solver": GGNOperator(model, loss, batch),
        "fisher_mc/auto_in_solver": FisherOperator(model, loss, batch, mode="mc"),
    }
    ops.update(in_solver)
    n = ops["hessian/none"].shape[0]
    v = torch.randn(n, generator=gen)
    V = torch.randn(n, MATMAT_COLUMNS, generator=gen)
    build = {}
    for key, op in ops.items():
        if "/auto" in key:
            build[key] = _timed(lambda op=op: op @ v)  # the first product builds the cache
            if not op.cache_active:
                raise RuntimeError(f"{name}: the {key} cache did not fit: {op.cache_info}")
    plain = plain_torch(model, batch)
    cl = curvlinops_ops(model, batch)

    # Sanity: every contender computes the same product (float32 round-off).
    ref = {"hessian": plain["hessian"](v), "ggn": plain["ggn"](v), "ef": plain["ef"](v)}
    err = float((plain["ggn_forward_mode"](v) - ref["ggn"]).norm() / ref["ggn"].norm())
    if err > 1e-3:
        raise RuntimeError(f"{name}: plain forward-mode GGN differs by {err:.2e}")
    for key, op in ops.items():
        kind = key.split("/")[0]
        if kind in ref:
            err = float((op @ v - ref[kind]).norm() / ref[kind].norm())
            if err > 1e-3:
                raise RuntimeError(f"{name}: {key} differs from plain torch by {err:.2e}")
    # Recorded, not enforced: curvlinops' EF counts every token as an example (another
    # matrix on sequence data) and its Hessian takes jvp over a vmapped backward, which is
    # off on LayerNorm weights (docs/decisions.md, "Known torch pitfalls").
    cl_errors = {}
    if cl is not None:
        for kind in ("hessian", "ggn", "ef"):
            cl_errors[kind] = float((cl[kind] @ v - ref[kind]).norm() / ref[kind].norm())

    contenders: dict[str, Callable[[], Any]] = {"gradient": plain["gradient"]}
    for kind in ("hessian", "hessian_reused_graph", "ggn", "ggn_forward_mode", "ef"):
        contenders[f"plain_torch/{kind}"] = lambda f=plain[kind]: f(v)
    for key, op in ops.items():
        contenders[f"curvops/{key}"] = lambda op=op: op @ v
    for key in ("hessian/none", "hessian/auto", "ggn/none", "ggn/auto", "ef/none", "ef/auto"):
        contenders[f"curvops/{key}/matmat{MATMAT_COLUMNS}"] = lambda op=ops[key]: op @ V
    if cl is not None:
        for kind in ("hessian", "ggn", "ef"):
            contenders[f"curvlinops/{kind}"] = lambda op=cl[kind]: op @ v
            contenders[f"curvlinops/{kind}/matmat{MATMAT_COLUMNS}"] = lambda op=cl[kind]: op @ V

    for fn in contenders.values():  # warm-up
        fn()
    # Every round, in a new (seeded) order, each contender runs once untimed, then a
    # gradient pass and the contender are timed back to back: the product is measured warm,
    # as in a Lanczos run that repeats it, and right beside its yardstick. (Timed cold, a
    # product after a memory-hungry contender, such as the vmapped per-example gradients,
    # runs slower, and a fixed order would turn that into a bias.)
    gradient = contenders.pop("gradient")
    order = list(contenders)
    shuffle = random.Random(seed)
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    grad_times: list[float] = []
    with contextlib.ExitStack() as held:
        for op in in_solver.values():
            held.enter_context(op.parameters_fixed())
        for _ in range(rounds):
            shuffle.shuffle(order)
            for key in order:
                contenders[key]()
                t_grad = _timed(gradient)
                samples[key].append(_timed(contenders[key]) / t_grad)
                grad_times.append(t_grad)
    ratios = {k: statistics.median(r) for k, r in samples.items()}
    for k in list(ratios):
        if k.endswith(f"/matmat{MATMAT_COLUMNS}"):
            single = ratios[k.removesuffix(f"/matmat{MATMAT_COLUMNS}")]
            ratios[k.replace(f"/matmat{MATMAT_COLUMNS}", "/matmat_per_column")] = (
                ratios[k] / MATMAT_COLUMNS / single
            )
    cache_bytes = {k: op.cache_bytes for k, op in ops.items() if "/auto" in k}
    return {
        "model": name,
        "num_params": n,
        "gradient_pass_seconds_median": statistics.median(grad_times),
        "ratios_to_gradient_pass": dict(sorted(ratios.items())),
        "cache_bytes": cache_bytes,
        "cache_kind": {k: ops[k].cache_info["kind"] for k in cache_bytes},
        "cache_build_seconds": build,
        "curvlinops_version": None if cl is None else cl["version"],
        "curvlinops_relative_difference_to_plain_torch": cl_errors,
    }


def markdown(results: list[dict[str, Any]]) -> str:
    """The ratio table, one column per model."""
    keys = sorted({k for r in results for k in r["ratios_to_gradient_pass"]})
    head = "| product / gradient pass | " + " | ".join(r["model"] for r in results) + " |"
    lines = [head, "| --- |" + " --- |" * len(results)]
    for k in keys:
        cells = [
            f"{r['ratios_to_gradient_pass'][k]:.2f}" if k in r["ratios_to_gradient_pass"] else "–"
            for r in results
        ]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and write the JSON and Markdown results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--runs", type=int, default=3,
                        help="whole runs per model (fresh operators, seeds seed..seed+runs-1); "
                             "the table gives the median over runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="*", default=None, help="subset of model names")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_products.json")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    results = []
    for name, (model, batch) in workloads(args.seed).items():
        if args.models and name not in args.models:
            continue
        print(f"benchmarking {name} ...", flush=True)
        runs = [bench_model(name, model, batch, args.rounds, args.seed + r)
                for r in range(args.runs)]
        combined = dict(runs[-1])
        # The median of whole runs (fresh operators, seeds seed..seed+runs-1) is the result;
        # each run's ratios are kept beside it, to show the run-to-run spread.
        combined["ratios_to_gradient_pass"] = {
            k: statistics.median(r["ratios_to_gradient_pass"][k] for r in runs)
            for k in runs[-1]["ratios_to_gradient_pass"]
        }
        combined["ratios_per_run"] = [r["ratios_to_gradient_pass"] for r in runs]
        results.append(combined)
    report = {
        "benchmark": "one product / one gradient pass (forward + backward), median over rounds",
        "rounds": args.rounds,
        "runs": args.runs,
        "dtype": "float32",
        "threads": {
            "torch.get_num_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
        },
        "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
        "torch": torch.__version__,
        "machine": {"processor": platform.processor(), "cpus": os.cpu_count()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    table = markdown(results)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return report


if __name__ == "__main__":
    main()
