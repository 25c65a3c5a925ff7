"""FisherSpectral / SpectralConfig: spectra, centring, blocks, solvers, reproducibility, edges."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from curvops.adapters.fisher_spectral import (
    BLOCK_APPROXIMATION_NOTE,
    FisherSpectral,
    SpectralConfig,
    stable_int_hash,
)
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from test_gram import (
    classification_data,
    dense_fisher_eigenvalues,
    flat_reference_gradients,
    mlp_classifier,
    padded_lm_batch,
    tiny_gpt2,
)

TOL = 1e-10
CE = nn.CrossEntropyLoss()


def spectrum(config: SpectralConfig | None = None, **kwargs):
    model = kwargs.pop("model", None) or mlp_classifier()
    batch = kwargs.pop("batch", None) or classification_data()
    return FisherSpectral(config).compute_fisher_spectrum(model, batch, loss_fn=CE, **kwargs)


def test_eigenvalues_trace_and_metadata_match_dense_fisher() -> None:
    model = mlp_classifier()
    X, y = classification_data()
    out = FisherSpectral(SpectralConfig(seed=0)).compute_fisher_spectrum(model, (X, y), loss_fn=CE)
    ref = dense_fisher_eigenvalues(flat_reference_gradients(model, X, y))
    np.testing.assert_allclose(out["eigenvalues"], ref[:12], rtol=0, atol=TOL)
    assert out["trace"] == pytest.approx(ref.sum(), abs=TOL)
    assert out["spectral_gap"] == pytest.approx(ref[0] - ref[1], abs=TOL)
    assert out["condition_number"] == pytest.approx(ref[0] / ref[11], rel=1e-8)
    assert out["smallest_eigenvalue"] == pytest.approx(ref[11], abs=TOL)
    p = ref[:12] / ref[:12].sum()
    assert out["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-10)
    meta = out["metadata"]
    assert meta["sample_unit"] == "example" and meta["normalization"] == "n_samples"
    assert meta["n_samples"] == 12 and meta["dtype"] == "float64" and meta["device"] == "cpu"
    assert meta["seed"] == 0 and meta["use_deterministic"] is False
    assert meta["per_example_method"] == "vmap" and meta["ef_scale"] == pytest.approx(1.0)
    assert list(out["per_block"]) == ["all"]


@pytest.mark.parametrize("method", ["vmap", "loop", "jacobian"])
def test_center_gradients_is_honoured_by_every_path(method: str) -> None:
    """The seed's streaming bug: centring was dropped on the chunked path."""
    model = mlp_classifier()
    X, y = classification_data()
    cfg = SpectralConfig(per_example_method=method, chunk_size=5)
    out = FisherSpectral(cfg).compute_fisher_spectrum(
        model, (X, y), center_gradients=True, loss_fn=CE
    )
    ref = dense_fisher_eigenvalues(flat_reference_gradients(model, X, y), center=True)
    np.testing.assert_allclose(out["eigenvalues"], ref[:12], rtol=0, atol=TOL)
    assert out["metadata"]["per_example_method"] == method
    assert out["metadata"]["center_gradients"] is True


def test_n_samples_multiple_batches_and_precomputed_gradients() -> None:
    model = mlp_classifier()
    X, y = classification_data()
    data = [(X[:5], y[:5]), (X[5:], y[5:])]
    out = FisherSpectral().compute_fisher_spectrum(model, data, n_samples=8, loss_fn=CE)
    G8 = flat_reference_gradients(model, X[:8], y[:8])
    np.testing.assert_allclose(out["eigenvalues"], dense_fisher_eigenvalues(G8)[:8], atol=TOL)
    assert out["metadata"]["n_samples"] == 8
    pre = FisherSpectral().compute_fisher_spectrum(None, None, precomputed_gradients=G8)
    np.testing.assert_allclose(pre["eigenvalues"], out["eigenvalues"], rtol=0, atol=TOL)
    names = [n for n, _ in model.named_parameters()]
    per_name = dict(zip(names, torch.split(G8, [p.numel() for p in model.parameters()], dim=1)))
    per_example = [{k: v[i] for k, v in per_name.items()} for i in range(8)]
    lst = FisherSpectral().compute_fisher_spectrum(None, None, precomputed_gradients=per_example)
    np.testing.assert_allclose(lst["eigenvalues"], out["eigenvalues"], rtol=0, atol=TOL)
    with pytest.raises(ValueError, match="n_samples=20"):
        FisherSpectral().compute_fisher_spectrum(model, data, n_samples=20, loss_fn=CE)
    with pytest.raises(ValueError, match="no parameter names"):
        FisherSpectral().compute_fisher_spectrum(
            None, None, precomputed_gradients=G8, block_structure="layer"
        )


@pytest.mark.parametrize("solver", ["lanczos", "randomized_svd"])
def test_iterative_solvers_match_dense_top_k(solver: str) -> None:
    dense = spectrum(SpectralConfig(top_k_eigenvalues=5))
    it = spectrum(SpectralConfig(top_k_eigenvalues=5, eigensolver=solver, seed=3))
    np.testing.assert_allclose(it["eigenvalues"], dense["eigenvalues"], rtol=1e-9, atol=TOL)
    assert it["metadata"]["eigensolvers"] == [solver]
    with pytest.raises(ValueError, match="top_k_eigenvalues=None"):
        spectrum(SpectralConfig(eigensolver=solver))


def test_k_clipping_and_empty_inputs_warn() -> None:
    with pytest.warns(UserWarning, match="clipped"):
        out = spectrum(SpectralConfig(top_k_eigenvalues=50))
    assert out["eigenvalues"].size == 11  # min(N, P) - 1 = 12 - 1
    assert out["metadata"]["k_clipped"] and out["metadata"]["k_clipped_blocks"] == ["all"]
    assert out["per_block"]["all"]["k_used"] == 11
    with pytest.warns(UserWarning, match="empty"):
        empty = FisherSpectral().compute_fisher_spectrum(None, None, precomputed_gradients=[])
    assert empty["eigenvalues"].size == 0 and empty["metadata"]["n_samples"] == 0
    with pytest.warns(UserWarning, match="no examples"):
        none = spectrum(n_samples=0)
    assert none["eigenvalues"].size == 0 and np.isnan(none["condition_number"])


def test_bad_input_is_refused_before_work() -> None:
    with pytest.raises(ValueError, match="eigensolve_device"):
        SpectralConfig(eigensolve_device="tpu")
    with pytest.raises(ValueError, match="dtype_eigensolve"):
        SpectralConfig(dtype_eigensolve=torch.bfloat16)
    with pytest.raises(ValueError, match="top_k"):
        SpectralConfig(top_k_eigenvalues=0)
    with pytest.raises(ValueError, match="block_structure"):
        spectrum(block_structure="layers")
    with pytest.raises(TypeError, match="loss_fn is required"):
        FisherSpectral().compute_fisher_spectrum(mlp_classifier(), classification_data())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            spectrum(SpectralConfig(eigensolve_device="cuda"))


def test_deterministic_toggle_restores_global_state() -> None:
    before = torch.are_deterministic_algorithms_enabled()
    env_before = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    a = spectrum(SpectralConfig(use_deterministic=True))
    assert torch.are_deterministic_algorithms_enabled() == before
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == env_before
    assert a["metadata"]["use_deterministic"] is True
    b = spectrum(SpectralConfig(use_deterministic=False))
    np.testing.assert_array_equal(a["eigenvalues"], b["eigenvalues"])


def test_float32_eigensolve_is_close() -> None:
    a = spectrum(SpectralConfig(dtype_eigensolve=torch.float32))
    b = spectrum()
    np.testing.assert_allclose(a["eigenvalues"][:5], b["eigenvalues"][:5], rtol=1e-5)
    assert a["metadata"]["dtype"] == "float32"


def test_module_blocks_union_and_subsampling_are_principal_submatrices() -> None:
    model = mlp_classifier()
    X, y = classification_data()
    G = flat_reference_gradients(model, X, y)
    cfg = SpectralConfig(max_params_per_block=20, seed=7)
    out = FisherSpectral(cfg).compute_fisher_spectrum(model, (X, y), loss_fn=CE)
    block = out["per_block"]["all"]
    assert block["n_params"] == G.shape[1] and block["n_params_used"] == 20 and block["subsampled"]
    assert "principal submatrix" in out["note"]
    # Recompute from the documented rule: randperm seeded by seed + sha256(block name).
    gen = torch.Generator().manual_seed((7 + stable_int_hash("all")) % (2**63 - 1))
    cols = torch.randperm(G.shape[1], generator=gen)[:20].sort().values
    ref = dense_fisher_eigenvalues(G[:, cols])
    np.testing.assert_allclose(out["eigenvalues"], ref[:12], rtol=0, atol=TOL)


@pytest.mark.hf
def test_layer_blocks_of_gpt2_are_one_per_layer_and_the_union() -> None:
    model = tiny_gpt2()
    batch = padded_lm_batch()
    cfg = SpectralConfig(per_example_method="jacobian", chunk_size=6, top_k_eigenvalues=None)
    out = FisherSpectral(cfg).compute_fisher_spectrum(model, batch, block_structure="layer")
    assert list(out["per_block"]) == ["transformer.h.0", "transformer.h.1", "other"]
    assert [out["per_block"][k]["layer_index"] for k in ("transformer.h.0", "transformer.h.1")] == [
        0,
        1,
    ]
    other = out["per_block"]["other"]["param_names"]
    assert "transformer.wte.weight" in other and "transformer.ln_f.weight" in other
    union = np.sort(np.concatenate([b["eigenvalues"] for b in out["per_block"].values()]))[::-1]
    np.testing.assert_array_equal(out["eigenvalues"], union)
    assert out["eigenvalues"].size == 3 * 6
    assert (
        BLOCK_APPROXIMATION_NOTE in out["note"] and out["metadata"]["block_diagonal_approximation"]
    )
    assert out["metadata"]["sample_unit"] == "sequence"
    # Each block's spectrum is the Gram spectrum of its own columns of the full G.
    full = FisherSpectral(cfg).compute_fisher_spectrum(model, batch)
    assert out["trace"] == pytest.approx(full["trace"], rel=1e-12)  # same trace, other spectrum
    assert not np.allclose(out["eigenvalues"][:6], full["eigenvalues"][:6])
    from curvops.linops.hf import hf_objective
    from curvops.linops.per_example import per_example_gradients

    G = per_example_gradients(model, hf_objective(model), batch, method="loop")
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    per_name = dict(zip(names, torch.split(G, sizes, dim=1)))
    for block, info in out["per_block"].items():
        Gb = torch.cat([per_name[n] for n in info["param_names"]], dim=1)
        ref = dense_gram(Gb)
        np.testing.assert_allclose(info["eigenvalues"], ref, rtol=0, atol=TOL, err_msg=block)


def dense_gram(G: torch.Tensor) -> np.ndarray:
    K = G @ G.T / G.shape[0]
    return torch.linalg.eigvalsh(K).numpy()[::-1][: min(G.shape)]


SUBSAMPLED_RUN = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_gram import classification_data, mlp_classifier
    from curvops.adapters.fisher_spectral import FisherSpectral, SpectralConfig
    cfg = SpectralConfig(seed=11, max_params_per_block=9)
    out = FisherSpectral(cfg).compute_fisher_spectrum(
        mlp_classifier(), classification_data(), block_structure="module",
        loss_fn=torch.nn.CrossEntropyLoss(),
    )
    print(out["eigenvalues"].tobytes().hex())
    """
)


def test_subsampled_spectrum_is_bit_identical_across_processes() -> None:
    script = SUBSAMPLED_RUN.format(tests=str(Path(__file__).parent))
    outputs = []
    for hash_seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs.append(proc.stdout.strip().splitlines()[-1])
    assert outputs[0] == outputs[1] and len(outputs[0]) > 0


def test_stable_hash_is_fixed() -> None:
    # A literal: the value must never depend on the process (unlike hash()).
    assert stable_int_hash("transformer.h.0") == int.from_bytes(
        __import__("hashlib").sha256(b"transformer.h.0").digest()[:8], "big"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert stable_int_hash("a") != stable_int_hash("b")
