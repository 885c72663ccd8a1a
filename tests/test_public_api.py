"""The public API (`import gemma4_keras`): pinned names, lazy, and working.

Removing or renaming a public name is a deliberate act: update `PUBLIC`.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import pathlib
import subprocess
import sys

import pytest

import gemma4_keras

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gemma4_keras"

PUBLIC = [
    "BackendError",
    "__version__",
    "get_config",
    "check",
    "stats",
    "render",
    "plan",
    "format_plan",
    "run",
    "load_training_model",
    "training_data",
    "compile_model",
    "TrainingData",
    "evaluate",
    "generate",
    "export",
    "chat",
]


def test_public_names_are_pinned():
    assert gemma4_keras.__all__ == PUBLIC


def test_every_public_name_resolves_and_is_documented():
    for name in PUBLIC:
        value = getattr(gemma4_keras, name)
        if name == "__version__":
            continue
        assert callable(value), name
        assert value.__doc__ and value.__doc__.strip(), f"{name} has no docstring"
    assert set(PUBLIC) <= set(dir(gemma4_keras))


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        gemma4_keras.trian  # noqa: B018


def test_import_is_light_until_a_name_is_used():
    code = (
        "import sys, gemma4_keras as g4\n"
        "dir(g4)\n"
        "print('keras' in sys.modules, 'jax' in sys.modules)\n"
        "g4.get_config\n"
        "print('keras' in sys.modules)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["False", "False", "True"]


def test_public_names_never_collide_with_subpackages():
    # Python sets a package attribute to each subpackage it imports: a public
    # name equal to a subpackage's would be replaced on its first import.
    import gemma4_keras.exporters.peft  # noqa: F401
    import gemma4_keras.training.train  # noqa: F401

    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert set(gemma4_keras.__all__) & (subpackages | modules) == set()
    assert callable(gemma4_keras.run) and callable(gemma4_keras.export)


def test_no_package_module_imports_a_public_name_from_the_root():
    # The root re-exports names from the top layer (run/); a module below
    # importing them from the root would be an upward import in disguise.
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "gemma4_keras":
                names = {a.name for a in node.names} & set(PUBLIC[2:])
                bad += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names]
    assert bad == []


# --- config -----------------------------------------------------------------


def test_get_config_is_locked_and_validated():
    config = gemma4_keras.get_config("e4b", "qlora", overrides={"lora.rank": 8})
    assert (config.quant.mode, config.lora.rank) == ("nf4", 8)
    with pytest.raises(AttributeError, match="rnak"):
        config.lora.rnak = 4


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"lora.rnak": 1}, r"^--config\.lora\.rnak: no such config field$"),
        ({"trian.epochs": 1}, r"^--config\.trian: no such config field$"),
        ({"lora.rank": "x"}, r"^--config\.lora\.rank='x': wrong type"),
        ({"lora.rank": 0}, r"^--config\.lora\.rank=0 must be > 0$"),
    ],
)
def test_get_config_names_a_bad_override(overrides, message):
    from gemma4_keras.config_lib import ConfigError

    with pytest.raises(ConfigError, match=message):
        gemma4_keras.get_config("tiny", "lora", overrides=overrides)


def test_configs_tiny_is_the_embedded_default_of_config_lib():
    from gemma4_keras import config_lib

    spec = importlib.util.spec_from_file_location("tiny_cfg", ROOT / "configs/tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from_file = module.get_config()
    public = gemma4_keras.get_config("tiny", "lora", "embedded")
    assert from_file.to_dict() == public.to_dict()
    for field, value in config_lib.EMBEDDED_DEFAULT.items():
        section, name = field.split(".")
        assert public[section][name] == value, field
    assert module.get_config("runlocal").train.max_steps == 2


def test_embedded_is_refused_for_a_real_size():
    from gemma4_keras.config_lib import ConfigError

    with pytest.raises(ConfigError, match="'embedded' is a run of the tiny model"):
        gemma4_keras.get_config("e4b", "lora", "embedded")


# --- data, plan -------------------------------------------------------------


def test_data_helpers_on_the_packaged_sample(capsys):
    config = gemma4_keras.get_config("tiny", "lora", "runlocal")
    report = gemma4_keras.check(config)
    assert report["read"]["valid"] > 0
    assert gemma4_keras.stats(config)["read"] == report["read"]
    records = gemma4_keras.render(config, limit=2)
    assert len(records) == 2
    assert records[0]["text"].startswith("<bos><|turn>user")
    out = capsys.readouterr().out
    assert "\033[1;32m" in out  # the trained span, highlighted
    with pytest.raises(ValueError, match="limit=-1 must be >= 0"):
        gemma4_keras.render(config, limit=-1)


def test_plan_validates_and_formats():
    config = gemma4_keras.get_config("tiny", "qlora", "runlocal")
    p = gemma4_keras.plan(config, tflops=65)
    assert p["run"]["quant"]["mode"] == "nf4"
    assert "TOTAL" in gemma4_keras.format_plan(p)


# --- bring your own fit -----------------------------------------------------


# ~85 s on 2 CPU cores: loads the tiny model twice (fit, then the saved
# adapter's generate, the oracle of generating with the model in hand).
@pytest.mark.slow
def test_bring_your_own_fit_trains_and_generates(tmp_path, monkeypatch):
    from gemma4_keras.exporters import peft
    from gemma4_keras.model import presets

    g4 = gemma4_keras
    config = g4.get_config("tiny", "lora", "runlocal", {"lora.dropout": 0.0})
    model, tokenizer, preset = g4.load_training_model(config)
    data = g4.training_data(config, tokenizer, preset)
    assert (data.epochs, data.steps_per_epoch) == (1, 2)  # max_steps=2, accum 1
    g4.compile_model(model, config, data)
    history = model.fit(
        data.batches,
        steps_per_epoch=data.steps_per_epoch,
        epochs=data.epochs,
        shuffle=False,
    )
    assert math.isfinite(history.history["loss"][-1])
    assert int(model.optimizer.iterations.numpy()) == 2
    prompts = ["Great soup.", "Cold fries."]
    saved = str(tmp_path / "adapter")
    peft.save_adapter(model, saved, base_model=preset)

    def no_second_model(*args, **kwargs):
        raise AssertionError("generate(adapter=model) built a second model")

    with monkeypatch.context() as m:  # the model in hand decodes: no new base
        m.setattr(presets, "build_training_model", no_second_model)
        m.setattr(presets, "load_backbone", no_second_model)
        answers = g4.generate(config, prompts, adapter=model, max_new_tokens=2)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    # The same answers as the saved adapter on a freshly loaded base.
    assert answers == g4.generate(config, prompts, adapter=saved, max_new_tokens=2)


def test_generate_refuses_no_prompt():
    config = gemma4_keras.get_config("tiny", "lora", "runlocal")
    with pytest.raises(ValueError, match="no prompt"):
        gemma4_keras.generate(config, [])


def test_evaluate_and_export_need_a_finished_run(tmp_path):
    config = gemma4_keras.get_config("tiny", "lora", "runlocal")
    with pytest.raises(FileNotFoundError, match="adapter is missing: train first"):
        gemma4_keras.evaluate(config, str(tmp_path))
    with pytest.raises(ValueError, match="no such directory"):
        gemma4_keras.export(config, str(tmp_path / "nope"), "peft", str(tmp_path / "o"))


def test_generate_pads_prompts_over_the_data_parallel_devices(monkeypatch):
    # After `run` on a 4 x 2 mesh the distribution stays set; KerasHub's
    # generate splits each batch over the 4 `batch` devices.
    from gemma4_keras.config_lib import ConfigError
    from gemma4_keras.training import api

    mesh = type("Mesh", (), {"shape": (4, 2)})()
    dist = type("Dist", (), {"device_mesh": mesh})()
    monkeypatch.setattr(api.keras.distribution, "distribution", lambda: dist)
    assert api._pad_to_data_parallel([["a"], ["b"]], 8) == [["a"], ["b"], ["b"], ["b"]]
    assert len(api._pad_to_data_parallel([["a"]] * 4, 8)) == 4
    with pytest.raises(
        ConfigError, match="eval.batch_size=6 must be a multiple of the 4"
    ):
        api._pad_to_data_parallel([["a"]], 6)
