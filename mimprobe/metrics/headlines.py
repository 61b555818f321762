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
from typing import Any

import numpy as np
import pandas as pd

from .curves import Curve
from .intervals import DEFAULT_LEVEL, mcnemar_pvalue, wilson_interval
from .knn_presets import PRESETS

PRIMARY_K = {name: preset.headline_k for name, preset in PRESETS.items()}  # the k each preset's curve reports


def headlines(preset: str, table: pd.DataFrame) -> list[Curve]:
    """The curves of the plot and the best-block table, those present in ``table``."""
    eval_splits = [s for s in ("test", "val", "train-holdout") if s in set(table["split"])]
    eval_split = eval_splits[0] if eval_splits else "train"
    knn_eval = "train-loo" if "train-loo" in set(table["split"]) else eval_split
    knn = {"preset": preset, "k": PRIMARY_K[preset]}
    candidates = [
        Curve.of("knn_top1", knn_eval, knn),
        Curve.of("knn_top1", "val", knn),            # the curve placement reads
        Curve.of("linear_top1", eval_split),
        Curve.of("lowshot_top1_mean", eval_split, {"shots": 1}),
        Curve.of("lowshot_top1_mean", eval_split, {"shots": 5}),
        Curve.of("lowshot_top1_mean", eval_split, {"percent": 1}),
        Curve.of("cluster_acc", eval_split),
        Curve.of("cluster_nmi", eval_split),
        Curve.of("rankme", "train"),
    ]
    return list(dict.fromkeys(c for c in candidates if not c.select(table).empty))


def headline_curve(table: pd.DataFrame, headline: Curve, pooling: str, *, predictions: Any = None,
                   level: float = DEFAULT_LEVEL) -> pd.DataFrame:
    """One headline's curve for one pooling, with its uncertainty (see the module docstring).

    Args:
        table: The profile's long table.
        headline: Which curve (a `Curve`, e.g. one of `headlines`).
        pooling: Which pooling's rows.
        predictions: The profile's `SamplePredictions` (``predictions.npz``), or None (then only low-shot curves
            get a band).
        level: Coverage of the binomial intervals.

    Returns:
        One row per block, sorted: ``block``, ``value`` (mean of the block's rows), ``low``, ``high`` (NaN without
        an interval), ``n`` (evaluation images behind a binomial interval, else 0), ``interval`` (what the band is:
        ``"wilson"``, ``"seed-sd"`` or ``""``) and ``hits`` (the (n,) bool correctness, or None).
    """
    rows = headline.select(table)
    rows = rows[rows["pooling"] == pooling]
    records = []
    for block, group in rows.groupby("block", sort=True):
        value = float(group["value"].mean())
        record = {"block": int(block), "value": value, "low": np.nan, "high": np.nan, "n": 0, "interval": "",
                  "hits": None}
        if headline.has_samples and predictions is not None and len(group) == 1:
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
        rows = headline.select(table)
        for pooling in dict.fromkeys(rows["pooling"]):
            curve = headline_curve(table, headline, pooling, predictions=predictions)
            best_block, _ = headline.best(curve.set_index("block")["value"])
            best, last = curve[curve["block"] == best_block].iloc[0], curve.iloc[-1]
            tied = indistinguishable_blocks(curve, int(best["block"]))
            records.append({"metric": headline.title, "table_metric": headline.metric,
                            "unit": headline.unit, "pooling": pooling,
                            "best_block": int(best["block"]),
                            "best_value": float(best["value"]), "best_low": float(best["low"]),
                            "best_high": float(best["high"]), "interval": best["interval"], "n": int(best["n"]),
                            "tied_blocks": ",".join(map(str, tied)), "last_block": int(last["block"]),
                            "last_value": float(last["value"])})
    return pd.DataFrame.from_records(records, columns=["metric", "table_metric", "unit", "pooling", "best_block",
                                                        "best_value", "best_low",
                                                        "best_high", "interval", "n", "tied_blocks", "last_block",
                                                        "last_value"])
