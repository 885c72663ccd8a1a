"""Atomic file writes: a crash or a kill never leaves half a file.

Each write goes to a temporary file beside the target (`.<name>.<random>.tmp`,
so `train.remove_stale_temp` clears leftovers of a killed run), is flushed to
disk, then renamed onto the target in one step. The file gets the usual
permissions (0666 minus the umask), not `mkstemp`'s 0600.

    with atomic_open("out/report.md") as f:
        f.write(text)
    write_json("run/run_state.json", {"status": "finished"})
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import IO, Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike, mode: str = "w", newline: str | None = None
) -> Iterator[IO[Any]]:
    """Opens a temporary file beside `path`; on success moves it onto `path`."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    encoding = None if "b" in mode else "utf-8"
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with open(fd, mode, encoding=encoding, newline=newline) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = path  # a full disk names the file, not a descriptor
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically."""
    with atomic_open(path) as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any, **dump_kwargs) -> None:
    """Writes `obj` as JSON atomically; `dump_kwargs` go to `json.dump`."""
    dump_kwargs.setdefault("indent", 2)
    with atomic_open(path) as f:
        json.dump(obj, f, **dump_kwargs)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
