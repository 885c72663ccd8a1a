"""`gemma4-keras plan`: memory and speed estimate of a run before it starts.

Reads the architecture from the preset's `config.json` only (no weights are
loaded, no model is built), derives the same per-block facts as
`hub.spec_from_config`, and estimates, for one device:

    parameters      embedding, PLE, attention, MLP, MoE experts, norms   [count]
    base            frozen weights as `quant.mode` stores them           [bytes]
    adapters        LoRA params + grads (+ accumulators) + AdamW m, v    [bytes]
    activations     per micro-batch, with and without `model.remat`      [bytes]
    loss temp       one chunk of the chunked loss                        [bytes]
    towers          the frozen vision / audio towers a run attaches
                    (`model.towers`): parameters (float32), soft tokens
                    per image, the vision pass's temporaries              [bytes]
    flops           per optimiser step                                   [FLOP]
    time            per step at `tflops` x `mfu`                         [s]
    per device      on the mesh of `config.distribution` over `devices`:
                    each device's shard of every variable (the layout
                    table of `sharding.py`), its share of the batch, and
                    which `ACCELERATORS` that fits                        [bytes]

Usage:

    from gemma4_keras import config_lib
    from gemma4_keras.model import plan
    cfg = config_lib.get_config("e4b", "qlora")
    print(plan.format_plan(plan.plan(cfg, tflops=100.0, mfu=0.4)))

What the numbers are checked against is in `tests/test_plan.py`: parameter,
adapter and NF4 byte counts equal the real `Gemma4LoraModel` variables of the
tiny variants; FLOPs match XLA's `cost_analysis()` of a compiled train step;
activation residuals match the vjp residuals `benchmarks/remat_memory.py`
measures. Per-size numbers are not in this file: they come from the config of
whatever preset is named.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import numpy as np

from gemma4_keras import config_lib
from gemma4_keras.data import commands as data_commands
from gemma4_keras.data import media
from gemma4_keras.model import hub, moe, presets, quant, schema, sharding
from gemma4_keras.model import loss as loss_lib
from gemma4_keras.model.lora import LoraSpec
from gemma4_keras.model.spec import BlockSpec, ModelSpec

GIB = 1024**3
KERAS_INT4_BLOCK = 128  # input rows per int4 scale (Int4QuantizationConfig default)
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Activation model, elements per token per decoder block (read off the vjp
# residuals of `Gemma4LoraModel`'s forward; see `activation_bytes`).
_RESID_D = 6  # block input, norm outputs, attention/MLP outputs (x D)
_RESID_Q = 3  # q before/after norm+RoPE, attention output (x heads*head_dim)
_RESID_KV = 2  # k and v after norm (x kv_heads*head_dim), own K/V only
_RESID_F = 8  # gate, up, GELU-tanh internals, product (x ffn)
_ATTN_F32 = 4  # float32 [B, heads, T, T] tensors kept: logits, tanh, probs, ...
_ATTN_BOOL = 2  # boolean [B, heads, T, T] masks kept by the `where`s
# LoRA dropout's random words while one mask is made, per element of that
# adapter's input [bytes]: one 32-bit word per two elements, two while the
# generator runs (`lora.dropout_keep`).
_DROPOUT_WORDS = 4


# ----------------------------------------------------------------------------
# Parameter counts and bytes.


def _numel(shape) -> int:
    return math.prod(shape)


def _tensors(spec: ModelSpec):
    """(row, layer, our shape) of every tensor of the model (`model/schema.py`)."""
    for row, layer in schema.rows(spec):
        yield row, layer, row.shape(spec, None if layer is None else spec.blocks[layer])


def _projections(spec: ModelSpec) -> list[tuple[int, int]]:
    """(in, out) of every frozen projection kernel the training model holds."""
    return [tuple(sh) for r, _, sh in _tensors(spec) if r.kind == "projection"]


def param_counts(spec: ModelSpec) -> dict[str, int]:
    """Parameters of the text decoder as `Gemma4LoraModel` holds them [count].

    The schema's tensors (`model/schema.py`), summed by their `group`:

    embedding  V*D (tied with the LM head)
    ple        V_ple*L*P + D*L*P + L*(D*P + P*D)   (PLE table, projection, gate/up)
    attention  sum over own q, k, v, o kernels (KV-shared layers own no k/v;
               K=V layers no v)
    mlp        L * 3*D*F_l
    moe        L * (3*E*D*I + D*E + D + E)   (expert banks, router, scales)
    norms      D + P + sum_l (4D + h_l [+ h_l own k] [+ 3D moe] [+ D ple] + 1)
               (RMSNorm scales and the per-layer scalar)
    """
    counts = dict.fromkeys(("embedding", "ple", "attention", "mlp", "moe", "norms"), 0)
    for row, _, shape in _tensors(spec):
        counts[row.group] = counts.get(row.group, 0) + _numel(shape)
    counts["total"] = sum(counts.values())
    return counts


def nf4_bytes(n: int, block_size: int, double_quant: bool) -> int:
    """Bytes of one NF4 tensor of `n` weights, as `quant.NF4Kernel` stores it.

    packed ceil(n/2) uint8 + per block a float32 absmax (4 B), or with double
    quantisation a uint8 code per block + a float32 scale per 256 blocks + one
    float32 offset: ~0.5625 B/weight plain, ~0.5159 with double quant (block 64).
    """
    blocks = -(-n // block_size)
    if double_quant:
        return -(-n // 2) + blocks + 4 * -(-blocks // 256) + 4
    return -(-n // 2) + 4 * blocks


def _kernel_bytes(din: int, dout: int, q: dict, s: int) -> int:
    """Bytes of one frozen (in, out) projection kernel under `quant.mode`."""
    mode = q["mode"]
    if mode == "nf4":
        return nf4_bytes(din * dout, q["block_size"], q["double_quant"])
    if mode == "int8":  # int8 kernel + float32 per-output-channel scale
        return din * dout + 4 * dout
    if mode == "int4":  # Keras: packed int4, f32 scale + int8 zero per group
        # of KERAS_INT4_BLOCK input rows and output column, f32 g_idx
        groups = -(-din // KERAS_INT4_BLOCK)
        return din * -(-dout // 2) + 5 * groups * dout + 4 * din
    return din * dout * s


def base_bytes(spec: ModelSpec, q: dict, s: int) -> dict[str, int]:
    """Resident bytes of the frozen base [bytes], over the schema's tensors.

    projections  per kernel: compute dtype (s B/weight), or NF4 (`nf4_bytes`),
                 int8 (in*out + 4*out), int4 (in*ceil(out/2) + 5*G*out + 4*in,
                 G = ceil(in / 128) groups)
    experts      MoE banks: NF4 per expert under nf4, else s B/weight
                 (Keras int8/int4 apply to Dense kernels only)
    embedding    embedding, PLE table/projection/gate/up, router, scales: s B;
                 the tied embedding under quant.embedding=int8: V*D + 4*V
    norms        RMSNorm scales in float32 (4 B); the layer scalar in s B
    """
    out = dict.fromkeys(("projections", "experts", "embedding", "norms"), 0)
    for row, _, shape in _tensors(spec):
        n = _numel(shape)
        if row.kind == "projection":
            out["projections"] += _kernel_bytes(*shape, q, s)
        elif row.kind == "bank":
            per = nf4_bytes(n // shape[0], q["block_size"], q["double_quant"])
            out["experts"] += shape[0] * per if q["mode"] == "nf4" else n * s
        elif row.float32:
            out["norms"] += 4 * n
        elif _int8_embedding(row, q):
            out["embedding"] += n + 4 * shape[0]
        else:
            out["norms" if row.group == "norms" else "embedding"] += n * s
    out["total"] = sum(out.values())
    return out


def _int8_loss(q: dict) -> bool:
    """Whether the loss reads an int8 table (`loss._int8_dot`)."""
    return q.get("embedding", "none") == "int8"


def _int8_embedding(row: schema.Row, q: dict) -> bool:
    """Whether `row` is the tied embedding stored as int8 rows."""
    return row.name == "embedding" and _int8_loss(q)


def adapter_params(spec: ModelSpec, lora: LoraSpec) -> int:
    """LoRA parameters: sum over sites of r * (in + out) [count] (times the
    experts for an expert-bank target: one pair per expert)."""
    return sum(
        lora.rank
        * sum(spec.projection_shape(layer, t))
        * max(1, spec.adapter_experts(t))
        for layer, t in lora.sites(spec)
    )


def adapter_bytes(params: int, grad_accum: int) -> dict[str, int]:
    """float32 adapter state [bytes]: weights, gradients, Keras' gradient
    accumulators (grad_accum > 1 only) and AdamW's m and v: 4 B each."""
    out = {
        "weights": 4 * params,
        "gradients": 4 * params,
        "accumulators": 4 * params if grad_accum > 1 else 0,
        "adamw": 8 * params,
    }
    out["total"] = sum(out.values())
    return out


# ----------------------------------------------------------------------------
# Activations, loss temp, FLOPs.


def attention_chunk(model_cfg) -> int | None:
    """Query chunk `plan` counts for `model.attention`; None = the full square.

    auto and chunked run queries in chunks of `model.attention_chunk_size`
    (auto uses cuDNN instead where it applies, which holds less: the chunked
    figure is then an upper bound); dense and fused (XLA's implementation
    off GPUs) hold the whole [B, heads, T, T] square.
    """
    if str(model_cfg.attention) in ("dense", "fused"):
        return None
    return int(model_cfg.attention_chunk_size)


def attention_block(b: BlockSpec, seq: int, chunk: int | None) -> tuple[int, int]:
    """(queries, keys) of the largest logits block one layer holds at once.

    Dense: seq x seq. Chunked: chunk x seq on global layers, chunk x
    (chunk + window - 1) on sliding ones (`model/attention.py`).
    """
    if chunk is None or seq <= chunk:
        return seq, seq
    if b.sliding_window is not None and chunk + b.sliding_window - 1 < seq:
        return chunk, chunk + b.sliding_window - 1
    return chunk, seq


def _block_internal_bytes(
    spec: ModelSpec,
    b: BlockSpec,
    sites: int,
    lora_rank: int,
    batch: int,
    seq: int,
    s: int,
    attn_chunk: int | None = None,
    moe_kernel: str = "dense",
    moe_chunk: int = 0,
    dropout_in: tuple[int, ...] = (),
) -> int:
    """Residuals one block keeps for its backward pass [bytes];
    `dropout_in`: the input widths of its adapters with dropout."""
    d, n_tok = spec.hidden_dim, batch * seq
    per_tok = _RESID_D * d + _RESID_Q * b.num_heads * b.head_dim + _RESID_F * b.ffn_dim
    if b.has_kv:
        per_tok += _RESID_KV * b.num_kv_heads * b.head_dim
    per_tok += sites * lora_rank  # x @ A per adapter
    if spec.moe:
        per_tok += _moe_per_token(spec, n_tok, moe_kernel, moe_chunk)
    if spec.ple_dim:
        per_tok += 2 * spec.ple_dim + 2 * d
    queries, keys = attention_block(b, seq, attn_chunk)
    attn = batch * b.num_heads * queries * keys * (_ATTN_F32 * 4 + _ATTN_BOOL)
    # With dropout, each adapter keeps its dropped input (s) and its boolean
    # mask (1) per element; one mask's generator runs at a time.
    dropout = sum(dropout_in) * (s + 1) + max(dropout_in, default=0) * _DROPOUT_WORDS
    return n_tok * (per_tok * s + dropout) + attn


def _moe_per_token(
    spec: ModelSpec, n_tok: int, moe_kernel: str, moe_chunk: int = 0
) -> float:
    """Values the MoE path holds per token in its backward pass [count].

    dense: gate, up, hid [I] and out [D] of every expert, E*(3*I + D);
    routed (`moe.expert_rows` rows R of the tokens taken at once: all T,
    or one chunk of C under `model.moe_token_chunk`): (R*(3*I + 2*D) (gate,
    up, hid, the grouped input and output) + C*3*k*D (the gathered input,
    the output and the weighted output of each (token, slot))) / T; both
    + 4*D (norms, router), + D in chunks (their stacked output).
    XLA's count at 26B-A4B's widths, 4096 tokens, float32
    (`benchmarks/moe_dispatch.py`, each further layer, blocks of 64):
    routed 2.26-2.30 GiB, this 2.38; dense 13.89 GiB, this 9.8.
    """
    d, i, k = spec.hidden_dim, spec.expert_dim, spec.top_k
    if moe_kernel == "dense":
        rows = moe.expert_rows(n_tok, k, spec.num_experts, moe_kernel) / n_tok
        return rows * (3 * i + d) + 4 * d
    n = moe.chunks(n_tok, moe_chunk)
    size = -(-n_tok // n)
    rows = moe.expert_rows(size, k, spec.num_experts, moe_kernel)
    kept = (4 + (n > 1)) * d
    return (rows * (3 * i + 2 * d) + size * 3 * k * d) / n_tok + kept


def activation_bytes(
    spec: ModelSpec,
    lora: LoraSpec,
    batch: int,
    seq: int,
    s: int,
    attn_chunk: int | None = None,
    moe_kernel: str = "dense",
    moe_chunk: int = 0,
) -> dict[str, int]:
    """Activation memory of one micro-batch of `batch` x `seq` tokens [bytes].

    Without remat every block keeps its residuals for the backward pass, per
    block l and token: (6*D + 3*H*h_l + 2*kv*h_l [own K/V only] + 8*F_l
    + r * sites_l [+ MoE `_moe_per_token`] [+ PLE 2*P + 2*D]) * s bytes, plus
    attention B*H*Tq*Tk*(4 float32 + 2 bool) bytes: the full square (Tq = Tk
    = T) when `attn_chunk` is None or T <= attn_chunk, else one chunk's block
    (`attention_block`; chunks are recomputed, so this bounds what a layer
    holds at once), plus, with LoRA dropout, (s + 1) bytes per element of
    each adapter's input (the dropped input, the mask) and `_DROPOUT_WORDS`
    for the widest (its mask's generator).

    With remat each block keeps only its input: L*B*T*D*s, plus the PLE
    inputs B*T*L*P*s (masks are rebuilt from the segment ids inside each
    block); the backward recomputes one block at a time, so the peak adds
    the largest block's residuals. Both add the final hidden state B*T*D*s.

    `*_saved` is what lives between forward and backward (compare with vjp
    residuals); `*_peak` adds, with remat, one block's recomputed internals.
    """
    sites: dict[int, int] = {}
    dropout_in: dict[int, tuple[int, ...]] = {}
    for layer, target in lora.sites(spec):
        sites[layer] = sites.get(layer, 0) + 1
        if lora.dropout > 0:
            width = spec.projection_shape(layer, target)[0]
            dropout_in[layer] = (*dropout_in.get(layer, ()), width)
    internals = [
        _block_internal_bytes(
            spec,
            b,
            sites.get(b.index, 0),
            lora.rank,
            batch,
            seq,
            s,
            attn_chunk,
            moe_kernel,
            moe_chunk,
            dropout_in.get(b.index, ()),
        )
        for b in spec.blocks
    ]
    n_tok, d = batch * seq, spec.hidden_dim
    final = n_tok * d * s
    remat_saved = (
        spec.num_layers * n_tok * d * s
        + n_tok * spec.num_layers * spec.ple_dim * s
        + final
    )
    return {
        "no_remat_saved": sum(internals) + final,
        "remat_saved": remat_saved,
        "remat_peak": remat_saved + max(internals),
    }


def loss_temp_bytes(
    spec: ModelSpec,
    micro_tokens: int,
    chunk: int,
    split: bool = False,
    int8: bool = False,
    s: int = 2,
) -> int:
    """Chunked loss temp [bytes]: min(chunk, tokens) x V x 4 (one float32
    block of one chunk's logits, turned into their gradient in place: the
    loss builds d(hidden) in the forward pass) + tokens x D x 4 (that
    d(hidden), kept for the backward pass; `docs/real_size.md` compares
    plan with XLA's count at E2B and E4B). With `split` (an embedding stored
    narrower than the compute dtype, `loss._dot`) chunks are at most
    `loss.SPLIT_CHUNK` tokens and d_logits' parts add 3 x chunk x V x 2.
    With `int8` (quant.embedding=int8, `loss._int8_dot`) one tile of
    V / `loss.int8_tiles(V)` rows converted to the compute dtype (`s` B)
    and its [chunk, tile] float32 products add tile x (D x s + chunk x 4);
    nothing is split."""
    if int8:
        tile = spec.vocab_size // loss_lib.int8_tiles(spec.vocab_size)
        rows = min(chunk, micro_tokens)
        extra = tile * (spec.hidden_dim * s + rows * 4)
        return loss_temp_bytes(spec, micro_tokens, chunk) + extra
    if split:
        chunk = min(chunk, loss_lib.SPLIT_CHUNK)
    rows = min(chunk, micro_tokens)
    parts = loss_lib.SPLIT_PARTS * rows * spec.vocab_size * 2 if split else 0
    return rows * spec.vocab_size * 4 + parts + micro_tokens * spec.hidden_dim * 4


def step_flops(
    spec: ModelSpec,
    lora: LoraSpec,
    tokens: int,
    seq: int,
    attn_chunk: int | None = None,
    moe_kernel: str = "dense",
    micro_tokens: int | None = None,
    moe_chunk: int = 0,
) -> dict[str, int]:
    """FLOPs of one optimiser step of `tokens` tokens in rows of `seq` [FLOP].

    frozen     4 * T * sum P   (forward + input gradient; no weight gradient).
               P: own projections, MoE router, PLE projection/gate/up
    experts    4 * R * 3 * D * I per MoE layer, R the rows its expert
               projections multiply (`moe.expert_rows` per micro-batch of
               `micro_tokens`, default T: T * E dense, about T * k routed,
               per chunk of `moe_chunk` tokens if set: 6 * R * 3 * D * I,
               each chunk's forward recomputed)
    adapters   6 * T * r * sum_sites (in + out)
    attention  12 * T * keys * H * h_l per layer (QK^T and PV, forward and
               backward): keys = seq on the full square; chunked, 16 * T *
               keys (each chunk's forward recomputed), keys = seq on global
               layers and chunk + window - 1 on sliding ones
    lm_head    4 * T * V * D: each loss chunk's logits and, the tied
               embedding being frozen, d(hidden), both in the forward pass
               (`model/loss.py`)
    Element-wise work (norms, RoPE, softmax, GELU) is left out.
    """
    d, n = spec.hidden_dim, spec.num_layers
    frozen_p = sum(a * b for a, b in _projections(spec))
    experts = 0
    if spec.moe:
        frozen_p += n * d * spec.num_experts
        micro = micro_tokens or tokens
        parts = 1 if moe_kernel == "dense" else moe.chunks(micro, moe_chunk)
        size = -(-micro // parts)
        rows = moe.expert_rows(size, spec.top_k, spec.num_experts, moe_kernel)
        rows = rows * parts * tokens // micro
        passes = 4 if parts == 1 else 6
        experts = passes * n * rows * 3 * d * spec.expert_dim
    if spec.ple_dim:
        frozen_p += d * n * spec.ple_dim + n * 2 * d * spec.ple_dim
    out = {
        "frozen": 4 * tokens * frozen_p,
        "experts": experts,
        "adapters": 6 * tokens * adapter_params(spec, lora),
        "attention": sum(
            _attention_flops(b, tokens, seq, attn_chunk) for b in spec.blocks
        ),
        "lm_head": 4 * tokens * spec.vocab_size * d,
    }
    out["total"] = sum(out.values())
    return out


def _attention_flops(b: BlockSpec, tokens: int, seq: int, chunk: int | None) -> int:
    queries, keys = attention_block(b, seq, chunk)
    passes = 12 if queries == seq else 16
    return passes * tokens * keys * b.num_heads * b.head_dim


def _count_records(path: str) -> int | None:
    """Records in a local JSONL / CSV file, or None when not countable here."""
    if not path or ":" in path.split(os.sep)[0] or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        lines = sum(1 for line in f if line.strip())
    return lines - 1 if path.endswith(".csv") else lines


def optimizer_steps(config) -> int | None:
    """Optimiser steps of the run: `train.max_steps`, or epochs x records in
    the training split / (batch x accum); None when the data is not local.
    Counts records before dedupe and truncation drops (an upper bound)."""
    t = config.train
    if t.max_steps > 0:
        return int(t.max_steps)
    # An empty data.path means the sample that ships with the package.
    records = _count_records(config_lib.data_settings(config.data).path)
    if records is None:
        return None
    train = records * (1 - float(config.data.holdout_fraction))
    per_step = int(t.batch_size) * int(t.grad_accum)
    return int(t.epochs) * max(1, math.floor(train / per_step))


# ----------------------------------------------------------------------------
# Per device: the variables, the mesh, the accelerators.


def _projection_variables(
    i: int, target: str, din: int, dout: int, q: dict, s: int
) -> list[tuple[str, tuple[int, ...], int]]:
    """Variables of one frozen projection, as `layers.FrozenLinear` holds them."""
    name, mode = f"block_{i}_{target}", q["mode"]
    if mode == "nf4":  # the HF (out, in) weight, flat (quant.NF4Kernel)
        leaves = quant.nf4_leaf_specs((dout, din), q["block_size"], q["double_quant"])
        return [
            (f"{name}_nf4/{leaf}", shape, np.dtype(dtype).itemsize)
            for leaf, (shape, dtype) in leaves.items()
        ]
    if mode == "int8":  # keras.layers.Dense.quantize("int8")
        return [
            (f"{name}/kernel", (din, dout), 1),
            (f"{name}/kernel_scale", (dout,), 4),
        ]
    if mode == "int4":  # keras.layers.Dense.quantize("int4"): packed along out
        groups = -(-din // KERAS_INT4_BLOCK)
        return [
            (f"{name}/kernel", (din, -(-dout // 2)), 1),
            (f"{name}/kernel_scale", (groups, dout), 4),
            (f"{name}/kernel_zero", (groups, dout), 1),
            (f"{name}/g_idx", (din,), 4),
        ]
    return [(f"{name}/kernel", (din, dout), s)]


def _row_variables(
    row: schema.Row, layer: int | None, shape, q: dict, s: int
) -> list[tuple[str, tuple[int, ...], int]]:
    """Variables holding one schema row (`layers.DecoderBlock.add`)."""
    if layer is None and _int8_embedding(row, q):  # quant.Int8Rows
        return [
            (f"gemma4_lora_model/{row.name}", shape, 1),
            (f"gemma4_lora_model/{row.name}_scale", shape[:1], 4),
        ]
    if layer is None:
        return [(f"gemma4_lora_model/{row.name}", shape, 4 if row.float32 else s)]
    if row.kind == "projection":
        return _projection_variables(layer, row.name, *shape, q, s)
    if row.kind == "bank" and q["mode"] == "nf4":
        leaves = quant.nf4_leaf_specs(
            shape, q["block_size"], q["double_quant"], batch_dims=1
        )
        return [
            (f"block_{layer}_{row.name}/{leaf}", ls, np.dtype(dt).itemsize)
            for leaf, (ls, dt) in leaves.items()
        ]
    # Keras int8/int4 quantise Dense kernels only: banks stay in s B.
    return [(f"block_{layer}/{row.name}", shape, 4 if row.float32 else s)]


def training_variables(
    spec: ModelSpec,
    q: dict,
    s: int,
    lora: LoraSpec | None = None,
) -> list[tuple[str, tuple[int, ...], int]]:
    """`(path, shape, bytes per element)` of every variable of the training
    model (frozen base: the schema's rows, then adapter `default`), from the
    spec alone.

    The paths are those `Gemma4LoraModel` gives its variables where the
    layout rules (`sharding.LAYOUT_RULES`) look at them.
    `tests/test_sharding.py` checks the list against a built model (shapes,
    dtypes, split paths).
    """
    out = []
    for row, layer, shape in _tensors(spec):
        out += _row_variables(row, layer, tuple(shape), q, s)
    for layer, t in lora.sites(spec) if lora is not None else ():
        din, dout = spec.projection_shape(layer, t)
        lead = (e,) if (e := spec.adapter_experts(t)) else ()
        name = f"lora_default_layers_{layer}_{t.replace('.', '_')}"
        out += [
            (f"{name}/lora_a", (*lead, din, lora.rank), 4),
            (f"{name}/lora_b", (*lead, lora.rank, dout), 4),
        ]
    return out


# name -> (what, memory per device [bytes, vendor GB = 1e9], devices by default)
ACCELERATORS: dict[str, tuple[str, float, int]] = {
    "t4": ("NVIDIA T4 16 GB", 16e9, 1),
    "l4": ("NVIDIA L4 24 GB", 24e9, 1),
    "rtx4090": ("NVIDIA RTX 4090 24 GB", 24e9, 1),
    "a100-40": ("NVIDIA A100 40 GB", 40e9, 1),
    "a100-80": ("NVIDIA A100 80 GB", 80e9, 1),
    "h100": ("NVIDIA H100 80 GB", 80e9, 1),
    "h200": ("NVIDIA H200 141 GB", 141e9, 1),
    "v5e": ("TPU v5e, 16 GB per chip", 16e9, 1),
    "v5p": ("TPU v5p, 95 GB per chip", 95e9, 1),
}
# Share of a device's memory a run may plan for: the rest is the runtime's
# (CUDA context, XLA's workspace) and allocator fragmentation.
USABLE_FRACTION = 0.9


def accelerator(name: str) -> tuple[str, str, float, int]:
    """`t4`, `2xt4`, `v5e-8` -> (key, description, bytes per device, devices).

    >>> accelerator("v5e-8")[1:]
    ('TPU v5e, 16 GB per chip', 16000000000.0, 8)
    >>> accelerator("2xT4")[3]
    2
    """
    key, count = name.strip().lower(), None
    if "x" in key.split("-")[0] and key.split("x", 1)[0].isdigit():
        count, key = key.split("x", 1)
    elif key.rsplit("-", 1)[-1].isdigit() and key.rsplit("-", 1)[0] in ("v5e", "v5p"):
        key, count = key.rsplit("-", 1)
    if key not in ACCELERATORS:
        raise config_lib.ConfigError(
            f"--accelerator={name!r} is not known; use one of "
            f"{', '.join(ACCELERATORS)} (optionally Nx..., e.g. 2xt4, or v5e-8)"
        )
    what, memory, devices = ACCELERATORS[key]
    return key, what, memory, int(count) if count else devices


def device_mesh(dist_cfg, devices: int) -> dict[str, int | str]:
    """The (batch, model) mesh `distributed.build_distribution` would make on
    `devices` devices: {"mode", "devices", "data", "model"}."""
    mode = str(dist_cfg.mode)
    if mode == "auto":
        mode = "data" if devices > 1 else "none"
    if mode == "none":
        return {"mode": mode, "devices": 1, "data": 1, "model": 1}
    if mode == "data":
        return {"mode": mode, "devices": devices, "data": devices, "model": 1}
    data, model = sharding.mesh_shape(devices, int(dist_cfg.model_parallel))
    return {"mode": mode, "devices": devices, "data": data, "model": model}


def per_device_bytes(
    spec: ModelSpec,
    lora: LoraSpec,
    q: dict,
    s: int,
    mesh: dict,
    *,
    batch: int,
    seq: int,
    grad_accum: int,
    chunk: int,
    remat: bool,
    attn_chunk: int | None = None,
    storage: int | None = None,
    moe_kernel: str = "dense",
    moe_chunk: int = 0,
) -> dict[str, int]:
    """Bytes one device of `mesh` holds during a step [bytes].

    `s` is the compute dtype's size, `storage` the frozen weights' (default s).

    base, adapters  the variables' shards under the layout rules (exact:
                    equal to the arrays a mesh run places, tested)
    adapter state   gradients, accumulators, AdamW m and v follow their
                    adapter's layout (Keras creates them from it)
    activations     `activation_bytes` of the device's share of the batch
                    (batch / data devices); not divided over the model axis
                    (the residual stream is replicated there): an upper bound
    loss temp       `loss_temp_bytes` of that share, likewise not divided
    """
    if batch % mesh["data"]:
        raise config_lib.ConfigError(
            f"--config.train.batch_size={batch} does not split over "
            f"{mesh['data']} data-parallel devices"
        )
    st = storage or s
    variables = training_variables(spec, q, st)
    base = sharding.per_device_bytes(variables, mesh["model"])
    adapter_vars = training_variables(spec, q, st, lora)[len(variables) :]
    adapters = sharding.per_device_bytes(adapter_vars, mesh["model"])
    state = adapters * (3 + (grad_accum > 1))  # grads (+ accumulators) + m, v
    b_dev = batch // mesh["data"]
    act = activation_bytes(spec, lora, b_dev, seq, s, attn_chunk, moe_kernel, moe_chunk)
    out = {
        "base": base,
        "adapters": adapters,
        "adapter_state": state,
        "activations": act["remat_peak"] if remat else act["no_remat_saved"],
        "loss_temp": loss_temp_bytes(
            spec, b_dev * seq, chunk, split=st < s, int8=_int8_loss(q), s=s
        ),
    }
    out["total"] = sum(out.values())
    return out


def ple_host_bytes(config, spec: ModelSpec, s: int, mesh: dict) -> int:
    """Bytes of the per-layer-embedding table kept in host memory [bytes].

    `model.ple_on_host`: `on`, or `auto` on one device (plan is for the
    accelerator, where `auto` means on); 0 on a mesh or without PLE.
    """
    setting = str(config.model.ple_on_host)
    one_device = mesh["data"] * mesh["model"] == 1
    if not spec.ple_dim or setting == "off" or not one_device:
        return 0
    return spec.ple_vocab * spec.num_layers * spec.ple_dim * s


def checkpoint_dtype(raw_config: dict) -> str | None:
    """The float dtype a Hugging Face `config.json` says its weights are in.

    >>> checkpoint_dtype({"text_config": {"dtype": "bfloat16"}})
    'bfloat16'
    """
    text = raw_config.get("text_config") or {}
    for cfg in (text, raw_config):
        for key in ("dtype", "torch_dtype"):
            if cfg.get(key) in _DTYPE_BYTES:
                return cfg[key]
    return None


# The process with nothing loaded yet: Python, JAX, TensorFlow (KerasHub's
# tokenizers), the tokenizer and the prepared data [bytes]; read off
# `benchmarks/real_size_cli.py` (docs/real_size.md), as are the two below.
PROCESS_BYTES = int(1.0 * GIB)
# What XLA holds besides the step's buffers on a CPU while `train` compiles
# and runs its step, then compiles and runs generation for the run's
# evaluation (compilers, executables); `evaluate` alike [bytes].
XLA_CPU_BYTES = int(2.0 * GIB)
# Loading beyond the finished model: read buffers, quantisation temporaries,
# the in-place fill of the tables [bytes].
LOAD_BYTES = int(1.0 * GIB)
# A streamed HF export holds one tensor at a time (`model/safetensors_io.py`):
# the largest merged kernel, read, merged in float32 and written [copies].
EXPORT_IN_FLIGHT = 4


def host_bytes(
    spec: ModelSpec,
    base: dict,
    dev: dict,
    *,
    host_table: int,
    st: int,
    on_cpu: bool,
    adapter_weights: int,
) -> dict[str, int]:
    """Peak resident memory of each command on the host it runs on [bytes].

    load        process + the base as stored (on a CPU all of it; with an
                accelerator only the PLE table kept on the host) + what
                loading holds in flight (`LOAD_BYTES`)
    train       on a CPU the host is the device: process + the step's
                device total + XLA's own (`XLA_CPU_BYTES`, which covers the
                run's own evaluation too); with an accelerator: process +
                the host PLE table
    evaluate    train's model without the optimiser and the backward pass:
                process + base + adapters (+ XLA's own on a CPU)
    export_peft process + the adapter's float32 factors
    export_hf   process + one tensor in flight (the largest kernel, merged in
                float32; tables pass through in blocks)
    """
    stored = base["total"] + host_table if on_cpu else host_table
    device = dev["total"] + host_table + XLA_CPU_BYTES if on_cpu else 0
    largest = max((a * b for a, b in _projections(spec)), default=0) * 4
    return {
        "load": PROCESS_BYTES + stored + LOAD_BYTES,
        "train": PROCESS_BYTES + (device if on_cpu else host_table),
        "evaluate": PROCESS_BYTES
        + (stored + adapter_weights + XLA_CPU_BYTES if on_cpu else host_table),
        "export_peft": PROCESS_BYTES + adapter_weights,
        "export_hf": PROCESS_BYTES + EXPORT_IN_FLIGHT * largest,
    }


def host_memory_available() -> int | None:
    """`MemAvailable` of /proc/meminfo [bytes]; None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def fits(total: float, memory: float) -> bool:
    """Whether `total` bytes fit a device of `memory` bytes (with headroom)."""
    return total <= USABLE_FRACTION * memory


# ----------------------------------------------------------------------------
# The plan.


def moe_kernel(config, target: tuple | None, model_devices: int) -> str:
    """The MoE kernel a run of `config` uses on the planned device (`target`,
    an `accelerator()`; None: this machine) with the banks split over
    `model_devices` devices (more than one: dense, `moe.kernel`; a data
    mesh routes each device's tokens): ragged | blocks | dense."""
    if target is None:
        backend = jax.default_backend()
    else:
        backend = "tpu" if target[0].startswith("v5") else "gpu"
    nf4 = config.quant.mode == "nf4"
    return moe.kernel(str(config.model.moe_dispatch), nf4, backend, model_devices > 1)


# ----------------------------------------------------------------------------
# The frozen vision / audio towers (`model.towers`, `hub.load_towers`).

# float32: KerasHub builds the vision encoder in float32 whatever its dtype.
TOWER_BYTES = 4
# The vision pass's temporaries, float32 [heads, patches, patches] tensors
# kept at once (scores, probabilities, ...: 3.0 in XLA's memory_analysis of
# the tower at widths 32-768) beside [patches, intermediate] ones.
_TOWER_ATTN_F32 = 3


def vision_params(vision: dict, text_hidden: int) -> int:
    """Parameters of KerasHub's `Gemma4VisionEncoder` (its projection included)."""
    h, i = vision["hidden_size"], vision["intermediate_size"]
    heads = vision["num_attention_heads"]
    kv = vision.get("num_key_value_heads") or heads
    d = vision.get("head_dim", 64)
    clips = 7 * 4 if vision.get("use_clipped_linears", True) else 0  # per linear
    layer = 4 * h + (2 * heads + 2 * kv) * h * d + 2 * d + 3 * h * i + clips
    return (
        2 * vision.get("position_embedding_size", 10240) * h
        + 3 * vision["patch_size"] ** 2 * h
        + vision["num_hidden_layers"] * layer
        + h * text_hidden
        + (2 * h if vision.get("standardize") else 0)
    )


def audio_params(audio: dict, text_hidden: int) -> int:
    """Parameters of KerasHub's `Gemma4AudioEncoder` (its projection included)."""
    a, heads = audio["hidden_size"], audio["num_attention_heads"]
    c0, c1 = audio["subsampling_conv_channels"]
    out = audio["output_proj_dims"]
    mel = media.PROCESSOR.feature_size
    # Two 3x3 convolutions (+ norms), the input projection of the pooled mel
    # bins, the output projection (+ bias) and the one into the text width.
    head = 9 * c0 + c0 + 9 * c0 * c1 + c1 + mel // 4 * c1 * a
    head += a * out + out + out * text_hidden
    # Per conformer layer: 9 norms, per-dim scale, two 4x FFNs (16 a^2),
    # q/k/v/out/position projections (5 a^2), the light conv (3 a^2 and
    # its depthwise kernel), 10 clipped linears x 4 bounds.
    layer = 9 * a + a // heads + 24 * a * a + audio["conv_kernel_size"] * a + 40
    return head + audio["num_hidden_layers"] * layer


def vision_temp_bytes(vision: dict, processor=media.PROCESSOR) -> int:
    """Peak temporaries of the vision tower over one image [bytes].

    The tower runs once per image (`hub.Towers.image_soft_tokens`), over the
    processor's `max_patches` (280 soft tokens x 3 x 3 = 2,520 patches by
    default), with no backward pass: its temporaries are freed before the
    decoder runs.
    """
    n = processor.max_patches
    heads = vision["num_attention_heads"]
    return TOWER_BYTES * (
        _TOWER_ATTN_F32 * heads * n * n + n * vision["intermediate_size"]
    )


def tower_bytes(
    raw: dict, kinds, batch: int, images_per_row: int, processor=media.PROCESSOR
) -> dict:
    """The towers of `kinds` of checkpoint config `raw`, for a micro-batch.

    Returns {kinds, params {vision, audio} [count], weights [bytes],
    soft_tokens_per_image, images_per_row, soft_tokens [bytes: the merged
    outputs of the batch's images], temp [bytes: one vision pass]}.
    """
    text_hidden = hub.model_spec(raw).hidden_dim
    params = {}
    if "image" in kinds and raw.get("vision_config"):
        params["vision"] = vision_params(raw["vision_config"], text_hidden)
    if "audio" in kinds and raw.get("audio_config"):
        params["audio"] = audio_params(raw["audio_config"], text_hidden)
    vision = "vision" in params
    per_image = processor.max_soft_tokens if vision else 0
    images = batch * images_per_row if vision else 0
    return {
        "kinds": sorted(kinds),
        "params": params,
        "weights": TOWER_BYTES * sum(params.values()),
        "soft_tokens_per_image": per_image,
        "images_per_row": images_per_row if vision else 0,
        "soft_tokens": TOWER_BYTES * images * per_image * text_hidden,
        "temp": vision_temp_bytes(raw["vision_config"], processor) if vision else 0,
    }


def _planned_tower_kinds(config, towers, raw: dict) -> tuple[str, ...]:
    """`towers`, or those the run would attach (`presets.tower_kinds`).

    With `model.towers=auto` the data decides (read only when checkpoint
    config `raw` has a tower); data that cannot be read yet counts as text
    only (`data check` names what is wrong with it).
    """
    if towers is not None:
        return tuple(towers)
    if not any(raw.get(field) for field in hub.TOWER_FIELDS.values()):
        return ()

    def data_kinds() -> set[str]:
        try:
            settings = config_lib.data_settings(config.data)
            train, holdout, _, _ = data_commands.read_and_split(settings)
        except (OSError, ValueError):  # missing or bad data: `data check`'s job
            return set()
        return data_commands.media_kinds(train + holdout)

    return presets.tower_kinds(config.model, data_kinds, str(config.model.preset))


def plan(
    config,
    tflops: float = 100.0,
    mfu: float = 0.4,
    *,
    devices: int | None = None,
    accelerator_name: str | None = None,
    towers: Sequence[str] | None = None,
    images_per_row: int = 1,
) -> dict:
    """Memory and speed estimate of a run, from its config alone.

    Args:
      config: the run's ConfigDict (`config_lib.get_config`).
      tflops: the accelerator's dense rating in the compute dtype [TFLOP/s].
      mfu: assumed model FLOP utilisation, in (0, 1].
      devices: devices the run uses (default: the accelerator's count, e.g.
        8 for `v5e-8`, else `distribution.model_parallel` under mode=model,
        else 1); with `config.distribution` they give the mesh.
      accelerator_name: a key of `ACCELERATORS` (optionally `2xt4`,
        `v5e-8`): the device whose memory the per-device total must fit.
      towers: the towers the run attaches ("image", "audio"); default: as
        the run decides (`model.towers`; auto reads the data's part types).
      images_per_row: images in each row of a micro-batch (each becomes the
        processor's `max_soft_tokens` soft tokens inside `data.max_length`).

    Returns:
      A JSON-serialisable dict: `model`, `params` [count], `base_bytes`,
      `adapter_params` [count], `adapter_bytes`, `activation_bytes`,
      `loss_temp_bytes`, `total_bytes` [bytes] (one device holding it all),
      `mesh`, `per_device` [bytes], `fits` {accelerator: bool},
      `accelerator` (the named one, or None), `towers` (`tower_bytes`),
      `flops_per_step` [FLOP],
      `seconds_per_step`, `tokens_per_second`, `steps`, `hours`.

    Example:
      >>> cfg = config_lib.get_config("tiny", "qlora")
      >>> p = plan(cfg)
      >>> p["total_bytes"] > p["base_bytes"]["total"]
      True
    """
    if not 0 < mfu <= 1:
        raise config_lib.ConfigError(f"--mfu={mfu} must be in (0, 1]")
    if tflops <= 0:
        raise config_lib.ConfigError(f"--tflops={tflops} must be > 0 (TFLOP/s)")
    raw = presets.read_config_json(config.model.preset)
    kw = hub.backbone_kwargs(raw)
    spec = hub.spec_from_config(kw)
    lora = LoraSpec.from_config(config.lora)
    target = accelerator(accelerator_name) if accelerator_name else None
    dtype = presets.compute_dtype(config.model)
    if target is not None and config.model.dtype == "auto":
        dtype = "bfloat16"  # `auto` on the named accelerator, not on this host
    s = _DTYPE_BYTES[dtype]
    # Frozen weights keep their storage dtype (`layers.storage_dtype`): never
    # wider than the checkpoint's.
    st = min(s, _DTYPE_BYTES.get(checkpoint_dtype(raw), s))
    t = config.train
    batch, seq, accum = (
        int(t.batch_size),
        int(config.data.max_length),
        int(t.grad_accum),
    )
    chunk = int(config.model.loss_chunk_size)
    quant = {
        "mode": config.quant.mode,
        "double_quant": bool(config.quant.double_quant),
        "block_size": int(config.quant.block_size),
        "embedding": str(config.quant.embedding),
    }
    n_adapter = adapter_params(spec, lora)
    attn_chunk = attention_chunk(config.model)
    if devices is None:
        devices = max(
            target[3] if target else 1,
            int(config.distribution.model_parallel)
            if config.distribution.mode == "model"
            else 1,
        )
    mesh = device_mesh(config.distribution, int(devices))
    how = moe_kernel(config, target, mesh["model"])
    moe_chunk = int(config.model.moe_token_chunk)
    act = activation_bytes(spec, lora, batch, seq, s, attn_chunk, how, moe_chunk)
    base = base_bytes(spec, quant, st)
    adapters = adapter_bytes(n_adapter, accum)
    loss = loss_temp_bytes(
        spec, batch * seq, chunk, split=st < s, int8=_int8_loss(quant), s=s
    )
    act_used = act["remat_peak"] if config.model.remat else act["no_remat_saved"]
    tokens = batch * accum * seq
    flops = step_flops(spec, lora, tokens, seq, attn_chunk, how, batch * seq, moe_chunk)
    sec = flops["total"] / (tflops * 1e12 * mfu)
    steps = optimizer_steps(config)
    dev = per_device_bytes(
        spec, lora, quant, s, mesh, batch=batch, seq=seq,
        grad_accum=accum, chunk=chunk, remat=bool(config.model.remat), attn_chunk=attn_chunk,
        storage=st, moe_kernel=how, moe_chunk=moe_chunk,
    )  # fmt: skip
    kinds = _planned_tower_kinds(config, towers, raw)
    tw = tower_bytes(raw, kinds, batch // mesh["data"], images_per_row)
    if kinds:
        # Tower weights are replicated; the vision pass's temporaries are
        # freed before the decoder runs, so only what exceeds the decoder's
        # activations and loss chunk adds to the peak.
        dev = {**dev, "towers": tw["weights"] + tw["soft_tokens"]}
        dev["tower_temp"] = max(0, tw["temp"] - dev["activations"] - dev["loss_temp"])
        dev["total"] += dev["towers"] + dev["tower_temp"]
    host_table = ple_host_bytes(config, spec, st, mesh)
    if host_table:  # `model.ple_on_host`: in host memory, off the device
        base = {**base, "embedding": base["embedding"] - host_table}
        base["total"] -= host_table
        dev = {**dev, "base": dev["base"] - host_table}
        dev["total"] -= host_table
    host = host_bytes(
        spec, base, dev, host_table=host_table, st=st,
        on_cpu=target is None and jax.default_backend() == "cpu",
        adapter_weights=adapters["weights"],
    )  # fmt: skip
    return {
        "model": {
            "preset": str(config.model.preset),
            "layers": spec.num_layers,
            "hidden_dim": spec.hidden_dim,
            "vocab_size": spec.vocab_size,
            "kv_shared_layers": sum(not b.has_kv for b in spec.blocks),
            "moe": spec.moe,
            "ple_dim": spec.ple_dim,
            "dtype": dtype,
        },
        "run": {
            "quant": quant,
            "lora_rank": lora.rank,
            "batch_size": batch,
            "grad_accum": accum,
            "max_length": seq,
            "remat": bool(config.model.remat),
            # model.moe_dispatch and the kernel it runs on the planned device
            "moe_dispatch": str(config.model.moe_dispatch),
            "moe_kernel": how if spec.moe else None,
            "moe_token_chunk": moe_chunk,
            "tflops": tflops,
            "mfu": mfu,
        },
        "params": param_counts(spec),
        "base_bytes": base,
        "host_ple_table_bytes": host_table,
        "host_bytes": host,
        "adapter_params": n_adapter,
        "adapter_bytes": adapters,
        "activation_bytes": act,
        "loss_temp_bytes": loss,
        "total_bytes": base["total"]
        + adapters["total"]
        + act_used
        + loss
        + dev.get("towers", 0)
        + dev.get("tower_temp", 0),
        "towers": tw,
        "mesh": mesh,
        "per_device": dev,
        "fits": {k: fits(dev["total"], a[1]) for k, a in ACCELERATORS.items()},
        "accelerator": None
        if target is None
        else {
            "name": target[0],
            "what": target[1],
            "memory": target[2],
            "devices": target[3],
            "fits": fits(dev["total"], target[2]),
        },
        "flops_per_step": flops,
        "seconds_per_step": sec,
        "tokens_per_second": tokens / sec,
        "steps": steps,
        "hours": None if steps is None else steps * sec / 3600,
    }


def _gib(n: float) -> str:
    """GiB, or MiB below 1 GiB so small models do not print zeros."""
    if n < GIB:
        return f"{n / 1024**2:8.2f} MiB"
    return f"{n / GIB:8.2f} GiB"


def _why_not(dev: dict, run: dict) -> str:
    """The two largest parts of a per-device total and what shrinks each."""
    fixes = {
        "base": "more --config.distribution.model_parallel (mode=model)"
        + ("" if run["quant"]["mode"] == "nf4" else " or --config.quant.mode=nf4")
        + (
            ""
            if run["quant"].get("embedding") == "int8"
            else " or --config.quant.embedding=int8 (an int8 LM head)"
        ),
        "activations": ("" if run["remat"] else "--config.model.remat=True, ")
        + (
            "--config.model.moe_token_chunk=1024, "
            if run["moe_kernel"] not in (None, "dense") and not run["moe_token_chunk"]
            else ""
        )
        + "a smaller --config.data.max_length or --config.train.batch_size "
        "(raise grad_accum to keep the batch)",
        "loss_temp": "a smaller --config.model.loss_chunk_size",
        "adapter_state": "a smaller --config.lora.rank",
        "adapters": "a smaller --config.lora.rank",
        "towers": "only the towers the data needs (--config.model.towers=auto)",
        "tower_temp": "images at fewer soft tokens (the processor's max_soft_tokens)",
    }
    parts = sorted(
        ((k, v) for k, v in dev.items() if k != "total"), key=lambda kv: -kv[1]
    )[:2]
    return "; ".join(f"{k} {_gib(v).strip()}: {fixes[k]}" for k, v in parts)


def format_per_device(p: dict) -> list[str]:
    """The per-device lines of `format_plan`: mesh, bytes, which devices fit."""
    m, dev = p["mesh"], p["per_device"]
    lines = [
        f"memory per device on the mesh: mode={m['mode']}, {m['devices']} "
        f"device(s) = {m['data']} (batch) x {m['model']} (model)",
    ]
    lines += [f"  {k:22s}{_gib(v)}" for k, v in dev.items() if k != "total"]
    lines.append(f"  {'TOTAL per device':22s}{_gib(dev['total'])}")
    a = p["accelerator"]
    usable = f"{USABLE_FRACTION:.0%} of its memory usable"
    if a is not None:
        have = f"{a['what']} x {m['devices']}"
        if a["fits"]:
            lines.append(f"  fits {have} ({usable})")
        else:
            lines.append(
                f"  does NOT fit {have}: needs {_gib(dev['total']).strip()} per "
                f"device, has {_gib(a['memory'] * USABLE_FRACTION).strip()} "
                f"({usable}); largest: {_why_not(dev, p['run'])}"
            )
    ok = [k for k, v in p["fits"].items() if v]
    no = [k for k, v in p["fits"].items() if not v]
    lines.append(
        f"  this mesh fits ({usable}): {', '.join(ok) or 'none'}; "
        f"not: {', '.join(no) or 'none'}"
    )
    return lines


def format_plan(p: dict) -> str:
    """The plan as an aligned text table (units in every line).

    Example:
      >>> print(format_plan(plan(config_lib.get_config("tiny", "lora"))))  # doctest: +SKIP
    """
    m, r = p["model"], p["run"]
    q = r["quant"]
    lines = [
        f"model  {m['preset']}: {m['layers']} layers, d={m['hidden_dim']}, "
        f"vocab {m['vocab_size']}, {m['kv_shared_layers']} KV-shared, "
        f"moe={m['moe']}, ple={m['ple_dim']}, {m['dtype']}",
        f"run    quant={q['mode']}{' +dq' if q['double_quant'] and q['mode'] == 'nf4' else ''}"
        f"{', int8 embedding' if q.get('embedding') == 'int8' else ''}, "
        f"rank {r['lora_rank']}, batch {r['batch_size']} x accum {r['grad_accum']} "
        f"x {r['max_length']} tokens, remat={r['remat']}"
        + (
            f", moe_dispatch={r['moe_dispatch']} ({r['moe_kernel']} experts"
            + (
                f", {r['moe_token_chunk']}-token chunks"
                if r["moe_token_chunk"] and r["moe_kernel"] != "dense"
                else ""
            )
            + ")"
            if m["moe"]
            else ""
        ),
        "parameters [count]",
    ]
    lines += [f"  {k:22s} {v:>16,}" for k, v in p["params"].items()]
    lines.append(f"  {'lora adapters':22s} {p['adapter_params']:>16,}")
    lines.append("memory of the whole run on one device")
    lines += [f"  base {k:17s} {_gib(v)}" for k, v in p["base_bytes"].items()]
    if p["host_ple_table_bytes"]:
        lines.append(
            f"  (PLE table in host RAM {_gib(p['host_ple_table_bytes']).strip()}: "
            "model.ple_on_host; not counted on the device)"
        )
    lines += [f"  adapter {k:14s} {_gib(v)}" for k, v in p["adapter_bytes"].items()]
    act = p["activation_bytes"]
    tw = p["towers"]
    if tw["kinds"]:
        params = ", ".join(f"{k} {v:,}" for k, v in tw["params"].items())
        lines += [
            f"  towers ({params} params, float32) {_gib(tw['weights']).strip()}",
            f"  images: {tw['images_per_row']} per row x "
            f"{tw['soft_tokens_per_image']} soft tokens (inside max_length); "
            f"vision pass temporaries {_gib(tw['temp']).strip()} per image",
        ]
    lines += [
        f"  activations no remat  {_gib(act['no_remat_saved'])}",
        f"  activations remat     {_gib(act['remat_peak'])} (peak; "
        f"{_gib(act['remat_saved']).strip()} kept for backward)",
        f"  loss temp             {_gib(p['loss_temp_bytes'])}",
        f"  TOTAL                 {_gib(p['total_bytes'])}",
    ]
    lines += format_per_device(p)
    lines.append("host memory (RAM) per command on this machine, peak")
    lines += [f"  {k:22s}{_gib(v)}" for k, v in p["host_bytes"].items()]
    lines.append("compute per optimiser step")
    lines += [
        f"  {k:22s} {v / 1e12:12.2f} TFLOP" for k, v in p["flops_per_step"].items()
    ]
    lines += [
        f"  at {r['tflops']:g} TFLOP/s x MFU {r['mfu']:g}: "
        f"{p['seconds_per_step']:.3f} s/step, {p['tokens_per_second']:,.0f} tokens/s",
    ]
    if p["steps"] is not None:
        lines.append(f"  {p['steps']:,} optimiser steps = {p['hours']:.2f} h")
    return "\n".join(lines)


__all__ = ["ACCELERATORS", "format_plan", "plan", "training_variables"]
