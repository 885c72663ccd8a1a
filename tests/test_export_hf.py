"""Merged HF export: transformers loads it and matches the Keras merged model."""

import json
import os
import pathlib

import numpy as np
import oracles
import pytest
from export_fixtures import (
    TOKENS,
    config_for,
    factor_workdir,
    fake_workdir,
    keras_logits,
    merged_tensors,
    random_factors,
    rel_err,
    trained_model,
    variant_preset,
)
from safetensors.numpy import load_file

from gemma4_keras.config_lib import LORA_TARGETS
from gemma4_keras.data import chat, records
from gemma4_keras.exporters import commands
from gemma4_keras.model.lora import LoraSpec
from gemma4_keras.model.schema import EXPERT_TARGETS
from gemma4_keras.testing import variants

torch = oracles.need("torch")
transformers = oracles.need("transformers")

VARIANTS = variants.select(*variants.FEATURES)
# config.json fields that decide which tensors exist and their shapes; the
# export must write them as the base has them.
ARCH_FIELDS = (
    "num_key_value_heads",
    "num_global_key_value_heads",
    "attention_k_eq_v",
    "head_dim",
    "global_head_dim",
    "intermediate_size",
    "use_double_wide_mlp",
    "num_kv_shared_layers",
    "hidden_size_per_layer_input",
    "enable_moe_block",
    "layer_types",
)
TOL = 5e-5  # float32; base models alone agree to 3e-6..6e-6 here, large random
# adapters (deltas the size of the weights) amplify that to ~2e-5 (MoE).


def _hf_logits(directory, cls=transformers.AutoModelForCausalLM) -> np.ndarray:
    hf, info = cls.from_pretrained(
        directory, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing / unexpected keys
    with torch.no_grad():
        # logits_to_keep=slice(None): transformers 5.24 crashes on KV sharing
        # without PLE otherwise (see tests/test_tiny.py).
        out = hf.eval()(
            input_ids=torch.tensor(TOKENS, dtype=torch.long),
            logits_to_keep=slice(None),
        )
    return out.logits.numpy()


# The MoE variant with expert LoRA too (both banks, one pair per expert).
EXPERT_LORA = "moe_expert_lora"


@pytest.fixture(scope="module", params=[*VARIANTS, EXPERT_LORA])
def exported(request, tmp_path_factory):
    experts = request.param == EXPERT_LORA
    preset = variant_preset(**VARIANTS["moe" if experts else request.param])
    root = str(tmp_path_factory.mktemp(request.param))
    targets = LORA_TARGETS + EXPERT_TARGETS if experts else None
    model = trained_model(preset, targets=targets)
    workdir = fake_workdir(root, model, preset)
    out = commands.export(config_for(preset), workdir, "hf", os.path.join(root, "hf"))
    return request.param, preset, model, out


def test_logits_match_keras_merged_model(exported):
    name, preset, model, out = exported
    ref = keras_logits(model)
    got = _hf_logits(out)
    err = rel_err(got, ref)
    print(f"{name}: merged HF vs Keras max rel err {err:.2e}")
    assert err < TOL
    # The adapter must matter, or this test could not fail.
    model.set_adapter(None)
    base = keras_logits(model)
    model.set_adapter("default")
    assert rel_err(base, ref) > 1e-2


def test_files_and_manifest(exported):
    name, preset, _, out = exported
    files = set(os.listdir(out))
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "export_manifest.json",
    } <= files
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "gemma4_text" and cfg["architectures"] == [
        "Gemma4ForCausalLM"
    ]
    with open(os.path.join(preset, "config.json")) as f:
        base_cfg = json.load(f)
    assert {k: cfg.get(k) for k in ARCH_FIELDS} == {
        k: base_cfg.get(k) for k in ARCH_FIELDS
    }
    tensors = load_file(os.path.join(out, "model.safetensors"))
    base = load_file(os.path.join(preset, "model.safetensors"))
    assert set(tensors) == set(base)  # same names, incl. no k/v on KV-shared layers
    for k, v in base.items():
        assert tensors[k].shape == v.shape, k
    with open(os.path.join(out, "export_manifest.json")) as f:
        man = json.load(f)
    assert man["format"] == "hf" and man["template"] == "gemma4 chat"
    assert man["lora"]["rank"] == 4 and man["lora"]["alpha"] == 8.0
    assert man["eval"] == {"eval": {"accuracy": 0.75}}
    assert len(man["training_config_sha256"]) == 64


def test_bit_for_bit_equal_to_the_in_memory_merge(exported):
    """The streamed export equals the old in-memory path (Keras model merged)."""
    name, _, model, out = exported
    want = merged_tensors(model)  # float32, as the base
    got = load_file(os.path.join(out, "model.safetensors"))
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        assert got[key].tobytes() == value.tobytes(), f"{name}: {key}"


@pytest.mark.parametrize("exported", [EXPERT_LORA], indirect=True)
def test_every_expert_tensor_merged(exported):
    """Expert LoRA merged into every expert bank: as many expert tensors as
    the base, each of the base's shape and changed by its delta (a merge
    that drops or skips expert tensors fails here)."""
    _, preset, model, out = exported
    got = load_file(os.path.join(out, "model.safetensors"))
    base = load_file(os.path.join(preset, "model.safetensors"))
    experts = [k for k in base if any(k.endswith("." + t) for t in EXPERT_TARGETS)]
    assert len(experts) == model.spec.num_layers * len(EXPERT_TARGETS)
    assert len([k for k in got if k in experts]) == len(experts)
    for k in experts:
        assert got[k].shape == base[k].shape, k
        changed = np.abs(got[k] - base[k]).max(axis=(1, 2))  # per expert
        assert (changed > 1e-3).all(), k


def test_sharded(tmp_path):
    preset = variant_preset(ple=True)
    model = trained_model(preset, seed=1)
    workdir = fake_workdir(str(tmp_path), model, preset)
    out = commands.export(
        config_for(preset), workdir, "hf", str(tmp_path / "sharded"), shard_size="100KB"
    )
    files = os.listdir(out)
    shards = sorted(f for f in files if f.startswith("model-"))
    assert len(shards) > 2 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    assert "model.safetensors" not in files
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    for shard in shards:  # a shard over the limit holds one oversized tensor
        held = [k for k, v in weight_map.items() if v == shard]
        big = os.path.getsize(os.path.join(out, shard)) > 100 * 1024 + 8192
        assert held and (not big or len(held) == 1), shard
    ref = keras_logits(model)
    assert rel_err(_hf_logits(out), ref) < TOL


def test_multimodal_base(tmp_path):
    """A Gemma4ForConditionalGeneration base: the export keeps its layout."""
    preset = variant_preset(layout="conditional_generation", ple=True)
    model = trained_model(preset, seed=2)
    workdir = fake_workdir(str(tmp_path), model, preset)
    out = commands.export(config_for(preset), workdir, "hf", str(tmp_path / "mm"))
    keys = load_file(os.path.join(out, "model.safetensors"))
    assert set(keys) == set(load_file(os.path.join(preset, "model.safetensors")))
    assert all(k.startswith("model.language_model.") for k in keys)
    got = _hf_logits(out, transformers.Gemma4ForConditionalGeneration)
    assert rel_err(got, keras_logits(model)) < TOL


def test_merged_export_ships_the_chat_template(tmp_path):
    """The base's chat_template.jinja is copied; transformers renders tools with it.

    `apply_chat_template` of the exported directory (what a serving stack
    reads) equals `chat.render_conversation` on every tool case of the
    golden file, raw OpenAI messages and all.
    """
    preset = variant_preset(chat_template="small")
    spec = LoraSpec(rank=2, alpha=4.0)
    workdir = factor_workdir(str(tmp_path), preset, spec, random_factors(preset, spec))
    out = commands.export(config_for(preset), workdir, "hf", str(tmp_path / "hf"))
    with open(os.path.join(preset, "chat_template.jinja"), "rb") as f:
        base = f.read()
    with open(os.path.join(out, "chat_template.jinja"), "rb") as f:
        assert f.read() == base
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    golden = json.loads(
        (pathlib.Path(__file__).parent / "data" / "gemma4_chat_golden.json").read_text()
    )["cases"]
    for case in [c for c in golden if c.get("tools") and c["template"] == "small"]:
        flags = {k: case[k] for k in ("add_generation_prompt", "enable_thinking")}
        got = tokenizer.apply_chat_template(
            case["messages"], tools=case["tools"], tokenize=False, **flags
        )
        want = chat.render_conversation(
            records.normalise_messages(case["messages"]),
            template="small",
            tools=records.normalise_tools(case["tools"]),
            **flags,
        )
        assert got == want == case["expected"], case["case"]
