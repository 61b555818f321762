"""`ExtractConfig`: the options of one extraction (`mimprobe extract`, and the extraction inside `mimprobe profile`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..blocks import BlockSpec, parse_block_spec
from ..errors import BadInputError
from ..options import check_options, device_option, img_size_option, option
from ..choices import (POINTS, POOLINGS, PRECISIONS, STORE_DTYPES, parse_channel_values, parse_points,
                       parse_poolings)


def _channels(option_name: str) -> Callable[[str], tuple[float, ...]]:
    def parse(text: str) -> tuple[float, ...]:
        return tuple(parse_channel_values(text, option_name))
    return parse


@dataclass(frozen=True)
class ExtractConfig:
    """Options of one extraction (`mimprobe extract`, and the extraction inside `mimprobe profile`). Everything here
    that changes the numbers goes into the store key."""

    blocks: BlockSpec = option(None, "all, last:N, or a 0-based list such as 0,5,11 or 4-11 (negative indices count "
                               "from the end).", short="-b", parse=parse_block_spec, show_default="all")
    poolings: tuple[str, ...] = option(("cls",), "cls, mean (patch tokens only), cls+mean, a comma list, or all.",
                                       flag="pool", short="-p", parse=parse_poolings, choices=POOLINGS)
    norm: str = option("raw", "raw block outputs (MIM-Refiner), or final: the model's last norm applied (to the "
                              "block point only; the points inside a block are read raw).", choices=("raw", "final"))
    # every point comes from the same forward pass (hooks); each is its own array of the store and part of its key
    points: tuple[str, ...] = option(("block",), "Where each block is read: block (its output), norm1, attn (the "
                                     "attention branch after layer scale, before the residual add), norm2, mlp_hidden "
                                     "(the MLP's hidden activation, pooled as tokens), mlp (the MLP branch), a comma "
                                     "list, or all. Pre-norm ViT, BEiT and EVA blocks only, for points other than "
                                     "block.", parse=parse_points, choices=POINTS)
    # on resume, the store's own batch size is used (same batches, same bytes)
    batch_size: int = option(64, "Images per forward pass.", minimum=1)
    workers: int = option(0, "DataLoader worker processes for decoding images.", minimum=0)
    device: str = device_option()
    precision: str = option("auto", "auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16.", choices=PRECISIONS)
    img_size: int | None = img_size_option()
    store_dtype: str = option("float16", "float16 or float32.", choices=STORE_DTYPES)
    skip_bad_images: bool = option(False, "Skip undecodable images (recorded in the manifest, label -1) instead of "
                                          "stopping.")
    # evaluation preprocessing overrides (default: the checkpoint family's, else the timm model's data config)
    mean: tuple[float, ...] | None = option(None, "Normalisation mean R,G,B [default: the checkpoint family's "
                                            "evaluation preprocessing, else timm's data config of the model].",
                                            parse=_channels("--mean"))
    std: tuple[float, ...] | None = option(None, "Normalisation std R,G,B [default: as --mean].",
                                           parse=_channels("--std"))
    interpolation: str | None = option(None, "Resize interpolation: bicubic, bilinear, ... [default: as --mean].")
    crop_pct: float | None = option(None, "Centre-crop fraction: resize to size/crop_pct then crop (0.875 = resize "
                                          "256, crop 224) [default: as --mean; 1.0 with --img-size].")
    wait: bool = option(True, "When another run is writing the same store, wait for it (then reuse it); "
                              "--no-wait stops instead (exit 2, naming its pid).", spec=False)
    overwrite: bool = option(False, "Delete the store of these settings (damaged, or to start again) and extract "
                                    "it anew.", spec=False)
    verify: bool = option(False, "Before reusing or resuming the store, read every value (finite, no lost writes), "
                                 "compare its labels with the data's and extract the first batch of every split "
                                 "again to compare.", spec=False)

    def __post_init__(self) -> None:
        if isinstance(self.poolings, str):
            object.__setattr__(self, "poolings", (self.poolings,))
        object.__setattr__(self, "poolings", tuple(dict.fromkeys(self.poolings)))  # unique, in the order given
        if not self.poolings:
            raise BadInputError(f"--pool needs at least one pooling: use {', '.join(POOLINGS)}")
        if isinstance(self.points, str):
            object.__setattr__(self, "points", (self.points,))
        if not self.points:
            raise BadInputError(f"--points needs at least one point: use {', '.join(POINTS)}")
        order = {point: position for position, point in enumerate(POINTS)}  # unknown ones: check_options names them
        object.__setattr__(self, "points", tuple(sorted(dict.fromkeys(self.points),
                                                        key=lambda p: order.get(p, len(order)))))
        if self.mean is not None:
            object.__setattr__(self, "mean", tuple(self.mean))
        if self.std is not None:
            object.__setattr__(self, "std", tuple(self.std))
        check_options(self)


