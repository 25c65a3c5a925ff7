"""Data-parallel operators on torch.distributed (gloo on loopback, 2 processes).

Each rank holds its own shard (100 and 156 examples, in batches); its operator built with
``process_group=`` must equal the single-process operator on the concatenated data (each
rank builds that reference too), products and top-5 eigenvalues to 1e-10 relative in
float64, and every rank must return the same eigenvalues. Failures on one rank must end
the run on the other with an error within 60 s, never a hang.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from curvops.adapters import seed_api
from curvops.linops import make_operator
from curvops.linops.data import shard_batches
from curvops.solvers import (
    cg,
    hutchinson_diagonal,
    hutchinson_trace,
    lanczos,
    lanczos_coefficients,
    minres,
    slq_quadrature,
)
from distributed_harness import check_all_ok, run_ranks
from torch import nn

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)

SHARDS = (100, 156)
OPERATORS = ("hessian", "ggn", "empirical_fisher", "fisher_mc")


# ----------------------------------------------------------------------------- problems
def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def all_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """256 examples: rank 0's 100 as two batches, rank 1's 156 as three."""
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(sum(SHARDS), 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (sum(SHARDS),), generator=gen)
    cuts = [0, 60, 100, 164, 228, 256]
    return [(X[a:b], y[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]


def rank_batches(rank: int) -> list:
    return all_batches()[:2] if rank == 0 else all_batches()[2:]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


# ----------------------------------------------------------------------------- workers
def operators_worker(rank: int) -> dict:
    group = torch.distributed.group.WORLD
    model = mlp()
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3,
                    generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = {}
    for reduction in ("mean", "sum"):
        loss = nn.CrossEntropyLoss(reduction=reduction)
        for name in OPERATORS:
            kwargs = {"seed": 3} if name == "fisher_mc" else {}
            dist_op = make_operator(name, model, loss, rank_batches(rank),
                                    process_group=group, **kwargs)
            ref_op = make_operator(name, model, loss, all_batches(), **kwargs)
            res = lanczos(dist_op, 5, reorth="full", tol=1e-12, seed=0, maxiter=120)
            ref = lanczos(ref_op, 5, reorth="full", tol=1e-12, seed=0, maxiter=120)
            out[(reduction, name)] = {
                "matmat": rel(dist_op.matmat(V), ref_op.matmat(V)),
                "matvec": rel(dist_op.matvec(V[:, 0]), ref_op.matvec(V[:, 0])),
                "eig": np.asarray(res.eigenvalues), "ref": np.asarray(ref.eigenvalues),
                "converged": bool(res.all_converged), "examples": dist_op.total.examples,
                "local": dist_op.local_total.examples, "offset": dist_op.example_offset,
            }
    # The other solvers, in lockstep: the same bits on every rank, the single process's
    # results to round-off.
    loss = nn.CrossEntropyLoss()
    op = make_operator("ggn", model, loss, rank_batches(rank), process_group=group)
    ref_op = make_operator("ggn", model, loss, all_batches())
    b = V[:, 0]
    for name, run in {
        "slq": lambda A: np.concatenate(
            [np.concatenate(q) for q in (lambda r: (r.nodes, r.weights))(
                slq_quadrature(A, num_probes=2, lanczos_steps=10, seed=0))]),
        "coefficients": lambda A: np.concatenate(
            [np.concatenate([np.asarray(x) for x in (*c.alphas, *c.betas)])
             for c in [lanczos_coefficients(A, V[:, :2], 12)]]),
        "cg": lambda A: cg(A, b, damping=1e-2, tol=1e-12, maxiter=200).x.numpy(),
        "minres": lambda A: minres(A, b, damping=1e-2, tol=1e-12, maxiter=200).x.numpy(),
        "trace": lambda A: np.asarray([hutchinson_trace(A, num_probes=8, seed=0).value]),
        "diagonal": lambda A: hutchinson_diagonal(A, num_probes=8, seed=0).diagonal.numpy(),
        "thick_restart": lambda A: np.asarray(lanczos(
            A, 4, ncv=7, tol=1e-12, seed=0, maxiter=400, return_eigenvectors=False
        ).eigenvalues),
    }.items():
        got, want = run(op), run(ref_op)
        out[name] = {"got": got, "rel": float(np.linalg.norm(got - want) / np.linalg.norm(want))}
    return out


def gpt2_worker(rank: int) -> dict:
    transformers = pytest.importorskip("transformers")
    from curvops.validation.zoo import token_data

    config = transformers.GPT2Config(vocab_size=40, n_positions=12, n_embd=16, n_layer=1,
                                     n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    (batch,) = token_data(4, 10, 40, seed=2)
    ranks = [{k: v[:1, :int(batch["attention_mask"][:1].sum(1).max())] for k, v in batch.items()},
             {k: v[1:] for k, v in batch.items()}]
    kwargs = {"k": 5, "max_iter": 80, "tol": 1e-12, "micro_batch_size": None}
    dist = seed_api.compute_fisher_eigenvalues_lanczos(
        model, ranks[rank], process_group=torch.distributed.group.WORLD, **kwargs)
    single = seed_api.compute_fisher_eigenvalues_lanczos(model, ranks, **kwargs)
    return {"dist": np.asarray(dist["top_eigenvalues"]),
            "single": np.asarray(single["top_eigenvalues"]),
            "converged": dist["metadata"]["converged"],
            "tokens": (dist["metadata"]["num_loss_terms"], single["metadata"]["num_loss_terms"]),
            "ranks": dist["metadata"]["ranks"]}


class _Failing(nn.Module):
    """Wraps a model; on rank 1 its ``fail_at``-th forward pass raises (or the process dies)."""

    def __init__(self, inner: nn.Module, rank: int, fail_at: int, how: str) -> None:
        super().__init__()
        self.inner, self.rank, self.fail_at, self.how, self.calls = inner, rank, fail_at, how, 0

    def forward(self, x):
        self.calls += 1
        if self.rank == 1 and self.calls >= self.fail_at:
            if self.how == "exit":
                import os

                os._exit(7)
            raise MemoryError("simulated out of memory on rank 1")
        return self.inner(x)


def failing_worker(rank: int, fail_at: int, how: str) -> str:
    model = _Failing(mlp(), rank, fail_at, how)
    op = make_operator("ggn", model, nn.CrossEntropyLoss(), rank_batches(rank),
                       process_group=torch.distributed.group.WORLD, cache="none")
    lanczos(op, 5, reorth="full", tol=1e-12, seed=0)
    return "finished"


def nan_shard_worker(rank: int) -> str:
    batches = rank_batches(rank)
    if rank == 1:
        X, y = batches[0]
        X = X.clone()
        X[0, 0] = float("nan")
        batches = [(X, y), *batches[1:]]
    make_operator("ggn", mlp(), nn.CrossEntropyLoss(), batches,
                  process_group=torch.distributed.group.WORLD)
    return "built"


def disagreement_worker(rank: int, what: str) -> str:
    group = torch.distributed.group.WORLD
    model = mlp(seed=rank if what == "model" else 0)
    op = make_operator("ggn", model, nn.CrossEntropyLoss(), rank_batches(rank),
                       process_group=group)
    lanczos(op, 3, seed=rank if what == "seed" else 0)
    return "finished"


def ddp_worker(rank: int) -> dict:
    group = torch.distributed.group.WORLD
    model = mlp()
    ddp = nn.parallel.DistributedDataParallel(model)
    loss = nn.CrossEntropyLoss()
    op = make_operator("hessian", ddp, loss, rank_batches(rank), process_group=group)
    ref = make_operator("hessian", model, loss, all_batches())
    V = torch.randn(op.shape[0], 2, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    refused = ""
    try:
        make_operator("hessian", ddp, loss, rank_batches(rank))
    except ValueError as err:
        refused = str(err)
    sharded = ""
    from torch.distributed.fsdp import fully_shard

    try:
        make_operator("hessian", fully_shard(mlp()), loss, rank_batches(rank),
                      process_group=group)
    except TypeError as err:
        sharded = str(err)
    return {"rel": rel(op.matmat(V), ref.matmat(V)), "refused": refused, "sharded": sharded}


def resume_worker(rank: int, path: str, crash_at: int | None) -> dict:
    """A distributed Lanczos run that both ranks abandon at product ``crash_at``."""
    group = torch.distributed.group.WORLD
    op = make_operator("ggn", mlp(), nn.CrossEntropyLoss(), rank_batches(rank),
                       process_group=group)

    class Crashing:
        def __init__(self) -> None:
            self.shape, self.dtype, self.device = op.shape, op.dtype, op.device
            self.process_group, self.count = group, 0
            self.parameters_fixed = op.parameters_fixed

        def matvec(self, x):
            self.count += 1
            if crash_at is not None and self.count > crash_at:
                raise KeyboardInterrupt  # not an Exception: no status collective
            return op.matvec(x)

    kwargs = {"reorth": "full", "tol": 1e-12, "seed": 0, "checkpoint_path": path,
              "checkpoint_every": 5}
    try:
        lanczos(Crashing(), 5, **kwargs)
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True
    import os

    written = os.path.exists(path)
    crash_at = None  # the restarted run goes to the end (Crashing reads it at each product)
    again = Crashing()
    res = lanczos(again, 5, **kwargs)
    return {"interrupted": interrupted, "written": written, "eig": np.asarray(res.eigenvalues),
            "resumed_from": res.resumed_from, "products": again.count,
            "left": os.path.exists(path)}


# ----------------------------------------------------------------------------- tests
def test_shard_batches_keeps_the_order_and_evens_out_the_ranks():
    batches = all_batches()
    shards = [shard_batches(batches, r, 3) for r in range(3)]
    ys = [torch.cat([b[1] for b in s]) for s in shards]
    assert [len(y) for y in ys] == [86, 85, 85]
    assert torch.equal(torch.cat(ys), torch.cat([b[1] for b in batches]))
    with pytest.raises(ValueError, match="cannot shard 2 examples over 3 ranks"):
        shard_batches((torch.zeros(2, 1), torch.zeros(2)), 0, 3)


def test_distributed_operators_equal_the_single_process_operator():
    ranks = check_all_ok(run_ranks(operators_worker))
    others = ("slq", "coefficients", "cg", "minres", "trace", "diagonal", "thick_restart")
    for key in others:
        assert ranks[0][key]["rel"] <= 1e-10, (key, ranks[0][key]["rel"])
        assert np.array_equal(ranks[0][key]["got"], ranks[1][key]["got"]), key
    for key in ranks[0]:
        if key in others:
            continue
        for r, out in enumerate(ranks):
            row = out[key]
            assert row["matmat"] <= 1e-10, (key, r, row["matmat"])
            assert row["matvec"] <= 1e-10, (key, r, row["matvec"])
            np.testing.assert_allclose(row["eig"], row["ref"], rtol=1e-10, atol=0)
            assert row["converged"], key
            assert row["examples"] == 256 and row["local"] == SHARDS[r]
            assert row["offset"] == (0 if r == 0 else SHARDS[0])
        # Lockstep: the ranks return the same bits.
        assert np.array_equal(ranks[0][key]["eig"], ranks[1][key]["eig"]), key


@pytest.mark.hf
def test_gpt2_ranks_with_padded_sequences_give_the_single_process_top5():
    ranks = check_all_ok(run_ranks(gpt2_worker))
    for out in ranks:
        np.testing.assert_allclose(out["dist"], out["single"], rtol=1e-10, atol=0)
        assert all(out["converged"])
        assert out["tokens"][0] == out["tokens"][1]
        assert out["ranks"] == 2
    assert np.array_equal(ranks[0]["dist"], ranks[1]["dist"])


@pytest.mark.parametrize("how", ["raise", "exit"])
def test_a_failing_rank_ends_the_run_on_the_other_within_60s(how):
    # Forward pass 14 on rank 1 is inside Lanczos (construction makes 3, each product 2).
    rank0, rank1 = run_ranks(failing_worker, args=(14, how), timeout=90)
    assert rank0.error_type in ("RankFailedError",), rank0.error
    assert rank0.seconds < 60
    if how == "raise":
        assert rank1.error_type == "MemoryError"
        assert "rank 1 of the process group failed in the product" in rank0.error
    else:
        assert rank1.exitcode == 7


def test_a_bad_shard_on_one_rank_is_refused_on_every_rank():
    rank0, rank1 = run_ranks(nan_shard_worker, timeout=90)
    assert rank1.error_type == "ValueError" and "NaN" in rank1.error
    assert rank0.error_type == "RankFailedError"
    assert "building the operator" in rank0.error


@pytest.mark.parametrize("what", ["model", "seed"])
def test_ranks_that_disagree_are_refused(what):
    outcomes = run_ranks(disagreement_worker, args=(what,), timeout=90)
    for o in outcomes:
        assert o.error_type == "RanksDisagreeError", o.error
        assert ("the model" if what == "model" else "vectors of a product") in o.error


def test_ddp_models_are_used_through_their_module_fsdp2_shards_are_refused():
    for out in check_all_ok(run_ranks(ddp_worker)):
        assert out["rel"] <= 1e-10
        assert "process_group is None" in out["refused"]
        assert "is a DTensor sharded across ranks" in out["sharded"]


def test_distributed_resume_rank0_writes_every_rank_reads(tmp_path):
    path = str(tmp_path / "lanczos.pt")
    ranks = check_all_ok(run_ranks(resume_worker, args=(path, 23)))
    fresh = check_all_ok(run_ranks(resume_worker, args=(str(tmp_path / "fresh.pt"), None)))
    for out, ref in zip(ranks, fresh, strict=True):
        assert out["interrupted"] and out["written"]
        assert out["resumed_from"] == 20
        assert np.array_equal(out["eig"], ref["eig"])
        assert out["products"] < ref["products"]
        assert not out["left"]
    assert np.array_equal(ranks[0]["eig"], ranks[1]["eig"])


def test_process_group_argument_is_checked_before_any_work():
    with pytest.raises(TypeError, match="process_group must be"):
        make_operator("ggn", mlp(), nn.CrossEntropyLoss(), all_batches(), process_group=3)
    with pytest.raises(ValueError, match="process_group is None"):
        make_operator("ggn", _fake_ddp(), nn.CrossEntropyLoss(), all_batches())


def _fake_ddp() -> nn.Module:
    """A DistributedDataParallel instance without a process group (not called)."""
    ddp = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    nn.Module.__init__(ddp)
    ddp.module = mlp()
    return ddp


def test_torchrun_spectrum_prints_the_single_process_report_once(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this python")
    args = ["spectrum", "mlp", "--k", "3", "--dtype", "float64", "--tol", "1e-12",
            "--operator", "ef"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    single = subprocess.run([sys.executable, "-m", "curvops", *args], capture_output=True,
                            text=True, timeout=120, env=env, cwd=tmp_path)
    many = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2",
                           "-m", "curvops", *args, "--timeout", "60"], capture_output=True,
                          text=True, timeout=180, env=env, cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    assert many.returncode == 0, many.stderr
    assert many.stdout.count('"top_eigenvalues"') == 1  # rank 0 prints, rank 1 does not
    one, two = json.loads(single.stdout), json.loads(many.stdout)
    np.testing.assert_allclose(two["top_eigenvalues"], one["top_eigenvalues"], rtol=1e-10)
    assert two["metadata"]["ranks"] == 2 and one["metadata"]["ranks"] == 1
    assert two["metadata"]["num_examples"] == one["metadata"]["num_examples"]


def seed_api_worker(rank: int) -> dict:
    group = torch.distributed.group.WORLD
    kw = {"k": 3, "loss_fn": nn.CrossEntropyLoss(), "max_iter": 60, "tol": 1e-12}
    out = {}
    for name, fn in (("hessian", seed_api.compute_hessian_eigenvalues_lanczos),
                     ("spectrum_ef", lambda *a, **k: seed_api.compute_spectrum(
                         *a, operator_type="empirical_fisher", **k))):
        out[name] = (fn(mlp(), rank_batches(rank), process_group=group, **kw)["top_eigenvalues"],
                     fn(mlp(), all_batches(), **kw)["top_eigenvalues"])
    both = seed_api.compute_spectrum_comparison(mlp(), rank_batches(rank), process_group=group,
                                                **kw)
    alone = seed_api.compute_spectrum_comparison(mlp(), all_batches(), **kw)
    out["comparison"] = (both["hessian"]["top_eigenvalues"], alone["hessian"]["top_eigenvalues"])
    return out


def test_every_seed_api_function_takes_a_process_group():
    ranks = check_all_ok(run_ranks(seed_api_worker))
    for out in ranks:
        for name, (dist_top, single_top) in out.items():
            np.testing.assert_allclose(dist_top, single_top, rtol=1e-10, err_msg=name)
    assert ranks[0] == ranks[1]
