"""NNQueue: FIFO writes checked slot by slot, neighbour lookup against brute force and constructed similarities."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from mimprobe.refinement import NNQueue


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def filled_queue(size: int, dim: int, count: int, seed: int = 0) -> tuple[NNQueue, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    queue = NNQueue(size, dim)
    z = torch.randn(count, dim, generator=generator)
    index = torch.arange(100, 100 + count)
    queue.update(z, index)
    return queue, F.normalize(z, dim=-1), index


def on_circle(cosines: list[float]) -> torch.Tensor:
    """Unit vectors in the (e0, e1) plane of R^8 whose cosine to e0 is given."""
    rows = torch.zeros(len(cosines), 8)
    rows[:, 0] = torch.tensor(cosines)
    rows[:, 1] = torch.tensor([math.sqrt(1 - c * c) for c in cosines])
    return rows


def test_fifo_wraps_around_when_size_is_not_a_multiple_of_the_batch():
    queue = NNQueue(10, 4)
    z = torch.randn(12, 4, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 13)[:, None]
    for step in range(3):
        queue.update(z[4 * step: 4 * step + 4], torch.arange(4 * step, 4 * step + 4))
    # rows 0-3 -> slots 0-3, rows 4-7 -> slots 4-7, rows 8-9 -> slots 8-9, rows 10-11 wrap to slots 0-1
    assert queue.indices.tolist() == [10, 11, 2, 3, 4, 5, 6, 7, 8, 9]
    assert int(queue.pointer) == 2
    expected_rows = [10, 11, 2, 3, 4, 5, 6, 7, 8, 9]
    torch.testing.assert_close(queue.features, F.normalize(z[expected_rows], dim=-1), rtol=0, atol=1e-7)
    torch.testing.assert_close(queue.features.norm(dim=-1), torch.ones(10))
    assert queue.features.dtype == torch.float32 and queue.indices.dtype == torch.int64


def test_batch_larger_than_the_queue_keeps_its_last_rows_as_one_at_a_time_writes_would():
    queue = NNQueue(5, 3)
    queue.update(torch.randn(2, 3), torch.tensor([0, 1]))       # pointer at 2
    z = torch.randn(7, 3)
    queue.update(z, torch.arange(100, 107))
    # row j goes to slot (2 + j) % 5; only rows 2..6 survive: slots 4, 0, 1, 2, 3
    assert queue.indices.tolist() == [103, 104, 105, 106, 102]
    assert int(queue.pointer) == (2 + 7) % 5
    torch.testing.assert_close(queue.features, F.normalize(z[[3, 4, 5, 6, 2]], dim=-1))

    one_at_a_time = NNQueue(5, 3)
    one_at_a_time.update(queue.features[:0], torch.tensor([], dtype=torch.int64))   # an empty batch is a no-op
    assert int(one_at_a_time.pointer) == 0
    one_at_a_time.pointer.fill_(2)
    for row in range(7):
        one_at_a_time.update(z[row:row + 1], torch.tensor([100 + row]))
    for name, value in queue.state_dict().items():
        torch.testing.assert_close(value, one_at_a_time.state_dict()[name])


def test_top1_is_the_brute_force_nearest_neighbour():
    queue, features, queue_index = filled_queue(64, 16, 64)
    z = torch.randn(20, 16, generator=torch.Generator().manual_seed(1)) * 3.0
    index = torch.arange(20)                     # no overlap with the queue's indices (100...)
    neighbours = queue.find_neighbours(z, index, topk=1)
    similarity = F.normalize(z, dim=-1) @ features.T
    torch.testing.assert_close(neighbours, features[similarity.argmax(dim=1)], rtol=0, atol=0)
    assert neighbours.dtype == torch.float32 and not neighbours.requires_grad


def test_the_anchors_own_index_is_never_returned():
    queue = NNQueue(6, 8)
    anchor = on_circle([1.0])                                     # e0
    others = on_circle([0.9, 0.8, 0.7, 0.6, 0.5])
    queue.update(torch.cat([anchor, others]), torch.tensor([7, 1, 2, 3, 4, 5]))
    generator = torch.Generator().manual_seed(0)
    z = anchor.repeat(300, 1)                                     # the exact vector stored under index 7
    for topk in (1, 3):
        picked = queue.find_neighbours(z, torch.full((300,), 7), topk=topk, generator=generator)
        assert not (picked @ anchor.T > 1 - 1e-6).any()           # cos 1.0: the anchor itself
    # another image (index 9) with the same vector does get it
    picked = queue.find_neighbours(anchor, torch.tensor([9]), topk=1)
    torch.testing.assert_close(picked, anchor)


def test_the_pick_is_uniform_over_exactly_the_top_k():
    cosines = [0.95, 0.2, 0.9, -0.3, 0.85, 0.1, 0.8, 0.0, 0.5, -0.9, 0.6, 0.7]
    queue = NNQueue(12, 8)
    queue.update(on_circle(cosines), torch.arange(12))
    top4 = {0, 2, 4, 6}                                           # cosines 0.95, 0.9, 0.85, 0.8
    z = torch.zeros(500, 8)
    z[:, 0] = 2.0                                                 # every anchor is 2 * e0
    picked = queue.find_neighbours(z, torch.arange(1000, 1500), topk=4, generator=torch.Generator().manual_seed(3))
    slots = (picked @ queue.features.T).argmax(dim=1)            # which stored row each pick is
    torch.testing.assert_close(picked, queue.features[slots], rtol=0, atol=0)
    counts = torch.bincount(slots, minlength=12)
    assert set(torch.nonzero(counts).flatten().tolist()) == top4
    assert counts[list(top4)].min() > 500 / 4 * 0.7                 # all four drawn, roughly equally


def test_empty_slots_are_never_candidates():
    queue = NNQueue(10, 8)
    stored = on_circle([-0.5, -0.6, -0.7])                        # every stored row is less similar than a zero row
    queue.update(stored, torch.tensor([0, 1, 2]))
    z = on_circle([1.0]).repeat(200, 1)
    picked = queue.find_neighbours(z, torch.full((200,), 50), topk=5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(picked.norm(dim=-1), torch.ones(200))    # never one of the 7 zero (empty) rows
    assert set((picked @ stored.T).argmax(dim=1).tolist()) == {0, 1, 2}   # the 3 filled rows, fewer than topk


def test_rows_without_candidates_fall_back_to_their_own_projection():
    z = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]])
    empty = NNQueue(4, 3)
    torch.testing.assert_close(empty.find_neighbours(z, torch.tensor([0, 1]), topk=2), F.normalize(z, dim=-1))
    # only entry is image 0's own: row 0 falls back, row 1 (image 1) gets it
    queue = NNQueue(4, 3)
    queue.update(torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([0]))
    picked = queue.find_neighbours(z, torch.tensor([0, 1]), topk=2)
    torch.testing.assert_close(picked, torch.tensor([[0.6, 0.8, 0.0], [1.0, 0.0, 0.0]]))


def test_seeded_generator_is_deterministic():
    queue, _, _ = filled_queue(50, 8, 50)
    z = torch.randn(40, 8)
    index = torch.arange(40)
    first = queue.find_neighbours(z, index, topk=10, generator=torch.Generator().manual_seed(5))
    again = queue.find_neighbours(z, index, topk=10, generator=torch.Generator().manual_seed(5))
    other = queue.find_neighbours(z, index, topk=10, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)


def test_float32_lookup_under_bf16_autocast():
    # cosines 1e-4 apart near 1 tie in a bf16 matmul (8-bit mantissa); float32 finds the nearest wherever it sits
    cosines = torch.tensor([0.9990, 0.9991, 0.9992, 0.9993, 0.9994, 0.9995, 0.9996, 0.9997])
    anchor = on_circle([1.0]).bfloat16()
    for shift in range(8):
        close = NNQueue(8, 8)
        close.update(on_circle(cosines.roll(shift).tolist()), torch.arange(8))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            picked = close.find_neighbours(anchor, torch.tensor([10]), topk=1)
        torch.testing.assert_close(picked, close.features[(7 + shift) % 8][None], rtol=0, atol=0)

    queue, _, _ = filled_queue(32, 8, 32)
    z = torch.randn(10, 8, generator=torch.Generator().manual_seed(1)).bfloat16()
    reference = queue.find_neighbours(z.float(), torch.arange(10), topk=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        picked = queue.find_neighbours(z, torch.arange(10), topk=1)
        queue.update(z, torch.arange(10))
    assert picked.dtype == torch.float32 and queue.features.dtype == torch.float32
    torch.testing.assert_close(picked, reference, rtol=0, atol=0)
    torch.testing.assert_close(queue.features[:10], F.normalize(z.float(), dim=-1))


def test_state_dict_round_trip():
    queue, _, _ = filled_queue(10, 4, 7)
    assert set(queue.state_dict()) == {"features", "indices", "pointer"}      # persistent: in checkpoints
    buffer = io.BytesIO()
    torch.save(queue.state_dict(), buffer)
    buffer.seek(0)
    restored = NNQueue(10, 4)
    restored.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    for name, value in queue.state_dict().items():
        assert torch.equal(value, restored.state_dict()[name])
    z = torch.randn(5, 4)
    for q in (queue, restored):
        q.update(z, torch.arange(5))              # both wrap identically from pointer 7
    assert torch.equal(queue.indices, restored.indices) and int(restored.pointer) == 2
    picks = [q.find_neighbours(z, torch.arange(5), topk=3, generator=torch.Generator().manual_seed(0))
             for q in (queue, restored)]
    assert torch.equal(*picks)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: NNQueue(0, 4), "size must be an integer >= 1, got 0"),
    (lambda: NNQueue(8, 0), "dim must be an integer >= 1, got 0"),
    (lambda: NNQueue(8, 4).find_neighbours(torch.randn(2, 4), torch.arange(2), topk=0),
     "topk must be an integer >= 1, got 0"),
    (lambda: NNQueue(8, 4).find_neighbours(torch.randn(2, 5), torch.arange(2), topk=1),
     "z must have shape (batch, 4), got (2, 5)"),
    (lambda: NNQueue(8, 4).update(torch.randn(3, 4), torch.arange(2)),
     "index must have shape (3,) to match z, got (2,)"),
    (lambda: NNQueue(8, 4).update(torch.randn(2, 4), torch.zeros(2)),
     "index must hold integer dataset indices, got dtype torch.float32"),
    (lambda: NNQueue(8, 4).update(torch.randn(2, 4), torch.tensor([3, -1])),
     "index must hold dataset indices >= 0, got -1"),
])
def test_bad_arguments_raise_exact_messages(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value) == message
