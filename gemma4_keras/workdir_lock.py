"""One process per workdir: an OS file lock held for the whole command.

    with workdir_lock.hold("runs/tiny", "train"):
        ...  # a second train / evaluate / export on runs/tiny stops at once

The lock is `fcntl.flock` on `<workdir>/.lock`, so the kernel releases it
when the holder exits for any reason (SIGKILL included): a stale lock never
blocks a rerun. The file holds the holder's PID, host and command, which the
refusal names. On release the file is removed (a workdir that nothing else
was written to stays empty); acquiring re-checks that the locked file is
still the one at the path, so removing it never lets two holders in.
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


def _acquire(path: str) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WorkdirLockedError(
                f"{os.path.dirname(path)} is in use by {_holder(path)}; wait for it "
                "to end (or stop it), or pick another --workdir"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the previous holder removed this file as we locked it


@contextlib.contextmanager
def hold(workdir: str, command: str) -> Iterator[str]:
    """Holds `workdir` (created if missing) for the `with` block.

    Args:
        workdir: the run directory.
        command: the CLI command, recorded for the refusal message.

    Yields:
        The lock file path.

    Raises:
        WorkdirLockedError: naming the holder's command, PID and host.
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise FileExistsError(
            errno.EEXIST, "is a file, not a directory; pick another --workdir", workdir
        )
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    fd = _acquire(path)
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
