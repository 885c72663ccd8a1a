"""One meaning of a step: the package's callbacks number optimiser steps alike
in `run` (one Keras epoch = one optimiser step) and in a notebook's own `fit`
(the public recipe: an epoch is a pass over the data, with gradient
accumulation), by the optimiser's count, not Keras's epoch index."""

import csv
import os
import re

import gemma4_keras as g4
from gemma4_keras.training import callbacks as cb
from gemma4_keras.training import checkpointing, train

STEPS = 4  # conftest.TINY_RUN: 4 optimiser steps, checkpoints every 2


def _steps_logged(workdir) -> list[tuple[int, str]]:
    """(step, learning_rate) rows of a workdir's train_log.csv."""
    with open(os.path.join(workdir, "train_log.csv"), newline="") as f:
        return [(int(r["step"]), r["learning_rate"]) for r in csv.DictReader(f)]


def _steps_saved(workdir) -> list[int]:
    names = os.listdir(os.path.join(workdir, "checkpoints"))
    return sorted(int(n) for n in names if n.isdigit())


def test_callbacks_number_steps_alike_in_run_and_in_your_own_fit(
    finished, tmp_path, capsys
):
    # The run's config, with 2 micro-batches per optimiser step in the recipe.
    config = g4.get_config(
        "tiny",
        "lora",
        "runlocal",
        overrides={
            "data.path": str(finished["data"]),
            "train.max_steps": STEPS,
            "train.grad_accum": 2,
            "checkpoint.every_steps": 2,
        },
    )
    model, tokenizer, preset = g4.load_training_model(config)
    data = g4.training_data(config, tokenizer, preset)
    g4.compile_model(model, config, data)
    assert data.plan.total_steps == STEPS and data.plan.grad_accum == 2
    workdir = str(tmp_path)
    ckpt = train.build_checkpointer(config, workdir, model, preset)
    callbacks = [
        cb.LearningRateLogger(train.build_schedule(config.train, data.plan)),
        cb.Progress(STEPS, data.plan.tokens_per_step, every=1),
        train.StepCSVLogger(os.path.join(workdir, "train_log.csv")),
        checkpointing.CheckpointCallback(ckpt, 2, STEPS),
    ]
    capsys.readouterr()
    # The recipe's one epoch split in two, so that steps end both inside an
    # epoch (Keras calls batch ends) and at an epoch's end.
    model.fit(
        data.batches,
        steps_per_epoch=data.steps_per_epoch // 2,
        epochs=2 * data.epochs,
        callbacks=callbacks,
        shuffle=False,
        verbose=0,
    )
    printed = re.findall(r"^step (\d+)/4 ", capsys.readouterr().out, re.M)

    run = _steps_logged(finished["workdir"])
    mine = _steps_logged(workdir)
    assert [s for s, _ in run] == list(range(1, STEPS + 1))
    assert [s for s, _ in mine] == [s for s, _ in run]
    # The rate each row logs is that of its optimiser step (the same schedule).
    assert [r for _, r in mine] == [r for _, r in run]
    assert _steps_saved(workdir) == _steps_saved(finished["workdir"]) == [2, 4]
    assert [int(s) for s in printed] == list(range(1, STEPS + 1))
    assert cb.optimizer_step(model) == STEPS
