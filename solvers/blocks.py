"""Block structure of a model's parameters by name: transformer layer and module type.

Blocks split the parameter vector into groups; a block-diagonal approximation keeps
only the within-block curvature. **The union of the block spectra is the spectrum of
that block-diagonal approximation, not the spectrum of the full matrix.**

* :func:`layer_block` finds the transformer layer a parameter belongs to, for the
  naming schemes of GPT-2 / Falcon (``transformer.h.3``), LLaMA / Qwen / Mistral / OPT /
  BART (``model.layers.3``, ``model.decoder.layers.3``), BERT / RoBERTa / ViT
  (``encoder.layer.3``), T5 (``encoder.block.3``, ``decoder.block.3``) and GPT-NeoX
  (``gpt_neox.layers.3``). The block is named by the name's prefix up to and including
  the index, so an encoder's layer 3 and a decoder's layer 3 stay apart.
* :func:`module_type` classifies a parameter as ``"attention"``, ``"mlp"``,
  ``"embedding"``, ``"norm"``, ``"head"`` or ``"other"``.

Parameters that match no rule go to the block named ``"other"``; none is dropped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = [
    "BLOCK_STRUCTURES",
    "OTHER",
    "assign_blocks",
    "layer_block",
    "layer_index",
    "module_type",
]

BLOCK_STRUCTURES = ("none", "layer", "module")
OTHER = "other"

# The leftmost "<container>.<index>" component: T5's "encoder.block.3.layer.0" is block 3
# (its "layer.0" is a sub-layer), BERT's "encoder.layer.3" is layer 3.
_LAYER = re.compile(r"^(.*?(?:^|\.)(?:layers?|h|blocks?)\.(\d+))(?:\.|$)")

# Checked in this order; the first family with a matching word wins. "norm" comes first
# because LLaMA's "post_attention_layernorm" and BERT's "attention.output.LayerNorm" are
# norms; "attention" comes before "mlp" because BERT's "attention.output.dense" is attention.
_TOKEN = r"(?:^|[._])"
_END = r"(?:$|[._\d])"
_MODULE_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("norm", re.compile(r"norm|" + _TOKEN + r"ln(?:_?f|_?\d+)?" + _END)),
    (
        "embedding",
        re.compile(r"embed|" + _TOKEN + r"(?:wte|wpe|shared)" + _END),
    ),
    (
        "head",
        re.compile(_TOKEN + r"(?:lm_head|head|classifier|cls|score|pooler|qa_outputs)" + _END),
    ),
    (
        "attention",
        re.compile(
            r"attn|attention|"
            + _TOKEN
            + r"(?:[qkvo]_proj|query|key|value|qkv|query_key_value|[qkvo])"
            + _END
        ),
    ),
    (
        "mlp",
        re.compile(
            r"mlp|feedforward|feed_forward|ffn|dense|intermediate|"
            + _TOKEN
            + r"(?:c_fc|fc|gate_proj|up_proj|down_proj|w[io]|w\d|experts?)"
            + _END
        ),
    ),
)


def layer_block(name: str) -> str | None:
    """The layer prefix of a parameter name (``"transformer.h.3"``), or ``None``."""
    m = _LAYER.match(name)
    return m.group(1) if m else None


def layer_index(name: str) -> int | None:
    """The layer index of a parameter name (``3`` for ``"model.layers.3.mlp.up_proj.weight"``)."""
    m = _LAYER.match(name)
    return int(m.group(2)) if m else None


def module_type(name: str) -> str:
    """``"attention"``, ``"mlp"``, ``"embedding"``, ``"norm"``, ``"head"`` or ``"other"``."""
    lowered = name.lower()
    for family, pattern in _MODULE_RULES:
        if pattern.search(lowered):
            return family
    return OTHER


def assign_blocks(names: Sequence[str], structure: str) -> dict[str, list[str]]:
    """Group parameter names into named blocks.

    Args:
        names: Parameter names, in flat order.
        structure: ``"none"`` (one block ``"all"``), ``"layer"`` (one block per
            transformer layer, named by its prefix, plus ``"other"`` for embeddings,
            final norms, heads and anything unmatched) or ``"module"`` (one block per
            module type).

    Returns:
        Block name -> the names in it, in flat order; blocks in order of first appearance
        (``"other"`` last). Every name is in exactly one block.

    Raises:
        ValueError: For an unknown ``structure``.
    """
    if structure not in BLOCK_STRUCTURES:
        raise ValueError(f"block_structure must be one of {BLOCK_STRUCTURES}, got {structure!r}")
    blocks: dict[str, list[str]] = {}
    other: list[str] = []
    for name in names:
        if structure == "none":
            key: str | None = "all"
        elif structure == "layer":
            key = layer_block(name)
        else:
            key = module_type(name)
            key = None if key == OTHER else key
        if key is None:
            other.append(name)
        else:
            blocks.setdefault(key, []).append(name)
    if other:
        blocks[OTHER] = other
    return blocks
