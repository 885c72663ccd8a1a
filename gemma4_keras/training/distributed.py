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

Multi-host (TPU pods, multi-node GPU): every process runs the same command;
`initialize` (first thing in the CLI and in `run`, before anything touches
JAX) joins them when the environment names a coordinator:

    JAX_COORDINATOR_ADDRESS=host:port  JAX_NUM_PROCESSES=N  JAX_PROCESS_ID=i
    JAX_LOCAL_DEVICE_IDS=0,1   (optional: this process's accelerators)
    GEMMA4_DISTRIBUTED=auto    (no address: JAX's own cluster detection, e.g.
                                on TPU pod slices, SLURM, Open MPI)

`train.batch_size` is the global batch: each process feeds only the rows of
it that its own devices hold (`process_rows`). Call `setup` before any model
is built: Keras places variables when they are created.
"""

from __future__ import annotations

import contextlib
import os

import jax
import keras
import numpy as np
from absl import logging

from gemma4_keras import config_lib
from gemma4_keras.model import sharding

MODES = ("auto", "none", "data", "model")
_MULTIHOST_SEED = 1234  # any value, the same on every process

# Variable path regex -> the dimension split over `model` (see model/sharding.py).
LAYOUT_RULES = sharding.LAYOUT_RULES
mesh_shape = sharding.mesh_shape


def initialize() -> None:
    """Joins the other processes of a multi-host run (see the module docstring).

    Does nothing without a coordinator in the environment, or when already
    joined. Must run before anything queries JAX devices: JAX refuses to
    join once its backend has started.

    Raises:
      ConfigError: a malformed JAX_NUM_PROCESSES / JAX_PROCESS_ID.
    """
    address = os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get(
        "COORDINATOR_ADDRESS"
    )
    auto = os.environ.get("GEMMA4_DISTRIBUTED", "") == "auto"
    if not (address or auto) or jax.distributed.is_initialized():
        return
    count = _env_int("JAX_NUM_PROCESSES")
    index = _env_int("JAX_PROCESS_ID")
    explicit = address and count is not None and index is not None
    if explicit and not 0 <= index < count:
        raise config_lib.ConfigError(
            f"JAX_PROCESS_ID={index} must be in [0, JAX_NUM_PROCESSES={count})"
        )
    jax.distributed.initialize(
        coordinator_address=address or None,
        num_processes=count,
        process_id=index,
        # Everything given: no cluster guessing (SLURM detection would also
        # pin one device per process, wrong for one process per node).
        cluster_detection_method="deactivate" if explicit else None,
    )
    logging.info(
        "multi-host: process %d of %d", jax.process_index(), jax.process_count()
    )


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise config_lib.ConfigError(
            f"environment variable {name}={value!r} must be an integer"
        ) from None


def is_writer() -> bool:
    """True on the one process that writes files (process 0)."""
    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """True when `flag` is True on any process (one tiny exchange per call)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils  # reason: multi-host only

    return bool(np.any(multihost_utils.process_allgather(np.array([bool(flag)]))))


def barrier(name: str) -> None:
    """Waits until every process reaches `name` (no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # reason: multi-host only

        multihost_utils.sync_global_devices(name)


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
    # The batch streams are already per process (`process_rows`): Keras must
    # not shard them again (it could only shard a tf.data.Dataset anyway).
    if mode == "data":
        return keras.distribution.DataParallel(
            devices=devices, auto_shard_dataset=False
        )
    shape = mesh_shape(len(devices), int(dist_cfg.model_parallel))
    mesh = keras.distribution.DeviceMesh(shape, ["batch", "model"], devices=devices)
    return LoraModelParallel(
        layout_map=layout_map(mesh), batch_dim_name="batch", auto_shard_dataset=False
    )


def setup(dist_cfg, batch_size: int):
    """Initialises multi-host JAX and sets the global Keras distribution.

    `batch_size` is the global batch (all processes together); it must split
    evenly over the data-parallel devices. Returns the distribution (None on
    one device).
    """
    initialize()
    if jax.process_count() > 1:
        # Every process creates each variable and puts it on the global mesh,
        # which JAX allows only for equal values: initialisers without a seed
        # (whose values loaded weights then replace) must draw alike.
        keras.utils.set_random_seed(_MULTIHOST_SEED)
    distribution = build_distribution(dist_cfg)
    if distribution is not None:
        data_devices = distribution.device_mesh.shape[0]
        if batch_size % data_devices:
            raise config_lib.ConfigError(
                f"--config.train.batch_size={batch_size} (the global batch of all "
                f"{jax.process_count()} processes) does not split over "
                f"{data_devices} data-parallel devices"
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


def process_rows(batch_size: int, seq_len: int) -> np.ndarray | None:
    """The rows of each global batch this process feeds, or None for all.

    Keras builds the global batch from every process's rows with
    `jax.make_array_from_process_local_data`; a process holds the rows its
    own devices hold under the active distribution's data layout (all of
    them when the batch axis does not span processes).

    >>> process_rows(8, 16) is None  # one process
    True
    """
    distribution = keras.distribution.distribution()
    if distribution is None or jax.process_count() == 1:
        return None
    layout = distribution.get_data_layout((batch_size, seq_len))
    sharding = layout.backend_layout
    rows = set()
    for index in sharding.addressable_devices_indices_map(
        (batch_size, seq_len)
    ).values():
        rows.update(range(batch_size)[index[0]])
    picked = np.array(sorted(rows), np.int64)
    return None if len(picked) == batch_size else picked


class _ReplicatedInputs(keras.distribution.ModelParallel):
    """`base`'s variable layouts, with every input whole on every device.

    (A ModelParallel only for its constructor: Keras exports no plainer base.)
    """

    def __init__(self, base):
        super().__init__(
            layout_map=keras.distribution.LayoutMap(base.device_mesh),
            batch_dim_name=base.batch_dim_name,
            auto_shard_dataset=False,
        )
        self._base = base

    def get_data_layout(self, data_shape):
        return keras.distribution.TensorLayout(
            [None] * len(data_shape), self.device_mesh
        )

    def get_variable_layout(self, variable):
        return self._base.get_variable_layout(variable)

    def get_tensor_layout(self, path):
        return self._base.get_tensor_layout(path)

    def distribute_dataset(self, dataset):
        return dataset


@contextlib.contextmanager
def replicated_inputs():
    """Within: inputs are given whole to every device (multi-host generation).

    Generation (evaluation, sample generations) runs on every process with
    the same prompts; split by batch across processes, its outputs would be
    readable by no single host. On one process this changes nothing.
    """
    base = keras.distribution.distribution()
    if base is None or jax.process_count() == 1:
        yield
        return
    keras.distribution.set_distribution(_ReplicatedInputs(base))
    try:
        yield
    finally:
        keras.distribution.set_distribution(base)
