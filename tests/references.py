r"""Brute-force dense references for the curvature operators, written without curvops.

Everything here works on a *flat* parameter vector :math:`\theta` (the selected
parameters, flattened and concatenated in the model's parameter order) through
``torch.func.functional_call``, and recomputes every convention from scratch:

* total loss :math:`L(\theta) = c \sum_n \ell_n(\theta)`, with :math:`\ell_n` example
  ``n``'s loss summed over its loss terms and :math:`c = 1` (``"sum"``) or
  :math:`1/\#\text{terms}` over the whole data (``"mean"``);
* Hessian :math:`\nabla^2 L` (autograd double backward, one row at a time; or
  ``torch.func.hessian``);
* GGN :math:`c \sum_r J_r^\top H_r J_r` with the Jacobian from ``torch.func.jacrev`` and
  the output Hessians :math:`H_r` in closed form (written here, independently of
  ``linops/losses.py``);
* empirical Fisher :math:`c \sum_n g_n g_n^\top` with :math:`g_n = \nabla \ell_n` from a
  per-example ``torch.func.grad`` loop.

The test problems (small float64 models with seeded data) live here too, so every
test file builds the same ones. Nothing in this file imports curvops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev

IGNORE = -100

# --------------------------------------------------------------------------------------
# Flat parameter vectors
# --------------------------------------------------------------------------------------


def selected_names(model: nn.Module, names: Sequence[str] | None) -> list[str]:
    """The selected parameter names in the model's order (all parameters for ``None``)."""
    all_names = [n for n, _ in model.named_parameters()]
    if names is None:
        return all_names
    wanted = set(names)
    return [n for n in all_names if n in wanted]


def flat_parameters(model: nn.Module, names: Sequence[str]) -> Tensor:
    """The selected parameters as one detached flat vector."""
    params = dict(model.named_parameters())
    return torch.cat([params[n].detach().reshape(-1) for n in names]).clone()


def block_slices(model: nn.Module, names: Sequence[str]) -> list[slice]:
    """Where each selected parameter lives in the flat vector."""
    params = dict(model.named_parameters())
    out, start = [], 0
    for n in names:
        size = params[n].numel()
        out.append(slice(start, start + size))
        start += size
    return out


def unflatten_to_dict(model: nn.Module, names: Sequence[str], theta: Tensor) -> dict[str, Tensor]:
    """All parameters of ``model`` with the selected ones taken from ``theta``."""
    params = dict(model.named_parameters())
    out = {n: p.detach() for n, p in params.items()}
    start = 0
    for n in names:
        p = params[n]
        out[n] = theta[start : start + p.numel()].reshape(p.shape).to(p.dtype)
        start += p.numel()
    return out


def forward_fn(model: nn.Module, names: Sequence[str]) -> Callable[[Tensor, Tensor], Tensor]:
    """``(theta, x) -> model(x)`` with the selected parameters replaced by ``theta``."""

    def f(theta: Tensor, x: Tensor) -> Tensor:
        return functional_call(model, unflatten_to_dict(model, names, theta), (x,))

    return f


# --------------------------------------------------------------------------------------
# Losses, written out by hand
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossSpec:
    """A loss as the references understand it.

    Attributes:
        kind: ``"ce"`` (logits ``(N, C, ...)``, class targets ``(N, ...)``, ``-100``
            ignored), ``"mse"`` or ``"bce"`` (outputs and targets of one shape).
        reduction: ``"mean"`` or ``"sum"``.
    """

    kind: str
    reduction: str

    def module(self) -> nn.Module:
        """The torch loss module this spec describes (what the operators are given)."""
        cls = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}
        return cls[self.kind](reduction=self.reduction)


def per_example_losses(kind: str, out: Tensor, y: Tensor) -> Tensor:
    r""":math:`\ell_n`, each example's loss summed over its loss terms, shape ``(N,)``."""
    n = out.shape[0]
    if kind == "ce":
        logp = out - torch.logsumexp(out, dim=1, keepdim=True)
        keep = y != IGNORE
        safe = torch.where(keep, y, torch.zeros_like(y))
        picked = torch.gather(logp, 1, safe.unsqueeze(1)).squeeze(1)
        return -(picked * keep.to(out.dtype)).reshape(n, -1).sum(1)
    if kind == "mse":
        return ((out - y) ** 2).reshape(n, -1).sum(1)
    if kind == "bce":
        # softplus(x) - x y, in the stable form max(x, 0) - x y + log(1 + exp(-|x|)).
        terms = out.clamp_min(0) - out * y + torch.log1p(torch.exp(-out.abs()))
        return terms.reshape(n, -1).sum(1)
    raise ValueError(kind)


def loss_terms(kind: str, y: Tensor) -> int:
    """Number of loss terms of a target tensor (what ``mean`` divides by)."""
    return int((y != IGNORE).sum()) if kind == "ce" else y.numel()


def normalizer(spec: LossSpec, batches: Sequence[tuple[Tensor, Tensor]]) -> float:
    """The factor ``c`` of the total loss over all batches."""
    if spec.reduction == "sum":
        return 1.0
    return 1.0 / sum(loss_terms(spec.kind, y) for _, y in batches)


def total_loss_fn(
    model: nn.Module,
    names: Sequence[str],
    spec: LossSpec,
    batches: Sequence[tuple[Tensor, Tensor]],
) -> Callable[[Tensor], Tensor]:
    r"""``theta -> L(theta) = c \sum_batches \sum_n \ell_n``."""
    f = forward_fn(model, names)
    c = normalizer(spec, batches)

    def total_loss(theta: Tensor) -> Tensor:
        return c * sum(per_example_losses(spec.kind, f(theta, x), y).sum() for x, y in batches)

    return total_loss


def output_hessian_rows(kind: str, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    r"""Rows of the outputs and their closed-form loss Hessians.

    Returns:
        ``(keep, H)``: for cross-entropy the rows are the positions ``(n, d...)`` whose
        target is not ``-100`` (``keep`` masks them among all positions), each with
        :math:`\operatorname{diag}(p) - pp^\top` of size ``C``; for MSE (:math:`2I`) and
        BCE (:math:`\operatorname{diag}(\sigma(1-\sigma))`) each example is one row of all
        its outputs (``keep`` all true).
    """
    if kind == "ce":
        logits = out.movedim(1, -1).reshape(-1, out.shape[1])
        keep = (y != IGNORE).reshape(-1)
        p = torch.softmax(logits[keep], dim=-1)
        H = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        return keep, H
    flat = out.reshape(out.shape[0], -1)
    if kind == "mse":
        eye = torch.eye(flat.shape[1], dtype=out.dtype)
        return torch.ones(out.shape[0], dtype=torch.bool), 2.0 * eye.expand(flat.shape[0], -1, -1)
    s = torch.sigmoid(flat)
    return torch.ones(out.shape[0], dtype=torch.bool), torch.diag_embed(s * (1 - s))


def row_jacobians(kind: str, J: Tensor, keep: Tensor) -> Tensor:
    """Rearrange an output Jacobian ``(N, C, ..., P)`` (CE) or ``(N, ..., P)`` into rows."""
    P = J.shape[-1]
    if kind == "ce":
        C = J.shape[1]
        return J.movedim(1, -2).reshape(-1, C, P)[keep]
    return J.reshape(J.shape[0], -1, P)


# --------------------------------------------------------------------------------------
# Dense references
# --------------------------------------------------------------------------------------


def dense_hessian_double_backward(
    model: nn.Module,
    names: Sequence[str],
    spec: LossSpec,
    batches: Sequence[tuple[Tensor, Tensor]],
) -> Tensor:
    """The Hessian of the total loss, one row per autograd double backward (no vmap)."""
    L = total_loss_fn(model, names, spec, batches)
    theta = flat_parameters(model, names).requires_grad_(True)
    (g,) = torch.autograd.grad(L(theta), theta, create_graph=True)
    rows = [torch.autograd.grad(g[i], theta, retain_graph=True)[0] for i in range(g.numel())]
    return torch.stack(rows)


def dense_hessian_func(
    model: nn.Module,
    names: Sequence[str],
    spec: LossSpec,
    batches: Sequence[tuple[Tensor, Tensor]],
) -> Tensor:
    """The Hessian of the total loss by ``torch.func.hessian`` (forward over reverse)."""
    L = total_loss_fn(model, names, spec, batches)
    return hessian(L)(flat_parameters(model, names))


def dense_ggn(
    model: nn.Module,
    names: Sequence[str],
    spec: LossSpec,
    batches: Sequence[tuple[Tensor, Tensor]],
) -> Tensor:
    r"""GGN :math:`c \sum_r J_r^\top H_r J_r` (jacrev Jacobians, closed-form :math:`H_r`)."""
    return dense_sandwich(model, names, spec, batches, middle=None)


def dense_sandwich(
    model: nn.Module,
    names: Sequence[str],
    spec: LossSpec,
    batches: Sequence[tuple[Tensor, Tensor]],
    middle: Callable[[int, Tensor, Tensor], Tensor] | None,
) -> Tensor:
    r""":math:`c \sum_r J_r^\top M_r J_r` over all batches.

    Args:
        model: The network.
        names: Selected parameter names.
        spec: The loss.
        batches: The data.
        middle: ``(batch_index, outputs, targets) -> (R, C, C)`` middle matrices in the
            row order of :func:`output_hessian_rows`; ``None`` for the closed-form loss
            Hessians (the GGN).
    """
    f = forward_fn(model, names)
    theta = flat_parameters(model, names)
    c = normalizer(spec, batches)
    out_mat = torch.zeros(theta.numel(), theta.numel(), dtype=theta.dtype)
    for b, (x, y) in enumerate(batches):
        out = f(theta, x).detach()
        J = jacrev(f)(theta, x)
        keep, H = output_hessian_rows(spec.kind, out, y)
        if middle is not None:
            H = middle(b, out, y)
        Jr = row_jacobians(spec.kind, J, keep)
        out_mat += torch.einsum("rip,rij,rjq->pq", Jr, H, Jr)
    return c * out_mat


def per_example_gradients(
    model: nn.Module,
    names: Sequence[str],
    spec: LossSpec,
    batches: Sequence[tuple[Tensor, Tensor]],
) -> Tensor:
    r""":math:`g_n = \nabla \ell_n` for every example of every batch, one at a time: ``(N, P)``."""
    f = forward_fn(model, names)
    theta = flat_parameters(model, names)
    rows = []
    for x, y in batches:
        for i in range(y.shape[0]):
            xi, yi = x[i : i + 1], y[i : i + 1]

            def ell(t: Tensor, xi: Tensor = xi, yi: Tensor = yi) -> Tensor:
                return per_example_losses(spec.kind, f(t, xi), yi)[0]

            rows.append(grad(ell)(theta))
    return torch.stack(rows)


def dense_empirical_fisher(
    model: nn.Module,
    names: Sequence[str],
    spec: LossSpec,
    batches: Sequence[tuple[Tensor, Tensor]],
) -> Tensor:
    r"""Empirical Fisher :math:`c \sum_n g_n g_n^\top` (per-example gradient loop)."""
    G = per_example_gradients(model, names, spec, batches)
    return normalizer(spec, batches) * G.T @ G


def dense_reference(
    kind: str,
    model: nn.Module,
    names: Sequence[str],
    spec: LossSpec,
    batches: Sequence[tuple[Tensor, Tensor]],
) -> Tensor:
    """The dense reference of an operator kind: ``hessian``, ``ggn``, ``fisher``, ``ef``."""
    if kind == "hessian":
        return dense_hessian_double_backward(model, names, spec, batches)
    if kind in ("ggn", "fisher"):
        return dense_ggn(model, names, spec, batches)
    if kind == "ef":
        return dense_empirical_fisher(model, names, spec, batches)
    raise ValueError(kind)


def relative_error(A: Tensor, B: Tensor) -> float:
    """``‖A − B‖_F / ‖B‖_F`` (``‖A − B‖_F`` when ``B`` is zero)."""
    diff = torch.linalg.norm((A - B).double())
    scale = torch.linalg.norm(B.double())
    return float(diff / scale) if scale > 0 else float(diff)


# --------------------------------------------------------------------------------------
# Test problems: small float64 models and seeded data
# --------------------------------------------------------------------------------------


def reinit_(model: nn.Module, seed: int, scale: float = 0.5) -> nn.Module:
    """Overwrite every parameter with seeded normal numbers (no global RNG)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
    return model


class CountingNet(nn.Module):
    """MLP 3-4-2 (tanh) that counts its forward passes (to prove checks come before work)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)
        self.forwards = 0

    def forward(self, x: Tensor) -> Tensor:
        self.forwards += 1
        return self.fc2(torch.tanh(self.fc1(x)))


def assert_refused(exc, model, loss_fn, batches, match=None, *, classes, max_forwards=0,
                   **kwargs) -> None:
    """Every operator class in ``classes`` refuses at construction, after at most
    ``max_forwards`` forward passes of a :class:`CountingNet` (0: before touching the model;
    2: the determinism check's two no-grad passes)."""
    for cls in classes:
        if isinstance(model, CountingNet):
            model.forwards = 0
        with pytest.raises(exc, match=match):
            cls(model, loss_fn, batches, **kwargs)
        if isinstance(model, CountingNet):
            assert model.forwards <= max_forwards, cls.__name__


def class_targets(gen: torch.Generator, shape: tuple[int, ...], num_classes: int) -> Tensor:
    """Seeded class indices."""
    return torch.randint(0, num_classes, shape, generator=gen)


@dataclass
class Problem:
    """A model, a loss and data split into batches (all float64)."""

    name: str
    model: nn.Module
    spec: LossSpec
    batches: list[tuple[Tensor, Tensor]]

    def merged(self) -> tuple[Tensor, Tensor]:
        """All batches as one."""
        return torch.cat([x for x, _ in self.batches]), torch.cat([y for _, y in self.batches])

    def rebatched(self, sizes: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
        """The same examples in the same order, split into batches of the given sizes."""
        X, Y = self.merged()
        assert sum(sizes) == X.shape[0]
        out, start = [], 0
        for s in sizes:
            out.append((X[start : start + s], Y[start : start + s]))
            start += s
        return out


def mlp_ce(reduction: str = "mean", seed: int = 0) -> Problem:
    """MLP 5-8-3 with cross-entropy over batches of sizes 3, 7 and 5."""
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    reinit_(model, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    batches = [
        (torch.randn(n, 5, generator=gen, dtype=torch.float64), class_targets(gen, (n,), 3))
        for n in (3, 7, 5)
    ]
    return Problem("mlp_ce_" + reduction, model, LossSpec("ce", reduction), batches)


def mlp_mse(reduction: str = "sum", seed: int = 1) -> Problem:
    """MLP 4-6-3 (three outputs) with squared error, batches of sizes 4 and 6."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 3)).double()
    reinit_(model, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    batches = [
        (
            torch.randn(n, 4, generator=gen, dtype=torch.float64),
            torch.randn(n, 3, generator=gen, dtype=torch.float64),
        )
        for n in (4, 6)
    ]
    return Problem("mlp_mse_" + reduction, model, LossSpec("mse", reduction), batches)


def mlp_bce(reduction: str = "mean", seed: int = 2) -> Problem:
    """MLP 4-5-2 with BCE-with-logits on two binary outputs, batches of sizes 5 and 3."""
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    reinit_(model, seed, scale=0.8)
    gen = torch.Generator().manual_seed(seed + 100)
    batches = [
        (
            torch.randn(n, 4, generator=gen, dtype=torch.float64),
            torch.randint(0, 2, (n, 2), generator=gen).double(),
        )
        for n in (5, 3)
    ]
    return Problem("mlp_bce_" + reduction, model, LossSpec("bce", reduction), batches)


def small_cnn(seed: int = 3) -> Problem:
    """Conv(1→2, 3x3) → tanh → linear to 3 classes on 5x5 images, cross-entropy (mean)."""
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3)
    ).double()
    reinit_(model, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    batches = [
        (torch.randn(n, 1, 5, 5, generator=gen, dtype=torch.float64), class_targets(gen, (n,), 3))
        for n in (4, 2)
    ]
    return Problem("cnn_ce", model, LossSpec("ce", "mean"), batches)


def layernorm_mlp(seed: int = 4, kind: str = "ce") -> Problem:
    """Linear(4→6) → LayerNorm(6) → tanh → Linear(6→3): the LayerNorm pitfall model."""
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()
    reinit_(model, seed)
    with torch.no_grad():  # LayerNorm weights away from 1 and biases away from 0
        model[1].weight.add_(1.0)
    gen = torch.Generator().manual_seed(seed + 100)
    if kind == "ce":
        batches = [
            (torch.randn(n, 4, generator=gen, dtype=torch.float64), class_targets(gen, (n,), 3))
            for n in (5, 4)
        ]
    else:
        batches = [
            (
                torch.randn(n, 4, generator=gen, dtype=torch.float64),
                torch.randn(n, 3, generator=gen, dtype=torch.float64),
            )
            for n in (5, 4)
        ]
    return Problem("layernorm_" + kind, model, LossSpec(kind, "mean"), batches)


def sequence_ce(seed: int = 5) -> Problem:
    """Conv1d model with outputs ``(N, C=3, L=4)``, targets ``(N, L)`` with some ``-100``."""
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv1d(3, 3, 1)
    ).double()
    reinit_(model, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    batches = []
    for n in (3, 4):
        x = torch.randn(n, 2, 4, generator=gen, dtype=torch.float64)
        y = class_targets(gen, (n, 4), 3)
        drop = torch.rand(n, 4, generator=gen) < 0.3
        y[drop] = IGNORE
        batches.append((x, y))
    # make sure at least one target is ignored, and one example keeps only one position
    batches[0][1][0, 1:] = IGNORE
    batches[1][1][2, 0] = IGNORE
    return Problem("seq_ce", model, LossSpec("ce", "mean"), batches)


class BatchNormEvalNet(nn.Module):
    """Linear → BatchNorm1d (eval, with non-trivial running statistics) → tanh → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def batchnorm_eval(seed: int = 6) -> Problem:
    """A BatchNorm model in eval mode with MSE (mean)."""
    model = BatchNormEvalNet().double()
    reinit_(model, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.randn(4, generator=gen, dtype=torch.float64))
        model.bn.running_var.copy_(torch.rand(4, generator=gen, dtype=torch.float64) + 0.5)
    model.eval()
    batches = [
        (
            torch.randn(n, 3, generator=gen, dtype=torch.float64),
            torch.randn(n, 2, generator=gen, dtype=torch.float64),
        )
        for n in (3, 5)
    ]
    return Problem("bn_eval_mse", model, LossSpec("mse", "mean"), batches)


def loss_output_hessian_autodiff(kind: str, out: Tensor, y: Tensor) -> Tensor:
    """Hessian of the summed per-example losses w.r.t. one example's outputs (check of the
    closed forms above): ``out`` and ``y`` are a single example, result ``(D, D)``."""

    def ell(o: Tensor) -> Tensor:
        return per_example_losses(kind, o.reshape(out.shape), y).sum()

    return hessian(ell)(out.reshape(-1))


def reference_and_torch_loss(problem: Problem) -> tuple[Tensor, Tensor]:
    """Our total loss and the torch loss module's value on the merged data: a sanity check
    of the hand-written losses and normalisers against torch itself."""
    X, Y = problem.merged()
    names = selected_names(problem.model, None)
    L = total_loss_fn(problem.model, names, problem.spec, problem.batches)
    theta = flat_parameters(problem.model, names)
    with torch.no_grad():
        return L(theta), problem.spec.module()(problem.model(X), Y)


def matrix_with_spectrum(eigenvalues: Tensor, seed: int = 0) -> Tensor:
    """A dense symmetric float64 matrix ``Q diag(eigenvalues) Qᵀ`` with a seeded random ``Q``."""
    n = eigenvalues.numel()
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (Q * eigenvalues) @ Q.T
