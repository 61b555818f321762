"""`run_pretrain_mae`: MAE pre-training of a timm ViT on a mimprobe data source, with a per-step log, a checkpoint
every epoch, exact resume, and an export in the official MAE checkpoint layout.

Recipe of the official pre-training script (facebookresearch/mae ``main_pretrain.py``, arXiv 2111.06377):
RandomResizedCrop(scale 0.2–1, bicubic) + horizontal flip, mask ratio 0.75, normalised-pixel loss, AdamW
(0.9, 0.95) with weight decay 0.05, lr = 1.5e-4 × batch / 256, linear warmup then half-cycle cosine per step.
Only the ``train`` split of the data is used (MAE needs no labels; unlabelled folders work).

Files in ``out``: ``config.json`` (resolved configuration, model identity, data, versions, result), ``log.csv``
(step, epoch, loss, lr, images_per_second), ``checkpoint-last.pth`` (model + decoder in the MAE layout under
``model``, optimizer, step, epoch, RNG states, config) and, at the end, ``mae.pth`` = ``{"model": state_dict}``
plus ``data_config``, the normalisation it was trained with (profiling the file reuses it). With ``save_every`` N,
also ``checkpoint-{epoch}.pth`` after every N-th epoch and after the last one: ``mae.pth``'s layout plus ``epoch`` and
``step`` (no optimizer), the series that ``mimprobe profile MODEL DATA --checkpoint OUT`` profiles epoch by epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from .._device import autocast, resolve_device, resolve_precision
from .._messages import progress_display, status_logger
from .._versions import software_versions
from ..data import DataSource, Split, SplitDataset, load_data
from ..errors import BadImageError, BadInputError, CheckpointError, MimprobeError
from .._disk import replaced_atomically, tensor_bytes
from .._run_folder import CsvLog, epoch_snapshots, prepare_run_folder, write_json_atomic
from ..models import LoadedModel, load_model, read_checkpoint, strip_prefixes, unwrap_checkpoint
from .config import MaeConfig
from ..options import build_config
from .mae import MaskedAutoencoder, num_visible

CONFIG_FILE = "config.json"
LOG_FILE = "log.csv"
CHECKPOINT_FILE = "checkpoint-last.pth"
EXPORT_FILE = "mae.pth"
RUN_FILES = (CONFIG_FILE, LOG_FILE, CHECKPOINT_FILE, EXPORT_FILE)
LOG_COLUMNS = ("step", "epoch", "loss", "lr", "images_per_second")
SPLIT = "train"
# options that may change between a run and its resumption (they do not change what is trained)
RESUMABLE_CHANGES = ("device", "precision", "workers", "save_every")
EPOCH_CHECKPOINT = "checkpoint-{epoch}.pth"   # `save_every`: the weights after an epoch (1-based)


@dataclass
class PretrainResult:
    """What `run_pretrain_mae` did."""

    out: Path
    export: Path                      # mae.pth
    model: str
    data: str
    img_size: int
    epochs: int                       # epochs completed (all calls)
    steps: int                        # optimizer steps completed (all calls)
    steps_per_epoch: int
    epoch_losses: list[float]         # mean training loss of every completed epoch
    resumed: bool
    seconds: float = 0.0              # training time of this call
    epochs_this_call: int = 0
    images_this_call: int = 0
    messages: list[str] = field(default_factory=list)

    @property
    def seconds_per_epoch(self) -> float | None:
        return self.seconds / self.epochs_this_call if self.epochs_this_call else None

    def profile_command(self) -> str:
        """The command that profiles the exported checkpoint block by block."""
        return (f"mimprobe profile {self.model} {self.data} --checkpoint {self.export} --img-size {self.img_size} "
                f"--out {self.out / 'profile'}")

    def summary(self) -> dict[str, Any]:
        return {
            "out": str(self.out), "export": str(self.export), "model": self.model, "data": self.data,
            "img_size": self.img_size, "epochs": self.epochs, "steps": self.steps,
            "steps_per_epoch": self.steps_per_epoch, "epoch_losses": [round(x, 6) for x in self.epoch_losses],
            "resumed": self.resumed, "seconds": round(self.seconds, 3), "epochs_this_call": self.epochs_this_call,
            "seconds_per_epoch": round(self.seconds_per_epoch, 3) if self.seconds_per_epoch else None,
            "images_per_second": round(self.images_this_call / self.seconds, 2) if self.seconds > 0 else None,
            "profile_command": self.profile_command(),
        }


def mae_lr(step: int, *, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0) -> float:
    """Learning rate of a step (0-based): linear warmup from 0, then half-cycle cosine to ``min_lr``
    (official ``util/lr_sched.adjust_learning_rate``, evaluated per step instead of per fractional epoch)."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_train_transform(data_config: dict[str, Any], *, crop_scale: tuple[float, float] = (0.2, 1.0)):
    """The MAE pre-training augmentation: RandomResizedCrop (bicubic) + horizontal flip + normalise with the
    model's mean and std (official ``main_pretrain.py``). Accepts PIL images and float (C, H, W) tensors in [0, 1].

    Returns:
        A torchvision.transforms.v2 transform giving (3, S, S) float32 with S = ``data_config['input_size'][-1]``.
    """
    from torchvision.transforms import v2

    size = int(data_config["input_size"][-1])
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=tuple(crop_scale), interpolation=v2.InterpolationMode.BICUBIC,
                             antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(data_config["mean"]), std=list(data_config["std"])),
    ])


def _validate(config: MaeConfig) -> None:
    if not 0.0 < config.mask_ratio < 1.0:
        raise BadInputError(f"--mask-ratio must be between 0 and 1, exclusive (got {config.mask_ratio}); "
                            "MAE uses 0.75")
    checks = [
        (config.batch_size >= 2, f"--batch-size must be at least 2 (got {config.batch_size})"),
        (config.epochs >= 1, f"--epochs must be at least 1 (got {config.epochs})"),
        (config.img_size is None or config.img_size >= 1, f"--img-size must be positive (got {config.img_size})"),
        (config.lr is None or config.lr > 0, f"--lr must be positive (got {config.lr})"),
        (config.base_lr > 0, f"base lr must be positive (got {config.base_lr})"),
        (config.warmup_epochs >= 0, f"--warmup-epochs must be 0 or more (got {config.warmup_epochs})"),
        (config.workers >= 0, f"--workers must be 0 or more (got {config.workers})"),
        (config.decoder_depth >= 0, f"--decoder-depth must be 0 (a linear head) or more (got {config.decoder_depth})"),
        (config.decoder_depth == 0 or config.decoder_heads >= 1 and config.decoder_dim >= 4
         and config.decoder_dim % 4 == 0 and config.decoder_dim % config.decoder_heads == 0,
         f"--decoder-dim ({config.decoder_dim}) must be a multiple of 4 and of --decoder-heads ({config.decoder_heads})"),
        (0 < config.crop_scale[0] <= config.crop_scale[1] <= 1, f"crop scale {config.crop_scale} must lie in (0, 1]"),
    ]
    for ok, message in checks:
        if not ok:
            raise BadInputError(message)


def _config_dict(config: MaeConfig) -> dict[str, Any]:
    return {key: (list(value) if isinstance(value, tuple) else value) for key, value in asdict(config).items()}


def _check_size(mae_grid: tuple[int, int], patch_size: int, img_size: int, mask_ratio: float) -> None:
    num_patches = mae_grid[0] * mae_grid[1]
    keep = num_visible(num_patches, mask_ratio)
    if not 0 < keep < num_patches:
        raise BadInputError(f"--img-size {img_size} gives {num_patches} patches of {patch_size} px, and mask ratio "
                            f"{mask_ratio} keeps {keep} of them: use a larger --img-size or another --mask-ratio")


def _build_encoder(model: str | LoadedModel, *, checkpoint: str | None, config: MaeConfig) -> LoadedModel:
    loaded = model if isinstance(model, LoadedModel) else load_model(
        model, checkpoint=checkpoint, img_size=config.img_size, init_seed=config.seed)
    encoder = loaded.model
    patch = getattr(getattr(encoder, "patch_embed", None), "patch_size", None)
    if config.img_size is not None and patch is not None:
        built_for = tuple(encoder.patch_embed.img_size)
        if built_for != (config.img_size, config.img_size):
            raise BadInputError(f"model {loaded.name} was built for {built_for} px but img_size is {config.img_size}: "
                                "load it with the same img_size")
        if config.img_size % patch[0] or config.img_size % patch[1]:
            raise BadInputError(f"--img-size {config.img_size} is not divisible by the patch size {patch[0]} of "
                                f"{loaded.name}: use a multiple of {patch[0]}, e.g. {patch[0] * max(2, config.img_size // patch[0])}")
    if getattr(encoder, "num_classes", 0):
        encoder.reset_classifier(0)
    return loaded


def _load_decoder(mae: MaskedAutoencoder, checkpoint: str, say: Callable[[str], None]) -> None:
    """Continue a full MAE checkpoint: take its decoder and mask token too (strictly), when it has them."""
    state, _ = unwrap_checkpoint(read_checkpoint(checkpoint))
    state = strip_prefixes(state)
    decoder = {key: value for key, value in state.items() if key == "mask_token" or key.startswith("decoder_")}
    if "decoder_pred.weight" not in decoder:
        say(f"{checkpoint} has no MAE decoder: the decoder starts from a random initialisation")
        return
    expected = {key: value for key, value in mae.mae_state_dict().items()
                if key == "mask_token" or key.startswith("decoder_")}
    wrong = sorted(set(expected) ^ set(decoder)) + [
        f"{key} {tuple(decoder[key].shape)} vs {tuple(value.shape)}" for key, value in expected.items()
        if key in decoder and decoder[key].shape != value.shape]
    if wrong:
        raise CheckpointError(f"the decoder in {checkpoint} does not fit --decoder-dim/--decoder-depth/--decoder-heads "
                              f"({', '.join(wrong[:4])}): pass the decoder sizes it was trained with")
    mae.load_mae_state_dict({**mae.mae_state_dict(), **decoder})
    say(f"continuing the MAE decoder of {checkpoint}")


def _save_atomic(payload: dict[str, Any], path: Path) -> None:
    """torch.save through a temporary file: a kill or a full disk (`DiskFullError`) keeps the previous one."""
    with replaced_atomically(path, needed_bytes=tensor_bytes(payload), suffix=".tmp") as tmp:
        torch.save(payload, tmp)


def _rng_state(data_generator: torch.Generator, mask_generator: torch.Generator, device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "data": data_generator.get_state(), "mask": mask_generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, data_generator: torch.Generator, mask_generator: torch.Generator,
                   device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    data_generator.set_state(state["data"])
    mask_generator.set_state(state["mask"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _progress_bar(enabled: bool):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return progress_display(  # plain periodic lines when the output is not a terminal
        lambda console: Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                         TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} img/s"),
                         TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not enabled,
                         transient=False),
        enabled=enabled)


def run_pretrain_mae(model: str | LoadedModel, data: str | DataSource, *, out: str | Path,
                     config: MaeConfig | None = None, checkpoint: str | None = None, resume: bool = False,
                     overwrite: bool = False, progress: bool = True, log: Callable[[str], None] | None = None,
                     **options: Any) -> PretrainResult:
    """Pre-train a timm ViT as a masked autoencoder on the ``train`` split of a data source.

    Args:
        model: A timm model name (random init seeded with ``config.seed``, or ``checkpoint``), or a `LoadedModel`
            (trained in place; on ``resume`` it must be built as in the first call).
        data: A data spec for `load_data` or a `DataSource`; only its ``train`` split is used.
        out: Folder of the run's files (see the module docstring).
        config: Training options; keyword ``options`` override its fields (``epochs=2``, ``batch_size=32``).
        checkpoint: Continue from this file: its encoder (any format mimprobe reads), and its decoder when it is a
            full MAE checkpoint with the same decoder sizes.
        resume: Continue the run in ``out`` from its last epoch checkpoint; the result is the same as an
            uninterrupted run (same options, same device and number of workers).
        overwrite: Replace another run's files in ``out``.
        progress: Show a progress bar (loss, images per second) on stderr.
        log: Receives one-line status messages (default: printed to stderr when ``progress``).

    Raises:
        BadInputError: Bad options, data, model or output folder (one line saying what to fix).
    """
    config = build_config(MaeConfig, options, base=config or MaeConfig())
    _validate(config)
    messages: list[str] = []
    say = status_logger(log, progress=progress, messages=messages)

    source = data if isinstance(data, DataSource) else load_data(data)
    data_spec = str(data) if not isinstance(data, DataSource) else source.name
    split = source.splits[SPLIT]
    if len(split) < config.batch_size:
        raise BadInputError(f"the train split has {len(split)} images, fewer than --batch-size {config.batch_size}: "
                            "lower --batch-size")
    out = Path(out)
    resuming = prepare_run_folder(out, run_files=RUN_FILES + epoch_snapshots(out), checkpoint=CHECKPOINT_FILE,
                                  what="pre-training run", resume=resume, overwrite=overwrite)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(config.seed)
        return _train(model, source, data_spec, split, out=out, config=config, checkpoint=checkpoint,
                      resuming=resuming, device=device, precision=precision, progress=progress, say=say,
                      messages=messages)


def _train(model: str | LoadedModel, source: DataSource, data_spec: str, split: Split, *, out: Path,
           config: MaeConfig, checkpoint: str | None, resuming: bool, device: torch.device, precision: str,
           progress: bool, say: Callable[[str], None], messages: list[str]) -> PretrainResult:
    from timm.optim import param_groups_weight_decay

    loaded = _build_encoder(model, checkpoint=checkpoint, config=config)
    log = CsvLog(out / LOG_FILE, LOG_COLUMNS)  # a row per step; a resume drops those after its checkpoint
    loaded_pos_embed = loaded.model.pos_embed.detach().clone() if loaded.weights == "checkpoint" else None
    # the starting weights' preprocessing (a MAE release file: MAE's), else the timm model's data config
    data_config, _ = loaded.eval_data_config(img_size=config.img_size)
    img_size = int(data_config["input_size"][-1])
    try:
        mae = MaskedAutoencoder(loaded.model, decoder_dim=config.decoder_dim, decoder_depth=config.decoder_depth,
                                decoder_heads=config.decoder_heads, norm_pix_loss=config.norm_pix_loss)
    except ValueError as error:
        raise BadInputError(f"{loaded.name}: {error}") from None
    _check_size(mae.grid_size, mae.patch_size, img_size, config.mask_ratio)
    if loaded_pos_embed is not None and not resuming:
        if not torch.allclose(loaded_pos_embed, loaded.model.pos_embed, atol=1e-5):
            say(f"note: replaced the position embeddings of {loaded.checkpoint} by MAE's fixed sin-cos table")
        _load_decoder(mae, loaded.checkpoint, say)
    mae.to(device)

    steps_per_epoch = len(split) // config.batch_size
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    peak_lr = config.peak_lr()
    groups = param_groups_weight_decay(mae, weight_decay=config.weight_decay,
                                       no_weight_decay_list=mae.no_weight_decay_names())
    optimizer = torch.optim.AdamW(groups, lr=peak_lr, betas=config.betas)
    data_generator = torch.Generator().manual_seed(config.seed)
    mask_generator = torch.Generator(device=device).manual_seed(config.seed + 1)

    identity = loaded.identity()
    step, epoch, epoch_losses = 0, 0, []
    if resuming:
        state = read_checkpoint(out / CHECKPOINT_FILE)
        _check_resumable(state, config=config, identity=identity, out=out)
        mae.load_mae_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"], data_generator, mask_generator, device)
        step, epoch, epoch_losses = int(state["step"]), int(state["epoch"]), [float(x) for x in state["epoch_losses"]]
        log.truncate_after(step)
        say(f"resuming {out} after epoch {epoch} of {config.epochs} (step {step})")

    run_info = {
        "config": _config_dict(config), "model": identity, "checkpoint": loaded.checkpoint,
        "data": {"spec": data_spec, "name": source.name, "kind": source.kind, "fingerprint": source.fingerprint,
                 "split": SPLIT, "images": len(split)},
        "resolved": {"img_size": img_size, "patch_size": mae.patch_size, "grid_size": list(mae.grid_size),
                     "num_patches": mae.num_patches, "visible_patches": num_visible(mae.num_patches, config.mask_ratio),
                     "peak_lr": peak_lr, "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                     "warmup_steps": warmup_steps, "device": str(device), "precision": precision,
                     "transform": {**data_config, "train": "RandomResizedCrop(bicubic) + HorizontalFlip + Normalize",
                                   "crop_scale": list(config.crop_scale)}},
        "versions": software_versions(),
    }
    if not resuming:
        design = ("SimMIM-style pre-training (linear head, mask tokens in the encoder)" if mae.linear_head
                  else "MAE pre-training")
        say(f"{design} {loaded.name} at {img_size} px ({mae.num_patches} patches of {mae.patch_size} px, "
            f"{run_info['resolved']['visible_patches']} visible) on {source.summary()}; using the train split: "
            f"{steps_per_epoch} steps x {config.epochs} epochs, peak lr {peak_lr:.3g}")
    write_json_atomic(out / CONFIG_FILE, {**run_info, "complete": False})

    dataset = SplitDataset(split, build_train_transform(data_config, crop_scale=config.crop_scale),
                           tuple(data_config["input_size"]))
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True,
                        num_workers=config.workers, generator=data_generator, pin_memory=device.type == "cuda")
    started, images_done, epochs_done = time.perf_counter(), 0, 0
    last_step_end = started
    with _progress_bar(progress) as bar:
        task = bar.add_task("MAE", total=total_steps, completed=step, loss="--", rate="--")
        while epoch < config.epochs:
            mae.train()
            losses = []
            for images, indices, errors in loader:
                bad = next((row for row, error in enumerate(errors) if error), None)
                if bad is not None:
                    raise BadImageError(f"cannot decode image {split.describe(int(indices[bad]))} ({errors[bad]}): "
                                        "fix or remove it")
                lr = mae_lr(step, total_steps=total_steps, warmup_steps=warmup_steps, peak_lr=peak_lr,
                            min_lr=config.min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with autocast(device, precision):
                    output = mae(images.to(device, non_blocking=True), mask_ratio=config.mask_ratio,
                                 generator=mask_generator)
                loss = output.loss
                if not torch.isfinite(loss):
                    raise MimprobeError(f"the loss became {loss.item()} at step {step + 1}: lower --lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                loss_value = float(loss.item())
                losses.append(loss_value)
                now = time.perf_counter()
                rate = len(images) / max(now - last_step_end, 1e-9)  # data loading included
                last_step_end = now
                images_done += len(images)
                log.write(dict(zip(LOG_COLUMNS, (step, epoch + 1, f"{loss_value:.6f}", f"{lr:.6g}",
                                                 f"{rate:.1f}"))))
                bar.update(task, completed=step, loss=f"{loss_value:.4f}",
                           rate=f"{images_done / (time.perf_counter() - started):,.1f}")
            epoch += 1
            epochs_done += 1
            epoch_losses.append(sum(losses) / len(losses))
            if config.save_every and (epoch % config.save_every == 0 or epoch == config.epochs):
                _save_atomic({"model": mae.mae_state_dict(), "data_config": data_config, "epoch": epoch,
                              "step": step}, out / EPOCH_CHECKPOINT.format(epoch=epoch))
            _save_atomic({"model": mae.mae_state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                          "epoch": epoch, "epoch_losses": epoch_losses,
                          "rng": _rng_state(data_generator, mask_generator, device), "config": _config_dict(config),
                          "model_identity": identity, "versions": run_info["versions"]}, out / CHECKPOINT_FILE)
    seconds = time.perf_counter() - started
    export = out / EXPORT_FILE
    # data_config: the normalisation it was trained with, which `load_model` reuses to evaluate it
    _save_atomic({"model": mae.mae_state_dict(), "data_config": data_config}, export)
    result = PretrainResult(out=out, export=export, model=loaded.name, data=data_spec, img_size=img_size,
                            epochs=epoch, steps=step, steps_per_epoch=steps_per_epoch, epoch_losses=epoch_losses,
                            resumed=resuming, seconds=seconds, epochs_this_call=epochs_done,
                            images_this_call=images_done, messages=messages)
    write_json_atomic(out / CONFIG_FILE, {**run_info, "complete": True, "result": result.summary()})
    return result


def _check_resumable(state: dict[str, Any], *, config: MaeConfig, identity: dict[str, Any], out: Path) -> None:
    stored = state.get("config", {})
    current = _config_dict(config)
    differ = [f"{key}={stored.get(key)!r} (now {value!r})" for key, value in current.items()
              if key not in RESUMABLE_CHANGES and stored.get(key) != value]
    if state.get("model_identity") != identity:
        differ.append(f"model {state.get('model_identity')} (now {identity})")
    if differ:
        raise BadInputError(f"--resume: the run in {out} used other settings: {'; '.join(differ[:3])}. Rerun with "
                            "the same model and options, or use --overwrite to start again")


