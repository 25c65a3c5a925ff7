r"""What every operator built from a model, a loss and data sets up first.

The curvature operators (:mod:`curvops.linops.curvature`) and the Gram operator
(:mod:`curvops.linops.gram`) are both about the total loss
:math:`L(\theta) = c \sum_n \ell_n(\theta)` of a model over a data set. Both take
``model, loss_fn, data, params`` and make the same checks before any product:
:class:`EmpiricalRisk` holds them, so they are made once and the same way.

With a ``process_group`` (:mod:`curvops.linops.distributed`) the data set is the union of
the ranks' shards: the counts of examples and loss terms, and so the normaliser ``c``, are
the global ones, and each rank knows the global index of its first example.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .checks import check_finite_parameters, check_materialized, check_no_train_mode_batchnorm
from .data import DataFingerprint, DataSource, survey_data
from .distributed import (
    all_gather_ints,
    check_process_group,
    checksums,
    collective_device,
    collective_step,
    group_rank,
    wrapped_module,
)
from .objective import Count, Objective, as_objective
from .params import ParameterSpace, model_dtype, select_parameters

__all__ = ["EmpiricalRisk"]


class EmpiricalRisk:
    """A model's loss over a data set, checked (a mixin of the operators built from one).

    Attributes:
        model: The network.
        objective: The objective (loss, normalisation, sample unit).
        params: The selected parameters, in flat order.
        space: Their flat parameter space.
        data: The data, as a replayable source.
        total: Examples and loss terms over the whole data, every rank's shard included
            (after :meth:`_survey`).
        local_total: Examples and loss terms of this rank's shard (``total`` without a
            process group).
        example_offset: The global index of this rank's first example: the examples of
            the lower ranks (0 without a process group).
        normalizer: The factor ``c`` of the total loss (after :meth:`_survey`).
        process_group: The ``torch.distributed`` group whose ranks hold the shards, or
            None (one process).
    """

    model: nn.Module
    objective: Objective
    params: list[Tensor]
    space: ParameterSpace
    data: DataSource
    total: Count
    local_total: Count
    example_offset: int = 0
    normalizer: float
    process_group: Any = None

    def _set_up_risk(
        self,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        params: Sequence[nn.Parameter | str] | None,
        process_group: Any = None,
    ) -> None:
        """Check the model, select the parameters, wrap the loss and the data.

        No pass over the data and no forward pass yet. A model wrapped in
        ``DistributedDataParallel`` is replaced by the module it wraps.

        Raises:
            TypeError: For a model that is not an ``nn.Module``, an unsupported loss or a
                parameter of a non-floating dtype or a process group that is not one.
            ValueError: For a DDP model without a process group, a model on the meta
                device, NaN/Inf parameters, BatchNorm in train mode, an empty selection, or
                data that cannot be replayed.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.process_group = check_process_group(process_group)
        model = _unwrap_data_parallel(model, self.process_group)
        check_materialized(model)
        self.model = model
        self.objective = as_objective(loss_fn)
        names, tensors = select_parameters(model, params)
        _refuse_sharded_parameters(names, tensors)
        self.params = tensors
        self.space = ParameterSpace.from_parameters(names, tensors)
        check_finite_parameters(names, tensors)
        check_no_train_mode_batchnorm(model)
        self.data = DataSource(data)

    def _survey(self, fingerprint: DataFingerprint | None = None) -> None:
        """One pass over the data without forward passes: count it, refuse bad batches.

        Sets :attr:`local_total` (see :func:`~curvops.linops.data.survey_data`); without a
        process group also :attr:`total` and :attr:`normalizer` (with one,
        :meth:`_join_ranks` sets them).

        Args:
            fingerprint: Summarises the pass too, if given.
        """
        self.local_total = survey_data(
            self.data, self.objective, model_dtype(self.model), fingerprint
        )
        if self.process_group is None:
            self.total = self.local_total
            self.normalizer = self.objective.normalizer(self.total)

    def _collective_device(self) -> torch.device:
        """Where this operator's collectives take their tensors."""
        return collective_device(self.process_group, self.space.device)

    def _join_ranks(self) -> None:
        r"""Agree on the model with the other ranks, then count the whole data set.

        Two collectives, once at construction: the parameters' checksums (and the flat
        size and dtype) must be equal on every rank; the ranks' counts of examples and loss
        terms are gathered, giving :attr:`total`, :attr:`normalizer` and
        :attr:`example_offset`. No-op without a process group.

        Raises:
            RanksDisagreeError: When the ranks hold different models.
            RankFailedError: When another rank failed or died.
        """
        group = self.process_group
        if group is None:
            return
        device = self._collective_device()
        fingerprint = [
            float(self.space.size),
            float(torch.finfo(self.space.dtype).bits),
            *checksums(self.params),
        ]
        with collective_step(
            group, device, "comparing the models", fingerprint,
            "the model (parameter count, dtype, or values: initialise every rank's model "
            "from the same seed or checkpoint)",
        ):
            pass
        counts = all_gather_ints(
            group, [self.local_total.examples, self.local_total.terms], device
        )
        self.total = Count(sum(c[0] for c in counts), sum(c[1] for c in counts))
        self.example_offset = sum(c[0] for c in counts[: group_rank(group)])
        self.normalizer = self.objective.normalizer(self.total)


def _refuse_sharded_parameters(names: Sequence[str], tensors: Sequence[Tensor]) -> None:
    """Refuse parameters sharded across ranks (``DTensor``, e.g. from FSDP2's ``fully_shard``).

    Double backward through FSDP2's resharding fails or frees the weights the first-order
    graph saved (docs/parallel_wrappers.md); the data-parallel operators need every
    parameter whole on every rank.

    Raises:
        TypeError: For a ``DTensor`` parameter.
    """
    dtensor = getattr(getattr(torch.distributed, "tensor", None), "DTensor", None)
    if dtensor is None:
        return
    for name, t in zip(names, tensors, strict=True):
        if isinstance(t, dtensor):
            raise TypeError(
                f"parameter {name!r} is a DTensor sharded across ranks (FSDP2's fully_shard?): "
                "curvature products need every parameter whole. Build an unwrapped replica "
                "on each rank from {name: p.full_tensor()} and pass it with process_group= "
                "(docs/parallel_wrappers.md)"
            )


def _unwrap_data_parallel(model: nn.Module, group: Any) -> nn.Module:
    """The module inside ``DistributedDataParallel`` (products bypass its gradient hooks).

    DDP averages gradients in hooks that ``.backward()`` fires; curvature products call
    ``torch.autograd.grad`` and sum over the ranks themselves (one all-reduce per product),
    so they run the wrapped module directly, whose parameters are DDP's own. A DDP model
    without a ``process_group`` is refused: its curvature would silently be that of this
    rank's shard alone.

    Raises:
        ValueError: For a DDP model and ``group=None``.
    """
    inner = wrapped_module(model)
    if inner is model:
        return model
    if group is None:
        raise ValueError(
            "the model is wrapped in DistributedDataParallel but process_group is None: the "
            "operator would be the curvature of this rank's shard alone. Pass "
            "process_group=model.process_group (or dist.group.WORLD) for the curvature of all "
            "ranks' data, or model.module for this rank's own"
        )
    return inner
