"""``batched_vjp``: m cotangents in one backward, equal to m single backward passes."""

from __future__ import annotations

import torch
from curvops.linops.autodiff import batched_vjp

DT = torch.float64


class _EinsumSquare(torch.autograd.Function):
    """x -> x**2 with a backward that also takes a row-wise einsum (no rule for it under a
    vmapped backward, ``is_grads_batched``; its term is zero)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2.0 * x * g + 0.0 * torch.einsum("rc,rc->r", x, g)[:, None]


def _graph(seed: int, custom: bool):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(4, 3, dtype=DT, generator=gen, requires_grad=True)
    b = torch.randn(3, dtype=DT, generator=gen, requires_grad=True)
    unused = torch.randn(2, dtype=DT, generator=gen, requires_grad=True)
    X = torch.randn(5, 4, dtype=DT, generator=gen)
    Z = torch.tanh(X @ W + b)
    # the einsum node is deep in the graph: nodes before it free their saved tensors
    out = (_EinsumSquare.apply(Z) if custom else Z).sin()
    return out, [W, b, unused], gen


def _against_loop(seed: int, m: int, custom: bool, retain_graph: bool):
    """``batched_vjp`` and the loop of single backward passes on the same fresh graph."""
    out, inputs, gen = _graph(seed, custom)
    cot = torch.randn(m, *out.shape, dtype=DT, generator=gen)
    cols = []
    for i in range(m):
        grads = torch.autograd.grad(out, inputs, cot[i], retain_graph=True, allow_unused=True)
        cols.append([torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)])
    expected = [torch.stack(c) for c in zip(*cols)]
    got = batched_vjp([out], inputs, [cot], retain_graph=retain_graph)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)
    return out, inputs, cot, got


def test_batched_equals_single_backward_passes():
    out, inputs, cot, got = _against_loop(0, 3, custom=False, retain_graph=True)
    assert not got[2].any()  # an input the outputs do not depend on gets zeros
    single = batched_vjp([out, None], inputs, [cot[:1], cot[:1]])
    for a, b in zip(single, got, strict=True):
        torch.testing.assert_close(a, b[:1], rtol=1e-14, atol=1e-15)


def test_fallback_loop_when_a_backward_has_no_batching_rule_and_the_graph_is_not_kept():
    # The batched attempt fails midway; the loop that replaces it must still find every
    # saved tensor, although the caller does not keep the graph (a fresh matmat).
    _against_loop(1, 4, custom=True, retain_graph=False)
