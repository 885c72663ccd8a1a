"""E4B-shape LoRA and QLoRA train steps on an accelerator: tokens/s, MFU, memory.

Run (on a machine with a GPU or TPU):
    python benchmarks/gpu.py                       # E4B, seq 2048, LoRA + QLoRA
    python benchmarks/gpu.py --methods qlora --batch 2 --json
    python benchmarks/gpu.py --size tiny --seq 64  # the CPU dry run (a test runs it)

The model has the released E4B dimensions (`testing.full_size.released_config`)
and seeded random bfloat16 weights, built in memory through the same fill
function as the checkpoint loader (`model.layers.fill_model`, a loop over
`model/schema.py`) from a random source instead of safetensors: no checkpoint
is written. LoRA r16 (alpha 32) on all seven projections, bfloat16 compute,
`remat` on, the run's AdamW (`train.compile_model`), the train step `fit`
runs (`jax.jit(model.train_step)`, donated state). Per method it reports:

  tokens/s     batch x seq / median step time (steps after the first)
  MFU          model FLOPs per second / the device's peak bfloat16 FLOP/s.
               FLOPs are XLA's `cost_analysis()` of the compiled step, with
               the loss's chunk loop counted once per chunk (XLA counts a loop
               body once; the loss does 2 x 2 x chunk x vocab x dim per chunk)
  peak memory  `device.memory_stats()["peak_bytes_in_use"]` after the steps
               (None on a CPU), and XLA's `memory_analysis()` of the step

and, if `transformers` and `peft` import and torch sees a CUDA device, the
same LoRA step in transformers + PEFT (bfloat16, gradient checkpointing,
`torch.cuda.max_memory_allocated`). Targets (issue 17): E4B LoRA >= 35% MFU,
E4B QLoRA <= 10 GB peak device memory.

Peak FLOP/s come from `PEAK_TFLOPS` by device kind (dense bfloat16); pass
`--peak-tflops` for another device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
os.environ.setdefault("KERAS_BACKEND", "jax")

import gemma4_keras  # noqa: E402,F401  (selects the JAX backend before keras loads)

# Dense bfloat16 peak, TFLOP/s, by a substring of `device.device_kind`.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,  # SXM; the PCIe card is 756
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "T4": 65.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v4": 275.0,
    "TPU v6": 918.0,
}


class RandomSource:
    """Stands in for `stream_load.SafetensorsSource`: seeded random tensors.

    Values come from one pool of normal samples (tiled), scaled to
    `initializer_range`, so a multi-billion-parameter model is built in
    seconds; norms and the layer scalar get ones (as `from_config` would),
    so activations stay sane.
    """

    def __init__(self, dtype: str, seed: int = 0, std: float = 0.02):
        import ml_dtypes
        import numpy as np

        self.np = np
        self.dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
        rng = np.random.default_rng(seed)
        self.pool = (rng.standard_normal(1 << 22) * std).astype(np.float32)

    def _get(self, name: str, shape: tuple[int, ...], ones: bool):
        np = self.np
        if ones:
            return np.ones(shape, self.dtype)
        size = int(np.prod(shape))
        offset = hash(name) % len(self.pool)
        flat = np.resize(np.roll(self.pool, offset), size)
        return flat.reshape(shape).astype(self.dtype)

    def value(self, row, spec, layer):
        block = None if layer is None else spec.blocks[layer]
        ones = row.float32 or row.hf_layout == "scalar"
        return self._get(row.hf_name(layer), tuple(row.shape(spec, block)), ones)

    def blocks(self, row, spec, layer, block: int = 16384):
        """`value` as blocks of rows, as the safetensors source yields tables."""
        shape = tuple(row.shape(spec, None if layer is None else spec.blocks[layer]))
        if len(shape) < 2:
            yield self.value(row, spec, layer)
            return
        for start in range(0, shape[0], block):
            n = min(block, shape[0] - start)
            name = f"{row.hf_name(layer)}[{start}:]"
            yield self._get(name, (n, *shape[1:]), row.float32)


def hf_config(size: str) -> dict:
    from gemma4_keras.model import hf_config as hf
    from gemma4_keras.testing import full_size, tiny

    if size == "tiny":
        return hf.normalise(tiny.tiny_hf_config(layout="conditional_generation"))
    return hf.normalise(full_size.released_config(size))


def build_model(args, quant: str):
    """The training model at `args.size`, random weights, no checkpoint."""
    from gemma4_keras.model import hub, layers, presets
    from gemma4_keras.model.gemma4_lora_model import Gemma4LoraModel
    from gemma4_keras.model.lora import LoraSpec

    config = hf_config(args.size)
    with presets.on_host():
        model = Gemma4LoraModel(
            hub.model_spec(config),
            remat=True,
            loss_chunk_size=args.chunk,
            name="gemma4_lora_model",
            dtype=args.dtype,
        )
        src = RandomSource(model.variable_dtype, args.seed)
        layers.fill_model(model, src, quant=quant, double_quant=True, block_size=64)
        model.finish_loading(LoraSpec(rank=args.rank, alpha=2.0 * args.rank))
    return model


def batch(args, vocab: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(args.seed)
    ids = rng.integers(3, vocab, (args.batch, args.seq + 1)).astype("int32")
    return {
        "token_ids": ids[:, :-1],
        "positions": np.tile(np.arange(args.seq, dtype="int32"), (args.batch, 1)),
        "segment_ids": np.ones((args.batch, args.seq), "int32"),
        "target_ids": ids[:, 1:],
        "loss_weights": np.ones((args.batch, args.seq), "float32"),
        "loss_norm": np.full((args.batch,), float(args.batch * args.seq), "float32"),
    }


def peak_tflops(args, device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    kind = getattr(device, "device_kind", "")
    for key, value in PEAK_TFLOPS.items():
        if key.lower() in kind.lower():
            return value
    return None


def run_ours(args, method: str) -> dict:
    import jax

    from gemma4_keras import config_lib, testing
    from gemma4_keras.training import train

    quant = "nf4" if method == "qlora" else "none"
    t0 = time.perf_counter()
    model = build_model(args, quant)
    train_cfg = config_lib.get_config(args.size, method).train
    train_cfg.grad_accum = 1
    plan = train.Plan(args.steps, 1, 0)
    train.compile_model(model, train_cfg, train.build_schedule(train_cfg, plan))
    model.optimizer.build(model.trainable_variables)
    build_s = time.perf_counter() - t0
    state = testing.train_step_state(model)
    data = (batch(args, model.spec.vocab_size),)
    t0 = time.perf_counter()
    compiled = jax.jit(model.train_step, donate_argnums=0).lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    mem = compiled.memory_analysis()
    tokens = args.batch * args.seq
    chunks = -(-tokens // args.chunk)
    loss_body = (
        4.0 * min(args.chunk, tokens) * model.spec.vocab_size * (model.spec.hidden_dim)
    )
    flops = float(cost["flops"]) + (chunks - 1) * loss_body
    times, losses = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        logs, state = compiled(state, data)
        losses.append(float(logs["loss"]))
        times.append(time.perf_counter() - t0)
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    step_s = statistics.median(times[1:]) if len(times) > 1 else times[0]
    peak = peak_tflops(args, device)
    return {
        "method": method,
        "device": getattr(device, "device_kind", str(device)),
        "build_s": build_s,
        "compile_s": compile_s,
        "step_s": times,
        "losses": losses,
        "tokens_per_s": tokens / step_s,
        "flops_per_step": flops,
        "tflops_per_s": flops / step_s / 1e12,
        "mfu": flops / step_s / (peak * 1e12) if peak else None,
        "peak_device_bytes": stats.get("peak_bytes_in_use"),
        "xla_temp_bytes": mem.temp_size_in_bytes,
        "xla_argument_bytes": mem.argument_size_in_bytes,
    }


def run_peft(args) -> dict:
    """transformers + PEFT LoRA at the same shape, if importable with CUDA."""
    from gemma4_keras import config_lib

    try:
        import peft
        import torch
        import transformers
    except ImportError as e:
        return {"method": "peft-lora", "error": f"not importable: {e}"}
    if not torch.cuda.is_available():
        return {"method": "peft-lora", "error": "torch sees no CUDA device"}
    text = hf_config(args.size)
    text = text.get("text_config", text)
    config = transformers.AutoConfig.for_model(**{**text, "model_type": "gemma4_text"})
    torch.manual_seed(args.seed)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16
        )
    model.gradient_checkpointing_enable()
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                        target_modules=list(config_lib.LORA_TARGETS), task_type="CAUSAL_LM"),
    )  # fmt: skip
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    data = batch(args, config.vocab_size)
    ids = torch.from_numpy(data["token_ids"]).long().cuda()
    labels = torch.from_numpy(data["target_ids"]).long().cuda()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten()
        )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[1:]) if len(times) > 1 else times[0]
    return {
        "method": "peft-lora",
        "step_s": times,
        "losses": losses,
        "tokens_per_s": args.batch * args.seq / step_s,
        "peak_device_bytes": torch.cuda.max_memory_allocated(),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="e4b", choices=["e2b", "e4b", "tiny"])
    p.add_argument("--methods", nargs="+", default=["lora", "qlora"],
                   choices=["lora", "qlora"])  # fmt: skip
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--chunk", type=int, default=1024, help="loss chunk (tokens)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--no-peft", action="store_true", help="skip transformers+PEFT")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    results = [run_ours(args, m) for m in args.methods]
    if not args.no_peft:
        results.append(run_peft(args))
    if args.json:
        print(json.dumps(results, indent=1, default=float))
        return results
    print(f"size {args.size}, batch {args.batch} x seq {args.seq}, LoRA r{args.rank}")
    for r in results:
        if "error" in r:
            print(f"{r['method']:<10} unavailable: {r['error']}")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
        peak = r.get("peak_device_bytes")
        peak = f"{peak / 2**30:.2f} GiB" if peak else "n/a"
        print(
            f"{r['method']:<10} {r['tokens_per_s']:>9.1f} tokens/s  MFU {mfu:>6}  "
            f"peak device memory {peak}  losses {[round(x, 3) for x in r['losses']]}"
        )
    return results


if __name__ == "__main__":
    main()
