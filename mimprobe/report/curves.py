"""Which curves a comparison shows, and in which order (a curve is `mimprobe.metrics.curves.Curve`).

Per-seed low-shot rows and standard deviations are summarised by their ``_mean`` rows; per-class rows
(``knn_class_top1``) are the subject of the per-class table, not of curves (`curve_rows`).
"""

from __future__ import annotations

import pandas as pd

from ..metrics.curves import Curve, table_curves
from ..metrics.headlines import PRIMARY_K


def curve_keys(*tables: pd.DataFrame, preset: str) -> list[Curve]:
    """Keys present in every table, the headline curves first (k-NN of the preset's k on the evaluation split,
    linear probe, low-shot, clustering, rank), then the others in table order."""
    found = [table_curves(table) for table in tables]
    common = [key for key in found[0] if all(key in other for other in found[1:])]
    k = PRIMARY_K.get(preset, 10)
    order = ["knn_top1", "linear_top1", "lowshot_top1_mean", "cluster_acc", "cluster_nmi", "rankme", "knn_top5",
             "linear_val_top1"]

    def rank(key: Curve) -> tuple[int, int, int]:
        p = key.param_dict
        metric_rank = order.index(key.metric) if key.metric in order else len(order)
        split_rank = 1 if key.split == "val" else 0
        protocol = 0 if p.get("preset", preset) == preset and p.get("k", k) == k else 1
        return protocol, metric_rank, split_rank

    return sorted(common, key=rank)


def headline_key(keys: list[Curve], preset: str) -> Curve | None:
    """The k-NN top-1 curve of the preset's k on the evaluation split (else the first accuracy curve)."""
    k = PRIMARY_K.get(preset, 10)
    for key in keys:
        p = key.param_dict
        if key.metric == "knn_top1" and key.split != "val" and p.get("k") == k and p.get("preset") == preset:
            return key
    return next((key for key in keys if key.is_percent and key.split != "val"), keys[0] if keys else None)


def curve(rows: pd.DataFrame, key: Curve, pooling: str) -> pd.Series:
    """(block → value) of one curve and pooling from `curve_rows` output, sorted by block."""
    selected = rows[(rows["metric"] == key.metric) & (rows["split"] == key.split) &
                    (rows["curve_params"] == key.params) & (rows["pooling"] == pooling)]
    return selected.set_index("block")["value"].sort_index()
