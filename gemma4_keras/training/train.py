"""`run(config, workdir)`: one fine-tuning run, told as a story of builders.

A workdir holds everything of a run:

    .lock                held by the command using the workdir (removed on exit)
    config.json          the resolved config (a rerun must match it)
    data_identity.json   sha256 of the data files (a rerun must match them)
    data_report.json     the data quality report
    checkpoints/         adapter-only Orbax checkpoints with checksums (resume = rerun)
    train_log.csv        loss / val_loss / learning rate per optimiser step
    adapter/             the final adapter in PEFT format
    eval/                base vs fine-tuned report (JSON, Markdown, PNGs)
    run_state.json       how the run stopped: {"status": ..., "step": ...}

Multi-host: every process runs the same command on the same (shared)
workdir. Process 0 alone holds the lock and writes files; all processes
compute (training, checkpoints through Orbax's multi-process save,
generation), each feeding only its rows of every global batch.

run_state.json's status, and what a rerun of the same command does:

    finished             all steps trained; adapter and eval written   nothing
    stopped_overfitting  train.overfit_action=stop ended training at   nothing
                         `step` with the adapter of `restored_step`;
                         adapter and eval written
    diverged             loss NaN/inf at `step`; the last good         nothing
                         checkpoint is kept
    preempted            SIGTERM / SIGINT at `phase` (start-up, data    resumes
                         preparation, model loading, training,
                         evaluation); `step` is the last checkpoint
    (no run_state.json)  new, running, or killed                       resumes
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gc
import hashlib
import json
import os
import shutil
import sys
import tempfile

import keras
import numpy as np
from absl import logging

from gemma4_keras import atomic, config_lib, data, host_memory, workdir_lock
from gemma4_keras.data.commands import media_kinds
from gemma4_keras.eval import evaluate
from gemma4_keras.exporters import hf, peft
from gemma4_keras.model import hub, presets
from gemma4_keras.model import plan as plan_lib
from gemma4_keras.model.gemma4_lora_model import Gemma4LoraModel
from gemma4_keras.model.layers import float16_islands
from gemma4_keras.training import callbacks as cb
from gemma4_keras.training import checkpointing, distributed, stopping


class WorkdirError(RuntimeError):
    """The workdir belongs to another run."""


COMPLETE = ("finished", "stopped_overfitting")  # adapter and report written
DONE = (*COMPLETE, "diverged")  # a rerun does nothing


@dataclasses.dataclass
class Plan:
    """Step counts of a run (optimiser steps; micro-batches = steps x accum)."""

    total_steps: int
    grad_accum: int
    tokens_per_step: int  # padded: batch x max_length x grad_accum
    # optimiser step -> real (non-padding) tokens, filled by step_batches
    token_counts: dict = dataclasses.field(default_factory=dict)


def run(config, workdir: str) -> dict:
    """Trains, evaluates and exports one run; resumes or reports a finished one.

    The workdir is locked for the whole run (a second command on it stops at
    once, naming this one). Every check (config, data, batch size, checkpoint
    metadata and checksums) happens before anything is written to it, so a
    failed start leaves an existing run byte for byte as it was, and a new
    workdir empty.
    """
    distributed.initialize()  # before anything touches JAX
    config_lib.validate(config)
    with _writer_lock(workdir):
        try:
            stopping.started()  # a signal from here on is recorded
            return _run_locked(config, workdir)
        except stopping.Stopped as stop:  # a signal outside the training loop
            return record_stop(workdir, stop)


@contextlib.contextmanager
def _writer_lock(workdir: str):
    """The workdir lock on the writing process; the others wait until it holds."""
    if not distributed.is_writer():
        distributed.barrier("gemma4_keras:workdir_locked")
        yield
        return
    with workdir_lock.hold(workdir, "train"):
        remove_stale_temp(workdir)
        distributed.barrier("gemma4_keras:workdir_locked")
        yield


def _run_locked(config, workdir: str) -> dict:
    state = read_run_state(workdir)
    # Identity before "finished": a finished workdir rerun with another config
    # or other data is another run, not a finished one.
    check_config(config, workdir)
    identity = data_identity(config.data)
    check_data_identity(identity, workdir)
    if state.get("status") in DONE:
        print(done_message(workdir, state))
        return state
    stopping.phase("data preparation")
    preset = presets.resolve_preset(config.model.preset)
    check_router_aux_loss(config.train, preset)
    template = presets.chat_template(config, preset)
    tokenizer = presets.load_tokenizer(preset)
    # Bad data, or a package rendering that differs from the checkpoint's
    # chat_template.jinja, stops the run here, before a large model is loaded.
    processor = presets.processor_settings(preset)
    prepared = prepare_data(config.data, tokenizer, template, processor)
    distributed.setup(config.distribution, int(config.train.batch_size))
    stream, plan = build_batches(prepared.train_examples, config.data, config.train)
    if not prepared.holdout:
        print(
            "warning: no held-out example (too little data for "
            f"data.holdout_fraction={config.data.holdout_fraction}): no validation "
            "loss and no eval report; add data or set data.eval_path",
            file=sys.stderr,
            flush=True,
        )

    towers = presets.tower_kinds(
        config.model, lambda: media_kinds(prepared.train + prepared.holdout), preset
    )

    stopping.phase("model loading")
    check_host_memory(config, towers)
    settings = presets.ModelSettings.of(config)
    presets.check_tower_targets(settings.lora, towers)
    model = presets.build_training_model(preset, settings)
    if towers:
        presets.attach_towers(model, preset, towers)  # frozen; batches carry inputs
    schedule = build_schedule(config.train, plan)
    compile_model(model, config.train, schedule)
    ckpt = build_checkpointer(config, workdir, model, preset)
    start = ckpt.restore_latest(model)
    check_optimizer_step(model, start, ckpt.directory)
    if distributed.is_writer():
        write_config(config, workdir)
        write_data_identity(identity, workdir)
        write_data_report(prepared, workdir)
    samples = sample_callback(config, prepared, tokenizer, preset, workdir, template)
    history_cbs = build_callbacks(config, workdir, plan, ckpt, start, schedule, samples)
    stopping.phase("training")
    if start < plan.total_steps:
        fit(model, stream, prepared, config, plan, history_cbs, start)
    end = stop_state(history_cbs) or {"status": "finished", "step": plan.total_steps}
    if end["status"] not in COMPLETE:
        return write_run_state(workdir, **end)
    save_adapter(model, config, preset, workdir)
    release_training(model)
    summary = evaluate_run(
        model, tokenizer, preset, prepared, config, workdir, template.variant
    )
    return write_run_state(workdir, **end, **summary)


def check_host_memory(config, towers: tuple[str, ...] = ()) -> None:
    """Stops before loading when `plan` says training needs more host memory
    than this machine has available (`train.memory_check=False` skips it).

    Minutes of loading would otherwise end in the kernel's OOM killer.

    Raises:
      ConfigError: naming the estimate, what is available and what to change.
    """
    available = plan_lib.host_memory_available()
    if not config.train.memory_check or available is None:
        return
    estimate = plan_lib.plan(config, towers=towers)
    need = max(estimate["host_bytes"][k] for k in ("load", "train"))
    # The estimate counts the process itself (up to PROCESS_BYTES): that
    # part is resident already. Anything more (a notebook's other objects)
    # stays resident beside the run.
    have = available + min(_own_rss(), plan_lib.PROCESS_BYTES)
    if need <= have:
        return
    gib = 1024**3
    raise config_lib.ConfigError(
        f"training needs about {need / gib:.1f} GiB of host memory by "
        f"`gemma4-keras plan` (same flags), this machine has {have / gib:.1f} GiB "
        "available: lower --config.data.max_length or --config.train.batch_size, "
        "use --config.model.dtype=bfloat16 or --config.quant.mode=nf4, free memory, "
        "or set --config.train.memory_check=False to try anyway"
    )


def _own_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return 0


# --- workdir ----------------------------------------------------------------


def _atomic_json(path: str, obj) -> None:
    atomic.write_json(path, obj, sort_keys=True, default=str)


def read_run_state(workdir: str) -> dict:
    """workdir/run_state.json ({} before the first stop); WorkdirError if unreadable."""
    path = os.path.join(workdir, "run_state.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WorkdirError(
            f"{path}: unreadable run state ({e}); delete it to resume from the last "
            "checkpoint, or pick a new --workdir"
        ) from e
    if not isinstance(state, dict):
        raise WorkdirError(
            f"{path}: not a JSON object; delete it to resume from the last checkpoint"
        )
    return state


def record_stop(workdir: str, stop: stopping.Stopped) -> dict:
    """run_state.json of a run a signal stopped outside the training loop.

    "preempted" at the newest checkpoint on disk (0 if none), with the phase
    and the signal: a rerun resumes from there. A finished or diverged run's
    state is kept as it was.
    """
    try:
        state = read_run_state(workdir)
    except WorkdirError:
        state = {}
    if state.get("status") in DONE:
        return state
    return write_run_state(
        workdir,
        status="preempted",
        step=saved_step(workdir),
        phase=stop.phase,
        signal=stop.signal,
    )


def saved_step(workdir: str) -> int:
    """The newest checkpoint step in workdir/checkpoints (0 if none; not verified)."""
    folder = os.path.join(workdir, "checkpoints")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return max((int(n) for n in names if n.isdigit()), default=0)


def write_run_state(workdir: str, **state) -> dict:
    """Writes run_state.json (process 0 only) and returns `state`."""
    if distributed.is_writer():
        _atomic_json(os.path.join(workdir, "run_state.json"), state)
    return state


def done_message(workdir: str, state: dict) -> str:
    """What a rerun of a finished, early-stopped or diverged run prints."""
    step, report = state.get("step"), state.get("report", "-")
    if state["status"] == "diverged":
        return (
            f"{workdir}: this run diverged (loss NaN/inf) at step {step}; nothing "
            f"to do. Its last good checkpoint is in {workdir}/checkpoints; lower "
            "--config.train.learning_rate and use a new --workdir"
        )
    if state["status"] == "stopped_overfitting":
        return (
            f"{workdir}: this run stopped for overfitting at step {step} with the "
            f"adapter of step {state.get('restored_step')}; nothing to do. "
            f"Report: {report}"
        )
    return (
        f"{workdir}: this run finished at step {step}; nothing to do. Report: {report}"
    )


# Fields that may change between a run and its resumption. The distribution
# may: checkpoints restore into any mesh (another host count, another split).
_RESUMABLE = (
    "train.log_every",
    "eval.",
    "checkpoint.max_to_keep",
    "distribution.",
    # How experts are computed, not what: routed == dense to float32
    # precision (tests/test_moe_routed.py). Runs recorded before `auto`
    # became the default say "dense".
    "model.moe_dispatch",
    "model.moe_token_chunk",
)


# Fields an older version kept elsewhere: old name -> new name.
_MOVED = {
    "train.remat": "model.remat",
    "train.loss_chunk_size": "model.loss_chunk_size",
}


def check_config(config, workdir: str) -> None:
    """Raises WorkdirError when workdir/config.json holds another run's config."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    new = json.loads(config.to_json_best_effort())
    try:
        with open(path) as f:
            old = _flat(json.load(f))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise WorkdirError(f"{path}: unreadable ({e}); pick a new --workdir") from e
    old = {_MOVED.get(k, k): v for k, v in old.items()}  # a run of an older version
    new = _flat(new)
    # A field this version added is absent from an older run's config: that
    # is no mismatch while the field keeps its default.
    defaults = _flat(
        json.loads(
            config_lib.get_config(config.size, config.method).to_json_best_effort()
        )
    )
    diffs = [
        k
        for k in old.keys() | new.keys()
        if old.get(k) != new.get(k)
        and not k.startswith(_RESUMABLE)
        and not (k not in old and new.get(k) == defaults.get(k))
    ]
    if diffs:
        k = sorted(diffs)[0]
        raise WorkdirError(
            f"{path} holds a run with another config: {k} was {old.get(k)!r}, now "
            f"{new.get(k)!r}. Rerun with the same config to resume, or pick a new --workdir"
        )


def data_identity(data_cfg) -> dict:
    """{config field: {"path", "sha256"}} of the training (and eval) data files.

    A TFDS split is recorded by name only (its files belong to TFDS); a path
    that does not exist is left to the data reader to report.
    """
    settings = config_lib.data_settings(data_cfg)
    identity = {}
    for field in ("path", "eval_path"):
        path = str(getattr(settings, field))
        if not path or path.startswith("tfds:") or not os.path.isfile(path):
            continue
        identity[f"data.{field}"] = {"path": path, "sha256": atomic.file_sha256(path)}
    return identity


def check_data_identity(identity: dict, workdir: str) -> None:
    """Raises WorkdirError when the data differs from what the run trained on."""
    path = os.path.join(workdir, "data_identity.json")
    if not os.path.exists(path):
        return  # a new run, or one made before data was recorded
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WorkdirError(f"{path}: unreadable ({e}); pick a new --workdir") from e
    for field in sorted(old.keys() | identity.keys()):
        was, now = old.get(field) or {}, identity.get(field) or {}
        if was.get("sha256") != now.get("sha256"):
            file = now.get("path") or was.get("path")
            raise WorkdirError(
                f"{file} ({field}) is not the data this run trained on: its sha256 "
                f"was {str(was.get('sha256'))[:12]}, now {str(now.get('sha256'))[:12]} "
                f"(recorded in {path}). Restore the file to resume, or pick a new "
                "--workdir to train on the new data"
            )


def write_data_identity(identity: dict, workdir: str) -> None:
    _atomic_json(os.path.join(workdir, "data_identity.json"), identity)


def remove_stale_temp(workdir: str) -> None:
    """Removes what a killed run left half-written (the lock is held: none is live).

    Adapter saves write `.adapter-*` directories and JSON / CSV writes
    `*.tmp` files, renamed into place only when complete.
    """
    for name in os.listdir(workdir):
        path = os.path.join(workdir, name)
        if name.startswith(".adapter-") and os.path.isdir(path):
            logging.info("removing %s (an interrupted adapter save)", path)
            shutil.rmtree(path, ignore_errors=True)
        elif name.endswith(".tmp") and os.path.isfile(path):
            os.remove(path)


def write_config(config, workdir: str) -> None:
    """Writes workdir/config.json (after every check has passed)."""
    _atomic_json(
        os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort())
    )


def build_checkpointer(config, workdir: str, model, preset: str):
    """The run's AdapterCheckpointer; raises CheckpointError for foreign checkpoints."""
    ckpt = checkpointing.AdapterCheckpointer(
        os.path.join(workdir, "checkpoints"),
        max_to_keep=int(config.checkpoint.max_to_keep),
        meta=checkpoint_meta(config, model, preset),
    )
    ckpt.check_meta()
    return ckpt


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def checkpoint_meta(config, model, preset: str) -> dict:
    shapes = {
        f"{layer}.{t}": [a.in_features, a.rank, a.out_features]
        for (layer, t), a in model.adapters().items()
    }
    digest = hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[
        :16
    ]
    return {
        "preset": str(config.model.preset),
        "lora.rank": int(config.lora.rank),
        "lora.targets": str(config.lora.targets),
        "adapter_shapes_sha": digest,
        "num_layers": model.spec.num_layers,
        "hidden_dim": model.spec.hidden_dim,
    }


# --- data -------------------------------------------------------------------


def prepare_data(
    data_cfg,
    tokenizer,
    template: data.ChatTemplate,
    processor: data.media.ProcessorSettings = data.media.PROCESSOR,
):
    """Reads, checks, splits and encodes the data; prints the quality report.

    `template` (`presets.chat_template`) is the chat template variant; when
    the checkpoint ships `chat_template.jinja`, a sample of the conversations
    rendered with it must equal the package's rendering (else TemplateError).
    """
    settings = config_lib.data_settings(data_cfg, template.variant)
    prepared = data.prepare(settings, tokenizer, processor)
    checked = data.check_conversations(
        prepared.train + prepared.holdout,
        template,
        enable_thinking=bool(data_cfg.enable_thinking),
    )
    logging.info(
        "chat template: %s (from %s)%s",
        template.variant,
        template.source,
        f"; {checked} conversations render as {template.official_path}"
        if checked
        else "",
    )
    print(data.format_report(prepared.report), flush=True)
    return prepared


def write_data_report(prepared, workdir: str) -> None:
    _atomic_json(os.path.join(workdir, "data_report.json"), prepared.report)


def build_batches(examples, data_cfg, train_cfg):
    """The batch stream and the step plan.

    `train.batch_size` is the global batch; under a multi-host distribution
    (`distributed.setup` first) the stream yields this process's rows only.
    """
    batch = int(train_cfg.batch_size)
    try:
        stream = data.build_dataset(
            examples,
            seq_len=int(data_cfg.max_length),
            batch_size=batch,
            packing=bool(data_cfg.packing),
            shuffle=True,
            seed=int(train_cfg.seed),
            process_rows=distributed.process_rows(batch, int(data_cfg.max_length)),
        )
    except data.DataError as e:
        raise config_lib.ConfigError(
            f"--config.train.batch_size={batch} is more than the training data gives "
            f"({len(examples)} examples, packing={bool(data_cfg.packing)}): no full "
            "batch. Lower --config.train.batch_size, or add training data "
            "(data.path) / lower data.holdout_fraction"
        ) from e
    accum = int(train_cfg.grad_accum)
    per_epoch = max(1, stream.steps_per_epoch // accum)
    total = (
        int(train_cfg.max_steps)
        if train_cfg.max_steps > 0
        else per_epoch * int(train_cfg.epochs)
    )
    tokens = batch * int(data_cfg.max_length) * accum
    return stream, Plan(total, accum, tokens)


def step_batches(stream, plan: Plan, start_step: int, counts: dict | None = None):
    """Micro-batches from optimiser step `start_step` on, with `loss_norm`.

    `loss_norm` = (trained tokens in the whole optimiser step) / grad_accum:
    Keras averages the accumulated gradients, so each micro-batch loss
    sum / loss_norm makes the update the exact mean over the global batch.
    """
    step = start_step
    while True:
        micro = [step * plan.grad_accum + i for i in range(plan.grad_accum)]
        group = [stream.batch(k) for k in micro]
        trained, real = _global_counts(stream, micro, group)
        norm = np.float32(float(trained) / plan.grad_accum)
        if counts is not None:  # real (non-padding) tokens, for tokens/s
            counts[step] = int(real)
        for b in group:
            b["loss_norm"] = np.full((b["token_ids"].shape[0],), norm, np.float32)
            yield (b,)
        step += 1


def _global_counts(stream, steps: list[int], group: list[dict]) -> tuple[int, int]:
    """(trained, real) tokens of the global batches `steps` (`group`: this process's)."""
    if getattr(stream, "process_rows", None) is not None:  # only some rows here
        trained, real = np.sum([stream.counts(k) for k in steps], axis=0)
        return int(trained), int(real)
    trained = sum(int(b["loss_weights"].sum()) for b in group)
    return trained, sum(int(b["padding_mask"].sum()) for b in group)


def validation_batches(examples, data_cfg, train_cfg):
    if not examples:
        return None, 0
    batch = int(train_cfg.batch_size)
    stream = data.build_dataset(
        examples,
        seq_len=int(data_cfg.max_length),
        batch_size=batch,
        packing=bool(data_cfg.packing),
        shuffle=False,
        drop_remainder=False,
        process_rows=distributed.process_rows(batch, int(data_cfg.max_length)),
    )
    steps = range(stream.steps_per_epoch)
    batches = [stream.batch(i) for i in steps]
    tokens = float(sum(stream.counts(i)[0] for i in steps))
    for b in batches:  # mean over all held-out target tokens
        b["loss_norm"] = np.full(
            (b["token_ids"].shape[0],), tokens / len(batches), np.float32
        )
    return batches, len(batches)


# --- model and fit ----------------------------------------------------------


def build_schedule(train_cfg, plan: Plan) -> cb.WarmupDecay:
    """`train.learning_rate` with warmup, then `train.schedule` decay, per optimiser step."""
    return cb.WarmupDecay(
        float(train_cfg.learning_rate),
        total_steps=plan.total_steps,
        warmup_steps=cb.warmup_steps(train_cfg, plan.total_steps),
        decay=str(train_cfg.schedule),
        grad_accum=plan.grad_accum,
    )


def check_router_aux_loss(train_cfg, preset: str) -> None:
    """Refuses `train.router_aux_loss_coef` > 0 for a model without experts,
    from the preset's config alone (before data preparation and loading)."""
    coef = float(train_cfg.router_aux_loss_coef)
    if coef > 0 and not hub.model_spec(presets.read_config_json(preset)).moe:
        raise config_lib.ConfigError(
            f"--config.train.router_aux_loss_coef={coef}: {preset} has no "
            "experts (only 26B-A4B is a mixture of experts); set it to 0"
        )


def compile_model(model, train_cfg, schedule: cb.WarmupDecay) -> None:
    """AdamW driven by `schedule`, with `schedule.grad_accum` micro-batches a
    step; the loss adds `train.router_aux_loss_coef` x the load-balancing loss."""
    if isinstance(model, Gemma4LoraModel):  # not a user's own Keras model
        model.set_router_aux_loss(float(train_cfg.router_aux_loss_coef))
    accum = schedule.grad_accum
    optimizer = keras.optimizers.AdamW(
        learning_rate=schedule,  # evaluated by the optimiser at its own step count
        weight_decay=float(train_cfg.weight_decay),
        global_clipnorm=float(train_cfg.max_grad_norm) or None,
        gradient_accumulation_steps=accum if accum > 1 else None,
        # A fixed name: Keras numbers unnamed objects per process (adam_w_1,
        # ...), and the checkpoint keys hold the name, so a second run in one
        # process could not restore its own checkpoint.
        name="adam_w",
    )
    if float16_islands(model.compute_dtype):
        # float16 gradients underflow without a loss scale; steps whose
        # scaled gradients overflow are skipped and the scale halved.
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer, name="loss_scale")
    model.compile(optimizer=optimizer, jit_compile=True)


def check_optimizer_step(model, start: int, where: str) -> None:
    """Raises CheckpointError unless the optimiser's step count is `start`.

    The schedule reads the learning rate at `optimizer.iterations`, which the
    checkpoint restores: a resumed run continues the schedule where it stopped.
    """
    done = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    # Under dynamic loss scaling (float16) a step whose gradients overflowed
    # is skipped: the optimiser has then counted fewer steps than were run.
    skips = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    if done != start and not (skips and done < start):
        raise checkpointing.CheckpointError(
            f"{where}: checkpoint step {start} holds an optimiser step count of "
            f"{done}; its learning rate schedule would not resume. Delete the "
            "directory to train from the start, or use a new --workdir"
        )


def build_callbacks(
    config,
    workdir: str,
    plan: Plan,
    ckpt,
    start: int,
    schedule: cb.WarmupDecay,
    samples: keras.callbacks.Callback | None = None,
) -> list:
    """The run's callbacks; order matters: alarms act before the checkpoint saves."""
    total, t = plan.total_steps, config.train
    cbs = [
        cb.LearningRateLogger(schedule),  # first: the others log its value
        cb.NanGuard(),
        cb.PreemptionGuard(),
        cb.Progress(
            total, plan.tokens_per_step, int(t.log_every), start, plan.token_counts
        ),
    ]
    writer = distributed.is_writer()
    if writer:
        cbs.append(csv_logger(workdir, start))
    if int(t.overfit_patience) > 0:
        cbs.append(cb.OverfitAlarm(int(t.overfit_patience), str(t.overfit_action)))
    if t.tensorboard and writer:
        cbs.append(tensorboard(workdir))
    if samples is not None:
        cbs.append(samples)
    cbs.append(
        checkpointing.CheckpointCallback(
            ckpt, int(config.checkpoint.every_steps), total
        )
    )
    for c in cbs:  # under float16 loss scaling the optimiser may count fewer
        if isinstance(c, cb.StepCallback):
            c.first_step = start
    return cbs


def tensorboard(workdir: str) -> keras.callbacks.Callback:
    """TensorBoard event files in workdir/tensorboard (needs tensorflow)."""
    try:
        import tensorflow  # noqa: F401  (optional: only this callback needs it)
    except ImportError as e:
        raise config_lib.ConfigError(
            "--config.train.tensorboard=True needs tensorflow (pip install tensorflow-cpu); "
            "or set it to False (train_log.csv has the same numbers)"
        ) from e
    return StepTensorBoard(
        os.path.join(workdir, "tensorboard"), update_freq="epoch", write_graph=False
    )


class StepTensorBoard(keras.callbacks.TensorBoard):
    """TensorBoard that logs the learning rate of the step just applied.

    Keras' TensorBoard overwrites `learning_rate` with `optimizer.learning_rate`,
    which, with a schedule, is the rate of the *next* step; the logs already
    hold the applied one (`LearningRateLogger`).
    """

    def _collect_learning_rate(self, logs):
        return logs


def sample_callback(
    config, prepared, tokenizer, preset: str, workdir: str, template: data.ChatTemplate
):
    """Sample generations for 2 held-out prompts every `train.sample_every` steps."""
    every = int(config.train.sample_every)
    if every <= 0 or not prepared.holdout:
        return None
    # Every process generates (one SPMD computation); process 0 writes.
    path = os.path.join(workdir, "samples.jsonl") if distributed.is_writer() else None
    return cb.SampleGenerations(
        every,
        prepared.holdout[:2],
        tokenizer,
        path,
        max_new_tokens=int(config.eval.max_new_tokens),
        template=template.variant,
        enable_thinking=bool(config.data.enable_thinking),
    )


def csv_logger(workdir: str, start: int) -> keras.callbacks.CSVLogger:
    """CSVLogger on workdir/train_log.csv, holding exactly steps 0..start-1.

    A killed run may have logged steps past its last checkpoint; those steps
    are trained again on resume, so their rows are dropped first (no step
    appears twice).
    """
    path = os.path.join(workdir, "train_log.csv")
    if start > 0 and os.path.exists(path):
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if rows:
            col = rows[0].index("epoch")
            kept = [rows[0]] + [r for r in rows[1:] if r and int(r[col]) < start]
            with atomic.atomic_open(path, newline="") as f:
                csv.writer(f).writerows(kept)
    return StepCSVLogger(path, append=start > 0)


class StepCSVLogger(cb.StepCallback, keras.callbacks.CSVLogger):
    """CSVLogger with a row per optimiser step and a `step` column (1-based).

    Its `epoch` column is `step - 1` (the 0-based optimiser step, as Keras
    numbers epochs in `run`); the report plots against `step`.
    """

    def on_step_end(self, step, logs):
        logs = {k: v for k, v in logs.items() if k != "val_learning_rate"}
        keras.callbacks.CSVLogger.on_epoch_end(self, step - 1, {"step": step, **logs})


def fit(
    model, stream, prepared, config, plan: Plan, callbacks: list, start: int
) -> None:
    val, val_steps = validation_batches(
        prepared.holdout_examples, config.data, config.train
    )
    every = int(config.train.eval_every) or max(
        1, plan.total_steps // max(1, int(config.train.epochs))
    )
    logging.info(
        "training steps %d..%d (x%d micro-batches)",
        start,
        plan.total_steps,
        plan.grad_accum,
    )
    # One Keras "epoch" is one optimiser step (grad_accum micro-batches), not a
    # pass over the data: validation (validation_freq) runs at these
    # boundaries, and a run stops and resumes at any step (initial_epoch=start).
    # The callbacks count optimiser steps themselves (`cb.StepCallback`), so
    # they act the same in a user's own `fit`.
    micro_batches_per_keras_epoch = plan.grad_accum
    model.fit(
        step_batches(stream, plan, start, plan.token_counts),
        steps_per_epoch=micro_batches_per_keras_epoch,
        epochs=plan.total_steps,  # = optimiser steps
        initial_epoch=start,
        validation_data=_repeat(val) if val else None,
        validation_steps=val_steps or None,
        validation_freq=every,
        callbacks=callbacks,
        shuffle=False,  # the stream is shuffled by seed (resumable); Keras can't
        verbose=0,
    )


def _repeat(batches):
    while True:
        for b in batches:
            yield (b,)


def stop_state(callbacks: list) -> dict | None:
    """The run_state of a run that a callback stopped early; None if none did.

    An overfitting stop ends the run like finishing it (the best adapter is
    kept and evaluated); it wins over a SIGTERM that arrived at the same step.
    """
    nan, guard = _find(callbacks, cb.NanGuard), _find(callbacks, cb.PreemptionGuard)
    alarm = _find(callbacks, cb.OverfitAlarm)
    if nan.bad_step is not None:
        return {"status": "diverged", "step": nan.bad_step}
    if alarm is not None and alarm.stopped_step is not None:
        return {
            "status": "stopped_overfitting",
            "step": alarm.stopped_step,
            "restored_step": alarm.best_step,
        }
    if guard.requested:
        saved = _find(callbacks, checkpointing.CheckpointCallback).last_saved
        return {
            "status": "preempted",
            "step": saved,
            "phase": "training",
            "signal": guard.signal,
        }
    return None


def _find(callbacks: list, kind: type):
    return next((c for c in callbacks if isinstance(c, kind)), None)


# --- outputs ----------------------------------------------------------------


def save_adapter(model, config, preset: str, workdir: str) -> None:
    """Writes the final adapter in PEFT format to workdir/adapter (process 0).

    In the base's own key layout, as `export --format=peft` writes by
    default (`hf.base_layout`): a multimodal checkpoint's adapter is keyed
    under `language_model`, so PEFT loads it on Gemma4ForConditionalGeneration.
    """
    if not distributed.is_writer():
        return
    peft.save_adapter(
        model,
        os.path.join(workdir, "adapter"),
        base_model=preset,
        layout=hf.base_layout(presets.read_config_json(preset)),
        overwrite=True,
    )


def release_training(model) -> None:
    """Frees the compiled train and validation steps before evaluating.

    Generation compiles programs of its own; the training ones (and the heap
    their compile and temporaries left) would otherwise stay resident beside
    them, about 0.4 GiB more at E2B.
    """
    model.train_function = model.test_function = None
    gc.collect()
    host_memory.release()


def evaluate_run(
    model, tokenizer, preset, prepared, config, workdir: str, template: str
) -> dict:
    """Generates on the held-out split with base and fine-tuned; writes the report."""

    stopping.phase("evaluation")
    if not prepared.holdout:
        return {}
    # The model that trained, adapter off then on: no second backbone. Every
    # process generates (one SPMD computation); only process 0 keeps the report.
    with distributed.replicated_inputs():
        if distributed.is_writer():
            return _evaluate_into(model, tokenizer, prepared, config, workdir, template)
        with tempfile.TemporaryDirectory(prefix="gemma4-eval-") as scratch:
            summary = _evaluate_into(
                model, tokenizer, prepared, config, scratch, template
            )
    summary.pop("report", None)  # a path in the scratch directory
    return summary


def _evaluate_into(model, tokenizer, prepared, config, root: str, template: str):
    return evaluate.evaluate_holdout(
        model,
        tokenizer,
        prepared.holdout,
        config,
        os.path.join(root, "eval"),
        template=template,
        train_log=os.path.join(root, "train_log.csv"),
    )
