"""The README's quick start is what CI runs, and the default run does what the
README says: quietly, with a real accuracy gain, resumable."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from gemma4_keras import _quiet

ROOT = pathlib.Path(__file__).resolve().parent.parent


def quick_start_commands() -> list[str]:
    """The shell lines of the ```bash blocks under README's "## Quick start"."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [ln for b in blocks for ln in b.splitlines() if ln.strip()]


def test_ci_runs_the_readme_quick_start_verbatim():
    commands = quick_start_commands()
    assert len(commands) == 2, commands  # install + default run; install + tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in commands:
        assert command in ci, f".ci/run does not run the README's {command!r}"
    # ... in a venv of its own, with nothing installed before the README's lines.
    first = ci.index(commands[0])
    before = "\n".join(ci[:first])
    assert "python3 -m venv" in before or "python -m venv" in before
    assert "pip install" not in before


def test_drop_noise_keeps_real_lines():
    text = (
        "WARNING: All log messages before absl::InitializeLog() is called are "
        "written to STDERR\n"
        "I0000 00:00:17 port.cc:153] oneDNN custom operations are on. You may see\n"
        "E0000 00:00:17 cuda_platform.cc:52] failed call to cuInit: INTERNAL\n"
        "normalizer.cc(51) LOG(INFO) precompiled_charsmap is empty. use identity "
        "normalization.\n"
        "UserWarning: train.jsonl:3 has an empty answer\n"
    )
    assert _quiet.drop_noise(text) == "UserWarning: train.jsonl:3 has an empty answer\n"


def test_filtered_stderr_filters_what_cpp_writes_to_descriptor_2():
    code = (
        "import os, sys\n"
        "from gemma4_keras import _quiet\n"
        "with _quiet.filtered_stderr():\n"
        "    os.write(2, b'I0 port.cc] oneDNN custom operations are on.\\n')\n"
        "    os.write(2, b'a real warning\\n')\n"
        "    print('python stderr', file=sys.stderr)\n"
        "os.write(2, b'after\\n')\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == ["a real warning", "python stderr", "after"]


# The README's headline: the default run lifts held-out accuracy from about
# 0.00 to about 0.87 on 2 CPU cores (~40 s).
@pytest.mark.slow
def test_default_run_trains_quietly_and_beats_the_base(tmp_path):
    workdir = tmp_path / "tiny"
    command = [
        sys.executable,
        "-m",
        "gemma4_keras.cli",
        "train",
        "--config=configs/tiny.py",  # unchanged: not :runlocal, no overrides
        f"--workdir={workdir}",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP")}
    r = subprocess.run(
        command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1200
    )
    output = r.stdout + r.stderr
    assert r.returncode == 0, output[-3000:]
    report = json.loads((workdir / "eval" / "eval_report.json").read_text())
    base = report["models"]["base"]["accuracy"]
    finetuned = report["models"]["finetuned"]["accuracy"]
    assert finetuned - base >= 0.5, (base, finetuned)

    noise = [ln for ln in output.splitlines() if _quiet.NOISE.search(ln)]
    assert not noise, noise
    for word in ("Traceback", "UserWarning", "cuInit", "oneDNN", "libtpu"):
        assert word not in output, word
    assert "tok/s" in output and "eta" in output and "| **accuracy** |" in output

    again = subprocess.run(
        command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "finished" in again.stdout + again.stderr
