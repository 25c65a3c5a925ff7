r"""The empirical-Fisher spectrum by the Gram trick (the second seed's module).

For ``N`` examples with per-example gradients :math:`g_i = \nabla_\theta \ell_i` (the
gradient of example ``i``'s **summed** loss: the token sum of a sequence for language
models, padding and ``-100`` labels excluded), the seed's empirical Fisher is

.. math::

    \hat F = \frac1N \sum_{i=1}^N g_i g_i^\top = \frac1N G^\top G \quad (P \times P).

Its nonzero eigenvalues are those of the ``N x N`` Gram matrix :math:`\frac1N G G^\top`
(:class:`~curvops.linops.gram.GramOperator`), which is what is computed: by dense
``eigvalsh`` when ``N`` is small, by Lanczos on the Gram operator or by a seeded
randomized SVD of ``G`` when ``N`` is large. With ``center_gradients=True`` the mean
gradient is subtracted first (same :math:`1/N`), giving the gradient covariance.

Relation to :class:`~curvops.linops.EmpiricalFisherOperator` (``EF = c \sum_i g_i g_i^\top``
with the loss's normaliser ``c``, same sample unit): :math:`\hat F = \frac{1}{cN}\,\mathrm{EF}`.

**Blocks.** With ``block_structure="layer"`` or ``"module"`` the parameters are split into
blocks (:mod:`curvops.solvers.blocks`) and each block's Gram spectrum is computed. The
returned ``eigenvalues`` are the union of the block spectra: the spectrum of the
*block-diagonal approximation* of :math:`\hat F` (cross-block curvature dropped), **not**
the spectrum of :math:`\hat F`. Its trace equals :math:`\operatorname{tr}\hat F`.

**Subsampling.** ``max_params_per_block`` keeps at most that many coordinates of every
block, chosen by a generator seeded with ``config.seed`` plus a SHA-256 hash of the block
name (never Python's salted ``hash()``), so a run is bit-identical in a new process. The
result is the spectrum of a principal submatrix of :math:`\hat F` (its eigenvalues
interlace those of the full block), not the spectrum of :math:`\hat F` itself.

**Model mode.** The model is used in the mode it is in. BatchNorm in train mode is
refused (its output depends on the batch split) and a model whose outputs differ between
two identical passes (dropout left on) is refused: call ``model.eval()`` first, and make
sure eval-mode BatchNorm statistics are the Fisher you mean.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..linops.checks import (
    check_finite_parameters,
    check_int,
    check_no_train_mode_batchnorm,
    check_real,
)
from ..linops.data import DataSource
from ..linops.dtypes import dtype_name
from ..linops.gram import GramOperator
from ..linops.hf import hf_objective, is_hf_model
from ..linops.objective import Count, Objective, as_objective
from ..linops.params import ParameterSpace, select_parameters
from ..linops.per_example import (
    METHODS,
    check_deterministic_losses,
    per_example_gradient_chunks,
)
from ..solvers.blocks import BLOCK_STRUCTURES, assign_blocks, layer_index
from ..solvers.lanczos import LanczosConfig, lanczos
from ..solvers.metrics import spectrum_metrics

__all__ = ["FisherSpectral", "SpectralConfig", "stable_int_hash"]

EIGENSOLVERS = ("auto", "dense", "lanczos", "randomized_svd")
BLOCK_APPROXIMATION_NOTE = (
    "eigenvalues are the union of the block spectra: the spectrum of the block-diagonal "
    "approximation of the empirical Fisher, not of the full matrix"
)
SUBSAMPLING_NOTE = (
    "coordinates were subsampled: the spectrum is that of a principal submatrix of the "
    "empirical Fisher (its eigenvalues interlace the full block's), not of the full matrix"
)


def stable_int_hash(text: str) -> int:
    """A hash of ``text`` that is the same in every process (SHA-256, unlike ``hash()``)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


@dataclass
class SpectralConfig:
    """Settings of :class:`FisherSpectral` (the seed's fields, plus block and solver controls).

    Attributes:
        seed: Seed of every random choice (coordinate subsampling, Lanczos start vector,
            randomized SVD test matrix).
        eigensolve_device: Where the Gram eigenproblem runs: ``"auto"`` (where the
            gradients are), ``"cpu"`` (float64 is slow on many GPUs) or ``"cuda"``.
        regularization: Jitter added to the Gram matrix **only if the eigensolver fails**
            (at least ``10 eps``); the eigenvalues are shifted back and the jitter recorded
            in the metadata. Default 0: never added otherwise.
        use_deterministic: Run with ``torch.use_deterministic_algorithms(True)`` (and
            ``CUBLAS_WORKSPACE_CONFIG=:16:8`` if unset); both are restored afterwards.
            Slower on GPUs; bit-reproducible runs need it there.
        dtype_eigensolve: ``torch.float64`` (default) or ``torch.float32``: the dtype the
            Gram matrix is formed and diagonalised in.
        top_k_eigenvalues: How many of the largest eigenvalues to return; ``None`` = all
            ``min(N, P)`` of them (dense solver only). An explicit ``k`` above
            ``min(N, P) - 1`` is clipped to it, warned about and recorded.
        max_params_per_block: Keep at most this many coordinates per block (seeded by the
            block name, reproducible across processes); ``None`` keeps all.
        chunk_size: Examples per per-example-gradient chunk (bounds activation memory).
        per_example_method: ``"auto"``, ``"vmap"``, ``"loop"`` or ``"jacobian"``
            (:mod:`curvops.linops.per_example`).
        eigensolver: ``"auto"`` (dense up to ``dense_max_examples``, else Lanczos),
            ``"dense"``, ``"lanczos"`` or ``"randomized_svd"``.
        dense_max_examples: Largest ``N`` the ``"auto"`` solver diagonalises densely.
        lanczos_max_iters: Iteration cap of the Lanczos path.
        rsvd_oversampling: Extra columns of the randomized range finder.
        rsvd_power_iterations: Power iterations of the randomized range finder.
        check_deterministic: Refuse a model whose outputs differ between two identical
            passes (dropout left on).
    """

    seed: int = 42
    eigensolve_device: str = "auto"
    regularization: float = 0.0
    use_deterministic: bool = False
    dtype_eigensolve: torch.dtype = torch.float64
    top_k_eigenvalues: int | None = None
    max_params_per_block: int | None = None
    chunk_size: int = 32
    per_example_method: str = "auto"
    eigensolver: str = "auto"
    dense_max_examples: int = 2048
    lanczos_max_iters: int = 300
    rsvd_oversampling: int = 10
    rsvd_power_iterations: int = 4
    check_deterministic: bool = True

    def __post_init__(self) -> None:
        """Check every field; numbers (numpy scalars too) become Python's.

        Raises:
            ValueError: For any bad field (a number of the wrong type raises
                :class:`~curvops.linops.checks.NumberTypeError`, a ``ValueError`` too).
        """
        self.seed = check_int("seed", self.seed, minimum=0)
        if self.eigensolve_device not in ("auto", "cpu", "cuda"):
            raise ValueError(
                f"eigensolve_device must be 'auto', 'cpu' or 'cuda', got {self.eigensolve_device!r}"
            )
        self.regularization = check_real("regularization", self.regularization, minimum=0)
        if self.dtype_eigensolve not in (torch.float32, torch.float64):
            raise ValueError(
                f"dtype_eigensolve must be torch.float32 or torch.float64, got "
                f"{self.dtype_eigensolve!r}"
            )
        for name, minimum, allow_none in (
            ("top_k_eigenvalues", 1, True),
            ("max_params_per_block", 1, True),
            ("chunk_size", 1, False),
            ("dense_max_examples", 1, False),
            ("lanczos_max_iters", 1, False),
            ("rsvd_power_iterations", 0, False),
            ("rsvd_oversampling", 0, False),
        ):
            value = check_int(name, getattr(self, name), minimum=minimum, allow_none=allow_none)
            setattr(self, name, value)
        if self.per_example_method not in METHODS:
            raise ValueError(
                f"per_example_method must be one of {METHODS}, got {self.per_example_method!r}"
            )
        if self.eigensolver not in EIGENSOLVERS:
            raise ValueError(f"eigensolver must be one of {EIGENSOLVERS}, got {self.eigensolver!r}")


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Switch on ``torch.use_deterministic_algorithms`` for the block; restore the old setting."""
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if previous_env is None:
        # cuBLAS needs a fixed workspace for reproducible GEMMs (read when CUDA initialises).
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":16:8"
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn_only)
        if previous_env is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


@dataclass
class _Block:
    name: str
    param_names: list[str]
    n_params: int
    columns: Tensor  # flat coordinates kept (int64, CPU)


def _subsample(name: str, flat: Tensor, limit: int | None, seed: int) -> Tensor:
    """At most ``limit`` of the block's flat coordinates, seeded by ``(seed, block name)``."""
    if limit is None or flat.numel() <= limit:
        return flat
    gen = torch.Generator().manual_seed((seed + stable_int_hash(name)) % (2**63 - 1))
    pick = torch.randperm(flat.numel(), generator=gen)[:limit]
    return flat[pick.sort().values]


def _flat_ranges(space: ParameterSpace) -> dict[str, Tensor]:
    offsets = np.cumsum((0, *space.numels))
    return {
        name: torch.arange(int(offsets[i]), int(offsets[i + 1]))
        for i, name in enumerate(space.names)
    }


def _objective_for(model: nn.Module, loss_fn: Any) -> Objective:
    if loss_fn is not None:
        return as_objective(loss_fn)
    if not is_hf_model(model):
        raise TypeError(
            f"loss_fn is required for a {type(model).__name__} (only transformers models have a "
            "default objective): pass nn.CrossEntropyLoss(), nn.MSELoss(), ... or an Objective"
        )
    return hf_objective(model)


class FisherSpectral:
    """The Gram-trick empirical-Fisher spectral analysis of the second seed.

    Args:
        config: Settings (default ``SpectralConfig()``).

    Example:
        >>> spectral = FisherSpectral(SpectralConfig(seed=0, top_k_eigenvalues=20))
        >>> out = spectral.compute_fisher_spectrum(model, batch, loss_fn=nn.CrossEntropyLoss())
        >>> out["eigenvalues"][:3], out["metadata"]["sample_unit"]
    """

    def __init__(self, config: SpectralConfig | None = None) -> None:
        if config is not None and not isinstance(config, SpectralConfig):
            raise TypeError(f"config must be a SpectralConfig, got {type(config).__name__}")
        self.config = config or SpectralConfig()

    # --- public API -----------------------------------------------------------------------------
    def compute_fisher_spectrum(
        self,
        model: nn.Module | None,
        batch: Any,
        n_samples: int | None = None,
        block_structure: str = "none",
        center_gradients: bool = False,
        precomputed_gradients: Any = None,
        loss_fn: Any = None,
    ) -> dict[str, Any]:
        r"""The spectrum of :math:`\hat F = \frac1N \sum_i g_i g_i^\top` (or its block-diagonal).

        Args:
            model: The network (unused with ``precomputed_gradients``).
            batch: One batch (``(inputs, targets)`` or an HF dict) or re-iterable batches.
            n_samples: Use the first ``n_samples`` examples (in data order); default all.
            block_structure: ``"none"``, ``"layer"`` or ``"module"`` (see module docstring).
            center_gradients: Subtract the mean gradient (gradient covariance).
            precomputed_gradients: Instead of a model: an ``(N, P)`` tensor (one block only),
                a mapping ``name -> (N, *shape)`` tensor, or a sequence of per-example
                mappings ``name -> tensor``.
            loss_fn: Torch loss module or curvops :class:`Objective`; ``None`` for a
                transformers model means its :func:`~curvops.linops.hf.hf_objective`.

        Returns:
            ``eigenvalues`` (float64 numpy, descending), ``per_block`` (name -> eigenvalues,
            metrics, sizes), ``spectral_gap``, ``condition_number`` and
            ``smallest_eigenvalue`` (over the values above ``eps·λ_max``),
            ``effective_rank``, ``trace`` (exact :math:`\operatorname{tr}\hat F` of the
            coordinates used), ``trace_of_computed``, ``n_eigenvalues``, ``metrics`` (all of
            :func:`~curvops.solvers.metrics.spectrum_metrics`), ``note`` and ``metadata``
            (``sample_unit``, ``normalization``, ``n_samples``, ``use_deterministic``,
            ``seed``, ``dtype``, ``device`` and what else was decided).

        Empty input (no examples, empty ``precomputed_gradients``) gives an empty result
        with a warning.

        Raises:
            ValueError: Bad arguments, ``n_samples`` beyond the data, NaN/Inf, a model that
                is not deterministic, BatchNorm in train mode, or ``top_k_eigenvalues=None``
                with more than ``dense_max_examples`` examples and a non-dense solver.
            TypeError: Bad argument types.
        """
        cfg = self.config
        if block_structure not in BLOCK_STRUCTURES:
            raise ValueError(
                f"block_structure must be one of {BLOCK_STRUCTURES}, got {block_structure!r}"
            )
        if not isinstance(center_gradients, bool):
            raise TypeError(f"center_gradients must be a bool, got {center_gradients!r}")
        n_samples = check_int("n_samples", n_samples, minimum=0, allow_none=True)
        device = self._eigensolve_device()
        with deterministic_algorithms(cfg.use_deterministic):
            if precomputed_gradients is not None:
                gathered = self._from_precomputed(precomputed_gradients, n_samples, block_structure)
                sample_unit, objective = "precomputed_row", None
            else:
                if not isinstance(model, nn.Module):
                    raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
                objective = _objective_for(model, loss_fn)
                gathered = self._from_model(model, objective, batch, n_samples, block_structure)
                sample_unit = objective.sample_unit
            if gathered is None:
                return self._empty_result(sample_unit, block_structure, center_gradients)
            blocks, G, method, c = gathered
            return self._spectrum(
                blocks,
                G,
                method,
                c,
                device,
                sample_unit,
                objective,
                block_structure,
                center_gradients,
            )

    # --- gradients ------------------------------------------------------------------------------
    def _examples_used(self, n_samples: int | None, available: int, held: str) -> int | None:
        """The number of examples N to use: ``n_samples``, or all ``available``.

        Args:
            n_samples: The requested number, or None for all.
            available: How many the input holds.
            held: What the input holds, for the message of a request beyond it.

        Returns:
            N, or None (with a warning) when it is 0.

        Raises:
            ValueError: ``n_samples`` exceeds ``available``, or the solver cannot give what
                is asked for N examples.
        """
        N = available if n_samples is None else n_samples
        if N > available:
            raise ValueError(f"n_samples={n_samples} but {held}")
        if N == 0:
            warnings.warn("no examples to compute a Fisher spectrum from", stacklevel=4)
            return None
        self._check_solvable(N)
        return N

    def _check_solvable(self, N: int) -> None:
        cfg = self.config
        if cfg.top_k_eigenvalues is None and (
            cfg.eigensolver in ("lanczos", "randomized_svd")
            or (cfg.eigensolver == "auto" and N > cfg.dense_max_examples)
        ):
            raise ValueError(
                f"top_k_eigenvalues=None asks for all eigenvalues, which only the dense solver "
                f"gives; with N={N} examples (dense_max_examples={cfg.dense_max_examples}) and "
                f"eigensolver={cfg.eigensolver!r} set top_k_eigenvalues"
            )

    def _blocks(self, names: Sequence[str], space: ParameterSpace, structure: str) -> list[_Block]:
        ranges = _flat_ranges(space)
        numel = dict(zip(space.names, space.numels))
        out = []
        for name, members in assign_blocks(names, structure).items():
            flat = torch.cat([ranges[m] for m in members])
            cols = _subsample(name, flat, self.config.max_params_per_block, self.config.seed)
            out.append(_Block(name, members, sum(numel[m] for m in members), cols))
        return out

    def _from_model(
        self,
        model: nn.Module,
        objective: Objective,
        batch: Any,
        n_samples: int | None,
        structure: str,
    ) -> tuple[list[_Block], Tensor, str, float] | None:
        cfg = self.config
        names, tensors = select_parameters(model, None)
        space = ParameterSpace.from_parameters(names, tensors)
        check_finite_parameters(names, tensors)
        check_no_train_mode_batchnorm(model)
        source = DataSource(batch)
        available = sum(objective.count(b).examples for b in source)
        N = self._examples_used(n_samples, available,
                                f"the data holds only {available} examples")
        if N is None:
            return None
        blocks = self._blocks(names, space, structure)
        columns = torch.cat([b.columns for b in blocks]).to(space.device)
        # G's columns are laid out block after block; skip the gather only when that is flat order.
        identity = columns.numel() == space.size and bool(
            (columns == torch.arange(space.size, device=space.device)).all()
        )
        if cfg.check_deterministic:
            check_deterministic_losses(model, objective, next(iter(source)), cfg.chunk_size)
        parts: list[Tensor] = []
        methods: list[str] = []
        used = Count(0, 0)
        remaining = N
        for b in source:
            if remaining == 0:
                break
            n_b = objective.count(b).examples
            if n_b > remaining:
                b = objective.split(b, remaining)[0]
            used = used + objective.count(b)
            for chunk in per_example_gradient_chunks(
                model,
                objective,
                b,
                names,
                chunk_size=cfg.chunk_size,
                method=cfg.per_example_method,
                columns=None if identity else columns,
            ):
                parts.append(chunk.gradients)
                methods.append(chunk.method)
            remaining -= min(n_b, remaining)
        c = objective.normalizer(used) if used.terms else None
        return blocks, torch.cat(parts), "+".join(sorted(set(methods))), c

    def _from_precomputed(
        self, grads: Any, n_samples: int | None, structure: str
    ) -> tuple[list[_Block], Tensor, str, None] | None:
        if isinstance(grads, Tensor):
            if grads.dim() != 2:
                raise ValueError(f"precomputed gradients must be (N, P), got {tuple(grads.shape)}")
            if structure != "none":
                raise ValueError(
                    "an (N, P) tensor of gradients has no parameter names; pass a mapping "
                    "name -> (N, *shape) tensor for block_structure='layer' or 'module'"
                )
            per_name = {"all": grads}
        elif isinstance(grads, Mapping):
            per_name = dict(grads)
        elif isinstance(grads, Sequence) and not isinstance(grads, (str, bytes)):
            if len(grads) == 0:
                per_name = {}
            else:
                if not all(isinstance(g, Mapping) for g in grads):
                    raise TypeError("a sequence of precomputed gradients must hold mappings")
                keys = list(grads[0])
                if any(list(g) != keys for g in grads):
                    raise ValueError("every per-example gradient mapping must have the same keys")
                per_name = {k: torch.stack([g[k] for g in grads]) for k in keys}
        else:
            raise TypeError(
                "precomputed_gradients must be an (N, P) tensor, a mapping name -> (N, ...) "
                f"tensor or a sequence of mappings, got {type(grads).__name__}"
            )
        if not per_name or any(t.shape[0] == 0 for t in per_name.values()):
            warnings.warn("empty precomputed_gradients provided", stacklevel=3)
            return None
        for k, t in per_name.items():
            if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() < 1:
                raise TypeError(f"precomputed gradient {k!r} must be a floating-point tensor")
        sizes = {t.shape[0] for t in per_name.values()}
        if len(sizes) != 1:
            raise ValueError(f"precomputed gradients disagree on N: {sorted(sizes)}")
        available = sizes.pop()
        N = self._examples_used(n_samples, available,
                                f"only {available} gradients were given")
        if N is None:
            return None
        flats = [t[:N].reshape(N, -1) for t in per_name.values()]
        G = torch.cat(flats, dim=1) if len(flats) > 1 else flats[0]
        names = list(per_name)
        space = ParameterSpace(
            tuple(names),
            tuple(torch.Size([f.shape[1]]) for f in flats),
            tuple(f.dtype for f in flats),
            G.dtype,
            G.device,
        )
        blocks = self._blocks(names, space, structure)
        columns = torch.cat([b.columns for b in blocks]).to(G.device)
        return blocks, G.index_select(1, columns), "precomputed", None

    # --- spectra --------------------------------------------------------------------------------
    def _eigensolve_device(self) -> torch.device | None:
        choice = self.config.eigensolve_device
        if choice == "cuda" and not torch.cuda.is_available():
            raise ValueError("eigensolve_device='cuda' but CUDA is not available")
        return None if choice == "auto" else torch.device(choice)

    def _block_spectrum(self, Gb: Tensor, center: bool) -> tuple[np.ndarray, dict[str, Any]]:
        """Eigenvalues (descending, float64) of one block's Gram matrix, and how they were got."""
        cfg = self.config
        N, P = Gb.shape
        r = min(N, P)
        info: dict[str, Any] = {"k_requested": cfg.top_k_eigenvalues, "k_clipped": False}
        if cfg.top_k_eigenvalues is None:
            k = r
        else:
            k = min(cfg.top_k_eigenvalues, r - 1)
            info["k_clipped"] = k < cfg.top_k_eigenvalues
        info["k_used"] = k
        solver = cfg.eigensolver
        if solver == "auto":
            solver = "dense" if N <= cfg.dense_max_examples else "lanczos"
        info["eigensolver"] = solver
        info["jitter"] = 0.0
        if k < 1:
            return np.empty(0), info
        if solver == "dense":
            values, jitter = _dense_gram_eigenvalues(Gb, center, cfg.regularization)
            info["jitter"] = jitter
            values = values[:r][:k]
        elif solver == "lanczos":
            values, converged = self._lanczos(Gb, center, k)
            info["all_converged"] = converged
        else:
            values = _randomized_gram_eigenvalues(
                Gb, center, k, cfg.seed, cfg.rsvd_oversampling, cfg.rsvd_power_iterations
            )
        return values, info

    def _lanczos(self, Gb: Tensor, center: bool, k: int) -> tuple[np.ndarray, bool]:
        op = GramOperator.from_gradients(Gb, center=center)
        res = lanczos(
            op,
            k,
            config=LanczosConfig(
                k=k,
                max_iters=max(self.config.lanczos_max_iters, k),
                seed=self.config.seed,
                which="LA",
                return_eigenvectors=False,
            ),
        )
        if not res.all_converged:
            warnings.warn(
                f"Lanczos on the Gram operator: {int(np.sum(~res.converged))} of "
                f"{res.converged.size} eigenvalues did not converge in {res.iterations} "
                "iterations (recorded in per_block[...]['all_converged'])",
                stacklevel=4,
            )
        return np.sort(np.asarray(res.eigenvalues, dtype=np.float64))[::-1], res.all_converged

    def _spectrum(
        self,
        blocks: list[_Block],
        G: Tensor,
        method: str,
        c: float | None,
        device: torch.device | None,
        sample_unit: str,
        objective: Objective | None,
        structure: str,
        center: bool,
    ) -> dict[str, Any]:
        cfg = self.config
        N = int(G.shape[0])
        if not bool(torch.isfinite(G).all()):
            raise ValueError("the per-example gradients contain NaN or Inf")
        target = G.device if device is None else device
        eps = float(torch.finfo(cfg.dtype_eigensolve).eps)
        per_block: dict[str, Any] = {}
        all_values: list[np.ndarray] = []
        clipped: list[str] = []
        trace = 0.0
        start = 0
        for block in blocks:
            width = int(block.columns.numel())
            Gb = G[:, start : start + width].to(device=target, dtype=cfg.dtype_eigensolve)
            start += width
            values, info = self._block_spectrum(Gb, center)
            if info["k_clipped"]:
                clipped.append(block.name)
            op = GramOperator.from_gradients(Gb, center=center)
            block_trace = op.trace()
            trace += block_trace
            metrics = spectrum_metrics(values, is_psd=True, dtype_eps=eps)
            per_block[block.name] = {
                "eigenvalues": values,
                "param_names": list(block.param_names),
                "layer_index": layer_index(block.param_names[0])
                if structure == "layer" and block.name != "other"
                else None,
                "n_params": block.n_params,
                "n_params_used": width,
                "subsampled": width < block.n_params,
                "trace": block_trace,
                **info,
                **metrics,
            }
            all_values.append(values)
        union = np.sort(np.concatenate(all_values))[::-1] if all_values else np.empty(0)
        if cfg.top_k_eigenvalues is not None:
            union = union[: cfg.top_k_eigenvalues]
        if clipped:
            warnings.warn(
                f"top_k_eigenvalues={cfg.top_k_eigenvalues} exceeds min(N, P) - 1 for blocks "
                f"{clipped}; clipped there (recorded in metadata['k_clipped_blocks'])",
                stacklevel=3,
            )
        metrics = spectrum_metrics(union, is_psd=True, dtype_eps=eps)
        notes = [metrics["note"]]
        subsampled = any(b["subsampled"] for b in per_block.values())
        if len(blocks) > 1:
            notes.append(BLOCK_APPROXIMATION_NOTE)
        if subsampled:
            notes.append(SUBSAMPLING_NOTE)
        return {
            "eigenvalues": union,
            "per_block": per_block,
            "spectral_gap": metrics["spectral_gap"],
            "condition_number": metrics["condition_number"],
            "smallest_eigenvalue": _smallest_nonzero(union, metrics["eps"]),
            "effective_rank": metrics["effective_rank"],
            "trace": trace,
            "trace_of_computed": metrics["trace_of_computed"],
            "n_eigenvalues": int(union.size),
            "metrics": metrics,
            "note": "; ".join(notes),
            "metadata": {
                "sample_unit": sample_unit,
                "normalization": "n_samples",
                "fisher": "F = (1/N) sum_i g_i g_i^T, g_i = gradient of example i's summed loss",
                "objective_normalization": None if objective is None else objective.normalization,
                "ef_relation": "F = ef_scale * EF, EF = EmpiricalFisherOperator on the same data",
                "objective_normalizer": c,
                "ef_scale": None if c is None else 1.0 / (c * N),
                "n_samples": N,
                "n_params": sum(b.n_params for b in blocks),
                "n_params_used": int(G.shape[1]),
                "subsampled": subsampled,
                "max_params_per_block": cfg.max_params_per_block,
                "center_gradients": center,
                "block_structure": structure,
                "block_diagonal_approximation": len(blocks) > 1,
                "n_blocks": len(blocks),
                "use_deterministic": cfg.use_deterministic,
                "seed": cfg.seed,
                "dtype": dtype_name(cfg.dtype_eigensolve),
                "device": str(target),
                "per_example_method": method,
                "top_k_requested": cfg.top_k_eigenvalues,
                "k_clipped": bool(clipped),
                "k_clipped_blocks": clipped,
                "eigensolvers": sorted({b["eigensolver"] for b in per_block.values()}),
                "jitter": max((b["jitter"] for b in per_block.values()), default=0.0),
            },
        }

    def _empty_result(self, sample_unit: str, structure: str, center: bool) -> dict[str, Any]:
        cfg = self.config
        metrics = spectrum_metrics([], is_psd=True)
        nan = float("nan")
        return {
            "eigenvalues": np.empty(0),
            "per_block": {},
            "spectral_gap": nan,
            "condition_number": nan,
            "smallest_eigenvalue": nan,
            "effective_rank": 0.0,
            "trace": 0.0,
            "trace_of_computed": 0.0,
            "n_eigenvalues": 0,
            "metrics": metrics,
            "note": "empty input: no eigenvalues were computed",
            "metadata": {
                "sample_unit": sample_unit,
                "normalization": "n_samples",
                "n_samples": 0,
                "center_gradients": center,
                "block_structure": structure,
                "use_deterministic": cfg.use_deterministic,
                "seed": cfg.seed,
                "dtype": dtype_name(cfg.dtype_eigensolve),
                "device": None,
                "empty": True,
            },
        }


# --- eigensolvers of one block -----------------------------------------------------------------
def _dense_gram_eigenvalues(
    Gb: Tensor, center: bool, regularization: float
) -> tuple[np.ndarray, float]:
    """All ``N`` eigenvalues of the block's Gram matrix, descending; jitter only on failure."""
    K = GramOperator.from_gradients(Gb, center=center).gram_matrix()
    try:
        values = torch.linalg.eigvalsh(K)
        jitter = 0.0
    except torch.linalg.LinAlgError:
        jitter = max(regularization, 10 * float(torch.finfo(K.dtype).eps))
        eye = torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
        # The shift is known exactly, so it is taken off again: the spectrum stays unbiased.
        values = torch.linalg.eigvalsh(K + jitter * eye) - jitter
        warnings.warn(
            f"eigvalsh failed on the Gram matrix; retried with jitter {jitter:g} (recorded)",
            stacklevel=5,
        )
    return values.double().cpu().numpy()[::-1].copy(), jitter


def _randomized_gram_eigenvalues(
    Gb: Tensor, center: bool, k: int, seed: int, oversampling: int, power_iterations: int
) -> np.ndarray:
    r"""Top ``k`` eigenvalues :math:`\sigma_i^2/N` of the Gram matrix by a seeded randomized SVD.

    The Halko–Martinsson–Tropp range finder with power iterations on :math:`G_c`; the test
    matrix comes from a ``torch.Generator`` (``torch.svd_lowrank`` takes none).
    """
    A = GramOperator.from_gradients(Gb, center=center).centered_gradients()
    N, P = A.shape
    width = min(k + oversampling, N, P)
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(P, width, generator=gen, dtype=torch.float64).to(A.device, A.dtype)
    Q = torch.linalg.qr(A @ omega).Q
    for _ in range(power_iterations):
        Q = torch.linalg.qr(A.T @ Q).Q
        Q = torch.linalg.qr(A @ Q).Q
    s = torch.linalg.svdvals(Q.T @ A)
    return (s[:k].double() ** 2 / N).cpu().numpy()


def _smallest_nonzero(values: np.ndarray, eps: float) -> float:
    """The smallest value above ``eps · λ_max`` (the one the condition number divides by)."""
    if values.size == 0 or not math.isfinite(eps) or values[0] <= 0:
        return float("nan")
    kept = values[values > eps * values[0]]
    return float(kept.min()) if kept.size else float("nan")
