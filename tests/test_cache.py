"""Issue 3: cached products equal fresh ones and the dense references; stale caches rebuild.

References are brute force on a flat float64 parameter vector (``torch.func.jacrev`` of
``torch.func.grad`` for the Hessian, ``torch.func.jacrev`` with the closed-form output
Hessians for the GGN, per-example gradient loops for the empirical Fisher), independent
of the operators' product code.
"""

from __future__ import annotations

import pytest
import torch
from curvops.linops import (
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    TorchObjective,
)
from curvops.linops.cache import DEFAULT_BUDGET_FRACTION, parameter_fingerprint
from curvops.linops.memory_probe import available_memory_bytes, cpu_allocation_peak
from curvops.linops.objective import Objective
from torch import Tensor, nn
from torch.func import functional_call

DT = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-12}




# --- models and data -------------------------------------------------------------------------
def ln_mlp(seed: int = 0, out: int = 3) -> nn.Module:
    """A small MLP with a LayerNorm (the pitfall of DECISIONS.md) and a tanh."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, out)
    ).to(DT)


def ce_data(seed: int = 1, n: int = 10) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def batchings(X: Tensor, y: Tensor) -> dict[str, tuple[object, int | None]]:
    """The same data as one batch, as two uneven batches, and micro-batched."""
    return {
        "one_batch": ((X, y), None),
        "two_batches": ([(X[:6], y[:6]), (X[6:], y[6:])], None),
        "micro_batches_3": ([(X[:6], y[:6]), (X[6:], y[6:])], 3),
    }


# --- brute-force references --------------------------------------------------------------------
def _flat_call(model: nn.Module):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    numels = [p.numel() for p in model.parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def call(theta: Tensor, x: Tensor) -> Tensor:
        blocks = [b.view(s) for b, s in zip(theta.split(numels), shapes)]
        return functional_call(model, dict(zip(names, blocks)), (x,))

    return call, theta0, numels


def dense_hessian(model: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """Reverse over reverse: ``torch.func.hessian`` (forward over reverse) is wrong on
    LayerNorm weights in torch 2.13 (DECISIONS.md, known pitfalls)."""
    call, theta0, _ = _flat_call(model)
    grad = torch.func.grad(lambda t: nn.functional.cross_entropy(call(t, X), y))
    return torch.func.jacrev(grad)(theta0)


def dense_ggn(model: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    call, theta0, _ = _flat_call(model)
    J = torch.func.jacrev(lambda t: call(t, X))(theta0)  # (N, C, n)
    p = torch.softmax(call(theta0, X).detach(), dim=-1)
    H = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    return torch.einsum("rci,rcd,rdj->ij", J, H, J) / X.shape[0]


def dense_ef(model: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    call, theta0, _ = _flat_call(model)
    G = torch.stack(
        [
            torch.func.grad(
                lambda t, i=i: nn.functional.cross_entropy(call(t, X[i : i + 1]), y[i : i + 1])
            )(theta0)
            for i in range(X.shape[0])
        ]
    )
    return G.T @ G / X.shape[0]


OPERATORS = {
    "hessian": (HessianOperator, {}),
    "ggn": (GGNOperator, {}),
    "fisher": (FisherOperator, {}),
    "fisher_mc": (FisherOperator, {"mode": "mc", "mc_samples": 2, "seed": 3}),
    "empirical_fisher": (EmpiricalFisherOperator, {}),
}
REFERENCES = {
    "hessian": dense_hessian,
    "ggn": dense_ggn,
    "fisher": dense_ggn,
    "empirical_fisher": dense_ef,
}


@pytest.fixture(scope="module")
def problem():
    model = ln_mlp()
    X, y = ce_data()
    refs = {k: f(model, X, y) for k, f in REFERENCES.items()}
    return model, X, y, refs


# --- products written into the caller's buffer ------------------------------------------------
@pytest.mark.parametrize("batching", ["one_batch", "two_batches", "micro_batches_3"])
@pytest.mark.parametrize("kind", list(OPERATORS))
def test_matvec_into_equals_matvec(problem, kind, batching):
    """Fresh (forward mode or double-vjp), cache-building and cached products written into a
    buffer equal the products returned, bit for bit, and equal the dense reference."""
    model, X, y, refs = problem
    data, mbs = batchings(X, y)[batching]
    cls, kw = OPERATORS[kind]
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=DT,
                    generator=torch.Generator().manual_seed(6))
    for cache in ("none", "auto"):
        op = cls(model, nn.CrossEntropyLoss(), data, micro_batch_size=mbs, cache=cache, **kw)
        twin = cls(model, nn.CrossEntropyLoss(), data, micro_batch_size=mbs, cache=cache, **kw)
        for _ in range(2):  # (with the cache: building it, then served from it)
            out = torch.full_like(v, float("nan"))
            assert op.matvec_into(v, out) is out
            assert torch.equal(out, twin @ v)
        if kind in refs:
            torch.testing.assert_close(out, refs[kind] @ v, **TOL)


def test_matvec_into_refuses_a_buffer_it_cannot_write_and_allocates_no_output(problem):
    model, X, y, _ = problem
    op = GGNOperator(model, nn.CrossEntropyLoss(), (X, y))
    n = op.shape[0]
    v = torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match="share memory"):
        op.matvec_into(v, v)
    with pytest.raises(TypeError, match="out must have the operator's dtype"):
        op.matvec_into(v, torch.empty(n, dtype=torch.float32))
    with pytest.raises(ValueError, match="contiguous"):
        op.matvec_into(v, torch.empty(2 * n, dtype=DT)[::2])
    with pytest.raises(ValueError, match="out must have shape"):
        op.matvec_into(v, torch.empty(n + 1, dtype=DT))
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        op.matvec_into(v, v.numpy().copy())
    # A wide model: the cached product's own output would be most of its memory.
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(20, 400), nn.Tanh(), nn.Linear(400, 400), nn.Tanh(),
                         nn.Linear(400, 3)).to(DT)
    op = GGNOperator(wide, nn.CrossEntropyLoss(), (torch.randn(4, 20, dtype=DT), y[:4]))
    n = op.shape[0]
    v = torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(8))
    op @ v  # builds the cache
    out = torch.empty(n, dtype=DT)
    with cpu_allocation_peak() as into:
        op.matvec_into(v, out)
    with cpu_allocation_peak() as returned:
        y_ = op @ v
    assert torch.equal(out, y_)
    assert returned["peak_bytes"] - into["peak_bytes"] >= 0.9 * n * 8


# --- cached == fresh == dense ------------------------------------------------------------------
@pytest.mark.parametrize("batching", ["one_batch", "two_batches", "micro_batches_3"])
@pytest.mark.parametrize("kind", list(OPERATORS))
def test_cached_products_equal_fresh_and_dense(problem, kind, batching):
    model, X, y, refs = problem
    data, mbs = batchings(X, y)[batching]
    cls, kw = OPERATORS[kind]
    fresh = cls(model, nn.CrossEntropyLoss(), data, micro_batch_size=mbs, cache="none", **kw)
    cached = cls(model, nn.CrossEntropyLoss(), data, micro_batch_size=mbs, **kw)
    V = torch.randn(fresh.shape[0], 3, generator=torch.Generator().manual_seed(5), dtype=DT)

    expect = fresh @ V
    first = cached @ V  # builds the cache
    assert cached.cache_active and cached.cache_bytes > 0
    second = cached @ V  # served from the cache
    col = cached @ V[:, 1]
    torch.testing.assert_close(first, expect, **TOL)
    torch.testing.assert_close(second, expect, **TOL)
    torch.testing.assert_close(col, expect[:, 1], **TOL)
    assert not fresh.cache_active and fresh.cache_bytes == 0
    if kind in refs:
        torch.testing.assert_close(second, refs[kind] @ V, **TOL)
        torch.testing.assert_close(cached.to_dense(), refs[kind], **TOL)


def test_layernorm_hessian_block_by_block(problem):
    """Cached and fresh Hessians (matvec and matmat) agree with torch.func.hessian per block."""
    model, X, y, refs = problem
    ref = refs["hessian"]
    _, _, numels = _flat_call(model)
    edges = torch.tensor([0, *numels]).cumsum(0).tolist()
    names = [n for n, _ in model.named_parameters()]
    for cache in ("none", "auto"):
        op = HessianOperator(model, nn.CrossEntropyLoss(), (X, y), cache=cache, micro_batch_size=4)
        dense = op.to_dense(chunk_size=56)  # batched matmat
        # matvec on the first and last column of every block
        cols = sorted({c for i in range(len(names)) for c in (edges[i], edges[i + 1] - 1)})
        eye = torch.eye(op.shape[0], dtype=DT)
        by_matvec = torch.stack([op @ eye[:, c] for c in cols], dim=1)
        torch.testing.assert_close(by_matvec, ref[:, cols], **TOL)
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                blk = (slice(edges[i], edges[i + 1]), slice(edges[j], edges[j + 1]))
                err = float((dense[blk] - ref[blk]).abs().max())
                scale = float(ref[blk].abs().max()) + 1e-30
                assert err <= 1e-10 * scale + 1e-13, f"block ({a}, {b}), cache={cache}: {err}"


def test_cached_products_run_no_forward_pass(problem):
    model, X, y, _ = problem
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        for cls, kw in OPERATORS.values():
            op = cls(model, nn.CrossEntropyLoss(), (X, y), check_deterministic=False, **kw)
            v = torch.ones(op.shape[0], dtype=DT)
            op @ v
            calls.clear()
            op @ v
            op.matmat(torch.ones(op.shape[0], 2, dtype=DT))
            assert calls == [], f"{op.name}: the cached product ran a forward pass"
            fresh = cls(model, nn.CrossEntropyLoss(), (X, y), cache="none", **kw)
            calls.clear()
            fresh @ v
            assert calls, f"{op.name}: a fresh product must run the model"
    finally:
        handle.remove()


# --- staleness -------------------------------------------------------------------------------
def _step(model: nn.Module, X: Tensor, y: Tensor) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _update_by_optimizer(model, X, y):
    _step(model, X, y)


def _update_through_data(model, X, y):
    with torch.no_grad():
        next(iter(model.parameters())).data.mul_(1.5)  # bypasses the version counter


def _update_by_load_state_dict(model, X, y):
    other = ln_mlp(seed=7)
    model.load_state_dict(other.state_dict())


def _update_by_replacing_data(model, X, y):
    p = list(model.parameters())[2]
    p.data = p.data * 0.5 + 0.1  # a new storage


@pytest.mark.parametrize(
    "update",
    [
        _update_by_optimizer,
        _update_through_data,
        _update_by_load_state_dict,
        _update_by_replacing_data,
    ],
)
@pytest.mark.parametrize("kind", list(OPERATORS))
def test_parameter_update_rebuilds_cache(kind, update):
    model = ln_mlp(seed=2)
    X, y = ce_data(seed=4)
    cls, kw = OPERATORS[kind]
    op = cls(model, nn.CrossEntropyLoss(), [(X[:6], y[:6]), (X[6:], y[6:])], **kw)
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(0), dtype=DT)
    before = op @ v
    assert op.cache_active
    update(model, X, y)
    after = op @ v
    rebuilt = cls(model, nn.CrossEntropyLoss(), [(X[:6], y[:6]), (X[6:], y[6:])], **kw)
    torch.testing.assert_close(after, rebuilt @ v, **TOL)
    assert not torch.allclose(after, before), "the update should change the product"
    assert op.cache_active and op.cache_info["builds"] == 2


def test_fingerprint_changes_on_buffers_and_is_stable():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).to(DT).eval()
    fp = parameter_fingerprint(model)
    assert parameter_fingerprint(model) == fp
    with torch.no_grad():
        model[1].running_mean.add_(1.0)
    assert parameter_fingerprint(model) != fp


# --- budget, modes, visibility -----------------------------------------------------------------
def test_budget_too_small_falls_back_to_fresh_products(problem):
    model, X, y, refs = problem
    for budget in (0, 1):
        op = HessianOperator(model, nn.CrossEntropyLoss(), (X, y), cache_budget_bytes=budget)
        v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(1), dtype=DT)
        torch.testing.assert_close(op @ v, refs["hessian"] @ v, **TOL)
        torch.testing.assert_close(op @ v, refs["hessian"] @ v, **TOL)
        assert not op.cache_active and op.cache_bytes == 0
        assert "do not fit" in op.cache_info["status"]
    # Raising the budget lets the next product build the cache.
    op.cache_budget_bytes = 10**9
    op @ v
    assert op.cache_active


def test_budget_between_one_and_all_micro_batches(problem):
    """All-or-nothing: a budget for some micro-batches but not all caches nothing."""
    model, X, y, refs = problem
    probe = GGNOperator(model, nn.CrossEntropyLoss(), (X, y), micro_batch_size=2)
    v = torch.ones(probe.shape[0], dtype=DT)
    probe @ v
    total = probe.cache_bytes
    assert total > 0
    op = GGNOperator(
        model, nn.CrossEntropyLoss(), (X, y), micro_batch_size=2, cache_budget_bytes=total // 2
    )
    torch.testing.assert_close(op @ v, refs["ggn"] @ v, **TOL)
    assert not op.cache_active and op.cache_bytes == 0
    exact = GGNOperator(
        model, nn.CrossEntropyLoss(), (X, y), micro_batch_size=2, cache_budget_bytes=total
    )
    exact @ v
    assert exact.cache_active and exact.cache_bytes == total


def test_cache_bytes_count_the_saved_activations():
    """The Hessian state holds at least the hidden activations of the batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 300), nn.Tanh(), nn.Linear(300, 2)).to(DT)
    X = torch.randn(64, 20, dtype=DT)
    y = torch.randint(0, 2, (64,))
    op = HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    op @ torch.ones(op.shape[0], dtype=DT)
    hidden = 64 * 300 * 8
    assert op.cache_bytes >= hidden
    assert op.cache_bytes < 50 * hidden


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_cache_does_not_hold_the_first_order_values(kind):
    """A wide MLP on few examples: the first-order gradient / Jᵀu (n values) would be most
    of the state; the products only differentiate it, so the cache holds far less."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 300), nn.Tanh(), nn.Linear(300, 300), nn.Tanh(),
                          nn.Linear(300, 2)).to(DT)
    X = torch.randn(4, 20, dtype=DT)
    y = torch.randint(0, 2, (4,))
    cls = HessianOperator if kind == "hessian" else GGNOperator
    op = cls(model, nn.CrossEntropyLoss(), (X, y))
    fresh = cls(model, nn.CrossEntropyLoss(), (X, y), cache="none")
    v = torch.randn(op.shape[0], dtype=DT, generator=torch.Generator().manual_seed(0))
    first = op @ v
    assert op.cache_active
    assert op.cache_bytes < 0.1 * op.shape[0] * 8
    torch.testing.assert_close(op @ v, first, **TOL)
    torch.testing.assert_close(first, fresh @ v, **TOL)


def test_empirical_fisher_keeps_gradients_or_graph():
    """G is kept when it fits the budget and is no larger than the graph it replaces."""
    torch.manual_seed(0)
    seq = SequenceModel().to(DT)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 7, (4, 40), generator=g)
    seq_data = (ids, torch.randint(0, 7, (4, 40), generator=g))
    wide = nn.Sequential(nn.Linear(30, 200), nn.Tanh(), nn.Linear(200, 3)).to(DT)
    wide_data = (torch.randn(4, 30, generator=g, dtype=DT), torch.randint(0, 3, (4,), generator=g))
    for model, data, kind in ((seq, seq_data, "per_example_gradients"), (wide, wide_data, "graph")):
        n = sum(p.numel() for p in model.parameters())
        g_bytes = 4 * n * 8
        v = torch.randn(n, generator=g, dtype=DT)
        expect = EmpiricalFisherOperator(model, nn.CrossEntropyLoss(), data, cache="none") @ v
        op = EmpiricalFisherOperator(model, nn.CrossEntropyLoss(), data)
        torch.testing.assert_close(op @ v, expect, **TOL)
        torch.testing.assert_close(op @ v, expect, **TOL)
        assert op.cache_info["kind"] == kind
        if kind == "per_example_gradients":
            assert op.cache_bytes == g_bytes
            small = EmpiricalFisherOperator(
                model, nn.CrossEntropyLoss(), data, cache_budget_bytes=g_bytes - 1
            )
            torch.testing.assert_close(small @ v, expect, **TOL)
            torch.testing.assert_close(small @ v, expect, **TOL)
            # G does not fit, and the graph is larger still: fresh products
            assert not small.cache_active


def test_cache_arguments_and_attributes(problem):
    model, X, y, _ = problem
    with pytest.raises(ValueError, match="cache must be one of"):
        HessianOperator(model, nn.CrossEntropyLoss(), (X, y), cache="always")
    with pytest.raises(TypeError, match="cache_budget_bytes"):
        HessianOperator(model, nn.CrossEntropyLoss(), (X, y), cache_budget_bytes=1.5)
    with pytest.raises(ValueError, match="cache_budget_bytes"):
        HessianOperator(model, nn.CrossEntropyLoss(), (X, y), cache_budget_bytes=-1)
    op = HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    assert op.cache == "auto" and not op.cache_active and op.cache_bytes == 0
    expected = DEFAULT_BUDGET_FRACTION * available_memory_bytes(op.device)
    assert abs(op.cache_budget_bytes - expected) <= 0.2 * expected
    op @ torch.ones(op.shape[0], dtype=DT)
    assert op.cache_active
    op.clear_cache()
    assert not op.cache_active and op.cache_bytes == 0
    none = HessianOperator(model, nn.CrossEntropyLoss(), (X, y), cache="none")
    none @ torch.ones(op.shape[0], dtype=DT)
    assert none.cache == "none" and not none.cache_active
    assert none.cache_info["status"] == "cache='none'"


# --- other objectives and dtypes ---------------------------------------------------------------
class SequenceModel(nn.Module):
    """Per-position logits ``(N, C, T)`` from a tiny recurrent-free token mixer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.mix = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.out = nn.Linear(4, 7)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.emb(ids)
        h = h + torch.tanh(self.mix(h.cumsum(1)))
        return self.out(self.ln(h)).transpose(1, 2)


class WrappedObjective(Objective):
    """A non-TorchObjective (forces the generic per-example loop), same matrix."""

    def __init__(self, loss_fn: nn.Module) -> None:
        self.inner = TorchObjective(loss_fn)
        self.kind, self.normalization = self.inner.kind, self.inner.normalization
        self.sample_unit = "sequence"

    def count(self, batch):
        return self.inner.count(batch)

    def normalizer(self, total):
        return self.inner.normalizer(total)

    def split(self, batch, size):
        return self.inner.split(batch, size)

    def rows(self, model, params, batch):
        return self.inner.rows(model, params, batch)


@pytest.mark.parametrize("objective", ["torch", "generic"])
@pytest.mark.parametrize("kind", list(OPERATORS))
def test_sequence_outputs_with_ignored_targets(kind, objective):
    torch.manual_seed(0)
    model = SequenceModel().to(DT)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 7, (5, 6), generator=g)
    targets = torch.randint(0, 7, (5, 6), generator=g)
    targets[1, 4:] = -100
    targets[3, 0] = -100
    ce = nn.CrossEntropyLoss()
    loss = ce if objective == "torch" else WrappedObjective(ce)
    cls, kw = OPERATORS[kind]
    data = [(ids[:3], targets[:3]), (ids[3:], targets[3:])]
    fresh = cls(model, loss, data, cache="none", **kw)
    cached = cls(model, loss, data, micro_batch_size=2, **kw)
    V = torch.randn(fresh.shape[0], 2, generator=g, dtype=DT)
    expect = fresh @ V
    torch.testing.assert_close(cached @ V, expect, **TOL)
    torch.testing.assert_close(cached @ V, expect, **TOL)
    assert cached.cache_active


@pytest.mark.parametrize("kind", ["hessian", "ggn", "empirical_fisher"])
def test_bfloat16_cached_equals_fresh(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(torch.bfloat16)
    X = torch.randn(6, 4, dtype=torch.bfloat16)
    y = torch.randint(0, 3, (6,))
    cls, kw = OPERATORS[kind]
    fresh = cls(model, nn.CrossEntropyLoss(), (X, y), cache="none", **kw)
    cached = cls(model, nn.CrossEntropyLoss(), (X, y), micro_batch_size=4, **kw)
    V = torch.randn(fresh.shape[0], 2, dtype=torch.bfloat16)
    out = cached @ V
    out2 = cached @ V
    assert out.dtype == torch.bfloat16 and cached.cache_active
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    torch.testing.assert_close(out.float(), (fresh @ V).float(), rtol=3e-2, atol=3e-2)


@pytest.mark.hf
def test_hf_language_model_cached_equals_fresh():
    """Cached graphs are built under the objective's attention context (SDPA math)."""
    transformers = pytest.importorskip("transformers")
    from curvops.linops.hf import hf_objective

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=32, attn_pdrop=0.0,
        resid_pdrop=0.0, embd_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(config).to(DT).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    objective = hf_objective(model)
    params = ["transformer.h.1.*", "transformer.ln_f.*"]
    for cls, kw in OPERATORS.values():
        fresh = cls(model, objective, batch, params, cache="none", **kw)
        cached = cls(model, objective, batch, params, micro_batch_size=2, **kw)
        V = torch.randn(fresh.shape[0], 2, generator=g, dtype=DT)
        expect = fresh @ V
        torch.testing.assert_close(cached @ V, expect, **TOL)
        torch.testing.assert_close(cached @ V, expect, **TOL)
        assert cached.cache_active, cached.cache_info


def test_shuffling_loader_is_accepted_and_cached(problem):
    """Order-only changes between passes are fine (DECISIONS.md, Data); the cache holds all."""
    model, X, y, refs = problem
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, y),
        batch_size=4,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    op = GGNOperator(model, nn.CrossEntropyLoss(), loader)
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(3), dtype=DT)
    torch.testing.assert_close(op @ v, refs["ggn"] @ v, **TOL)
    torch.testing.assert_close(op @ v, refs["ggn"] @ v, **TOL)
    assert op.cache_active and op.cache_info["micro_batches"] == 3


# --- parameters_fixed: one fingerprint per solver run ------------------------------------------
def _counting_fingerprint(monkeypatch) -> list[int]:
    import curvops.linops.curvature as curvature

    calls = [0]

    def counted(model):
        calls[0] += 1
        return parameter_fingerprint(model)

    monkeypatch.setattr(curvature, "parameter_fingerprint", counted)
    return calls


@pytest.mark.parametrize("kind", list(OPERATORS))
def test_parameters_fixed_checks_once_and_gives_the_same_products(kind, monkeypatch):
    model = ln_mlp(seed=3)
    X, y = ce_data(seed=5)
    cls, kw = OPERATORS[kind]
    op = cls(model, nn.CrossEntropyLoss(), [(X[:6], y[:6]), (X[6:], y[6:])], **kw)
    V = torch.randn(op.shape[0], 3, generator=torch.Generator().manual_seed(1), dtype=DT)
    outside = [op @ V[:, i] for i in range(3)]
    calls = _counting_fingerprint(monkeypatch)
    with op.parameters_fixed():
        inside = [op @ V[:, i] for i in range(3)]
        with op.parameters_fixed():  # nested: free
            inside.append(op @ V[:, 0])
    assert calls[0] == 2  # entry and exit, none per product
    for a, b in zip(inside, [*outside, outside[0]], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    op @ V[:, 0]
    assert calls[0] == 3  # outside the block every product checks again


def test_parameters_fixed_rebuilds_a_stale_cache_on_entry_and_refuses_a_change_inside():
    model = ln_mlp(seed=3)
    X, y = ce_data(seed=5)
    op = GGNOperator(model, nn.CrossEntropyLoss(), (X, y))
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(2), dtype=DT)
    op @ v
    with torch.no_grad():
        model[0].weight.data.mul_(1.5)  # before the block: the cache is stale
    with op.parameters_fixed():
        inside = op @ v
    torch.testing.assert_close(inside, GGNOperator(model, nn.CrossEntropyLoss(), (X, y)) @ v,
                               **TOL)
    assert op.cache_info["builds"] == 2
    with pytest.raises(RuntimeError, match="changed inside parameters_fixed"):
        with op.parameters_fixed():
            op @ v
            model[0].weight.data.mul_(2.0)
    # the block is left even when it raised: products check (and rebuild) again
    torch.testing.assert_close(op @ v, GGNOperator(model, nn.CrossEntropyLoss(), (X, y)) @ v,
                               **TOL)
    # an error inside the block is the one that propagates
    with pytest.raises(KeyError):
        with op.parameters_fixed():
            raise KeyError("mine")


def test_solvers_and_composite_operators_hold_the_parameters(monkeypatch):
    from curvops.solvers import cg, minres

    model = ln_mlp(seed=3)
    X, y = ce_data(seed=5)
    loss = nn.CrossEntropyLoss()
    op = GGNOperator(model, loss, (X, y))
    H = HessianOperator(model, loss, (X, y))
    b = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(3), dtype=DT)
    calls = _counting_fingerprint(monkeypatch)
    res = cg(op, b, damping=0.1, tol=1e-10)
    assert res.matvecs > 3 and calls[0] == 2
    calls[0] = 0
    res = minres(H.damped(0.5) + 0.5 * op, b, tol=1e-10, maxiter=30)
    assert res.matvecs > 3 and calls[0] == 4  # two curvature operators: entry and exit each
    from curvops.solvers import (
        LanczosConfig,
        exact_diagonal,
        hutchinson_diagonal,
        hutchinson_trace,
        hutchpp_trace,
        lanczos,
        slq_quadrature,
    )

    runs = {
        "lanczos": lambda: lanczos(op, 3, config=LanczosConfig(reorth="partial", tol=1e-8)),
        "lanczos-none": lambda: lanczos(op, 3, config=LanczosConfig(reorth="none", tol=1e-8)),
        "slq": lambda: slq_quadrature(op, num_probes=2, lanczos_steps=6),
        "hutchinson": lambda: hutchinson_trace(op, num_probes=4, block_size=1),
        "hutch++": lambda: hutchpp_trace(op, matvecs=6),
        "diagonal": lambda: hutchinson_diagonal(op, num_probes=4, block_size=1),
        "exact-diagonal": lambda: exact_diagonal(op, chunk_size=op.shape[0] // 3),
    }
    for name, run in runs.items():
        calls[0] = 0
        run()
        assert calls[0] == 2, name  # entry and exit of the run, none per product
    with (op + H).parameters_fixed(), pytest.raises(RuntimeError):
        # a failure inside the composite's block leaves every operator's block
        raise RuntimeError("inside")
    assert op._held_fingerprint is None and H._held_fingerprint is None
