"""The streaming loader against the KerasHub path, and config normalisation.

The oracle is today's path, `Gemma4LoraModel.from_backbone(
Gemma4Backbone.from_preset(dir, dtype))`: the streamed model must hold the
same variables, in the same order, with the same bytes.
"""

from __future__ import annotations

import functools
import json
import os
import shutil

import keras_hub
import numpy as np
import oracles
import pytest
from safetensors.numpy import load_file, save_file

from gemma4_keras.model import hf_config, hub, layers, presets, stream_load
from gemma4_keras.model.gemma4_lora_model import Gemma4LoraModel
from gemma4_keras.model.lora import LoraSpec
from gemma4_keras.testing import full_size, tiny, variants

VARIANTS = {
    **variants.select(*variants.FEATURES),
    "conditional_generation": {
        **variants.VARIANTS["conditional_generation"],
        "moe": True,
    },
}
# name -> (compute dtype, quant, double_quant)
MODES = {
    "float32": ("float32", "none", False),
    "bfloat16": ("bfloat16", "none", False),
    "nf4": ("bfloat16", "nf4", True),
}
LORA = LoraSpec(rank=4)


@functools.cache
def backbone(path: str, dtype: str):
    with presets.on_host():
        return keras_hub.models.Gemma4Backbone.from_preset(path, dtype=dtype)


def old_path(path, dtype, quant="none", double_quant=False, stored=None):
    """`from_backbone` of a backbone loaded in `stored` (default: `dtype`)."""
    with presets.on_host():
        return Gemma4LoraModel.from_backbone(
            backbone(str(path), stored or dtype),
            LORA,
            quant=quant,
            double_quant=double_quant,
            dtype=dtype,
        )


def streamed(path, dtype, quant="none", double_quant=False):
    with presets.on_host():
        return stream_load.stream_training_model(
            path, LORA, dtype=dtype, quant=quant, double_quant=double_quant
        )


def variables(model) -> dict[str, np.ndarray]:
    return {v.path: np.asarray(v.value) for v in model.weights}


def assert_same_model(new, old):
    """Same spec, same variable paths in the same order, same dtypes and bytes."""
    assert new.spec == old.spec
    a, b = variables(new), variables(old)
    assert list(a) == list(b)
    for path in b:
        assert (a[path].dtype, a[path].shape) == (b[path].dtype, b[path].shape), path
        assert a[path].tobytes() == b[path].tobytes(), path


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_streamed_model_equals_keras_hub_path_bit_for_bit(variant, mode):
    path = tiny.tiny_checkpoint(**VARIANTS[variant])
    dtype, quant, dq = MODES[mode]
    assert_same_model(
        streamed(path, dtype, quant, dq), old_path(path, dtype, quant, dq)
    )


def test_nf4_without_double_quant_in_float32():
    path = tiny.tiny_checkpoint(ple=True, kv_shared_layers=2, moe=True)
    assert_same_model(
        streamed(path, "float32", "nf4", False), old_path(path, "float32", "nf4", False)
    )


@pytest.mark.slow  # Keras' int8/int4 quantisation compiles per kernel shape
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_keras_int_quantisation_equals_keras_hub_path(quant):
    path = tiny.tiny_checkpoint()
    assert_same_model(
        streamed(path, "bfloat16", quant), old_path(path, "bfloat16", quant)
    )


@pytest.fixture(scope="module")
def released_layout(tmp_path_factory):
    """bfloat16, several shards + index, KV-shared layers with (unused) K/V tensors."""
    cfg = tiny.tiny_hf_config(
        layout="conditional_generation", ple=True, kv_shared_layers=2, moe=True
    )
    path = tmp_path_factory.mktemp("released")
    return full_size.write_checkpoint(path, cfg, seed=3, max_shard_bytes=200_000)


@pytest.mark.parametrize("mode", ["float32", "nf4"])
def test_sharded_bfloat16_checkpoint_with_shared_kv_tensors(released_layout, mode):
    files = json.loads((released_layout / "model.safetensors.index.json").read_text())
    assert len(set(files["weight_map"].values())) > 2
    assert (
        "model.language_model.layers.3.self_attn.k_proj.weight" in files["weight_map"]
    )
    dtype, quant, dq = MODES[mode]
    model = streamed(released_layout, dtype, quant, dq)
    # Frozen weights keep the checkpoint's bfloat16 under float32 compute:
    # the oracle is a bfloat16 backbone copied into a float32 model.
    assert_same_model(
        model, old_path(released_layout, dtype, quant, dq, stored="bfloat16")
    )
    frozen = {
        str(v.dtype)
        for v in model.non_trainable_weights
        if "float" in v.dtype and "/absmax" not in v.path  # NF4 scales: float32
    }
    assert frozen == {"bfloat16"}
    assert {str(v.dtype) for v in model.trainable_weights} == {"float32"}


# --- errors -------------------------------------------------------------------


@pytest.fixture
def editable(tmp_path):
    """A copy of the tiny checkpoint whose tensors a test may change."""
    path = tmp_path / "ckpt"
    shutil.copytree(tiny.tiny_checkpoint(), path)
    return path


def _rewrite(path, change):
    tensors = load_file(str(path / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "model.safetensors"), {"format": "pt"})


def test_missing_tensor_is_one_line_naming_it(editable):
    name = "model.layers.2.mlp.up_proj.weight"
    _rewrite(editable, lambda t: t.pop(name))
    with pytest.raises(stream_load.CheckpointError) as e:
        streamed(editable, "float32")
    message = str(e.value)
    assert name in message and str(editable) in message and "\n" not in message


def test_wrong_shape_is_one_line_naming_file_tensor_and_shapes(editable):
    name = "model.layers.1.self_attn.q_proj.weight"

    def narrow(t):
        t[name] = t[name][:-1]

    _rewrite(editable, narrow)
    with pytest.raises(stream_load.CheckpointError) as e:
        streamed(editable, "float32")
    message = str(e.value)
    assert name in message and "model.safetensors" in message
    assert "(127, 64)" in message and "(128, 64)" in message and "\n" not in message


def test_missing_shard_is_named(released_layout, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(released_layout, path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (path / shard).unlink()
    with pytest.raises(stream_load.CheckpointError, match=shard):
        stream_load.CheckpointReader(path)


def test_presets_stop_with_a_preset_error(editable):
    _rewrite(editable, lambda t: t.pop("model.norm.weight"))
    from gemma4_keras import config_lib

    cfg = config_lib.get_config("tiny", "lora")
    with pytest.raises(presets.PresetError, match="model.norm.weight"):
        presets.build_training_model(str(editable), presets.ModelSettings.of(cfg))


def test_presets_stream_hf_directories_without_keras_hub_backbone(monkeypatch):
    from gemma4_keras import config_lib

    def refuse(*args, **kwargs):
        raise AssertionError("the KerasHub backbone was built")

    monkeypatch.setattr(presets, "load_backbone", refuse)
    cfg = config_lib.get_config("tiny", "lora")
    path = str(tiny.tiny_checkpoint())
    model = presets.build_training_model(path, presets.ModelSettings.of(cfg))
    assert model.spec.num_layers == tiny.NUM_LAYERS


# --- both config layouts ------------------------------------------------------


@pytest.fixture(scope="module")
def resaved(tmp_path_factory):
    """The tiny K=V checkpoint loaded and saved again by the installed transformers."""
    transformers = oracles.need("transformers")
    import torch

    source = tiny.tiny_checkpoint(k_eq_v=True, layout="conditional_generation")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        source, dtype=torch.float32
    )
    path = tmp_path_factory.mktemp("resaved")
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, path / name)
    return source, path


def test_save_pretrained_moves_global_fields_into_per_layer_config(resaved):
    _, path = resaved
    text = json.loads((path / "config.json").read_text())["text_config"]
    assert "global_head_dim" not in text and "num_global_key_value_heads" not in text
    assert text["per_layer_config"]["1"] == {"head_dim": 32, "num_key_value_heads": 2}
    # What KerasHub's converter makes of it as it is: no global head size;
    # the bridge normalises first.
    assert hub.convert_hf_config(text)["global_head_dim"] is None
    assert hub.backbone_kwargs(text)["global_head_dim"] == 32
    assert hf_config.needs_normalising(path)


def test_normalised_config_equals_the_released_layout(resaved):
    source, path = resaved
    original = hf_config.text_config(hf_config.read_raw(source / "config.json"))
    text = hf_config.text_config(hf_config.read_config(path))
    assert "per_layer_config" not in text
    for key in ("global_head_dim", "num_global_key_value_heads", "head_dim"):
        assert text[key] == original[key]
    assert hub.model_spec(hf_config.read_config(path)) == hub.model_spec(
        hf_config.read_config(source)
    )


def test_resaved_checkpoint_streams_to_the_same_model(resaved):
    source, path = resaved
    assert_same_model(streamed(path, "float32"), streamed(source, "float32"))


def test_keras_hub_reads_the_resaved_checkpoint_through_the_view(resaved):
    source, path = resaved
    with hf_config.keras_hub_view(path) as readable:
        assert readable != str(path)
        with presets.on_host():
            bb = keras_hub.models.Gemma4Backbone.from_preset(readable, dtype="float32")
            old = Gemma4LoraModel.from_backbone(bb, LORA, dtype="float32")
    assert_same_model(streamed(source, "float32"), old)
    assert not os.path.exists(readable)  # the view is removed on exit


def test_the_bridge_loads_the_resaved_checkpoint_through_the_view(resaved):
    # presets.load_backbone -> hub.backbone_from_preset: the KerasHub path used
    # for KerasHub-format presets and by evaluation, generation and export.
    source, path = resaved
    with presets.on_host():
        bb = presets.load_backbone(str(path), "float32")
        old = Gemma4LoraModel.from_backbone(bb, LORA, dtype="float32")
    assert_same_model(streamed(source, "float32"), old)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_released_layout_is_left_alone(variant):
    path = tiny.tiny_checkpoint(**VARIANTS[variant])
    assert not hf_config.needs_normalising(path)
    with hf_config.keras_hub_view(path) as readable:
        assert readable == str(path)


@pytest.mark.parametrize("size", full_size.SIZES)
def test_released_full_size_configs_need_no_normalising(size):
    config = full_size.released_config(size)
    assert hf_config.normalise(config) == config


def _saved(per_layer, **text):
    base = {
        "model_type": "gemma4_text",
        "head_dim": 256,
        "num_key_value_heads": 8,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
    }
    return {**base, **text, "per_layer_config": per_layer}


def test_normalise_k_eq_v_and_zero_padded_keys():
    saved = _saved(
        {
            "01": {"head_dim": 512, "num_key_value_heads": 2},
            "03": {"head_dim": 512, "num_key_value_heads": 2},
        },
        attention_k_eq_v=True,
    )
    out = hf_config.normalise(saved)
    assert (out["global_head_dim"], out["num_global_key_value_heads"]) == (512, 2)
    assert "per_layer_config" not in out and "per_layer_config" in saved


def test_normalise_drops_null_towers_and_ignores_unused_global_kv_heads():
    config = {
        "model_type": "gemma4",
        "vision_config": None,
        "audio_config": None,
        "text_config": {
            "head_dim": 256,
            "global_head_dim": 512,
            "num_global_key_value_heads": 4,
        },
    }
    out = hf_config.normalise(config)
    assert "vision_config" not in out and "audio_config" not in out
    assert out["text_config"]["num_global_key_value_heads"] is None


def test_missing_global_head_dim_gets_the_transformers_default():
    assert hf_config.normalise({"head_dim": 256})["global_head_dim"] == 512
    # transformers 5.24's layout: an empty per_layer_config means every layer
    # has head_dim (it writes no global_head_dim when the two agree).
    saved = {"head_dim": 16, "per_layer_config": {}}
    assert hf_config.normalise(saved)["global_head_dim"] == 16


@pytest.mark.parametrize(
    "per_layer, match",
    [
        ({"0": {"head_dim": 128}}, "sliding layer 0"),
        ({"1": {"head_dim": 512}, "3": {"head_dim": 384}}, "different head_dim"),
        ({"1": {"head_dim": 512}}, "different head_dim"),  # layer 3 keeps 256
        ({"1": {"intermediate_size": 9}}, "intermediate_size"),
        ({"x": {"head_dim": 512}}, "not a layer index"),
        ({"7": {"head_dim": 512}}, "layer 7"),
    ],
)
def test_normalise_refuses_what_the_released_layout_cannot_say(per_layer, match):
    with pytest.raises(hf_config.ConfigError, match=match):
        hf_config.normalise(_saved(per_layer), source="cfg.json")


def test_hf_presets_are_streamed_from_the_downloaded_snapshot(monkeypatch):
    import huggingface_hub

    from gemma4_keras import config_lib

    asked = []

    def snapshot_download(repo_id, allow_patterns):
        asked.append(repo_id)
        return str(tiny.tiny_checkpoint())

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(presets, "load_backbone", None)  # never reached
    cfg = config_lib.get_config("tiny", "lora")
    model = presets.build_training_model(
        "hf://google/gemma-4-E2B-it", presets.ModelSettings.of(cfg)
    )
    assert asked == ["google/gemma-4-E2B-it"] and model.spec.num_layers == 4


def test_hf_presets_offline_stop_with_a_preset_error():
    from gemma4_keras import config_lib

    cfg = config_lib.get_config("tiny", "lora")
    with pytest.raises(presets.PresetError, match="could not load its weights"):
        presets.build_training_model(
            "hf://google/no-such-gemma", presets.ModelSettings.of(cfg)
        )


# --- memory -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_globals_are_filled_in_place_from_blocks_of_rows(dtype, monkeypatch):
    """The big tables are built block by block in one buffer XLA owns.

    No whole-table copy while loading (the table plus one block of rows),
    and a buffer the train step can donate: a JAX array adopting the numpy
    buffer read from disk cannot be, so the step copied every such table
    (`tests/test_frozen_state.py` checks the step itself).
    """
    config = hf_config.read_config(tiny.tiny_checkpoint())
    rng = np.random.default_rng(0)
    table = rng.normal(size=(tiny.TINY_VOCAB_SIZE, tiny.HIDDEN_SIZE)).astype(np.float32)
    blocks = np.array_split(table, 5)
    real_put, pointers = layers._put_rows, []

    def put(buffer, rows, first):
        pointers.append(buffer.unsafe_buffer_pointer())
        return real_put(buffer, rows, first)

    monkeypatch.setattr(layers, "_put_rows", put)
    with presets.on_host():
        model = Gemma4LoraModel(hub.model_spec(config), dtype=dtype)
        model.add_global("embedding", table.shape, iter(blocks))
    var = model.globals["embedding"]
    assert var.dtype == dtype and var.path.endswith("embedding")
    want = table.astype(np.asarray(var.value).dtype)
    np.testing.assert_array_equal(np.asarray(var.value), want)
    assert len(pointers) == 5 and len(set(pointers)) == 1  # one buffer, in place
    assert var.value.unsafe_buffer_pointer() == pointers[0]
