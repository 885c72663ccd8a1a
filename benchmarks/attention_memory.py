"""XLA's memory and FLOPs of one layer's attention: dense vs chunked.

Run:
    python benchmarks/attention_memory.py                     # 31B, 8k tokens
    python benchmarks/attention_memory.py --size e4b --seq 4096 --chunks 256 1024

For a sliding and a global layer of the released config of `--size` (head
counts, head widths, window), it lowers `jit(value_and_grad)` of that
layer's attention (q [B, T, heads, head_dim], k and v [B, T, kv_heads,
head_dim] -> [B, T, heads * head_dim], gradients for q, k and v) from
`jax.ShapeDtypeStruct`s: nothing is allocated. It prints XLA's own
`memory_analysis()` (arguments, outputs, temporaries) and `cost_analysis()`
FLOPs for `model.attention=dense` and for `chunked` at each chunk size.
The rest of the layer (projections, MLP) is the same under both, so the
difference is the layer's difference. Figures depend on the backend (CPU
here unless a GPU/TPU is visible); XLA counts a loop body's FLOPs once,
so chunked FLOPs are printed times the number of chunks.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gemma4_keras.model import attention, hub  # noqa: E402
from gemma4_keras.testing import full_size  # noqa: E402

GIB = 1024**3


def layer_specs(size: str):
    """(sliding BlockSpec, global BlockSpec) of a released config."""
    spec = hub.spec_from_config(hub.backbone_kwargs(full_size.released_config(size)))
    sliding = next(b for b in spec.blocks if b.sliding_window is not None)
    full = next(b for b in spec.blocks if b.sliding_window is None)
    return sliding, full


def compile_step(b, impl: str, chunk: int, batch: int, seq: int, dtype):
    """Compiles value_and_grad of one layer's attention (abstract inputs)."""
    seg = jnp.ones((batch, seq), jnp.int32)

    def step(q, k, v, w):
        def objective(q, k, v):
            out = attention.attend(
                q, k, v, seg, b.sliding_window, b.attn_soft_cap, impl, chunk
            )
            return jnp.sum(out.astype(jnp.float32) * w)

        return jax.value_and_grad(objective, argnums=(0, 1, 2))(q, k, v)

    q = jax.ShapeDtypeStruct((batch, seq, b.num_heads, b.head_dim), dtype)
    kv = jax.ShapeDtypeStruct((batch, seq, b.num_kv_heads, b.head_dim), dtype)
    w = jax.ShapeDtypeStruct((batch, seq, 1), jnp.float32)
    return jax.jit(step).lower(q, kv, kv, w).compile()


def measure(b, impl, chunk, batch, seq, dtype) -> dict:
    start = time.perf_counter()
    compiled = compile_step(b, impl, chunk, batch, seq, dtype)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    trips = -(-seq // min(chunk, seq)) if impl == "chunked" else 1
    return {
        "args": mem.argument_size_in_bytes,
        "out": mem.output_size_in_bytes,
        "temp": mem.temp_size_in_bytes,
        "flops": cost["flops"] * trips,
        "compile_s": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="31b", choices=full_size.SIZES)
    parser.add_argument("--seq", type=int, default=8192, help="tokens per row")
    parser.add_argument("--batch", type=int, default=1, help="rows")
    parser.add_argument("--dtype", default="bfloat16", help="q/k/v dtype")
    parser.add_argument(
        "--chunks", type=int, nargs="+", default=[512, 1024], help="query chunks"
    )
    args = parser.parse_args()
    print(
        f"{args.size} attention, batch {args.batch} x {args.seq} tokens, "
        f"{args.dtype} q/k/v, backend {jax.default_backend()}; GiB; value+grad"
    )
    print(f"{'layer':<28} {'impl':<14} {'args':>6} {'temp':>7} {'TFLOP':>7}")
    for b in layer_specs(args.size):
        kind = f"window {b.sliding_window}" if b.sliding_window else "global"
        name = f"{kind}, {b.num_heads}q/{b.num_kv_heads}kv x {b.head_dim}"
        runs = [("dense", args.seq)] + [("chunked", c) for c in args.chunks]
        for impl, chunk in runs:
            m = measure(b, impl, chunk, args.batch, args.seq, args.dtype)
            label = impl if impl == "dense" else f"chunked {chunk}"
            print(
                f"{name:<28} {label:<14} {m['args'] / GIB:6.3f} "
                f"{m['temp'] / GIB:7.3f} {m['flops'] / 1e12:7.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
