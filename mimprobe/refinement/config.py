"""`RefineConfig`: the options of an NNA refinement (`mimprobe refine`, the ``[refine]`` spec section)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import BadInputError
from ..options import check_options, img_size_option, option, seed_option
from ..choices import PRECISIONS

HEAD_INITS = ("xavier_uniform", "truncnormal")   # the official NnclrHead's init_weights choices
HEAD_WIDTHS = ("auto", "official", "proportional")   # how head widths not given explicitly are chosen (sizing.py)


def _widths(text: str) -> tuple[int, int, int] | str:
    """``--head-dims``: three widths (``2048,256,4096``) or a rule word of `HEAD_WIDTHS`."""
    if text.strip() in HEAD_WIDTHS:
        return text.strip()
    try:
        hidden, projection, predictor = (int(part) for part in text.split(","))
    except ValueError:
        raise BadInputError(f"invalid --head-dims {text!r}: give three widths, e.g. 2048,256,4096, or one of "
                            f"{', '.join(HEAD_WIDTHS)}") from None
    return hidden, projection, predictor


def _areas(text: str) -> tuple[float, float]:
    """``--local-scale 0.05,0.25`` -> two areas."""
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise BadInputError(f"invalid --local-scale {text!r}: give two areas, e.g. 0.05,0.25") from None
    return low, high


@dataclass(frozen=True)
class RefineConfig:
    """Everything that changes a refinement run's numbers: the options of `mimprobe refine`, the ``[refine]`` spec
    section and `mimprobe.refinement` (`mimprobe.options`).

    The defaults are MIM-Refiner's main recipe (arXiv 2402.10093), read from the official stage-2 (heads) and
    stage-3 (full) configurations of github.com/ml-jku/MIM-Refiner; `mimprobe.refinement.recipe.RECIPE` maps each one to
    its source line (``mimprobe refine --recipe`` prints it). Epochs, batch, queue and head sizes are the user's
    (the official ImageNet values are in the comments). Two defaults are scaled to small data, and only when the
    data forces it: the warmup never takes more than `WARMUP_MAX_SHARE` of a stage, and the queue is cut to the
    training set (`resolve_queue_size`).
    """

    epochs_heads: int = option(1, "Stage 1 epochs: heads only, encoder frozen (official stage 2: 20 ImageNet "
                                  "epochs).", minimum=0)
    epochs: int = option(5, "Stage 2 epochs: encoder and heads (official stage 3: 20-30 epochs).", minimum=0)
    batch_size: int = option(256, "Global batch (all processes); the lrs are scaled by batch / 256.")
    accumulate: int = option(1, "Micro-batches per step when a batch does not fit.", minimum=1)
    lr_heads: float = option(2e-4, "Stage 1 (heads only) peak lr per 256 images (official 2e-4).")
    lr: float = option(4e-4, "Stage 2 (encoder and heads) peak lr per 256 images (official 4e-4).")
    min_lr: float = option(1e-6, "End of each stage's cosine: an absolute lr, not scaled with the batch.")
    warmup_epochs: float = option(4.0, "Linear warmup of each stage in epochs (official 4); cut to 40 % of a stage "
                                       "shorter than 10 epochs.")
    warmup_fraction: float | None = option(None, "Instead: warm up over this share of each stage (0.1 before the "
                                                 "official recipe).")
    layer_decay: float = option(0.65, "Layer-wise lr decay (BEiT; official 0.65).")
    weight_decay: float = option(0.05, "Weight decay of the encoder (official 0.05; heads 1e-5).")
    head_weight_decay: float = option(1e-5, "Weight decay of the heads (official 1e-5).", cli=False)
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas (official 0.9, 0.95).", cli=False)
    temperature: float = option(0.2, "NNA temperature (0.2 ViT-L, 0.3 H, 0.35 2B).")
    queue_size: int | None = option(None, "Neighbour queue length per head [default: 65536, cut to the training "
                                          "set when smaller].", minimum=1)
    topk: int = option(20, "Stage 2: pick the neighbour uniformly from the top k (stage 1: the nearest).", minimum=1)
    # auto: the official widths, except on a CPU below 224 px, where they follow the model's width
    # (`mimprobe.refinement.sizing`: official x width / 1024, ViT-L's; recorded in config.json with the rule)
    head_dims: tuple[int, int, int] | str = option("auto", "Projector hidden, projection and predictor hidden widths "
                                                   "(official 2048,256,4096), or auto (official, but proportional to "
                                                   "the model on a CPU below 224 px), official or proportional.",
                                                   parse=_widths)
    head_init: str = option("xavier_uniform", "Heads' Linear init: xavier_uniform (official) or truncnormal (std "
                                              "0.02).", choices=HEAD_INITS)
    local_crops: int = option(10, "Local crops as extra predicted views (official 10; 0: global views only).",
                              minimum=0)
    local_size: int | None = option(None, "Side of the local crops [default: 96/224 of the input, rounded to the "
                                          "patch].", minimum=1)
    local_scale: tuple[float, float] = option((0.05, 0.25), "Area range of the local crops.", parse=_areas)
    global_scale_min: float = option(0.25, "Smallest area of the 2 global crops (official 0.25; BYOL 0.08).")
    # None: the official 0.9999, or on a stage 2 shorter than the official 37,530 steps the same time constant as a
    # share of it (`mimprobe.refinement.schedules.resolve_ema_decay`; config.json records the value and its source)
    ema_decay: float | None = option(None, "EMA of the encoder, constant from stage 2's first step [default: the "
                                           "official 0.9999, its 10,000-step time constant scaled to a shorter "
                                           "stage 2 as a share of the official 37,530 steps].")
    ema_warmup: bool = option(False, "timm's EMA warmup instead (decay 1-(1+n)^-2/3 up to --ema-decay): short runs "
                                     "still move.")
    clip_grad: float | None = option(None, "Clip the gradient norm at this value [default: no clipping, as the "
                                           "official recipe].")
    freeze_blocks: int = 0             # first blocks (and the embeddings) kept frozen in stage 2; from the placement
    head_blocks: tuple[int, ...] = ()  # 0-based blocks with a head; from the placement
    img_size: int | None = img_size_option()
    precision: str = option("auto", "auto (bf16 autocast on GPU, fp32 on the CPU), fp32, bf16 or fp16.",
                            choices=PRECISIONS)
    seed: int = seed_option("data order, augmentations, heads and neighbour picks")
    num_workers: int = option(0, "DataLoader worker processes.", flag="workers", minimum=0)
    monitor_images: int = option(0, "k-NN monitor on N labelled images every epoch (0: off).", flag="monitor",
                                 minimum=0)
    # per-epoch exports for `mimprobe profile --checkpoint RUN` (a series over refinement); resumable when changed
    save_every: int | None = option(None, "Also export the encoder every N epochs (and after the last) as "
                                          "checkpoint-{epoch}.safetensors (the EMA encoder in the full stage, as "
                                          "refined.safetensors), a series `mimprobe profile --checkpoint OUT` "
                                          "profiles [default: none].", minimum=1)

    @property
    def head_widths(self) -> str:
        """The rule of widths not given: a word of `HEAD_WIDTHS`, or ``given`` for three explicit widths."""
        return self.head_dims if isinstance(self.head_dims, str) else "given"

    @property
    def head_hidden_dim(self) -> int | None:
        return None if isinstance(self.head_dims, str) else self.head_dims[0]

    @property
    def head_proj_dim(self) -> int | None:
        return None if isinstance(self.head_dims, str) else self.head_dims[1]

    @property
    def head_predictor_dim(self) -> int | None:
        return None if isinstance(self.head_dims, str) else self.head_dims[2]

    def __post_init__(self) -> None:
        for name in ("local_scale", "betas", "head_blocks"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not isinstance(self.head_dims, str):
            object.__setattr__(self, "head_dims", tuple(int(width) for width in self.head_dims))
        check_options(self)
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
            (self.head_dims in HEAD_WIDTHS if isinstance(self.head_dims, str) else
             len(self.head_dims) == 3 and min(self.head_dims) >= 1,
             f"--head-dims {self.head_dims!r}: give three widths >= 1, e.g. 2048,256,4096, or one of "
             f"{', '.join(HEAD_WIDTHS)}"),
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
        for key in ("betas", "head_blocks", "local_scale", "head_dims"):
            if key in values and values[key] is not None and not isinstance(values[key], str):
                values[key] = tuple(values[key])
        old_widths = ("head_hidden_dim", "head_proj_dim", "head_predictor_dim")  # config.json before head_dims
        if all(key in values for key in old_widths):
            values["head_dims"] = tuple(values.pop(key) for key in old_widths)
        return cls(**values)


