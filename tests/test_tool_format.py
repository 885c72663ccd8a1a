"""Gemma 4's tool syntax: writing calls and reading them back.

Oracle for the writer: the 14 tool renderings of the official templates in
`tests/data/gemma4_chat_golden.json` (checked in tests/test_data_chat.py); here
the parser is checked as its inverse on random calls (hypothesis): nested
arguments, lists, booleans, numbers, None, quotes, unicode, parallel calls and
several rounds, rendered through the whole chat template.
"""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tool_strategies import NAMES, VALUES

from gemma4_keras.data import chat, records, tool_format

CALLS = st.builds(
    lambda name, args: {"name": name, "arguments": args},
    NAMES,
    st.dictionaries(NAMES, VALUES, max_size=4),
)


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@settings(max_examples=300, deadline=None)
@given(CALLS)
def test_parse_inverts_format(call):
    assert _same(tool_format.parse_calls(tool_format.format_call(call)), [call])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(CALLS, min_size=1, max_size=3), min_size=1, max_size=3),
    st.sampled_from(chat.TEMPLATES),
)
def test_calls_survive_the_whole_template(rounds, template):
    """Several rounds of parallel calls in one model turn, rendered, parsed back."""
    messages = [{"role": "user", "content": "go"}]
    for calls in rounds:
        raw_calls = [
            {
                "id": f"c{i}",
                "function": {
                    "name": c["name"],
                    "arguments": json.dumps(c["arguments"]),
                },
            }
            for i, c in enumerate(calls)
        ]
        messages.append({"role": "assistant", "tool_calls": raw_calls})
        messages += [
            {"role": "tool", "tool_call_id": f"c{i}", "content": "ok"}
            for i in range(len(calls))
        ]
    messages.append({"role": "assistant", "content": "done"})
    text = chat.render_conversation(
        records.validate_messages(messages), template=template
    )
    assert _same(tool_format.parse_calls(text), [c for calls in rounds for c in calls])


def test_numbers_keep_their_kind():
    call = {"name": "f", "arguments": {"i": 2, "x": 2.0, "e": 1e20, "n": -3}}
    text = tool_format.format_call(call)
    assert text == "<|tool_call>call:f{e:1e+20,i:2,n:-3,x:2.0}<tool_call|>"
    parsed = tool_format.parse_calls(text)[0]["arguments"]
    assert parsed == call["arguments"]
    assert type(parsed["i"]) is int and type(parsed["x"]) is float


def test_keys_sort_like_jinja_dictsort():
    text = tool_format.format_value({"b": 1, "A": 2, "a": 3, "C": 4}, quote_keys=False)
    assert text == "{A:2,a:3,b:1,C:4}"


@pytest.mark.parametrize(
    "text, message",
    [
        ("<|tool_call>call:f{a:1", "not closed"),
        ("<|tool_call>call:f{a:}<tool_call|>", "expected a value"),
        ('<|tool_call>call:f{a:<|"|>x}<tool_call|>', "unterminated string"),
        ("<|tool_call>f{a:1}<tool_call|>", "expected 'call:'"),
        ("<|tool_call>call:f{a:1} extra<tool_call|>", "unexpected text"),
    ],
)
def test_malformed_calls_are_errors(text, message):
    with pytest.raises(tool_format.ToolFormatError, match=message):
        tool_format.parse_calls(text)


def test_text_outside_calls_is_kept_apart():
    calls, rest = tool_format.split_answer(
        'Let me see. <|tool_call>call:ping{host:<|"|>a<|"|>}<tool_call|>'
    )
    assert (
        calls == [{"name": "ping", "arguments": {"host": "a"}}]
        and rest == "Let me see."
    )


@pytest.mark.parametrize(
    "value, message",
    [
        ({"a b": 1}, "is not a name"),
        ({"x": 'say <|"|>'}, "quote token"),
        ({"x": float("nan")}, "not a finite number"),
    ],
)
def test_values_the_syntax_cannot_carry_are_refused(value, message):
    with pytest.raises(tool_format.ToolFormatError, match=message):
        tool_format.check_value(value, "arguments")
