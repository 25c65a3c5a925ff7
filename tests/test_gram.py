"""GramOperator and per-example gradients against independent references (float64).

The references never touch curvops' per-example code: each example's loss is written out
by hand on a flat parameter vector (torch.func) or with a per-sequence autograd loop, and
the dense empirical Fisher (1/N) Σ g gᵀ is diagonalised in full (P x P).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from curvops.linops import EmpiricalFisherOperator
from curvops.linops.gram import GramOperator
from curvops.linops.per_example import per_example_gradient_chunks, per_example_gradients
from torch import nn
from torch.func import functional_call

TOL = 1e-10


# --- models and independent references ---------------------------------------------------------
def mlp_classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()


def classification_data(n: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=g)
    return X, y


def flat_reference_gradients(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row i = ∇θ of example i's cross-entropy, by torch.func.grad on a flat θ (a loop)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def loss(t: torch.Tensor, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        parts = torch.split(t, [s.numel() for s in shapes])
        params = {n: p.reshape(s) for n, p, s in zip(names, parts, shapes)}
        out = functional_call(model, params, (x[None],))
        return F.cross_entropy(out, target[None], reduction="sum")

    return torch.stack([torch.func.grad(loss)(theta, X[i], y[i]) for i in range(len(y))])


def dense_fisher_eigenvalues(G: torch.Tensor, center: bool = False) -> np.ndarray:
    """Descending eigenvalues of the P x P matrix (1/N) Σ gᵢgᵢᵀ (or the covariance)."""
    if center:
        G = G - G.mean(0, keepdim=True)
    Fm = G.T @ G / G.shape[0]
    return torch.linalg.eigvalsh((Fm + Fm.T) / 2).numpy()[::-1]


def gram_eigenvalues(op: GramOperator) -> np.ndarray:
    return torch.linalg.eigvalsh(op.to_dense()).numpy()[::-1]


# --- MLP classifier ----------------------------------------------------------------------------
def test_gram_eigenvalues_equal_nonzero_eigenvalues_of_dense_fisher_mlp() -> None:
    model = mlp_classifier()
    X, y = classification_data()
    G_ref = flat_reference_gradients(model, X, y)
    op = GramOperator(model, nn.CrossEntropyLoss(), (X, y))
    assert op.shape == (12, 12) and op.num_params == G_ref.shape[1]
    torch.testing.assert_close(op.gradients, G_ref, rtol=0, atol=TOL)
    lam = gram_eigenvalues(op)
    ref = dense_fisher_eigenvalues(G_ref)
    N = len(y)
    np.testing.assert_allclose(lam, ref[:N], rtol=0, atol=TOL)
    # The remaining P - N eigenvalues of the dense Fisher are zero.
    assert np.abs(ref[N:]).max() < TOL
    assert op.trace() == pytest.approx(ref.sum(), abs=TOL)


def test_centered_gram_equals_covariance_spectrum() -> None:
    model = mlp_classifier()
    X, y = classification_data()
    G_ref = flat_reference_gradients(model, X, y)
    op = GramOperator(model, nn.CrossEntropyLoss(), (X, y), center=True)
    lam = gram_eigenvalues(op)
    ref = dense_fisher_eigenvalues(G_ref, center=True)
    np.testing.assert_allclose(lam, ref[: len(y)], rtol=0, atol=TOL)
    # Centred rows sum to zero: the Gram has the constant vector in its kernel.
    ones = torch.ones(len(y), dtype=torch.float64)
    assert float((op @ ones).abs().max()) < TOL
    # Centred = the explicit matrix C K C with C = I - 11ᵀ/N.
    C = torch.eye(len(y), dtype=torch.float64) - 1.0 / len(y)
    K = G_ref @ G_ref.T / len(y)
    torch.testing.assert_close(op.to_dense(), C @ K @ C, rtol=0, atol=TOL)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_relation_to_empirical_fisher_operator(reduction: str) -> None:
    """F̂ = (1/N) Σ gᵢgᵢᵀ = EF / (c N): the nonzero spectra agree after that scaling."""
    from curvops.solvers.lanczos import LanczosConfig, lanczos

    model = mlp_classifier()
    X, y = classification_data()
    data = [(X[:5], y[:5]), (X[5:], y[5:])]
    loss = nn.CrossEntropyLoss(reduction=reduction)
    op = GramOperator(model, loss, data)
    ef = EmpiricalFisherOperator(model, loss, data)
    N = len(y)
    c = 1.0 if reduction == "sum" else 1.0 / N
    assert op.ef_scale == pytest.approx(1.0 / (c * N), rel=1e-15)
    lam = gram_eigenvalues(op)
    ef_dense = torch.linalg.eigvalsh(ef.to_dense()).numpy()[::-1]
    np.testing.assert_allclose(lam, op.ef_scale * ef_dense[:N], rtol=0, atol=TOL)
    res = lanczos(ef, k=4, config=LanczosConfig(k=4, tol=1e-12, seed=0))
    assert res.all_converged
    np.testing.assert_allclose(lam[:4], op.ef_scale * np.asarray(res.eigenvalues), rtol=1e-9)


@pytest.mark.parametrize("loss_name", ["ce_ignore", "mse", "bce"])
def test_vmap_loop_jacobian_and_chunking_agree(loss_name: str) -> None:
    model = mlp_classifier()
    X, y = classification_data(n=9)
    if loss_name == "ce_ignore":
        y = y.clone()
        y[3] = -100  # an example without loss terms has a zero gradient
        batch, loss = (X, y), nn.CrossEntropyLoss()
    elif loss_name == "mse":
        batch, loss = (X, torch.randn(9, 4, dtype=torch.float64)), nn.MSELoss()
    else:
        batch, loss = (X, (torch.randn(9, 4) > 0).double()), nn.BCEWithLogitsLoss()
    ref = per_example_gradients(model, loss, batch, method="loop")
    if loss_name == "ce_ignore":
        assert float(ref[3].abs().max()) == 0.0
        torch.testing.assert_close(
            ref,
            flat_reference_gradients(model, X, y.clamp_min(0)) * ((y != -100).double()[:, None]),
            rtol=0,
            atol=TOL,
        )
    for method in ("vmap", "jacobian", "auto"):
        for chunk in (None, 1, 4):
            G = per_example_gradients(model, loss, batch, method=method, chunk_size=chunk)
            torch.testing.assert_close(G, ref, rtol=0, atol=1e-13)
    chunks = list(per_example_gradient_chunks(model, loss, batch, chunk_size=4))
    assert [c.start for c in chunks] == [0, 4, 8] and {c.method for c in chunks} == {"vmap"}


def test_columns_and_parameter_selection() -> None:
    model = mlp_classifier()
    X, y = classification_data(n=5)
    full = per_example_gradients(model, nn.CrossEntropyLoss(), (X, y))
    cols = torch.tensor([0, 7, 50, full.shape[1] - 1])
    sub = per_example_gradients(model, nn.CrossEntropyLoss(), (X, y), columns=cols)
    torch.testing.assert_close(sub, full[:, cols], rtol=0, atol=0)
    last = per_example_gradients(model, nn.CrossEntropyLoss(), (X, y), params=["2.*"])
    torch.testing.assert_close(last, full[:, -(8 * 4 + 4) :], rtol=0, atol=0)
    with pytest.raises(ValueError, match="columns"):
        per_example_gradients(model, nn.CrossEntropyLoss(), (X, y), columns=torch.tensor([999]))
    with pytest.raises(ValueError, match="method"):
        per_example_gradients(model, nn.CrossEntropyLoss(), (X, y), method="magic")
    with pytest.raises(ValueError, match="chunk_size"):
        per_example_gradients(model, nn.CrossEntropyLoss(), (X, y), chunk_size=0)


def test_gram_operator_contract_and_errors() -> None:
    model = mlp_classifier()
    X, y = classification_data()
    op = GramOperator(model, nn.CrossEntropyLoss(), (X, y), chunk_size=5, center=True)
    V = torch.randn(12, 3, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(V), op.gram_matrix() @ V, rtol=0, atol=TOL)
    torch.testing.assert_close(op @ V[:, 0], op.gram_matrix() @ V[:, 0], rtol=0, atol=TOL)
    assert op.is_psd and op.sample_unit == "example" and op.method == "vmap"
    with pytest.raises(TypeError, match="dtype"):
        op @ V[:, 0].float()
    with pytest.raises(ValueError, match="empty"):
        GramOperator(model, nn.CrossEntropyLoss(), (X[:0], y[:0]))
    with pytest.raises(ValueError, match="shape"):
        GramOperator.from_gradients(torch.zeros(0, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        GramOperator.from_gradients(torch.tensor([[float("nan")]]))
    dropout = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 4)).double().train()
    with pytest.raises(ValueError, match="differ between two identical passes"):
        GramOperator(dropout, nn.CrossEntropyLoss(), (X, y))


# --- tiny GPT-2 with padding -------------------------------------------------------------------
def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=2,
        n_embd=16,
        n_head=2,
        vocab_size=64,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).double().eval()


def padded_lm_batch(n: int = 6, T: int = 10, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, T), generator=g)
    mask = torch.ones_like(ids)
    lengths = torch.tensor([10, 7, 10, 4, 9, 6])[:n]
    for i, length in enumerate(lengths.tolist()):
        mask[i, length:] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask}


# A few hundred parameters from both layers and the final norm: a dense P x P Fisher stays cheap.
GPT2_PARAMS = [
    "transformer.h.1.attn.c_proj.*",
    "transformer.ln_f.*",
    "transformer.h.0.attn.c_attn.bias",
]


def lm_reference_gradients(model: nn.Module, batch: dict, names: list[str]) -> torch.Tensor:
    """Per sequence: token-summed next-token cross-entropy over real tokens, autograd by hand."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = dict(model.named_parameters())
    rows = []
    with sdpa_kernel(SDPBackend.MATH):
        for i in range(batch["input_ids"].shape[0]):
            ids, mask = batch["input_ids"][i], batch["attention_mask"][i]
            logits = model(input_ids=ids[None], attention_mask=mask[None]).logits[0]
            valid = (mask[:-1] == 1) & (mask[1:] == 1)
            loss = F.cross_entropy(logits[:-1][valid], ids[1:][valid], reduction="sum")
            grads = torch.autograd.grad(loss, [params[n] for n in names])
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@pytest.mark.hf
def test_gram_eigenvalues_tiny_gpt2_with_padding() -> None:
    from curvops.linops.hf import hf_objective

    model = tiny_gpt2()
    batch = padded_lm_batch()
    obj = hf_objective(model)
    op = GramOperator(model, obj, batch, params=GPT2_PARAMS, chunk_size=4)
    assert op.sample_unit == "sequence" and op.method == "loop"  # the mask code defeats vmap
    G_ref = lm_reference_gradients(model, batch, list(op.space.names))
    torch.testing.assert_close(op.gradients, G_ref, rtol=0, atol=TOL)
    lam = gram_eigenvalues(op)
    ref = dense_fisher_eigenvalues(G_ref)
    np.testing.assert_allclose(lam, ref[:6], rtol=0, atol=TOL)
    # Relation to the EF operator under the default token normalisation: c = 1/tokens.
    ef = EmpiricalFisherOperator(model, obj, batch, params=GPT2_PARAMS)
    tokens = int(
        ((batch["attention_mask"][:, :-1] == 1) & (batch["attention_mask"][:, 1:] == 1)).sum()
    )
    assert op.ef_scale == pytest.approx(tokens / 6, rel=1e-14)
    V = torch.randn(op.num_params, 2, dtype=torch.float64)
    torch.testing.assert_close(
        op.ef_scale * ef.matmat(V), G_ref.T @ (G_ref @ V) / 6, rtol=1e-10, atol=TOL
    )


@pytest.mark.hf
def test_gpt2_methods_agree_and_vmap_without_mask() -> None:
    from curvops.linops.hf import hf_objective

    model = tiny_gpt2()
    batch = padded_lm_batch()
    obj = hf_objective(model)
    loop = per_example_gradients(model, obj, batch, GPT2_PARAMS, method="loop")
    jac = per_example_gradients(model, obj, batch, GPT2_PARAMS, method="jacobian", chunk_size=4)
    torch.testing.assert_close(jac, loop, rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match="vmap"):
        per_example_gradients(model, obj, batch, GPT2_PARAMS, method="vmap")
    unmasked = {"input_ids": batch["input_ids"]}
    chunks = list(per_example_gradient_chunks(model, obj, unmasked, GPT2_PARAMS, chunk_size=4))
    assert {c.method for c in chunks} == {"vmap"}
    vm = torch.cat([c.gradients for c in chunks])
    ref = per_example_gradients(model, obj, unmasked, GPT2_PARAMS, method="loop")
    torch.testing.assert_close(vm, ref, rtol=0, atol=1e-12)
