"""The test harness itself: oracles load per test, CI requires them, and the
TensorFlow + triton crash of a CUDA torch build cannot happen in a test run."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import conftest
import oracles
import pytest

TESTS = pathlib.Path(__file__).resolve().parent


def test_tensorflow_then_torch_dynamo_and_bitsandbytes_in_one_process():
    # Without the guard this exact sequence exits 139 when torch is a CUDA
    # build with triton installed (the registry's default on Linux x86-64).
    code = (
        "import oracles; oracles.block_triton()\n"
        "import tensorflow, keras_hub, torch, torch._dynamo, bitsandbytes, peft\n"
        "try:\n    import triton\nexcept ImportError:\n    print('triton blocked')\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(TESTS)},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "triton blocked"


def test_block_triton_leaves_an_imported_triton_alone(monkeypatch):
    fake = object()
    monkeypatch.setitem(sys.modules, "triton", fake)
    oracles.block_triton()
    assert sys.modules["triton"] is fake


def test_missing_lists_only_absent_oracles(monkeypatch):
    monkeypatch.setattr(oracles, "ORACLES", ("json", "no_such_mod_x"))
    assert oracles.missing() == ["no_such_mod_x"]


def test_need_fails_instead_under_require_oracles(monkeypatch):
    monkeypatch.setattr(oracles, "REQUIRED", True)
    with pytest.raises(pytest.fail.Exception, match="--require-oracles: oracle"):
        oracles.need("no_such_oracle_module")


def test_need_skips_with_the_install_command(monkeypatch):
    monkeypatch.setattr(oracles, "REQUIRED", False)
    with pytest.raises(pytest.skip.Exception, match=r'pip install -e "\.\[test\]"'):
        oracles.need("no_such_oracle_module")
    assert oracles.need("json").dumps([1]) == "[1]"


class _Config:
    def __init__(self, require: bool):
        self.require = require

    def getoption(self, name: str):
        assert name == "--require-oracles"
        return self.require


def test_require_oracles_stops_the_session_naming_the_missing_one(monkeypatch):
    monkeypatch.setattr(oracles, "REQUIRED", oracles.REQUIRED)  # restored after
    monkeypatch.setattr(oracles, "ORACLES", ("json", "no_such_mod_x"))
    with pytest.raises(pytest.UsageError, match="not installed: no_such_mod_x"):
        conftest.pytest_configure(_Config(require=True))
    conftest.pytest_configure(_Config(require=False))  # skips are allowed then
    assert oracles.REQUIRED is False
