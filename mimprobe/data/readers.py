"""Per-index image readers: every data source hands out one image per index, so extraction holds a batch of
images, never the dataset, and a batch of rows can be read again on resume.

A reader is `len`, ``read(index)`` (an RGB PIL image, or a (3, H, W) float tensor in [0, 1] for float arrays;
raises when the image cannot be decoded), ``describe(index)`` (a human name for error messages) and
``head(count)`` (the first ``count`` images, for re-checking a store's first batch). Readers are pickled into
DataLoader worker processes; those that hold open files reopen them in each process.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image

ImageInput = Image.Image | torch.Tensor


class ImageReader(Protocol):
    def __len__(self) -> int: ...

    def read(self, index: int) -> ImageInput: ...

    def describe(self, index: int) -> str: ...

    def head(self, count: int) -> ImageReader: ...


def to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, palette, CMYK and RGBA (alpha dropped) images become RGB."""
    return image if image.mode == "RGB" else image.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Decode an image file fully (so truncated files fail here, not later) and convert it to RGB."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


def decode_rgb(data: bytes) -> Image.Image:
    """Decode an encoded image (the bytes of a file) as `load_rgb` does: the same bytes give the same pixels."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return to_rgb(image)


def array_to_input(image: np.ndarray) -> ImageInput:
    """One array image to what the transform takes: uint8 (H, W, C) → RGB PIL; float (C, H, W) → RGB tensor."""
    if image.dtype == np.uint8:
        if image.shape[-1] == 1:
            return Image.fromarray(image[..., 0], mode="L").convert("RGB")
        return to_rgb(Image.fromarray(image))
    tensor = torch.from_numpy(np.ascontiguousarray(image))
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    return tensor[:3].contiguous()  # drop alpha


@dataclass(frozen=True)
class FileReader:
    """Image files (absolute paths), one per index."""

    paths: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> Image.Image:
        return load_rgb(self.paths[index])

    def describe(self, index: int) -> str:
        return self.paths[index]

    def head(self, count: int) -> FileReader:
        return FileReader(self.paths[:count])


@dataclass(frozen=True)
class ArrayReader:
    """Images of an array held in memory: (n, H, W, C) uint8 or (n, C, H, W) float32 in [0, 1]."""

    images: np.ndarray
    split: str  # names the rows in messages: ``split[index]``

    def __len__(self) -> int:
        return len(self.images)

    def read(self, index: int) -> ImageInput:
        return array_to_input(self.images[index])

    def describe(self, index: int) -> str:
        return f"{self.split}[{index}]"

    def head(self, count: int) -> ArrayReader:
        return ArrayReader(self.images[:count], self.split)
