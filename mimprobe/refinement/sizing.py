"""A refinement sized for the machine it runs on: head widths, local crop side, and what a checkpoint will weigh.

MIM-Refiner's official sizes were set for ViT-L/H/2B at 224 px on GPUs (github.com/ml-jku/MIM-Refiner,
``src/zztemplates/models/nnclr.yaml`` lines 19-23: projector hidden 2048, projection 256, predictor hidden 4096;
``src/zztemplates/datasets/imagenet/train_byolaug_localviews.yaml`` lines 4-5 and 70: local crops of 96 px at a
global 224 px). On a CPU with small inputs those sizes dominate the cost: 4096-wide heads on a 192-wide ViT-Tiny
hold about 18x its parameters and make its checkpoint about 40x its weights. So:

* local crops are 96/224 of the input side, rounded to the patch (`default_local_size`; 96 px at 224 px);
* head widths not given explicitly follow ``RefineConfig.head_widths``: ``official``; ``proportional``, the
  official widths times the encoder's width over ViT-L's 1024 (`proportional_head_dims`); or ``auto`` (the
  default), proportional on a CPU below 224 px and official on a GPU or at 224 px and more (`resolve_head_dims`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import RefineConfig
from ..head_widths import (HEAD_WIDTH_MULTIPLE, OFFICIAL_HEAD_DIMS, OFFICIAL_HEAD_SOURCE,
                          OFFICIAL_HEAD_WIDTH_OF, OFFICIAL_IMG_SIZE, proportional_head_dims)

OFFICIAL_LOCAL_SIZE = 96                  # train_byolaug_localviews.yaml:5 local_resolution
LOCAL_SOURCE = "src/zztemplates/datasets/imagenet/train_byolaug_localviews.yaml:4-5,70"
ADAMW_STATES = 2                          # exp_avg and exp_avg_sq per trained parameter


def default_local_size(img_size: int, patch_size: int) -> int:
    """The local crops' side for an input of ``img_size``: 96/224 of it (the official 96 px at 224 px), rounded to
    a multiple of ``patch_size`` (at least one patch)."""
    return max(patch_size, round(img_size * OFFICIAL_LOCAL_SIZE / OFFICIAL_IMG_SIZE / patch_size) * patch_size)


def head_widths_rule(config: RefineConfig, *, img_size: int, device_type: str) -> str:
    """``official`` or ``proportional``: ``head_widths`` itself, or for ``auto`` proportional on a CPU below 224 px
    and official elsewhere (the official recipe stays the default on GPUs and at 224 px)."""
    if config.head_widths != "auto":
        return config.head_widths
    return "proportional" if device_type == "cpu" and img_size < OFFICIAL_IMG_SIZE else "official"


def resolve_head_dims(config: RefineConfig, *, embed_dim: int, img_size: int,
                      device_type: str) -> tuple[int, int, int]:
    """(projector hidden, projection, predictor hidden): each width given in ``config``, else `head_widths_rule`'s."""
    rule = head_widths_rule(config, img_size=img_size, device_type=device_type)
    by_rule = proportional_head_dims(embed_dim) if rule == "proportional" else OFFICIAL_HEAD_DIMS
    given = (config.head_hidden_dim, config.head_proj_dim, config.head_predictor_dim)
    return tuple(width if width is not None else default for width, default in zip(given, by_rule))


@dataclass(frozen=True)
class ScaledDefault:
    """A default the run resolved away from the official value: what, to which value, by which rule, and the
    sources of the official numbers (written to config.json under ``scaled``)."""

    field: str
    value: Any
    official: Any
    rule: str
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "official": self.official, "rule": self.rule, "source": self.source}


def head_scaling(config: RefineConfig, dims: tuple[int, int, int], *, embed_dim: int, img_size: int,
                 device_type: str) -> ScaledDefault | None:
    """The record of proportional head widths (None when the widths are the official or all given)."""
    given = (config.head_hidden_dim, config.head_proj_dim, config.head_predictor_dim)
    if tuple(dims) == OFFICIAL_HEAD_DIMS or all(width is not None for width in given):
        return None
    why = ("--head-dims auto on a CPU below 224 px" if config.head_widths == "auto" else "--head-dims proportional")
    return ScaledDefault("head_dims", list(dims), list(OFFICIAL_HEAD_DIMS),
                         f"official widths x {embed_dim}/{OFFICIAL_HEAD_WIDTH_OF} (the encoder's width over ViT-L's), "
                         f"rounded to a multiple of {HEAD_WIDTH_MULTIPLE} ({why}, {img_size} px on {device_type}; "
                         "--head-dims official for the official widths)", OFFICIAL_HEAD_SOURCE)


def local_scaling(config: RefineConfig, local_size: int, *, img_size: int, patch_size: int) -> ScaledDefault | None:
    """The record of local crops scaled to the input (None without local crops, with a given size, or at 96 px)."""
    if not config.local_crops or config.local_size is not None or local_size == OFFICIAL_LOCAL_SIZE:
        return None
    return ScaledDefault("local_size", local_size, OFFICIAL_LOCAL_SIZE,
                         f"{OFFICIAL_LOCAL_SIZE}/{OFFICIAL_IMG_SIZE} of the {img_size} px input, rounded to the "
                         f"{patch_size} px patch (--local-size sets it)", LOCAL_SOURCE)


def tensor_bytes(tensors) -> int:
    """Bytes of the tensors' data."""
    return sum(t.numel() * t.element_size() for t in tensors)


def checkpoint_bytes(encoder: nn.Module, heads: nn.Module, queues: nn.Module, *, trained_encoder_params: int,
                     full_stage: bool) -> dict[str, int]:
    """What refine's files will weigh, from the modules' own tensors.

    ``checkpoint-last.pth`` holds the encoder and heads (state dicts), the queues, AdamW's two moments per trained
    parameter (float32 like the parameters: ``trained_encoder_params`` encoder parameters and every head parameter
    in the full stage, the heads alone in a heads-only run) and, in the full stage, the EMA's copy of the encoder.
    ``refined.safetensors`` is the encoder's state dict. Container overhead (a few hundred bytes per tensor) is not
    counted.

    Returns:
        ``{"checkpoint": bytes, "export": bytes, "encoder": ..., "heads": ..., "queues": ..., "optimizer": ...,
        "ema": ...}``.
    """
    encoder_bytes = tensor_bytes(encoder.state_dict().values())
    heads_bytes = tensor_bytes(heads.state_dict().values())
    queue_bytes = tensor_bytes(queues.state_dict().values())
    head_params = sum(p.numel() for p in heads.parameters())
    float_size = torch.finfo(torch.float32).bits // 8
    trained = head_params + (trained_encoder_params if full_stage else 0)
    optimizer = ADAMW_STATES * float_size * trained
    ema = encoder_bytes if full_stage else 0
    return {"checkpoint": encoder_bytes + heads_bytes + queue_bytes + optimizer + ema, "export": encoder_bytes,
            "encoder": encoder_bytes, "heads": heads_bytes, "queues": queue_bytes, "optimizer": optimizer, "ema": ema}


def size_note(sizes: dict[str, int], *, head_params: int, encoder_params: int) -> str:
    """One line: the checkpoint's and the export's expected size and what makes them up."""
    mb = 1024 ** 2
    return (f"expected sizes: checkpoint-last.pth about {sizes['checkpoint'] / mb:,.1f} MiB (encoder "
            f"{sizes['encoder'] / mb:,.1f}, heads {sizes['heads'] / mb:,.1f} for {head_params / 1e6:.2f} M parameters "
            f"against the encoder's {encoder_params / 1e6:.2f} M, AdamW moments {sizes['optimizer'] / mb:,.1f}, EMA "
            f"{sizes['ema'] / mb:,.1f}, queues {sizes['queues'] / mb:,.1f}); refined.safetensors about "
            f"{sizes['export'] / mb:,.1f} MiB")
