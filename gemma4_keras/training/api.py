"""The public API's implementation (`import gemma4_keras` re-exports it by name).

Each function takes a whole run config (`get_config`) and delegates to the
builders of the package. `gemma4-keras <command>` (`cli.py`) is a thin shell
over this module: it parses flags into a config and calls the function a
notebook calls, so both doors do the same thing. The package root resolves
these names on first use, so `import gemma4_keras` stays light.

Bring your own `fit` (the recipe is in the package's docstring): the
package's callbacks (`training.callbacks`: progress, NaN guard,
overfitting alarm, ...; `checkpointing.CheckpointCallback`) number
optimiser steps by the optimiser's count, so in this `fit` they act at the
same steps as in `run`, whatever an epoch is.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from gemma4_keras import _quiet

# TensorFlow (which KerasHub imports for its tokenizers) prints start-up
# lines no user can act on: every entry to the API (the CLI, a notebook's
# first `g4.run`) imports the libraries with them filtered.
with _quiet.filtered_stderr():
    import jax
    import keras
    import keras_hub
    import ml_collections
    from absl import logging

    from gemma4_keras import __version__, config_lib, disk, outputs
    from gemma4_keras import data as data_lib
    from gemma4_keras.data import render as render_lib
    from gemma4_keras.eval import evaluate as evaluate_lib
    from gemma4_keras.eval import generate as generate_lib
    from gemma4_keras.eval import report as report_lib
    from gemma4_keras.eval import review as review_lib
    from gemma4_keras.exporters import commands as export_lib
    from gemma4_keras.exporters import peft
    from gemma4_keras.exporters import verify as verify_lib
    from gemma4_keras.model import plan as plan_lib
    from gemma4_keras.model import presets, safetensors_io
    from gemma4_keras.training import (
        checkpointing,
        distributed,
        identity,
        stopping,
        train,
    )
    from gemma4_keras.workdir_lock import WorkdirLockedError

# --- errors and start-up ------------------------------------------------------

# Errors that mean "the input or the machine is wrong", not "the package is":
# the CLI prints them as one line (`error_line`) and exits 1.
USER_ERRORS: tuple[type[BaseException], ...] = (
    config_lib.ConfigError,
    presets.PresetError,
    data_lib.DataError,
    checkpointing.CheckpointError,
    safetensors_io.CheckpointError,
    train.WorkdirError,
    WorkdirLockedError,
    peft.AdapterFormatError,
    export_lib.ExportError,
    generate_lib.PromptError,
    outputs.OutputError,
    report_lib.ReportError,
    review_lib.ReviewError,
    OSError,  # missing files, permissions, a full disk (disk.py)
)
COMPLETE = train.COMPLETE  # run statuses with an adapter and a report


def error_line(e: BaseException, where: str | None = None) -> str | None:
    """One line for a user error (file, line or flag, and what to do), or None.

    None: `e` is not a user error (a bug: show its traceback). `where` is the
    command's output directory, named when a full disk's error does not say.

    >>> error_line(config_lib.ConfigError("--config.lora.rank=0: must be > 0"))
    '--config.lora.rank=0: must be > 0'
    """
    full = disk.full_error(e)  # however the library words it: path, need, free
    if full is not None:
        if not full.filename:  # the library did not say where: the output
            full.filename = where
        return str(full)
    if not isinstance(e, USER_ERRORS):
        return None
    if isinstance(e, OSError) and not type(e).__module__.startswith("gemma4_keras"):
        return _os_error(e)
    if isinstance(e, data_lib.DataError):  # "file:line: problem" lines, by design
        return str(e)
    return " ".join(str(e).split())


def _os_error(e: OSError) -> str:
    """One line for an OSError: the file, what went wrong and what to do."""
    where = f"{e.filename}: " if e.filename else ""
    what = e.strerror or str(e)
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{where}{what}; check the permissions of the file and its directory (or pick another --workdir / --out)"
    return f"{where}{what}" if where else str(e)


def start(config=None) -> None:
    """Joins a multi-host run, starts the libraries, logs versions and devices.

    The order matters: JAX refuses `jax.distributed.initialize()` once
    anything has queried its devices, which starting the libraries does.
    `config`, when given, is logged too.
    """
    distributed.initialize()
    _quiet.start_libraries()
    logging.info(
        "gemma4_keras %s, keras %s, keras_hub %s, jax %s",
        __version__,
        keras.__version__,
        keras_hub.__version__,
        jax.__version__,
    )
    logging.info("devices: %s", jax.devices())
    if config is not None:
        logging.info("config:\n%s", config)


# --- config -----------------------------------------------------------------


def get_config(
    size: str,
    method: str,
    arg: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ml_collections.ConfigDict:
    """A locked, validated run config, as `--config=configs/<size>_<method>.py[:arg]`.

    Args:
      size: tiny, e2b, e4b, 26b_a4b or 31b.
      method: lora or qlora.
      arg: the config file's `:arg`: `runlocal` (a two-step run of the tiny
        model with this size's architecture features) or `embedded` (the
        embedded default, `configs/tiny.py`).
      overrides: `{"data.path": "train.jsonl", "lora.rank": 8}`, as
        `--config.data.path=train.jsonl --config.lora.rank=8`.

    Returns:
      A locked `ConfigDict`: setting a field that does not exist raises, as a
      misspelt `--config.<field>` does on the command line.

    Raises:
      ConfigError: an unknown size, method, switch or field, or a value
        `config_lib.validate` refuses, named as the CLI names it.

    Example:
      >>> config = get_config("e4b", "qlora", overrides={"lora.rank": 8})
      >>> config.quant.mode, config.lora.rank
      ('nf4', 8)
      >>> config.lora.rnak = 4
      Traceback (most recent call last):
      AttributeError: ...
    """
    config = config_lib.get_config(size, method, arg)
    for field, value in (overrides or {}).items():
        _set_field(config, field, value)
    config_lib.validate(config)
    config.lock()
    return config


def _set_field(config: ml_collections.ConfigDict, field: str, value: Any) -> None:
    *parents, leaf = field.split(".")
    node = config
    for i, part in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            bad = ".".join(parents[: i + 1])
            raise config_lib.ConfigError(f"--config.{bad}: no such config field")
        node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise config_lib.ConfigError(f"--config.{field}: no such config field")
    try:
        setattr(node, leaf, value)
    except TypeError as e:
        raise config_lib.ConfigError(
            f"--config.{field}={value!r}: wrong type ({' '.join(str(e).split())})"
        ) from e


# --- data -------------------------------------------------------------------


def _data_setup(config) -> tuple[data_lib.DataSettings, Any, Any]:
    """(data settings with the resolved chat template, tokenizer, template)."""
    preset = presets.resolve_preset(config.model.preset)  # a misspelt name stops
    template = presets.chat_template(config, preset)
    logging.info("chat template: %s (from %s)", template.variant, template.source)
    settings = config_lib.data_settings(config.data, template.variant)
    return settings, preset, template


def _report(verb: str, config, out: str | None) -> dict:
    """`data check | stats`: the report, printed and written to `out`."""
    if out:  # before any work: never over the data, never over another file
        outputs.check(out, [f"data_{verb}.json"], inputs=outputs.run_inputs(config))
    settings, preset, _ = _data_setup(config)
    try:
        tokenizer = presets.load_tokenizer(preset)
    except presets.PresetError as e:  # a download needs credentials / network
        logging.warning("no tokenizer (%s): token statistics are skipped", e)
        tokenizer = None
    processor = presets.processor_settings(preset)
    report = getattr(data_lib, verb)(settings, tokenizer, processor)
    print(data_lib.format_report(report), flush=True)
    if out:
        outputs.write_json(out, f"data_{verb}.json", report)
    return report


def check(config, out: str | None = None) -> dict:
    """`gemma4-keras data check`: prints the quality report and returns it.

    Without a tokenizer (a preset that needs credentials or network) the
    token statistics are skipped, with a warning. `out`: a directory to
    write `data_check.json` to.

    Raises:
      DataError: every bad record as `file:line: problem` (with
        `data.on_error=raise`), or a file with no valid record.

    Example:
      >>> report = check(get_config("tiny", "lora"))
      >>> report["read"]["valid"] > 0
      True
    """
    return _report("check", config, out)


def stats(config, out: str | None = None) -> dict:
    """`gemma4-keras data stats`: the report; bad records are listed, not fatal."""
    return _report("stats", config, out)


def split(config, out: str) -> dict:
    """`gemma4-keras data split`: writes train.jsonl, holdout.jsonl, report.json.

    No rendering, so the chat template does not matter. Returns
    `{"train": path, "holdout": path, "report": path}`.
    """
    return data_lib.split(config_lib.data_settings(config.data), out)


def render(
    config, limit: int = 3, show: bool = True, out: str | None = None
) -> list[dict]:
    """`gemma4-keras data render`: exactly what is trained, for `limit` examples.

    Returns one record per training example: `text` (special tokens spelled
    out), `trained` (the `[start, end)` character spans carrying loss),
    `generation_prompt` and `template`. With `show`, prints each text with
    the trained spans in bold green (ANSI; notebooks show the colour).
    `limit=0` renders every example. With `out`, writes the records as JSON
    lines instead, to that new file or, for `"-"`, to stdout (`show` is then
    ignored and `[]` returned), as the CLI does.

    Example:
      >>> records = render(get_config("tiny", "lora"), limit=1, show=False)
      >>> records[0]["text"].startswith("<bos><|turn>user")
      True
    """
    if limit < 0:
        raise config_lib.ConfigError(f"limit={limit} must be >= 0 (0 = all examples)")
    settings, preset, template = _data_setup(config)
    tokenizer = presets.load_tokenizer(preset)
    if out:
        target = None if out == "-" else out
        render_lib.render(settings, tokenizer, template, limit=limit, out=target)
        return []
    records = list(
        render_lib.render_records(settings, tokenizer, template, limit=limit)
    )
    if show:
        for r in records:
            print(f"--- {r['source']} ({r['template']} template)")
            print(render_lib.highlight(r["text"], r["trained"]), flush=True)
    return records


# --- plan and train ---------------------------------------------------------


def plan(
    config,
    tflops: float = 100.0,
    mfu: float = 0.4,
    *,
    devices: int | None = None,
    accelerator_name: str | None = None,
    out: str | None = None,
) -> dict:
    """`gemma4-keras plan`: memory per device and time per step, no weights loaded.

    `devices` and `config.distribution` give the mesh; `accelerator_name`
    (`t4`, `2xt4`, `v5e-8`, ...; `plan_lib.ACCELERATORS`) the device to fit.
    `out`: a directory to write `plan.json` to.

    Example:
      >>> print(format_plan(plan(get_config("tiny", "qlora"), tflops=65)))  # doctest: +SKIP
    """
    config_lib.validate(config)
    if out:  # before any work: never over another file
        outputs.check(out, ["plan.json"], inputs=outputs.run_inputs(config))
    estimate = plan_lib.plan(
        config,
        tflops=tflops,
        mfu=mfu,
        devices=devices,
        accelerator_name=accelerator_name,
    )
    if out:
        outputs.write_json(out, "plan.json", estimate)
    return estimate


format_plan = plan_lib.format_plan


def run(config, workdir: str, held_signals: Sequence[int] = ()) -> dict:
    """`gemma4-keras train`: train, evaluate, export the adapter; rerun resumes.

    Returns run_state.json's content: `status` (finished, stopped_overfitting,
    diverged, preempted), `step`, and the eval summary (`metric`, `base`,
    `finetuned`, `report`).

    Example:
      >>> state = run(get_config("tiny", "lora", "runlocal"), "runs/smoke")
      >>> state["status"]
      'finished'

    SIGTERM / SIGINT (a preemption, Ctrl-C; called from the main thread)
    stop the run at the end of the current step, checkpointed, and `run`
    returns status "preempted" (`training/stopping.py`); `held_signals`:
    ones that came before the call (the CLI's start-up).

    Multi-host: run the same call on every process (see `run.distributed`);
    it joins them before anything starts JAX.
    """
    distributed.initialize()  # first: JAX refuses to join once started
    try:
        with stopping.on_signals(held_signals):
            return train.run(config, workdir)
    except stopping.Stopped as stop:  # a second signal before the run held its workdir
        return {"status": "preempted", "signal": stop.signal, "phase": stop.phase}


def run_note(config, workdir: str, state: dict) -> str | None:
    """The line to show about how `run` ended, or None (finished, nothing to add).

    A finished run rerun with other `eval.*` fields says they were not
    applied; a preempted one how to resume; a diverged one what to change.
    """
    status = state.get("status")
    if status in COMPLETE:  # a finished run is not evaluated again
        return identity.unapplied_eval_changes(config, workdir)
    if status == "preempted":
        return stopping.message(state)
    if status == "diverged":
        return (
            f"error: the loss became NaN/inf at step {state.get('step')}; the last "
            f"good checkpoint is kept in {workdir}/checkpoints. Lower "
            "--config.train.learning_rate and use a new --workdir"
        )
    return None


# --- bring your own fit -----------------------------------------------------


def load_training_model(config):
    """The trainable model of `config`: the base (quantised for QLoRA) + adapters.

    Sets up the Keras distribution of `config.distribution` first, as `run`
    does. Returns `(model, tokenizer, preset)`: a `Gemma4LoraModel` (a Keras
    model; its loss is the chunked cross-entropy), the KerasHub tokenizer and
    the resolved preset.
    """
    distributed.initialize()  # first: JAX refuses to join once started
    config_lib.validate(config)
    distributed.setup(config.distribution, int(config.train.batch_size))
    return presets.load_training_model(config)


@dataclasses.dataclass
class TrainingData:
    """What `model.fit` needs, built by the run's own data pipeline.

    Attributes:
      batches: endless `(batch,)` tuples (token ids, masks, loss weights and
        the loss normaliser), shuffled by `train.seed`.
      steps_per_epoch: micro-batches per Keras epoch (one pass over the data,
        or all of `train.max_steps` when set).
      epochs: Keras epochs (`train.epochs`, or 1 with `train.max_steps`).
      plan: optimiser steps, gradient accumulation, tokens per step.
      prepared: the split data (`prepared.holdout`: held-out conversations)
        and its quality report.
    """

    batches: Iterator
    steps_per_epoch: int
    epochs: int
    plan: train.Plan
    prepared: data_lib.PreparedData


def training_data(config, tokenizer, preset: str) -> TrainingData:
    """Reads, checks, splits, renders and batches `config.data` as `run` does.

    Prints the data quality report. Raises DataError (file:line) on bad data.
    """
    template = presets.chat_template(config, preset)
    prepared = train.prepare_data(
        config.data, tokenizer, template, presets.processor_settings(preset)
    )
    stream, steps = train.build_batches(
        prepared.train_examples, config.data, config.train
    )
    if config.train.max_steps > 0:
        epochs, per_epoch = 1, steps.total_steps
    else:
        epochs = int(config.train.epochs)
        per_epoch = steps.total_steps // epochs
    return TrainingData(
        batches=train.step_batches(stream, steps, 0),
        steps_per_epoch=per_epoch * steps.grad_accum,
        epochs=epochs,
        plan=steps,
        prepared=prepared,
    )


def compile_model(model, config, data: TrainingData) -> None:
    """AdamW with the run's warmup + decay schedule, clipping and accumulation."""
    schedule = train.build_schedule(config.train, data.plan)
    train.compile_model(model, config.train, schedule)


# --- evaluate, generate, export ---------------------------------------------


def evaluate(config, workdir: str, out_dir: str | None = None) -> dict:
    """`gemma4-keras evaluate`: base vs fine-tuned on the run's held-out split.

    `config` must be the run's (`eval.*` and the data fields that choose the
    examples may differ). Writes `eval_report.md`/`.json` and plots to
    `out_dir`, a new directory; by default to `workdir/eval`, or, for other
    data or another split, to a new `workdir/eval-<data>-<hash>` (said on
    stderr; the run's report is kept). Prints the metrics table and returns
    the summary.

    Raises:
      WorkdirError: `config` is not the run's.
      DataError: the held-out examples hold examples the run trained on.
      OutputError: `out_dir` would replace files it did not write.
    """
    evaluate_lib.check_adapter(workdir)
    identity.check_config(config, workdir, "evaluate")
    out = identity.report_dir(config, workdir, out_dir)
    return evaluate_lib.evaluate_workdir(config, workdir, out)


def _processor(config):
    """The image / audio sizing of `config`'s preset (processor_config.json)."""
    return presets.processor_settings(presets.resolve_preset(config.model.preset))


def _prompts(prompts, tools, processor) -> tuple[list[list[dict]], list, bool]:
    """(checked conversations, declarations per conversation, any tools?)."""
    if isinstance(prompts, str | Mapping):
        prompts = [prompts]
    conversations, declarations, structured = [], [], tools is not None
    for i, p in enumerate(prompts):
        own = p.get("tools") if isinstance(p, Mapping) else None
        structured = structured or own is not None
        if isinstance(p, str):
            p = [{"role": "user", "content": p}]
        elif isinstance(p, Mapping):
            p = p.get("messages")
        messages, declared = generate_lib.check_prompt(
            list(p) if isinstance(p, Sequence) else p,
            own if own is not None else tools,
            f"prompts[{i}]",
            processor=processor,
        )
        conversations.append(messages)
        declarations.append(declared)
    return conversations, declarations, structured


def _media_kinds(conversations) -> tuple[str, ...]:
    """The media part types the prompts hold: the towers to attach."""
    found = {r["type"] for c in conversations for r in data_lib.media.media_of(c)}
    return tuple(k for k in data_lib.media.KINDS if k in found)


def _generator(
    config, adapter, media_kinds: tuple[str, ...] = ()
) -> generate_lib.Generator:
    """A `Generator` for `adapter` (see `generate`).

    A trained `Gemma4LoraModel` decodes as it is (its active adapter, its own
    base): no second base is built. `media_kinds`: the media the prompts
    hold ("image", "audio"); those frozen towers of the preset are attached
    if the model has none (`presets.attach_towers`, the one place they are
    read; an unused tower is never loaded).
    """
    if adapter is None or isinstance(adapter, str):
        return generate_lib.load_generator(config, adapter or "none", media_kinds)
    preset = presets.resolve_preset(config.model.preset)
    if media_kinds and getattr(adapter, "towers", None) is None:
        presets.attach_towers(adapter, preset, media_kinds)
    return generate_lib.Generator.from_model(
        adapter,
        presets.load_tokenizer(preset),
        template=presets.chat_template(config, preset).variant,
        enable_thinking=bool(config.data.enable_thinking),
        max_length=generate_lib.context_length(preset),
    )


def _answers(config, conversations, tools, adapter, max_new_tokens) -> list[str]:
    """The texts the model writes next, one per checked conversation (greedy).

    `tools`: None, or one declaration list per conversation.
    """
    if not conversations:
        raise generate_lib.PromptError("no prompt: give a message or a list of them")
    batch_size = int(config.eval.batch_size)
    rows = _pad_to_data_parallel(list(range(len(conversations))), batch_size)
    gen = _generator(config, adapter, _media_kinds(conversations))
    return gen.generate(
        [conversations[i] for i in rows],
        tools=None if tools is None else [tools[i] for i in rows],
        max_new_tokens=int(max_new_tokens or config.eval.max_new_tokens),
        batch_size=batch_size,
    )[: len(conversations)]


def generate(
    config,
    prompts: str | Sequence[str] | Sequence[Sequence[dict]] | Sequence[Mapping],
    *,
    adapter=None,
    max_new_tokens: int | None = None,
    tools: Sequence[Mapping] | None = None,
) -> list[str] | list[dict]:
    """`gemma4-keras generate`: what the model writes next, per prompt (greedy).

    Args:
      config: the run config (`model.preset`, `data.template`, ...).
      prompts: a user message, a list of them, or chat conversations
        (lists of OpenAI-style messages ending in a user turn or in `tool`
        results), or `{"messages": [...], "tools": [...]}` objects. A
        message's content may be a list of parts with images and audio, as
        in the data records (`{"type": "image", "path": "cat.png"}`,
        `{"type": "audio", "path": "a.wav"}`, OpenAI's `image_url` /
        `input_audio`; paths relative to the working directory); the
        preset's vision / audio towers are then loaded.
      adapter: None for the base model, a PEFT adapter directory
        (`<workdir>/adapter`), or a trained `Gemma4LoraModel` (decoded as
        it is, with its active adapter: no second base is built).
      max_new_tokens: default `config.eval.max_new_tokens`.
      tools: OpenAI-style tool declarations shown with every prompt (a
        prompt's own `tools` take precedence).

    Returns:
      One answer per prompt: its text; with tools (given here or by a
      prompt), a dict `{"content": text outside the calls, "tool_calls":
      [{"name", "arguments"}]}` (+ `thinking`, or `tool_call_error` for
      calls that do not parse).

    Example:
      >>> generate(config, "Great soup.", adapter="runs/tiny/adapter")
      ['positive']
      >>> generate(config, "Weather in Oslo?", adapter="runs/agent/adapter",
      ...          tools=[{"type": "function", "function": {"name": "weather", ...}}])
      [{'content': '', 'tool_calls': [{'name': 'weather', 'arguments': {'city': 'Oslo'}}]}]
    """
    conversations, declarations, structured = _prompts(
        prompts, tools, _processor(config)
    )
    answers = _answers(
        config,
        conversations,
        declarations if structured else None,
        adapter,
        max_new_tokens,
    )
    if not structured:
        return answers
    return [generate_lib.structured_answer(a) for a in answers]


def read_prompts(
    config, prompts, prompts_file, images=(), audio=()
) -> list[data_lib.Conversation]:
    """`generate_lib.read_prompts` (--prompt, --prompts_file, --image,
    --audio), media sized as `config`'s preset says."""
    return generate_lib.read_prompts(
        prompts, prompts_file, images, audio, _processor(config)
    )


def answer_lines(
    config,
    conversations: Sequence[data_lib.Conversation],
    *,
    workdir: str | None = None,
    adapter: str | None = None,
    max_new_tokens: int | None = None,
) -> list[dict]:
    """`gemma4-keras generate`: one JSON-ready line per conversation.

    `{"prompt": last user message, "answer": the text, "tool_calls"?}`
    (`tool_call_error` says why calls in the answer do not parse).
    `conversations` are `read_prompts`'s. With `workdir` and no `adapter`,
    the run's adapter answers (`config` must be the run's); `adapter` as in
    `generate` otherwise.
    """
    if adapter is None and workdir:
        identity.check_config(config, workdir, "generate")
        adapter = os.path.join(workdir, "adapter")
    texts = _answers(
        config,
        [c.messages for c in conversations],
        [c.tools for c in conversations],
        adapter,
        max_new_tokens,
    )
    return [_answer_line(c.messages, t) for c, t in zip(conversations, texts)]


def _answer_line(messages: list[dict], answer: str) -> dict:
    users = [m["content"] for m in messages if m["role"] == "user"]
    line = {"prompt": users[-1] if users else "", "answer": answer}
    parsed = generate_lib.parse_answer(answer)
    for key in ("tool_calls", "tool_call_error"):
        if key in parsed:
            line[key] = parsed[key]
    return line


def chat(
    config,
    messages: str | Sequence[Mapping],
    *,
    tools: Mapping[str, Callable] | Sequence[Callable] | None = None,
    declarations: Sequence[Mapping] | None = None,
    adapter=None,
    max_steps: int = 5,
    max_new_tokens: int | None = None,
) -> list[dict]:
    """One model turn with Python functions as tools: generate, call, go on.

    Loads the model once, then loops: generate; when the output calls tools,
    run each function with the call's arguments (an exception or an unknown
    name becomes the result `{"error": ...}`, a result that is not a JSON
    value its `str`), add the results and let the model go on in the same
    turn; stop at an answer without calls or after `max_steps` generations.

    Args:
      config: the run config (`model.preset`, `data.template`,
        `data.enable_thinking`, ...).
      messages: a user message, or a conversation (OpenAI-style or the
        package's messages) ending in a user message or in tool results.
      tools: `{name: function}` or a list of functions. Their declarations
        come from the signatures (`eval.generate.function_declaration`:
        the docstring's first line, parameters typed from their hints,
        those without a default required) unless `declarations` are given.
      declarations: OpenAI-style declarations to show instead.
      adapter: as in `generate`.
      max_steps: generations at most (>= 1).
      max_new_tokens: per generation; default `config.eval.max_new_tokens`.

    Returns:
      The new messages in the package's form: model messages with
      `tool_calls` and `tool_responses`, the last one the answer
      (`{"role": "model", "content": ...}`).

    Example:
      >>> def weather(city: str) -> dict:
      ...     \"\"\"Current weather in a city.\"\"\"
      ...     return {"temp": -2}
      >>> chat(config, "Weather in Oslo?", tools=[weather], adapter="runs/agent/adapter")
      [{'role': 'model', 'content': '', 'tool_calls': [{'name': 'weather', 'arguments': {'city': 'Oslo'}}], 'tool_responses': [{'name': 'weather', 'response': {'temp': -2}}]}, {'role': 'model', 'content': 'It is -2 C in Oslo.'}]
    """
    functions = generate_lib.tool_functions(tools)
    declared = generate_lib.declare(functions, declarations)
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    history, _ = generate_lib.check_prompt(
        list(messages), None, "messages", processor=_processor(config)
    )
    gen = _generator(config, adapter, _media_kinds([history]))
    return generate_lib.chat_loop(
        gen,
        history,
        functions=functions,
        declarations=declared,
        max_steps=max_steps,
        max_new_tokens=int(max_new_tokens or config.eval.max_new_tokens),
    )


def _pad_to_data_parallel(conversations: list, batch_size: int) -> list:
    """`conversations`, the last repeated to fill every data-parallel device.

    After `run` or `load_training_model` on a mesh the Keras distribution is
    still set, and KerasHub's `generate` splits each batch over its `batch`
    axis, which fails unless the batch divides evenly.

    >>> _pad_to_data_parallel([["a"]], 8)  # one device
    [['a']]
    """
    dist = keras.distribution.distribution()
    devices = int(dist.device_mesh.shape[0]) if dist is not None else 1
    if devices == 1:
        return conversations
    if batch_size % devices:
        raise config_lib.ConfigError(
            f"--config.eval.batch_size={batch_size} must be a multiple of the "
            f"{devices} data-parallel devices of the active distribution"
        )
    missing = -len(conversations) % devices
    return conversations + [conversations[-1]] * missing


def export(
    config,
    workdir: str,
    fmt: str,
    out: str,
    *,
    verify: bool = False,
    verify_prompts: int = 16,
    **options,
) -> str:
    """`gemma4-keras export`: a finished run as `peft`, `hf`, `keras`, `gguf`
    or `gguf-lora`.

    `config` must be the run's (`identity.check_config`); `out` a new or
    empty directory.

    `options` are `export.commands.export`'s: `gguf_type` (f16, q8_0, ...),
    `shard_size`, `layout`, `dtype`, `base_model`, `force`. With `verify`,
    the written export then runs in its own engine (transformers, PEFT,
    KerasHub, llama.cpp; `exporters/verify.py`) on `verify_prompts` held-out
    prompts against the package's model; `verify.json` and `verify.md` go
    into `out`, and a disagreement raises `VerifyError` naming the format.
    Returns `out`.

    Example:
      >>> export(config, "runs/tiny", "peft", "runs/tiny/export/peft", verify=True)
      'runs/tiny/export/peft'
    """
    identity.check_config(config, workdir, "export")
    if verify:  # a missing engine says so before the export is written
        reason = verify_lib.missing_engine(fmt)
        if reason:
            raise verify_lib.VerifyError(reason)
    path = export_lib.export(config, workdir, fmt, out, **options)
    if verify:
        load_model, prompts, plain = evaluate_lib.verify_inputs(
            config, workdir, verify_prompts
        )
        verify_lib.verify(path, fmt, load_model, prompts, plain=plain)
    return path


# --- human review -------------------------------------------------------------


def review(
    workdir: str,
    *,
    summary: bool = False,
    host: str | None = None,
    port: int = 0,
) -> int | str:
    """`gemma4-keras review`: the blind review page of a run's eval, or its summary.

    Serves the page (base vs fine-tuned answers, unlabelled) on `host:port`
    until Ctrl-C and returns 0; with `summary`, returns the summary text
    (and adds it to `eval_report.md`) instead.

    Raises:
      ReviewError: the run has no evaluation to review, or its files are bad.
    """
    if summary:
        return review_lib.summary_command(workdir)
    return review_lib.serve(workdir, host=host, port=port)
