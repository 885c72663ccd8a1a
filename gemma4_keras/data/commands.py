"""The data steps of a run in one call, and the `data check|stats|split` backends.

Config fields read (attribute or mapping access; defaults in `DEFAULTS`):
path, format, fields, on_error, system_prompt, tfds_data_dir, eval_path,
dedupe, holdout_fraction, seed, train_on, max_length, truncation,
enable_thinking, template. `template` must be resolved to small or large
(`data.template.resolve`, or `models.chat_template` for a run config) before
anything is encoded: the data steps never guess the chat template.
"""

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from gemma4_keras.data import chat, quality, records
from gemma4_keras.data.records import Conversation, DataError, Problem
from gemma4_keras.data.template import TemplateError
from gemma4_keras.data.tokenize import EncodedExample, encode_conversations

DEFAULTS = {
    "path": "",
    "format": "auto",
    "fields": {},
    "on_error": "raise",
    "system_prompt": "",
    "tfds_data_dir": "",
    "eval_path": "",
    "dedupe": True,
    "holdout_fraction": 0.1,
    "seed": 0,
    "train_on": "last_model_turn",
    "max_length": 1024,
    "truncation": "drop",
    "enable_thinking": False,
    "template": "auto",  # resolve to small | large first (see the docstring)
}


class _View:
    """Read-only config view with defaults and overrides (never mutates cfg)."""

    def __init__(self, cfg: Any, **overrides: Any):
        self._cfg, self._overrides = cfg, overrides

    def __getattr__(self, name: str) -> Any:
        if name in self._overrides:
            return self._overrides[name]
        if isinstance(self._cfg, Mapping):
            value = self._cfg.get(name)
        else:
            value = getattr(self._cfg, name, None)
        return DEFAULTS.get(name) if value is None else value


@dataclasses.dataclass
class PreparedData:
    """Everything the trainer needs from the data config."""

    train: list[Conversation]
    holdout: list[Conversation]
    train_examples: list[EncodedExample]
    holdout_examples: list[EncodedExample]
    report: dict


def template_variant(cfg: Any) -> str:
    """`template` of a data config, which must be resolved (small or large)."""
    variant = _View(cfg).template
    if variant not in chat.TEMPLATES:
        raise TemplateError(
            f"data.template={variant!r} is not resolved to small or large here; "
            "resolve it first (gemma4_keras.model.presets.chat_template(config, preset)) "
            "or set --config.data.template=small (E2B/E4B) or large (26B-A4B/31B)"
        )
    return variant


def _encode_kwargs(cfg: _View) -> dict:
    return {
        "train_on": cfg.train_on,
        "max_length": int(cfg.max_length),
        "truncation": cfg.truncation,
        "template": template_variant(cfg),
        "enable_thinking": bool(cfg.enable_thinking),
    }


def _read_and_split(cfg: _View) -> tuple[list, list, dict, dict | None]:
    conversations, read_stats = records.load_conversations(cfg)
    dedupe_stats = None
    if cfg.dedupe:
        conversations, dedupe_stats = quality.dedupe(conversations)
    if cfg.eval_path:
        holdout, holdout_stats = records.load_conversations(
            _View(cfg, path=cfg.eval_path)
        )
        read_stats["eval"] = holdout_stats
        return conversations, holdout, read_stats, dedupe_stats
    train, holdout = quality.split_holdout(
        conversations, float(cfg.holdout_fraction), int(cfg.seed)
    )
    return train, holdout, read_stats, dedupe_stats


def prepare(data_cfg: Any, tokenizer: Any) -> PreparedData:
    """Read, validate, dedupe, split, encode and report, as a run does.

    Args:
        data_cfg: the `config.data` slice.
        tokenizer: a KerasHub Gemma4Tokenizer (or a ChatTokenizer).

    Returns:
        PreparedData; `report` is the quality report (JSON-serialisable).
    """
    cfg = _View(data_cfg)
    train, holdout, read_stats, dedupe_stats = _read_and_split(cfg)
    train_examples, encode_stats = encode_conversations(
        train, tokenizer, **_encode_kwargs(cfg)
    )
    holdout_examples, _ = encode_conversations(
        holdout, tokenizer, **_encode_kwargs(cfg)
    )
    if not train_examples:
        raise DataError(
            f"{cfg.path}: no training example left: {len(train)} training "
            f"conversation(s), {encode_stats.get('dropped_too_long', 0)} dropped as "
            f"longer than data.max_length={int(cfg.max_length)}. Add data, raise "
            "data.max_length or set data.truncation=cut_history"
        )
    split = {
        "train": len(train),
        "holdout": len(holdout),
        "fraction": float(cfg.holdout_fraction),
        "seed": int(cfg.seed),
    }
    encode_stats["policy"] = cfg.truncation
    report = quality.quality_report(
        train + holdout,
        train_examples,
        read_stats,
        dedupe_stats=dedupe_stats,
        encode_stats=encode_stats,
        split=split,
        max_length=int(cfg.max_length),
    )
    return PreparedData(train, holdout, train_examples, holdout_examples, report)


def stats(data_cfg: Any, tokenizer: Any = None) -> dict:
    """The quality report; bad records are listed, never fatal (`data stats`)."""
    cfg = _View(data_cfg, on_error="skip")
    train, holdout, read_stats, dedupe_stats = _read_and_split(cfg)
    encoded, encode_stats = None, None
    if tokenizer is not None:
        encoded, encode_stats = encode_conversations(
            train + holdout, tokenizer, **_encode_kwargs(cfg)
        )
        encode_stats["policy"] = cfg.truncation
    split = {
        "train": len(train),
        "holdout": len(holdout),
        "fraction": float(cfg.holdout_fraction),
        "seed": int(cfg.seed),
    }
    return quality.quality_report(
        train + holdout,
        encoded,
        read_stats,
        dedupe_stats=dedupe_stats,
        encode_stats=encode_stats,
        split=split,
        max_length=int(cfg.max_length),
    )


def check(data_cfg: Any, tokenizer: Any = None) -> dict:
    """`data check`: the report; in on_error=raise mode bad records fail it.

    Raises:
        DataError: listing every bad record (file:line: problem), when
            data.on_error is "raise"; the report is attached as `e.report`.
    """
    report = stats(data_cfg, tokenizer)
    read = report["read"]
    if _View(data_cfg).on_error == "raise" and read["skipped"]:
        error = DataError([Problem(**p) for p in read["skipped_records"]])
        error.report = report
        raise error
    if not read["valid"]:
        # on_error=skip would otherwise pass a file nothing can train on.
        error = DataError(
            f"{_View(data_cfg).path}: no valid record ({read['records']} read, "
            f"{read['skipped']} skipped); fix the data or data.path"
        )
        error.report = report
        raise error
    return report


def write_json(path: str, obj: Any) -> None:
    """Writes JSON atomically (a crash never leaves half a file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
    os.replace(tmp, path)


def _write_jsonl(path: str, conversations: list[Conversation]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for c in conversations:
            f.write(
                json.dumps(
                    {"messages": c.messages, "source": c.source}, ensure_ascii=False
                )
                + "\n"
            )
    os.replace(tmp, path)


def split(data_cfg: Any, out_dir: str) -> dict:
    """`data split`: writes train.jsonl, holdout.jsonl and report.json to out_dir.

    Returns:
        {"train": path, "holdout": path, "report": path}.
    """
    cfg = _View(data_cfg)
    paths = {
        name: os.path.join(out_dir, f"{name}.jsonl") for name in ("train", "holdout")
    }
    inputs = {os.path.realpath(p) for p in (cfg.path, cfg.eval_path) if p}
    for path in (*paths.values(), os.path.join(out_dir, "report.json")):
        if os.path.realpath(path) in inputs:
            raise DataError(
                f"--out={out_dir} would overwrite the input {path} (data.path / "
                "data.eval_path); choose another --out"
            )
    train, holdout, read_stats, dedupe_stats = _read_and_split(cfg)
    os.makedirs(out_dir, exist_ok=True)
    _write_jsonl(paths["train"], train)
    _write_jsonl(paths["holdout"], holdout)
    split_info = {
        "train": len(train),
        "holdout": len(holdout),
        "fraction": float(cfg.holdout_fraction),
        "seed": int(cfg.seed),
    }
    report = quality.quality_report(
        train + holdout, None, read_stats, dedupe_stats=dedupe_stats, split=split_info
    )
    paths["report"] = os.path.join(out_dir, "report.json")
    write_json(paths["report"], report)
    return paths
