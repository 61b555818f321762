"""A full disk is bad input: one line naming the file and the space it needs (exit code 2), and nothing already
written is lost.

Libraries report a full disk in different ways: ``OSError`` with ``errno.ENOSPC``/``EDQUOT`` (``os.pwrite``,
``open().write``), an ``OSError`` without errno (numpy's "requested and written"), a ``RuntimeError`` from torch's
zip writer ("unexpected pos"), a ``SafetensorError`` ("os error 28"). `disk_full_guard` therefore treats any
failure of a write as a full disk when it says so, or when the folder's filesystem has less room than the write
still needed. `replaced_atomically` writes beside the target and renames, so a failed write (full disk, kill)
leaves the previous file as it was.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import BadInputError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_WORDS = ("no space left", "os error 28", "disk quota", "requested and", "unexpected pos")

Needed = int | Callable[[], int] | None


class DiskFullError(BadInputError):
    """The disk (or quota) filled while writing ``path``; exit code 2."""

    def __init__(self, path: str | os.PathLike, needed_bytes: int | None):
        path = Path(path)
        free = free_bytes(path)
        need = f"it needs {format_bytes(needed_bytes)} more" if needed_bytes else "it needs more space"
        super().__init__(f"not enough space on the device for {path}: {need} ({format_bytes(free)} free there); "
                         "free some space or write to another folder (--out), then run the same command again "
                         "(nothing written before was lost)")
        self.path, self.needed_bytes, self.free_bytes = path, needed_bytes, free


def format_bytes(count: int | float | None) -> str:
    """1536 -> "1.5 KiB" (binary units, as `mimprobe.metrics.profile.parse_bytes` reads them)."""
    if count is None:
        return "unknown"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes (for this user) on the filesystem of ``path`` or of its nearest existing parent."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def is_disk_full(error: BaseException, path: str | os.PathLike, needed_bytes: int | None) -> bool:
    """Whether ``error``, raised while writing under ``path``, means the disk or quota is full."""
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return True
    if not isinstance(error, (OSError, RuntimeError)) and type(error).__name__ != "SafetensorError":
        return False
    if any(words in str(error).lower() for words in DISK_FULL_WORDS):
        return True
    free = free_bytes(path)
    return needed_bytes is not None and free is not None and free < needed_bytes


@contextmanager
def disk_full_guard(path: str | os.PathLike, needed_bytes: Needed = None) -> Iterator[None]:
    """Turn a full disk while writing ``path`` into `DiskFullError`; other errors pass unchanged.

    Args:
        path: The file being written (named in the message).
        needed_bytes: The bytes the write still needs, or a function computing them after the failure.
    """
    try:
        yield
    except Exception as error:  # OSError, torch's RuntimeError, safetensors' SafetensorError (an Exception)
        if isinstance(error, BadInputError):
            raise
        needed = needed_bytes() if callable(needed_bytes) else needed_bytes
        if not is_disk_full(error, path, needed):
            raise
        raise DiskFullError(path, needed) from None


@contextmanager
def replaced_atomically(path: str | os.PathLike, *, needed_bytes: Needed = None,
                        suffix: str = ".partial") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; after the block it replaces ``path`` (``os.replace``).
    On any failure the temporary file is removed and ``path`` keeps its previous content; a full disk becomes
    `DiskFullError` naming ``path``. Files are created with the process's umask (0644 under the usual 022)."""
    path = Path(path)
    partial = path.with_name(path.name + suffix)
    try:
        with disk_full_guard(path, needed_bytes):
            try:
                yield partial
                os.replace(partial, path)
            finally:
                partial.unlink(missing_ok=True)  # before measuring the free space: it held part of the write
    finally:
        partial.unlink(missing_ok=True)


def tensor_bytes(obj: object, depth: int = 0) -> int:
    """Bytes of the tensors and arrays in nested dicts/lists/tuples: what a checkpoint of ``obj`` needs on disk,
    less its small pickle."""
    if hasattr(obj, "element_size") and hasattr(obj, "nelement"):
        return int(obj.element_size() * obj.nelement())
    if hasattr(obj, "nbytes") and hasattr(obj, "dtype"):
        return int(obj.nbytes)
    if depth > 8:
        return 0
    if isinstance(obj, dict):
        return sum(tensor_bytes(value, depth + 1) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(value, depth + 1) for value in obj)
    return 0
