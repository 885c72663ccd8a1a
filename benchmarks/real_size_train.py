"""QLoRA / LoRA at the released dimensions: load, compile, a few optimiser steps.

Run (the checkpoint is written once to ~/.cache/gemma4_keras/full_size/):
    python benchmarks/real_size_train.py --size=e2b --method=qlora
    python benchmarks/real_size_train.py --size=e4b --method=qlora --seq=512
    # one image a row (280 soft tokens inside --seq), the released vision
    # tower attached; --layers keeps the first N decoder layers (released
    # widths) where the whole model's compile does not fit the host
    python benchmarks/real_size_train.py --size=e4b --images=1 --layers=12
    # 26B-A4B's MoE layers (routed experts, NF4) at seq 4096, compiled only:
    # XLA's device bytes of the truncated model next to `plan`'s
    python benchmarks/real_size_train.py --size=26b_a4b --seq=4096 --layers=6 --steps=0
    # the same with the memory settings of a 16 GB card (docs/real_size.md)
    python benchmarks/real_size_train.py --size=26b_a4b --seq=4096 --layers=6 --steps=0 \
        --set=model.moe_token_chunk=1024 --set=model.loss_chunk_size=256 \
        --set=model.attention_chunk_size=256

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
    config.train.max_steps = max(args.steps, 1)  # --steps=0: compile only
    config.lora.rank = args.rank
    config.lora.alpha = 2.0 * args.rank
    config.model.ple_on_host = args.ple_on_host
    config.model.moe_dispatch = args.moe_dispatch
    for setting in args.set:  # --set model.moe_token_chunk=1024
        field, _, value = setting.partition("=")
        section, name = field.split(".")
        old = config[section][name]
        config[section][name] = (
            value.lower() == "true" if isinstance(old, bool) else type(old)(value)
        )
    config_lib.validate(config)
    return config


def batch(seq: int, size: int, vocab: int, seed: int = 0, images=None) -> dict:
    """Random ids; with `images` ({image, begin, end token ids}, count), that
    many images a row.

    Each image is the processor's largest (280 soft tokens, 2,520 patches of
    random pixels, a 42 x 60 patch grid) between its begin / end markers;
    no loss on them. Text ids never take a media id.
    """
    import numpy as np

    from gemma4_keras.data import media

    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (size, seq)).astype("int32")
    weights = np.ones((size, seq), "float32")
    out = {}
    if images is not None:
        marks, count = images
        ids[np.isin(ids, list(marks.values()))] = 3
        soft = media.PROCESSOR.max_soft_tokens
        patches = media.PROCESSOR.max_patches
        if count * (soft + 2) + 2 > seq:
            raise SystemExit(f"--seq={seq} cannot hold {count} image(s) a row")
        for k in range(count):
            start = 1 + k * (soft + 2)
            ids[:, start] = marks["boi_token_id"]
            ids[:, start + 1 : start + 1 + soft] = marks["image_token_id"]
            ids[:, start + 1 + soft] = marks["eoi_token_id"]
            weights[:, start : start + soft + 2] = 0
        grid = np.stack(np.meshgrid(np.arange(60), np.arange(42)), -1).reshape(-1, 2)
        out["pixel_values"] = rng.random((size, count, patches, 768), "float32")
        positions = np.broadcast_to(grid, (size, count, patches, 2))
        out["pixel_position_ids"] = positions.astype("int32")
    return {
        "token_ids": ids,
        "positions": np.tile(np.arange(seq, dtype="int32"), (size, 1)),
        "segment_ids": np.ones((size, seq), "int32"),
        "target_ids": np.roll(ids, -1, axis=1),
        "loss_weights": weights,
        "loss_norm": np.full((size,), float(weights.sum()), "float32"),
        **out,
    }


def load(config, preset: str, images: int = 0):
    from gemma4_keras.model import presets

    reset_peak()
    start = time.time()
    model = presets.build_training_model(preset, presets.ModelSettings.of(config))
    if images:
        presets.attach_towers(model, preset, ("image",))  # as `train` does
    return model, {
        "seconds": round(time.time() - start, 1),
        "peak_rss_gib": peak_rss() / GIB,
    }


def compile_step(model, config, images: int = 0):
    import jax

    from gemma4_keras import testing
    from gemma4_keras.model import presets
    from gemma4_keras.training import train

    plan = train.Plan(config.train.max_steps, 1, 0)
    train.compile_model(model, config.train, train.build_schedule(config.train, plan))
    model.optimizer.build(model.trainable_variables)
    state = testing.train_step_state(model)
    raw = presets.read_config_json(config.model.preset)
    marks = {k: raw[k] for k in ("image_token_id", "boi_token_id", "eoi_token_id")}
    shown = (marks, images) if images else None
    data = (
        batch(
            config.data.max_length,
            config.train.batch_size,
            model.spec.vocab_size,
            images=shown,
        ),
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


def plan_figures(config, images: int = 0) -> dict:
    from gemma4_keras.model import plan

    towers = ("image",) if images else ()
    estimate = plan.plan(config, towers=towers, images_per_row=max(images, 1))
    figures = {k: v for k, v in estimate.items() if isinstance(v, int | float)}
    figures["per_device_gib"] = {k: v / GIB for k, v in estimate["per_device"].items()}
    figures["towers"] = estimate["towers"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", default="e2b", choices=["e2b", "e4b", "26b_a4b", "tiny"]
    )
    parser.add_argument("--method", default="qlora", choices=["qlora", "lora"])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--steps", type=int, default=3, help="optimiser steps run (0: compile only)"
    )
    parser.add_argument(
        "--moe_dispatch",
        default="auto",
        choices=["auto", "ragged", "blocks", "dense"],
        help="model.moe_dispatch (26B-A4B)",
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="a config field, as --config.SECTION.FIELD of gemma4-keras train "
        "(repeatable), e.g. --set=model.moe_token_chunk=1024",
    )
    parser.add_argument(
        "--ple_on_host",
        default="off",
        choices=["on", "off"],
        help="the per-layer-embedding table in host memory (XLA's device figure "
        "then leaves it out; on this CPU the host is the device)",
    )
    parser.add_argument(
        "--images",
        type=int,
        default=0,
        help="images a row (each 280 soft tokens inside --seq); > 0 attaches the "
        "vision tower (the checkpoint then carries the released towers)",
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=0,
        help="decoder layers kept at the released widths (0 = all): a smaller "
        "compile, for what does not depend on depth (the towers, the loss)",
    )
    parser.add_argument(
        "--towers",
        action="store_true",
        help="a checkpoint with the released towers even with --images=0 (the "
        "text-only step of the same checkpoint, to compare)",
    )
    args = parser.parse_args()

    from gemma4_keras.testing import full_size, tiny

    if args.size == "tiny":  # a smoke run of this script
        layout = "multimodal" if args.images else "conditional_generation"
        preset = str(tiny.tiny_checkpoint(layout=layout))
    else:
        preset = str(
            full_size.full_size_checkpoint(
                args.size,
                towers=bool(args.images or args.towers),
                layers=args.layers or None,
            )
        )
    config = build_config(args, preset)
    result = {"size": args.size, "method": args.method, "seq": args.seq,
              "batch": args.batch, "rank": args.rank,
              "ple_on_host": args.ple_on_host, "images": args.images,
              "layers": args.layers or "all",
              "moe_dispatch": args.moe_dispatch}  # fmt: skip
    model, result["load"] = load(config, preset, args.images)
    print(
        json.dumps({"load": result["load"]}, default=float), file=sys.stderr, flush=True
    )
    compiled, state, data, result["compile"] = compile_step(model, config, args.images)
    print(
        json.dumps({"compile": result["compile"]}, default=float),
        file=sys.stderr,
        flush=True,
    )
    result["step"] = run_steps(compiled, state, data, args.steps)
    try:
        result["plan"] = plan_figures(config, args.images)
    except Exception as e:  # the plan is context; the measurement stands alone
        result["plan"] = f"{type(e).__name__}: {e}"
    print(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
    main()
