"""The Gemma 4 chat format, string level, against the official templates.

Oracle: `tests/data/gemma4_chat_golden.json`, copied from
`shared/gemma4_chat_golden.json`: 36 renderings (18 conversations, 7 of them
with tools, x the
"small" E2B/E4B and "large" 26B-A4B/31B templates) of the official
instruction-tuned `chat_template.jinja` files (2026-07-09 revision), rendered
with jinja2 `trim_blocks` + `lstrip_blocks` as transformers does, with
`bos_token='<bos>'` (its "source" field says so).
"""

import json
import pathlib

import pytest

from gemma4_keras.data import chat, generation_prompt, records, render_conversation
from gemma4_keras.data.template import render_official
from gemma4_keras.testing import tiny

GOLDEN = json.loads(
    (pathlib.Path(__file__).parent / "data" / "gemma4_chat_golden.json").read_text()
)["cases"]
IDS = [f"{c['case']}-{c['template']}" for c in GOLDEN]
SIZES = {"small": ("e2b", "e4b"), "large": ("26b_a4b", "31b")}
CODER = [
    {"role": "system", "content": "You are a medical coder."},
    {"role": "user", "content": "Code: acute bronchitis"},
    {"role": "model", "content": "J20.9"},
    {"role": "user", "content": "Code: asthma"},
    {"role": "model", "content": "J45", "thinking": "look it up"},
]


def test_golden_file_covers_both_templates_of_every_conversation():
    assert len(GOLDEN) == 36
    assert sum("tools" in c for c in GOLDEN) == 14
    for case in GOLDEN:
        assert tuple(case["sizes"]) == SIZES[case["template"]]
    names = {c["case"] for c in GOLDEN}
    for name in names:
        assert {c["template"] for c in GOLDEN if c["case"] == name} == {
            "small",
            "large",
        }


@pytest.mark.parametrize("case", GOLDEN, ids=IDS)
def test_package_rendering_equals_the_official_one(case):
    got = render_conversation(
        records.normalise_messages(case["messages"]),
        template=case["template"],
        tools=records.normalise_tools(case.get("tools")),
        add_generation_prompt=case["add_generation_prompt"],
        enable_thinking=case["enable_thinking"],
    )
    assert got == case["expected"]


@pytest.mark.parametrize("case", GOLDEN, ids=IDS)
def test_tiny_checkpoint_template_reproduces_the_official_one(case):
    """The jinja the tiny checkpoint writer ships renders like the official file."""
    got = render_official(
        tiny.chat_template_jinja(case["template"]),
        case["messages"],
        tools=case.get("tools"),
        add_generation_prompt=case["add_generation_prompt"],
        enable_thinking=case["enable_thinking"],
    )
    assert got == case["expected"]


@pytest.mark.parametrize(
    "case",
    [c for c in GOLDEN if c["add_generation_prompt"]],
    ids=[i for c, i in zip(GOLDEN, IDS) if c["add_generation_prompt"]],
)
def test_untrained_prefix_equals_the_official_generation_prompt(case):
    """Train/serve: what precedes a trained turn IS the official prompt of its size."""
    messages = records.normalise_messages(case["messages"])
    messages.append({"role": "model", "content": "Answer"})
    turn = len(messages) - 1
    pieces = chat.training_pieces(
        messages,
        turn,
        template=case["template"],
        tools=records.normalise_tools(case.get("tools")),
        enable_thinking=case["enable_thinking"],
    )
    untrained = "".join(t for t, trained in pieces if not trained)
    trained = "".join(t for t, trained in pieces if trained)
    assert untrained == case["expected"]  # equality, not a prefix relation
    # After tool results with thinking on, the prompt opened a thought.
    opened = case["enable_thinking"] and chat.after_results(messages[:turn])
    assert trained == ("<channel|>" if opened else "") + "Answer<turn|>"


@pytest.mark.parametrize("template", chat.TEMPLATES)
@pytest.mark.parametrize("enable_thinking", [False, True])
def test_every_trained_turn_follows_the_prompt_of_its_size(template, enable_thinking):
    for turn in (2, 4):
        pieces = chat.training_pieces(
            CODER, turn, template=template, enable_thinking=enable_thinking
        )
        untrained = "".join(t for t, trained in pieces if not trained)
        official = render_official(
            tiny.chat_template_jinja(template),
            CODER[:turn],
            add_generation_prompt=True,
            enable_thinking=enable_thinking,
        )
        assert untrained == official
        assert untrained == generation_prompt(
            CODER[:turn], template=template, enable_thinking=enable_thinking
        )
        assert "".join(t for t, _ in pieces).endswith(
            CODER[turn]["content"] + "<turn|>"
        )


def test_only_the_large_template_prefills_the_empty_thought_block():
    user = CODER[1:2]
    small = generation_prompt(user, template="small")
    large = generation_prompt(user, template="large")
    assert small.endswith("<|turn>model\n") and chat.EMPTY_THOUGHT not in small
    assert large == small + "<|channel>thought\n<channel|>"
    for template in chat.TEMPLATES:
        assert generation_prompt(
            user, template=template, enable_thinking=True
        ).endswith("<|turn>model\n")


def test_unknown_template_is_a_clear_error():
    with pytest.raises(
        ValueError, match=r"'medium' is unknown; use one of small, large"
    ):
        generation_prompt(CODER[1:2], template="medium")


def test_thought_is_trained_only_with_thinking_on():
    message = {"role": "model", "content": "42", "thinking": "6 times 7"}
    off = "".join(t for t, _ in chat.target_pieces(message))
    on = "".join(t for t, _ in chat.target_pieces(message, enable_thinking=True))
    assert off == "42<turn|>"
    assert on == "<|channel>thought\n6 times 7\n<channel|>42<turn|>"


def test_strip_and_extract_thinking():
    assert (
        chat.strip_thinking("a<|channel>thought\nx<channel|>b<|channel>y<channel|> c ")
        == "ab c"
    )
    assert chat.extract_thinking("<|channel>thought\nx<channel|>b") == ("x", "b")
    assert chat.extract_thinking("plain") == ("", "plain")
