"""The ``curvops`` command line: ``validate``, ``spectrum`` and ``bench``.

``curvops validate [--quick] [--out DIR] [--models ...] [--operators ...]`` runs the
validation ladder (:mod:`curvops.validation.ladder`), prints each row as it finishes,
writes ``DIR/report.md``, ``DIR/results.json`` and ``DIR/figures/*.png``, and exits
with status 1 when any row fails.

``curvops spectrum MODEL`` prints the seed's result dict (``top_eigenvalues``,
``condition_number``, ...) as JSON for a zoo model, a user model given as
``package.module:factory`` (the factory returns ``(model, loss_fn, data)``, or a
transformers model, for which token data is synthesised), or a local HuggingFace
directory (loaded with ``local_files_only=True``; no hub access). Launched by
``torchrun --standalone --nproc-per-node N -m curvops spectrum ...``, every rank takes a contiguous
share of the data (:func:`curvops.linops.data.shard_batches`), the operators sum over the
ranks (gloo), and rank 0 prints the same report as one process would.

``curvops bench`` runs :mod:`curvops.validation.bench`.

Exit status: 0 success; 1 some validation rows failed; 2 usage error (a bad or
inapplicable option, an ``--out`` folder that cannot be written, an unknown model),
found before any work; 3 runtime error (an input curvops refuses, a user factory that
raises, any other error during the run); 130 interrupted. Errors print one line;
``--debug`` adds the traceback.

Also runnable as ``python -m curvops``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import math
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .adapters import seed_api
from .linops.data import shard_batches
from .linops.distributed import group_rank, group_size, is_main_rank
from .linops.dtypes import dtype_from_name
from .linops.hf import hf_objective, model_limits
from .linops.registry import SHORT_NAMES, make_operator
from .solvers.slq import spectral_density
from .solvers.trace import hutchinson_trace
from .validation import bench
from .validation.ladder import FULL_LADDER, QUICK_LADDER, run_ladder, select_rungs
from .validation.report import format_row, json_ready, prepare_output_folder, write_report
from .validation.zoo import ZOO, build, token_data

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_RUNTIME", "EXIT_USAGE", "main"]

EXIT_FAILED = 1  # validation rows failed
EXIT_USAGE = 2  # argparse's code for usage errors; ours share it
EXIT_RUNTIME = 3
EXIT_INTERRUPTED = 130  # the shell's code for SIGINT

_OPERATORS = SHORT_NAMES  # the operator registry's short names (curvops.linops.registry)
_DTYPE_CHOICES = ("float64", "float32", "bfloat16")  # what `spectrum --dtype` offers
# Synthetic token data for transformers models (spectrum --sequences / --seq-len).
_HF_SEQUENCES = 4
_HF_SEQ_LEN = 16

_EPILOG = """exit status:
  0    success
  1    validation rows failed (validate)
  2    usage error: a bad or inapplicable option, an unwritable --out, an unknown model
       (found before any work)
  3    runtime error: an input curvops refuses, a user factory that raises, any other
       error during the run
  130  interrupted (Ctrl-C)
errors print one line; --debug adds the traceback"""


class UsageError(Exception):
    """A command line that cannot work, found before any work (exit status 2)."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="curvops", description=__doc__.split("\n\n")[0],
                                epilog=_EPILOG, formatter_class=formatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="print the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, parents=[common], epilog=_EPILOG,
                              formatter_class=formatter)

    v = command("validate", "cross-validate every eigen-method on the model ladder")
    v.add_argument("--quick", action="store_true",
                   help="tiny fp64 MLP and CNN + a small bf16 check (< 2 min on 2 cores)")
    v.add_argument("--out", default="validation-report", help="output folder")
    v.add_argument("--models", nargs="+", default=None, help="zoo models to keep")
    v.add_argument("--operators", nargs="+", default=None, choices=_OPERATORS,
                   help="operators to keep")
    v.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    v.add_argument("--seed", type=int, default=0)

    s = command("spectrum", "top-k eigenvalues of a model as the seed's JSON dict")
    s.add_argument("model", nargs="?", default=None,
                   help="zoo name, package.module:factory, or a local HF directory")
    s.add_argument("--model", dest="model_option", default=None, metavar="MODEL",
                   help="the same, as an option (give it one way only)")
    s.add_argument("--operator", default="ggn", choices=_OPERATORS)
    s.add_argument("--k", type=_positive_int, default=5)
    s.add_argument("--max-iter", type=_positive_int, default=100)
    s.add_argument("--tol", type=_non_negative_float, default=1e-8)
    s.add_argument("--reorth", default=None, choices=("full", "selective", "partial", "none"))
    s.add_argument("--ncv", type=_positive_int, default=None,
                   help="thick restart: keep at most this many Lanczos vectors (reorth full; "
                   "default: what the memory budget allows)")
    s.add_argument("--dtype", default=None, choices=_DTYPE_CHOICES,
                   help="zoo models (default float32) and HF directories: the model's dtype")
    s.add_argument("--density", action="store_true", help="add the SLQ spectral density")
    s.add_argument("--trace", action="store_true", help="add a Hutchinson trace estimate")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--sequences", type=_positive_int, default=None,
                   help=f"transformers models only: synthetic sequences (default "
                        f"{_HF_SEQUENCES})")
    s.add_argument("--timeout", type=_positive_int, default=300, metavar="SECONDS",
                   help="under torchrun: a collective that waits longer than this raises "
                        "(a rank that died or hangs ends the run instead of blocking it)")
    s.add_argument("--seq-len", type=_positive_int, default=None,
                   help=f"transformers models only: tokens per sequence (default "
                        f"{_HF_SEQ_LEN}; at most the model's positions)")

    b = command("bench", "benchmarks against peers (writes validation/results)")
    b.add_argument("--quick", action="store_true", help="small sizes only (smoke run)")
    b.add_argument("--parts", nargs="+", default=None,
                   choices=("products", "lanczos", "power", "scaling"))
    b.add_argument("--out", default=None, help="results folder (default validation/results)")
    return p


# --- validate -------------------------------------------------------------------------------
def _validate(args: argparse.Namespace) -> int:
    try:
        rungs = select_rungs(QUICK_LADDER if args.quick else FULL_LADDER, args.models,
                             args.operators)
    except ValueError as err:
        raise UsageError(str(err)) from err
    if not rungs:
        raise UsageError("nothing to validate: no rung has these models and operators")
    try:  # before the run, not after it
        prepare_output_folder(args.out)
    except OSError as err:
        raise UsageError(f"--out {args.out}: cannot write a report there "
                         f"({err.strerror or err})") from err
    write = print
    if not args.no_progress:
        try:
            from tqdm.auto import tqdm  # optional: the progress extra

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
    return 0 if run.passed else EXIT_FAILED


# --- spectrum -------------------------------------------------------------------------------
def _load_factory(spec: str) -> Any:
    """Import ``package.module:factory`` and call it; its own errors are runtime errors."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"expected package.module:factory, got {spec!r}")
    sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and (module_name == err.name
                                     or module_name.startswith(err.name + ".")):
            raise UsageError(f"no module named {err.name!r} (from {spec!r})") from err
        raise
    finally:
        sys.path.pop(0)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"{module_name} has no callable {attr!r}")
    try:
        return factory()
    except Exception as err:
        raise RuntimeError(f"the factory {spec} raised {type(err).__name__}: {err}") from err


def _refuse_options(args: argparse.Namespace, options: Sequence[str], why: str) -> None:
    """Refuse options that were given but do not apply (rather than ignore them)."""
    given = [o for o in options if getattr(args, o.lstrip("-").replace("-", "_")) is not None]
    if given:
        raise UsageError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply "
                         f"to {why}")


def _hf_problem(model: Any, args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """A transformers model with synthetic right-padded token batches (HF dicts).

    The loss is left to the seed API (``None``): for a transformers model it is
    :func:`curvops.linops.hf.hf_objective`, token-normalised.
    """
    sequences = args.sequences or _HF_SEQUENCES
    seq_len = args.seq_len or _HF_SEQ_LEN
    vocab, positions, _ = model_limits(model)
    if positions is not None and seq_len > positions:
        raise UsageError(f"--seq-len {seq_len} is longer than the model's {positions} "
                         "positions (config.n_positions / max_position_embeddings)")
    data = token_data(sequences, seq_len, int(vocab or model.config.vocab_size),
                      seed=args.seed)
    if type(model).__name__.endswith("ForSequenceClassification"):
        # One class per sequence, drawn from the seed, in place of the token labels.
        gen = torch.Generator().manual_seed(args.seed)
        classes = torch.randint(0, int(model.config.num_labels), (sequences,),
                                generator=gen)
        data = [{**batch, "labels": classes} for batch in data]
    return model.eval(), None, data


def _resolve_model(args: argparse.Namespace) -> tuple[Any, Any, Any, str]:
    spec = args.model
    if spec in ZOO:
        _refuse_options(args, ("--sequences", "--seq-len"),
                        f"the zoo model {spec!r} (it brings its own data)")
        dtype = dtype_from_name(args.dtype or "float32")
        p = build(spec, dtype, args.seed)
        return p.model, p.loss_fn, p.data, f"zoo:{spec}"
    if Path(spec).is_dir():
        try:
            import transformers  # optional: the hf extra
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
            model = model.to(dtype_from_name(args.dtype))
        return (*_hf_problem(model, args), f"hf-dir:{spec}")
    if ":" in spec:
        _refuse_options(args, ("--dtype",), "a factory (it builds the model in its dtype)")
        made = _load_factory(spec)
        if isinstance(made, tuple) and len(made) == 3:
            _refuse_options(args, ("--sequences", "--seq-len"),
                            f"{spec}: it returns its own data")
            return (*made, f"factory:{spec}")
        if hasattr(made, "config") and hasattr(made.config, "vocab_size"):
            return (*_hf_problem(made, args), f"factory:{spec}")
        raise TypeError(f"{spec} must return (model, loss_fn, data) or a transformers model, "
                        f"got {type(made).__name__}")
    raise UsageError(f"{spec!r} is not a zoo model ({', '.join(ZOO)}), an existing directory, "
                     "or package.module:factory")


@contextlib.contextmanager
def _torchrun_group(timeout_s: int) -> Iterator[Any]:
    """The world process group when launched by ``torchrun`` with several ranks, else None.

    Initialised here (gloo: the built-in models run on the CPU) with the given collective
    timeout, and destroyed on the way out.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield None
        return
    dist = torch.distributed
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _spectrum(args: argparse.Namespace) -> int:
    if (args.model is None) == (args.model_option is None):
        raise UsageError("give the model once: `curvops spectrum MODEL` or "
                         "`curvops spectrum --model MODEL`")
    args.model = args.model if args.model is not None else args.model_option
    model, loss_fn, data, source = _resolve_model(args)
    with _torchrun_group(args.timeout) as group:
        result = _spectrum_result(args, model, loss_fn, data, group)
        result["model_source"] = source
        if is_main_rank(group):
            print(json.dumps(json_ready(result, nan="nan"), indent=1))
    return 0


def _spectrum_result(args: argparse.Namespace, model: Any, loss_fn: Any, data: Any,
                     group: Any) -> dict[str, Any]:
    """The seed API's report (plus density and trace when asked), on this rank's shard."""
    if group is not None:
        data = shard_batches(data, group_rank(group), group_size(group))
    kwargs: dict[str, Any] = {"tol": args.tol, "seed": args.seed, "process_group": group}
    if loss_fn is not None:
        kwargs["loss_fn"] = loss_fn
    if args.reorth:
        kwargs["reorth"] = args.reorth
    if args.ncv is not None:
        kwargs["ncv"] = args.ncv
    if args.operator == "hessian":
        result = seed_api.compute_hessian_eigenvalues_lanczos(
            model, data, k=args.k, max_iter=args.max_iter, **kwargs)
    else:
        result = seed_api.compute_fisher_eigenvalues_lanczos(
            model, data, k=args.k, max_iter=args.max_iter,
            ggn_mode=seed_api.ggn_mode_of(args.operator), **kwargs)
    if args.density or args.trace:
        op = _operator_for(args.operator, model, loss_fn, data, group)
        if args.density:
            dens = spectral_density(op, num_probes=4, lanczos_steps=min(40, op.shape[0] - 1),
                                    seed=args.seed, num_points=100)
            result["density"] = {"grid": dens.grid, "density": dens.density,
                                 "sigma": dens.sigma, "matvecs": dens.quadrature.matvecs}
        if args.trace:
            est = hutchinson_trace(op, num_probes=32, seed=args.seed)
            result["trace"] = {"value": est.value, "standard_error": est.standard_error,
                               "matvecs": est.matvecs, "method": est.method}
    return result


def _operator_for(name: str, model: Any, loss_fn: Any, data: Any, group: Any) -> Any:
    if loss_fn is None:  # a transformers model: the HF objective
        loss_fn = hf_objective(model)
    return make_operator(name, model, loss_fn, data, process_group=group)


# --- bench ----------------------------------------------------------------------------------
def _bench(args: argparse.Namespace) -> int:
    argv = (["--quick"] if args.quick else []) + (["--parts", *args.parts] if args.parts
                                                   else [])
    if args.out:
        argv += ["--out", args.out]
    bench.main(argv)
    return 0


def _one_line(err: BaseException) -> str:
    """The error as one line; our messages (usage, ValueError, TypeError) need no type name."""
    text = " ".join(str(err).split()) or type(err).__name__
    ours = (UsageError, ValueError, TypeError, RuntimeError)
    return text if isinstance(err, ours) else f"{type(err).__name__}: {text}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``curvops`` command; returns the exit status.

    0 success, 1 failed validation rows, 2 usage error (argparse's, and the checks of the
    options before any work), 3 runtime error, 130 interrupted. Errors print one line on
    stderr; ``--debug`` prints the traceback too.
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) and usage errors (2)
        return exit_.code if isinstance(exit_.code, int) else (
            0 if exit_.code is None else EXIT_USAGE)
    prefix = f"curvops {args.command}: error:"
    try:
        if args.command == "validate":
            return _validate(args)
        if args.command == "spectrum":
            return _spectrum(args)
        return _bench(args)
    except UsageError as err:
        print(f"{prefix} {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"curvops {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        if args.debug:
            traceback.print_exc()
        hint = "" if args.debug else " (--debug shows the traceback)"
        print(f"{prefix} {_one_line(err)}{hint}", file=sys.stderr)
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
