"""Token-level loss masks of tool conversations (tiny Gemma 4 tokenizer).

What the model generates carries loss, nothing else (`shared/GEMMA4.md`,
"Tool calls"): the thought, every call, the `<|tool_response>` (id 50) that
ends the calls, the answer and its `<turn|>`. Never the declarations, the
user's text, or a response body (`response:...<tool_response|>` and the
`<|tool_response>` opening each further block). Every case of the golden file
with tools is encoded, for both templates and thinking off/on; the untrained
prefix of each trained span is checked against the official generation prompt.
"""

import functools
import json
import pathlib

import numpy as np
import pytest

from gemma4_keras.data import Conversation, chat, encode_conversation, records
from gemma4_keras.data.render import decode_with_spans

GOLDEN = json.loads(
    (pathlib.Path(__file__).parent / "data" / "gemma4_chat_golden.json").read_text()
)["cases"]
FULL_TOOL_CASES = [
    c
    for c in GOLDEN
    if c.get("tools") and not c["add_generation_prompt"] and c["template"] == "small"
]
RESPONSE_OPEN, RESPONSE_CLOSE = 50, 51
CALL_OPEN, CALL_CLOSE = 48, 49


@functools.cache
def _tokenizer():
    import keras_hub  # heavy; only this module's tests need it

    from gemma4_keras.testing.tiny import tiny_checkpoint

    return keras_hub.models.Gemma4Tokenizer.from_preset(str(tiny_checkpoint()))


def _conversation(case) -> Conversation:
    return Conversation(
        records.validate_messages(case["messages"]),
        source=case["case"],
        tools=records.normalise_tools(case["tools"]),
    )


def _trained_text(example, tokenizer) -> tuple[str, list[str]]:
    text, spans = decode_with_spans(
        example.token_ids, example.loss_mask, tokenizer.id_to_token
    )
    return text, [text[a:b] for a, b in spans]


@pytest.mark.parametrize(
    "case", FULL_TOOL_CASES, ids=[c["case"] for c in FULL_TOOL_CASES]
)
@pytest.mark.parametrize("template", chat.TEMPLATES)
def test_only_what_the_model_writes_is_trained(case, template):
    conversation = _conversation(case)
    examples = encode_conversation(
        conversation, _tokenizer(), max_length=4096, template=template
    )
    trained = []
    for example in examples:
        ids, mask = example.token_ids, example.loss_mask
        # Declarations and user text: nothing before the first model turn.
        first_model = int(np.flatnonzero(ids == 105)[-1])  # the trained turn's header
        assert not mask[: first_model + 2].any()
        # Every response body is untrained; the stop right after calls is
        # trained wherever those calls are (history of a later sequence: neither).
        for i in np.flatnonzero(ids == RESPONSE_OPEN):
            after_calls = ids[i - 1] == CALL_CLOSE
            assert mask[i] == (after_calls and mask[i - 1]), (case["case"], i)
        closes = np.flatnonzero(ids == RESPONSE_CLOSE)
        for i in closes:
            opening = np.flatnonzero(ids[:i] == RESPONSE_OPEN)[-1]
            assert not mask[opening + 1 : i + 1].any()
        assert mask[ids == CALL_CLOSE].any() or mask[ids == 106].any()
        trained += _trained_text(example, _tokenizer())[1]
    calls = "".join(
        records.tool_format.format_call(c)
        for m in conversation.messages
        for c in m.get("tool_calls", [])
    )
    joined = "".join(trained)
    assert calls in joined.replace("<|tool_response>", "")
    answer = conversation.messages[-1]["content"]
    assert joined.endswith(answer + "<turn|>")
    assert "declaration:" not in joined and "response:" not in joined


def test_parallel_calls_mask_token_by_token():
    """The small template, thinking off: one sequence, masks spelled out."""
    case = next(c for c in FULL_TOOL_CASES if c["case"] == "parallel_calls_full")
    (example,) = encode_conversation(
        _conversation(case), _tokenizer(), max_length=4096, template="small"
    )
    text, spans = _trained_text(example, _tokenizer())
    assert text == case["expected"].removesuffix("\n")
    assert spans == [
        '<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>,unit:<|"|>celsius<|"|>}'
        "<tool_call|><|tool_call>call:add{round:false,values:[1.5,2,-3]}<tool_call|>"
        "<|tool_response>",
        "-2 C in Oslo; the sum is 0.5.<turn|>",
    ]


@pytest.mark.parametrize("template", chat.TEMPLATES)
@pytest.mark.parametrize("enable_thinking", [False, True])
def test_each_trained_span_follows_the_official_prompt(template, enable_thinking):
    """Train/serve: before every trained span stands exactly the prompt serving shows."""
    case = next(c for c in FULL_TOOL_CASES if c["case"] == "reasoning_then_call_full")
    conversation = _conversation(case)
    messages = conversation.messages
    if not enable_thinking:
        messages = [{k: v for k, v in m.items() if k != "thinking"} for m in messages]
    examples = encode_conversation(
        conversation,
        _tokenizer(),
        max_length=4096,
        template=template,
        enable_thinking=enable_thinking,
    )
    starts = []
    for example in examples:
        text, spans = decode_with_spans(
            example.token_ids, example.loss_mask, _tokenizer().id_to_token
        )
        starts += [text[:a] for a, _ in spans]
    prompts = [
        chat.generation_prompt(
            messages[:t],
            template=template,
            tools=conversation.tools,
            enable_thinking=enable_thinking,
        )
        for t, m in enumerate(messages)
        if m["role"] == "model"
    ]
    assert starts == prompts
    merged = template == "small" or enable_thinking
    assert len(examples) == (1 if merged else 2)


def test_thought_trained_with_thinking_on_after_results_is_closed():
    case = next(c for c in FULL_TOOL_CASES if c["case"] == "reasoning_then_call_full")
    (example,) = encode_conversation(
        _conversation(case),
        _tokenizer(),
        max_length=4096,
        template="small",
        enable_thinking=True,
    )
    _, spans = _trained_text(example, _tokenizer())
    assert spans[0].startswith("<|channel>thought\nUse the add tool.\n<channel|>")
    # After the result the prompt opened a thought; the answer closes it empty.
    assert spans[-1] == "<channel|>0.5<turn|>"


def test_last_model_turn_trains_every_message_of_that_turn_only():
    raw = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Add 1 and 2"},
        {
            "role": "assistant",
            "tool_calls": [
                {"function": {"name": "add", "arguments": '{"values": [1, 2]}'}}
            ],
        },
        {"role": "tool", "name": "add", "content": "3"},
        {"role": "assistant", "content": "3"},
    ]
    conversation = Conversation(records.validate_messages(raw), source="x")
    (example,) = encode_conversation(
        conversation, _tokenizer(), max_length=4096, template="small"
    )
    _, spans = _trained_text(example, _tokenizer())
    assert spans == [
        "<|tool_call>call:add{values:[1,2]}<tool_call|><|tool_response>",
        "3<turn|>",
    ]
    every = encode_conversation(
        conversation,
        _tokenizer(),
        max_length=4096,
        template="small",
        train_on="all_model_turns",
    )
    assert [s for e in every for s in _trained_text(e, _tokenizer())[1]][
        0
    ] == "Hello<turn|>"


def test_cut_history_drops_a_whole_tool_turn():
    call = {
        "role": "assistant",
        "tool_calls": [{"function": {"name": "f", "arguments": {}}}],
    }
    raw = [
        {"role": "user", "content": "one " * 50},
        call,
        {"role": "tool", "name": "f", "content": "r " * 50},
        {"role": "assistant", "content": "first"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "second"},
    ]
    conversation = Conversation(records.validate_messages(raw), source="x")
    full = encode_conversation(
        conversation, _tokenizer(), max_length=4096, template="small"
    )
    stats = {}
    (cut,) = encode_conversation(
        conversation,
        _tokenizer(),
        max_length=len(full[0]) - 1,
        template="small",
        truncation="cut_history",
        stats=stats,
    )
    text, _ = _trained_text(cut, _tokenizer())
    assert stats["history_cut"] == 1
    assert text == "<bos><|turn>user\ntwo<turn|>\n<|turn>model\nsecond<turn|>"


@pytest.mark.parametrize(
    "case", FULL_TOOL_CASES, ids=[c["case"] for c in FULL_TOOL_CASES]
)
def test_piecewise_ids_equal_the_tokenizer_on_the_whole_text(case):
    """Encoding between control tokens gives the ids of the whole string."""
    conversation = _conversation(case)
    (example,) = encode_conversation(
        conversation, _tokenizer(), max_length=4096, template="small"
    )
    # Thinking off: thoughts are not trained, nor shown (the model wrote none).
    messages = [
        {k: v for k, v in m.items() if k != "thinking"} for m in conversation.messages
    ]
    text = chat.render_conversation(
        messages, template="small", tools=conversation.tools
    )
    whole = [int(i) for i in np.asarray(_tokenizer()(text.removesuffix("\n")))]
    assert example.token_ids.tolist() == whole
