"""Reading what a comparison needs: profile folders, their feature stores, predictions and placements."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import BadInputError
from ..features.store import FeatureStore
from ..metrics.points import point_rows, table_points
from ..metrics.predictions import PREDICTIONS_FILE, SamplePredictions
from ..placement import PLACEMENT_FILE, Placement, load_placement
from ..placement.run import model_depth, read_profile


@dataclass(frozen=True)
class ProfileInput:
    """One profile folder, read: the long table, profile.json, and what lies next to it.

    ``predictions`` is None for profiles written before ``predictions.npz`` existed; ``store`` is None when the
    feature store named in profile.json is gone (then CKA and recomputed k-NN correctness are unavailable).

    ``table`` holds the rows of the blocks' outputs (point ``block``): the deltas, best blocks and per-class gains
    compare those. ``points`` holds the rows of each point inside the blocks the profile measured
    (`mimprobe.metrics.points`), drawn as extra curves of the block-curve panels.
    """

    label: str
    folder: Path
    table: pd.DataFrame
    meta: dict[str, Any]
    num_blocks: int
    predictions: SamplePredictions | None
    store: FeatureStore | None
    points: dict[str, pd.DataFrame] = field(default_factory=dict)   # point -> its rows (points other than block)

    @property
    def preset(self) -> str:
        return str((self.meta.get("config") or {}).get("preset") or "mim-refiner")

    @property
    def fingerprint(self) -> str | None:
        return (self.meta.get("dataset") or {}).get("fingerprint")

    @property
    def dataset_name(self) -> str:
        return str((self.meta.get("dataset") or {}).get("name") or _first(self.table, "dataset"))

    @property
    def model_name(self) -> str:
        return str((self.meta.get("model") or {}).get("name") or _first(self.table, "model"))

    @property
    def checkpoint(self) -> str | None:
        return (self.meta.get("model") or {}).get("checkpoint")

    @property
    def weights(self) -> str:
        """The checkpoint file name, or the weights tag (``random``, ``pretrained``) without one."""
        model = self.meta.get("model") or {}
        if model.get("checkpoint"):
            return Path(str(model["checkpoint"])).name
        return str(model.get("weights") or _first(self.table, "checkpoint"))


SERIES_FILE = "series.json"   # written by `mimprobe profile --checkpoint SERIES` (`mimprobe.pipeline.series`)


def expand_series(paths: list[Path]) -> list[Path]:
    """The profile folders of the inputs: a checkpoint series' folder (series.json, no profile.json) becomes its
    checkpoints' profile folders in training order; other folders stay as they are.

    Raises:
        BadInputError: A series.json that cannot be read or names a profile folder that is gone.
    """
    import json

    expanded: list[Path] = []
    for path in paths:
        marker = path / SERIES_FILE
        if not marker.is_file() or (path / "profile.json").is_file():
            expanded.append(path)
            continue
        try:
            entries = json.loads(marker.read_text())["checkpoints"]
            folders = [path / entry["folder"] for entry in sorted(entries, key=lambda entry: entry["order"])]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise BadInputError(f"{marker} is not a readable checkpoint series ({error}): profile the series again "
                                "with `mimprobe profile --checkpoint`") from None
        missing = [folder for folder in folders if not folder.is_dir()]
        if missing:
            raise BadInputError(f"the checkpoint series {path} lists {missing[0]}, which does not exist: profile the "
                                "series again, or compare its profile folders one by one")
        expanded += folders
    return expanded


def load_profile(path: str | Path, *, label: str | None = None) -> ProfileInput:
    """Read a ``mimprobe profile`` folder.

    Raises:
        BadInputError: The folder is missing or holds no profile table.
    """
    folder = Path(path)
    if not folder.exists():
        raise BadInputError(f"profile folder {folder} not found: make one with `mimprobe profile MODEL DATA --out "
                            f"{folder}`")
    table, meta, folder = read_profile(folder)
    points = {point: point_rows(table, point) for point in table_points(table) if point != "block"}
    table = point_rows(table)  # the blocks' outputs: what the deltas and best blocks compare
    num_blocks, _ = model_depth(meta, table)
    predictions_path = folder / PREDICTIONS_FILE
    predictions = SamplePredictions.load(predictions_path) if predictions_path.is_file() else None
    return ProfileInput(label=label or folder.resolve().name, folder=folder, table=table, meta=meta,
                        num_blocks=num_blocks, predictions=predictions, store=_open_store(meta, folder), points=points)


def _open_store(meta: dict[str, Any], folder: Path) -> FeatureStore | None:
    """The store profile.json names: as written, else beside the profile (``FOLDER/features/NAME``, where
    `mimprobe profile` puts it by default), so a moved or copied profile folder still finds it."""
    named = meta.get("store")
    if not named:
        return None
    for candidate in (Path(named), folder / Path(named), folder / "features" / Path(named).name):
        if (candidate / "manifest.json").is_file():
            try:
                store = FeatureStore.open(candidate)
            except BadInputError:
                return None
            if store.key == meta.get("store_key", store.key) and store.complete:
                return store
    return None


def find_placement(after: ProfileInput, explicit: str | Path | None = None) -> tuple[Placement | None, str]:
    """The placement of the refined model, and where it came from (or why none was found).

    ``explicit`` (``--placement``) wins; otherwise the refine run folder's placement.json, found as the folder of
    the checkpoint the after profile was made from (``mimprobe refine --out RUN`` writes RUN/refined.safetensors
    and RUN/placement.json).
    """
    if explicit is not None:
        return load_placement(explicit), f"--placement {explicit}"
    checkpoint = after.checkpoint
    if not checkpoint:
        return None, "no placement: the profile has no checkpoint whose run folder could hold one (give --placement)"
    candidate = Path(checkpoint).parent / PLACEMENT_FILE
    if not candidate.is_file():
        return None, f"no placement: {candidate} does not exist (give --placement)"
    return load_placement(candidate), str(candidate)


@dataclass(frozen=True)
class RefineRun:
    """The settings and outcome of the refinement that made a profiled checkpoint (its run folder's config.json and
    log.csv, as `mimprobe refine` writes them)."""

    folder: Path
    epochs_heads: int
    epochs: int
    steps: int
    batch_size: int
    lr_heads: float
    lr: float
    final_loss: float | None
    base_weights: str
    ema_progress: float | None = None   # how far the exported EMA moved from the start (refine's config.json)

    def describe(self) -> str:
        """One sentence: stages, steps, batch, learning rates, final loss and what was refined."""
        loss = f", final loss {self.final_loss:.3f}" if self.final_loss is not None else ", no logged step"
        base = {"random": "a random initialisation (no pretrained weights)",
                "checkpoint": "weights loaded from a checkpoint",
                "pretrained": "timm's pretrained weights"}.get(self.base_weights, f"{self.base_weights} weights")
        return (f"refinement ({self.folder}): {self.epochs_heads} heads-only + {self.epochs} full epochs, "
                f"{self.steps:,} steps of batch {self.batch_size}, peak lr {self.lr_heads:g} (heads) and {self.lr:g} "
                f"(full) per 256 images{loss}; it refined {base}")


def find_refine_run(profile: ProfileInput) -> RefineRun | None:
    """The refine run whose exported checkpoint the profile was made from (config.json beside the checkpoint), or
    None when the checkpoint does not sit in a refine run folder."""
    import csv
    import json

    checkpoint = profile.checkpoint
    if not checkpoint:
        return None
    folder = Path(checkpoint).parent
    try:
        resolved = json.loads((folder / "config.json").read_text())
        config = resolved["config"]
        run = RefineRun(folder=folder, epochs_heads=int(config["epochs_heads"]), epochs=int(config["epochs"]),
                        steps=int(resolved.get("total_steps", 0)), batch_size=int(config["batch_size"]),
                        lr_heads=float(config["lr_heads"]), lr=float(config["lr"]), final_loss=None,
                        base_weights=str((resolved.get("model") or {}).get("weights") or "?"),
                        ema_progress=None if resolved.get("ema_progress") is None else float(resolved["ema_progress"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        with open(folder / "log.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        if rows:
            run = RefineRun(**{**run.__dict__, "final_loss": float(rows[-1]["loss"]),
                               "steps": int(rows[-1]["step"]) if rows[-1].get("step") else run.steps})
    except (OSError, ValueError, KeyError):
        pass
    return run


def weights_phrase(profile: ProfileInput) -> str:
    """How the profile's weights read in prose: "random initialisation" for a random init, else the file or tag."""
    return "random initialisation (no pretrained weights)" if profile.weights == "random" else profile.weights


def _first(table: pd.DataFrame, column: str) -> str:
    return str(table[column].iloc[0]) if column in table and len(table) else "?"

