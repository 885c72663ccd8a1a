"""Attention over packed rows: dense, chunked (memory by chunk), or fused.

Every implementation computes the same thing: grouped-query attention with
scale 1 (Gemma 4 normalises q and k), an optional logit soft-cap, causal,
within each row's packed segment (`segment_ids`, 0 = padding), and within
`window` tokens on sliding layers. They differ in what they hold:

    dense     the whole [B, heads, T, T] float32 square (logits, probs, the
              masks): the reference, and the fastest at short T on a CPU.
    chunked   queries in chunks of `chunk_size`, each chunk's logits formed,
              used and dropped (recomputed in the backward pass): memory
              heads x chunk x keys per step. A sliding layer's chunk reads
              only the `chunk + window - 1` keys it can see, so its cost
              grows with T x window, not T^2; a global layer reads all T.
    fused     `jax.nn.dot_product_attention`: cuDNN's flash attention on a
              GPU (bfloat16 / float16, head_dim <= 256 on Hopper, 128 before;
              causal and window skipped block-wise, packed segments as a
              mask), XLA's reference implementation elsewhere.
    auto      fused on a GPU where cuDNN takes the layer (no soft-cap, 16-bit
              q/k/v, head width cuDNN supports; Gemma 4's 512-wide global
              heads do not qualify), else chunked when T > chunk_size, else
              dense.

Decoding attends over a KV cache instead (`write_cache`, `cache_mask`,
`dot_attention`; `Gemma4LoraModel.call(..., cache=...)`).

`tests/test_attention.py` checks chunked and fused against dense, outputs
and gradients, on packed rows with padding, sliding and global layers.
`benchmarks/attention_memory.py` measures one 31B-width layer at 8k tokens.

Example:

    out = attend(q, k, v, segment_ids, window=512, soft_cap=None,
                 implementation="chunked", chunk_size=512)   # [B, T, N*H]
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from gemma4_keras.model import xla_workarounds

IMPLEMENTATIONS = ("auto", "dense", "chunked", "fused")
_NEG = jnp.finfo(jnp.float32).min


def attention_mask(
    segment_ids: jax.Array, window: int | None, blocks: jax.Array | None = None
) -> jax.Array:
    """[B, T, T] boolean mask: causal, same segment, not padding, in window.

    `blocks` [B, T] (-1 = none) also lets tokens of one block see each
    other both ways (an image's soft tokens, `vision_blocks`); the window
    still bounds how far back a key may be.
    """
    idx = jnp.arange(segment_ids.shape[1])
    return _mask(segment_ids, segment_ids, idx, idx, window, blocks)


def _mask(q_seg, k_seg, q_idx, k_idx, window: int | None, blocks=None) -> jax.Array:
    """[B, Tq, Tk] mask of queries at token indices q_idx over keys at k_idx."""
    allowed = (k_idx[None, :] <= q_idx[:, None])[None]
    if blocks is not None:  # transformers' OR(causal, blockwise), then the window
        same_block = (blocks[:, :, None] == blocks[:, None, :]) & (
            blocks[:, :, None] >= 0
        )
        allowed = allowed | same_block
    if window is not None:
        allowed = allowed & (q_idx[:, None] - k_idx[None, :] < window)[None]
    same = q_seg[:, :, None] == k_seg[:, None, :]
    return allowed & same & (k_seg[:, None, :] > 0)


def vision_blocks(is_image: jax.Array) -> jax.Array:
    """[B, T] id of the image each soft token belongs to (runs of `is_image`), else -1.

    As transformers' `get_block_sequence_ids_for_mask`.

    >>> vision_blocks(jnp.array([[0, 1, 1, 0, 1]], bool))
    Array([[-1,  0,  0, -1,  1]], dtype=int32)
    """
    previous = jnp.pad(is_image[:, :-1], ((0, 0), (1, 0)))
    starts = is_image & ~previous
    ids = jnp.cumsum(starts.astype(jnp.int32), axis=1) - 1
    return jnp.where(is_image, ids, -1)


def cache_mask(positions, key_valid, window: int | None, blocks=None) -> jax.Array:
    """[B, t, T] mask of queries at `positions` [B, t] over a T-position cache.

    Causal, within `window` positions on sliding layers, and only keys that
    `key_valid` [B, T] marks (prompt padding is not attended to). `blocks`
    [B, T] (the prefill of the whole buffer, t = T: an image's soft tokens,
    `vision_blocks`) also lets the tokens of one block see each other both
    ways, as `attention_mask`.

    >>> cache_mask(jnp.array([[2]]), jnp.ones((1, 4), bool), 2).astype(int)
    Array([[[0, 1, 1, 0]]], dtype=int32)
    """
    kpos = jnp.arange(key_valid.shape[1], dtype=positions.dtype)[None, None, :]
    q = positions[:, :, None]
    mask = kpos <= q
    if blocks is not None:
        mask = mask | (
            (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
        )
    if window is not None:
        mask = mask & (q - kpos < window)
    return mask & key_valid[:, None, :]


def write_cache(buf, new, index, update_mask=None):
    """Writes `new` [B, t, ...] at `index` of the cache entry `buf` [B, T, ...].

    Where `update_mask` [B, t] is False the buffer keeps what it holds (a
    prompt token that the prefill wrote already).
    """
    new = new.astype(buf.dtype)
    if update_mask is not None:
        old = jax.lax.dynamic_slice_in_dim(buf, index, new.shape[1], axis=1)
        new = jnp.where(update_mask[:, :, None, None], new, old)
    return jax.lax.dynamic_update_slice_in_dim(buf, new, index, axis=1)


def dot_attention(q, k, v, mask, soft_cap):
    """Grouped-query attention of q [B, T, N, H] over k, v [B, S, K, H].

    `mask` [B, T, S]; a query without any key (padding) gets zeros.
    Returns [B, T, N * H].
    """
    b, t, n, h = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, n // kv, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, k).astype(jnp.float32)
    if soft_cap is not None:
        logits = jnp.tanh(logits / soft_cap) * soft_cap
    m = mask[:, None, None, :, :]
    logits = jnp.where(m, logits, _NEG)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(m, probs, 0.0).astype(v.dtype)  # rows with no key -> 0
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n * h)


def chunked_attention(q, k, v, segment_ids, window, soft_cap, chunk_size):
    """`dot_attention` computed `chunk_size` queries at a time.

    Each chunk is rematerialised (`xla_workarounds.remat_chunks`): the
    backward pass recomputes one chunk's logits at a time, so neither pass
    holds more than one chunk's [B, heads, chunk, keys] block. On a sliding
    layer the chunk starting at query i*c reads keys [i*c - window + 1,
    i*c + c) only, taken from keys padded with `window - 1` padding tokens
    in front (segment 0: masked out). The padding and the chunks' output
    are built from the inputs, never zero buffers of their own: those read
    only a constant, and XLA created every layer's at the start of the step
    (26B-A4B, seq 4096: 52 MiB a sliding layer, all alive at once).
    """
    b, t, n, h = q.shape
    c = min(chunk_size, t)
    n_chunks = -(-t // c)
    tail = n_chunks * c - t
    q_seg = jnp.pad(segment_ids, ((0, 0), (0, tail)))
    sliding = window is not None and c + window - 1 < t
    lead = window - 1 if sliding else 0
    span = c + lead if sliding else t
    if sliding:
        k, v = _pad_rows(k, lead, tail), _pad_rows(v, lead, tail)
        k_seg = jnp.pad(segment_ids, ((0, 0), (lead, tail)))
    else:
        k_seg = segment_ids
    # [chunks, B, c, ...]: one chunk of queries per step.
    q_chunks = jnp.moveaxis(_pad_rows(q, 0, tail).reshape(b, n_chunks, c, n, h), 1, 0)
    seg_chunks = jnp.moveaxis(q_seg.reshape(b, n_chunks, c), 1, 0)

    def one_chunk(qc, ints, kv, k_seg):
        qs, start = ints
        k, v = kv
        q_idx = start + jnp.arange(c)
        if sliding:  # padded key index start + j is token start - lead + j
            kc = jax.lax.dynamic_slice_in_dim(k, start, span, axis=1)
            vc = jax.lax.dynamic_slice_in_dim(v, start, span, axis=1)
            ks = jax.lax.dynamic_slice_in_dim(k_seg, start, span, axis=1)
            k_idx = start - lead + jnp.arange(span)
        else:
            kc, vc, ks, k_idx = k, v, k_seg, jnp.arange(t)
        mask = _mask(qs, ks, q_idx, k_idx, window)
        return dot_attention(qc, kc, vc, mask, soft_cap)

    starts = jnp.arange(n_chunks, dtype=jnp.int32) * c
    out = xla_workarounds.remat_chunks(
        one_chunk, q_chunks, (seg_chunks, starts), (k, v), k_seg
    )  # [chunks, B, c, N*H]
    out = jnp.moveaxis(out, 0, 1).reshape(b, n_chunks * c, n * h)
    return out[:, :t]


def _pad_rows(x: jax.Array, lead: int, tail: int) -> jax.Array:
    """`x` with `lead` / `tail` zero rows around axis 1, the zeros tied to `x`
    (`xla_workarounds.tie_to`; `jnp.pad` fills a zero buffer first)."""
    if not lead and not tail:
        return x

    def zeros(rows):
        z = jnp.zeros(x.shape[:1] + (rows,) + x.shape[2:], x.dtype)
        return xla_workarounds.tie_to(z, x)

    return jnp.concatenate([zeros(lead), x, zeros(tail)], axis=1)


def fused_attention(q, k, v, segment_ids, window, implementation=None):
    """`jax.nn.dot_product_attention` with Gemma 4's masks (no soft-cap).

    Causal and the window go in as `is_causal` / `local_window_size` (cuDNN
    skips the blocks they exclude); packed segments and padding as a mask.
    Padding queries, which XLA's implementation would spread over every
    key, are zeroed as `dot_attention` does.
    """
    b, t, n, h = q.shape
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=attention_mask(segment_ids, window)[:, None],
        scale=1.0,
        is_causal=True,
        local_window_size=None if window is None else (window - 1, 0),
        implementation=implementation,
    )
    out = jnp.where(segment_ids[:, :, None, None] > 0, out, jnp.zeros((), out.dtype))
    return out.reshape(b, t, n * h)


def _cudnn_may_take(q, soft_cap) -> bool:
    """Whether cuDNN's flash attention supports this layer on this machine."""
    if jax.default_backend() != "gpu" or soft_cap is not None:
        return False
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return False
    capability = str(getattr(jax.devices()[0], "compute_capability", "0"))
    major = int(capability.split(".")[0] or 0)
    head_max = 256 if major >= 9 else 128
    return major >= 8 and q.shape[-1] <= head_max and q.shape[-1] % 8 == 0


def check_implementation(implementation: str) -> None:
    """Raises ValueError naming `model.attention` unless it is known."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"model.attention={implementation!r}: use one of {IMPLEMENTATIONS}"
        )


def resolve(implementation: str, q, soft_cap, chunk_size: int) -> str:
    """The implementation `auto` (or a fixed choice) runs for this layer.

    Raises:
      ValueError: an unknown implementation, or `fused` with a soft-cap.
    """
    check_implementation(implementation)
    if implementation == "fused" and soft_cap is not None:
        raise ValueError(
            "model.attention=fused: jax.nn.dot_product_attention has no logit "
            "soft-cap; this checkpoint sets one: use auto, chunked or dense"
        )
    if implementation != "auto":
        return implementation
    if _cudnn_may_take(q, soft_cap):
        return "fused"
    return "chunked" if q.shape[1] > chunk_size else "dense"


def attend(
    q,
    k,
    v,
    segment_ids,
    window: int | None,
    soft_cap: float | None,
    implementation: str = "auto",
    chunk_size: int = 512,
    blocks=None,
):
    """Attention of q [B, T, N, H] over k, v [B, T, K, H] -> [B, T, N * H].

    With `blocks` (bidirectional image tokens, `attention_mask`) the dense
    path runs: the chunked and fused ones assume no key after its query.
    """
    if blocks is not None:
        mask = attention_mask(segment_ids, window, blocks)
        return dot_attention(q, k, v, mask, soft_cap)
    chosen = resolve(implementation, q, soft_cap, chunk_size)
    if chosen == "fused":
        on_gpu = jax.default_backend() == "gpu"
        try:
            return fused_attention(
                q, k, v, segment_ids, window, "cudnn" if on_gpu else "xla"
            )
        except (NotImplementedError, ValueError) as err:
            if implementation != "auto":
                raise
            logging.warning("cuDNN attention unavailable (%s); using chunked", err)
            chosen = "chunked" if q.shape[1] > chunk_size else "dense"
    if chosen == "chunked":
        return chunked_attention(q, k, v, segment_ids, window, soft_cap, chunk_size)
    return dot_attention(q, k, v, attention_mask(segment_ids, window), soft_cap)
