"""The ``curvops`` command line: ``validate``, ``spectrum`` and ``bench``.

``curvops validate [--quick] [--out DIR] [--models ...] [--operators ...]`` runs the
validation ladder (:mod:`curvops.validation.ladder`), prints each row as it finishes,
writes ``DIR/report.md``, ``DIR/results.json`` and ``DIR/figures/*.png``, and exits
with status 1 when any row fails.

``curvops spectrum MODEL`` prints the seed's result dict (``top_eigenvalues``,
``condition_number``, ...) as JSON for a zoo model, a user model given as
``package.module:factory`` (the factory returns ``(model, loss_fn, data)``, or a
transformers model, for which token data is synthesised), or a local HuggingFace
directory (loaded with ``local_files_only=True``; no hub access).

``curvops bench`` runs :mod:`curvops.validation.bench`.

Also runnable as ``python -m curvops.adapters.cli``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

_OPERATORS = ("hessian", "ggn", "ef", "fisher_mc")
_DTYPES = {"float64": "float64", "float32": "float32", "bfloat16": "bfloat16"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="curvops", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="cross-validate every eigen-method on the model ladder")
    v.add_argument("--quick", action="store_true",
                   help="tiny fp64 MLP and CNN + a small bf16 check (< 2 min on 2 cores)")
    v.add_argument("--out", default="validation-report", help="output folder")
    v.add_argument("--models", nargs="+", default=None, help="zoo models to keep")
    v.add_argument("--operators", nargs="+", default=None, choices=_OPERATORS,
                   help="operators to keep")
    v.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    v.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("spectrum", help="top-k eigenvalues of a model as the seed's JSON dict")
    s.add_argument("model", nargs="?", default=None,
                   help="zoo name, package.module:factory, or a local HF directory")
    s.add_argument("--model", dest="model_option", default=None, metavar="MODEL",
                   help="the same, as an option (give it one way only)")
    s.add_argument("--operator", default="ggn", choices=_OPERATORS)
    s.add_argument("--k", type=int, default=5)
    s.add_argument("--max-iter", type=int, default=100)
    s.add_argument("--tol", type=float, default=1e-8)
    s.add_argument("--reorth", default=None, choices=("full", "selective", "partial", "none"))
    s.add_argument("--dtype", default=None, choices=tuple(_DTYPES),
                   help="zoo models: build in this dtype (default float32)")
    s.add_argument("--density", action="store_true", help="add the SLQ spectral density")
    s.add_argument("--trace", action="store_true", help="add a Hutchinson trace estimate")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--sequences", type=int, default=4, help="HF models: synthetic sequences")
    s.add_argument("--seq-len", type=int, default=16, help="HF models: tokens per sequence")

    b = sub.add_parser("bench", help="benchmarks against peers (writes validation/results)")
    b.add_argument("--quick", action="store_true", help="small sizes only (smoke run)")
    b.add_argument("--parts", nargs="+", default=None,
                   choices=("products", "lanczos", "power", "scaling"))
    b.add_argument("--out", default=None, help="results folder (default validation/results)")
    return p


# --- validate -------------------------------------------------------------------------------
def _validate(args: argparse.Namespace) -> int:
    from curvops.validation.ladder import FULL_LADDER, QUICK_LADDER, run_ladder, select_rungs
    from curvops.validation.report import format_row, write_report

    rungs = select_rungs(QUICK_LADDER if args.quick else FULL_LADDER, args.models,
                         args.operators)
    if not rungs:
        print("nothing to validate: no rung has these models and operators", file=sys.stderr)
        return 2
    write = print
    if not args.no_progress:
        try:
            from tqdm.auto import tqdm

            write = tqdm.write
        except ImportError:
            pass

    def on_row(row: dict[str, Any]) -> None:
        write(format_row(row))

    run = run_ladder(rungs, on_row=on_row, progress=not args.no_progress, seed=args.seed)
    paths = write_report(run, args.out, quick=args.quick, figures=not args.no_figures)
    bad = [r for r in run.rows if r["status"] in ("fail", "error")]
    print(f"\n{len(run.rows)} rows, {len(bad)} failed, {run.seconds:.1f} s. "
          f"Report: {paths['report']}  JSON: {paths['results']}  "
          f"figures: {len(paths['figures'])}")
    for row in bad:
        print(f"FAILED: {row['rung']} {row['model']} {row['operator']} {row['method']}: "
              f"rel_error={row['rel_error']} tol={row['tolerance']} {row['note']}")
    return 0 if run.passed else 1


# --- spectrum -------------------------------------------------------------------------------
def _load_factory(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"expected package.module:factory, got {spec!r}")
    sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    finally:
        sys.path.pop(0)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"{module_name} has no callable {attr!r}")
    return factory()


def _hf_problem(model: Any, args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """A transformers model with synthetic right-padded token batches (HF dicts).

    The loss is left to the seed API (``None``): for a transformers model it is
    :func:`curvops.adapters.hf.hf_objective`, token-normalised.
    """
    import torch
    from curvops.validation.zoo import token_data

    vocab = int(model.config.vocab_size)
    data = token_data(args.sequences, args.seq_len, vocab, seed=args.seed)
    if type(model).__name__.endswith("ForSequenceClassification"):
        # One class per sequence, drawn from the seed, in place of the token labels.
        gen = torch.Generator().manual_seed(args.seed)
        classes = torch.randint(0, int(model.config.num_labels), (args.sequences,),
                                generator=gen)
        data = [{**batch, "labels": classes} for batch in data]
    return model.eval(), None, data


def _resolve_model(args: argparse.Namespace) -> tuple[Any, Any, Any, str]:
    import torch
    from curvops.validation.zoo import ZOO, build

    spec = args.model
    if spec in ZOO:
        dtype = getattr(torch, args.dtype or "float32")
        p = build(spec, dtype, args.seed)
        return p.model, p.loss_fn, p.data, f"zoo:{spec}"
    if Path(spec).is_dir():
        try:
            import transformers
        except ImportError as err:
            raise ImportError("loading a HuggingFace directory needs transformers: "
                              "pip install 'curvops[hf]'") from err
        # Default attention (sdpa): curvops' products pick a differentiable kernel by
        # themselves, so the model is loaded exactly as a user would load it.
        config = transformers.AutoConfig.from_pretrained(spec, local_files_only=True)
        auto = (transformers.AutoModelForSequenceClassification
                if any(a.endswith("ForSequenceClassification")
                       for a in (config.architectures or []))
                else transformers.AutoModelForCausalLM)
        model = auto.from_pretrained(spec, config=config, local_files_only=True)
        if args.dtype:
            model = model.to(getattr(torch, args.dtype))
        return (*_hf_problem(model, args), f"hf-dir:{spec}")
    if ":" in spec:
        made = _load_factory(spec)
        if isinstance(made, tuple) and len(made) == 3:
            return (*made, f"factory:{spec}")
        if hasattr(made, "config") and hasattr(made.config, "vocab_size"):
            return (*_hf_problem(made, args), f"factory:{spec}")
        raise TypeError(f"{spec} must return (model, loss_fn, data) or a transformers model")
    raise ValueError(f"{spec!r} is not a zoo model ({', '.join(ZOO)}), an existing directory, "
                     "or package.module:factory")


def _clean(x: Any) -> Any:
    """JSON-ready: numpy and torch scalars to Python, inf/nan to strings."""
    import numpy as np
    import torch

    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return _clean(x.item())
    if isinstance(x, torch.dtype):
        return str(x).replace("torch.", "")
    if isinstance(x, torch.Tensor):
        return _clean(x.detach().cpu().tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def _spectrum(args: argparse.Namespace) -> int:
    from curvops.solvers import seed_api

    if (args.model is None) == (args.model_option is None):
        raise ValueError("give the model once: `curvops spectrum MODEL` or "
                         "`curvops spectrum --model MODEL`")
    args.model = args.model if args.model is not None else args.model_option
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    model, loss_fn, data, source = _resolve_model(args)
    kwargs: dict[str, Any] = {"tol": args.tol, "seed": args.seed}
    if loss_fn is not None:
        kwargs["loss_fn"] = loss_fn
    if args.reorth:
        kwargs["reorth"] = args.reorth
    if args.operator == "hessian":
        result = seed_api.compute_hessian_eigenvalues_lanczos(
            model, data, k=args.k, max_iter=args.max_iter, **kwargs)
    else:
        mode = {"ggn": "true", "ef": "empirical", "fisher_mc": "mc"}[args.operator]
        result = seed_api.compute_fisher_eigenvalues_lanczos(
            model, data, k=args.k, max_iter=args.max_iter, ggn_mode=mode, **kwargs)
    result["model_source"] = source
    if args.density or args.trace:
        op = _operator_for(args.operator, model, loss_fn, data)
        if args.density:
            from curvops.solvers.slq import spectral_density

            dens = spectral_density(op, num_probes=4, lanczos_steps=min(40, op.shape[0] - 1),
                                    seed=args.seed, num_points=100)
            result["density"] = {"grid": dens.grid, "density": dens.density,
                                 "sigma": dens.sigma, "matvecs": dens.quadrature.matvecs}
        if args.trace:
            from curvops.solvers.trace import hutchinson_trace

            est = hutchinson_trace(op, num_probes=32, seed=args.seed)
            result["trace"] = {"value": est.value, "standard_error": est.standard_error,
                               "matvecs": est.matvecs, "method": est.method}
    print(json.dumps(_clean(result), indent=1))
    return 0


def _operator_for(name: str, model: Any, loss_fn: Any, data: Any) -> Any:
    from curvops.validation.zoo import make_operator

    if loss_fn is None:  # a transformers model: the HF objective
        from curvops.adapters.hf import hf_objective

        loss_fn = hf_objective(model)
    return make_operator(name, model, loss_fn, data)


# --- bench ----------------------------------------------------------------------------------
def _bench(args: argparse.Namespace) -> int:
    from curvops.validation import bench

    argv = (["--quick"] if args.quick else []) + (["--parts", *args.parts] if args.parts
                                                   else [])
    if args.out:
        argv += ["--out", args.out]
    bench.main(argv)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``curvops`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "validate":
            return _validate(args)
        if args.command == "spectrum":
            return _spectrum(args)
        return _bench(args)
    except (ValueError, TypeError, ImportError) as err:
        print(f"curvops {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
