"""Where a LoRA train step's work goes: XLA's count vs an analytic split by part.

Run:
    python benchmarks/step_flops.py                 # compare.py's default shape
    python benchmarks/step_flops.py --vocab 4096 --dim 128 --layers 4 --seq 128
    python benchmarks/step_flops.py --gemm          # also GEMM rates, XLA vs torch

It builds this package's training model from the same checkpoint as
`benchmarks/compare.py` (float base, then NF4 base), compiles the train step
that `fit` runs (`jax.jit(model.train_step)`, AdamW) and prints XLA's
`cost_analysis()` FLOPs next to an analytic count per part, per token:

  head/loss  the tied `[vocab, dim]` head: logits and d_hidden, 2 matmuls
             (4 V d per token); the earlier loss recomputed the logits in the
             backward pass (6 V d)
  attention  QK^T and PV over the full T x T square (XLA masks the sliding
             window, it does not skip it): 4 T H h per layer forward, x3 with
             the backward pass
  frozen     the frozen projections: forward + input gradient, 4 P per token
  LoRA       rank-r adapters on all seven projections: 6 r (in + out) per site
  NF4        the NF4 step minus the float step (dequantising the base once per
             step; elementwise, so spread over the batch's tokens)

Element-wise work (norms, RoPE, GELU, softmax, AdamW) is not in the analytic
parts; the "rest" line is XLA's total minus their sum. The loss is compiled
with one chunk (`loss_chunk_size = batch x seq`): XLA counts a loop body once,
and with the head's gradient formed in the forward pass one chunk does the
same matmuls as many.

`--gemm` times single matmuls of the head's and the MLP's shapes in float32
and bfloat16, in XLA (jax.jit) and in torch, on this CPU: whether XLA:CPU
uses the bfloat16 units (AMX / AVX512-BF16) that torch's oneDNN does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("KERAS_BACKEND", "jax")

import compare  # noqa: E402  (the shape flags and the checkpoint writer)

import gemma4_keras  # noqa: E402,F401  (selects the JAX backend before keras loads)


def analytic(spec, rank: int, batch: int, seq: int) -> dict[str, float]:
    """FLOPs of one train step by part (see the module docstring)."""
    from gemma4_keras.model.spec import ALL_TARGETS

    tokens = batch * seq
    frozen = adapter = attention = 0.0
    for b in spec.blocks:
        for target in ALL_TARGETS:
            if not spec.has_projection(b.index, target):
                continue
            din, dout = spec.projection_shape(b.index, target)
            frozen += 4.0 * tokens * din * dout
            adapter += 6.0 * tokens * rank * (din + dout)
        attention += 3 * 4.0 * tokens * seq * b.num_heads * b.head_dim
    head = 4.0 * tokens * spec.vocab_size * spec.hidden_dim
    return {"head/loss": head, "attention": attention, "frozen": frozen,
            "LoRA": adapter}  # fmt: skip


def compiled_step(args, ckpt, nf4: bool):
    """(XLA FLOPs, temp bytes, model spec) of the compiled train step."""
    import jax
    import numpy as np

    from gemma4_keras import testing
    from gemma4_keras.model import presets
    from gemma4_keras.training import train

    config = compare._ours_config(args, ckpt, nf4)
    config.model.loss_chunk_size = args.batch * args.seq
    model = presets.build_training_model(str(ckpt), presets.ModelSettings.of(config))
    plan = train.Plan(args.steps, 1, 0)
    train.compile_model(model, config.train, train.build_schedule(config.train, plan))
    model.optimizer.build(model.trainable_variables)
    state = testing.train_step_state(model)
    ids, targets = compare.batches(args, model.spec.vocab_size)[0]
    data = {
        "token_ids": ids,
        "positions": np.tile(np.arange(args.seq, dtype="int32"), (args.batch, 1)),
        "segment_ids": np.ones_like(ids),
        "target_ids": targets,
        "loss_weights": np.ones(ids.shape, "float32"),
        "loss_norm": np.full((args.batch,), float(ids.size), "float32"),
    }
    compiled = jax.jit(model.train_step).lower(state, (data,)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    temp = compiled.memory_analysis().temp_size_in_bytes
    return float(cost["flops"]), temp, model.spec


def gemm_rates(repeats: int = 3) -> list[tuple[str, str, str, float]]:
    """(shape, dtype, library, GFLOP/s) for matmuls of the step's shapes."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    shapes = {"head 2048x512 @ 512x32768": (2048, 512, 32768),
              "mlp 2048x512 @ 512x2048": (2048, 512, 2048)}  # fmt: skip
    rows = []
    rng = np.random.default_rng(0)
    for label, (m, k, n) in shapes.items():
        a = rng.normal(size=(m, k)).astype(np.float32)
        b = rng.normal(size=(k, n)).astype(np.float32)
        flops = 2.0 * m * k * n
        for dtype in ("float32", "bfloat16"):
            ja = jnp.asarray(a, dtype)
            jb = jnp.asarray(b, dtype)
            f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=x.dtype))
            f(ja, jb).block_until_ready()
            best = _best(lambda f=f, x=ja, y=jb: f(x, y).block_until_ready(), repeats)
            rows.append((label, dtype, "XLA", flops / best / 1e9))
            tdt = getattr(torch, dtype)
            ta = torch.from_numpy(a).to(tdt)
            tb = torch.from_numpy(b).to(tdt)
            torch.matmul(ta, tb)
            best = _best(lambda x=ta, y=tb: torch.matmul(x, y), repeats)
            rows.append((label, dtype, "torch", flops / best / 1e9))
    return rows


def _best(fn, repeats: int) -> float:
    """The shortest of `repeats` timed calls of `fn`, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in (("vocab", 262144), ("dim", 512), ("layers", 8),
                          ("sliding", 3), ("window", 512), ("batch", 4),
                          ("seq", 512), ("rank", 16), ("seed", 0)):  # fmt: skip
        p.add_argument(f"--{flag}", type=int, default=default)
    p.add_argument("--gemm", action="store_true", help="also time GEMMs (XLA, torch)")
    p.add_argument("--workdir", default=compare.default_workdir())
    args = p.parse_args()
    args.steps, args.remat = 6, 0
    os.makedirs(args.workdir, exist_ok=True)
    ckpt = compare.write_checkpoint(args)
    tokens = args.batch * args.seq
    float_flops, float_temp, spec = compiled_step(args, ckpt, nf4=False)
    nf4_flops, nf4_temp, _ = compiled_step(args, ckpt, nf4=True)
    parts = analytic(spec, args.rank, args.batch, args.seq)
    print(
        f"shape: vocab {args.vocab}, d {args.dim}, {args.layers} layers, "
        f"batch {args.batch} x seq {args.seq}, LoRA r{args.rank} (all seven)"
    )
    print(f"{'part':<12} {'GFLOP/step':>11} {'MFLOP/token':>12} {'share':>7}")
    for name, value in parts.items():
        print(
            f"{name:<12} {value / 1e9:>11.1f} {value / tokens / 1e6:>12.2f} "
            f"{value / float_flops:>7.1%}"
        )
    rest = float_flops - sum(parts.values())
    print(f"{'rest':<12} {rest / 1e9:>11.1f} {rest / tokens / 1e6:>12.2f} "
          f"{rest / float_flops:>7.1%}")  # fmt: skip
    print(f"{'XLA float':<12} {float_flops / 1e9:>11.1f} "
          f"{float_flops / tokens / 1e6:>12.2f}   temp {float_temp / 2**30:.2f} GiB")  # fmt: skip
    dq = nf4_flops - float_flops
    print(f"{'NF4 extra':<12} {dq / 1e9:>11.1f} {dq / tokens / 1e6:>12.2f} "
          f"{dq / float_flops:>7.1%}")  # fmt: skip
    print(f"{'XLA NF4':<12} {nf4_flops / 1e9:>11.1f} "
          f"{nf4_flops / tokens / 1e6:>12.2f}   temp {nf4_temp / 2**30:.2f} GiB")  # fmt: skip
    old_head = parts["head/loss"] * 1.5
    print(
        f"the earlier loss (logits recomputed in the backward pass) would add "
        f"{(old_head - parts['head/loss']) / 1e9:.1f} GFLOP/step "
        f"({(old_head - parts['head/loss']) / float_flops:.1%} of today's step)"
    )
    if args.gemm:
        print(f"\n{'GEMM':<28} {'dtype':<9} {'library':<6} {'GFLOP/s':>8}")
        for label, dtype, lib, rate in gemm_rates():
            print(f"{label:<28} {dtype:<9} {lib:<6} {rate:>8.1f}")


if __name__ == "__main__":
    main()
