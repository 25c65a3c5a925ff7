"""Data sources: re-iterable collections of batches.

Every product makes a full pass over the data, so the data must be replayable: a
list or tuple of batches, a ``DataLoader`` (or any iterable that is not its own
iterator), or a zero-argument callable returning a fresh iterator. A single batch
(an ``(inputs, targets)`` pair or one dict) is accepted and wrapped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch import Tensor


def _is_single_batch(data: Any) -> bool:
    if isinstance(data, dict):
        return True
    # (inputs, targets) with a tensor target; a list of two batches has batches as items.
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor)


class DataSource:
    """A replayable sequence of batches.

    Args:
        data: Batches (see the module docstring).

    Raises:
        TypeError: For a one-shot iterator or generator, or an object that cannot be
            iterated.
        ValueError: For an empty collection.
    """

    def __init__(self, data: Any) -> None:
        if data is None:
            raise ValueError("data is empty (None)")
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
