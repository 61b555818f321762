"""Placement without labels: rule ``label-free[:METRIC]`` reads a label-free curve of the profile (train split) and
starts the heads at the block its published rule picks (`mimprobe.metrics.labelfree.calibration.RULES`).

The default metric is the TwoNN intrinsic dimension: of the label-free candidates it is the one with a published
*block-level* selection result (Valeriani et al., NeurIPS 2023, arXiv 2302.00294: the first minimum of the ID after
its early peak marks the layer with the most semantic representation, on iGPT and protein language models); the
others (alpha-ReQ, NESum, RankMe, entropy, learnability) were shown to rank models or runs, not blocks.
A pick is a hypothesis on unlabelled data; on labelled profiles `mimprobe profile` measures how well each metric
tracks k-NN across the blocks (profile.json's ``calibration``), and the reason quotes it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..errors import BadInputError
from ..metrics.labelfree.calibration import RULES as PICK_RULES
from ..metrics.labelfree.calibration import pick_block

LABEL_FREE = "label-free"
DEFAULT_METRIC = "twonn_id"
METRICS = tuple(PICK_RULES)


def parse_rule(text: str) -> tuple[str, str | None]:
    """``label-free`` -> ("label-free", DEFAULT_METRIC); ``label-free:alpha_req`` -> ("label-free", "alpha_req");
    any other rule -> (rule, None).

    Raises:
        BadInputError: An unknown label-free metric.
    """
    if text != LABEL_FREE and not text.startswith(LABEL_FREE + ":"):
        return text, None
    metric = text.partition(":")[2] or DEFAULT_METRIC
    if metric not in METRICS:
        raise BadInputError(f"unknown label-free metric {metric!r} in --rule {text}: use label-free or "
                            f"label-free:METRIC with METRIC one of {', '.join(METRICS)}")
    return LABEL_FREE, metric


def label_free_curve(table: pd.DataFrame, metric: str, pooling: str) -> tuple[tuple[int, float], ...]:
    """(block, value) of a label-free metric on the train split, one per profiled block with a value.

    Raises:
        BadInputError: The profile has no such rows (profiled without the metric's family).
    """
    rows = table[(table["metric"] == metric) & (table["split"] == "train") & (table["pooling"] == pooling)]
    if rows.empty:
        from ..metrics.registry import metric_info

        family = metric_info(metric).family if metric_info(metric) else metric
        raise BadInputError(f"the profile has no {metric} rows for pooling {pooling}: re-run `mimprobe profile` "
                            f"with --metrics {family} (or all)")
    curve = rows.groupby("block")["value"].mean().sort_index()
    return tuple((int(block), float(value)) for block, value in curve.items() if np.isfinite(value))


def label_free_pick(table: pd.DataFrame, metric: str, pooling: str) -> tuple[int, tuple[tuple[int, float], ...]]:
    """The block the metric's published rule picks, and the curve it read."""
    curve = label_free_curve(table, metric, pooling)
    if len(curve) < 2:
        raise BadInputError(f"the {metric} curve has {len(curve)} block(s): profile more blocks to place heads")
    picked = pick_block(np.array([value for _, value in curve]), PICK_RULES[metric].pick)
    return curve[picked][0], curve


def calibration_caveat(calibration: list[dict[str, Any]] | None, metric: str, pooling: str) -> str:
    """What this profile says of the metric's reliability: its rho with k-NN top-1 across blocks and the accuracy
    lost at its pick, or that no labels were there to check it."""
    rule = PICK_RULES[metric]
    found = [record for record in (calibration or []) if record.get("metric") == metric
             and record.get("pooling") == pooling and record.get("against") == "knn_top1"]
    if not found:
        return (f"a hypothesis: no labels in this profile to check it ({rule.source}; {rule.note})")
    record = found[0]
    low, high = record.get("rho_low"), record.get("rho_high")
    interval = f" [{low:+.2f}, {high:+.2f}]" if low is not None and high is not None else ""
    rho = record.get("rho")
    rho_text = f"{rho:+.2f}{interval}" if rho is not None else "undefined"
    return (f"on this profile its Spearman rho with k-NN top-1 across blocks is {rho_text}, and its pick loses "
            f"{100 * float(record.get('accuracy_lost') or 0):.1f} points of k-NN against block "
            f"{record.get('best_block')} ({rule.source})")
