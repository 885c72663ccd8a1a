"""Contract with KerasHub's Gemma 4 layers.

The package reads the architecture once, from the backbone config
(`hub.spec_from_config`). KerasHub's layers are the ground truth of what that
config builds: `live_spec` reads the same facts off the attributes of a built
`Gemma4Backbone` (private attributes of keras-hub's Gemma 4 layers, which is
why it lives in a test and not in the package). When keras-hub is upgraded,
this file says whether the reader still matches.
"""

import keras_hub
import pytest

from gemma4_keras.model import hub, schema
from gemma4_keras.model.spec import BlockSpec, ModelSpec
from gemma4_keras.testing import tiny, variants

VARIANTS = list(variants.select(*variants.FEATURES).values())


def _block(backbone, i: int) -> BlockSpec:
    blk = backbone.get_layer(f"decoder_block_{i}")
    att = blk.attention
    sliding = blk.use_sliding_window_attention and not blk.is_global_attention
    shared = att.is_kv_shared_layer
    return BlockSpec(
        index=i,
        is_global=bool(blk.is_global_attention),
        head_dim=int(att.head_dim),
        num_heads=int(att.num_query_heads),
        num_kv_heads=int(att.effective_num_kv_heads),
        sliding_window=int(blk.sliding_window_size) if sliding else None,
        rope_wavelength=float(att.rope_wavelength),
        rope_scaling=float(att.rope_scaling_factor),
        rotary_dim=int(att.rotary_dim),
        kv_source=int(blk.kv_shared_layer_index) if shared else None,
        k_eq_v=bool(att.attention_k_eq_v),
        ffn_dim=int(blk.actual_intermediate_dim),
        attn_soft_cap=att.logit_soft_cap,
    )


def live_spec(backbone) -> ModelSpec:
    """The `ModelSpec` read off a built backbone's layers (text decoder only)."""
    return ModelSpec(
        vocab_size=int(backbone.vocabulary_size),
        hidden_dim=int(backbone.hidden_dim),
        eps=float(backbone.layer_norm_epsilon),
        final_soft_cap=backbone.final_logit_soft_cap,
        ple_dim=int(backbone.hidden_size_per_layer_input or 0),
        moe=bool(backbone.enable_moe_block),
        num_experts=int(backbone.num_experts or 0),
        top_k=int(backbone.num_experts_per_token or 0),
        expert_dim=int(backbone.expert_intermediate_dim or 0),
        blocks=tuple(_block(backbone, i) for i in range(backbone.num_layers)),
        ple_vocab_size=int(backbone.get_layer("per_layer_token_embedding").input_dim)
        if backbone.hidden_size_per_layer_input
        else 0,
    )


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v) or "base")
@pytest.mark.parametrize("layout", ["causal_lm", "conditional_generation"])
def test_config_reader_matches_the_built_layers(variant, layout):
    path = tiny.tiny_checkpoint(layout=layout, **variant)
    backbone = keras_hub.models.Gemma4Backbone.from_preset(str(path), dtype="float32")
    assert hub.spec_from_config(backbone.get_config()) == live_spec(backbone)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v) or "base")
def test_schema_rows_are_the_backbone_variables(variant):
    """Each schema row names a KerasHub variable of the row's shape, and the
    backbone holds no text-decoder weight the schema lacks."""
    backbone = keras_hub.models.Gemma4Backbone.from_preset(
        str(tiny.tiny_checkpoint(**variant)), dtype="float32"
    )
    spec = hub.spec_from_config(backbone.get_config())
    read = set()
    for row, layer in schema.rows(spec):
        block = None if layer is None else spec.blocks[layer]
        value = hub.backbone_value(backbone, row, layer)
        assert value.shape == tuple(row.shape(spec, block)), row.keras_path(layer)
        read.add(id(hub.variable(backbone, row, layer)))
    unread = [
        v.path
        for v in backbone.weights
        if id(v) not in read and "seed" not in v.path and "rotary" not in v.path
    ]
    assert unread == []


def test_a_changed_attribute_is_detected():
    # The contract can fail: a backbone whose layer disagrees with its config.
    backbone = keras_hub.models.Gemma4Backbone.from_preset(
        str(tiny.tiny_checkpoint()), dtype="float32"
    )
    backbone.get_layer("decoder_block_1").attention.head_dim += 2
    assert hub.spec_from_config(backbone.get_config()) != live_spec(backbone)
