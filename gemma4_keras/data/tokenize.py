"""Token ids and loss masks for conversations, with exact turn boundaries.

The rendered text is split at the control tokens (`chat.CONTROL_TOKENS`:
`<bos>`, `<|turn>`, `<turn|>`, `<|channel>`, `<channel|>`, `<|think|>`,
the tool tokens `<|tool>`, `<|tool_call>`, `<|tool_response>`, `<|"|>`, ...
and the media tokens `<|image|>`, `<|audio|>`, ...); those map straight to
their ids and the text between them is encoded on its own. SentencePiece
never merges across a user-defined token, so this gives the ids of the whole
string (the tests check it against `Gemma4Tokenizer(full_text)`), while the
loss mask falls exactly on piece boundaries. No BOS is added by the
tokenizer: the rendered text carries its single `<bos>`. Each media
placeholder is then expanded into its begin marker, soft tokens and end
marker (`media.expand`), as the Hugging Face processor does, with no loss.

Text is encoded with the SentencePiece model the KerasHub tokenizer holds
(`tokenizer.proto`), batched, which is much faster than calling the TF op
per string; the ids are the same (tested).
"""

import dataclasses
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gemma4_keras.data import chat, media
from gemma4_keras.data.records import Conversation, DataError, Problem

TRAIN_ON = ("last_model_turn", "all_model_turns")
TRUNCATION = ("drop", "cut_history")


@dataclasses.dataclass
class EncodedExample:
    """One training sequence.

    Attributes:
        token_ids: int32 [length], the full sequence, starting with bos (2).
        loss_mask: bool [length], True on trained model-turn content and its
            closing `<turn|>` (never on media markers or soft tokens).
        source: where the conversation came from ("file.jsonl:17").
        media: the media records (`media.py`) of the images and audio clips
            in the sequence, in order; one per placeholder run.
    """

    token_ids: np.ndarray
    loss_mask: np.ndarray
    source: str = ""
    media: list = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.token_ids)


class ChatTokenizer:
    """Encodes chat pieces: control tokens by id, text in batches.

    Args:
        encode_texts: maps a list of strings to a list of id lists, adding
            no BOS/EOS.
        special_ids: id of every string in `chat.CONTROL_TOKENS`.
    """

    def __init__(
        self, encode_texts: Callable[[list[str]], list[list[int]]], special_ids: dict
    ):
        missing = [t for t in chat.CONTROL_TOKENS if t not in special_ids]
        if missing:
            raise ValueError(
                f"the tokenizer lacks the Gemma 4 control tokens {missing}"
            )
        self.encode_texts = encode_texts
        self.special_ids = dict(special_ids)
        self.bos_id = self.special_ids[chat.BOS]
        self._cache: dict[str, list[int]] = {}
        self.max_cache = 1_000_000

    @classmethod
    def from_keras_hub(cls, tokenizer: Any) -> "ChatTokenizer":
        """Wraps a `keras_hub.models.Gemma4Tokenizer` (uses its SentencePiece proto)."""
        proto = getattr(tokenizer, "proto", None)
        if proto is not None:
            import sentencepiece  # only SentencePiece-model tokenizers need it

            if isinstance(proto, str):
                with open(proto, "rb") as f:
                    proto = f.read()
            processor = sentencepiece.SentencePieceProcessor(model_proto=proto)

            def encode_texts(texts: list[str]) -> list[list[int]]:
                return processor.encode(texts)

        else:

            def encode_texts(texts: list[str]) -> list[list[int]]:
                return [list(map(int, ids)) for ids in tokenizer(texts).to_list()]

        special = {t: int(tokenizer.token_to_id(t)) for t in chat.CONTROL_TOKENS}
        unk_id = int(tokenizer.token_to_id("<unk>"))
        unknown = [t for t, i in special.items() if i == unk_id]
        if unknown:
            raise ValueError(
                f"the tokenizer maps {unknown} to <unk>; is it a Gemma 4 tokenizer?"
            )
        return cls(encode_texts, special)

    def prefetch(self, texts: Sequence[str]) -> None:
        """Encodes the texts not yet cached in one batched call."""
        needed = {t for t in texts if t not in self.special_ids}
        if len(self._cache) + len(needed) > self.max_cache:
            self._cache.clear()
        todo = sorted(needed.difference(self._cache))
        if todo:
            self._cache.update(zip(todo, self.encode_texts(todo)))

    def clear_cache(self) -> None:
        self._cache.clear()

    def encode_pieces(
        self, pieces: Sequence[chat.Piece]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Ids and loss mask of a piece list.

        Adjacent text pieces are joined and encoded together (as the full
        string would be). Where such a run holds a mask boundary the split
        encoding must equal the joint one, else the boundary is not exact.

        Example (T = trainable piece, ids from a hypothetical vocabulary):
            pieces  <|turn>  "model\\n"  <|channel>  "thought\\n"  <channel|>  "Hi"(T)  <turn|>(T)
            ids     105      9 10        100         11 10         101         12       106
            mask    0        0  0        0           0  0          0           1        1
        """
        self.prefetch([text for text, _ in pieces])
        ids: list[int] = []
        mask: list[bool] = []
        run: list[chat.Piece] = []
        for text, trainable in list(pieces) + [(None, False)]:
            if text is not None and text not in self.special_ids:
                run.append((text, trainable))
                continue
            if run:
                self._encode_run(run, ids, mask)
                run = []
            if text is not None:
                ids.append(self.special_ids[text])
                mask.append(trainable)
        return np.asarray(ids, np.int32), np.asarray(mask, bool)

    def _encode_run(self, run: list[chat.Piece], ids: list, mask: list) -> None:
        parts = [self._cache[text] for text, _ in run]
        if len({t for _, t in run}) > 1:
            joint = self.encode_texts(["".join(text for text, _ in run)])[0]
            if joint != [i for part in parts for i in part]:
                text = "".join(t for t, _ in run)
                raise ValueError(
                    f"the loss boundary inside {text[:40]!r} is not a token boundary"
                )
        for (_, trainable), part in zip(run, parts):
            ids.extend(part)
            mask.extend([trainable] * len(part))


_WRAPPED: "weakref.WeakKeyDictionary[Any, ChatTokenizer]" = weakref.WeakKeyDictionary()


def as_chat_tokenizer(tokenizer: Any) -> ChatTokenizer:
    """Returns a ChatTokenizer for a KerasHub tokenizer (cached per object)."""
    if isinstance(tokenizer, ChatTokenizer):
        return tokenizer
    try:
        wrapped = _WRAPPED.get(tokenizer)
    except TypeError:  # not weak-referenceable
        return ChatTokenizer.from_keras_hub(tokenizer)
    if wrapped is None:
        wrapped = _WRAPPED[tokenizer] = ChatTokenizer.from_keras_hub(tokenizer)
    return wrapped


# --------------------------------------------------------------------------
# Conversations -> examples
# --------------------------------------------------------------------------


def _cut_history(messages: list, turn: int) -> tuple[list, int] | None:
    """Drops the oldest user message and its model turn before `turn`; None when none is left.

    A model turn may span several model messages (tool calls and their
    results): all of them go with their user message.
    """
    start = 1 if messages[0]["role"] == "system" else 0
    users = [i for i in range(start, turn) if messages[i]["role"] == "user"]
    if len(users) < 2:
        return None
    drop = users[1] - start
    return messages[:start] + messages[users[1] :], turn - drop


def _without_thoughts(messages: list) -> list:
    return [{k: v for k, v in m.items() if k != "thinking"} for m in messages]


def _encode_turn(
    conversation,
    turn,
    tok,
    *,
    max_length,
    truncation,
    template,
    enable_thinking,
    stats,
):
    messages, cuts = conversation.messages, 0
    thought = bool(messages[turn].get("thinking"))
    if not enable_thinking:  # serving never shows thoughts the model did not write
        messages = _without_thoughts(messages)
    while True:
        pieces = chat.training_pieces(
            messages,
            turn,
            template=template,
            tools=conversation.tools,
            enable_thinking=enable_thinking,
        )
        records = media.media_of(messages[:turn])
        try:
            ids, mask = tok.encode_pieces(pieces)
            ids, mask = media.expand(ids, mask, records, tok.special_ids)
        except ValueError as e:
            raise DataError(Problem(conversation.source, str(e))) from e
        if len(ids) <= max_length:
            break
        cut = _cut_history(messages, turn) if truncation == "cut_history" else None
        if cut is None:
            _count(stats, "dropped_too_long", conversation.source, len(ids))
            return None
        (messages, turn), cuts = cut, cuts + 1
    if cuts:
        _count(stats, "history_cut", conversation.source, cuts)
    if not enable_thinking and thought:
        _count(stats, "thoughts_not_trained", conversation.source, 1)
    return EncodedExample(ids, mask, conversation.source, records)


def _count(stats: dict | None, key: str, source: str, value: int) -> None:
    if stats is None:
        return
    stats[key] = stats.get(key, 0) + 1
    stats.setdefault(key + "_records", []).append(
        {"source": source, "value": int(value)}
    )


def _merge(examples: list[EncodedExample]) -> list[EncodedExample]:
    """Folds an example into the next when it is a token prefix of it."""
    merged: list[EncodedExample] = []
    for example in examples:
        prev = merged[-1] if merged else None
        n = len(prev.token_ids) if prev else 0
        if (
            prev
            and n <= len(example)
            and np.array_equal(prev.token_ids, example.token_ids[:n])
        ):
            example.loss_mask[:n] |= prev.loss_mask
            merged[-1] = example
        else:
            merged.append(example)
    return merged


def encode_conversation(
    conversation: Conversation,
    tokenizer: Any,
    *,
    train_on: str = "last_model_turn",
    max_length: int,
    truncation: str = "drop",
    template: str,
    enable_thinking: bool = False,
    stats: dict | None = None,
) -> list[EncodedExample]:
    """Token ids and loss masks for one conversation.

    Every trained model turn gets a sequence that starts with exactly the
    generation prompt serving shows for it with `template` (see
    `chat.training_pieces`). With `train_on="all_model_turns"` consecutive
    examples merge when one is a token prefix of the next (the small
    template, or thinking on, with no thoughts in history); otherwise there
    is one example per model turn (with the large template a later turn's
    history renders an earlier turn without the empty thought block serving
    adds).

    Args:
        conversation: a validated Conversation.
        tokenizer: a KerasHub Gemma4Tokenizer or a ChatTokenizer.
        train_on: "last_model_turn" (every model message after the last
            user message: calls, and the answer after their results) or
            "all_model_turns".
        max_length: the most token ids one example may have.
        truncation: "drop" drops an over-long example, "cut_history" removes
            the oldest user/model pairs (keeping the system prompt and the
            trained turn) until it fits and drops it only if it never does.
        template: the chat template variant, "small" (E2B/E4B) or "large"
            (26B-A4B/31B); see `data.template.resolve`.
        enable_thinking: thinking mode (trains the thought of the turn).
        stats: if given, counts `dropped_too_long`, `history_cut` and
            `thoughts_not_trained` (thinking off, the turn has a thought) with
            the sources, for the quality report.

    Returns:
        The examples (empty when dropped).
    """
    if train_on not in TRAIN_ON:
        raise DataError(
            f"data.train_on={train_on!r}: expected one of {', '.join(TRAIN_ON)}"
        )
    if truncation not in TRUNCATION:
        raise DataError(
            f"data.truncation={truncation!r}: expected one of {', '.join(TRUNCATION)}"
        )
    chat.check_template(template)
    tok = as_chat_tokenizer(tokenizer)
    messages = conversation.messages
    turns = [i for i, m in enumerate(messages) if m["role"] in ("model", "assistant")]
    if not turns:
        raise DataError(Problem(conversation.source, "no model turn to train on"))
    if train_on == "last_model_turn":  # every model message after the last user one
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        turns = [t for t in turns if t > (users[-1] if users else -1)]
    kwargs = dict(
        max_length=max_length,
        truncation=truncation,
        template=template,
        enable_thinking=enable_thinking,
    )
    examples = [
        _encode_turn(conversation, t, tok, stats=stats, **kwargs) for t in turns
    ]
    return _merge([e for e in examples if e is not None])


def encode_conversations(
    conversations: Sequence[Conversation], tokenizer: Any, **kwargs: Any
) -> tuple[list[EncodedExample], dict]:
    """Encodes many conversations (text encoded in one batch); returns (examples, stats).

    Takes the keyword arguments of `encode_conversation`. stats holds
    `conversations`, `examples`, `dropped_too_long`, `history_cut`,
    `thoughts_not_trained` (+ the `*_records` lists of sources).
    """
    tok = as_chat_tokenizer(tokenizer)
    thinking = kwargs.get("enable_thinking", False)
    template = chat.check_template(kwargs.get("template"))
    texts = set()
    for conversation in conversations:
        messages = conversation.messages
        texts.update(
            t
            for t, _ in chat.prompt_pieces(
                messages,
                template=template,
                tools=conversation.tools,
                enable_thinking=thinking,
            )
        )
        for message in messages:
            if message["role"] == "model":
                texts.update(
                    t for t, _ in chat.target_pieces(message, enable_thinking=thinking)
                )
    tok.prefetch(list(texts))
    stats = {
        "conversations": len(conversations),
        "dropped_too_long": 0,
        "history_cut": 0,
        "thoughts_not_trained": 0,
    }
    try:
        examples = [
            e
            for c in conversations
            for e in encode_conversation(c, tok, stats=stats, **kwargs)
        ]
    finally:
        tok.clear_cache()
    stats["examples"] = len(examples)
    return examples, stats
