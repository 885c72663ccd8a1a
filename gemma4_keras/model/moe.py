"""The mixture-of-experts feed-forward of 26B-A4B: router and expert dispatch.

A token's router picks `top_k` of `num_experts` experts (8 of 128); each
expert is a gated MLP `down(gelu(x @ gate) * (x @ up))` of width
`expert_dim`, its output weighted by the token's renormalised router
probability and the expert's `per_expert_scale`. Two ways to compute it
(`model.moe_dispatch`):

* **routed** (default): the (token, slot) pairs are sorted by expert and each
  expert multiplies only its own tokens, about `top_k / num_experts` of the
  dense path's expert FLOPs (1/16 at 26B-A4B). Two kernels:
  `ragged` is `jax.lax.ragged_dot` (a grouped matmul on GPU / TPU; XLA's
  CPU backend expands it into a product with every expert);
  `blocks` pads each expert's group to a multiple of a block of rows and
  runs one matmul per block with that block's expert weights, gathered
  (and, for an NF4 bank, dequantised) one block at a time: rows
  `<= pairs + num_experts * (block - 1)`, FLOPs about
  `(tokens * top_k + num_experts * block) * d * f` per projection.
  Both are exact: no token is dropped, no capacity.
* **dense**: KerasHub's dispatch, every expert on every token (one
  `[experts, tokens, expert_dim]` activation per projection, the whole bank
  dequantised); the reference the routed path is tested against
  (`tests/test_moe_routed.py`).

`auto` (the default) is `ragged` on GPU / TPU for a float bank and
`blocks` elsewhere: on CPU, and for an NF4 bank everywhere, whose experts
are dequantised only where a block uses them (`ragged_dot` needs the whole
bank in float). On a mesh whose devices each hold every expert (data
parallel: `distribution.mode=data`, or a model axis of 1) each device routes
its own tokens (`jax.shard_map` over the batch axis, `per_shard`); where
the banks are split by expert over a model axis, `auto` is `dense` (see
`kernel`).

Example:

    top_p, top_i = route(rms_norm(x), router_scale, router_proj, top_k=8)
    y = experts(m, top_p, top_i, banks, expert_scale, dispatch="auto")
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import keras

from gemma4_keras.model import quant as quant_lib
from gemma4_keras.model.xla_workarounds import (
    no_cotangent,
    remat_chunks,
    tie_to,
    weight_for,
)

# model.moe_dispatch values; `kernel` resolves auto to one of the rest.
DISPATCHES = ("auto", "ragged", "blocks", "dense")
BANKS = ("experts_gate", "experts_up", "experts_down")
# The largest block of the `blocks` kernel [rows]. Each block is one matmul;
# its padding costs at most block - 1 rows per expert that gets a token.
MAX_BLOCK = 128
# XLA's `cost_analysis()` counts a loop's body once; a benchmark that wants
# every block's FLOPs counted sets this to True (straight-line code: the
# same values, a longer compile). Never set in training.
UNROLL_BLOCKS = False

Bank = Any  # a float (E, in, out) array or a per-expert `quant.NF4Weight`
# An expert LoRA on one bank: (a (E, in, r), b (E, r, out), scale); the bank's
# rows get `scale * (x @ a[e]) @ b[e]` (PEFT's `target_parameters` LoRA).
ExpertLora = tuple[jax.Array, jax.Array, float]


def check_dispatch(dispatch: str) -> None:
    if dispatch not in DISPATCHES:
        raise ValueError(
            f"model.moe_dispatch={dispatch!r}: must be one of {', '.join(DISPATCHES)}"
        )


def kernel(
    dispatch: str, nf4: bool, backend: str | None = None, distributed: bool = False
) -> str:
    """The kernel `dispatch` runs on `backend` (default: JAX's) for a float
    (`nf4=False`) or NF4 bank: ragged | blocks | dense.

    `distributed`: the banks are split by expert over a model axis (a
    Keras distribution with a model axis of more than one device): auto
    keeps the dense dispatch there. The routed kernels index expert-sharded
    banks with a traced expert id, which GSPMD may turn into cross-device
    gathers of the banks; not measured yet (the tiny 2 x 4 mesh of
    `tests/test_sharding.py` ran the routed step at 2.89 MiB of temporaries
    per device, dense 3.10, too small to tell). Where every device holds
    every expert (data parallel), each routes its own tokens (`per_shard`).

    >>> kernel("auto", False, "gpu"), kernel("auto", True, "gpu")
    ('ragged', 'blocks')
    """
    check_dispatch(dispatch)
    if dispatch != "auto":
        return dispatch
    if distributed:
        return "dense"
    backend = backend or jax.default_backend()
    return "ragged" if backend in ("gpu", "tpu") and not nf4 else "blocks"


def expert_rows(tokens: int, top_k: int, num_experts: int, how: str) -> int:
    """Rows each expert projection multiplies for `tokens` tokens (static).

    dense: every expert on every token; ragged: one row per (token, slot);
    blocks: those plus each group's padding to whole blocks (the bound the
    compiled step is shaped for, `block_layout`).

    >>> expert_rows(4096, 8, 128, "dense"), expert_rows(4096, 8, 128, "blocks")
    (524288, 40832)
    """
    pairs = tokens * top_k
    if how == "dense":
        return tokens * num_experts
    if how == "ragged":
        return pairs
    block = block_size(pairs, num_experts)
    return -(-(pairs + num_experts * (block - 1)) // block) * block


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def route(
    normed: jax.Array, router_scale: jax.Array, router_proj: jax.Array, top_k: int
) -> tuple[jax.Array, jax.Array]:
    """Top-k expert probabilities (renormalised) and indices, [T, k] each.

    `normed` is the block's input RMS-normed without a scale, [T, d]. Ties
    go to the lower expert index (`jax.lax.top_k`), the same for every
    dispatch.
    """
    logits = router_logits(normed, router_scale, router_proj)
    return pick(logits, top_k, normed.dtype)


def pick(logits: jax.Array, top_k: int, dtype) -> tuple[jax.Array, jax.Array]:
    """`route` from the router's logits: top-k probabilities in `dtype`
    (renormalised) and indices, [T, k] each."""
    probs = jax.nn.softmax(logits, -1)
    top_p, top_i = jax.lax.top_k(probs.astype(dtype), top_k)
    denom = jnp.maximum(top_p.sum(-1, keepdims=True), 1e-9).astype(top_p.dtype)
    return top_p / denom, top_i


def router_logits(
    normed: jax.Array, router_scale: jax.Array, router_proj: jax.Array
) -> jax.Array:
    """The router's float32 logits [T, E] (`route` takes softmax and top-k)."""
    dt = normed.dtype
    scale = weight_for(router_scale, normed, dt)
    r = normed * jnp.asarray(normed.shape[-1] ** -0.5, dt) * scale
    return (r @ router_proj.astype(dt)).astype(jnp.float32)


def router_stats(
    logits: jax.Array, top_k: int, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One layer's routing statistics: (tokens per expert [E] (top-k picks,
    float32), router probability summed per expert [E], rows), padding rows
    (`mask` 0) left out. Summed over layers they give `load_balancing_loss`;
    `tokens / rows` is each expert's load (max / min: how even routing is).
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), -1)
    _, top_i = jax.lax.top_k(probs, top_k)
    w = (
        jnp.ones(logits.shape[0], jnp.float32)
        if mask is None
        else mask.astype(jnp.float32)
    )
    num_experts = logits.shape[-1]
    picks = jax.nn.one_hot(top_i, num_experts, dtype=jnp.float32).sum(1)  # [T, E]
    return (picks * w[:, None]).sum(0), (probs * w[:, None]).sum(0), w.sum()


def load_balancing_loss(stats) -> jax.Array:
    """The Switch / Mixtral auxiliary load-balancing loss over layers.

    `stats`: `router_stats` of each layer. `E * sum_e f_e * p_e`, with `f_e`
    the top-k picks of expert e per routed row and `p_e` its mean router
    probability, both over every layer's rows: transformers'
    `load_balancing_loss_func` (Mixtral; Gemma 4's own code has none, and
    the released model was trained without one). 1.0 is perfectly even at
    top-1; top-k multiplies it by k.
    """
    tokens = sum(s[0] for s in stats)
    probs = sum(s[1] for s in stats)
    rows = sum(s[2] for s in stats)
    return jnp.sum((tokens / rows) * (probs / rows)) * tokens.shape[0]


def experts(
    m: jax.Array,
    top_p: jax.Array,
    top_i: jax.Array,
    banks: dict[str, Bank],
    expert_scale: jax.Array,
    dispatch: str = "auto",
    lora: dict[str, ExpertLora] | None = None,
    token_chunk: int = 0,
) -> jax.Array:
    """The experts' weighted sum for each token of `m` [T, d] (normed input).

    `banks` holds `experts_gate` / `experts_up` (E, d, f) and `experts_down`
    (E, f, d), float arrays or per-expert NF4 (`quant.nf4_quantize_experts`).
    `lora`: optional expert adapters by bank name (`ExpertLora`), applied
    as a separate branch on the same rows in every dispatch.
    `token_chunk` (`model.moe_token_chunk`; 0 = off): the routed kernels
    take at most this many tokens at a time (`routed_in_chunks`).
    """
    nf4 = isinstance(banks["experts_gate"], quant_lib.NF4Weight)
    distribution = keras.distribution.distribution()
    shards = token_shards(distribution)
    split = distribution is not None and shards is None
    how = kernel(dispatch, nf4, distributed=split)
    expert_scale = jnp.asarray(expert_scale)
    if how == "dense":
        return dense(m, top_p, top_i, banks, expert_scale, lora)
    if shards is not None:
        return per_shard(
            shards, m, top_p, top_i, banks, expert_scale, how, lora, token_chunk
        )
    return _routed(m, top_p, top_i, banks, expert_scale, how, lora, token_chunk)


def _routed(m, top_p, top_i, banks, expert_scale, how, lora, token_chunk):
    """`routed`, over chunks of tokens when `token_chunk` asks for them."""
    if chunks(m.shape[0], token_chunk) > 1:
        return routed_in_chunks(
            m, top_p, top_i, banks, expert_scale, how, lora, token_chunk
        )
    return routed(m, top_p, top_i, banks, expert_scale, how, lora)


def token_shards(distribution) -> tuple[Any, str] | None:
    """(JAX mesh, batch axis) of a Keras distribution whose devices each
    hold every expert (only the batch axis has more than one device), or
    None (no distribution, or banks split over a model axis)."""
    if distribution is None:
        return None
    mesh = distribution.device_mesh
    batch = getattr(distribution, "batch_dim_name", mesh.axis_names[0])
    sizes = dict(zip(mesh.axis_names, mesh.shape, strict=True))
    if any(n > 1 for name, n in sizes.items() if name != batch):
        return None
    return mesh.backend_mesh, batch


def per_shard(
    shards, m, top_p, top_i, banks, expert_scale, how: str, lora, token_chunk: int
) -> jax.Array:
    """`routed` on each device's own tokens (`jax.shard_map` over the batch
    axis of `shards`, `token_shards`); the banks, their scales and the
    expert adapters are whole on every device.

    Under GSPMD alone the routed kernels sort every token of the global
    batch by expert: each device would gather and compute all of them. Per
    shard each sorts and multiplies its own T / devices tokens; the adapter
    gradients are summed over the devices by `shard_map`'s transpose. The
    result equals one device's (`tests/test_moe_routed.py`).
    """
    mesh, axis = shards
    lora = lora or {}
    scales = {name: scale for name, (_, _, scale) in lora.items()}
    factors = {name: (a, b) for name, (a, b, _) in lora.items()}

    def local(m, top_p, top_i, banks, expert_scale, factors):
        adapters = {name: (*ab, scales[name]) for name, ab in factors.items()}
        return _routed(m, top_p, top_i, banks, expert_scale, how, adapters, token_chunk)

    tokens, whole = jax.sharding.PartitionSpec(axis), jax.sharding.PartitionSpec()
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(tokens, tokens, tokens, whole, whole, whole),
        out_specs=tokens,
        # The custom VJPs inside (`remat_chunks`) return cotangents of the
        # whole-on-every-device adapters without a varying-axis type;
        # unchecked, shard_map's transpose sums them over the devices.
        check_vma=False,
    )(m, top_p, top_i, banks, expert_scale, factors)


def check_token_chunk(token_chunk: int) -> None:
    if token_chunk < 0:
        raise ValueError(
            f"model.moe_token_chunk={token_chunk}: must be >= 0 (tokens per "
            "chunk of the routed experts; 0 = every token at once)"
        )


def chunks(tokens: int, token_chunk: int) -> int:
    """How many chunks `routed_in_chunks` splits `tokens` tokens into
    (1: no chunking). Chunks are equal, at most `token_chunk` tokens.

    >>> chunks(4096, 1024), chunks(4096, 0), chunks(1000, 512), chunks(8, 512)
    (4, 1, 2, 1)
    """
    return -(-tokens // token_chunk) if token_chunk else 1


def routed_in_chunks(
    m, top_p, top_i, banks, expert_scale, how: str, lora, token_chunk: int
) -> jax.Array:
    """`routed` over equal chunks of at most `token_chunk` tokens, each
    chunk rematerialised: the backward pass recomputes one chunk's expert
    rows at a time instead of keeping every token's.

    A MoE layer's expert rows (gate, up, their product [rows, f], the
    gathered inputs and outputs [rows, d]) are most of what one 26B-A4B
    block holds during its backward pass (about 1.2 GiB in bfloat16 at
    4,096 tokens); in n chunks that is 1/n, for one more forward pass of
    the experts. Blocks are sized per chunk (`block_size`), so the padding
    share and the expert FLOPs per pass stay as unchunked. Equal to
    `routed` to float32 precision (`tests/test_moe_routed.py`). When the
    tokens do not split evenly, the last chunk is padded with zero rows of
    weight 0 (routed to expert 0, they add nothing).
    """
    t, k = top_i.shape
    n = chunks(t, token_chunk)
    size = -(-t // n)
    pad = n * size - t
    if pad:
        m = jnp.pad(m, ((0, pad), (0, 0)))
        top_p = jnp.pad(top_p, ((0, pad), (0, 0)))
        top_i = jnp.pad(top_i, ((0, pad), (0, 0)))

    lora = lora or {}

    def one_chunk(floats, top_i, lora, consts):
        banks, expert_scale = consts
        return routed(*floats, top_i, banks, expert_scale, how, lora)

    y = remat_chunks(
        one_chunk,
        (m.reshape(n, size, -1), top_p.reshape(n, size, k)),
        top_i.reshape(n, size, k),
        lora,
        (banks, expert_scale),
    )
    return y.reshape(n * size, -1)[:t]


def dense(m, top_p, top_i, banks, expert_scale, lora=None) -> jax.Array:
    """KerasHub's dense MoE: every expert on every token, one batched einsum."""
    num_experts = expert_scale.shape[0]
    dispatch = jnp.sum(
        jax.nn.one_hot(top_i, num_experts, dtype=top_p.dtype) * top_p[..., None],
        axis=1,
    )  # [T, E]
    lora = lora or {}

    def mm(h, name, spec):  # spec: "th" (every expert reads h) or "eti"
        # Tied to `h`: a bank's dequantisation reads only weights, and XLA
        # would otherwise run every layer's at the start of the step.
        bank = whole_bank(tie_to(banks[name], h, integers=True), m.dtype)
        y = jnp.einsum(f"{spec},e{spec[-1]}o->eto", h, bank)
        if name in lora:
            a, b, scale = _lora_cast(lora[name], h.dtype)
            y = y + jnp.einsum(f"{spec},e{spec[-1]}r,ero->eto", h, a, b) * scale
        return y

    gate, up = mm(m, "experts_gate", "th"), mm(m, "experts_up", "th")
    hid = gelu_tanh(gate.astype(jnp.float32)).astype(m.dtype) * up
    out = mm(hid, "experts_down", "eti")
    out = out * expert_scale.astype(m.dtype)[:, None, None]
    return jnp.sum(out * dispatch.T[:, :, None], axis=0)


def routed(
    m, top_p, top_i, banks, expert_scale, how: str = "blocks", lora=None
) -> jax.Array:
    """Each expert on its own tokens only (`how`: ragged | blocks); exact.

    Rows move between token order and expert order by gathers only, in both
    passes (`take_rows`): a scatter into a zero buffer would let XLA create
    every layer's buffer at the start of the step (it reads only a
    constant), all alive at once (26B-A4B, seq 4096: 20.5 GiB of
    temporaries in 6 layers, docs/real_size.md).
    """
    t, k = top_i.shape
    num_experts = expert_scale.shape[0]
    flat = top_i.reshape(-1)  # [T*k] expert of each (token, slot)
    order = jnp.argsort(flat, stable=True)
    by_expert = flat[order]
    if how == "ragged":
        groups = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
        pos, rows = jnp.arange(t * k), t * k
    else:
        block = block_size(t * k, num_experts)
        groups, pos, rows = block_layout(by_expert, num_experts, block)
    # row_of[p]: the row of (token, slot) pair p (token-major); source[r]:
    # the pair of row r, t * k (no pair: a padding row) where none.
    row_of = jnp.zeros(t * k, jnp.int32).at[order].set(pos.astype(jnp.int32))
    source = jnp.full(rows, t * k, jnp.int32).at[pos].set(order.astype(jnp.int32))

    def mm(h, name):
        y = grouped_matmul(h, banks[name], groups, how)
        if lora and name in lora:
            y = y + grouped_lora(h, lora[name], groups, how)
        return y

    xp = take_rows(m, source, row_of, k)  # [rows, d]: each row's token
    hid = gelu_tanh(mm(xp, "experts_gate").astype(jnp.float32)).astype(m.dtype)
    out = take_rows(mm(hid * mm(xp, "experts_up"), "experts_down"), row_of, source, 1)
    weight = top_p * expert_scale.astype(m.dtype)[top_i]  # [T, k]
    return jnp.sum(out.reshape(t, k, -1) * weight[..., None], axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def take_rows(x: jax.Array, index: jax.Array, inverse: jax.Array, fan: int):
    """Rows `index // fan` of `x` (zeros where out of range), by a gather.

    `index` [R] and `inverse` [N * fan] are inverse maps between the R output
    rows and the N x `fan` (row of `x`, copy) pairs, out of range where a
    side has no partner. The backward pass is a gather too: each row of `x`
    sums the gradients of its `fan` copies (at `inverse`), never a scatter.

    Example (x [2, d], fan 2: row 0 to output rows 1, 2; row 1 to 0, 3):

        index    2 0 1 3 4      (4: a padding row, zeros)
        inverse  1 2 0 3
    """
    return jnp.take(x, index // fan, axis=0, mode="fill", fill_value=0)


def _take_rows_fwd(x, index, inverse, fan):
    return take_rows(x, index, inverse, fan), (index, inverse, x.shape[0])


def _take_rows_bwd(fan, residuals, g):
    index, inverse, n = residuals
    dx = jnp.take(g, inverse, axis=0, mode="fill", fill_value=0)
    dx = dx.reshape(n, fan, -1).sum(1) if fan > 1 else dx
    return dx, no_cotangent(index), no_cotangent(inverse)


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def block_size(pairs: int, num_experts: int) -> int:
    """Rows per block of the `blocks` kernel for `pairs` (token, slot) pairs.

    The largest power of two up to `pairs / (4 * num_experts)` (at most
    `MAX_BLOCK`, at least 1), so the padding (`num_experts * block` rows at
    most) stays within a quarter of the routed rows: expert FLOPs at most
    1.25x the active count. Smaller blocks cost more loop steps, not FLOPs;
    one token (decoding) gets blocks of one row, no padding.

    >>> block_size(4096 * 8, 128), block_size(256 * 8, 128), block_size(8, 128)
    (64, 4, 1)
    """
    block = 1
    while block * 2 <= min(MAX_BLOCK, pairs / (4 * num_experts)):
        block *= 2
    return block


def block_layout(by_expert: jax.Array, num_experts: int, block: int):
    """Where each expert-sorted pair goes among blocks of `block` rows.

    Each expert's group starts a new block and is padded to a multiple of
    `block`; experts with no pair get no block. Returns (`block_expert`
    [n_blocks], the expert of each block; `pos` [pairs], each pair's row;
    `rows`, the static row count `n_blocks * block`). Blocks past the last
    group are padding (zero rows) given the last expert.

        by_expert     0 0 0 2 2     (block 2, 3 experts)
        pos           0 1 2 4 5     rows 0..3 expert 0, 4..5 expert 2
        block_expert  0 0 2 2       (the fourth block is padding)
    """
    pairs = by_expert.shape[0]
    n_blocks = -(-(pairs + num_experts * (block - 1)) // block)  # expert_rows
    sizes = jnp.bincount(by_expert, length=num_experts)
    padded = (sizes + block - 1) // block * block
    ends, padded_ends = jnp.cumsum(sizes), jnp.cumsum(padded)
    starts, padded_starts = ends - sizes, padded_ends - padded
    pos = padded_starts[by_expert] + jnp.arange(pairs) - starts[by_expert]
    first_rows = jnp.arange(n_blocks) * block
    block_expert = jnp.searchsorted(padded_ends, first_rows, side="right")
    block_expert = jnp.minimum(block_expert, num_experts - 1).astype(jnp.int32)
    return block_expert, pos, n_blocks * block


def whole_bank(bank: Bank, dtype) -> jax.Array:
    """The (E, in, out) bank in `dtype`, every expert (dequantised if NF4)."""
    if isinstance(bank, quant_lib.NF4Weight):
        return quant_lib.nf4_dequantize(bank, dtype)
    return bank.astype(dtype)


def expert_weight(bank: Bank, e: jax.Array, dtype) -> jax.Array:
    """Expert `e`'s (in, out) matrix in `dtype`: only its slice is read (and
    dequantised, for NF4)."""
    if isinstance(bank, quant_lib.NF4Weight):
        return quant_lib.nf4_dequantize_expert(bank, e, dtype)
    return jax.lax.dynamic_index_in_dim(bank, e, keepdims=False).astype(dtype)


def _grouped(x, bank, groups, how: str, transpose: bool) -> jax.Array:
    """`x`'s rows times their group's expert matrix (transposed if asked)."""
    if how == "ragged":
        w = whole_bank(tie_to(bank, x, integers=True), x.dtype)
        return jax.lax.ragged_dot(x, w.transpose(0, 2, 1) if transpose else w, groups)
    n_blocks = groups.shape[0]
    block = x.shape[0] // n_blocks
    xb = x.reshape(n_blocks, block, x.shape[-1])
    out_dim = bank.shape[-2] if transpose else bank.shape[-1]

    def one_block(i, y):
        w = expert_weight(bank, groups[i], x.dtype)
        rows = jax.lax.dynamic_index_in_dim(xb, i, keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(
            y, rows @ (w.T if transpose else w), i, 0
        )

    # The output buffer is tied to `x` (not a loop's zero-filled stack, which
    # XLA would create at the start of the step for every layer at once).
    y = tie_to(jnp.zeros((n_blocks, block, out_dim), x.dtype), x)
    unroll = n_blocks if UNROLL_BLOCKS else 1
    y = jax.lax.fori_loop(0, n_blocks, one_block, y, unroll=unroll)
    return y.reshape(x.shape[0], -1)


def _lora_cast(lora: ExpertLora, dtype) -> ExpertLora:
    a, b, scale = lora
    return a.astype(dtype), b.astype(dtype), jnp.asarray(scale, dtype)


def grouped_lora(x: jax.Array, lora: ExpertLora, groups: jax.Array, how: str):
    """`scale * (x @ a[e]) @ b[e]` for rows grouped as `grouped_matmul`'s.

    Plain JAX (no custom gradient): the adapter factors are trainable.
    """
    a, b, scale = _lora_cast(lora, x.dtype)
    if how == "ragged":
        return jax.lax.ragged_dot(jax.lax.ragged_dot(x, a, groups), b, groups) * scale
    n_blocks = groups.shape[0]
    xb = x.reshape(n_blocks, x.shape[0] // n_blocks, x.shape[-1])

    def one_block(_, inputs):
        rows, e = inputs
        ae = jax.lax.dynamic_index_in_dim(a, e, keepdims=False)
        be = jax.lax.dynamic_index_in_dim(b, e, keepdims=False)
        return None, (rows @ ae) @ be

    _, y = jax.lax.scan(one_block, None, (xb, groups), unroll=UNROLL_BLOCKS)
    return y.reshape(x.shape[0], -1) * scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def grouped_matmul(x: jax.Array, bank: Bank, groups: jax.Array, how: str):
    """Rows of `x` times their expert's matrix of the frozen `bank`.

    `how` = ragged: `groups` are the group sizes of the expert-sorted rows
    (`jax.lax.ragged_dot`); blocks: `groups` is the expert of each block of
    rows (`block_layout`). The bank gets no gradient; the backward pass
    multiplies by each expert's transpose, reading (dequantising) the
    experts again rather than keeping a float copy as a residual.
    """
    return _grouped(x, bank, groups, how, transpose=False)


def _grouped_fwd(x, bank, groups, how):
    return _grouped(x, bank, groups, how, transpose=False), (bank, groups)


def _grouped_bwd(how, residuals, g):
    bank, groups = residuals
    dx = _grouped(g, bank, groups, how, transpose=True)
    return (
        dx,
        jax.tree_util.tree_map(no_cotangent, bank),
        no_cotangent(groups),
    )


grouped_matmul.defvjp(_grouped_fwd, _grouped_bwd)
