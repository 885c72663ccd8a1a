"""Data and model parallel training on a fake 4-device CPU mesh."""

import csv
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from gemma4_keras import config_lib
from gemma4_keras.training import distributed

SCRIPT = textwrap.dedent("""
    import json, sys
    import gemma4_keras
    import jax, keras, keras_hub
    from gemma4_keras import config_lib
    from gemma4_keras.training import distributed
    from gemma4_keras.training import train
    from gemma4_keras.model.gemma4_lora_model import Gemma4LoraModel
    from gemma4_keras.model.lora import LoraSpec
    from gemma4_keras.testing.tiny import tiny_checkpoint

    out = sys.argv[1]
    assert jax.device_count() == 4, jax.devices()
    for mode in ("none", "data", "model"):
        c = config_lib.get_config("tiny", "lora", "runlocal")
        c.distribution.mode, c.distribution.model_parallel = mode, 2
        c.train.batch_size = 4
        c.eval.max_examples = 3  # fewer prompts than devices: padded to split
        state = train.run(c, f"{out}/{mode}")
        assert state["status"] == "finished", state

    # Where the model-parallel layouts put the variables.
    c = config_lib.get_config("tiny", "lora", "runlocal")
    c.distribution.mode, c.distribution.model_parallel = "model", 2
    distributed.setup(c.distribution, 4)
    bb = keras_hub.models.Gemma4Backbone.from_preset(str(tiny_checkpoint()), dtype="float32")
    m = Gemma4LoraModel.from_backbone(bb, LoraSpec(rank=4, alpha=8.0))
    specs = {v.path: list(v.value.sharding.spec) for v in m.variables}
    json.dump(specs, open(f"{out}/specs.json", "w"))
""")


def test_mesh_shape():
    assert distributed.mesh_shape(8, 2) == (4, 2)
    with pytest.raises(config_lib.ConfigError, match="must divide the 8 devices"):
        distributed.mesh_shape(8, 3)


def test_unknown_mode_is_refused():
    c = config_lib.get_config("tiny", "lora")
    c.distribution.mode = "pipeline"
    with pytest.raises(config_lib.ConfigError, match="distribution.mode"):
        config_lib.validate(c)


def losses(path: pathlib.Path) -> list[float]:
    with open(path / "train_log.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_data_and_model_parallel_match_one_device(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    one = losses(tmp_path / "none")
    assert len(one) == 2
    for mode in ("data", "model"):
        assert losses(tmp_path / mode) == pytest.approx(one, rel=1e-5), mode
        rows = (tmp_path / mode / "eval" / "predictions.jsonl").read_text()
        assert len(rows.splitlines()) == 3, mode
    specs = json.loads((tmp_path / "specs.json").read_text())
    row, column = ["model", None], [None, "model"]
    assert specs["gemma4_lora_model/embedding"] == row
    assert specs["block_0_q_proj/kernel"] == column
    assert specs["block_0_o_proj/kernel"] == row
    assert specs["block_3_down_proj/kernel"] == row
    assert specs["lora_default_layers_0_q_proj/lora_b"] == column
    assert specs["lora_default_layers_0_down_proj/lora_a"] == row
    assert specs["lora_default_layers_0_q_proj/lora_a"] in ([], [None, None])


def test_backbone_loads_on_host_outside_the_distribution():
    import jax
    import jax.numpy as jnp
    import keras

    from gemma4_keras.model import presets

    dist = keras.distribution.DataParallel(devices=jax.devices())
    keras.distribution.set_distribution(dist)
    try:
        with presets.on_host():
            assert keras.distribution.distribution() is None
            assert jnp.ones(3).devices() == {jax.devices("cpu")[0]}
        assert keras.distribution.distribution() is dist
    finally:
        keras.distribution.set_distribution(None)
