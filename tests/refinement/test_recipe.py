"""The refinement defaults are MIM-Refiner's main recipe (github.com/ml-jku/MIM-Refiner, src/yamls/stage2|3, the
templates they use, and the official code): each default pinned to its official value, checked in behaviour where
it can be (views drawn, lr of every step against the official schedule's formula, EMA updates, head weights)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import typer
from torch import nn
from torchvision.transforms import v2
from typer.testing import CliRunner

from mimprobe._threads import cpu_threads
from mimprobe.cli import app
from mimprobe.placement import place
from mimprobe.refinement import RefineConfig, run_refine
from mimprobe.refinement.augment import MultiViewTransform, ViewConfig
from mimprobe.refinement.schedules import (OFFICIAL_FULL_STEPS, StagePlan, ema_scaling_note, lr_factor, resolve_ema_decay,
                                       resolve_queue_size, stage_lr, warmup_steps)
from mimprobe.refinement.recipe import OFFICIAL_COMMIT, RECIPE, recipe_text
from mimprobe.refinement.sizing import resolve_head_dims
from mimprobe.refinement.optim import make_ema
from mimprobe.refinement.trainer import _small_data_notes

# The official values, read from the configurations (file:line in mimprobe/refinement/recipe.py's RECIPE).
OFFICIAL = {
    "global_scale_min": 0.25,          # train_byolaug_localviews.yaml:7 mid_scale (global crops (mid_scale, 1))
    "local_crops": 10,                 # train_byolaug_localviews.yaml:8 n_local_views
    "local_scale": (0.05, 0.25),       # train_byolaug_localviews.yaml:6-7 (min_scale, mid_scale)
    "lr_heads": 2e-4,                  # stage2/*.yaml:11
    "lr": 4e-4,                        # stage3/*.yaml:12
    "warmup_epochs": 4.0,              # stage2/*.yaml:16, stage3/*.yaml:17 (schedules/wupcos_epoch end_epoch)
    "min_lr": 1e-6,                    # schedules/wupcos_epoch.yaml:3 end_value (absolute)
    "ema_decay": 0.9999,               # stage3/*.yaml: ema_callback target_factors
    "ema_warmup": False,               # callbacks/checkpoint_callbacks/ema_callback.py: no warmup
    "head_init": "xavier_uniform",     # models/ssl/nnclr_head.py:33
    "betas": (0.9, 0.95),
    "layer_decay": 0.65,
    "weight_decay": 0.05,
    "head_weight_decay": 1e-5,
    "head_hidden_dim": 2048, "head_proj_dim": 256, "head_predictor_dim": 4096,   # models/nnclr.yaml base
    "topk": 20,
    "temperature": 0.2,
}


# Defaults resolved at run time (None in RefineConfig): official for a run of official length on a GPU at 224 px.
RESOLVED = {"ema_decay", "head_hidden_dim", "head_proj_dim", "head_predictor_dim"}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_config_defaults_are_the_official_values(name):
    config = RefineConfig()
    if name in RESOLVED:
        assert getattr(config, name) is None
        dims = dict(zip(("head_hidden_dim", "head_proj_dim", "head_predictor_dim"),
                        resolve_head_dims(config, embed_dim=1024, img_size=224, device_type="cuda")))
        value = resolve_ema_decay(config, OFFICIAL_FULL_STEPS) if name == "ema_decay" else dims[name]
    else:
        value = getattr(config, name)
    assert value == OFFICIAL[name]


def test_the_official_ema_stands_for_a_run_of_official_length():
    """30 epochs of 1,251 steps (ImageNet-1K at batch 1024, stage3/l16_mae.yaml) or longer: exactly 0.9999."""
    plan = StagePlan(steps_per_epoch=1_281_167 // 1024, epochs_heads=20, epochs=30)
    assert OFFICIAL_FULL_STEPS == plan.total_steps - plan.heads_steps == 37_530
    for steps in (37_530, 37_531, 10 ** 6):
        assert resolve_ema_decay(RefineConfig(), steps) == 0.9999, steps
        assert ema_scaling_note(RefineConfig(), steps) is None


def test_a_short_stage_keeps_the_official_time_constant_as_a_share_of_it():
    """tau = 1 / (1 - d) is 10,000 / 37,530 of the stage (closed form); continuous at the official length; a
    given --ema-decay is never changed."""
    config = RefineConfig()
    for steps in (31, 200, 5_000, 37_529):
        decay = resolve_ema_decay(config, steps)
        assert 1 / (1 - decay) == pytest.approx(steps * 10_000 / 37_530, rel=1e-6), steps
    assert resolve_ema_decay(config, 37_529) == pytest.approx(0.9999, abs=1e-8)
    assert resolve_ema_decay(config, 31) ** 31 < 0.02        # the official 0.9999 ** 31 keeps 99.7 % of the start
    assert resolve_ema_decay(config, 1) == 0.0               # tau below one step: the export is the trained encoder
    assert resolve_ema_decay(RefineConfig(ema_decay=0.9999), 31) == 0.9999
    assert ema_scaling_note(RefineConfig(ema_decay=0.99), 31) is None
    note = ema_scaling_note(config, 31)
    assert note.startswith("EMA: decay 0.8789") and "l16_mae.yaml:200-204" in note and "37,530" in note


@pytest.mark.parametrize("embed_dim", [192, 1024])
def test_official_head_widths_stay_the_default_on_gpus_and_at_224_px(embed_dim):
    config = RefineConfig()
    for device, size in (("cuda", 32), ("cuda", 224), ("cpu", 224), ("cpu", 384)):
        assert resolve_head_dims(config, embed_dim=embed_dim, img_size=size, device_type=device) == (2048, 256, 4096)
    official = RefineConfig(head_dims="official")
    assert resolve_head_dims(official, embed_dim=embed_dim, img_size=32, device_type="cpu") == (2048, 256, 4096)


def test_recipe_table_matches_the_defaults_and_names_a_source_for_each():
    defaults = RefineConfig()
    assert {row.field for row in RECIPE} >= set(OFFICIAL)
    for row in RECIPE:
        assert row.default == getattr(defaults, row.field), row.field
        assert row.source.startswith("src/") and ":" in row.source, row.field
    text = recipe_text()
    assert OFFICIAL_COMMIT[:7] in text and "refinement/loss.py" in text
    assert all(row.source in text for row in RECIPE)


def test_refine_recipe_prints_the_table_without_other_arguments():
    result = CliRunner().invoke(app, ["refine", "--recipe"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == recipe_text().strip()


def test_cli_defaults_are_the_config_defaults():
    """The command passes only what the user typed: every default is RefineConfig's, shown in --help."""
    command = typer.main.get_command(app).commands["refine"]
    cli = {param.name: param.default for param in command.params}
    for name in ("epochs_heads", "epochs", "lr", "ema_decay", "head_dims", "local_scale", "workers", "monitor"):
        assert cli[name] is None, name
    help_text = CliRunner().invoke(app, ["refine", "--help"], env={"COLUMNS": "200"}).output
    for option in ("--lr-heads", "--ema-warmup", "--warmup-epochs", "--warmup-fraction", "--global-scale-min",
                   "--local-crops", "--head-init", "--recipe", "[default: auto]", "official 0.9999"):
        assert option in help_text, option


# ---------------------------------------------------------------------------------------------------- views

def _crop_areas(transform: v2.Compose, side: int, n: int) -> np.ndarray:
    crop = next(t for t in transform.transforms if isinstance(t, v2.RandomResizedCrop))
    image = torch.zeros(3, side, side, dtype=torch.uint8)
    torch.manual_seed(0)
    params = [crop.make_params([image]) for _ in range(n)]
    return np.array([p["height"] * p["width"] / side ** 2 for p in params])


def test_views_are_two_global_and_ten_local_crops_at_the_official_sizes_and_scales():
    views = MultiViewTransform(ViewConfig(img_size=224, mean=(0.5,) * 3, std=(0.5,) * 3), patch_size=16)
    out = views(torch.randint(0, 256, (3, 256, 256), dtype=torch.uint8))
    assert [tuple(v.shape) for v in out] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 10
    for transform in views.global_views:
        areas = _crop_areas(transform, 400, 3000)
        # sampled areas fill the official (0.25, 1): none below 0.25, some near it; BYOL's 0.08 would reach 0.1
        assert areas.min() >= 0.25 - 0.01 and areas.min() < 0.27 and areas.max() <= 1.0
    areas = _crop_areas(views.local_view, 400, 3000)
    assert areas.min() >= 0.05 - 0.005 and areas.min() < 0.06 and 0.23 < areas.max() <= 0.25 + 0.01
    crop = next(t for t in views.local_view.transforms if isinstance(t, v2.RandomResizedCrop))
    assert crop.interpolation == v2.InterpolationMode.BICUBIC


def test_global_views_only_is_still_an_option():
    views = MultiViewTransform(ViewConfig(img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, local_crops=0,
                                          global_scale=(0.08, 1.0)), patch_size=16)
    assert len(views(torch.zeros(3, 40, 40, dtype=torch.uint8))) == 2
    assert _crop_areas(views.global_views[0], 400, 3000).min() < 0.1


# ---------------------------------------------------------------------------------------------------- lr

def _official_lr(step: int, *, total: int, warmup: int, peak: float, end: float) -> float:
    """kappaschedules' SequentialStepSchedule of schedules/wupcos_epoch.yaml, transcribed: a LinearIncreasing
    schedule (start 0, max peak, exclude_first, exclude_last) over [0, warmup), then CosineDecreasing (max peak,
    end_value, exclude_last) over [warmup, total); ProgressSchedule._get_value and functional.linear/cosine."""
    if step < warmup:
        s, t = step + 1, warmup + 1 + 1          # exclude_last: t += 1; exclude_first: s += 1, t += 1
        return 0.0 + (s / max(1, t - 1)) * (peak - 0.0)
    s, t = step - warmup, total - warmup + 1     # exclude_last
    progress = 1 - (1 + math.cos(math.pi * s / max(1, t - 1))) / 2
    return peak + progress * (end - peak)


@pytest.mark.parametrize("batch", [256, 1024, 4096])
def test_stage_lrs_follow_the_official_schedule_per_stage(batch):
    config = RefineConfig(batch_size=batch, epochs_heads=20, epochs=30)
    plan = StagePlan(steps_per_epoch=7, epochs_heads=20, epochs=30)
    heads_peak, full_peak = 2e-4 * batch / 256, 4e-4 * batch / 256
    for step in range(plan.total_steps):
        if step < plan.heads_steps:
            expected = _official_lr(step, total=140, warmup=28, peak=heads_peak, end=1e-6)
        else:
            expected = _official_lr(step - 140, total=210, warmup=28, peak=full_peak, end=1e-6)
        assert stage_lr(config, plan, step) == pytest.approx(expected, rel=1e-12), step
    # the warmup ends one step short of each peak; each cosine starts at its peak
    assert stage_lr(config, plan, 27) == pytest.approx(heads_peak * 28 / 29)
    assert stage_lr(config, plan, 28) == pytest.approx(heads_peak)
    assert stage_lr(config, plan, 140 + 28) == pytest.approx(full_peak)


def test_logged_learning_rates_follow_the_official_schedule_of_each_stage(tmp_path):
    """10 + 10 epochs of 2 steps with the default lrs, warmup and min lr: every logged lr equals kappaschedules'
    wupcos_epoch (4 warmup epochs, cosine to an absolute 1e-6) with peak 2e-4 (stage 1) or 4e-4 (stage 2) x 4/256;
    the default queue (65536) is cut to the 8 training images."""
    config = RefineConfig(epochs_heads=10, epochs=10, batch_size=4, head_dims=(16, 8, 16),
                          img_size=32, local_crops=0, topk=2)
    out = tmp_path / "run"
    with cpu_threads(1):
        run_refine("test_vit", "synthetic:classes=2,train=4,test=2,size=32", out=out, config=config,
                   placement=place(None, num_blocks=6, rule="last-n", n=2), progress=False)
    with open(out / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["stage"]) for r in rows] == [1] * 20 + [2] * 20
    for i, row in enumerate(rows):
        stage_step, peak = (i, 2e-4 * 4 / 256) if i < 20 else (i - 20, 4e-4 * 4 / 256)
        expected = _official_lr(stage_step, total=20, warmup=8, peak=peak, end=1e-6)
        assert float(row["lr"]) == pytest.approx(expected, rel=1e-9), i
    assert json.loads((out / "config.json").read_text())["config"]["queue_size"] == 8


def test_min_lr_is_absolute_not_scaled_with_the_batch():
    for batch in (64, 256, 4096):
        config = RefineConfig(batch_size=batch, epochs_heads=1, epochs=100)
        plan = StagePlan(steps_per_epoch=100, epochs_heads=1, epochs=100)
        last = stage_lr(config, plan, plan.total_steps - 1)
        # one step short of the cosine's end: 1e-6 plus peak * sin^2(pi / (2 * 9600)), i.e. 1e-6 within 0.5 %
        assert last == pytest.approx(1e-6, rel=5e-3), batch


def test_warmup_is_four_epochs_and_shrinks_only_for_stages_under_ten_epochs():
    config = RefineConfig()
    for epochs in (10, 20, 30, 100):     # 10 epochs: the official minaug_localviews ablation (4 of 10)
        assert warmup_steps(config, stage_epochs=epochs, steps_per_epoch=50) == 200, epochs
    assert warmup_steps(config, stage_epochs=5, steps_per_epoch=50) == 100      # 40 % of 250 steps
    assert warmup_steps(config, stage_epochs=1, steps_per_epoch=21) == 8        # floor(0.4 * 21)
    old = RefineConfig(warmup_fraction=0.1)
    assert warmup_steps(old, stage_epochs=5, steps_per_epoch=50) == 25


def test_the_run_says_which_defaults_small_data_scaled():
    plan = StagePlan(steps_per_epoch=21, epochs_heads=2, epochs=20)
    notes = _small_data_notes(RefineConfig(queue_size=65536), plan, None)   # resolved from None
    assert notes == ["warmup of the 2-epoch heads-only stage: 16 steps (at most 40% of it), not 4 epochs"]
    config = RefineConfig(queue_size=1347)   # as resolved by the trainer from the default None
    assert _small_data_notes(config, plan, None)[0] == "queue: 1347 per head, the training set (official 65536)"
    assert _small_data_notes(config, plan, 1347) == notes              # an explicit queue is the user's
    assert _small_data_notes(RefineConfig(warmup_fraction=0.1, queue_size=5, topk=5), plan, 5) == []


def test_lr_factor_endpoints():
    assert lr_factor(0, total_steps=10, warmup_steps=4, min_ratio=0.1) == pytest.approx(1 / 5)
    assert lr_factor(4, total_steps=10, warmup_steps=4, min_ratio=0.1) == 1.0
    assert lr_factor(0, total_steps=10, warmup_steps=0, min_ratio=0.1) == 1.0
    assert 0.1 < lr_factor(9, total_steps=10, warmup_steps=4, min_ratio=0.1) < 0.2


def test_min_lr_above_a_peak_is_refused():
    from mimprobe.errors import BadInputError

    with pytest.raises(BadInputError, match="--min-lr"):
        RefineConfig(batch_size=2, lr_heads=1e-4)      # peak 7.8e-7 < 1e-6


def test_queue_default_is_official_and_cut_to_small_data():
    assert resolve_queue_size(RefineConfig(), 1_281_167) == 65536
    assert resolve_queue_size(RefineConfig(), 1347) == 1347
    assert resolve_queue_size(RefineConfig(queue_size=256), 1347) == 256


# ---------------------------------------------------------------------------------------------------- EMA

# the default EMA as run_refine resolves it for a full stage of official length
OFFICIAL_LENGTH = RefineConfig(ema_decay=resolve_ema_decay(RefineConfig(), OFFICIAL_FULL_STEPS))


def test_ema_decay_is_constant_from_the_first_update_without_warmup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    w0 = [p.detach().clone() for p in model.parameters()]
    ema = make_ema(model, OFFICIAL_LENGTH)
    history = [w0]
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        history.append([p.detach().clone() for p in model.parameters()])
        ema.update(model)
    # ema_callback.py: a copy at the start, then ema = 0.9999 ema + 1e-4 w after each update, from the first
    for i, param in enumerate(ema.module.parameters()):
        expected = history[0][i].double()
        for weights in history[1:]:
            expected = 0.9999 * expected + 1e-4 * weights[i].double()
        assert torch.allclose(param.double(), expected, atol=1e-6), i
        assert not torch.allclose(param, history[-1][i])


def test_ema_warmup_option_keeps_timms_schedule():
    model = nn.Linear(4, 4)
    ema = make_ema(model, RefineConfig(ema_warmup=True, ema_decay=OFFICIAL_LENGTH.ema_decay))
    assert ema.use_warmup
    assert [ema.get_decay(step) for step in (0, 1)] == [0.0, 0.0]
    assert ema.get_decay(37530) == pytest.approx(1 - 37530 ** (-2 / 3), rel=1e-9)   # 0.99911: issue 10's example
    assert ema.get_decay(10 ** 9) == 0.9999
    assert make_ema(model, OFFICIAL_LENGTH).get_decay() == 0.9999
