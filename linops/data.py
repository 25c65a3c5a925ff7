"""Data sources: re-iterable collections of batches.

Every product makes a full pass over the data, so the data must be replayable: a
list or tuple of batches, a ``DataLoader`` (or any iterable that is not its own
iterator), or a zero-argument callable returning a fresh iterator. A single batch
(an ``(inputs, targets)`` pair or one dict) is accepted and wrapped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.data import (
    DataLoader,
    RandomSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

from .checks import check_batch_inputs
from .objective import Count, Objective

#: Samplers that draw a new order on every pass over a ``DataLoader``.
_REORDERING_SAMPLERS = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)


def _is_single_batch(data: Any) -> bool:
    if isinstance(data, dict):
        return True
    # (inputs, targets) with a tensor target; a list of two batches has batches as items.
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor)


def _reorders(data: Any) -> bool:
    """Whether ``data`` is a ``DataLoader`` known to draw a new order on every pass."""
    if not isinstance(data, DataLoader):
        return False
    samplers = [data.sampler, getattr(data.batch_sampler, "sampler", None)]
    return any(isinstance(s, _REORDERING_SAMPLERS) for s in samplers)


class DataSource:
    """A replayable sequence of batches.

    Args:
        data: Batches (see the module docstring).

    Attributes:
        single_batch: Whether ``data`` was one batch (wrapped).
        reorders: Whether ``data`` is a ``DataLoader`` whose sampler draws a new order
            on every pass (``shuffle=True``, a random sampler). Other sources may still
            reorder; :class:`DataFingerprint` finds those.

    Raises:
        TypeError: For a one-shot iterator or generator, or an object that cannot be
            iterated.
        ValueError: For an empty collection.
    """

    def __init__(self, data: Any) -> None:
        if data is None:
            raise ValueError("data is empty (None)")
        self.reorders = _reorders(data)
        if _is_single_batch(data):
            self._factory: Callable[[], Iterator[Any]] = lambda: iter([data])
            self.single_batch = True
            return
        self.single_batch = False
        if callable(data) and not isinstance(data, Iterable):
            self._factory = data
            return
        if not isinstance(data, Iterable):
            raise TypeError(f"data of type {type(data).__name__} is not iterable")
        if iter(data) is data:
            raise TypeError(
                "data is a one-shot iterator/generator; curvature products replay the data "
                "on every product: pass a list of batches, a DataLoader, or a zero-argument "
                "callable that returns a fresh iterator"
            )
        if isinstance(data, (list, tuple)) and len(data) == 0:
            raise ValueError("data is empty: no batches")
        self._factory = lambda: iter(data)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._factory())


class DataFingerprint:
    """Cheap summaries of one pass over the data, to compare with another pass.

    ``content``: per tensor position in the batch structure, the float64 sum and sum of
    squares over the whole pass (order-independent: shuffling keeps it, new data does
    not). ``order`` (when asked for): per batch, each example's float64 sum of every tensor
    leaf, in iteration order (a reordering changes it).

    Args:
        order: Also record the order summary.
    """

    def __init__(self, *, order: bool = False) -> None:
        self.content: list[Tensor] | None = None
        self.order: list[Tensor] | None = [] if order else None
        self._structure_changed = False

    def add(self, batch: Any) -> None:
        """Add one batch."""
        leaves = [t.detach() for t in tree_flatten(batch)[0] if isinstance(t, Tensor)]
        stats = [torch.stack([t.double().sum(), t.double().square().sum()]).cpu() for t in leaves]
        if self.content is None:
            self.content = stats
        elif len(stats) != len(self.content):
            self._structure_changed = True  # never equal to another pass
        else:
            self.content = [a + b for a, b in zip(self.content, stats, strict=True)]
        if self.order is not None:
            per_example = [
                t.reshape(t.shape[0], -1).double().sum(1) if t.dim() else t.double().reshape(1)
                for t in leaves
            ]
            self.order.append(torch.cat(per_example).cpu() if per_example else torch.zeros(0))

    def same_content(self, other: DataFingerprint) -> bool:
        """Whether the two passes held the same examples, in any order."""
        if self._structure_changed or other._structure_changed:
            return False
        a, b = self.content, other.content
        return (
            a is not None
            and b is not None
            and len(a) == len(b)
            and all(torch.allclose(x, y, rtol=1e-9, atol=0.0, equal_nan=True) for x, y in zip(a, b))
        )

    def same_order(self, other: DataFingerprint) -> bool:
        """Whether the two passes gave the same examples in the same order (needs ``order``)."""
        a, b = self.order, other.order
        assert a is not None and b is not None, "both fingerprints need order=True"
        return len(a) == len(b) and all(
            x.shape == y.shape and torch.allclose(x, y, rtol=1e-9, atol=0.0, equal_nan=True)
            for x, y in zip(a, b)
        )


def survey_data(
    source: DataSource,
    objective: Objective,
    dtype: torch.dtype,
    fingerprint: DataFingerprint | None = None,
) -> Count:
    """One pass over the data without forward passes: count it and refuse bad batches.

    Every batch is validated by the objective (targets) and its model inputs by
    :func:`~curvops.linops.checks.check_batch_inputs` (finite, the model's dtype, the
    first batch's feature size).

    Args:
        source: The data.
        objective: Counts and validates batches; names their model inputs.
        dtype: The model's dtype (:func:`~curvops.linops.params.model_dtype`).
        fingerprint: Summarises the pass too, if given.

    Returns:
        Examples and loss terms over the whole data.

    Raises:
        ValueError: For data without examples or loss terms, or a bad batch.
        TypeError: For a bad batch.
    """
    total = Count(0, 0)
    first = None
    for index, batch in enumerate(source):
        total = total + objective.count(batch)
        shapes = check_batch_inputs(index, objective.input_tensors(batch), dtype, first)
        first = shapes if first is None else first
        if fingerprint is not None:
            fingerprint.add(batch)
    if total.examples == 0 or total.terms == 0:
        raise ValueError("data is empty: no examples / loss terms")
    return total


def _leading_size(batch: Any) -> int:
    """The examples of a batch: the common leading size of its tensor leaves."""
    sizes = {int(t.shape[0]) for t in tree_flatten(batch)[0] if isinstance(t, Tensor) and t.dim()}
    if len(sizes) != 1:
        raise ValueError(
            "cannot shard a batch whose tensors do not share one leading (example) dimension "
            f"(leading sizes {sorted(sizes)})"
        )
    return sizes.pop()


def shard_batches(batches: Iterable[Any], rank: int, world: int) -> list[Any]:
    """Rank ``rank``'s contiguous share of the examples of ``batches``, in their order.

    The examples, counted along the leading dimension of every batch's tensors, are cut
    into ``world`` contiguous ranges as equal as possible (the first ``N mod world`` ranks
    hold one more); each rank keeps the slices of the batches that fall into its range. The
    ranks' shards in rank order are the data in its order, so operators keyed by the global
    example index (the Monte-Carlo Fisher) are the same matrix on any number of ranks.

    Args:
        batches: Batches whose tensor leaves all index examples along dimension 0
            (``(inputs, targets)`` pairs, HuggingFace dicts), or one such batch.
        rank: This process's rank, ``0 <= rank < world``.
        world: The number of ranks.

    Returns:
        The rank's batches (slices of the given ones; none empty).

    Raises:
        ValueError: For a rank outside ``[0, world)``, fewer examples than ranks, or a batch
            whose tensors disagree on the leading size.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside [0, {world})")
    batches = [batches] if _is_single_batch(batches) else list(batches)
    sizes = [_leading_size(b) for b in batches]
    total = sum(sizes)
    if total < world:
        raise ValueError(f"cannot shard {total} examples over {world} ranks: each needs one")
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    shard, offset = [], 0
    for batch, size in zip(batches, sizes, strict=True):
        lo, hi = max(start, offset), min(stop, offset + size)
        if lo < hi:
            shard.append(
                tree_map(
                    lambda t, a=lo - offset, b=hi - offset: (
                        t[a:b] if isinstance(t, Tensor) and t.dim() else t
                    ),
                    batch,
                )
            )
        offset += size
    return shard
