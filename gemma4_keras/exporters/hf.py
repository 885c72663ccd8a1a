"""Merged Gemma 4 text decoder as a Hugging Face checkpoint: `write_hf_streamed`.

One writer, tensor by tensor, from either base:

* a local HF directory: its safetensors are read one tensor at a time
  (`model/safetensors_io.py`); the result carries exactly the base's tensor names
  (vision/audio towers and the redundant K/V tensors some checkpoints keep
  for KV-shared layers included) and the base's own `config.json` with only
  `dtype` changed;
* a KerasHub `Gemma4Backbone` (a KerasHub preset or remote base, which has
  no safetensors): the text decoder's tensors are the rows of
  `model/schema.py`, read off the backbone one at a time, under the
  `layout`'s prefix, with a `config.json` derived from the backbone
  (`text_config`, `model_config`).

Each tensor gets `scale * B @ A` (in float32) only where an adapter sits, is
cast to the output dtype (default: the base's own) and written into the
shard being filled: peak host memory is one adapted tensor in float32 plus
its delta (tensors without an adapter are copied in row blocks of at most
64 MiB), whatever the model size. What it writes,
`transformers.AutoModelForCausalLM.from_pretrained(dir)` loads:

    config.json                       the base's, or Gemma4ForCausalLM
    model.safetensors                 or model-0000i-of-0000N.safetensors +
                                      model.safetensors.index.json when sharded
    tokenizer.json, tokenizer_config.json, ...   copied from the base directory

Layouts (`layout=`, a backbone base only):
  * `"causal_lm"` (default): text-only `Gemma4ForCausalLM`, keys `model.*`.
  * `"conditional_generation"`: `Gemma4ForConditionalGeneration` key layout,
    text weights under `model.language_model.*`, config nested under
    `text_config`. No vision or audio tower is written, so the config
    carries no `vision_config`/`audio_config`: a text-only model in the
    multimodal key layout, for tools that expect those names.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from typing import NamedTuple

import ml_dtypes
import numpy as np

from gemma4_keras.model import hub, layers, lora, safetensors_io, schema
from gemma4_keras.model.lora import Factors, LoraSpec
from gemma4_keras.model.spec import module_name

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
# `--dtype` names <-> numpy dtypes of stored float weights.
DTYPE_NAMES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
DEFAULT_SHARD_SIZE = 5 * 1024**3


class ExportError(ValueError):
    """An export that cannot be written as asked (one line: file, tensor or flag)."""


def stored_dtype(refs: dict) -> str:
    """The float dtype holding most of a checkpoint's bytes: `bfloat16`, ...

    This is what "the base's own dtype" means for `--dtype`'s default.
    """
    weight: dict[np.dtype, int] = {}
    for ref in refs.values():
        if ref.dtype in DTYPE_NAMES.values():
            weight[ref.dtype] = weight.get(ref.dtype, 0) + ref.nbytes
    if not weight:
        raise ExportError(
            "the base checkpoint holds no float32/bfloat16/float16 tensor"
        )
    top = max(weight, key=weight.get)
    return next(k for k, v in DTYPE_NAMES.items() if v == top)


def text_config(backbone, model_spec, dtype: str = "float32") -> dict:
    """A `Gemma4TextConfig` dict (model_type gemma4_text) for the text decoder.

    Derived from the KerasHub backbone's config, for a base with no
    `config.json` (a KerasHub preset); fields it cannot know (token ids, max
    positions, initializer range) are Gemma 4's.
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
        "dtype": dtype,
    }
    if c.get("enable_moe_block"):
        derived["num_experts"] = c["num_experts"]
        derived["top_k_experts"] = c["num_experts_per_token"]
        derived["moe_intermediate_size"] = c["expert_intermediate_dim"]
    # Gemma 4's (special ids as in GEMMA4.md).
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
    return {**defaults, **{k: v for k, v in derived.items() if v is not None}}


def model_config(text: dict, layout: str) -> dict:
    """The config.json of `layout` around a text config."""
    if layout == "causal_lm":
        return text
    inner = {k: v for k, v in text.items() if k != "architectures"}
    return {
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
    if dtype not in DTYPE_NAMES:
        raise ExportError(
            f"--dtype={dtype!r}: expected one of {', '.join(DTYPE_NAMES)}"
        )


def _sites_by_tensor(layout: str, factors: Factors) -> dict[str, tuple[int, str]]:
    """{HF tensor name: (layer, target)} of the adapter's sites."""
    prefix = PREFIXES[layout]
    return {
        prefix + schema.target_rows(target)[0].hf_name(layer): (layer, target)
        for layer, target in factors
    }


def _check_sites(refs: dict, sites: dict, base_dir: str, factors: Factors) -> None:
    """Every adapter site must name a base tensor of the delta's shape."""
    for name, (layer, target) in sorted(sites.items()):
        if name not in refs:
            raise ExportError(
                f"{base_dir}: the adapter has {module_name(layer, target)} but the "
                f"base has no tensor {name!r} (an adapter for another base?)"
            )
        a, b = factors[(layer, target)]
        want = (*a.shape[:-2], b.shape[-1], a.shape[-2])  # HF (E,) out, in
        if refs[name].shape != want:
            raise ExportError(
                f"{base_dir}: tensor {name!r} is {refs[name].shape}, the adapter's "
                f"delta is {want} (an adapter for another base?)"
            )


def merge_tensor(
    base: np.ndarray, lora_spec: LoraSpec, factors: Factors, site, out: np.dtype
) -> np.ndarray:
    """`base + (scale * a @ b).T` in float32 (site None: `base`), cast to `out`
    (an expert bank: each expert's delta transposed, (E, out, in)).

    The delta is computed exactly as the in-memory merge computes it
    (`lora.deltas`: `(a @ b) * scale`, then transposed), so the streamed export
    equals the in-memory one bit for bit.
    """
    if site is not None:
        delta = lora.deltas(lora_spec, {site: factors[site]})[site]
        base = base.astype(np.float32) + np.swapaxes(delta, -1, -2)
        del delta
    if base.dtype == out or base.dtype.kind not in "fV":
        return base
    return base.astype(out)


class _Tensor(NamedTuple):
    """One tensor of a base: stored dtype, HF shape, and how to read it."""

    dtype: np.dtype
    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]
    blocks: Callable[[], Iterable[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _checkpoint_tensors(base_dir: str) -> dict[str, _Tensor]:
    """Every tensor of an HF checkpoint, as it is (towers included)."""
    refs = safetensors_io.tensor_refs(base_dir)
    return {
        name: _Tensor(
            ref.dtype,
            ref.shape,
            functools.partial(safetensors_io.read_tensor, ref),
            functools.partial(safetensors_io.read_blocks, ref),
        )
        for name, ref in refs.items()
    }


def _backbone_tensors(backbone, spec, layout: str) -> dict[str, _Tensor]:
    """The text decoder's HF tensors (`schema.hf_tensors`) read off a backbone."""

    def read(parts):
        values = [
            (row, hub.backbone_value(backbone, row, layer)) for row, layer in parts
        ]
        return np.ascontiguousarray(schema.hf_value(values))

    out = {}
    for name, (shape, parts) in schema.hf_tensors(spec).items():
        row, layer = parts[0]
        dtype = np.dtype(layers.np_dtype(hub.variable(backbone, row, layer).dtype))
        reader = functools.partial(read, parts)
        out[PREFIXES[layout] + name] = _Tensor(
            dtype, tuple(shape), reader, lambda r=reader: [r()]
        )
    return out


def write_hf_streamed(
    base,
    directory: str,
    lora_spec: LoraSpec,
    factors: Factors,
    *,
    dtype: str | None = None,
    shard_size=DEFAULT_SHARD_SIZE,
    layout: str = "causal_lm",
) -> list[str]:
    """Writes the merged checkpoint of a base, tensor by tensor.

    Args:
        base: the base's local HF directory (config.json + safetensors), or
            a KerasHub `Gemma4Backbone` (a KerasHub preset or remote base:
            the schema's rows are read off it one by one).
        directory: an existing empty output directory.
        lora_spec, factors: the adapter (`peft.read_adapter`), already
            validated against the base's spec.
        dtype: stored dtype of every float tensor; None = the base's own.
        shard_size: bytes or a size string; shards are written as they fill.
        layout: a backbone's key layout (`causal_lm`, `conditional_generation`);
            an HF base keeps its own.

    Returns:
        The file names written.

    Example:
      >>> spec, factors = peft.read_adapter("runs/x/adapter")
      >>> write_hf_streamed("/ckpt/gemma-4-E4B-it", "out/hf", spec, factors)
    """
    if isinstance(base, str | os.PathLike):
        base_dir, base_config = str(base), read_base_config(str(base))
        if base_config is None:
            raise ExportError(f"{base_dir}/config.json: not a Gemma 4 HF config")
        layout, tensors = base_layout(base_config), _checkpoint_tensors(base_dir)
    else:
        if layout not in LAYOUTS:
            raise ExportError(f"layout={layout!r}: expected one of {LAYOUTS}")
        base_dir, base_config = None, None
        spec = hub.spec_from_config(base.get_config())
        tensors = _backbone_tensors(base, spec, layout)
    floats = DTYPE_NAMES.values()
    if dtype is None:
        dtype = stored_dtype(tensors)
    check_dtype(dtype)
    out = DTYPE_NAMES[dtype]
    sites = _sites_by_tensor(layout, factors)
    _check_sites(tensors, sites, base_dir or "the backbone", factors)

    def produce(name: str):
        site, tensor = sites.get(name), tensors[name]
        if site is None:  # passes through: cast block by block
            blocks = tensor.blocks()
            return (merge_tensor(b, lora_spec, factors, None, out) for b in blocks)
        return merge_tensor(tensor.read(), lora_spec, factors, site, out)

    entries = [
        (n, out if t.dtype in floats else t.dtype, t.shape)
        for n, t in sorted(tensors.items())
    ]
    files = safetensors_io.write_sharded(
        directory, entries, produce, parse_size(shard_size)
    )
    if base_config is not None:
        config = exported_config(base_config, dtype)
    else:
        config = model_config(text_config(base, spec, dtype), layout)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=base_config is None)
    return [*files, "config.json", *copy_tokenizer_files(base_dir, directory)]
