"""`gemma4-keras export --verify`: every format in its own engine, on the
tiny run's held-out prompts, against the package's model; a corrupted export
fails naming its format."""

import json
import os
import shutil

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gemma4_keras import cli, config_lib
from gemma4_keras.eval import evaluate
from gemma4_keras.exporters import commands, verify


def _export(finished, out, fmt: str, *extra: str) -> int:
    return cli.main(
        [
            "gemma4-keras",
            "export",
            *finished["args"][1:],
            f"--workdir={finished['workdir']}",
            f"--format={fmt}",
            f"--out={out}",
            *extra,
        ]
    )


def _report(out) -> dict:
    with open(os.path.join(out, "verify.json")) as f:
        return json.load(f)


# Four exports, each run in its engine's own process (torch twice, KerasHub,
# llama.cpp): ~100 s on 2 cores; test_gguf_verify_passes keeps one format
# (llama.cpp, the quickest to start) in the default run.
@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["hf", "peft", "keras", "gguf-lora"])
def test_verify_passes_for_every_format(finished, tmp_path, fmt):
    assert _export(finished, tmp_path / fmt, fmt, "--verify", "--gguf_type=f32") == 0
    (row,) = _report(tmp_path / fmt)["rows"]
    assert row["format"] == fmt and row["passed"]
    assert row["greedy_agreement"] == 1.0 and row["prompts"] == 16
    if fmt in ("hf", "peft", "keras"):
        assert row["first_token"]["value"] > 0.99999
    if fmt in ("peft", "gguf-lora"):  # base and adapter both in the engine
        assert row["adapter_changes"]["where"] == "engine"
    assert (tmp_path / fmt / "verify.md").read_text().count(f"| {fmt} |") == 1


def test_gguf_verify_passes(finished, tmp_path, capsys):
    assert _export(finished, tmp_path / "gguf", "gguf", "--verify") == 0  # f16
    (row,) = _report(tmp_path / "gguf")["rows"]
    assert row["passed"] and row["greedy_agreement"] >= 0.75
    assert row["first_token"]["value"] < 0.02
    assert "| gguf | " in capsys.readouterr().out


@pytest.fixture(scope="module")
def package(finished):
    """(load_model, prompts, plain) of the finished run, as --verify builds them."""
    config = config_lib.get_config("tiny", "lora", "runlocal")
    config.train.max_steps = 4
    config.checkpoint.every_steps = 2
    config.data.path = str(finished["data"])
    load, prompts, plain = evaluate.verify_inputs(config, str(finished["workdir"]), 16)
    model = load()
    return (lambda: model), prompts, plain


def _scale_gate(value: np.ndarray) -> np.ndarray:
    return value * -1.0  # one tensor, sign flipped: the GELU gate sees other values


# A torch process (~25 s); the GGUF one below is the default run's.
@pytest.mark.slow
def test_a_corrupted_hf_export_fails_naming_the_format(finished, package, tmp_path):
    out = tmp_path / "hf"
    assert _export(finished, out, "hf") == 0
    path = out / "model.safetensors"
    tensors = load_file(str(path))
    name = "model.layers.1.mlp.gate_proj.weight"
    tensors[name] = _scale_gate(tensors[name])
    save_file(tensors, str(path), {"format": "pt"})
    with pytest.raises(verify.VerifyError, match=r"--format=hf does not answer"):
        verify.verify(str(out), "hf", *package[:2], plain=package[2])
    (row,) = _report(out)["rows"]
    assert not row["passed"]


def test_a_corrupted_gguf_export_fails_naming_the_format(finished, package, tmp_path):
    out = tmp_path / "gguf"
    assert _export(finished, out, "gguf", "--gguf_type=f32") == 0
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    reader = gguf.GGUFReader(str(copy / "model-f32.gguf"), "r+")
    tensor = next(t for t in reader.tensors if t.name == "blk.1.ffn_gate.weight")
    tensor.data[...] = _scale_gate(np.asarray(tensor.data))
    del reader
    with pytest.raises(verify.VerifyError, match=r"--format=gguf does not answer"):
        verify.verify(str(copy), "gguf", *package[:2], plain=package[2])
    verify.verify(str(out), "gguf", *package[:2], plain=package[2])  # the original


def test_a_missing_engine_says_how_to_install_it(
    monkeypatch, finished, tmp_path, capsys
):
    monkeypatch.setitem(verify.MODULES, "gguf", ("no_such_engine_module",))
    assert _export(finished, tmp_path / "g", "gguf", "--verify") == 1
    err = capsys.readouterr().err
    assert "--verify of --format=gguf needs no_such_engine_module" in err
    assert "pip install 'gemma4-keras[llama]'" in err
    assert not (tmp_path / "g").exists()  # said before anything was written


def test_vllm_is_skipped_with_the_reason():
    assert "vllm: skipped" in verify.vllm_skip()
    engines = {*commands.FORMATS, "vllm"}
    assert engines == set(verify.MODULES) == set(verify.INSTALL)


# A stand-in for vLLM's Python API (LLM.generate on token prompts, logprobs
# per step, LoRARequest): what the vLLM engine script asks of it and how it
# reads the answers. vLLM itself needs CUDA; on a GPU the real one runs.
_FAKE_VLLM = {
    "vllm/__init__.py": """
import json, os
from types import SimpleNamespace as NS
LOG = os.environ["FAKE_VLLM_LOG"]

class SamplingParams:
    def __init__(self, **kw):
        self.kw = kw

class LLM:
    def __init__(self, **kw):
        with open(LOG, "a") as f:
            f.write(json.dumps({"llm": kw}) + "\\n")

    def generate(self, prompts, params, lora_request=None):
        with open(LOG, "a") as f:
            f.write(json.dumps({"lora": lora_request and lora_request.path,
                                "params": params.kw}) + "\\n")
        top = {7: NS(logprob=-2.0), 5: NS(logprob=-0.5), 9: NS(logprob=-3.0)}
        tokens = [5, 6, 106, 8] if lora_request else [5, 9]
        return [NS(outputs=[NS(token_ids=tokens, logprobs=[top])]) for _ in prompts]
""",
    "vllm/inputs.py": "def TokensPrompt(prompt_token_ids):\n    return prompt_token_ids\n",
    "vllm/lora/__init__.py": "",
    "vllm/lora/request.py": (
        "class LoRARequest:\n"
        "    def __init__(self, name, id, path):\n"
        "        self.name, self.id, self.path = name, id, path\n"
    ),
}


def test_the_vllm_engine_serves_a_peft_export_as_a_lora_request(tmp_path, monkeypatch):
    for name, text in _FAKE_VLLM.items():
        (tmp_path / "fake" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fake" / name).write_text(text)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake"))
    monkeypatch.setenv("FAKE_VLLM_LOG", str(tmp_path / "log"))
    monkeypatch.setitem(verify.MODULES, "vllm", ())  # the fake is not importable here
    out = tmp_path / "peft"
    out.mkdir()
    config = {"base_model_name_or_path": "/bases/tiny", "r": 8}
    (out / "adapter_config.json").write_text(json.dumps(config))
    got = verify.run_engine("peft", str(out), [[2, 3], [2, 4, 4]], 4, 0, "vllm")
    assert got["adapted"].greedy == [[5, 6], [5, 6]]  # cut at <turn|> (106)
    assert got["base"].greedy == [[5, 9], [5, 9]]
    np.testing.assert_array_equal(got["adapted"].top_ids, [[5, 7, 9]] * 2)
    np.testing.assert_allclose(got["adapted"].first, [np.exp([-0.5, -2.0, -3.0])] * 2)
    log = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines()]
    llm = log[0]["llm"]
    assert llm["model"] == "/bases/tiny" and llm["enable_lora"] is True
    assert llm["max_lora_rank"] == 8 and llm["dtype"] == "float32"
    assert [entry["lora"] for entry in log[1:]] == [str(out), None]
    assert log[1]["params"]["temperature"] == 0.0 and log[1]["params"]["logprobs"] == 20
