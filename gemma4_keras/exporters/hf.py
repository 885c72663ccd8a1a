"""Merged Gemma 4 text decoder as a Hugging Face checkpoint.

Two writers:

* `write_hf_streamed` (every base that is a local HF directory): reads the
  base's safetensors tensor by tensor (`hf_stream`), adds `scale * B @ A`
  (in float32) only where an adapter sits, casts to the output dtype (default:
  the base's own) and writes shards as they fill. The result carries exactly
  the base's tensor names (vision/audio towers and the redundant K/V tensors
  some checkpoints keep for KV-shared layers included) and the base's own
  `config.json` with only `dtype` changed. Peak host memory: one adapted
  tensor in float32 plus its delta (tensors without an adapter are copied in
  row blocks of at most 64 MiB), whatever the model size.
* `write_hf` (a KerasHub preset or a remote base, which has no safetensors to
  stream): the in-memory path below; it holds the merged model in float32.

`write_hf` writes what `transformers.AutoModelForCausalLM.from_pretrained(dir)` loads:

    config.json                       Gemma4ForCausalLM, model_type gemma4_text
    model.safetensors                 or model-0000i-of-0000N.safetensors +
                                      model.safetensors.index.json when sharded
    tokenizer.json, tokenizer_config.json, ...   copied from the base directory

Weights are `W + scale * (A @ B)` for every adapter site, stored as HF
`nn.Linear` weights (out, in). The name mapping is the inverse of KerasHub's
`convert_gemma4.py` reader (and so of `weights.copy_from_backbone`): KV-shared
layers get no k/v projections, MoE layers get `experts.gate_up_proj`
(E, 2 * I, H) = [gate; up] along axis 1 and `experts.down_proj` (E, H, I),
`layer_scalar` is stored with shape (1,) like HF's buffer.

Layouts (`layout=`):
  * `"causal_lm"` (default): text-only `Gemma4ForCausalLM`, keys `model.*`.
  * `"conditional_generation"`: `Gemma4ForConditionalGeneration` key layout,
    text weights under `model.language_model.*`, config nested under
    `text_config`, the way the released (multimodal) checkpoints are laid
    out. No vision or audio tower is written (this package trains the text
    decoder only), so the config carries no `vision_config`/`audio_config`:
    the result is a text-only model in the multimodal key layout, for tools
    that expect those names.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from gemma4_keras.exporters import hf_stream
from gemma4_keras.exporters.hf_stream import ExportError
from gemma4_keras.model import lora, stream_load
from gemma4_keras.model.lora import Factors, LoraSpec
from gemma4_keras.model.spec import ATTN_TARGETS, module_name

# Files a Hugging Face model directory carries for its tokenizer / generation.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
LAYOUTS = ("causal_lm", "conditional_generation")
PREFIXES = {"causal_lm": "model.", "conditional_generation": "model.language_model."}
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_SHARD_SIZE = 5 * 1024**3

# Our norm / extra names -> HF names under `layers.N.`: the loader's tables.
_NORMS = stream_load.HF_NORMS
_EXTRAS = stream_load.HF_EXTRAS


def _np(var) -> np.ndarray:
    if hasattr(var, "dequantize"):  # an NF4 holder (QLoRA base)
        return np.asarray(var.dequantize("float32"), np.float32)
    return np.asarray(var.value if hasattr(var, "value") else var, np.float32)


def merged_state_dict(
    model, layout: str = "causal_lm", name: str | None = None
) -> dict[str, np.ndarray]:
    """HF tensors (float32) of `model` with adapter `name` merged in.

    Args:
        model: a `Gemma4LoraModel`.
        layout: `"causal_lm"` or `"conditional_generation"` (key prefix).
        name: adapter to merge (default: the active one; none = base weights).

    Returns:
        {HF key: array}, e.g. `model.layers.0.self_attn.q_proj.weight` (out, in).
    """
    if layout not in LAYOUTS:
        raise ExportError(f"layout={layout!r}: expected one of {LAYOUTS}")
    p, g, spec = PREFIXES[layout], model.globals, model.spec
    out = {
        f"{p}embed_tokens.weight": _np(g["embedding"]),
        f"{p}norm.weight": _np(g["final_norm"]),
    }
    if spec.ple_dim:
        out[f"{p}embed_tokens_per_layer.weight"] = _np(g["ple_embedding"])
        out[f"{p}per_layer_model_projection.weight"] = _np(g["ple_projection"]).T
        out[f"{p}per_layer_projection_norm.weight"] = _np(g["ple_norm"])
    adapters = model.adapters(name) if (name or model.active_adapter) else {}
    for blk in model.blocks:
        out.update(_block_tensors(blk, f"{p}layers.{blk.bspec.index}.", adapters))
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def _block_tensors(blk, prefix: str, adapters: dict) -> dict[str, np.ndarray]:

    i = blk.bspec.index
    out = {prefix + _NORMS[n]: _np(v) for n, v in blk.norms.items()}
    for target, linear in blk.proj.items():
        kernel = np.asarray(linear.weight("float32"), np.float32)
        if (i, target) in adapters:
            kernel = kernel + adapters[(i, target)].delta_weight()
        group = "self_attn" if target in ATTN_TARGETS else "mlp"
        out[f"{prefix}{group}.{target}.weight"] = kernel.T
    out[prefix + "layer_scalar"] = _np(blk.extra["layer_scalar"]).reshape(1)
    for n, (hf_name, transpose) in _EXTRAS.items():
        if n in blk.extra:
            v = _np(blk.extra[n])
            out[prefix + hf_name] = v.T if transpose else v
    if "experts_gate" in blk.extra:
        # KerasHub banks: gate/up (E, H, I), down (E, I, H). HF: gate_up
        # (E, 2I, H) with gate first, as convert_gemma4.py slices it; down (E, H, I).
        gate, up = _np(blk.extra["experts_gate"]), _np(blk.extra["experts_up"])
        out[prefix + "experts.gate_up_proj"] = np.concatenate(
            [gate.transpose(0, 2, 1), up.transpose(0, 2, 1)], axis=1
        )
        out[prefix + "experts.down_proj"] = _np(blk.extra["experts_down"]).transpose(
            0, 2, 1
        )
    return out


def text_config(
    backbone, model_spec, base_config: dict | None = None, dtype: str = "float32"
) -> dict:
    """A `Gemma4TextConfig` dict (model_type gemma4_text) for the text decoder.

    Derived from the KerasHub backbone's config (so it also works for a
    KerasHub-preset base); fields it cannot know (token ids, max positions,
    initializer range) come from the base `config.json` when there is one.
    """
    c = backbone.get_config()
    if (
        c.get("local_rope_scaling_factor", 1.0) != 1.0
        or c.get("global_rope_scaling_factor", 1.0) != 1.0
    ):
        raise ExportError(
            "the backbone uses RoPE scaling factors != 1, which this exporter "
            "does not map to transformers' rope_parameters yet"
        )
    full_rope = {"rope_type": "proportional", "rope_theta": c["global_rope_wavelength"]}
    if c.get("global_rope_partial_rotary_factor") is not None:
        full_rope["partial_rotary_factor"] = c["global_rope_partial_rotary_factor"]
    derived = {
        "architectures": ["Gemma4ForCausalLM"],
        "model_type": "gemma4_text",
        "vocab_size": c["vocabulary_size"],
        "hidden_size": c["hidden_dim"],
        "intermediate_size": c["intermediate_dim"],
        "num_hidden_layers": c["num_layers"],
        "num_attention_heads": c["num_query_heads"],
        "num_key_value_heads": c["num_key_value_heads"],
        "num_global_key_value_heads": c.get("num_global_key_value_heads"),
        "head_dim": c["head_dim"],
        # Top level, where KerasHub's converter reads it; transformers moves it.
        "global_head_dim": c.get("global_head_dim"),
        "layer_types": list(c["layer_types"]),
        "sliding_window": c["sliding_window_size"]
        if c["use_sliding_window_attention"]
        else None,
        "rope_parameters": {
            "sliding_attention": {
                "rope_type": "default",
                "rope_theta": c["local_rope_wavelength"],
            },
            "full_attention": full_rope,
        },
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": c["layer_norm_epsilon"],
        "final_logit_softcapping": c.get("final_logit_soft_cap"),
        "attn_logit_softcapping": c.get("attention_logit_soft_cap"),
        "tie_word_embeddings": True,
        "attention_bias": False,
        "attention_k_eq_v": any(b.k_eq_v for b in model_spec.blocks),
        "use_bidirectional_attention": "vision"
        if c.get("use_vision_bidirectional_attention")
        else None,
        "hidden_size_per_layer_input": c.get("hidden_size_per_layer_input") or 0,
        "vocab_size_per_layer_input": c.get("vocab_size_per_layer_input")
        or c["vocabulary_size"],
        "num_kv_shared_layers": c.get("num_kv_shared_layers", 0),
        "use_double_wide_mlp": c.get("use_double_wide_mlp", False),
        "enable_moe_block": bool(c.get("enable_moe_block")),
        "num_experts": c.get("num_experts") if c.get("enable_moe_block") else None,
        "top_k_experts": c.get("num_experts_per_token")
        if c.get("enable_moe_block")
        else None,
        "moe_intermediate_size": c.get("expert_intermediate_dim")
        if c.get("enable_moe_block")
        else None,
        "dtype": dtype,
    }
    # Gemma 4 defaults (special ids as in GEMMA4.md) when the base has no config.json.
    defaults = {
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "max_position_embeddings": 131072,
        "initializer_range": 0.02,
    }
    # A key the backbone does not set (e.g. `global_head_dim` when it equals
    # `head_dim`) is left out, not written as null: transformers 5.24
    # refuses `"head_dim": null` (StrictDataclassFieldValidationError).
    derived = {k: v for k, v in derived.items() if v is not None}
    base_text = dict((base_config or {}).get("text_config", base_config or {}))
    keep = {
        k: v
        for k, v in base_text.items()
        if k not in derived
        and not k.startswith("_")
        and k not in ("per_layer_config", "transformers_version")
    }
    return {**defaults, **keep, **derived}


def model_config(text: dict, layout: str, base_config: dict | None = None) -> dict:
    """The config.json of `layout` around a text config."""
    if layout == "causal_lm":
        return text
    top = {
        k: v
        for k, v in (base_config or {}).items()
        if k
        not in (
            "text_config",
            "vision_config",
            "audio_config",
            "architectures",
            "model_type",
            "transformers_version",
        )
        and not k.startswith("_")
    }
    inner = {k: v for k, v in text.items() if k != "architectures"}
    return {
        **top,
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "text_config": inner,
        "tie_word_embeddings": True,
        "dtype": text["dtype"],
    }


def parse_size(size) -> int:
    """'5GB' / '500MB' / 1000000 -> bytes (powers of 1024 for KB/MB/GB)."""
    if isinstance(size, int | float):
        return int(size)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B?)\s*", str(size), re.I)
    if not m:
        raise ExportError(
            f"--shard_size={size!r}: expected bytes or a size like 500MB, 5GB"
        )
    unit = m[2].upper().replace("I", "").rstrip("B")
    return int(float(m[1]) * 1024 ** {"": 0, "K": 1, "M": 2, "G": 3}[unit])


def _cast(tensors: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    if dtype not in DTYPES:
        raise ExportError(f"dtype={dtype!r}: expected one of {DTYPES}")
    if dtype == "bfloat16":
        return {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    return {k: v.astype(dtype) for k, v in tensors.items()}


def save_safetensors(
    tensors: dict[str, np.ndarray], directory: str, shard_size=DEFAULT_SHARD_SIZE
) -> list[str]:
    """Writes `model.safetensors`, or shards + index when over `shard_size`.

    Returns the file names written.
    """

    limit = parse_size(shard_size)
    shards: list[dict[str, np.ndarray]] = [{}]
    used = 0
    for key in sorted(tensors):
        nbytes = tensors[key].nbytes
        if shards[-1] and used + nbytes > limit:
            shards.append({})
            used = 0
        shards[-1][key] = tensors[key]
        used += nbytes
    meta = {"format": "pt"}  # transformers refuses safetensors without it
    if len(shards) == 1:
        save_file(
            shards[0], os.path.join(directory, "model.safetensors"), metadata=meta
        )
        return ["model.safetensors"]
    names = [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        for i in range(len(shards))
    ]
    weight_map = {}
    for fname, shard in zip(names, shards, strict=True):
        save_file(shard, os.path.join(directory, fname), metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    index = {
        "metadata": {"total_size": int(sum(v.nbytes for v in tensors.values()))},
        "weight_map": dict(sorted(weight_map.items())),
    }
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return [*names, "model.safetensors.index.json"]


def copy_tokenizer_files(base_dir: str | None, directory: str) -> list[str]:
    """Copies the tokenizer / generation files of a local HF base directory.

    A KerasHub preset base has no tokenizer.json: its SentencePiece model
    (`assets/tokenizer/vocabulary.spm`) is copied as `tokenizer.model`, which
    transformers' `GemmaTokenizer` reads (not verified here).
    """
    copied = []
    if not base_dir or not os.path.isdir(base_dir):
        return copied
    for fname in TOKENIZER_FILES:
        src = os.path.join(base_dir, fname)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(directory, fname))
            copied.append(fname)
    spm = os.path.join(base_dir, "assets", "tokenizer", "vocabulary.spm")
    if not copied and os.path.isfile(spm):
        shutil.copy2(spm, os.path.join(directory, "tokenizer.model"))
        copied.append("tokenizer.model")
    return copied


def read_base_config(base_dir: str | None) -> dict | None:
    """The base's HF config.json (None for a KerasHub preset or a remote name)."""
    if not base_dir or not os.path.isdir(base_dir):
        return None
    path = os.path.join(base_dir, "config.json")
    if os.path.isfile(os.path.join(base_dir, "metadata.json")) or not os.path.isfile(
        path
    ):
        return None
    with open(path) as f:
        cfg = json.load(f)
    return cfg if str(cfg.get("model_type", "")).startswith("gemma4") else None


def write_hf(
    model,
    backbone,
    directory: str,
    *,
    base_dir: str | None = None,
    layout: str = "causal_lm",
    dtype: str = "float32",
    shard_size=DEFAULT_SHARD_SIZE,
) -> list[str]:
    """Writes the merged HF checkpoint into an existing empty `directory`.

    Args:
        model: `Gemma4LoraModel` whose active adapter is merged.
        backbone: the KerasHub backbone the model was built from (config).
        directory: output directory (must exist).
        base_dir: local base preset directory (config.json / tokenizer source).
        layout: `"causal_lm"` or `"conditional_generation"`.
        dtype: `float32`, `bfloat16` or `float16` for the stored weights.
        shard_size: bytes or a size string; larger checkpoints are sharded.

    Returns:
        The file names written.

    Example:
      >>> write_hf(model, backbone, "out/hf", base_dir="/ckpt/gemma-4-E4B-it")
    """
    base_config = read_base_config(base_dir)
    text = text_config(backbone, model.spec, base_config, dtype)
    tensors = _cast(merged_state_dict(model, layout), dtype)
    files = save_safetensors(tensors, directory, shard_size)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(model_config(text, layout, base_config), f, indent=2, sort_keys=True)
    return [*files, "config.json", *copy_tokenizer_files(base_dir, directory)]


# ----------------------------------------------------------------------------
# Streamed from the base's safetensors.


def base_layout(config_json: dict) -> str:
    """`conditional_generation` for a multimodal base, else `causal_lm`.

    HF: `text_config` nesting / `Gemma4ForConditionalGeneration`; KerasHub
    preset: a vision or audio encoder in the backbone config (the released
    multimodal checkpoints, whose HF twins are conditional-generation ones).
    """
    if "class_name" in config_json and "config" in config_json:
        kw = config_json["config"]
        has_tower = kw.get("vision_encoder") or kw.get("audio_encoder")
        return "conditional_generation" if has_tower else "causal_lm"
    archs = config_json.get("architectures") or []
    if "text_config" in config_json or any("Conditional" in a for a in archs):
        return "conditional_generation"
    return "causal_lm"


def exported_config(base_config: dict, dtype: str) -> dict:
    """The base's own config.json with `dtype` set (top level and text_config).

    Nothing else changes: keys the base lacks stay absent, so transformers
    reads the export exactly as it reads the base.
    """
    out = json.loads(json.dumps(base_config))
    for cfg in (out, out.get("text_config")):
        if isinstance(cfg, dict):
            if "torch_dtype" in cfg:
                cfg["torch_dtype"] = dtype
            if "dtype" in cfg or cfg is out:
                cfg["dtype"] = dtype
    return out


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ExportError(f"--dtype={dtype!r}: expected one of {', '.join(DTYPES)}")


def _sites_by_tensor(layout: str, factors: Factors) -> dict[str, tuple[int, str]]:
    """{HF tensor name: (layer, target)} of the adapter's sites."""
    prefix = PREFIXES[layout]
    return {f"{prefix}{module_name(*site)}.weight": site for site in factors}


def _check_sites(refs: dict, sites: dict, base_dir: str, factors: Factors) -> None:
    """Every adapter site must name a base tensor of the delta's shape."""
    for name, (layer, target) in sorted(sites.items()):
        if name not in refs:
            raise ExportError(
                f"{base_dir}: the adapter has {module_name(layer, target)} but the "
                f"base has no tensor {name!r} (an adapter for another base?)"
            )
        a, b = factors[(layer, target)]
        want = (b.shape[1], a.shape[0])
        if refs[name].shape != want:
            raise ExportError(
                f"{base_dir}: tensor {name!r} is {refs[name].shape}, the adapter's "
                f"delta is {want} (an adapter for another base?)"
            )


def merge_tensor(
    base: np.ndarray, lora_spec: LoraSpec, factors: Factors, site, out: np.dtype
) -> np.ndarray:
    """`base + (scale * a @ b).T` in float32 (site None: `base`), cast to `out`.

    The delta is computed exactly as the in-memory merge computes it
    (`lora.deltas`: `(a @ b) * scale`, then transposed), so the streamed export
    equals the in-memory one bit for bit.
    """
    if site is not None:
        delta = lora.deltas(lora_spec, {site: factors[site]})[site]
        base = base.astype(np.float32) + delta.T
        del delta
    if base.dtype == out or base.dtype.kind not in "fV":
        return base
    return base.astype(out)


def write_hf_streamed(
    base_dir: str,
    directory: str,
    lora_spec: LoraSpec,
    factors: Factors,
    *,
    dtype: str | None = None,
    shard_size=DEFAULT_SHARD_SIZE,
) -> list[str]:
    """Writes the merged checkpoint of a local HF base, tensor by tensor.

    Args:
        base_dir: the base's HF directory (config.json + safetensors).
        directory: an existing empty output directory.
        lora_spec, factors: the adapter (`peft.read_adapter`), already
            validated against the base's spec.
        dtype: stored dtype of every float tensor; None = the base's own.
        shard_size: bytes or a size string; shards are written as they fill.

    Returns:
        The file names written.

    Example:
      >>> spec, factors = peft.read_adapter("runs/x/adapter")
      >>> write_hf_streamed("/ckpt/gemma-4-E4B-it", "out/hf", spec, factors)
    """
    base_config = read_base_config(base_dir)
    if base_config is None:
        raise ExportError(f"{base_dir}/config.json: not a Gemma 4 HF config")
    refs = hf_stream.tensor_refs(base_dir)
    dtype = dtype or hf_stream.stored_dtype(refs)
    check_dtype(dtype)
    out = hf_stream.DTYPE_NAMES[dtype]
    sites = _sites_by_tensor(base_layout(base_config), factors)
    _check_sites(refs, sites, base_dir, factors)

    def out_dtype(ref):
        return out if ref.dtype in hf_stream.DTYPE_NAMES.values() else ref.dtype

    def produce(name: str):
        site = sites.get(name)
        if site is None:  # passes through: cast block by block
            blocks = hf_stream.read_blocks(refs[name])
            return (merge_tensor(b, lora_spec, factors, None, out) for b in blocks)
        base = hf_stream.read_tensor(refs[name])
        return merge_tensor(base, lora_spec, factors, site, out)

    entries = [(n, out_dtype(refs[n]), refs[n].shape) for n in sorted(refs)]
    files = hf_stream.write_sharded(directory, entries, produce, parse_size(shard_size))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(exported_config(base_config, dtype), f, indent=2)
    return [*files, "config.json", *copy_tokenizer_files(base_dir, directory)]
