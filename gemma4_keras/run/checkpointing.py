"""Adapter-only Orbax checkpoints: adapters, optimiser state, RNG and step.

The frozen base is never written: a 31B run's checkpoint is megabytes.
Orbax writes each step to a temporary directory and renames it when
complete, so a killed process leaves the previous checkpoint intact.
`meta.json` beside the steps records what the checkpoint belongs to
(preset, adapter shapes); a mismatch stops with a message naming the path.

Orbax does not verify the bytes it reads back (a flipped bit restores as a
wrong value), so each step also holds `checksums.json`: the sha256 of every
saved array. A restore recomputes them; a step that fails to read or to
match is reported by path and array, moved aside to `corrupt-<step>`, and
the run falls back to the newest good step.

Multi-host: the state is saved as the global `jax.Array`s the variables
hold, with Orbax's multi-process save (each process writes the shards it
owns; nothing is gathered to one host), and restored into the shardings of
the restoring run's variables, so a run resumes under another number of
processes or another mesh. Process 0 alone writes `meta.json` and the
checksums; each process verifies the arrays it holds whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import jax
import keras
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from gemma4_keras import atomic
from gemma4_keras.run import distributed


class CheckpointError(RuntimeError):
    """A checkpoint that does not belong to this run or cannot be read."""


def _key(path: str) -> str:
    return path.replace("/", "__")


def adapter_state(model) -> dict[str, jax.Array]:
    """The trainable variables' global arrays (sharded as the variables are)."""
    return {_key(v.path): v.value for v in model.trainable_variables}


def optimizer_state(optimizer) -> dict[str, jax.Array]:
    return {
        f"{i:04d}__{_key(v.path)}": v.value for i, v in enumerate(optimizer.variables)
    }


def seed_state(model) -> dict[str, jax.Array]:
    return {"dropout_seed": model.dropout_seed.state.value}


CHECKSUMS = "checksums.json"


def array_sha256(value) -> str:
    """sha256 of an array's dtype, shape and bytes."""
    value = np.ascontiguousarray(np.asarray(value))
    h = hashlib.sha256(f"{value.dtype.str}{value.shape}".encode())
    h.update(value.tobytes())
    return h.hexdigest()


def held_value(value) -> np.ndarray | None:
    """The whole value of `value` if this process holds all of it, else None.

    Copies local shards only (no communication): on one process that is
    every array; on many, those replicated or split within this process.
    """
    try:
        return np.asarray(value)
    except RuntimeError:  # spans shards held only by other processes
        return None


def state_checksums(state: dict) -> dict[str, str]:
    """{"group/key": sha256} of the arrays of a checkpoint state this process holds."""
    sums = {}
    for group, arrays in state.items():
        for key, value in arrays.items():
            held = held_value(value)
            if held is not None:
                sums[f"{group}/{key}"] = array_sha256(held)
    return sums


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
            # A write killed midway leaves an Orbax tmp directory; the workdir
            # lock guarantees no other writer, so it is removed on start.
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True
            ),
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
        state = self._state(model)
        self.manager.save(step, args=ocp.args.StandardSave(state))
        self.manager.wait_until_finished()
        # Written after Orbax finalised the step: a kill in between leaves a
        # step without checksums, restored unverified (as older runs' steps).
        sums = state_checksums(state)
        if distributed.is_writer():
            atomic.write_json(
                os.path.join(self.step_dir(step), CHECKSUMS),
                sums,
                indent=1,
                sort_keys=True,
            )
        distributed.barrier("gemma4_keras:checkpoint_saved")
        logging.info("saved checkpoint step %d to %s", step, self.directory)

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _write_meta(self) -> None:
        if not distributed.is_writer():
            return
        path = os.path.join(self.directory, "meta.json")
        atomic.write_json(path, self.meta, sort_keys=True)

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
        """Restores the newest good checkpoint into `model`; returns its step.

        Returns 0 when there is none. A corrupt newer step is moved aside to
        `corrupt-<step>` (kept for inspection) and named in a warning.

        Raises:
            CheckpointError: when steps exist but none reads back intact;
                nothing is moved then.
        """
        self.check_meta()
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return 0
        model.optimizer.build(model.trainable_variables)
        target = self._state(model)
        bad: list[tuple[int, str]] = []
        for step in steps:
            try:
                restored = self._restore_verified(step, target)
            except CheckpointError as e:
                bad.append((step, str(e)))
                continue
            self._set_aside(bad, step)
            _assign(
                model.trainable_variables, restored["adapter"], _key, self.directory
            )
            for key, var in zip(target["optimizer"], model.optimizer.variables):
                var.assign(restored["optimizer"][key])
            model.dropout_seed.state.assign(restored["rng"]["dropout_seed"])
            logging.info("restored checkpoint step %d from %s", step, self.directory)
            return int(step)
        raise CheckpointError(
            f"no checkpoint in {self.directory} reads back intact: "
            + "; ".join(reason for _, reason in bad)
            + ". Delete the directory to train from the start, or use a new --workdir"
        )

    def _restore_verified(self, step: int, target: dict) -> dict:
        path = self.step_dir(step)
        try:
            restored = self.manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as e:  # orbax raises many kinds; name the path
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise CheckpointError(
                f"{path} is corrupt or from another version ({type(e).__name__}: "
                f"{first})"
            ) from e
        sums_path = os.path.join(path, CHECKSUMS)
        if not os.path.exists(sums_path):
            logging.warning("%s has no %s: restored unverified", path, CHECKSUMS)
            return restored
        try:
            with open(sums_path) as f:
                expected = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{sums_path}: unreadable ({e})") from e
        got = state_checksums(restored)
        for key in sorted(expected):
            if key in got and got[key] != expected[key]:
                raise CheckpointError(
                    f"{path} is corrupt: array {key} does not match its sha256 in "
                    f"{sums_path} (a file under {path}/default changed on disk)"
                )
        return restored

    def _set_aside(self, bad: list[tuple[int, str]], good: int) -> None:
        """Moves corrupt steps newer than `good` to corrupt-<step>, saying so."""
        for step, reason in bad:
            aside = os.path.join(self.directory, f"corrupt-{step}")
            if os.path.exists(aside):
                aside = f"{aside}-{os.getpid()}"
            if distributed.is_writer():
                os.replace(self.step_dir(step), aside)
            message = (
                f"checkpoint step {step}: {reason}. Resuming from step {good} "
                f"instead; the corrupt step is kept in {aside}"
            )
            logging.warning("%s", message)
            print(f"warning: {message}", file=sys.stderr, flush=True)
        if bad:
            distributed.barrier("gemma4_keras:corrupt_set_aside")
            self.manager.reload()

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
