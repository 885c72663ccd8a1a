"""Base vs fine-tuned evaluation on held-out conversations.

Each held-out conversation is cut before its last model turn; the model
generates that turn from the exact serving prompt, and task metrics compare
it with the reference. Both columns come from the one training model, with
the adapter switched off (base) and on (fine-tuned): the fine-tuned column
is the adapter on the base it trained against (e.g. NF4 under QLoRA), as it
will be served, and no second copy of the base is loaded. The report names
what it evaluated (`evaluated_on`, e.g. "nf4 + adapter").

Tool use: a held-out model turn that calls tools is scored as `tool_call`
(the calls the model writes from the prompt up to the last user message,
against the turn's first calls); when the turn goes on to a final answer
after the reference results, that answer is also generated from the
teacher-forced prompt (reference calls and results) and scored with the
text metrics, as the block `answer_after_tool`. The other held-out turns of
a mixed split are scored as usual, as the block `without_tool_calls`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from absl import logging

from gemma4_keras import config_lib, data, outputs, workdir_lock
from gemma4_keras.data import chat, tool_format
from gemma4_keras.eval import metrics, report
from gemma4_keras.eval.generate import Generator, load_model, parse_answer
from gemma4_keras.exporters import peft
from gemma4_keras.model import decoding, lora, presets

TOOL_BLOCK = "tool_call"
ANSWER_BLOCK = "answer_after_tool"  # the final answer after reference results
TEXT_BLOCK = "without_tool_calls"  # held-out turns that call no tool (mixed split)


def reference_text(message: dict) -> str:
    """What the model writes for a model message: its calls, then its text.

    >>> reference_text({"role": "model", "content": "",
    ...                 "tool_calls": [{"name": "f", "arguments": {"x": 1}}]})
    '<|tool_call>call:f{x:1}<tool_call|>'
    """
    calls = message.get("tool_calls") or []
    return "".join(tool_format.format_call(c) for c in calls) + message["content"]


def split_prompt(conversation) -> tuple[list[dict], str]:
    """(messages up to the last user message, what the model writes first).

    The last model turn may span several model messages (calls, results,
    answer); the reference is its first message (`reference_text`).

    Example:
      >>> split_prompt(data.Conversation(messages=[
      ...     {"role": "user", "content": "Hi"}, {"role": "model", "content": "Hello"}]))
      ([{'role': 'user', 'content': 'Hi'}], 'Hello')
    """
    messages = list(conversation.messages)
    if not messages or messages[-1]["role"] != "model":
        raise ValueError(f"{conversation.source}: does not end with a model turn")
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    cut = users[-1] + 1 if users else len(messages) - 1
    return messages[:cut], reference_text(messages[cut])


@dataclasses.dataclass
class HeldOut:
    """One held-out conversation, cut for generation.

    Attributes:
      prompt: the messages up to and including the last user message.
      tools: the conversation's tool declarations.
      reference: what the model should write first (`reference_text`).
      calls: the calls of the turn's first model message; None when it
        calls no tool.
      answer_prompt: every message before the turn's final answer (the
        reference calls and their results), when the turn has one after
        tool results; else None.
      answer: that final answer's text.
    """

    prompt: list[dict]
    tools: list[dict]
    reference: str
    calls: list[dict] | None = None
    answer_prompt: list[dict] | None = None
    answer: str | None = None


def held_out(conversation) -> HeldOut:
    """A held-out conversation as `HeldOut` (see there)."""
    prompt, reference = split_prompt(conversation)
    messages = list(conversation.messages)
    turn = messages[len(prompt) :]
    example = HeldOut(prompt, list(getattr(conversation, "tools", []) or []), reference)
    if turn[0].get("tool_calls"):
        example.calls = [
            {"name": c["name"], "arguments": c["arguments"]}
            for c in turn[0]["tool_calls"]
        ]
        if len(turn) > 1 and not turn[-1].get("tool_calls"):
            example.answer_prompt, example.answer = messages[:-1], turn[-1]["content"]
    return example


def _scored_text(text: str) -> str:
    """The answer of a generation: without thoughts and call blocks, if any."""
    controls = (chat.CHANNEL_OPEN, chat.CHANNEL_CLOSE, tool_format.CALL_OPEN)
    if not any(token in text for token in controls):
        return text
    return parse_answer(text)["content"]


def _jobs(examples: list[HeldOut]) -> tuple[list[list[dict]], list[list[dict]]]:
    """(prompts, tools) to generate: every example, then the answers after tools."""
    prompts = [e.prompt for e in examples]
    prompts += [e.answer_prompt for e in examples if e.answer_prompt is not None]
    tools = [e.tools for e in examples]
    tools += [e.tools for e in examples if e.answer_prompt is not None]
    return prompts, tools


def _blocks(examples: list[HeldOut], outputs: list[str], task: str | None) -> dict:
    """{block: (task type, references, predictions, options)} to score."""
    firsts, answers = outputs[: len(examples)], outputs[len(examples) :]
    tool = [(e, y) for e, y in zip(examples, firsts) if e.calls is not None]
    text = [(e, _scored_text(y)) for e, y in zip(examples, firsts) if e.calls is None]
    answered = [e for e in examples if e.answer_prompt is not None]
    blocks = {}
    if tool:
        options = {"tools": [e.tools for e, _ in tool]}
        calls = [e.calls for e, _ in tool]
        blocks[TOOL_BLOCK] = ("tool_call", calls, [y for _, y in tool], options)
    if text:
        blocks[TEXT_BLOCK] = (
            task,
            [e.reference for e, _ in text],
            [y for _, y in text],
            {},
        )
    if answered:
        preds = [_scored_text(y) for y in answers]
        blocks[ANSWER_BLOCK] = (task, [e.answer for e in answered], preds, {})
    return blocks


def score(examples: list[HeldOut], outputs: list[str], task: str | None) -> dict:
    """Metrics of one model's generations (in `_jobs` order).

    Without tool examples: `compute_metrics(task, ...)` of the answers, as
    ever. With them: the tool metrics, holding the blocks `answer_after_tool`
    and `without_tool_calls` (text metrics, `task` or inferred).
    """
    blocks = {
        name: metrics.compute_metrics(kind, refs, preds, **options)
        for name, (kind, refs, preds, options) in _blocks(
            examples, outputs, task
        ).items()
    }
    if TOOL_BLOCK not in blocks:
        return blocks[TEXT_BLOCK]
    result = dict(blocks.pop(TOOL_BLOCK))
    for name in (ANSWER_BLOCK, TEXT_BLOCK):
        if name in blocks:
            result[name] = blocks[name]
    return result


def example_rows(
    examples: list[HeldOut], outputs: list[str], result: dict
) -> list[dict]:
    """predictions.jsonl rows of one model (`score`'s `result`).

    One `{"prompt", "reference", "prediction"}` per example; with tool
    examples each row also names its `block` and `task_type`, and the
    `answer_after_tool` rows follow.
    """
    firsts, answers = outputs[: len(examples)], outputs[len(examples) :]
    rows = [
        {"prompt": e.prompt[-1]["content"], "reference": e.reference, "prediction": y}
        for e, y in zip(examples, firsts)
    ]
    if result.get("task_type") != "tool_call":
        return rows
    for e, row in zip(examples, rows):
        block = TOOL_BLOCK if e.calls is not None else TEXT_BLOCK
        kind = result[block]["task_type"] if block == TEXT_BLOCK else "tool_call"
        row.update(block=block, task_type=kind)
    answered = [e for e in examples if e.answer_prompt is not None]
    for e, y in zip(answered, answers):
        row = {"prompt": e.prompt[-1]["content"], "reference": e.answer}
        kind = result[ANSWER_BLOCK]["task_type"]
        rows.append({**row, "prediction": y, "block": ANSWER_BLOCK, "task_type": kind})
    return rows


def _answer_task(task_type: str) -> str | None:
    """The task type of the text answers: the configured one, else inferred."""
    return None if task_type in ("", "tool_call") else task_type


def evaluate_holdout(
    model,
    tokenizer,
    conversations,
    config,
    out_dir: str,
    *,
    template: str,
    train_log: str | None = None,
) -> dict:
    """Generates with the adapter off and on; writes the report to `out_dir`.

    Args:
      model: the `Gemma4LoraModel` with the adapter to evaluate active (the
        model that trained, or `generate.load_model` of a saved run).
      template: the run's resolved chat template variant (small | large).

    Returns:
      A summary: headline metric name, base and fine-tuned values, what
      they were evaluated on, and the report path; with tool examples also
      one `{"metric", "finetuned", "base"}` per further block.

    Example:
      >>> evaluate_holdout(model, tokenizer, holdout, config, "run/eval", template="small")
      {'metric': 'accuracy', 'finetuned': 0.89, 'base': 0.0, ...}
    """
    adapter = model.active_adapter
    if adapter is None:
        raise ValueError("the model has no active adapter to evaluate")
    ev = config.eval
    convs = list(conversations)
    if ev.max_examples >= 0:
        convs = convs[: ev.max_examples]
    examples = [held_out(c) for c in convs]
    if not examples:
        raise ValueError("no held-out conversation to evaluate")
    _check_task_type(ev.task_type, examples)
    prompts, tools = _jobs(examples)
    shown = tools if any(tools) else None  # no declaration: the prompts as ever

    def generator(m):
        return Generator.from_model(
            m,
            tokenizer,
            template=template,
            enable_thinking=bool(config.data.enable_thinking),
        )

    def generate(gen):
        return gen.generate(
            prompts,
            tools=shown,
            max_new_tokens=ev.max_new_tokens,
            batch_size=ev.batch_size,
        )

    gen = generator(model)  # one compiled decoder for adapter off and on

    precision = decoding.base_precision(model)
    evaluated_on = {"base": precision, "finetuned": f"{precision} + adapter"}
    predictions = {}
    if ev.compare_base:
        model.set_adapter(None)
        try:
            predictions["base"] = generate(gen)
        finally:
            model.set_adapter(adapter)
    predictions["finetuned"] = generate(gen)
    if ev.merged:
        merged = merged_model(model, config)
        evaluated_on["merged"] = f"{decoding.base_precision(merged)}, merged"
        predictions["merged"] = generate(generator(merged))
        del merged
    task = _answer_task(ev.task_type)
    results = {
        k: {**score(examples, v, task), "evaluated_on": evaluated_on[k]}
        for k, v in predictions.items()
    }
    rows = {k: example_rows(examples, v, results[k]) for k, v in predictions.items()}
    paths = report.write_eval_report(
        out_dir,
        results=results,
        examples=rows,
        train_log_csv=train_log,
        title="Gemma 4 fine-tuning evaluation, on "
        + " and ".join(f"{v} ({k})" for k, v in evaluated_on.items() if k in results),
    )
    summary = _summary(results, evaluated_on["finetuned"], str(paths["markdown"]))
    summary["num_examples"] = len(convs)
    print(report.format_all_tables(results), flush=True)
    logging.info("eval: %s", summary)
    return summary


def _check_task_type(task_type: str, examples: list[HeldOut]) -> None:
    if task_type == "tool_call" and not any(e.calls is not None for e in examples):
        raise config_lib.ConfigError(
            "--config.eval.task_type=tool_call, but no held-out model turn calls a "
            "tool; evaluate on conversations with tool_calls, or leave it empty"
        )


def _headline(results: dict, block: str | None = None) -> dict:
    """{"metric", "finetuned", "base"} of `results` (or of one of its blocks)."""
    tuned = results["finetuned"] if block is None else results["finetuned"][block]
    base = results.get("base", {})
    base = base if block is None else base.get(block, {})
    head = metrics.headline_metric(tuned["task_type"])
    return {"metric": head, "finetuned": tuned.get(head), "base": base.get(head)}


def _summary(results: dict, evaluated_on: str, markdown: str) -> dict:
    summary = {**_headline(results), "evaluated_on": evaluated_on}
    summary["report"] = markdown
    for block in report.metric_blocks(results):
        summary[block] = _headline(results, block)
    return summary


def _unquantised_config(config):
    """A copy of `config` whose base is read unquantised (the projections,
    the experts and the tied embedding in `model.dtype`): what merged
    exports serve."""
    unquantised = config.copy_and_resolve_references()
    unquantised.quant.mode = "none"
    unquantised.quant.embedding = "none"
    return unquantised


def merged_model(model, config):
    """An unquantised base in `config.model.dtype` with `model`'s active
    adapter merged into its kernels (`lora.merge_adapter`): what a merged
    export (`--format=hf|gguf|keras`) serves. Built beside `model`.
    """
    unquantised = _unquantised_config(config)
    preset = presets.resolve_preset(config.model.preset)
    merged = load_model(unquantised, preset, lora.adapter_factors(model))
    lora.merge_adapter(merged, "default")
    return merged


def check_adapter(workdir: str) -> str:
    """`workdir/adapter`; FileNotFoundError saying what to do when it is missing."""
    adapter = os.path.join(workdir, "adapter")
    if not os.path.isdir(adapter):
        raise FileNotFoundError(
            f"{adapter} is missing: train first (gemma4-keras train "
            f"--workdir={workdir}) or point --workdir at a finished run"
        )
    return adapter


def evaluate_workdir(config, workdir: str, out_dir: str | None = None) -> dict:
    """The held-out split (or data.eval_path) of a run, reported in `out_dir`.

    `out_dir` defaults to `workdir/eval`. `gemma4-keras evaluate`
    (`run.api.evaluate`) checks the run's identity and picks `out_dir` first
    (`run.identity.report_dir`).
    """

    adapter = check_adapter(workdir)
    out_dir = out_dir or os.path.join(workdir, "eval")
    outputs.check_writable(out_dir)  # read-only storage: before the model loads
    with workdir_lock.hold(workdir, "evaluate", reader=True):
        preset = presets.resolve_preset(config.model.preset)
        tokenizer = presets.load_tokenizer(preset)
        template = presets.chat_template(config, preset).variant
        settings = config_lib.data_settings(config.data, template)
        prepared = data.prepare(settings, tokenizer, presets.processor_settings(preset))
        if not prepared.holdout:
            raise data.DataError(
                f"{settings.path}: no held-out "
                "example to evaluate on; raise data.holdout_fraction, add data, or "
                "set data.eval_path"
            )
        train_log = os.path.join(workdir, "train_log.csv")
        report.read_loss_log(train_log)  # a garbled log stops here, not half-way
        model = load_model(config, preset, peft.read_adapter(adapter), source=adapter)
        return evaluate_holdout(
            model,
            tokenizer,
            prepared.holdout,
            config,
            out_dir,
            template=template,
            train_log=train_log,
        )


def verify_inputs(config, workdir: str, n: int) -> tuple:
    """(load_model, prompts, plain) for `export --verify` (`exporters/verify.py`).

    `load_model()` builds the run's adapter on the unquantised base (what
    every export serves; `model.set_adapter(None)` gives the base); prompts
    are the token ids of the first `n` held-out prompts as `evaluate`
    renders them; plain is the id of a plain-text token ("a").
    """
    adapter = check_adapter(workdir)
    unquantised = _unquantised_config(config)
    preset = presets.resolve_preset(config.model.preset)
    tokenizer = presets.load_tokenizer(preset)
    template = presets.chat_template(config, preset).variant
    settings = config_lib.data_settings(config.data, template)
    processor = presets.processor_settings(preset)
    prepared = data.prepare(settings, tokenizer, processor)
    examples = [held_out(c) for c in prepared.holdout[:n]]
    if not examples:
        raise data.DataError(
            f"{settings.path}: no held-out example to verify the export on; raise "
            "data.holdout_fraction or set data.eval_path"
        )
    generator = Generator(
        None,
        tokenizer,
        template=template,
        enable_thinking=bool(config.data.enable_thinking),
    )
    prompts = generator.prompt_ids(
        [e.prompt for e in examples], [e.tools for e in examples]
    )
    factors = peft.read_adapter(adapter)  # a bad adapter stops here, before any load

    def load() -> Any:
        return load_model(unquantised, preset, factors, source=adapter)

    return load, prompts, int(tokenizer.token_to_id("a"))
