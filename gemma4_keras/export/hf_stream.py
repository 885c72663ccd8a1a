"""Safetensors tensor by tensor: read a base lazily, write shards as they fill.

    refs = tensor_refs("/ckpt/gemma-4-E4B-it")          # headers only, no data
    w = read_tensor(refs["model.language_model.norm.weight"])
    files = write_sharded("out", entries, produce, shard_size="5GB")

`write_sharded` asks `produce(name)` for one tensor at a time and writes it
straight into its shard, so the process holds one tensor (plus whatever
`produce` needs to make it), never a shard or the model.

Why not `safetensors.safe_open`: it memory-maps the file, and every page a
read touches stays in the process's resident set (RSS counts file-backed
mapped pages) until the map is closed, so streaming a 5 GB shard through it
shows up as 5 GB of RSS. `read_tensor` does a plain `seek` + `readinto` of one
tensor's bytes into a fresh array instead. The format is simple enough for
that: 8 bytes little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`,
then the data, offsets relative to the end of the header.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_NP = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODE = {v: k for k, v in _NP.items()}
# `--dtype` names <-> numpy dtypes of stored float weights.
DTYPE_NAMES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


class ExportError(ValueError):
    """An export that cannot be written as asked (one line: file, tensor or flag)."""


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes are: file, absolute offset, length, dtype, shape."""

    name: str
    path: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int


def read_header(path: str) -> tuple[dict, int]:
    """(JSON header, offset of the data) of a safetensors file."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise ExportError(f"{path}: not a readable safetensors file ({e})") from e
    return header, 8 + length


def shard_files(directory: str) -> list[str]:
    """The safetensors files of an HF checkpoint directory (index or single)."""
    index = os.path.join(directory, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(directory, n) for n in names]
    single = os.path.join(directory, SINGLE)
    if os.path.isfile(single):
        return [single]
    raise ExportError(
        f"{directory}: neither {SINGLE} nor {INDEX}; a streamed export reads the "
        "base's safetensors (point --config.model.preset at an HF checkpoint directory)"
    )


def tensor_refs(directory: str) -> dict[str, TensorRef]:
    """{name: TensorRef} of every tensor of an HF checkpoint, from headers only.

    Example:
      >>> refs = tensor_refs("/ckpt/gemma-4-E4B-it")
      >>> refs["model.language_model.embed_tokens.weight"].shape
      (262144, 2560)
    """
    refs = {}
    for path in shard_files(directory):
        header, data_start = read_header(path)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _NP:
                raise ExportError(
                    f"{path}: tensor {name!r} has dtype {info['dtype']}, "
                    f"which this exporter cannot read ({', '.join(_NP)})"
                )
            begin, end = info["data_offsets"]
            refs[name] = TensorRef(
                name,
                path,
                _NP[info["dtype"]],
                tuple(int(d) for d in info["shape"]),
                data_start + int(begin),
                int(end) - int(begin),
            )
    return refs


def read_tensor(ref: TensorRef) -> np.ndarray:
    """One tensor's values, read with plain file I/O (no memory map)."""
    arr = np.empty(ref.shape, ref.dtype)
    view = memoryview(arr.reshape(-1).view(np.uint8))
    with open(ref.path, "rb") as f:
        f.seek(ref.start)
        got = f.readinto(view)
    if got != ref.nbytes or arr.nbytes != ref.nbytes:
        raise ExportError(
            f"{ref.path}: tensor {ref.name!r} is truncated ({got} of {ref.nbytes} bytes)"
        )
    return arr


def read_blocks(ref: TensorRef, max_bytes: int = 64 * 1024**2):
    """Yields a tensor as consecutive blocks of rows (axis 0), each <= `max_bytes`.

    A row larger than `max_bytes` is yielded alone. For tensors that pass
    through unchanged (or only change dtype), so that even a multi-GB
    embedding never sits in memory whole.
    """
    rows = ref.shape[0] if ref.shape else 1
    row_bytes = ref.nbytes // max(rows, 1)
    step = max(1, max_bytes // max(row_bytes, 1))
    with open(ref.path, "rb") as f:
        f.seek(ref.start)
        for first in range(0, rows, step):
            n = min(step, rows - first)
            block = np.empty((n, *ref.shape[1:]) if ref.shape else (), ref.dtype)
            got = f.readinto(memoryview(block.reshape(-1).view(np.uint8)))
            if got != block.nbytes:
                raise ExportError(
                    f"{ref.path}: tensor {ref.name!r} is truncated "
                    f"(row {first + got // max(row_bytes, 1)} of {rows})"
                )
            yield block


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


def plan_shards(sizes: Iterable[tuple[str, int]], limit: int) -> list[list[str]]:
    """Tensor names per shard, in the given order, each shard <= `limit` bytes.

    A tensor larger than `limit` gets a shard of its own.
    """
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def _header_bytes(entries: list[tuple[str, np.dtype, tuple[int, ...]]], meta: dict):
    header: dict = {"__metadata__": meta}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {
            "dtype": _CODE[dtype],
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
    by_name = {e[0]: e for e in entries}
    sizes = [(n, int(np.prod(s, dtype=np.int64)) * d.itemsize) for n, d, s in entries]
    shards = plan_shards(sizes, limit)
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
