"""Exact k-NN search in torch (CPU or CUDA): chunked float32 matmul of normalised rows + ``torch.topk``.

The same search as `knn_search._search` (FAISS): queries and bank are prepared by `_knn_rows.prepare` (read as float32,
standardised with the train statistics if asked, L2-normalised by ``faiss.normalize_L2``), so both backends see
bit-identical rows, and the float32 GEMM's k + 8 candidates are re-ranked by their float64 similarity
(`rescore_tensors`, `_knn_rows.rescore`), so both return the same neighbours although their GEMMs round differently.

DINOv2's ``KnnModule`` (facebookresearch/dinov2, ``dinov2/eval/knn.py``) searches the same way on the GPU:
similarity ``features @ bank.T`` and ``topk`` per chunk. Here the bank is also cut into tiles of ``tile_rows``
rows so that the (chunk, tile) similarity block stays within the budget, and streamed to the device shard by
shard when it does not fit; the per-tile and per-shard top-k lists are merged (stable sort: on equal similarity
the earlier tile or shard wins, as in the FAISS path's shard merge).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .._threads import cpu_threads
from ..errors import BadInputError
from .knn_plan import DEFAULT_CHUNK_SIZE, RESULT_BYTES, split_budget  # the FAISS planner's counts and cut

DEFAULT_TILE_BYTES = 256 * 2 ** 20  # one (chunk, tile) float32 similarity block without a memory budget
DEVICE_FREE_FRACTION = 0.9        # without a budget, a CUDA search plans for this share of the free memory
_MERGE_BYTES = 60                 # per neighbour: concatenated pair, sort values and order, gathered indices
_SCORE_BYTES = 8                  # per similarity: the float32 block and topk's workspace (conservative)


@dataclass(frozen=True)
class TorchSearchPlan:
    """``chunk_rows`` queries at a time, against bank shards of ``shard_rows`` rows held on the device, each shard
    multiplied ``tile_rows`` bank rows at a time."""

    chunk_rows: int
    shard_rows: int
    tile_rows: int

    def sharded(self, n_train: int) -> bool:
        return self.shard_rows < n_train


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device from "auto", "cpu", "cuda", "cuda:1" (`mimprobe._device.resolve_device`) or a device.

    Raises:
        BadInputError: Unknown device, or CUDA asked for where torch sees no GPU.
    """
    from .._device import resolve_device as resolve_name

    if not isinstance(device, torch.device):
        try:
            return resolve_name(str(device))
        except RuntimeError as error:  # torch.device("cuda:x")
            raise BadInputError(f"unknown device {device!r}: use auto, cpu or cuda (cuda:N)") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(f"device {device} asked for but no CUDA device is visible: use --device cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise BadInputError(f"k-NN runs on cpu or cuda, not {device.type!r}")
    return device


def device_budget(device: torch.device, memory_budget: int | None) -> int | None:
    """The byte budget a search plans with: ``memory_budget``, on CUDA at most 90 % of the free device memory."""
    if device.type != "cuda":
        return memory_budget
    free, _total = torch.cuda.mem_get_info(device)
    free = int(free * DEVICE_FREE_FRACTION)
    return free if memory_budget is None else min(int(memory_budget), free)


def plan_torch_search(n_train: int, n_query: int, dim: int, max_k: int, *, source_itemsize: int = 4,
                      chunk_size: int | None = None, shard_size: int | None = None,
                      memory_budget: int | None = None, extra_row_bytes: int = 0) -> TorchSearchPlan:
    """Chunk, shard and tile sizes for a torch search.

    Without a budget: ``chunk_size`` (default 8192) query rows, the whole bank (or ``shard_size`` rows) on the
    device, tiles of 256 MiB of similarities. With ``memory_budget`` bytes (each of host and device memory stays
    under it): 8 MiB (at most a quarter) is set aside; the bank is held whole when its float32 copy fits in half of
    the rest, else the (n_query, max_k) merged results are set aside and the rest split evenly between a bank shard
    and a query chunk with its similarity tile. A query row costs its float32 copy (and the source row being
    read), its results and merge temporaries, ``extra_row_bytes`` (the caller's class votes), and 8 bytes per
    tile column. Explicit sizes are upper bounds. Outside the budget: torch's own start-up, once per process (its
    first CPU matmul and topk raised RSS by about 50 MiB here; measured: float16 memory-mapped bank of twice a
    48 MiB budget, peak RSS 42 MiB above the RSS after that start-up; FAISS 32 MiB), and on CUDA the context.

    Raises:
        BadInputError: A size below 1, or a budget too small for one row.
    """
    for label, value in (("chunk_size", chunk_size), ("shard_size", shard_size), ("memory_budget", memory_budget)):
        if value is not None and int(value) < 1:
            raise BadInputError(f"{label} must be a positive number, got {value}")
    chunk_cap = min(int(chunk_size or DEFAULT_CHUNK_SIZE), n_query)
    if memory_budget is None:
        shard_rows = min(int(shard_size or n_train), n_train)
        tile_rows = max(1, min(shard_rows, DEFAULT_TILE_BYTES // (4 * chunk_cap)))
        return TorchSearchPlan(chunk_rows=chunk_cap, shard_rows=shard_rows, tile_rows=tile_rows)
    sharded, shard_rows, query_budget = split_budget(int(memory_budget), n_train=n_train, n_query=n_query, dim=dim,
                                                     max_k=max_k, shard_size=shard_size)
    # a sharded search's chunk results are the merged results, already set aside
    per_row = 0 if sharded else max_k * RESULT_BYTES
    per_row += dim * (4 + source_itemsize) + max_k * _MERGE_BYTES + int(extra_row_bytes)
    wanted_tile = min(shard_rows, 1024)  # at least faiss' similarity tile, if the budget allows
    chunk_rows = min(chunk_cap, query_budget // (per_row + _SCORE_BYTES * wanted_tile))
    if chunk_rows < 1:
        chunk_rows = min(chunk_cap, query_budget // (per_row + _SCORE_BYTES))
    if chunk_rows < 1:
        raise BadInputError(f"memory budget {int(memory_budget)} bytes holds no query row of "
                            f"{per_row + _SCORE_BYTES} bytes: raise the budget")
    tile_rows = max(1, min(shard_rows, (query_budget // chunk_rows - per_row) // _SCORE_BYTES))
    return TorchSearchPlan(chunk_rows=int(chunk_rows), shard_rows=int(shard_rows), tile_rows=int(tile_rows))


def torch_search(train: np.ndarray, query: np.ndarray, k: int, *, exclude_self: bool,
                 stats: tuple[np.ndarray, np.ndarray] | None, plan: TorchSearchPlan, device: torch.device,
                 threads: int | None, name: str, first_row: int = 0) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (first query row, (rows, k) float64 similarities, (rows, k) int64 train indices) chunk by chunk.

    The contract of `knn_search._search` (``k`` at most the bank's rows): decreasing float64 similarities of the
    re-ranked candidates, leave-one-out drops each query's own row by index. ``first_row``: the index of
    ``train``'s first row in the whole bank (a process' shard), for messages.
    """
    from ._knn_rows import RESCORE_MARGIN, drop_self, prepare

    n_train, n_query, dim = len(train), len(query), train.shape[1]
    search_k = k + int(exclude_self)
    # thread count and matmul precision are set around each computation, never held across a yield
    if not plan.sharded(n_train):
        with _settings(threads):
            bank = _to_device(prepare(train, 0, n_train, None, stats, plan.chunk_rows, "train", name, first_row),
                              device)
        same_rows = query is train  # leave-one-out on one array: its prepared rows are the bank's
        buffer = None if same_rows else np.empty((min(plan.chunk_rows, n_query), dim), np.float32)
        for start in range(0, n_query, plan.chunk_rows):
            stop = min(start + plan.chunk_rows, n_query)
            with _settings(threads):
                chunk = bank[start:stop] if same_rows else _to_device(
                    prepare(query, start, stop, buffer, stats, plan.chunk_rows, "query", name), device)
                _, candidates = chunk_topk(chunk, bank, min(search_k + RESCORE_MARGIN, n_train),
                                           tile_rows=plan.tile_rows)
                sims, idx = _as_numpy(*rescore_tensors(chunk, bank, candidates, search_k,
                                                       workspace_bytes=len(chunk) * plan.tile_rows * _SCORE_BYTES))
            yield (start, *drop_self(sims, idx, start)) if exclude_self else (start, sims, idx)
        return
    # The bank does not fit: each shard goes to the device once and meets every query chunk.
    best_sims = torch.full((n_query, search_k), -torch.inf, dtype=torch.float64, device=device)
    best_idx = torch.full((n_query, search_k), -1, dtype=torch.int64, device=device)
    shard_buffer = np.empty((plan.shard_rows, dim), np.float32)
    query_buffer = np.empty((min(plan.chunk_rows, n_query), dim), np.float32)
    with _settings(threads):
        for shard_start in range(0, n_train, plan.shard_rows):
            shard_stop = min(shard_start + plan.shard_rows, n_train)
            shard = _to_device(prepare(train, shard_start, shard_stop, shard_buffer, stats, plan.chunk_rows,
                                        "train", name, first_row), device)
            for start in range(0, n_query, plan.chunk_rows):
                stop = min(start + plan.chunk_rows, n_query)
                chunk = _to_device(prepare(query, start, stop, query_buffer, stats, plan.chunk_rows, "query",
                                            name), device)
                _, candidates = chunk_topk(chunk, shard, min(search_k + RESCORE_MARGIN, len(shard)),
                                           tile_rows=plan.tile_rows)
                sims, idx = rescore_tensors(chunk, shard, candidates, min(search_k, len(shard)),
                                            workspace_bytes=len(chunk) * plan.tile_rows * _SCORE_BYTES)
                best_sims[start:stop], best_idx[start:stop] = merge_topk(best_sims[start:stop],
                                                                         best_idx[start:stop], sims,
                                                                         idx + shard_start)
            del shard
    del shard_buffer, query_buffer
    for start in range(0, n_query, plan.chunk_rows):
        stop = min(start + plan.chunk_rows, n_query)
        sims, idx = _as_numpy(best_sims[start:stop], best_idx[start:stop])
        yield (start, *drop_self(sims, idx, start)) if exclude_self else (start, sims, idx)


def chunk_topk(chunk: torch.Tensor, bank: torch.Tensor, k: int, *, tile_rows: int,
               offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest inner products of each (rows, dim) query with the (n_bank, dim) bank, ``tile_rows`` bank
    rows per matmul.

    Returns:
        (rows, k) float32 similarities, decreasing, and (rows, k) int64 bank indices + ``offset``; columns past
        the bank's size are -inf and -1.
    """
    best_sims = torch.full((len(chunk), k), -torch.inf, dtype=torch.float32, device=chunk.device)
    best_idx = torch.full((len(chunk), k), -1, dtype=torch.int64, device=chunk.device)
    for first in range(0, len(bank), tile_rows):
        tile = bank[first:first + tile_rows]
        similarities = chunk @ tile.T  # (rows, tile) float32
        sims, idx = torch.topk(similarities, min(k, len(tile)), dim=1)
        del similarities
        best_sims, best_idx = merge_topk(best_sims, best_idx, sims, idx + (first + offset))
    return best_sims, best_idx


def rescore_tensors(chunk: torch.Tensor, bank: torch.Tensor, candidates: torch.Tensor, keep: int, *,
                    workspace_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`_knn_rows.rescore` on tensors: candidates re-ranked by their float64 inner product, the best ``keep`` kept.

    On the CPU it is `_knn_rows.rescore` itself (on the tensors' memory), so the torch and FAISS backends re-rank with
    the same arithmetic; on CUDA the float64 products run on the device, ``workspace_bytes`` (the similarity
    tile's share of the budget, free by now) of candidate rows at a time.

    Returns:
        (rows, keep) float64 similarities, decreasing, and (rows, keep) int64 indices.
    """
    from ._knn_rows import rescore

    if chunk.device.type == "cpu":
        sims, idx = rescore(chunk.numpy(), bank.numpy(), candidates.numpy(), keep)
        return torch.from_numpy(sims), torch.from_numpy(idx)
    rows, m = candidates.shape
    exact = torch.empty((rows, m), dtype=torch.float64, device=chunk.device)
    step = max(1, int(workspace_bytes) // (m * chunk.shape[1] * 12))  # the float32 gather and its float64 copy
    for first in range(0, rows, step):
        rows_of = bank[candidates[first:first + step]].double()  # (step, m, dim)
        exact[first:first + step] = torch.bmm(rows_of, chunk[first:first + step, :, None].double())[:, :, 0]
    order = torch.sort(exact, dim=1, descending=True, stable=True).indices[:, :keep]
    return torch.gather(exact, 1, order), torch.gather(candidates, 1, order)


def merge_topk(best_sims: torch.Tensor, best_idx: torch.Tensor, sims: torch.Tensor,
               idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The best ``best_sims.shape[1]`` of the running (rows, k) and new (rows, k') neighbours; on equal
    similarity the running ones (earlier bank rows) come first, as `_knn_rows.merge_into`'s stable argsort."""
    all_sims = torch.cat([best_sims, sims], dim=1)
    all_idx = torch.cat([best_idx, idx], dim=1)
    order = torch.sort(all_sims, dim=1, descending=True, stable=True).indices[:, :best_sims.shape[1]]
    return torch.gather(all_sims, 1, order), torch.gather(all_idx, 1, order)


def _to_device(rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """A float32 host array on the device; on the CPU the tensor shares the array's memory (no copy)."""
    return torch.from_numpy(rows).to(device)


def _as_numpy(sims: torch.Tensor, idx: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    return sims.cpu().numpy().copy(), idx.cpu().numpy().copy()


@contextlib.contextmanager
def _settings(threads: int | None) -> Iterator[None]:
    """Exact float32 matmuls and ``threads`` CPU threads inside the block; gradients are never recorded."""
    with _exact_float32(), cpu_threads(threads), torch.no_grad():
        yield


@contextlib.contextmanager
def _exact_float32() -> Iterator[None]:
    """Full float32 matmuls inside the block: TF32 (``set_float32_matmul_precision("high")``, set by training
    code) keeps 10 mantissa bits and would reorder neighbours that FAISS separates."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
