r"""Curvature operators of a model's loss over a whole data set.

With the total loss :math:`L(\theta) = c \sum_n \ell_n(\theta)` (see
:mod:`curvops.linops.objective`), predictions :math:`f_r` per row, their Jacobians
:math:`J_r = \partial f_r / \partial\theta` and per-row output Hessians
:math:`H_r = \partial^2 \ell / \partial f_r^2`:

* Hessian :math:`\nabla^2 L`;
* GGN :math:`G = c \sum_r J_r^\top H_r J_r` (= the exact Fisher for the supported losses);
* MC Fisher :math:`c \sum_r J_r^\top \big(\tfrac1S \sum_s g_{rs} g_{rs}^\top\big) J_r` with
  :math:`g_{rs} = \partial \ell(f_r, \tilde y_{rs}) / \partial f_r` and
  :math:`\tilde y_{rs} \sim p(y \mid f_r)` drawn once per example, keyed by
  ``(seed, global example index)``;
* empirical Fisher :math:`c \sum_n \nabla \ell_n \nabla \ell_n^\top`.

Each product is one pass over the data, accumulated over (micro-)batches, so the
operator does not depend on how the data is split. Jacobian-vector products use
the double-vjp trick (reverse mode only), which also works where forward-mode AD
does not; an uncached single-vector GGN/Fisher product takes :math:`Jv` by forward mode
instead (one forward pass with dual parameters) and falls back to double-vjp where
forward mode fails.

Every micro-batch's product is split into a *prepare* step (the forward pass and the
first-order graph, independent of the vector) and an *apply* step (the backward
pass(es) that take the vectors, all ``m`` columns of a ``matmat`` in one batched
backward). With ``cache="auto"`` the prepared states of all micro-batches are kept
across products when they fit ``cache_budget_bytes`` (:mod:`curvops.linops.cache`), so
a product costs only the apply steps:

* Hessian: the ``create_graph`` gradient; apply = one double backward;
* GGN / Fisher: predictions, the :math:`J^\top u` graph and the output-Hessian data
  (softmax / sampled MC gradients); apply = the double-vjp :math:`Jv` backward and one
  :math:`J^\top` backward;
* empirical Fisher: the per-example gradient matrix :math:`G` when it fits and is no
  larger than the graph it replaces (apply =
  :math:`c\, G^\top (G V)`, two matrix products), else the per-example-loss graph.

A parameter change after the cache was built (optimizer step, ``load_state_dict``,
edits through ``.data``) is detected and the cache rebuilt: products are never stale.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from .autodiff import batched_vjp, flat_vjp, lean_layer_norm, release_output_values
from .base import LinearOperatorBase
from .cache import (
    ProductCache,
    check_cache_arguments,
    default_cache_budget,
    parameter_fingerprint,
)
from .checks import all_finite, check_int, check_repeatable
from .data import DataFingerprint
from .distributed import (
    check_process_group,
    checksums,
    collective_step,
    sum_across,
)
from .dtypes import working_dtype
from .empirical_risk import EmpiricalRisk
from .host_allocator import release_free_memory
from .memory_probe import APPLY_RANGE, graph_bytes, measure_held
from .objective import OwnParameters, Rows
from .per_example import per_example_gradients

#: Entries of a product's input that the ranks compare (a strided sample: see
#: :func:`~curvops.linops.distributed.checksums`).
_VECTOR_CHECK_ENTRIES = 2**16


def _reordering_error() -> ValueError:
    """The refusal of data whose order changes between passes (for the MC Fisher)."""
    return ValueError(
        "the Monte-Carlo Fisher draws each example's labels from a key of its position in "
        "the data, and the data comes in another order on every pass (a DataLoader with "
        "shuffle=True or a random sampler?): every product would use other labels, so the "
        "operator would not be one fixed matrix. Pass the data in a fixed order: "
        "DataLoader(..., shuffle=False), or a fixed permutation as the sampler, e.g. "
        "sampler=torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()"
    )


class CurvatureOperator(EmpiricalRisk, LinearOperatorBase):
    """Base class of the curvature operators.

    Args:
        model: The network.
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``
            (reduction ``mean`` or ``sum``), or a curvops :class:`Objective` (e.g. the
            HuggingFace language-model objective).
        data: Re-iterable batches, or one batch.
        params: Parameters, or names / glob patterns; default all that require grad.
        micro_batch_size: Split every batch into micro-batches of at most this many
            examples and accumulate (changes only round-off).
        check_deterministic: Run the model twice on the first micro-batch and refuse
            differing outputs (dropout left on); also checks outputs and loss are finite,
            and that a second pass over the data holds the same examples (in any order;
            random augmentation is refused). Every product also refuses NaN/Inf outputs.
            Whatever this flag, construction makes one pass over the data without
            forward passes that counts it and refuses NaN/Inf inputs, inputs of another
            dtype than the model's and feature sizes that differ between batches.
        cache: ``"auto"`` (default): keep each micro-batch's prepared state (forward
            pass and first-order graph) across products when all of them fit
            ``cache_budget_bytes``, built by the first product and rebuilt when the
            parameters change; ``"none"``: every product from scratch. Results are the
            same up to round-off. The cache assumes the data does not change after
            construction (the operator is one fixed matrix).
        cache_budget_bytes: Memory the cache may hold; default 25 % of the memory
            available on the device at construction
            (:data:`curvops.linops.cache.DEFAULT_BUDGET_FRACTION`).
        process_group: A ``torch.distributed`` process group whose ranks each pass their
            own shard of the data (shards may differ in size and, for language models, in
            tokens); default None, one process. The operator is then the curvature over
            all shards: counts are all-reduced once at construction, a product is the
            local product followed by one ``all_reduce`` of its ``n`` values, and every
            rank must call every product with the same vectors (the solvers run in
            lockstep; :mod:`curvops.linops.distributed`). A model wrapped in
            ``DistributedDataParallel`` is used through the module it wraps.

    Attributes:
        objective: The objective (loss, normalisation, sample unit).
        space: The flat parameter space.
        normalizer: The factor ``c`` of the total loss.
        total: Examples and loss terms over the whole data.
        cache: The cache mode, ``"auto"`` or ``"none"``.
        cache_budget_bytes: The cache's memory budget (settable).
        cache_active: Whether products are served from cached states.
        cache_bytes: Memory the cached states hold.
        cache_info: A summary dict (mode, kind, bytes, budget, status).
    """

    name = "curvature"
    is_psd = False

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        params: Sequence[nn.Parameter | str] | None = None,
        *,
        micro_batch_size: int | None = None,
        check_deterministic: bool = True,
        cache: str = "auto",
        cache_budget_bytes: int | None = None,
        process_group: Any = None,
    ) -> None:
        cache_budget_bytes = check_cache_arguments(cache, cache_budget_bytes)
        self.micro_batch_size = check_int(
            "micro_batch_size", micro_batch_size, minimum=1, allow_none=True
        )
        group = check_process_group(process_group)
        # Every rank checks its own shard; a rank whose checks fail still tells the others
        # (they raise too instead of waiting in the count's collective).
        with collective_step(
            group, torch.device("cpu"),
            "building the operator",
        ):
            self._build(model, loss_fn, data, params, check_deterministic, group)
        self._join_ranks()
        budget = (
            default_cache_budget(self.device) if cache_budget_bytes is None else cache_budget_bytes
        )
        self._cache = ProductCache(cache, budget)
        self._held_fingerprint: tuple[Any, ...] | None = None

    def _build(
        self,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        params: Sequence[nn.Parameter | str] | None,
        check_deterministic: bool,
        group: Any,
    ) -> None:
        """This rank's part of construction: set up, survey and check its data."""
        self._set_up_risk(model, loss_fn, data, params, group)
        # self.model: a DDP wrapper's module, whose parameter names the space holds
        self._selects_all = (
            {n for n, _ in self.model.named_parameters()} == set(self.space.names)
        )
        n = self.space.size
        self.shape = (n, n)
        self.dtype = self.space.dtype
        self.device = self.space.device
        fixed_order = self._needs_fixed_order
        if fixed_order and self.data.reorders:
            raise _reordering_error()
        fingerprint = (
            DataFingerprint(order=fixed_order) if check_deterministic or fixed_order else None
        )
        self._survey(fingerprint)
        if fingerprint is not None:
            self._check_same_data(fingerprint, content=check_deterministic)
        if check_deterministic:
            self._check_deterministic()

    # --- cache ----------------------------------------------------------------------------
    @property
    def cache(self) -> str:
        """The cache mode: ``"auto"`` or ``"none"``."""
        return self._cache.mode

    @property
    def cache_active(self) -> bool:
        """Whether products are served from cached states (built by the first product)."""
        return self._cache.active

    @property
    def cache_bytes(self) -> int:
        """Memory held by the cached states, in bytes."""
        return self._cache.nbytes

    @property
    def cache_budget_bytes(self) -> int:
        """The most memory the cached states may hold."""
        return self._cache.budget_bytes

    @cache_budget_bytes.setter
    def cache_budget_bytes(self, budget: int) -> None:
        budget = check_cache_arguments(self._cache.mode, budget)
        self._cache.budget_bytes = budget
        if self._cache.nbytes > budget:
            self._cache.clear()
        self._cache.too_large = False

    @property
    def cache_info(self) -> dict[str, Any]:
        """Mode, what is cached, bytes held, budget, number of builds and a status line."""
        return self._cache.info()

    def clear_cache(self) -> None:
        """Free the cached states; the next product rebuilds them (``cache="auto"``)."""
        self._cache.clear()

    @contextlib.contextmanager
    def parameters_fixed(self) -> Iterator[None]:
        """A block in which the model's parameters are promised not to change.

        A cached product first checks that the parameters are still those the cache was
        built from (:func:`~curvops.linops.cache.parameter_fingerprint`: a pass over all
        parameters, a noticeable share of a cached product; docs/decisions.md). Inside this
        block the check runs once on entry and once on exit instead of on every product.
        A change found on exit raises: the products computed inside may then come from two
        different matrices. ``lanczos``, ``cg`` and ``minres`` enter it for their run;
        nested blocks are free.

        Raises:
            RuntimeError: On leaving the block, if the parameters changed inside it.
        """
        if self._held_fingerprint is not None or self._cache.mode == "none":
            yield  # nested, or no cache that would check
            return
        held = parameter_fingerprint(self.model)
        self._held_fingerprint = held
        try:
            yield
        finally:
            self._held_fingerprint = None
        if parameter_fingerprint(self.model) != held:
            raise RuntimeError(
                "the model's parameters changed inside parameters_fixed(): products computed "
                "in the block may come from two different matrices; recompute after the change"
            )

    # --- helpers --------------------------------------------------------------------------
    @property
    def param_names(self) -> tuple[str, ...]:
        """Names of the selected parameters, in flat order."""
        return self.space.names

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Per-parameter tensors → a flat vector in the operator's space."""
        return self.space.flatten(tensors)

    def unflatten(self, vector: Tensor) -> list[Tensor]:
        """A flat vector → per-parameter tensors (each in its parameter's dtype)."""
        return self.space.unflatten(vector)

    def _param_dict(self, *, listed: bool = True) -> dict[str, Tensor]:
        """Selected parameters as they are; the others detached (no graph is built for them).

        Args:
            listed: Whether the caller reads the entries; if not and every parameter is
                selected, an empty :class:`OwnParameters` says "the model as it is"
                without a walk over the modules on every product.
        """
        if not listed and self._selects_all:
            return OwnParameters()
        selected = set(self.space.names)
        named = list(self.model.named_parameters())
        if all(name in selected for name, _ in named):
            return OwnParameters(named)  # the model is called as it is
        return {name: p if name in selected else p.detach() for name, p in named}

    def micro_batches(self) -> Iterator[tuple[Any, int]]:
        """Yield ``(micro_batch, global index of its first example)`` over this rank's data
        (the whole data without a process group)."""
        offset = self.example_offset
        previous = None
        for batch in self.data:
            parts = (
                [batch]
                if self.micro_batch_size is None
                else self.objective.split(batch, self.micro_batch_size)
            )
            for part in parts:
                # Counted only when a next part needs the offset (a count may synchronise).
                if previous is not None:
                    offset += self.objective.count(previous).examples
                yield part, offset
                previous = part

    def _rows(self, batch: Any, params: dict[str, Tensor] | None = None) -> Rows:
        """The micro-batch's rows (with ``params`` substituted, default the model's own);
        refuses NaN/Inf in predictions or targets."""
        rows = self.objective.rows(
            self.model, self._param_dict(listed=False) if params is None else params, batch
        )
        if not all_finite(rows.predictions.detach()):
            raise ValueError("the model's outputs contain NaN or Inf (in some batch of the data)")
        if rows.targets.is_floating_point() and not all_finite(rows.targets):
            raise ValueError("the targets contain NaN or Inf (in some batch of the data)")
        return rows

    #: Whether the operator depends on the order of the examples (not only on the set of
    #: them): then the data must come in the same order on every pass.
    _needs_fixed_order = False

    def _check_same_data(self, first: DataFingerprint, *, content: bool) -> None:
        """A second pass over the data must hold the same examples.

        Compares :class:`~curvops.linops.data.DataFingerprint` summaries of the two passes:
        with ``content``, the order-independent ones (shuffling passes, random
        augmentation does not); for an operator that needs a fixed order, also the
        order of the examples.
        """
        again = DataFingerprint(order=first.order is not None)
        for batch in self.data:
            again.add(batch)
        if content and not first.same_content(again):
            raise ValueError(
                "the data differs between two passes (random augmentation or a loader that "
                "yields new data each pass?); every product replays the data, so the curvature "
                "would not be one fixed matrix. Pass check_deterministic=False to skip this check"
            )
        if first.order is not None and not first.same_order(again):
            raise _reordering_error()

    def _check_deterministic(self) -> None:
        first, _ = next(iter(self.micro_batches()))
        rows: list[Rows] = []

        def predictions() -> Tensor:
            rows.append(self._rows(first))
            return rows[-1].predictions

        check_repeatable(
            self.model, self.objective.product_context(self.model), predictions, "outputs"
        )
        r1 = rows[0]
        with torch.no_grad():
            loss = self.objective.kind.total_loss(r1.predictions, r1.targets)
        if not bool(torch.isfinite(loss)):
            raise ValueError("the loss is NaN or Inf")

    # --- products -------------------------------------------------------------------------
    def _matmat(self, V: Tensor) -> Tensor:
        group = self.process_group
        if group is None:
            return self._local_sum(V).T.to(self.dtype)
        device = self._collective_device()
        with collective_step(
            group, device, "the product", checksums([V], max_entries=_VECTOR_CHECK_ENTRIES),
            "the vectors of a product (every rank must call every product with the same "
            "vectors: the solvers are not in lockstep — different seeds or start vectors?)",
        ):
            acc = self._local_sum(V)
        if acc.device != device:  # e.g. a CPU operator on an NCCL group
            return sum_across(group, acc.to(device)).to(acc.device).T.to(self.dtype)
        return sum_across(group, acc).T.to(self.dtype)

    def matvec_into(self, v: Tensor, out: Tensor) -> Tensor:
        """``A v`` written into ``out`` (the caller's buffer, as a Lanczos run's residual):
        a one-vector product's gradients go straight into it, so the product allocates no
        output vector of its own (0.47 GB less at a 124 M-parameter model's peak).

        Args:
            v: ``(n,)`` in the operator's dtype and device.
            out: A contiguous ``(n,)`` tensor of the operator's dtype and device, not
                overlapping ``v``.

        Returns:
            ``out``.
        """
        self._check(v, 1)
        self._check_out(out)
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
        if out.untyped_storage().data_ptr() == v.untyped_storage().data_ptr():
            raise ValueError("out must not share memory with the input vector")
        if self.process_group is not None or working_dtype(self.dtype) != self.dtype:
            # (summed across ranks, or in float32 over micro-batches: a copy in the end)
            return out.copy_(self.matvec(v))
        acc = self._local_sum(v.unsqueeze(1), out=out.unsqueeze(0))
        if acc.data_ptr() != out.data_ptr():
            out.copy_(acc[0])
        return out

    def _local_sum(self, V: Tensor, out: Tensor | None = None) -> Tensor:
        """This rank's share of ``(A V)ᵀ``, ``(m, n)``, summed over its micro-batches (in
        float32 for bf16/fp16 operators with several micro-batches); with ``out`` (a
        ``(1, n)`` buffer of the operator's dtype, for a float32/float64 operator) the first
        micro-batch's product is written into it and the others are added to it."""
        acc_dtype = working_dtype(self.dtype)
        Vt = V.T.contiguous()  # (m, n): one row per column of V
        blocks = self.space.unflatten(Vt)
        acc: Tensor | None = None

        def accumulate(contrib: Tensor) -> None:
            # contrib is a fresh tensor from _apply (or out): safe to add into. A single
            # micro-batch's product is returned as it is (a float32 copy of a bf16 7B product
            # is 25 GiB); several are summed in float32 for bf16/fp16 operators.
            nonlocal acc
            if acc is None:
                writes = out is None or contrib.data_ptr() == out.data_ptr()
                acc = contrib if writes else out.copy_(contrib)
                return
            if acc.dtype != acc_dtype:
                acc = acc.to(acc_dtype)
            acc.add_(contrib)

        def into() -> Tensor | None:
            return out if acc is None else None  # only the first product writes into out

        cache = self._cache
        with self.objective.product_context(self.model):
            wants_cache = cache.mode == "auto" and not cache.too_large
            fingerprint = None
            if wants_cache:
                fingerprint = self._held_fingerprint
                if fingerprint is None:
                    fingerprint = parameter_fingerprint(self.model)
            if fingerprint is not None and cache.serving(fingerprint):
                for state in cache.states:
                    accumulate(self._apply(state, Vt, blocks, keep=True, out=into()))
            else:
                building = fingerprint is not None and cache.may_build()
                for batch, offset in self.micro_batches():
                    if building:
                        state, nbytes = self._prepare_measured(batch, offset)
                        first = not cache.states
                        if first and self._estimated_total(batch, nbytes) > cache.budget_bytes:
                            cache.reject()  # the first micro-batch already shows it cannot fit
                            building = False
                        else:
                            building = cache.offer(state, nbytes)
                    else:
                        fresh = self._fresh_product(batch, offset, Vt, blocks, out=into())
                        if fresh is not None:
                            accumulate(fresh)
                            continue
                        state = self._prepare(batch, offset, for_cache=False)
                    # (a named range: the memory plan's probe measures a cached product's
                    # peak as this step's)
                    with torch.profiler.record_function(APPLY_RANGE):
                        contrib = self._apply(state, Vt, blocks, keep=building, out=into())
                    accumulate(contrib)
                    del state, contrib
                if building and fingerprint is not None:
                    cache.seal(fingerprint, cache.states[0].kind)
                    if self.device.type == "cpu":
                        # The heap may keep this product's temporaries for the next
                        # (reuse_freed_memory); cached products need far less of it.
                        release_free_memory()
        assert acc is not None  # the data is never empty (checked at construction)
        return acc

    def _vjp_rows(
        self, outputs: Sequence[Tensor | None], cotangents: Sequence[Tensor], *, keep: bool,
        out: Tensor | None = None,
    ) -> Tensor:
        r"""Rows :math:`\sum_j \partial\langle o_j, w_{ij}\rangle / \partial\theta`, ``(m, n)``,
        for ``m`` cotangent sets (the leading dimension of each ``cotangents[j]``): one set
        straight into a flat vector (:func:`~curvops.linops.autodiff.flat_vjp`), several by
        one batched backward.

        Args:
            outputs: Graph outputs.
            cotangents: One ``(m, *output.shape)`` tensor per output.
            keep: Keep the graph for later products.
            out: A ``(1, n)`` buffer of the space's dtype to write one row into, or None.
        """
        if cotangents[0].shape[0] == 1:
            return flat_vjp(outputs, self.params, [w[0] for w in cotangents], self.space.dtype,
                            retain_graph=keep,
                            out=None if out is None else out[0]).unsqueeze(0)
        return self.space.flatten_batched(
            batched_vjp(outputs, self.params, cotangents, retain_graph=keep)
        )

    def _estimated_total(self, batch: Any, nbytes: int) -> float:
        """The whole data's cache size, extrapolated from one micro-batch's ``nbytes``."""
        examples = self.objective.count(batch).examples
        return nbytes * self.local_total.examples / max(examples, 1)

    def _prepare_measured(self, batch: Any, offset: int) -> tuple[_PreparedState, int]:
        """Prepare a micro-batch's state for the cache and measure the memory it holds."""
        return measure_held(
            self.device,
            lambda: self._prepare(batch, offset, for_cache=True),
            lambda state: state.tensors(),
            self._existing_tensors(),
        )

    def _existing_tensors(self) -> list[Tensor]:
        """The model's parameters and buffers: memory a prepared state does not add."""
        return [*self.model.parameters(), *self.model.buffers()]

    def _prepare(self, batch: Any, offset: int, *, for_cache: bool) -> _PreparedState:
        """The vector-independent part of a micro-batch's product (forward, first-order graph)."""
        raise NotImplementedError  # pragma: no cover

    def _fresh_product(
        self, batch: Any, offset: int, Vt: Tensor, blocks: list[Tensor], *,
        out: Tensor | None = None,
    ) -> Tensor | None:
        """An uncached product computed without a prepared state, or None (then the
        product is :meth:`_prepare` followed by :meth:`_apply`)."""
        return None

    def _apply(
        self, state: _PreparedState, Vt: Tensor, blocks: list[Tensor], *, keep: bool,
        out: Tensor | None = None,
    ) -> Tensor:
        """The micro-batch's contribution to ``(A V)ᵀ``, ``(m, n)``, from its prepared state.

        Args:
            state: From :meth:`_prepare`.
            Vt: The vectors as rows, ``(m, n)``.
            blocks: The same vectors as per-parameter ``(m, *shape)`` blocks.
            keep: Keep the state's graph for later products.
            out: A ``(1, n)`` buffer the contribution may be written into (one vector),
                or None.
        """
        raise NotImplementedError  # pragma: no cover


@dataclass
class _PreparedState:
    """What a micro-batch's products share; ``tensors()`` lists what it keeps alive."""

    kind = "graph"

    def tensors(self) -> list[Tensor | None]:
        raise NotImplementedError  # pragma: no cover


@dataclass
class _GradientState(_PreparedState):
    """Hessian: the ``create_graph`` gradient of the micro-batch's share of ``L``."""

    gradients: tuple[Tensor | None, ...]

    def tensors(self) -> list[Tensor | None]:
        return list(self.gradients)


@dataclass
class _SandwichState(_PreparedState):
    r"""Jacobian sandwich: outputs ``F``, the dummy ``u``, :math:`J^\top u` and the middle data."""

    outputs: Tensor
    dummy: Tensor
    vjp: tuple[Tensor | None, ...]
    middle: Tensor | None

    def tensors(self) -> list[Tensor | None]:
        return [self.outputs, self.dummy, *self.vjp, self.middle]


@dataclass
class _GradientMatrixState(_PreparedState):
    """Empirical Fisher: the ``(N, n)`` per-example gradients of the micro-batch."""

    gradients: Tensor
    kind = "per_example_gradients"

    def tensors(self) -> list[Tensor | None]:
        return [self.gradients]


class HessianOperator(CurvatureOperator):
    r"""The Hessian :math:`\nabla^2_\theta L` of the total loss (autograd double backward).

    Prepare: the ``create_graph`` gradient :math:`g = \nabla (c \sum \ell_r)` of a
    micro-batch; apply: :math:`\nabla \langle g, v \rangle` for all columns in one
    batched double backward.
    """

    name = "hessian"

    def _prepare(self, batch: Any, offset: int, *, for_cache: bool) -> _PreparedState:
        # torch's own layer-norm double backward: the Hessian needs every term of it, and
        # lean_layer_norm's Python formulas made a cached Hessian product of the 2 x 64d GPT
        # benchmark model 5 % slower (CPU time, one thread), where the GGN's Jv gains.
        with torch.enable_grad():
            rows = self._rows(batch)
            loss = self.objective.kind.total_loss(rows.predictions, rows.targets)
            grads = torch.autograd.grad(
                loss * self.normalizer, self.params, create_graph=True, allow_unused=True
            )
        # The products differentiate the gradient, never read it: its n values can go.
        release_output_values(grads, keep=())
        return _GradientState(tuple(grads))

    def _apply(
        self, state: _PreparedState, Vt: Tensor, blocks: list[Tensor], *, keep: bool,
        out: Tensor | None = None,
    ) -> Tensor:
        assert isinstance(state, _GradientState)
        return self._vjp_rows(state.gradients, blocks, keep=keep, out=out)


class _JacobianSandwich(CurvatureOperator):
    r"""Operators of the form :math:`c \sum_r J_r^\top M_r J_r` with per-row PSD :math:`M_r`.

    Prepare: the predictions :math:`F`, a dummy :math:`u` and :math:`J^\top u` with
    ``create_graph``, plus what :math:`M_r` needs. Apply: :math:`JV` by the double-vjp
    trick (one backward to :math:`u`), :math:`M JV`, then one backward :math:`J^\top(\cdot)`.
    """

    is_psd = True

    def _middle(self, rows: Rows, offset: int) -> Tensor | None:
        """What :meth:`_middle_matmul` needs of a micro-batch (computed once per state)."""
        raise NotImplementedError  # pragma: no cover

    def _middle_matmul(self, middle: Tensor | None, JV: Tensor, scale: float) -> Tensor:
        """``scale`` times each row's middle matrix :math:`M_r` applied to ``JV`` of shape
        ``(m, R, C)``; ``JV`` is the caller's temporary and may be overwritten."""
        raise NotImplementedError  # pragma: no cover

    def _prepare(self, batch: Any, offset: int, *, for_cache: bool) -> _PreparedState:
        with torch.enable_grad(), lean_layer_norm():
            rows = self._rows(batch)
            F_ = rows.predictions
            # Double-vjp: Jᵀu is linear in the dummy u, so d⟨Jᵀu, v⟩/du = J v.
            u = torch.zeros_like(F_, requires_grad=True)
            JTu = torch.autograd.grad(F_, self.params, u, create_graph=True, allow_unused=True)
        # Jv differentiates Jᵀu in u and never reads its values (n zeros): they can go.
        release_output_values(JTu, keep=(F_, u))
        return _SandwichState(F_, u, tuple(JTu), self._middle(rows, offset))

    def _apply(
        self, state: _PreparedState, Vt: Tensor, blocks: list[Tensor], *, keep: bool,
        out: Tensor | None = None,
    ) -> Tensor:
        assert isinstance(state, _SandwichState)
        (JV,) = batched_vjp(state.vjp, [state.dummy], blocks, retain_graph=keep)
        MJV = self._middle_matmul(state.middle, _private(JV, [Vt]), self.normalizer)
        return self._vjp_rows([state.outputs], [MJV], keep=keep, out=out)

    #: Whether Jv by forward mode works on this model: None until tried, False once it
    #: failed where double-vjp did not (then every product uses double-vjp).
    _forward_mode: bool | None = None

    def _fresh_product(
        self, batch: Any, offset: int, Vt: Tensor, blocks: list[Tensor], *,
        out: Tensor | None = None,
    ) -> Tensor | None:
        r"""One uncached single-vector product with :math:`Jv` by forward mode.

        A forward pass with dual parameters :math:`(\theta, v)` gives the predictions
        and :math:`Jv` together; one backward gives :math:`J^\top M J v`. Double-vjp needs
        a ``create_graph`` backward and a backward through it on top, so forward mode takes
        fewer gradient passes (docs/decisions.md, Operators). If forward mode fails in any
        way (an op without a forward-mode formula, a non-reentrant activation checkpoint),
        the product is recomputed by double-vjp, and if that succeeds forward mode is off
        for good.
        """
        if Vt.shape[0] != 1 or self._forward_mode is False:
            return None
        padding, rescaled = _embedding_conventions(self.model)
        if rescaled:
            # scale_grad_by_freq: reverse mode is not the derivative there, so forward mode
            # would give another matrix than the other products.
            self._forward_mode = False
            return None
        try:
            return self._forward_mode_product(batch, offset, blocks, padding, out)
        except Exception:  # any failure: double-vjp decides (below)
            pass
        # Forward mode is only a shortcut (it fails on an op without a forward-mode formula,
        # on a non-reentrant activation checkpoint, ...): the same product by double-vjp
        # decides, and if that fails too, its error is the one raised.
        state = self._prepare(batch, offset, for_cache=False)
        product = self._apply(state, Vt, blocks, keep=False, out=out)
        self._forward_mode = False
        return product

    def _forward_mode_product(
        self, batch: Any, offset: int, blocks: list[Tensor], padding: dict[str, int],
        out: Tensor | None,
    ) -> Tensor:
        tangents = dict(zip(self.space.names, (b[0] for b in blocks), strict=True))
        for name, row in padding.items():
            # Reverse mode gives an embedding's padding row no gradient (torch's
            # convention); its column of J must be zero here too, as in every other product.
            if name in tangents:
                t = tangents[name]
                tangents[name] = t.index_fill(0, torch.tensor(row, device=t.device), 0.0)
        with fwAD.dual_level(), torch.enable_grad():
            # The selected parameters carry their tangents; the others are detached as in
            # every product (a plain dict: the model is called through functional_call).
            params = {
                name: fwAD.make_dual(p, tangents[name]) if name in tangents else p
                for name, p in self._param_dict().items()
            }
            rows = self._rows(batch, params)
            primal, JV = fwAD.unpack_dual(rows.predictions)
        rows = Rows(primal, rows.targets, rows.example_index, rows.num_examples)
        if JV is None:  # the outputs do not depend on the selected parameters
            JV = torch.zeros_like(primal)
        # (detached: under enable_grad the tangent carries a history nothing uses)
        JV = _private(JV.detach(), [*tangents.values()])
        MJV = self._middle_matmul(self._middle(rows, offset), JV.unsqueeze(0), self.normalizer)
        product = self._vjp_rows([primal], [MJV], keep=False, out=out)
        self._forward_mode = True
        return product


def _private(t: Tensor, others: Sequence[Tensor]) -> Tensor:
    """``t``, or a copy where it shares memory with one of ``others`` (the caller's vectors).

    ``JV`` is overwritten by the middle product; autograd may hand back a cotangent
    itself (a model whose output is a parameter), which must not be changed.
    """
    ptr = t.untyped_storage().data_ptr()
    if any(o.untyped_storage().data_ptr() == ptr for o in others):
        return t.clone()
    return t


def _embedding_conventions(model: nn.Module) -> tuple[dict[str, int], bool]:
    """Where torch's embedding backward is not the plain derivative.

    Returns:
        ``{weight name: padding_idx}`` of embeddings with a padding row (no gradient), and
        whether any embedding uses ``scale_grad_by_freq`` (a rescaled gradient).
    """
    padding, rescaled = {}, False
    for prefix, module in model.named_modules():
        if isinstance(module, nn.Embedding | nn.EmbeddingBag):
            rescaled = rescaled or bool(module.scale_grad_by_freq)
            if module.padding_idx is not None:
                padding[f"{prefix}.weight" if prefix else "weight"] = int(module.padding_idx)
    return padding, rescaled


class GGNOperator(_JacobianSandwich):
    r"""The generalized Gauss-Newton :math:`c \sum_r J_r^\top H_r J_r` (closed-form :math:`H_r`)."""

    name = "ggn"

    def _middle(self, rows: Rows, offset: int) -> Tensor | None:
        return rows.predictions.detach()

    def _middle_matmul(self, middle: Tensor | None, JV: Tensor, scale: float) -> Tensor:
        assert middle is not None
        return self.objective.kind.hessian_matmul(middle, JV, scale=scale, overwrite=True)


def _example_uniforms(
    seed: int, offset: int, rows: Rows, samples: int, per_row: int, device: torch.device
) -> Tensor:
    """U(0, 1) numbers ``(samples, R, per_row)``, each example's from its own generator.

    Keyed by ``(seed, global example index)``, so they do not depend on batching.
    """
    counts = torch.bincount(rows.example_index.cpu(), minlength=rows.num_examples).tolist()
    parts = []
    for local, count in enumerate(counts):
        if count == 0:
            continue
        gen = torch.Generator().manual_seed(
            (int(seed) * 0x9E3779B97F4A7C15 + offset + local) % (2**63)
        )
        parts.append(torch.rand(samples, count, per_row, generator=gen, dtype=torch.float64))
    if not parts:  # every target of the micro-batch is ignored: no rows
        return torch.empty(samples, 0, per_row, dtype=torch.float64, device=device)
    return torch.cat(parts, dim=1).to(device)


class FisherOperator(GGNOperator):
    r"""The Fisher information of the model's predictive distribution.

    ``mode="exact"`` is :math:`c \sum_r J_r^\top \mathbb E_{y \sim p(y|f_r)}[g g^\top] J_r`,
    which equals the GGN for the supported losses: its products are the GGN's, by the
    same code (only :attr:`name` differs). ``mode="mc"`` replaces the
    expectation by ``mc_samples`` draws per row, drawn from the model at the current
    parameters and keyed by ``(seed, global example index)``, so every product uses
    the same labels and the operator is one fixed matrix. Keying by example index
    needs the data in the same order on every pass: construction refuses a shuffling
    loader, and compares the order of a second pass over the data with the first (also
    with ``check_deterministic=False``). With the cache, the sampled
    gradients are kept with each micro-batch's state (and redrawn when the parameters
    change, as the fresh products would).

    Args:
        mode: ``"exact"`` or ``"mc"``.
        mc_samples: Draws per example (``"mc"`` only).
        seed: Seed of the draws.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        params: Sequence[nn.Parameter | str] | None = None,
        *,
        mode: str = "exact",
        mc_samples: int = 1,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if mode not in ("exact", "mc"):
            raise ValueError(f"mode must be 'exact' or 'mc', got {mode!r}")
        self.mode = mode
        self.mc_samples = check_int("mc_samples", mc_samples, minimum=1)
        self.seed = check_int("seed", seed)
        self.name = "fisher" if mode == "exact" else "fisher_mc"
        # The MC labels are keyed by each example's position in the data.
        self._needs_fixed_order = mode == "mc"
        super().__init__(model, loss_fn, data, params, **kwargs)

    def sampled_row_gradients(self, rows: Rows, offset: int) -> Tensor:
        """Loss gradients at the sampled targets, ``(mc_samples, R, C)`` (detached)."""
        kind = self.objective.kind
        F_ = rows.predictions.detach()
        U = _example_uniforms(
            self.seed, offset, rows, self.mc_samples, kind.uniforms_per_row(F_.shape[-1]), F_.device
        )
        return kind.row_gradients(F_, kind.sample(F_, U))

    def _middle(self, rows: Rows, offset: int) -> Tensor | None:
        if self.mode == "exact":
            return super()._middle(rows, offset)
        return self.sampled_row_gradients(rows, offset)

    def _middle_matmul(self, middle: Tensor | None, JV: Tensor, scale: float) -> Tensor:
        if self.mode == "exact":
            return super()._middle_matmul(middle, JV, scale)
        assert middle is not None
        coef = torch.einsum("src,mrc->msr", middle, JV)
        return torch.einsum("msr,src->mrc", coef, middle).mul_(scale / self.mc_samples)


class EmpiricalFisherOperator(CurvatureOperator):
    r"""The empirical Fisher :math:`c \sum_n \nabla\ell_n \nabla\ell_n^\top`.

    With :math:`J_\ell` the Jacobian of the vector of per-example losses, a fresh product
    is :math:`c\, J_\ell^\top (J_\ell v)`: one forward pass, no per-example gradients.
    Cached (``cache="auto"``), each micro-batch keeps its per-example gradient matrix
    :math:`G = J_\ell` when the whole data's :math:`G` (``N x n``) fits the budget and
    is no larger than the per-example-loss graph it replaces (products with :math:`G`
    are memory-bound: worth it for weight-shared models such as transformers, not for
    wide MLPs), and a product is :math:`c\, G^\top (G V)`; otherwise it keeps the graph.
    """

    name = "empirical_fisher"
    is_psd = True

    def _gradient_matrix_fits(self) -> bool:
        itemsize = torch.finfo(self.dtype).bits // 8
        return self.local_total.examples * self.shape[0] * itemsize <= self._cache.budget_bytes

    def _prepare(self, batch: Any, offset: int, *, for_cache: bool) -> _PreparedState:
        graph = self._prepare_graph(batch)
        if not (for_cache and self._gradient_matrix_fits()):
            return graph
        # G V reads G twice and is memory-bound; the graph's apply is two backward passes
        # over what the graph saved. Keep G only when it is no larger than that graph
        # (true for weight-shared models such as transformers, false for wide MLPs).
        itemsize = torch.finfo(self.dtype).bits // 8
        g_bytes = int(graph.outputs.shape[0]) * self.shape[0] * itemsize
        if g_bytes > graph_bytes(graph.tensors(), self._existing_tensors()):
            return graph
        del graph
        G = per_example_gradients(self.model, self.objective, batch, self.params)
        if not bool(torch.isfinite(G).all()):
            raise ValueError(
                "the per-example gradients contain NaN or Inf (NaN/Inf in the model's "
                "outputs or loss in some batch of the data)"
            )
        return _GradientMatrixState(G)

    def _prepare_graph(self, batch: Any) -> _SandwichState:
        with torch.enable_grad(), lean_layer_norm():
            rows = self._rows(batch)
            row_losses = self.objective.kind.row_losses(rows.predictions, rows.targets)
            losses = torch.zeros(
                rows.num_examples, dtype=row_losses.dtype, device=row_losses.device
            ).index_add(0, rows.example_index, row_losses)
            u = torch.zeros_like(losses, requires_grad=True)
            JTu = torch.autograd.grad(losses, self.params, u, create_graph=True, allow_unused=True)
        release_output_values(JTu, keep=(losses, u))
        return _SandwichState(losses, u, tuple(JTu), None)

    def _apply(
        self, state: _PreparedState, Vt: Tensor, blocks: list[Tensor], *, keep: bool,
        out: Tensor | None = None,
    ) -> Tensor:
        if isinstance(state, _GradientMatrixState):
            G = state.gradients
            return (Vt @ G.T) @ G * self.normalizer
        assert isinstance(state, _SandwichState)
        (JV,) = batched_vjp(state.vjp, [state.dummy], blocks, retain_graph=keep)
        return self._vjp_rows([state.outputs], [JV * self.normalizer], keep=keep, out=out)
