"""`gemma4-keras data render`: exactly what the model is trained on.

For each training example (the training split, in file order) one JSON line:

    {"source": "train.jsonl:3", "template": "small",
     "text": "<bos><|turn>user\\nHi<turn|>\\n<|turn>model\\nHello<turn|>",
     "trained": [[42, 54]],
     "generation_prompt": "<bos><|turn>user\\nHi<turn|>\\n<|turn>model\\n"}

`text` is the training sequence with special tokens spelled out, `trained`
the `[start, end)` character spans that carry loss, `generation_prompt` what
serving shows before the last trained turn. Text and spans are decoded from
the token ids and loss mask that training itself uses (`encode_conversation`),
not re-rendered, so what is shown is what is trained. An image or audio
clip shows as its begin marker, one placeholder and its end marker
(`<|image><|image|><image|>`; its soft tokens are counted in `media`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from typing import IO, Any

import numpy as np

from gemma4_keras import atomic, outputs
from gemma4_keras.data import commands, media
from gemma4_keras.data import template as template_lib
from gemma4_keras.data.tokenize import EncodedExample, encode_conversation
from gemma4_keras.settings import DataSettings

_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SPACE = "\u2581"  # SentencePiece's visible space
HIGHLIGHT, RESET = "\033[1;32m", "\033[0m"


def _token_bytes(piece: str) -> bytes:
    byte = _BYTE.match(piece)
    if byte:
        return bytes([int(byte.group(1), 16)])
    return piece.replace(_SPACE, " ").encode("utf-8")


def decode_with_spans(
    token_ids: Sequence[int], loss_mask: Sequence[bool], id_to_token: Any
) -> tuple[str, list[list[int]]]:
    """Text of `token_ids` and the character spans of the runs where the mask is set.

    Args:
        token_ids: ids of one training sequence.
        loss_mask: True where the token carries loss.
        id_to_token: maps an id to its vocabulary piece (SentencePiece style:
            `▁` for a space, `<0xNN>` byte-fallback pieces).

    Returns:
        (text, [[start, end), ...]).

    Example (ids from a hypothetical vocabulary):
        ids     2       105       9        106       12     106
        pieces  <bos>   <|turn>   model\\n  ...       Hi     <turn|>
        mask    0       0         0        0         1      1
        -> spans [[start of "Hi", end of "<turn|>"]]
    """
    data, offsets = b"", []
    for i in token_ids:
        offsets.append(len(data))
        data += _token_bytes(id_to_token(int(i)))
    offsets.append(len(data))
    text = data.decode("utf-8", errors="replace")

    def char(b: int) -> int:
        return len(data[:b].decode("utf-8", errors="replace"))

    mask = np.asarray(loss_mask, bool)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    spans = [
        [char(offsets[s]), char(offsets[e])] for s, e in zip(edges[::2], edges[1::2])
    ]
    return text, spans


def collapse_media(
    token_ids: np.ndarray, loss_mask: np.ndarray, soft_ids: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Each run of one soft-token id shortened to a single token, for display.

    Example (<|image|> = 108):
        ids   2 107 108 108 108 109 9   ->   2 107 108 109 9
    """
    ids = np.asarray(token_ids)
    keep = np.ones(len(ids), bool)
    repeat = (ids[1:] == ids[:-1]) & np.isin(ids[1:], list(soft_ids))
    keep[1:] = ~repeat
    return ids[keep], np.asarray(loss_mask)[keep]


def example_record(
    example: EncodedExample,
    id_to_token: Any,
    template: str,
    soft_ids: Sequence[int] = (),
) -> dict[str, Any]:
    """The JSON record of one encoded example (see the module docstring).

    An image or audio clip shows as `<|image><|image|><image|>` (begin
    marker, one placeholder, end marker); `media` lists each with its soft
    tokens (`soft_ids` are the placeholder ids whose runs are shortened).
    """
    ids, mask = collapse_media(example.token_ids, example.loss_mask, soft_ids)
    text, spans = decode_with_spans(ids, mask, id_to_token)
    prompt = text[: spans[-1][0]] if spans else text
    record = {
        "source": example.source,
        "template": template,
        "text": text,
        "trained": spans,
        "generation_prompt": prompt,
    }
    if example.media:
        record["media"] = [
            {"type": r["type"], "source": r["source"], "soft_tokens": r["soft_tokens"]}
            for r in example.media
        ]
    return record


def render_records(
    data_cfg: Any,
    tokenizer: Any,
    chat_template: template_lib.ChatTemplate,
    *,
    limit: int = 0,
) -> Iterator[dict[str, Any]]:
    """Records of the training examples, as a run encodes them.

    Args:
        data_cfg: the run's data settings (`config_lib.data_settings(config.data)`),
            or what `DataSettings.of` takes; `template` comes from `chat_template`.
        tokenizer: a KerasHub Gemma4Tokenizer.
        chat_template: the run's template (`models.chat_template`); when it
            carries the checkpoint's `chat_template.jinja`, the conversations
            are checked against it first (TemplateError on a difference).
        limit: the most examples to yield; 0 = all.

    Yields:
        One dict per training example.
    """
    settings = dataclasses.replace(
        DataSettings.of(data_cfg), template=chat_template.variant
    )
    train, _, _, _ = commands.read_and_split(settings)
    template_lib.check_conversations(
        train, chat_template, enable_thinking=bool(settings.enable_thinking)
    )
    kwargs = commands._encode_kwargs(settings)
    soft_ids = [int(tokenizer.token_to_id(t)) for t in media.PLACEHOLDER.values()]
    count = 0
    for conversation in train:
        for example in encode_conversation(conversation, tokenizer, **kwargs):
            yield example_record(
                example, tokenizer.id_to_token, chat_template.variant, soft_ids
            )
            count += 1
            if limit and count >= limit:
                return


def highlight(text: str, spans: Sequence[Sequence[int]]) -> str:
    """`text` with the trained spans in bold green (ANSI), for a terminal."""
    out, last = [], 0
    for start, end in spans:
        out += [text[last:start], HIGHLIGHT, text[start:end], RESET]
        last = end
    return "".join(out + [text[last:]])


def write_records(
    records: Iterator[dict[str, Any]],
    out: IO[str] | None = None,
    terminal: IO[str] | None = None,
) -> int:
    """Writes JSON lines to `out` (default stdout); returns how many.

    When `terminal` is given (stdout is a terminal), each example's text is
    also printed there with the trained spans highlighted.
    """
    out = out or sys.stdout
    n = 0
    for record in records:
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        if terminal is not None:
            terminal.write(
                f"--- {record['source']} ({record['template']} template; "
                "trained text highlighted)\n"
                + highlight(record["text"], record["trained"])
                + "\n"
            )
        n += 1
    return n


def render(
    data_cfg: Any,
    tokenizer: Any,
    chat_template: template_lib.ChatTemplate,
    *,
    limit: int = 0,
    out: str | None = None,
) -> int:
    """`gemma4-keras data render`: JSON lines to `out` (a new file) or stdout.

    `out` may be neither an input nor an existing file (`outputs.check`).
    On a terminal the texts are also printed with the trained spans
    highlighted. Returns the number of examples written.
    """
    if out:  # before any work: never over the data, never over another file
        outputs.check(out, inputs=outputs.data_inputs(data_cfg))
    records = render_records(data_cfg, tokenizer, chat_template, limit=limit)
    terminal = sys.stdout if sys.stdout.isatty() else None
    if not out:
        return write_records(records, sys.stdout, terminal)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with atomic.atomic_open(out) as f:
        n = write_records(records, f, terminal)
    print(f"wrote {n} examples to {out}", file=sys.stderr)
    return n
