"""Built-in pre-training, to make a masked-image-modelling checkpoint from a small or private dataset.

`pretrain_mae` (= `run_pretrain_mae`) trains a timm ViT as a masked autoencoder (He et al. 2021,
arXiv 2111.06377) and exports an official-layout MAE checkpoint that `load_model(..., checkpoint=...)` reads.
"""

from .mae import (
    Masking,
    MaskedAutoencoder,
    MaeOutput,
    masked_patch_loss,
    num_visible,
    patchify,
    random_masking,
    sincos_pos_embed,
    unpatchify,
)
from .train import MaeConfig, PretrainResult, build_train_transform, mae_lr, run_pretrain_mae

pretrain_mae = run_pretrain_mae  # the package-level name, as `mimprobe.extract` is for feature stores

__all__ = [
    "MaeConfig",
    "MaeOutput",
    "MaskedAutoencoder",
    "Masking",
    "PretrainResult",
    "build_train_transform",
    "mae_lr",
    "masked_patch_loss",
    "num_visible",
    "patchify",
    "pretrain_mae",
    "random_masking",
    "run_pretrain_mae",
    "sincos_pos_embed",
    "unpatchify",
]
