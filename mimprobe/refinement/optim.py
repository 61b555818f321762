"""What stage 1 and stage 2 train and how: the layer-wise lr decay of the encoder's parameter groups, which blocks stay
frozen, and the encoder's EMA (made, and measured by how far it moved from the start)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .config import RefineConfig
from .network import RefineNetwork


def layer_lr_scale(name: str, *, depth: int, layer_decay: float) -> float:
    """BEiT's layer-wise lr decay (arXiv 2106.08254; MIM-Refiner uses 0.65): block i (0-based) trains at
    ``layer_decay ** (depth - i)``, the embeddings (patch, CLS, position tokens) one step lower at
    ``layer_decay ** (depth + 1)``, the final norm at 1.

    Not timm's ``param_groups_layer_decay``: for a model built without a classifier (``num_classes=0``) timm's
    group matcher puts the final norm into the last block's layer, so the last block would train at the full rate
    (scale 1) and every block one step faster than the rule above.
    """
    if name.startswith("blocks."):
        return layer_decay ** (depth - int(name.split(".")[1]))
    if name.startswith(("norm.", "fc_norm.", "head.")):
        return 1.0
    return layer_decay ** (depth + 1)


def param_groups(network: RefineNetwork, config: RefineConfig, stage: int) -> list[dict[str, Any]]:
    """Stage 1: the heads only. Stage 2: the encoder by layer (`layer_lr_scale`; weight decay 0.05 except 1-d
    parameters and the model's ``no_weight_decay`` tokens) plus the heads (weight decay 1e-5 except 1-d, lr scale
    1). Parameters with ``requires_grad`` False (frozen blocks) are left out."""
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}

    def add(param: torch.nn.Parameter, scale: float, decay: float) -> None:
        if param.requires_grad or stage == 1:
            groups.setdefault((scale, decay), []).append(param)

    for param in network.heads.parameters():
        add(param, 1.0, 0.0 if param.ndim <= 1 else config.head_weight_decay)
    if stage == 2:
        encoder = network.encoder
        skip = set(encoder.no_weight_decay()) if hasattr(encoder, "no_weight_decay") else set()
        depth = len(encoder.blocks)
        for name, param in encoder.named_parameters():
            if not param.requires_grad:
                continue
            decay = 0.0 if param.ndim <= 1 or name in skip else config.weight_decay
            add(param, layer_lr_scale(name, depth=depth, layer_decay=config.layer_decay), decay)
    return [{"params": params, "lr_scale": scale, "weight_decay": decay}
            for (scale, decay), params in sorted(groups.items(), key=lambda item: item[0])]


def frozen_in_full_stage(name: str, freeze_blocks: int) -> bool:
    """Whether the encoder parameter ``name`` stays frozen in stage 2: with ``freeze_blocks`` > 0 the embeddings
    and the first ``freeze_blocks`` blocks."""
    if freeze_blocks <= 0:
        return False
    frozen_embedding = not name.startswith(("blocks.", "norm.", "fc_norm."))
    return frozen_embedding or (name.startswith("blocks.") and int(name.split(".")[1]) < freeze_blocks)


def set_trainable(network: RefineNetwork, *, stage: int, freeze_blocks: int) -> None:
    """Stage 1: encoder frozen. Stage 2: all but the embeddings and the first ``freeze_blocks`` blocks."""
    encoder = network.encoder
    network.encoder_frozen = stage == 1
    for name, param in encoder.named_parameters():
        param.requires_grad_(stage == 2 and not frozen_in_full_stage(name, freeze_blocks))
    encoder.train(stage == 2)


def make_ema(encoder: nn.Module, config: RefineConfig):
    """The encoder's EMA (timm ``ModelEmaV3``), started from the encoder's weights at the start of stage 2.

    Default, as the official ``callbacks/checkpoint_callbacks/ema_callback.py`` (``target_factors: [0.9999]`` in
    the stage-3 configurations, scaled to a short stage by `config.resolve_ema_decay`): a constant decay from the
    first update, ``ema = d * ema + (1 - d) * weights`` after every optimiser step, buffers copied rather than
    averaged. ``ema_warmup``: timm's warmup instead (decay 0 for the first two updates, then ``1 - (1 + n)^(-2/3)``
    capped at ``ema_decay``; buffers averaged), mimprobe's behaviour before it followed the official recipe.
    """
    from timm.utils import ModelEmaV3

    if config.ema_decay is None:
        raise ValueError("make_ema needs the run's decay: resolve it with config.resolve_ema_decay first")
    if config.ema_warmup:
        return ModelEmaV3(encoder, decay=config.ema_decay, use_warmup=True)
    return ModelEmaV3(encoder, decay=config.ema_decay, use_warmup=False, exclude_buffers=True)


def ema_progress(start: dict[str, torch.Tensor], trained: dict[str, torch.Tensor],
                 ema: dict[str, torch.Tensor]) -> float | None:
    """How far the EMA moved from the starting weights towards the trained ones: ``|ema - start| / |trained -
    start|``, L2 norms over all encoder parameters together (float64). 0: the export is the starting encoder; about
    1: it is as far from the start as the trained encoder (an EMA lags, so a finished run sits below 1). None when
    the trained encoder did not move.

    Args:
        start, trained, ema: Parameters by name (the same names and shapes; any device).
    """
    moved = travelled = 0.0
    for name, before in start.items():
        before = before.detach().to("cpu", torch.float64)
        moved += float((ema[name].detach().to("cpu", torch.float64) - before).square().sum())
        travelled += float((trained[name].detach().to("cpu", torch.float64) - before).square().sum())
    return (moved / travelled) ** 0.5 if travelled > 0 else None
