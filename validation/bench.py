r"""The peers benchmark behind ``curvops bench``: one process, side by side, as ratios.

Parts (``--parts``, default all):

* ``products`` — curvops operators vs plain ``torch.func``/autograd products vs curvlinops,
  per matvec: :mod:`curvops.validation.bench_products` (its own JSON).
* ``lanczos`` — curvops Lanczos vs scipy eigsh on curvlinops' scipy operator:
  :mod:`curvops.validation.bench_lanczos` (its own JSON).
* ``power`` — the top Hessian eigenvalue of an MLP (784-128-10, float32, 256 examples) by
  curvops Lanczos (full reorthogonalization), by ``eigsh`` on curvlinops'
  ``HessianLinearOperator`` scipy view, and by PyHessian's power iteration (the
  ``pyhessian`` package when installed, else the same algorithm re-implemented here:
  normalise, :math:`v \leftarrow Hv`, :math:`\theta = v^\top H v`, stop when the relative
  change is below ``tol=1e-3``, at most 100 iterations). Matvecs, wall time and the
  relative error against a float64 eigsh reference, run interleaved over rounds.
* ``scaling`` — GPT-2-shaped models (zoo ``gpt2-1m``, ``gpt2-10m``, ``gpt2-124m``; HF models
  with their default attention and the HF objective, as users run them):
  seconds and peak resident memory of a gradient pass and of one GGN and one Hessian
  product in fp32, and in bf16 up to ≈10 M parameters (bf16 is emulated on a CPU, far
  slower than fp32: compare the rows of ``bench_scaling.json``; bf16 at scale belongs on a
  GPU). Ratios are product / gradient pass, the gradient pass being one plain backward of
  the same total loss (default SDPA kernel).

Thread settings are part of the result. Run::

    OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=1 python -m curvops.validation.bench [--quick]

Writes ``validation/results/bench_power.json`` and ``validation/results/bench_scaling.json``
(and lets the delegated parts write theirs).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from curvops.linops.memory_probe import peak_memory
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn

from ..linops import HessianOperator
from ..linops.objective import as_objective
from ..solvers.lanczos import LanczosConfig, lanczos
from . import bench_lanczos, bench_products
from .zoo import build, classification_data, make_operator, seeded

RESULTS = Path(__file__).resolve().parent / "results"

__all__ = ["main", "power_iteration_top", "run_power", "run_scaling"]


def _environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__, "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
        "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available(),
    }


def _write(name: str, payload: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=float))
    return path


# --- power iteration vs Lanczos vs eigsh ----------------------------------------------------
def power_iteration_top(
    hvp: Callable[[torch.Tensor], torch.Tensor], n: int, *, tol: float = 1e-3,
    max_iters: int = 100, seed: int = 0, dtype: torch.dtype = torch.float32,
) -> tuple[float, int]:
    """PyHessian's power iteration for the top (largest-magnitude) eigenvalue.

    Returns:
        ``(eigenvalue, matvecs)``.
    """
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=gen, dtype=dtype)
    v = v / v.norm()
    theta_prev, matvecs, theta = None, 0, 0.0
    for _ in range(max_iters):
        Hv = hvp(v)
        matvecs += 1
        theta = float(torch.dot(Hv, v))
        v = Hv / Hv.norm()
        if theta_prev is not None and abs(theta - theta_prev) / (abs(theta_prev) + 1e-6) < tol:
            break
        theta_prev = theta
    return theta, matvecs


def _mlp_problem(seed: int = 0) -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    with seeded(seed):
        model = nn.Sequential(nn.Linear(784, 128), nn.Tanh(), nn.Linear(128, 10)).eval()
    (X, y), = classification_data(256, (784,), 10, dtype=torch.float32, seed=seed + 1)
    return model, nn.CrossEntropyLoss(), (X, y)


def run_power(rounds: int = 3, seed: int = 0) -> dict[str, Any]:
    """The ``power`` part (see the module docstring)."""
    model, loss_fn, batch = _mlp_problem(seed)
    op = HessianOperator(model, loss_fn, [batch])
    n = op.shape[0]
    # Reference: float64 copy of the same weights, eigsh at machine precision.
    model64 = _copy_to(model, torch.float64)
    op64 = HessianOperator(model64, loss_fn, [(batch[0].double(), batch[1])])
    ref = float(eigsh(op64.to_scipy(), k=1, which="LA", tol=0)[0][0])

    contenders: dict[str, Callable[[], tuple[float, int]]] = {}

    def curvops_lanczos() -> tuple[float, int]:
        res = lanczos(op, 1, config=LanczosConfig(tol=1e-6, max_iters=200, reorth="full",
                                                  seed=seed, return_eigenvectors=False))
        return float(res.eigenvalues[0]), int(res.matvecs)

    contenders["curvops lanczos (full, tol 1e-6)"] = curvops_lanczos

    try:
        from curvlinops import HessianLinearOperator  # optional peer: the bench extra

        params = [p for p in model.parameters() if p.requires_grad]
        cl = HessianLinearOperator(model, loss_fn, params, [batch])
        view = cl.to_scipy() if hasattr(cl, "to_scipy") else cl

        def curvlinops_eigsh() -> tuple[float, int]:
            count = [0]

            def mv(x: np.ndarray) -> np.ndarray:
                count[0] += 1 if x.ndim == 1 else x.shape[1]
                return view @ x

            lo = LinearOperator(view.shape, matvec=mv, matmat=mv, dtype=np.float32)
            v0 = torch.randn(n, generator=torch.Generator().manual_seed(seed)).numpy()
            val = eigsh(lo, k=1, which="LA", tol=1e-6, v0=v0)[0][0]
            return float(val), count[0]

        contenders["scipy eigsh on curvlinops (tol 1e-6)"] = curvlinops_eigsh
        curvlinops_note = "curvlinops HessianLinearOperator"
    except ImportError:
        curvlinops_note = "curvlinops not installed (pip install curvlinops-for-pytorch)"

    try:
        from pyhessian import hessian as pyhessian_hessian  # optional peer

        def pyhessian_power() -> tuple[float, int]:
            h = pyhessian_hessian(model, loss_fn, data=batch, cuda=False)
            vals, _ = h.eigenvalues(maxIter=100, tol=1e-3, top_n=1)
            return float(vals[0]), -1

        power_note = "pyhessian package (matvecs not exposed)"
    except ImportError:
        def pyhessian_power() -> tuple[float, int]:
            return power_iteration_top(lambda v: op.matvec(v), n, seed=seed)

        power_note = ("pyhessian not installed: its power iteration re-implemented on the "
                      "curvops Hessian product (tol 1e-3 on the relative change, 100 iters)")
    contenders["PyHessian power iteration (tol 1e-3)"] = pyhessian_power

    times: dict[str, list[float]] = {name: [] for name in contenders}
    values: dict[str, tuple[float, int]] = {}
    for _ in range(rounds):  # interleaved: slow drifts of the machine hit all alike
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            values[name] = fn()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["curvops lanczos (full, tol 1e-6)"])
    rows = []
    for name in contenders:
        val, mv = values[name]
        med = statistics.median(times[name])
        rows.append({"method": name, "top_eigenvalue": val, "rel_error": abs(val - ref) / abs(ref),
                     "matvecs": mv, "seconds_median": med, "time_ratio_to_curvops": med / base})
    return {"part": "power", "environment": _environment(), "n": n, "reference": ref,
            "reference_method": "scipy eigsh, float64 copy, tol=0", "rounds": rounds,
            "notes": [curvlinops_note, power_note], "rows": rows}


def _copy_to(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    return copy.deepcopy(model).to(dtype).eval()


# --- scaling --------------------------------------------------------------------------------
def _measure(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    gc.collect()
    t0 = time.perf_counter()
    with peak_memory(device) as mem:
        fn()
    return time.perf_counter() - t0, mem["peak_mb"]


def _total_loss(problem: Any) -> torch.Tensor:
    r"""The total loss :math:`L = c \sum_n \ell_n` of a zoo problem, one plain forward pass.

    Uses the problem's objective (the HF objective for language models, so the same
    target tokens and normaliser as the operators), with the model's default attention
    kernel: the gradient pass a user would run.
    """
    objective = as_objective(problem.loss_fn)
    params = dict(problem.model.named_parameters())
    total = None
    for batch in problem.data:
        total = objective.count(batch) if total is None else total + objective.count(batch)
    c = objective.normalizer(total)
    loss = 0.0
    for batch in problem.data:
        rows = objective.rows(problem.model, params, batch)
        loss = loss + objective.kind.row_losses(rows.predictions, rows.targets).sum()
    return c * loss


def run_scaling(models: list[str], bf16_models: list[str], seed: int = 0) -> dict[str, Any]:
    """The ``scaling`` part (see the module docstring)."""
    rows = []
    for dtype, names in ((torch.float32, models), (torch.bfloat16, bf16_models)):
        for name in names:
            p = build(name, torch.float32, seed)
            if dtype != torch.float32:
                p = p.to(dtype)
            params = [q for q in p.model.parameters() if q.requires_grad]

            def gradient_pass(p: Any = p, params: list = params) -> None:
                torch.autograd.grad(_total_loss(p), params)

            row: dict[str, Any] = {"model": name, "dtype": str(dtype)[6:],
                                   "params": p.num_params}
            gradient_pass()  # warm-up (allocator, kernels)
            row["gradient_s"], row["gradient_peak_mb"] = _measure(gradient_pass,
                                                                 torch.device("cpu"))
            for op_name in ("ggn", "hessian"):
                op = make_operator(op_name, p.model, p.loss_fn, p.data)
                v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(seed),
                                dtype=torch.float32).to(op.dtype)
                s, mb = _measure(lambda op=op, v=v: op.matvec(v), torch.device("cpu"))
                row[f"{op_name}_matvec_s"], row[f"{op_name}_peak_mb"] = s, mb
                row[f"{op_name}_ratio_to_gradient"] = s / row["gradient_s"]
                del op
            rows.append(row)
            print(json.dumps(row), flush=True)
            del p, params
    return {"part": "scaling", "environment": _environment(),
            "note": "one measurement each, after one warm-up gradient pass; peak_mb = peak "
                    "resident memory added above the level at the start (sampled every 5 ms): "
                    "memory that the allocator frees and reuses (the warm-up's) is not counted, "
                    "so it is a lower bound and reads ~0 where a pass fits in memory freed "
                    "before it; bf16 is emulated on this CPU", "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the selected parts and write their JSON files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smallest sizes only")
    parser.add_argument("--parts", nargs="+", default=["products", "lanczos", "power",
                                                       "scaling"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    if "products" in args.parts:
        results["products"] = bench_products.main(
            ["--rounds", "3" if args.quick else "15", "--out",
             str(args.out / "bench_products.json")])
    if "lanczos" in args.parts:
        results["lanczos"] = bench_lanczos.main(
            (["--skip-mlp", "--repeats", "1"] if args.quick else [])
            + ["--out", str(args.out / "bench_lanczos.json")])
    if "power" in args.parts:
        results["power"] = run_power(rounds=1 if args.quick else 3, seed=args.seed)
        print(_write("bench_power", results["power"], args.out))
    if "scaling" in args.parts:
        fp32 = ["gpt2-1m"] if args.quick else ["gpt2-1m", "gpt2-10m", "gpt2-124m"]
        bf16 = ["gpt2-1m"] if args.quick else ["gpt2-1m", "gpt2-10m"]
        results["scaling"] = run_scaling(fp32, bf16, seed=args.seed)
        print(_write("bench_scaling", results["scaling"], args.out))
    return results


if __name__ == "__main__":
    main()
