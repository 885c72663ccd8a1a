"""Device mesh and layouts for Gemma 4 over many devices (JAX SPMD via Keras).

`config.distribution.mode`:

* `none`: one device (the default on a single-device host).
* `data`: data parallel over every device (`keras.distribution.DataParallel`);
  each device holds the whole (possibly NF4) base and the adapters.
* `model`: a 2-D mesh `(batch, model)` with `distribution.model_parallel`
  devices on the model axis (`keras.distribution.ModelParallel`). The frozen
  base is split Megatron-style: column-parallel q/k/v/gate/up (output dim on
  `model`), row-parallel o/down (input dim on `model`), the embedding by
  vocabulary; LoRA factors follow their kernel (B of a column-parallel layer
  by columns, A of a row-parallel layer by rows) so no adapter is gathered.
* `auto`: `data` when there is more than one device, else `none`.

Multi-host (TPU pods, multi-node GPU): `setup` calls
`jax.distributed.initialize()` when the environment names a coordinator
(TPU pods are detected by JAX itself); every host then runs the same
command. Call `setup` before any model is built: Keras places variables
when they are created.
"""

from __future__ import annotations

import os

import jax
import keras
from absl import logging

from gemma4_keras import config_lib

MODES = ("auto", "none", "data", "model")

# Variable path regex -> layout over mesh axes (None = replicated dim).
_COLUMN = r"(q_proj|k_proj|v_proj|gate_proj|up_proj)"
_ROW = r"(o_proj|down_proj)"
LAYOUT_RULES = (
    (rf"block_\d+_{_COLUMN}/kernel$", (None, "model")),
    (rf"block_\d+_{_ROW}/kernel$", ("model", None)),
    (rf"lora_.*_layers_\d+_{_COLUMN}/lora_b$", (None, "model")),
    (rf"lora_.*_layers_\d+_{_ROW}/lora_a$", ("model", None)),
    (r"gemma4_lora_model/embedding$", ("model", None)),
)


def maybe_initialize_multihost() -> None:
    """`jax.distributed.initialize()` when a coordinator is configured."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get(
        "COORDINATOR_ADDRESS"
    ):
        jax.distributed.initialize()
        logging.info(
            "multi-host: process %d of %d", jax.process_index(), jax.process_count()
        )


def resolve_mode(dist_cfg) -> str:
    mode = dist_cfg.mode
    if mode not in MODES:
        raise config_lib.ConfigError(
            f"--config.distribution.mode={mode!r} must be one of {', '.join(MODES)}"
        )
    if mode == "auto":
        return "data" if jax.device_count() > 1 else "none"
    return mode


def mesh_shape(num_devices: int, model_parallel: int) -> tuple[int, int]:
    """(batch, model) axis sizes for `num_devices`.

    >>> mesh_shape(8, 2)
    (4, 2)
    """
    if model_parallel < 1 or num_devices % model_parallel:
        raise config_lib.ConfigError(
            f"--config.distribution.model_parallel={model_parallel} must divide the "
            f"{num_devices} devices"
        )
    return num_devices // model_parallel, model_parallel


def layout_map(mesh: keras.distribution.DeviceMesh) -> keras.distribution.LayoutMap:
    """The Gemma 4 LoRA layout map (see the module docstring)."""
    layouts = keras.distribution.LayoutMap(mesh)
    for pattern, axes in LAYOUT_RULES:
        layouts[pattern] = axes
    return layouts


def build_distribution(dist_cfg):
    """The Keras distribution for `config.distribution`, or None for one device."""
    mode = resolve_mode(dist_cfg)
    devices = jax.devices()
    if mode == "none":
        return None
    if mode == "data":
        return keras.distribution.DataParallel(devices=devices)
    shape = mesh_shape(len(devices), int(dist_cfg.model_parallel))
    mesh = keras.distribution.DeviceMesh(shape, ["batch", "model"], devices=devices)
    return keras.distribution.ModelParallel(
        layout_map=layout_map(mesh), batch_dim_name="batch"
    )


def setup(dist_cfg, batch_size: int):
    """Initialises multi-host JAX and sets the global Keras distribution.

    Returns the distribution (None on one device). The per-step batch must
    split evenly over the data-parallel devices.
    """
    maybe_initialize_multihost()
    distribution = build_distribution(dist_cfg)
    if distribution is not None:
        data_devices = distribution.device_mesh.shape[0]
        global_batch = batch_size * jax.process_count()
        if global_batch % data_devices:
            raise config_lib.ConfigError(
                f"--config.train.batch_size={batch_size} (x {jax.process_count()} hosts) "
                f"does not split over {data_devices} data-parallel devices"
            )
        logging.info(
            "distribution: %s over mesh %s",
            type(distribution).__name__,
            dict(
                zip(
                    distribution.device_mesh.axis_names,
                    distribution.device_mesh.shape,
                    strict=True,
                )
            ),
        )
    keras.distribution.set_distribution(distribution)
    return distribution
