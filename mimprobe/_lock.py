"""An exclusive lock on a lock file, so that two runs never write the same store (or output folder) at once.

The lock is ``fcntl.flock`` on a small file that names its holder (pid, host, start time, command). The kernel
releases a flock when its holder exits, however it exits (SIGKILL, OOM, power loss of a client), so a lock left
by a killed run is never "stale" in the dangerous sense: the next run simply gets it, sees that the file still
names a holder that did not release it, says so, and resumes from what that run recorded. There is no pid-alive
test, no timeout and no lock breaking, so pid reuse and clock skew cannot hand the lock to two processes.

The lock file is never deleted: unlinking a flock'ed file would let a third process lock a new file of the same
name while the second still holds the old one. A released lock file is emptied; it is a few bytes.

Shared filesystems. On Linux, flock on NFS is emulated with whole-file POSIX locks that go to the server (NLM for
NFSv3, the protocol itself for NFSv4), so it holds across machines unless the mount uses ``nolock`` or
``local_lock=flock/all`` (then it is local to each client). CephFS and GPFS honour flock across clients; Lustre
only when mounted with ``-o flock`` (otherwise flock fails with ENOSYS and we refuse with a clear message rather
than run unprotected). For the planned multi-machine extraction (torchrun), only rank 0 takes the lock, before
creating the store; the other ranks wait for it at a ``torch.distributed`` barrier and write disjoint rows, so
no lock is ever needed between ranks and none has to work across machines.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import BadInputError


class LockedError(BadInputError):
    """Another run holds the lock and the caller chose not to wait (exit code 2)."""


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process"
    started = holder.get("started")
    since = time.strftime(" since %Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if started else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{since}"


def read_holder(path: Path) -> dict[str, Any]:
    """What a lock file says about its (last) holder; {} when empty or unreadable (being written right now)."""
    try:
        return json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}


@contextmanager
def exclusive_lock(path: str | os.PathLike, *, what: str, wait: bool = True,
                   say: Callable[[str], None] | None = None) -> Iterator[dict[str, Any]]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block.

    Args:
        path: The lock file.
        what: What the lock protects, for messages ("feature store features/vit__digits__1a2b").
        wait: When another process holds the lock, wait for it (with a message) instead of raising `LockedError`.
        say: Receives the one-line messages (waiting, taking over from a run that ended without releasing).

    Yields:
        The record of the previous holder when it ended without releasing the lock (killed), else {}.

    Raises:
        LockedError: The lock is held and ``wait`` is False; the message names the holder's pid and host.
        BadInputError: The filesystem does not support locks.
    """
    path = Path(path)
    say = say or (lambda message: None)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            record = read_holder(path)
            for _ in range(50):  # the holder writes its record just after locking: give it that moment
                if record:
                    break
                time.sleep(0.01)
                record = read_holder(path)
            holder = _describe(record)
            if not wait:
                raise LockedError(f"{what} is being written by {holder} (lock {path}): wait for that run to end, "
                                  "or run again without --no-wait to wait for it") from None
            say(f"waiting for {holder}, which is writing {what} (lock {path})")
            fcntl.flock(fd, fcntl.LOCK_EX)  # blocks; Ctrl-C still interrupts it
        except OSError as error:
            if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise BadInputError(f"the filesystem of {path.parent} does not support file locks ({error.strerror})"
                                    ": use a folder on a local disk (or mount Lustre with -o flock)") from None
            raise
        previous = read_holder(path)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": round(time.time(), 3),
              "command": " ".join(sys.argv)[:500]}
        if previous:
            say(f"taking over the lock of {_describe(previous)}, which ended without releasing it (killed?); "
                f"continuing from what it recorded in {what}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        try:
            yield previous
        finally:
            os.ftruncate(fd, 0)  # released cleanly: the next holder has nothing to take over
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


__all__ = ["LockedError", "exclusive_lock", "read_holder"]
