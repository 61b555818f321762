"""The nearest-neighbour queue of one NNA head: a FIFO of past projections and their dataset indices.

NNCLR (Dwibedi et al. 2021, arXiv 2104.14548, Sec. 3.1) swaps the anchor for its nearest neighbour in a support
set of past embeddings; MIM-Refiner (arXiv 2402.10093, Sec. 3) keeps that queue per head, holding the projections
of the first global view, excludes entries of the anchor's own image, and samples the neighbour uniformly from the
top-k (the official ``src/modules/ssl/nnclr_queue.py``). The module is small and stateful with an explicit
``update``, after lightly's ``MemoryBankModule``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EMPTY_INDEX = -1   # dataset index of a slot that was never written


def _check_positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class NNQueue(nn.Module):
    """FIFO queue of L2-normalised projections with their dataset indices, for nearest-neighbour lookup.

    Buffers (persistent, so that they travel in ``state_dict`` and an interrupted refinement resumes with the exact
    queue it stopped with):

    - ``features``: (size, dim) float32, L2-normalised rows; zeros in slots never written.
    - ``indices``: (size,) int64 dataset index of each row; ``-1`` marks an empty slot.
    - ``pointer``: () int64, the next slot to write.

    Args:
        size: Number of slots (65,536 in MIM-Refiner; smaller for small data sets).
        dim: Width of the stored projections (the head's ``proj_dim``).

    Raises:
        ValueError: ``size`` or ``dim`` is not an integer >= 1.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        _check_positive_int(size, "size")
        _check_positive_int(dim, "dim")
        self.size = size
        self.dim = dim
        self.register_buffer("features", torch.zeros(size, dim, dtype=torch.float32))
        self.register_buffer("indices", torch.full((size,), EMPTY_INDEX, dtype=torch.int64))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.int64))

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"

    def _check_batch(self, z: torch.Tensor, index: torch.Tensor) -> None:
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"z must have shape (batch, {self.dim}), got {tuple(z.shape)}")
        if index.shape != (z.shape[0],):
            raise ValueError(f"index must have shape ({z.shape[0]},) to match z, got {tuple(index.shape)}")
        if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
            raise ValueError(f"index must hold integer dataset indices, got dtype {index.dtype}")

    @torch.no_grad()
    def find_neighbours(self, z: torch.Tensor, index: torch.Tensor, *, topk: int,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """Nearest neighbour of each row among the queue entries, sampled uniformly from the top ``topk``.

        Similarity is the cosine of ``normalize(z)`` to every filled slot, in float32 even under autocast. Slots
        that are empty, or hold the anchor's own dataset index (the same image seen in an earlier step or epoch),
        are never candidates. Each row takes its ``topk`` most similar candidates (fewer if fewer exist) and picks
        one uniformly with ``generator``; ``topk=1`` is the plain nearest neighbour (MIM-Refiner's heads-only stage).

        A row without any candidate (the very first step, when the queue is still empty) gets ``normalize(z)`` of
        itself: its positive then degenerates to the anchor's own projection, i.e. a plain contrastive step.

        Args:
            z: (batch, dim) projections, any float dtype; detached.
            index: (batch,) integer dataset indices of the rows.
            topk: Size of the candidate set per row (20 in MIM-Refiner's full stage).
            generator: Random source of the uniform pick; None uses torch's global one. Its device must be the one
                ``torch.rand`` draws on: CPU generators work for any ``z`` (the draw is moved).

        Returns:
            (batch, dim) float32 L2-normalised neighbours, without gradient.

        Raises:
            ValueError: ``topk`` < 1 or the shapes do not match the queue.
        """
        _check_positive_int(topk, "topk")
        self._check_batch(z, index)
        batch = z.shape[0]
        with torch.autocast(device_type=z.device.type, enabled=False):
            queries = F.normalize(z.detach().float(), dim=-1)
            similarity = queries @ self.features.T                                   # (batch, size)
            excluded = (self.indices == EMPTY_INDEX)[None, :] | (index.long()[:, None] == self.indices[None, :])
            similarity = similarity.masked_fill(excluded, float("-inf"))
            top_similarity, top_slots = similarity.topk(min(topk, self.size), dim=1)  # (batch, k), best first
            num_candidates = torch.isfinite(top_similarity).sum(dim=1)              # (batch,) excluded are -inf
            draw_device = generator.device if generator is not None else z.device
            uniform = torch.rand(batch, generator=generator, device=draw_device).to(z.device)
            # the candidates of a row are its first num_candidates columns: pick one of them uniformly
            last = (num_candidates - 1).clamp(min=0)     # float rounding of uniform * n may reach n itself
            choice = torch.minimum((uniform * num_candidates).long(), last)
            slots = top_slots.gather(1, choice[:, None]).squeeze(1)                  # (batch,)
            neighbours = self.features[slots]
            return torch.where((num_candidates > 0)[:, None], neighbours, queries)

    @torch.no_grad()
    def update(self, z: torch.Tensor, index: torch.Tensor) -> None:
        """Write ``normalize(z)`` and ``index`` first-in first-out at ``pointer``, after this step's lookup.

        Row ``j`` of the batch goes to slot ``(pointer + j) % size``, so a write that runs past the end wraps to the
        start, and a batch larger than the queue leaves only its last ``size`` rows, exactly as if the rows had been
        written one at a time. In distributed runs the trainer passes the gathered rows of all processes (in rank
        order), so every process keeps an identical queue.

        Args:
            z: (batch, dim) projections of the first global view, any float dtype; stored as float32, normalised.
            index: (batch,) non-negative integer dataset indices of the rows.

        Raises:
            ValueError: Shapes do not match the queue, or an index is negative (``-1`` marks empty slots).
        """
        self._check_batch(z, index)
        batch = z.shape[0]
        if batch == 0:
            return
        if int(index.min()) < 0:
            raise ValueError(f"index must hold dataset indices >= 0, got {int(index.min())}")
        keep = min(batch, self.size)
        offsets = torch.arange(batch - keep, batch, device=self.pointer.device)
        slots = (self.pointer + offsets) % self.size                      # (keep,) distinct slots
        rows = z.detach()[batch - keep:]
        with torch.autocast(device_type=rows.device.type, enabled=False):
            self.features[slots] = F.normalize(rows.float(), dim=-1).to(self.features.device)
        self.indices[slots] = index[batch - keep:].long().to(self.indices.device)
        self.pointer.fill_((int(self.pointer) + batch) % self.size)
