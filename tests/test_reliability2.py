"""Nothing lost, second round (issue #24): the cases of the hostile-input sweep.

Each case id of the sweep has a test here, named after it:
  #149 #153  step without checksums      test_step_without_checksums_is_set_aside
  #162       changed adapter exports     test_changed_adapter_is_refused_by_every_export
  #193 #199  full disk, export           test_full_disk_export_is_one_line, ..._midway_...
  #202       full disk, gguf             test_full_disk_midway_through_an_export_leaves_nothing
  #102 #92   full disk, train            test_full_disk_train_is_one_line_before_orbax,
  #93                                    test_full_disk_inside_orbax_is_one_line_no_traceback
  #157       SIGTERM at start-up         test_sigterm_at_start_up_exits_3_and_records_it
  #213       SIGINT in the evaluation    test_sigint_during_the_final_evaluation_exits_3
  #165 #166  read-only finished run      test_export_and_evaluate_a_read_only_finished_run

As tests/test_reliability.py (whose helpers these share), most cases call
`cli.main` in-process; signals use real processes. A full disk cannot be
made without privileges, and file modes do not stop root: the tests make the
OS calls report them (`shutil.disk_usage`, ENOSPC / EROFS errors) as the
libraries would see them.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import pathlib
import shutil
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from test_reliability import (
    ROOT,
    TINY,
    _train_process,
    _wait,
    copy_run,
    error_line,
    run_cli,
)

from gemma4_keras import cli, workdir_lock
from gemma4_keras.exporters import gguf as gguf_lib
from gemma4_keras.exporters import peft
from gemma4_keras.training import stopping

FORMATS = ("peft", "hf", "keras", "gguf", "gguf-lora")


def _sha256(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def _leftovers(parent) -> list[str]:
    """Staging directories an export or an adapter save left in `parent`."""
    return [
        n for n in os.listdir(parent) if ".export-" in n or n.startswith(".adapter-")
    ]


# --- #149 #153: a step and its checksums commit together --------------------


def _drop_checksums(step_dir: pathlib.Path) -> None:
    """What a kill between an Orbax commit and a later checksums write leaves."""
    meta = step_dir / "_CHECKPOINT_METADATA"
    data = json.loads(meta.read_text())
    data["custom_metadata"] = {}
    meta.write_text(json.dumps(data))
    (step_dir / "checksums.json").unlink(missing_ok=True)


@pytest.mark.slow  # retrains steps 3-4: ~25 s alone, ~1 min beside a worker
def test_step_without_checksums_is_set_aside(finished, tmp_path, capsys):
    work = copy_run(finished, tmp_path, resume=True)
    _drop_checksums(work / "checkpoints" / "4")
    assert run_cli(*finished["args"], f"--workdir={work}") == 0
    err = capsys.readouterr().err
    aside = work / "checkpoints" / "uncommitted-4"
    assert (
        f"checkpoint step 4: {work}/checkpoints/4 has no checksums" in err
        and f"Resuming from step 2 instead; the uncommitted step is kept in {aside}"
        in err
    ), err[-2000:]
    assert aside.is_dir()  # kept for inspection; step 4 is saved anew
    # Step 4 was never restored unverified: it was trained again from step 2.
    a = load_file(finished["workdir"] / "adapter" / "adapter_model.safetensors")
    b = load_file(work / "adapter" / "adapter_model.safetensors")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # The checksums are inside the step Orbax renames into place: no window.
    step4 = work / "checkpoints" / "4"
    saved = json.loads((step4 / "_CHECKPOINT_METADATA").read_text())
    assert len(saved["custom_metadata"]["sha256"]) > 10
    assert not (step4 / "checksums.json").exists()


# --- #162: the adapter carries a checksum every export verifies -------------


def test_changed_adapter_is_refused_by_every_export(finished, tmp_path, capfd):
    pytest.importorskip("gguf")
    adapter = finished["workdir"] / "adapter"
    sums = json.loads((adapter / "checksums.json").read_text())
    assert sums["adapter_model.safetensors"] == _sha256(
        adapter / "adapter_model.safetensors"
    )
    # An untouched adapter: the manifest records its hash.
    args = ("export", TINY, *finished["args"][2:], f"--workdir={finished['workdir']}")
    assert run_cli(*args, "--format=peft", f"--out={tmp_path}/ok") == 0
    manifest = json.loads((tmp_path / "ok" / "export_manifest.json").read_text())
    assert manifest["adapter_sha256"] == sums["adapter_model.safetensors"]
    assert manifest["adapter_verified"] is True

    work = copy_run(finished, tmp_path)
    weights = work / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + np.float32(1e-3)  # a plausible value: finite
    save_file(tensors, weights, metadata={"format": "pt"})
    args = ("export", TINY, *finished["args"][2:], f"--workdir={work}")
    capfd.readouterr()
    for fmt in FORMATS:
        out = tmp_path / f"out-{fmt}"
        assert run_cli(*args, f"--format={fmt}", f"--out={out}") == 1, fmt
        line = error_line(capfd)
        assert f"{weights} changed since the run saved it" in line, line
        assert "--force" in line and not out.exists()

    shutil.copy(adapter / "adapter_model.safetensors", weights)  # as saved again
    config = work / "adapter" / "adapter_config.json"
    text = config.read_text()
    assert '"lora_alpha": 8.0' in text
    config.write_text(text.replace('"lora_alpha": 8.0', '"lora_alpha": 80.0'))
    assert run_cli(*args, "--format=peft", f"--out={tmp_path}/cfg") == 1
    assert f"{config} changed since the run saved it" in error_line(capfd)

    forced = tmp_path / "forced"
    assert run_cli(*args, "--format=peft", f"--out={forced}", "--force") == 0
    assert "exporting it unverified (--force)" in capfd.readouterr().err
    manifest = json.loads((forced / "export_manifest.json").read_text())
    assert manifest["adapter_verified"] is False
    assert manifest["adapter_sha256"] == _sha256(weights)


# --- #193 #199 #202 #102 #92 #93: a full disk is one line -------------------


def _little_space(monkeypatch, free: int = 4096) -> None:
    """The disk of every path has `free` bytes left."""
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(
        shutil,
        "disk_usage",
        lambda path: type(usage)(usage.total, usage.total - free, free),
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_full_disk_export_is_one_line(finished, tmp_path, capfd, monkeypatch, fmt):
    if fmt.startswith("gguf"):
        pytest.importorskip("gguf")
    out = tmp_path / "exports" / fmt
    out.parent.mkdir()
    _little_space(monkeypatch)
    args = ("export", TINY, *finished["args"][2:], f"--workdir={finished['workdir']}")
    capfd.readouterr()
    assert run_cli(*args, f"--format={fmt}", f"--out={out}") == 1
    line = error_line(capfd)
    assert (
        f"error: {out}: no space left on the device: the {fmt} export needs about "
        in line
        and "4.0 KiB free" in line
        and "unexpected" not in line
    ), line
    assert not out.exists() and _leftovers(out.parent) == []


def _short_write(*args, **kwargs):
    raise OSError("8192 requested and 3744 written")  # numpy's tofile on a full disk


def _safetensors_full(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"
    )


@pytest.mark.parametrize(
    "fmt, target, fail",
    [
        ("peft", (peft, "save_file"), _safetensors_full),
        ("gguf", (gguf_lib, "_write_blocks"), _short_write),
    ],
    ids=["peft", "gguf"],
)
def test_full_disk_midway_through_an_export_leaves_nothing(
    finished, tmp_path, capfd, monkeypatch, fmt, target, fail
):
    # The space check passed, then the disk filled (another writer).
    if fmt == "gguf":
        pytest.importorskip("gguf")
    monkeypatch.setattr(*target, fail)
    out = tmp_path / "exports" / fmt
    out.parent.mkdir()
    args = ("export", TINY, *finished["args"][2:], f"--workdir={finished['workdir']}")
    capfd.readouterr()
    assert run_cli(*args, f"--format={fmt}", f"--out={out}") == 1
    line = error_line(capfd)
    assert f"error: {out}: no space left on the device (" in line, line
    assert "unexpected" not in line and "requested" not in line, line
    assert not out.exists() and _leftovers(out.parent) == []


def test_full_disk_train_is_one_line_before_orbax(tmp_path, capfd, monkeypatch):
    work = tmp_path / "w"
    _little_space(monkeypatch, free=200_000)
    capfd.readouterr()
    assert (
        run_cli("train", TINY, "--config.train.max_steps=1", f"--workdir={work}") == 1
    )
    line = error_line(capfd)
    assert (
        f"error: {work}/checkpoints: no space left on the device: checkpoint step 1 "
        "needs about "
        in line
        and "195.3 KiB free" in line
    ), line
    assert not list((work / "checkpoints").glob("*tmp*"))


_ORBAX_DISK_FULL = """
import pathlib, sys
import orbax.checkpoint as ocp
from absl import logging
from gemma4_keras import cli

def full_save(self, step, *args, **kwargs):  # as Orbax fails on a full disk
    tmp = pathlib.Path(self.directory) / f"{step}.orbax-checkpoint-tmp-17"
    (tmp / "default.orbax-checkpoint-tmp").mkdir(parents=True)
    text = (
        'RESOURCE_EXHAUSTED: Error writing local file "'
        f'{tmp}/default.orbax-checkpoint-tmp/_sharding": Failed writing: "'
        f'{tmp}/default.orbax-checkpoint-tmp/_sharding.__lock": Failed to write '
        "27185 bytes to file 6: No space left on device [os_error_code='28'] "
        "[tensorstore_spec='" + "x" * 400 + "']"
    )
    try:
        raise ValueError(text)
    except ValueError:  # Orbax's background threads log theirs, then it raises
        logging.exception("_SignalingThread.run() raised an exception: %s", text)
        raise

ocp.CheckpointManager.save = full_save
sys.exit(cli.main(["gemma4-keras", "train", *sys.argv[1:]]))
"""


@pytest.mark.slow  # a training subprocess: ~30 s alone, ~1 min beside a worker
def test_full_disk_inside_orbax_is_one_line_no_traceback(finished, tmp_path):
    work = copy_run(finished, tmp_path, resume=True)
    shutil.rmtree(work / "checkpoints" / "4")  # resumes at 2, saves step 4
    proc = subprocess.run(
        [sys.executable, "-c", _ORBAX_DISK_FULL, *finished["args"][1:],
         f"--workdir={work}"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("gemma4-keras ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert (
        f"gemma4-keras train: error: {work}/checkpoints: no space left on the "
        "device (" in lines[0]
    ), lines[0]
    assert not list((work / "checkpoints").glob("*orbax-checkpoint-tmp*"))


# --- #157 #213: SIGTERM / SIGINT at any phase exit 3 and record it ----------


def _catches_sigterm(pid: int) -> bool:
    """Whether process `pid` has a SIGTERM handler (the CLI installed its own)."""
    with open(f"/proc/{pid}/status") as f:
        caught = next(ln for ln in f if ln.startswith("SigCgt:")).split()[1]
    return bool(int(caught, 16) >> (signal.SIGTERM - 1) & 1)


@pytest.mark.parametrize("when", ["start-up", "holding the workdir"])
def test_sigterm_at_start_up_exits_3_and_records_it(tmp_path, when):
    workdir = tmp_path / "w"
    lock = workdir / workdir_lock.LOCK_FILE
    with open(tmp_path / "log", "wb") as log:
        proc = _train_process(workdir, "--config.train.max_steps=2", log=log)
        if when == "start-up":  # the CLI is starting its libraries (seconds)
            _wait(lambda: _catches_sigterm(proc.pid), proc)
        else:  # reading data or loading the model, not training yet
            _wait(lambda: lock.exists() and b"pid" in lock.read_bytes(), proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == cli.EXIT_PREEMPTED
    out = (tmp_path / "log").read_text()
    assert "Traceback" not in out, out[-3000:]
    assert "gemma4-keras train: preempted (SIGTERM) during " in out, out[-3000:]
    assert "rerun the same command to resume (from the start)" in out
    state = json.loads((workdir / "run_state.json").read_text())
    assert state["status"] == "preempted" and state["step"] == 0
    assert state["signal"] == "SIGTERM"
    if when == "start-up":
        assert state["phase"] == "start-up"
        assert "SIGTERM: stopping once the run has started" in out
    else:
        assert state["phase"] in ("start-up", "data preparation", "model loading")
    assert not lock.exists()


_INTERRUPT_EVALUATION = """
import os, signal, sys
from gemma4_keras import cli
from gemma4_keras.eval import evaluate

real = evaluate.evaluate_holdout

def interrupted(*args, **kwargs):  # Ctrl-C as the final evaluation starts
    os.kill(os.getpid(), signal.SIGINT)
    return real(*args, **kwargs)

evaluate.evaluate_holdout = interrupted
sys.exit(cli.main(["gemma4-keras", "train", *sys.argv[1:]]))
"""


def test_sigint_during_the_final_evaluation_exits_3(finished, tmp_path, capfd):
    work = copy_run(finished, tmp_path, resume=True)  # trained; not evaluated
    shutil.rmtree(work / "adapter")
    shutil.rmtree(work / "eval")
    proc = subprocess.run(
        [sys.executable, "-c", _INTERRUPT_EVALUATION, *finished["args"][1:],
         f"--workdir={work}"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == cli.EXIT_PREEMPTED, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert (
        "gemma4-keras train: preempted (SIGINT) during evaluation; recorded in "
        "run_state.json: rerun the same command to resume (from checkpoint step 4)"
    ) in proc.stderr, proc.stderr[-3000:]
    state = json.loads((work / "run_state.json").read_text())
    assert state == {
        "status": "preempted",
        "step": 4,
        "phase": "evaluation",
        "signal": "SIGINT",
    }
    # A rerun does what was left: the evaluation.
    assert run_cli(*finished["args"], f"--workdir={work}") == 0
    state = json.loads((work / "run_state.json").read_text())
    assert state["status"] == "finished" and (work / "eval").is_dir()


# --- #165 #166: a read-only finished run can be exported and evaluated ------


def _read_only(work: pathlib.Path, monkeypatch) -> None:
    """Makes `work` read-only: by its mode, or (as root, whom modes do not
    stop) by making every write under it fail as a read-only mount does."""
    for d, dirs, files in os.walk(work):
        for name in [*dirs, *files]:
            p = os.path.join(d, name)
            os.chmod(
                p, os.stat(p).st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
            )
    os.chmod(work, 0o555)
    if not os.access(work, os.W_OK):
        return
    root = str(work.resolve())
    real_open = os.open
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def guarded(path, flags, *args, **kwargs):
        full = os.path.realpath(path)
        if flags & writes and (full == root or full.startswith(root + os.sep)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded)


def test_export_and_evaluate_a_read_only_finished_run(
    finished, tmp_path, capfd, monkeypatch
):
    work = copy_run(finished, tmp_path)
    before = {
        p: _sha256(p)
        for p in glob.glob(f"{work}/**", recursive=True)
        if os.path.isfile(p)
    }
    try:
        _read_only(work, monkeypatch)
        args = (TINY, *finished["args"][2:], f"--workdir={work}")
        assert run_cli("export", *args, "--format=peft", f"--out={tmp_path}/peft") == 0
        assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
        assert run_cli("evaluate", *args, f"--out={tmp_path}/report") == 0
        assert (tmp_path / "report" / "eval_report.json").is_file()
        # Its default report directory (workdir/eval) cannot be written:
        # refused before the model loads, in one line.
        capfd.readouterr()
        assert run_cli("evaluate", *args) == 1
        err = capfd.readouterr().err
        assert "Traceback" not in err
        assert f"{work}/eval: cannot be written" in err, err[-2000:]
    finally:
        monkeypatch.undo()
        for d, _, _ in os.walk(work):
            os.chmod(d, 0o755)
    after = {
        p: _sha256(p)
        for p in glob.glob(f"{work}/**", recursive=True)
        if os.path.isfile(p)
    }
    assert after == before


def test_signals_held_before_the_handlers_count_as_start_up_signals(capfd):
    # The CLI holds a signal that comes while the libraries import; one is
    # deferred until the run holds its workdir, a second stops at once.
    with pytest.raises(stopping.Stopped) as stop:
        with stopping.on_signals([signal.SIGTERM]):
            stopping.phase("data preparation")  # not yet recorded: deferred
            stopping.started()
    assert (stop.value.signal, stop.value.phase) == ("SIGTERM", "start-up")
    assert "SIGTERM: stopping once the run has started" in capfd.readouterr().err
    entered = False
    with pytest.raises(stopping.Stopped):
        with stopping.on_signals([signal.SIGTERM, signal.SIGINT]):
            entered = True
    assert not entered
