"""Every curvature operator against brute-force dense references (float64, rel. err ≤ 1e-10).

The references (``tests/references.py``) never touch curvops: the Hessian is an autograd
double backward one row at a time (and ``torch.func.hessian`` where torch gets it right),
the GGN is ``jacrev`` Jacobians around closed-form output Hessians, the empirical Fisher a
loop over per-example ``torch.func.grad`` gradients. The operators are materialised through
their own ``matmat`` on the identity.
"""

from __future__ import annotations

import functools

import pytest
import references as R
import torch
from curvops.linops import (
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

TOL = 1e-10  # float64 products against float64 references
TOL_BATCHING = 1e-12  # the same operator, data split differently

OPERATORS = {
    "hessian": HessianOperator,
    "ggn": GGNOperator,
    "fisher": FisherOperator,  # mode="exact" is the default
    "ef": EmpiricalFisherOperator,
}

PROBLEMS = {
    "mlp_ce_mean": lambda: R.mlp_ce("mean"),
    "mlp_ce_sum": lambda: R.mlp_ce("sum"),
    "mlp_mse_sum": lambda: R.mlp_mse("sum"),
    "mlp_mse_mean": lambda: R.mlp_mse("mean"),
    "mlp_bce_mean": lambda: R.mlp_bce("mean"),
    "mlp_bce_sum": lambda: R.mlp_bce("sum"),
    "cnn_ce": R.small_cnn,
    "layernorm_ce": lambda: R.layernorm_mlp(kind="ce"),
    "layernorm_mse": lambda: R.layernorm_mlp(kind="mse"),
    "seq_ce": R.sequence_ce,
    "bn_eval_mse": R.batchnorm_eval,
}



@functools.cache
def problem(name: str) -> R.Problem:
    return PROBLEMS[name]()


@functools.cache
def reference(name: str, kind: str, names: tuple[str, ...] | None = None) -> Tensor:
    p = problem(name)
    sel = R.selected_names(p.model, names)
    return R.dense_reference(kind, p.model, sel, p.spec, p.batches)


def build(kind: str, p: R.Problem, params=None, data=None, **kwargs):
    data = p.batches if data is None else data
    return OPERATORS[kind](p.model, p.spec.module(), data, params, **kwargs)


def identity_product(op) -> Tensor:
    return op.matmat(torch.eye(op.shape[0], dtype=op.dtype))


def random_matrix(n: int, m: int, seed: int, dtype=torch.float64) -> Tensor:
    return torch.randn(n, m, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --------------------------------------------------------------------------------------
# The references themselves
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_reference_loss_is_torch_loss(name):
    ours, theirs = R.reference_and_torch_loss(problem(name))
    assert abs(float(ours - theirs)) <= 1e-13 * abs(float(theirs))


@pytest.mark.parametrize("kind", ["ce", "mse", "bce"])
def test_closed_form_output_hessians_match_autodiff(kind):
    gen = torch.Generator().manual_seed(7)
    out = torch.randn(1, 4, dtype=torch.float64, generator=gen)
    if kind == "ce":
        y = torch.tensor([2])
    elif kind == "mse":
        y = torch.randn(1, 4, dtype=torch.float64, generator=gen)
    else:
        y = torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    _, H = R.output_hessian_rows(kind, out, y)
    H_auto = R.loss_output_hessian_autodiff(kind, out, y)
    torch.testing.assert_close(H[0], H_auto, rtol=1e-13, atol=1e-14)


def test_hessian_references_agree_without_layernorm():
    p = problem("cnn_ce")
    names = R.selected_names(p.model, None)
    H_func = R.dense_hessian_func(p.model, names, p.spec, p.batches)
    assert R.relative_error(reference("cnn_ce", "hessian"), H_func) <= 1e-13


def test_layernorm_reference_matches_finite_differences():
    """The double-backward reference is right on LayerNorm (central differences of the
    autograd gradient, accuracy ~h² ≈ 1e-10). torch.func.hessian (and jacrev∘jacrev) are off
    by ~7% on the LayerNorm-weight × first-layer blocks here (torch 2.13), so they are not
    used as references for LayerNorm models."""
    p = problem("layernorm_ce")
    names = R.selected_names(p.model, None)
    total = R.total_loss_fn(p.model, names, p.spec, p.batches)
    theta = R.flat_parameters(p.model, names)

    def grad_at(t: Tensor) -> Tensor:
        t = t.clone().requires_grad_(True)
        return torch.autograd.grad(total(t), t)[0]

    h = 1e-5
    eye = torch.eye(theta.numel(), dtype=theta.dtype)
    columns = [(grad_at(theta + h * e) - grad_at(theta - h * e)) / (2 * h) for e in eye]
    H_fd = torch.stack(columns, 1)
    assert R.relative_error(reference("layernorm_ce", "hessian"), H_fd) <= 1e-8


# --------------------------------------------------------------------------------------
# Operators against the references
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(OPERATORS))
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_operator_equals_dense_reference(name, kind):
    p = problem(name)
    op = build(kind, p)
    ref_kind = "ggn" if kind == "fisher" else kind
    assert R.relative_error(identity_product(op), reference(name, ref_kind)) <= TOL
    # a second product (served from whatever the first one prepared) is just as right
    assert R.relative_error(identity_product(op), reference(name, ref_kind)) <= TOL


@pytest.mark.parametrize("cache", ["auto", "none"])
@pytest.mark.parametrize("name", ["mlp_ce_mean", "mlp_ce_sum", "layernorm_ce", "seq_ce"])
def test_hessian_with_the_closed_form_cross_entropy(name, cache, monkeypatch):
    """Language-model heads (>= 65k logits) take the closed-form cross-entropy Hessian:
    forced here on the small problems, matvec and batched matmat, cached and fresh."""
    from curvops.linops import losses

    monkeypatch.setattr(losses, "CLOSED_FORM_CE_MIN_LOGITS", 0)
    p = problem(name)
    op = build("hessian", p, cache=cache)
    ref = reference(name, "hessian")
    V = random_matrix(op.shape[0], 3, seed=11)
    for _ in range(2):  # the second product is served from the cache where there is one
        assert R.relative_error(op.matmat(V), ref @ V) <= TOL
        assert R.relative_error(op @ V[:, 0], ref @ V[:, 0]) <= TOL
    assert op.cache_active == (cache == "auto")


@pytest.mark.parametrize("kind", sorted(OPERATORS))
def test_products_follow_parameter_updates(kind):
    """The operator is the curvature at the model's *current* parameters: after an in-place
    update (an optimiser step, or an edit through ``.data``) products must not reuse state
    from the old parameters."""
    p = R.mlp_ce("mean")
    op = build(kind, p)
    ref_kind = "ggn" if kind == "fisher" else kind
    names = R.selected_names(p.model, None)
    identity_product(op)  # prepare whatever the operator keeps between products
    identity_product(op)
    gen = torch.Generator().manual_seed(17)
    with torch.no_grad():
        for q in p.model.parameters():
            q.add_(0.3 * torch.randn(q.shape, dtype=q.dtype, generator=gen))
    ref = R.dense_reference(ref_kind, p.model, names, p.spec, p.batches)
    assert R.relative_error(identity_product(op), ref) <= TOL
    p.model[2].bias.data.mul_(-2.0)  # bypasses autograd's version counter
    ref = R.dense_reference(ref_kind, p.model, names, p.spec, p.batches)
    assert R.relative_error(identity_product(op), ref) <= TOL


@pytest.mark.parametrize("kind", sorted(OPERATORS))
@pytest.mark.parametrize("name", ["layernorm_ce", "layernorm_mse"])
def test_layernorm_block_by_block(name, kind):
    """Each parameter block of each operator on a LayerNorm model (the known torch pitfall:
    a wrong LayerNorm-weight block would hide in the whole-matrix error)."""
    p = problem(name)
    op = build(kind, p)
    D = identity_product(op)
    ref = reference(name, "ggn" if kind == "fisher" else kind)
    slices = R.block_slices(p.model, op.param_names)
    scale = float(torch.linalg.norm(ref))
    for a, sa in zip(op.param_names, slices):
        for b, sb in zip(op.param_names, slices):
            err = float(torch.linalg.norm(D[sa, sb] - ref[sa, sb]))
            block = float(torch.linalg.norm(ref[sa, sb]))
            assert err <= TOL * max(block, 1e-6 * scale), (a, b, err, block)


def test_to_dense_equals_identity_product():
    p = problem("mlp_ce_mean")
    op = build("hessian", p)
    D = op.to_dense(chunk_size=16)
    assert D.dtype == torch.float64 and D.shape == op.shape
    assert R.relative_error(D, reference("mlp_ce_mean", "hessian")) <= TOL


# --------------------------------------------------------------------------------------
# Parameter selection
# --------------------------------------------------------------------------------------

SELECTIONS = {
    # name -> (what the operator is given, the names the reference uses)
    "by_name": (["0.weight", "2.bias"], ("0.weight", "2.bias")),
    "by_glob": (["*.bias"], ("0.bias", "2.bias")),
    "by_glob_layer": (["2.*"], ("2.weight", "2.bias")),
    "mixed_subset": (["2.weight", "0.bias"], ("0.bias", "2.weight")),
}


@pytest.mark.parametrize("kind", sorted(OPERATORS))
@pytest.mark.parametrize("selection", sorted(SELECTIONS))
def test_parameter_selection_by_name(selection, kind):
    p = problem("mlp_ce_mean")
    given, names = SELECTIONS[selection]
    op = build(kind, p, params=given)
    assert op.param_names == names  # model order, not the order given
    ref_kind = "ggn" if kind == "fisher" else kind
    D = identity_product(op)
    assert R.relative_error(D, reference("mlp_ce_mean", ref_kind, names)) <= TOL
    # and it is the corresponding sub-block of the full matrix
    full = reference("mlp_ce_mean", ref_kind)
    all_names = R.selected_names(p.model, None)
    slices = dict(zip(all_names, R.block_slices(p.model, all_names)))
    idx = torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in names])
    assert R.relative_error(D, full[idx][:, idx]) <= TOL


@pytest.mark.parametrize("kind", ["hessian", "ef"])
def test_parameter_selection_by_object(kind):
    p = problem("cnn_ce")
    conv = p.model[0]
    op = build(kind, p, params=[conv.bias, conv.weight])
    assert op.param_names == ("0.weight", "0.bias")
    assert op.params[0] is conv.weight and op.params[1] is conv.bias
    names = ("0.weight", "0.bias")
    assert R.relative_error(identity_product(op), reference("cnn_ce", kind, names)) <= TOL


def test_parameters_not_requiring_grad_are_left_out_by_default():
    p = R.mlp_ce("mean")
    p.model[0].weight.requires_grad_(False)
    op = build("ggn", p)
    assert op.param_names == ("0.bias", "2.weight", "2.bias")
    names = R.selected_names(p.model, op.param_names)
    ref = R.dense_ggn(p.model, names, p.spec, p.batches)
    assert R.relative_error(identity_product(op), ref) <= TOL


def test_unused_parameter_gives_zero_rows():
    class WithUnused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(3, 2)
            self.unused = nn.Linear(3, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.used(x)

    model = R.reinit_(WithUnused().double(), 11)
    gen = torch.Generator().manual_seed(12)
    data = [(torch.randn(4, 3, dtype=torch.float64, generator=gen), torch.tensor([0, 1, 1, 0]))]
    spec = R.LossSpec("ce", "mean")
    for kind, cls in OPERATORS.items():
        op = cls(model, spec.module(), data)
        D = identity_product(op)
        names = R.selected_names(model, None)
        ref = R.dense_reference("ggn" if kind == "fisher" else kind, model, names, spec, data)
        assert R.relative_error(D, ref) <= TOL
        assert torch.count_nonzero(D[8:]) == 0 and torch.count_nonzero(D[:, 8:]) == 0


# --------------------------------------------------------------------------------------
# Symmetry, PSD-ness, rmatvec, matmat == column-by-column matvec
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(OPERATORS))
@pytest.mark.parametrize("name", ["mlp_ce_mean", "seq_ce", "layernorm_mse"])
def test_symmetry_psd_rmatvec_and_columns(name, kind):
    p = problem(name)
    op = build(kind, p)
    n = op.shape[0]
    V = random_matrix(n, 4, seed=3)
    AV = op.matmat(V)
    # symmetry: uᵀ A v = vᵀ A u for all pairs of the random vectors
    G = V.T @ AV
    assert torch.allclose(G, G.T, rtol=1e-12, atol=1e-14 * float(G.abs().max()))
    # rmatvec = matvec and matmat = column-by-column matvec
    for j in range(V.shape[1]):
        col = op.matvec(V[:, j])
        assert torch.allclose(col, AV[:, j], rtol=1e-12, atol=1e-14 * float(AV.abs().max()))
        assert torch.equal(op.rmatvec(V[:, j]), col)
    assert torch.equal(op @ V[:, 0], op.matvec(V[:, 0]))
    assert torch.allclose(op @ V, AV, rtol=1e-12, atol=1e-14 * float(AV.abs().max()))
    if kind != "hessian":
        assert op.is_psd
        quad = torch.einsum("ij,ij->j", V, AV)
        assert bool((quad >= -1e-14 * float(quad.abs().max())).all())
        # and on the eigenvectors of the reference with the smallest eigenvalues
        evals = torch.linalg.eigvalsh(identity_product(op))
        assert float(evals.min()) >= -1e-12 * float(evals.max())
    else:
        assert not op.is_psd


# --------------------------------------------------------------------------------------
# Batching, micro-batching and the forms data can take
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(OPERATORS))
@pytest.mark.parametrize("name", ["mlp_ce_mean", "mlp_mse_mean", "seq_ce", "cnn_ce"])
def test_batchings_and_micro_batches_give_the_same_operator(name, kind):
    """Products with 6 random vectors (a different matrix would show in them with
    probability 1); the operators themselves are proven dense above."""
    p = problem(name)
    op = build(kind, p)
    V = random_matrix(op.shape[0], 6, seed=5)
    base = op.matmat(V)
    N = p.merged()[1].shape[0]
    variants = {
        "one batch": dict(data=[p.merged()]),
        "single batch unwrapped": dict(data=p.merged()),
        "singletons": dict(data=p.rebatched([1] * N)),
        "uneven": dict(data=p.rebatched([N - 2, 2])),
        "micro 2": dict(micro_batch_size=2),
        "micro 1, one batch": dict(data=[p.merged()], micro_batch_size=1),
        "micro larger than batches": dict(micro_batch_size=100),
    }
    for label, kwargs in variants.items():
        out = build(kind, p, **kwargs).matmat(V)
        assert R.relative_error(out, base) <= TOL_BATCHING, label


def test_dataloader_and_callable_data():
    p = problem("mlp_mse_mean")
    X, Y = p.merged()
    loader = DataLoader(TensorDataset(X, Y), batch_size=3, shuffle=False)
    ref = reference("mlp_mse_mean", "ggn")
    for data in (loader, lambda: iter(p.batches), tuple(p.batches)):
        op = build("ggn", p, data=data)
        assert R.relative_error(identity_product(op), ref) <= TOL
        assert op.total.examples == X.shape[0] and op.total.terms == Y.numel()


def test_tuple_and_dict_model_inputs():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 2)
            self.b = nn.Linear(2, 2)

        def forward(self, x: Tensor, z: Tensor) -> Tensor:
            return self.a(x) * torch.tanh(self.b(z))

    model = R.reinit_(TwoInputs().double(), 21)
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(5, 3, dtype=torch.float64, generator=gen)
    z = torch.randn(5, 2, dtype=torch.float64, generator=gen)
    y = torch.randn(5, 2, dtype=torch.float64, generator=gen)
    # reference: the same model with x and z packed into one input
    packed = torch.cat([x, z], dim=1)

    class Packed(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, xz: Tensor) -> Tensor:
            return self.inner(xz[:, :3], xz[:, 3:])

    wrapper = Packed(model)
    spec = R.LossSpec("mse", "sum")
    names = R.selected_names(wrapper, None)
    ref = R.dense_hessian_double_backward(wrapper, names, spec, [(packed, y)])
    for data in ([((x, z), y)], [({"x": x, "z": z}, y)]):
        op = HessianOperator(model, spec.module(), data, micro_batch_size=2)
        assert R.relative_error(identity_product(op), ref) <= TOL


# --------------------------------------------------------------------------------------
# Low precision: bf16 models and mixed parameter dtypes
# --------------------------------------------------------------------------------------

BF16_EPS = 2.0**-8  # unit roundoff of bfloat16
# A product on a two-layer net is a handful of bf16 roundings in series (forward, one or two
# backward passes), each ≤ u relative, accumulated in fp32. Over 8 seeds we measure ≤ 5u
# (Hessian, mixed dtypes; GGN/EF ≤ 2.5u); 10u ≈ 4 % still catches any wrong term or scale.
BF16_TOL = 10 * BF16_EPS


def bf16_exact_matrix(n: int, m: int, seed: int, dtype: torch.dtype) -> Tensor:
    """Random vectors whose entries are bf16 numbers, so no rounding happens on the way in."""
    return random_matrix(n, m, seed).to(torch.bfloat16).to(dtype)


def _tiny_pair() -> tuple[nn.Module, nn.Module, list, list]:
    """A bf16 MLP 3-4-2 and its exact float64 copy, with bf16-representable data."""
    m64 = R.reinit_(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double(), 31)
    m16 = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(torch.bfloat16)
    m16.load_state_dict({k: v.to(torch.bfloat16) for k, v in m64.state_dict().items()})
    m64.load_state_dict({k: v.double() for k, v in m16.state_dict().items()})
    gen = torch.Generator().manual_seed(32)
    x = torch.randn(6, 3, generator=gen).to(torch.bfloat16)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    return m16, m64, [(x[:4], y[:4]), (x[4:], y[4:])], [(x[:4].double(), y[:4]),
                                                         (x[4:].double(), y[4:])]


@pytest.mark.parametrize("kind", sorted(OPERATORS))
def test_bf16_operator(kind):
    m16, m64, data16, data64 = _tiny_pair()
    op = OPERATORS[kind](m16, nn.CrossEntropyLoss(), data16)
    assert op.dtype == torch.bfloat16
    V = bf16_exact_matrix(op.shape[0], 3, seed=33, dtype=torch.float64)
    out = op.matmat(V.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == V.shape
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    ref_op = OPERATORS[kind](m64, nn.CrossEntropyLoss(), data64)
    ref = ref_op.matmat(V)
    assert R.relative_error(out.double(), ref) <= BF16_TOL
    # and the float64 operator of the bf16-exact copy is the dense reference
    names = R.selected_names(m64, None)
    dense = R.dense_reference("ggn" if kind == "fisher" else kind, m64, names,
                              R.LossSpec("ce", "mean"), data64)
    assert R.relative_error(ref, dense @ V) <= TOL
    with pytest.raises(TypeError):
        op.matvec(V[:, 0])  # float64 into a bf16 operator: refused, never cast


class _MixedNet(nn.Module):
    """bf16 linear layers around an fp32 LayerNorm (the usual mixed-precision layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.ln = nn.LayerNorm(4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.ln(self.fc1(x))))


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_mixed_dtype_parameters(kind):
    m64 = R.reinit_(_MixedNet().double(), 41)
    with torch.no_grad():
        m64.ln.weight.add_(1.0)
    mixed = _MixedNet()
    mixed.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    mixed.fc1.to(torch.bfloat16)
    mixed.fc2.to(torch.bfloat16)
    m64.load_state_dict({k: v.double() for k, v in mixed.state_dict().items()})
    gen = torch.Generator().manual_seed(42)
    x = torch.randn(5, 3, generator=gen).to(torch.bfloat16)
    y = torch.tensor([0, 1, 1, 0, 1])
    op = OPERATORS[kind](mixed, nn.CrossEntropyLoss(), [(x, y)])
    assert op.dtype == torch.float32  # the widest selected dtype
    assert op.space.dtypes == (torch.bfloat16,) * 2 + (torch.float32,) * 2 + (torch.bfloat16,) * 2
    V = bf16_exact_matrix(op.shape[0], 3, seed=43, dtype=torch.float32)
    out = op.matmat(V)
    assert out.dtype == torch.float32
    assert [p.dtype for p in mixed.parameters()] == list(op.space.dtypes)  # nothing upcast
    blocks = op.unflatten(V[:, 0])
    assert [b.dtype for b in blocks] == list(op.space.dtypes)
    # reference: the float64 copy of the same (bf16/fp32-exact) model
    names = R.selected_names(m64, None)
    dense = R.dense_reference(kind, m64, names, R.LossSpec("ce", "mean"), [(x.double(), y)])
    assert R.relative_error(out.double(), dense @ V.double()) <= BF16_TOL


@pytest.mark.parametrize(
    "name, closed_form_min",
    [("cross_entropy", 0), ("cross_entropy", 10**9), ("mse", None), ("bce", None)],
)
def test_total_loss_matches_torch_to_second_order(name, closed_form_min, monkeypatch):
    # The Hessian's loss (kind.total_loss) has a hand-written cross-entropy gradient whose
    # derivative is the closed-form output Hessian (used from a size on: both sides of the
    # threshold are tested): value, gradient and Hessian products must equal torch's own
    # loss in float64.
    import torch.nn.functional as F
    from curvops.linops import losses
    from curvops.linops.losses import LossKind

    if closed_form_min is not None:
        monkeypatch.setattr(losses, "CLOSED_FORM_CE_MIN_LOGITS", closed_form_min)

    g = torch.Generator().manual_seed(7)
    F_ = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    if name == "cross_entropy":
        Y = torch.randint(0, 4, (6,), generator=g)
        ref_fn = lambda x: F.cross_entropy(x, Y, reduction="sum")  # noqa: E731
    elif name == "mse":
        Y = torch.randn(6, 4, generator=g, dtype=torch.float64)
        ref_fn = lambda x: ((x - Y) ** 2).sum()  # noqa: E731
    else:
        Y = torch.rand(6, 4, generator=g, dtype=torch.float64)
        ref_fn = lambda x: F.binary_cross_entropy_with_logits(x, Y, reduction="sum")  # noqa: E731
    kind = LossKind(name)
    U = torch.randn(6, 4, generator=g, dtype=torch.float64)
    out = {}
    for label, fn in (("ours", lambda x: kind.total_loss(x, Y)), ("torch", ref_fn)):
        loss = fn(F_) * 0.3
        if label == "ours" and name == "cross_entropy":
            closed = type(loss.grad_fn.next_functions[0][0]).__name__ == "_CrossEntropySumBackward"
            assert closed == (closed_form_min == 0)
        (grad,) = torch.autograd.grad(loss, F_, create_graph=True)
        (hu,) = torch.autograd.grad(grad, F_, U)
        out[label] = (loss.detach(), grad.detach(), hu)
    for a, b in zip(out["ours"], out["torch"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
    # and the closed form of the cross-entropy output Hessian, row by row
    if name == "cross_entropy":
        torch.testing.assert_close(out["ours"][2], 0.3 * kind.hessian_matmul(F_, U),
                                   rtol=1e-13, atol=1e-14)
    # the derivative in the loss's incoming gradient (a scale that requires grad) is exact
    c = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    sides = []
    for fn in (lambda x: kind.total_loss(x, Y), ref_fn):
        (grad,) = torch.autograd.grad(fn(F_) * c, F_, create_graph=True)
        sides.append(torch.autograd.grad((grad * U).sum(), c)[0])
    torch.testing.assert_close(sides[0], sides[1], rtol=1e-13, atol=1e-14)
    # a first-order gradient without create_graph works as usual
    (plain,) = torch.autograd.grad(kind.total_loss(F_, Y), F_)
    torch.testing.assert_close(plain, torch.autograd.grad(ref_fn(F_), F_)[0], rtol=1e-13,
                               atol=1e-14)
