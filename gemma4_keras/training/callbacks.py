"""Small Keras callbacks for a fine-tuning run, and its learning-rate schedule.

The callbacks act once per optimiser step, numbered by the optimiser's own
count (`StepCallback`), whatever a Keras "epoch" is: in `run` one epoch is
one optimiser step (so a run stops and resumes at any step); in a notebook's
own `fit` (`training_data`'s `steps_per_epoch`, `epochs`) it is a pass over
the data. Both give the same step numbers:

    model.fit(data.batches, steps_per_epoch=data.steps_per_epoch,
              epochs=data.epochs, callbacks=[Progress(data.plan.total_steps,
              data.plan.tokens_per_step, every=10), NanGuard()])
"""

from __future__ import annotations

import json
import math
import signal
import time

import keras
import numpy as np
from absl import logging

from gemma4_keras.eval import evaluate
from gemma4_keras.eval.generate import Generator
from gemma4_keras.model.gemma4_lora_model import ROUTER_LOGS
from gemma4_keras.training import distributed, stopping


class StepCallback(keras.callbacks.Callback):
    """A callback that acts after each optimiser step: `on_step_end(step, logs)`.

    `step` is the optimiser's step count once the step is applied (1-based):
    `optimizer.iterations` when `fit` starts (restored with a checkpoint),
    plus the updates since, counted in micro-batches
    (`gradient_accumulation_steps` of them per update). It is counted, not
    read each batch: under JAX, Keras syncs the model's variables only at
    epoch ends. `first_step`, when set, replaces the optimiser's count at
    the start (`run` sets its checkpoint's step: under float16 loss scaling
    the optimiser does not count the updates it skipped).

    A step that ends an epoch is dispatched at the epoch's end, with its
    logs (`val_loss` when Keras validated); any other at its last
    micro-batch, with Keras's batch logs (`loss`: the running mean of the
    epoch so far) and the model's variables synced first.
    """

    first_step: int | None = None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        optimizer = self.model.optimizer
        inner = getattr(optimizer, "inner_optimizer", optimizer)  # loss scaling
        self._accum = int(getattr(inner, "gradient_accumulation_steps", None) or 1)
        self._first = (
            optimizer_step(self.model) if self.first_step is None else self.first_step
        )
        self._micro = self._epoch_micro = 0
        self._done = self._first  # the last step dispatched

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        self._epoch_micro = self._micro

    def on_train_batch_end(self, batch, logs=None):
        self._micro = self._epoch_micro + batch + 1
        if batch + 1 == (self.params or {}).get("steps"):
            return  # the epoch ends here: on_epoch_end dispatches, with its logs
        if self._step() > self._done:
            sync = getattr(self.model, "jax_state_sync", None)
            if sync is not None:  # the variables of this step, not the epoch's start
                sync()
            self._dispatch(logs)

    def on_epoch_end(self, epoch, logs=None):
        if self._step() > self._done:
            self._dispatch(logs)

    def _step(self) -> int:
        return self._first + self._micro // self._accum

    def _dispatch(self, logs) -> None:
        self._done = self._step()
        self.on_step_end(self._done, logs if logs is not None else {})

    def on_step_end(self, step: int, logs: dict) -> None:
        """Called once optimiser step `step` (1-based) is applied."""


def optimizer_step(model) -> int:
    """The optimiser updates applied to `model` (Keras counts accumulated ones once)."""
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


def warmup_steps(train_cfg, total: int) -> int:
    """`train.warmup_steps`, or `train.warmup_ratio` of the total steps."""
    if train_cfg.warmup_steps > 0:
        return int(train_cfg.warmup_steps)
    return int(math.ceil(train_cfg.warmup_ratio * total))


@keras.saving.register_keras_serializable(package="gemma4_keras")
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0 to `peak`, then cosine decay to 0 at `total_steps`.

    The rate of optimiser step k (0-based) is `peak * k / warmup_steps` while
    k < warmup_steps, then `peak * 0.5 * (1 + cos(pi * p))` with
    p = (k - warmup_steps) / (total_steps - warmup_steps), clipped to [0, 1]
    (as transformers' cosine schedule), or `peak` with `decay="constant"`.

    Keras calls a schedule with the optimiser's micro-batch counter: with
    `gradient_accumulation_steps=n` that counter advances n times per update,
    so the optimiser step is counter // `grad_accum` (pass the same n).

    Example:
      >>> s = WarmupDecay(1.0, total_steps=10, warmup_steps=2)
      >>> [round(s.rate(k), 3) for k in (0, 1, 2, 6, 10)]
      [0.0, 0.5, 1.0, 0.5, 0.0]
      >>> opt = keras.optimizers.AdamW(learning_rate=s)
    """

    def __init__(
        self,
        peak: float,
        total_steps: int,
        warmup_steps: int = 0,
        decay: str = "cosine",
        grad_accum: int = 1,
    ):
        if decay not in ("cosine", "constant"):
            raise ValueError(f"train.schedule={decay!r} must be cosine or constant")
        if total_steps < 1 or warmup_steps < 0 or grad_accum < 1:
            raise ValueError(
                f"WarmupDecay needs total_steps >= 1, warmup_steps >= 0 and "
                f"grad_accum >= 1; got {total_steps}, {warmup_steps}, {grad_accum}"
            )
        self.peak, self.decay = float(peak), decay
        self.total_steps, self.warmup_steps = int(total_steps), int(warmup_steps)
        self.grad_accum = int(grad_accum)

    def __call__(self, iteration):
        step = keras.ops.floor_divide(
            keras.ops.cast(iteration, "int32"), self.grad_accum
        )
        return self._at(keras.ops.cast(step, "float32"))

    def rate(self, step: int) -> float:
        """The rate of optimiser step `step`, as the compiled update computes it."""
        return float(keras.ops.convert_to_numpy(self._at(np.float32(step))))

    def _at(self, step):
        ops, peak, warmup = keras.ops, self.peak, float(self.warmup_steps)
        rising = peak * step / max(1.0, warmup)
        if self.decay == "constant":
            after = peak + 0.0 * step
        else:
            span = max(1.0, self.total_steps - warmup)
            left = ops.clip((warmup + span - step) / span, 0.0, 1.0)  # 1 - progress
            # sin(pi/2 * left)^2 = (1 + cos(pi * progress)) / 2, written so that
            # float32 keeps its relative precision at the end of the decay,
            # where 1 + cos(.) would cancel to a few digits.
            after = peak * ops.square(ops.sin(0.5 * math.pi * left))
        return ops.where(step < warmup, rising, after)

    def get_config(self) -> dict:
        return {
            "peak": self.peak,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "decay": self.decay,
            "grad_accum": self.grad_accum,
        }


class LearningRateLogger(StepCallback):
    """Logs `learning_rate`: the rate of the optimiser step just applied.

    Read from `schedule` at the optimiser's own step count (restored with the
    checkpoint on resume), so the log shows what the update used. Put it
    first: the callbacks after it log its value.
    """

    def __init__(self, schedule: WarmupDecay):
        super().__init__()
        self.schedule = schedule

    def on_step_end(self, step, logs):
        logs["learning_rate"] = self.schedule.rate(step - 1)


class Progress(StepCallback):
    """Logs loss, tokens/s and ETA every `every` optimiser steps (and a MoE
    model's router statistics, `gemma4_lora_model.ROUTER_LOGS`).

    `counts` maps optimiser step -> real (non-padding) tokens of that step, as
    `train.step_batches` fills it; without it, `tokens_per_step` (padded
    shape) is assumed.
    """

    def __init__(
        self,
        total: int,
        tokens_per_step: int,
        every: int,
        start: int = 0,
        counts: dict[int, int] | None = None,
    ):
        super().__init__()
        self.total, self.tokens_per_step, self.every = (
            total,
            tokens_per_step,
            max(1, every),
        )
        self.start, self.counts = start, counts
        self._t0 = None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def tokens_done(self, step: int) -> int:
        """Real tokens trained from `start` up to optimiser step `step`."""
        if self.counts is None:
            return (step - self.start) * self.tokens_per_step
        return sum(self.counts.get(s, 0) for s in range(self.start, step))

    def on_step_end(self, step, logs):
        if step % self.every and step != self.total:
            return
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        steps_per_s = (step - self.start) / elapsed
        eta = (self.total - step) / max(steps_per_s, 1e-9)
        tok_s = self.tokens_done(step) / elapsed
        shown = ("val_loss", *ROUTER_LOGS)  # the router's: MoE models only
        extra = "".join(f" {k}={logs[k]:.4f}" for k in shown if k in logs)
        line = (
            f"step {step}/{self.total} loss={logs.get('loss', float('nan')):.4f}{extra} "
            f"lr={logs.get('learning_rate', float('nan')):.2e} {tok_s:.0f} tok/s "
            f"eta {_hms(eta)}"
        )
        print(line, flush=True)


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class NanGuard(StepCallback):
    """Stops at the first non-finite loss; the last checkpoint stays the good one."""

    def __init__(self):
        super().__init__()
        self.bad_step: int | None = None

    def on_step_end(self, step, logs):
        loss = logs.get("loss")
        if loss is not None and not np.isfinite(loss):
            self.bad_step = step
            self.model.stop_training = True
            logging.error("non-finite loss %s at step %d: stopping", loss, step)


class PreemptionGuard(StepCallback):
    """On SIGTERM / SIGINT, finishes the optimiser step, then stops (and saves).

    A second signal stops at once (`stopping.Stopped`: the run resumes from
    its last checkpoint). Outside `fit` (start-up, evaluation) `run.stopping`
    handles the same signals; this guard takes them over for the training
    loop only.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        super().__init__()
        self.requested = False
        self.signal: str | None = None  # the name of the signal that stopped it
        self._previous = {}

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._previous = {}
        try:
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread
            pass

    def _handle(self, signum, frame):
        if self.requested:  # asked twice: do not wait for the step to end
            stopping.stop_now(signum, frame, "training")
            return
        self.requested = True
        self.signal = signal.Signals(signum).name
        stopping.say(
            f"{self.signal}: stopping after this step (send it again to stop now)"
        )

    def on_step_end(self, step, logs):
        # Every process stops at the same step, or the others would wait in
        # the next step's collectives for it: a SIGTERM to any stops all.
        self.requested = distributed.any_process(self.requested)
        if self.requested:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


class OverfitAlarm(StepCallback):
    """Warns (or stops) when validation loss stops improving while training loss falls.

    At each evaluation (an epoch whose logs hold `val_loss`), the evaluation
    is "suspect" when `val_loss` is not below the best seen so far (rising or
    flat) although `loss` fell since the previous evaluation. After `patience`
    suspect evaluations in a row it logs a warning; with `action="stop"` it
    also ends training and restores the adapter weights of the best
    evaluation (the checkpoint saved on stopping then holds them).

    Example:
      >>> alarm = OverfitAlarm(patience=3, action="stop")
      >>> model.fit(..., validation_data=val, callbacks=[alarm])
    """

    def __init__(self, patience: int, action: str = "warn"):
        super().__init__()
        if action not in ("warn", "stop"):
            raise ValueError(f"train.overfit_action={action!r} must be warn or stop")
        self.patience, self.action = max(1, int(patience)), action
        self.best_val = math.inf
        self.best_step: int | None = None
        self.best_weights: list[np.ndarray] | None = None
        self.suspect = 0
        self.alarm_step: int | None = None
        self.stopped_step: int | None = None
        self._last_train: float | None = None

    def on_step_end(self, step, logs):
        if "val_loss" not in logs or "loss" not in logs:
            return
        val, loss = float(logs["val_loss"]), float(logs["loss"])
        falling = self._last_train is not None and loss < self._last_train
        self._last_train = loss
        if val < self.best_val:
            self.best_val, self.best_step, self.suspect = val, step, 0
            if self.action == "stop":
                self.best_weights = [
                    np.array(v.value) for v in self.model.trainable_variables
                ]
            return
        self.suspect = self.suspect + 1 if falling else 0
        if self.suspect < self.patience:
            return
        self.alarm_step = self.alarm_step or step  # the first alarm
        logging.warning(
            "overfitting? val_loss %.4f has not improved on %.4f (step %d) for %d "
            "evaluations while training loss fell to %.4f",
            val,
            self.best_val,
            self.best_step,
            self.suspect,
            loss,
        )
        if self.action == "stop":
            self._restore_best()
            self.stopped_step = step
            self.model.stop_training = True

    def _restore_best(self) -> None:
        if self.best_weights is None:
            return
        for var, value in zip(self.model.trainable_variables, self.best_weights):
            var.assign(value)
        logging.warning(
            "stopped; restored the adapter of step %d (val_loss %.4f)",
            self.best_step,
            self.best_val,
        )


class SampleGenerations(StepCallback):
    """Every `every` optimiser steps, generates for a few held-out prompts.

    Appends one JSON line per prompt to `path`:
    `{"step": 20, "prompt": "...", "reference": "...", "generation": "..."}`.
    `path=None` generates without writing (the other processes of a
    multi-host run: generation is one computation over all of them).

    Decodes with the model being trained (its current adapter, its own base,
    quantised or not) through its KV-cached `Generator.from_model`: no
    second copy of the base weights.
    """

    def __init__(
        self,
        every: int,
        conversations,
        tokenizer,
        path: str | None,
        *,
        max_new_tokens: int = 32,
        template: str,
        enable_thinking: bool = False,
    ):
        super().__init__()
        self.every, self.path, self.max_new_tokens = int(every), path, max_new_tokens
        self.conversations = list(conversations)
        self.tokenizer = tokenizer
        self.template = template  # chat template variant of the tuned size
        self.enable_thinking = enable_thinking
        self._generator = None

    def on_step_end(self, step, logs):
        if self.every <= 0 or step % self.every or not self.conversations:
            return

        if self._generator is None:
            self._generator = Generator.from_model(
                self.model,
                self.tokenizer,
                template=self.template,
                enable_thinking=self.enable_thinking,
            )
        prompts, refs = zip(*(evaluate.split_prompt(c) for c in self.conversations))
        with distributed.replicated_inputs():  # every process, same prompts
            outs = self._generator.generate(
                list(prompts), max_new_tokens=self.max_new_tokens
            )
        if self.path is None:
            return
        with open(self.path, "a") as f:
            for p, r, g in zip(prompts, refs, outs):
                line = {
                    "step": step,
                    "prompt": p[-1]["content"],
                    "reference": r,
                    "generation": g,
                }
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        logging.info("step %d sample: %r", step, outs[0])
