"""`Gemma4LoraModel`: the Gemma 4 text decoder as a training model.

KerasHub's `Gemma4Backbone` is what loads presets and what generates; this
model holds the same text weights (the rows of `model/schema.py`, filled by
`layers.fill_model`) in `layers.DecoderBlock`s, with LoRA adapters as a
separate branch. Its output is the final hidden state, for the chunked loss
(the [batch, seq, 262144] logits never exist), and each decoder block can be
rematerialised.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import keras
import numpy as np
import tqdm

# Keras has no public way to ask whether its step maps the metric variables.
from keras.src.backend.common.stateless_scope import in_stateless_scope

from gemma4_keras import config_lib
from gemma4_keras.model import attention, hub, loss, moe, schema, xla_workarounds
from gemma4_keras.model.layers import (
    DecoderBlock,
    fill_model,
    float16_islands,
    frozen_int8_rows,
    frozen_rows,
    np_dtype,
    rms_norm,
    storage_dtype,
)
from gemma4_keras.model.lora import LoraAdapter, LoraSpec
from gemma4_keras.model.quant import Int8Rows
from gemma4_keras.model.safetensors_io import aligned_empty
from gemma4_keras.model.spec import ModelSpec

PLE_TABLE = "ple_embedding"
# A MoE model's router logs (`compute_loss`), one value per step:
# router_aux_loss: `moe.load_balancing_loss` over every MoE layer's
#   non-padding tokens (logged whatever `router_aux_loss_coef`; top_k when
#   routing is even, larger when it is not);
# expert_load_max / expert_load_min: the largest / smallest share of the
#   routed picks any expert of any MoE layer got, relative to an even share
#   (1.0 = even; 0 = an expert no token picked).
ROUTER_LOGS = ("router_aux_loss", "expert_load_max", "expert_load_min")
MEDIA_INPUTS = ("pixel_values", "audio_features")


class HostTable:
    """A frozen lookup table kept in host memory (`model.ple_on_host`).

    The per-layer-embedding table of E2B/E4B is 262,144 rows of
    layers x 256 values (4.4 / 5.3 GiB in bfloat16), of which a step reads
    only the rows of its tokens. `take` fetches those rows from the host
    inside the compiled step (`jax.pure_callback`): the accelerator holds
    [batch, seq, width] values instead of the table. The table is frozen, so
    no gradient flows to it.

    Example:
      >>> table = HostTable(np.zeros((10, 4), "float32"), "float32")
      >>> table.take(jnp.array([[1, 2]])).shape
      (1, 2, 4)
    """

    def __init__(self, value, dtype):
        value = np.asarray(value)
        target = np_dtype(storage_dtype(value.dtype, dtype))
        self.array = np.ascontiguousarray(value.astype(target, copy=False))
        self.shape, self.dtype = self.array.shape, self.array.dtype

    @property
    def value(self) -> np.ndarray:
        return self.array

    def take(self, ids: jax.Array) -> jax.Array:
        table = self.array

        def rows(i):
            return np.take(table, np.asarray(i), axis=0)

        out = jax.ShapeDtypeStruct((*ids.shape, table.shape[1]), table.dtype)
        return jax.pure_callback(rows, out, ids, vmap_method="sequential")


class Gemma4LoraModel(keras.Model):
    """Gemma 4 text decoder with PEFT-exact LoRA adapters, for training.

    `call` takes a batch dict (`token_ids`, `positions`, `segment_ids`) and
    returns the final hidden states [B, T, D]; `compute_loss` turns them into
    the masked, chunked cross-entropy against the tied embedding. The same
    pass decodes with a KV cache (`call(..., cache=...)`; the sampler and
    KerasHub's `CausalLM` glue are in `model/decoding.py`).

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
        ple_on_host: bool = False,
        embedding_quant: str = "none",
        dtype=None,
        **kwargs,
    ):
        super().__init__(dtype=dtype, **kwargs)
        self.spec = spec
        self.remat = remat
        self.ple_on_host = bool(ple_on_host and spec.ple_dim)
        if embedding_quant not in config_lib.EMBEDDING_QUANTS:
            raise ValueError(
                f"quant.embedding={embedding_quant!r}: must be one of "
                f"{', '.join(config_lib.EMBEDDING_QUANTS)}"
            )
        # How the tied embedding is stored (`config_lib.EMBEDDING_QUANTS`).
        self.embedding_quant = embedding_quant
        self.loss_chunk_size = loss_chunk_size
        self.blocks = [
            DecoderBlock(spec, i, dtype=self.dtype_policy, name=f"block_{i}")
            for i in range(spec.num_layers)
        ]
        self.globals: dict[str, keras.Variable] = {}
        self.lora_specs: dict[str, LoraSpec] = {}
        self.active_adapter: str | None = None
        self.dropout_seed = keras.random.SeedGenerator(0, name="lora_dropout_seed")
        # The frozen vision / audio towers and the ids they fill (`attach_towers`).
        self.towers: hub.Towers | None = None
        self.tower_lora = []  # (layer, target, Keras layer): enable_tower_lora
        self.router_aux_loss_coef = 0.0  # `set_router_aux_loss`
        self._router = None  # (hidden, router stats) of the last `call`
        if spec.moe:
            # Per optimiser step in Keras' logs (mean over its micro-batches).
            self.router_metrics = {
                name: keras.metrics.Mean(name=name) for name in ROUTER_LOGS
            }

    # --- construction -------------------------------------------------------

    @classmethod
    def build(
        cls,
        spec: ModelSpec,
        fill: Callable[..., None],
        lora: LoraSpec | None = None,
        *,
        dtype: str,
        quant: str = "none",
        double_quant: bool = False,
        block_size: int = 64,
        remat: bool = False,
        loss_chunk_size: int = 1024,
        ple_on_host: bool = False,
        embedding_quant: str = "none",
    ) -> Gemma4LoraModel:
        """The training model of `spec`, its frozen base loaded by `fill`.

        `fill(model, quant=, double_quant=, block_size=)` is `layers.fill_model`
        over a source (`from_backbone`, `stream_load.stream_training_model`).
        """
        model = cls(
            spec,
            remat=remat,
            loss_chunk_size=loss_chunk_size,
            ple_on_host=ple_on_host,
            embedding_quant=embedding_quant,
            name="gemma4_lora_model",
            dtype=dtype,
        )
        fill(model, quant=quant, double_quant=double_quant, block_size=block_size)
        return model.finish_loading(lora)

    @classmethod
    def from_backbone(
        cls, backbone, lora: LoraSpec | None = None, *, dtype=None, **options
    ) -> Gemma4LoraModel:
        """The training model of a KerasHub `Gemma4Backbone`'s text weights.

        Read row by row (`layers.fill_model` over `hub.BackboneSource`), as
        `stream_load` reads a checkpoint's safetensors; `options` as `build`.
        """
        # On a terminal only (`disable=None`): quantising E4B takes minutes.
        with tqdm.tqdm(
            desc=f"loading {backbone.name}",
            unit="B",
            unit_scale=True,
            disable=None,
            leave=False,
        ) as progress:
            source = hub.BackboneSource(backbone, progress)
            return cls.build(
                hub.spec_from_config(backbone.get_config()),
                lambda model, **quant: fill_model(model, source, **quant),
                lora,
                dtype=dtype or backbone.dtype_policy.name,
                **options,
            )

    def finish_loading(self, lora: LoraSpec | None) -> Gemma4LoraModel:
        """Marks a filled model built and adds adapter `default`.

        Every loader (`from_backbone`, `stream_load`) calls it once every base
        variable exists: marking the model built lets `stateless_call` (the
        jitted train step) run without an eager call.
        """
        self.built = True
        if lora is not None:
            self.add_adapter("default", lora)
        return self

    def attach_towers(self, towers: hub.Towers) -> None:
        """Reads images and audio with `towers` (`hub.load_towers`), frozen.

        Their outputs replace the embeddings of the image / audio soft
        tokens (`call`'s `pixel_values`, `audio_features` inputs).

        The encoders are tracked as sub-layers, so their weights are
        non-trainable variables of this model: the jitted train / eval step
        takes them as arguments, as it takes the frozen base, instead of
        embedding them as constants (hundreds of MB of HLO at real size).
        """
        for layer in getattr(self, "tower_layers", ()):
            self._tracker.untrack(layer)  # towers attached before these
        self.towers = towers
        self.tower_layers = [t for t in (towers.vision, towers.audio) if t is not None]
        for layer in self.tower_layers:
            layer.trainable = False
        self.tower_lora = []  # enable_tower_lora's sites
        lora = self.lora_specs.get("default")
        if lora is not None and lora.tower_targets:
            self.enable_tower_lora(
                lora.tower_targets, lora.rank, lora.alpha, lora.seed, lora.rslora
            )
        # Steps compiled before this call would not take the towers' weights.
        self.train_function = self.test_function = self.predict_function = None

    def enable_tower_lora(
        self,
        targets,
        rank: int,
        alpha: float,
        seed: int = 0,
        rslora: bool = False,
    ) -> list[tuple[int, str, keras.layers.Layer]]:
        """LoRA on the vision tower's `targets` (`schema.TOWER_TARGETS`), PEFT's.

        Keras' own `enable_lora` on each target layer of every encoder block,
        scaled as PEFT (`LoraAdapter.scale_of`); A ~ U(+-1/sqrt(in)), B = 0 (as the
        decoder's `LoraAdapter`). The A / B variables are the tower's only
        trainable ones, and its soft tokens carry gradients from then on.
        Call after `attach_towers`. Returns (layer, target, Keras layer).
        """
        vision = self.towers.vision if self.towers is not None else None
        if vision is None:
            raise config_lib.ConfigError(
                f"lora.targets names vision tower targets {list(targets)}, but "
                "the model has no vision tower: set model.towers=on on a "
                "multimodal checkpoint, or drop the vision_tower.* targets"
            )
        # A layer with trainable=False hides its sublayers' weights: the
        # tower is trainable, each of its variables but the LoRA ones is not.
        vision.trainable = True
        for variable in vision.weights:
            variable.trainable = False
        blocks = vision.get_layer("image_encoder").encoder_blocks
        sites = []
        for i, block in enumerate(blocks):
            for target in targets:
                layer = block
                for attr in schema.TOWER_TARGETS[target][1].split("."):
                    layer = getattr(layer, attr)
                fan_in = int(np.prod(layer.kernel.shape[:-1]))
                bound = 1.0 / math.sqrt(fan_in)
                layer.enable_lora(
                    rank,
                    # Keras scales lora_alpha / rank.
                    lora_alpha=LoraAdapter.scale_of(rank, alpha, rslora) * rank,
                    a_initializer=keras.initializers.RandomUniform(
                        -bound, bound, seed=seed + 1000 * i + len(sites)
                    ),
                    b_initializer="zeros",
                )
                sites.append((i, target, layer))
        self.tower_lora = sites
        self.train_function = self.test_function = self.predict_function = None
        return sites

    def set_attention(self, implementation: str = "auto", chunk_size: int = 512):
        """How every block computes attention (`model/attention.py`).

        Args:
          implementation: auto | dense | chunked | fused (`model.attention`).
          chunk_size: queries per chunk of the chunked path
            (`model.attention_chunk_size`); auto chunks rows longer than it.
        """
        attention.check_implementation(implementation)
        if chunk_size < 1:
            raise ValueError(f"model.attention_chunk_size={chunk_size}: must be >= 1")
        for blk in self.blocks:
            blk.attention = implementation
            blk.attention_chunk_size = int(chunk_size)

    def set_moe(self, dispatch: str = "auto", token_chunk: int = 0) -> None:
        """How every MoE block computes its experts (`model/moe.py`).

        Args:
          dispatch: auto | ragged | blocks | dense (`model.moe_dispatch`).
          token_chunk: tokens per chunk of the routed experts, each chunk
            recomputed in the backward pass (`model.moe_token_chunk`;
            0 = every token at once).
        """
        moe.check_dispatch(dispatch)
        moe.check_token_chunk(token_chunk)
        for blk in self.blocks:
            blk.moe_dispatch = dispatch
            blk.moe_token_chunk = int(token_chunk)

    def add_global(self, name: str, shape, blocks, dtype=None) -> None:
        """Holds model-level tensor `name`, given as consecutive blocks of rows.

        Kept in `storage_dtype(source dtype, dtype or the variable dtype)`,
        frozen; the PLE table stays in host memory under `ple_on_host`, the
        tied embedding as int8 rows under `embedding_quant="int8"`.
        """
        blocks = iter(blocks)
        first = next(blocks)
        storage = storage_dtype(first.dtype, dtype or self.variable_dtype)
        blocks = itertools.chain([first], blocks)
        if name == PLE_TABLE and self.ple_on_host:
            table = aligned_empty(tuple(shape), np_dtype(storage))
            start = 0
            for b in blocks:
                table[start : start + len(b)] = b
                start += len(b)
            self.globals[name] = HostTable(table, storage)  # stays in host memory
        elif name == "embedding" and self.embedding_quant == "int8":
            self.globals[name] = frozen_int8_rows(self, name, shape, blocks)
        else:
            self.globals[name] = frozen_rows(self, name, shape, blocks, storage)

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
                experts=self.spec.adapter_experts(target),
                name=f"lora_{name}_layers_{layer}_{_attr(target)}",
            )
            seed += 1
            self.blocks[layer].adapters.setdefault(name, {})[target] = adapter
            # Track through the block so Keras sees the variables.
            setattr(self.blocks[layer], f"_lora_{name}_{_attr(target)}", adapter)
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
                delattr(blk, f"_lora_{name}_{_attr(target)}")
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

    def call(
        self, inputs, training=False, cache=None, cache_index=0, cache_update_mask=None
    ):
        """Final hidden states [B, t, D]; with a `cache`, (hidden, updated cache).

        Args:
          inputs: `token_ids`, `positions` and `segment_ids` [B, t] (0 =
            padding). Without a cache, whole packed rows: each token attends
            within its segment. With one, the tokens at cache positions
            `cache_index`.. of every row: their keys and values are written
            there, and each attends over the cache (causally, within its
            layer's window); keys written with segment id 0 (prompt padding)
            are never attended to.
          training: LoRA dropout on.
          cache: None, or one (k, v) [B, T, kv_heads, head_dim] per layer
            that owns K/V and None for KV-shared layers
            (`decoding.empty_cache`).
          cache_index: the cache position of `token_ids[:, 0]`.
          cache_update_mask: [B, t], False where the cache keeps its entry.

        Images and audio (with `attach_towers`; with a cache, in the
        prefill of the whole buffer): `pixel_values`
        [N, patches, 3 * patch**2] and `pixel_position_ids` [N, patches, 2]
        (`data.media.image_features`, one row per image in token order),
        `audio_features` [M, frames, 128] and `audio_mask` [M, frames]
        (`data.media.audio_features`). Their soft tokens replace the
        embeddings of the image / audio token ids, in order, as
        transformers' `Gemma4Model.forward` does. Batches of the data
        pipeline carry them per row, [B, images, ...] and [B, clips, ...]
        (`data.packing`: empty slots give no soft token), read row-major.
        The towers are frozen: their outputs pass `stop_gradient`, so the
        backward pass never reaches (or recomputes) them.
        """
        token_ids = inputs["token_ids"]
        positions = inputs["positions"]
        segment_ids = inputs["segment_ids"]
        x, ple = self.embed(token_ids, inputs)
        blocks = None
        if self.towers is not None and self.spec.vision_bidirectional:
            blocks = attention.vision_blocks(token_ids == self.towers.image_token_id)
        base_key = self.dropout_seed.next() if training else None
        if cache is not None:
            masks = self._cache_masks(
                positions, segment_ids, cache, cache_index, blocks
            )
        # (k, v) each layer attended over: what KV-shared layers read (the
        # training pass's handover) and, with a cache, the updated cache.
        kv: dict[int, tuple] = {}
        router: dict[int, tuple | None] = {}  # MoE layers' `moe.router_stats`
        for blk in self.blocks:
            b = blk.bspec
            keys = self._dropout_keys(base_key, blk)
            shared = None if b.has_kv else kv[b.kv_source]
            ple_i = None if ple is None else ple[:, :, b.index]
            if cache is not None:
                x, kv[b.index] = _cached_block(
                    blk, x, positions, ple_i, shared, keys, cache[b.index],
                    cache_index, cache_update_mask, masks[b.sliding_window],
                )  # fmt: skip
            elif self.remat:
                x, kv[b.index], router[b.index] = xla_workarounds.remat(
                    blk,
                    lambda x, ple, shared, pos, seg, keys, blocks, blk=blk: blk.forward(
                        x, pos, seg, ple, shared, keys, blocks
                    ),
                    (x, ple_i, shared),
                    (positions, segment_ids, keys, blocks),
                )
            else:
                x, kv[b.index], router[b.index] = blk.forward(
                    x, positions, segment_ids, ple_i, shared, keys, blocks
                )
        hidden = rms_norm(x, self.globals["final_norm"].value, self.spec.eps)
        if cache is None:
            if self.spec.moe:
                # Keras' train / test step calls `compute_loss` with what
                # `call` returned, in the same trace: the router statistics
                # ride along, tagged with the hidden states they belong to.
                self._router = (hidden, [router[i] for i in sorted(router)])
            return hidden
        return hidden, tuple(
            kv[b.index] if b.has_kv else None for b in self.spec.blocks
        )

    def _cache_masks(self, positions, segment_ids, cache, index, blocks=None) -> dict:
        """{window: [B, t, T] mask} of queries at `positions` over the cache.

        `blocks` (bidirectional image tokens, on sliding layers) count in
        the prefill of the whole buffer only; a later step's soft token is a prompt token whose
        cache entry the prefill wrote (`cache_update_mask`).
        """
        length = next(c[0].shape[1] for c in cache if c is not None)
        if blocks is not None and positions.shape[1] != length:
            blocks = None
        key_valid = jax.lax.dynamic_update_slice_in_dim(
            jnp.ones((positions.shape[0], length), bool),
            segment_ids > 0,
            jnp.asarray(index, jnp.int32),
            axis=1,
        )
        windows = {b.sliding_window for b in self.spec.blocks}
        # Bidirectional on sliding layers only, as `DecoderBlock.forward`.
        return {
            w: attention.cache_mask(
                positions, key_valid, w, None if w is None else blocks
            )
            for w in windows
        }

    def embed(self, token_ids, media=None) -> tuple[jax.Array, jax.Array | None]:
        """(scaled token embeddings [B, T, D], PLE inputs [B, T, L, P] or None).

        With towers attached, soft-token ids read as the pad id and their
        embeddings are the towers' outputs for `media` (see `call`); the PLE
        projection reads the merged embeddings, as transformers does.
        """
        dtype = self.compute_dtype
        if float16_islands(dtype):  # the residual stream stays float32
            dtype = "float32"
        ids = token_ids
        given = [k for k in MEDIA_INPUTS if media is not None and k in media]
        if given and self.towers is None:
            raise ValueError(
                f"{', '.join(given)} given, but the model has no vision/audio "
                "towers (attach_towers(hub.load_towers(checkpoint)))"
            )
        if self.towers is not None:
            t = self.towers
            soft = (token_ids == t.image_token_id) | (token_ids == t.audio_token_id)
            ids = jnp.where(soft, t.pad_token_id, token_ids)
        table = self.globals["embedding"].value
        if isinstance(table, Int8Rows):
            x = table.take(ids, dtype)
        else:
            x = jnp.take(table, ids, axis=0).astype(dtype)
        x = x * jnp.asarray(math.sqrt(self.spec.hidden_dim), dtype)
        if self.towers is not None and media is not None:
            x = self._merge_media(token_ids, x, media)
        ple = self._ple_inputs(ids, x) if self.spec.ple_dim else None
        return x, ple

    def _merge_media(self, token_ids, x, media):
        """`x` with the towers' soft tokens at the image / audio token ids, in order."""
        t = self.towers
        # (input, its companion and that one's rank, tower, soft tokens, token id)
        for values, extra, rank, tower, soft_tokens, token in (
            (
                "pixel_values",
                "pixel_position_ids",
                3,
                t.vision,
                t.image_soft_tokens,
                t.image_token_id,
            ),
            (
                "audio_features",
                "audio_mask",
                2,
                t.audio,
                t.audio_soft_tokens,
                t.audio_token_id,
            ),
        ):
            if media.get(values) is None:
                continue
            if tower is None:
                raise ValueError(f"{values} given, but the model has no such tower")
            soft = soft_tokens(
                _per_item(media[values], 3), _per_item(media[extra], rank)
            )
            # Tower LoRA (`enable_tower_lora`) trains through the vision tower.
            tuned = tower is t.vision and self.tower_lora
            x = _scatter(x, token_ids == token, soft if tuned else _frozen(soft))
        return x

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
        """Per-layer inputs [B, T, L, P] as KerasHub computes them (`x` scaled)."""
        s, g = self.spec, self.globals
        p, n = s.ple_dim, s.num_layers
        table = g[PLE_TABLE]
        if isinstance(table, HostTable):
            emb = table.take(token_ids).astype(x.dtype)
        else:
            emb = jnp.take(table.value, token_ids, axis=0).astype(x.dtype)
        emb = emb * jnp.asarray(p**0.5, x.dtype)
        proj = x @ g["ple_projection"].value.astype(x.dtype)
        proj = proj * jnp.asarray(s.hidden_dim**-0.5, x.dtype)
        bsz, t = token_ids.shape
        proj = rms_norm(proj.reshape(bsz, t, n, p), g["ple_norm"].value, s.eps)
        return (proj + emb.reshape(bsz, t, n, p)) * jnp.asarray(2.0**-0.5, x.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Full soft-capped logits (small vocabularies / tests only)."""
        # In hidden's dtype; an embedding stored narrower (or as int8) is not
        # converted whole.
        z = loss._dot("...d,vd->...v", hidden, self.globals["embedding"].value)
        cap = self.spec.final_soft_cap
        return jnp.tanh(z / cap) * cap if cap else z

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """The step's loss: the token-mean cross-entropy over the global batch,
        plus `router_aux_loss_coef` x the load-balancing loss on a MoE model.

        On a MoE model, `y_pred` must be what `call` just returned (Keras'
        train / test step): its router statistics give the auxiliary loss
        and, inside Keras' step, the `ROUTER_LOGS` metrics.
        """
        ce = self._cross_entropy(x, y_pred)
        router = self._router
        if router is None or router[0] is not y_pred:
            if self.router_aux_loss_coef > 0:
                raise ValueError(
                    "router_aux_loss_coef > 0 needs the router statistics of "
                    "the call that returned y_pred; call the model first"
                )
            return ce
        self._router = None
        stats = [s for s in router[1] if s is not None]
        aux = moe.load_balancing_loss(stats)
        if in_stateless_scope():  # Keras' step: metric updates are returned
            loads = expert_loads(stats)
            for name, value in zip(ROUTER_LOGS, (aux, jnp.max(loads), jnp.min(loads))):
                self.router_metrics[name].update_state(value)
        if self.router_aux_loss_coef > 0:
            return ce + jnp.asarray(self.router_aux_loss_coef, ce.dtype) * aux
        return ce

    def set_router_aux_loss(self, coef: float) -> None:
        """Adds `coef` x the load-balancing loss to the training loss.

        `coef` is `train.router_aux_loss_coef` (0 = off, the default, as
        the released model was trained). MoE models only.
        """
        if coef < 0:
            raise ValueError(
                f"train.router_aux_loss_coef={coef}: must be >= 0 (0 = off)"
            )
        if coef > 0 and not self.spec.moe:
            raise ValueError(
                f"train.router_aux_loss_coef={coef}: this model has no experts "
                "(only 26B-A4B is a mixture of experts); set it to 0"
            )
        self.router_aux_loss_coef = float(coef)

    def _cross_entropy(self, x, y_pred):
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


def expert_loads(stats) -> jax.Array:
    """Each MoE layer's expert loads [layers, E]: an expert's share of the
    layer's top-k picks relative to an even share (1.0 = even), from
    `moe.router_stats` of each layer."""
    tokens = jnp.stack([s[0] for s in stats])  # picks per expert
    picks = jnp.maximum(tokens.sum(-1, keepdims=True), 1.0)  # all padding: 0s
    return tokens * tokens.shape[-1] / picks


def _attr(target: str) -> str:
    """A target as a name part: `experts.down_proj` -> `experts_down_proj`."""
    return target.replace(".", "_")


def _per_item(a, rank: int):
    """[N, ...] tower inputs of rank `rank` from per-row [B, K, ...] ones (row-major)."""
    a = jnp.asarray(a)
    if a.ndim == rank + 1:
        a = jnp.reshape(a, (-1,) + a.shape[2:])
    return a


def _frozen(soft):
    """The towers' (soft tokens, valid) with no gradient into the frozen towers."""
    values, valid = soft
    return jax.lax.stop_gradient(values), valid


def _scatter(x, where, soft):
    """`x` [B, T, D] with the valid rows of `soft`, in order, at `where` [B, T].

    transformers' `masked_scatter`: the k-th marked token (row-major) takes
    the k-th valid soft token.
    """
    values, valid = soft
    order = jnp.nonzero(valid, size=valid.shape[0], fill_value=0)[0]
    values = jnp.take(values, order, axis=0).astype(x.dtype)
    flat = jnp.reshape(where, (-1,))
    k = jnp.clip(jnp.cumsum(flat.astype(jnp.int32)) - 1, 0, values.shape[0] - 1)
    merged = jnp.where(
        flat[:, None], jnp.take(values, k, axis=0), x.reshape(-1, x.shape[-1])
    )
    return merged.reshape(x.shape)


def _cached_block(
    blk: DecoderBlock,
    x,
    positions,
    ple_input,
    shared_kv,
    keys,
    cache,
    index,
    update_mask,
    mask,
):
    """One block over tokens at cache `index`: (x, the layer's updated (k, v)).

    A layer that owns K/V writes this step's into its `cache` entry and
    attends over the whole entry; a KV-shared one over `shared_kv`, its
    source layer's updated entry.
    """
    q, new = blk.attention_inputs(x, positions, keys)
    if new is None:
        k, v = shared_kv
    else:
        k, v = (
            attention.write_cache(c, n, index, update_mask) for c, n in zip(cache, new)
        )
    att = attention.dot_attention(q, k, v, mask, blk.bspec.attn_soft_cap)
    return blk.attention_output(x, att, ple_input, keys)[0], (k, v)
