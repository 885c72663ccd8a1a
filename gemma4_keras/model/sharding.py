"""Which axis of each training-model variable goes on the mesh's `model` axis.

The one table of layouts, by variable path, for `training/distributed.py` (which
places the variables) and `plan` (which counts the bytes each device holds),
so the two cannot drift apart. A rule names one dimension of the variable;
that dimension is split over the `model` axis, every other one is
replicated, and the whole variable is replicated over the `batch` axis.

    what                          path (fullmatch)                     split dim
    float / int8 / int4 kernel    block_N_{q,k,v,gate,up}_proj/kernel  -1 (out)
                                  block_N_{o,down}_proj/kernel          0 (in)
    int8 / int4 scales, zeros     block_N_{q,k,v,gate,up}_proj/        -1 (out)
                                    kernel_{scale,zero}
    int4 group scales, zeros      block_N_{o,down}_proj/kernel_{scale, -2 (group)
                                    zero}, .../g_idx                    0 (in)
    NF4 projection leaves         block_N_{proj}_nf4/{packed,absmax,    0 (flat)
                                    absmax_codes}
    MoE expert banks (float, NF4) block_N/experts_*,                    0 (expert)
                                  block_N_experts_*/{leaf}
    embedding, PLE table          gemma4_lora_model/{embedding,         0 (vocab)
                                    embedding_scale (int8),
                                    ple_embedding}
    PLE projection, gate / up     .../ple_projection, block_N/ple_gate -1
                                  block_N/ple_up                        0
    LoRA B (column) / A (row)     lora_*_layers_N_{proj}/lora_{b,a}    -1 / 0

NF4 keeps the HF (out, in) weight flattened in C order (bitsandbytes' layout,
`quant.py`), so a contiguous split of its flat leaves is a split along the
output features: shard k holds output rows [k*out/m, (k+1)*out/m) as whole
quantisation blocks. A flat leaf is split only when each shard stays aligned:
`packed` to `NF4_PACKED_ALIGN` bytes (one 64-value block, QLoRA's size) and
`absmax` / `absmax_codes` to `NF4_SCALE_ALIGN` entries (whole double-quant
groups of 256, so the 256-group scales follow their codes). A larger block
size may straddle two shards; XLA then moves the few bytes involved, the
result is the same. `absmax_scales` (n / 16384 float32: 28 KB for the
largest 31B kernel) and the scalar offset stay replicated.

A dimension that the model axis does not divide (or that breaks the
alignment) is not split: that variable is replicated, and `plan` counts it
so. Everything not named above (norms, the router, the per-layer scalars,
LoRA A of column layers and B of row layers) is small and replicated.

Example:

    model_dim("block_3_q_proj/kernel", (5376, 8192), 2)          # 1
    model_dim("block_3_q_proj_nf4/packed", (22020096,), 2)       # 0
    model_dim("block_3/router_proj", (2816, 128), 2)             # None
    shard_shape((262144, 5376), 0, 4)                            # (65536, 5376)
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

from gemma4_keras import config_lib

MODEL_AXIS = "model"
NF4_PACKED_ALIGN = 32  # bytes: one 64-value block
NF4_SCALE_ALIGN = 256  # entries: one double-quant group

_COLUMN = r"(q_proj|k_proj|v_proj|gate_proj|up_proj)"
_ROW = r"(o_proj|down_proj)"
_BANK = r"experts_(gate|up|down)"
_NF4_FLAT = r"(packed|absmax|absmax_codes)"
_NF4_ALL = r"(packed|absmax|absmax_codes|absmax_scales|absmax_offset)"

# (path regex, fullmatch) -> the dimension split over the model axis.
LAYOUT_RULES: tuple[tuple[str, int], ...] = (
    (rf"block_\d+_{_COLUMN}/kernel", -1),
    (rf"block_\d+_{_ROW}/kernel", 0),
    (rf"block_\d+_{_COLUMN}/kernel_(scale|zero)", -1),
    (rf"block_\d+_{_ROW}/kernel_(scale|zero)", -2),
    (rf"block_\d+_{_ROW}/g_idx", 0),
    (rf"block_\d+_({_COLUMN}|{_ROW})_nf4/{_NF4_FLAT}", 0),
    (rf"block_\d+/{_BANK}", 0),
    (rf"block_\d+_{_BANK}/{_NF4_ALL}", 0),
    (r"gemma4_lora_model/(embedding|embedding_scale|ple_embedding)", 0),
    (r"gemma4_lora_model/ple_projection", -1),
    (r"block_\d+/ple_gate", -1),
    (r"block_\d+/ple_up", 0),
    (rf"lora_.*_layers_\d+_{_COLUMN}/lora_b", -1),
    (rf"lora_.*_layers_\d+_{_ROW}/lora_a", 0),
)
_COMPILED = tuple((re.compile(p), d) for p, d in LAYOUT_RULES)
_ALIGN = (
    (re.compile(r".*_nf4/packed"), NF4_PACKED_ALIGN),
    (re.compile(r".*_nf4/(absmax|absmax_codes)"), NF4_SCALE_ALIGN),
)


def rule_dim(path: str) -> int | None:
    """The dimension the layout rules split for `path` (None: replicated)."""
    for pattern, dim in _COMPILED:
        if pattern.fullmatch(path):
            return dim
    return None


def model_dim(path: str, shape: Sequence[int], model_size: int) -> int | None:
    """The (non-negative) dimension of `shape` split over a model axis of
    `model_size` devices, or None when the variable is replicated."""
    dim = rule_dim(path)
    if dim is None or model_size <= 1 or not shape:
        return None
    if not -len(shape) <= dim < len(shape):
        return None  # e.g. the (out,) int8 scale of a row-parallel kernel
    dim %= len(shape)
    size = int(shape[dim])
    if size % model_size:
        return None
    for pattern, align in _ALIGN:
        if pattern.fullmatch(path) and (size // model_size) % align:
            return None
    return dim


def axes(path: str, shape: Sequence[int], model_size: int) -> tuple[str | None, ...]:
    """The Keras layout (mesh axis name or None per dimension) of a variable."""
    dim = model_dim(path, shape, model_size)
    return tuple(MODEL_AXIS if i == dim else None for i in range(len(shape)))


def shard_shape(shape: Sequence[int], dim: int | None, model_size: int) -> tuple:
    """The shape one device holds."""
    out = [int(s) for s in shape]
    if dim is not None:
        out[dim] //= model_size
    return tuple(out)


def per_device_bytes(
    variables: Iterable[tuple[str, Sequence[int], int]], model_size: int
) -> int:
    """Bytes one device holds of `(path, shape, bytes per element)` variables."""
    return sum(
        math.prod(shard_shape(shape, model_dim(path, shape, model_size), model_size))
        * itemsize
        for path, shape, itemsize in variables
    )


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


__all__ = [
    "LAYOUT_RULES",
    "axes",
    "mesh_shape",
    "model_dim",
    "per_device_bytes",
    "rule_dim",
    "shard_shape",
]
