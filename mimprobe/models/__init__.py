"""Model loading: timm names, pretrained weights and checkpoint files (detected, remapped, loaded strictly)."""

from .checkpoint_io import InertObject, read_checkpoint, sha256_file
from .loading import LoadedModel, describe_model, load_model
from .postnorm import PostNormBlock
from .remap import (
    ConvertedCheckpoint,
    convert_checkpoint,
    detect_format,
    remap_data2vec2,
    remap_fcmae,
    remap_mae,
    remap_mim_refiner,
    remap_simmim,
    strip_prefixes,
    unwrap_checkpoint,
)

__all__ = [
    "ConvertedCheckpoint",
    "InertObject",
    "LoadedModel",
    "PostNormBlock",
    "convert_checkpoint",
    "describe_model",
    "detect_format",
    "load_model",
    "read_checkpoint",
    "remap_data2vec2",
    "remap_fcmae",
    "remap_mae",
    "remap_mim_refiner",
    "remap_simmim",
    "sha256_file",
    "strip_prefixes",
    "unwrap_checkpoint",
]
