"""Memory plans of a k-NN search: how many query rows per chunk and bank rows per shard fit a memory budget.

Used by the FAISS search (`mimprobe.metrics.knn_search`); the torch backend plans with the same per-row counts
(`_knn_torch.plan_torch_search`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BadInputError

DEFAULT_CHUNK_SIZE = 8192       # query rows per search: a multiple of faiss' 4096-row BLAS tile
RESULT_BYTES = 8 + 8            # one neighbour: float64 (re-ranked) similarity + int64 index
LIBRARY_BYTES = 8 * 2 ** 20     # BLAS packing buffers, OpenMP stacks: 2-7 MiB measured on first faiss.knn calls
FAISS_TILE_COLUMNS = 1024       # faiss' BLAS similarity tile: 4096 queries x 1024 bank rows (blas_*_bs)


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
    per_row = (dim * (4 + source_itemsize) + max_k * RESULT_BYTES + min(bank_rows, FAISS_TILE_COLUMNS) * 4
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


def split_budget(memory_budget: int, *, n_train: int, n_query: int, dim: int, max_k: int,
                 shard_size: int | None) -> tuple[bool, int, int]:
    """How both search backends (FAISS here, torch in `_knn_torch.plan_torch_search`) cut a memory budget between
    the bank and the query chunks: (sharded, bank rows per shard, bytes left for query chunks).

    8 MiB (at most a quarter) is set aside for the libraries' own buffers. The float32 bank is held whole when it
    fits in half of the rest (and no smaller ``shard_size`` is asked for), the remainder going to query chunks;
    otherwise the (n_query, max_k) merged results are set aside and what is left is split evenly between a bank
    shard (at most ``shard_size`` rows) and the query chunks.

    Raises:
        BadInputError: Not even the merged results fit.
    """
    budget = memory_budget - min(LIBRARY_BYTES, memory_budget // 4)
    bank_bytes = n_train * dim * 4
    if bank_bytes <= budget // 2 and (shard_size is None or shard_size >= n_train):
        return False, n_train, budget - bank_bytes
    available = budget - n_query * max_k * RESULT_BYTES
    shard_rows = max(available // 2, 0) // (dim * 4)
    if shard_rows < 1:
        raise BadInputError(f"memory budget {budget} bytes is too small for the merged results of "
                            f"{n_query} queries x {max_k} neighbours: raise the budget")
    return True, min(shard_rows, int(shard_size or n_train), n_train), available // 2


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
    sharded, shard_rows, query_budget = split_budget(int(memory_budget), n_train=n_train, n_query=n_query, dim=dim,
                                                     max_k=max_k, shard_size=shard_size)
    chunk_rows = chunk_rows_for_budget(query_budget, dim=dim, max_k=max_k, num_classes=num_classes,
                                       source_itemsize=source_itemsize, bank_rows=min(shard_rows, n_train),
                                       merge=sharded, extra_row_bytes=extra_row_bytes)
    if chunk_size is not None:
        chunk_rows = min(chunk_rows, int(chunk_size))
    return SearchPlan(chunk_rows=chunk_rows, shard_rows=max(1, min(shard_rows, n_train)))
