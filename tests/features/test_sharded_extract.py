"""Extraction from sharded layouts: ImageFolder, WebDataset tar shards and parquet files of the same images in the
same order give byte-identical feature files, and an interrupted tar-shard extraction resumes byte-identical."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mimprobe import extract
from mimprobe.errors import BadInputError
from tests.data.shard_layouts import folder_samples, make_mixed_image_folder, write_parquet, write_tar_shards

REPO = Path(__file__).resolve().parents[2]
SPLITS = {"train": {"ant": 7, "bee": 7, "cow": 6}, "test": {"ant": 3, "bee": 3, "cow": 3}}  # 20 + 9 PNG/JPEG
OPTIONS = dict(img_size=32, batch_size=4, pool=("cls", "mean"), store_dtype="float32", progress=False)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    folder = make_mixed_image_folder(root / "folder", SPLITS)
    for split in SPLITS:
        samples = folder_samples(folder / split)
        write_tar_shards(samples, root / "tar" / split, "shard-", per_shard=6)
        write_parquet(samples, root / "parquet" / "data", split, files=2, row_group_size=3)
    return {"folder": folder, "tar": root / "tar", "parquet": root / "parquet"}


def _feature_bytes(store_path: Path) -> dict[str, bytes]:
    """Every .npy file (features and labels) by its path in the store."""
    return {str(path.relative_to(store_path)): path.read_bytes() for path in sorted(store_path.rglob("*.npy"))}


def test_imagefolder_tar_shards_and_parquet_give_byte_identical_features(layouts, tmp_path):
    stores = {kind: extract("test_vit", root, out=tmp_path / kind, **OPTIONS).store
              for kind, root in layouts.items()}
    reference = _feature_bytes(stores["folder"].path)
    assert len(reference) == 2 * (1 + 6 * 2)  # 2 splits x (labels + 6 blocks x 2 poolings)
    assert stores["tar"].manifest["dataset"]["kind"] == "tar-shards"
    assert stores["parquet"].manifest["dataset"]["kind"] == "parquet"
    for kind in ("tar", "parquet"):
        assert stores[kind].manifest["key"] != stores["folder"].manifest["key"]  # another dataset fingerprint
        assert _feature_bytes(stores[kind].path) == reference, kind
    # worker processes open the shards themselves and give the same bytes
    two_workers = extract("test_vit", layouts["parquet"], out=tmp_path / "workers", workers=2, **OPTIONS).store
    assert _feature_bytes(two_workers.path) == reference


KILL_SCRIPT = """
import os, signal
from mimprobe import extract
def on_batch(split, done, total):
    if split == {split!r} and done == {done}:
        os.kill(os.getpid(), signal.SIGKILL)
extract("test_vit", {data!r}, out={out!r}, img_size=32, batch_size=4, pool=("cls", "mean"),
        store_dtype="float32", progress=False, on_batch=on_batch)
"""


def _tree_bytes(root: Path) -> dict[str, bytes]:
    files = {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}
    files["manifest.json"] = re.sub(rb'"git": "[0-9a-f]+"', b'"git": ""', files["manifest.json"])
    return files


@pytest.mark.slow  # a killed subprocess extraction (5 s); CI runs it
def test_interrupted_tar_shard_extraction_resumes_byte_identical(layouts, tmp_path, split="train", done=8):
    """Killed after 8 train rows (two batches of 4): mid-way through the second of four train shards of 6."""
    reference = extract("test_vit", layouts["tar"], out=tmp_path / "ref", **OPTIONS).store
    script = KILL_SCRIPT.format(split=split, done=done, data=str(layouts["tar"]), out=str(tmp_path / "run"))
    assert subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=300).returncode == -signal.SIGKILL
    resumed = extract("test_vit", layouts["tar"], out=tmp_path / "run", **OPTIONS)
    assert resumed.resumed and 0 < resumed.images < 29
    assert _tree_bytes(resumed.store.path) == _tree_bytes(reference.path)


def test_an_undecodable_tar_member_is_named_and_skipped(layouts, tmp_path):
    samples = folder_samples(layouts["folder"] / "train")
    key, _, label = samples[5]
    samples[5] = (key, b"\x89PNG broken", label)
    write_tar_shards(samples, tmp_path / "bad", "train-", per_shard=100)
    with pytest.raises(BadInputError, match=rf"cannot decode image .*train-000000\.tar:{re.escape(key)}"):
        extract("test_vit", tmp_path / "bad", out=tmp_path / "out", **OPTIONS)
    store = extract("test_vit", tmp_path / "bad", out=tmp_path / "out", skip_bad_images=True, **OPTIONS).store
    assert [entry["index"] for entry in store.manifest["bad_images"]] == [5]
    assert store.labels("train", valid_only=False)[5] == -1
