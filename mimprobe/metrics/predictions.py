"""``predictions.npz``: the per-sample top-1 correctness behind a profile's accuracy rows (`SamplePredictions`), so
that before/after differences get paired intervals over the same evaluation images (`mimprobe.report`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BadInputError

PREDICTIONS_FILE = "predictions.npz"
PREDICTIONS_FORMAT = 1


@dataclass
class SamplePredictions:
    """Per-sample top-1 correctness of accuracy rows of the table, grouped by the table's split.

    For a split (``"test"``, ``"val"``, ``"train-loo"``, ...): ``sources[split]`` is the store split its rows come
    from, ``rows[split]`` the (n,) int64 indices of those rows in it (valid rows, as `FeatureStore.features`
    returns them), and ``hits[split][(metric, block, pooling, params)]`` one (n,) bool vector per table row, whose
    mean is that row's ``value`` (``params`` is the row's canonical JSON); rows of a point inside the block have
    the point as a fifth element of the key: ``(metric, block, pooling, params, point)``.

    Saved as ``predictions.npz``: ``format_version``, and per split ``source__SPLIT`` (str), ``rows__SPLIT``
    (n,) int64, ``keys__SPLIT`` (m,) str (JSON ``[metric, block, pooling, params]``, ``[..., point]`` for a point
    other than ``block``), ``hits__SPLIT`` (m, n) bool.
    """

    sources: dict[str, str] = field(default_factory=dict)
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    hits: dict[str, dict[tuple[str, int, str, str], np.ndarray]] = field(default_factory=dict)

    def add(self, *, split: str, source: str, rows: np.ndarray, metric: str, block: int, pooling: str,
            params: str, hits: np.ndarray, point: str = "block") -> None:
        """Record one table row's (n,) correctness over the evaluation ``rows`` of store split ``source``."""
        rows, hits = np.asarray(rows, dtype=np.int64), np.asarray(hits, dtype=bool)
        if hits.shape != rows.shape:
            raise ValueError(f"{metric} block {block}: {hits.shape} hits for {rows.shape} rows")
        if split in self.rows and (self.sources[split] != source or not np.array_equal(self.rows[split], rows)):
            raise ValueError(f"split {split!r} was recorded with other evaluation rows")
        self.sources[split], self.rows[split] = source, rows
        self.hits.setdefault(split, {})[_hits_key(metric, block, pooling, params, point)] = hits

    def get(self, *, metric: str, split: str, block: int, pooling: str, params: str,
            point: str = "block") -> np.ndarray | None:
        """The (n,) correctness of one table row, or None when it was not recorded."""
        return self.hits.get(split, {}).get(_hits_key(metric, block, pooling, params, point))

    def save(self, path: str | Path) -> None:
        arrays: dict[str, np.ndarray] = {"format_version": np.array(PREDICTIONS_FORMAT)}
        for split, entries in self.hits.items():
            keys = list(entries)
            arrays[f"source__{split}"] = np.array(self.sources[split])
            arrays[f"rows__{split}"] = self.rows[split]
            arrays[f"keys__{split}"] = np.array([json.dumps(list(key)) for key in keys], dtype=str)
            arrays[f"hits__{split}"] = (np.stack([entries[key] for key in keys]) if keys
                                        else np.zeros((0, len(self.rows[split])), bool))
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "SamplePredictions":
        """Read ``predictions.npz`` back.

        Raises:
            BadInputError: Not a predictions file of this format.
        """
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError) as error:
            raise BadInputError(f"{path} is not a readable predictions file ({error}): re-run `mimprobe profile`") \
                from None
        if int(arrays.get("format_version", -1)) != PREDICTIONS_FORMAT:
            raise BadInputError(f"{path}: predictions format {arrays.get('format_version')} is not "
                                f"{PREDICTIONS_FORMAT}; re-run `mimprobe profile` with this version")
        loaded = cls()
        for name in arrays:
            if not name.startswith("keys__"):
                continue
            split = name[len("keys__"):]
            loaded.sources[split] = str(arrays[f"source__{split}"])
            loaded.rows[split] = arrays[f"rows__{split}"].astype(np.int64)
            keys = [tuple(json.loads(str(key))) for key in arrays[name]]
            loaded.hits[split] = {_hits_key(str(key[0]), int(key[1]), str(key[2]), str(key[3]),
                                            str(key[4]) if len(key) > 4 else "block"): hits
                                  for key, hits in zip(keys, arrays[f"hits__{split}"])}
        return loaded


def _hits_key(metric: str, block: int, pooling: str, params: str, point: str) -> tuple:
    """The key of one row's hits: (metric, block, pooling, params), with the point appended unless ``block`` (so
    that files written before points existed read the same)."""
    key = (metric, int(block), pooling, params)
    return key if point == "block" else (*key, point)
