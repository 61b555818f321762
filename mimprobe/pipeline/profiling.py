"""`run_profile`: the orchestration of `mimprobe profile`: open a feature store, or extract (reuse, resume) one for a
model name, then measure it (`mimprobe.metrics.profile.measure_store`). Metrics never see the model; this module
is where extraction and measurement meet."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._device import resolve_device
from .._ranks import join as join_ranks
from ..errors import BadInputError
from ..features.store import FeatureStore
from ..metrics.profile import ProfileConfig, ProfileResult, measure_store
from ..metrics.splits import check_knn_fits, plan_from_labels


def open_or_extract(target: str | Path, data: str | None, *, features_dir: Path, checkpoint: str | None = None,
                    pretrained: bool = False, model_kwargs: dict[str, Any] | None = None,
                    extract_config: Any = None, progress: bool = True,
                    log: Callable[[str], None] | None = None) -> FeatureStore:
    """A store directory (checked against ``data`` when given), or extract/reuse one for a model name."""
    target_path = Path(str(target))
    if (target_path / "manifest.json").is_file():
        store = FeatureStore.open(target_path)
        if data is not None:
            from ..data import load_data

            source = load_data(data)
            if source.fingerprint != store.manifest["dataset"]["fingerprint"]:
                if source.details.get("root", source.name) == store.manifest["dataset"]["details"].get(
                        "root", store.manifest["dataset"]["name"]):
                    raise BadInputError(f"{data} changed since store {target_path} was extracted from it (images "
                                        "added, removed, replaced or touched): profile the model name with DATA to "
                                        "extract it again, or drop DATA to use the store as it is")
                raise BadInputError(f"store {target_path} was extracted from {store.manifest['dataset']['name']}, "
                                    f"not from {data}: profile the matching store, or drop DATA to use this one")
        return store
    if target_path.exists() and target_path.is_dir():
        raise BadInputError(f"{target_path} is a folder but not a feature store (no manifest.json): give a store "
                            "from `mimprobe extract`, or a timm model name and DATA")
    if data is None:
        raise BadInputError(f"{target} is not a feature store: give a timm model name and DATA, or a store folder")
    from ..features import extract

    result = extract(str(target), data, out=features_dir, checkpoint=checkpoint, pretrained=pretrained,
                     model_kwargs=model_kwargs, config=extract_config, progress=progress, log=log)
    return result.store


def checked_data(data: Any, config: ProfileConfig) -> Any:
    """The data source of a profile to extract, opened once, with k-NN's bank and queries checked against the
    preset's k before anything is extracted or written.

    Raises:
        BadInputError: Data that cannot be opened, or a train split too small for the preset's k.
    """
    from ..data import DataSource, load_data

    source = data if isinstance(data, DataSource) else load_data(data)
    if config.metrics is not None and "knn" not in config.metrics:
        return source
    eval_split = next((name for name in ("test", "val") if name in source.splits), None)
    if "train" in source.splits and source.labelled:
        check_knn_fits(config.preset, plan_from_labels(
            source.splits["train"].labels, labelled=True, eval_split=eval_split,
            n_eval=len(source.splits[eval_split]) if eval_split else 0, val_fraction=config.val_fraction,
            seed=config.seed))
    return source


def run_profile(target: str | Path, data: str | None = None, *, out: str | Path, config: ProfileConfig | None = None,
                features_dir: str | Path | None = None, checkpoint: str | None = None, pretrained: bool = False,
                model_kwargs: dict[str, Any] | None = None, extract_config: Any = None, progress: bool = True,
                log: Callable[[str], None] | None = None) -> ProfileResult:
    """Extract (or reuse) a FeatureStore, measure every block, and write profile.{csv,parquet,json,png} and
    predictions.npz (`SamplePredictions`) to ``out``.

    Args:
        target: A timm model name (with ``data``) or a FeatureStore directory.
        data: Data spec (required with a model name; with a store, checked against the store's fingerprint).
        out: Output folder of the profile files.
        config: Metric options.
        features_dir: Where stores are kept (default ``out/features``).
        extract_config: The extraction's `mimprobe.features.ExtractConfig` (default: its defaults).
    """
    config = config or ProfileConfig()
    out = Path(out)
    if config.readout and not (Path(str(target)) / "manifest.json").is_file():
        from ..features.config import ExtractConfig
        from ..metrics.readout import check_readout_store

        extraction = extract_config or ExtractConfig()  # checked before the model or data is touched
        check_readout_store(config.readout, norm=extraction.norm, poolings=extraction.poolings,
                            where="the extraction")
    if data is not None and not (Path(str(target)) / "manifest.json").is_file():
        data = checked_data(data, config)  # opened once, here and for the extraction
    started = time.perf_counter()
    ranks, _ = join_ranks(resolve_device(config.device))  # torchrun: all ranks extract and search; rank 0 writes
    if not ranks.is_main:
        progress, log = False, None
    store = open_or_extract(target, data, features_dir=Path(features_dir) if features_dir else out / "features",
                            checkpoint=checkpoint, pretrained=pretrained, model_kwargs=model_kwargs,
                            extract_config=extract_config,
                            progress=progress, log=log)
    return measure_store(store, out=out, config=config, progress=progress, log=log, started=started)
