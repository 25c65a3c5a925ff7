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
does not.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .autodiff import batched_vjp
from .base import LinearOperatorBase
from .checks import (
    check_finite_parameters,
    check_no_train_mode_batchnorm,
    preserved_state,
)
from .data import DataSource
from .objective import Count, Objective, Rows, as_objective
from .params import ParameterSpace, select_parameters

_LOW_PRECISION = (torch.bfloat16, torch.float16)


class CurvatureOperator(LinearOperatorBase):
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
            differing outputs (dropout left on); also checks outputs and loss are finite.

    Attributes:
        objective: The objective (loss, normalisation, sample unit).
        space: The flat parameter space.
        normalizer: The factor ``c`` of the total loss.
        total: Examples and loss terms over the whole data.
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
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.objective: Objective = as_objective(loss_fn)
        names, tensors = select_parameters(model, params)
        self.params = tensors
        self.space = ParameterSpace.from_parameters(names, tensors)
        n = self.space.size
        self.shape = (n, n)
        self.dtype = self.space.dtype
        self.device = self.space.device
        if micro_batch_size is not None and (
            isinstance(micro_batch_size, bool)
            or not isinstance(micro_batch_size, int)
            or micro_batch_size < 1
        ):
            raise ValueError(f"micro_batch_size must be a positive int, got {micro_batch_size!r}")
        self.micro_batch_size = micro_batch_size
        check_finite_parameters(names, tensors)
        check_no_train_mode_batchnorm(model)
        self.data = DataSource(data)
        total = Count(0, 0)
        for batch in self.data:
            total = total + self.objective.count(batch)
        if total.examples == 0 or total.terms == 0:
            raise ValueError("data is empty: no examples / loss terms")
        self.total = total
        self.normalizer = self.objective.normalizer(total)
        if check_deterministic:
            self._check_deterministic()

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

    def _param_dict(self) -> dict[str, Tensor]:
        """Selected parameters as they are; the others detached (no graph is built for them)."""
        selected = set(self.space.names)
        out: dict[str, Tensor] = {}
        for name, p in self.model.named_parameters():
            out[name] = p if name in selected else p.detach()
        return out

    def micro_batches(self) -> Iterator[tuple[Any, int]]:
        """Yield ``(micro_batch, global index of its first example)`` over the whole data."""
        offset = 0
        for batch in self.data:
            parts = (
                [batch]
                if self.micro_batch_size is None
                else self.objective.split(batch, self.micro_batch_size)
            )
            for part in parts:
                yield part, offset
                offset += self.objective.count(part).examples

    def _rows(self, batch: Any) -> Rows:
        return self.objective.rows(self.model, self._param_dict(), batch)

    def _check_deterministic(self) -> None:
        first, _ = next(iter(self.micro_batches()))
        with preserved_state(self.model), torch.no_grad(), self.objective.product_context(
            self.model
        ):
            r1 = self._rows(first)
            r2 = self._rows(first)
            loss = self.objective.kind.row_losses(r1.predictions, r1.targets).sum()
        if not bool(torch.isfinite(r1.predictions).all()):
            raise ValueError("the model's outputs contain NaN or Inf")
        if not bool(torch.isfinite(loss)):
            raise ValueError("the loss is NaN or Inf")
        if not torch.equal(r1.predictions, r2.predictions):
            raise ValueError(
                "the model's outputs differ between two identical passes (dropout or another "
                "random layer left on? call model.eval()); the curvature would not be one fixed "
                "matrix. Pass check_deterministic=False to skip this check"
            )

    # --- products -------------------------------------------------------------------------
    def _matmat(self, V: Tensor) -> Tensor:
        acc_dtype = torch.float32 if self.dtype in _LOW_PRECISION else self.dtype
        blocks = self.space.unflatten(V.T.contiguous())
        acc = torch.zeros(V.shape[1], self.shape[0], dtype=acc_dtype, device=self.device)
        with self.objective.product_context(self.model):
            for batch, offset in self.micro_batches():
                contrib = self._batch_product(batch, offset, blocks)
                acc += self.space.flatten(contrib).to(acc_dtype)
        return acc.T.to(self.dtype)

    def _batch_product(self, batch: Any, offset: int, V: list[Tensor]) -> list[Tensor]:
        """This batch's contribution to ``A V`` for per-parameter ``(m, *shape)`` blocks."""
        raise NotImplementedError  # pragma: no cover


class HessianOperator(CurvatureOperator):
    r"""The Hessian :math:`\nabla^2_\theta L` of the total loss (autograd double backward)."""

    name = "hessian"

    def _batch_product(self, batch: Any, offset: int, V: list[Tensor]) -> list[Tensor]:
        with torch.enable_grad():
            rows = self._rows(batch)
            loss = self.objective.kind.row_losses(rows.predictions, rows.targets).sum()
            grads = torch.autograd.grad(
                loss * self.normalizer, self.params, create_graph=True, allow_unused=True
            )
            return batched_vjp(grads, self.params, V)


class _JacobianSandwich(CurvatureOperator):
    r"""Operators of the form :math:`c \sum_r J_r^\top M_r J_r` with per-row PSD :math:`M_r`."""

    is_psd = True

    def _output_matmul(self, rows: Rows, offset: int, JV: Tensor) -> Tensor:
        """Apply each row's middle matrix :math:`M_r` to ``JV`` of shape ``(m, R, C)``."""
        raise NotImplementedError  # pragma: no cover

    def _batch_product(self, batch: Any, offset: int, V: list[Tensor]) -> list[Tensor]:
        with torch.enable_grad():
            rows = self._rows(batch)
            F_ = rows.predictions
            # Double-vjp: Jᵀu is linear in the dummy u, so d⟨Jᵀu, v⟩/du = J v.
            u = torch.zeros_like(F_, requires_grad=True)
            JTu = torch.autograd.grad(F_, self.params, u, create_graph=True, allow_unused=True)
            (JV,) = batched_vjp(JTu, [u], V)
            MJV = self._output_matmul(rows, offset, JV) * self.normalizer
            return batched_vjp([F_], self.params, [MJV])


class GGNOperator(_JacobianSandwich):
    r"""The generalized Gauss-Newton :math:`c \sum_r J_r^\top H_r J_r` (closed-form :math:`H_r`)."""

    name = "ggn"

    def _output_matmul(self, rows: Rows, offset: int, JV: Tensor) -> Tensor:
        return self.objective.kind.hessian_matmul(rows.predictions, JV)


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
    return torch.cat(parts, dim=1).to(device)


class FisherOperator(_JacobianSandwich):
    r"""The Fisher information of the model's predictive distribution.

    ``mode="exact"`` is :math:`c \sum_r J_r^\top \mathbb E_{y \sim p(y|f_r)}[g g^\top] J_r`,
    which equals the GGN for the supported losses. ``mode="mc"`` replaces the
    expectation by ``mc_samples`` draws per row, drawn from the model at the current
    parameters and keyed by ``(seed, global example index)``, so every product uses
    the same labels and the operator is one fixed matrix. Keying by example index
    needs the data in a fixed order (no shuffling loader).

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
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.mode, self.mc_samples, self.seed = mode, mc_samples, seed
        self.name = "fisher" if mode == "exact" else "fisher_mc"
        super().__init__(model, loss_fn, data, params, **kwargs)

    def sampled_row_gradients(self, rows: Rows, offset: int) -> Tensor:
        """Loss gradients at the sampled targets, ``(mc_samples, R, C)`` (detached)."""
        kind = self.objective.kind
        F_ = rows.predictions.detach()
        U = _example_uniforms(
            self.seed, offset, rows, self.mc_samples, kind.uniforms_per_row(F_.shape[-1]), F_.device
        )
        return kind.row_gradients(F_, kind.sample(F_, U))

    def _output_matmul(self, rows: Rows, offset: int, JV: Tensor) -> Tensor:
        if self.mode == "exact":
            return self.objective.kind.hessian_matmul(rows.predictions, JV)
        G = self.sampled_row_gradients(rows, offset)
        coef = torch.einsum("src,mrc->msr", G, JV)
        return torch.einsum("msr,src->mrc", coef, G) / self.mc_samples


class EmpiricalFisherOperator(CurvatureOperator):
    r"""The empirical Fisher :math:`c \sum_n \nabla\ell_n \nabla\ell_n^\top`.

    With :math:`J_\ell` the Jacobian of the vector of per-example losses, the product is
    :math:`c\, J_\ell^\top (J_\ell v)`: one forward pass, no per-example gradients.
    """

    name = "empirical_fisher"
    is_psd = True

    def _batch_product(self, batch: Any, offset: int, V: list[Tensor]) -> list[Tensor]:
        with torch.enable_grad():
            rows = self._rows(batch)
            row_losses = self.objective.kind.row_losses(rows.predictions, rows.targets)
            losses = torch.zeros(
                rows.num_examples, dtype=row_losses.dtype, device=row_losses.device
            ).index_add(0, rows.example_index, row_losses)
            u = torch.zeros_like(losses, requires_grad=True)
            JTu = torch.autograd.grad(losses, self.params, u, create_graph=True, allow_unused=True)
            (JV,) = batched_vjp(JTu, [u], V)
            return batched_vjp([losses], self.params, [JV * self.normalizer])
