"""Routed vs dense MoE dispatch (`model/moe.py`): XLA's count, then wall clock.

Run:
    python benchmarks/moe_dispatch.py                        # both parts
    python benchmarks/moe_dispatch.py --part=xla --tokens=4096 --layers=3
    python benchmarks/moe_dispatch.py --part=speed --rounds=5

(a) `--part=xla`: MoE layers at 26B-A4B's real widths (128 experts, d 2816,
    f 704, top 8), NF4 double-quant banks (QLoRA), bfloat16 activations,
    `--layers` of them chained as residual blocks over `--tokens` tokens, the
    gradient of a loss w.r.t. the input (forward + backward, what a LoRA step
    runs through a frozen MoE) compiled on this CPU without running:

    * `memory_analysis()` (temporaries; arguments are the NF4 banks) of the
      routed (`blocks`, the CPU fallback) and the dense step;
    * `cost_analysis()` flops of ONE layer, routed with its blocks unrolled
      (`moe.UNROLL_BLOCKS`: XLA counts a loop's body once) and dense, next to
      the active expert FLOPs 4 * T * k * 3 * d * f (forward + input
      gradient of the k chosen experts) and `plan`'s expert FLOPs; with
      `--float_flops` also routed over bfloat16 banks, which leaves out the
      NF4 dequantisation (XLA counts its 16-level lookup as a one-hot
      product, ~38 FLOP per weight, once per block in each pass). The FLOPs
      are counted with XLA's `fusion` pass off: XLA:CPU's count of a fused
      computation charges an operand broadcast into it once per use (the
      routed step read 1.72x active fused, 1.30x unfused, for the same HLO
      before fusion); `--fused_flops` counts the fused step instead.

(b) `--part=speed`: tokens/s of routed (`blocks`) and dense compute of the
    same step at a reduced MoE shape (`--experts`, `--width`, `--expert_dim`,
    `--top_k`, `--speed_tokens`, float32 banks), the two timed in interleaved
    rounds (each once per round), best and median of `--rounds`.

Prints one JSON object; `docs/real_size.md` keeps the figures measured here.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
os.environ.setdefault("KERAS_BACKEND", "jax")

import gemma4_keras  # noqa: E402,F401  (selects the JAX backend before keras loads)

GIB = 1024**3


def layer_specs(e: int, d: int, f: int, nf4: bool):
    """Abstract (shape-only) weights of one MoE layer."""
    import jax
    import jax.numpy as jnp

    from gemma4_keras.model import quant

    def bank(shape):
        if not nf4:
            return jax.ShapeDtypeStruct(shape, jnp.bfloat16)
        leaves = quant.nf4_leaf_specs(shape, 64, double_quant=True, batch_dims=1)
        return quant.NF4Weight(
            **{k: jax.ShapeDtypeStruct(s, dt) for k, (s, dt) in leaves.items()},
            shape=shape,
            block_size=64,
            dtype="bfloat16",
            batch_dims=1,
        )

    return {
        "router_scale": jax.ShapeDtypeStruct((d,), jnp.float32),
        "router_proj": jax.ShapeDtypeStruct((d, e), jnp.bfloat16),
        "expert_scale": jax.ShapeDtypeStruct((e,), jnp.float32),
        "banks": {
            "experts_gate": bank((e, d, f)),
            "experts_up": bank((e, d, f)),
            "experts_down": bank((e, f, d)),
        },
    }


def moe_layer(x, p, top_k: int, dispatch: str):
    """One MoE path as `DecoderBlock._moe` runs it (norms without scales)."""
    import jax
    import jax.numpy as jnp

    from gemma4_keras.model import moe

    xf = x.astype(jnp.float32)
    normed = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + 1e-6)).astype(
        x.dtype
    )
    top_p, top_i = moe.route(normed, p["router_scale"], p["router_proj"], top_k)
    y = moe.experts(normed, top_p, top_i, p["banks"], p["expert_scale"], dispatch)
    return x + y


def step(layers: int, top_k: int, dispatch: str):
    """grad of sum(layers(x)) w.r.t. x, the layers' weights as arguments."""
    import jax
    import jax.numpy as jnp

    def loss(x, params):
        for p in params:
            x = moe_layer(x, p, top_k, dispatch)
        return x.astype(jnp.float32).sum()

    return jax.jit(jax.grad(loss))


def xla_part(args) -> dict:
    import jax
    import jax.numpy as jnp

    from gemma4_keras.model import moe

    e, d, f, k, t = 128, 2816, 704, 8, args.tokens
    x = jax.ShapeDtypeStruct((t, d), jnp.dtype(args.dtype))
    out = {"tokens": t, "layers": args.layers, "experts": e, "width": d,
           "expert_dim": f, "top_k": k, "bank": "nf4 double quant",
           "dtype": args.dtype}  # fmt: skip
    params = [layer_specs(e, d, f, nf4=True) for _ in range(args.layers)]
    for dispatch in ("blocks", "dense"):
        start = time.time()
        mem = step(args.layers, k, dispatch).lower(x, params).compile()
        mem = mem.memory_analysis()
        out[f"{dispatch}_memory"] = {
            "temp_gib": mem.temp_size_in_bytes / GIB,
            "argument_gib": mem.argument_size_in_bytes / GIB,
            "compile_s": round(time.time() - start, 1),
        }
        print(json.dumps({dispatch: out[f"{dispatch}_memory"]}), file=sys.stderr)
    active = 4 * t * k * 3 * d * f
    out["active_expert_flops"] = active
    out["expert_rows"] = {
        how: moe.expert_rows(t, k, e, how) for how in ("ragged", "blocks", "dense")
    }
    if args.memory_only:
        return out
    runs = [("blocks", "nf4"), ("dense", "nf4")] + (
        [("blocks", "bfloat16")] if args.float_flops else []
    )
    for dispatch, bank in runs:
        moe.UNROLL_BLOCKS = dispatch == "blocks"
        one = [layer_specs(e, d, f, nf4=bank == "nf4")]
        start = time.time()
        options = {} if args.fused_flops else {"xla_disable_hlo_passes": "fusion"}
        compiled = step(1, k, dispatch).lower(x, one).compile(options)
        flops = compiled.cost_analysis()["flops"]
        moe.UNROLL_BLOCKS = False
        key = f"{dispatch}_{bank}_one_layer"
        out[key] = {
            "flops": flops,
            "vs_active": flops / active,
            "plan_expert_flops": 4 * out["expert_rows"][dispatch] * 3 * d * f,
            "compile_s": round(time.time() - start, 1),
        }
        print(json.dumps({key: out[key]}), file=sys.stderr)
    return out


def speed_part(args) -> dict:
    import jax
    import numpy as np

    e, d, f, k = args.experts, args.width, args.expert_dim, args.top_k
    t = args.speed_tokens
    r = np.random.default_rng(0)
    p = {
        "router_scale": np.ones(d, np.float32),
        "router_proj": r.standard_normal((d, e)).astype(np.float32),
        "expert_scale": np.ones(e, np.float32),
        "banks": {
            "experts_gate": r.normal(0, d**-0.5, (e, d, f)).astype(np.float32),
            "experts_up": r.normal(0, d**-0.5, (e, d, f)).astype(np.float32),
            "experts_down": r.normal(0, f**-0.5, (e, f, d)).astype(np.float32),
        },
    }
    params = [jax.device_put(p)]
    x = jax.device_put(r.standard_normal((t, d)).astype(np.float32))
    fns = {how: step(1, k, how) for how in ("blocks", "dense")}
    results = {how: fn(x, params) for how, fn in fns.items()}  # compile, warm up
    diff = np.abs(np.asarray(results["blocks"]) - np.asarray(results["dense"])).max()
    times = {how: [] for how in fns}
    for _ in range(args.rounds):
        for how, fn in fns.items():
            start = time.perf_counter()
            fn(x, params).block_until_ready()
            times[how].append(time.perf_counter() - start)
    out = {"experts": e, "width": d, "expert_dim": f, "top_k": k, "tokens": t,
           "rounds": args.rounds,
           "max_abs_grad_difference": float(diff)}  # fmt: skip
    for how, ts in times.items():
        out[how] = {
            "best_s": min(ts),
            "median_s": float(np.median(ts)),
            "tokens_per_s_median": t / float(np.median(ts)),
        }
    out["routed_speedup_median"] = out["dense"]["median_s"] / out["blocks"]["median_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="both", choices=["xla", "speed", "both"])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16", help="activations (a)")
    parser.add_argument("--memory_only", action="store_true", help="(a) without FLOPs")
    parser.add_argument(
        "--float_flops",
        action="store_true",
        help="also count one routed layer with bfloat16 banks (no NF4 "
        "dequantisation): the expert matmuls alone",
    )
    parser.add_argument(
        "--fused_flops",
        action="store_true",
        help="count FLOPs of the fused step (XLA:CPU over-counts operands "
        "broadcast into a fusion); default: with the fusion pass off",
    )
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--expert_dim", type=int, default=256)
    parser.add_argument("--top_k", type=int, default=4)
    parser.add_argument("--speed_tokens", type=int, default=1024)
    args = parser.parse_args()
    result = {}
    if args.part in ("xla", "both"):
        result["xla"] = xla_part(args)
    if args.part in ("speed", "both"):
        result["speed"] = speed_part(args)
    print(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    main()
