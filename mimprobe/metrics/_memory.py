"""Releasing a read-only memory map's pages from the resident set once a chunk has been read (every metric reads
the store chunk by chunk)."""

from __future__ import annotations

import ctypes
import mmap

import numpy as np

_PAGE = mmap.PAGESIZE
try:
    _LIBC = ctypes.CDLL(None, use_errno=True)
    _MADVISE = _LIBC.madvise
    _MADVISE.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
except (OSError, AttributeError, TypeError):  # not a POSIX libc: pages stay mapped, as numpy would leave them
    _MADVISE = None


def release_pages(block: np.ndarray) -> None:
    """Drop a read-only memory map's pages of ``block`` from this process' resident set (MADV_DONTNEED).

    A memory map's pages count in the process' RSS once read; without this, reading a whole bank would raise RSS by
    its size even though the data is kept only chunk by chunk. Only read-only ("r") maps are touched: their pages
    come back from the file (page cache) if read again, so nothing can be lost.
    """
    if (_MADVISE is None or not isinstance(block, np.memmap) or getattr(block, "mode", None) != "r"
            or not block.flags.c_contiguous or block.nbytes == 0 or not hasattr(mmap, "MADV_DONTNEED")):
        return
    begin = block.ctypes.data // _PAGE * _PAGE
    end = block.ctypes.data + block.nbytes  # partial last page is kept: the next chunk reads it
    length = (end - begin) // _PAGE * _PAGE
    if length > 0:
        _MADVISE(begin, length, mmap.MADV_DONTNEED)


