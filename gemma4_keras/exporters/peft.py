"""Adapters in Hugging Face PEFT format, both ways.

A directory holds `adapter_config.json` and `adapter_model.safetensors` with
PEFT's key names for a Gemma 4 base:

    causal_lm:               base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight
    conditional_generation:  base_model.model.model.language_model.layers.N.mlp.down_proj.lora_B.weight

`lora_A.weight` is (r, in) and `lora_B.weight` is (out, r): the transposes of
our (in, r) / (r, out) factors. This is what `peft.PeftModel.from_pretrained`
and vLLM's runtime LoRA loading read.

Expert-bank adapters (26B-A4B, `schema.EXPERT_TARGETS`) are PEFT's
`target_parameters` LoRA (`ParamWrapper`): listed under `target_parameters`,
keyed by the `experts` module, one wrapper per parameter nested in the
order the module registers them (gate_up_proj inside down_proj, so with
both: `layers.N.experts.base_layer.lora_A.weight` is gate_up_proj's and
`layers.N.experts.lora_A.weight` down_proj's). `lora_A.weight` is (E * r,
in), expert e's A in rows e*r..e*r+r-1; `lora_B.weight` is (out, r * E), an
(out, r, E) array flattened: our (E, in, r) / (E, r, out) reordered.

This module owns the file format only: `read_adapter` gives a `LoraSpec` and
factors, `write_adapter` takes them; putting them into a model is
`model.lora`'s job. `save_adapter` / `load_adapter` compose the two.

A saved adapter also holds `checksums.json`, the sha256 of both files,
written in the same staging directory (they appear together or not at all);
`verify_checksums` is how an export knows the adapter is the one the run
saved. PEFT and vLLM ignore the extra file.
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

from gemma4_keras import atomic, config_lib, disk
from gemma4_keras.model import lora, schema
from gemma4_keras.model.lora import Factors, LoraSpec
from gemma4_keras.model.spec import MODULE_GROUPS, is_expert_target, module_name

PREFIXES = {
    "causal_lm": "base_model.model.model.layers",
    "conditional_generation": "base_model.model.model.language_model.layers",
}
_KEY = re.compile(
    r"^base_model\.model\.model\.(?:language_model\.)?layers\.(\d+)\."
    rf"({'|'.join(MODULE_GROUPS)})\.(\w+)\.lora_([AB])(?:\.default)?\.weight$"
)
# An expert bank's adapter: group 2 is the nesting (`base_layer.` per wrapper
# outside it), which says which targeted parameter it is (`_expert_depths`).
_EXPERT_KEY = re.compile(
    r"^base_model\.model\.model\.(?:language_model\.)?layers\.(\d+)\."
    r"experts\.((?:base_layer\.)*)lora_([AB])(?:\.default)?\.weight$"
)


def _expert_depths(targets) -> dict[str, int]:
    """{expert target: its wrapper's nesting depth} for the expert targets
    among `targets`: PEFT wraps a module's parameters in the order the
    module registers them (the schema's), each new wrapper outside the last."""
    present = [t for t in schema.EXPERT_TARGETS if t in targets]
    return {t: len(present) - 1 - i for i, t in enumerate(present)}


def _expert_tensors(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's (E * r, in) / (out, r * E) weights of our (E, in, r) / (E, r, out)."""
    e, din, r = a.shape
    return a.transpose(0, 2, 1).reshape(e * r, din), b.transpose(2, 1, 0).reshape(
        b.shape[2], r * e
    )


def _expert_factors(wa: np.ndarray, wb: np.ndarray, rank: int):
    """Our (E, in, r) / (E, r, out) of PEFT's expert weights (`_expert_tensors`)."""
    e = wa.shape[0] // rank
    a = wa.reshape(e, rank, wa.shape[1]).transpose(0, 2, 1)
    return a, wb.reshape(wb.shape[0], rank, e).transpose(2, 1, 0)


class AdapterFormatError(ValueError):
    """A PEFT adapter that does not fit the model."""


class ChecksumError(AdapterFormatError):
    """An adapter file that is not the one saved (or has no checksum to tell)."""


WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
CHECKSUMS = "checksums.json"  # {file name: sha256} of WEIGHTS and CONFIG


def adapter_tensors(
    factors: Factors, layout: str = "causal_lm"
) -> dict[str, np.ndarray]:
    """{PEFT key: array}: `lora_A.weight` = a.T (r, in), `lora_B.weight` = b.T."""
    prefix = PREFIXES[layout].rsplit(".layers", 1)[0]
    depths = _expert_depths({t for _, t in factors})
    out = {}
    for (layer, target), (a, b) in sorted(factors.items()):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        if target.startswith(config_lib.TOWER_PREFIX):
            if layout != "conditional_generation":
                raise AdapterFormatError(
                    f"vision tower LoRA ({target}) needs the multimodal layout "
                    "(layout='conditional_generation'), where the tower is"
                )
            tower = schema.tower_module(
                layer, target.removeprefix(config_lib.TOWER_PREFIX)
            )
            base = f"base_model.model.model.{tower}"
            wa, wb = a.T, b.T
        elif is_expert_target(target):
            base = f"{prefix}.layers.{layer}.experts" + ".base_layer" * depths[target]
            wa, wb = _expert_tensors(a, b)
        else:
            base = f"{prefix}.{module_name(layer, target)}"
            wa, wb = a.T, b.T
        out[f"{base}.lora_A.weight"] = np.ascontiguousarray(wa)
        out[f"{base}.lora_B.weight"] = np.ascontiguousarray(wb)
    return out


def adapter_config(spec: LoraSpec, base_model: str, layout: str = "causal_lm") -> dict:
    targets = [t for t in spec.targets if not is_expert_target(t)]
    layers = None if spec.layers is None else list(spec.layers)
    # PEFT matches target_parameters by name only (no layers_to_transform):
    # a layer subset is spelled out, one full parameter path per layer.
    experts = [t for t in spec.targets if is_expert_target(t)]
    if layers is not None:
        text = PREFIXES[layout].removeprefix("base_model.model.")
        experts = [f"{text}.{i}.{t}" for i in layers for t in experts]
    if not targets:
        target_modules: list[str] | str = []
    elif layout == "conditional_generation":
        # A plain name list would also match the vision tower's q_proj etc.
        # PEFT refuses `layers_to_transform` next to a regex, so a layer
        # subset goes into the regex itself.
        layer_re = r"\d+" if layers is None else "(" + "|".join(map(str, layers)) + ")"
        target_modules: list[str] | str = (
            r".*language_model\.layers\."
            + layer_re
            + rf"\.({'|'.join(MODULE_GROUPS)})\.("
            + "|".join(targets)
            + ")"
        )
        layers = None
    else:
        target_modules = targets
    if spec.tower_targets:
        # The tower's modules are `Gemma4ClippableLinear.linear`s.
        tower = "|".join(
            re.escape(schema.TOWER_TARGETS[t][0]) for t in spec.tower_targets
        )
        tower_re = r".*vision_tower\.encoder\.layers\.\d+\.(" + tower + ")"
        target_modules = (
            f"({target_modules})|({tower_re})" if target_modules else tower_re
        )
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "use_rslora": spec.rslora,
        "target_modules": target_modules,
        "target_parameters": experts or None,
        "layers_to_transform": layers if targets else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }


def write_adapter_files(
    directory: str,
    spec: LoraSpec,
    factors: Factors,
    *,
    base_model: str,
    layout: str = "causal_lm",
    checksums: bool = True,
) -> list[str]:
    """Writes the PEFT files into the existing `directory` (not atomically).

    Returns the names written. `write_adapter` stages them; an export writes
    them straight into its own staging directory.
    """
    if not factors:
        raise AdapterFormatError("the adapter has no weights to save")
    save_file(
        adapter_tensors(factors, layout),
        os.path.join(directory, WEIGHTS),
        metadata={"format": "pt"},
    )
    with open(os.path.join(directory, CONFIG), "w") as f:
        json.dump(adapter_config(spec, base_model, layout), f, indent=2)
    if checksums:
        sums = {
            name: atomic.file_sha256(os.path.join(directory, name))
            for name in (WEIGHTS, CONFIG)
        }
        with open(os.path.join(directory, CHECKSUMS), "w") as f:
            json.dump(sums, f, indent=1, sort_keys=True)
    return sorted(os.listdir(directory))


def adapter_bytes(factors: Factors) -> int:
    """Bytes of an adapter's float32 weights in PEFT format."""
    return sum(int(np.size(a) + np.size(b)) * 4 for a, b in factors.values())


def write_adapter(
    directory: str,
    spec: LoraSpec,
    factors: Factors,
    *,
    base_model: str,
    layout: str = "causal_lm",
    overwrite: bool = False,
    checksums: bool = True,
) -> str:
    """Writes an adapter (spec + factors) to `directory` in PEFT format, atomically.

    The files go to a `.adapter-*` directory beside `directory`, renamed into
    place when complete; a failure (a full disk included) removes it.

    Raises:
        disk.DiskFullError: the adapter does not fit (checked before writing).
    """
    if not factors:
        raise AdapterFormatError("the adapter has no weights to save")
    if os.path.exists(directory) and os.listdir(directory) and not overwrite:
        raise FileExistsError(
            f"{directory} exists and is not empty; choose another directory"
        )
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    disk.require(directory, adapter_bytes(factors) + (1 << 20), "the adapter")
    tmp = tempfile.mkdtemp(prefix=".adapter-", dir=parent)
    try:
        write_adapter_files(
            tmp,
            spec,
            factors,
            base_model=base_model,
            layout=layout,
            checksums=checksums,
        )
        umask_permissions(tmp)
        if os.path.exists(directory):
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def verify_checksums(directory: str) -> str:
    """Checks an adapter's files against its `checksums.json`; returns the weights' sha256.

    Raises:
        ChecksumError: naming the file that changed since it was saved, or
            the missing `checksums.json`.
    """
    path = os.path.join(directory, CHECKSUMS)
    try:
        with open(path) as f:
            expected = json.load(f)
    except FileNotFoundError:
        raise ChecksumError(
            f"{path} is missing, so the adapter cannot be verified as the one the "
            "run saved (a run writes it with its adapter)"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ChecksumError(f"{path}: unreadable ({e})") from e
    if not isinstance(expected, dict) or WEIGHTS not in expected:
        raise ChecksumError(f"{path}: no sha256 of {WEIGHTS} in it")
    got = {}
    for name, want in sorted(expected.items()):
        file = os.path.join(directory, name)
        got[name] = atomic.file_sha256(file) if os.path.isfile(file) else None
        if got[name] != want:
            now = got[name][:12] if got[name] else "missing"
            raise ChecksumError(
                f"{file} changed since the run saved it: its sha256 is {now}, "
                f"{path} records {str(want)[:12]}"
            )
    return got[WEIGHTS]


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
    if spec.tower_targets:
        factors = {**factors, **lora.tower_factors(model)}
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
    params = cfg.get("target_parameters") or []
    by_depth = {
        d: t
        for t, d in _expert_depths(
            [t for t in schema.EXPERT_TARGETS if any(p.endswith(t) for p in params)]
        ).items()
    }
    for key, value in tensors.items():
        if m := _EXPERT_KEY.match(key):
            depth = m[2].count("base_layer.")
            if depth not in by_depth:
                raise AdapterFormatError(
                    f"{directory}: tensor {key!r} adapts an expert bank, but "
                    f"target_parameters {params!r} names no such parameter"
                )
            halves.setdefault((int(m[1]), by_depth[depth]), {})[m[3]] = value
            continue
        m = _KEY.match(key)
        if not m and ".vision_tower." in key:
            raise AdapterFormatError(
                f"{directory}: tensor {key!r} is a vision tower LoRA weight; "
                "the package saves those (lora.targets vision_tower.*) but does "
                "not load them back yet: load this adapter with transformers + PEFT"
            )
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
    known = config_lib.LORA_TARGETS + schema.EXPERT_TARGETS
    spec = LoraSpec(
        rank=rank,
        alpha=float(cfg.get("lora_alpha", rank)),
        dropout=float(cfg.get("lora_dropout", 0.0)),
        targets=tuple(t for t in known if any(t == k[1] for k in halves)),
        layers=tuple(sorted({k[0] for k in halves})),
        rslora=bool(cfg.get("use_rslora", False)),
    )
    factors = {
        site: (
            _expert_factors(
                np.asarray(ab["A"], np.float32), np.asarray(ab["B"], np.float32), rank
            )
            if is_expert_target(site[1])
            else (np.asarray(ab["A"], np.float32).T, np.asarray(ab["B"], np.float32).T)
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
