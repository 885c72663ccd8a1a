"""OpenAI-style tool records: accepted shapes and the errors bad ones get."""

import json

import pytest

from gemma4_keras.data import DataError, chat, load_conversations, records

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_order",
            "description": "Find an order.",
            "parameters": {
                "type": "object",
                "properties": {"order_id": {"type": "string"}},
                "required": ["order_id"],
            },
        },
    }
]


def _call(arguments, name="lookup_order", id_="c1"):
    return {
        "id": id_,
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def _record(*messages, tools=TOOLS):
    return {"tools": tools, "messages": list(messages)}


def _write(tmp_path, *recs):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


USER = {"role": "user", "content": "Where is A1?"}
ANSWER = {"role": "assistant", "content": "Shipped."}


def test_openai_record_becomes_one_model_turn(tmp_path):
    path = _write(
        tmp_path,
        _record(
            USER,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [_call('{"order_id": "A1"}')],
            },
            {
                "role": "tool",
                "tool_call_id": "c1",
                "content": [{"type": "text", "text": "shipped"}],
            },
            ANSWER,
        ),
    )
    (conversation,), _ = load_conversations({"path": path})
    assert conversation.tools[0]["function"]["name"] == "lookup_order"
    assert conversation.messages[1:] == [
        {
            "role": "model",
            "content": "",
            "tool_calls": [
                {"name": "lookup_order", "arguments": {"order_id": "A1"}, "id": "c1"}
            ],
            "tool_responses": [{"name": "lookup_order", "response": "shipped"}],
        },
        {"role": "model", "content": "Shipped."},
    ]


def test_tool_result_object_renders_key_by_key_like_native_responses():
    messages = records.validate_messages(
        [
            USER,
            {"role": "assistant", "tool_calls": [_call({"order_id": "A1"})]},
            {
                "role": "tool",
                "name": "lookup_order",
                "content": {"status": "shipped", "eta": 2},
            },
            ANSWER,
        ]
    )
    text = chat.render_conversation(messages, template="small")
    assert (
        'response:lookup_order{eta:2,status:<|"|>shipped<|"|>}<tool_response|>Shipped.'
        in text
    )


def test_reasoning_becomes_the_thought():
    (message,) = records.validate_messages(
        [
            USER,
            {
                "role": "assistant",
                "reasoning": "Look it up.",
                "tool_calls": [_call({})],
            },
        ]
    )[1:]
    assert message["thinking"] == "Look it up."


@pytest.mark.parametrize(
    "record, problem",
    [
        (
            _record(
                USER, {"role": "assistant", "tool_calls": [_call('{"order_id": "A1"')]}
            ),
            "message 1: tool_calls[0]: arguments are not valid JSON (Expecting ',' delimiter at column 18)",
        ),
        (
            _record(USER, {"role": "assistant", "tool_calls": [_call('["A1"]')]}),
            "message 1: tool_calls[0]: arguments must be a JSON object, got list",
        ),
        (
            _record(USER, {"role": "tool", "content": "x"}, ANSWER),
            "message 1 (tool): follows no assistant message with tool_calls",
        ),
        (
            _record(
                USER,
                {"role": "assistant", "tool_calls": [_call({})]},
                {"role": "user", "content": "?"},
                ANSWER,
            ),
            "message 1: its tool calls get no results",
        ),
        (
            _record(
                USER, {"role": "assistant", "tool_calls": [_call({}, name="bad name")]}
            ),
            "function name 'bad name' must be letters",
        ),
        (
            _record(
                USER,
                ANSWER,
                tools=[
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "objekt"}},
                    }
                ],
            ),
            "tools[0] (f): parameters are not a valid JSON schema",
        ),
        (
            _record(
                USER, {"role": "assistant", "tool_calls": [_call({"q": 'a <|"|> b'})]}
            ),
            "quote token",
        ),
        (
            _record(
                USER, {"role": "assistant", "tool_calls": [_call({"q": "<turn|>"})]}
            ),
            "contains the control token '<turn|>'",
        ),
    ],
)
def test_bad_tool_records_name_file_line_and_problem(tmp_path, record, problem):
    path = _write(tmp_path, _record(USER, ANSWER), record)
    with pytest.raises(DataError) as error:
        load_conversations({"path": path})
    assert str(error.value).startswith(f"{path}:2: ")
    assert problem in str(error.value)


def test_text_after_results_joins_the_answer_as_the_template_renders_it():
    raw = [
        USER,
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [_call({"order_id": "A1"})],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "shipped"},
        ANSWER,
    ]
    messages = records.validate_messages(raw)
    assert messages[-1] == {"role": "model", "content": "Checking.Shipped."}
    text = chat.render_conversation(messages, template="small")
    assert text.endswith("<tool_response|>Checking.Shipped.<turn|>\n")
