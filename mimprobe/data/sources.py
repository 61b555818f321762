"""Data sources: ImageFolder directories, sharded folders (`shards`: WebDataset tar shards, Hugging Face parquet
files), ``.npz`` arrays, and the built-ins ``digits`` and ``synthetic``.

Every source becomes a `DataSource`: named splits of labelled images in a deterministic order, each read one
image per index (so extraction memory is bounded by the batch; only a ``.npz`` and ``digits`` are held in memory,
as arrays), the class names, and a fingerprint that goes into the FeatureStore key: for arrays, their bytes; for
image files, each file's path, label, size, modification time (ns) and a sampled content hash (`file_signature`),
so that images replaced by others, even of the same size and with their old modification time restored, give
another key; for ``synthetic``, its parameters and the generator's version.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import BadInputError
from .readers import ArrayReader, FileReader, array_to_input
from .shards import SHARD_KINDS, detect_shards, load_shards
from .split import SAMPLE_BYTES, DataSource, Split, file_signature

__all__ = ["BUILTINS", "DataSource", "IMAGE_EXTENSIONS", "SAMPLE_BYTES", "Split", "file_signature", "load_data"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_DIRS = ("train", "val", "test")
BUILTINS = ("digits", "synthetic")

# digits: scikit-learn's 1,797 8x8 handwritten digits, split once with a stratified shuffle
# (train_test_split, test_size=450, random_state=0): 1,347 train / 450 test, each in ascending index order.
DIGITS_TEST_SIZE = 450
DIGITS_SPLIT_SEED = 0


def load_data(spec: str | os.PathLike) -> DataSource:
    """Open a data source.

    Args:
        spec: An ImageFolder directory (``root/<class>/*`` becomes the single split ``train``; ``root/*`` without
            class folders is one unlabelled split ``train``, labels -1;
            ``root/train`` plus ``root/val`` and/or ``root/test`` become those splits), a folder of WebDataset
            ``.tar`` shards or of Hugging Face ``.parquet`` files (`shards.load_shards`), a ``.npz`` file with
            ``x_train, y_train, x_test, y_test``, ``digits``, or ``synthetic`` (optionally
            ``synthetic:classes=10,train=50,test=20,size=32,seed=0``).

    Raises:
        BadInputError: A missing path, no images, a single class, malformed arrays or shards.
    """
    text = str(spec)
    if text == "digits":
        return _digits()
    if text == "synthetic" or text.startswith("synthetic:"):
        return _synthetic(text.partition(":")[2])
    path = Path(text).expanduser()
    if not path.exists():
        raise BadInputError(
            f"data {text!r} not found: give an image folder, a folder of .tar or .parquet shards, a .npz file, or "
            f"a built-in name ({', '.join(BUILTINS)})")
    if path.is_dir():
        shards = detect_shards(path)
        return load_shards(path, shards) if shards in SHARD_KINDS else _image_folder(path)
    if path.suffix == ".npz":
        return _npz(path)
    raise BadInputError(f"data {text!r} is a file but not a .npz: give an image folder or a .npz of arrays")


# --- ImageFolder --------------------------------------------------------------------------------------------

def _class_dirs(directory: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(directory) if entry.is_dir() and not entry.name.startswith("."))


class _Walk:
    """Image files under folders, following symbolic links to folders once: every real folder (device, inode) is
    read at most once per data source, so a link back to a folder above it (a loop) or a second link to a folder
    already read is skipped and listed in ``skipped`` instead of repeating its images under other labels."""

    def __init__(self, root: Path):
        self.seen: set[tuple[int, int]] = set()
        self.skipped: list[str] = []
        self.root = root

    def enter(self, directory: str) -> bool:
        status = os.stat(directory)
        key = (status.st_dev, status.st_ino)
        if key in self.seen:
            self.skipped.append(os.path.relpath(directory, self.root))
            return False
        self.seen.add(key)
        return True

    def image_files(self, directory: str | Path) -> list[str]:
        """Sorted image files of ``directory`` and then of its sub-folders (sorted), depth first, as `os.walk`."""
        directory = str(directory)
        if not self.enter(directory):
            return []
        entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        files = [entry.path for entry in entries if not entry.is_dir() and not entry.name.startswith(".")
                 and entry.name.lower().endswith(IMAGE_EXTENSIONS)]
        for entry in entries:
            if entry.is_dir():
                files.extend(self.image_files(entry.path))
        return files


def _image_files(directory: Path) -> list[str]:
    return _Walk(directory).image_files(directory)


def _scan_split(directory: Path, class_to_index: dict[str, int] | None,
                walk: _Walk) -> tuple[list[str], list[int], list[str]]:
    classes = _class_dirs(directory)
    paths: list[str] = []
    labels: list[int] = []
    index = class_to_index if class_to_index is not None else {name: i for i, name in enumerate(classes)}
    for name in classes:
        if name not in index:
            raise BadInputError(
                f"class folder {directory / name} does not exist in the train split: "
                "every split must use the train split's classes")
        files = walk.image_files(directory / name)
        paths.extend(files)
        labels.extend([index[name]] * len(files))
    return paths, labels, classes


def _image_folder(root: Path) -> DataSource:
    split_dirs = {name: root / name for name in SPLIT_DIRS if (root / name).is_dir()}
    if "train" in split_dirs:
        layout = "root/" + "+".join(split_dirs) + "/<class>/*"
    elif split_dirs:
        raise BadInputError(
            f"{root} has {'/'.join(split_dirs)} but no train folder: add {root}/train/<class>/* or "
            f"point to a folder of class folders")
    else:
        split_dirs, layout = {"train": root}, "root/<class>/*"
    walk = _Walk(root)
    for directory in {root, *split_dirs.values()}:  # a link back to the root or a split folder is a loop
        status = os.stat(directory)
        walk.seen.add((status.st_dev, status.st_ino))
    train_paths, train_labels, classes = _scan_split(split_dirs["train"], None, walk)
    if not classes and layout == "root/<class>/*":
        unlabelled = [path for path in _image_files(root) if os.path.dirname(path) == str(root)]
        if unlabelled:
            return _unlabelled_folder(root, unlabelled)
    if not train_paths:
        raise BadInputError(
            f"no images found in {split_dirs['train']}: expected {split_dirs['train']}/<class>/*.jpg "
            f"(extensions: {', '.join(IMAGE_EXTENSIONS)})")
    used = sorted(set(train_labels))
    if len(used) < 2:
        only = classes[used[0]] if used else "none"
        raise BadInputError(
            f"only one class ({only}) with images in {split_dirs['train']}: "
            "class-wise evaluation needs at least 2 class folders with images")
    class_to_index = {name: i for i, name in enumerate(classes)}
    splits = {"train": Split("train", np.asarray(train_labels, dtype=np.int64), FileReader(tuple(train_paths)))}
    for name, directory in split_dirs.items():
        if name == "train":
            continue
        paths, labels, _ = _scan_split(directory, class_to_index, walk)
        if not paths:
            raise BadInputError(f"no images found in the {name} split {directory}: remove the folder or add images")
        splits[name] = Split(name, np.asarray(labels, dtype=np.int64), FileReader(tuple(paths)))
    digest = hashlib.sha256()
    for name, split in splits.items():
        for path, label in zip(split.reader.paths, split.labels.tolist()):
            rel = os.path.relpath(path, root)
            digest.update(f"{name}\t{rel}\t{file_signature(path)}\t{label}\n".encode())
    digest.update(json.dumps(classes).encode())
    details = {"root": str(root.resolve()), "layout": layout}
    if walk.skipped:  # not in the fingerprint: the images read are what counts
        details["skipped_folders"] = walk.skipped
    return DataSource(name=str(root), kind="imagefolder", classes=tuple(classes), splits=splits,
                      fingerprint=digest.hexdigest(), details=details)


def _unlabelled_folder(root: Path, paths: list[str]) -> DataSource:
    """root/*.jpg without class folders: one split of unlabelled images (label-free metrics only)."""
    digest = hashlib.sha256(b"unlabelled\n")
    for path in paths:
        digest.update(f"{os.path.relpath(path, root)}\t{file_signature(path)}\n".encode())
    split = Split("train", np.full(len(paths), -1, dtype=np.int64), FileReader(tuple(paths)))
    return DataSource(name=str(root), kind="imagefolder", classes=(), splits={"train": split},
                      fingerprint=digest.hexdigest(), details={"root": str(root.resolve()), "layout": "root/*"},
                      labelled=False)


# --- arrays ---------------------------------------------------------------------------------------------

def _array_fingerprint(kind: str, splits: dict[str, Split], classes: tuple[str, ...], extra: str = "") -> str:
    digest = hashlib.sha256(f"{kind}\n{extra}\n{json.dumps(list(classes))}\n".encode())
    for name, split in splits.items():
        images = np.ascontiguousarray(split.reader.images)
        digest.update(f"{name}\t{images.dtype}\t{images.shape}\n".encode())
        digest.update(memoryview(images).cast("B"))
        digest.update(np.ascontiguousarray(split.labels).tobytes())
    return digest.hexdigest()


def _check_images(path: Path, key: str, images: np.ndarray) -> np.ndarray:
    if images.dtype == np.uint8:
        if images.ndim == 3:  # (n, H, W) grayscale
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
            raise BadInputError(
                f"{path}: {key} is uint8 of shape {images.shape}; expected (n, H, W, C) with C in 1, 3, 4")
        return images
    if np.issubdtype(images.dtype, np.floating):
        if images.ndim != 4 or images.shape[1] not in (1, 3, 4):
            raise BadInputError(
                f"{path}: {key} is {images.dtype} of shape {images.shape}; expected (n, C, H, W) with C in 1, 3, 4")
        if not np.isfinite(images).all():
            raise BadInputError(f"{path}: {key} contains NaN or Inf values; clean the array first")
        return images.astype(np.float32, copy=False)
    raise BadInputError(f"{path}: {key} has dtype {images.dtype}; use uint8 (n, H, W, C) or float (n, C, H, W) in [0, 1]")


def _npz(path: Path) -> DataSource:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as error:  # zipfile / ValueError for object arrays
        raise BadInputError(f"cannot read {path} as a .npz of plain arrays: {error}") from None
    missing = [key for key in ("x_train", "y_train", "x_test", "y_test") if key not in arrays]
    if missing:
        raise BadInputError(f"{path} lacks {', '.join(missing)}: a .npz needs x_train, y_train, x_test, y_test")
    raw_labels = {}
    for split in ("train", "test"):
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) != len(images):
            raise BadInputError(
                f"{path}: y_{split} must be 1-D integers with one label per image "
                f"(got shape {labels.shape}, dtype {labels.dtype}, {len(images)} images)")
        raw_labels[split] = labels
    values = np.unique(np.concatenate(list(raw_labels.values())))
    if len(np.unique(raw_labels["train"])) < 2:
        raise BadInputError(f"{path}: y_train holds a single class; class-wise evaluation needs at least 2")
    classes = tuple(str(v) for v in values.tolist())
    splits = {
        split: Split(split, np.searchsorted(values, raw_labels[split]).astype(np.int64),
                     ArrayReader(_check_images(path, f"x_{split}", arrays[f"x_{split}"]), split))
        for split in ("train", "test")
    }
    return DataSource(name=str(path), kind="npz", classes=classes, splits=splits,
                      fingerprint=_array_fingerprint("npz", splits, classes), details={"path": str(path.resolve())})


def _digits() -> DataSource:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # (1797, 8, 8, 1)
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=DIGITS_TEST_SIZE,
                                           stratify=labels, random_state=DIGITS_SPLIT_SEED)
    splits = {name: Split(name, labels[np.sort(idx)], ArrayReader(images[np.sort(idx)], name))
              for name, idx in (("train", train_idx), ("test", test_idx))}
    classes = tuple(str(i) for i in range(10))
    return DataSource(name="digits", kind="digits", classes=classes, splits=splits,
                      fingerprint=_array_fingerprint("digits", splits, classes),
                      details={"split": f"stratified train_test_split(test_size={DIGITS_TEST_SIZE}, "
                                        f"random_state={DIGITS_SPLIT_SEED})"})


SYNTHETIC_DEFAULTS = {"classes": 10, "train": 50, "test": 20, "size": 32, "seed": 0}
SYNTHETIC_VERSION = 2  # 2: each image drawn from its own generator (seed, split, index); 1 drew whole splits
SYNTHETIC_SPLITS = ("train", "test")


@dataclass(frozen=True, eq=False)
class SyntheticGratings:
    """Images of one synthetic split, each generated from its index alone (nothing held in memory).

    Class ``c`` is an oriented sinusoidal grating of its own angle, frequency and colour (drawn once from
    ``seed``); image ``index`` of the split has label ``index // per_class``, a random phase and Gaussian pixel
    noise (sd 0.08) drawn from ``numpy.random.default_rng([seed, split number, index])``: (size, size, 3) uint8.
    """

    angles: np.ndarray   # (classes,) radians
    freqs: np.ndarray    # (classes,) cycles per image
    colours: np.ndarray  # (classes, 3) in [0.2, 1]
    size: int
    seed: int
    split_number: int    # position in SYNTHETIC_SPLITS: train and test images differ
    per_class: int
    count: int           # images in this reader: classes * per_class, or fewer after `head`

    def __len__(self) -> int:
        return self.count

    def pixels(self, index: int) -> np.ndarray:
        """Image ``index`` as (size, size, 3) uint8."""
        if not 0 <= index < self.count:
            raise IndexError(f"synthetic image {index} of {self.count}")
        rng = np.random.default_rng([self.seed, self.split_number, index])
        label = index // self.per_class
        yy, xx = np.mgrid[0:self.size, 0:self.size] / self.size
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * self.freqs[label]
                      * (np.cos(self.angles[label]) * xx + np.sin(self.angles[label]) * yy) + phase)
        image = 0.5 + 0.4 * wave[..., None] * self.colours[label]
        image += rng.normal(0, 0.08, image.shape)
        return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)

    def read(self, index: int):
        return array_to_input(self.pixels(index))

    def describe(self, index: int) -> str:
        return f"{SYNTHETIC_SPLITS[self.split_number]}[{index}]"

    def head(self, count: int) -> SyntheticGratings:
        return replace(self, count=min(count, self.count))


def _synthetic(options: str) -> DataSource:
    params = dict(SYNTHETIC_DEFAULTS)
    for item in filter(None, (part.strip() for part in options.split(","))):
        key, _, value = item.partition("=")
        if key not in params or not value.isdigit():
            raise BadInputError(
                f"invalid synthetic option {item!r}: use synthetic:classes=10,train=50,test=20,size=32,seed=0")
        params[key] = int(value)
    if params["classes"] < 2 or params["train"] < 1 or params["test"] < 1 or params["size"] < 4:
        raise BadInputError("synthetic needs classes >= 2, train >= 1, test >= 1 and size >= 4")
    rng = np.random.default_rng(params["seed"])
    n_classes = params["classes"]
    angles = rng.uniform(0, np.pi, n_classes)
    freqs = rng.uniform(1.5, 5.0, n_classes)
    colours = rng.uniform(0.2, 1.0, (n_classes, 3))
    splits = {}
    for number, name in enumerate(SYNTHETIC_SPLITS):  # train and test hold params[name] images per class
        per_class = params[name]
        labels = np.repeat(np.arange(n_classes, dtype=np.int64), per_class)
        splits[name] = Split(name, labels, SyntheticGratings(
            angles=angles, freqs=freqs, colours=colours, size=params["size"], seed=params["seed"],
            split_number=number, per_class=per_class, count=len(labels)))
    classes = tuple(f"class{i}" for i in range(n_classes))
    # the images are a function of the parameters and this generator's version: hashing them would draw them all
    fingerprint = hashlib.sha256(json.dumps({"kind": "synthetic", "version": SYNTHETIC_VERSION, "params": params,
                                             "classes": classes}, sort_keys=True).encode()).hexdigest()
    return DataSource(name="synthetic", kind="synthetic", classes=classes, splits=splits, fingerprint=fingerprint,
                      details=params)
