"""Built-in pre-training, to make a masked-image-modelling checkpoint from a small or private dataset.

`run_pretrain_mae` trains a timm ViT as a masked autoencoder (He et al. 2021,
arXiv 2111.06377) and exports an official-layout MAE checkpoint that `load_model(..., checkpoint=...)` reads.
"""

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "Masking": ".mae", "MaskedAutoencoder": ".mae", "MaeOutput": ".mae", "masked_patch_loss": ".mae",
    "num_visible": ".mae", "patchify": ".mae", "random_masking": ".mae", "sincos_pos_embed": ".mae",
    "unpatchify": ".mae", "MaeConfig": ".config", "PretrainResult": ".train", "build_train_transform": ".train",
    "mae_lr": ".train", "run_pretrain_mae": ".train",
})
