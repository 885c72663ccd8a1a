"""Tests of the training step: exact loss normalisation, precision.

The learning-rate schedule and the run's stop reasons: tests/test_schedule.py.

Everything runs the real `Gemma4LoraModel` on the tiny checkpoint for one or
a few optimiser steps; the model is loaded once per module and its adapter
weights reset between tests.
"""

import keras
import numpy as np
import pytest

from gemma4_keras import config_lib
from gemma4_keras.model import presets
from gemma4_keras.model.gemma4_lora_model import Gemma4LoraModel
from gemma4_keras.training import train


def _config(**train_overrides):
    c = config_lib.get_config("tiny", "lora", "runlocal")
    c.lora.dropout = 0.0  # micro-batches and the full batch must see the same net
    for k, v in train_overrides.items():
        c.train[k] = v
    return c


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model, initial adapter weights, 4 single-example batches, config)."""
    c = _config()
    model, tokenizer, preset = presets.load_training_model(c)
    prepared = train.prepare_data(c.data, tokenizer, presets.chat_template(c, preset))
    stream, _ = train.build_batches(prepared.train_examples, c.data, c.train)
    rows = [stream.batch(i) for i in range(2)]  # 2 batches of 2 rows
    singles = [
        {k: v[j : j + 1].copy() for k, v in b.items()} for b in rows for j in range(2)
    ]
    # The sample data trains 2 tokens per example; drop one target of the
    # first so micro-batches hold unequal token counts (1, 2, 2, 2).
    w = singles[0]["loss_weights"]
    w[0, np.flatnonzero(w[0])[0]] = 0.0
    initial = [np.array(v.value) for v in model.trainable_variables]
    return model, initial, singles, c


class _Stream:
    """A BatchStream stand-in serving fixed batches by index."""

    def __init__(self, batches):
        self.batches = batches

    def batch(self, k):
        return {key: v.copy() for key, v in self.batches[k % len(self.batches)].items()}


def _one_step(model, initial, batches, accum, lr=0.5):
    """Adapter weights after one SGD step over `batches` (accum micro-batches)."""
    for v, w in zip(model.trainable_variables, initial):
        v.assign(w)
    model.compile(
        optimizer=keras.optimizers.SGD(
            learning_rate=lr, gradient_accumulation_steps=accum if accum > 1 else None
        ),
        jit_compile=True,
    )
    plan = train.Plan(
        total_steps=1,
        grad_accum=accum,
        tokens_per_step=0,
    )
    model.fit(
        train.step_batches(_Stream(batches), plan, 0),
        shuffle=False,  # a generator: Keras cannot shuffle it
        steps_per_epoch=accum,
        epochs=1,
        verbose=0,
    )
    return [np.array(v.value) for v in model.trainable_variables]


def _update_gap(got, want, initial) -> float:
    """max |update difference| / max |wanted update| over all adapter weights."""
    scale = max(float(np.abs(w - i).max()) for w, i in zip(want, initial))
    assert scale > 1e-4, "the step did not move the adapters"
    return max(float(np.abs(g - w).max()) for g, w in zip(got, want)) / scale


def _concat(batches):
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_accumulated_micro_batches_equal_one_global_batch(setup):
    model, initial, singles, _ = setup
    counts = [float(b["loss_weights"].sum()) for b in singles]
    # Unequal token counts: a per-micro-batch mean would then weight tokens
    # differently from the global mean, so this test can tell them apart.
    assert len(set(counts)) > 1, counts
    accumulated = _one_step(model, initial, singles, accum=4)
    whole = _one_step(model, initial, [_concat(singles)], accum=1)
    assert _update_gap(whole, whole, initial) == 0.0
    # float32 sums in another order differ by ~1e-4 of the update's scale; a
    # wrong normalisation is off by tens of percent (see the control below).
    assert _update_gap(accumulated, whole, initial) < 2e-3


def test_mean_of_micro_batch_means_is_a_different_update(setup):
    """The control: normalising each micro-batch by its own tokens is wrong."""
    model, initial, singles, _ = setup
    whole = _one_step(model, initial, [_concat(singles)], accum=1)
    # Each micro-batch alone, normalised by its own count, accumulated.
    per_mean = [_one_step(model, initial, [b], accum=1, lr=0.5 / 4) for b in singles]
    naive = [
        initial[i] + sum(p[i] - initial[i] for p in per_mean)
        for i in range(len(initial))
    ]
    assert _update_gap(naive, whole, initial) > 0.05


def test_float16_is_accepted():
    c = _config()
    c.model.dtype = "float16"
    config_lib.validate(c)


def test_float32_on_cpu_by_default():
    assert presets.compute_dtype(_config().model) == "float32"


def test_bfloat16_computes_in_bf16_with_float32_adapters_and_optimizer(setup):
    c = _config()
    c.model.dtype = "bfloat16"
    model, _, _ = presets.load_training_model(c)
    assert isinstance(model, Gemma4LoraModel)
    assert model.compute_dtype == "bfloat16"
    frozen = [v for v in model.non_trainable_variables if "embedding" in v.path]
    assert frozen and all(v.dtype == "bfloat16" for v in frozen)
    assert model.trainable_variables
    assert {v.dtype for v in model.trainable_variables} == {"float32"}
    plan = train.Plan(1, 1, 0)
    train.compile_model(model, c.train, train.build_schedule(c.train, plan))
    _, _, singles, _ = setup
    hidden = model(singles[0])
    assert hidden.dtype == "bfloat16"
    model.fit(
        train.step_batches(_Stream(singles), plan, 0),
        shuffle=False,  # a generator: Keras cannot shuffle it
        steps_per_epoch=1,
        epochs=1,
        verbose=0,
    )
    floats = [v for v in model.optimizer.variables if "float" in v.dtype]
    assert floats and {v.dtype for v in floats} == {"float32"}
    assert {v.dtype for v in model.trainable_variables} == {"float32"}
