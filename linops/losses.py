r"""Supported losses: per-row values, closed-form output Hessians and MC sampling.

The curvature code sees a loss through its *rows*: a batch is mapped to predictions
``F`` of shape ``(R, C)`` and targets ``Y`` (``(R,)`` class indices or ``(R, C)``
values), one row per loss term group, plus the example each row belongs to. The
losses, summed over rows, are

* cross-entropy: :math:`\ell_r = -\log \mathrm{softmax}(f_r)_{y_r}`, Hessian
  :math:`\operatorname{diag}(p_r) - p_r p_r^\top`;
* squared error: :math:`\ell_r = \lVert f_r - y_r \rVert^2`, Hessian :math:`2I`;
* BCE with logits: :math:`\ell_r = \sum_c \mathrm{softplus}(f_{rc}) - y_{rc} f_{rc}`,
  Hessian :math:`\operatorname{diag}(\sigma(f_r)(1 - \sigma(f_r)))`.

Each is :math:`-\log p(y \mid f)` up to a constant for the distributions sampled by
:meth:`LossKind.sample` (categorical, :math:`\mathcal N(f, \tfrac12 I)`, Bernoulli), so
the expected outer product of the sampled gradients equals the Hessian and the exact
Fisher equals the GGN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED_LOSSES = "nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss"

#: Cross-entropy over this many logits or more uses the closed-form output Hessian in
#: Hessian products (:class:`_CrossEntropySum`); the two agree to round-off, and this is
#: where the closed form starts to pay (docs/decisions.md, Caching across products).
CLOSED_FORM_CE_MIN_LOGITS = 1 << 16

#: Cross-entropy output-Hessian products (:meth:`LossKind.hessian_matmul`) take this many
#: logits at a time (8 MiB in float32): the chunk's softmax and product stay in cache.
CE_CHUNK_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class LossKind:
    """One of the supported losses, reduced to what the curvature products need.

    Attributes:
        name: ``"cross_entropy"``, ``"mse"`` or ``"bce"``.
    """

    name: str

    def row_losses(self, F_: Tensor, Y: Tensor) -> Tensor:
        """Loss of each row, summed over the row's entries: shape ``(R,)``."""
        if self.name == "cross_entropy":
            return F.cross_entropy(F_, Y, reduction="none")
        if self.name == "mse":
            return ((F_ - Y) ** 2).sum(-1)
        return F.binary_cross_entropy_with_logits(F_, Y, reduction="none").sum(-1)

    def total_loss(self, F_: Tensor, Y: Tensor) -> Tensor:
        """The sum of :meth:`row_losses`, built for Hessian products.

        The same number and gradient; its graph is what a Hessian product differentiates
        again on every product, so it is kept small: the loss's own ``reduction="sum"``
        (no per-row vector and ``sum`` node), and for cross-entropy over at least
        :data:`CLOSED_FORM_CE_MIN_LOGITS` logits a gradient whose derivative is the
        closed-form output Hessian (:class:`_CrossEntropySum`). Below that size torch's own
        is used: the Python autograd functions cost more than the exponentials they save.
        The measured costs are in docs/decisions.md (Caching across products).
        """
        if self.name == "cross_entropy":
            if F_.numel() >= CLOSED_FORM_CE_MIN_LOGITS:
                return _CrossEntropySum.apply(F_, Y)
            return F.cross_entropy(F_, Y, reduction="sum")
        if self.name == "mse":
            return F.mse_loss(F_, Y, reduction="sum")
        return F.binary_cross_entropy_with_logits(F_, Y, reduction="sum")

    def hessian_matmul(
        self, F_: Tensor, U: Tensor, *, scale: float = 1.0, overwrite: bool = False
    ) -> Tensor:
        """Each row's output Hessian applied, times ``scale``: ``scale * H_r u_r`` for ``U``
        of shape ``(..., R, C)``.

        Args:
            F_: The predictions ``(R, C)``.
            U: The vectors.
            scale: A factor folded into the product (the operator's normaliser), so that
                no separate pass over a logits-sized tensor scales it.
            overwrite: ``U`` is the caller's own temporary: the result is written into it.

        Cross-entropy takes :data:`CE_CHUNK_ELEMENTS` logits at a time (softmax, row dot
        product, ``(u - pᵀu) ⊙ p ⊙ scale``): no logits-sized temporary outlives its chunk,
        and with ``overwrite`` nothing logits-sized is allocated at all (a language-model
        head's ``512 × 50257`` logits are 100 MB in float32; the unchunked form made five
        such temporaries per product, the product by the normaliser included).
        """
        if self.name == "cross_entropy":
            F_ = F_.detach()
            out = U if overwrite else torch.empty_like(U)
            R, C = F_.shape[-2], F_.shape[-1]
            step = max(1, CE_CHUNK_ELEMENTS // max(C, 1))
            for i in range(0, R, step):
                p = torch.softmax(F_[i : i + step], dim=-1)
                u, o = U[..., i : i + step, :], out[..., i : i + step, :]
                pu = torch.linalg.vecdot(p, u).unsqueeze(-1)
                torch.sub(u, pu, out=o)
                o.mul_(p)
                if scale != 1.0:
                    o.mul_(scale)
            return out
        if self.name == "mse":
            factor = 2.0 * scale
            return U.mul_(factor) if overwrite else U * factor
        s = torch.sigmoid(F_.detach())
        w = s * (1.0 - s)
        if scale != 1.0:
            w.mul_(scale)
        return U.mul_(w) if overwrite else U * w

    def uniforms_per_row(self, num_outputs: int) -> int:
        """How many U(0, 1) numbers :meth:`sample` needs per row and draw."""
        if self.name == "cross_entropy":
            return 1
        return 2 * num_outputs if self.name == "mse" else num_outputs

    def sample(self, F_: Tensor, uniforms: Tensor) -> Tensor:
        """Draw targets from the model's predictive distribution.

        Args:
            F_: Predictions, ``(R, C)``.
            uniforms: Independent U(0, 1) numbers of shape ``(S, R, u)`` with ``u`` from
                :meth:`uniforms_per_row`.

        Returns:
            ``(S, R)`` class indices for cross-entropy, ``(S, R, C)`` values otherwise.
        """
        F_ = F_.detach()
        if self.name == "cross_entropy":
            # Inverse-CDF sampling of the softmax, in float64 so ties are vanishingly rare.
            cdf = torch.softmax(F_.double(), dim=-1).cumsum(-1)
            u = uniforms[..., 0].double().unsqueeze(-1)
            idx = (cdf < u * cdf[..., -1:]).sum(-1)
            return idx.clamp_max(F_.shape[-1] - 1)
        if self.name == "mse":
            # Box-Muller on pairs of uniforms; N(f, 1/2 I) so that -log p = ||y - f||^2 + const.
            C = F_.shape[-1]
            u1 = uniforms[..., :C].double().clamp_min(1e-300)
            u2 = uniforms[..., C:].double()
            z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
            return F_ + (z * math.sqrt(0.5)).to(F_.dtype)
        return (uniforms < torch.sigmoid(F_.double())).to(F_.dtype)

    def row_gradients(self, F_: Tensor, Y: Tensor) -> Tensor:
        """Gradient of each row's loss with respect to its predictions, ``(..., R, C)``.

        ``Y`` may carry a leading sample dimension (from :meth:`sample`).
        """
        F_ = F_.detach()
        if self.name == "cross_entropy":
            p = torch.softmax(F_, dim=-1)
            return p - F.one_hot(Y, F_.shape[-1]).to(F_.dtype)
        if self.name == "mse":
            return 2.0 * (F_ - Y)
        return torch.sigmoid(F_) - Y


class _SoftmaxResidual(torch.autograd.Function):
    r"""``g * (p - onehot(y))`` attached to the logits, with the closed-form derivative.

    The cross-entropy gradient in the logits, scaled by the loss's incoming gradient
    :math:`g` (a scalar); its derivative there is :math:`g(\operatorname{diag}(p) - p
    p^\top)`, applied as :math:`g\,p \odot (u - p^\top u)` with the saved ``p``: a row
    dot product, one subtraction and two in-place scalings per Hessian product, where
    torch's log-softmax double backward recomputes the exponential of every logit, and a
    separate product by :math:`g` outside this function would allocate one more
    logits-sized tensor (docs/decisions.md has the measured costs). ``p`` is a constant
    here, so derivatives of third order through it would be wrong; nothing in curvops
    takes them. The derivative in :math:`g` is exact (formed only when asked for).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, p: Tensor, onehot: Tensor, g: Tensor) -> Tensor:
        ctx.save_for_backward(p, g, onehot if ctx.needs_input_grad[3] else None)
        return torch.sub(p, onehot).mul_(g)

    @staticmethod
    def backward(ctx, u: Tensor) -> tuple[Tensor, None, None, Tensor | None]:
        p, g, onehot = ctx.saved_tensors
        pu = torch.linalg.vecdot(p, u).unsqueeze(-1)  # (einsum: no rule for a vmapped matmat)
        grad_g = None
        if ctx.needs_input_grad[3]:
            grad_g = torch.linalg.vecdot(u, p - onehot).sum()
        return torch.sub(u, pu).mul_(p).mul_(g), None, None, grad_g


class _CrossEntropySum(torch.autograd.Function):
    """``F.cross_entropy(F_, Y, reduction="sum")`` whose gradient is a :class:`_SoftmaxResidual`."""

    @staticmethod
    def forward(ctx, F_: Tensor, Y: Tensor) -> Tensor:
        logp = torch.log_softmax(F_, dim=-1)
        ctx.save_for_backward(F_, logp, Y)
        return -logp.gather(-1, Y[:, None]).sum()

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:
        F_, logp, Y = ctx.saved_tensors
        p = logp.detach().exp()  # what torch's own log-softmax backward uses
        onehot = torch.zeros_like(p).scatter_(-1, Y[:, None], 1.0)
        return _SoftmaxResidual.apply(F_, p, onehot, g), None


@dataclass(frozen=True)
class TorchLoss:
    """A validated torch loss module.

    Attributes:
        kind: The loss kind.
        reduction: ``"mean"`` or ``"sum"``.
    """

    kind: LossKind
    reduction: str

    @classmethod
    def from_module(cls, loss_fn: nn.Module) -> TorchLoss:
        """Validate ``loss_fn`` and describe it.

        Raises:
            TypeError: For a loss that is not one of the supported ones, or a subclass or
                instance whose call does something else (its own ``forward`` or
                ``__call__``, forward hooks).
            ValueError: For options that would make the curvature silently different
                (class weights, label smoothing, another ``ignore_index``, ``pos_weight``,
                ``reduction="none"``).
        """
        reduction = getattr(loss_fn, "reduction", None)
        for base in (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss):
            if isinstance(loss_fn, base):
                _check_plain_call(loss_fn, base)
        if isinstance(loss_fn, nn.CrossEntropyLoss):
            if loss_fn.weight is not None:
                raise ValueError("CrossEntropyLoss(weight=...) is not supported")
            if loss_fn.label_smoothing != 0.0:
                raise ValueError("CrossEntropyLoss(label_smoothing=...) is not supported")
            if loss_fn.ignore_index != -100:
                raise ValueError("CrossEntropyLoss: only ignore_index=-100 is supported")
            kind = LossKind("cross_entropy")
        elif isinstance(loss_fn, nn.MSELoss):
            kind = LossKind("mse")
        elif isinstance(loss_fn, nn.BCEWithLogitsLoss):
            if loss_fn.weight is not None:
                raise ValueError("BCEWithLogitsLoss(weight=...) is not supported")
            if loss_fn.pos_weight is not None:
                raise ValueError("BCEWithLogitsLoss(pos_weight=...) is not supported")
            kind = LossKind("bce")
        else:
            raise TypeError(
                f"unsupported loss {type(loss_fn).__name__}; supported: {SUPPORTED_LOSSES} "
                "(or a curvops objective such as curvops.linops.hf.LanguageModelObjective)"
            )
        if reduction not in ("mean", "sum"):
            raise ValueError(f"loss reduction must be 'mean' or 'sum', got {reduction!r}")
        return cls(kind, reduction)


def _check_plain_call(loss_fn: nn.Module, base: type[nn.Module]) -> None:
    """Refuse a loss whose call is not ``base``'s own.

    The products never call the loss module: they use the closed forms of ``base``
    (:class:`LossKind`). A subclass's own ``forward`` (``super().forward(2 * o, t)``) or a
    forward hook would be ignored, giving the curvature of another loss without a word.
    """
    cls = type(loss_fn)
    changed = [n for n in ("forward", "__call__") if getattr(cls, n) is not getattr(base, n)]
    if "forward" in vars(loss_fn):
        changed.append("forward (set on the instance)")
    if loss_fn._forward_hooks or loss_fn._forward_pre_hooks:
        changed.append("forward hooks")
    if changed:
        raise TypeError(
            f"loss {cls.__name__} changes {' and '.join(changed)} of nn.{base.__name__}; curvops "
            f"computes the curvature from nn.{base.__name__}'s closed form and never calls the "
            f"loss module, so the change would be ignored. Pass nn.{base.__name__} itself, or "
            "write the loss as a curvops Objective (curvops.linops.Objective)"
        )
