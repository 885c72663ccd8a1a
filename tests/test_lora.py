"""LoRA adapters on `Gemma4LoraModel`: init, dropout, targets, errors, several
adapters on one base, merge/unmerge, and no full weight gradient."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import pathlib

import jax
import keras_hub
import numpy as np
import pytest

from gemma4_keras import config_lib
from gemma4_keras.exporters import peft as peft_lib
from gemma4_keras.model import gemma4_lora_model, hub, lora, schema
from gemma4_keras.testing import tiny

SEQ = 20


@functools.cache
def backbone(**variant):
    return keras_hub.models.Gemma4Backbone.from_preset(
        str(tiny.tiny_checkpoint(**variant))
    )


def build(lora_spec=None, **variant) -> gemma4_lora_model.Gemma4LoraModel:
    return gemma4_lora_model.Gemma4LoraModel.from_backbone(
        backbone(**variant), lora_spec, dtype="float32"
    )


def batch(vocab: int = 1024) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(4, vocab, size=(2, SEQ))
    ids[:, 0] = 2
    return {
        "token_ids": ids,
        "positions": np.tile(np.arange(SEQ), (2, 1)),
        "segment_ids": np.ones((2, SEQ), np.int32),
    }


def logits(model, adapter="keep", training=False) -> np.ndarray:
    if adapter != "keep":
        model.set_adapter(adapter)
    return np.asarray(model.logits(model(batch(), training=training)))


def randomise(model, name="default", seed=0, std=0.05) -> None:
    """Non-zero A and B; std 0.05 gives deltas about half the base weights."""
    rng = np.random.default_rng(seed)
    for a in model.adapters(name).values():
        a.lora_a.assign(rng.normal(0, std, a.lora_a.shape).astype(np.float32))
        a.lora_b.assign(rng.normal(0, std, a.lora_b.shape).astype(np.float32))


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def model():
    """One float model with a random adapter 'default' (rank 4, alpha 6)."""
    m = build(lora.LoraSpec(rank=4, alpha=6.0))
    randomise(m)
    return m


# --- init and dropout ------------------------------------------------------


def test_fresh_adapter_changes_nothing():
    m = build(lora.LoraSpec(rank=4, alpha=8.0))
    np.testing.assert_array_equal(logits(m, "default"), logits(m, None))


def test_init_matches_peft():
    # PEFT: kaiming_uniform_(A, a=sqrt(5)) -> U(-1/sqrt(in), 1/sqrt(in)); B = 0.
    a = lora.LoraAdapter(1024, 256, rank=64, alpha=16.0, seed=3)
    values = np.asarray(a.lora_a.value)
    bound = 1 / math.sqrt(1024)
    assert values.shape == (1024, 64)
    assert np.abs(values).max() <= bound
    assert np.abs(values).max() > 0.99 * bound
    assert abs(values.std() - bound / math.sqrt(3)) < 0.02 * bound
    assert abs(values.mean()) < 0.02 * bound
    np.testing.assert_array_equal(np.asarray(a.lora_b.value), 0.0)
    assert a.scale == 16.0 / 64
    rs = lora.LoraAdapter(1024, 256, rank=64, alpha=16.0, rslora=True)
    assert rs.scale == 16.0 / 8


def test_dropout_only_in_training_and_only_on_adapter():
    m = build(lora.LoraSpec(rank=4, alpha=6.0, dropout=0.5))
    # B = 0: dropout on the adapter input cannot show; a base-path dropout would.
    np.testing.assert_array_equal(logits(m, "default", training=True), logits(m, None))
    randomise(m, std=0.2)
    inference = logits(m, "default")
    np.testing.assert_array_equal(inference, logits(m, "default"))
    assert rel(logits(m, "default", training=True), inference) > 1e-3

    # The branch itself: delta(x, key) = scale * (mask * x / (1 - p)) @ A @ B.
    a = m.adapters()[(0, "q_proj")]
    x = np.random.default_rng(1).normal(size=(2, 3, 64)).astype(np.float32)
    key = jax.random.key(7)
    keep = np.asarray(lora.dropout_keep(key, 0.5, x.shape))
    want = (np.where(keep, x / 0.5, 0) @ a.lora_a.value @ a.lora_b.value) * a.scale
    np.testing.assert_allclose(np.asarray(a.delta(x, key)), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(a.delta(x, None)),
        x @ a.lora_a.value @ a.lora_b.value * a.scale,
        rtol=1e-5,
        atol=1e-6,
    )


def test_dropout_keep_rate_and_independence():
    """`dropout_keep` drops p of the elements (16-bit threshold), each of its
    two 16-bit halves a word independently of the other."""
    key = jax.random.key(3)
    for p in (0.05, 0.1, 0.5):
        keep = np.asarray(lora.dropout_keep(key, p, (512, 1001)))
        n = keep.size
        drop = 1 - keep.mean()
        assert abs(drop - p) < 5 * np.sqrt(p * (1 - p) / n), (p, drop)
        # The two halves of each word: as often both dropped as independence says.
        hi, lo = ~keep[:, :500], ~keep[:, 501:1001]
        both = (hi & lo).mean()
        assert abs(both - p * p) < 5 * np.sqrt(p * p / hi.size) + 1e-4, (p, both)


# --- targets and errors ----------------------------------------------------


def test_targets_by_hf_name_and_layers():
    spec = hub.spec_from_config(backbone().get_config())
    all_linear = lora.LoraSpec(targets=tuple(config_lib.lora_targets("all-linear")))
    assert all_linear.sites(spec) == [
        (i, t) for i in range(4) for t in config_lib.LORA_TARGETS
    ]
    some = lora.LoraSpec(
        targets=tuple(config_lib.lora_targets("v_proj, q_proj")), layers=(1, 3)
    )
    assert some.sites(spec) == [
        (1, "q_proj"),
        (1, "v_proj"),
        (3, "q_proj"),
        (3, "v_proj"),
    ]
    with pytest.raises(config_lib.ConfigError, match="lora.layers names layer 4"):
        lora.LoraSpec(layers=(4,)).sites(spec)


def test_kv_shared_layers_get_no_kv_adapters():
    m = build(lora.LoraSpec(rank=2), ple=True, kv_shared_layers=2)
    sites = set(m.adapters())
    for layer in (2, 3):  # the two KV-shared layers
        assert (layer, "q_proj") in sites and (layer, "o_proj") in sites
        assert (layer, "k_proj") not in sites and (layer, "v_proj") not in sites
    assert (0, "k_proj") in sites and (1, "v_proj") in sites


def test_unknown_target_names():
    with pytest.raises(
        config_lib.ConfigError, match=r"unknown module name\(s\) \['qkv_proj'\]"
    ):
        config_lib.lora_targets("q_proj,qkv_proj")
    with pytest.raises(config_lib.ConfigError, match="lora.targets is empty"):
        config_lib.lora_targets("")


def test_rank_larger_than_layer_names_module():
    # k_proj is (64 in, 2 kv heads x 16 = 32 out) in the tiny model.
    with pytest.raises(
        config_lib.ConfigError,
        match=r"lora\.rank=48 is larger than lora_big_layers_0_k_proj's dimensions \(64 in, 32 out\)",
    ):
        build().add_adapter("big", lora.LoraSpec(rank=48))


def _write_peft(directory: pathlib.Path, tensors: dict, r: int) -> str:
    from safetensors.numpy import save_file

    directory.mkdir()
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r})
    )
    return str(directory)


def test_load_adapter_errors(tmp_path):
    m = build()
    pre = "base_model.model.model.layers"
    z = np.zeros
    # An adapter for a deeper model (another Gemma 4 size).
    d = _write_peft(
        tmp_path / "deep",
        {
            f"{pre}.30.self_attn.q_proj.lora_A.weight": z((4, 64), np.float32),
            f"{pre}.30.self_attn.q_proj.lora_B.weight": z((64, 4), np.float32),
        },
        r=4,
    )
    with pytest.raises(
        peft_lib.AdapterFormatError,
        match=r"layers\.30\.self_attn\.q_proj: the model has only 4 layers",
    ):
        peft_lib.load_adapter(m, d)
    # Another hidden size (an E4B adapter on an E2B base, say).
    d = _write_peft(
        tmp_path / "wide",
        {
            f"{pre}.0.mlp.up_proj.lora_A.weight": z((4, 2560), np.float32),
            f"{pre}.0.mlp.up_proj.lora_B.weight": z((128, 4), np.float32),
        },
        r=4,
    )
    with pytest.raises(
        peft_lib.AdapterFormatError,
        match=r"layers\.0\.mlp\.up_proj: lora_A \(4, 2560\) / lora_B \(128, 4\) do not fit rank 4 on a \(128, 64\) weight",
    ):
        peft_lib.load_adapter(m, d)
    # Config rank disagrees with the tensors.
    d = _write_peft(
        tmp_path / "rank",
        {
            f"{pre}.1.self_attn.o_proj.lora_A.weight": z((4, 64), np.float32),
            f"{pre}.1.self_attn.o_proj.lora_B.weight": z((64, 4), np.float32),
        },
        r=8,
    )
    with pytest.raises(
        peft_lib.AdapterFormatError,
        match=r"layers\.1\.self_attn\.o_proj: .* do not fit rank 8",
    ):
        peft_lib.load_adapter(m, d)
    # k/v weights for a layer that shares K/V.
    shared = build(ple=True, kv_shared_layers=2)
    d = _write_peft(
        tmp_path / "shared",
        {
            f"{pre}.3.self_attn.k_proj.lora_A.weight": z((4, 64), np.float32),
            f"{pre}.3.self_attn.k_proj.lora_B.weight": z((32, 4), np.float32),
        },
        r=4,
    )
    with pytest.raises(
        peft_lib.AdapterFormatError,
        match=r"layers\.3\.self_attn\.k_proj: this layer has no k_proj",
    ):
        peft_lib.load_adapter(shared, d)
    assert not m.lora_specs and not shared.lora_specs  # nothing half-loaded


# --- several adapters on one base ------------------------------------------


def test_two_adapters_switch_and_unload(tmp_path):
    src = build(lora.LoraSpec(rank=4, alpha=6.0))
    randomise(src, seed=1)
    want_a = logits(src, "default")
    peft_lib.save_adapter(src, str(tmp_path / "a"), base_model="tiny")
    src.unload_adapter("default")
    src.add_adapter(
        "default",
        lora.LoraSpec(
            rank=2, alpha=3.0, targets=("q_proj", "down_proj"), layers=(0, 2)
        ),
    )
    randomise(src, seed=2)
    want_b = logits(src, "default")
    peft_lib.save_adapter(src, str(tmp_path / "b"), base_model="tiny")

    m = build()
    base_vars = {id(v): np.asarray(v.value).copy() for v in m.non_trainable_variables}
    base = logits(m, None)
    peft_lib.load_adapter(m, str(tmp_path / "a"), name="a")
    peft_lib.load_adapter(m, str(tmp_path / "b"), name="b")
    for name, want in [
        ("a", want_a),
        ("b", want_b),
        ("a", want_a),
        (None, base),
        ("b", want_b),
    ]:
        np.testing.assert_array_equal(logits(m, name), want)
    m.unload_adapter("a")
    assert sorted(m.lora_specs) == ["b"] and not m.adapters("a")
    np.testing.assert_array_equal(logits(m, "b"), want_b)
    m.unload_adapter("b")
    assert m.active_adapter is None and not m.trainable_variables
    np.testing.assert_array_equal(logits(m), base)
    # The base was never reloaded or touched: same variables, same values.
    for v in m.non_trainable_variables:
        if id(v) in base_vars and "seed" not in v.path:
            np.testing.assert_array_equal(np.asarray(v.value), base_vars[id(v)])
    with pytest.raises(KeyError, match="no adapter named 'a'"):
        m.set_adapter("a")


# --- merge ------------------------------------------------------------------


def test_merge(model):
    adapted = logits(model, "default")
    before = {
        s: np.asarray(model.blocks[s[0]].proj[s[1]].weight("float32"))
        for s in model.adapters()
    }
    # merged_kernels does not touch the model and equals base + delta.
    mk = lora.merged_kernels(model)
    a = model.adapters()[(2, "up_proj")]
    np.testing.assert_allclose(
        mk[(2, "up_proj")],
        before[(2, "up_proj")] + a.delta_weight(),
        rtol=1e-6,
        atol=1e-7,
    )
    assert lora.merge_adapter(model) == len(before) == 28
    assert model.active_adapter is None
    merged = logits(model)
    err = rel(merged, adapted)
    print(f"merged vs adapter logits: {err:.2e}")
    assert err < 1e-5
    with pytest.raises(config_lib.ConfigError, match="'default' is merged already"):
        lora.merge_adapter(model, "default")


def test_merge_refuses_quantised_base():
    m = build(lora.LoraSpec(rank=2, targets=("q_proj",)))
    m.blocks[0].proj["q_proj"].quant = "nf4"  # stand-in: any non-float site
    with pytest.raises(
        config_lib.ConfigError,
        match=r"layers\.0\.q_proj is stored as nf4.*merged_kernels",
    ):
        lora.merge_adapter(m)


def test_expert_lora_merge_and_refusals():
    """Expert LoRA (per-expert pairs, PEFT init) merges in place into the
    float expert banks (fused gate_up split over experts_gate / experts_up)
    with the adapter's logits; dropout on expert targets is refused."""
    targets = ("q_proj",) + schema.EXPERT_TARGETS
    m = build(lora.LoraSpec(rank=2, alpha=3.0, targets=targets), moe=True)
    a = m.adapters()[(1, "experts.gate_up_proj")]
    e, d, f = m.spec.num_experts, m.spec.hidden_dim, m.spec.expert_dim
    assert a.lora_a.shape == (e, d, 2) and a.lora_b.shape == (e, 2, 2 * f)
    bound = 1 / math.sqrt(d)  # PEFT's kaiming bound, fan-in `in`
    assert 0.9 * bound < np.abs(np.asarray(a.lora_a.value)).max() <= bound
    randomise(m, std=0.2)
    adapted = logits(m, "default")
    mk = lora.merged_kernels(m)
    gate = np.asarray(m.blocks[1].extra["experts_gate"].value)
    up = np.asarray(m.blocks[1].extra["experts_up"].value)
    np.testing.assert_allclose(
        mk[(1, "experts.gate_up_proj")],
        np.concatenate([gate, up], -1) + a.delta_weight(),
        rtol=1e-6,
        atol=1e-7,
    )
    assert lora.merge_adapter(m) == m.spec.num_layers * 3
    err = rel(logits(m), adapted)
    print(f"expert LoRA merged vs adapter logits: {err:.2e}")
    assert err < 1e-5 and rel(adapted, logits(build(moe=True))) > 1e-3
    with pytest.raises(config_lib.ConfigError, match=r"lora\.dropout=0\.1 with expert"):
        build(lora.LoraSpec(dropout=0.1, targets=schema.EXPERT_TARGETS), moe=True)


# --- no full weight gradient -------------------------------------------------


def _flops_module():
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "lora_flops.py"
    spec = importlib.util.spec_from_file_location("lora_flops", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_step_flops_below_keras_hub():
    """Tiny version of benchmarks/lora_flops.py: ours < KerasHub, near analytic."""
    lf = _flops_module()
    bb = lf.build_backbone(
        layers=2,
        hidden=64,
        ffn=256,
        heads=4,
        kv_heads=2,
        head_dim=16,
        vocab=512,
        window=16,
    )
    r = lf.compare(bb, rank=4, batch=2, seq=32)
    analytic = r["analytic"]["total"]
    print(
        f"ours {r['ours']:.3e} keras_hub {r['keras_hub']:.3e} analytic {analytic:.3e}"
    )
    assert r["ours"] < 0.9 * r["keras_hub"]
    # At d=64 element-wise work (norms, softmax, RoPE) is ~10% of the step;
    # the mid-size benchmark matches the analytic count to 0.1%.
    assert abs(r["ours"] / analytic - 1) < 0.2
