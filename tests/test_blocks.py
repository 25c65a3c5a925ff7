"""Block assignment by parameter name: layer index and module type for common HF models."""

from __future__ import annotations

import pytest
from curvops.solvers.blocks import assign_blocks, layer_block, layer_index, module_type


@pytest.mark.parametrize(
    ("name", "prefix", "index", "kind"),
    [
        # GPT-2
        ("transformer.h.3.attn.c_attn.weight", "transformer.h.3", 3, "attention"),
        ("transformer.h.3.attn.c_proj.bias", "transformer.h.3", 3, "attention"),
        ("transformer.h.11.mlp.c_fc.weight", "transformer.h.11", 11, "mlp"),
        ("transformer.h.0.mlp.c_proj.weight", "transformer.h.0", 0, "mlp"),
        ("transformer.h.2.ln_1.weight", "transformer.h.2", 2, "norm"),
        ("transformer.wte.weight", None, None, "embedding"),
        ("transformer.wpe.weight", None, None, "embedding"),
        ("transformer.ln_f.bias", None, None, "norm"),
        ("lm_head.weight", None, None, "head"),
        # LLaMA / Qwen / Mistral
        ("model.layers.3.self_attn.q_proj.weight", "model.layers.3", 3, "attention"),
        ("model.layers.3.self_attn.o_proj.weight", "model.layers.3", 3, "attention"),
        ("model.layers.17.mlp.gate_proj.weight", "model.layers.17", 17, "mlp"),
        ("model.layers.17.mlp.up_proj.weight", "model.layers.17", 17, "mlp"),
        ("model.layers.17.mlp.down_proj.weight", "model.layers.17", 17, "mlp"),
        ("model.layers.4.input_layernorm.weight", "model.layers.4", 4, "norm"),
        ("model.layers.4.post_attention_layernorm.weight", "model.layers.4", 4, "norm"),
        ("model.embed_tokens.weight", None, None, "embedding"),
        ("model.norm.weight", None, None, "norm"),
        # BERT
        (
            "bert.encoder.layer.5.attention.self.query.weight",
            "bert.encoder.layer.5",
            5,
            "attention",
        ),
        (
            "bert.encoder.layer.5.attention.output.dense.weight",
            "bert.encoder.layer.5",
            5,
            "attention",
        ),
        ("bert.encoder.layer.5.attention.output.LayerNorm.bias", "bert.encoder.layer.5", 5, "norm"),
        ("bert.encoder.layer.5.intermediate.dense.weight", "bert.encoder.layer.5", 5, "mlp"),
        ("bert.encoder.layer.5.output.dense.weight", "bert.encoder.layer.5", 5, "mlp"),
        ("bert.embeddings.word_embeddings.weight", None, None, "embedding"),
        ("bert.embeddings.LayerNorm.weight", None, None, "norm"),
        ("bert.pooler.dense.weight", None, None, "head"),
        ("classifier.weight", None, None, "head"),
        # T5: "block.3" is the layer, its "layer.0" a sub-layer; encoder and decoder differ.
        ("encoder.block.3.layer.0.SelfAttention.q.weight", "encoder.block.3", 3, "attention"),
        ("decoder.block.3.layer.1.EncDecAttention.k.weight", "decoder.block.3", 3, "attention"),
        ("encoder.block.3.layer.1.DenseReluDense.wi.weight", "encoder.block.3", 3, "mlp"),
        ("encoder.block.3.layer.1.DenseReluDense.wo.weight", "encoder.block.3", 3, "mlp"),
        ("encoder.block.0.layer.0.layer_norm.weight", "encoder.block.0", 0, "norm"),
        (
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "encoder.block.0",
            0,
            "attention",
        ),
        ("shared.weight", None, None, "embedding"),
        ("encoder.final_layer_norm.weight", None, None, "norm"),
        # Others: OPT / BART decoders, Mixtral experts, GPT-NeoX, plain modules
        ("model.decoder.layers.2.fc1.weight", "model.decoder.layers.2", 2, "mlp"),
        ("model.layers.1.block_sparse_moe.experts.3.w1.weight", "model.layers.1", 1, "mlp"),
        ("gpt_neox.layers.4.attention.query_key_value.weight", "gpt_neox.layers.4", 4, "attention"),
        ("0.weight", None, None, "other"),
        ("encoder.weird_thing", None, None, "other"),
    ],
)
def test_layer_and_module_of_parameter_names(
    name: str, prefix: str | None, index: int | None, kind: str
) -> None:
    assert layer_block(name) == prefix
    assert layer_index(name) == index
    assert module_type(name) == kind


def test_no_false_layer_matches() -> None:
    for name in ("shell.3.weight", "heads.3.weight", "my_layers_3.weight", "blockade.2.bias"):
        assert layer_block(name) is None, name


def test_assign_blocks_keeps_every_parameter_and_names_other() -> None:
    names = [
        "transformer.wte.weight",
        "transformer.h.0.ln_1.weight",
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.1.mlp.c_fc.weight",
        "transformer.ln_f.weight",
        "custom.thing",
    ]
    layer = assign_blocks(names, "layer")
    assert list(layer) == ["transformer.h.0", "transformer.h.1", "other"]
    assert layer["other"] == ["transformer.wte.weight", "transformer.ln_f.weight", "custom.thing"]
    module = assign_blocks(names, "module")
    assert module == {
        "embedding": ["transformer.wte.weight"],
        "norm": ["transformer.h.0.ln_1.weight", "transformer.ln_f.weight"],
        "attention": ["transformer.h.0.attn.c_attn.weight"],
        "mlp": ["transformer.h.1.mlp.c_fc.weight"],
        "other": ["custom.thing"],
    }
    assert assign_blocks(names, "none") == {"all": names}
    for blocks in (layer, module):
        assert sorted(n for members in blocks.values() for n in members) == sorted(names)
    with pytest.raises(ValueError, match="block_structure"):
        assign_blocks(names, "layers")
