"""`data check` on tool data: calls validated against their declarations, tool stats.

Every call of a conversation with `tools` must name a declared function and
pass its `parameters` JSON schema (jsonschema); a bad call is a bad record
under `data.on_error` (raise: one DataError listing every problem in file
order, before anything is encoded; skip: left out, counted, listed). The
report counts tool use and flags results that answer no call and calls that
get no result. Dedupe compares calls, results and declarations.
"""

import doctest
import json

import pytest

from gemma4_keras import data
from gemma4_keras.data import (
    Conversation,
    DataError,
    commands,
    dedupe,
    format_report,
    quality,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "nullable": True},
            },
            "required": ["city"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {
                "values": {"type": "array", "items": {"type": "number"}},
                "options": {
                    "type": "object",
                    "properties": {"round": {"type": "boolean"}},
                    "additionalProperties": False,
                },
            },
            "required": ["values"],
        },
    },
}
PING = {"type": "function", "function": {"name": "ping"}}  # no parameters
TOOLS = [WEATHER, ADD, PING]


def _call(id_, name, arguments):
    return {
        "id": id_,
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def _record(calls, results, answer="Done.", tools=TOOLS):
    messages = [{"role": "user", "content": "Weather in Oslo, and 1 + 2?"}]
    messages += [{"role": "assistant", "tool_calls": calls}, *results]
    if answer:
        messages.append({"role": "assistant", "content": answer})
    return (
        {"messages": messages, "tools": list(tools)}
        if tools
        else {"messages": messages}
    )


def _result(id_, content):
    return {"role": "tool", "tool_call_id": id_, "content": content}


GOOD = _record(
    [
        _call("w1", "get_weather", {"city": "Oslo", "days": None}),
        _call("a1", "add", {"values": [1, 2]}),
    ],
    [_result("w1", "-2 C"), _result("a1", "3")],
)
LINES = [
    GOOD,  # 1
    _record(
        [_call("w1", "get_weather", {"unit": "kelvin"})], [_result("w1", "?")]
    ),  # 2
    "{not json",  # 3
    _record([_call("x1", "get_time", {})], [_result("x1", "noon")]),  # 4
    _record(
        [_call("a1", "add", {"values": [1, "two"], "options": {"round": 1, "x": 0}})],
        [_result("a1", "3")],
    ),  # 5
    _record(  # 6: a result naming no call ("unknown"), so a call without result
        [_call("w1", "get_weather", {"city": "Bergen"})],
        [{"role": "tool", "content": "rain"}],
    ),
    _record(  # 7: parallel calls, one result
        [
            _call("w1", "get_weather", {"city": "Oslo"}),
            _call("w2", "get_weather", {"city": "Rome"}),
        ],
        [_result("w1", "-2")],
    ),
    _record(
        [_call("p1", "ping", {"anything": [1, {"goes": True}]})], [], answer=None
    ),  # 8
    _record([_call("a1", "add", {"values": [5]})], [_result("a1", "5")], tools=()),  # 9
    {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
        ]
    },  # 10
]


def _write(tmp_path, lines=LINES, name="tools.jsonl") -> str:
    path = tmp_path / name
    path.write_text(
        "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    )
    return str(path)


def _cfg(path, **kwargs):
    fields = dict(path=path, holdout_fraction=0.0, max_length=512, template="small")
    return data.DataSettings(**{**fields, **kwargs})


def test_bad_calls_name_record_call_and_schema_reason(tmp_path):
    path = _write(tmp_path)
    with pytest.raises(DataError) as info:
        data.check(_cfg(path))
    lines = [str(p) for p in info.value.problems]
    assert lines == [
        f"{path}:2: message 1, tool_calls[0] (get_weather, id w1): 'city' is a required property",
        f"{path}:2: message 1, tool_calls[0] (get_weather, id w1): 'kelvin' is not one of "
        "['celsius', 'fahrenheit'] (at arguments.unit)",
        f"{path}:3: malformed JSON (Expecting property name enclosed in double quotes at column 2)",
        f"{path}:4: message 1, tool_calls[0] (get_time, id x1): calls an undeclared "
        "function (the record declares: add, get_weather, ping)",
        f"{path}:5: message 1, tool_calls[0] (add, id a1): Additional properties are not "
        "allowed ('x' was unexpected) (at arguments.options)",
        f"{path}:5: message 1, tool_calls[0] (add, id a1): 1 is not of type 'boolean' "
        "(at arguments.options.round)",
        f"{path}:5: message 1, tool_calls[0] (add, id a1): 'two' is not of type 'number' "
        "(at arguments.values[1])",
    ]
    assert "(7 problems in all; fix them or set data.on_error=skip)" in str(info.value)
    assert info.value.report["read"]["tool_call_errors"] == 3


def test_a_run_stops_on_bad_calls_before_encoding(tmp_path):
    class NoTokenizer:  # anything encoded would touch it
        def __getattr__(self, name):
            raise AssertionError(f"encoding started ({name})")

    with pytest.raises(DataError, match=r"tools.jsonl:2: message 1, tool_calls\[0\]"):
        data.prepare(_cfg(_write(tmp_path)), NoTokenizer())


def test_eval_path_calls_are_checked_too(tmp_path):
    train = _write(tmp_path, [GOOD])
    holdout = _write(tmp_path, [LINES[3]], "eval.jsonl")
    with pytest.raises(DataError, match=r"eval.jsonl:1: .*get_time.*undeclared"):
        commands.read_and_split(_cfg(train, eval_path=holdout))
    _, kept, read, _ = commands.read_and_split(
        _cfg(train, eval_path=holdout, on_error="skip")
    )
    assert not kept and read["eval"]["tool_call_errors"] == 1


def test_skip_mode_counts_bad_calls_and_reports_tool_use(tmp_path):
    path = _write(tmp_path)
    report = data.check(_cfg(path, on_error="skip"))
    json.dumps(report)  # JSON-serialisable
    read, tools = report["read"], report["tools"]
    assert (read["records"], read["valid"], read["skipped"]) == (10, 6, 4)
    assert read["tool_call_errors"] == 3 and len(read["skipped_records"]) == 7
    assert tools["with_tools"] == 4  # lines 1, 6, 7, 8
    assert (tools["calls"], tools["calls_mean"], tools["calls_max"]) == (7, 1.5, 2)
    assert tools["used"] == {"get_weather": 4, "add": 2, "ping": 1}
    assert tools["parallel_call_turns"] == 2 and tools["ending_with_calls"] == 1
    assert tools["undeclared"]["records"] == [
        {"source": f"{path}:9", "detail": "calls tools but declares none"}
    ]
    assert tools["stray_results"] == {
        "count": 1,
        "records": [
            {
                "source": f"{path}:6",
                "detail": "message 1: a result of 'unknown' answers no call "
                "(calls: get_weather)",
            }
        ],
    }
    missing = tools["calls_without_result"]
    assert missing["count"] == 2
    assert [r["source"] for r in missing["records"]] == [f"{path}:6", f"{path}:7"]
    table = format_report(report)
    for expected in (
        "  of them: bad tool calls    3",
        f"{path}:5: message 1, tool_calls[0] (add, id a1): 'two' is not of type 'number'",
        "  conversations with tools     4",
        "  calls per conversation       mean 1.5, max 2 (7 calls, 2 parallel-call "
        "turns, 1 ending in calls)",
        "  tools used (calls)           get_weather: 4, add: 2, ping: 1",
        f"    {path}:6: message 1: a result of 'unknown' answers no call",
        f"    {path}:7: message 1: 1 call(s) of 'get_weather' get no result",
        "WARNING: 1 conversation(s) call tools they do not declare (add `tools`)",
        "WARNING: 1 conversation(s) have a tool result that answers no call",
        "WARNING: 2 tool call(s) get no result in a turn with results",
    ):
        assert expected in table, expected


def test_call_checks_read_nullable_and_skip_conversations_without_tools():
    def conversation(arguments, tools):
        messages = [
            {"role": "user", "content": "Weather?"},
            {
                "role": "model",
                "content": "",
                "tool_calls": [{"name": "get_weather", "arguments": arguments}],
            },
        ]
        return Conversation(messages, "f.jsonl:1", tools=tools)

    assert not quality.call_problems(
        conversation({"city": "Oslo", "days": None}, TOOLS)
    )
    assert not quality.call_problems(conversation({"city": 3}, []))  # nothing declared
    (problem,) = quality.call_problems(
        conversation({"city": "Oslo", "days": 1.5}, TOOLS)
    )
    assert problem.reason.endswith(
        "1.5 is not of type 'integer', 'null' (at arguments.days)"
    )
    assert quality.tool_stats([conversation({}, [])])["undeclared"]["count"] == 1


def _pair(first: dict, second: dict) -> list[Conversation]:
    return [
        Conversation(
            data.validate_messages(r["messages"]),
            f"f:{i}",
            tools=data.normalise_tools(r.get("tools")),
        )
        for i, r in enumerate((first, second))
    ]


def test_dedupe_compares_calls_results_and_declarations():
    other_args = _record(
        [
            _call("w1", "get_weather", {"city": "Rome", "days": None}),
            _call("a1", "add", {"values": [1, 2]}),
        ],
        [_result("w1", "-2 C"), _result("a1", "3")],
    )
    other_result = json.loads(
        json.dumps(GOOD).replace('"content": "3"', '"content": "4"')
    )
    other_tools = {**GOOD, "tools": [WEATHER, ADD]}
    other_ids = json.loads(json.dumps(GOOD).replace('"w1"', '"call_9"'))
    for different in (other_args, other_result, other_tools):
        kept, stats = dedupe(_pair(GOOD, different))
        assert len(kept) == 2 and stats["removed"] == 0
    kept, stats = dedupe(_pair(GOOD, other_ids))  # call ids are only labels
    assert len(kept) == 1 and stats["exact"] == 1


def test_split_keys_of_conversations_without_tools_are_unchanged():
    """Reruns split plain data as before: its key is still the list of turns."""
    plain = _pair(LINES[9], LINES[9])[0]
    turns = [(m["role"], m["content"], m.get("thinking", "")) for m in plain.messages]
    assert quality._key(plain, False) == json.dumps(turns, ensure_ascii=False)


def test_split_files_keep_the_declarations(tmp_path):
    path = _write(tmp_path, [GOOD, LINES[6], LINES[7], LINES[9]])
    paths = data.split(_cfg(path, holdout_fraction=0.5), str(tmp_path / "out"))
    original = {c.source: c for c in data.load_conversations(_cfg(path))[0]}
    with_tools = 0
    for name in ("train", "holdout"):
        with open(paths[name]) as f:
            written = [json.loads(line)["source"] for line in f]
        read_back, _ = data.load_conversations(_cfg(paths[name]))
        for source, conversation in zip(written, read_back, strict=True):
            assert conversation.tools == original[source].tools
            assert conversation.messages == original[source].messages
            with_tools += bool(conversation.tools)
    assert with_tools == 3


def test_docstring_examples_run():
    failures, attempted = doctest.testmod(quality)
    assert attempted and not failures
