"""Operator algebra: sums, scalings and the identity (for damping ``A + λI``)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor

from .base import LinearOperatorBase
from .checks import as_real


class IdentityOperator(LinearOperatorBase):
    """The identity on ``n``-vectors.

    Args:
        n: Dimension.
        dtype: Vector dtype.
        device: Vector device.
    """

    is_psd = True

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.shape = (int(n), int(n))
        self.dtype = dtype
        self.device = torch.device(device)

    @classmethod
    def like(cls, op: LinearOperatorBase) -> IdentityOperator:
        """The identity on ``op``'s space."""
        return cls(op.shape[0], op.dtype, op.device)

    def _matmat(self, V: Tensor) -> Tensor:
        return V.clone()


class ScaledOperator(LinearOperatorBase):
    """``scalar · A``."""

    def __init__(self, op: LinearOperatorBase, scalar: float) -> None:
        self.op, self.scalar = op, float(scalar)
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device
        self.is_psd = op.is_psd and self.scalar >= 0.0

    def _matmat(self, V: Tensor) -> Tensor:
        return self.scalar * self.op._matmat(V)

    def parameters_fixed(self) -> contextlib.AbstractContextManager:
        return self.op.parameters_fixed()

    def __mul__(self, scalar: object) -> LinearOperatorBase:
        factor = as_real(scalar)
        if factor is None:
            return NotImplemented
        return ScaledOperator(self.op, self.scalar * factor)

    __rmul__ = __mul__


class SumOperator(LinearOperatorBase):
    """``A₁ + A₂ + …`` on one space.

    Raises:
        ValueError: If shapes or devices differ.
        TypeError: If dtypes differ (no silent cast).
    """

    def __init__(self, ops: Sequence[LinearOperatorBase]) -> None:
        flat: list[LinearOperatorBase] = []
        for op in ops:
            flat.extend(op.ops if isinstance(op, SumOperator) else [op])
        first = flat[0]
        for op in flat[1:]:
            if op.shape != first.shape:
                raise ValueError(f"cannot add operators of shapes {first.shape} and {op.shape}")
            if op.dtype != first.dtype:
                raise TypeError(f"cannot add operators of dtypes {first.dtype} and {op.dtype}")
            if op.device != first.device:
                raise ValueError(f"cannot add operators on {first.device} and {op.device}")
        self.ops = flat
        self.shape, self.dtype, self.device = first.shape, first.dtype, first.device
        self.is_psd = all(op.is_psd for op in flat)

    def parameters_fixed(self) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        with stack:  # exits what was entered if a later entry fails
            for op in self.ops:
                stack.enter_context(op.parameters_fixed())
            return stack.pop_all()

    def _matmat(self, V: Tensor) -> Tensor:
        out = self.ops[0]._matmat(V)
        for op in self.ops[1:]:
            out = out + op._matmat(V)
        return out
