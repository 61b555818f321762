"""Weighted k-NN classification of a block's features: exact cosine search with FAISS.

The protocol of DINO (arXiv:2104.14294, ``eval_knn.py``) and its descendants: features are L2-normalised, the
train split is the bank, every query takes the labels of its k most similar train rows (cosine similarity =
inner product of normalised rows), and each neighbour votes for its class with a weight:

- ``"exp"``: exp(sim / T), DINO's ``distances.div_(T).exp_()`` (also MIM-Refiner's ``eval_knn_torchhub.py``);
- ``"softmax"``: softmax(sim / T) over the k neighbours, DINOv2's ``KnnModule`` (arXiv:2304.07193). It divides
  every vote of a query by the same constant, so its ranking of the classes (hence top-1 and top-5) equals
  ``"exp"``'s; only the scores differ (they sum to 1);
- ``"uniform"``: one vote per neighbour (scikit-learn's ``weights="uniform"``), for reference tests; T is unused.

The neighbours come from `mimprobe.metrics.knn_search` (exact FAISS or torch search, chunked under a memory
budget, sharded over a torch.distributed group); memory plans from `mimprobe.metrics.knn_plan`.

Presets (`PRESETS`), recorded in every row's params:

- ``mim-refiner``: k=10, T=0.07, exp weights; features standardised with the train split's mean and std
  (``std`` unbiased, + 1e-6, as ``eval_knn_torchhub.py`` of MIM-Refiner, arXiv:2402.10093) before L2;
- ``dino``: k=20, T=0.07, exp weights;
- ``dinov2``: k in 10/20/100/200, T=0.07, softmax weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BadInputError
from ._knn_rows import check_k, check_labels, check_pair
from ._rows import MetricRow
from .knn_plan import SearchPlan, chunk_rows_for_budget, plan_search
from .knn_presets import PRESETS, KnnPreset, check_protocol, get_preset
from .knn_search import (BACKENDS, default_process_group, knn_neighbors, neighbor_chunks,
                         resolve_backend, standardization_stats)

__all__ = ["BACKENDS", "PRESETS", "KnnPredictions", "KnnPreset", "SearchPlan", "chunk_rows_for_budget", "class_votes",
           "default_process_group", "evaluate_knn", "evaluate_knn_with_hits", "get_preset", "knn_neighbors",
           "knn_predict", "plan_search", "rank_classes", "resolve_backend", "standardization_stats"]

TOP = 5                         # ranked classes kept per query (top-5 accuracy)


@dataclass(frozen=True)
class KnnPredictions:
    """What `knn_predict` returns, keyed by (k, T).

    ``ranked[(k, T)]``: (n_query, min(5, num_classes)) int64 classes by decreasing vote, ties to the lower class
    index (as ``np.argmax`` and scikit-learn). ``scores[(k, T)]``: (n_query, num_classes) float64 votes, only with
    ``keep_scores=True`` (they are large for many classes).
    """

    ranked: dict[tuple[int, float], np.ndarray]
    scores: dict[tuple[int, float], np.ndarray] | None
    num_classes: int
    weighting: str

    def predictions(self, k: int, temperature: float) -> np.ndarray:
        """(n_query,) top-1 classes."""
        return self.ranked[(k, temperature)][:, 0]


def knn_predict(train: np.ndarray, train_labels: np.ndarray, query: np.ndarray, *, ks: Sequence[int],
                temperatures: Sequence[float] = (0.07,), weighting: str = "exp", num_classes: int | None = None,
                standardize: bool = False, exclude_self: bool = False, chunk_size: int | None = None,
                shard_size: int | None = None, memory_budget: int | None = None, threads: int | None = None,
                backend: str | None = None, device: str | Any = "cpu", process_group: Any = None,
                keep_scores: bool = False, name: str = "features") -> KnnPredictions:
    """Weighted k-NN class ranking of every query row for every (k, T), from one search of max(ks) neighbours.

    Args:
        train: (n_train, dim) bank; float16/float32/float64 arrays or memory maps (converted chunk by chunk).
        train_labels: (n_train,) integer classes in [0, num_classes).
        query: (n_query, dim) rows to classify.
        ks: Numbers of neighbours; one search of max(ks), sliced.
        temperatures: T of the exp / softmax weights.
        weighting: "exp" (DINO), "softmax" (DINOv2) or "uniform".
        num_classes: Number of classes; None: max(train_labels) + 1.
        standardize: Standardise with the train split's statistics before L2 (MIM-Refiner).
        exclude_self: Leave-one-out (train and query are the same rows).
        chunk_size, shard_size, memory_budget: See `plan_search` (FAISS) and `_knn_torch.plan_torch_search`
            (torch; on CUDA the budget also caps device memory, and without one 90 % of the free memory is used).
        threads: FAISS (OpenMP) or torch CPU threads; None keeps the library's default.
        backend: "faiss" (CPU) or "torch" (CPU or CUDA: chunked matmul + topk); None: "faiss" on the CPU,
            "torch" elsewhere. Both prepare bit-identical rows; neighbours agree except on exact ties.
        device: "cpu", "cuda", "cuda:N", "auto" (CUDA when visible) or a torch.device; CUDA implies torch.
        process_group: A torch.distributed group: the bank is sharded across its ranks, each searches its shard
            and the top-k lists are merged (DINOv2); every rank must call with the same arrays and arguments and
            gets the same result. None: this process alone (`default_process_group` gives torchrun's group).
        keep_scores: Also return the (n_query, num_classes) votes per (k, T).
        name: What the features are, for error messages.
    """
    ks, temperatures = tuple(int(k) for k in ks), tuple(float(t) for t in temperatures)
    check_protocol(ks, temperatures, weighting)
    n_train, n_query, dim = check_pair(train, query, exclude_self, name)
    labels = check_labels(train_labels, n_train, num_classes, "train", name)
    num_classes = int(num_classes if num_classes is not None else labels.max() + 1)
    max_k = max(ks)
    check_k(max_k, n_train, exclude_self)
    top = min(TOP, num_classes)
    keys = [(k, t) for k in ks for t in temperatures]
    ranked = {key: np.empty((n_query, top), np.int64) for key in keys}
    scores = {key: np.empty((n_query, num_classes)) for key in keys} if keep_scores else None
    for start, sims, idx in neighbor_chunks(train, query, max_k, exclude_self=exclude_self, standardize=standardize,
                                             chunk_size=chunk_size, shard_size=shard_size,
                                             memory_budget=memory_budget, threads=threads, backend=backend,
                                             device=device, process_group=process_group, num_classes=num_classes,
                                             name=name):
        stop = start + len(sims)
        neighbor_labels = labels[idx]  # (rows, max_k)
        for k in ks:
            for temperature in temperatures:
                votes = class_votes(sims[:, :k], neighbor_labels[:, :k], num_classes, weighting=weighting,
                                    temperature=temperature)
                ranked[(k, temperature)][start:stop] = rank_classes(votes, top)
                if scores is not None:
                    scores[(k, temperature)][start:stop] = votes
    return KnnPredictions(ranked=ranked, scores=scores, num_classes=num_classes, weighting=weighting)


def class_votes(similarities: np.ndarray, neighbor_labels: np.ndarray, num_classes: int, *, weighting: str,
                temperature: float) -> np.ndarray:
    """(rows, num_classes) float64 votes from (rows, k) neighbour similarities and labels."""
    sims = similarities.astype(np.float64)
    if weighting == "exp":
        weights = np.exp(sims / temperature)
    elif weighting == "softmax":
        weights = np.exp((sims - sims.max(axis=1, keepdims=True)) / temperature)
        weights /= weights.sum(axis=1, keepdims=True)
    else:
        weights = np.ones_like(sims)
    rows = len(sims)
    flat = (np.arange(rows)[:, None] * num_classes + neighbor_labels).ravel()
    return np.bincount(flat, weights=weights.ravel(), minlength=rows * num_classes).reshape(rows, num_classes)


def rank_classes(votes: np.ndarray, top: int) -> np.ndarray:
    """(rows, top) classes by decreasing vote; equal votes go to the lower class index."""
    return np.argsort(-votes, axis=1, kind="stable")[:, :top]


def evaluate_knn(train: np.ndarray, train_labels: np.ndarray, query: np.ndarray, query_labels: np.ndarray, *,
                 preset: str | KnnPreset = "mim-refiner", split: str, class_names: Sequence[str],
                 exclude_self: bool = False, chunk_size: int | None = None, shard_size: int | None = None,
                 memory_budget: int | None = None, threads: int | None = None, backend: str | None = None,
                 device: str | Any = "cpu", process_group: Any = None, name: str = "features") -> list[MetricRow]:
    """k-NN accuracy rows of one block's features: top-1, top-5 and per-class top-1, for every (k, T) of a preset.

    Values are fractions in [0, 1]. Top-5 counts a query correct when its class is among the 5 best-voted
    classes (always, with 5 classes or fewer). Per-class rows (``knn_class_top1``, params with ``"class"``) are
    written for the classes present among the queries.

    Args:
        train, train_labels: The bank: (n_train, dim) features and (n_train,) classes.
        query, query_labels: (n_query, dim) rows to classify and their (n_query,) classes.
        preset: A `PRESETS` name or a `KnnPreset`.
        split: The name the rows carry ("test", "val", "train-loo").
        class_names: One name per class index.
        exclude_self, chunk_size, shard_size, memory_budget, threads, name: As in `knn_predict`.
        backend, device, process_group: Where the search runs, as in `knn_predict` (default: FAISS on this CPU).
    """
    return evaluate_knn_with_hits(train, train_labels, query, query_labels, preset=preset, split=split,
                                  class_names=class_names, exclude_self=exclude_self, chunk_size=chunk_size,
                                  shard_size=shard_size, memory_budget=memory_budget, threads=threads,
                                  backend=backend, device=device, process_group=process_group, name=name)[0]


def evaluate_knn_with_hits(train: np.ndarray, train_labels: np.ndarray, query: np.ndarray, query_labels: np.ndarray,
                           *, preset: str | KnnPreset = "mim-refiner", split: str, class_names: Sequence[str],
                           exclude_self: bool = False, chunk_size: int | None = None, shard_size: int | None = None,
                           memory_budget: int | None = None, threads: int | None = None,
                           backend: str | None = None, device: str | Any = "cpu", process_group: Any = None,
                           name: str = "features") -> tuple[list[MetricRow], dict[tuple[int, float], np.ndarray]]:
    """`evaluate_knn`'s rows and, per (k, T), the (n_query,) bool top-1 correctness of every query.

    The correctness vectors are what the ``knn_top1`` rows average (``hits[(k, T)].mean()`` is the row's value);
    they feed paired bootstrap intervals of before/after differences (`mimprobe.report`).
    """
    preset = get_preset(preset)
    num_classes = len(class_names)
    if num_classes < 1:
        raise BadInputError(f"{name}: class_names is empty")
    y_query = check_labels(query_labels, len(query), num_classes, "query", name)
    predicted = knn_predict(train, train_labels, query, ks=preset.ks, temperatures=preset.temperatures,
                            weighting=preset.weighting, num_classes=num_classes, standardize=preset.standardize,
                            exclude_self=exclude_self, chunk_size=chunk_size, shard_size=shard_size,
                            memory_budget=memory_budget, threads=threads, backend=backend, device=device,
                            process_group=process_group, name=name)
    present = np.flatnonzero(np.bincount(y_query, minlength=num_classes))
    rows: list[MetricRow] = []
    top1_hits: dict[tuple[int, float], np.ndarray] = {}
    for (k, temperature), ranked in predicted.ranked.items():
        params = preset.params(k, temperature)
        hits = ranked == y_query[:, None]  # (n_query, top): at most one True per row
        top1 = hits[:, 0]
        top1_hits[(k, temperature)] = top1
        rows.append(MetricRow(split=split, metric="knn_top1", value=float(top1.mean()), params=params))
        rows.append(MetricRow(split=split, metric="knn_top5", value=float(hits.any(axis=1).mean()), params=params))
        correct = np.bincount(y_query, weights=top1, minlength=num_classes)
        total = np.bincount(y_query, minlength=num_classes)
        for c in present:
            rows.append(MetricRow(split=split, metric="knn_class_top1", value=float(correct[c] / total[c]),
                                  params={**params, "class": str(class_names[c])}))
    return rows, top1_hits
