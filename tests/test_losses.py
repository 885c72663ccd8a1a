"""Tests for gemma4_keras.model.loss: the chunked loss equals the full-logits one."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_keras.model import loss as loss_lib
from gemma4_keras.model.quant import Int8Rows

RTOL = 1e-5


def _rel_err(actual: jax.Array, expected: jax.Array) -> float:
    """Norm-wise relative error, the measure the package promises (< 1e-5)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def _inputs(batch, seq, dim, vocab, *, seed=0, scale=4.0, dtype=jnp.float32):
    """Random inputs whose raw logits (std ~ scale^2) reach the tanh's bend."""
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(scale * rng.normal(size=(batch, seq, dim)) / dim**0.25, dtype)
    embedding = jnp.asarray(scale * rng.normal(size=(vocab, dim)) / dim**0.25, dtype)
    targets = jnp.asarray(rng.integers(0, vocab, (batch, seq)), jnp.int32)
    weights = jnp.asarray(rng.random((batch, seq)) > 0.3, jnp.float32)
    return hidden, embedding, targets, weights


def _value_and_grads(loss_fn, hidden, embedding, targets, weights, use_jit):
    """(loss_sum, weight_sum), (d_hidden, d_embedding, d_weights) of loss_sum."""

    def loss_sum(h, e, w):
        total, count = loss_fn(h, e, targets, w)
        return total, count

    fn = jax.value_and_grad(loss_sum, argnums=(0, 1, 2), has_aux=True)
    if use_jit:
        fn = jax.jit(fn)
    (total, count), grads = fn(hidden, embedding, weights)
    return total, count, grads


# (batch, seq, dim, vocab, chunk_size, soft_cap)
SHAPES = [
    (1, 64, 16, 128, 16, 30.0),  # tokens divisible by the chunk
    (2, 37, 16, 300, 16, 30.0),  # B > 1, 74 tokens: the last chunk is padded
    (3, 5, 8, 50, 1024, 30.0),  # fewer tokens than one chunk
    (2, 37, 16, 300, 16, None),  # no soft-cap
    (2, 50, 32, 1000, 7, None),  # odd chunk size
    (1, 33, 24, 517, 8, 5.0),  # a small cap: tanh saturates hard
]


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("batch,seq,dim,vocab,chunk_size,soft_cap", SHAPES)
def test_chunked_equals_full(batch, seq, dim, vocab, chunk_size, soft_cap, use_jit):
    hidden, embedding, targets, weights = _inputs(batch, seq, dim, vocab)
    chunked = _value_and_grads(
        lambda h, e, t, w: loss_lib.chunked_cross_entropy(
            h, e, t, w, soft_cap=soft_cap, chunk_size=chunk_size
        ),
        hidden,
        embedding,
        targets,
        weights,
        use_jit,
    )
    full = _value_and_grads(
        lambda h, e, t, w: loss_lib.full_cross_entropy(h, e, t, w, soft_cap=soft_cap),
        hidden,
        embedding,
        targets,
        weights,
        use_jit,
    )
    c_total, c_count, (c_dh, c_de, c_dw) = chunked
    f_total, f_count, (f_dh, f_de, f_dw) = full
    assert c_total.dtype == jnp.float32 and c_count.dtype == jnp.float32
    assert c_total.shape == () and c_count.shape == ()
    assert float(c_count) == float(jnp.sum(weights))
    assert _rel_err(c_total, f_total) < RTOL
    assert _rel_err(c_dh, f_dh) < RTOL
    assert _rel_err(c_dw, f_dw) < RTOL
    # The tied embedding is frozen: a zero gradient of its shape and dtype.
    assert c_de.shape == f_de.shape and c_de.dtype == embedding.dtype
    assert not np.any(np.asarray(c_de))
    # Ignored tokens get no hidden gradient at all.
    assert np.all(np.asarray(c_dh)[np.asarray(weights) == 0] == 0)


def test_soft_cap_changes_the_loss():
    # Guards the equality test: with these inputs the cap is not a no-op.
    hidden, embedding, targets, weights = _inputs(2, 37, 16, 300)
    capped, _ = loss_lib.chunked_cross_entropy(hidden, embedding, targets, weights)
    plain, _ = loss_lib.chunked_cross_entropy(
        hidden, embedding, targets, weights, soft_cap=None
    )
    assert _rel_err(capped, plain) > 1e-2


@pytest.mark.parametrize("batch,seq,dim,vocab,chunk_size,soft_cap", SHAPES)
def test_a_non_unit_cotangent_scales_the_saved_gradient(
    batch, seq, dim, vocab, chunk_size, soft_cap
):
    # d_hidden is formed in the forward pass for a unit cotangent; a mean
    # over a global token count must scale it exactly as autodiff of the
    # full-logits reference does.
    hidden, embedding, targets, weights = _inputs(batch, seq, dim, vocab, seed=3)
    norm = 3.7 * float(np.sum(np.asarray(weights)))

    def run(loss_fn):
        def loss(h, w):
            return loss_fn(h, embedding, targets, w)[0] / norm

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(hidden, weights)

    new_loss, (new_dh, new_dw) = run(
        lambda h, e, t, w: loss_lib.chunked_cross_entropy(
            h, e, t, w, soft_cap=soft_cap, chunk_size=chunk_size
        )
    )
    ref_loss, (ref_dh, ref_dw) = run(
        lambda h, e, t, w: loss_lib.full_cross_entropy(h, e, t, w, soft_cap=soft_cap)
    )
    assert _rel_err(new_loss, ref_loss) < RTOL
    assert _rel_err(new_dh, ref_dh) < RTOL
    assert _rel_err(new_dw, ref_dw) < RTOL


def test_train_step_has_two_loss_matmuls_per_chunk_not_three():
    # XLA counts a loop body once: the chunked step's FLOPs are those of one
    # chunk. With the embedding frozen, the body holds the logits and the
    # d_hidden matmul (2 * 2 * chunk * vocab * dim); recomputing the logits in
    # the backward pass would add a third.
    chunk, vocab, dim = 64, 4096, 32

    def flops():
        def step(h, e, t, w):
            def mean(h):
                total, count = loss_lib.chunked_cross_entropy(
                    h, e, t, w, chunk_size=chunk
                )
                return total / count

            return jax.grad(mean)(h)

        args = (
            jax.ShapeDtypeStruct((4, chunk, dim), jnp.float32),
            jax.ShapeDtypeStruct((vocab, dim), jnp.float32),
            jax.ShapeDtypeStruct((4, chunk), jnp.int32),
            jax.ShapeDtypeStruct((4, chunk), jnp.float32),
        )
        cost = jax.jit(step).lower(*args).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        return float(cost["flops"])

    matmul = 2.0 * chunk * vocab * dim
    frozen = flops()
    assert 2 * matmul <= frozen < 2.6 * matmul, frozen / matmul


def test_bfloat16_hidden_matches_full_in_bfloat16():
    # The matmuls run in bf16 in both; only the float32 parts are shared, so the
    # agreement is at bf16 precision, and the results keep their dtypes.
    hidden, embedding, targets, weights = _inputs(2, 37, 16, 300, dtype=jnp.bfloat16)
    embedding = embedding.astype(jnp.float32)  # a float32 master copy is fine

    def run(loss_fn):
        def loss(h, e):
            total, count = loss_fn(h, e, targets, weights)
            return total / count, total

        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(hidden, embedding)

    (c_mean, c_total), (c_dh, c_de) = run(
        lambda h, e, t, w: loss_lib.chunked_cross_entropy(h, e, t, w, chunk_size=16)
    )
    (f_mean, f_total), (f_dh, _) = run(loss_lib.full_cross_entropy)
    assert c_total.dtype == jnp.float32
    assert c_dh.dtype == jnp.bfloat16 and c_de.dtype == jnp.float32
    assert _rel_err(c_mean, f_mean) < 1e-5  # forward math is identical
    assert _rel_err(c_dh, f_dh) < 2e-2


def test_huge_logits_stay_finite():
    hidden, embedding, targets, weights = _inputs(1, 20, 8, 64, scale=30.0)
    for soft_cap in (30.0, None, 1000.0):
        total, _ = loss_lib.chunked_cross_entropy(
            hidden, embedding, targets, weights, soft_cap=soft_cap, chunk_size=8
        )
        expected, _ = loss_lib.full_cross_entropy(
            hidden, embedding, targets, weights, soft_cap=soft_cap
        )
        assert np.isfinite(float(total))
        assert _rel_err(total, expected) < RTOL


def test_mismatched_shapes_name_the_argument():
    hidden, embedding, targets, weights = _inputs(2, 5, 8, 50)
    with pytest.raises(ValueError, match=r"weights must have shape \(2, 5\)"):
        loss_lib.chunked_cross_entropy(hidden, embedding, targets, weights[:, :4])
    with pytest.raises(ValueError, match=r"embedding must be \[vocab, 8\]"):
        loss_lib.chunked_cross_entropy(hidden, embedding[:, :4], targets, weights)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        loss_lib.chunked_cross_entropy(
            hidden, embedding, targets, weights, chunk_size=0
        )


def _train_step_temp_bytes(loss_fn, batch, seq, vocab, dim):
    """Temp bytes of jit(value_and_grad(mean loss wrt hidden)); allocates nothing."""

    def step(hidden, embedding, targets, weights):
        def mean_loss(h):
            total, count = loss_fn(h, embedding, targets, weights)
            return total / count

        return jax.value_and_grad(mean_loss)(hidden)

    compiled = (
        jax.jit(step)
        .lower(
            jax.ShapeDtypeStruct((batch, seq, dim), jnp.float32),
            jax.ShapeDtypeStruct((vocab, dim), jnp.float32),
            jax.ShapeDtypeStruct((batch, seq), jnp.int32),
            jax.ShapeDtypeStruct((batch, seq), jnp.float32),
        )
        .compile()
    )
    return compiled.memory_analysis().temp_size_in_bytes


def test_train_step_temp_memory_is_under_a_tenth_of_full_logits():
    # Gemma 4's vocab at seq 4096 (compiles in well under a second on CPU).
    batch, seq, vocab, dim, chunk = 1, 4096, 262144, 64, 1024
    full = _train_step_temp_bytes(loss_lib.full_cross_entropy, batch, seq, vocab, dim)
    chunked = _train_step_temp_bytes(
        lambda h, e, t, w: loss_lib.chunked_cross_entropy(h, e, t, w, chunk_size=chunk),
        batch,
        seq,
        vocab,
        dim,
    )
    logits_bytes = batch * seq * vocab * 4
    assert full >= logits_bytes  # the reference really holds full logits
    assert chunked < 0.1 * full, (chunked, full)
    # At most a couple of [chunk, vocab] float32 blocks are alive at once.
    assert chunked <= 2 * chunk * vocab * 4, chunked


def _mean_and_grad(hidden, embedding, targets, weights, chunk_size=16):
    """(mean chunked loss, its d(hidden)), jitted."""

    def mean(h):
        total, count = loss_lib.chunked_cross_entropy(
            h, embedding, targets, weights, chunk_size=chunk_size
        )
        return total / count

    return jax.jit(jax.value_and_grad(mean))(hidden)


def test_narrower_stored_embedding_equals_its_float32_copy():
    """A bfloat16 embedding under float32 hidden states (a bfloat16
    checkpoint, float32 compute) gives the loss and d(hidden) of its
    float32 upcast (`loss._dot` splits the float32 side instead)."""
    hidden, embedding, targets, weights = _inputs(2, 24, 16, 256)
    stored = embedding.astype(jnp.bfloat16)

    def value_and_grad(e):
        return _mean_and_grad(hidden, e, targets, weights)

    (loss, d_h), (ref, ref_d_h) = (
        value_and_grad(stored),
        value_and_grad(stored.astype(jnp.float32)),
    )
    assert d_h.dtype == jnp.float32
    assert abs(float(loss) / float(ref) - 1) < 1e-6
    assert _rel_err(d_h, ref_d_h) < 1e-6


def test_narrower_stored_embedding_is_never_upcast_whole():
    """The step's temporaries hold no float32 copy of the table: casting the
    whole bfloat16 table added vocab x dim x 4 bytes (1.5 GiB at E2B, 2.5
    GiB at E4B)."""
    vocab, dim, chunk = 65536, 1024, 16
    table = vocab * dim * 4

    def temp(cast: bool) -> int:
        def step(h, e, t, w):
            def mean(h):
                emb = e.astype(jnp.float32) if cast else e
                total, count = loss_lib.chunked_cross_entropy(
                    h, emb, t, w, chunk_size=chunk
                )
                return total / count

            return jax.grad(mean)(h)

        args = (
            jax.ShapeDtypeStruct((2, chunk, dim), jnp.float32),
            jax.ShapeDtypeStruct((vocab, dim), jnp.bfloat16),
            jax.ShapeDtypeStruct((2, chunk), jnp.int32),
            jax.ShapeDtypeStruct((2, chunk), jnp.float32),
        )
        mem = jax.jit(step).lower(*args).compile().memory_analysis()
        return mem.temp_size_in_bytes

    assert temp(cast=True) >= table  # the old way: the whole table in float32
    assert temp(cast=False) < table / 10, temp(cast=False) / table


@pytest.mark.parametrize("tile,tiles", [(loss_lib.INT8_TILE, 1), (50, 6), (16, 20)])
def test_int8_table_equals_its_dequantised_copy(monkeypatch, tile, tiles):
    """An int8 table (`quant.Int8Rows`, whole or over vocabulary tiles of at
    most `tile` rows) gives the loss, d(hidden) and logits of its float32
    dequantisation (`values / scale`), to float32 precision."""
    monkeypatch.setattr(loss_lib, "INT8_TILE", tile)
    hidden, embedding, targets, weights = _inputs(2, 37, 16, 300)
    table = Int8Rows.quantize(np.asarray(embedding))
    dense = table.dequantize()
    assert loss_lib.int8_tiles(300) == tiles

    def value_and_grad(e):
        return _mean_and_grad(hidden, e, targets, weights)

    (loss, d_h), (ref, ref_d_h) = value_and_grad(table), value_and_grad(dense)
    assert abs(float(loss) / float(ref) - 1) < 1e-6
    assert _rel_err(d_h, ref_d_h) < 1e-6
    logits = loss_lib._dot("...d,vd->...v", hidden, table)
    assert logits.shape == (2, 37, 300)
    assert _rel_err(logits, jnp.einsum("btd,vd->btv", hidden, dense)) < 1e-6


def test_int8_table_is_never_converted_whole():
    """An int8 table's step holds one converted tile of rows, not the table
    in the compute dtype (vocab x dim x 4 bytes under float32, x 2 under
    bfloat16: `loss._int8_dot`). Converting the table first, as a plain
    dequantisation does, must show here."""
    vocab, dim, chunk = 65536, 1024, 16

    def temp(dtype, whole: bool) -> int:
        def step(h, values, scale, t, w):
            def mean(h):
                table = Int8Rows(values, scale)
                e = table.dequantize(dtype) if whole else table
                total, count = loss_lib.chunked_cross_entropy(
                    h, e, t, w, chunk_size=chunk
                )
                return total / count

            return jax.grad(mean)(h)

        args = (
            jax.ShapeDtypeStruct((2, chunk, dim), dtype),
            jax.ShapeDtypeStruct((vocab, dim), jnp.int8),
            jax.ShapeDtypeStruct((vocab,), jnp.float32),
            jax.ShapeDtypeStruct((2, chunk), jnp.int32),
            jax.ShapeDtypeStruct((2, chunk), jnp.float32),
        )
        mem = jax.jit(step).lower(*args).compile().memory_analysis()
        return mem.temp_size_in_bytes

    for dtype in (jnp.float32, jnp.bfloat16):
        table = vocab * dim * jnp.dtype(dtype).itemsize
        assert temp(dtype, whole=True) >= table  # the table, converted
        # One tile of INT8_TILE rows (table / 8) and a chunk's logits.
        assert temp(dtype, whole=False) < table / 5, (dtype, temp(dtype, False))


def test_docstring_examples():
    results = doctest.testmod(loss_lib, optionflags=doctest.ELLIPSIS)
    assert results.attempted >= 3
    assert results.failed == 0
