"""The Nearest-Neighbour-Alignment (NNA) loss of MIM-Refiner (Alkin et al. 2024, arXiv 2402.10093, Sec. 3).

NNA is NNCLR's contrastive loss (Dwibedi et al. 2021, arXiv 2104.14548, Eq. 1) with a predictor and with the
nearest-neighbour swap applied to the positive only. For an anchor view a and a predicted view b != a, with
``z = normalize(projector(f_a))`` (detached), ``nn = NN(z)`` from the queue and
``p = normalize(predictor(projector(f_b)))``::

    logit[i, i] = <nn_i, p_i> / T                  the positive: the anchor's nearest neighbour
    logit[i, j] = <z_i,  p_j> / T     (j != i)     the negatives: the anchor's own projection
    loss        = mean_i CE(logit[i], i)

The official implementation builds the same logits by overwriting the diagonal of ``z @ p.T`` with the one of
``nn @ p.T`` (``src/losses/ssl/nnclr_loss.py``); NNCLR's original form, which uses ``nn`` for every logit (the
official ``nnclr_allswap_loss.py``), is not what MIM-Refiner trains with and is not offered. The predictions of
all processes are all-gathered with gradient, so every process contrasts against the global batch; the targets of
process ``r`` are ``r * B + i``. Everything runs in float32, even under a bf16 autocast (STYLE item 7), so the
heads may emit bf16.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

def _check_pair(anchor_like: torch.Tensor, prediction: torch.Tensor, *, name: str, temperature: float) -> None:
    if prediction.ndim != 2:
        raise ValueError(f"prediction must have shape (batch, dim), got {tuple(prediction.shape)}")
    if anchor_like.shape != prediction.shape:
        raise ValueError(f"{name} and prediction must have the same (batch, dim) shape, "
                         f"got {tuple(anchor_like.shape)} and {tuple(prediction.shape)}")
    if prediction.shape[0] == 0:
        raise ValueError("the NNA loss needs a non-empty batch")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_predictions(p: torch.Tensor, *, gather: bool = True) -> tuple[torch.Tensor, int]:
    """All-gather the (batch, dim) predictions of every process, keeping the gradient.

    The backward of ``torch.distributed.nn.functional.all_gather`` sums, into each process's own rows, the gradients
    that every process's loss sends to them; DDP's averaging of the parameter gradients over W processes then
    yields exactly the gradient of the global-batch loss (mean over all W * B rows).

    Returns:
        ``(p_all, rank)``: (world_size * batch, dim) in rank order and this process's rank; ``(p, 0)`` when
        ``gather`` is False or no process group with more than one process is initialised.
    """
    if not (gather and _is_distributed()):
        return p, 0
    from torch.distributed.nn.functional import all_gather
    with warnings.catch_warnings():
        # deprecated in favour of the private torch.distributed._functional_collectives; still the public,
        # autograd-aware gather, and its gloo backward (all-to-all) is what the CPU tests run
        warnings.filterwarnings("ignore", message=r".*all_gather is deprecated", category=FutureWarning)
        gathered = all_gather(p.contiguous())
    return torch.cat(gathered, dim=0), dist.get_rank()


def _nna_from_normalised(z: torch.Tensor, nn: torch.Tensor, p: torch.Tensor, p_all: torch.Tensor, rank: int,
                         temperature: float) -> torch.Tensor:
    """Cross-entropy of the NNA logits; every input float32, L2-normalised; z and nn without gradient."""
    batch = z.shape[0]
    targets = torch.arange(batch, device=z.device) + rank * batch           # (batch,) own rows of p_all
    logits = z @ p_all.T / temperature                                      # (batch, world * batch)
    positive = (nn * p).sum(dim=-1, keepdim=True) / temperature             # (batch, 1)
    logits = logits.scatter(1, targets[:, None], positive)
    return F.cross_entropy(logits, targets)


def nna_loss(anchor: torch.Tensor, neighbour: torch.Tensor, prediction: torch.Tensor, *, temperature: float,
             gather: bool = True) -> torch.Tensor:
    """NNA loss of one head for one ordered pair of views (anchor view a, predicted view b, a != b).

    MIM-Refiner (arXiv 2402.10093, Sec. 3): the positive pairs the anchor's nearest neighbour with the prediction,
    ``<NN(z_i), p_i> / T``; the negatives pair the anchor's own projection with the other predictions,
    ``<z_i, p_j> / T`` for j != i, gathered over all processes; cross-entropy with the own row as target, averaged
    over the local rows.

    Args:
        anchor: (batch, dim) projections of view a; normalised and detached here (no gradient reaches them).
        neighbour: (batch, dim) their neighbours from :meth:`NNQueue.find_neighbours` (normalised again here,
            which leaves queue rows unchanged); no gradient.
        prediction: (batch, dim) predictor outputs of view b, unnormalised; the only input that receives gradient.
        temperature: T (0.2 for ViT-L, 0.3 for H, 0.35 for 2B in MIM-Refiner).
        gather: All-gather the predictions across processes when a process group is initialised.

    Returns:
        () float32 loss, whatever the input dtypes and autocast state.

    Raises:
        ValueError: Shapes differ, the batch is empty, or ``temperature`` <= 0.
    """
    _check_pair(anchor, prediction, name="anchor", temperature=temperature)
    _check_pair(neighbour, prediction, name="neighbour", temperature=temperature)
    with torch.autocast(device_type=prediction.device.type, enabled=False):
        z = F.normalize(anchor.detach().float(), dim=-1)
        nn = F.normalize(neighbour.detach().float(), dim=-1)
        p = F.normalize(prediction.float(), dim=-1)
        p_all, rank = gather_predictions(p, gather=gather)
        return _nna_from_normalised(z, nn, p, p_all, rank, temperature)


def multi_view_nna_loss(projections: list[torch.Tensor], neighbours: list[torch.Tensor],
                        predictions: list[torch.Tensor], *, temperature: float, num_global: int = 2,
                        gather: bool = True) -> torch.Tensor:
    """NNA loss of one head over all its views: the mean over every ordered pair (a global, b any view, b != a).

    MIM-Refiner (arXiv 2402.10093): the global views are the anchors, local crops add predicted views; DESIGN.md:
    "All terms of all heads are averaged per head and summed over heads" -- this function is the per-head average,
    the sum over heads is the trainer's. Every pair weighs the same, as in the official ``nnclr_loss.py`` (which
    divides the sum of its global and local terms by their total number). The official local terms read
    ``predicted[:, ii]`` with ``ii`` counting the local views from 0, i.e. global predictions, which looks like an
    indexing slip; here each local term uses the local view's own prediction. Each prediction is normalised and
    gathered once, not once per pair.

    Args:
        projections: Per view, (batch, dim) projections; only the first ``num_global`` (the anchors) are read,
            so the list may stop there.
        neighbours: Per global view, (batch, dim) neighbours of its projection from the queue.
        predictions: Per view, (batch, dim) predictor outputs; the global views first, then the local crops.
        temperature: T.
        num_global: Number of global (anchor) views.
        gather: All-gather the predictions across processes when a process group is initialised.

    Returns:
        () float32 loss: the mean of ``num_global * (num_views - 1)`` pair losses.

    Raises:
        ValueError: Too few views, list lengths that do not fit ``num_global``, or any error of :func:`nna_loss`.
    """
    if isinstance(num_global, bool) or not isinstance(num_global, int) or num_global < 1:
        raise ValueError(f"num_global must be an integer >= 1, got {num_global!r}")
    if len(predictions) < max(num_global, 2):
        raise ValueError(f"need predictions of at least {max(num_global, 2)} views "
                         f"(num_global={num_global}, and one other view per anchor), got {len(predictions)}")
    if len(projections) < num_global:
        raise ValueError(f"need the projections of the {num_global} global views, got {len(projections)}")
    if len(neighbours) != num_global:
        raise ValueError(f"need one neighbour tensor per global view ({num_global}), got {len(neighbours)}")
    for a in range(num_global):
        _check_pair(projections[a], predictions[a], name=f"projections[{a}]", temperature=temperature)
        _check_pair(neighbours[a], predictions[a], name=f"neighbours[{a}]", temperature=temperature)
    for b in range(len(predictions)):
        _check_pair(predictions[0], predictions[b], name="predictions[0]", temperature=temperature)

    with torch.autocast(device_type=predictions[0].device.type, enabled=False):
        normalised = [F.normalize(prediction.float(), dim=-1) for prediction in predictions]
        gathered = [gather_predictions(p, gather=gather) for p in normalised]
        total = torch.zeros((), dtype=torch.float32, device=predictions[0].device)
        num_terms = 0
        for a in range(num_global):
            z = F.normalize(projections[a].detach().float(), dim=-1)
            nn = F.normalize(neighbours[a].detach().float(), dim=-1)
            for b, (p, (p_all, rank)) in enumerate(zip(normalised, gathered)):
                if b == a:
                    continue
                total = total + _nna_from_normalised(z, nn, p, p_all, rank, temperature)
                num_terms += 1
        return total / num_terms
