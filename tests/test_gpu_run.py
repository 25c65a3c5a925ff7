"""The GPU validation run, run here in its CPU smoke mode.

The smoke mode runs every section of ``curvops.validation.gpu_run`` with tiny shapes: the
same code paths as on the GPU except the CUDA-only ones (cupy, CUDA memory figures), which
must be recorded as skipped.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from curvops.solvers import LanczosConfig, lanczos
from curvops.solvers.memory_estimate import lanczos_memory_bytes
from curvops.validation import gpu_run
from curvops.validation.crosscheck import DEFAULT_METHODS
from curvops.validation.gpu_run import estimates, section_scale_ladder
from curvops.validation.gpu_run.settings import SMOKE_LADDER


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-smoke")
    data = gpu_run.main(["--smoke", "--out", str(out)])
    files = list(out.glob("gpu-*.json"))
    assert len(files) == 1
    return data, json.loads(files[0].read_text()), files[0]


@pytest.mark.hf
def test_smoke_writes_every_section_with_versions_and_settings(smoke):
    data, written, path = smoke
    assert path.name == "gpu-cpu-smoke.json"
    assert written["schema"] == gpu_run.SCHEMA and written["status"] == "complete"
    env = written["environment"]
    for key in ("python", "torch", "cuda_torch_built_with", "transformers", "scipy", "numpy",
                "cupy"):
        assert key in env
    assert env["device"]["name"] == "cpu" and env["transformers"]
    settings = written["settings"]
    assert settings["smoke"] is True and settings["budget_s"] == 540.0
    assert [m["name"] for m in settings["ladder"]] == [m["name"] for m in
                                                       written["sections"]["scale_ladder"]["models"]]
    assert {name: sec["status"] for name, sec in written["sections"].items()} == {
        "crosscheck": "done", "matvec_cost": "done", "scale_ladder": "done"}
    assert written["elapsed_s"] < 60


@pytest.mark.hf
def test_smoke_crosscheck_rows_are_the_crosscheck_rows(smoke):
    _, written, _ = smoke
    sec = written["sections"]["crosscheck"]
    assert sec["cases"] and all(c["status"] == "done" and c["passed"] for c in sec["cases"])
    rows = {r["method"]: r for r in sec["rows"]}
    assert set(rows) == set(DEFAULT_METHODS)
    assert rows["cupy-eigsh"]["status"] == "skipped" and "CUDA" in rows["cupy-eigsh"]["note"]
    assert rows["eigsh"]["status"] == "pass" and rows["eigsh"]["rel_error"] < 1e-8


@pytest.mark.hf
def test_smoke_matvec_cost_has_ratios_and_skips_cupy(smoke):
    _, written, _ = smoke
    sec = written["sections"]["matvec_cost"]
    assert sec["cupy"].startswith("skipped: no CUDA/cupy")
    for kind in ("matvec", "matmat8"):
        entry = sec[kind]
        assert set(entry["wall_s_median"]) == {"torch", "scipy"}
        assert entry["ratios_wall"]["scipy_over_torch"] > 0
        assert entry["max_rel_diff_vs_torch"]["scipy"] < 1e-6  # the same product
        assert len(entry["wall_s_all"]["torch"]) == entry["reps"] >= 1


@pytest.mark.hf
def test_smoke_ladder_strategies_agree(smoke):
    _, written, _ = smoke
    models = written["sections"]["scale_ladder"]["models"]
    assert {m["status"] for m in models} == {"done"}
    dtypes = set()
    for m in models:
        spec = next(s for s in SMOKE_LADDER if s.name == m["name"])
        assert m["n_params"] > 0 and m["product"][m["dtype"]]["cached_s"] > 0
        cases = m["cases"]
        assert [c["strategy"] for c in cases if c["dtype"] == m["dtype"]] == list(spec.strategies)
        for c in cases:
            assert c["status"] == "ok", c
            assert c["all_converged"] and len(c["eigenvalues"]) == c["k"]
            assert c["matvecs"] >= c["iterations"] >= c["k"] and c["seconds"] > 0
            assert c["eigenvalues"] == sorted(c["eigenvalues"], reverse=True)
            assert c["verified"] and c["process_eps"] > 0
            if c["strategy"] != "none":  # the estimate that caps a basis covers the ledger
                assert c["solver_estimate_covers_peak"], c
            dtypes.add(c["dtype"])
        # Every pair of strategies, not only each against the reference.
        vals = [np.array(c["eigenvalues"]) for c in cases if c["dtype"] == m["dtype"]]
        tol = m["agreement"]["tolerance"]
        for a in vals:
            for b in vals:
                assert np.max(np.abs(a - b)) / np.max(np.abs(b)) <= tol
        assert len(m["agreement"]["strategies"]) == len(spec.strategies) - 1
        assert all(r["agree"] and r["both_converged"] for r in m["agreement"]["strategies"])
        if spec.compare_dtype is not None:
            assert m["agreement"]["dtype"] and all(r["agree"] for r in m["agreement"]["dtype"])
    assert {"float32", "bfloat16"} <= dtypes  # one tiny bf16 case against float32


@pytest.mark.hf
def test_smoke_prints_a_markdown_summary(tmp_path, capsys):
    gpu_run.main(["--smoke", "--out", str(tmp_path), "--sections", "matvec_cost"])
    text = capsys.readouterr().out
    assert "| product | torch ms | cupy ms | scipy ms | cupy/torch | scipy/torch |" in text
    written = json.loads((tmp_path / "gpu-cpu-smoke.json").read_text())
    assert written["sections"]["scale_ladder"]["status"] == "skipped: not selected"


def test_small_budget_skips_instead_of_overrunning(tmp_path):
    data = gpu_run.main(["--smoke", "--out", str(tmp_path), "--budget-s", "1",
                         "--sections", "crosscheck,scale_ladder"])
    assert data["status"] == "complete"
    assert data["sections"]["crosscheck"]["cases"][0]["status"] == "skipped: budget"
    assert {m["status"] for m in data["sections"]["scale_ladder"]["models"]} == {
        "skipped: budget"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the exit code of a run without CUDA")
def test_command_line_without_cuda_records_why_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "curvops.validation.gpu_run", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA device" in proc.stderr
    written = json.loads((tmp_path / "gpu-cpu.json").read_text())
    assert written["status"] == "error: no CUDA device (use --smoke on a CPU)"
    assert written["settings"]["smoke"] is False


def test_watchdog_writes_partial_results_and_exits_at_the_deadline(tmp_path):
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from curvops.validation.gpu_run.record import Recorder, Watchdog
        data = {{"_t0": time.monotonic(), "status": "running", "sections": {{}}}}
        rec = Recorder(Path({str(tmp_path)!r}) / "gpu-x.json", data)
        with rec.change():
            data["sections"]["a"] = {{"status": "done", "value": 1}}
            data["sections"]["b"] = {{"status": "running", "cases": [{{"status": "running"}}]}}
        Watchdog(time.monotonic() + 0.5, rec, lambda: print("SUMMARY")).start()
        time.sleep(30)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == gpu_run.EXIT_TIMEOUT, proc.stderr
    assert "SUMMARY" in proc.stdout
    written = json.loads((tmp_path / "gpu-x.json").read_text())
    assert written["status"] == "timeout: budget"
    assert written["sections"]["a"] == {"status": "done", "value": 1}
    assert written["sections"]["b"]["status"] == "timeout: budget"
    assert written["sections"]["b"]["cases"][0]["status"] == "timeout: budget"


@pytest.mark.parametrize("strategy", ["full", "selective", "partial", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_solver_memory_estimate_covers_the_solvers_own_ledger(strategy, dtype):
    n, k, iters = 300, 4, 40
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    A = ((Q * torch.logspace(0, -3, n, dtype=torch.float64)) @ Q.T).to(dtype)
    res = lanczos(A, config=LanczosConfig(k=k, max_iters=iters, tol=0, reorth=strategy,
                                          return_eigenvectors=False))
    est = lanczos_memory_bytes(n, strategy, dtype, dtype, iters, k)
    assert est["total"] >= res.peak_memory_bytes


def test_iteration_caps_shrink_with_memory_and_time():
    n = 10**8
    bf16 = torch.bfloat16
    caps = [estimates.fit_iters(n, "full", bf16, 150, 10, g * 2**30) for g in (10, 40, 80)]
    assert caps == sorted(caps) and caps[0] < caps[-1] <= 150
    assert estimates.fit_iters(n, "full", bf16, 150, 10, 1.0) == 0
    est = lanczos_memory_bytes(n, "full", bf16, bf16, caps[-1], 10)["total"]
    assert est <= 80 * 2**30
    cuda = torch.device("cuda")
    fast = estimates.iters_in_time(10.0, n, "none", bf16, 0.01, cuda, 10**6)
    slow = estimates.iters_in_time(10.0, n, "full", bf16, 0.01, cuda, 10**6)
    assert fast == int(10.0 / 0.012) and 0 < slow < fast
    assert estimates.iters_in_time(-1.0, n, "none", bf16, 0.01, cuda, 100) == 0


@pytest.mark.hf
def test_an_out_of_memory_case_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    real = section_scale_ladder.lanczos

    def lanczos_oom_for_selective(A, k=None, *, config=None, v0=None):
        if config.strategy == "selective":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")
        return real(A, k, config=config, v0=v0)

    monkeypatch.setattr(section_scale_ladder, "lanczos", lanczos_oom_for_selective)
    data = gpu_run.main(["--smoke", "--out", str(tmp_path), "--sections", "scale_ladder",
                         "--models", "gpt2-smoke"])
    (model,) = data["sections"]["scale_ladder"]["models"]
    status = {c["strategy"]: c["status"] for c in model["cases"]}
    assert status == {"full": "ok", "restarted": "ok", "selective": "OOM", "partial": "ok",
                      "none": "ok"}
    oom = next(c for c in model["cases"] if c["strategy"] == "selective")
    assert "Tried to allocate 12.00 GiB" in oom["error"] and "memory_at_failure" in oom
    assert [r["strategy"] for r in model["agreement"]["strategies"]] == [
        "restarted", "partial", "none"]
    assert model["status"] == "done" and data["status"] == "complete"
