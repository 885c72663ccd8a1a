"""Adapter-only Orbax checkpoints: adapters, optimiser state, RNG and step.

The frozen base is never written: a 31B run's checkpoint is megabytes.
Orbax writes each step to a temporary directory and renames it when
complete, so a killed process leaves the previous checkpoint intact.
`meta.json` beside the steps records what the checkpoint belongs to
(preset, adapter shapes); a mismatch stops with a message naming the path.
"""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


class CheckpointError(RuntimeError):
    """A checkpoint that does not belong to this run or cannot be read."""


def _key(path: str) -> str:
    return path.replace("/", "__")


def adapter_state(model) -> dict[str, np.ndarray]:
    return {_key(v.path): np.asarray(v.value) for v in model.trainable_variables}


def optimizer_state(optimizer) -> dict[str, np.ndarray]:
    return {
        f"{i:04d}__{_key(v.path)}": np.asarray(v.value)
        for i, v in enumerate(optimizer.variables)
    }


def seed_state(model) -> dict[str, np.ndarray]:
    return {"dropout_seed": np.asarray(model.dropout_seed.state.value)}


class AdapterCheckpointer:
    """Saves and restores the trainable state of a run under `directory`.

    Example:
      >>> ckpt = AdapterCheckpointer(workdir + "/checkpoints", max_to_keep=3, meta=meta)
      >>> step = ckpt.restore_latest(model)   # 0 when there is none
      >>> ckpt.save(step, model)
    """

    def __init__(self, directory: str, *, max_to_keep: int, meta: dict):
        self.directory = os.path.abspath(directory)
        self.meta = meta
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _state(self, model) -> dict:
        return {
            "adapter": adapter_state(model),
            "optimizer": optimizer_state(model.optimizer),
            "rng": seed_state(model),
        }

    def save(self, step: int, model) -> None:
        if hasattr(model, "jax_state_sync"):
            model.jax_state_sync()
        self._write_meta()
        self.manager.save(step, args=ocp.args.StandardSave(self._state(model)))
        self.manager.wait_until_finished()
        logging.info("saved checkpoint step %d to %s", step, self.directory)

    def _write_meta(self) -> None:
        path = os.path.join(self.directory, "meta.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.meta, f, indent=2, sort_keys=True)
        os.replace(tmp, path)

    def check_meta(self) -> None:
        """Raises CheckpointError when the stored meta differs from this run's."""
        path = os.path.join(self.directory, "meta.json")
        if not os.path.exists(path):
            return
        try:
            with open(path) as f:
                stored = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(
                f"{path}: unreadable checkpoint metadata ({e})"
            ) from e
        diffs = [
            k
            for k in sorted(set(stored) | set(self.meta))
            if stored.get(k) != self.meta.get(k)
        ]
        if diffs:
            k = diffs[0]
            raise CheckpointError(
                f"the checkpoints in {self.directory} belong to another run: {k} is "
                f"{stored.get(k)!r} there but {self.meta.get(k)!r} now. Use a new "
                "--workdir, or delete that directory to start over"
            )

    def restore_latest(self, model) -> int:
        """Restores the newest checkpoint into `model` (and its optimiser); returns its step."""
        self.check_meta()
        step = self.latest_step()
        if step is None:
            return 0
        model.optimizer.build(model.trainable_variables)
        target = self._state(model)
        try:
            restored = self.manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as e:  # orbax raises many kinds; name the path
            path = os.path.join(self.directory, str(step))
            raise CheckpointError(
                f"cannot restore the checkpoint {path} ({type(e).__name__}: {e}). It is "
                f"corrupt or from another version: delete {path} to resume from the "
                "previous step, or use a new --workdir"
            ) from e
        _assign(model.trainable_variables, restored["adapter"], _key, self.directory)
        opt_keys = list(target["optimizer"])
        for key, var in zip(opt_keys, model.optimizer.variables):
            var.assign(restored["optimizer"][key])
        model.dropout_seed.state.assign(restored["rng"]["dropout_seed"])
        logging.info("restored checkpoint step %d from %s", step, self.directory)
        return int(step)

    def close(self) -> None:
        self.manager.close()


def _assign(variables, values: dict, key_fn, where: str) -> None:
    for v in variables:
        value = values.get(key_fn(v.path))
        if value is None or tuple(value.shape) != tuple(v.shape):
            raise CheckpointError(
                f"{where}: no matching value for {v.path} {tuple(v.shape)}"
            )
        v.assign(value)


class CheckpointCallback(keras.callbacks.Callback):
    """Saves every `every` optimiser steps, at the last step, and when stopping."""

    def __init__(self, checkpointer: AdapterCheckpointer, every: int, total: int):
        super().__init__()
        self.checkpointer, self.every, self.total = checkpointer, every, total
        self.last_saved: int | None = None

    def on_epoch_end(self, epoch, logs=None):
        step = epoch + 1
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            return  # never overwrite a good checkpoint with a diverged state
        if step % self.every == 0 or step == self.total or self.model.stop_training:
            self.checkpointer.save(step, self.model)
            self.last_saved = step
