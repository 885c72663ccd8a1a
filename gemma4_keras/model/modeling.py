"""The Gemma 4 text decoder as a training model, over weights loaded by KerasHub.

KerasHub's `Gemma4Backbone` is what loads presets (KerasHub names, `hf://`,
local directories) and what generates. Its training forward pass cannot do
what fine-tuning needs, so this module re-states the text decoder once, over
the very same weights:

* adapters are a separate branch, x -> dropout -> A -> B -> scale, next to a
  frozen base (KerasHub's feed-forward reads `layer.kernel` directly, so its
  LoRA adds A@B into the kernel and backprop builds a full weight gradient);
* a frozen kernel may be stored as NF4 and dequantised per layer inside the
  compiled step;
* packed rows: attention never crosses `segment_ids`, positions restart;
* the output is the final hidden state, for the chunked loss (the
  [batch, seq, 262144] logits never exist);
* each decoder block can be rematerialised.

All base kernels are held as 2-D (in_features, out_features) matrices: the
transpose of the Hugging Face `nn.Linear` weight, so LoRA factors, merges and
PEFT files need no per-projection reshapes. `tests/test_modeling.py` checks
the forward pass against `Gemma4Backbone` and against transformers.

This module reads facts off KerasHub layers (`keras_hub.src`); it is the one
place that does.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import keras
import numpy as np

from gemma4_keras import config_lib

ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """Static facts of one text decoder block."""

    index: int
    is_global: bool
    head_dim: int
    num_heads: int
    num_kv_heads: int
    sliding_window: int | None  # None = full attention
    rope_wavelength: float
    rope_scaling: float
    rotary_dim: int
    kv_source: int | None  # KV-shared layers read K/V of this layer
    k_eq_v: bool  # V is computed from the K projection
    ffn_dim: int
    attn_soft_cap: float | None

    @property
    def has_kv(self) -> bool:
        return self.kv_source is None


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Static facts of the text decoder, read off a KerasHub backbone."""

    vocab_size: int
    hidden_dim: int
    eps: float
    final_soft_cap: float | None
    ple_dim: int  # per-layer-input width, 0 = no PLE
    moe: bool
    num_experts: int
    top_k: int
    expert_dim: int
    blocks: tuple[BlockSpec, ...]

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def projection_shape(self, layer: int, target: str) -> tuple[int, int]:
        """(in_features, out_features) of an HF projection in `layer`."""
        b, d = self.blocks[layer], self.hidden_dim
        shapes = {
            "q_proj": (d, b.num_heads * b.head_dim),
            "k_proj": (d, b.num_kv_heads * b.head_dim),
            "v_proj": (d, b.num_kv_heads * b.head_dim),
            "o_proj": (b.num_heads * b.head_dim, d),
            "gate_proj": (d, b.ffn_dim),
            "up_proj": (d, b.ffn_dim),
            "down_proj": (b.ffn_dim, d),
        }
        return shapes[target]

    def has_projection(self, layer: int, target: str) -> bool:
        """Whether `layer` owns this projection (KV-shared layers own no k/v)."""
        b = self.blocks[layer]
        if target == "k_proj":
            return b.has_kv
        if target == "v_proj":
            return b.has_kv and not b.k_eq_v
        return True

    @classmethod
    def from_backbone(cls, backbone) -> ModelSpec:
        # Vision / audio towers of a multimodal backbone are not read: this
        # package fine-tunes the text decoder only.
        blocks = []
        for i in range(backbone.num_layers):
            blk = backbone.get_layer(f"decoder_block_{i}")
            att = blk.attention
            sliding = blk.use_sliding_window_attention and not blk.is_global_attention
            shared = att.is_kv_shared_layer
            blocks.append(
                BlockSpec(
                    index=i,
                    is_global=bool(blk.is_global_attention),
                    head_dim=int(att.head_dim),
                    num_heads=int(att.num_query_heads),
                    num_kv_heads=int(att.effective_num_kv_heads),
                    sliding_window=int(blk.sliding_window_size) if sliding else None,
                    rope_wavelength=float(att.rope_wavelength),
                    rope_scaling=float(att.rope_scaling_factor),
                    rotary_dim=int(att.rotary_dim),
                    kv_source=int(blk.kv_shared_layer_index) if shared else None,
                    k_eq_v=bool(att.attention_k_eq_v),
                    ffn_dim=int(blk.actual_intermediate_dim),
                    attn_soft_cap=att.logit_soft_cap,
                )
            )
        return cls(
            vocab_size=int(backbone.vocabulary_size),
            hidden_dim=int(backbone.hidden_dim),
            eps=float(backbone.layer_norm_epsilon),
            final_soft_cap=backbone.final_logit_soft_cap,
            ple_dim=int(backbone.hidden_size_per_layer_input or 0),
            moe=bool(backbone.enable_moe_block),
            num_experts=int(backbone.num_experts or 0),
            top_k=int(backbone.num_experts_per_token or 0),
            expert_dim=int(backbone.expert_intermediate_dim or 0),
            blocks=tuple(blocks),
        )


# ----------------------------------------------------------------------------
# Pure functions of the forward pass.


def rms_norm(x: jax.Array, scale: jax.Array | None, eps: float) -> jax.Array:
    """RMSNorm in float32, as Gemma 4 (`x / rms(x) * scale`, no 1 + scale)."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
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


def attention_mask(segment_ids: jax.Array, window: int | None) -> jax.Array:
    """[B, T, T] boolean mask: causal, same segment, not padding, in window."""
    t = segment_ids.shape[1]
    idx = jnp.arange(t)
    causal = idx[None, :] <= idx[:, None]
    if window is not None:
        causal = causal & (idx[:, None] - idx[None, :] < window)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    valid = segment_ids[:, None, :] > 0
    return causal[None] & same & valid


def dot_attention(q, k, v, mask, soft_cap):
    """Grouped-query attention with scale 1 (Gemma 4 normalises q and k)."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, n // kv, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, k).astype(jnp.float32)
    if soft_cap is not None:
        logits = jnp.tanh(logits / soft_cap) * soft_cap
    m = mask[:, None, None, :, :]
    logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(m, probs, 0.0).astype(v.dtype)  # rows with no key -> 0
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n * h)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


# ----------------------------------------------------------------------------
# Keras layers that hold the weights.


def _frozen(layer: keras.layers.Layer, name: str, value, dtype) -> keras.Variable:
    arr = np.asarray(value)
    var = layer.add_weight(
        name=name, shape=arr.shape, dtype=dtype, initializer="zeros", trainable=False
    )
    var.assign(
        arr.astype(keras.backend.standardize_dtype(dtype))
        if dtype != "bfloat16"
        else arr
    )
    return var


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
            from gemma4_keras.model import quant as quant_lib

            self.nf4 = quant_lib.NF4Kernel.from_array(
                np.ascontiguousarray(kernel.T),
                block_size=block_size,
                double_quant=double_quant,
                name=f"{self.name}_nf4",
            )
        else:
            self.dense = keras.layers.Dense(
                self.out_features,
                use_bias=False,
                dtype=self.dtype_policy,
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
        return x @ self.weight(x.dtype)


class LoraAdapter(keras.layers.Layer):
    """One PEFT-shaped adapter: delta(x) = scale * B(A(dropout(x))).

    `lora_a` is (in, r) and `lora_b` is (r, out): PEFT's `lora_A.weight` and
    `lora_B.weight` transposed. Init as PEFT: A ~ U(+-1/sqrt(in)) (Kaiming
    uniform with a=sqrt(5)), B = 0, so a fresh adapter changes nothing.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if rank > min(in_features, out_features):
            raise config_lib.ConfigError(
                f"lora.rank={rank} is larger than {self.name}'s dimensions "
                f"({in_features} in, {out_features} out); lower --config.lora.rank"
            )
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha, self.dropout, self.rslora = rank, alpha, dropout, rslora
        bound = 1.0 / math.sqrt(in_features)
        self.lora_a = self.add_weight(
            name="lora_a",
            shape=(in_features, rank),
            initializer=keras.initializers.RandomUniform(-bound, bound, seed=seed),
            dtype="float32",
        )
        self.lora_b = self.add_weight(
            name="lora_b",
            shape=(rank, out_features),
            initializer="zeros",
            dtype="float32",
        )

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def delta(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        if key is not None and self.dropout > 0:
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        a = jnp.asarray(self.lora_a.value).astype(x.dtype)
        b = jnp.asarray(self.lora_b.value).astype(x.dtype)
        return ((x @ a) @ b) * jnp.asarray(self.scale, x.dtype)

    def delta_weight(self) -> np.ndarray:
        """scale * A @ B, shape (in, out), float32."""
        a = np.asarray(self.lora_a.value, np.float32)
        b = np.asarray(self.lora_b.value, np.float32)
        return (a @ b) * np.float32(self.scale)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Which projections get adapters and how (config `lora.*`)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = config_lib.LORA_TARGETS
    layers: tuple[int, ...] | None = None
    rslora: bool = False
    seed: int = 0

    @classmethod
    def from_config(cls, c) -> LoraSpec:
        layers = config_lib.lora_layers(c.layers)
        return cls(
            rank=int(c.rank),
            alpha=float(c.alpha),
            dropout=float(c.dropout),
            targets=tuple(config_lib.lora_targets(c.targets)),
            layers=None if layers is None else tuple(layers),
            rslora=bool(c.rslora),
            seed=int(c.seed),
        )

    def sites(self, spec: ModelSpec) -> list[tuple[int, str]]:
        """(layer, target) pairs that get an adapter; KV-shared k/v skipped."""
        layers = range(spec.num_layers) if self.layers is None else self.layers
        for i in layers:
            if not 0 <= i < spec.num_layers:
                raise config_lib.ConfigError(
                    f"lora.layers names layer {i}, but the model has layers 0..{spec.num_layers - 1}"
                )
        return [
            (i, t) for i in layers for t in self.targets if spec.has_projection(i, t)
        ]


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
        self.moe_dispatch = "dense"  # dense | ragged (see moe_ragged)

    def add_norm(self, name: str, value) -> None:
        self.norms[name] = _frozen(self, name, value, "float32")

    def add_extra(self, name: str, value) -> None:
        self.extra[name] = _frozen(self, name, value, self.variable_dtype)

    def add_bank(
        self, name: str, value, quant: str, double_quant: bool, block_size: int
    ) -> None:
        """A raw MoE expert bank, frozen; NF4 under QLoRA."""
        if quant == "nf4":
            from gemma4_keras.model import quant as quant_lib

            self.extra[name] = quant_lib.NF4Kernel.from_array(
                np.asarray(value),
                block_size=block_size,
                double_quant=double_quant,
                per_expert=True,
                name=f"{self.name}_{name}",
            )
        else:
            self.add_extra(name, value)

    def add_projection(
        self, target: str, kernel, quant: str, double_quant: bool, block_size: int
    ) -> None:
        self.proj[target] = FrozenLinear(
            kernel,
            quant=quant,
            double_quant=double_quant,
            block_size=block_size,
            # Unique names give unique variable paths (layout maps, logs).
            dtype=self.dtype_policy,
            name=f"{self.name}_{target}",
        )

    def linear(self, target: str, x: jax.Array, keys: dict | None) -> jax.Array:
        y = self.proj[target].apply(x)
        adapter = self.adapters.get(self.active_adapter, {}).get(target)
        if adapter is not None:
            key = None if keys is None else keys.get(target)
            y = y + adapter.delta(x, key)
        return y

    def forward(self, x, positions, mask, ple_input, shared_kv, keys):
        s, b = self.spec, self.bspec
        bsz, t, _ = x.shape
        h = rms_norm(x, self.norms["pre_attn"].value, s.eps)
        q = self.linear("q_proj", h, keys).reshape(bsz, t, b.num_heads, b.head_dim)
        q = apply_rope(rms_norm(q, self.norms["q_norm"].value, s.eps), positions, b)
        if b.has_kv:
            raw_k = self.linear("k_proj", h, keys).reshape(
                bsz, t, b.num_kv_heads, b.head_dim
            )
            k = apply_rope(
                rms_norm(raw_k, self.norms["k_norm"].value, s.eps), positions, b
            )
            raw_v = (
                raw_k
                if b.k_eq_v
                else self.linear("v_proj", h, keys).reshape(
                    bsz, t, b.num_kv_heads, b.head_dim
                )
            )
            v = rms_norm(raw_v, None, s.eps)
        else:
            k, v = shared_kv
        att = dot_attention(q, k, v, mask, b.attn_soft_cap)
        att = self.linear("o_proj", att, keys)
        x = x + rms_norm(att, self.norms["post_attn"].value, s.eps)

        h = rms_norm(x, self.norms["pre_ffw"].value, s.eps)
        f = gelu_tanh(self.linear("gate_proj", h, keys)) * self.linear(
            "up_proj", h, keys
        )
        f = self.linear("down_proj", f, keys)
        if s.moe:
            f = rms_norm(f, self.norms["post_ffw_dense"].value, s.eps)
            f = f + self._moe(x)
        x = x + rms_norm(f, self.norms["post_ffw"].value, s.eps)
        if s.ple_dim and ple_input is not None:
            g = gelu_tanh(x @ self.extra["ple_gate"].value.astype(x.dtype)) * ple_input
            g = g @ self.extra["ple_up"].value.astype(x.dtype)
            x = x + rms_norm(g, self.norms["post_ple"].value, s.eps)
        x = x * self.extra["layer_scalar"].value.astype(x.dtype)
        return x, (k, v)

    def _moe(self, x: jax.Array) -> jax.Array:
        """The MoE path (router on raw x, experts on normed x), frozen."""
        if self.moe_dispatch == "ragged":
            return self.moe_ragged(x)
        return self.moe_dense(x)

    def moe_ragged(self, x: jax.Array) -> jax.Array:
        """MoE with tokens grouped by expert (`jax.lax.ragged_dot`).

        Each expert multiplies only the tokens routed to it: k / num_experts
        of the dense path's expert matmuls where the backend has a grouped
        matmul (TPU, recent GPU XLA). XLA's CPU backend expands ragged_dot
        into a dense product over every group, which costs more than the
        dense path, so this is opt-in (`model.moe_dispatch=ragged`).
        """
        s, e = self.spec, self.extra
        shape = x.shape
        top_p, top_i = self._route(x.reshape(-1, shape[-1]))
        m = rms_norm(x, self.norms["pre_ffw_moe"].value, s.eps).reshape(-1, shape[-1])
        flat = top_i.reshape(-1)  # [T*k] expert of each (token, slot)
        order = jnp.argsort(flat, stable=True)
        token = order // s.top_k
        sizes = jnp.bincount(flat, length=s.num_experts).astype(jnp.int32)
        xs = m[token]
        gate = jax.lax.ragged_dot(xs, self._bank("experts_gate", x.dtype), sizes)
        up = jax.lax.ragged_dot(xs, self._bank("experts_up", x.dtype), sizes)
        hid = gelu_tanh(gate.astype(jnp.float32)).astype(x.dtype) * up
        out = jax.lax.ragged_dot(hid, self._bank("experts_down", x.dtype), sizes)
        scale = e["expert_scale"].value.astype(x.dtype)[flat[order]]
        weight = top_p.reshape(-1)[order] * scale
        y = jnp.zeros_like(m).at[token].add(out * weight[:, None])
        return rms_norm(y.reshape(shape), self.norms["post_ffw_moe"].value, s.eps)

    def _route(self, xf: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Top-k expert probabilities (renormalised) and indices, [T, k] each."""
        s, e = self.spec, self.extra
        r = rms_norm(xf, None, s.eps) * jnp.asarray(xf.shape[-1] ** -0.5, xf.dtype)
        r = r * e["router_scale"].value.astype(xf.dtype)
        logits = (r @ e["router_proj"].value.astype(xf.dtype)).astype(jnp.float32)
        probs = jax.nn.softmax(logits, -1)
        top_p, top_i = jax.lax.top_k(probs.astype(xf.dtype), s.top_k)
        denom = jnp.maximum(top_p.sum(-1, keepdims=True), 1e-9).astype(top_p.dtype)
        return top_p / denom, top_i

    def moe_dense(self, x: jax.Array) -> jax.Array:
        """KerasHub's dense MoE: every expert on every token, one batched einsum."""
        s, e = self.spec, self.extra
        shape = x.shape
        top_p, top_i = self._route(x.reshape(-1, shape[-1]))
        dispatch = jnp.sum(
            jax.nn.one_hot(top_i, s.num_experts, dtype=top_p.dtype) * top_p[..., None],
            axis=1,
        )  # [T, E]
        m = rms_norm(x, self.norms["pre_ffw_moe"].value, s.eps).reshape(-1, shape[-1])
        gate = jnp.einsum("th,ehi->eti", m, self._bank("experts_gate", x.dtype))
        up = jnp.einsum("th,ehi->eti", m, self._bank("experts_up", x.dtype))
        hid = gelu_tanh(gate.astype(jnp.float32)).astype(x.dtype) * up
        out = jnp.einsum("eti,eih->eth", hid, self._bank("experts_down", x.dtype))
        out = out * e["expert_scale"].value.astype(x.dtype)[:, None, None]
        out = jnp.sum(out * dispatch.T[:, :, None], axis=0).reshape(shape)
        return rms_norm(out, self.norms["post_ffw_moe"].value, s.eps)

    def _bank(self, name: str, dtype) -> jax.Array:
        holder = self.extra[name]
        if hasattr(holder, "dequantize"):
            return holder.dequantize(dtype)
        return holder.value.astype(dtype)


class Gemma4LoraModel(keras.Model):
    """Gemma 4 text decoder with PEFT-exact LoRA adapters, for training.

    `call` takes a batch dict (`token_ids`, `positions`, `segment_ids`) and
    returns the final hidden states [B, T, D]; `compute_loss` turns them into
    the masked, chunked cross-entropy against the tied embedding.

    Example:
      >>> backbone = keras_hub.models.Gemma4Backbone.from_preset(path)
      >>> model = Gemma4LoraModel.from_backbone(backbone, LoraSpec(rank=8))
      >>> hidden = model(batch)
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        remat: bool = False,
        loss_chunk_size: int = 1024,
        dtype=None,
        **kwargs,
    ):
        super().__init__(dtype=dtype, **kwargs)
        self.spec = spec
        self.remat = remat
        self.loss_chunk_size = loss_chunk_size
        self.blocks = [
            DecoderBlock(spec, i, dtype=self.dtype_policy, name=f"block_{i}")
            for i in range(spec.num_layers)
        ]
        self.globals: dict[str, keras.Variable] = {}
        self.lora_specs: dict[str, LoraSpec] = {}
        self.active_adapter: str | None = None
        self.dropout_seed = keras.random.SeedGenerator(0, name="lora_dropout_seed")

    # --- construction -------------------------------------------------------

    @classmethod
    def from_backbone(
        cls,
        backbone,
        lora: LoraSpec | None = None,
        *,
        quant: str = "none",
        double_quant: bool = False,
        block_size: int = 64,
        remat: bool = False,
        loss_chunk_size: int = 1024,
        dtype=None,
        moe_dispatch: str = "dense",
    ) -> Gemma4LoraModel:
        """Copies the text weights out of a KerasHub `Gemma4Backbone`."""
        from gemma4_keras.model import hub as weights_lib

        spec = ModelSpec.from_backbone(backbone)
        model = cls(
            spec,
            remat=remat,
            loss_chunk_size=loss_chunk_size,
            name="gemma4_lora_model",
            dtype=dtype or backbone.dtype_policy.name,
        )
        weights_lib.copy_from_backbone(
            model,
            backbone,
            quant=quant,
            double_quant=double_quant,
            block_size=block_size,
        )
        # Every variable exists now; marking the model built lets
        # `stateless_call` (the jitted train step) run without an eager call.
        model.built = True
        for blk in model.blocks:
            blk.moe_dispatch = moe_dispatch
        if lora is not None:
            model.add_adapter("default", lora)
        return model

    def add_global(self, name: str, value, dtype=None) -> None:
        self.globals[name] = _frozen(self, name, value, dtype or self.variable_dtype)

    def add_adapter(self, name: str, lora: LoraSpec, activate: bool = True) -> None:
        """Creates adapter `name` (zero effect until trained or loaded)."""
        if name in self.lora_specs:
            raise ValueError(
                f"an adapter named {name!r} exists already; unload it first"
            )
        seed = lora.seed
        for layer, target in lora.sites(self.spec):
            din, dout = self.spec.projection_shape(layer, target)
            adapter = LoraAdapter(
                din,
                dout,
                lora.rank,
                lora.alpha,
                lora.dropout,
                lora.rslora,
                seed=seed,
                name=f"lora_{name}_layers_{layer}_{target}",
            )
            seed += 1
            self.blocks[layer].adapters.setdefault(name, {})[target] = adapter
            # Track through the block so Keras sees the variables.
            setattr(self.blocks[layer], f"_lora_{name}_{target}", adapter)
        self.lora_specs[name] = lora
        if activate:
            self.set_adapter(name)

    def set_adapter(self, name: str | None) -> None:
        """Activates adapter `name` (None = the base model alone)."""
        if name is not None and name not in self.lora_specs:
            raise KeyError(
                f"no adapter named {name!r}; loaded: {sorted(self.lora_specs)}"
            )
        self.active_adapter = name
        for blk in self.blocks:
            blk.active_adapter = name

    def unload_adapter(self, name: str) -> None:
        """Removes adapter `name` and its variables; base weights are untouched."""
        if name not in self.lora_specs:
            raise KeyError(
                f"no adapter named {name!r}; loaded: {sorted(self.lora_specs)}"
            )
        for blk in self.blocks:
            for target, adapter in blk.adapters.pop(name, {}).items():
                delattr(blk, f"_lora_{name}_{target}")
                # delattr does not untrack a sub-layer: without this its
                # variables stay in `trainable_variables` (and the optimizer).
                blk._tracker.untrack(adapter)
        del self.lora_specs[name]
        if self.active_adapter == name:
            self.set_adapter(None)

    def adapters(self, name: str | None = None) -> dict[tuple[int, str], LoraAdapter]:
        """{(layer, target): adapter} of adapter `name` (default: the active one)."""
        name = name or self.active_adapter
        return {
            (blk.bspec.index, t): a
            for blk in self.blocks
            for t, a in blk.adapters.get(name, {}).items()
        }

    # --- forward ------------------------------------------------------------

    def call(self, inputs, training=False):
        token_ids = inputs["token_ids"]
        positions = inputs["positions"]
        segment_ids = inputs["segment_ids"]
        dtype = self.compute_dtype
        emb = self.globals["embedding"].value
        x = jnp.take(emb, token_ids, axis=0).astype(dtype)
        ple = self._ple_inputs(token_ids, x) if self.spec.ple_dim else None
        x = x * jnp.asarray(math.sqrt(self.spec.hidden_dim), dtype)
        masks = {}
        kv_cache: dict[int, tuple] = {}
        base_key = self.dropout_seed.next() if training else None
        for blk in self.blocks:
            b = blk.bspec
            if b.sliding_window not in masks:
                masks[b.sliding_window] = attention_mask(segment_ids, b.sliding_window)
            keys = self._dropout_keys(base_key, blk)
            shared = kv_cache.get(b.kv_source) if not b.has_kv else None
            ple_i = None if ple is None else ple[:, :, b.index]
            fwd = blk.forward
            if self.remat:
                fwd = jax.checkpoint(fwd)
            x, kv = fwd(x, positions, masks[b.sliding_window], ple_i, shared, keys)
            kv_cache[b.index] = kv
        return rms_norm(x, self.globals["final_norm"].value, self.spec.eps)

    def _dropout_keys(self, base_key, blk: DecoderBlock) -> dict | None:
        if base_key is None:
            return None
        adapters = blk.adapters.get(self.active_adapter, {})
        names = [t for t, a in adapters.items() if a.dropout > 0]
        if not names:
            return None
        key = jax.random.fold_in(jnp.asarray(base_key, jnp.uint32), blk.bspec.index)
        return {t: jax.random.fold_in(key, i) for i, t in enumerate(names)}

    def _ple_inputs(self, token_ids, x):
        """Per-layer inputs [B, T, L, P] as KerasHub computes them."""
        s, g = self.spec, self.globals
        p, n = s.ple_dim, s.num_layers
        emb = jnp.take(g["ple_embedding"].value, token_ids, axis=0).astype(x.dtype)
        emb = emb * jnp.asarray(p**0.5, x.dtype)
        scaled = x * jnp.asarray(math.sqrt(s.hidden_dim), x.dtype)
        proj = scaled @ g["ple_projection"].value.astype(x.dtype)
        proj = proj * jnp.asarray(s.hidden_dim**-0.5, x.dtype)
        bsz, t = token_ids.shape
        proj = rms_norm(proj.reshape(bsz, t, n, p), g["ple_norm"].value, s.eps)
        return (proj + emb.reshape(bsz, t, n, p)) * jnp.asarray(2.0**-0.5, x.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Full soft-capped logits (small vocabularies / tests only)."""
        emb = self.globals["embedding"].value.astype(hidden.dtype)
        z = (hidden @ emb.T).astype(jnp.float32)
        cap = self.spec.final_soft_cap
        return jnp.tanh(z / cap) * cap if cap else z

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        from gemma4_keras.model import loss

        total, _ = loss.chunked_cross_entropy(
            y_pred,
            self.globals["embedding"].value,
            x["target_ids"],
            x["loss_weights"],
            soft_cap=self.spec.final_soft_cap,
            chunk_size=self.loss_chunk_size,
        )
        # `loss_norm` is the token count of the whole optimiser step divided
        # by the number of micro-batches: Keras averages accumulated
        # gradients, so this gives the exact mean over the global batch.
        return total / x["loss_norm"][0]
