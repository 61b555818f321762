"""The NNA refinement trainer (MIM-Refiner, arXiv 2402.10093): `run_refine` reads inputs, trains, writes artefacts.

Stage 1 trains the heads on a frozen encoder (nearest neighbour = top-1; the official stage 2); stage 2 trains
everything but the frozen first blocks with layer-wise lr decay, an EMA of the encoder, and neighbours drawn
uniformly from the top-k (the official stage 3). Each stage has its own lr schedule (`config.stage_lr`).
The same function runs alone or under ``torchrun`` (one process per device; only rank 0 writes files).

Exactness: the data order is a function of (seed, epoch), each sample's augmentations of (seed, epoch, index),
the neighbour picks of (seed, step, rank, head), and the learning rate of the step; so a run stopped at any step
(SIGTERM or an epoch's checkpoint) and resumed ends with the same weights as an uninterrupted one (CPU, fixed
thread count).
"""

from __future__ import annotations

import json
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn as nn

from .._device import resolve_device, resolve_precision
from .._messages import progress_display, status_logger
from .._versions import software_versions
from .._ranks import barrier
from .._run_folder import CsvLog, epoch_snapshots, prepare_run_folder
from ..errors import BadInputError
from .augment import MultiViewDataset, MultiViewTransform, ViewConfig
from .checkpoint import CHECKPOINT, EXPORT, EXPORT_INFO, export_encoder, load_training_state, save_training_state
from .config import RefineConfig
from .schedules import (OFFICIAL_EMA_DECAY, OFFICIAL_EMA_SHARE, OFFICIAL_EMA_SOURCE, OFFICIAL_FULL_STEPS,
                        OFFICIAL_FULL_STEPS_SOURCE, OFFICIAL_QUEUE_SIZE, WARMUP_MAX_SHARE, StagePlan,
                        ema_progress_warning, ema_scaling_note, resolve_ema_decay, resolve_queue_size,
                        warmup_steps)
from .distributed import DistContext, any_process, convert_batchnorm, init_distributed
from .heads import HeadConfig
from .monitor import KnnMonitor
from .network import RefineNetwork
from .optim import frozen_in_full_stage
from .queue import NNQueue
from .engine import FORMAT_VERSION, Trainer
from .sizing import ScaledDefault, checkpoint_bytes, head_scaling, local_scaling, resolve_head_dims, size_note

CONFIG_FILE = "config.json"
LOG_FILE = "log.csv"
MONITOR_FILE = "monitor.csv"
RUN_FILES = (CONFIG_FILE, LOG_FILE, MONITOR_FILE, CHECKPOINT, EXPORT, EXPORT_INFO, "placement.json")
RESUMABLE_CHANGES = ("save_every",)           # options a --resume may change: they leave the training as it was
SNAPSHOT = "checkpoint-{epoch}.safetensors"   # --save-every: the exported encoder after an epoch (1-based)
TIMED_STEPS = 3           # the step time is reported after this many steps of each stage


@dataclass
class RefineResult:
    """What a refinement produced."""

    out: Path
    export: Path | None
    steps: int
    epochs_done: int
    seconds: float
    last_loss: float | None
    head_blocks: tuple[int, ...]
    stopped_early: bool = False
    monitor: list[dict[str, Any]] | None = None
    ema_progress: float | None = None   # |ema - start| / |trained - start| over the encoder (`ema_progress`)

    def summary(self) -> dict[str, Any]:
        return {"out": str(self.out), "export": str(self.export) if self.export else None, "steps": self.steps,
                "epochs_done": self.epochs_done, "seconds": round(self.seconds, 2), "last_loss": self.last_loss,
                "head_blocks": list(self.head_blocks), "stopped_early": self.stopped_early,
                "ema_progress": self.ema_progress, "monitor": self.monitor or []}


# ---------------------------------------------------------------------------------------------------------- setup

def _check_token_model(encoder: nn.Module, name: str) -> None:
    """Refuse models whose blocks give spatial maps (Hiera, ConvNeXt, Swin, SAM-ViT): the NNA heads read each
    block's CLS token (MIM-Refiner, arXiv 2402.10093), which only ViT token models have."""
    from ..models.families import block_layout

    if block_layout(encoder, name).output != "tokens":
        raise BadInputError(f"refine supports ViT token models only: {name} ({type(encoder).__name__}) has "
                            "hierarchical or windowed blocks that give spatial maps, and the NNA heads are defined "
                            "on each block's CLS token; profile it with `mimprobe profile` instead")


def resolve_placement(placement: Any):
    """A `Placement` from a placement.json path or a `Placement` (``refine --auto`` places first:
    `mimprobe.pipeline.api.refine`)."""
    from ..placement import Placement, load_placement

    if isinstance(placement, Placement):
        return placement
    if placement is None:
        raise BadInputError("no placement: pass --placement FILE (from `mimprobe place PROFILE`) or --auto "
                            "(profile the model, then place the heads)")
    return load_placement(placement)


def _check_placement(placement, num_blocks: int, model: str) -> None:
    bad = [b for b in placement.head_blocks if not 0 <= b < num_blocks]
    if bad:
        raise BadInputError(f"the placement puts a head on block {bad[0]}, but {model} has {num_blocks} blocks "
                            f"(0-{num_blocks - 1}): place again for this model")
    if placement.num_blocks != num_blocks:
        raise BadInputError(f"the placement was made for a model with {placement.num_blocks} blocks, {model} has "
                            f"{num_blocks}: place again from this model's profile")


def _check_sizes(config: RefineConfig, n_train: int, ctx: DistContext) -> int:
    """Per-process micro-batch size, after checking the batch against the data and the process count."""
    if config.queue_size > n_train:
        raise BadInputError(f"--queue-size {config.queue_size} is larger than the training set ({n_train} images): "
                            f"use at most {n_train}")
    if config.batch_size > n_train:
        raise BadInputError(f"--batch-size {config.batch_size} is larger than the training set ({n_train} images)")
    if config.batch_size % (ctx.ranks.world_size * config.accumulate):
        raise BadInputError(f"--batch-size {config.batch_size} must divide by processes x --accumulate "
                            f"({ctx.ranks.world_size} x {config.accumulate})")
    micro = config.batch_size // (ctx.ranks.world_size * config.accumulate)
    if micro < 2:
        raise BadInputError(f"each micro-batch would hold {micro} image(s): the NNA loss needs at least 2 per "
                            "process, raise --batch-size or lower --accumulate")
    return micro


# ----------------------------------------------------------------------------------------------------- the loop

@contextmanager
def _sigterm_flag() -> Iterator[dict[str, bool]]:
    """Record SIGTERM instead of dying, so the loop can checkpoint and stop after the current step."""
    flag = {"stop": False}

    def handler(_signum, _frame):
        flag["stop"] = True

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: no handler
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return progress_display(  # plain periodic lines when the output is not a terminal
        lambda console: Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                         TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[ips]} img/s"),
                         TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not enabled,
                         transient=False),
        enabled=enabled)


def run_refine(model: str, data: str, *, out: str | Path, config: RefineConfig | None = None,
               checkpoint: str | None = None, pretrained: bool = False, model_kwargs: dict[str, Any] | None = None,
               placement: Any = None,
               freeze: int | float | None = None,
               device: str = "auto",
               resume: bool = False, overwrite: bool = False, progress: bool = True,
               stop_after_steps: int | None = None, log: Callable[[str], None] | None = None) -> RefineResult:
    """Refine a ViT with NNA heads on the placement's blocks and export the EMA encoder as a timm state dict.

    Args:
        model: timm model name.
        data: Data spec (`mimprobe.data.load_data`); its ``train`` split is trained on, labels unused (except by
            the optional k-NN monitor).
        out: Run folder: config.json, placement.json, log.csv, monitor.csv, checkpoint-last.pth,
            refined.safetensors and refined.json.
        config: Training options (`RefineConfig`); ``head_blocks``/``freeze_blocks`` come from the placement.
        checkpoint, pretrained, model_kwargs: The starting weights (`mimprobe.models.load_model`).
        placement: A placement.json path or a `Placement` (``mimprobe.refine(auto=True)`` profiles and places
            first).
        freeze: First blocks to freeze (a count, or a fraction of the depth), overriding the placement's.
        device: auto, cpu or cuda (under torchrun each process takes cuda:LOCAL_RANK).
        resume: Continue from ``out/checkpoint-last.pth`` with the same options.
        overwrite: Start again in an ``out`` that holds another run.
        stop_after_steps: Stop (with a checkpoint) after this many optimiser steps in total, as SIGTERM does.
        log: Receives one-line messages (default: stderr on rank 0 when ``progress``).

    Raises:
        BadInputError: Bad options, a placement that does not fit the model, a queue larger than the data, an
            unreadable checkpoint, an ``out`` that holds another run.
    """

    from ..data import load_data
    from ..models import load_model

    config = config or RefineConfig()
    out = Path(out)
    ctx = init_distributed(resolve_device(device))
    say = status_logger(log, progress=progress and ctx.ranks.is_main)
    loaded = load_model(model, checkpoint=checkpoint, pretrained=pretrained, img_size=config.img_size,
                        init_seed=config.seed, model_kwargs=model_kwargs)
    _check_token_model(loaded.model, model)
    prepare_run_folder(out, run_files=RUN_FILES + epoch_snapshots(out), checkpoint=CHECKPOINT, what="refinement run", resume=resume,
                       overwrite=overwrite, create=ctx.ranks.is_main)
    barrier(ctx.ranks)
    started = time.perf_counter()

    placement = resolve_placement(placement)
    encoder = loaded.model
    num_blocks = len(encoder.blocks)
    _check_placement(placement, num_blocks, model)
    if freeze is not None:
        from ..placement.rules import freeze_count

        freeze = freeze_count(freeze, num_blocks)
    else:
        freeze = config.freeze_blocks or placement.freeze_blocks
    if freeze >= min(placement.head_blocks) + 1 and freeze > 0:
        raise BadInputError(f"--freeze {freeze} freezes block {freeze - 1}, which carries a head: freeze fewer "
                            "blocks than the first head block")
    from dataclasses import replace

    config = replace(config, head_blocks=tuple(placement.head_blocks), freeze_blocks=freeze)

    source = load_data(data)
    if "train" not in source.splits:
        raise BadInputError(f"{data} has no train split to refine on")
    train_split = source.splits["train"]
    requested_queue = config.queue_size
    queue_size = resolve_queue_size(config, len(train_split))
    if config.topk > queue_size:  # the default queue, cut to a small training set (a given one: RefineConfig)
        raise BadInputError(f"--topk {config.topk} is larger than the neighbour queue ({queue_size}: the training set "
                            f"of {len(train_split)} images): use --topk {queue_size} or less")
    config = replace(config, queue_size=queue_size)
    micro = _check_sizes(config, len(train_split), ctx)
    precision = resolve_precision(config.precision, ctx.device)

    # the preprocessing the starting weights call for (their checkpoint family's, or recorded by mimprobe)
    data_config, _ = loaded.eval_data_config(img_size=config.img_size)
    img_size = int(data_config["input_size"][-1])
    patch = encoder.patch_embed.patch_size
    patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    if config.local_crops and not getattr(encoder, "dynamic_img_size", False):
        encoder = _with_dynamic_size(loaded, config.img_size)
    start_weights = {name: param.detach().to("cpu", copy=True) for name, param in encoder.named_parameters()}
    views = MultiViewTransform(ViewConfig(img_size=img_size, mean=tuple(data_config["mean"]),
                                          std=tuple(data_config["std"]), local_crops=config.local_crops,
                                          local_size=config.local_size, local_scale=config.local_scale,
                                          global_scale=(config.global_scale_min, 1.0)), patch_size=patch_size)
    dataset = MultiViewDataset(train_split, views, seed=config.seed)

    # defaults resolved for this run (None in RefineConfig), each recorded with its rule and source
    scaled: list[ScaledDefault | None] = [local_scaling(config, views.local_size, img_size=img_size,
                                                        patch_size=patch_size)]
    dims = resolve_head_dims(config, embed_dim=encoder.embed_dim, img_size=img_size, device_type=ctx.device.type)
    scaled.append(head_scaling(config, dims, embed_dim=encoder.embed_dim, img_size=img_size,
                               device_type=ctx.device.type))
    requested_ema = config.ema_decay
    config = replace(config, head_dims=tuple(dims))

    head_config = HeadConfig(config.head_hidden_dim, config.head_proj_dim, config.head_predictor_dim,
                             init=config.head_init)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # the same heads in every process and every run of the same options
        network = RefineNetwork(encoder, list(config.head_blocks), head_config)
    if ctx.ranks.distributed:
        convert_batchnorm(network.heads, ctx.device)
    network.to(ctx.device)
    queues = nn.ModuleDict({str(b): NNQueue(config.queue_size, config.head_proj_dim)
                            for b in config.head_blocks}).to(ctx.device)

    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(len(dataset)), num_replicas=ctx.ranks.world_size, rank=ctx.ranks.rank, shuffle=True,
                                 seed=config.seed, drop_last=True)
    per_process = micro * config.accumulate
    steps_per_epoch = len(sampler) // per_process
    if steps_per_epoch < 1:
        raise BadInputError(f"--batch-size {config.batch_size} leaves no full batch per epoch for "
                            f"{len(dataset)} images on {ctx.ranks.world_size} process(es): lower it")
    plan = StagePlan(steps_per_epoch=steps_per_epoch, epochs_heads=config.epochs_heads, epochs=config.epochs)
    full_steps = plan.epochs * steps_per_epoch
    ema_note = ema_scaling_note(config, full_steps)
    config = replace(config, ema_decay=resolve_ema_decay(config, full_steps))
    if ema_note is not None:
        scaled.append(ScaledDefault("ema_decay", config.ema_decay, OFFICIAL_EMA_DECAY,
                                    f"time constant 1/(1 - decay) = {OFFICIAL_EMA_SHARE:.4f} x the {full_steps} "
                                    f"full-stage steps, the official 10,000 of {OFFICIAL_FULL_STEPS:,} "
                                    "(--ema-decay sets it)",
                                    f"{OFFICIAL_EMA_SOURCE}; {OFFICIAL_FULL_STEPS_SOURCE}"))
    scaled_defaults = [record for record in scaled if record is not None]
    trained_encoder_params = sum(param.numel() for name, param in encoder.named_parameters()
                                 if not frozen_in_full_stage(name, config.freeze_blocks))
    sizes = checkpoint_bytes(encoder, network.heads, queues, trained_encoder_params=trained_encoder_params,
                             full_stage=plan.epochs > 0)

    identity = {"model": loaded.identity(), "data": {"spec": str(data), "fingerprint": source.fingerprint,
                                                     "train_images": len(train_split)},
                "world_size": ctx.ranks.world_size}
    resolved = {"format_version": FORMAT_VERSION, "config": config.to_dict(), **identity,
                "placement": placement.to_dict(), "precision": precision, "device": str(ctx.device),
                "img_size": img_size, "steps_per_epoch": steps_per_epoch, "total_steps": plan.total_steps,
                "scaled": {record.field: record.to_dict() for record in scaled_defaults},
                "expected_bytes": {"checkpoint": sizes["checkpoint"], "export": sizes["export"]},
                "versions": software_versions()}

    state = None
    if resume:
        state = load_training_state(out / CHECKPOINT)
        _check_resume(state, resolved)
    elif ctx.ranks.is_main:
        (out / CONFIG_FILE).write_text(json.dumps(resolved, indent=2) + "\n")
        (out / "placement.json").write_text(json.dumps(placement.to_dict(), indent=1) + "\n")

    step_columns = ["step", "stage", "epoch", "loss", *[f"loss_block{b}" for b in config.head_blocks], "lr",
                    "images_per_second", "seconds", "ema_progress"]
    step_log = CsvLog(out / LOG_FILE, step_columns, enabled=ctx.ranks.is_main)
    monitor_log = CsvLog(out / MONITOR_FILE, ["step", "epoch", "stage", "encoder", "block", "knn_top1"],
                         enabled=ctx.ranks.is_main)

    trainer = Trainer(network=network, queues=queues, config=config, plan=plan, ctx=ctx, precision=precision,
                       dataset=dataset, sampler=sampler, micro=micro, start_weights=start_weights)
    if state is not None:
        trainer.load_state(state)
        step_log.truncate_after(trainer.step)
        monitor_log.truncate_after(trainer.step)
        say(f"resuming at step {trainer.step} (epoch {trainer.epoch}, batch {trainer.batch_in_epoch})")
    if loaded.weights == "random":
        say("weights: random init (seeded): no --checkpoint or --pretrained was given")
    say(f"refining {model} on {source.summary()}: heads on blocks {list(config.head_blocks)} "
        f"({placement.rule} rule), {config.freeze_blocks} frozen blocks, {plan.total_steps} steps "
        f"({config.epochs_heads} heads-only + {config.epochs} full epochs of {steps_per_epoch}), "
        f"{ctx.ranks.world_size} process(es) on {ctx.device}, {precision}")
    for note in _small_data_notes(config, plan, requested_queue):
        say(note)
    for record in scaled_defaults:
        say(ema_note if record.field == "ema_decay" else
            f"{record.field}: {record.value} (official {record.official}, {record.source}): {record.rule}")
    if requested_ema is None and ema_note is None and full_steps:
        say(f"EMA: the official decay {OFFICIAL_EMA_DECAY} ({OFFICIAL_EMA_SOURCE}), the full stage being as long as "
            f"the official one ({full_steps:,} >= {OFFICIAL_FULL_STEPS:,} steps)")
    say(size_note(sizes, head_params=sum(p.numel() for p in network.heads.parameters()),
                  encoder_params=sum(p.numel() for p in encoder.parameters())))

    monitor = KnnMonitor(source, data_config, config, ctx) if config.monitor_images and source.labelled else None
    def snapshot(epoch: int) -> None:  # --save-every: the encoder after this epoch, as refined.safetensors is
        _export(trainer, out=out, loaded=loaded, img_size=img_size, data_config=data_config,
                head_blocks=config.head_blocks, name=SNAPSHOT.format(epoch=epoch))

    stopped, last_loss, monitor_rows = _train(trainer, plan=plan, config=config, ctx=ctx, out=out, resolved=resolved,
                                              logs=(step_log, monitor_log), monitor=monitor, say=say,
                                              progress=progress, stop_after_steps=stop_after_steps,
                                              snapshot=snapshot)
    barrier(ctx.ranks)

    progress_value = _record_ema_progress(trainer, out=out, resolved=resolved, say=say) if ctx.ranks.is_main \
        else None
    export = None
    if not stopped and ctx.ranks.is_main:
        export = _export(trainer, out=out, loaded=loaded, img_size=img_size, data_config=data_config,
                         head_blocks=config.head_blocks)
        say(f"wrote {export} ({'EMA ' if trainer.ema is not None else ''}encoder, timm names)")
    return RefineResult(out=out, export=export, steps=trainer.step, epochs_done=trainer.epoch,
                        seconds=time.perf_counter() - started, last_loss=last_loss,
                        head_blocks=tuple(config.head_blocks), stopped_early=stopped, monitor=monitor_rows,
                        ema_progress=progress_value)


def _train(trainer: Trainer, *, plan: StagePlan, config: RefineConfig, ctx: DistContext, out: Path,
           resolved: dict[str, Any], logs: tuple[CsvLog, CsvLog], monitor: KnnMonitor | None,
           say: Callable[[str], None], progress: bool, stop_after_steps: int | None,
           snapshot: Callable[[int], None]) -> tuple[bool, float | None, list[dict[str, Any]]]:
    """Run the remaining epochs: log every step, checkpoint every epoch (and with ``save_every``, export the encoder
    through ``snapshot``), stop (with a checkpoint) on SIGTERM in any process or after ``stop_after_steps``.
    Returns (stopped early, last loss, the k-NN monitor's rows)."""
    step_log, monitor_log = logs
    stopped = False
    last_loss = None
    monitor_rows: list[dict[str, Any]] = []
    timed: dict[int, list[float]] = {}
    with _sigterm_flag() as flag, _progress(progress and ctx.ranks.is_main) as bar:
        task = bar.add_task("refine", total=plan.total_steps, completed=trainer.step, loss="--", lr="--", ips="--")
        while trainer.epoch < plan.epochs_heads + plan.epochs:
            for record in trainer.run_epoch():
                last_loss = record["loss"]
                step_log.write(record)
                note = _step_time_note(timed, record, plan, config.batch_size)
                if note:
                    say(note)
                bar.update(task, completed=trainer.step, description=f"stage {record['stage']} ep {record['epoch']}",
                           loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                           ips=f"{record['images_per_second']:,.0f}")
                wants_stop = flag["stop"] or (stop_after_steps is not None and trainer.step >= stop_after_steps)
                if any_process(wants_stop, ctx.device):
                    stopped = True
                    break
            if not stopped:
                trainer.end_epoch()
            if ctx.ranks.is_main:
                save_training_state(out / CHECKPOINT, trainer.state_dict(resolved))
                last_epoch = trainer.epoch == plan.epochs_heads + plan.epochs
                if not stopped and config.save_every and (trainer.epoch % config.save_every == 0 or last_epoch):
                    snapshot(trainer.epoch)
            if stopped:
                say(f"stopped at step {trainer.step}; checkpoint saved to {out / CHECKPOINT}: rerun with --resume")
                break
            if monitor is not None:
                rows = monitor.run(trainer, epoch=trainer.epoch - 1)
                monitor_rows += rows
                for row in rows:
                    monitor_log.write(row)
                say("k-NN monitor, epoch {}: {}".format(
                    trainer.epoch - 1, ", ".join(f"block {r['block']} {100 * r['knn_top1']:.1f} %" for r in rows)))
    return stopped, last_loss, monitor_rows


def _record_ema_progress(trainer: Trainer, *, out: Path, resolved: dict[str, Any],
                         say: Callable[[str], None]) -> float | None:
    """Say how far the exported EMA moved (`optim.ema_progress`), warn when too little, and add it to config.json
    (None without an EMA: a heads-only run)."""
    if trainer.ema is None:
        return None
    value = trainer.ema_progress()
    say(f"ema_progress: {value:.3f} (|ema - start| / |trained - start| over the encoder's parameters)"
        if value is not None else "ema_progress: - (the trained encoder did not move)")
    warning = ema_progress_warning(value)
    if warning:
        say(warning)
    written = json.loads((out / CONFIG_FILE).read_text()) if (out / CONFIG_FILE).is_file() else resolved
    (out / CONFIG_FILE).write_text(json.dumps({**written, "ema_progress": value}, indent=2) + "\n")
    return value


def _export(trainer: Trainer, *, out: Path, loaded: Any, img_size: int, data_config: dict[str, Any],
            head_blocks: tuple[int, ...], name: str = EXPORT) -> Path:
    """Write refined.safetensors (the EMA encoder after stage 2, else the encoder) and refined.json: how it was made
    and how to load it; or, under another ``name``, an epoch's snapshot alone (`SNAPSHOT`)."""
    info = {"model": loaded.name, "img_size": img_size, "model_kwargs": loaded.model_kwargs,
            "base_weights": loaded.identity(), "encoder": "ema" if trainer.ema is not None else "encoder",
            "head_blocks": list(head_blocks), "steps": trainer.step, "data_config": data_config,
            "load_with": {"mimprobe": f"mimprobe extract {loaded.name} DATA --img-size {img_size} "
                                      f"--checkpoint {out / EXPORT}",
                          "timm": f"timm.create_model('{loaded.name}', pretrained=True, num_classes=0, "
                                  f"img_size={img_size}, pretrained_cfg_overlay=dict(file='{out / EXPORT}'))"},
            "versions": software_versions()}
    return export_encoder(trainer.export_state_dict(), out, info, name=name, with_info=name == EXPORT)


def _step_time_note(timed: dict[int, list[float]], record: dict[str, Any], plan: StagePlan,
                    batch_size: int) -> str | None:
    """After the first `TIMED_STEPS` steps of a stage (fewer in a shorter stage), one line with the measured step
    time and what it implies for the stage; ``timed`` collects the seconds per stage across calls."""
    stage = record["stage"]
    stage_steps = plan.heads_steps if stage == 1 else plan.total_steps - plan.heads_steps
    seconds = timed.setdefault(stage, [])
    if len(seconds) >= min(TIMED_STEPS, stage_steps):
        return None
    seconds.append(float(record["seconds"]))
    if len(seconds) < min(TIMED_STEPS, stage_steps):
        return None
    per_step = float(np.median(seconds))
    name = "heads-only" if stage == 1 else "full"
    return (f"{name} stage: {per_step:.2f} s per step ({batch_size / per_step:,.1f} img/s, median of its first "
            f"{len(seconds)} steps): about {per_step * stage_steps / 60:,.1f} min for its {stage_steps:,} steps")


def _small_data_notes(config: RefineConfig, plan: StagePlan, requested_queue: int | None) -> list[str]:
    """One line per default that the data made smaller than the official recipe's (see `RefineConfig`)."""
    notes = []
    if requested_queue is None and config.queue_size < OFFICIAL_QUEUE_SIZE:
        notes.append(f"queue: {config.queue_size} per head, the training set (official {OFFICIAL_QUEUE_SIZE})")
    if config.warmup_fraction is None:
        for name, epochs in (("heads-only", plan.epochs_heads), ("full", plan.epochs)):
            steps = warmup_steps(config, stage_epochs=epochs, steps_per_epoch=plan.steps_per_epoch)
            if epochs and steps < round(config.warmup_epochs * plan.steps_per_epoch):
                notes.append(f"warmup of the {epochs}-epoch {name} stage: {steps} steps (at most "
                             f"{WARMUP_MAX_SHARE:.0%} of it), not {config.warmup_epochs:g} epochs")
    return notes


def _with_dynamic_size(loaded, img_size: int | None) -> nn.Module:
    """The same weights in a model that accepts local crops of another size (timm ``dynamic_img_size``)."""
    import timm

    from ..models.loading import resolve_model_kwargs

    kwargs = {**resolve_model_kwargs(loaded.model_kwargs), "dynamic_img_size": True}
    if img_size is not None:
        kwargs["img_size"] = img_size
    model = timm.create_model(loaded.name.split(".")[0], pretrained=False, **{"num_classes": 0, **kwargs})
    model.load_state_dict(loaded.model.state_dict(), strict=True)
    return model


def _check_resume(state: dict[str, Any], resolved: dict[str, Any]) -> None:
    if state.get("format_version") != FORMAT_VERSION:
        raise BadInputError("the checkpoint was written by another mimprobe version: start a new --out")
    saved = state["resolved"]
    saved = {**saved, "config": {k: v for k, v in saved["config"].items() if k not in RESUMABLE_CHANGES}}
    resolved = {**resolved, "config": {k: v for k, v in resolved["config"].items() if k not in RESUMABLE_CHANGES}}
    for section in ("config", "model", "data", "world_size", "precision"):
        if saved.get(section) != resolved.get(section):
            if section == "config":
                differ = sorted(k for k in resolved["config"] if saved["config"].get(k) != resolved["config"][k])
                detail = ", ".join(f"{k}: {saved['config'].get(k)!r} -> {resolved['config'][k]!r}" for k in differ)
            else:
                detail = f"{saved.get(section)!r} -> {resolved.get(section)!r}"
            raise BadInputError(f"--resume with other {section} than the checkpoint ({detail}): rerun with the "
                                "original options, or start a new --out")
