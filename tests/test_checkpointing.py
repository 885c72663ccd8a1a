"""Resume tests: a run killed at any point and rerun ends where an
uninterrupted run ends, bit for bit; foreign or corrupt checkpoints stop the
run before anything in the workdir is touched.

The runs are real `gemma4-keras train` subprocesses of the tiny model.
"""

import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
ARGS = [
    f"--config={ROOT}/configs/tiny.py:runlocal",
    f"--config.train.max_steps={STEPS}",
    "--config.checkpoint.every_steps=2",
    "--config.lora.targets=q_proj,v_proj",  # dropout stays 0.05: the RNG must resume too
]


def _start(workdir, *extra):
    cmd = [
        sys.executable,
        "-m",
        "gemma4_keras.cli",
        "train",
        f"--workdir={workdir}",
        *ARGS,
        *extra,
    ]
    log = open(
        os.path.join(os.path.dirname(workdir), os.path.basename(workdir) + ".log"), "ab"
    )
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def _finish(proc, timeout=240):
    rc = proc.wait(timeout=timeout)
    return rc


def _log_rows(workdir):
    path = os.path.join(workdir, "train_log.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _wait_for_step(proc, workdir, step, timeout=240):
    """Waits until the CSV log shows optimiser step `step` done."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc={proc.returncode}) before step {step}")
        if len(_log_rows(workdir)) >= step:
            return
        time.sleep(0.05)
    pytest.fail(f"no step {step} within {timeout}s")


def _adapter(workdir):
    return load_file(os.path.join(workdir, "adapter", "adapter_model.safetensors"))


def _steps(workdir):
    return sorted(
        int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()
    )


# Three tiny training subprocesses: ~100 s on 2 shared cores, most of it
# process start-up and compilation (each run alone is ~27 s).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run and one SIGKILLed after step 5, both rerun to the end."""
    base = tmp_path_factory.mktemp("runs")
    whole, killed = str(base / "whole"), str(base / "killed")
    p_whole = _start(whole)
    p_killed = _start(killed)
    _wait_for_step(p_killed, killed, 5)  # step 4 is checkpointed, step 5 is not
    p_killed.send_signal(signal.SIGKILL)
    p_killed.wait()
    saved_when_killed = _steps(killed)
    rows_when_killed = len(_log_rows(killed))
    assert _finish(_start(killed)) == 0, open(killed + ".log").read()[-3000:]
    assert _finish(p_whole) == 0, open(whole + ".log").read()[-3000:]
    return whole, killed, saved_when_killed, rows_when_killed


def test_sigkill_then_rerun_is_bit_identical(runs):
    whole, killed, saved_when_killed, rows_when_killed = runs
    assert saved_when_killed and max(saved_when_killed) < STEPS
    assert rows_when_killed > max(
        saved_when_killed
    )  # steps past the checkpoint were lost
    a, b = _adapter(whole), _adapter(killed)
    assert a.keys() == b.keys() and a
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert any(np.abs(v).max() > 0 for k, v in a.items() if "lora_B" in k)  # it trained


def test_no_step_repeated_or_skipped(runs):
    whole, killed, _, _ = runs
    rows_w, rows_k = _log_rows(whole), _log_rows(killed)
    assert [int(r["epoch"]) for r in rows_k] == list(range(STEPS))
    assert [r["loss"] for r in rows_k] == [r["loss"] for r in rows_w]
    assert [r["learning_rate"] for r in rows_k] == [r["learning_rate"] for r in rows_w]


def test_max_to_keep_and_adapter_sized(runs):
    whole, _, _, _ = runs
    assert _steps(whole) == [8, 10, 12]  # checkpoint.max_to_keep = 3
    assert not [d for d in os.listdir(os.path.join(whole, "checkpoints")) if "tmp" in d]
    from gemma4_keras.testing.tiny import tiny_checkpoint

    base_bytes = os.path.getsize(os.path.join(tiny_checkpoint(), "model.safetensors"))
    step_dir = os.path.join(whole, "checkpoints", "12")
    ckpt_bytes = sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, fs in os.walk(step_dir)
        for f in fs
    )
    adapter_bytes = sum(v.nbytes for v in _adapter(whole).values())
    # weights + AdamW m and v + Orbax's metadata (about 70-110 KiB of JSON
    # and OCDBT manifests for ~100 small arrays); never the base.
    assert ckpt_bytes < 3 * adapter_bytes + 128 * 1024
    assert ckpt_bytes < base_bytes / 4, (ckpt_bytes, base_bytes)


def _snapshot(workdir):
    out = {}
    for d, _, fs in os.walk(workdir):
        for f in fs:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, workdir)] = fh.read()
    return out


def _run_in_process(workdir, *extra):
    from gemma4_keras import cli

    return cli.main(["gemma4-keras", "train", f"--workdir={workdir}", *ARGS, *extra])


def test_mismatched_config_changes_nothing(runs, tmp_path, capsys):
    _, killed, _, _ = runs
    # A workdir mid-run: drop run_state so the rerun would resume.
    import shutil

    work = str(tmp_path / "w")
    shutil.copytree(killed, work)
    os.remove(os.path.join(work, "run_state.json"))
    before = _snapshot(work)
    rc = _run_in_process(work, "--config.lora.rank=8")
    err = capsys.readouterr()
    assert rc != 0
    assert "lora.rank" in err.err + err.out and "config.json" in err.err + err.out
    assert _snapshot(work) == before


def test_foreign_checkpoint_meta_is_named(runs, tmp_path):
    import json
    import shutil

    from gemma4_keras.training import checkpointing

    _, killed, _, _ = runs
    ckdir = str(tmp_path / "checkpoints")
    shutil.copytree(os.path.join(killed, "checkpoints"), ckdir)
    meta_path = os.path.join(ckdir, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    other = dict(meta, num_layers=meta["num_layers"] + 1)  # another model
    ckpt = checkpointing.AdapterCheckpointer(ckdir, max_to_keep=3, meta=other)
    with pytest.raises(checkpointing.CheckpointError, match="num_layers") as e:
        ckpt.check_meta()
    assert ckdir in str(e.value)


def test_corrupt_checkpoints_are_named_and_untouched(runs, tmp_path, capsys):
    """Every step unreadable: the run stops naming them and moves nothing.

    (One corrupt step among good ones falls back to the newest good step:
    tests/test_reliability.py.)
    """
    import shutil

    _, killed, _, _ = runs
    work = str(tmp_path / "w")
    shutil.copytree(killed, work)
    os.remove(os.path.join(work, "run_state.json"))
    step_dirs = [os.path.join(work, "checkpoints", str(s)) for s in _steps(work)]
    for step_dir in step_dirs:
        for d, _, fs in os.walk(step_dir):
            for f in fs:
                if f.startswith(("manifest", "_METADATA")) or "d" == os.path.basename(
                    d
                ):
                    with open(os.path.join(d, f), "wb") as fh:
                        fh.write(b"garbage")
    before = _snapshot(work)
    rc = _run_in_process(work)
    err = capsys.readouterr()
    assert rc != 0
    for step_dir in step_dirs:
        assert step_dir in err.err + err.out
    assert _snapshot(work) == before


def test_sigterm_saves_then_rerun_finishes(runs, tmp_path):
    import json

    whole = runs[0]
    work = str(tmp_path / "preempted")
    proc = _start(work)
    _wait_for_step(proc, work, 3)
    proc.send_signal(signal.SIGTERM)
    # Exit code 3 (preempted), not 0: `train && export` must not carry on.
    assert proc.wait(timeout=120) == 3, open(work + ".log").read()[-3000:]
    assert "rerun the same command to resume" in open(work + ".log").read()
    with open(os.path.join(work, "run_state.json")) as f:
        state = json.load(f)
    assert state["status"] == "preempted"
    # Saved at the step it stopped on, even off the every-2-steps grid.
    assert state["step"] == max(_steps(work)) and state["step"] < STEPS
    assert len(_log_rows(work)) == state["step"]
    assert _finish(_start(work)) == 0, open(work + ".log").read()[-3000:]
    a, b = _adapter(whole), _adapter(work)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert [int(r["epoch"]) for r in _log_rows(work)] == list(range(STEPS))
