"""Random-weight Gemma 4 checkpoints at the released dimensions.

Memory is a property of the real sizes: a tiny model proves a code path
correct, not that it fits. This module writes a Hugging Face checkpoint with
the released `config.json` of a size and seeded random bfloat16 weights,
in the released `Gemma4ForConditionalGeneration` key layout
(`model.language_model.*`; with `towers=True` also the vision tower, and
the audio tower of E2B/E4B, under transformers' names) as sharded
safetensors with `model.safetensors.index.json`, plus the shipped tiny
tokenizer (the model keeps the real 262,144-entry vocabulary):

    path = full_size.full_size_checkpoint("e2b")    # ~9.3 GB, cached
    full_size.write_full_size(d, "31b", weights=False)   # config.json only
    config = full_size.released_config("e4b", towers=True, layers=12)
    full_size.write_checkpoint(d, config)  # released widths, 12 decoder layers

Weights are generated and written in pieces of at most `CHUNK_BYTES`, so
writing never holds even one whole tensor (E2B's per-layer-embedding table
is 4.7 GB). E2B is ~9.3 GB and E4B ~16 GB on disk; 26B-A4B (~52 GB) and 31B
(~62 GB) fit neither this disk nor its memory: use `weight_specs` /
`parameter_count` (no memory spent) or `weights=False`.

The text configs are those of transformers' `convert_gemma4_weights.py`
(`_VARIANTS`), completed with `Gemma4TextConfig`'s defaults, with
`global_head_dim` at the top level as the released files carry it. The
towers' configs are `Gemma4VisionConfig`'s and `Gemma4AudioConfig`'s
defaults (the released E2B/E4B towers: a 16-layer, 768-wide vision encoder
of ~169M parameters; a 12-layer, 1024-wide conformer of ~309M). Like
the released checkpoints (`shared/GEMMA4.md`, "What serving stacks
expect"), the KV-shared layers carry K/V projections (and a K norm) that
the model never uses (`shared_kv_weights=False` leaves them out, as
transformers' own `save_pretrained` does).

The benchmark entry point is `benchmarks/load_memory.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
import zlib

import ml_dtypes
import numpy as np

from gemma4_keras.model import hub, safetensors_io, schema
from gemma4_keras.testing import tiny

SIZES = ("e2b", "e4b", "26b_a4b", "31b")
CHUNK_BYTES = 64 << 20  # largest piece of a tensor generated at once
DEFAULT_SHARD_BYTES = 4 << 30
INDEX_FILE = "model.safetensors.index.json"
# Bump when the files written change, so stale caches are not reused.
FORMAT_VERSION = 1
_SLIDING, _FULL = "sliding_attention", "full_attention"

# Per size: the fields transformers' convert_gemma4_weights.py sets.
_VARIANTS: dict[str, dict] = {
    "e2b": dict(
        hidden_size=1536,
        hidden_size_per_layer_input=256,
        intermediate_size=6144,
        num_hidden_layers=35,
        layer_types=([_SLIDING] * 4 + [_FULL]) * 7,
        num_attention_heads=8,
        num_key_value_heads=1,
        num_kv_shared_layers=20,
        use_double_wide_mlp=True,
    ),
    "e4b": dict(
        hidden_size=2560,
        hidden_size_per_layer_input=256,
        intermediate_size=10240,
        num_hidden_layers=42,
        layer_types=([_SLIDING] * 5 + [_FULL]) * 7,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_kv_shared_layers=18,
    ),
    "26b_a4b": dict(
        hidden_size=2816,
        hidden_size_per_layer_input=0,
        intermediate_size=2112,
        num_hidden_layers=30,
        layer_types=([_SLIDING] * 5 + [_FULL]) * 5,
        num_attention_heads=16,
        num_key_value_heads=8,
        num_global_key_value_heads=2,
        attention_k_eq_v=True,
        use_bidirectional_attention="vision",
        enable_moe_block=True,
        num_experts=128,
        moe_intermediate_size=704,
        top_k_experts=8,
        sliding_window=1024,
        max_position_embeddings=262144,
    ),
    "31b": dict(
        hidden_size=5376,
        hidden_size_per_layer_input=0,
        intermediate_size=21504,
        num_hidden_layers=60,
        layer_types=([_SLIDING] * 5 + [_FULL]) * 10,
        num_attention_heads=32,
        num_key_value_heads=16,
        num_global_key_value_heads=4,
        attention_k_eq_v=True,
        use_bidirectional_attention="vision",
        sliding_window=1024,
        max_position_embeddings=262144,
    ),
}

# `Gemma4Config` (multimodal wrapper) token ids of the released vocabulary.
_MULTIMODAL_IDS = dict(
    boi_token_id=255999,
    eoi_token_id=258882,
    image_token_id=258880,
    video_token_id=258884,
    boa_token_id=256000,
    eoa_token_index=258883,
    audio_token_id=258881,
)


def released_config(size: str, towers: bool = False, layers: int | None = None) -> dict:
    """The released `config.json` of `size`.

    `Gemma4ForConditionalGeneration` layout: the text config under
    `text_config`. Without `towers`, `vision_config` / `audio_config` are
    left out (KerasHub builds a vision encoder whenever the key exists);
    with it, the vision tower (every size) and the audio tower (E2B, E4B)
    are in (`tiny.tower_configs` at transformers' defaults; needs
    transformers). `layers` keeps the first `layers` decoder layers at the
    released widths (the KV-shared ones in proportion): a model whose step
    compiles in less memory, for measuring what does not depend on depth.

    Example:

        >>> text = released_config("e2b")["text_config"]
        >>> text["hidden_size"], text["num_kv_shared_layers"], text["global_head_dim"]
        (1536, 20, 512)
    """
    if size not in _VARIANTS:
        raise ValueError(f"size={size!r}: expected one of {SIZES}")
    text = json.loads(json.dumps({**tiny.TEXT_DEFAULTS, **_VARIANTS[size]}))
    if layers is not None:
        full = text["num_hidden_layers"]
        shared = text.get("num_kv_shared_layers") or 0
        text.update(
            num_hidden_layers=layers,
            layer_types=text["layer_types"][:layers],
            num_kv_shared_layers=round(shared * layers / full),
        )
    config = tiny.conditional_generation(text, _MULTIMODAL_IDS)
    if towers:
        audio = {} if size in ("e2b", "e4b") else None
        config.update(tiny.tower_configs(vision={}, audio=audio))
    return config


# ----------------------------------------------------------------------------
# Tensor names and shapes (no memory spent).


def weight_specs(
    config: dict, shared_kv_weights: bool = True
) -> dict[str, tuple[tuple[int, ...], str]]:
    """{HF tensor name: (shape, init kind)} in checkpoint order (by layer).

    `tiny.weight_shapes` (what transformers builds), plus, with
    `shared_kv_weights`, the K/V projections and K norm the released files
    carry for KV-shared layers.

    Example:

        >>> specs = weight_specs(released_config("e2b"))
        >>> specs["model.language_model.embed_tokens_per_layer.weight"][0]
        (262144, 8960)
    """
    specs = tiny.weight_shapes(config)
    if shared_kv_weights:
        specs.update(_shared_kv_specs(config))
    return dict(sorted(specs.items(), key=lambda item: _order_key(item[0])))


def _shared_kv_specs(config: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """The schema's K/V rows of the KV-shared layers, as if they owned K/V."""
    spec = hub.model_spec(config)
    owning = dataclasses.replace(
        spec,
        blocks=tuple(dataclasses.replace(b, kv_source=None) for b in spec.blocks),
    )
    prefix = "model.language_model." if "text_config" in config else "model."
    out = {}
    for b in spec.blocks:
        have = {r.name for r in schema.block_rows(spec, b.index)}
        for row in schema.block_rows(owning, b.index):
            if row.name not in have:
                shape = row.hf_shape(owning, owning.blocks[b.index])
                out[prefix + row.hf_name(b.index)] = (shape, tiny.init_kind(row, shape))
    return out


def _order_key(name: str) -> tuple[int, str]:
    """Globals first, then layer by layer (not `layers.10` before `layers.2`)."""
    parts = name.split("layers.", 1)
    if len(parts) == 2 and parts[1].split(".", 1)[0].isdigit():
        return int(parts[1].split(".", 1)[0]), name
    return -1, name


def parameter_count(config: dict, shared_kv_weights: bool = True) -> int:
    """Parameters of the text decoder's checkpoint tensors.

    Example:

        >>> round(parameter_count(released_config("e2b"), False) / 1e9, 2)
        4.63
    """
    specs = weight_specs(config, shared_kv_weights)
    return sum(math.prod(shape) for shape, _ in specs.values())


# ----------------------------------------------------------------------------
# Generating one tensor in pieces.


def _pieces(seed: int, name: str, shape: tuple[int, ...], kind: str):
    """bfloat16 pieces (C order) of one tensor, each at most `CHUNK_BYTES`.

    Scales keep a forward pass at these widths finite and O(1): matrices
    N(0, 0.5 / sqrt(fan_in)) as `tiny`; embeddings N(0, 2 / sqrt(d)), so
    tied logits stay well inside the soft-cap; norms 1 + N(0, 0.1).
    """
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    total = math.prod(shape)
    step = max(1, CHUNK_BYTES // 2)
    for start in range(0, total, step):
        n = min(step, total - start)
        if kind == "scalar":
            x = rng.uniform(0.6, 1.0, n).astype(np.float32)
        elif kind in ("clip_min", "clip_max"):  # a tower's clipping bounds
            x = rng.uniform(1.0, 3.0, n).astype(np.float32)
            x *= np.float32(-1 if kind == "clip_min" else 1)
        elif kind in ("small", "conv"):  # tower biases, position tables, convs
            fan_in = math.prod(shape[1:]) if kind == "conv" else 400
            x = rng.standard_normal(n, dtype=np.float32)
            x *= np.float32(0.5 / math.sqrt(fan_in))
        else:
            x = rng.standard_normal(n, dtype=np.float32)
            if kind == "norm":
                x = x * np.float32(0.1) + np.float32(1.0)
            else:
                x *= np.float32(
                    (2.0 if kind == "embedding" else 0.5) / math.sqrt(shape[-1])
                )
        yield x.astype(ml_dtypes.bfloat16)


# ----------------------------------------------------------------------------
# Writing safetensors shard by shard.


def write_weights(
    path: str | os.PathLike,
    config: dict,
    *,
    seed: int = 0,
    shared_kv_weights: bool = True,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> list[str]:
    """Writes the safetensors shards and their index; returns the files.

    Tensor by tensor, piece by piece (`safetensors_io.write_sharded`).
    """
    specs = weight_specs(config, shared_kv_weights)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    entries = [(name, bf16, shape) for name, (shape, _) in specs.items()]
    return safetensors_io.write_sharded(
        str(path),
        entries,
        lambda name: _pieces(seed, name, *specs[name]),
        max_shard_bytes,
    )


def write_checkpoint(
    path: str | os.PathLike,
    config: dict,
    *,
    seed: int = 0,
    weights: bool = True,
    shared_kv_weights: bool = True,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> pathlib.Path:
    """Writes a bfloat16, sharded checkpoint of any Gemma 4 `config`.

    `tiny.write_support_files` writes the config, tokenizer and generation
    files; `weights=False` stops there (a directory to plan from).

    Example:

        write_checkpoint(d, tiny.tiny_hf_config(layout="conditional_generation"),
                         max_shard_bytes=100_000)
    """
    path = tiny.write_support_files(path, config)
    if weights:
        _check_disk(path, config, shared_kv_weights)
        write_weights(
            path,
            config,
            seed=seed,
            shared_kv_weights=shared_kv_weights,
            max_shard_bytes=max_shard_bytes,
        )
    return path


def _check_disk(path: pathlib.Path, config: dict, shared_kv_weights: bool) -> None:
    need = 2 * parameter_count(config, shared_kv_weights)
    free = shutil.disk_usage(path).free
    if need + (1 << 30) > free:
        raise OSError(
            f"{path}: writing this checkpoint needs {need / 2**30:.1f} GiB, the "
            f"disk has {free / 2**30:.1f} GiB free; use weights=False for a "
            "config-only directory"
        )


def write_full_size(
    path: str | os.PathLike,
    size: str,
    *,
    seed: int = 0,
    towers: bool = False,
    layers: int | None = None,
    **kwargs,
) -> pathlib.Path:
    """`write_checkpoint(path, released_config(size, towers, layers), ...)`."""
    config = released_config(size, towers, layers)
    return write_checkpoint(path, config, seed=seed, **kwargs)


def cache_dir(size: str) -> pathlib.Path:
    """`$GEMMA4_KERAS_CACHE/full_size/<size>` (default `~/.cache/gemma4_keras/...`)."""
    root = os.environ.get(tiny.CACHE_ENV_VAR)
    base = (
        pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "gemma4_keras"
    )
    return base / "full_size" / f"{size}-v{FORMAT_VERSION}"


def full_size_checkpoint(
    size: str, *, seed: int = 0, towers: bool = False, layers: int | None = None
) -> pathlib.Path:
    """The cached random-weight checkpoint of `size`, written on first use.

    `towers`, `layers` as `released_config` (each variant has its own cache
    directory). Never written inside the repository (`tiny.write_once`);
    delete the cache directory to free the disk.
    """
    name = size + ("-towers" if towers else "") + (f"-{layers}layers" if layers else "")
    final = cache_dir(name) if seed == 0 else cache_dir(f"{name}-seed{seed}")
    return tiny.write_once(
        final,
        lambda tmp: write_full_size(tmp, size, seed=seed, towers=towers, layers=layers),
    )


__all__ = [
    "SIZES",
    "cache_dir",
    "full_size_checkpoint",
    "parameter_count",
    "released_config",
    "weight_specs",
    "write_checkpoint",
    "write_full_size",
    "write_weights",
]
