"""Deterministic, resumable batches of packed rows (plain numpy).

Why numpy and not tf.data: a fine-tuning set fits in memory once tokenized;
packing is Python either way; a pure function of (seed, step) gives exact
resumption at any step in O(1) without replaying earlier batches, with no TF
runtime threads competing with JAX for the host. `BatchStream.batch(step)`
is a dict of arrays; the training loop (`training/train.py`) asks for the
steps it runs.

Rows are grouped once (packing is deterministic); each epoch shuffles the
rows with `np.random.default_rng([seed, epoch])`. Batch k is rows
perm(epoch)[j*B:(j+1)*B] with epoch, j = divmod(k, steps_per_epoch).

Multi-host: B is the global batch. Every process computes the same
permutation and materialises only its own rows of each batch
(`process_rows`, e.g. rows 2..3 of 4 on the second of two hosts); the token
counts of the whole batch (`counts`) come from per-row totals, so the loss
normaliser is the global one without exchanging data.

    batch k (B=4)   rows perm[4k:4k+4] = [7, 2, 9, 0]
    process 0       process_rows=[0, 1] -> rows 7, 2
    process 1       process_rows=[2, 3] -> rows 9, 0
"""

from collections.abc import Sequence

import numpy as np

from gemma4_keras.data import packing as packing_lib
from gemma4_keras.data.records import DataError, Problem
from gemma4_keras.data.tokenize import EncodedExample


class BatchStream:
    """Batches of `[batch_size, seq_len]` arrays; `batch(step)` is random access.

    Each batch is a dict with `token_ids`, `target_ids`, `loss_weights`
    (float32), `segment_ids`, `positions` and `padding_mask` (int32); with
    images or audio, their tower inputs too, padded to the same image and
    clip counts in every batch (`packing.MediaSlots`: the most any row of
    the stream holds), so a training step compiles once.
    """

    def __init__(
        self,
        examples: Sequence[EncodedExample],
        rows: Sequence[packing_lib.Row],
        *,
        seq_len: int,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_remainder: bool = True,
        process_rows: Sequence[int] | None = None,
    ):
        if batch_size < 1 or seq_len < 1:
            raise DataError(
                f"batch_size={batch_size} and seq_len={seq_len} must be positive"
            )
        n = len(rows) // batch_size if drop_remainder else -(-len(rows) // batch_size)
        if n == 0:
            raise DataError(
                f"{len(rows)} rows make no full batch of {batch_size}; lower the "
                "batch size (train.batch_size) or give more data (data.path)"
            )
        self.examples, self.rows = examples, list(rows)
        self.seq_len, self.batch_size, self.steps_per_epoch = seq_len, batch_size, n
        self.shuffle, self.seed = shuffle, seed
        self.media_slots = packing_lib.MediaSlots.of(self.rows, examples)
        self._perm_epoch, self._perm = -1, None
        self.process_rows = None
        if process_rows is not None:
            picked = np.asarray(process_rows, np.int64)
            if picked.size == 0 or picked.min() < 0 or picked.max() >= batch_size:
                raise DataError(
                    f"process_rows={list(picked)} must be rows of the batch of "
                    f"{batch_size}"
                )
            self.process_rows = picked
        # Per row: trained targets and real input positions (the whole batch's
        # counts without materialising other processes' rows).
        self._row_trained = np.array(
            [sum(int(examples[i].loss_mask[1:].sum()) for i in r.members) for r in rows]
            + [0],
            np.int64,
        )
        self._row_tokens = np.array(
            [sum(len(examples[i]) - 1 for i in r.members) for r in rows] + [0],
            np.int64,
        )

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            n = len(self.rows)
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(n) if self.shuffle else np.arange(n)
            self._perm_epoch = epoch
        return self._perm

    def _picked(self, step: int) -> np.ndarray:
        """Row indices of the global batch `step`; len(rows) marks padding."""
        epoch, j = divmod(step, self.steps_per_epoch)
        picked = self._permutation(epoch)[
            j * self.batch_size : (j + 1) * self.batch_size
        ]
        pad = self.batch_size - len(picked)  # drop_remainder=False
        return np.concatenate([picked, np.full(pad, len(self.rows), np.int64)])

    def counts(self, step: int) -> tuple[int, int]:
        """(trained target tokens, real input tokens) of the global batch `step`."""
        picked = self._picked(step)
        return int(self._row_trained[picked].sum()), int(self._row_tokens[picked].sum())

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the batch at global step `step`.

        All rows without `process_rows`. Epochs follow one another.

        Raises:
            DataError: the whole batch has no trained token.
        """
        picked = self._picked(step)
        if self.counts(step)[0] == 0:
            sources = [
                self.examples[i].source
                for r in picked
                if r < len(self.rows)
                for i in self.rows[r].members
            ]
            raise DataError(
                [
                    Problem(
                        s, f"batch {step} has no trained token (all loss weights are 0)"
                    )
                    for s in sources
                ]
            )
        if self.process_rows is not None:
            picked = picked[self.process_rows]
        empty = packing_lib.Row(())
        rows = [self.rows[r] if r < len(self.rows) else empty for r in picked]
        return packing_lib.materialise(
            rows, self.examples, self.seq_len, self.media_slots
        )


def build_dataset(
    examples: Sequence[EncodedExample],
    *,
    seq_len: int,
    batch_size: int,
    packing: bool = True,
    shuffle: bool = True,
    seed: int = 0,
    drop_remainder: bool = True,
    process_rows: Sequence[int] | None = None,
) -> BatchStream:
    """Batches for training, packed or one example per row.

    Args:
        examples: encoded examples (each at most seq_len + 1 tokens).
        seq_len: row length (inputs are ids[:-1], so data.max_length works).
        batch_size: rows per batch.
        packing: pack several examples per row (else pad each to seq_len).
        shuffle: reshuffle rows every epoch (seeded).
        seed: shuffle seed.
        drop_remainder: drop the last partial batch of each epoch (else pad
            it with empty rows).
        process_rows: the rows of each batch this process feeds (multi-host,
            `training.distributed.process_rows`); None = all.

    Returns:
        A BatchStream (`batch(k)` for any global step k, `steps_per_epoch`).
    """
    lengths = packing_lib.input_lengths(examples, seq_len)
    if packing:
        rows = packing_lib.pack_rows(lengths, seq_len)
    else:
        rows = packing_lib.single_rows(len(examples))
    return BatchStream(
        examples,
        rows,
        seq_len=seq_len,
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        drop_remainder=drop_remainder,
        process_rows=process_rows,
    )
