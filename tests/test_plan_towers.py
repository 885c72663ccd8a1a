"""`plan` with the vision / audio towers, against KerasHub's encoders and XLA.

(a) tower parameter counts == KerasHub's `Gemma4VisionEncoder` /
    `Gemma4AudioEncoder` weights (exact), on the tiny multimodal checkpoint
    and on a vision config with the other options (no clipped linears,
    standardisation, fewer KV heads);
(b) the vision pass's temporaries == XLA `memory_analysis()` of the tower
    over one image (< 10 %), at two widths;
(c) end to end on the tiny multimodal model with one image a row: the plan's
    tower bytes == the attached towers' variables (exact), and its step
    memory (variables + adapter state + max(activations, tower pass)) vs
    XLA's memory_analysis of the compiled train step (< 15 %).
"""

import json

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from gemma4_keras import config_lib, testing
from gemma4_keras.data import media
from gemma4_keras.model import hub, plan, presets
from gemma4_keras.testing import media as media_files
from gemma4_keras.testing import tiny

transformers = pytest.importorskip("transformers")
pytest.importorskip("PIL.Image")


def _count(layer) -> int:
    return sum(int(np.prod(w.shape)) for w in layer.weights)


def _encoders(raw: dict):
    # KerasHub builds the encoders from the HF config (random weights).
    from keras_hub.src.utils.transformers import (  # internal: the converter's builder
        convert_gemma4,
    )

    kw = convert_gemma4.convert_backbone_config(raw)
    return kw.get("vision_encoder"), kw.get("audio_encoder")


@pytest.fixture(scope="module")
def raw():
    return presets.read_config_json(str(tiny.tiny_checkpoint(layout="multimodal")))


def test_tower_params_match_keras_hub(raw):
    vision, audio = _encoders(raw)
    d = raw["text_config"]["hidden_size"]
    assert plan.vision_params(raw["vision_config"], d) == _count(vision)
    assert plan.audio_params(raw["audio_config"], d) == _count(audio)
    other = {
        **raw,
        "vision_config": {
            **raw["vision_config"],
            "use_clipped_linears": False,
            "standardize": True,
            "num_key_value_heads": 1,
        },
    }
    other.pop("audio_config")
    vision, _ = _encoders(other)
    assert plan.vision_params(other["vision_config"], d) == _count(vision)


def _tower_temp(vision) -> int:
    towers = hub.Towers(vision, None, 1, 2)
    n = media.PROCESSOR.max_patches
    pixels = jnp.zeros((1, n, 3 * 16 * 16))
    positions = jnp.zeros((1, n, 2), jnp.int32)

    def run(state, pixels, positions):
        with keras.StatelessScope(state_mapping=list(zip(vision.weights, state))):
            return towers.image_soft_tokens(pixels, positions)[0]

    state = [w.value for w in vision.weights]
    compiled = jax.jit(run).lower(state, pixels, positions).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("width,heads", [(32, 2), (64, 4)])
def test_vision_pass_temporaries_match_xla(raw, width, heads):
    config = {
        **raw,
        "vision_config": {
            **raw["vision_config"],
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
        },
    }
    config.pop("audio_config")
    vision, _ = _encoders(config)
    want = _tower_temp(vision)
    got = plan.vision_temp_bytes(config["vision_config"])
    print(f"vision pass temporaries: plan {got:,} XLA {want:,} ({got / want:.3f})")
    assert got == pytest.approx(want, rel=0.10)


def test_plan_with_an_image_a_row_against_xla(tmp_path):
    from gemma4_keras.model import stream_load  # the model, built as train does
    from gemma4_keras.training import train

    directory = tiny.tiny_checkpoint(layout="multimodal")
    media_files.write_image(tmp_path / "a.png", 48, 48)
    parts = [{"type": "image", "path": "a.png"}, {"type": "text", "text": "?"}]
    records = [
        {
            "messages": [
                {"role": "user", "content": parts},
                {"role": "assistant", "content": colour},
            ]
        }
        for colour in ("red", "green", "blue", "grey")
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = config_lib.get_config("tiny", "lora")
    cfg.model.preset = str(directory)
    cfg.model.dtype = "float32"
    cfg.model.remat = True
    cfg.data.path = str(tmp_path / "d.jsonl")
    cfg.data.max_length = 320
    cfg.train.batch_size = 1
    cfg.lora.dropout = 0.0
    p = plan.plan(cfg)  # model.towers=auto: the data has images
    tw = p["towers"]
    assert tw["kinds"] == ["image"] and tw["soft_tokens_per_image"] == 280
    assert "towers (" in plan.format_plan(p)

    model = stream_load.stream_training_model(
        directory, presets.ModelSettings.of(cfg).lora, dtype="float32", remat=True
    )
    presets.attach_towers(model, str(directory), ("image",))
    assert tw["weights"] == 4 * _count(model.towers.vision)  # float32, exact

    tokenizer = hub.tokenizer_from_preset(str(directory))
    prepared = train.prepare_data(cfg.data, tokenizer, presets.chat_template(cfg, "x"))
    stream, steps = train.build_batches(prepared.train_examples, cfg.data, cfg.train)
    (batch,) = next(train.step_batches(stream, steps, 0))
    assert batch["pixel_values"].shape[:2] == (1, 1)
    train.compile_model(model, cfg.train, train.build_schedule(cfg.train, steps))
    model.optimizer.build(model.trainable_variables)
    state = testing.train_step_state(model)
    compiled = jax.jit(model.train_step).lower(state, (batch,)).compile()
    mem = compiled.memory_analysis()
    xla = mem.argument_size_in_bytes + mem.temp_size_in_bytes
    xla -= sum(np.asarray(v).nbytes for v in batch.values())  # inputs: not planned
    dev = p["per_device"]
    print(f"plan {dev['total']:,} XLA {xla:,} ({dev['total'] / xla:.3f}): {dev}")
    assert dev["total"] == pytest.approx(xla, rel=0.15)
