"""Refused inputs of the language-model adapter, the seed API's arguments and the CLI.

Each bad input gets a curvops error naming the argument (or a warning, for padding
without a mask) before any expensive work; the CLI exits with distinct codes and prints
one line per error.
"""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pytest
import torch
from curvops.adapters.seed_api import (
    compute_fisher_eigenvalues_lanczos,
    compute_hessian_eigenvalues_lanczos,
    compute_spectrum,
)
from curvops.solvers.lanczos import LanczosConfig
from curvops.validation import ladder, report
from torch import nn

from curvops.cli import EXIT_FAILED, EXIT_RUNTIME, EXIT_USAGE, main

V, POSITIONS = 50, 32




def _transformers():
    tr = pytest.importorskip("transformers")
    tr.utils.logging.set_verbosity_error()
    return tr


def gpt2(pad_token_id: int | None = None):
    tr = _transformers()
    cfg = tr.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=V, n_positions=POSITIONS,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        pad_token_id=pad_token_id)
    torch.manual_seed(0)
    return tr.GPT2LMHeadModel(cfg).double().eval()


def ids(n: int = 2, t: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, V, (n, t), generator=torch.Generator().manual_seed(seed))


def counting_forwards(model: nn.Module) -> list[int]:
    calls: list[int] = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


# --- token ids and lengths against the model's config ----------------------------------------
def _with(t: torch.Tensor, i: int, j: int, value: int) -> torch.Tensor:
    t = t.clone()
    t[i, j] = value
    return t


@pytest.mark.hf
@pytest.mark.parametrize(
    "bad, match",
    [
        (_with(ids(), 1, 3, V + 7), rf"input_ids\[1, 3\] = {V + 7}.*vocabulary \[0, {V}\)"),
        (_with(ids(), 0, 2, -1), rf"input_ids\[0, 2\] = -1.*vocabulary \[0, {V}\)"),
        (ids(2, POSITIONS + 8), rf"{POSITIONS + 8} tokens.*{POSITIONS} positions"),
    ],
)
def test_token_ids_and_lengths_are_refused_before_any_forward_pass(bad, match):
    from curvops.linops import GGNOperator
    from curvops.linops.hf import hf_objective

    model = gpt2()
    calls = counting_forwards(model)
    good = {"input_ids": ids()}
    with pytest.raises(ValueError, match=match) as info:
        GGNOperator(model, hf_objective(model), [good, {"input_ids": bad}])
    assert calls == []  # refused while counting, before the first forward pass
    assert "a batch with input_ids of shape" in str(info.value)
    with pytest.raises(ValueError, match=match):
        compute_fisher_eigenvalues_lanczos(model, {"input_ids": bad}, k=1)
    assert calls == []


@pytest.mark.hf
def test_an_objective_without_limits_explains_torchs_index_error():
    from curvops.linops import GGNOperator
    from curvops.linops.hf import LanguageModelObjective

    model = gpt2()
    for bad, match in ((_with(ids(), 0, 0, V), "vocabulary"), (ids(1, 40), "positions")):
        with pytest.raises(ValueError, match=match):
            GGNOperator(model, LanguageModelObjective("causal_lm"), {"input_ids": bad})


@pytest.mark.hf
def test_objective_limits_are_checked_arguments():
    from curvops.linops.hf import LanguageModelObjective, hf_objective, model_limits

    assert model_limits(gpt2(pad_token_id=0)) == (V, POSITIONS, 0)
    obj = hf_objective(gpt2())
    assert (obj.vocab_size, obj.max_positions, obj.pad_token_id) == (V, POSITIONS, None)
    assert LanguageModelObjective(vocab_size=np.int64(8)).vocab_size == 8
    with pytest.raises(ValueError, match="vocab_size"):
        LanguageModelObjective(vocab_size=0)
    with pytest.raises(ValueError, match="max_positions"):
        LanguageModelObjective(max_positions=2.5)
    with pytest.raises(TypeError, match="strict_padding"):
        LanguageModelObjective(strict_padding="yes")


# --- pad tokens without an attention mask ----------------------------------------------------
def _padded() -> torch.Tensor:
    t = ids(2, 12)
    t[0, 9:] = 0  # 3 pad tokens
    t[1, 7:] = 0  # 5 pad tokens
    return t


@pytest.mark.hf
def test_pad_tokens_without_a_mask_warn_once_naming_the_count_and_the_fix():
    from curvops.linops import GGNOperator
    from curvops.linops.hf import hf_objective

    model = gpt2(pad_token_id=0)
    obj = hf_objective(model)
    with pytest.warns(UserWarning, match=r"8 pad tokens \(pad_token_id=0\).*attention_mask.*"
                                         r"labels to -100") as record:
        op = GGNOperator(model, obj, [{"input_ids": _padded()}, {"input_ids": _padded()}])
    assert len([w for w in record if "pad tokens" in str(w.message)]) == 1  # once
    assert op.total.terms == 2 * 2 * 11  # the pad tokens are still targets: the user decides
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GGNOperator(model, obj, {"input_ids": _padded()})  # already warned
        fresh = hf_objective(model)
        mask = (_padded() != 0).long()
        masked = GGNOperator(model, fresh, {"input_ids": _padded(), "attention_mask": mask})
        labels = _padded().masked_fill(_padded() == 0, -100)
        labelled = GGNOperator(model, fresh, {"input_ids": _padded(), "labels": labels})
    assert masked.total.terms == 8 + 6 and labelled.total.terms == 8 + 6


@pytest.mark.hf
def test_strict_padding_refuses_pad_tokens_without_a_mask():
    from curvops.linops import GGNOperator
    from curvops.linops.hf import hf_objective

    model = gpt2(pad_token_id=0)
    with pytest.raises(ValueError, match="8 pad tokens.*attention_mask"):
        GGNOperator(model, hf_objective(model, strict_padding=True), {"input_ids": _padded()})


# --- the seed API's arguments ----------------------------------------------------------------
def _linear_problem():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(12, 4, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (12,), generator=g))
    return model, batch, {"loss_fn": nn.CrossEntropyLoss()}


def test_seed_api_accepts_numpy_scalars_for_every_number():
    model, batch, kw = _linear_problem()
    plain = compute_fisher_eigenvalues_lanczos(model, batch, k=2, max_iter=15, tol=1e-6,
                                               seed=1, **kw)
    numpy = compute_fisher_eigenvalues_lanczos(
        model, batch, k=np.int64(2), max_iter=np.int32(15), tol=np.float32(1e-6),
        seed=np.int64(1), mc_samples=np.int64(1), micro_batch_size=np.int64(6), **kw,
    )
    np.testing.assert_allclose(numpy["top_eigenvalues"], plain["top_eigenvalues"], rtol=1e-10)
    assert type(numpy["metadata"]["tol"]) is float and numpy["metadata"]["seed"] == 1


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"tol": "1e-6"}, TypeError, "tol must be a real number"),
        ({"tol": -1.0}, ValueError, "tol must be a finite number >= 0"),
        ({"tol": float("nan")}, ValueError, "tol"),
        ({"seed": 1.5}, TypeError, "seed must be an int"),
        ({"k": 2.0}, TypeError, "k must be an int"),
        ({"k": True}, TypeError, "k must be an int"),
        ({"max_iter": 0}, ValueError, "max_iter must be an int >= 1"),
        ({"mc_samples": 0}, ValueError, "mc_samples"),
        ({"micro_batch_size": 2.0}, TypeError, "micro_batch_size"),
    ],
)
def test_seed_api_refuses_bad_numbers_by_name(kwargs, error, match):
    model, batch, kw = _linear_problem()
    with pytest.raises(error, match=match):
        compute_fisher_eigenvalues_lanczos(model, batch, **{"k": 1, **kwargs, **kw})


def test_seed_api_accepts_a_dict_config():
    model, batch, kw = _linear_problem()
    fields = {"k": 2, "max_iters": 15, "tol": 1e-12, "reorth": "full", "seed": 3}
    ref = compute_spectrum(model, batch, config=LanczosConfig(**fields), **kw)
    got = compute_spectrum(model, batch, config={**fields, "tol": np.float64(1e-12)}, **kw)
    np.testing.assert_allclose(got["top_eigenvalues"], ref["top_eigenvalues"], rtol=1e-12)
    assert got["metadata"]["reorth"] == "full" and got["metadata"]["seed"] == 3
    hess = compute_hessian_eigenvalues_lanczos(model, batch, k=1, config={"reorth": "full"},
                                               **kw)
    assert hess["metadata"]["reorth"] == "full"


def test_seed_api_refuses_bad_configs_by_name():
    model, batch, kw = _linear_problem()
    with pytest.raises(TypeError, match="config has unknown key.*'max_iter'.*max_iters"):
        compute_fisher_eigenvalues_lanczos(model, batch, k=1, config={"max_iter": 5}, **kw)
    with pytest.raises(TypeError, match="config must be a LanczosConfig or a dict"):
        compute_spectrum(model, batch, config=[("k", 2)], **kw)
    with pytest.raises(ValueError, match="unknown reorth"):
        compute_spectrum(model, batch, config={"reorth": "sometimes"}, **kw)


# --- the CLI ---------------------------------------------------------------------------------
def _no_ladder(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr("curvops.cli.run_ladder", refuse)


def _one_line_error(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and "UsageError" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.mark.parametrize("where", ["under_a_file", "is_a_file"])
def test_validate_checks_out_before_any_work(tmp_path, monkeypatch, capsys, where):
    _no_ladder(monkeypatch)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "report" if where == "under_a_file" else blocker
    status = main(["validate", "--quick", "--models", "mlp", "--operators", "ggn", "--out",
                   str(out), "--no-progress", "--no-figures"])
    assert status == EXIT_USAGE == 2
    _one_line_error(capsys.readouterr().err, "curvops validate: error:", f"--out {out}")


def test_spectrum_usage_errors_exit_2_with_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_tuple.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def make():\n"
        "    return nn.Linear(3, 1).double(), nn.MSELoss(), "
        "[(torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, 1, dtype=torch.float64))]\n")
    monkeypatch.chdir(tmp_path)
    cases = [
        (["spectrum", "mlp", "--sequences", "3"], "--sequences does not apply to the zoo model"),
        (["spectrum", "mlp", "--seq-len", "8", "--sequences", "2"],
         "--sequences, --seq-len do not apply"),
        (["spectrum", "my_tuple:make", "--seq-len", "8"], "--seq-len does not apply"),
        (["spectrum", "my_tuple:make", "--dtype", "float32"], "--dtype does not apply"),
        (["spectrum", "no_such_module:make"], "no module named 'no_such_module'"),
    ]
    for argv, words in cases:
        assert main(argv) == EXIT_USAGE, argv
        _one_line_error(capsys.readouterr().err, "curvops spectrum: error:", words)
    sys.modules.pop("my_tuple", None)
    # argparse's own usage errors: the same code, returned rather than raised.
    for argv in (["spectrum", "mlp", "--sequences", "0"], ["spectrum", "mlp", "--k", "0"],
                 ["spectrum", "mlp", "--tol", "-1"], ["validate", "--bogus"]):
        assert main(argv) == EXIT_USAGE, argv
        assert "error:" in capsys.readouterr().err


def test_a_factory_that_raises_is_a_runtime_error_with_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_broken.py").write_text(
        "def make():\n    raise ValueError('no weights here')\n")
    monkeypatch.chdir(tmp_path)
    assert main(["spectrum", "my_broken:make"]) == EXIT_RUNTIME == 3
    _one_line_error(capsys.readouterr().err, "the factory my_broken:make raised ValueError",
                    "no weights here", "--debug")
    assert main(["spectrum", "my_broken:make", "--debug"]) == EXIT_RUNTIME
    err = capsys.readouterr().err
    assert "Traceback" in err and "no weights here" in err.strip().splitlines()[-1]
    sys.modules.pop("my_broken", None)


@pytest.mark.hf
def test_sequences_beyond_the_models_positions(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_gpt.py").write_text(
        "import torch, transformers\n"
        "def model():\n"
        "    torch.manual_seed(0)\n"
        "    cfg = transformers.GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1,\n"
        "                                  n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,\n"
        "                                  attn_pdrop=0.0)\n"
        "    return transformers.GPT2LMHeadModel(cfg).double().eval()\n"
        "def problem():\n"
        "    return model(), None, [{'input_ids': torch.ones(2, 12, dtype=torch.long)}]\n")
    monkeypatch.chdir(tmp_path)
    # From the command line's --seq-len: a usage error, before any work.
    assert main(["spectrum", "my_gpt:model", "--seq-len", "12", "--k", "1"]) == EXIT_USAGE
    _one_line_error(capsys.readouterr().err, "--seq-len 12", "8 positions")
    # In the factory's own data: curvops refuses it at run time, in one line.
    assert main(["spectrum", "my_gpt:problem", "--k", "1"]) == EXIT_RUNTIME
    _one_line_error(capsys.readouterr().err, "12 tokens", "8 positions")
    sys.modules.pop("my_gpt", None)


def test_validate_failed_rows_exit_1_and_help_documents_the_codes(tmp_path, monkeypatch,
                                                                  capsys):
    empty = ladder.LadderRun(records=[], rungs=[])
    monkeypatch.setattr("curvops.cli.run_ladder", lambda *a, **k: empty)
    monkeypatch.setattr(ladder.LadderRun, "passed", property(lambda self: False))
    assert main(["validate", "--quick", "--models", "mlp", "--out", str(tmp_path / "r"),
                 "--no-progress", "--no-figures"]) == EXIT_FAILED == 1
    capsys.readouterr()
    assert main(["validate", "--help"]) == 0
    text = capsys.readouterr().out
    for line in ("1    validation rows failed", "2    usage error", "3    runtime error",
                 "--debug"):
        assert line in text


# --- atomic report files ---------------------------------------------------------------------
def test_report_replaces_a_previous_report_and_keeps_other_files(tmp_path):
    figs = tmp_path / "figures"
    figs.mkdir()
    (tmp_path / "report.md").write_text("old report")
    (tmp_path / "results.json").write_text("{}")
    (figs / "spectrum_old-rung_mlp_ggn.png").write_bytes(b"\x89PNG truncated")
    (figs / ".density_x.png.123-abcd.curvops-tmp").write_bytes(b"left by a kill -9")
    (figs / "my_notes.png").write_bytes(b"the user's own file")
    (tmp_path / "notes.txt").write_text("keep me")
    paths = report.write_report(ladder.LadderRun(records=[], rungs=[]), tmp_path)
    assert paths["figures"] == []
    assert sorted(p.name for p in figs.iterdir()) == ["my_notes.png"]
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert json.loads((tmp_path / "results.json").read_text())["schema"] == report.SCHEMA
    assert "curvops validation report" in (tmp_path / "report.md").read_text()
    assert not list(tmp_path.glob(".*curvops-tmp"))


def test_an_interrupted_write_leaves_no_truncated_file(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("complete")
    with pytest.raises(KeyboardInterrupt), report._replacing(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "complete" and sorted(tmp_path.iterdir()) == [target]

    plt = report._pyplot()
    fig, _ = plt.subplots()
    png = tmp_path / "spectrum_a.png"

    def interrupted_savefig(path, **kwargs):
        path.write_bytes(b"\x89PNG\r\n\x1a\n partial")
        raise KeyboardInterrupt

    fig.savefig = interrupted_savefig
    with pytest.raises(KeyboardInterrupt):
        report._save_figure(plt, fig, png)
    assert sorted(tmp_path.iterdir()) == [target]  # neither the PNG nor a temporary file
    fig, _ = plt.subplots()
    report._save_figure(plt, fig, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (png.stat().st_mode & 0o777) == (target.stat().st_mode & 0o777)  # not private
