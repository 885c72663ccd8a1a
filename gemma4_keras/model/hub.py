"""Moves weights between KerasHub's `Gemma4Backbone` and `Gemma4LoraModel`.

Kernels are copied out as 2-D (in, out) matrices, the transpose of the
Hugging Face `nn.Linear` weight. This module and `modeling.py` are the only
ones that know KerasHub's layer names.
"""

from __future__ import annotations

import numpy as np

# our name -> attribute path on a KerasHub decoder block
_NORMS = {
    "pre_attn": "pre_attention_norm.scale",
    "post_attn": "post_attention_norm.scale",
    "pre_ffw": "pre_ffw_norm.scale",
    "post_ffw": "post_ffw_norm.scale",
    "q_norm": "attention.query_norm.scale",
}
_KV_NORMS = {"k_norm": "attention.key_norm.scale"}
_MOE_NORMS = {
    "post_ffw_dense": "post_ffw_norm_dense.scale",
    "pre_ffw_moe": "pre_ffw_norm_moe.scale",
    "post_ffw_moe": "post_ffw_norm_moe_path.scale",
}
_PLE_NORMS = {"post_ple": "post_per_layer_input_norm.scale"}
_PLE_EXTRA = {
    "ple_gate": "per_layer_input_gate.kernel",
    "ple_up": "per_layer_up_proj.kernel",
}
_MOE_EXTRA = {
    "router_scale": "moe_router.per_dim_scale",
    "router_proj": "moe_router.proj.kernel",
    "expert_scale": "moe_expert_bank.per_expert_scale",
}
_MOE_BANKS = {
    "experts_gate": "moe_expert_bank.gate_proj",
    "experts_up": "moe_expert_bank.up_proj",
    "experts_down": "moe_expert_bank.down_proj",
}
# HF projection -> (KerasHub attribute, kernel layout)
KERAS_KERNELS = {
    "q_proj": ("attention.query_dense", "heads_in"),
    "k_proj": ("attention.key_dense", "heads_in"),
    "v_proj": ("attention.value_dense", "heads_in"),
    "o_proj": ("attention.output_dense", "heads_out"),
    "gate_proj": ("gating_ffw", "plain"),
    "up_proj": ("gating_ffw_2", "plain"),
    "down_proj": ("ffw_linear", "plain"),
}


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _np(var) -> np.ndarray:
    return np.asarray(var.numpy() if hasattr(var, "numpy") else var)


def keras_to_2d(kernel: np.ndarray, layout: str) -> np.ndarray:
    """KerasHub kernel -> (in, out).

    heads_in: (heads, d, head_dim) -> (d, heads*head_dim); heads_out:
    (heads, head_dim, d) -> (heads*head_dim, d); plain: unchanged.
    """
    if layout == "heads_in":
        n, d, h = kernel.shape
        return kernel.transpose(1, 0, 2).reshape(d, n * h)
    if layout == "heads_out":
        n, h, d = kernel.shape
        return kernel.reshape(n * h, d)
    return kernel


def twod_to_keras(
    matrix: np.ndarray, layout: str, shape: tuple[int, ...]
) -> np.ndarray:
    """Inverse of `keras_to_2d` for a KerasHub kernel of `shape`."""
    if layout == "heads_in":
        n, d, h = shape
        return matrix.reshape(d, n, h).transpose(1, 0, 2)
    if layout == "heads_out":
        return matrix.reshape(shape)
    return matrix


def copy_from_backbone(
    model, backbone, *, quant: str, double_quant: bool, block_size: int
) -> None:
    """Fills `model` (a Gemma4LoraModel) with the backbone's text weights."""
    spec = model.spec
    model.add_global("embedding", _np(backbone.get_layer("token_embedding").embeddings))
    model.add_global(
        "final_norm", _np(backbone.get_layer("final_normalization").scale), "float32"
    )
    if spec.ple_dim:
        model.add_global(
            "ple_embedding",
            _np(backbone.get_layer("per_layer_token_embedding").embeddings),
        )
        model.add_global(
            "ple_projection",
            _np(backbone.get_layer("per_layer_model_projection").kernel),
        )
        model.add_global(
            "ple_norm",
            _np(backbone.get_layer("per_layer_projection_norm").scale),
            "float32",
        )
    for blk in model.blocks:
        src = backbone.get_layer(f"decoder_block_{blk.bspec.index}")
        _copy_block(
            blk,
            src,
            spec,
            quant=quant,
            double_quant=double_quant,
            block_size=block_size,
        )


def _copy_block(blk, src, spec, *, quant, double_quant, block_size) -> None:
    i = blk.bspec.index
    norms = dict(_NORMS)
    if blk.bspec.has_kv:
        norms.update(_KV_NORMS)
    if spec.moe:
        norms.update(_MOE_NORMS)
    if spec.ple_dim:
        norms.update(_PLE_NORMS)
    for name, path in norms.items():
        blk.add_norm(name, _np(_get(src, path)))
    for target, (path, layout) in KERAS_KERNELS.items():
        if spec.has_projection(i, target):
            kernel = keras_to_2d(_np(_get(src, path).kernel), layout)
            blk.add_projection(target, kernel, quant, double_quant, block_size)
    blk.add_extra("layer_scalar", _np(src.layer_scalar))
    if spec.ple_dim:
        for name, path in _PLE_EXTRA.items():
            blk.add_extra(name, _np(_get(src, path)))
    if spec.moe:
        for name, path in _MOE_EXTRA.items():
            blk.add_extra(name, _np(_get(src, path)))
        for name, path in _MOE_BANKS.items():
            blk.add_bank(name, _np(_get(src, path)), quant, double_quant, block_size)


def model_deltas(model, name: str | None = None) -> dict[tuple[int, str], np.ndarray]:
    """{(layer, target): scale * A @ B} of adapter `name`, (in, out) float32."""
    return {site: a.delta_weight() for site, a in model.adapters(name).items()}


def peft_deltas(directory: str) -> dict[tuple[int, str], np.ndarray]:
    """The same, read from a PEFT adapter directory (no model needed)."""
    from gemma4_keras.export import peft

    cfg, tensors = peft.read_adapter(directory)
    rank = int(cfg["r"])
    alpha = float(cfg.get("lora_alpha", rank))
    scale = alpha / (rank**0.5 if cfg.get("use_rslora") else rank)
    factors: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = peft._KEY.match(key)
        if not m:
            raise peft.AdapterFormatError(
                f"{directory}: {key!r} is not a Gemma 4 LoRA weight"
            )
        factors.setdefault((int(m[1]), m[3]), {})[m[4]] = np.asarray(value, np.float32)
    return {
        site: (ab["B"] @ ab["A"]).T * np.float32(scale) for site, ab in factors.items()
    }


def apply_deltas(backbone, deltas: dict, sign: float = 1.0) -> int:
    """Adds (sign=-1: removes) (in, out) deltas into a KerasHub backbone's kernels.

    Returns the number of kernels changed. Exact in float32; the kernels of a
    bfloat16 backbone are rounded once.
    """
    for (layer, target), delta in deltas.items():
        path, layout = KERAS_KERNELS[target]
        block = backbone.get_layer(f"decoder_block_{layer}")
        dense = _get(block, path)
        if dense is None:
            raise ValueError(f"layer {layer} has no {target} (KV-shared layer?)")
        var = dense.kernel
        if tuple(var.shape) != tuple(
            twod_to_keras(delta, layout, tuple(var.shape)).shape
        ) or delta.size != int(np.prod(var.shape)):
            raise ValueError(
                f"layers.{layer}.{target}: adapter delta {delta.shape} does not fit "
                f"the base kernel {tuple(var.shape)} (adapter for another model?)"
            )
        d = twod_to_keras(delta, layout, tuple(var.shape))
        var.assign((_np(var).astype(np.float32) + sign * d).astype(_np(var).dtype))
    return len(deltas)


def merge_into_backbone(
    model, backbone, name: str | None = None, sign: float = 1.0
) -> int:
    """Adds adapter `name` of a Gemma4LoraModel into a KerasHub backbone."""
    return apply_deltas(backbone, model_deltas(model, name), sign)
