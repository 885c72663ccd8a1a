"""The frozen base is held once, in its storage dtype, through the train step.

Two ways the real E2B run held about 2.5x its model (issue #23):

* float32 compute stored the bfloat16 checkpoint's frozen tables (token
  embedding, per-layer-embedding table) in float32: twice their bytes;
* the streaming loader handed those tables to JAX as arrays that adopt a
  numpy buffer; such an array cannot be donated, so Keras' first train step
  (which donates the whole state) copied every one of them, and for the
  rest of the step the process held the frozen base twice.

A bfloat16 checkpoint with a large vocabulary (the tables dominate, as in
E2B/E4B) is streamed with float32 compute and NF4, and one step of Keras'
own `fit` runs: every frozen variable must keep its dtype and its buffer
(the step updated it in place), and XLA's count of the step's outputs,
beyond those aliased to inputs, must be the trainable state alone.
"""

from __future__ import annotations

import math

import jax
import keras
import numpy as np
import pytest
import tensorflow as tf

from gemma4_keras import testing
from gemma4_keras.model import presets, stream_load
from gemma4_keras.model.lora import LoraSpec
from gemma4_keras.testing import full_size, tiny

VOCAB, SEQ = 32768, 16


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    cfg = tiny.tiny_hf_config(ple=True, kv_shared_layers=2)
    text = cfg.get("text_config", cfg)
    text.update(vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB)
    path = full_size.write_checkpoint(tmp_path_factory.mktemp("bf16"), cfg)
    with presets.on_host():
        model = stream_load.stream_training_model(
            path, LoraSpec(rank=4), dtype="float32", quant="nf4", double_quant=True
        )
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), jit_compile=True)
    return model


def _batch() -> dict:
    ids = np.arange(SEQ, dtype=np.int32)[None] + 5
    return {
        "token_ids": ids,
        "positions": np.arange(SEQ, dtype=np.int32)[None],
        "segment_ids": np.ones((1, SEQ), np.int32),
        "target_ids": np.roll(ids, -1, axis=1),
        "loss_weights": np.ones((1, SEQ), np.float32),
        "loss_norm": np.full((1,), float(SEQ), np.float32),
    }


def _nbytes(variables) -> int:
    return sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in variables)


def test_frozen_tables_keep_the_checkpoints_bfloat16(model):
    tables = {n: model.globals[n] for n in ("embedding", "ple_embedding")}
    assert {n: str(v.dtype) for n, v in tables.items()} == {
        "embedding": "bfloat16",
        "ple_embedding": "bfloat16",
    }
    assert model.compute_dtype == "float32"
    assert {str(v.dtype) for v in model.trainable_variables} == {"float32"}


def test_train_step_updates_the_frozen_base_in_place(model):
    """Every frozen array keeps its buffer through Keras' `fit` (donated and
    aliased, not copied); the old loader's arrays were copied by the step."""
    # XLA:CPU gives arrays of a few KiB fresh buffers even when donated; what
    # costs memory is the large ones (here the tables, 4 and 2 MiB).
    frozen = [v for v in model.non_trainable_variables if _nbytes([v]) >= 1 << 16]
    assert {"embedding", "ple_embedding"} <= {v.name for v in frozen}
    before = [v.value.unsafe_buffer_pointer() for v in frozen]
    data = tf.data.Dataset.from_tensors(_batch()).repeat()
    model.fit(data, epochs=1, steps_per_epoch=1, verbose=0)
    after = [v.value.unsafe_buffer_pointer() for v in frozen]
    moved = [v.path for v, a, b in zip(frozen, after, before) if a != b]
    assert not moved, f"the step copied frozen arrays: {moved}"


def test_step_outputs_beyond_aliases_are_the_trainable_state(model):
    model.optimizer.build(model.trainable_variables)
    state = testing.train_step_state(model)
    step = jax.jit(model.train_step, donate_argnums=0)
    mem = step.lower(state, (_batch(),)).compile().memory_analysis()
    trainable = _nbytes(
        [
            *model.trainable_variables,
            *model.optimizer.variables,
            *model.metrics_variables,
        ]
    )
    frozen = _nbytes(model.non_trainable_variables)
    assert frozen > 10 * trainable  # the check below would see a frozen copy
    fresh = mem.output_size_in_bytes - mem.alias_size_in_bytes
    assert fresh <= trainable + 1024, (fresh, trainable)
