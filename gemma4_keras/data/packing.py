"""Shift, pack and pad examples into fixed-length rows.

Each example is shifted on its own (inputs = ids[:-1], targets = ids[1:],
weights = mask[1:]) before packing, so no target crosses an example boundary.
A row holds one or more examples: `segment_ids` numbers them 1..k (0 is
padding) and `positions` restart at 0 for each; the model must not attend
across segments.

Worked example (seq_len 8; example A = ids [2 5 6 7], mask [0 0 1 1];
example B = ids [2 8 9], mask [0 0 1]):

    token_ids     2 5 6   2 8   0 0 0
    target_ids    5 6 7   8 9   0 0 0
    loss_weights  0 1 1   0 1   0 0 0
    segment_ids   1 1 1   2 2   0 0 0
    positions     0 1 2   0 1   0 0 0
    padding_mask  1 1 1   1 1   0 0 0

Images and audio (examples with `media`): each row also carries the tower
inputs of its members' images and clips, in token order, padded to the
same counts in every batch (`MediaSlots`, the most any row holds) so the
step compiles once: `pixel_values` [rows, images, patches, 3 * patch**2],
`pixel_position_ids` [rows, images, patches, 2] (-1: no patch; an empty
slot is all -1 and gives no soft token), `audio_features` [rows, clips,
frames, 128] and `audio_mask` [rows, clips, frames]. The model reads them
row-major (`Gemma4LoraModel.call`): the k-th soft token of a row takes the
k-th valid tower output, packing or not.
"""

import bisect
import dataclasses
from collections.abc import Sequence

import numpy as np

from gemma4_keras.data import media as media_lib
from gemma4_keras.data.records import DataError, Problem
from gemma4_keras.data.tokenize import EncodedExample

FIELDS = (
    "token_ids",
    "target_ids",
    "loss_weights",
    "segment_ids",
    "positions",
    "padding_mask",
)
# The tower inputs of rows with images or audio (`media_inputs`).
MEDIA_FIELDS = ("pixel_values", "pixel_position_ids", "audio_features", "audio_mask")


@dataclasses.dataclass
class Row:
    """The examples (indices into the example list) that share one row."""

    members: tuple[int, ...]


def input_lengths(examples: Sequence[EncodedExample], seq_len: int) -> np.ndarray:
    """Positions each example takes after the shift (len - 1); checks they fit."""
    lengths = np.array([len(e) - 1 for e in examples], dtype=np.int64)
    too_long = [
        Problem(
            examples[i].source,
            f"{lengths[i] + 1} tokens do not fit seq_len + 1 = {seq_len + 1}",
        )
        for i in np.flatnonzero(lengths > seq_len)
    ]
    too_short = [
        Problem(examples[i].source, "an example needs at least 2 tokens")
        for i in np.flatnonzero(lengths < 1)
    ]
    if too_long or too_short:
        raise DataError(too_long + too_short)
    return lengths


def pack_rows(lengths: Sequence[int], seq_len: int) -> list[Row]:
    """Groups examples into rows by best-fit decreasing (deterministic).

    Example:
        >>> [r.members for r in pack_rows([5, 3, 4, 2], seq_len=8)]
        [(0, 1), (2, 3)]
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row index), sorted
    for i in order:
        slot = bisect.bisect_left(free, (lengths[i], -1))
        if slot < len(free):
            space, r = free.pop(slot)
        else:
            space, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if space - lengths[i] > 0:
            bisect.insort(free, (space - lengths[i], r))
    return [Row(tuple(sorted(members))) for members in rows]


def single_rows(n: int) -> list[Row]:
    """One example per row (no packing)."""
    return [Row((i,)) for i in range(n)]


@dataclasses.dataclass(frozen=True)
class MediaSlots:
    """Images and clips per row, and log-mel frames per clip, every batch holds."""

    images: int = 0
    clips: int = 0
    frames: int = 0

    @classmethod
    def of(cls, rows: Sequence[Row], examples: Sequence[EncodedExample]):
        """The most any row of `rows` needs (0s: no media, no media arrays)."""
        return cls.of_records(_row_records(rows, examples))

    @classmethod
    def of_records(cls, per_row: Sequence[Sequence[dict]]):
        """The most any row needs; `per_row`: each row's media records, in order."""
        images = clips = frames = 0
        for records in per_row:
            kinds = [m["type"] for m in records]
            images = max(images, kinds.count(media_lib.IMAGE))
            clips = max(clips, kinds.count(media_lib.AUDIO))
            for m in records:
                if m["type"] == media_lib.AUDIO:
                    frames = max(frames, media_lib.audio_frames(int(m["samples"])))
        return cls(images, clips, frames)


def _row_records(rows: Sequence[Row], examples: Sequence[EncodedExample]) -> list:
    return [[m for i in row.members for m in examples[i].media] for row in rows]


def media_inputs(
    per_row: Sequence[Sequence[dict]], slots: MediaSlots | None = None
) -> dict[str, np.ndarray]:
    """The tower inputs of rows (module docstring), read from the files.

    `per_row`: each row's media records in token order; `slots`: the slots
    to pad to (None: the most these rows need).
    """
    slots = MediaSlots.of_records(per_row) if slots is None else slots
    out = {}
    n = len(per_row)
    if slots.images:  # one checkpoint's settings for every image
        first = next(r for rs in per_row for r in rs if r["type"] == media_lib.IMAGE)
        s = media_lib.settings_of(first)
        out["pixel_values"] = np.zeros(
            (n, slots.images, s.max_patches, 3 * s.patch_size**2), np.float32
        )
        out["pixel_position_ids"] = np.full(
            (n, slots.images, s.max_patches, 2), -1, np.int32
        )
    if slots.clips:
        out["audio_features"] = np.zeros(
            (n, slots.clips, slots.frames, media_lib.PROCESSOR.feature_size),
            np.float32,
        )
        out["audio_mask"] = np.zeros((n, slots.clips, slots.frames), bool)
    for r, records in enumerate(per_row):
        image = clip = 0
        for record in records:
            if record["type"] == media_lib.IMAGE:
                pixels, positions = media_lib.image_features(record)
                out["pixel_values"][r, image] = pixels
                out["pixel_position_ids"][r, image] = positions
                image += 1
            else:
                features, mask = media_lib.audio_features(record)
                out["audio_features"][r, clip, : len(mask)] = features
                out["audio_mask"][r, clip, : len(mask)] = mask
                clip += 1
    return out


def materialise(
    rows: Sequence[Row],
    examples: Sequence[EncodedExample],
    seq_len: int,
    media: MediaSlots | None = None,
) -> dict[str, np.ndarray]:
    """Builds the [len(rows), seq_len] arrays of the rows (see module docstring).

    `media`: the image / clip slots of every batch (`MediaSlots.of` over all
    rows); None reads them off `rows`.
    """
    out = {name: np.zeros((len(rows), seq_len), np.int32) for name in FIELDS}
    out["loss_weights"] = np.zeros((len(rows), seq_len), np.float32)
    for r, row in enumerate(rows):
        start = 0
        for segment, i in enumerate(row.members, 1):
            ids, mask = examples[i].token_ids, examples[i].loss_mask
            end = start + len(ids) - 1
            if end > seq_len:
                raise DataError(
                    Problem(examples[i].source, f"does not fit a row of {seq_len}")
                )
            out["token_ids"][r, start:end] = ids[:-1]
            out["target_ids"][r, start:end] = ids[1:]
            out["loss_weights"][r, start:end] = mask[1:]
            out["segment_ids"][r, start:end] = segment
            out["positions"][r, start:end] = np.arange(end - start)
            start = end
    out["padding_mask"] = (out["segment_ids"] > 0).astype(np.int32)
    out.update(media_inputs(_row_records(rows, examples), media))
    return out


def pack_examples(
    examples: Sequence[EncodedExample], seq_len: int
) -> list[dict[str, np.ndarray]]:
    """Packs examples into rows of `seq_len`; each row is a dict of 1-D arrays.

    Raises:
        DataError: an example longer than seq_len + 1 tokens (named).
    """
    rows = pack_rows(input_lengths(examples, seq_len), seq_len)
    arrays = materialise(rows, examples, seq_len)
    return [{name: arrays[name][r] for name in FIELDS} for r in range(len(rows))]
