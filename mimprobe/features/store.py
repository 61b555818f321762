"""The FeatureStore: a directory of per-(split, block, pooling) ``.npy`` files and a manifest.

Layout::

    manifest.json                     format version, content key, model/data identity, progress, completion
    {split}/labels.npy                (n,) int64; -1 for unlabelled data and images skipped as unreadable
    {split}/block{BB}_{pooling}.npy   (n, dim) float16 or float32; pooling "cls+mean" is written "cls_mean"

Rows are written in place at their dataset index (``os.pwrite`` into pre-sized ``.npy`` files), so memory is
bounded by the batch and an interrupted run resumes at the last recorded row. The manifest holds no timestamps:
a resumed store ends byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInputError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STORE_DTYPES = ("float16", "float32")


def feature_filename(block: int, pooling: str) -> str:
    return f"block{block:02d}_{pooling.replace('+', '_')}.npy"


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON through a temporary file and ``os.replace``, so a kill never leaves half a manifest."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=1)  # insertion order: splits keep their order
        handle.write("\n")
    os.replace(tmp, path)


def create_npy(path: Path, shape: tuple[int, ...], dtype: str) -> int:
    """Create a zero-filled (sparse) ``.npy`` file of the given shape; return the byte offset of its data."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=shape)
    offset = array.offset
    del array
    return offset


def npy_data_offset(path: Path) -> int:
    """Byte offset of the data in an existing ``.npy`` file."""
    return np.load(path, mmap_mode="r").offset


class RowWriter:
    """Writes rows into a pre-sized ``.npy`` file at their index with ``os.pwrite`` (no memory map kept)."""

    def __init__(self, path: Path, row_bytes: int):
        self.fd = os.open(path, os.O_WRONLY)
        self.offset = npy_data_offset(path)
        self.row_bytes = row_bytes

    def write(self, start_row: int, rows: np.ndarray) -> None:
        data = np.ascontiguousarray(rows).tobytes()
        position = self.offset + start_row * self.row_bytes
        while data:
            written = os.pwrite(self.fd, data, position)
            data, position = data[written:], position + written

    def close(self) -> None:
        os.close(self.fd)


class FeatureStore:
    """Read access to a FeatureStore directory.

    Example:
        >>> store = FeatureStore.open("features/vit_tiny__digits__1a2b3c4d5e6f")
        >>> x = store.features("train", block=11, pooling="cls")   # (n, dim) memory map
        >>> y = store.labels("train")                               # (n,) int64
    """

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | os.PathLike) -> "FeatureStore":
        """Open a store directory.

        Raises:
            BadInputError: No manifest, or a manifest of an unknown format version.
        """
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise BadInputError(f"{path} is not a feature store (no {MANIFEST}): run `mimprobe extract` first")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise BadInputError(f"{path}: feature store format {manifest.get('format_version')} is not "
                                f"{FORMAT_VERSION}; extract again with this version of mimprobe")
        return cls(path, manifest)

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["dataset"]["splits"])

    @property
    def blocks(self) -> list[int]:
        return list(self.manifest["blocks"])

    @property
    def poolings(self) -> list[str]:
        return list(self.manifest["poolings"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["dataset"]["classes"])

    def num_rows(self, split: str) -> int:
        self._check_split(split)
        return int(self.manifest["dataset"]["splits"][split])

    def _check_split(self, split: str) -> None:
        if split not in self.manifest["dataset"]["splits"]:
            raise BadInputError(f"split {split!r} not in store {self.path}: it has {', '.join(self.splits)}")

    def _check_ready(self, allow_partial: bool) -> None:
        if not self.complete and not allow_partial:
            raise BadInputError(f"feature store {self.path} is incomplete: rerun the same `mimprobe extract` "
                                "command to resume it")

    def valid_mask(self, split: str) -> np.ndarray:
        """(n,) bool: False for rows of images skipped as unreadable (listed in the manifest's bad_images)."""
        mask = np.ones(self.num_rows(split), dtype=bool)
        mask[[entry["index"] for entry in self.manifest["bad_images"] if entry["split"] == split]] = False
        return mask

    @property
    def labelled(self) -> bool:
        """Whether the data had class labels (an unlabelled image folder stores -1 everywhere)."""
        return bool(self.manifest["dataset"].get("labelled", True))

    def labels(self, split: str, *, valid_only: bool = True, allow_partial: bool = False) -> np.ndarray:
        """(n,) int64 class indices; -1 for unlabelled data and for skipped images (which ``valid_only`` removes)."""
        self._check_split(split)
        self._check_ready(allow_partial)
        labels = np.load(self.path / split / "labels.npy")
        return labels[self.valid_mask(split)] if valid_only and self.manifest["bad_images"] else labels

    def features(self, split: str, block: int, pooling: str = "cls", *, valid_only: bool = True,
                 allow_partial: bool = False) -> np.ndarray:
        """(n, dim) features of one block as a read-only memory map (a copy if skipped rows are removed).

        Raises:
            BadInputError: Unknown split, block or pooling, or an incomplete store.
        """
        self._check_split(split)
        if block not in self.blocks:
            raise BadInputError(f"block {block} not in store {self.path}: it has blocks {self.blocks}")
        if pooling not in self.poolings:
            raise BadInputError(f"pooling {pooling!r} not in store {self.path}: it has {', '.join(self.poolings)}")
        self._check_ready(allow_partial)
        features = np.load(self.path / split / feature_filename(block, pooling), mmap_mode="r")
        if valid_only and self.manifest["bad_images"]:
            return np.asarray(features[self.valid_mask(split)])
        return features

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        return (f"FeatureStore({str(self.path)!r}, {state}, splits={self.splits}, blocks={len(self.blocks)}, "
                f"poolings={self.poolings})")
