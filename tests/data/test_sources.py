import hashlib
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mimprobe.data import SplitDataset, load_data
from mimprobe.data.readers import array_to_input, load_rgb
from mimprobe.data.sources import SAMPLE_BYTES, file_signature
from mimprobe.errors import BadInputError
from tests.conftest import make_image_folder


def test_image_folder_flat_layout_is_one_sorted_train_split(image_folder):
    source = load_data(image_folder)
    assert source.kind == "imagefolder"
    assert source.classes == ("cat", "dog", "eel")
    assert list(source.splits) == ["train"]
    split = source.splits["train"]
    assert len(split) == 12
    assert split.labels.tolist() == [0] * 5 + [1] * 4 + [2] * 3
    assert list(split.reader.paths) == sorted(split.reader.paths)
    assert load_data(image_folder).fingerprint == source.fingerprint


def test_image_folder_train_test_layout_shares_class_indices(tmp_path):
    make_image_folder(tmp_path / "d" / "train", {"a": 2, "b": 2, "c": 2})
    make_image_folder(tmp_path / "d" / "test", {"b": 1, "c": 2})
    source = load_data(tmp_path / "d")
    assert list(source.splits) == ["train", "test"]
    assert source.splits["test"].labels.tolist() == [1, 2, 2]
    assert "train" in source.summary() and "test 3" in source.summary()


def test_fingerprint_changes_with_content_size_and_labels(image_folder):
    before = load_data(image_folder).fingerprint
    (image_folder / "cat" / "000.png").rename(image_folder / "dog" / "999.png")  # same bytes, other label
    assert load_data(image_folder).fingerprint != before


def _replace_keeping_size_and_time(target, source):
    """Overwrite ``target`` with ``source``'s bytes (same length) and restore ``target``'s modification time."""
    status = os.stat(target)
    data = source.read_bytes()
    assert len(data) == status.st_size
    target.write_bytes(data)
    os.utime(target, ns=(status.st_atime_ns, status.st_mtime_ns))


@pytest.mark.parametrize("size", [16, 64])  # 16 px: whole file hashed (< 8 KiB); 64 px: first and last 4 KiB
def test_fingerprint_sees_replaced_images_of_the_same_size_and_time(tmp_path, size):
    folder = make_image_folder(tmp_path / "imgs", {"a": 3, "b": 3}, size=size)
    for path in folder.rglob("*.png"):  # uncompressed (same byte size for every image of one size)
        Image.open(path).save(path.with_suffix(".ppm"))
        path.unlink()
    first = load_data(folder).fingerprint
    assert load_data(folder).fingerprint == first
    _replace_keeping_size_and_time(folder / "a" / "000.ppm", folder / "b" / "001.ppm")
    assert load_data(folder).fingerprint != first  # the case: same size, same path, same label


def test_fingerprint_includes_the_modification_time(image_folder):
    first = load_data(image_folder).fingerprint
    path = image_folder / "cat" / "000.png"
    status = os.stat(path)
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000))  # touched: same bytes, newer
    assert load_data(image_folder).fingerprint != first
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert load_data(image_folder).fingerprint == first


def test_file_signature_samples_both_ends_of_a_large_file(tmp_path):
    path = tmp_path / "big.jpg"
    data = bytearray(np.random.default_rng(0).integers(0, 256, 3 * SAMPLE_BYTES, dtype=np.uint8).tobytes())
    path.write_bytes(bytes(data))
    status = os.stat(path)
    size, mtime, digest = file_signature(str(path)).split("\t")
    assert (int(size), int(mtime)) == (status.st_size, status.st_mtime_ns)
    assert digest == hashlib.sha256(bytes(data[:SAMPLE_BYTES] + data[-SAMPLE_BYTES:])).hexdigest()
    for offset in (0, len(data) - 1):
        changed = bytearray(data)
        changed[offset] ^= 0xFF
        path.write_bytes(bytes(changed))
        os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
        assert file_signature(str(path)).split("\t")[2] != digest
    small = tmp_path / "small.jpg"
    small.write_bytes(bytes(data[:100]))
    assert file_signature(str(small)).split("\t")[2] == hashlib.sha256(bytes(data[:100])).hexdigest()


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grayscale_and_rgba_become_rgb(tmp_path, mode):
    folder = make_image_folder(tmp_path / mode, {"x": 1, "y": 1}, mode=mode)
    image = load_rgb(load_data(folder).splits["train"].reader.paths[0])
    assert image.mode == "RGB"
    if mode == "L":
        pixels = np.asarray(image)
        assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_array_inputs_become_rgb():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)
    assert np.asarray(array_to_input(gray)).shape == (8, 8, 3)
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    assert array_to_input(rgba).mode == "RGB"
    chw = np.random.default_rng(0).random((1, 8, 8), dtype=np.float32)
    tensor = array_to_input(chw)
    assert tensor.shape == (3, 8, 8) and torch.equal(tensor[0], tensor[2])


def test_digits_split_is_fixed_and_stratified():
    source = load_data("digits")
    train, test = source.splits["train"], source.splits["test"]
    assert (len(train), len(test)) == (1347, 450)
    assert train.reader.images.shape[1:] == (8, 8, 1) and train.reader.images.dtype == np.uint8
    per_class = np.bincount(np.concatenate([train.labels, test.labels]))
    assert np.abs(np.bincount(test.labels) - per_class * 450 / 1797).max() <= 1  # stratified
    assert load_data("digits").fingerprint == source.fingerprint


def test_synthetic_is_seeded_and_configurable():
    a, b = load_data("synthetic"), load_data("synthetic")
    assert a.fingerprint == b.fingerprint
    train_a, train_b = a.splits["train"].reader, b.splits["train"].reader
    assert all(np.array_equal(train_a.pixels(i), train_b.pixels(i)) for i in (0, 17, len(train_a) - 1))
    other = load_data("synthetic:seed=1")
    assert other.fingerprint != a.fingerprint
    assert not np.array_equal(other.splits["train"].reader.pixels(0), train_a.pixels(0))
    assert not np.array_equal(a.splits["test"].reader.pixels(0), train_a.pixels(0))  # the splits differ
    small = load_data("synthetic:classes=3,train=4,test=2,size=16")
    assert len(small.splits["train"]) == 12 and len(small.classes) == 3
    assert small.splits["train"].labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert small.splits["train"].reader.pixels(5).shape == (16, 16, 3)
    assert np.asarray(small.splits["train"].read(5)).tolist() == small.splits["train"].reader.pixels(5).tolist()


def test_npz_uint8_and_float_layouts(tmp_path):
    rng = np.random.default_rng(0)
    hwc = tmp_path / "hwc.npz"
    np.savez(hwc, x_train=rng.integers(0, 255, (6, 10, 10, 3), dtype=np.uint8), y_train=np.array([5, 7] * 3),
             x_test=rng.integers(0, 255, (2, 10, 10, 3), dtype=np.uint8), y_test=np.array([7, 5]))
    source = load_data(hwc)
    assert source.classes == ("5", "7") and source.splits["test"].labels.tolist() == [1, 0]
    chw = tmp_path / "chw.npz"
    np.savez(chw, x_train=rng.random((4, 3, 10, 10)), y_train=np.array([0, 1, 0, 1]),
             x_test=rng.random((2, 3, 10, 10)), y_test=np.array([0, 1]))
    assert load_data(chw).splits["train"].reader.images.dtype == np.float32


@pytest.mark.parametrize("arrays, message", [
    ({"x_train": np.zeros((2, 4, 4, 3), np.uint8), "y_train": np.array([0, 1])}, "lacks x_test, y_test"),
    ({"x_train": np.zeros((2, 4, 4, 3), np.uint8), "y_train": np.array([0, 0]),
      "x_test": np.zeros((1, 4, 4, 3), np.uint8), "y_test": np.array([0])}, "single class"),
    ({"x_train": np.zeros((2, 4, 4, 3), np.int32), "y_train": np.array([0, 1]),
      "x_test": np.zeros((1, 4, 4, 3), np.int32), "y_test": np.array([0])}, "dtype int32"),
])
def test_bad_npz(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(BadInputError, match=message):
        load_data(path)


def test_bad_sources(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        load_data(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="no images found"):
        load_data(tmp_path / "empty")
    make_image_folder(tmp_path / "one", {"only": 3})
    with pytest.raises(BadInputError, match=r"only one class \(only\)"):
        load_data(tmp_path / "one")
    with pytest.raises(BadInputError, match="invalid synthetic option"):
        load_data("synthetic:bogus=1")


def test_split_dataset_reports_a_corrupt_file_instead_of_raising(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", {"a": 2, "b": 2})
    bad = folder / "a" / "001.png"
    bad.write_bytes(b"not a png at all")
    source = load_data(folder)
    dataset = SplitDataset(source.splits["train"], transform=lambda image: torch.zeros(3, 4, 4), input_size=(3, 4, 4))
    image, index, error = dataset[1]
    assert index == 1 and error and image.shape == (3, 4, 4)
    assert dataset[0][2] == ""


def test_eval_transform_follows_the_model_data_config():
    import timm

    from mimprobe.data import build_eval_transform
    from mimprobe.models.preprocessing import resolve_eval_data_config

    model = timm.create_model("test_vit", num_classes=0)
    config = resolve_eval_data_config(model)
    assert config["input_size"] == [3, 160, 160] and config["crop_pct"] == 0.95 and config["mean"] == [0.5] * 3
    image = Image.fromarray(np.full((40, 60, 3), 255, np.uint8))
    tensor = build_eval_transform(config)(image)
    assert tensor.shape == (3, 160, 160)
    assert torch.allclose(tensor, torch.ones_like(tensor))  # (1 - 0.5) / 0.5
    small = resolve_eval_data_config(model, img_size=32)
    assert small["input_size"] == [3, 32, 32] and small["crop_pct"] == 1.0
    assert build_eval_transform(small)(image).shape == (3, 32, 32)


def test_folder_of_images_without_classes_is_unlabelled(tmp_path):
    folder = make_image_folder(tmp_path / "flat", {"tmp": 3})
    for path in (folder / "tmp").iterdir():
        path.rename(folder / path.name)
    (folder / "tmp").rmdir()
    source = load_data(folder)
    assert not source.labelled and source.classes == ()
    assert source.splits["train"].labels.tolist() == [-1, -1, -1]


def test_symlinks_are_followed_once_and_loops_skipped(tmp_path):
    """The issue's case: 18 images and a link back to the root became 5,658 mislabelled rows."""
    outside = make_image_folder(tmp_path / "elsewhere", {"dog": 4}, size=8, seed=1)
    root = make_image_folder(tmp_path / "data", {"airplane": 6, "cat": 6, "ship": 6}, size=8)
    (root / "dog").symlink_to(outside / "dog")  # a linked class folder outside the root: read once
    (root / "cat" / "up").symlink_to(root)  # a loop through the root
    (root / "cat" / "self").symlink_to(root / "cat")  # a loop through the class folder itself
    (root / "ship" / "planes").symlink_to(root / "airplane")  # a second link to a folder already read
    nested = root / "ship" / "more"
    nested.mkdir()
    (nested / "back").symlink_to(nested)  # a loop below a real sub-folder
    source = load_data(root)
    split = source.splits["train"]
    assert source.classes == ("airplane", "cat", "dog", "ship")
    assert split.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 4 + [3] * 6
    assert [os.path.relpath(p, root) for p in split.reader.paths] == (
        [f"{c}/{i:03d}.png" for c in ("airplane", "cat") for i in range(6)]
        + [f"dog/{i:03d}.png" for i in range(4)] + [f"ship/{i:03d}.png" for i in range(6)])
    assert sorted(source.details["skipped_folders"]) == ["cat/self", "cat/up", "ship/more/back", "ship/planes"]
    assert "skipped 4 linked folder(s) already read (a symlink loop or a second link)" in source.summary()


def test_a_symlink_loop_in_a_split_layout_does_not_repeat_images(tmp_path):
    root = tmp_path / "data"
    make_image_folder(root / "train", {"a": 2, "b": 2}, size=8)
    make_image_folder(root / "test", {"a": 1, "b": 1}, size=8)
    (root / "train" / "a" / "loop").symlink_to(root / "train")
    (root / "test" / "b" / "leak").symlink_to(root / "train" / "a")  # train images again, in test
    source = load_data(root)
    assert [len(split) for split in source.splits.values()] == [4, 2]
    assert sorted(source.details["skipped_folders"]) == ["test/b/leak", "train/a/loop"]
