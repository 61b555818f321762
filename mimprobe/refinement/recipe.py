"""Where each refinement default comes from: MIM-Refiner's official configurations, file and line.

The official repository (github.com/ml-jku/MIM-Refiner, commit `OFFICIAL_COMMIT`) trains in two runs: ``stage2``
trains the heads on a frozen encoder (mimprobe's stage 1) and ``stage3`` trains everything (mimprobe's stage 2).
`RECIPE` lists every default of `RefineConfig` that follows it, with the official value and the line it is read
from (paths relative to the repository root; line numbers of ``stage2/l16_mae.yaml`` and ``stage3/l16_mae.yaml``,
the ViT-L MAE run: every main configuration of stage2/ and stage3/ has the same values, only epochs and batch differ
with the model size). ``mimprobe refine --recipe`` prints the table; a test checks every row against
`RefineConfig`'s defaults.

Deliberate deviations, kept and documented where they live:

* ``refinement/loss.py``: each local crop's loss term uses that crop's own prediction; the official ``nnclr_loss.py``
  indexes the local terms with a counter that starts at 0, i.e. reads global predictions (an indexing slip).
* the warmup never takes more than 40 % of a stage (`config.WARMUP_MAX_SHARE`, the longest official warmup), the
  default queue is cut to the training set (`config.resolve_queue_size`) and the default EMA keeps its official
  time constant as a share of a full stage shorter than the official 37,530 steps (`config.resolve_ema_decay`):
  all three bind only on small data or short runs.
* on a CPU below 224 px the default head widths follow the model's width (`sizing.resolve_head_dims`); local
  crops are always 96/224 of the input (96 px at 224 px).
"""

from __future__ import annotations

from dataclasses import dataclass

OFFICIAL_REPO = "github.com/ml-jku/MIM-Refiner"
OFFICIAL_COMMIT = "cc574235995e2115909a6fb91b91ff703af744c2"

_S2 = "src/yamls/stage2/l16_mae.yaml"
_S3 = "src/yamls/stage3/l16_mae.yaml"
_VIEWS = "src/zztemplates/datasets/imagenet/train_byolaug_localviews.yaml"
_SCHEDULE = "src/zztemplates/schedules/wupcos_epoch.yaml"
_HEAD = "src/models/ssl/nnclr_head.py"
_NNCLR = "src/zztemplates/models/nnclr.yaml"


@dataclass(frozen=True)
class RecipeRow:
    """One default: the `RefineConfig` field, the CLI option, mimprobe's default, the official value, the source."""

    field: str
    option: str
    default: object
    official: str
    source: str


RECIPE: tuple[RecipeRow, ...] = (
    RecipeRow("global_scale_min", "--global-scale-min", 0.25, "2 global 224 px crops, scale (0.25, 1), bicubic",
              f"{_VIEWS}:4,7,21-26,43-48"),
    RecipeRow("local_crops", "--local-crops", 10, "n_local_views: 10", f"{_VIEWS}:8,67"),
    RecipeRow("local_size", "--local-size", None, "local_resolution: 96 (at global_resolution 224; "
              "None = 96/224 of the input)", f"{_VIEWS}:4-5,70"),
    RecipeRow("local_scale", "--local-scale", (0.05, 0.25), "min_scale 0.05, mid_scale 0.25", f"{_VIEWS}:6-7,71-73"),
    RecipeRow("lr_heads", "--lr-heads", 2e-4, "stage 2 (heads) lr 2.0e-4", f"{_S2}:11"),
    RecipeRow("lr", "--lr", 4e-4, "stage 3 (full) lr 4.0e-4", f"{_S3}:12"),
    RecipeRow("batch_size", "--batch-size", 256, "the lrs are per 256 images: lr x batch / 256 (LinearLrScaler); "
              "the batch is the user's (official 1024 for L, 512 for H/2B)",
              "src/optimizers/optimizer_wrapper.py:50-53; src/optimizers/lr_scalers/linear_lr_scaler.py:2,10; "
              f"{_S2}:8"),
    RecipeRow("epochs_heads", "--epochs-heads", 1, "the user's (official stage 2: max_epochs 20)", f"{_S2}:7"),
    RecipeRow("epochs", "--epochs", 5, "the user's (official stage 3: max_epochs 20-30)", f"{_S3}:8"),
    RecipeRow("warmup_epochs", "--warmup-epochs", 4.0, "linear warmup end_epoch: 4 (each stage)",
              f"{_S2}:15-16; {_S3}:16-17; {_SCHEDULE}:6-10"),
    RecipeRow("min_lr", "--min-lr", 1e-6, "cosine end_value 1.0e-6, absolute (kappaschedules max_value = the "
              "scaled lr)", f"{_SCHEDULE}:3,11-14; src/optimizers/optimizer_wrapper.py:176-181"),
    RecipeRow("betas", "", (0.9, 0.95), "adamw betas [0.9, 0.95]", f"{_S2}:10,12; {_S3}:11,13"),
    RecipeRow("layer_decay", "", 0.65, "layerwise_lr_decay_modifier decay 0.65", f"{_S3}:39-41"),
    RecipeRow("weight_decay", "", 0.05, "encoder weight_decay 0.05", f"{_S3}:38"),
    RecipeRow("head_weight_decay", "", 1e-5, "heads weight_decay 1.0e-5", f"{_S2}:13; {_S3}:59"),
    RecipeRow("ema_decay", "--ema-decay", None, "ema_callback target_factors [0.9999] on the encoder (None = "
              "0.9999, or on a full stage shorter than the official 37,530 steps (30 epochs x 1,251 of batch 1024 on "
              "ImageNet-1K) the same time constant as a share of it: 10,000 / 37,530 = 27 %)",
              f"{_S3}:8-9,200-204"),
    RecipeRow("ema_warmup", "--ema-warmup", False, "no warmup: a copy at the stage's start, then ema = f * ema + "
              "(1 - f) * param after every update, buffers copied",
              "src/callbacks/checkpoint_callbacks/ema_callback.py:46-57,59-69"),
    RecipeRow("head_init", "--head-init", "xavier_uniform", 'init_weights="xavier_uniform" '
              "(init_xavier_uniform_zero_bias; BatchNorms weight 1, bias 0)", f"{_HEAD}:33,150-157"),
    RecipeRow("head_hidden_dim", "--head-dims", None, "proj_hidden_dim 2048 (None = by --head-dims auto: official "
              "on a GPU or at 224 px, x model width / 1024 on a CPU below 224 px)", f"{_NNCLR}:19-21"),
    RecipeRow("head_proj_dim", "--head-dims", None, "output_dim 256 (None = as above)", f"{_NNCLR}:19,23"),
    RecipeRow("head_predictor_dim", "--head-dims", None, "pred_hidden_dim 4096 (None = as above)", f"{_NNCLR}:19,22"),
    RecipeRow("queue_size", "--queue-size", None, "queue_size 65536 (None = 65536, or the training set when "
              "smaller)", f"{_NNCLR}:19-20"),
    RecipeRow("topk", "--topk", 20, "queue_kwargs topk: 20 (stage 3)", f"{_S3}:55-56"),
    RecipeRow("temperature", "--temperature", 0.2, "NnclrLoss temperature=0.2 (heads nnclr_temp02)",
              "src/losses/ssl/nnclr_loss.py:11; " + f"{_S2}:41"),
)


def recipe_text() -> str:
    """The table as plain text: one row per default (what ``mimprobe refine --recipe`` prints)."""
    header = (f"MIM-Refiner's main recipe ({OFFICIAL_REPO} @ {OFFICIAL_COMMIT[:7]}): mimprobe refine defaults and "
              "their sources (official stage 2 = mimprobe stage 1, heads only; official stage 3 = mimprobe stage 2)")
    rows = [("option", "default", "official", "source")]
    rows += [(row.option or f"({row.field})", _show(row.default), row.official, row.source) for row in RECIPE]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [header, ""]
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3])
    lines += ["", "Scaled to small runs only where they must be: the warmup takes at most 40 % of a stage (binds on "
              "stages shorter than 10 epochs), the default queue is cut to the training set, the default EMA keeps "
              "the official time constant (10,000 of 37,530 steps) as a share of a shorter full stage, and on a CPU "
              "below 224 px the default head widths are the official ones x model width / 1024; each run says what "
              "it scaled and records it in config.json. Deliberate fix: local crops' loss terms use their own "
              "predictions (refinement/loss.py)."]
    return "\n".join(lines)


def _show(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(_show(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
