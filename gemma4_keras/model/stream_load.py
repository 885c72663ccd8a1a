"""Builds the training model straight from a checkpoint's tensors, one at a time.

KerasHub's `Gemma4Backbone.from_preset` builds the whole backbone in the
compute dtype before `Gemma4LoraModel.from_backbone` copies (and maybe
quantises) it: E2B peaked at 22.5 GB of host memory that way, for a 9.3 GB
checkpoint. This module reads the Hugging Face safetensors of a checkpoint
tensor by tensor, casts each to what the KerasHub backbone would have held,
hands it to the training model (which stores it, or quantises it to NF4 /
int8 / int4) and drops it, so the host holds the finished model plus one
tensor in flight.

The result equals, variable for variable and bit for bit, what
`Gemma4LoraModel.from_backbone(Gemma4Backbone.from_preset(dir, dtype=d))`
builds (`tests/test_stream_load.py`): both are `layers.fill_model` over the
rows of `model/schema.py`, which names each tensor the HF way and the
KerasHub way (KerasHub's `convert_gemma4.py` is the model); this module is
the safetensors source (`SafetensorsSource`), `hub.BackboneSource` the other.

Usage:

    model = stream_load.stream_training_model(
        "/path/to/gemma-4-E2B-it", LoraSpec(rank=16),
        dtype="bfloat16", quant="nf4", double_quant=True,
    )
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import tqdm

from gemma4_keras.model import hf_config, hub, safetensors_io, schema
from gemma4_keras.model.gemma4_lora_model import Gemma4LoraModel
from gemma4_keras.model.layers import cast, fill_model, storage_dtype
from gemma4_keras.model.lora import LoraSpec
from gemma4_keras.model.safetensors_io import CheckpointError
from gemma4_keras.model.spec import ModelSpec

_FLOATS = {safetensors_io.DTYPES[k] for k in ("F64", "F32", "F16", "BF16")}


# ----------------------------------------------------------------------------
# Reading single tensors.


class CheckpointReader:
    """Single tensors of a safetensors checkpoint, read on demand, shape-checked.

    Reads the (small) headers of every shard up front, then each tensor with
    plain reads into a fresh aligned array (`safetensors_io`).

    Example:

        reader = CheckpointReader("/path/to/checkpoint")
        emb = reader.read("model.embed_tokens.weight", (262144, 1536))
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        self._refs = safetensors_io.tensor_refs(self.directory)

    def __contains__(self, name: str) -> bool:
        return name in self._refs

    def names(self) -> list[str]:
        return sorted(self._refs)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._ref(name).shape

    def nbytes(self, name: str) -> int:
        """Bytes of tensor `name` as stored (what reading it allocates)."""
        return self._ref(name).nbytes

    def _ref(self, name: str) -> safetensors_io.TensorRef:
        try:
            return self._refs[name]
        except KeyError:
            raise CheckpointError(
                f"{self.directory}: the checkpoint has no tensor {name!r} "
                "(config.json implies it; an incomplete or mismatched checkpoint)"
            ) from None

    def read(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Tensor `name`, which must have `shape`, as a fresh aligned array."""
        return safetensors_io.read_tensor(self._checked(name, shape))

    def blocks(self, name: str, shape: tuple[int, ...]) -> Iterator[np.ndarray]:
        """Tensor `name` (of `shape`) as consecutive blocks of rows (<= 64 MiB)."""
        return safetensors_io.read_blocks(self._checked(name, shape))

    def _checked(self, name: str, shape: tuple[int, ...]) -> safetensors_io.TensorRef:
        ref = self._ref(name)
        if ref.shape != tuple(shape):
            raise CheckpointError(
                f"{ref.path}: tensor {name!r} has shape {ref.shape}, config.json "
                f"implies {tuple(shape)}"
            )
        if ref.dtype not in _FLOATS:
            raise CheckpointError(
                f"{ref.path}: tensor {name!r} has dtype {ref.dtype}; expected a "
                "float (float32, bfloat16, float16, float64)"
            )
        return ref


# ----------------------------------------------------------------------------
# The architecture, from config.json alone.


def text_prefix(config: dict, reader: CheckpointReader) -> str:
    """Where the text decoder's tensors live, e.g. `model.language_model.`.

    The candidates KerasHub's converter tries (`_resolve_prefix`), in its
    order, for each `model_type`.
    """
    if config.get("model_type", "gemma4") == "gemma4_text":
        candidates = ("model.", "language_model.", "")
    else:
        candidates = ("model.language_model.", "language_model.")
    embedding = schema.row("embedding").hf
    for prefix in candidates:
        if prefix + embedding in reader:
            return prefix
    tried = ", ".join(p + embedding for p in candidates)
    raise CheckpointError(
        f"{reader.directory}: no text decoder embedding found (tried {tried})"
    )


# ----------------------------------------------------------------------------
# Filling the model.


class SafetensorsSource:
    """Schema rows read from a checkpoint's HF tensors, in their storage dtype.

    Each tensor is cast to `layers.storage_dtype(its dtype, compute dtype)`:
    a float32 checkpoint under bfloat16 compute is rounded where KerasHub's
    backbone would round it; a bfloat16 checkpoint stays bfloat16 under
    float32 compute (the step upcasts per use). `progress` advances by the
    bytes read.
    """

    def __init__(
        self, reader: CheckpointReader, prefix: str, dtype: str, progress=None
    ):
        self.reader, self.prefix, self.dtype = reader, prefix, dtype
        self.progress = progress
        self._fused: tuple[str, np.ndarray] | None = None  # the last fused tensor

    def _hf(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        arr = self.reader.read(self.prefix + name, shape)
        self._advance(arr.nbytes)
        return cast(arr, storage_dtype(arr.dtype, self.dtype))

    def value(self, row: schema.Row, spec: ModelSpec, layer: int | None) -> np.ndarray:
        """The row's value as we hold it (a transposed view for `nn.Linear`s)."""
        block = None if layer is None else spec.blocks[layer]
        name, shape = row.hf_name(layer), row.hf_shape(spec, block)
        if row.fused is None:
            return row.to_ours(self._hf(name, shape))
        # The parts of one HF tensor come one after the other: read it once.
        if self._fused is None or self._fused[0] != name:
            self._fused = None
            self._fused = (name, self._hf(name, shape))
        value = row.to_ours(self._fused[1])
        if row.fused[0] == row.fused[1] - 1:
            self._fused = None
        return value

    def blocks(self, row: schema.Row, spec: ModelSpec, layer: int | None):
        """`value` as blocks of rows: a multi-GB table is never read whole."""
        if row.hf_layout != "same":
            yield self.value(row, spec, layer)
            return
        shape = row.hf_shape(spec, None if layer is None else spec.blocks[layer])
        for block in self.reader.blocks(self.prefix + row.hf_name(layer), shape):
            self._advance(block.nbytes)
            yield cast(block, storage_dtype(block.dtype, self.dtype))

    def _advance(self, nbytes: int) -> None:
        if self.progress is not None:
            self.progress.update(nbytes)


def fill_from_checkpoint(
    model: Gemma4LoraModel, directory: str | os.PathLike, config: dict, **options
) -> None:
    """`fill_model` from `directory`'s safetensors, with a progress bar."""
    reader = CheckpointReader(directory)
    prefix = text_prefix(config, reader)
    total = sum(reader.nbytes(n) for n in reader.names() if n.startswith(prefix))
    # On a terminal only (`disable=None`): E2B/E4B take minutes to load.
    what = f"loading {os.path.basename(os.path.normpath(directory))}"
    if options.get("quant", "none") != "none":
        what += f" ({options['quant']})"
    with tqdm.tqdm(
        total=total, desc=what, unit="B", unit_scale=True, disable=None, leave=False
    ) as progress:
        source = SafetensorsSource(reader, prefix, model.variable_dtype, progress)
        fill_model(model, source, **options)


def local_checkpoint(preset: str) -> str | None:
    """The local HF checkpoint directory a resolved preset names, else None.

    A local directory with `config.json` (and no KerasHub `metadata.json`)
    is one; `hf://org/repo` is downloaded (huggingface_hub's cache, the
    files KerasHub would fetch; `HF_TOKEN` for gated repos) and its snapshot
    directory returned. KerasHub preset names and `kaggle://` give None: their
    weights are a KerasHub `model.weights.h5`, which this module does not read.
    """
    preset = str(preset)
    if preset.startswith("hf://"):
        from huggingface_hub import snapshot_download  # only for hf:// presets

        return snapshot_download(
            preset.removeprefix("hf://"),
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"],
        )
    if os.path.isdir(preset) and not os.path.exists(
        os.path.join(preset, "metadata.json")
    ):
        return preset
    return None


def stream_training_model(
    directory: str | os.PathLike,
    lora: LoraSpec | None = None,
    *,
    dtype: str = "float32",
    quant: str = "none",
    double_quant: bool = False,
    block_size: int = 64,
    remat: bool = False,
    loss_chunk_size: int = 1024,
    moe_dispatch: str = "auto",
    ple_on_host: bool = False,
) -> Gemma4LoraModel:
    """The training model of a local HF checkpoint, read tensor by tensor.

    Arguments as `Gemma4LoraModel.from_backbone`; `dtype` is what
    `Gemma4Backbone.from_preset(directory, dtype=...)` would have been given.
    Call it under `presets.on_host()` to keep the weights in host memory.

    Raises:
        hf_config.ConfigError: a config.json that cannot be read.
        CheckpointError: a missing shard or tensor, or a tensor of the wrong
            shape (one line naming the file and the tensor).

    Example:

        with presets.on_host():
            model = stream_training_model(path, LoraSpec(rank=8), dtype="bfloat16",
                                        quant="nf4", double_quant=True)
    """
    config = hf_config.read_config(directory)
    model = Gemma4LoraModel(
        hub.model_spec(config),
        remat=remat,
        loss_chunk_size=loss_chunk_size,
        ple_on_host=ple_on_host,
        name="gemma4_lora_model",
        dtype=dtype,
    )
    fill_from_checkpoint(
        model,
        directory,
        config,
        quant=quant,
        double_quant=double_quant,
        block_size=block_size,
    )
    return model.finish_loading(lora, moe_dispatch)


__all__ = [
    "CheckpointError",
    "CheckpointReader",
    "SafetensorsSource",
    "fill_from_checkpoint",
    "fill_model",
    "stream_training_model",
    "local_checkpoint",
    "text_prefix",
]
