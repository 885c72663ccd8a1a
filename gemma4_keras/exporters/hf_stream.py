"""Safetensors tensor by tensor: read a base lazily, write shards as they fill.

Reading is `model.safetensors_io` (the one checkpoint reader, re-exported
here); this module adds the writers.

    refs = tensor_refs("/ckpt/gemma-4-E4B-it")          # headers only, no data
    w = read_tensor(refs["model.language_model.norm.weight"])
    files = write_sharded("out", entries, produce, shard_size="5GB")

`write_sharded` asks `produce(name)` for one tensor at a time and writes it
straight into its shard, so the process holds one tensor (plus whatever
`produce` needs to make it), never a shard or the model.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable

import ml_dtypes
import numpy as np
import tqdm

from gemma4_keras.model.safetensors_io import (
    CODES,
    DTYPES,
    CheckpointError,
    TensorRef,
    plan_shards,
    read_blocks,
    read_tensor,
    shard_files,
    tensor_refs,
)
from gemma4_keras.model.safetensors_io import (
    INDEX_FILE as INDEX,
)
from gemma4_keras.model.safetensors_io import (
    SINGLE_FILE as SINGLE,
)

# `--dtype` names <-> numpy dtypes of stored float weights.
DTYPE_NAMES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
__all__ = [
    "CheckpointError",
    "TensorRef",
    "read_blocks",
    "read_tensor",
    "shard_files",
    "tensor_refs",
    "DTYPES",
]


class ExportError(ValueError):
    """An export that cannot be written as asked (one line: file, tensor or flag)."""


def stored_dtype(refs: dict[str, TensorRef]) -> str:
    """The float dtype holding most of a checkpoint's bytes: `bfloat16`, ...

    This is what "the base's own dtype" means for `--dtype`'s default.
    """
    weight: dict[np.dtype, int] = {}
    for ref in refs.values():
        if ref.dtype in DTYPE_NAMES.values():
            weight[ref.dtype] = weight.get(ref.dtype, 0) + ref.nbytes
    if not weight:
        raise ExportError(
            "the base checkpoint holds no float32/bfloat16/float16 tensor"
        )
    top = max(weight, key=weight.get)
    return next(k for k, v in DTYPE_NAMES.items() if v == top)


def _header_bytes(entries: list[tuple[str, np.dtype, tuple[int, ...]]], meta: dict):
    header: dict = {"__metadata__": meta}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {
            "dtype": CODES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(
    path: str,
    entries: list[tuple[str, np.dtype, tuple[int, ...]]],
    produce: Callable[[str], np.ndarray],
    meta: dict | None = None,
) -> int:
    """Writes one safetensors file, asking `produce(name)` for each tensor in turn.

    `entries` lists (name, dtype, shape) up front (the header comes first).
    `produce` returns the tensor, or an iterator of row blocks whose
    concatenation along axis 0 is the tensor (`read_blocks`); another dtype,
    shape or byte count than planned is an error. Returns bytes of tensor
    data written.
    """
    written = 0
    with open(path, "wb") as f:
        f.write(_header_bytes(entries, meta or {"format": "pt"}))
        for name, dtype, shape in entries:
            written += _write_tensor(f, name, dtype, tuple(shape), produce(name))
    return written


def _write_tensor(f, name, dtype, shape, produced) -> int:
    """Writes one tensor (an array or an iterator of row blocks); its byte count."""
    whole = isinstance(produced, np.ndarray)
    blocks = [produced] if whole else produced
    want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    written = 0
    for block in blocks:
        block = np.ascontiguousarray(block)
        if block.dtype != dtype or (whole and tuple(block.shape) != shape):
            raise ExportError(
                f"tensor {name!r}: produced {block.dtype}{block.shape}, planned "
                f"{dtype}{shape}"
            )
        f.write(memoryview(block.reshape(-1).view(np.uint8)))
        written += block.nbytes
        del block
    if written != want:
        raise ExportError(f"tensor {name!r}: produced {written} bytes, planned {want}")
    return written


def write_sharded(
    directory: str,
    entries: list[tuple[str, np.dtype, tuple[int, ...]]],
    produce: Callable[[str], np.ndarray],
    limit: int,
) -> list[str]:
    """`model.safetensors`, or `model-0000i-of-0000N.safetensors` + index.

    Shards are planned from `entries` (dtype x shape) and written one after
    the other, each tensor produced when its turn comes. `format: pt` is in
    every header (transformers refuses files without it).

    Returns:
        The file names written, relative to `directory`.
    """
    sizes = [(n, int(np.prod(s, dtype=np.int64)) * d.itemsize) for n, d, s in entries]
    shards = plan_shards(sizes, limit)
    # On a terminal only (`disable=None`): a merged E4B takes minutes to write.
    bar = tqdm.tqdm(
        total=sum(s for _, s in sizes),
        desc=f"writing {os.path.basename(os.path.normpath(directory))}",
        unit="B",
        unit_scale=True,
        disable=None,
        leave=False,
    )
    planned = dict(sizes)

    def produce_counted(name: str):
        value = produce(name)
        bar.update(planned[name])
        return value

    with bar:
        return _write_shards(directory, entries, produce_counted, shards, sizes)


def _write_shards(directory, entries, produce, shards, sizes) -> list[str]:
    by_name = {e[0]: e for e in entries}
    if len(shards) == 1:
        write_safetensors(os.path.join(directory, SINGLE), entries, produce)
        return [SINGLE]
    names = [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        for i in range(len(shards))
    ]
    weight_map = {}
    for fname, shard in zip(names, shards, strict=True):
        path = os.path.join(directory, fname)
        write_safetensors(path, [by_name[n] for n in shard], produce)
        weight_map.update(dict.fromkeys(shard, fname))
    index = {
        "metadata": {"total_size": int(sum(s for _, s in sizes))},
        "weight_map": dict(sorted(weight_map.items())),
    }
    with open(os.path.join(directory, INDEX), "w") as f:
        json.dump(index, f, indent=2)
    return [*names, INDEX]
