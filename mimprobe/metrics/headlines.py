"""The headline curves of a profile table (what `profile.png` draws and the best-block table ranks).

Pure functions of the long table (DESIGN.md columns), shared by `metrics.profile`, `metrics.plot` and the pipeline.

Every curve carries how sure its values are (`headline_curve`):

* k-NN and linear-probe top-1 with per-sample hits (``predictions.npz``): Wilson 95 % intervals over the evaluation
  images (`mimprobe.metrics.intervals`); the blocks "not distinguishable from the best" are those whose exact
  McNemar test against the best block, on the same images, gives p >= 0.05.
* k-means ACC: the same binomial interval over the images it clustered (it holds the cluster-to-class matching
  fixed, so it is a lower bound on the spread).
* Low-shot means: ± one standard deviation over the seeds (``lowshot_top1_std``); blocks whose band overlaps the
  best block's are not distinguishable from it.
* NMI and the effective rank have no interval; only the best block itself is reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .intervals import DEFAULT_LEVEL, mcnemar_pvalue, wilson_interval
from .knn_presets import PRESETS
from .registry import metric_info

PRIMARY_K = {name: preset.headline_k for name, preset in PRESETS.items()}  # the k each preset's curve reports


@dataclass(frozen=True)
class Headline:
    """A curve worth plotting and ranking: one metric on one split with fixed parameters."""

    title: str
    metric: str
    split: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def higher_is_better(self) -> bool:
        """From the registry (`mimprobe.metrics.registry`): every headline metric is a higher-is-better one today."""
        info = metric_info(self.metric)
        return info is None or info.direction != "lower"


def headlines(preset: str, table: pd.DataFrame) -> list[Headline]:
    """The curves of the plot and the best-block table, those present in ``table``."""
    eval_splits = [s for s in ("test", "val", "train-holdout") if s in set(table["split"])]
    eval_split = eval_splits[0] if eval_splits else "train"
    knn_eval = "train-loo" if "train-loo" in set(table["split"]) else eval_split
    k = PRIMARY_K[preset]
    candidates = [
        Headline(f"k-NN top-1 ({preset}, k={k}), {knn_eval}", "knn_top1", knn_eval, {"preset": preset, "k": k}),
        Headline(f"k-NN top-1 ({preset}, k={k}), val (placement)", "knn_top1", "val", {"preset": preset, "k": k}),
        Headline(f"linear probe top-1, {eval_split}", "linear_top1", eval_split),
        Headline(f"1-shot top-1 (mean of 3), {eval_split}", "lowshot_top1_mean", eval_split, {"shots": 1}),
        Headline(f"5-shot top-1 (mean of 3), {eval_split}", "lowshot_top1_mean", eval_split, {"shots": 5}),
        Headline(f"1% labels top-1 (mean of 3), {eval_split}", "lowshot_top1_mean", eval_split, {"percent": 1}),
        Headline(f"k-means ACC, {eval_split}", "cluster_acc", eval_split),
        Headline(f"k-means NMI, {eval_split}", "cluster_nmi", eval_split),
        Headline("effective rank (RankMe), train", "rankme", "train"),
    ]
    return [h for h in candidates if not select_headline(table, h).empty]


def select_headline(table: pd.DataFrame, headline: Headline) -> pd.DataFrame:
    """The table's rows of one headline: its metric and split, and rows whose params hold the headline's."""
    rows = table[(table["metric"] == headline.metric) & (table["split"] == headline.split)]
    if headline.params and not rows.empty:
        params = rows["params"].map(json.loads)
        keep = params.map(lambda p: all(p.get(key) == value for key, value in headline.params.items()))
        rows = rows[keep]
    return rows


def headline_curve(table: pd.DataFrame, headline: Headline, pooling: str, *, predictions: Any = None,
                   level: float = DEFAULT_LEVEL) -> pd.DataFrame:
    """One headline's curve for one pooling, with its uncertainty (see the module docstring).

    Args:
        table: The profile's long table.
        headline: Which curve.
        pooling: Which pooling's rows.
        predictions: The profile's `SamplePredictions` (``predictions.npz``), or None (then only low-shot curves
            get a band).
        level: Coverage of the binomial intervals.

    Returns:
        One row per block, sorted: ``block``, ``value`` (mean of the block's rows), ``low``, ``high`` (NaN without
        an interval), ``n`` (evaluation images behind a binomial interval, else 0), ``interval`` (what the band is:
        ``"wilson"``, ``"seed-sd"`` or ``""``) and ``hits`` (the (n,) bool correctness, or None).
    """
    rows = select_headline(table, headline)
    rows = rows[rows["pooling"] == pooling]
    records = []
    for block, group in rows.groupby("block", sort=True):
        value = float(group["value"].mean())
        record = {"block": int(block), "value": value, "low": np.nan, "high": np.nan, "n": 0, "interval": "",
                  "hits": None}
        if headline.metric in ("knn_top1", "linear_top1") and predictions is not None and len(group) == 1:
            hits = predictions.get(metric=headline.metric, split=headline.split, block=int(block), pooling=pooling,
                                   params=str(group["params"].iloc[0]))
            if hits is not None and len(hits):
                low, high = wilson_interval(int(np.count_nonzero(hits)), len(hits), level=level)
                record.update(low=float(low), high=float(high), n=len(hits), interval="wilson", hits=hits)
        elif headline.metric == "cluster_acc":
            n = _evaluated_images(group, headline.split, predictions)
            if n:
                low, high = wilson_interval(round(value * n), n, level=level)
                record.update(low=float(low), high=float(high), n=n, interval="wilson")
        elif headline.metric == "lowshot_top1_mean":
            spread = table[(table["metric"] == "lowshot_top1_std") & (table["split"] == headline.split)
                           & (table["pooling"] == pooling) & (table["block"] == block)
                           & table["params"].isin(set(group["params"]))]
            if not spread.empty:
                sd = float(spread["value"].mean())
                record.update(low=value - sd, high=value + sd, interval="seed-sd")
        records.append(record)
    return pd.DataFrame.from_records(records, columns=["block", "value", "low", "high", "n", "interval", "hits"])


def _evaluated_images(group: pd.DataFrame, split: str, predictions: Any) -> int:
    """How many evaluation images a row was measured on: its ``eval_samples`` subsample, else the whole split as
    the profile's predictions recorded it (0 when unknown)."""
    sample = json.loads(str(group["params"].iloc[0])).get("eval_samples")
    if sample:
        return int(sample)
    if predictions is not None and split in predictions.rows:
        return len(predictions.rows[split])
    return 0


def indistinguishable_blocks(curve: pd.DataFrame, best_block: int, *, alpha: float = 1 - DEFAULT_LEVEL) -> list[int]:
    """Blocks of a `headline_curve` that the data cannot tell apart from ``best_block`` (the best included).

    With per-sample hits: exact McNemar p >= ``alpha`` against the best block on the same images. With a band
    only: the block's band overlaps the best block's. Without either: the best block alone.
    """
    best = curve[curve["block"] == best_block].iloc[0]
    tied = []
    for row in curve.itertuples(index=False):
        if row.block == best_block:
            tied.append(int(row.block))
        elif best.hits is not None and row.hits is not None and len(row.hits) == len(best.hits):
            if mcnemar_pvalue(best.hits, row.hits) >= alpha:
                tied.append(int(row.block))
        elif np.isfinite(best.low) and np.isfinite(row.low) and row.low <= best.high and row.high >= best.low:
            tied.append(int(row.block))
    return tied


def best_blocks(table: pd.DataFrame, preset: str, *, predictions: Any = None) -> pd.DataFrame:
    """Per headline and pooling: the best block, its value and interval, the blocks not distinguishable from it,
    and the last block's value.

    Columns: ``metric`` (the curve's title), ``table_metric`` and ``unit`` (its registry entry), ``pooling``,
    ``best_block``, ``best_value``, ``best_low``, ``best_high`` (NaN without an
    interval), ``interval`` (``"wilson"``: binomial 95 % over ``n`` images; ``"seed-sd"``: ± one s.d. over seeds),
    ``n``, ``tied_blocks`` (comma list, the best included: see `indistinguishable_blocks`), ``last_block``,
    ``last_value``.
    """
    records = []
    for headline in headlines(preset, table):
        rows = select_headline(table, headline)
        for pooling in dict.fromkeys(rows["pooling"]):
            curve = headline_curve(table, headline, pooling, predictions=predictions)
            values = curve["value"].to_numpy()
            position = int(np.argmax(values) if headline.higher_is_better else np.argmin(values))
            best, last = curve.iloc[position], curve.iloc[-1]
            tied = indistinguishable_blocks(curve, int(best["block"]))
            info = metric_info(headline.metric)
            records.append({"metric": headline.title, "table_metric": headline.metric,
                            "unit": info.unit if info else "number", "pooling": pooling,
                            "best_block": int(best["block"]),
                            "best_value": float(best["value"]), "best_low": float(best["low"]),
                            "best_high": float(best["high"]), "interval": best["interval"], "n": int(best["n"]),
                            "tied_blocks": ",".join(map(str, tied)), "last_block": int(last["block"]),
                            "last_value": float(last["value"])})
    return pd.DataFrame.from_records(records, columns=["metric", "table_metric", "unit", "pooling", "best_block",
                                                        "best_value", "best_low",
                                                        "best_high", "interval", "n", "tied_blocks", "last_block",
                                                        "last_value"])
