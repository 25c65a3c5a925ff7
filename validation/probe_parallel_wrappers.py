r"""Probe: which curvature-product paths work through DDP and FSDP2 on gloo (CPU).

Two processes on loopback (gloo, ``timeout=60 s``) each hold a shard of the data for a
small MLP 8-16-4 (Tanh) with a cross-entropy loss summed over the local examples, so that
the sum over ranks of the local products equals the product of the loss summed over the
concatenated data. For every wrapper

* ``plain``: an unwrapped module on every rank (the same parameters everywhere),
* ``ddp`` / ``ddp_find_unused`` / ``ddp_static_graph``:
  :class:`torch.nn.parallel.DistributedDataParallel` (default; ``find_unused_parameters=True``;
  ``static_graph=True``), with a counting comm hook that sees every bucket the reducer
  all-reduces,
* ``fsdp_{whole,layer}_rs{T,F}``: FSDP2 :func:`torch.distributed.fsdp.fully_shard` on the
  whole model only, or on each ``Linear`` and then the root, with
  ``reshard_after_forward`` True / False,

and for float64 and float32, the probe runs a list of checks: a plain ``loss.backward()``
(baseline), the Hessian-vector product by double backward (``torch.autograd.grad`` with
``create_graph=True``, then the gradient of :math:`\langle g, v\rangle`), Jacobian-vector
products by ``torch.func.jvp`` over ``functional_call`` and by dual parameters
(``torch.autograd.forward_ad``), and wrapper-specific recipes (DDP: repeated forward passes
with ``autograd.grad`` only, ``no_sync``, ``torch.no_grad``, the inner ``ddp.module``, a
training step afterwards; FSDP2: parameters after the forward pass, ``unshard()`` in place,
an unwrapped replica built from ``DTensor.full_tensor()`` or from ``unshard()``).

Every check builds a fresh wrapped model from the same seed. A Hessian-vector product is
all-reduced (SUM) over the ranks and compared with the one of the unwrapped model on one
process over the concatenated data; a JVP is compared per rank with the unwrapped model's
JVP on the local data; a gradient from ``backward()`` is compared after undoing the
wrapper's averaging (times the world size). A check "works" when it runs and its result
matches the reference to ``1e-10`` (float64) or ``1e-4`` (float32) in
:math:`\max|a - b| / \max|b|`; every cell is measured. Each (wrapper, dtype) runs in its own
pair of processes, bounded in time, so that a hang or a broken state cannot spill over.

Run::

    python -m curvops.validation.probe_parallel_wrappers

or ``python validation/probe_parallel_wrappers.py``. Results go to
``validation/results/probe_parallel_wrappers.json`` (rows, metadata and the Markdown table,
which is also printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

RESULTS = Path(__file__).resolve().parent / "results"
WORLD = 2
N_PER_RANK = 6
SEED = 0
GLOO_TIMEOUT_S = 60
SPAWN_TIMEOUT_S = 240
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
DTYPES = {"float64": torch.float64, "float32": torch.float32}
WRAPPERS = (
    "plain",
    "ddp",
    "ddp_find_unused",
    "ddp_static_graph",
    "fsdp_whole_rsT",
    "fsdp_whole_rsF",
    "fsdp_layer_rsT",
    "fsdp_layer_rsF",
)


class MismatchError(AssertionError):
    """A check ran but its result differs from the reference beyond the tolerance."""


# --- model, data, references -------------------------------------------------------------------
def make_mlp(dtype: torch.dtype) -> nn.Sequential:
    """The MLP 8-16-4 with Tanh, initialised from :data:`SEED` (the same on every rank)."""
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


def make_data(dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
    """The data shard of every rank (each rank can rebuild all of them)."""
    shards = []
    for r in range(WORLD):
        gen = torch.Generator().manual_seed(100 + r)
        X = torch.randn(N_PER_RANK, 8, generator=gen, dtype=torch.float64).to(dtype)
        y = torch.randint(0, 4, (N_PER_RANK,), generator=gen)
        shards.append((X, y))
    return shards


def make_vector(model: nn.Module) -> dict[str, Tensor]:
    """A fixed random direction, one tensor per parameter name of the unwrapped model."""
    gen = torch.Generator().manual_seed(7)
    return {
        n: torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        for n, p in model.named_parameters()
    }


def loss_fn(out: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy summed over the examples (sums over ranks add up exactly)."""
    return F.cross_entropy(out, y, reduction="sum")


def hvp(forward: Callable[[], Tensor], y: Tensor, params: Sequence[Tensor],
        vs: Sequence[Tensor], notes: list[str] | None = None) -> list[Tensor]:
    """Hessian-vector product by double backward through ``autograd.grad``.

    Args:
        forward: Computes the model output.
        y: The targets.
        params: The tensors to differentiate with respect to.
        vs: The direction, laid out like ``params``.
        notes: If given, ``"1st grad ok"`` is appended once the first backward has run.
    """
    loss = loss_fn(forward(), y)
    gs = torch.autograd.grad(loss, list(params), create_graph=True)
    if notes is not None:
        notes.append("1st grad ok")
    dot = sum((g * v).sum() for g, v in zip(gs, vs))
    return [h.detach() for h in torch.autograd.grad(dot, list(params))]


def flat(ts: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors (DTensors are gathered to full tensors first) into one vector."""
    out = []
    for t in ts:
        if _is_dtensor(t):
            t = t.full_tensor()
        out.append(t.detach().reshape(-1))
    return torch.cat(out)


def all_reduce_sum(t: Tensor) -> Tensor:
    """SUM-all-reduce a copy of ``t``."""
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def rel_err(a: Tensor, b: Tensor) -> float:
    """``max|a - b| / max|b|`` in float64."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def describe(ts: Any) -> str:
    """Types and shapes (local shape for DTensors) of some tensors, for the notes."""
    parts = []
    for t in ts:
        if t is None:
            parts.append("None")
        elif _is_dtensor(t):
            parts.append(f"DTensor{tuple(t.shape)}/local{tuple(t.to_local().shape)}")
        else:
            parts.append(f"{type(t).__name__}{tuple(t.shape)}")
    return ", ".join(parts)


class References:
    """Unwrapped-model results on one process (each rank computes them all)."""

    def __init__(self, dtype: torch.dtype, rank: int) -> None:
        model = make_mlp(dtype)
        self.names = [n for n, _ in model.named_parameters()]
        self.v = make_vector(model)
        shards = make_data(dtype)
        self.X, self.y = shards[rank]
        X_all = torch.cat([s[0] for s in shards])
        y_all = torch.cat([s[1] for s in shards])
        params = list(model.parameters())
        vs = [self.v[n] for n in self.names]
        self.hvp_full = flat(hvp(lambda: model(X_all), y_all, params, vs))
        self.hvp_local = flat(hvp(lambda: model(self.X), self.y, params, vs))
        loss = loss_fn(model(X_all), y_all)
        self.grad_full = flat(torch.autograd.grad(loss, params))
        _, self.jvp_local = torch.func.jvp(
            lambda *ps: functional_call(model, dict(zip(self.names, ps)), (self.X,)),
            tuple(p.detach() for p in params), tuple(vs),
        )
        self.full_params = {n: p.detach().clone() for n, p in model.named_parameters()}


# --- wrappers ----------------------------------------------------------------------------------
class HookCounter:
    """State of a DDP comm hook that counts the buckets it all-reduces."""

    def __init__(self) -> None:
        self.calls = 0


def counting_allreduce_hook(state: HookCounter, bucket: Any) -> torch.futures.Future[Tensor]:
    """DDP comm hook: count, then the default all-reduce (average)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    state.calls += 1
    return default_hooks.allreduce_hook(None, bucket)


# DDP checks the hook's annotations as objects (not the strings of postponed evaluation).
counting_allreduce_hook.__annotations__ = {
    "state": HookCounter, "bucket": dist.GradBucket, "return": torch.futures.Future[Tensor]
}


def wrap(name: str, dtype: torch.dtype) -> tuple[nn.Module, dict[str, Any]]:
    """A fresh model wrapped as ``name``; extras hold the DDP hook counter or FSDP modules."""
    model = make_mlp(dtype)
    extras: dict[str, Any] = {"prefix": ""}
    if name == "plain":
        return model, extras
    if name.startswith("ddp"):
        ddp = nn.parallel.DistributedDataParallel(
            model, find_unused_parameters=name == "ddp_find_unused",
            static_graph=name == "ddp_static_graph",
        )
        counter = HookCounter()
        ddp.register_comm_hook(counter, counting_allreduce_hook)
        extras.update(counter=counter, prefix="module.")
        return ddp, extras
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    rs = name.endswith("rsT")
    if "_layer_" in name:
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh, reshard_after_forward=rs)
    fully_shard(model, mesh=mesh, reshard_after_forward=rs)
    extras["fsdp_modules"] = [m for m in model.modules() if isinstance(m, FSDPModule)]
    return model, extras


# --- checks ------------------------------------------------------------------------------------
class Ctx:
    """What a check needs: rank, dtype, references, the wrapper's name, notes to fill."""

    def __init__(self, rank: int, wrapper: str, dtype: torch.dtype) -> None:
        self.rank = rank
        self.wrapper = wrapper
        self.dtype = dtype
        self.ref = References(dtype, rank)
        self.notes: list[str] = []

    def fresh(self) -> tuple[nn.Module, dict[str, Any]]:
        """A freshly wrapped model."""
        return wrap(self.wrapper, self.dtype)

    def vs_like(self, params: Sequence[Tensor]) -> list[Tensor]:
        """The direction laid out like ``params`` (DTensors get a DTensor of the same layout)."""
        out = []
        for n, p in zip(self.ref.names, params):
            v = self.ref.v[n]
            if _is_dtensor(p):
                from torch.distributed.tensor import distribute_tensor

                v = distribute_tensor(v, p.device_mesh, p.placements)
            out.append(v)
        return out

    def check_hvp(self, local: Tensor) -> float:
        """All-reduce a local HVP, compare with the full-data reference; note the local error."""
        e_loc = rel_err(local, self.ref.hvp_local)
        self.notes.append(f"local HVP vs local-only ref {e_loc:.1e}")
        return self.check(all_reduce_sum(local), self.ref.hvp_full)

    def check(self, a: Tensor, b: Tensor) -> float:
        """Relative error; raise :class:`MismatchError` beyond the tolerance."""
        err = rel_err(a, b)
        if not err <= TOL[self.dtype]:
            raise MismatchError(f"relative error {err:.2e} > {TOL[self.dtype]:.0e}")
        return err

    def ddp_notes(self, model: nn.Module, extras: dict[str, Any]) -> None:
        """Record the comm-hook count and whether any ``.grad`` was written."""
        if "counter" in extras:
            written = any(p.grad is not None for p in model.parameters())
            self.notes.append(f"comm-hook buckets {extras['counter'].calls}")
            self.notes.append(f".grad written: {'yes' if written else 'no'}")


def chk_backward(ctx: Ctx) -> float:
    """Baseline: forward + ``loss.backward()``; gradient vs reference (undoing averaging)."""
    model, extras = ctx.fresh()
    loss_fn(model(ctx.ref.X), ctx.ref.y).backward()
    params = list(model.parameters())
    ctx.notes.append(f"params: {describe(params)}")
    ctx.notes.append(f"grads: {describe([p.grad for p in params])}")
    g = flat([p.grad for p in params])
    if ctx.wrapper == "plain":
        g = all_reduce_sum(g)
    else:
        g = g * WORLD
        ctx.notes.append("grad x world size (wrapper averages)")
    ctx.ddp_notes(model, extras)
    return ctx.check(g, ctx.ref.grad_full)


def chk_hvp_params(ctx: Ctx) -> float:
    """HVP by double backward w.r.t. ``list(model.parameters())`` taken before the forward."""
    model, extras = ctx.fresh()
    params = list(model.parameters())
    ctx.notes.append(f"params: {describe(params)}")
    vs = ctx.vs_like(params)
    try:
        local = flat(hvp(lambda: model(ctx.ref.X), ctx.ref.y, params, vs, ctx.notes))
    except RuntimeError:
        model2, _ = ctx.fresh()
        p2 = list(model2.parameters())
        loss = loss_fn(model2(ctx.ref.X), ctx.ref.y)
        gs = torch.autograd.grad(loss, p2, create_graph=True, allow_unused=True)
        ctx.notes.append(f"with allow_unused=True the grads are: {describe(gs)}")
        raise
    ctx.ddp_notes(model, extras)
    return ctx.check_hvp(local)


def chk_first_grad_create_graph(ctx: Ctx) -> float:
    """Only the first step: ``autograd.grad(loss, params, create_graph=True)``; vs grad ref."""
    model, extras = ctx.fresh()
    params = list(model.parameters())
    loss = loss_fn(model(ctx.ref.X), ctx.ref.y)
    gs = torch.autograd.grad(loss, params, create_graph=True)
    ctx.notes.append(f"grads: {describe(gs)}; requires_grad {[g.requires_grad for g in gs]}")
    ctx.ddp_notes(model, extras)
    return ctx.check(all_reduce_sum(flat(gs)), ctx.ref.grad_full)


def chk_hvp_params_after_forward(ctx: Ctx) -> float:
    """HVP w.r.t. ``list(model.parameters())`` read after the forward pass."""
    model, extras = ctx.fresh()
    out = model(ctx.ref.X)
    params = list(model.parameters())
    ctx.notes.append(f"params after forward: {describe(params)}")
    vs = ctx.vs_like(params)
    local = flat(hvp(lambda: out, ctx.ref.y, params, vs, ctx.notes))
    ctx.ddp_notes(model, extras)
    return ctx.check_hvp(local)


def chk_hvp_repeat(ctx: Ctx) -> float:
    """Three forward passes through the wrapper, each with ``autograd.grad`` only."""
    model, extras = ctx.fresh()
    params = list(model.parameters())
    vs = ctx.vs_like(params)
    errs = []
    for _ in range(3):
        local = flat(hvp(lambda: model(ctx.ref.X), ctx.ref.y, params, vs))
        errs.append(ctx.check_hvp(local))
        ctx.notes.pop()
    ctx.notes.append(f"local HVP vs local-only ref {rel_err(local, ctx.ref.hvp_local):.1e}")
    ctx.ddp_notes(model, extras)
    ctx.state = (model, extras)  # type: ignore[attr-defined]
    return max(errs)


def chk_jvp_func(ctx: Ctx) -> float:
    """``torch.func.jvp`` over ``functional_call(model, full plain parameters)``."""
    model, extras = ctx.fresh()
    names = [extras["prefix"] + n for n in ctx.ref.names]
    primals = tuple(ctx.ref.full_params[n] for n in ctx.ref.names)
    tangents = tuple(ctx.ref.v[n] for n in ctx.ref.names)
    _, jv = torch.func.jvp(
        lambda *ps: functional_call(model, dict(zip(names, ps)), (ctx.ref.X,)), primals, tangents
    )
    ctx.ddp_notes(model, extras)
    ctx.state = (model, extras)  # type: ignore[attr-defined]
    return ctx.check(jv, ctx.ref.jvp_local)


def chk_jvp_fwad(ctx: Ctx) -> float:
    """Dual parameters (``forward_ad.make_dual``) through ``functional_call`` (as curvops does)."""
    model, extras = ctx.fresh()
    with fwAD.dual_level():
        duals = {
            extras["prefix"] + n: fwAD.make_dual(ctx.ref.full_params[n], ctx.ref.v[n])
            for n in ctx.ref.names
        }
        out = functional_call(model, duals, (ctx.ref.X,))
        jv = fwAD.unpack_dual(out).tangent
    if jv is None:
        raise MismatchError("output has no tangent (dual parameters were not used)")
    ctx.ddp_notes(model, extras)
    ctx.state = (model, extras)  # type: ignore[attr-defined]
    return ctx.check(jv, ctx.ref.jvp_local)


def chk_jvp_fwad_inplace(ctx: Ctx) -> float:
    """Duals of the wrapper's own parameter objects (DTensors under FSDP2), by ``functional_call``.

    Unlike :func:`chk_jvp_fwad`, which passes full plain tensors, the primal of each dual is the
    parameter as the wrapper holds it and the tangent has the same layout.
    """
    model, extras = ctx.fresh()
    named = list(model.named_parameters())
    vs = ctx.vs_like([p for _, p in named])
    ctx.notes.append(f"params: {describe([p for _, p in named])}")
    with fwAD.dual_level():
        duals = {n: fwAD.make_dual(p.detach(), v) for (n, p), v in zip(named, vs)}
        out = functional_call(model, duals, (ctx.ref.X,))
        jv = fwAD.unpack_dual(out).tangent
    if jv is None:
        raise MismatchError("output has no tangent (dual parameters were not used)")
    ctx.ddp_notes(model, extras)
    return ctx.check(jv, ctx.ref.jvp_local)


def chk_hvp_functional_call(ctx: Ctx) -> float:
    """HVP w.r.t. fresh full plain leaves passed by ``functional_call`` to the wrapper."""
    model, extras = ctx.fresh()
    leaves = [ctx.ref.full_params[n].clone().requires_grad_() for n in ctx.ref.names]
    names = [extras["prefix"] + n for n in ctx.ref.names]
    vs = [ctx.ref.v[n] for n in ctx.ref.names]
    local = flat(hvp(lambda: functional_call(model, dict(zip(names, leaves)), (ctx.ref.X,)),
                     ctx.ref.y, leaves, vs))
    ctx.ddp_notes(model, extras)
    ctx.state = (model, extras)  # type: ignore[attr-defined]
    return ctx.check_hvp(local)


# DDP-specific
def chk_ddp_no_grad_forward(ctx: Ctx) -> float:
    """``with torch.no_grad(): ddp(X)``, three times; does the reducer act?"""
    model, extras = ctx.fresh()
    with torch.no_grad():
        for _ in range(3):
            out = model(ctx.ref.X)
    ctx.ddp_notes(model, extras)
    ctx.state = (model, extras)  # type: ignore[attr-defined]
    inner = make_mlp(ctx.dtype)
    with torch.no_grad():
        return ctx.check(out, inner(ctx.ref.X))


def chk_ddp_no_sync(ctx: Ctx) -> float:
    """HVP through the DDP forward inside ``with ddp.no_sync():`` (three times)."""
    model, extras = ctx.fresh()
    params = list(model.parameters())
    vs = ctx.vs_like(params)
    with model.no_sync():
        for _ in range(3):
            local = flat(hvp(lambda: model(ctx.ref.X), ctx.ref.y, params, vs))
    ctx.ddp_notes(model, extras)
    ctx.state = (model, extras)  # type: ignore[attr-defined]
    return ctx.check_hvp(local)


def chk_ddp_module(ctx: Ctx) -> float:
    """HVP through the inner module ``ddp.module`` (three times), bypassing DDP's forward."""
    model, extras = ctx.fresh()
    inner = model.module
    params = list(inner.parameters())
    vs = ctx.vs_like(params)
    for _ in range(3):
        local = flat(hvp(lambda: inner(ctx.ref.X), ctx.ref.y, params, vs))
    ctx.ddp_notes(model, extras)
    ctx.state = (model, extras)  # type: ignore[attr-defined]
    return ctx.check_hvp(local)


def chk_ddp_hvp_into_grad(ctx: Ctx) -> float:
    """HVP read from ``.grad`` after ``dot.backward()`` through DDP: does DDP touch it?"""
    model, extras = ctx.fresh()
    params = list(model.parameters())
    vs = ctx.vs_like(params)
    loss = loss_fn(model(ctx.ref.X), ctx.ref.y)
    gs = torch.autograd.grad(loss, params, create_graph=True)
    sum((g * v).sum() for g, v in zip(gs, vs)).backward()
    local = flat([p.grad for p in params])
    ctx.ddp_notes(model, extras)
    ctx.notes.append(f".grad vs mean over ranks {rel_err(local, ctx.ref.hvp_full / WORLD):.1e}")
    ctx.state = (model, extras)  # type: ignore[attr-defined]
    return ctx.check(local, ctx.ref.hvp_local)


def chk_ddp_module_jvp(ctx: Ctx) -> float:
    """JVPs (``torch.func.jvp`` and dual parameters) through the inner ``ddp.module``."""
    model, extras = ctx.fresh()
    inner = model.module
    primals = tuple(ctx.ref.full_params[n] for n in ctx.ref.names)
    tangents = tuple(ctx.ref.v[n] for n in ctx.ref.names)
    _, jv1 = torch.func.jvp(
        lambda *ps: functional_call(inner, dict(zip(ctx.ref.names, ps)), (ctx.ref.X,)),
        primals, tangents,
    )
    with fwAD.dual_level():
        duals = {n: fwAD.make_dual(p.detach(), ctx.ref.v[n]) for n, p in inner.named_parameters()}
        jv2 = fwAD.unpack_dual(functional_call(inner, duals, (ctx.ref.X,))).tangent
    ctx.ddp_notes(model, extras)
    ctx.state = (model, extras)  # type: ignore[attr-defined]
    return max(ctx.check(jv1, ctx.ref.jvp_local), ctx.check(jv2, ctx.ref.jvp_local))


def then_train_step(ctx: Ctx) -> float:
    """After the previous check: two normal DDP steps, forward + ``backward()`` (needs state).

    Each step's gradient (times the world size) must equal the full-data gradient; the
    parameters are not updated, so both steps have the same reference.
    """
    state = getattr(ctx, "state", None)
    if state is None:
        raise RuntimeError("previous check failed before leaving a model to continue with")
    model, extras = state
    errs = []
    for step in (1, 2):
        before = extras["counter"].calls
        for p in model.parameters():
            p.grad = None
        loss_fn(model(ctx.ref.X), ctx.ref.y).backward()
        g = flat([p.grad for p in model.parameters()]) * WORLD
        errs.append(rel_err(g, ctx.ref.grad_full))
        ctx.notes.append(f"step {step}: comm-hook buckets "
                         f"{extras['counter'].calls - before}, grad err {errs[-1]:.1e}")
    err = max(errs)
    if not err <= TOL[ctx.dtype]:
        raise MismatchError(f"relative error {err:.2e} > {TOL[ctx.dtype]:.0e}")
    return err


def chk_ddp_train_then_hvp(ctx: Ctx) -> float:
    """One normal DDP step first (gradient checked), then HVPs through the DDP forward x3."""
    model, extras = ctx.fresh()
    loss_fn(model(ctx.ref.X), ctx.ref.y).backward()
    err_g = ctx.check(flat([p.grad for p in model.parameters()]) * WORLD, ctx.ref.grad_full)
    ctx.notes.append(f"first train step grad err {err_g:.1e}")
    for p in model.parameters():
        p.grad = None
    before = extras["counter"].calls
    params = list(model.parameters())
    vs = ctx.vs_like(params)
    errs = []
    for _ in range(3):
        local = flat(hvp(lambda: model(ctx.ref.X), ctx.ref.y, params, vs))
        errs.append(ctx.check_hvp(local))
        ctx.notes.pop()
    ctx.notes.append(f"comm-hook buckets during products {extras['counter'].calls - before}")
    ctx.state = (model, extras)  # type: ignore[attr-defined]
    return max(errs)


def chk_ddp_control(ctx: Ctx) -> float:
    """Control: a fresh DDP model and no product (its parameters vs the unwrapped model's)."""
    model, extras = ctx.fresh()
    ctx.state = (model, extras)  # type: ignore[attr-defined]
    full = flat([ctx.ref.full_params[n] for n in ctx.ref.names])
    return ctx.check(flat(list(model.parameters())), full)


# FSDP2-specific
def _unshard_all(extras: dict[str, Any]) -> None:
    for m in extras["fsdp_modules"]:
        m.unshard()


def chk_fsdp_unshard(ctx: Ctx) -> float:
    """``unshard()`` every FSDP module, then HVP w.r.t. the (now full) ``model.parameters()``."""
    model, extras = ctx.fresh()
    _unshard_all(extras)
    params = list(model.parameters())
    ctx.notes.append(f"params after unshard: {describe(params)}")
    local = flat(hvp(lambda: model(ctx.ref.X), ctx.ref.y, params, ctx.vs_like(params), ctx.notes))
    return ctx.check_hvp(local)


def chk_fsdp_unshard_keep(ctx: Ctx) -> float:
    """As ``unshard``, with resharding after forward and backward and gradient sync off."""
    model, extras = ctx.fresh()
    for m in extras["fsdp_modules"]:
        m.set_reshard_after_forward(False)
        m.set_reshard_after_backward(False)
        m.set_requires_gradient_sync(False)
    _unshard_all(extras)
    params = list(model.parameters())
    ctx.notes.append(f"params after unshard: {describe(params)}")
    errs = []
    for _ in range(2):
        local = flat(hvp(lambda: model(ctx.ref.X), ctx.ref.y, params, ctx.vs_like(params)))
        errs.append(ctx.check_hvp(local))
        ctx.notes.pop()
    ctx.notes.append(f"local HVP vs local-only ref {rel_err(local, ctx.ref.hvp_local):.1e}")
    for m in extras["fsdp_modules"]:
        m.reshard()
    sharded = list(model.parameters())
    ctx.notes.append(f"after reshard(): {describe(sharded)}; .grad "
                     f"{'written' if any(p.grad is not None for p in sharded) else 'none'}")
    ctx.state = (model, extras)  # type: ignore[attr-defined]
    return max(errs)


def _fsdp_settings(extras: dict[str, Any], reshard: bool, sync: bool) -> None:
    for m in extras["fsdp_modules"]:
        m.set_reshard_after_forward(reshard)
        m.set_reshard_after_backward(reshard)
        m.set_requires_gradient_sync(sync)


def _sharded_grad_note(ctx: Ctx, model: nn.Module) -> None:
    written = [p.grad is not None for p in model.parameters()]
    ctx.notes.append(f"sharded .grad written: {'yes' if any(written) else 'no'}")


def chk_fsdp_noreshard_after_forward(ctx: Ctx) -> float:
    """No resharding (forward/backward), no grad sync, no ``unshard()``: params after forward."""
    model, extras = ctx.fresh()
    _fsdp_settings(extras, reshard=False, sync=False)
    out = model(ctx.ref.X)
    params = list(model.parameters())
    ctx.notes.append(f"params after forward: {describe(params)}")
    local = flat(hvp(lambda: out, ctx.ref.y, params, ctx.vs_like(params)))
    for m in extras["fsdp_modules"]:
        m.reshard()
    _sharded_grad_note(ctx, model)
    return ctx.check_hvp(local)


def chk_fsdp_unshard_no_reshard_after_backward(ctx: Ctx) -> float:
    """``unshard()``; only ``set_reshard_after_backward(False)`` (forward setting as wrapped)."""
    model, extras = ctx.fresh()
    for m in extras["fsdp_modules"]:
        m.set_reshard_after_backward(False)
        m.set_requires_gradient_sync(False)
    return _hvp_unsharded(ctx, model, extras)


def _hvp_unsharded(ctx: Ctx, model: torch.nn.Module, extras: dict) -> float:
    """``unshard()``, the HVP on the unsharded parameters, ``reshard()``; checked."""
    _unshard_all(extras)
    params = list(model.parameters())
    local = flat(hvp(lambda: model(ctx.ref.X), ctx.ref.y, params, ctx.vs_like(params)))
    for m in extras["fsdp_modules"]:
        m.reshard()
    _sharded_grad_note(ctx, model)
    return ctx.check_hvp(local)


def chk_fsdp_unshard_keep_sync_on(ctx: Ctx) -> float:
    """``unshard()`` with no resharding but gradient sync left on; does it reduce-scatter?"""
    model, extras = ctx.fresh()
    _fsdp_settings(extras, reshard=False, sync=True)
    return _hvp_unsharded(ctx, model, extras)


def chk_fsdp_unshard_keep_jvp(ctx: Ctx) -> float:
    """``unshard()``, no resharding; dual parameters by ``functional_call`` on the FSDP model."""
    model, extras = ctx.fresh()
    _fsdp_settings(extras, reshard=False, sync=False)
    _unshard_all(extras)
    with fwAD.dual_level():
        duals = {n: fwAD.make_dual(p.detach(), ctx.ref.v[n]) for n, p in model.named_parameters()}
        out = functional_call(model, duals, (ctx.ref.X,))
        jv = fwAD.unpack_dual(out).tangent
    if jv is None:
        raise MismatchError("output has no tangent (dual parameters were not used)")
    return ctx.check(jv, ctx.ref.jvp_local)


def chk_fsdp_unshard_keep_func_jvp(ctx: Ctx) -> float:
    """``unshard()`` with no resharding; ``torch.func.jvp`` over ``functional_call``."""
    model, extras = ctx.fresh()
    _fsdp_settings(extras, reshard=False, sync=False)
    _unshard_all(extras)
    named = list(model.named_parameters())
    _, jv = torch.func.jvp(
        lambda *ps: functional_call(model, dict(zip([n for n, _ in named], ps)), (ctx.ref.X,)),
        tuple(p.detach() for _, p in named), tuple(ctx.ref.v[n] for n, _ in named),
    )
    return ctx.check(jv, ctx.ref.jvp_local)


def fsdp_then_train_step(ctx: Ctx) -> float:
    """After ``unshard_keep``: restore the FSDP settings, reshard, one normal training step."""
    state = getattr(ctx, "state", None)
    if state is None:
        raise RuntimeError("previous check failed before leaving a model to continue with")
    model, extras = state
    rs = ctx.wrapper.endswith("rsT")
    for m in extras["fsdp_modules"]:
        m.set_reshard_after_forward(rs)
        m.set_reshard_after_backward(True)
        m.set_requires_gradient_sync(True)
    loss_fn(model(ctx.ref.X), ctx.ref.y).backward()
    g = flat([p.grad for p in model.parameters()]) * WORLD
    return ctx.check(g, ctx.ref.grad_full)


def _replica_hvp_jvp(ctx: Ctx, full: dict[str, Tensor]) -> float:
    replica = make_mlp(ctx.dtype)
    replica.load_state_dict(full)
    params = list(replica.parameters())
    vs = [ctx.ref.v[n] for n in ctx.ref.names]
    err_h = ctx.check_hvp(flat(hvp(lambda: replica(ctx.ref.X), ctx.ref.y, params, vs)))
    with fwAD.dual_level():
        duals = {n: fwAD.make_dual(p.detach(), ctx.ref.v[n])
                 for n, p in replica.named_parameters()}
        jv = fwAD.unpack_dual(functional_call(replica, duals, (ctx.ref.X,))).tangent
    err_j = ctx.check(jv, ctx.ref.jvp_local)
    ctx.notes.append(f"JVP (dual params) err {err_j:.1e}")
    return max(err_h, err_j)


def _bytes(ts: Any) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def chk_fsdp_replica_full_tensor(ctx: Ctx) -> float:
    """Replica: ``{n: p.full_tensor()}`` into an unwrapped copy; HVP and JVP on it."""
    model, _ = ctx.fresh()
    full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    local_bytes = _bytes(p.to_local() for p in model.parameters())
    ctx.notes.append(f"replica params {_bytes(full.values())} B vs local shard {local_bytes} B")
    return _replica_hvp_jvp(ctx, full)


def chk_fsdp_replica_unshard(ctx: Ctx) -> float:
    """Replica: ``unshard()``, clone ``model.parameters()``, ``reshard()``; HVP and JVP."""
    model, extras = ctx.fresh()
    _unshard_all(extras)
    full = {n: p.detach().clone() for n, p in model.named_parameters()}
    for m in extras["fsdp_modules"]:
        m.reshard()
    ctx.notes.append(f"after reshard(): {describe(model.parameters())}")
    return _replica_hvp_jvp(ctx, full)


def chk_fsdp_state_dict_replica(ctx: Ctx) -> float:
    """Replica from ``get_model_state_dict(..., full_state_dict=True)``; HVP and JVP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model, _ = ctx.fresh()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    ctx.notes.append(f"state dict: {describe(full.values())}")
    return _replica_hvp_jvp(ctx, dict(full))


COMMON: list[tuple[str, Callable[[Ctx], float]]] = [
    ("backward (baseline)", chk_backward),
    ("grad create_graph (1st step)", chk_first_grad_create_graph),
    ("hvp: params before forward", chk_hvp_params),
    ("hvp: params after forward", chk_hvp_params_after_forward),
    ("hvp: functional_call leaves", chk_hvp_functional_call),
    ("jvp: func.jvp+functional_call", chk_jvp_func),
    ("jvp: dual params functional_call", chk_jvp_fwad),
    ("jvp: duals of own params", chk_jvp_fwad_inplace),
]
DDP: list[tuple[str, Callable[[Ctx], float]]] = [
    ("ddp: control, no product", chk_ddp_control),
    ("  -> then 2 ddp train steps", then_train_step),
    ("ddp: hvp through ddp x3", chk_hvp_repeat),
    ("  -> then 2 ddp train steps", then_train_step),
    ("ddp: train step, then hvp through ddp x3", chk_ddp_train_then_hvp),
    ("  -> then 2 ddp train steps", then_train_step),
    ("ddp: jvp dual params", chk_jvp_fwad),
    ("  -> then 2 ddp train steps", then_train_step),
    ("ddp: hvp functional_call", chk_hvp_functional_call),
    ("  -> then 2 ddp train steps", then_train_step),
    ("ddp: no_grad forward x3", chk_ddp_no_grad_forward),
    ("  -> then 2 ddp train steps", then_train_step),
    ("ddp: hvp in no_sync x3", chk_ddp_no_sync),
    ("  -> then 2 ddp train steps", then_train_step),
    ("ddp: hvp via ddp.module x3", chk_ddp_module),
    ("  -> then 2 ddp train steps", then_train_step),
    ("ddp: jvps via ddp.module", chk_ddp_module_jvp),
    ("  -> then 2 ddp train steps", then_train_step),
    ("ddp: hvp via dot.backward() (.grad)", chk_ddp_hvp_into_grad),
    ("  -> then 2 ddp train steps", then_train_step),
]
FSDP: list[tuple[str, Callable[[Ctx], float]]] = [
    ("fsdp: unshard() then hvp", chk_fsdp_unshard),
    ("fsdp: unshard, no reshard/sync, hvp x2", chk_fsdp_unshard_keep),
    ("  -> then fsdp train step", fsdp_then_train_step),
    ("fsdp: no reshard/sync, params after fwd, hvp", chk_fsdp_noreshard_after_forward),
    ("fsdp: unshard, no reshard after bwd only, hvp", chk_fsdp_unshard_no_reshard_after_backward),
    ("fsdp: unshard, no reshard, sync on, hvp", chk_fsdp_unshard_keep_sync_on),
    ("fsdp: unshard, no reshard: jvp dual params", chk_fsdp_unshard_keep_jvp),
    ("fsdp: unshard, no reshard: func.jvp", chk_fsdp_unshard_keep_func_jvp),
    ("fsdp: replica from full_tensor()", chk_fsdp_replica_full_tensor),
    ("fsdp: replica from unshard()+clone", chk_fsdp_replica_unshard),
    ("fsdp: replica from full state dict", chk_fsdp_state_dict_replica),
]


def checks_for(wrapper: str) -> list[tuple[str, Callable[[Ctx], float]]]:
    """The checks that apply to a wrapper."""
    if wrapper.startswith("ddp"):
        return COMMON + DDP
    if wrapper.startswith("fsdp"):
        return COMMON + FSDP
    return COMMON


# --- processes ---------------------------------------------------------------------------------
def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message, at most 200 characters."""
    for line in str(e).splitlines():
        if line.strip():
            return line.strip()[:200]
    return ""


def worker(rank: int, wrapper: str, dtype_name: str, port: int, out_dir: str) -> None:
    """One rank: run every check of ``wrapper`` and append a JSON row per check to a file."""
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(
        backend="gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=GLOO_TIMEOUT_S)
    )
    path = Path(out_dir) / f"rank{rank}.jsonl"
    try:
        ctx = Ctx(rank, wrapper, DTYPES[dtype_name])
        for check, fn in checks_for(wrapper):
            ctx.notes = []
            if not check.startswith("  ->"):
                ctx.state = None  # type: ignore[attr-defined]
            row: dict[str, Any] = {"wrapper": wrapper, "dtype": dtype_name, "check": check}
            t0 = time.perf_counter()
            try:
                row["rel_err"] = fn(ctx)
                row.update(works=True, error=None)
            except Exception as e:  # every failure is an outcome to record
                row.update(works=False, error=f"{type(e).__name__}: {first_line(e)}")
                if isinstance(e, MismatchError):
                    row["rel_err"] = float(str(e).split()[2])
            row["seconds"] = round(time.perf_counter() - t0, 3)
            row["note"] = "; ".join(ctx.notes)
            with path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pair(wrapper: str, dtype_name: str, timeout_s: float) -> list[dict[str, Any]]:
    """Run one (wrapper, dtype) in two fresh processes; merge their rows (bounded in time)."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(
            worker, args=(wrapper, dtype_name, free_port(), tmp), nprocs=WORLD, join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        failure = None
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    failure = f"TimeoutError: pair killed after {timeout_s:.0f} s"
                    break
        except Exception as e:  # a crashed rank is recorded, not raised
            failure = f"{type(e).__name__}: {first_line(e)}"
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
        per_rank = []
        for r in range(WORLD):
            path = Path(tmp) / f"rank{r}.jsonl"
            lines = path.read_text().splitlines() if path.exists() else []
            per_rank.append([json.loads(line) for line in lines])
    return merge(wrapper, dtype_name, per_rank, failure)


def merge(wrapper: str, dtype_name: str, per_rank: list[list[dict[str, Any]]],
          failure: str | None) -> list[dict[str, Any]]:
    """One row per check: rank 0's, marked where the ranks disagree or a rank never reported."""
    rows = []
    for i, (check, _) in enumerate(checks_for(wrapper)):
        got = [rr[i] for rr in per_rank if len(rr) > i]
        if len(got) < WORLD:
            rows.append({"wrapper": wrapper, "dtype": dtype_name, "check": check, "works": False,
                         "rel_err": None, "error": failure or "no report from a rank",
                         "note": "not reached on every rank", "seconds": None})
            continue
        row = dict(got[0])
        errs = [g.get("rel_err") for g in got if g.get("rel_err") is not None]
        row["rel_err"] = max(errs) if errs else None
        kinds = [(g["works"], (g["error"] or "").split(":")[0]) for g in got]
        if any(k != kinds[0] for k in kinds[1:]):
            row["works"] = all(g["works"] for g in got)
            row["note"] += " | ranks differ: " + " / ".join(str(g["error"]) for g in got)
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: one line per (wrapper, check), float64 and float32 side by side."""
    keyed: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    counters: dict[tuple[str, str], int] = {}
    for r in rows:
        k = (r["wrapper"], r["dtype"])
        idx = counters.get(k, 0)
        counters[k] = idx + 1
        keyed.setdefault((r["wrapper"], idx), {})[r["dtype"]] = r

    def cell(r: dict[str, Any] | None) -> tuple[str, str]:
        if r is None:
            return "-", "-"
        err = "-" if r.get("rel_err") is None else f"{r['rel_err']:.1e}"
        return ("yes" if r["works"] else "**no**"), err

    lines = [
        "| wrapper | check | f64 works | f64 rel err | f32 works | f32 rel err | error "
        "(first line) | note (float64) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (wrapper, _), d in keyed.items():
        r64, r32 = d.get("float64"), d.get("float32")
        base = r64 or r32
        assert base is not None
        err_txt = (base.get("error") or "").replace("|", "\\|")
        if r64 is not None and r32 is not None and r32.get("error"):
            if (r64.get("error") or "").split(":")[0] != r32["error"].split(":")[0]:
                err_txt += f" (float32: {r32['error']})".replace("|", "\\|")
        note = (base.get("note") or "").replace("|", "\\|")
        lines.append(
            f"| {wrapper} | {base['check'].replace('  ->', '→')} | {' | '.join(cell(r64))} | "
            f"{' | '.join(cell(r32))} | {err_txt} | {note} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every (wrapper, dtype) pair, print the table and write the JSON/Markdown results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wrappers", nargs="*", default=list(WRAPPERS), choices=WRAPPERS)
    parser.add_argument("--dtypes", nargs="*", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--timeout", type=float, default=SPAWN_TIMEOUT_S,
                        help="seconds per pair of processes before they are killed")
    parser.add_argument("--out", type=Path, default=RESULTS / "probe_parallel_wrappers.json")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for wrapper in args.wrappers:
        for dtype_name in args.dtypes:
            t1 = time.perf_counter()
            got = run_pair(wrapper, dtype_name, args.timeout)
            ok = sum(r["works"] for r in got)
            print(f"[{wrapper} {dtype_name}] {ok}/{len(got)} work "
                  f"({time.perf_counter() - t1:.1f} s)", flush=True)
            rows.extend(got)
    table = markdown(rows)
    print(table)
    meta = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "backend": "gloo",
        "world_size": WORLD,
        "examples_per_rank": N_PER_RANK,
        "model": "Linear(8,16)-Tanh-Linear(16,4), cross-entropy (sum)",
        "tolerance": {k: TOL[v] for k, v in DTYPES.items()},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"meta": meta, "rows": rows, "markdown": table}, indent=1) + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
