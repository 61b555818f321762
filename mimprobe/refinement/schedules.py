"""The refinement's pure schedules (learning rate, warmup, queue size) of its options (`mimprobe.refinement.config`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import RefineConfig

OFFICIAL_QUEUE_SIZE = 65536                      # models/nnclr.yaml, base
WARMUP_MAX_SHARE = 0.4   # the longest official warmup: 4 of 10 epochs (stage3/ablations/augmentation/minaug_localviews)

# The official EMA and the run it was set for (github.com/ml-jku/MIM-Refiner, src/yamls/stage3/l16_mae.yaml):
# target_factors [0.9999] (lines 200-204), i.e. a time constant of 1 / (1 - 0.9999) = 10,000 updates, over
# max_epochs 30 (line 8) of batch 1024 (line 9) on ImageNet-1K's 1,281,167 training images: 30 x 1,251 = 37,530
# updates. The EMA thus averages over the last 27 % of the official run (`resolve_ema_decay` keeps that share).
OFFICIAL_EMA_DECAY = 0.9999
OFFICIAL_EMA_SOURCE = "src/yamls/stage3/l16_mae.yaml:200-204"
OFFICIAL_FULL_STEPS = 30 * (1_281_167 // 1024)   # 37,530: stage3/l16_mae.yaml:8-9, ImageNet-1K train
OFFICIAL_FULL_STEPS_SOURCE = ("src/yamls/stage3/l16_mae.yaml:8-9 (max_epochs 30, batch_size 1024) on ImageNet-1K's "
                              "1,281,167 training images: 30 x 1,251")
OFFICIAL_EMA_SHARE = 1 / (1 - OFFICIAL_EMA_DECAY) / OFFICIAL_FULL_STEPS   # 10,000 / 37,530 = 0.266
EMA_PROGRESS_WARN = 0.5   # below this the export sits nearer the starting weights than the trained ones


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


def resolve_ema_decay(config: RefineConfig, full_steps: int) -> float:
    """The EMA decay of a stage 2 of ``full_steps`` optimiser steps: ``ema_decay`` as given, else the official 0.9999
    scaled as the warmup is (`warmup_steps`), only where the run forces it.

    The official EMA's time constant, 1 / (1 - 0.9999) = 10,000 updates, is `OFFICIAL_EMA_SHARE` (27 %) of the
    official 37,530-step stage. A stage of S < 37,530 steps keeps that share: time constant tau = 0.266 S, decay
    ``1 - 1 / tau`` (0 when tau < 1: the export is the trained encoder). From 37,530 steps on the official 0.9999
    is kept exactly. Without this a short run exports its starting weights: 0.9999^31 keeps 99.7 % of them.
    """
    if config.ema_decay is not None:
        return config.ema_decay
    if full_steps >= OFFICIAL_FULL_STEPS:
        return OFFICIAL_EMA_DECAY
    time_constant = OFFICIAL_EMA_SHARE * full_steps
    return max(0.0, 1.0 - 1.0 / time_constant) if time_constant > 0 else 0.0


def ema_scaling_note(config: RefineConfig, full_steps: int) -> str | None:
    """A line that says how the default EMA was scaled to a short stage 2, with its sources (None when the official
    value stands or ``ema_decay`` was given)."""
    decay = resolve_ema_decay(config, full_steps)
    if config.ema_decay is not None or decay == OFFICIAL_EMA_DECAY or full_steps == 0:
        return None
    return (f"EMA: decay {decay:.6g} (time constant {1 / (1 - decay) if decay < 1 else float('inf'):.1f} of "
            f"{full_steps} full-stage steps), the official {OFFICIAL_EMA_DECAY} ({OFFICIAL_EMA_SOURCE}) kept as a "
            f"share of the stage: its 10,000-step time constant is {OFFICIAL_EMA_SHARE:.1%} of the official "
            f"{OFFICIAL_FULL_STEPS:,} steps ({OFFICIAL_FULL_STEPS_SOURCE}); --ema-decay sets it")


def ema_progress_warning(progress: float | None) -> str | None:
    """The warning a run (or its comparison) gives when the EMA export barely left the starting weights."""
    if progress is None or progress >= EMA_PROGRESS_WARN:
        return None
    return (f"warning: the exported EMA encoder moved only {progress:.0%} of the way from the starting weights to "
            f"the trained ones (ema_progress {progress:.2f} < {EMA_PROGRESS_WARN}): the export is mostly the start; "
            "train longer or lower --ema-decay")
