"""Routed MoE dispatch (`model/moe.py`) against the dense (KerasHub) one.

Routed compute (ragged_dot, and the exact block-sparse kernel XLA:CPU runs)
must equal every-expert-on-every-token compute to float32 precision: values,
adapter gradients and input gradients, on the tiny MoE model and on one layer
at 26B-A4B's widths (128 experts, d 2816, f 704, top 8), with router ties
and experts that receive no token; with an NF4 bank too, whose routed step
must never hold a dequantised bank.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_keras import config_lib
from gemma4_keras.model import gemma4_lora_model, lora, moe, schema
from gemma4_keras.model import quant as quant_lib
from gemma4_keras.testing import variants

KERNELS = ("ragged", "blocks")
TOL = 1e-5  # float32, different summation orders only


def rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_block_size_and_layout():
    assert moe.block_size(4096 * 8, 128) == 64  # seq 4096 at 26B-A4B
    assert moe.block_size(256 * 8, 128) == 4
    assert moe.block_size(8, 128) == 1  # one token (decoding): no padding
    block_expert, pos, rows = moe.block_layout(jnp.array([0, 0, 0, 2, 2]), 3, 2)
    assert rows == 8
    np.testing.assert_array_equal(pos, [0, 1, 2, 4, 5])
    np.testing.assert_array_equal(block_expert, [0, 0, 2, 2])


def test_auto_kernel_and_rows():
    assert moe.kernel("auto", False, "cpu") == "blocks"
    assert moe.kernel("auto", False, "gpu") == "ragged"
    assert moe.kernel("auto", True, "tpu") == "blocks"  # dequantised per block
    assert moe.kernel("dense", False, "gpu") == "dense"
    # Banks split by expert over a model axis (a data mesh routes per shard).
    assert moe.kernel("auto", True, "cpu", distributed=True) == "dense"
    with pytest.raises(ValueError, match="model.moe_dispatch='sparse'"):
        moe.kernel("sparse", False)
    # The compiled step's row count is expert_rows' (what plan counts).
    _, pos, rows = moe.block_layout(jnp.zeros(256 * 8, jnp.int32), 128, 4)
    assert rows == moe.expert_rows(256, 8, 128, "blocks") == 2432
    assert moe.expert_rows(256, 8, 128, "dense") == 256 * 128


# --- the tiny MoE model -----------------------------------------------------


# Every projection and both expert banks (one LoRA pair per expert).
EXPERT_LORA = config_lib.LORA_TARGETS + schema.EXPERT_TARGETS


@functools.cache
def tiny_model(quant: str = "none", targets=config_lib.LORA_TARGETS):
    m = gemma4_lora_model.Gemma4LoraModel.from_backbone(
        variants.backbone("moe"),
        lora.LoraSpec(rank=4, targets=targets),
        quant=quant,
        dtype="float32",
    )
    r = np.random.default_rng(3)
    for a in m.adapters().values():  # a non-zero adapter: gradients reach A too
        a.lora_b.assign(r.normal(0, 0.05, a.lora_b.shape).astype(np.float32))
    return m


def batch():
    ids = np.random.default_rng(0).integers(4, 1024, size=(2, 24))
    ids[:, 0] = 2
    return {
        "token_ids": ids,
        "positions": np.tile(np.arange(24), (2, 1)),
        "segment_ids": np.ones((2, 24), np.int32),
        "target_ids": np.roll(ids, -1, axis=1),
        "loss_weights": np.ones(ids.shape, np.float32),
        "loss_norm": np.array([ids.size], np.float32),
    }


def loss_and_grads(m, dispatch: str, token_chunk: int = 0):
    m.set_moe(dispatch, token_chunk)
    data = batch()

    def loss_fn(tv, ntv):
        hidden, _ = m.stateless_call(tv, ntv, data, training=True)
        return m.compute_loss(x=data, y_pred=hidden), hidden

    tv = [v.value for v in m.trainable_variables]
    ntv = [v.value for v in m.non_trainable_variables]
    (loss, hidden), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(tv, ntv)
    return float(loss), np.asarray(hidden), [np.asarray(g) for g in grads]


@pytest.mark.parametrize("kernel", KERNELS)
def test_tiny_model_routed_equals_dense(kernel):
    m = tiny_model()
    loss_d, hidden_d, grads_d = loss_and_grads(m, "dense")
    loss_r, hidden_r, grads_r = loss_and_grads(m, kernel)
    worst = max(rel(gr, gd) for gr, gd in zip(grads_r, grads_d))
    print(f"{kernel}: hidden {rel(hidden_r, hidden_d):.2e}, adapter grads {worst:.2e}")
    assert len(grads_d) == len(m.adapters()) * 2
    assert rel(hidden_r, hidden_d) < TOL
    assert abs(loss_r - loss_d) <= TOL * abs(loss_d)
    assert worst < TOL


@pytest.mark.parametrize("quant", ["none", "nf4"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_tiny_expert_lora_routed_equals_dense(kernel, quant):
    """Expert LoRA (PEFT's per-expert pairs on gate_up_proj and down_proj):
    routed == dense in values and every adapter gradient, expert A and B
    included, on a float and an NF4 (QLoRA) bank."""
    m = tiny_model(quant, EXPERT_LORA)
    names = [v.path for v in m.trainable_variables]
    experts = [i for i, n in enumerate(names) if "experts" in n]
    assert len(experts) == m.spec.num_layers * 2 * 2  # 2 targets x (A, B)
    loss_d, hidden_d, grads_d = loss_and_grads(m, "dense")
    loss_r, hidden_r, grads_r = loss_and_grads(m, kernel)
    worst = max(rel(grads_r[i], grads_d[i]) for i in range(len(grads_d)))
    print(f"{kernel} {quant}: hidden {rel(hidden_r, hidden_d):.2e}, grads {worst:.2e}")
    assert all(np.abs(grads_d[i]).max() > 0 for i in experts)
    assert rel(hidden_r, hidden_d) < TOL
    assert abs(loss_r - loss_d) <= TOL * abs(loss_d)
    assert worst < TOL
    # The expert adapter changes the output (else the test proves nothing).
    m.set_adapter(None)
    _, hidden_base, _ = loss_and_grads(m, "dense")
    m.set_adapter("default")
    assert rel(hidden_base, hidden_d) > 1e-3


@pytest.mark.parametrize(
    "kernel,quant,targets",
    [("blocks", "nf4", EXPERT_LORA), ("ragged", "none", config_lib.LORA_TARGETS)],
)
def test_tiny_token_chunks_equal_dense(kernel, quant, targets):
    """`model.moe_token_chunk`: the routed experts over chunks of tokens,
    each rematerialised, equal dense compute in values and every adapter
    gradient (expert LoRA on an NF4 bank included). 48 tokens in chunks of
    at most 10: 5 chunks of 10, the last padded with 2 rows."""
    m = tiny_model(quant, targets)
    assert moe.chunks(48, 10) == 5
    loss_d, hidden_d, grads_d = loss_and_grads(m, "dense")
    loss_c, hidden_c, grads_c = loss_and_grads(m, kernel, token_chunk=10)
    m.set_moe()
    worst = max(rel(gc, gd) for gc, gd in zip(grads_c, grads_d))
    print(
        f"{kernel} {quant} chunks: hidden {rel(hidden_c, hidden_d):.2e}, grads {worst:.2e}"
    )
    assert rel(hidden_c, hidden_d) < TOL
    assert abs(loss_c - loss_d) <= TOL * abs(loss_d)
    assert worst < TOL


def test_token_chunk_is_checked():
    with pytest.raises(ValueError, match="model.moe_token_chunk=-1"):
        tiny_model().set_moe("auto", -1)
    with pytest.raises(ValueError, match="model.moe_dispatch='sparse'"):
        tiny_model().set_moe("sparse")
    c = config_lib.get_config("tiny", "lora")
    c.model.moe_token_chunk = -1
    with pytest.raises(config_lib.ConfigError, match="model.moe_token_chunk"):
        config_lib.validate(c)


@pytest.mark.parametrize("kernel", KERNELS)
def test_tiny_block_input_gradient(kernel):
    blk = tiny_model().blocks[1]
    x = np.random.default_rng(1).standard_normal((2, 24, 64)).astype("float32")
    weights = np.linspace(-1, 1, 64, dtype="float32")

    def total(dispatch):
        def f(v):
            blk.moe_dispatch = dispatch
            return (blk._moe(v)[0] * weights).sum()

        return f

    y_dense = np.asarray(jax.jit(total("dense"))(x))
    y_routed = np.asarray(jax.jit(total(kernel))(x))
    assert abs(y_routed - y_dense) <= TOL * abs(y_dense)
    g_dense = jax.jit(jax.grad(total("dense")))(x)
    g_routed = jax.jit(jax.grad(total(kernel)))(x)
    assert rel(g_routed, g_dense) < TOL


def test_tiny_nf4_routed_equals_dense():
    m = tiny_model("nf4")
    assert isinstance(m.blocks[0]._bank("experts_up"), quant_lib.NF4Weight)
    loss_d, hidden_d, grads_d = loss_and_grads(m, "dense")
    loss_r, hidden_r, grads_r = loss_and_grads(m, "auto")  # blocks, per expert
    worst = max(rel(gr, gd) for gr, gd in zip(grads_r, grads_d))
    print(f"nf4: hidden {rel(hidden_r, hidden_d):.2e}, adapter grads {worst:.2e}")
    assert rel(hidden_r, hidden_d) < TOL
    assert worst < TOL


# --- one layer of experts, standalone ---------------------------------------


def layer(e, d, f, seed=0, ties=False, nf4=False):
    """Random float32 router and banks of one MoE layer.

    `ties`: the router's columns come in identical triples (3j, 3j+1, 3j+2)
    for the first `3 * (e // 4)` experts, the rest are zero: every token's
    top-k ends inside a triple of exactly equal probabilities (top-k takes
    the lower indices); the zero columns tie too, and the last of them get
    no token (at most top-k of them are picked, the lowest first).
    """
    r = np.random.default_rng(seed)
    router = r.standard_normal((d, e)).astype(np.float32)
    if ties:
        triples = e // 4
        router[:, : 3 * triples] = np.repeat(router[:, :triples], 3, axis=1)
        router[:, 3 * triples :] = 0.0
    keys = jax.random.split(jax.random.key(seed), 3)
    shapes = {"experts_gate": (e, d, f), "experts_up": (e, d, f),
              "experts_down": (e, f, d)}  # fmt: skip
    # Made by JAX, not numpy: 3 GiB at 26B-A4B's widths, held once.
    banks = {
        name: jax.random.normal(key, shape) * shape[1] ** -0.5
        for key, (name, shape) in zip(keys, shapes.items())
    }
    if nf4:
        banks = {
            k: quant_lib.nf4_quantize_experts(np.asarray(v)) for k, v in banks.items()
        }
    return {
        "router_scale": r.uniform(0.5, 1.5, d).astype(np.float32),
        "router_proj": router,
        "expert_scale": r.uniform(0.5, 1.5, e).astype(np.float32),
        "banks": banks,
    }


def moe_layer(x, params, top_k, dispatch):
    normed = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
    top_p, top_i = moe.route(
        normed, params["router_scale"], params["router_proj"], top_k
    )
    return moe.experts(
        normed, top_p, top_i, params["banks"], params["expert_scale"], dispatch
    )


def compare(params, tokens, top_k, kernels, tol=TOL):
    """Routed == dense: values and input gradients. The weights go in as
    arguments (as in the train step), not as constants XLA would copy."""
    d = params["router_proj"].shape[0]
    x = np.random.default_rng(7).standard_normal((tokens, d)).astype(np.float32)
    weights = np.random.default_rng(8).standard_normal(d).astype(np.float32)

    @functools.partial(jax.jit, static_argnums=2)
    def run(v, p, dispatch):
        def total(v):
            y = moe_layer(v, p, top_k, dispatch)
            return (y * weights).sum(), y

        (_, y), g = jax.value_and_grad(total, has_aux=True)(v)
        return y, g

    y_dense, g_dense = run(x, params, "dense")
    for kernel in kernels:
        y, g = run(x, params, kernel)
        print(
            f"{kernel}: values {rel(y, y_dense):.2e}, input grad {rel(g, g_dense):.2e}"
        )
        assert rel(y, y_dense) < tol
        assert rel(g, g_dense) < tol
    return x


def expert_use(x, params, top_k):
    """Tokens per expert, and how many tokens' top-k split a tied triple."""
    normed = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
    _, top_i = moe.route(normed, params["router_scale"], params["router_proj"], top_k)
    top_i = np.asarray(top_i)
    used = np.bincount(top_i.ravel(), minlength=params["expert_scale"].shape[0])
    split = sum(
        any(0 < n < 3 for n in np.bincount(row // 3)) for row in top_i
    )  # a triple partly chosen: its tie broken by index
    return used, split


@pytest.mark.parametrize("ties", [False, True])
def test_small_layer(ties):
    params = layer(24, 128, 48, ties=ties)
    x = compare(params, 40, 4, KERNELS)
    used, split = expert_use(x, params, 4)
    print(f"tokens per expert {used.tolist()}, tied top-4 splits {split}")
    if ties:  # every top-4 splits a triple; the zero columns tie as well
        # zero columns (18..23) tie at logit 0: at most 4 are picked, the
        # lowest first, so experts 22 and 23 never get a token.
        assert split == 40 and (used[22:] == 0).all()


def test_small_layer_nf4():
    params = layer(16, 128, 64, nf4=True)
    compare(params, 40, 4, ("blocks", "ragged"))


# Float32 weights at 26B-A4B's widths (128 experts, d 2816, f 704, top 8):
# 3 GiB of banks and ~0.6 TFLOP of dense expert matmuls for values and
# gradients of 128 tokens: too slow for the default suite.
@pytest.mark.slow
def test_real_width_layer_with_ties_and_idle_experts():
    params = layer(128, 2816, 704, ties=True)
    x = compare(params, 128, 8, ("blocks",))
    used, split = expert_use(x, params, 8)
    print(f"experts with no token {(used == 0).sum()}, tied top-8 splits {split}")
    assert (used[104:] == 0).all() and (used > 0).sum() > 30
    assert split == 128


def test_nf4_routed_step_holds_no_dequantised_bank():
    """The routed NF4 step dequantises one expert per block, in the backward
    pass again: its temporaries do not grow with the number of experts and
    stay below one float32 bank; the dense step's hold the three banks it
    dequantises (measured when written, 64 tokens: routed 6.5 / 6.1 MiB at
    32 / 64 experts, dense 62 / 124 MiB, one bank 16 / 32 MiB)."""
    d, f, tokens = 512, 256, 64
    x = jax.ShapeDtypeStruct((tokens, d), jnp.float32)

    def temp(experts, dispatch):
        params = layer(experts, d, f, nf4=True)
        specs = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params
        )

        def loss(v, p):  # the bank is an argument, as in the train step
            return moe_layer(v, p, 4, dispatch).sum()

        compiled = jax.jit(jax.grad(loss)).lower(x, specs).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    for experts in (32, 64):
        bank = experts * d * f * 4
        routed, dense = temp(experts, "blocks"), temp(experts, "dense")
        print(
            f"{experts} experts: temp bytes routed {routed / 2**20:.2f} MiB, "
            f"dense {dense / 2**20:.2f} MiB, one float32 bank {bank / 2**20:.2f} MiB"
        )
        assert routed < 8 * 2**20  # activations of 64 tokens only
        assert dense > 3 * bank


# --- the router ----------------------------------------------------------------


def test_router_is_frozen():
    """The router (scale, projection, per-expert scale) is no trainable
    variable, with or without expert LoRA: no gradient, not in the optimizer."""
    m = tiny_model("none", EXPERT_LORA)
    trainable = [v.path for v in m.trainable_variables]
    assert trainable and all("lora" in p for p in trainable)
    held = [
        m.blocks[0].extra[n] for n in ("router_scale", "router_proj", "expert_scale")
    ]
    assert all(not v.trainable for v in held)


@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_equals_transformers(masked):
    """`moe.load_balancing_loss` over layers == transformers'
    `load_balancing_loss_func` (the Mixtral / Switch form) on the same
    router logits, with and without a padding mask; the per-expert loads
    are the top-k picks per row."""
    torch = pytest.importorskip("torch")
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    r = np.random.default_rng(4)
    e, k, batch_, seq = 8, 2, 2, 12
    logits = [r.standard_normal((batch_ * seq, e)).astype(np.float32) for _ in range(3)]
    mask = (np.arange(seq)[None] < np.array([[12], [7]])).astype(np.int64)
    flat = mask.reshape(-1) if masked else None
    stats = [moe.router_stats(jnp.asarray(g), k, flat) for g in logits]
    ours = float(moe.load_balancing_loss(stats))
    theirs = float(
        mixtral.load_balancing_loss_func(
            tuple(torch.tensor(g) for g in logits),
            e,
            k,
            torch.tensor(mask) if masked else None,
        )
    )
    print(f"masked={masked}: ours {ours:.6f} transformers {theirs:.6f}")
    assert abs(ours - theirs) <= 1e-6 * abs(theirs)
    loads = sum(s[0] for s in stats) / sum(s[2] for s in stats)
    assert abs(float(loads.sum()) - k) < 1e-5  # k picks per routed row


# --- on a data-parallel mesh --------------------------------------------------

MESH_SCRIPT = textwrap.dedent("""
    import json, sys
    import gemma4_keras
    import jax, keras
    import numpy as np
    from gemma4_keras import config_lib
    from gemma4_keras.model import gemma4_lora_model, lora, moe, schema
    from gemma4_keras.testing import variants

    assert jax.device_count() == 4, jax.devices()
    ids = np.random.default_rng(0).integers(4, 1024, size=(4, 24))
    data = {
        "token_ids": ids,
        "positions": np.tile(np.arange(24), (4, 1)),
        "segment_ids": np.ones((4, 24), np.int32),
        "target_ids": np.roll(ids, -1, axis=1),
        "loss_weights": np.ones(ids.shape, np.float32),
        "loss_norm": np.array([ids.size], np.float32),
    }
    targets = config_lib.LORA_TARGETS + schema.EXPERT_TARGETS
    shards = []
    per_shard = moe.per_shard

    def counted(*args, **kwargs):
        shards.append(1)
        return per_shard(*args, **kwargs)

    moe.per_shard = counted

    def loss_and_grads(dispatch, token_chunk, dist=None):
        keras.distribution.set_distribution(dist)
        m = gemma4_lora_model.Gemma4LoraModel.from_backbone(
            variants.backbone("moe"), lora.LoraSpec(rank=4, targets=targets),
            quant="nf4", dtype="float32")
        r = np.random.default_rng(3)
        for a in m.adapters().values():
            a.lora_b.assign(r.normal(0, 0.05, a.lora_b.shape).astype(np.float32))
        m.set_moe(dispatch, token_chunk)
        x = dict(data)
        if dist is not None:
            for k, v in data.items():
                if k != "loss_norm":
                    x[k] = keras.distribution.distribute_tensor(
                        v, dist.get_data_layout(v.shape))

        def loss_fn(tv, ntv, x):
            hidden, _ = m.stateless_call(tv, ntv, x, training=False)
            return m.compute_loss(x=x, y_pred=hidden)

        tv = [v.value for v in m.trainable_variables]
        ntv = [v.value for v in m.non_trainable_variables]
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(tv, ntv, x)
        return float(loss), [np.asarray(g) for g in grads]

    one, one_grads = loss_and_grads("dense", 0)
    assert not shards
    out = {"one": one, "mesh": {}}
    data_parallel = keras.distribution.DataParallel(devices=jax.devices())
    for chunk in (0, 16):
        loss, grads = loss_and_grads("auto", chunk, data_parallel)
        err = max(float(np.abs(a - b).max() / np.abs(b).max())
                  for a, b in zip(grads, one_grads))
        out["mesh"][chunk] = [loss, err, len(shards)]
    json.dump(out, open(sys.argv[1], "w"))
""")


@pytest.mark.slow  # three compiled steps of the tiny model, one over 4 fake devices
def test_data_parallel_mesh_routes_each_devices_tokens(tmp_path):
    """On a data-parallel mesh (every device holds every expert) `auto`
    routes: each device sorts and multiplies its own tokens (`moe.per_shard`,
    `jax.shard_map`). NF4 banks with expert LoRA, with and without token
    chunks: the loss and every adapter gradient equal one device's dense
    dispatch."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    out = tmp_path / "mesh.json"
    r = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    facts = json.loads(out.read_text())
    calls = 0
    for chunk, (loss, grad_err, shards) in facts["mesh"].items():
        assert loss == pytest.approx(facts["one"], rel=TOL), chunk
        assert grad_err < 1e-4, (chunk, grad_err)
        assert shards > calls, chunk  # per_shard ran (once per MoE layer)
        calls = shards
