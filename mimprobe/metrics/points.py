"""The ``point`` column of a profile table: where in a block its rows were measured.

A FeatureStore may hold, besides each block's output (point ``block``), points inside the blocks (``attn``,
``mlp_hidden``, ``norm1``, ...: `mimprobe.features.points`). The profile measures every (block, point) as it
measures a block, and its table has a ``point`` column; a table written before points existed has none and holds
the ``block`` point alone (`with_points`). The curve functions of `mimprobe.metrics.headlines` read one point's
rows at a time (`point_rows`), with the predictions of that point (`PointPredictions`), so their block curves never
mix points.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from ..choices import POINTS

POINT = "point"
BLOCK_POINT = "block"


def with_points(table: pd.DataFrame) -> pd.DataFrame:
    """The table with a ``point`` column (``block`` everywhere when it has none, placed after ``block``)."""
    if POINT in table.columns:
        return table
    table = table.copy()
    position = list(table.columns).index("block") + 1 if "block" in table.columns else len(table.columns)
    table.insert(position, POINT, BLOCK_POINT)
    return table


def table_points(table: pd.DataFrame) -> list[str]:
    """The points a table holds, in the blocks' forward order (`POINTS`), ``block`` first."""
    present = set(with_points(table)[POINT])
    return [point for point in POINTS if point in present] + sorted(present - set(POINTS))


def point_rows(table: pd.DataFrame, point: str = BLOCK_POINT) -> pd.DataFrame:
    """The rows of one point (a table without a ``point`` column is all ``block``)."""
    table = with_points(table)
    return table[table[POINT] == point]


class PointPredictions:
    """The per-sample hits of one point of a profile's `SamplePredictions`, as the curve functions read them
    (``get`` without a point, and ``rows``)."""

    def __init__(self, predictions: Any, point: str):
        self.predictions, self.point = predictions, point

    @property
    def rows(self) -> dict:
        return self.predictions.rows

    def get(self, **key: Any):
        return self.predictions.get(point=self.point, **key)


def for_point(predictions: Any, point: str) -> Any:
    """``predictions`` seen from one point (None stays None)."""
    return None if predictions is None else PointPredictions(predictions, point)


def best_blocks_by_point(table: pd.DataFrame, preset: str, *, predictions: Any = None) -> pd.DataFrame:
    """`mimprobe.metrics.headlines.best_blocks` of every point (the block point's first), with a ``point`` column
    after ``pooling``: the best block of each point's curve, and its ties among the blocks of the same point."""
    from .headlines import best_blocks

    frames = []
    for point in table_points(table):
        best = best_blocks(point_rows(table, point), preset, predictions=for_point(predictions, point))
        best.insert(list(best.columns).index("pooling") + 1, POINT, point)
        frames.append(best)
    return pd.concat(frames, ignore_index=True) if frames else best_blocks(table, preset)


def calibrate_by_point(table: pd.DataFrame, *, preset: str, predictions: Any = None, seed: int = 0) -> pd.DataFrame:
    """`mimprobe.metrics.labelfree.profile_calibration.calibrate_profile` of every point, with a ``point`` column
    after ``pooling`` (a label-free curve of a point against the labelled curves of the same point)."""
    from .labelfree.profile_calibration import calibrate_profile

    frames = []
    for point in table_points(table):
        calibration = calibrate_profile(point_rows(table, point), preset=preset,
                                        predictions=for_point(predictions, point), seed=seed)
        calibration.insert(list(calibration.columns).index("pooling") + 1, POINT, point)
        frames.append(calibration)
    frames = [frame for frame in frames if not frame.empty] or frames[:1]
    return pd.concat(frames, ignore_index=True)
