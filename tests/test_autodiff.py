"""``batched_vjp``: m cotangents in one backward, equal to m single backward passes;
``flat_vjp``: one cotangent written into a flat vector, equal to their concatenation;
``release_output_values``: graph outputs whose values are freed give the same products."""

from __future__ import annotations

import torch
from curvops.linops.autodiff import batched_vjp, flat_vjp, release_output_values
from curvops.linops.memory_probe import cpu_allocation_peak
from torch import nn

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


# --- release_output_values ---------------------------------------------------------------------
def _first_order(create_dummy: bool):
    """An MLP's create_graph gradient (the Hessian's) or its Jᵀu at a dummy u = 0 (the GGN's)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3)).to(DT)
    params = list(model.parameters())
    X = torch.randn(6, 4, dtype=DT)
    F = model(X)
    if create_dummy:
        u = torch.zeros_like(F, requires_grad=True)
        return torch.autograd.grad(F, params, u, create_graph=True), [u], [F, u]
    loss = F.logsumexp(-1).sum()
    return torch.autograd.grad(loss, params, create_graph=True), params, []


def test_released_outputs_give_the_same_products_and_free_their_storage():
    """The linear layers' weight gradients are views (of a transposed mm): their bases go
    too; every value is freed and the batched and single backward passes are unchanged."""
    for dummy in (True, False):
        outs, inputs, keep = _first_order(dummy)
        gen = torch.Generator().manual_seed(1)
        cot = [torch.randn(3, *o.shape, dtype=DT, generator=gen) for o in outs]
        before = batched_vjp(outs, inputs, cot, retain_graph=True)
        storages = {o.untyped_storage().data_ptr(): o.untyped_storage().nbytes() for o in outs}
        assert any(o._base is not None for o in outs)  # the view case is exercised
        released = release_output_values(outs, keep=keep)
        assert released == sum(storages.values()) >= sum(o.numel() for o in outs) * 8
        for o in outs:
            assert o.untyped_storage().nbytes() == 8 and o.grad_fn is not None
            assert o._base is None or o._base.untyped_storage().nbytes() == 8
        after = batched_vjp(outs, inputs, cot, retain_graph=True)
        for a, b in zip(after, before, strict=True):
            assert torch.equal(a, b)
        single = batched_vjp(outs, inputs, [c[:1] for c in cot], retain_graph=True)
        for a, b in zip(single, before, strict=True):
            torch.testing.assert_close(a, b[:1], rtol=1e-14, atol=1e-15)
        for k in keep:  # the dummy and the predictions keep their values
            assert k.untyped_storage().nbytes() == k.numel() * 8


def test_outputs_a_backward_reads_are_kept():
    """exp saves its result for its backward: releasing it would change the derivative."""
    w = torch.randn(5, dtype=DT, requires_grad=True)
    y = torch.exp(w * 2.0)
    z = w * 3.0  # its value is read by nothing
    kept = y.detach().clone()
    assert release_output_values([y, z, None], keep=()) == z.numel() * 8
    assert torch.equal(y, kept)
    (g,) = torch.autograd.grad(y, w, torch.ones_like(kept))
    torch.testing.assert_close(g, 2.0 * kept, rtol=1e-15, atol=0)
    kept_z = w * 4.0
    assert release_output_values([kept_z], keep=[kept_z]) == 0
    assert release_output_values([w], keep=()) == 0  # a leaf stays
    assert w.untyped_storage().nbytes() == 5 * 8


# --- flat_vjp -----------------------------------------------------------------------------------
def test_flat_vjp_equals_the_concatenated_gradients():
    """Same numbers as batched_vjp's blocks concatenated, zeros for an unused input, the
    float32 input's block cast like ``torch.cat`` after ``.to`` would, the graph kept or not."""
    for custom in (False, True):
        out, inputs, gen = _graph(3, custom)
        cot = torch.randn(*out.shape, dtype=DT, generator=gen)
        expected = torch.cat([g[0].reshape(-1) for g in
                              batched_vjp([out], inputs, [cot[None]], retain_graph=True)])
        got = flat_vjp([out], inputs, [cot], DT, retain_graph=True)
        assert torch.equal(got, expected)
        assert torch.equal(got[-2:], torch.zeros(2, dtype=DT))  # the unused input
        again = flat_vjp([out, None], inputs, [cot, cot], DT)  # None: no contribution
        assert torch.equal(again, expected)
    # another dtype for one input: its block is cast into the flat vector
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(3, dtype=torch.float32, generator=gen, requires_grad=True)
    b = torch.randn(3, dtype=DT, generator=gen, requires_grad=True)
    y = a.double().exp() * b
    c = torch.randn(3, dtype=DT, generator=gen)
    ga, gb = torch.autograd.grad(y, [a, b], c, retain_graph=True)
    got = flat_vjp([y], [a, b], [c], DT)
    assert torch.equal(got, torch.cat([ga.to(DT), gb]))
    # an output that is a leaf (no node to mark the pass by): the concatenation path
    assert torch.equal(flat_vjp([b], [a, b], [c], DT), torch.cat([torch.zeros(3, dtype=DT), c]))
    # no output depends on the inputs: zeros
    assert torch.equal(flat_vjp([None], [a, b], [c], DT), torch.zeros(6, dtype=DT))
    assert not a._backward_hooks  # the hooks are gone


def test_flat_vjp_does_not_hold_the_gradients_beside_the_flat_vector():
    """Two wide layers: the per-input gradients plus their concatenation would be twice
    the parameters; written as they arrive, the peak is the flat vector and one gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(600, 600), nn.Tanh(), nn.Linear(600, 600))
    params = list(model.parameters())
    X = torch.randn(4, 600)
    out = model(X)
    cot = torch.randn_like(out)
    size = sum(p.numel() for p in params) * 4
    with cpu_allocation_peak() as flat_peak:
        flat = flat_vjp([out], params, [cot], torch.float32, retain_graph=True)
    with cpu_allocation_peak() as cat_peak:
        grads = torch.autograd.grad(out, params, cot)
        cat = torch.cat([g.reshape(-1) for g in grads])
        del grads
    assert torch.equal(flat, cat)
    assert cat_peak["peak_bytes"] >= 1.9 * size  # the reference holds both
    assert flat_peak["peak_bytes"] < 1.6 * size


def test_flat_vjp_leaves_other_backward_passes_alone():
    """A backward pass nested in this one (a custom backward that differentiates another
    graph of the same inputs) also runs the inputs' hooks: its gradient stays its own and
    does not land in the flat vector."""
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(4, 3, dtype=DT, generator=gen, requires_grad=True)
    b = torch.randn(3, dtype=DT, generator=gen, requires_grad=True)
    X = torch.randn(5, 4, dtype=DT, generator=gen)
    nested = []

    class _Nested(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            with torch.enable_grad():
                nested.append(torch.autograd.grad((W * 5.0).sum(), W)[0])
            return g

    def graph():
        return _Nested.apply(torch.tanh(X @ W + b)).sin()

    out = graph()
    cot = torch.randn(*out.shape, dtype=DT, generator=gen)
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(graph(), [W, b], cot)])
    got = flat_vjp([out], [W, b], [cot], DT)
    assert torch.equal(got, expected)
    assert len(nested) == 2
    assert torch.equal(nested[1], torch.full_like(W, 5.0))  # the nested pass's own gradient
    assert not W._backward_hooks and not b._backward_hooks
