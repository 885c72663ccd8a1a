"""Packing and the batch pipeline, on fake token ids."""

import numpy as np
import pytest

from gemma4_keras.data import DataError, EncodedExample, build_dataset, pack_examples
from gemma4_keras.data import packing as packing_lib


def _example(n, seed, source=None):
    rng = np.random.default_rng(seed)
    ids = np.concatenate([[2], rng.integers(10, 1000, n - 1)]).astype(np.int32)
    mask = np.zeros(n, bool)
    mask[rng.integers(1, n) :] = True
    mask[-1] = True
    return EncodedExample(ids, mask, source or f"ex{seed}")


EXAMPLES = [
    _example(n, i) for i, n in enumerate([5, 9, 3, 17, 8, 2, 12, 6, 4, 7, 10, 16])
]


def test_docstring_example():
    a = EncodedExample(
        np.array([2, 5, 6, 7], np.int32), np.array([0, 0, 1, 1], bool), "a"
    )
    b = EncodedExample(np.array([2, 8, 9], np.int32), np.array([0, 0, 1], bool), "b")
    (row,) = pack_examples([a, b], seq_len=8)
    assert row["token_ids"].tolist() == [2, 5, 6, 2, 8, 0, 0, 0]
    assert row["target_ids"].tolist() == [5, 6, 7, 8, 9, 0, 0, 0]
    assert row["loss_weights"].tolist() == [0, 1, 1, 0, 1, 0, 0, 0]
    assert row["segment_ids"].tolist() == [1, 1, 1, 2, 2, 0, 0, 0]
    assert row["positions"].tolist() == [0, 1, 2, 0, 1, 0, 0, 0]
    assert row["padding_mask"].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]


def _unpack(row):
    """Per segment: (inputs, targets, weights, positions)."""
    out = []
    for s in range(1, row["segment_ids"].max() + 1):
        sel = row["segment_ids"] == s
        idx = np.flatnonzero(sel)
        assert (np.diff(idx) == 1).all()  # contiguous
        out.append(
            tuple(
                row[k][sel].tolist()
                for k in ("token_ids", "target_ids", "loss_weights", "positions")
            )
        )
    return out


def test_packing_keeps_every_example_intact_and_separated():
    seq_len = 20
    rows = pack_examples(EXAMPLES, seq_len)
    assert len(rows) < len(EXAMPLES)  # several examples share a row
    seen = []
    for row in rows:
        for name in packing_lib.FIELDS:
            assert row[name].shape == (seq_len,)
        assert (
            row["token_ids"].dtype == np.int32
            and row["loss_weights"].dtype == np.float32
        )
        pad = row["segment_ids"] == 0
        assert not row["token_ids"][pad].any() and not row["loss_weights"][pad].any()
        assert (row["padding_mask"] == (row["segment_ids"] > 0)).all()
        seen += _unpack(row)
    expected = [
        (
            e.token_ids[:-1].tolist(),
            e.token_ids[1:].tolist(),
            e.loss_mask[1:].astype(float).tolist(),
            list(range(len(e) - 1)),
        )
        for e in EXAMPLES
    ]
    assert sorted(seen) == sorted(expected)


def test_packing_is_deterministic_and_fills_rows():
    lengths = [len(e) - 1 for e in EXAMPLES]
    rows = packing_lib.pack_rows(lengths, 20)
    assert [r.members for r in rows] == [
        r.members for r in packing_lib.pack_rows(lengths, 20)
    ]
    assert sorted(i for r in rows for i in r.members) == list(range(len(EXAMPLES)))
    assert all(sum(lengths[i] for i in r.members) <= 20 for r in rows)
    assert len(rows) == -(-sum(lengths) // 20)  # optimal for these lengths


def test_too_long_example_is_named():
    with pytest.raises(DataError, match=r"ex3: 17 tokens do not fit seq_len \+ 1 = 9"):
        pack_examples(EXAMPLES[:4], seq_len=8)


def test_batches_shape_determinism_and_epoch_reshuffle():
    stream = build_dataset(EXAMPLES, seq_len=20, batch_size=2, seed=3)
    batch = stream.batch(0)
    assert set(batch) == set(packing_lib.FIELDS)
    assert all(v.shape == (2, 20) for v in batch.values())
    again = build_dataset(EXAMPLES, seq_len=20, batch_size=2, seed=3)
    for k in range(3 * stream.steps_per_epoch):
        for name in batch:
            np.testing.assert_array_equal(stream.batch(k)[name], again.batch(k)[name])
    spe = stream.steps_per_epoch
    epoch0 = np.concatenate([stream.batch(k)["token_ids"] for k in range(spe)])
    epoch1 = np.concatenate([stream.batch(k)["token_ids"] for k in range(spe, 2 * spe)])
    assert not np.array_equal(epoch0, epoch1)  # reshuffled
    other = build_dataset(EXAMPLES, seq_len=20, batch_size=2, seed=4)
    assert not all(
        np.array_equal(stream.batch(k)["token_ids"], other.batch(k)["token_ids"])
        for k in range(spe)
    )


def test_resume_at_step_k_gives_the_same_batches():
    full = build_dataset(EXAMPLES, seq_len=20, batch_size=2, seed=0)
    steps = range(3 * full.steps_per_epoch)
    full_batches = [full.batch(k) for k in steps]  # served in order
    resumed = build_dataset(EXAMPLES, seq_len=20, batch_size=2, seed=0)
    for k in reversed(steps[5:]):  # a fresh stream, any order, from step 5
        np.testing.assert_array_equal(
            full_batches[k]["target_ids"], resumed.batch(k)["target_ids"]
        )


def test_no_packing_one_example_per_row_and_remainder():
    stream = build_dataset(
        EXAMPLES,
        seq_len=20,
        batch_size=5,
        packing=False,
        shuffle=False,
        drop_remainder=False,
    )
    assert stream.steps_per_epoch == 3
    last = stream.batch(2)
    assert last["segment_ids"].max(axis=1).tolist() == [
        1,
        1,
        0,
        0,
        0,
    ]  # 2 rows + 3 empty
    np.testing.assert_array_equal(
        stream.batch(0)["token_ids"][0, :4], EXAMPLES[0].token_ids[:4]
    )
    assert (
        build_dataset(EXAMPLES, seq_len=20, batch_size=5, packing=False).steps_per_epoch
        == 2
    )


def test_all_masked_batch_is_an_error_naming_the_examples():
    dead = [
        EncodedExample(
            np.array([2, 7, 8], np.int32), np.zeros(3, bool), f"data.jsonl:{i}"
        )
        for i in (4, 9)
    ]
    stream = build_dataset(dead, seq_len=8, batch_size=1, packing=True)
    with pytest.raises(
        DataError,
        match=r"data.jsonl:4: batch 0 has no trained token.*\n.*\n  data.jsonl:9",
    ):
        stream.batch(0)


def test_too_few_rows_for_a_batch():
    with pytest.raises(DataError, match="make no full batch of 64"):
        build_dataset(EXAMPLES, seq_len=20, batch_size=64)
