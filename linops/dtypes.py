"""The floating dtypes curvops computes in: their names, which are low precision, and the
dtype arithmetic on them runs in.

The one table of dtype names (``"float32"`` <-> ``torch.float32``) for command lines,
reports and result metadata, and the one set of low-precision dtypes (bf16, fp16) whose
products are accumulated and whose Krylov bases are recovered in a wider dtype.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "DTYPES_BY_NAME",
    "FLOATING_DTYPES",
    "LOW_PRECISION",
    "TORCH_OF_NUMPY",
    "dtype_from_name",
    "dtype_name",
    "working_dtype",
]

#: The floating dtypes of parameters and operators, widest first (a flat parameter vector
#: takes the widest of its parameters' dtypes).
FLOATING_DTYPES: tuple[torch.dtype, ...] = (
    torch.float64,
    torch.float32,
    torch.bfloat16,
    torch.float16,
)

#: bf16 (8 mantissa bits) and fp16 (11): too coarse to accumulate sums of products in.
LOW_PRECISION: frozenset[torch.dtype] = frozenset({torch.bfloat16, torch.float16})


def dtype_name(dtype: torch.dtype) -> str:
    """The name of a torch dtype without the module prefix: ``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


#: Name -> torch dtype of every floating dtype (``"bfloat16"`` -> ``torch.bfloat16``).
DTYPES_BY_NAME: dict[str, torch.dtype] = {dtype_name(d): d for d in FLOATING_DTYPES}

#: numpy dtype -> torch dtype of the floating dtypes numpy has (it has no bfloat16).
TORCH_OF_NUMPY: dict[np.dtype, torch.dtype] = {
    np.dtype(np.float64): torch.float64,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float16): torch.float16,
}


def dtype_from_name(name: str) -> torch.dtype:
    """The floating torch dtype called ``name`` (``"float32"``, ``"bfloat16"``, ...).

    Raises:
        ValueError: For a name not in :data:`DTYPES_BY_NAME`.
    """
    try:
        return DTYPES_BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown dtype {name!r}; choose from {', '.join(DTYPES_BY_NAME)}"
        ) from None


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums and vector arithmetic on ``dtype`` data run in.

    float64 stays float64; everything narrower runs in float32, so bf16/fp16 sums do not
    lose the small terms to rounding and float32 data is not widened for nothing.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32
