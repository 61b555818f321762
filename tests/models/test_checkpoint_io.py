"""Reading checkpoint files: pickles that would run code are refused without running it; broken files are
reported as checkpoint errors and missing ones as bad input."""

from __future__ import annotations

import argparse
import hashlib
import pathlib

import pytest
import torch
from safetensors.torch import save_file

from mimprobe.errors import BadInputError, CheckpointError
from mimprobe.models import load_model, read_checkpoint, sha256_file


class TouchOnUnpickle:
    """Unpickling this object creates ``marker``: a harmless stand-in for arbitrary code in a pickle."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.fixture
def malicious_checkpoint(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    marker = tmp_path / "code-ran"
    path = tmp_path / "malicious.pth"
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 64)}, "payload": TouchOnUnpickle(marker)}, path)
    assert not marker.exists()
    return path, marker


def test_the_malicious_payload_is_real(malicious_checkpoint):
    path, marker = malicious_checkpoint
    torch.load(path, weights_only=False)  # an unsafe load runs it, so the refusal below means something
    assert marker.exists()


def test_read_checkpoint_refuses_code_and_does_not_run_it(malicious_checkpoint):
    path, marker = malicious_checkpoint

    with pytest.raises(CheckpointError, match="refusing to load") as raised:
        read_checkpoint(path)

    assert not marker.exists()
    message = str(raised.value)
    assert "nothing from it was executed" in message
    assert "pathlib.Path" in message  # names the globals it would have needed (Path.touch pickles via getattr)
    assert "\n" not in message


def test_load_model_refuses_code_and_does_not_run_it(malicious_checkpoint):
    path, marker = malicious_checkpoint

    with pytest.raises(CheckpointError, match="refusing to load"):
        load_model("test_vit", checkpoint=path, img_size=32)

    assert not marker.exists()


def test_argparse_namespace_is_allowed(tmp_path):
    # fairseq (data2vec 2.0), DeiT and MAE save their arguments as a Namespace next to the weights
    path = tmp_path / "with_args.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1, arch="vit")}, path)

    checkpoint = read_checkpoint(path)

    assert checkpoint["args"].arch == "vit"
    assert torch.equal(checkpoint["model"]["w"], torch.ones(2))


def test_safetensors_round_trip(tmp_path):
    path = tmp_path / "weights.safetensors"
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    save_file(tensors, str(path))

    loaded = read_checkpoint(path)

    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[key], tensors[key]) for key in tensors)


def test_truncated_checkpoint_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "truncated.pth"
    torch.save({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(CheckpointError, match=str(path.name)):
        read_checkpoint(path)
    with pytest.raises(CheckpointError):
        load_model("test_vit", checkpoint=path, img_size=32)


@pytest.mark.parametrize("suffix", [".pth", ".bin", ".safetensors"])
def test_garbage_file_is_a_checkpoint_error(tmp_path, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(bytes(range(256)) * 8)

    with pytest.raises(CheckpointError, match="cannot read") as raised:
        read_checkpoint(path)
    assert "refusing" not in str(raised.value)  # damaged is not the same as unsafe


def test_empty_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")

    with pytest.raises(CheckpointError):
        read_checkpoint(path)


def test_missing_file_is_bad_input_not_a_checkpoint_error(tmp_path):
    path = tmp_path / "absent.pth"

    with pytest.raises(BadInputError, match="not found") as raised:
        read_checkpoint(path)
    assert type(raised.value) is BadInputError

    with pytest.raises(BadInputError, match="not found") as raised:
        load_model("test_vit", checkpoint=path)
    assert type(raised.value) is BadInputError


def test_a_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        read_checkpoint(tmp_path)


def test_checkpoint_holding_a_whole_model_is_refused_with_advice(tmp_path):
    # torch.save(model) pickles the class: refused, and the message says to save the state dict instead
    path = tmp_path / "whole_model.pth"
    torch.save(torch.nn.Linear(2, 2), path)

    with pytest.raises(CheckpointError, match="refusing to load.*state_dict"):
        read_checkpoint(path)


def test_sha256_file_matches_hashlib(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 1000)

    assert sha256_file(path, chunk_bytes=1000) == hashlib.sha256(path.read_bytes()).hexdigest()
