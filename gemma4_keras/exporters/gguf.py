"""Gemma 4 as GGUF (llama.cpp, Ollama), via the `gguf` package: merged or adapter.

Needs the optional extra: `pip install gemma4-keras[gguf]`.

    write_gguf(dir, base_dir=..., ...)        model-<type>.gguf: merged, streamed
    write_gguf(dir, ..., factors={}, stem="base")  base-<type>.gguf: no adapter
    write_gguf_lora(dir, config_json=..., ...)  adapter-<type>.gguf: LoRA only

The merged tensors are the base's text-decoder safetensors tensors with the
adapter merged in (`hf.merge_tensor`, as the merged HF export), renamed
with gguf's own `TensorNameMap` for the GEMMA4 architecture, read and written
one at a time. The two MoE
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
merges) built from tokenizer.json. llama.cpp (llama-server's code, through
xllamacpp) serves the tiny dense f32 export with the Keras model's
log-probabilities, and a PLE base plus the GGUF adapter as the merged GGUF
(tests/test_export_gguf.py); MoE exports are not yet checked against
llama.cpp; see docs/deploy.md.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re

import numpy as np
import tqdm

from gemma4_keras.exporters import hf
from gemma4_keras.exporters.hf import ExportError
from gemma4_keras.model import hub, lora, safetensors_io, schema
from gemma4_keras.model.spec import module_name

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m")
_NEEDS_LLAMA_CPP = ("q4_k_m",)
_BYTE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _import_gguf():
    try:
        import gguf  # optional extra [gguf]
    except ImportError as e:
        raise ExportError(
            "--format=gguf and --format=gguf-lora need the gguf package: "
            "pip install 'gemma4-keras[gguf]'"
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


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def text_tensors(hf_names, layout: str, spec) -> dict[str, str]:
    """{`model.*` text-decoder name: base tensor name} of what llama.cpp loads.

    The schema's tensors of `spec` (`schema.hf_tensors`): vision/audio
    tensors are left out (llama.cpp reads towers from a separate mmproj
    file), and so are the K/V tensors that some checkpoints keep for
    KV-shared layers: llama.cpp's graph has no such tensors and refuses a
    file with more tensors than it loads.
    """
    prefix = hf.PREFIXES[layout]
    return {
        "model." + name: prefix + name
        for name in schema.hf_tensors(spec)
        if prefix + name in hf_names
    }


# Rows llama.cpp loads as tensors of their own that gguf's map has no name for.
_SEPARATE_SCALES = {
    "router_scale": "ffn_gate_inp.scale",
    "expert_scale": "ffn_down_exps.scale",
}


def gguf_name(key: str, names) -> str:
    """GGUF name of a `model.*` text tensor (gguf's GEMMA4 map, `.weight` suffix).

    The two MoE scales the map has no name for follow llama.cpp's converter:
    llama.cpp's Gemma 4 graph applies `ffn_gate_inp.scale` (per hidden dim,
    before the router projection) and `ffn_down_exps.scale` (per expert, on
    the expert output) as separate tensors.
    """
    m = _LAYER.search(key)
    for row, gguf_suffix in _SEPARATE_SCALES.items():
        if m and key == "model." + schema.row(row).hf_name(int(m[1])):
            return f"blk.{m[1]}.{gguf_suffix}"
    name = names.get_name(key, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ExportError(
            f"no GGUF name for tensor {key!r} in gguf "
            f"{importlib.metadata.version('gguf')}'s GEMMA4 map; upgrade the gguf "
            "package"
        )
    # llama.cpp loads every tensor as `<name>.weight`; HF's expert banks and
    # layer_scalar carry no suffix, so the map returns the bare name.
    return name if name.endswith((".weight", ".bias")) else name + ".weight"


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


def _encoding(gguf, shape: tuple[int, ...], gguf_type: str):
    """(numpy dtype, stored shape, raw GGML type or None) of a tensor's data.

    1-D tensors (norms, scalars) stay f32; q8_0 falls back to f16 for rows
    that are not a multiple of 32 long.
    """
    q = gguf.GGMLQuantizationType
    if len(shape) < 2 or gguf_type == "f32":
        return np.dtype(np.float32), tuple(shape), None
    if gguf_type == "f16" or (gguf_type == "q8_0" and shape[-1] % 32):
        return np.dtype(np.float16), tuple(shape), None
    qtype = q.BF16 if gguf_type == "bf16" else q.Q8_0
    return (
        np.dtype(np.uint8),
        gguf.quants.quant_shape_to_byte_shape(shape, qtype),
        qtype,
    )


def _encode(gguf, value: np.ndarray, gguf_type: str):
    """(data, raw_dtype or None) for GGUFWriter.add_tensor / write_tensor_data."""
    dtype, _, raw = _encoding(gguf, value.shape, gguf_type)
    if raw is None:
        return value.astype(dtype), None
    return gguf.quants.quantize(value.astype(np.float32), raw), raw


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


def _tokenizer_inputs(base_dir: str | None, preset: str) -> tuple[dict, dict | None]:
    """(tokenizer.json, tokenizer_config with the chat template) of a local base."""
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
    return tok, tok_cfg


def _plan(refs: dict, base_config: dict, spec, gguf_type: str, gguf) -> list:
    """[(gguf name, base tensor name or None for rope_freqs, shape)], sorted."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, spec.num_layers)
    layout = hf.base_layout(base_config)
    plan = [
        (gguf_name(key, names), base, refs[base].shape)
        for key, base in text_tensors(refs, layout, spec).items()
    ]
    if rope_freqs(spec) is not None:
        plan.append(("rope_freqs.weight", None, rope_freqs(spec).shape))
    return sorted(plan)


def _encoded_blocks(gguf, ref, gguf_type: str):
    """A base tensor without an adapter, encoded in row blocks (axis 0).

    f32/f16/bf16 convert element-wise and q8_0 quantises blocks of 32 along
    the last axis, so encoding row blocks gives the bytes of the whole.
    """
    for block in safetensors_io.read_blocks(ref):
        if len(ref.shape) < 2:  # 1-D stays f32 (`_encoding`)
            yield block.astype(np.float32)
            continue
        dtype, _, raw = _encoding(gguf, ref.shape, gguf_type)
        f32 = block.astype(np.float32)
        yield f32.astype(dtype) if raw is None else gguf.quants.quantize(f32, raw)


def _write_blocks(writer, blocks) -> None:
    """`GGUFWriter.write_tensor_data` for a tensor given as consecutive blocks.

    The same steps (the next planned tensor's info, alignment padding before
    and after, the data) on the writer's single output file; gguf 0.19 has
    no public call that appends part of a tensor.
    """
    fout = writer.fout[0]
    name = next(iter(writer.tensors[0]))
    info = writer.tensors[0].pop(name)
    writer.write_padding(fout, fout.tell())
    written = 0
    for block in blocks:
        block.tofile(fout)
        written += block.nbytes
    if written != info.nbytes:
        raise ExportError(
            f"GGUF tensor {name!r}: wrote {written} bytes, planned {info.nbytes}"
        )
    writer.write_padding(fout, written)


def write_gguf(
    directory: str,
    *,
    base_dir: str | None,
    preset: str,
    lora_spec,
    factors,
    gguf_type: str = "f16",
    stem: str = "model",
    chat_template: str | None = None,
) -> list[str]:
    """Writes `<stem>-<type>.gguf` (merged weights) into `directory`, streamed.

    The base's safetensors are read tensor by tensor (`model/safetensors_io.py`); each
    tensor is merged with its adapter delta in float32 (`hf.merge_tensor`),
    encoded and appended: the GGUF header lists every tensor first (shapes and
    types are known from the base's headers), then `GGUFWriter.write_tensor_data`
    writes one tensor at a time; a tensor without an adapter is read, encoded
    and written in row blocks of at most 64 MiB. Peak host memory: one adapted
    tensor in float32 plus its delta and encoding, plus the vocabulary.

    Args:
        directory: an existing empty directory.
        base_dir: local HF base directory (config.json, safetensors, tokenizer.json).
        preset: the base preset (name and error messages).
        lora_spec, factors: the adapter (`peft.read_adapter`), validated.
        gguf_type: `f32`, `f16`, `bf16` or `q8_0`.
        stem: the file name's start: `model` (merged), `base` (the base a
            GGUF adapter applies to: `factors={}`).
        chat_template: `tokenizer.chat_template` when the base ships none
            (without one llama-server falls back to ChatML for chat requests).

    Returns:
        The file names written.

    Example:
      >>> write_gguf("out/gguf", base_dir="/ckpt/gemma-4-E4B-it", preset=...,
      ...            lora_spec=spec, factors=factors)
    """

    check_type(gguf_type)
    gguf = _import_gguf()
    tok, tok_cfg = _tokenizer_inputs(base_dir, preset)
    if chat_template and not (tok_cfg or {}).get("chat_template"):
        tok_cfg = {**(tok_cfg or {}), "chat_template": chat_template}
    base_config = hf.read_base_config(base_dir)
    if base_config is None:
        raise ExportError(f"{base_dir}/config.json: not a Gemma 4 HF config")
    spec = hub.spec_from_config(hub.backbone_kwargs(base_config))
    refs = safetensors_io.tensor_refs(base_dir)
    sites = hf._sites_by_tensor(hf.base_layout(base_config), factors)
    hf._check_sites(refs, sites, base_dir, factors)
    plan = _plan(refs, base_config, spec, gguf_type, gguf)

    fname = f"{stem}-{gguf_type}.gguf"
    writer = gguf.GGUFWriter(os.path.join(directory, fname), "gemma4")
    name = os.path.basename(os.path.normpath(str(preset)))
    writer.add_name(name + "-merged" if factors else name)
    writer.add_file_type(_file_type(gguf, gguf_type))
    add_metadata(writer, base_config.get("text_config", base_config), spec)
    add_tokenizer(writer, tok, tok_cfg)
    del tok
    sizes = []
    for name, _, shape in plan:
        dtype, stored, raw = _encoding(gguf, shape, gguf_type)
        sizes.append(int(np.prod(stored, dtype=np.int64)) * dtype.itemsize)
        writer.add_tensor_info(name, stored, dtype, sizes[-1], raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    # On a terminal only (`disable=None`): a merged E4B GGUF takes minutes.
    with tqdm.tqdm(
        total=sum(sizes),
        desc=f"writing {fname}",
        unit="B",
        unit_scale=True,
        disable=None,
        leave=False,
    ) as bar:
        for (_, base, _), nbytes in zip(plan, sizes, strict=True):
            if base is not None and base not in sites:
                _write_blocks(writer, _encoded_blocks(gguf, refs[base], gguf_type))
            else:  # computed (RoPE frequencies) or merged with the adapter
                value = (
                    rope_freqs(spec)
                    if base is None
                    else hf.merge_tensor(
                        safetensors_io.read_tensor(refs[base]),
                        lora_spec,
                        factors,
                        sites[base],
                        np.dtype(np.float32),
                    )
                )
                data, _ = _encode(gguf, value, gguf_type)
                del value
                writer.write_tensor_data(data)
                del data
            bar.update(nbytes)
    writer.close()
    return [fname]


def _is_experts_down(target: str) -> bool:
    """Whether `target` is the expert bank whose GGUF LoRA carries the
    per-expert scale (HF's experts' down projection, row `experts_down`)."""
    return [r.name for r in schema.target_rows(target)] == ["experts_down"]


def _down_expert_scales(base_dir: str | None, factors) -> dict[int, np.ndarray]:
    """{layer: `router.per_expert_scale` [E] float32} of the layers whose
    `experts.down_proj` the adapter targets, read from the base's
    safetensors (`write_gguf_lora`)."""
    layers = sorted({layer for layer, target in factors if _is_experts_down(target)})
    if not layers:
        return {}
    if base_dir is None:
        raise ExportError(
            "--format=gguf-lora with experts.down_proj targets needs the base's "
            "safetensors (a local Hugging Face directory) for its per-expert scales"
        )
    base_config = hf.read_base_config(base_dir)
    prefix = hf.PREFIXES[hf.base_layout(base_config)]
    refs = safetensors_io.tensor_refs(base_dir)
    row = schema.row("expert_scale")
    return {
        layer: np.asarray(
            safetensors_io.read_tensor(refs[prefix + row.hf_name(layer)]), np.float32
        )
        for layer in layers
    }


def write_gguf_lora(
    directory: str,
    *,
    config_json: dict,
    preset: str,
    lora_spec,
    factors,
    gguf_type: str = "f16",
    base_dir: str | None = None,
) -> list[str]:
    """Writes `adapter-<type>.gguf`: the LoRA adapter for llama.cpp / Ollama.

    llama.cpp's `convert_lora_to_gguf.py` conventions: `general.type` =
    `adapter`, `adapter.type` = `lora`, `adapter.lora.alpha`, and per adapted
    weight `<gguf name>.lora_a` (r, in) and `<gguf name>.lora_b` (out, r)
    (numpy order). llama.cpp scales by `alpha / r` and ignores PEFT's
    `use_rslora`, so the adapter's own scale (alpha / r, or alpha / sqrt(r)
    with rsLoRA) is folded into `lora_b` and `alpha` is written as `r`
    (scale 1).

    Expert-bank targets (26B-A4B) are one pair per expert, 3-D: `lora_a`
    (E, r, in) and `lora_b` (E, out, r), which llama.cpp's
    `build_lora_mm_id` multiplies for each token's selected experts. Its
    Gemma 4 graph applies `ffn_down_exps.scale` (HF's
    `router.per_expert_scale`) to the base product only, so each expert's
    `experts.down_proj` B is multiplied by its scale here; that is the only
    base weight read (from `base_dir`'s safetensors). Checked against
    llama-server (xllamacpp): base + adapter answers as the merged GGUF
    (`tests/test_export_gguf.py`).

    Returns:
        The file names written.

    Example:
      >>> write_gguf_lora("out/lora", config_json=cfg, preset="...", lora_spec=spec,
      ...                 factors=factors)
      # llama-server -m out/lora/base-f16.gguf --lora out/lora/adapter-f16.gguf
      # (the export writes the base too: write_gguf(..., factors={}, stem="base"))
    """
    check_type(gguf_type)
    gguf = _import_gguf()
    spec = hub.spec_from_config(hub.backbone_kwargs(config_json))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, spec.num_layers)
    scale = np.float32(
        lora.LoraAdapter.scale_of(lora_spec.rank, lora_spec.alpha, lora_spec.rslora)
    )
    fname = f"adapter-{gguf_type}.gguf"
    writer = gguf.GGUFWriter(os.path.join(directory, fname), "gemma4")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lora_spec.rank))
    writer.add_name(os.path.basename(os.path.normpath(str(preset))) + "-lora")
    expert_scales = _down_expert_scales(base_dir, factors)
    for (layer, target), (a, b) in sorted(factors.items()):
        base = gguf_name(f"model.{module_name(layer, target)}.weight", names)
        if layer in expert_scales and _is_experts_down(target):
            b = np.asarray(b, np.float32) * expert_scales[layer][:, None, None]
        # (in, r) -> (r, in) and (r, out) -> (out, r); an expert target's
        # (E, in, r) and (E, r, out) per expert, as llama.cpp's
        # `build_lora_mm_id` multiplies the selected experts' pairs.
        lora_a = np.ascontiguousarray(np.swapaxes(np.asarray(a, np.float32), -1, -2))
        lora_b = np.ascontiguousarray(
            np.swapaxes(np.asarray(b, np.float32), -1, -2) * scale
        )
        for suffix, value in ((".lora_a", lora_a), (".lora_b", lora_b)):
            data, raw = _encode(gguf, value, gguf_type)
            writer.add_tensor(base + suffix, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return [fname]
