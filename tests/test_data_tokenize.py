"""Token ids and loss masks with the tiny Gemma 4 tokenizer (KerasHub).

Most tests run for both chat templates (the `template` fixture): "small"
(E2B/E4B) and "large" (26B-A4B/31B, the empty thought block in the prompt).
"""

import functools

import numpy as np
import pytest

from gemma4_keras.data import (
    ChatTokenizer,
    Conversation,
    DataError,
    as_chat_tokenizer,
    chat,
    encode_conversation,
    encode_conversations,
    generation_prompt,
    render_conversation,
    validate_messages,
)


@functools.cache
def _tokenizer():
    import keras_hub

    from gemma4_keras.testing.tiny import tiny_checkpoint

    return keras_hub.models.Gemma4Tokenizer.from_preset(str(tiny_checkpoint()))


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


@pytest.fixture(params=["small", "large"])
def template(request):
    return request.param


def _ids(tokenizer, text):
    return [int(i) for i in np.asarray(tokenizer(text))]


def _conv(*turns, system=None, thinking=None):
    raw = [{"role": "system", "content": system}] if system else []
    for i, text in enumerate(turns):
        raw.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    if thinking:
        raw[-1]["thinking"] = thinking
    return Conversation(validate_messages(raw), source=f"conv:{len(turns)}")


CONVERSATIONS = [
    _conv("Is the food great?", "Positive"),
    _conv("Code: acute bronchitis", "J20.9", system="You are a medical coder."),
    _conv("hello there", "hi", "how are you?", "fine, thanks"),
    _conv("What is 6 times 7?", "42", thinking="six sevens are forty-two"),
    _conv("  spaces   inside  ", "  multiple\n\nlines\n", system="  sys  "),
    _conv("unicode: café ☕ 日本", "ok ✓"),
]


def test_sentencepiece_proto_gives_the_keras_hub_ids(tokenizer):
    texts = [render_conversation(c.messages, template="small") for c in CONVERSATIONS]
    chat_tok = as_chat_tokenizer(tokenizer)
    assert chat_tok.encode_texts(texts) == [_ids(tokenizer, t) for t in texts]
    assert as_chat_tokenizer(tokenizer) is chat_tok  # cached per tokenizer


@pytest.mark.parametrize("enable_thinking", [False, True])
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_piecewise_ids_equal_tokenizing_the_full_string(
    tokenizer, index, enable_thinking, template
):
    conversation = CONVERSATIONS[index]
    for (example,) in [
        encode_conversation(
            conversation,
            tokenizer,
            max_length=512,
            template=template,
            enable_thinking=enable_thinking,
        )
    ]:
        text = "".join(
            t for t, _ in _training_text(conversation, enable_thinking, template)
        )
        assert example.token_ids.tolist() == _ids(tokenizer, text)
        assert (
            example.token_ids[0] == 2 and (example.token_ids == 2).sum() == 1
        )  # one BOS
        assert example.token_ids.dtype == np.int32 and example.loss_mask.dtype == bool


def _training_text(conversation, enable_thinking, template):
    from gemma4_keras.data import chat

    return chat.training_pieces(
        conversation.messages,
        len(conversation.messages) - 1,
        template=template,
        enable_thinking=enable_thinking,
    )


@pytest.mark.parametrize("enable_thinking", [False, True])
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_serving_prefix_is_a_token_prefix_and_mask_covers_the_rest(
    tokenizer, index, enable_thinking, template
):
    conversation = CONVERSATIONS[index]
    (example,) = encode_conversation(
        conversation,
        tokenizer,
        max_length=512,
        template=template,
        enable_thinking=enable_thinking,
    )
    prompt = _ids(
        tokenizer,
        generation_prompt(
            conversation.messages[:-1],
            template=template,
            enable_thinking=enable_thinking,
        ),
    )
    n = len(prompt)
    assert example.token_ids[:n].tolist() == prompt
    assert not example.loss_mask[:n].any() and example.loss_mask[n:].all()
    answer = conversation.messages[-1]
    target = answer["content"] + "<turn|>"
    if enable_thinking and answer.get("thinking"):
        target = f"<|channel>thought\n{answer['thinking']}\n<channel|>" + target
    assert example.token_ids[n:].tolist() == _ids(tokenizer, target)
    assert example.token_ids[-1] == 106  # <turn|> is trained


def test_all_model_turns_large_thinking_off_one_example_per_turn(tokenizer):
    """The large prompt's empty thought block is absent from history turns."""
    conversation = CONVERSATIONS[2]
    examples = encode_conversation(
        conversation,
        tokenizer,
        train_on="all_model_turns",
        max_length=512,
        template="large",
    )
    assert len(examples) == 2
    for example, turn in zip(examples, (1, 3)):
        prompt = _ids(
            tokenizer, generation_prompt(conversation.messages[:turn], template="large")
        )
        assert example.token_ids[: len(prompt)].tolist() == prompt
        assert example.loss_mask.sum() == len(example) - len(prompt)


@pytest.mark.parametrize(
    "template,enable_thinking", [("small", False), ("small", True), ("large", True)]
)
def test_all_model_turns_merge_into_one_sequence(tokenizer, template, enable_thinking):
    """Small template (or thinking on): each turn's prompt is a prefix of the next."""
    conversation = CONVERSATIONS[2]
    kw = {"template": template, "enable_thinking": enable_thinking}
    (example,) = encode_conversation(
        conversation, tokenizer, train_on="all_model_turns", max_length=512, **kw
    )
    ids, mask = example.token_ids, example.loss_mask
    # Both model turns are trained; the first turn's serving prefix holds too.
    for turn in (1, 3):
        prompt = _ids(tokenizer, generation_prompt(conversation.messages[:turn], **kw))
        assert ids[: len(prompt)].tolist() == prompt
    first_prompt = _ids(tokenizer, generation_prompt(conversation.messages[:1], **kw))
    assert not mask[: len(first_prompt)].any()
    trained = [int(i) for i in ids[mask]]
    expected = _ids(tokenizer, "hi<turn|>") + _ids(tokenizer, "fine, thanks<turn|>")
    assert trained == expected


def test_mask_never_covers_system_user_or_role_markers(tokenizer, template):
    (example,) = encode_conversation(
        CONVERSATIONS[1], tokenizer, max_length=512, template=template
    )
    trained = example.token_ids[example.loss_mask].tolist()
    assert trained == _ids(tokenizer, "J20.9<turn|>")
    assert 105 not in trained and 2 not in trained


def test_truncation_drop_counts_the_example(tokenizer):
    stats = {}
    long = _conv("word " * 200, "Positive")
    assert (
        encode_conversation(
            long, tokenizer, max_length=32, template="small", stats=stats
        )
        == []
    )
    assert (
        stats["dropped_too_long"] == 1
        and stats["dropped_too_long_records"][0]["source"] == long.source
    )


def test_truncation_cut_history_keeps_system_and_trained_turn(tokenizer, template):
    conversation = _conv(
        "old " * 60, "old answer", "new question", "new answer", system="Be kind."
    )
    stats = {}
    (example,) = encode_conversation(
        conversation,
        tokenizer,
        max_length=64,
        truncation="cut_history",
        template=template,
        stats=stats,
    )
    kept = [conversation.messages[0]] + conversation.messages[3:4]
    assert example.token_ids.tolist() == _ids(
        tokenizer, generation_prompt(kept, template=template)
    ) + _ids(tokenizer, "new answer<turn|>")
    assert stats["history_cut"] == 1
    # Too long even alone: dropped and counted.
    stats = {}
    alone = _conv("x " * 100, "y")
    assert (
        encode_conversation(
            alone,
            tokenizer,
            max_length=16,
            truncation="cut_history",
            template=template,
            stats=stats,
        )
        == []
    )
    assert stats["dropped_too_long"] == 1


def test_encode_conversations_matches_one_by_one(tokenizer, template):
    kw = {"max_length": 512, "train_on": "all_model_turns", "template": template}
    examples, stats = encode_conversations(CONVERSATIONS, tokenizer, **kw)
    one_by_one = [
        e for c in CONVERSATIONS for e in encode_conversation(c, tokenizer, **kw)
    ]
    assert [e.token_ids.tolist() for e in examples] == [
        e.token_ids.tolist() for e in one_by_one
    ]
    assert [e.loss_mask.tolist() for e in examples] == [
        e.loss_mask.tolist() for e in one_by_one
    ]
    # Large: the two turns of CONVERSATIONS[2] cannot merge (see above).
    extra = 1 if template == "large" else 0
    assert stats["examples"] == len(examples) == len(CONVERSATIONS) + extra
    assert stats["thoughts_not_trained"] == 1  # CONVERSATIONS[3], thinking off


def test_bad_options_and_boundary_check(tokenizer):
    kw = {"max_length": 64, "template": "small"}
    with pytest.raises(DataError, match="data.train_on='every_turn'"):
        encode_conversation(CONVERSATIONS[0], tokenizer, train_on="every_turn", **kw)
    with pytest.raises(DataError, match="data.truncation='cut'"):
        encode_conversation(CONVERSATIONS[0], tokenizer, truncation="cut", **kw)
    with pytest.raises(ValueError, match="'medium' is unknown; use one of small"):
        encode_conversation(
            CONVERSATIONS[0], tokenizer, max_length=64, template="medium"
        )

    # A tokenizer that merges across the mask boundary is caught, not hidden.
    special = {t: i for i, t in enumerate(chat.CONTROL_TOKENS)}
    merging = ChatTokenizer(lambda texts: [[len(t)] for t in texts], special)
    with pytest.raises(
        DataError, match="conv:2: the loss boundary inside 'model\\\\nPositive'"
    ):
        encode_conversation(
            CONVERSATIONS[0],
            merging,
            max_length=64,
            template="small",
            enable_thinking=True,
        )
