"""The evaluation transform: the checkpoint family's evaluation preprocessing when the checkpoint's format is
known, else the model's own timm data config (never hard-coded), with explicit overrides on top."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn as nn
from timm.data import create_transform, resolve_model_data_config

from ..errors import BadInputError
from ..models.preprocessing import INTERPOLATIONS, EvalPreprocessing


def _channel_values(values: Sequence[float] | float, option: str, *, positive: bool) -> list[float]:
    values = [float(values)] * 3 if isinstance(values, (int, float)) else [float(v) for v in values]
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or (positive and min(values) <= 0):
        raise BadInputError(f"invalid {option} {values}: give one or three {'positive ' if positive else ''}numbers "
                            "(R,G,B), e.g. 0.485,0.456,0.406")
    return values


def parse_channel_values(text: str | None, option: str) -> list[float] | None:
    """``"0.485,0.456,0.406"`` (or one number for all channels) → three floats; None stays None."""
    if text is None:
        return None
    try:
        values = [float(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise BadInputError(f"invalid {option} {text!r}: give one or three numbers, e.g. 0.485,0.456,0.406") from None
    return values


def resolve_eval_data_config(model: nn.Module, *, img_size: int | None = None, crop_pct: float | None = None,
                             preprocessing: EvalPreprocessing | None = None,
                             mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                             interpolation: str | None = None) -> dict[str, Any]:
    """The evaluation data config, from the most specific source down.

    Args:
        model: A timm model (its ``pretrained_cfg`` gives size, interpolation, crop and mean/std).
        img_size: Square input size. When given, ``crop_pct`` defaults to 1.0: the whole (small) image is
            resized to ``img_size`` rather than resized larger and centre-cropped, which would cut the
            border of 8- or 32-pixel images.
        crop_pct: Override of the centre-crop fraction (0 < crop_pct <= 1).
        preprocessing: The checkpoint family's evaluation preprocessing (`mimprobe.models.preprocessing`); it
            replaces the model's mean, std, interpolation and crop.
        mean, std, interpolation: Overrides (``--mean``, ``--std``, ``--interpolation``).

    Returns:
        A plain dict (JSON-serialisable) with input_size, interpolation, mean, std, crop_pct, crop_mode.

    Raises:
        BadInputError: An override out of range.
    """
    config = dict(resolve_model_data_config(model))
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)  # the size the model was built for
    if img_size is None and isinstance(built, (tuple, list)) and len(built) == 2 \
            and tuple(built) != tuple(config["input_size"][1:]):
        config["input_size"] = (3, int(built[0]), int(built[1]))  # timm's config is that of the default size
    if preprocessing is not None:
        config.update(mean=preprocessing.mean, std=preprocessing.std, interpolation=preprocessing.interpolation,
                      crop_pct=preprocessing.crop_pct_for(int(config["input_size"][-1])), crop_mode=preprocessing.crop_mode)
    if img_size is not None:
        config["input_size"] = (3, int(img_size), int(img_size))
        config["crop_pct"] = 1.0
    if crop_pct is not None:
        if not 0 < float(crop_pct) <= 1:
            raise BadInputError(f"invalid --crop-pct {crop_pct}: give a fraction in (0, 1], e.g. 0.875 (resize "
                                "256, crop 224)")
        config["crop_pct"] = float(crop_pct)
    if mean is not None:
        config["mean"] = _channel_values(mean, "--mean", positive=False)
    if std is not None:
        config["std"] = _channel_values(std, "--std", positive=True)
    if interpolation is not None:
        if interpolation not in INTERPOLATIONS:
            raise BadInputError(f"invalid --interpolation {interpolation!r}: use one of {', '.join(INTERPOLATIONS)}")
        config["interpolation"] = interpolation
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return {key: (list(config[key]) if isinstance(config[key], tuple) else config[key]) for key in keys if key in config}


def data_config_source(preprocessing: EvalPreprocessing | None, *, model_name: str, img_size: int | None = None,
                       overrides: Sequence[str] = ()) -> str:
    """One line saying where the data config came from (``mimprobe info``, the store's manifest)."""
    source = preprocessing.source if preprocessing is not None else (
        f"timm's data config of {model_name} (no checkpoint family with a known evaluation preprocessing)")
    if img_size is not None:
        source += f"; --img-size {img_size}: whole image resized, no crop"
    if overrides:
        source += f"; overridden: {', '.join(overrides)}"
    return source


def build_eval_transform(data_config: dict[str, Any]):
    """timm's ImageNet-style eval transform (resize, centre crop, to tensor, normalise) for a data config.

    Accepts PIL images and float (C, H, W) tensors in [0, 1] (timm's ``MaybeToTensor`` passes tensors through).
    """
    config = {key: (tuple(value) if isinstance(value, list) else value) for key, value in data_config.items()}
    return create_transform(**config, is_training=False)
