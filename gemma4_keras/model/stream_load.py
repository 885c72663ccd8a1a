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
builds (`tests/test_stream_load.py`). The name and layout mapping is
KerasHub's `convert_gemma4.py` (the reader) and `hub.copy_from_backbone`
(what the training model is filled with): every HF `nn.Linear` weight
(out, in) becomes the (in, out) kernel `hub.keras_to_2d` would give, i.e. its
transpose.

Usage:

    model = stream_load.stream_training_model(
        "/path/to/gemma-4-E2B-it", LoraSpec(rank=16),
        dtype="bfloat16", quant="nf4", double_quant=True,
    )
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from gemma4_keras import host_memory
from gemma4_keras.model import hf_config, hub, safetensors_io
from gemma4_keras.model.gemma4_lora_model import PLE_TABLE, Gemma4LoraModel, HostTable
from gemma4_keras.model.layers import np_dtype, storage_dtype
from gemma4_keras.model.lora import LoraSpec
from gemma4_keras.model.safetensors_io import CheckpointError, aligned_empty
from gemma4_keras.model.spec import ATTN_TARGETS, ModelSpec

_FLOATS = {safetensors_io.DTYPES[k] for k in ("F64", "F32", "F16", "BF16")}

# our norm name -> HF name under `layers.N.` (KerasHub: convert_gemma4.py)
HF_NORMS = {
    "pre_attn": "input_layernorm.weight",
    "post_attn": "post_attention_layernorm.weight",
    "pre_ffw": "pre_feedforward_layernorm.weight",
    "post_ffw": "post_feedforward_layernorm.weight",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
    "post_ffw_dense": "post_feedforward_layernorm_1.weight",
    "pre_ffw_moe": "pre_feedforward_layernorm_2.weight",
    "post_ffw_moe": "post_feedforward_layernorm_2.weight",
    "post_ple": "post_per_layer_input_norm.weight",
}
# our extra name -> (HF name under `layers.N.`, is an nn.Linear weight)
HF_EXTRAS = {
    "ple_gate": ("per_layer_input_gate.weight", True),
    "ple_up": ("per_layer_projection.weight", True),
    "router_scale": ("router.scale", False),
    "router_proj": ("router.proj.weight", True),
    "expert_scale": ("router.per_expert_scale", False),
}


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


def model_spec(config: dict) -> ModelSpec:
    """The `ModelSpec` of a (normalised) HF config, without building anything.

    Example:

        spec = model_spec(hf_config.read_config(directory))
    """
    return hub.spec_from_config(hub.backbone_kwargs(config))


def text_prefix(config: dict, reader: CheckpointReader) -> str:
    """Where the text decoder's tensors live, e.g. `model.language_model.`.

    The candidates KerasHub's converter tries (`_resolve_prefix`), in its
    order, for each `model_type`.
    """
    if config.get("model_type", "gemma4") == "gemma4_text":
        candidates = ("model.", "language_model.", "")
    else:
        candidates = ("model.language_model.", "language_model.")
    for prefix in candidates:
        if f"{prefix}embed_tokens.weight" in reader:
            return prefix
    tried = ", ".join(f"{p}embed_tokens.weight" for p in candidates)
    raise CheckpointError(
        f"{reader.directory}: no text decoder embedding found (tried {tried})"
    )


# ----------------------------------------------------------------------------
# Filling the model.


@dataclasses.dataclass(frozen=True)
class _Source:
    """Reads HF tensors of one checkpoint in their storage dtype.

    Each tensor is cast to `layers.storage_dtype(its dtype, compute dtype)`:
    a float32 checkpoint under bfloat16 compute is rounded where KerasHub's
    backbone would round it; a bfloat16 checkpoint stays bfloat16 under
    float32 compute (the step upcasts per use).
    """

    reader: CheckpointReader
    prefix: str
    dtype: str  # the compute dtype
    progress: tqdm.tqdm | None = None  # advanced by the bytes read

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        arr = self.reader.read(self.prefix + name, shape)
        self._advance(arr.nbytes)
        return _cast(arr, storage_dtype(arr.dtype, self.dtype))

    def rows(self, name: str, shape: tuple[int, ...]) -> Iterator[np.ndarray]:
        """`get`, as blocks of rows (a multi-GB table is never read whole)."""
        for block in self.reader.blocks(self.prefix + name, shape):
            self._advance(block.nbytes)
            yield _cast(block, storage_dtype(block.dtype, self.dtype))

    def _advance(self, nbytes: int) -> None:
        if self.progress is not None:
            self.progress.update(nbytes)

    def linear(self, name: str, shape_in_out: tuple[int, int]) -> np.ndarray:
        """An HF (out, in) weight as the (in, out) kernel (a transposed view)."""
        din, dout = shape_in_out
        return self.get(name, (dout, din)).T


def _cast(arr: np.ndarray, dtype: str) -> np.ndarray:
    target = np_dtype(dtype)
    if arr.dtype == target:
        return arr
    out = aligned_empty(arr.shape, target)
    np.copyto(out, arr, casting="unsafe")  # the same rounding as `astype`
    return out


# Made by XLA, so the buffer can be donated (eager `jnp.zeros` could not).
_zeros = jax.jit(jnp.zeros, static_argnums=(0, 1))


@functools.partial(jax.jit, donate_argnums=0)
def _put_rows(buffer: jax.Array, rows: jax.Array, first) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(buffer, rows, first, axis=0)


def _owned_array(shape: tuple[int, ...], dtype, blocks) -> jax.Array:
    """A JAX array of `shape`, filled from consecutive blocks of rows.

    XLA owns its buffer. A JAX array that adopts a numpy buffer
    (`jax.device_put(x, may_alias=True)`) cannot be donated: the first
    train step (Keras donates the whole state) then copied every such
    frozen table, and E2B held its tables twice. Filling a donated buffer
    in place keeps the peak at the table plus one block.
    """
    buffer = _zeros(shape, dtype)
    first = 0
    for rows in blocks:
        buffer = _put_rows(buffer, rows, first)
        first += len(rows)
    return buffer


def _add_global(model: Gemma4LoraModel, name: str, shape, blocks, dtype=None) -> None:
    """`model.add_global` of a tensor given as blocks of rows, without copies.

    `add_global` creates the variable with zeros, then assigns a numpy
    array, which JAX copies (through a staging buffer): E2B's 4.7 GB
    per-layer-embedding table was alive three times at once (14.7 GB peak
    RSS). Here the variable is created from an array filled block by block
    (`_owned_array`): the table plus one block of rows. Same name, dtype and
    value as `add_global`.
    """
    blocks = iter(blocks)
    first = next(blocks)
    storage = storage_dtype(first.dtype, dtype or model.variable_dtype)
    blocks = (_cast(b, storage) for b in itertools.chain([first], blocks))
    if name == PLE_TABLE and model.ple_on_host:
        table = aligned_empty(tuple(shape), np_dtype(storage))
        start = 0
        for b in blocks:
            table[start : start + len(b)] = b
            start += len(b)
        model.globals[name] = HostTable(table, storage)  # stays in host memory
        return
    # Under `presets.on_host()` the default device is the CPU.
    pending = [_owned_array(tuple(shape), storage, blocks)]
    model.globals[name] = model.add_weight(
        name=name,
        shape=tuple(shape),
        dtype=storage,
        # Hands the array over once: a closure holding it would keep a second
        # copy alive once Keras lays the variable out on a mesh.
        initializer=lambda shape, dtype: pending.pop(),
        trainable=False,
    )


def fill_globals(model: Gemma4LoraModel, src: _Source, config: dict) -> None:
    """Embedding, final norm and the PLE tables, in `hub.copy_from_backbone`'s order."""
    spec, d = model.spec, model.spec.hidden_dim
    shape = (spec.vocab_size, d)
    _add_global(model, "embedding", shape, src.rows("embed_tokens.weight", shape))
    _add_global(model, "final_norm", (d,), [src.get("norm.weight", (d,))], "float32")
    if spec.ple_dim:
        text = hf_config.text_config(config)
        width = spec.num_layers * spec.ple_dim
        vocab = int(text.get("vocab_size_per_layer_input") or spec.vocab_size)
        shape = (vocab, width)
        table = src.rows("embed_tokens_per_layer.weight", shape)
        _add_global(model, "ple_embedding", shape, table)
        projection = src.linear("per_layer_model_projection.weight", (d, width))
        _add_global(model, "ple_projection", (d, width), [projection])
        norm = src.get("per_layer_projection_norm.weight", (spec.ple_dim,))
        _add_global(model, "ple_norm", (spec.ple_dim,), [norm], "float32")


def _norm_shapes(spec: ModelSpec, layer: int) -> dict[str, tuple[int, ...]]:
    """Our norm name -> shape, in the order `hub._copy_block` adds them."""
    b, d = spec.blocks[layer], (spec.hidden_dim,)
    shapes = {
        "pre_attn": d,
        "post_attn": d,
        "pre_ffw": d,
        "post_ffw": d,
        "q_norm": (b.head_dim,),
    }
    if b.has_kv:
        shapes["k_norm"] = (b.head_dim,)
    if spec.moe:
        shapes.update(post_ffw_dense=d, pre_ffw_moe=d, post_ffw_moe=d)
    if spec.ple_dim:
        shapes["post_ple"] = d
    return shapes


def _extra_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Our extra name -> Keras shape ((in, out) for linear weights), PLE then MoE."""
    d, p, e = spec.hidden_dim, spec.ple_dim, spec.num_experts
    shapes = {}
    if p:
        shapes.update(ple_gate=(d, p), ple_up=(p, d))
    if spec.moe:
        shapes.update(router_scale=(d,), router_proj=(d, e), expert_scale=(e,))
    return shapes


def fill_block(blk, src: _Source, quant: str, double_quant: bool, block_size: int):
    """One decoder block's norms, projections, extras and expert banks."""
    spec, i = blk.spec, blk.bspec.index
    layer = f"layers.{i}."
    for name, shape in _norm_shapes(spec, i).items():
        blk.add_norm(name, src.get(layer + HF_NORMS[name], shape))
    for target in hub.KERAS_KERNELS:
        if spec.has_projection(i, target):
            group = "self_attn" if target in ATTN_TARGETS else "mlp"
            kernel = src.linear(
                f"{layer}{group}.{target}.weight", spec.projection_shape(i, target)
            )
            blk.add_projection(target, kernel, quant, double_quant, block_size)
    blk.add_extra("layer_scalar", src.get(layer + "layer_scalar", (1,)).reshape(()))
    for name, shape in _extra_shapes(spec).items():
        hf_name, is_linear = HF_EXTRAS[name]
        if is_linear:
            value = src.linear(layer + hf_name, shape)
        else:
            value = src.get(layer + hf_name, shape)
        blk.add_extra(name, value)
    if spec.moe:
        _fill_banks(blk, src, layer, quant, double_quant, block_size)


def _fill_banks(blk, src: _Source, layer: str, quant, double_quant, block_size):
    """HF `experts.gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I) ->
    KerasHub banks gate / up (E, H, I) and down (E, I, H)."""
    spec = blk.spec
    e, d, m = spec.num_experts, spec.hidden_dim, spec.expert_dim
    gate_up = src.get(layer + "experts.gate_up_proj", (e, 2 * m, d))
    for name, part in (
        ("experts_gate", gate_up[:, :m]),
        ("experts_up", gate_up[:, m:]),
    ):
        blk.add_bank(name, part.transpose(0, 2, 1), quant, double_quant, block_size)
    del gate_up
    down = src.get(layer + "experts.down_proj", (e, d, m))
    blk.add_bank(
        "experts_down", down.transpose(0, 2, 1), quant, double_quant, block_size
    )


def fill_model(
    model: Gemma4LoraModel,
    directory: str | os.PathLike,
    config: dict,
    *,
    quant: str = "none",
    double_quant: bool = False,
    block_size: int = 64,
) -> None:
    """Fills an empty `Gemma4LoraModel` from `directory`'s safetensors.

    The streaming counterpart of `hub.copy_from_backbone`: same variables,
    same order, same values.
    """
    reader = CheckpointReader(directory)
    prefix = text_prefix(config, reader)
    total = sum(reader.nbytes(n) for n in reader.names() if n.startswith(prefix))
    # On a terminal only (`disable=None`): E2B/E4B take minutes to load.
    what = f"loading {os.path.basename(os.path.normpath(directory))}"
    if quant != "none":
        what += f" ({quant})"
    with tqdm.tqdm(
        total=total, desc=what, unit="B", unit_scale=True, disable=None, leave=False
    ) as progress:
        src = _Source(reader, prefix, model.variable_dtype, progress)
        fill_globals(model, src, config)
        for blk in model.blocks:
            fill_block(blk, src, quant, double_quant, block_size)
    # The blocks read and quantised are freed; the compiles to come free
    # more (see host_memory).
    host_memory.release()
    host_memory.release_after_compiles()


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
    moe_dispatch: str = "dense",
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
        model_spec(config),
        remat=remat,
        loss_chunk_size=loss_chunk_size,
        ple_on_host=ple_on_host,
        name="gemma4_lora_model",
        dtype=dtype,
    )
    fill_model(
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
    "fill_model",
    "stream_training_model",
    "local_checkpoint",
    "model_spec",
    "text_prefix",
]
