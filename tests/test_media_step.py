"""The frozen towers inside the compiled train step.

On the tiny multimodal checkpoint (`tiny.tiny_checkpoint(layout="multimodal")`)
with LoRA, one image row from the data pipeline, the step `fit` runs
(`model.train_step` under `jax.jit`, compiled by `train.compile_model`):
  * the towers' weights are arguments of the step, as the frozen base is,
    not constants embedded in its program (at real size: hundreds of MB of
    HLO constants);
  * the vision tower runs once per step: the step's FLOPs with the image
    less those without it equal one forward pass of the tower (no backward
    pass through it, no recomputation under remat).

`load_training_model` (the Python API) attaches the towers as `train`
does (`model.towers`: auto = when the data has image or audio parts).
"""

import json
import re

import jax
import numpy as np
import pytest

import gemma4_keras as g4
from gemma4_keras import config_lib, testing
from gemma4_keras.data import pipeline, records, tokenize
from gemma4_keras.model import gemma4_lora_model, hub, stream_load
from gemma4_keras.model.lora import LoraSpec
from gemma4_keras.testing import media as media_files
from gemma4_keras.testing import tiny
from gemma4_keras.training import train

pytest.importorskip("PIL.Image")
MEDIA = ("pixel_values", "pixel_position_ids", "audio_features", "audio_mask")


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    """(the tiny multimodal checkpoint, a JSONL of 4 one-image conversations)."""
    tmp = tmp_path_factory.mktemp("media_step")
    lines = []
    for k, colour in enumerate(["red", "green", "blue", "red"]):
        media_files.write_image(tmp / f"{k}.png", 48, 48, seed=k)
        parts = [{"type": "image", "path": f"{k}.png"}, {"type": "text", "text": "?"}]
        messages = [
            {"role": "user", "content": parts},
            {"role": "assistant", "content": colour},
        ]
        lines.append(json.dumps({"messages": messages}) + "\n")
    (tmp / "d.jsonl").write_text("".join(lines))
    return tiny.tiny_checkpoint(layout="multimodal"), tmp / "d.jsonl"


@pytest.fixture(scope="module")
def setup(image_data):
    directory, path = image_data
    conversations, _ = records.load_conversations({"path": str(path)})
    conversations = conversations[:1]
    examples, _ = tokenize.encode_conversations(
        conversations,
        hub.tokenizer_from_preset(str(directory)),
        max_length=10_000,
        template="small",
    )
    stream = pipeline.build_dataset(
        examples, seq_len=len(examples[0].token_ids) + 4, batch_size=1, shuffle=False
    )
    batch = {**stream.batch(0), "loss_norm": np.ones((1,), np.float32)}
    model = stream_load.stream_training_model(
        directory, LoraSpec(rank=4), dtype="float32", remat=True
    )
    model.attach_towers(hub.load_towers(str(directory)))
    model.attach_towers(model.towers)  # attaching again tracks them once
    cfg = config_lib.get_config("tiny", "lora")
    schedule = train.build_schedule(cfg.train, train.Plan(2, 1, 0))
    train.compile_model(model, cfg.train, schedule)
    model.optimizer.build(model.trainable_variables)
    return model, batch


def _lower(model, batch):
    state = testing.train_step_state(model)
    return jax.jit(model.train_step).lower(state, (batch,))


def _constant_sizes(hlo: str) -> list[int]:
    shapes = re.findall(r"stablehlo\.constant dense<[^>]*> : tensor<([0-9x]+)x", hlo)
    return [int(np.prod([int(d) for d in s.split("x")])) for s in shapes]


def test_tower_weights_are_arguments_of_the_step(setup):
    model, batch = setup
    assert batch["pixel_values"].shape[:2] == (1, 1)  # the step reads an image
    towers = [model.towers.vision, model.towers.audio]
    tower_weights = [w for t in towers for w in t.weights]
    frozen = {id(v) for v in model.non_trainable_variables}
    assert all(id(w) in frozen for w in tower_weights)
    assert len(model.non_trainable_variables) == len(frozen)  # each once
    assert not any(id(w) in frozen for w in model.trainable_variables)
    big = [int(np.prod(w.shape)) for w in tower_weights if np.prod(w.shape) >= 1024]
    assert len(big) > 10  # the tiny towers' matrices: 1,024 - 24,576 values
    sizes = _constant_sizes(_lower(model, batch).as_text())
    assert sizes, "no constant parsed: the StableHLO text format changed?"
    assert max(sizes) < min(big), f"a tower weight became a constant: {max(sizes)}"


def test_the_vision_tower_runs_once_per_step(setup):
    """(FLOPs with the image) - (FLOPs without) == one tower forward pass."""
    model, batch = setup

    def flops(fn, *args):
        return fn.lower(*args).compile().cost_analysis()["flops"]

    with_image = _lower(model, batch).compile().cost_analysis()["flops"]
    text_only = {k: v for k, v in batch.items() if k not in MEDIA}
    without = _lower(model, text_only).compile().cost_analysis()["flops"]
    towers = model.towers

    def tower(pixels, positions):
        per_item = gemma4_lora_model._per_item
        return towers.image_soft_tokens(per_item(pixels, 3), per_item(positions, 3))

    forward = flops(jax.jit(tower), batch["pixel_values"], batch["pixel_position_ids"])
    ratio = (with_image - without) / forward
    print(f"tower FLOPs in the step / one forward pass: {ratio:.4f}")
    # Measured 1.0009 (the merge's few ops); a backward pass or a
    # recomputation of the tower would give >= 2.
    assert 0.95 < ratio < 1.1


def _api_model(directory, towers: str, **data):
    overrides = {"model.preset": str(directory), "model.towers": towers}
    overrides.update({f"data.{k}": v for k, v in data.items()})
    config = g4.get_config("tiny", "lora", "runlocal", overrides)
    return config, g4.load_training_model(config)


def test_load_training_model_attaches_the_towers_as_train_does(image_data):
    directory, path = image_data
    _, (model, _, _) = _api_model(directory, "auto", path=str(path))
    # Images only: the audio tower would hold memory in every step for nothing.
    assert model.towers.vision is not None and model.towers.audio is None
    tower_weights = {id(w) for w in model.towers.vision.weights}
    assert tower_weights <= {id(v) for v in model.non_trainable_variables}
    _, (text_only, _, _) = _api_model(directory, "auto")  # the shipped text sample
    assert text_only.towers is None
    _, (forced, _, _) = _api_model(directory, "on")
    assert forced.towers.vision is not None and forced.towers.audio is not None
    with pytest.raises(config_lib.ConfigError, match="model.towers=off, but the data"):
        _api_model(directory, "off", path=str(path))


@pytest.mark.slow  # compiles and runs two train steps with the image tower (~40 s)
def test_bring_your_own_fit_trains_on_images(image_data):
    directory, path = image_data
    config, (model, tokenizer, preset) = _api_model(
        directory, "auto", path=str(path), max_length=320
    )
    data = g4.training_data(config, tokenizer, preset)
    g4.compile_model(model, config, data)
    history = model.fit(
        data.batches,
        steps_per_epoch=data.steps_per_epoch,
        epochs=data.epochs,
        shuffle=False,
        verbose=0,
    )
    assert np.isfinite(history.history["loss"]).all()


@pytest.mark.slow  # the benchmark's tiny smoke run with an image (~20 s)
def test_real_size_benchmark_takes_images(monkeypatch, capsys):
    import os
    import sys

    root = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")
    monkeypatch.syspath_prepend(root)
    import real_size_train

    argv = ["real_size_train.py", "--size=tiny", "--images=1", "--seq=320"]
    monkeypatch.setattr(sys, "argv", [*argv, "--steps=1"])
    real_size_train.main()
    result = json.loads(capsys.readouterr().out)
    assert np.isfinite(result["step"]["losses"]).all()
    assert result["plan"]["towers"]["kinds"] == ["image"]
    # The step's temporaries hold the tower pass: `plan` counts three float32
    # [heads, patches, patches] tensors, XLA kept two in this step (98 MiB).
    assert result["compile"]["temp_gib"] * 2**30 > result["plan"]["towers"]["temp"] / 2


def test_towers_on_attaches_every_tower_the_checkpoint_has(tmp_path):
    """`model.towers=on` on 31B (a vision tower, no audio tower) and E4B."""
    from gemma4_keras.model import presets
    from gemma4_keras.testing import full_size

    def kinds(size: str, setting: str, data=frozenset()):
        directory = full_size.write_full_size(
            tmp_path / size, size, towers=True, weights=False
        )
        cfg = config_lib.get_config("tiny", "lora")
        cfg.model.preset, cfg.model.towers = str(directory), setting
        return presets.tower_kinds(cfg.model, lambda: set(data), str(directory))

    assert kinds("31b", "on") == ("image",)
    assert kinds("e4b", "on") == ("image", "audio")
    assert kinds("e4b", "auto", {"audio"}) == ("audio",)
    assert kinds("e4b", "off") == ()
