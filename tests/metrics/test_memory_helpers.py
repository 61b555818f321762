"""The memory helpers of the metrics: `_release_pages` drops a read-only memory map's pages from the resident set
(measured in /proc/self/smaps) without losing data, and `parse_bytes` reads --memory-budget sizes."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import pytest

from mimprobe.errors import BadInputError
from mimprobe.metrics._memory import release_pages as _release_pages
from mimprobe.metrics.config import parse_bytes

PAGE = mmap.PAGESIZE
SMAPS = Path("/proc/self/smaps")


def _resident_bytes(array: np.ndarray) -> int:
    """Rss of the mapping that holds ``array``'s first byte, from /proc/self/smaps."""
    address, inside = array.ctypes.data, False
    for line in SMAPS.read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            low, high = (int(part, 16) for part in head.split("-"))
            inside = low <= address < high
        elif inside and line.startswith("Rss:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("mapping not found")


@pytest.fixture
def mapped(tmp_path) -> tuple[Path, np.ndarray]:
    values = np.random.default_rng(0).standard_normal((256, PAGE // 4)).astype(np.float32)  # 256 pages
    path = tmp_path / "features.npy"
    np.save(path, values)
    return path, values


@pytest.mark.skipif(not SMAPS.is_file(), reason="needs Linux's /proc/self/smaps to measure the resident set")
def test_release_pages_empties_the_resident_set_and_keeps_the_data(mapped):
    path, values = mapped
    block = np.load(path, mmap_mode="r")
    assert float(block.sum()) == pytest.approx(float(values.sum()), rel=1e-4)  # every page read
    assert _resident_bytes(block) >= values.nbytes

    _release_pages(block)

    assert _resident_bytes(block) <= 2 * PAGE  # the header's page and the partial last page at most
    assert np.array_equal(np.asarray(block), values)  # read again from the file: nothing lost


@pytest.mark.skipif(not SMAPS.is_file(), reason="needs Linux's /proc/self/smaps to measure the resident set")
def test_release_pages_leaves_writable_maps_and_arrays_alone(mapped):
    path, values = mapped
    writable = np.load(path, mmap_mode="r+")
    writable[0, 0] = 5.0  # a dirty page that MADV_DONTNEED would throw away
    float(writable.sum())
    resident = _resident_bytes(writable)

    _release_pages(writable)
    _release_pages(values)  # a plain array: nothing to do, no error

    assert _resident_bytes(writable) == resident and writable[0, 0] == 5.0


@pytest.mark.parametrize("text, expected", [
    ("512M", 512 * 1024 ** 2), ("2G", 2 * 1024 ** 3), ("1.5GiB", int(1.5 * 1024 ** 3)), ("1000000", 1_000_000),
    ("64k", 64 * 1024), ("2 GB", 2 * 1024 ** 3), ("1t", 1024 ** 4), (" 3MiB ", 3 * 1024 ** 2), ("7b", 7),
    (None, None), ("none", None), ("all", None), ("", None), ("NONE", None),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["lots", "2 GBs", "-1G", "1e9", "0.5", "0", "1.2.3M", "5P"])
def test_parse_bytes_refuses_what_is_not_a_size(text):
    with pytest.raises(BadInputError, match="--memory-budget"):
        parse_bytes(text)
