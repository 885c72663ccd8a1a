"""Base vs fine-tuned evaluation on held-out conversations.

Each held-out conversation is cut before its last model turn; the model
generates that turn from the exact serving prompt, and task metrics compare
it with the reference. Both columns come from the one training model, with
the adapter switched off (base) and on (fine-tuned): the fine-tuned column
is the adapter on the base it trained against (e.g. NF4 under QLoRA), as it
will be served, and no second copy of the base is loaded. The report names
what it evaluated (`evaluated_on`, e.g. "nf4 + adapter").
"""

from __future__ import annotations

import os

from absl import logging

from gemma4_keras import config_lib, data, outputs, workdir_lock
from gemma4_keras.eval import metrics, report
from gemma4_keras.eval.generate import Generator, load_model
from gemma4_keras.export import peft
from gemma4_keras.model import decoding, lora, presets


def split_prompt(conversation) -> tuple[list[dict], str]:
    """(messages up to the last user turn, reference answer)."""
    messages = list(conversation.messages)
    if not messages or messages[-1]["role"] != "model":
        raise ValueError(f"{conversation.source}: does not end with a model turn")
    return messages[:-1], messages[-1]["content"]


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
      they were evaluated on, and the report path.

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
    prompts, refs = zip(*(split_prompt(c) for c in convs)) if convs else ((), ())

    def generator(m):
        return Generator.from_model(
            m,
            tokenizer,
            template=template,
            enable_thinking=bool(config.data.enable_thinking),
        )

    def generate(gen):
        return gen.generate(
            list(prompts), max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size
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
    task = ev.task_type or None
    results = {
        k: {
            **metrics.compute_metrics(task, list(refs), v),
            "evaluated_on": evaluated_on[k],
        }
        for k, v in predictions.items()
    }
    prompt_text = [p[-1]["content"] for p in prompts]
    examples = {
        k: [
            {"prompt": p, "reference": r, "prediction": y}
            for p, r, y in zip(prompt_text, refs, v)
        ]
        for k, v in predictions.items()
    }
    paths = report.write_eval_report(
        out_dir,
        results=results,
        examples=examples,
        train_log_csv=train_log,
        title="Gemma 4 fine-tuning evaluation, on "
        + " and ".join(f"{v} ({k})" for k, v in evaluated_on.items() if k in results),
    )
    task_type = results["finetuned"]["task_type"]
    head = metrics.headline_metric(task_type)
    summary = {
        "metric": head,
        "finetuned": results["finetuned"].get(head),
        "base": results.get("base", {}).get(head),
        "evaluated_on": evaluated_on["finetuned"],
        "report": str(paths["markdown"]),
        "num_examples": len(convs),
    }
    print(report.format_metrics_table(results), flush=True)
    logging.info("eval: %s", summary)
    return summary


def merged_model(model, config):
    """An unquantised base in `config.model.dtype` with `model`'s active
    adapter merged into its kernels (`lora.merge_adapter`): what a merged
    export (`--format=hf|gguf|keras`) serves. Built beside `model`.
    """
    unquantised = config.copy_and_resolve_references()
    unquantised.quant.mode = "none"
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
        prepared = data.prepare(settings, tokenizer)
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
