"""The MoE router in training: the optional load-balancing loss
(`train.router_aux_loss_coef`) against transformers, and the router
statistics in the step's logs (`gemma4_lora_model.ROUTER_LOGS`)."""

from __future__ import annotations

import csv
import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma4_keras as g4
from gemma4_keras import config_lib
from gemma4_keras.model import gemma4_lora_model, lora, presets
from gemma4_keras.testing import variants
from gemma4_keras.training import callbacks as cb
from gemma4_keras.training import train

COEF = 0.05
SEQ = 24


@functools.cache
def tiny_model(variant: str = "moe", remat: bool = False):
    # Adapters start at zero: the model is the checkpoint's, as transformers'.
    return gemma4_lora_model.Gemma4LoraModel.from_backbone(
        variants.backbone(variant),
        lora.LoraSpec(rank=4),
        dtype="float32",
        remat=remat,
    )


def padded_batch() -> dict:
    """Two rows, the second padded after 15 tokens (segment id 0)."""
    r = np.random.default_rng(7)
    ids = r.integers(4, 1024, size=(2, SEQ))
    ids[:, 0] = 2  # <bos>
    valid = np.arange(SEQ)[None] < np.array([[SEQ], [15]])
    ids = np.where(valid, ids, 0)
    targets = np.roll(ids, -1, axis=1)
    weights = (valid & np.roll(valid, -1, axis=1)).astype(np.float32)
    weights[:, -1] = 0
    return {
        "token_ids": ids,
        "positions": np.tile(np.arange(SEQ), (2, 1)),
        "segment_ids": valid.astype(np.int32),
        "target_ids": targets,
        "loss_weights": weights,
        "loss_norm": np.array([weights.sum()], np.float32),
    }


def step_loss(m, coef: float, data: dict, tagged: bool = True):
    """(loss, adapter gradients) of Keras' step function: call, then compute_loss.

    `tagged=False` hands compute_loss a copy of the hidden states: the
    cross-entropy alone, as before the router statistics existed.
    """
    m.set_router_aux_loss(coef)

    def loss_fn(tv, ntv):
        hidden, _ = m.stateless_call(tv, ntv, data, training=True)
        return m.compute_loss(x=data, y_pred=hidden if tagged else hidden + 0.0)

    tv = [v.value for v in m.trainable_variables]
    ntv = [v.value for v in m.non_trainable_variables]
    try:
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(tv, ntv)
    finally:
        m.set_router_aux_loss(0.0)
    return float(loss), [np.asarray(g) for g in grads]


def transformers_loss(data: dict, coef: float) -> tuple[float, float]:
    """(cross-entropy + coef x aux, aux) by transformers on the same weights:
    the router logits from forward hooks on each layer's `router.proj`, the
    aux loss from `load_balancing_loss_func` with the attention mask (as
    Mixtral's ForCausalLM adds it; Gemma 4's adds none)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        variants.checkpoint("moe"), dtype=torch.float32
    ).eval()
    logits: list = []
    hooks = [
        mod.register_forward_hook(lambda _m, _i, out: logits.append(out))
        for name, mod in hf.named_modules()
        if name.endswith("router.proj")
    ]
    mask = torch.tensor(data["segment_ids"], dtype=torch.long)
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor(data["token_ids"]),
            attention_mask=mask,
            logits_to_keep=slice(None),
        )
    for h in hooks:
        h.remove()
    cfg = hf.config.get_text_config()
    assert len(logits) == cfg.num_hidden_layers
    experts = logits[0].shape[-1]
    gate = tuple(g.reshape(-1, experts) for g in logits)
    aux = float(
        mixtral.load_balancing_loss_func(gate, experts, cfg.top_k_experts, mask)
    )
    logp = torch.log_softmax(out.logits.float(), -1).numpy()
    picked = np.take_along_axis(logp, data["target_ids"][..., None], -1)[..., 0]
    ce = -(picked * data["loss_weights"]).sum() / data["loss_norm"][0]
    return float(ce) + coef * aux, aux


def test_aux_loss_equals_transformers():
    """With train.router_aux_loss_coef > 0 the step's loss is cross-entropy +
    coef x transformers' load-balancing loss of the router logits its own
    model computes, padding left out; the aux loss has a gradient (through
    the hidden states into the adapters) though the router is frozen."""
    m, data = tiny_model(), padded_batch()
    ours, grads = step_loss(m, COEF, data)
    plain, plain_grads = step_loss(m, 0.0, data)
    theirs, aux = transformers_loss(data, COEF)

    def our_aux(tv, ntv):
        m.stateless_call(tv, ntv, data)
        stats = [s for s in m._router[1] if s is not None]
        m._router = None
        return gemma4_lora_model.moe.load_balancing_loss(stats)

    vs = [v.value for v in m.trainable_variables]
    aux_ours = float(jax.jit(our_aux)(vs, [v.value for v in m.non_trainable_variables]))
    print(
        f"loss ours {ours:.7f} transformers {theirs:.7f} (diff {ours - theirs:.2e}); "
        f"aux ours {aux_ours:.7f} transformers {aux:.7f} (diff {aux_ours - aux:.2e})"
    )
    assert abs(ours - theirs) <= 1e-5 * abs(theirs)
    assert abs(aux_ours - aux) <= 1e-5 * aux
    assert abs((ours - plain) / COEF - aux) <= 1e-4 * aux
    assert aux > m.spec.top_k * 0.99  # top_k when even; the tiny router is not
    assert any(np.abs(g - p).max() > 0 for g, p in zip(grads, plain_grads))


def test_aux_loss_gradient_through_rematerialised_blocks():
    """The router statistics leave a rematerialised block as outputs of its
    custom VJP: the same loss and adapter gradients as without remat."""
    data = padded_batch()
    loss, grads = step_loss(tiny_model(), COEF, data)
    loss_r, grads_r = step_loss(tiny_model(remat=True), COEF, data)
    worst = max(
        float(np.abs(a - b).max() / np.abs(b).max())
        for a, b in zip(grads_r, grads)
        if np.abs(b).max() > 0
    )
    print(f"remat: loss diff {loss_r - loss:.2e}, adapter grads rel {worst:.2e}")
    assert abs(loss_r - loss) <= 1e-6 * abs(loss)
    assert worst < 1e-5


def test_default_coef_leaves_the_loss_and_router_alone():
    """Coef 0 (the default): the loss is the cross-entropy alone, bit for
    bit, and the router stays frozen (no trainable variable but LoRA)."""
    assert config_lib.get_config("26b_a4b", "lora").train.router_aux_loss_coef == 0
    m, data = tiny_model(), padded_batch()
    with_stats, _ = step_loss(m, 0.0, data)
    alone, _ = step_loss(m, 0.0, data, tagged=False)
    assert with_stats == alone
    assert all("lora" in v.path for v in m.trainable_variables)
    assert not any(v.trainable for v in m.blocks[0].extra.values())


def test_expert_loads():
    """expert_load_max / min: an expert's share of a layer's picks relative
    to an even share, padding rows left out."""
    e, k = 4, 2
    logits = jnp.array([[4.0, 3, 0, 0], [4, 0, 3, 0], [0, 0, 9, 9]])
    stats = gemma4_lora_model.moe.router_stats(logits, k, jnp.array([1, 1, 0]))
    loads = np.asarray(gemma4_lora_model.expert_loads([stats]))
    # 4 picks: expert 0 twice (2x even), experts 1 and 2 once, expert 3 never.
    np.testing.assert_allclose(loads, [[2.0, 1.0, 1.0, 0.0]])
    assert loads.sum() == e


@pytest.mark.parametrize("size", ["26b_a4b", "tiny"])
def test_train_log_has_router_columns_for_moe_only(size, tmp_path, capsys):
    """A short tiny MoE run logs router_aux_loss and the expert loads per
    step in train_log.csv and the progress line (through Keras' logs); a
    dense run's are unchanged."""
    config = g4.get_config(
        size,
        "lora",
        "runlocal",
        overrides={"train.router_aux_loss_coef": COEF if size != "tiny" else 0.0},
    )
    model, tokenizer, preset = g4.load_training_model(config)
    data = g4.training_data(config, tokenizer, preset)
    g4.compile_model(model, config, data)
    path = os.path.join(tmp_path, "train_log.csv")
    model.fit(
        data.batches,
        steps_per_epoch=1,
        epochs=2,
        callbacks=[
            train.StepCSVLogger(path),
            cb.Progress(2, data.plan.tokens_per_step, every=1),
        ],
        shuffle=False,
        verbose=0,
    )
    printed = re.findall(r"^step \d/2 .*$", capsys.readouterr().out, re.M)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    router = set(gemma4_lora_model.ROUTER_LOGS)
    assert len(printed) == 2
    if size == "tiny":
        assert not router & set(rows[0])
        assert not any(n in line for n in router for line in printed)
        return
    assert router <= set(rows[0])
    assert all(f" {n}=" in line for n in router for line in printed)
    for r in rows:
        aux, high, low = (float(r[n]) for n in gemma4_lora_model.ROUTER_LOGS)
        print(
            f"step {r['step']}: loss {r['loss']} aux {aux:.4f} loads {low:.3f}..{high:.3f}"
        )
        assert aux >= model.spec.top_k * 0.99 and 0 <= low <= 1 <= high
    assert all("lora" in v.path for v in model.trainable_variables)


def test_refusals():
    c = config_lib.get_config("26b_a4b", "lora")
    c.train.router_aux_loss_coef = -0.1
    with pytest.raises(
        config_lib.ConfigError,
        match=r"--config.train.router_aux_loss_coef=-0.1 must be >= 0 \(0 = off\)",
    ):
        config_lib.validate(c)
    dense = config_lib.get_config("tiny", "lora", "runlocal")
    dense.train.router_aux_loss_coef = 0.01
    preset = presets.resolve_preset(dense.model.preset)
    with pytest.raises(
        config_lib.ConfigError,
        match=r"router_aux_loss_coef=0.01: .* has no experts .*set it to 0",
    ):
        train.check_router_aux_loss(dense.train, preset)
    moe = config_lib.get_config("26b_a4b", "lora", "runlocal").train
    moe.router_aux_loss_coef = 0.01
    train.check_router_aux_loss(moe, presets.resolve_preset("tiny:moe,k_eq_v"))
    with pytest.raises(ValueError, match="has no experts"):
        tiny_model("default").set_router_aux_loss(0.01)
    with pytest.raises(ValueError, match="must be >= 0"):
        tiny_model().set_router_aux_loss(-1.0)
