"""Checkpoint and resume of the Lanczos solver: a run that crashed and resumed from its last
checkpoint returns bit for bit what an uninterrupted run returns; a checkpoint of another
operator, dtype or settings, or a damaged one, is refused; writes are atomic; the file is
plain tensors (``weights_only=True``) and is removed when the run finishes."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from curvops.solvers import CheckpointError, LanczosConfig, LanczosResult, _checkpoint, lanczos

STRATEGIES = ("full", "selective", "partial", "none")


# ----------------------------------------------------------------------------- helpers
def sym_from_spectrum(ev: np.ndarray, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((ev.size, ev.size)))
    A = (Q * ev) @ Q.T
    return torch.from_numpy((A + A.T) / 2)


def decaying(n: int = 100, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return sym_from_spectrum(np.concatenate([10 * 0.8 ** np.arange(20),
                                             rng.uniform(0, 0.1, n - 20)]), seed)


class CrashError(RuntimeError):
    """The simulated crash."""


class Crashing:
    """A torch operator that raises :class:`CrashError` on product number ``limit + 1``
    (probe products included), like a process killed mid-run; ``limit=None`` never does.

    It wraps a dense matrix or a curvops operator (delegating ``matmat`` and
    ``parameters_fixed``, so it gives the same bits as the operator itself).
    """

    def __init__(self, A, limit: int | None = None) -> None:
        self.A, self.limit, self.count = A, limit, 0
        self.shape, self.dtype = tuple(A.shape), A.dtype
        self.device = getattr(A, "device", torch.device("cpu"))
        hold = getattr(A, "parameters_fixed", None)
        if callable(hold):
            self.parameters_fixed = hold

    def _tick(self, products: int) -> None:
        self.count += products
        if self.limit is not None and self.count > self.limit:
            raise CrashError(f"simulated crash at product {self.count}")

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        self._tick(1)
        return self.A.matvec(x) if hasattr(self.A, "matvec") else self.A @ x

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        self._tick(X.shape[1])
        return self.A.matmat(X) if hasattr(self.A, "matmat") else self.A @ X


def crash_then_resume(make_op, path: Path, limit: int, **kwargs) -> LanczosResult | None:
    """Run until product ``limit`` crashes it, then run again with a fresh operator.

    Returns the resumed run's result, or None when the run finished before the crash.
    """
    try:
        lanczos(Crashing(make_op(), limit), checkpoint_path=path, **kwargs)
    except CrashError:
        return lanczos(Crashing(make_op()), checkpoint_path=path, **kwargs)
    return None


def assert_bit_identical(ref: LanczosResult, res: LanczosResult) -> None:
    """Eigenvalues, vectors, residuals, flags and counts bit for bit (timings aside)."""
    assert np.array_equal(res.eigenvalues, ref.eigenvalues)
    assert np.array_equal(res.converged, ref.converged)
    assert np.array_equal(res.residual_norms, ref.residual_norms)
    assert res.matvecs == ref.matvecs and res.iterations == ref.iterations
    assert res.verification_matvecs == ref.verification_matvecs
    assert res.breakdowns == ref.breakdowns
    assert res.reorthogonalizations == ref.reorthogonalizations
    assert res.spurious_removed == ref.spurious_removed
    assert res.process_eps == ref.process_eps and res.tol_used == ref.tol_used
    assert (res.operator_accuracy == ref.operator_accuracy
            or (math.isnan(res.operator_accuracy) and math.isnan(ref.operator_accuracy)))
    assert (res.orthogonality_loss == ref.orthogonality_loss
            or (math.isnan(res.orthogonality_loss) and math.isnan(ref.orthogonality_loss)))
    if ref.eigenvectors is None:
        assert res.eigenvectors is None
    else:
        assert torch.equal(res.eigenvectors, ref.eigenvectors)
    if ref.history is not None:
        assert len(res.history) == len(ref.history)
        assert all(np.array_equal(a, b) for a, b in zip(res.history, ref.history))
    resumed = [note for note in res.notes if note.startswith("resumed from the checkpoint")]
    assert [n for n in res.notes if n not in resumed] == list(ref.notes)
    assert len(resumed) == (1 if res.resumed_from else 0)


# ------------------------------------------------------------- resume is bit-identical
@pytest.mark.parametrize("reorth", STRATEGIES)
def test_resume_after_a_crash_is_bit_identical(tmp_path: Path, reorth: str) -> None:
    """A crash at every product of the run (checkpoints every 2 iterations): the resumed
    run's values, flags, residuals and matvec count equal the uninterrupted run's."""
    A = decaying()
    kwargs = {"k": 4, "tol": 1e-12, "maxiter": 80, "reorth": reorth, "checkpoint_every": 2}
    ref = lanczos(Crashing(A), **{key: v for key, v in kwargs.items()
                                  if key != "checkpoint_every"})
    assert ref.all_converged
    path = tmp_path / "run.ckpt"
    resumed = 0
    for limit in range(1, ref.matvecs + 1):  # product 1 is the fingerprint's probe
        res = crash_then_resume(lambda: A.clone(), path, limit, **kwargs)
        if res is None:
            continue
        assert_bit_identical(ref, res)
        assert res.fingerprint_matvecs == 1
        resumed += res.resumed_from > 0
        assert not path.exists()  # the finished run removed its checkpoint
        assert list(tmp_path.iterdir()) == []  # and no temporary file is left
    # Every crash after the first checkpoint resumed from one.
    assert resumed >= ref.iterations - 3


@pytest.mark.parametrize("ncv, every", [(6, 3), (9, 2)])
def test_a_thick_restart_resumes_bit_identically(tmp_path: Path, ncv: int, every: int) -> None:
    """The restarted recurrence (several restarts): a crash at every product, the resumed
    run equal to the uninterrupted one bit for bit."""
    A = decaying()
    kwargs = {"k": 4, "tol": 1e-12, "maxiter": 200, "ncv": ncv,
              "checkpoint_every": every, "record_history": True}
    ref = lanczos(Crashing(A), **{key: v for key, v in kwargs.items()
                                  if key != "checkpoint_every"})
    assert ref.all_converged and ref.restarts >= 3
    path = tmp_path / "run.ckpt"
    resumed = 0
    for limit in range(1, ref.matvecs + 1):
        res = crash_then_resume(lambda: A.clone(), path, limit, **kwargs)
        if res is None:
            continue
        assert_bit_identical(ref, res)
        assert res.restarts == ref.restarts and res.ncv == ncv
        resumed += res.resumed_from > 0
        assert list(tmp_path.iterdir()) == []
    assert resumed >= ref.iterations - 4


@pytest.mark.parametrize("reorth", STRATEGIES)
def test_resume_with_noisy_products_breakdowns_and_history(tmp_path: Path, reorth: str) -> None:
    """The harder states: a measured operator defect (deterministic non-symmetric noise,
    which raises eps_A and recalibrates the strategies), a low-rank operator (breakdowns,
    fresh vectors from the generator) with the recorded history, and a float32 operator
    (with "full": a bf16 basis and its Rayleigh–Ritz step on the recorded relation)."""
    rng = np.random.default_rng(5)
    n = 90
    noisy = decaying(n, seed=3) + torch.from_numpy(1e-7 * rng.standard_normal((n, n)))
    low_rank = sym_from_spectrum(np.concatenate([[5.0, 3.0, 1.0], np.zeros(n - 3)]), seed=4)
    for A, kwargs in ((noisy, {"k": 4, "tol": 1e-9, "maxiter": 60}),
                      (low_rank, {"k": 5, "tol": 1e-10, "maxiter": 40,
                                  "record_history": True}),
                      (noisy.float(), {"k": 3, "tol": 1e-5, "maxiter": 40,
                                       "basis_dtype": torch.bfloat16 if reorth == "full"
                                       else None})):
        kwargs = dict(kwargs, reorth=reorth)
        ref = lanczos(Crashing(A), **kwargs)
        if A is noisy:
            assert ref.process_eps > 1e-15
        elif A is low_rank:
            assert ref.breakdowns >= 1
        else:
            assert ref.rayleigh_ritz == (reorth == "full")
        for limit in range(2, ref.matvecs + 1, 5):
            res = crash_then_resume(lambda A=A: A.clone(), tmp_path / "r.ckpt", limit,
                                    checkpoint_every=1 + limit % 2, **kwargs)
            if res is not None:
                assert_bit_identical(ref, res)


def test_config_and_keywords_write_and_resume_the_same_checkpoint(tmp_path: Path) -> None:
    """``LanczosConfig(checkpoint_path=..., checkpoint_every=...)`` works as the keywords;
    ``checkpoint_every`` does not change the result, so the resume may use another."""
    A = decaying(60)
    path = tmp_path / "c.ckpt"
    cfg = LanczosConfig(k=3, tol=1e-12, reorth="partial", checkpoint_path=path,
                        checkpoint_every=4)
    ref = lanczos(Crashing(A), config=LanczosConfig(k=3, tol=1e-12, reorth="partial"))
    with pytest.raises(CrashError):
        lanczos(Crashing(A, 14), config=cfg)
    assert path.exists()
    res = lanczos(Crashing(A), 3, tol=1e-12, reorth="partial", checkpoint_path=str(path),
                  checkpoint_every=1)
    assert res.resumed_from == 12
    assert_bit_identical(ref, res)


def test_no_file_starts_fresh_and_the_probe_is_counted_apart(tmp_path: Path) -> None:
    A = decaying(60)
    ref = lanczos(Crashing(A), 3, tol=1e-12)
    op = Crashing(A)
    res = lanczos(op, 3, tol=1e-12, checkpoint_path=tmp_path / "fresh.ckpt",
                  checkpoint_every=3)
    assert res.resumed_from == 0 and res.fingerprint_matvecs == 1
    assert res.matvecs == ref.matvecs and op.count == ref.matvecs + 1
    assert res.checkpoint_seconds > 0
    assert_bit_identical(ref, res)
    assert ref.fingerprint_matvecs == 0 and ref.checkpoint_seconds == 0.0
    assert list(tmp_path.iterdir()) == []


def test_ggn_of_a_tiny_mlp_resumes_bit_identically(tmp_path: Path) -> None:
    """A curvops GGN of a float64 MLP: a crash, then a fresh operator of the same model."""
    linops = pytest.importorskip("curvops.linops")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 4)).double()
    X = torch.randn(40, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (40,))
    data = [(X[:20], y[:20]), (X[20:], y[20:])]

    def make_op():
        return linops.GGNOperator(model, torch.nn.CrossEntropyLoss(), data)

    for reorth in ("full", "none"):
        kwargs = {"k": 4, "tol": 1e-10, "reorth": reorth}
        ref = lanczos(make_op(), **kwargs)
        res = crash_then_resume(make_op, tmp_path / "ggn.ckpt", 12, checkpoint_every=5,
                                **kwargs)
        assert res is not None and res.resumed_from == 10
        assert_bit_identical(ref, res)


# ------------------------------------------------------------------------- refusals
def _crashed_checkpoint(tmp_path: Path, A: torch.Tensor, **kwargs) -> Path:
    path = tmp_path / "run.ckpt"
    with pytest.raises(CrashError):
        lanczos(Crashing(A, 12), checkpoint_path=path, checkpoint_every=2, **kwargs)
    assert path.exists()
    return path


def test_checkpoint_of_another_operator_or_dtype_is_refused(tmp_path: Path) -> None:
    A = decaying(60)
    path = _crashed_checkpoint(tmp_path, A, k=3, tol=1e-12)
    other = decaying(60, seed=9)
    with pytest.raises(CheckpointError, match="probe vector differs"):
        lanczos(Crashing(other), 3, tol=1e-12, checkpoint_path=path)
    with pytest.raises(CheckpointError, match=r"operator dtype: checkpoint 'torch.float64', "
                                              r"now 'torch.float32'"):
        lanczos(Crashing(A.float()), 3, tol=1e-12, checkpoint_path=path)
    with pytest.raises(CheckpointError, match=r"operator n: checkpoint 60, now 59"):
        lanczos(Crashing(A[:59, :59].contiguous()), 3, tol=1e-12, checkpoint_path=path)
    # A refusal is a ValueError, and it keeps the file (it may be the user's mistake).
    with pytest.raises(ValueError):
        lanczos(Crashing(other), 3, tol=1e-12, checkpoint_path=path)
    assert path.exists()
    # The right operator still resumes from it.
    assert lanczos(Crashing(A), 3, tol=1e-12, checkpoint_path=path).resumed_from == 10


@pytest.mark.parametrize(("change", "named"), [
    ({"tol": 1e-8}, "tol: checkpoint 1e-12, now 1e-08"),
    ({"k": 2}, "k: checkpoint 3, now 2"),
    ({"maxiter": 70}, "maxiter: checkpoint 300, now 70"),
    ({"reorth": "partial"}, "reorth: checkpoint full, now partial"),
    ({"seed": 1}, "seed: checkpoint 0, now 1"),
    ({"v0": torch.ones(60, dtype=torch.float64)}, "v0 (the start vector's SHA-256)"),
    ({"which": "SA"}, "which: checkpoint LA, now SA"),
    ({"verify": False}, "verify: checkpoint True, now False"),
    ({"operator_eps": 1e-10}, "operator_eps: checkpoint None, now 1e-10"),
    ({"return_eigenvectors": False}, "return_eigenvectors"),
    ({"basis_dtype": torch.float32}, "basis_dtype: checkpoint torch.float64, now torch.float32"),
])
def test_checkpoint_of_other_settings_is_refused(tmp_path: Path, change: dict,
                                                 named: str) -> None:
    A = decaying(60)
    path = _crashed_checkpoint(tmp_path, A, k=3, tol=1e-12)
    kwargs = {"k": 3, "tol": 1e-12, **change}
    with pytest.raises(CheckpointError, match="belongs to another run") as info:
        lanczos(Crashing(A), checkpoint_path=path, **kwargs)
    assert named in str(info.value)
    assert path.exists()


def test_damaged_checkpoint_is_refused_not_silently_restarted(tmp_path: Path) -> None:
    """A truncated, garbled, foreign or inconsistent file is an error naming the file:
    starting afresh silently would hide the damage and throw the saved work away."""
    A = decaying(60)
    path = _crashed_checkpoint(tmp_path, A, k=3, tol=1e-12)
    good = path.read_bytes()
    cases = {
        "truncated": good[: len(good) // 2],
        "garbage": b"\x00not a checkpoint" * 10,
        "empty": b"",
    }
    for name, raw in cases.items():
        path.write_bytes(raw)
        with pytest.raises(CheckpointError, match="cannot be read.*damaged"):
            lanczos(Crashing(A), 3, tol=1e-12, checkpoint_path=path)
        assert path.read_bytes() == raw, name  # left for the user to inspect
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="not a curvops Lanczos checkpoint"):
        lanczos(Crashing(A), 3, tol=1e-12, checkpoint_path=path)
    # A file whose fingerprint matches but whose state does not fit the run.
    payload = torch.load(io.BytesIO(good), weights_only=True)
    payload["state"]["alpha"] = payload["state"]["alpha"][:-1]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="state is inconsistent"):
        lanczos(Crashing(A), 3, tol=1e-12, checkpoint_path=path)
    payload = torch.load(io.BytesIO(good), weights_only=True)
    payload["version"] = 99
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="format version 99"):
        lanczos(Crashing(A), 3, tol=1e-12, checkpoint_path=path)


@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    ({"checkpoint_every": 0}, ValueError, "checkpoint_every must be an int >= 1, got 0"),
    ({"checkpoint_every": -2}, ValueError, "checkpoint_every"),
    ({"checkpoint_every": 2.0}, ValueError, "checkpoint_every"),
    ({"checkpoint_every": "5"}, ValueError, "checkpoint_every"),
    ({"checkpoint_path": 17}, TypeError, "checkpoint_path must be None, a str or an os.PathLike"),
    ({"checkpoint_path": b"x.ckpt"}, TypeError, "checkpoint_path"),
    ({"checkpoint_path": "/nonexistent-folder-curvops/x.ckpt"}, ValueError, "does not exist"),
    ({"checkpoint_path": "."}, ValueError, "is a folder"),
])
def test_checkpoint_settings_are_checked_before_any_product(kwargs, exc, match) -> None:
    op = Crashing(decaying(30), limit=0)  # any product raises CrashError
    with pytest.raises(exc, match=match):
        lanczos(op, 3, **kwargs)
    assert op.count == 0
    with pytest.raises(exc, match=r"config\.checkpoint_"):
        lanczos(op, 3, config=_unchecked_config(**kwargs))
    assert op.count == 0


def _unchecked_config(**fields) -> LanczosConfig:
    """A config holding a bad field (built valid, then changed: the call must check it)."""
    cfg = LanczosConfig()
    for name, value in fields.items():
        setattr(cfg, name, value)
    return cfg


# ------------------------------------------------------------------- file and format
def _leaves(obj, where="payload"):
    if isinstance(obj, dict):
        for key, value in obj.items():
            assert isinstance(key, str), where
            yield from _leaves(value, f"{where}[{key!r}]")
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            yield from _leaves(value, f"{where}[{i}]")
    else:
        yield where, obj


@pytest.mark.parametrize("reorth", STRATEGIES)
def test_checkpoint_is_plain_tensors_and_loads_with_weights_only(tmp_path: Path,
                                                                 reorth: str) -> None:
    A = decaying(60)
    path = _crashed_checkpoint(tmp_path, A, k=3, tol=1e-12, reorth=reorth)
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "curvops.lanczos.checkpoint" and payload["version"] == 1
    plain = (torch.Tensor, int, float, bool, str, type(None))
    for where, leaf in _leaves(payload):
        assert isinstance(leaf, plain), (where, type(leaf))
    state = payload["state"]
    assert state["m"] == 10 and len(state["alpha"]) == 10
    vectors = state["strategy"]
    if reorth == "none":  # four vectors at most: no basis
        assert {k for k, v in vectors.items() if isinstance(v, torch.Tensor)} == {
            "v_start", "v_prev", "v"}
    else:  # the basis v_0..v_m, rows of its own tensor (not a view of a larger block)
        assert vectors["basis"].shape == (11, 60)
        assert vectors["basis"].untyped_storage().nbytes() == 11 * 60 * 8


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """Atomicity: a write that fails midway (disk full) leaves the previous checkpoint whole
    and no temporary file; the run that resumes from it is still bit-identical."""
    A = decaying(60)
    ref = lanczos(Crashing(A), 3, tol=1e-12)
    path = tmp_path / "run.ckpt"
    real_save = torch.save
    calls = []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(obj["state"]["m"])
        if len(calls) == 3:
            f.write(b"half a checkpoint")
            raise OSError("No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(_checkpoint.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        lanczos(Crashing(A), 3, tol=1e-12, checkpoint_path=path, checkpoint_every=2)
    monkeypatch.undo()
    assert calls == [2, 4, 6]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt"]
    assert torch.load(path, weights_only=True)["state"]["m"] == 4
    res = lanczos(Crashing(A), 3, tol=1e-12, checkpoint_path=path, checkpoint_every=2)
    assert res.resumed_from == 4
    assert_bit_identical(ref, res)


def test_a_stale_temporary_file_is_removed_when_the_run_finishes(tmp_path: Path) -> None:
    """A process killed inside a write can leave its temporary file; the finished run
    clears it with its checkpoint (another file of the folder is not touched)."""
    A = decaying(60)
    path = _crashed_checkpoint(tmp_path, A, k=3, tol=1e-12)
    stale = tmp_path / ".run.ckpt.abc123.tmp"
    stale.write_bytes(b"partial")
    keep = tmp_path / "other.txt"
    keep.write_text("mine")
    lanczos(Crashing(A), 3, tol=1e-12, checkpoint_path=path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.txt"]


def test_products_that_do_not_repeat_are_compared_with_a_tolerance(tmp_path: Path) -> None:
    """The probe comparison is relative, 1e3 x the operator's precision: an operator with
    fresh 1e-9 noise per product is refused at float64's precision (its products differ by
    far more than 1e3 eps) and recognised when ``operator_eps`` states its accuracy."""
    A = decaying(60)
    gen = torch.Generator().manual_seed(0)

    class Noisy(Crashing):
        def matvec(self, x):
            y = super().matvec(x)
            return y + 1e-9 * torch.linalg.vector_norm(y) * torch.randn(
                y.shape, generator=gen, dtype=y.dtype) / math.sqrt(y.numel())

    path = tmp_path / "noisy.ckpt"
    for eps, refused in ((None, True), (1e-8, False)):
        with pytest.raises(CrashError):
            lanczos(Noisy(A, 12), 3, tol=1e-6, operator_eps=eps, checkpoint_path=path,
                    checkpoint_every=2)
        if refused:
            with pytest.raises(CheckpointError, match="do not repeat"):
                lanczos(Noisy(A), 3, tol=1e-6, operator_eps=eps, checkpoint_path=path)
            os.remove(path)
        else:
            res = lanczos(Noisy(A), 3, tol=1e-6, operator_eps=eps, checkpoint_path=path)
            assert res.resumed_from == 10 and res.all_converged
            assert not path.exists()


# ----------------------------------------------------------- a process that really dies
_DYING_RUN = """
import os, sys
import numpy as np
import torch
sys.path.insert(0, {tests!r})
from test_lanczos_checkpoint import clustered_top
from curvops.solvers import lanczos

torch.set_num_threads({threads})  # the parent's: the same reductions, the same bits
A = clustered_top()
count = 0

class Dying:
    shape, dtype, device = tuple(A.shape), A.dtype, A.device

    def matvec(self, x):
        global count
        count += 1
        if count > 36:
            os._exit(17)  # no exception, no cleanup: like a killed process
        return A @ x

lanczos(Dying(), 5, reorth={reorth!r}, tol=1e-12, seed=0, checkpoint_path={path!r},
        checkpoint_every=5)
"""


def clustered_top() -> torch.Tensor:
    """A matrix whose top 5 need about 80 products (full) or 160 (none) at tol 1e-12."""
    return sym_from_spectrum(np.concatenate([1 + 0.02 * np.arange(6)[::-1],
                                             np.linspace(0, 0.95, 394)]), 3)


@pytest.mark.parametrize("reorth", ["full", "none"])
def test_a_process_killed_after_36_products_resumes_bit_identically(tmp_path: Path,
                                                                   reorth: str) -> None:
    import subprocess
    import sys

    path = tmp_path / "run.pt"
    script = _DYING_RUN.format(tests=str(Path(__file__).parent), reorth=reorth, path=str(path),
                               threads=torch.get_num_threads())
    done = subprocess.run([sys.executable, "-c", script], timeout=120, capture_output=True,
                          text=True)
    assert done.returncode == 17, done.stderr
    assert path.exists()
    A = clustered_top()
    resumed = Crashing(A)
    res = lanczos(resumed, 5, reorth=reorth, tol=1e-12, seed=0, checkpoint_path=path,
                  checkpoint_every=5)
    fresh = Crashing(A)
    ref = lanczos(fresh, 5, reorth=reorth, tol=1e-12, seed=0)
    assert res.resumed_from == 35
    assert np.array_equal(res.eigenvalues, ref.eigenvalues)
    assert res.all_converged and ref.all_converged
    assert resumed.count < fresh.count
    assert not path.exists()
    # The same file resumed by another run is refused.
    subprocess.run([sys.executable, "-c", script], timeout=120, capture_output=True)
    with pytest.raises(CheckpointError, match="belongs to another run"):
        lanczos(A, 5, reorth=reorth, tol=1e-10, seed=0, checkpoint_path=path,
                checkpoint_every=5)
