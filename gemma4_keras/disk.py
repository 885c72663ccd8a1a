"""A full disk is one clear line, found before anything is half-written.

A writer that knows how much it will write checks the free space first:

    disk.require("out/hf", 12 * 2**30, "the hf export")  # DiskFullError if short

and `full_error(e)` recognises a full disk in any library's error (Orbax /
TensorStore, safetensors, h5py, numpy name it in their own words), so the
CLI reports every command's full disk the same way:

    out/hf: no space left on the device: the hf export needs about 12.0 GiB,
    3.1 GiB free; free some space (or write elsewhere), then rerun the same command
"""

from __future__ import annotations

import errno
import os
import re
import shutil


class DiskFullError(OSError):
    """ENOSPC at `filename`, with what was written and the bytes it needs when known."""

    def __init__(
        self,
        path: str | None,
        *,
        need: int | None = None,
        free: int | None = None,
        what: str | None = None,
    ):
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        self.need, self.free, self.what = need, free, what

    def __str__(self) -> str:
        return describe(self)


def existing_parent(path: str) -> str:
    """`path` or its nearest ancestor that exists (a staging directory may be gone)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def free_bytes(path: str) -> int | None:
    """Free bytes for this user on the filesystem that holds `path`."""
    try:
        return shutil.disk_usage(existing_parent(path)).free
    except OSError:
        return None


def require(path: str, need: int, what: str) -> None:
    """Raises DiskFullError when the filesystem of `path` has less than `need` bytes free.

    Example:
      >>> require("runs/x/checkpoints", 2 * 2**20, "checkpoint step 40")
    """
    free = free_bytes(path)
    if free is not None and need > free:
        raise DiskFullError(path, need=need, free=free, what=what)


# How libraries say ENOSPC: strerror, Rust's io::Error (safetensors), TensorStore
# (Orbax), HDF5 (h5py); numpy's `tofile` reports only the short write.
_MARKERS = (
    "no space left on device",
    "(os error 28)",
    "os_error_code='28'",
    "errno = 28",
    "storagefull",
)
_SHORT_WRITE = re.compile(r"^\d+ requested and \d+ written$")
_QUOTED_PATH = re.compile(r"""["'](/[^"'\n]+)["']""")


def full_error(e: BaseException | None) -> DiskFullError | None:
    """The full disk behind `e` or its causes, as a DiskFullError; None if none.

    A path named only in a library's message (often a staging file removed
    since) is given as its nearest existing directory.
    """
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DiskFullError):
            return e
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return DiskFullError(e.filename)
        text = str(e)
        if any(m in text.lower() for m in _MARKERS) or _SHORT_WRITE.match(text):
            path = _QUOTED_PATH.search(text)
            return DiskFullError(existing_parent(path[1]) if path else None)
        e = e.__cause__ or e.__context__
    return None


def size(n: int | None) -> str:
    """`n` bytes for a person: `512 B`, `3.4 MiB`, `12.0 GiB`."""
    if n is None:
        return "?"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def describe(e: DiskFullError) -> str:
    """The one line of a full disk: where, what needs how much, what is free."""
    where = f"{e.filename}: " if e.filename else ""
    free = e.free
    if free is None and e.filename:
        free = free_bytes(e.filename)
    if e.need is not None:
        what = f"{e.what} needs about {size(e.need)}, " if e.what else ""
        detail = f": {what}{size(free)} free"
    else:
        detail = f" ({size(free)} free)" if free is not None else ""
    return (
        f"{where}no space left on the device{detail}; free some space (or write "
        "elsewhere), then rerun the same command"
    )
