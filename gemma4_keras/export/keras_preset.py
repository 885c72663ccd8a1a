"""Merged KerasHub preset: `Gemma4CausalLM.from_preset(dir)` loads it.

The adapter deltas are added into the base `Gemma4Backbone`'s kernels
(`hub.merge_into_backbone`) and the task with its preprocessor is saved
with KerasHub's own `save_to_preset`, so the directory is a regular KerasHub
preset (config.json, metadata.json, model.weights.h5, tokenizer assets,
task.json, preprocessor.json). Vision / audio towers of a multimodal base are
kept as they were; only text-decoder kernels change.
"""

from __future__ import annotations

import os

from gemma4_keras.model import hub, presets


def write_keras_preset(model, backbone, preset: str, directory: str) -> list[str]:
    """Merges `model`'s active adapter into `backbone` and saves a preset.

    Args:
        model: `Gemma4LoraModel` built from `backbone`, adapter loaded and active.
        backbone: the KerasHub `Gemma4Backbone` (modified in place).
        preset: the resolved base preset (its tokenizer is reused).
        directory: an existing empty directory.

    Returns:
        The file names written (relative to `directory`).

    Example:
      >>> write_keras_preset(model, backbone, "gemma4_instruct_4b", "out/keras")
      >>> keras_hub.models.Gemma4CausalLM.from_preset("out/keras")
    """

    hub.merge_into_backbone(model, backbone)
    tokenizer = presets.load_tokenizer(preset)
    hub.causal_lm(backbone, tokenizer).save_to_preset(directory)
    return sorted(
        os.path.relpath(os.path.join(root, f), directory)
        for root, _, names in os.walk(directory)
        for f in names
    )
