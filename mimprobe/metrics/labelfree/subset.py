"""What a label-free metric returns, and the seeded row subset it is computed on.

Every label-free metric is a pure function of a ``(n, d)`` array, the rows of one block on one split, usually a
seeded subset of the split (the costly ones grow as n log n to n^2). `seeded_subset` draws that subset once, so that
every block and every metric sees the same images; its size and seed go into each row's params.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...errors import BadInputError
from .._rows import MetricRow
from ..rank import subsample_rows


@dataclass(frozen=True)
class Subset:
    """Sorted row indices into a split, or ``rows=None`` for every row (then ``size`` is the split's length)."""

    rows: np.ndarray | None
    size: int
    seed: int | None  # None when every row is used (nothing was drawn)

    def params(self) -> dict[str, Any]:
        """``{"subset": size, "subset_seed": seed}``: what a row records of the subset."""
        return {"subset": int(self.size), "subset_seed": self.seed}

    def take(self, features: np.ndarray) -> np.ndarray:
        """The subset's rows of ``features`` (n, d) as an in-memory array (a memory map is read once)."""
        return np.asarray(features if self.rows is None else features[self.rows])


def seeded_subset(n_samples: int, *, size: int | None, seed: int = 0) -> Subset:
    """A seeded subset of ``size`` rows out of ``n_samples`` (all rows when ``size`` is None or >= n_samples).

    The same (n_samples, size, seed) always gives the same rows, so blocks and reruns share images. Rows are sorted so
    a memory map reads forward (`mimprobe.metrics.rank.subsample_rows`, the subset RankMe already draws).

    Raises:
        BadInputError: ``size`` < 2 (no label-free metric is defined on one row) or n_samples < 2.
    """
    if n_samples < 2:
        raise BadInputError(f"label-free metrics need at least 2 rows, the split has {n_samples}")
    if size is not None and size < 2:
        raise BadInputError(f"the label-free subset size must be at least 2 (got {size}); raise it")
    rows = subsample_rows(n_samples, max_samples=size, seed=seed, name="label-free subset")
    if rows is None:
        return Subset(rows=None, size=int(n_samples), seed=None)
    return Subset(rows=rows, size=int(len(rows)), seed=int(seed))


@dataclass(frozen=True)
class LabelFreeEstimate:
    """One label-free number of one block: value, its standard error where the estimator has one, and params."""

    value: float
    params: dict[str, Any] = field(default_factory=dict)
    standard_error: float | None = None

    def rows(self, *, metric: str, split: str, subset: Subset | None = None,
             seed: int | None = None) -> list[MetricRow]:
        """The ``metric`` row (and a ``{metric}_se`` row when there is a standard error), params + subset params."""
        params = {**self.params, **(subset.params() if subset is not None else {})}
        rows = [MetricRow(split=split, metric=metric, value=float(self.value), params=params, seed=seed)]
        if self.standard_error is not None:
            rows.append(MetricRow(split=split, metric=f"{metric}_se", value=float(self.standard_error),
                                  params=dict(params), seed=seed))
        return rows


def float64_rows(features: np.ndarray, *, name: str, min_rows: int = 2) -> np.ndarray:
    """A finite float64 copy of a (n, d) array with at least ``min_rows`` rows.

    Raises:
        BadInputError: Not 2-D, too few rows, or NaN/Inf values.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < min_rows or x.shape[1] < 1:
        raise BadInputError(f"{name}: expected a (n_samples >= {min_rows}, dim) array, got shape {x.shape}")
    finite = np.isfinite(x)
    if not finite.all():
        raise BadInputError(f"{name}: {x.size - int(finite.sum())} NaN/Inf values in the features; re-extract "
                            f"the store (with --store-dtype float32 if float16 overflowed)")
    return x
