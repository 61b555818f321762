"""The encoder with its NNA heads: one forward pass gives every head's projections and predictions."""

from __future__ import annotations

import torch
import torch.nn as nn

from .heads import HeadConfig, NNAHead


def block_cls_tokens(encoder: nn.Module, images: torch.Tensor, blocks: list[int]) -> dict[int, torch.Tensor]:
    """The raw CLS token of each chosen block, in one forward pass that stops after the last of them.

    The head on the model's last block reads the final-norm output (DESIGN.md, NNA refinement); a LayerNorm acts
    per token, so that is the norm applied to the last block's raw CLS token.

    Args:
        encoder: A timm VisionTransformer (``forward_intermediates``, a CLS token).
        images: (batch, 3, H, W).
        blocks: 0-based block indices, ascending.

    Returns:
        ``{block: (batch, dim)}``.
    """
    outputs = encoder.forward_intermediates(images, indices=blocks, norm=False, stop_early=True, output_fmt="NLC",
                                            intermediates_only=True, return_prefix_tokens=True)
    last = len(encoder.blocks) - 1
    tokens: dict[int, torch.Tensor] = {}
    for block, item in zip(blocks, outputs):
        patches, prefix = item  # (batch, patches, dim), (batch, prefix, dim)
        cls = prefix[:, 0]
        tokens[block] = encoder.norm(cls) if block == last else cls
    return tokens


class RefineNetwork(nn.Module):
    """Encoder + one `NNAHead` per chosen block.

    ``forward(views)`` runs the encoder once per view resolution (the global views concatenated into one batch,
    the local crops into another) and returns, per head block, the projections and predictions of every view.
    With ``encoder_frozen`` the encoder runs without autograd (stage 1: heads only).
    """

    def __init__(self, encoder: nn.Module, head_blocks: list[int], head_config: HeadConfig):
        super().__init__()
        if not head_blocks:
            raise ValueError("head_blocks is empty: a refinement needs at least one head")
        self.encoder = encoder
        self.head_blocks = sorted(int(b) for b in head_blocks)
        width = encoder.embed_dim
        self.heads = nn.ModuleDict({str(block): NNAHead(width, head_config) for block in self.head_blocks})
        self.encoder_frozen = False

    def forward(self, views: list[torch.Tensor]) -> dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """Args: views: ``[global_0 (B,3,H,W), global_1, local_0 (B,3,h,w), ...]``.

        Returns: ``{block: ([projection of each view (B, P)], [prediction of each view (B, P)])}``.
        """
        batch = views[0].shape[0]
        groups = [torch.cat(views[:2])]  # the global views share a resolution: one pass, BN over both
        if len(views) > 2:
            groups.append(torch.cat(views[2:]))
        features: dict[int, list[torch.Tensor]] = {block: [] for block in self.head_blocks}
        for images in groups:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoder_frozen):
                tokens = block_cls_tokens(self.encoder, images, self.head_blocks)
            for block in self.head_blocks:
                features[block].append(tokens[block])
        outputs = {}
        for block in self.head_blocks:
            head = self.heads[str(block)]
            projections, predictions = [], []
            for group in features[block]:
                projection, prediction = head(group)
                projections += list(projection.split(batch))
                predictions += list(prediction.split(batch))
            outputs[block] = (projections, predictions)
        return outputs
