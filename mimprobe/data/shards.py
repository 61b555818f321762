"""Sharded layouts, as large image datasets are distributed: WebDataset tar shards and Hugging Face parquet files.

Read with the standard library's tarfile and with pyarrow (already a dependency), not the webdataset or datasets
packages: extraction reads image ``i`` by index (a fixed order, resumed per batch), which a tar member's data offset
and a parquet row group give directly, whereas webdataset only streams samples and datasets first copies the files
into its own Arrow cache.

Layouts (``ROOT`` is the folder given as DATA):

- tar: each uncompressed ``.tar`` shard holds ``KEY.jpg|jpeg|png|webp`` beside ``KEY.cls`` (the integer label as
  text); a sample is the members sharing a key (the member path up to the first dot of its name), in member order.
- parquet: a column ``image`` (a struct with ``bytes``, as the datasets ``Image`` feature writes it, or plain
  binary) and an integer column ``label``; rows in file, row-group and row order.
- splits: ``ROOT/train|val|validation|test/*.tar|parquet`` subfolders, or a split name in the file names
  (``train-000000.tar``, ``imagenet1k-validation-00.tar``, ``data/train-00000-of-00004.parquet``; the files directly
  in ROOT or in ROOT/data); without split names, all files form the split ``train``. Shards are read in name order.
- classes: ``ROOT/classes.txt`` (one name per line) or ``ROOT/classes.json`` (a list, or index -> name), else the
  datasets ``ClassLabel`` names in the parquet schema, else the label integers themselves.

Each DataLoader worker reads whole batches of consecutive indices, so it reads tar members and parquet row groups
in file order. The fingerprint hashes each shard's path, size, modification time and sampled content
(`file_signature`), the member index (names, offsets, sizes) or the row groups' row counts, and the labels: no image
is read. Memory: a tar reader keeps an offset, a size and a member name per image; a parquet reader keeps the image
bytes of one row group per process (datasets writes image row groups of at most 100 rows).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import tarfile
from pathlib import Path

import numpy as np

from ..errors import BadInputError
from .readers import decode_rgb
from .split import DataSource, Split, file_signature

SHARD_SUFFIXES = {"tar-shards": ".tar", "parquet": ".parquet"}
SHARD_KINDS = tuple(SHARD_SUFFIXES)
COMPRESSED_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "test"}
SPLIT_ORDER = ("train", "val", "test")
_SPLIT_IN_NAME = re.compile(r"(?:^|[-_.])(train|validation|valid|val|test)(?=$|[-_.0-9])")


def _files(folder: Path, suffix: str) -> list[Path]:
    return sorted(path for path in folder.iterdir()
                  if path.name.endswith(suffix) and not path.name.startswith(".") and path.is_file())


def _split_by_name(files: list[Path], suffix: str) -> dict[str, list[Path]]:
    """Group files by the split name in their names; no split name anywhere: all are ``train``."""
    named = {path: _SPLIT_IN_NAME.search(path.name[:-len(suffix)]) for path in files}
    if not any(named.values()):
        return {"train": files}
    unnamed = [path for path, match in named.items() if match is None]
    if unnamed:
        raise BadInputError(f"{unnamed[0]} has no split name (train, val, validation, test) while other shards beside "
                            "it do: name every shard by its split, or move the split's shards into a train/ folder")
    groups = {SPLIT_NAMES[match.group(1)]: [] for match in named.values()}
    for path, match in named.items():
        groups[SPLIT_NAMES[match.group(1)]].append(path)
    return {name: groups[name] for name in SPLIT_ORDER if name in groups}


def _shard_splits(root: Path, suffix: str) -> tuple[dict[str, list[Path]], str]:
    """Split name -> shard files (sorted), and the layout found; empty when ROOT holds no such shards."""
    for base in (root, root / "data"):
        if not base.is_dir():
            continue
        folders: dict[str, list[Path]] = {}
        for folder, split in SPLIT_NAMES.items():
            files = _files(base / folder, suffix) if (base / folder).is_dir() else []
            if files and split in folders:
                raise BadInputError(f"{base} has two folders for the {split} split ({folder} and another): keep one")
            if files:
                folders[split] = files
        relative = base.relative_to(root).as_posix()
        prefix = "root/" if relative == "." else f"root/{relative}/"
        if folders:
            return ({name: folders[name] for name in SPLIT_ORDER if name in folders},
                    f"{prefix}<split>/*{suffix}")
        files = _files(base, suffix)
        if files:
            return _split_by_name(files, suffix), f"{prefix}<split>-*{suffix}"
    return {}, ""


def detect_shards(root: Path) -> str | None:
    """``tar-shards`` or ``parquet`` when ROOT holds such files where the layouts look for them, else None."""
    found = [kind for kind, suffix in SHARD_SUFFIXES.items() if _shard_splits(root, suffix)[0]]
    if len(found) > 1:
        raise BadInputError(f"{root} holds both .tar and .parquet shards: point DATA to a folder of one kind")
    if found:
        return found[0]
    for base in (root, root / "data", *(root / folder for folder in SPLIT_NAMES)):
        compressed = [path for path in (base.iterdir() if base.is_dir() else ())
                      if path.name.endswith(COMPRESSED_TAR_SUFFIXES)]
        if compressed and not any(entry.is_dir() and entry.name not in (*SPLIT_NAMES, "data")
                                  for entry in root.iterdir()):
            raise BadInputError(f"{compressed[0]} is a compressed tar: shards are read by member offset, so "
                                "decompress them to .tar first (e.g. gunzip, or zstd -d)")
    return None


def _class_names_file(root: Path) -> tuple[list[str] | None, str]:
    """Class names from ROOT/classes.txt or ROOT/classes.json, with the file's name."""
    text_file, json_file = root / "classes.txt", root / "classes.json"
    if text_file.is_file():
        return [line.strip() for line in text_file.read_text().splitlines() if line.strip()], text_file.name
    if json_file.is_file():
        try:
            names = json.loads(json_file.read_text())
        except json.JSONDecodeError as error:
            raise BadInputError(f"{json_file} is not valid JSON ({error}): give a list of class names") from None
        if isinstance(names, dict):
            try:
                names = [names[str(index)] for index in range(len(names))]
            except KeyError:
                raise BadInputError(f"{json_file} maps keys other than 0..{len(names) - 1} to names: give a list "
                                    "of class names, or an object with the keys 0, 1, ...") from None
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise BadInputError(f"{json_file} must hold a list of class names (strings)")
        return names, json_file.name
    return None, ""


# --- tar shards -----------------------------------------------------------------------------------------------

class TarShardReader:
    """Images stored as members of uncompressed tar shards, read at their data offsets.

    Each process opens the shard it reads (the current one only) and reads members in the order asked, which a
    batch of consecutive indices makes the file order.
    """

    def __init__(self, shards: tuple[str, ...], shard: np.ndarray, offsets: np.ndarray, sizes: np.ndarray,
                 names: np.ndarray):
        self.shards = shards      # shard paths
        self.shard = shard        # (n,) int32 index into shards
        self.offsets = offsets    # (n,) int64 byte offset of each image member's data
        self.sizes = sizes        # (n,) int64 its size in bytes
        self.names = names        # (n,) bytes: its member name
        self._open: tuple[int, int, object] | None = None  # (pid, shard, file) of this process

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": None}  # a worker process opens its own file

    def _file(self, shard: int):
        if self._open is not None and self._open[:2] == (os.getpid(), shard):
            return self._open[2]
        if self._open is not None and self._open[0] == os.getpid():
            self._open[2].close()
        handle = open(self.shards[shard], "rb")
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        self._open = (os.getpid(), shard, handle)
        return handle

    def read(self, index: int):
        handle = self._file(int(self.shard[index]))
        handle.seek(int(self.offsets[index]))
        data = handle.read(int(self.sizes[index]))
        if len(data) != self.sizes[index]:
            raise OSError(f"shard ends {self.sizes[index] - len(data)} bytes early (truncated since it was indexed)")
        return decode_rgb(data)

    def describe(self, index: int) -> str:
        return f"{self.shards[self.shard[index]]}:{self.names[index].decode()}"

    def head(self, count: int) -> TarShardReader:
        return TarShardReader(self.shards, self.shard[:count], self.offsets[:count], self.sizes[:count],
                              self.names[:count])


def _index_tar(path: Path) -> list[tuple[str, int, int, int]]:
    """(image member name, data offset, size, label) of every sample of one shard, in member order."""
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(path, mode="r:") as archive:  # "r:": uncompressed only, read by offset later
            for member in archive:  # reads each header and seeks over the data
                if not member.isreg():
                    continue
                directory, name = posixpath.split(member.name)
                stem, dot, extension = name.partition(".")
                if not dot or not stem:
                    continue
                sample = samples.setdefault(posixpath.join(directory, stem), {})
                extension = extension.lower()
                if extension in TAR_IMAGE_EXTENSIONS:
                    if "image" in sample:
                        raise BadInputError(f"{path}: sample {posixpath.join(directory, stem)} has two images "
                                            f"({sample['image'][0]} and {member.name}): keep one image per key")
                    sample["image"] = (member.name, member.offset_data, member.size)
                elif extension == "cls":
                    text = archive.extractfile(member).read().strip()
                    try:
                        sample["label"] = int(text)
                    except ValueError:
                        raise BadInputError(f"{path}: {member.name} holds {text[:20]!r}, not an integer class "
                                            "label") from None
    except (tarfile.TarError, OSError) as error:
        raise BadInputError(f"cannot read {path} as an uncompressed tar shard ({error})") from None
    rows = []
    for key, sample in samples.items():
        if "image" in sample and "label" not in sample:
            raise BadInputError(f"{path}: sample {key} has an image but no {key}.cls label: add it (the integer "
                                "class) or remove the sample")
        if "label" in sample and "image" not in sample:
            raise BadInputError(f"{path}: sample {key} has a label but no image ({', '.join(TAR_IMAGE_EXTENSIONS)})")
        if "image" in sample:
            rows.append((*sample["image"], sample["label"]))
    return rows


def _tar_split(files: list[Path], root: Path, digest) -> tuple[np.ndarray, TarShardReader, list[str] | None]:
    shard, offsets, sizes, names, labels = [], [], [], [], []
    for number, path in enumerate(files):
        rows = _index_tar(path)
        digest.update(f"{path.relative_to(root).as_posix()}\t{file_signature(str(path))}\t{len(rows)}\n".encode())
        for name, offset, size, label in rows:
            digest.update(f"{name}\t{offset}\t{size}\n".encode())
            shard.append(number), offsets.append(offset), sizes.append(size), names.append(name.encode())
            labels.append(label)
    reader = TarShardReader(tuple(str(path) for path in files), np.asarray(shard, dtype=np.int32),
                            np.asarray(offsets, dtype=np.int64), np.asarray(sizes, dtype=np.int64),
                            np.asarray(names, dtype=bytes))
    return np.asarray(labels, dtype=np.int64), reader, None


# --- parquet ------------------------------------------------------------------------------------------------

class ParquetImageReader:
    """Images stored as encoded bytes in a parquet column, read one row group at a time (the last one is kept)."""

    def __init__(self, files: tuple[str, ...], group_file: np.ndarray, group_index: np.ndarray,
                 group_start: np.ndarray, file_start: np.ndarray, count: int):
        self.files = files              # parquet paths
        self.group_file = group_file    # (groups,) int32 index into files
        self.group_index = group_index  # (groups,) int32 row group number in its file
        self.group_start = group_start  # (groups,) int64 index of its first row in the split
        self.file_start = file_start    # (files,) int64 index of each file's first row in the split
        self.count = count
        self._cache: tuple[int, int, object] | None = None  # (pid, group, binary array of its images)
        self._parquet: tuple[int, int, object] | None = None  # (pid, file, ParquetFile)

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": None, "_parquet": None}

    def _group_images(self, group: int):
        pid = os.getpid()
        if self._cache is not None and self._cache[:2] == (pid, group):
            return self._cache[2]
        import pyarrow.parquet as pq

        file = int(self.group_file[group])
        if self._parquet is None or self._parquet[:2] != (pid, file):
            self._parquet = (pid, file, pq.ParquetFile(self.files[file]))
        column = self._parquet[2].read_row_group(int(self.group_index[group]), columns=["image"]).column("image")
        column = column.combine_chunks()
        images = column.field("bytes") if hasattr(column, "field") else column  # struct {bytes, path} or binary
        self._cache = (pid, group, images)
        return images

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.count:
            raise IndexError(f"row {index} of {self.count}")
        group = int(np.searchsorted(self.group_start, index, side="right")) - 1
        return group, index - int(self.group_start[group])

    def read(self, index: int):
        group, row = self._locate(index)
        data = self._group_images(group)[row].as_py()
        if data is None:
            raise ValueError("no image bytes in this row (only a path?): save the dataset with the images embedded")
        return decode_rgb(data)

    def describe(self, index: int) -> str:
        file = int(self.group_file[self._locate(index)[0]])
        return f"{self.files[file]} row {index - int(self.file_start[file])}"

    def head(self, count: int) -> ParquetImageReader:
        return ParquetImageReader(self.files, self.group_file, self.group_index, self.group_start, self.file_start,
                                  min(count, self.count))


def _datasets_class_names(schema) -> list[str] | None:
    """The ``label`` column's ClassLabel names, from the schema metadata that datasets writes."""
    try:
        info = json.loads((schema.metadata or {})[b"huggingface"])
        label = info["info"]["features"]["label"]
        return [str(name) for name in label["names"]] if label.get("_type") == "ClassLabel" else None
    except (KeyError, TypeError, ValueError):
        return None


def _parquet_split(files: list[Path], root: Path, digest) -> tuple[np.ndarray, ParquetImageReader, list[str] | None]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    group_file, group_index, group_rows, file_start, labels, names = [], [], [], [], [], None
    rows = 0
    for number, path in enumerate(files):
        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as error:
            raise BadInputError(f"cannot read {path} as a parquet file ({error})") from None
        schema = parquet.schema_arrow
        if "image" not in schema.names or "label" not in schema.names:
            raise BadInputError(f"{path} has the columns {', '.join(schema.names)}: parquet data needs a column "
                                "image (a struct with bytes, or binary) and an integer column label")
        image_type, label_type = schema.field("image").type, schema.field("label").type
        image_bytes = image_type.field("bytes").type if pa.types.is_struct(image_type) and \
            image_type.get_field_index("bytes") >= 0 else image_type
        if not (pa.types.is_binary(image_bytes) or pa.types.is_large_binary(image_bytes)):
            raise BadInputError(f"{path}: column image is {image_type}, not a struct with bytes or binary data")
        if not pa.types.is_integer(label_type):
            raise BadInputError(f"{path}: column label is {label_type}, not integer class indices")
        label = parquet.read(columns=["label"]).column("label")
        if label.null_count:
            raise BadInputError(f"{path}: {label.null_count} rows have no label: remove them or label them")
        labels.append(label.to_numpy())
        names = names if names is not None else _datasets_class_names(schema)
        file_start.append(rows)
        counts = [parquet.metadata.row_group(group).num_rows for group in range(parquet.metadata.num_row_groups)]
        for group, count in enumerate(counts):
            group_file.append(number), group_index.append(group), group_rows.append(rows)
            rows += count
        digest.update(f"{path.relative_to(root).as_posix()}\t{file_signature(str(path))}\t{counts}\n".encode())
    reader = ParquetImageReader(tuple(str(path) for path in files), np.asarray(group_file, dtype=np.int32),
                                np.asarray(group_index, dtype=np.int32), np.asarray(group_rows, dtype=np.int64),
                                np.asarray(file_start, dtype=np.int64), rows)
    return np.concatenate(labels).astype(np.int64), reader, names


# --- both -----------------------------------------------------------------------------------------------------

def load_shards(root: Path, kind: str) -> DataSource:
    """A `DataSource` over ROOT's tar shards (``kind="tar-shards"``) or parquet files (``kind="parquet"``).

    Raises:
        BadInputError: No train shards, unreadable shards, samples without image or label, labels outside the
            class names, a single class.
    """
    suffix = SHARD_SUFFIXES[kind]
    by_split, layout = _shard_splits(root, suffix)
    if "train" not in by_split:
        raise BadInputError(f"{root} has {suffix} shards for {'/'.join(by_split)} but none for train: add train "
                            f"shards (train/*{suffix} or train-*{suffix})")
    read_split = _tar_split if kind == "tar-shards" else _parquet_split
    digest = hashlib.sha256(f"{kind}\n".encode())
    splits, names_in_files = {}, None
    for name, files in by_split.items():
        digest.update(f"split {name}\n".encode())
        labels, reader, names = read_split(files, root, digest)
        if not len(labels):
            raise BadInputError(f"no images in the {name} shards of {root} ({files[0].name}, ...)")
        splits[name] = Split(name, labels, reader)
        names_in_files = names_in_files or names
    names, names_from = _class_names_file(root)
    if names is None and names_in_files is not None:
        names, names_from = names_in_files, "the parquet schema (datasets ClassLabel)"
    for name, split in splits.items():
        if split.labels.min() < 0:  # datasets writes -1 for unlabelled rows (ImageNet's test split)
            raise BadInputError(f"{root}: the {name} split has label {split.labels.min()} (unlabelled rows): "
                                f"labels are class indices 0, 1, ...; move the {name} shards out of {root}")
    highest = max(int(split.labels.max()) for split in splits.values())
    if names is None:
        names, names_from = [str(index) for index in range(highest + 1)], "the label integers"
    elif highest >= len(names):
        raise BadInputError(f"{root}: label {highest} has no class name ({names_from} names {len(names)} classes): "
                            "fix the labels or the class names")
    if len(np.unique(splits["train"].labels)) < 2:
        raise BadInputError(f"only one class ({names[int(splits['train'].labels[0])]}) in the train shards of "
                            f"{root}: class-wise evaluation needs at least 2")
    for name, split in splits.items():
        digest.update(f"labels {name}\n".encode() + split.labels.tobytes())
    digest.update(json.dumps(names).encode())
    details = {"root": str(root.resolve()), "layout": layout, "classes_from": names_from,
               "shards": {name: len(files) for name, files in by_split.items()}}
    return DataSource(name=str(root), kind=kind, classes=tuple(names), splits=splits,
                      fingerprint=digest.hexdigest(), details=details)
