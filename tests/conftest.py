"""Shared pytest setup: hermetic environment, oracles, the JAX backend, and
the session's finished tiny run (`finished`)."""

import os
import pathlib
import shutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("KAGGLE_OFFLINE", "1")

import oracles  # noqa: E402
import pytest  # noqa: E402

oracles.block_triton()  # before anything can import torch (see oracles.py)

import gemma4_keras  # noqa: E402,F401  (sets KERAS_BACKEND=jax first)

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The shared run: the tiny config, 4 steps, checkpoints at steps 2 and 4.
TINY_RUN = (
    f"--config={ROOT}/configs/tiny.py:runlocal",
    "--config.train.max_steps=4",
    "--config.checkpoint.every_steps=2",
)


def pytest_addoption(parser):
    parser.addoption(
        "--require-oracles",
        action="store_true",
        help="fail (instead of skipping tests) when torch, transformers, peft, "
        "bitsandbytes, gguf or xllamacpp (llama.cpp) is missing; CI sets it",
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


def train_tiny_run(base: pathlib.Path) -> dict:
    """A finished 4-step tiny run in `base`, on its own copy of the sample data.

    Returns {"workdir", "data", "args"}: `args` is the train command without
    `--workdir` (`args[1]` the `--config` flag, the rest its overrides: the
    run's config).
    """
    from gemma4_keras import cli, config_lib  # the CLI: only sessions that train

    data = base / "data" / "train.jsonl"
    data.parent.mkdir()
    shutil.copy(config_lib.default_dataset_path(), data)
    workdir = base / "run"
    args = ("train", *TINY_RUN, f"--config.data.path={data}")
    assert cli.main(["gemma4-keras", *args, f"--workdir={workdir}"]) == 0
    return {"workdir": workdir, "data": data, "args": args}


@pytest.fixture(scope="session")
def finished(tmp_path_factory):
    """The session's finished tiny run (`train_tiny_run`), shared read-only.

    Trained once per test process (each pytest-xdist worker has its own: the
    tests that use it change its data file for a moment, which must not race
    with another process). A test that writes into the run works on a copy
    (`test_reliability.copy_run`); one that changes the data file restores it
    in a `finally`.
    """
    return train_tiny_run(tmp_path_factory.mktemp("finished"))
