"""Helpers for the export tests: a fake finished run with a "trained" adapter."""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np

from gemma4_keras.exporters import peft
from gemma4_keras.model import schema
from gemma4_keras.model.gemma4_lora_model import Gemma4LoraModel
from gemma4_keras.model.lora import LoraSpec
from gemma4_keras.testing.tiny import tiny_checkpoint

TOKENS = np.array([[2, 105, 120, 300, 451, 77, 600, 1000, 5, 106, 9, 200]], np.int32)


def trained_model(
    preset: str, seed: int = 0, rank: int = 4, targets=None
) -> Gemma4LoraModel:
    """The tiny base with an all-linear adapter (or `targets`, e.g. with the
    MoE expert banks) set to seeded non-zero values."""
    import keras_hub

    backbone = keras_hub.models.Gemma4Backbone.from_preset(preset, dtype="float32")
    kw = {} if targets is None else {"targets": tuple(targets)}
    model = Gemma4LoraModel.from_backbone(
        backbone, LoraSpec(rank=rank, alpha=2.0 * rank, **kw), dtype="float32"
    )
    rng = np.random.default_rng(seed)
    for adapter in model.adapters().values():
        adapter.lora_a.assign(
            rng.normal(0, 0.2, adapter.lora_a.shape).astype(np.float32)
        )
        adapter.lora_b.assign(
            rng.normal(0, 0.2, adapter.lora_b.shape).astype(np.float32)
        )
    return model


def fake_workdir(root: str, model, preset: str, status: str = "finished") -> str:
    """workdir with config.json, adapter/ (PEFT) and run_state.json."""
    workdir = os.path.join(root, "run")
    os.makedirs(workdir, exist_ok=True)
    peft.save_adapter(model, os.path.join(workdir, "adapter"), base_model=preset)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"model": {"preset": preset}, "lora": {"rank": 4}}, f)
    with open(os.path.join(workdir, "run_state.json"), "w") as f:
        json.dump({"status": status, "step": 10, "eval": {"accuracy": 0.75}}, f)
    return workdir


def config_for(preset: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"model": {"preset": preset}})


def keras_logits(model, tokens: np.ndarray = TOKENS) -> np.ndarray:
    """Soft-capped float32 logits of the Keras model (active adapter applied)."""
    t = tokens.shape[1]
    batch = {
        "token_ids": tokens,
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), tokens.shape),
        "segment_ids": np.ones_like(tokens),
    }
    return np.asarray(model.logits(model(batch)), np.float32)


def keras_greedy(model, tokens: list[int], n: int) -> list[int]:
    """`n` greedy tokens of the Keras model after `tokens` (full recompute)."""
    out = list(tokens)
    for _ in range(n):
        out.append(
            int(keras_logits(model, np.asarray([out], np.int32))[0, -1].argmax())
        )
    return out[len(tokens) :]


def _held(model, row, layer) -> np.ndarray:
    """A schema row's tensor as the model holds it (ours), float32, dequantised."""
    if layer is None:
        return np.asarray(model.globals[row.name].value, np.float32)
    blk = model.blocks[layer]
    if row.kind == "projection":
        return np.asarray(blk.proj[row.name].weight("float32"))
    held = (blk.norms if row.kind == "norm" else blk.extra)[row.name]
    if hasattr(held, "dequantize"):  # an NF4 expert bank
        return np.asarray(held.dequantize("float32"))
    return np.asarray(held.value, np.float32)


def merged_tensors(model, prefix: str = "model.") -> dict[str, np.ndarray]:
    """HF tensors (float32) of a `Gemma4LoraModel`, its active adapter merged:
    the Keras model's own weights, row by row of the schema, plus each site's
    `LoraAdapter.delta_weight()` (the oracle of the streamed merge); an
    expert bank row gets its part of its HF tensor's per-expert delta."""
    adapters = model.adapters() if model.active_adapter else {}
    out = {}
    for name, (_, parts) in schema.hf_tensors(model.spec).items():
        values = []
        for row, layer in parts:
            value = _held(model, row, layer)
            target = row.name
            if row.kind == "bank":  # its HF tensor names the expert target
                target = row.hf.removeprefix("layers.{i}.")
            if (layer, target) in adapters:
                delta = adapters[(layer, target)].delta_weight()
                value = value + schema.part_of(row, delta)
            values.append((row, value))
        out[prefix + name] = np.ascontiguousarray(schema.hf_value(values), np.float32)
    return out


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def variant_preset(**variant) -> str:
    return str(tiny_checkpoint(**variant))


# ----------------------------------------------------------------------------
# Runs without a Keras model: adapters as factors, bases written by others.


def random_factors(preset: str, lora_spec, seed: int = 0) -> dict:
    """Seeded non-zero factors for every site `lora_spec` gives on `preset`."""
    from gemma4_keras.model import hub, presets

    spec = hub.spec_from_config(hub.backbone_kwargs(presets.read_config_json(preset)))
    rng = np.random.default_rng(seed)
    factors = {}
    for layer, target in lora_spec.sites(spec):
        din, dout = spec.projection_shape(layer, target)
        lead = (e,) if (e := spec.adapter_experts(target)) else ()  # per expert
        factors[(layer, target)] = (
            rng.normal(0, 0.2, (*lead, din, lora_spec.rank)).astype(np.float32),
            rng.normal(0, 0.2, (*lead, lora_spec.rank, dout)).astype(np.float32),
        )
    return factors


def factor_workdir(
    root: str, preset: str, lora_spec, factors, layout: str = "causal_lm"
) -> str:
    """A finished run's workdir holding an adapter written from factors."""
    workdir = os.path.join(root, "run")
    os.makedirs(workdir, exist_ok=True)
    peft.write_adapter(
        os.path.join(workdir, "adapter"),
        lora_spec,
        factors,
        base_model=preset,
        layout=layout,
    )
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"model": {"preset": preset}}, f)
    with open(os.path.join(workdir, "run_state.json"), "w") as f:
        json.dump({"status": "finished", "step": 10}, f)
    return workdir


def transformers_checkpoint(path, dtype: str = "bfloat16", seed: int = 0, **variant):
    """A tiny Gemma4ForCausalLM written by transformers' own `save_pretrained`.

    `global_head_dim` equals `head_dim`, so transformers writes no such key
    (the case where a re-derived config used to write `null`s). Tokenizer
    files come from the package's tiny checkpoint.
    """
    import shutil

    import torch
    import transformers

    from gemma4_keras.testing import tiny

    cfg = tiny.tiny_hf_config(**variant)
    for key in ("architectures", "model_type"):
        cfg.pop(key)
    cfg.update(global_head_dim=cfg["head_dim"], dtype=dtype)
    torch.manual_seed(seed)
    model = transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(**cfg))
    model.to(getattr(torch, dtype)).save_pretrained(str(path))
    source = tiny_checkpoint()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(source, name), os.path.join(str(path), name))
    return str(path)


def redundant_kv_tensors(config: dict) -> dict[str, tuple[int, ...]]:
    """{name: shape} of k_proj/v_proj/k_norm for each KV-shared layer.

    The released E2B/E4B checkpoints carry these although the layers reuse an
    earlier layer's K/V; transformers >= 5.5.2 no longer builds them.
    """
    text = config.get("text_config", config)
    prefix = "model.language_model." if "text_config" in config else "model."
    n, shared = text["num_hidden_layers"], text["num_kv_shared_layers"]
    out = {}
    for i in range(n - shared, n):
        full = text["layer_types"][i] == "full_attention"
        hd = text["global_head_dim"] if full else text["head_dim"]
        kv = text["num_key_value_heads"] * hd
        out[f"{prefix}layers.{i}.self_attn.k_proj.weight"] = (kv, text["hidden_size"])
        out[f"{prefix}layers.{i}.self_attn.v_proj.weight"] = (kv, text["hidden_size"])
        out[f"{prefix}layers.{i}.self_attn.k_norm.weight"] = (hd,)
    return out


def with_redundant_kv(source: str, path) -> str:
    """A copy of checkpoint `source` with K/V tensors added to KV-shared layers."""
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(source, str(path))
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    tensors = load_file(os.path.join(source, "model.safetensors"))
    rng = np.random.default_rng(7)
    for name, shape in redundant_kv_tensors(config).items():
        tensors[name] = rng.normal(0, 0.1, shape).astype(np.float32)
    save_file(tensors, os.path.join(str(path), "model.safetensors"), {"format": "pt"})
    return str(path)


# ----------------------------------------------------------------------------
# llama.cpp: llama-server's own request handling, in process (xllamacpp).


def llama_server(model_path: str, lora_path: str | None = None, n_ctx: int = 64):
    """A `xllamacpp.Server`: llama-server's code (OpenAI-style JSON in and out).

    `handle_completions` / `handle_chat_completions` take the body a user
    POSTs to `/v1/completions` / `/v1/chat/completions`; the server also
    listens on `listening_address` like `llama-server -m MODEL [--lora A]`.
    """
    import oracles

    xllamacpp = oracles.need("xllamacpp")
    params = xllamacpp.CommonParams()
    params.model.path = model_path
    if lora_path is not None:
        params.lora_adapters = [xllamacpp.CommonAdapterLoraInfo(lora_path, 1.0)]
    params.n_ctx = n_ctx
    params.n_parallel = 1
    params.verbosity = 0
    params.cpuparams.n_threads = 1
    params.cpuparams_batch.n_threads = 1
    return xllamacpp.Server(params)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def llama_logprobs(
    server, tokens: list[int], vocab: int, plain: int = 200
) -> np.ndarray:
    """[len(tokens), vocab] log-probabilities llama.cpp gives after each prefix.

    One `/v1/completions` request per prefix with `n_probs` = the whole
    vocabulary: llama-server reports the softmax of the raw logits (before
    any sampler or bias), i.e. the logits up to a constant per row. A logit
    bias of +100 (logits are soft-capped at 30) makes the one sampled token
    `plain` (tiny vocabulary: "V"): llama-server reports no probabilities
    after an end-of-generation token or one that ends inside a UTF-8
    character, and these are what an untrained or corrupted model picks.
    """
    rows = np.full((len(tokens), vocab), -np.inf)
    for k in range(1, len(tokens) + 1):
        body = {
            "prompt": tokens[:k],
            "n_predict": 1,
            "n_probs": vocab,
            "temperature": 0,
            "logit_bias": [[plain, 100]],
        }
        out = server.handle_completions(body)
        for t in out["choices"][0]["logprobs"]["content"][0]["top_logprobs"]:
            rows[k - 1, t["id"]] = t["logprob"]
    return rows


def llama_greedy(server, tokens: list[int], n: int) -> list[int]:
    """`n` greedy token ids from llama-server's `/completion` (`return_tokens`)."""
    import urllib.request

    body = {"prompt": tokens, "n_predict": n, "temperature": 0, "return_tokens": True}
    request = urllib.request.Request(
        server.listening_address + "/completion",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.load(reply)["tokens"]
