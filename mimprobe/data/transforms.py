"""The evaluation transform, taken from the model's own timm data config (never hard-coded)."""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from timm.data import create_transform, resolve_model_data_config


def resolve_eval_data_config(model: nn.Module, *, img_size: int | None = None,
                             crop_pct: float | None = None) -> dict[str, Any]:
    """The model's timm data config, with optional overrides for small images.

    Args:
        model: A timm model (its ``pretrained_cfg`` gives size, interpolation, crop and mean/std).
        img_size: Square input size. When given, ``crop_pct`` defaults to 1.0: the whole (small) image is
            resized to ``img_size`` rather than resized larger and centre-cropped, which would cut the
            border of 8- or 32-pixel images.
        crop_pct: Override of the centre-crop fraction.

    Returns:
        A plain dict (JSON-serialisable) with input_size, interpolation, mean, std, crop_pct, crop_mode.
    """
    config = dict(resolve_model_data_config(model))
    if img_size is not None:
        config["input_size"] = (3, int(img_size), int(img_size))
        config["crop_pct"] = 1.0
    if crop_pct is not None:
        config["crop_pct"] = float(crop_pct)
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return {key: (list(config[key]) if isinstance(config[key], tuple) else config[key]) for key in keys if key in config}


def build_eval_transform(data_config: dict[str, Any]):
    """timm's ImageNet-style eval transform (resize, centre crop, to tensor, normalise) for a data config.

    Accepts PIL images and float (C, H, W) tensors in [0, 1] (timm's ``MaybeToTensor`` passes tensors through).
    """
    config = {key: (tuple(value) if isinstance(value, list) else value) for key, value in data_config.items()}
    return create_transform(**config, is_training=False)
