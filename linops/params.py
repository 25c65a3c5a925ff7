"""Parameter selection and the flat parameter space operators act on.

An operator acts on the flattened, concatenated parameters in the order of its
selection. The flat vector has the widest floating dtype among the selected
parameters (fp32 norms inside a bf16 model make an fp32 space); each block is
cast to its parameter's dtype on the way into a product and back on the way out.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .dtypes import FLOATING_DTYPES


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: that of most of its floating parameter entries.

    A bf16 model with fp32 norms is a bf16 model; its floating inputs must be bf16.
    ``torch.float32`` (torch's default) for a model without floating parameters.
    """
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def select_parameters(
    model: nn.Module, params: Sequence[nn.Parameter | str] | nn.Parameter | str | None = None
) -> tuple[list[str], list[nn.Parameter]]:
    """Resolve a parameter selection against a model.

    Args:
        model: The module whose parameters are selected.
        params: ``None`` (all parameters that require grad), parameter objects of
            ``model``, or names / glob patterns (``"fc1.*"``, ``"*.bias"``) matched
            against ``model.named_parameters()``; a sequence of them, or one (a bare
            string is one pattern, a bare tensor one parameter).

    Returns:
        The selected names and parameters, in the model's parameter order.

    Raises:
        ValueError: If a pattern matches nothing, a parameter is not in the model,
            an entry is selected twice, a selected parameter is frozen
            (``requires_grad=False``: it cannot be differentiated), or the selection is
            empty.
        TypeError: If a selected parameter is not floating point or entries mix kinds.
    """
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    else:
        # One pattern or one parameter, not the characters of a string / rows of a tensor.
        params = [params] if isinstance(params, (str, Tensor)) else list(params)
        if all(isinstance(p, str) for p in params):
            chosen_names: set[str] = set()
            for pattern in params:
                hits = [n for n, _ in named if fnmatch.fnmatchcase(n, pattern)]
                if not hits:
                    raise ValueError(
                        f"parameter pattern {pattern!r} matches no parameter of the model; "
                        f"names look like {[n for n, _ in named[:4]]}"
                    )
                chosen_names.update(hits)
            chosen = [(n, p) for n, p in named if n in chosen_names]
        elif all(isinstance(p, Tensor) for p in params):
            by_id = {id(p): n for n, p in named}
            seen: set[int] = set()
            for p in params:
                if id(p) not in by_id:
                    raise ValueError("a parameter in `params` does not belong to the model")
                if id(p) in seen:
                    raise ValueError(f"parameter {by_id[id(p)]!r} is selected twice")
                seen.add(id(p))
            chosen = [(n, p) for n, p in named if id(p) in seen]
        else:
            raise TypeError("`params` must be parameters of the model or names/glob patterns")
        for n, p in chosen:
            if not p.requires_grad:
                raise ValueError(
                    f"parameter {n!r} is selected in `params` but frozen (requires_grad=False), "
                    "so it cannot be differentiated; unfreeze it with "
                    "requires_grad_(True) or leave it out of `params`"
                )
    if not chosen:
        raise ValueError("the parameter selection is empty (no parameter requires grad?)")
    for n, p in chosen:
        if p.dtype not in FLOATING_DTYPES:
            raise TypeError(
                f"parameter {n!r} has dtype {p.dtype}; only floating dtypes are supported"
            )
    return [n for n, _ in chosen], [p for _, p in chosen]


@dataclass(frozen=True)
class ParameterSpace:
    """The flat vector space of a parameter selection.

    Attributes:
        names: Parameter names, in flat order.
        shapes: Each parameter's shape.
        dtypes: Each parameter's dtype.
        dtype: The flat vector's dtype (widest among ``dtypes``).
        device: The parameters' device.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype, ...]
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def from_parameters(cls, names: Sequence[str], params: Sequence[Tensor]) -> ParameterSpace:
        """Describe the flat space of ``params``.

        Raises:
            ValueError: If the parameters live on different devices.
        """
        devices = {p.device for p in params}
        if len(devices) != 1:
            raise ValueError(
                f"selected parameters live on several devices: {sorted(map(str, devices))}"
            )
        dtypes = tuple(p.dtype for p in params)
        widest = min(dtypes, key=FLOATING_DTYPES.index)  # FLOATING_DTYPES is widest first
        return cls(tuple(names), tuple(p.shape for p in params), dtypes, widest, devices.pop())

    @functools.cached_property
    def numels(self) -> tuple[int, ...]:
        """Number of entries of each parameter."""
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @functools.cached_property
    def size(self) -> int:
        """Dimension n of the flat space."""
        return sum(self.numels)

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate per-parameter tensors into one flat vector (in ``self.dtype``).

        A leading batch dimension is kept: tensors of shape ``(m, *shape_i)`` give an
        ``(m, n)`` result.
        """
        if len(tensors) != len(self.shapes):
            raise ValueError(f"expected {len(self.shapes)} tensors, got {len(tensors)}")
        batched = tensors[0].dim() == len(self.shapes[0]) + 1
        parts = []
        for t, shape, name in zip(tensors, self.shapes, self.names, strict=True):
            expected = t.shape[1:] if batched else t.shape
            if expected != shape:
                raise ValueError(
                    f"tensor for {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}"
                )
            parts.append(t.reshape(t.shape[0], -1) if batched else t.reshape(-1))
        return self._concat(parts)

    def flatten_batched(self, tensors: Sequence[Tensor]) -> Tensor:
        """:meth:`flatten` of ``(m, *shape_i)`` blocks that a product made itself.

        No shape checks and no cast of a block already in ``self.dtype``: every product
        ends here, and on a small model the checks of :meth:`flatten` cost as much as a
        layer's backward.
        """
        return self._concat([t.reshape(t.shape[0], -1) for t in tensors])

    def _concat(self, parts: Sequence[Tensor]) -> Tensor:
        """Flat parts side by side in ``self.dtype`` (a cast only where a part differs)."""
        dtype = self.dtype
        return torch.cat([p if p.dtype == dtype else p.to(dtype) for p in parts], dim=-1)

    def unflatten(self, vector: Tensor, *, cast: bool = True) -> list[Tensor]:
        """Split a flat vector (or an ``(m, n)`` batch of them) into per-parameter tensors.

        Args:
            vector: Shape ``(n,)`` or ``(m, n)``.
            cast: Cast each block to its parameter's dtype (else keep the vector's dtype).
        """
        if vector.shape[-1] != self.size or vector.dim() not in (1, 2):
            raise ValueError(
                f"expected a vector of length {self.size} or an (m, {self.size}) batch"
            )
        lead = tuple(vector.shape[:-1])
        blocks = torch.split(vector, self.numels, dim=-1)
        out = [b.reshape(lead + tuple(s)) for b, s in zip(blocks, self.shapes, strict=True)]
        if cast:
            out = [b if b.dtype == d else b.to(d) for b, d in zip(out, self.dtypes, strict=True)]
        return out
