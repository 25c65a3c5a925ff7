"""Lean products at language-model scale: the layer-norm double backward and the chunked
cross-entropy output-Hessian product, against brute-force references in float64."""

from __future__ import annotations

import itertools

import pytest
import torch
from curvops.linops import EmpiricalFisherOperator, FisherOperator, GGNOperator
from curvops.linops import losses as losses_module
from curvops.linops.autodiff import batched_vjp, lean_layer_norm
from curvops.linops.losses import LossKind
from torch import Tensor, nn

DT = torch.float64


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- layer norm ------------------------------------------------------------------------------
def _ln_problem(shape: tuple[int, ...], affine: bool, seed: int = 1):
    torch.manual_seed(seed)
    lin = nn.Linear(6, 6).to(DT)
    ln = nn.LayerNorm(shape, elementwise_affine=affine).to(DT)
    if affine:
        with torch.no_grad():
            ln.weight.add_(torch.randn_like(ln.weight))
            ln.bias.add_(torch.randn_like(ln.bias))
    x0 = torch.randn(3, 5, 6, dtype=DT)
    return lin, ln, x0, list(lin.parameters()) + list(ln.parameters())


def _second_order(lean: bool, shape, affine, which: str, m: int) -> list[Tensor]:
    lin, ln, x0, params = _ln_problem(shape, affine)
    gen = torch.Generator().manual_seed(5)
    V = [torch.randn(m, *p.shape, dtype=DT, generator=gen) for p in params]
    with torch.enable_grad():
        if lean:
            with lean_layer_norm():
                h = ln(lin(x0) * 3 + 1)
        else:
            h = ln(lin(x0) * 3 + 1)
        if which == "jv":  # the double-vjp Jv: only the cotangent branch
            u = torch.zeros_like(h, requires_grad=True)
            JTu = torch.autograd.grad(h, params, u, create_graph=True)
            return batched_vjp(JTu, [u], V)
        # every branch: a Hessian-vector product through the layer norm
        weights = torch.arange(h.numel(), dtype=DT).reshape(h.shape)
        g = torch.autograd.grad((torch.sin(h) * weights).sum(), params, create_graph=True)
        return batched_vjp(g, params, V)


@pytest.mark.parametrize(
    "shape,affine,which,m",
    list(itertools.product([(6,), (5, 6)], [True, False], ["jv", "hvp"], [1, 3])),
)
def test_lean_layer_norm_second_order_equals_torchs(shape, affine, which, m):
    got = _second_order(True, shape, affine, which, m)
    want = _second_order(False, shape, affine, which, m)
    for a, b in zip(got, want, strict=True):
        assert rel(a, b) < 1e-13


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_lean_layer_norm_forward_and_gradient_are_torchs_bitwise(dtype):
    torch.manual_seed(0)
    ln = nn.LayerNorm(8).to(dtype)
    x = torch.randn(4, 8, dtype=dtype, requires_grad=True)
    gy = torch.randn(4, 8, dtype=dtype)
    y_ref = ln(x)
    g_ref = torch.autograd.grad(y_ref, [x, *ln.parameters()], gy)
    with lean_layer_norm():
        y = ln(x)
    g = torch.autograd.grad(y, [x, *ln.parameters()], gy)
    assert torch.equal(y, y_ref)
    for a, b in zip(g, g_ref, strict=True):
        assert torch.equal(a, b)


# --- chunked output-Hessian products -----------------------------------------------------------
def _dense_output_hessian(kind: str, F_: Tensor) -> Tensor:
    """Per-row output Hessians ``(R, C, C)`` by autograd (brute force)."""
    rows = []
    for f in F_:
        if kind == "cross_entropy":
            def ell(z: Tensor) -> Tensor:
                return torch.nn.functional.cross_entropy(z[None], torch.tensor([0]))
        elif kind == "mse":
            def ell(z: Tensor) -> Tensor:
                return ((z - 0.3) ** 2).sum()
        else:
            def ell(z: Tensor) -> Tensor:
                return torch.nn.functional.binary_cross_entropy_with_logits(
                    z, torch.full_like(z, 0.5), reduction="sum"
                )
        rows.append(torch.autograd.functional.hessian(ell, f))
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["cross_entropy", "mse", "bce"])
@pytest.mark.parametrize("chunk", [5, 10, 1 << 21])  # one row, two rows, everything per chunk
@pytest.mark.parametrize("overwrite", [False, True])
def test_chunked_hessian_matmul_equals_dense(monkeypatch, kind, chunk, overwrite):
    monkeypatch.setattr(losses_module, "CE_CHUNK_ELEMENTS", chunk)
    gen = torch.Generator().manual_seed(3)
    F_ = torch.randn(7, 5, dtype=DT, generator=gen) * 3
    U = torch.randn(4, 7, 5, dtype=DT, generator=gen)
    U_in = U.clone()
    H = _dense_output_hessian(kind, F_)
    expected = 0.3 * torch.einsum("rij,mrj->mri", H, U)
    got = LossKind(kind).hessian_matmul(F_, U, scale=0.3, overwrite=overwrite)
    assert rel(got, expected) < 1e-13
    if not overwrite:
        assert torch.equal(U, U_in)


# --- operators on a small language model ---------------------------------------------------------
class TinyLM(nn.Module):
    """Embedding → LayerNorm → tanh MLP → LayerNorm → untied head; logits ``(N, V, T)``."""

    def __init__(self, vocab: int = 11, width: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.ln1 = nn.LayerNorm(width)
        self.mlp = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.ln1(self.emb(ids))
        x = x + torch.tanh(self.mlp(x))
        return self.head(self.ln2(x)).transpose(1, 2)


def _lm_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = TinyLM().to(DT)
    with torch.no_grad():
        for ln in (model.ln1, model.ln2):
            ln.weight.add_(torch.randn_like(ln.weight) * 0.5)
            ln.bias.add_(torch.randn_like(ln.bias) * 0.5)
    gen = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, 11, (3, 6), generator=gen)
    return model, (tokens[:, :-1], tokens[:, 1:])


def _brute_force_ggn(model: nn.Module, batch) -> Tensor:
    """``(1/T) Σ_r J_rᵀ (diag p_r − p_r p_rᵀ) J_r`` from the full Jacobian of the logits."""
    x, y = batch
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def logits(t: Tensor) -> Tensor:
        parts = torch.split(t, [s.numel() for s in shapes])
        params = {n: q.view(s) for n, q, s in zip(names, parts, shapes, strict=True)}
        out = torch.func.functional_call(model, params, (x,))
        return out.movedim(1, -1).reshape(-1, out.shape[1])

    J = torch.func.jacrev(logits)(theta)  # (R, C, P)
    p = torch.softmax(logits(theta).detach(), -1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("rip,rij,rjq->pq", J, H, J) / y.numel()


@pytest.mark.parametrize("cache", ["auto", "none"])
@pytest.mark.parametrize("chunk", [11, 30, 1 << 21])
def test_lm_ggn_chunked_head_equals_unchunked_and_brute_force(monkeypatch, cache, chunk):
    model, batch = _lm_problem()
    G = _brute_force_ggn(model, batch)
    gen = torch.Generator().manual_seed(9)
    V = torch.randn(G.shape[0], 3, dtype=DT, generator=gen)
    monkeypatch.setattr(losses_module, "CE_CHUNK_ELEMENTS", chunk)
    for Op in (GGNOperator, FisherOperator):
        op = Op(model, nn.CrossEntropyLoss(), batch, cache=cache)
        for _ in range(2):  # the first product builds the cache, the second uses it
            assert rel(op @ V[:, 0], G @ V[:, 0]) < 1e-12
            assert rel(op @ V, G @ V) < 1e-12
        if cache == "auto":
            assert op.cache_active


def test_lm_empirical_fisher_graph_path_with_lean_layer_norm():
    model, batch = _lm_problem(seed=2)
    x, y = batch
    names = [n for n, _ in model.named_parameters()]
    rows = []
    for i in range(x.shape[0]):
        model.zero_grad()
        out = model(x[i : i + 1])
        nn.functional.cross_entropy(out, y[i : i + 1], reduction="sum").backward()
        rows.append(torch.cat([model.get_parameter(n).grad.reshape(-1) for n in names]))
    G = torch.stack(rows)
    EF = G.T @ G / y.numel()
    v = torch.randn(EF.shape[0], dtype=DT, generator=torch.Generator().manual_seed(4))
    op = EmpiricalFisherOperator(model, nn.CrossEntropyLoss(), batch, cache="none")
    assert rel(op @ v, EF @ v) < 1e-12


class ParameterOutput(nn.Module):
    """Outputs a parameter itself: autograd may hand back the caller's vector as ``Jv``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4, dtype=DT))

    def forward(self, x: Tensor) -> Tensor:
        return self.w


@pytest.mark.parametrize("cache", ["auto", "none"])
def test_products_never_overwrite_the_callers_vector(cache):
    model = ParameterOutput()
    batch = (torch.zeros(3, 1, dtype=DT), torch.randn(3, 4, dtype=DT))
    op = GGNOperator(model, nn.MSELoss(reduction="sum"), batch, cache=cache)
    for _ in range(2):
        v = torch.randn(12, dtype=DT)
        kept = v.clone()
        out = op @ v
        assert torch.equal(v, kept)
        assert rel(out, 2.0 * kept) < 1e-14
        V = torch.randn(12, 2, dtype=DT)
        keptV = V.clone()
        op @ V
        assert torch.equal(V, keptV)


def test_bf16_lm_ggn_close_to_fp32():
    model, batch = _lm_problem(seed=3)
    m32, m16 = TinyLM().float(), TinyLM().to(torch.bfloat16)
    m32.load_state_dict(model.state_dict())
    m16.load_state_dict(model.state_dict())
    v = torch.randn(sum(p.numel() for p in model.parameters()),
                    generator=torch.Generator().manual_seed(1))
    a = GGNOperator(m32, nn.CrossEntropyLoss(), batch) @ v
    for cache in ("auto", "none"):
        b = GGNOperator(m16, nn.CrossEntropyLoss(), batch, cache=cache) @ v.bfloat16()
        assert rel(b.float(), a) < 5e-2
