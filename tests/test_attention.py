"""Chunked and fused attention against the dense reference (model/attention.py).

Outputs and gradients (w.r.t. q, k, v) in float32 on packed rows with
padding, for sliding and global layers, grouped-query heads, with and
without a soft-cap; and the whole model's loss and adapter gradients with
each implementation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_keras.model import attention, stream_load
from gemma4_keras.model.lora import LoraSpec
from gemma4_keras.testing import tiny

RTOL = 1e-5


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _packed_segments(t: int, rng) -> np.ndarray:
    """Two rows: several packed documents then padding; one full document."""
    row = np.zeros(t, np.int32)
    cuts = sorted(rng.choice(np.arange(3, t - 5), size=3, replace=False))
    row[: cuts[0]] = 1
    row[cuts[0] : cuts[1]] = 2
    row[cuts[1] : cuts[2]] = 3  # then padding (0) to the end
    return np.stack([row, np.ones(t, np.int32)])


def _inputs(t=45, n=4, kv=2, h=8, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(2, t, n, h)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, t, kv, h)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, t, kv, h)), jnp.float32)
    return q, k, v, jnp.asarray(_packed_segments(t, rng))


def _value_and_grads(fn, q, k, v):
    w = jnp.asarray(np.random.default_rng(9).normal(size=(q.shape[0], q.shape[1], 1)))

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v) * w.astype(q.dtype))

    out = fn(q, k, v)
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    return out, grads


@pytest.mark.parametrize(
    "window,chunk,soft_cap",
    [
        (None, 8, None),  # global layer, ragged last chunk (45 = 5 x 8 + 5)
        (None, 16, 50.0),  # global with a soft-cap
        (6, 8, None),  # sliding: each chunk reads chunk + window - 1 keys
        (6, 5, 50.0),  # chunk smaller than the window, soft-capped
        (11, 7, None),  # window wider than the chunk
        (40, 8, None),  # chunk + window >= T: all keys, like a global layer
        (6, 64, None),  # one chunk longer than the row
    ],
)
def test_chunked_matches_dense(window, chunk, soft_cap):
    q, k, v, seg = _inputs()

    def dense(q, k, v):
        mask = attention.attention_mask(seg, window)
        return attention.dot_attention(q, k, v, mask, soft_cap)

    def chunked(q, k, v):
        return attention.chunked_attention(q, k, v, seg, window, soft_cap, chunk)

    ref, ref_grads = _value_and_grads(dense, q, k, v)
    out, grads = jax.jit(lambda *a: _value_and_grads(chunked, *a))(q, k, v)
    assert _rel(out, ref) < RTOL
    for g, r in zip(grads, ref_grads):
        assert _rel(g, r) < RTOL
    # Padding queries get zeros, as in the dense path.
    pad = np.asarray(seg) == 0
    assert pad.any() and np.all(np.asarray(out)[pad] == 0)


@pytest.mark.parametrize("window", [None, 6])
def test_fused_matches_dense(window):
    """`jax.nn.dot_product_attention` (XLA's implementation on CPU)."""
    q, k, v, seg = _inputs(t=32)

    def dense(q, k, v):
        return attention.dot_attention(
            q, k, v, attention.attention_mask(seg, window), None
        )

    def fused(q, k, v):
        return attention.fused_attention(q, k, v, seg, window, "xla")

    ref, ref_grads = _value_and_grads(dense, q, k, v)
    out, grads = _value_and_grads(fused, q, k, v)
    assert _rel(out, ref) < RTOL
    for g, r in zip(grads, ref_grads):
        assert _rel(g, r) < RTOL


def test_sliding_chunks_read_only_their_window():
    """A sliding layer's chunked cost grows with T x window, not T^2."""
    t, window, chunk = 1024, 32, 32
    q, k, v, seg = _inputs(t=t, n=2, kv=1, h=8)

    def flops(fn):
        compiled = jax.jit(fn).lower(q, k, v).compile()
        return compiled.cost_analysis()["flops"]

    dense = flops(
        lambda q, k, v: attention.dot_attention(
            q, k, v, attention.attention_mask(seg, window), None
        )
    )
    chunked = flops(
        lambda q, k, v: attention.chunked_attention(q, k, v, seg, window, None, chunk)
    )
    # dense: T x T keys per query row; chunked: chunk + window - 1 = 63.
    assert chunked < dense * (2 * window) / t * 1.5


def test_resolve_auto_on_cpu():
    q = jnp.zeros((1, 600, 2, 8))
    assert attention.resolve("auto", q, None, 512) == "chunked"
    assert attention.resolve("auto", q[:, :512], None, 512) == "dense"
    assert attention.resolve("dense", q, None, 512) == "dense"
    with pytest.raises(ValueError, match="model.attention='flash'"):
        attention.resolve("flash", q, None, 512)
    with pytest.raises(ValueError, match="soft-cap"):
        attention.resolve("fused", q, 50.0, 512)


@pytest.mark.parametrize(
    "implementation,variant",
    [
        ("chunked", {}),
        ("chunked", {"k_eq_v": True, "kv_shared_layers": 1, "ple": True}),
        ("fused", {}),
    ],
)
def test_model_loss_and_grads_match_dense(implementation, variant):
    """The whole model (remat, packed rows, padding): output and adapter grads.

    Rows of 24 tokens in chunks of 5: the tiny model's sliding layers
    (window 16) take the sliding path (5 + 15 keys < 24).
    """
    model = stream_load.stream_training_model(
        str(tiny.tiny_checkpoint(**variant)),
        LoraSpec(rank=4, alpha=8.0),
        remat=True,
        dtype="float32",
    )
    rng = np.random.default_rng(1)
    for var in model.trainable_variables:  # B = 0 would hide the adapters
        var.assign(rng.normal(size=var.shape) * 0.05)
    seg = _packed_segments(24, np.random.default_rng(3))
    pos = np.zeros_like(seg)
    for r in range(seg.shape[0]):
        for s in np.unique(seg[r]):
            idx = np.where(seg[r] == s)[0]
            pos[r, idx] = np.arange(len(idx))
    ids = rng.integers(1, model.spec.vocab_size, seg.shape)
    batch = {
        "token_ids": jnp.asarray(ids, jnp.int32),
        "positions": jnp.asarray(pos, jnp.int32),
        "segment_ids": jnp.asarray(seg, jnp.int32),
    }
    trainable = [v.value for v in model.trainable_variables]
    frozen = [v.value for v in model.non_trainable_variables]
    weight = jnp.asarray(rng.normal(size=(*seg.shape, 1)) * (seg > 0)[..., None])

    def loss(trainable):
        hidden, _ = model.stateless_call(trainable, frozen, batch)
        return jnp.sum(hidden * weight)

    results = {}
    for impl in ("dense", implementation):
        model.set_attention(impl, chunk_size=5)
        results[impl] = jax.jit(jax.value_and_grad(loss))(trainable)
    value, grads = results[implementation]
    ref_value, ref_grads = results["dense"]
    assert _rel(value, ref_value) < RTOL
    assert len(grads) == len(ref_grads) > 0
    for g, r in zip(grads, ref_grads):
        assert _rel(g, r) < RTOL
