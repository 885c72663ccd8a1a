"""A hermetic tiny Gemma 4 checkpoint in Hugging Face format.

Tests and the embedded default run (`configs/tiny.py`) need a model with the
real Gemma 4 architecture (sliding + full attention with a wider global head,
partial RoPE, Q/K/V norms, four norms per block, layer scalars, optional
per-layer embeddings, KV sharing, MoE, K=V global attention and the
double-wide MLP of KV-shared layers) that is small enough to train on a
CPU in minutes, and that both KerasHub (`Gemma4Backbone.from_preset(dir)`) and
transformers (`AutoModelForCausalLM.from_pretrained(dir)`) load. This module
writes such a checkpoint from a seed, with numpy, safetensors and tokenizers
only (no torch or transformers at run time):

    path = tiny_checkpoint()                  # cached, ~1 MB
    path = tiny_checkpoint(ple=True, kv_shared_layers=2, moe=True)
    path = tiny_checkpoint(k_eq_v=True)        # 26B-A4B / 31B attention
    path = tiny_checkpoint(kv_shared_layers=2, double_wide_mlp=True)  # E2B MLP

The directory holds `config.json`, `model.safetensors` (float32),
`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`,
`generation_config.json` and an empty `processor_config.json` (which
`keras_hub.models.Gemma4CausalLM.from_preset` insists on reading); with
`chat_template="small"|"large"` also a `chat_template.jinja`.

Shape: 4 decoder layers `[sliding, full, sliding, full]`. The 1 : 1 pattern
(instead of the real 4 : 1 or 5 : 1) is what lets KV sharing exist in a 4-layer
model: transformers requires the non-shared layers to contain every attention
type the shared ones use (`Gemma4TextConfig.kv_sharing_modes`), so with
`kv_shared_layers=2` layers 2 and 3 reuse the K/V of layers 0 and 1.

Layouts:
  * `"causal_lm"`: `Gemma4ForCausalLM`, `model_type="gemma4_text"`, weights
    under `model.*`.
  * `"conditional_generation"`: `Gemma4ForConditionalGeneration`,
    `model_type="gemma4"` with the text config nested under `text_config` and
    text weights under `model.language_model.*`, like the released
    checkpoints, but with no vision or audio tower. The `vision_config` and
    `audio_config` keys are omitted rather than null: transformers accepts
    both, while KerasHub's converter builds a vision encoder whenever the
    `vision_config` key exists (and fails on null).

`global_head_dim` is written where both readers look for it: KerasHub's
converter reads the key of the text config; transformers 5.x pops that same key
in `Gemma4TextConfig.__post_init__` and turns it into
`per_layer_config[i].head_dim` for the full-attention layers.

Tokenizer: a BPE with byte fallback trained on the shipped sentiment dataset,
with `▁` for spaces and no dummy prefix (like Gemma's), the Gemma 4 special
tokens at their real ids where those are below the tiny vocabulary size
(`<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3, `<mask>`=4, tool tokens 46-52,
`<|think|>`=98, `<|channel>`=100, `<channel|>`=101, `<|turn>`=105,
`<turn|>`=106), the multimodal markers (real ids 255999 and up) moved to
107-113, and `<unusedN>` fillers so that ids are contiguous (KerasHub rebuilds
a SentencePiece proto whose piece index is the id). Like the official -it
tokenizer it adds no BOS itself (`add_bos_token` false, no post-processor
BOS): the chat template writes `<bos>`. `generation_config.json` stops on
`[1, 106, 50]` (`<eos>`, `<turn|>`, `<|tool_response>`) as the -it one does.

Chat template: the official `chat_template.jinja` files are not available
offline, so `chat_template_jinja` writes one from the rules of
`shared/GEMMA4.md` ("Chat format", "Tool calls in the chat format") and
`data/tool_format.py`: plain turns, thoughts, tool declarations, calls and
their results. Tests check that it reproduces the 36 official renderings of
`tests/data/gemma4_chat_golden.json` and renders random tool conversations
like `chat.render_conversation` (tests/test_tool_template.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import zlib
from collections.abc import Iterable

import numpy as np
from safetensors.numpy import save_file

from gemma4_keras.data import samples
from gemma4_keras.model import hub, schema

# Bump when the files written change, so stale caches are not reused.
FORMAT_VERSION = 7
TINY_VOCAB_SIZE = 1024
NUM_LAYERS = 4
HIDDEN_SIZE = 64
LAYER_TYPES = (
    "sliding_attention",
    "full_attention",
    "sliding_attention",
    "full_attention",
)
PLE_HIDDEN_SIZE = 8
# k_eq_v=True: K(=V) heads of the full-attention layers, and K/V heads of
# the sliding ones. Fewer global than local heads, and more than one global
# head (26B-A4B has num_global_key_value_heads=2, says transformers'
# configuration_gemma4.py): a reader that takes the wrong count, or lays out
# the heads of the shared K=V projection wrongly, gets other shapes or numbers.
GLOBAL_KV_HEADS = 2
K_EQ_V_LOCAL_KV_HEADS = 4
CACHE_ENV_VAR = "GEMMA4_KERAS_CACHE"
LAYOUTS = ("causal_lm", "conditional_generation", "multimodal")
# `Gemma4Config`'s multimodal token ids and the tokens they name.
_MULTIMODAL_TOKENS = {
    "image_token_id": "<|image|>",
    "boi_token_id": "<|image>",
    "eoi_token_id": "<image|>",
    "audio_token_id": "<|audio|>",
    "boa_token_id": "<|audio>",
    "eoa_token_index": "<audio|>",
    "video_token_id": "<|video|>",
}
# The towers of the "multimodal" layout: `Gemma4VisionConfig` and
# `Gemma4AudioConfig` fields (transformers' classes fill in the rest).
VISION_TOWER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "position_embedding_size": 64,
    "use_clipped_linears": True,
}
AUDIO_TOWER = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    # transformers sizes the projection after the convolutions as
    # (channels[0] // 4) * channels[1], which is the real (mel bins / 4) *
    # channels[1] only when channels[0] is the 128 mel bins, as released.
    "subsampling_conv_channels": [128, 4],
    "output_proj_dims": 48,
}

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
TURN_START_ID, TURN_END_ID = 105, 106
TOOL_RESPONSE_ID = 50
# The -it generation_config.json stops on these: <eos>, <turn|>, <|tool_response>.
STOP_IDS = (EOS_ID, TURN_END_ID, TOOL_RESPONSE_ID)

# Named special tokens at their Gemma 4 ids. The multimodal markers live at
# 255999+ in the real 262144-token vocabulary; here they follow `<turn|>`.
SPECIAL_TOKENS: dict[str, int] = {
    "<pad>": PAD_ID,
    "<eos>": EOS_ID,
    "<bos>": BOS_ID,
    "<unk>": UNK_ID,
    "<mask>": 4,
    "<|tool>": 46,
    "<tool|>": 47,
    "<|tool_call>": 48,
    "<tool_call|>": 49,
    "<|tool_response>": 50,
    "<tool_response|>": 51,
    '<|"|>': 52,
    "<|think|>": 98,
    "<|channel>": 100,
    "<channel|>": 101,
    "<|turn>": TURN_START_ID,
    "<turn|>": TURN_END_ID,
    "<|image>": 107,
    "<|image|>": 108,
    "<image|>": 109,
    "<|audio>": 110,
    "<|audio|>": 111,
    "<audio|>": 112,
    "<|video|>": 113,
}
NUM_SPECIAL_IDS = 114  # ids 0..113: named tokens and `<unusedN>` fillers
FIRST_BYTE_ID = NUM_SPECIAL_IDS  # `<0x00>`..`<0xFF>` follow the special ids
FIRST_PIECE_ID = FIRST_BYTE_ID + 256

# How the trainer cuts text into words before learning merges: a word is an
# optional run of `▁` (spaces) and the non-space characters after it, so no
# piece spans two words, as in SentencePiece's `split_by_whitespace`.
_WORD_PATTERN = r"▁*[^▁\n]+|\n+|▁+"
_SPACE = "▁"


# --------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------


# `Gemma4TextConfig`'s defaults that transformers' convert_gemma4_weights.py
# leaves in place (every size); the tiny model and `full_size` start from them.
TEXT_DEFAULTS = dict(
    model_type="gemma4_text",
    vocab_size=262144,
    vocab_size_per_layer_input=262144,
    head_dim=256,
    global_head_dim=512,
    num_global_key_value_heads=None,
    attention_k_eq_v=False,
    use_bidirectional_attention=None,
    num_kv_shared_layers=0,
    use_double_wide_mlp=False,
    enable_moe_block=False,
    num_experts=None,
    moe_intermediate_size=None,
    top_k_experts=None,
    sliding_window=512,
    max_position_embeddings=131072,
    hidden_activation="gelu_pytorch_tanh",
    rms_norm_eps=1e-6,
    final_logit_softcapping=30.0,
    tie_word_embeddings=True,
    attention_bias=False,
    attention_dropout=0.0,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {
            "rope_type": "proportional",
            "partial_rotary_factor": 0.25,
            "rope_theta": 1000000.0,
        },
    },
    pad_token_id=PAD_ID,
    eos_token_id=EOS_ID,
    bos_token_id=BOS_ID,
    initializer_range=0.02,
    dtype="bfloat16",
)


def _text_config(
    ple: bool, kv_shared_layers: int, moe: bool, k_eq_v: bool, double_wide_mlp: bool
) -> dict:
    """The Gemma4TextConfig fields of the tiny model."""
    if not 0 <= kv_shared_layers <= NUM_LAYERS - 2:
        raise ValueError(
            f"kv_shared_layers={kv_shared_layers}: must be in 0..{NUM_LAYERS - 2} "
            "so that a sliding and a full layer remain to share K/V from."
        )
    if double_wide_mlp and not kv_shared_layers:
        raise ValueError(
            "double_wide_mlp=True widens the MLP of KV-shared layers only; "
            "with kv_shared_layers=0 it changes nothing. Pass kv_shared_layers=1 or 2."
        )
    return {
        **TEXT_DEFAULTS,
        "vocab_size": TINY_VOCAB_SIZE,
        "vocab_size_per_layer_input": TINY_VOCAB_SIZE,
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": 128,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": K_EQ_V_LOCAL_KV_HEADS if k_eq_v else 2,
        # With k_eq_v, full-attention layers use this many K(=V) heads. Both
        # readers need it: KerasHub's backbone turns K=V on exactly when it
        # is set, transformers exactly when `attention_k_eq_v` is.
        "num_global_key_value_heads": GLOBAL_KV_HEADS if k_eq_v else None,
        "head_dim": 16,
        "global_head_dim": 32,
        "layer_types": list(LAYER_TYPES),
        "sliding_window": 16,
        "max_position_embeddings": 4096,
        "attention_k_eq_v": k_eq_v,
        "hidden_size_per_layer_input": PLE_HIDDEN_SIZE if ple else 0,
        "num_kv_shared_layers": kv_shared_layers,
        "use_double_wide_mlp": double_wide_mlp,
        "enable_moe_block": moe,
        "num_experts": 4 if moe else None,
        "top_k_experts": 2 if moe else None,
        "moe_intermediate_size": 32 if moe else None,
        "dtype": "float32",
    }


def conditional_generation(text: dict, multimodal_ids: dict) -> dict:
    """The `Gemma4ForConditionalGeneration` config.json around `text` (no towers)."""
    return {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "text_config": text,
        **multimodal_ids,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "dtype": text["dtype"],
    }


def tiny_hf_config(
    *,
    ple: bool = False,
    kv_shared_layers: int = 0,
    moe: bool = False,
    k_eq_v: bool = False,
    double_wide_mlp: bool = False,
    layout: str = "causal_lm",
    vision_bidirectional: bool = False,
    **overrides,
) -> dict:
    """Returns the `config.json` dict of the tiny Gemma 4 model.

    Args:
        ple: enable per-layer embeddings (`hidden_size_per_layer_input=8`).
        kv_shared_layers: number of trailing layers that reuse the K/V of an
            earlier layer of the same attention type (0, 1 or 2).
        moe: enable the MoE block (4 experts, top 2, expert width 32) that runs
            beside the dense MLP in every layer.
        k_eq_v: like 26B-A4B / 31B: full-attention layers have no `v_proj`
            (V is the K projection, before `k_norm` and RoPE) and use
            `GLOBAL_KV_HEADS` (2) K heads (`attention_k_eq_v=True`,
            `num_global_key_value_heads=2`); sliding layers keep separate
            K and V with `K_EQ_V_LOCAL_KV_HEADS` (4) heads.
        double_wide_mlp: like E2B: KV-shared layers have an MLP of twice
            `intermediate_size` (`use_double_wide_mlp=True`); needs
            `kv_shared_layers > 0`.
        layout: `"causal_lm"` (`Gemma4ForCausalLM`, flat text config),
            `"conditional_generation"` (`Gemma4ForConditionalGeneration`, text
            config nested under `text_config`, no vision / audio tower) or
            `"multimodal"` (the same with tiny vision and audio towers,
            `tower_configs`; needs transformers).
        vision_bidirectional: `use_bidirectional_attention: "vision"` (as
            26B-A4B / 31B): an image's soft tokens attend to each other both
            ways on sliding layers.
        **overrides: text-config fields to replace, e.g. `sliding_window=8`.

    Returns:
        A JSON-serialisable dict.

    Example:

    >>> cfg = tiny_hf_config(moe=True)
    >>> cfg["architectures"], cfg["num_experts"]
    (['Gemma4ForCausalLM'], 4)
    >>> tiny_hf_config(layout="conditional_generation")["text_config"]["hidden_size"]
    64
    """
    text = _text_config(ple, kv_shared_layers, moe, k_eq_v, double_wide_mlp)
    if vision_bidirectional:
        text["use_bidirectional_attention"] = "vision"
    text.update(overrides)
    if layout == "causal_lm":
        return {"architectures": ["Gemma4ForCausalLM"], **text}
    if layout in ("conditional_generation", "multimodal"):
        ids = {k: SPECIAL_TOKENS[t] for k, t in _MULTIMODAL_TOKENS.items()}
        config = conditional_generation(text, ids)
        return {**config, **tower_configs()} if layout == "multimodal" else config
    raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}.")


def tower_configs(
    vision: dict | None = VISION_TOWER, audio: dict | None = AUDIO_TOWER
) -> dict:
    """`vision_config` and `audio_config` of the multimodal layout.

    Written by transformers' own `Gemma4VisionConfig` / `Gemma4AudioConfig`
    (`vision`, `audio` over their defaults; None leaves a tower out), so
    every field a reader looks for is there. `{}` gives the defaults, which
    are the released towers' (`full_size.released_config`).
    """
    from transformers.models.gemma4 import (  # test-only layout: the towers' config is transformers'
        configuration_gemma4 as hf,
    )

    def plain(config) -> dict:
        d = config.to_dict()
        for key in ("transformers_version", "architectures", "id2label", "label2id"):
            d.pop(key, None)
        return d

    out = {}
    if vision is not None:
        out["vision_config"] = plain(hf.Gemma4VisionConfig(**vision))
    if audio is not None:
        out["audio_config"] = plain(hf.Gemma4AudioConfig(**audio))
    return out


def tower_shapes(config: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tower tensor names -> (shape, init kind), as transformers' model names them.

    The model is built on the meta device (no memory); every tensor outside
    the language model is a tower's or a tower projection's.
    """
    import torch  # test-only layout: the towers' tensor names are transformers'
    import transformers  # test-only layout: the towers' tensor names are transformers'

    fields = {k: v for k, v in config.items() if k != "architectures"}
    with torch.device("meta"):
        model = transformers.Gemma4ForConditionalGeneration(
            transformers.Gemma4Config(**fields)
        )
    shapes = {}
    for name, tensor in model.state_dict().items():
        if ".language_model." in name or name == "lm_head.weight":
            continue
        shapes[name] = (tuple(tensor.shape), _tower_kind(name, tensor.shape))
    return shapes


def _tower_kind(name: str, shape) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("input_min", "output_min"):
        return "clip_min"
    if leaf in ("input_max", "output_max"):
        return "clip_max"
    if leaf == "bias" or leaf == "per_dim_scale":
        return "small"
    if len(shape) == 1:
        return "norm"
    if leaf == "position_embedding_table":
        return "small"
    return "conv" if len(shape) > 2 else "matrix"


# --------------------------------------------------------------------------
# model.safetensors
# --------------------------------------------------------------------------


def init_kind(row: schema.Row, hf_shape: tuple[int, ...]) -> str:
    """How a tensor is drawn: norm, scalar, embedding or matrix."""
    if row.hf_layout == "scalar":
        return "scalar"
    if len(hf_shape) == 1:
        return "norm"
    if row.kind == "global" and row.hf_layout == "same":
        return "embedding"
    return "matrix"


def weight_shapes(config: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """All checkpoint tensor names -> (shape, init kind): the schema's rows.

    Example:

    >>> shapes = weight_shapes(tiny_hf_config())
    >>> shapes["model.layers.1.self_attn.q_proj.weight"][0]
    (128, 64)
    """
    prefix = "model.language_model." if "text_config" in config else "model."
    shapes = {
        prefix + name: (shape, init_kind(parts[0][0], shape))
        for name, (shape, parts) in schema.hf_tensors(hub.model_spec(config)).items()
    }
    if config.get("vision_config") or config.get("audio_config"):
        shapes.update(tower_shapes(config))
    return shapes


def _init_tensor(seed: int, name: str, shape: tuple[int, ...], kind: str) -> np.ndarray:
    """Draws one tensor; its own RNG stream, so names shared by variants match."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    if kind == "norm":
        values = 1.0 + 0.1 * rng.standard_normal(shape)
    elif kind == "scalar":
        values = rng.uniform(0.6, 1.0, shape)
    elif kind in ("clip_min", "clip_max"):
        # Bounds a tower's activations reach: clipping is exercised.
        values = rng.uniform(1.0, 3.0, shape) * (-1 if kind == "clip_min" else 1)
    elif kind == "small":
        values = 0.1 * rng.standard_normal(shape)
    elif kind == "conv":  # (out, in, *kernel): fan-in is all but the first axis
        values = rng.standard_normal(shape) * (0.5 / np.sqrt(np.prod(shape[1:])))
    elif kind == "embedding":
        # Tied embeddings set the logit scale: |logit| <= |h| |e| with |h| ~
        # sqrt(d) after the final norm. Rows of norm ~4 let a fine-tuned model
        # reach confident predictions under the soft-cap of 30 (with 0.1 the
        # best reachable probability over 1024 tokens was about 0.3).
        values = 0.5 * rng.standard_normal(shape)
    else:
        # ~ 1/sqrt(fan_in) scaled down: keeps activations O(1) through 4 blocks.
        values = rng.standard_normal(shape) * (0.5 / np.sqrt(shape[-1]))
    return np.asarray(values, np.float32)  # an array also for shape ()


def tiny_weights(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights for a tiny config, deterministic from `seed`.

    Example:

    >>> w = tiny_weights(tiny_hf_config(), seed=0)
    >>> w["model.embed_tokens.weight"].shape
    (1024, 64)
    """
    return {
        name: _init_tensor(seed, name, shape, kind)
        for name, (shape, kind) in sorted(weight_shapes(config).items())
    }


# --------------------------------------------------------------------------
# tokenizer.json
# --------------------------------------------------------------------------


def special_token_list() -> list[str]:
    """Pieces of ids 0..NUM_SPECIAL_IDS-1: named tokens and `<unusedN>` fillers.

    Example:

    >>> tokens = special_token_list()
    >>> tokens[2], tokens[5], tokens[106]
    ('<bos>', '<unused0>', '<turn|>')
    """
    by_id = {i: t for t, i in SPECIAL_TOKENS.items()}
    tokens, unused = [], 0
    for i in range(NUM_SPECIAL_IDS):
        if i in by_id:
            tokens.append(by_id[i])
        else:
            tokens.append(f"<unused{unused}>")
            unused += 1
    return tokens


def _train_pieces(corpus: Iterable[str], num_pieces: int) -> list[str]:
    """Learns up to `num_pieces` BPE pieces (characters, then merges in order)."""
    from tokenizers import (  # tokenizers' `models`, `decoders` stay local to this builder
        Regex,
        Tokenizer,
        models,
        normalizers,
        pre_tokenizers,
    )
    from tokenizers.trainers import (
        BpeTrainer,  # tokenizers' `models`, `decoders` stay local to this builder
    )

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Replace(" ", _SPACE)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(
        Regex(_WORD_PATTERN), behavior="isolated"
    )
    trainer = BpeTrainer(
        vocab_size=num_pieces, min_frequency=2, show_progress=False, special_tokens=[]
    )
    tokenizer.train_from_iterator(list(corpus), trainer)
    vocab = tokenizer.get_vocab()
    return sorted(vocab, key=vocab.__getitem__)


def _complete_merges(pieces: list[str]) -> list[list[str]]:
    """Every split `left + right = piece` with both halves in the vocabulary.

    Ordered by the rank of the merged piece, the way transformers' converter
    derives merges from a SentencePiece vocabulary. A merge list with every
    such split makes the HF BPE (which applies listed merges by rank) and the
    SentencePiece BPE KerasHub rebuilds (which merges any adjacent pair whose
    concatenation is a piece, by the piece's score) produce the same ids.
    """
    known = set(pieces)
    merges = []
    for piece in pieces:
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in known and right in known:
                merges.append([left, right])
    return merges


def build_tokenizer_json(
    corpus: Iterable[str], vocab_size: int = TINY_VOCAB_SIZE
) -> dict:
    """Trains a Gemma-style BPE tokenizer and returns its `tokenizer.json` dict.

    Ids: 0..113 special tokens (see `SPECIAL_TOKENS`) and `<unusedN>`
    fillers, 114..369 the byte-fallback pieces `<0x00>`..`<0xFF>`, then the
    learned pieces; leftover ids up to `vocab_size` are `<unusedN>` too.
    Training is deterministic for a given corpus.

    Args:
        corpus: training texts (plain text; special tokens are not needed).
        vocab_size: total number of ids.

    Returns:
        The JSON dict `tokenizers.Tokenizer.from_str(json.dumps(d))` accepts.

    Example:

    >>> from tokenizers import Tokenizer
    >>> d = build_tokenizer_json(["great food", "bad food"], vocab_size=400)
    >>> tok = Tokenizer.from_str(json.dumps(d))
    >>> tok.encode("<|turn>great food", add_special_tokens=False).tokens[0]
    '<|turn>'
    """
    from tokenizers import (  # tokenizers' `models`, `decoders` stay local to this builder
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    specials = special_token_list()
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    learned = _train_pieces(corpus, vocab_size - FIRST_PIECE_ID)
    learned = [p for p in learned if p not in set(specials) | set(byte_pieces)]
    fillers = [
        f"<unused{NUM_SPECIAL_IDS - len(SPECIAL_TOKENS) + i}>"
        for i in range(vocab_size - FIRST_PIECE_ID - len(learned))
    ]
    ordered = specials + byte_pieces + learned + fillers
    vocab = {piece: i for i, piece in enumerate(ordered)}

    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[tuple(m) for m in _complete_merges(learned)],
            unk_token="<unk>",
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    tokenizer.normalizer = normalizers.Replace(" ", _SPACE)
    # The same no-op split GemmaTokenizer installs (spaces are already `▁`).
    tokenizer.pre_tokenizer = pre_tokenizers.Split(
        " ", behavior="merged_with_previous", invert=False
    )
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    # No BOS from the tokenizer: the chat template emits it (one BOS only).
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A", pair="$A $B", special_tokens=[]
    )
    # Added tokens keep their vocab ids; they are matched before the BPE runs.
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in specials + fillers]
    )
    return json.loads(tokenizer.to_str())


def tokenizer_training_corpus() -> list[str]:
    """Texts the tiny tokenizer learns from: the shipped dataset's messages.

    Example:

    >>> tokenizer_training_corpus()[-1]
    'thought\\n'
    """

    # Each turn as the chat format shows it between the special tokens, so
    # role names and the empty thought block become single pieces too.
    roles = {"system": "system", "user": "user", "assistant": "model"}
    texts = []
    for example in samples.load_sentiment_examples():
        for message in example["messages"]:
            texts.append(f"{roles[message['role']]}\n{message['content']}")
        texts.append("thought\n")
    return texts


def tokenizer_config() -> dict:
    """The `tokenizer_config.json` transformers needs for the tiny tokenizer."""
    return {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "add_bos_token": False,  # the chat template writes <bos>
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "padding_side": "left",
    }


# --------------------------------------------------------------------------
# Chat template
# --------------------------------------------------------------------------

# Written from the format rules of `shared/GEMMA4.md` and `data/tool_format.py`
# (not from Google's file). Every tag trims the whitespace around it
# (`{%- -%}`), so the output does not depend on trim_blocks / lstrip_blocks:
# the text is exactly the strings below. Lookups are `x['key']`, never
# `x.key`, which on a dict would find methods such as `items`. `@EMPTY_THOUGHT@`
# is where the variants differ (`chat_template_jinja`).
_CHAT_TEMPLATE = r"""{#- Gemma 4 chat template of the gemma4_keras tiny checkpoint -#}
{%- set schema_keys = ['description', 'type', 'properties', 'required', 'nullable'] -%}
{%- macro upper(v) -%}
    {%- if v is defined and v is not none -%}{{- v | upper -}}{%- endif -%}
{%- endmacro -%}
{%- macro quoted(v) -%}{{- '<|"|>' ~ v ~ '<|"|>' -}}{%- endmacro -%}
{%- macro text_of(content) -%}
    {#- Text, or a list of parts: text, and image / audio as their placeholders. -#}
    {%- if content is string -%}{{- content -}}
    {%- elif content is iterable and content is not mapping -%}
        {%- for part in content -%}
            {%- if part['type'] == 'image' -%}{{- '<|image|>' -}}
            {%- elif part['type'] == 'audio' -%}{{- '<|audio|>' -}}
            {%- else -%}{{- part['text'] -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- macro value(v, quote_keys) -%}
    {%- if v is none -%}{{- 'null' -}}
    {%- elif v is string -%}{{- quoted(v) -}}
    {%- elif v is boolean -%}{{- 'true' if v else 'false' -}}
    {%- elif v is mapping -%}
        {{- '{' -}}
        {%- for key, item in v | dictsort -%}
            {{- (quoted(key) if quote_keys else key) ~ ':' ~ value(item, quote_keys) -}}
            {%- if not loop.last -%}{{- ',' -}}{%- endif -%}
        {%- endfor -%}
        {{- '}' -}}
    {%- elif v is iterable -%}
        {{- '[' -}}
        {%- for item in v -%}
            {{- value(item, quote_keys) -}}{%- if not loop.last -%}{{- ',' -}}{%- endif -%}
        {%- endfor -%}
        {{- ']' -}}
    {%- else -%}{{- v -}}
    {%- endif -%}
{%- endmacro -%}
{%- macro required(names) -%}
    {{- 'required:[' -}}
    {%- for name in names or [] -%}
        {{- quoted(name) -}}{%- if not loop.last -%}{{- ',' -}}{%- endif -%}
    {%- endfor -%}
    {{- ']' -}}
{%- endmacro -%}
{%- macro schema_items(items) -%}
    {#- The `items` schema of an array: its keys as they are, types upper-cased. -#}
    {%- set out = namespace(parts=[]) -%}
    {%- for key, v in items | dictsort if v is not none -%}
        {%- if key == 'properties' -%}
            {%- set part = 'properties:{' ~ (properties(v, false) if v is mapping else '') ~ '}' -%}
        {%- elif key == 'required' -%}
            {%- set part = required(v) -%}
        {%- elif key == 'type' and v is string -%}
            {%- set part = 'type:' ~ quoted(upper(v)) -%}
        {%- elif key == 'type' -%}
            {%- set kinds = namespace(parts=[]) -%}
            {%- for kind in v -%}
                {%- set kinds.parts = kinds.parts + [quoted(upper(kind))] -%}
            {%- endfor -%}
            {%- set part = 'type:[' ~ kinds.parts | join(',') ~ ']' -%}
        {%- else -%}
            {%- set part = key ~ ':' ~ value(v, true) -%}
        {%- endif -%}
        {%- set out.parts = out.parts + [part] -%}
    {%- endfor -%}
    {{- out.parts | join(',') -}}
{%- endmacro -%}
{%- macro property(v) -%}
    {%- set v = v if v is mapping else {} -%}
    {%- set kind = upper(v['type']) -%}
    {%- set out = namespace(parts=[]) -%}
    {%- if v['description'] -%}
        {%- set out.parts = out.parts + ['description:' ~ quoted(v['description'])] -%}
    {%- endif -%}
    {%- if kind == 'STRING' and v['enum'] -%}
        {%- set out.parts = out.parts + ['enum:' ~ value(v['enum'], true)] -%}
    {%- elif kind == 'ARRAY' and v['items'] is mapping and v['items'] -%}
        {%- set out.parts = out.parts + ['items:{' ~ schema_items(v['items']) ~ '}'] -%}
    {%- endif -%}
    {%- if v['nullable'] -%}
        {%- set out.parts = out.parts + ['nullable:true'] -%}
    {%- endif -%}
    {%- if kind == 'OBJECT' -%}
        {#- An object schema without `properties` is read as the property list itself. -#}
        {%- if v['properties'] is mapping -%}
            {%- set inner = properties(v['properties'], false) -%}
        {%- else -%}
            {%- set inner = properties(v, true) -%}
        {%- endif -%}
        {%- set out.parts = out.parts + ['properties:{' ~ inner ~ '}'] -%}
        {%- if v['required'] -%}
            {%- set out.parts = out.parts + [required(v['required'])] -%}
        {%- endif -%}
    {%- endif -%}
    {{- (out.parts + ['type:' ~ quoted(kind)]) | join(',') -}}
{%- endmacro -%}
{%- macro properties(props, skip_schema_keys) -%}
    {%- set out = namespace(parts=[]) -%}
    {%- for key, v in props | dictsort -%}
        {%- if not (skip_schema_keys and key in schema_keys) -%}
            {%- set out.parts = out.parts + [key ~ ':{' ~ property(v) ~ '}'] -%}
        {%- endif -%}
    {%- endfor -%}
    {{- out.parts | join(',') -}}
{%- endmacro -%}
{%- macro declaration(tool) -%}
    {%- set function = tool['function'] if tool['function'] is defined else tool -%}
    {{- '<|tool>declaration:' ~ function['name'] ~ '{description:' -}}
    {{- quoted(function['description'] or '') -}}
    {%- set params = function['parameters'] -%}
    {%- if params -%}
        {{- ',parameters:{' -}}
        {%- if params['properties'] -%}
            {{- 'properties:{' ~ properties(params['properties'], false) ~ '},' -}}
        {%- endif -%}
        {%- if params['required'] -%}{{- required(params['required']) ~ ',' -}}{%- endif -%}
        {%- if params['type'] -%}
            {{- 'type:' ~ quoted(upper(params['type'])) ~ '}' -}}
        {%- endif -%}
    {%- endif -%}
    {%- if 'response' in function -%}
        {%- set response = function['response'] or {} -%}
        {{- ',response:{' -}}
        {%- if response['description'] -%}
            {{- 'description:' ~ quoted(response['description']) ~ ',' -}}
        {%- endif -%}
        {%- if upper(response['type']) == 'OBJECT' -%}
            {{- 'type:' ~ quoted('OBJECT') ~ '}' -}}
        {%- endif -%}
    {%- endif -%}
    {{- '}<tool|>' -}}
{%- endmacro -%}
{%- macro call(item) -%}
    {%- set function = item['function'] if item['function'] is defined else item -%}
    {%- set arguments = function['arguments'] -%}
    {%- if arguments is string -%}
        {{- raise_exception('tool call arguments must be a mapping, not a JSON string') -}}
    {%- endif -%}
    {{- '<|tool_call>call:' ~ function['name'] ~ '{' -}}
    {%- for key, v in (arguments or {}) | dictsort -%}
        {{- key ~ ':' ~ value(v, false) -}}{%- if not loop.last -%}{{- ',' -}}{%- endif -%}
    {%- endfor -%}
    {{- '}<tool_call|>' -}}
{%- endmacro -%}
{%- macro response(name, result) -%}
    {#- A mapping result key by key, anything else as `value`. -#}
    {{- '<|tool_response>response:' ~ name ~ '{' -}}
    {%- if result is mapping -%}
        {%- for key, v in result | dictsort -%}
            {{- key ~ ':' ~ value(v, false) -}}{%- if not loop.last -%}{{- ',' -}}{%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{- 'value:' ~ value(result, false) -}}
    {%- endif -%}
    {{- '}<tool_response|>' -}}
{%- endmacro -%}
{%- macro tool_message(message, calls) -%}
    {#- A `tool` message answers the call its `tool_call_id` names, else its `name`. -#}
    {%- set found = namespace(name=none) -%}
    {%- set call_id = message['tool_call_id'] -%}
    {%- for item in calls -%}
        {%- if call_id is defined and call_id is not none and item['id'] is defined
              and item['id'] is not none and item['id'] | string
              and item['id'] | string == call_id | string -%}
            {%- set found.name = (item['function'] if item['function'] is defined else item)['name'] -%}
        {%- endif -%}
    {%- endfor -%}
    {%- set result = message['content'] -%}
    {%- if result is iterable and result is not string and result is not mapping
          and result | reject('mapping') | list | length == 0 -%}
        {%- set result = text_of(result) -%}
    {%- endif -%}
    {{- response(found.name or message['name'] or 'unknown', result) -}}
{%- endmacro -%}
{%- macro model_text(content) -%}
    {#- Thoughts `<|channel>...<channel|>` are never shown in the history. -#}
    {%- set text = namespace(kept='') -%}
    {%- for part in text_of(content).split('<channel|>') -%}
        {%- set text.kept = text.kept + part.split('<|channel>')[0] -%}
    {%- endfor -%}
    {{- text.kept -}}
{%- endmacro -%}
{%- set roles = {'assistant': 'model', 'developer': 'system'} -%}
{%- set ns = namespace(start=0, last_user=-1, prev='', after='') -%}
{{- bos_token -}}
{%- set has_system = messages | length > 0 and messages[0]['role'] in ['system', 'developer'] -%}
{%- if enable_thinking or has_system or tools -%}
    {{- '<|turn>system\n' -}}
    {%- if enable_thinking -%}{{- '<|think|>\n' -}}{%- endif -%}
    {%- if has_system -%}
        {{- text_of(messages[0]['content']) | trim -}}
        {%- set ns.start = 1 -%}
    {%- endif -%}
    {%- for tool in tools or [] -%}{{- declaration(tool) -}}{%- endfor -%}
    {{- '<turn|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if message['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{#- `tool` messages are rendered with the model message whose calls they answer. -#}
{%- for i in range(ns.start, messages | length) if messages[i]['role'] != 'tool' -%}
    {%- set message = messages[i] -%}
    {%- set role = roles.get(message['role'], message['role']) -%}
    {#- Tool use is one model turn: a model message after one opens no new turn. -#}
    {%- if not (role == 'model' and ns.prev == 'model') -%}
        {{- '<|turn>' ~ role ~ '\n' -}}
    {%- endif -%}
    {%- set calls = (message['tool_calls'] or []) if role == 'model' else [] -%}
    {%- set turn = namespace(responses=false, following=none, close=false) -%}
    {%- if role == 'model' -%}
        {#- Only the thoughts of the turn being answered are shown. -#}
        {%- set thought = message['reasoning_content'] or message['reasoning'] -%}
        {%- if thought and i > ns.last_user -%}
            {{- '<|channel>thought\n' ~ thought ~ '\n<channel|>' -}}
        {%- endif -%}
        {%- for item in calls -%}{{- call(item) -}}{%- endfor -%}
        {%- for item in message['tool_responses'] or [] -%}
            {{- response(item['name'] or 'unknown', item['response']) -}}
            {%- set turn.responses = true -%}
        {%- endfor -%}
    {%- endif -%}
    {#- The `tool` messages right after a model message are its results. -#}
    {%- for later in messages[i + 1:] -%}
        {%- if later['role'] != 'tool' -%}
            {%- set turn.following = roles.get(later['role'], later['role']) -%}
            {%- break -%}
        {%- endif -%}
        {{- tool_message(later, calls) -}}
        {%- set turn.responses = true -%}
    {%- endfor -%}
    {%- set content = model_text(message['content']) if role == 'model'
                      else text_of(message['content']) -%}
    {%- set text = (content | trim) -%}
    {{- text -}}
    {%- if calls and not turn.responses -%}
        {#- The model stops at `<|tool_response>`; the runtime writes the results. -#}
        {{- '<|tool_response>' -}}
        {%- set ns.after = 'call' -%}
    {%- else -%}
        {%- set ns.after = 'response' if turn.responses and not text else '' -%}
        {#- A model message after this one goes on with the same turn; results
            that end the conversation leave it open for the model to go on. -#}
        {%- set continues = role == 'model' and turn.following == 'model' -%}
        {%- set turn.close = not continues
                             and not (ns.after == 'response' and turn.following is none) -%}
    {%- endif -%}
    {%- set ns.prev = role -%}
    {%- if turn.close -%}{{- '<turn|>\n' -}}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {%- if ns.after == '' -%}
        {{- '<|turn>model\n' -}}
        {%- if @EMPTY_THOUGHT@ and not enable_thinking -%}
            {{- '<|channel>thought\n<channel|>' -}}
        {%- endif -%}
    {%- elif ns.after == 'response' and enable_thinking -%}
        {{- '<|channel>thought\n' -}}
    {%- endif -%}
{%- endif -%}
"""


def chat_template_jinja(variant: str) -> str:
    """A `chat_template.jinja` that renders like the official `variant` one.

    It renders plain turns, thoughts, tool declarations, calls (OpenAI
    `tool_calls`), their results (`tool` messages or Gemma's native
    `tool_responses`) and both generation prompts, as
    `chat.render_conversation` does (tests/test_tool_template.py).

    Args:
        variant: "small" (E2B-it, E4B-it: the thinking-off generation prompt
            ends at `<|turn>model\\n`) or "large" (26B-A4B-it, 31B-it: it adds
            the empty thought block).

    Example:

    >>> "<|channel>thought" in chat_template_jinja("large")
    True
    """
    if variant not in ("small", "large"):
        raise ValueError(f"chat template variant {variant!r}: use small or large")
    return _CHAT_TEMPLATE.replace("@EMPTY_THOUGHT@", str(variant == "large").lower())


# --------------------------------------------------------------------------
# The checkpoint directory
# --------------------------------------------------------------------------


def _dump_json(path: pathlib.Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_tiny_checkpoint(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    ple: bool = False,
    kv_shared_layers: int = 0,
    moe: bool = False,
    k_eq_v: bool = False,
    double_wide_mlp: bool = False,
    layout: str = "causal_lm",
    vision_bidirectional: bool = False,
    chat_template: str | None = None,
) -> pathlib.Path:
    """Writes a tiny Gemma 4 checkpoint in Hugging Face format into `path`.

    Same arguments, same bytes: the weights come from `seed` alone and the
    tokenizer from the shipped dataset.

    Args:
        path: directory to write (created if missing; files are overwritten).
        seed: weight seed.
        ple, kv_shared_layers, moe, k_eq_v, double_wide_mlp, layout,
            vision_bidirectional: see `tiny_hf_config`.
        chat_template: "small" or "large" also writes `chat_template.jinja`
            (`chat_template_jinja`); None (default) writes none, so a run
            decides the template from its size.

    Returns:
        `path` as a `pathlib.Path`.

    Example:

    >>> d = write_tiny_checkpoint("/tmp/tiny_gemma4", seed=1, moe=True)
    >>> sorted(p.name for p in d.iterdir())[:2]
    ['config.json', 'generation_config.json']
    """
    config = tiny_hf_config(
        ple=ple,
        kv_shared_layers=kv_shared_layers,
        moe=moe,
        k_eq_v=k_eq_v,
        double_wide_mlp=double_wide_mlp,
        layout=layout,
        vision_bidirectional=vision_bidirectional,
    )
    path = write_checkpoint(path, config, seed=seed)
    if chat_template is not None:
        (path / "chat_template.jinja").write_text(
            chat_template_jinja(chat_template), encoding="utf-8"
        )
    return path


def write_checkpoint(
    path: str | os.PathLike, config: dict, *, seed: int = 0
) -> pathlib.Path:
    """Writes any Gemma 4 `config` with seeded random weights and the tiny tokenizer.

    Benchmarks use it for mid-size shapes, e.g.
    `write_checkpoint(d, tiny_hf_config(hidden_size=512, intermediate_size=2048))`.
    """

    path = write_support_files(path, config)
    # transformers refuses safetensors files without format metadata.
    save_file(
        tiny_weights(config, seed), str(path / "model.safetensors"), {"format": "pt"}
    )
    return path


def write_support_files(path: str | os.PathLike, config: dict) -> pathlib.Path:
    """Writes everything of a checkpoint but its weights: `config.json`, the
    tiny tokenizer files, `processor_config.json`, `generation_config.json`.

    `testing.full_size` writes the weights of real-dimension checkpoints itself.
    """
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _dump_json(path / "config.json", config)
    _dump_json(
        path / "tokenizer.json", build_tokenizer_json(tokenizer_training_corpus())
    )
    _dump_json(path / "tokenizer_config.json", tokenizer_config())
    _dump_json(
        path / "special_tokens_map.json",
        {
            k: tokenizer_config()[k]
            for k in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")
        },
    )
    # KerasHub's Gemma4CausalLM.from_preset (unlike Gemma4Backbone's) reads
    # processor_config.json; empty means "no image / audio / video
    # processor", which is what a text-only model has.
    _dump_json(path / "processor_config.json", {})
    _dump_json(
        path / "generation_config.json",
        {
            "bos_token_id": BOS_ID,
            "eos_token_id": list(STOP_IDS),
            "pad_token_id": PAD_ID,
        },
    )
    return path


def _cache_root() -> pathlib.Path:
    root = os.environ.get(CACHE_ENV_VAR)
    base = (
        pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "gemma4_keras"
    )
    return base / "tiny"


def _cache_key(seed: int, variant: dict) -> str:
    """Readable and collision-safe directory name for one checkpoint."""
    spec = json.dumps(
        {"format": FORMAT_VERSION, "seed": seed, **variant}, sort_keys=True
    )
    digest = hashlib.sha256(spec.encode()).hexdigest()[:12]
    flags = [k if v is True else f"{k}{v}" for k, v in sorted(variant.items()) if v]
    return "-".join([f"v{FORMAT_VERSION}", f"seed{seed}", *flags, digest])


def tiny_checkpoint(*, seed: int = 0, **variant) -> pathlib.Path:
    """Returns a cached tiny checkpoint directory, writing it on first use.

    The cache is `$GEMMA4_KERAS_CACHE/tiny/<key>` (default
    `~/.cache/gemma4_keras/tiny/<key>`), the key derived from the seed, the
    variant and `FORMAT_VERSION`. The files are written into a temporary
    directory beside it and renamed into place, so concurrent callers (e.g.
    pytest-xdist workers) never see a half-written checkpoint.

    Args:
        seed: weight seed.
        **variant: `ple`, `kv_shared_layers`, `moe`, `k_eq_v`,
            `double_wide_mlp`, `layout`, `vision_bidirectional`,
            `chat_template` as in
            `write_tiny_checkpoint`. Options
            left at their defaults are not part of the cache key, so adding
            an option keeps the keys of existing variants.

    Returns:
        The checkpoint directory; load it with
        `keras_hub.models.Gemma4Backbone.from_preset(str(path))` or
        `transformers.AutoModelForCausalLM.from_pretrained(path)`.

    Example:

    >>> path = tiny_checkpoint(ple=True)
    >>> (path / "model.safetensors").exists()
    True
    """
    defaults = {
        "ple": False,
        "kv_shared_layers": 0,
        "moe": False,
        "k_eq_v": False,
        "double_wide_mlp": False,
        "layout": "causal_lm",
        "vision_bidirectional": False,
        "chat_template": None,
    }
    unknown = set(variant) - set(defaults)
    if unknown:
        raise TypeError(
            f"tiny_checkpoint: unknown variant options {sorted(unknown)}; expected {sorted(defaults)}."
        )
    variant = {**defaults, **variant}
    key_variant = {k: v for k, v in variant.items() if v != defaults[k]}
    final = _cache_root() / _cache_key(seed, key_variant)
    return write_once(
        final, lambda tmp: write_tiny_checkpoint(tmp, seed=seed, **variant)
    )


def write_once(final: pathlib.Path, write) -> pathlib.Path:
    """The cache entry `final`, written by `write(directory)` on first use.

    Written into a temporary directory beside `final` and renamed into
    place, so an interrupted write leaves no half checkpoint behind.
    """
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        write(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process renamed its copy into place first; theirs is
            # identical, so keep it.
            if not final.is_dir():
                raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    return final
