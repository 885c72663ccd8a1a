"""QLoRA / LoRA at the released dimensions: load, compile, a few optimiser steps.

Run (the checkpoint is written once to ~/.cache/gemma4_keras/full_size/):
    python benchmarks/real_size_train.py --size=e2b --method=qlora
    python benchmarks/real_size_train.py --size=e4b --method=qlora --seq=512

Random weights at the true shapes exercise every code path and all of the
memory. The model is built the way `gemma4-keras train` builds it
(`presets.build_training_model`, which streams an HF directory tensor by
tensor) and compiled with the run's optimiser (`train.compile_model`); the
train step is Keras' own (`model.train_step`) under `jax.jit`, as `fit` runs it.
Per phase it reports:

  load     peak host RSS, seconds
  compile  XLA's `memory_analysis()` of the compiled step: arguments, outputs,
           temporaries (the device-memory figure; on a GPU the same program)
  step     seconds per optimiser step, peak host RSS

and `gemma4-keras plan`'s estimate of the same run next to them. Prints one
JSON object; `docs/real_size.md` keeps the figures measured here.
"""

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
os.environ.setdefault("KERAS_BACKEND", "jax")

import gemma4_keras  # noqa: E402,F401  (selects the JAX backend before keras loads)

GIB = 1024**3


def peak_rss() -> int:
    """This process's peak RSS since the last `reset_peak` (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build_config(args, preset: str):
    from gemma4_keras import config_lib

    config = config_lib.get_config(args.size, args.method)
    config.model.preset = preset
    config.model.dtype = "bfloat16"
    config.data.max_length = args.seq
    config.train.batch_size = args.batch
    config.train.grad_accum = 1
    config.model.remat = True
    config.train.max_steps = args.steps
    config.lora.rank = args.rank
    config.lora.alpha = 2.0 * args.rank
    config.model.ple_on_host = args.ple_on_host
    config_lib.validate(config)
    return config


def batch(seq: int, size: int, vocab: int, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (size, seq)).astype("int32")
    return {
        "token_ids": ids,
        "positions": np.tile(np.arange(seq, dtype="int32"), (size, 1)),
        "segment_ids": np.ones((size, seq), "int32"),
        "target_ids": np.roll(ids, -1, axis=1),
        "loss_weights": np.ones((size, seq), "float32"),
        "loss_norm": np.full((size,), float(size * seq), "float32"),
    }


def load(config, preset: str):
    from gemma4_keras.model import presets

    reset_peak()
    start = time.time()
    model = presets.build_training_model(preset, presets.ModelSettings.of(config))
    return model, {
        "seconds": round(time.time() - start, 1),
        "peak_rss_gib": peak_rss() / GIB,
    }


def compile_step(model, config):
    import jax

    from gemma4_keras.training import train

    plan = train.Plan(config.train.max_steps, 1, 0)
    train.compile_model(model, config.train, train.build_schedule(config.train, plan))
    model.optimizer.build(model.trainable_variables)
    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in model.optimizer.variables],
        [v.value for v in model.metrics_variables],
    )
    data = (
        batch(config.data.max_length, config.train.batch_size, model.spec.vocab_size),
    )
    reset_peak()
    start = time.time()
    step = jax.jit(model.train_step, donate_argnums=0)
    compiled = step.lower(state, data).compile()
    mem = compiled.memory_analysis()
    figures = {
        "seconds": round(time.time() - start, 1),
        "peak_rss_gib": peak_rss() / GIB,
        "argument_gib": mem.argument_size_in_bytes / GIB,
        "output_gib": mem.output_size_in_bytes / GIB,
        "temp_gib": mem.temp_size_in_bytes / GIB,
        "alias_gib": mem.alias_size_in_bytes / GIB,
    }
    # Donated arguments alias the outputs: the step's own footprint.
    figures["device_gib"] = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    ) / GIB
    return compiled, state, data, figures


def run_steps(compiled, state, data, steps: int) -> dict:
    reset_peak()
    times, losses = [], []
    for _ in range(steps):
        start = time.time()
        logs, state = compiled(state, data)
        loss = float(logs["loss"])
        times.append(time.time() - start)
        losses.append(round(loss, 4))
    return {
        "seconds_per_step": [round(t, 1) for t in times],
        "losses": losses,
        "peak_rss_gib": peak_rss() / GIB,
    }


def plan_figures(config) -> dict:
    from gemma4_keras.model import plan

    estimate = plan.plan(config)
    return {k: v for k, v in estimate.items() if isinstance(v, int | float)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="e2b", choices=["e2b", "e4b", "tiny"])
    parser.add_argument("--method", default="qlora", choices=["qlora", "lora"])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--ple_on_host",
        default="off",
        choices=["on", "off"],
        help="the per-layer-embedding table in host memory (XLA's device figure "
        "then leaves it out; on this CPU the host is the device)",
    )
    args = parser.parse_args()

    from gemma4_keras.testing import full_size, tiny

    if args.size == "tiny":  # a smoke run of this script
        preset = str(tiny.tiny_checkpoint(layout="conditional_generation"))
    else:
        preset = str(full_size.full_size_checkpoint(args.size))
    config = build_config(args, preset)
    result = {"size": args.size, "method": args.method, "seq": args.seq,
              "batch": args.batch, "rank": args.rank,
              "ple_on_host": args.ple_on_host}  # fmt: skip
    model, result["load"] = load(config, preset)
    print(
        json.dumps({"load": result["load"]}, default=float), file=sys.stderr, flush=True
    )
    compiled, state, data, result["compile"] = compile_step(model, config)
    print(
        json.dumps({"compile": result["compile"]}, default=float),
        file=sys.stderr,
        flush=True,
    )
    result["step"] = run_steps(compiled, state, data, args.steps)
    try:
        result["plan"] = plan_figures(config)
    except Exception as e:  # the plan is context; the measurement stands alone
        result["plan"] = f"{type(e).__name__}: {e}"
    print(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
    main()
