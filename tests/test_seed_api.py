"""The seed's spectrum API against independent references.

Dense references are built in this file on a flat parameter vector: the GGN from the
logits' Jacobian (``torch.func.jacrev``) and the closed-form softmax Hessian, the Hessian
by autograd double backward of the token-normalised loss; scipy ``eigsh`` solves them.
"""

from __future__ import annotations

import dataclasses
import math
import types

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from curvops.adapters.seed_api import (
    compute_fisher_eigenvalues_lanczos,
    compute_hessian_eigenvalues_lanczos,
    compute_spectrum,
    compute_spectrum_comparison,
)
from curvops.solvers.lanczos import LanczosConfig
from torch import nn
from torch.func import functional_call, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

SEED_KEYS = (
    "top_eigenvalues",
    "max_eigenvalue",
    "min_computed_eigenvalue",
    "condition_number",
    "effective_rank",
    "spectral_gap",
    "spectral_range",
    "lanczos_iterations",
    "k_requested",
    "k_computed",
    "batch_size_used",
    "operator_used",
    "is_psd",
    "note",
)
META_KEYS = ("sample_unit", "normalization", "dtype", "seed", "reorth", "matvecs", "time")
V = 12


def _transformers():
    tr = pytest.importorskip("transformers")
    tr.utils.logging.set_verbosity_error()
    return tr


def gpt2(dtype=torch.float64):
    tr = _transformers()
    cfg = tr.GPT2Config(
        n_layer=1,
        n_embd=4,
        n_head=2,
        vocab_size=V,
        n_positions=8,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    return tr.GPT2LMHeadModel(cfg).to(dtype).eval()


def llama():
    tr = _transformers()
    cfg = tr.LlamaConfig(
        hidden_size=4,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=V,
        max_position_embeddings=8,
    )
    torch.manual_seed(0)
    model = tr.LlamaForCausalLM(cfg).double().eval()

    def rms(self, x):  # LlamaRMSNorm upcasts to float32; keep the fixture truly float64
        return self.weight * (
            x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        )

    for module in model.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            module.forward = types.MethodType(rms, module)
    return model


def bert_cls():
    tr = _transformers()
    cfg = tr.BertConfig(
        hidden_size=4,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=V,
        max_position_embeddings=8,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return tr.BertForSequenceClassification(cfg).double().eval()


def lm_batch(n=3, t=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[2, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def cls_batch():
    b = lm_batch(n=5, seed=2)
    b["labels"] = torch.tensor([0, 2, 1, 1, 0])
    return b


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _call(model, theta, batch):
    params, i = {}, 0
    for name, p in model.named_parameters():
        params[name] = theta[i : i + p.numel()].reshape(p.shape)
        i += p.numel()
    kwargs = {k: v for k, v in batch.items() if k != "labels"}
    return functional_call(model, params, args=(), kwargs=kwargs)["logits"]


def _logits_and_targets(model, batch):
    """Logits function of the flat parameters, kept positions' targets and their count."""
    if "labels" in batch:  # sequence classification: one target per sequence
        return (lambda th: _call(model, th, batch)), batch["labels"], None
    mask = batch["attention_mask"]
    tgt = batch["input_ids"][:, 1:].clone()
    tgt[(mask[:, 1:] == 0) | (mask[:, :-1] == 0)] = -100
    return (lambda th: _call(model, th, batch)[:, :-1]), tgt, tgt != -100


def reference_ggn(model, batch):
    logits, tgt, keep = _logits_and_targets(model, batch)
    theta = _flat(model)
    with sdpa_kernel(SDPBackend.MATH):
        J = jacrev(logits)(theta)
        z = logits(theta).detach()
    if keep is not None:
        J, z = J[keep], z[keep]
    p = torch.softmax(z, -1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("rvn,rvw,rwm->nm", J, H, J).numpy() / z.shape[0]


def reference_hessian(model, batch):
    logits, tgt, _ = _logits_and_targets(model, batch)
    theta = _flat(model).requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):
        z = logits(theta)
        loss = nn.functional.cross_entropy(
            z.reshape(-1, z.shape[-1]), tgt.reshape(-1), ignore_index=-100
        )
        (g,) = torch.autograd.grad(loss, theta, create_graph=True)
        eye = torch.eye(theta.numel(), dtype=theta.dtype)
        (H,) = torch.autograd.grad(g, theta, eye, is_grads_batched=True)
    return H.detach().numpy()


def eigsh(M, k=5, which="LA"):
    vals = sla.eigsh(M, k=k, which=which, tol=1e-14, return_eigenvectors=False)
    return np.sort(vals)[::-1] if which == "LA" else np.sort(vals)


def relerr(a, b):
    return float(np.max(np.abs(np.asarray(a) - b) / np.abs(b)))


# tol far below what semi-orthogonal Ritz vectors deliver as true residuals (~1e-11 here):
# only full reorthogonalization verifies at 1e-13.
ACCURATE = {"max_iter": 150, "tol": 1e-13, "reorth": "full"}


# --- float64: equal to independent references ------------------------------------------
@pytest.mark.hf
@pytest.mark.parametrize(
    "build, batch", [(gpt2, lm_batch), (llama, lm_batch), (bert_cls, cls_batch)]
)
def test_fisher_true_mode_equals_reference_ggn(build, batch):
    model, b = build(), batch()
    expected = eigsh(reference_ggn(model, b))
    r = compute_fisher_eigenvalues_lanczos(model, b, k=5, ggn_mode="true", **ACCURATE)
    assert r["operator_used"] == "ggn" and r["metadata"]["k_converged"] == 5
    assert relerr(r["top_eigenvalues"], expected) <= 1e-8


@pytest.mark.hf
@pytest.mark.parametrize(
    "build, batch", [(gpt2, lm_batch), pytest.param(bert_cls, cls_batch, marks=pytest.mark.slow)]
)
def test_hessian_equals_reference(build, batch):
    model, b = build(), batch()
    H = reference_hessian(model, b)
    assert np.abs(H - H.T).max() < 1e-12
    r = compute_hessian_eigenvalues_lanczos(model, b, k=5, **ACCURATE)
    assert r["operator_used"] == "hessian" and not r["is_psd"]
    assert relerr(r["top_eigenvalues"], eigsh(H)) <= 1e-8
    smallest = eigsh(H, k=1, which="SA")[0]
    assert r["has_negative_eigenvalues"] == (smallest < 0)
    if r["metadata"]["k_converged"] == 5 and r["metadata"][
        "smallest_eigenvalue_residual"
    ] < 1e-8 * abs(smallest):
        assert abs(r["smallest_eigenvalue"] - smallest) <= 1e-6 * abs(smallest)


# --- data handling leaves the spectrum unchanged ------------------------------------------
@pytest.mark.hf
def test_right_padding_equals_unpadded_sequences_each_its_own_batch():
    model, b = gpt2(), lm_batch()
    lengths = b["attention_mask"].sum(1).tolist()
    unpadded = [{"input_ids": b["input_ids"][i : i + 1, :L]} for i, L in enumerate(lengths)]
    padded = compute_fisher_eigenvalues_lanczos(model, b, ggn_mode="true", **ACCURATE)
    separate = compute_fisher_eigenvalues_lanczos(model, unpadded, ggn_mode="true", **ACCURATE)
    assert (
        padded["metadata"]["num_loss_terms"]
        == separate["metadata"]["num_loss_terms"]
        == sum(lengths) - 3
    )
    assert relerr(separate["top_eigenvalues"], np.array(padded["top_eigenvalues"])) <= 1e-10


@pytest.mark.hf
def test_forced_tiny_memory_budget_micro_batches_without_changing_the_spectrum():
    model, b = gpt2(), lm_batch(n=6, seed=3)
    whole = compute_fisher_eigenvalues_lanczos(
        model, b, ggn_mode="true", micro_batch_size=None, **ACCURATE
    )
    plan_probe = compute_fisher_eigenvalues_lanczos(
        model, b, ggn_mode="true", memory_budget_bytes=2**34, **ACCURATE
    )
    per_ex = plan_probe["metadata"]["micro_batch_plan"]["bytes_per_example"]
    fixed = plan_probe["metadata"]["micro_batch_plan"]["fixed_bytes"]
    # The budget covers the solver's estimate first; the product gets the rest.
    solver = plan_probe["metadata"]["memory"]["solver_estimate_bytes"]["full"]
    split = compute_fisher_eigenvalues_lanczos(
        model, b, ggn_mode="true", memory_budget_bytes=int(solver + fixed + 2.5 * per_ex),
        **ACCURATE,
    )
    assert whole["batch_size_used"] == 6 and split["batch_size_used"] == 2
    assert relerr(split["top_eigenvalues"], np.array(whole["top_eigenvalues"])) <= 1e-10


@pytest.mark.hf
def test_bf16_model_stays_bf16_and_top_eigenvalue_is_close_to_fp64():
    m64 = gpt2()
    mbf = gpt2(torch.float32)
    mbf.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    mbf = mbf.to(torch.bfloat16)
    ptrs = {n: p.data_ptr() for n, p in mbf.named_parameters()}
    b = lm_batch()
    exact = compute_fisher_eigenvalues_lanczos(m64, b, k=3, ggn_mode="true", **ACCURATE)
    low = compute_fisher_eigenvalues_lanczos(mbf, b, k=3, max_iter=40, ggn_mode="true")
    assert all(
        p.dtype == torch.bfloat16 and p.data_ptr() == ptrs[n] for n, p in mbf.named_parameters()
    )
    assert low["metadata"]["dtype"] == "bfloat16" and low["metadata"]["dtype_compute"] == "bfloat16"
    assert low["metadata"]["reorth"] == "full" and low["metadata"]["rayleigh_ritz"]
    # Stated tolerance: products in bf16 (eps 7.8e-3) give the top eigenvalue to ~1e-2.
    assert abs(low["max_eigenvalue"] - exact["max_eigenvalue"]) <= 3e-2 * exact["max_eigenvalue"]


# --- the seed's keys on a known spectrum (plain module + loss_fn) ---------------------------
def _known_linear(spectrum=(8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.1)):
    """Linear model, MSE(sum): Hessian = GGN = 2 XᵀX = diag(spectrum) in the rotated basis."""
    d = len(spectrum)
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(20, d, generator=g, dtype=torch.float64))
    X = U * torch.tensor(spectrum, dtype=torch.float64).div(2).sqrt()
    y = torch.randn(20, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    return model, (X, y), np.array(spectrum)


def test_seed_keys_and_metrics_on_a_known_spectrum():
    model, data, lam = _known_linear()
    r = compute_fisher_eigenvalues_lanczos(
        model, data, k=4, max_iter=20, ggn_mode="true", loss_fn=nn.MSELoss(reduction="sum")
    )
    for key in SEED_KEYS:
        assert key in r, key
    for key in META_KEYS:
        assert key in r["metadata"], key
    top = lam[:4]
    np.testing.assert_allclose(r["top_eigenvalues"], top, rtol=1e-10)
    assert r["max_eigenvalue"] == pytest.approx(8.0, rel=1e-10)
    assert r["min_computed_eigenvalue"] == pytest.approx(1.0, rel=1e-10)
    assert r["condition_number"] == pytest.approx(8.0, rel=1e-10)
    p = top / top.sum()
    assert r["effective_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-10)
    assert r["spectral_gap"] == pytest.approx(4.0, rel=1e-10)
    assert r["spectral_range"] == pytest.approx(7.0, rel=1e-10)
    assert (r["k_requested"], r["k_computed"]) == (4, 4)
    assert r["lanczos_iterations"] <= 7 and r["batch_size_used"] == 20
    assert r["operator_used"] == "ggn" and r["is_psd"] is True
    assert r["metadata"]["sample_unit"] == "example" and r["metadata"]["normalization"] == "sum"
    assert (
        r["metadata"]["reorth"] == "full"
        and r["metadata"]["dtype"] == "float64"
        and r["metadata"]["seed"] == 0
    )
    assert isinstance(r["note"], str) and "computed" in r["note"]


def test_ggn_mode_mapping_and_empirical_fisher_against_per_example_loop():
    model, (X, y), lam = _known_linear()
    loss = nn.MSELoss(reduction="sum")
    ef = compute_fisher_eigenvalues_lanczos(model, (X, y), k=3, max_iter=7, loss_fn=loss)
    assert ef["operator_used"] == "empirical_fisher"  # the seed's default ggn_mode
    G = torch.stack(
        [
            torch.autograd.grad(loss(model(X[i : i + 1]), y[i : i + 1]), model.weight)[0].reshape(
                -1
            )
            for i in range(20)
        ]
    )
    expected = np.sort(np.linalg.eigvalsh((G.T @ G).numpy()))[::-1][:3]
    np.testing.assert_allclose(ef["top_eigenvalues"], expected, rtol=1e-9)
    assert (
        compute_fisher_eigenvalues_lanczos(
            model, (X, y), k=2, use_ggn=False, ggn_mode="true", loss_fn=loss
        )["operator_used"]
        == "empirical_fisher"
    )
    auto = compute_fisher_eigenvalues_lanczos(model, (X, y), k=2, ggn_mode="auto", loss_fn=loss)
    mc = compute_fisher_eigenvalues_lanczos(model, (X, y), k=2, ggn_mode="mc", loss_fn=loss, seed=3)
    assert auto["operator_used"] == "ggn" and mc["operator_used"] == "fisher_mc"
    assert mc["metadata"]["mc_seed"] == 3
    np.testing.assert_allclose(auto["top_eigenvalues"], lam[:2], rtol=1e-10)


def test_hessian_negative_flag_from_the_smallest_eigenvalue():
    model, data, lam = _known_linear()
    loss = nn.MSELoss(reduction="sum")
    psd = compute_hessian_eigenvalues_lanczos(model, data, k=2, loss_fn=loss)
    assert psd["has_negative_eigenvalues"] is False
    assert psd["smallest_eigenvalue"] == pytest.approx(lam[-1], rel=1e-8)
    # which="SA" reads the smallest end directly.
    sa = compute_hessian_eigenvalues_lanczos(model, data, k=2, loss_fn=loss, which="SA")
    assert sa["top_eigenvalues"][0] == pytest.approx(lam[-1], rel=1e-8)


@pytest.mark.hf
@pytest.mark.slow
def test_spectrum_and_comparison_entry_points():
    model, b = gpt2(), lm_batch()
    H = reference_hessian(model, b)
    r = compute_spectrum(
        model, b, operator_type="hessian", config=LanczosConfig(k=3, max_iters=150, tol=1e-13)
    )
    assert relerr(r["top_eigenvalues"], eigsh(H, k=3)) <= 1e-8
    assert r["has_negative_eigenvalues"] is True and eigsh(H, k=1, which="SA")[0] < 0
    ef = compute_spectrum(
        model,
        b,
        operator_type="empirical_fisher",
        config=LanczosConfig(k=2, max_iters=30, reorth_period=0),
    )
    assert ef["operator_used"] == "empirical_fisher" and ef["metadata"]["reorth"] == "full"
    cmp_ = compute_spectrum_comparison(
        model, b, k=3, max_iter=150, tol=1e-13, return_eigenvectors=True
    )
    c = cmp_["comparison"]
    assert c["hessian_has_negative"] is True
    assert c["fisher_condition"] == cmp_["fisher_ggn"]["condition_number"]
    assert cmp_["fisher_ggn"]["operator_used"] == "ggn"
    assert 0.0 <= c["top_eigenspace_overlap"] <= 1.0 + 1e-12


def test_identical_operators_have_overlap_one():
    model, data, _ = _known_linear()
    c = compute_spectrum_comparison(
        model, data, k=3, loss_fn=nn.MSELoss(reduction="sum"), return_eigenvectors=True
    )["comparison"]
    assert c["top_eigenspace_overlap"] == pytest.approx(1.0, abs=1e-10)
    assert c["max_eigenvalue_ratio"] == pytest.approx(1.0, rel=1e-10)


# --- bad input ---------------------------------------------------------------------------
@pytest.mark.hf
@pytest.mark.parametrize(
    "batch, match",
    [
        ({"attention_mask": torch.ones(2, 5, dtype=torch.long)}, "input_ids"),
        (
            {
                "input_ids": torch.zeros(2, 5, dtype=torch.long),
                "labels": torch.zeros(2, 4, dtype=torch.long),
            },
            "labels",
        ),
        ({"input_ids": torch.zeros(0, 5, dtype=torch.long)}, "empty"),
        ([], "empty"),
    ],
)
def test_bad_batches(batch, match):
    with pytest.raises(ValueError, match=match):
        compute_fisher_eigenvalues_lanczos(gpt2(), batch)


@pytest.mark.hf
def test_bad_arguments():
    model, b = gpt2(), lm_batch()
    n = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="k="):
        compute_fisher_eigenvalues_lanczos(model, b, k=n)
    with pytest.raises(ValueError, match="ggn_mode"):
        compute_fisher_eigenvalues_lanczos(model, b, ggn_mode="exact")
    with pytest.raises(TypeError, match="unexpected keyword"):
        compute_fisher_eigenvalues_lanczos(model, b, batch_size=2)
    tr = _transformers()
    cfg = tr.GPT2Config(n_layer=1, n_embd=4, n_head=2, vocab_size=V, n_positions=8, resid_pdrop=0.1)
    with pytest.raises(ValueError, match="dropout"):
        compute_fisher_eigenvalues_lanczos(tr.GPT2LMHeadModel(cfg).double().train(), b)
    with pytest.raises(TypeError, match="loss_fn"):
        compute_fisher_eigenvalues_lanczos(
            nn.Linear(3, 1), (torch.zeros(4, 3), torch.zeros(4, 1)), k=1
        )


# --- memory budget: the strategy that fits, said; a refusal before any product ---------------
def _budget_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 5)).double()
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(64, 20, generator=gen, dtype=torch.float64),
             torch.randint(0, 5, (64,), generator=gen))]
    return model, data


CE = {"loss_fn": nn.CrossEntropyLoss()}


def test_memory_budget_chooses_a_thick_restart_when_the_full_basis_does_not_fit():
    model, data = _budget_problem()
    roomy = compute_fisher_eigenvalues_lanczos(model, data, k=3, max_iter=200, tol=1e-10,
                                               memory_budget_bytes=2**34, **CE)
    est = roomy["metadata"]["memory"]["solver_estimate_bytes"]
    assert roomy["metadata"]["memory"]["strategy"] == "full"
    assert roomy["metadata"]["memory"]["ncv"] is None and roomy["metadata"]["ncv"] is None
    assert roomy["metadata"]["memory"]["strategy_from"] == "memory budget"
    # The estimate covers what the solver's ledger counted.
    assert roomy["metadata"]["memory"]["solver_peak_bytes"] <= est["full"]
    # A budget between the restarted basis's and full's estimates (plus the cache and a
    # product, or the first product, whichever is larger; a verification product has an
    # output vector of its own): the thick restart with the preferred basis of
    # max(2k + 2, 12) = 12 vectors, said so.
    plan, mem = roomy["metadata"]["micro_batch_plan"], roomy["metadata"]["memory"]
    assert plan["output_bytes"] == 8 * roomy["metadata"]["n_params"]
    first = plan["fixed_bytes"] + plan["bytes_per_example"] * 64 + plan["output_bytes"]
    product = max(first, mem["cache_estimate_bytes"] + mem["cached_product_peak_bytes"])
    budget = int(est["full, ncv=12"] + product + 1024)
    assert budget < est["full"]
    lean = compute_fisher_eigenvalues_lanczos(model, data, k=3, max_iter=200, tol=1e-10,
                                              memory_budget_bytes=budget, **CE)
    mem, meta = lean["metadata"]["memory"], lean["metadata"]
    assert mem["strategy"] == "full" and mem["ncv"] == 12 and meta["ncv"] == 12
    assert meta["restarts"] > 0
    assert "reorth='full' with a thick restart (ncv=12) chosen to fit" in lean["note"]
    assert mem["solver_peak_bytes"] <= est["full, ncv=12"]
    assert all(meta["converged"])
    np.testing.assert_allclose(lean["top_eigenvalues"], roomy["top_eigenvalues"], rtol=1e-8)
    # A smaller budget: the largest basis that fits (down to k + 2 = 5 vectors).
    vec = 8 * roomy["metadata"]["n_params"]
    tight = compute_fisher_eigenvalues_lanczos(
        model, data, k=3, max_iter=200, tol=1e-10, **CE,
        memory_budget_bytes=int(est["full, ncv=12"] - 4 * vec + product + 1024))
    assert tight["metadata"]["ncv"] == 8
    np.testing.assert_allclose(tight["top_eigenvalues"], roomy["top_eigenvalues"], rtol=1e-8)
    # A user's ncv is kept as given.
    given = compute_fisher_eigenvalues_lanczos(model, data, k=3, max_iter=200, tol=1e-10,
                                               ncv=6, memory_budget_bytes=2**34, **CE)
    assert given["metadata"]["ncv"] == 6
    assert given["metadata"]["memory"]["strategy_from"] == "argument"
    np.testing.assert_allclose(given["top_eigenvalues"], roomy["top_eigenvalues"], rtol=1e-8)


def test_memory_budget_chooses_none_for_a_low_precision_basis():
    # A bf16 basis cannot be restarted (every kept Ritz vector would be rounded to bf16):
    # when full's basis does not fit, the plan falls to none, and says why.
    model, data = _budget_problem()
    model = model.to(torch.bfloat16)
    data = [(X.to(torch.bfloat16), y) for X, y in data]
    roomy = compute_fisher_eigenvalues_lanczos(model, data, k=3, max_iter=200,
                                               memory_budget_bytes=2**34, **CE)
    est = roomy["metadata"]["memory"]["solver_estimate_bytes"]
    assert set(est) == {"full", "none"}
    plan = roomy["metadata"]["micro_batch_plan"]
    product = plan["fixed_bytes"] + plan["bytes_per_example"] * 64
    budget = int(est["none"] + product + 1024)
    assert budget < est["full"]
    lean = compute_fisher_eigenvalues_lanczos(model, data, k=3, max_iter=200,
                                              memory_budget_bytes=budget, **CE)
    mem = lean["metadata"]["memory"]
    assert mem["strategy"] == "none" and lean["metadata"]["reorth"] == "none"
    assert "reorth='none' chosen to fit the memory budget" in lean["note"]
    assert "no thick restart: its basis must be float32/float64" in lean["note"]
    np.testing.assert_allclose(lean["top_eigenvalues"], roomy["top_eigenvalues"], rtol=3e-2)


def test_a_strategy_that_cannot_fit_is_refused_before_any_product():
    model, data = _budget_problem()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(MemoryError, match="no solver strategy fits the memory budget"):
        compute_fisher_eigenvalues_lanczos(model, data, k=3, max_iter=200, reorth="full",
                                           memory_budget_bytes=10_000, **CE)
    with pytest.raises(MemoryError, match="reorth='none' needs"):
        compute_fisher_eigenvalues_lanczos(model, data, k=3, max_iter=200,
                                           memory_budget_bytes=10_000, **CE)
    assert not calls  # refused from the estimate alone: no forward pass ran


def test_a_thick_restart_keeps_the_cache_while_enough_vectors_fit_beside_it():
    from curvops.adapters.seed_api import CACHE_FIRST_EXTRA, _restart_size
    from curvops.linops.memory import MicroBatchPlan

    # The first product peaks at 1000 + 100 m bytes and leaves a cache state of 50 m; a
    # cached product peaks at 300 + 20 m beside it. At 4 examples: P = 1400, H = 200, the
    # rest of the building product 1200, a cached product 380; the whole cache is 200.
    plan = MicroBatchPlan(None, 4, 4, 100.0, 1000.0, None, "cpu_resident", 50.0, 0.0,
                          20.0, 300.0)
    k, vec = 5, 100

    def size(budget, at_first=lambda c: 2 * vec):
        return _restart_size(plan, budget, None, 200.0, 12, k, lambda c: c * vec, at_first)

    # CPU: the first product runs beside two vectors, later ones beside the whole basis.
    assert size(12 * vec + 200 + 380) == (12, True)
    assert size(12 * vec + 200 + 380 - 1) == (11, True)
    # ... unless the first product does not fit either: 2 vectors + 200 + 1200 = 1600.
    assert size(1599) == (k + 2, False)
    # CUDA: the whole basis is there for the first product too (the larger peak decides).
    cuda = lambda c: c * vec  # noqa: E731
    assert size(12 * vec + 200 + 1200, cuda) == (12, True)
    assert size(12 * vec + 200 + 1200 - 1, cuda) == (11, True)
    floor = k + CACHE_FIRST_EXTRA
    assert size(floor * vec + 1400, cuda) == (floor, True)
    # Below the floor the basis takes the memory and products run fresh (peak P).
    assert size(floor * vec + 1400 - 1, cuda) == (floor - 1, False)
    assert size((k + 2) * vec + 1400, cuda) == (k + 2, False)
    assert _restart_size(None, None, None, 0.0, 12, k, lambda c: c * vec, cuda) == (12, True)
    # A product's output vector (one vector here) is not needed when the products write
    # into the solver's buffer.
    out = dataclasses.replace(plan, output_bytes=float(vec))

    def size_out(budget, into):
        return _restart_size(out, budget, None, 200.0, 12, k, lambda c: c * vec,
                             lambda c: 2 * vec, into)

    assert size_out(12 * vec + 200 + 380, True) == (12, True)
    assert size_out(12 * vec + 200 + 380, False) == (11, True)


def test_the_time_of_a_call_is_split_into_its_parts():
    model, data = _budget_problem()
    out = compute_fisher_eigenvalues_lanczos(model, data, k=3, max_iter=60, tol=1e-8,
                                             memory_budget_bytes=2**34, **CE)
    meta = out["metadata"]
    parts = [meta[key] for key in ("time_matvec", "time_memory_plan", "time_operator_build",
                                   "time_solver_other")]
    assert all(p > 0 for p in parts)
    # The parts are disjoint stretches of the call (the rest: checks, metrics, the result).
    assert sum(parts) <= meta["time"]
