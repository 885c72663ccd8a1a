"""One layer's weights at a time: the compiled step's temporaries vs depth.

A frozen NF4 kernel's dequantisation depends on the weights alone, so XLA
may compute every layer's float kernel at the start of the step and keep it
until the backward pass; on XLA:CPU it also merged `jax.checkpoint`'s
recomputation with the forward pass (its barriers are removed before the
last CSE). At E2B's size that was 16 GiB of temporaries for a step that
needs about 2. These tests compile the training step of a small NF4 model
at two depths: the temporaries must not grow by a layer's float kernels per
layer (they grew by about three before `quant.nf4_matmul` and
`xla_workarounds.remat`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_keras.model import hub, plan, presets, quant, stream_load, xla_workarounds
from gemma4_keras.model import moe as moe_lib
from gemma4_keras.model.lora import LoraSpec
from gemma4_keras.testing import full_size, tiny

WIDTH, FFN = 256, 1024


def _checkpoint(tmp_path, layers: int, **moe):
    cfg = tiny.tiny_hf_config(
        hidden_size=WIDTH,
        intermediate_size=FFN,
        num_hidden_layers=layers,
        layer_types=["sliding_attention", "full_attention"] * (layers // 2),
        **moe,
    )
    return full_size.write_checkpoint(tmp_path / f"l{layers}", cfg)


def _compiled_loss_step(model, ids, chunk_size: int, training: bool):
    """(compiled value_and_grad of the mean next-token loss of `ids`, tv, ntv)."""
    seq = ids.shape[1]
    data = {
        "token_ids": ids,
        "positions": np.arange(seq, dtype=np.int32)[None],
        "segment_ids": np.ones((1, seq), np.int32),
        "target_ids": np.roll(ids, -1, axis=1),
        "loss_weights": np.ones(ids.shape, np.float32),
        "loss_norm": np.array([seq], np.float32),
    }
    model.loss_chunk_size = chunk_size

    def loss_fn(tv, ntv):
        hidden, _ = model.stateless_call(tv, ntv, data, training=training)
        return model.compute_loss(x=data, y_pred=hidden)

    tv = [v.value for v in model.trainable_variables]
    ntv = [v.value for v in model.non_trainable_variables]
    return jax.jit(jax.value_and_grad(loss_fn)).lower(tv, ntv).compile(), tv, ntv


def _step_temp_bytes(path, remat: bool, seq: int = 32, moe_token_chunk: int = 0) -> int:
    with presets.on_host():
        model = stream_load.stream_training_model(
            path,
            LoraSpec(rank=4, dropout=0.1),
            dtype="float32",
            quant="nf4",
            double_quant=True,
        )
    model.remat = remat
    model.set_moe("auto", moe_token_chunk)
    ids = np.arange(seq, dtype=np.int32)[None] % 50 + 3
    compiled, _, _ = _compiled_loss_step(model, ids, 32, training=True)
    return compiled.memory_analysis().temp_size_in_bytes


def test_rematerialised_step_holds_no_layer_of_float_kernels_per_layer(tmp_path):
    remat = True  # without remat each layer's activations are kept by design
    shallow = _step_temp_bytes(_checkpoint(tmp_path, 2), remat)
    deep = _step_temp_bytes(_checkpoint(tmp_path, 8), remat)
    layer_kernels = 4 * 3 * WIDTH * FFN  # one layer's float32 MLP kernels
    growth = (deep - shallow) / 6
    print(
        f"remat={remat}: temporaries {shallow / 2**20:.2f} MiB (2 layers), "
        f"{deep / 2**20:.2f} MiB (8 layers): {growth / 2**20:.3f} MiB per layer; "
        f"one layer's float32 MLP kernels {layer_kernels / 2**20:.2f} MiB"
    )
    assert growth < 0.5 * layer_kernels


def test_long_rows_keep_one_input_per_layer(tmp_path):
    # At seq 1024 a rematerialised layer must add only its stored input
    # (one float32 [seq, d]) to the step. It added 10: each norm's scale
    # broadcast to [seq, d], shared by the forward and backward passes
    # (`layers.weight_for`); the previous layers' projection outputs, read
    # through the residual stream's fused chain (`xla_workarounds.stored`);
    # the sliding layers' zero-padded keys and the attention chunks' output
    # stacks, created at the start of the step (`attention.chunked_attention`).
    seq = 1024
    shallow = _step_temp_bytes(_checkpoint(tmp_path, 4), True, seq)
    deep = _step_temp_bytes(_checkpoint(tmp_path, 8), True, seq)
    one_input = 4 * seq * WIDTH
    growth = (deep - shallow) / 4
    print(
        f"seq {seq}: temporaries {shallow / 2**20:.2f} MiB (4 layers), "
        f"{deep / 2**20:.2f} MiB (8 layers): {growth / one_input:.2f} inputs "
        "per layer"
    )
    assert growth < 1.5 * one_input  # 10.0 before, 0.99 after


def test_routed_moe_step_holds_no_layer_of_expert_rows_per_layer(tmp_path):
    # The routed kernel's buffers of expert-sorted rows ([rows, d]) were
    # zero-filled scatters and loop stacks: XLA created every layer's at the
    # start of the step (they read only a constant), all alive at once
    # (26B-A4B, 6 layers, seq 4096: 20.5 GiB of temporaries; 5.5 with
    # gathers and tied buffers, docs/real_size.md).
    seq, experts, top_k = 256, 8, 2
    moe = dict(moe=True, num_experts=experts, top_k_experts=top_k)
    shallow = _step_temp_bytes(_checkpoint(tmp_path, 2, **moe), True, seq)
    deep = _step_temp_bytes(_checkpoint(tmp_path, 6, **moe), True, seq)
    rows = moe_lib.expert_rows(seq, top_k, experts, "blocks")
    placed = 4 * rows * WIDTH  # one layer's float32 [rows, d] buffer
    growth = (deep - shallow) / 4
    print(
        f"temporaries {shallow / 2**20:.2f} MiB (2 layers), {deep / 2**20:.2f} "
        f"MiB (6 layers): {growth / 2**20:.3f} MiB per layer; one [rows, d] "
        f"buffer {placed / 2**20:.2f} MiB"
    )
    assert growth < 3 * placed  # 7.1x before, 1.8x after


def test_moe_token_chunks_hold_one_chunk_of_expert_rows(tmp_path):
    # model.moe_token_chunk: the backward pass recomputes one chunk of
    # tokens' expert rows at a time. The step's temporaries must fall by
    # most of what `plan` says the unchunked layer's expert rows hold
    # beyond one chunk's. Experts 512 wide, so that they set the peak:
    # 132.3 MiB, in chunks 106.3 (plan's saving 18.5 MiB); chunks mapped
    # without rematerialisation held 167.3 MiB.
    seq, experts, top_k, chunk = 1024, 8, 2, 256
    moe = dict(
        moe=True, num_experts=experts, top_k_experts=top_k, moe_intermediate_size=512
    )
    path = _checkpoint(tmp_path, 2, **moe)
    whole = _step_temp_bytes(path, True, seq)
    chunked = _step_temp_bytes(path, True, seq, moe_token_chunk=chunk)
    spec = hub.spec_from_config(hub.backbone_kwargs(presets.read_config_json(path)))
    planned = [
        plan.activation_bytes(spec, LoraSpec(rank=4), 1, seq, 4, None, "blocks", c)
        for c in (0, chunk)
    ]
    saving = planned[0]["remat_peak"] - planned[1]["remat_peak"]
    print(
        f"temporaries {whole / 2**20:.2f} MiB, in {chunk}-token chunks "
        f"{chunked / 2**20:.2f} MiB; plan's saving {saving / 2**20:.2f} MiB"
    )
    assert whole - chunked > 0.5 * saving


def test_nf4_matmul_equals_the_dequantised_matmul_with_gradients():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 128)).astype(np.float32)  # HF (out, in)
    q = quant.nf4_quantize(w, double_quant=True)
    x = jnp.asarray(rng.standard_normal((3, 5, 128)).astype(np.float32))
    g = jnp.asarray(rng.standard_normal((3, 5, 96)).astype(np.float32))

    def reference(x):
        return x @ quant.nf4_dequantize(q, x.dtype).T

    y, vjp = jax.vjp(lambda x: quant.nf4_matmul(x, q), x)
    y_ref, vjp_ref = jax.vjp(reference, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    np.testing.assert_allclose(
        np.asarray(vjp(g)[0]), np.asarray(vjp_ref(g)[0]), rtol=1e-6, atol=1e-6
    )


def test_tie_to_keeps_values_and_the_dependency():
    leaves = {"f": jnp.arange(4.0), "i": jnp.arange(4, dtype=jnp.uint8)}
    anchor = jnp.ones((2, 3))
    tied = jax.jit(lambda t, a: xla_workarounds.tie_to(t, a, integers=True))(
        leaves, anchor
    )
    np.testing.assert_array_equal(np.asarray(tied["f"]), np.arange(4.0))
    np.testing.assert_array_equal(np.asarray(tied["i"]), np.arange(4))
    hlo = (
        jax.jit(lambda t, a: xla_workarounds.tie_to(t, a)["f"] * 2)
        .lower(leaves, anchor)
        .compile()
        .as_text()
    )
    entry = hlo[hlo.index("ENTRY") :]
    # The anchor (parameter 1) still feeds the result after XLA's simplifier.
    assert "parameter(1)" in entry and "fusion(" in entry


def test_tie_to_computes_its_zero_once_outside_the_tied_leaf():
    # The tied leaf's consumer must read a scalar, not the anchor's producers:
    # fused there, the anchor's chain (here tanh and a square, in a train step
    # an RMS norm or a gradient's sum of terms) ran once per element of every
    # dequantised kernel (issue 17).
    def fn(leaf, a):
        anchor = jnp.tanh(a) * 3.0 + a * a
        return xla_workarounds.tie_to({"f": leaf}, anchor)["f"] * 2

    hlo = jax.jit(fn).lower(jnp.zeros(4096), jnp.ones((64, 64))).compile().as_text()
    entry = hlo[hlo.index("ENTRY") :]
    (root,) = [line for line in entry.splitlines() if "ROOT" in line]
    operands = root[root.index("fusion(") : root.index(")")]
    shapes = {line.split("=")[0].strip(): line.split("=")[1].split()[0]
              for line in entry.splitlines() if "=" in line}  # fmt: skip
    operand_shapes = [shapes[name.strip()] for name in operands[7:].split(",")]
    assert sorted(operand_shapes) == ["f32[4096]{0}", "f32[]"], (root, operand_shapes)


def _ple_loss_and_grads(ple_on_host: bool):
    path = tiny.tiny_checkpoint(ple=True, kv_shared_layers=2)
    with presets.on_host():
        model = stream_load.stream_training_model(
            path, LoraSpec(rank=4), dtype="float32", ple_on_host=ple_on_host
        )
    for i, a in enumerate(model.adapters().values()):  # a non-zero adapter
        r = np.random.default_rng(i)
        a.lora_b.assign(r.normal(0, 0.05, a.lora_b.shape).astype(np.float32))
    ids = (np.arange(24, dtype=np.int32)[None] * 7) % 200 + 3
    step, tv, ntv = _compiled_loss_step(model, ids, 8, training=False)
    value, grads = step(tv, ntv)
    table = model.globals["ple_embedding"]
    return value, grads, step.memory_analysis().argument_size_in_bytes, table


def test_ple_table_on_host_gives_the_same_loss_and_gradients():
    on_value, on_grads, on_args, table = _ple_loss_and_grads(True)
    off_value, off_grads, off_args, _ = _ple_loss_and_grads(False)
    assert float(on_value) == float(off_value)
    for a, b in zip(on_grads, off_grads, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The compiled step no longer takes the table as an argument.
    assert off_args - on_args == table.array.nbytes
