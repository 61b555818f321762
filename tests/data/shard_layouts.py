"""Writers of the sharded layouts for tests: the same images as an ImageFolder, WebDataset tar shards and
Hugging Face-style parquet files (a struct column ``image`` {bytes, path}, an integer ``label``, and the
``huggingface`` schema metadata that datasets writes)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def make_mixed_image_folder(root: Path, splits: dict[str, dict[str, int]], size: int = 20, seed: int = 0) -> Path:
    """root/<split>/<class>/<i>.png|jpg: random images, every other one a JPEG."""
    rng = np.random.default_rng(seed)
    for split, classes in splits.items():
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
                image.save(root / split / name / f"{i:03d}.{'jpg' if i % 2 else 'png'}")
    return root


def folder_samples(split_dir: Path) -> list[tuple[str, bytes, int]]:
    """(key, file bytes, label) of an ImageFolder split, in the ImageFolder's order (sorted classes, sorted files)."""
    samples = []
    for label, class_dir in enumerate(sorted(p for p in split_dir.iterdir() if p.is_dir())):
        for path in sorted(class_dir.iterdir()):
            samples.append((f"{class_dir.name}_{path.name}", path.read_bytes(), label))
    return samples


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    archive.addfile(info, io.BytesIO(data))


def write_tar_shards(samples: list[tuple[str, bytes, int]], folder: Path, prefix: str, per_shard: int) -> list[Path]:
    """``folder/{prefix}{shard:06d}.tar``: KEY.<ext> + KEY.cls per sample (the label as text), in order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, len(samples), per_shard)):
        path = folder / f"{prefix}{shard:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
            for key, data, label in samples[start:start + per_shard]:
                stem, extension = key.rsplit(".", 1)
                _add(archive, f"{stem}.{extension}", data)
                _add(archive, f"{stem}.cls", str(label).encode())
        paths.append(path)
    return paths


def write_parquet(samples: list[tuple[str, bytes, int]], folder: Path, split: str, files: int,
                  row_group_size: int, class_names: list[str] | None = None) -> list[Path]:
    """``folder/{split}-0000i-of-0000n.parquet`` as datasets writes them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    features = {"image": {"_type": "Image"}, "label": {"dtype": "int64", "_type": "Value"}}
    if class_names is not None:
        features["label"] = {"names": class_names, "_type": "ClassLabel"}
    metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    paths = []
    for number, chunk in enumerate(np.array_split(np.arange(len(samples)), files)):
        rows = [samples[i] for i in chunk]
        table = pa.table({
            "image": pa.array([{"bytes": data, "path": key} for key, data, _ in rows],
                              type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            "label": pa.array([label for _, _, label in rows], type=pa.int64()),
        }).replace_schema_metadata(metadata)
        path = folder / f"{split}-{number:05d}-of-{files:05d}.parquet"
        pq.write_table(table, path, row_group_size=row_group_size)
        paths.append(path)
    return paths
