"""The evaluation report: base and fine-tuned model side by side.

`write_eval_report` turns metrics dicts from `gemma4_keras.eval.metrics` (one per
model) into files a person can read and a program can parse:

| file                         | content                                        |
|------------------------------|------------------------------------------------|
| `eval_report.json`           | title, every model's metrics, deltas           |
| `eval_report.md`             | the metrics table (+ delta), per-class scores  |
|                              | + human review (`gemma4_keras.eval.review`), if any |
| `confusion_matrix_<model>.png` | one per classification result                |
| `loss_curves.png`            | train / validation loss from the training log  |
| `predictions.jsonl`          | prompt, reference, prediction_<model> per line |

A model's metrics may hold further blocks, each a metrics dict with its own
`task_type` (tool-use evaluation: `answer_after_tool`, `without_tool_calls`);
the Markdown report gives each a table of its own and the JSON their deltas
under `block_deltas`.

Every file is written to a temporary name and moved into place with
`os.replace`, so an interrupted run never leaves a half-written report.

Example:

>>> print(format_metrics_table({
...     "base": {"task_type": "extraction", "exact_match": 0.25},
...     "finetuned": {"task_type": "extraction", "exact_match": 0.75},
... }))
| metric | base | finetuned | delta (finetuned - base) |
|---|---:|---:|---:|
| **exact_match** | 0.2500 | 0.7500 | +0.5000 |
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from gemma4_keras import atomic
from gemma4_keras.eval import metrics as metrics_lib
from gemma4_keras.eval import review

_LOG = logging.getLogger(__name__)


class ReportError(ValueError):
    """An input of the report (the training log) that cannot be read."""


BASE, FINETUNED = metrics_lib.BASE, metrics_lib.FINETUNED

# Scalar rows that describe the evaluation rather than score the model; a
# difference between models there is not an improvement.
_NO_DELTA = frozenset({"num_examples"})


# ----------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------


def _write_text(path: pathlib.Path, text: str) -> pathlib.Path:
    with atomic.atomic_open(path, "w") as handle:
        handle.write(text)
    return path


def _save_figure(figure: Any, path: pathlib.Path) -> pathlib.Path:
    with atomic.atomic_open(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=120, bbox_inches="tight")
    return path


# ----------------------------------------------------------------------------
# Metrics table
# ----------------------------------------------------------------------------


def _check_results(results: Mapping[str, Mapping[str, Any]]) -> None:
    if not results:
        raise ValueError("results is empty; pass {model_name: metrics_dict}.")
    for name, model_metrics in results.items():
        if not isinstance(model_metrics, Mapping):
            raise TypeError(
                f"results[{name!r}] is {type(model_metrics).__name__}; expected "
                "the dict returned by gemma4_keras.eval.metrics.compute_metrics."
            )


def _is_scalar(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _headline(results: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The headline metric of the first model that names its task type."""
    for model_metrics in results.values():
        task_type = model_metrics.get("task_type")
        if task_type in metrics_lib.TASK_TYPES:
            return metrics_lib.headline_metric(task_type, dict(model_metrics))
    return None


def _metric_names(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Scalar metric names across models: headline first, then first-seen order."""
    names: dict[str, None] = {}
    for model_metrics in results.values():
        for key, value in model_metrics.items():
            if _is_scalar(value):
                names[key] = None
    ordered = list(names)
    headline = _headline(results)
    if headline in names:
        ordered.remove(headline)
        ordered.insert(0, headline)
    return ordered


def _format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}"


def _has_delta(results: Mapping[str, Mapping[str, Any]]) -> bool:
    return BASE in results and FINETUNED in results


def _delta(results: Mapping[str, Mapping[str, Any]], name: str) -> float | None:
    base, tuned = results[BASE].get(name), results[FINETUNED].get(name)
    if name in _NO_DELTA or not (_is_scalar(base) and _is_scalar(tuned)):
        return None
    return tuned - base


def _deltas(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    deltas = {name: _delta(results, name) for name in _metric_names(results)}
    return {name: value for name, value in deltas.items() if value is not None}


def format_metrics_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Renders the scalar metrics as a Markdown table.

    One row per scalar metric (the task's headline metric first, in bold),
    one column per model, and a `delta (finetuned - base)` column when models
    named `base` and `finetuned` are both present. Nested values (per-class
    scores, the confusion matrix) and strings are left out.

    Args:
        results: {model_name: metrics dict from `compute_metrics`}.

    Returns:
        The table, without a trailing newline.

    Example:
        >>> print(format_metrics_table({"tuned": {"accuracy": 0.5,
        ...                                       "num_examples": 4}}))
        | metric | tuned |
        |---|---:|
        | accuracy | 0.5000 |
        | num_examples | 4 |
    """
    _check_results(results)
    models = list(results)
    with_delta = _has_delta(results)
    header = ["metric", *models] + (
        [f"delta ({FINETUNED} - {BASE})"] if with_delta else []
    )
    lines = [
        "| " + " | ".join(header) + " |",
        "|---" + "|---:" * (len(header) - 1) + "|",
    ]
    headline = _headline(results)
    for name in _metric_names(results):
        cells = [f"**{name}**" if name == headline else name]
        cells += [_format_value(results[model].get(name)) for model in models]
        if with_delta:
            delta = _delta(results, name)
            cells.append("" if delta is None else f"{delta:+.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metric_blocks(
    results: Mapping[str, Mapping[str, Any]],
) -> dict[str, dict[str, Mapping[str, Any]]]:
    """The nested metrics blocks: {block: {model: metrics}}, in first-seen order.

    A block is a value that is itself a metrics dict (it names a
    `task_type`), e.g. the answers after tool results.

    Example:
        >>> metric_blocks({"tuned": {"task_type": "tool_call",
        ...     "answer_after_tool": {"task_type": "extraction", "exact_match": 1.0}}})
        {'answer_after_tool': {'tuned': {'task_type': 'extraction', 'exact_match': 1.0}}}
    """
    blocks: dict[str, dict[str, Mapping[str, Any]]] = {}
    for model, model_metrics in results.items():
        for key, value in model_metrics.items():
            if isinstance(value, Mapping) and "task_type" in value:
                blocks.setdefault(key, {})[model] = value
    return blocks


def format_all_tables(results: Mapping[str, Mapping[str, Any]]) -> str:
    """`format_metrics_table`, then one table per metrics block (`metric_blocks`).

    Without blocks it is `format_metrics_table(results)`.
    """
    parts = [format_metrics_table(results)]
    for block, block_results in metric_blocks(results).items():
        parts.append(f"{_block_title(block, block_results)}:")
        parts.append(format_metrics_table(block_results))
    return "\n\n".join(parts)


def _block_title(block: str, block_results: Mapping[str, Mapping[str, Any]]) -> str:
    task_types = sorted({str(m.get("task_type", "?")) for m in block_results.values()})
    return f"{block} (task type: {', '.join(task_types)})"


def _per_class_table(results: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Per-class precision / recall / F1, one column group per model."""
    models = [name for name, m in results.items() if "per_class" in m]
    if not models:
        return None
    labels = list(
        dict.fromkeys(label for m in models for label in results[m]["per_class"])
    )
    header = ["label", "support"]
    header += [f"{m} {k}" for m in models for k in ("P", "R", "F1")]
    lines = [
        "| " + " | ".join(header) + " |",
        "|---" + "|---:" * (len(header) - 1) + "|",
    ]
    for label in labels:
        scores = [results[m]["per_class"].get(label, {}) for m in models]
        support = next((s["support"] for s in scores if "support" in s), None)
        cells = [label or "(empty)", _format_value(support)]
        for score in scores:
            cells += [
                _format_value(score.get(k)) for k in ("precision", "recall", "f1")
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _render_markdown(
    title: str, results: Mapping[str, Mapping[str, Any]], images: Mapping[str, str]
) -> str:
    task_types = sorted({str(m.get("task_type", "?")) for m in results.values()})
    parts = [
        f"# {title}",
        f"Task type: {', '.join(task_types)}",
        format_metrics_table(results),
    ]
    per_class = _per_class_table(results)
    if per_class:
        parts += ["## Per-class scores", per_class]
    for block, block_results in metric_blocks(results).items():
        parts += [f"## {_block_title(block, block_results)}"]
        parts += [format_metrics_table(block_results)]
        block_per_class = _per_class_table(block_results)
        if block_per_class:
            parts += [block_per_class]
    if images:
        parts.append("## Plots")
        parts += [f"![{caption}]({file_name})" for caption, file_name in images.items()]
    return "\n\n".join(parts) + "\n"


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays (from callers that computed extra metrics).
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} in results is not JSON serialisable.")


def _report_json(title: str, results: Mapping[str, Mapping[str, Any]]) -> str:
    report = {"title": title, "headline_metric": _headline(results), "models": results}
    if _has_delta(results):
        report["deltas"] = _deltas(results)
        blocks = metric_blocks(results)
        block_deltas = {b: _deltas(r) for b, r in blocks.items() if _has_delta(r)}
        if block_deltas:
            report["block_deltas"] = block_deltas
    return json.dumps(report, indent=2, default=_json_default) + "\n"


# ----------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure drawn by the Agg canvas.

    Binding the Agg canvas to this figure (rather than `matplotlib.use`)
    renders off-screen without touching pyplot's global backend, so a
    notebook that imports the package keeps its inline plots.
    """
    from matplotlib.backends.backend_agg import (
        FigureCanvasAgg,  # heavy; only when plotting
    )
    from matplotlib.figure import Figure  # heavy; only when plotting

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def plot_confusion_matrix(model_metrics: Mapping[str, Any], model_name: str) -> Any:
    """Draws a classification result's confusion matrix with counts.

    Args:
        model_metrics: a result of `classification_metrics`.
        model_name: shown in the title.

    Returns:
        A matplotlib Figure (save it with `figure.savefig`).
    """
    from matplotlib.ticker import MaxNLocator  # heavy; only when plotting

    matrix = model_metrics["confusion_matrix"]
    rows = model_metrics["labels"]
    columns = model_metrics.get("confusion_matrix_columns", [*rows, "(other)"])
    size = max(4.0, 0.6 * len(columns) + 2.5)
    figure = _new_figure(size + 1.0, size)
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues", vmin=0)
    colorbar = figure.colorbar(image, ax=axes, label="examples", fraction=0.046)
    colorbar.locator = MaxNLocator(integer=True)  # counts, not fractions
    colorbar.update_ticks()
    peak = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            color = "white" if peak and count > peak / 2 else "black"
            axes.text(j, i, str(count), ha="center", va="center", color=color)
    axes.set_xticks(
        range(len(columns)), [c or "(empty)" for c in columns], rotation=45, ha="right"
    )
    axes.set_yticks(range(len(rows)), [r or "(empty)" for r in rows])
    axes.set_xlabel("Predicted label")
    axes.set_ylabel("Reference label")
    title = f"Confusion matrix: {model_name}"
    if _is_scalar(model_metrics.get("accuracy")):
        title += f" (accuracy {model_metrics['accuracy']:.3f})"
    axes.set_title(title)
    return figure


def _to_float(cell: str | None) -> float:
    try:
        return float(cell)
    except (TypeError, ValueError):
        return math.nan


def read_train_log(csv_path: str | os.PathLike) -> tuple[str, dict[str, list[float]]]:
    """Reads a Keras CSVLogger-style training log.

    Args:
        csv_path: a CSV with a header row: an x column (`step` or `epoch`;
            the row number when neither is present) and any of `loss`,
            `val_loss`. Empty or non-numeric cells read as NaN.

    Returns:
        (x column name, {column: values}) for the x column and the loss
        columns that exist.

    Raises:
        ReportError: the file is not UTF-8 CSV (naming it).

    Example:
        A CSVLogger file `epoch,loss,val_loss\\n0,2.1,2.3\\n1,1.7,2.0` reads as
        `("epoch", {"epoch": [0.0, 1.0], "loss": [2.1, 1.7],
        "val_loss": [2.3, 2.0]})`.
    """
    try:
        with open(csv_path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (UnicodeDecodeError, csv.Error) as error:
        raise ReportError(
            f"{csv_path}: unreadable training log ({error}); restore it, or move it "
            "away to write the report without loss curves"
        ) from error
    fields = list(rows[0]) if rows else []
    x_name = next((name for name in ("step", "epoch") if name in fields), "row")
    columns = {x_name: [float(i) for i in range(len(rows))]}
    for name in [x_name, "loss", "val_loss"]:
        if name in fields:
            columns[name] = [_to_float(row[name]) for row in rows]
    return x_name, columns


def plot_loss_curves(x_name: str, columns: Mapping[str, Sequence[float]]) -> Any:
    """Draws training and validation loss against steps or epochs.

    Args:
        x_name: the x column (`step`, `epoch` or `row`).
        columns: the output of `read_train_log`; NaN points are skipped so a
            validation loss logged every few steps still draws as a line.

    Returns:
        A matplotlib Figure.
    """
    from matplotlib.ticker import MaxNLocator  # heavy; only when plotting

    figure = _new_figure(7.0, 4.5)
    axes = figure.add_subplot()
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    labels = {"loss": "train loss", "val_loss": "validation loss"}
    for name, label in labels.items():
        points = [
            (x, y)
            for x, y in zip(columns[x_name], columns.get(name, []))
            if not (math.isnan(x) or math.isnan(y))
        ]
        if points:
            xs, ys = zip(*points)
            axes.plot(xs, ys, marker="o" if len(points) < 30 else None, label=label)
    axes.set_xlabel(x_name)
    axes.set_ylabel("loss")
    axes.set_title("Training and validation loss")
    axes.grid(True, alpha=0.3)
    axes.legend()
    return figure


def _has_loss(columns: Mapping[str, Sequence[float]]) -> bool:
    values = [*columns.get("loss", []), *columns.get("val_loss", [])]
    return any(not math.isnan(v) for v in values)


def read_loss_log(
    train_log_csv: str | os.PathLike | None,
) -> tuple[str, dict[str, list[float]]] | None:
    """`read_train_log` of a log with loss values; None (logged) when there is none.

    Raises:
        ReportError: the file exists but is not UTF-8 CSV.
    """
    if train_log_csv is None:
        return None
    if not os.path.exists(train_log_csv):
        _LOG.warning("No training log at %s; skipping loss_curves.png.", train_log_csv)
        return None
    x_name, columns = read_train_log(train_log_csv)
    if not _has_loss(columns):
        _LOG.warning(
            "%s has no numeric loss or val_loss column; skipping loss_curves.png.",
            train_log_csv,
        )
        return None
    return x_name, columns


def _loss_curves(
    log: tuple[str, dict[str, list[float]]] | None, out: pathlib.Path
) -> pathlib.Path | None:
    """Writes loss_curves.png from `read_loss_log`'s result, if any."""
    if log is None:
        return None
    return _save_figure(plot_loss_curves(*log), out / "loss_curves.png")


# ----------------------------------------------------------------------------
# Per-example predictions
# ----------------------------------------------------------------------------


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"


def merge_examples(examples: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict]:
    """Joins per-model example lists into one row per example.

    Args:
        examples: {model_name: [{"prompt", "reference", "prediction", ...}]},
            every list in the same example order.

    Returns:
        [{"prompt", "reference", "prediction_<model>"...}], keeping any other
        keys (e.g. an example id) of the first model's rows.

    Raises:
        ValueError: when lists differ in length or disagree on a prompt or
            reference, i.e. the models were not run on the same examples.

    Example:
        >>> merge_examples({
        ...     "base": [{"prompt": "2+2?", "reference": "4", "prediction": "5"}],
        ...     "finetuned": [{"prompt": "2+2?", "reference": "4", "prediction": "4"}],
        ... })
        [{'prompt': '2+2?', 'reference': '4', 'prediction_base': '5', 'prediction_finetuned': '4'}]
    """
    lengths = {model: len(rows) for model, rows in examples.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"examples lists differ in length: {lengths}.")
    merged = []
    first = next(iter(examples), None)
    for index in range(lengths[first] if first is not None else 0):
        row = {k: v for k, v in examples[first][index].items() if k != "prediction"}
        for model, rows in examples.items():
            for key in ("prompt", "reference"):
                if rows[index].get(key) != row.get(key):
                    raise ValueError(
                        f"examples[{model!r}][{index}][{key!r}] differs from "
                        f"examples[{first!r}][{index}][{key!r}]; evaluate every "
                        "model on the same examples in the same order."
                    )
            row[f"prediction_{model}"] = rows[index].get("prediction")
        merged.append(row)
    return merged


def _write_jsonl(path: pathlib.Path, rows: Sequence[Mapping[str, Any]]) -> pathlib.Path:
    lines = [json.dumps(row, ensure_ascii=False, default=_json_default) for row in rows]
    return _write_text(path, "".join(line + "\n" for line in lines))


# ----------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------


def write_eval_report(
    out_dir: str | os.PathLike,
    *,
    results: Mapping[str, Mapping[str, Any]],
    examples: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    train_log_csv: str | os.PathLike | None = None,
    title: str = "Gemma 4 fine-tuning evaluation",
) -> dict[str, pathlib.Path]:
    """Writes the evaluation report files into `out_dir`.

    Args:
        out_dir: directory to write into (created if missing).
        results: {model_name: metrics dict from `compute_metrics`}, e.g.
            {"base": ..., "finetuned": ...}; any number of models. With both
            `base` and `finetuned` the report adds finetuned - base deltas.
        examples: optional {model_name: [{"prompt", "reference",
            "prediction"}]} for predictions.jsonl (see `merge_examples`).
        train_log_csv: optional Keras CSVLogger-style CSV for
            loss_curves.png; a missing file or one without loss columns is
            skipped with a warning.
        title: the report's heading.

    Returns:
        {"json", "markdown", "predictions", "loss_curves",
        "confusion_matrix_<model>": path} for the files written.

    Example:
        >>> import tempfile
        >>> paths = write_eval_report(tempfile.mkdtemp(), results={
        ...     "base": {"task_type": "extraction", "exact_match": 0.25},
        ...     "finetuned": {"task_type": "extraction", "exact_match": 0.75}})
        >>> sorted(paths)
        ['json', 'markdown']
    """
    _check_results(results)
    # Everything that can fail on bad input runs before the first write, so
    # a ValueError never leaves a partial report behind.
    rows = merge_examples(examples) if examples is not None else None
    report_json = _report_json(title, results)
    log = read_loss_log(train_log_csv)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, pathlib.Path] = {}
    images: dict[str, str] = {}
    for model, model_metrics in results.items():
        if "confusion_matrix" in model_metrics:
            path = out / f"confusion_matrix_{_file_safe(model)}.png"
            paths[f"confusion_matrix_{model}"] = _save_figure(
                plot_confusion_matrix(model_metrics, model), path
            )
            images[f"Confusion matrix: {model}"] = path.name
    loss_path = _loss_curves(log, out)
    if loss_path is not None:
        paths["loss_curves"] = loss_path
        images["Training and validation loss"] = loss_path.name
    if rows is not None:
        paths["predictions"] = _write_jsonl(out / "predictions.jsonl", rows)
    paths["json"] = _write_text(out / "eval_report.json", report_json)
    markdown = _render_markdown(title, results, images)
    human_review = _human_review_section(out)
    if human_review:
        markdown += "\n" + human_review
    paths["markdown"] = _write_text(out / "eval_report.md", markdown)
    return paths


def output_names(models: Sequence[str]) -> list[str]:
    """The file names `write_eval_report` may write for `models` (see the table above).

    >>> output_names(["finetuned"])
    ['eval_report.json', 'eval_report.md', 'predictions.jsonl', 'loss_curves.png', 'confusion_matrix_finetuned.png']
    """
    fixed = [
        "eval_report.json",
        "eval_report.md",
        "predictions.jsonl",
        "loss_curves.png",
    ]
    return fixed + [f"confusion_matrix_{_file_safe(m)}.png" for m in models]


def _human_review_section(out: pathlib.Path) -> str | None:
    """The "## Human review" section when `out` holds human_review.jsonl."""
    return review.report_section(out)
