"""Config files, tables and validation errors."""

import importlib.util
import pathlib

import pytest

from gemma4_keras import config_lib

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.py"))


def load_config_file(path: pathlib.Path, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_one_config_per_size_and_method():
    names = {p.stem for p in CONFIG_FILES}
    expected = {
        f"{s}_{m}" for s in config_lib.SIZES if s != "tiny" for m in config_lib.METHODS
    }
    assert expected | {"tiny", "tiny_tools"} == names  # + the tool-call example


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_every_config_loads_and_validates(path, arg):
    config = load_config_file(path, arg)
    config_lib.validate(config)
    if arg == "runlocal":
        assert config.model.preset == config_lib.SIZES[config.size].tiny
        assert config.model.preset.startswith("tiny")
        assert config.train.max_steps == 2


@pytest.mark.parametrize(
    "size, features",
    [
        ("e2b", {"ple", "kv_shared", "double_wide_mlp"}),
        ("e4b", {"ple", "kv_shared"}),
        ("26b_a4b", {"moe", "k_eq_v"}),
        ("31b", {"k_eq_v"}),
    ],
)
def test_runlocal_keeps_the_sizes_architecture_features(size, features):
    preset = config_lib.get_config(size, "qlora", "runlocal").model.preset
    assert set(preset.partition(":")[2].split(",")) == features


def test_guide_defaults():
    c = config_lib.get_config("e4b", "qlora")
    assert (c.lora.rank, c.lora.alpha, c.lora.dropout) == (16, 32.0, 0.05)
    assert (c.train.learning_rate, c.train.warmup_ratio, c.train.schedule) == (
        2e-4,
        0.1,
        "cosine",
    )
    assert (c.train.epochs, c.train.batch_size * 0 + 4, c.train.grad_accum) == (3, 4, 4)
    assert c.lora.targets == "all-linear" and c.data.holdout_fraction == 0.1
    assert c.quant.mode == "nf4" and c.quant.double_quant
    assert config_lib.get_config("31b", "lora").quant.mode == "none"
    assert config_lib.get_config("e4b", "lora").model.preset == "gemma4_instruct_4b"


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("lora.rank", 0, "--config.lora.rank=0 must be > 0"),
        ("lora.alpha", -1.0, "--config.lora.alpha=-1.0 must be > 0"),
        ("lora.dropout", 1.0, "--config.lora.dropout=1.0 must be in [0, 1)"),
        (
            "data.holdout_fraction",
            0.0,
            "--config.data.holdout_fraction=0.0 must be in (0, 0.5]",
        ),
        (
            "data.holdout_fraction",
            0.6,
            "--config.data.holdout_fraction=0.6 must be in (0, 0.5]",
        ),
        ("train.batch_size", 0, "--config.train.batch_size=0 must be > 0"),
        ("train.grad_accum", 0, "--config.train.grad_accum=0 must be > 0"),
        (
            "quant.mode",
            "fp4",
            "--config.quant.mode='fp4' must be one of none, nf4, int8, int4",
        ),
        (
            "quant.embedding",
            "nf4",
            "--config.quant.embedding='nf4' must be one of none, int8",
        ),
        ("lora.targets", "", "lora.targets is empty"),
        ("lora.targets", "q_proj,qkv", "unknown module name(s) ['qkv']"),
        ("lora.layers", "1,x", "lora.layers must be comma-separated integers"),
    ],
)
def test_bad_values_name_the_field(field, value, message):
    c = config_lib.get_config("e2b", "lora")
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(c)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_float16_is_accepted():
    # float16 runs with float32 islands and loss scaling (tests/test_float16.py).
    c = config_lib.get_config("e2b", "lora")
    c.model.dtype = "float16"
    config_lib.validate(c)
    c.model.dtype = "float8"
    with pytest.raises(config_lib.ConfigError, match="model.dtype"):
        config_lib.validate(c)


def test_unknown_size_method_and_switch():
    with pytest.raises(config_lib.ConfigError, match="unknown model size 'e8b'"):
        config_lib.get_config("e8b", "lora")
    with pytest.raises(config_lib.ConfigError, match="unknown method 'dora'"):
        config_lib.get_config("e2b", "dora")
    with pytest.raises(config_lib.ConfigError, match="unknown config switch 'fast'"):
        config_lib.get_config("e2b", "lora", "fast")


def test_targets_resolve_in_canonical_order():
    assert config_lib.lora_targets("v_proj, q_proj") == ["q_proj", "v_proj"]
    assert config_lib.lora_targets("all-linear") == list(config_lib.LORA_TARGETS)
    assert config_lib.lora_layers("3,1,3") == [1, 3]
    assert config_lib.lora_layers("") is None


def test_data_settings_drop_empty_fields_and_default_path():
    c = config_lib.get_config("tiny", "lora")
    c.data.fields.prompt = "question"
    settings = config_lib.data_settings(c.data)
    assert settings.fields == {"prompt": "question"}
    assert settings.path.endswith("sentiment.jsonl")
    assert pathlib.Path(settings.path).exists()
    assert settings.template == "auto"
    assert config_lib.data_settings(c.data, "large").template == "large"


def test_resume_check_tolerates_fields_added_later_but_not_changes(tmp_path):
    import json

    from gemma4_keras.training import train

    config = config_lib.get_config("tiny", "lora")
    stored = json.loads(config.to_json_best_effort())
    del stored["train"]["log_every"]  # an "older version" without this field
    del stored["lora"]["rslora"]
    (tmp_path / "config.json").write_text(json.dumps(stored))
    train.check_config(config, str(tmp_path))  # defaults: no mismatch
    config.lora.rslora = True  # a new field set away from its default is one
    with pytest.raises(train.WorkdirError, match="lora.rslora was None, now True"):
        train.check_config(config, str(tmp_path))
    config.lora.rslora = False
    config.lora.rank = 4
    with pytest.raises(train.WorkdirError, match="lora.rank was 16, now 4"):
        train.check_config(config, str(tmp_path))


def test_a_run_recorded_with_another_moe_kernel_is_the_same_run(tmp_path):
    # Runs trained before routed experts became the default recorded "dense";
    # resuming, evaluating or exporting them must not ask for the old flag.
    import json

    from gemma4_keras.training import train

    config = config_lib.get_config("tiny", "lora")
    stored = json.loads(config.to_json_best_effort())
    stored["model"]["moe_dispatch"] = "dense"
    (tmp_path / "config.json").write_text(json.dumps(stored))
    train.check_config(config, str(tmp_path))
    config.model.remat = not config.model.remat  # other model fields still count
    with pytest.raises(train.WorkdirError, match="model.remat"):
        train.check_config(config, str(tmp_path))


def test_expert_targets_refuse_dropout_at_validation():
    """Expert-bank LoRA has no dropout in PEFT: the config stops before any
    data or model is read."""
    c = config_lib.get_config("26b_a4b", "qlora")
    c.lora.targets = "q_proj,experts.down_proj"
    c.lora.dropout = 0.05
    with pytest.raises(
        config_lib.ConfigError,
        match=r"lora\.dropout=0\.05 with expert targets \(experts\.down_proj\)",
    ):
        config_lib.validate(c)
    c.lora.dropout = 0.0
    config_lib.validate(c)


def test_16gb_switch_sets_the_low_memory_fields():
    """`--config=configs/26b_a4b_qlora.py:16gb` (tests/test_plan.py checks
    that it fits 26B-A4B QLoRA at 4k tokens in 16 GB); it combines with
    runlocal and an unknown switch names it."""
    c = config_lib.get_config("26b_a4b", "qlora", "16gb")
    config_lib.validate(c)
    assert (c.quant.embedding, c.model.moe_token_chunk) == ("int8", 256)
    assert (c.model.loss_chunk_size, c.model.attention_chunk_size) == (128, 128)
    assert config_lib.get_config("26b_a4b", "qlora").quant.embedding == "none"
    tiny = config_lib.get_config("26b_a4b", "qlora", "runlocal,16gb")
    assert tiny.quant.embedding == "int8" and tiny.model.preset.startswith("tiny")
    with pytest.raises(config_lib.ConfigError, match="known switches: runlocal, 16gb"):
        config_lib.get_config("26b_a4b", "qlora", "8gb")
