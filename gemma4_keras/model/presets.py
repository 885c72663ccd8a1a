"""Loading Gemma 4 presets through KerasHub, and the dtype policy.

A preset is a KerasHub preset name (`gemma4_instruct_4b`), a Hugging Face repo
(`hf://google/gemma-4-E4B-it`), a local directory in either format, or `tiny`
(the small Gemma 4-architecture checkpoint the package writes itself).
Downloads use KerasHub's own credentials: `KAGGLE_USERNAME` / `KAGGLE_KEY`
(or ~/.kaggle/kaggle.json) for KerasHub presets, `HF_TOKEN` for `hf://`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Sequence

import jax
import keras
from absl import logging

from gemma4_keras import _quiet, config_lib
from gemma4_keras.data import commands as data_commands
from gemma4_keras.data import media, template
from gemma4_keras.model import hf_config, hub, stream_load
from gemma4_keras.model.gemma4_lora_model import Gemma4LoraModel
from gemma4_keras.model.hub import PresetError
from gemma4_keras.model.lora import LoraSpec
from gemma4_keras.testing.tiny import tiny_checkpoint

HF_FILES = ("config.json", "tokenizer.json")
KERAS_FILES = ("config.json", "metadata.json")


def known_presets() -> list[str]:
    return hub.preset_names()


# `multimodal`: the Gemma4ForConditionalGeneration layout with tiny vision and
# audio towers (written with transformers' tower configs: the test extra).
TINY_FEATURES = ("ple", "kv_shared", "moe", "k_eq_v", "double_wide_mlp", "multimodal")


def tiny_variant(preset: str) -> dict:
    """`tiny:ple,kv_shared` -> the `tiny_checkpoint` switches it names.

    >>> tiny_variant("tiny:moe,k_eq_v")
    {'moe': True, 'k_eq_v': True}
    >>> tiny_variant("tiny:ple,multimodal")
    {'ple': True, 'layout': 'multimodal'}
    """
    names = [n.strip() for n in preset.partition(":")[2].split(",") if n.strip()]
    unknown = [n for n in names if n not in TINY_FEATURES]
    if unknown:
        raise PresetError(
            f"--config.model.preset={preset!r}: unknown tiny feature(s) {unknown}; "
            f"known: {', '.join(TINY_FEATURES)}"
        )
    spelled = {
        "kv_shared": ("kv_shared_layers", 2),
        "multimodal": ("layout", "multimodal"),
    }
    return dict(spelled.get(n, (n, True)) for n in names)


def resolve_preset(preset: str) -> str:
    """Checks `preset` and returns what KerasHub's `from_preset` should get.

    Raises PresetError naming the missing files of a local directory, or the
    known names for a misspelt preset.
    """
    preset = str(preset).strip()
    if preset == "tiny" or preset.startswith("tiny:"):
        return str(tiny_checkpoint(**tiny_variant(preset)))
    if preset.startswith(("hf://", "kaggle://", "gs://")):
        return preset
    if os.path.sep in preset or preset.startswith(".") or os.path.exists(preset):
        return _check_directory(preset)
    if preset not in known_presets():
        raise PresetError(
            f"--config.model.preset={preset!r} is neither a directory nor a known "
            f"Gemma 4 preset; known presets: {', '.join(known_presets())}, or use "
            "hf://org/repo or a local directory"
        )
    return preset


def _check_directory(path: str) -> str:
    if not os.path.isdir(path):
        raise PresetError(f"--config.model.preset={path!r}: no such directory")
    files = set(os.listdir(path))
    if "metadata.json" in files:  # a KerasHub preset
        missing = [f for f in KERAS_FILES if f not in files]
    else:  # a Hugging Face checkpoint
        missing = [f for f in HF_FILES if f not in files]
        if not files & {"model.safetensors", "model.safetensors.index.json"}:
            missing.append("model.safetensors (or model.safetensors.index.json)")
    if missing:
        raise PresetError(
            f"--config.model.preset={path!r} is missing {', '.join(missing)}; a "
            "preset directory holds a Hugging Face checkpoint (config.json, "
            "model.safetensors, tokenizer.json) or a KerasHub preset (metadata.json, ...)"
        )
    if "config.json" in files:
        _read_checked(os.path.join(path, "config.json"))
    return path


def _read_checked(path: str) -> dict:
    """A config.json, validated (`hf_config.validate_json`); PresetError naming it."""
    try:
        return hf_config.read_raw(path)
    except hf_config.ConfigError as e:
        raise PresetError(str(e)) from e


def chat_template(config, preset: str):
    """The chat template of a run: a `data.template.ChatTemplate`.

    Decided by `--config.data.template` (small | large), else the
    checkpoint's own `chat_template.jinja` when `preset` (resolved) is a local
    directory that has one, else the size table (`config_lib.SIZES`).
    """

    size = str(config.size)
    facts = config_lib.SIZES.get(size)
    return template.resolve(
        str(config.data.template),
        size=size,
        size_variant=facts.template if facts else None,
        preset_dir=preset if os.path.isdir(str(preset)) else None,
    )


def processor_settings(preset: str) -> media.ProcessorSettings:
    """Image / audio sizing of `preset`: its `processor_config.json` when it
    is a local directory (as `chat_template` reads its template), else the
    processor's defaults, which the released checkpoints use.

    >>> processor_settings("gemma4_instruct_4b") == media.PROCESSOR
    True
    """
    if os.path.isdir(str(preset)):
        return media.processor_settings(str(preset))
    return media.PROCESSOR


def read_config_json(preset: str) -> dict:
    """The raw `config.json` of a preset, without loading weights.

    Args:
      preset: `config.model.preset`: a KerasHub preset name, hf://org/repo,
        kaggle://..., a local directory (HF or KerasHub format; only its
        config.json is needed), or `tiny`.

    Raises:
      PresetError: naming the preset and the credentials it needs when
        the file cannot be fetched, or the file and field when it is not a
        Gemma 4 config (`hf_config.validate_json`).
    """
    local = str(preset).strip()
    if not local.startswith("tiny") and os.path.isdir(local):
        # Only config.json is read: plan before downloading the weights.
        return _read_local_config(local)
    resolved = resolve_preset(preset)
    if os.path.isdir(resolved):
        return _read_local_config(resolved)
    try:
        raw = hub.load_preset_json(resolved)
    except Exception as e:  # network, auth and missing-file errors alike
        how = (
            "set HF_TOKEN (and accept the model's terms on huggingface.co)"
            if resolved.startswith("hf://")
            else "set KAGGLE_USERNAME and KAGGLE_KEY (or ~/.kaggle/kaggle.json) "
            "and accept the model's terms on kaggle.com"
        )
        raise PresetError(
            f"--config.model.preset={preset!r}: could not fetch its config.json "
            f"({type(e).__name__}: {e}); {how}, or point the preset at a local "
            "directory holding config.json"
        ) from e
    try:
        hf_config.validate_json(raw, source=f"{preset} config.json")
    except hf_config.ConfigError as e:
        raise PresetError(str(e)) from e
    return raw


def _read_local_config(directory: str) -> dict:
    """`directory/config.json`, parsed; PresetError naming the file if not."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise PresetError(
            f"--config.model.preset={directory!r} has no config.json; a preset "
            "directory holds a Hugging Face checkpoint or a KerasHub preset (to "
            "plan, config.json alone is enough)"
        )
    return _read_checked(path)


def compute_dtype(model_cfg) -> str:
    """`model.dtype`; `auto` is float32 on CPU, float16 on a GPU without
    bfloat16 tensor cores (compute capability below 8.0: T4, V100), bfloat16
    on other GPUs and TPUs.

    float16 compute keeps float32 islands (`layers.float16_islands`) and
    trains with dynamic loss scaling; docs/t4.md has the evidence.
    """
    if model_cfg.dtype != "auto":
        return model_cfg.dtype
    backend = jax.default_backend()
    if backend == "cpu":
        return "float32"
    if backend == "gpu" and not gpu_has_bfloat16(jax.devices()[0]):
        return "float16"
    return "bfloat16"


def gpu_has_bfloat16(device) -> bool:
    """Whether a JAX GPU device has bfloat16 tensor cores (Ampere, 8.0, on).

    A device that does not report its compute capability counts as having them.
    """
    try:
        return float(device.compute_capability) >= 8.0
    except (AttributeError, TypeError, ValueError):
        return True


def load_backbone(preset: str, dtype: str):
    """KerasHub `Gemma4Backbone` for a resolved preset."""
    try:
        return hub.backbone_from_preset(preset, dtype)
    except Exception as e:  # hub clients and converters raise many kinds
        raise _load_error(preset, "weights", e) from e


def load_tokenizer(preset: str):
    """KerasHub `Gemma4Tokenizer` for a resolved preset."""
    try:
        with _quiet.filtered_stderr():  # SentencePiece's "identity normalization"
            return hub.tokenizer_from_preset(preset)
    except Exception as e:  # hub clients and converters raise many kinds
        raise _load_error(preset, "tokenizer", e) from e


def _load_error(preset: str, what: str, e: Exception) -> PresetError:
    """One line for a preset that cannot be loaded (offline, no access, corrupt)."""
    first = (str(e).strip().splitlines() or [""])[0][:300]
    if os.path.isdir(preset):
        hint = "the directory holds a broken or incompatible checkpoint"
    else:
        hint = (
            "downloading it needs network access and, for gated models, HF_TOKEN or "
            "KAGGLE_USERNAME/KAGGLE_KEY; or download it once and set "
            "--config.model.preset to the directory"
        )
    return PresetError(
        f"--config.model.preset={preset!r}: could not load its {what} "
        f"({type(e).__name__}: {first}); {hint}"
    )


@contextlib.contextmanager
def on_host():
    """Creates arrays in host memory, outside any Keras distribution.

    The KerasHub backbone is only a source of weights for the training model
    (which copies, maybe quantises, and places them): loading it on the host
    keeps the accelerator's peak at the training model's own size, so a
    QLoRA base is never resident on the device in bfloat16. The host needs
    RAM for the base in the compute dtype while it loads.
    """
    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        with jax.default_device(jax.devices("cpu")[0]):
            yield
    finally:
        keras.distribution.set_distribution(previous)


def ple_on_host(model_cfg) -> bool:
    """`model.ple_on_host` resolved: `auto` = one GPU/TPU and no Keras mesh.

    On a CPU the host is the device (nothing to save); on a mesh the table is
    split over the devices instead (`model/sharding.py`).

    Raises:
      ConfigError: `on` while a Keras distribution (mesh) is active.
    """
    setting = str(model_cfg.ple_on_host)
    meshed = keras.distribution.distribution() is not None
    if setting == "on" and meshed:
        raise config_lib.ConfigError(
            "--config.model.ple_on_host=on needs one device; with "
            "distribution.mode=data|model the table is split over the mesh: "
            "set it to auto or off"
        )
    if setting == "auto":
        return jax.default_backend() != "cpu" and not meshed
    return setting == "on"


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """What building the training model reads: `config.model`, `.quant`, `.lora`.

    The defaults and their meaning are `config_lib.get_config`'s; build one
    with `ModelSettings.of(config)` (a run config) and hand it to
    `build_training_model(preset, settings)`:

        settings = ModelSettings.of(config)
        settings = dataclasses.replace(settings, remat=False, quant="none")
    """

    preset: str  # KerasHub preset name, hf://org/repo, a local dir, or tiny
    dtype: str  # auto | float32 | bfloat16 | float16 (`compute_dtype`)
    quant: str  # quant.mode: none | nf4 | int8 | int4
    double_quant: bool
    block_size: int  # NF4 block
    embedding_quant: str  # quant.embedding: none | int8 (the tied embedding)
    lora: LoraSpec
    remat: bool  # rematerialise each decoder block
    loss_chunk_size: int  # tokens per chunk of the vocab projection
    moe_dispatch: str  # auto | ragged | blocks | dense (model/moe.py)
    moe_token_chunk: int  # tokens per chunk of the routed experts; 0 = off
    ple_on_host: str  # auto | on | off (`ple_on_host`)
    attention: str  # auto | dense | chunked | fused
    attention_chunk_size: int  # queries per chunk [tokens]

    @classmethod
    def of(cls, config) -> ModelSettings:
        """The model settings of a run config (`get_config`'s ConfigDict)."""
        if isinstance(config, cls):
            return config
        m, q = config.model, config.quant
        return cls(
            preset=str(m.preset),
            dtype=str(m.dtype),
            quant=str(q.mode),
            double_quant=bool(q.double_quant),
            block_size=int(q.block_size),
            embedding_quant=str(q.embedding),
            lora=LoraSpec.from_config(config.lora),
            remat=bool(m.remat),
            loss_chunk_size=int(m.loss_chunk_size),
            moe_dispatch=str(m.moe_dispatch),
            moe_token_chunk=int(m.moe_token_chunk),
            ple_on_host=str(m.ple_on_host),
            attention=str(m.attention),
            attention_chunk_size=int(m.attention_chunk_size),
        )


def build_training_model(preset: str, model_settings: ModelSettings):
    """The trainable model for a resolved preset: (quantised) base + adapters.

    `model_settings` is `ModelSettings.of(config)`. Hugging Face checkpoints
    (a local directory, hf://) are read tensor by tensor and quantised as
    they arrive (`stream_load`): the host never holds the full-precision
    model. KerasHub presets (names, kaggle://, KerasHub directories) still
    load a whole KerasHub backbone first.
    """
    s = model_settings
    dtype = compute_dtype(s)
    options = dict(
        quant=s.quant,
        double_quant=s.double_quant,
        block_size=s.block_size,
        remat=s.remat,
        loss_chunk_size=s.loss_chunk_size,
        dtype=dtype,
        ple_on_host=ple_on_host(s),
        embedding_quant=s.embedding_quant,
    )
    model = _load_model(preset, dtype, s.lora, options)
    model.set_attention(s.attention, s.attention_chunk_size)
    model.set_moe(s.moe_dispatch, s.moe_token_chunk)
    return model


def _load_model(preset: str, dtype, lora, options: dict):
    """The model of `build_training_model`, streamed from a HF directory or
    copied out of a KerasHub backbone."""
    try:
        directory = stream_load.local_checkpoint(preset)
        if directory is not None:
            # Variables are created under the active distribution (as
            # `from_backbone` below), so a mesh lays them out; each tensor is
            # read and quantised on the host first.
            return stream_load.stream_training_model(directory, lora, **options)
    except (stream_load.CheckpointError, hf_config.ConfigError, OSError) as e:
        raise _load_error(preset, "weights", e) from e
    # KerasHub reads the whole backbone before the copy's progress bar starts.
    logging.info("loading %s with KerasHub (the whole backbone, on the host)", preset)
    with on_host():
        backbone = load_backbone(preset, dtype)
    # The training model copies (maybe quantises) what it needs; the backbone
    # is dropped when this returns.
    return Gemma4LoraModel.from_backbone(backbone, lora, **options)


def attach_towers(
    model, preset: str, kinds: Sequence[str] = ("image", "audio")
) -> None:
    """Attaches the frozen towers of `kinds` ("image", "audio") of `preset`.

    For data with images or audio. The towers (KerasHub's encoders, float32,
    `hub.load_towers`) are read from a local or hf:// Hugging Face
    multimodal checkpoint.

    Raises:
        PresetError: the preset is not a HF checkpoint, or lacks a tower.
    """
    directory = stream_load.local_checkpoint(preset)
    if directory is None:
        raise PresetError(
            f"{preset}: images and audio need a Hugging Face multimodal checkpoint "
            "(a local directory or hf://google/gemma-4-...); this preset is a "
            "KerasHub one, whose towers are not read"
        )
    model.attach_towers(hub.load_towers(directory, kinds))


def check_tower_targets(lora: LoraSpec, kinds: Sequence[str]) -> None:
    """Stops a run whose `lora.targets` name vision tower layers it has no
    vision tower for (`tower_kinds`: no "image")."""
    if lora.tower_targets and "image" not in kinds:
        names = ", ".join(config_lib.TOWER_PREFIX + t for t in lora.tower_targets)
        raise config_lib.ConfigError(
            f"lora.targets names vision tower targets ({names}), but the run "
            "attaches no vision tower: set --config.model.towers=on on a "
            "multimodal checkpoint, or drop them from lora.targets"
        )


def tower_kinds(
    model_cfg, data_kinds: Callable[[], set[str]], preset: str | None = None
) -> tuple[str, ...]:
    """The towers a run attaches (`model.towers`): () or some of image, audio.

    `data_kinds()` gives the media part types of the run's data
    (`data.commands.media_kinds`); auto attaches those, on every tower
    `preset`'s config.json names (26B-A4B and 31B have no audio tower),
    off none.

    Raises:
        ConfigError: `model.towers=off` with data that has media parts.
    """
    setting = str(model_cfg.towers)
    if setting == "on":
        raw = read_config_json(preset or str(model_cfg.preset))
        return tuple(k for k, field in hub.TOWER_FIELDS.items() if raw.get(field))
    kinds = tuple(k for k in ("image", "audio") if k in data_kinds())
    if kinds and setting == "off":
        raise config_lib.ConfigError(
            f"model.towers=off, but the data has {' and '.join(kinds)} parts: set "
            "--config.model.towers=auto (or on), or remove the media parts"
        )
    return kinds


def _data_kinds(config, preset: str) -> set[str]:
    """The media part types of `config.data` (training and held-out records)."""
    variant = chat_template(config, preset).variant
    train, holdout, _, _ = data_commands.read_and_split(
        config_lib.data_settings(config.data, variant)
    )
    return data_commands.media_kinds(train + holdout)


def load_training_model(config):
    """Resolves `model.preset` and builds the model. Returns (model, tokenizer, preset).

    The preset's frozen towers of `tower_kinds` (with `model.towers=auto`:
    those the data's image / audio parts need) are attached, as `train` does.
    """
    preset = resolve_preset(config.model.preset)
    tokenizer = load_tokenizer(preset)
    towers = tower_kinds(config.model, lambda: _data_kinds(config, preset), preset)
    settings = ModelSettings.of(config)
    check_tower_targets(settings.lora, towers)
    model = build_training_model(preset, settings)
    if towers:
        attach_towers(model, preset, towers)
    return model, tokenizer, preset


__all__ = [
    "ModelSettings",
    "PresetError",
    "chat_template",
    "compute_dtype",
    "gpu_has_bfloat16",
    "known_presets",
    "load_backbone",
    "attach_towers",
    "check_tower_targets",
    "tower_kinds",
    "processor_settings",
    "build_training_model",
    "load_tokenizer",
    "load_training_model",
    "resolve_preset",
]
