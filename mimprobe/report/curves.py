"""Block curves of a profile table: which (metric, split, protocol) series to compare, their titles and units.

A profile's long table holds one row per (split, block, pooling, metric, params). A *curve* is the series over
blocks of one ``CurveKey`` and one pooling. Rows that only differ by hyper-parameters chosen per block (the linear
probe's ``lr``/``weight_decay``/``C``, picked on a validation split) belong to one curve; per-seed low-shot rows
and standard deviations are summarised by their ``_mean`` rows; per-class rows (``knn_class_top1``) are the
subject of the per-class table, not of curves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..metrics.headlines import PRIMARY_K
from ..metrics.registry import metric_info

CHOSEN_PER_BLOCK = ("lr", "weight_decay", "C", "grid_c_searched")  # chosen per block on validation: not a curve's identity
CLASS_METRIC = "knn_class_top1"


def _name(metric: str) -> str:
    info = metric_info(metric)
    return info.title if info is not None else metric


@dataclass(frozen=True, order=True)
class CurveKey:
    """One series over blocks: a metric on a split with fixed protocol parameters (canonical JSON)."""

    metric: str
    split: str
    params: str = "{}"

    @property
    def param_dict(self) -> dict[str, Any]:
        return json.loads(self.params)

    @property
    def title(self) -> str:
        p = self.param_dict
        name = _name(self.metric)
        if self.metric.startswith("knn"):
            name += f" ({p.get('preset', '?')}, k={p.get('k', '?')}, T={p.get('T', '?')})"
        elif self.metric.startswith("lowshot"):
            what = f"{p['shots']}-shot" if "shots" in p else f"{p.get('percent', '?')}% labels"
            name = f"{what} top-1 (mean over seeds)"
        return f"{name}, {self.split}"

    @property
    def short_name(self) -> str:
        """The metric without its protocol and split, for axis labels."""
        if self.metric.startswith("lowshot"):
            return self.title.split(" (")[0]
        return _name(self.metric)

    @property
    def slug(self) -> str:
        """A file-name-safe identifier, unique per key."""
        p = self.param_dict
        extra = "".join(f"-{k}{p[k]}" for k in ("k", "shots", "percent") if k in p)
        text = f"{self.metric}-{self.split}{extra}"
        return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)

    @property
    def is_percent(self) -> bool:
        """Accuracies, shown as percentages (1 decimal) and differences in percentage points (the registry's
        ``fraction`` unit)."""
        info = metric_info(self.metric)
        return info is not None and info.unit == "fraction"

    @property
    def higher_is_better(self) -> bool:
        info = metric_info(self.metric)
        return info is None or info.direction != "lower"

    @property
    def has_samples(self) -> bool:
        """Whether the value is a mean of per-sample correctness (predictions.npz holds it)."""
        return self.metric in ("knn_top1", "linear_top1")


def curve_params(metric: str, params: str) -> str:
    """The row's params without the per-block choices, as canonical JSON."""
    values = json.loads(params) if params else {}
    kept = {k: v for k, v in values.items() if k not in CHOSEN_PER_BLOCK and k != "class"}
    return json.dumps(kept, sort_keys=True, separators=(",", ":"))


def curve_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The table's curve rows with a ``curve_params`` column, one value per (key, pooling, block).

    Per-seed rows of metrics that have a ``_mean`` row, ``_std`` rows and per-class rows are left out; a duplicate
    (key, pooling, block) is averaged, as `mimprobe.metrics.headlines.best_blocks` does.
    """
    metrics = set(table["metric"])
    drop = {m for m in metrics if m.endswith("_std") or f"{m}_mean" in metrics} | {CLASS_METRIC}
    rows = table[~table["metric"].isin(drop)].copy()
    rows["curve_params"] = [curve_params(m, p) for m, p in zip(rows["metric"], rows["params"])]
    grouped = rows.groupby(["metric", "split", "curve_params", "pooling", "block"], sort=False)
    return grouped.agg(value=("value", "mean"), params=("params", "first")).reset_index()


def curve_keys(*tables: pd.DataFrame, preset: str) -> list[CurveKey]:
    """Keys present in every table, the headline curves first (k-NN of the preset's k on the evaluation split,
    linear probe, low-shot, clustering, rank), then the others in table order."""
    found = [dict.fromkeys(CurveKey(m, s, p) for m, s, p in
                           zip(rows["metric"], rows["split"], rows["curve_params"]))
             for rows in map(curve_rows, tables)]
    common = [key for key in found[0] if all(key in other for other in found[1:])]
    k = PRIMARY_K.get(preset, 10)
    order = ["knn_top1", "linear_top1", "lowshot_top1_mean", "cluster_acc", "cluster_nmi", "rankme", "knn_top5",
             "linear_val_top1"]

    def rank(key: CurveKey) -> tuple[int, int, int]:
        p = key.param_dict
        metric_rank = order.index(key.metric) if key.metric in order else len(order)
        split_rank = 1 if key.split == "val" else 0
        protocol = 0 if p.get("preset", preset) == preset and p.get("k", k) == k else 1
        return protocol, metric_rank, split_rank

    return sorted(common, key=rank)


def headline_key(keys: list[CurveKey], preset: str) -> CurveKey | None:
    """The k-NN top-1 curve of the preset's k on the evaluation split (else the first accuracy curve)."""
    k = PRIMARY_K.get(preset, 10)
    for key in keys:
        p = key.param_dict
        if key.metric == "knn_top1" and key.split != "val" and p.get("k") == k and p.get("preset") == preset:
            return key
    return next((key for key in keys if key.is_percent and key.split != "val"), keys[0] if keys else None)


def curve(rows: pd.DataFrame, key: CurveKey, pooling: str) -> pd.Series:
    """(block → value) of one key and pooling from `curve_rows` output, sorted by block."""
    selected = rows[(rows["metric"] == key.metric) & (rows["split"] == key.split) &
                    (rows["curve_params"] == key.params) & (rows["pooling"] == pooling)]
    return selected.set_index("block")["value"].sort_index()


def best_of(series: pd.Series, key: CurveKey) -> tuple[int, float]:
    """The best block (the first one on ties) and its value."""
    values = series.to_numpy()
    index = int(np.argmax(values) if key.higher_is_better else np.argmin(values))
    return int(series.index[index]), float(values[index])


def format_value(value: float, key: CurveKey) -> str:
    """Accuracies as percentages with 1 decimal; ranks with 1 decimal; other scores with 3 decimals."""
    if value is None or not np.isfinite(value):
        return "–"
    if key.is_percent:
        return f"{100 * value:.1f}"
    return f"{value:.1f}" if key.metric == "rankme" else f"{value:.3f}"


def format_delta(delta: float, key: CurveKey) -> str:
    """A signed difference: percentage points for accuracies."""
    if delta is None or not np.isfinite(delta):
        return "–"
    if key.is_percent:
        return f"{100 * delta:+.1f}"
    return f"{delta:+.1f}" if key.metric == "rankme" else f"{delta:+.3f}"


def unit(key: CurveKey) -> str:
    return "%" if key.is_percent else ""
