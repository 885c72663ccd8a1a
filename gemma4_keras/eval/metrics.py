"""Task metrics for evaluating generated answers against references.

Pure Python (plus sacrebleu, rouge-score and jsonschema); no keras or jax
import, so the metrics can be used and tested without a model.

Five task types are supported, chosen in the config or inferred from the
references with `infer_task_type` (text) or from references that are call
lists (`tool_call`):

| task type        | metrics                                                 |
|------------------|---------------------------------------------------------|
| `classification` | accuracy, macro_f1, per_class P/R/F1, confusion_matrix  |
| `generation`     | bleu (0-100), rouge1 / rouge2 / rougeL F-measure (0-1)   |
| `extraction`     | exact_match, token_f1 (SQuAD-style, 0-1)                |
| `instruction`    | json_parse_rate, schema_compliance, regex_compliance    |
| `tool_call`      | exact_call_match, parse_rate, function_name_accuracy,   |
|                  | argument_precision / _recall, schema_valid_rate          |

Example:

>>> result = compute_metrics(None, ["yes", "no", "yes", "no"],
...                          ["Yes.", "no", "no", "no"])
>>> result["task_type"], result["accuracy"]
('classification', 0.75)
"""

from __future__ import annotations

import collections
import json
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

from gemma4_keras.config_lib import TASK_TYPES
from gemma4_keras.data import tool_format

# Column name used in the confusion matrix for predictions outside the label
# set. Parenthesised so it cannot collide with a normalised label "other".
# The two models a report compares (keys of its results, labels of its rows).
BASE, FINETUNED = "base", "finetuned"

OTHER_LABEL = "(other)"

# Thresholds of the inference rule in `infer_task_type`.
_MAX_CLASSES = 20
_MAX_LABEL_WORDS = 4
_MAX_SPAN_WORDS = 10

# Quotes and sentence punctuation that models wrap around short answers.
# Brackets, signs and '+' are kept: "-5", "f(x)" and "C++" must survive.
_SURROUNDING_CHARS = string.whitespace + "\"'`“”‘’«».,;:!?…"

_FENCE_RE = re.compile(r"^```[A-Za-z0-9_-]*[ \t]*\n(.*?)\n?```$", re.DOTALL)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)

_TASK_OPTIONS = {
    "classification": frozenset({"labels"}),
    "generation": frozenset(),
    "extraction": frozenset(),
    "instruction": frozenset({"json_schema", "regex"}),
    "tool_call": frozenset({"tools"}),
}

_HEADLINES = {
    "classification": "accuracy",
    "generation": "rougeL",
    "extraction": "exact_match",
    "instruction": "json_parse_rate",
    "tool_call": "exact_call_match",
}


# ----------------------------------------------------------------------------
# Normalisation and input checks
# ----------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Normalises a short answer for comparison.

    Casefolds, strips surrounding whitespace, quotes and sentence punctuation,
    and collapses inner runs of whitespace to one space. Inner punctuation is
    kept.

    Args:
        text: a reference or a model prediction.

    Returns:
        The normalised string.

    Example:
        >>> normalize_answer('  "Positive."\\n')
        'positive'
        >>> normalize_answer("New   York CITY!")
        'new york city'
        >>> normalize_answer("-5")
        '-5'
    """
    stripped = text.casefold().strip(_SURROUNDING_CHARS)
    return " ".join(stripped.split())


def _check_strings(name: str, values: Sequence[str]) -> list[str]:
    """Returns `values` as a list, raising if an item is not a string."""
    values = list(values)
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise TypeError(
                f"{name}[{index}] is {type(value).__name__}, expected str; "
                "decode generated token ids to text before computing metrics."
            )
    return values


def _check_pair(
    references: Sequence[str], predictions: Sequence[str]
) -> tuple[list[str], list[str]]:
    """Validates that references and predictions are aligned, non-empty strings."""
    references = _check_strings("references", references)
    predictions = _check_strings("predictions", predictions)
    _check_aligned(len(references), len(predictions))
    return references, predictions


def _check_aligned(n_references: int, n_predictions: int) -> None:
    if n_references != n_predictions:
        raise ValueError(
            f"Got {n_references} references but {n_predictions} "
            "predictions; they must be aligned one to one."
        )
    if not n_references:
        raise ValueError("No examples: references and predictions are empty.")


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


# ----------------------------------------------------------------------------
# Task type inference
# ----------------------------------------------------------------------------


def _parse_json(text: str) -> tuple[bool, Any]:
    """Parses `text` as JSON, tolerating one surrounding ``` fence.

    Returns:
        (True, value) when it parses, else (False, None).
    """
    text = text.strip()
    fenced = _FENCE_RE.match(text)
    if fenced:
        text = fenced.group(1)
    try:
        return True, json.loads(text)
    except (ValueError, RecursionError):
        return False, None


def _is_json_container(text: str) -> bool:
    ok, value = _parse_json(text)
    # Bare numbers and strings also parse as JSON; requiring an object or an
    # array keeps numeric labels ("0", "1") from being read as JSON tasks.
    return ok and isinstance(value, dict | list)


def infer_task_type(references: Sequence[str]) -> str:
    """Guesses the task type from the references alone.

    The rule, applied in order:

    1. `instruction` when every reference parses as a JSON object or array
       (a surrounding ```json fence is allowed).
    2. `classification` when the normalised references are few distinct
       short labels: at most 20 distinct values, each at most 4 words, and
       repeated, i.e. at least twice as many references as distinct values.
    3. `extraction` when every reference is a short span (at most 10 words).
    4. `generation` otherwise.

    Set the task type in the config when the guess is wrong.

    Args:
        references: the expected answers.

    Returns:
        One of `TASK_TYPES`.

    Raises:
        ValueError: if there are no references.

    Example:
        >>> infer_task_type(["positive", "negative", "positive", "negative"])
        'classification'
        >>> infer_task_type(['{"a": 1}', '[1, 2]'])
        'instruction'
        >>> infer_task_type(["Paris", "Marie Curie"])
        'extraction'
    """
    references = _check_strings("references", references)
    if not references:
        raise ValueError("Cannot infer the task type from zero references.")
    if all(_is_json_container(ref) for ref in references):
        return "instruction"
    normalised = [normalize_answer(ref) for ref in references]
    distinct = set(normalised)
    word_counts = [len(ref.split()) for ref in normalised]
    if (
        len(distinct) <= _MAX_CLASSES
        and max(word_counts) <= _MAX_LABEL_WORDS
        and len(references) >= 2 * len(distinct)
    ):
        return "classification"
    if max(word_counts) <= _MAX_SPAN_WORDS:
        return "extraction"
    return "generation"


# ----------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------


def _safe_div(numerator: float, denominator: float) -> float:
    # Undefined precision/recall (no predictions / no support) counts as 0,
    # as scikit-learn does by default.
    return float(numerator / denominator) if denominator else 0.0


def _resolve_labels(references: list[str], labels: Sequence[str] | None) -> list[str]:
    """Returns the normalised label set, checking references fall inside it."""
    if labels is None:
        return sorted(set(references))
    resolved = list(dict.fromkeys(normalize_answer(label) for label in labels))
    unknown = sorted(set(references) - set(resolved))
    if unknown:
        raise ValueError(
            f"References {unknown} are not in labels {resolved}; add them to "
            "the configured labels or fix the data."
        )
    return resolved


def classification_metrics(
    references: Sequence[str],
    predictions: Sequence[str],
    labels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class scores and a confusion matrix.

    References and predictions are compared after `normalize_answer`. A
    prediction outside the label set is wrong and is counted in an extra
    last column of the confusion matrix, `OTHER_LABEL`.

    Args:
        references: the expected labels.
        predictions: the model's answers, aligned with `references`.
        labels: the label set, in display order. Defaults to the sorted
            distinct normalised references. Labels without support still
            count in macro-F1 (with recall and F1 of 0).

    Returns:
        A dict with `accuracy`, `macro_f1`, `per_class` ({label: {precision,
        recall, f1, support}}), `confusion_matrix` (rows: reference label,
        columns: predicted label then `OTHER_LABEL`), `labels` and
        `confusion_matrix_columns`.

    Raises:
        ValueError: on misaligned inputs or a reference outside `labels`.

    Example:
        >>> m = classification_metrics(["a", "a", "b"], ["a", "b", "zzz"])
        >>> m["accuracy"], m["confusion_matrix"]
        (0.3333333333333333, [[1, 1, 0], [0, 0, 1]])
    """
    references, predictions = _check_pair(references, predictions)
    refs = [normalize_answer(ref) for ref in references]
    preds = [normalize_answer(pred) for pred in predictions]
    label_list = _resolve_labels(refs, labels)
    column = {label: i for i, label in enumerate(label_list)}
    other = len(label_list)
    matrix = [[0] * (len(label_list) + 1) for _ in label_list]
    for ref, pred in zip(refs, preds):
        matrix[column[ref]][column.get(pred, other)] += 1
    per_class = {}
    for i, label in enumerate(label_list):
        true_pos = matrix[i][i]
        predicted = sum(row[i] for row in matrix)
        support = sum(matrix[i])
        precision = _safe_div(true_pos, predicted)
        recall = _safe_div(true_pos, support)
        per_class[label] = {
            "precision": precision,
            "recall": recall,
            "f1": _safe_div(2 * precision * recall, precision + recall),
            "support": support,
        }
    correct = sum(matrix[i][i] for i in range(len(label_list)))
    return {
        "accuracy": correct / len(refs),
        "macro_f1": _mean([scores["f1"] for scores in per_class.values()]),
        "per_class": per_class,
        "confusion_matrix": matrix,
        "labels": label_list,
        "confusion_matrix_columns": [*label_list, OTHER_LABEL],
    }


# ----------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------


def generation_metrics(
    references: Sequence[str], predictions: Sequence[str]
) -> dict[str, float]:
    """Corpus BLEU (sacrebleu) and mean ROUGE F-measures (rouge-score).

    BLEU is sacrebleu's `corpus_bleu` with its defaults (13a tokenizer,
    exponential smoothing), on a 0-100 scale; texts shorter than four tokens
    have no 4-grams and score 0 on their own. ROUGE-1/2/L are the mean
    per-example F-measures with Porter stemming, on a 0-1 scale.

    Args:
        references: one reference text per example.
        predictions: the model's texts, aligned with `references`.

    Returns:
        {"bleu", "rouge1", "rouge2", "rougeL"}.

    Example:
        >>> m = generation_metrics(["the cat sat on the mat"],
        ...                        ["the cat sat on the mat"])
        >>> round(m["bleu"]), m["rougeL"]
        (100, 1.0)
    """
    # Imported here so `import gemma4_keras.eval.metrics` stays cheap.
    import sacrebleu  # slow to import (nltk); only generation metrics need it
    from rouge_score import (
        rouge_scorer,  # slow to import (nltk); only generation metrics need it
    )

    references, predictions = _check_pair(references, predictions)
    bleu = sacrebleu.corpus_bleu(predictions, [references]).score
    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    scores = [scorer.score(ref, pred) for ref, pred in zip(references, predictions)]
    result = {"bleu": float(bleu)}
    for kind in kinds:
        result[kind] = _mean([score[kind].fmeasure for score in scores])
    return result


# ----------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------


def _squad_tokens(text: str) -> list[str]:
    """SQuAD v1.1 answer normalisation: lowercase, drop punctuation and
    articles, split on whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return _ARTICLES_RE.sub(" ", text).split()


def _token_f1(reference: str, prediction: str) -> float:
    ref_tokens = _squad_tokens(reference)
    pred_tokens = _squad_tokens(prediction)
    if not ref_tokens or not pred_tokens:
        # Both empty is a match; one empty is a miss.
        return float(ref_tokens == pred_tokens)
    common = collections.Counter(ref_tokens) & collections.Counter(pred_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def extraction_metrics(
    references: Sequence[str], predictions: Sequence[str]
) -> dict[str, float]:
    """SQuAD-style exact match and token-level F1, averaged over examples.

    Both compare answers after SQuAD normalisation (lowercase, punctuation
    and the articles a/an/the removed, whitespace collapsed).

    Args:
        references: one expected span per example.
        predictions: the model's spans, aligned with `references`.

    Returns:
        {"exact_match", "token_f1"}, each in [0, 1].

    Example:
        >>> extraction_metrics(["the cat sat on the mat"],
        ...                    ["a cat on a mat today"])
        {'exact_match': 0.0, 'token_f1': 0.75}
    """
    references, predictions = _check_pair(references, predictions)
    pairs = list(zip(references, predictions))
    return {
        "exact_match": _mean(
            [float(_squad_tokens(r) == _squad_tokens(p)) for r, p in pairs]
        ),
        "token_f1": _mean([_token_f1(r, p) for r, p in pairs]),
    }


# ----------------------------------------------------------------------------
# Instruction following
# ----------------------------------------------------------------------------


def _schema_validator(json_schema: dict) -> Any:
    import jsonschema  # only format-compliance metrics need it

    validator_class = jsonschema.validators.validator_for(json_schema)
    try:
        validator_class.check_schema(json_schema)
    except jsonschema.SchemaError as error:
        raise ValueError(
            f"json_schema is not a valid JSON schema: {error.message}"
        ) from error
    return validator_class(json_schema)


def _compile_regex(regex: str) -> re.Pattern[str]:
    try:
        return re.compile(regex)
    except re.error as error:
        raise ValueError(f"regex {regex!r} does not compile: {error}") from error


def instruction_metrics(
    predictions: Sequence[str],
    *,
    json_schema: dict | None = None,
    regex: str | None = None,
    references: Sequence[str] | None = None,
) -> dict[str, float]:
    """Format compliance rates for instruction-following outputs.

    Args:
        predictions: the model's outputs.
        json_schema: if given, adds `schema_compliance`, the fraction of
            predictions that parse as JSON and validate against this schema.
        regex: if given, adds `regex_compliance`, the fraction of predictions
            (surrounding whitespace stripped) that `re.fullmatch` it.
        references: if given and every reference parses as JSON, adds
            `json_exact_match`, the fraction of predictions whose parsed value
            equals the parsed reference (key order and spacing ignored).

    Returns:
        {"json_parse_rate", ...} with rates in [0, 1]. A prediction that is
        exactly one ```json fenced block counts as parsing; JSON with prose
        around it does not, since a downstream parser would fail on it too.

    Raises:
        ValueError: on no predictions, an invalid schema or regex.

    Example:
        >>> instruction_metrics(['{"a": 1}', "```json\\n[2]\\n```", "nope"],
        ...                     regex=r"\\{.*\\}")
        {'json_parse_rate': 0.6666666666666666, 'regex_compliance': 0.3333333333333333}
    """
    predictions = _check_strings("predictions", predictions)
    if not predictions:
        raise ValueError("No examples: predictions are empty.")
    parsed = [_parse_json(pred) for pred in predictions]
    result = {"json_parse_rate": _mean([float(ok) for ok, _ in parsed])}
    if json_schema is not None:
        validator = _schema_validator(json_schema)
        result["schema_compliance"] = _mean(
            [float(ok and validator.is_valid(value)) for ok, value in parsed]
        )
    if regex is not None:
        pattern = _compile_regex(regex)
        result["regex_compliance"] = _mean(
            [float(pattern.fullmatch(pred.strip()) is not None) for pred in predictions]
        )
    if references is not None:
        references, _ = _check_pair(references, predictions)
        parsed_refs = [_parse_json(ref) for ref in references]
        if all(ok for ok, _ in parsed_refs):
            result["json_exact_match"] = _mean(
                [
                    float(ok and value == ref_value)
                    for (ok, value), (_, ref_value) in zip(parsed, parsed_refs)
                ]
            )
    return result


# ----------------------------------------------------------------------------
# Tool calls
# ----------------------------------------------------------------------------


def _canonical(value: Any) -> Any:
    """`value` with integral floats as ints, so 1 and 1.0 compare equal."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def canonical_json(value: Any) -> str:
    """A JSON value as one canonical string: keys sorted, 1.0 written as 1.

    Two arguments are the same when their canonical JSON is; `True` stays
    `true`, not 1.

    Example:
        >>> canonical_json({"b": 1.0, "a": [2, "x", True]})
        '{"a":[2,"x",true],"b":1}'
    """
    return json.dumps(
        _canonical(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )


def _call_counts(calls: Sequence[Mapping]) -> collections.Counter:
    return collections.Counter(
        (call["name"], canonical_json(call.get("arguments") or {})) for call in calls
    )


def _argument_counts(calls: Sequence[Mapping]) -> collections.Counter:
    """Multiset of (call name, argument key, canonical value) triples."""
    return collections.Counter(
        (call["name"], key, canonical_json(value))
        for call in calls
        for key, value in (call.get("arguments") or {}).items()
    )


def _parsed_calls(text: str) -> list[dict] | None:
    """The calls in a generated text; None when a call block is malformed."""
    try:
        return tool_format.parse_calls(text)
    except tool_format.ToolFormatError:
        return None


def _check_calls(
    references: Sequence[Sequence[Mapping]], predictions: Sequence[str]
) -> tuple[list[list[Mapping]], list[str]]:
    """Validates call-list references against aligned, non-empty predictions."""
    predictions = _check_strings("predictions", predictions)
    checked = []
    for index, reference in enumerate(references):
        calls = [] if isinstance(reference, str) else list(reference)
        if isinstance(reference, str) or not all(
            isinstance(c, Mapping) and isinstance(c.get("name"), str) for c in calls
        ):
            raise TypeError(
                f"references[{index}] is {reference!r}; tool_call references are "
                "lists of calls [{'name': ..., 'arguments': {...}}]"
            )
        checked.append(calls)
    _check_aligned(len(checked), len(predictions))
    return checked, predictions


def _ratio(hits: int, total: int, other_total: int) -> float:
    # 0/0 (no argument on this side) is perfect only when the other side has
    # none either: predicting no argument where some were due scores 0.
    return hits / total if total else float(other_total == 0)


def _argument_scores(
    references: list[list[Mapping]], predicted: list[list[dict]]
) -> dict[str, float]:
    hits = n_predicted = n_reference = 0
    for reference, calls in zip(references, predicted):
        wanted, got = _argument_counts(reference), _argument_counts(calls)
        hits += sum((wanted & got).values())
        n_predicted += sum(got.values())
        n_reference += sum(wanted.values())
    return {
        "argument_precision": _ratio(hits, n_predicted, n_reference),
        "argument_recall": _ratio(hits, n_reference, n_predicted),
    }


def _schema_valid_rate(
    predicted: list[list[dict]], tools: Sequence[Sequence[Mapping]]
) -> float:
    tools = list(tools)
    if len(tools) != len(predicted):
        raise ValueError(
            f"Got {len(tools)} tool lists for {len(predicted)} examples; pass one "
            "list of declarations per example."
        )
    valid = total = 0
    for calls, declared in zip(predicted, tools):
        parameters = tool_format.declared_parameters(declared)
        for call in calls:
            valid += not tool_format.call_errors(call, parameters)
            total += 1
    return _safe_div(valid, total)


def tool_call_metrics(
    references: Sequence[Sequence[Mapping]],
    predictions: Sequence[str],
    *,
    tools: Sequence[Sequence[Mapping]] | None = None,
) -> dict[str, float]:
    """How well generated tool calls match the reference calls.

    Predictions are generated texts; their calls are read with
    `tool_format.parse_calls`. Calls compare as an order-free multiset of
    (name, canonical JSON arguments), so parallel calls may come in any
    order and 1 equals 1.0.

    Args:
        references: per example, the expected calls `[{"name",
            "arguments"}]`.
        predictions: the generated texts, aligned with `references`.
        tools: optionally, per example, the OpenAI-style declarations the
            model was shown; adds `schema_valid_rate`.

    Returns:
        `parse_rate`: predictions whose call blocks parse (no call at all
        parses; it is simply wrong where calls were due). `exact_call_match`
        and `function_name_accuracy`: predictions whose calls, or call names,
        equal the reference's. `argument_precision` / `argument_recall`:
        micro-averaged over (call name, key, value) triples (both 1.0 when
        neither side has an argument). `schema_valid_rate`: predicted calls
        that name a declared tool and whose arguments validate against its
        `parameters` schema (0 when no call was predicted).

    Raises:
        ValueError / TypeError: on misaligned or empty inputs, references
            that are not call lists, or an invalid `parameters` schema.

    Example:
        >>> ref = [[{"name": "weather", "arguments": {"city": "Oslo"}}]]
        >>> pred = ['<|tool_call>call:weather{city:<|"|>Rome<|"|>}<tool_call|>']
        >>> m = tool_call_metrics(ref, pred)
        >>> m["parse_rate"], m["exact_call_match"], m["function_name_accuracy"]
        (1.0, 0.0, 1.0)
    """
    references, predictions = _check_calls(references, predictions)
    parsed = [_parsed_calls(text) for text in predictions]
    predicted = [calls or [] for calls in parsed]
    pairs = list(zip(references, parsed))
    names = [
        calls is not None
        and collections.Counter(c["name"] for c in calls)
        == collections.Counter(c["name"] for c in ref)
        for ref, calls in pairs
    ]
    result = {
        "parse_rate": _mean([float(calls is not None) for calls in parsed]),
        "exact_call_match": _mean(
            [
                float(calls is not None and _call_counts(calls) == _call_counts(ref))
                for ref, calls in pairs
            ]
        ),
        "function_name_accuracy": _mean([float(ok) for ok in names]),
        **_argument_scores(references, predicted),
    }
    if tools is not None:
        result["schema_valid_rate"] = _schema_valid_rate(predicted, tools)
    return result


# ----------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------


def _check_task_type(task_type: str) -> None:
    if task_type not in TASK_TYPES:
        raise ValueError(
            f"Unknown task type {task_type!r}; expected one of {list(TASK_TYPES)} "
            "or None to infer it from the references."
        )


def _check_options(task_type: str, options: Mapping[str, Any]) -> None:
    _check_task_type(task_type)
    unknown = sorted(set(options) - _TASK_OPTIONS[task_type])
    if unknown:
        raise ValueError(
            f"Options {unknown} do not apply to task type {task_type!r}; it takes "
            f"{sorted(_TASK_OPTIONS[task_type]) or 'no options'}."
        )


def _are_call_lists(references: list[Any]) -> bool:
    return bool(references) and all(isinstance(r, list | tuple) for r in references)


def compute_metrics(
    task_type: str | None,
    references: Sequence[str],
    predictions: Sequence[str],
    **options: Any,
) -> dict[str, Any]:
    """Computes the metrics of one task type.

    Args:
        task_type: one of `TASK_TYPES`, or None to use `infer_task_type`
            (`tool_call` when every reference is a list of calls).
        references: the expected answers (for `tool_call`: per example, the
            expected calls `[{"name", "arguments"}]`).
        predictions: the model's answers, aligned with `references`.
        **options: task-specific options: `labels` for classification,
            `json_schema` and `regex` for instruction, `tools` (declarations
            per example) for tool_call.

    Returns:
        The task's metrics plus `task_type` and `num_examples`.

    Raises:
        ValueError: on an unknown task type, an option the task type does not
            take, or misaligned / empty inputs.

    Example:
        >>> compute_metrics("extraction", ["Paris"], ["paris."])
        {'exact_match': 1.0, 'token_f1': 1.0, 'task_type': 'extraction', 'num_examples': 1}
    """
    references = list(references)
    if task_type == "tool_call" or (task_type is None and _are_call_lists(references)):
        _check_options("tool_call", options)
        result = tool_call_metrics(references, predictions, **options)
        return {**result, "task_type": "tool_call", "num_examples": len(predictions)}
    references, predictions = _check_pair(references, predictions)
    if task_type is None:
        task_type = infer_task_type(references)
    _check_options(task_type, options)
    if task_type == "classification":
        result = classification_metrics(references, predictions, **options)
    elif task_type == "generation":
        result = generation_metrics(references, predictions)
    elif task_type == "extraction":
        result = extraction_metrics(references, predictions)
    else:
        result = instruction_metrics(predictions, references=references, **options)
    return {**result, "task_type": task_type, "num_examples": len(references)}


def headline_metric(task_type: str, metrics: dict[str, Any] | None = None) -> str:
    """Names the single metric to watch for a task type.

    Args:
        task_type: one of `TASK_TYPES`.
        metrics: optionally, a result of `compute_metrics`; for instruction
            tasks evaluated against a schema the headline is then
            `schema_compliance` rather than `json_parse_rate`.

    Returns:
        A key of the metrics dict.

    Example:
        >>> headline_metric("classification")
        'accuracy'
        >>> headline_metric("instruction", {"schema_compliance": 0.5})
        'schema_compliance'
        >>> headline_metric("tool_call")
        'exact_call_match'
    """
    _check_task_type(task_type)
    if task_type == "instruction" and metrics and "schema_compliance" in metrics:
        return "schema_compliance"
    return _HEADLINES[task_type]
