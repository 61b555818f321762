"""Reading checkpoint files: nothing from a pickle ever runs (payloads become inert placeholders, weights load;
files whose tensors sit only inside such objects are refused); broken files are reported as checkpoint errors
and missing ones as bad input."""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from mimprobe.errors import BadInputError, CheckpointError
from mimprobe.models import InertObject, load_model, read_checkpoint, sha256_file


class TouchOnUnpickle:
    """Unpickling this object creates ``marker``: a harmless stand-in for arbitrary code in a pickle."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


class ShellOnUnpickle:
    """Unpickling this object runs a shell command that writes ``marker`` (``os.system``)."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo ran > {self.marker}",)


class ExecOnUnpickle:
    """Unpickling this object runs Python source with ``builtins.exec``."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


class PATCHABLE:
    """A class a BUILD opcode patches under a plain unpickler."""


PAYLOADS = {"pathlib-touch": TouchOnUnpickle, "os-system": ShellOnUnpickle, "exec": ExecOnUnpickle}


@pytest.fixture(params=sorted(PAYLOADS))
def malicious_checkpoint(request, tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, dict]:
    """Weights beside a payload that would write ``marker`` if anything from the file ran."""
    marker = tmp_path / "code-ran"
    path = tmp_path / "malicious.pth"
    weights = {"cls_token": torch.randn(1, 1, 64), "blocks.0.norm1.weight": torch.randn(64)}
    torch.save({"model": weights, "payload": PAYLOADS[request.param](marker), "epoch": 3}, path)
    assert not marker.exists()
    return path, marker, weights


def test_the_malicious_payloads_are_real(malicious_checkpoint):
    path, marker, _ = malicious_checkpoint
    torch.load(path, weights_only=False)  # an unsafe load runs it, so the tests below mean something
    assert marker.exists()


def test_weights_load_beside_a_payload_that_never_runs(malicious_checkpoint):
    path, marker, weights = malicious_checkpoint
    notes: list[str] = []

    checkpoint = read_checkpoint(path, notes)

    assert not marker.exists()
    assert isinstance(checkpoint["payload"], InertObject)
    assert checkpoint["epoch"] == 3
    assert checkpoint["model"].keys() == weights.keys()
    assert all(torch.equal(checkpoint["model"][key], weights[key]) for key in weights)
    assert len(notes) == 1 and "inert placeholders" in notes[0]


def test_legacy_non_zip_pickle_with_a_payload(tmp_path):
    # torch.save(..., _use_new_zipfile_serialization=False): torch's legacy reader uses the same restricted unpickler
    marker = tmp_path / "code-ran"
    path = tmp_path / "legacy.pth"
    torch.save({"model": {"w": torch.arange(3.0)}, "payload": ShellOnUnpickle(marker)}, path,
               _use_new_zipfile_serialization=False)

    checkpoint = read_checkpoint(path)

    assert not marker.exists()
    assert checkpoint["payload"].pickled_global.endswith(".system")  # posix.system (nt.system on Windows)
    assert torch.equal(checkpoint["model"]["w"], torch.arange(3.0))


def test_load_model_takes_the_weights_and_runs_nothing(tmp_path):
    reference = timm.create_model("test_vit", num_classes=0, img_size=32)
    marker = tmp_path / "code-ran"
    path = tmp_path / "with_payload.pth"
    torch.save({"model": reference.state_dict(), "cfg": ShellOnUnpickle(marker)}, path)

    loaded = load_model("test_vit", checkpoint=path, img_size=32)

    assert not marker.exists()
    assert any("inert placeholders" in note and "system" in note for note in loaded.notes)
    assert all(torch.equal(loaded.model.state_dict()[key], value) for key, value in reference.state_dict().items())


def test_weights_only_inside_a_payload_are_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "wrapped.pth"
    torch.save({"model": ShellOnUnpickle(marker), "args": argparse.Namespace(lr=0.1), "sizes": dict,
                "trainer": TouchOnUnpickle(marker)}, path)

    messages = set()
    for _ in range(3):  # the message is the same on every run (it once listed a set in random order)
        with pytest.raises(CheckpointError, match="refusing to load") as raised:
            read_checkpoint(path)
        messages.add(str(raised.value))

    assert not marker.exists()
    (message,) = messages
    assert "nothing from it was executed" in message and "\n" not in message
    # only the classes that were not unpickled, sorted; argparse.Namespace and dict are allowed and not listed
    assert "(builtins.getattr, pathlib.Path, pathlib.PosixPath, posix.system)" in message
    assert "Namespace" not in message and "builtins.dict" not in message


def test_build_on_a_class_cannot_patch_it():
    """pickle's BUILD on a class object would setattr on the class for the whole process (a plain Unpickler does
    it: checked first); the restricted unpickler refuses."""
    import io

    from mimprobe.models.checkpoint_io import _restricted_pickle_module

    stream = b"cargparse\nNamespace\nN}S'patched'\nI1\ns\x86b."  # Namespace, BUILD (None, {'patched': 1})
    unsafe = pickle.loads(stream.replace(b"argparse\nNamespace", b"tests.models.test_checkpoint_io\nPATCHABLE"))
    assert unsafe is PATCHABLE and PATCHABLE.patched == 1  # what a plain unpickler does

    with pytest.raises(pickle.UnpicklingError, match="BUILD on 'Namespace' refused"):
        _restricted_pickle_module(set()).load(io.BytesIO(stream))
    assert not hasattr(argparse.Namespace, "patched")


def test_checkpoint_holding_a_whole_model_is_refused_with_advice(tmp_path):
    # torch.save(model) pickles the class: its tensors sit inside an object that is not unpickled
    path = tmp_path / "whole_model.pth"
    torch.save(torch.nn.Linear(2, 2), path)

    with pytest.raises(CheckpointError, match=r"refusing to load.*torch\.nn\.modules\.linear\.Linear.*state_dict"):
        read_checkpoint(path)


def test_torchscript_archive_is_refused(tmp_path):
    # torch.load(weights_only=False) would pass these to torch.jit.load, which runs their code
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))

    with pytest.raises(CheckpointError):
        read_checkpoint(path)


def test_numpy_scalars_load_as_values(tmp_path):
    path = tmp_path / "numpy.pth"
    torch.save({"model": {"w": torch.ones(2)}, "best": np.float64(0.5), "step": np.int64(7),
                "hist": np.arange(3, dtype=np.float32)}, path)
    notes: list[str] = []

    checkpoint = read_checkpoint(path, notes)

    assert checkpoint["best"] == 0.5 and checkpoint["step"] == 7 and checkpoint["hist"].dtype == np.float32
    assert notes == []  # the weights-only loader read it: nothing was replaced


def test_fairseq_checkpoint_with_an_omegaconf_cfg_loads_without_importing_omegaconf(tmp_path):
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create({"model": {"_name": "data2vec_multi", "depth": 10},
                                      "task": {"_name": "mae_image"}})
    path = tmp_path / "fairseq.pt"
    torch.save({"args": None, "cfg": cfg, "model": {"w": torch.arange(4.0)},
                "optimizer_history": [{"num_updates": np.int64(5)}]}, path)
    script = (
        "import sys; from mimprobe.models import read_checkpoint, InertObject\n"
        f"checkpoint = read_checkpoint({str(path)!r})\n"
        "assert isinstance(checkpoint['cfg'], InertObject), checkpoint['cfg']\n"
        "assert checkpoint['cfg'].pickled_global == 'omegaconf.dictconfig.DictConfig'\n"
        "assert checkpoint['model']['w'].tolist() == [0.0, 1.0, 2.0, 3.0]\n"
        "assert checkpoint['optimizer_history'][0]['num_updates'] == 5\n"
        "assert not [name for name in sys.modules if name.startswith('omegaconf')], 'omegaconf was imported'\n"
        "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=pathlib.Path(__file__).resolve().parents[2])

    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


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


def test_sha256_file_matches_hashlib(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 1000)

    assert sha256_file(path, chunk_bytes=1000) == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("suffix", [".pth", ".bin", ".safetensors"])
def test_a_text_file_is_not_a_checkpoint(tmp_path, suffix):
    """A text file saved under a checkpoint's name (an HTML error page, a git-lfs pointer) is named as such in one
    line, not "KeyError: 101"; through the CLI it is exit code 2 and no store is written."""
    from typer.testing import CliRunner

    from mimprobe.cli import app

    path = tmp_path / f"weights{suffix}"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 12\n")

    with pytest.raises(CheckpointError, match=r"not a checkpoint \(a text file starting 'version https://git-lf") \
            as raised:
        read_checkpoint(path)
    assert "\n" not in str(raised.value) and "KeyError" not in str(raised.value)

    result = CliRunner().invoke(app, ["extract", "test_vit", "synthetic:classes=2,train=4,test=2,size=8", "--img-size",
                                      "32", "--checkpoint", str(path), "--out", str(tmp_path / "features")])
    assert result.exit_code == 2, result.output
    assert "not a checkpoint" in result.output and not (tmp_path / "features").exists()


def test_release_files_are_read_by_torchs_public_weights_only_loader(tmp_path, monkeypatch):
    """An omegaconf cfg and a getattr-call payload (pathlib.Path.touch) are read by ``torch.load(weights_only=True)``
    with placeholders allowed through ``torch.serialization.safe_globals`` (pass 2), never by the private-API
    unpickler (pass 3), which stays for globals torch blocks outright (os.system)."""
    from mimprobe.models import checkpoint_io

    def no_restricted_pass(path):
        raise AssertionError(f"pass 3 used for {path}")

    omegaconf = pytest.importorskip("omegaconf")
    marker = tmp_path / "code-ran"
    path = tmp_path / "release.pt"
    torch.save({"cfg": omegaconf.OmegaConf.create({"model": {"depth": 10}}), "model": {"w": torch.arange(4.0)},
                "payload": TouchOnUnpickle(marker)}, path)
    with monkeypatch.context() as patched:
        patched.setattr(checkpoint_io, "_read_restricted", no_restricted_pass)
        checkpoint = read_checkpoint(path)
    assert not marker.exists() and checkpoint["cfg"].pickled_global == "omegaconf.dictconfig.DictConfig"
    assert isinstance(checkpoint["payload"], InertObject) and torch.equal(checkpoint["model"]["w"], torch.arange(4.0))

    blocked = tmp_path / "blocked.pt"
    torch.save({"model": {"w": torch.ones(1)}, "payload": ShellOnUnpickle(marker)}, blocked)
    used = []
    monkeypatch.setattr(checkpoint_io, "_read_restricted",
                        lambda p, original=checkpoint_io._read_restricted: used.append(p) or original(p))
    assert isinstance(read_checkpoint(blocked)["payload"], InertObject) and used == [blocked]
    assert not marker.exists()
