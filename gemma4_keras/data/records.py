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

import jsonschema
import numpy as np

from gemma4_keras.data import chat, media, tool_format
from gemma4_keras.settings import DataSettings

ROLES = ("user", "model", "assistant", "system", "developer", "tool")
FORMATS = ("auto", "messages", "prompt_completion", "alpaca", "csv", "tfds")
MAX_LISTED_PROBLEMS = 20

# {"role": "system"|"user"|"model", "content": str, "thinking"?: str,
#  "tool_calls"?: [{"name", "arguments", "id"?}], "tool_responses"?: [{"name", "response"}]}
Message = dict


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
        tools: the record's tool declarations (`normalise_tools`), written
            into the system turn.
    """

    messages: list[Message]
    source: str = ""
    meta: dict = dataclasses.field(default_factory=dict)
    tools: list[dict] = dataclasses.field(default_factory=list)


# --------------------------------------------------------------------------
# Validation: raw record -> messages
# --------------------------------------------------------------------------


def _text_content(content: Any, role: str, index: int) -> str:
    """Returns message text; a list of {"type": "text"} parts is joined."""
    return _content(content, role, index, None, media_allowed=False, check=False)[0]


def _content(
    content: Any,
    role: str,
    index: int,
    base_dir: str | None,
    *,
    media_allowed: bool,
    check: bool = True,
    processor: media.ProcessorSettings = media.PROCESSOR,
) -> tuple[str, list[dict]]:
    """(text, media records) of message content: a string or a list of parts.

    Text parts are joined; each image/audio part becomes its placeholder
    (`<|image|>`, `<|audio|>`) in the text and a record (`media.describe_part`,
    which reads and checks the file; paths resolve against `base_dir`).
    With `check`, text parts are checked for control tokens (thoughts are
    allowed in model text).
    """
    if isinstance(content, str):
        return content, []
    if not (isinstance(content, list) and all(isinstance(c, Mapping) for c in content)):
        raise ValueError(
            f"message {index} ({role}): content must be a string, got "
            f"{type(content).__name__} (or a list of text, image and audio parts)"
        )
    texts, plain, found = [], [], []
    for k, part in enumerate(content):
        ptype = part.get("type")
        where = f"message {index} ({role}) part {k}"
        if ptype == "text":
            texts.append(str(part.get("text", "")))
            plain.append(texts[-1])
            continue
        if ptype not in media.PART_TYPES:
            raise ValueError(
                f"{where}: unknown part type {ptype!r} (expected one of "
                f"{', '.join(media.PART_TYPES)})"
            )
        if not media_allowed:
            raise ValueError(
                f"{where}: a {ptype} part in a {role} message; images and audio go "
                "in user or system messages"
            )
        try:
            record = media.describe_part(part, base_dir, processor)
        except media.MediaError as e:
            raise ValueError(f"{where}: {e}") from e
        found.append(record)
        texts.append(media.PLACEHOLDER[record["type"]])
    if check:
        _check_text(
            "".join(plain),
            f"message {index} ({role}): content",
            thoughts_allowed=role == "model",
        )
    return "".join(texts), found


def _check_text(text: str, where: str, *, thoughts_allowed: bool = False) -> None:
    for token in chat.FORBIDDEN_IN_CONTENT:
        allowed = thoughts_allowed and token in (chat.CHANNEL_OPEN, chat.CHANNEL_CLOSE)
        if token in text and not allowed:
            raise ValueError(f"{where} contains the control token {token!r}")


def _check_json_value(value: Any, where: str) -> None:
    tool_format.check_value(value, where)  # its ToolFormatError is a ValueError
    text = json.dumps(value, ensure_ascii=False)
    for token in chat.FORBIDDEN_IN_CONTENT:
        if token in text:
            raise ValueError(f"{where}: contains the control token {token!r}")


def _arguments(raw: Any, where: str) -> dict:
    if raw is None:
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{where}: arguments are not valid JSON ({e.msg} at column {e.colno})"
            ) from e
    if not isinstance(raw, Mapping):
        raise ValueError(
            f"{where}: arguments must be a JSON object, got {type(raw).__name__}"
        )
    _check_json_value(dict(raw), f"{where}.arguments")
    return dict(raw)


def _tool_calls(raw: Any, index: int) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"message {index}: tool_calls must be a non-empty list")
    calls = []
    for j, item in enumerate(raw):
        where = f"message {index}: tool_calls[{j}]"
        if not isinstance(item, Mapping):
            raise ValueError(f"{where} is not an object")
        function = item.get("function", item)  # OpenAI nests it; also accept flat
        if not isinstance(function, Mapping) or "name" not in function:
            raise ValueError(f"{where}: missing function.name")
        name = tool_format.check_name(function["name"], where)
        call = {"name": name, "arguments": _arguments(function.get("arguments"), where)}
        if item.get("id") is not None:
            call["id"] = str(item["id"])
        calls.append(call)
    return calls


def _native_responses(raw: Any, index: int) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"message {index}: tool_responses must be a non-empty list")
    out = []
    for j, item in enumerate(raw):
        where = f"message {index}: tool_responses[{j}]"
        if not isinstance(item, Mapping) or "response" not in item:
            raise ValueError(f"{where}: expected {{'name': ..., 'response': ...}}")
        response = item["response"]
        _check_json_value(response, f"{where}.response")
        out.append({"name": str(item.get("name") or "unknown"), "response": response})
    return out


def _tool_result(raw: Mapping, index: int) -> Any:
    """The result a `tool` message carries: text, text parts, or a JSON value."""
    if "content" not in raw:
        raise ValueError(f"message {index} (tool): missing field 'content'")
    content = raw["content"]
    if isinstance(content, list) and all(isinstance(c, Mapping) for c in content):
        content = _text_content(content, "tool", index)
    _check_json_value(content, f"message {index} (tool)")
    return content


def _normalise_message(
    raw: Any,
    index: int,
    base_dir: str | None = None,
    processor: media.ProcessorSettings = media.PROCESSOR,
) -> Message:
    if not isinstance(raw, Mapping):
        raise ValueError(f"message {index} is not an object with role and content")
    if "role" not in raw:
        raise ValueError(f"message {index}: missing field 'role'")
    role = raw["role"]
    if not isinstance(role, str) or role not in chat.ROLE_ALIASES:
        raise ValueError(
            f"message {index}: unknown role {role!r} (expected one of: {', '.join(ROLES)})"
        )
    role = chat.ROLE_ALIASES[role]
    acts = role == "model" and (raw.get("tool_calls") or raw.get("tool_responses"))
    if "content" not in raw and not acts:
        raise ValueError(f"message {index}: missing field 'content'")
    content = raw.get("content")
    found: list[dict] = []
    if content is None and acts:
        content = ""
    elif isinstance(content, str):
        _check_text(
            content,
            f"message {index} ({role}): content",
            thoughts_allowed=role == "model",
        )
    else:
        media_allowed = role in ("user", "system")
        content, found = _content(
            content,
            role,
            index,
            base_dir,
            media_allowed=media_allowed,
            processor=processor,
        )
    message: Message = {"role": role, "content": content.strip()}
    if found:
        message["media"] = found
    if role == "model":
        embedded, message["content"] = chat.extract_thinking(content)
        thinking = (
            raw.get("thinking") or raw.get("reasoning_content") or raw.get("reasoning")
        )
        thinking = "\n".join(t for t in (str(thinking or "").strip(), embedded) if t)
        _check_text(thinking, f"message {index} ({role}): reasoning")
        if thinking:
            message["thinking"] = thinking
        if raw.get("tool_calls"):
            message["tool_calls"] = _tool_calls(raw["tool_calls"], index)
        if raw.get("tool_responses"):
            message["tool_responses"] = _native_responses(raw["tool_responses"], index)
    if not message["content"] and not acts:
        raise ValueError(f"message {index} ({role}): empty content")
    return message


def _fold_tool_message(raw: Mapping, index: int, target: Message | None) -> None:
    """Adds a `tool` message's result to the model message whose calls it answers."""
    if target is None or not target.get("tool_calls") or target.get("_native"):
        raise ValueError(
            f"message {index} (tool): follows no assistant message with tool_calls "
            "(a tool result answers the calls of the assistant message just before it)"
        )
    result = _tool_result(raw, index)
    names = {c.get("id"): c["name"] for c in target["tool_calls"] if c.get("id")}
    call_id = raw.get("tool_call_id")
    name = names.get(str(call_id)) if call_id is not None else None
    name = name or raw.get("name") or "unknown"
    target.setdefault("tool_responses", []).append(
        {"name": str(name), "response": result}
    )


def normalise_messages(
    raw_messages: Any,
    base_dir: str | None = None,
    processor: media.ProcessorSettings = media.PROCESSOR,
) -> list[Message]:
    """OpenAI- or Gemma-style messages in the package's form, shape checks only.

    Roles become system/user/model; text is trimmed and checked for control
    tokens; a thought (`reasoning_content`, `reasoning`, `thinking`, or a
    `<|channel>` block in the text) moves to `thinking`; `tool_calls` become
    `[{"name", "arguments", "id"?}]` (arguments given as a JSON string are
    parsed); each run of `tool` messages folds into the `tool_responses` of
    the model message whose calls it answers (named by `tool_call_id`, else
    by `name`), as the official template renders them. Text a model message
    writes after its tool results becomes a model message of its own (the
    template renders it after the results), joined to the next model
    message when that one only answers.

    Content may be a list of parts: text parts are joined, image and audio
    parts become placeholders and `media` records (`media.py`; their paths
    resolve against `base_dir`, default the working directory).

    Raises:
        ValueError: "message N: ..." for the first bad message.

    Example:
        >>> normalise_messages([
        ...     {"role": "user", "content": "Hi"},
        ...     {"role": "assistant", "tool_calls": [{"id": "1", "function": {
        ...         "name": "ping", "arguments": '{"host": "a"}'}}]},
        ...     {"role": "tool", "tool_call_id": "1", "content": "up"}])[1]
        {'role': 'model', 'content': '', 'tool_calls': [{'name': 'ping', 'arguments': {'host': 'a'}, 'id': '1'}], 'tool_responses': [{'name': 'ping', 'response': 'up'}]}
    """
    if not isinstance(raw_messages, list) or not raw_messages:
        raise ValueError("'messages' must be a non-empty list")
    messages: list[Message] = []
    for i, raw in enumerate(raw_messages):
        if isinstance(raw, Mapping) and raw.get("role") == "tool":
            previous = messages[-1] if messages else None
            _fold_tool_message(
                raw, i, previous if previous and previous["role"] == "model" else None
            )
            continue
        message = _normalise_message(raw, i, base_dir, processor)
        if message.get("tool_responses"):
            message["_native"] = True
        message["_index"] = i
        messages.append(message)
    return _split_answers_after_results(messages)


def _split_answers_after_results(messages: list[Message]) -> list[Message]:
    out: list[Message] = []
    for k, message in enumerate(messages):
        message.pop("_native", None)
        index = message.pop("_index")
        if not (message.get("tool_responses") and message["content"]):
            out.append(message)
            continue
        answer = {"role": "model", "content": message["content"]}
        message["content"] = ""
        out.append(message)
        following = messages[k + 1] if k + 1 < len(messages) else None
        if following is not None and following["role"] == "model":
            if following.get("thinking") or following.get("tool_calls"):
                raise ValueError(
                    f"message {index}: text after its tool results, then a further "
                    "thought or tool call in the next assistant message: the "
                    "official template writes these out of order; move the text "
                    "into the next assistant message"
                )
            following["content"] = answer["content"] + following["content"]
            continue
        out.append(answer)
    return out


def validate_messages(
    raw_messages: Any,
    base_dir: str | None = None,
    processor: media.ProcessorSettings = media.PROCESSOR,
) -> list[Message]:
    """Normalises and checks one conversation; raises ValueError with the reason.

    Rules: a non-empty list; known roles; non-empty content (a model message
    may instead call tools); an optional system message first; then user
    and model turns alternating, starting with user and ending with model. A
    model turn is one model message, or several when each but the last
    called tools and got their results (`tool` messages); calls without
    results only end a conversation.

    Example:
        >>> validate_messages([{"role": "developer", "content": " Be brief "},
        ...                    {"role": "user", "content": "Hi"},
        ...                    {"role": "assistant", "content": "Hello"}])
        [{'role': 'system', 'content': 'Be brief'}, {'role': 'user', 'content': 'Hi'}, {'role': 'model', 'content': 'Hello'}]
    """
    messages = normalise_messages(raw_messages, base_dir, processor)
    start = 1 if messages[0]["role"] == "system" else 0
    expected = "user"
    for i, message in enumerate(messages[start:], start):
        role = message["role"]
        if role == "system":
            raise ValueError(f"message {i}: a system message is only allowed first")
        previous = messages[i - 1] if i > start else None
        continuing = (
            role == "model"
            and previous is not None
            and previous["role"] == "model"
            and previous.get("tool_responses")
        )
        if role != expected and not continuing:
            raise ValueError(
                f"message {i}: turns must alternate user/model; expected {expected}, got {role}"
            )
        if message.get("tool_calls") and not message.get("tool_responses"):
            if i != len(messages) - 1:
                raise ValueError(
                    f"message {i}: its tool calls get no results (no `tool` message "
                    "follows it); add them, or end the conversation there"
                )
        expected = "model" if role == "user" else "user"
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


def _user_content(prompt: str, record: Mapping, fields: Mapping) -> str | list[dict]:
    """The user turn: `prompt`, after the record's image (the `image` field:
    a path, data URI or, from TFDS, an encoded array) when it has one."""
    image = _field(record, fields, "image", required=False)
    if image is None:
        return prompt
    parts = [{"type": "image", "image": image}]
    return parts + ([{"type": "text", "text": prompt}] if prompt.strip() else [])


def _prompt_completion(record: Mapping, fields: Mapping) -> list[dict]:
    # With an image the prompt may be absent (an image classification set).
    with_image = _field(record, fields, "image", required=False) is not None
    prompt = _field(record, fields, "prompt", required=not with_image)
    prompt = "" if prompt is None else _as_text(prompt, "prompt")
    completion = _as_text(_field(record, fields, "completion"), "completion")
    system = _field(record, fields, "system", required=False)
    messages = (
        [{"role": "system", "content": _as_text(system, "system")}] if system else []
    )
    return messages + [
        {"role": "user", "content": _user_content(prompt, record, fields)},
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
        {"role": "user", "content": _user_content(prompt, record, fields)},
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
        yield from iter_tfds(path, data_dir=tfds_data_dir)
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


def normalise_tools(raw: Any) -> list[dict]:
    """OpenAI-style tool declarations, checked; raises ValueError naming the tool.

    Each is `{"type": "function", "function": {"name", "description"?,
    "parameters"?}}` (a bare `{"name", ...}` is wrapped); `parameters` must
    be a JSON schema (checked with jsonschema), names unique.

    Example:
        >>> normalise_tools([{"name": "ping", "parameters": {"type": "object"}}])
        [{'type': 'function', 'function': {'name': 'ping', 'parameters': {'type': 'object'}}}]
    """
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ValueError("'tools' must be a list of function declarations")
    tools, seen = [], set()
    for j, item in enumerate(raw):
        where = f"tools[{j}]"
        if not isinstance(item, Mapping):
            raise ValueError(f"{where} is not an object")
        function = item.get("function", item)
        if not isinstance(function, Mapping):
            raise ValueError(f"{where}: 'function' must be an object")
        name = tool_format.check_name(function.get("name"), where)
        if name in seen:
            raise ValueError(f"{where}: function {name!r} is declared twice")
        seen.add(name)
        params = function.get("parameters")
        if params is not None:
            if not isinstance(params, Mapping):
                raise ValueError(
                    f"{where} ({name}): parameters must be a JSON schema object"
                )
            try:
                jsonschema.validators.validator_for(params).check_schema(params)
            except jsonschema.SchemaError as e:
                raise ValueError(
                    f"{where} ({name}): parameters are not a valid JSON schema ({e.message})"
                ) from e
        _check_text(json.dumps(function, ensure_ascii=False), f"{where} ({name})")
        tools.append({"type": "function", "function": dict(function)})
    return tools


def record_to_conversation(
    record: Mapping,
    source: str,
    fmt: str,
    fields: Mapping,
    system_prompt: str = "",
    base_dir: str | None = None,
    processor: media.ProcessorSettings = media.PROCESSOR,
) -> Conversation:
    """Converts one raw record; raises ValueError with the reason.

    Media paths resolve against `base_dir` (the data file's directory);
    images and audio are sized as `processor` says (`media.processor_settings`).
    """
    if fmt in ("auto", "csv", "tfds"):
        fmt = detect_format(record, fields)
    raw = RECORD_PARSERS[fmt](record, fields)
    messages = validate_messages(raw, base_dir, processor)
    tools = normalise_tools(record.get("tools")) if fmt == "messages" else []
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt.strip()})
    return Conversation(messages=messages, source=source, tools=tools)


def load_conversations(
    data_cfg: Any, processor: media.ProcessorSettings = media.PROCESSOR
) -> tuple[list[Conversation], dict]:
    """Reads, converts and validates every record named by the config.

    Args:
        data_cfg: a `DataSettings`, or what `DataSettings.of` takes (a
            mapping or ConfigDict); reads `path`, `format`, `fields`,
            `on_error`, `system_prompt` and `tfds_data_dir`.
        processor: the checkpoint's image / audio processor settings
            (`media.processor_settings(checkpoint)`: its processor_config.json).

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
    base_dir = (
        None if path.startswith("tfds:") else os.path.dirname(os.path.abspath(path))
    )
    conversations, problems, records = [], [], 0
    for source, record in iter_records(path, fmt, str(settings.tfds_data_dir)):
        records += 1
        if isinstance(record, Problem):
            problems.append(record)
            continue
        try:
            conversations.append(
                record_to_conversation(
                    record, source, fmt, fields, system_prompt, base_dir, processor
                )
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


# ----------------------------------------------------------------------------
# TFDS splits as plain records: `data.path = "tfds:name[/config]:split"`.
#
# Each example becomes a flat dict: text is decoded, a `ClassLabel` becomes its
# name, an `Image` a PNG `data:` URI (`data.fields.image` names it; records
# keep it inline, no file is written), nested features get dotted keys ("answers.text"), and a sequence of
# {"role", "content"} dicts becomes a list of messages. `data.fields` then maps
# the canonical keys onto these names, e.g. `{"prompt": "text", "completion":
# "label"}`. TensorFlow Datasets is imported only when a TFDS path is used.


def parse_tfds_path(path: str) -> tuple[str, str]:
    """Splits "tfds:name[/config]:split" into (name, split).

    Example:
        >>> parse_tfds_path("tfds:glue/sst2:train[:10%]")
        ('glue/sst2', 'train[:10%]')
    """
    body = path.removeprefix("tfds:")
    name, sep, split = body.partition(":")
    if not sep or not name or not split:
        raise DataError(
            f"data.path={path!r}: expected 'tfds:name[/config]:split', e.g. 'tfds:imdb_reviews:train'"
        )
    return name, split


def _plain(value: Any, feature: Any) -> Any:
    import tensorflow_datasets as tfds  # heavy (TensorFlow); only TFDS sources need it

    if isinstance(feature, tfds.features.ClassLabel):
        return feature.int2str(int(value))
    if isinstance(feature, tfds.features.Image):  # in memory: no file written
        return media.image_data_uri(value)
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_plain(v, None) for v in value.tolist()] if value.ndim else value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def flatten_example(example: dict, features: Any, prefix: str = "") -> dict:
    """Flattens one `tfds.as_numpy` example to {dotted name: python value}."""
    flat = {}
    for key, value in example.items():
        feature = features[key] if features is not None and key in features else None
        name = prefix + key
        if isinstance(value, dict):
            sub_features = getattr(feature, "feature", feature)
            inner = flatten_example(value, sub_features, name + ".")
            flat.update(inner)
            columns = [inner[name + "." + k] for k in value]
            if columns and all(
                isinstance(c, list) and len(c) == len(columns[0]) for c in columns
            ):
                flat[name] = [dict(zip(value, row)) for row in zip(*columns)]
        else:
            flat[name] = _plain(value, feature)
    return flat


def iter_tfds(path: str, data_dir: str = "") -> Iterator[tuple[str, dict]]:
    """Yields (source, flat record) for every example of the split."""
    import tensorflow_datasets as tfds  # heavy (TensorFlow); only TFDS sources need it

    name, split = parse_tfds_path(path)
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
        builder.download_and_prepare()
        dataset = builder.as_dataset(split=split, shuffle_files=False)
    except Exception as e:  # TFDS raises many types; report them as data errors.
        # TFDS messages run to hundreds of lines (every known dataset name).
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise DataError(
            f"{path}: cannot load the TFDS split ({type(e).__name__}: {first}); "
            "check the name, split and data.tfds_data_dir"
        ) from e
    features = builder.info.features
    for index, example in enumerate(tfds.as_numpy(dataset)):
        yield f"tfds:{name}:{split}[{index}]", flatten_example(example, features)
