"""Memory and failures on the device: figures, measured blocks, cleanup, out-of-memory records.

Also what puts a problem on the device (:func:`on_device`) and whether the cupy view can be
used there (:func:`cupy_problem`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from collections.abc import Iterator
from typing import Any

import torch
from curvops.linops.memory_probe import peak_memory

from ..zoo import ZooProblem

__all__ = [
    "GIB",
    "cupy_problem",
    "error_record",
    "free",
    "is_oom",
    "measured",
    "memory_figures",
    "move",
    "on_device",
]

GIB = 2**30


def free(device: torch.device) -> None:
    """Give memory back between steps (the caller has dropped its references).

    On CUDA: collect reference cycles (a full ``gc`` pass, a fraction of a second with
    transformers loaded) and return the cached blocks to the device. On a CPU, reference
    counting has freed the tensors already and the pass would only cost time.
    """
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is an out-of-memory error (CUDA's, or the host allocator's)."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, (RuntimeError, MemoryError)) and (
        "out of memory" in text or "can't allocate memory" in text or isinstance(err, MemoryError))


def memory_figures(device: torch.device) -> dict[str, Any]:
    """Allocated, peak, reserved, free and total device memory, in bytes (None on a CPU)."""
    if device.type != "cuda":
        return {"allocated_bytes": None, "max_allocated_bytes": None, "free_bytes": None,
                "total_bytes": None}
    free_bytes, total = torch.cuda.mem_get_info(device)
    return {"allocated_bytes": torch.cuda.memory_allocated(device),
            "max_allocated_bytes": torch.cuda.max_memory_allocated(device),
            "reserved_bytes": torch.cuda.memory_reserved(device),
            "free_bytes": int(free_bytes), "total_bytes": int(total)}


def error_record(err: BaseException, device: torch.device) -> dict[str, Any]:
    """``OOM`` (with the memory figures at the failure) or ``error``, and the message."""
    first = str(err).strip().splitlines()[0][:400] if str(err).strip() else ""
    if is_oom(err):
        return {"status": "OOM", "error": f"{type(err).__name__}: {first}",
                "memory_at_failure": memory_figures(device)}
    return {"status": "error", "error": f"{type(err).__name__}: {first}"}


@contextlib.contextmanager
def measured(device: torch.device) -> Iterator[dict[str, Any]]:
    """Wall time and peak memory of a block.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` at entry
    (absolute, and above the allocation at entry). CPU: the resident-set peak above entry,
    sampled (:func:`curvops.linops.memory_probe.peak_memory`, a lower bound).
    """
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    with peak_memory(device) as mem:
        try:
            yield out
        finally:
            out["seconds"] = time.perf_counter() - t0
    out["peak_above_before_bytes"] = int(mem["peak_bytes"])
    out["max_memory_allocated_bytes"] = mem.get("max_allocated_bytes")
    if device.type == "cuda":
        out["allocated_before_bytes"] = int(mem["base_bytes"])


def move(x: Any, device: torch.device) -> Any:
    """``x`` (a tensor, or tuples, lists and dicts of them) on ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(move(t, device) for t in x)
    if isinstance(x, dict):
        return {k: move(v, device) for k, v in x.items()}
    return x


def on_device(problem: ZooProblem, device: torch.device) -> ZooProblem:
    """The zoo problem with its model and data on ``device`` (the model is moved in place)."""
    return dataclasses.replace(problem, model=problem.model.to(device),
                               data=move(problem.data, device))


def cupy_problem(device: torch.device) -> str | None:
    """Why the cupy view cannot be used here (None: it can)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import cupy  # optional: the gpu extra

        if not cupy.cuda.is_available():
            return "cupy sees no CUDA device"
    except Exception as err:  # ImportError, or cupy's own CUDA runtime errors
        return f"cupy unavailable ({type(err).__name__}: {err})"
    return None
