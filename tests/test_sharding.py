"""Layouts of every big array on a (batch, model) mesh, and `plan` per device.

(a) the layout table at the released widths: under mode=model (2, 4 or 8
    devices on the model axis) no array over 1 MiB of any size, quantised
    or not, stays replicated (from `plan.training_variables`, no memory);
(b) `plan.training_variables` lists exactly the variables a built model
    has (paths of every split array, shapes, dtypes) for every quant mode;
(c) on a 2 x 4 fake-device CPU mesh, a QLoRA (NF4 + double quant) model with
    MoE expert banks and per-layer embeddings gives the loss and adapter
    gradients of one device (rel < 1e-5), no array over the (scaled)
    threshold is fully replicated, and each device holds exactly `plan`'s
    per-device bytes. (`test_distributed.py` trains whole runs on a mesh.)
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gemma4_keras.model import hub, plan, sharding
from gemma4_keras.model.gemma4_lora_model import Gemma4LoraModel
from gemma4_keras.model.lora import LoraSpec
from gemma4_keras.testing import full_size, tiny, variants

QUANTS = [
    ("none", False),
    ("nf4", False),
    ("nf4", True),
    ("int8", False),
    ("int4", False),
]


def test_rules_split_the_named_dimension_when_it_divides():
    assert sharding.model_dim("block_3_q_proj/kernel", (5376, 8192), 2) == 1
    assert sharding.model_dim("block_3_o_proj/kernel", (8192, 5376), 2) == 0
    assert sharding.model_dim("block_3_q_proj/kernel_scale", (1, 8192), 2) == 1
    assert sharding.model_dim("block_3_o_proj/kernel_scale", (5376,), 2) is None
    assert sharding.model_dim("block_3_down_proj/kernel_zero", (168, 5376), 2) == 0
    assert sharding.model_dim("block_3_down_proj/g_idx", (21504,), 2) == 0
    assert sharding.model_dim("block_0_experts_up/packed", (128, 991232), 8) == 0
    assert sharding.model_dim("block_0/experts_up", (128, 2816, 704), 8) == 0
    assert sharding.model_dim("gemma4_lora_model/embedding", (262144, 5376), 8) == 0
    assert sharding.model_dim("block_1/router_proj", (2816, 128), 2) is None
    assert sharding.model_dim("block_1/pre_attn", (2816,), 2) is None
    # Does not divide: replicated, never an error.
    assert sharding.model_dim("block_0/experts_up", (6, 64, 32), 4) is None
    # NF4: split only at whole 64-value blocks and whole 256-groups of scales.
    assert sharding.model_dim("block_0_q_proj_nf4/packed", (64 * 4,), 4) == 0
    assert sharding.model_dim("block_0_q_proj_nf4/packed", (16 * 4,), 4) is None
    assert sharding.model_dim("block_0_q_proj_nf4/absmax_codes", (1024,), 4) == 0
    assert sharding.model_dim("block_0_q_proj_nf4/absmax_codes", (512,), 4) is None
    assert sharding.model_dim("block_0_q_proj_nf4/absmax_scales", (8,), 4) is None
    assert sharding.axes("block_0_up_proj/kernel", (8, 16), 4) == (None, "model")
    assert (
        sharding.per_device_bytes([("gemma4_lora_model/embedding", (8, 2), 4)], 4) == 16
    )


def _released(size):
    kw = hub.backbone_kwargs(full_size.released_config(size))
    return hub.spec_from_config(kw)


@pytest.mark.parametrize("size", full_size.SIZES)
def test_no_array_over_1_mib_is_replicated_at_released_widths(size):
    spec = _released(size)
    lora = LoraSpec(rank=16)
    for mode, dq, embedding in [(*q, "none") for q in QUANTS] + [("nf4", True, "int8")]:
        q = {"mode": mode, "double_quant": dq, "block_size": 64, "embedding": embedding}
        variables = plan.training_variables(spec, q, 2, lora)
        for model_size in (2, 4, 8):
            replicated = [
                (path, shape)
                for path, shape, itemsize in variables
                if math.prod(shape) * itemsize > 2**20
                and sharding.model_dim(path, shape, model_size) is None
            ]
            assert not replicated, (mode, dq, model_size, replicated[:3])


def _kind(path: str) -> str:
    """Placeholder names of replicated variables differ; their shapes do not."""
    return path if sharding.rule_dim(path) is not None else "replicated"


@pytest.fixture(scope="module")
def backbone():
    return variants.backbone("all")


# int8 is left out: its variables are int4's less two (and Keras' int8
# quantisation of the tiny model takes 13 s); test_plan checks its bytes.
@pytest.mark.parametrize(
    "mode,dq,embedding",
    [
        pytest.param(*q, "none", marks=pytest.mark.slow)
        if q[0] == "int4"
        else (*q, "none")
        for q in QUANTS
        if q[0] != "int8"
    ]
    + [("nf4", True, "int8")],  # quant.embedding=int8: values + row scales
)
def test_plan_lists_the_variables_of_the_built_model(backbone, mode, dq, embedding):
    kw = backbone.get_config()
    spec = hub.spec_from_config(kw)
    lora = LoraSpec(rank=4, targets=("q_proj", "k_proj", "v_proj", "down_proj"))
    model = Gemma4LoraModel.from_backbone(
        backbone,
        lora,
        quant=mode,
        double_quant=dq,
        dtype="float32",
        embedding_quant=embedding,
    )
    real = sorted(
        (_kind(v.path), tuple(v.shape), np.dtype(v.dtype).itemsize)
        for v in model.variables
        if "seed" not in v.path
    )
    q = {"mode": mode, "double_quant": dq, "block_size": 64, "embedding": embedding}
    listed = sorted(
        (_kind(p), tuple(s), i) for p, s, i in plan.training_variables(spec, q, 4, lora)
    )
    assert listed == real


def test_accelerator_names():
    assert plan.accelerator("T4")[1:] == ("NVIDIA T4 16 GB", 16e9, 1)
    assert plan.accelerator("2xt4")[3] == 2
    assert plan.accelerator("v5e-8")[0::3] == ("v5e", 8)
    assert plan.accelerator("h200")[2] == 141e9
    with pytest.raises(Exception, match="--accelerator='k80' is not known"):
        plan.accelerator("k80")


# ----------------------------------------------------------------------------
# A 2 x 4 fake-device mesh.

# Wider than the tiny model, so the arrays that carry the model (embedding,
# PLE table, NF4 projections, expert banks) exceed THRESHOLD while those
# the layouts replicate by design (norms, router, LoRA A of column layers,
# NF4 256-group scales) stay under it, as 1 MiB separates them at the
# released widths (test above).
WIDE = dict(
    num_hidden_layers=2,
    layer_types=["sliding_attention", "full_attention"],
    hidden_size=256, intermediate_size=512, head_dim=64, global_head_dim=128,
    num_experts=8, moe_intermediate_size=128, top_k_experts=2,
)  # fmt: skip
THRESHOLD = 32 << 10

SCRIPT = textwrap.dedent("""
    import json, sys
    import gemma4_keras
    import jax, keras
    import numpy as np
    from gemma4_keras import config_lib
    from gemma4_keras.model import plan, presets
    from gemma4_keras.training import distributed

    out, ckpt = sys.argv[1], sys.argv[2]
    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    b, t = 2, 32
    batch = {
        "token_ids": rng.integers(3, 1000, (b, t)).astype("int32"),
        "positions": np.tile(np.arange(t, dtype="int32"), (b, 1)),
        "segment_ids": np.ones((b, t), "int32"),
        "target_ids": rng.integers(3, 1000, (b, t)).astype("int32"),
        "loss_weights": np.ones((b, t), "float32"),
        "loss_norm": np.full((1,), b * t, "float32"),
    }

    def loss_and_grads(mode, embedding="none"):
        c = config_lib.get_config("tiny", "qlora", "runlocal")
        c.model.preset, c.model.dtype = ckpt, "float32"
        c.quant.embedding = embedding
        c.distribution.mode, c.distribution.model_parallel = mode, 4
        c.lora.dropout = 0.0
        # The dispatch `auto` runs on a mesh (model/moe.py), on both sides:
        # one device would otherwise route (blocks), a different computation
        # with other temporaries.
        c.model.moe_dispatch = "dense"
        dist = distributed.setup(c.distribution, b)
        model, _, _ = presets.load_training_model(c)
        x = dict(batch)
        if dist is not None:
            for k, v in batch.items():
                if k != "loss_norm":  # rows on the batch axis, as fit feeds them
                    x[k] = keras.distribution.distribute_tensor(
                        v, dist.get_data_layout(v.shape))
        tv = [v.value for v in model.trainable_variables]
        fv = [v.value for v in model.non_trainable_variables]

        def loss(tv, fv, x):
            hidden, _ = model.stateless_call(tv, fv, x, training=False)
            return model.compute_loss(x=x, y_pred=hidden)

        step = jax.jit(jax.value_and_grad(loss)).lower(tv, fv, x).compile()
        m = step.memory_analysis()  # per device
        value, grads = step(tv, fv, x)
        mem = [m.argument_size_in_bytes, m.temp_size_in_bytes]
        return c, model, float(value), [np.asarray(g) for g in grads], mem

    _, _, one_loss, one_grads, one_mem = loss_and_grads("none")
    c, model, mesh_loss, mesh_grads, mesh_mem = loss_and_grads("model")
    grad_err = max(
        float(np.abs(a - g).max() / (np.abs(a).max() + 1e-30))
        for a, g in zip(one_grads, mesh_grads)
    )
    def layout(model):
        return [
            {
                "path": v.path,
                "nbytes": v.value.nbytes,
                "replicated": v.value.sharding.is_fully_replicated,
                "per_device": sorted(
                    {s.data.nbytes for s in v.value.addressable_shards}),
                "devices": len(v.value.addressable_shards),
            }
            for v in model.variables
            if "seed" not in v.path
        ]

    rows, p = layout(model), plan.plan(c, devices=8)
    # The int8 tied embedding (quant.embedding=int8): values and row scales
    # split by row, its vocabulary tiles read on the mesh.
    _, _, int8_loss, int8_grads, _ = loss_and_grads("none", "int8")
    c8, int8_model, int8_mesh_loss, int8_mesh_grads, _ = loss_and_grads("model", "int8")
    int8_grad_err = max(
        float(np.abs(a - g).max() / (np.abs(a).max() + 1e-30))
        for a, g in zip(int8_grads, int8_mesh_grads)
    )
    # Keras' int4 Dense kernels and scales, placed by the same rules.
    c.quant.mode = "int4"
    int4 = presets.load_training_model(c)[0]
    json.dump({"vars": rows, "plan": p["per_device"], "mesh": p["mesh"],
               "int4": layout(int4), "int4_plan": plan.plan(c, devices=8)["per_device"],
               "losses": [one_loss, mesh_loss], "grad_err": grad_err,
               "int8": layout(int8_model),
               "int8_plan": plan.plan(c8, devices=8)["per_device"],
               "int8_losses": [int8_loss, int8_mesh_loss],
               "int8_grad_err": int8_grad_err,
               "xla_bytes": [one_mem, mesh_mem]},
              open(f"{out}/layout.json", "w"))
""")


# Four compiled value_and_grad steps (float and int8 embedding), two over 8
# fake devices.
@pytest.mark.slow
def test_qlora_moe_ple_on_a_2x4_mesh(tmp_path):
    ckpt = tiny.write_checkpoint(
        tmp_path / "ckpt", tiny.tiny_hf_config(ple=True, moe=True, **WIDE)
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), str(ckpt)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    facts = json.loads((tmp_path / "layout.json").read_text())
    one, mesh = facts["losses"]
    assert mesh == pytest.approx(one, rel=1e-5)
    # Sums over a split contraction add in another order: float32 rounding.
    assert facts["grad_err"] < 1e-4
    # XLA's own figures for the compiled step, per device: the NF4 codes are
    # dequantised shard by shard (no device gathers a whole base), so its
    # arguments and temporaries shrink with the mesh too.
    (one_args, one_temp), (mesh_args, mesh_temp) = facts["xla_bytes"]
    assert mesh_args < one_args / 3 and mesh_temp < one_temp / 3
    assert facts["mesh"] == {"mode": "model", "devices": 8, "data": 2, "model": 4}
    rows = facts["vars"]
    assert all(r["devices"] == 8 and len(r["per_device"]) == 1 for r in rows)
    big_replicated = [
        r["path"] for r in rows if r["nbytes"] > THRESHOLD and r["replicated"]
    ]
    assert not big_replicated
    split = {r["path"] for r in rows if not r["replicated"]}
    for path in (
        "gemma4_lora_model/embedding",
        "gemma4_lora_model/ple_embedding",
        "block_0_gate_proj_nf4/packed",
        "block_0_gate_proj_nf4/absmax_codes",
        "block_1_q_proj_nf4/packed",
        "block_0_experts_gate/packed",
        "block_0_experts_down/absmax_offset",
    ):
        assert path in split, path
    one8, mesh8 = facts["int8_losses"]
    assert mesh8 == pytest.approx(one8, rel=1e-5) and facts["int8_grad_err"] < 1e-4
    int8 = {r["path"]: r for r in facts["int8"]}
    for path in ("gemma4_lora_model/embedding", "gemma4_lora_model/embedding_scale"):
        assert not int8[path]["replicated"], path
    placed = (
        (rows, facts["plan"]),
        (facts["int4"], facts["int4_plan"]),
        (facts["int8"], facts["int8_plan"]),
    )
    for variables, estimate in placed:
        held = sum(r["per_device"][0] for r in variables)
        assert held == estimate["base"] + estimate["adapters"]
        assert held < sum(r["nbytes"] for r in variables) / 2
    int4 = {r["path"]: r for r in facts["int4"]}
    for path in ("block_0_up_proj/kernel", "block_0_up_proj/kernel_scale",
                 "block_0_up_proj/kernel_zero", "block_0_down_proj/kernel"):  # fmt: skip
        assert not int4[path]["replicated"], path
