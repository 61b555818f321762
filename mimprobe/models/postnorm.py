"""A post-norm transformer block with timm's parameter names, for data2vec 2.0 and refined data2vec models."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block


class PostNormBlock(Block):
    """Post-norm block: ``x = norm1(x + attn(x)); x = norm2(x + mlp(x))``.

    data2vec 2.0 (Baevski et al. 2022, arXiv 2212.07525) image encoders use fairseq's ``AltBlock`` with
    ``layer_norm_first=False``, which normalises after each residual sum. timm's pre-norm `Block` cannot express
    that by renaming weights, so this subclass keeps Block's parameters (norm1, attn.qkv, attn.proj, norm2,
    mlp.fc1, mlp.fc2) and only changes the order of operations. Input and output: (batch, tokens, dim).
    """

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = self.norm1(x + self.drop_path1(self.ls1(self.attn(x, attn_mask=attn_mask, is_causal=is_causal))))
        x = self.norm2(x + self.drop_path2(self.ls2(self.mlp(x))))
        return x
