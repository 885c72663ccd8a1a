"""Side by side: one LoRA train step here vs KerasHub and transformers + PEFT.

Run:
    python benchmarks/compare.py                       # the default shape (below)
    python benchmarks/compare.py --vocab 4096 --dim 128 --layers 4 --seq 128 \\
        --batch 2 --rounds 1 --min-free-gb 0           # a quick small run
    python benchmarks/compare.py --json > compare.json

One checkpoint, written by the package's own writer
(`gemma4_keras.testing.tiny.write_checkpoint`, seeded random float32 weights,
Hugging Face layout) at the given shape; default: the real 262,144-token
vocabulary, d 512, ffn 2048, 8 layers in the 3 sliding : 1 global pattern,
8 query / 2 KV heads (64 wide, 128 on global layers), sliding window 512.
The same seeded batches (`--batch` x `--seq` random tokens, next-token
targets, every token weighted) go to every system; LoRA rank 16, alpha 32,
no dropout, on all seven projections (q, k, v, o, gate, up, down); AdamW;
float32 compute. Each system runs in its own subprocess (so peak RSS is its
own) and the rounds are interleaved (system A, B, C, ..., then again), so a
machine whose load drifts treats all alike:

  ours-float   Gemma4LoraModel from the HF directory (`presets.
               build_training_model`), the run's optimiser (`train.
               compile_model`), `jax.jit(model.train_step)` as `fit` runs it;
               chunked cross-entropy over the tied head
  ours-nf4     the same with the frozen base in NF4 (QLoRA, `quant.mode=nf4`)
  kerashub     the KerasHub recipe: `Gemma4CausalLM.from_preset(dir)`,
               `backbone.enable_lora(16, all seven)`, `compile` with a
               from-logits sparse cross-entropy (full logits), `fit`
  peft         transformers `AutoModelForCausalLM` + PEFT `LoraConfig`
               (torch, CPU), `torch.optim.AdamW`, the model's own loss
  peft-bnb     the same on a bitsandbytes 4-bit NF4 base, where it runs on
               this machine (its error line is reported otherwise)

Per system and round: the median step time of steps 3..6 (1-based; step 1
compiles / warms up), tokens per second (batch x seq / that median), the
process's peak RSS (VmHWM, load included), the seconds to load and to the
first step, and the losses (all systems see the same batches, so the first
losses agree to within the float noise of the stacks; they are printed as a
sanity check). The table takes each system's best round; the ratio columns
compare with the fastest peer (kerashub, peft, peft-bnb). `--json` prints all
rounds.

Memory: at the default shape one process takes up to ~12 GB (PEFT's full
float32 logits), so before each run it waits until `--min-free-gb` (default
14) is available (`MemAvailable`), checking every 15 s.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
SYSTEMS = ("ours-float", "ours-nf4", "kerashub", "peft", "peft-bnb")
OURS = ("ours-float", "ours-nf4")
GIB = 1024**3
KERAS_HUB_TARGETS = [
    "query",
    "key",
    "value",
    "attention_output",
    "ffw_gating",
    "ffw_gating_2",
    "ffw_linear",
]
TIMED = slice(2, 6)  # steps 3..6 (1-based)
os.environ.setdefault("KERAS_BACKEND", "jax")  # before anything imports keras


# --- shared helpers -----------------------------------------------------------


def peak_rss() -> int:
    """This process's peak resident set size in bytes (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def wait_for_memory(min_free_gb: float) -> None:
    """Sleeps while less than `min_free_gb` GiB of memory is available."""
    while min_free_gb > 0 and mem_available() < min_free_gb * GIB:
        print(
            f"  waiting: {mem_available() / GIB:.1f} GiB available, need "
            f"{min_free_gb:g}",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(15)


def default_workdir() -> str:
    cache = os.environ.get("GEMMA4_KERAS_CACHE", "~/.cache/gemma4_keras")
    return os.path.join(os.path.expanduser(cache), "compare")


def hf_config(args) -> dict:
    """The checkpoint's config.json (`tiny_hf_config` at the requested shape)."""
    from gemma4_keras.testing import tiny

    period = args.sliding + 1
    types = [
        "full_attention" if (i + 1) % period == 0 else "sliding_attention"
        for i in range(args.layers)
    ]
    return tiny.tiny_hf_config(
        vocab_size=args.vocab,
        vocab_size_per_layer_input=args.vocab,
        hidden_size=args.dim,
        intermediate_size=4 * args.dim,
        num_hidden_layers=args.layers,
        layer_types=types,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=args.dim // 8,
        global_head_dim=args.dim // 4,
        sliding_window=args.window,
        max_position_embeddings=max(4096, args.seq),
    )


def write_checkpoint(args) -> pathlib.Path:
    """Writes (or reuses) the checkpoint for this shape under --workdir."""
    from gemma4_keras.testing import tiny

    config = hf_config(args)
    name = (
        f"v{args.vocab}_d{args.dim}_l{args.layers}_s{args.sliding}_w{args.window}"
        f"_seed{args.seed}"
    )
    path = pathlib.Path(args.workdir) / name
    if (path / "model.safetensors").exists():
        return path
    tmp = pathlib.Path(tempfile.mkdtemp(dir=args.workdir, prefix=".writing_"))
    tiny.write_checkpoint(tmp, config, seed=args.seed)
    tmp.rename(path)
    return path


def batches(args, vocab: int):
    """`steps` seeded batches: (ids [B, T], next-token targets [B, T])."""
    import numpy as np

    rng = np.random.default_rng(args.seed)
    out = []
    for _ in range(args.steps):
        ids = rng.integers(3, vocab, (args.batch, args.seq + 1)).astype("int32")
        out.append((ids[:, :-1], ids[:, 1:]))
    return out


# --- workers (one system per process) -----------------------------------------


def _ours_config(args, ckpt: pathlib.Path, nf4: bool):
    from gemma4_keras import config_lib

    config = config_lib.get_config("tiny", "qlora" if nf4 else "lora")
    config.model.preset = str(ckpt)
    config.model.dtype = "float32"
    config.data.max_length = args.seq
    config.train.batch_size = args.batch
    config.train.grad_accum = 1
    config.model.remat = bool(args.remat)
    config.train.max_steps = args.steps
    config.train.max_grad_norm = 0.0  # PEFT and KerasHub clip nothing either
    config.lora.rank = args.rank
    config.lora.alpha = 2.0 * args.rank
    config.lora.dropout = 0.0
    config.lora.targets = "all-linear"
    config_lib.validate(config)
    return config


def run_ours(args, ckpt: pathlib.Path, nf4: bool) -> dict:
    import jax
    import numpy as np

    from gemma4_keras import testing
    from gemma4_keras.model import presets
    from gemma4_keras.training import train

    config = _ours_config(args, ckpt, nf4)
    start = time.perf_counter()
    model = presets.build_training_model(str(ckpt), presets.ModelSettings.of(config))
    plan = train.Plan(args.steps, 1, 0)
    train.compile_model(model, config.train, train.build_schedule(config.train, plan))
    model.optimizer.build(model.trainable_variables)
    load_s = time.perf_counter() - start
    state = testing.train_step_state(model)
    step = jax.jit(model.train_step, donate_argnums=0)
    positions = np.tile(np.arange(args.seq, dtype="int32"), (args.batch, 1))
    times, losses = [], []
    for ids, targets in batches(args, model.spec.vocab_size):
        data = {
            "token_ids": ids,
            "positions": positions,
            "segment_ids": np.ones_like(ids),
            "target_ids": targets,
            "loss_weights": np.ones(ids.shape, "float32"),
            "loss_norm": np.full((args.batch,), float(ids.size), "float32"),
        }
        t0 = time.perf_counter()
        logs, state = step(state, (data,))
        losses.append(float(logs["loss"]))  # waits for the step
        times.append(time.perf_counter() - t0)
    return {"load_s": load_s, "step_s": times, "losses": losses}


def run_kerashub(args, ckpt: pathlib.Path) -> dict:
    import keras
    import keras_hub
    import numpy as np

    start = time.perf_counter()
    lm = keras_hub.models.Gemma4CausalLM.from_preset(
        str(ckpt), preprocessor=None, dtype="float32"
    )
    lm.backbone.enable_lora(args.rank, target_layer_names=KERAS_HUB_TARGETS)
    lm.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=2e-4, weight_decay=0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    load_s = time.perf_counter() - start
    data = batches(args, args.vocab)
    x = {
        "token_ids": np.concatenate([ids for ids, _ in data]),
        "padding_mask": np.ones((args.steps * args.batch, args.seq), "int32"),
        "position_ids": np.tile(
            np.arange(args.seq, dtype="int32"), (args.steps * args.batch, 1)
        ),
    }
    y = np.concatenate([t for _, t in data])

    class Timer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times, self.losses = [], []

        def on_train_batch_begin(self, batch, logs=None):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            # A plain callback gets python floats: the step has finished.
            self.losses.append(float(logs["loss"]))
            self.times.append(time.perf_counter() - self.t0)

    timer = Timer()
    lm.fit(x, y, batch_size=args.batch, epochs=1, shuffle=False, verbose=0,
           callbacks=[timer])  # fmt: skip
    # Keras reports the running mean of the epoch; turn it back into per-step.
    losses = [
        (i + 1) * m - i * p
        for i, (m, p) in enumerate(zip(timer.losses, [0.0] + timer.losses))
    ]
    return {"load_s": load_s, "step_s": timer.times, "losses": losses}


def run_peft(args, ckpt: pathlib.Path, bnb: bool) -> dict:
    import peft
    import torch
    import transformers

    from gemma4_keras import config_lib

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    kwargs = {"dtype": torch.float32}
    if bnb:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        kwargs["device_map"] = "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), **kwargs)
    lora = peft.LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,
        target_modules=list(config_lib.LORA_TARGETS),
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    load_s = time.perf_counter() - start
    times, losses = [], []
    for ids, targets in batches(args, args.vocab):
        ids_t = torch.from_numpy(ids).long()
        tgt = torch.from_numpy(targets).long()
        t0 = time.perf_counter()
        logits = model(input_ids=ids_t).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1)
        )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
    return {"load_s": load_s, "step_s": times, "losses": losses}


def worker(args) -> None:
    """Runs one system and writes its figures as JSON to --out."""
    ckpt = pathlib.Path(args.ckpt)
    try:
        if args.worker in OURS:
            result = run_ours(args, ckpt, nf4=args.worker == "ours-nf4")
        elif args.worker == "kerashub":
            result = run_kerashub(args, ckpt)
        else:
            result = run_peft(args, ckpt, bnb=args.worker == "peft-bnb")
        result["peak_rss"] = peak_rss()
    except Exception as e:  # the table reports a system that cannot run here
        msg = f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]
        result = {"error": msg}
    pathlib.Path(args.out).write_text(json.dumps(result))


# --- driver -------------------------------------------------------------------


def run_system(args, system: str, ckpt: pathlib.Path) -> dict:
    wait_for_memory(args.min_free_gb)
    with tempfile.NamedTemporaryFile(suffix=".json", dir=args.workdir) as out:
        cmd = [sys.executable, __file__, "--worker", system, "--ckpt", str(ckpt),
               "--out", out.name] + shape_flags(args)  # fmt: skip
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        env.setdefault("KERAS_BACKEND", "jax")
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        text = pathlib.Path(out.name).read_text()
    if not text:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": f"exit {proc.returncode}: {tail[0][:300]}", "wall_s": wall}
    result = json.loads(text)
    result["wall_s"] = wall
    if "step_s" in result:
        timed = result["step_s"][TIMED]
        result["median_s"] = statistics.median(timed)
        result["tokens_per_s"] = args.batch * args.seq / result["median_s"]
    return result


def shape_flags(args) -> list[str]:
    return [
        f"--vocab={args.vocab}", f"--dim={args.dim}", f"--layers={args.layers}",
        f"--sliding={args.sliding}", f"--window={args.window}",
        f"--batch={args.batch}", f"--seq={args.seq}", f"--rank={args.rank}",
        f"--steps={args.steps}", f"--seed={args.seed}", f"--remat={int(args.remat)}",
    ]  # fmt: skip


def best_rounds(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    """Per system: the round with the highest tokens/s (or its last error)."""
    best: dict[str, dict] = {}
    for one in rounds:
        for system, r in one.items():
            old = best.get(system)
            if old is None or r.get("tokens_per_s", 0) > old.get("tokens_per_s", 0):
                best[system] = r
    return best


def table(best: dict[str, dict]) -> str:
    peers = {s: r for s, r in best.items() if s not in OURS and "tokens_per_s" in r}
    fastest = max(peers, key=lambda s: peers[s]["tokens_per_s"]) if peers else None
    kh = best.get("kerashub", {})
    lines = [
        f"{'system':<11} {'step s':>8} {'tokens/s':>9} {'peak RSS GB':>11} "
        f"{'x fastest peer':>14} {'RSS x it':>8} {'x kerashub':>10}  first losses",
        "-" * 100,
    ]
    for system, r in best.items():
        if "tokens_per_s" not in r:
            lines.append(f"{system:<11} unavailable: {r.get('error', '?')}")
            continue
        speed = rss = vs_kh = ""
        if fastest:
            speed = f"{r['tokens_per_s'] / peers[fastest]['tokens_per_s']:.2f}"
            rss = f"{r['peak_rss'] / peers[fastest]['peak_rss']:.2f}"
        if "tokens_per_s" in kh:
            vs_kh = f"{r['tokens_per_s'] / kh['tokens_per_s']:.2f}"
        losses = " ".join(f"{x:.3f}" for x in r["losses"][:2])
        lines.append(
            f"{system:<11} {r['median_s']:>8.2f} {r['tokens_per_s']:>9.1f} "
            f"{r['peak_rss'] / 1e9:>11.2f} {speed:>14} {rss:>8} {vs_kh:>10}  {losses}"
        )
    if fastest:
        lines.append(f"(fastest peer: {fastest}; GB = 1e9 bytes)")
    return "\n".join(lines)


def machine() -> dict:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for name in ("jax", "keras", "keras-hub", "torch", "transformers", "peft",
                 "bitsandbytes"):  # fmt: skip
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:  # just not reported
            pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "mem_gib": round(
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
        ),
        "python": platform.python_version(),
        "load_avg_at_start": os.getloadavg(),
        **versions,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=262144)
    p.add_argument("--dim", type=int, default=512, help="hidden size (ffn = 4x)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--sliding", type=int, default=3, help="sliding layers per global")
    p.add_argument("--window", type=int, default=512, help="sliding window")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=6, help="steps per run (>= 6)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--remat", type=int, default=0, help="ours: remat blocks (0/1)")
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--min-free-gb", type=float, default=14.0)
    p.add_argument("--workdir", default=default_workdir(), help="checkpoint cache")
    p.add_argument("--json", action="store_true", help="print all rounds as JSON")
    p.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.steps < 6:
        p.error("--steps must be at least 6 (steps 3..6 are timed)")
    os.makedirs(args.workdir, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    info = machine()
    ckpt = write_checkpoint(args)
    print(f"checkpoint: {ckpt}", file=sys.stderr, flush=True)
    rounds = []
    for i in range(args.rounds):
        one = {}
        for system in args.systems:
            one[system] = r = run_system(args, system, ckpt)
            figure = (
                f"{r['tokens_per_s']:.1f} tok/s, {r['peak_rss'] / 1e9:.2f} GB"
                if "tokens_per_s" in r
                else r.get("error")
            )
            print(f"round {i + 1} {system}: {figure}", file=sys.stderr, flush=True)
            # The whole record too, so an interrupted run keeps its figures.
            print(json.dumps({"round": i + 1, "system": system, **r}),
                  file=sys.stderr, flush=True)  # fmt: skip
        rounds.append(one)
    best = best_rounds(rounds)
    info["load_avg_at_end"] = os.getloadavg()
    shape = {k: getattr(args, k) for k in
             ("vocab", "dim", "layers", "sliding", "window", "batch", "seq", "rank",
              "steps", "rounds", "remat")}  # fmt: skip
    if args.json:
        print(json.dumps({"shape": shape, "machine": info, "rounds": rounds,
                          "best": best}, indent=1))  # fmt: skip
        return
    print(f"shape: {shape}")
    print(f"machine: {info}")
    print(table(best))


if __name__ == "__main__":
    main()
