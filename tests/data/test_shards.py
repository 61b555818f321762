"""Sharded layouts (WebDataset tar shards, Hugging Face parquet): the same images in the same order as an
ImageFolder, splits and class names from the layout, fingerprints without decoding, refusals; and every source
read per index (the synthetic source holds no images)."""

from __future__ import annotations

import json
import os
import tarfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from mimprobe import load_data
from mimprobe.data import shards
from mimprobe.errors import BadInputError
from tests.data.shard_layouts import folder_samples, make_mixed_image_folder, write_parquet, write_tar_shards

SPLITS = {"train": {"cat": 4, "dog": 3, "eel": 3}, "test": {"cat": 2, "dog": 2, "eel": 1}}


@pytest.fixture
def layouts(tmp_path: Path) -> dict[str, Path]:
    """The same 15 PNG/JPEG images as an ImageFolder, tar shards named by split prefix, and parquet files in data/."""
    folder = make_mixed_image_folder(tmp_path / "folder", SPLITS)
    for split in SPLITS:
        samples = folder_samples(folder / split)
        write_tar_shards(samples, tmp_path / "tar", f"{split}-", per_shard=4)
        write_parquet(samples, tmp_path / "parquet" / "data", split, files=2, row_group_size=2)
    return {"folder": folder, "tar": tmp_path / "tar", "parquet": tmp_path / "parquet"}


def test_tar_and_parquet_give_the_imagefolders_images_labels_and_order(layouts):
    folder = load_data(layouts["folder"])
    for kind, root in (("tar-shards", layouts["tar"]), ("parquet", layouts["parquet"])):
        source = load_data(root)
        assert source.kind == kind and list(source.splits) == ["train", "test"]
        assert source.details["root"] == str(root.resolve())
        for name, split in folder.splits.items():
            other = source.splits[name]
            assert other.labels.tolist() == split.labels.tolist()
            for index in range(len(split)):
                assert np.array_equal(np.asarray(other.read(index)), np.asarray(split.read(index))), (kind, index)
    assert load_data(layouts["tar"]).details["shards"] == {"train": 3, "test": 2}
    assert load_data(layouts["tar"]).splits["train"].describe(5).endswith("train-000001.tar:dog_001.jpg")
    assert load_data(layouts["parquet"]).splits["test"].describe(3).endswith("test-00001-of-00002.parquet row 0")


def test_class_names_from_classes_txt_json_datasets_metadata_or_integers(tmp_path, layouts):
    assert load_data(layouts["tar"]).classes == ("0", "1", "2")
    (layouts["tar"] / "classes.txt").write_text("cat\ndog\neel\n")
    assert load_data(layouts["tar"]).classes == ("cat", "dog", "eel")
    (layouts["tar"] / "classes.txt").unlink()
    (layouts["tar"] / "classes.json").write_text(json.dumps({"0": "a", "1": "b", "2": "c"}))
    assert load_data(layouts["tar"]).classes == ("a", "b", "c")
    (layouts["tar"] / "classes.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(BadInputError, match="label 2 has no class name"):
        load_data(layouts["tar"])
    samples = folder_samples(layouts["folder"] / "train")
    write_parquet(samples, tmp_path / "named" / "data", "train", files=1, row_group_size=4,
                  class_names=["cat", "dog", "eel"])
    named = load_data(tmp_path / "named")
    assert named.classes == ("cat", "dog", "eel") and named.details["classes_from"].startswith("the parquet schema")


def test_split_subfolders_and_unnamed_shards(tmp_path, layouts):
    for split in SPLITS:
        write_tar_shards(folder_samples(layouts["folder"] / split), tmp_path / "sub" / split, "shard-", 100)
    source = load_data(tmp_path / "sub")
    assert source.details["layout"] == "root/<split>/*.tar" and list(source.splits) == ["train", "test"]
    write_parquet(folder_samples(layouts["folder"] / "train"), tmp_path / "one", "shard", files=2, row_group_size=3)
    one = load_data(tmp_path / "one")  # no split name: one train split
    assert list(one.splits) == ["train"] and len(one.splits["train"]) == 10
    renamed = tmp_path / "one" / "validation-00000-of-00001.parquet"
    (tmp_path / "one" / "shard-00000-of-00002.parquet").rename(renamed)
    with pytest.raises(BadInputError, match="has no split name"):
        load_data(tmp_path / "one")


def test_fingerprint_reads_no_image_and_changes_with_the_shards(layouts, monkeypatch):
    before = {kind: load_data(layouts[kind]).fingerprint for kind in ("tar", "parquet")}

    def no_decoding(data):
        raise AssertionError("an image was decoded to fingerprint the shards")

    monkeypatch.setattr(shards, "decode_rgb", no_decoding)
    assert {kind: load_data(layouts[kind]).fingerprint for kind in ("tar", "parquet")} == before
    assert before["tar"] != before["parquet"] != load_data(layouts["folder"]).fingerprint
    monkeypatch.undo()
    shard = layouts["tar"] / "test-000001.tar"
    status = shard.stat()
    os.utime(shard, ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000_000))
    assert load_data(layouts["tar"]).fingerprint != before["tar"]
    parquet = layouts["parquet"] / "data" / "train-00000-of-00002.parquet"
    status = parquet.stat()
    samples = folder_samples(layouts["folder"] / "train")
    samples[0], samples[1] = samples[1], samples[0]  # two images swapped, the same size and time restored
    write_parquet(samples, layouts["parquet"] / "data", "train", files=2, row_group_size=2)
    os.utime(parquet, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert load_data(layouts["parquet"]).fingerprint != before["parquet"]


def test_parquet_reads_each_row_group_once_in_order(layouts, monkeypatch):
    import pyarrow.parquet as pq

    reads = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, *a, **k: reads.append(i) or original(self, i, *a, **k))
    split = load_data(layouts["parquet"]).splits["train"]  # 2 files of 5 rows, row groups of 2: 3 + 3 groups
    for index in range(len(split)):
        split.read(index)
    assert reads == [0, 1, 2, 0, 1, 2]


def test_tar_reader_reads_members_in_file_order(layouts, monkeypatch):
    split = load_data(layouts["tar"]).splits["train"]
    reader = split.reader
    offsets = [(int(reader.shard[i]), int(reader.offsets[i])) for i in range(len(split))]
    assert offsets == sorted(offsets)
    split.read(0)
    first = reader._open[2]
    split.read(1)
    assert reader._open[2] is first  # one open file per shard, kept while reading it
    split.read(len(split) - 1)
    assert first.closed


def test_bad_shards_are_refused_with_one_line(tmp_path, layouts):
    samples = folder_samples(layouts["folder"] / "train")
    broken = tmp_path / "nolabel"
    broken.mkdir()
    with tarfile.open(broken / "train-0.tar", "w") as archive:
        for key, data, _ in samples[:2]:
            info = tarfile.TarInfo(key)
            info.size = len(data)
            archive.addfile(info, __import__("io").BytesIO(data))
    with pytest.raises(BadInputError, match=r"has an image but no .*\.cls label"):
        load_data(broken)
    compressed = tmp_path / "gz"
    compressed.mkdir()
    with tarfile.open(compressed / "train-0.tar.gz", "w:gz"):
        pass
    with pytest.raises(BadInputError, match="compressed tar.*decompress"):
        load_data(compressed)
    import pyarrow as pa
    import pyarrow.parquet as pq

    unlabelled = tmp_path / "nolabelcol"
    unlabelled.mkdir()
    pq.write_table(pa.table({"image": pa.array([b"x"]), "fine_label": pa.array([1])}), unlabelled / "train.parquet")
    with pytest.raises(BadInputError, match="needs a column image .* and an integer column label"):
        load_data(unlabelled)
    one_class = tmp_path / "oneclass"
    write_tar_shards([(key, data, 0) for key, data, _ in samples], one_class, "train-", 100)
    with pytest.raises(BadInputError, match="only one class"):
        load_data(one_class)
    unlabelled_test = tmp_path / "unlabelledtest"
    write_parquet(samples, unlabelled_test, "train", files=1, row_group_size=4)
    write_parquet([(key, data, -1) for key, data, _ in samples], unlabelled_test, "test", files=1, row_group_size=4)
    with pytest.raises(BadInputError, match="the test split has label -1 .*move the test shards out"):
        load_data(unlabelled_test)
    only_test = tmp_path / "onlytest"
    write_tar_shards(samples, only_test, "test-", 100)
    with pytest.raises(BadInputError, match="none for train"):
        load_data(only_test)


def test_synthetic_images_are_generated_per_index_not_held(tmp_path):
    tracemalloc.start()
    started = time.perf_counter()
    try:
        source = load_data("synthetic:classes=10,train=200000,test=1000,size=32,seed=0")
        image = source.splits["train"].read(1_999_999)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    seconds = time.perf_counter() - started
    assert len(source.splits["train"]) == 2_000_000 and source.splits["train"].labels[-1] == 9
    assert image.size == (32, 32)
    # the labels (2,000,000 int64: 15 MiB), never the 6 GiB of images
    assert peak < 40 * 2 ** 20, f"{peak / 2 ** 20:.0f} MiB allocated"
    assert seconds < 10, f"{seconds:.1f} s"
    again = load_data("synthetic:classes=10,train=200000,test=1000,size=32,seed=0").splits["train"]
    assert np.array_equal(again.reader.pixels(123_456), source.splits["train"].reader.pixels(123_456))
