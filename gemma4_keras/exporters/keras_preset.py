"""Merged KerasHub preset: `Gemma4CausalLM.from_preset(dir)` loads it.

The base `Gemma4Backbone` is loaded in the output dtype (default: the base's
own), the adapter deltas are added into its kernels one site at a time (each
in float32, rounded once: `hub.apply_deltas`) and the task with its preprocessor is saved
with KerasHub's own `save_to_preset`, so the directory is a regular KerasHub
preset (config.json, metadata.json, model.weights.h5, tokenizer assets,
task.json, preprocessor.json). Vision / audio towers of a multimodal base are
kept as they were; only text-decoder kernels change.

Peak host memory: the whole backbone in the output dtype, because KerasHub
saves a built model (`save_to_preset` -> `model.weights.h5`); the merge adds
one float32 kernel and its delta at a time. No float32 copy of the base (for
a bfloat16 base and export) and no second model.
"""

from __future__ import annotations

import os

from gemma4_keras.model import hub, lora, presets
from gemma4_keras.model.lora import Factors, LoraSpec


def merge_factors(backbone, lora_spec: LoraSpec, factors: Factors) -> int:
    """Adds `scale * a @ b` into the backbone's kernels, one site at a time."""
    for site in sorted(factors):
        hub.apply_deltas(backbone, lora.deltas(lora_spec, {site: factors[site]}))
    return len(factors)


def write_keras_preset(
    preset: str, directory: str, lora_spec: LoraSpec, factors: Factors, dtype: str
) -> list[str]:
    """Loads the base in `dtype`, merges the adapter and saves a preset.

    Args:
        preset: the resolved base preset (weights and tokenizer).
        directory: an existing empty directory.
        lora_spec, factors: the adapter (`peft.read_adapter`), validated.
        dtype: `float32`, `bfloat16` or `float16`: the stored weights.

    Returns:
        The file names written (relative to `directory`).

    Example:
      >>> write_keras_preset("gemma4_instruct_4b", "out/keras", spec, factors, "bfloat16")
      >>> keras_hub.models.Gemma4CausalLM.from_preset("out/keras")
    """

    backbone = presets.load_backbone(preset, dtype)
    merge_factors(backbone, lora_spec, factors)
    tokenizer = presets.load_tokenizer(preset)
    hub.causal_lm(backbone, tokenizer).save_to_preset(directory)
    return sorted(
        os.path.relpath(os.path.join(root, f), directory)
        for root, _, names in os.walk(directory)
        for f in names
    )
