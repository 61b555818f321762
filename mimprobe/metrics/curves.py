"""A curve of a profile table: one metric on one split with fixed protocol parameters, over blocks.

The one model of a curve that every consumer uses: the profile's headlines and best-block table
(`mimprobe.metrics.headlines`), profile.png (`mimprobe.metrics.plot`), the compare report (`mimprobe.report`) and
placement's validation curve (`mimprobe.placement.curve`). A profile's long table holds one row per (split, block,
pooling, metric, params); a curve picks the rows of its metric and split whose params agree with its own, per
pooling. What a metric is (title, direction, unit) comes from the registry (`mimprobe.metrics.registry`).

Rows that differ only by hyper-parameters chosen per block (the linear probe's ``lr``/``weight_decay``/``C``, picked
on a validation split) belong to one curve: `protocol_params` leaves them out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .registry import metric_info

CHOSEN_PER_BLOCK = ("lr", "weight_decay", "C", "grid_c_searched")  # chosen per block on validation: not a curve's identity
CLASS_METRIC = "knn_class_top1"   # per-class rows: the per-class table's subject, never a curve
SAMPLE_METRICS = ("knn_top1", "linear_top1")   # means of per-sample correctness (predictions.npz holds the hits)


def canonical_json(values: dict[str, Any]) -> str:
    return json.dumps(values, sort_keys=True, separators=(",", ":"))


def protocol_params(params: str | dict[str, Any] | None) -> str:
    """A row's params without the per-block choices and the class, as canonical JSON (a curve's ``params``)."""
    values = json.loads(params) if isinstance(params, str) and params else dict(params or {})
    return canonical_json({k: v for k, v in values.items() if k not in CHOSEN_PER_BLOCK and k != "class"})


@dataclass(frozen=True, order=True)
class Curve:
    """One series over blocks: a table metric on a split, with protocol parameters (canonical JSON).

    ``params`` may name fewer parameters than the rows hold (a headline names the k-NN preset and k): the curve then
    takes every row that agrees on the ones it names (`select`).
    """

    metric: str
    split: str
    params: str = "{}"

    @classmethod
    def of(cls, metric: str, split: str, params: dict[str, Any] | str | None = None) -> "Curve":
        return cls(metric, split, protocol_params(params))

    @property
    def param_dict(self) -> dict[str, Any]:
        return json.loads(self.params)

    @property
    def name(self) -> str:
        """The metric's registry title (the table name for a metric the registry does not know)."""
        info = metric_info(self.metric)
        return info.title if info is not None else self.metric

    @property
    def title(self) -> str:
        """The metric, its protocol and its split: "k-NN top-1 (mim-refiner, k=10, T=0.07), test"."""
        p = self.param_dict
        name = self.name
        if self.metric.startswith("knn"):
            protocol = [str(p["preset"])] if "preset" in p else []
            protocol += [f"{key}={p[key]}" for key in ("k", "T") if key in p]
            name += f" ({', '.join(protocol)})" if protocol else ""
        elif self.metric.startswith("lowshot"):
            what = f"{p['shots']}-shot" if "shots" in p else f"{p.get('percent', '?')}% labels"
            name = f"{what} top-1 (mean over seeds)"
        return f"{name}, {self.split}"

    @property
    def short_name(self) -> str:
        """The metric without its protocol and split, for axis labels."""
        return self.title.split(" (")[0] if self.metric.startswith("lowshot") else self.name

    @property
    def slug(self) -> str:
        """A file-name-safe identifier, unique per curve."""
        p = self.param_dict
        extra = "".join(f"-{k}{p[k]}" for k in ("k", "shots", "percent") if k in p)
        text = f"{self.metric}-{self.split}{extra}"
        return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)

    @property
    def unit(self) -> str:
        info = metric_info(self.metric)
        return info.unit if info is not None else "number"

    @property
    def is_percent(self) -> bool:
        """Accuracies (the registry's ``fraction`` unit): shown as percentages, differences in points."""
        return self.unit == "fraction"

    @property
    def unit_suffix(self) -> str:
        """What follows a formatted value: "%" for accuracies."""
        return "%" if self.is_percent else ""

    @property
    def higher_is_better(self) -> bool:
        info = metric_info(self.metric)
        return info is None or info.direction != "lower"

    @property
    def has_samples(self) -> bool:
        """Whether the value is a mean of per-sample correctness (predictions.npz holds it)."""
        return self.metric in SAMPLE_METRICS

    def select(self, table: pd.DataFrame) -> pd.DataFrame:
        """The table's rows of this curve (all poolings and blocks): its metric and split, and rows whose params
        hold this curve's."""
        rows = table[(table["metric"] == self.metric) & (table["split"] == self.split)]
        wanted = self.param_dict
        if wanted and not rows.empty:
            keep = rows["params"].map(lambda text: _agrees(text, wanted))
            rows = rows[keep.to_numpy(dtype=bool)]
        return rows

    def values(self, table: pd.DataFrame, pooling: str) -> pd.Series:
        """(block → value) for one pooling, sorted by block; rows of one block (seeds, per-block choices) are
        averaged."""
        rows = self.select(table)
        rows = rows[rows["pooling"] == pooling]
        return rows.groupby("block")["value"].mean().sort_index().rename(None)

    def best(self, series: pd.Series) -> tuple[int, float]:
        """The best block of a (block → value) series (the first one on ties) and its value."""
        values = series.to_numpy(dtype=float)
        index = int(np.argmax(values) if self.higher_is_better else np.argmin(values))
        return int(series.index[index]), float(values[index])

    def format_value(self, value: float | None) -> str:
        """Accuracies as percentages with 1 decimal; ranks with 1 decimal; other scores with 3 decimals."""
        if value is None or not np.isfinite(value):
            return "–"
        if self.is_percent:
            return f"{100 * value:.1f}"
        return f"{value:.1f}" if self.metric == "rankme" else f"{value:.3f}"

    def format_delta(self, delta: float | None) -> str:
        """A signed difference: percentage points for accuracies."""
        if delta is None or not np.isfinite(delta):
            return "–"
        if self.is_percent:
            return f"{100 * delta:+.1f}"
        return f"{delta:+.1f}" if self.metric == "rankme" else f"{delta:+.3f}"


def _agrees(text: Any, wanted: dict[str, Any]) -> bool:
    have = json.loads(text) if isinstance(text, str) and text else {}
    return all(have.get(key) == value for key, value in wanted.items())


def curve_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The table's curve rows with a ``curve_params`` column (`protocol_params`), one value per (curve, pooling,
    block).

    Per-seed rows of metrics that have a ``_mean`` row, ``_std`` rows, per-class rows and rows that read several
    blocks at once (the registry's ``per_block=False``: multi-block readouts, `mimprobe.metrics.readout`, shown as
    reference lines instead) are left out; a duplicate (curve, pooling, block) is averaged, as `Curve.values` does.
    """
    metrics = set(table["metric"])
    drop = {m for m in metrics if m.endswith("_std") or f"{m}_mean" in metrics} | {CLASS_METRIC}
    drop |= {m for m in metrics if (info := metric_info(m)) is not None and not info.per_block}
    rows = table[~table["metric"].isin(drop)].copy()
    rows["curve_params"] = [protocol_params(p) for p in rows["params"]]
    grouped = rows.groupby(["metric", "split", "curve_params", "pooling", "block"], sort=False)
    return grouped.agg(value=("value", "mean"), params=("params", "first")).reset_index()


def table_curves(table: pd.DataFrame) -> list[Curve]:
    """Every curve of a table, each with its full protocol, in table order."""
    rows = curve_rows(table)
    return list(dict.fromkeys(Curve(m, s, p) for m, s, p in zip(rows["metric"], rows["split"], rows["curve_params"])))
