"""`MaeConfig`: the options of an MAE pre-training run (`mimprobe pretrain-mae`, the ``[pretrain]`` spec section)."""

from __future__ import annotations

from dataclasses import dataclass

from ..options import check_options, device_option, img_size_option, option, seed_option
from ..choices import PRECISIONS


@dataclass(frozen=True)
class MaeConfig:
    """Options of one MAE pre-training run (`mimprobe pretrain-mae`, the ``[pretrain]`` spec section). The defaults are the small-model demo's; the official ViT-B recipe
    is decoder 512 wide, 8 blocks, 16 heads, 800–1600 epochs, 40 warmup epochs, batch 4096."""

    img_size: int | None = img_size_option()
    epochs: int = option(10, "Passes over the train split.", minimum=1)
    # the last incomplete batch of an epoch is dropped (official drop_last)
    batch_size: int = option(64, "Images per step (at least 2).", minimum=2)
    base_lr: float = option(1.5e-4, "Peak lr per 256 images (official MAE linear scaling).", cli=False)
    lr: float | None = option(None, "Peak learning rate [default: 1.5e-4 x batch / 256].")
    min_lr: float = option(0.0, "End of the cosine.", cli=False)
    # linear warmup from 0, counted in steps (official: 40 of 800 epochs)
    warmup_epochs: float = option(1.0, "Linear warmup before the cosine decay.", minimum=0)
    # not on norms, biases, tokens and position tables
    weight_decay: float = option(0.05, "Weight decay (official 0.05).", cli=False)
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas (official 0.9, 0.95).", cli=False)
    mask_ratio: float = option(0.75, "Fraction of patches hidden from the encoder.")
    # targets are per-patch normalised pixels (official default for results)
    norm_pix_loss: bool = option(True, "Per-patch normalised pixel targets (official).", cli=False)
    decoder_dim: int = option(128, "Decoder width (official MAE: 512).", minimum=1)
    # 0: SimMIM (arXiv 2111.09886): mask tokens in the encoder and a linear pixel head, so the encoder's last blocks
    # do the reconstruction (MIM-Refiner, arXiv 2402.10093, Sec. 3: light decoders make them less abstract)
    decoder_depth: int = option(2, "Decoder blocks (official MAE: 8); 0: SimMIM's linear head, the encoder sees "
                                   "every patch with hidden ones as a mask token.", minimum=0)
    decoder_heads: int = option(4, "Decoder attention heads (official MAE: 16).", minimum=1)
    crop_scale: tuple[float, float] = option((0.2, 1.0), "RandomResizedCrop area range (official 0.2-1).",
                                             cli=False)
    seed: int = seed_option("the initialisation, data order, augmentation and masks")
    device: str = device_option()
    precision: str = option("auto", "auto (bf16 autocast on GPU, fp32 on CPU), fp32, bf16 or fp16.",
                            choices=PRECISIONS)
    # per-epoch snapshots for `mimprobe profile --checkpoint RUN` (a series); checkpoint-last.pth stays the resume file
    save_every: int | None = option(None, "Also keep the weights every N epochs (and after the last) as "
                                          "checkpoint-{epoch}.pth, a series `mimprobe profile --checkpoint OUT` "
                                          "profiles [default: none].", minimum=1)
    # resume is bit-exact with the same number
    workers: int = option(0, "DataLoader worker processes.", minimum=0)

    def __post_init__(self) -> None:
        for name in ("betas", "crop_scale"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        check_options(self)

    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else self.base_lr * self.batch_size / 256


