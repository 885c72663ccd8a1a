"""The data steps of a run in one call, and the `data check|stats|split` backends.

Each step takes a `DataSettings` (or what `DataSettings.of` takes: a mapping
or a ConfigDict slice; absent fields take the defaults there). `template`
must be resolved to small or large (`data.template.resolve`, or
`presets.chat_template` for a run config) before anything is encoded: the
data steps never guess the chat template.
"""

import dataclasses
import json
import os
import re
from typing import Any

from gemma4_keras import atomic, outputs
from gemma4_keras.data import chat, media, quality, records
from gemma4_keras.data.records import Conversation, DataError, Problem
from gemma4_keras.data.template import TemplateError
from gemma4_keras.data.tokenize import EncodedExample, encode_conversations
from gemma4_keras.settings import DataSettings


@dataclasses.dataclass
class PreparedData:
    """Everything the trainer needs from the data config."""

    train: list[Conversation]
    holdout: list[Conversation]
    train_examples: list[EncodedExample]
    holdout_examples: list[EncodedExample]
    report: dict


def template_variant(data_cfg: Any) -> str:
    """`template` of data settings, which must be resolved (small or large)."""
    variant = DataSettings.of(data_cfg).template
    if variant not in chat.TEMPLATES:
        raise TemplateError(
            f"data.template={variant!r} is not resolved to small or large here; "
            "resolve it first (gemma4_keras.model.presets.chat_template(config, preset)) "
            "or set --config.data.template=small (E2B/E4B) or large (26B-A4B/31B)"
        )
    return variant


def _encode_kwargs(settings: DataSettings) -> dict:
    return {
        "train_on": settings.train_on,
        "max_length": int(settings.max_length),
        "truncation": settings.truncation,
        "template": template_variant(settings),
        "enable_thinking": bool(settings.enable_thinking),
    }


def _source_order(problem: Problem) -> tuple:
    # "file:12" / "file[3]" / "tfds:name:split[3]": by file, then record number.
    match = re.search(r"^(.*?)[:\[](\d+)\]?$", problem.source)
    return (match.group(1), int(match.group(2))) if match else (problem.source, 0)


def load_checked(
    settings: DataSettings, processor: media.ProcessorSettings = media.PROCESSOR
) -> tuple[list[Conversation], dict]:
    """`records.load_conversations`, then every tool call checked against its declarations.

    A conversation with a call its `tools` refuse (`quality.call_problems`)
    is a bad record like any other: with data.on_error=raise every problem
    of the file (bad records and bad calls, in file order) stops the run
    here, before anything is encoded; with skip it is left out and listed
    in the read statistics (`tool_call_errors` counts those records).

    Raises:
        DataError: with on_error=raise, listing every problem as file:line.
    """
    collect = settings.on_error == "raise"  # read on to list the calls' problems too
    skip = dataclasses.replace(settings, on_error="skip") if collect else settings
    conversations, read_stats = records.load_conversations(skip, processor)
    kept, call_problems = quality.check_tool_calls(conversations)
    problems = [Problem(**p) for p in read_stats["skipped_records"]] + call_problems
    problems.sort(key=_source_order)
    if collect and problems:
        raise DataError(problems)
    bad = len(conversations) - len(kept)
    read_stats.update(
        valid=len(kept),
        skipped=read_stats["skipped"] + bad,
        skipped_records=[dataclasses.asdict(p) for p in problems],
        tool_call_errors=bad,
    )
    return kept, read_stats


def read_and_split(
    settings: DataSettings, processor: media.ProcessorSettings = media.PROCESSOR
) -> tuple[list, list, dict, dict | None]:
    """(train, holdout, read stats, dedupe stats) of the data, as a run splits it.

    No encoding: `data render`, `data split` and `evaluate`'s check against
    a run's training examples read the split without a tokenizer. Images and
    audio are sized as `processor` (the checkpoint's processor_config.json,
    `presets.processor_settings`) says.
    """
    conversations, read_stats = load_checked(settings, processor)
    dedupe_stats = None
    if settings.dedupe:
        conversations, dedupe_stats = quality.dedupe(conversations)
    if settings.eval_path:
        holdout, holdout_stats = load_checked(
            dataclasses.replace(settings, path=settings.eval_path), processor
        )
        read_stats["eval"] = holdout_stats
        return conversations, holdout, read_stats, dedupe_stats
    train, holdout = quality.split_holdout(
        conversations, float(settings.holdout_fraction), int(settings.seed)
    )
    return train, holdout, read_stats, dedupe_stats


def _split_info(train: list, holdout: list, settings: DataSettings) -> dict:
    return {
        "train": len(train),
        "holdout": len(holdout),
        "fraction": float(settings.holdout_fraction),
        "seed": int(settings.seed),
    }


def has_media(conversations: list[Conversation]) -> bool:
    """Whether any message of `conversations` has an image or audio part."""
    return bool(media_kinds(conversations))


def media_kinds(conversations: list[Conversation]) -> set[str]:
    """The media part types (`media.IMAGE`, `media.AUDIO`) in `conversations`."""
    return {
        r["type"] for c in conversations for m in c.messages for r in m.get("media", ())
    }


def prepare(
    data_cfg: Any, tokenizer: Any, processor: media.ProcessorSettings = media.PROCESSOR
) -> PreparedData:
    """Read, validate, dedupe, split, encode and report, as a run does.

    Args:
        data_cfg: the run's settings (`config_lib.data_settings(config.data,
            template)`), or what `DataSettings.of` takes.
        tokenizer: a KerasHub Gemma4Tokenizer (or a ChatTokenizer).

    Returns:
        PreparedData; `report` is the quality report (JSON-serialisable).
    """
    settings = DataSettings.of(data_cfg)
    train, holdout, read_stats, dedupe_stats = read_and_split(settings, processor)
    train_examples, encode_stats = encode_conversations(
        train, tokenizer, **_encode_kwargs(settings)
    )
    holdout_examples, _ = encode_conversations(
        holdout, tokenizer, **_encode_kwargs(settings)
    )
    if not train_examples:
        raise DataError(
            f"{settings.path}: no training example left: {len(train)} training "
            f"conversation(s), {encode_stats.get('dropped_too_long', 0)} dropped as "
            f"longer than data.max_length={int(settings.max_length)}. Add data, raise "
            "data.max_length or set data.truncation=cut_history"
        )
    encode_stats["policy"] = settings.truncation
    report = quality.quality_report(
        train + holdout,
        train_examples,
        read_stats,
        dedupe_stats=dedupe_stats,
        encode_stats=encode_stats,
        split=_split_info(train, holdout, settings),
        max_length=int(settings.max_length),
    )
    return PreparedData(train, holdout, train_examples, holdout_examples, report)


def stats(
    data_cfg: Any,
    tokenizer: Any = None,
    processor: media.ProcessorSettings = media.PROCESSOR,
) -> dict:
    """The quality report; bad records are listed, never fatal (`data stats`)."""
    settings = dataclasses.replace(DataSettings.of(data_cfg), on_error="skip")
    train, holdout, read_stats, dedupe_stats = read_and_split(settings, processor)
    encoded, encode_stats = None, None
    if tokenizer is not None:
        encoded, encode_stats = encode_conversations(
            train + holdout, tokenizer, **_encode_kwargs(settings)
        )
        encode_stats["policy"] = settings.truncation
    return quality.quality_report(
        train + holdout,
        encoded,
        read_stats,
        dedupe_stats=dedupe_stats,
        encode_stats=encode_stats,
        split=_split_info(train, holdout, settings),
        max_length=int(settings.max_length),
    )


def check(
    data_cfg: Any,
    tokenizer: Any = None,
    processor: media.ProcessorSettings = media.PROCESSOR,
) -> dict:
    """`data check`: the report; in on_error=raise mode bad records fail it.

    Raises:
        DataError: listing every bad record (file:line: problem), when
            data.on_error is "raise"; the report is attached as `e.report`.
    """
    settings = DataSettings.of(data_cfg)
    report = stats(settings, tokenizer, processor)
    read = report["read"]
    if settings.on_error == "raise" and read["skipped"]:
        error = DataError([Problem(**p) for p in read["skipped_records"]])
        error.report = report
        raise error
    if not read["valid"]:
        # on_error=skip would otherwise pass a file nothing can train on.
        error = DataError(
            f"{settings.path}: no valid record ({read['records']} read, "
            f"{read['skipped']} skipped); fix the data or data.path"
        )
        error.report = report
        raise error
    return report


def write_json(path: str, obj: Any) -> None:
    """Writes JSON atomically (a crash never leaves half a file)."""
    atomic.write_json(path, obj, ensure_ascii=False)


def _record_message(message: dict) -> dict:
    """A message as a record line: media as content parts, which read back."""
    if not message.get("media"):
        return message
    out = {k: v for k, v in message.items() if k != "media"}
    records = iter(message["media"])
    out["content"] = [
        media.as_part(next(records)) if part["type"] != "text" else part
        for part in chat.template_messages([message])[0]["content"]
    ]
    return out


def _write_jsonl(path: str, conversations: list[Conversation]) -> None:
    with atomic.atomic_open(path) as f:
        for c in conversations:
            messages = [_record_message(m) for m in c.messages]
            record = {"messages": messages, "source": c.source}
            if c.tools:  # the declarations travel with their conversation
                record["tools"] = c.tools
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def split(data_cfg: Any, out_dir: str) -> dict:
    """`data split`: writes train.jsonl, holdout.jsonl and report.json to out_dir.

    Returns:
        {"train": path, "holdout": path, "report": path}.
    """
    settings = DataSettings.of(data_cfg)
    names = {
        "train": "train.jsonl",
        "holdout": "holdout.jsonl",
        "report": "report.json",
    }
    outputs.check(out_dir, list(names.values()), inputs=outputs.data_inputs(settings))
    paths = {name: os.path.join(out_dir, file) for name, file in names.items()}
    train, holdout, read_stats, dedupe_stats = read_and_split(settings)
    os.makedirs(out_dir, exist_ok=True)
    _write_jsonl(paths["train"], train)
    _write_jsonl(paths["holdout"], holdout)
    report = quality.quality_report(
        train + holdout,
        None,
        read_stats,
        dedupe_stats=dedupe_stats,
        split=_split_info(train, holdout, settings),
    )
    write_json(paths["report"], report)
    return paths
