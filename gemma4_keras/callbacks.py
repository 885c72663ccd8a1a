"""Small Keras callbacks for a fine-tuning run.

One Keras "epoch" of `Gemma4LoraModel.fit` in this package is one optimiser
step (grad_accum micro-batches), so `epoch + 1` below is the number of
optimiser steps done; callbacks act at exact step boundaries and a run can
resume at any step.
"""

from __future__ import annotations

import math
import signal
import time

import keras
import numpy as np
from absl import logging


def learning_rate(
    step: int, *, base: float, total: int, warmup: int, schedule: str
) -> float:
    """The learning rate of optimiser step `step` (0-based), as in transformers.

    Linear warmup from 0 over `warmup` steps, then cosine decay to 0 at
    `total` (or constant).

    >>> [round(learning_rate(s, base=1.0, total=10, warmup=2, schedule="cosine"), 3)
    ...  for s in (0, 1, 2, 6, 10)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    if step < warmup:
        return base * step / max(1, warmup)
    if schedule == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    return base * max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def warmup_steps(train_cfg, total: int) -> int:
    """`train.warmup_steps`, or `train.warmup_ratio` of the total steps."""
    if train_cfg.warmup_steps > 0:
        return int(train_cfg.warmup_steps)
    return int(math.ceil(train_cfg.warmup_ratio * total))


class LearningRateSchedule(keras.callbacks.Callback):
    """Sets the optimiser's learning rate before every optimiser step.

    Logs `learning_rate` read back from the optimiser after the step (the
    rate the compiled step actually used), not the closed form.
    """

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def on_epoch_begin(self, epoch, logs=None):
        self.model.optimizer.learning_rate = self.fn(epoch)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            used = keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
            logs["learning_rate"] = float(used)


class Progress(keras.callbacks.Callback):
    """Logs loss, tokens/s and ETA every `every` optimiser steps."""

    def __init__(self, total: int, tokens_per_step: int, every: int, start: int = 0):
        super().__init__()
        self.total, self.tokens_per_step, self.every = (
            total,
            tokens_per_step,
            max(1, every),
        )
        self.start = start
        self._t0 = None
        self._steps_timed = 0

    def on_epoch_begin(self, epoch, logs=None):
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        step = epoch + 1
        self._steps_timed += 1
        if step % self.every and step != self.total:
            return
        elapsed = time.perf_counter() - self._t0
        rate = self._steps_timed / max(elapsed, 1e-9)
        eta = (self.total - step) / max(rate, 1e-9)
        logs = logs or {}
        extra = "".join(f" {k}={logs[k]:.4f}" for k in ("val_loss",) if k in logs)
        logging.info(
            "step %d/%d loss=%.4f%s lr=%.2e %.0f tok/s eta %s",
            step,
            self.total,
            logs.get("loss", float("nan")),
            extra,
            logs.get("learning_rate", float("nan")),
            rate * self.tokens_per_step,
            _hms(eta),
        )
        print(
            f"step {step}/{self.total} loss={logs.get('loss', float('nan')):.4f}{extra} "
            f"{rate * self.tokens_per_step:.0f} tok/s eta {_hms(eta)}",
            flush=True,
        )


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class NanGuard(keras.callbacks.Callback):
    """Stops at the first non-finite loss; the last checkpoint stays the good one."""

    def __init__(self):
        super().__init__()
        self.bad_step: int | None = None

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            self.bad_step = epoch + 1
            self.model.stop_training = True
            logging.error("non-finite loss %s at step %d: stopping", loss, epoch + 1)


class PreemptionGuard(keras.callbacks.Callback):
    """On SIGTERM, finishes the current optimiser step, then stops (and saves)."""

    def __init__(self):
        super().__init__()
        self.requested = False
        self._previous = None

    def on_train_begin(self, logs=None):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None

    def _handle(self, signum, frame):
        self.requested = True

    def on_epoch_end(self, epoch, logs=None):
        if self.requested:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
