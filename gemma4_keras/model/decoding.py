"""KV-cached decoding with the training model, through KerasHub's CausalLM contract.

`Gemma4LoraCausalLM` wraps a `Gemma4LoraModel` (sharing its variables: no
second copy of the base) and implements what `keras_hub.models.CausalLM`
asks of a task: `call_with_cache`, `_build_cache` and `generate_step`, all
through the model's own forward pass (`Gemma4LoraModel.call(..., cache=)`).
KerasHub's own `generate()` then compiles the whole decode (prefill, then a
`while_loop` of single-token steps) and its samplers pick the tokens
(`compile(sampler="greedy" | "top_k" | "top_p" | "random" | a Sampler)`).

Example:
  >>> lm = Gemma4LoraCausalLM(model)      # float or NF4 base, adapters on/off
  >>> lm.compile(sampler="top_k")
  >>> out = lm.generate({"token_ids": ids, "padding_mask": mask})
  >>> model.set_adapter(None)             # the base alone, same model
  >>> base = lm.generate({"token_ids": ids, "padding_mask": mask})

Prompts are right-padded, as KerasHub's: `padding_mask` marks each row's
prompt; generation fills the rest of the buffer, or stops once every row
has produced one of `stop_token_ids` (default: the Gemma 4 -it
`generation_config.json` ids, `<eos>`, `<turn|>`, `<|tool_response>`).

What the contract does not carry, and what this class adds for it:

* Adapter switching: the active adapter is Python state read while
  tracing, so KerasHub's single cached `generate_function` would go on
  decoding with the adapter it was traced with. `make_generate_function`
  keeps one compiled function per active adapter. The base alone (no
  adapter active) reuses a loaded adapter's function with that adapter's B
  factors held at zero for the call: its branch then adds exactly 0, so the
  tokens are the base's, without a second compilation.
* Quantised bases need nothing extra: each block dequantises NF4 (or runs
  Keras' int8/int4 matmul) inside the compiled step exactly as in training
  (`FrozenLinear.apply`); the packed codes are ordinary model variables.
* The cache is a tuple with one (k, v) pair [B, T, kv_heads, head_dim] per
  layer that owns K/V, each in its own head dim, and None for KV-shared
  layers, which read their source layer's entry (KerasHub stacks one
  zero-padded [B, layers, 2, T, heads, max_head_dim] tensor instead).
  Sliding-window layers keep the whole buffer and mask by distance.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

from gemma4_keras.data import packing
from gemma4_keras.model import hub
from gemma4_keras.model.xla_workarounds import weights_read_per_step

# eos_token_id of the Gemma 4 -it generation_config.json: <eos>, <turn|>,
# <|tool_response>.
STOP_IDS = (1, 106, 50)

Cache = tuple  # ((k, v) | None per layer)


def empty_cache(model, batch: int, length: int) -> Cache:
    """Zero K/V buffers of `length` positions for every layer that owns K/V."""
    dtype = model.compute_dtype
    out = []
    for b in model.spec.blocks:
        shape = (batch, length, b.num_kv_heads, b.head_dim)
        out.append(
            (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) if b.has_kv else None
        )
    return tuple(out)


def model_inputs(token_ids, index, padding_mask=None) -> dict:
    """The model's inputs for tokens at positions `index`.. (padding: segment 0)."""
    bsz, t = token_ids.shape
    positions = jnp.asarray(index, jnp.int32) + jnp.arange(t, dtype=jnp.int32)
    segments = (
        jnp.ones((bsz, t), jnp.int32)
        if padding_mask is None
        else jnp.asarray(padding_mask).astype(jnp.int32)
    )
    return {
        "token_ids": token_ids,
        "positions": jnp.broadcast_to(positions, (bsz, t)),
        "segment_ids": segments,
    }


def stop_padding_mask(token_ids, padding_mask, stop_token_ids):
    """True up to and including each row's first generated stop id."""
    if stop_token_ids is None:
        return jnp.ones_like(token_ids, dtype=bool)
    end = jnp.isin(token_ids, jnp.asarray(stop_token_ids)) & ~padding_mask
    end = end.astype(jnp.int32)
    return (jnp.cumsum(end, axis=-1) - end) == 0


def base_precision(model) -> str:
    """How the frozen base is stored: "nf4", "int8", "int4", or its float dtype.

    >>> f"{base_precision(model)} + adapter"
    'nf4 + adapter'
    """
    proj = next(iter(model.blocks[0].proj.values()))
    if proj.quant != "none":
        return proj.quant
    return str(proj.dense.kernel.dtype)


class Gemma4LoraCausalLM(hub.CausalLM):
    """KerasHub's `CausalLM` over a `Gemma4LoraModel`: `generate()` with samplers.

    Args:
      model: the training model (float, int8/int4 or NF4 base; adapters).
        Available as `.backbone`; its variables are shared, not copied.
      preprocessor: optional `Gemma4CausalLMPreprocessor` for string prompts
        (mind the BOS: chat prompts rendered with `<bos>` are tokenized
        without adding another).
      stop_token_ids: what `generate(stop_token_ids="auto")` stops on.
      sampler: KerasHub sampler name or instance (`compile` can change it).

    Example:
      >>> lm = Gemma4LoraCausalLM(model, sampler="top_p")
      >>> lm.generate({"token_ids": ids, "padding_mask": ids > 0})["token_ids"]
    """

    def __init__(
        self,
        model,
        preprocessor=None,
        *,
        stop_token_ids=STOP_IDS,
        sampler="greedy",
        **kwargs,
    ):
        super().__init__(
            compile=False, name=kwargs.pop("name", "gemma4_lora_causal_lm"), **kwargs
        )
        self.backbone = model
        self.preprocessor = preprocessor
        self.stop_token_ids = tuple(int(i) for i in stop_token_ids)
        self._generate_functions: dict = {}
        self.compile(sampler=sampler)

    def compile(
        self,
        optimizer="auto",
        loss="auto",
        *,
        weighted_metrics="auto",
        sampler="greedy",
        **kwargs,
    ):
        """As `CausalLM.compile` (its sampler is what `generate` uses)."""
        super().compile(
            optimizer=optimizer,
            loss=loss,
            weighted_metrics=weighted_metrics,
            sampler=sampler,
            **kwargs,
        )
        self._generate_functions = {}

    def call(self, inputs):
        """Soft-capped logits of a full (uncached) forward pass, right-padded rows."""
        model = self.backbone
        ids = inputs["token_ids"]
        return model.logits(model(model_inputs(ids, 0, inputs.get("padding_mask"))))

    def call_with_cache(
        self,
        token_ids,
        cache,
        cache_update_index,
        padding_mask=None,
        cache_update_mask=None,
    ):
        """(logits [B, t, V], hidden [B, t, D], cache) for tokens at `cache_update_index`."""
        hidden, cache = self._forward(
            token_ids, cache, cache_update_index, padding_mask, cache_update_mask
        )
        return self.backbone.logits(hidden), hidden, cache

    def _forward(
        self, token_ids, cache, index, padding_mask=None, update_mask=None, media=None
    ):
        """(hidden, cache): the model's forward pass at `index` of the cache."""
        return self.backbone(
            {**model_inputs(token_ids, index, padding_mask), **(media or {})},
            cache=cache,
            cache_index=jnp.asarray(index, jnp.int32),
            cache_update_mask=update_mask,
        )

    def _build_cache(self, token_ids, padding_mask, media=None):
        """Prefill: the whole right-padded buffer in one pass. Returns (hidden, cache).

        `media`: the rows' tower inputs (`data.packing.media_inputs`), whose
        soft tokens the prefill writes into the cache.
        """
        cache = empty_cache(self.backbone, token_ids.shape[0], token_ids.shape[1])
        return self._forward(token_ids, cache, 0, padding_mask, media=media)

    def generate_step(self, inputs, stop_token_ids=None):
        """One batch: prefill, then the sampler's loop from the shortest prompt on.

        Rows with longer prompts step through their own prompt tokens first
        (the sampler keeps them; the cache keeps the prefill's entries).
        """
        token_ids = jnp.asarray(inputs["token_ids"])
        padding_mask = jnp.asarray(inputs["padding_mask"]).astype(bool)
        media = {k: inputs[k] for k in packing.MEDIA_FIELDS if k in inputs}
        hidden, cache = self._build_cache(token_ids, padding_mask, media)
        index = jnp.min(jnp.sum(padding_mask.astype(jnp.int32), axis=-1))

        def next(prompt, cache, index):
            last = jax.lax.dynamic_slice_in_dim(prompt, index - 1, 1, axis=1)
            keep = ~jax.lax.dynamic_slice_in_dim(padding_mask, index - 1, 1, axis=1)
            with weights_read_per_step(self.backbone, index):
                logits, hidden, cache = self.call_with_cache(
                    last, cache, index - 1, cache_update_mask=keep
                )
            return logits[:, 0], hidden[:, 0], cache

        token_ids = self.sampler(
            next=next,
            prompt=token_ids,
            cache=cache,
            index=index,
            mask=padding_mask,
            stop_token_ids=stop_token_ids,
            hidden_states=hidden,
            model=self,
        )
        return {
            "token_ids": token_ids,
            "padding_mask": stop_padding_mask(token_ids, padding_mask, stop_token_ids),
        }

    def make_generate_function(self):
        """KerasHub's compiled generate function, one per active adapter."""
        key = self.backbone.active_adapter
        if key not in self._generate_functions:
            self.generate_function = None
            self._generate_functions[key] = super().make_generate_function()
        self.generate_function = self._generate_functions[key]
        return self.generate_function

    def generate(
        self, inputs, max_length=None, stop_token_ids="auto", strip_prompt=False
    ):
        """`CausalLM.generate`; `stop_token_ids="auto"` = this model's stop ids."""
        if stop_token_ids == "auto":
            stop_token_ids = self.stop_token_ids
        kwargs = dict(
            max_length=max_length,
            stop_token_ids=stop_token_ids,
            strip_prompt=strip_prompt,
        )
        model = self.backbone
        if model.active_adapter is not None or not model.lora_specs:
            return super().generate(inputs, **kwargs)
        with base_through_adapter(model, self._base_carrier()):
            return super().generate(inputs, **kwargs)

    def _base_carrier(self) -> str:
        """The adapter whose compiled function the base alone runs through."""
        compiled = [k for k in self._generate_functions if k is not None]
        return compiled[0] if compiled else sorted(self.backbone.lora_specs)[0]


@contextlib.contextmanager
def base_through_adapter(model, name: str):
    """Activates adapter `name` with its B factors at zero; restores both after.

    x @ A @ 0 adds exactly 0 to every projection, so the model computes the
    base alone, through the (already compiled) graph of adapter `name`.
    """
    saved = [(a.lora_b, a.lora_b.value) for a in model.adapters(name).values()]
    try:
        for var, _ in saved:
            var.assign(jnp.zeros(var.shape, var.dtype))
        model.set_adapter(name)
        yield
    finally:
        for var, value in saved:
            var.assign(value)
        model.set_adapter(None)


__all__ = [
    "Gemma4LoraCausalLM",
    "STOP_IDS",
    "base_precision",
    "empty_cache",
    "model_inputs",
]
