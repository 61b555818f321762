"""Per-sample correctness of a profile's accuracy rows, from the ``predictions.npz`` (`SamplePredictions`) that
`mimprobe profile` writes beside every table. A profile without it (deleted, or written before the file existed)
gives differences without intervals, and the report says so; re-running `mimprobe profile` restores them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..metrics.curves import Curve
from .inputs import ProfileInput


@dataclass(frozen=True)
class SampleHits:
    """(n,) bool correctness per block of one curve, over ``rows`` of store split ``source``."""

    source: str
    rows: np.ndarray
    by_block: dict[int, np.ndarray]
    origin: str          # where the vectors came from: "predictions.npz"

    def pairs_with(self, other: "SampleHits") -> bool:
        return self.source == other.source and np.array_equal(self.rows, other.rows)


def curve_hits(profile: ProfileInput, key: Curve, pooling: str, rows: pd.DataFrame) -> SampleHits | None:
    """The correctness vectors behind one curve (``rows``: the profile's `curve_rows` of this key and pooling, with
    each block's full ``params``), or None when the profile's predictions.npz does not hold them."""
    if not key.has_samples:
        return None
    if profile.predictions is not None and key.split in profile.predictions.rows:
        found = {}
        for block, params in zip(rows["block"], rows["params"]):
            hits = profile.predictions.get(metric=key.metric, split=key.split, block=int(block), pooling=pooling,
                                           params=params)
            if hits is not None:
                found[int(block)] = hits
        if found:
            return SampleHits(profile.predictions.sources[key.split], profile.predictions.rows[key.split], found,
                              "predictions.npz")
    return None
