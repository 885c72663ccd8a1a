"""Static facts of the Gemma 4 text decoder: `ModelSpec` and `BlockSpec`.

Plain frozen dataclasses, read from a backbone config by the KerasHub bridge
(`hub.spec_from_config`) and used by the layers, LoRA and `plan`. Projection
names are Hugging Face's; kernels are (in, out) matrices, the transpose of the
`nn.Linear` weight.
"""

from __future__ import annotations

import dataclasses

from gemma4_keras.config_lib import EXPERT_PREFIX

ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS = ATTN_TARGETS + MLP_TARGETS


def is_expert_target(target: str) -> bool:
    """An MoE expert bank (`schema.EXPERT_TARGETS`): a 3-D parameter (E, out,
    in) of HF's `layers.N.experts`, one LoRA pair per expert."""
    return target.startswith(EXPERT_PREFIX)


# Hugging Face's module of each projection group.
MODULE_GROUPS = {"self_attn": ATTN_TARGETS, "mlp": MLP_TARGETS}


def module_name(layer: int | str, target: str) -> str:
    """Hugging Face's module path of a projection: `layers.3.self_attn.q_proj`
    (an expert bank: `layers.3.experts.gate_up_proj`, a parameter)."""
    if is_expert_target(target):
        return f"layers.{layer}.{target}"
    group = next(g for g, targets in MODULE_GROUPS.items() if target in targets)
    return f"layers.{layer}.{group}.{target}"


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
    ple_vocab_size: int = 0  # rows of the PLE table, 0 = vocab_size
    # `use_bidirectional_attention: "vision"` (26B-A4B, 31B): on sliding
    # layers the soft tokens of one image attend to each other both ways.
    vision_bidirectional: bool = False

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def ple_vocab(self) -> int:
        return self.ple_vocab_size or self.vocab_size

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
        if is_expert_target(target):  # per expert; gate_up is [gate; up]
            f = self.expert_dim
            shapes = {"gate_up_proj": (d, 2 * f), "down_proj": (f, d)}
            return shapes[target.removeprefix(EXPERT_PREFIX)]
        return shapes[target]

    def adapter_experts(self, target: str) -> int:
        """Experts of a target's LoRA (0: a plain 2-D adapter)."""
        return self.num_experts if is_expert_target(target) else 0

    def has_projection(self, layer: int, target: str) -> bool:
        """Whether `layer` owns this projection (KV-shared layers own no k/v)."""
        b = self.blocks[layer]
        if target == "k_proj":
            return b.has_kv
        if target == "v_proj":
            return b.has_kv and not b.k_eq_v
        if is_expert_target(target):
            return self.moe
        return True
