"""Linear probes for every block and every point of a hyper-parameter grid, trained in one pass.

DINOv2 evaluates frozen features by training many linear heads on the same features at once, one per
hyper-parameter setting, and keeping the best on a validation set (Oquab et al., 2023, arXiv:2304.07193, linear
evaluation in the appendix). mimprobe applies the same idea across depth as well: the features of all blocks are
stacked into one ``(num_blocks, n, d)`` tensor, and the weights of every (block, grid point) head live in one
``(num_blocks, num_grid * num_classes, d)`` tensor, so each SGD step is two batched matmuls (``torch.bmm``) for
all blocks and all grid points. Every head sees the same mini-batches and the heads share no parameter, so a
head's weights do not depend on which other blocks or grid points are trained beside it (up to float rounding).

Objective of one head (the one scikit-learn's ``LogisticRegression`` minimises, with ``C = 1 / (wd * n)``)::

    mean_i CE(softmax(W^T z_i + b), y_i) + wd / 2 * ||W||^2,    z_i = (x_i - mean) / std   (fit split statistics)

minimised by mini-batch SGD with momentum 0.9 (L2 weight decay coupled into the gradient, bias not decayed),
a cosine learning-rate schedule to zero, a fixed number of epochs (at least ``min_steps`` steps) and zero
initialisation: a convex problem, so the seed only orders the mini-batches. Learning rates are given in units of
1 / lambda_max, lambda_max the largest eigenvalue of the block's standardised feature covariance (the scale of
the loss's curvature), estimated per block: that makes one grid suit narrow and wide, well- and ill-conditioned
blocks. SGD rather than L-BFGS because a line search cannot be shared by heads with different curvature, and
rather than AdamW because AdamW's decoupled decay is not the L2 objective above.

Protocol of `evaluate_linear` (and of the scikit-learn reference `evaluate_linear_sklearn`):

1. A stratified validation split (``val_fraction`` of train, seeded, `carve_validation`) is carved from train.
2. Every head of the grid is trained on the rest of train ("fit" split), standardised with the fit split's
   mean/std, and scored on the validation split.
3. Per block, the grid point with the highest validation accuracy is chosen (ties: lowest validation
   cross-entropy, then grid order). The test split is only checked for NaN/Inf before this point.
4. With ``refit=True`` (the default, as scikit-learn's ``GridSearchCV``) one head per block is trained again
   on the whole train split (standardised with its statistics) with the chosen hyper-parameters, and its test
   accuracy is reported; with ``refit=False`` the test accuracy of the chosen head of step 2 is reported.

Accuracies are fractions in [0, 1], as in every metric row of mimprobe.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import BadInputError
from ._rows import MetricRow, carve_validation

ArrayLike = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class LinearProbeConfig:
    """The batched probe's grid and schedule. The grid is ``lrs x weight_decays`` (lr-major order)."""

    # SGD learning rates in units of 1/curvature, the largest eigenvalue of the block's standardised feature
    # covariance (estimated per block), so one grid fits narrow and wide, well- and ill-conditioned features.
    # Measured on class-structured synthetic features (d=32-192, n=2,000-10,000, 500-600 steps): the best rate
    # lay between 3 and 100, and every case had a rate here within 0.01 of the regularised optimum (mean loss).
    lrs: tuple[float, ...] = (3.0, 10.0, 30.0)
    # L2 coefficient on the mean loss, so wd = 1 / (C * n_fit) in scikit-learn's terms (1e-4 is C = 0.2 for
    # 45,000 CIFAR-10 images). 0 leaves only the step budget as regularisation, as DINOv2's probes.
    weight_decays: tuple[float, ...] = (0.0, 1e-4, 1e-3)
    epochs: int = 30
    # Small training sets get more epochs, so that every head takes at least this many SGD steps (30 epochs of
    # 600 samples would be 60 steps, far from converged; DINOv2 likewise fixes iterations, not epochs).
    min_steps: int = 500
    batch_size: int = 512
    momentum: float = 0.9
    # Blocks trained together (None: all): bounds memory at blocks_per_pass * n * d * 4 bytes of features.
    blocks_per_pass: int | None = None

    def grid(self) -> list[tuple[float, float]]:
        """The (lr, weight_decay) grid points in training order."""
        return [(lr, wd) for lr in self.lrs for wd in self.weight_decays]


# scikit-learn reference: 9 inverse regularisation strengths (1e-3 ... 10), the same count as the default grid.
DEFAULT_C_VALUES: tuple[float, ...] = tuple(float(c) for c in np.logspace(-3, 1, 9))


def cosine_lr(step: int, total_steps: int) -> float:
    """Cosine factor of the base learning rate at ``step`` (0-based): 1 at the start, decaying to 0."""
    return 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))


class BlockwiseLinearProbes:
    """Softmax linear heads for every block and every grid point, trained together (scikit-learn style).

    Args:
        learning_rates: (num_grid,) learning rate of each grid point, shared by all blocks, or
            (num_blocks, num_grid) per block, in units of 1 / ``curvature_`` of the block.
        weight_decays: Same shape rules as ``learning_rates``; grid point g is
            ``(learning_rates[..., g], weight_decays[..., g])`` (pairs, not a cross product: see `fit_probes`).
        epochs: Passes over the training samples, or more if needed to take ``min_steps`` steps.
        min_steps: Least number of SGD steps (whole epochs are added to reach it).
        batch_size: Largest number of samples per SGD step; an epoch is ``ceil(n / batch_size)`` steps on
            batches of near-equal size.
        momentum: SGD momentum (heavy ball, as ``torch.optim.SGD``).
        seed: Seeds the order of the mini-batches (the only randomness).
        device: Where the features and weights live; computation is float32.

    Fitted attributes:
        classes_: (num_classes,) the sorted class labels seen in training.
        mean_, scale_: (num_blocks, d) per-block standardisation of the training features.
        coef_: (num_blocks, num_grid, num_classes, d) weights on standardised features (each head laid out as
            scikit-learn's ``LogisticRegression.coef_``).
        intercept_: (num_blocks, num_grid, num_classes).
        curvature_: (num_blocks,) largest eigenvalue of each block's standardised feature covariance; the
            step of grid point g is ``learning_rates[g] / curvature_`` times the cosine factor.
        diverged_: (num_blocks, num_grid) bool, heads whose weights became non-finite (scored as all wrong by
            `evaluate`; never chosen unless every head of a block diverged).
        n_epochs_, n_steps_: Epochs and SGD steps taken.
    """

    def __init__(self, *, learning_rates: ArrayLike | Sequence[float], weight_decays: ArrayLike | Sequence[float],
                 epochs: int = 30, min_steps: int = 0, batch_size: int = 512, momentum: float = 0.9, seed: int = 0,
                 device: str | torch.device = "cpu"):
        self.learning_rates = learning_rates
        self.weight_decays = weight_decays
        self.epochs = epochs
        self.min_steps = min_steps
        self.batch_size = batch_size
        self.momentum = momentum
        self.seed = seed
        self.device = device

    def fit(self, features: ArrayLike, labels: ArrayLike) -> "BlockwiseLinearProbes":
        """Train every head.

        Args:
            features: (num_blocks, n, d) features of each block (any float dtype; used as float32).
            labels: (n,) integer class labels.
        """
        device = torch.device(self.device)
        x = _as_float32(features, device)
        if x.ndim != 3:
            raise BadInputError(f"features must be (num_blocks, n, d), got shape {tuple(x.shape)}")
        num_blocks, n, d = x.shape
        y_np = np.asarray(labels)
        if y_np.shape != (n,):
            raise BadInputError(f"labels must be ({n},) to match the features, got shape {y_np.shape}")
        self.classes_ = np.unique(y_np)
        if len(self.classes_) < 2:
            raise BadInputError(f"a linear probe needs at least 2 classes, the training labels have "
                                f"{len(self.classes_)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise BadInputError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")
        num_classes = len(self.classes_)
        y = torch.as_tensor(np.searchsorted(self.classes_, y_np), device=device)
        one_hot_t = torch.nn.functional.one_hot(y, num_classes).float().T.contiguous()  # (C, n)
        lr, wd = self._grid_tensors(num_blocks, device)                     # (B, G) each
        num_grid = lr.shape[1]
        lr_rows = lr.repeat_interleave(num_classes, dim=1)[:, :, None]     # (B, G*C, 1)
        wd_rows = wd.repeat_interleave(num_classes, dim=1)[:, :, None]

        # Sample-major copy (n, B, d): a mini-batch is then len(index) contiguous rows, gathered 2-3x faster
        # than from (B, n, d). No copy when x is already a view of sample-major memory, as `evaluate_linear` passes.
        samples = x.transpose(0, 1).contiguous()                            # (n, B, d)
        mean = x.mean(dim=1, keepdim=True)                                  # (B, 1, d)
        scale = x.std(dim=1, keepdim=True, correction=0)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))      # constant features stay at 0
        curvature = _top_eigenvalue(x, mean, scale)                         # (B,)
        # Learning rates are in units of 1 / curvature, per block: a grid that suits d = 32 and d = 768 alike.
        lr_rows = lr_rows / curvature[:, None, None]

        # Heads as rows, (out, in) like nn.Linear: logits come out as (B, G*C, b), the orientation in which
        # bmm is fast for few outputs (5x faster than (B, b, G*C) for G*C = 10 on CPU, torch 2.15).
        weight = torch.zeros(num_blocks, num_grid * num_classes, d, device=device)
        bias = torch.zeros(num_blocks, num_grid * num_classes, 1, device=device)
        weight_velocity = torch.zeros_like(weight)
        bias_velocity = torch.zeros_like(bias)
        generator = torch.Generator().manual_seed(self.seed)
        # ceil(n / batch_size) batches of near-equal size: a last batch of a few samples would take a full,
        # very noisy step at the largest learning rates.
        steps_per_epoch = math.ceil(n / self.batch_size)
        epochs = max(self.epochs, math.ceil(self.min_steps / steps_per_epoch))
        total_steps = epochs * steps_per_epoch
        step = 0
        mean_t, scale_t = mean.transpose(0, 1), scale.transpose(0, 1)      # (1, B, d)
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator).to(device)
            for index in order.tensor_split(steps_per_epoch):
                batch = len(index)
                z = samples.index_select(0, index).sub_(mean_t).div_(scale_t).transpose(0, 1)  # (B, b, d) view
                logits = torch.baddbmm(bias, weight, z.transpose(1, 2))      # (B, G*C, b)
                probs = _softmax_(logits.view(num_blocks, num_grid, num_classes, batch), dim=2)
                probs.sub_(one_hot_t.index_select(1, index))                # d CE / d logits = p - onehot(y)
                grad_logits = probs.view(num_blocks, -1, batch).div_(batch)  # of the batch mean
                grad_weight = torch.bmm(grad_logits, z).add_(wd_rows * weight)  # (B, G*C, d)
                grad_bias = grad_logits.sum(dim=2, keepdim=True)
                weight_velocity.mul_(self.momentum).add_(grad_weight)
                bias_velocity.mul_(self.momentum).add_(grad_bias)
                factor = cosine_lr(step, total_steps)
                weight.sub_(factor * lr_rows * weight_velocity)
                bias.sub_(factor * lr_rows * bias_velocity)
                step += 1

        self.mean_ = mean[:, 0]
        self.scale_ = scale[:, 0]
        self.coef_ = weight.view(num_blocks, num_grid, num_classes, d)
        self.intercept_ = bias.view(num_blocks, num_grid, num_classes)
        finite = torch.isfinite(self.coef_).flatten(2).all(dim=2) & torch.isfinite(self.intercept_).all(dim=2)
        self.diverged_ = ~finite
        self.curvature_ = curvature
        self.n_epochs_ = epochs
        self.n_steps_ = total_steps
        return self

    def _grid_tensors(self, num_blocks: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        lr = torch.as_tensor(np.asarray(self.learning_rates, dtype=np.float32), device=device)
        wd = torch.as_tensor(np.asarray(self.weight_decays, dtype=np.float32), device=device)
        if lr.shape != wd.shape or lr.ndim not in (1, 2) or lr.shape[-1] == 0:
            raise BadInputError(f"learning_rates and weight_decays must have the same shape, (num_grid,) or "
                                f"(num_blocks, num_grid); got {tuple(lr.shape)} and {tuple(wd.shape)}")
        if lr.ndim == 2 and lr.shape[0] != num_blocks:
            raise BadInputError(f"per-block learning_rates have {lr.shape[0]} rows for {num_blocks} blocks")
        return lr.expand(num_blocks, -1), wd.expand(num_blocks, -1)

    def _logit_chunks(self, features: ArrayLike, chunk_size: int) -> Iterator[torch.Tensor]:
        """Yield (num_blocks, num_grid, num_classes, chunk) logits over consecutive chunks of samples."""
        x = _as_float32(features, self.coef_.device)
        num_blocks, num_grid, num_classes, d = self.coef_.shape
        if x.ndim != 3 or x.shape[0] != num_blocks or x.shape[2] != d:
            raise BadInputError(f"features must be ({num_blocks}, n, {d}), got shape {tuple(x.shape)}")
        weight = self.coef_.reshape(num_blocks, num_grid * num_classes, d)
        bias = self.intercept_.reshape(num_blocks, num_grid * num_classes, 1)
        for start in range(0, x.shape[1], chunk_size):
            z = (x[:, start:start + chunk_size] - self.mean_[:, None]) / self.scale_[:, None]
            logits = torch.baddbmm(bias, weight, z.transpose(1, 2))         # (B, G*C, b)
            yield logits.view(num_blocks, num_grid, num_classes, -1)

    def decision_function(self, features: ArrayLike, *, chunk_size: int = 8192) -> torch.Tensor:
        """(num_blocks, num_grid, n, num_classes) logits of every head on (num_blocks, n, d) features."""
        return torch.cat([chunk.transpose(2, 3) for chunk in self._logit_chunks(features, chunk_size)], dim=2)

    def evaluate(self, features: ArrayLike, labels: ArrayLike, *,
                 chunk_size: int = 8192) -> tuple[np.ndarray, np.ndarray]:
        """Accuracy (fraction) and mean cross-entropy of every head, each (num_blocks, num_grid).

        Labels never seen in training count as errors (and add no loss); a diverged head scores 0 and
        infinite loss. Memory is bounded by ``chunk_size`` samples of logits.
        """
        n, y, known = self._targets(features, labels)
        correct = torch.zeros(self.coef_.shape[:2], device=y.device)
        nll = torch.zeros(self.coef_.shape[:2], device=y.device)
        start = 0
        for logits in self._logit_chunks(features, chunk_size):             # (B, G, C, b)
            stop = start + logits.shape[-1]
            target = y[start:stop].view(1, 1, 1, -1).expand(*logits.shape[:2], 1, -1)
            chunk_known = known[start:stop]
            correct += ((logits.argmax(dim=2) == y[start:stop]) & chunk_known).sum(dim=-1)
            nll -= (logits.log_softmax(dim=2).gather(2, target)[:, :, 0] * chunk_known).sum(dim=-1)
            start = stop
        diverged = self.diverged_.cpu().numpy()
        accuracy = correct.cpu().numpy().astype(np.float64) / max(n, 1)  # exact counts, float64 ratio
        loss = nll.cpu().numpy().astype(np.float64) / max(int(known.sum()), 1)
        accuracy[diverged] = 0.0
        loss[diverged | ~np.isfinite(loss)] = math.inf
        return accuracy, loss

    def _targets(self, features: ArrayLike, labels: ArrayLike) -> tuple[int, torch.Tensor, torch.Tensor]:
        """``(n, y, known)``: the sample count, each label's class position (n,) and whether the probes saw
        that class in training (n,) bool, on the probes' device."""
        y_np = np.asarray(labels)
        n = np.shape(features)[1] if np.ndim(features) == 3 else -1
        if y_np.shape != (n,):
            raise BadInputError(f"labels must be ({n},) to match the features, got shape {y_np.shape}")
        device = self.coef_.device
        position = np.searchsorted(self.classes_, y_np).clip(max=len(self.classes_) - 1)
        known = torch.as_tensor(self.classes_[position] == y_np, device=device)
        return n, torch.as_tensor(position, device=device), known

    def score(self, features: ArrayLike, labels: ArrayLike) -> np.ndarray:
        """(num_blocks, num_grid) accuracy, a fraction in [0, 1]."""
        return self.evaluate(features, labels)[0]

    def correct(self, features: ArrayLike, labels: ArrayLike, *, chunk_size: int = 8192) -> np.ndarray:
        """(num_blocks, num_grid, n) bool: whether each head classifies each sample correctly.

        The per-sample counterpart of `evaluate`'s accuracy (its mean over the last axis), with the same rules:
        labels never seen in training and diverged heads count as errors.
        """
        n, y, known = self._targets(features, labels)
        hits = [(logits.argmax(dim=2) == y[start:start + logits.shape[-1]]) & known[start:start + logits.shape[-1]]
                for start, logits in zip(range(0, n, chunk_size), self._logit_chunks(features, chunk_size))]
        correct = torch.cat(hits, dim=-1).cpu().numpy() if hits else np.zeros((*self.coef_.shape[:2], 0), bool)
        correct[self.diverged_.cpu().numpy()] = False
        return correct


def fit_probes(train_blocks: Mapping[int, ArrayLike] | ArrayLike, train_labels: ArrayLike, *,
               lrs: Sequence[float] = LinearProbeConfig.lrs,
               weight_decays: Sequence[float] = LinearProbeConfig.weight_decays,
               epochs: int = LinearProbeConfig.epochs, min_steps: int = LinearProbeConfig.min_steps,
               batch_size: int = LinearProbeConfig.batch_size, momentum: float = LinearProbeConfig.momentum,
               seed: int = 0, device: str | torch.device = "cpu") -> BlockwiseLinearProbes:
    """Train heads for every block and every point of the ``lrs x weight_decays`` grid (lr-major order).

    Args:
        train_blocks: {block: (n, d) features} (all of the same width; stacked in key order) or a
            (num_blocks, n, d) array or tensor.
        train_labels: (n,) integer labels.
        lrs: Learning rates in units of 1 / curvature (see `BlockwiseLinearProbes`).
        weight_decays: L2 coefficients on the mean loss.
        epochs, min_steps, batch_size, momentum, seed, device: As `BlockwiseLinearProbes`.

    Returns:
        The fitted `BlockwiseLinearProbes`; ``coef_[i, g]`` is block i's (in stacking order) head for grid point g.
    """
    if isinstance(train_blocks, Mapping):
        blocks = sorted(train_blocks)
        _check_widths(train_blocks, blocks)
        if len({np.shape(train_blocks[b])[1] for b in blocks}) > 1:
            raise BadInputError("fit_probes stacks blocks, so they must have one width; use evaluate_linear, "
                                "which groups blocks by width")
        n = len(train_labels)
        features = _stack({b: train_blocks[b] for b in blocks}, blocks, np.arange(n), "train", torch.device(device))
    else:
        features = train_blocks
    grid = [(lr, wd) for lr in lrs for wd in weight_decays]
    return BlockwiseLinearProbes(learning_rates=[lr for lr, _ in grid], weight_decays=[wd for _, wd in grid],
                                 epochs=epochs, min_steps=min_steps, batch_size=batch_size, momentum=momentum,
                                 seed=seed, device=device).fit(features, train_labels)


def evaluate_linear(train_blocks: Mapping[int, ArrayLike], train_labels: ArrayLike,
                    test_blocks: Mapping[int, ArrayLike], test_labels: ArrayLike, *, split: str = "test",
                    config: LinearProbeConfig = LinearProbeConfig(), seed: int = 0, val_fraction: float = 0.1,
                    refit: bool = True, device: str | torch.device = "cpu") -> dict[int, list[MetricRow]]:
    """Batched linear probe of every block: select on a validation split carved from train, report on test.

    Args:
        train_blocks: {block: (n_train, d) features}, e.g. ``store.features("train", block, pooling)`` (float16
            memory maps are read block by block as float32).
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
        {block: [linear_top1 on ``split``, linear_val_top1 on "val"]}; params hold the grid, the chosen ``lr``
        and ``weight_decay``, and the schedule.

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
                              val_fraction: float = 0.1, refit: bool = True, device: str | torch.device = "cpu"
                              ) -> tuple[dict[int, list[MetricRow]], dict[int, np.ndarray]]:
    """`evaluate_linear`'s rows and, per block, the (n_test,) bool correctness of the reported head on every
    test sample (its mean is the ``linear_top1`` value), for paired bootstrap intervals (`mimprobe.report`)."""
    device = torch.device(device)
    blocks = _check_inputs(train_blocks, train_labels, test_blocks, test_labels)
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    fit_idx, val_idx = carve_validation(train_labels, fraction=val_fraction, seed=seed)
    if len(np.unique(train_labels[fit_idx])) < 2:
        raise BadInputError("the fit split (train minus validation) has fewer than 2 classes: lower val_fraction")
    grid = config.grid()
    common = {"probe": "batched-sgd", "grid_lrs": list(config.lrs), "grid_weight_decays": list(config.weight_decays),
              "epochs": config.epochs, "min_steps": config.min_steps, "batch_size": config.batch_size,
              "momentum": config.momentum, "val_fraction": val_fraction, "refit": refit}
    rows: dict[int, list[MetricRow]] = {}
    hits: dict[int, np.ndarray] = {}
    for group in _block_groups(train_blocks, blocks, config.blocks_per_pass):
        test_x = _stack(test_blocks, group, np.arange(len(test_labels)), split, device)  # checked early, used last
        fit_x = _stack(train_blocks, group, fit_idx, "train", device)
        val_x = _stack(train_blocks, group, val_idx, "train", device)
        probes = fit_probes(fit_x, train_labels[fit_idx], lrs=config.lrs, weight_decays=config.weight_decays,
                            epochs=config.epochs, min_steps=config.min_steps, batch_size=config.batch_size,
                            momentum=config.momentum, seed=seed, device=device)
        del fit_x
        val_accuracy, val_loss = probes.evaluate(val_x, train_labels[val_idx])  # (B, G) each
        del val_x
        chosen = [select_grid_point(val_accuracy[i], val_loss[i]) for i in range(len(group))]
        # Selection is done: only now are the test features and labels used.
        if refit:
            train_x = _stack(train_blocks, group, np.arange(len(train_labels)), "train", device)
            final = BlockwiseLinearProbes(learning_rates=[[grid[g][0]] for g in chosen],
                                          weight_decays=[[grid[g][1]] for g in chosen], epochs=config.epochs,
                                          min_steps=config.min_steps, batch_size=config.batch_size,
                                          momentum=config.momentum, seed=seed, device=device
                                          ).fit(train_x, train_labels)
            del train_x
            test_accuracy = final.score(test_x, test_labels)[:, 0]
            test_hits = final.correct(test_x, test_labels)[:, 0]
        else:
            test_accuracy = probes.score(test_x, test_labels)[np.arange(len(group)), chosen]
            test_hits = probes.correct(test_x, test_labels)[np.arange(len(group)), chosen]
        for i, block in enumerate(group):
            lr, wd = grid[chosen[i]]
            params = {**common, "lr": lr, "weight_decay": wd}
            rows[block] = [MetricRow(split, "linear_top1", float(test_accuracy[i]), params, seed),
                           MetricRow("val", "linear_val_top1", float(val_accuracy[i, chosen[i]]), params, seed)]
            hits[block] = test_hits[i]
    return {block: rows[block] for block in blocks}, {block: hits[block] for block in blocks}


def select_grid_point(val_accuracy: np.ndarray, val_loss: np.ndarray) -> int:
    """Index of the highest validation accuracy; ties go to the lowest validation loss, then the first point."""
    order = np.lexsort((np.arange(len(val_accuracy)), val_loss, -val_accuracy))
    return int(order[0])


def evaluate_linear_sklearn(train_blocks: Mapping[int, ArrayLike], train_labels: ArrayLike,
                            test_blocks: Mapping[int, ArrayLike], test_labels: ArrayLike, *, split: str = "test",
                            c_values: Sequence[float] = DEFAULT_C_VALUES, seed: int = 0, val_fraction: float = 0.1,
                            refit: bool = True, max_iter: int = 1000) -> dict[int, list[MetricRow]]:
    """Reference probe: scikit-learn ``LogisticRegression`` (lbfgs, multinomial) per block, one fit per C.

    Same protocol, validation split and rows as `evaluate_linear`: features standardised with the fit split's
    statistics (``StandardScaler``), C chosen per block on the validation split (ties: the smallest C), then,
    with ``refit``, a final fit on all of train standardised with its own statistics. The C values are fitted in
    increasing order, each warm-started from the previous solution, as ``LogisticRegressionCV`` does along its
    regularisation path: every fit still runs lbfgs to its tolerance, so the solutions are the same.
    """
    return evaluate_linear_sklearn_with_hits(train_blocks, train_labels, test_blocks, test_labels, split=split,
                                             c_values=c_values, seed=seed, val_fraction=val_fraction, refit=refit,
                                             max_iter=max_iter)[0]


def evaluate_linear_sklearn_with_hits(train_blocks: Mapping[int, ArrayLike], train_labels: ArrayLike,
                                      test_blocks: Mapping[int, ArrayLike], test_labels: ArrayLike, *,
                                      split: str = "test", c_values: Sequence[float] = DEFAULT_C_VALUES,
                                      seed: int = 0, val_fraction: float = 0.1, refit: bool = True,
                                      max_iter: int = 1000) -> tuple[dict[int, list[MetricRow]], dict[int, np.ndarray]]:
    """`evaluate_linear_sklearn`'s rows and, per block, the (n_test,) bool test correctness (see
    `evaluate_linear_with_hits`)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    blocks = _check_inputs(train_blocks, train_labels, test_blocks, test_labels)
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    fit_idx, val_idx = carve_validation(train_labels, fraction=val_fraction, seed=seed)
    if len(np.unique(train_labels[fit_idx])) < 2:
        raise BadInputError("the fit split (train minus validation) has fewer than 2 classes: lower val_fraction")
    c_values = sorted(float(c) for c in c_values)
    common = {"probe": "sklearn-lbfgs", "grid_c": c_values, "max_iter": max_iter, "val_fraction": val_fraction,
              "refit": refit}
    rows: dict[int, list[MetricRow]] = {}
    hits: dict[int, np.ndarray] = {}
    for block in blocks:
        train_x = _finite_float32(train_blocks[block], block, "train")
        test_x = _finite_float32(test_blocks[block], block, split)  # checked early, used last
        scaler = StandardScaler().fit(train_x[fit_idx])
        fit_z, val_z = scaler.transform(train_x[fit_idx]), scaler.transform(train_x[val_idx])
        path = LogisticRegression(max_iter=max_iter, warm_start=True)
        val_scores = [path.set_params(C=c).fit(fit_z, train_labels[fit_idx]).score(val_z, train_labels[val_idx])
                      for c in c_values]
        best = int(np.argmax(val_scores))
        if refit:
            final = make_pipeline(StandardScaler(), LogisticRegression(C=c_values[best], max_iter=max_iter))
            final.fit(train_x, train_labels)
        else:
            final = make_pipeline(scaler, LogisticRegression(C=c_values[best], max_iter=max_iter).fit(
                fit_z, train_labels[fit_idx]))
        params = {**common, "C": c_values[best]}
        rows[block] = [MetricRow(split, "linear_top1", float(final.score(test_x, test_labels)), params, seed),
                       MetricRow("val", "linear_val_top1", float(val_scores[best]), params, seed)]
        hits[block] = final.predict(test_x) == test_labels
    return rows, hits


def _check_inputs(train_blocks: Mapping[int, ArrayLike], train_labels: ArrayLike,
                  test_blocks: Mapping[int, ArrayLike], test_labels: ArrayLike) -> list[int]:
    """Shapes, labels, block sets and finiteness, before any training; returns the sorted blocks."""
    blocks = sorted(train_blocks)
    if not blocks:
        raise BadInputError("no blocks to probe: train_blocks is empty")
    if sorted(test_blocks) != blocks:
        raise BadInputError(f"train and test have different blocks: {blocks} vs {sorted(test_blocks)}")
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
    _check_widths(train_blocks, blocks)
    for block in blocks:
        if np.shape(test_blocks[block])[1] != np.shape(train_blocks[block])[1]:
            raise BadInputError(f"block {block}: train and test features have different widths")
    for name, features in (("train", train_blocks), ("test", test_blocks)):
        for block in blocks:
            _check_finite(features[block], block, name)
    return blocks


def _check_finite(features: ArrayLike, block: int, split: str) -> None:
    """Fail fast on NaN/Inf, in the stored dtype (float16 overflow is Inf there), chunk by chunk."""
    for start in range(0, len(features), 65536):
        chunk = features[start:start + 65536]
        finite = torch.isfinite(chunk).all() if isinstance(chunk, torch.Tensor) else np.isfinite(chunk).all()
        if not finite:
            raise BadInputError(f"block {block}: {split} features contain NaN or Inf; re-extract the block, or "
                                "use float32 storage if float16 overflowed")


def _check_widths(blocks_by_id: Mapping[int, ArrayLike], blocks: list[int]) -> None:
    for block in blocks:
        if len(np.shape(blocks_by_id[block])) != 2 or np.shape(blocks_by_id[block])[1] == 0:
            raise BadInputError(f"block {block}: features must be (n, d) with d >= 1, "
                                f"got {np.shape(blocks_by_id[block])}")


def _block_groups(train_blocks: Mapping[int, ArrayLike], blocks: list[int],
                  blocks_per_pass: int | None) -> list[list[int]]:
    """Blocks of equal width, in order, at most ``blocks_per_pass`` per group (heads are independent)."""
    by_width: dict[int, list[int]] = {}
    for block in blocks:
        by_width.setdefault(np.shape(train_blocks[block])[1], []).append(block)
    size = blocks_per_pass or len(blocks)
    return [members[i:i + size] for members in by_width.values() for i in range(0, len(members), size)]


def _finite_float32(features: ArrayLike, block: int, split: str) -> np.ndarray:
    array = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else features
    array = np.require(array, dtype=np.float32, requirements="W")  # a writable copy of read-only memory maps
    if not np.isfinite(array).all():  # float64 input can overflow float32
        raise BadInputError(f"block {block}: {split} features contain NaN or Inf as float32")
    return array


def _stack(blocks_by_id: Mapping[int, ArrayLike], blocks: list[int], rows: np.ndarray, split: str,
           device: torch.device) -> torch.Tensor:
    """(len(blocks), len(rows), d) float32 on ``device``, read one block at a time (memory maps stay lazy).

    The result is a view of sample-major memory (len(rows), len(blocks), d), the layout training gathers from.
    """
    d = np.shape(blocks_by_id[blocks[0]])[1]
    stacked = torch.empty(len(rows), len(blocks), d, dtype=torch.float32, device=device)
    whole = len(rows) == np.shape(blocks_by_id[blocks[0]])[0] and np.array_equal(rows, np.arange(len(rows)))
    for i, block in enumerate(blocks):
        features = blocks_by_id[block]
        selected = features if whole else features[rows]
        stacked[:, i] = torch.from_numpy(_finite_float32(selected, block, split))
    return stacked.transpose(0, 1)


def _top_eigenvalue(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, *, chunk_size: int = 4096,
                   iterations: int = 50) -> torch.Tensor:
    """(B,) largest eigenvalue of each block's standardised covariance ``Z^T Z / n`` (Z = (x - mean) / scale).

    The (B, d, d) covariance is accumulated over chunks of samples (one GEMM pass, a few % of the training
    FLOPs), then power-iterated from a start vector shared by all blocks, so a block's estimate does not depend
    on the others. Power iteration approaches the eigenvalue from below; a few % low is harmless here.
    """
    num_blocks, n, d = x.shape
    covariance = torch.zeros(num_blocks, d, d, device=x.device)
    for start in range(0, n, chunk_size):
        z = (x[:, start:start + chunk_size] - mean) / scale                   # (B, chunk, d)
        covariance.baddbmm_(z.transpose(1, 2), z)
    covariance /= n
    start_vector = torch.randn(d, generator=torch.Generator().manual_seed(0)).to(x.device)
    vector = (start_vector / start_vector.norm()).expand(num_blocks, d).unsqueeze(2)  # (B, d, 1)
    eigenvalue = torch.ones(num_blocks, device=x.device)
    for _ in range(iterations):
        image = torch.bmm(covariance, vector)
        eigenvalue = image.norm(dim=1)[:, 0]
        vector = image / eigenvalue.clamp(min=1e-12)[:, None, None]
    return eigenvalue.clamp(min=1e-12)


def _softmax_(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """In-place, numerically stable softmax: several times faster than ``Tensor.softmax`` on CPU over the ~10
    classes of a probe (torch 2.15: 0.46 vs 2.8 ms for (12, 256, 9, 10) over the last dim)."""
    logits.sub_(logits.amax(dim=dim, keepdim=True)).exp_()
    return logits.div_(logits.sum(dim=dim, keepdim=True))


def _as_float32(features: ArrayLike, device: torch.device) -> torch.Tensor:
    if isinstance(features, torch.Tensor):
        return features.to(device=device, dtype=torch.float32)
    return torch.as_tensor(np.asarray(features, dtype=np.float32), device=device)
