"""Temp memory of the compiled LoRA train step with and without `model.remat`.

Run:
    python benchmarks/remat_memory.py                  # 8 layers, d=512, seq 1024
    python benchmarks/remat_memory.py --layers 4 --seq 512

Writes a Gemma 4-architecture checkpoint of the given size (random weights,
the tiny model's tokenizer) to a temp dir, loads it through KerasHub into a
`Gemma4LoraModel`, and compiles `jit(value_and_grad(loss wrt adapters))` built
from `model.stateless_call` + `model.compute_loss` for batch 1. Prints XLA's
`memory_analysis().temp_size_in_bytes` both ways and the ratio.
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
# Keras reads the backend once, at its first import (keras_hub imports it).
os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

import gemma4_keras  # noqa: E402,F401  (selects the JAX backend before keras loads)
from gemma4_keras.model.gemma4_lora_model import Gemma4LoraModel  # noqa: E402
from gemma4_keras.model.lora import LoraSpec
from gemma4_keras.testing import tiny  # noqa: E402


def write_checkpoint(path: str, layers: int, dim: int) -> None:
    types = ["sliding_attention"] * (layers - 1) + ["full_attention"]
    config = tiny.tiny_hf_config(
        hidden_size=dim,
        intermediate_size=4 * dim,
        num_hidden_layers=layers,
        layer_types=types,
        head_dim=dim // 8,
        global_head_dim=dim // 4,
    )
    tiny.write_checkpoint(path, config)


def temp_bytes(backbone, remat: bool, seq: int) -> tuple[int, int]:
    model = Gemma4LoraModel.from_backbone(
        backbone, LoraSpec(rank=16, alpha=32.0), remat=remat
    )
    batch = {
        "token_ids": np.ones((1, seq), "int32"),
        "positions": np.arange(seq)[None].astype("int32"),
        "segment_ids": np.ones((1, seq), "int32"),
        "target_ids": np.ones((1, seq), "int32"),
        "loss_weights": np.ones((1, seq), "float32"),
        "loss_norm": np.full((1,), seq, "float32"),
    }
    trainable = [v.value for v in model.trainable_variables]
    frozen = [v.value for v in model.non_trainable_variables]

    def loss(tv, ntv, x):
        hidden, _ = model.stateless_call(tv, ntv, x, training=False)
        return model.compute_loss(x=x, y_pred=hidden)

    x = {k: jnp.asarray(v) for k, v in batch.items()}
    step = jax.jit(jax.value_and_grad(loss))
    compiled = step.lower(trainable, frozen, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes, residual_bytes(
        loss, trainable, frozen, x
    )


def residual_bytes(loss, trainable, frozen, x) -> int:
    """Bytes the backward pass keeps from the forward (vjp residuals, traced only).

    Hardware-independent: XLA's CPU pipeline expands the optimisation
    barriers that keep rematerialised values from being merged back, so on
    CPU `memory_analysis()` shows the same temp with or without remat; the
    residuals are what a GPU/TPU step holds between forward and backward.
    """

    def residuals(tv):
        _, vjp_fn = jax.vjp(lambda t: loss(t, frozen, x), tv)
        return jax.tree.leaves(vjp_fn)

    shapes = jax.eval_shape(residuals, trainable)
    return int(sum(np.prod(s.shape) * s.dtype.itemsize for s in shapes))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--seq", type=int, default=1024)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        write_checkpoint(d, a.layers, a.dim)
        backbone = keras_hub.models.Gemma4Backbone.from_preset(d, dtype="float32")
        off, on = temp_bytes(backbone, False, a.seq), temp_bytes(backbone, True, a.seq)
    mib = 1024**2
    print(f"layers={a.layers} d={a.dim} seq={a.seq} backend={jax.default_backend()}")
    print(f"XLA temp bytes without remat: {off[0]:,} ({off[0] / mib:.1f} MiB)")
    print(f"XLA temp bytes with remat:    {on[0]:,} ({on[0] / mib:.1f} MiB)")
    print(
        f"  ratio: {on[0] / off[0]:.3f} (CPU expands remat barriers; see residual_bytes)"
    )
    print(f"residuals without remat:      {off[1]:,} ({off[1] / mib:.1f} MiB)")
    print(f"residuals with remat:         {on[1]:,} ({on[1] / mib:.1f} MiB)")
    print(f"  ratio: {on[1] / off[1]:.3f}")


if __name__ == "__main__":
    main()
