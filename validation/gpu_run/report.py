"""The run's Markdown summary: compact tables of every section, read off the recorded JSON."""

from __future__ import annotations

from typing import Any

from ..report import compact_markdown_table
from .device import GIB

__all__ = ["count_text", "summary_markdown"]


def _g(x: Any, spec: str = ".4g") -> str:
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    return format(x, spec)


def count_text(count: int | None) -> str:
    """A parameter count as ``"4.3 k"``, ``"124.4 M"`` or ``"1.54 B"`` (``"–"`` for none)."""
    if not count:
        return "–"
    if count >= 1e9:
        return f"{count / 1e9:.2f} B"
    return f"{count / 1e6:.1f} M" if count >= 1e6 else f"{count / 1e3:.1f} k"


def _crosscheck_lines(cc: dict[str, Any]) -> list[str]:
    lines = ["### Cross-check on the device", ""]
    rows = cc.get("rows", [])
    lines.append(compact_markdown_table(rows) if rows else "(no rows)")
    skipped = [f"{c['model']}/{c['dtype']}/{c['operator']}: {c['status']}"
               for c in cc.get("cases", []) if c.get("status") not in ("done",)]
    if skipped:
        lines += ["", "Not run: " + "; ".join(skipped)]
    return lines + [""]


def _matvec_lines(mv: dict[str, Any]) -> list[str]:
    lines = [f"### Product cost by view ({mv.get('model')}, n = {mv.get('n')}, fp32 GGN)",
             "", "| product | torch ms | cupy ms | scipy ms | cupy/torch | scipy/torch |",
             "| --- | --- | --- | --- | --- | --- |"]
    for kind in ("matvec", "matmat8"):
        e = mv.get(kind)
        if not e:
            continue
        med, rat = e["wall_s_median"], e["ratios_wall"]

        def ms(name: str, med: dict[str, float] = med) -> str:
            return _g(med[name] * 1e3, ".3g") if name in med else "skipped"

        lines.append(f"| {kind} | {ms('torch')} | {ms('cupy')} | {ms('scipy')} | "
                     f"{_g(rat.get('cupy_over_torch'), '.2f')} | "
                     f"{_g(rat.get('scipy_over_torch'), '.2f')} |")
    if mv.get("cupy") != "ok":
        lines += ["", f"cupy: {mv.get('cupy')}"]
    return lines + [""]


def _ladder_lines(sl: dict[str, Any]) -> list[str]:
    lines = ["### Scale ladder: top-k eigenvalues of the exact Fisher/GGN", "",
             "| model | params | dtype | strategy | status | λ₁ | λ_k | conv. | iters | "
             "matvecs | s | s/matvec | peak GiB | vs ref. strategy | vs other dtype |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
             "| --- | --- |"]
    for m in sl.get("models", []):
        params = count_text(m.get("n_params"))
        if not m.get("cases"):
            lines.append(f"| {m['name']} | {params} | {m.get('dtype')} | – | "
                         f"{m.get('status')} | " + " | ".join(["–"] * 10) + " |")
        for c in m.get("cases", []):
            ev = c.get("eigenvalues") or []
            conv = c.get("converged") or []
            peak = c.get("max_memory_allocated_bytes")
            if peak is None:  # CPU: the sampled resident-set peak above the start
                peak = c.get("peak_above_before_bytes")
            if peak is None:
                peak = (c.get("memory_at_failure") or {}).get("max_allocated_bytes")
            lines.append(
                f"| {m['name']} | {params} | {c['dtype']} | {c['strategy']} | "
                f"{c['status']} | {_g(ev[0] if ev else None)} | "
                f"{_g(ev[-1] if ev else None)} | "
                f"{sum(conv)}/{len(conv) if conv else c.get('k')} | "
                f"{_g(c.get('iterations'), 'd')} | {_g(c.get('matvecs'), 'd')} | "
                f"{_g(c.get('seconds'), '.2f')} | {_g(c.get('seconds_per_matvec'), '.3g')} | "
                f"{_g(peak / GIB if peak is not None else None, '.2f')} | "
                f"{_g(c.get('rel_diff_vs_reference'), '.1e')} | "
                f"{_g(c.get('rel_diff_vs_compare_dtype'), '.1e')} |")
    return lines + [""]


def summary_markdown(data: dict[str, Any]) -> str:
    """Compact Markdown tables of every section (what the run prints at the end)."""
    env = data.get("environment", {})
    lines = [f"## curvops GPU run: {env.get('device', {}).get('name')} "
             f"(torch {env.get('torch')}, CUDA {env.get('cuda_torch_built_with')}, "
             f"cupy {env.get('cupy')}) — {data.get('status')}, {data.get('elapsed_s', 0):.0f} s",
             ""]
    sec = data.get("sections", {})
    for name, body in sec.items():
        if str(body.get("status", "")).startswith("skipped") or body.get("error"):
            lines += [f"{name}: {body.get('status')} {body.get('error', '')}".rstrip(), ""]
    cc = sec.get("crosscheck")
    if cc and cc.get("cases"):
        lines += _crosscheck_lines(cc)
    mv = sec.get("matvec_cost")
    if mv and ("matvec" in mv or "matmat8" in mv):
        lines += _matvec_lines(mv)
    sl = sec.get("scale_ladder")
    if sl and sl.get("models"):
        lines += _ladder_lines(sl)
    return "\n".join(lines)
