"""Readers and validation: every input format becomes a list of Conversations.

Formats (`data.format`, or "auto" to detect):

| format            | one record                                                      |
|-------------------|-----------------------------------------------------------------|
| messages          | {"messages": [{"role": "user", "content": "..."}, ...]}         |
| prompt_completion | {"prompt": "...", "completion": "...", "system": "..."?}        |
| alpaca            | {"instruction": "...", "input": "..."?, "output": "..."}        |
| csv               | a header row; `data.fields` maps prompt/completion/system       |
|                   | (or instruction/input/output) to column names                   |
| tfds              | `data.path = "tfds:name[/config]:split"`, fields as for csv     |

`data.fields` renames keys for every format: the canonical key `k` is read
from the record's `fields[k]` (when empty or absent: `k`). Files are `.jsonl` (one JSON
object a line), `.json` (a JSON list of objects) or `.csv`.

Every problem is reported as a `Problem(source, reason)` where source is
"file:line" (JSONL, CSV: the record's first line), "file[index]" (JSON list)
or "tfds:name:split[index]". With `on_error="skip"` bad records are counted
and listed in the read statistics; with "raise" all problems of the input are
collected first and raised as one `DataError`.
"""

import csv
import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

from gemma4_keras.data import chat
from gemma4_keras.settings import DataSettings

ROLES = ("user", "model", "assistant", "system", "developer")
FORMATS = ("auto", "messages", "prompt_completion", "alpaca", "csv", "tfds")
MAX_LISTED_PROBLEMS = 20

Message = dict  # {"role": "system"|"user"|"model", "content": str, "thinking"?: str}


@dataclasses.dataclass(frozen=True)
class Problem:
    """One bad record: where it is and what is wrong with it."""

    source: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


class DataError(ValueError):
    """Bad training data; the message names the file, line and the problem.

    Attributes:
        problems: every problem found (the message lists the first ones).
    """

    def __init__(self, problems: "list[Problem] | Problem | str"):
        if isinstance(problems, str):
            problems = [Problem("", problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems = list(problems)
        super().__init__(_format_problems(self.problems))


def _format_problems(problems: list[Problem]) -> str:
    lines = [str(p) if p.source else p.reason for p in problems[:MAX_LISTED_PROBLEMS]]
    text = lines[0] if lines else "bad data"
    if len(problems) > 1:
        text += (
            f"\n({len(problems)} problems in all; fix them or set data.on_error=skip)"
        )
        text += "".join(f"\n  {line}" for line in lines[1:])
        if len(problems) > MAX_LISTED_PROBLEMS:
            text += f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more"
    return text


@dataclasses.dataclass
class Conversation:
    """One validated conversation in the internal form.

    Attributes:
        messages: roles normalised to system/user/model; content trimmed, model
            thoughts moved to `thinking`; ends with a model turn.
        source: where it came from, e.g. "data/train.jsonl:17".
        meta: optional extras (e.g. the TFDS label name).
    """

    messages: list[Message]
    source: str = ""
    meta: dict = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------
# Validation: raw record -> messages
# --------------------------------------------------------------------------


def _text_content(content: Any, role: str, index: int) -> str:
    """Returns message text; a list of {"type": "text"} parts is joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(c, Mapping) for c in content):
        if any(c.get("type") != "text" for c in content):
            raise ValueError(
                f"message {index} ({role}): only text content is supported"
            )
        return "".join(str(c.get("text", "")) for c in content)
    raise ValueError(
        f"message {index} ({role}): content must be a string, got {type(content).__name__}"
    )


def _normalise_message(raw: Any, index: int) -> Message:
    if not isinstance(raw, Mapping):
        raise ValueError(f"message {index} is not an object with role and content")
    for key in ("role", "content"):
        if key not in raw:
            raise ValueError(f"message {index}: missing field '{key}'")
    role = raw["role"]
    if not isinstance(role, str) or role not in chat.ROLE_ALIASES:
        raise ValueError(
            f"message {index}: unknown role {role!r} (expected one of: {', '.join(ROLES)})"
        )
    role = chat.ROLE_ALIASES[role]
    content = _text_content(raw["content"], role, index)
    for token in chat.FORBIDDEN_IN_CONTENT:
        allowed = role == "model" and token in (chat.CHANNEL_OPEN, chat.CHANNEL_CLOSE)
        if token in content and not allowed:
            raise ValueError(
                f"message {index} ({role}): content contains the control token {token!r}"
            )
    message: Message = {"role": role, "content": content.strip()}
    if role == "model":
        embedded, message["content"] = chat.extract_thinking(content)
        thinking = (
            raw.get("thinking") or raw.get("reasoning_content") or raw.get("reasoning")
        )
        thinking = "\n".join(t for t in (str(thinking or "").strip(), embedded) if t)
        if thinking:
            message["thinking"] = thinking
    if not message["content"]:
        raise ValueError(f"message {index} ({role}): empty content")
    return message


def validate_messages(raw_messages: Any) -> list[Message]:
    """Normalises and checks one conversation; raises ValueError with the reason.

    Rules: a non-empty list; known roles; non-empty content; an optional
    system message first; then user and model alternating, starting with
    user and ending with model.

    Example:
        >>> validate_messages([{"role": "developer", "content": " Be brief "},
        ...                    {"role": "user", "content": "Hi"},
        ...                    {"role": "assistant", "content": "Hello"}])
        [{'role': 'system', 'content': 'Be brief'}, {'role': 'user', 'content': 'Hi'}, {'role': 'model', 'content': 'Hello'}]
    """
    if not isinstance(raw_messages, list) or not raw_messages:
        raise ValueError("'messages' must be a non-empty list")
    messages = [_normalise_message(m, i) for i, m in enumerate(raw_messages)]
    start = 1 if messages[0]["role"] == "system" else 0
    for i, message in enumerate(messages[start:], start):
        expected = "user" if (i - start) % 2 == 0 else "model"
        if message["role"] == "system":
            raise ValueError(f"message {i}: a system message is only allowed first")
        if message["role"] != expected:
            raise ValueError(
                f"message {i}: turns must alternate user/model; expected {expected}, got {message['role']}"
            )
    if messages[-1]["role"] != "model":
        raise ValueError(
            "conversation does not end with a model turn (nothing to train on)"
        )
    return messages


# --------------------------------------------------------------------------
# Record formats -> raw messages
# --------------------------------------------------------------------------


def _field(record: Mapping, fields: Mapping, key: str, *, required: bool = True) -> Any:
    name = fields.get(key) or key  # "" or absent: the field's own name
    if name not in record:
        if required:
            renamed = f" (data.fields maps {key!r} to {name!r})" if name != key else ""
            raise ValueError(f"missing field {name!r}{renamed}")
        return None
    return record[name]


def _as_text(value: Any, name: str) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def _prompt_completion(record: Mapping, fields: Mapping) -> list[dict]:
    prompt = _as_text(_field(record, fields, "prompt"), "prompt")
    completion = _as_text(_field(record, fields, "completion"), "completion")
    system = _field(record, fields, "system", required=False)
    messages = (
        [{"role": "system", "content": _as_text(system, "system")}] if system else []
    )
    return messages + [
        {"role": "user", "content": prompt},
        {"role": "model", "content": completion},
    ]


def _alpaca(record: Mapping, fields: Mapping) -> list[dict]:
    instruction = _as_text(_field(record, fields, "instruction"), "instruction").strip()
    extra = _field(record, fields, "input", required=False)
    extra = _as_text(extra, "input").strip() if extra else ""
    output = _as_text(_field(record, fields, "output"), "output")
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    system = _field(record, fields, "system", required=False)
    messages = (
        [{"role": "system", "content": _as_text(system, "system")}] if system else []
    )
    return messages + [
        {"role": "user", "content": prompt},
        {"role": "model", "content": output},
    ]


def _messages(record: Mapping, fields: Mapping) -> list[dict]:
    return _field(record, fields, "messages")


RECORD_PARSERS = {
    "messages": _messages,
    "prompt_completion": _prompt_completion,
    "alpaca": _alpaca,
}


def detect_format(record: Mapping, fields: Mapping) -> str:
    """Guesses the record format from its keys (after `fields` renaming)."""
    keys = set(record)
    candidates = (
        ("messages", ("messages",)),
        ("prompt_completion", ("prompt", "completion")),
        ("alpaca", ("instruction", "output")),
    )
    for fmt, required in candidates:  # data.fields names the format's keys
        if any(fields.get(k) for k in required):
            return fmt
    for fmt, required in candidates:
        if all(k in keys for k in required):
            return fmt
    raise ValueError(
        f"cannot tell the format from the fields {sorted(keys)}; expected 'messages', "
        "'prompt'+'completion' or 'instruction'+'output' (or set data.format / data.fields)"
    )


# --------------------------------------------------------------------------
# Sources -> (location, record or Problem)
# --------------------------------------------------------------------------


def _unicode_problem(text: str, columns: bool = True) -> str | None:
    """Why `text` is not valid Unicode, or None.

    Files are read with errors="surrogateescape", so an invalid UTF-8 byte
    0xNN shows up as the lone surrogate U+DCNN; JSON can also spell a lone
    surrogate as an escape (\\ud800). Neither can be tokenized.
    """
    for column, ch in enumerate(text, 1):
        code = ord(ch)
        where = f" at column {column}" if columns else ""
        if 0xDC80 <= code <= 0xDCFF:
            return (
                f"invalid UTF-8 (byte 0x{code - 0xDC00:02x}{where}); "
                "save the file as UTF-8"
            )
        if 0xD800 <= code <= 0xDFFF:
            return (
                f"a lone surrogate \\u{code:04x}{where} is not valid Unicode; "
                "remove it or write the character as a surrogate pair"
            )
    return None


def _open_text(path: str, newline: str | None = None):
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline=newline)


def _iter_jsonl(path: str) -> Iterator[tuple[str, Any]]:
    with _open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            source = f"{path}:{line_no}"
            bad = _unicode_problem(line)
            if bad:
                yield source, Problem(source, bad)
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                yield (
                    source,
                    Problem(source, f"malformed JSON ({e.msg} at column {e.colno})"),
                )
                continue
            if not isinstance(record, dict):
                yield source, Problem(source, "a JSONL line must be a JSON object")
                continue
            bad = _unicode_problem(json.dumps(record, ensure_ascii=False), False)
            if bad:
                yield source, Problem(source, bad)
                continue
            yield source, record


def _iter_json(path: str) -> Iterator[tuple[str, Any]]:
    with _open_text(path) as f:
        text = f.read()
    for line_no, line in enumerate(text.splitlines(), 1):
        bad = _unicode_problem(line)
        if bad:  # the whole list is one record set: report the line, stop
            raise DataError(Problem(f"{path}:{line_no}", bad))
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        yield (
            f"{path}:{e.lineno}",
            Problem(f"{path}:{e.lineno}", f"malformed JSON ({e.msg})"),
        )
        return
    if not isinstance(records, list):
        raise DataError(Problem(path, "a .json file must hold a list of records"))
    for index, record in enumerate(records):
        source = f"{path}[{index}]"
        if not isinstance(record, dict):
            yield source, Problem(source, "not a JSON object")
            continue
        bad = _unicode_problem(json.dumps(record, ensure_ascii=False), False)
        yield (source, Problem(source, bad) if bad else record)


def _iter_csv(path: str) -> Iterator[tuple[str, Any]]:
    with _open_text(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        start = reader.line_num + 1
        for row in reader:
            source, start = f"{path}:{start}", reader.line_num + 1
            if not row:
                continue
            bad = _unicode_problem("\x1f".join(row), False)
            if bad:
                yield source, Problem(source, bad)
                continue
            if len(row) != len(header):
                reason = f"row has {len(row)} columns, the header has {len(header)}"
                yield source, Problem(source, reason)
                continue
            yield source, dict(zip(header, row))


def iter_records(
    path: str, fmt: str, tfds_data_dir: str = ""
) -> Iterator[tuple[str, Any]]:
    """Yields (source, record dict or Problem) for a file or a TFDS split."""
    if path.startswith("tfds:") or fmt == "tfds":
        from gemma4_keras.data import (
            tfds_reader,  # cycle: tfds_reader raises this module's DataError
        )

        yield from tfds_reader.iter_tfds(path, data_dir=tfds_data_dir)
        return
    if not os.path.exists(path):
        raise DataError(Problem(path, "no such file (check data.path)"))
    if os.path.isdir(path):
        raise DataError(
            Problem(path, "is a directory; set data.path to a .jsonl/.json/.csv file")
        )
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise DataError(Problem(path, f"cannot read it ({e.strerror})")) from e
    if path.endswith(".csv") or fmt == "csv":
        yield from _iter_csv(path)
    elif path.endswith(".json"):
        yield from _iter_json(path)
    else:
        yield from _iter_jsonl(path)


# --------------------------------------------------------------------------
# load_conversations
# --------------------------------------------------------------------------


def record_to_conversation(
    record: Mapping, source: str, fmt: str, fields: Mapping, system_prompt: str = ""
) -> Conversation:
    """Converts one raw record; raises ValueError with the reason."""
    if fmt in ("auto", "csv", "tfds"):
        fmt = detect_format(record, fields)
    raw = RECORD_PARSERS[fmt](record, fields)
    messages = validate_messages(raw)
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt.strip()})
    return Conversation(messages=messages, source=source)


def load_conversations(data_cfg: Any) -> tuple[list[Conversation], dict]:
    """Reads, converts and validates every record named by the config.

    Args:
        data_cfg: a `DataSettings`, or what `DataSettings.of` takes (a
            mapping or ConfigDict); reads `path`, `format`, `fields`,
            `on_error`, `system_prompt` and `tfds_data_dir`.

    Returns:
        (conversations, read_stats); read_stats = {"path", "format",
        "records", "valid", "skipped", "skipped_records": [{"source",
        "reason"}, ...]}.

    Raises:
        DataError: with on_error="raise", listing every bad record.
    """
    settings = DataSettings.of(data_cfg)
    path, fmt, on_error = str(settings.path), settings.format, settings.on_error
    fields = dict(settings.fields or {})
    if not path:
        raise DataError(
            "data.path is empty; set it to a .jsonl/.json/.csv file or tfds:name:split"
        )
    if fmt not in FORMATS:
        raise DataError(f"data.format={fmt!r}: expected one of {', '.join(FORMATS)}")
    if on_error not in ("raise", "skip"):
        raise DataError(f"data.on_error={on_error!r}: expected 'raise' or 'skip'")
    system_prompt = str(settings.system_prompt)
    conversations, problems, records = [], [], 0
    for source, record in iter_records(path, fmt, str(settings.tfds_data_dir)):
        records += 1
        if isinstance(record, Problem):
            problems.append(record)
            continue
        try:
            conversations.append(
                record_to_conversation(record, source, fmt, fields, system_prompt)
            )
        except ValueError as e:
            problems.append(Problem(source, str(e)))
    if problems and on_error == "raise":
        raise DataError(problems)
    stats = {
        "path": path,
        "format": fmt,
        "records": records,
        "valid": len(conversations),
        "skipped": len(problems),
        "skipped_records": [dataclasses.asdict(p) for p in problems],
    }
    return conversations, stats
