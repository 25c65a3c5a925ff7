"""The validation harness: zoo determinism, the cross-check's verdicts, the ladder, the report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from curvops.validation import crosscheck as cc
from curvops.validation import ladder, report, zoo


def _dense_top(op, k):
    return torch.linalg.eigvalsh(op.to_dense()).flip(0)[:k].numpy()


# --- zoo ------------------------------------------------------------------------------------
def test_zoo_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = zoo.build("mlp", seed=3), zoo.build("cnn", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    a2 = zoo.build("mlp", seed=3)
    for p, q in zip(a.model.parameters(), a2.model.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(a.data[0][0], a2.data[0][0]) and torch.equal(a.data[0][1], a2.data[0][1])
    assert a.dtype == torch.float64 and b.num_params == sum(p.numel() for p in b.model.parameters())
    c = zoo.build("mlp", seed=4)
    assert not torch.equal(next(c.model.parameters()), next(a.model.parameters()))


def test_zoo_rejects_unknown_names_and_dtypes():
    with pytest.raises(ValueError, match="unknown zoo model"):
        zoo.build("resnet-9000")
    with pytest.raises(TypeError, match="floating"):
        zoo.build("mlp", torch.int64)
    with pytest.raises(ValueError, match="unknown operator"):
        zoo.make_operator("kfac", None, None, None)


def test_token_data_pads_with_mask_and_ignored_labels():
    (batch,) = zoo.token_data(5, 8, 20, seed=1)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape == (5, 8)
    assert bool((ids[mask == 0] == 0).all())
    assert bool((labels[mask == 0] == -100).all())
    assert torch.equal(labels[mask == 1], ids[mask == 1])  # unshifted: the objective shifts
    assert int(mask.sum(1).max()) == 8 and int(mask.sum(1).min()) < 8
    again = zoo.token_data(5, 8, 20, seed=1)[0]
    assert all(torch.equal(batch[key], again[key]) for key in batch)
    with pytest.raises(ValueError, match="min_len"):
        zoo.token_data(5, 8, 20, min_len=9)


@pytest.mark.hf
@pytest.mark.parametrize("name", ["gpt2-tiny", "bert-cls"])
def test_hf_zoo_models_take_the_users_path(name):
    """Default attention, no wrapper, the HF objective; its loss is HF's own loss."""
    from curvops.linops import GGNOperator
    from curvops.linops.hf import LanguageModelObjective

    p = zoo.build(name, torch.float64)
    assert type(p.model).__module__.startswith("transformers")
    assert p.model.config._attn_implementation == "sdpa"
    assert isinstance(p.loss_fn, LanguageModelObjective) and p.loss_fn.normalization == "token"
    params = dict(p.model.named_parameters())
    for batch in p.data:
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        c = p.loss_fn.normalizer(p.loss_fn.count(batch))
        with torch.no_grad():
            rows = p.loss_fn.rows(p.model, params, batch)
            mine = float(c * p.loss_fn.kind.row_losses(rows.predictions, rows.targets).sum())
            out = p.model(**batch)
        logits, labels = out.logits, batch["labels"]
        if name == "gpt2-tiny":  # position t predicts token t + 1
            logits, labels = logits[:, :-1].transpose(1, 2), labels[:, 1:]
        by_hand = float(torch.nn.functional.cross_entropy(logits, labels))  # float64
        assert abs(mine - by_hand) <= 1e-13 * by_hand
        theirs = float(out.loss)  # HF's own loss, which upcasts logits to float32
        assert abs(mine - theirs) <= 1e-6 * theirs
    # One operator over all batches = the token mean over the whole data set.
    total = sum(p.loss_fn.count(b).terms for b in p.data)
    assert GGNOperator(p.model, p.loss_fn, p.data).normalizer == pytest.approx(1 / total)


# --- the cross-check ------------------------------------------------------------------------
def test_relative_error_is_elementwise_and_catches_a_ghost():
    ref = np.array([3.0, 2.0, 1.0])
    assert cc.relative_error(ref[::-1], ref, 3) == 0.0
    ghost = np.array([3.0, 3.0, 2.0])  # a copy of λ₁ shifts λ₂ and λ₃ down
    assert cc.relative_error(ghost, ref, 3) == pytest.approx(1 / 3)
    assert math.isinf(cc.relative_error(ref[:2], ref, 3))


@pytest.fixture(scope="module")
def mlp_problem():
    return zoo.build("mlp", torch.float64)


def test_cross_check_every_method_agrees_with_brute_force(mlp_problem):
    op = mlp_problem.operator("ef")
    exact = _dense_top(op, 4)
    res = cc.cross_check(op, 4, problem=mlp_problem, operator_name="ef",
                         labels={"model": "mlp"})
    by = {r["method"]: r for r in res.rows}
    assert res.reference.source == "dense"
    for name in ("dense", "eigsh", "lobpcg", "lanczos-full", "lanczos-selective",
                 "lanczos-partial", "lanczos-none", "lanczos-bf16-basis", "gram"):
        row = by[name]
        assert row["status"] == "pass", (name, row)
        tol = row["tolerance"]
        assert np.max(np.abs(np.array(row["eigenvalues"]) - exact)) <= tol * exact[0] + 1e-14
    assert by["dense"]["reference"] == "eigsh"  # the reference is checked by the next one
    assert by["cupy-eigsh"]["status"] == "skipped" or torch.cuda.is_available()
    assert by["lanczos-full"]["matvecs"] <= op.shape[0]
    assert by["eigsh"]["residual_max"] < 1e-10


def test_lobpcg_row_survives_a_low_rank_operator(mlp_problem):
    """scipy's lobpcg (block k+2 = 7) gives up on a rank-10 EF; the runner enlarges the block."""
    import warnings

    from curvops.linops import EmpiricalFisherOperator
    from scipy.sparse.linalg import lobpcg

    X, y = mlp_problem.data[0]
    op = EmpiricalFisherOperator(mlp_problem.model, mlp_problem.loss_fn, [(X[:10], y[:10])])
    exact = _dense_top(op, 5)
    start = torch.randn(op.shape[0], 7, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = np.sort(lobpcg(op.to_scipy(), start, largest=True, tol=1e-9, maxiter=500)[0])
    assert np.max(np.abs(plain[::-1][:5] - exact)) > 1e-4 * exact[0]  # the failure is real
    row = cc.cross_check(op, 5, methods=("dense", "lobpcg"), operator_name="ef").rows[1]
    assert row["status"] == "pass" and "block 7 stopped early" in row["note"]
    np.testing.assert_allclose(row["eigenvalues"], exact, rtol=1e-8)


def test_deliberately_broken_lanczos_fails_the_check(mlp_problem):
    op = mlp_problem.operator("ggn")
    broken = cc.MethodRunner(
        "broken", "none without Cullum–Willoughby", cc.BROKEN_METHOD.tolerances,
        cc.BROKEN_METHOD.applies, cc.BROKEN_METHOD.run)  # not marked expected_to_fail
    res = cc.cross_check(op, 5, methods=("dense", broken, cc.BROKEN_METHOD),
                         operator_name="ggn")
    rows = {r["method"]: r for r in res.rows}
    assert rows["broken"]["status"] == "fail" and rows["broken"]["passed"] is False
    assert rows["broken"]["rel_error"] > 1e-3
    assert rows["lanczos-none-no-cw"]["status"] == "caught"  # the ghost is detected
    assert not res.passed


def test_a_method_returning_a_ghost_fails_and_a_crash_is_an_error(mlp_problem):
    op = mlp_problem.operator("ggn")
    exact = _dense_top(op, 3)

    def ghost(ctx):
        return cc.MethodOutcome(np.array([exact[0], exact[0] * (1 - 1e-9), exact[1]]))

    def crash(ctx):
        raise RuntimeError("boom")

    tol = {"float64": 1e-8}
    res = cc.cross_check(op, 3, methods=(
        "dense", cc.MethodRunner("ghost", "", tol, lambda c: None, ghost),
        cc.MethodRunner("crash", "", tol, lambda c: None, crash),
        cc.MethodRunner("no-f64", "", {"float32": 1.0}, lambda c: None, ghost)))
    rows = {r["method"]: r for r in res.rows}
    assert rows["ghost"]["status"] == "fail"
    shift = max(exact[0] - exact[1], exact[1] - exact[2]) / exact[0]
    assert rows["ghost"]["rel_error"] == pytest.approx(shift, rel=1e-6)
    assert rows["crash"]["status"] == "error" and "boom" in rows["crash"]["note"]
    assert rows["no-f64"]["status"] == "skipped"


def test_external_reference_and_bad_arguments(mlp_problem):
    op = mlp_problem.operator("ggn")
    exact = _dense_top(op, 2)
    res = cc.cross_check(op, 2, methods=("eigsh",),
                         reference=cc.Reference(exact * (1 + 1e-3), "shifted"))
    assert res.rows[0]["status"] == "fail" and res.rows[0]["reference"] == "shifted"
    with pytest.raises(ValueError, match="k must be"):
        cc.cross_check(op, op.shape[0])
    with pytest.raises(ValueError, match="unknown method"):
        cc.cross_check(op, 2, methods=("magic",))


# --- ladder and report ----------------------------------------------------------------------
def _check_report(out, run):
    data = json.loads((out / "results.json").read_text())
    assert data["schema"] == report.SCHEMA and data["meta"]["passed"] == run.passed
    assert len(data["rows"]) == len(run.rows) > 0
    for row in data["rows"]:
        assert set(report.ROW_KEYS) <= set(row)
        assert row["status"] in ("pass", "unconverged", "caught", "uncaught", "skipped",
                                 "fail", "error", "unchecked")
        if row["status"] in ("pass", "caught"):
            assert isinstance(row["rel_error"], float) and isinstance(row["matvecs"], int)
            assert isinstance(row["seconds"], float) and row["passed"] is True
            assert len(row["eigenvalues"]) == row["k"]
    md = (out / "report.md").read_text()
    assert "| model | operator | method |" in md and "Tolerances" in md
    pngs = sorted((out / "figures").glob("*.png"))
    assert pngs
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000
        assert f"figures/{p.name}" in md
    return data, pngs


def test_small_ladder_end_to_end(tmp_path):
    rungs = ladder.select_rungs(ladder.QUICK_LADDER, ["cnn"], ["hessian", "ef"])
    assert [r.name for r in rungs] == ["fp64-dense"]
    rows_seen = []
    run = ladder.run_ladder(rungs, on_row=rows_seen.append, progress=False)
    assert run.passed and len(rows_seen) == len(run.rows)
    data, pngs = _check_report(tmp_path, run) if report.write_report(run, tmp_path) else None
    statuses = {(r["operator"], r["method"]): r["status"] for r in data["rows"]}
    for op in ("hessian", "ef"):
        for m in ("dense", "eigsh", "lobpcg", "lanczos-full", "lanczos-selective",
                  "lanczos-partial", "lanczos-none", "lanczos-bf16-basis"):
            assert statuses[(op, m)] == "pass"
        assert statuses[(op, "lanczos-none-no-cw")] == "caught"
    assert statuses[("ef", "gram")] == "pass"
    kinds = {p.name.split("_")[0] for p in pngs}
    assert kinds == {"spectrum", "convergence", "density"}
    table = report.compact_markdown_table(data["rows"]).splitlines()
    assert table[0] == "| model | operator | method | dtype | rel. error | matvecs | status |"
    assert len(table) == len(data["rows"]) + 2
    first = data["rows"][0]
    assert table[2].startswith(f"| cnn | hessian | {first['method']} | float64 | "
                               f"{first['rel_error']:.1e} | {first['matvecs']} |")


def test_select_rungs_validates_names():
    with pytest.raises(ValueError, match="unknown zoo model"):
        ladder.select_rungs(ladder.QUICK_LADDER, ["nope"])
    assert ladder.select_rungs(ladder.QUICK_LADDER, ["mlp"], ["fisher_mc"]) == []


@pytest.mark.slow
def test_quick_ladder_end_to_end(tmp_path):
    run = ladder.run_ladder(ladder.QUICK_LADDER, progress=False)
    assert run.passed, [r for r in run.rows if r["status"] in ("fail", "error")]
    data, _ = _check_report(tmp_path, run) if report.write_report(run, tmp_path, quick=True) \
        else None
    ops = {(r["model"], r["operator"]) for r in data["rows"] if r["rung"] == "fp64-dense"}
    assert ops == {(m, o) for m in ("mlp", "cnn") for o in ("hessian", "ggn", "ef")}
    assert {r["rung"] for r in data["rows"]} >= {"noisy", "fp64-inexact"}
    assert any(r["dtype"] == "bfloat16" and r["status"] == "pass" for r in data["rows"])


# --- the accuracy-contract rungs --------------------------------------------------------------
def test_noisy_operator_carries_the_stated_relative_noise():
    problem = zoo.build_problem("noisy-spectrum", torch.float64)
    op = problem.operator("noise-1e-05")
    v = torch.randn(op.shape[0], 3, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    exact = problem.matrix @ v
    err = torch.linalg.vector_norm(op.matmat(v) - exact, dim=0) / torch.linalg.vector_norm(
        exact, dim=0)
    assert torch.all((err > 0.8e-5) & (err < 1.2e-5))
    assert not torch.equal(op.matvec(v[:, 0]), op.matvec(v[:, 0]))  # fresh noise each time
    np.testing.assert_allclose(problem.eigenvalues[:10], np.linspace(1.0, 0.5, 10))
    with pytest.raises(ValueError, match="unknown operator"):
        problem.operator("ggn")
    with pytest.raises(ValueError, match="unknown zoo model"):
        zoo.build_problem("nope", torch.float64)


def test_float32_layernorm_makes_a_float64_model_float32_accurate():
    inexact = zoo.build("mlp-fp32-norm")
    exact = zoo.build("mlp-fp32-norm")
    exact.model[1].forward = lambda x, norm=exact.model[1].norm: norm(x)  # float64 norm
    v = torch.randn(inexact.num_params, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    a, b = inexact.operator("ggn") @ v, exact.operator("ggn") @ v
    rel = float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))
    assert 1e-10 < rel < 1e-5  # float32 round-off, not float64's


def test_wrong_and_converged_counts_only_flagged_wrong_values():
    ref = np.array([1.0, 0.9, 0.8])
    ghost = np.array([1.0, 1.0, 0.9])
    assert cc.wrong_and_converged(ref.copy(), None, ref, 3, 1e-6) == 0
    assert cc.wrong_and_converged(ghost, np.array([True, False, False]), ref, 3, 1e-6) == 0
    assert cc.wrong_and_converged(ghost, np.array([True, True, False]), ref, 3, 1e-6) == 1
    assert cc.wrong_and_converged(ghost, None, ref, 3, 1e-6) == 2
    # a missed value moves the next one into its rank: flagged converged, it is wrong there
    assert cc.wrong_and_converged(np.array([1.0, 0.8]), np.array([True, True]), ref, 3,
                                  1e-6) == 1
    assert cc.wrong_and_converged(ghost, np.array([True, True, True]), ref, 3, 0.2) == 0


def test_contract_verdicts_accept_honest_rows_only(mlp_problem):
    op = mlp_problem.operator("ggn")
    exact = _dense_top(op, 3)
    ghost = np.array([exact[0], exact[0] * (1 - 1e-9), exact[1]])

    def runner(name, flags, control=False):
        return cc.MethodRunner(
            name, "", {"float64": 1e-8}, lambda c: None,
            lambda ctx: cc.MethodOutcome(ghost, converged=np.array(flags)),
            expected_to_fail=control)

    methods = ("dense", runner("honest", [True, False, False]),
               runner("liar", [True, True, False]),
               runner("control-liar", [True, True, True], control=True),
               runner("control-honest", [True, False, False], control=True))
    res = cc.cross_check(op, 3, methods=methods, accept_unconverged=True, tolerance=1e-6)
    rows = {r["method"]: r for r in res.rows}
    assert rows["honest"]["status"] == "unconverged" and rows["honest"]["passed"] is True
    assert rows["honest"]["converged"] == 1 and rows["honest"]["tolerance"] == 1e-6
    assert rows["liar"]["status"] == "fail" and not res.passed
    assert rows["control-liar"]["status"] == "caught"
    assert rows["control-honest"]["status"] == "uncaught"
    plain = cc.cross_check(op, 3, methods=methods[:2])  # without the contract: a failure
    assert plain.rows[1]["status"] == "fail"


def _contract_rows(rung_name, models=None, operators=None):
    rungs = [r for r in ladder.QUICK_LADDER if r.name == rung_name]
    rungs = ladder.select_rungs(rungs, models, operators)
    run = ladder.run_ladder(rungs, progress=False)
    return run, {(r["model"], r["operator"], r["method"]): r for r in run.rows}


def test_noisy_rung_is_right_or_flagged_and_catches_the_unguarded_control():
    run, rows = _contract_rows("noisy")
    assert run.passed, [r for r in run.rows if r["status"] in ("fail", "error")]
    for delta in zoo.NOISE_LEVELS:
        name = zoo.noise_operator_name(delta)
        for strategy in ("full", "selective", "partial", "none"):
            row = rows[("noisy-spectrum", name, f"lanczos-{strategy}")]
            assert row["tolerance"] == pytest.approx(ladder.CONTRACT_FACTOR * delta)
            assert row["status"] in ("pass", "unconverged"), row
            if delta < 1e-3:  # moderate noise: every strategy converges, within the contract
                assert row["status"] == "pass" and row["converged"] == 5, row
    caught = rows[("noisy-spectrum", "noise-1e-03", "lanczos-unguarded")]
    assert caught["status"] == "caught" and caught["rel_error"] > 0.1


@pytest.mark.hf
def test_fp64_inexact_rung_on_llama_and_fp32_norm_mlp():
    pytest.importorskip("transformers")
    run, rows = _contract_rows("fp64-inexact")
    assert run.passed, [r for r in run.rows if r["status"] in ("fail", "error")]
    for model in ("mlp-fp32-norm", "llama-tiny"):
        assert rows[(model, "ggn", "dense")]["status"] == "pass"
        for strategy in ("full", "selective", "partial", "none"):
            row = rows[(model, "ggn", f"lanczos-{strategy}")]
            assert row["status"] == "pass" and row["rel_error"] < 6e-7, row
