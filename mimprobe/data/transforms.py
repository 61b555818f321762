"""The evaluation transform of a data config (timm's resize, centre crop, normalise). The data config itself is the
model's (`mimprobe.models.preprocessing.resolve_eval_data_config`)."""

from __future__ import annotations

from typing import Any

from timm.data import create_transform


def build_eval_transform(data_config: dict[str, Any]):
    """timm's ImageNet-style eval transform (resize, centre crop, to tensor, normalise) for a data config.

    Accepts PIL images and float (C, H, W) tensors in [0, 1] (timm's ``MaybeToTensor`` passes tensors through).
    """
    config = {key: (tuple(value) if isinstance(value, list) else value) for key, value in data_config.items()}
    return create_transform(**config, is_training=False)
