"""Writing a validation run: Markdown tables, a JSON file of rows, and PNG figures.

``DIR/results.json`` is ``{"schema": ..., "meta": {...}, "rows": [...]}`` with one row per
(model, operator, method) (keys in :data:`ROW_KEYS`); ``DIR/report.md`` has the
tolerances, one table per rung, and links to the figures; ``DIR/figures/*.png`` are
made with matplotlib's Agg backend (the ``plot`` extra):

* ``spectrum_<rung>_<model>_<operator>.png`` — every method's top-k values overlaid;
* ``convergence_<rung>_<model>_<operator>.png`` — Ritz values per Lanczos iteration
  (full reorthogonalization, and the broken run with its ghosts when present), with
  the reference as dashed lines, and the error of each of the top-k values;
* ``density_<rung>_<model>_<operator>.png`` — the SLQ spectral density, over the
  histogram of the dense spectrum when there is one.

Every file is written atomically (a temporary file in the same folder, then
``os.replace``), and the files of a previous report in the folder are removed first, so
an interrupted run leaves no truncated file and no stale report beside new figures.
``report.md`` is written last: its presence means the report is complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import secrets
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from curvops.linops.dtypes import dtype_name

from .crosscheck import BROKEN_METHOD, METHODS, UNGUARDED_METHOD, MethodRunner
from .ladder import CheckRecord, LadderRun

__all__ = ["ROW_KEYS", "compact_markdown_table", "format_row", "json_ready",
           "markdown_table", "prepare_output_folder", "write_report"]

SCHEMA = "curvops.validation/1"
ROW_KEYS = (
    "rung", "model", "operator", "method", "dtype", "n", "k", "eigenvalues", "reference",
    "rel_error", "tolerance", "residual_max", "ghosts_removed", "iterations", "matvecs",
    "seconds", "peak_mb", "converged", "passed", "status", "note",
)
_TABLE_COLUMNS = ("model", "operator", "method", "dtype", "n", "k", "λ₁", "rel. error", "tol",
                  "residual", "ghosts", "matvecs", "seconds", "peak MB", "status")


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def _cells(row: dict[str, Any]) -> list[str]:
    lam1 = row["eigenvalues"][0] if row.get("eigenvalues") else None
    status = row["status"]
    return [row["model"], row["operator"], row["method"], row["dtype"], str(row["n"]),
            str(row["k"]), _fmt(lam1, ".6g"), _fmt(row["rel_error"], ".1e"),
            _fmt(row["tolerance"], ".0e"), _fmt(row["residual_max"], ".1e"),
            _fmt(row["ghosts_removed"], "d"), _fmt(row["matvecs"], "d"),
            _fmt(row["seconds"], ".2f"), _fmt(row["peak_mb"], ".1f"),
            f"**{status}**" if status in ("fail", "error") else status]


def format_row(row: dict[str, Any]) -> str:
    """One row as a fixed-width console line."""
    c = _cells(row)
    status = c[-1].strip("*")
    return (f"{row.get('rung', ''):<22} {c[0]:<10} {c[1]:<9} {c[2]:<19} {c[3]:<8} "
            f"n={c[4]:<7} λ₁={c[6]:<12} err={c[7]:<8} tol={c[8]:<6} mv={c[11]:<5} "
            f"{c[12]:>7}s  {status}")


_COMPACT_COLUMNS = ("model", "operator", "method", "dtype", "rel. error", "matvecs", "status")


def compact_markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a short Markdown table for a README (the :data:`_COMPACT_COLUMNS`)."""
    lines = ["| " + " | ".join(_COMPACT_COLUMNS) + " |",
             "|" + "|".join(" --- " for _ in _COMPACT_COLUMNS) + "|"]
    for row in rows:
        cells = [row["model"], row["operator"], row["method"], row["dtype"],
                 _fmt(row["rel_error"], ".1e"), _fmt(row["matvecs"], "d"), row["status"]]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a GitHub Markdown table (the columns of :data:`_TABLE_COLUMNS`)."""
    lines = ["| " + " | ".join(_TABLE_COLUMNS) + " |",
             "|" + "|".join(" --- " for _ in _TABLE_COLUMNS) + "|"]
    for row in rows:
        cells = [c.replace("|", "\\|") for c in _cells(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def json_ready(x: Any, *, nan: str | None = None) -> Any:
    """A JSON-ready copy of ``x``: the one converter of every report curvops writes.

    Dicts (keys as strings), lists and tuples recursively; numpy arrays and scalars and
    torch tensors to Python numbers and lists; torch dtypes to their names; ``±inf`` to
    ``"inf"``/``"-inf"``; NaN to ``nan`` (None, JSON's null, by default); anything else
    that JSON has no type for to its ``str``.
    """
    if isinstance(x, dict):
        return {str(k): json_ready(v, nan=nan) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v, nan=nan) for v in x]
    if isinstance(x, np.ndarray):
        return json_ready(x.tolist(), nan=nan)
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return json_ready(x.item(), nan=nan)
    if isinstance(x, torch.Tensor):
        return json_ready(x.detach().cpu().tolist(), nan=nan)
    if isinstance(x, torch.dtype):
        return dtype_name(x)
    if isinstance(x, float) and not math.isfinite(x):
        return nan if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def _meta(run: LadderRun, quick: bool) -> dict[str, Any]:
    return {
        "quick": quick, "seconds": run.seconds, "passed": run.passed,
        "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
        "rungs": [{"name": r.name, "description": r.description,
                   "dtype": dtype_name(r.dtype), "models": list(r.models),
                   "operators": list(r.operators), "k": r.k} for r in run.rungs],
        "skipped_models": run.skipped_models,
    }


# --- files --------------------------------------------------------------------------------
_FIGURE_PREFIXES = ("spectrum_", "convergence_", "density_")
_TEMP_SUFFIX = ".curvops-tmp"


def prepare_output_folder(out_dir: str | Path) -> Path:
    """Create ``out_dir`` if needed and check that a file can be written there.

    Called before a run, so that a bad ``--out`` fails at once rather than after the run.

    Raises:
        OSError: When the folder cannot be created (a file in the way, no permission) or is
            not writable.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=out):  # a real write: os.access misjudges some mounts
        pass
    return out


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it on success and vanishes on error.

    A write interrupted at any point (Ctrl-C included) leaves ``path`` as it was.
    """
    # Not mkstemp: its files are private (0600), and os.replace would keep that mode.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{_TEMP_SUFFIX}")
    tmp.touch(exist_ok=False)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_text(path: Path, text: str) -> None:
    with _replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _remove_previous_report(out: Path) -> None:
    """Delete the files a previous report left in ``out`` (only the names reports use)."""
    (out / "report.md").unlink(missing_ok=True)  # first: the index of a complete report
    (out / "results.json").unlink(missing_ok=True)
    fig_dir = out / "figures"
    stale = [*out.glob(f".*{_TEMP_SUFFIX}")]  # left by a killed process (no cleanup ran)
    if fig_dir.is_dir():
        stale += fig_dir.glob(f".*{_TEMP_SUFFIX}")
        stale += [p for p in fig_dir.glob("*.png") if p.name.startswith(_FIGURE_PREFIXES)]
    for p in stale:
        p.unlink(missing_ok=True)


# --- figures --------------------------------------------------------------------------------
def _pyplot() -> Any:
    try:
        import matplotlib  # optional: the plot extra
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("figures need matplotlib: pip install 'curvops[plot]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: the plot extra

    return plt


def _slug(*parts: str) -> str:
    text = "_".join(parts)
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in text).strip("-")


def _title(rec: CheckRecord) -> str:
    return f"{rec.model} · {rec.operator} · {rec.dtype} (n={rec.n})"


def _save_figure(plt: Any, fig: Any, path: Path) -> None:
    """Save ``fig`` as a PNG at ``path`` atomically and close it."""
    try:
        with _replacing(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)


def _spectrum_figure(plt: Any, rec: CheckRecord, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    rows = [r for r in rec.result.rows if r.get("eigenvalues")]
    markers = "os^vD<>ph*xP"
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        vals = np.asarray(row["eigenvalues"])
        x = np.arange(1, vals.size + 1) - 0.4 + (i + 0.5) * width
        ax.plot(x, vals, linestyle="none", marker=markers[i % len(markers)], markersize=5,
                label=f"{row['method']} ({row['status']})")
    ref = rec.result.reference
    if ref is not None:
        for j, v in enumerate(np.asarray(ref.eigenvalues)[: rec.result.rows[0]["k"]]):
            ax.hlines(v, j + 0.55, j + 1.45, colors="k", linewidth=0.8,
                      label=f"reference: {ref.source}" if j == 0 else None)
    ax.set_xlabel("index i (descending)")
    ax.set_ylabel("λᵢ")
    ax.set_title(f"top eigenvalues by method — {_title(rec)}", fontsize=9)
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    _save_figure(plt, fig, path)


def _convergence_figure(plt: Any, rec: CheckRecord, path: Path) -> bool:
    outcomes = rec.result.outcomes
    runs = [(name, outcomes[name].history) for name in
            ("lanczos-full", "lanczos-none-no-cw", "lanczos-selective")
            if name in outcomes and outcomes[name].history]
    if not runs:
        return False
    k = rec.result.rows[0]["k"]
    ref = rec.result.reference
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.0))
    for (name, hist), style in zip(runs[:2], ("-", ":")):
        top = np.full((len(hist), k), np.nan)
        for j, theta in enumerate(hist):
            vals = np.sort(np.asarray(theta))[::-1][:k]
            top[j, : vals.size] = vals
        it = np.arange(1, len(hist) + 1)
        for i in range(k):
            axes[0].plot(it, top[:, i], style, linewidth=1.2,
                         label=f"{name} θ{i + 1}" if i < 2 else None)
            if ref is not None and i < len(ref.eigenvalues):
                err = np.abs(top[:, i] - ref.eigenvalues[i]) / max(abs(ref.eigenvalues[0]),
                                                                    1e-300)
                axes[1].semilogy(it, np.maximum(err, 1e-17), style, linewidth=1.2,
                                 label=f"{name} i={i + 1}")
    if ref is not None:
        for v in np.asarray(ref.eigenvalues)[:k]:
            axes[0].axhline(v, color="k", linestyle="--", linewidth=0.6)
    axes[0].set_xlabel("Lanczos iteration")
    axes[0].set_ylabel("top-k Ritz values")
    axes[0].legend(fontsize=6)
    axes[1].set_xlabel("Lanczos iteration")
    axes[1].set_ylabel("|θᵢ − λᵢ| / |λ₁|")
    axes[1].legend(fontsize=5, ncol=2)
    fig.suptitle(f"Ritz-value convergence — {_title(rec)} (dashed: reference)", fontsize=9)
    fig.tight_layout()
    _save_figure(plt, fig, path)
    return True


def _density_figure(plt: Any, rec: CheckRecord, path: Path) -> bool:
    if rec.density is None:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    dense = rec.result.outcomes.get("dense")
    if dense is not None and dense.all_eigenvalues is not None:
        ax.hist(dense.all_eigenvalues, bins=60, density=True, alpha=0.35, color="gray",
                label="dense spectrum (histogram)")
    ax.plot(rec.density["grid"], rec.density["density"], linewidth=1.4,
            label=f"SLQ, 4 probes ({rec.density['matvecs']} matvecs)")
    ax.set_xlabel("λ")
    ax.set_ylabel("density")
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_title(f"spectral density — {_title(rec)}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save_figure(plt, fig, path)
    return True


def write_figures(run: LadderRun, out_dir: Path) -> list[Path]:
    """Write every figure of ``run`` under ``out_dir/figures``; returns the paths."""
    plt = _pyplot()
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for rec in run.records:
        stem = _slug(rec.rung.replace(" (fp32 ref)", "-fp32ref"), rec.model, rec.operator)
        p = fig_dir / f"spectrum_{stem}.png"
        _spectrum_figure(plt, rec, p)
        paths.append(p)
        p = fig_dir / f"convergence_{stem}.png"
        if _convergence_figure(plt, rec, p):
            paths.append(p)
        p = fig_dir / f"density_{stem}.png"
        if _density_figure(plt, rec, p):
            paths.append(p)
    return paths


# --- the report -----------------------------------------------------------------------------
def _tolerance_table(methods: Sequence[MethodRunner]) -> str:
    lines = ["| method | what it is | float64 | float32 | bfloat16 |",
             "| --- | --- | --- | --- | --- |"]
    for m in methods:
        tol = [_fmt(m.tolerances.get(d), ".0e") for d in ("float64", "float32", "bfloat16")]
        lines.append(f"| {m.name} | {m.description} | " + " | ".join(tol) + " |")
    return "\n".join(lines)


def write_report(run: LadderRun, out_dir: str | Path, *, quick: bool = False,
                 figures: bool = True) -> dict[str, Any]:
    """Write ``report.md``, ``results.json`` and the figures of ``run`` into ``out_dir``.

    The files of a previous report in ``out_dir`` are removed first; every file is written
    atomically, ``report.md`` last.

    Returns:
        ``{"report": path, "results": path, "figures": [paths]}``.

    Raises:
        OSError: When ``out_dir`` cannot be created or written.
    """
    out = prepare_output_folder(out_dir)
    _remove_previous_report(out)
    rows = [{key: row.get(key) for key in ROW_KEYS} for row in run.rows]
    results_path = out / "results.json"
    _write_text(results_path, json.dumps(json_ready(
        {"schema": SCHEMA, "meta": _meta(run, quick), "rows": rows}), indent=1))
    fig_paths = write_figures(run, out) if figures else []

    used = {row["method"] for row in rows}
    runners = [m for m in [*METHODS.values(), BROKEN_METHOD, UNGUARDED_METHOD]
               if m.name in used]
    counts = {s: sum(r["status"] == s for r in rows)
              for s in ("pass", "unconverged", "caught", "uncaught", "fail", "error",
                        "skipped", "unchecked")}
    md = [
        "# curvops validation report",
        "",
        f"{'Quick run' if quick else 'Full run'}: {len(run.records)} cross-checks, "
        f"{len(rows)} rows in {run.seconds:.1f} s "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads). "
        f"**{'ALL PASSED' if run.passed else 'FAILURES'}** — "
        + ", ".join(f"{v} {s}" for s, v in counts.items() if v) + ".",
        "",
        "The relative error compares the top-k list with the reference element by element, "
        "`max_i |λ_i − λ_i^ref| / max_i |λ_i^ref|` (descending order), so a ghost copy of "
        "λ₁ shifts λ₂… and fails. The reference method's own row is checked against the next "
        "reference. `caught`: a deliberately broken method (Lanczos without "
        "reorthogonalization and without the Cullum–Willoughby filter) that the check "
        "rejected, as it must; `uncaught`: it happened to be right because no ghost formed "
        "(e.g. a low-rank operator on which Lanczos ends before orthogonality is lost). "
        "On the accuracy-contract rungs (`noisy`, `fp64-inexact`: operators less exact "
        "than their dtype) the tolerance is 5 δ for products of relative accuracy δ, and "
        "`unconverged` is an honest row: every value outside the tolerance is flagged not "
        "converged by the solver; a wrong value flagged converged fails the row, and the "
        "unguarded control (`lanczos-unguarded`) is `caught` when it returns one. "
        "`residual` is ‖Ay − θy‖ (for `lanczos-none`: the bound "
        "β|eₘᵀs|). `peak MB` is the peak resident memory added on the CPU (a lower bound, "
        "sampled every 5 ms) or the CUDA peak.",
        "",
        "## Rungs",
        "",
    ]
    for r in run.rungs:
        md.append(f"- **{r.name}** ({str(r.dtype)[6:]}, k={r.k}): {r.description}; models "
                  f"{', '.join(r.models)}; operators {', '.join(r.operators)}.")
    for model, why in run.skipped_models.items():
        md.append(f"- skipped model {model}: {why}")
    md += ["", "## Tolerances (relative error of the top-k list)", "", _tolerance_table(runners),
           ""]
    for rung_name in dict.fromkeys(rec.rung for rec in run.records):
        md += [f"## {rung_name}", "",
               markdown_table([row for rec in run.records if rec.rung == rung_name
                               for row in rec.result.rows]), ""]
    notes = [(row["model"], row["operator"], row["method"], row["note"]) for row in rows
             if row["note"] and row["status"] in ("skipped", "fail", "error", "unchecked")]
    if notes:
        md += ["## Notes on skipped and failed rows", ""]
        md += [f"- {m} / {o} / {meth}: {note}" for m, o, meth, note in notes]
        md.append("")
    if fig_paths:
        md += ["## Figures", ""]
        for p in fig_paths:
            md.append(f"![{p.stem}](figures/{p.name})")
        md.append("")
    report_path = out / "report.md"
    _write_text(report_path, "\n".join(md))
    return {"report": report_path, "results": results_path, "figures": fig_paths}
