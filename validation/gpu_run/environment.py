"""The device and the versions of everything the run uses, recorded once at its start."""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import platform
import subprocess
from typing import Any

import numpy as np
import torch

__all__ = ["environment"]


def _version(module: str) -> str | None:
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Device name and memory, and the versions of python, torch, CUDA, cupy, scipy, ..."""
    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "cuda_torch_built_with": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "transformers": _version("transformers"), "scipy": _version("scipy"),
        "numpy": np.__version__, "cupy": _version("cupy"), "curvops": None,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }
    with contextlib.suppress(Exception):
        env["curvops"] = importlib.metadata.version("curvops")
    if env["cupy"] is not None:
        with contextlib.suppress(Exception):
            import cupy  # optional: the gpu extra

            env["cupy_cuda_runtime"] = int(cupy.cuda.runtime.runtimeGetVersion())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"] = {"name": props.name, "total_memory_bytes": int(props.total_memory),
                         "capability": f"{props.major}.{props.minor}",
                         "multiprocessors": props.multi_processor_count}
        with contextlib.suppress(Exception):
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,memory.total,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
            env["nvidia_smi"] = smi.stdout.strip() or None
    else:
        env["device"] = {"name": "cpu", "total_memory_bytes": None, "capability": None,
                         "processor": platform.processor() or platform.machine()}
    return env
