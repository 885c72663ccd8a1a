"""`export_manifest.json`: what an export was made from.

Every export directory carries one, so a deployed file can be traced back to
its base model, adapter settings, training config and eval summary:

    {"format": "hf", "base_model": "google/gemma-4-E4B-it", "template": "gemma4 chat",
     "dtype": "bfloat16", "base_dtype": "bfloat16",
     "lora": {"rank": 16, "alpha": 32.0, "targets": [...], ...},
     "training_config_sha256": "...", "adapter_sha256": "...", "adapter_verified": true,
     "eval": {...}, "package_version": "0.1.0", ...}
"""

from __future__ import annotations

import json
import os
import pathlib

from gemma4_keras import __version__, atomic

MANIFEST = "export_manifest.json"
TEMPLATE = "gemma4 chat"


def file_sha256(path: str) -> str | None:
    """sha256 of a file's bytes, None if it does not exist."""
    if not os.path.isfile(path):
        return None
    return atomic.file_sha256(path)


def build_manifest(
    *,
    fmt: str,
    base_model: str,
    adapter_config: dict,
    workdir: str,
    files: list[str],
    options: dict | None = None,
    dtype: str | None = None,
    base_dtype: str | None = None,
    adapter_sha256: str | None = None,
    adapter_verified: bool | None = None,
) -> dict:
    """The manifest dict of one export.

    Args:
        fmt: export format (`peft`, `hf`, `keras`, `gguf`).
        base_model: the base preset as given in the config.
        adapter_config: the PEFT adapter_config.json dict of the exported adapter.
        workdir: the training workdir (its config.json is hashed, its
            run_state.json supplies the eval summary).
        files: file names written (relative to the export directory).
        options: format options (dtype, layout, shard size, gguf type).
        dtype: what the exported weights are stored as (`bfloat16`, ...;
            the GGUF type for gguf; `float32` for a PEFT adapter).
        base_dtype: the base checkpoint's own dtype, so a precision change
            (e.g. a float32 export of a bfloat16 base) is never silent.
        adapter_sha256: sha256 of the run's adapter/adapter_model.safetensors
            the export was made from.
        adapter_verified: whether it matched the adapter's checksums.json
            (False only for an export forced past a mismatch).
    """

    state_path = os.path.join(workdir, "run_state.json")
    state = {}
    if os.path.isfile(state_path):
        with open(state_path) as f:
            state = json.load(f)
    eval_summary = {
        k: _portable(k, v, workdir)
        for k, v in state.items()
        if k not in ("status", "step")
    }
    return {
        "format": fmt,
        "base_model": base_model,
        "template": TEMPLATE,
        "dtype": dtype,
        "base_dtype": base_dtype,
        "lora": {
            "rank": adapter_config.get("r"),
            "alpha": adapter_config.get("lora_alpha"),
            "targets": adapter_config.get("target_modules"),
            "layers": adapter_config.get("layers_to_transform"),
            "rslora": adapter_config.get("use_rslora", False),
        },
        "training_config_sha256": file_sha256(os.path.join(workdir, "config.json")),
        "run": {"status": state.get("status"), "step": state.get("step")},
        "eval": eval_summary or None,
        "options": options or {},
        "adapter_sha256": adapter_sha256,
        "adapter_verified": adapter_verified,
        "files": sorted(files),
        "package": "gemma4-keras",
        "package_version": __version__,
    }


# run_state.json values that are paths of the run's files.
_PATH_KEYS = ("report",)


def _portable(key: str, value, workdir: str):
    """A path of the run, relative to its workdir (a manifest travels with the export).

    run_state.json holds the path as the run wrote it: absolute, or relative
    to the directory it ran in, of a workdir that may since have moved. It
    is made relative to `workdir`, else to the longest tail that names a
    file there, else cut to its file name: never an absolute path.

    >>> _portable("report", "/old/place/run/eval/eval_report.md", "/no/such/run")
    'eval_report.md'
    """
    if key not in _PATH_KEYS or not isinstance(value, str) or not value:
        return value
    root = os.path.realpath(workdir)
    full = os.path.realpath(value)
    if os.path.commonpath([root, full]) == root:
        return os.path.relpath(full, root)
    parts = pathlib.PurePath(value).parts
    for i in range(1, len(parts)):
        tail = os.path.join(*parts[i:])
        if os.path.exists(os.path.join(workdir, tail)):
            return tail
    return parts[-1]


def write_manifest(directory: str, manifest: dict) -> str:
    path = os.path.join(directory, MANIFEST)
    with open(path, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True, default=str)
    return path
