"""The curvops command line: validate, spectrum (zoo, module:factory, local HF directory)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from curvops.validation import zoo

from curvops.cli import main


def _dense_top(model, loss_fn, data, name, k):
    op = zoo.make_operator(name, model, loss_fn, data)
    return torch.linalg.eigvalsh(op.to_dense()).flip(0)[:k].numpy()


def test_validate_writes_report_and_exits_zero(tmp_path, capsys):
    out = tmp_path / "rep"
    status = main(["validate", "--quick", "--models", "mlp", "--operators", "ggn", "--out",
                   str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "lanczos-partial" in printed and "0 failed" in printed
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["dtype"] for r in rows} == {"float64", "float32", "bfloat16"}
    assert all(r["status"] in ("pass", "caught", "skipped") for r in rows)
    assert (out / "report.md").exists() and list((out / "figures").glob("*.png"))
    bf16 = {r["method"]: r for r in rows if r["dtype"] == "bfloat16"}
    assert set(bf16) == {"eigsh", "lanczos-full", "lanczos-selective", "lanczos-partial",
                         "lanczos-none"}
    assert all(r["status"] == "pass" and r["tolerance"] == 2e-2 for r in bf16.values())
    # The reference is the fp32 run of the *same* weights: the bf16-rounded ones, widened.
    rounded = zoo.build("mlp", torch.float32).to(torch.bfloat16).to(torch.float64)
    exact = _dense_top(rounded.model, rounded.loss_fn, rounded.data, "ggn", 3)
    ref = next(r for r in rows if r["rung"] == "bf16-vs-fp32 (fp32 ref)"
               and r["method"] == "dense")
    np.testing.assert_allclose(ref["eigenvalues"], exact, rtol=1e-5)
    unrounded = zoo.build("mlp", torch.float64)
    other = _dense_top(unrounded.model, unrounded.loss_fn, unrounded.data, "ggn", 3)
    assert np.max(np.abs(other - exact) / exact) > 1e-4  # so the check above can fail


def test_validate_exit_status_is_nonzero_when_a_row_fails(tmp_path, monkeypatch, capsys):
    from curvops.validation import crosscheck

    # Break lanczos-full (a ghost: λ₁ twice) and check the command fails.
    original = crosscheck.METHODS["lanczos-full"]

    def ghost(ctx):
        o = original.run(ctx)
        o.eigenvalues = np.concatenate([o.eigenvalues[:1], o.eigenvalues[:-1]])
        return o

    monkeypatch.setitem(crosscheck.METHODS, "lanczos-full",
                        crosscheck.MethodRunner("lanczos-full", "", original.tolerances,
                                                original.applies, ghost, reference_rank=None))
    status = main(["validate", "--quick", "--models", "mlp", "--operators", "ef", "--out",
                   str(tmp_path), "--no-progress", "--no-figures"])
    assert status == 1
    assert "FAILED" in capsys.readouterr().out


def test_validate_rejects_unknown_models(capsys):
    assert main(["validate", "--quick", "--models", "nope", "--no-progress"]) == 2
    assert "unknown zoo model" in capsys.readouterr().err


def test_spectrum_of_a_zoo_model_matches_the_dense_matrix(capsys):
    assert main(["spectrum", "--model", "mlp", "--operator", "ggn", "--k", "3",
                 "--dtype", "float64", "--tol", "1e-12", "--trace", "--density"]) == 0
    result = json.loads(capsys.readouterr().out)
    p = zoo.build("mlp", torch.float64)
    exact = _dense_top(p.model, p.loss_fn, p.data, "ggn", 3)
    np.testing.assert_allclose(result["top_eigenvalues"], exact, rtol=1e-9)
    for key in ("max_eigenvalue", "condition_number", "effective_rank", "spectral_gap",
                "lanczos_iterations", "k_requested", "k_computed", "operator_used", "is_psd"):
        assert key in result
    op = p.operator("ggn")
    trace = float(torch.trace(op.to_dense()))
    assert abs(result["trace"]["value"] - trace) < 4 * result["trace"]["standard_error"] + 1e-12
    assert len(result["density"]["grid"]) == len(result["density"]["density"]) == 100


def test_spectrum_with_a_thick_restart_matches_the_dense_matrix(capsys):
    assert main(["spectrum", "--model", "mlp", "--operator", "ggn", "--k", "3", "--ncv", "6",
                 "--max-iter", "400", "--dtype", "float64", "--tol", "1e-12"]) == 0
    result = json.loads(capsys.readouterr().out)
    p = zoo.build("mlp", torch.float64)
    exact = _dense_top(p.model, p.loss_fn, p.data, "ggn", 3)
    np.testing.assert_allclose(result["top_eigenvalues"], exact, rtol=1e-9)
    assert result["metadata"]["ncv"] == 6 and result["metadata"]["restarts"] > 0
    assert all(result["metadata"]["converged"])


def test_spectrum_of_a_module_factory(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "def make():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    model = nn.Linear(4, 1).double()\n"
        "    X = torch.randn(10, 4, generator=g, dtype=torch.float64)\n"
        "    y = torch.randn(10, 1, generator=g, dtype=torch.float64)\n"
        "    return model, nn.MSELoss(), [(X, y)]\n")
    monkeypatch.chdir(tmp_path)
    assert main(["spectrum", "my_models:make", "--operator", "hessian", "--k", "2",
                 "--tol", "1e-12"]) == 0
    result = json.loads(capsys.readouterr().out)
    sys.modules.pop("my_models", None)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(10, 4, generator=g, dtype=torch.float64)
    # MSE (mean over N = 10 terms) of a linear model: H = (2/N) · [X 1]ᵀ[X 1], closed form.
    Xb = torch.cat([X, torch.ones(10, 1, dtype=torch.float64)], 1)
    top = torch.linalg.eigvalsh(2 / 10 * Xb.T @ Xb).flip(0)[:2].numpy()
    np.testing.assert_allclose(result["top_eigenvalues"], top, rtol=1e-8)
    assert result["model_source"] == "factory:my_models:make"


def test_spectrum_rejects_bad_specs(capsys):
    assert main(["spectrum", "no_such_thing"]) == 2
    assert "not a zoo model" in capsys.readouterr().err
    assert main(["spectrum", "mlp", "--model", "cnn"]) == 2
    assert "give the model once" in capsys.readouterr().err
    assert main(["spectrum", "--k", "2"]) == 2
    assert "give the model once" in capsys.readouterr().err


@pytest.mark.hf
def test_spectrum_of_a_factory_returning_a_transformers_model(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_lm.py").write_text(
        "import torch, transformers\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    cfg = transformers.GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1,\n"
        "                                  n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,\n"
        "                                  attn_pdrop=0.0)\n"
        "    return transformers.GPT2LMHeadModel(cfg).double()\n")
    monkeypatch.chdir(tmp_path)
    assert main(["spectrum", "--model", "my_lm:make", "--operator", "ggn", "--k", "2",
                 "--sequences", "3", "--seq-len", "6", "--tol", "1e-12",
                 "--max-iter", "200"]) == 0
    result = json.loads(capsys.readouterr().out)
    import my_lm
    from curvops.linops.hf import hf_objective

    model = my_lm.make()
    sys.modules.pop("my_lm", None)
    assert result["model_source"] == "factory:my_lm:make"
    assert model.config._attn_implementation == "sdpa"  # loaded as users build it
    exact = _dense_top(model, hf_objective(model), zoo.token_data(3, 6, 16, seed=0), "ggn", 2)
    np.testing.assert_allclose(result["top_eigenvalues"], exact, rtol=1e-8)


@pytest.mark.hf
def test_spectrum_of_a_local_huggingface_directory(tmp_path, capsys):
    from curvops.linops import EmpiricalFisherOperator
    from curvops.linops.hf import hf_objective

    p = zoo.build("gpt2-tiny", torch.float64)
    p.model.save_pretrained(tmp_path / "tiny")
    assert main(["spectrum", str(tmp_path / "tiny"), "--operator", "ef", "--k", "2",
                 "--sequences", "3", "--seq-len", "6", "--tol", "1e-12", "--max-iter", "200",
                 "--dtype", "float64"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["k_computed"] == 2 and result["model_source"].startswith("hf-dir:")
    meta = result["metadata"]
    assert meta["normalization"] == "token" and meta["sample_unit"] == "sequence"
    # Brute force: the dense EF of the same weights on the same synthetic data.
    data = zoo.token_data(3, 6, 16, seed=0)
    op = EmpiricalFisherOperator(p.model, hf_objective(p.model), data)
    exact = torch.linalg.eigvalsh(op.to_dense()).flip(0)[:2].numpy()
    np.testing.assert_allclose(result["top_eigenvalues"], exact, rtol=1e-8)


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "curvops", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for sub in ("validate", "spectrum", "bench"):
        assert sub in done.stdout


@pytest.mark.slow
def test_quick_validate_passes_end_to_end(tmp_path):
    done = subprocess.run([sys.executable, "-m", "curvops", "validate", "--quick",
                           "--out", str(tmp_path), "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["passed"] and len(data["rows"]) > 60
