"""The settings of a GPU run: models, cases, sizes, tolerances, budget shares, command line.

The ladder's models, the cross-check cases and the sizes of a GPU run and of a smoke run,
and the command line that selects and resizes them. Everything that shapes a run is
recorded in its JSON (:meth:`Settings.as_dict`).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from curvops.linops.dtypes import dtype_name as linops_dtype_name

__all__ = [
    "CROSSCHECK_LANCZOS_TOL",
    "GPU_CROSSCHECK",
    "GPU_LADDER",
    "SECTIONS",
    "SMOKE_CROSSCHECK",
    "SMOKE_LADDER",
    "LadderSpec",
    "Settings",
    "dtype_name",
    "make_settings",
    "parse_args",
]

SECTIONS = ("crosscheck", "matvec_cost", "scale_ladder")
DESCRIPTION = "The GPU validation run: one process, one wall-clock budget, JSON after every step."
DEFAULT_BUDGET_S = 540.0  # a margin under the device tool's 600 s for the install and start-up


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """``torch.bfloat16`` → ``"bfloat16"`` (None stays None)."""
    return None if dtype is None else linops_dtype_name(dtype)


@dataclasses.dataclass(frozen=True)
class LadderSpec:
    """One model of the scale ladder.

    Attributes:
        name: Row label.
        family: ``"gpt2"``, ``"qwen2"`` or ``"llama"`` (the transformers classes).
        config: Keyword arguments of the transformers config class.
        dtype: The dtype of the main runs.
        strategies: Lanczos strategies of the main runs, in the order they run
            (``restarted``: full with a thick restart, see ``section_scale_ladder``).
        compare_dtype: The dtype of the comparison run of the same weights (None: none).
        compare_strategy: The strategy of the comparison run.
        max_iters: Iteration cap of every run (lowered to fit memory and time).
        weight: Share of the ladder's time budget.
    """

    name: str
    family: str
    config: dict[str, Any]
    dtype: torch.dtype
    strategies: tuple[str, ...]
    compare_dtype: torch.dtype | None = None
    compare_strategy: str = "none"
    max_iters: int = 150
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that shapes a run (recorded in the JSON)."""

    smoke: bool
    budget_s: float
    seed: int
    k: int
    batch: int
    seq: int
    reps: int
    crosscheck_share: float
    matvec_share: float
    crosscheck_cases: tuple[tuple[str, str, tuple[str, ...]], ...]
    matvec_model: str
    ladder: tuple[LadderSpec, ...]
    tol: dict[str, float]
    sections: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready settings."""
        out = dataclasses.asdict(self)
        out["ladder"] = [dict(dataclasses.asdict(s), dtype=dtype_name(s.dtype),
                              compare_dtype=dtype_name(s.compare_dtype)) for s in self.ladder]
        return out


_NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
GPU_LADDER = (
    LadderSpec("gpt2-small-124m", "gpt2",
               dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024,
                    use_cache=False, **_NO_DROPOUT),
               torch.bfloat16, ("full", "restarted", "selective", "partial", "none"),
               compare_dtype=torch.float32, compare_strategy="full", max_iters=150, weight=1.0),
    LadderSpec("qwen2.5-1.5b-shape", "qwen2",
               dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                    num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                    max_position_embeddings=32768, tie_word_embeddings=True,
                    use_sliding_window=False, use_cache=False),
               torch.bfloat16, ("none", "restarted", "full", "selective", "partial"),
               compare_dtype=torch.float32, compare_strategy="none", max_iters=150, weight=1.6),
    LadderSpec("llama-7b-shape", "llama",
               dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                    max_position_embeddings=4096, tie_word_embeddings=False, use_cache=False),
               torch.bfloat16, ("none",), compare_dtype=torch.float32, compare_strategy="none",
               max_iters=150, weight=1.4),
)
# Smoke: the same code on tiny shapes, float32 (bf16 is emulated on a CPU and far slower)
# except one tiny model that runs bf16 against float32 as the GPU ladder does.
SMOKE_LADDER = (
    LadderSpec("gpt2-smoke", "gpt2",
               dict(n_embd=16, n_layer=1, n_head=2, vocab_size=48, n_positions=16,
                    use_cache=False, **_NO_DROPOUT),
               torch.float32, ("full", "restarted", "selective", "partial", "none"), max_iters=80),
    LadderSpec("qwen2-smoke", "qwen2",
               dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=48,
                    max_position_embeddings=32, tie_word_embeddings=True,
                    use_sliding_window=False, use_cache=False),
               torch.float32, ("none", "full"), max_iters=80),
    LadderSpec("llama-smoke-bf16", "llama",
               dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2, vocab_size=16,
                    max_position_embeddings=16, tie_word_embeddings=False, use_cache=False),
               torch.bfloat16, ("full", "restarted", "none"), compare_dtype=torch.float32,
               compare_strategy="full", max_iters=60),
)
# (zoo model, dtype, operators) of the cross-check section.
GPU_CROSSCHECK = (
    ("mlp", "float64", ("ggn", "hessian")),
    ("gpt2-tiny", "float64", ("ggn",)),
    ("llama-tiny", "float32", ("ggn",)),
    ("gpt2-small", "float32", ("ggn",)),
    ("cnn", "float64", ("ggn",)),
    ("mlp", "float32", ("ggn",)),
    ("mlp", "float64", ("ef",)),
)
SMOKE_CROSSCHECK = (("mlp", "float64", ("ggn",)),)
# The cross-check's Lanczos tolerance per dtype of the cross-check cases.
CROSSCHECK_LANCZOS_TOL = {"float64": 1e-10, "float32": 1e-8}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line of ``python -m curvops.validation.gpu_run``."""
    p = argparse.ArgumentParser(prog="python -m curvops.validation.gpu_run",
                                description=DESCRIPTION)
    p.add_argument("--out", required=True, help="directory for gpu-<device>.json")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help="hard wall-clock budget of the whole run, from process start")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on the CPU (or whatever device), in a few seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=None, help="top eigenvalues (default 10; smoke 4)")
    p.add_argument("--batch", type=int, default=None, help="sequences (default 4; smoke 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (128; smoke 8)")
    p.add_argument("--reps", type=int, default=None, help="timing rounds (15; smoke 3)")
    p.add_argument("--sections", default=None, help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--models", default=None, help="comma-separated subset of the ladder")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return p.parse_args(argv)


def make_settings(args: argparse.Namespace) -> Settings:
    """The settings of a GPU run or of a smoke run, with the command line's overrides."""
    smoke = bool(args.smoke)
    ladder = SMOKE_LADDER if smoke else GPU_LADDER
    if args.models:
        wanted = set(args.models.split(","))
        unknown = wanted - {s.name for s in ladder}
        if unknown:
            raise SystemExit(f"unknown ladder model(s) {sorted(unknown)}; "
                             f"choose from {[s.name for s in ladder]}")
        ladder = tuple(s for s in ladder if s.name in wanted)
    sections = tuple(args.sections.split(",")) if args.sections else SECTIONS
    bad = set(sections) - set(SECTIONS)
    if bad:
        raise SystemExit(f"unknown section(s) {sorted(bad)}; choose from {SECTIONS}")
    return Settings(
        smoke=smoke, budget_s=float(args.budget_s), seed=int(args.seed),
        k=int(args.k or (4 if smoke else 10)), batch=int(args.batch or (2 if smoke else 4)),
        seq=int(args.seq or (8 if smoke else 128)), reps=int(args.reps or (3 if smoke else 15)),
        crosscheck_share=0.2, matvec_share=0.08,
        crosscheck_cases=SMOKE_CROSSCHECK if smoke else GPU_CROSSCHECK,
        matvec_model="gpt2-tiny" if smoke else "gpt2-10m", ladder=ladder,
        # Requested tolerances: the solver raises one below its precision floor (each case
        # records the solver's tol_used and process_eps).
        tol={"bfloat16": 1e-3, "float32": 1e-6 if smoke else 1e-5, "float64": 1e-10},
        sections=sections,
    )
