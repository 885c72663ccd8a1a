"""Nothing lost, nothing silent (issue #12): the hostile and careless cases.

Each numbered defect of the issue has a test here, named after it:
  1 workdir lock           test_two_train_processes_one_runs_the_other_stops
  2 split over its input   test_data_split_refuses_to_overwrite_its_input
  3 finished + new config  test_finished_run_with_another_config_stops
  4 resume + new data      test_resumed_run_with_changed_data_stops
  5 corrupt checkpoint     test_flipped_bytes_fall_back_to_the_previous_step
  6 invalid UTF-8          test_invalid_utf8_is_a_data_error_with_its_line
  7 SIGTERM exit code      test_two_train_processes_one_runs_the_other_stops
  8 failed start writes    test_failed_start_writes_nothing
  9 tracebacks             test_user_error_is_one_line (the case table)
 10 late validation        test_user_error_is_one_line (config rows)

Most cases call `cli.main` in-process (fast); the lock and signals need real
processes. The session's tiny run (`finished` in conftest.py: 4 steps,
checkpoints at 2 and 4) is shared; tests that change a workdir work on a copy.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gemma4_keras import cli, config_lib, workdir_lock
from gemma4_keras.data import records

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = f"--config={ROOT}/configs/tiny.py:runlocal"


def run_cli(*args: str) -> int:
    return cli.main(["gemma4-keras", *map(str, args)])


def _is_error(line: str) -> bool:
    # Not the logged config's "on_error: raise".
    return line.startswith("gemma4-keras ") and " error: " in line


def error_line(capsys) -> str:
    """The single `error:` line of a failed command; no traceback anywhere."""
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out, captured.err[-3000:]
    lines = [ln for ln in captured.err.splitlines() if _is_error(ln)]
    assert len(lines) == 1, captured.err[-3000:]
    return lines[0]


def snapshot(directory) -> dict[str, bytes]:
    out = {}
    for d, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(d, f)
            out[os.path.relpath(path, directory)] = pathlib.Path(path).read_bytes()
    return out


def copy_run(finished, tmp_path, *, resume: bool = False) -> pathlib.Path:
    """A copy of the finished run; `resume` makes it a run stopped at step 4."""
    work = tmp_path / "copy"
    shutil.copytree(finished["workdir"], work)
    if resume:
        (work / "run_state.json").unlink()
    return work


# --- 1 and 7: the lock, with real processes; SIGTERM exits 3 ----------------


def _train_process(workdir, *extra, log):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "gemma4_keras.cli",
        "train",
        TINY,
        f"--workdir={workdir}",
    ]
    return subprocess.Popen(
        [*cmd, *extra], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )


def _wait(predicate, proc, timeout=240.0):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the first run ended early (rc={proc.returncode})")
        if time.time() - t0 > timeout:
            pytest.fail("timed out")
        time.sleep(0.1)


@pytest.mark.slow  # two training processes: ~30 s alone, ~1 min beside a worker
def test_two_train_processes_one_runs_the_other_stops(tmp_path):
    workdir = tmp_path / "w"
    log_a = open(tmp_path / "a.log", "wb")
    first = _train_process(workdir, "--config.train.max_steps=200", log=log_a)
    lock = workdir / workdir_lock.LOCK_FILE
    _wait(lambda: lock.exists() and b"pid" in lock.read_bytes(), first)
    t0 = time.time()
    second = subprocess.run(
        [sys.executable, "-m", "gemma4_keras.cli", "train", TINY,
         f"--workdir={workdir}", "--config.train.learning_rate=0.1"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    # "At once": before any model loads (start-up of the interpreter only).
    assert time.time() - t0 < 60
    assert second.returncode == 1, second.stderr[-2000:]
    assert "Traceback" not in second.stderr
    line = [ln for ln in second.stderr.splitlines() if _is_error(ln)]
    assert len(line) == 1, second.stderr[-2000:]
    assert f"pid {first.pid} on host {os.uname().nodename}" in line[0]
    assert "gemma4-keras train" in line[0] and str(workdir) in line[0]

    # The first run goes on untouched; SIGTERM stops it with exit code 3.
    log = tmp_path / "w" / "train_log.csv"
    _wait(lambda: log.exists() and len(log.read_text().splitlines()) >= 3, first)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == cli.EXIT_PREEMPTED
    log_a.close()
    out = (tmp_path / "a.log").read_text()
    assert "preempted (SIGTERM)" in out and "rerun the same command" in out
    state = json.loads((workdir / "run_state.json").read_text())
    assert state["status"] == "preempted"
    config = json.loads((workdir / "config.json").read_text())
    assert config["train"]["learning_rate"] != 0.1  # the second run wrote nothing
    assert not lock.exists()  # released and removed on exit


def _holder(workdir) -> subprocess.Popen:
    code = (
        "import sys, time\n"
        "from gemma4_keras import workdir_lock\n"
        "with workdir_lock.hold(sys.argv[1], 'train'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(300)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(workdir)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
    )
    assert proc.stdout.readline().strip() == b"held"
    return proc


def test_evaluate_and_export_stop_on_a_locked_workdir_and_sigkill_frees_it(
    finished, tmp_path, capsys
):
    work = copy_run(finished, tmp_path)
    holder = _holder(work)
    try:
        for args in (
            ("evaluate", *finished["args"][1:], f"--workdir={work}"),
            (
                "export",
                *finished["args"][1:],
                f"--workdir={work}",
                "--format=peft",
                f"--out={tmp_path}/o",
            ),
            (*finished["args"], f"--workdir={work}"),
        ):
            assert run_cli(*args) == 1
            assert f"pid {holder.pid}" in error_line(capsys)
        assert not (tmp_path / "o").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel released the lock with the process: nothing stale is left.
    with workdir_lock.hold(str(work), "test"):
        pass


# --- 3 and 4: a run's identity is its config and its data ------------------


def test_finished_run_with_another_config_stops(finished, tmp_path, capsys):
    work = copy_run(finished, tmp_path)
    before = snapshot(work)
    rc = run_cli(*finished["args"], f"--workdir={work}", "--config.lora.rank=8")
    assert rc == 1
    line = error_line(capsys)
    assert "lora.rank" in line and "config.json" in line
    assert snapshot(work) == before


@pytest.mark.parametrize("resume", [False, True], ids=["finished", "resumed"])
def test_resumed_run_with_changed_data_stops(finished, tmp_path, capsys, resume):
    work = copy_run(finished, tmp_path, resume=resume)
    data = finished["data"]
    original = data.read_bytes()
    before = snapshot(work)
    try:
        lines = original.splitlines(keepends=True)
        data.write_bytes(b"".join(lines[1:]))  # one record fewer
        assert run_cli(*finished["args"], f"--workdir={work}") == 1
    finally:
        data.write_bytes(original)
    line = error_line(capsys)
    assert str(data) in line and "data.path" in line and "sha256" in line
    assert snapshot(work) == before  # data_report.json included


# --- 5: checkpoints are verified; a corrupt step falls back -----------------


def _flip_bytes(step_dir: pathlib.Path) -> None:
    """Flips one bit at 10/20/30% of every array data file of a step."""
    files = list((step_dir / "default").glob("ocdbt.process_*/d/*"))
    assert files
    for f in files:
        data = bytearray(f.read_bytes())
        for frac in (0.1, 0.2, 0.3):
            data[int(len(data) * frac)] ^= 0x40
        f.write_bytes(bytes(data))


@pytest.mark.slow  # retrains steps 3-4: ~25 s alone, ~1 min beside a worker
def test_flipped_bytes_fall_back_to_the_previous_step(finished, tmp_path, capsys):
    work = copy_run(finished, tmp_path, resume=True)
    _flip_bytes(work / "checkpoints" / "4")
    # What a kill during an Orbax write leaves behind; removed on start.
    killed_write = work / "checkpoints" / "6.orbax-checkpoint-tmp-1795961000"
    killed_write.mkdir()
    assert run_cli(*finished["args"], f"--workdir={work}") == 0
    assert not killed_write.exists()
    err = capsys.readouterr().err
    assert "checkpoint step 4" in err and "Resuming from step 2" in err
    assert str(work / "checkpoints" / "4") in err
    assert (work / "checkpoints" / "corrupt-4").is_dir()  # kept, not deleted
    state = json.loads((work / "run_state.json").read_text())
    assert state["status"] == "finished" and state["step"] == 4
    # Trained again from step 2 on the same data: the same adapter as before.
    a = load_file(finished["workdir"] / "adapter" / "adapter_model.safetensors")
    b = load_file(work / "adapter" / "adapter_model.safetensors")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_every_checkpoint_corrupt_is_named_and_nothing_moves(
    finished, tmp_path, capsys
):
    work = copy_run(finished, tmp_path, resume=True)
    _flip_bytes(work / "checkpoints" / "4")
    sums = work / "checkpoints" / "2" / "_CHECKPOINT_METADATA"  # Orbax's step metadata
    meta = json.loads(sums.read_text())
    table = meta["custom_metadata"]["sha256"]
    table[sorted(table)[0]] = "0" * 64  # step 2 no longer matches either
    sums.write_text(json.dumps(meta))
    before = snapshot(work)
    assert run_cli(*finished["args"], f"--workdir={work}") == 1
    line = error_line(capsys)
    assert str(work / "checkpoints" / "4") in line
    assert str(work / "checkpoints" / "2") in line and "sha256" in line
    assert snapshot(work) == before


# --- 8: a start that fails writes nothing ----------------------------------


def test_failed_start_writes_nothing_and_names_real_fields(tmp_path, capsys):
    workdir = tmp_path / "w"
    assert (
        run_cli("train", TINY, f"--workdir={workdir}", "--config.train.batch_size=5000")
        == 1
    )
    line = error_line(capsys)
    assert "--config.train.batch_size=5000" in line and "drop_remainder" not in line
    assert not workdir.exists() or not list(workdir.iterdir())


# --- 2: data split never overwrites its input -------------------------------


def test_data_split_refuses_to_overwrite_its_input(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    shutil.copy(config_lib.default_dataset_path(), data)
    original = data.read_bytes()
    rc = run_cli(
        "data", "split", TINY, f"--config.data.path={data}", f"--out={tmp_path}"
    )
    assert rc == 1
    assert "would overwrite the input" in error_line(capsys)
    assert data.read_bytes() == original
    assert sorted(os.listdir(tmp_path)) == ["train.jsonl"]


# --- 6: invalid UTF-8 is a data error ---------------------------------------


def _record(prompt: str) -> bytes:
    return json.dumps({"prompt": prompt, "completion": "ok"}).encode() + b"\n"


def test_invalid_utf8_is_a_data_error_with_its_line(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        _record("fine")
        + b'{"prompt": "caf\xe9", "completion": "ok"}\n'  # latin-1 byte
        + _record("x\ud800y")  # a lone surrogate, as a JSON escape
        + _record("also fine")
    )
    args = ("data", "check", TINY, f"--config.data.path={path}")
    assert run_cli(*args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{path}:2: invalid UTF-8 (byte 0xe9" in err
    assert f"{path}:3: a lone surrogate \\ud800" in err
    assert run_cli(*args, "--config.data.on_error=skip") == 0
    conversations, stats = records.load_conversations(
        {"path": str(path), "on_error": "skip"}
    )
    assert len(conversations) == 2 and stats["skipped"] == 2


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_invalid_utf8_in_csv_and_json_lists(tmp_path, suffix):
    path = tmp_path / f"bad{suffix}"
    if suffix == ".csv":
        path.write_bytes(b"prompt,completion\nfine,ok\ncaf\xe9,ok\n")
        where = f"{path}:3"
    else:
        path.write_bytes(
            b'[{"prompt": "fine", "completion": "ok"},\n{"prompt": "\xff"}]'
        )
        where = f"{path}:2"
    with pytest.raises(records.DataError, match="invalid UTF-8") as e:
        records.load_conversations({"path": str(path)})
    assert where in str(e.value)


# --- exit codes: data check, export of a diverged run / NaN adapter ---------


def test_data_check_fails_on_empty_and_all_invalid_data(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert run_cli("data", "check", TINY, f"--config.data.path={empty}") == 1
    assert "no valid record (0 read" in error_line(capsys)
    junk = tmp_path / "junk.jsonl"
    junk.write_text("{not json\n[1]\n")
    args = ("data", "check", TINY, f"--config.data.path={junk}")
    assert run_cli(*args, "--config.data.on_error=skip") == 1
    assert "no valid record (2 read, 2 skipped)" in error_line(capsys)


def test_export_refuses_a_nan_adapter_unless_forced(finished, tmp_path, capsys):
    work = copy_run(finished, tmp_path)
    path = work / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = sorted(tensors)[0]
    tensors[key] = np.full_like(tensors[key], np.nan)
    save_file(tensors, path, metadata={"format": "pt"})
    out = tmp_path / "peft"
    flags = finished["args"][1:]  # the run's config (export checks it)
    args = ("export", *flags, f"--workdir={work}", "--format=peft", f"--out={out}")
    assert run_cli(*args) == 1
    line = error_line(capsys)
    assert "NaN/inf" in line and key in line and "--force" in line
    assert not out.exists()
    assert run_cli(*args, "--force") == 0


def test_export_refuses_a_diverged_run(finished, tmp_path, capsys):
    work = copy_run(finished, tmp_path)
    (work / "run_state.json").write_text('{"status": "diverged", "step": 3}')
    flags = finished["args"][1:]
    args = (
        "export",
        *flags,
        f"--workdir={work}",
        "--format=peft",
        f"--out={tmp_path}/o",
    )
    assert run_cli(*args) == 1
    line = error_line(capsys)
    assert "'diverged'" in line and "NaN" in line and "--force" in line


# --- tidy artefacts ---------------------------------------------------------


def test_export_is_readable_relative_and_cleans_stale_staging(
    finished, tmp_path, capsys
):
    out = tmp_path / "exports" / "peft"
    out.parent.mkdir()
    dead = 4194304 + 17  # above Linux's pid_max: never a live process
    stale = out.parent / f".peft.export-{dead}-abc"
    stale.mkdir()
    live = out.parent / f".peft.export-{os.getpid()}-xyz"  # a concurrent export
    live.mkdir()
    old = os.umask(0o022)
    try:
        args = (
            "export",
            *finished["args"][1:],
            f"--workdir={finished['workdir']}",
            "--format=peft",
        )
        assert run_cli(*args, f"--out={out}") == 0
    finally:
        os.umask(old)
    assert not stale.exists() and live.exists()
    assert out.stat().st_mode & 0o777 == 0o755
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f
    manifest = (out / "export_manifest.json").read_text()
    assert str(finished["workdir"]) not in manifest
    assert json.loads(manifest)["eval"]["report"] == "eval/eval_report.md"
    adapter = finished["workdir"] / "adapter"
    assert adapter.stat().st_mode & 0o077, "the run's adapter is not private"


def test_interrupted_adapter_save_is_removed_on_the_next_start(
    finished, tmp_path, capsys
):
    work = copy_run(finished, tmp_path)
    (work / ".adapter-k1ll3d").mkdir()
    (work / ".adapter-k1ll3d" / "adapter_model.safetensors").write_bytes(b"half")
    (work / "run_state.json.tmp").write_text("{")
    assert run_cli(*finished["args"], f"--workdir={work}") == 0
    assert "finished at step 4" in capsys.readouterr().out
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".")) == []
    assert not (work / "run_state.json.tmp").exists()


def test_generate_refuses_a_prompt_longer_than_the_context(finished, capsys):
    long = "word " * 5000  # the tiny model's context is 4096 tokens
    args = ("generate", TINY, "--adapter=none", f"--prompt={long}")
    assert run_cli(*args, "--max_new_tokens=4") == 1
    line = error_line(capsys)
    assert "over the model's context of 4096 tokens" in line
    assert "max_new_tokens=4" in line


@pytest.mark.parametrize(
    "preset, expected",
    [
        ("gemma4_instruct_4b", 131072),
        ("gemma4_2b", 131072),
        ("gemma4_instruct_26b_a4b", 262144),  # not the "4b" of "a4b"
        ("hf://google/gemma-4-31B-it", 262144),
        ("/no/such/dir", None),
    ],
)
def test_context_length_of_released_presets(preset, expected):
    from gemma4_keras.eval.generate import context_length

    assert context_length(preset) == expected


def test_one_record_run_warns_and_evaluate_says_why(tmp_path, capsys):
    data = tmp_path / "one.jsonl"
    data.write_text(_record("Is 'great soup' positive?").decode())
    workdir = tmp_path / "w"
    args = (TINY, f"--config.data.path={data}", f"--workdir={workdir}")
    one = ("--config.train.batch_size=1", "--config.train.max_steps=1")
    assert run_cli("train", *args, *one) == 0
    assert "warning: no held-out example" in capsys.readouterr().err
    assert run_cli("evaluate", *args, *one) == 1
    assert "no held-out example to evaluate on" in error_line(capsys)


# --- 9 and 10: every user error is one line ---------------------------------


def _cases(tmp: pathlib.Path, run: dict) -> list[tuple[str, tuple, str]]:
    """(id, argv tail, text the error line must hold) for each careless case."""
    work, data = run["workdir"], run["data"]
    files = {
        "broken.py": "from gemma4_keras import config_lib\n\ndef get_config(arg=None:\n",
        "raising.py": "raise RuntimeError('no such site setting')\n",
        "noget.py": "x = 1\n",
        "badutf8.jsonl": b"{}\n",
        "empty.jsonl": "",
        "prompts_bad.jsonl": '{"messages": [{"role": "user", "content": "hi"}]}\n{oops\n',
        "prompts_model.jsonl": '{"messages": [{"role": "user", "content": "a"}, '
        '{"role": "model", "content": "b"}]}\n',
        "prompts_latin1.txt": b"caf\xe9\n",
        "bad_json.jsonl": '{"prompt": "a", "completion": \n',
    }
    for name, body in files.items():
        p = tmp / name
        p.write_bytes(body if isinstance(body, bytes) else body.encode())
    (tmp / "badutf8.jsonl").write_bytes(b'{"prompt": "\xff", "completion": "x"}\n')
    (tmp / "a_dir").mkdir()
    (tmp / "a_file").write_text("x")
    preset = tmp / "preset"
    preset.mkdir()
    (preset / "config.json").write_text("{}")
    # Workdirs with one thing broken each (copies: the shared run stays good).
    broken = {}
    for name in ("state", "config", "unfinished", "adapter", "nonempty_out"):
        broken[name] = tmp / f"work_{name}"
        shutil.copytree(work, broken[name])
    (broken["state"] / "run_state.json").write_text('{"status": "fini')
    (broken["config"] / "config.json").write_text("{")
    (broken["unfinished"] / "run_state.json").unlink()
    w = broken["adapter"] / "adapter" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])  # truncated
    (tmp / "out_full").mkdir()
    (tmp / "out_full" / "x").write_text("x")
    fresh = f"--workdir={tmp}/fresh"
    train = ("train", TINY, fresh)
    flags = run["args"][1:]  # the run's config: export checks it
    exp = ("export", *flags, "--format=peft")
    gen = ("generate", TINY, "--adapter=none")
    d = f"--config.data.path={data}"
    return [
        # Config files.
        ("config_missing", ("train", f"--config={tmp}/nope.py", fresh), "no such file"),
        ("config_dir", ("train", f"--config={tmp}/a_dir", fresh), "is a directory"),
        ("config_syntax", ("train", f"--config={tmp}/broken.py", fresh), "broken.py:3: syntax error"),
        ("config_raises", ("train", f"--config={tmp}/raising.py", fresh), "raising.py:1: RuntimeError"),
        ("config_no_get", ("train", f"--config={tmp}/noget.py", fresh), "get_config"),
        ("config_switch", ("train", f"{TINY.removesuffix(':runlocal')}:bogus", fresh), "tiny.py:19"),
        ("config_misspelt", (*train, "--config.lora.rnak=3"), "rnak"),
        ("config_type", (*train, "--config.lora.rank=abc"), "lora.rank"),
        ("config_missing_flag", ("train", fresh), "--config"),
        ("workdir_missing_flag", ("train", TINY), "--workdir"),
        # Config values, all checked before anything runs (defect 10).
        ("lora_rank", (*train, "--config.lora.rank=0"), "--config.lora.rank=0"),
        ("eval_batch", (*train, "--config.eval.batch_size=0"), "eval.batch_size"),
        ("eval_tokens", (*train, "--config.eval.max_new_tokens=-3"), "eval.max_new_tokens"),
        ("eval_task", (*train, "--config.eval.task_type=poetry"), "eval.task_type"),
        ("eval_examples", (*train, "--config.eval.max_examples=0"), "eval.max_examples"),
        ("loss_chunk", (*train, "--config.model.loss_chunk_size=0"), "model.loss_chunk_size"),
        ("size", (*train, "--config.size=e9b"), "--config.size='e9b'"),
        ("method", (*train, "--config.method=dora"), "--config.method='dora'"),
        ("max_steps", (*train, "--config.train.max_steps=0"), "train.max_steps"),
        ("lr", (*train, "--config.train.learning_rate=0"), "train.learning_rate"),
        ("on_error", (*train, "--config.data.on_error=ignore"), "data.on_error"),
        # Data.
        ("data_missing", (*train, f"--config.data.path={tmp}/none.jsonl"), "none.jsonl: no such file"),
        ("data_dir", (*train, f"--config.data.path={tmp}/a_dir"), "a_dir: is a directory"),
        ("data_utf8", (*train, f"--config.data.path={tmp}/badutf8.jsonl"), "badutf8.jsonl:1: invalid UTF-8"),
        ("data_json", (*train, f"--config.data.path={tmp}/bad_json.jsonl"), "bad_json.jsonl:1: malformed JSON"),
        ("data_empty", (*train, f"--config.data.path={tmp}/empty.jsonl"), "empty.jsonl"),
        ("batch_vs_data", (*train, "--config.train.batch_size=5000"), "train.batch_size=5000"),
        ("tfds_missing", (*train, "--config.data.path=tfds:no_such_dataset_xyz:train"), "tfds:no_such_dataset_xyz"),
        ("check_empty", ("data", "check", TINY, f"--config.data.path={tmp}/empty.jsonl"), "no valid record"),
        ("split_over_input", ("data", "split", TINY, d, f"--out={data.parent}"), "would overwrite"),
        ("data_verb", ("data", "shuffle", TINY), "check, stats, split"),
        # Workdirs.
        ("workdir_is_file", ("train", TINY, f"--workdir={tmp}/a_file"), "a_file: is a file"),
        ("run_state_corrupt", (*run["args"], f"--workdir={broken['state']}"), "run_state.json: unreadable"),
        ("config_json_corrupt", (*run["args"], f"--workdir={broken['config']}"), "config.json: unreadable"),
        ("finished_new_lr", (*run["args"], f"--workdir={work}", "--config.train.learning_rate=1e-3"), "train.learning_rate"),
        ("finished_new_data_path", (*run["args"][:-1], f"--workdir={work}", f"--config.data.path={tmp}/badutf8.jsonl"), "data.path"),
        # Presets.
        ("preset_unknown", (*train, "--config.model.preset=gemma4_instruct_9b"), "gemma4_instruct_9b"),
        ("preset_dir", (*train, f"--config.model.preset={preset}"), "is missing"),
        ("preset_offline_hf", (*train, "--config.model.preset=hf://google/no-such-gemma"), "could not load"),
        # Evaluate / export.
        ("evaluate_no_adapter", ("evaluate", TINY, f"--workdir={broken['unfinished']}/none"), "adapter"),
        ("export_no_format", ("export", TINY, f"--workdir={work}", f"--out={tmp}/e1"), "--format"),
        ("export_no_workdir", (*exp, f"--workdir={tmp}/none", f"--out={tmp}/e2"), "no such directory"),
        ("export_unfinished", (*exp, f"--workdir={broken['unfinished']}", f"--out={tmp}/e3"), "not 'finished'"),
        ("export_truncated", (*exp, f"--workdir={broken['adapter']}", f"--out={tmp}/e4"), "truncated or corrupt"),
        ("export_out_full", (*exp, f"--workdir={work}", f"--out={tmp}/out_full"), "not empty"),
        ("export_shard_zero", ("export", *flags, "--format=hf", "--shard_size=0", f"--workdir={work}", f"--out={tmp}/e5"), "--shard_size='0' must be > 0"),
        ("export_shard_bad", ("export", *flags, "--format=hf", "--shard_size=lots", f"--workdir={work}", f"--out={tmp}/e6"), "--shard_size='lots'"),
        # Generate (checked before the model loads, except the context length).
        ("gen_no_prompt", gen, "no prompt"),
        ("gen_negative_tokens", (*gen, "--prompt=hi", "--max_new_tokens=-5"), "--max_new_tokens=-5"),
        ("gen_prompts_missing", (*gen, f"--prompts_file={tmp}/none.jsonl"), "no such file"),
        ("gen_prompts_json", (*gen, f"--prompts_file={tmp}/prompts_bad.jsonl"), "prompts_bad.jsonl:2"),
        ("gen_prompts_model_last", (*gen, f"--prompts_file={tmp}/prompts_model.jsonl"), "end with a user turn"),
        ("gen_prompts_latin1", (*gen, f"--prompts_file={tmp}/prompts_latin1.txt"), "invalid UTF-8"),
        ("gen_empty_prompt", (*gen, "--prompt= "), "empty user message"),
        ("gen_adapter_missing", ("generate", TINY, "--prompt=hi", f"--adapter={tmp}/none"), "no such directory"),
        ("gen_adapter_truncated", ("generate", TINY, "--prompt=hi", f"--adapter={broken['adapter']}/adapter"), "truncated or corrupt"),
        # Plan.
        ("plan_mfu", ("plan", TINY, "--mfu=0"), "--mfu"),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def cases(finished, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cases")
    return {name: (args, text) for name, args, text in _cases(tmp, finished)}


def test_there_are_at_least_forty_cases(cases):
    assert len(cases) >= 40


def _case_names() -> list[str]:
    """The case ids, read from the table without building it."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(_cases).lstrip())
    return [
        node.elts[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Tuple)
        and len(node.elts) == 3
        and isinstance(node.elts[0], ast.Constant)
        and isinstance(node.elts[0].value, str)
        and isinstance(node.elts[2], ast.Constant)
        and (
            isinstance(node.elts[1], ast.Tuple)
            or (isinstance(node.elts[1], ast.Name) and node.elts[1].id != "TINY")
        )
    ]


@pytest.mark.parametrize("name", _case_names())
def test_user_error_is_one_line(name, cases, capsys):
    args, text = cases[name]
    capsys.readouterr()
    rc = run_cli(*args)
    assert rc != 0
    line = error_line(capsys)
    assert text in line, line
    assert "unexpected" not in line, line  # a known user error, not a bug
    fresh = [a for a in args if str(a).startswith("--workdir=") and "fresh" in str(a)]
    if fresh:  # a failed start leaves its new workdir empty (defect 8)
        path = pathlib.Path(fresh[0].split("=", 1)[1])
        assert not path.exists() or not list(path.iterdir()), name


@pytest.mark.parametrize(
    "error, text",
    [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/r/ckpt"), "/r/ckpt: no space left"),
        (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/r/w"), "/r/w: Permission denied; check the permissions"),
        (OSError(errno.EROFS, os.strerror(errno.EROFS), "/r/w"), "Read-only file system; check"),
    ],
)  # fmt: skip
def test_disk_full_and_permission_errors_are_one_line(
    error, text, tmp_path, capsys, monkeypatch
):
    # As root the tests cannot make a read-only or full disk; the OS reports
    # them as these OSErrors, raised here where the run first writes.
    from gemma4_keras.training import train

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(train, "remove_stale_temp", fail)
    assert run_cli("train", TINY, f"--workdir={tmp_path}/w") == 1
    assert text in error_line(capsys)


def test_verbose_shows_the_traceback(tmp_path, capsys):
    assert (
        run_cli(
            "train",
            TINY,
            f"--workdir={tmp_path}/w",
            "--config.lora.rank=0",
            "--verbose",
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "Traceback" in err and "error: --config.lora.rank=0" in err
