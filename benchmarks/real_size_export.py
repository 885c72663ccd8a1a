"""Exports at the released dimensions: peak host RSS of each format.

Run (the checkpoint is written once to ~/.cache/gemma4_keras/full_size/):
    python benchmarks/real_size_export.py --size=e4b --formats=peft,hf

A finished run's workdir is made from a random rank-16 adapter on every
linear layer of the size (PEFT format, as training writes it), then each
format is exported by `export.commands.export`, the function behind
`gemma4-keras export`, in this process. Before each export the kernel's
high-water mark of the resident set (`VmHWM`) is reset (`/proc/self/clear_refs`),
so each figure is that export's own peak. Budget (issue #14): a streamed
export's peak <= largest shard + largest tensor + 1 GiB. The outputs are
deleted after measuring (an E4B merged export is another 15 GB of disk).
Prints one JSON object; `docs/real_size.md` keeps the figures measured here.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
os.environ.setdefault("KERAS_BACKEND", "jax")

import gemma4_keras  # noqa: E402,F401  (selects the JAX backend before keras loads)

GIB = 1024**3
SHARD = 2 * GIB


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def adapter_workdir(root: str, preset: str, rank: int) -> str:
    """A finished run's workdir holding a random adapter on every linear layer."""
    import numpy as np

    from gemma4_keras.exporters import peft
    from gemma4_keras.model import hub, presets
    from gemma4_keras.model.lora import LoraSpec

    lora = LoraSpec(rank=rank, alpha=2.0 * rank)
    spec = hub.spec_from_config(hub.backbone_kwargs(presets.read_config_json(preset)))
    rng = np.random.default_rng(0)
    factors = {}
    for layer, target in lora.sites(spec):
        din, dout = spec.projection_shape(layer, target)
        factors[(layer, target)] = (
            rng.normal(0, 0.02, (din, rank)).astype(np.float32),
            rng.normal(0, 0.02, (rank, dout)).astype(np.float32),
        )
    workdir = os.path.join(root, "run")
    peft.write_adapter(
        os.path.join(workdir, "adapter"), lora, factors, base_model=preset
    )
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"model": {"preset": preset}}, f)
    with open(os.path.join(workdir, "run_state.json"), "w") as f:
        json.dump({"status": "finished", "step": 3}, f)
    return workdir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="e4b", choices=["e2b", "e4b", "tiny"])
    parser.add_argument("--formats", default="peft,hf")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    import ml_collections

    from gemma4_keras.exporters import commands
    from gemma4_keras.model import safetensors_io
    from gemma4_keras.testing import full_size, tiny

    if args.size == "tiny":  # a smoke run of this script
        preset = str(tiny.tiny_checkpoint(layout="conditional_generation"))
    else:
        preset = str(full_size.full_size_checkpoint(args.size))
    refs = safetensors_io.tensor_refs(preset)
    largest = max(r.nbytes for r in refs.values())
    result = {
        "size": args.size,
        "checkpoint_gib": sum(r.nbytes for r in refs.values()) / GIB,
        "largest_tensor_gib": largest / GIB,
        "shard_gib": SHARD / GIB,
        "budget_gib": (SHARD + largest + GIB) / GIB,
        "exports": {},
    }
    config = ml_collections.ConfigDict({"model": {"preset": preset}})
    root = tempfile.mkdtemp(prefix="real_size_export.", dir=os.path.expanduser("~"))
    try:
        workdir = adapter_workdir(root, preset, args.rank)
        for fmt in args.formats.split(","):
            out = os.path.join(root, fmt)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            baseline, start = status("VmRSS"), time.time()
            commands.export(config, workdir, fmt, out, shard_size=SHARD)
            result["exports"][fmt] = {
                "seconds": round(time.time() - start, 1),
                "baseline_rss_gib": baseline / GIB,
                "peak_rss_gib": status("VmHWM") / GIB,
                "written_gib": sum(
                    os.path.getsize(os.path.join(d, n))
                    for d, _, names in os.walk(out)
                    for n in names
                )
                / GIB,
            }
            print(json.dumps({fmt: result["exports"][fmt]}), file=sys.stderr)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
