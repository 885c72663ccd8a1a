"""Merged Gemma 4 text decoder as a GGUF file (llama.cpp), via the `gguf` package.

Needs the optional extra: `pip install gemma4-keras[gguf]`.

The tensors are the merged HF export's (`hf.merged_state_dict`), renamed
with gguf's own `TensorNameMap` for the GEMMA4 architecture. The two MoE
scales the map has no name for are written as llama.cpp's converter writes
them: `blk.N.ffn_gate_inp.scale` and `blk.N.ffn_down_exps.scale`. A
`rope_freqs.weight` tensor carries the full layers' proportional RoPE.

Types: `f32`, `f16`, `bf16`, `q8_0` (1-D tensors, i.e. norms and layer
scalars, always stay f32, and a matrix whose rows are not a multiple of 32
falls back to f16 under q8_0). `q4_k_m` needs llama.cpp's k-quant code,
which the `gguf` package does not have: export f16 and run
`llama-quantize model-f16.gguf model-q4_k_m.gguf Q4_K_M`.

Metadata follows the `{arch}.*` keys gguf's `GGUFWriter` offers for Gemma
models (context/embedding/feed-forward lengths, head counts, key/value
lengths for full and sliding layers, RoPE bases and dimensions,
sliding-window pattern, shared KV layers, per-layer-input width, experts,
final logit soft-cap) and llama.cpp's `gemma4` BPE vocabulary (tokens and
merges) built from tokenizer.json. llama.cpp (llama-cpp-python 0.3.36) loads
the tiny dense f32 export and matches its logits (tests/test_export_gguf.py);
MoE and PLE exports are not yet checked against llama.cpp; see docs/deploy.md.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from gemma4_keras.export import hf
from gemma4_keras.export.hf import ExportError

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m")
_NEEDS_LLAMA_CPP = ("q4_k_m",)
_BYTE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _import_gguf():
    try:
        import gguf  # optional extra [gguf]
    except ImportError as e:
        raise ExportError(
            "--format=gguf needs the gguf package: pip install 'gemma4-keras[gguf]'"
        ) from e
    return gguf


def check_type(gguf_type: str) -> None:
    """Raises ExportError for a type this exporter cannot write."""
    if gguf_type not in TYPES:
        raise ExportError(
            f"--gguf_type={gguf_type!r}: expected one of {', '.join(TYPES[:4])}"
        )
    if gguf_type in _NEEDS_LLAMA_CPP:
        raise ExportError(
            f"--gguf_type={gguf_type}: the gguf Python package cannot write k-quants. Export "
            "--gguf_type=f16, then run llama.cpp's quantizer: "
            f"`llama-quantize model-f16.gguf model-{gguf_type}.gguf {gguf_type.upper()}` "
            "(build llama.cpp from https://github.com/ggml-org/llama.cpp)"
        )
    _import_gguf()


def gguf_tensors(
    hf_tensors: dict[str, np.ndarray], num_layers: int
) -> dict[str, np.ndarray]:
    """Renames merged HF tensors to GGUF names (float32)."""
    gguf = _import_gguf()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, num_layers)
    t = {
        re.sub(r"^model\.language_model\.", "model.", k): v
        for k, v in hf_tensors.items()
    }
    extra = {}
    for key in [k for k in t if k.endswith("router.scale")]:
        # llama.cpp's Gemma 4 graph applies both MoE scales itself, as separate
        # tensors: `ffn_gate_inp.scale` (per hidden dim, before the router
        # projection) and `ffn_down_exps.scale` (per expert, on the expert output).
        layer = key[: -len("router.scale")]
        bid = int(re.search(r"\.layers\.(\d+)\.", key).group(1))
        extra[f"blk.{bid}.ffn_gate_inp.scale"] = t.pop(key)
        extra[f"blk.{bid}.ffn_down_exps.scale"] = t.pop(
            layer + "router.per_expert_scale"
        )
    out = {}
    for key, value in t.items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(
                f"no GGUF name for tensor {key!r} in gguf {gguf.__version__}'s "
                "GEMMA4 map; upgrade the gguf package"
            )
        # llama.cpp loads every tensor as `<name>.weight`; HF's expert banks and
        # layer_scalar carry no suffix, so the map returns the bare name.
        out[name if name.endswith((".weight", ".bias")) else name + ".weight"] = value
    return {**out, **extra}


def rope_freqs(spec) -> np.ndarray | None:
    """`rope_freqs.weight` for the full-attention layers' proportional RoPE.

    llama.cpp rotates all `head_dim` dims of a full layer (NeoX style) and
    divides each frequency by this factor: 1 for the first `rotary_dim / 2`
    frequencies (exponents over head_dim, as in `layers.apply_rope`), 1e30
    for the rest, which makes their angle 0, i.e. no rotation (NoPE).
    """
    full = [b for b in spec.blocks if b.sliding_window is None]
    if not full:
        return None
    half, half_rot = full[0].head_dim // 2, full[0].rotary_dim // 2
    return np.array([1.0] * half_rot + [1e30] * (half - half_rot), np.float32)


def _encode(gguf, value: np.ndarray, gguf_type: str):
    """(data, raw_dtype or None) for GGUFWriter.add_tensor."""
    q = gguf.GGMLQuantizationType
    if value.ndim < 2 or gguf_type == "f32":
        return value.astype(np.float32), None
    if gguf_type == "f16" or (gguf_type == "q8_0" and value.shape[-1] % 32):
        return value.astype(np.float16), None
    qtype = q.BF16 if gguf_type == "bf16" else q.Q8_0
    return gguf.quants.quantize(value.astype(np.float32), qtype), qtype


def _file_type(gguf, gguf_type: str):
    ft = gguf.LlamaFileType
    return {
        "f32": ft.ALL_F32,
        "f16": ft.MOSTLY_F16,
        "bf16": ft.MOSTLY_BF16,
        "q8_0": ft.MOSTLY_Q8_0,
    }[gguf_type]


def add_metadata(writer, text: dict, spec) -> None:
    """Model hyper-parameters as `gemma4.*` keys."""
    blocks = spec.blocks
    full = [b for b in blocks if b.sliding_window is None] or list(blocks)
    local = [b for b in blocks if b.sliding_window is not None] or list(blocks)
    writer.add_context_length(int(text.get("max_position_embeddings", 131072)))
    writer.add_embedding_length(spec.hidden_dim)
    writer.add_block_count(spec.num_layers)
    ffn = [b.ffn_dim for b in blocks]
    writer.add_feed_forward_length(ffn[0] if len(set(ffn)) == 1 else ffn)
    writer.add_head_count(blocks[0].num_heads)
    kv = [b.num_kv_heads for b in blocks]
    writer.add_head_count_kv(kv[0] if len(set(kv)) == 1 else kv)
    writer.add_key_length(full[0].head_dim)
    writer.add_value_length(full[0].head_dim)
    writer.add_key_length_swa(local[0].head_dim)
    writer.add_value_length_swa(local[0].head_dim)
    writer.add_layer_norm_rms_eps(spec.eps)
    writer.add_rope_freq_base(full[0].rope_wavelength)
    writer.add_rope_freq_base_swa(local[0].rope_wavelength)
    # Full layers rotate with n_rot = head_dim plus `rope_freqs` (see
    # `rope_freqs`), which parks the NoPE dims; sliding layers rotate rotary_dim.
    writer.add_rope_dimension_count(full[0].head_dim)
    writer.add_rope_dimension_count_swa(local[0].rotary_dim)
    if local[0].sliding_window is not None:
        writer.add_sliding_window(local[0].sliding_window)
    writer.add_sliding_window_pattern([b.sliding_window is not None for b in blocks])
    writer.add_shared_kv_layers(int(text.get("num_kv_shared_layers") or 0))
    if spec.final_soft_cap:
        writer.add_final_logit_softcapping(spec.final_soft_cap)
    # llama.cpp requires the key; 0 means no per-layer embeddings.
    writer.add_embedding_length_per_layer_input(int(spec.ple_dim or 0))
    if spec.moe:
        writer.add_expert_count(spec.num_experts)
        writer.add_expert_used_count(spec.top_k)
        writer.add_expert_feed_forward_length(spec.expert_dim)


def add_tokenizer(writer, tokenizer_json: dict, tokenizer_cfg: dict | None) -> None:
    """A SentencePiece-style (`llama`) vocabulary from a Gemma tokenizer.json.

    Scores follow merge order (earlier merge = higher score), byte pieces are
    BYTE, added tokens CONTROL (special) or USER_DEFINED, like KerasHub's
    rebuild of the same file.
    """
    tt = _import_gguf().TokenType
    vocab = dict(tokenizer_json["model"]["vocab"])
    added = {t["content"]: t for t in tokenizer_json.get("added_tokens", [])}
    vocab.update({c: t["id"] for c, t in added.items()})
    merges = tokenizer_json["model"].get("merges", [])
    rank = {
        "".join(m if isinstance(m, list) else m.split(" ", 1)): i
        for i, m in enumerate(merges)
    }
    size = max(vocab.values()) + 1
    tokens, scores, types = (
        [f"[PAD{i}]" for i in range(size)],
        [0.0] * size,
        [tt.UNUSED] * size,
    )
    for piece, i in vocab.items():
        tokens[i] = piece
        if piece in added:
            types[i] = tt.CONTROL if added[piece].get("special") else tt.USER_DEFINED
        elif piece == "<unk>":
            types[i] = tt.UNKNOWN
        elif _BYTE.match(piece):
            types[i] = tt.BYTE
        else:
            types[i] = tt.NORMAL
            scores[i] = -float(rank.get(piece, len(merges) + 1))
    # llama.cpp's Gemma 4 vocabulary: BPE over these pieces with the merges.
    writer.add_tokenizer_model("gemma4")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    ids = {"bos": "<bos>", "eos": "<eos>", "unk": "<unk>", "pad": "<pad>"}
    for what, piece in ids.items():
        if piece in vocab:
            getattr(writer, f"add_{what}_token_id")(vocab[piece])
    if "<turn|>" in vocab:  # stop on end of turn as well as eos
        writer.add_eot_token_id(vocab["<turn|>"])
    if "<|tool_response>" in vocab:
        # The -it generation_config stops here too (a tool call awaits its
        # result); llama.cpp ends generation on its end-of-message token.
        writer.add_eom_token_id(vocab["<|tool_response>"])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_add_space_prefix(False)
    # As the official Gemma 4 -it tokenizer: no BOS from the tokenizer, the
    # chat template writes `<bos>` (a second one would double it).
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    template = (tokenizer_cfg or {}).get("chat_template")
    if template:
        writer.add_chat_template(template)


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_gguf(
    model,
    backbone,
    directory: str,
    *,
    base_dir: str | None,
    preset: str,
    gguf_type: str = "f16",
) -> list[str]:
    """Writes `model-<type>.gguf` (merged weights) into `directory`.

    Args:
        model: `Gemma4LoraModel` with the adapter active.
        backbone: its KerasHub backbone (for the config).
        directory: an existing empty directory.
        base_dir: local HF base directory holding tokenizer.json.
        preset: the base preset (for error messages).
        gguf_type: `f32`, `f16`, `bf16` or `q8_0`.

    Returns:
        The file names written.

    Example:
      >>> write_gguf(model, backbone, "out/gguf", base_dir="/ckpt/gemma-4-E4B-it", preset=...)
    """

    check_type(gguf_type)
    gguf = _import_gguf()
    tok = _read_json(os.path.join(base_dir, "tokenizer.json")) if base_dir else None
    if tok is None:
        raise ExportError(
            f"--format=gguf needs the base's tokenizer.json, and base {preset!r} is not a local "
            "Hugging Face directory with one; set --config.model.preset to a local copy of the "
            "HF checkpoint (e.g. `huggingface-cli download google/gemma-4-E4B-it --local-dir DIR`)"
        )
    tok_cfg = _read_json(os.path.join(base_dir, "tokenizer_config.json"))
    jinja = os.path.join(base_dir, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja) as f:
            tok_cfg = {**(tok_cfg or {}), "chat_template": f.read()}
    text = hf.text_config(backbone, model.spec, hf.read_base_config(base_dir))
    fname = f"model-{gguf_type}.gguf"
    writer = gguf.GGUFWriter(os.path.join(directory, fname), "gemma4")
    writer.add_name(os.path.basename(os.path.normpath(str(preset))) + "-merged")
    writer.add_file_type(_file_type(gguf, gguf_type))
    add_metadata(writer, text, model.spec)
    add_tokenizer(writer, tok, tok_cfg)
    tensors = gguf_tensors(hf.merged_state_dict(model), model.spec.num_layers)
    freqs = rope_freqs(model.spec)
    if freqs is not None:
        tensors["rope_freqs.weight"] = freqs
    for name, value in sorted(tensors.items()):
        data, raw = _encode(gguf, value, gguf_type)
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return [fname]
