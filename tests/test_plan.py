"""`plan`: the config-only spec and estimates against the real model and XLA.

(a) parameter and adapter counts == `Gemma4LoraModel` variables (exact);
(b) FLOPs per step vs XLA `cost_analysis()` of the compiled step (< 10 %);
(c) base bytes (none / NF4 / NF4 + double quant / int8 / int4) == the real
    model's non-trainable variable bytes, less its dropout seed state (exact);
(d) activation residuals vs the vjp residuals of `benchmarks/remat_memory.py`
    (< 25 %), with and without remat.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import keras
import keras_hub
import numpy as np
import pytest
from test_hub_contract import live_spec

from gemma4_keras import config_lib
from gemma4_keras.model import hub, moe, plan, presets, schema
from gemma4_keras.model import loss as loss_lib
from gemma4_keras.model.gemma4_lora_model import Gemma4LoraModel
from gemma4_keras.model.lora import LoraSpec
from gemma4_keras.testing import tiny, variants

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))

VARIANTS = list(
    variants.select("default", "ple", "kv_shared_without_ple", "moe", "all").values()
) + [variants.VARIANTS["conditional_generation"]]
QUANTS = [
    ("none", False),
    ("nf4", False),
    ("nf4", True),
    ("int8", False),
    ("int4", False),
]


def _arch(path):
    kw = hub.backbone_kwargs(presets.read_config_json(str(path)))
    return kw, hub.spec_from_config(kw)


def _bytes(variables) -> int:
    # The dropout seed (2 x uint32) is RNG state, not a weight.
    return sum(
        int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
        for v in variables
        if "seed" not in v.path
    )


def _model(backbone, lora, mode="none", dq=False):
    return Gemma4LoraModel.from_backbone(
        backbone, lora, quant=mode, double_quant=dq, dtype="float32"
    )


LORA = LoraSpec(rank=4, targets=("q_proj", "k_proj", "v_proj", "down_proj"))


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v) or "base")
def test_spec_and_counts_match_the_real_model(variant):
    path = tiny.tiny_checkpoint(**variant)
    kw, spec = _arch(path)
    backbone = keras_hub.models.Gemma4Backbone.from_preset(str(path), dtype="float32")
    assert spec == live_spec(backbone)
    model = _model(backbone, LORA)
    frozen = sum(
        int(np.prod(v.shape))
        for v in model.non_trainable_variables
        if "seed" not in v.path
    )
    assert plan.param_counts(spec)["total"] == frozen
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert plan.adapter_params(spec, LORA) == trainable
    q = {"mode": "none", "double_quant": False, "block_size": 64}
    assert plan.base_bytes(spec, q, 4)["total"] == _bytes(model.non_trainable_variables)


@pytest.mark.parametrize(
    "mode,dq,embedding",
    [(*q, "none") for q in QUANTS[1:]]
    + [("nf4", True, "int8"), ("none", False, "int8")],
)
def test_quantised_base_bytes_match_the_real_model(mode, dq, embedding):
    # One variant with every feature: PLE, KV-shared layers, MoE expert banks.
    path = tiny.tiny_checkpoint(ple=True, kv_shared_layers=2, moe=True)
    kw, spec = _arch(path)
    backbone = keras_hub.models.Gemma4Backbone.from_preset(str(path), dtype="float32")
    model = Gemma4LoraModel.from_backbone(
        backbone,
        LORA,
        quant=mode,
        double_quant=dq,
        dtype="float32",
        embedding_quant=embedding,
    )
    q = {"mode": mode, "double_quant": dq, "block_size": 64, "embedding": embedding}
    estimate = plan.base_bytes(spec, q, 4)
    assert estimate["total"] == _bytes(model.non_trainable_variables)


def test_spec_k_eq_v_and_double_wide_mlp_match_a_built_backbone():
    kw = dict(
        vocabulary_size=128, image_size=None, num_layers=6, num_query_heads=4,
        num_key_value_heads=2, num_global_key_value_heads=1, hidden_dim=32,
        intermediate_dim=64, head_dim=8, global_head_dim=16, sliding_window_size=4,
        sliding_window_pattern=3, num_kv_shared_layers=3, use_double_wide_mlp=True,
        global_rope_partial_rotary_factor=0.25, dtype="float32",
    )  # fmt: skip
    spec = hub.spec_from_config(kw)
    assert spec == live_spec(keras_hub.models.Gemma4Backbone(**kw))
    assert [b.k_eq_v for b in spec.blocks] == [False, False, True] * 2
    assert [b.ffn_dim for b in spec.blocks] == [64] * 3 + [128] * 3


def test_flops_within_10_percent_of_xla_cost_analysis():
    import lora_flops

    kw = dict(layers=2, hidden=256, ffn=1024, heads=4, kv_heads=2, head_dim=64,
              vocab=4096, window=128)  # fmt: skip
    backbone = lora_flops.build_backbone(**kw)
    spec = hub.spec_from_config(backbone.get_config())
    seq = 256
    data = jax.tree.map(jnp.asarray, lora_flops._batch(1, seq, spec.vocab_size))
    measured = lora_flops.ours_flops(backbone, 16, data)
    lora = LoraSpec(rank=16, alpha=32.0)
    estimate = plan.step_flops(spec, lora, seq, seq)["total"]
    assert abs(estimate / measured - 1) < 0.10, (estimate, measured)


def _mid_checkpoint(tmp_path) -> str:
    cfg = tiny.tiny_hf_config(
        hidden_size=192, intermediate_size=704, num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"], num_attention_heads=4,
        num_key_value_heads=2, head_dim=40, global_head_dim=88, sliding_window=64,
    )  # fmt: skip
    tiny.write_checkpoint(tmp_path, cfg)
    return str(tmp_path)


def _activation_residuals(model, batch: int, seq: int) -> int:
    """vjp residual bytes of the train loss, as benchmarks/remat_memory.py
    measures them, keeping only activations: leaves whose leading axis is the
    batch (weights are residuals too, but they are counted in the base)."""
    x = {
        "token_ids": jnp.ones((batch, seq), "int32"),
        "positions": jnp.tile(jnp.arange(seq, dtype="int32"), (batch, 1)),
        "segment_ids": jnp.ones((batch, seq), "int32"),
        "target_ids": jnp.ones((batch, seq), "int32"),
        "loss_weights": jnp.ones((batch, seq), "float32"),
        "loss_norm": jnp.full((1,), seq, "float32"),
    }
    tv = [v.value for v in model.trainable_variables]
    fv = [v.value for v in model.non_trainable_variables]

    def residuals(t):
        def loss(t):
            hidden, _ = model.stateless_call(t, fv, x, training=False)
            return model.compute_loss(x=x, y_pred=hidden)

        return jax.tree.leaves(jax.vjp(loss, t)[1])

    shapes = jax.eval_shape(residuals, tv)
    return sum(
        int(np.prod(s.shape)) * s.dtype.itemsize
        for s in shapes
        if s.ndim and s.shape[0] == batch
    )


@pytest.mark.parametrize("attn_chunk", [None, 64])
def test_activation_residuals_within_25_percent(tmp_path, attn_chunk):
    """Dense attention keeps each layer's square; chunked keeps none of it
    (plan counts one chunk's block per layer: an upper bound)."""
    backbone = keras_hub.models.Gemma4Backbone.from_preset(
        _mid_checkpoint(tmp_path), dtype="float32"
    )
    lora = LoraSpec(rank=16, alpha=32.0)
    batch, seq = 3, 200  # 3: no weight has a leading axis of 3
    spec = hub.spec_from_config(backbone.get_config())
    est = plan.activation_bytes(spec, lora, batch, seq, 4, attn_chunk)
    for remat, key in ((False, "no_remat_saved"), (True, "remat_saved")):
        model = Gemma4LoraModel.from_backbone(backbone, lora, remat=remat)
        if attn_chunk is not None:
            model.set_attention("chunked", attn_chunk)
        measured = _activation_residuals(model, batch, seq)
        assert abs(est[key] / measured - 1) < 0.25, (remat, est[key], measured)
    assert est["remat_saved"] < est["remat_peak"] < est["no_remat_saved"]


def test_plan_end_to_end_and_format(tmp_path):
    cfg = config_lib.get_config("tiny", "qlora")
    cfg.model.dtype = "float32"
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n' * 100)
    cfg.data.path = str(data)
    p = plan.plan(cfg, tflops=50.0, mfu=0.5)
    t = cfg.train
    tokens = t.batch_size * t.grad_accum * cfg.data.max_length
    assert p["tokens_per_second"] == pytest.approx(tokens / p["seconds_per_step"])
    assert p["seconds_per_step"] == pytest.approx(p["flops_per_step"]["total"] / 25e12)
    assert p["steps"] == t.epochs * (90 // (t.batch_size * t.grad_accum))
    assert (
        p["base_bytes"]["projections"] < p["params"]["attention"] + p["params"]["mlp"]
    )
    json.dumps(p)  # the CLI writes it as JSON
    text = plan.format_plan(p)
    assert "TOTAL" in text and "tokens/s" in text and "optimiser steps" in text


def test_plan_rejects_bad_flags_and_unfetchable_presets(monkeypatch):
    cfg = config_lib.get_config("tiny", "lora")
    with pytest.raises(config_lib.ConfigError, match="--mfu"):
        plan.plan(cfg, mfu=1.5)

    def offline(preset):
        raise OSError("no network")

    monkeypatch.setattr(hub, "load_preset_json", offline)
    name = presets.known_presets()[0]
    with pytest.raises(presets.PresetError, match=f"{name}.*KAGGLE_USERNAME"):
        presets.read_config_json(name)
    with pytest.raises(presets.PresetError, match="HF_TOKEN"):
        presets.read_config_json("hf://google/gemma-4-E2B-it")


def test_keras_hub_preset_config_format():
    kw = {"vocabulary_size": 64, "num_layers": 2, "num_query_heads": 2,
          "num_key_value_heads": 1, "hidden_dim": 16, "intermediate_dim": 32,
          "head_dim": 8, "image_size": None}  # fmt: skip
    wrapped = {"class_name": "Gemma4Backbone", "config": kw}
    assert hub.backbone_kwargs(wrapped) == kw
    spec = hub.spec_from_config(kw)
    keras.utils.set_random_seed(0)
    assert spec == live_spec(keras_hub.models.Gemma4Backbone(**kw))


def test_ple_table_on_host_leaves_the_device_total():
    from gemma4_keras import config_lib
    from gemma4_keras.model import plan as plan_lib

    def total(setting):
        c = config_lib.get_config("e2b", "qlora", "runlocal")
        c.model.ple_on_host = setting
        p = plan_lib.plan(c)
        return p["per_device"]["total"], p["host_ple_table_bytes"], p["model"]

    off, none, _ = total("off")
    on, table, model = total("on")
    assert none == 0 and table > 0
    assert off - on == table


def test_plan_counts_frozen_weights_in_the_checkpoints_dtype(tmp_path):
    """A bfloat16 checkpoint under float32 compute: the base is counted in
    bfloat16 (as `layers.storage_dtype` stores it), the activations in
    float32; the loss splits its float32 side (no float32 table)."""
    from gemma4_keras.testing import full_size

    path = full_size.write_full_size(tmp_path / "e2b", "e2b", weights=False)
    cfg = config_lib.get_config("e2b", "qlora")
    cfg.model.preset, cfg.model.dtype = str(path), "float32"
    cfg.model.ple_on_host = "off"  # the whole base counted on the device
    p = plan.plan(cfg)
    c, spec = (
        p["params"],
        hub.spec_from_config(hub.backbone_kwargs(presets.read_config_json(str(path)))),
    )
    assert p["base_bytes"]["embedding"] == 2 * (c["embedding"] + c["ple"])
    cfg.model.dtype = "bfloat16"
    b = plan.plan(cfg)
    assert b["base_bytes"] == p["base_bytes"]
    # float32 compute splits the loss's float32 side (`loss._dot`): chunks of
    # at most `loss_lib.SPLIT_CHUNK` tokens and their d_logits in three bfloat16
    # parts.
    rows, v, d = loss_lib.SPLIT_CHUNK, spec.vocab_size, spec.hidden_dim
    tokens = cfg.train.batch_size * cfg.data.max_length
    assert p["loss_temp_bytes"] == rows * v * (4 + 6) + tokens * d * 4
    assert b["loss_temp_bytes"] == min(1024, tokens) * v * 4 + tokens * d * 4
    assert set(p["host_bytes"]) == {
        "load", "train", "evaluate", "export_peft", "export_hf"
    }  # fmt: skip


def test_plan_models_routed_and_dense_moe(tmp_path):
    """26B-A4B QLoRA at seq 4096: plan says which MoE kernel runs and counts
    its expert rows: routed (blocks for NF4 banks; ragged_dot for float banks
    on a GPU) about top_k / num_experts of dense."""
    from gemma4_keras.testing import full_size

    (tmp_path / "config.json").write_text(
        json.dumps(full_size.released_config("26b_a4b"))
    )
    c = config_lib.get_config("26b_a4b", "qlora")
    c.model.preset, c.model.dtype = str(tmp_path), "bfloat16"
    c.train.batch_size, c.data.max_length = 1, 4096
    plans = {}
    for dispatch in ("auto", "dense"):
        c.model.moe_dispatch = dispatch
        plans[dispatch] = plan.plan(c, accelerator_name="h100")
    routed, dense = plans["auto"], plans["dense"]
    assert routed["run"]["moe_kernel"] == "blocks"  # NF4: dequantised per block
    assert dense["run"]["moe_kernel"] == "dense"
    assert "moe_dispatch=auto (blocks experts)" in plan.format_plan(routed)
    # 40,832 rows (32,768 routed + block padding) against 128 x 4096.
    ratio = dense["flops_per_step"]["experts"] / routed["flops_per_step"]["experts"]
    assert ratio == pytest.approx(128 * 4096 / 40832)
    assert routed["flops_per_step"]["frozen"] == dense["flops_per_step"]["frozen"]
    act = "remat_peak"
    assert routed["activation_bytes"][act] < dense["activation_bytes"][act] / 2
    c.quant.mode, c.model.moe_dispatch = "none", "auto"
    assert plan.plan(c, accelerator_name="h100")["run"]["moe_kernel"] == "ragged"
    # On a mesh: each device routes its own tokens where it holds every
    # expert (data parallel, `moe.per_shard`); banks split over a model
    # axis run dense.
    c.quant.mode, c.train.batch_size = "nf4", 8
    c.distribution.mode = "data"
    assert plan.plan(c, accelerator_name="v5e-8")["run"]["moe_kernel"] == "blocks"
    c.distribution.mode, c.distribution.model_parallel = "model", 8
    assert plan.plan(c, accelerator_name="v5e-8")["run"]["moe_kernel"] == "dense"


def test_plan_models_moe_token_chunks(tmp_path):
    """`model.moe_token_chunk`: one chunk's expert rows in the backward
    pass (1/4 of them at 4,096 tokens in chunks of 1,024) for one more
    forward pass of the experts; plan says so and suggests it when
    activations are among the largest parts."""
    from gemma4_keras.testing import full_size

    (tmp_path / "config.json").write_text(
        json.dumps(full_size.released_config("26b_a4b"))
    )
    c = config_lib.get_config("26b_a4b", "qlora")
    c.model.preset, c.model.dtype = str(tmp_path), "bfloat16"
    c.train.batch_size, c.data.max_length = 1, 4096
    whole = plan.plan(c, accelerator_name="t4")
    assert "--config.model.moe_token_chunk=1024" in plan.format_plan(whole)
    c.model.moe_token_chunk = 1024
    chunked = plan.plan(c, accelerator_name="t4")
    assert "blocks experts, 1024-token chunks" in plan.format_plan(chunked)
    spec = hub.spec_from_config(
        hub.backbone_kwargs(presets.read_config_json(c.model.preset))
    )
    d, i, k = spec.hidden_dim, spec.expert_dim, spec.top_k
    rows = [moe.expert_rows(t, k, spec.num_experts, "blocks") for t in (4096, 1024)]
    held = [r * (3 * i + 2 * d) + t * 3 * k * d for r, t in zip(rows, (4096, 1024))]
    saving = (held[0] - held[1] - 4096 * d) * 2  # + the chunks' output, bfloat16
    act = "remat_peak"
    assert whole["activation_bytes"][act] - chunked["activation_bytes"][act] == (
        pytest.approx(saving)
    )
    assert saving > 0.75 * 2**30  # 0.81 of one layer's 1.19 GiB of expert rows
    # Each chunk's forward pass is recomputed: 6 passes of the experts, not 4.
    flops = [p["flops_per_step"]["experts"] for p in (whole, chunked)]
    assert flops[1] / flops[0] == pytest.approx(1.5 * 4 * rows[1] / rows[0])


def test_26b_a4b_qlora_at_4k_tokens_fits_16_gb_with_the_16gb_switch(tmp_path):
    """Issue 27's target, per `plan`: 26B-A4B QLoRA (NF4 + double quant, r16
    all linear, dropout 0.05) at seq 4,096, batch 1, bfloat16, within 16 GB
    (16e9 bytes) with `:16gb` (config_lib.LOW_MEMORY), not without it.
    docs/real_size.md checks plan against XLA on the first 6 layers."""
    from gemma4_keras.testing import full_size

    (tmp_path / "config.json").write_text(
        json.dumps(full_size.released_config("26b_a4b"))
    )
    plans = {}
    for arg in (None, "16gb"):
        c = config_lib.get_config("26b_a4b", "qlora", arg)
        c.model.preset, c.model.dtype = str(tmp_path), "bfloat16"
        c.train.batch_size, c.data.max_length = 1, 4096
        plans[arg] = p = plan.plan(c, accelerator_name="h100")
        assert p["per_device"]["total"] == p["total_bytes"]
    totals = {arg: p["total_bytes"] for arg, p in plans.items()}
    assert totals["16gb"] <= 16e9 < totals[None], totals
    assert "int8 embedding" in plan.format_plan(plans["16gb"])
    # The table: V x D x 2 bytes in bfloat16, V x D + a float32 scale per
    # row in int8.
    v, d = p["model"]["vocab_size"], p["model"]["hidden_dim"]
    emb = [plans[arg]["base_bytes"]["embedding"] for arg in (None, "16gb")]
    assert emb[0] - emb[1] == v * d * 2 - (v * d + 4 * v)


def test_expert_lora_counted_per_expert():
    """Expert-bank adapters (one pair per expert) count E pairs: plan's
    adapter parameters and variable list equal the built model's."""
    path = tiny.tiny_checkpoint(moe=True)
    _, spec = _arch(path)
    backbone = keras_hub.models.Gemma4Backbone.from_preset(str(path), dtype="float32")
    lora = LoraSpec(rank=2, targets=("q_proj",) + schema.EXPERT_TARGETS)
    model = _model(backbone, lora)
    trainable = {v.path: tuple(v.shape) for v in model.trainable_variables}
    assert plan.adapter_params(spec, lora) == sum(
        int(np.prod(s)) for s in trainable.values()
    )
    q = {"mode": "none", "double_quant": False, "block_size": 64}
    planned = {
        p: tuple(s)
        for p, s, _ in plan.training_variables(spec, q, 4, lora)
        if "lora_default" in p
    }
    assert sorted(planned.values()) == sorted(trainable.values())
    assert (spec.num_experts, spec.hidden_dim, 2) in planned.values()
