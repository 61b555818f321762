"""The FeatureStore: a directory of per-(split, block, point, pooling) ``.npy`` files and a manifest.

Layout::

    manifest.json                             format version, content key, model/data identity, progress, completion
    {split}/labels.npy                        (n,) int64; -1 for unlabelled data and images skipped as unreadable
    {split}/block{BB}_{pooling}.npy           (n, dim) float16 or float32: the block's output (point ``block``);
                                              pooling "cls+mean" is written "cls_mean"
    {split}/block{BB}_{point}_{pooling}.npy   a point inside the block (``attn``, ``mlp_hidden``, ...; see
                                              `mimprobe.features.points`), of its own width

The manifest's ``points`` lists the points (a manifest without it, as written before points existed, holds the
``block`` point alone); ``point_feature_dims`` gives the width of every other point per block and pooling.

Rows are written in place at their dataset index (``os.pwrite`` into pre-sized ``.npy`` files), so memory is
bounded by the batch and an interrupted run resumes at the last recorded row. Under torchrun several processes
write disjoint batches of the same files, each recording its progress in ``progress.rank{R}.json`` until rank 0
folds them into the manifest (`mimprobe.features.progress`). The manifest holds no timestamps:
a resumed store ends byte-identical to an uninterrupted one.

A store is checked every time it is opened (`verify_structure`: the manifest's schema and key, and every file's
``.npy`` header, shape, dtype and byte size, without reading the data), so a truncated file or a hand-edited
manifest fails with one line naming the file instead of an mmap error later. `verify_content` also reads every
value (``extract --verify``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .._disk import DiskFullError, disk_full_guard, free_bytes
from .._run_folder import write_json_atomic  # noqa: F401  (the manifests' writer; features.progress imports it here)
from ..errors import BadInputError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
from ..choices import STORE_DTYPES  # noqa: E402  (one definition, with the options)
STORE_POOLINGS = ("cls", "mean", "cls+mean")
from ..choices import POINTS as STORE_POINTS  # noqa: E402
CHUNK_ROWS = 65536  # rows read at a time by verify_content


class DamagedStoreError(BadInputError):
    """A store's manifest or files do not match each other (truncated, hand-edited, half-copied); exit code 2."""

    def __init__(self, path: Path, file: str, problem: str):
        super().__init__(f"feature store {path} is damaged: {file} {problem}; extract it again with the same "
                         "`mimprobe extract` command and --overwrite (or delete the folder)")
        self.file = file


def store_key(key_fields: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that changes the stored numbers."""
    return hashlib.sha256(json.dumps(key_fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def feature_filename(block: int, pooling: str, point: str = "block") -> str:
    """``block03_cls.npy`` for a block's output, ``block03_mlp_hidden_cls.npy`` for a point inside it."""
    middle = "" if point == "block" else f"{point}_"
    return f"block{block:02d}_{middle}{pooling.replace('+', '_')}.npy"


def manifest_points(manifest: dict[str, Any]) -> list[str]:
    """The points of a store; ``["block"]`` for a manifest written before points existed."""
    return list(manifest.get("points") or ["block"])


def feature_arrays(manifest: dict[str, Any]) -> list[tuple[int, str, str]]:
    """Every (block, point, pooling) array of a store, in file order."""
    return [(block, point, pooling) for block in manifest["blocks"] for point in manifest_points(manifest)
            for pooling in manifest["poolings"]]


def create_npy(path: Path, shape: tuple[int, ...], dtype: str) -> int:
    """Create a zero-filled (sparse) ``.npy`` file of the given shape; return the byte offset of its data."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=shape)
    offset = array.offset
    del array
    return offset


def create_store(store_dir: str | os.PathLike, manifest: dict[str, Any], labels: dict[str, np.ndarray]) -> Path:
    """Create a store's folders, ``labels.npy`` files and zero-filled (sparse) feature files for the splits,
    blocks, poolings, widths and dtype of ``manifest``, then write the manifest (last: its presence means every
    file exists). Rows are then written in place with `RowWriter` (or ``np.load(..., mmap_mode="r+")``).

    Args:
        store_dir: The new store's folder (must not exist).
        manifest: A manifest as `extract` writes it (the schema `verify_structure` checks).
        labels: Per split, the (rows,) integer labels.

    Raises:
        DamagedStoreError: The manifest's fields do not fit together (nothing is written).
        BadInputError: Labels missing for a split or of the wrong length.
    """
    store_dir = Path(store_dir)
    problem = _schema_problem(manifest)
    if problem:
        raise DamagedStoreError(store_dir, MANIFEST, problem)
    for split, rows in manifest["dataset"]["splits"].items():
        if split not in labels or len(labels[split]) != rows:
            raise BadInputError(f"create_store: labels of split {split!r} must have {rows} entries")
    needed = store_bytes(manifest)
    free = free_bytes(store_dir.parent)
    if free is not None and free < needed:  # the feature files are sparse: they would fill up while extracting
        raise DiskFullError(store_dir, needed)
    store_dir.mkdir(parents=True)
    try:
        with disk_full_guard(store_dir, needed):
            for split, rows in manifest["dataset"]["splits"].items():
                (store_dir / split).mkdir()
                np.save(store_dir / split / "labels.npy", np.asarray(labels[split]).astype(np.int64))
                for block, point, pooling in feature_arrays(manifest):
                    create_npy(store_dir / split / feature_filename(block, pooling, point),
                               (rows, _declared_dim(manifest, block, pooling, point)), manifest["dtype"])
            write_json_atomic(store_dir / MANIFEST, manifest)
    except BaseException:
        shutil.rmtree(store_dir, ignore_errors=True)  # nothing in it was recorded yet
        raise
    return store_dir


def store_bytes(manifest: dict[str, Any]) -> int:
    """Bytes of a store's labels and feature files once every row is written."""
    itemsize = np.dtype(manifest["dtype"]).itemsize
    total = 0
    for rows in manifest["dataset"]["splits"].values():
        total += 8 * rows
        for block, point, pooling in feature_arrays(manifest):
            total += rows * int(_declared_dim(manifest, block, pooling, point)) * itemsize
    return total


def remaining_bytes(store_dir: Path) -> int | None:
    """Bytes of the feature rows a store's manifest does not record as written yet: what the rest of its
    extraction writes (None when the manifest cannot be read)."""
    try:
        manifest = json.loads((Path(store_dir) / MANIFEST).read_text())
        itemsize = np.dtype(manifest["dtype"]).itemsize
        return sum((rows - int(manifest["progress"].get(split, 0)))
                   * int(_declared_dim(manifest, block, pooling, point)) * itemsize
                   for split, rows in manifest["dataset"]["splits"].items()
                   for block, point, pooling in feature_arrays(manifest))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def npy_data_offset(path: Path) -> int:
    """Byte offset of the data in an existing ``.npy`` file."""
    return np.load(path, mmap_mode="r").offset


def read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) from a ``.npy`` header, reading nothing else.

    Raises:
        ValueError: Not a ``.npy`` file, an unknown header version, a Fortran-ordered array.
    """
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(handle)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        if fortran_order:
            raise ValueError("is Fortran-ordered")
        return tuple(shape), np.dtype(dtype), handle.tell()


def _schema_problem(manifest: Any) -> str | None:
    """What is wrong with a manifest's fields (types, ranges, agreement with its key), or None."""
    if not isinstance(manifest, dict):
        return "is not a JSON object"
    expected = {"format_version": int, "key": str, "key_fields": dict, "model": dict, "dataset": dict,
                "blocks": list, "poolings": list, "norm": str, "dtype": str, "batch_size": int, "progress": dict,
                "bad_images": list, "complete": bool}
    for name, kind in expected.items():
        if not isinstance(manifest.get(name), kind) or (kind is int and isinstance(manifest.get(name), bool)):
            return f"lacks {name!r} or it is not a {kind.__name__}"
    dataset = manifest["dataset"]
    splits = dataset.get("splits")
    if not isinstance(splits, dict) or not splits or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in splits.values()):
        return "has no valid dataset.splits (split name -> number of rows)"
    if not isinstance(dataset.get("classes"), list) or not isinstance(dataset.get("fingerprint"), str):
        return "lacks dataset.classes or dataset.fingerprint"
    if not manifest["blocks"] or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0
                                         for b in manifest["blocks"]):
        return "has no valid blocks (0-based integers)"
    if not manifest["poolings"] or any(p not in STORE_POOLINGS for p in manifest["poolings"]):
        return f"has poolings {manifest['poolings']}, not among {', '.join(STORE_POOLINGS)}"
    points = manifest.get("points", ["block"])
    if not isinstance(points, list) or not points or any(p not in STORE_POINTS for p in points) \
            or len(set(points)) != len(points):
        return f"has points {points}, not a list of distinct ones among {', '.join(STORE_POINTS)}"
    if manifest["dtype"] not in STORE_DTYPES:
        return f"has dtype {manifest['dtype']!r}, not {' or '.join(STORE_DTYPES)}"
    if manifest["batch_size"] < 1:
        return "has a batch_size below 1"
    if set(manifest["progress"]) != set(splits) or not all(
            isinstance(done, int) and 0 <= done <= splits[name] for name, done in manifest["progress"].items()):
        return "has progress that does not fit its splits (0 <= rows done <= rows, for every split)"
    if manifest["complete"] and any(manifest["progress"][name] != n for name, n in splits.items()):
        return "says complete but its progress is not at the end of every split"
    for entry in manifest["bad_images"]:
        if not isinstance(entry, dict) or entry.get("split") not in splits or not isinstance(entry.get("index"), int) \
                or not 0 <= entry["index"] < splits[entry["split"]]:
            return f"has a bad_images entry that names no row of the store: {entry}"
    if manifest["key"] != store_key(manifest["key_fields"]):
        return "has key_fields that no longer give its key (edited by hand?)"
    key_fields = manifest["key_fields"]
    if key_fields.get("points", ["block"]) != points:  # the key holds points other than block alone
        return "has points that differ from its key_fields (edited by hand?)"
    for name, value in (("blocks", manifest["blocks"]), ("poolings", manifest["poolings"]),
                        ("norm", manifest["norm"]), ("dtype", manifest["dtype"]),
                        ("dataset", dataset["fingerprint"])):
        if name in key_fields and key_fields[name] != value:
            return f"has {name} that differ from its key_fields (edited by hand?)"
    for block, point, pooling in feature_arrays(manifest):
        dim = _declared_dim(manifest, block, pooling, point)
        where = f"block {block}" + (f" point {point}" if point != "block" else "")
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            return f"has no feature width for {where} ({pooling})"
        if point != "block":
            continue
        per_block = (manifest.get("block_feature_dims") or {}).get(str(block), {}).get(pooling, dim)
        if per_block != dim:
            return f"declares width {dim} and {per_block} for {where} ({pooling})"
    return None


def _declared_dim(manifest: dict[str, Any], block: int, pooling: str, point: str = "block") -> Any:
    """The width the manifest declares for one block's pooled features: ``feature_dims`` (per pooling), or
    ``block_feature_dims`` (per block and pooling) where the blocks differ in width and ``feature_dims`` is null;
    for a point inside the block, ``point_feature_dims`` (per point, block and pooling)."""
    if point != "block":
        by_point = manifest.get("point_feature_dims")
        by_block = by_point.get(point) if isinstance(by_point, dict) else None
        by_pooling = by_block.get(str(block)) if isinstance(by_block, dict) else None
        return by_pooling.get(pooling) if isinstance(by_pooling, dict) else None
    dims = manifest.get("feature_dims")
    if isinstance(dims, dict) and dims.get(pooling) is not None:
        return dims[pooling]
    per_block = manifest.get("block_feature_dims")
    return (per_block.get(str(block)) or {}).get(pooling) if isinstance(per_block, dict) else None


def verify_structure(path: Path, manifest: dict[str, Any]) -> None:
    """Check the manifest's schema and every file's header, shape, dtype and byte size (no data is read).

    Raises:
        DamagedStoreError: The first problem, naming the file.
    """
    problem = _schema_problem(manifest)
    if problem:
        raise DamagedStoreError(path, MANIFEST, problem)
    files = [(f"{split}/labels.npy", (n,), np.dtype("<i8")) for split, n in manifest["dataset"]["splits"].items()]
    files += [(f"{split}/{feature_filename(block, pooling, point)}",
               (n, _declared_dim(manifest, block, pooling, point)), np.dtype(manifest["dtype"]).newbyteorder("<"))
              for split, n in manifest["dataset"]["splits"].items()
              for block, point, pooling in feature_arrays(manifest)]
    for name, shape, dtype in files:
        file = path / name
        if not file.is_file():
            raise DamagedStoreError(path, name, "is missing")
        try:
            found_shape, found_dtype, offset = read_npy_header(file)
        except (OSError, ValueError) as error:
            raise DamagedStoreError(path, name, f"is not a readable .npy file ({error})") from None
        if found_shape != shape:
            raise DamagedStoreError(path, name, f"has shape {found_shape} but {MANIFEST} says {shape}")
        if found_dtype != dtype:
            raise DamagedStoreError(path, name, f"holds {found_dtype} but {MANIFEST} says {dtype}")
        expected_bytes = offset + int(np.prod(shape)) * dtype.itemsize
        size = file.stat().st_size
        if size != expected_bytes:
            state = "truncated" if size < expected_bytes else "longer than its header says"
            raise DamagedStoreError(path, name, f"is {size:,} bytes, not {expected_bytes:,} ({state})")


def verify_content(path: Path, manifest: dict[str, Any]) -> None:
    """Read every recorded row: features finite and never all zero except skipped images; labels in range.

    A row of zeros where a row was recorded means a write that never reached the disk (the files are pre-sized
    with zeros); a pooled transformer feature is never exactly zero.

    Raises:
        DamagedStoreError: The first problem, naming the file and the row.
    """
    verify_structure(path, manifest)
    num_classes = len(manifest["dataset"]["classes"])
    for split, n in manifest["dataset"]["splits"].items():
        done = manifest["progress"][split]
        skipped = np.zeros(n, dtype=bool)
        skipped[[e["index"] for e in manifest["bad_images"] if e["split"] == split]] = True
        low, high = (0, num_classes - 1) if manifest["dataset"].get("labelled", True) else (-1, -1)
        labels = np.load(path / split / "labels.npy")  # (n,) int64: written in full when the store was made
        wrong = np.flatnonzero(~skipped & ((labels < low) | (labels > high)))
        if len(wrong):
            raise DamagedStoreError(path, f"{split}/labels.npy", f"has label {labels[wrong[0]]} at row {wrong[0]}, "
                                    f"outside {low}..{high}")
        for block, point, pooling in feature_arrays(manifest):
            name = f"{split}/{feature_filename(block, pooling, point)}"
            features = np.load(path / name, mmap_mode="r")
            for start in range(0, done, CHUNK_ROWS):
                rows = np.asarray(features[start:min(done, start + CHUNK_ROWS)], dtype=np.float32)
                bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
                if len(bad):
                    raise DamagedStoreError(path, name, f"has NaN or Inf in row {start + bad[0]}")
                empty = np.flatnonzero(~rows.any(axis=1) & ~skipped[start:start + len(rows)])
                if len(empty):
                    raise DamagedStoreError(path, name, f"has an all-zero row {start + empty[0]} that was "
                                            "recorded as written (a lost write)")
            del features


class RowWriter:
    """Writes rows into a pre-sized ``.npy`` file at their index with ``os.pwrite`` (no memory map kept)."""

    def __init__(self, path: Path, row_bytes: int):
        self.path = Path(path)
        self.fd = os.open(path, os.O_WRONLY)
        self.offset = read_npy_header(path)[2]  # the header alone: no memory map per file
        self.row_bytes = row_bytes

    def write(self, start_row: int, rows: np.ndarray) -> None:
        """Write ``rows`` from row ``start_row`` on. A full disk raises `mimprobe._disk.DiskFullError` naming this
        file and what the store still needs; the rows recorded in the manifest before stay intact."""
        data = np.ascontiguousarray(rows).tobytes()
        position = self.offset + start_row * self.row_bytes
        with disk_full_guard(self.path, lambda: remaining_bytes(self.path.parent.parent)):
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
    def open(cls, path: str | os.PathLike, *, verify: bool = False) -> "FeatureStore":
        """Open a store directory and check its structure (`verify_structure`); ``verify`` also reads every value
        (`verify_content`).

        Raises:
            BadInputError: No manifest, or a manifest of an unknown format version.
            DamagedStoreError: A manifest or file that does not fit (one line naming the file).
        """
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise BadInputError(f"{path} is not a feature store (no {MANIFEST}): run `mimprobe extract` first")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (UnicodeDecodeError, ValueError) as error:
            raise DamagedStoreError(path, MANIFEST, f"is not valid JSON ({error})") from None
        if isinstance(manifest, dict) and manifest.get("format_version") != FORMAT_VERSION:
            raise BadInputError(f"{path}: feature store format {manifest.get('format_version')} is not "
                                f"{FORMAT_VERSION}; extract again with this version of mimprobe")
        (verify_content if verify else verify_structure)(path, manifest)
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
    def points(self) -> list[str]:
        """Where the blocks were read: ``block`` (their outputs) and points inside them (`mimprobe.features.points`)."""
        return manifest_points(self.manifest)

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

    def features(self, split: str, block: int, pooling: str = "cls", *, point: str = "block",
                 valid_only: bool = True, allow_partial: bool = False) -> np.ndarray:
        """(n, dim) features of one block (its output, or the point ``point`` inside it) as a read-only memory map
        (a copy if skipped rows are removed).

        Raises:
            BadInputError: Unknown split, block, point or pooling, or an incomplete store.
        """
        self._check_split(split)
        if block not in self.blocks:
            raise BadInputError(f"block {block} not in store {self.path}: it has blocks {self.blocks}")
        if pooling not in self.poolings:
            raise BadInputError(f"pooling {pooling!r} not in store {self.path}: it has {', '.join(self.poolings)}")
        if point not in self.points:
            raise BadInputError(f"point {point!r} not in store {self.path}: it has {', '.join(self.points)} (extract "
                                f"with --points {point})")
        self._check_ready(allow_partial)
        features = np.load(self.path / split / feature_filename(block, pooling, point), mmap_mode="r")
        if valid_only and self.manifest["bad_images"]:
            return np.asarray(features[self.valid_mask(split)])
        return features

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        return (f"FeatureStore({str(self.path)!r}, {state}, splits={self.splits}, blocks={len(self.blocks)}, "
                f"poolings={self.poolings}, points={self.points})")
