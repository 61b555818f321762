"""Which timm models mimprobe can profile block by block, and how their block outputs are read and pooled.

Two layouts are supported:

* ``tokens``: ViT-style models whose ``forward_intermediates`` returns (batch, tokens, width) sequences with
  their prefix tokens (``return_prefix_tokens``): timm ``VisionTransformer`` (DeiT, DeiT3, DINOv2, CLIP, SigLIP,
  gap ViTs), ``Beit``, ``Eva``, ``NaFlexVit``, ``VisionTransformerRelPos``, ... Models without
  ``forward_intermediates`` are read with forward hooks on ``model.blocks``.
* ``map``: models whose blocks keep a spatial map, read as (batch, width, H, W) and mean-pooled over the map:
  SAM's image encoder (``VisionTransformerSAM``, one width) and the hierarchical ``Hiera`` (every block, with the
  width of its stage: 96 → 768 for hiera_tiny), ConvNeXt (V1 and V2, the FCMAE encoder: ``stages.{s}.blocks.{j}``)
  and Swin (the SimMIM encoder: ``layers.{s}.blocks.{j}``). Their ``forward_intermediates`` index stages, not
  blocks, so every block of every stage is read with a forward hook and numbered in forward order (block ``i`` is
  the ``i``-th entry of `BlockLayout.block_modules`). They have no CLS token: ``mean`` pools the map.

Every other model with ``forward_intermediates`` (CNNs, other staged networks) is refused with a one-line reason
before anything is written.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from ..errors import BadInputError

MAP_CLASSES = ("VisionTransformerSAM", "Hiera")
# hierarchical models whose blocks sit in stages: (attribute of the stages, layout of a block's output map)
STAGED_CLASSES = {"ConvNeXt": ("stages", "NCHW"), "SwinTransformer": ("layers", "NHWC")}
SUPPORTED = ("ViT-style token models (timm VisionTransformer and its DeiT/DINOv2/CLIP/SigLIP/gap variants, BEiT, "
             "EVA, NaFlexViT, ...) and the spatial-map models Hiera, SAM-ViT, ConvNeXt (V2) and Swin")


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
        block_modules: Module path of every block of a staged model (``stages.1.blocks.2``), in forward order; its
            outputs are read with forward hooks. Empty for models whose blocks are ``model.blocks``.
        block_stages: Stage of every block of a staged model (the ``forward_intermediates`` index after which the
            forward pass can stop).
        map_format: Layout of a staged block's output: ``NCHW`` (ConvNeXt) or ``NHWC`` (Swin).
        pooled_norm_on_map: The pooled norm takes (batch, width, 1, 1), not (batch, width) (ConvNeXt's
            ``LayerNorm2d`` head norm, applied by timm to the globally pooled map).
    """

    output: str
    num_blocks: int
    block_widths: tuple[int, ...]
    num_prefix_tokens: int
    has_class_token: bool
    token_norm: str | None
    pooled_norm: str | None
    intermediates_kwargs: dict[str, Any] = field(default_factory=dict)
    block_modules: tuple[str, ...] = ()
    block_stages: tuple[int, ...] = ()
    map_format: str = "NCHW"
    pooled_norm_on_map: bool = False

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


def _staged_layout(model: nn.Module, cls: str) -> BlockLayout:
    """Every block of every stage of ConvNeXt or Swin, each with its stage's width (timm's ``feature_info``).

    The final norm: ConvNeXt's ``head.norm`` acts on the pooled map (``NormMlpClassifierHead``: pool, then norm;
    an Identity in FCMAE encoders, which end without one), Swin's ``norm`` on every position of the last stage
    before its average pool.
    """
    stages_attribute, map_format = STAGED_CLASSES[cls]
    stages = getattr(model, stages_attribute)
    paths, stage_of_block, widths = [], [], []
    for stage_index, stage in enumerate(stages):
        width = int(model.feature_info[stage_index]["num_chs"])
        for block_index in range(len(stage.blocks)):
            paths.append(f"{stages_attribute}.{stage_index}.blocks.{block_index}")
            stage_of_block.append(stage_index)
            widths.append(width)
    convnext = cls == "ConvNeXt"
    return BlockLayout(output="map", num_blocks=len(paths), block_widths=tuple(widths), num_prefix_tokens=0,
                       has_class_token=False, token_norm=None if convnext else _real_norm(model, "norm"),
                       pooled_norm=_real_norm(model, "head.norm") if convnext else None,
                       block_modules=tuple(paths), block_stages=tuple(stage_of_block), map_format=map_format,
                       pooled_norm_on_map=convnext)


def block_layout(model: nn.Module, name: str) -> BlockLayout:
    """The block layout of a timm model.

    Raises:
        BadInputError: The model is not one mimprobe can profile block by block (a CNN, a staged network).
    """
    cls = type(model).__name__
    if cls in STAGED_CLASSES:
        return _staged_layout(model, cls)
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
