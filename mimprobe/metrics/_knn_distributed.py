"""k-NN with the bank sharded across the processes of a torch.distributed group (the DINOv2 approach).

DINOv2's ``KnnModule`` (facebookresearch/dinov2, ``dinov2/eval/knn.py``) keeps one contiguous chunk of the train
features per rank (``train_features.chunk(world_size)[rank]``); each rank's test features are broadcast in turn,
every rank takes the top-k of their similarities to its chunk, and the partial lists are gathered to the source
rank and merged by a second top-k. Here the features live in a store every rank can read, so no broadcast is
needed: every rank is given the same (memory-mapped) arrays and reads only its contiguous shard of bank rows
``[rank * n // world, (rank + 1) * n // world)`` plus all query rows; the shard is searched by the FAISS or the
torch backend as in one process, and one all-gather per query chunk merges the lists on every rank (stable, in
rank order: on equal similarity the lower bank row wins, as one process' shard merge),
and leave-one-out drops each query's own row after the merge, wherever its rank holds it. Every rank ends with
the same global neighbours, so the votes and rows are the same on every rank (rank 0 writes them).

Standardisation statistics are merged from per-shard (count, mean, M2) moments with Chan et al.'s update, so no
rank reads another's bank rows. Collectives run on CUDA tensors with NCCL and on CPU tensors otherwise (gloo).
A rank whose shard fails to read (NaN, damaged store) reports it in the next collective, and every rank raises,
so none is left waiting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from ..errors import BadInputError


def default_group() -> dist.ProcessGroup | None:
    """The default (WORLD) group when torch.distributed is initialised with more than one process, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


class RowWindow:
    """Rows [first, last) of a lazy row source (a `RowSubset`, anything sliced row-wise), read only when sliced.

    ``source[first:last]`` would read the whole shard at once for sources that copy on slicing; numpy arrays and
    memory maps do not need this (their slices are views).
    """

    ndim = 2

    def __init__(self, source, first: int, last: int):
        self.source, self.first = source, int(first)
        self.shape = (int(last) - int(first), int(source.shape[1]))
        self.dtype = source.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("RowWindow is read by contiguous row slices")
        start, stop, _ = index.indices(self.shape[0])
        return self.source[self.first + start:self.first + max(start, stop)]


def shard_rows(x, first: int, last: int):
    """Rows [first, last) of ``x`` without reading them: a view of an array or memory map, else a `RowWindow`."""
    return x[first:last] if isinstance(x, np.ndarray) else RowWindow(x, first, last)


def shard_bounds(n_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [start, stop) of ``rank``'s contiguous shard; sizes differ by at most one row."""
    return n_rows * rank // world_size, n_rows * (rank + 1) // world_size


def sharded_neighbor_chunks(train: np.ndarray, query: np.ndarray, search_k: int, *, chunk_rows: int,
                            shard_search: Callable[[np.ndarray, int, int],
                                                   Iterator[tuple[int, np.ndarray, np.ndarray]]],
                            group: dist.ProcessGroup, device: torch.device | None = None
                            ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (first query row, (rows, search_k) float64 similarities, (rows, search_k) global indices), merged over
    the group, in chunks of ``chunk_rows`` queries (the same on every rank).

    Args:
        train: (n_train, dim) the whole bank; this rank reads only its shard.
        query: (n_query, dim) all queries.
        search_k: Neighbours per query (k + 1 for leave-one-out, which the caller drops after).
        chunk_rows: Query rows per chunk; the local search must yield chunks of this size.
        shard_search: ``(shard, local_k, first_row)`` -> the local search's chunks, indices relative to the
            shard (``first_row``: the shard's first row in the bank, for messages).
        group: The process group.
        device: Where the collectives' tensors live; None: CUDA for NCCL, else CPU.
    """
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    device = device or collective_device(group)
    start_row, stop_row = shard_bounds(len(train), rank, world_size)
    local_k = min(search_k, stop_row - start_row)
    n_query = len(query)
    local = shard_search(shard_rows(train, start_row, stop_row), local_k, start_row) if local_k > 0 else iter(())
    for start in range(0, n_query, chunk_rows):
        rows = min(start + chunk_rows, n_query) - start
        sims = np.full((rows, search_k), -np.inf)  # float64, as the local searches' re-ranked similarities
        idx = np.full((rows, search_k), -1, np.int64)
        failure = None
        if local_k > 0:
            try:
                local_start, local_sims, local_idx = next(local)
                if local_start != start or len(local_sims) != rows:
                    raise RuntimeError(f"local search yielded rows {local_start}+{len(local_sims)}, "
                                       f"expected {start}+{rows}")
                found = local_idx >= 0
                sims[:, :local_k] = np.where(found, local_sims, -np.inf)
                idx[:, :local_k] = np.where(found, local_idx + start_row, -1)
            except Exception as error:  # noqa: BLE001 - re-raised on every rank by raise_if_any_failed
                failure = error
        raise_if_any_failed(failure, group, device)
        yield (start, *merge_ranks(sims, idx, search_k, group, device))


def merge_ranks(sims: np.ndarray, idx: np.ndarray, k: int, group: dist.ProcessGroup,
                device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """All-gather every rank's (rows, k) top-k and keep the best ``k`` per row (stable, in rank order)."""
    world_size = dist.get_world_size(group)
    local_sims = torch.from_numpy(sims).to(device)
    local_idx = torch.from_numpy(idx).to(device)
    gathered_sims = [torch.empty_like(local_sims) for _ in range(world_size)]
    gathered_idx = [torch.empty_like(local_idx) for _ in range(world_size)]
    dist.all_gather(gathered_sims, local_sims, group=group)
    dist.all_gather(gathered_idx, local_idx, group=group)
    all_sims = torch.cat(gathered_sims, dim=1)  # (rows, world_size * k), rank 0's columns first
    all_idx = torch.cat(gathered_idx, dim=1)
    order = torch.sort(all_sims, dim=1, descending=True, stable=True).indices[:, :k]
    return (torch.gather(all_sims, 1, order).cpu().numpy().copy(),
            torch.gather(all_idx, 1, order).cpu().numpy().copy())


def merged_moments(moments: Callable[[], tuple[int, np.ndarray, np.ndarray]], dim: int, group: dist.ProcessGroup,
                   device: torch.device | None = None) -> tuple[int, np.ndarray, np.ndarray]:
    """(count, mean, M2) in float64 of the union of the ranks' shards, from each rank's ``moments()``.

    Merged in rank order with Chan et al.'s pairwise update, the same update one process applies chunk by chunk.
    """
    device = device or collective_device(group)
    packed, failure = np.zeros(2 * dim + 1), None
    try:
        count, mean, m2 = moments()
        packed[0], packed[1:dim + 1], packed[dim + 1:] = count, mean, m2
    except Exception as error:  # noqa: BLE001 - re-raised on every rank by raise_if_any_failed
        failure = error
    raise_if_any_failed(failure, group, device)
    local = torch.from_numpy(packed).to(device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    total, mean, m2 = 0, np.zeros(dim), np.zeros(dim)
    for part in (g.cpu().numpy() for g in gathered):
        part_count = int(part[0])
        if part_count == 0:
            continue
        merged = total + part_count
        delta = part[1:dim + 1] - mean
        mean = mean + delta * (part_count / merged)
        m2 = m2 + part[dim + 1:] + delta ** 2 * (total * part_count / merged)
        total = merged
    return total, mean, m2


def raise_if_any_failed(failure: BaseException | None, group: dist.ProcessGroup, device: torch.device) -> None:
    """One collective in which every rank learns whether any failed; then all raise (the failing one its own)."""
    flag = torch.tensor([0 if failure is None else 1], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if int(flag.item()) == 0:
        return
    messages: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(messages, None if failure is None else str(failure), group=group)
    if failure is not None:
        raise failure
    rank, message = next((r, m) for r, m in enumerate(messages) if m is not None)
    raise BadInputError(f"k-NN failed on rank {rank} of the process group: {message}")


def collective_device(group: dist.ProcessGroup) -> torch.device:
    """CUDA (this process' current device) for NCCL groups, else CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
