"""The array-library views (linops/array_view.py, scipy_view.py, cupy_view.py).

CPU half: the shared product logic with numpy (against brute-force dense references
and scipy's solvers), the DLPack exchange run with numpy (zero copy both ways), the
cupy namespace's stream protocol against a scripted fake cupy, and the errors for a
missing cupy and a machine without CUDA. GPU half (marked ``gpu``, skipped here):
cupyx eigsh on the view, no host transfer per product, stream correctness.
"""

from __future__ import annotations

import sys
import types
import warnings
from contextlib import nullcontext

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch
from curvops.linops import GGNOperator, HessianOperator, LinearOperatorBase
from curvops.linops.array_view import (
    NUMPY,
    apply_operator,
    dlpack_namespace,
    torch_dtype_of_view,
    view_dtype,
)
from curvops.linops.cupy_view import cupy_namespace, to_cupy
from curvops.linops.scipy_view import ScipyView, to_scipy
from references import dense_ggn, dense_hessian_double_backward, mlp_ce, selected_names
from torch import Tensor

RNG = np.random.default_rng(1234)


class DenseOperator(LinearOperatorBase):
    """A curvops operator over an explicit symmetric matrix (the view's reference)."""

    def __init__(self, M: Tensor) -> None:
        self.M = M
        self.shape = (M.shape[0], M.shape[1])
        self.dtype, self.device = M.dtype, M.device

    def _matmat(self, V: Tensor) -> Tensor:
        return self.M @ V


def random_symmetric(n: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """A symmetric matrix with well separated top eigenvalues n, n-1, ..."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    vals = torch.arange(1, n + 1, dtype=torch.float64) - n / 3  # indefinite
    return ((Q * vals) @ Q.T).to(dtype)


def spy_matmat(op: LinearOperatorBase) -> list[Tensor]:
    """Record every ``op.matmat`` input (and wrap the output) on this operator instance."""
    calls: list[Tensor] = []
    original = op.matmat

    def matmat(V: Tensor) -> Tensor:
        calls.append(V)
        out = original(V)
        calls.append(out)
        return out

    op.matmat = matmat  # type: ignore[method-assign]
    return calls


@pytest.fixture(scope="module")
def ggn_problem():
    problem = mlp_ce()
    names = selected_names(problem.model, None)
    op = GGNOperator(problem.model, problem.spec.module(), problem.batches)
    dense = dense_ggn(problem.model, names, problem.spec, problem.batches)
    return op, dense


@pytest.fixture(scope="module")
def hessian_problem():
    problem = mlp_ce(seed=7)
    names = selected_names(problem.model, None)
    op = HessianOperator(problem.model, problem.spec.module(), problem.batches)
    dense = dense_hessian_double_backward(problem.model, names, problem.spec, problem.batches)
    return op, dense


# --------------------------------------------------------------------------------------
# dtype rules
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op_dtype", "expected"),
    [
        (torch.float64, np.float64),
        (torch.float32, np.float32),
        (torch.bfloat16, np.float32),
        (torch.float16, np.float32),
    ],
)
def test_default_view_dtype_follows_the_operator_and_widens_bf16_fp16(op_dtype, expected):
    assert view_dtype(op_dtype, None) == np.dtype(expected)


@pytest.mark.parametrize("requested", [np.float32, "float32", torch.float32, np.dtype("f4")])
def test_explicit_view_dtype_in_any_spelling(requested):
    assert view_dtype(torch.float64, requested) == np.dtype(np.float32)
    assert torch_dtype_of_view(view_dtype(torch.float64, requested)) == torch.float32


@pytest.mark.parametrize(
    "bad", [np.float16, np.int64, np.complex128, torch.bfloat16, torch.float16, "bfloat16", 3]
)
def test_view_dtype_refuses_anything_but_float32_float64(bad):
    with pytest.raises(TypeError, match="float32 or float64"):
        view_dtype(torch.float32, bad)


def test_scipy_view_declares_its_dtype_and_shape(ggn_problem):
    op, _ = ggn_problem
    A = op.to_scipy()
    assert isinstance(A, ScipyView) and isinstance(A, spla.LinearOperator)
    assert A.shape == op.shape and A.dtype == np.float64
    assert op.to_scipy(np.float32).dtype == np.float32
    assert isinstance(to_scipy(op, "float32"), ScipyView)


# --------------------------------------------------------------------------------------
# The shared product with numpy: against dense references
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["ggn", "hessian"])
def test_numpy_products_equal_the_dense_reference(which, ggn_problem, hessian_problem):
    op, dense = ggn_problem if which == "ggn" else hessian_problem
    A, D = op.to_scipy(), dense.numpy()
    n = op.shape[0]
    x, X = RNG.standard_normal(n), RNG.standard_normal((n, 6))
    scale = np.abs(D).max()
    for got, want in [
        (A.matvec(x), D @ x),
        (A @ x, D @ x),
        (A.matmat(X), D @ X),
        (A @ X, D @ X),
        (A.matvec(x[:, None]), (D @ x)[:, None]),
        (A.rmatvec(x), D @ x),
        (A.rmatmat(X), D @ X),
        (A.H.matmat(X), D @ X),
        (A.T.matvec(x), D @ x),
    ]:
        assert got.shape == want.shape and got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * scale)


def test_apply_operator_with_numpy_is_the_scipy_view(ggn_problem):
    op, _ = ggn_problem
    X = RNG.standard_normal((op.shape[0], 3))
    np.testing.assert_array_equal(
        apply_operator(op, X, np.dtype(np.float64), NUMPY), op.to_scipy().matmat(X)
    )


def test_adjoint_and_transpose_are_the_view_itself(ggn_problem):
    A = ggn_problem[0].to_scipy()
    assert A.H is A and A.T is A and A.adjoint() is A


def test_matmat_is_one_batched_product():
    op = DenseOperator(random_symmetric(12, seed=0))
    calls = spy_matmat(op)
    A = op.to_scipy()
    X = RNG.standard_normal((12, 7))
    Y = A.matmat(X)
    assert len(calls) == 2 and tuple(calls[0].shape) == (12, 7)
    np.testing.assert_allclose(Y, op.M.numpy() @ X, rtol=1e-13, atol=1e-13)
    calls.clear()
    A @ X
    A.rmatmat(X)
    assert [tuple(c.shape) for c in calls[::2]] == [(12, 7), (12, 7)]
    calls.clear()
    A.matvec(X[:, 0])
    assert [tuple(c.shape) for c in calls[::2]] == [(12, 1)]


def test_numpy_input_memory_is_shared_with_torch():
    """A contiguous input in the view dtype reaches the operator without a copy."""
    op = DenseOperator(random_symmetric(9, seed=1))
    calls = spy_matmat(op)
    X = np.ascontiguousarray(RNG.standard_normal((9, 4)))
    op.to_scipy().matmat(X)
    assert calls[0].data_ptr() == X.ctypes.data


# --------------------------------------------------------------------------------------
# dtype conversions at the boundary
# --------------------------------------------------------------------------------------


def test_float32_view_of_float64_operator_rounds_input_and_output():
    M = random_symmetric(10, seed=2)
    op = DenseOperator(M)
    x = RNG.standard_normal(10)
    y = op.to_scipy(np.float32).matvec(x)
    assert y.dtype == np.float32
    want = (M @ torch.from_numpy(x.astype(np.float32)).double()).float().numpy()
    np.testing.assert_array_equal(y, want)


def test_float64_view_of_float32_operator():
    M = random_symmetric(10, seed=3, dtype=torch.float32)
    op = DenseOperator(M)
    x = RNG.standard_normal(10)
    y = op.to_scipy(np.float64).matvec(x)
    assert y.dtype == np.float64
    want = (M @ torch.from_numpy(x).float()).double().numpy()
    np.testing.assert_array_equal(y, want)


def test_bf16_operator_is_viewed_in_float32_with_products_in_bf16():
    M = random_symmetric(8, seed=4, dtype=torch.bfloat16)
    op = DenseOperator(M)
    calls = spy_matmat(op)
    A = op.to_scipy()
    assert A.dtype == np.float32
    X = RNG.standard_normal((8, 3)).astype(np.float32)
    Y = A.matmat(X)
    assert calls[0].dtype == torch.bfloat16 and Y.dtype == np.float32
    np.testing.assert_array_equal(Y, (M @ torch.from_numpy(X).bfloat16()).float().numpy())


def test_integer_input_is_converted_and_read_only_input_works():
    M = random_symmetric(6, seed=5)
    A = DenseOperator(M).to_scipy()
    x = np.arange(6)
    np.testing.assert_allclose(A.matvec(x), M.numpy() @ x, rtol=1e-14, atol=1e-13)
    ro = RNG.standard_normal(6)
    ro.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on non-writable arrays it would share
        np.testing.assert_allclose(A.matvec(ro), M.numpy() @ ro, rtol=1e-14, atol=1e-13)


def test_bad_inputs_are_refused():
    op = DenseOperator(random_symmetric(5, seed=6))
    A = op.to_scipy()
    with pytest.raises(TypeError, match="real arrays"):
        apply_operator(op, np.ones(5, dtype=np.complex128), np.dtype(np.float64), NUMPY)
    with pytest.raises(ValueError, match=r"shape \(5,\) or \(5, m\)"):
        apply_operator(op, np.ones(4), np.dtype(np.float64), NUMPY)
    with pytest.raises(ValueError, match=r"shape \(5,\) or \(5, m\)"):
        apply_operator(op, np.ones((5, 2, 2)), np.dtype(np.float64), NUMPY)
    with pytest.raises(ValueError):
        A.matvec(np.ones(4))
    with pytest.raises(TypeError, match="curvops operator"):
        ScipyView(np.eye(3))


def test_zero_columns():
    A = DenseOperator(random_symmetric(5, seed=7)).to_scipy()
    assert A.matmat(np.zeros((5, 0))).shape == (5, 0)


# --------------------------------------------------------------------------------------
# scipy's solvers on the view
# --------------------------------------------------------------------------------------


def test_scipy_eigsh_on_a_curvature_view_matches_dense_eigenvalues(ggn_problem):
    op, dense = ggn_problem
    want = torch.linalg.eigvalsh(dense).numpy()[-3:]
    got = np.sort(spla.eigsh(op.to_scipy(), k=3, which="LA", return_eigenvectors=False))
    np.testing.assert_allclose(got, want, rtol=1e-10)


# The solver tests below view the dense references through a DenseOperator: the view code
# is the same, and hundreds of products stay cheap on a 2-core machine.


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_scipy_eigsh_on_the_view_of_an_indefinite_hessian(which, hessian_problem):
    _, dense = hessian_problem
    want = torch.linalg.eigvalsh(dense).numpy()
    ref = {"LA": want[-3:], "SA": want[:3], "LM": np.sort(want[np.argsort(np.abs(want))[-3:]])}
    A = DenseOperator(dense).to_scipy()
    got = np.sort(spla.eigsh(A, k=3, which=which, return_eigenvectors=False))
    np.testing.assert_allclose(got, ref[which], rtol=1e-10, atol=1e-12 * np.abs(want).max())


def test_scipy_lobpcg_on_the_view(ggn_problem):
    _, dense = ggn_problem
    want = torch.linalg.eigvalsh(dense).numpy()[-3:]
    X0 = np.random.default_rng(0).standard_normal((dense.shape[0], 3))
    vals, _ = spla.lobpcg(
        DenseOperator(dense).to_scipy(), X0, largest=True, tol=1e-10, maxiter=1000
    )
    np.testing.assert_allclose(np.sort(vals), want, rtol=1e-9)


@pytest.mark.parametrize("solver", ["cg", "minres"])
def test_scipy_cg_and_minres_on_damped_views(solver, ggn_problem, hessian_problem):
    # cg needs a positive definite matrix (damped GGN); minres takes the indefinite Hessian.
    dense = ggn_problem[1] if solver == "cg" else hessian_problem[1]
    n, damping = dense.shape[0], 0.5
    b = np.random.default_rng(3).standard_normal(n)
    want = np.linalg.solve(dense.numpy() + damping * np.eye(n), b)
    A = DenseOperator(dense).damped(damping).to_scipy()
    x, info = getattr(spla, solver)(A, b, rtol=1e-12, maxiter=10 * n)
    assert info == 0
    np.testing.assert_allclose(x, want, rtol=1e-8, atol=1e-8 * np.abs(want).max())


# --------------------------------------------------------------------------------------
# The DLPack exchange, run with numpy on the CPU
# --------------------------------------------------------------------------------------


def _numpy_dlpack_namespace():
    return dlpack_namespace("numpy-dlpack", np, lambda X, device: np.asarray(X))


def test_dlpack_exchange_with_numpy_gives_the_scipy_view_results(ggn_problem):
    op, _ = ggn_problem
    ns = _numpy_dlpack_namespace()
    x, X = RNG.standard_normal(op.shape[0]), RNG.standard_normal((op.shape[0], 4))
    A = op.to_scipy()
    for dt in (np.dtype(np.float64), np.dtype(np.float32)):
        B = op.to_scipy(dt)
        np.testing.assert_array_equal(apply_operator(op, x, dt, ns), B.matvec(x))
        np.testing.assert_array_equal(apply_operator(op, X, dt, ns), B.matmat(X))
    assert apply_operator(op, x, A.dtype, ns).dtype == np.float64


def test_dlpack_exchange_is_zero_copy_both_ways():
    op = DenseOperator(random_symmetric(11, seed=8))
    calls = spy_matmat(op)
    X = np.ascontiguousarray(RNG.standard_normal((11, 3)))
    Y = apply_operator(op, X, np.dtype(np.float64), _numpy_dlpack_namespace())
    V, out = calls
    assert V.data_ptr() == X.ctypes.data  # array -> torch: same memory
    assert Y.ctypes.data == out.data_ptr()  # torch -> array: same memory
    np.testing.assert_allclose(Y, op.M.numpy() @ X, rtol=1e-13, atol=1e-13)


# --------------------------------------------------------------------------------------
# to_cupy without cupy, and without CUDA
# --------------------------------------------------------------------------------------


def _hide_cupy(monkeypatch):
    for name in ("cupy", "cupyx", "cupyx.scipy", "cupyx.scipy.sparse", "cupyx.scipy.sparse.linalg"):
        monkeypatch.setitem(sys.modules, name, None)  # import of a None entry raises ImportError


def test_missing_cupy_error_names_the_gpu_extra(monkeypatch):
    _hide_cupy(monkeypatch)
    op = DenseOperator(random_symmetric(4, seed=9))
    with pytest.raises(ImportError, match=r"curvops\[gpu\]"):
        op.to_cupy()


def test_bad_dtype_is_refused_before_looking_for_cupy(monkeypatch):
    _hide_cupy(monkeypatch)
    with pytest.raises(TypeError, match="float32 or float64"):
        to_cupy(DenseOperator(random_symmetric(4, seed=9)), np.float16)


def _install_fake_cupy(monkeypatch, cuda_available):
    """Importable cupy/cupyx modules whose CUDA check answers ``cuda_available()``."""
    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(is_available=cuda_available)
    cupy.ndarray = type("ndarray", (), {})
    linalg = types.ModuleType("cupyx.scipy.sparse.linalg")
    linalg.LinearOperator = spla.LinearOperator
    cupyx = types.ModuleType("cupyx")
    cupyx.scipy = types.ModuleType("cupyx.scipy")
    cupyx.scipy.sparse = types.ModuleType("cupyx.scipy.sparse")
    cupyx.scipy.sparse.linalg = linalg
    for name, module in [
        ("cupy", cupy),
        ("cupyx", cupyx),
        ("cupyx.scipy", cupyx.scipy),
        ("cupyx.scipy.sparse", cupyx.scipy.sparse),
        ("cupyx.scipy.sparse.linalg", linalg),
    ]:
        monkeypatch.setitem(sys.modules, name, module)
    return cupy


def test_no_cuda_error_says_so(monkeypatch):
    _install_fake_cupy(monkeypatch, lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    op = DenseOperator(random_symmetric(4, seed=10))
    with pytest.raises(RuntimeError, match="needs CUDA.*torch sees no CUDA device"):
        op.to_cupy()


def test_cupy_without_a_device_error_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    op = DenseOperator(random_symmetric(4, seed=10))
    _install_fake_cupy(monkeypatch, lambda: False)
    with pytest.raises(RuntimeError, match="needs CUDA.*cupy sees no CUDA device"):
        op.to_cupy()

    def broken_driver():
        raise OSError("CUDA driver not found")

    _install_fake_cupy(monkeypatch, broken_driver)
    with pytest.raises(RuntimeError, match="cupy cannot reach CUDA.*driver not found"):
        op.to_cupy()


def test_cpu_operator_is_refused_by_the_cupy_view(monkeypatch):
    _install_fake_cupy(monkeypatch, lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="CUDA device.*lives on cpu"):
        DenseOperator(random_symmetric(4, seed=11)).to_cupy()


# --------------------------------------------------------------------------------------
# The cupy namespace's stream protocol, against a scripted fake cupy
# --------------------------------------------------------------------------------------


class _FakeStream:
    """A cupy stream that logs what the view asks of it."""

    def __init__(self, cuda: _FakeCuda, ptr: int) -> None:
        self.cuda, self.ptr = cuda, ptr

    def record(self):
        self.cuda.log.append(("record", self.ptr))
        return ("event", self.ptr)

    def wait_event(self, event):
        self.cuda.log.append(("wait", self.ptr, event[1]))

    def __enter__(self):
        self.cuda.stack.append(self)
        self.cuda.log.append(("enter", self.ptr))
        return self

    def __exit__(self, *exc):
        self.cuda.stack.pop()
        self.cuda.log.append(("exit", self.ptr))
        return False


class _FakeCuda:
    """cupy.cuda: a stack of current streams, external streams, devices; all logged."""

    def __init__(self, caller_ptr: int) -> None:
        self.log: list[tuple] = []
        self.stack = [_FakeStream(self, caller_ptr)]

    def get_current_stream(self):
        return self.stack[-1]

    def ExternalStream(self, ptr):  # noqa: N802 - mimics cupy's class name
        return _FakeStream(self, ptr)

    def Device(self, index):  # noqa: N802 - mimics cupy's class name
        self.log.append(("device", index))
        return nullcontext()


class _FakeOutput:
    def __init__(self, log):
        self.log = log

    def record_stream(self, stream):
        self.log.append(("record_stream", stream))


def _fake_cupy_for_streams(monkeypatch, caller_ptr: int, torch_ptr: int):
    cuda = _FakeCuda(caller_ptr)
    cupy = types.SimpleNamespace(cuda=cuda, from_dlpack=lambda Y: Y, ndarray=np.ndarray)
    monkeypatch.setattr(
        torch.cuda, "current_stream", lambda index: types.SimpleNamespace(cuda_stream=torch_ptr)
    )
    monkeypatch.setattr(torch.cuda, "device", lambda index: nullcontext())
    monkeypatch.setattr(torch.cuda, "default_stream", lambda index: ("torch-default", index))
    monkeypatch.setattr(
        torch.cuda, "ExternalStream", lambda ptr, device: ("torch-external", ptr, device)
    )
    return cupy, cuda


def test_same_stream_needs_no_synchronisation(monkeypatch):
    cupy, cuda = _fake_cupy_for_streams(monkeypatch, caller_ptr=0, torch_ptr=0)
    ns = cupy_namespace(cupy)
    with ns.on_stream(torch.device("cuda", 0)):
        assert cuda.get_current_stream().ptr == 0
        out = _FakeOutput(cuda.log)
        assert ns.from_torch(out) is out
    assert cuda.log == [("device", 0)]


@pytest.mark.parametrize(
    ("caller_ptr", "torch_caller"), [(0, ("torch-default", 3)), (55, ("torch-external", 55, 3))]
)
def test_other_stream_is_synchronised_both_ways(monkeypatch, caller_ptr, torch_caller):
    cupy, cuda = _fake_cupy_for_streams(monkeypatch, caller_ptr=caller_ptr, torch_ptr=77)
    ns = cupy_namespace(cupy)
    with ns.on_stream(torch.device("cuda", 3)):
        assert cuda.get_current_stream().ptr == 77  # cupy works on torch's stream
        ns.from_torch(_FakeOutput(cuda.log))
    assert cuda.log == [
        ("device", 3),
        ("record", caller_ptr),  # the input is ready on the caller's stream ...
        ("wait", 77, caller_ptr),  # ... before the product stream reads it
        ("enter", 77),
        ("record_stream", torch_caller),  # the output block is not reused too early
        ("exit", 77),
        ("record", 77),  # the product is done ...
        ("wait", caller_ptr, 77),  # ... before the caller's stream reads the output
    ]
    ns.from_torch(_FakeOutput(cuda.log))  # outside a product: nothing to record
    assert cuda.log[-1] == ("wait", caller_ptr, 77)


def test_cupy_namespace_refuses_host_arrays_and_other_devices(monkeypatch):
    cupy, _ = _fake_cupy_for_streams(monkeypatch, caller_ptr=0, torch_ptr=0)
    cupy.ndarray = type("ndarray", (), {"device": types.SimpleNamespace(id=1)})
    ns = cupy_namespace(cupy)
    with pytest.raises(TypeError, match="cupy arrays, got numpy.ndarray"):
        ns.accept(np.zeros(3), torch.device("cuda", 0))
    with pytest.raises(ValueError, match="cuda:0 but the input is on cuda:1"):
        ns.accept(cupy.ndarray(), torch.device("cuda", 0))
    x = cupy.ndarray()
    assert ns.accept(x, torch.device("cuda", 1)) is x


# --------------------------------------------------------------------------------------
# GPU: run where CUDA (and cupy) exist; collected and skipped here
# --------------------------------------------------------------------------------------


def _cupy():
    return pytest.importorskip("cupy", reason="the cupy view needs cupy (curvops[gpu])")


def _cuda_ggn(dtype: torch.dtype) -> GGNOperator:
    problem = mlp_ce()
    model = problem.model.to(device="cuda", dtype=dtype)
    batches = [(x.to("cuda", dtype), y.to("cuda")) for x, y in problem.batches]
    return GGNOperator(model, problem.spec.module(), batches)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpu_cupyx_eigsh_matches_scipy_eigsh_and_dense(dtype):
    cupy = _cupy()
    from cupyx.scipy.sparse.linalg import LinearOperator as CupyLinearOperator
    from cupyx.scipy.sparse.linalg import eigsh as cupy_eigsh

    op = _cuda_ggn(dtype)
    view = op.to_cupy()
    assert isinstance(view, CupyLinearOperator)
    assert view.dtype == view_dtype(dtype, None) and view.shape == op.shape
    dense = torch.linalg.eigvalsh(op.to_dense().double()).cpu().numpy()[-3:]
    on_gpu = np.sort(cupy.asnumpy(cupy_eigsh(view, k=3, which="LA", return_eigenvectors=False)))
    on_cpu = np.sort(spla.eigsh(op.to_scipy(), k=3, which="LA", return_eigenvectors=False))
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    np.testing.assert_allclose(on_gpu, dense, rtol=rtol)
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=rtol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpu_cupyx_eigsh_matches_in_house_lanczos(dtype):
    cupy = _cupy()
    from cupyx.scipy.sparse.linalg import eigsh as cupy_eigsh

    lanczos = pytest.importorskip("curvops.solvers.lanczos").lanczos
    op = _cuda_ggn(dtype)
    on_gpu = np.sort(
        cupy.asnumpy(cupy_eigsh(op.to_cupy(), k=3, which="LA", return_eigenvectors=False))
    )
    ours = np.sort(np.asarray(lanczos(op, k=3).eigenvalues, dtype=np.float64))
    rtol = 1e-8 if dtype == torch.float64 else 1e-4
    np.testing.assert_allclose(on_gpu, ours, rtol=rtol)


@pytest.mark.gpu
def test_gpu_view_products_equal_the_scipy_view_and_stay_on_device():
    cupy = _cupy()
    op = _cuda_ggn(torch.float64)
    view, host = op.to_cupy(), op.to_scipy()
    X = RNG.standard_normal((op.shape[0], 5))
    Y = view.matmat(cupy.asarray(X))
    assert isinstance(Y, cupy.ndarray) and Y.dtype == np.float64
    assert Y.device.id == op.device.index
    np.testing.assert_allclose(cupy.asnumpy(Y), host.matmat(X), rtol=1e-12, atol=1e-14)
    y = view.matvec(cupy.asarray(X[:, 0]))
    assert y.shape == (op.shape[0],)
    np.testing.assert_allclose(cupy.asnumpy(y), host.matvec(X[:, 0]), rtol=1e-12, atol=1e-14)
    assert view.H is view
    with pytest.raises(TypeError, match="cupy arrays"):
        view.matvec(X[:, 0])  # a host array is refused, not copied silently


@pytest.mark.gpu
def test_gpu_bf16_operator_converts_on_device():
    cupy = _cupy()
    M = random_symmetric(64, seed=12).to("cuda", torch.bfloat16)
    op = DenseOperator(M)
    calls = spy_matmat(op)
    view = op.to_cupy()
    assert view.dtype == np.float32
    X = cupy.asarray(RNG.standard_normal((64, 3)).astype(np.float32))
    Y = view.matmat(X)
    assert calls[0].dtype == torch.bfloat16 and calls[0].is_cuda and Y.dtype == np.float32
    want = (M @ torch.from_dlpack(X).bfloat16()).float()
    np.testing.assert_array_equal(cupy.asnumpy(Y), want.cpu().numpy())


def _host_transfers(fn) -> int:
    """Memcpy HtoD/DtoH events the CUDA profiler records while ``fn`` runs."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [event.name for event in prof.events()]
    return sum(("Memcpy HtoD" in name) or ("Memcpy DtoH" in name) for name in names)


@pytest.mark.gpu
def test_gpu_products_make_no_host_transfer():
    cupy = _cupy()
    n = 512
    op = DenseOperator(random_symmetric(n, seed=13).to("cuda"))
    view = op.to_cupy()
    X = cupy.asarray(RNG.standard_normal((n, 4)))
    x = cupy.asarray(RNG.standard_normal(n))
    view.matmat(X)  # warm-up (cuBLAS handles, cupy kernels)
    # The counter sees transfers made by cupy as well as by torch:
    assert _host_transfers(lambda: cupy.asnumpy(x)) >= 1
    assert _host_transfers(lambda: view.matmat(X)) == 0
    assert _host_transfers(lambda: view.matvec(x)) == 0
    # A curvature operator: the view adds no transfer to the operator's own product.
    ggn = _cuda_ggn(torch.float64)
    gview = ggn.to_cupy()
    Xg = cupy.asarray(RNG.standard_normal((ggn.shape[0], 3)))
    Vg = torch.from_dlpack(Xg).clone()
    gview.matmat(Xg)
    ggn.matmat(Vg)
    assert _host_transfers(lambda: gview.matmat(Xg)) == _host_transfers(lambda: ggn.matmat(Vg))


class _SlowDenseOperator(DenseOperator):
    """Sleeps on torch's current stream before the product, and records the streams."""

    def __init__(self, M: Tensor, cupy) -> None:
        super().__init__(M)
        self.cupy, self.streams = cupy, []

    def _matmat(self, V: Tensor) -> Tensor:
        self.streams.append(
            (torch.cuda.current_stream().cuda_stream, self.cupy.cuda.get_current_stream().ptr)
        )
        torch.cuda._sleep(50_000_000)  # tens of milliseconds of GPU time
        return self.M @ V


@pytest.mark.gpu
def test_gpu_product_runs_on_torch_stream_and_waits_for_the_callers_input():
    cupy = _cupy()
    n = 1024
    op = DenseOperator(random_symmetric(n, seed=14, dtype=torch.float32).to("cuda"))
    view = op.to_cupy()
    x_new = torch.randn(n, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    expected = (op.M @ x_new).cpu().numpy()
    X = cupy.zeros(n, dtype=np.float32)
    X_torch = torch.from_dlpack(X)  # the same memory
    torch.cuda.synchronize()
    producer, product_stream = torch.cuda.Stream(), torch.cuda.Stream()
    with cupy.cuda.ExternalStream(producer.cuda_stream):  # the caller's cupy stream
        with torch.cuda.stream(producer):
            torch.cuda._sleep(50_000_000)
            X_torch.copy_(x_new)  # the input is written late, on the caller's stream
        with torch.cuda.stream(product_stream):
            y = view.matvec(X)  # must wait for the write
        y_caller = y.copy()
    torch.cuda.synchronize()
    np.testing.assert_allclose(cupy.asnumpy(y_caller), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gpu_callers_stream_waits_for_the_product_output():
    cupy = _cupy()
    n = 1024
    M = random_symmetric(n, seed=15, dtype=torch.float32).to("cuda")
    op = _SlowDenseOperator(M, cupy)
    view = op.to_cupy()
    x = RNG.standard_normal(n).astype(np.float32)
    X = cupy.asarray(x)
    expected = (M @ torch.from_numpy(x).cuda()).cpu().numpy()
    torch.cuda.synchronize()
    caller, product_stream = cupy.cuda.Stream(non_blocking=True), torch.cuda.Stream()
    with caller, torch.cuda.stream(product_stream):
        y = view.matvec(X)  # the product sleeps on product_stream first
        y_caller = y * 1  # read on the caller's stream: must wait for the product
    caller.synchronize()
    np.testing.assert_allclose(cupy.asnumpy(y_caller), expected, rtol=1e-5, atol=1e-5)
    # During the product, cupy's current stream was torch's current stream.
    assert op.streams == [(product_stream.cuda_stream, product_stream.cuda_stream)]


@pytest.mark.gpu
def test_gpu_cpu_operator_is_refused():
    _cupy()
    with pytest.raises(ValueError, match="CUDA device"):
        DenseOperator(random_symmetric(4, seed=16)).to_cupy()
