"""The `gemma4-keras` command line, called with argv lists as a user would."""

import json
import os
import pathlib

import oracles
import pytest

from gemma4_keras import cli

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
# Every config trains two steps on its `:runlocal` variant. Each compiles its
# own training step (17-31 s on 2 cores; all nine 3.7 min), so the default run
# trains the two that cover both methods and every tiny architecture feature
# (e2b_qlora: NF4, PLE, KV sharing, double-wide MLP; 26b_a4b_lora: MoE, K=V)
# and `-m slow` (CI) the others.
DEFAULT_RUNLOCAL = ("e2b_qlora", "26b_a4b_lora")
RUNLOCAL = [
    p if p.stem in DEFAULT_RUNLOCAL else pytest.param(p, marks=pytest.mark.slow)
    for p in sorted(CONFIGS.glob("*.py"))
    if p.stem != "tiny"
]


def run_cli(*args: str) -> int:
    return cli.main(["gemma4-keras", *args])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_usage_without_command(capsys):
    assert run_cli() == 2
    assert "commands:" in capsys.readouterr().err


def test_bad_config_value_is_one_line(tmp_path, capsys):
    code = run_cli(
        "train",
        f"--config={CONFIGS}/e4b_lora.py:runlocal",
        "--config.lora.rank=0",
        f"--workdir={tmp_path}/w",
    )
    assert code == 1
    assert one_error_line(capsys).endswith("--config.lora.rank=0 must be > 0")
    assert not (tmp_path / "w" / "config.json").exists()


def test_misspelt_field_is_refused(tmp_path, capsys):
    code = run_cli(
        "train",
        f"--config={CONFIGS}/tiny.py",
        "--config.lora.rnak=3",
        f"--workdir={tmp_path}",
    )
    assert code == 2
    assert "rnak" in capsys.readouterr().err


def test_missing_preset_directory_names_missing_files(tmp_path, capsys):
    preset = tmp_path / "ckpt"
    preset.mkdir()
    (preset / "config.json").write_text("{}")
    code = run_cli(
        "train",
        f"--config={CONFIGS}/e2b_lora.py:runlocal",
        f"--config.model.preset={preset}",
        f"--workdir={tmp_path}/w",
    )
    assert code == 1
    line = one_error_line(capsys)
    assert (
        str(preset) in line and "tokenizer.json" in line and "model.safetensors" in line
    )


def test_unknown_preset_lists_known_ones(tmp_path, capsys):
    code = run_cli(
        "train",
        f"--config={CONFIGS}/e2b_lora.py:runlocal",
        "--config.model.preset=gemma4_instruct_9b",
        f"--workdir={tmp_path}/w",
    )
    assert code == 1
    line = one_error_line(capsys)
    assert "'gemma4_instruct_9b'" in line and "gemma4_instruct_4b" in line


@pytest.mark.parametrize("config", RUNLOCAL, ids=lambda p: p.stem)
def test_every_runlocal_config_trains_two_steps(config, tmp_path, capsys):
    workdir = tmp_path / "run"
    assert run_cli("train", f"--config={config}:runlocal", f"--workdir={workdir}") == 0
    state = json.loads((workdir / "run_state.json").read_text())
    assert state["status"] == "finished" and state["step"] == 2
    assert (workdir / "adapter" / "adapter_model.safetensors").exists()
    assert (workdir / "eval" / "eval_report.md").exists()
    log = (workdir / "train_log.csv").read_text().splitlines()
    assert len(log) == 3  # header + 2 optimiser steps
    # A finished run is reported, not retrained.
    mtime = os.path.getmtime(workdir / "train_log.csv")
    assert run_cli("train", f"--config={config}:runlocal", f"--workdir={workdir}") == 0
    assert "finished at step 2" in capsys.readouterr().out
    assert os.path.getmtime(workdir / "train_log.csv") == mtime


@pytest.mark.slow  # a third runlocal training and a merged export (45 s)
def test_16gb_run_trains_and_its_merged_export_keeps_the_float_embedding(tmp_path):
    """`:16gb` through the front door (26B-A4B's tiny stand-in): the run
    trains on the int8 tied embedding, and the merged HF export carries the
    checkpoint's own float table, bit for bit, not a dequantised one."""
    safetensors_numpy = oracles.need("safetensors.numpy")
    from gemma4_keras.model import presets

    config = f"--config={CONFIGS}/26b_a4b_qlora.py:runlocal,16gb"
    workdir, out = tmp_path / "run", tmp_path / "hf"
    assert run_cli("train", config, f"--workdir={workdir}") == 0
    stored = json.loads((workdir / "config.json").read_text())
    assert stored["quant"]["embedding"] == "int8"
    assert json.loads((workdir / "run_state.json").read_text())["step"] == 2
    assert (
        run_cli("export", config, f"--workdir={workdir}", "--format=hf", f"--out={out}")
        == 0
    )
    base_dir = pathlib.Path(presets.resolve_preset("tiny:moe,k_eq_v"))
    base = {}
    for f in base_dir.glob("*.safetensors"):
        base.update(safetensors_numpy.load_file(str(f)))
    merged = safetensors_numpy.load_file(str(out / "model.safetensors"))
    name = "model.embed_tokens.weight"
    assert merged[name].dtype == base[name].dtype
    assert (merged[name] == base[name]).all()


def test_data_check_reports_planted_problems(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    good = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
        ]
    }
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps(good),
        json.dumps(
            {
                "messages": [
                    {"role": "bot", "content": "x"},
                    {"role": "assistant", "content": "y"},
                ]
            }
        ),
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": ""},
                ]
            }
        ),
    ]
    bad.write_text("\n".join(lines) + "\n")
    args = ["data", "check", f"--config={CONFIGS}/tiny.py", f"--config.data.path={bad}"]
    assert run_cli(*args) == 1
    err = capsys.readouterr().err
    for line_no in (2, 4, 5):
        assert f"bad.jsonl:{line_no}:" in err
    assert run_cli(*args, "--config.data.on_error=skip") == 0
    out = capsys.readouterr().out
    assert "bad.jsonl:2" in out and "bad.jsonl:4" in out and "bad.jsonl:5" in out


def test_evaluate_generate_export_on_a_finished_run(finished, tmp_path, capsys):
    config, workdir = finished["args"][1:], finished["workdir"]
    assert (
        run_cli("evaluate", *config, f"--workdir={workdir}", f"--out={tmp_path}/eval")
        == 0
    )
    assert (tmp_path / "eval" / "eval_report.json").exists()
    report = json.loads((tmp_path / "eval" / "eval_report.json").read_text())
    assert "finetuned" in json.dumps(report)

    capsys.readouterr()
    assert (
        run_cli(
            "generate",
            *config,
            f"--workdir={workdir}",
            "--prompt=Is 'great soup' positive?",
            "--max_new_tokens=3",
        )
        == 0
    )
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer["prompt"] == "Is 'great soup' positive?" and isinstance(
        answer["answer"], str
    )

    out = tmp_path / "peft"
    assert (
        run_cli(
            "export", *config, f"--workdir={workdir}", "--format=peft", f"--out={out}"
        )
        == 0
    )
    assert (out / "adapter_config.json").exists() and (
        out / "export_manifest.json"
    ).exists()
    # Exports never overwrite: a second export to the same place is refused.
    assert (
        run_cli(
            "export", *config, f"--workdir={workdir}", "--format=peft", f"--out={out}"
        )
        == 1
    )
    assert "not empty" in one_error_line(capsys)


def _eval_file(tmp_path: pathlib.Path, n: int = 3) -> pathlib.Path:
    """`n` reviews that are not in the shipped sample, as a separate held-out file.

    (evaluate refuses held-out examples the run trained on.)
    """
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"Is 'held-out review {i}' positive?"},
                    {"role": "assistant", "content": "positive"},
                ]
            }
        )
        for i in range(n)
    ]
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_evaluate_takes_data_eval_path_from_the_command_line(
    finished, tmp_path, capsys
):
    config, workdir = finished["args"][1:], finished["workdir"]
    eval_file = _eval_file(tmp_path)
    capsys.readouterr()
    code = run_cli(
        "evaluate",
        *config,
        f"--workdir={workdir}",
        f"--config.data.eval_path={eval_file}",
        f"--out={tmp_path}/eval",
    )
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    summary = json.loads(out[out.rindex('{\n  "metric"') :])
    assert summary["num_examples"] == 3  # the eval file, not the 10% held out
    rows = (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
    prompts = [json.loads(row)["prompt"] for row in rows]
    lines = eval_file.read_text().splitlines()
    assert prompts == [json.loads(line)["messages"][-2]["content"] for line in lines]


def test_data_split_takes_data_eval_path_from_the_command_line(tmp_path, capsys):
    eval_file = _eval_file(tmp_path)
    args = [f"--config={CONFIGS}/tiny.py", f"--config.data.eval_path={eval_file}"]
    assert run_cli("data", "split", *args, f"--out={tmp_path}/split") == 0
    holdout = (tmp_path / "split" / "holdout.jsonl").read_text().splitlines()
    sources = [json.loads(line)["source"] for line in holdout]
    assert sources == [f"{eval_file}:{i}" for i in (1, 2, 3)]


def test_export_needs_a_format(finished, tmp_path, capsys):
    config, workdir = finished["args"][1:], finished["workdir"]
    assert (
        run_cli("export", *config, f"--workdir={workdir}", f"--out={tmp_path}/x") == 2
    )
    assert "--format" in one_error_line(capsys)


@pytest.mark.parametrize(
    "preset, expected",
    [
        ("gemma4_instruct_4b", "google/gemma-4-E4B-it"),
        ("gemma4_26b_a4b", "google/gemma-4-26B-A4B"),
        ("hf://google/gemma-4-E2B-it", "google/gemma-4-E2B-it"),
        ("/data/my-base", "/data/my-base"),
    ],
)
def test_export_records_the_hf_id_of_the_base(preset, expected):
    from gemma4_keras import config_lib
    from gemma4_keras.exporters.commands import default_base_model

    config = config_lib.get_config("e4b", "lora")
    config.model.preset = preset
    assert default_base_model(config) == expected


def test_a_peft_export_of_a_local_base_opens_with_auto_peft(
    finished, tmp_path, monkeypatch
):
    """The adapter names its base by absolute path (not `tiny`): PEFT opens it
    from any directory, as `AutoPeftModelForCausalLM.from_pretrained(dir)`."""
    peft = oracles.need("peft")
    config, workdir = finished["args"][1:], finished["workdir"]
    out = tmp_path / "peft"
    assert (
        run_cli(
            "export", *config, f"--workdir={workdir}", "--format=peft", f"--out={out}"
        )
        == 0
    )
    base = json.loads((out / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ]
    assert os.path.isabs(base) and os.path.isfile(os.path.join(base, "config.json"))
    monkeypatch.chdir(tmp_path)  # not where the run was started
    model = peft.AutoPeftModelForCausalLM.from_pretrained(str(out))
    assert sum("lora_A" in name for name, _ in model.named_parameters()) > 0


def test_bad_data_stops_before_the_model_loads_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, ')
    workdir = tmp_path / "w"
    code = run_cli(
        "train",
        f"--config={CONFIGS}/e4b_qlora.py:runlocal",
        f"--config.data.path={bad}",
        f"--workdir={workdir}",
    )
    assert code == 1
    line = one_error_line(capsys)
    assert f"{bad}:1:" in line
    assert not workdir.exists() or not list(workdir.iterdir())


def test_plan_prints_memory_and_speed(tmp_path, capsys):
    code = run_cli(
        "plan",
        f"--config={CONFIGS}/e4b_qlora.py:runlocal",
        "--tflops=65",
        f"--out={tmp_path}",
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "memory per device" in out and "at 65 TFLOP/s" in out
    estimate = json.loads((tmp_path / "plan.json").read_text())
    assert estimate["steps"] == 2 and estimate["model"]["layers"] == 4
    assert estimate["total_bytes"] > estimate["base_bytes"]["total"] > 0


def test_plan_rejects_a_bad_mfu(capsys):
    assert run_cli("plan", f"--config={CONFIGS}/tiny.py", "--mfu=0") == 1
    assert "--mfu" in one_error_line(capsys)


def test_evaluate_merged_adds_the_merged_model(finished, tmp_path, capsys):
    """--merged evaluates the adapter folded into the float base as well; on a
    float base that is the same function, so greedy answers agree."""
    config, workdir = finished["args"][1:], finished["workdir"]
    capsys.readouterr()
    code = run_cli(
        "evaluate",
        *config,
        f"--workdir={workdir}",
        "--merged",
        "--config.eval.max_examples=6",
        f"--out={tmp_path}/eval",
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "eval" / "eval_report.json").read_text())
    assert "merged" in json.dumps(report) and ", merged" in json.dumps(report)
    rows = [
        json.loads(row)
        for row in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 6
    assert [r["prediction_merged"] for r in rows] == [
        r["prediction_finetuned"] for r in rows
    ]


def test_train_refuses_to_start_when_the_host_memory_plan_exceeds_the_machine(
    tmp_path, capsys, monkeypatch
):
    """Before loading: one line with the estimate, what is available and what
    to change; nothing written. `train.memory_check=False` tries anyway."""
    from gemma4_keras.model import plan

    monkeypatch.setattr(plan, "host_memory_available", lambda: 1)
    workdir = tmp_path / "w"
    args = ["train", f"--config={CONFIGS}/tiny.py", f"--workdir={workdir}"]
    assert run_cli(*args) == 1
    line = one_error_line(capsys)
    assert "GiB of host memory" in line and "memory_check=False" in line
    assert not workdir.exists() or not list(workdir.iterdir())

    monkeypatch.setattr(plan, "host_memory_available", lambda: 1 << 50)
    args.append("--config.train.max_steps=1")
    assert run_cli(*args) == 0


# --- one front door ------------------------------------------------------------

# What cli.py may import from the package: the API a notebook calls (see
# cli.py's doc; argument parsing is absl's and ml_collections').
CLI_MAY_IMPORT = {"gemma4_keras.training.api"}


def _package_imports(path: pathlib.Path) -> set[str]:
    """Every module of the package that a file imports, at any level."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from gemma4_keras import _quiet` imports gemma4_keras._quiet.
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] == "gemma4_keras"}


def test_the_cli_imports_only_the_api():
    assert _package_imports(ROOT / "gemma4_keras" / "cli.py") == CLI_MAY_IMPORT


def test_the_import_check_sees_function_level_imports(tmp_path):
    source = tmp_path / "x.py"
    source.write_text(
        "from gemma4_keras.training import api\n"
        "def f():\n    from gemma4_keras.model import presets\n"
    )
    assert _package_imports(source) - CLI_MAY_IMPORT == {"gemma4_keras.model.presets"}


def test_every_command_has_its_own_help(capsys):
    assert cli.main(["gemma4-keras", "--help"]) == 0
    assert "<command> --help" in capsys.readouterr().out
    for name in cli.COMMANDS:
        assert run_cli(name, "--help") == 0, name
        out = capsys.readouterr().out
        assert out.startswith(f"usage: gemma4-keras {name}"), out
        assert "--verbose" in out and "--workdir" in out
    run_cli("export", "--help")
    out = capsys.readouterr().out
    assert "--gguf_type" in out and "--prompt" not in out
    run_cli("train", "--help")
    out = capsys.readouterr().out
    assert "--gguf_type" not in out and "data.path" in out


@pytest.mark.parametrize("verbose", [False, True])
def test_the_resolved_config_is_logged_only_with_verbose(verbose, monkeypatch):
    from gemma4_keras.training import api

    started = []
    monkeypatch.setattr(api, "start", started.append)
    args = ["--verbose"] if verbose else []
    assert run_cli("plan", f"--config={CONFIGS}/tiny.py", *args) == 0
    assert (started[0] is not None) == verbose
