"""Reading a Hugging Face Gemma 4 `config.json`, in either layout of its fields.

Released checkpoints carry `global_head_dim` (and, on K=V models,
`num_global_key_value_heads`) at the top level of the text config. The
transformers 5.x `save_pretrained` writes them instead as per-layer overrides
of the full-attention layers and drops the top-level keys:

    released:          {"head_dim": 256, "global_head_dim": 512, ...}
    transformers 5.24: {"head_dim": 256, "per_layer_config":
                        {"4": {"head_dim": 512}, "9": {"head_dim": 512}, ...}}

KerasHub 0.32's converter reads only the top level, so it builds a re-saved
checkpoint (a merged fine-tune, a community upload) with the wrong global
head size. `normalise` rewrites either layout into the released one; it also
drops `vision_config: null` / `audio_config: null` (transformers writes them;
KerasHub builds a vision encoder whenever the key exists and fails on null).

Usage:

    config = hf_config.read_config(directory)      # normalised dict
    text = hf_config.text_config(config)
    with hf_config.keras_hub_view(directory) as readable:
        backbone = keras_hub.models.Gemma4Backbone.from_preset(readable)
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
from collections.abc import Iterator

CONFIG_FILE = "config.json"
# transformers' default when neither layout names the global head size
# (`Gemma4TextConfig.__post_init__`: `kwargs.pop("global_head_dim", 512)`).
TRANSFORMERS_GLOBAL_HEAD_DIM = 512
# Per-layer overrides that map onto a top-level field of the released layout.
_OVERRIDES = ("head_dim", "num_key_value_heads")


class ConfigError(ValueError):
    """A config.json this package cannot read as a Gemma 4 text decoder."""


def read_config(directory: str | os.PathLike) -> dict:
    """`directory/config.json`, normalised to the released layout (`normalise`).

    Raises:
        ConfigError: the file is missing, not JSON, or has per-layer overrides
            that the released layout cannot express; the message names the file.

    Example:

        >>> cfg = read_config(tiny_checkpoint())
        >>> text_config(cfg)["global_head_dim"]
        32
    """
    path = os.path.join(os.fspath(directory), CONFIG_FILE)
    return normalise(read_raw(path), source=path)


def read_raw(path: str | os.PathLike) -> dict:
    """The JSON of one config file, checked by `validate`; one-line errors name it."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError as e:
        raise ConfigError(
            f"{path}: no such file (a checkpoint needs config.json)"
        ) from e
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not a text file (invalid UTF-8 at byte {e.start}); a "
            "checkpoint's config.json is JSON"
        ) from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    validate_json(raw, source=os.fspath(path))
    return raw


# The fields this package and KerasHub's converter read, as JSON schemas: a
# size is a positive integer (a string, a negative or zero size is refused
# here, not deep inside the planner or KerasHub).
_SIZE = {"type": "integer", "minimum": 1}
_SIZE_OR_NULL = {"type": ["integer", "null"], "minimum": 1}
_COUNT = {"type": "integer", "minimum": 0}
_COUNT_OR_NULL = {"type": ["integer", "null"], "minimum": 0}
_LAYER_TYPES = {
    "type": "array",
    "minItems": 1,
    "items": {"enum": ["sliding_attention", "full_attention"]},
}
TEXT_SCHEMA = {
    "type": "object",
    "required": [
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "head_dim",
        "layer_types",
    ],
    "properties": {
        "hidden_size": _SIZE,
        "num_hidden_layers": _SIZE,
        "intermediate_size": _SIZE,
        "head_dim": _SIZE,
        "num_attention_heads": _SIZE,
        "num_key_value_heads": _SIZE,
        "vocab_size": _SIZE,
        "layer_types": _LAYER_TYPES,
        "global_head_dim": _SIZE_OR_NULL,
        "num_global_key_value_heads": _SIZE_OR_NULL,
        "vocab_size_per_layer_input": _SIZE_OR_NULL,
        "hidden_size_per_layer_input": _COUNT_OR_NULL,
        "num_kv_shared_layers": _COUNT_OR_NULL,
        "sliding_window": _COUNT,
        "num_experts": _SIZE_OR_NULL,
        "top_k_experts": _SIZE_OR_NULL,
        "moe_intermediate_size": _SIZE_OR_NULL,
        "per_layer_config": {"type": ["object", "null"]},
        "rope_parameters": {"type": ["object", "null"]},
    },
}
_KERAS_SIZES = (
    "vocabulary_size",
    "num_layers",
    "num_query_heads",
    "num_key_value_heads",
    "hidden_dim",
    "intermediate_dim",
    "head_dim",
)
KERAS_SCHEMA = {  # a KerasHub preset's {"class_name": ..., "config": kwargs}
    "type": "object",
    "required": ["config"],
    "properties": {
        "class_name": {"type": "string"},
        "config": {
            "type": "object",
            "required": list(_KERAS_SIZES),
            "properties": {
                **dict.fromkeys(_KERAS_SIZES, _SIZE),
                "global_head_dim": _SIZE_OR_NULL,
                "num_global_key_value_heads": _SIZE_OR_NULL,
                "layer_types": {"anyOf": [_LAYER_TYPES, {"type": "null"}]},
            },
        },
    },
}
_WORDS = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "object": "a JSON object",
    "array": "a list",
}


def _expected(schema: dict) -> str:
    """What a schema asks for, in words: "an integer >= 1 or null"."""
    if "enum" in schema:
        return "one of " + ", ".join(map(repr, schema["enum"]))
    if "anyOf" in schema:
        return " or ".join(_expected(s) for s in schema["anyOf"])
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    text = " or ".join(_WORDS.get(t, t) for t in types if t != "null")
    if "minimum" in schema:
        text += f" >= {schema['minimum']}"
    if "minItems" in schema:
        text = "a non-empty list"
    return text + (" or null" if "null" in types else "")


def _problem(error, prefix: str) -> str:
    """One phrase for a jsonschema error: "num_attention_heads must be ..., got 0"."""
    where = prefix
    for part in error.absolute_path:
        where += (
            f"[{part}]" if isinstance(part, int) else f"{'.' if where else ''}{part}"
        )
    if error.validator == "required":
        missing = [k for k in error.validator_value if k not in error.instance]
        return (
            f"{where + ': ' if where else ''}{', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing"
        )
    shown = repr(error.instance)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return f"{where or 'the file'} must be {_expected(error.schema)}, got {shown}"


def validate_json(raw, source: str = CONFIG_FILE) -> None:
    """Checks the fields of a config.json (either format) that the package reads.

    Raises:
        ConfigError: one line naming `source`, the field and what it must be,
            e.g. `ckpt/config.json: num_attention_heads must be an integer >= 1,
            got 0; is it a Gemma 4 checkpoint's config.json?`

    Example:

        >>> validate_json({"hidden_size": 8})
        Traceback (most recent call last):
        gemma4_keras.model.hf_config.ConfigError: config.json: num_hidden_layers, intermediate_size, head_dim, layer_types are missing; is it a Gemma 4 checkpoint's config.json?
    """
    import jsonschema  # the package's JSON-schema library (also eval metrics)

    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    keras = "class_name" in raw and "config" in raw
    if keras:
        schema, part, prefix = KERAS_SCHEMA, raw, ""
    elif "text_config" in raw:
        schema, part, prefix = TEXT_SCHEMA, raw["text_config"], "text_config"
    else:
        schema, part, prefix = TEXT_SCHEMA, raw, ""
    if not isinstance(part, dict):
        raise ConfigError(f"{source}: text_config must be a JSON object, got {part!r}")
    errors = sorted(
        jsonschema.Draft202012Validator(schema).iter_errors(part),
        key=lambda e: (e.validator != "required", list(map(str, e.absolute_path))),
    )
    problem = (
        _problem(errors[0], prefix) if errors else _consistency(part, keras, prefix)
    )
    if problem:
        raise ConfigError(
            f"{source}: {problem}; is it a Gemma 4 checkpoint's config.json?"
        )


def _consistency(text: dict, keras: bool, prefix: str) -> str | None:
    """What the schema cannot say: one layer type per layer, shared layers <= layers."""
    if keras:
        return None
    dot = f"{prefix}." if prefix else ""
    layers, types = text["num_hidden_layers"], text["layer_types"]
    if len(types) != layers:
        return (
            f"{dot}layer_types lists {len(types)} layers, {dot}num_hidden_layers "
            f"is {layers}"
        )
    shared = text.get("num_kv_shared_layers") or 0
    if shared > layers:
        return f"{dot}num_kv_shared_layers={shared} is more than the {layers} layers"
    return None


def text_config(config: dict) -> dict:
    """The text decoder's fields: `text_config` of a multimodal config, else itself."""
    return config.get("text_config", config)


def normalise(config: dict, source: str = CONFIG_FILE) -> dict:
    """A copy of `config` in the released layout (what KerasHub 0.32 reads).

    * `per_layer_config` overrides of the full-attention layers become the
      top-level `global_head_dim` and `num_global_key_value_heads`, and the
      key is removed (it said nothing else);
    * no `global_head_dim` anywhere: `head_dim` when the config has a
      `per_layer_config` (transformers 5.24 writes one, maybe `{}`, and omits
      the key when the sizes agree), else the older default, 512;
    * `num_global_key_value_heads` is kept only with `attention_k_eq_v`:
      transformers ignores it otherwise, while KerasHub turns K=V on whenever
      it is set;
    * `vision_config` / `audio_config` keys whose value is null are dropped.

    Args:
        config: a parsed config.json (either `Gemma4ForCausalLM` or
            `Gemma4ForConditionalGeneration` layout).
        source: file name for error messages.

    Raises:
        ConfigError: overrides the released layout cannot express (a sliding
            layer with its own head size, full layers that disagree, an
            unknown per-layer field).

    Example:

        >>> saved = {"model_type": "gemma4_text", "head_dim": 256,
        ...          "layer_types": ["sliding_attention", "full_attention"],
        ...          "per_layer_config": {"1": {"head_dim": 512}}}
        >>> normalise(saved)["global_head_dim"]
        512
    """
    out = copy.deepcopy(config)
    for key in ("vision_config", "audio_config"):
        if key in out and out[key] is None:
            del out[key]
    text = text_config(out)
    overrides = _full_layer_overrides(text, source)
    # transformers 5.24 writes `per_layer_config` (maybe `{}`) and no
    # `global_head_dim`: no override means the full layers use `head_dim`.
    # A config with neither key is the older layout, whose default was 512.
    new_layout = "per_layer_config" in text
    text.pop("per_layer_config", None)
    if "head_dim" in overrides:
        text["global_head_dim"] = overrides["head_dim"]
    elif text.get("global_head_dim") is None:
        text["global_head_dim"] = (
            text["head_dim"] if new_layout else TRANSFORMERS_GLOBAL_HEAD_DIM
        )
    if not text.get("attention_k_eq_v"):
        if text.get("num_global_key_value_heads") is not None:
            text["num_global_key_value_heads"] = None
    elif "num_key_value_heads" in overrides:
        text["num_global_key_value_heads"] = overrides["num_key_value_heads"]
    return out


def _full_layer_overrides(text: dict, source: str) -> dict:
    """{field: value} that `per_layer_config` sets on every full-attention layer.

    Empty when the config has no `per_layer_config`. Keys are layer indices
    as strings (`"4"`, or zero-padded `"04"`).
    """
    per_layer = text.get("per_layer_config")
    if not per_layer:
        return {}
    types = text.get("layer_types") or []
    by_layer = {}
    for key, fields in per_layer.items():
        try:
            i = int(key)
        except ValueError:
            raise ConfigError(
                f"{source}: per_layer_config key {key!r} is not a layer index"
            ) from None
        if not 0 <= i < len(types):
            raise ConfigError(
                f"{source}: per_layer_config names layer {i}, but layer_types has "
                f"{len(types)} layers"
            )
        unknown = sorted(set(fields) - set(_OVERRIDES))
        if unknown:
            raise ConfigError(
                f"{source}: per_layer_config[{key!r}] sets {unknown}; only "
                f"{list(_OVERRIDES)} can be read"
            )
        by_layer[i] = fields
    return _collapse(text, by_layer, types, source)


def _collapse(text: dict, by_layer: dict, types: list, source: str) -> dict:
    """One value per field for the full layers; sliding layers must not differ."""
    found: dict[str, set] = {f: set() for f in _OVERRIDES}
    for i, kind in enumerate(types):
        fields = by_layer.get(i, {})
        for field in _OVERRIDES:
            value = fields.get(field, text.get(field))
            if kind == "full_attention":
                found[field].add(value)
            elif value != text.get(field):
                raise ConfigError(
                    f"{source}: per_layer_config gives sliding layer {i} "
                    f"{field}={value}, the top level {text.get(field)}; the released "
                    "layout cannot express that"
                )
    out = {}
    for field, values in found.items():
        if len(values) > 1:
            raise ConfigError(
                f"{source}: per_layer_config gives the full-attention layers "
                f"different {field} values {sorted(values)}; Gemma 4 has one"
            )
        if values and any(field in f for f in by_layer.values()):
            out[field] = values.pop()
    return out


def needs_normalising(directory: str | os.PathLike) -> bool:
    """Whether KerasHub would misread `directory/config.json` as it is."""
    path = os.path.join(os.fspath(directory), CONFIG_FILE)
    raw = read_raw(path)
    return normalise(raw, source=path) != raw


@contextlib.contextmanager
def keras_hub_view(preset: str | os.PathLike) -> Iterator[str]:
    """A path KerasHub's `from_preset` reads correctly; removed on exit.

    A local Hugging Face directory whose config.json is not in the released
    layout is shown to KerasHub as a temporary directory holding the
    normalised config.json and a symbolic link to every other file of the
    original (no weight byte is copied). Anything else (a directory already
    in the released layout, a KerasHub preset, a preset name, hf://) is
    yielded unchanged.

    Example:

        with keras_hub_view(path) as readable:
            backbone = keras_hub.models.Gemma4Backbone.from_preset(readable)
    """
    preset = os.fspath(preset)
    if not _is_hf_directory(preset) or not needs_normalising(preset):
        yield preset
        return
    view = tempfile.mkdtemp(prefix="gemma4_keras_config_")
    try:
        _link_with_config(preset, view)
        yield view
    finally:
        shutil.rmtree(view, ignore_errors=True)


def _is_hf_directory(preset: str) -> bool:
    return (
        os.path.isdir(preset)
        and os.path.exists(os.path.join(preset, CONFIG_FILE))
        and not os.path.exists(os.path.join(preset, "metadata.json"))
    )


def _link_with_config(source: str, view: str) -> None:
    source = os.path.abspath(source)
    for name in os.listdir(source):
        if name != CONFIG_FILE:
            os.symlink(os.path.join(source, name), os.path.join(view, name))
    with open(os.path.join(view, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(read_config(source), f, indent=2, sort_keys=True)
        f.write("\n")


__all__ = [
    "ConfigError",
    "keras_hub_view",
    "needs_normalising",
    "normalise",
    "read_config",
    "read_raw",
    "text_config",
    "validate_json",
]
