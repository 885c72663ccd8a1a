"""Merging a LoRA adapter into the base kernels of a `Gemma4LoraModel`.

A merged site computes `x @ (W + scale * A @ B)` in one matmul: the adapter's
logits without the adapter branch (serving, export of a full model). Float
bases are merged in place and can be unmerged; quantised bases (NF4, Keras
int8/int4) cannot hold a float delta, so `merged_kernels` returns the
dequantised, merged float matrices instead, for whoever writes the full
model out.

Example:
  >>> merge_adapter(model)            # active adapter folded into the base
  >>> hidden = model(batch)           # same logits, no adapter branch
  >>> unmerge_adapter(model)          # base back (to float32 rounding)
"""

from __future__ import annotations

import numpy as np

from gemma4_keras import config_lib


def _adapter_name(model, name: str | None) -> str:
    name = name or model.active_adapter
    if name is None or name not in model.lora_specs:
        raise KeyError(
            f"no adapter {name!r} to merge; loaded: {sorted(model.lora_specs)}"
        )
    return name


def _float_kernel(model, layer: int, target: str):
    """The Dense kernel variable of a float site; raises for quantised ones."""
    proj = model.blocks[layer].proj[target]
    if proj.quant != "none":
        raise config_lib.ConfigError(
            f"layers.{layer}.{target} is stored as {proj.quant}; an in-place merge "
            "would need a float kernel. Use gemma4_keras.model.lora.merged_kernels(model) "
            "to get dequantised, merged float weights instead."
        )
    return proj.dense.kernel


def _add_deltas(model, name: str, sign: float) -> int:
    adapters = model.adapters(name)
    kernels = {
        site: _float_kernel(model, *site) for site in adapters
    }  # check all first
    for site, adapter in adapters.items():
        var = kernels[site]
        dtype = np.asarray(var.value).dtype
        # Add in float32, round once to the kernel's dtype.
        w = (
            np.asarray(var.value, np.float32)
            + np.float32(sign) * adapter.delta_weight()
        )
        var.assign(w.astype(dtype))
    return len(adapters)


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
            f"adapter {merged!r} is merged already; unmerge_adapter(model) first"
        )
    changed = _add_deltas(model, name, +1.0)
    model._merged_adapter = name
    model.set_adapter(None)
    return changed


def unmerge_adapter(model, name: str | None = None) -> int:
    """Subtracts the merged adapter again and re-activates its branch.

    The base comes back to float32 rounding (`(W + d) - d` may differ from
    `W` in the last bit; `tests/test_lora.py` measures it).

    Returns:
        The number of kernels changed.
    """
    merged = getattr(model, "_merged_adapter", None)
    if merged is None or (name is not None and name != merged):
        raise config_lib.ConfigError(
            f"adapter {name or merged!r} is not merged (merged: {merged!r})"
        )
    changed = _add_deltas(model, merged, -1.0)
    model._merged_adapter = None
    model.set_adapter(merged)
    return changed


def merged_kernels(model, name: str | None = None) -> dict[tuple[int, str], np.ndarray]:
    """{(layer, target): W + scale * A @ B} as float32 (in, out) arrays.

    Works for every base: NF4 and Keras int8/int4 kernels are dequantised
    first (the merged weight is exactly what the adapter model computes with),
    float kernels are read as they are. Sites without an adapter are left out.
    The model is not changed.
    """
    name = _adapter_name(model, name)
    out = {}
    for (layer, target), adapter in model.adapters(name).items():
        base = np.asarray(model.blocks[layer].proj[target].weight("float32"))
        out[(layer, target)] = base + adapter.delta_weight()
    return out
