"""`gemma4-keras export`: a finished run's adapter -> a directory a server loads.

    export(config, "runs/x", "peft", "out/adapter")    adapter only (vLLM, PEFT)
    export(config, "runs/x", "hf", "out/hf")           merged safetensors (transformers)
    export(config, "runs/x", "keras", "out/keras")     merged KerasHub preset
    export(config, "runs/x", "gguf", "out/gguf")       merged GGUF (llama.cpp)

Every export is written into a temporary directory beside `out` and renamed
into place only when complete, with an `export_manifest.json`; a failure
leaves nothing behind. See docs/deploy.md for serving each format.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from gemma4_keras import config_lib, workdir_lock
from gemma4_keras.export import gguf as gguf_lib
from gemma4_keras.export import hf, keras_preset, peft
from gemma4_keras.export import manifest as manifest_lib
from gemma4_keras.export.hf import ExportError, parse_size
from gemma4_keras.export.peft import umask_permissions
from gemma4_keras.model import presets
from gemma4_keras.model.gemma4_lora_model import Gemma4LoraModel

FORMATS = ("peft", "hf", "keras", "gguf")


def check_workdir(workdir: str, force: bool = False) -> str:
    """Returns workdir/adapter, or raises ExportError if the run is not finished.

    With `force`, a run that stopped early (preempted, diverged) is exported
    from whatever adapter its workdir holds.
    """
    adapter = os.path.join(workdir, "adapter")
    state_path = os.path.join(workdir, "run_state.json")
    status = None
    if os.path.isfile(state_path):
        try:
            with open(state_path) as f:
                status = json.load(f).get("status")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
            raise ExportError(
                f"{state_path}: unreadable run state ({e}); rerun `gemma4-keras "
                f"train --workdir={workdir}` after deleting it, to resume"
            ) from e
    if status not in ("finished", "stopped_overfitting") and not force:
        why = " (its loss became NaN/inf)" if status == "diverged" else ""
        raise ExportError(
            f"{state_path}: run status is {status!r}{why}, not 'finished'; finish the "
            f"run first (rerun `gemma4-keras train --workdir={workdir}` to resume it), "
            "or pass --force to export its adapter anyway"
        )
    if not os.path.isfile(os.path.join(adapter, "adapter_model.safetensors")):
        raise ExportError(
            f"{adapter}/adapter_model.safetensors is missing; a finished run writes its "
            "adapter there (was the workdir copied partially?)"
        )
    return adapter


def check_adapter_finite(adapter_dir: str, force: bool = False) -> None:
    """Raises ExportError when the adapter holds NaN/inf (unless `force`)."""

    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(
            f"{path}: unreadable ({e}); it is truncated or corrupt. Rerun training "
            "on a new --workdir, or restore the file"
        ) from e
    bad = sorted(k for k, v in tensors.items() if not np.isfinite(v).all())
    if bad and not force:
        raise ExportError(
            f"{path}: {len(bad)} tensor(s) hold NaN/inf (first: {bad[0]}); the run "
            "diverged. Retrain (e.g. a lower --config.train.learning_rate), or pass "
            "--force to export it anyway"
        )


def check_out(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ExportError(
            f"--out={out} exists and is not empty; choose a new directory "
            "or remove it first (exports never overwrite)"
        )


def _staging_prefix(out: str) -> str:
    return f".{os.path.basename(os.path.abspath(out))}.export-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_stale_staging(out: str) -> list[str]:
    """Removes staging directories of `out` left by killed exports; returns them.

    A staging directory is named `.<out>.export-<pid>-<random>`; it is stale
    when process <pid> is gone (a live export's directory is never touched).
    """
    parent = os.path.dirname(os.path.abspath(out))
    prefix = _staging_prefix(out)
    removed = []
    if not os.path.isdir(parent):
        return removed
    for name in os.listdir(parent):
        pid = name[len(prefix) :].split("-", 1)[0]
        if name.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            removed.append(name)
    return removed


@contextlib.contextmanager
def staging(out: str):
    """Yields a temporary directory beside `out`; renames it to `out` on success.

    The result gets the user's umask permissions (not mkdtemp's 0700).
    """

    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    remove_stale_staging(out)
    tmp = tempfile.mkdtemp(prefix=f"{_staging_prefix(out)}{os.getpid()}-", dir=parent)
    try:
        yield tmp
        check_out(out)  # something may have appeared while we wrote
        umask_permissions(tmp)
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_merged_inputs(preset: str, adapter_dir: str):
    """(backbone float32, Gemma4LoraModel with the adapter active, adapter config)."""

    backbone = presets.load_backbone(preset, "float32")
    model = Gemma4LoraModel.from_backbone(backbone, dtype="float32")
    try:
        peft.load_adapter(model, adapter_dir)
    except peft.AdapterFormatError as e:
        raise ExportError(
            f"the adapter in {adapter_dir} does not fit base {preset!r}: {e}. Export with "
            "the base the run trained on (--config.model.preset, see adapter_config.json "
            "base_model_name_or_path)"
        ) from e
    cfg, _ = peft.read_adapter_files(adapter_dir)
    return backbone, model, cfg


def export(
    config,
    workdir: str,
    fmt: str,
    out: str,
    *,
    shard_size="5GB",
    gguf_type: str = "f16",
    layout: str = "causal_lm",
    dtype: str = "float32",
    base_model: str | None = None,
    force: bool = False,
) -> str:
    """Exports a finished run's adapter as `fmt` into the new directory `out`.

    Args:
        config: the run's ConfigDict (`config.model.preset` names the base).
        workdir: the training workdir (needs adapter/ and run_state.json
            with status "finished").
        fmt: `peft`, `hf`, `keras` or `gguf`.
        out: output directory; must not exist or be empty.
        shard_size: hf: max bytes per safetensors shard (int or "500MB", "5GB").
        gguf_type: gguf: `f32`, `f16`, `bf16`, `q8_0` (`q4_k_m` needs llama.cpp).
        layout: hf: `causal_lm` (`model.*`) or `conditional_generation`
            (`model.language_model.*`, the multimodal checkpoints' layout).
        dtype: hf: stored weight dtype (`float32`, `bfloat16`, `float16`).
        base_model: id recorded as the base (default `config.model.preset`);
            for vLLM use the HF repo id, e.g. `google/gemma-4-E4B-it`.
        force: export a run that did not finish, or an adapter with NaN/inf.

    Returns:
        `out`.

    Example:
      >>> export(config, "runs/tiny", "hf", "runs/tiny/export/hf")
    """

    if fmt not in FORMATS:
        raise ExportError(f"--format={fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "gguf":
        gguf_lib.check_type(gguf_type)  # fail before the slow load
    if fmt == "hf":
        if parse_size(shard_size) <= 0:
            raise ExportError(f"--shard_size={shard_size!r} must be > 0 bytes")
    if not os.path.isdir(workdir):
        raise ExportError(
            f"--workdir={workdir}: no such directory; point it at a finished run"
        )
    with workdir_lock.hold(workdir, "export"):
        return _export_locked(
            config,
            workdir,
            fmt,
            out,
            shard_size,
            gguf_type,
            layout,
            dtype,
            base_model,
            force,
        )


def _export_locked(
    config, workdir, fmt, out, shard_size, gguf_type, layout, dtype, base_model, force
) -> str:

    adapter_dir = check_workdir(workdir, force)
    check_adapter_finite(adapter_dir, force)
    check_out(out)
    base_model = base_model or default_base_model(config)
    preset = presets.resolve_preset(config.model.preset)
    backbone, model, adapter_cfg = load_merged_inputs(preset, adapter_dir)
    options = (
        {"shard_size": shard_size, "layout": layout, "dtype": dtype}
        if fmt == "hf"
        else {}
    )
    if fmt == "gguf":
        options = {"gguf_type": gguf_type}
    with staging(out) as tmp:
        files = _write(fmt, tmp, model, backbone, preset, base_model, options)
        manifest = manifest_lib.build_manifest(
            fmt=fmt,
            base_model=base_model,
            adapter_config=adapter_cfg,
            workdir=workdir,
            files=files,
            options=options,
        )
        manifest_lib.write_manifest(tmp, manifest)
    return out


def default_base_model(config) -> str:
    """The HF repo id of a KerasHub preset name (what vLLM and PEFT look up).

    `gemma4_instruct_4b` -> `google/gemma-4-E4B-it`; `hf://org/repo` -> `org/repo`;
    anything else (a local directory) is recorded as given.
    """

    preset = str(config.model.preset)
    if preset.startswith("hf://"):
        return preset[len("hf://") :]
    for size in config_lib.SIZES.values():
        if preset == size.preset and size.hf_id:
            return size.hf_id
        if preset == size.base_preset and size.hf_id:
            return size.hf_id.removesuffix("-it")
    return preset


def _write(fmt, tmp, model, backbone, preset, base_model, options) -> list[str]:
    base_dir = preset if os.path.isdir(preset) else None
    if fmt == "peft":
        peft.save_adapter(model, tmp, base_model=base_model, overwrite=True)
        return sorted(os.listdir(tmp))
    if fmt == "hf":
        files = hf.write_hf(model, backbone, tmp, base_dir=base_dir, **options)
        if not any(f in files for f in ("tokenizer.json", "tokenizer.model")):
            files += _tokenizer_model_from_keras(preset, tmp)
        return files
    if fmt == "keras":
        return keras_preset.write_keras_preset(model, backbone, preset, tmp)

    return gguf_lib.write_gguf(
        model,
        backbone,
        tmp,
        base_dir=base_dir,
        preset=preset,
        gguf_type=options["gguf_type"],
    )


def _tokenizer_model_from_keras(preset: str, directory: str) -> list[str]:
    """A KerasHub-name / remote base: its SentencePiece proto as tokenizer.model."""

    tokenizer = presets.load_tokenizer(preset)
    proto = getattr(tokenizer, "proto", None)
    if not proto:
        return []
    with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
        f.write(proto)
    return ["tokenizer.model"]
