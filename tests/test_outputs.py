"""Nothing lost, second round (issue #24): outputs, a run's identity, hostile files.

Each case of the hostile-input sweep has a test here, named after it:
  #181       render over the training data  test_render_refuses_to_overwrite_its_input
  #169       split over another train.jsonl  test_split_refuses_to_replace_a_file_it_did_not_write
  #185       render into a directory         test_render_into_a_directory_names_the_directory
  (1)        every --out, one guard          test_every_out_refuses_inputs_and_files_it_did_not_write
  #163       evaluate on other data          test_evaluate_on_other_data_*
  #164       evaluate on another split       test_evaluate_on_another_split_*
  (2)        generate / export identity      test_generate_and_export_check_the_runs_config
  #158       finished run, new eval.*        test_finished_run_says_eval_changes_are_not_applied
  #173-#177, #179  config.json {}, [], missing / negative / string sizes, random bytes
  #178       zero attention heads            test_plan_validates_config_json (both)
  #190       runaway chat template           test_runaway_chat_template_is_bounded
  #148       garbled train_log.csv           test_garbled_train_log_is_one_line_and_writes_nothing
  #131       a moved run's export manifest   test_moved_runs_export_manifest_has_no_absolute_path

Every case runs the command as a user does (`cli.main`, in-process) and
expects one `error:` line, no traceback, and every file as it was. The
tiny run of tests/test_reliability.py (4 steps) is shared by the module;
tests that write to a workdir work on a copy.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import time

import pytest
from test_reliability import (
    TINY,
    copy_run,
    error_line,
    run_cli,
    snapshot,
)

from gemma4_keras import config_lib
from gemma4_keras.data.commands import read_and_split
from gemma4_keras.settings import DataSettings
from gemma4_keras.testing import tiny


def _sample(path: pathlib.Path) -> pathlib.Path:
    shutil.copy(config_lib.default_dataset_path(), path)
    return path


def _run_flags(finished) -> tuple[str, ...]:
    """The config flags the shared run trained with (its --config and overrides)."""
    return finished["args"][1:]


def _fresh_records(path: pathlib.Path, n: int = 3) -> pathlib.Path:
    """`n` conversations no run here trained on."""
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"Is 'fresh review {i}' positive?"},
                    {"role": "model", "content": "positive"},
                ]
            }
        )
        for i in range(n)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _training_lines(finished, n: int) -> list[str]:
    """`n` lines of the run's data file that the run trained on."""
    recorded = json.loads((finished["workdir"] / "config.json").read_text())["data"]
    settings = config_lib.data_settings(DataSettings.of(recorded))
    train = read_and_split(settings)[0]
    lines = finished["data"].read_text().splitlines()
    return [lines[int(c.source.rsplit(":", 1)[1]) - 1] for c in train[:n]]


# --- 1: no command writes over its input or a file it did not write ---------


def test_render_refuses_to_overwrite_its_input(tmp_path, capsys):
    data = _sample(tmp_path / "train.jsonl")
    before = data.read_bytes()
    args = ("data", "render", TINY, f"--config.data.path={data}", f"--out={data}")
    assert run_cli(*args) == 1
    line = error_line(capsys)
    assert f"--out={data} would overwrite the input {data} (data.path)" in line
    assert data.read_bytes() == before
    assert os.listdir(tmp_path) == ["train.jsonl"]


def test_split_refuses_to_replace_a_file_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    theirs = out / "train.jsonl"
    theirs.write_text('{"someone": "else"}\n')
    assert run_cli("data", "split", TINY, f"--out={out}") == 1
    line = error_line(capsys)
    assert f"{theirs} exists already" in line and "choose a new --out" in line
    assert theirs.read_text() == '{"someone": "else"}\n'
    assert os.listdir(out) == ["train.jsonl"]


def test_render_into_a_directory_names_the_directory(tmp_path, capsys):
    out = tmp_path / "renders"
    out.mkdir()
    assert run_cli("data", "render", TINY, f"--out={out}") == 1
    line = error_line(capsys)
    assert f"--out={out} is a directory; give the path of a new file" in line
    assert ".tmp" not in line
    assert os.listdir(out) == [] and os.listdir(tmp_path) == ["renders"]


def _out_cases(tmp: pathlib.Path, run: dict) -> list[tuple[str, tuple, str]]:
    """(id, argv, text of the error line) for each command's --out."""
    work = run["workdir"]
    flags = _run_flags(run)
    data = run["data"]
    made = tmp / "made"
    made.mkdir()
    for name in ("plan.json", "data_check.json", "data_stats.json", "eval_report.md"):
        (made / name).write_text("mine\n")
    return [
        ("plan", ("plan", TINY, f"--out={made}"), f"{made / 'plan.json'} exists already"),
        ("check", ("data", "check", TINY, f"--out={made}"), "data_check.json exists already"),
        ("stats", ("data", "stats", TINY, f"--out={made}"), "data_stats.json exists already"),
        ("split_holds_input", ("data", "split", *flags, f"--out={data.parent.parent}"), f"holds the input {data} (data.path)"),
        ("evaluate_into_workdir", ("evaluate", *flags, f"--workdir={work}", f"--out={work}"), f"--out={work} is the input {work} (--workdir)"),
        ("evaluate_over_report", ("evaluate", *flags, f"--workdir={work}", f"--out={made}"), "eval_report.md exists already"),
        ("export_into_adapter", ("export", *flags, f"--workdir={work}", "--format=peft", f"--out={work}/adapter"), "(the run's adapter)"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "name",
    [
        "plan",
        "check",
        "stats",
        "split_holds_input",
        "evaluate_into_workdir",
        "evaluate_over_report",
        "export_into_adapter",
    ],
)
def test_every_out_refuses_inputs_and_files_it_did_not_write(
    name, finished, tmp_path, capsys
):
    cases = {n: (args, text) for n, args, text in _out_cases(tmp_path, finished)}
    args, text = cases[name]
    before = snapshot(finished["workdir"]), snapshot(tmp_path / "made")
    capsys.readouterr()
    assert run_cli(*args) == 1
    line = error_line(capsys)
    assert text in line, line
    assert "unexpected" not in line
    assert (snapshot(finished["workdir"]), snapshot(tmp_path / "made")) == before


# --- 2: evaluate, generate and export check the run's identity --------------


def _evaluate(finished, work, *extra) -> int:
    return run_cli("evaluate", *_run_flags(finished), f"--workdir={work}", *extra)


def test_evaluate_on_other_data_holding_training_examples_is_refused(
    finished, tmp_path, capsys
):
    """#163: another data file whose held-out part the run trained on."""
    work = copy_run(finished, tmp_path)
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(_training_lines(finished, 30)) + "\n")
    before = snapshot(work)
    assert _evaluate(finished, work, f"--config.data.path={other}") == 1
    line = error_line(capsys)
    assert f"{other}: " in line and "are training examples of the run" in line
    assert snapshot(work) == before


def test_evaluate_on_other_data_writes_a_new_named_report(finished, tmp_path, capsys):
    """#163: data the run never saw: a report of its own, the run's kept."""
    work = copy_run(finished, tmp_path)
    fresh = _fresh_records(tmp_path / "fresh.jsonl")
    before = snapshot(work / "eval")
    assert _evaluate(finished, work, f"--config.data.eval_path={fresh}") == 0
    err = capsys.readouterr().err
    [where] = [p for p in work.iterdir() if p.name.startswith("eval-fresh-")]
    assert "not the run's own held-out examples" in err and str(where) in err
    assert "data.eval_path=" in err
    assert (where / "eval_report.md").is_file()
    assert snapshot(work / "eval") == before  # the run's own report


def test_evaluate_on_another_split_overlapping_training_is_refused(
    finished, tmp_path, capsys
):
    """#164: a larger held-out fraction holds examples the run trained on."""
    work = copy_run(finished, tmp_path)
    before = snapshot(work)
    assert _evaluate(finished, work, "--config.data.holdout_fraction=0.3") == 1
    line = error_line(capsys)
    assert "are training examples of the run" in line
    assert "data.holdout_fraction=0.1" in line  # the run's own split, to use
    assert snapshot(work) == before


def test_evaluate_on_another_split_inside_the_held_out_set(finished, tmp_path, capsys):
    """#164: a smaller fraction (a subset of the run's held-out examples)."""
    work = copy_run(finished, tmp_path)
    before = snapshot(work / "eval")
    assert _evaluate(finished, work, "--config.data.holdout_fraction=0.05") == 0
    err = capsys.readouterr().err
    assert "data.holdout_fraction=0.05 (the run's: 0.1)" in err
    assert [p.name for p in work.iterdir() if p.name.startswith("eval-train-")]
    assert snapshot(work / "eval") == before


@pytest.mark.parametrize("command", ["generate", "export"])
def test_generate_and_export_check_the_runs_config(command, finished, tmp_path, capsys):
    work = finished["workdir"]
    extra = {
        "generate": ("--prompt=hi", "--max_new_tokens=2"),
        "export": ("--format=peft", f"--out={tmp_path}/peft"),
    }[command]
    flags = (*_run_flags(finished), "--config.lora.rank=8")
    assert run_cli(command, *flags, f"--workdir={work}", *extra) == 1
    line = error_line(capsys)
    assert "lora.rank was 4, now 8" in line
    assert f"gemma4-keras {command} needs the config the run trained with" in line
    assert not (tmp_path / "peft").exists()


def test_finished_run_says_eval_changes_are_not_applied(finished, tmp_path, capsys):
    """#158: train does not evaluate a finished run again, and says so."""
    work = copy_run(finished, tmp_path)
    before = snapshot(work)
    args = (*finished["args"], f"--workdir={work}", "--config.eval.max_examples=2")
    assert run_cli(*args) == 0
    captured = capsys.readouterr()
    assert "nothing to do" in captured.out
    assert "eval.max_examples=2 (was 4) not applied" in captured.err
    assert "run `gemma4-keras evaluate` with the same --config flags" in captured.err
    assert snapshot(work) == before


# --- 3: config.json is validated where it is read ----------------------------


def _without(key: str) -> dict:
    config = tiny.tiny_hf_config()
    del config[key]
    return config


@pytest.mark.parametrize(
    "body, expected",
    [
        ("{}", "hidden_size, num_hidden_layers, intermediate_size, head_dim, layer_types are missing"),
        ("[]", "expected a JSON object, got list"),
        (_without("hidden_size"), "hidden_size is missing"),
        ({**tiny.tiny_hf_config(), "num_hidden_layers": -2}, "num_hidden_layers must be an integer >= 1, got -2"),
        ({**tiny.tiny_hf_config(), "hidden_size": "64"}, "hidden_size must be an integer >= 1, got '64'"),
        (b"\x8f\xff\x00\x13random", "not a text file (invalid UTF-8 at byte 0)"),
        ({**tiny.tiny_hf_config(), "num_attention_heads": 0}, "num_attention_heads must be an integer >= 1, got 0"),
    ],
    ids=["empty", "list", "missing", "negative", "string", "bytes", "zero_heads_178"],
)  # fmt: skip
def test_plan_validates_config_json(body, expected, tmp_path, capsys):
    preset = tmp_path / "ckpt"
    preset.mkdir()
    path = preset / "config.json"
    if isinstance(body, bytes):
        path.write_bytes(body)
    else:
        path.write_text(body if isinstance(body, str) else json.dumps(body))
    assert run_cli("plan", TINY, f"--config.model.preset={preset}") == 1
    line = error_line(capsys)
    assert f"{path}: {expected}" in line, line
    assert "unexpected" not in line


# --- 4: a chat template cannot hang a command --------------------------------


def test_runaway_chat_template_is_bounded(tmp_path, capsys):
    preset = tmp_path / "ckpt"
    shutil.copytree(tiny.tiny_checkpoint(), preset)
    template = preset / "chat_template.jinja"
    template.write_text(
        "{% for i in range(100000) %}{% for j in range(100000) %}"
        "{% endfor %}{% endfor %}{{ bos_token }}"
    )
    t0 = time.monotonic()
    assert run_cli("data", "check", TINY, f"--config.model.preset={preset}") == 1
    assert time.monotonic() - t0 < 60
    line = error_line(capsys)
    assert f"{template}: cannot render the chat template" in line
    assert "more than 100000" in line


# --- 5 and 6: a garbled training log; a moved run's export --------------------


def test_garbled_train_log_is_one_line_and_writes_nothing(finished, tmp_path, capsys):
    work = copy_run(finished, tmp_path)
    log = work / "train_log.csv"
    log.write_bytes(b"step,loss\n1,\xff\xfe\x80garbled\n")
    before = snapshot(work)
    out = tmp_path / "report"
    assert _evaluate(finished, work, f"--out={out}") == 1
    line = error_line(capsys)
    assert f"{log}: unreadable training log" in line
    assert not out.exists()
    assert snapshot(work) == before


def test_moved_runs_export_manifest_has_no_absolute_path(finished, tmp_path, capsys):
    work = copy_run(finished, tmp_path)  # run_state.json names the old place
    out = tmp_path / "peft"
    args = (*_run_flags(finished), f"--workdir={work}", "--format=peft")
    assert run_cli("export", *args, f"--out={out}") == 0
    manifest = (out / "export_manifest.json").read_text()
    assert json.loads(manifest)["eval"]["report"] == "eval/eval_report.md"
    assert str(finished["workdir"]) not in manifest
