"""LoRA in one place: the adapter layer, its sites, factors, deltas and merges.

`LoraAdapter` is one PEFT-shaped adapter; `LoraSpec` (config `lora.*`) says
which projections get one; `Gemma4LoraModel` adds, activates and unloads
them. An adapter outside a model is a `LoraSpec` plus its factors,
`{(layer, target): (a, b)}` with `a` (in, r) and `b` (r, out): what training
resume, PEFT import and export (`exporters/peft.py` owns only that file
format) and generation exchange.

A merged site computes `x @ (W + scale * A @ B)` in one matmul: the adapter's
logits without the adapter branch (serving, export of a full model). Float
bases are merged in place (a model built to be merged,
`evaluate.merged_model`); quantised bases (NF4, Keras int8/int4) cannot hold
a float delta, so `merged_kernels` returns the dequantised, merged float
matrices instead, for whoever writes the full model out.

Example:
  >>> merge_adapter(model)            # active adapter folded into the base
  >>> hidden = model(batch)           # same logits, no adapter branch
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import keras
import numpy as np

from gemma4_keras import config_lib
from gemma4_keras.model import schema
from gemma4_keras.model import spec as spec_lib
from gemma4_keras.model.spec import ModelSpec, module_name
from gemma4_keras.model.xla_workarounds import stored, tie_to


class LoraAdapter(keras.layers.Layer):
    """One PEFT-shaped adapter: delta(x) = scale * B(A(dropout(x))).

    `lora_a` is (in, r) and `lora_b` is (r, out): PEFT's `lora_A.weight` and
    `lora_B.weight` transposed. Init as PEFT: A ~ U(+-1/sqrt(in)) (Kaiming
    uniform with a=sqrt(5)), B = 0, so a fresh adapter changes nothing.

    `experts=E` (an MoE expert bank, `schema.EXPERT_TARGETS`): one pair per
    expert, `lora_a` (E, in, r) and `lora_b` (E, r, out), as PEFT's
    `target_parameters` LoRA on a 3-D parameter (its `lora_A.weight`
    (E * r, in) holds expert e's A in rows e*r..e*r+r-1; its `lora_B.weight`
    (out, r * E) is (out, r, E) flattened: `exporters/peft.py` converts).
    Same init bound; no dropout (PEFT refuses it there: x cannot be
    factored out of a weight delta).
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
        experts: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if experts and dropout:
            raise config_lib.ConfigError(
                f"lora.dropout={dropout} with expert targets "
                f"({self.name}): PEFT's LoRA on "
                "expert banks has no dropout; set --config.lora.dropout=0"
            )
        if rank > min(in_features, out_features):
            raise config_lib.ConfigError(
                f"lora.rank={rank} is larger than {self.name}'s dimensions "
                f"({in_features} in, {out_features} out); lower --config.lora.rank"
            )
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha, self.dropout, self.rslora = rank, alpha, dropout, rslora
        self.experts = experts
        lead = (experts,) if experts else ()
        bound = 1.0 / math.sqrt(in_features)
        self.lora_a = self.add_weight(
            name="lora_a",
            shape=(*lead, in_features, rank),
            initializer=keras.initializers.RandomUniform(-bound, bound, seed=seed),
            dtype="float32",
        )
        self.lora_b = self.add_weight(
            name="lora_b",
            shape=(*lead, rank, out_features),
            initializer="zeros",
            dtype="float32",
        )

    @staticmethod
    def scale_of(rank: int, alpha: float, rslora: bool) -> float:
        """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return alpha / (math.sqrt(rank) if rslora else rank)

    @property
    def scale(self) -> float:
        return self.scale_of(self.rank, self.alpha, self.rslora)

    def delta(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        if key is not None and self.dropout > 0:
            # Tied to x: made when this adapter runs, not with the layer's
            # others at its start (their generators would all be alive).
            keep = dropout_keep(tie_to(key, x, integers=True), self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        a = jnp.asarray(self.lora_a.value).astype(x.dtype)
        b = jnp.asarray(self.lora_b.value).astype(x.dtype)
        return ((x @ a) @ b) * jnp.asarray(self.scale, x.dtype)

    def delta_weight(self) -> np.ndarray:
        """scale * A @ B, shape (in, out) ((E, in, out) per expert), float32."""
        a = np.asarray(self.lora_a.value, np.float32)
        b = np.asarray(self.lora_b.value, np.float32)
        return (a @ b) * np.float32(self.scale)


def dropout_keep(key: jax.Array, p: float, shape: tuple[int, ...]) -> jax.Array:
    """LoRA dropout's keep mask: True with probability 1 - p (to 2**-17).

    16 random bits an element, two from each 32-bit word (kept where the
    bits are >= round(p * 2**16)): half the words of
    `jax.random.bernoulli`, whose generator holds two words an element
    while it runs (a layer's masks are part of the step's peak: 26B-A4B,
    seq 4096, 674 MiB on XLA:CPU). A drop rate of 0.05 is 0.0500031.
    """
    half = -(-shape[-1] // 2)
    words = jax.random.bits(key, (*shape[:-1], half), jnp.uint32)
    halves = [(words >> 16).astype(jnp.uint16), (words & 0xFFFF).astype(jnp.uint16)]
    bits = jnp.concatenate(halves, axis=-1)[..., : shape[-1]]
    # Stored as booleans, one byte an element, for the backward pass (XLA
    # would keep the bits and compare them again there).
    return stored(bits >= round(p * 65536))


def tower_targets(value) -> tuple[str, ...]:
    """`lora.targets`' vision tower targets, checked against the schema."""
    names = config_lib.lora_tower_targets(value)
    unknown = [n for n in names if n not in schema.TOWER_TARGETS]
    if unknown:
        known = ", ".join(config_lib.TOWER_PREFIX + t for t in schema.TOWER_TARGETS)
        raise config_lib.ConfigError(
            f"lora.targets has unknown vision tower target(s) "
            f"{[config_lib.TOWER_PREFIX + n for n in unknown]}; known: {known} "
            "(q/k/v_proj: Keras' LoRA on their per-head kernels is not PEFT's)"
        )
    return tuple(t for t in schema.TOWER_TARGETS if t in names)


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
    # The vision tower's targets (`schema.TOWER_TARGETS`; `lora.targets`
    # `vision_tower.<name>`): `Gemma4LoraModel.attach_towers` adapts them.
    tower_targets: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, c) -> LoraSpec:
        layers = config_lib.lora_layers(c.layers)
        return cls(
            rank=int(c.rank),
            alpha=float(c.alpha),
            dropout=float(c.dropout),
            targets=tuple(config_lib.lora_targets(c.targets, schema.EXPERT_TARGETS)),
            layers=None if layers is None else tuple(layers),
            rslora=bool(c.rslora),
            seed=int(c.seed),
            tower_targets=tower_targets(c.targets),
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


def _adapter_name(model, name: str | None) -> str:
    name = name or model.active_adapter
    if name is None or name not in model.lora_specs:
        raise KeyError(
            f"no adapter {name!r} to merge; loaded: {sorted(model.lora_specs)}"
        )
    return name


def _site_weights(model, layer: int, target: str) -> list:
    """[(schema row, its frozen holder)] a site adapts: the projection's
    FrozenLinear, or an expert target's bank holders (fused rows share one
    adapter, `schema.part_of`)."""
    blk = model.blocks[layer]
    return [
        (r, blk.proj[r.name] if r.kind == "projection" else blk.extra[r.name])
        for r in schema.target_rows(target)
    ]


def _held_float32(holder) -> np.ndarray:
    """A frozen weight as float32 (in, out) / (E, in, out), dequantised."""
    if hasattr(holder, "weight"):  # FrozenLinear
        return np.asarray(holder.weight("float32"))
    if hasattr(holder, "dequantize"):  # an NF4 expert bank
        return np.asarray(holder.dequantize("float32"))
    return np.asarray(holder.value, np.float32)


def _float_kernel(model, layer: int, target: str):
    """The Dense kernel variable of a float site; raises for quantised ones."""
    if spec_lib.is_expert_target(target):
        return _float_banks(model, layer, target)
    proj = model.blocks[layer].proj[target]
    if proj.quant != "none":
        raise config_lib.ConfigError(
            f"layers.{layer}.{target} is stored as {proj.quant}; an in-place merge "
            "would need a float kernel. Use gemma4_keras.model.lora.merged_kernels(model) "
            "to get dequantised, merged float weights instead."
        )
    return proj.dense.kernel


def _float_banks(model, layer: int, target: str) -> list:
    """[(row, bank variable)] of a float expert target; raises for NF4."""
    out = _site_weights(model, layer, target)
    for row, holder in out:
        if not isinstance(holder, keras.Variable):
            raise config_lib.ConfigError(
                f"layers.{layer}.{row.name} is stored as NF4; an in-place merge "
                "would need a float bank. Use gemma4_keras.model.lora.merged_kernels(model) "
                "to get dequantised, merged float weights instead."
            )
    return out


def merge_adapter(model, name: str | None = None) -> int:
    """Folds adapter `name` (default: the active one) into the float base kernels.

    The adapter branch is then switched off (`model.set_adapter(None)`), so
    the model computes the adapter's logits through the base alone. Only one
    adapter can be merged at a time.

    Args:
        model: a `Gemma4LoraModel` with a float (`quant="none"`) base.
        name: adapter to merge; default the active one.

    Returns:
        The number of kernels changed.

    Raises:
        ConfigError: a site is quantised (use `merged_kernels`), or another
            adapter is merged already.
    """
    name = _adapter_name(model, name)
    merged = getattr(model, "_merged_adapter", None)
    if merged is not None:
        raise config_lib.ConfigError(
            f"adapter {merged!r} is merged already; merge into a freshly loaded model"
        )
    adapters = model.adapters(name)
    kernels = {site: _float_kernel(model, *site) for site in adapters}  # all first
    for site, adapter in adapters.items():
        delta = adapter.delta_weight()
        held = kernels[site]
        parts = held if isinstance(held, list) else [(None, held)]
        for row, var in parts:
            part = delta if row is None else schema.part_of(row, delta)
            dtype = np.asarray(var.value).dtype
            # Add in float32, round once to the kernel's dtype.
            var.assign((np.asarray(var.value, np.float32) + part).astype(dtype))
    model._merged_adapter = name
    model.set_adapter(None)
    return len(adapters)


def merged_kernels(model, name: str | None = None) -> dict[tuple[int, str], np.ndarray]:
    """{(layer, target): W + scale * A @ B} as float32 (in, out) arrays (an
    expert target: (E, in, out), the fused rows side by side as in its HF
    tensor, e.g. [gate | up]).

    Works for every base: NF4 and Keras int8/int4 kernels are dequantised
    first (the merged weight is exactly what the adapter model computes with),
    float kernels are read as they are. Sites without an adapter are left out.
    The model is not changed.
    """
    name = _adapter_name(model, name)
    out = {}
    for (layer, target), adapter in model.adapters(name).items():
        held = [_held_float32(h) for _, h in _site_weights(model, layer, target)]
        base = held[0] if len(held) == 1 else np.concatenate(held, axis=-1)
        out[(layer, target)] = base + adapter.delta_weight()
    return out


# ----------------------------------------------------------------------------
# Adapters as data: factors and deltas.

Factors = dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]


class AdapterMismatchError(ValueError):
    """Adapter factors that do not fit the model (size, layer, shape)."""


def adapter_factors(model, name: str | None = None) -> tuple[LoraSpec, Factors]:
    """(spec, {(layer, target): (a, b)}) of adapter `name`, float32.

    Example:
      >>> spec, factors = adapter_factors(model)   # the active adapter
    """
    name = _adapter_name(model, name)
    factors = {
        site: (
            np.asarray(a.lora_a.value, np.float32),
            np.asarray(a.lora_b.value, np.float32),
        )
        for site, a in sorted(model.adapters(name).items())
    }
    return model.lora_specs[name], factors


def tower_factors(model) -> Factors:
    """{(layer, "vision_tower.<target>"): (a (in, r), b (r, out))}, float32, of
    the vision tower's LoRA (`Gemma4LoraModel.enable_tower_lora`); {} if none.

    o_proj's Keras A (N, H, r) flattens to (N * H, r), its input order.
    """
    out = {}
    for layer, target, keras_layer in getattr(model, "tower_lora", None) or ():
        a = np.asarray(keras_layer.lora_kernel_a.value, np.float32)
        b = np.asarray(keras_layer.lora_kernel_b.value, np.float32)
        out[(layer, config_lib.TOWER_PREFIX + target)] = (a.reshape(-1, a.shape[-1]), b)
    return out


def add_adapter_from_factors(
    model, spec: LoraSpec, factors: Factors, name: str = "default", activate=True
) -> None:
    """Adds adapter `name` to `model` with the given factors.

    Sites the spec covers but `factors` omits (e.g. a PEFT file of a layer
    subset) stay at B = 0, i.e. no effect, exactly as in PEFT.

    Raises:
      AdapterMismatchError: naming the site when a factor does not fit.
    """
    check_factors(model.spec, spec.rank, factors)
    model.add_adapter(name, spec, activate=activate)
    adapters = model.adapters(name)
    for site, (a, b) in factors.items():
        adapters[site].lora_a.assign(np.asarray(a, np.float32))
        adapters[site].lora_b.assign(np.asarray(b, np.float32))


def check_factors(spec: ModelSpec, rank: int, factors: Factors) -> None:
    """Raises AdapterMismatchError if a factor does not fit `spec`."""
    for (layer, target), (a, b) in sorted(factors.items()):
        where = module_name(layer, target)
        if layer >= spec.num_layers:
            raise AdapterMismatchError(
                f"{where}: the model has only {spec.num_layers} layers "
                "(an adapter for another Gemma 4 size?)"
            )
        if not spec.has_projection(layer, target):
            why = (
                "V is computed by k_proj (attention_k_eq_v)"
                if target == "v_proj" and spec.blocks[layer].has_kv
                else "KV-shared layer"
            )
            raise AdapterMismatchError(f"{where}: this layer has no {target} ({why})")
        din, dout = spec.projection_shape(layer, target)
        if experts := spec.adapter_experts(target):
            want = (experts, din, rank), (experts, rank, dout)
            if (a.shape, b.shape) != want:
                raise AdapterMismatchError(
                    f"{where}: A {tuple(a.shape)} / B {tuple(b.shape)} (ours: "
                    f"(E, in, r) / (E, r, out)) do not fit rank {rank} on "
                    f"{experts} experts of ({din}, {dout}); expected {want[0]} / {want[1]}"
                )
        elif a.shape != (din, rank) or b.shape != (rank, dout):
            raise AdapterMismatchError(
                f"{where}: lora_A {tuple(a.shape[::-1])} / lora_B {tuple(b.shape[::-1])} "
                f"do not fit rank {rank} on a ({dout}, {din}) weight; expected "
                f"({rank}, {din}) / ({dout}, {rank})"
            )


def deltas(spec: LoraSpec, factors: Factors) -> dict[tuple[int, str], np.ndarray]:
    """{(layer, target): scale * a @ b}, (in, out) float32."""
    scale = np.float32(LoraAdapter.scale_of(spec.rank, spec.alpha, spec.rslora))
    return {
        site: (np.asarray(a, np.float32) @ np.asarray(b, np.float32)) * scale
        for site, (a, b) in factors.items()
    }


def model_deltas(model, name: str | None = None) -> dict[tuple[int, str], np.ndarray]:
    """{(layer, target): scale * A @ B} of adapter `name`, (in, out) float32."""
    return {site: a.delta_weight() for site, a in model.adapters(name).items()}
