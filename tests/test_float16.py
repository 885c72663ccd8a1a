"""float16 compute with float32 islands (the T4 mode): what runs in which
dtype, the gate*up clamp before down_proj, dynamic loss scaling, and a few
training steps that track float32."""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import keras
import ml_collections
import numpy as np
import pytest

from gemma4_keras.model import decoding, gemma4_lora_model, layers, lora, presets
from gemma4_keras.testing.variants import backbone
from gemma4_keras.training import callbacks as cb
from gemma4_keras.training import checkpointing, train

SEQ = 24


@functools.cache
def built(dtype: str, quant: str = "none") -> gemma4_lora_model.Gemma4LoraModel:
    """One shared model per (dtype, quant), for tests that do not train it."""
    return build(dtype, quant)


def build(dtype: str, quant: str = "none") -> gemma4_lora_model.Gemma4LoraModel:
    return gemma4_lora_model.Gemma4LoraModel.from_backbone(
        backbone(), lora.LoraSpec(rank=4, alpha=8.0, seed=3), dtype=dtype, quant=quant
    )


def batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 1024, size=(2, SEQ))
    ids[:, 0] = 2
    weights = np.ones((2, SEQ), np.float32)
    weights[:, : SEQ // 2] = 0  # the prompt half is not trained
    return {
        "token_ids": ids,
        "positions": np.tile(np.arange(SEQ), (2, 1)),
        "segment_ids": np.ones((2, SEQ), np.int32),
        "target_ids": np.roll(ids, -1, axis=1),
        "loss_weights": weights,
        "loss_norm": np.full((2,), weights.sum(), np.float32),
    }


def test_float16_islands_only_for_float16():
    assert layers.float16_islands("float16")
    assert not layers.float16_islands("bfloat16")
    assert not layers.float16_islands("float32")


def test_residual_stream_and_outputs_stay_float32():
    m = built("float16")
    x, _ = m.embed(jnp.asarray(batch()["token_ids"]))
    assert x.dtype == jnp.float32
    blk = m.blocks[0]
    # The frozen kernels are stored in float16 (half float32's memory).
    assert blk.proj["gate_proj"].dense.kernel.dtype == "float16"
    y = blk.linear("gate_proj", x, None)
    assert y.dtype == jnp.float32


def test_gate_up_clamped_before_down_proj():
    m = built("float16")
    blk = m.blocks[0]
    rng = np.random.default_rng(0)
    # Scale 3000: gate * up reaches about 1e6, far past float16's 65504.
    h = jnp.asarray(rng.standard_normal((1, 4, m.spec.hidden_dim)) * 3000, jnp.float32)
    gate = np.asarray(blk.linear("gate_proj", h, None), np.float64)
    up = np.asarray(blk.linear("up_proj", h, None), np.float64)
    product = np.asarray(jax.nn.gelu(gate, approximate=True)) * up
    assert np.abs(product).max() > 65504  # the test's input does overflow
    down = np.asarray(blk.proj["down_proj"].weight("float32"), np.float64)
    # Unclamped, down_proj's float16 input would hold inf.
    with np.errstate(over="ignore"):
        assert not np.isfinite(product.astype(np.float16)).all()

    out = np.asarray(blk.mlp(h, None))
    assert np.isfinite(out).all()
    clamped = np.clip(product, -layers.FLOAT16_CLAMP, layers.FLOAT16_CLAMP)
    expected = clamped.astype(np.float16).astype(np.float64) @ down
    np.testing.assert_allclose(
        out, expected, rtol=2e-3, atol=1e-2 * np.abs(expected).max()
    )


def scaled_grads(m, scale: float) -> list[np.ndarray]:
    params = [v.value for v in m.trainable_variables]
    frozen_values = [v.value for v in m.non_trainable_variables]
    b = {k: jnp.asarray(v) for k, v in batch().items()}

    def scaled_loss(params):
        hidden, _ = m.stateless_call(params, frozen_values, b)
        return m.compute_loss(x=b, y_pred=hidden) * scale

    grads = jax.jit(jax.grad(scaled_loss))(params)
    assert all(g.dtype == jnp.float32 for g in grads)
    return [np.asarray(g) / scale for g in grads]


def test_float16_gradients_match_float32_under_loss_scale():
    # QLoRA (NF4), the T4's flagship; float kernels train in the test below.
    quant = "nf4"
    ref = np.concatenate([g.ravel() for g in scaled_grads(built("float32", quant), 1)])
    f16 = scaled_grads(built("float16", quant), 2.0**15)  # Keras' initial scale
    assert all(np.isfinite(g).all() for g in f16)
    f16 = np.concatenate([g.ravel() for g in f16])
    assert np.abs(ref).max() > 0
    assert np.linalg.norm(f16 - ref) < 1e-2 * np.linalg.norm(ref)


def compiled(dtype: str):
    m = build(dtype)
    cfg = ml_collections.ConfigDict(
        dict(weight_decay=0.0, max_grad_norm=1.0, router_aux_loss_coef=0.0)
    )
    train.compile_model(m, cfg, cb.WarmupDecay(3e-3, total_steps=8, decay="constant"))
    return m


def test_float16_training_tracks_float32():
    keras.utils.set_random_seed(0)
    ref, f16 = compiled("float32"), compiled("float16")
    assert isinstance(f16.optimizer, keras.optimizers.LossScaleOptimizer)
    assert not isinstance(ref.optimizer, keras.optimizers.LossScaleOptimizer)
    b = batch()
    steps = 3
    losses = {
        name: [float(m.train_on_batch(b)) for _ in range(steps)]
        for name, m in (("float32", ref), ("float16", f16))
    }
    # Training moved the loss, and float16 followed it step by step.
    assert losses["float32"][-1] < losses["float32"][0] - 0.05
    np.testing.assert_allclose(losses["float16"], losses["float32"], rtol=1e-2)
    # No step was skipped for overflowing gradients: the scale never dropped.
    assert int(keras.ops.convert_to_numpy(f16.optimizer.iterations)) == steps
    assert float(keras.ops.convert_to_numpy(f16.optimizer.dynamic_scale)) == 2.0**15


def test_auto_is_float16_on_gpus_without_bfloat16(monkeypatch):
    cfg = ml_collections.ConfigDict(dict(dtype="auto"))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    for capability, dtype in (
        ("7.5", "float16"),
        ("7.0", "float16"),
        ("8.9", "bfloat16"),
    ):
        gpu = types.SimpleNamespace(compute_capability=capability)
        monkeypatch.setattr(jax, "devices", lambda *a, g=gpu: [g])
        assert presets.compute_dtype(cfg) == dtype, capability
    monkeypatch.setattr(jax, "devices", lambda *a: [object()])
    assert presets.compute_dtype(cfg) == "bfloat16"
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert presets.compute_dtype(cfg) == "bfloat16"
    cfg.dtype = "float32"
    assert presets.compute_dtype(cfg) == "float32"


def test_resume_accepts_steps_the_loss_scaler_skipped():
    plain = types.SimpleNamespace(optimizer=keras.optimizers.AdamW())
    with pytest.raises(checkpointing.CheckpointError):
        train.check_optimizer_step(plain, 3, "ckpt")
    inner = keras.optimizers.AdamW()
    scaled = types.SimpleNamespace(optimizer=keras.optimizers.LossScaleOptimizer(inner))
    train.check_optimizer_step(scaled, 3, "ckpt")  # 3 steps run, all skipped
    inner.iterations.assign(5)  # more applied than run: still an error
    with pytest.raises(checkpointing.CheckpointError):
        train.check_optimizer_step(scaled, 3, "ckpt")


def test_decoding_with_cache_matches_the_full_pass():
    m = built("float16")
    b = batch()
    ids = jnp.asarray(b["token_ids"][:1])
    full = np.asarray(m({k: v[:1] for k, v in b.items()}))
    cache = decoding.empty_cache(m, 1, SEQ)
    h1, cache = m(decoding.model_inputs(ids[:, :16], 0), cache=cache, cache_index=0)
    h2, _ = m(decoding.model_inputs(ids[:, 16:], 16), cache=cache, cache_index=16)
    steps = np.concatenate([np.asarray(h1), np.asarray(h2)], axis=1)
    assert np.isfinite(steps).all()
    # The cache holds K/V in float16; the full pass keeps them float32.
    np.testing.assert_allclose(steps, full, atol=1e-2 * np.abs(full).max())
