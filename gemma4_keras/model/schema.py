"""Every tensor of the Gemma 4 text decoder, one row each: the weight schema.

A row names a tensor four ways and says when it exists:

    name     ours: a global (`model.globals[name]`) or a block variable
             (`DecoderBlock.norms / proj / extra[name]`)
    hf       the Hugging Face name under the text prefix (`model.` or
             `model.language_model.`), `{i}` the layer
    keras    the KerasHub variable: a layer of `Gemma4Backbone` (`get_layer`)
             and an attribute path, `decoder_block_{i}` for block rows
    kind     global | norm | projection | extra | bank (how a block holds it)

and gives our shape from the spec (`dims`, `shape(spec, block)`), the HF layout
(`hf_layout`: same; linear = an `nn.Linear` (out, in) weight, our (in, out)
kernel is its transpose; scalar = HF (1,), ours (); bank = a KerasHub expert
bank (E, in, out), HF (E, out, in), `fused` parts of one HF tensor along
axis 1), the KerasHub kernel layout (`keras_layout`, `hub.keras_to_2d`), the
dtype rule (`float32`: norm scales; else the compute dtype, never wider than
the source, `layers.storage_dtype`) and when it is present (`when`:
PLE, MoE, own K/V, own projection; `present(spec, block)`).

The model's variables, both loaders (`stream_load.fill_model`), the HF,
GGUF and PEFT exporters, `plan` and the checkpoint writers are loops over
`global_rows(spec)` / `block_rows(spec, layer)`; a new tensor in a Gemma
release is one row. The table follows KerasHub's `convert_gemma4.py`.

    >>> [r.name for r in block_rows(spec, 0)][:3]
    ['pre_attn', 'post_attn', 'pre_ffw']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from gemma4_keras.model.spec import ATTN_TARGETS, BlockSpec, ModelSpec, module_name

Shape = tuple[int, ...]


# Our shapes are tuples of these dimensions (`Row.dims`).
DIMS: dict[str, Callable[[ModelSpec, BlockSpec | None], int]] = {
    "V": lambda s, b: s.vocab_size,
    "D": lambda s, b: s.hidden_dim,
    "P": lambda s, b: s.ple_dim,
    "VP": lambda s, b: s.ple_vocab,  # rows of the PLE table
    "LP": lambda s, b: s.num_layers * s.ple_dim,
    "H": lambda s, b: b.head_dim,
    "E": lambda s, b: s.num_experts,
    "I": lambda s, b: s.expert_dim,
}
# When a row is present (`Row.when`; None: always).
WHEN: dict[str, Callable[[ModelSpec, BlockSpec | None, str], bool]] = {
    "ple": lambda s, b, name: s.ple_dim > 0,
    "moe": lambda s, b, name: s.moe,
    "kv": lambda s, b, name: b.has_kv,  # KV-shared layers read another's K/V
    "own": lambda s, b, name: s.has_projection(b.index, name),  # KV-shared, K=V
}


@dataclasses.dataclass(frozen=True)
class Row:
    """One tensor of the text decoder (see the module docstring).

    `dims` spells our shape (`DIMS`; a projection's is `spec.projection_shape`).
    """

    name: str
    hf: str
    keras: str
    kind: str  # global | norm | projection | extra | bank
    dims: tuple[str, ...] = ()
    when: str | None = None
    group: str = "norms"  # plan's parameter count group
    hf_layout: str = "same"  # same | linear | scalar | bank
    keras_layout: str = "plain"  # plain | heads_in | heads_out
    float32: bool = False
    fused: tuple[int, int] | None = None  # (part, parts) along HF axis 1

    def shape(self, spec: ModelSpec, block: BlockSpec | None = None) -> Shape:
        """Our shape (kernels (in, out))."""
        if self.kind == "projection":
            return spec.projection_shape(block.index, self.name)
        return tuple(DIMS[d](spec, block) for d in self.dims)

    def present(self, spec: ModelSpec, block: BlockSpec | None = None) -> bool:
        return self.when is None or WHEN[self.when](spec, block, self.name)

    def hf_name(self, layer: int | None = None) -> str:
        return self.hf.format(i=layer)

    def keras_path(self, layer: int | None = None) -> str:
        return self.keras.format(i=layer)

    def hf_shape(self, spec: ModelSpec, block: BlockSpec | None = None) -> Shape:
        """The shape of the HF tensor this row is (a part of)."""
        shape = self.shape(spec, block)
        if self.hf_layout == "linear":
            return shape[::-1]
        if self.hf_layout == "scalar":
            return (1,)
        if self.hf_layout == "bank":
            e, a, b = shape
            return (e, b * (self.fused[1] if self.fused else 1), a)
        return shape

    def to_ours(self, hf: np.ndarray) -> np.ndarray:
        """Our value (a view where it can be) of the HF tensor."""
        if self.hf_layout == "linear":
            return hf.T
        if self.hf_layout == "scalar":
            return hf.reshape(())
        if self.hf_layout == "bank":
            if self.fused:
                part, parts = self.fused
                width = hf.shape[1] // parts
                hf = hf[:, part * width : (part + 1) * width]
            return hf.transpose(0, 2, 1)
        return hf

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        """The HF layout of our value (one part of a fused tensor)."""
        if self.hf_layout == "linear":
            return ours.T
        if self.hf_layout == "scalar":
            return ours.reshape(1)
        if self.hf_layout == "bank":
            return ours.transpose(0, 2, 1)
        return ours


def _block(name, hf, keras, kind, dims=(), when=None, **kw) -> Row:
    """A row of decoder block {i}: names relative to the block."""
    return Row(
        name, "layers.{i}." + hf, "decoder_block_{i}." + keras, kind, dims, when, **kw
    )


def _norm(name, hf, keras, dims=("D",), when=None) -> Row:
    return _block(name, hf, keras, "norm", dims, when, float32=True)


def _projection(name, keras, layout) -> Row:
    group = "attention" if name in ATTN_TARGETS else "mlp"
    hf = module_name("{i}", name).removeprefix("layers.{i}.") + ".weight"
    kw = dict(group=group, hf_layout="linear", keras_layout=layout)
    return _block(name, hf, keras + ".kernel", "projection", (), "own", **kw)


def _moe(name, hf, keras, dims, kind="extra", **kw) -> Row:
    return _block(name, hf, keras, kind, dims, "moe", group="moe", **kw)


def _ple(name, hf, keras, dims) -> Row:
    return _block(
        name, hf, keras, "extra", dims, "ple", group="ple", hf_layout="linear"
    )


GLOBALS: list[Row] = [
    Row("embedding", "embed_tokens.weight", "token_embedding.embeddings", "global",
        ("V", "D"), group="embedding"),
    Row("final_norm", "norm.weight", "final_normalization.scale", "global", ("D",),
        float32=True),
    Row("ple_embedding", "embed_tokens_per_layer.weight",
        "per_layer_token_embedding.embeddings", "global", ("VP", "LP"), "ple",
        group="ple"),
    Row("ple_projection", "per_layer_model_projection.weight",
        "per_layer_model_projection.kernel", "global", ("D", "LP"), "ple",
        group="ple", hf_layout="linear"),
    Row("ple_norm", "per_layer_projection_norm.weight",
        "per_layer_projection_norm.scale", "global", ("P",), "ple", float32=True),
]  # fmt: skip

# HF `experts.gate_up_proj` (E, 2I, D) is [gate; up] along axis 1, as
# convert_gemma4.py slices it; KerasHub's expert banks are (E, in, out).
BLOCK: list[Row] = [
    _norm("pre_attn", "input_layernorm.weight", "pre_attention_norm.scale"),
    _norm("post_attn", "post_attention_layernorm.weight", "post_attention_norm.scale"),
    _norm("pre_ffw", "pre_feedforward_layernorm.weight", "pre_ffw_norm.scale"),
    _norm("post_ffw", "post_feedforward_layernorm.weight", "post_ffw_norm.scale"),
    _norm("q_norm", "self_attn.q_norm.weight", "attention.query_norm.scale", ("H",)),
    _norm("k_norm", "self_attn.k_norm.weight", "attention.key_norm.scale", ("H",),
          "kv"),
    _norm("post_ffw_dense", "post_feedforward_layernorm_1.weight",
          "post_ffw_norm_dense.scale", when="moe"),
    _norm("pre_ffw_moe", "pre_feedforward_layernorm_2.weight",
          "pre_ffw_norm_moe.scale", when="moe"),
    _norm("post_ffw_moe", "post_feedforward_layernorm_2.weight",
          "post_ffw_norm_moe_path.scale", when="moe"),
    _norm("post_ple", "post_per_layer_input_norm.weight",
          "post_per_layer_input_norm.scale", when="ple"),
    _projection("q_proj", "attention.query_dense", "heads_in"),
    _projection("k_proj", "attention.key_dense", "heads_in"),
    _projection("v_proj", "attention.value_dense", "heads_in"),
    _projection("o_proj", "attention.output_dense", "heads_out"),
    _projection("gate_proj", "gating_ffw", "plain"),
    _projection("up_proj", "gating_ffw_2", "plain"),
    _projection("down_proj", "ffw_linear", "plain"),
    _block("layer_scalar", "layer_scalar", "layer_scalar", "extra",
           hf_layout="scalar"),
    _ple("ple_gate", "per_layer_input_gate.weight", "per_layer_input_gate.kernel",
         ("D", "P")),
    _ple("ple_up", "per_layer_projection.weight", "per_layer_up_proj.kernel",
         ("P", "D")),
    _moe("router_scale", "router.scale", "moe_router.per_dim_scale", ("D",)),
    _moe("router_proj", "router.proj.weight", "moe_router.proj.kernel", ("D", "E"),
         hf_layout="linear"),
    _moe("expert_scale", "router.per_expert_scale",
         "moe_expert_bank.per_expert_scale", ("E",)),
    _moe("experts_gate", "experts.gate_up_proj", "moe_expert_bank.gate_proj",
         ("E", "D", "I"), "bank", hf_layout="bank", fused=(0, 2)),
    _moe("experts_up", "experts.gate_up_proj", "moe_expert_bank.up_proj",
         ("E", "D", "I"), "bank", hf_layout="bank", fused=(1, 2)),
    _moe("experts_down", "experts.down_proj", "moe_expert_bank.down_proj",
         ("E", "I", "D"), "bank", hf_layout="bank"),
]  # fmt: skip


# The LoRA targets on MoE expert banks: the banks' HF tensors, as PEFT's
# `target_parameters` names them (`lora.targets`, config_lib.EXPERT_PREFIX).
EXPERT_TARGETS: tuple[str, ...] = tuple(
    dict.fromkeys(r.hf.removeprefix("layers.{i}.") for r in BLOCK if r.kind == "bank")
)


def target_rows(target: str) -> list[Row]:
    """The block rows a LoRA target adapts: a projection's own row, or the
    bank rows of an expert target (`experts.gate_up_proj`: `experts_gate`,
    `experts_up`, the parts of that one HF tensor, `Row.fused`).

    >>> [r.name for r in target_rows("experts.gate_up_proj")]
    ['experts_gate', 'experts_up']
    """
    return [r for r in BLOCK if r.name == target or r.hf == "layers.{i}." + target]


def part_of(row: Row, value: np.ndarray) -> np.ndarray:
    """`row`'s part of a value over its whole HF tensor, in our layout (out
    last): a fused bank row's slice of an expert LoRA's B or delta."""
    if not row.fused:
        return value
    part, parts = row.fused
    width = value.shape[-1] // parts
    return value[..., part * width : (part + 1) * width]


def global_rows(spec: ModelSpec) -> list[Row]:
    """The model-level rows `spec` has, in loading order."""
    return [r for r in GLOBALS if r.present(spec, None)]


def block_rows(spec: ModelSpec, layer: int) -> list[Row]:
    """The rows decoder block `layer` has, in loading order."""
    block = spec.blocks[layer]
    return [r for r in BLOCK if r.present(spec, block)]


def row(name: str) -> Row:
    """The row of our tensor `name` (`embedding`, `q_proj`, `router_scale`...)."""
    return next(r for r in GLOBALS + BLOCK if r.name == name)


def rows(spec: ModelSpec) -> Iterator[tuple[Row, int | None]]:
    """(row, layer) of every tensor of `spec` (layer None for globals)."""
    for row in global_rows(spec):
        yield row, None
    for block in spec.blocks:
        for row in block_rows(spec, block.index):
            yield row, block.index


def hf_tensors(
    spec: ModelSpec,
) -> dict[str, tuple[Shape, list[tuple[Row, int | None]]]]:
    """{HF name (under the text prefix): (HF shape, its rows)}, in loading order.

    A fused HF tensor (`experts.gate_up_proj`) lists each of its rows.

    >>> hf_tensors(spec)["layers.0.self_attn.q_proj.weight"][0]
    (128, 64)
    """
    out: dict[str, tuple[Shape, list]] = {}
    for row, layer in rows(spec):
        block = None if layer is None else spec.blocks[layer]
        name = row.hf_name(layer)
        if name not in out:
            out[name] = (row.hf_shape(spec, block), [])
        out[name][1].append((row, layer))
    return out


def hf_value(parts: list[tuple[Row, np.ndarray]]) -> np.ndarray:
    """The HF tensor of its rows' values (ours): `to_hf`, fused along axis 1."""
    arrays = [row.to_hf(value) for row, value in parts]
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=1)


# LoRA on the vision tower's linear layers (`Gemma4LoraModel.enable_tower_lora`):
# {target: (HF module under `TOWER_MODULE`, KerasHub layer under the encoder
# block)}. Keras' `enable_lora` factors a kernel as (all axes but the last, r)
# @ (r, last); that equals PEFT's `B @ A` only where the kernel's last axis is
# the whole output: the MLP's Dense kernels and o_proj's (N, H, D). q/k/v's
# EinsumDense kernels are (N, D, H): Keras would share B across heads, a
# different adapter that PEFT cannot load, so they are no tower targets.
TOWER_TARGETS: dict[str, tuple[str, str]] = {
    "o_proj": ("self_attn.o_proj.linear", "attention.output_dense.dense"),
    "gate_proj": ("mlp.gate_proj.linear", "gating_ffw.dense"),
    "up_proj": ("mlp.up_proj.linear", "gating_ffw_2.dense"),
    "down_proj": ("mlp.down_proj.linear", "ffw_linear.dense"),
}
# The HF module of vision encoder layer {i} (under `model.`), and the name
# PEFT's `target_modules` regex and the adapter's keys use for a tower target.
TOWER_MODULE = "vision_tower.encoder.layers.{i}."


def tower_module(layer: int, target: str) -> str:
    """The HF module (under `model.`) of vision tower target `target` in `layer`.

    >>> tower_module(0, "o_proj")
    'vision_tower.encoder.layers.0.self_attn.o_proj.linear'
    """
    return TOWER_MODULE.format(i=layer) + TOWER_TARGETS[target][0]
