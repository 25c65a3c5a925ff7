r"""HuggingFace transformers models as curvops objectives.

A :class:`LanguageModelObjective` lets every curvops operator use a causal LM
(GPT-2, LLaMA/Qwen-style, ...), a masked LM or a sequence-classification model with
dict batches (``input_ids``, optional ``attention_mask``, optional ``labels``; every
other key is passed to the model's ``forward`` as it is).

**Loss.** One example is one sequence (``sample_unit = "sequence"``); its loss is
the *sum* of its target tokens' cross-entropies,

.. math::

    \ell_n = \sum_{t \in \mathcal T_n} -\log \mathrm{softmax}(z_{n,t})_{y_{n,t}},

and the total loss is :math:`L = c \sum_n \ell_n` with :math:`c = 1/\sum_n |\mathcal T_n|`
(``normalization="token"``, the default: the mean over all target tokens of the whole
data set, not of a batch), :math:`c = 1/N` (``"sequence"``) or :math:`c = 1` (``"sum"``).

**Targets.** Causal LMs: the logits at position ``t`` predict the label at ``t + 1``
(labels default to ``input_ids``). Target ``t + 1`` of a sequence is kept when its
label is not ``-100`` and both positions ``t`` and ``t + 1`` are real tokens
(``attention_mask == 1``), so right *and* left padding are removed and a padded
sequence contributes exactly what it contributes unpadded. For left-padded batches
without explicit ``position_ids``, positions are counted from each sequence's first
real token (``cumsum(mask) - 1``), as generation does. Masked LMs: no shift; labels
are required (``-100`` on unmasked positions). Sequence classification: one label per
sequence, ``labels`` of shape ``(N,)`` (regression and multi-label models use
squared error / BCE-with-logits rows instead of cross-entropy).

**Limits of the model.** Objectives made by :func:`hf_objective` know the model's
vocabulary size, its number of positions (``n_positions`` / ``max_position_embeddings``)
and its ``pad_token_id``. Token ids outside the vocabulary and sequences longer than the
positions are refused with a ``ValueError`` when the data is counted, before any forward
pass. A batch without ``attention_mask`` whose ``input_ids`` hold the pad token counts the
pad tokens as real tokens: a ``UserWarning`` says so once per objective (a ``ValueError``
with ``strict_padding=True``).

**Attention kernels.** Fused SDPA kernels (flash, memory-efficient, CPU flash)
support neither double backward nor forward-mode AD. Every product runs under
:meth:`LanguageModelObjective.product_context`, which selects SDPA's math backend and
temporarily routes other fused implementations (flex, flash-attention) through SDPA,
so models built with the default ``attn_implementation="sdpa"`` work unchanged.
The model and its parameters are never rebuilt or converted.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .checks import check_int
from .losses import LossKind
from .objective import Count, Objective, Rows, call_with_inputs

__all__ = [
    "LanguageModelObjective",
    "attention_product_context",
    "hf_objective",
    "is_hf_model",
    "model_limits",
]

TASKS = ("causal_lm", "masked_lm", "sequence_classification")
NORMALIZATIONS = ("token", "sequence", "sum")
IGNORE_INDEX = -100
# Attention implementations whose kernels support double backward and jvp (sdpa under the
# math backend). Anything else is routed through sdpa while a product runs.
_DIFFERENTIABLE_ATTENTION = ("eager", "sdpa")


def _require_transformers() -> Any:
    try:
        import transformers  # optional: the hf extra
    except ImportError as err:  # pragma: no cover - transformers is installed in the test env
        raise ImportError(
            "curvops.linops.hf needs transformers: pip install 'curvops[hf]'"
        ) from err
    return transformers


def is_hf_model(model: Any) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (without importing transformers)."""
    return any(
        cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers")
        for cls in type(model).__mro__
    )


# --- attention kernels --------------------------------------------------------------------
def _configs(model: nn.Module) -> list[Any]:
    """Every distinct transformers config reachable from the model's modules."""
    seen: dict[int, Any] = {}
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


@contextlib.contextmanager
def attention_product_context(model: nn.Module) -> Iterator[None]:
    """Run attention with kernels that support double backward and forward-mode AD.

    SDPA is restricted to its math backend (``torch.nn.attention.sdpa_kernel``); configs
    whose ``_attn_implementation`` is neither ``"eager"`` nor ``"sdpa"`` (flex attention,
    flash-attention kernels) are switched to ``"sdpa"`` for the duration and restored on
    exit. Parameters are untouched.
    """
    switched: list[tuple[Any, Any]] = []
    try:
        for cfg in _configs(model):
            impl = cfg._attn_implementation
            if isinstance(impl, str) and impl not in _DIFFERENTIABLE_ATTENTION:
                switched.append((cfg, impl))
                cfg._attn_implementation_internal = "sdpa"
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        for cfg, impl in reversed(switched):
            cfg._attn_implementation_internal = impl


# --- the objective ------------------------------------------------------------------------
class LanguageModelObjective(Objective):
    r"""The token-summed cross-entropy of a HuggingFace model on dict batches.

    Args:
        task: ``"causal_lm"``, ``"masked_lm"`` or ``"sequence_classification"``.
        normalization: ``"token"`` (default; :math:`c = 1/` number of target tokens in
            the whole data), ``"sequence"`` (:math:`c = 1/N`) or ``"sum"`` (:math:`c = 1`).
            For sequence classification each sequence has one target, so ``"token"`` and
            ``"sequence"`` coincide (for multi-output regression / multi-label, ``"token"``
            divides by the number of output entries, like torch's ``mean``).
        problem_type: Sequence classification only: ``"single_label_classification"``
            (cross-entropy, default), ``"regression"`` (squared error on float labels) or
            ``"multi_label_classification"`` (BCE with logits on float labels).
        vocab_size: Token ids must lie in ``[0, vocab_size)``; None skips the check.
        max_positions: Sequences may have at most this many tokens (and ``position_ids``
            must stay below it); None skips the check.
        pad_token_id: The pad token, for the padding-without-mask check; None skips it.
        strict_padding: Refuse (``ValueError``) instead of warning once when a batch
            without ``attention_mask`` holds pad tokens that would count as targets.

    :func:`hf_objective` fills ``vocab_size``, ``max_positions`` and ``pad_token_id`` from
    the model. The first two are checked when the data is counted (at construction of an
    operator, before any forward pass).

    Attributes:
        kind: The row loss (cross-entropy for language models).
        sample_unit: ``"sequence"``.
    """

    sample_unit = "sequence"

    def __init__(
        self,
        task: str = "causal_lm",
        normalization: str = "token",
        *,
        problem_type: str | None = None,
        vocab_size: int | None = None,
        max_positions: int | None = None,
        pad_token_id: int | None = None,
        strict_padding: bool = False,
    ) -> None:
        self.vocab_size = check_int("vocab_size", vocab_size, minimum=1, allow_none=True)
        self.max_positions = check_int("max_positions", max_positions, minimum=1, allow_none=True)
        self.pad_token_id = check_int("pad_token_id", pad_token_id, allow_none=True)
        if not isinstance(strict_padding, bool):
            raise TypeError(f"strict_padding must be a bool, got {strict_padding!r}")
        self.strict_padding = strict_padding
        self._warned_padding = False
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {NORMALIZATIONS} for language models, "
                f"got {normalization!r}"
            )
        self.task = task
        self.normalization = normalization
        if task != "sequence_classification":
            if problem_type is not None:
                raise ValueError("problem_type applies to sequence classification only")
            self.problem_type = None
            self.kind = LossKind("cross_entropy")
        else:
            problem_type = problem_type or "single_label_classification"
            kinds = {
                "single_label_classification": "cross_entropy",
                "regression": "mse",
                "multi_label_classification": "bce",
            }
            if problem_type not in kinds:
                raise ValueError(
                    f"problem_type must be one of {tuple(kinds)}, got {problem_type!r}"
                )
            self.problem_type = problem_type
            self.kind = LossKind(kinds[problem_type])

    def __repr__(self) -> str:
        extra = f", problem_type={self.problem_type!r}" if self.problem_type else ""
        return (
            f"LanguageModelObjective(task={self.task!r}, "
            f"normalization={self.normalization!r}{extra})"
        )

    # --- validation -----------------------------------------------------------------------
    def _validate(self, batch: Any) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Check a dict batch; return ``input_ids``, ``attention_mask``, ``labels``."""
        if not isinstance(batch, Mapping):
            raise TypeError(
                "a language-model batch must be a dict with 'input_ids', got "
                f"{type(batch).__name__}"
            )
        if "input_ids" not in batch:
            raise ValueError(
                f"the batch has no 'input_ids' (keys: {sorted(batch)}); curvops needs token ids "
                "to place the targets (inputs_embeds-only batches are not supported)"
            )
        ids = batch["input_ids"]
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.is_floating_point():
            raise ValueError(
                "'input_ids' must be an integer tensor of shape (batch, seq_len), got "
                f"{type(ids).__name__} {tuple(getattr(ids, 'shape', ()))}"
            )
        if ids.numel() == 0:
            raise ValueError(f"the batch is empty: input_ids has shape {tuple(ids.shape)}")
        mask = batch.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.shape != ids.shape:
                raise ValueError(
                    f"'attention_mask' must have the shape of input_ids {tuple(ids.shape)}, got "
                    f"{tuple(getattr(mask, 'shape', ()))}"
                )
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("'attention_mask' must contain only 0 and 1")
        labels = batch.get("labels")
        if labels is not None:
            if not isinstance(labels, Tensor):
                raise TypeError(f"'labels' must be a tensor, got {type(labels).__name__}")
            if self.task == "sequence_classification":
                ok_shape = labels.dim() >= 1 and labels.shape[0] == ids.shape[0]
                if self.kind.name == "cross_entropy":
                    ok_shape = ok_shape and labels.dim() == 1
                if not ok_shape:
                    raise ValueError(
                        f"sequence-classification labels must have shape ({ids.shape[0]},) "
                        f"(one per sequence), got {tuple(labels.shape)}"
                    )
                if self.kind.name == "cross_entropy" and labels.is_floating_point():
                    raise ValueError("single-label classification needs integer class labels")
                if self.kind.name != "cross_entropy" and not labels.is_floating_point():
                    raise ValueError(f"{self.problem_type} needs floating-point labels")
            elif labels.shape != ids.shape:
                raise ValueError(
                    f"'labels' must have the shape of input_ids {tuple(ids.shape)}, got "
                    f"{tuple(labels.shape)}"
                )
            elif labels.is_floating_point():
                raise ValueError("language-model labels must be integer token ids (or -100)")
        elif self.task != "causal_lm":
            raise ValueError(f"a {self.task} batch needs 'labels' (-100 marks positions to ignore)")
        return ids, mask, labels

    def targets(self, batch: Any) -> Tensor:
        """Each prediction position's target, ``-100`` where none.

        Returns:
            Causal LM: ``(N, T - 1)``, the targets of logits ``[:, :-1]``; masked LM
            ``(N, T)``; sequence classification the labels ``(N,)`` (``(N, C)`` for
            regression / multi-label).
        """
        ids, mask, labels = self._validate(batch)
        if self.task == "sequence_classification":
            return labels  # type: ignore[return-value]
        y = (ids if labels is None else labels).clone()
        if self.task == "causal_lm":
            y = y[:, 1:]
            if mask is not None:
                # Both the predicting position and the predicted one must be real tokens.
                real = (mask[:, :-1] == 1) & (mask[:, 1:] == 1)
                y = y.masked_fill(~real, IGNORE_INDEX)
        elif mask is not None:
            y = y.masked_fill(mask == 0, IGNORE_INDEX)
        return y

    def _limit_problem(
        self, batch: Mapping[str, Any], vocab_size: int | None, max_positions: int | None
    ) -> str | None:
        """What in ``batch`` lies beyond the model's vocabulary or positions, or None."""
        ids = batch["input_ids"]
        where = f"a batch with input_ids of shape {tuple(ids.shape)}"
        if vocab_size is not None:
            outside = (ids < 0) | (ids >= vocab_size)
            if bool(outside.any()):
                i, t = (int(x) for x in outside.nonzero()[0])
                return (
                    f"{where}: input_ids[{i}, {t}] = {int(ids[i, t])} lies outside the "
                    f"vocabulary [0, {vocab_size}) of the model (config.vocab_size); largest "
                    f"id {int(ids.max())}, smallest {int(ids.min())}"
                )
        if max_positions is not None:
            length = int(ids.shape[1])
            if length > max_positions:
                return (
                    f"{where}: sequences of {length} tokens are longer than the model's "
                    f"{max_positions} positions (config.n_positions / "
                    "max_position_embeddings); cut or split the sequences"
                )
            pos = batch.get("position_ids")
            if isinstance(pos, Tensor) and pos.numel() and int(pos.max()) >= max_positions:
                return (
                    f"{where}: position_ids reach {int(pos.max())}, beyond the model's "
                    f"{max_positions} positions (config.n_positions / max_position_embeddings)"
                )
        return None

    def _check_padding(self, batch: Mapping[str, Any], labels: Tensor | None) -> None:
        """Warn once (or refuse) when pad tokens of a mask-less batch count as real tokens."""
        if self.pad_token_id is None or batch.get("attention_mask") is not None:
            return
        if self._warned_padding and not self.strict_padding:
            return
        pads = batch["input_ids"] == self.pad_token_id
        if labels is not None and self.task != "sequence_classification":
            pads = pads & (labels != IGNORE_INDEX)  # -100 labels already remove them
        count = int(pads.sum())
        if not count:
            return
        fix = ("pass attention_mask (0 at padding)" if self.task == "sequence_classification"
               else "pass attention_mask (0 at padding) or set labels to -100 at pad positions")
        message = (
            f"input_ids hold {count} pad tokens (pad_token_id={self.pad_token_id}) in a batch "
            f"without attention_mask: they count as real tokens (attended to and used as "
            f"targets), which changes the loss and its curvature; {fix}"
        )
        if self.strict_padding:
            raise ValueError(message)
        self._warned_padding = True
        warnings.warn(
            message + " (shown once; strict_padding=True refuses such batches)",
            UserWarning, stacklevel=3,
        )

    # --- Objective interface --------------------------------------------------------------
    def count(self, batch: Any) -> Count:
        """Sequences and target tokens (loss terms) of ``batch``.

        Also checks the token ids and lengths against the model's limits and the padding
        (the operators count every batch before their first product).

        Raises:
            ValueError: For token ids outside the vocabulary, sequences longer than the
                model's positions, and (``strict_padding``) pad tokens without a mask.
        """
        y = self.targets(batch)
        problem = self._limit_problem(batch, self.vocab_size, self.max_positions)
        if problem is not None:
            raise ValueError(problem)
        self._check_padding(batch, batch.get("labels"))
        n = int(batch["input_ids"].shape[0])
        if self.task == "sequence_classification" and self.kind.name != "cross_entropy":
            return Count(n, int(y.numel()))
        return Count(n, int((y != IGNORE_INDEX).sum()))

    def normalizer(self, total: Count) -> float:
        """``1/terms`` (token), ``1/examples`` (sequence) or ``1`` (sum)."""
        if self.normalization == "sum":
            return 1.0
        if self.normalization == "sequence":
            return 1.0 / total.examples
        return 1.0 / total.terms

    def split(self, batch: Any, size: int) -> list[Any]:
        """Slice every tensor of leading dimension ``N`` into chunks of ``size`` sequences."""
        size = check_int("micro-batch size", size, minimum=1)
        ids, _, _ = self._validate(batch)
        n = int(ids.shape[0])

        def part(start: int) -> dict[str, Any]:
            return {
                k: v[start : start + size]
                if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n
                else v
                for k, v in batch.items()
            }

        return [part(i) for i in range(0, n, size)]

    def model_inputs(self, model: nn.Module, batch: Any) -> dict[str, Any]:
        """The keyword arguments of ``model.forward``: the batch without ``labels``.

        Labels are left out (the loss is computed here, not by the model). Left-padded
        causal-LM batches get ``position_ids = cumsum(mask) - 1`` when the model accepts
        them and the batch has none.
        """
        kwargs = {k: v for k, v in batch.items() if k != "labels"}
        mask = batch.get("attention_mask")
        if (
            self.task == "causal_lm"
            and mask is not None
            and "position_ids" not in kwargs
            and bool((mask[:, 0] == 0).any())
            and _accepts(model, "position_ids")
        ):
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
        return kwargs

    def rows(self, model: nn.Module, params: dict[str, Tensor], batch: Any) -> Rows:
        """Forward the batch; the rows are the kept target positions' logits."""
        y = self.targets(batch)
        n = int(batch["input_ids"].shape[0])
        try:
            out = call_with_inputs(model, params, self.model_inputs(model, batch))
        except (IndexError, RuntimeError) as err:
            # An objective not made from this model has no limits: explain torch's index
            # error from the model's own config when it is the cause.
            problem = self._limit_problem(batch, *model_limits(model)[:2])
            if problem is not None:
                raise ValueError(problem) from err
            raise
        logits = out["logits"] if isinstance(out, Mapping) else getattr(out, "logits", out)
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        if not isinstance(logits, Tensor):
            raise TypeError(f"the model returned no logits tensor ({type(out).__name__})")
        device = logits.device
        if self.task == "sequence_classification":
            if logits.dim() != 2 or logits.shape[0] != n:
                raise ValueError(f"expected logits (N, C), got {tuple(logits.shape)}")
            if self.kind.name != "cross_entropy":
                Y = y.reshape(n, -1)
                if Y.shape != logits.shape:
                    raise ValueError(
                        f"labels {tuple(y.shape)} do not match logits {tuple(logits.shape)}"
                    )
                if Y.dtype != logits.dtype:
                    raise TypeError(
                        f"labels have dtype {Y.dtype} but the model outputs {logits.dtype}; "
                        "convert the labels explicitly (no silent cast)"
                    )
                return Rows(logits, Y, torch.arange(n, device=device), n)
            F_, Y = logits, y
            ex = torch.arange(n, device=device)
        else:
            if logits.dim() != 3 or logits.shape[:2] != batch["input_ids"].shape:
                raise ValueError(
                    f"expected logits (N, T, V) matching input_ids, got {tuple(logits.shape)}"
                )
            if self.task == "causal_lm":
                logits = logits[:, :-1]
            V = logits.shape[-1]
            F_ = logits.reshape(-1, V)
            Y = y.reshape(-1).to(device)
            ex = torch.arange(n, device=device).repeat_interleave(y.shape[1])
        keep = Y != IGNORE_INDEX
        if not bool(keep.all()):
            idx = keep.nonzero().squeeze(1)
            F_, Y, ex = F_.index_select(0, idx), Y[idx], ex[idx]
        C = F_.shape[-1]
        if Y.numel() and (int(Y.min()) < 0 or int(Y.max()) >= C):
            raise ValueError(f"target ids must lie in [0, {C}) or be -100")
        return Rows(F_, Y, ex, n)

    def product_context(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """The attention-kernel context of :func:`attention_product_context`."""
        return attention_product_context(model)


def _accepts(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` has a parameter called ``name``."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


# --- choosing the objective from the model -------------------------------------------------
def _task_of(model: nn.Module) -> str:
    transformers = _require_transformers()
    auto = transformers.models.auto.modeling_auto
    names = {cls.__name__ for cls in type(model).__mro__}

    def in_mapping(mapping_name: str) -> bool:
        mapping = getattr(auto, mapping_name, {})
        values = set()
        for v in mapping.values():
            values.update(v if isinstance(v, (tuple, list)) else (v,))
        return bool(names & values)

    if in_mapping("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES") or any(
        n.endswith(("ForCausalLM", "LMHeadModel")) for n in names
    ):
        return "causal_lm"
    if in_mapping("MODEL_FOR_MASKED_LM_MAPPING_NAMES") or any(
        n.endswith("ForMaskedLM") for n in names
    ):
        return "masked_lm"
    if in_mapping("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES") or any(
        n.endswith("ForSequenceClassification") for n in names
    ):
        return "sequence_classification"
    raise TypeError(
        f"cannot tell the task of {type(model).__name__}: curvops supports causal LMs, masked "
        "LMs and sequence classification; pass LanguageModelObjective(task=...) as loss_fn"
    )


def model_limits(model: nn.Module) -> tuple[int | None, int | None, int | None]:
    """``(vocabulary size, number of positions, pad token id)`` of a transformers model.

    The vocabulary is the input embedding's number of rows (``config.vocab_size`` if the
    model has no ``get_input_embeddings``); positions are ``config.n_positions`` or
    ``config.max_position_embeddings``. Each is None where the model does not say.
    """
    cfg = getattr(model, "config", None)
    vocab = None
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if callable(get_embeddings):
        with contextlib.suppress(Exception):  # models without input embeddings raise
            vocab = getattr(get_embeddings(), "num_embeddings", None)
    if vocab is None:
        vocab = getattr(cfg, "vocab_size", None)
    positions = None
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            positions = value
            break
    pad = getattr(cfg, "pad_token_id", None)
    return (
        vocab if isinstance(vocab, int) else None,
        positions,
        pad if isinstance(pad, int) and not isinstance(pad, bool) else None,
    )


def hf_objective(
    model: nn.Module, normalization: str = "token", *, strict_padding: bool = False
) -> LanguageModelObjective:
    """The :class:`LanguageModelObjective` for a transformers model, from its class.

    The objective knows the model's vocabulary size, positions and pad token
    (:func:`model_limits`), so token ids and lengths are checked when the data is counted.

    Args:
        model: A transformers causal LM (``*ForCausalLM``, ``*LMHeadModel``), masked LM
            (``*ForMaskedLM``) or sequence classifier (``*ForSequenceClassification``).
        normalization: ``"token"`` (default), ``"sequence"`` or ``"sum"``.
        strict_padding: Refuse batches without ``attention_mask`` that hold pad tokens
            (default: warn once).

    Raises:
        TypeError: For a model of another kind.
    """
    task = _task_of(model)
    problem_type = None
    if task == "sequence_classification":
        cfg = getattr(model, "config", None)
        problem_type = getattr(cfg, "problem_type", None)
        if problem_type is None and getattr(cfg, "num_labels", 2) == 1:
            problem_type = "regression"
    vocab_size, max_positions, pad_token_id = model_limits(model)
    return LanguageModelObjective(
        task, normalization, problem_type=problem_type, vocab_size=vocab_size,
        max_positions=max_positions, pad_token_id=pad_token_id, strict_padding=strict_padding,
    )
