"""The refined encoder's export and the training checkpoint: byte-identical exports of identical weights (so the
same feature store is found again), the usual file mode, and a full disk that keeps the previous checkpoint."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors import safe_open

from mimprobe import _disk
from mimprobe.refinement import checkpoint as checkpoint_module
from mimprobe.refinement.checkpoint import EXPORT, EXPORT_INFO, export_encoder, save_training_state

INFO = {"model": "test_vit", "data_config": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "input_size": [3, 32, 32],
                                             "interpolation": "bicubic", "crop_pct": 0.9}}


def test_identical_weights_give_identical_bytes_and_the_same_store(tmp_path):
    """safetensors writes its header from hash maps seeded per map (20 plain saves in one process gave 6 different
    files): eight exports of the same weights must give one file, and the feature store keyed by its hash one key."""
    import timm
    from safetensors.torch import save

    from mimprobe import extract

    torch.manual_seed(0)
    weights = timm.create_model("test_vit", num_classes=0, img_size=32).state_dict()
    metadata = {"format": "timm", "model": "test_vit", "data_config": json.dumps(INFO["data_config"])}
    assert len({save(weights, metadata=metadata) for _ in range(8)}) > 1  # the library alone varies

    exports = []
    for index in range(8):
        (tmp_path / str(index)).mkdir()
        exports.append(export_encoder(weights, tmp_path / str(index), INFO).read_bytes())
    assert len(set(exports)) == 1
    header = json.loads(exports[0][8:8 + int.from_bytes(exports[0][:8], "little")])
    assert list(header) == sorted(header) and list(header["__metadata__"]) == sorted(header["__metadata__"])
    with safe_open(str(tmp_path / "0" / EXPORT), "pt") as handle:  # still a valid file for safetensors
        assert handle.metadata()["model"] == "test_vit"
        assert json.loads(handle.metadata()["data_config"]) == INFO["data_config"]
        assert all(torch.equal(handle.get_tensor(key), value) for key, value in weights.items())
    stores = [extract("test_vit", "synthetic:classes=2,train=2,test=1,size=8", out=tmp_path / "features",
                      checkpoint=str(tmp_path / name / EXPORT), img_size=32, progress=False).store
              for name in ("0", "1")]
    assert stores[0].key == stores[1].key


def test_export_has_the_mode_of_the_other_files_and_loads(tmp_path):
    tensors = {"b.weight": torch.randn(3, 2), "a.bias": torch.arange(4, dtype=torch.float16)}
    path = export_encoder(tensors, tmp_path, INFO)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask == stat.S_IMODE((tmp_path / EXPORT_INFO).stat().st_mode)
    with safe_open(str(path), "pt") as handle:
        assert sorted(handle.keys()) == ["a.bias", "b.weight"]
        assert all(torch.equal(handle.get_tensor(key), tensors[key]) for key in tensors)
    assert [p.name for p in sorted(tmp_path.iterdir())] == [EXPORT_INFO, EXPORT]


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """torch's zip writer reports a full disk as RuntimeError ("unexpected pos"): DiskFullError names the file and
    the checkpoint's size; the previous checkpoint stays and no partial file is left."""
    path = tmp_path / "checkpoint-last.pth"
    save_training_state(path, {"step": 1, "w": torch.zeros(4)})
    before = path.read_bytes()
    real_save = torch.save

    def save_on_a_full_disk(state, target):
        real_save({"half": 1}, target)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(checkpoint_module.torch, "save", save_on_a_full_disk)
    with pytest.raises(_disk.DiskFullError, match=rf"for {path}: it needs 4\.0 MiB more") as raised:
        save_training_state(path, {"step": 2, "w": torch.zeros(1024, 1024), "opt": {"m": [torch.zeros(1)]}})
    assert raised.value.needed_bytes == 4 * 1024 * 1024 + 4
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]

    def other_failure(state, target):
        raise RuntimeError("a bug, not a full disk")

    monkeypatch.setattr(checkpoint_module.torch, "save", other_failure)
    with pytest.raises(RuntimeError, match="a bug"):  # not every error is a full disk
        save_training_state(path, {"w": torch.zeros(2)})
    assert path.read_bytes() == before
