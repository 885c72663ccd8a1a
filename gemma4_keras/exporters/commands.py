"""`gemma4-keras export`: a finished run's adapter -> a directory a server loads.

    export(config, "runs/x", "peft", "out/adapter")    adapter only (vLLM, PEFT)
    export(config, "runs/x", "hf", "out/hf")           merged safetensors (transformers)
    export(config, "runs/x", "keras", "out/keras")     merged KerasHub preset
    export(config, "runs/x", "gguf", "out/gguf")       merged GGUF (llama.cpp)
    export(config, "runs/x", "gguf-lora", "out/lora")  adapter as GGUF (llama.cpp, Ollama)
                                                       and the base it applies to

`peft` reads no base weights at all: the adapter is checked against the
model spec read from the base's config.json alone. `hf`, `gguf` and the
base GGUF of `gguf-lora` write tensor by tensor from a local HF directory's safetensors
(`hf://` bases are downloaded first), holding one tensor at a time. Two
exports hold the base in memory: `keras` (KerasHub saves a built backbone,
in the output dtype) and `hf` from a base that has no safetensors (a
KerasHub preset name or kaggle://), whose float32 backbone KerasHub loads
before the writer reads it tensor by tensor. Merged exports keep the base's dtype unless
`dtype` says otherwise; the manifest records both.

Every export is written into a temporary directory beside `out` and renamed
into place only when complete, with an `export_manifest.json`; a failure
leaves nothing behind. See docs/deploy.md for serving each format.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from gemma4_keras import config_lib, data, disk, outputs, workdir_lock
from gemma4_keras.exporters import gguf as gguf_lib
from gemma4_keras.exporters import hf, keras_preset, peft
from gemma4_keras.exporters import manifest as manifest_lib
from gemma4_keras.exporters.hf import ExportError, parse_size
from gemma4_keras.exporters.peft import umask_permissions
from gemma4_keras.model import hub, lora, presets, safetensors_io
from gemma4_keras.testing import tiny

FORMATS = ("peft", "hf", "keras", "gguf", "gguf-lora")
# vLLM's accepted `--max-lora-rank` values (its LoRA config checks membership).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest `--max-lora-rank` vLLM accepts that holds `rank`.

    None above vLLM's largest (512): serve such an adapter merged.

    >>> vllm_max_lora_rank(4), vllm_max_lora_rank(16), vllm_max_lora_rank(48)
    (8, 16, 64)
    """
    return next((r for r in VLLM_LORA_RANKS if r >= rank), None)


def vllm_serve_command(base_model: str, adapter_dir: str, rank: int) -> str | None:
    """The `vllm serve` line for a PEFT export (also in its manifest).

    >>> vllm_serve_command("google/gemma-4-E4B-it", "/out/peft", 16)
    'vllm serve google/gemma-4-E4B-it --enable-lora --max-lora-rank 16 --lora-modules adapter=/out/peft'
    """
    if vllm_max_lora_rank(rank) is None:
        return None
    return (
        f"vllm serve {base_model} --enable-lora --max-lora-rank "
        f"{vllm_max_lora_rank(rank)} --lora-modules adapter={os.path.abspath(adapter_dir)}"
    )


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


def check_adapter_checksums(adapter_dir: str, force: bool = False) -> tuple[str, bool]:
    """(sha256 of the adapter's weights, verified): the adapter is the one the run saved.

    Raises:
        ExportError: a file of the adapter changed since the run saved it, or
            it has no checksums.json; with `force`, a warning instead.
    """
    try:
        return peft.verify_checksums(adapter_dir), True
    except peft.ChecksumError as e:
        if not force:
            raise ExportError(
                f"{e}. Restore the adapter the run saved (or retrain on a new "
                "--workdir), or pass --force to export it as it is"
            ) from e
        print(f"warning: {e}; exporting it unverified (--force)", file=sys.stderr)
    weights = os.path.join(adapter_dir, peft.WEIGHTS)
    return manifest_lib.file_sha256(weights), False


# Bytes per element of each --gguf_type (q8_0: blocks of 32 int8 + a float16 scale).
_GGUF_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}
_EXPORT_SLACK = 1 << 20  # metadata, headers, alignment


def export_bytes(job: dict) -> int | None:
    """About how many bytes an export writes; None when it cannot tell in advance.

    From the adapter's factors (peft, gguf-lora) or the base's safetensors
    headers in the output dtype plus its other files (tokenizer, config) for
    merged exports; None for a base that is not a local HF directory.
    """
    fmt, factors = job["fmt"], job["factors"]
    adapter = 0
    if fmt in ("peft", "gguf-lora"):
        per = 4.0 if fmt == "peft" else _GGUF_BYTES.get(job["gguf_type"], 4.0)
        elements = peft.adapter_bytes(factors) // 4  # float32 factors
        adapter = int(elements * per) + _EXPORT_SLACK
        if fmt == "peft":
            return adapter
    base_dir = job["base_dir"]
    if not base_dir:
        return None
    if fmt in ("gguf", "gguf-lora"):
        per = _GGUF_BYTES.get(job["gguf_type"], 4.0)
    else:
        per = float(hf.DTYPE_NAMES[job["dtype"]].itemsize)
    refs = safetensors_io.tensor_refs(base_dir)
    weights = sum(int(np.prod(r.shape, dtype=np.int64)) for r in refs.values()) * per
    others = sum(
        e.stat().st_size
        for e in os.scandir(base_dir)
        if e.is_file() and not e.name.endswith(".safetensors")
    )
    return adapter + int(weights) + others + _EXPORT_SLACK


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
        outputs.check(out, empty=True)  # something may have appeared while we wrote
        umask_permissions(tmp)
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _mismatch(adapter_dir: str, preset: str, e: Exception) -> ExportError:
    return ExportError(
        f"the adapter in {adapter_dir} does not fit base {preset!r}: {e}. Export with "
        "the base the run trained on (--config.model.preset, see adapter_config.json "
        "base_model_name_or_path)"
    )


def read_checked_adapter(adapter_dir: str, model_spec, preset: str):
    """(LoraSpec, factors, adapter_config.json) of the run, checked against the spec.

    The spec comes from the base's config.json alone (`hub.spec_from_config`),
    so no weights are read: shapes, layer count, KV-shared layers (no k/v
    adapters there) and K=V layers (no v_proj adapter) are all checked.
    """
    try:
        spec, factors = peft.read_adapter(adapter_dir)
        lora.check_factors(model_spec, spec.rank, factors)
    except (peft.AdapterFormatError, lora.AdapterMismatchError) as e:
        raise _mismatch(adapter_dir, preset, e) from e
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        return spec, factors, json.load(f)


def hf_base_dir(preset: str) -> str | None:
    """`preset` when it is a local HF checkpoint directory with safetensors."""
    if hf.read_base_config(preset) is None:
        return None
    try:
        safetensors_io.shard_files(preset)
    except safetensors_io.CheckpointError:
        return None
    return preset


SNAPSHOT_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]


def hf_snapshot(preset: str) -> str:
    """The local directory of an `hf://org/repo` base, from the HF cache.

    Downloads the files a streamed export reads when they are not cached yet
    (what KerasHub's own loader of `hf://` would download), so `hf` and `gguf`
    stream from it instead of building the model in memory.
    """
    import huggingface_hub  # KerasHub's own hf:// client; present wherever hf:// loads

    repo = preset[len("hf://") :]
    try:
        return huggingface_hub.snapshot_download(repo, allow_patterns=SNAPSHOT_FILES)
    except Exception as e:  # network, auth, missing repo alike
        raise ExportError(
            f"--config.model.preset={preset}: could not fetch its files "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
            "set HF_TOKEN (gated models), or download it and point the preset at the directory"
        ) from e


def base_dtype(preset: str, config_json: dict) -> str:
    """The base's own dtype: its safetensors' float dtype, else its config's.

    A config that names none gives float32 (no precision is lost by default).
    """
    base_dir = hf_base_dir(preset)
    if base_dir:
        return hf.stored_dtype(safetensors_io.tensor_refs(base_dir))
    kw = config_json.get("config", {}) if "class_name" in config_json else {}
    text = config_json.get("text_config", config_json)
    for value in (kw.get("dtype"), text.get("dtype"), text.get("torch_dtype")):
        if isinstance(value, dict):  # a Keras DTypePolicy config
            value = value.get("config", {}).get("name")
        name = {"bf16": "bfloat16", "mixed_bfloat16": "bfloat16"}.get(value, value)
        if name in hf.DTYPE_NAMES:
            return name
    return "float32"


def _check_options(fmt, shard_size, gguf_type, dtype) -> None:
    """Fails on bad flags before any file is read."""
    if fmt not in FORMATS:
        raise ExportError(f"--format={fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt in ("gguf", "gguf-lora"):
        gguf_lib.check_type(gguf_type)
    if fmt == "hf" and parse_size(shard_size) <= 0:
        raise ExportError(f"--shard_size={shard_size!r} must be > 0 bytes")
    if dtype is not None:
        hf.check_dtype(dtype)
        if fmt not in ("hf", "keras"):
            raise ExportError(
                f"--dtype={dtype} applies to --format=hf and keras; "
                f"--format={fmt} stores {'--gguf_type' if 'gguf' in fmt else 'float32'}"
            )


def export(
    config,
    workdir: str,
    fmt: str,
    out: str,
    *,
    shard_size="5GB",
    gguf_type: str = "f16",
    layout: str | None = None,
    dtype: str | None = None,
    base_model: str | None = None,
    force: bool = False,
) -> str:
    """Exports a finished run's adapter as `fmt` into the new directory `out`.

    Args:
        config: the run's ConfigDict (`config.model.preset` names the base).
        workdir: the training workdir (needs adapter/ and run_state.json
            with status "finished").
        fmt: `peft`, `hf`, `keras`, `gguf` or `gguf-lora`.
        out: output directory; must not exist or be empty.
        shard_size: hf: max bytes per safetensors shard (int or "500MB", "5GB").
        gguf_type: gguf, gguf-lora: `f32`, `f16`, `bf16`, `q8_0` (`q4_k_m`
            needs llama.cpp).
        layout: peft: PEFT key layout, `causal_lm` (`model.layers.*`) or
            `conditional_generation` (`model.language_model.layers.*`);
            default: the base's own. hf: only the base's own layout
            (a merged export keeps the base's tensor names), or for a
            non-HF base the layout to write.
        dtype: hf, keras: stored weight dtype (`float32`, `bfloat16`,
            `float16`); default: the base's own (bfloat16 for the released
            checkpoints). Recorded in the manifest.
        base_model: id recorded as the base (default `config.model.preset`);
            for vLLM use the HF repo id, e.g. `google/gemma-4-E4B-it`.
        force: export a run that did not finish, or an adapter with NaN/inf.

    Returns:
        `out`.

    Example:
      >>> export(config, "runs/tiny", "hf", "runs/tiny/export/hf")
    """

    _check_options(fmt, shard_size, gguf_type, dtype)
    if not os.path.isdir(workdir):
        raise ExportError(
            f"--workdir={workdir}: no such directory; point it at a finished run"
        )
    options = {
        "shard_size": shard_size,
        "gguf_type": gguf_type,
        "layout": layout,
        "dtype": dtype,
    }
    with workdir_lock.hold(workdir, "export", reader=True):
        return _export_locked(config, workdir, fmt, out, options, base_model, force)


def _resolve_layout(fmt, layout, config_json, base_dir) -> str | None:
    own = hf.base_layout(config_json)
    if fmt == "hf" and base_dir and layout not in (None, own):
        raise ExportError(
            f"--layout={layout}: a merged hf export keeps the base's own tensor names "
            f"and config.json, and {base_dir} is {own}; leave --layout unset"
        )
    return (layout or own) if fmt in ("peft", "hf") else None


def _export_locked(config, workdir, fmt, out, options, base_model, force) -> str:
    adapter_dir = check_workdir(workdir, force)
    check_adapter_finite(adapter_dir, force)
    adapter_sha256, verified = check_adapter_checksums(adapter_dir, force)
    outputs.check(out, empty=True, inputs=outputs.run_inputs(config, workdir))
    base_model = base_model or default_base_model(config)
    preset = presets.resolve_preset(config.model.preset)
    if fmt in ("hf", "gguf", "gguf-lora") and preset.startswith("hf://"):
        preset = hf_snapshot(preset)  # stream from the local files
    config_json = presets.read_config_json(preset)
    model_spec = hub.spec_from_config(hub.backbone_kwargs(config_json))
    lora_spec, factors, adapter_cfg = read_checked_adapter(
        adapter_dir, model_spec, preset
    )
    base_dir = hf_base_dir(preset)
    job = {
        "fmt": fmt,
        "out": out,
        "preset": preset,
        "base_dir": base_dir,
        "base_model": base_model,
        "adapter_dir": adapter_dir,
        "config_json": config_json,
        "lora_spec": lora_spec,
        "factors": factors,
        "layout": _resolve_layout(fmt, options["layout"], config_json, base_dir),
        "dtype": _stored_dtype(fmt, options, preset, config_json),
        "shard_size": options["shard_size"],
        "gguf_type": options["gguf_type"],
        "chat_template": _run_template(config, preset, fmt),
    }
    need = export_bytes(job)
    if need is not None:
        disk.require(out, need, f"the {fmt} export")
    with staging(out) as tmp:
        files = _write(tmp, job)
        manifest = manifest_lib.build_manifest(
            fmt=fmt,
            base_model=base_model,
            adapter_config=adapter_cfg,
            workdir=workdir,
            files=files,
            options=_manifest_options(job),
            dtype=job["dtype"],
            base_dtype=base_dtype(preset, config_json),
            adapter_sha256=adapter_sha256,
            adapter_verified=verified,
        )
        manifest_lib.write_manifest(tmp, manifest)
    return out


def _run_template(config, preset: str, fmt: str) -> str | None:
    """GGUF: the run's chat template as jinja, for a base that ships none.

    The package renders the run's data with its variant (`presets.chat_template`);
    `tiny.chat_template_jinja` is that rendering as a template (checked
    against the official renderings, tests/test_tool_template.py). A config
    without the run's data settings (size, data.template) gives None.
    """
    if fmt not in ("gguf", "gguf-lora") or "data" not in config or "size" not in config:
        return None
    try:
        variant = presets.chat_template(config, preset).variant
    except data.TemplateError:  # undecidable here; the base's own, if any, is used
        return None
    return tiny.chat_template_jinja(variant)


def _stored_dtype(fmt, options, preset, config_json) -> str:
    """What the export's weights are stored as (the manifest's `dtype`)."""
    if fmt in ("gguf", "gguf-lora"):
        return options["gguf_type"]
    if fmt == "peft":
        return "float32"  # the adapter's factors, as trained
    return options["dtype"] or base_dtype(preset, config_json)


def _manifest_options(job) -> dict:
    fmt = job["fmt"]
    if fmt == "hf":
        return {k: job[k] for k in ("shard_size", "layout", "dtype")}
    if fmt == "peft":
        rank = job["lora_spec"].rank
        return {
            "layout": job["layout"],
            "vllm_max_lora_rank": vllm_max_lora_rank(rank),
            "vllm_serve": vllm_serve_command(job["base_model"], job["out"], rank),
        }
    if fmt == "keras":
        return {"dtype": job["dtype"]}
    options = {"gguf_type": job["gguf_type"]}
    if fmt == "gguf-lora":
        spec = job["lora_spec"]
        options["adapter_lora_alpha"] = float(spec.rank)
        options["scale_folded_into_lora_b"] = lora.LoraAdapter.scale_of(
            spec.rank, spec.alpha, spec.rslora
        )
    return options


def default_base_model(config) -> str:
    """The HF repo id of a KerasHub preset name (what vLLM and PEFT look up).

    `gemma4_instruct_4b` -> `google/gemma-4-E4B-it`; `hf://org/repo` -> `org/repo`;
    a local directory (`tiny` too) -> its absolute path.
    """

    preset = str(config.model.preset)
    if preset.startswith("hf://"):
        return preset[len("hf://") :]
    for size in config_lib.SIZES.values():
        if preset == size.preset and size.hf_id:
            return size.hf_id
        if preset == size.base_preset and size.hf_id:
            return size.hf_id.removesuffix("-it")
    # A directory (the tiny preset's included) as a path transformers opens
    # from anywhere: `AutoPeftModelForCausalLM.from_pretrained(adapter)`.
    try:
        resolved = presets.resolve_preset(preset)
    except presets.PresetError:
        return preset  # recorded as given; the export itself names the problem
    return os.path.abspath(resolved) if os.path.isdir(resolved) else preset


def _write(tmp: str, job: dict) -> list[str]:
    fmt = job["fmt"]
    if fmt == "peft":  # straight into the staging directory: it is one already
        return peft.write_adapter_files(
            tmp,
            job["lora_spec"],
            job["factors"],
            base_model=job["base_model"],
            layout=job["layout"],
            checksums=False,  # the manifest records the adapter's sha256
        )
    if fmt == "hf":
        return _write_hf(tmp, job)
    if fmt == "keras":
        return keras_preset.write_keras_preset(
            job["preset"], tmp, job["lora_spec"], job["factors"], job["dtype"]
        )
    merged = dict(base_dir=job["base_dir"], preset=job["preset"])
    merged.update(lora_spec=job["lora_spec"], gguf_type=job["gguf_type"])
    merged.update(chat_template=job["chat_template"])
    if fmt == "gguf-lora":
        # llama.cpp serves an adapter on the base it was trained on, as GGUF
        # (`llama-server -m base-f16.gguf --lora adapter-f16.gguf`): the same
        # writer, no adapter merged.
        base = gguf_lib.write_gguf(tmp, factors={}, stem="base", **merged)
        return base + gguf_lib.write_gguf_lora(
            tmp,
            config_json=job["config_json"],
            preset=job["preset"],
            lora_spec=job["lora_spec"],
            factors=job["factors"],
            gguf_type=job["gguf_type"],
            base_dir=job["base_dir"],
        )
    return gguf_lib.write_gguf(tmp, factors=job["factors"], **merged)


def _write_hf(tmp: str, job: dict) -> list[str]:
    common = dict(dtype=job["dtype"], shard_size=job["shard_size"])
    if job["base_dir"]:
        return hf.write_hf_streamed(
            job["base_dir"], tmp, job["lora_spec"], job["factors"], **common
        )
    # No safetensors to stream: KerasHub loads the base (float32, so the merge
    # rounds once) and the writer reads its tensors one by one.
    backbone = presets.load_backbone(job["preset"], "float32")
    files = hf.write_hf_streamed(
        backbone, tmp, job["lora_spec"], job["factors"], layout=job["layout"], **common
    )
    return files + _tokenizer_model_from_keras(job["preset"], tmp)


def _tokenizer_model_from_keras(preset: str, directory: str) -> list[str]:
    """A KerasHub-name / remote base: its SentencePiece proto as tokenizer.model."""

    tokenizer = presets.load_tokenizer(preset)
    proto = getattr(tokenizer, "proto", None)
    if not proto:
        return []
    with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
        f.write(proto)
    return ["tokenizer.model"]
