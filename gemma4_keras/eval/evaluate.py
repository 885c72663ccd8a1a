"""Base vs fine-tuned evaluation on held-out conversations.

Each held-out conversation is cut before its last model turn; the model
generates that turn from the exact serving prompt, and task metrics compare
it with the reference. The untouched base model and the fine-tuned model run
on the same prompts, through KerasHub's cached generation (the adapter is
merged into a freshly loaded backbone for the fine-tuned pass).
"""

from __future__ import annotations

import os

from absl import logging

from gemma4_keras import config_lib, data, workdir_lock
from gemma4_keras.eval import metrics, report
from gemma4_keras.eval.generate import Generator
from gemma4_keras.export import peft
from gemma4_keras.model import hub, lora, presets


def split_prompt(conversation) -> tuple[list[dict], str]:
    """(messages up to the last user turn, reference answer)."""
    messages = list(conversation.messages)
    if not messages or messages[-1]["role"] != "model":
        raise ValueError(f"{conversation.source}: does not end with a model turn")
    return messages[:-1], messages[-1]["content"]


def evaluate_holdout(
    deltas: dict,
    tokenizer,
    preset: str,
    conversations,
    config,
    out_dir: str,
    *,
    template: str,
    train_log: str | None = None,
) -> dict:
    """Generates with base and fine-tuned models; writes the report to `out_dir`.

    `template` is the run's resolved chat template variant (small | large).

    `deltas` are the adapter's (in, out) weight deltas (`lora.model_deltas`
    or `lora.deltas` of `peft.read_adapter`). Returns a summary: headline metric name, base and fine-tuned values and
    the report path.
    """
    ev = config.eval
    convs = list(conversations)
    if ev.max_examples >= 0:
        convs = convs[: ev.max_examples]
    prompts, refs = zip(*(split_prompt(c) for c in convs)) if convs else ((), ())
    backbone = presets.load_backbone(preset, presets.compute_dtype(config.model))
    gen = Generator(
        backbone,
        tokenizer,
        template=template,
        enable_thinking=bool(config.data.enable_thinking),
    )
    predictions = {}
    if ev.compare_base:
        predictions["base"] = gen.generate(
            list(prompts), max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size
        )
    hub.apply_deltas(backbone, deltas)
    predictions["finetuned"] = gen.generate(
        list(prompts), max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size
    )
    task = ev.task_type or None
    results = {
        k: metrics.compute_metrics(task, list(refs), v) for k, v in predictions.items()
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
        out_dir, results=results, examples=examples, train_log_csv=train_log
    )
    task_type = results["finetuned"]["task_type"]
    head = metrics.headline_metric(task_type)
    summary = {
        "metric": head,
        "finetuned": results["finetuned"].get(head),
        "base": results.get("base", {}).get(head),
        "report": str(paths["markdown"]),
        "num_examples": len(convs),
    }
    print(report.format_metrics_table(results), flush=True)
    logging.info("eval: %s", summary)
    return summary


def evaluate_workdir(config, workdir: str, out_dir: str | None = None) -> dict:
    """`gemma4-keras evaluate`: the held-out split (or data.eval_path) of a run."""

    adapter = os.path.join(workdir, "adapter")
    if not os.path.isdir(adapter):
        raise FileNotFoundError(
            f"{adapter} is missing: train first (gemma4-keras train "
            f"--workdir={workdir}) or point --workdir at a finished run"
        )

    with workdir_lock.hold(workdir, "evaluate"):
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
        return evaluate_holdout(
            lora.deltas(*peft.read_adapter(adapter)),
            tokenizer,
            preset,
            prepared.holdout,
            config,
            out_dir or os.path.join(workdir, "eval"),
            template=template,
            train_log=os.path.join(workdir, "train_log.csv"),
        )
