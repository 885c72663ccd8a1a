"""The decoder's pure functions and the Keras layers that hold frozen weights.

`DecoderBlock` re-states one KerasHub `Gemma4TextDecoderBlock` over the same
weights, with what fine-tuning needs that KerasHub's forward pass lacks:

* adapters are a separate branch, x -> dropout -> A -> B -> scale, next to a
  frozen base (KerasHub's feed-forward reads `layer.kernel` directly, so its
  LoRA adds A@B into the kernel and backprop builds a full weight gradient);
* a frozen kernel may be stored as NF4 and dequantised per layer inside the
  compiled step;
* packed rows: attention never crosses `segment_ids`, positions restart.

`tests/test_modeling.py` checks the forward pass against `Gemma4Backbone` and
against transformers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import keras
import ml_dtypes
import numpy as np

from gemma4_keras import host_memory
from gemma4_keras.model import attention as attention_lib
from gemma4_keras.model import moe, schema
from gemma4_keras.model import quant as quant_lib
from gemma4_keras.model.lora import LoraAdapter
from gemma4_keras.model.moe import gelu_tanh
from gemma4_keras.model.safetensors_io import aligned_empty
from gemma4_keras.model.spec import BlockSpec, ModelSpec
from gemma4_keras.model.xla_workarounds import weight_for

# ----------------------------------------------------------------------------
# Pure functions of the forward pass.


def rms_norm(x: jax.Array, scale: jax.Array | None, eps: float) -> jax.Array:
    """RMSNorm in float32, as Gemma 4 (`x / rms(x) * scale`, no 1 + scale)."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if scale is not None:
        y = y * weight_for(scale, x, jnp.float32)
    return y.astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, spec: BlockSpec) -> jax.Array:
    """Rotary embedding on [B, T, heads, head_dim], with Gemma 4's partial RoPE.

    Global layers rotate only the first `rotary_dim / 2` entries of each half
    of the head; the rest pass through (NoPE).
    """
    head, rot = spec.head_dim, spec.rotary_dim
    half, half_rot = head // 2, rot // 2
    inv_freq = spec.rope_wavelength ** (-np.arange(0, rot, 2, dtype=np.float32) / head)
    inv_freq = inv_freq / spec.rope_scaling
    freq = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, rot/2]
    cos = jnp.cos(freq)[:, :, None, :].astype(x.dtype)
    sin = jnp.sin(freq)[:, :, None, :].astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    r1, p1 = x1[..., :half_rot], x1[..., half_rot:]
    r2, p2 = x2[..., :half_rot], x2[..., half_rot:]
    y1 = r1 * cos - r2 * sin
    y2 = r2 * cos + r1 * sin
    return jnp.concatenate([y1, p1, y2, p2], axis=-1)


# float16 compute ("float32 islands"): the largest magnitude the MLP's
# gate * up product keeps before down_proj, a little under float16's 65504
# so that rounding cannot reach inf (the recipe Unsloth's T4 notebooks use).
FLOAT16_CLAMP = 65280.0


def float16_islands(dtype) -> bool:
    """True when `dtype` runs the float16 mode: float16 matmuls, float32 rest.

    In that mode the residual stream, RMSNorm, embeddings, the attention's
    q/k/v, scores and softmax, the MLP's activation and the LoRA branches
    stay float32; only the frozen projections' matmuls take float16 inputs,
    and the MLP's gate * up product is clamped to +-`FLOAT16_CLAMP` before it
    becomes down_proj's float16 input. float32 and bfloat16 compute are
    untouched by it (docs/t4.md).
    """
    return keras.backend.standardize_dtype(dtype) == "float16"


# ----------------------------------------------------------------------------
# Keras layers that hold the weights.


def storage_dtype(source, compute) -> str:
    """The dtype a frozen float tensor is kept in: never wider than its source.

    The compute dtype, unless the source (the checkpoint's tensor) is
    narrower: a bfloat16 checkpoint stays bfloat16 under float32 compute
    (each use upcasts inside the step), so float32 compute never doubles a
    frozen table. A float32 source under bfloat16 compute is rounded to
    bfloat16, as KerasHub's backbone does; at equal widths (float16 source,
    bfloat16 compute) the compute dtype wins.

    >>> storage_dtype("bfloat16", "float32"), storage_dtype("float32", "bfloat16")
    ('bfloat16', 'bfloat16')
    """
    source = keras.backend.standardize_dtype(source)
    compute = keras.backend.standardize_dtype(compute)
    narrower = _itemsize(source) < _itemsize(compute)
    return source if narrower and "float" in source else compute


def _itemsize(dtype: str) -> int:
    return np_dtype(dtype).itemsize


def frozen(layer: keras.layers.Layer, name: str, value, dtype) -> keras.Variable:
    """A non-trainable variable holding `value`, kept in
    `storage_dtype(value.dtype, dtype)`."""
    arr = np.asarray(value)
    dtype = storage_dtype(arr.dtype, dtype)
    var = layer.add_weight(
        name=name, shape=arr.shape, dtype=dtype, initializer="zeros", trainable=False
    )
    var.assign(arr.astype(np_dtype(dtype), copy=False))
    return var


def cast(arr: np.ndarray, dtype) -> np.ndarray:
    """`arr` in `dtype` (itself if it is already), into a fresh aligned array."""
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


def frozen_rows(layer: keras.layers.Layer, name: str, shape, blocks, storage):
    """A non-trainable `storage` variable of `shape` from blocks of rows, no copies.

    Creating a variable with zeros and assigning a numpy array makes JAX
    copy it (through a staging buffer): E2B's 4.7 GB per-layer-embedding
    table was alive three times at once (14.7 GB peak RSS). Here it is
    created from an array filled block by block (`_owned_array`): the table
    plus one block of rows. Under `presets.on_host()` that is host memory.
    """
    array = _owned_array(tuple(shape), storage, (cast(b, storage) for b in blocks))
    return _frozen_weight(layer, name, array)


def frozen_int8_rows(
    layer: keras.layers.Layer, name: str, shape, blocks
) -> quant_lib.Int8Rows:
    """`frozen_rows` of a table kept as int8 rows (`quant.Int8Rows`).

    Each block of rows is quantised as it arrives: the host holds the int8
    table plus one float32 block, never the float table. The variables are
    `name` (int8 [rows, dim]) and `name`_scale (float32 [rows]).
    """
    scales = []

    def quantised():
        for b in blocks:
            rows = quant_lib.Int8Rows.quantize(b)
            scales.append(np.asarray(rows.scale))
            yield rows.values

    values = _owned_array(tuple(shape), "int8", quantised())
    scale = jnp.asarray(np.concatenate(scales))
    return quant_lib.Int8Rows(
        _frozen_weight(layer, name, values),
        # Never autocast to a mixed-precision compute dtype: exact scales.
        _frozen_weight(layer, f"{name}_scale", scale, autocast=False),
    )


def _frozen_weight(
    layer: keras.layers.Layer, name: str, array, autocast: bool = True
) -> keras.Variable:
    """A non-trainable variable that takes over `array` (its dtype exactly)."""
    pending = [array]
    return layer.add_weight(
        name=name,
        shape=tuple(array.shape),
        dtype=keras.backend.standardize_dtype(array.dtype),
        # Hands the array over once: a closure holding it would keep a second
        # copy alive once Keras lays the variable out on a mesh.
        initializer=lambda shape, dtype: pending.pop(),
        trainable=False,
        autocast=autocast,
    )


def fill_model(
    model, source, *, quant: str = "none", double_quant: bool = False, block_size=64
) -> None:
    """Fills an empty `Gemma4LoraModel` with every schema row of its spec.

    `source` gives each row's value as we hold it: `stream_load`'s
    `SafetensorsSource` (an HF checkpoint, tensor by tensor) or
    `hub.BackboneSource` (a KerasHub backbone, any preset KerasHub loads).
    Globals first (`model.add_global`, tables in blocks of rows), then block
    by block, each tensor stored (maybe quantised under `quant`) and dropped
    before the next is read.

    Example:

        fill_model(model, hub.BackboneSource(backbone), quant="nf4")
    """
    spec = model.spec
    for row in schema.global_rows(spec):
        dtype = "float32" if row.float32 else None
        blocks = source.blocks(row, spec, None)
        model.add_global(row.name, row.shape(spec, None), blocks, dtype)
    for blk in model.blocks:
        for row in schema.block_rows(spec, blk.bspec.index):
            value = source.value(row, spec, blk.bspec.index)
            blk.add(row, value, quant, double_quant, block_size)
            del value
    # The blocks read and quantised are freed; the compiles to come free
    # more (see host_memory).
    host_memory.release()
    host_memory.release_after_compiles()


def np_dtype(dtype) -> np.dtype:
    """The numpy dtype of a Keras dtype name (bfloat16 from ml_dtypes)."""
    dtype = keras.backend.standardize_dtype(dtype)
    return np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)


class FrozenLinear(keras.layers.Layer):
    """A frozen (in, out) kernel: float, Keras int8/int4, or NF4.

    Float and int8/int4 kernels live in a `keras.layers.Dense` (so Keras' own
    quantisation applies); NF4 keeps only packed codes and block scales of
    the HF (out, in) weight, exactly as bitsandbytes lays them out.
    """

    def __init__(
        self,
        kernel,
        quant: str = "none",
        double_quant: bool = False,
        block_size: int = 64,
        **kwargs,
    ):
        super().__init__(**kwargs)
        kernel = np.asarray(kernel)
        self.quant = quant
        self.in_features, self.out_features = kernel.shape
        self.nf4 = None
        self.dense = None
        if quant == "nf4":
            self.nf4 = quant_lib.NF4Kernel.from_array(
                np.ascontiguousarray(kernel.T),
                block_size=block_size,
                double_quant=double_quant,
                name=f"{self.name}_nf4",
            )
        else:
            # A float kernel keeps its storage dtype (`storage_dtype`); int8 /
            # int4 ones compute through the Dense in the model's dtype.
            self.dense = keras.layers.Dense(
                self.out_features,
                use_bias=False,
                dtype=(
                    storage_dtype(kernel.dtype, self.variable_dtype)
                    if quant == "none"
                    else self.dtype_policy
                ),
                name=self.name,
            )
            self.dense.build((None, self.in_features))
            self.dense.kernel.assign(kernel)
            self.dense.trainable = False
            if quant in ("int8", "int4"):
                self.dense.quantize(quant)

    def weight(self, dtype) -> jax.Array:
        """The (in, out) kernel in `dtype`, dequantised if stored quantised."""
        if self.nf4 is not None:
            return self.nf4.dequantize(dtype).T
        if self.quant in ("int8", "int4"):
            eye = jnp.eye(self.in_features, dtype=dtype)
            return self.dense(eye)
        return jnp.asarray(self.dense.kernel.value).astype(dtype)

    def apply(self, x: jax.Array) -> jax.Array:
        """x @ kernel (Keras' quantised matmul for int8/int4)."""
        if self.dense is not None and self.quant != "none":
            return self.dense(x)
        if self.nf4 is not None:
            return quant_lib.nf4_matmul(x, self.nf4.quantized())
        return x @ self.weight(x.dtype)

    def apply_float32_out(self, x: jax.Array) -> jax.Array:
        """`apply` of a float16 `x`, the result in float32 (float16 mode).

        A float kernel multiplies in float16 and accumulates and returns
        float32 (as tensor cores do), so a large output cannot overflow;
        NF4 and Keras int8/int4 kernels return float16, cast afterwards.
        """
        if self.dense is not None and self.quant == "none":
            w = self.weight(x.dtype)
            return jnp.matmul(x, w, preferred_element_type=jnp.float32)
        return self.apply(x).astype(jnp.float32)


class DecoderBlock(keras.layers.Layer):
    """Frozen weights of one decoder block plus its adapters."""

    def __init__(self, spec: ModelSpec, layer: int, **kwargs):
        super().__init__(**kwargs)
        self.spec, self.bspec = spec, spec.blocks[layer]
        self.proj: dict[str, FrozenLinear] = {}
        self.norms: dict[str, keras.Variable] = {}
        self.extra: dict[str, keras.Variable] = {}
        self.adapters: dict[str, dict[str, LoraAdapter]] = {}
        self.active_adapter: str | None = None
        # model.moe_dispatch / model.moe_token_chunk (model/moe.py)
        self.moe_dispatch = "auto"
        self.moe_token_chunk = 0
        # model.attention / model.attention_chunk_size (model/attention.py)
        self.attention = "auto"
        self.attention_chunk_size = 512

    def add(
        self,
        row: schema.Row,
        value,
        quant: str = "none",
        double_quant: bool = False,
        block_size: int = 64,
    ) -> None:
        """Holds the tensor of a schema row, frozen (`model/schema.py`).

        Projections become `FrozenLinear`s in `proj` (NF4 / int8 / int4 under
        `quant`); norm scales go into `norms` (float32); the rest into
        `extra`, MoE expert banks as NF4 under QLoRA.
        """
        name = row.name
        if row.kind == "projection":
            self.proj[name] = FrozenLinear(
                value,
                quant=quant,
                double_quant=double_quant,
                block_size=block_size,
                # Unique names give unique variable paths (layout maps, logs).
                dtype=self.dtype_policy,
                name=f"{self.name}_{name}",
            )
        elif row.kind == "bank" and quant == "nf4":
            self.extra[name] = quant_lib.NF4Kernel.from_array(
                np.asarray(value),
                block_size=block_size,
                double_quant=double_quant,
                per_expert=True,
                name=f"{self.name}_{name}",
            )
        else:
            dtype = "float32" if row.float32 else self.variable_dtype
            held = self.norms if row.kind == "norm" else self.extra
            held[name] = frozen(self, name, value, dtype)

    def linear(self, target: str, x: jax.Array, keys: dict | None) -> jax.Array:
        if float16_islands(self.compute_dtype):
            return self._linear_float16(target, x, keys)
        y = self.proj[target].apply(x)
        adapter = self.adapters.get(self.active_adapter, {}).get(target)
        if adapter is not None:
            key = None if keys is None else keys.get(target)
            y = y + adapter.delta(x, key)
        return y

    def _linear_float16(self, target: str, x: jax.Array, keys: dict | None):
        """The frozen matmul in float16; the adapter and the result in float32.

        The adapter's weight gradients sum over every token of the batch:
        in float16, times the loss scale, they overflow (the first steps
        would all be skipped), so its (rank-r, cheap) branch stays float32.
        """
        x = x.astype(jnp.float32)
        y = self.proj[target].apply_float32_out(x.astype(jnp.float16))
        adapter = self.adapters.get(self.active_adapter, {}).get(target)
        if adapter is not None:
            key = None if keys is None else keys.get(target)
            y = y + adapter.delta(x, key)
        return y

    def mlp(self, h: jax.Array, keys: dict | None) -> jax.Array:
        """down_proj(gelu(gate_proj(h)) * up_proj(h)), clamped in float16 mode."""
        f = gelu_tanh(self.linear("gate_proj", h, keys)) * self.linear(
            "up_proj", h, keys
        )
        if float16_islands(self.compute_dtype):
            f = jnp.clip(f, -FLOAT16_CLAMP, FLOAT16_CLAMP)
        return self.linear("down_proj", f, keys)

    def forward(
        self, x, positions, segment_ids, ple_input, shared_kv, keys, blocks=None
    ):
        """One block over whole packed rows: (x, (k, v) for KV sharing, router).

        `router`: the MoE layer's `moe.router_stats` over the non-padding
        tokens (`segment_ids` > 0), None without experts; the model's loss
        reads them (`Gemma4LoraModel.compute_loss`).
        `blocks`: image soft tokens' ids (`attention.vision_blocks`), which
        attend to each other both ways on sliding layers of a model whose
        config says `use_bidirectional_attention: "vision"`.
        """
        q, kv = self.attention_inputs(x, positions, keys)
        k, v = kv if kv is not None else shared_kv
        b = self.bspec
        bidirectional = self.spec.vision_bidirectional and b.sliding_window is not None
        att = attention_lib.attend(
            q,
            k,
            v,
            segment_ids,
            b.sliding_window,
            b.attn_soft_cap,
            self.attention,
            self.attention_chunk_size,
            blocks=blocks if bidirectional else None,
        )
        x, router = self.attention_output(x, att, ple_input, keys, segment_ids > 0)
        return x, (k, v), router

    def attention_inputs(self, x, positions, keys):
        """(q, (k, v)) of the tokens in `x`, normed and rotated.

        KV-shared layers return (q, None): they attend over their source
        layer's keys and values (the training pass hands them over, decoding
        reads the source layer's cache).
        """
        s, b = self.spec, self.bspec
        bsz, t, _ = x.shape
        h = rms_norm(x, self.norms["pre_attn"].value, s.eps)
        q = self.linear("q_proj", h, keys).reshape(bsz, t, b.num_heads, b.head_dim)
        q = apply_rope(rms_norm(q, self.norms["q_norm"].value, s.eps), positions, b)
        if not b.has_kv:
            return q, None
        raw_k = self.linear("k_proj", h, keys).reshape(
            bsz, t, b.num_kv_heads, b.head_dim
        )
        k = apply_rope(rms_norm(raw_k, self.norms["k_norm"].value, s.eps), positions, b)
        raw_v = (
            raw_k
            if b.k_eq_v
            else self.linear("v_proj", h, keys).reshape(
                bsz, t, b.num_kv_heads, b.head_dim
            )
        )
        return q, (k, rms_norm(raw_v, None, s.eps))

    def attention_output(self, x, att, ple_input, keys, mask=None):
        """The rest of the block after attention: o_proj, MLP (+ MoE), PLE.

        Returns (x, router): `router` is the MoE layer's `moe.router_stats`
        over the tokens where `mask` [B, T] is True; None without experts or
        without `mask` (decoding).
        """
        s = self.spec
        router = None
        att = self.linear("o_proj", att, keys)
        x = x + rms_norm(att, self.norms["post_attn"].value, s.eps)

        h = rms_norm(x, self.norms["pre_ffw"].value, s.eps)
        f = self.mlp(h, keys)
        if s.moe:
            f = rms_norm(f, self.norms["post_ffw_dense"].value, s.eps)
            y, router = self._moe(x, mask)
            f = f + y
        x = x + rms_norm(f, self.norms["post_ffw"].value, s.eps)
        if s.ple_dim and ple_input is not None:
            g = gelu_tanh(x @ self.extra["ple_gate"].value.astype(x.dtype)) * ple_input
            g = g @ self.extra["ple_up"].value.astype(x.dtype)
            x = x + rms_norm(g, self.norms["post_ple"].value, s.eps)
        return x * weight_for(self.extra["layer_scalar"].value, x, x.dtype), router

    def _moe(self, x: jax.Array, mask: jax.Array | None = None):
        """The MoE path (router on raw x, experts on normed x), frozen.

        Returns (output, `moe.router_stats` over the tokens where `mask`,
        or None without a mask). `moe_dispatch` picks routed (each expert on
        its own tokens) or dense compute (`model/moe.py`).
        """
        s, e = self.spec, self.extra
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        normed = rms_norm(xf, None, s.eps)
        # The logits once, for the routing and its statistics.
        logits = moe.router_logits(
            normed, e["router_scale"].value, e["router_proj"].value
        )
        top_p, top_i = moe.pick(logits, s.top_k, normed.dtype)
        stats = None
        if mask is not None:
            stats = moe.router_stats(logits, s.top_k, mask.reshape(-1))
        m = rms_norm(xf, self.norms["pre_ffw_moe"].value, s.eps)
        banks = {name: self._bank(name) for name in moe.BANKS}
        scale = e["expert_scale"].value
        y = moe.experts(
            m, top_p, top_i, banks, scale, self.moe_dispatch, self._expert_lora(),
            self.moe_token_chunk,
        )  # fmt: skip
        y = rms_norm(y.reshape(shape), self.norms["post_ffw_moe"].value, s.eps)
        return y, stats

    def _expert_lora(self) -> dict[str, moe.ExpertLora]:
        """{bank row: (a, b, scale)} of the active adapter's expert targets;
        a fused HF target (`experts.gate_up_proj`) shares A between its rows
        and splits B (`schema.part_of`), as PEFT's one adapter on it does."""
        adapters = self.adapters.get(self.active_adapter, {})
        out = {}
        for target in schema.EXPERT_TARGETS:
            if (adapter := adapters.get(target)) is None:
                continue
            a, b = adapter.lora_a.value, adapter.lora_b.value
            for row in schema.target_rows(target):
                out[row.name] = (a, schema.part_of(row, b), adapter.scale)
        return out

    def _bank(self, name: str):
        """An expert bank as stored: a float array or a per-expert NF4Weight."""
        holder = self.extra[name]
        if hasattr(holder, "quantized"):
            return holder.quantized()
        return holder.value
