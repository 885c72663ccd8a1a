"""Helpers for the export tests: a fake finished run with a "trained" adapter."""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np

from gemma4_keras.export import peft
from gemma4_keras.model.gemma4_lora_model import Gemma4LoraModel
from gemma4_keras.model.lora import LoraSpec
from gemma4_keras.testing.tiny import tiny_checkpoint

TOKENS = np.array([[2, 105, 120, 300, 451, 77, 600, 1000, 5, 106, 9, 200]], np.int32)


def trained_model(preset: str, seed: int = 0, rank: int = 4) -> Gemma4LoraModel:
    """The tiny base with an all-linear adapter set to seeded non-zero values."""
    import keras_hub

    backbone = keras_hub.models.Gemma4Backbone.from_preset(preset, dtype="float32")
    model = Gemma4LoraModel.from_backbone(
        backbone, LoraSpec(rank=rank, alpha=2.0 * rank), dtype="float32"
    )
    rng = np.random.default_rng(seed)
    for adapter in model.adapters().values():
        adapter.lora_a.assign(
            rng.normal(0, 0.2, adapter.lora_a.shape).astype(np.float32)
        )
        adapter.lora_b.assign(
            rng.normal(0, 0.2, adapter.lora_b.shape).astype(np.float32)
        )
    return model


def fake_workdir(root: str, model, preset: str, status: str = "finished") -> str:
    """workdir with config.json, adapter/ (PEFT) and run_state.json."""
    workdir = os.path.join(root, "run")
    os.makedirs(workdir, exist_ok=True)
    peft.save_adapter(model, os.path.join(workdir, "adapter"), base_model=preset)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"model": {"preset": preset}, "lora": {"rank": 4}}, f)
    with open(os.path.join(workdir, "run_state.json"), "w") as f:
        json.dump({"status": status, "step": 10, "eval": {"accuracy": 0.75}}, f)
    return workdir


def config_for(preset: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"model": {"preset": preset}})


def keras_logits(model, tokens: np.ndarray = TOKENS) -> np.ndarray:
    """Soft-capped float32 logits of the Keras model (active adapter applied)."""
    t = tokens.shape[1]
    batch = {
        "token_ids": tokens,
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), tokens.shape),
        "segment_ids": np.ones_like(tokens),
    }
    return np.asarray(model.logits(model(batch)), np.float32)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def variant_preset(**variant) -> str:
    return str(tiny_checkpoint(**variant))
