"""Tests of the hermetic tiny Gemma 4 checkpoint and the shipped dataset.

KerasHub and transformers are both oracles here: the checkpoint must load in
each with every weight used, and their logits must agree.
"""

import collections
import json

import numpy as np
import oracles
import pytest

from gemma4_keras.data import samples
from gemma4_keras.testing import tiny, variants

# float32 logits of the two frameworks agree to ~1e-5 relative on this model;
# 1e-4 is the cross-framework floor DESIGN.md promises users.
LOGIT_RTOL = 1e-4
SEQ_LEN = 40  # > sliding_window (16), so the window is exercised.

VARIANTS = variants.VARIANTS  # every variant: each must load in both frameworks

CHAT_TEXTS = [
    "<bos><|turn>user\nClassify: 'great food'<turn|>\n<|turn>model\n"
    "<|channel>thought\n<channel|>positive<turn|>\n",
    "<bos><|turn>system\n<|think|>\nYou label reviews.<turn|>\n<|turn>user\n"
    "Is this review positive or negative? 'What a truly stale salad!'<turn|>\n",
    "héllo wörld ñ 日本語 😀🎉",
    "multiple   spaces  and\n\nnewlines\n",
    " leading and trailing ",
    '<|tool_call>call:f{a:<|"|>x<|"|>}<tool_call|><|image|><|audio|><|video|>',
    "",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """Points GEMMA4_KERAS_CACHE at a fresh directory for this module."""
    path = tmp_path_factory.mktemp("gemma4_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(tiny.CACHE_ENV_VAR, str(path))
        yield path


@pytest.fixture(scope="module")
def checkpoints(cache_dir):
    return {name: tiny.tiny_checkpoint(**v) for name, v in VARIANTS.items()}


@pytest.fixture(scope="module")
def token_ids():
    rng = np.random.default_rng(0)
    return rng.integers(4, tiny.TINY_VOCAB_SIZE, size=(2, SEQ_LEN)).astype("int32")


@pytest.fixture(scope="module")
def keras_hub():
    import keras_hub

    return keras_hub


@pytest.fixture(scope="module")
def transformers():
    transformers = oracles.need("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


def _read_all(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


# --- dataset -------------------------------------------------------------


def test_shipped_dataset_is_reproduced_byte_for_byte():
    shipped = samples.SENTIMENT_PATH.read_bytes()
    assert samples.sentiment_jsonl_text().encode("utf-8") == shipped


def test_shipped_dataset_is_balanced_unique_and_well_formed():
    lines = samples.SENTIMENT_PATH.read_text(encoding="utf-8").splitlines()
    assert 1000 <= len(lines) <= 1500
    assert len(set(lines)) == len(lines)
    examples = [json.loads(line) for line in lines]
    labels = collections.Counter(e["messages"][-1]["content"] for e in examples)
    assert labels == {"positive": len(lines) // 2, "negative": len(lines) // 2}
    for e in examples:
        roles = [m["role"] for m in e["messages"]]
        assert roles in (["user", "assistant"], ["system", "user", "assistant"])
    num_system = sum(e["messages"][0]["role"] == "system" for e in examples)
    assert 0.1 * len(lines) < num_system < 0.5 * len(lines)


# --- checkpoint files ----------------------------------------------------


def test_same_seed_gives_identical_bytes_other_seed_differs(tmp_path):
    a = _read_all(tiny.write_tiny_checkpoint(tmp_path / "a", seed=0, moe=True))
    b = _read_all(tiny.write_tiny_checkpoint(tmp_path / "b", seed=0, moe=True))
    c = _read_all(tiny.write_tiny_checkpoint(tmp_path / "c", seed=1, moe=True))
    assert a == b
    assert a["model.safetensors"] != c["model.safetensors"]
    assert a["tokenizer.json"] == c["tokenizer.json"]


def test_tiny_checkpoint_is_cached_per_variant(cache_dir, checkpoints):
    assert tiny.tiny_checkpoint() == checkpoints["default"]
    assert len(set(checkpoints.values())) == len(VARIANTS)
    assert all(p.parent == cache_dir / "tiny" for p in checkpoints.values())
    # Only finished directories remain: the temporary ones were renamed.
    assert sorted((cache_dir / "tiny").iterdir()) == sorted(checkpoints.values())
    with pytest.raises(TypeError, match="unknown variant options"):
        tiny.tiny_checkpoint(moee=True)
    # Options at their defaults stay out of the key: adding an option kept
    # the directories (and bytes) of the variants that existed before it.
    assert (
        tiny.tiny_checkpoint(k_eq_v=False, double_wide_mlp=False)
        == (checkpoints["default"])
    )


def test_double_wide_mlp_needs_kv_shared_layers():
    with pytest.raises(ValueError, match="kv_shared_layers=1 or 2"):
        tiny.tiny_hf_config(double_wide_mlp=True)


def test_kv_shared_layers_have_no_kv_weights(checkpoints):
    from safetensors.numpy import load_file

    names = load_file(checkpoints["kv_shared"] / "model.safetensors").keys()
    for i in range(tiny.NUM_LAYERS):
        has_kv = f"model.layers.{i}.self_attn.k_proj.weight" in names
        assert has_kv == (i < 2), i


def test_k_eq_v_full_layers_have_no_v_proj(checkpoints):
    from safetensors.numpy import load_file

    weights = load_file(checkpoints["k_eq_v"] / "model.safetensors")
    for i, layer_type in enumerate(tiny.LAYER_TYPES):
        full = layer_type == "full_attention"
        heads, head_dim = (2, 32) if full else (4, 16)
        prefix = f"model.layers.{i}.self_attn."
        assert (prefix + "v_proj.weight" in weights) == (not full), i
        assert weights[prefix + "k_proj.weight"].shape == (heads * head_dim, 64), i
        assert weights[prefix + "k_norm.weight"].shape == (head_dim,), i


def test_double_wide_mlp_widens_kv_shared_layers(checkpoints):
    from safetensors.numpy import load_file

    weights = load_file(checkpoints["double_wide_mlp"] / "model.safetensors")
    for i, ffn in enumerate([128, 128, 256, 256]):  # layers 2 and 3 are KV-shared
        assert weights[f"model.layers.{i}.mlp.gate_proj.weight"].shape == (ffn, 64)
        assert weights[f"model.layers.{i}.mlp.up_proj.weight"].shape == (ffn, 64)
        assert weights[f"model.layers.{i}.mlp.down_proj.weight"].shape == (64, ffn)


def test_moe_experts_are_raw_tensors_named_like_transformers(checkpoints):
    from safetensors.numpy import load_file

    weights = load_file(checkpoints["moe"] / "model.safetensors")
    assert weights["model.layers.0.experts.gate_up_proj"].shape == (4, 64, 64)
    assert weights["model.layers.0.experts.down_proj"].shape == (4, 64, 32)
    assert weights["model.layers.0.router.proj.weight"].shape == (4, 64)


# --- model parity --------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_keras_hub_and_transformers_logits_agree(
    name, checkpoints, token_ids, keras_hub, transformers
):
    import torch

    path = checkpoints[name]
    backbone = keras_hub.models.Gemma4Backbone.from_preset(str(path))
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, output_loading_info=True, dtype=torch.float32
    )
    assert not any(info.values()), info  # no missing / unexpected keys
    model.eval()
    with torch.no_grad():
        # A slice (not the default int 0) sidesteps a transformers 5.24 bug:
        # KV-shared layers without PLE crash slicing `per_layer_inputs=None`.
        out = model(torch.tensor(token_ids).long(), logits_to_keep=slice(None))
    expected = out.logits.numpy()

    positions = np.broadcast_to(np.arange(SEQ_LEN, dtype="int32"), token_ids.shape)
    hidden = backbone(
        {
            "token_ids": token_ids,
            "padding_mask": np.ones_like(token_ids),
            "position_ids": positions,
        }
    )
    # reverse=True applies the tied output projection and the final soft-cap.
    logits = np.asarray(backbone.token_embedding(hidden, reverse=True))

    assert np.abs(expected).max() < 30.0  # soft-capped on both sides
    assert expected.std() > 0.1  # logits are not degenerate
    rel = np.abs(logits - expected).max() / np.abs(expected).max()
    print(f"{name}: KerasHub vs transformers logits, max relative {rel:.2e}")
    assert rel < LOGIT_RTOL, f"{name}: max relative logit error {rel:.2e}"


def test_both_frameworks_read_the_architecture(checkpoints, keras_hub, transformers):
    path = checkpoints["all"]
    backbone = keras_hub.models.Gemma4Backbone.from_preset(str(path))
    kh = backbone.get_config()
    assert kh["global_head_dim"] == 32 and kh["head_dim"] == 16
    assert kh["layer_types"] == list(tiny.LAYER_TYPES)
    assert kh["hidden_size_per_layer_input"] == tiny.PLE_HIDDEN_SIZE
    assert kh["enable_moe_block"] and kh["num_experts"] == 4
    shared = [backbone.get_layer(f"decoder_block_{i}") for i in (2, 3)]
    assert [b.kv_shared_layer_index for b in shared] == [0, 1]

    hf = transformers.AutoConfig.from_pretrained(path)
    head_dims = [hf.per_layer_config[i].head_dim for i in range(tiny.NUM_LAYERS)]
    assert head_dims == [16, 32, 16, 32]
    assert hf.kv_sharing_modes == ["store", "store", "reuse", "reuse"]
    assert hf.sliding_window == 16 and hf.final_logit_softcapping == 30.0


def test_both_frameworks_read_k_eq_v_and_double_wide_mlp(
    checkpoints, keras_hub, transformers
):
    backbone = keras_hub.models.Gemma4Backbone.from_preset(str(checkpoints["k_eq_v"]))
    attn = [backbone.get_layer(f"decoder_block_{i}").attention for i in range(4)]
    assert [a.attention_k_eq_v for a in attn] == [False, True, False, True]
    assert [a.effective_num_kv_heads for a in attn] == [4, 2, 4, 2]
    assert [a.value_dense is None for a in attn] == [False, True, False, True]
    hf = transformers.AutoConfig.from_pretrained(checkpoints["k_eq_v"])
    kv_heads = [hf.per_layer_config[i].num_key_value_heads for i in range(4)]
    assert kv_heads == [4, 2, 4, 2] and hf.attention_k_eq_v

    backbone = keras_hub.models.Gemma4Backbone.from_preset(
        str(checkpoints["double_wide_mlp"])
    )
    dims = [
        backbone.get_layer(f"decoder_block_{i}").actual_intermediate_dim
        for i in range(4)
    ]
    assert dims == [128, 128, 256, 256]
    hf = transformers.AutoConfig.from_pretrained(checkpoints["double_wide_mlp"])
    assert hf.use_double_wide_mlp and hf.kv_sharing_modes[2:] == ["reuse", "reuse"]


@pytest.mark.parametrize("name", ["default", "conditional_generation"])
def test_keras_hub_causal_lm_loads(name, checkpoints, keras_hub):
    causal_lm = keras_hub.models.Gemma4CausalLM.from_preset(str(checkpoints[name]))
    # generate() would compile a sampler (~9 s); one preprocessing call shows
    # the tokenizer and preprocessor came up from the HF files.
    x, _, _ = causal_lm.preprocessor(
        {"prompts": ["<|turn>user\nhi<turn|>\n"], "responses": ["ok"]},
        sequence_length=8,
    )
    ids = np.asarray(x["token_ids"])[0, :2].tolist()
    assert ids == [tiny.BOS_ID, tiny.TURN_START_ID]


# transformers 5.24 crashed in the default forward of a KV-shared model
# without PLE (`Gemma4TextModel` sliced `per_layer_inputs=None`); 5.25 fixed it.
# The parity tests pass `logits_to_keep=slice(None)`, which works with both.
KV_SHARING_FIXED_IN = (5, 25)


def _version(module) -> tuple[int, int]:
    major, minor = module.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def test_transformers_kv_sharing_without_ple_default_forward(checkpoints, transformers):
    """The default forward of a KV-shared model without PLE, in the installed
    transformers: all logits, equal to the `slice(None)` forward the parity
    tests use, or, before 5.25, the known TypeError (so the parity tests' way
    around it stays needed on every version in the `test` extra's range)."""
    import torch

    model = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoints["kv_shared_without_ple"], dtype=torch.float32
    ).eval()
    ids = torch.arange(4, 4 + SEQ_LEN)[None]
    with torch.no_grad():
        sliced = model(ids, logits_to_keep=slice(None)).logits
        if _version(transformers) < KV_SHARING_FIXED_IN:
            with pytest.raises(TypeError):
                model(ids)
            return
        default = model(ids).logits
    assert default.shape == sliced.shape == (1, SEQ_LEN, tiny.TINY_VOCAB_SIZE)
    np.testing.assert_array_equal(default.numpy(), sliced.numpy())


# --- tokenizer -----------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizers(checkpoints, keras_hub, transformers):
    path = checkpoints["default"]
    return (
        keras_hub.models.Gemma4Tokenizer.from_preset(str(path)),
        transformers.AutoTokenizer.from_pretrained(path),
    )


def test_special_token_ids(tokenizers):
    keras_tok, hf_tok = tokenizers
    expected = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    expected.update({"<|turn>": 105, "<turn|>": 106, "<|tool_response>": 50})
    expected.update({t: tiny.SPECIAL_TOKENS[t] for t in ("<|video|>", "<|image|>")})
    for token, token_id in expected.items():
        assert keras_tok.token_to_id(token) == token_id, token
        assert hf_tok.convert_tokens_to_ids(token) == token_id, token
    assert (hf_tok.pad_token_id, hf_tok.eos_token_id, hf_tok.bos_token_id) == (0, 1, 2)
    assert keras_tok.vocabulary_size() == len(hf_tok) == tiny.TINY_VOCAB_SIZE


def test_every_special_token_is_one_unit_inside_text(tokenizers):
    keras_tok, hf_tok = tokenizers
    for token in tiny.special_token_list():
        if token == "<unk>":
            continue  # see the next test
        text = f"ab{token}cd"
        ids = np.asarray(keras_tok(text)).tolist()
        assert tiny.special_token_list().index(token) in ids, token
        assert ids == hf_tok(text, add_special_tokens=False)["input_ids"], token


def test_literal_unk_text_is_the_one_known_difference(tokenizers):
    """KerasHub's converter makes `<unk>` an UNKNOWN piece, which SentencePiece
    never matches in text (it spells it out); transformers matches it as an
    added token. The real Gemma 4 tokenizer.json behaves the same way."""
    keras_tok, hf_tok = tokenizers
    assert hf_tok("<unk>", add_special_tokens=False)["input_ids"] == [tiny.UNK_ID]
    assert tiny.UNK_ID not in np.asarray(keras_tok("<unk>")).tolist()


@pytest.mark.parametrize("text", CHAT_TEXTS)
def test_keras_hub_and_transformers_tokenize_identically(text, tokenizers):
    keras_tok, hf_tok = tokenizers
    ids = np.asarray(keras_tok(text)).tolist()
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert hf_tok.decode(ids) == text
    detok = keras_tok.detokenize(np.asarray(ids, "int32"))
    assert (detok.numpy().decode() if hasattr(detok, "numpy") else detok) == text


def test_dataset_sentences_tokenize_into_few_tokens(tokenizers):
    keras_tok, _ = tokenizers
    example = samples.load_sentiment_examples()[0]
    user = example["messages"][-2]["content"]
    assert len(np.asarray(keras_tok(user))) <= len(user.split()) + 4
    # Byte fallback: characters absent from the corpus become <0xNN> pieces.
    assert np.asarray(keras_tok("😀")).tolist() == [
        tiny.FIRST_BYTE_ID + b for b in "😀".encode()
    ]


def test_tokenizer_adds_no_bos_and_generation_stops_like_the_it_checkpoints(
    checkpoints, tokenizers
):
    """The official -it tokenizer adds no BOS (the template does); its
    generation_config.json stops on <eos>, <turn|> and <|tool_response>."""
    from gemma4_keras.eval import generate

    path = checkpoints["default"]
    assert (
        json.loads((path / "tokenizer_config.json").read_text())["add_bos_token"]
        is False
    )
    stops = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
    assert stops == [1, 106, 50] == list(generate.STOP_IDS)
    keras_tok, hf_tok = tokenizers
    assert hf_tok("<bos>hi")["input_ids"].count(tiny.BOS_ID) == 1
    assert generate.stop_ids(keras_tok) == tiny.STOP_IDS
    assert not (path / "chat_template.jinja").exists()  # sizes decide by default
