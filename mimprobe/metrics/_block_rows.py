"""Row chunks of several blocks' features, read on demand: the one way the probes see a split.

A FeatureStore keeps one ``(n, d)`` memory map per block; the batched probes need ``(rows, blocks, d)`` float32
chunks of the same rows of every block. `BlockRows` reads them chunk by chunk from the maps (or from arrays in
memory), so that no more than one chunk of all blocks is ever held: on ImageNet-1k with ViT-L that is the difference
between 126 GB (every block's train split as float32) and the chunk size the memory budget allows. Read pages of
read-only memory maps are dropped from the resident set after each chunk (`knn.release_pages`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..errors import BadInputError

ArrayLike = np.ndarray | torch.Tensor


class RowSubset:
    """Rows ``rows`` of a 2-D array or memory map, read only when sliced: a lazy ``source[rows]``.

    Behaves as the (len(rows), d) array for what the metrics do with their inputs (``shape``, ``dtype``, ``len``,
    slices and integer-array indexing, each returning a copy); read pages of a read-only memory map are dropped
    from the resident set after each read, so that scanning a split holds one chunk, not the split.

    Args:
        source: (n, d) array or memory map.
        rows: (m,) sorted int indices into ``source``.
    """

    ndim = 2

    def __init__(self, source: np.ndarray, rows: np.ndarray):
        self.source = source
        self.rows = np.asarray(rows, dtype=np.int64)
        self.shape = (len(self.rows), int(source.shape[1]))
        self.dtype = source.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        from ._memory import release_pages

        rows = self.rows[index]
        if np.ndim(rows) == 0:
            rows = rows[None]
        if len(rows) == 0:
            return np.empty((0, self.shape[1]), self.dtype)
        first, last = int(rows.min()), int(rows.max()) + 1
        window = self.source[first:last]
        selected = np.array(window[rows - first])
        release_pages(window)
        return selected


class ConcatenatedRows:
    """The column concatenation of several (n, d_i) arrays with the same rows, read only when sliced: a lazy
    ``np.concatenate(parts, axis=1)`` of shape (n, sum d_i) (a multi-block readout, `mimprobe.metrics.readout`).

    Behaves as that array for what the probes do with their inputs (``shape``, ``dtype``, ``len``, slices and
    sorted integer-array indexing, each returning a copy, and ``np.asarray``); each part is read for the rows asked
    only, and a read-only memory map's pages are dropped from the resident set afterwards, so that scanning the
    concatenation holds one chunk of it, never the whole.

    Args:
        parts: (n, d_i) arrays, memory maps or `RowSubset`s, in column order.
    """

    ndim = 2

    def __init__(self, parts: Sequence[np.ndarray]):
        self.parts = list(parts)
        lengths = {int(np.shape(part)[0]) for part in self.parts}
        if not self.parts or len(lengths) != 1:
            raise BadInputError(f"concatenated features need parts with one number of rows, got {sorted(lengths)}")
        self.widths = [int(np.shape(part)[1]) for part in self.parts]
        self.shape = (lengths.pop(), sum(self.widths))
        self.dtype = np.result_type(*(part.dtype for part in self.parts))

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def __getitem__(self, index) -> np.ndarray:
        from ._memory import release_pages

        if isinstance(index, tuple):
            raise TypeError("ConcatenatedRows takes a row index (slice or integer array), not a tuple")
        if isinstance(index, (int, np.integer)):
            return self[np.array([index])][0]
        if not isinstance(index, slice):
            index = np.asarray(index, dtype=np.int64)
        count = len(range(*index.indices(self.shape[0]))) if isinstance(index, slice) else len(index)
        out = np.empty((count, self.shape[1]), self.dtype)
        column = 0
        for part, width in zip(self.parts, self.widths):
            if isinstance(index, slice) or not isinstance(part, np.memmap) or count == 0:
                window = selected = part[index]
            else:  # one contiguous window of the map, then the rows of it: locality, and its pages dropped below
                first, last = int(index.min()), int(index.max()) + 1
                window = part[first:last]
                selected = window[index - first]
            out[:, column:column + width] = selected
            release_pages(window)
            column += width
        return out


def lazy_rows(source: np.ndarray, rows: np.ndarray | None) -> "np.ndarray | RowSubset":
    """``source`` itself when ``rows`` is every row in order (or None), else a `RowSubset`."""
    if rows is None or (len(rows) == source.shape[0] and np.array_equal(rows, np.arange(source.shape[0]))):
        return source
    return RowSubset(source, rows)


class BlockRows:
    """Rows ``rows`` of the blocks ``blocks`` of ``{block: (n, d) features}``, as float32 chunks.

    Args:
        features: {block: (n, d) array, memory map or tensor}, all of one width.
        blocks: The blocks to read, in this order.
        rows: (m,) sorted int row indices into every block, or None for all rows.
        split: Name used in error messages ("train", "test").
        device: Where the chunks go.
    """

    def __init__(self, features: Mapping[int, ArrayLike], blocks: Sequence[int], rows: np.ndarray | None = None, *,
                 split: str = "train", device: str | torch.device = "cpu"):
        self.features = features
        self.blocks = list(blocks)
        first = features[self.blocks[0]]
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self.num_rows = int(np.shape(first)[0]) if self.rows is None else len(self.rows)
        self.dim = int(np.shape(first)[1])
        self.split = split
        self.device = torch.device(device)
        if any(np.shape(features[b])[1] != self.dim for b in self.blocks):
            raise BadInputError("blocks read together must have one width")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(num_blocks, n, d), as the stacked tensor would have."""
        return len(self.blocks), self.num_rows, self.dim

    def subset(self, members: Sequence[int]) -> "BlockRows":
        """The same rows of the blocks at positions ``members``."""
        return BlockRows(self.features, [self.blocks[m] for m in members], self.rows, split=self.split,
                         device=self.device)

    def read(self, start: int, stop: int) -> torch.Tensor:
        """(stop - start, num_blocks, d) float32, sample-major: rows ``start:stop`` of the selection."""
        from ._memory import release_pages

        stop = min(stop, self.num_rows)
        chunk = torch.empty(stop - start, len(self.blocks), self.dim, dtype=torch.float32)
        for i, block in enumerate(self.blocks):
            source = self.features[block]
            if isinstance(source, torch.Tensor):
                index = slice(start, stop) if self.rows is None else torch.as_tensor(self.rows[start:stop])
                chunk[:, i] = source[index].to("cpu", torch.float32)
                continue
            if self.rows is None:
                window = selected = source[start:stop]
            else:
                rows = self.rows[start:stop]
                first, last = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0)
                window = source[first:last]
                selected = window[rows - first] if len(rows) != last - first else window
            np.copyto(chunk[:, i].numpy(), selected, casting="unsafe")
            release_pages(window)
        return chunk.to(self.device)

    def gather(self, positions: torch.Tensor) -> torch.Tensor:
        """(len(positions), num_blocks, d) float32: the rows at sorted ``positions`` of the selection (a
        mini-batch), read from each map by index; the maps' pages are dropped from the resident set afterwards."""
        from ._memory import release_pages

        positions = positions.cpu().numpy()
        rows = positions if self.rows is None else self.rows[positions]
        batch = torch.empty(len(rows), len(self.blocks), self.dim, dtype=torch.float32)
        for i, block in enumerate(self.blocks):
            source = self.features[block]
            if isinstance(source, torch.Tensor):
                batch[:, i] = source[torch.as_tensor(rows)].to("cpu", torch.float32)
                continue
            np.copyto(batch[:, i].numpy(), source[rows], casting="unsafe")
            release_pages(source)
        return batch.to(self.device)

    def chunks(self, chunk_rows: int):
        """Yield ``(start, stop)`` bounds of consecutive chunks of at most ``chunk_rows`` rows."""
        for start in range(0, self.num_rows, max(1, chunk_rows)):
            yield start, min(start + chunk_rows, self.num_rows)


class TensorRows(BlockRows):
    """A (num_blocks, n, d) array or tensor already in memory, seen as `BlockRows` (no copy until read)."""

    def __init__(self, features: ArrayLike, *, device: str | torch.device = "cpu"):
        x = features if isinstance(features, torch.Tensor) else torch.as_tensor(np.asarray(features))
        if x.ndim != 3:
            raise BadInputError(f"features must be (num_blocks, n, d), got shape {tuple(x.shape)}")
        self.x = x
        self.blocks = list(range(x.shape[0]))
        self.rows = None
        self.num_rows, self.dim = int(x.shape[1]), int(x.shape[2])
        self.split = "train"
        self.device = torch.device(device)

    def subset(self, members: Sequence[int]) -> "TensorRows":
        return TensorRows(self.x[list(members)], device=self.device)

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.x[:, start:stop].to(self.device, torch.float32).transpose(0, 1).contiguous()

    def gather(self, positions: torch.Tensor) -> torch.Tensor:
        return self.x[:, positions.to(self.x.device)].to(self.device, torch.float32).transpose(0, 1).contiguous()


def as_block_rows(features: "BlockRows | ArrayLike", device: str | torch.device) -> BlockRows:
    """`BlockRows` as they are, or a (num_blocks, n, d) array/tensor wrapped as `TensorRows`."""
    return features if isinstance(features, BlockRows) else TensorRows(features, device=device)


def chunk_rows_for(memory_budget: int | None, *, num_blocks: int, dim: int, copies: int = 3) -> int | None:
    """Rows per chunk so that ``copies`` float32 chunks of all blocks fit in ``memory_budget`` bytes (None: all).

    The probes hold at most one chunk of rows and work on copies of it (standardised rows, the gathered batch)."""
    if memory_budget is None:
        return None
    per_row = num_blocks * dim * 4 * copies
    rows = int(memory_budget) // per_row
    if rows < 1:
        raise BadInputError(f"--memory-budget {memory_budget} bytes cannot hold one row of {num_blocks} blocks of "
                            f"width {dim} ({per_row} bytes): raise it or probe fewer blocks per pass")
    return rows
