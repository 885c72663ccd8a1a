"""Adapters in Hugging Face PEFT format, both ways.

A directory holds `adapter_config.json` and `adapter_model.safetensors` with
PEFT's key names for a Gemma 4 base:

    causal_lm:               base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight
    conditional_generation:  base_model.model.model.language_model.layers.N.mlp.down_proj.lora_B.weight

`lora_A.weight` is (r, in) and `lora_B.weight` is (out, r): the transposes of
our (in, r) / (r, out) factors. This is what `peft.PeftModel.from_pretrained`
and vLLM's runtime LoRA loading read.

This module owns the file format only: `read_adapter` gives a `LoraSpec` and
factors, `write_adapter` takes them; putting them into a model is
`model.lora`'s job. `save_adapter` / `load_adapter` compose the two.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from gemma4_keras import config_lib
from gemma4_keras.model import lora
from gemma4_keras.model.lora import Factors, LoraSpec
from gemma4_keras.model.spec import module_name

PREFIXES = {
    "causal_lm": "base_model.model.model.layers",
    "conditional_generation": "base_model.model.model.language_model.layers",
}
_KEY = re.compile(
    r"^base_model\.model\.model\.(?:language_model\.)?layers\.(\d+)\."
    r"(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$"
)


class AdapterFormatError(ValueError):
    """A PEFT adapter that does not fit the model."""


def adapter_tensors(
    factors: Factors, layout: str = "causal_lm"
) -> dict[str, np.ndarray]:
    """{PEFT key: array}: `lora_A.weight` = a.T (r, in), `lora_B.weight` = b.T."""
    prefix = PREFIXES[layout].rsplit(".layers", 1)[0]
    out = {}
    for (layer, target), (a, b) in sorted(factors.items()):
        base = f"{prefix}.{module_name(layer, target)}"
        out[f"{base}.lora_A.weight"] = np.ascontiguousarray(np.asarray(a, np.float32).T)
        out[f"{base}.lora_B.weight"] = np.ascontiguousarray(np.asarray(b, np.float32).T)
    return out


def adapter_config(spec: LoraSpec, base_model: str, layout: str = "causal_lm") -> dict:
    targets = list(spec.targets)
    layers = None if spec.layers is None else list(spec.layers)
    if layout == "conditional_generation":
        # A plain name list would also match the vision tower's q_proj etc.
        # PEFT refuses `layers_to_transform` next to a regex, so a layer
        # subset goes into the regex itself.
        layer_re = r"\d+" if layers is None else "(" + "|".join(map(str, layers)) + ")"
        target_modules: list[str] | str = (
            r".*language_model\.layers\."
            + layer_re
            + r"\.(self_attn|mlp)\.("
            + "|".join(targets)
            + ")"
        )
        layers = None
    else:
        target_modules = targets
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "use_rslora": spec.rslora,
        "target_modules": target_modules,
        "layers_to_transform": layers,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }


def write_adapter(
    directory: str,
    spec: LoraSpec,
    factors: Factors,
    *,
    base_model: str,
    layout: str = "causal_lm",
    overwrite: bool = False,
) -> str:
    """Writes an adapter (spec + factors) to `directory` in PEFT format, atomically."""
    if not factors:
        raise AdapterFormatError("the adapter has no weights to save")
    if os.path.exists(directory) and os.listdir(directory) and not overwrite:
        raise FileExistsError(
            f"{directory} exists and is not empty; choose another directory"
        )
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".adapter-", dir=parent)
    save_file(
        adapter_tensors(factors, layout),
        os.path.join(tmp, "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
        json.dump(adapter_config(spec, base_model, layout), f, indent=2)
    umask_permissions(tmp)
    if os.path.exists(directory):
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def save_adapter(
    model,
    directory: str,
    *,
    base_model: str,
    name: str | None = None,
    layout: str = "causal_lm",
    overwrite: bool = False,
) -> str:
    """Writes adapter `name` of a `Gemma4LoraModel` in PEFT format (atomically).

    Example:
      >>> save_adapter(model, "out/adapter", base_model="google/gemma-4-E4B-it")
    """
    if (name or model.active_adapter) not in model.lora_specs:
        raise AdapterFormatError("the model has no active adapter to save")
    spec, factors = lora.adapter_factors(model, name)
    return write_adapter(
        directory,
        spec,
        factors,
        base_model=base_model,
        layout=layout,
        overwrite=overwrite,
    )


def umask_permissions(directory: str) -> None:
    """Gives `directory` and everything in it the modes the user's umask allows.

    `tempfile.mkdtemp` makes 0700 directories and some writers 0600 files; a
    serving process running as another user could not read the result.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for root, dirs, files in os.walk(directory):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~umask)


def read_adapter_files(directory: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter_config.json as a dict, {PEFT key: array}), checked for LoRA."""
    cfg_path = os.path.join(directory, "adapter_config.json")
    w_path = os.path.join(directory, "adapter_model.safetensors")
    for p in (cfg_path, w_path):
        if not os.path.exists(p):
            raise AdapterFormatError(
                f"{p} is missing; a PEFT adapter directory holds "
                "adapter_config.json and adapter_model.safetensors"
            )
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"{cfg_path}: not a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(
            f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LORA"
        )
    # Per-module ranks/alphas and DoRA change the maths of some sites; a
    # single-spec load would silently compute something else.
    for field in ("rank_pattern", "alpha_pattern"):
        if cfg.get(field):
            raise AdapterFormatError(
                f"{cfg_path}: {field}={cfg[field]!r} is not supported; "
                "only one rank and alpha for all modules"
            )
    if cfg.get("use_dora"):
        raise AdapterFormatError(f"{cfg_path}: use_dora=true (DoRA) is not supported")
    try:
        return cfg, load_file(w_path)
    except (SafetensorError, ValueError) as e:
        raise AdapterFormatError(
            f"{w_path}: unreadable ({e}); the file is truncated or corrupt"
        ) from e


def read_adapter(directory: str) -> tuple[LoraSpec, Factors]:
    """(spec, {(layer, target): (a, b)}) of a PEFT LoRA adapter directory.

    Example:
      >>> spec, factors = read_adapter("runs/a/adapter")
    """
    cfg, tensors = read_adapter_files(directory)
    halves: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if not m:
            raise AdapterFormatError(
                f"{directory}: tensor {key!r} is not a Gemma 4 text-decoder LoRA weight"
            )
        layer, target, ab = int(m[1]), m[3], m[4]
        if target not in config_lib.LORA_TARGETS:
            raise AdapterFormatError(
                f"{directory}: module {key!r} targets {target!r}, "
                f"not one of {config_lib.LORA_TARGETS}"
            )
        halves.setdefault((layer, target), {})[ab] = value
    for (layer, target), ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterFormatError(
                f"{directory}: {module_name(layer, target)}: lora_A or lora_B is missing"
            )
    rank = int(cfg["r"])
    spec = LoraSpec(
        rank=rank,
        alpha=float(cfg.get("lora_alpha", rank)),
        dropout=float(cfg.get("lora_dropout", 0.0)),
        targets=tuple(
            t for t in config_lib.LORA_TARGETS if any(t == k[1] for k in halves)
        ),
        layers=tuple(sorted({k[0] for k in halves})),
        rslora=bool(cfg.get("use_rslora", False)),
    )
    factors = {
        site: (
            np.asarray(ab["A"], np.float32).T,
            np.asarray(ab["B"], np.float32).T,
        )
        for site, ab in halves.items()
    }
    return spec, factors


def load_adapter(
    model, directory: str, name: str = "default", activate: bool = True
) -> None:
    """Loads a PEFT LoRA adapter (trained anywhere) into `model` as `name`.

    Example:
      >>> load_adapter(model, "runs/a/adapter", name="a")
    """
    spec, factors = read_adapter(directory)
    try:
        lora.add_adapter_from_factors(model, spec, factors, name, activate)
    except lora.AdapterMismatchError as e:
        raise AdapterFormatError(f"{directory}: {e}") from e
