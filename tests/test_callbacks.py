"""Unit tests of the small training callbacks (no training run needed)."""

import keras
import numpy as np
import pytest

from gemma4_keras.training import callbacks as cb


def _model():
    m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    m.stop_training = False
    return m


def _feed(alarm, history):
    """Feeds (loss, val_loss) pairs, assigning weights = step so restores show."""
    for epoch, (loss, val) in enumerate(history):
        for v in alarm.model.trainable_variables:
            v.assign(np.full(v.shape, float(epoch + 1), "float32"))
        alarm.on_step_end(epoch + 1, {"loss": loss, "val_loss": val})
        if alarm.model.stop_training:
            return epoch + 1
    return None


RISING = [(2.0, 2.0), (1.5, 1.6), (1.2, 1.7), (1.0, 1.8), (0.8, 1.9), (0.6, 2.0)]


def test_overfit_alarm_warns_after_patience_without_stopping():
    alarm = cb.OverfitAlarm(patience=3, action="warn")
    alarm.set_model(_model())
    assert _feed(alarm, RISING) is None
    assert alarm.best_step == 2 and alarm.alarm_step == 5


def test_overfit_alarm_stops_and_restores_best_adapter():
    alarm = cb.OverfitAlarm(patience=2, action="stop")
    alarm.set_model(_model())
    assert _feed(alarm, RISING) == 4
    for v in alarm.model.trainable_variables:
        np.testing.assert_array_equal(np.asarray(v.value), 2.0)  # weights of step 2


def test_overfit_alarm_quiet_while_val_improves_or_train_stalls():
    alarm = cb.OverfitAlarm(patience=1, action="stop")
    alarm.set_model(_model())
    improving = [(2.0, 2.0), (1.5, 1.8), (1.2, 1.7), (1.0, 1.6)]
    both_flat = [(1.0, 1.6), (1.0, 1.6), (1.0, 1.7)]  # train loss not falling
    assert _feed(alarm, improving + both_flat) is None and alarm.alarm_step is None


def test_overfit_alarm_rejects_unknown_action():
    with pytest.raises(ValueError, match="overfit_action"):
        cb.OverfitAlarm(patience=1, action="explode")


def test_progress_counts_real_tokens_not_padding():
    counts = {3: 100, 4: 50, 5: 7}
    p = cb.Progress(total=10, tokens_per_step=4096, every=1, start=3, counts=counts)
    assert p.tokens_done(5) == 150
    assert cb.Progress(10, 4096, 1, start=3).tokens_done(5) == 2 * 4096
