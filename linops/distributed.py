r"""Data-parallel operators on ``torch.distributed``: every rank holds a shard of the data.

An operator built with ``process_group=`` is the curvature of the loss over the union of
the ranks' shards. Rank :math:`r` holds examples :math:`S_r`; with the global normaliser
:math:`c` (from the counts of all shards, all-reduced once at construction),

.. math:: A v = \sum_r \Big( c \sum_{n \in S_r} A_n v \Big),

so a product is the rank's local product followed by one ``all_reduce`` (sum) of the
``n`` values of the result. The ranks' solvers run in lockstep: they draw the same
random numbers from the same seed, and after each ``all_reduce`` every rank holds the
same bits, so they compute the same vectors and return the same results.

Two guards keep a distributed run from hanging or going wrong without a word:

* **Collective steps.** Every local step that precedes a collective (construction's
  checks, a product's local work) runs inside :func:`collective_step`: a rank whose step
  raises still joins the one small status ``all_reduce`` that follows it, with its rank
  as a failure flag, and then raises its own error; the other ranks read the flag and
  raise :class:`RankFailedError` instead of waiting for a collective that never comes.
  A rank that dies (killed, ``os._exit``) breaks the connection, and the collective on
  the others raises; a rank that stops elsewhere is ended by the process group's
  ``timeout`` (``init_process_group(..., timeout=...)``).
* **Agreement.** The same status ``all_reduce`` carries checksums of what must be equal
  on every rank (the parameters at construction, the vectors at every product); ranks that
  disagree raise :class:`RanksDisagreeError` (different seeds, start vectors or models).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "RankFailedError",
    "RanksDisagreeError",
    "all_gather_ints",
    "check_process_group",
    "checksums",
    "collective_device",
    "collective_step",
    "group_rank",
    "group_size",
    "is_main_rank",
    "sum_across",
    "wrapped_module",
]


class RankFailedError(RuntimeError):
    """Another rank of the process group failed (or died) during a collective step."""


class RanksDisagreeError(ValueError):
    """The ranks hold different values of what must be equal on all (model, vectors)."""


def _dist():
    """``torch.distributed``, or an error where this torch build has none."""
    if not torch.distributed.is_available():
        raise RuntimeError("process_group needs torch.distributed, which this torch build lacks")
    return torch.distributed


def wrapped_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module a ``DistributedDataParallel`` wraps (the same parameter tensors), or
    ``model`` itself when it is not wrapped."""
    ddp = getattr(torch.nn.parallel, "DistributedDataParallel", None)
    return model.module if ddp is not None and isinstance(model, ddp) else model


def check_process_group(group: Any) -> Any:
    """Return ``group`` (None: one process) after checking it can carry collectives.

    Args:
        group: None, or a ``torch.distributed`` process group (``dist.group.WORLD`` or one
            from ``dist.new_group``) of which this process is a member.

    Raises:
        TypeError: For something that is not a process group.
        RuntimeError: When ``torch.distributed`` is not initialised, or this process is not
            a member of ``group``.
    """
    if group is None:
        return None
    dist = _dist()
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be a torch.distributed ProcessGroup (e.g. "
            f"dist.group.WORLD) or None, got {type(group).__name__}"
        )
    if not dist.is_initialized():
        raise RuntimeError(
            "process_group was given but torch.distributed is not initialised: call "
            "torch.distributed.init_process_group(...) first (torchrun sets the environment)"
        )
    if dist.get_rank(group) < 0:
        raise RuntimeError("this process is not a member of the given process_group")
    return group


def group_rank(group: Any) -> int:
    """This process's rank in ``group`` (0 without a group)."""
    return 0 if group is None else _dist().get_rank(group)


def group_size(group: Any) -> int:
    """The number of ranks of ``group`` (1 without a group)."""
    return 1 if group is None else _dist().get_world_size(group)


def is_main_rank(group: Any = None) -> bool:
    """Whether this process prints and writes for ``group``: its rank 0, or the only process.

    Without a group, a process launched by ``torchrun`` with ``torch.distributed``
    initialised counts as main only on global rank 0.
    """
    if group is not None:
        return group_rank(group) == 0
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def collective_device(group: Any, fallback: torch.device) -> torch.device:
    """Where the group's collectives take their tensors: the current CUDA device for NCCL,
    else ``fallback`` when it is a device the backend takes, else the CPU."""
    backend = str(_dist().get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    if fallback.type == "cuda" and "gloo" not in backend:
        return fallback
    return torch.device("cpu")


#: Entries converted to float64 at a time by :func:`checksums` (8 MiB of float64).
_CHECKSUM_CHUNK = 2**20


def checksums(tensors: Sequence[Tensor], max_entries: int | None = None) -> list[float]:
    r"""Two float64 sums that equal on two ranks when ``tensors`` hold the same bits:
    :math:`\sum x` and :math:`\sum x^2` (NaN-free inputs).

    Summed in float64 a chunk at a time (no float64 copy of a whole tensor), with one host
    synchronisation. With ``max_entries``, each tensor contributes an evenly strided
    sample of at most that many entries: enough to tell apart the vectors of two solvers
    out of lockstep (they differ in almost every entry), at a cost independent of ``n``.
    """
    if not tensors:
        return [0.0, 0.0]
    device = tensors[0].device
    acc = torch.zeros(2, dtype=torch.float64, device=device)
    for t in tensors:
        flat = t.detach().reshape(-1)
        if max_entries is not None and flat.numel() > max_entries:
            flat = flat[:: -(-flat.numel() // max_entries)]
        for start in range(0, flat.numel(), _CHECKSUM_CHUNK):
            chunk = flat[start : start + _CHECKSUM_CHUNK].to(device=device, dtype=torch.float64)
            acc[0] += chunk.sum()
            acc[1] += chunk.square().sum()
    return acc.tolist()


@contextlib.contextmanager
def collective_step(
    group: Any,
    device: torch.device,
    what: str,
    agree: Sequence[float] = (),
    agree_what: str = "",
) -> Iterator[None]:
    """Run a local step, then agree with every rank that all succeeded (and on ``agree``).

    Without a group the block runs as it is. With one, an exception inside the block is
    held, the rank joins one ``all_reduce`` (max) of the status vector ``[failed rank + 1,
    agree..., -agree...]`` (a failed rank sends ``-inf`` for the values, neutral for the
    max), and then raises it; the other ranks raise :class:`RankFailedError` naming the
    failed rank. Every rank must pass as many ``agree`` values.

    Args:
        group: The process group, or None.
        device: The device of the caller's tensors; the status tensor lives where the
            group's backend takes it (:func:`collective_device`).
        what: The step, for messages (e.g. ``"the product"``).
        agree: Values that must be equal on every rank.
        agree_what: What those values summarise, for the disagreement message.

    Raises:
        RankFailedError: Another rank failed in its step, or the collective itself failed
            (a rank died or the group timed out).
        RanksDisagreeError: The ranks' ``agree`` values differ.
    """
    if group is None:
        yield
        return
    dist = _dist()
    device = collective_device(group, device)
    values = [float(x) for x in agree]
    failure: Exception | None = None
    try:
        yield
    except Exception as err:  # held until the other ranks know
        failure = err
    rank = dist.get_rank(group)
    if failure is None:
        flat = [0.0, *values, *(-x for x in values)]
    else:
        flat = [float(rank + 1)] + [-math.inf] * (2 * len(values))
    status = torch.tensor(flat, dtype=torch.float64, device=device)
    try:
        dist.all_reduce(status, op=dist.ReduceOp.MAX, group=group)
    except Exception as err:
        if failure is not None:
            raise failure from err
        raise RankFailedError(
            f"the collective after {what} failed on rank {rank} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}): another rank died, stopped "
            "elsewhere or timed out"
        ) from err
    if failure is not None:
        raise failure
    reduced = status.tolist()
    if reduced[0] > 0:
        raise RankFailedError(
            f"rank {int(reduced[0]) - 1} of the process group failed in {what}; rank {rank} "
            "stops too (that rank's error says why)"
        )
    count = len(values)
    highs = reduced[1 : 1 + count]
    lows = [-x for x in reduced[1 + count : 1 + 2 * count]]
    for high, low, mine in zip(highs, lows, values):
        if high != low:
            raise RanksDisagreeError(
                f"the ranks disagree on {agree_what or what} (rank {rank} has {mine!r}, the "
                f"ranks range over [{low!r}, {high!r}]): every rank must hold the same "
                "model and run the same solver with the same seed and start vector"
            )


def sum_across(group: Any, tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over the ranks of ``group`` in place (no-op without a group).

    Raises:
        RankFailedError: When the collective fails (a rank died or timed out).
    """
    if group is None:
        return tensor
    dist = _dist()
    try:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    except Exception as err:
        raise RankFailedError(
            f"the all_reduce of a product failed ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}): another rank died or timed out"
        ) from err
    return tensor


def all_gather_ints(group: Any, values: Sequence[int], device: torch.device) -> list[list[int]]:
    """Every rank's ``values`` (the same length on all ranks), in rank order."""
    if group is None:
        return [list(values)]
    dist = _dist()
    mine = torch.tensor(list(values), dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    try:
        dist.all_gather(parts, mine, group=group)
    except Exception as err:
        raise RankFailedError(
            f"an all_gather failed ({type(err).__name__}): another rank died or timed out"
        ) from err
    return [p.tolist() for p in parts]
