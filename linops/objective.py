r"""Objectives: how a model, a batch and a loss become rows of predictions and targets.

The total loss is :math:`L = c \sum_n \ell_n` with :math:`\ell_n` example ``n``'s loss
summed over its loss terms and :math:`c` the normaliser (``1`` for ``sum``, ``1 /``
number of loss terms for ``mean``). An :class:`Objective` maps a batch to
:class:`Rows` (predictions ``(R, C)``, targets, and the example of each row), counts
examples and loss terms without a forward pass, and splits batches into
micro-batches. :class:`TorchObjective` serves plain modules with a torch loss;
``curvops.linops.hf`` provides the language-model objective.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .checks import explain_input_dtype_error
from .losses import LossKind, TorchLoss
from .params import model_dtype


@dataclass
class Rows:
    """A batch as rows of the loss.

    Attributes:
        predictions: ``(R, C)`` model outputs, differentiable in the parameters.
        targets: ``(R,)`` class indices (cross-entropy) or ``(R, C)`` values.
        example_index: ``(R,)`` index of each row's example within the batch,
            non-decreasing.
        num_examples: Number of examples in the batch.
    """

    predictions: Tensor
    targets: Tensor
    example_index: Tensor
    num_examples: int


@dataclass(frozen=True)
class Count:
    """Examples and loss terms of a batch (or of the whole data)."""

    examples: int
    terms: int

    def __add__(self, other: Count) -> Count:
        return Count(self.examples + other.examples, self.terms + other.terms)


class Objective(ABC):
    """What the operators need to know about a model's loss on a batch.

    Attributes:
        kind: The row loss (cross-entropy, squared error, BCE with logits).
        normalization: Name of the normaliser (``"mean"``, ``"sum"``, ``"token"``,
            ``"sequence"``), recorded in results.
        sample_unit: What one example is (``"example"``, ``"sequence"``).
    """

    kind: LossKind
    normalization: str
    sample_unit: str

    @abstractmethod
    def count(self, batch: Any) -> Count:
        """Validate ``batch`` and count its examples and loss terms (no forward pass)."""

    @abstractmethod
    def normalizer(self, total: Count) -> float:
        """The factor ``c`` of the total loss, given the whole data's count."""

    @abstractmethod
    def split(self, batch: Any, size: int) -> list[Any]:
        """Split ``batch`` into micro-batches of at most ``size`` examples."""

    @abstractmethod
    def rows(self, model: nn.Module, params: dict[str, Tensor], batch: Any) -> Rows:
        """Forward ``batch`` through ``model`` with ``params`` substituted; return rows."""

    def product_context(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """A context every product runs under (e.g. an attention kernel that supports it)."""
        return contextlib.nullcontext()

    def input_tensors(self, batch: Any) -> list[tuple[str, Tensor]]:
        """The tensors of ``batch`` the model receives, named for error messages.

        The operators check them at construction (finite, the model's dtype, the same
        feature size in every batch; :func:`~curvops.linops.checks.check_batch_inputs`).
        The default lists none: only an objective that knows which tensors are model
        inputs (not masks or labels) lists them.
        """
        return []


def _slice_inputs(x: Any, start: int, stop: int) -> Any:
    if isinstance(x, Tensor):
        return x[start:stop]
    if isinstance(x, (tuple, list)):
        return type(x)(_slice_inputs(t, start, stop) for t in x)
    if isinstance(x, dict):
        return {k: _slice_inputs(v, start, stop) for k, v in x.items()}
    return x


class OwnParameters(dict):
    """A parameter dict that is exactly the model's own parameters (nothing substituted).

    Objectives receive it like any parameter dict; :func:`call_with_inputs` then calls the
    model directly instead of through ``functional_call``, whose module walk and parameter
    swap cost ~45 us per forward of a 3-layer MLP, repeated on every product. An empty
    instance says the same without listing the parameters (the hot path of every product).
    """


def _named_tensors(x: Any, name: str) -> list[tuple[str, Tensor]]:
    """The tensor leaves of ``x`` (a tensor, tuple/list or dict), named like ``name[0]['k']``."""
    if isinstance(x, Tensor):
        return [(name, x)]
    if isinstance(x, (tuple, list)):
        return [leaf for i, item in enumerate(x) for leaf in _named_tensors(item, f"{name}[{i}]")]
    if isinstance(x, dict):
        return [leaf for k, v in x.items() for leaf in _named_tensors(v, f"{name}[{k!r}]")]
    return []


def call_with_inputs(model: nn.Module, params: dict[str, Tensor], inputs: Any) -> Any:
    """``model(inputs)`` with ``params`` substituted (tensor, tuple of args, or dict of kwargs)."""
    if isinstance(params, OwnParameters):
        if isinstance(inputs, dict):
            return model(**inputs)
        if isinstance(inputs, (tuple, list)):
            return model(*inputs)
        return model(inputs)
    if isinstance(inputs, dict):
        return functional_call(model, params, args=(), kwargs=inputs)
    if isinstance(inputs, (tuple, list)):
        return functional_call(model, params, args=tuple(inputs))
    return functional_call(model, params, args=(inputs,))


class TorchObjective(Objective):
    """A plain module with a torch loss on ``(inputs, targets)`` batches.

    ``inputs`` is a tensor, a tuple of positional arguments or a dict of keyword
    arguments; their first dimension indexes examples. Cross-entropy accepts outputs
    ``(N, C, d1, ...)`` with targets ``(N, d1, ...)`` (each position one loss term,
    ``-100`` ignored); MSE and BCE need outputs and targets of the same shape, each
    example one row.

    Args:
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``.
    """

    sample_unit = "example"

    def __init__(self, loss_fn: nn.Module) -> None:
        self.loss = TorchLoss.from_module(loss_fn)
        self.kind = self.loss.kind
        self.normalization = self.loss.reduction

    @staticmethod
    def _unpack(batch: Any) -> tuple[Any, Tensor]:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(
                f"a batch must be an (inputs, targets) pair, got {type(batch).__name__}"
            )
        inputs, targets = batch
        if not isinstance(targets, Tensor):
            raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
        return inputs, targets

    def count(self, batch: Any) -> Count:
        _, y = self._unpack(batch)
        if y.dim() == 0:
            raise ValueError("targets must have a leading example dimension")
        if self.kind.name == "cross_entropy":
            if y.is_floating_point():
                raise ValueError(
                    "CrossEntropyLoss with probability (float) targets is not supported; "
                    "pass class indices"
                )
            if y.dtype != torch.int64:
                raise TypeError(
                    f"CrossEntropyLoss targets have dtype {y.dtype}; class indices must be "
                    "torch.int64 (long): pass targets.long() (curvops never casts silently)"
                )
            terms = int((y != -100).sum())
        else:
            if not y.is_floating_point():
                raise ValueError(f"{self.kind.name} targets must be floating point, got {y.dtype}")
            terms = y.numel()
        return Count(int(y.shape[0]), terms)

    def normalizer(self, total: Count) -> float:
        return 1.0 if self.normalization == "sum" else 1.0 / total.terms

    def split(self, batch: Any, size: int) -> list[Any]:
        x, y = self._unpack(batch)
        n = int(y.shape[0])
        return [(_slice_inputs(x, i, i + size), y[i : i + size]) for i in range(0, n, size)]

    def input_tensors(self, batch: Any) -> list[tuple[str, Tensor]]:
        """The tensors of ``inputs`` (``"inputs"``, ``"inputs[0]"``, ``"inputs['mask']"``)."""
        return _named_tensors(self._unpack(batch)[0], "inputs")

    def rows(self, model: nn.Module, params: dict[str, Tensor], batch: Any) -> Rows:
        x, y = self._unpack(batch)
        try:
            out = call_with_inputs(model, params, x)
        except RuntimeError as err:
            # Integer inputs cannot be refused before the forward pass (embedding layers
            # take them); when the model fails on one, say which input in our words.
            inputs = self.input_tensors(batch)
            explained = explain_input_dtype_error(err, inputs, model_dtype(model))
            if explained is None:
                raise
            raise explained from err
        if not isinstance(out, Tensor):
            raise TypeError(f"the model must return a tensor, got {type(out).__name__}")
        n = int(y.shape[0])
        if out.shape[0] != n:
            raise ValueError(f"model output has {out.shape[0]} examples, targets {n}")
        if self.kind.name == "cross_entropy":
            if out.dim() != y.dim() + 1 or out.shape[2:] != y.shape[1:]:
                raise ValueError(
                    f"cross-entropy needs outputs (N, C, ...) and targets (N, ...); got "
                    f"{tuple(out.shape)} and {tuple(y.shape)}"
                )
            C = out.shape[1]
            per_example = math.prod(y.shape[1:]) if n else 0  # no tensor op: every product
            # (N, C) outputs are used as they are: a no-op reshape still adds a view to the
            # graph, which every Hessian product differentiates twice.
            F_ = out if out.dim() == 2 else out.movedim(1, -1).reshape(-1, C)
            Y = y.reshape(-1)
            ex = torch.arange(n, device=out.device)
            if per_example != 1:
                ex = ex.repeat_interleave(per_example)
            if not Y.numel():
                return Rows(F_, Y, ex, n)
            # One synchronisation in the usual case (no -100, valid classes): every product
            # runs this.
            lo, hi = torch.stack(torch.aminmax(Y)).tolist()
            if lo < 0:  # ignored positions (or invalid targets)
                keep = Y != -100
                F_, Y, ex = F_[keep], Y[keep], ex[keep]
                lo, hi = torch.stack(torch.aminmax(Y)).tolist() if Y.numel() else (0, 0)
            if lo < 0 or hi >= C:
                raise ValueError(f"class targets must lie in [0, {C}) or be -100")
            return Rows(F_, Y, ex, n)
        if out.shape != y.shape:
            raise ValueError(
                f"{self.kind.name} needs outputs and targets of the same shape; got "
                f"{tuple(out.shape)} and {tuple(y.shape)}"
            )
        if y.dtype != out.dtype:
            raise TypeError(
                f"targets have dtype {y.dtype} but the model outputs {out.dtype}; "
                "convert the targets explicitly (no silent cast)"
            )
        return Rows(out.reshape(n, -1), y.reshape(n, -1), torch.arange(n, device=out.device), n)


def as_objective(loss_fn: Any) -> Objective:
    """An :class:`Objective` from a torch loss module (or an objective, returned as is)."""
    if isinstance(loss_fn, Objective):
        return loss_fn
    if isinstance(loss_fn, nn.Module):
        return TorchObjective(loss_fn)
    raise TypeError(
        f"loss_fn must be a torch loss module or a curvops Objective, got {type(loss_fn).__name__}"
    )
