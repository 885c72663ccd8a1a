"""Masked cross-entropy over Gemma 4's 262,144-token vocabulary, in chunks.

Gemma 4 ties its output projection to the input embedding and soft-caps the
final logits: `logits = cap * tanh(hidden @ embedding.T / cap)` with cap 30.
At batch 1 and 4096 tokens the float32 logits alone take 4 GiB, and autodiff
of the naive loss keeps several arrays of that size alive. The loss here walks
the flattened tokens in chunks and has a hand-written gradient, so the
compiled train step only ever holds one chunk's `[chunk, vocab]` logits:

The embedding is frozen (LoRA, QLoRA): the forward pass of the gradient, per
chunk, forms the logits -> soft-cap -> float32 logsumexp and, while the
chunk's logits exist, `d_logits = (softmax - onehot) * weight * (1 - tanh^2)`
and `d_hidden = d_logits @ embedding` for a unit cotangent. It saves that
`[tokens, dim]` d_hidden and the per-token loss; the backward pass only
scales them by the incoming cotangent. Two matmuls per chunk.

Without differentiation (evaluation) only the logsumexp pass runs.

It returns the *sum* of weighted token losses and the sum of weights, so the
caller divides by a global token count; that keeps gradient accumulation over
micro-batches exact.

The embedding may be an int8 table (`quant.Int8Rows`, `quant.embedding=
int8`): its products run over tiles of vocabulary rows (`_int8_dot`), each
converted when it is used, so the step never holds the table converted.

This module depends on JAX (with `xla_workarounds` for the places where
XLA:CPU must be told which [chunk, vocab] blocks to share) and on
`quant.Int8Rows`, the int8 table's layout.
"""

import functools

import jax
import jax.numpy as jnp

from gemma4_keras.model import xla_workarounds
from gemma4_keras.model.quant import Int8Rows

__all__ = ["chunked_cross_entropy", "full_cross_entropy"]

# Below this cap the soft-capped logits lie in [-cap, cap], so shifting the
# exponent by `cap` instead of the row maximum can neither overflow nor push
# the row's largest term out of float32's normal range (exp(-2 * 40) ~ 2e-35).
# That saves a max-reduction pass over every [chunk, vocab] block.
_MAX_CAP_FOR_CONSTANT_SHIFT = 40.0


def _check_inputs(
    hidden: jax.Array, embedding: jax.Array, targets: jax.Array, weights: jax.Array
) -> None:
    """Raises ValueError naming the argument whose shape does not fit."""
    if hidden.ndim < 2:
        raise ValueError(
            f"hidden must be [batch, seq, dim] (or [tokens, dim]); got shape "
            f"{hidden.shape}."
        )
    if embedding.ndim != 2 or embedding.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"embedding must be [vocab, {hidden.shape[-1]}] to match hidden's last "
            f"dimension; got shape {embedding.shape}."
        )
    for name, array in (("targets", targets), ("weights", weights)):
        if array.shape != hidden.shape[:-1]:
            raise ValueError(
                f"{name} must have shape {hidden.shape[:-1]} (hidden's shape "
                f"without the last dimension); got {array.shape}."
            )
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integer token ids; got {targets.dtype}.")


def _logits(h: jax.Array, embedding: jax.Array) -> jax.Array:
    """Raw logits `h @ embedding.T`, multiplied in h's dtype, accumulated in f32."""
    return _dot("nd,vd->nv", h, embedding)


def _times_embedding(d_logits: jax.Array, embedding: jax.Array, dtype) -> jax.Array:
    """`d_logits @ embedding` in `dtype` with float32 accumulation, [n, dim]."""
    if isinstance(embedding, Int8Rows):  # scaled in float32, then cast
        return _int8_dot("nv,vd->nd", d_logits, embedding, dtype)
    return _dot("nv,vd->nd", d_logits.astype(dtype), embedding)


# bfloat16 parts whose sum is a float32 value to float32's precision (3 x 8
# bits of significand cover its 24).
SPLIT_PARTS = 3
# Tokens per chunk when the embedding is stored narrower: the split parts of
# a chunk's d_logits are 3 x [chunk, vocab] x 2 bytes.
SPLIT_CHUNK = 128


def _dot(spec: str, x: jax.Array, embedding: jax.Array) -> jax.Array:
    """`einsum(spec, x, embedding)` in x's dtype, accumulated in float32.

    An embedding stored narrower than `x` (a bfloat16 checkpoint under
    float32 compute) is never converted: the table is frozen and would be
    converted whole, adding vocab x dim x 4 bytes to the step (1.5 / 2.5 GiB
    at E2B / E4B; XLA hoists the conversion out of the loss's scan). Instead
    `x` is split into `SPLIT_PARTS` numbers of the embedding's dtype, each
    multiplied natively: the same float32 products to float32 rounding
    (bfloat16 x bfloat16 is exact in float32). Chunks are then at most
    `SPLIT_CHUNK` tokens. At E2B's vocabulary and width the loss's step
    temporaries fall from 1.75 to 0.38 GiB (2.50 to 0.38 at 1,024 tokens);
    on XLA:CPU the loss takes about 1.4-1.7x as long (128-token chunks are
    about 15% slower than 256, for half the temporaries).
    """
    if isinstance(embedding, Int8Rows):
        return _int8_dot(spec, x, embedding, x.dtype)
    if embedding.dtype == x.dtype:
        return jnp.einsum(spec, x, embedding, preferred_element_type=jnp.float32)
    total, rest = None, x.astype(jnp.float32)
    for _ in range(SPLIT_PARTS):
        part = rest.astype(embedding.dtype)
        product = jnp.einsum(spec, part, embedding, preferred_element_type=jnp.float32)
        total = product if total is None else total + product
        rest = rest - part.astype(jnp.float32)
    return total


# Vocabulary rows an int8 table converts at a time (`_int8_dot`): at
# 26B-A4B's width 44 MiB in bfloat16.
INT8_TILE = 8192


def int8_tiles(vocab: int) -> int:
    """How many tiles `_int8_dot` cuts a table of `vocab` rows into: the
    smallest divisor of `vocab` that leaves at most `INT8_TILE` rows a tile."""
    return next(k for k in range(-(-vocab // INT8_TILE), vocab + 1) if vocab % k == 0)


def _int8_dot(spec: str, x: jax.Array, table: Int8Rows, dtype) -> jax.Array:
    """`einsum(spec, x, table.dequantize())` without the dequantised table.

    `spec` is "...d,vd->...v" (logits) or "nv,vd->nd" (d_logits times the
    table). Tile i holds rows i, i + k, i + 2k, ... of the k tiles: a table
    split by vocabulary row over a mesh keeps each tile's rows on their
    device, and the tile's logits are column i of a [n, rows / k, k] block,
    the logits in vocabulary order. Each tile is converted to `dtype` (int8
    exactly) inside the loop and multiplied in `dtype` with float32
    accumulation; the row scales divide the logits, or d_logits before its
    cast, in float32.
    """
    vocab, dim = table.shape
    k = int8_tiles(vocab)
    rows = vocab // k
    values = table.values.reshape(rows, k, dim)
    scale = table.scale.reshape(rows, k)

    def tile(i):
        q = jax.lax.dynamic_index_in_dim(values, i, axis=1, keepdims=False)
        s = jax.lax.dynamic_index_in_dim(scale, i, axis=1, keepdims=False)
        return q.astype(dtype), s

    if spec == "nv,vd->nd":
        d_logits = x.reshape(x.shape[0], rows, k)

        def add_tile(i, total):
            q, s = tile(i)
            d = jax.lax.dynamic_index_in_dim(d_logits, i, axis=2, keepdims=False)
            d = (d.astype(jnp.float32) / s).astype(dtype)
            return total + jnp.einsum(
                "nr,rd->nd", d, q, preferred_element_type=jnp.float32
            )

        total = xla_workarounds.tie_to(jnp.zeros((x.shape[0], dim), jnp.float32), x)
        return jax.lax.fori_loop(0, k, add_tile, total)
    if spec != "...d,vd->...v" and spec != "nd,vd->nv":
        raise ValueError(f"no int8 product for {spec!r}")
    lead = x.shape[:-1]
    h = x.reshape(-1, dim)

    def put_tile(i, out):
        q, s = tile(i)
        z = jnp.einsum("nd,rd->nr", h, q, preferred_element_type=jnp.float32) / s
        return jax.lax.dynamic_update_index_in_dim(out, z, i, axis=2)

    # Tied to x: a zero buffer made from constants alone would be hoisted
    # out of the loss's scan and copied into each chunk.
    out = xla_workarounds.tie_to(jnp.zeros((h.shape[0], rows, k), jnp.float32), h)
    out = jax.lax.fori_loop(0, k, put_tile, out)
    return out.reshape(*lead, vocab)


def _soft_cap(raw: jax.Array, soft_cap: float | None) -> tuple[jax.Array, jax.Array]:
    """Returns (capped logits, tanh) in float32; tanh is None without a cap."""
    if soft_cap is None:
        return raw, None
    tanh = jnp.tanh(raw / soft_cap)
    return soft_cap * tanh, tanh


def _logsumexp(logits: jax.Array, soft_cap: float | None) -> jax.Array:
    """Stable float32 logsumexp over the last axis of one chunk."""
    if soft_cap is not None and soft_cap <= _MAX_CAP_FOR_CONSTANT_SHIFT:
        return soft_cap + jnp.log(jnp.sum(jnp.exp(logits - soft_cap), axis=-1))
    return jax.nn.logsumexp(logits, axis=-1)


def _chunk_forward(
    h: jax.Array, embedding: jax.Array, targets: jax.Array, soft_cap: float | None
) -> tuple[jax.Array, jax.Array]:
    """Per-token (logsumexp, nll) of one [chunk, dim] block, both float32."""
    raw = _logits(h, embedding)
    logits, _ = _soft_cap(raw, soft_cap)
    lse = _logsumexp(logits, soft_cap)
    # Gather the raw target logit and cap just that value: the same elementwise
    # op on the same float gives exactly the entry the softmax saw.
    target_raw = jnp.take_along_axis(raw, targets[:, None], axis=-1)[:, 0]
    target_logit, _ = _soft_cap(target_raw, soft_cap)
    return lse, lse - target_logit


def _scan_forward(
    h_chunks: jax.Array,
    embedding: jax.Array,
    t_chunks: jax.Array,
    soft_cap: float | None,
) -> tuple[jax.Array, jax.Array]:
    """Per-token (logsumexp, nll), shaped [num_chunks, chunk]."""

    def body(_, xs):
        h, t = xs
        return None, _chunk_forward(h, embedding, t, soft_cap)

    _, (lse, nll) = jax.lax.scan(body, None, (h_chunks, t_chunks))
    return lse, nll


def _d_logits(
    raw: jax.Array,
    t: jax.Array,
    scale: jax.Array,
    soft_cap: float | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(d_logits, lse, nll) of one chunk from its raw logits, all float32.

    `d_logits = (softmax - onehot) * scale * (1 - tanh^2)` is the gradient of
    `sum(scale * nll)` w.r.t. the raw logits.
    """
    vocab = raw.shape[-1]
    cap = soft_cap
    if soft_cap is not None and soft_cap <= _MAX_CAP_FOR_CONSTANT_SHIFT:
        return _d_logits_from_exp(raw, t, scale, soft_cap)
    lse = _logsumexp(_soft_cap(raw, soft_cap)[0], soft_cap)
    if soft_cap is not None:
        raw, lse, cap = xla_workarounds.recompute_apart(
            (raw, lse, jnp.float32(soft_cap))
        )
    logits, tanh = _soft_cap(raw, cap)
    probs = jnp.exp(logits - lse[:, None])
    target_raw = jnp.take_along_axis(raw, t[:, None], axis=-1)[:, 0]
    target_logit, _ = _soft_cap(target_raw, cap)
    onehot = t[:, None] == jnp.arange(vocab, dtype=t.dtype)[None, :]
    d_logits = (probs - onehot) * scale[:, None]
    if tanh is not None:
        # d/dx [cap * tanh(x / cap)] = 1 - tanh(x / cap)^2.
        d_logits = d_logits * (1.0 - tanh * tanh)
    return d_logits, lse, lse - target_logit


def _d_logits_from_exp(
    raw: jax.Array, t: jax.Array, scale: jax.Array, cap: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`_d_logits` of soft-capped logits, from one pass of `exp(z - cap)`.

    z = cap * tanh(raw / cap) lies in [-cap, cap], so `ex = exp(z - cap)`
    lies in [exp(-2 cap), 1]: no overflow, and for cap <= 40 no underflow
    in float32. Everything else comes from `ex`: the row sums S (a matmul
    with ones: XLA:CPU runs a reduction that fuses tanh and exp about 7x
    slower than an elementwise pass, a third of the loss's time at vocab
    262,144), softmax = ex / S, lse = cap + log(S), and tanh = 1 + log(ex) /
    cap for the soft-cap's derivative. `ex` replaces the raw logits, so the
    chunk holds one [chunk, vocab] block, and d_logits overwrites it.
    """
    vocab = raw.shape[-1]
    ex = jnp.exp(cap * jnp.tanh(raw / cap) - cap)
    ex = xla_workarounds.materialise(ex)
    sums = ex @ jnp.ones((vocab,), jnp.float32)
    lse = cap + jnp.log(sums)
    target_ex = jnp.take_along_axis(ex, t[:, None], axis=-1)[:, 0]
    nll = lse - (cap + jnp.log(target_ex))
    tanh = 1.0 + jnp.log(ex) / cap
    onehot = t[:, None] == jnp.arange(vocab, dtype=t.dtype)[None, :]
    d_logits = (ex / sums[:, None] - onehot) * scale[:, None]
    return d_logits * (1.0 - tanh * tanh), lse, nll


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_loss_sum(
    h_chunks: jax.Array,
    embedding: jax.Array,
    t_chunks: jax.Array,
    w_chunks: jax.Array,
    soft_cap: float | None,
) -> jax.Array:
    """Sum of weights * nll over [num_chunks, chunk] tokens (float32 scalar)."""
    _, nll = _scan_forward(h_chunks, embedding, t_chunks, soft_cap)
    return jnp.sum(w_chunks * nll)


def _chunked_loss_sum_fwd(h_chunks, embedding, t_chunks, w_chunks, soft_cap):
    # d(hidden) is linear in the incoming cotangent g. So it is formed here,
    # while each chunk's logits exist anyway, for g = 1; the backward pass
    # just scales it. That saves recomputing the [chunk, vocab] logits (a
    # third of the loss's matmuls).
    def body(_, xs):
        h, t, w = xs
        raw = _logits(h, embedding)
        d_logits, _, nll = _d_logits(raw, t, w, soft_cap)
        return None, (nll, _times_embedding(d_logits, embedding, h.dtype))

    _, (nll, d_h_unit) = jax.lax.scan(body, None, (h_chunks, t_chunks, w_chunks))
    loss = jnp.sum(w_chunks * nll)
    # Residuals: one [tokens, dim] float32 array (the unit-cotangent d_hidden)
    # and one float per token, plus inputs alive in the caller anyway; nothing
    # of size vocab per token. An empty array carries hidden's dtype (the
    # embedding may be stored narrower).
    h_dtype = jnp.zeros((0,), h_chunks.dtype)
    return loss, (d_h_unit, embedding, nll, w_chunks, h_dtype)


def _chunked_loss_sum_bwd(soft_cap, residuals, g):
    d_h_unit, embedding, nll, w_chunks, h_dtype = residuals
    d_h = (g * d_h_unit).astype(h_dtype.dtype)
    # The tied embedding is frozen; a zero cotangent that no one reads is
    # removed by XLA, so this costs nothing in the train step. (None: an
    # int8 table has no float cotangent.)
    d_embedding = None if isinstance(embedding, Int8Rows) else jnp.zeros_like(embedding)
    # d(loss)/d(weight) is the token's nll, saved anyway: exact for free.
    return d_h, d_embedding, None, (g * nll).astype(w_chunks.dtype)


_chunked_loss_sum.defvjp(_chunked_loss_sum_fwd, _chunked_loss_sum_bwd)


def _to_chunks(
    hidden: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    chunk_size: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Flattens tokens and pads them with weight 0 to whole chunks.

    Returns ([n, c, dim] hidden, [n, c] targets, [n, c] float32 weights).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size}.")
    dim = hidden.shape[-1]
    h = hidden.reshape(-1, dim)
    t = targets.reshape(-1).astype(jnp.int32)
    w = weights.reshape(-1).astype(jnp.float32)
    tokens = h.shape[0]
    # A short batch is one chunk of its own length, not padded to chunk_size.
    chunk = max(1, min(chunk_size, tokens))
    padded = -(-tokens // chunk) * chunk
    if padded != tokens:
        pad = padded - tokens
        h = jnp.pad(h, ((0, pad), (0, 0)))
        t = jnp.pad(t, (0, pad))
        w = jnp.pad(w, (0, pad))
    n = padded // chunk
    return h.reshape(n, chunk, dim), t.reshape(n, chunk), w.reshape(n, chunk)


def chunked_cross_entropy(
    hidden: jax.Array,
    embedding: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    soft_cap: float | None = 30.0,
    chunk_size: int = 1024,
) -> tuple[jax.Array, jax.Array]:
    """Weighted token cross-entropy from hidden states, without full logits.

    The logits are `soft_cap * tanh(hidden @ embedding.T / soft_cap)`. They
    are computed `chunk_size` tokens at a time, so `[batch, seq, vocab]`
    logits never exist. The embedding is frozen (its zero gradient is removed
    by XLA); the gradient w.r.t. `hidden` is formed in the same pass as the
    loss, while each chunk's logits exist. The matmuls run in `hidden.dtype` with float32 accumulation; the
    soft-cap, softmax and logsumexp run in float32.

    Args:
      hidden: `[batch, seq, dim]` final hidden states (after the final norm),
        any float dtype.
      embedding: `[vocab, dim]` tied token embedding, multiplied in
        `hidden.dtype` (one stored narrower is never converted: `_dot`), or
        an int8 `quant.Int8Rows` table (converted a tile at a time).
      targets: `[batch, seq]` integer next-token ids.
      weights: `[batch, seq]` per-token loss weights; 0 ignores a token.
      soft_cap: final logit soft-cap (Gemma 4: 30.0); None for plain logits.
      chunk_size: tokens per chunk (static). Peak temp memory grows with
        `chunk_size * vocab`; the flattened token count is padded up to a
        multiple of it with weight-0 tokens.

    Returns:
      `(loss_sum, weight_sum)`, float32 scalars: the sum over tokens of
      `weights * nll` and the sum of `weights`. Divide by a global token
      count (e.g. `weight_sum` summed over micro-batches) for the mean loss.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> hidden = jnp.ones((2, 5, 8)) * 0.1
      >>> embedding = jnp.ones((32, 8)) * 0.2
      >>> targets = jnp.zeros((2, 5), jnp.int32)
      >>> weights = jnp.ones((2, 5)).at[:, :2].set(0.0)  # mask the prompt
      >>> def loss_fn(h):
      ...     total, count = chunked_cross_entropy(
      ...         h, embedding, targets, weights, chunk_size=4)
      ...     return total / count
      >>> loss, grad = jax.value_and_grad(loss_fn)(hidden)
      >>> round(float(loss), 4)  # all 32 logits equal: log(32)
      3.4657
    """
    _check_inputs(hidden, embedding, targets, weights)
    if not isinstance(embedding, Int8Rows) and embedding.dtype != hidden.dtype:
        chunk_size = min(chunk_size, SPLIT_CHUNK)
    h, t, w = _to_chunks(hidden, targets, weights, chunk_size)
    loss_sum = _chunked_loss_sum(h, embedding, t, w, soft_cap)
    return loss_sum, jnp.sum(weights.astype(jnp.float32))


def full_cross_entropy(
    hidden: jax.Array,
    embedding: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    soft_cap: float | None = 30.0,
) -> tuple[jax.Array, jax.Array]:
    """The naive reference: materialises all logits, autodiff does the rest.

    Same arguments and results as `chunked_cross_entropy`; use it in tests and
    benchmarks, not in training (it holds `[batch, seq, vocab]` float32 logits
    and their gradients).

    Example:
      >>> import jax.numpy as jnp
      >>> total, count = full_cross_entropy(
      ...     jnp.zeros((1, 3, 4)), jnp.ones((10, 4)),
      ...     jnp.array([[1, 2, 3]]), jnp.ones((1, 3)))
      >>> round(float(total / count), 4)  # uniform over 10 tokens: log(10)
      2.3026
    """
    _check_inputs(hidden, embedding, targets, weights)
    raw = jnp.einsum(
        "...d,vd->...v",
        hidden,
        embedding.astype(hidden.dtype),
        preferred_element_type=jnp.float32,
    )
    logits = raw if soft_cap is None else soft_cap * jnp.tanh(raw / soft_cap)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    target_log_probs = jnp.take_along_axis(
        log_probs, targets[..., None].astype(jnp.int32), axis=-1
    )[..., 0]
    weights = weights.astype(jnp.float32)
    return -jnp.sum(weights * target_log_probs), jnp.sum(weights)
