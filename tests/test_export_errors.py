"""Exports refuse unfinished runs, non-empty targets and mismatched bases, atomically."""

import json
import os
import shutil

import pytest
from export_fixtures import config_for, fake_workdir, trained_model, variant_preset

from gemma4_keras.exporters import commands, hf
from gemma4_keras.exporters.hf import ExportError
from gemma4_keras.outputs import OutputError


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    preset = variant_preset()
    root = str(tmp_path_factory.mktemp("errors"))
    return fake_workdir(root, trained_model(preset), preset), preset


def _leftovers(parent: str) -> list[str]:
    return [
        f for f in os.listdir(parent) if ".export-" in f or f.startswith(".adapter-")
    ]


def test_unfinished_run(run, tmp_path):
    workdir, preset = run
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    with open(os.path.join(copy, "run_state.json"), "w") as f:
        json.dump({"status": "running", "step": 3}, f)
    with pytest.raises(ExportError, match=r"run_state.json: run status is 'running'"):
        commands.export(config_for(preset), copy, "hf", str(tmp_path / "out"))
    os.remove(os.path.join(copy, "run_state.json"))
    with pytest.raises(ExportError, match="status is None"):
        commands.export(config_for(preset), copy, "hf", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_missing_adapter(run, tmp_path):
    workdir, preset = run
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    shutil.rmtree(os.path.join(copy, "adapter"))
    with pytest.raises(
        ExportError, match=r"adapter/adapter_model.safetensors is missing"
    ):
        commands.export(config_for(preset), copy, "peft", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_non_empty_target_is_left_alone(run, tmp_path):
    workdir, preset = run
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"--out=.*out exists and is not empty"):
        commands.export(config_for(preset), workdir, "hf", str(out))
    assert os.listdir(out) == ["keep.txt"]


def test_empty_target_directory_is_fine(run, tmp_path):
    workdir, preset = run
    (tmp_path / "out").mkdir()
    out = commands.export(config_for(preset), workdir, "peft", str(tmp_path / "out"))
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "export_manifest.json",
    } <= set(os.listdir(out))
    with open(os.path.join(out, "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == preset
    assert _leftovers(str(tmp_path)) == []


def test_mismatched_base(run, tmp_path):
    workdir, _ = run
    # Layers 2-3 of this base are KV-shared: the adapter's k_proj/v_proj there cannot fit.
    other = variant_preset(kv_shared_layers=2)
    with pytest.raises(ExportError, match=r"does not fit base .*KV-shared layer"):
        commands.export(config_for(other), workdir, "hf", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and _leftovers(str(tmp_path)) == []


def test_failure_while_writing_leaves_nothing(run, tmp_path, monkeypatch):
    workdir, preset = run

    def broken(base_dir, directory, *args, **kwargs):
        open(os.path.join(directory, "model.safetensors"), "w").close()
        raise OSError("disk full")

    monkeypatch.setattr(hf, "write_hf_streamed", broken)
    with pytest.raises(OSError, match="disk full"):
        commands.export(config_for(preset), workdir, "hf", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and _leftovers(str(tmp_path)) == []


def test_bad_format_and_options(run, tmp_path):
    workdir, preset = run
    with pytest.raises(
        ExportError,
        match=r"--format='onnx': expected one of peft, hf, keras, gguf, gguf-lora",
    ):
        commands.export(config_for(preset), workdir, "onnx", str(tmp_path / "out"))
    with pytest.raises(ExportError, match=r"--shard_size='lots'"):
        hf.parse_size("lots")
    assert hf.parse_size("2MB") == 2 * 1024**2


@pytest.mark.parametrize("fmt", ["gguf", "gguf-lora"])
def test_a_missing_gguf_package_names_the_extra_before_any_work(
    run, tmp_path, monkeypatch, fmt
):
    # `import gguf` fails as without the extra; the export stops before it
    # reads the adapter or the base, naming both GGUF formats and the extra.
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)
    monkeypatch.setattr(
        commands, "read_checked_adapter", lambda *a: pytest.fail("read the adapter")
    )
    workdir, preset = run
    with pytest.raises(ExportError) as e:
        commands.export(config_for(preset), workdir, fmt, str(tmp_path / "out"))
    assert "--format=gguf and --format=gguf-lora" in str(e.value)
    assert "pip install 'gemma4-keras[gguf]'" in str(e.value)
    assert not (tmp_path / "out").exists()
