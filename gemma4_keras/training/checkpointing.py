"""Adapter-only Orbax checkpoints: adapters, optimiser state, RNG and step.

The frozen base is never written: a 31B run's checkpoint is megabytes.
Orbax writes each step to a temporary directory and renames it when
complete, so a killed process leaves the previous checkpoint intact.
`meta.json` beside the steps records what the checkpoint belongs to
(preset, adapter shapes); a mismatch stops with a message naming the path.

Orbax does not verify the bytes it reads back (a flipped bit restores as a
wrong value), so each step also records the sha256 of every saved array, in
the step's own metadata (Orbax's `custom_metadata`), written before Orbax
renames the step into place: a step and its checksums commit together. A
restore recomputes them; a step that fails to read or to match is reported
by path and array, moved aside to `corrupt-<step>`, and the run falls back
to the newest good step. A step without checksums was never committed by
this package (a kill between an older version's commit and its separate
`checksums.json`): it is moved aside to `uncommitted-<step>`, said on
stderr, and never restored unverified.

Before each save the free space is checked against the state's bytes, so a
full disk stops with one line (`disk.DiskFullError`) instead of a failed
Orbax write; a write that fails anyway leaves no temporary step behind.

Multi-host: the state is saved as the global `jax.Array`s the variables
hold, with Orbax's multi-process save (each process writes the shards it
owns; nothing is gathered to one host), and restored into the shardings of
the restoring run's variables, so a run resumes under another number of
processes or another mesh. Process 0 alone writes `meta.json` and the
checksums (Orbax writes step metadata on its primary host); each process
verifies the arrays it holds whole.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from gemma4_keras import atomic, disk
from gemma4_keras.training import callbacks, distributed, stopping


class CheckpointError(RuntimeError):
    """A checkpoint that does not belong to this run or cannot be read."""


class UncommittedError(CheckpointError):
    """A step without checksums: its save never completed as this package commits."""


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


CHECKSUMS = (
    "checksums.json"  # where earlier builds wrote a step's checksums (read only)
)
SUMS_KEY = "sha256"  # the step's custom_metadata key holding {"group/key": sha256}


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


# Orbax's own files beside the arrays (metadata, sharding, manifest).
_SLACK = 1 << 20


def state_bytes(state: dict) -> int:
    """Bytes of a checkpoint state's arrays (what a save writes, before compression)."""
    return sum(int(v.nbytes) for arrays in state.values() for v in arrays.values())


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
        """Saves step `step` with its checksums, committed together by Orbax.

        A SIGTERM / SIGINT that arrives meanwhile takes effect when the save
        has ended (`stopping.deferred`): a step is written whole or not at all.

        Raises:
            disk.DiskFullError: the state does not fit on the disk (nothing
                is written).
        """
        with stopping.deferred("the checkpoint is saved"):
            self._save(step, model)

    def _save(self, step: int, model) -> None:
        if hasattr(model, "jax_state_sync"):
            model.jax_state_sync()
        state = self._state(model)
        disk.require(
            self.directory, state_bytes(state) + _SLACK, f"checkpoint step {step}"
        )
        self._write_meta()
        sums = state_checksums(state)
        try:
            self.manager.save(
                step,
                args=ocp.args.StandardSave(state),
                custom_metadata={SUMS_KEY: sums},
            )
            self.manager.wait_until_finished()
        except BaseException:
            # Orbax's writers may run on after an error: let them end first
            # (a step they commit is whole, with its checksums), then remove
            # what did not commit.
            with contextlib.suppress(Exception):
                self.manager.wait_until_finished()
            self._remove_temporary(step)
            raise
        distributed.barrier("gemma4_keras:checkpoint_saved")
        logging.info("saved checkpoint step %d to %s", step, self.directory)

    def _remove_temporary(self, step: int) -> None:
        """Removes what a failed save of `step` left (Orbax keeps it until a restart)."""
        if not distributed.is_writer():
            return
        for path in glob.glob(
            glob.escape(self.step_dir(step)) + ".orbax-checkpoint-tmp*"
        ):
            shutil.rmtree(path, ignore_errors=True)

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
        `corrupt-<step>`, one without checksums to `uncommitted-<step>` (kept
        for inspection), each named in a warning.

        Raises:
            CheckpointError: when steps exist but none reads back intact and
                some are corrupt; nothing is moved then.
        """
        self.check_meta()
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return 0
        model.optimizer.build(model.trainable_variables)
        target = self._state(model)
        bad: list[tuple[int, CheckpointError]] = []
        for step in steps:
            try:
                restored = self._restore_verified(step, target)
            except CheckpointError as e:
                bad.append((step, e))
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
        if all(isinstance(e, UncommittedError) for _, e in bad):
            self._set_aside(bad, 0)  # none was ever committed: a new run
            return 0
        raise CheckpointError(
            f"no checkpoint in {self.directory} reads back intact: "
            + "; ".join(str(e) for _, e in bad)
            + ". Delete the directory to train from the start, or use a new --workdir"
        )

    def checksums(self, step: int) -> dict[str, str] | None:
        """The sha256 of step `step`'s arrays as saved; None if it has none.

        Raises:
            CheckpointError: the step's metadata or checksums are unreadable.
        """
        path = self.step_dir(step)
        try:
            custom = self.manager.metadata(step).custom_metadata or {}
        except Exception as e:  # orbax raises many kinds; name the path
            raise CheckpointError(
                f"{path}: unreadable step metadata ({type(e).__name__}: {str(e)[:200]})"
            ) from e
        if SUMS_KEY in custom:
            return dict(custom[SUMS_KEY])
        legacy = os.path.join(path, CHECKSUMS)
        if not os.path.exists(legacy):
            return None
        try:
            with open(legacy) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{legacy}: unreadable ({e})") from e

    def _restore_verified(self, step: int, target: dict) -> dict:
        path = self.step_dir(step)
        expected = self.checksums(step)
        if expected is None:
            raise UncommittedError(
                f"{path} has no checksums (its save was cut off before they were "
                "written), so it cannot be verified"
            )
        try:
            restored = self.manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as e:  # orbax raises many kinds; name the path
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise CheckpointError(
                f"{path} is corrupt or from another version ({type(e).__name__}: "
                f"{first})"
            ) from e
        got = state_checksums(restored)
        for key in sorted(expected):
            if key in got and got[key] != expected[key]:
                raise CheckpointError(
                    f"{path} is corrupt: array {key} does not match its sha256 "
                    f"saved with it (a file under {path}/default changed on disk)"
                )
        return restored

    def _set_aside(self, bad: list[tuple[int, CheckpointError]], good: int) -> None:
        """Moves bad steps newer than `good` to corrupt-<step> / uncommitted-<step>."""
        for step, error in bad:
            kind = "uncommitted" if isinstance(error, UncommittedError) else "corrupt"
            aside = os.path.join(self.directory, f"{kind}-{step}")
            if os.path.exists(aside):
                aside = f"{aside}-{os.getpid()}"
            if distributed.is_writer():
                os.replace(self.step_dir(step), aside)
            instead = f"step {good}" if good else "the start"
            message = (
                f"checkpoint step {step}: {error}. Resuming from {instead} "
                f"instead; the {kind} step is kept in {aside}"
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


class CheckpointCallback(callbacks.StepCallback):
    """Saves every `every` optimiser steps, at the last step, and when stopping."""

    def __init__(self, checkpointer: AdapterCheckpointer, every: int, total: int):
        super().__init__()
        self.checkpointer, self.every, self.total = checkpointer, every, total
        self.last_saved: int | None = None

    def on_step_end(self, step, logs):
        loss = logs.get("loss")
        if loss is not None and not np.isfinite(loss):
            return  # never overwrite a good checkpoint with a diverged state
        if step % self.every == 0 or step == self.total or self.model.stop_training:
            self.checkpointer.save(step, self.model)
            self.last_saved = step
