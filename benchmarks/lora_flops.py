"""Compiled FLOPs of one LoRA train step: ours vs KerasHub's `enable_lora`.

Run:
  python benchmarks/lora_flops.py                # 4 layers, d=1024, seq 512
  python benchmarks/lora_flops.py --layers 8

Both steps compute loss + gradients w.r.t. the trainable variables only, with
the same chunked cross-entropy over the tied embedding, and are compiled with
`jax.jit(...).lower(...).compile()`; `cost_analysis()["flops"]` is XLA's count.

(a) `Gemma4LoraModel`, rank-r adapters on all seven projections: the frozen
    base never needs a weight gradient, so each frozen matmul costs 4 x params
    x tokens (forward + input gradient).
(b) KerasHub: `backbone.enable_lora(r, all seven projections)`. Keras' float
    `EinsumDense` LoRA adds A@B into the kernel on every call, so backprop
    builds the full kernel gradient first: about 6 x params x tokens.

XLA counts a while-loop body once, and the chunked loss is a `lax.scan` over
token chunks: the loss `chunk_size` is set to the token count, so the scan
has exactly one iteration and the count is the true total.

Analytic count for (a), T tokens, per layer with projections of P_l params,
H query heads of width h, LoRA sites (in_s, out_s):
  frozen matmuls     4 * T * sum_l P_l          (fwd 2PT + input grad 2PT)
  adapters           6 * T * r * sum_s (in_s + out_s)
                     (fwd 2Tr(in+out); bwd dA, dB and dx: 4Tr(in+out))
  attention          3 * 4 * T^2 * H * h per layer
                     (QK^T and PV, 2T^2Hh each, full square; bwd = 2 x fwd)
  LM head            4 * T * V * d
                     (fwd logits + d_hidden, both formed in the loss's
                     forward pass; no embedding gradient. Any number of
                     chunks pays this; see docs/performance.md.)
Element-wise work (norms, RoPE, softmax, GELU) is left out.

Measured (4 layers, rank 16, 1 x 512 tokens, jax 0.10.2 CPU):
  analytic 210.49 GFLOP; ours 210.54 (1.000 x); KerasHub 273.81 (1.301 x ours).
  The difference, 63 GFLOP, is KerasHub's full kernel gradients
  (2 * T * sum P = 62.3 GFLOP) plus forming A@B in every call.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
os.environ.setdefault("KERAS_BACKEND", "jax")  # before keras is imported

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

from gemma4_keras.model import hub, loss  # noqa: E402
from gemma4_keras.model.gemma4_lora_model import Gemma4LoraModel  # noqa: E402
from gemma4_keras.model.lora import LoraSpec  # noqa: E402
from gemma4_keras.model.spec import ALL_TARGETS, ModelSpec  # noqa: E402

KERAS_HUB_TARGETS = [
    "query",
    "key",
    "value",
    "attention_output",
    "ffw_gating",
    "ffw_gating_2",
    "ffw_linear",
]


def build_backbone(
    layers: int = 4,
    hidden: int = 1024,
    ffn: int = 4096,
    heads: int = 8,
    kv_heads: int = 2,
    head_dim: int = 128,
    vocab: int = 32768,
    window: int = 512,
    seed: int = 0,
) -> keras_hub.models.Gemma4Backbone:
    """A randomly initialised text-only Gemma 4 backbone (float32)."""
    keras.utils.set_random_seed(seed)
    return keras_hub.models.Gemma4Backbone(
        vocabulary_size=vocab,
        image_size=None,
        num_layers=layers,
        num_query_heads=heads,
        num_key_value_heads=kv_heads,
        hidden_dim=hidden,
        intermediate_dim=ffn,
        head_dim=head_dim,
        global_head_dim=head_dim,
        final_logit_soft_cap=30.0,
        sliding_window_size=window,
        sliding_window_pattern=2,
        global_rope_partial_rotary_factor=0.25,
        dtype="float32",
    )


def _batch(batch: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "token_ids": rng.integers(4, vocab, (batch, seq)).astype(np.int32),
        "targets": rng.integers(4, vocab, (batch, seq)).astype(np.int32),
        "weights": np.ones((batch, seq), np.float32),
        "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
    }


def _loss(hidden, embedding, data, soft_cap):
    total, count = loss.chunked_cross_entropy(
        hidden,
        embedding,
        data["targets"],
        data["weights"],
        soft_cap=soft_cap,
        chunk_size=hidden.shape[0] * hidden.shape[1],  # one scan iteration
    )
    return total / count


def _compiled_flops(loss_fn, trainable, non_trainable, embedding, data) -> float:
    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    compiled = grad_fn.lower(trainable, non_trainable, embedding, data).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older jax returns one dict per device
        cost = cost[0]
    return float(cost["flops"])


def ours_flops(backbone, rank: int, data: dict) -> float:
    """Compiled FLOPs of our LoRA train step (adapters on all seven targets)."""
    lora = LoraSpec(rank=rank, alpha=2.0 * rank)
    model = Gemma4LoraModel.from_backbone(backbone, lora, dtype="float32")
    batch = {
        "token_ids": data["token_ids"],
        "positions": data["positions"],
        "segment_ids": np.ones_like(data["token_ids"]),
    }
    soft_cap = model.spec.final_soft_cap

    def loss_fn(trainable, non_trainable, embedding, data):
        hidden, _ = model.stateless_call(trainable, non_trainable, batch, training=True)
        return _loss(hidden, embedding, data, soft_cap)

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    embedding = model.globals["embedding"].value
    return _compiled_flops(loss_fn, trainable, non_trainable, embedding, data)


def keras_hub_flops(backbone, rank: int, data: dict) -> float:
    """Compiled FLOPs of KerasHub's own LoRA path with the same loss."""
    backbone.enable_lora(rank, target_layer_names=KERAS_HUB_TARGETS)
    inputs = {
        "token_ids": data["token_ids"],
        "padding_mask": np.ones_like(data["token_ids"]),
        "position_ids": data["positions"],
    }
    soft_cap = backbone.final_logit_soft_cap

    def loss_fn(trainable, non_trainable, embedding, data):
        hidden, _ = backbone.stateless_call(trainable, non_trainable, inputs)
        return _loss(hidden, embedding, data, soft_cap)

    trainable = [v.value for v in backbone.trainable_variables]
    non_trainable = [v.value for v in backbone.non_trainable_variables]
    embedding = backbone.get_layer("token_embedding").embeddings.value
    return _compiled_flops(loss_fn, trainable, non_trainable, embedding, data)


def analytic_flops(spec: ModelSpec, rank: int, tokens: int, seq: int) -> dict:
    """The formula of the module docstring, term by term (float FLOPs)."""
    frozen = adapter = attention = 0
    for b in spec.blocks:
        for target in ALL_TARGETS:
            if not spec.has_projection(b.index, target):
                continue
            din, dout = spec.projection_shape(b.index, target)
            frozen += 4 * tokens * din * dout
            adapter += 6 * tokens * rank * (din + dout)
        # Full square score matrix per sequence: tokens * seq pairs.
        attention += 3 * 4 * tokens * seq * b.num_heads * b.head_dim
    head = 4 * tokens * spec.vocab_size * spec.hidden_dim  # single chunk: see docstring
    terms = {
        "frozen": frozen,
        "adapter": adapter,
        "attention": attention,
        "lm_head": head,
    }
    terms["total"] = sum(terms.values())
    return terms


def compare(backbone, rank: int, batch: int, seq: int) -> dict:
    """All three counts for one backbone; `backbone` gets KerasHub LoRA enabled."""
    spec = hub.spec_from_config(backbone.get_config())
    data = _batch(batch, seq, spec.vocab_size)
    data = jax.tree.map(jnp.asarray, data)
    ours = ours_flops(backbone, rank, data)
    theirs = keras_hub_flops(backbone, rank, data)
    analytic = analytic_flops(spec, rank, batch * seq, seq)
    return {"ours": ours, "keras_hub": theirs, "analytic": analytic}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    args = p.parse_args()
    print(
        f"jax {jax.__version__}, keras {keras.__version__}, keras_hub {keras_hub.__version__}"
    )
    t0 = time.time()
    backbone = build_backbone(layers=args.layers)
    result = compare(backbone, args.rank, args.batch, args.seq)
    a = result["analytic"]
    print(
        f"config: {args.layers} layers, d=1024, ffn 4096, 8/2 heads x 128, vocab 32768, "
        f"rank {args.rank}, batch {args.batch} x seq {args.seq}, float32"
    )
    for k, v in a.items():
        print(f"  analytic {k:10s} {v / 1e9:10.3f} GFLOP")
    ours, theirs = result["ours"], result["keras_hub"]
    print(
        f"ours (Gemma4LoraModel)        {ours / 1e9:10.3f} GFLOP  "
        f"= {ours / a['total']:.3f} x analytic"
    )
    print(
        f"KerasHub enable_lora          {theirs / 1e9:10.3f} GFLOP  "
        f"= {theirs / a['total']:.3f} x analytic"
    )
    print(f"KerasHub / ours               {theirs / ours:10.3f}")
    print(f"(took {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
