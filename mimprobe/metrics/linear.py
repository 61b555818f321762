"""Linear probes for every block and every regularisation strength of a grid, trained in one pass.

DINOv2 evaluates frozen features by training many linear heads on the same features at once, one per
hyper-parameter setting, and keeping the best on a validation set (Oquab et al., 2023, arXiv:2304.07193, linear
evaluation in the appendix). mimprobe applies the same idea across depth as well: the features of all blocks are
stacked into one ``(num_blocks, n, d)`` tensor, and the weights of every (block, grid point) head live in one
``(num_blocks, num_grid * num_classes, d)`` tensor, so each step is a few batched matmuls (``torch.bmm``) for all
blocks and all grid points. Every head sees the same mini-batches and the heads share no parameter, so a head's
weights do not depend on which other blocks or grid points are trained beside it (up to float rounding).

Objective of one head: scikit-learn ``LogisticRegression``'s, with ``weight_decay = 1 / (C * n)``::

    mean_i CE(softmax(W z_i + b), y_i) + weight_decay / 2 * ||W||^2,   z_i = (x_i - mean) / std   (fit split)

The grid is scikit-learn's: inverse regularisation strengths C, one head per C, so the batched probe and the
reference `evaluate_linear_sklearn` search the same models and differ only in the solver.

Solver: mini-batch SGD with heavy-ball momentum, a constant step decayed linearly to zero over the last half of the
steps, and zero initialisation, with each
head's gradient preconditioned by the inverse Hessian of its objective at W = 0. For a linear softmax layer the
Hessian (= Fisher) factorises as the feature covariance times the output curvature, ``Sigma ⊗ (diag(p) - p p^T)``
(K-FAC, Martens & Grosse 2015, arXiv:1503.05671, section 3), and at W = 0, p = 1/K for K classes, the output factor
is ``(I - 1 1^T / K) / K``: on the class-contrast directions the Hessian is ``Sigma / K + weight_decay * I``. With
``Sigma = U diag(lambda) U^T`` (one eigendecomposition per block), a head's step is
``G U diag(1 / (lambda / K + weight_decay)) U^T``: a Newton step at the start, whatever the spectrum of the
features. Plain SGD on real transformer features (a power-law spectrum; condition numbers of 10^3-10^5 after
standardisation) moves along the small eigen-directions 10^3 times slower than along the large ones and stops
0.03-0.05 nats above the optimum in 500 steps; the preconditioned steps take every direction at the same rate, and
the weights live in the eigenbasis, where the preconditioner is a per-coordinate factor: a step maps them back
(two extra (G*C x d) @ (d x d) products, ``d / (2 * batch)`` of a step's matmuls: 0.19 at d = 192, batch 512)
and the features are never rotated (a streamed split would be, every epoch). L-BFGS was not chosen
because its line search and curvature pairs cannot be shared by heads, and full-batch steps would read the whole
split per step (a streamed ImageNet store 1,000 times).

Protocol of `evaluate_linear` (and of the scikit-learn reference `evaluate_linear_sklearn`):

1. A stratified validation split (``val_fraction`` of train, seeded, `carve_validation`) is carved from train.
2. Every head of the grid is trained on the rest of train ("fit" split), standardised with the fit split's
   mean/std, and scored on the validation split.
3. Per block, the C with the highest validation accuracy is chosen (ties: lowest validation cross-entropy, then
   the smallest C). When it is the smallest or the largest C searched and beats its neighbour, ``widen_points``
   more values are trained past that end of the grid, at the grid's spacing, for that block alone, and the choice
   is made again (at most ``max_widenings`` times): the optimum is not left beyond the grid's edge. The test split is only checked for
   NaN/Inf before this point.
4. With ``refit=True`` (the default, as scikit-learn's ``GridSearchCV``) one head per block is trained again
   on the whole train split (standardised with its statistics) at the chosen C, and its test accuracy is
   reported; with ``refit=False`` the test accuracy of the chosen head of step 2 is reported.

Accuracies are fractions in [0, 1], as in every metric row of mimprobe.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..errors import BadInputError
from ._block_rows import BlockRows, chunk_rows_for
from ._finite import check_finite, finite_copy
from ._rows import MetricRow, carve_validation
from .linear_solver import ArrayLike, BlockwiseLinearProbes, LinearProbeConfig, check_widths, weight_decay_for

def evaluate_linear(train_blocks: Mapping[int, ArrayLike], train_labels: ArrayLike,
                    test_blocks: Mapping[int, ArrayLike], test_labels: ArrayLike, *, split: str = "test",
                    config: LinearProbeConfig = LinearProbeConfig(), seed: int = 0, val_fraction: float = 0.1,
                    refit: bool = True, device: str | torch.device = "cpu") -> dict[int, list[MetricRow]]:
    """Batched linear probe of every block: select C on a validation split carved from train, report on test.

    Args:
        train_blocks: {block: (n_train, d) features}, e.g. ``store.features("train", block, pooling)`` (float16
            memory maps are read block by block as float32). Keys other than block numbers name other feature
            sets probed the same way, e.g. a multi-block readout's lazy concatenation (`mimprobe.metrics.readout`):
            sets of one width are trained in the same batched pass, each with its own head per C.
        train_labels: (n_train,) integer labels.
        test_blocks: {block: (n_test, d) features}, the same blocks.
        test_labels: (n_test,) integer labels.
        split: Name of the evaluated split in the rows.
        config: Grid and schedule.
        seed: Seeds the validation split and the mini-batch order.
        val_fraction: Share of train held out for selection.
        refit: Retrain the chosen head on all of train before testing (module docstring, step 4).
        device: ``cpu`` or ``cuda[:i]``.

    Returns:
        {block: [linear_top1 on ``split``, linear_val_top1 on "val"]}; params hold the grid, the C values searched
        for the block (``grid_c_searched``, wider than ``grid_c`` where the grid was widened), the chosen ``C``,
        its ``weight_decay`` in the reported head, and the schedule.

    Raises:
        BadInputError: Mismatched blocks or lengths, non-finite features (the block is named), fewer than 2
            classes in train.
    """
    return evaluate_linear_with_hits(train_blocks, train_labels, test_blocks, test_labels, split=split,
                                     config=config, seed=seed, val_fraction=val_fraction, refit=refit,
                                     device=device)[0]


def evaluate_linear_with_hits(train_blocks: Mapping[int, ArrayLike], train_labels: ArrayLike,
                              test_blocks: Mapping[int, ArrayLike], test_labels: ArrayLike, *, split: str = "test",
                              config: LinearProbeConfig = LinearProbeConfig(), seed: int = 0,
                              val_fraction: float = 0.1, refit: bool = True, device: str | torch.device = "cpu",
                              assume_finite: bool = False
                              ) -> tuple[dict[int, list[MetricRow]], dict[int, np.ndarray]]:
    """`evaluate_linear`'s rows and, per block, the (n_test,) bool correctness of the reported head on every
    test sample (its mean is the ``linear_top1`` value), for paired bootstrap intervals (`mimprobe.report`).

    ``assume_finite``: the caller has checked every row for NaN/Inf (the profile does, once per block), so the
    blocks are not read once more for it."""
    device = torch.device(device)
    blocks = _check_inputs(train_blocks, train_labels, test_blocks, test_labels, assume_finite=assume_finite)
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    fit_idx, val_idx = carve_validation(train_labels, fraction=val_fraction, seed=seed)
    if len(np.unique(train_labels[fit_idx])) < 2:
        raise BadInputError("the fit split (train minus validation) has fewer than 2 classes: lower val_fraction")
    c_grid = sorted(float(c) for c in config.c_values)
    common = {"probe": "batched-sgd-kfac", "grid_c": c_grid, "lr": config.lr, "decay_fraction": config.decay_fraction,
              "epochs": config.epochs, "min_steps": config.min_steps, "batch_size": config.batch_size,
              "momentum": config.momentum, "val_fraction": val_fraction, "refit": refit,
              "memory_budget": config.memory_budget}
    schedule = {"learning_rate": config.lr, "epochs": config.epochs, "min_steps": config.min_steps,
                "batch_size": config.batch_size, "momentum": config.momentum,
                "decay_fraction": config.decay_fraction, "seed": seed, "device": device}
    rows: dict[int, list[MetricRow]] = {}
    hits: dict[int, np.ndarray] = {}
    for group in _block_groups(train_blocks, blocks, config.blocks_per_pass):
        # Every split is read chunk by chunk from the features (memory maps stay lazy): at most one chunk of the
        # group's blocks is in memory, ``config.memory_budget`` bytes for three float32 copies of it.
        chunk_rows = chunk_rows_for(config.memory_budget, num_blocks=len(group),
                                    dim=int(np.shape(train_blocks[group[0]])[1]))
        rows_of = {"fit": fit_idx, "val": val_idx, "train": None}
        sources = {name: BlockRows(train_blocks, group, index, split="train", device=device)
                   for name, index in rows_of.items()}
        test_x = BlockRows(test_blocks, group, None, split=split, device=device)
        searched = _search_c(sources["fit"], train_labels[fit_idx], sources["val"], train_labels[val_idx], c_grid,
                             config, {**schedule, "chunk_rows": chunk_rows})
        chosen = [best_c(found) for found in searched]
        # Selection is done: only now are the test features and labels used.
        final_rows, final_labels = (sources["train"], train_labels) if refit else (sources["fit"],
                                                                                   train_labels[fit_idx])
        reported_wd = [weight_decay_for(c, len(final_labels)) for c in chosen]
        final = BlockwiseLinearProbes(weight_decays=[[wd] for wd in reported_wd], chunk_rows=chunk_rows, **schedule
                                      ).fit(final_rows, final_labels)
        test_accuracy = final.score(test_x, test_labels)[:, 0]
        test_hits = final.correct(test_x, test_labels)[:, 0]
        for i, block in enumerate(group):
            params = {**common, "grid_c_searched": sorted(searched[i]), "C": chosen[i],
                      "weight_decay": reported_wd[i]}
            rows[block] = [MetricRow(split, "linear_top1", float(test_accuracy[i]), params, seed),
                           MetricRow("val", "linear_val_top1", float(searched[i][chosen[i]][0]), params, seed)]
            hits[block] = test_hits[i]
    return {block: rows[block] for block in blocks}, {block: hits[block] for block in blocks}


def _search_c(fit_x: BlockRows, fit_labels: np.ndarray, val_x: BlockRows, val_labels: np.ndarray,
              c_grid: list[float], config: LinearProbeConfig, schedule: dict) -> list[dict[float, tuple[float, float]]]:
    """Train and score the grid for every block of a group, widening it past an edge where a block's best C lies.

    Args:
        fit_x: The fit split's rows of the group's blocks; val_x: the validation split's.
        c_grid: The sorted C values every block starts with.

    Returns:
        Per block, {C: (validation accuracy, validation cross-entropy)} for every C trained for it.
    """
    num_blocks, n_fit, _ = fit_x.shape
    ratio = _grid_ratio(c_grid)
    found: list[dict[float, tuple[float, float]]] = [{} for _ in range(num_blocks)]
    pending = {block: list(c_grid) for block in range(num_blocks)}  # block -> C values to train next
    for widening in range(config.max_widenings + 1):
        # One pass for every block with work, on a per-block grid (heads are independent: same results as alone).
        members = sorted(pending)
        grid = np.array([pending[m] for m in members])                        # (B', G')
        every = len(members) == num_blocks
        probes = BlockwiseLinearProbes(weight_decays=1.0 / (grid * n_fit), **schedule
                                       ).fit(fit_x if every else fit_x.subset(members), fit_labels)
        accuracy, loss = probes.evaluate(val_x if every else val_x.subset(members), val_labels)
        for row, member in enumerate(members):
            for column, c in enumerate(pending[member]):
                found[member][c] = (float(accuracy[row, column]), float(loss[row, column]))
        if widening == config.max_widenings:
            break
        pending = {block: more for block, scores in enumerate(found)
                   if (more := widen_grid(scores, ratio=ratio, points=config.widen_points))}
        if not pending:
            break
    return found


def _grid_ratio(c_grid: Sequence[float]) -> float:
    """The log spacing of a sorted grid (its last step), used to widen it."""
    return c_grid[-1] / c_grid[-2] if len(c_grid) > 1 else 10.0


def widen_grid(scores: Mapping[float, tuple[float, float]], *, ratio: float, points: int) -> list[float]:
    """The C values to train next for one block: ``points`` more past the edge of the searched grid where the
    chosen C (`best_c`) lies, at the grid's log spacing ``ratio``, or none.

    Only a curve still rising at the edge is followed: a tie there (say 100 % everywhere, where the loss alone
    prefers ever larger C) is no evidence of a better C beyond it.
    """
    searched = sorted(scores)
    if len(searched) < 2 or points == 0:
        return []
    best = best_c(scores)
    if best == searched[0] and scores[searched[0]][0] > scores[searched[1]][0]:
        return [best / ratio ** (k + 1) for k in range(points)][::-1]
    if best == searched[-1] and scores[searched[-1]][0] > scores[searched[-2]][0]:
        return [best * ratio ** (k + 1) for k in range(points)]
    return []


def select_grid_point(val_accuracy: np.ndarray, val_loss: np.ndarray) -> int:
    """Index of the highest validation accuracy; ties go to the lowest validation loss, then the first point."""
    order = np.lexsort((np.arange(len(val_accuracy)), val_loss, -val_accuracy))
    return int(order[0])


def best_c(scores: Mapping[float, tuple[float, float]]) -> float:
    """The chosen C of {C: (validation accuracy, validation loss)}: `select_grid_point` over increasing C (ties:
    lowest loss, then the smallest C, the strongest regularisation)."""
    searched = sorted(scores)
    return searched[select_grid_point(np.array([scores[c][0] for c in searched]),
                                      np.array([scores[c][1] for c in searched]))]

def _check_inputs(train_blocks: Mapping[int, ArrayLike], train_labels: ArrayLike,
                  test_blocks: Mapping[int, ArrayLike], test_labels: ArrayLike, *,
                  assume_finite: bool = False) -> list[int]:
    """Shapes, labels, block sets and finiteness (unless the caller checked it: ``assume_finite``), before any
    training; returns the sorted blocks."""
    blocks = feature_set_order(train_blocks)
    if not blocks:
        raise BadInputError("no blocks to probe: train_blocks is empty")
    if feature_set_order(test_blocks) != blocks:
        raise BadInputError(f"train and test have different blocks: {blocks} vs {feature_set_order(test_blocks)}")
    for name, labels, features in (("train", train_labels, train_blocks), ("test", test_labels, test_blocks)):
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise BadInputError(f"{name} labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
        if (labels < 0).any():
            raise BadInputError(f"{name} labels contain negative values: drop skipped images (label -1) first")
        for block in blocks:
            shape = np.shape(features[block])
            if len(shape) != 2 or shape[0] != len(labels):
                raise BadInputError(f"block {block}: {name} features must be ({len(labels)}, d), got {shape}")
    if len(np.unique(np.asarray(train_labels))) < 2:
        raise BadInputError("a linear probe needs at least 2 classes in the train labels")
    check_widths(train_blocks, blocks)
    for block in blocks:
        if np.shape(test_blocks[block])[1] != np.shape(train_blocks[block])[1]:
            raise BadInputError(f"block {block}: train and test features have different widths")
    if not assume_finite:
        for name, features in (("train", train_blocks), ("test", test_blocks)):
            for block in blocks:
                check_finite(features[block], what=f"block {block} of split {name}")
    return blocks


def feature_set_order(feature_sets: Mapping) -> list:
    """The keys of ``{key: (n, d) features}`` in probing and reporting order: block numbers ascending, then the
    named feature sets (multi-block readouts, `mimprobe.metrics.readout`) in the mapping's order."""
    position = {key: index for index, key in enumerate(feature_sets)}
    return sorted(feature_sets, key=lambda key: (0, key) if isinstance(key, (int, np.integer))
                  else (1, position[key]))


def _block_groups(train_blocks: Mapping[int, ArrayLike], blocks: list[int],
                  blocks_per_pass: int | None) -> list[list[int]]:
    """Blocks of equal width, in order, at most ``blocks_per_pass`` per group (heads are independent)."""
    by_width: dict[int, list[int]] = {}
    for block in blocks:
        by_width.setdefault(np.shape(train_blocks[block])[1], []).append(block)
    size = blocks_per_pass or len(blocks)
    return [members[i:i + size] for members in by_width.values() for i in range(0, len(members), size)]


def _finite_float32(features: ArrayLike, block: int, split: str) -> np.ndarray:
    return finite_copy(features, dtype=np.float32, what=f"block {block} of split {split}")
