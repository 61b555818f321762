"""Data sources: ImageFolder directories, ``.npz`` arrays, and the built-ins ``digits`` and ``synthetic``.

Every source becomes a `DataSource`: named splits of labelled images in a deterministic order, the class
names, and a fingerprint that goes into the FeatureStore key: for arrays, their bytes; for image files, each
file's path, label, size, modification time (ns) and a sampled content hash (`file_signature`), so that images
replaced by others, even of the same size and with their old modification time restored, give another key.

Sampled content hash: sha256 of the first and last 4 KiB of each file (the whole file when it is at most 8 KiB,
as every CIFAR-size JPEG is). Measured on one busy core with a warm page cache: `load_data` on the 50,000
CIFAR-10 train JPEGs (0.9 KB each, so their full content is hashed) takes 1.4-2.3 s, against 0.65 s with path
and size only; on 110 KB ImageNet-size files the signature costs 32-37 us per file (1.6-1.9 s per 50,000),
where a full-content sha256 took 159 us per file (8 s per 50,000, and a cold disk would read all 5.5 GB).
Two small reads per file is what "cheap" buys: an edit inside a large file that keeps its size, its first and
last 4 KiB and its modification time is not detected.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BadInputError

SAMPLE_BYTES = 4096  # bytes hashed from each end of an image file (the whole file when <= 2 * SAMPLE_BYTES)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_DIRS = ("train", "val", "test")
BUILTINS = ("digits", "synthetic")

# digits: scikit-learn's 1,797 8x8 handwritten digits, split once with a stratified shuffle
# (train_test_split, test_size=450, random_state=0): 1,347 train / 450 test, each in ascending index order.
DIGITS_TEST_SIZE = 450
DIGITS_SPLIT_SEED = 0


@dataclass(frozen=True)
class Split:
    """One split of a data source.

    Exactly one of ``paths`` (image files, absolute) or ``images`` (an array) is set.

    Attributes:
        name: ``train``, ``val``, ``test``.
        labels: (n,) int64 class indices into `DataSource.classes`.
        paths: Image file paths, in the split's fixed order.
        images: (n, H, W, C) uint8 or (n, C, H, W) float32 in [0, 1].
    """

    name: str
    labels: np.ndarray
    paths: tuple[str, ...] | None = None
    images: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self, index: int) -> str:
        """A human name for one sample: its path, or ``split[index]`` for arrays."""
        return self.paths[index] if self.paths is not None else f"{self.name}[{index}]"


@dataclass(frozen=True)
class DataSource:
    """Labelled images in named splits, with a fingerprint of their identity."""

    name: str
    kind: str  # imagefolder | npz | digits | synthetic
    classes: tuple[str, ...]
    splits: dict[str, Split]
    fingerprint: str
    details: dict = field(default_factory=dict)
    labelled: bool = True  # False for a folder of images without class folders (labels are -1)

    def summary(self) -> str:
        parts = [f"{name} {len(split):,}" for name, split in self.splits.items()]
        text = f"{self.name} ({self.kind}): {len(self.classes)} classes; splits: " + ", ".join(parts)
        skipped = self.details.get("skipped_folders")
        if skipped:
            text += (f"; skipped {len(skipped)} linked folder(s) already read (a symlink loop or a second link): "
                     + ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else ""))
        return text


def load_data(spec: str | os.PathLike) -> DataSource:
    """Open a data source.

    Args:
        spec: An ImageFolder directory (``root/<class>/*`` becomes the single split ``train``; ``root/*`` without
            class folders is one unlabelled split ``train``, labels -1;
            ``root/train`` plus ``root/val`` and/or ``root/test`` become those splits), a ``.npz`` file with
            ``x_train, y_train, x_test, y_test``, ``digits``, or ``synthetic`` (optionally
            ``synthetic:classes=10,train=50,test=20,size=32,seed=0``).

    Raises:
        BadInputError: A missing path, no images, a single class, malformed arrays.
    """
    text = str(spec)
    if text == "digits":
        return _digits()
    if text == "synthetic" or text.startswith("synthetic:"):
        return _synthetic(text.partition(":")[2])
    path = Path(text).expanduser()
    if not path.exists():
        raise BadInputError(
            f"data {text!r} not found: give an image folder, a .npz file, or a built-in name ({', '.join(BUILTINS)})")
    if path.is_dir():
        return _image_folder(path)
    if path.suffix == ".npz":
        return _npz(path)
    raise BadInputError(f"data {text!r} is a file but not a .npz: give an image folder or a .npz of arrays")


# --- ImageFolder --------------------------------------------------------------------------------------------

def file_signature(path: str) -> str:
    """``size, mtime_ns, sampled sha256`` of one file (see the module docstring for the cost)."""
    try:
        with open(path, "rb") as handle:
            status = os.fstat(handle.fileno())
            large = status.st_size > 2 * SAMPLE_BYTES
            sample = handle.read(SAMPLE_BYTES if large else 2 * SAMPLE_BYTES)
            if large:
                handle.seek(-SAMPLE_BYTES, os.SEEK_END)
                sample += handle.read(SAMPLE_BYTES)
    except PermissionError:  # decoding reports it (or --skip-bad-images skips it); size and time still count
        status = os.stat(path)
        return f"{status.st_size}\t{status.st_mtime_ns}\tunreadable"
    return f"{status.st_size}\t{status.st_mtime_ns}\t{hashlib.sha256(sample).hexdigest()}"


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
    splits = {"train": Split("train", np.asarray(train_labels, dtype=np.int64), paths=tuple(train_paths))}
    for name, directory in split_dirs.items():
        if name == "train":
            continue
        paths, labels, _ = _scan_split(directory, class_to_index, walk)
        if not paths:
            raise BadInputError(f"no images found in the {name} split {directory}: remove the folder or add images")
        splits[name] = Split(name, np.asarray(labels, dtype=np.int64), paths=tuple(paths))
    digest = hashlib.sha256()
    for name, split in splits.items():
        for path, label in zip(split.paths, split.labels.tolist()):
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
    split = Split("train", np.full(len(paths), -1, dtype=np.int64), paths=tuple(paths))
    return DataSource(name=str(root), kind="imagefolder", classes=(), splits={"train": split},
                      fingerprint=digest.hexdigest(), details={"root": str(root.resolve()), "layout": "root/*"},
                      labelled=False)


# --- arrays ---------------------------------------------------------------------------------------------

def _array_fingerprint(kind: str, splits: dict[str, Split], classes: tuple[str, ...], extra: str = "") -> str:
    digest = hashlib.sha256(f"{kind}\n{extra}\n{json.dumps(list(classes))}\n".encode())
    for name, split in splits.items():
        images = np.ascontiguousarray(split.images)
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
                     images=_check_images(path, f"x_{split}", arrays[f"x_{split}"]))
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
    splits = {name: Split(name, labels[np.sort(idx)], images=images[np.sort(idx)])
              for name, idx in (("train", train_idx), ("test", test_idx))}
    classes = tuple(str(i) for i in range(10))
    return DataSource(name="digits", kind="digits", classes=classes, splits=splits,
                      fingerprint=_array_fingerprint("digits", splits, classes),
                      details={"split": f"stratified train_test_split(test_size={DIGITS_TEST_SIZE}, "
                                        f"random_state={DIGITS_SPLIT_SEED})"})


SYNTHETIC_DEFAULTS = {"classes": 10, "train": 50, "test": 20, "size": 32, "seed": 0}


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
    n_classes, size = params["classes"], params["size"]
    # Each class: an oriented sinusoidal grating of its own frequency and colour; samples vary phase and noise.
    angles = rng.uniform(0, np.pi, n_classes)
    freqs = rng.uniform(1.5, 5.0, n_classes)
    colours = rng.uniform(0.2, 1.0, (n_classes, 3))
    yy, xx = np.mgrid[0:size, 0:size] / size

    def draw(count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(n_classes), count)
        phase = rng.uniform(0, 2 * np.pi, len(labels))[:, None, None]
        wave = np.sin(2 * np.pi * freqs[labels, None, None]
                      * (np.cos(angles[labels])[:, None, None] * xx + np.sin(angles[labels])[:, None, None] * yy)
                      + phase)
        image = 0.5 + 0.4 * wave[..., None] * colours[labels, None, None, :]
        image += rng.normal(0, 0.08, image.shape)
        return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), labels.astype(np.int64)

    splits = {}
    for name in ("train", "test"):
        images, labels = draw(params[name])
        splits[name] = Split(name, labels, images=images)
    classes = tuple(f"class{i}" for i in range(n_classes))
    extra = json.dumps(params, sort_keys=True)
    return DataSource(name="synthetic", kind="synthetic", classes=classes, splits=splits,
                      fingerprint=_array_fingerprint("synthetic", splits, classes, extra), details=params)
