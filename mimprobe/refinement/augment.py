"""Training views for NNA refinement: two BYOL-style global views and DINO-style local crops.

The defaults are MIM-Refiner's main recipe, the official ``datasets/imagenet/train_byolaug_localviews`` template
(github.com/ml-jku/MIM-Refiner, ``src/zztemplates/datasets/imagenet/train_byolaug_localviews.yaml``): 2 global
views of 224 px at scale (0.25, 1) and 10 local views of 96 px at scale (0.05, 0.25), all bicubic. Global only
(``local_crops=0``) with BYOL's (0.08, 1) is the paper's "global views" ablation, the official
``stage3/ablations/augmentation/globalviews.yaml``.

Augmentations follow BYOL (Grill et al. 2020, arXiv 2006.07733, Table 6), as the template does: random resized
crop, horizontal flip, colour jitter (0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale p=0.2, Gaussian blur sigma
(0.1, 2) (p=1.0 for the first view, 0.1 for the second, 0.5 for local crops), solarisation (p=0 / 0.2 / 0).

Every sample's randomness is a pure function of ``(seed, epoch, index)``: the same image gets the same views
whatever the process count, worker count or an interruption, which is what makes a resumed run identical to an
uninterrupted one and a 2-process run equal to one process with the doubled batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchvision.transforms import v2

from ..data import Split
from .sizing import default_local_size


@dataclass(frozen=True)
class ViewConfig:
    """Sizes and strengths of the views.

    Attributes:
        img_size: Side of the global views in pixels (the model's input size).
        local_crops: Number of local crops (official: 10; 0: global views only).
        local_size: Side of the local crops; ``None``: 96/224 of ``img_size`` rounded to the patch size (the
            official 96 px at 224 px).
        global_scale: Area range of the global crops (official: 0.25-1; BYOL's own: 0.08-1).
        local_scale: Area range of the local crops (official: 0.05-0.25).
        mean, std: Normalisation of the model's data config.
    """

    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    local_crops: int = 10
    local_size: int | None = None
    global_scale: tuple[float, float] = (0.25, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.25)


def blur_kernel(size: int) -> int:
    """An odd Gaussian kernel of about 10 % of the image side (BYOL: 23 px at 224 px), at least 3."""
    kernel = max(3, int(round(size * 0.1)))
    return kernel if kernel % 2 == 1 else kernel + 1


def byol_view(size: int, *, scale: Sequence[float], blur_p: float, solarize_p: float,
              mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """One BYOL augmentation pipeline: image (PIL or uint8/float tensor) → normalised float32 (3, size, size)."""
    return v2.Compose([
        v2.ToImage(),
        v2.ToDtype(torch.uint8, scale=True),
        v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(blur_kernel(size), sigma=(0.1, 2.0))], p=blur_p),
        v2.RandomSolarize(threshold=128, p=solarize_p),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ])


class MultiViewTransform:
    """image → list of views: 2 global (img_size) then ``local_crops`` local ones (local_size)."""

    def __init__(self, config: ViewConfig, *, patch_size: int = 16):
        local_size = config.local_size or default_local_size(config.img_size, patch_size)
        self.config = config
        self.local_size = local_size
        common = {"mean": config.mean, "std": config.std}
        self.global_views = [
            byol_view(config.img_size, scale=config.global_scale, blur_p=1.0, solarize_p=0.0, **common),
            byol_view(config.img_size, scale=config.global_scale, blur_p=0.1, solarize_p=0.2, **common),
        ]
        self.local_view = byol_view(local_size, scale=config.local_scale, blur_p=0.5, solarize_p=0.0, **common)

    def __call__(self, image) -> list[torch.Tensor]:
        views = [transform(image) for transform in self.global_views]
        views += [self.local_view(image) for _ in range(self.config.local_crops)]
        return views


def _splitmix64(value: int) -> int:
    """One step of SplitMix64 (Steele et al. 2014): a fast, well-mixed 64-bit hash."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentations, a pure function of (seed, epoch, index)."""
    return _splitmix64(_splitmix64(_splitmix64(seed) ^ epoch) ^ index) >> 1


class MultiViewDataset(torch.utils.data.Dataset):
    """Items ``(views, index)``: the list of augmented views of one image and its row index in the split.

    Call `set_epoch` before building each epoch's loader: the views of sample ``index`` in epoch ``epoch`` are
    drawn from torch's generator seeded with ``sample_seed(seed, epoch, index)`` (the global state is restored).
    """

    def __init__(self, split: Split, transform: MultiViewTransform, *, seed: int):
        self.split = split
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], int]:
        image = self.split.read(index)
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed also queues a CUDA seeding that records a stack trace
            # per call (several ms) when CUDA is not initialised
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, index))
            views = self.transform(image)
        return views, index


def collate_views(items: list[tuple[list[torch.Tensor], int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Batch items into ``[view_0 (B, 3, H, W), view_1, ...]`` and indices (B,) int64."""
    num_views = len(items[0][0])
    views = [torch.stack([item[0][v] for item in items]) for v in range(num_views)]
    return views, torch.tensor([item[1] for item in items], dtype=torch.int64)
