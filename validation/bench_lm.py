r"""Benchmark: the seed API on a language model against a hand-written GGN + scipy eigsh.

Two comparisons, interleaved in one process (``--rounds`` alternations):

1. fp32, GPT-2-small shape by default (12 layers, 768 wide, vocabulary 50257, random init,
   batch 4 x 128 tokens): wall time and peak memory of
   ``compute_fisher_eigenvalues_lanczos(k=5, ggn_mode="true")`` against a GGN product
   written by hand with ``torch.func`` (``jvp`` of the logits, closed-form softmax Hessian,
   ``vjp``) driven by ``scipy.sparse.linalg.eigsh``. Reported as ratios, with the matvec
   counts and the agreement of the top eigenvalues.
2. bf16 on a small GPT-2 (about 1 M parameters): the top eigenvalue of the bf16 model against
   the fp32 model with the same weights, and peak memory of both.

Peak memory is the process's resident set size sampled every 5 ms by a thread, minus the
value before the run (CPU; ``torch.cuda.max_memory_allocated`` on CUDA).

Thread settings are fixed before numpy and torch load: ``OMP_NUM_THREADS`` /
``OPENBLAS_NUM_THREADS`` / ``MKL_NUM_THREADS`` (``--blas-threads``, default 1) and
``torch.set_num_threads`` (``--torch-threads``, default all cores); both sides use them.

3. ``--products-only``: one product against one gradient pass on the fp32 model (no
   eigensolver): the GGN and the Hessian operators of the HF objective are built on the
   batch with ``cache="auto"`` (the first product builds the cache), then every round times
   a gradient pass (forward, mean token cross-entropy, ``autograd.grad`` over all
   parameters) and each cached product back to back, in a new seeded order per round. The
   result is the median of ``product / gradient pass`` over rounds, the peak resident set
   size a product adds (the cache already held) against the peak a gradient pass adds, and
   the cache's bytes; written to ``results/bench_lm_products.json``.

Usage::

    python -m curvops.validation.bench_lm                      # full GPT-2-small shape
    python -m curvops.validation.bench_lm --products-only --rounds 5 --torch-threads 2
    python -m curvops.validation.bench_lm --layers 2 --width 128 --vocab 2000 --seq 32
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--max-iter", type=int, default=20)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--skip-fp32", action="store_true")
    p.add_argument("--skip-bf16", action="store_true")
    p.add_argument("--bf16-width", type=int, default=128)
    p.add_argument("--bf16-vocab", type=int, default=5000)
    p.add_argument("--bf16-seq", type=int, default=32)
    p.add_argument("--blas-threads", type=int, default=1)
    p.add_argument("--torch-threads", type=int, default=0)
    p.add_argument("--products-only", action="store_true",
                   help="time cached GGN / Hessian products against a gradient pass only")
    p.add_argument("--out", default=None,
                   help="default results/bench_lm.json (bench_lm_products.json with "
                        "--products-only)")
    return p.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.blas_threads)

import numpy as np  # noqa: E402
import scipy.sparse.linalg as sla  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from curvops.adapters.seed_api import compute_fisher_eigenvalues_lanczos  # noqa: E402
from curvops.linops import GGNOperator, HessianOperator  # noqa: E402
from curvops.linops.hf import hf_objective  # noqa: E402
from curvops.linops.memory_probe import peak_memory  # noqa: E402
from torch.func import functional_call, jvp, vjp  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402


def build_gpt2(layers: int, width: int, heads: int, vocab: int, seq: int, dtype: torch.dtype):
    """A randomly initialised GPT-2 from a config (never downloaded), in eval mode."""
    import transformers  # optional: the hf extra

    transformers.utils.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(
        n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=max(seq, 8),
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).to(dtype).eval()


def hand_written_eigsh(model, batch, k: int, ncv: int) -> dict:
    """Top-k GGN eigenvalues with a torch.func GGN product and scipy eigsh."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    ids = batch["input_ids"]
    tokens = ids.shape[0] * (ids.shape[1] - 1)

    def logits(t):
        params = {n: c.view(s) for n, c, s in zip(names, torch.split(t, sizes), shapes)}
        return functional_call(model, params, args=(), kwargs={"input_ids": ids})["logits"][
            :, :-1
        ]

    matvecs = [0]

    def ggn(v: np.ndarray) -> np.ndarray:
        matvecs[0] += 1
        x = torch.from_numpy(np.ascontiguousarray(v.reshape(-1))).to(theta.dtype)
        with sdpa_kernel(SDPBackend.MATH):
            z, Jv = jvp(logits, (theta,), (x,))
            p = torch.softmax(z, -1)
            HJv = (p * Jv - p * (p * Jv).sum(-1, keepdim=True)) / tokens
            _, pull = vjp(logits, theta)
            return pull(HJv)[0].detach().numpy().astype(np.float32)

    n = theta.numel()
    op = sla.LinearOperator((n, n), matvec=ggn, dtype=np.float32)
    v0 = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    vals = sla.eigsh(op, k=k, which="LA", ncv=ncv, tol=1e-4, v0=v0, return_eigenvectors=False)
    return {"top_eigenvalues": sorted(map(float, vals), reverse=True), "matvecs": matvecs[0]}


def _load_average() -> list[float]:
    try:
        return list(os.getloadavg())
    except OSError:  # pragma: no cover - platforms without it
        return []


def _trimmed_peak_memory():
    """:func:`peak_memory` after handing free heap memory back to the OS (glibc
    ``malloc_trim``), so that the peak above entry is not hidden by freed memory that
    is still resident (a forward's activations are below glibc's mmap threshold)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return peak_memory(torch.device("cpu"))


def products_only(a: argparse.Namespace) -> dict:
    """Cached GGN and Hessian products against a gradient pass (ratios, peak memory)."""
    gen = torch.Generator().manual_seed(0)
    model = build_gpt2(a.layers, a.width, a.heads, a.vocab, a.seq, torch.float32)
    batch = {"input_ids": torch.randint(0, a.vocab, (a.batch, a.seq), generator=gen)}
    params = [p for p in model.parameters() if p.requires_grad]
    ids = batch["input_ids"]

    def gradient() -> None:
        logits = model(**batch).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        torch.autograd.grad(loss, params)

    out: dict = {"n_params": sum(p.numel() for p in params), "layers": a.layers,
                 "width": a.width, "vocab": a.vocab, "batch": [a.batch, a.seq],
                 "rounds": a.rounds, "load_average_before": _load_average()}
    gradient()  # warm
    with _trimmed_peak_memory() as mem:
        gradient()
    out["gradient_peak_bytes"] = mem["peak_bytes"]
    ops, v = {}, None
    for name, Op in (("ggn", GGNOperator), ("hessian", HessianOperator)):
        op = Op(model, hf_objective(model), batch, check_deterministic=False)
        if v is None:
            v = torch.randn(op.shape[0], generator=gen)
        t0 = time.perf_counter()
        op @ v  # builds the cache
        out[f"{name}_cache_build_seconds"] = time.perf_counter() - t0
        if not op.cache_active:
            raise RuntimeError(f"the {name} cache did not fit: {op.cache_info}")
        out[f"{name}_cache_bytes"] = op.cache_bytes
        op @ v  # warm
        with _trimmed_peak_memory() as mem:
            op @ v
        out[f"{name}_product_peak_bytes"] = mem["peak_bytes"]
        ops[name] = op
    samples: dict[str, list[float]] = {k: [] for k in ops}
    cpu_samples: dict[str, list[float]] = {k: [] for k in ops}
    seconds: dict[str, list[float]] = {"gradient": [], **{k: [] for k in ops}}
    order = list(ops)
    shuffle = random.Random(0)
    with contextlib.ExitStack() as held:
        for op in ops.values():
            held.enter_context(op.parameters_fixed())
        for r in range(a.rounds):
            shuffle.shuffle(order)
            for name in order:
                t0, c0 = time.perf_counter(), time.process_time()
                gradient()
                t_grad, c_grad = time.perf_counter() - t0, time.process_time() - c0
                t0, c0 = time.perf_counter(), time.process_time()
                ops[name] @ v
                t_prod, c_prod = time.perf_counter() - t0, time.process_time() - c0
                samples[name].append(t_prod / t_grad)
                cpu_samples[name].append(c_prod / c_grad)
                seconds["gradient"].append(t_grad)
                seconds[name].append(t_prod)
                print(f"round {r} {name}: gradient {t_grad:.2f} s, product {t_prod:.2f} s, "
                      f"ratio {t_prod / t_grad:.2f}", flush=True)
    out["ratios_to_gradient_pass"] = {k: statistics.median(s) for k, s in samples.items()}
    out["ratios_per_round"] = samples
    # Process CPU time (all threads): with one torch thread, a measure of the work done
    # that a loaded machine disturbs less than wall time.
    out["cpu_time_ratios_to_gradient_pass"] = {
        k: statistics.median(s) for k, s in cpu_samples.items()
    }
    out["seconds_median"] = {k: statistics.median(s) for k, s in seconds.items()}
    out["load_average_after"] = _load_average()
    return out


def main() -> None:
    a = ARGS
    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    if a.products_only:
        res = {"threads": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                           "torch_num_threads": torch.get_num_threads()},
               "torch": torch.__version__, "argv": sys.argv[1:], **products_only(a)}
        path = Path(a.out or Path(__file__).parent / "results" / "bench_lm_products.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1))
        print(json.dumps({k: res[k] for k in res if k != "ratios_per_round"}, indent=1))
        print(f"wrote {path}")
        return
    out: dict = {
        "threads": {
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
            "torch_num_threads": torch.get_num_threads(),
        },
        "torch": torch.__version__,
        "argv": sys.argv[1:],
    }
    gen = torch.Generator().manual_seed(0)
    if not a.skip_fp32:
        model = build_gpt2(a.layers, a.width, a.heads, a.vocab, a.seq, torch.float32)
        batch = {"input_ids": torch.randint(0, a.vocab, (a.batch, a.seq), generator=gen)}
        n = sum(p.numel() for p in model.parameters())
        rows = []
        for _ in range(a.rounds):
            with peak_memory(torch.device("cpu")) as mem_c:
                t = time.perf_counter()
                ours = compute_fisher_eigenvalues_lanczos(
                    model, batch, k=a.k, max_iter=a.max_iter, ggn_mode="true",
                    micro_batch_size=None,
                )
                t_ours = time.perf_counter() - t
            with peak_memory(torch.device("cpu")) as mem_r:
                t = time.perf_counter()
                ref = hand_written_eigsh(model, batch, a.k, ncv=max(a.max_iter, 2 * a.k + 1))
                t_ref = time.perf_counter() - t
            top_o, top_r = np.array(ours["top_eigenvalues"]), np.array(ref["top_eigenvalues"])
            rows.append({
                "curvops_seconds": t_ours, "eigsh_seconds": t_ref,
                "time_ratio_curvops_over_eigsh": t_ours / t_ref,
                "curvops_matvecs": ours["metadata"]["matvecs"], "eigsh_matvecs": ref["matvecs"],
                "seconds_per_matvec_ratio": (t_ours / ours["metadata"]["matvecs"])
                / (t_ref / ref["matvecs"]),
                "curvops_peak_bytes": mem_c["peak_bytes"],
                "eigsh_peak_bytes": mem_r["peak_bytes"],
                "memory_ratio_curvops_over_eigsh": (mem_c["peak_bytes"]
                                                    / max(mem_r["peak_bytes"], 1)),
                "curvops_top": top_o.tolist(), "eigsh_top": top_r.tolist(),
                "top1_relative_difference": float(abs(top_o[0] - top_r[0]) / abs(top_r[0])),
                "curvops_converged": ours["metadata"]["converged"],
                "curvops_reorth": ours["metadata"]["reorth"],
                "curvops_iterations": ours["lanczos_iterations"],
            })
            print(json.dumps(rows[-1], indent=1), flush=True)
        out["fp32"] = {"n_params": n, "layers": a.layers, "width": a.width, "vocab": a.vocab,
                       "batch": [a.batch, a.seq], "k": a.k, "max_iter": a.max_iter,
                       "rounds": rows}
    if not a.skip_bf16:
        m32 = build_gpt2(2, a.bf16_width, 4, a.bf16_vocab, a.bf16_seq, torch.float32)
        mbf = build_gpt2(2, a.bf16_width, 4, a.bf16_vocab, a.bf16_seq, torch.float32)
        mbf.load_state_dict(m32.state_dict())
        mbf = mbf.to(torch.bfloat16)
        batch = {"input_ids": torch.randint(0, a.bf16_vocab, (2, a.bf16_seq), generator=gen)}
        res = {}
        for name, model in (("fp32", m32), ("bf16", mbf)):
            with peak_memory(torch.device("cpu")) as mem:
                t = time.perf_counter()
                r = compute_fisher_eigenvalues_lanczos(
                    model, batch, k=a.k, max_iter=a.max_iter, ggn_mode="true",
                    micro_batch_size=None,
                )
                res[name] = {"seconds": time.perf_counter() - t, "peak_bytes": mem["peak_bytes"],
                             "top": r["top_eigenvalues"], "reorth": r["metadata"]["reorth"],
                             "rayleigh_ritz": r["metadata"]["rayleigh_ritz"],
                             "dtype": r["metadata"]["dtype"],
                             "iterations": r["lanczos_iterations"]}
        assert all(p.dtype == torch.bfloat16 for p in mbf.parameters())
        res["n_params"] = sum(p.numel() for p in m32.parameters())
        res["top1_relative_difference"] = abs(res["bf16"]["top"][0] - res["fp32"]["top"][0]) / abs(
            res["fp32"]["top"][0]
        )
        res["memory_ratio_bf16_over_fp32"] = res["bf16"]["peak_bytes"] / max(
            res["fp32"]["peak_bytes"], 1
        )
        res["time_ratio_bf16_over_fp32"] = res["bf16"]["seconds"] / res["fp32"]["seconds"]
        out["bf16_small"] = res
        print(json.dumps(res, indent=1), flush=True)
    path = Path(a.out or Path(__file__).parent / "results" / "bench_lm.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
