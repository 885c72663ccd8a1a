"""Does float16 compute (with float32 islands) track float32 training?

Run:
    python benchmarks/float16_tracking.py                       # tiny, 100 steps
    python benchmarks/float16_tracking.py --model mid --steps 30 --dim 512 --layers 4

Trains the same LoRA run twice through the package's training API
(`api.load_training_model`, `api.training_data`, `api.compile_model`, then
`model.fit`, one optimiser step per Keras epoch), once with
`model.dtype=float32` and once with `model.dtype=float16` (float16 matmuls;
float32 residual stream, RMSNorm, embeddings, attention scores; gate*up
clamped; dynamic loss scaling), on the packaged sample data with the
embedded default's settings. `--model tiny` is the tiny model
(`configs/tiny.py`); `--model mid` writes a random-weight checkpoint of the
given width and depth with the tiny tokenizer. A bfloat16 run (today's GPU
default) is the yardstick for how far a 16-bit run drifts from float32.
Prints each step's loss per mode, the largest relative difference per step
and per window of steps, and the overflow record: non-finite losses, steps
the loss scaler skipped, and the final loss scale.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from gemma4_keras.testing import full_size, tiny  # noqa: E402
from gemma4_keras.training import api  # noqa: E402


def mid_checkpoint(path: str, dim: int, layers: int) -> str:
    types = ["sliding_attention"] * (layers - 1) + ["full_attention"]
    config = tiny.tiny_hf_config(
        hidden_size=dim,
        intermediate_size=4 * dim,
        num_hidden_layers=layers,
        layer_types=types,
    )
    return str(full_size.write_checkpoint(path, config))


def train(preset: str, dtype: str, steps: int, batch: int, seq: int, lr: float) -> dict:
    """Per-step losses, loss scale record and seconds of `steps` optimiser steps."""
    config = api.get_config(
        "tiny",
        "lora",
        "embedded",
        overrides={
            "model.preset": preset,
            "model.dtype": dtype,
            "train.max_steps": steps,
            "train.batch_size": batch,
            "data.max_length": seq,
            "train.learning_rate": lr,
        },
    )
    keras.utils.set_random_seed(0)
    model, tokenizer, resolved = api.load_training_model(config)
    data = api.training_data(config, tokenizer, resolved)
    api.compile_model(model, config, data)
    losses, scales = [], []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            losses.append(float(logs["loss"]))
            opt = self.model.optimizer
            if isinstance(opt, keras.optimizers.LossScaleOptimizer):
                scales.append(float(keras.ops.convert_to_numpy(opt.dynamic_scale)))

    accum = data.plan.grad_accum
    start = time.perf_counter()
    model.fit(
        data.batches,
        epochs=steps,
        steps_per_epoch=accum,
        callbacks=[Record()],
        verbose=0,
    )
    seconds = time.perf_counter() - start
    applied = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    # Each run's record as it finishes: a long comparison keeps what it has.
    print(f"{dtype}: {seconds:.1f}s, skipped {steps - applied}, losses", losses)
    return dict(
        losses=np.asarray(losses),
        scales=scales,
        skipped=steps - applied,
        seconds=seconds,
    )


def report(runs: dict, window: int) -> None:
    ref = runs["float32"]["losses"]
    others = [d for d in runs if d != "float32"]
    print(
        "step  "
        + "  ".join(f"{d:>10s}" for d in runs)
        + "  "
        + "  ".join(f"rel {d:>8s}" for d in others)
        + "  f16 scale"
    )
    for i in range(len(ref)):
        row = "  ".join(f"{runs[d]['losses'][i]:10.5f}" for d in runs)
        rels = "  ".join(
            f"{abs(runs[d]['losses'][i] - ref[i]) / abs(ref[i]):12.2e}" for d in others
        )
        scales = runs.get("float16", {}).get("scales") or [""] * len(ref)
        print(f"{i + 1:4d}  {row}  {rels}  {scales[i]}")
    n = len(ref) // window * window
    means = {d: runs[d]["losses"][:n].reshape(-1, window).mean(1) for d in runs}
    print(f"mean loss per {window} steps:")
    for d in runs:
        print(f"  {d:>9s}: " + " ".join(f"{m:.4f}" for m in means[d]))
    for d in others:
        rel = np.abs(runs[d]["losses"] - ref) / np.abs(ref)
        wrel = np.abs(means[d] - means["float32"]) / np.abs(means["float32"])
        print(
            f"{d} vs float32: per-step max rel diff {np.nanmax(rel):.3e} "
            f"(step {int(np.nanargmax(rel)) + 1}), mean {np.nanmean(rel):.3e}; "
            f"per-{window}-step-mean max rel diff {np.nanmax(wrel):.3e}; "
            f"final loss {runs[d]['losses'][-1]:.5f} vs {ref[-1]:.5f}; "
            f"non-finite losses {int(np.sum(~np.isfinite(runs[d]['losses'])))}; "
            f"skipped steps {runs[d]['skipped']}"
            + (
                f"; final loss scale {runs[d]['scales'][-1]}"
                if runs[d]["scales"]
                else ""
            )
        )
    print(
        "seconds (this host, incl. compile): "
        + ", ".join(f"{d} {runs[d]['seconds']:.1f}" for d in runs)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["tiny", "mid"], default="tiny")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--dim", type=int, default=512, help="mid: hidden size")
    p.add_argument("--layers", type=int, default=4, help="mid: decoder layers")
    p.add_argument("--batch", type=int, default=16, help="examples per step")
    p.add_argument("--seq", type=int, default=96, help="data.max_length")
    p.add_argument("--lr", type=float, default=3e-3, help="train.learning_rate")
    p.add_argument("--window", type=int, default=10, help="steps per mean")
    p.add_argument(
        "--dtypes",
        default="float32,float16,bfloat16",
        help="compared with the first (float32); bfloat16 is today's GPU default",
    )
    args = p.parse_args()
    dtypes = args.dtypes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        preset = "tiny"
        if args.model == "mid":
            preset = mid_checkpoint(os.path.join(tmp, "mid"), args.dim, args.layers)
        runs = {
            d: train(preset, d, args.steps, args.batch, args.seq, args.lr)
            for d in dtypes
        }
    print(
        f"model={args.model} steps={args.steps} batch={args.batch} seq={args.seq} "
        f"lr={args.lr}"
        + (f" dim={args.dim} layers={args.layers}" if args.model == "mid" else "")
    )
    report(runs, args.window)


if __name__ == "__main__":
    main()
