"""Calibration of every label-free curve of a labelled profile against its k-NN and linear top-1 curves.

For each label-free metric of the registry with a pick rule (`mimprobe.metrics.registry.label_free_curves`), each
pooling and each labelled curve (k-NN top-1 of the preset's headline k and linear-probe top-1, both on the
evaluation split): Spearman's rho across blocks with its bootstrap interval over the evaluation images (the
profile's ``predictions.npz`` hits), the block the metric's published rule picks and the accuracy lost there
(`calibration.calibrate`). The label-free curve is held fixed in the bootstrap (`calibration` says why), so the
interval says how sure rho is given the finite evaluation set; with a dozen blocks it is wide, and a reader should
see that.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ...errors import BadInputError
from .calibration import RULES, calibrate

COLUMNS = ["metric", "pooling", "against", "split", "rho", "rho_low", "rho_high", "oriented_rho", "oriented_low",
           "oriented_high", "picked_block", "best_block", "accuracy_at_pick", "best_accuracy", "accuracy_lost",
           "n_blocks", "n_resamples", "pick", "source"]


def _labelled_curves(table: pd.DataFrame, preset: str) -> list[Any]:
    """The k-NN (eval split) and linear-probe top-1 headlines present in the table."""
    from ..headlines import headlines

    return [h for h in headlines(preset, table) if h.metric in ("knn_top1", "linear_top1") and h.split != "val"]


def calibrate_profile(table: pd.DataFrame, *, preset: str, predictions: Any = None, n_resamples: int = 1000,
                      seed: int = 0) -> pd.DataFrame:
    """One row per (label-free metric, pooling, labelled curve); empty without labelled or label-free curves.

    Columns: `COLUMNS` (``against`` is the labelled metric, ``split`` its split; intervals NaN without per-image
    hits).
    """
    from ..headlines import headline_curve
    from ..registry import label_free_curves

    records = []
    labelled = _labelled_curves(table, preset)
    for info in label_free_curves():
        rows = table[(table["metric"] == info.name) & (table["split"] == "train")]
        for pooling in dict.fromkeys(rows["pooling"]):
            curve = rows[rows["pooling"] == pooling].groupby("block")["value"].mean()
            for headline in labelled:
                accuracy = headline_curve(table, headline, pooling, predictions=predictions)
                if accuracy.empty:
                    continue
                blocks = [int(b) for b in accuracy["block"]]
                values = np.array([curve.get(block, np.nan) for block in blocks], dtype=np.float64)
                hits = None
                if all(h is not None for h in accuracy["hits"]) and len({len(h) for h in accuracy["hits"]}) == 1:
                    hits = np.stack(list(accuracy["hits"]))
                try:
                    result = calibrate(info.name, values, accuracy["value"].to_numpy(dtype=np.float64),
                                       blocks=blocks, hits=hits, n_resamples=n_resamples, seed=seed)
                except BadInputError:  # fewer than 3 blocks with a value: no rank correlation
                    continue
                records.append({**{key: getattr(result, key) for key in COLUMNS if hasattr(result, key)},
                                "metric": info.name, "pooling": pooling, "against": headline.metric,
                                "split": headline.split, "pick": RULES[info.name].pick,
                                "source": RULES[info.name].source})
    return pd.DataFrame.from_records(records, columns=COLUMNS)


def calibration_lines(calibration: pd.DataFrame) -> list[str]:
    """Console lines: per label-free metric and pooling, rho against k-NN with its interval, the pick and the k-NN
    accuracy lost there; a closing line says when no metric's interval excludes zero."""
    if calibration.empty:
        return []
    lines = ["label-free vs labelled (Spearman rho across blocks with k-NN top-1, 95 % interval over images; the "
             "block each metric's rule picks and the k-NN accuracy lost there):"]
    knn = calibration[calibration["against"] == "knn_top1"]
    for record in knn.to_dict(orient="records"):
        interval = (f" [{record['rho_low']:+.2f}, {record['rho_high']:+.2f}]"
                    if np.isfinite(record["rho_low"]) else "")
        rho = (f"rho {record['rho']:+.2f}{interval}" if np.isfinite(record["rho"])
               else "rho undefined (a flat curve)")
        where = record['pooling'] + (f" {record['point']}" if record.get("point", "block") != "block" else "")
        lines.append(f"  {record['metric']:<22} {where:<9} {rho}  picks "
                     f"block {record['picked_block']} ({record['pick']}), loses "
                     f"{100 * record['accuracy_lost']:.1f} points against block {record['best_block']}")
    reliable = knn[(knn["oriented_low"] > 0)] if "oriented_low" in knn else knn.iloc[0:0]
    if reliable.empty:
        lines.append("  no label-free metric tracks k-NN here beyond its interval: place heads with labels")
    return lines
