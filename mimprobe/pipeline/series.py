"""`run_profile_series`: `mimprobe profile MODEL DATA --checkpoint SERIES` over a series of checkpoints (a glob, or a
run folder of ``checkpoint-<epoch>.pth``; `mimprobe.models.checkpoint_series`), in training order.

Each checkpoint is extracted into its own feature store (a store whose key matches, the checkpoint's sha256
included, is reused: a second call extracts nothing) and profiled by the single-checkpoint path (`run_profile` on
that store). OUT receives:

* ``checkpoints/<name>/``: each checkpoint's profile (profile.csv/.parquet/.json/.png, predictions.npz);
* ``series.csv`` / ``series.parquet``: one long table, the profile columns with ``checkpoint`` = the checkpoint's
  name (its file stem), plus ``checkpoint_step`` (the epoch or step in its name), ``checkpoint_order`` (0-based
  position in training order) and ``checkpoint_path``, rows in training order;
* ``series.png``: per headline curve and pooling, a heatmap of blocks x checkpoints (`plot_series`);
* ``series.json``: the checkpoints (name, step, path, store, whether it was reused, profile folder and ``folder``,
  its place in OUT), the options, and each checkpoint's best blocks. `mimprobe compare OUT` reads the series as its
  checkpoints' profiles (`mimprobe.report.inputs.expand_series`).

Everything that can be checked is checked before anything is written: the series resolves to files of one
architecture, the data opens and fits k-NN, and the first checkpoint loads strictly into the model.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .._ranks import current as current_ranks
from .._versions import software_versions
from ..errors import BadInputError
from ..metrics.config import ProfileConfig
from ..metrics.headlines import headlines
from ..metrics.profile import COLUMNS, ProfileResult
from ..models.checkpoint_series import SeriesCheckpoint, check_same_architecture, resolve_checkpoint_series
from .profiling import checked_data, run_profile

SERIES_COLUMNS = [*COLUMNS, "checkpoint_step", "checkpoint_order", "checkpoint_path"]
PROFILES_FOLDER = "checkpoints"


@dataclass
class SeriesResult:
    """What `run_profile_series` did: the checkpoints in training order, each one's `ProfileResult` and whether its
    store was reused, the series table and the files."""

    out: Path
    checkpoints: list[SeriesCheckpoint]
    profiles: list[ProfileResult]
    reused: list[bool]
    table: pd.DataFrame
    files: dict[str, str]
    seconds: float
    rank: int = 0
    best: pd.DataFrame = field(default_factory=pd.DataFrame)

    def summary(self) -> dict[str, Any]:
        return {"out": str(self.out), "rows": len(self.table), "files": self.files, "seconds": round(self.seconds, 2),
                "checkpoints": [{"name": item.name, "step": item.step, "path": str(item.path),
                                 "store": str(profile.store.path), "store_reused": reused,
                                 "profile": str(profile.out),
                                 "best_blocks": json.loads(profile.best.to_json(orient="records"))}
                                for item, profile, reused in zip(self.checkpoints, self.profiles, self.reused)]}


def run_profile_series(target: str, data: Any, *, checkpoints: str, out: str | Path,
                       config: ProfileConfig | None = None, features_dir: str | Path | None = None,
                       pretrained: bool = False, model_kwargs: dict[str, Any] | None = None,
                       extract_config: Any = None, progress: bool = True,
                       log: Callable[[str], None] | None = None) -> SeriesResult:
    """Profile every checkpoint of a series and write the series files (module docstring).

    Args:
        target: A timm model name (the architecture of every checkpoint).
        data: Data spec (required).
        checkpoints: The series: a glob, or a run folder of ``checkpoint-<epoch>.pth`` files.
        out: Output folder.
        config: Metric options (the same for every checkpoint).
        features_dir: Where stores are kept (default ``out/features``).
        extract_config: The extraction's `mimprobe.features.ExtractConfig`.

    Raises:
        BadInputError: A feature store as ``target``, no data, ``pretrained``, a glob matching nothing, a run folder
            without numbered checkpoints, checkpoints of different architectures, or any single-profile error.
    """
    from ..features import extract

    started = time.perf_counter()
    config = config or ProfileConfig()
    if (Path(str(target)) / "manifest.json").is_file():
        raise BadInputError(f"{target} is a feature store: a checkpoint series needs a timm model name as TARGET and "
                            "DATA (each checkpoint is extracted into its own store)")
    if data is None:
        raise BadInputError("a checkpoint series needs DATA: give the data to extract each checkpoint's features on")
    if pretrained:
        raise BadInputError("`mimprobe profile` takes either --pretrained or a checkpoint series, not both")
    series = resolve_checkpoint_series(checkpoints)
    check_same_architecture(series)
    source = checked_data(data, config)
    out = Path(out)
    features = Path(features_dir) if features_dir else out / "features"
    say = log or (lambda message: None)
    profiles, reused = [], []
    for position, item in enumerate(series, start=1):
        step = f" (step {item.step})" if item.step is not None else ""
        say(f"checkpoint {position}/{len(series)}: {item.name}{step}")
        extracted = extract(target, source, out=features, checkpoint=str(item.path), model_kwargs=model_kwargs,
                            config=extract_config, progress=progress, log=log)
        if extracted.reused:
            say(f"{item.name}: reusing store {extracted.store.path}")
        reused.append(bool(extracted.reused))
        profiles.append(run_profile(extracted.store.path, None, out=out / PROFILES_FOLDER / _folder_name(item.name),
                                    config=config, progress=progress, log=log))
    ranks = current_ranks()
    table = series_table(series, [profile.table for profile in profiles])
    if not ranks.is_main:
        return SeriesResult(out=out, checkpoints=series, profiles=profiles, reused=reused, table=table, files={},
                            seconds=time.perf_counter() - started, rank=ranks.rank)
    files = write_series(out, series, profiles, reused, table, config=config, started=started)
    best = pd.concat([profile.best.assign(checkpoint=item.name) for item, profile in zip(series, profiles)],
                     ignore_index=True)
    return SeriesResult(out=out, checkpoints=series, profiles=profiles, reused=reused, table=table, files=files,
                        seconds=time.perf_counter() - started, best=best)


def series_table(series: list[SeriesCheckpoint], tables: list[pd.DataFrame]) -> pd.DataFrame:
    """The per-checkpoint tables as one, in training order: ``checkpoint`` = the checkpoint's name, plus
    ``checkpoint_step``, ``checkpoint_order`` and ``checkpoint_path`` (`SERIES_COLUMNS`)."""
    parts = []
    for order, (item, table) in enumerate(zip(series, tables)):
        frame = table.copy()
        frame["checkpoint"] = item.name
        frame["checkpoint_step"] = pd.array([item.step] * len(frame), dtype="Int64")
        frame["checkpoint_order"] = order
        frame["checkpoint_path"] = str(item.path)
        parts.append(frame)
    return pd.concat(parts, ignore_index=True)[SERIES_COLUMNS]


def write_series(out: Path, series: list[SeriesCheckpoint], profiles: list[ProfileResult], reused: list[bool],
                 table: pd.DataFrame, *, config: ProfileConfig, started: float) -> dict[str, str]:
    """series.csv/.parquet/.png/.json in ``out``; returns the files."""
    from ..metrics.series_plot import plot_series

    files = {"csv": str(out / "series.csv"), "parquet": str(out / "series.parquet"), "png": str(out / "series.png"),
             "json": str(out / "series.json")}
    table.to_csv(files["csv"], index=False)
    table.to_parquet(files["parquet"], index=False)
    names = [item.name for item in series]
    manifest = profiles[0].store.manifest
    title = (f"{manifest['model']['name']} on {Path(manifest['dataset']['name']).name}: "
             f"{len(series)} checkpoints")
    plot_series(table, headlines(config.preset, table), checkpoints=names, title=title, path=Path(files["png"]))
    payload = {
        "config": asdict(config), "columns": SERIES_COLUMNS,
        "checkpoints": [{"name": item.name, "step": item.step, "order": order, "path": str(item.path),
                         "store": str(profile.store.path), "store_key": profile.store.key, "store_reused": was_reused,
                         "profile": str(profile.out), "folder": f"{PROFILES_FOLDER}/{_folder_name(item.name)}",
                         "best_blocks": json.loads(profile.best.to_json(orient="records"))}
                        for order, (item, profile, was_reused) in enumerate(zip(series, profiles, reused))],
        "versions": software_versions(), "seconds": round(time.perf_counter() - started, 2),
    }
    Path(files["json"]).write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return files


def _folder_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)
