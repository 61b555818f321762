"""Every chosen block's output in one forward pass."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import BadInputError
from ..models.families import BlockLayout, block_layout, norm_module


class BlockOutputs:
    """Callable returning ``{block: tokens (batch, tokens, width)}`` for the chosen blocks, in one forward pass.

    Uses timm's ``forward_intermediates`` (stopping after the last chosen block); for token models without it,
    forward hooks on ``model.blocks[i]`` around ``forward_features``; for staged models (ConvNeXt, Swin), forward
    hooks on every chosen block of every stage around ``forward_intermediates`` stopped after the stage of the last
    chosen block. Spatial maps (SAM-ViT, Hiera, ConvNeXt: (batch, width, H, W); Swin: (batch, H, W, width)) come
    back flattened to (batch, H*W, width), with no prefix tokens, so that mean pooling is the global average over
    the map.

    ``norm="final"`` applies the norm the model really ends with: a final norm over the tokens (``model.norm``)
    is applied here to every block's tokens; a norm the model applies after pooling (``fc_norm`` of average-pooled
    BEiT/EVA/ViT models, Hiera's ``head.norm``) is `pooled_norm`, applied by `pool_tokens` to each pooled vector.
    ``raw`` leaves the residual stream as is (MIM-Refiner's choice).

    Raises:
        BadInputError: ``final`` for a model that ends without a norm (post-norm data2vec 2.0, SAM's conv neck), or
            for blocks of a hierarchical model whose width differs from the final norm's (Hiera's early stages).
    """

    def __init__(self, model: nn.Module, blocks: list[int], norm: str = "raw", layout: BlockLayout | None = None):
        if norm not in ("raw", "final"):
            raise ValueError(f"unknown norm mode {norm!r}; use raw or final")
        self.model = model
        self.blocks = list(blocks)
        self.norm = norm
        self.layout = layout or block_layout(model, type(model).__name__)
        if norm == "final" and not self.layout.has_final_norm:
            raise BadInputError(f"--norm final: {type(model).__name__} ends without a norm (no model.norm, fc_norm or "
                                "head norm; post-norm blocks or a convolutional neck), so there is none to apply: use "
                                "--norm raw")
        widths = self.layout.block_widths
        if norm == "final" and any(widths[block] != widths[-1] for block in self.blocks):
            fitting = [block for block in range(len(widths)) if widths[block] == widths[-1]]
            raise BadInputError(f"--norm final: the final norm of {type(model).__name__} has width {widths[-1]} and "
                                f"fits only blocks {fitting[0]}-{fitting[-1]} (its last stage): choose --blocks "
                                f"{fitting[0]}-{fitting[-1]}, or --norm raw")
        self.token_norm = norm_module(model, self.layout.token_norm) if norm == "final" else None
        self.pooled_norm = norm_module(model, self.layout.pooled_norm) if norm == "final" else None
        if self.pooled_norm is not None and self.layout.pooled_norm_on_map:
            self.pooled_norm = _NormOfPooledMap(self.pooled_norm)
        self.uses_forward_intermediates = hasattr(model, "forward_intermediates")

    def __call__(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        if self.layout.block_modules:
            return self._staged(images)
        if self.layout.output == "map":
            maps = self.model.forward_intermediates(images, indices=self.blocks, norm=False, stop_early=True,
                                                    output_fmt="NCHW", intermediates_only=True,
                                                    **self.layout.intermediates_kwargs)
            return {block: item.flatten(2).transpose(1, 2) for block, item in zip(self.blocks, maps)}  # (B, HW, C)
        if self.uses_forward_intermediates:
            outputs = self.model.forward_intermediates(
                images, indices=self.blocks, norm=self.token_norm is not None, stop_early=True, output_fmt="NLC",
                intermediates_only=True, return_prefix_tokens=True)
            tokens = []
            for item in outputs:  # (patches, prefix) pairs when the model has prefix tokens
                if isinstance(item, tuple):
                    patches, prefix = item
                    item = torch.cat([prefix, patches], dim=1)  # (batch, prefix + patches, dim)
                tokens.append(item)
            return dict(zip(self.blocks, tokens))
        return self._with_hooks(images)

    def _with_hooks(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        captured: dict[int, torch.Tensor] = {}

        def hook_for(index: int):
            def hook(_module, _inputs, output):
                captured[index] = output
            return hook

        handles = [self.model.blocks[i].register_forward_hook(hook_for(i)) for i in self.blocks]
        try:
            self.model.forward_features(images)
        finally:
            for handle in handles:
                handle.remove()
        if self.token_norm is not None:
            captured = {i: self.token_norm(x) for i, x in captured.items()}
        return {i: captured[i] for i in self.blocks}

    def _staged(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        """Block maps of a staged model (ConvNeXt, Swin) as (batch, H*W, width), final token norm applied."""
        captured: dict[int, torch.Tensor] = {}

        def hook_for(index: int):
            def hook(_module, _inputs, output):
                captured[index] = output
            return hook

        handles = [self.model.get_submodule(self.layout.block_modules[i]).register_forward_hook(hook_for(i))
                   for i in self.blocks]
        try:
            last_stage = self.layout.block_stages[max(self.blocks)]
            self.model.forward_intermediates(images, indices=[last_stage], stop_early=True, intermediates_only=True)
        finally:
            for handle in handles:
                handle.remove()
        tokens = {}
        for i in self.blocks:
            block_map = captured[i]
            if self.layout.map_format == "NCHW":
                flat = block_map.flatten(2).transpose(1, 2)  # (batch, width, H, W) -> (batch, H*W, width)
            else:
                flat = block_map.flatten(1, 2)  # (batch, H, W, width) -> (batch, H*W, width)
            tokens[i] = self.token_norm(flat) if self.token_norm is not None else flat
        return tokens


class _NormOfPooledMap(nn.Module):
    """A channels-first norm (timm ``LayerNorm2d``) applied to pooled vectors as the (batch, width, 1, 1) map that
    timm's ``NormMlpClassifierHead`` gives it after global pooling. Input and output: (batch, width)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.norm(pooled[:, :, None, None]).flatten(1)
