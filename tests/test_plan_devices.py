"""`plan` per device and before download; 26B-A4B and 31B counted abstractly.

(a) on one device the per-device total is the whole run's total;
(b) on a model-parallel mesh each device holds half (2 devices) of every
    split array, and the verdict for the named accelerator is the one its
    memory gives; the CLI prints it;
(c) `plan` works from a directory holding only `config.json`;
(d) 26B-A4B and 31B built abstractly (`jax.eval_shape` of KerasHub's
    `Gemma4Backbone`, no memory) have the parameter count `plan` computes
    from `config.json`, the released checkpoint's tensors and the
    published totals (25.2 B and 30.7 B).
"""

import json
import math

import jax
import keras_hub
import pytest
from test_cli import CONFIGS, one_error_line, run_cli

from gemma4_keras import config_lib
from gemma4_keras.model import hub, plan, presets, sharding
from gemma4_keras.testing import full_size

PUBLISHED = {"26b_a4b": 25.2e9, "31b": 30.7e9}  # model cards, text decoder


def _released_dir(tmp_path, size):
    path = tmp_path / size
    path.mkdir()
    (path / "config.json").write_text(json.dumps(full_size.released_config(size)))
    return path


def _config(size, preset, **distribution):
    c = config_lib.get_config(size, "qlora")
    c.model.preset, c.model.dtype = str(preset), "bfloat16"
    c.distribution.update(distribution)
    return c


def test_one_device_per_device_total_is_the_whole_run():
    c = config_lib.get_config("tiny", "qlora")
    p = plan.plan(c)
    assert p["mesh"] == {"mode": "none", "devices": 1, "data": 1, "model": 1}
    assert p["per_device"]["total"] == p["total_bytes"]
    assert p["per_device"]["base"] == p["base_bytes"]["total"]


def test_31b_on_two_t4_halves_every_split_array(tmp_path, capsys):
    preset = _released_dir(tmp_path, "31b")
    c = _config("31b", preset, mode="model", model_parallel=2)
    p = plan.plan(c, accelerator_name="2xt4")
    dev, whole = p["per_device"], p["base_bytes"]["total"]
    assert p["mesh"] == {"mode": "model", "devices": 2, "data": 1, "model": 2}
    kw = hub.backbone_kwargs(full_size.released_config("31b"))
    spec = hub.spec_from_config(kw)
    q = p["run"]["quant"]
    kept = [
        math.prod(shape) * size
        for path, shape, size in plan.training_variables(spec, q, 2)
        if sharding.model_dim(path, shape, 2) is None
    ]
    assert 2 * dev["base"] - whole == sum(kept) < whole / 1000
    a = p["accelerator"]
    assert (a["name"], a["devices"], a["memory"]) == ("t4", 2, 16e9)
    assert a["fits"] == (dev["total"] <= plan.USABLE_FRACTION * 16e9)
    assert p["fits"]["h200"] and p["fits"]["t4"] == a["fits"]

    code = run_cli(
        "plan",
        f"--config={CONFIGS}/31b_qlora.py",
        f"--config.model.preset={preset}",
        "--config.model.dtype=bfloat16",
        "--config.distribution.mode=model",
        "--config.distribution.model_parallel=2",
        "--accelerator=2xt4",
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "2 device(s) = 1 (batch) x 2 (model)" in out
    gib = f"{dev['total'] / 2**30:.2f} GiB"
    assert f"TOTAL per device      {gib:>12s}" in out
    assert ("fits NVIDIA T4" if a["fits"] else "does NOT fit NVIDIA T4") in out


def test_26b_a4b_on_v5e_8_splits_the_experts(tmp_path):
    preset = _released_dir(tmp_path, "26b_a4b")
    c = _config("26b_a4b", preset, mode="model", model_parallel=8)
    c.train.batch_size = 1
    p = plan.plan(c, accelerator_name="v5e-8")
    assert p["mesh"]["model"] == 8 and p["accelerator"]["devices"] == 8
    experts = p["base_bytes"]["experts"]
    assert p["per_device"]["base"] < (p["base_bytes"]["total"] - experts) + experts / 8


def test_plan_needs_only_config_json(tmp_path, capsys):
    preset = _released_dir(tmp_path, "e2b")
    assert sorted(p.name for p in preset.iterdir()) == ["config.json"]
    p = plan.plan(_config("e2b", preset))
    assert p["params"]["total"] > 4e9
    assert run_cli("plan", f"--config={CONFIGS}/e2b_qlora.py",
                   f"--config.model.preset={preset}") == 0  # fmt: skip
    assert "TOTAL per device" in capsys.readouterr().out

    assert run_cli("plan", f"--config={CONFIGS}/e2b_qlora.py",
                   f"--config.model.preset={preset}", "--accelerator=k80") == 1  # fmt: skip
    assert "--accelerator='k80' is not known" in one_error_line(capsys)

    (preset / "config.json").unlink()
    with pytest.raises(presets.PresetError, match="has no config.json"):
        plan.plan(_config("e2b", preset))
    assert run_cli("plan", f"--config={CONFIGS}/e2b_qlora.py",
                   f"--config.model.preset={preset}") == 1  # fmt: skip
    assert "has no config.json" in one_error_line(capsys)


@pytest.mark.parametrize("size", ["26b_a4b", "31b"])
def test_large_sizes_counted_abstractly(size):
    config = full_size.released_config(size)
    kw = hub.backbone_kwargs(config)

    def build():
        backbone = keras_hub.models.Gemma4Backbone(**{**kw, "dtype": "bfloat16"})
        return [v.value for v in backbone.weights]

    shapes = jax.eval_shape(build)  # traced: no weight is allocated
    built = sum(math.prod(s.shape) for s in shapes)
    spec = hub.spec_from_config(kw)
    assert plan.param_counts(spec)["total"] == built
    assert full_size.parameter_count(config, shared_kv_weights=False) == built
    assert round(built / 1e8) == round(PUBLISHED[size] / 1e8)
