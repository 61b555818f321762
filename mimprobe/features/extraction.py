"""`extract`: every chosen block of a model over a data source, in one forward pass per batch, into a
resumable FeatureStore."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from .._device import autocast, resolve_device, resolve_precision
from .._lock import exclusive_lock
from .._messages import progress_display, status_logger
from .._ranks import Ranks, all_succeeded, barrier, join, total
from .._versions import software_versions
from ..blocks import resolve_blocks
from ..data import DataSource, SplitDataset, build_eval_transform, load_data
from ..errors import BadImageError, BadInputError, MimprobeError
from ..models import LoadedModel, describe_model, load_model
from .config import ExtractConfig
from ..options import build_config
from ..models.families import block_layout
from . import progress as batch_progress
from .blockwise import BlockOutputs
from .points import PointReader, block_modules, check_points, point_width
from .pooling import pool_tokens
from .store import (FORMAT_VERSION, MANIFEST, DamagedStoreError, FeatureStore, RowWriter,
                    create_store, feature_arrays, feature_filename, store_key, write_json_atomic)


STORE_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class ExtractResult:
    """What `extract` did."""

    store: FeatureStore
    reused: bool                      # an existing complete store with the same key was reused
    resumed: bool                     # an interrupted store was continued
    images: int = 0                   # images run through the model in this call
    seconds: float = 0.0
    messages: list[str] = field(default_factory=list)
    rank: int = 0                     # this process's rank under torchrun (images: the sum over ranks)

    def summary(self) -> dict[str, Any]:
        manifest = self.store.manifest
        return {
            "store": str(self.store.path), "key": manifest["key"], "reused": self.reused, "resumed": self.resumed,
            "complete": manifest["complete"], "model": manifest["model"]["name"],
            "dataset": manifest["dataset"]["name"], "splits": manifest["dataset"]["splits"],
            "blocks": manifest["blocks"], "poolings": manifest["poolings"],
            "points": manifest.get("points", ["block"]), "feature_dims": manifest["feature_dims"],
            "dtype": manifest["dtype"], "bad_images": len(manifest["bad_images"]), "images_processed": self.images,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images / self.seconds, 2) if self.seconds > 0 and self.images else None,
        }


BatchCallback = Callable[[str, int, int], None]  # (split, rows done, rows in split)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "data"


def _check_out(out: Path) -> None:
    """Refuse an ``out`` that cannot hold stores, without writing anything (that waits for every other check)."""
    if (out / MANIFEST).exists():
        raise BadInputError(f"--out {out} is itself a feature store: give the folder that holds stores "
                            f"(e.g. {out.parent})")
    existing = next(parent for parent in (out, *out.parents) if parent.exists())
    if not existing.is_dir():
        raise BadInputError(f"cannot write to --out {out}: {existing} is a file; choose a writable folder")


def _prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out, prefix=".mimprobe-write-test-"):  # unique: runs may share out
            pass
    except OSError as error:
        raise BadInputError(f"cannot write to --out {out}: {error.strerror or error}; choose a writable folder") \
            from None


def _check_input_size(loaded: LoadedModel, data_config: dict[str, Any]) -> None:
    """The input size must be a multiple of the patch size (a ViT's patch embedding would refuse the rest or drop
    it), and a model built for a fixed input size must get images of that size (checked before any store is made)."""
    patch_embed = getattr(loaded.model, "patch_embed", None)
    built_for = getattr(patch_embed, "img_size", None)
    fixed = not getattr(loaded.model, "dynamic_img_size", False)  # position embeddings fit one grid only
    size = tuple(data_config["input_size"][1:])
    patch = getattr(patch_embed, "patch_size", None)
    if patch is not None and not getattr(patch_embed, "dynamic_img_pad", False):  # dynamic_img_pad pads the rest
        for side, step in zip(size, (patch, patch) if isinstance(patch, int) else tuple(patch)):
            if side < step or side % step:
                below, above = max(step, side // step * step), (side // step + 1) * step
                choices = f"{below} or {above}" if below < side else f"{below}"
                problem = "smaller than" if side < step else "not a multiple of"
                raise BadInputError(f"input size {side} px is {problem} the patch size {step} of {loaded.name}: "
                                    f"use --img-size {choices}")
    if built_for is not None and fixed and tuple(built_for) != size:
        raise BadInputError(f"model {loaded.name} was built for {tuple(built_for)} px input but the transform gives "
                            f"{size}: load it with img_size={size[0]} or pass the same --img-size")


def _feature_dim(structure: dict[str, Any], block: int, pooling: str) -> int:
    """Width of one block's pooled feature (twice the block's width for cls+mean)."""
    width = int(structure["block_widths"][block])
    return 2 * width if pooling == "cls+mean" else width


def _point_feature_dims(loaded: LoadedModel, structure: dict[str, Any], blocks: list[int],
                        config: ExtractConfig) -> dict[str, dict[str, dict[str, int]]]:
    """Width of every point other than ``block``, per block and pooling (the manifest's ``point_feature_dims``)."""
    modules = block_modules(loaded.model, blocks, block_layout(loaded.model, loaded.name).block_modules)
    dims = {}
    for point in config.points:
        if point == "block":
            continue
        widths = {block: point_width(modules[block], point, structure["block_widths"][block]) for block in blocks}
        dims[point] = {str(block): {p: 2 * widths[block] if p == "cls+mean" else widths[block]
                                    for p in config.poolings} for block in blocks}
    return dims


def _point_reader(loaded: LoadedModel, structure: dict[str, Any], blocks: list[int], points: tuple[str, ...],
                  poolings: tuple[str, ...]) -> PointReader:
    """The hooks that pool the points inside the chosen blocks (refused first where the blocks have none)."""
    modules = block_modules(loaded.model, blocks, block_layout(loaded.model, loaded.name).block_modules)
    check_points(loaded.name, modules, points)
    return PointReader(modules, points, poolings, num_prefix_tokens=structure["num_prefix_tokens"],
                       has_class_token=structure["has_class_token"])


def _check_block_outputs(loaded: LoadedModel, blocks: list[int], norm: str, data_config: dict[str, Any],
                         structure: dict[str, Any], points: tuple[str, ...] = ("block",),
                         poolings: tuple[str, ...] = ("mean",)) -> None:
    """Run one blank image through the chosen blocks before any store is made, so that a model whose block outputs
    cannot be read (or a --norm it does not end with, or points inside its blocks it does not have) is refused with
    one line instead of failing mid-store."""
    outputs = BlockOutputs(loaded.model, blocks, norm=norm, layout=block_layout(loaded.model, loaded.name))
    reader = _point_reader(loaded, structure, blocks, points, poolings)
    parameter = next(loaded.model.parameters(), None)
    images = torch.zeros(1, *data_config["input_size"], device=parameter.device if parameter is not None else "cpu")
    try:
        with torch.inference_mode(), reader:
            tokens = outputs(images)
            reader.take()
    except Exception as error:
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise BadInputError(f"model {loaded.name} cannot be profiled: reading its blocks' outputs from an input of "
                            f"{tuple(data_config['input_size'])} fails ({type(error).__name__}: {first})") from None
    for block in blocks:
        shape = tuple(tokens[block].shape)
        if len(shape) != 3 or shape[-1] != structure["block_widths"][block] \
                or shape[1] <= structure["num_prefix_tokens"]:
            raise BadInputError(f"model {loaded.name}: block {block} gives an output of shape {shape}, not (batch, "
                                f"{structure['num_prefix_tokens']} prefix + patch tokens, "
                                f"{structure['block_widths'][block]}): it cannot be profiled block by block")


def extract(model: str | LoadedModel, data: str | DataSource, *, out: str | Path, checkpoint: str | None = None,
            pretrained: bool = False, model_kwargs: dict[str, Any] | None = None, config: ExtractConfig | None = None, progress: bool = True,
            on_batch: BatchCallback | None = None, log: Callable[[str], None] | None = None,
            **options: Any) -> ExtractResult:
    """Extract every chosen block's pooled features into a FeatureStore under ``out``.

    The store lives in ``out/<model>__<data>__<key[:12]>``. A complete store with the same key is reused; an
    incomplete one is resumed from its last recorded row (with its own batch size, so the bytes match an
    uninterrupted run); different settings give a different key and a new store.

    Args:
        model: A timm model name (loaded with ``checkpoint`` / ``pretrained``) or a `LoadedModel`.
        data: A data spec for `load_data` or a `DataSource`.
        out: Folder that holds feature stores.
        checkpoint: Checkpoint file for the model.
        pretrained: Use timm's pretrained weights.
        model_kwargs: ``timm.create_model`` arguments (part of the store key through the model's identity).
        config: Extraction options; keyword ``options`` override its fields, named as the CLI's options
            (``blocks="last:4"`` or ``blocks=4``, ``pool="cls,mean"``, ``wait=False``; see `ExtractConfig`).
        progress: Show a progress bar (images per second) on stderr.
        on_batch: Called after every batch is recorded in the manifest (a kill after this loses nothing; no fsync,
            so a power loss may), with (split, rows done, rows in split).
        log: Receives one-line status messages (default: print to stderr when ``progress``).
    Raises:
        BadInputError: Bad paths, names, options or images (the message says what to fix).
    """
    config = build_config(ExtractConfig, options, base=config or ExtractConfig())
    messages: list[str] = []
    say = status_logger(log, progress=progress, messages=messages)

    out = Path(out)
    _check_out(out)
    source = data if isinstance(data, DataSource) else load_data(data)
    device = resolve_device(config.device)
    ranks, device = join(device)  # torchrun: every rank writes its share of the batches (`_extract_ranks`)
    if not ranks.is_main:
        say = status_logger(lambda message: None, progress=False, messages=messages)
    precision = resolve_precision(config.precision, device)
    loaded = model if isinstance(model, LoadedModel) else load_model(
        model, checkpoint=checkpoint, pretrained=pretrained, img_size=config.img_size, model_kwargs=model_kwargs)
    structure = describe_model(loaded.model, loaded.name)
    blocks = resolve_blocks(config.blocks, structure["num_blocks"])
    if not structure["has_class_token"] and any(p in ("cls", "cls+mean") for p in config.poolings):
        raise BadInputError(f"model {loaded.name} has no CLS token: use --pool mean")
    data_config, data_config_source = loaded.eval_data_config(
        img_size=config.img_size, crop_pct=config.crop_pct, mean=config.mean, std=config.std,
        interpolation=config.interpolation)
    _check_input_size(loaded, data_config)
    _check_block_outputs(loaded, blocks, config.norm, data_config, structure, config.points, config.poolings)

    key_fields = {
        "format_version": FORMAT_VERSION, "model": loaded.identity(), "dataset": source.fingerprint,
        "transform": data_config, "transform_source": data_config_source, "blocks": blocks,
        "poolings": list(config.poolings), "norm": config.norm, "dtype": config.store_dtype, "precision": precision,
    }
    if config.points != ("block",):  # block alone keeps the key of the stores made before points existed
        key_fields["points"] = list(config.points)
    key = store_key(key_fields)
    store_dir = out / f"{_slug(loaded.name)}__{_slug(source.short_name)}__{key[:12]}"
    widths = {structure["block_widths"][block] for block in blocks}  # one width, except across Hiera's stages
    feature_dims = {p: (_feature_dim(structure, blocks[-1], p) if len(widths) == 1 else None) for p in config.poolings}

    _prepare_out(out)
    lock = out / f".{store_dir.name}.lock"
    options = dict(key=key, key_fields=key_fields, loaded=loaded, structure=structure, source=source,
                   data_config=data_config, blocks=blocks, config=config, precision=precision,
                   feature_dims=feature_dims, device=device, progress=progress, on_batch=on_batch, say=say,
                   messages=messages, overwrite=config.overwrite, verify=config.verify)
    if ranks.distributed:
        return _extract_ranks(store_dir, lock, ranks=ranks, wait=config.wait, **options)
    # One writer per store: a second run waits (or refuses), then finds the store complete or resumes it.
    with exclusive_lock(lock, what=f"feature store {store_dir}", wait=config.wait, say=say):
        manifest, state = _open_or_create(store_dir, **options)
        if state == "reused":
            return ExtractResult(FeatureStore(store_dir, manifest), reused=True, resumed=False, messages=messages)
        images, seconds = _run(manifest, store_dir, ranks=ranks, **_run_options(options))
        return _finish(store_dir, manifest, resumed=state == "resumed", images=images, seconds=seconds, say=say,
                       messages=messages)


def _run_options(options: dict[str, Any]) -> dict[str, Any]:
    names = ("source", "loaded", "structure", "data_config", "device", "precision", "config", "progress", "on_batch")
    return {name: options[name] for name in names}


def _finish(store_dir: Path, manifest: dict[str, Any], *, resumed: bool, images: int, seconds: float,
            say: Callable[[str], None], messages: list[str]) -> ExtractResult:
    """Mark the store complete (every batch is written and recorded)."""
    manifest_path = store_dir / MANIFEST
    order = {split: position for position, split in enumerate(manifest["dataset"]["splits"])}
    manifest["bad_images"].sort(key=lambda e: (order[e["split"]], e["index"]))  # as one uninterrupted process
    manifest["complete"] = True
    write_json_atomic(manifest_path, manifest)
    if manifest["bad_images"]:
        say(f"skipped {len(manifest['bad_images'])} unreadable images (listed in {manifest_path})")
    return ExtractResult(FeatureStore(store_dir, manifest), reused=False, resumed=resumed, images=images,
                         seconds=seconds, messages=messages)


def _extract_ranks(store_dir: Path, lock: Path, *, ranks: Ranks, wait: bool, say: Callable[[str], None],
                   messages: list[str], **options: Any) -> ExtractResult:
    """Extraction by every rank of a torchrun launch, each writing its share of the batches in place.

    Rank 0 alone takes the store's lock (the others wait at a collective, so no lock has to work between
    machines), reuses, resumes or creates the store, and seeds the attempt in the manifest; every rank then reads
    the manifest from the filesystem, derives the same plan (`batch_progress.rank_items`) and writes its rows and
    its own progress file; after a barrier rank 0 folds the progress files into the manifest and marks it complete.
    Ranks share only the filesystem and torch.distributed collectives.
    """
    with ExitStack() as held:
        failure: BaseException | None = None
        state = "new"
        if ranks.is_main:
            try:  # a refusal here (--no-wait on a held lock, a damaged store) is told to every rank below
                held.enter_context(exclusive_lock(lock, what=f"feature store {store_dir}", wait=wait, say=say))
                manifest, state = _open_or_create(store_dir, say=say, messages=messages, **options)
                if state != "reused":
                    batch_progress.start_attempt(manifest, ranks.world_size)
                    write_json_atomic(store_dir / MANIFEST, manifest)
                    say(f"{ranks.world_size} processes extract {len(batch_progress.pending(manifest))} batches of "
                        f"{manifest['batch_size']} images, batch b of the pending ones by rank b % "
                        f"{ranks.world_size}")
            except BaseException as error:  # noqa: BLE001 (re-raised below, after telling the other ranks)
                failure = error
        if not all_succeeded(ranks, failure is None):
            if failure is not None:
                raise failure
            raise MimprobeError(f"rank {ranks.rank}: stopping because rank 0 could not prepare feature store "
                                f"{store_dir} (its message says why)")
        if not ranks.is_main:
            manifest = FeatureStore.open(store_dir).manifest
        if manifest["complete"]:
            if ranks.is_main:
                return ExtractResult(FeatureStore(store_dir, manifest), reused=True, resumed=False,
                                     messages=messages)
            return ExtractResult(FeatureStore(store_dir, manifest), reused=True, resumed=False, rank=ranks.rank)
        run_options = _run_options(options)
        if not ranks.is_main:
            run_options["progress"] = False
        try:
            images, seconds = _run(manifest, store_dir, ranks=ranks, **run_options)
        except BaseException:
            all_succeeded(ranks, False)
            raise
        if not all_succeeded(ranks, True):
            raise MimprobeError(f"rank {ranks.rank}: stopping because another rank failed (its message says why); "
                                "run the same command again to resume")
        images = total(ranks, images)
        if ranks.is_main:
            batch_progress.consolidate(store_dir, manifest)
            result = _finish(store_dir, manifest, resumed=state == "resumed", images=images, seconds=seconds,
                             say=say, messages=messages)
            batch_progress.remove_rank_files(store_dir)
        barrier(ranks)  # the store is complete for every rank from here
        if ranks.is_main:
            return result
        manifest = FeatureStore.open(store_dir).manifest
        return ExtractResult(FeatureStore(store_dir, manifest), reused=False, resumed=state == "resumed",
                             images=images, seconds=seconds, rank=ranks.rank)


def _open_or_create(store_dir: Path, *, key: str, key_fields: dict[str, Any], loaded: LoadedModel,
                    structure: dict[str, Any], source: DataSource, data_config: dict[str, Any], blocks: list[int],
                    config: ExtractConfig, precision: str, feature_dims: dict[str, int], device: torch.device,
                    say: Callable[[str], None], overwrite: bool, verify: bool,
                    **_: Any) -> tuple[dict[str, Any], str]:
    """Open the store to reuse or resume it, or create it (the caller holds its lock); returns its manifest and
    "reused", "resumed" or "new". The progress of an interrupted run of several processes is folded into the
    manifest first (`batch_progress.consolidate`), so it resumes with any number of processes."""
    manifest_path = store_dir / MANIFEST
    if overwrite and store_dir.exists():
        say(f"--overwrite: deleting feature store {store_dir}")
        shutil.rmtree(store_dir)
    if manifest_path.is_file():
        manifest = FeatureStore.open(store_dir, verify=verify).manifest  # damaged: one line naming the file
        if verify:
            _check_labels(store_dir, manifest, source)
            _check_first_batches(store_dir, manifest, source=source, loaded=loaded, structure=structure,
                                 data_config=data_config, device=device, precision=precision, config=config, key=key,
                                 key_fields=key_fields, blocks=blocks, feature_dims=feature_dims)
            say(f"verified feature store {store_dir}: every file and value checked, and the first batch of every "
                "split recomputed")
        if manifest.get("key") != key:
            raise MimprobeError(f"{store_dir} holds a store with another key (hash prefix collision); "
                                "move it away and run again")
        if manifest["complete"]:
            batch_progress.remove_rank_files(store_dir)  # left by a kill just after the store was completed
            say(f"reusing feature store {store_dir} (same key {key[:12]}: same model, data, transform, "
                f"blocks, points, pooling, norm and dtype)")
            return manifest, "reused"
        if batch_progress.consolidate(store_dir, manifest):
            write_json_atomic(manifest_path, manifest)
            batch_progress.remove_rank_files(store_dir)
        done = batch_progress.done_batches(manifest)
        rows = {s: sum(len(batch_progress.batch_rows(int(b), manifest["batch_size"], n))
                       for b in np.flatnonzero(done[s])) for s, n in manifest["dataset"]["splits"].items()}
        say(f"resuming feature store {store_dir}: " + ", ".join(
            f"{s} {rows[s]}/{n}" for s, n in manifest["dataset"]["splits"].items()))
        if manifest["batch_size"] != config.batch_size:
            say(f"note: using the store's batch size {manifest['batch_size']} (not {config.batch_size}) so that "
                "the resumed rows match an uninterrupted run")
    else:
        if store_dir.exists():  # killed before its manifest was written: nothing in it is recorded
            shutil.rmtree(store_dir)
        manifest = _new_store(store_dir, key=key, key_fields=key_fields, loaded=loaded, structure=structure,
                              source=source, data_config=data_config, blocks=blocks, config=config,
                              precision=precision, feature_dims=feature_dims)
        say(f"new feature store {store_dir} (key {key[:12]}); {source.summary()}")
        return manifest, "new"
    return manifest, "resumed"


VERIFY_TOLERANCE = 1e-2  # of the largest stored magnitude: float16 rounding and another device's kernels stay below


def _check_first_batches(store_dir: Path, manifest: dict[str, Any], *, source: DataSource, loaded: LoadedModel,
                         structure: dict[str, Any], data_config: dict[str, Any], device: torch.device, precision: str,
                         config: ExtractConfig, key: str, key_fields: dict[str, Any], blocks: list[int],
                         feature_dims: dict[str, int]) -> None:
    """Extract the first recorded batch of every split again (the store's batch size, so the same batch) into a
    scratch store beside it, through the same code, and compare: rows that no longer match the images and weights
    of the key (edited, or written by another version) fail here.

    Raises:
        DamagedStoreError: A feature file whose first rows differ from the fresh ones, named with the difference.
    """
    batch = manifest["batch_size"]
    firsts = {name: min(batch, manifest["progress"][name]) for name in source.splits if manifest["progress"][name]}
    if not firsts:
        return
    subset = replace(source, splits={name: split.head(firsts[name])
                                     for name, split in source.splits.items() if name in firsts})
    scratch_config = replace(config, batch_size=batch, skip_bad_images=True)  # skipped rows are zeros in both
    with tempfile.TemporaryDirectory(dir=store_dir.parent, prefix=".verify-") as scratch:
        scratch_dir = Path(scratch) / store_dir.name
        scratch_manifest = _new_store(scratch_dir, key=key, key_fields=key_fields, loaded=loaded, structure=structure,
                                      source=subset, data_config=data_config, blocks=blocks, config=scratch_config,
                                      precision=precision, feature_dims=feature_dims)
        _run(scratch_manifest, scratch_dir, ranks=Ranks(), source=subset, loaded=loaded, structure=structure,
             data_config=data_config, device=device, precision=precision, config=scratch_config, progress=False,
             on_batch=None)
        for name, rows in firsts.items():
            for block, point, pooling in feature_arrays(manifest):
                file = f"{name}/{feature_filename(block, pooling, point)}"
                stored = np.load(store_dir / file, mmap_mode="r")[:rows].astype(np.float32)
                fresh = np.load(scratch_dir / file).astype(np.float32)
                scale = max(float(np.abs(fresh).max()), 1e-6)
                difference = float(np.abs(stored - fresh).max())
                if difference > VERIFY_TOLERANCE * scale:
                    raise DamagedStoreError(store_dir, file, f"rows 0-{rows - 1} differ from the same images "
                                            f"extracted again (max difference {difference:.3g}, values up to "
                                            f"{scale:.3g}): the images or weights changed under the same key")


def _check_labels(store_dir: Path, manifest: dict[str, Any], source: DataSource) -> None:
    """The stored labels are the data's (skipped images excepted, which are -1)."""
    for split_name, split in source.splits.items():
        stored = np.load(store_dir / split_name / "labels.npy")
        skipped = [e["index"] for e in manifest["bad_images"] if e["split"] == split_name]
        expected = split.labels.astype(np.int64)
        expected[skipped] = -1
        differ = np.flatnonzero(stored != expected)
        if len(differ):
            raise DamagedStoreError(store_dir, f"{split_name}/labels.npy", f"has label {stored[differ[0]]} at row "
                                    f"{differ[0]} where the data has {expected[differ[0]]}")


def _new_store(store_dir: Path, *, key: str, key_fields: dict[str, Any], loaded: LoadedModel,
               structure: dict[str, Any], source: DataSource, data_config: dict[str, Any], blocks: list[int],
               config: ExtractConfig, precision: str, feature_dims: dict[str, int]) -> dict[str, Any]:
    """Create labels and zero-filled feature files, then the manifest (last: its presence means ready)."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "key_fields": key_fields,
        "model": {**loaded.identity(), "checkpoint": loaded.checkpoint, "checkpoint_format": loaded.checkpoint_format,
                  "structure": structure},
        "dataset": {"name": source.name, "kind": source.kind, "fingerprint": source.fingerprint,
                    "classes": list(source.classes), "labelled": source.labelled, "details": source.details,
                    "splits": {name: len(split) for name, split in source.splits.items()}},
        "transform": data_config,
        "transform_source": key_fields["transform_source"],
        "blocks": blocks,
        "poolings": list(config.poolings),
        "points": list(config.points),   # block: the blocks' outputs; others: inside the blocks, read raw
        "norm": config.norm,
        "dtype": config.store_dtype,
        "precision": precision,
        "feature_dims": feature_dims,  # per pooling; None when the chosen blocks differ in width (Hiera)
        "block_feature_dims": {str(block): {p: _feature_dim(structure, block, p) for p in config.poolings}
                               for block in blocks},
        "point_feature_dims": _point_feature_dims(loaded, structure, blocks, config),  # per point, block, pooling
        "files": {"labels": "{split}/labels.npy", "features": "{split}/block{block:02d}_{pooling}.npy",
                  "point_features": "{split}/block{block:02d}_{point}_{pooling}.npy",
                  "pooling_in_filename": {p: p.replace("+", "_") for p in config.poolings}},
        "batch_size": config.batch_size,
        "progress": {name: 0 for name in source.splits},
        "bad_images": [],
        "complete": False,
        "versions": software_versions(),
    }
    create_store(store_dir, manifest, {name: split.labels for name, split in source.splits.items()})
    return manifest


def _progress_bar(enabled: bool):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    class ImagesPerSecond(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:,.1f} img/s" if speed else "-- img/s")

    return progress_display(  # plain periodic lines when the output is not a terminal
        lambda console: Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 ImagesPerSecond(), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                                 disable=not enabled, transient=False),
        enabled=enabled, unit="img")


def _run(manifest: dict[str, Any], store_dir: Path, *, ranks: Ranks, source: DataSource, loaded: LoadedModel,
         structure: dict[str, Any], data_config: dict[str, Any], device: torch.device, precision: str,
         config: ExtractConfig, progress: bool, on_batch: BatchCallback | None) -> tuple[int, float]:
    """Write this process's pending batches (all of them alone, its share under torchrun) and record each one:
    alone in the manifest, as a rank in its own progress file (`batch_progress`). Returns (images, seconds)."""
    model = loaded.model.to(device).eval()
    transform = build_eval_transform(data_config)
    outputs = BlockOutputs(model, manifest["blocks"], norm=manifest["norm"], layout=block_layout(model, loaded.name))
    points = tuple(manifest.get("points", ["block"]))
    reader = _point_reader(loaded, structure, manifest["blocks"], points, tuple(manifest["poolings"]))
    dtype = np.dtype(manifest["dtype"])
    batch_size = manifest["batch_size"]
    items = batch_progress.rank_items(manifest, ranks.rank, ranks.world_size)
    done = batch_progress.done_batches(manifest)
    my_bad: list[dict[str, Any]] = []
    finished = 0
    images_done, started = 0, time.perf_counter()
    with _progress_bar(progress) as bar, torch.inference_mode(), reader:
        for split_name, split in source.splits.items():
            total_rows = len(split)
            mine = [batch for name, batch in items if name == split_name]
            if not mine:
                continue
            rows_of = [list(batch_progress.batch_rows(batch, batch_size, total_rows)) for batch in mine]
            label = f"extract {split_name}" + (f" (rank {ranks.rank} of {ranks.world_size})"
                                               if ranks.distributed else "")
            task = bar.add_task(label, total=sum(map(len, rows_of)), completed=0)
            dataset = SplitDataset(split, transform, tuple(data_config["input_size"]))
            loader = DataLoader(dataset, batch_sampler=rows_of, num_workers=config.workers,
                                pin_memory=device.type == "cuda")
            writers = {(block, point, pooling): RowWriter(
                store_dir / split_name / feature_filename(block, pooling, point),
                _feature_dim(structure, block, pooling) * dtype.itemsize if point == "block"
                else manifest["point_feature_dims"][point][str(block)][pooling] * dtype.itemsize)
                for block, point, pooling in feature_arrays(manifest)}
            label_writer = RowWriter(store_dir / split_name / "labels.npy", 8)
            try:
                for batch, (images, indices, errors) in zip(mine, loader):
                    start = int(indices[0])
                    bad_rows = [row for row, error in enumerate(errors) if error]
                    for row in bad_rows:
                        path = split.describe(start + row)
                        if not config.skip_bad_images:
                            raise BadImageError(f"cannot decode image {path} ({errors[row]}): fix or remove it, or "
                                                "pass --skip-bad-images to skip it")
                    with autocast(device, precision):
                        tokens = outputs(images.to(device, non_blocking=True))
                    pooled_points = reader.take()  # (block, point, pooling) -> (batch, dim), pooled in the hooks
                    for block, block_tokens in tokens.items():
                        if "block" not in points:
                            break
                        block_tokens = block_tokens.float()
                        for pooling in manifest["poolings"]:
                            pooled_points[(block, "block", pooling)] = pool_tokens(
                                block_tokens, pooling, num_prefix_tokens=structure["num_prefix_tokens"],
                                has_class_token=structure["has_class_token"], norm=outputs.pooled_norm)
                    for where, pooled in pooled_points.items():
                        # torch's cast: numpy's float16 astype is several times slower (the same rounding)
                        pooled = pooled.to("cpu", STORE_TORCH_DTYPES[dtype.name]).numpy()
                        pooled[bad_rows] = 0
                        writers[where].write(start, pooled)
                    for row in bad_rows:
                        label_writer.write(start + row, np.array([-1], dtype=np.int64))
                        my_bad.append({"split": split_name, "index": start + row,
                                       "image": split.describe(start + row), "error": errors[row]})
                    finished += 1
                    if ranks.distributed:
                        batch_progress.write_rank_progress(store_dir, manifest, ranks.rank, finished, my_bad)
                        recorded = start + len(indices)
                    else:
                        manifest["bad_images"] += my_bad
                        my_bad = []
                        done[split_name][batch] = True
                        batch_progress.record(manifest, done)
                        write_json_atomic(store_dir / MANIFEST, manifest)
                        recorded = manifest["progress"][split_name]
                    images_done += len(indices)
                    bar.update(task, advance=len(indices))
                    if on_batch is not None:
                        on_batch(split_name, recorded, total_rows)
            finally:
                for writer in [*writers.values(), label_writer]:
                    if ranks.distributed:  # on the disk (a shared filesystem's server) before rank 0 completes
                        os.fsync(writer.fd)
                    writer.close()
    return images_done, time.perf_counter() - started
