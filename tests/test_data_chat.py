"""The Gemma 4 chat format, string level.

Oracle: the official instruction-tuned template is not shipped by
transformers 5.24 or keras-hub 0.32 (checked: no "<|turn>" template in either),
so the first three expectations are the rendered examples of
shared/GEMMA4.md, verbatim; the others are written by hand from the
template's rules (system/developer first, trim, assistant -> model, thoughts
stripped from model turns, `<|think|>\\n` atop the system turn, the empty
thought block in the generation prompt when thinking is off).
"""

import pytest

from gemma4_keras.data import chat, generation_prompt, render_conversation

SENTIMENT = [
    {"role": "user", "content": "Classify the sentiment: 'This product is amazing'"},
    {"role": "model", "content": "Positive"},
]
CODER = [
    {"role": "system", "content": "You are a medical coder."},
    {"role": "user", "content": "Code: acute bronchitis"},
    {"role": "model", "content": "J20.9"},
]

# (name, messages, kwargs, expected text)
CASES = [
    (
        "gemma4md_single_turn",
        SENTIMENT,
        {},
        "<bos><|turn>user\nClassify the sentiment: 'This product is amazing'<turn|>\n<|turn>model\nPositive<turn|>\n",
    ),
    (
        "gemma4md_system",
        CODER,
        {},
        "<bos><|turn>system\nYou are a medical coder.<turn|>\n<|turn>user\nCode: acute bronchitis<turn|>\n<|turn>model\nJ20.9<turn|>\n",
    ),
    (
        "gemma4md_generation_prompt",
        SENTIMENT[:1],
        {"add_generation_prompt": True},
        "<bos><|turn>user\nClassify the sentiment: 'This product is amazing'<turn|>\n<|turn>model\n<|channel>thought\n<channel|>",
    ),
    (
        "multi_turn_assistant_role_and_trim",
        [
            {"role": "user", "content": "  Hi \n"},
            {"role": "assistant", "content": " Hello! "},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye"},
        ],
        {},
        "<bos><|turn>user\nHi<turn|>\n<|turn>model\nHello!<turn|>\n<|turn>user\nBye<turn|>\n<|turn>model\nGoodbye<turn|>\n",
    ),
    (
        "developer_role_is_the_system_turn",
        [{"role": "developer", "content": " Be terse. "}, SENTIMENT[0], SENTIMENT[1]],
        {},
        "<bos><|turn>system\nBe terse.<turn|>\n<|turn>user\nClassify the sentiment: 'This product is amazing'<turn|>\n<|turn>model\nPositive<turn|>\n",
    ),
    (
        "thoughts_stripped_from_history",
        [
            {"role": "user", "content": "2+3?"},
            {"role": "model", "content": "<|channel>thought\nadd them<channel|>5"},
            {"role": "user", "content": "times 2?"},
        ],
        {"add_generation_prompt": True},
        "<bos><|turn>user\n2+3?<turn|>\n<|turn>model\n5<turn|>\n<|turn>user\ntimes 2?<turn|>\n<|turn>model\n<|channel>thought\n<channel|>",
    ),
    (
        "thinking_mode_without_system",
        SENTIMENT[:1],
        {"add_generation_prompt": True, "enable_thinking": True},
        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nClassify the sentiment: 'This product is amazing'<turn|>\n<|turn>model\n",
    ),
    (
        "thinking_mode_with_system",
        CODER,
        {"enable_thinking": True},
        "<bos><|turn>system\n<|think|>\nYou are a medical coder.<turn|>\n<|turn>user\nCode: acute bronchitis<turn|>\n<|turn>model\nJ20.9<turn|>\n",
    ),
]


@pytest.mark.parametrize(
    "name,messages,kwargs,expected", CASES, ids=[c[0] for c in CASES]
)
def test_render_matches_official_template(name, messages, kwargs, expected):
    assert render_conversation(messages, **kwargs) == expected
    assert render_conversation(messages, **kwargs).count("<bos>") == 1


def test_generation_prompt_thinking_off_ends_with_empty_thought():
    prompt = generation_prompt(SENTIMENT[:1])
    assert prompt.endswith("<|turn>model\n<|channel>thought\n<channel|>")
    assert generation_prompt(SENTIMENT[:1], enable_thinking=True).endswith(
        "<|turn>model\n"
    )


@pytest.mark.parametrize("enable_thinking", [False, True])
def test_training_sequence_starts_with_the_serving_prefix(enable_thinking):
    messages = CODER + [
        {"role": "user", "content": "Code: asthma"},
        {"role": "model", "content": "J45", "thinking": "look it up"},
    ]
    for turn in (2, 4):
        pieces = chat.training_pieces(messages, turn, enable_thinking=enable_thinking)
        text = "".join(t for t, _ in pieces)
        prefix = generation_prompt(messages[:turn], enable_thinking=enable_thinking)
        assert text.startswith(prefix)
        untrained = "".join(t for t, trained in pieces if not trained)
        assert untrained == prefix
        assert text.endswith(messages[turn]["content"] + "<turn|>")


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
