"""Token pooling of one block's output."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..choices import POOLINGS  # noqa: F401  (the pooling names, with the options)


def pool_tokens(tokens: torch.Tensor, pooling: str, *, num_prefix_tokens: int, has_class_token: bool,
                norm: nn.Module | None = None) -> torch.Tensor:
    """Pool a block's tokens into one vector per image.

    Args:
        tokens: (batch, num_prefix_tokens + num_patches, dim) block output; timm orders the prefix as
            [CLS, register tokens...].
        pooling: ``cls`` (the class token), ``mean`` (average of the patch tokens only: CLS and register tokens
            are excluded), or ``cls+mean`` (both, concatenated: 2*dim).
        num_prefix_tokens: Number of leading non-patch tokens (CLS + registers), timm's ``num_prefix_tokens``.
        has_class_token: Whether token 0 is a CLS token.
        norm: A norm the model applies after pooling (``fc_norm``; see `BlockOutputs.pooled_norm`), applied to
            each pooled vector (to the CLS and the mean part of ``cls+mean`` separately), as timm's
            ``forward_head(pre_logits=True)`` does for average pooling.

    Returns:
        (batch, dim) or (batch, 2*dim) for ``cls+mean``.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
    if pooling in ("cls", "cls+mean") and not has_class_token:
        raise ValueError(f"pooling {pooling!r} needs a CLS token, and this model has none; use --pool mean")
    apply = norm if norm is not None else (lambda x: x)
    mean = apply(tokens[:, num_prefix_tokens:].mean(dim=1)) if pooling != "cls" else None
    if pooling == "mean":
        return mean
    cls = apply(tokens[:, 0])
    return cls if pooling == "cls" else torch.cat([cls, mean], dim=-1)
