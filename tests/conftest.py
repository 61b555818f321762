"""Shared fixtures: small image folders, and a CIFAR-10 subset unpacked from ../shared when it is present."""

from __future__ import annotations

import os

# The suite's tensors are tiny: on a 2-core machine one thread per process (this one and the subprocesses the tests
# start) runs them fastest, as `--threads 1` does for users. Set before torch, NumPy's BLAS or FAISS load; an
# explicit OMP_NUM_THREADS in the environment wins.
for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CIFAR_TAR = REPO.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the kernel's choice): for torchrun's --master_port and any
    test that listens. Every test that needs a port takes it from here."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests are skipped (with the reason) where torch sees no CUDA device."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu); none is visible to torch here")
    for item in gpu_items:
        item.add_marker(skip)


def make_image_folder(root: Path, classes: dict[str, int], size: int = 20, mode: str = "RGB", seed: int = 0) -> Path:
    """root/<class>/<i>.png with random images of a given PIL mode."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
            image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)
            image.save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images", {"cat": 5, "dog": 4, "eel": 3})


def unpack_cifar(root: Path, *, train: int, test: int) -> Path:
    """The first ``train`` train and ``test`` test JPEGs of each CIFAR-10 class, unpacked into ``root`` (skips the
    calling test when ../shared is absent)."""
    if not CIFAR_TAR.is_file():
        pytest.skip(f"real-image test needs {CIFAR_TAR} (the project's shared folder), which is absent here")
    quota = {"train": train, "test": test}
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(CIFAR_TAR, "r:gz") as archive:
        for member in archive:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] not in quota:
                continue
            key = (parts[-3], parts[-2])
            if counts.get(key, 0) >= quota[parts[-3]]:
                continue
            counts[key] = counts.get(key, 0) + 1
            target = root / parts[-3] / parts[-2] / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.extractfile(member).read())
            if len(counts) == 20 and all(counts[k] >= quota[k[0]] for k in counts):
                break
    return root


@pytest.fixture(scope="session")
def cifar_subset(tmp_path_factory) -> Path:
    """The first 20 train and 10 test JPEGs of each CIFAR-10 class, unpacked into a temporary folder."""
    if not CIFAR_TAR.is_file():
        pytest.skip(f"real-image test needs {CIFAR_TAR} (the project's shared folder), which is absent here")
    return unpack_cifar(tmp_path_factory.mktemp("cifar10"), train=20, test=10)
