"""Single tensors of a safetensors checkpoint, read and written with plain file I/O.

The one reader of checkpoint files, for the streaming loader
(`stream_load`) and the streaming exports (`exporters/hf.py`), and the one
writer (`write_sharded`: the merged HF export, the full-size checkpoints):

    refs = tensor_refs("/ckpt/gemma-4-E4B-it")       # headers only, no data
    w = read_tensor(refs["model.language_model.norm.weight"])
    for block in read_blocks(refs[name]):             # <= 64 MiB at a time
        ...

Why not `safetensors.safe_open`: it memory-maps the file, and every page a
read touches stays in the process's resident set until the map is closed, so
a 2 GiB tensor cost 4.4 GB of RSS (its mapped pages plus the copy) where a
plain read costs 2.1 GB. The format is simple enough to read directly: 8 bytes
little-endian header length, a JSON header `{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data, offsets
relative to the end of the header.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator

import ml_dtypes
import numpy as np
import tqdm

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# safetensors dtype names -> numpy dtypes (bfloat16 via ml_dtypes).
DTYPES = {
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
CODES = {v: k for k, v in DTYPES.items()}
# Linux returns at most ~2 GiB per read(); larger tensors are read in pieces.
_READ_CHUNK = 1 << 30
# XLA's CPU client adopts a host buffer without copying it only when the
# buffer is aligned to this (`jax.device_put(x, may_alias=True)`); numpy
# aligns to 16 bytes.
ALIGN = 64


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, truncated or mismatched."""


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
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: shard missing (named by {INDEX_FILE})"
        ) from None
    except (OSError, struct.error, ValueError) as e:
        raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
    return header, 8 + length


def shard_files(directory: str | os.PathLike) -> list[str]:
    """The safetensors files of an HF checkpoint directory (index or single)."""
    directory = os.fspath(directory)
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no weight_map")
        return [os.path.join(directory, n) for n in sorted(set(weight_map.values()))]
    if os.path.isfile(os.path.join(directory, SINGLE_FILE)):
        return [os.path.join(directory, SINGLE_FILE)]
    raise CheckpointError(
        f"{directory}: neither {INDEX_FILE} nor {SINGLE_FILE} exists "
        "(not a Hugging Face safetensors checkpoint)"
    )


def tensor_refs(directory: str | os.PathLike) -> dict[str, TensorRef]:
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
            if info["dtype"] not in DTYPES:
                raise CheckpointError(
                    f"{path}: tensor {name!r} has dtype {info['dtype']}; expected "
                    f"one of {sorted(DTYPES)}"
                )
            begin, end = (int(x) for x in info["data_offsets"])
            refs[name] = TensorRef(
                name,
                path,
                DTYPES[info["dtype"]],
                tuple(int(d) for d in info["shape"]),
                data_start + begin,
                end - begin,
            )
    return refs


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """`np.empty`, but starting on an `ALIGN`-byte boundary (see `ALIGN`)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _read_into(f, buf: np.ndarray, ref: TensorRef) -> int:
    """Fills `buf` from `f`'s position; returns the bytes read (short at EOF)."""
    view = memoryview(buf.reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):
        n = f.readinto(view[done : done + _READ_CHUNK])
        if not n:
            break
        done += n
    return done


def read_tensor(ref: TensorRef) -> np.ndarray:
    """One tensor's values in a fresh, `ALIGN`-aligned array (no memory map)."""
    out = aligned_empty(ref.shape, ref.dtype)
    with open(ref.path, "rb", buffering=0) as f:
        f.seek(ref.start)
        got = _read_into(f, out, ref)
    if got != ref.nbytes or out.nbytes != ref.nbytes:
        raise CheckpointError(
            f"{ref.path}: tensor {ref.name!r} is truncated ({got} of {ref.nbytes} bytes)"
        )
    return out


def read_blocks(ref: TensorRef, max_bytes: int = 64 * 1024**2) -> Iterator[np.ndarray]:
    """Yields a tensor as consecutive blocks of rows (axis 0), each <= `max_bytes`.

    A row larger than `max_bytes` is yielded alone. For tensors that pass
    through unchanged (or only change dtype), so that even a multi-GB
    embedding never sits in memory whole.
    """
    rows = ref.shape[0] if ref.shape else 1
    row_bytes = ref.nbytes // max(rows, 1)
    step = max(1, max_bytes // max(row_bytes, 1))
    with open(ref.path, "rb", buffering=0) as f:
        f.seek(ref.start)
        for first in range(0, rows, step):
            n = min(step, rows - first)
            block = np.empty((n, *ref.shape[1:]) if ref.shape else (), ref.dtype)
            got = _read_into(f, block, ref)
            if got != block.nbytes:
                raise CheckpointError(
                    f"{ref.path}: tensor {ref.name!r} is truncated "
                    f"(row {first + got // max(row_bytes, 1)} of {rows})"
                )
            yield block


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


# --- writing ------------------------------------------------------------------


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
            raise CheckpointError(
                f"tensor {name!r}: produced {block.dtype}{block.shape}, planned "
                f"{dtype}{shape}"
            )
        f.write(memoryview(block.reshape(-1).view(np.uint8)))
        written += block.nbytes
        del block
    if written != want:
        raise CheckpointError(
            f"tensor {name!r}: produced {written} bytes, planned {want}"
        )
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
        write_safetensors(os.path.join(directory, SINGLE_FILE), entries, produce)
        return [SINGLE_FILE]
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
        "metadata": {
            "total_parameters": sum(math.prod(e[2]) for e in entries),
            "total_size": int(sum(s for _, s in sizes)),
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [*names, INDEX_FILE]
