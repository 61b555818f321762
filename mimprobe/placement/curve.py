"""The validation curve a placement rule reads: one metric on the profile's validation split, never on test."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ..errors import BadInputError
from ..metrics.curves import Curve

PLACEMENT_METRICS = ("knn", "linear")
LABELS = {"knn": "k-NN top-1", "linear": "linear-probe top-1"}
_TABLE_COLUMNS = ("split", "block", "pooling", "metric", "params", "value")


@dataclass(frozen=True)
class ValidationCurve:
    """The values of one validation `Curve` for one pooling, one per block (mean over seeds when a profile repeats
    rows), and what placement says about the choice of curve."""

    metric: str                       # the placement metric: knn or linear
    curve: Curve
    pooling: str
    values: tuple[tuple[int, float], ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def metric_name(self) -> str:
        return self.curve.metric

    @property
    def split(self) -> str:
        return self.curve.split

    @property
    def params(self) -> dict[str, Any]:
        return self.curve.param_dict


def validation_curve(table: pd.DataFrame, *, metric: str = "knn", pooling: str = "cls", preset: str | None = None,
                     k: int | None = None) -> ValidationCurve:
    """The curve placement reads: k-NN top-1 on ``val`` (else ``train-loo``), or ``linear_val_top1``; never test.

    Args:
        table: A profile's long table (columns of DESIGN.md: split, block, pooling, metric, params, value, ...).
        metric: ``"knn"`` or ``"linear"``.
        pooling: Token pooling of the curve.
        preset, k: The k-NN protocol when the profile holds several (default: ``preset`` if given, else
            mim-refiner if present, else the first preset in the table; then the smallest k and temperature).

    Raises:
        BadInputError: The profile lacks the metric, its validation split, the pooling, or has NaN values.
    """
    if metric not in PLACEMENT_METRICS:
        raise BadInputError(f"unknown placement metric {metric!r}: use {' or '.join(PLACEMENT_METRICS)}")
    missing = [column for column in _TABLE_COLUMNS if column not in table.columns]
    if missing:
        raise BadInputError(f"not a profile table: columns {', '.join(missing)} are missing; give the output of "
                            "`mimprobe profile`")
    name = "knn_top1" if metric == "knn" else "linear_val_top1"
    rows = table[table["metric"] == name]
    splits = ("val", "train-loo") if metric == "knn" else ("val",)
    split = next((s for s in splits if (rows["split"] == s).any()), None)
    if split is None:
        present = sorted(set(table["metric"]))
        usable = [m for m in PLACEMENT_METRICS if m != metric and _has_validation(table, m)]
        hint = f"use --metric {usable[0]}, or " if usable else ""
        what = (f"{name} only on {', '.join(sorted(set(rows['split'])))}, never used for placement" if len(rows)
                else f"no {name} rows")
        raise BadInputError(f"the profile has {what} (it has {', '.join(present) or 'no metrics'}): no "
                            f"{LABELS[metric]} on a validation split; {hint}re-run `mimprobe profile` with "
                            f"--metrics {metric}")
    rows = rows[rows["split"] == split]
    if not (rows["pooling"] == pooling).any():
        raise BadInputError(f"the profile has no {name} for pooling {pooling!r} (it has "
                            f"{', '.join(sorted(set(rows['pooling'])))}): use --pooling with one of them")
    rows = rows[rows["pooling"] == pooling]
    notes: list[str] = []
    params: dict[str, Any] = {}
    if metric == "knn":
        rows, params, note = _pick_knn_protocol(rows, preset=preset, k=k)
        notes += [note] if note else []
    if split == "train-loo":
        notes.append("the profile has no validation split: the curve is k-NN leave-one-out on train (train-loo)")
    if rows["value"].isna().any():
        bad = int(rows.loc[rows["value"].isna(), "block"].iloc[0])
        raise BadInputError(f"{name} on {split} is NaN at block {bad}: re-run `mimprobe profile`")
    curve = Curve.of(name, split, params)
    values = curve.values(table, pooling)
    return ValidationCurve(metric=metric, curve=curve, pooling=pooling,
                           values=tuple((int(b), float(v)) for b, v in values.items()), notes=tuple(notes))


def _has_validation(table: pd.DataFrame, metric: str) -> bool:
    if metric == "knn":
        return bool(((table["metric"] == "knn_top1") & table["split"].isin(["val", "train-loo"])).any())
    return bool(((table["metric"] == "linear_val_top1") & (table["split"] == "val")).any())


def _pick_knn_protocol(rows: pd.DataFrame, *, preset: str | None, k: int | None
                       ) -> tuple[pd.DataFrame, dict[str, Any], str | None]:
    """Keep the rows of one k-NN protocol (preset, k, T); say which when there was a choice."""
    params = rows["params"].map(json.loads)
    presets = list(dict.fromkeys(p.get("preset") for p in params))
    if preset is not None and preset not in presets:
        raise BadInputError(f"the profile's k-NN rows use preset {', '.join(map(str, presets))}, not {preset}: "
                            f"re-run `mimprobe profile --preset {preset}`")
    chosen = preset if preset is not None else ("mim-refiner" if "mim-refiner" in presets else presets[0])
    keep = params.map(lambda p: p.get("preset") == chosen)
    ks = sorted({int(p["k"]) for p in params[keep] if "k" in p})
    if k is not None and k not in ks:
        raise BadInputError(f"the profile's k-NN rows ({chosen}) have k = {', '.join(map(str, ks))}, not {k}")
    chosen_k = k if k is not None else (ks[0] if ks else None)
    if chosen_k is not None:
        keep &= params.map(lambda p: p.get("k") == chosen_k)
    temperatures = sorted({float(p["T"]) for p in params[keep] if "T" in p})
    if temperatures:
        keep &= params.map(lambda p: p.get("T") is None or float(p["T"]) == temperatures[0])
    selected = params[keep].iloc[0]
    note = None
    if len(presets) > 1 or len(ks) > 1 or len(temperatures) > 1:
        note = (f"the profile has several k-NN protocols; placement uses preset {chosen}, k={chosen_k}, "
                f"T={temperatures[0] if temperatures else None}")
    return rows[keep.to_numpy()], dict(selected), note
