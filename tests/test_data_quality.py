"""Duplicates, holdout split, quality report and the `data check|stats|split` backends."""

import functools
import json
import os

import pytest

from gemma4_keras import data
from gemma4_keras.data import (
    Conversation,
    DataError,
    dedupe,
    format_report,
    quality_report,
    split_holdout,
)

DATA = os.path.join(os.path.dirname(__file__), "data")
PLANTED = f"{DATA}/planted.jsonl"


def _cfg(path=PLANTED, **kwargs):
    fields = dict(path=path, holdout_fraction=0.25, max_length=64, template="small")
    fields.update(kwargs)
    return data.DataSettings(**fields)


def _conv(user, model, source):
    return Conversation(
        [{"role": "user", "content": user}, {"role": "model", "content": model}], source
    )


@functools.cache
def _tokenizer():
    import keras_hub

    from gemma4_keras.testing.tiny import tiny_checkpoint

    return keras_hub.models.Gemma4Tokenizer.from_preset(str(tiny_checkpoint()))


def test_dedupe_exact_and_normalised_keeps_first():
    convs = [
        _conv("Hi there", "Yes", "a:1"),
        _conv("Hi there", "Yes", "a:2"),
        _conv("hi,  THERE!", "yes", "a:3"),
        _conv("Other", "No", "a:4"),
    ]
    kept, stats = dedupe(convs)
    assert [c.source for c in kept] == ["a:1", "a:4"]
    assert stats["exact"] == 1 and stats["normalised"] == 1 and stats["removed"] == 2
    assert stats["duplicates"] == [
        {"source": "a:2", "duplicate_of": "a:1", "kind": "exact"},
        {"source": "a:3", "duplicate_of": "a:1", "kind": "normalised"},
    ]


def test_split_is_deterministic_by_content_and_order_free():
    convs = [_conv(f"question {i}", str(i % 3), f"f:{i}") for i in range(200)]
    train, holdout = split_holdout(convs)
    assert len(holdout) == 20 and len(train) == 180
    train2, holdout2 = split_holdout(list(reversed(convs)))
    assert {c.source for c in holdout2} == {c.source for c in holdout}
    assert [c.source for c in train] == sorted(
        (c.source for c in train), key=lambda s: int(s[2:])
    )  # order kept
    _, other_seed = split_holdout(convs, seed=1)
    assert {c.source for c in other_seed} != {c.source for c in holdout}
    assert split_holdout(convs[:5], 0.1)[1] and not split_holdout(convs[:5], 0.0)[1]


def test_label_distribution_and_imbalance_warning():
    convs = [_conv(f"review {i}", "Positive", f"r:{i}") for i in range(30)] + [
        _conv(f"bad {i}", "Negative", f"n:{i}") for i in range(3)
    ]
    report = quality_report(
        convs, None, {"records": 33, "valid": 33, "skipped": 0, "skipped_records": []}
    )
    assert report["labels"]["counts"] == {"Positive": 30, "Negative": 3}
    assert "label imbalance" in report["labels"]["warning"]
    assert any("label imbalance" in w for w in report["warnings"])
    free_text = [
        _conv(f"q{i}", f"a long free-form answer number {i}", f"x:{i}")
        for i in range(10)
    ]
    assert quality_report(free_text, None, {})["labels"] is None


def test_check_planted_problems_fails_in_raise_mode_with_each_line():
    with pytest.raises(DataError) as info:
        data.check(_cfg())
    message = str(info.value)
    assert f"{PLANTED}:2: malformed JSON" in message
    assert f"{PLANTED}:5: message 1: unknown role 'bot'" in message
    assert f"{PLANTED}:6: message 1 (model): empty content" in message
    duplicates = info.value.report["duplicates"]["duplicates"]
    assert {
        "source": f"{PLANTED}:4",
        "duplicate_of": f"{PLANTED}:1",
        "kind": "exact",
    } in duplicates
    assert {
        "source": f"{PLANTED}:7",
        "duplicate_of": f"{PLANTED}:3",
        "kind": "normalised",
    } in duplicates


def test_check_planted_problems_passes_in_skip_mode_and_reports_them():
    report = data.check(_cfg(on_error="skip"), tokenizer=_tokenizer())
    json.dumps(report)  # JSON-serialisable
    assert report["read"]["records"] == 8 and report["read"]["skipped"] == 3
    assert [p["source"] for p in report["read"]["skipped_records"]] == [
        f"{PLANTED}:{n}" for n in (2, 5, 6)
    ]
    assert report["duplicates"]["removed"] == 2
    assert report["conversations"]["count"] == 3
    tokens = report["tokens"]
    assert (
        tokens["examples"] == 3
        and tokens["percentiles"]["p50"] > 10
        and tokens["max_length"] == 64
    )
    table = format_report(report)
    for expected in (
        f"{PLANTED}:2: malformed JSON",
        f"{PLANTED}:4: exact duplicate of {PLANTED}:1",
        "p95=",
        "WARNING: 3 bad records skipped",
    ):
        assert expected in table


def test_prepare_gives_examples_split_and_truncation_counts():
    cfg = _cfg(path=f"{DATA}/messages.jsonl", holdout_fraction=0.0, max_length=40)
    prepared = data.prepare(cfg, _tokenizer())
    report = prepared.report
    assert report["split"] == {"train": 3, "holdout": 0, "fraction": 0.0, "seed": 0}
    assert (
        report["truncation"]["policy"] == "drop"
        and report["truncation"]["dropped_too_long"] == 2
    )
    assert len(prepared.train_examples) == 1 and report["tokens"]["max"] <= 40
    assert "2 examples dropped as longer than max_length" in report["warnings"]
    prepared = data.prepare(_cfg(on_error="skip"), _tokenizer())
    assert len(prepared.train_examples) == 2 and len(prepared.holdout_examples) == 1
    assert data.stats(_cfg())["read"]["skipped"] == 3  # stats never fails


def test_split_writes_files_that_read_back(tmp_path):
    paths = data.split(
        _cfg(path=f"{DATA}/messages.jsonl", holdout_fraction=0.3), str(tmp_path)
    )
    train, _ = data.load_conversations(_cfg(path=paths["train"]))
    holdout, _ = data.load_conversations(_cfg(path=paths["holdout"]))
    assert len(train) == 2 and len(holdout) == 1
    assert json.load(open(paths["report"]))["split"]["holdout"] == 1
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
