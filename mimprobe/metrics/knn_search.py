"""Exact cosine k-NN search of a block's features (FAISS on the CPU, torch on the CPU or CUDA, one process or
a torch.distributed group), and the train statistics that standardise it.

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
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import faiss
import numpy as np

from .._threads import cpu_threads
from ..errors import BadInputError
from ._knn_rows import (RESCORE_MARGIN, check_k, check_matrix, check_pair, drop_self, largest_itemsize, merge_into,
                        prepare, read_rows, rescore)
from .knn_plan import DEFAULT_CHUNK_SIZE, RESULT_BYTES, SearchPlan, plan_search

BACKENDS = ("faiss", "torch")  # exact search: FAISS on the CPU; torch (matmul + topk) on the CPU or CUDA
STD_EPS = 1e-6                  # added to the train std, as MIM-Refiner's eval_knn_torchhub.py


def standardization_stats(train: np.ndarray, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                          name: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std (unbiased, + 1e-6) of the train rows, in chunks; each (dim,) float32.

    Chunk statistics are merged with Chan et al.'s pairwise update in float64, so no float64 copy of the
    features is made.
    """
    check_matrix(train, "train", name)
    return finish_stats(*moments(train, chunk_size=chunk_size, name=name), name=name)


def moments(train: np.ndarray, *, chunk_size: int, name: str,
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


def finish_stats(count: int, mean: np.ndarray, m2: np.ndarray, *, name: str) -> tuple[np.ndarray, np.ndarray]:
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
    for start, sims, idx in neighbor_chunks(train, query, k, exclude_self=exclude_self, standardize=standardize,
                                             chunk_size=chunk_size, shard_size=shard_size,
                                             memory_budget=memory_budget, threads=threads, backend=backend,
                                             device=device, process_group=process_group, name=name):
        similarities[start:start + len(sims)], indices[start:start + len(idx)] = sims, idx
    return similarities, indices


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


def neighbor_chunks(train: np.ndarray, query: np.ndarray, k: int, *, exclude_self: bool, standardize: bool,
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
    rescore_bytes = RESCORE_MARGIN * RESULT_BYTES + (search_k + RESCORE_MARGIN) * 16
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
                 extra_row_bytes=rescore_bytes + 3 * world_size * search_k * RESULT_BYTES)
    stats = None
    if standardize:
        first, last = distributed.shard_bounds(n_train, dist.get_rank(process_group), world_size)
        merged = distributed.merged_moments(lambda: moments(distributed.shard_rows(train, first, last),
                                                              chunk_size=plan.chunk_rows, name=name,
                                                              first_row=first), dim, process_group)
        stats = finish_stats(*merged, name=name)

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


# --- FAISS search ----------------------------------------------------------------------------------------

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
