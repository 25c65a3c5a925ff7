"""The scipy view of an operator: a ``scipy.sparse.linalg.LinearOperator``.

numpy arrays in and out; each product converts the block of vectors once (one
batched ``matmat``, never a loop over columns). float32 and float64 views only:
bf16/fp16 operators are viewed in float32, the one documented conversion.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator

_NUMPY_OF_TORCH = {torch.float32: np.float32, torch.float64: np.float64}
_TORCH_OF_NUMPY = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


def view_dtype(op_dtype: torch.dtype, dtype: Any) -> np.dtype:
    """The numpy dtype of a view: the requested one, else the operator's (fp32 for bf16/fp16).

    Raises:
        TypeError: For a dtype other than float32 / float64.
    """
    if dtype is None:
        return np.dtype(_NUMPY_OF_TORCH.get(op_dtype, np.float32))
    if isinstance(dtype, torch.dtype):
        dtype = _NUMPY_OF_TORCH.get(dtype, dtype)
    try:
        dt = np.dtype(dtype)
    except TypeError as err:
        raise TypeError(f"view dtype must be float32 or float64, got {dtype!r}") from err
    if dt not in _TORCH_OF_NUMPY:
        raise TypeError(f"view dtype must be float32 or float64, got {dt}")
    return dt


class ScipyView(LinearOperator):
    """``scipy.sparse.linalg.LinearOperator`` over a curvops operator.

    Args:
        op: Any curvops operator (``shape``, ``dtype``, ``device``, ``matmat``).
        dtype: ``numpy.float32`` or ``numpy.float64`` (see :func:`view_dtype`).
    """

    def __init__(self, op: Any, dtype: Any = None) -> None:
        self.op = op
        super().__init__(dtype=view_dtype(op.dtype, dtype), shape=op.shape)

    def _torch_product(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X)
        squeeze = X.ndim == 1
        X2 = X.reshape(X.shape[0], -1)
        V = torch.from_numpy(np.ascontiguousarray(X2, dtype=self.dtype))
        V = V.to(device=self.op.device, dtype=self.op.dtype)
        out = self.op.matmat(V).to(dtype=_TORCH_OF_NUMPY[self.dtype]).cpu().numpy()
        return out[:, 0] if squeeze else out

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._torch_product(x)

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        return self._torch_product(X)

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._torch_product(x)

    def _rmatmat(self, X: np.ndarray) -> np.ndarray:
        return self._torch_product(X)

    def _adjoint(self) -> ScipyView:
        return self


def to_scipy(op: Any, dtype: Any = None) -> ScipyView:
    """The scipy view of ``op`` (see :class:`ScipyView`)."""
    return ScipyView(op, dtype)
