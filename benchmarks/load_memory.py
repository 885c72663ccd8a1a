"""Peak host memory and seconds of stream-loading a real-dimension checkpoint.

Run (the checkpoint is written once, outside the repository, into
`~/.cache/gemma4_keras/full_size/<size>-v1`, or `$GEMMA4_KERAS_CACHE/...`):

    python benchmarks/load_memory.py --size=e2b              # NF4 + double quant, bf16
    python benchmarks/load_memory.py --size=e2b --write_only # just write it (9.3 GB)
    /usr/bin/time -v python benchmarks/load_memory.py --size=e4b --quant=none

Loads the checkpoint with `stream_load.stream_training_model` (QLoRA defaults:
NF4 with double quantisation, bfloat16 compute, block 64) in a process that
has done nothing else, and prints one JSON line: seconds, peak RSS
(`getrusage` ru_maxrss, the whole process), RSS before loading, the finished
model's bytes (every variable), the largest checkpoint tensor, and the issue
13 budget `model bytes + largest tensor + 1 GiB` with whether it held. The
checkpoint is written by a child process, so writing does not count.
26B-A4B and 31B do not fit this disk: use `--size=... --config_only` to write
a config-only directory (what `plan` reads).

Measured on the 2-core, 24 GB CPU machine (others' tests running; load
average ~12-20, so the seconds are pessimistic), NF4 + double quant,
bfloat16 compute, LoRA r16 on all targets, 2026-11-30:

    size  checkpoint   peak RSS   model     largest tensor  budget     load
    e2b   9.3 GB       7.52 GiB   6.17 GiB  4.38 GiB (PLE)  11.55 GiB  266 s
    e4b   15.0 GB      9.86 GiB   8.65 GiB  5.25 GiB (PLE)  14.90 GiB  357 s

(KerasHub's `Gemma4Backbone.from_preset` alone peaked at 22.5 GB for E2B.)
Writing the checkpoints took 7.7 min (E2B) and 10.8 min (E4B) at 0.37 GB
peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

GIB = 1024**3


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def ensure_checkpoint(size: str) -> str:
    """The cached checkpoint directory, written by a child process if missing."""
    from gemma4_keras.testing import full_size

    path = full_size.cache_dir(size)
    if not path.is_dir():
        start = time.time()
        subprocess.run(
            [sys.executable, __file__, f"--size={size}", "--write_only"], check=True
        )
        print(f"wrote {path} in {time.time() - start:.0f} s", file=sys.stderr)
    return str(path)


def measure(path: str, dtype: str, quant: str, double_quant: bool) -> dict:
    from gemma4_keras.model import presets, stream_load
    from gemma4_keras.model.lora import LoraSpec

    reader = stream_load.CheckpointReader(path)
    largest = max(reader.nbytes(n) for n in reader.names())
    before = _rss_now()
    start = time.time()
    with presets.on_host():
        model = stream_load.stream_training_model(
            path, LoraSpec(rank=16), dtype=dtype, quant=quant, double_quant=double_quant
        )
    seconds = time.time() - start
    peak = _peak_rss()
    model_bytes = sum(int(v.value.nbytes) for v in model.weights)
    budget = model_bytes + largest + GIB
    return {
        "checkpoint": path,
        "dtype": dtype,
        "quant": quant,
        "double_quant": double_quant,
        "load_seconds": round(seconds, 1),
        "peak_rss_gib": round(peak / GIB, 2),
        "rss_before_load_gib": round(before / GIB, 2),
        "model_gib": round(model_bytes / GIB, 2),
        "largest_tensor_gib": round(largest / GIB, 2),
        "budget_gib": round(budget / GIB, 2),
        "within_budget": peak <= budget,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="e2b", help="e2b | e4b | 26b_a4b | 31b")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype")
    parser.add_argument("--quant", default="nf4", help="none | nf4 | int8 | int4")
    parser.add_argument("--no_double_quant", action="store_true")
    parser.add_argument("--write_only", action="store_true")
    parser.add_argument("--config_only", default=None, help="write config to DIR")
    args = parser.parse_args()
    from gemma4_keras.testing import full_size

    if args.config_only:
        print(full_size.write_full_size(args.config_only, args.size, weights=False))
    elif args.write_only:
        print(full_size.full_size_checkpoint(args.size))
    else:
        path = ensure_checkpoint(args.size)
        result = measure(path, args.dtype, args.quant, not args.no_double_quant)
        print(json.dumps(result))


if __name__ == "__main__":
    main()
