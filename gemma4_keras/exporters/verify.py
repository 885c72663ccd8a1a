"""`export --verify`: the written artifact, run in its own engine, against the package.

    report = verify(out, "gguf", load_model, prompts, plain=a_id)  # after export

Each format is loaded by the engine that serves it, in a subprocess (its
imports, threads and memory stay out of this process): transformers for
`hf`, transformers + PEFT for `peft`, KerasHub for `keras`, llama.cpp
(llama-server's code through `xllamacpp`, the `llama` extra) for `gguf` and
`gguf-lora` (its `base-*.gguf` with `--lora adapter-*.gguf`), and vLLM for
`hf` / `peft` (the adapter as a LoRA request on its base) where it is
installed with a CUDA device (else a skip line says why; not yet run on a
GPU).

On each prompt (token ids; `export --verify` takes the run's held-out
prompts) the engine and the package's own model (`Gemma4LoraModel`, the
adapter active) decode greedily up to `max_new_tokens`, stopping at Gemma 4's
stop tokens, and score the first new token:

    greedy_agreement   prompts whose greedy continuation is identical
    first_token        cosine of the first-token logits (hf, peft, keras);
                       llama.cpp gives no logits, so for GGUF the largest
                       |difference| of the top-20 probabilities (n_probs)
    adapter_changes    prompts whose greedy answer differs between base and
                       adapted (in the engine where it holds both: peft,
                       gguf-lora; else the package's model)

`verify.json` and `verify.md` (a table) go into the export directory. An
agreement under `THRESHOLDS` raises `VerifyError` naming the format.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from gemma4_keras.exporters.hf import ExportError
from gemma4_keras.model import decoding

# A format passes when at least this share of prompts decode identically and
# its first-token scores agree this closely (tiny run, f32: cosine 1.0 to
# 1e-6, probabilities to ~1e-4; f16/q8_0 GGUF: ~1e-3).
THRESHOLDS = {"greedy_agreement": 0.75, "cosine": 0.999, "prob_diff": 0.02}
TOP_N = 20
INSTALL = {
    "hf": "pip install 'transformers>=5.24' torch",
    "peft": "pip install 'transformers>=5.24' 'peft>=0.21' torch",
    "keras": "pip install keras-hub (installed with gemma4-keras)",
    "gguf": "pip install 'gemma4-keras[llama]'",
    "gguf-lora": "pip install 'gemma4-keras[llama]'",
    "vllm": "pip install vllm (on a CUDA machine)",
}
MODULES = {
    "hf": ("torch", "transformers"),
    "peft": ("torch", "transformers", "peft"),
    "keras": ("keras_hub",),
    "gguf": ("xllamacpp",),
    "gguf-lora": ("xllamacpp",),
    "vllm": ("vllm",),
}


class VerifyError(ExportError):
    """The export does not answer as the package's model does (or cannot run)."""


@dataclasses.dataclass
class Answers:
    """Greedy continuations and first-token scores of one model on the prompts.

    `first` holds full-vocabulary logits (N, vocab), or for llama.cpp the
    top-`TOP_N` ids and probabilities of the first token (`top_ids`, `first`).
    """

    greedy: list[list[int]]
    first: np.ndarray
    top_ids: np.ndarray | None = None


def package_answers(model, prompts: list[list[int]], max_new_tokens: int) -> Answers:
    """The package's own model (its active adapter) on `prompts`, greedily.

    Every step is one forward pass over all prompts, right-padded to one
    length (causal attention: padding after a position never reaches it),
    so there is one compilation.
    """
    n, longest = len(prompts), max(map(len, prompts))
    length = longest + max_new_tokens
    tokens = np.zeros((n, length), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    ends = np.array([len(p) for p in prompts])
    done = np.zeros(n, bool)
    greedy: list[list[int]] = [[] for _ in prompts]
    first = None
    for step in range(max_new_tokens):
        batch = {
            "token_ids": tokens,
            "positions": np.broadcast_to(
                np.arange(length, dtype=np.int32), (n, length)
            ),
            "segment_ids": (np.arange(length)[None] < ends[:, None]).astype(np.int32),
        }
        logits = np.asarray(model.logits(model(batch)), np.float32)
        last = logits[np.arange(n), ends - 1]
        if step == 0:
            first = last
        for i, t in enumerate(last.argmax(-1)):
            if done[i] or int(t) in decoding.STOP_IDS:
                done[i] = True
                continue
            greedy[i].append(int(t))
            tokens[i, ends[i]] = t
            ends[i] += 1
        if done.all():
            break
    return Answers(greedy, first)


# ----------------------------------------------------------------------------
# The engines: one script each, run as `python -c SCRIPT job.json`. A job is
# {"path", "prompts", "max_new_tokens", "stop", "out", "base"}; the script
# writes out.json (greedy per prompt, for "adapted" and, where it can,
# "base") and out-<which>.npy (first-token scores).

_TORCH = r"""
import json, sys
import numpy as np, torch
job = json.load(open(sys.argv[1]))
torch.set_num_threads(2)

def answers(model, which):
    greedy, first = [], []
    with torch.no_grad():
        for ids in job["prompts"]:
            x, new = torch.tensor([ids]), []
            for step in range(job["max_new_tokens"]):
                logits = model(input_ids=x).logits[0, -1].float()
                if step == 0:
                    first.append(logits.numpy())
                t = int(logits.argmax())
                if t in job["stop"]:
                    break
                new.append(t)
                x = torch.cat([x, torch.tensor([[t]])], 1)
            greedy.append(new)
    np.save(job["out"] + f"-{which}.npy", np.stack(first))
    return greedy
"""

ENGINES = {
    "hf": _TORCH
    + r"""
import transformers
model = transformers.AutoModelForCausalLM.from_pretrained(job["path"], dtype=torch.float32)
out = {"adapted": answers(model.eval(), "adapted")}
json.dump(out, open(job["out"] + ".json", "w"))
""",
    "peft": _TORCH
    + r"""
import peft
model = peft.AutoPeftModelForCausalLM.from_pretrained(job["path"], dtype=torch.float32)
out = {"adapted": answers(model.eval(), "adapted")}
with model.disable_adapter():
    out["base"] = answers(model, "base")
json.dump(out, open(job["out"] + ".json", "w"))
""",
    "keras": r"""
import json, sys
import numpy as np, keras_hub
job = json.load(open(sys.argv[1]))
lm = keras_hub.models.Gemma4CausalLM.from_preset(job["path"])
lm.preprocessor = None  # token ids in, logits out
# All prompts each step, right-padded to one length: one compilation.
prompts, k = job["prompts"], job["max_new_tokens"]
n, length = len(prompts), max(map(len, prompts)) + k
tokens = np.zeros((n, length), np.int32)
for i, p in enumerate(prompts):
    tokens[i, : len(p)] = p
ends = np.array([len(p) for p in prompts])
done, greedy = np.zeros(n, bool), [[] for _ in prompts]
for step in range(k):
    inputs = {"token_ids": tokens,
              "padding_mask": (np.arange(length)[None] < ends[:, None]).astype(np.int32),
              "position_ids": np.broadcast_to(np.arange(length, dtype=np.int32), (n, length))}
    last = np.asarray(lm.predict_on_batch(inputs), np.float32)[np.arange(n), ends - 1]
    if step == 0:
        np.save(job["out"] + "-adapted.npy", last)
    for i, t in enumerate(last.argmax(-1)):
        if done[i] or int(t) in job["stop"]:
            done[i] = True
            continue
        greedy[i].append(int(t))
        tokens[i, ends[i]] = t
        ends[i] += 1
json.dump({"adapted": greedy}, open(job["out"] + ".json", "w"))
""",
    "gguf": r"""
import json, sys, urllib.request
import numpy as np, xllamacpp
job = json.load(open(sys.argv[1]))

def server(lora=None):
    p = xllamacpp.CommonParams()
    p.model.path = job["path"]
    if lora:
        p.lora_adapters = [xllamacpp.CommonAdapterLoraInfo(lora, 1.0)]
    p.n_ctx = max(map(len, job["prompts"])) + job["max_new_tokens"] + 8
    p.n_parallel, p.verbosity = 1, 0
    p.cpuparams.n_threads = p.cpuparams_batch.n_threads = 2
    return xllamacpp.Server(p)

def answers(s, which):
    greedy, ids, probs = [], [], []
    for prompt in job["prompts"]:
        body = {"prompt": prompt, "n_predict": job["max_new_tokens"],
                "temperature": 0, "return_tokens": True}
        req = urllib.request.Request(s.listening_address + "/completion",
            data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        tokens = json.load(urllib.request.urlopen(req, timeout=600))["tokens"]
        cut = [i for i, t in enumerate(tokens) if t in job["stop"]]
        greedy.append(tokens[: cut[0]] if cut else tokens)
        # Probabilities before sampling; the bias only picks a token whose
        # text is complete, as llama-server reports none after a stop token
        # or a partial UTF-8 character.
        r = s.handle_completions({"prompt": prompt, "n_predict": 1, "temperature": 0,
            "n_probs": job["top_n"], "logit_bias": [[job["plain"], 100]]})
        top = r["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        ids.append([t["id"] for t in top])
        probs.append([float(np.exp(t["logprob"])) for t in top])
    np.save(job["out"] + f"-{which}.npy", np.array([ids, probs]))
    return greedy

out = {"adapted": answers(server(job.get("lora")), "adapted")}
if job.get("lora"):
    out["base"] = answers(server(), "base")
json.dump(out, open(job["out"] + ".json", "w"))
""",
}
ENGINES["gguf-lora"] = ENGINES["gguf"]
# vLLM (CUDA only) serves `hf` as the model and `peft` as a LoRA request on
# its base; scored like llama.cpp, by its top-`TOP_N` first-token logprobs.
ENGINES["vllm"] = r"""
import json, sys
import numpy as np
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest
job = json.load(open(sys.argv[1]))
lora = job.get("lora")
llm = LLM(model=job["path"], dtype="float32", enforce_eager=True, seed=0,
          max_model_len=max(map(len, job["prompts"])) + job["max_new_tokens"] + 8,
          enable_lora=bool(lora), max_lora_rank=job.get("rank") or 16,
          gpu_memory_utilization=0.5)
params = SamplingParams(temperature=0.0, max_tokens=job["max_new_tokens"],
                        logprobs=job["top_n"], stop_token_ids=job["stop"])

def answers(request, which):
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    greedy, ids, probs = [], [], []
    for o in llm.generate(prompts, params, lora_request=request):
        c = o.outputs[0]
        tokens = list(c.token_ids)
        cut = [i for i, t in enumerate(tokens) if t in job["stop"]]
        greedy.append(tokens[: cut[0]] if cut else tokens)
        top = sorted(c.logprobs[0].items(), key=lambda kv: -kv[1].logprob)
        ids.append([t for t, _ in top[: job["top_n"]]])
        probs.append([float(np.exp(v.logprob)) for _, v in top[: job["top_n"]]])
    np.save(job["out"] + f"-{which}.npy", np.array([ids, probs]))
    return greedy

out = {"adapted": answers(LoRARequest("export", 1, lora) if lora else None, "adapted")}
if lora:
    out["base"] = answers(None, "base")
json.dump(out, open(job["out"] + ".json", "w"))
"""


def _artifact(out: str, fmt: str, engine: str) -> dict:
    """{"path": what the engine opens, "lora": the adapter, if any}."""
    if engine == "vllm" and fmt == "peft":
        with open(os.path.join(out, "adapter_config.json")) as f:
            config = json.load(f)
        base = config["base_model_name_or_path"]
        return {"path": base, "lora": os.path.abspath(out), "rank": config["r"]}
    if fmt in ("gguf", "gguf-lora"):
        stem = "base" if fmt == "gguf-lora" else "model"
        found = sorted(glob.glob(os.path.join(out, f"{stem}-*.gguf")))
        if not found:
            raise VerifyError(f"--format={fmt}: no {stem}-*.gguf in {out}")
        job = {"path": found[0]}
        if fmt == "gguf-lora":
            job["lora"] = sorted(glob.glob(os.path.join(out, "adapter-*.gguf")))[0]
        return job
    return {"path": os.path.abspath(out)}


def missing_engine(fmt: str) -> str | None:
    """Why `fmt`'s engine cannot run here (with the install command), or None."""
    absent = [m for m in MODULES[fmt] if importlib.util.find_spec(m) is None]
    if absent:
        return f"--verify of --format={fmt} needs {', '.join(absent)}: {INSTALL[fmt]}"
    return None


def run_engine(
    fmt: str, out: str, prompts, max_new_tokens: int, plain: int, engine: str = ""
):
    """({"adapted": Answers, "base": Answers?}) of the export in its engine.

    `engine`: "vllm" for `hf` / `peft` on vLLM; "" the format's own.
    """
    engine = engine or fmt
    reason = missing_engine(engine)
    if reason:
        raise VerifyError(reason)
    with tempfile.TemporaryDirectory() as tmp:
        job = {
            **_artifact(out, fmt, engine),
            "prompts": [list(map(int, p)) for p in prompts],
            "max_new_tokens": max_new_tokens,
            "stop": list(decoding.STOP_IDS),
            "top_n": TOP_N,
            "plain": plain,
            "out": os.path.join(tmp, "out"),
        }
        with open(os.path.join(tmp, "job.json"), "w") as f:
            json.dump(job, f)
        proc = subprocess.run(
            [sys.executable, "-c", ENGINES[engine], os.path.join(tmp, "job.json")],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])[-2000:]
            raise VerifyError(
                f"--format={fmt}: the export does not run in {engine} "
                f"(exit {proc.returncode}):\n{tail}"
            )
        with open(job["out"] + ".json") as f:
            greedy = json.load(f)
        result = {}
        for which, g in greedy.items():
            scores = np.load(job["out"] + f"-{which}.npy")
            if engine in ("gguf", "gguf-lora", "vllm"):
                result[which] = Answers(g, scores[1], scores[0].astype(np.int64))
            else:
                result[which] = Answers(g, scores)
        return result


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def compare(fmt: str, engine: dict, package: Answers, package_base: Answers) -> dict:
    """The row of the table for `fmt` (see the module doc) and whether it passes."""
    got = engine["adapted"]
    same = [a == b for a, b in zip(got.greedy, package.greedy)]
    row = {
        "format": fmt,
        "prompts": len(same),
        "greedy_agreement": float(np.mean(same)),
    }
    if got.top_ids is None:
        a, b = got.first, package.first
        cos = (a * b).sum(-1) / (
            np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
        )
        row["first_token"] = {"metric": "logit cosine (min)", "value": float(cos.min())}
        ok = row["first_token"]["value"] >= THRESHOLDS["cosine"]
    else:
        want = np.take_along_axis(_softmax(package.first), got.top_ids, -1)
        diff = float(np.abs(got.first - want).max())
        row["first_token"] = {
            "metric": f"top-{TOP_N} probability, max abs. difference",
            "value": diff,
        }
        ok = diff <= THRESHOLDS["prob_diff"]
    base = engine.get("base")
    where = "engine" if base is not None else "package"
    base_greedy = (base or package_base).greedy
    adapted = got.greedy if base is not None else package.greedy
    changed = [a != b for a, b in zip(adapted, base_greedy)]
    row["adapter_changes"] = {"prompts": int(sum(changed)), "where": where}
    row["passed"] = bool(
        ok and row["greedy_agreement"] >= THRESHOLDS["greedy_agreement"]
    )
    return row


def vllm_skip() -> str | None:
    """Why vLLM is not run here, or None (it is installed, with CUDA)."""
    if importlib.util.find_spec("vllm") is None:
        return "vllm: skipped (not installed; pip install vllm, on a CUDA machine)"
    import torch  # only where vLLM is installed: it needs a CUDA device

    if not torch.cuda.is_available():
        return "vllm: skipped (no CUDA device)"
    return None


def table(rows: list[dict], skips: list[str]) -> str:
    lines = [
        "| format | greedy agreement | first token | adapter changes output | passed |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ft, ac = r["first_token"], r["adapter_changes"]
        lines.append(
            f"| {r['format']} | {r['greedy_agreement']:.0%} of {r['prompts']} | "
            f"{ft['metric']}: {ft['value']:.3g} | "
            f"{ac['prompts']} of {r['prompts']} prompts ({ac['where']}) | "
            f"{'yes' if r['passed'] else 'NO'} |"
        )
    return "\n".join(lines + [""] + [f"- {s}" for s in skips]) + "\n"


def verify(
    out: str,
    fmt: str,
    load_model: Callable[[], Any],
    prompts: list[list[int]],
    *,
    max_new_tokens: int = 8,
    plain: int,
) -> dict:
    """Runs export `out` (`fmt`) in its engine against the package's model on `prompts`.

    Args:
        out: the export directory (`commands.export`'s result).
        fmt: its format.
        load_model: returns the package's `Gemma4LoraModel` with the run's
            adapter active; called after the engine's process has ended, so
            the two models are never in memory together.
        prompts: token ids of each prompt (the chat prompt, `<bos>` first).
        max_new_tokens: greedy tokens compared per prompt.
        plain: id of a plain-text token (llama.cpp scoring; see ENGINES).

    Returns:
        {"rows": [...], "skips": [...], "thresholds": THRESHOLDS}; also written
        to `out/verify.json`, with the table in `out/verify.md`.

    Raises:
        VerifyError: the engine is missing or fails, or the export disagrees.
    """
    engine = run_engine(fmt, out, prompts, max_new_tokens, plain)
    model = load_model()
    package = package_answers(model, prompts, max_new_tokens)
    active = model.active_adapter
    model.set_adapter(None)
    try:
        package_base = package_answers(model, prompts, max_new_tokens)
    finally:
        model.set_adapter(active)
    rows = [compare(fmt, engine, package, package_base)]
    skips = []
    if fmt in ("hf", "peft"):
        skip = vllm_skip()
        if skip is None:
            served = run_engine(fmt, out, prompts, max_new_tokens, plain, "vllm")
            rows.append(compare(f"{fmt} (vllm)", served, package, package_base))
        else:
            skips.append(skip)
    report = {"rows": rows, "skips": skips, "thresholds": THRESHOLDS}
    with open(os.path.join(out, "verify.json"), "w") as f:
        json.dump(report, f, indent=2)
    text = table(rows, skips)
    with open(os.path.join(out, "verify.md"), "w") as f:
        f.write(text)
    print(text, end="")
    failed = [r["format"] for r in rows if not r["passed"]]
    if failed:
        raise VerifyError(
            f"--verify: --format={', '.join(failed)} does not answer as the package's "
            f"model does (thresholds {THRESHOLDS}); see {out}/verify.md"
        )
    return report
