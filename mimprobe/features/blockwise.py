"""Every chosen block's output in one forward pass."""

from __future__ import annotations

import torch
import torch.nn as nn


class BlockOutputs:
    """Callable returning ``{block: tokens (batch, tokens, dim)}`` for the chosen blocks, in one forward pass.

    Uses timm's ``forward_intermediates`` (stopping after the last chosen block); for models without it, forward
    hooks on ``model.blocks[i]`` around ``forward_features``. ``norm="final"`` applies the model's final norm
    (``model.norm``) to every block output, ``raw`` leaves the residual stream as is (MIM-Refiner's choice).
    """

    def __init__(self, model: nn.Module, blocks: list[int], norm: str = "raw"):
        if norm not in ("raw", "final"):
            raise ValueError(f"unknown norm mode {norm!r}; use raw or final")
        self.model = model
        self.blocks = list(blocks)
        self.norm = norm
        self.uses_forward_intermediates = hasattr(model, "forward_intermediates")

    def __call__(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        if self.uses_forward_intermediates:
            outputs = self.model.forward_intermediates(
                images, indices=self.blocks, norm=self.norm == "final", stop_early=True, output_fmt="NLC",
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
        if self.norm == "final":
            norm = getattr(self.model, "norm", nn.Identity())
            captured = {i: norm(x) for i, x in captured.items()}
        return {i: captured[i] for i in self.blocks}
