"""The refinement configuration (one frozen dataclass) and its pure schedules."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import BadInputError


@dataclass(frozen=True)
class RefineConfig:
    """Everything that changes a refinement run's numbers. CLI options map onto these fields.

    Defaults follow MIM-Refiner (arXiv 2402.10093) and DESIGN.md where they are scale-free; epochs, queue and
    head sizes are the user's (the official ImageNet values are in the comments).
    """

    epochs_heads: int = 1              # stage 1, encoder frozen: heads only (random heads would send noise down)
    epochs: int = 5                    # stage 2, everything but the frozen blocks (official: 20-30 on ImageNet)
    batch_size: int = 256              # global batch over all processes; lr is scaled by batch_size / 256
    accumulate: int = 1                # micro-batches per optimiser step when a batch does not fit in memory
    lr: float = 1e-4                   # base learning rate for a batch of 256 (peak of the warmup)
    min_lr: float = 1e-6               # end of the cosine, also per 256 images
    warmup_fraction: float = 0.1       # linear warmup over this share of each stage's steps
    layer_decay: float = 0.65          # layer-wise lr decay (BEiT), through timm's param_groups_layer_decay
    weight_decay: float = 0.05         # encoder
    head_weight_decay: float = 1e-5    # heads
    betas: tuple[float, float] = (0.9, 0.95)
    temperature: float = 0.2           # 0.2 for ViT-L, 0.3 for H, 0.35 for 2B in the paper
    queue_size: int = 65536            # per head; must not exceed the training set
    topk: int = 20                     # neighbours to pick from uniformly in stage 2 (stage 1 uses the nearest)
    head_hidden_dim: int = 2048        # projector hidden width
    head_proj_dim: int = 256           # projection width (queue and loss space)
    head_predictor_dim: int = 4096     # predictor hidden width
    local_crops: int = 0               # extra predicted views (DINO-style); anchors are always the 2 global views
    local_size: int | None = None      # side of local crops; None: 96/224 of the input size
    global_scale_min: float = 0.08     # BYOL's crop area range is (0.08, 1)
    ema_decay: float = 0.9999          # encoder EMA (timm ModelEmaV3 with warmup, so short runs still move)
    freeze_blocks: int = 0             # first blocks (and the embeddings) kept frozen in stage 2
    head_blocks: tuple[int, ...] = ()  # 0-based blocks with a head; from the placement
    img_size: int | None = None
    precision: str = "auto"            # auto: bf16 autocast on CUDA, fp32 on the CPU
    seed: int = 0
    num_workers: int = 0
    monitor_images: int = 0            # labelled images for the per-epoch k-NN monitor (0: off)
    clip_grad: float | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.epochs_heads >= 0 and self.epochs >= 0, "--epochs and --epochs-heads must be >= 0"),
            (self.epochs_heads + self.epochs > 0, "nothing to train: --epochs-heads and --epochs are both 0"),
            (self.batch_size >= 2, f"--batch-size {self.batch_size} is too small: the NNA loss contrasts the "
                                   "images of a batch, use at least 2"),
            (self.accumulate >= 1, "--accumulate must be >= 1"),
            (self.lr > 0 and self.min_lr >= 0, "--lr must be > 0 and --min-lr >= 0"),
            (0 <= self.warmup_fraction < 1, "--warmup-fraction must be in [0, 1)"),
            (0 < self.layer_decay <= 1, "--layer-decay must be in (0, 1]"),
            (self.temperature > 0, "--temperature must be > 0"),
            (self.queue_size >= 1, "--queue-size must be >= 1"),
            (self.topk >= 1, "--topk must be >= 1"),
            (min(self.head_hidden_dim, self.head_proj_dim, self.head_predictor_dim) >= 1, "head sizes must be >= 1"),
            (self.local_crops >= 0, "--local-crops must be >= 0"),
            (0 < self.global_scale_min <= 1, "--global-scale-min must be in (0, 1]"),
            (0 <= self.ema_decay < 1, "--ema-decay must be in [0, 1)"),
            (self.freeze_blocks >= 0, "--freeze must be >= 0"),
            (self.monitor_images >= 0, "--monitor must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise BadInputError(message)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RefineConfig":
        values = dict(values)
        for key in ("betas", "head_blocks"):
            if key in values and values[key] is not None:
                values[key] = tuple(values[key])
        return cls(**values)


@dataclass(frozen=True)
class StagePlan:
    """Step counts of the two stages (optimiser steps, over all processes together)."""

    steps_per_epoch: int
    epochs_heads: int
    epochs: int

    @property
    def heads_steps(self) -> int:
        return self.epochs_heads * self.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return (self.epochs_heads + self.epochs) * self.steps_per_epoch

    def stage(self, epoch: int) -> int:
        """1 (heads only) or 2 (everything) for a 0-based epoch."""
        return 1 if epoch < self.epochs_heads else 2


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup from 0 to 1 over ``warmup_steps``, then cosine from 1 to ``min_ratio`` (nanoGPT's get_lr).

    ``step`` counts from 0 within a stage; the factor of step s is the one used by the update of step s.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
