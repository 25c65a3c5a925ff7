r"""Section ``matvec_cost``: one product through the torch operator, the cupy and scipy views.

One GGN product (and one 8-column ``matmat``) of a float32 model, visited in a new seeded
order each round; medians of wall time (bracketed by ``torch.cuda.synchronize``) and of
CUDA-event time, and the ratios :math:`t_\text{cupy}/t_\text{torch}` and
:math:`t_\text{scipy}/t_\text{torch}`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..report import json_ready
from ..zoo import build
from .context import Run
from .device import cupy_problem, free, on_device

__all__ = ["run_section"]


def _timed(fn: Callable[[], Any], run: Run) -> tuple[float, float | None, Any]:
    """Wall seconds (synchronised before and after), CUDA-event seconds, and the result."""
    if run.device.type != "cuda":
        t0 = time.perf_counter()
        y = fn()
        return time.perf_counter() - t0, None, y
    torch.cuda.synchronize(run.device)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    y = fn()
    stop.record()
    torch.cuda.synchronize(run.device)
    return time.perf_counter() - t0, start.elapsed_time(stop) / 1e3, y


def _to_numpy(y: Any) -> np.ndarray:
    if isinstance(y, torch.Tensor):
        return y.detach().double().cpu().numpy()
    if isinstance(y, np.ndarray):
        return y.astype(np.float64)
    import cupy  # optional (the gpu extra); only cupy arrays are left

    return cupy.asnumpy(y).astype(np.float64)


def run_section(run: Run, section: dict[str, Any], end_time: float) -> None:
    """Time one GGN product (and one 8-column ``matmat``) through torch, cupy and scipy.

    All contenders multiply the same vectors; each round visits them in a new order drawn
    from a seeded generator, each timed warm (two products of each before the rounds). The
    scipy view is what a host-side numpy user gets: its input and output cross the PCIe bus
    on every product. ``max_rel_diff_vs_torch`` checks the three give the same product.
    """
    s = run.settings
    problem = on_device(build(s.matvec_model, torch.float32, s.seed), run.device)
    op = problem.operator("ggn")
    n = int(op.shape[0])
    cupy_reason = cupy_problem(run.device)
    gen = torch.Generator().manual_seed(s.seed)
    X_host = torch.randn(n, 8, generator=gen, dtype=torch.float32)
    x_t, X_t = X_host[:, 0].contiguous().to(run.device), X_host.to(run.device)
    x_np, X_np = X_host[:, 0].numpy().copy(), X_host.numpy().copy()
    host = op.to_scipy()
    contenders: dict[str, dict[str, Callable[[], Any]]] = {
        "matvec": {"torch": lambda: op @ x_t, "scipy": lambda: host.matvec(x_np)},
        "matmat8": {"torch": lambda: op.matmat(X_t), "scipy": lambda: host.matmat(X_np)},
    }
    if cupy_reason is None:
        import cupy  # optional: the gpu extra

        view = op.to_cupy()
        x_cp, X_cp = cupy.asarray(x_np), cupy.asarray(X_np)
        contenders["matvec"]["cupy"] = lambda: view.matvec(x_cp)
        contenders["matmat8"]["cupy"] = lambda: view.matmat(X_cp)
    with run.recorder.change():
        section.update(model=s.matvec_model, n=n, dtype="float32", operator="ggn",
                       cupy="ok" if cupy_reason is None else f"skipped: no CUDA/cupy "
                                                              f"({cupy_reason})",
                       timing="wall: perf_counter between torch.cuda.synchronize calls; "
                              "event: CUDA events on torch's current stream")
    for kind, fns in contenders.items():
        outputs = {}
        for name, fn in fns.items():  # warm-up: cache build, cuBLAS handles, cupy kernels
            for _ in range(2):
                _, _, y = _timed(fn, run)
            outputs[name] = _to_numpy(y)
        ref = outputs["torch"]
        scale = float(np.abs(ref).max()) or 1.0
        diffs = {name: float(np.abs(o - ref).max() / scale) for name, o in outputs.items()
                 if name != "torch"}
        per_round = sum(_timed(fn, run)[0] for fn in fns.values())
        left = end_time - time.monotonic()
        reps = max(1, min(s.reps, int(left / (2 * max(per_round, 1e-6)))))
        wall: dict[str, list[float]] = {name: [] for name in fns}
        event: dict[str, list[float]] = {name: [] for name in fns}
        rng = np.random.default_rng(s.seed)
        names = list(fns)
        for _ in range(reps):
            for i in rng.permutation(len(names)):
                w, e, _ = _timed(fns[names[i]], run)
                wall[names[i]].append(w)
                if e is not None:
                    event[names[i]].append(e)
        med = {name: float(np.median(v)) for name, v in wall.items()}
        entry = {
            "reps": reps,
            "wall_s_median": med,
            "event_s_median": {name: float(np.median(v)) for name, v in event.items() if v},
            "wall_s_all": wall,
            "ratios_wall": {f"{name}_over_torch": med[name] / med["torch"] for name in med
                            if name != "torch"},
            "max_rel_diff_vs_torch": diffs,
            "host_bytes_per_product_scipy": 2 * X_np[:, : 1 if kind == "matvec" else 8].nbytes,
        }
        if "cupy" not in fns:
            entry["cupy"] = section["cupy"]
        with run.recorder.change():
            section[kind] = entry
            section["cache"] = json_ready(getattr(op, "cache_info", None))
        run.say(f"matvec_cost {kind}: " + ", ".join(f"{k} {v * 1e3:.2f} ms"
                                                     for k, v in med.items()))
    view = host = op = problem = None
    free(run.device)
