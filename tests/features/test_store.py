"""Damaged and stale stores: checked on open with one line naming the file, `--verify` reads every value,
`--overwrite` extracts anew, and replaced images give a new store instead of the old one."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mimprobe import FeatureStore, extract
from mimprobe.cli import app
from mimprobe.errors import BadInputError
from mimprobe.features.store import MANIFEST, DamagedStoreError
from tests.conftest import make_image_folder

DATA = "synthetic:classes=3,train=6,test=3,size=16"  # 18 train and 9 test images
OPTIONS = dict(img_size=32, batch_size=4, pool=("cls", "mean"), progress=False)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    files = {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}
    files[MANIFEST] = re.sub(rb'"git": "[0-9a-f]+"', b'"git": ""', files[MANIFEST])  # others may commit meanwhile
    return files


@pytest.fixture
def store(tmp_path) -> FeatureStore:
    return extract("test_vit", DATA, out=tmp_path / "features", **OPTIONS).store


def _edit_manifest(store: FeatureStore, change) -> None:
    manifest = json.loads((store.path / MANIFEST).read_text())
    change(manifest)
    (store.path / MANIFEST).write_text(json.dumps(manifest))


def test_an_intact_store_opens_and_verifies(store):
    assert FeatureStore.open(store.path, verify=True).complete


def test_a_truncated_file_is_named_on_open_and_by_extract_and_overwrite_rebuilds_it(store, tmp_path):
    reference = _tree_bytes(store.path)
    target = store.path / "train" / "block03_cls.npy"
    size = target.stat().st_size
    os.truncate(target, 1000)
    message = rf"feature store .* is damaged: train/block03_cls.npy is 1,000 bytes, not {size:,} \(truncated\); " \
              r"extract it again .* --overwrite"
    with pytest.raises(DamagedStoreError, match=message):
        FeatureStore.open(store.path)
    with pytest.raises(BadInputError, match=message):
        extract("test_vit", DATA, out=tmp_path / "features", **OPTIONS)
    rebuilt = extract("test_vit", DATA, out=tmp_path / "features", overwrite=True, **OPTIONS)
    assert not rebuilt.reused and rebuilt.images == 27
    assert _tree_bytes(rebuilt.store.path) == reference


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: (m["dataset"]["splits"].update(train=20), m["progress"].update(train=20)),
     r"train/labels.npy has shape \(18,\) but manifest.json says \(20,\)"),
    (lambda m: m["feature_dims"].update(cls=32),  # the second form where the manifest also has per-block widths
     r"(train/block00_cls.npy has shape \(18, 64\) but manifest.json says \(18, 32\)|manifest.json declares "
     r"width 32 and 64 for block 0 \(cls\))"),
    (lambda m: m.update(dtype="float32"), r"manifest.json has dtype that differ from its key_fields"),
    (lambda m: m["key_fields"].update(norm="final"), r"manifest.json has key_fields that no longer give its key"),
    (lambda m: m.update(blocks=[0, 1, 2, 3, 4, 5, 6]), r"manifest.json has blocks that differ from its key_fields"),
    (lambda m: m.update(poolings=["cls", "max"]), r"manifest.json has poolings \['cls', 'max'\], not among"),
    (lambda m: m["progress"].update(train=17), r"manifest.json says complete but its progress is not at the end"),
    (lambda m: m.pop("bad_images"), r"manifest.json lacks 'bad_images' or it is not a list"),
    (lambda m: m["bad_images"].append({"split": "train", "index": 99}), r"bad_images entry that names no row"),
])
def test_a_hand_edited_manifest_is_refused_naming_the_file(store, change, message):
    _edit_manifest(store, change)
    with pytest.raises(DamagedStoreError, match=message):
        FeatureStore.open(store.path)


def test_a_manifest_that_is_not_json_is_named(store):
    (store.path / MANIFEST).write_text('{"format_version": 1, "key": ')
    with pytest.raises(DamagedStoreError, match=r"damaged: manifest.json is not valid JSON"):
        FeatureStore.open(store.path)


def test_a_feature_file_of_another_dtype_or_a_missing_file_is_named(store):
    path = store.path / "test" / "block05_mean.npy"
    np.save(path, np.load(path).astype(np.float32))
    with pytest.raises(DamagedStoreError, match=r"test/block05_mean.npy holds float32 but manifest.json says float16"):
        FeatureStore.open(store.path)
    path.unlink()
    with pytest.raises(DamagedStoreError, match=r"test/block05_mean.npy is missing"):
        FeatureStore.open(store.path)


@pytest.mark.parametrize(("damage", "message"), [
    ("zero", r"train/block02_mean.npy has an all-zero row 7 that was recorded as written"),
    ("nan", r"train/block02_mean.npy has NaN or Inf in row 7"),
    ("label", r"train/labels.npy has label 2 at row 0 where the data has 0"),
])
def test_verify_reads_every_value(store, tmp_path, damage, message):
    """Damage that keeps every size and header: found by --verify only (opening stays cheap)."""
    if damage == "label":
        labels = np.load(store.path / "train" / "labels.npy")
        labels[0] = 2
        np.save(store.path / "train" / "labels.npy", labels)
    else:
        features = np.load(store.path / "train" / "block02_mean.npy", mmap_mode="r+")
        features[7] = 0 if damage == "zero" else np.nan
        features.flush()
        del features
    assert extract("test_vit", DATA, out=tmp_path / "features", **OPTIONS).reused  # structure intact
    with pytest.raises(DamagedStoreError, match=message):
        extract("test_vit", DATA, out=tmp_path / "features", verify=True, **OPTIONS)
    messages: list[str] = []
    extract("test_vit", DATA, out=tmp_path / "features", overwrite=True, log=messages.append, **OPTIONS)
    assert messages[0].startswith("--overwrite: deleting feature store ")
    assert extract("test_vit", DATA, out=tmp_path / "features", verify=True, **OPTIONS).reused


def test_verify_extracts_the_first_batch_again_and_compares(store, tmp_path):
    """Rows edited to other plausible values (finite, not zero, sizes intact) differ from the images' features."""
    features = np.load(store.path / "train" / "block05_cls.npy", mmap_mode="r+")
    features[1] *= 1.5
    features.flush()
    del features
    with pytest.raises(DamagedStoreError, match=r"train/block05_cls.npy rows 0-3 differ from the same images extracted "
                                                r"again \(max difference [0-9.]+, values up to [0-9.]+\)"):
        extract("test_vit", DATA, out=tmp_path / "features", verify=True, **OPTIONS)
    assert sorted(path.name for path in (tmp_path / "features").iterdir()) == [f".{store.path.name}.lock",
                                                                                store.path.name]  # scratch removed
    extract("test_vit", DATA, out=tmp_path / "features", overwrite=True, **OPTIONS)
    messages: list[str] = []
    assert extract("test_vit", DATA, out=tmp_path / "features", verify=True, log=messages.append, **OPTIONS).reused
    assert messages[0].endswith("every file and value checked, and the first batch of every split recomputed")


def test_cli_damaged_store_is_one_line_exit_2_for_profile_and_extract(store, tmp_path):
    os.truncate(store.path / "test" / "labels.npy", 150)
    profile = CliRunner().invoke(app, ["profile", str(store.path), "--out", str(tmp_path / "p"), "--no-progress"])
    assert profile.exit_code == 2
    assert profile.output.strip().splitlines() == [
        f"error: feature store {store.path} is damaged: test/labels.npy is 150 bytes, not 200 (truncated); "
        "extract it again with the same `mimprobe extract` command and --overwrite (or delete the folder)"]
    args = ["extract", "test_vit", DATA, "--img-size", "32", "--batch-size", "4", "--pool", "cls,mean",
            "--out", str(tmp_path / "features"), "--no-progress"]
    assert CliRunner().invoke(app, args).exit_code == 2
    rebuilt = CliRunner().invoke(app, [*args, "--overwrite", "--verify"])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert "27 images extracted" in rebuilt.output


def test_replaced_images_of_the_same_size_are_extracted_again(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", {"a": 3, "b": 3}, size=16)
    for path in folder.rglob("*.png"):
        Image.open(path).save(path.with_suffix(".ppm"))  # uncompressed: every image has the same byte size
        path.unlink()
    first = extract("test_vit", folder, out=tmp_path / "features", **OPTIONS)
    replaced, other = folder / "a" / "001.ppm", folder / "b" / "002.ppm"
    status = os.stat(replaced)
    replaced.write_bytes(other.read_bytes())
    os.utime(replaced, ns=(status.st_atime_ns, status.st_mtime_ns))  # even with its old modification time
    second = extract("test_vit", folder, out=tmp_path / "features", **OPTIONS)
    assert not second.reused and second.store.path != first.store.path
    row = 1  # a/001 is row 1 of train; it now holds b/002's pixels
    np.testing.assert_array_equal(second.store.features("train", 5)[row], second.store.features("train", 5)[5])
    assert not np.array_equal(first.store.features("train", 5)[row], second.store.features("train", 5)[row])


def test_profile_of_a_store_names_data_that_changed_since(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", {"a": 3, "b": 3}, size=16)
    store = extract("test_vit", folder, out=tmp_path / "features", **OPTIONS).store
    path = folder / "a" / "000.png"
    status = os.stat(path)
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))  # touched
    result = CliRunner().invoke(app, ["profile", str(store.path), str(folder), "--out", str(tmp_path / "p")])
    assert result.exit_code == 2
    assert result.output.startswith(f"error: {folder} changed since store {store.path} was extracted from it")
