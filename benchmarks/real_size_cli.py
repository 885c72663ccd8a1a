"""Real sizes through the front door: `gemma4-keras` as a user runs it, RSS sampled.

Run (the checkpoint is written once to ~/.cache/gemma4_keras/full_size/):
    python benchmarks/real_size_cli.py --size=e2b --method=qlora
    python benchmarks/real_size_cli.py --size=e4b --method=qlora --commands=train
    python benchmarks/real_size_cli.py --size=e2b --dtype=bfloat16

Runs the console command itself, each in its own process, with default
settings except the preset, the data and a short run (as issue #23 asks):

    gemma4-keras train --config=configs/<size>_<method>.py --workdir=W \\
        --config.model.preset=CKPT --config.data.path=DATA \\
        --config.train.max_steps=2 --config.data.max_length=256 \\
        --config.train.batch_size=1 --config.train.grad_accum=1 \\
        --config.eval.max_examples=2
    gemma4-keras evaluate (same flags) --out=W/eval_again
    gemma4-keras export   (same flags) --format=peft|hf --out=...

and samples the resident set of the command's process tree every 0.2 s
(`/proc/<pid>/status` VmRSS). The train command's phases are told apart by
what it writes: `load` until it logs "training steps", `compile + step 1`
until the first row of train_log.csv, `steps` until it logs "saved
checkpoint", then `evaluate` (the run's own base-vs-fine-tuned report).
Prints one JSON object and a Markdown table (peak GiB per phase, seconds),
with `gemma4-keras plan`'s host estimate beside each; `docs/real_size.md`
keeps the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, ROOT)
os.environ.setdefault("KERAS_BACKEND", "jax")

GIB = 1024**3
# (phase, what ends it): a log line, or a file that appears in the workdir.
TRAIN_PHASES = (
    ("load", ("log", "training steps")),
    ("compile + step 1", ("file", "train_log.csv")),
    ("steps", ("log", "saved checkpoint")),
    ("evaluate", None),
)


def tree_rss(pid: int) -> int:
    """Bytes resident in `pid` and its descendants (0 once it has exited)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(
                    int(line.split()[1]) * 1024
                    for line in f
                    if line.startswith("VmRSS:")
                )
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total


def run_sampled(argv: list[str], log: str, workdir: str, phases=None) -> dict:
    """Runs `argv`, sampling RSS; returns {phase: {peak_gib, seconds}} and rc."""
    phases = phases or ((argv[1], None),)
    figures, index = {}, 0
    start = phase_start = time.time()
    peak = 0
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        while True:
            done = proc.poll() is not None
            peak = max(peak, tree_rss(proc.pid))
            name, until = phases[index]
            ended = done or (until is not None and _reached(until, log, workdir))
            if ended:
                now = time.time()
                figures[name] = {
                    "peak_gib": round(peak / GIB, 2),
                    "seconds": round(now - phase_start, 1),
                }
                phase_start, peak = now, 0
                index = min(index + 1, len(phases) - 1)
                if done:
                    break
                continue
            time.sleep(0.2)
    figures["all"] = {
        "peak_gib": max(f["peak_gib"] for f in figures.values()),
        "seconds": round(time.time() - start, 1),
    }
    return {"phases": figures, "rc": proc.returncode, "log": log}


def _reached(until, log: str, workdir: str) -> bool:
    kind, what = until
    if kind == "file":
        path = os.path.join(workdir, what)
        return os.path.exists(path) and sum(1 for _ in open(path)) > 1
    with open(log, errors="replace") as f:
        return what in f.read()


def base_flags(args, preset: str, data: str) -> list[str]:
    flags = [
        f"--config={ROOT}/configs/{args.size}_{args.method}.py",
        f"--config.model.preset={preset}",
        f"--config.data.path={data}",
        f"--config.train.max_steps={args.steps}",
        f"--config.data.max_length={args.seq}",
        "--config.train.batch_size=1",
        "--config.train.grad_accum=1",
        "--config.eval.max_examples=2",
    ]
    if args.dtype != "auto":
        flags.append(f"--config.model.dtype={args.dtype}")
    return flags


def plan_host(flags: list[str]) -> dict:
    """`gemma4-keras plan`'s host estimate per phase, in GiB."""
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(
            [_cli(), "plan", *flags, f"--out={out}"],
            check=True,
            capture_output=True,
            cwd=ROOT,
        )
        with open(os.path.join(out, "plan.json")) as f:
            estimate = json.load(f)
    return {k: round(v / GIB, 2) for k, v in estimate["host_bytes"].items()}


def _cli() -> str:
    return shutil.which("gemma4-keras") or os.path.join(
        os.path.dirname(sys.executable), "gemma4-keras"
    )


def write_data(path: str, lines: int) -> str:
    from importlib import resources

    text = resources.files("gemma4_keras.resources").joinpath("sentiment.jsonl")
    rows = text.read_text(encoding="utf-8").splitlines()[:lines]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(rows) + "\n")
    return path


def table(result: dict) -> str:
    rows = [
        "| command | phase | peak RSS GiB | plan GiB | seconds |",
        "|---|---|---:|---:|---:|",
    ]
    plan = result.get("plan_host_gib", {})
    for command, res in result["commands"].items():
        for phase, fig in res["phases"].items():
            estimate = plan.get(command, "") if phase == "all" else ""
            rows.append(
                f"| {command} | {phase} | {fig['peak_gib']:.2f} | "
                f"{estimate} | {fig['seconds']:.0f} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="e2b", choices=["e2b", "e4b", "tiny"])
    parser.add_argument("--method", default="qlora", choices=["qlora", "lora"])
    parser.add_argument("--dtype", default="auto", help="model.dtype (auto = default)")
    parser.add_argument("--commands", default="train,evaluate,export_peft,export_hf")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--workdir", default=None, help="default: a temp directory")
    args = parser.parse_args()

    from gemma4_keras.testing import full_size, tiny

    if args.size == "tiny":  # a smoke run of this script
        preset = str(tiny.tiny_checkpoint(layout="conditional_generation"))
        args.size = "e2b"  # any size's config file; the preset decides
    else:
        preset = str(full_size.full_size_checkpoint(args.size))
    root = args.workdir or tempfile.mkdtemp(prefix="real_size_cli_")
    os.makedirs(root, exist_ok=True)
    data = write_data(os.path.join(root, "data.jsonl"), 200)
    workdir = os.path.join(root, "run")
    flags = base_flags(args, preset, data)
    result = {
        "size": args.size,
        "method": args.method,
        "dtype": args.dtype,
        "seq": args.seq,
        "steps": args.steps,
        "preset": preset,
        "plan_host_gib": plan_host(flags),
        "commands": {},
    }
    commands = {
        "train": (["train", f"--workdir={workdir}"], TRAIN_PHASES),
        "evaluate": (
            ["evaluate", f"--workdir={workdir}", f"--out={root}/eval_again"],
            None,
        ),
        "export_peft": (
            ["export", f"--workdir={workdir}", "--format=peft", f"--out={root}/peft"],
            None,
        ),
        "export_hf": (
            ["export", f"--workdir={workdir}", "--format=hf", f"--out={root}/hf"],
            None,
        ),
    }
    for name in args.commands.split(","):
        sub, phases = commands[name]
        argv = [_cli(), sub[0], *flags, *sub[1:]]
        log = os.path.join(root, f"{name}.log")
        res = run_sampled(argv, log, workdir, phases or ((name, None),))
        result["commands"][name] = res
        print(json.dumps({name: res}), file=sys.stderr, flush=True)
        if res["rc"] != 0:
            break
    shutil.rmtree(os.path.join(root, "hf"), ignore_errors=True)  # GBs of disk
    print(json.dumps(result, indent=2))
    print(table(result))


if __name__ == "__main__":
    main()
