"""The KerasHub bridge: every KerasHub name, attribute path and internal.

KerasHub loads presets (KerasHub names, `hf://`, `kaggle://`, local
directories), tokenizes and generates; this package trains its own
re-statement of the text decoder (`Gemma4LoraModel`) over the same weights.
Everything that depends on how KerasHub spells things lives here:

* loading: `backbone_from_preset`, `tokenizer_from_preset`, `causal_lm`,
  `preset_names`, `load_preset_json`;
* generation: `CausalLM` (the base class the training model's decoder,
  `decoding.Gemma4LoraCausalLM`, implements) and `sampler`;
* the architecture: `backbone_kwargs` (KerasHub's own HF config converter)
  and `spec_from_config`, the one reader of a backbone config into a
  `ModelSpec`. `tests/test_hub_contract.py` checks it against the attributes
  of live KerasHub layers for every tiny variant;
* weights: a schema row's KerasHub variable (`variable`, `backbone_value`:
  the paths themselves are `model/schema.py`'s) and `apply_deltas`;
* the frozen vision and audio towers of a multimodal checkpoint
  (`load_towers`): KerasHub's `Gemma4VisionEncoder` / `Gemma4AudioEncoder`
  with their weights ported by KerasHub's own HF converter.

Kernels are exchanged as 2-D (in, out) matrices, the transpose of the Hugging
Face `nn.Linear` weight. `keras_hub.src` is imported only here, and only where
KerasHub has no public API for the job (reading one file of a preset, mapping
an HF config without building the model). Raising the `keras-hub` bound in
pyproject.toml: run `tests/test_hub_contract.py`, `tests/test_modeling.py` and
`tests/test_plan.py` against the new release.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import keras_hub
import numpy as np

from gemma4_keras.model import hf_config, schema
from gemma4_keras.model.spec import BlockSpec, ModelSpec


class PresetError(ValueError):
    """A preset name or directory that cannot be loaded."""


# ----------------------------------------------------------------------------
# Loading through KerasHub's public API.


def preset_names() -> list[str]:
    """KerasHub's registered Gemma 4 preset names."""
    return sorted(keras_hub.models.Gemma4Backbone.presets)


def backbone_from_preset(preset: str, dtype: str):
    """`Gemma4Backbone.from_preset` (KerasHub name, hf://, kaggle://, directory).

    A local HF directory re-saved by current transformers (`global_head_dim`
    moved into `per_layer_config`) is shown to KerasHub normalised
    (`hf_config.keras_hub_view`), which it would otherwise build with the
    wrong global head size.
    """
    with hf_config.keras_hub_view(preset) as readable:
        return keras_hub.models.Gemma4Backbone.from_preset(readable, dtype=dtype)


def tokenizer_from_preset(preset: str):
    """`Gemma4Tokenizer.from_preset`."""
    return keras_hub.models.Gemma4Tokenizer.from_preset(preset)


def causal_lm(backbone, tokenizer=None):
    """A `Gemma4CausalLM` over `backbone`; with a preprocessor if `tokenizer`."""
    preprocessor = (
        None
        if tokenizer is None
        else keras_hub.models.Gemma4CausalLMPreprocessor(tokenizer)
    )
    return keras_hub.models.Gemma4CausalLM(backbone=backbone, preprocessor=preprocessor)


# The base class of `decoding.Gemma4LoraCausalLM`: KerasHub's generation
# contract (`compile(sampler=...)`, `generate`, the jitted `generate_step`).
CausalLM = keras_hub.models.CausalLM


def sampler(name_or_sampler):
    """A `keras_hub.samplers.Sampler` from a name ("greedy", "top_k", ...)."""
    return keras_hub.samplers.get(name_or_sampler)


def load_preset_json(preset: str) -> dict:
    """`config.json` of a KerasHub preset / hf:// / kaggle:// (may download).

    KerasHub has no public API that reads one file of a preset.
    """
    from keras_hub.src.utils.preset_utils import load_json  # the one internal

    return load_json(preset, "config.json")


def convert_hf_config(text_config: dict) -> dict:
    """KerasHub's own HF -> `Gemma4Backbone` kwargs mapping (text part only)."""
    # No public API maps an HF config without building (allocating) the model.
    from keras_hub.src.utils.transformers.convert_gemma4 import (  # internal
        convert_backbone_config,
    )

    # `model_type=gemma4_text` makes the converter read this dict as the text
    # config and build no vision/audio encoder (the plan is for the text decoder).
    return convert_backbone_config({**text_config, "model_type": "gemma4_text"})


def backbone_kwargs(config_json: dict) -> dict:
    """`Gemma4Backbone` constructor kwargs from either config.json format.

    A KerasHub preset's config.json is `{"class_name": ..., "config": kwargs}`;
    a Hugging Face one is mapped by KerasHub's converter (multimodal layout:
    its `text_config`).
    """
    if "class_name" in config_json and "config" in config_json:
        if "Gemma4" not in str(config_json["class_name"]):
            raise PresetError(
                f"config.json is a {config_json['class_name']}, not a Gemma 4 backbone"
            )
        return dict(config_json["config"])
    return convert_hf_config(hf_config.text_config(hf_config.normalise(config_json)))


# ----------------------------------------------------------------------------
# The architecture: one reader, from the backbone config.


def _kv_sources(kw: dict, is_global: list[bool]) -> dict[int, int]:
    """Shared layer -> source layer, as `Gemma4Backbone.__init__` assigns them."""
    n, shared = len(is_global), int(kw.get("num_kv_shared_layers") or 0)
    first = n - shared
    if shared <= 0:
        return {}
    if first == 0:  # assistant mode in KerasHub: sources 0 (local) / 1 (global)
        return {j: int(is_global[j]) for j in range(n)}
    out = {}
    for j in range(first, n):
        for k in range(first - 1, -1, -1):
            if is_global[k] == is_global[j]:
                out[j] = k
                break
    return out


def model_spec(config_json: dict) -> ModelSpec:
    """The `ModelSpec` of a config.json (HF or KerasHub), without building anything.

    Example:

        spec = model_spec(hf_config.read_config(directory))
    """
    return spec_from_config(backbone_kwargs(config_json))


def spec_from_config(kw: dict) -> ModelSpec:
    """The `ModelSpec` a backbone built from `kw` would give, without building it.

    Mirrors `Gemma4Backbone.__init__` / `Gemma4TextDecoderBlock` /
    `Gemma4TextAttention` (keras-hub 0.32): layer types from `layer_types` or
    `sliding_window_pattern`, global head dim, KV-shared sources, K=V on
    global layers when `num_global_key_value_heads` is set, double-wide MLP
    on KV-shared layers, PLE and MoE sizes.

    Example:
      >>> kw = backbone_kwargs(json.load(open(path / "config.json")))
      >>> spec_from_config(kw).num_layers
      4
    """
    n = int(kw["num_layers"])
    pattern = int(kw.get("sliding_window_pattern") or 6)
    types = kw.get("layer_types")
    is_global = [
        (types[i] == "full_attention") if types else (i % pattern == pattern - 1)
        for i in range(n)
    ]
    sources = _kv_sources(kw, is_global)
    use_sliding = bool(kw.get("use_sliding_window_attention", True))
    ngkv = kw.get("num_global_key_value_heads")
    blocks = []
    for i in range(n):
        g = is_global[i]
        head = (
            int(kw.get("global_head_dim") or kw["head_dim"])
            if g
            else int(kw["head_dim"])
        )
        k_eq_v = g and ngkv is not None
        # KerasHub would fail on a missing partial factor; 1.0 keeps the plan going.
        partial = (kw.get("global_rope_partial_rotary_factor") or 1.0) if g else 1.0
        raw_rot = int(partial * head)
        ffn = int(kw["intermediate_dim"])
        if kw.get("use_double_wide_mlp") and i in sources:
            ffn *= 2
        blocks.append(
            BlockSpec(
                index=i,
                is_global=g,
                head_dim=head,
                num_heads=int(kw["num_query_heads"]),
                num_kv_heads=int(ngkv if k_eq_v else kw["num_key_value_heads"]),
                sliding_window=(
                    int(kw.get("sliding_window_size", 512))
                    if use_sliding and not g
                    else None
                ),
                rope_wavelength=float(
                    (kw.get("global_rope_wavelength") or 1_000_000.0)
                    if g
                    else (kw.get("local_rope_wavelength") or 10_000.0)
                ),
                rope_scaling=float(
                    kw.get(
                        "global_rope_scaling_factor"
                        if g
                        else "local_rope_scaling_factor",
                        1.0,
                    )
                ),
                rotary_dim=max(2, raw_rot - raw_rot % 2),
                kv_source=sources.get(i),
                k_eq_v=k_eq_v,
                ffn_dim=ffn,
                attn_soft_cap=kw.get("attention_logit_soft_cap"),
            )
        )
    return ModelSpec(
        vocab_size=int(kw["vocabulary_size"]),
        hidden_dim=int(kw["hidden_dim"]),
        eps=float(kw.get("layer_norm_epsilon", 1e-6)),
        final_soft_cap=kw.get("final_logit_soft_cap"),
        ple_dim=int(kw.get("hidden_size_per_layer_input") or 0),
        moe=bool(kw.get("enable_moe_block", False)),
        num_experts=int(kw.get("num_experts") or 0),
        top_k=int(kw.get("num_experts_per_token", 8) or 0),
        expert_dim=int(kw.get("expert_intermediate_dim") or 0),
        blocks=tuple(blocks),
        ple_vocab_size=int(kw.get("vocab_size_per_layer_input") or 0)
        if kw.get("hidden_size_per_layer_input")
        else 0,
        vision_bidirectional=bool(kw.get("use_vision_bidirectional_attention")),
    )


# ----------------------------------------------------------------------------
# Weights: attribute paths on a KerasHub decoder block.


def _np(var) -> np.ndarray:
    return np.asarray(var.numpy() if hasattr(var, "numpy") else var)


def keras_to_2d(kernel: np.ndarray, layout: str) -> np.ndarray:
    """KerasHub kernel -> (in, out).

    heads_in: (heads, d, head_dim) -> (d, heads*head_dim); heads_out:
    (heads, head_dim, d) -> (heads*head_dim, d); plain: unchanged.
    """
    if layout == "heads_in":
        n, d, h = kernel.shape
        return kernel.transpose(1, 0, 2).reshape(d, n * h)
    if layout == "heads_out":
        n, h, d = kernel.shape
        return kernel.reshape(n * h, d)
    return kernel


def twod_to_keras(
    matrix: np.ndarray, layout: str, shape: tuple[int, ...]
) -> np.ndarray:
    """Inverse of `keras_to_2d` for a KerasHub kernel of `shape`."""
    if layout == "heads_in":
        n, d, h = shape
        return matrix.reshape(d, n, h).transpose(1, 0, 2)
    if layout == "heads_out":
        return matrix.reshape(shape)
    return matrix


def variable(backbone, row: schema.Row, layer: int | None = None):
    """The KerasHub variable of a schema row (`backbone.get_layer` + attributes)."""
    layer_name, _, path = row.keras_path(layer).partition(".")
    obj = backbone.get_layer(layer_name)
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(
                f"{row.keras_path(layer)}: the backbone has no such variable "
                f"(row {row.name!r} of model/schema.py)"
            )
    return obj


def backbone_value(backbone, row: schema.Row, layer: int | None = None) -> np.ndarray:
    """A row's value as we hold it (kernels (in, out)), read off a backbone."""
    return keras_to_2d(_np(variable(backbone, row, layer)), row.keras_layout)


class BackboneSource:
    """Schema rows read off a KerasHub `Gemma4Backbone` (any preset it loads).

    Values keep the backbone's dtype; the model stores each as
    `layers.storage_dtype` says, as the safetensors source does. `progress`
    (a tqdm bar) advances by the bytes read.
    """

    def __init__(self, backbone, progress=None):
        self.backbone, self.progress = backbone, progress

    def value(self, row: schema.Row, spec, layer: int | None) -> np.ndarray:
        value = backbone_value(self.backbone, row, layer)
        if self.progress is not None:
            self.progress.update(value.nbytes)
        return value

    def blocks(self, row: schema.Row, spec, layer: int | None):
        yield self.value(row, spec, layer)


def apply_deltas(backbone, deltas: dict, sign: float = 1.0) -> int:
    """Adds (sign=-1: removes) (in, out) deltas into a KerasHub backbone's kernels.

    Returns the number of kernels changed. Exact in float32; the kernels of a
    bfloat16 backbone are rounded once.
    """
    for (layer, target), delta in deltas.items():
        row = schema.row(target)
        layout = row.keras_layout
        try:
            var = variable(backbone, row, layer)
        except ValueError:
            raise ValueError(
                f"layer {layer} has no {target} (KV-shared layer?)"
            ) from None
        if tuple(var.shape) != tuple(
            twod_to_keras(delta, layout, tuple(var.shape)).shape
        ) or delta.size != int(np.prod(var.shape)):
            raise ValueError(
                f"layers.{layer}.{target}: adapter delta {delta.shape} does not fit "
                f"the base kernel {tuple(var.shape)} (adapter for another model?)"
            )
        d = twod_to_keras(delta, layout, tuple(var.shape))
        var.assign((_np(var).astype(np.float32) + sign * d).astype(_np(var).dtype))
    return len(deltas)


# ----------------------------------------------------------------------------
# The vision and audio towers of a multimodal checkpoint.


# The media part type each tower reads -> its config.json field.
TOWER_FIELDS = {"image": "vision_config", "audio": "audio_config"}


@dataclasses.dataclass
class Towers:
    """The frozen towers of a multimodal checkpoint and the ids they fill.

    Attributes:
        vision: a `keras_hub.models.Gemma4VisionEncoder` (patches -> soft
            tokens in the text embedding space, its projection included), or
            None.
        audio: a `keras_hub.models.Gemma4AudioEncoder` (log-mel -> soft
            tokens in the text embedding space), or None.
        image_token_id, audio_token_id: the soft-token ids their outputs replace.
        pad_token_id: what a soft token's id reads as for the embedding
            tables (transformers' `Gemma4Model.forward`).
    """

    vision: Any
    audio: Any
    image_token_id: int
    audio_token_id: int
    pad_token_id: int = 0

    def image_soft_tokens(self, pixel_values, position_ids):
        """([N * S, D] soft tokens, [N * S] valid) of N images, S = patches / pool**2.

        One tower call per image: KerasHub's pooling reads the pooled grid's
        width off the widest image of a call. An image's valid soft tokens
        are its first (real patches / pool**2), as transformers'
        `Gemma4VisionPooler` keeps them.
        """
        pool = self.vision.pool_size**2
        outs, valid = [], []
        for i in range(pixel_values.shape[0]):
            pos = jnp.asarray(position_ids[i], jnp.int32)
            pixels = jnp.asarray(pixel_values[i])[None, None]
            out = self.vision(
                {"pixel_values": pixels, "pixel_position_ids": pos[None, None]}
            )
            out = jnp.reshape(out, (-1, out.shape[-1]))
            real = jnp.sum(jnp.all(pos >= 0, axis=-1)) // pool
            outs.append(out)
            valid.append(jnp.arange(out.shape[0]) < real)
        return jnp.concatenate(outs), jnp.concatenate(valid)

    def audio_soft_tokens(self, features, mask):
        """([M * T', D] soft tokens, [M * T'] valid) of M clips.

        The tower's two stride-2 convolutions keep every 4th frame's mask.
        """
        out = self.audio(features, mask)
        valid = jnp.asarray(mask, bool)[:, ::4][:, : out.shape[1]]
        return jnp.reshape(out, (-1, out.shape[-1])), jnp.reshape(valid, (-1,))


def load_towers(directory: str, kinds: Sequence[str] = ("image", "audio")) -> Towers:
    """The vision and audio towers of a local HF multimodal checkpoint, float32.

    Built and filled by KerasHub's HF converter (`convert_gemma4.py`: its
    `convert_backbone_config` builds the encoders, its tower converters
    port the weights), without building the text decoder. Tests compare
    them with transformers' towers (tests/test_media_model.py). float32:
    KerasHub's `Gemma4VisionEncoder` builds itself in float32 whatever
    dtype it is given ("to match other frameworks"). Only the towers of
    `kinds` ("image": vision, "audio") are built: a tower the data never
    reads would hold device memory in every step.

    Raises:
        PresetError: the checkpoint lacks a tower of `kinds`.
    """
    # KerasHub has no public API that loads the towers alone.
    from keras_hub.src.utils.transformers import (  # internal
        convert_gemma4 as convert,
    )
    from keras_hub.src.utils.transformers.safetensor_utils import (  # internal
        SafetensorLoader,
    )

    config = hf_config.read_config(directory)
    fields = TOWER_FIELDS
    missing = [fields[k] for k in kinds if not config.get(fields[k])]
    if missing or not kinds:
        raise PresetError(
            f"{directory}: config.json has no "
            f"{' or '.join(missing or fields.values())}; "
            f"{' and '.join(kinds) or 'media'} need a multimodal Gemma 4 "
            "checkpoint with that tower"
        )
    # The converter builds every tower its config names.
    unused = [f for k, f in fields.items() if k not in kinds]
    kw = convert.convert_backbone_config(
        {k: v for k, v in config.items() if k not in unused}
    )
    vision, audio = kw.get("vision_encoder"), kw.get("audio_encoder")
    with SafetensorLoader(directory) as loader:
        if vision is not None:
            convert._convert_vision_encoder(vision, loader, config)
        if audio is not None:
            convert._convert_audio_encoder(audio, loader, config)
    for tower in (vision, audio):
        if tower is not None:
            tower.trainable = False
    text = hf_config.text_config(config)
    return Towers(
        vision=vision,
        audio=audio,
        image_token_id=int(config["image_token_id"]),
        audio_token_id=int(config.get("audio_token_id") or -1),
        pad_token_id=int(text.get("pad_token_id") or 0),
    )
