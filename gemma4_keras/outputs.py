"""Where a command may write: never over its input, never over a file it did not write.

Every `--out` goes through `check` before the command does its work, so a
refusal costs nothing and leaves every file as it was:

    check("out/split", ["train.jsonl", "holdout.jsonl", "report.json"],
          inputs={"data.path": "data/train.jsonl"})          # files in a directory
    check("render.jsonl", inputs={"data.path": "data/train.jsonl"})  # one file
    check("out/peft", empty=True, inputs={"--workdir": "runs/x"})    # a new directory

It refuses, with one line naming the path and what to do:

* an `--out` that is, or holds, one of the command's inputs (`data.path`,
  `data.eval_path`, the workdir of `evaluate` and `export`, a local preset);
* an output file that exists already: a command replaces only what it wrote
  for this run (`replace=True` marks a location the command owns, such as a
  run's own `eval/`);
* a directory where a file goes, and the reverse.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from gemma4_keras import atomic, config_lib
from gemma4_keras.settings import DataSettings


class OutputError(ValueError):
    """An output path that would overwrite an input or a file the command did not write."""


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _inside(path: str, folder: str) -> bool:
    """Whether real path `path` is `folder` or below it."""
    return os.path.commonpath([path, folder]) == folder


def _existing_inputs(inputs: Mapping[str, str | None] | None) -> dict[str, str]:
    """{label: path} of the inputs that are paths on this machine (no tfds: name)."""
    return {
        label: os.fspath(path)
        for label, path in (inputs or {}).items()
        if path and not str(path).startswith("tfds:")
    }


def _check_not_input(flag: str, out: str, targets: list[str], inputs: dict) -> None:
    real_out = _real(out)
    for label, path in inputs.items():
        real_in = _real(path)
        for target in targets:
            if _real(target) == real_in:
                raise OutputError(
                    f"{flag}={out} would overwrite the input {path} ({label}); "
                    f"choose another {flag}"
                )
        if real_out == real_in:
            raise OutputError(
                f"{flag}={out} is the input {path} ({label}); choose another {flag}"
            )
        if targets != [out] and _inside(real_in, real_out):
            raise OutputError(
                f"{flag}={out} holds the input {path} ({label}); write outputs "
                f"elsewhere: choose another {flag}"
            )


def _check_parents(flag: str, out: str) -> None:
    """The nearest existing ancestor of `out` must be a directory."""
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputError(
            f"{flag}={out}: {parent} is a file, not a directory; choose another {flag}"
        )


def check(
    out: str,
    files: Sequence[str] | None = None,
    *,
    inputs: Mapping[str, str | None] | None = None,
    replace: bool = False,
    empty: bool = False,
    flag: str = "--out",
) -> None:
    """Refuses an output path that would lose a file (see the module docstring).

    Args:
      out: the path the command writes: one file (`files` None and not
        `empty`), or a directory.
      files: names the command writes inside the directory `out`.
      inputs: {label: path} of everything the command reads (files or
        directories; empty paths and `tfds:` names are skipped), e.g.
        `{"data.path": ...}`; the label names it in the error.
      replace: the location is the command's own (a run's `eval/`): its
        existing output files may be replaced.
      empty: `out` is a directory that must be new or empty (an export,
        whose file names depend on the model).
      flag: the flag that named `out`, for the error.

    Raises:
      OutputError: one line naming the path and what to do.
    """
    out = os.fspath(out)
    is_file = files is None and not empty
    targets = [out] if is_file else [os.path.join(out, f) for f in files or ()]
    _check_not_input(flag, out, targets, _existing_inputs(inputs))
    _check_parents(flag, out)
    if is_file and os.path.isdir(out):
        raise OutputError(
            f"{flag}={out} is a directory; give the path of a new file (e.g. {flag}="
            f"{os.path.join(out, 'out.jsonl')})"
        )
    if not is_file and os.path.lexists(out) and not os.path.isdir(out):
        raise OutputError(f"{flag}={out} is a file; give a directory")
    if empty and os.path.isdir(out) and os.listdir(out):
        raise OutputError(
            f"{flag}={out} exists and is not empty; choose a new directory "
            "or remove it first (exports never overwrite)"
        )
    if replace:
        return
    for target in targets:
        if os.path.lexists(target):
            raise OutputError(
                f"{flag}={out}: {target} exists already, and a command replaces only "
                f"what it wrote for this run; choose a new {flag}, or move the file "
                "away first"
            )


def check_writable(out: str, flag: str = "--out") -> None:
    """Refuses, before any long work, an `out` that cannot be written.

    Writes and removes a probe file in `out`'s nearest existing directory, so
    read-only storage (which file modes do not show to root) is found before
    a model is loaded, not when the report is written.
    """
    folder = os.path.abspath(os.fspath(out))
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise OutputError(
            f"{out}: cannot be written ({e.strerror}); give a writable {flag}"
        ) from None
    os.close(fd)
    os.remove(probe)


def write_json(directory: str, name: str, obj: Any) -> str:
    """Writes `obj` as `directory/name` (created; atomic); returns the path.

    Call `check(directory, [name], ...)` before the work that makes `obj`.
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    atomic.write_json(path, obj, ensure_ascii=False)
    return path


def data_inputs(data_cfg: Any) -> dict[str, str]:
    """{field: path} of the files (and TFDS directory) data settings read."""
    settings = DataSettings.of(data_cfg)
    return {
        f"data.{field}": getattr(settings, field)
        for field in ("path", "eval_path", "tfds_data_dir")
    }


def run_inputs(config, workdir: str | None = None) -> dict[str, str]:
    """{label: path} that a run command reads: its data, a local preset, the workdir.

    `workdir` adds the run's directory, its adapter and its checkpoints (the
    outputs of `evaluate` and `export` may go below the workdir, never over it).
    """
    inputs: dict[str, str] = {}
    if config is not None and "data" in config:
        inputs.update(data_inputs(config_lib.data_settings(config.data)))
    if config is not None and "model" in config:
        preset = str(config.model.preset)
        if os.path.isdir(preset):
            inputs["--config.model.preset"] = preset
    if workdir:
        inputs["--workdir"] = workdir
        inputs["the run's adapter"] = os.path.join(workdir, "adapter")
        inputs["the run's checkpoints"] = os.path.join(workdir, "checkpoints")
    return inputs
