"""A torch Dataset over one split: decodes, converts to RGB and applies the eval transform."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from .sources import Split


def to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, palette, CMYK and RGBA (alpha dropped) images become RGB."""
    return image if image.mode == "RGB" else image.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Decode an image file fully (so truncated files fail here, not later) and convert it to RGB."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


def array_to_input(image: np.ndarray) -> Image.Image | torch.Tensor:
    """One array image to what the transform takes: uint8 (H, W, C) → RGB PIL; float (C, H, W) → RGB tensor."""
    if image.dtype == np.uint8:
        if image.shape[-1] == 1:
            return Image.fromarray(image[..., 0], mode="L").convert("RGB")
        return to_rgb(Image.fromarray(image))
    tensor = torch.from_numpy(np.ascontiguousarray(image))
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    return tensor[:3].contiguous()  # drop alpha


class SplitDataset(torch.utils.data.Dataset):
    """Items ``(image, index, error)``: the transformed (3, H, W) image, its row index in the split, and ``""``
    or the decoding error of a bad file (then the image is zeros and the caller decides to stop or skip)."""

    def __init__(self, split: Split, transform: Callable, input_size: tuple[int, int, int]):
        self.split = split
        self.transform = transform
        self.input_size = tuple(input_size)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        if self.split.paths is not None:
            try:
                image = load_rgb(self.split.paths[index])
            except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
                return torch.zeros(self.input_size), index, f"{type(error).__name__}: {error}".replace("\n", " ")
        else:
            image = array_to_input(self.split.images[index])
        return self.transform(image), index, ""
