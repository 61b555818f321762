"""The headline curves of a profile table (what `profile.png` draws and the best-block table ranks).

Pure functions of the long table (DESIGN.md columns), shared by `metrics.profile`, `metrics.plot` and the pipeline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

PRIMARY_K = {"mim-refiner": 10, "dino": 20, "dinov2": 20}


@dataclass(frozen=True)
class Headline:
    """A curve worth plotting and ranking: one metric on one split with fixed parameters."""

    title: str
    metric: str
    split: str
    params: dict[str, Any] = field(default_factory=dict)
    higher_is_better: bool = True


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


def best_blocks(table: pd.DataFrame, preset: str) -> pd.DataFrame:
    """Per headline and pooling: the best block, its value, and the last block's value."""
    records = []
    for headline in headlines(preset, table):
        rows = select_headline(table, headline)
        for pooling, group in rows.groupby("pooling", sort=False):
            curve = group.groupby("block")["value"].mean()
            best = curve.idxmax() if headline.higher_is_better else curve.idxmin()
            records.append({"metric": headline.title, "pooling": pooling, "best_block": int(best),
                            "best_value": float(curve[best]), "last_block": int(curve.index.max()),
                            "last_value": float(curve[curve.index.max()])})
    return pd.DataFrame.from_records(records, columns=["metric", "pooling", "best_block", "best_value", "last_block",
                                                        "last_value"])
