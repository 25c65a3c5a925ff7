"""Reverse-mode building blocks shared by the curvature products."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def batched_vjp(
    outputs: Sequence[Tensor | None],
    inputs: Sequence[Tensor],
    cotangents: Sequence[Tensor],
    *,
    retain_graph: bool = False,
    create_graph: bool = False,
) -> list[Tensor]:
    """Vector-Jacobian products for a batch of cotangents in one backward pass.

    Computes ``Σ_j ∂⟨outputs_j, w_j⟩/∂inputs`` for each of ``m`` cotangent sets
    ``w`` (the leading dimension of every ``cotangents[j]``). Outputs that are ``None``
    or do not depend on the graph contribute zero; inputs that receive no gradient
    get zeros. With ``m > 1`` the backward is vmapped (``is_grads_batched``); ops
    without a batching rule fall back to a loop over the columns.

    Args:
        outputs: Tensors to differentiate.
        inputs: Tensors to differentiate with respect to.
        cotangents: One ``(m, *output.shape)`` tensor per output.
        retain_graph: Keep the graph for later products.
        create_graph: Make the result differentiable.

    Returns:
        One ``(m, *input.shape)`` tensor per input.
    """
    m = cotangents[0].shape[0]
    pairs = [
        (o, w)
        for o, w in zip(outputs, cotangents, strict=True)
        if o is not None and o.requires_grad
    ]
    if not pairs:
        return [torch.zeros(m, *x.shape, dtype=x.dtype, device=x.device) for x in inputs]
    outs = [o for o, _ in pairs]
    ws = [w if w.dtype == o.dtype else w.to(o.dtype) for o, w in pairs]

    def one(cots: Sequence[Tensor], batched: bool, retain: bool) -> list[Tensor]:
        grads = torch.autograd.grad(
            outs,
            list(inputs),
            grad_outputs=list(cots),
            retain_graph=retain,
            create_graph=create_graph,
            allow_unused=True,
            is_grads_batched=batched,
        )
        shape = (m,) if batched else ()
        return [
            torch.zeros(*shape, *x.shape, dtype=x.dtype, device=x.device) if g is None else g
            for g, x in zip(grads, inputs, strict=True)
        ]

    if m == 1:
        res = one([w[0] for w in ws], False, retain_graph)
        return [r.unsqueeze(0) for r in res]
    try:
        # The graph is kept through the batched attempt: an op without a batching rule
        # fails it midway, after the first nodes' saved tensors would have been freed, and
        # the loop below needs them. (Dropping the outputs frees the graph all the same.)
        return one(ws, True, True)
    except RuntimeError:
        # Some ops have no vmap rule for their backward: a loop gives the same numbers.
        cols = [one([w[i] for w in ws], False, retain_graph or i < m - 1) for i in range(m)]
        return [torch.stack(c) for c in zip(*cols, strict=True)]
