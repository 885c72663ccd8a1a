"""One process per workdir: an OS file lock held for the whole command.

    with workdir_lock.hold("runs/tiny", "train"):
        ...  # a second train / evaluate / export on runs/tiny stops at once

The lock is `fcntl.flock` on `<workdir>/.lock`, so the kernel releases it
when the holder exits for any reason (SIGKILL included): a stale lock never
blocks a rerun. The file holds the holder's PID, host and command, which the
refusal names. On release the file is removed (a workdir that nothing else
was written to stays empty); acquiring re-checks that the locked file is
still the one at the path, so removing it never lets two holders in.

Commands that only read a finished run (`export`, `evaluate --out=...`) pass
`reader=True`: where the workdir cannot be written (read-only storage, another
user's run) they take a shared lock on an existing `.lock` instead (still
refused while a writer holds it), or none when there is no `.lock`: a
workdir nobody can write to cannot change under them.

    with workdir_lock.hold("/readonly/runs/tiny", "export", reader=True):
        ...
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from collections.abc import Iterator

from absl import logging

LOCK_FILE = ".lock"


class WorkdirLockedError(RuntimeError):
    """Another process holds the workdir."""


def _holder(path: str) -> str:
    try:
        with open(path) as f:
            info = json.load(f)
        return (
            f"`gemma4-keras {info.get('command', '?')}` (pid {info.get('pid', '?')} on "
            f"host {info.get('host', '?')}, since {info.get('since', '?')})"
        )
    except (OSError, ValueError):
        # The holder has opened the file but not yet written its name.
        return "another process (starting up)"


def _in_use(path: str, advice: str = "") -> WorkdirLockedError:
    return WorkdirLockedError(
        f"{os.path.dirname(path)} is in use by {_holder(path)}; wait for it "
        f"to end (or stop it){advice}"
    )


def _acquire(path: str) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _in_use(path, ", or pick another --workdir") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the previous holder removed this file as we locked it


_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def _acquire_shared(path: str) -> int | None:
    """A shared lock on an existing `path` opened read-only; None if there is none."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _in_use(path) from None
    return fd


@contextlib.contextmanager
def _shared(workdir: str, path: str) -> Iterator[str]:
    fd = _acquire_shared(path)
    logging.info(
        "%s is not writable: reading it under a %s",
        workdir,
        "shared lock" if fd is not None else "no lock (nothing can write it)",
    )
    try:
        yield path
    finally:
        if fd is not None:
            os.close(fd)


@contextlib.contextmanager
def hold(workdir: str, command: str, *, reader: bool = False) -> Iterator[str]:
    """Holds `workdir` (created if missing) for the `with` block.

    Args:
        workdir: the run directory.
        command: the CLI command, recorded for the refusal message.
        reader: the command only reads `workdir`: when it cannot be written,
            take a shared lock (or none) instead of failing.

    Yields:
        The lock file path.

    Raises:
        WorkdirLockedError: naming the holder's command, PID and host.
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise FileExistsError(
            errno.EEXIST, "is a file, not a directory; pick another --workdir", workdir
        )
    path = os.path.join(workdir, LOCK_FILE)
    try:
        if not (reader and os.path.isdir(workdir)):
            os.makedirs(workdir, exist_ok=True)
        fd = _acquire(path)
    except OSError as e:
        if not (reader and e.errno in _NOT_WRITABLE and os.path.isdir(workdir)):
            raise
        with _shared(workdir, path):
            yield path
        return
    try:
        info = {
            "command": command,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        yield path
    finally:
        # Unlink while still holding the lock: a waiter that opened the old
        # file sees the inode changed and retries on a fresh one.
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
