"""`gemma4-keras data render`: the text and trained spans of every example.

Oracle: the token ids and loss masks that training uses
(`encode_conversation`); the spans must cover exactly the trained tokens.
"""

import json

import numpy as np
import pytest

from gemma4_keras import cli, config_lib
from gemma4_keras.data import chat, encode_conversation, load_conversations
from gemma4_keras.data.render import highlight, render_records
from gemma4_keras.model import presets

RECORDS = [
    {
        "messages": [
            {"role": "user", "content": "Say hi"},
            {"role": "assistant", "content": "hi there"},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "café ☕ 日本?"},
            {"role": "assistant", "content": "<|channel>thought\nthink<channel|>oui ✓"},
            {"role": "user", "content": "and then?"},
            {"role": "assistant", "content": "ok 😀"},
        ]
    },
]


def _config(tmp_path, size, **data):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS))
    c = config_lib.get_config(size, "lora", "runlocal")
    c.data.path = str(path)
    c.data.eval_path = str(path)  # a separate eval file: every record is trained
    for k, v in data.items():
        c.data[k] = v
    return c


def _render(c, limit=0):
    preset = presets.resolve_preset(c.model.preset)
    template = presets.chat_template(c, preset)
    tokenizer = presets.load_tokenizer(preset)
    settings = config_lib.data_settings(c.data, template.variant)
    return list(render_records(settings, tokenizer, template, limit=limit)), tokenizer


def _ids(tokenizer, text):
    return [int(i) for i in np.asarray(tokenizer(text))] if text else []


@pytest.mark.parametrize(
    "size,train_on,thinking",
    [
        ("e4b", "all_model_turns", False),
        ("31b", "all_model_turns", False),
        ("e2b", "last_model_turn", True),
        ("26b_a4b", "all_model_turns", True),
    ],
)
def test_spans_are_exactly_the_trained_tokens(tmp_path, size, train_on, thinking):
    c = _config(tmp_path, size, train_on=train_on, enable_thinking=thinking)
    records, tokenizer = _render(c)
    template = config_lib.SIZES[size].template
    settings = config_lib.data_settings(c.data, template)
    conversations, _ = load_conversations(settings)
    examples = [
        e
        for conv in conversations
        for e in encode_conversation(
            conv,
            tokenizer,
            train_on=train_on,
            max_length=512,
            template=template,
            enable_thinking=thinking,
        )
    ]
    assert len(records) == len(examples) >= 2
    for record, example in zip(records, examples):
        assert record["template"] == template and record["source"] == example.source
        text, spans = record["text"], record["trained"]
        # The text is the training sequence: it tokenizes to the example's ids.
        assert _ids(tokenizer, text) == example.token_ids.tolist()
        trained = [i for s, e in spans for i in _ids(tokenizer, text[s:e])]
        assert trained == example.token_ids[example.loss_mask].tolist()
        assert all(text[e - len("<turn|>") : e] == "<turn|>" for _, e in spans)
        assert record["generation_prompt"] == text[: spans[-1][0]]


@pytest.mark.parametrize("size", ["e4b", "31b"])
def test_generation_prompt_is_the_serving_prompt_of_the_size(tmp_path, size):
    c = _config(tmp_path, size)
    records, _ = _render(c)
    template = config_lib.SIZES[size].template
    conversations, _ = load_conversations(config_lib.data_settings(c.data))
    for record, conv in zip(records, conversations):
        assert record["generation_prompt"] == chat.generation_prompt(
            conv.messages[:-1], template=template
        )
        assert record["text"] == record["generation_prompt"] + (
            conv.messages[-1]["content"] + "<turn|>"
        )


def test_highlight_wraps_the_spans_in_ansi():
    assert highlight("abcdef", [[1, 2], [4, 6]]) == (
        "a\033[1;32mb\033[0mcd\033[1;32mef\033[0m"
    )


@pytest.mark.parametrize(
    "config,template",
    [
        ("configs/e4b_lora.py:runlocal", "small"),
        ("configs/31b_lora.py:runlocal", "large"),
    ],
)
def test_cli_writes_json_lines(tmp_path, config, template):
    out = tmp_path / "render.jsonl"
    argv = ["gemma4-keras", "data", "render", f"--config={config}", "--limit=3"]
    assert cli.main(argv + [f"--out={out}"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 3
    for line in lines:
        assert set(line) == {
            "source",
            "template",
            "text",
            "trained",
            "generation_prompt",
        }
        assert line["template"] == template
        assert (chat.EMPTY_THOUGHT in line["text"]) == (template == "large")
    assert cli.main(argv[:-1] + ["--limit=-1"]) == 2
