"""`gemma4-keras export` flags added for issue #14: --dtype, --format=gguf-lora.

Runs the CLI on a finished run's workdir written from factors (no training).
"""

import json
import os
import pathlib

import oracles
from export_fixtures import factor_workdir, random_factors, variant_preset

from gemma4_keras import cli, config_lib
from gemma4_keras.model.lora import LoraSpec

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _export(base, workdir, *flags) -> int:
    return cli.main(
        [
            "gemma4-keras",
            "export",
            f"--config={ROOT}/configs/tiny.py:runlocal",
            f"--config.model.preset={base}",
            f"--workdir={workdir}",
            *flags,
        ]
    )


def _record_config(workdir: str, base: str) -> None:
    """The run's config.json, as `train` writes it (export checks it is the run's)."""
    config = config_lib.get_config("tiny", "lora", "runlocal")
    config.model.preset = base
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(json.loads(config.to_json_best_effort()), f)


def test_dtype_and_gguf_lora_flags(tmp_path, capsys):
    oracles.need("gguf")
    base = variant_preset()
    spec = LoraSpec(rank=4, alpha=8.0)
    workdir = factor_workdir(str(tmp_path), base, spec, random_factors(base, spec))
    _record_config(workdir, base)
    out = tmp_path / "hf16"
    assert _export(base, workdir, "--format=hf", "--dtype=float16", f"--out={out}") == 0
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert (manifest["dtype"], manifest["base_dtype"]) == ("float16", "float32")
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    lora = tmp_path / "lora"
    assert _export(base, workdir, "--format=gguf-lora", f"--out={lora}") == 0
    assert os.listdir(lora) and (lora / "adapter-f16.gguf").is_file()
    bad = _export(
        base, workdir, "--format=peft", "--dtype=bfloat16", f"--out={tmp_path}/x"
    )
    assert bad == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert (
        len(err) == 1 and "--dtype=bfloat16 applies to --format=hf and keras" in err[0]
    )
