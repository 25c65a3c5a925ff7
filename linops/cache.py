r"""Reusing per-micro-batch work across curvature products.

A Lanczos run multiplies the same operator 20–100 times with the same data. Most of a
fresh product is the forward pass and the first-order graph (for the Hessian the
``create_graph`` gradient, for the GGN/Fisher the predictions and the :math:`J^\top u`
graph); only the last backward pass(es) depend on the vector. :class:`ProductCache`
keeps that prepared state per micro-batch, within a memory budget, and refuses to
serve it once the parameters have changed.

Memory accounting (what ``cache_bytes`` reports) is the memory each state keeps alive,
:func:`curvops.linops.memory_probe.measure_held`:

* CUDA: the growth of ``torch.cuda.memory_allocated`` while a micro-batch's state is
  built and held (the allocator's own count of live tensors).
* CPU: the bytes of the distinct storages the state keeps alive, found by walking its
  autograd graph (every node's ``_saved_*`` tensors) plus the state's own tensors;
  parameters and buffers of the model are not counted (they exist anyway).

Default budget: :data:`DEFAULT_BUDGET_FRACTION` (25 %) of the memory available on the
operator's device when the operator is built
(:func:`~curvops.linops.memory_probe.available_memory_bytes`).

Staleness: a state is tied to the parameter values it was built from. The cache
records a fingerprint of the model's parameters and buffers (object identity, data
pointer, shape, dtype and autograd version counter of each, plus the 2-norm of the
floating ones, which also catches edits through ``.data`` that bypass the version
counter) and rebuilds when it changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .checks import check_int
from .memory_probe import available_memory_bytes

#: Share of the available memory a cache may use when no budget is given.
DEFAULT_BUDGET_FRACTION = 0.25

CACHE_MODES = ("auto", "none")


def default_cache_budget(device: torch.device) -> int:
    """:data:`DEFAULT_BUDGET_FRACTION` of :func:`available_memory_bytes`."""
    return int(DEFAULT_BUDGET_FRACTION * available_memory_bytes(device))


def check_cache_arguments(cache: Any, budget: Any) -> int | None:
    """Validate the ``cache=`` and ``cache_budget_bytes=`` arguments of an operator.

    Returns:
        The budget as a Python int (numpy integers are accepted), or ``None``.

    Raises:
        ValueError: For an unknown mode or a negative budget.
        TypeError: For a budget that is not an int.
    """
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    return check_int("cache_budget_bytes", budget, minimum=0, allow_none=True)


def _named_state(model: nn.Module) -> list[tuple[str, Tensor]]:
    return list(model.named_parameters()) + list(model.named_buffers())


def parameter_fingerprint(model: nn.Module) -> tuple[Any, ...]:
    """A summary of the model's parameters and buffers that changes when they change.

    Identity, data pointer, shape, dtype and version counter of each tensor catch
    optimizer steps, ``copy_``/``load_state_dict`` and replaced tensors; the 2-norm of
    each floating tensor (float32 at least) catches in-place edits through ``.data``
    (which have their own version counter).
    """
    state = _named_state(model)
    meta = tuple((name, id(t), t.data_ptr(), t.shape, t.dtype, t._version) for name, t in state)
    groups: dict[torch.dtype, list[Tensor]] = {}
    for _, t in state:
        if t.is_floating_point() and t.numel():
            groups.setdefault(t.dtype, []).append(t)
    sums: list[float] = []
    with torch.no_grad():  # no graph for the checksums (they run on every cached product)
        for dtype, tensors in groups.items():
            if dtype in (torch.float32, torch.float64):
                norms = torch._foreach_norm(tensors)  # one fused pass
            else:  # bf16/fp16 in float32, so a small update is not lost to rounding
                norms = [torch.linalg.vector_norm(t, dtype=torch.float32) for t in tensors]
            sums += torch.stack(list(norms)).tolist()  # one transfer per dtype
    return (meta, tuple(sums))


@dataclass
class ProductCache:
    """Prepared per-micro-batch states of one operator, within a memory budget.

    The cache is all-or-nothing: it serves products only when every micro-batch's
    state fits the budget together. While the first product runs, each micro-batch's
    state is kept as long as the running total fits; if it would not, everything is
    dropped, the cache is marked as not fitting, and products stay fresh (no retry
    until :meth:`clear`).

    Attributes:
        mode: ``"auto"`` (cache when it fits) or ``"none"`` (always fresh).
        budget_bytes: The most memory the cached states may hold.
        states: The prepared states, one per micro-batch, in data order.
        nbytes: Memory held by ``states``.
        fingerprint: :func:`parameter_fingerprint` at build time.
        complete: Whether ``states`` covers the whole data.
        too_large: Whether the states were found not to fit the budget.
        kind: What the states hold (e.g. ``"graph"``, ``"per_example_gradients"``).
    """

    mode: str
    budget_bytes: int
    states: list[Any] = field(default_factory=list)
    nbytes: int = 0
    fingerprint: tuple[Any, ...] | None = None
    complete: bool = False
    too_large: bool = False
    kind: str | None = None
    builds: int = 0

    @property
    def active(self) -> bool:
        """Whether products are served from cached states."""
        return self.complete

    def clear(self) -> None:
        """Drop every state (and the "does not fit" verdict)."""
        self.states = []
        self.nbytes = 0
        self.fingerprint = None
        self.complete = False
        self.too_large = False
        self.kind = None

    def serving(self, fingerprint: tuple[Any, ...]) -> bool:
        """Whether the complete cache may serve a product now; drops it when stale."""
        if not self.complete:
            return False
        if fingerprint != self.fingerprint:
            too_large = self.too_large
            self.clear()
            self.too_large = too_large
            return False
        return True

    def may_build(self) -> bool:
        """Whether the next fresh pass should try to build the cache."""
        return self.mode == "auto" and not self.complete and not self.too_large

    def offer(self, state: Any, nbytes: int) -> bool:
        """Keep ``state`` if it fits; otherwise drop everything and stop caching.

        Returns:
            Whether caching goes on.
        """
        if self.nbytes + nbytes > self.budget_bytes:
            self.reject()
            return False
        self.states.append(state)
        self.nbytes += nbytes
        return True

    def reject(self) -> None:
        """Give up caching: the states would not fit the budget."""
        self.states = []
        self.nbytes = 0
        self.too_large = True

    def seal(self, fingerprint: tuple[Any, ...], kind: str) -> None:
        """Mark the cache complete, built from parameters with ``fingerprint``."""
        self.fingerprint = fingerprint
        self.complete = True
        self.kind = kind
        self.builds += 1

    def info(self) -> dict[str, Any]:
        """A summary for users: mode, budget, bytes held, whether active and why not."""
        if self.mode == "none":
            reason = "cache='none'"
        elif self.complete:
            reason = "active"
        elif self.too_large:
            reason = "the states do not fit cache_budget_bytes"
        else:
            reason = "not built yet (built by the first product)"
        return {
            "mode": self.mode,
            "active": self.complete,
            "kind": self.kind,
            "bytes": self.nbytes,
            "budget_bytes": self.budget_bytes,
            "micro_batches": len(self.states) if self.complete else 0,
            "builds": self.builds,
            "status": reason,
        }
