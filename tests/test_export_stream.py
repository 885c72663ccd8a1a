"""Streamed exports: the base's own config and names, its dtype, PEFT keys, no weights read.

Bases here are written by transformers' own `save_pretrained` (bfloat16,
`global_head_dim` absent), carry redundant K/V tensors on KV-shared layers
(as the released E2B/E4B checkpoints do), or use the multimodal
(`Gemma4ForConditionalGeneration`) layout.
"""

import json
import os

import ml_dtypes
import numpy as np
import oracles
import pytest
from export_fixtures import (
    TOKENS,
    config_for,
    factor_workdir,
    random_factors,
    redundant_kv_tensors,
    rel_err,
    transformers_checkpoint,
    variant_preset,
    with_redundant_kv,
)
from safetensors.numpy import load_file

from gemma4_keras.exporters import commands
from gemma4_keras.exporters.hf import ExportError
from gemma4_keras.model import presets, safetensors_io
from gemma4_keras.model.lora import LoraSpec

torch = oracles.need("torch")
transformers = oracles.need("transformers")
peft_lib = oracles.need("peft")

SPEC = LoraSpec(rank=4, alpha=8.0, rslora=True)


def _load(directory, cls=transformers.AutoModelForCausalLM, dtype=torch.float32):
    model, info = cls.from_pretrained(directory, dtype=dtype, output_loading_info=True)
    return model.eval(), info


def _logits(model) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(TOKENS, dtype=torch.long),
            logits_to_keep=slice(None),
        )
    return out.logits.float().numpy()


def _all_tensors(directory) -> dict[str, np.ndarray]:
    refs = safetensors_io.tensor_refs(directory)
    return {n: safetensors_io.read_tensor(r) for n, r in refs.items()}


def _json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tf_run(tmp_path_factory):
    """A bfloat16 base written by transformers, and a run's rsLoRA adapter on it."""
    root = tmp_path_factory.mktemp("tf_base")
    base = transformers_checkpoint(root / "base", ple=True, kv_shared_layers=2)
    factors = random_factors(base, SPEC)
    return base, factor_workdir(str(root), base, SPEC, factors)


@pytest.fixture(scope="module")
def peft_merged(tf_run):
    """transformers + PEFT `merge_and_unload` in float32: the oracle."""
    base, workdir = tf_run
    model, _ = _load(base)
    merged = peft_lib.PeftModel.from_pretrained(
        model, os.path.join(workdir, "adapter")
    ).merge_and_unload()
    names = set(safetensors_io.tensor_refs(base))
    state = {k: v.numpy() for k, v in merged.state_dict().items() if k in names}
    assert set(state) == names  # (state_dict adds the tied lm_head.weight)
    return state


def test_default_dtype_is_the_base_dtype_and_config_is_the_base_own(
    tf_run, peft_merged, tmp_path
):
    base, workdir = tf_run
    out = commands.export(config_for(base), workdir, "hf", str(tmp_path / "hf"))
    # Byte for byte the base's config (transformers 5.24 refused the old
    # re-derived one: "head_dim expected int, got None").
    assert _json(os.path.join(out, "config.json")) == _json(
        os.path.join(base, "config.json")
    )
    manifest = _json(os.path.join(out, "export_manifest.json"))
    assert manifest["dtype"] == manifest["base_dtype"] == "bfloat16"
    tensors = _all_tensors(out)
    assert set(tensors) == set(safetensors_io.tensor_refs(base))
    assert {t.dtype for t in tensors.values()} == {np.dtype(ml_dtypes.bfloat16)}
    model, info = _load(out, dtype=torch.bfloat16)
    assert not any(info.values()), info
    assert model.dtype == torch.bfloat16
    # Oracle: PEFT's float32 merge, rounded to bfloat16 (<= 1 ulp: other matmul order).
    for name, want in peft_merged.items():
        got = tensors[name].astype(np.float32)
        want16 = want.astype(ml_dtypes.bfloat16).astype(np.float32)
        ulp = np.abs(want16) * 2.0**-7 + 1e-30
        assert (np.abs(got - want16) <= ulp).all(), name


def test_float32_on_request_is_recorded(tf_run, peft_merged, tmp_path):
    base, workdir = tf_run
    out = commands.export(
        config_for(base), workdir, "hf", str(tmp_path / "hf"), dtype="float32"
    )
    cfg = _json(os.path.join(out, "config.json"))
    base_cfg = _json(os.path.join(base, "config.json"))
    assert cfg.pop("dtype") == "float32" and base_cfg.pop("dtype") == "bfloat16"
    assert cfg == base_cfg  # nothing else changed
    manifest = _json(os.path.join(out, "export_manifest.json"))
    assert (manifest["dtype"], manifest["base_dtype"]) == ("float32", "bfloat16")
    tensors = _all_tensors(out)
    for name, want in peft_merged.items():
        np.testing.assert_allclose(tensors[name], want, rtol=1e-5, atol=1e-6)
    model, info = _load(out)
    assert not any(info.values()), info
    merged_logits = _logits(model)
    base_logits = _logits(_load(base)[0])
    assert rel_err(base_logits, merged_logits) > 1e-2  # the adapter matters


def test_bad_dtype_flags(tf_run, tmp_path):
    base, workdir = tf_run
    with pytest.raises(ExportError, match=r"--dtype='int8': expected one of"):
        commands.export(
            config_for(base), workdir, "hf", str(tmp_path / "o"), dtype="int8"
        )
    with pytest.raises(ExportError, match=r"--dtype=float32 applies to --format=hf"):
        commands.export(
            config_for(base), workdir, "gguf", str(tmp_path / "o"), dtype="float32"
        )


def test_redundant_kv_tensors_are_kept(tmp_path):
    """A base with K/V tensors on KV-shared layers: the export keeps them."""
    base = with_redundant_kv(
        variant_preset(ple=True, kv_shared_layers=2), tmp_path / "base"
    )
    spec = LoraSpec(rank=4, alpha=8.0)
    workdir = factor_workdir(str(tmp_path), base, spec, random_factors(base, spec))
    out = commands.export(
        config_for(base), workdir, "hf", str(tmp_path / "hf"), shard_size="200KB"
    )
    redundant = set(redundant_kv_tensors(_json(os.path.join(base, "config.json"))))
    base_tensors, tensors = _all_tensors(base), _all_tensors(out)
    assert redundant <= set(tensors) and set(tensors) == set(base_tensors)
    for name in redundant:
        np.testing.assert_array_equal(tensors[name], base_tensors[name])
    assert len([f for f in os.listdir(out) if f.startswith("model-")]) > 2
    index = _json(os.path.join(out, "model.safetensors.index.json"))
    assert set(index["weight_map"]) == set(base_tensors)
    _, info = _load(out)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert set(info["unexpected_keys"]) <= redundant  # transformers ignores them

    gguf = oracles.need("gguf")
    out_gguf = commands.export(
        config_for(base), workdir, "gguf", str(tmp_path / "gguf"), gguf_type="f32"
    )
    reader = gguf.GGUFReader(os.path.join(out_gguf, "model-f32.gguf"))
    names = {t.name for t in reader.tensors}
    # llama.cpp loads no K/V for shared layers and refuses extra tensors.
    assert "blk.0.attn_k.weight" in names and "blk.2.attn_k.weight" not in names


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    root = tmp_path_factory.mktemp("mm")
    base = variant_preset(layout="conditional_generation", ple=True, kv_shared_layers=2)
    factors = random_factors(base, SPEC, seed=3)
    return base, factor_workdir(str(root), base, SPEC, factors), root


def test_peft_reads_no_base_weights(multimodal, monkeypatch):
    base, workdir, root = multimodal

    def no_weights(*args, **kwargs):
        raise AssertionError("--format=peft read base weights")

    monkeypatch.setattr(presets, "load_backbone", no_weights)
    monkeypatch.setattr(safetensors_io, "read_tensor", no_weights)
    out = commands.export(config_for(base), workdir, "peft", str(root / "peft"))
    cfg = _json(os.path.join(out, "adapter_config.json"))
    assert cfg["use_rslora"] is True and cfg["modules_to_save"] is None
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    options = _json(os.path.join(out, "export_manifest.json"))["options"]
    assert options["vllm_max_lora_rank"] == 8  # vLLM's allowed values: 1, 8, 16, ...
    assert options["vllm_serve"].startswith(f"vllm serve {base} --enable-lora")
    keys = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert all(
        k.startswith("base_model.model.model.language_model.layers.") for k in keys
    )
    # Layers 2-3 are KV-shared: no k/v adapters there.
    assert not [k for k in keys if ".layers.2.self_attn.k_proj" in k]
    assert not [k for k in keys if ".layers.3.self_attn.v_proj" in k]
    assert [k for k in keys if ".layers.1.self_attn.v_proj" in k]


def test_peft_on_conditional_generation_base_matches_merged_export(multimodal):
    base, workdir, root = multimodal
    peft_dir = commands.export(config_for(base), workdir, "peft", str(root / "p2"))
    hf_dir = commands.export(config_for(base), workdir, "hf", str(root / "hf"))
    assert _json(os.path.join(hf_dir, "config.json")) == _json(
        os.path.join(base, "config.json")
    )
    cls = transformers.Gemma4ForConditionalGeneration
    base_model, _ = _load(base, cls)
    with_adapter = peft_lib.PeftModel.from_pretrained(base_model, peft_dir).eval()
    merged, info = _load(hf_dir, cls)
    assert not any(info.values()), info
    want = _logits(merged)
    got = _logits(with_adapter)
    assert rel_err(got, want) < 5e-5
    with with_adapter.disable_adapter():
        assert rel_err(_logits(with_adapter), want) > 1e-2  # the adapter applies


def test_peft_refuses_an_adapter_on_a_kv_shared_layer(tmp_path):
    base = variant_preset(kv_shared_layers=2)
    spec = LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "k_proj"))
    factors = random_factors(variant_preset(), spec)  # layers 2-3 have k there
    workdir = factor_workdir(str(tmp_path), base, spec, factors)
    with pytest.raises(
        ExportError,
        match=r"layers\.2\.self_attn\.k_proj: this layer has no k_proj \(KV-shared layer\)",
    ):
        commands.export(config_for(base), workdir, "peft", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_peft_refuses_a_v_proj_adapter_on_a_k_eq_v_layer(tmp_path):
    base = variant_preset(k_eq_v=True)  # layer 1: full attention, V = K projection
    spec = LoraSpec(rank=4, alpha=8.0, targets=("v_proj",), layers=(1,))
    factors = random_factors(variant_preset(), spec)
    workdir = factor_workdir(str(tmp_path), base, spec, factors)
    with pytest.raises(
        ExportError, match=r"layers\.1\.self_attn\.v_proj: this layer has no v_proj"
    ):
        commands.export(config_for(base), workdir, "peft", str(tmp_path / "out"))


def test_vllm_max_lora_rank():
    assert [commands.vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 320, 321, 512)] == [
        1,
        8,
        8,
        16,
        320,
        512,
        512,
    ]
    assert commands.vllm_max_lora_rank(513) is None


def test_hf_keeps_the_base_layout(multimodal, tmp_path):
    base, workdir, _ = multimodal
    with pytest.raises(ExportError, match=r"--layout=causal_lm: a merged hf export"):
        commands.export(
            config_for(base), workdir, "hf", str(tmp_path / "o"), layout="causal_lm"
        )


def test_hf_preset_streams_from_the_local_snapshot(tmp_path, monkeypatch):
    """`hf://org/repo`: hf export streams from the HF cache's files, not KerasHub."""
    import huggingface_hub

    base = variant_preset(ple=True)
    spec = LoraSpec(rank=4, alpha=8.0)
    workdir = factor_workdir(str(tmp_path), base, spec, random_factors(base, spec))
    asked = []

    def snapshot(repo, **kwargs):
        asked.append(repo)
        return base

    def no_backbone(*args, **kwargs):
        raise AssertionError("the hf export built the model in memory")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setattr(presets, "load_backbone", no_backbone)
    out = commands.export(
        config_for("hf://google/tiny-gemma-4"), workdir, "hf", str(tmp_path / "hf")
    )
    assert asked == ["google/tiny-gemma-4"]
    assert set(load_file(os.path.join(out, "model.safetensors"))) == set(
        load_file(os.path.join(base, "model.safetensors"))
    )
    manifest = _json(os.path.join(out, "export_manifest.json"))
    assert manifest["base_model"] == "google/tiny-gemma-4"


def test_only_adapted_tensors_are_read_whole(tmp_path, monkeypatch):
    """Other tensors (e.g. a multi-GB embedding) are copied in row blocks."""
    base = variant_preset(ple=True)
    spec = LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "down_proj"))
    factors = random_factors(base, spec)
    workdir = factor_workdir(str(tmp_path), base, spec, factors)
    whole, blocks = [], []
    read_tensor, read_blocks = safetensors_io.read_tensor, safetensors_io.read_blocks

    def spy_tensor(ref):
        whole.append(ref.name)
        return read_tensor(ref)

    def spy_blocks(ref, max_bytes=64 * 1024**2):
        blocks.append(ref.name)
        return read_blocks(ref, max_bytes=4096)  # many blocks per tensor

    monkeypatch.setattr(safetensors_io, "read_tensor", spy_tensor)
    monkeypatch.setattr(safetensors_io, "read_blocks", spy_blocks)
    out = commands.export(config_for(base), workdir, "hf", str(tmp_path / "hf"))
    sites = {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(4)}
    sites |= {f"model.layers.{i}.mlp.down_proj.weight" for i in range(4)}
    assert set(whole) == sites
    assert set(blocks) == set(safetensors_io.tensor_refs(base)) - sites
    got = load_file(os.path.join(out, "model.safetensors"))
    want = load_file(os.path.join(base, "model.safetensors"))
    for name in blocks:
        np.testing.assert_array_equal(got[name], want[name])


def test_read_blocks_and_truncation(tmp_path):
    ref = safetensors_io.tensor_refs(variant_preset())["model.embed_tokens.weight"]
    parts = list(safetensors_io.read_blocks(ref, max_bytes=10_000))
    assert len(parts) > 10 and all(p.nbytes <= 10_000 for p in parts)
    np.testing.assert_array_equal(
        np.concatenate(parts), safetensors_io.read_tensor(ref)
    )
    short = tmp_path / "short.safetensors"
    with open(ref.path, "rb") as f:
        short.write_bytes(f.read(ref.start + ref.nbytes // 2))
    cut = safetensors_io.TensorRef(
        ref.name, str(short), ref.dtype, ref.shape, ref.start, ref.nbytes
    )
    with pytest.raises(
        safetensors_io.CheckpointError,
        match=r"model\.embed_tokens\.weight' is truncated",
    ):
        safetensors_io.read_tensor(cut)
    with pytest.raises(
        safetensors_io.CheckpointError,
        match=r"model\.embed_tokens\.weight' is truncated",
    ):
        list(safetensors_io.read_blocks(cut, max_bytes=10_000))


def test_keras_export_keeps_a_bfloat16_base_in_bfloat16(tf_run, peft_merged, tmp_path):
    import keras_hub

    base, workdir = tf_run
    out = commands.export(config_for(base), workdir, "keras", str(tmp_path / "k"))
    manifest = _json(os.path.join(out, "export_manifest.json"))
    assert manifest["dtype"] == manifest["base_dtype"] == "bfloat16"
    policy = _json(os.path.join(out, "config.json"))["config"]["dtype"]
    assert policy["config"]["name"] == "bfloat16"  # stored as the base is
    backbone = keras_hub.models.Gemma4Backbone.from_preset(out, dtype="bfloat16")
    kernel = backbone.get_layer("decoder_block_1").attention.query_dense.kernel
    # HF q_proj (out, in) -> KerasHub (heads, d, head_dim); compare within 1 ulp.
    want = peft_merged["model.layers.1.self_attn.q_proj.weight"]
    heads, d, hd = kernel.shape
    got = (
        np.asarray(kernel.numpy(), np.float32).transpose(0, 2, 1).reshape(heads * hd, d)
    )
    want16 = want.astype(ml_dtypes.bfloat16).astype(np.float32)
    assert (np.abs(got - want16) <= np.abs(want16) * 2.0**-7 + 1e-30).all()
