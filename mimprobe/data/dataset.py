"""A torch Dataset over one split: reads one image per index, converts it to RGB and applies the eval transform."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .split import Split


class SplitDataset(torch.utils.data.Dataset):
    """Items ``(image, index, error)``: the transformed (3, H, W) image, its row index in the split, and ``""``
    or the decoding error of a bad image (then the image is zeros and the caller decides to stop or skip)."""

    def __init__(self, split: Split, transform: Callable, input_size: tuple[int, int, int]):
        self.split = split
        self.transform = transform
        self.input_size = tuple(input_size)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            image = self.split.read(index)
        except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
            return torch.zeros(self.input_size), index, f"{type(error).__name__}: {error}".replace("\n", " ")
        return self.transform(image), index, ""
