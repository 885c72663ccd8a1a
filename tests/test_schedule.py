"""Training semantics: the learning-rate schedule and how a run stops.

The schedule is checked against the closed form (float64, below), then as
the optimiser applies it (with gradient accumulation), then through
`train.run` on the tiny config: the rates in train_log.csv, a preempted run
resumed, and every stop reason recorded in run_state.json.
"""

import csv
import json
import math
import os
import signal

import keras
import numpy as np
import pytest

from gemma4_keras import config_lib
from gemma4_keras.exporters import commands
from gemma4_keras.training import callbacks as cb
from gemma4_keras.training import checkpointing, train


def closed_form(step: int, peak: float, total: int, warmup: int, decay: str) -> float:
    """transformers' warmup + cosine (or constant) schedule, in float64."""
    if step < warmup:
        return peak * step / max(1, warmup)
    if decay == "constant":
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


# --- the schedule alone -----------------------------------------------------

CASES = [  # (total, warmup, decay)
    (10, 2, "cosine"),
    (6, 0, "cosine"),
    (3, 3, "cosine"),  # all warmup
    (4, 9, "cosine"),  # warmup longer than the run
    (1000, 100, "cosine"),  # float32 must hold near the end of the decay
    (10, 2, "constant"),
]


@pytest.mark.parametrize("total,warmup,decay", CASES)
def test_rates_equal_the_closed_form(total, warmup, decay):
    s = cb.WarmupDecay(2e-4, total_steps=total, warmup_steps=warmup, decay=decay)
    steps = range(total + 2)
    got = [s.rate(k) for k in steps]
    want = [closed_form(k, 2e-4, total, warmup, decay) for k in steps]
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-12)


def test_rates_are_read_per_optimiser_step_not_per_micro_batch():
    s = cb.WarmupDecay(1.0, total_steps=5, warmup_steps=2, grad_accum=3)
    # Keras calls the schedule with its micro-batch counter (3 per step).
    got = [float(s(i)) for i in range(15)]
    assert got == [s.rate(k) for k in range(5) for _ in range(3)]
    assert got[:6] == [0.0, 0.0, 0.0, 0.5, 0.5, 0.5]


def test_schedule_and_optimizer_round_trip_through_keras_serialisation():
    s = cb.WarmupDecay(3e-4, total_steps=8, warmup_steps=2, decay="constant")
    back = keras.optimizers.schedules.deserialize(
        keras.optimizers.schedules.serialize(s)
    )
    assert isinstance(back, cb.WarmupDecay) and back.get_config() == s.get_config()
    opt = keras.optimizers.AdamW(learning_rate=s)
    again = keras.optimizers.AdamW.from_config(opt.get_config())
    assert [float(again.learning_rate)] == [s.rate(0)]


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="train.schedule='linear' must be cosine"):
        cb.WarmupDecay(1.0, total_steps=4, decay="linear")
    with pytest.raises(ValueError, match="total_steps >= 1"):
        cb.WarmupDecay(1.0, total_steps=0)


# --- the schedule as the optimiser applies it --------------------------------


class _Linear(keras.Model):
    """loss = -w: a constant gradient, so AdamW moves w by the rate itself."""

    def __init__(self):
        super().__init__()
        self.w = self.add_weight(shape=(1,), initializer="zeros")

    def call(self, x):
        return x * self.w

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        return -keras.ops.mean(y_pred)


def _ones():
    while True:
        yield (np.ones((1, 1), "float32"),)


def test_applied_updates_follow_the_schedule_with_gradient_accumulation():
    c = config_lib.get_config("tiny", "lora", "runlocal")
    c.train.update(learning_rate=1e-3, weight_decay=0.0, warmup_steps=2)
    c.train.grad_accum = 3
    plan = train.Plan(total_steps=6, grad_accum=3, tokens_per_step=0)
    schedule = train.build_schedule(c.train, plan)
    model = _Linear()
    train.compile_model(model, c.train, schedule)
    w = [0.0]
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda e, logs: w.append(float(model.w.numpy()[0]))
    )
    model.fit(
        _ones(),
        steps_per_epoch=3,
        epochs=6,
        callbacks=[record],
        shuffle=False,
        verbose=0,
    )
    assert int(model.optimizer.iterations) == 6
    applied = np.diff(w)  # AdamW's step for a constant gradient: the rate
    want = [closed_form(k, 1e-3, 6, 2, "cosine") for k in range(6)]
    # Adam's float32 bias corrections (1 - 0.999^t) round at ~1e-5; reading
    # the schedule per micro-batch would be off by 15% or more (0.5 vs 0.85).
    np.testing.assert_allclose(applied, want, rtol=1e-4, atol=1e-10)


def test_a_checkpoint_with_another_step_count_is_refused():
    model = _Linear()
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1))
    model.optimizer.iterations.assign(3)
    train.check_optimizer_step(model, 3, "ckpts")
    with pytest.raises(checkpointing.CheckpointError, match="ckpts: checkpoint step 4"):
        train.check_optimizer_step(model, 4, "ckpts")


def test_tensorboard_keeps_the_applied_rate(tmp_path):
    model = _Linear()
    s = cb.WarmupDecay(1.0, total_steps=4, warmup_steps=2)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=s))
    model.optimizer.iterations.assign(2)  # 2 steps done: the last used 0.5
    tb = train.StepTensorBoard(str(tmp_path))
    tb.set_model(model)
    assert tb._collect_learning_rate({"learning_rate": 0.5}) == {"learning_rate": 0.5}
    plain = keras.callbacks.TensorBoard(str(tmp_path))
    plain.set_model(model)
    assert plain._collect_learning_rate({})["learning_rate"] == 1.0  # the next one


# --- through train.run ------------------------------------------------------

STEPS, ACCUM, WARMUP, PEAK = 4, 2, 1, 1e-3


def _config(**train):
    c = config_lib.get_config("tiny", "lora", "runlocal")
    base = dict(max_steps=STEPS, grad_accum=ACCUM, warmup_steps=WARMUP)
    c.train.update({**base, "learning_rate": PEAK, **train})
    c.checkpoint.update(every_steps=STEPS, max_to_keep=STEPS)
    return c


def _log(workdir) -> list[dict]:
    with open(os.path.join(workdir, "train_log.csv"), newline="") as f:
        return list(csv.DictReader(f))


def _state(workdir) -> dict:
    with open(os.path.join(workdir, "run_state.json")) as f:
        return json.load(f)


class _SigtermAt(keras.callbacks.Callback):
    """Sends this process SIGTERM at the end of optimiser step `step`."""

    def __init__(self, step: int):
        super().__init__()
        self.step = step

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.step:
            handler = signal.getsignal(signal.SIGTERM)
            assert getattr(handler, "__self__", None).__class__ is cb.PreemptionGuard
            signal.raise_signal(signal.SIGTERM)


def _with_first(callback, monkeypatch):
    """Makes `train.run` put `callback` before its own callbacks."""
    build = train.build_callbacks
    monkeypatch.setattr(
        train, "build_callbacks", lambda *a, **k: [callback, *build(*a, **k)]
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run; one preempted after step 2, then rerun to the end."""
    base = tmp_path_factory.mktemp("schedule")
    whole, resumed = str(base / "whole"), str(base / "resumed")
    assert train.run(_config(), whole)["status"] == "finished"
    with pytest.MonkeyPatch.context() as mp:
        _with_first(_SigtermAt(2), mp)
        first = train.run(_config(), resumed)
    first_log = _log(resumed)
    final = train.run(_config(), resumed)
    return {
        "whole": whole,
        "resumed": resumed,
        "first": first,
        "first_log": first_log,
        "final": final,
    }


@pytest.mark.slow  # the `runs` fixture: three tiny runs
def test_logged_rates_are_the_schedule_of_each_optimiser_step(runs):
    rows = _log(runs["whole"])
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    got = [float(r["learning_rate"]) for r in rows]
    want = [closed_form(k, PEAK, STEPS, WARMUP, "cosine") for k in range(STEPS)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
    assert _state(runs["whole"])["status"] == "finished"


@pytest.mark.slow
def test_preempted_run_records_it_then_resumes_the_schedule(runs):
    assert runs["first"] == {
        "status": "preempted",
        "step": 2,
        "phase": "training",
        "signal": "SIGTERM",
    }
    assert [int(r["step"]) for r in runs["first_log"]] == [1, 2]
    assert runs["final"]["status"] == "finished" and runs["final"]["step"] == STEPS
    resumed, whole = _log(runs["resumed"]), _log(runs["whole"])
    assert [r["step"] for r in resumed] == [r["step"] for r in whole]
    # The same rates, to the bit, as the uninterrupted run: the optimiser's
    # step count came back with the checkpoint.
    assert [r["learning_rate"] for r in resumed] == [r["learning_rate"] for r in whole]


class _ScriptedAlarm(cb.OverfitAlarm):
    """OverfitAlarm fed a script: validation loss rises from step 2 on while
    the training loss falls (the real losses of a 4-step run do not)."""

    def on_epoch_end(self, epoch, logs=None):
        script = {"loss": 3.0 - epoch, "val_loss": [2.0, 1.0, 1.5, 1.8][epoch]}
        super().on_epoch_end(epoch, {**logs, **script})


def _snapshot(workdir) -> dict:
    out = {}
    for d, _, files in os.walk(workdir):
        for f in files:
            path = os.path.join(d, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, workdir)] = fh.read()
    return out


def _adapter_sums(workdir, step) -> dict:
    """The adapter arrays' sha256 saved with a step (in Orbax's step metadata)."""
    path = os.path.join(workdir, "checkpoints", str(step), "_CHECKPOINT_METADATA")
    with open(path) as f:
        sums = json.load(f)["custom_metadata"][checkpointing.SUMS_KEY]
    return {k: v for k, v in sums.items() if k.startswith("adapter/")}


def test_overfitting_stop_is_recorded_and_a_rerun_does_nothing(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(cb, "OverfitAlarm", _ScriptedAlarm)
    c = _config(eval_every=1, overfit_patience=1, overfit_action="stop")
    c.train.grad_accum = 1
    c.checkpoint.every_steps = 1
    state = train.run(c, str(tmp_path))
    assert {k: state[k] for k in ("status", "step", "restored_step")} == {
        "status": "stopped_overfitting",
        "step": 3,
        "restored_step": 2,
    }
    assert state["report"] and os.path.isfile(state["report"])
    assert len(_log(tmp_path)) == 3
    # The checkpoint saved on stopping holds the adapter of step 2.
    assert _adapter_sums(tmp_path, 3) == _adapter_sums(tmp_path, 2)
    assert _adapter_sums(tmp_path, 2) != _adapter_sums(tmp_path, 1)
    commands.check_workdir(str(tmp_path))  # exportable, as a finished run
    before = _snapshot(tmp_path)
    capsys.readouterr()
    assert train.run(c, str(tmp_path)) == _state(tmp_path)
    assert "stopped for overfitting at step 3 with the adapter of step 2; " in (
        capsys.readouterr().out
    )
    assert _snapshot(tmp_path) == before


def test_diverged_run_is_recorded_and_a_rerun_does_nothing(tmp_path, capsys):
    c = _config(learning_rate=1e30, warmup_steps=0, warmup_ratio=0.0)
    c.train.grad_accum = 1
    c.checkpoint.every_steps = 1
    assert train.run(c, str(tmp_path)) == {"status": "diverged", "step": 2}
    # Step 2's state (NaN) is never saved; no adapter, no report.
    assert [d for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()] == ["1"]
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "eval").exists()
    before = _snapshot(tmp_path)
    capsys.readouterr()
    assert train.run(c, str(tmp_path)) == {"status": "diverged", "step": 2}
    out = capsys.readouterr().out
    assert "diverged (loss NaN/inf) at step 2; nothing to do" in out
    assert _snapshot(tmp_path) == before
