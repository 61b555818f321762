"""A full disk during extraction: exit code 2, one line naming the file and the space needed; the rows recorded
before stay, and the same command afterwards resumes to the bytes of an uninterrupted run."""

from __future__ import annotations

import errno
import json
import os
import re

from typer.testing import CliRunner

from mimprobe.cli import app
from mimprobe.features import store as store_module

DATA = "synthetic:classes=2,train=8,test=4,size=16"
ARGS = ["extract", "test_vit", DATA, "--img-size", "32", "--batch-size", "4", "--no-progress"]


def _tree_bytes(root):
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    files["manifest.json"] = re.sub(rb'"git": "[0-9a-f]+"', b'"git": ""', files["manifest.json"])
    return files


def test_disk_full_while_writing_rows_exits_2_and_resumes_identically(tmp_path, monkeypatch):
    runner = CliRunner()
    assert runner.invoke(app, [*ARGS, "--out", str(tmp_path / "ref")]).exit_code == 0
    (reference,) = (tmp_path / "ref").glob("test_vit__*")
    real_pwrite, feature_writes = os.pwrite, []

    def pwrite_until_full(fd, data, position):
        if "/block" in os.readlink(f"/proc/self/fd/{fd}"):
            feature_writes.append(fd)
            if len(feature_writes) > 7:  # 6 blocks x cls per batch: the 2nd batch's 2nd file finds the disk full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, position)

    with monkeypatch.context() as patched:
        patched.setattr(os, "pwrite", pwrite_until_full)
        full = runner.invoke(app, [*ARGS, "--out", str(tmp_path / "run")])

    assert full.exit_code == 2, full.output
    (line,) = [line for line in full.output.splitlines() if line.startswith("error:")]
    (store_dir,) = (tmp_path / "run").glob("test_vit__*")
    assert re.search(rf"not enough space on the device for {re.escape(str(store_dir))}/train/block\d\d_cls\.npy: "
                     r"it needs [0-9.]+ (B|KiB|MiB) more \([0-9.]+ [KMGT]?i?B free there\)", line), line
    manifest = json.loads((store_dir / "manifest.json").read_text())
    assert manifest["progress"] == {"train": 4, "test": 0} and not manifest["complete"]  # batch 1 kept

    resumed = runner.invoke(app, [*ARGS, "--out", str(tmp_path / "run")])
    assert resumed.exit_code == 0, resumed.output
    assert _tree_bytes(store_dir) == _tree_bytes(reference)


def test_manifest_write_on_a_full_disk_keeps_the_previous_manifest(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    store_module.write_json_atomic(path, {"progress": 1})
    real_replace = os.replace

    def replace_on_full_disk(source, target):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", replace_on_full_disk)
    try:
        store_module.write_json_atomic(path, {"progress": 2})
    except store_module.DiskFullError as error:
        message = str(error)
    else:
        raise AssertionError("no DiskFullError")
    monkeypatch.setattr(os, "replace", real_replace)
    assert json.loads(path.read_text()) == {"progress": 1} and [p.name for p in tmp_path.iterdir()] == [path.name]
    assert f"for {path}: it needs 19 B more" in message


def test_a_store_larger_than_the_free_space_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from mimprobe import _disk

    runner = CliRunner()
    assert runner.invoke(app, [*ARGS, "--out", str(tmp_path / "ref")]).exit_code == 0
    (reference,) = (tmp_path / "ref").glob("test_vit__*")
    manifest = json.loads((reference / "manifest.json").read_text())
    data_bytes = sum(path.stat().st_size - store_module.npy_data_offset(path) for path in reference.glob("*/*.npy"))
    assert store_module.store_bytes(manifest) == data_bytes  # labels and features, headers aside

    for module in (store_module, _disk):
        monkeypatch.setattr(module, "free_bytes", lambda path: data_bytes - 1)
    result = runner.invoke(app, [*ARGS, "--out", str(tmp_path / "run")])

    assert result.exit_code == 2, result.output
    assert (f"it needs {_disk.format_bytes(data_bytes)} more ({_disk.format_bytes(data_bytes - 1)} free there)"
            in result.output), result.output
    assert not list((tmp_path / "run").glob("test_vit__*"))


def test_format_bytes():
    from mimprobe._disk import format_bytes

    assert [format_bytes(n) for n in (0, 1023, 1024, 1536, 5 * 1024 ** 3, 3 * 1024 ** 5)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "5.0 GiB", "3072.0 TiB"]
