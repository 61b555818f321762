"""Per-sample correctness of a profile's accuracy rows: from predictions.npz, or recomputed from the store.

Profiles written by this version of mimprobe carry ``predictions.npz`` (`SamplePredictions`). For older profiles
the k-NN correctness is recomputed from the feature store named in profile.json, with the profile's own split plan
(`plan_splits` with its seed and validation fraction) and the protocol in the row's params; a recomputed curve is
used only if it reproduces the table's values exactly, so an interval never describes other numbers than the
table's. Linear probes are not retrained: without predictions.npz their differences come without intervals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import BadInputError
from ..metrics import knn
from ..metrics.profile import plan_splits
from .curves import CurveKey
from .inputs import ProfileInput


@dataclass(frozen=True)
class SampleHits:
    """(n,) bool correctness per block of one curve, over ``rows`` of store split ``source``."""

    source: str
    rows: np.ndarray
    by_block: dict[int, np.ndarray]
    origin: str          # "predictions.npz" or "recomputed from the feature store"

    def pairs_with(self, other: "SampleHits") -> bool:
        return self.source == other.source and np.array_equal(self.rows, other.rows)


def curve_hits(profile: ProfileInput, key: CurveKey, pooling: str, rows: pd.DataFrame) -> SampleHits | None:
    """The correctness vectors behind one curve (``rows``: the profile's `curve_rows` of this key and pooling, with
    each block's full ``params``), or None when neither predictions.npz nor the store can give them."""
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
    if key.metric == "knn_top1" and profile.store is not None:
        return _recompute_knn(profile, key, pooling, rows)
    return None


def _recompute_knn(profile: ProfileInput, key: CurveKey, pooling: str, rows: pd.DataFrame) -> SampleHits | None:
    store = profile.store
    config = profile.meta.get("config") or {}
    params = key.param_dict
    try:
        plan = plan_splits(store, val_fraction=float(config.get("val_fraction", 0.1)), seed=int(config.get("seed", 0)))
        preset = knn.KnnPreset(str(params.get("preset", "custom")), ks=(int(params["k"]),),
                               temperatures=(float(params.get("T", 0.07)),),
                               weighting=str(params.get("weighting", "exp")),
                               standardize=bool(params.get("standardize", False)))
    except (KeyError, BadInputError):
        return None
    if key.split == "train-loo":
        source, index, bank_index, exclude_self = "train", np.arange(len(store.labels("train"))), None, True
    elif key.split == "val":
        source, index, bank_index, exclude_self = "train", plan.val_index, plan.fit_index, False
    elif key.split == plan.eval_split and not plan.knn_loo:
        source, index, bank_index, exclude_self = plan.eval_source, plan.eval_index, plan.train_index, False
    else:
        return None
    train_labels, query_labels = store.labels("train"), store.labels(source)[index]
    found: dict[int, np.ndarray] = {}
    for block, value in zip(rows["block"], rows["value"]):
        if int(block) not in store.blocks or pooling not in store.poolings:
            continue
        train = np.asarray(store.features("train", int(block), pooling), dtype=np.float32)
        query = train if exclude_self else np.asarray(store.features(source, int(block), pooling),
                                                      dtype=np.float32)[index]
        bank, bank_labels = (train, train_labels) if bank_index is None else (train[bank_index],
                                                                               train_labels[bank_index])
        _, hits = knn.evaluate_knn_with_hits(bank, bank_labels, query, query_labels, preset=preset, split=key.split,
                                             class_names=store.classes, exclude_self=exclude_self,
                                             name=f"block {block} ({pooling})")
        correct = next(iter(hits.values()))
        if abs(float(correct.mean()) - float(value)) > 1e-9:
            return None  # not the protocol that made the table: no interval rather than a wrong one
        found[int(block)] = correct
    return SampleHits(source, np.asarray(index, dtype=np.int64), found, "recomputed from the feature store") \
        if found else None

