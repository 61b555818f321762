"""Weighted k-NN classification of a block's features: exact cosine search with FAISS.

The protocol of DINO (arXiv:2104.14294, ``eval_knn.py``) and its descendants: features are L2-normalised, the
train split is the bank, every query takes the labels of its k most similar train rows (cosine similarity =
inner product of normalised rows), and each neighbour votes for its class with a weight:

- ``"exp"``: exp(sim / T), DINO's ``distances.div_(T).exp_()`` (also MIM-Refiner's ``eval_knn_torchhub.py``);
- ``"softmax"``: softmax(sim / T) over the k neighbours, DINOv2's ``KnnModule`` (arXiv:2304.07193). It divides
  every vote of a query by the same constant, so its ranking of the classes (hence top-1 and top-5) equals
  ``"exp"``'s; only the scores differ (they sum to 1);
- ``"uniform"``: one vote per neighbour (scikit-learn's ``weights="uniform"``), for reference tests; T is unused.

The search is exact: ``faiss.knn`` with ``METRIC_INNER_PRODUCT``, the brute-force BLAS kernel behind
``IndexFlatIP.search``, called on the float32 bank directly instead of copying it into an index. The top
``max(ks)`` neighbours are found once and sliced for every k, and every temperature reuses the same search.
Queries go in chunks of ``chunk_size`` rows; with a ``memory_budget`` the bank (when its float32 copy does not
fit in half the budget) is searched shard by shard with a merged top-k, so float16 memory maps of any size are
classified in bounded memory. Read pages of a read-only memory map are handed back to the OS after each chunk.

Backends (``backend=``, ``device=``): FAISS on the CPU (the default); torch (`_knn_torch`) on the CPU or CUDA,
chunked float32 matmul + ``topk`` on the same prepared rows, the bank streamed to the device in shards under the
budget. A float32 GEMM rounds similarities by a few 1e-7, differently in every library, so each search takes
``RESCORE_MARGIN`` (8) candidates more and ranks them by the float64 products of the prepared float32 rows
(`rescore`; returned similarities are those values); shards and ranks merge by them too. So the backends, any
chunking and any number of processes return the same neighbours except where float64 similarities tie exactly
(duplicate rows). With a torch.distributed ``process_group`` the bank is sharded across its ranks and the
per-rank top-k lists are merged (`_knn_distributed`, the DINOv2 approach).

Leave-one-out (``exclude_self=True``, train and query the same rows): each query searches one neighbour more
and drops itself by index (not by similarity, so duplicates of a query still count as its neighbours).

Presets (`PRESETS`), recorded in every row's params:

- ``mim-refiner``: k=10, T=0.07, exp weights; features standardised with the train split's mean and std
  (``std`` unbiased, + 1e-6, as ``eval_knn_torchhub.py`` of MIM-Refiner, arXiv:2402.10093) before L2;
- ``dino``: k=20, T=0.07, exp weights;
- ``dinov2``: k in 10/20/100/200, T=0.07, softmax weights.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from .._threads import cpu_threads
from ..errors import BadInputError
from ._knn_rows import (RESCORE_MARGIN, check_k, check_labels, check_matrix, check_pair, drop_self, largest_itemsize,
                        merge_into, prepare, read_rows)
from ._knn_rows import rescore  # noqa: F401  (part of this module's API: backends re-rank with it)
from ._rows import MetricRow
from .knn_presets import MIN_TEMPERATURE, PRESETS, WEIGHTINGS, KnnPreset, check_protocol, get_preset  # noqa: F401

BACKENDS = ("faiss", "torch")  # exact search: FAISS on the CPU; torch (matmul + topk) on the CPU or CUDA
DEFAULT_CHUNK_SIZE = 8192       # query rows per search: a multiple of faiss' 4096-row BLAS tile
STD_EPS = 1e-6                  # added to the train std, as MIM-Refiner's eval_knn_torchhub.py
TOP = 5                         # ranked classes kept per query (top-5 accuracy)
_RESULT_BYTES = 8 + 8           # one neighbour: float64 (re-ranked) similarity + int64 index
_LIBRARY_BYTES = 8 * 2 ** 20    # BLAS packing buffers, OpenMP stacks: 2-7 MiB measured on first faiss.knn calls
_FAISS_TILE_COLUMNS = 1024      # faiss' BLAS similarity tile: 4096 queries x 1024 bank rows (blas_*_bs)


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


def chunk_rows_for_budget(budget_bytes: int, *, dim: int, max_k: int, num_classes: int = 0,
                          source_itemsize: int = 0, bank_rows: int = 0, merge: bool = False,
                          extra_row_bytes: int = 0) -> int:
    """Query rows per chunk such that the chunk's float32 copy and its (rows, max_k) results fit in the budget.

    Per query row, always: the float32 copy (``dim * 4`` bytes) and ``max_k`` float32 similarities with int64
    indices. Optionally also: ``num_classes``, the class votes, their ranking and the weights (24 bytes per class
    and per neighbour); ``source_itemsize``, the source rows mapped while they are converted; ``bank_rows``, faiss'
    similarity tile (4 bytes for each of up to 1024 bank rows); ``merge``, the temporaries of merging a shard's
    neighbours into the running ones (60 bytes per neighbour); ``extra_row_bytes``, the caller's own (the
    gathered lists of a sharded search).

    Raises:
        BadInputError: Not even one row fits.
    """
    per_row = (dim * (4 + source_itemsize) + max_k * _RESULT_BYTES + min(bank_rows, _FAISS_TILE_COLUMNS) * 4
               + int(extra_row_bytes))
    if num_classes:
        per_row += 24 * (num_classes + max_k)
    if merge:
        per_row += 60 * max_k
    rows = int(budget_bytes) // per_row
    if rows < 1:
        raise BadInputError(f"memory budget {int(budget_bytes)} bytes holds no query row of {per_row} bytes: "
                            "raise the budget")
    return rows


@dataclass(frozen=True)
class SearchPlan:
    """How a search is cut: ``chunk_rows`` query rows at a time against bank shards of ``shard_rows`` rows."""

    chunk_rows: int
    shard_rows: int

    def sharded(self, n_train: int) -> bool:
        return self.shard_rows < n_train


def plan_search(n_train: int, n_query: int, dim: int, max_k: int, *, num_classes: int = 0,
                source_itemsize: int = 4, chunk_size: int | None = None, shard_size: int | None = None,
                memory_budget: int | None = None, extra_row_bytes: int = 0) -> SearchPlan:
    """Chunk and shard sizes for a search.

    Without a budget: ``chunk_size`` (default 8192) query rows, the whole bank in one float32 array (or
    ``shard_size`` rows per shard). With ``memory_budget`` bytes: 8 MiB (at most a quarter) is set aside for the
    libraries' own buffers; the bank is held whole when its float32 copy fits in half of the rest, the remainder
    going to query chunks; otherwise the (n_query, max_k) merged results are set aside and what is left is split
    evenly between a bank shard and a query chunk (see `chunk_rows_for_budget` for what a chunk row counts).
    Explicit ``chunk_size`` / ``shard_size`` are upper bounds. Python's own objects and the inputs already in
    memory (labels, arrays that are not memory maps) are outside the budget.
    """
    for label, value in (("chunk_size", chunk_size), ("shard_size", shard_size), ("memory_budget", memory_budget)):
        if value is not None and int(value) < 1:
            raise BadInputError(f"{label} must be a positive number, got {value}")
    if memory_budget is None:
        return SearchPlan(chunk_rows=int(chunk_size or DEFAULT_CHUNK_SIZE), shard_rows=int(shard_size or n_train))
    budget = int(memory_budget) - min(_LIBRARY_BYTES, int(memory_budget) // 4)
    bank_bytes = n_train * dim * 4
    sharded = bank_bytes > budget // 2 or (shard_size is not None and shard_size < n_train)
    if not sharded:
        shard_rows, query_budget = n_train, budget - bank_bytes
    else:
        available = budget - n_query * max_k * _RESULT_BYTES
        shard_rows, query_budget = max(available // 2, 0) // (dim * 4), available // 2
        if shard_rows < 1:
            raise BadInputError(f"memory budget {budget} bytes is too small for the merged results of "
                                f"{n_query} queries x {max_k} neighbours: raise the budget")
        if shard_size is not None:
            shard_rows = min(shard_rows, int(shard_size))
    chunk_rows = chunk_rows_for_budget(query_budget, dim=dim, max_k=max_k, num_classes=num_classes,
                                       source_itemsize=source_itemsize, bank_rows=min(shard_rows, n_train),
                                       merge=sharded, extra_row_bytes=extra_row_bytes)
    if chunk_size is not None:
        chunk_rows = min(chunk_rows, int(chunk_size))
    return SearchPlan(chunk_rows=chunk_rows, shard_rows=max(1, min(shard_rows, n_train)))


# --- compute -------------------------------------------------------------------------------------------------

def standardization_stats(train: np.ndarray, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                          name: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std (unbiased, + 1e-6) of the train rows, in chunks; each (dim,) float32.

    Chunk statistics are merged with Chan et al.'s pairwise update in float64, so no float64 copy of the
    features is made.
    """
    check_matrix(train, "train", name)
    return _finish_stats(*_moments(train, chunk_size=chunk_size, name=name), name=name)


def _moments(train: np.ndarray, *, chunk_size: int, name: str,
             first_row: int = 0) -> tuple[int, np.ndarray, np.ndarray]:
    """(count, mean, M2) of the rows in float64, chunk statistics merged with Chan et al.'s update.

    ``first_row``: the index of ``train``'s first row in the whole bank (a process' shard), for messages.
    """
    n_rows, dim = train.shape
    count, mean, m2 = 0, np.zeros(dim), np.zeros(dim)
    rows = max(1, chunk_size // 3)  # the float32 chunk (4 bytes a value) and its float64 deviations (8) are alive
    buffer = np.empty((min(rows, n_rows), dim), np.float32)
    for start in range(0, n_rows, rows):
        chunk = read_rows(train, start, min(start + rows, n_rows), buffer, "train", name, first_row)
        chunk_mean = chunk.mean(axis=0, dtype=np.float64)
        # float64 deviations: float32 ones round at 1e-7 and make the std depend on the chunking, so backends
        # planned with other chunk sizes (and process groups) would standardise by a std one ulp apart
        deviation = chunk - chunk_mean
        chunk_m2 = np.einsum("ij,ij->j", deviation, deviation)
        del deviation
        chunk_count = len(chunk)
        total = count + chunk_count
        delta = chunk_mean - mean
        mean += delta * (chunk_count / total)
        m2 += chunk_m2 + delta ** 2 * (count * chunk_count / total)
        count = total
    return count, mean, m2


def _finish_stats(count: int, mean: np.ndarray, m2: np.ndarray, *, name: str) -> tuple[np.ndarray, np.ndarray]:
    if count < 2:
        raise BadInputError(f"{name}: standardising needs at least 2 train rows, got {count}")
    std = np.sqrt(m2 / (count - 1)) + STD_EPS
    return mean.astype(np.float32), std.astype(np.float32)


def knn_neighbors(train: np.ndarray, query: np.ndarray, k: int, *, exclude_self: bool = False,
                  standardize: bool = False, chunk_size: int | None = None, shard_size: int | None = None,
                  memory_budget: int | None = None, threads: int | None = None, backend: str | None = None,
                  device: str | Any = "cpu", process_group: Any = None,
                  name: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """The k most cosine-similar train rows of every query row.

    Args:
        train: (n_train, dim) bank; any float dtype, memory maps welcome.
        query: (n_query, dim) queries (the same rows as ``train`` with ``exclude_self``).
        k: Neighbours per query.
        exclude_self: Leave-one-out: query i never retrieves train row i.
        standardize: Standardise both with the train split's mean and std before L2 (MIM-Refiner).
        chunk_size, shard_size, memory_budget: See `plan_search` (FAISS) and `_knn_torch.plan_torch_search`.
        threads: FAISS (OpenMP) or torch CPU threads; None keeps the library's default.
        backend, device, process_group: Where the search runs; see `resolve_backend` and `knn_predict`.
        name: What the features are ("block 5 (cls)"), for error messages.

    Returns:
        (n_query, k) float32 similarities, decreasing, and (n_query, k) int64 train row indices.
    """
    n_train, n_query, dim = check_pair(train, query, exclude_self, name)
    check_k(k, n_train, exclude_self)
    similarities = np.empty((n_query, k), np.float32)
    indices = np.empty((n_query, k), np.int64)
    for start, sims, idx in _neighbor_chunks(train, query, k, exclude_self=exclude_self, standardize=standardize,
                                             chunk_size=chunk_size, shard_size=shard_size,
                                             memory_budget=memory_budget, threads=threads, backend=backend,
                                             device=device, process_group=process_group, name=name):
        similarities[start:start + len(sims)], indices[start:start + len(idx)] = sims, idx
    return similarities, indices


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
    for start, sims, idx in _neighbor_chunks(train, query, max_k, exclude_self=exclude_self, standardize=standardize,
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


def resolve_backend(backend: str | None, device: str | Any = "cpu") -> str:
    """The search backend: ``backend`` if given, else "faiss" on the CPU and "torch" on CUDA.

    ``device``: "cpu", "cuda", "cuda:N", "auto" (CUDA when visible) or a torch.device.

    Raises:
        BadInputError: Unknown backend or device, or FAISS asked for on a GPU (only faiss-cpu is a dependency).
    """
    if backend is not None and backend not in BACKENDS:
        raise BadInputError(f"unknown k-NN backend {backend!r}: use one of {', '.join(BACKENDS)}")
    gpu_named = str(getattr(device, "type", device)).startswith("cuda")
    if isinstance(device, str) and device == "cpu":
        on_cpu = True  # the default: no torch import for FAISS-only use
    elif backend == "faiss" and gpu_named:
        on_cpu = False  # the FAISS message below, whether or not a GPU is visible
    else:
        from ._knn_torch import resolve_device

        on_cpu = resolve_device(device).type == "cpu"
    if backend == "faiss" and not on_cpu:
        raise BadInputError(f"the FAISS k-NN backend runs on the CPU, not on {device}: use the torch backend "
                            "(or leave the backend unset)")
    return backend or ("faiss" if on_cpu else "torch")


def default_process_group() -> Any:
    """torchrun's default group when torch.distributed is initialised with more than one process, else None.

    Pass it as ``process_group`` only from code that every rank runs (a collective waits for all of them).
    """
    from ._knn_distributed import default_group

    return default_group()


def _neighbor_chunks(train: np.ndarray, query: np.ndarray, k: int, *, exclude_self: bool, standardize: bool,
                     chunk_size: int | None, shard_size: int | None, memory_budget: int | None,
                     threads: int | None, backend: str | None, device: str | Any, process_group: Any,
                     name: str, num_classes: int = 0) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Plan, standardise and search with the chosen backend, alone or sharded over ``process_group``; yields
    (first query row, (rows, k) similarities, (rows, k) train indices) in order."""
    engine = resolve_backend(backend, device)
    torch_device = None
    if engine == "torch":
        from ._knn_torch import device_budget, resolve_device

        torch_device = resolve_device(device)
        memory_budget = device_budget(torch_device, memory_budget)
    n_train, n_query, dim = len(train), len(query), int(train.shape[1])
    search_k = k + int(exclude_self)
    itemsize = largest_itemsize(train, query)
    # per chunk row: the margin candidates (similarity + index) and the re-ranking's float64 values and order
    rescore_bytes = RESCORE_MARGIN * _RESULT_BYTES + (search_k + RESCORE_MARGIN) * 16
    if process_group is None:
        plan = _plan(engine, n_train, n_query, dim, search_k, num_classes=num_classes, source_itemsize=itemsize,
                     chunk_size=chunk_size, shard_size=shard_size, memory_budget=memory_budget,
                     extra_row_bytes=rescore_bytes)
        stats = standardization_stats(train, chunk_size=plan.chunk_rows, name=name) if standardize else None
        yield from _local_chunks(engine, train, query, k, exclude_self=exclude_self, stats=stats, plan=plan,
                                 device=torch_device, threads=threads, name=name)
        return
    import torch.distributed as dist

    from . import _knn_distributed as distributed

    if not (dist.is_available() and dist.is_initialized()):
        raise BadInputError("a k-NN process_group was given but torch.distributed is not initialised: run under "
                            "torchrun (init_process_group) or pass process_group=None")
    world_size = dist.get_world_size(process_group)
    # Every rank plans for the largest shard, so that all ranks cut the queries into the same chunks (one
    # all-gather each); a chunk row also holds world_size gathered lists and their merge (3 copies, 12 B each).
    plan = _plan(engine, -(-n_train // world_size), n_query, dim, search_k, num_classes=num_classes,
                 source_itemsize=itemsize, chunk_size=chunk_size, shard_size=shard_size, memory_budget=memory_budget,
                 extra_row_bytes=rescore_bytes + 3 * world_size * search_k * _RESULT_BYTES)
    stats = None
    if standardize:
        first, last = distributed.shard_bounds(n_train, dist.get_rank(process_group), world_size)
        moments = distributed.merged_moments(lambda: _moments(distributed.shard_rows(train, first, last),
                                                              chunk_size=plan.chunk_rows, name=name,
                                                              first_row=first), dim, process_group)
        stats = _finish_stats(*moments, name=name)

    def shard_search(shard: np.ndarray, local_k: int, first_row: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        return _local_chunks(engine, shard, query, local_k, exclude_self=False, stats=stats, plan=plan,
                             device=torch_device, threads=threads, name=name, first_row=first_row)

    for start, sims, idx in distributed.sharded_neighbor_chunks(train, query, search_k, chunk_rows=plan.chunk_rows,
                                                                shard_search=shard_search, group=process_group):
        yield (start, *drop_self(sims, idx, start)) if exclude_self else (start, sims, idx)


def _plan(engine: str, n_train: int, n_query: int, dim: int, max_k: int, *, num_classes: int, source_itemsize: int,
          chunk_size: int | None, shard_size: int | None, memory_budget: int | None,
          extra_row_bytes: int = 0) -> Any:
    if engine == "faiss":
        return plan_search(n_train, n_query, dim, max_k, num_classes=num_classes, source_itemsize=source_itemsize,
                           chunk_size=chunk_size, shard_size=shard_size, memory_budget=memory_budget,
                           extra_row_bytes=extra_row_bytes)
    from ._knn_torch import plan_torch_search

    # the class votes of a chunk are counted as in the FAISS plan: 24 bytes per class and neighbour
    votes = 24 * (num_classes + max_k) if num_classes else 0
    return plan_torch_search(n_train, n_query, dim, max_k, source_itemsize=source_itemsize, chunk_size=chunk_size,
                             shard_size=shard_size, memory_budget=memory_budget,
                             extra_row_bytes=votes + extra_row_bytes)


def _local_chunks(engine: str, train: np.ndarray, query: np.ndarray, k: int, *, exclude_self: bool,
                  stats: tuple[np.ndarray, np.ndarray] | None, plan: Any, device: Any, threads: int | None,
                  name: str, first_row: int = 0) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    if engine == "faiss":
        with cpu_threads(threads):  # FAISS, BLAS and torch pools: one meaning of --threads (mimprobe._threads)
            yield from _search(train, query, k, exclude_self=exclude_self, stats=stats, plan=plan, name=name,
                               first_row=first_row)
        return
    from ._knn_torch import torch_search

    yield from torch_search(train, query, k, exclude_self=exclude_self, stats=stats, plan=plan, device=device,
                            threads=threads, name=name, first_row=first_row)


# --- search internals ----------------------------------------------------------------------------------------

def _search(train: np.ndarray, query: np.ndarray, k: int, *, exclude_self: bool,
            stats: tuple[np.ndarray, np.ndarray] | None, plan: SearchPlan, name: str,
            first_row: int = 0) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (first query row, (rows, k) float64 similarities, (rows, k) train indices) chunk by chunk, in order.

    Similarities are float64 products of the prepared float32 rows (`rescore`). ``first_row``: the index of
    ``train``'s first row in the whole bank (a process' shard), for messages.
    """
    n_train, n_query = len(train), len(query)
    search_k = k + int(exclude_self)
    if not plan.sharded(n_train):
        bank = prepare(train, 0, n_train, None, stats, plan.chunk_rows, "train", name, first_row)
        same_rows = query is train  # leave-one-out on one array: its normalised rows are the bank's
        buffer = None if same_rows else np.empty((min(plan.chunk_rows, n_query), bank.shape[1]), np.float32)
        for start in range(0, n_query, plan.chunk_rows):
            stop = min(start + plan.chunk_rows, n_query)
            chunk = bank[start:stop] if same_rows else prepare(query, start, stop, buffer, stats, plan.chunk_rows,
                                                                "query", name)
            sims, idx = faiss.knn(chunk, bank, min(search_k + RESCORE_MARGIN, n_train),
                                  metric=faiss.METRIC_INNER_PRODUCT)
            sims, idx = rescore(chunk, bank, idx, search_k)
            yield (start, *drop_self(sims, idx, start)) if exclude_self else (start, sims, idx)
        return
    # The bank does not fit: every shard is searched by every query chunk, the top search_k merged.
    best_sims = np.full((n_query, search_k), -np.inf)  # float64: shards merge by the re-ranked similarities
    best_idx = np.full((n_query, search_k), -1, np.int64)
    shard_buffer = np.empty((plan.shard_rows, train.shape[1]), np.float32)
    query_buffer = np.empty((min(plan.chunk_rows, n_query), train.shape[1]), np.float32)
    for shard_start in range(0, n_train, plan.shard_rows):
        shard_stop = min(shard_start + plan.shard_rows, n_train)
        shard = prepare(train, shard_start, shard_stop, shard_buffer, stats, plan.chunk_rows, "train", name,
                         first_row)
        shard_k = min(search_k + RESCORE_MARGIN, len(shard))
        for start in range(0, n_query, plan.chunk_rows):
            stop = min(start + plan.chunk_rows, n_query)
            chunk = prepare(query, start, stop, query_buffer, stats, plan.chunk_rows, "query", name)
            sims, idx = faiss.knn(chunk, shard, shard_k, metric=faiss.METRIC_INNER_PRODUCT)
            sims, idx = rescore(chunk, shard, idx, min(search_k, len(shard)))
            merge_into(best_sims[start:stop], best_idx[start:stop], sims, idx + shard_start)
    del shard_buffer, query_buffer
    for start in range(0, n_query, plan.chunk_rows):
        stop = min(start + plan.chunk_rows, n_query)
        sims, idx = best_sims[start:stop], best_idx[start:stop]
        yield (start, *drop_self(sims, idx, start)) if exclude_self else (start, sims, idx)
