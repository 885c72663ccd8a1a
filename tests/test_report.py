"""Tests for gemma4_keras.eval.report: files written, table content, valid PNGs."""

import doctest
import json
import logging
import os

import pytest

from gemma4_keras.eval import metrics, report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

REFERENCES = ["cat", "cat", "cat", "dog", "dog", "bird"]
BASE_PREDICTIONS = ["dog", "cat", "dog", "bird", "bird", "fish"]
TUNED_PREDICTIONS = ["cat", "cat", "dog", "dog", "dog", "bird"]
PROMPTS = [f"What animal is in picture {i}?" for i in range(len(REFERENCES))]

TRAIN_LOG = "epoch,learning_rate,loss,val_loss\n0,1e-4,2.5,2.6\n1,1e-4,1.8,2.0\n2,5e-5,1.2,1.7\n3,1e-5,0.9,1.6\n"


def _results():
    return {
        "base": metrics.compute_metrics("classification", REFERENCES, BASE_PREDICTIONS),
        "finetuned": metrics.compute_metrics(
            "classification", REFERENCES, TUNED_PREDICTIONS
        ),
    }


def _examples():
    return {
        model: [
            {"prompt": p, "reference": r, "prediction": pred}
            for p, r, pred in zip(PROMPTS, REFERENCES, predictions)
        ]
        for model, predictions in [
            ("base", BASE_PREDICTIONS),
            ("finetuned", TUNED_PREDICTIONS),
        ]
    }


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5_000  # an empty canvas would be far smaller


def write_full_report(out_dir):
    log = os.path.join(out_dir, "train_log.csv")
    os.makedirs(out_dir, exist_ok=True)
    with open(log, "w") as handle:
        handle.write(TRAIN_LOG)
    return report.write_eval_report(
        out_dir, results=_results(), examples=_examples(), train_log_csv=log
    )


def test_docstring_examples():
    failures, _ = doctest.testmod(report)
    assert failures == 0


def test_write_eval_report_writes_every_file(tmp_path):
    paths = write_full_report(tmp_path)
    assert set(paths) == {
        "json",
        "markdown",
        "predictions",
        "loss_curves",
        "confusion_matrix_base",
        "confusion_matrix_finetuned",
    }
    for path in paths.values():
        assert path.parent == tmp_path and path.exists()
    for key in ("loss_curves", "confusion_matrix_base", "confusion_matrix_finetuned"):
        _assert_png(paths[key])
    # Atomic writes leave no temporary files behind.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_markdown_has_table_with_delta(tmp_path):
    markdown = write_full_report(tmp_path)["markdown"].read_text()
    # base gets 1 of 6 right (the second cat), finetuned 5 of 6 (all but the
    # third cat) -> delta 4/6.
    assert "| metric | base | finetuned | delta (finetuned - base) |" in markdown
    assert "| **accuracy** | 0.1667 | 0.8333 | +0.6667 |" in markdown
    assert "| num_examples | 6 | 6 |  |" in markdown
    assert "## Per-class scores" in markdown
    assert "![Confusion matrix: finetuned](confusion_matrix_finetuned.png)" in markdown
    assert "(loss_curves.png)" in markdown


def test_json_report_round_trips(tmp_path):
    data = json.loads(write_full_report(tmp_path)["json"].read_text())
    assert data["headline_metric"] == "accuracy"
    # Rows bird, cat, dog; columns bird, cat, dog, (other).
    assert data["models"]["finetuned"]["confusion_matrix"] == [
        [1, 0, 0, 0],
        [0, 2, 1, 0],
        [0, 0, 2, 0],
    ]
    assert data["deltas"]["accuracy"] == pytest.approx(4 / 6)
    assert "num_examples" not in data["deltas"]


def test_predictions_jsonl_one_row_per_example(tmp_path):
    lines = write_full_report(tmp_path)["predictions"].read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == len(REFERENCES)
    assert rows[0] == {
        "prompt": PROMPTS[0],
        "reference": "cat",
        "prediction_base": "dog",
        "prediction_finetuned": "cat",
    }


def test_table_without_base_has_no_delta_column():
    table = report.format_metrics_table(
        {"a": {"task_type": "generation", "bleu": 10.0, "rougeL": 0.5}}
    )
    assert "delta" not in table
    # The headline metric (rougeL for generation) comes first, in bold.
    assert table.splitlines()[2] == "| **rougeL** | 0.5000 |"


def test_missing_metric_in_one_model_shows_dash():
    table = report.format_metrics_table(
        {
            "base": {"json_parse_rate": 0.5},
            "finetuned": {"json_parse_rate": 1.0, "schema_compliance": 0.5},
        }
    )
    assert "| schema_compliance | - | 0.5000 |  |" in table


def test_missing_or_lossless_train_log_is_skipped(tmp_path, caplog):
    results = {"finetuned": {"task_type": "extraction", "exact_match": 1.0}}
    with caplog.at_level(logging.WARNING):
        paths = report.write_eval_report(
            tmp_path, results=results, train_log_csv=tmp_path / "absent.csv"
        )
    assert "loss_curves" not in paths
    assert "No training log" in caplog.text
    log = tmp_path / "log.csv"
    log.write_text("epoch,accuracy\n0,0.5\n")
    paths = report.write_eval_report(tmp_path, results=results, train_log_csv=log)
    assert "loss_curves" not in paths
    assert not (tmp_path / "loss_curves.png").exists()


def test_loss_curves_with_step_column_and_sparse_val_loss(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("step,loss,val_loss\n10,3.0,\n20,2.0,2.5\n30,1.5,\n40,1.2,2.1\n")
    x_name, columns = report.read_train_log(log)
    assert x_name == "step"
    assert columns["step"] == [10.0, 20.0, 30.0, 40.0]
    assert columns["val_loss"][1] == 2.5
    paths = report.write_eval_report(
        tmp_path, results={"m": {"accuracy": 1.0}}, train_log_csv=log
    )
    _assert_png(paths["loss_curves"])


def test_mismatched_examples_raise(tmp_path):
    examples = _examples()
    examples["finetuned"][2] = {**examples["finetuned"][2], "prompt": "other"}
    with pytest.raises(ValueError, match=r"examples\['finetuned'\]\[2\]\['prompt'\]"):
        report.write_eval_report(tmp_path, results=_results(), examples=examples)
    assert list(tmp_path.iterdir()) == []  # nothing written on bad input
    with pytest.raises(ValueError, match="differ in length"):
        report.merge_examples({"a": [{}], "b": []})


def test_empty_results_raise(tmp_path):
    with pytest.raises(ValueError, match="results is empty"):
        report.write_eval_report(tmp_path, results={})
