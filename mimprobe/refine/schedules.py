"""The refinement's pure schedules (learning rate, warmup, queue size) of its options (`mimprobe.refine.config`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import RefineConfig

OFFICIAL_QUEUE_SIZE = 65536                      # models/nnclr.yaml, base
WARMUP_MAX_SHARE = 0.4   # the longest official warmup: 4 of 10 epochs (stage3/ablations/augmentation/minaug_localviews)


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
    """The official ``schedules/wupcos_epoch`` schedule of one stage as a factor of its peak lr.

    Linear warmup, then cosine to ``min_ratio``, exactly as kappaschedules computes them for the official run
    (``LinearIncreasingSchedule`` with ``exclude_first`` and ``exclude_last``, then ``CosineDecreasingSchedule``
    with ``exclude_last``, chained by ``SequentialStepSchedule``; github.com/BenediktAlkin/KappaSchedules)::

        step <  W:  (step + 1) / (W + 1)                                  # starts above 0, stops short of 1
        step >= W:  min_ratio + (1 - min_ratio) * (1 + cos(pi * (step - W) / (T - W))) / 2

    ``step`` counts from 0 within a stage (T steps, W of warmup); the factor of step s is the one used by the
    update of step s (the official trainer calls ``schedule_step`` before each update with the number of updates
    done). The cosine starts at the peak and ends one step short of ``min_ratio``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(config: RefineConfig, *, stage_epochs: int, steps_per_epoch: int) -> int:
    """Warmup steps of a stage of ``stage_epochs`` epochs: ``warmup_epochs`` epochs (official: 4), but at most
    `WARMUP_MAX_SHARE` of the stage; or ``warmup_fraction`` of the stage when that is set.

    The cap only bites on stages shorter than 10 epochs (4 / 0.4): every official configuration (10, 20 and 30
    epoch stages with 4 warmup epochs) keeps its exact warmup, while a short run on small data still gets a peak
    and a cosine instead of a warmup that never ends.
    """
    stage_steps = stage_epochs * steps_per_epoch
    if config.warmup_fraction is not None:
        return int(round(config.warmup_fraction * stage_steps))
    return min(int(round(config.warmup_epochs * steps_per_epoch)), int(WARMUP_MAX_SHARE * stage_steps))


def stage_lr(config: RefineConfig, plan: StagePlan, step: int) -> float:
    """Learning rate (layer scale 1) of optimiser step ``step`` (0-based over the whole run).

    Each stage has its own schedule: peak ``lr_heads`` (stage 1) or ``lr`` (stage 2) times batch_size / 256 (the
    official ``LinearLrScaler``), warmup (`warmup_steps`), cosine to the absolute ``min_lr`` (`lr_factor`).
    """
    heads = step < plan.heads_steps
    stage_step = step if heads else step - plan.heads_steps
    stage_epochs = plan.epochs_heads if heads else plan.epochs
    peak = (config.lr_heads if heads else config.lr) * config.batch_size / 256
    factor = lr_factor(stage_step, total_steps=stage_epochs * plan.steps_per_epoch,
                       warmup_steps=warmup_steps(config, stage_epochs=stage_epochs,
                                                 steps_per_epoch=plan.steps_per_epoch),
                       min_ratio=min(1.0, config.min_lr / peak))
    return peak * factor


def resolve_queue_size(config: RefineConfig, train_images: int) -> int:
    """The queue length per head: ``queue_size`` as given, else the official 65,536 cut to the training set (a
    longer queue would hold the same images twice)."""
    if config.queue_size is not None:
        return config.queue_size
    return min(OFFICIAL_QUEUE_SIZE, train_images)
