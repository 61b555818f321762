"""The refinement configuration (one frozen dataclass) and its pure schedules."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import BadInputError

HEAD_INITS = ("xavier_uniform", "truncnormal")   # the official NnclrHead's init_weights choices
HEAD_WIDTHS = ("auto", "official", "proportional")   # how head widths not given explicitly are chosen (sizing.py)
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
class RefineConfig:
    """Everything that changes a refinement run's numbers. CLI options map onto these fields.

    The defaults are MIM-Refiner's main recipe (arXiv 2402.10093), read from the official stage-2 (heads) and
    stage-3 (full) configurations of github.com/ml-jku/MIM-Refiner; `mimprobe.refine.recipe.RECIPE` maps each one to
    its source line (``mimprobe refine --recipe`` prints it). Epochs, batch, queue and head sizes are the user's
    (the official ImageNet values are in the comments). Defaults are scaled to small runs only where the run forces
    it: the warmup never takes more than `WARMUP_MAX_SHARE` of a stage, the queue is cut to the training set
    (`resolve_queue_size`), the EMA keeps the official time constant as a share of a stage 2 shorter than the
    official one (`resolve_ema_decay`), and on a CPU below 224 px the heads' widths follow the model's
    (`mimprobe.refine.sizing.resolve_head_dims`). None marks a default resolved at run time; config.json records
    the resolved value and its source.
    """

    epochs_heads: int = 1              # stage 1, encoder frozen: heads only (official stage 2: 20 ImageNet epochs)
    epochs: int = 5                    # stage 2, everything but the frozen blocks (official stage 3: 20-30 epochs)
    batch_size: int = 256              # global batch over all processes; lrs are scaled by batch_size / 256
    accumulate: int = 1                # micro-batches per optimiser step when a batch does not fit in memory
    lr_heads: float = 2e-4             # stage 1 (heads only) peak lr per 256 images (official stage 2)
    lr: float = 4e-4                   # stage 2 (everything) peak lr per 256 images (official stage 3)
    min_lr: float = 1e-6               # end of the cosine: an absolute lr, not scaled with the batch
    warmup_epochs: float = 4.0         # linear warmup of each stage, in epochs (at most WARMUP_MAX_SHARE of it)
    warmup_fraction: float | None = None   # instead: warmup over this share of each stage's steps (0.1 before)
    layer_decay: float = 0.65          # layer-wise lr decay (BEiT; trainer.layer_lr_scale)
    weight_decay: float = 0.05         # encoder
    head_weight_decay: float = 1e-5    # heads
    betas: tuple[float, float] = (0.9, 0.95)
    temperature: float = 0.2           # 0.2 for ViT-L, 0.3 for H, 0.35 for 2B in the paper
    queue_size: int | None = None      # per head; None: 65536 (official), cut to the training set when smaller
    topk: int = 20                     # neighbours to pick from uniformly in stage 2 (stage 1 uses the nearest)
    head_hidden_dim: int | None = None     # projector hidden width; None: by head_widths (official 2048)
    head_proj_dim: int | None = None       # projection width (queue and loss space); None: by head_widths (256)
    head_predictor_dim: int | None = None  # predictor hidden width; None: by head_widths (official 4096)
    head_widths: str = "auto"          # widths not given: official, proportional (official x model width / 1024,
                                       # ViT-L's), or auto (proportional on a CPU below 224 px, else official)
    head_init: str = "xavier_uniform"  # linears of the heads: xavier_uniform (official) or truncnormal (std 0.02)
    local_crops: int = 10              # extra predicted views; anchors are always the 2 global views (0: global only)
    local_size: int | None = None      # side of local crops; None: 96/224 of the input size
    local_scale: tuple[float, float] = (0.05, 0.25)   # area range of the local crops
    global_scale_min: float = 0.25     # area range of the global crops is (global_scale_min, 1)
    ema_decay: float | None = None     # encoder EMA, constant from the first stage-2 step; None: the official
                                       # 0.9999, or on a stage 2 shorter than 37,530 steps the same time constant
                                       # as a share of it (resolve_ema_decay)
    ema_warmup: bool = False           # timm ModelEmaV3's warmup (decay 1 - (1 + step)^-2/3, capped at ema_decay)
    freeze_blocks: int = 0             # first blocks (and the embeddings) kept frozen in stage 2
    head_blocks: tuple[int, ...] = ()  # 0-based blocks with a head; from the placement
    img_size: int | None = None
    precision: str = "auto"            # auto: bf16 autocast on CUDA, fp32 on the CPU
    seed: int = 0
    num_workers: int = 0
    monitor_images: int = 0            # labelled images for the per-epoch k-NN monitor (0: off)
    clip_grad: float | None = None

    def __post_init__(self) -> None:
        scale = self.batch_size / 256
        checks = [
            (self.epochs_heads >= 0 and self.epochs >= 0, "--epochs and --epochs-heads must be >= 0"),
            (self.epochs_heads + self.epochs > 0, "nothing to train: --epochs-heads and --epochs are both 0"),
            (self.batch_size >= 2, f"--batch-size {self.batch_size} is too small: the NNA loss contrasts the "
                                   "images of a batch, use at least 2"),
            (self.accumulate >= 1, "--accumulate must be >= 1"),
            (self.lr > 0 and self.lr_heads > 0 and self.min_lr >= 0, "--lr and --lr-heads must be > 0 and "
                                                                      "--min-lr >= 0"),
            (self.min_lr <= min(self.lr, self.lr_heads) * scale,
             f"--min-lr {self.min_lr:g} is above a peak lr ({min(self.lr, self.lr_heads) * scale:g} = "
             f"{min(self.lr, self.lr_heads):g} x batch {self.batch_size} / 256): lower --min-lr or raise the lr"),
            (self.warmup_epochs >= 0, "--warmup-epochs must be >= 0"),
            (self.warmup_fraction is None or 0 <= self.warmup_fraction < 1, "--warmup-fraction must be in [0, 1)"),
            (0 < self.layer_decay <= 1, "--layer-decay must be in (0, 1]"),
            (self.temperature > 0, "--temperature must be > 0"),
            (self.queue_size is None or self.queue_size >= 1, "--queue-size must be >= 1"),
            (self.topk >= 1, "--topk must be >= 1"),
            (self.queue_size is None or self.topk <= self.queue_size,
             f"--topk {self.topk} is larger than --queue-size {self.queue_size}: the neighbour is picked from the "
             f"top k of the queue, use --topk {self.queue_size} or less (or a longer queue)"),
            (all(d is None or d >= 1 for d in (self.head_hidden_dim, self.head_proj_dim, self.head_predictor_dim)),
             "head sizes must be >= 1"),
            (self.head_widths in HEAD_WIDTHS, f"--head-dims {self.head_widths!r} is unknown: use three widths "
                                              f"(e.g. 2048,256,4096) or one of {', '.join(HEAD_WIDTHS)}"),
            (self.head_init in HEAD_INITS, f"--head-init {self.head_init!r} is unknown: use one of "
                                           f"{', '.join(HEAD_INITS)}"),
            (self.local_crops >= 0, "--local-crops must be >= 0"),
            (self.local_size is None or self.local_size >= 1, "--local-size must be >= 1"),
            (len(self.local_scale) == 2 and 0 < self.local_scale[0] <= self.local_scale[1] <= 1,
             "--local-scale must be two areas 0 < min <= max <= 1, e.g. 0.05,0.25"),
            (0 < self.global_scale_min <= 1, "--global-scale-min must be in (0, 1]"),
            (self.ema_decay is None or 0 <= self.ema_decay < 1, "--ema-decay must be in [0, 1)"),
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
        for key in ("betas", "head_blocks", "local_scale"):
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


def resolve_queue_size(config: RefineConfig, train_images: int) -> int:
    """The queue length per head: ``queue_size`` as given, else the official 65,536 cut to the training set (a
    longer queue would hold the same images twice)."""
    if config.queue_size is not None:
        return config.queue_size
    return min(OFFICIAL_QUEUE_SIZE, train_images)


def head_dims_fields(value: str | tuple[int, int, int] | list[int]) -> dict[str, Any]:
    """`RefineConfig` fields of a ``--head-dims`` value: three widths ("2048,256,4096" or a sequence) or one of
    `HEAD_WIDTHS` (auto, official, proportional).

    Raises:
        BadInputError: Neither a known word nor three integers.
    """
    if isinstance(value, str) and value.strip() in HEAD_WIDTHS:
        return {"head_widths": value.strip()}
    try:
        parts = value.split(",") if isinstance(value, str) else list(value)
        hidden, proj, predictor = (int(part) for part in parts)
    except (TypeError, ValueError):
        raise BadInputError(f"invalid --head-dims {value!r}: give three widths, e.g. 2048,256,4096, or one of "
                            f"{', '.join(HEAD_WIDTHS)}") from None
    return {"head_hidden_dim": hidden, "head_proj_dim": proj, "head_predictor_dim": predictor}
