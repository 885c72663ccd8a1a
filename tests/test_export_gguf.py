"""GGUF export read back with gguf.GGUFReader: metadata, names, types, values, vocab."""

import json
import os
import pathlib

import numpy as np
import oracles
import pytest
from export_fixtures import (
    TOKENS,
    config_for,
    factor_workdir,
    fake_workdir,
    keras_greedy,
    keras_logits,
    llama_greedy,
    llama_logprobs,
    llama_server,
    log_softmax,
    merged_tensors,
    random_factors,
    rel_err,
    trained_model,
    variant_preset,
)
from jinja2.sandbox import ImmutableSandboxedEnvironment
from safetensors.numpy import load_file

from gemma4_keras import config_lib
from gemma4_keras.data import chat, records
from gemma4_keras.exporters import commands
from gemma4_keras.exporters.hf import ExportError
from gemma4_keras.model.lora import LoraSpec
from gemma4_keras.model.schema import EXPERT_TARGETS
from gemma4_keras.testing import tiny

gguf = oracles.need("gguf")


def _export(tmp_path_factory, gguf_type, targets=None, **variant):
    preset = variant_preset(**variant)
    root = str(tmp_path_factory.mktemp(f"gguf_{gguf_type}"))
    model = trained_model(preset, targets=targets)
    workdir = fake_workdir(root, model, preset)
    out = commands.export(
        config_for(preset),
        workdir,
        "gguf",
        os.path.join(root, "gguf"),
        gguf_type=gguf_type,
    )
    reader = gguf.GGUFReader(os.path.join(out, f"model-{gguf_type}.gguf"))
    return preset, model, out, reader


@pytest.fixture(scope="module")
def q8(tmp_path_factory):
    return _export(tmp_path_factory, "q8_0", ple=True, kv_shared_layers=2)


def _field(reader, key):
    f = reader.get_field(key)
    return f.contents() if f is not None else None


def _tensor(reader, name) -> np.ndarray:
    t = next(t for t in reader.tensors if t.name == name)
    shape = tuple(int(x) for x in reversed(t.shape))
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)


def test_metadata(q8):
    _, model, _, reader = q8
    assert _field(reader, "general.architecture") == "gemma4"
    assert _field(reader, "gemma4.block_count") == 4
    assert _field(reader, "gemma4.embedding_length") == 64
    assert _field(reader, "gemma4.attention.shared_kv_layers") == 2
    assert _field(reader, "gemma4.embedding_length_per_layer_input") == 8
    assert _field(reader, "gemma4.attention.key_length") == 32
    assert _field(reader, "gemma4.attention.key_length_swa") == 16
    assert _field(reader, "gemma4.final_logit_softcapping") == pytest.approx(30.0)
    assert _field(reader, "gemma4.attention.sliding_window_pattern") == [
        True,
        False,
        True,
        False,
    ]


def test_tensor_names_types_and_values(q8):
    _, model, _, reader = q8
    names = {t.name for t in reader.tensors}
    assert (
        "blk.0.attn_k.weight" in names and "blk.2.attn_k.weight" not in names
    )  # KV-shared
    assert {
        "token_embd.weight",
        "per_layer_token_embd.weight",
        "blk.3.layer_output_scale.weight",
        "blk.1.inp_gate.weight",
    } <= names
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    merged = merged_tensors(model)
    want = merged["model.layers.1.self_attn.q_proj.weight"]
    got = _tensor(reader, "blk.1.attn_q.weight")
    assert got.shape == want.shape
    # q8_0: per block of 32, error <= scale/2 = max|w|/254.
    assert np.max(np.abs(got - want)) <= np.max(np.abs(want)) / 254 + 1e-6
    base = model.blocks[1].proj["q_proj"].weight("float32")
    assert np.max(np.abs(np.asarray(base).T - want)) > 10 * np.max(np.abs(got - want))
    np.testing.assert_array_equal(
        _tensor(reader, "blk.0.attn_norm.weight"),
        merged["model.layers.0.input_layernorm.weight"],
    )
    # Tensors without an adapter are encoded in row blocks: same q8_0 bytes.
    emb = merged["model.embed_tokens_per_layer.weight"]
    t = next(t for t in reader.tensors if t.name == "per_layer_token_embd.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    want_q = gguf.quants.quantize(emb, gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(np.asarray(t.data).reshape(want_q.shape), want_q)


def test_tokenizer(q8):
    preset, _, _, reader = q8
    with open(os.path.join(preset, "tokenizer.json")) as f:
        tok = json.load(f)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = {
        **tok["model"]["vocab"],
        **{t["content"]: t["id"] for t in tok["added_tokens"]},
    }
    assert len(tokens) == 1024
    for piece, i in vocab.items():
        assert tokens[i] == piece
    assert _field(reader, "tokenizer.ggml.bos_token_id") == 2
    assert _field(reader, "tokenizer.ggml.eos_token_id") == 1
    # The chat template writes <bos>; the tokenizer must not add another.
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False
    # Stops of the -it generation_config.json: eos 1, <turn|> 106, <|tool_response> 50.
    assert _field(reader, "tokenizer.ggml.eot_token_id") == 106
    assert _field(reader, "tokenizer.ggml.eom_token_id") == 50
    assert _field(reader, "tokenizer.ggml.model") == "gemma4"
    assert len(_field(reader, "tokenizer.ggml.merges")) == len(tok["model"]["merges"])


def test_moe_f16_with_separate_scales(tmp_path_factory):
    _, model, _, reader = _export(tmp_path_factory, "f16", moe=True)
    names = {t.name for t in reader.tensors}
    assert {
        "blk.0.ffn_gate_up_exps.weight",
        "blk.0.ffn_down_exps.weight",
        "blk.0.ffn_gate_inp.weight",
    } <= names
    assert _field(reader, "gemma4.expert_count") == 4
    merged = merged_tensors(model)
    p = "model.layers.0."
    for name, key in (
        ("blk.0.ffn_down_exps.weight", "experts.down_proj"),
        ("blk.0.ffn_gate_inp.weight", "router.proj.weight"),
        ("blk.0.ffn_gate_inp.scale", "router.scale"),
        ("blk.0.ffn_down_exps.scale", "router.per_expert_scale"),
    ):
        np.testing.assert_allclose(
            _tensor(reader, name), merged[p + key], rtol=1e-3, atol=1e-4
        )


def test_moe_expert_lora_merged_into_every_expert(tmp_path_factory):
    """Expert LoRA merged into the GGUF's expert tensors: every layer's
    ffn_gate_up_exps / ffn_down_exps equals the merged HF tensor (f32) and
    differs from the base's."""
    targets = config_lib.LORA_TARGETS + EXPERT_TARGETS
    _, model, _, reader = _export(tmp_path_factory, "f32", targets, moe=True)
    merged = merged_tensors(model)
    model.set_adapter(None)
    base = merged_tensors(model)
    model.set_adapter("default")
    names = {t.name for t in reader.tensors}
    for i in range(model.spec.num_layers):
        for gguf_name, key in (
            (f"blk.{i}.ffn_gate_up_exps.weight", "experts.gate_up_proj"),
            (f"blk.{i}.ffn_down_exps.weight", "experts.down_proj"),
        ):
            assert gguf_name in names
            want = merged[f"model.layers.{i}.{key}"]
            np.testing.assert_array_equal(_tensor(reader, gguf_name), want)
            assert np.abs(want - base[f"model.layers.{i}.{key}"]).max() > 1e-3


@pytest.fixture(scope="module", params=["base", "run"])
def templated_small(request, tmp_path_factory):
    """A merged f32 GGUF of a trained model whose chat template is the small one:
    the base's chat_template.jinja ("base"), or, on a base that ships none,
    the run's (the default tiny run's config: "run")."""
    if request.param == "base":
        preset = variant_preset(chat_template="small")
        config = config_for(preset)
    else:
        preset = variant_preset()
        config = config_lib.get_config("tiny", "lora", "runlocal")
        config.model.preset = preset
    root = str(tmp_path_factory.mktemp(f"gguf_small_{request.param}"))
    model = trained_model(preset)
    out = commands.export(
        config,
        fake_workdir(root, model, preset),
        "gguf",
        os.path.join(root, "gguf"),
        gguf_type="f32",
    )
    reader = gguf.GGUFReader(os.path.join(out, "model-f32.gguf"))
    template = _field(reader, "tokenizer.chat_template")
    # Without one llama-server would render ChatML for a chat request.
    assert template == tiny.chat_template_jinja("small")
    return preset, model, out


def _package_ids(preset: str, text: str) -> list[int]:
    """The base's tokenizer.json on `text`, special tokens parsed, none added."""
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(os.path.join(preset, "tokenizer.json"))
    return tok.encode(text, add_special_tokens=False).ids


def test_llama_cpp_logits_match_keras(tmp_path_factory):
    """llama-server's `/v1/completions` (xllamacpp) gives the Keras model's softmax.

    After every prefix of TOKENS, the whole vocabulary's log-probabilities
    (`n_probs`), i.e. the logits up to a constant per row, and the greedy token.
    """
    _, model, out, reader = _export(tmp_path_factory, "f32")
    assert _field(reader, "gemma4.embedding_length_per_layer_input") == 0
    freqs = _tensor(reader, "rope_freqs.weight")
    assert freqs.shape == (16,) and (freqs[:4] == 1).all() and (freqs[4:] > 1e29).all()
    tokens = [int(t) for t in np.asarray(TOKENS).reshape(-1)]
    logits = np.asarray(keras_logits(model, np.asarray(tokens)[None]))[0]
    server = llama_server(os.path.join(out, "model-f32.gguf"))
    got = llama_logprobs(server, tokens, logits.shape[-1])
    want = log_softmax(logits)
    # ggml's CPU GELU goes through an f16 table: 9.6e-4 measured (max
    # |difference| 0.031); one layer's ffn_gate scaled by 1.1 gives 1.3e-2.
    assert rel_err(got, want) < 5e-3, rel_err(got, want)
    assert np.abs(np.exp(got) - np.exp(want)).max() < 5e-3
    assert (got.argmax(-1) == logits.argmax(-1)).all()
    assert llama_greedy(server, tokens, 4) == keras_greedy(model, tokens, 4)


def test_llama_cpp_chat_completion_has_one_bos(templated_small):
    """One BOS the way llama-server serves the export's chat template.

    The export says `add_bos_token` false, as the official tokenizer does
    (the template writes `<bos>`). llama.cpp overrides that to true for the
    gemma4 vocabulary ("override 'tokenizer.ggml.add_bos_token' to 'true' for
    Gemma4" in its log), and its chat path strips the template's leading
    `<bos>` before tokenizing with BOS: one in all. Checked through
    `/v1/chat/completions` as a user calls it: the prompt is the package's
    token ids (count and next-token probabilities; a second BOS moves the
    top log-probabilities by ~0.4).
    """
    from gemma4_keras.data import generation_prompt

    preset, model, out = templated_small
    messages = [{"role": "user", "content": "Hi there"}]
    ids = _package_ids(preset, generation_prompt(messages, template="small"))
    assert ids[0] == 2 and ids.count(2) == 1
    one = log_softmax(keras_logits(model, np.asarray([ids], np.int32))[0, -1])
    two = log_softmax(keras_logits(model, np.asarray([[2, *ids]], np.int32))[0, -1])
    server = llama_server(os.path.join(out, "model-f32.gguf"), n_ctx=128)
    body = {
        "messages": messages,
        "max_tokens": 1,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 20,
        # The package renders thinking off; llama-server's default is on.
        "chat_template_kwargs": {"enable_thinking": False},
    }
    reply = server.handle_chat_completions(body)
    assert reply["usage"]["prompt_tokens"] == len(ids), (reply["usage"], ids)
    top = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    top_ids = [t["id"] for t in top]
    got = np.array([t["logprob"] for t in top])
    assert np.abs(got - one[top_ids]).max() < 2e-2  # 2.9e-3 measured
    assert np.abs(got - two[top_ids]).max() > 0.1  # 0.42 measured
    # Plain text (no template) gets its one BOS from llama.cpp.
    text = server.handle_completions({"prompt": "Hi", "n_predict": 1, "temperature": 0})
    assert text["usage"]["prompt_tokens"] == len(_package_ids(preset, "Hi")) + 1


def test_q4_k_m_needs_llama_cpp(tmp_path):
    preset = variant_preset()
    with pytest.raises(
        ExportError, match=r"llama-quantize model-f16.gguf model-q4_k_m.gguf Q4_K_M"
    ):
        commands.export(
            config_for(preset),
            "/nonexistent",
            "gguf",
            str(tmp_path / "o"),
            gguf_type="q4_k_m",
        )


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """An rsLoRA run (scale alpha/sqrt(r) = 4, not alpha/r = 2) on a KV-shared base."""
    preset = variant_preset(ple=True, kv_shared_layers=2)
    spec = LoraSpec(rank=4, alpha=8.0, rslora=True)
    factors = random_factors(preset, spec, seed=5)
    root = tmp_path_factory.mktemp("gguf_lora")
    workdir = factor_workdir(str(root), preset, spec, factors)
    lora_dir = commands.export(
        config_for(preset), workdir, "gguf-lora", str(root / "lora"), gguf_type="f32"
    )
    merged_dir = commands.export(
        config_for(preset), workdir, "gguf", str(root / "merged"), gguf_type="f32"
    )
    return preset, spec, factors, root, lora_dir, merged_dir


def test_gguf_lora_structure(lora_run):
    preset, spec, factors, _, lora_dir, _ = lora_run
    assert set(os.listdir(lora_dir)) == {
        "adapter-f32.gguf",
        "base-f32.gguf",
        "export_manifest.json",
    }
    reader = gguf.GGUFReader(os.path.join(lora_dir, "adapter-f32.gguf"))
    assert _field(reader, "general.architecture") == "gemma4"
    assert _field(reader, "general.type") == "adapter"
    assert _field(reader, "adapter.type") == "lora"
    # The scale is folded into lora_b; llama.cpp's alpha / r is then 1.
    assert _field(reader, "adapter.lora.alpha") == pytest.approx(4.0)
    names = {t.name for t in reader.tensors}
    assert len(names) == 2 * len(factors)
    assert {"blk.0.attn_q.weight.lora_a", "blk.3.ffn_down.weight.lora_b"} <= names
    assert not {n for n in names if n.startswith(("blk.2.attn_k", "blk.3.attn_v"))}
    a, b = factors[(1, "q_proj")]
    assert _tensor(reader, "blk.1.attn_q.weight.lora_a").shape == (4, a.shape[0])
    assert _tensor(reader, "blk.1.attn_q.weight.lora_b").shape == (b.shape[1], 4)
    with open(os.path.join(lora_dir, "export_manifest.json")) as f:
        man = json.load(f)
    assert man["format"] == "gguf-lora" and man["lora"]["rslora"] is True
    assert man["options"]["scale_folded_into_lora_b"] == pytest.approx(4.0)


def test_gguf_lora_is_the_merged_delta(lora_run):
    """llama.cpp's maths W + (alpha / r) * lora_b @ lora_a gives the merged GGUF."""
    preset, _, factors, _, lora_dir, merged_dir = lora_run
    lora = gguf.GGUFReader(os.path.join(lora_dir, "adapter-f32.gguf"))
    merged = gguf.GGUFReader(os.path.join(merged_dir, "model-f32.gguf"))
    alpha = _field(lora, "adapter.lora.alpha")
    base = load_file(os.path.join(preset, "model.safetensors"))
    for name, hf_name in (
        ("blk.1.attn_q.weight", "model.layers.1.self_attn.q_proj.weight"),
        ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight"),
        ("blk.3.ffn_down.weight", "model.layers.3.mlp.down_proj.weight"),
    ):
        lora_a = _tensor(lora, name + ".lora_a")
        lora_b = _tensor(lora, name + ".lora_b")
        delta = (alpha / lora_a.shape[0]) * (lora_b @ lora_a)
        np.testing.assert_allclose(
            base[hf_name] + delta, _tensor(merged, name), rtol=1e-5, atol=1e-5
        )
        assert np.abs(delta).max() > 1e-2  # the adapter is not a no-op
    # Tensors without an adapter pass through exactly (f32, written in row blocks).
    np.testing.assert_array_equal(
        _tensor(merged, "token_embd.weight"), base["model.embed_tokens.weight"]
    )
    np.testing.assert_array_equal(
        _tensor(merged, "per_layer_token_embd.weight"),
        base["model.embed_tokens_per_layer.weight"],
    )


def test_gguf_lora_base_is_the_base(lora_run):
    """The export's base-f32.gguf holds the base's tensors, no adapter merged."""
    preset, _, _, _, lora_dir, _ = lora_run
    reader = gguf.GGUFReader(os.path.join(lora_dir, "base-f32.gguf"))
    assert _field(reader, "general.type") != "adapter"
    assert _field(reader, "tokenizer.ggml.model") == "gemma4"
    base = load_file(os.path.join(preset, "model.safetensors"))
    for name, hf_name in (
        ("blk.1.attn_q.weight", "model.layers.1.self_attn.q_proj.weight"),
        ("blk.3.ffn_down.weight", "model.layers.3.mlp.down_proj.weight"),
        ("token_embd.weight", "model.embed_tokens.weight"),
    ):
        np.testing.assert_array_equal(_tensor(reader, name), base[hf_name])


def test_llama_cpp_base_plus_gguf_lora_equals_merged(lora_run):
    """`llama-server -m base-f32.gguf --lora adapter-f32.gguf` (the gguf-lora
    export, nothing else) answers as the merged GGUF does."""
    preset, spec, factors, root, lora_dir, merged_dir = lora_run
    tokens = [int(t) for t in np.asarray(TOKENS).reshape(-1)]

    def logprobs(model, lora=None):
        server = llama_server(model, lora_path=lora)
        return llama_logprobs(server, tokens, 1024)

    want = logprobs(os.path.join(merged_dir, "model-f32.gguf"))
    base = os.path.join(lora_dir, "base-f32.gguf")
    got = logprobs(base, os.path.join(lora_dir, "adapter-f32.gguf"))
    assert rel_err(got, want) < 1e-3, rel_err(got, want)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert rel_err(logprobs(base), want) > 1e-2  # the adapter is not a no-op


# ----------------------------------------------------------------------------
# The chat template travels with the export.

TOOL_CASES = [
    c
    for c in json.loads(
        (pathlib.Path(__file__).parent / "data" / "gemma4_chat_golden.json").read_text()
    )["cases"]
    if c.get("tools") and c["template"] == "large"
]


@pytest.fixture(scope="module")
def templated(tmp_path_factory):
    """A merged f32 GGUF of a run on a (large) base that ships chat_template.jinja."""
    preset = variant_preset(chat_template="large")
    spec = LoraSpec(rank=2, alpha=4.0)
    root = tmp_path_factory.mktemp("gguf_template")
    workdir = factor_workdir(str(root), preset, spec, random_factors(preset, spec))
    out = commands.export(
        config_for(preset), workdir, "gguf", str(root / "gguf"), gguf_type="f32"
    )
    return preset, gguf.GGUFReader(os.path.join(out, "model-f32.gguf"))


@pytest.mark.parametrize("case", TOOL_CASES, ids=[c["case"] for c in TOOL_CASES])
def test_gguf_chat_template_renders_tool_conversations_like_the_package(
    templated, case
):
    """`tokenizer.chat_template` is the base's file and renders as chat.py does.

    Rendered with jinja2 as transformers renders it; llama.cpp's own jinja
    engine is not exercised here (llama.cpp is an optional install).
    """
    preset, reader = templated
    template = _field(reader, "tokenizer.chat_template")
    with open(os.path.join(preset, "chat_template.jinja"), encoding="utf-8") as f:
        assert template == f.read()
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    flags = {k: case[k] for k in ("add_generation_prompt", "enable_thinking")}
    got = env.from_string(template).render(
        messages=case["messages"],
        tools=case["tools"],
        bos_token="<bos>",
        eos_token="<eos>",
        **flags,
    )
    want = chat.render_conversation(
        records.normalise_messages(case["messages"]),
        template="large",
        tools=records.normalise_tools(case["tools"]),
        **flags,
    )
    assert got == want == case["expected"]


# ----------------------------------------------------------------------------
# gguf-lora with expert-bank targets (26B-A4B's experts.gate_up_proj /
# experts.down_proj): one (lora_a, lora_b) pair per expert, 3-D.


@pytest.fixture(scope="module")
def moe_lora_run(tmp_path_factory):
    """Every projection and both expert banks adapted, on the tiny MoE base."""
    preset = variant_preset(moe=True)
    spec = LoraSpec(rank=4, alpha=8.0, targets=config_lib.LORA_TARGETS + EXPERT_TARGETS)
    factors = random_factors(preset, spec, seed=7)
    root = tmp_path_factory.mktemp("gguf_moe_lora")
    workdir = factor_workdir(str(root), preset, spec, factors)
    lora_dir = commands.export(
        config_for(preset), workdir, "gguf-lora", str(root / "lora"), gguf_type="f32"
    )
    merged_dir = commands.export(
        config_for(preset), workdir, "gguf", str(root / "merged"), gguf_type="f32"
    )
    return preset, spec, factors, lora_dir, merged_dir


def test_gguf_lora_expert_tensors_are_per_expert_pairs(moe_lora_run):
    """`blk.N.ffn_gate_up_exps.weight.lora_a` (E, r, in) and `.lora_b`
    (E, out, r): each expert's A and B transposed, B times the adapter's
    scale (alpha / r = 2) and, for down_proj, the expert's own scale
    (`router.per_expert_scale`, which llama.cpp applies to the base product
    only)."""
    preset, spec, factors, lora_dir, _ = moe_lora_run
    reader = gguf.GGUFReader(os.path.join(lora_dir, "adapter-f32.gguf"))
    names = {t.name for t in reader.tensors}
    assert len(names) == 2 * len(factors)
    per_expert = load_file(os.path.join(preset, "model.safetensors"))[
        "model.layers.1.router.per_expert_scale"
    ]
    assert np.abs(per_expert - 1).max() > 0.01  # a scale that shows
    for target, stem, scale in (
        ("experts.gate_up_proj", "ffn_gate_up_exps", np.ones_like(per_expert)),
        ("experts.down_proj", "ffn_down_exps", per_expert),
    ):
        a, b = factors[(1, target)]
        got_a = _tensor(reader, f"blk.1.{stem}.weight.lora_a")
        got_b = _tensor(reader, f"blk.1.{stem}.weight.lora_b")
        np.testing.assert_array_equal(got_a, np.swapaxes(a, 1, 2))
        want_b = np.swapaxes(b, 1, 2) * 2.0 * scale[:, None, None]
        np.testing.assert_allclose(got_b, want_b, rtol=1e-6)


def test_llama_cpp_base_plus_expert_gguf_lora_equals_merged(moe_lora_run):
    """llama.cpp applies the expert pairs (`build_lora_mm_id`): base +
    adapter answers as the merged GGUF (every expert merged) does, and the
    expert pairs are not a no-op: without them the answer moves."""
    preset, spec, factors, lora_dir, merged_dir = moe_lora_run
    tokens = [int(t) for t in np.asarray(TOKENS).reshape(-1)]

    def logprobs(model, lora=None):
        return llama_logprobs(llama_server(model, lora_path=lora), tokens, 1024)

    want = logprobs(os.path.join(merged_dir, "model-f32.gguf"))
    base = os.path.join(lora_dir, "base-f32.gguf")
    got = logprobs(base, os.path.join(lora_dir, "adapter-f32.gguf"))
    assert rel_err(got, want) < 1e-3, rel_err(got, want)
    assert (got.argmax(-1) == want.argmax(-1)).all()
