"""Gemma 4's tool syntax: declarations, calls, responses, and the call parser.

The official chat templates (2026-07-09) write tools in their own syntax, not
JSON (`shared/GEMMA4.md`, "Tool calls in the chat format"):

    declaration  <|tool>declaration:NAME{description:<|"|>...<|"|>,parameters:{...}}<tool|>
    call         <|tool_call>call:NAME{city:<|"|>Oslo<|"|>,days:3}<tool_call|>
    response     <|tool_response>response:NAME{temp:-2}<tool_response|>

Values: strings between `<|"|>` quotes, numbers and `true` / `false` / `null`
as written, lists `[a,b]`, mappings `{key:value}` with keys sorted without
regard to case (jinja's `dictsort`). Call and response keys are bare;
declarations quote the keys of `enum`-style values and upper-case the JSON
schema types. `format_*` write what the templates write, byte for byte (tests:
`shared/gemma4_chat_golden.json`); `parse_calls` reads calls back
(`parse_calls(format_call(c)) == [c]`, property-tested).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jsonschema
from referencing.exceptions import Unresolvable  # jsonschema's $ref resolver

QUOTE = '<|"|>'
TOOL_OPEN, TOOL_CLOSE = "<|tool>", "<tool|>"
CALL_OPEN, CALL_CLOSE = "<|tool_call>", "<tool_call|>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<|tool_response>", "<tool_response|>"
TOOL_TOKENS = (
    TOOL_OPEN,
    TOOL_CLOSE,
    CALL_OPEN,
    CALL_CLOSE,
    RESPONSE_OPEN,
    RESPONSE_CLOSE,
    QUOTE,
)
# What the templates treat as a plain property list rather than a schema.
_SCHEMA_KEYS = ("description", "type", "properties", "required", "nullable")


class ToolFormatError(ValueError):
    """A value the tool syntax cannot carry, or text that is not a call."""


def _sorted_items(mapping: Mapping) -> list[tuple[Any, Any]]:
    # jinja's dictsort: by key, case-insensitively, stable.
    return sorted(
        mapping.items(),
        key=lambda kv: kv[0].lower() if isinstance(kv[0], str) else kv[0],
    )


def _upper(value: Any) -> str:
    return "" if value is None else str(value).upper()


def format_value(value: Any, *, quote_keys: bool = True) -> str:
    """One argument value as the templates write it.

    Example:
        >>> format_value({"b": [1, 2.5], "a": None}, quote_keys=False)
        '{a:null,b:[1,2.5]}'
        >>> format_value("Oslo")
        '<|"|>Oslo<|"|>'
    """
    if value is None:
        return "null"
    if isinstance(value, str):
        return QUOTE + value + QUOTE
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        parts = []
        for key, item in _sorted_items(value):
            name = QUOTE + key + QUOTE if quote_keys else key
            parts.append(f"{name}:{format_value(item, quote_keys=quote_keys)}")
        return "{" + ",".join(parts) + "}"
    if isinstance(value, (list, tuple)):
        return (
            "[" + ",".join(format_value(v, quote_keys=quote_keys) for v in value) + "]"
        )
    return str(value)


def _comma(state: list) -> str:
    if state[0]:
        return ","
    state[0] = True
    return ""


def _required(items: Any) -> str:
    return "required:[" + ",".join(QUOTE + str(i) + QUOTE for i in items or ()) + "]"


def _format_items(items: Mapping) -> str:
    out, first = [], True
    for key, value in _sorted_items(items):
        if value is None:
            continue
        out.append("" if first else ",")
        first = False
        if key == "properties":
            inner = format_parameters(value) if isinstance(value, Mapping) else ""
            out.append("properties:{" + inner + "}")
        elif key == "required":
            out.append(_required(value))
        elif key == "type":
            kind = (
                _upper(value) if isinstance(value, str) else [_upper(v) for v in value]
            )
            out.append("type:" + format_value(kind))
        else:
            out.append(f"{key}:{format_value(value)}")
    return "".join(out)


def format_parameters(properties: Mapping, *, filter_keys: bool = False) -> str:
    """The `properties` of a declaration (JSON schema), as the templates write them.

    With `filter_keys` (an object schema without `properties`, read as the
    property list itself) the JSON-schema keywords are skipped.
    """
    props = []
    for key, value in _sorted_items(properties):
        if filter_keys and key in _SCHEMA_KEYS:
            continue
        out, state = [f"{key}:{{"], [False]
        value = value if isinstance(value, Mapping) else {}
        if value.get("description"):
            out.append(f"description:{QUOTE}{value['description']}{QUOTE}")
            state[0] = True
        kind = _upper(value.get("type"))
        if kind == "STRING" and value.get("enum"):
            out.append(_comma(state) + "enum:" + format_value(value["enum"]))
        elif kind == "ARRAY":
            items = value.get("items")
            if isinstance(items, Mapping) and items:
                out.append(_comma(state) + "items:{" + _format_items(items) + "}")
        if value.get("nullable"):
            out.append(_comma(state) + "nullable:true")
        if kind == "OBJECT":
            if isinstance(value.get("properties"), Mapping):
                inner = format_parameters(value["properties"])
            else:
                inner = format_parameters(value, filter_keys=True)
            out.append(_comma(state) + "properties:{" + inner + "}")
            if value.get("required"):
                out.append(_comma(state) + _required(value["required"]))
        out.append(_comma(state) + f"type:{QUOTE}{kind}{QUOTE}}}")
        props.append("".join(out))
    return ",".join(props)


def format_declaration(tool: Mapping) -> str:
    """`declaration:NAME{...}` of one OpenAI-style tool (without `<|tool>`).

    Example:
        >>> format_declaration({"type": "function", "function": {
        ...     "name": "ping", "description": "Ping a host.",
        ...     "parameters": {"type": "object", "properties": {
        ...         "host": {"type": "string"}}, "required": ["host"]}}})
        'declaration:ping{description:<|"|>Ping a host.<|"|>,parameters:{properties:{host:{type:<|"|>STRING<|"|>}},required:[<|"|>host<|"|>],type:<|"|>OBJECT<|"|>}}'
    """
    function = tool["function"]
    out = [f"declaration:{function['name']}{{description:{QUOTE}"]
    out.append(f"{function.get('description') or ''}{QUOTE}")
    params = function.get("parameters")
    if params:
        out.append(",parameters:{")
        if params.get("properties"):
            inner = format_parameters(params["properties"])
            out.append("properties:{" + inner + "},")
        if params.get("required"):
            out.append(_required(params["required"]) + ",")
        if params.get("type"):
            out.append(f"type:{QUOTE}{_upper(params['type'])}{QUOTE}}}")
    if "response" in function:
        response = function["response"] or {}
        out.append(",response:{")
        if response.get("description"):
            out.append(f"description:{QUOTE}{response['description']}{QUOTE},")
        if _upper(response.get("type")) == "OBJECT":
            out.append(f"type:{QUOTE}OBJECT{QUOTE}}}")
    out.append("}")
    return "".join(out).strip()


def format_call(call: Mapping) -> str:
    """`<|tool_call>call:NAME{...}<tool_call|>` of `{"name", "arguments"}`.

    Example:
        >>> format_call({"name": "add", "arguments": {"values": [1, 2], "round": False}})
        '<|tool_call>call:add{round:false,values:[1,2]}<tool_call|>'
    """
    arguments = call.get("arguments") or {}
    body = ",".join(
        f"{k}:{format_value(v, quote_keys=False)}" for k, v in _sorted_items(arguments)
    )
    return f"{CALL_OPEN}call:{call['name']}{{{body}}}{CALL_CLOSE}"


def format_response(response: Mapping) -> str:
    """One response block `<|tool_response>response:NAME{...}<tool_response|>`.

    A mapping result is written key by key, anything else as `{value:...}`.

    Example:
        >>> format_response({"name": "add", "response": "0.5"})
        '<|tool_response>response:add{value:<|"|>0.5<|"|>}<tool_response|>'
    """
    name, result = response["name"], response["response"]
    if isinstance(result, Mapping):
        body = ",".join(
            f"{k}:{format_value(v, quote_keys=False)}" for k, v in _sorted_items(result)
        )
    else:
        body = "value:" + format_value(result, quote_keys=False)
    return f"{RESPONSE_OPEN}response:{name}{{{body}}}{RESPONSE_CLOSE}"


# --------------------------------------------------------------------------
# Checks on what may be written
# --------------------------------------------------------------------------

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


def check_value(value: Any, where: str) -> None:
    """Raises ToolFormatError when `value` cannot be written and read back.

    Strings may not hold the quote token `<|"|>` (nor any other control
    token: the caller checks those); mapping keys must be names (the syntax
    writes them bare); numbers must be finite.
    """
    if value is None or isinstance(value, (bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ToolFormatError(f"{where}: {value} is not a finite number")
        return
    if isinstance(value, str):
        if QUOTE in value:
            raise ToolFormatError(f"{where}: a string holds the quote token {QUOTE!r}")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str) or not _NAME.match(key):
                raise ToolFormatError(
                    f"{where}: key {key!r} is not a name (letters, digits, _ . -), "
                    "which Gemma's call syntax writes unquoted"
                )
            check_value(item, f"{where}.{key}")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_value(item, f"{where}[{i}]")
        return
    raise ToolFormatError(f"{where}: a {type(value).__name__} is not a JSON value")


def check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ToolFormatError(
            f"{where}: function name {name!r} must be letters, digits, _ . - "
            "(starting with a letter or _)"
        )
    return name


# --------------------------------------------------------------------------
# Parsing calls back
# --------------------------------------------------------------------------

_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_BARE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


class _Reader:
    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def fail(self, what: str):
        snippet = self.text[self.pos : self.pos + 30]
        raise ToolFormatError(f"{what} at character {self.pos} ({snippet!r})")

    def expect(self, literal: str) -> None:
        if not self.text.startswith(literal, self.pos):
            self.fail(f"expected {literal!r}")
        self.pos += len(literal)

    def key(self) -> str:
        if self.text.startswith(QUOTE, self.pos):
            return self.string()
        match = _BARE_KEY.match(self.text, self.pos)
        if not match:
            self.fail("expected a key")
        self.pos = match.end()
        return match.group()

    def string(self) -> str:
        self.expect(QUOTE)
        end = self.text.find(QUOTE, self.pos)
        if end < 0:
            self.fail("unterminated string")
        value, self.pos = self.text[self.pos : end], end + len(QUOTE)
        return value

    def _items(self, opening: str, closing: str, read_item) -> None:
        """Reads `opening item,item,... closing`, calling `read_item` for each."""
        self.expect(opening)
        if self.text.startswith(closing, self.pos):
            self.pos += 1
            return
        while True:
            read_item()
            if not self.text.startswith(",", self.pos):
                self.expect(closing)
                return
            self.pos += 1

    def mapping(self) -> dict:
        out: dict = {}

        def entry() -> None:
            key = self.key()
            self.expect(":")
            out[key] = self.value()

        self._items("{", "}", entry)
        return out

    def sequence(self) -> list:
        out: list = []
        self._items("[", "]", lambda: out.append(self.value()))
        return out

    def value(self) -> Any:
        text, pos = self.text, self.pos
        if text.startswith(QUOTE, pos):
            return self.string()
        if text.startswith("{", pos):
            return self.mapping()
        if text.startswith("[", pos):
            return self.sequence()
        for literal, value in (("true", True), ("false", False), ("null", None)):
            if text.startswith(literal, pos):
                self.pos += len(literal)
                return value
        match = _NUMBER.match(text, pos)
        if not match:
            self.fail("expected a value")
        self.pos = match.end()
        number = match.group()
        return float(number) if any(c in number for c in ".eE") else int(number)


def parse_call(text: str) -> dict:
    """`call:NAME{...}` (between `<|tool_call>` and `<tool_call|>`) to a dict.

    Example:
        >>> parse_call('call:get_weather{city:<|"|>Oslo<|"|>,days:3}')
        {'name': 'get_weather', 'arguments': {'city': 'Oslo', 'days': 3}}
    """
    reader = _Reader(text.strip())
    reader.expect("call:")
    match = _BARE_KEY.match(reader.text, reader.pos)
    if not match:
        reader.fail("expected a function name")
    reader.pos = match.end()
    arguments = reader.mapping()
    if reader.pos != len(reader.text):
        reader.fail("unexpected text after the arguments")
    return {"name": match.group(), "arguments": arguments}


def parse_calls(text: str) -> list[dict]:
    """Every `<|tool_call>...<tool_call|>` in generated text, in order.

    Raises ToolFormatError when a call block is malformed or unterminated
    (generation cut mid-call); text outside the blocks is ignored.

    Example:
        >>> parse_calls('<|tool_call>call:ping{host:<|"|>a<|"|>}<tool_call|>')
        [{'name': 'ping', 'arguments': {'host': 'a'}}]
    """
    calls, pos = [], 0
    while True:
        start = text.find(CALL_OPEN, pos)
        if start < 0:
            return calls
        end = text.find(CALL_CLOSE, start)
        if end < 0:
            raise ToolFormatError(f"a call at character {start} is not closed")
        calls.append(parse_call(text[start + len(CALL_OPEN) : end]))
        pos = end + len(CALL_CLOSE)


def split_answer(text: str) -> tuple[list[dict], str]:
    """(calls, the text outside call blocks, stripped) of one generation."""
    calls = parse_calls(text)
    rest = re.sub(
        re.escape(CALL_OPEN) + ".*?" + re.escape(CALL_CLOSE), "", text, flags=re.S
    )
    return calls, rest.strip()


# --------------------------------------------------------------------------
# Calls against their declarations
# --------------------------------------------------------------------------


def _nullable(schema: Any) -> Any:
    """Reads Gemma's / OpenAPI's `nullable: true` as JSON schema's `null` type.

    The chat template writes `nullable` (`format_parameters`), so data
    written for it passes None there; jsonschema knows only type lists (and
    ignores the `nullable` keyword itself).

    Example:
        >>> _nullable({"type": "string", "nullable": True})
        {'type': ['string', 'null'], 'nullable': True}
    """
    if isinstance(schema, list):
        return [_nullable(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {k: _nullable(v) for k, v in schema.items()}
    if out.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if out.get("nullable") is True and isinstance(out.get("enum"), list):
        out["enum"] = out["enum"] + [None]
    return out


@functools.lru_cache(maxsize=256)
def _validator(parameters: str) -> Any:
    schema = _nullable(json.loads(parameters))
    return jsonschema.validators.validator_for(schema)(schema)


def declared_parameters(tools: Sequence[Mapping] | None) -> dict[str, Any]:
    """{function name: its `parameters` schema, or None when it declares none}."""
    out = {}
    for tool in tools or ():
        function = tool.get("function", tool)
        out[function["name"]] = function.get("parameters")
    return out


def call_errors(call: Mapping, declared: Mapping[str, Any]) -> list[str]:
    """Why `declared` (`declared_parameters`) refuses a call; [] when it accepts it.

    The call must name a declared function and its arguments validate
    against that function's `parameters` (jsonschema; `nullable: true`
    allows None); a function declaring no parameters takes any arguments.

    Example:
        >>> call_errors({"name": "ping", "arguments": {}},
        ...             {"ping": {"type": "object", "required": ["host"]}})
        ["'host' is a required property"]
    """
    if call["name"] not in declared:
        names = ", ".join(sorted(declared))
        return [f"calls an undeclared function (the record declares: {names})"]
    parameters = declared[call["name"]]
    if parameters is None:
        return []
    validator = _validator(json.dumps(parameters, sort_keys=True))
    try:
        errors = list(validator.iter_errors(call["arguments"]))
    except Unresolvable as e:  # a `$ref` to nowhere (remote ones are not fetched)
        return [f"its declared parameters cannot be resolved ({e})"]
    errors.sort(key=lambda e: e.json_path)
    return [
        e.message + ("" if e.json_path == "$" else f" (at arguments{e.json_path[1:]})")
        for e in errors
    ]
