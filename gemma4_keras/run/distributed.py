"""Device mesh and layouts for Gemma 4 over many devices (JAX SPMD via Keras).

`config.distribution.mode`:

* `none`: one device (the default on a single-device host).
* `data`: data parallel over every device (`keras.distribution.DataParallel`);
  each device holds the whole (possibly NF4) base and the adapters.
* `model`: a 2-D mesh `(batch, model)` with `distribution.model_parallel`
  devices on the model axis (`keras.distribution.ModelParallel`). Every big
  array is split (`model/sharding.py` holds the table, which `plan` counts
  with): float and int8/int4 kernels Megatron-style (column-parallel
  q/k/v/gate/up by output, row-parallel o/down by input, their scales with
  their columns), NF4 kernels along output features in whole blocks, MoE
  expert banks by expert (expert parallelism), the embedding and the
  per-layer-embedding table by vocabulary, the PLE projections by columns /
  rows; LoRA factors follow their kernel (B of a column-parallel layer by
  columns, A of a row-parallel layer by rows) so no adapter is gathered.
  A dimension the model axis does not divide stays replicated.
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
from gemma4_keras.model import sharding

MODES = ("auto", "none", "data", "model")

# Variable path regex -> the dimension split over `model` (see model/sharding.py).
LAYOUT_RULES = sharding.LAYOUT_RULES
mesh_shape = sharding.mesh_shape


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


def layout_map(mesh: keras.distribution.DeviceMesh) -> keras.distribution.LayoutMap:
    """An empty layout map: variables are laid out by `LoraModelParallel`
    from their path and shape; intermediate tensors are left to XLA."""
    return keras.distribution.LayoutMap(mesh)


class LoraModelParallel(keras.distribution.ModelParallel):
    """`ModelParallel` whose variable layouts come from `sharding.axes`.

    Keras' `LayoutMap` sees only a variable's path; the rules here also need
    its shape (a rank-agnostic split dimension, replication where the model
    axis does not divide it, NF4 block alignment).
    """

    def get_variable_layout(self, variable):
        if getattr(variable, "_layout", None) is not None:
            return variable._layout
        mesh = self.device_mesh
        model_size = mesh.shape[mesh.axis_names.index(sharding.MODEL_AXIS)]
        spec = sharding.axes(variable.path, tuple(variable.shape), model_size)
        return keras.distribution.TensorLayout(list(spec), mesh)


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
    return LoraModelParallel(layout_map=layout_map(mesh), batch_dim_name="batch")


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
