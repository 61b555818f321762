"""The row format every metric returns, and the seeded train/validation split they share.

A metric function returns a list of `MetricRow`; the profile adds model, checkpoint, dataset, block and pooling,
giving the long table of DESIGN.md: ``model, checkpoint, dataset, split, block, pooling, metric, params, value,
seed``. ``params`` is a dict (written as canonical JSON in the table); ``seed`` is None for deterministic metrics
and for aggregates over seeds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from ..errors import BadInputError


@dataclass(frozen=True)
class MetricRow:
    split: str                      # the split the value is measured on: "test", "val", "train-loo", ...
    metric: str                     # e.g. "knn_top1", "linear_top1", "cluster_nmi", "rankme"
    value: float
    params: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None

    def params_json(self) -> str:
        return json.dumps(self.params, sort_keys=True, separators=(",", ":"))


def carve_validation(labels: np.ndarray, *, fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, stratified split of train indices into (fit, validation), each sorted.

    Falls back to an unstratified split when a class has a single sample.
    """
    indices = np.arange(len(labels))
    counts = np.bincount(labels[labels >= 0]) if len(labels) else np.array([0])
    stratify = labels if counts[counts > 0].min() >= 2 else None
    n_val = max(int(round(fraction * len(labels))), len(np.unique(labels)) if stratify is not None else 1)
    fit, val = train_test_split(indices, test_size=n_val, stratify=stratify, random_state=seed)
    return np.sort(fit), np.sort(val)


def finite_float32(features: np.ndarray, *, name: str) -> np.ndarray:
    """A C-contiguous float32 array (FAISS needs it) of a 2-D array or memory map, checked for NaN/Inf.

    Raises:
        BadInputError: Not a non-empty 2-D array, or NaN/Inf values (named by ``name``, e.g. "block 5 (cls)").
    """
    from ._finite import finite_copy

    if np.ndim(features) != 2 or np.shape(features)[0] == 0:
        raise BadInputError(f"{name}: expected a non-empty (n_samples, dim) array, got shape {np.shape(features)}")
    return finite_copy(features, dtype=np.float32, what=name)
