r"""The validation model zoo: models built from code or configs, with deterministic data.

Nothing is ever downloaded. Every model is built from a seeded random initialisation
(the global torch RNG is forked and restored, so building a model changes no caller
state), and every data set is drawn from an explicit ``torch.Generator``:

* supervised models (``mlp``, ``cnn``) get classification data ``(inputs, class)``,
  the classes from a fixed random teacher so the loss is not flat;
* ``mlp-fp32-norm`` is the MLP with a LayerNorm that computes in float32 whatever the
  model's dtype (as LLaMA's RMSNorm does): a float64 model whose products are only
  float32-accurate;
* ``noisy-spectrum`` is no network: a symmetric matrix with a known spectrum whose
  products carry fresh relative noise ``delta`` (operators ``noise-1e-07``,
  ``noise-1e-05``, ``noise-1e-03``), the model of an operator less exact than its dtype;
* HuggingFace models (``gpt2-*``, ``llama-tiny``, ``bert-cls``) get dict batches of
  token sequences of varying length, right-padded: ``input_ids``, ``attention_mask`` and
  ``labels`` (``-100`` on the padding; one class per sequence for ``bert-cls``).

The HuggingFace models take the path users take: built from a config with the default
attention implementation (``sdpa``; every curvops product selects a kernel that supports
double backward and forward-mode AD by itself), used as they are (no wrapper), with
``loss_fn = hf_objective(model, normalization="token")``
(:mod:`curvops.linops.hf`): :math:`L = \frac{1}{\#\text{target tokens}} \sum_n
\ell_n`, one example = one sequence, the causal shift applied by the objective.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from curvops.linops.checks import check_int
from curvops.linops.hf import hf_objective
from curvops.linops.registry import SHORT_NAMES, make_operator
from torch import Tensor, nn

IGNORE_INDEX = -100  # the label HuggingFace and torch's cross-entropy ignore

__all__ = [
    "NOISE_LEVELS",
    "OPERATORS",
    "ZOO",
    "SYNTHETIC",
    "NoisyOperator",
    "SpectrumProblem",
    "ZooEntry",
    "ZooProblem",
    "build",
    "build_problem",
    "classification_data",
    "make_operator",
    "token_data",
    "zoo_names",
]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with the global torch RNG seeded, restoring the caller's RNG state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --- data -----------------------------------------------------------------------------------
def classification_data(
    num_examples: int,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    batch_size: int | None = None,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> list[tuple[Tensor, Tensor]]:
    """Gaussian inputs with labels from a random linear teacher plus noise.

    Args:
        num_examples: N.
        input_shape: Shape of one input, e.g. ``(8,)`` or ``(1, 6, 6)``.
        num_classes: C.
        batch_size: Examples per batch (default: one batch).
        dtype: Input dtype (the model's).
        seed: Seed of the generator.

    Returns:
        A list of ``(X, y)`` batches, ``X`` of shape ``(b, *input_shape)``, ``y`` int64.
    """
    check_int("num_examples", num_examples, minimum=1)
    check_int("num_classes", num_classes, minimum=2)
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(num_examples, *input_shape, generator=gen, dtype=torch.float64)
    teacher = torch.randn(X[0].numel(), num_classes, generator=gen, dtype=torch.float64)
    noise = torch.randn(num_examples, num_classes, generator=gen, dtype=torch.float64)
    y = (X.reshape(num_examples, -1) @ teacher + noise).argmax(dim=1)
    X = X.to(dtype)
    size = num_examples if batch_size is None else batch_size
    return [(X[i : i + size], y[i : i + size]) for i in range(0, num_examples, size)]


def token_data(
    num_sequences: int,
    seq_len: int,
    vocab_size: int,
    *,
    batch_size: int | None = None,
    min_len: int | None = None,
    seed: int = 0,
) -> list[dict[str, Tensor]]:
    """Random token sequences of varying length, right-padded, as HuggingFace dict batches.

    Sequence ``i`` has a length drawn uniformly from ``[min_len, seq_len]`` (the first one
    is full length, so no column is all padding); the padding has token 0,
    ``attention_mask`` 0 and label ``-100``. ``labels`` are the token ids themselves,
    unshifted, as HuggingFace causal LMs take them: the objective applies the shift.

    Args:
        num_sequences: N.
        seq_len: T, the padded length.
        vocab_size: Token ids are drawn from ``[1, vocab_size)`` (0 is the padding).
        batch_size: Sequences per batch (default: one batch).
        min_len: Shortest sequence (default ``max(2, T // 2)``).
        seed: Seed of the generator.

    Returns:
        A list of ``{"input_ids", "attention_mask", "labels"}`` batches, each ``(b, T)``.

    Raises:
        ValueError: ``seq_len < 2``, ``min_len`` outside ``[2, seq_len]``, ``vocab_size < 2``
            or ``num_sequences < 1``.
    """
    check_int("seq_len", seq_len, minimum=2)
    check_int("vocab_size", vocab_size, minimum=2)
    check_int("num_sequences", num_sequences, minimum=1)
    lo = max(2, seq_len // 2) if min_len is None else min_len
    check_int("min_len", lo, minimum=2, maximum=seq_len)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size, (num_sequences, seq_len), generator=gen)
    lengths = torch.randint(lo, seq_len + 1, (num_sequences,), generator=gen)
    lengths[0] = seq_len  # at least one full-length sequence: no all-padding column
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    size = num_sequences if batch_size is None else batch_size
    return [
        {"input_ids": ids[i : i + size], "attention_mask": mask[i : i + size],
         "labels": labels[i : i + size]}
        for i in range(0, num_sequences, size)
    ]


# --- models ---------------------------------------------------------------------------------
class _SmallCNN(nn.Module):
    """Conv(1→3, 3x3) → tanh → avg-pool 2 → linear to C classes, for ``(1, 6, 6)`` inputs."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(3 * 2 * 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, C)``."""
        return self.fc(self.pool(torch.tanh(self.conv(x))).flatten(1))


class _Float32LayerNorm(nn.Module):
    """LayerNorm computed in float32 whatever the input's dtype, cast back (LLaMA's RMSNorm
    does the same): inside a float64 model it makes every product float32-accurate."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(features)

    def forward(self, x: Tensor) -> Tensor:
        """``layer_norm(x)`` evaluated in float32, returned in ``x.dtype``."""
        w, b = self.norm.weight.float(), self.norm.bias.float()
        return F.layer_norm(x.float(), self.norm.normalized_shape, w, b).to(x.dtype)


class NoisyOperator:
    r"""A symmetric matrix whose products carry fresh relative noise.

    :math:`\tilde A v = A v + \delta \|A v\| g / \sqrt{n}` with a new standard normal
    :math:`g` per product (per column of a block), drawn from a seeded generator: the
    model of a product accurate to :math:`\delta` relative, and not repeatable.

    Attributes:
        matrix: The exact matrix (float64).
        relative_accuracy: :math:`\delta`.
        name: ``noise-<delta>``.
    """

    def __init__(self, matrix: Tensor, delta: float, seed: int) -> None:
        self.matrix = matrix
        self.relative_accuracy = float(delta)
        self.name = noise_operator_name(delta)
        self.shape = tuple(matrix.shape)
        self.dtype = matrix.dtype
        self.device = matrix.device
        self._gen = torch.Generator().manual_seed(seed)

    def matmat(self, V: Tensor) -> Tensor:
        """``A V`` plus the noise, column by column."""
        Y = self.matrix @ V
        G = torch.randn(Y.shape, generator=self._gen, dtype=Y.dtype)
        scale = self.relative_accuracy * torch.linalg.vector_norm(Y, dim=0) / Y.shape[0] ** 0.5
        return Y + G * scale

    def matvec(self, v: Tensor) -> Tensor:
        """``A v`` plus the noise."""
        return self.matmat(v.reshape(-1, 1)).reshape(-1)


NOISE_LEVELS = (1e-7, 1e-5, 1e-3)


def noise_operator_name(delta: float) -> str:
    """The operator name of noise level ``delta`` (``noise-1e-05``)."""
    return f"noise-{delta:.0e}"


@dataclass
class SpectrumProblem:
    """A symmetric matrix with a known spectrum, offered with noisy products.

    Attributes:
        name: Zoo name.
        matrix: The exact matrix (float64).
        eigenvalues: Its spectrum, descending (the reference).
        dtype: float64.
        num_params: The size n.
        kind: ``"synthetic"``.
        seed: Seed of the product noise.
    """

    name: str
    matrix: Tensor
    eigenvalues: np.ndarray
    dtype: torch.dtype
    num_params: int
    kind: str
    seed: int

    def operator(self, operator: str) -> NoisyOperator:
        """The matrix with products of the noise level ``operator`` names (``noise-1e-05``).

        Raises:
            ValueError: For a name that is not ``noise-<delta>`` of :data:`NOISE_LEVELS`.
        """
        for delta in NOISE_LEVELS:
            if operator == noise_operator_name(delta):
                return NoisyOperator(self.matrix, delta, self.seed)
        names = ", ".join(noise_operator_name(d) for d in NOISE_LEVELS)
        raise ValueError(f"unknown operator {operator!r} of {self.name}; choose from {names}")


# --- the zoo --------------------------------------------------------------------------------
@dataclass
class ZooProblem:
    """A built model with its loss and data, ready for an operator.

    Attributes:
        name: Zoo name.
        model: The network, in eval mode (a transformers model for the HF entries).
        loss_fn: A torch loss module, or for HF models the curvops objective
            ``hf_objective(model, normalization="token")``.
        data: A list of batches (``(X, y)`` pairs, or HF dicts).
        dtype: The parameters' dtype.
        num_params: Number of trainable parameters.
        kind: ``"classification"`` or ``"language-model"``.
    """

    name: str
    model: nn.Module
    loss_fn: Any
    data: list[Any]
    dtype: torch.dtype
    num_params: int
    kind: str

    def operator(self, operator: str, **kwargs: Any) -> Any:
        """The curvature operator named ``operator`` on this problem (see :data:`OPERATORS`)."""
        return make_operator(operator, self.model, self.loss_fn, self.data, **kwargs)

    def to(self, dtype: torch.dtype) -> ZooProblem:
        """The same weights and data in ``dtype`` (rounded once; integer tensors unchanged)."""
        def cast(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return x.to(dtype) if x.is_floating_point() else x
            if isinstance(x, (tuple, list)):
                return type(x)(cast(t) for t in x)
            if isinstance(x, dict):
                return {key: cast(v) for key, v in x.items()}
            return x

        model = copy.deepcopy(self.model).to(dtype).eval()
        return replace(self, model=model, data=cast(self.data), dtype=dtype)

    def first_batch(self) -> Any:
        """The first batch (the Gram trick works on one batch)."""
        return self.data[0]


@dataclass(frozen=True)
class ZooEntry:
    """How to build one zoo model.

    Attributes:
        name: Its name on the command line.
        description: One line for reports.
        approx_params: Parameter count (exact for the fixed configs; printed in listings).
        factory: ``factory(dtype, seed) -> ZooProblem`` (a :class:`SpectrumProblem` for
            the synthetic entry).
        needs_hf: Whether it needs ``transformers`` (the ``hf`` extra).
        dense_ok: Whether its dense matrix is small enough to be the reference.
    """

    name: str
    description: str
    approx_params: int
    factory: Callable[[torch.dtype, int], ZooProblem] = field(repr=False)
    needs_hf: bool = False
    dense_ok: bool = False


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _build_mlp(dtype: torch.dtype, seed: int) -> ZooProblem:
    with seeded(seed):
        model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 8), nn.Tanh(),
                              nn.Linear(8, 3))
    model = model.to(dtype).eval()
    data = classification_data(32, (6,), 3, batch_size=16, dtype=dtype, seed=seed + 1)
    return ZooProblem("mlp", model, nn.CrossEntropyLoss(), data, dtype, _count(model),
                      "classification")


def _build_cnn(dtype: torch.dtype, seed: int) -> ZooProblem:
    with seeded(seed):
        model = _SmallCNN(4)
    model = model.to(dtype).eval()
    data = classification_data(24, (1, 6, 6), 4, batch_size=12, dtype=dtype, seed=seed + 1)
    return ZooProblem("cnn", model, nn.CrossEntropyLoss(), data, dtype, _count(model),
                      "classification")


def _build_mlp_fp32_norm(dtype: torch.dtype, seed: int) -> ZooProblem:
    with seeded(seed):
        model = nn.Sequential(nn.Linear(6, 10), _Float32LayerNorm(10), nn.Tanh(),
                              nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3))
    model = model.to(dtype).eval()
    data = classification_data(32, (6,), 3, batch_size=16, dtype=dtype, seed=seed + 1)
    return ZooProblem("mlp-fp32-norm", model, nn.CrossEntropyLoss(), data, dtype,
                      _count(model), "classification")


def _build_noisy_spectrum(dtype: torch.dtype, seed: int) -> SpectrumProblem:
    # Ten well separated top values above a decaying bulk: n = 2000, ||A|| = 1.
    if dtype != torch.float64:
        raise ValueError("noisy-spectrum is a float64 matrix (its noise is the inexactness)")
    n = 2000
    rng = np.random.default_rng(seed)
    lam = np.concatenate([np.linspace(1.0, 0.5, 10), 0.4 * rng.uniform(size=n - 10) ** 3])
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    matrix = torch.from_numpy((Q * lam) @ Q.T)
    matrix = (matrix + matrix.T) / 2
    return SpectrumProblem("noisy-spectrum", matrix, np.sort(lam)[::-1].copy(), dtype, n,
                           "synthetic", seed + 1)


def _require_transformers() -> Any:
    try:
        import transformers  # optional: the hf extra
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "this zoo model needs transformers: pip install 'curvops[hf]'"
        ) from err
    return transformers


def _hf_problem(name: str, model: nn.Module, data: list[Any], dtype: torch.dtype,
                kind: str) -> ZooProblem:
    """A transformers model as users hold it, with the project's HF objective as its loss."""
    model = model.to(dtype).eval()
    return ZooProblem(name, model, hf_objective(model, normalization="token"), data, dtype,
                      _count(model), kind)


def _gpt2_factory(
    name: str, *, n_embd: int, n_layer: int, n_head: int, vocab: int, seq_len: int,
    num_sequences: int, batch_size: int,
) -> Callable[[torch.dtype, int], ZooProblem]:
    def build_gpt2(dtype: torch.dtype, seed: int) -> ZooProblem:
        tf = _require_transformers()
        config = tf.GPT2Config(
            vocab_size=vocab, n_positions=seq_len, n_embd=n_embd, n_layer=n_layer,
            n_head=n_head, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        with seeded(seed):
            lm = tf.GPT2LMHeadModel(config)
        data = token_data(num_sequences, seq_len, vocab, batch_size=batch_size, seed=seed + 1)
        return _hf_problem(name, lm, data, dtype, "language-model")

    return build_gpt2


def _build_llama_tiny(dtype: torch.dtype, seed: int) -> ZooProblem:
    # LlamaRMSNorm computes in float32 even in a float64 model: a float64 LLaMA is only a
    # float32-accurate function (~5e-8), so this model belongs on the float32 rung.
    tf = _require_transformers()
    config = tf.LlamaConfig(
        vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    with seeded(seed):
        lm = tf.LlamaForCausalLM(config)
    data = token_data(6, 8, 16, batch_size=3, seed=seed + 1)
    return _hf_problem("llama-tiny", lm, data, dtype, "language-model")


def _build_bert_cls(dtype: torch.dtype, seed: int) -> ZooProblem:
    tf = _require_transformers()
    config = tf.BertConfig(
        vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=16, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0,
        pad_token_id=0,
    )
    with seeded(seed):
        clf = tf.BertForSequenceClassification(config)
    gen = torch.Generator().manual_seed(seed + 1)
    batches = token_data(12, 8, 16, batch_size=6, seed=seed + 1)
    classes = torch.randint(0, 3, (12,), generator=gen)
    data = [{**{k: v for k, v in b.items() if k != "labels"}, "labels": classes[i * 6:(i + 1) * 6]}
            for i, b in enumerate(batches)]
    return _hf_problem("bert-cls", clf, data, dtype, "classification")


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry("mlp", "MLP 6-10-8-3 (tanh), 32 examples, cross-entropy", 185, _build_mlp,
                 dense_ok=True),
        ZooEntry("mlp-fp32-norm", "MLP 6-10-8-3 with a float32 LayerNorm (float32-accurate "
                 "products in a float64 model)", 205, _build_mlp_fp32_norm, dense_ok=True),
        ZooEntry("cnn", "CNN conv3x3(1→3)-tanh-pool-linear, 24 images 6x6, 4 classes", 82,
                 _build_cnn, dense_ok=True),
        ZooEntry("gpt2-tiny", "GPT-2 1 layer, d=8, vocab 16, 6 padded sequences of 8",
                 1_080, _gpt2_factory("gpt2-tiny", n_embd=8, n_layer=1, n_head=2, vocab=16,
                                    seq_len=8, num_sequences=6, batch_size=3),
                 needs_hf=True, dense_ok=True),
        ZooEntry("llama-tiny", "LLaMA 1 layer, d=8, GQA 2/1 heads, vocab 16", 856,
                 _build_llama_tiny, needs_hf=True, dense_ok=True),
        ZooEntry("bert-cls", "BERT 1 layer, d=8, sequence classification (3 classes)", 987,
                 _build_bert_cls, needs_hf=True, dense_ok=True),
        ZooEntry("gpt2-small", "GPT-2 2 layers, d=32, vocab 128 (eigsh-referenced)", 30_080,
                 _gpt2_factory("gpt2-small", n_embd=32, n_layer=2, n_head=2, vocab=128,
                               seq_len=16, num_sequences=8, batch_size=4),
                 needs_hf=True),
        ZooEntry("gpt2-1m", "GPT-2 4 layers, d=128, vocab 1024 (≈0.93 M)", 928_512,
                 _gpt2_factory("gpt2-1m", n_embd=128, n_layer=4, n_head=4, vocab=1024,
                               seq_len=32, num_sequences=8, batch_size=4),
                 needs_hf=True),
        ZooEntry("gpt2-10m", "GPT-2 10 layers, d=256, vocab 8192 (≈10 M)", 10_003_456,
                 _gpt2_factory("gpt2-10m", n_embd=256, n_layer=10, n_head=8, vocab=8192,
                               seq_len=32, num_sequences=4, batch_size=4),
                 needs_hf=True),
        ZooEntry("gpt2-124m", "GPT-2 small config: 12 layers, d=768, vocab 50257; 32 positions "
                 "(123.7 M; 124.4 M with GPT-2's 1024)", 123_677_952,
                 _gpt2_factory("gpt2-124m", n_embd=768, n_layer=12, n_head=12, vocab=50257,
                               seq_len=32, num_sequences=2, batch_size=2),
                 needs_hf=True),
    ]
}


# Problems that are no network: the ladder cross-checks them, the command line's
# ``spectrum`` (which needs a model) does not offer them.
SYNTHETIC: dict[str, Callable[[torch.dtype, int], SpectrumProblem]] = {
    "noisy-spectrum": _build_noisy_spectrum,
}


def build_problem(name: str, dtype: torch.dtype, seed: int = 0) -> ZooProblem | SpectrumProblem:
    """A zoo model (:func:`build`) or a synthetic problem of :data:`SYNTHETIC` by name.

    Raises:
        ValueError: For a name in neither.
    """
    if name in SYNTHETIC:
        return SYNTHETIC[name](dtype, seed)
    return build(name, dtype, seed)


def zoo_names() -> list[str]:
    """Names of the zoo's models, smallest first."""
    return list(ZOO)


def build(name: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> ZooProblem:
    """Build zoo model ``name`` in ``dtype`` with its data.

    Raises:
        ValueError: For an unknown name.
        TypeError: For a non-floating dtype.
    """
    if name not in ZOO:
        raise ValueError(f"unknown zoo model {name!r}; choose from {', '.join(ZOO)}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch dtype, got {dtype!r}")
    return ZOO[name].factory(dtype, seed)


# --- operators by name ----------------------------------------------------------------------
#: The operators the validation runs, by the short names of
#: :mod:`curvops.linops.registry` (which :func:`make_operator` resolves, aliases too).
OPERATORS = SHORT_NAMES
