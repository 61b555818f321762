"""NNA loss against slow loop references, a closed form, autograd expectations and a real 2-process gloo run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mimprobe.refinement import multi_view_nna_loss, nna_loss

TEMPERATURE = 0.2


def unit_rows(x: torch.Tensor) -> list[list[float]]:
    """Rows divided by their norm, as Python floats (double precision)."""
    rows = x.double().tolist()
    return [[v / math.sqrt(sum(c * c for c in row)) for v in row] for row in rows]


def dot(u: list[float], v: list[float]) -> float:
    return sum(a * b for a, b in zip(u, v))


def loop_loss(anchor, neighbour, predictions_all, temperature, *, offset=0, swap="positive") -> float:
    """The NNA (or all-swap) cross-entropy written out with Python loops over i and j.

    ``predictions_all`` holds the predictions of every process; the local rows are ``offset ... offset + B - 1``.
    """
    z, nn, p_all = unit_rows(anchor), unit_rows(neighbour), unit_rows(predictions_all)
    total = 0.0
    for i in range(len(z)):
        logits = []
        for j in range(len(p_all)):
            uses_neighbour = swap == "all" or j == offset + i
            logits.append(dot(nn[i] if uses_neighbour else z[i], p_all[j]) / temperature)
        log_sum_exp = max(logits) + math.log(sum(math.exp(v - max(logits)) for v in logits))
        total += log_sum_exp - logits[offset + i]
    return total / len(z)


def random_triplet(batch: int = 6, dim: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    anchor = torch.randn(batch, dim, generator=generator) * 3.0
    neighbour = F.normalize(anchor + 3.0 * torch.randn(batch, dim, generator=generator), dim=-1)
    prediction = torch.randn(batch, dim, generator=generator) * 2.0 + 0.5 * anchor
    return anchor, neighbour, prediction


def test_matches_the_loop_reference_and_differs_from_the_all_swap_form():
    anchor, neighbour, prediction = random_triplet()
    loss = nna_loss(anchor, neighbour, prediction, temperature=TEMPERATURE)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert loss.item() == pytest.approx(loop_loss(anchor, neighbour, prediction, TEMPERATURE), abs=1e-5)
    # NNCLR's all-swap form (negatives from nn, not z) is another loss: 5000x the tolerance above away
    assert abs(loss.item() - loop_loss(anchor, neighbour, prediction, TEMPERATURE, swap="all")) > 0.05


def test_closed_form_with_perfect_neighbours():
    batch, temperature = 4, 0.3
    eye = torch.eye(2 * batch)
    scales = torch.tensor([0.5, 2.0, 3.0, 7.0])[:, None]          # unnormalised inputs
    anchor = eye[:batch] * scales                                  # z_i = e_i
    prediction = eye[batch:] * scales.flip(0)                      # p_j = e_{B+j}: orthogonal to every z_i
    neighbour = eye[batch:]                                        # nn_i = p_i
    expected = math.log(1 + (batch - 1) * math.exp(-1 / temperature))
    loss = nna_loss(anchor, neighbour, prediction, temperature=temperature)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_gradient_reaches_the_prediction_only_and_matches_autograd_of_a_float64_reference():
    anchor, neighbour, prediction = (t.clone().requires_grad_(True) for t in random_triplet(seed=1))
    nna_loss(anchor, neighbour, prediction, temperature=TEMPERATURE).backward()
    assert anchor.grad is None and neighbour.grad is None
    assert prediction.grad is not None and prediction.grad.abs().sum() > 0

    reference_prediction = prediction.detach().double().requires_grad_(True)
    z = F.normalize(anchor.detach().double(), dim=-1)
    nn = F.normalize(neighbour.detach().double(), dim=-1)
    p = F.normalize(reference_prediction, dim=-1)
    terms = []
    for i in range(len(z)):                                       # row by row: one logit vector per anchor
        logits = torch.stack([(nn[i] if j == i else z[i]) @ p[j] for j in range(len(p))]) / TEMPERATURE
        terms.append(torch.logsumexp(logits, dim=0) - logits[i])
    torch.stack(terms).mean().backward()
    torch.testing.assert_close(prediction.grad.double(), reference_prediction.grad, rtol=1e-4, atol=1e-6)


def test_float32_under_bf16_autocast():
    anchor, neighbour, prediction = (t.bfloat16() for t in random_triplet(batch=16, dim=32, seed=2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nna_loss(anchor, neighbour, prediction, temperature=0.1)
        multi = multi_view_nna_loss([anchor, anchor], [neighbour, neighbour], [prediction, prediction],
                                    temperature=0.1)
    assert loss.dtype == multi.dtype == torch.float32
    # the same bf16 values, upcast: a bf16 matmul would be off by ~1e-2 at T = 0.1
    expected = loop_loss(anchor.float(), neighbour.float(), prediction.float(), 0.1)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert multi.item() == pytest.approx(expected, abs=1e-5)


def test_multi_view_is_the_mean_over_ordered_pairs():
    generator = torch.Generator().manual_seed(3)
    views = [torch.randn(5, 6, generator=generator) for _ in range(4)]          # 2 global + 2 local
    predictions = [v + 0.5 * torch.randn(5, 6, generator=generator) for v in views]
    neighbours = [F.normalize(views[a] + torch.randn(5, 6, generator=generator), dim=-1) for a in range(2)]
    pairs = [(a, b) for a in range(2) for b in range(4) if b != a]
    assert len(pairs) == 6
    loss = multi_view_nna_loss(views, neighbours, predictions, temperature=TEMPERATURE)
    expected = sum(loop_loss(views[a], neighbours[a], predictions[b], TEMPERATURE) for a, b in pairs) / len(pairs)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    # only the global projections are read: the list may stop there
    assert multi_view_nna_loss(views[:2], neighbours, predictions, temperature=TEMPERATURE).item() == pytest.approx(
        multi_view_nna_loss(views, neighbours, predictions, temperature=TEMPERATURE).item(), abs=0)


@pytest.mark.parametrize(("call", "message"), [
    (lambda a, n, p: nna_loss(a, n, p, temperature=0.0), "temperature must be > 0, got 0.0"),
    (lambda a, n, p: nna_loss(a[:3], n, p, temperature=0.2),
     "anchor and prediction must have the same (batch, dim) shape, got (3, 5) and (6, 5)"),
    (lambda a, n, p: nna_loss(a, n[:, :4], p, temperature=0.2),
     "neighbour and prediction must have the same (batch, dim) shape, got (6, 4) and (6, 5)"),
    (lambda a, n, p: nna_loss(a[0], n[0], p[0], temperature=0.2),
     "prediction must have shape (batch, dim), got (5,)"),
    (lambda a, n, p: multi_view_nna_loss([a, a], [n, n], [p, p], temperature=0.2, num_global=0),
     "num_global must be an integer >= 1, got 0"),
    (lambda a, n, p: multi_view_nna_loss([a], [n], [p], temperature=0.2, num_global=1),
     "need predictions of at least 2 views (num_global=1, and one other view per anchor), got 1"),
    (lambda a, n, p: multi_view_nna_loss([a, a], [n], [p, p, p], temperature=0.2),
     "need one neighbour tensor per global view (2), got 1"),
    (lambda a, n, p: multi_view_nna_loss([a], [n, n], [p, p, p], temperature=0.2),
     "need the projections of the 2 global views, got 1"),
])
def test_bad_arguments_raise_exact_messages(call, message):
    with pytest.raises(ValueError) as info:
        call(*random_triplet())
    assert str(info.value) == message


# ---- two processes, gloo: the gathered negatives and the gradient DDP would produce ----

WORLD = 2


def _distributed_worker(rank: int, init_file: str, out_dir: str, anchor, neighbour, prediction, views) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * len(anchor) // WORLD, (rank + 1) * len(anchor) // WORLD)
        results = {}
        # the full prediction tensor plays a DDP-replicated parameter: each process uses its own rows of it
        for name, loss_fn in {
            "nna": lambda p: nna_loss(anchor[rows], neighbour[rows], p[rows], temperature=TEMPERATURE),
            "multi_view": lambda p: multi_view_nna_loss(
                [v[rows] for v in views[:2]], [neighbour[rows], anchor[rows]],
                [p[rows]] + [v[rows] for v in views[1:]], temperature=TEMPERATURE),
        }.items():
            parameter = prediction.clone().requires_grad_(True)
            loss = loss_fn(parameter)
            loss.backward()
            gradient = parameter.grad.clone()
            dist.all_reduce(gradient)                  # DDP: all-reduce, then divide by the world size
            results[name] = (loss.detach(), gradient / WORLD)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while another's last collective is in flight (CI: SIGABRT)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # subprocesses (torch, timm) under torchrun/SIGTERM: 40-85 s under load here; CI runs it
@pytest.mark.distributed
def test_gathered_loss_and_gradient_match_the_single_process_batch(tmp_path):
    batch = 8                                          # 4 rows per process
    anchor, neighbour, prediction = random_triplet(batch=batch, dim=6, seed=4)
    views = [anchor * 1.5, prediction.flip(0), anchor + 1.0]
    mp.spawn(_distributed_worker, nprocs=WORLD, join=True,
             args=(str(tmp_path / "init"), str(tmp_path), anchor, neighbour, prediction, views))
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]

    half = batch // WORLD
    for rank in range(WORLD):
        rows = slice(rank * half, (rank + 1) * half)
        # the rank's rows against the predictions of the whole batch, targets offset by rank * B
        expected = loop_loss(anchor[rows], neighbour[rows], prediction, TEMPERATURE, offset=rank * half)
        assert results[rank]["nna"][0].item() == pytest.approx(expected, abs=1e-5)

    single = {
        "nna": lambda p: nna_loss(anchor, neighbour, p, temperature=TEMPERATURE),
        "multi_view": lambda p: multi_view_nna_loss(views[:2], [neighbour, anchor], [p] + views[1:],
                                                    temperature=TEMPERATURE),
    }
    for name, loss_fn in single.items():
        parameter = prediction.clone().requires_grad_(True)
        loss = loss_fn(parameter)
        loss.backward()
        mean_over_ranks = sum(result[name][0] for result in results) / WORLD
        assert mean_over_ranks.item() == pytest.approx(loss.item(), abs=1e-5), name
        for result in results:                         # after DDP's averaging every process holds the same gradient
            torch.testing.assert_close(result[name][1], parameter.grad, rtol=1e-4, atol=1e-6, msg=name)
