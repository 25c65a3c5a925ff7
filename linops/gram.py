r"""The Gram operator :math:`\tfrac1N G G^\top` of per-example gradients (``N x N``).

With :math:`G` the ``(N, P)`` matrix of per-example gradients :math:`g_n = \nabla\ell_n`
(:mod:`curvops.linops.per_example`), the second seed's empirical Fisher is

.. math::

    \hat F = \frac1N \sum_{n=1}^N g_n g_n^\top = \frac1N G^\top G \quad (P \times P),

and its nonzero eigenvalues are those of the Gram matrix :math:`K = \frac1N G G^\top`
(``N x N``): if :math:`G = U \Sigma W^\top` then both have the nonzero eigenvalues
:math:`\sigma_i^2 / N`. When ``N`` is much smaller than ``P`` the Gram matrix is the cheap
way to the whole nonzero spectrum.

With ``center=True`` the mean gradient :math:`\bar g = \frac1N \sum_n g_n` is subtracted
from every row first (same :math:`1/N`): :math:`K_c = \frac1N C G G^\top C` with
:math:`C = I - \frac1N \mathbf 1 \mathbf 1^\top`, whose nonzero eigenvalues are those of
the gradient covariance :math:`\frac1N \sum_n (g_n - \bar g)(g_n - \bar g)^\top`.

**Relation to** :class:`~curvops.linops.EmpiricalFisherOperator`. That operator is
:math:`\mathrm{EF} = c \sum_n g_n g_n^\top` with :math:`c` the loss's normaliser, over the
same examples (the same sample unit: one example, or one sequence for language models).
Hence :math:`\hat F = \frac{1}{cN}\,\mathrm{EF}`, and the nonzero eigenvalues of this operator
are those of ``EF`` times :math:`1/(cN)` (:attr:`GramOperator.ef_scale`). For a ``mean``
loss on classification data :math:`c = 1/N` and the two coincide.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .base import LinearOperatorBase
from .checks import check_int
from .dtypes import working_dtype
from .empirical_risk import EmpiricalRisk
from .per_example import check_deterministic_losses, per_example_gradient_chunks


class GramOperator(EmpiricalRisk, LinearOperatorBase):
    r"""The ``N x N`` operator :math:`\frac1N G G^\top` (or its centred form).

    ``G`` is computed once, chunk by chunk, and stored (``N x P``); every product is then
    two matrix products with it.

    Args:
        model: The network.
        loss_fn: A supported torch loss module or a curvops :class:`Objective` (e.g. the
            HuggingFace language-model objective, whose per-example loss is the token sum).
        data: Re-iterable batches, or one batch; examples are numbered in data order.
        params: Parameters, or names / glob patterns; default all that require grad.
        center: Subtract the mean gradient from every row (the gradient covariance).
        chunk_size: Examples per per-example-gradient chunk (bounds activation memory).
        method: Per-example gradient method (``"auto"``, ``"vmap"``, ``"loop"``,
            ``"jacobian"``; see :mod:`curvops.linops.per_example`).
        check_deterministic: Refuse a model whose outputs differ between two identical
            passes (dropout left on); also checks the loss is finite.

    Attributes:
        gradients: The stored ``(N, P)`` per-example gradients (not centred).
        num_examples: ``N``.
        num_params: ``P``.
        center: Whether the mean gradient is subtracted.
        sample_unit: What one example is (``"example"``, ``"sequence"``).
        normalization: ``"examples"``: the divisor is ``N``, the number of sample units.
        objective: The objective (``None`` for :meth:`from_gradients`).
        data: The data the rows come from (``None`` for :meth:`from_gradients`).
        space: The flat parameter space of the rows (``None`` for :meth:`from_gradients`).
        normalizer: The loss's ``c`` (``None`` for :meth:`from_gradients`).
        ef_scale: :math:`1/(cN)`, the factor from ``EmpiricalFisherOperator`` to
            :math:`\hat F` (``None`` for :meth:`from_gradients`).
        method: How the gradients were computed (``"precomputed"`` for :meth:`from_gradients`).
    """

    name = "gram"
    is_psd = True
    normalization = "examples"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        params: Sequence[nn.Parameter | str] | None = None,
        *,
        center: bool = False,
        chunk_size: int | None = None,
        method: str = "auto",
        check_deterministic: bool = True,
    ) -> None:
        chunk_size = check_int("chunk_size", chunk_size, minimum=1, allow_none=True)
        self._set_up_risk(model, loss_fn, data, params)
        self._survey()
        objective = self.objective
        if check_deterministic:
            check_deterministic_losses(model, objective, next(iter(self.data)), chunk_size)
        parts: list[Tensor] = []
        methods: list[str] = []
        for batch in self.data:
            for chunk in per_example_gradient_chunks(
                model, objective, batch, self.space.names, chunk_size=chunk_size, method=method
            ):
                parts.append(chunk.gradients)
                methods.append(chunk.method)
        self._set_gradients(torch.cat(parts), center, objective.sample_unit)
        self.ef_scale = 1.0 / (self.normalizer * self.num_examples)
        self.method = "+".join(sorted(set(methods)))

    @classmethod
    def from_gradients(
        cls, gradients: Tensor, *, center: bool = False, sample_unit: str = "example"
    ) -> GramOperator:
        """The Gram operator of given per-example gradients (rows of ``gradients``).

        Args:
            gradients: ``(N, P)`` floating tensor, ``N >= 1``.
            center: Subtract the mean row.
            sample_unit: What one row is, recorded as :attr:`sample_unit`.

        Raises:
            TypeError: For a non-tensor or non-floating tensor.
            ValueError: For a wrong shape, ``N == 0`` or NaN/Inf entries.
        """
        op = cls.__new__(cls)
        op._set_gradients(gradients, center, sample_unit)
        op.model = op.objective = op.space = op.params = op.data = op.total = None
        op.normalizer = op.ef_scale = None
        op.method = "precomputed"
        return op

    def _set_gradients(self, G: Tensor, center: bool, sample_unit: str) -> None:
        if not isinstance(G, Tensor) or not G.is_floating_point():
            raise TypeError("gradients must be a floating-point torch tensor")
        if G.dim() != 2 or G.shape[0] == 0:
            raise ValueError(f"gradients must have shape (N, P) with N >= 1, got {tuple(G.shape)}")
        if not bool(torch.isfinite(G).all()):
            raise ValueError("the per-example gradients contain NaN or Inf")
        if not isinstance(center, bool):
            raise TypeError(f"center must be a bool, got {center!r}")
        self.gradients = G
        self.num_examples, self.num_params = int(G.shape[0]), int(G.shape[1])
        self.center = center
        self.sample_unit = sample_unit
        self.shape = (self.num_examples, self.num_examples)
        self.dtype = G.dtype
        self.device = G.device

    # --- views of G -------------------------------------------------------------------------
    def centered_gradients(self) -> Tensor:
        r"""The rows the operator is built from: :math:`g_n - \bar g` if centred, else :math:`g_n`.

        Returns:
            ``(N, P)``, in the gradients' dtype.
        """
        G = self.gradients
        return G - G.mean(dim=0, keepdim=True) if self.center else G

    def gram_matrix(self, dtype: torch.dtype | None = None) -> Tensor:
        r"""The dense ``N x N`` matrix :math:`\frac1N G_c G_c^\top`, computed in ``dtype``.

        Args:
            dtype: Computation and result dtype (default the operator's; float32 for
                bf16/fp16 gradients would be the caller's explicit choice).
        """
        Gc = self.centered_gradients().to(dtype or self.dtype)
        K = Gc @ Gc.T / self.num_examples
        return (K + K.T) / 2  # exact symmetry for eigvalsh; changes only round-off

    def trace(self) -> float:
        r"""The exact trace :math:`\operatorname{tr} \hat F = \frac1N \lVert G_c \rVert_F^2`."""
        Gc = self.centered_gradients().double()
        return float((Gc * Gc).sum() / self.num_examples)

    # --- product ------------------------------------------------------------------------------
    def _matmat(self, V: Tensor) -> Tensor:
        work = working_dtype(self.dtype)
        G = self.gradients.to(work)
        W = V.to(work)
        if self.center:
            W = W - W.mean(dim=0, keepdim=True)
        out = G @ (G.T @ W) / self.num_examples
        if self.center:
            out = out - out.mean(dim=0, keepdim=True)
        return out.to(self.dtype)
