"""The real-dimension checkpoint writer, checked at tiny dimensions.

Writing E2B (9.3 GB) or E4B (15 GB) is a benchmark (`benchmarks/load_memory.py`),
not a test: here the same code writes tiny configs, and the released configs
are checked without writing a weight.
"""

from __future__ import annotations

import json
import math

import numpy as np
import oracles
import pytest
from safetensors import safe_open

from gemma4_keras.model import hf_config, hub, safetensors_io
from gemma4_keras.testing import full_size, tiny


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A tiny E2B-shaped model in the released layout, in many small shards."""
    config = tiny.tiny_hf_config(
        layout="conditional_generation",
        ple=True,
        kv_shared_layers=2,
        double_wide_mlp=True,
    )
    path = tmp_path_factory.mktemp("full_size")
    return full_size.write_checkpoint(path, config, seed=5, max_shard_bytes=100_000)


def _read_all(path) -> dict[str, np.ndarray]:
    index = json.loads((path / full_size.INDEX_FILE).read_text())
    out = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(path / file), "np") as f:
            assert f.metadata() == {"format": "pt"}
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_index_names_every_tensor_once_in_its_shard(written):
    index = json.loads((written / full_size.INDEX_FILE).read_text())
    config = json.loads((written / "config.json").read_text())
    specs = full_size.weight_specs(config)
    assert set(index["weight_map"]) == set(specs)
    tensors = _read_all(written)
    assert set(tensors) == set(specs)
    for name, (shape, _) in specs.items():
        assert tensors[name].shape == shape and tensors[name].dtype.name == "bfloat16"
    assert index["metadata"]["total_size"] == 2 * sum(t.size for t in tensors.values())
    assert len(set(index["weight_map"].values())) > 3
    assert all(k.startswith("model.language_model.") for k in tensors)


def test_kv_shared_layers_carry_unused_kv_tensors_like_the_release(written):
    tensors = _read_all(written)
    for layer in (2, 3):  # the KV-shared layers
        prefix = f"model.language_model.layers.{layer}.self_attn."
        assert {"k_proj.weight", "v_proj.weight", "k_norm.weight"} <= {
            k.removeprefix(prefix) for k in tensors if k.startswith(prefix)
        }
    config = json.loads((written / "config.json").read_text())
    assert set(full_size.weight_specs(config, shared_kv_weights=False)) == set(
        tiny.weight_shapes(config)
    )


def test_transformers_loads_it_with_no_missing_or_unexpected_keys(written):
    transformers = oracles.need("transformers")
    import torch

    config = transformers.AutoConfig.from_pretrained(written)
    assert config.text_config.per_layer_config[1].head_dim == 32
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        written, output_loading_info=True, dtype=torch.float32
    )
    assert not any(info.values()), info
    with torch.no_grad():
        out = model(torch.arange(4, 20)[None], logits_to_keep=slice(None))
    assert torch.isfinite(out.logits).all()


def test_values_do_not_depend_on_the_piece_size(monkeypatch):
    shape = (3, 1000)

    def whole(kind):
        return np.concatenate(list(full_size._pieces(7, "w", shape, kind)))

    expected = {kind: whole(kind) for kind in ("matrix", "norm", "scalar")}
    monkeypatch.setattr(full_size, "CHUNK_BYTES", 512)  # 256 values a piece
    assert len(list(full_size._pieces(7, "w", shape, "matrix"))) == 12
    for kind, values in expected.items():
        np.testing.assert_array_equal(whole(kind), values)


def test_same_seed_same_bytes(tmp_path):
    config = tiny.tiny_hf_config()
    a = full_size.write_checkpoint(tmp_path / "a", config, seed=1)
    b = full_size.write_checkpoint(tmp_path / "b", config, seed=1)
    c = full_size.write_checkpoint(tmp_path / "c", config, seed=2)
    name = "model.safetensors"  # one shard
    assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / name).read_bytes() != (c / name).read_bytes()


def test_a_tensor_above_the_shard_limit_gets_a_shard_of_its_own():
    sizes = [("a", 20), ("big", 200), ("b", 20), ("c", 20)]  # bfloat16 bytes
    assert safetensors_io.plan_shards(sizes, 50) == [["a"], ["big"], ["b", "c"]]


# --- the released sizes, without writing a weight ------------------------------


@pytest.mark.parametrize(
    "size, layers, d, ffn, heads, kv, shared, window, ple",
    [
        ("e2b", 35, 1536, 6144, 8, 1, 20, 512, 256),
        ("e4b", 42, 2560, 10240, 8, 2, 18, 512, 256),
        ("26b_a4b", 30, 2816, 2112, 16, 8, 0, 1024, 0),
        ("31b", 60, 5376, 21504, 32, 16, 0, 1024, 0),
    ],
)
def test_released_configs_match_the_family_table(
    size, layers, d, ffn, heads, kv, shared, window, ple
):
    """`shared/GEMMA4.md`, "The family"."""
    text = full_size.released_config(size)["text_config"]
    got = (
        text["num_hidden_layers"],
        text["hidden_size"],
        text["intermediate_size"],
        text["num_attention_heads"],
        text["num_key_value_heads"],
        text["num_kv_shared_layers"],
        text["sliding_window"],
        text["hidden_size_per_layer_input"],
    )
    assert got == (layers, d, ffn, heads, kv, shared, window, ple)
    assert (text["head_dim"], text["global_head_dim"]) == (256, 512)


def test_e2b_parameters_and_bytes():
    config = full_size.released_config("e2b")
    # 4.63 B without the unused K/V of KV-shared layers, as the E2B.
    assert full_size.parameter_count(config, shared_kv_weights=False) == 4_628_569_379
    specs = full_size.weight_specs(config)
    largest = max(math.prod(s) for s, _ in specs.values())
    assert largest == 262144 * 35 * 256  # the per-layer-embedding table


@pytest.mark.parametrize("size", full_size.SIZES)
def test_config_only_directory_gives_the_spec(size, tmp_path):
    path = full_size.write_full_size(tmp_path, size, weights=False)
    assert not list(path.glob("*.safetensors"))
    spec = hub.model_spec(hf_config.read_config(path))
    text = full_size.released_config(size)["text_config"]
    assert spec.num_layers == text["num_hidden_layers"]
    assert [b.is_global for b in spec.blocks] == [
        t == "full_attention" for t in text["layer_types"]
    ]
    assert {b.head_dim for b in spec.blocks if b.is_global} == {512}
    # The spec and the writer agree on every projection's shape.
    specs = full_size.weight_specs(full_size.released_config(size), False)
    q = specs["model.language_model.layers.0.self_attn.q_proj.weight"][0]
    assert q == spec.projection_shape(0, "q_proj")[::-1]


def test_full_size_refuses_to_fill_a_small_disk(tmp_path, monkeypatch):
    class Usage:
        free = 1 << 30

    monkeypatch.setattr(full_size.shutil, "disk_usage", lambda _: Usage)
    with pytest.raises(OSError, match="needs 8.7 GiB"):
        full_size.write_full_size(tmp_path, "e2b")
    assert not list(tmp_path.glob("*.safetensors"))


@pytest.mark.parametrize("size", full_size.SIZES)
def test_released_towers_and_truncated_decoders(size):
    """Towers at transformers' defaults (audio for E2B/E4B only); `plan`'s
    tower counts equal the written tensors; `layers` keeps the widths."""
    oracles.need("transformers")
    from gemma4_keras.model import plan

    config = full_size.released_config(size, towers=True, layers=12)
    vision = config["vision_config"]
    assert (vision["hidden_size"], vision["num_hidden_layers"]) == (768, 16)
    assert ("audio_config" in config) == (size in ("e2b", "e4b"))
    text, full = config["text_config"], full_size.released_config(size)["text_config"]
    assert (
        text["num_hidden_layers"] == 12
        and text["layer_types"] == (full["layer_types"][:12])
    )
    assert text["hidden_size"] == full["hidden_size"]
    shared = full["num_kv_shared_layers"]
    assert text["num_kv_shared_layers"] == round(shared * 12 / len(full["layer_types"]))
    specs = full_size.weight_specs(config)
    towers = sum(
        math.prod(s) for n, (s, _) in specs.items() if ".language_model." not in n
    )
    d = text["hidden_size"]
    want = plan.vision_params(vision, d)
    if "audio_config" in config:
        want += plan.audio_params(config["audio_config"], d)
    assert towers == want
    if size == "e4b":
        assert (plan.vision_params(vision, d), want) == (169_330_688, 478_087_936)


def test_written_towers_load_in_transformers_and_keras_hub(tmp_path):
    """The towers' random bfloat16 tensors (clip bounds, convolutions, tables)
    load with no missing key and give finite soft tokens."""
    transformers = oracles.need("transformers")
    import jax.numpy as jnp
    import torch

    from gemma4_keras.data import media

    config = tiny.tiny_hf_config(layout="multimodal", ple=True)
    path = full_size.write_checkpoint(tmp_path, config, max_shard_bytes=200_000)
    _, info = transformers.Gemma4ForConditionalGeneration.from_pretrained(
        path, output_loading_info=True, dtype=torch.float32
    )
    assert not any(info.values()), info
    towers = hub.load_towers(str(path))
    n = media.PROCESSOR.max_patches
    grid = np.stack(np.meshgrid(np.arange(60), np.arange(42)), -1).reshape(1, n, 2)
    pixels = np.random.default_rng(0).random((1, n, 768), np.float32)
    soft, valid = towers.image_soft_tokens(pixels, grid)
    assert int(valid.sum()) == 280 and bool(jnp.isfinite(soft).all())
    mel = np.random.default_rng(1).standard_normal((1, 200, 128)).astype(np.float32)
    audio, _ = towers.audio_soft_tokens(mel, np.ones((1, 200), bool))
    assert bool(jnp.isfinite(audio).all())
