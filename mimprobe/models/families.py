"""Which timm models mimprobe can profile block by block, and how their block outputs are read and pooled.

Two layouts are supported:

* ``tokens``: ViT-style models whose ``forward_intermediates`` returns (batch, tokens, width) sequences with
  their prefix tokens (``return_prefix_tokens``): timm ``VisionTransformer`` (DeiT, DeiT3, DINOv2, CLIP, SigLIP,
  gap ViTs), ``Beit``, ``Eva``, ``NaFlexVit``, ``VisionTransformerRelPos``, ... Models without
  ``forward_intermediates`` are read with forward hooks on ``model.blocks``.
* ``map``: models whose blocks keep a spatial map, read as (batch, width, H, W) and mean-pooled over the map:
  SAM's image encoder (``VisionTransformerSAM``, one width) and the hierarchical ``Hiera`` (every block, with the
  width of its stage: 96 → 768 for hiera_tiny).

Every other model with ``forward_intermediates`` (CNNs, Swin-style and other staged networks whose
``forward_intermediates`` indexes stages, not blocks) is refused with a one-line reason before anything is
written.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from ..errors import BadInputError

MAP_CLASSES = ("VisionTransformerSAM", "Hiera")
SUPPORTED = ("ViT-style token models (timm VisionTransformer and its DeiT/DINOv2/CLIP/SigLIP/gap variants, BEiT, "
             "EVA, NaFlexViT, ...) and the spatial-map models Hiera and SAM-ViT")


@dataclass(frozen=True)
class BlockLayout:
    """How a model's block outputs are read.

    Attributes:
        output: ``tokens`` (batch, prefix + patches, width) or ``map`` (batch, width, H, W).
        num_blocks: Blocks that can be profiled (``model.blocks``).
        block_widths: Output width of every block (they differ between Hiera's stages).
        num_prefix_tokens: Leading non-patch tokens (CLS, registers, distillation); 0 for maps.
        has_class_token: Whether token 0 is a CLS token.
        token_norm: Attribute path of the final norm applied to every token (``norm``), or None.
        pooled_norm: Attribute path of the norm the model applies after pooling (``fc_norm`` of gap BEiT/EVA/ViT
            models, ``head.norm`` of Hiera), or None.
        intermediates_kwargs: Extra ``forward_intermediates`` arguments (Hiera: ``coarse=False`` for every block).
    """

    output: str
    num_blocks: int
    block_widths: tuple[int, ...]
    num_prefix_tokens: int
    has_class_token: bool
    token_norm: str | None
    pooled_norm: str | None
    intermediates_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def has_final_norm(self) -> bool:
        return self.token_norm is not None or self.pooled_norm is not None


def _module(model: nn.Module, path: str | None) -> nn.Module | None:
    if path is None:
        return None
    module: Any = model
    for part in path.split("."):
        module = getattr(module, part, None)
    return module if isinstance(module, nn.Module) else None


def norm_module(model: nn.Module, path: str | None) -> nn.Module | None:
    """The module at ``path`` (``norm``, ``fc_norm``, ``head.norm``), or None."""
    return _module(model, path)


def _real_norm(model: nn.Module, path: str) -> str | None:
    module = _module(model, path)
    return path if module is not None and not isinstance(module, nn.Identity) else None


def _intermediates_parameters(model: nn.Module) -> set[str]:
    method = getattr(model, "forward_intermediates", None)
    return set(inspect.signature(method).parameters) if method is not None else set()


def block_layout(model: nn.Module, name: str) -> BlockLayout:
    """The block layout of a timm model.

    Raises:
        BadInputError: The model is not one mimprobe can profile block by block (a CNN, a staged network).
    """
    cls = type(model).__name__
    blocks = getattr(model, "blocks", None)
    parameters = _intermediates_parameters(model)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or not len(blocks):
        raise BadInputError(f"model {name} ({cls}) has no transformer blocks (model.blocks): mimprobe profiles "
                            f"{SUPPORTED}")
    if cls in MAP_CLASSES:
        if cls == "Hiera":
            widths = tuple(int(block.dim_out) for block in blocks)
            return BlockLayout(output="map", num_blocks=len(blocks), block_widths=widths, num_prefix_tokens=0,
                               has_class_token=False, token_norm=None, pooled_norm=_real_norm(model, "head.norm"),
                               intermediates_kwargs={"coarse": False})
        # SAM's image encoder ends with its convolutional neck, not a norm
        width = int(model.embed_dim)
        return BlockLayout(output="map", num_blocks=len(blocks), block_widths=(width,) * len(blocks),
                           num_prefix_tokens=0, has_class_token=False, token_norm=None, pooled_norm=None)
    if parameters and "return_prefix_tokens" not in parameters:
        kind = "it is a CNN" if not hasattr(model, "patch_embed") else (
            "its forward_intermediates returns stage maps or needs other inputs, not block token sequences")
        raise BadInputError(f"model {name} ({cls}) is not supported: {kind}; mimprobe profiles {SUPPORTED}")
    if not parameters and not hasattr(model, "patch_embed"):
        raise BadInputError(f"model {name} ({cls}) is not supported: mimprobe profiles {SUPPORTED}")
    width = int(getattr(model, "embed_dim", getattr(model, "num_features", 0)))
    has_class_token = bool(getattr(model, "has_class_token", getattr(model, "cls_token", None) is not None))
    num_prefix = int(getattr(model, "num_prefix_tokens", 1 if has_class_token else 0))
    return BlockLayout(output="tokens", num_blocks=len(blocks), block_widths=(width,) * len(blocks),
                       num_prefix_tokens=num_prefix, has_class_token=has_class_token,
                       token_norm=_real_norm(model, "norm"), pooled_norm=_real_norm(model, "fc_norm"))
