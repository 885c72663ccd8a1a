"""Tool-call evaluation: the `tool_call` metrics, held-out tool turns, the report."""

import doctest
import json
import types

import pytest

from gemma4_keras import config_lib
from gemma4_keras.data import records, tool_format
from gemma4_keras.eval import evaluate, metrics, report

WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "time", "parameters": {}}}


def call(name: str, **arguments) -> dict:
    return {"name": name, "arguments": arguments}


def text(*calls: dict) -> str:
    return "".join(tool_format.format_call(c) for c in calls)


def score(reference: list[dict], prediction: str, tools=None) -> dict:
    return metrics.tool_call_metrics(
        [reference], [prediction], tools=None if tools is None else [tools]
    )


# ----------------------------------------------------------------------------
# tool_call metrics
# ----------------------------------------------------------------------------


def test_an_exact_call_scores_one_everywhere():
    ref = [call("weather", city="Oslo", days=3)]
    m = score(ref, text(*ref), tools=[WEATHER])
    assert m == {
        "parse_rate": 1.0,
        "exact_call_match": 1.0,
        "function_name_accuracy": 1.0,
        "argument_precision": 1.0,
        "argument_recall": 1.0,
        "schema_valid_rate": 1.0,
    }


def test_a_wrong_function_name():
    m = score([call("weather", city="Oslo")], text(call("time", city="Oslo")))
    assert (m["exact_call_match"], m["function_name_accuracy"]) == (0.0, 0.0)
    # The triple is (call name, key, value): under another name it is wrong.
    assert (m["argument_precision"], m["argument_recall"]) == (0.0, 0.0)


def test_a_missing_argument_costs_recall_not_precision():
    m = score(
        [call("weather", city="Oslo", days=3)], text(call("weather", city="Oslo"))
    )
    assert m["exact_call_match"] == 0.0 and m["function_name_accuracy"] == 1.0
    assert (m["argument_precision"], m["argument_recall"]) == (1.0, 0.5)


def test_an_extra_argument_costs_precision_and_breaks_the_schema():
    pred = text(call("weather", city="Oslo", unit="C"))
    m = score([call("weather", city="Oslo")], pred, tools=[WEATHER])
    assert m["exact_call_match"] == 0.0
    assert (m["argument_precision"], m["argument_recall"]) == (0.5, 1.0)
    assert m["schema_valid_rate"] == 0.0  # additionalProperties: false


def test_a_malformed_call_does_not_parse():
    ref = [call("weather", city="Oslo")]
    cut = text(*ref)[:-5]  # generation stopped mid-call
    m = score(ref, cut)
    assert m["parse_rate"] == 0.0 and m["exact_call_match"] == 0.0
    assert m["function_name_accuracy"] == 0.0 and m["argument_recall"] == 0.0


def test_no_call_where_one_was_due_parses_but_is_wrong():
    m = score([call("weather", city="Oslo")], "It is cold in Oslo.")
    assert m["parse_rate"] == 1.0
    assert m["exact_call_match"] == m["function_name_accuracy"] == 0.0
    assert (m["argument_precision"], m["argument_recall"]) == (0.0, 0.0)


def test_schema_violations_and_undeclared_tools():
    ref = [call("weather", city="Oslo")]
    assert (
        score(ref, text(call("weather", city=3)), [WEATHER])["schema_valid_rate"] == 0
    )
    assert score(ref, text(call("weather")), [WEATHER])["schema_valid_rate"] == 0
    assert (
        score(ref, text(call("radar", city="Oslo")), [WEATHER])["schema_valid_rate"]
        == 0
    )
    # A declaration without parameters takes any arguments.
    assert score(ref, text(call("time", zone="UTC")), [TIME])["schema_valid_rate"] == 1
    # Micro-averaged over the predicted calls.
    two = text(call("weather", city="Oslo"), call("weather", city=3))
    assert score(ref, two, [WEATHER])["schema_valid_rate"] == 0.5


def test_parallel_calls_match_in_any_order():
    ref = [call("weather", city="Oslo"), call("weather", city="Rome"), call("time")]
    pred = text(
        call("time"), call("weather", city="Rome"), call("weather", city="Oslo")
    )
    m = score(ref, pred, [WEATHER, TIME])
    assert m["exact_call_match"] == m["function_name_accuracy"] == 1.0
    assert m["schema_valid_rate"] == 1.0
    # A repeated call is not the same multiset.
    twice = text(
        call("weather", city="Oslo"), call("weather", city="Oslo"), call("time")
    )
    m = score(ref, twice)
    assert m["exact_call_match"] == 0.0 and m["function_name_accuracy"] == 1.0
    assert (m["argument_precision"], m["argument_recall"]) == (0.5, 0.5)


def test_numbers_compare_as_json_values():
    ref = [call("weather", city="Oslo", days=1)]
    assert (
        score(ref, text(call("weather", city="Oslo", days=1.0)))["exact_call_match"]
        == 1.0
    )
    nested = [call("f", x={"a": [1, 2.5]})]
    assert score(nested, text(call("f", x={"a": [1.0, 2.5]})))["exact_call_match"] == 1
    # true is not 1.
    assert score([call("f", x=1)], text(call("f", x=True)))["exact_call_match"] == 0


def test_scores_average_over_examples():
    refs = [[call("weather", city="Oslo")], [call("time")]]
    preds = [text(call("weather", city="Oslo")), text(call("weather", city="Oslo"))]
    m = metrics.tool_call_metrics(refs, preds)
    assert (m["exact_call_match"], m["function_name_accuracy"]) == (0.5, 0.5)
    # Micro average: 1 right of 2 predicted triples, 1 of 1 reference triple.
    assert (m["argument_precision"], m["argument_recall"]) == (0.5, 1.0)


def test_no_argument_on_either_side_is_perfect():
    m = score([call("time")], text(call("time")))
    assert (m["argument_precision"], m["argument_recall"]) == (1.0, 1.0)


def test_compute_metrics_dispatches_and_infers_tool_call():
    refs = [[call("time")]]
    for task in ("tool_call", None):
        m = metrics.compute_metrics(task, refs, [text(call("time"))], tools=[[TIME]])
        assert (m["task_type"], m["num_examples"], m["exact_call_match"]) == (
            "tool_call",
            1,
            1.0,
        )
    assert metrics.headline_metric("tool_call") == "exact_call_match"
    assert "tool_call" in config_lib.TASK_TYPES


@pytest.mark.parametrize(
    "references, predictions, options, error, message",
    [
        (["weather"], ["x"], {}, TypeError, r"references\[0\] is 'weather'"),
        ([[{"arguments": {}}]], ["x"], {}, TypeError, "lists of calls"),
        ([[]], ["x", "y"], {}, ValueError, "aligned one to one"),
        ([], [], {}, ValueError, "No examples"),
        ([[]], ["x"], {"tools": []}, ValueError, "one list of declarations"),
        ([[]], ["x"], {"labels": ["a"]}, ValueError, "do not apply to task type"),
    ],
)
def test_bad_tool_call_inputs_are_named(
    references, predictions, options, error, message
):
    with pytest.raises(error, match=message):
        metrics.compute_metrics("tool_call", references, predictions, **options)


# ----------------------------------------------------------------------------
# Held-out tool turns
# ----------------------------------------------------------------------------


def conversation(messages, tools=(WEATHER,)) -> records.Conversation:
    normalised = records.validate_messages(messages)
    return records.Conversation(messages=normalised, source="t", tools=list(tools))


ASK = {"role": "user", "content": "Weather in Oslo?"}
CALLS = {
    "role": "assistant",
    "tool_calls": [
        {"id": "1", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}
    ],
}
RESULT = {"role": "tool", "tool_call_id": "1", "content": '{"temp": -2}'}
ANSWER = {"role": "assistant", "content": "It is -2 C."}


def test_evaluate_docstring_examples():
    for name in ("reference_text", "split_prompt"):
        function = getattr(evaluate, name)
        runner = doctest.DocTestRunner()
        for test in doctest.DocTestFinder().find(function, name, globs=vars(evaluate)):
            runner.run(test)
        assert runner.failures == 0, name


def test_split_prompt_of_a_plain_turn_is_unchanged():
    conv = conversation(
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ],
        tools=(),
    )
    assert evaluate.split_prompt(conv) == (conv.messages[:-1], "d")
    example = evaluate.held_out(conv)
    assert (example.calls, example.answer_prompt, example.tools) == (None, None, [])


def test_a_tool_turn_with_results_and_answer():
    conv = conversation([ASK, CALLS, RESULT, ANSWER])
    example = evaluate.held_out(conv)
    assert example.prompt == conv.messages[:1]
    assert example.calls == [call("weather", city="Oslo")]  # the id is dropped
    assert example.reference == text(call("weather", city="Oslo"))
    # Teacher-forced: the reference calls and their results.
    assert example.answer_prompt == conv.messages[:-1]
    assert example.answer_prompt[-1]["tool_responses"]
    assert example.answer == "It is -2 C."
    assert example.tools == [WEATHER]


def test_a_turn_ending_on_its_calls_has_no_answer_to_generate():
    example = evaluate.held_out(conversation([ASK, CALLS]))
    assert example.calls and example.answer_prompt is None and example.answer is None


def mixed_examples() -> list[evaluate.HeldOut]:
    return [
        evaluate.held_out(conversation([ASK, CALLS, RESULT, ANSWER])),
        evaluate.held_out(conversation([ASK, CALLS])),
        evaluate.held_out(
            conversation(
                [
                    {"role": "user", "content": "Hi"},
                    {"role": "model", "content": "Hello"},
                ]
            )
        ),
    ]


def test_jobs_put_the_answers_after_the_first_generations():
    examples = mixed_examples()
    prompts, tools = evaluate._jobs(examples)
    assert prompts == [e.prompt for e in examples] + [examples[0].answer_prompt]
    assert tools == [[WEATHER], [WEATHER], [WEATHER], [WEATHER]]


def test_score_of_a_mixed_holdout():
    examples = mixed_examples()
    right = text(call("weather", city="Oslo"))
    outputs = [right, text(call("weather", city="Rome")), "Hello", "It is -2 C."]
    result = evaluate.score(examples, outputs, None)
    assert result["task_type"] == "tool_call" and result["num_examples"] == 2
    assert result["exact_call_match"] == 0.5 and result["schema_valid_rate"] == 1.0
    answer = result[evaluate.ANSWER_BLOCK]
    assert answer["num_examples"] == 1 and answer["task_type"] == "extraction"
    assert answer["exact_match"] == 1.0
    plain = result[evaluate.TEXT_BLOCK]
    assert plain == metrics.compute_metrics(None, ["Hello"], ["Hello"])
    rows = evaluate.example_rows(examples, outputs, result)
    assert [r["block"] for r in rows] == [
        "tool_call",
        "tool_call",
        "without_tool_calls",
        "answer_after_tool",
    ]
    assert rows[0]["reference"] == right and rows[3]["reference"] == "It is -2 C."
    assert (
        rows[3]["prompt"] == "Weather in Oslo?" and rows[2]["task_type"] == "extraction"
    )


def test_score_without_tools_is_the_plain_metrics():
    conv = conversation(
        [{"role": "user", "content": "Hi"}, {"role": "model", "content": "Hello"}],
        tools=(),
    )
    examples = [evaluate.held_out(conv)] * 4
    outputs = ["Hello", "Hello", "Bye", "Hello"]
    refs = ["Hello"] * 4
    assert evaluate.score(examples, outputs, None) == metrics.compute_metrics(
        None, refs, outputs
    )
    assert evaluate.example_rows(examples, outputs, {"task_type": "x"}) == [
        {"prompt": "Hi", "reference": "Hello", "prediction": y} for y in outputs
    ]


def test_thoughts_are_not_scored_as_the_answer():
    conv = conversation(
        [{"role": "user", "content": "Hi"}, {"role": "model", "content": "Hello"}],
        tools=(),
    )
    thought = "<|channel>thought\nsay hello<channel|>Hello"
    result = evaluate.score([evaluate.held_out(conv)], [thought], "extraction")
    assert result["exact_match"] == 1.0


# ----------------------------------------------------------------------------
# evaluate_holdout with a scripted model, and the report
# ----------------------------------------------------------------------------


class ScriptedGenerator:
    """Answers every prompt right with the adapter on, wrong with it off."""

    def __init__(self, model):
        self.model = model
        self.calls = []

    def generate(self, prompts, *, tools=None, max_new_tokens, batch_size):
        self.calls.append((prompts, tools))
        tuned = self.model.active_adapter is not None
        out = []
        for messages in prompts:
            if messages[-1].get("tool_responses"):
                out.append("It is -2 C." if tuned else "No idea.")
            elif messages[-1]["content"] == "Hi":
                out.append("Hello" if tuned else "Hey")
            else:
                city = "Oslo" if tuned else "Rome"
                out.append(text(call("weather", city=city)))
        return out


class FakeModel:
    def __init__(self):
        self.active_adapter = "default"

    def set_adapter(self, name):
        self.active_adapter = name


@pytest.fixture
def scripted(monkeypatch):
    made = []

    def from_model(model, tokenizer, **kwargs):
        made.append(ScriptedGenerator(model))
        return made[-1]

    monkeypatch.setattr(
        evaluate, "Generator", types.SimpleNamespace(from_model=from_model)
    )
    monkeypatch.setattr(evaluate.decoding, "base_precision", lambda model: "float32")
    return made


def run_config(task_type: str = ""):
    config = config_lib.get_config("tiny", "lora", "runlocal")
    config.eval.task_type = task_type
    config.eval.compare_base = True
    return config


def test_evaluate_holdout_reports_tool_metrics(scripted, tmp_path):
    holdout = [
        conversation([ASK, CALLS, RESULT, ANSWER]),
        conversation([ASK, CALLS]),
        conversation(
            [{"role": "user", "content": "Hi"}, {"role": "model", "content": "Hello"}]
        ),
    ]
    summary = evaluate.evaluate_holdout(
        FakeModel(), None, holdout, run_config(), str(tmp_path), template="small"
    )
    assert summary["metric"] == "exact_call_match"
    assert (summary["finetuned"], summary["base"]) == (1.0, 0.0)
    assert summary["answer_after_tool"] == {
        "metric": "exact_match",
        "finetuned": 1.0,
        "base": 0.0,
    }
    assert summary["without_tool_calls"]["metric"] == "exact_match"
    assert summary["num_examples"] == 3
    # One generation per model for all prompts, the declarations shown.
    (gen,) = scripted
    assert len(gen.calls) == 2 and len(gen.calls[0][0]) == 4
    assert gen.calls[0][1] == [[WEATHER]] * 4

    saved = json.loads((tmp_path / "eval_report.json").read_text())
    assert saved["headline_metric"] == "exact_call_match"
    assert saved["models"]["finetuned"]["answer_after_tool"]["exact_match"] == 1.0
    assert saved["deltas"]["exact_call_match"] == 1.0
    assert saved["block_deltas"]["answer_after_tool"]["exact_match"] == 1.0
    markdown = (tmp_path / "eval_report.md").read_text()
    assert "Task type: tool_call" in markdown
    assert "| **exact_call_match** | 0.0000 | 1.0000 | +1.0000 |" in markdown
    assert "## answer_after_tool (task type: extraction)" in markdown
    assert "## without_tool_calls (task type: extraction)" in markdown
    rows = [
        json.loads(line)
        for line in (tmp_path / "predictions.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 4 and rows[-1]["block"] == "answer_after_tool"
    assert rows[0]["prediction_finetuned"] == text(call("weather", city="Oslo"))


def test_evaluate_holdout_without_tools_is_unchanged(scripted, tmp_path):
    holdout = [
        conversation(
            [{"role": "user", "content": "Hi"}, {"role": "model", "content": "Hello"}],
            tools=(),
        )
    ] * 2
    summary = evaluate.evaluate_holdout(
        FakeModel(), None, holdout, run_config(), str(tmp_path), template="small"
    )
    assert list(summary) == [
        "metric",
        "finetuned",
        "base",
        "evaluated_on",
        "report",
        "num_examples",
    ]
    assert scripted[0].calls[0][1] is None  # no declarations: prompts as before
    saved = json.loads((tmp_path / "eval_report.json").read_text())
    assert "block_deltas" not in saved
    rows = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert json.loads(rows[0]) == {
        "prompt": "Hi",
        "reference": "Hello",
        "prediction_base": "Hey",
        "prediction_finetuned": "Hello",
    }


def test_task_type_tool_call_needs_tool_turns(scripted, tmp_path):
    holdout = [
        conversation(
            [{"role": "user", "content": "Hi"}, {"role": "model", "content": "Hello"}]
        )
    ]
    with pytest.raises(config_lib.ConfigError, match="task_type=tool_call"):
        evaluate.evaluate_holdout(
            FakeModel(),
            None,
            holdout,
            run_config("tool_call"),
            str(tmp_path),
            template="small",
        )


def test_report_tables_show_the_blocks():
    results = {
        "base": {
            "task_type": "tool_call",
            "exact_call_match": 0.0,
            "answer_after_tool": {"task_type": "extraction", "exact_match": 0.5},
        },
        "finetuned": {
            "task_type": "tool_call",
            "exact_call_match": 1.0,
            "answer_after_tool": {"task_type": "extraction", "exact_match": 1.0},
        },
    }
    tables = report.format_all_tables(results)
    assert tables.startswith(report.format_metrics_table(results))
    assert "answer_after_tool (task type: extraction):" in tables
    assert "| **exact_match** | 0.5000 | 1.0000 | +0.5000 |" in tables
    plain = {"finetuned": {"task_type": "extraction", "exact_match": 1.0}}
    assert report.format_all_tables(plain) == report.format_metrics_table(plain)
