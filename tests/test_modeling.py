"""The training forward pass of `Gemma4LoraModel` against KerasHub and
transformers; packed rows; rematerialisation."""

from __future__ import annotations

import functools

import jax
import numpy as np
import oracles
import pytest

from gemma4_keras.model import gemma4_lora_model, lora
from gemma4_keras.testing import tiny, variants
from gemma4_keras.testing.variants import backbone

SEQ = 24  # longer than the tiny sliding window (16)
VARIANTS = variants.select(*variants.FEATURES)


@functools.cache
def model(variant: str, remat: bool = False):
    return gemma4_lora_model.Gemma4LoraModel.from_backbone(
        backbone(variant), lora.LoraSpec(rank=4), remat=remat, dtype="float32"
    )


def token_ids(batch: int = 2, seq: int = SEQ, seed: int = 0) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(4, 1024, size=(batch, seq))
    ids[:, 0] = 2
    return ids


def inputs(ids: np.ndarray) -> dict[str, np.ndarray]:
    b, t = ids.shape
    return {
        "token_ids": ids,
        "positions": np.tile(np.arange(t), (b, 1)),
        "segment_ids": np.ones((b, t), np.int32),
    }


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_matches_keras_hub(variant):
    ids = token_ids()
    ours = np.asarray(model(variant)(inputs(ids)))
    theirs = backbone(variant)(
        {
            "token_ids": ids,
            "padding_mask": np.ones_like(ids),
            "position_ids": np.tile(np.arange(SEQ), (2, 1)),
        }
    )
    err = rel(ours, np.asarray(theirs))
    print(f"{variant}: hidden vs Gemma4Backbone {err:.2e}")
    assert err < 1e-5


def test_spec_reads_k_eq_v_and_double_wide_mlp():
    spec = model("k_eq_v").spec
    assert [b.k_eq_v for b in spec.blocks] == [False, True, False, True]
    assert [b.num_kv_heads for b in spec.blocks] == [4, 2, 4, 2]
    assert spec.projection_shape(1, "k_proj") == (64, 2 * 32)
    assert [spec.has_projection(i, "v_proj") for i in range(4)] == [
        True,
        False,
        True,
        False,
    ]
    sites = model("k_eq_v").adapters()
    assert (1, "v_proj") not in sites and (1, "k_proj") in sites
    assert (0, "v_proj") in sites

    spec = model("double_wide_mlp").spec
    assert [b.ffn_dim for b in spec.blocks] == [128, 128, 256, 256]
    assert spec.projection_shape(3, "down_proj") == (256, 64)
    assert model("double_wide_mlp").adapters()[(2, "up_proj")].lora_b.shape == (4, 256)


def test_logits_match_transformers():
    torch = oracles.need("torch")
    transformers = oracles.need("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tiny.tiny_checkpoint(), dtype=torch.float32
    ).eval()
    ids = token_ids()
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(ids)).logits.numpy()
    m = model("default")
    m.set_adapter(None)
    got = np.asarray(m.logits(m(inputs(ids))))
    m.set_adapter("default")
    err = rel(got, want)
    mean_err = float(np.abs(got - want).mean() / np.abs(want).mean())
    print(f"logits vs transformers: max-rel {err:.2e}, mean-rel {mean_err:.2e}")
    assert err < 1e-4  # cross-framework float32 floor (GEMMA4.md: 7.6e-5)


@pytest.mark.parametrize("variant", ["default", "kv_shared"])
def test_packed_row_equals_examples_alone(variant):
    m = model(variant)
    a, b = token_ids(1, 9, seed=1), token_ids(1, 17, seed=2)  # b spans the window
    packed = {
        "token_ids": np.concatenate([a, b, np.zeros((1, 2), int)], axis=1),
        "positions": np.concatenate([np.arange(9), np.arange(17), [0, 0]])[None],
        "segment_ids": np.array([[1] * 9 + [2] * 17 + [0, 0]], np.int32),
    }
    hidden = np.asarray(m(packed))
    alone_a = np.asarray(m(inputs(a)))
    alone_b = np.asarray(m(inputs(b)))
    np.testing.assert_allclose(hidden[:, :9], alone_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hidden[:, 9:26], alone_b, rtol=1e-5, atol=1e-5)
    assert np.isfinite(hidden).all()  # padding rows see no key and stay finite


def _loss_and_grads(m, data):
    def loss_fn(tv, ntv):
        hidden, _ = m.stateless_call(tv, ntv, data, training=True)
        return m.compute_loss(x=data, y_pred=hidden)

    tv = [v.value for v in m.trainable_variables]
    ntv = [v.value for v in m.non_trainable_variables]
    return jax.jit(jax.value_and_grad(loss_fn))(tv, ntv)


def test_remat_same_outputs_and_gradients():
    plain, remat = model("kv_shared"), model("kv_shared", remat=True)
    rng = np.random.default_rng(3)
    for m in (plain, remat):  # same non-zero adapter in both
        r = np.random.default_rng(3)
        for a in m.adapters().values():
            a.lora_b.assign(r.normal(0, 0.05, a.lora_b.shape).astype(np.float32))
    ids = token_ids(seed=int(rng.integers(100)))
    data = {
        **inputs(ids),
        "target_ids": np.roll(ids, -1, axis=1),
        "loss_weights": np.ones(ids.shape, np.float32),
        "loss_norm": np.array([ids.size], np.float32),
    }
    np.testing.assert_array_equal(np.asarray(plain(data)), np.asarray(remat(data)))
    loss_p, grads_p = _loss_and_grads(plain, data)
    loss_r, grads_r = _loss_and_grads(remat, data)
    # remat stores each block's input (`xla_workarounds.stored`), plain
    # reads it through XLA's fused chain: the same float32 values rounded in
    # another order (16.1824379 vs 16.1824341), a few ulps.
    assert float(loss_r) == pytest.approx(float(loss_p), rel=1e-6)
    worst = max(
        float(
            np.abs(np.asarray(gp) - np.asarray(gr)).max()
            / (np.abs(np.asarray(gp)).max() + 1e-30)
        )
        for gp, gr in zip(grads_p, grads_r)
    )
    print(f"remat vs plain gradients: worst relative difference {worst:.2e}")
    # The backward pass really recomputes each block (XLA fuses the
    # recomputation differently from the forward pass, and with each block's
    # input stored, differently again): float32 rounding, 9.9e-06 (1.1e-06
    # before `stored`); a wrong gradient differs at 1e-2 or more.
    assert worst < 2e-5
