"""The data fields, typed and frozen, with their one set of defaults.

`DataSettings` is what every data step reads: `load_conversations`,
`prepare`, `stats`, `check`, `split` and `render.render_records`.
`config_lib.get_config` builds a run config's `data` slice from these
defaults (the size table sets `max_length`), so `--config.data.<field>`
exists for every field here and a default is written down once.

    settings = DataSettings.of({"path": "train.jsonl", "template": "small"})
    settings.max_length                       # 1024: the default
    settings = DataSettings.of(config.data)   # a run config's ConfigDict slice
    settings = dataclasses.replace(settings, on_error="skip")

A run resolves its config with `config_lib.data_settings(config.data,
template)` (the shipped sample for an empty path, the chat template
resolved to small or large). The model's settings are
`presets.ModelSettings` (they hold a `lora.LoraSpec`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# Canonical record keys that `fields` may rename (see `records`).
RECORD_FIELDS = (
    "messages",
    "prompt",
    "completion",
    "system",
    "instruction",
    "input",
    "output",
    "image",  # prompt/completion and alpaca records: an image before the prompt
)


def _no_renames() -> dict[str, str]:
    return dict.fromkeys(RECORD_FIELDS, "")


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """`config.data`, typed. Build it with `DataSettings.of` (see the module)."""

    # JSONL/JSON/CSV file or tfds:name[/config]:split (run configs: empty =
    # the sample that ships with the package).
    path: str = ""
    format: str = "auto"  # auto | messages | prompt_completion | alpaca | csv | tfds
    # Record key -> column / feature name in the data; "" = the key's own name.
    fields: Mapping[str, str] = dataclasses.field(default_factory=_no_renames)
    on_error: str = "raise"  # raise | skip (skipped records are listed in the report)
    system_prompt: str = ""  # added as system turn when a record has none
    # Held-out file (formats as for path); empty = hold out holdout_fraction of path.
    eval_path: str = ""
    tfds_data_dir: str = ""  # TFDS data_dir for tfds: paths; empty = TFDS' default
    train_on: str = "last_model_turn"  # last_model_turn | all_model_turns
    max_length: int = 1024  # tokens per example (run configs: the size table's)
    truncation: str = "drop"  # drop | cut_history
    packing: bool = False  # pack several examples into one row
    holdout_fraction: float = 0.1  # held out by content hash, in (0, 0.5]
    dedupe: bool = True
    enable_thinking: bool = False
    # Chat template: auto (the checkpoint's chat_template.jinja, else the size
    # table) | small (E2B/E4B) | large (26B-A4B/31B: empty thought block).
    # Encoding needs it resolved to small or large first.
    template: str = "auto"
    seed: int = 0  # of the held-out split

    @classmethod
    def of(cls, data_cfg: Any) -> DataSettings:
        """Settings from a `DataSettings`, a mapping or a ConfigDict slice.

        Absent fields (and fields set to None) take the defaults above; a
        field this class does not have is a TypeError naming it.
        """
        if isinstance(data_cfg, cls):
            return data_cfg
        if hasattr(data_cfg, "to_dict"):  # ml_collections.ConfigDict
            data_cfg = data_cfg.to_dict()
        if not isinstance(data_cfg, Mapping):
            raise TypeError(
                "data settings must be a DataSettings, a mapping or a ConfigDict, "
                f"not {type(data_cfg).__name__}"
            )
        unknown = sorted(set(data_cfg) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(
                f"unknown data field(s) {unknown}; the fields are those of "
                "gemma4_keras.data.DataSettings (and --config.data.<field>)"
            )
        return cls(**{k: v for k, v in data_cfg.items() if v is not None})
