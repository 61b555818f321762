"""Rows of a k-NN search: reading and preparing feature rows chunk by chunk (finite check, standardise, L2),
merging and re-ranking neighbour lists, and the input checks, shared by the FAISS (`mimprobe.metrics.knn_search`) and
torch (`mimprobe.metrics._knn_torch`) searches."""

from __future__ import annotations

import faiss
import numpy as np

from ..errors import BadInputError
from ._finite import nonfinite_message
from ._memory import release_pages

RESCORE_MARGIN = 8              # float32 candidates beyond k, re-ranked by float64 similarity (see `rescore`)
_RESCORE_BYTES = 2 * 2 ** 20    # candidate rows gathered at a time by `rescore`


def rescore(queries: np.ndarray, bank: np.ndarray, candidates: np.ndarray,
            keep: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank each query's candidate bank rows by their float64 inner product and keep the best ``keep``.

    A float32 GEMM (FAISS' BLAS, torch's CPU or CUDA kernels) rounds similarities by a few 1e-7, differently in
    each library, so two neighbours closer than that may come out in either order. Searching ``RESCORE_MARGIN``
    candidates more and ranking them by the float64 products of the same prepared float32 rows makes every
    backend return the same neighbours except where the float64 similarities tie.

    Args:
        queries: (rows, dim) prepared float32 queries.
        bank: (n_bank, dim) prepared float32 bank rows.
        candidates: (rows, m) int64 bank rows per query, m >= keep, all valid.
        keep: Neighbours to keep.

    Returns:
        (rows, keep) float64 similarities, decreasing, and (rows, keep) int64 indices; equal values keep the
        candidates' order. Shard and rank merges compare these float64 values (float32 would tie neighbours
        whose similarities differ by less than its rounding).
    """
    rows, m = candidates.shape
    exact = np.empty((rows, m))
    step = max(1, _RESCORE_BYTES // (m * queries.shape[1] * 12))  # the float32 gather and its float64 copy
    for first in range(0, rows, step):
        last = min(first + step, rows)
        rows_of = bank[candidates[first:last]].astype(np.float64)  # (step, m, dim)
        exact[first:last] = np.matmul(rows_of, queries[first:last, :, None].astype(np.float64))[:, :, 0]
    order = np.argsort(-exact, axis=1, kind="stable")[:, :keep]
    return np.take_along_axis(exact, order, axis=1), np.take_along_axis(candidates, order, axis=1)


def largest_itemsize(*arrays: np.ndarray) -> int:
    return max(int(x.dtype.itemsize) for x in arrays)


def merge_into(best_sims: np.ndarray, best_idx: np.ndarray, sims: np.ndarray, idx: np.ndarray) -> None:
    """Keep the best ``best_sims.shape[1]`` of the running and new neighbours (in place; earlier shards win ties)."""
    all_sims = np.concatenate([best_sims, sims], axis=1)
    all_idx = np.concatenate([best_idx, idx], axis=1)
    order = np.argsort(-all_sims, axis=1, kind="stable")[:, :best_sims.shape[1]]
    best_sims[...] = np.take_along_axis(all_sims, order, axis=1)
    best_idx[...] = np.take_along_axis(all_idx, order, axis=1)


def drop_self(sims: np.ndarray, idx: np.ndarray, first_row: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own index from its k + 1 neighbours (the last one if exact ties pushed self out)."""
    rows, search_k = idx.shape
    is_self = idx == np.arange(first_row, first_row + rows)[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    keep = ~is_self
    return sims[keep].reshape(rows, search_k - 1), idx[keep].reshape(rows, search_k - 1)


def prepare(x: np.ndarray, start: int, stop: int, out: np.ndarray | None,
             stats: tuple[np.ndarray, np.ndarray] | None, step: int, role: str, name: str,
             first_row: int = 0) -> np.ndarray:
    """Rows [start, stop) of ``x`` as float32, standardised if ``stats``, L2-normalised, ``step`` rows at a time.

    Written into ``out[:stop - start]`` (allocated if None), so a float16 memory map is never copied whole.
    """
    if out is None:
        out = np.empty((stop - start, x.shape[1]), np.float32)
    out = out[:stop - start]
    for first in range(start, stop, step):
        last = min(first + step, stop)
        part = read_rows(x, first, last, out[first - start:last - start], role, name, first_row)
        if stats is not None:
            part -= stats[0]
            part /= stats[1]
        faiss.normalize_L2(part)  # zero rows stay zero: similarity 0 to everything
    return out


def read_rows(x: np.ndarray, start: int, stop: int, out: np.ndarray, role: str, name: str,
               first_row: int = 0) -> np.ndarray:
    """Copy rows [start, stop) into the float32 ``out`` (first rows), checking they are finite; messages number
    the rows from ``first_row`` (a shard's place in the whole bank)."""
    out = out[:stop - start]
    block = x[start:stop]
    np.copyto(out, block, casting="unsafe")
    release_pages(block)
    row_sums = out.sum(axis=1, dtype=np.float64)  # NaN or Inf anywhere in a row makes its float64 sum non-finite
    if not np.isfinite(row_sums).all():
        bad = first_row + start + int(np.flatnonzero(~np.isfinite(row_sums))[0])
        raise BadInputError(nonfinite_message(f"{name}: row {bad} of the {role} rows"))
    return out


# --- validation ----------------------------------------------------------------------------------------------

def check_matrix(x: np.ndarray, role: str, name: str) -> tuple[int, int]:
    if getattr(x, "ndim", None) != 2:
        raise BadInputError(f"{name}: the {role} features must be a 2-D (rows, dim) array, "
                            f"got shape {getattr(x, 'shape', None)}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise BadInputError(f"{name}: the {role} features must be real numbers, got dtype {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise BadInputError(f"{name}: the {role} features are empty (shape {x.shape})")
    return int(x.shape[0]), int(x.shape[1])


def check_pair(train: np.ndarray, query: np.ndarray, exclude_self: bool, name: str) -> tuple[int, int, int]:
    n_train, dim = check_matrix(train, "train", name)
    n_query, query_dim = check_matrix(query, "query", name)
    if query_dim != dim:
        raise BadInputError(f"{name}: train features have {dim} dimensions but query features {query_dim}")
    if exclude_self and n_query != n_train:
        raise BadInputError(f"{name}: leave-one-out (exclude_self) needs the query to be the train rows, "
                            f"got {n_query} query rows for {n_train} train rows")
    return n_train, n_query, dim


def check_k(k: int, n_train: int, exclude_self: bool) -> None:
    available = n_train - int(exclude_self)
    if k > available:
        left_out = ", one left out per query" if exclude_self else ""
        raise BadInputError(f"k={k} is larger than the train split (n={available}{left_out}): "
                            "use a smaller k or more data")


def check_labels(labels: np.ndarray, n_rows: int, num_classes: int | None, role: str, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n_rows,):
        raise BadInputError(f"{name}: {role} labels have shape {labels.shape}, expected ({n_rows},)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise BadInputError(f"{name}: {role} labels must be integers, got dtype {labels.dtype}")
    labels = labels.astype(np.int64, copy=False)
    if labels.min() < 0 or (num_classes is not None and labels.max() >= num_classes):
        raise BadInputError(f"{name}: {role} labels must lie in [0, {num_classes if num_classes else 'classes'}), "
                            f"got {labels.min()}..{labels.max()}")
    return labels
