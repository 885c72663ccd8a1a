"""Readers and validation errors of gemma4_keras.data.records."""

import json
import os

import ml_collections
import pytest

from gemma4_keras.data import DataError, load_conversations, validate_messages

DATA = os.path.join(os.path.dirname(__file__), "data")


def _cfg(path, **kwargs):
    fields = {
        "path": path,
        "format": "auto",
        "fields": {},
        "on_error": "raise",
        "system_prompt": "",
    }
    fields.update(kwargs)
    return ml_collections.ConfigDict(fields)


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text(
        "".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    )
    return str(path)


def _user_model(user="Hi", model="Hello"):
    return {
        "messages": [
            {"role": "user", "content": user},
            {"role": "model", "content": model},
        ]
    }


# --- readers ---------------------------------------------------------------


def test_messages_reader_normalises_roles_and_thoughts():
    conversations, stats = load_conversations(_cfg(f"{DATA}/messages.jsonl"))
    assert stats["records"] == stats["valid"] == 3 and stats["skipped"] == 0
    first, _, third = conversations
    assert first.source == f"{DATA}/messages.jsonl:1"
    assert first.messages[-1] == {"role": "model", "content": "Positive"}
    assert [m["role"] for m in third.messages] == [
        "system",
        "user",
        "model",
        "user",
        "model",
    ]
    assert third.messages[-1] == {
        "role": "model",
        "content": "Merci",
        "thinking": "Polite reply.",
    }


def test_prompt_completion_reader_with_optional_system():
    conversations, _ = load_conversations(_cfg(f"{DATA}/prompt_completion.jsonl"))
    assert conversations[0].messages == [
        {"role": "user", "content": "2+2?"},
        {"role": "model", "content": "4"},
    ]
    assert conversations[1].messages[0] == {
        "role": "system",
        "content": "Answer in one word.",
    }


def test_alpaca_reader_joins_instruction_and_input():
    conversations, _ = load_conversations(_cfg(f"{DATA}/alpaca.jsonl", format="alpaca"))
    assert (
        conversations[0].messages[0]["content"]
        == "Translate to German.\n\nGood morning"
    )
    assert conversations[1].messages[0]["content"] == "Name a prime number."
    assert conversations[1].messages[1]["content"] == "7"


def test_csv_reader_maps_columns_and_reports_start_lines():
    fields = {"prompt": "question", "completion": "answer", "system": ""}
    conversations, _ = load_conversations(
        _cfg(f"{DATA}/qa.csv", format="csv", fields=fields)
    )
    assert [c.source for c in conversations] == [f"{DATA}/qa.csv:2", f"{DATA}/qa.csv:3"]
    assert conversations[1].messages[0]["content"] == "Multi-line\nquestion?"


def test_csv_missing_column_names_row_and_mapping(tmp_path):
    path = _write(tmp_path, "x.csv", ["q,a\n", "hi,there\n"])
    with pytest.raises(
        DataError,
        match=r"x.csv:2: missing field 'question' \(data.fields maps 'prompt' to 'question'\)",
    ):
        load_conversations(
            _cfg(path, format="csv", fields={"prompt": "question", "completion": "a"})
        )


def test_csv_wrong_column_count(tmp_path):
    path = _write(tmp_path, "x.csv", ["prompt,completion\n", "a,b,c\n"])
    with pytest.raises(
        DataError, match=r"x.csv:2: row has 3 columns, the header has 2"
    ):
        load_conversations(_cfg(path))


def test_json_list_reader_uses_record_index(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps([_user_model(), {"prompt": "a"}]))
    with pytest.raises(
        DataError,
        match=r"x.json\[1\]: missing field 'completion'|x.json\[1\]: cannot tell",
    ):
        load_conversations(_cfg(str(path), format="prompt_completion"))


def test_system_prompt_added_only_when_missing():
    cfg = _cfg(f"{DATA}/messages.jsonl", system_prompt="Be brief.")
    conversations, _ = load_conversations(cfg)
    assert conversations[0].messages[0] == {"role": "system", "content": "Be brief."}
    assert conversations[1].messages[0]["content"] == "You are a medical coder."


def test_plain_dict_config_and_content_parts(tmp_path):
    parts = [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]
    path = _write(
        tmp_path,
        "x.jsonl",
        [
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": parts},
                        {"role": "assistant", "content": "Yo"},
                    ]
                }
            )
            + "\n"
        ],
    )
    conversations, _ = load_conversations({"path": path})
    assert conversations[0].messages[0]["content"] == "Hi there"


# --- validation errors: each names file, line and problem -------------------

BAD_RECORDS = [
    ('{"messages": [', "malformed JSON"),
    ('["not", "an", "object"]', "a JSONL line must be a JSON object"),
    (json.dumps({"text": "hi"}), "cannot tell the format from the fields ['text']"),
    (
        json.dumps({"messages": [{"role": "user"}]}),
        "message 0: missing field 'content'",
    ),
    (
        json.dumps({"messages": [{"role": "bot", "content": "x"}]}),
        "message 0: unknown role 'bot' (expected one of: user, model, assistant, system, developer, tool)",
    ),
    (
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "user", "content": "b"},
                ]
            }
        ),
        "message 1: turns must alternate user/model; expected model, got user",
    ),
    (
        json.dumps({"messages": [{"role": "model", "content": "a"}]}),
        "message 0: turns must alternate user/model; expected user, got model",
    ),
    (json.dumps(_user_model(model=" ")), "message 1 (model): empty content"),
    (json.dumps(_user_model(user="")), "message 0 (user): empty content"),
    (
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "model", "content": "b"},
                    {"role": "user", "content": "c"},
                ]
            }
        ),
        "conversation does not end with a model turn",
    ),
    (
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "system", "content": "b"},
                ]
            }
        ),
        "message 1: a system message is only allowed first",
    ),
    (
        json.dumps(_user_model(user="a<turn|>b")),
        "content contains the control token '<turn|>'",
    ),
    (json.dumps({"messages": []}), "'messages' must be a non-empty list"),
    (
        json.dumps({"messages": [{"role": "user", "content": 3}]}),
        "content must be a string, got int",
    ),
]


@pytest.mark.parametrize("line,reason", BAD_RECORDS)
def test_validation_error_names_file_line_and_problem(tmp_path, line, reason):
    path = _write(
        tmp_path, "train.jsonl", [json.dumps(_user_model()) + "\n", "\n", line + "\n"]
    )
    with pytest.raises(DataError) as info:
        load_conversations(_cfg(path))
    assert str(info.value).startswith(f"{path}:3: ")
    assert reason in str(info.value)


def test_error_message_format_from_the_api_contract(tmp_path):
    record = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]
    }
    path = _write(tmp_path, "train.jsonl", [json.dumps(record) + "\n"])
    with pytest.raises(
        DataError,
        match=r"train.jsonl:1: message 1: unknown role 'bot' \(expected one of: user, model, assistant, system, developer, tool\)$",
    ):
        load_conversations(_cfg(path))


def test_skip_mode_counts_and_lists_bad_records(tmp_path):
    path = _write(
        tmp_path,
        "t.jsonl",
        [
            json.dumps(_user_model()) + "\n",
            "{oops\n",
            json.dumps(_user_model(model="")) + "\n",
        ],
    )
    conversations, stats = load_conversations(_cfg(path, on_error="skip"))
    assert len(conversations) == 1
    assert stats["records"] == 3 and stats["skipped"] == 2
    assert [p["source"] for p in stats["skipped_records"]] == [f"{path}:2", f"{path}:3"]


def test_raise_mode_lists_all_problems(tmp_path):
    path = _write(tmp_path, "t.jsonl", ["{oops\n", "{oops\n"])
    with pytest.raises(DataError) as info:
        load_conversations(_cfg(path))
    assert len(info.value.problems) == 2
    assert "2 problems in all" in str(
        info.value
    ) and f"{path}:2: malformed JSON" in str(info.value)


def test_config_errors():
    with pytest.raises(DataError, match="data.path is empty"):
        load_conversations(_cfg(""))
    with pytest.raises(DataError, match="no such file"):
        load_conversations(_cfg("/nonexistent.jsonl"))
    with pytest.raises(DataError, match="data.on_error='ignore'"):
        load_conversations(_cfg(f"{DATA}/messages.jsonl", on_error="ignore"))


def test_validate_messages_keeps_thinking_field():
    messages = validate_messages(
        [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a", "reasoning_content": "r"},
        ]
    )
    assert messages[-1] == {"role": "model", "content": "a", "thinking": "r"}


def test_empty_field_mapping_means_the_fields_own_name():
    from gemma4_keras import settings

    fields = ml_collections.ConfigDict({k: "" for k in settings.RECORD_FIELDS})
    for name in ("messages", "prompt_completion", "alpaca"):
        conversations, _ = load_conversations(
            _cfg(f"{DATA}/{name}.jsonl", fields=fields)
        )
        assert conversations and conversations[0].messages[-1]["role"] == "model"
