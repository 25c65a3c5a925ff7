r"""Per-example gradients :math:`g_n = \nabla_\theta \ell_n` of a batch, chunk by chunk.

With the total loss :math:`L = c \sum_n \ell_n` (see :mod:`curvops.linops.objective`),
:math:`\ell_n` is example ``n``'s loss **summed** over its loss terms (its label, its output
entries, or its target tokens for a language model, padding and ``-100`` labels
excluded). The result is the ``(N, P)`` matrix :math:`G` whose row ``n`` is :math:`g_n`
flattened in the order of a :class:`~curvops.linops.params.ParameterSpace`, so that
:math:`G^\top G = \sum_n g_n g_n^\top` and the empirical Fisher is :math:`c\,G^\top G`.

Three ways to compute it, all giving the same matrix up to round-off:

* ``"vmap"``: ``torch.func.vmap`` over examples of ``torch.func.grad`` of one example's
  loss (each example seen as a batch of one). Fast, but the forward pass must be free of
  data-dependent Python control flow; HuggingFace models often are not (their mask code
  branches on tensor values, e.g. GPT-2 with an ``attention_mask``).
* ``"loop"``: one autograd backward per example (any model; the reference).
* ``"jacobian"``: one forward pass over the chunk, then the Jacobian of the vector of
  per-example losses by a vmapped backward (``is_grads_batched``) with identity
  cotangents. The forward is not vmapped, so any model works; the backward costs about
  ``chunk`` backward passes over the whole chunk, so it pays off for small models only.

``"auto"`` tries ``"vmap"`` on the first chunk and falls back to ``"loop"`` if the model
cannot be vmapped. Examples are processed ``chunk_size`` at a time, so memory stays
bounded by one chunk's activations plus the rows kept; ``columns`` keeps only some flat
coordinates of every row (coordinate subsampling without ever storing all of ``G``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .autodiff import batched_vjp
from .checks import check_int, check_repeatable
from .objective import Objective, TorchObjective, as_objective, call_with_inputs
from .params import ParameterSpace, select_parameters

METHODS = ("auto", "vmap", "loop", "jacobian")


@dataclass
class GradientChunk:
    """Per-example gradients of consecutive examples.

    Attributes:
        start: Index of the chunk's first example within the batch.
        gradients: ``(m, P)`` rows :math:`g_n` (only the requested columns, if any).
        method: How they were computed: ``"vmap"``, ``"loop"`` or ``"jacobian"``.
        fallback_reason: Why ``"auto"`` did not use vmap (``None`` if it did or was not asked).
    """

    start: int
    gradients: Tensor
    method: str
    fallback_reason: str | None = None


# --- batch pytrees -----------------------------------------------------------------------------
def _tensor_leaves(x: Any) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _tensor_leaves(item)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensor_leaves(v)]
    return []


def _rebuild(x: Any, leaves: Iterator[Tensor]) -> Any:
    """``x`` with its tensor leaves replaced, in :func:`_tensor_leaves` order."""
    if isinstance(x, Tensor):
        return next(leaves)
    if isinstance(x, (tuple, list)):
        return type(x)(_rebuild(item, leaves) for item in x)
    if isinstance(x, dict):
        return {k: _rebuild(v, leaves) for k, v in x.items()}
    return x


# --- per-example losses ------------------------------------------------------------------------
def example_losses(
    model: nn.Module, objective: Objective, params: dict[str, Tensor], batch: Any
) -> Tensor:
    r"""The per-example losses :math:`\ell_n` of a batch, shape ``(N,)``.

    Exactly the empirical Fisher operator's construction: the objective's row losses summed
    into their examples.
    """
    rows = objective.rows(model, params, batch)
    row_losses = objective.kind.row_losses(rows.predictions, rows.targets)
    return torch.zeros(
        rows.num_examples, dtype=row_losses.dtype, device=row_losses.device
    ).index_add(0, rows.example_index, row_losses)


LossOfOne = Callable[[nn.Module, dict[str, Tensor], Any], Tensor]


def _masked_ce_sum(kind: Any, F_: Tensor, Y: Tensor) -> Tensor:
    """Cross-entropy summed over rows, ``-100`` rows multiplied by zero (no boolean indexing)."""
    keep = Y != -100
    per_row = kind.row_losses(F_, torch.where(keep, Y, torch.zeros_like(Y)))
    return (per_row * keep.to(per_row.dtype)).sum()


def _as_is(model: nn.Module, batch: Any) -> Any:
    return batch


def _vmappable_loss(
    objective: Objective,
) -> tuple[Callable[[nn.Module, Any], Any], LossOfOne]:
    """``(prepare, loss)`` with ``loss(model, params, one example of prepare(model, batch))`` = ℓ.

    The objectives' ``rows`` drop ``-100`` targets by boolean indexing and validate with
    Python branches on tensor values, which vmap cannot batch. ``prepare`` runs outside
    vmap (once per chunk) and does the data-dependent part: for the HuggingFace
    objective it computes each position's target and the model's keyword arguments;
    ``loss`` then computes the same token-summed loss with ignored rows multiplied by
    zero. Objectives of other types go through their ``rows`` unchanged (if that is not
    vmappable, ``"auto"`` falls back to the loop).
    """
    kind = objective.kind
    if isinstance(objective, TorchObjective):

        def torch_loss(model: nn.Module, params: dict[str, Tensor], batch: Any) -> Tensor:
            x, y = batch
            out = call_with_inputs(model, params, x)
            if kind.name == "cross_entropy":
                F_ = out.movedim(1, -1).reshape(-1, out.shape[1])
                return _masked_ce_sum(kind, F_, y.reshape(-1))
            return kind.row_losses(out.reshape(1, -1), y.reshape(1, -1)).sum()

        return _as_is, torch_loss

    task = getattr(objective, "task", None)
    if task in ("causal_lm", "masked_lm", "sequence_classification") and hasattr(
        objective, "model_inputs"
    ):
        # A language-model objective (curvops.linops.hf.LanguageModelObjective or one with the
        # same methods: duck-typed).
        def prepare_lm(model: nn.Module, batch: Any) -> Any:
            return {"kwargs": objective.model_inputs(model, batch), "y": objective.targets(batch)}

        def lm_loss(model: nn.Module, params: dict[str, Tensor], prepared: Any) -> Tensor:
            out = functional_call(model, params, args=(), kwargs=prepared["kwargs"])
            logits = out["logits"] if isinstance(out, Mapping) else getattr(out, "logits", out)
            y = prepared["y"]
            if task == "causal_lm":
                logits = logits[:, :-1]
            if task == "sequence_classification" and kind.name != "cross_entropy":
                return kind.row_losses(logits.reshape(1, -1), y.reshape(1, -1)).sum()
            return _masked_ce_sum(kind, logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

        return prepare_lm, lm_loss

    def rows_loss(model: nn.Module, params: dict[str, Tensor], batch: Any) -> Tensor:
        return example_losses(model, objective, params, batch).sum()

    return _as_is, rows_loss


def _frozen_params(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


def check_deterministic_losses(
    model: nn.Module, objective: Objective, batch: Any, chunk_size: int | None = None
) -> None:
    """Two identical no-grad passes over the batch's first chunk must give equal, finite losses.

    The model's buffers and the global RNG states are restored afterwards.

    Raises:
        ValueError: For NaN/Inf losses or losses that differ (dropout left on).
    """
    first = objective.split(batch, chunk_size)[0] if chunk_size else batch
    check_repeatable(
        model,
        objective.product_context(model),
        lambda: example_losses(model, objective, _frozen_params(model), first),
        "losses",
    )


# --- the three methods -------------------------------------------------------------------------
def _vmap_chunk(
    model: nn.Module, objective: Objective, names: Sequence[str], part: Any
) -> list[Tensor]:
    prepare, loss_one = _vmappable_loss(objective)
    prepared = prepare(model, part)
    frozen = _frozen_params(model)
    leaves = _tensor_leaves(prepared)

    def loss(selected: dict[str, Tensor], *example: Tensor) -> Tensor:
        one = _rebuild(prepared, iter(t.unsqueeze(0) for t in example))
        return loss_one(model, {**frozen, **selected}, one)

    selected = {name: frozen[name] for name in names}
    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, *([0] * len(leaves))))(
        selected, *leaves
    )
    return [grads[name] for name in names]


def _selected_params(model: nn.Module, names: Sequence[str]) -> dict[str, Tensor]:
    """All parameters by name: the selected ones as they are, the others detached."""
    chosen = set(names)
    return {n: (p if n in chosen else p.detach()) for n, p in model.named_parameters()}


def _loop_chunk(
    model: nn.Module,
    objective: Objective,
    names: Sequence[str],
    tensors: Sequence[Tensor],
    part: Any,
) -> list[Tensor]:
    params = _selected_params(model, names)
    rows: list[list[Tensor]] = []
    with torch.enable_grad():
        for one in objective.split(part, 1):
            loss = example_losses(model, objective, params, one).sum()
            grads = torch.autograd.grad(loss, list(tensors), allow_unused=True)
            rows.append([torch.zeros_like(p) if g is None else g for g, p in zip(grads, tensors)])
    return [torch.stack(col) for col in zip(*rows)]


def _jacobian_chunk(
    model: nn.Module,
    objective: Objective,
    names: Sequence[str],
    tensors: Sequence[Tensor],
    part: Any,
) -> list[Tensor]:
    params = _selected_params(model, names)
    with torch.enable_grad():
        losses = example_losses(model, objective, params, part)
        eye = torch.eye(losses.shape[0], dtype=losses.dtype, device=losses.device)
        return batched_vjp([losses], list(tensors), [eye])


# --- public entry points -----------------------------------------------------------------------
def per_example_gradient_chunks(
    model: nn.Module,
    objective: Any,
    batch: Any,
    params: Sequence[nn.Parameter | str] | None = None,
    *,
    chunk_size: int | None = None,
    method: str = "auto",
    columns: Tensor | None = None,
) -> Iterator[GradientChunk]:
    """Yield the per-example gradients of ``batch``, ``chunk_size`` examples at a time.

    Args:
        model: The network (in the mode it should be differentiated in; dropout off).
        objective: A torch loss module or a curvops :class:`Objective`.
        batch: One batch (``(inputs, targets)`` or an HF dict).
        params: Parameters or names / glob patterns; default all that require grad.
        chunk_size: Examples per chunk (default: the whole batch in one chunk).
        method: ``"auto"``, ``"vmap"``, ``"loop"`` or ``"jacobian"`` (module docstring).
        columns: 1-D int64 indices of the flat coordinates to keep (default all).

    Yields:
        :class:`GradientChunk` in example order.

    Raises:
        ValueError: For a bad ``method``, ``chunk_size`` or ``columns``, bad targets, or a
            NaN/Inf loss (checked by one forward pass before any gradient).
        RuntimeError: For ``method="vmap"`` on a model vmap cannot trace.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    chunk_size = check_int("chunk_size", chunk_size, minimum=1, allow_none=True)
    objective = as_objective(objective)
    names, tensors = select_parameters(model, params)
    space = ParameterSpace.from_parameters(names, tensors)
    if columns is not None:
        if not isinstance(columns, Tensor) or columns.dim() != 1 or columns.dtype != torch.int64:
            raise ValueError("columns must be a 1-D int64 tensor of flat coordinate indices")
        if columns.numel() and (int(columns.min()) < 0 or int(columns.max()) >= space.size):
            raise ValueError(f"columns must lie in [0, {space.size})")
        columns = columns.to(space.device)
    n = objective.count(batch).examples
    if n == 0:
        return
    size = n if chunk_size is None else chunk_size
    current = method
    reason: str | None = None
    with objective.product_context(model):
        start = 0
        for part in objective.split(batch, size):
            if start == 0:
                # Validate targets and finiteness with one cheap forward before any gradient.
                with torch.no_grad():
                    losses = example_losses(model, objective, _frozen_params(model), part)
                if not bool(torch.isfinite(losses).all()):
                    raise ValueError("the loss is NaN or Inf on the first chunk of examples")
            if current in ("auto", "vmap"):
                try:
                    blocks = _vmap_chunk(model, objective, names, part)
                    current = "vmap"
                except Exception as err:  # any vmap failure means "not vmappable"
                    if current == "vmap" and method == "vmap":
                        raise RuntimeError(
                            f"vmap over examples failed for this model ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:200]}); use method='loop' or 'jacobian'"
                        ) from err
                    if current == "vmap":  # "auto" succeeded on an earlier chunk: not a vmap issue
                        raise
                    current = "loop"
                    reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            if current == "loop":
                blocks = _loop_chunk(model, objective, names, tensors, part)
            elif current == "jacobian":
                blocks = _jacobian_chunk(model, objective, names, tensors, part)
            G = space.flatten([b.detach() for b in blocks])
            if columns is not None:
                G = G.index_select(1, columns)
            yield GradientChunk(start, G, current, reason)
            start += G.shape[0]


def per_example_gradients(
    model: nn.Module,
    objective: Any,
    batch: Any,
    params: Sequence[nn.Parameter | str] | None = None,
    *,
    chunk_size: int | None = None,
    method: str = "auto",
    columns: Tensor | None = None,
) -> Tensor:
    r"""The ``(N, P)`` matrix of per-example gradients :math:`g_n = \nabla_\theta \ell_n`.

    Row ``n`` is example ``n``'s gradient of its summed loss, flattened in the order of
    the selected parameters (:class:`~curvops.linops.params.ParameterSpace`), in the flat
    space's dtype. Arguments as in :func:`per_example_gradient_chunks`.

    Returns:
        ``G`` of shape ``(N, P)`` (``(N, len(columns))`` with ``columns``).
    """
    chunks = [
        c.gradients
        for c in per_example_gradient_chunks(
            model, objective, batch, params, chunk_size=chunk_size, method=method, columns=columns
        )
    ]
    if not chunks:
        names, tensors = select_parameters(model, params)
        space = ParameterSpace.from_parameters(names, tensors)
        width = space.size if columns is None else int(columns.numel())
        return torch.zeros(0, width, dtype=space.dtype, device=space.device)
    return torch.cat(chunks)
