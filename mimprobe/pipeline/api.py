"""The Python entry points, one per command: ``mimprobe.extract / profile / place / refine / compare / pretrain_mae /
info``. Each takes the command's option names as keyword arguments (Python values or the CLI's text forms:
``metrics="knn,linear"``, ``pool=("cls", "mean")``), builds and validates every option before any work starts,
applies ``threads`` with the one thread mechanism (`mimprobe._threads.cpu_threads`), and calls the stage's run
function. The command line (`mimprobe.cli`) and the TOML specs (`mimprobe.pipeline.spec`) call these same
functions, so the three give the same result.

Each command's options are the fields of the config classes listed in its `mimprobe.commands.Command`; `mimprobe.cli`
derives the Typer options from the same list.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import _threads
from ..commands import (COMPARE, EXTRACT, INFO, PLACE, PRETRAIN, PROFILE, REFINE, CompareConfig, CompareRun,
                      ExtractConfig, ExtractRun, MaeConfig, PlaceConfig, PlaceRun, PretrainRun, ProfileConfig,
                      ProfileRun, RefineConfig, RefineRun, Running, Weights)
from ..errors import BadInputError

Log = Callable[[str], None]


def extract(model: Any, data: Any, *, log: Log | None = None, on_batch: Any = None, **options: Any):
    """`mimprobe extract`: every chosen block's features in one forward pass into a resumable feature store.

    Keywords are the command's options (``out`` required; see `EXTRACT`). Returns an
    `mimprobe.features.ExtractResult`."""
    from ..features.extraction import extract as run_extract

    configs = EXTRACT.configs(options)
    run, weights, running = configs[ExtractRun], configs[Weights], configs[Running]
    with _threads.cpu_threads(running.threads):
        return run_extract(model, data, out=run.out, checkpoint=weights.checkpoint, pretrained=weights.pretrained,
                           model_kwargs=weights.model_kwargs, config=configs[ExtractConfig],
                           progress=running.progress, on_batch=on_batch, log=log)


def profile(target: Any, data: Any = None, *, log: Log | None = None, **options: Any):
    """`mimprobe profile`: extract (or reuse) a store and measure every block; writes the profile files to ``out``.

    ``target`` is a timm model name (with ``data``) or a feature store folder. Keywords are the command's options
    (``out`` required; ``metrics="knn,linear"``, ``threads=1``, ...; see `PROFILE`). Returns a `ProfileResult`; with
    ``checkpoint`` a series (a glob such as ``"run/checkpoint-*.pth"``, or a run folder of ``checkpoint-<epoch>.pth``)
    every checkpoint is profiled in training order and a `SeriesResult` is returned (`mimprobe.pipeline.series`)."""
    from dataclasses import replace

    from ..models.checkpoint_series import is_checkpoint_series
    from .profiling import run_profile
    from .series import run_profile_series

    configs = PROFILE.configs(options)
    run, weights, running = configs[ProfileRun], configs[Weights], configs[Running]
    extract_config = configs[ExtractConfig]
    config = configs[ProfileConfig]
    if "pool" in options or "poolings" in options:  # a store's poolings: those asked for, else all it holds
        config = replace(config, poolings=extract_config.poolings)
    with _threads.cpu_threads(running.threads):
        if is_checkpoint_series(weights.checkpoint):
            return run_profile_series(target, data, checkpoints=weights.checkpoint, out=run.out, config=config,
                                      features_dir=run.features, pretrained=weights.pretrained,
                                      model_kwargs=weights.model_kwargs, extract_config=extract_config,
                                      progress=running.progress, log=log)
        return run_profile(target, data, out=run.out, config=config, features_dir=run.features,
                           extract_config=extract_config, checkpoint=weights.checkpoint,
                           pretrained=weights.pretrained, model_kwargs=weights.model_kwargs, progress=running.progress, log=log)


def place(profile: Any, *, preset: str | None = None, k: int | None = None, **options: Any):
    """`mimprobe place`: choose the head blocks from a profile folder; writes placement.json (``out``, default
    PROFILE/placement.json). Keywords are the command's options (see `PLACE`). Returns a `Placement`."""
    from ..placement.run import run_place

    configs = PLACE.configs(options)
    return run_place(profile, out=configs[PlaceRun].out, config=configs[PlaceConfig], preset=preset, k=k)


def refine(model: str, data: Any, *, log: Log | None = None, stop_after_steps: int | None = None,
           **options: Any):
    """`mimprobe refine`: NNA refinement on the placed blocks (``placement`` or ``auto``); exports
    OUT/refined.safetensors. Keywords are the command's options (see `REFINE`). Returns a `RefineResult`."""
    from ..refinement import run_refine

    configs = REFINE.configs(options)
    run, weights, running, place_config = configs[RefineRun], configs[Weights], configs[Running], configs[PlaceConfig]
    given_place = {name: value for name, value in options.items() if name in REFINE.only[PlaceConfig]}
    if run.auto and run.placement is not None:
        raise BadInputError("use either --placement FILE or --auto, not both")
    if given_place and not run.auto and set(given_place) != {"freeze"}:
        raise BadInputError(f"--{next(iter(given_place)).replace('_', '-')} places heads: add --auto, or place "
                            "with `mimprobe place` and give --placement")
    with _threads.cpu_threads(running.threads):
        placement = run.placement
        if run.auto:
            placement = _auto_placement(model, data, run=run, weights=weights, config=configs[RefineConfig],
                                        place_options={name: getattr(place_config, name) for name in given_place},
                                        progress=running.progress, log=log)
        return run_refine(model, data, out=run.out, config=configs[RefineConfig], checkpoint=weights.checkpoint,
                          pretrained=weights.pretrained, model_kwargs=weights.model_kwargs, placement=placement,
                          freeze=place_config.freeze,
                          device=run.device, resume=run.resume, overwrite=run.overwrite, progress=running.progress,
                          stop_after_steps=stop_after_steps, log=log)


def _auto_placement(model: str, data: Any, *, run: RefineRun, weights: Weights, config: RefineConfig,
                    place_options: dict[str, Any], progress: bool, log: Log | None) -> str:
    """``refine --auto``: a k-NN profile of the CLS tokens in OUT/profile, then the peak rule's placement there
    (OUT/profile/placement.json; kept on --resume, placed again otherwise). Under torchrun every rank extracts and
    searches its share (the profile's own distributed path); rank 0 places, the others wait for it."""
    from .._ranks import barrier, current

    folder = Path(run.out) / "profile"
    target = folder / "placement.json"
    if run.resume and target.is_file():
        return str(target)
    (log or (lambda message: None))("--auto: profiling every block with k-NN (cls tokens) to place the heads")
    profile(model, data, out=str(folder), checkpoint=weights.checkpoint, pretrained=weights.pretrained,
            model_kwargs=weights.model_kwargs, metrics="knn", pool="cls", img_size=config.img_size, device=run.device, progress=progress, log=log)
    ranks = current()
    if ranks.is_main:
        place(str(folder), out=str(target), **place_options)
    barrier(ranks)
    return str(target)


def pretrain_mae(model: Any, data: Any, *, log: Log | None = None, **options: Any):
    """`mimprobe pretrain-mae`: MAE pre-training on the train split; exports OUT/mae.pth. Keywords are the
    command's options (see `PRETRAIN`). Returns a `PretrainResult`."""
    from ..pretrain import run_pretrain_mae

    configs = PRETRAIN.configs(options)
    run, weights, running, config = configs[PretrainRun], configs[Weights], configs[Running], configs[MaeConfig]
    with _threads.cpu_threads(running.threads):
        if weights.pretrained and weights.checkpoint:
            raise BadInputError("give either --checkpoint or --pretrained, not both")
        if weights.pretrained or weights.model_kwargs:  # timm's weights, or another architecture of the name
            from ..models import load_model

            model = load_model(model, pretrained=weights.pretrained, checkpoint=weights.checkpoint,
                               model_kwargs=weights.model_kwargs, img_size=config.img_size, init_seed=config.seed)
        return run_pretrain_mae(model, data, out=run.out, config=config, checkpoint=weights.checkpoint,
                                resume=run.resume, overwrite=run.overwrite, progress=running.progress, log=log)


def compare(profiles: Sequence[Any], *, log: Log | None = None, **options: Any):
    """`mimprobe compare`: every profile against the first; writes the report folder ``out``. Keywords are the
    command's options (see `COMPARE`). Returns a `CompareResult`."""
    from ..report import run_compare

    configs = COMPARE.configs(options)
    run = configs[CompareRun]
    with _threads.cpu_threads(configs[Running].threads):
        return run_compare(profiles, out=run.out, labels=None if run.labels is None else list(run.labels),
                           placement=run.placement, config=configs[CompareConfig], overwrite=run.overwrite,
                           notes=configs[CompareConfig].notes, log=log)


def info(model: str, **options: Any) -> dict[str, Any]:
    """`mimprobe info`: a model's blocks and widths, prefix tokens, patch size, final norm and data config (and
    where it comes from), as a dict."""
    from ..models import describe_model, load_model

    configs = INFO.configs(options)
    weights, config = configs[Weights], configs[ExtractConfig]
    with _threads.cpu_threads(configs[Running].threads):
        loaded = load_model(model, checkpoint=weights.checkpoint, pretrained=weights.pretrained,
                            img_size=config.img_size, model_kwargs=weights.model_kwargs)
        data_config, source = loaded.eval_data_config(img_size=config.img_size, mean=config.mean, std=config.std,
                                                      interpolation=config.interpolation, crop_pct=config.crop_pct)
        return {"model": loaded.name, "weights": loaded.weights, "checkpoint": loaded.checkpoint,
                "checkpoint_format": loaded.checkpoint_format, "checkpoint_sha256": loaded.checkpoint_sha256,
                "model_kwargs": loaded.model_kwargs, **describe_model(loaded.model, loaded.name),
                "data_config": data_config, "data_config_source": source, "notes": list(loaded.notes)}
