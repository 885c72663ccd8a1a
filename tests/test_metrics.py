"""Tests for gemma4_keras.eval.metrics against hand-computed values."""

import doctest

import pytest
import sacrebleu

from gemma4_keras.eval import metrics


def test_docstring_examples():
    failures, _ = doctest.testmod(metrics)
    assert failures == 0


# ----------------------------------------------------------------------------
# normalize_answer
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ('  "Positive."\n', "positive"),
        ("New   York\tCITY!", "new york city"),
        ("«Ja»", "ja"),
        ("'it's'", "it's"),  # inner apostrophe kept
        ("-5", "-5"),  # sign kept
        ("C++", "c++"),
        ("f(x)", "f(x)"),
        ("...", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert metrics.normalize_answer(text) == expected


# ----------------------------------------------------------------------------
# infer_task_type
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "references, expected",
    [
        (["pos", "neg", "pos", "Neg."], "classification"),
        (["0", "1", "1", "0"], "classification"),  # numbers are labels, not JSON
        (['{"a": 1}', "```json\n[1, 2]\n```"], "instruction"),
        (["Paris", "Marie Curie", "1969"], "extraction"),  # distinct: not labels
        (["a b c d e", "a b c d e"], "extraction"),  # 5 words: too long for a label
        (["one two three four five six seven eight nine ten eleven"], "generation"),
        (['{"a": 1}', "not json at all here"], "extraction"),
    ],
)
def test_infer_task_type(references, expected):
    assert metrics.infer_task_type(references) == expected


def test_infer_task_type_many_distinct_labels_is_not_classification():
    # 21 distinct short labels, each twice: over the 20-class limit.
    references = [f"label{i}" for i in range(21)] * 2
    assert metrics.infer_task_type(references) == "extraction"
    twenty = [f"label{i}" for i in range(20)] * 2
    assert metrics.infer_task_type(twenty) == "classification"


def test_infer_task_type_empty_raises():
    with pytest.raises(ValueError, match="zero references"):
        metrics.infer_task_type([])


# ----------------------------------------------------------------------------
# classification
# ----------------------------------------------------------------------------


def test_classification_three_classes_by_hand():
    references = ["cat", "cat", "cat", "dog", "dog", "bird"]
    predictions = ["Cat.", "cat", "dog", "DOG", "bird", "fish"]
    # Labels (sorted): bird, cat, dog; columns: bird, cat, dog, (other).
    #   bird row: fish -> (other)                  [0, 0, 0, 1]
    #   cat row:  cat, cat, dog                    [0, 2, 1, 0]
    #   dog row:  dog, bird                        [1, 0, 1, 0]
    # accuracy = (0 + 2 + 1) / 6 = 0.5
    # bird: TP 0, predicted 1, support 1 -> P 0,   R 0,   F1 0
    # cat:  TP 2, predicted 2, support 3 -> P 1,   R 2/3, F1 2*(2/3)/(5/3) = 0.8
    # dog:  TP 1, predicted 2, support 2 -> P 1/2, R 1/2, F1 0.5
    # macro-F1 = (0 + 0.8 + 0.5) / 3 = 1.3 / 3
    result = metrics.classification_metrics(references, predictions)
    assert result["labels"] == ["bird", "cat", "dog"]
    assert result["confusion_matrix_columns"] == ["bird", "cat", "dog", "(other)"]
    assert result["confusion_matrix"] == [[0, 0, 0, 1], [0, 2, 1, 0], [1, 0, 1, 0]]
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["macro_f1"] == pytest.approx(1.3 / 3)
    per_class = result["per_class"]
    assert per_class["bird"] == {
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "support": 1,
    }
    assert per_class["cat"]["precision"] == pytest.approx(1.0)
    assert per_class["cat"]["recall"] == pytest.approx(2 / 3)
    assert per_class["cat"]["f1"] == pytest.approx(0.8)
    assert per_class["cat"]["support"] == 3
    assert per_class["dog"]["precision"] == pytest.approx(0.5)
    assert per_class["dog"]["recall"] == pytest.approx(0.5)
    assert per_class["dog"]["f1"] == pytest.approx(0.5)


def test_classification_explicit_labels_keep_order_and_unsupported_class():
    # Label "maybe" has no support: recall 0, F1 0, and it still counts in
    # macro-F1: (1 + 2/3 + 0) / 3, where "no" has P 1/2, R 1 -> F1 2/3.
    result = metrics.classification_metrics(
        ["yes", "no"], ["yes", "no"], labels=["Yes", "no", "maybe"]
    )
    assert result["labels"] == ["yes", "no", "maybe"]
    assert result["accuracy"] == 1.0
    assert result["per_class"]["maybe"]["support"] == 0
    result = metrics.classification_metrics(
        ["yes", "no"], ["no", "no"], labels=["yes", "no", "maybe"]
    )
    assert result["macro_f1"] == pytest.approx((0 + 2 / 3 + 0) / 3)


def test_classification_reference_outside_labels_raises():
    with pytest.raises(ValueError, match=r"References \['cat'\] are not in labels"):
        metrics.classification_metrics(["cat"], ["cat"], labels=["dog"])


# ----------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------


def test_bleu_of_identical_strings_is_100():
    texts = ["the cat sat on the mat", "a quick brown fox jumps over it"]
    assert metrics.generation_metrics(texts, texts)["bleu"] == pytest.approx(100.0)


def test_bleu_by_hand_and_against_sacrebleu():
    reference, prediction = "the cat sat on the mat", "the cat sat on a mat"
    # Modified n-gram precisions: 1-gram 5/6 ("a" unmatched), 2-gram 3/5,
    # 3-gram 2/4, 4-gram 1/3; equal lengths so no brevity penalty.
    by_hand = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25  # 53.728...
    result = metrics.generation_metrics([reference], [prediction])
    assert result["bleu"] == pytest.approx(by_hand)
    assert result["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu([prediction], [[reference]]).score
    )


def test_bleu_is_corpus_level_not_mean_of_sentences():
    references = ["the cat sat on the mat", "there is a dog in the garden"]
    predictions = ["the cat sat on a mat", "there is a dog in the garden"]
    expected = sacrebleu.corpus_bleu(predictions, [references]).score
    sentence_mean = (
        sum(
            sacrebleu.sentence_bleu(p, [r]).score
            for r, p in zip(references, predictions)
        )
        / 2
    )
    result = metrics.generation_metrics(references, predictions)["bleu"]
    assert result == pytest.approx(expected)
    assert result != pytest.approx(sentence_mean)


def test_rouge_by_hand():
    references = ["the cat sat on the mat", "cats running"]
    predictions = ["the cat lay on the mat", "cat run"]
    # Example 1: unigrams overlap the x2, cat, on, mat = 5 of 6 each side
    #   -> rouge1 F 5/6; bigrams overlap "the cat", "on the", "the mat" = 3 of 5
    #   -> rouge2 F 3/5; LCS "the cat on the mat" = 5 -> rougeL F 5/6.
    # Example 2: with Porter stemming cats -> cat, running -> run, so every
    #   score is 1.
    result = metrics.generation_metrics(references, predictions)
    assert result["rouge1"] == pytest.approx((5 / 6 + 1) / 2)
    assert result["rouge2"] == pytest.approx((3 / 5 + 1) / 2)
    assert result["rougeL"] == pytest.approx((5 / 6 + 1) / 2)


# ----------------------------------------------------------------------------
# extraction
# ----------------------------------------------------------------------------


def test_extraction_by_hand():
    references = ["the cat sat on the mat", "Paris", "Albert Einstein", ""]
    predictions = ["a cat on a mat today", "paris.", "Einstein", ""]
    # 1: tokens [cat sat on mat] vs [cat on mat today]: overlap 3,
    #    P 3/4, R 3/4 -> F1 0.75, no exact match.
    # 2: "paris" == "paris" -> EM 1, F1 1.
    # 3: [albert einstein] vs [einstein]: P 1, R 1/2 -> F1 2/3, EM 0.
    # 4: both empty -> EM 1, F1 1.
    result = metrics.extraction_metrics(references, predictions)
    assert result["exact_match"] == pytest.approx(2 / 4)
    assert result["token_f1"] == pytest.approx((0.75 + 1 + 2 / 3 + 1) / 4)


def test_token_f1_counts_repeated_tokens_once_per_match():
    # Reference [to be or not to be], prediction [to to to]: "to" overlaps
    # min(2, 3) = 2 times -> P 2/3, R 2/6 -> F1 2 * (2/9) / 1 = 4/9.
    result = metrics.extraction_metrics(["to be or not to be"], ["to to to"])
    assert result["token_f1"] == pytest.approx(4 / 9)


# ----------------------------------------------------------------------------
# instruction following
# ----------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name"],
}


def test_instruction_rates_by_hand():
    predictions = [
        '{"name": "Ada", "age": 36}',  # parses, valid, regex matches
        '```json\n{"name": "Bob"}\n```',  # fenced: parses, valid
        '{"age": "old"}',  # parses, invalid (no name, age not int)
        'Sure! {"name": 1}',  # prose around JSON: does not parse
    ]
    result = metrics.instruction_metrics(
        predictions, json_schema=SCHEMA, regex=r'\{"name": "\w+".*\}'
    )
    assert result == {
        "json_parse_rate": 3 / 4,
        "schema_compliance": 2 / 4,
        "regex_compliance": 1 / 4,
    }


def test_instruction_regex_uses_fullmatch():
    result = metrics.instruction_metrics(["ABC-123\n", "xABC-123"], regex=r"[A-Z]+-\d+")
    assert result["regex_compliance"] == 0.5


def test_instruction_json_exact_match_ignores_key_order():
    result = metrics.compute_metrics(
        "instruction",
        ['{"a": 1, "b": 2}', '{"a": 1}'],
        ['{"b":2,"a":1}', '{"a": 2}'],
    )
    assert result["json_exact_match"] == 0.5
    # References that are not JSON: no json_exact_match key at all.
    result = metrics.compute_metrics("instruction", ["x"], ["{}"], regex=".*")
    assert "json_exact_match" not in result


def test_instruction_invalid_schema_and_regex_raise():
    with pytest.raises(ValueError, match="not a valid JSON schema"):
        metrics.instruction_metrics(["{}"], json_schema={"type": "no-such-type"})
    with pytest.raises(ValueError, match="does not compile"):
        metrics.instruction_metrics(["{}"], regex="(")


# ----------------------------------------------------------------------------
# compute_metrics, headline_metric, errors
# ----------------------------------------------------------------------------


def test_compute_metrics_infers_and_adds_bookkeeping():
    result = metrics.compute_metrics(None, ["yes", "no", "yes", "no"], ["yes"] * 4)
    assert result["task_type"] == "classification"
    assert result["num_examples"] == 4
    assert result["accuracy"] == 0.5


def test_compute_metrics_passes_options():
    result = metrics.compute_metrics("classification", ["a"], ["a"], labels=["a", "b"])
    assert result["labels"] == ["a", "b"]


def test_length_mismatch_names_both_lengths():
    with pytest.raises(ValueError, match="3 references but 2 predictions"):
        metrics.compute_metrics("generation", ["a", "b", "c"], ["a", "b"])
    with pytest.raises(ValueError, match="1 references but 2 predictions"):
        metrics.extraction_metrics(["a"], ["a", "b"])


def test_unknown_task_type_names_allowed_values():
    with pytest.raises(ValueError, match="'summarization'.*'classification'"):
        metrics.compute_metrics("summarization", ["a"], ["a"])
    with pytest.raises(ValueError, match="Unknown task type"):
        metrics.headline_metric("qa")


def test_option_for_wrong_task_type_raises():
    with pytest.raises(ValueError, match=r"\['regex'\] do not apply"):
        metrics.compute_metrics("generation", ["a"], ["a"], regex=".*")


def test_empty_and_non_string_inputs_raise():
    with pytest.raises(ValueError, match="No examples"):
        metrics.compute_metrics("extraction", [], [])
    with pytest.raises(TypeError, match=r"predictions\[1\] is int"):
        metrics.extraction_metrics(["a", "b"], ["a", 3])


@pytest.mark.parametrize(
    "task_type, expected",
    [
        ("classification", "accuracy"),
        ("generation", "rougeL"),
        ("extraction", "exact_match"),
        ("instruction", "json_parse_rate"),
    ],
)
def test_headline_metric(task_type, expected):
    assert metrics.headline_metric(task_type) == expected
    assert expected in metrics.compute_metrics(task_type, ["{}"] * 2, ["{}"] * 2)


def test_headline_metric_prefers_schema_compliance():
    result = metrics.compute_metrics("instruction", ["{}"], ["{}"], json_schema={})
    assert metrics.headline_metric("instruction", result) == "schema_compliance"
