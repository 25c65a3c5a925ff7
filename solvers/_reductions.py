r"""Norms and dot products of long vectors that keep their precision at any length.

On the CPU, torch reduces a float32 vector with float32 accumulators that grow with its
length: measured at n = 1.24e8 (a GPT-2-small parameter vector), ``torch.linalg.vector_norm``
is off by 1.5e-2 relative and ``torch.dot(x, x)`` by 4e-3 (1e-5 at n = 1e6). A Lanczos
vector normalised with such a norm is not a unit vector, and every threshold of the run
(residual bounds, the measured defect, the verification) inherits the error.

Here the vector is cut into blocks of :data:`BLOCK` entries: each block is reduced by torch's
own kernel (accurate at that length: 3e-9 relative measured), and the block results are
summed in float64. The cost is that of the plain reduction for norms (15-22 ms at
n = 1.24e8, 2 threads); dot products sum slices of elementwise products (150 ms there,
against 38 ms for ``torch.dot``, which is off by 2e-3), and only where the plain one loses
precision: on the CPU, above :data:`BLOCK` entries, in float32 or lower (CUDA reduces in a
tree and float64 has the digits to spare).
"""

from __future__ import annotations

import torch

__all__ = ["BLOCK", "GRAM_SLICE", "dot", "gram", "row_norms", "vector_norm"]

#: Entries reduced by one torch kernel call before the float64 sum.
BLOCK = 4096
#: Entries per slice of :func:`dot` (a 4 MiB float32 buffer: it stays in cache).
DOT_SLICE = 1 << 20
#: Columns per float32 product of :func:`gram` on the CPU (within 1e-8 to 3e-8 of the exact
#: Gram matrix of unit rows, measured at n = 1.4e5 to 1.6e7).
GRAM_SLICE = 1024


def _blocked(x: torch.Tensor) -> bool:
    return x.numel() > BLOCK and x.dtype != torch.float64


def _acc_dtype(x: torch.Tensor) -> torch.dtype | None:
    # bf16/fp16 blocks are reduced in float32 (their own dtype would round each block).
    return torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else None


def vector_norm(x: torch.Tensor) -> torch.Tensor:
    """``||x||`` of a 1-D tensor as a float64 device scalar (no host sync)."""
    if not _blocked(x):
        return torch.linalg.vector_norm(x, dtype=torch.float64 if x.dtype != torch.float64
                                        else None)
    n = x.numel()
    m = n - n % BLOCK
    parts = torch.linalg.vector_norm(x[:m].reshape(-1, BLOCK), dim=1, dtype=_acc_dtype(x))
    total = parts.double().square().sum()
    if m < n:
        total = total + torch.linalg.vector_norm(x[m:], dtype=torch.float64).square()
    return total.sqrt()


def row_norms(X: torch.Tensor) -> torch.Tensor:
    """The norms of the rows of a 2-D tensor, float64, on its device."""
    p, n = X.shape
    if p == 0 or not _blocked(X[0]):
        return torch.linalg.vector_norm(X, dim=1, dtype=torch.float64
                                        if X.dtype != torch.float64 else None)
    m = n - n % BLOCK
    parts = torch.linalg.vector_norm(X[:, :m].reshape(p, -1, BLOCK), dim=2,
                                     dtype=_acc_dtype(X))
    total = parts.double().square().sum(dim=1)
    if m < n:
        total = total + torch.linalg.vector_norm(X[:, m:], dim=1, dtype=torch.float64).square()
    return total.sqrt()


def dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x . y`` of two 1-D tensors of one dtype, as a device scalar of that dtype.

    On the CPU above :data:`BLOCK` entries in float32 or lower: the elementwise products
    of a slice of :data:`DOT_SLICE` entries go to a small buffer, which torch sums with its
    cascade summation (accurate: 6e-9 relative at n = 1.24e8 where ``torch.dot`` is off
    by 2e-3 on a model's vector and its Rayleigh quotient), and the slices' sums are added
    in float64. ``torch.dot`` elsewhere.
    """
    if not _blocked(x) or x.device.type != "cpu":
        return torch.dot(x, y)
    n = x.numel()
    buf = torch.empty(min(DOT_SLICE, n), dtype=x.dtype)
    parts = []
    for c0 in range(0, n, DOT_SLICE):
        c1 = min(n, c0 + DOT_SLICE)
        parts.append(torch.mul(x[c0:c1], y[c0:c1], out=buf[: c1 - c0]).sum(
            dtype=_acc_dtype(x)))
    return torch.stack(parts).double().sum().to(x.dtype)


def gram(X: torch.Tensor, Y: torch.Tensor | None = None) -> torch.Tensor:
    """``X Y^T`` (``Y`` defaults to ``X``) of (p, n) and (q, n) tensors as float64 (p, q),
    on their device.

    Summed in float64 over column slices (each slice's product in the inputs' dtype,
    bf16/fp16 in float32), so the accumulation length of one product stays short; float64
    input is multiplied whole. On the CPU the slices are :data:`GRAM_SLICE` columns,
    multiplied by one batched product per group of them (a loop of short products costs
    more in calls than in flops). The inputs may be strided views (rows of a larger matrix).
    """
    Y = X if Y is None else Y
    if X.dtype == torch.float64 or X.shape[1] <= BLOCK:
        return (X @ Y.T).to(torch.float64)
    (p, n), q = X.shape, Y.shape[0]
    G = torch.zeros(p, q, dtype=torch.float64, device=X.device)
    cpu = X.device.type == "cpu"
    if cpu:
        # A group's batched result is (slices, p, q) float32: kept to ~4 MiB; its columns,
        # cast from bf16/fp16, to ~8 MiB.
        per_group = max(1, min((4 << 20) // (4 * p * q),
                               (8 << 20) // (4 * (p + q) * GRAM_SLICE)))
        cols = GRAM_SLICE * per_group
    else:
        cols = 1 << 20
    for c0 in range(0, n, cols):
        A, B = X[:, c0 : c0 + cols], Y[:, c0 : c0 + cols]
        if A.dtype != torch.float32:
            A = A.float()
            B = A if Y is X else B.float()
        whole = A.shape[1] // GRAM_SLICE * GRAM_SLICE if cpu else 0
        if whole:
            As = A[:, :whole].unflatten(1, (-1, GRAM_SLICE)).transpose(0, 1)
            Bs = B[:, :whole].unflatten(1, (-1, GRAM_SLICE)).transpose(0, 1)
            G += torch.bmm(As, Bs.transpose(1, 2)).double().sum(0)
        if whole < A.shape[1]:
            G += (A[:, whole:] @ B[:, whole:].T).double()
    return G
