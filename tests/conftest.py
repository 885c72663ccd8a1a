"""Shared pytest setup: hermetic environment, oracles, the JAX backend."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("KAGGLE_OFFLINE", "1")

import oracles  # noqa: E402
import pytest  # noqa: E402

oracles.block_triton()  # before anything can import torch (see oracles.py)

import gemma4_keras  # noqa: E402,F401  (sets KERAS_BACKEND=jax first)


def pytest_addoption(parser):
    parser.addoption(
        "--require-oracles",
        action="store_true",
        help="fail (instead of skipping tests) when torch, transformers, peft, "
        "bitsandbytes or gguf is missing; CI sets it",
    )


def pytest_configure(config):
    oracles.REQUIRED = bool(config.getoption("--require-oracles"))
    if oracles.REQUIRED:
        absent = oracles.missing()
        if absent:
            raise pytest.UsageError(
                f"--require-oracles: not installed: {', '.join(absent)}; "
                f"{oracles.INSTALL}"
            )
