"""The tiny Gemma 4 architectures the tests run on, and their KerasHub backbones.

One table: each variant is the keyword arguments of `tiny.tiny_checkpoint`
that turn on a feature of a released Gemma 4 (or several at once). A test
module picks the variants it runs on by name:

    from gemma4_keras.testing import variants

    VARIANTS = variants.select(*variants.FEATURES)  # one per feature
    bb = variants.backbone("moe")  # cached: read it, never change it
    bb = variants.load_backbone("moe")  # a fresh one the caller may change

`backbone` is cached per process (one per variant and dtype), so the modules
of a test session that only read a backbone load each checkpoint once.
"""

from __future__ import annotations

import functools
import pathlib

import keras_hub

from gemma4_keras.testing import tiny

VARIANTS: dict[str, dict] = {
    "default": {},
    # E2B / E4B: per-layer embeddings.
    "ple": {"ple": True},
    # E2B / E4B: the last layers reuse the K/V of earlier ones (with PLE, as
    # in the released models).
    "kv_shared": {"ple": True, "kv_shared_layers": 2},
    # KV sharing alone (transformers 5.24's default forward crashed on it).
    "kv_shared_without_ple": {"kv_shared_layers": 2},
    # 26B-A4B: a mixture-of-experts block beside the MLP.
    "moe": {"moe": True},
    # 26B-A4B / 31B global attention: K = V (no v_proj on full layers) and
    # fewer global KV heads.
    "k_eq_v": {"k_eq_v": True},
    # E2B MLP: the KV-shared layers are twice as wide.
    "double_wide_mlp": {"kv_shared_layers": 2, "double_wide_mlp": True},
    "all": {"ple": True, "kv_shared_layers": 2, "moe": True},
    # The released checkpoints' layout: text weights under
    # `model.language_model.*` of a `Gemma4ForConditionalGeneration`.
    "conditional_generation": {"layout": "conditional_generation"},
}

# One variant per architecture feature: what a test of the forward pass,
# loading or export runs on.
FEATURES = ("default", "ple", "kv_shared", "moe", "k_eq_v", "double_wide_mlp")


def select(*names: str) -> dict[str, dict]:
    """{name: tiny_checkpoint kwargs} of `names`, in that order."""
    return {name: VARIANTS[name] for name in names}


def checkpoint(variant: str = "default") -> pathlib.Path:
    """The tiny checkpoint directory of `variant` (written once, then cached)."""
    return tiny.tiny_checkpoint(**VARIANTS[variant])


def load_backbone(variant: str = "default", dtype: str = "float32"):
    """A fresh KerasHub `Gemma4Backbone` of `variant`, for a caller that
    changes it (merges an adapter into it, edits a layer)."""
    return keras_hub.models.Gemma4Backbone.from_preset(
        str(checkpoint(variant)), dtype=dtype
    )


@functools.cache
def backbone(variant: str = "default", dtype: str = "float32"):
    """The shared `Gemma4Backbone` of `variant`: read-only (see `load_backbone`)."""
    return load_backbone(variant, dtype)
