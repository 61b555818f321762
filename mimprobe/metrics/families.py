"""The compute functions of the registry's families (`mimprobe.metrics.registry`): what each ``--metrics`` word
measures on a store's rows, as `profile_store` calls it.

Every function takes the `Context` of one profile, the pooling, and a block (scope ``block``) or every block (scope
``pooling``), and returns ``[(block, MetricRow), ...]``. The context reads one point of the blocks (``ctx.point``:
their outputs, or a point inside them; `mimprobe.metrics.points`), so that every family measures (block, point) as
it measures a block. Each imports its metric's module when called.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ._rows import MetricRow


@dataclass
class Context:
    """What the families of one profile share: the store's row views, the split plan, the options, and where the
    per-sample correctness goes."""

    store: Any                       # the FeatureStore
    views: Any                       # `mimprobe.metrics.profile.StoreViews`
    plan: Any                        # `mimprobe.metrics.splits.SplitPlan`
    config: Any                      # `ProfileConfig`
    device: Any                      # torch device of the probe (and of k-NN on CUDA)
    predictions: Any = None          # `SamplePredictions` or None
    knn_group: Any = None            # the torchrun process group of the sharded k-NN bank, or None
    eval_subset: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))   # low-shot / clustering rows
    labelfree_subset: Any = None     # `labelfree.Subset` of the train split's rows (seeded; size recorded)
    point: str = "block"             # the point of the blocks that ``views`` reads
    readouts: dict = field(default_factory=dict)  # pooling -> [`readout.Readout`] its linear probe call trains

    def name(self, block: int, pooling: str) -> str:
        return f"block {block}" + (f" point {self.point}" if self.point != "block" else "") + f" ({pooling})"

    def labelfree_rows(self, block: int, pooling: str) -> np.ndarray:
        """(m, d) float64 rows of the train split's label-free subset."""
        subset = self.labelfree_subset
        positions = np.arange(subset.size) if subset.rows is None else subset.rows
        return np.asarray(self.views.sample("train", positions, block, pooling), dtype=np.float64)


# -------------------------------------------------------------------------------------------- labelled families

def knn_rows(ctx: Context, pooling: str, block: int) -> list[tuple[int, MetricRow]]:
    """k-NN on the evaluation split (or leave-one-out on train) and fit -> val, with per-sample hits recorded."""
    from . import knn

    views, plan, config = ctx.views, ctx.plan, ctx.config
    extra = {"device": ctx.device} if str(ctx.device).startswith("cuda") else {}
    common = dict(preset=config.preset, class_names=ctx.store.classes, memory_budget=config.memory_budget,
                  name=ctx.name(block, pooling), process_group=ctx.knn_group, **extra)
    if plan.knn_loo:
        found, hits = knn.evaluate_knn_with_hits(
            views.rows("train", block, pooling), views.labels("train"), views.rows("train", block, pooling),
            views.labels("train"), split="train-loo", exclude_self=True, **common)
        _record_knn(ctx, found, hits, source="train", rows=views.positions("train"), block=block, pooling=pooling)
    else:
        found, hits = knn.evaluate_knn_with_hits(
            views.rows("bank", block, pooling), views.labels("bank"), views.rows("eval", block, pooling),
            views.labels("eval"), split=plan.eval_split, **common)
        _record_knn(ctx, found, hits, source=plan.eval_source, rows=plan.eval_index, block=block, pooling=pooling)
    val_found, val_hits = knn.evaluate_knn_with_hits(
        views.rows("fit", block, pooling), views.labels("fit"), views.rows("val", block, pooling),
        views.labels("val"), split="val", **common)
    _record_knn(ctx, val_found, val_hits, source="train", rows=plan.val_index, block=block, pooling=pooling)
    return [(block, row) for row in found + val_found]


def _record_knn(ctx: Context, found: list[MetricRow], hits: dict[tuple[int, float], np.ndarray], *, source: str,
                rows: np.ndarray, block: int, pooling: str) -> None:
    """File the top-1 correctness of each ``knn_top1`` row under the row's split and params."""
    if ctx.predictions is None:
        return
    for row in found:
        if row.metric == "knn_top1":
            ctx.predictions.add(split=row.split, source=source, rows=rows, metric=row.metric, block=block,
                                pooling=pooling, params=row.params_json(), point=ctx.point,
                                hits=hits[(row.params["k"], row.params["T"])])


def linear_rows(ctx: Context, pooling: str, blocks: list[int]) -> list[tuple[int, MetricRow]]:
    """Linear probes of every block of a pooling in one batched pass (or scikit-learn's, the reference path), and
    of the multi-block readouts (``--readout``) drawn beside this pooling's curve, as more feature sets of the same
    call (`mimprobe.metrics.readout`)."""
    from . import linear
    from .readout import readout_rows

    views, plan, config = ctx.views, ctx.plan, ctx.config
    train_blocks = {block: views.rows("bank", block, pooling) for block in blocks}
    eval_blocks = {block: views.rows("eval", block, pooling) for block in blocks}
    readouts = {readout.key: readout for readout in ctx.readouts.get(pooling, [])}
    for key, readout in readouts.items():
        train_blocks[key] = readout.features(lambda block, read: views.rows("bank", block, read))
        eval_blocks[key] = readout.features(lambda block, read: views.rows("eval", block, read))
    if config.probe == "batched":
        found_by_block, hits_by_block = linear.evaluate_linear_with_hits(
            train_blocks, views.labels("bank"), eval_blocks, views.labels("eval"), split=plan.eval_split,
            seed=config.seed, val_fraction=config.val_fraction, device=ctx.device,
            config=linear.LinearProbeConfig(memory_budget=config.memory_budget), assume_finite=True)
    else:
        from .linear_sklearn import evaluate_linear_sklearn_with_hits

        found_by_block, hits_by_block = evaluate_linear_sklearn_with_hits(
            train_blocks, views.labels("bank"), eval_blocks, views.labels("eval"), split=plan.eval_split,
            seed=config.seed, val_fraction=config.val_fraction)
    rows = []
    for key, found in found_by_block.items():
        block = key
        if key in readouts:  # its own metric names, block = the last block read
            found, block = readout_rows(readouts[key], found), readouts[key].last_block
        rows += [(block, row) for row in found]
        if ctx.predictions is not None:
            test_row = next(row for row in found if row.metric in ("linear_top1", "linear_readout_top1"))
            ctx.predictions.add(split=plan.eval_split, source=plan.eval_source, rows=plan.eval_index,
                               metric=test_row.metric, block=block, pooling=pooling, params=test_row.params_json(),
                               hits=hits_by_block[key], point=ctx.point)
    return rows


def lowshot_rows(ctx: Context, pooling: str, block: int) -> list[tuple[int, MetricRow]]:
    from . import lowshot

    views, plan = ctx.views, ctx.plan
    y_bank = views.labels("bank")
    largest = int(np.bincount(y_bank[y_bank >= 0]).max())
    shots = tuple(n for n in lowshot.DEFAULT_SHOTS if n <= largest)  # tiny data: fewer settings
    found = lowshot.evaluate_lowshot(views.rows("bank", block, pooling), y_bank,
                                     views.sample("eval", ctx.eval_subset, block, pooling),
                                     views.labels("eval")[ctx.eval_subset], shots=shots, split=plan.eval_split,
                                     name=ctx.name(block, pooling))
    return [(block, _with_sample(row, ctx.eval_subset, plan.eval_index)) for row in found]


def cluster_rows(ctx: Context, pooling: str, block: int) -> list[tuple[int, MetricRow]]:
    from . import cluster

    views, plan = ctx.views, ctx.plan
    found = cluster.evaluate_clustering(views.sample("eval", ctx.eval_subset, block, pooling),
                                        views.labels("eval")[ctx.eval_subset], split=plan.eval_split,
                                        seed=ctx.config.seed, name=ctx.name(block, pooling))
    return [(block, _with_sample(row, ctx.eval_subset, plan.eval_index)) for row in found]


def _with_sample(row: MetricRow, subset: np.ndarray, whole: np.ndarray) -> MetricRow:
    """The row with ``params["eval_samples"]`` = the rows it was measured on, when a subsample (else absent)."""
    if len(subset) == len(whole):
        return row
    return MetricRow(row.split, row.metric, row.value, {**row.params, "eval_samples": int(len(subset))}, row.seed)


# ------------------------------------------------------------------------------------------- label-free families

def rank_rows(ctx: Context, pooling: str, block: int) -> list[tuple[int, MetricRow]]:
    from . import rank

    found = rank.evaluate_rank(ctx.views.rows("train", block, pooling), split="train",
                               max_samples=ctx.config.rank_samples, seed=ctx.config.seed, name=ctx.name(block, pooling))
    return [(block, row) for row in found]


def _estimate_rows(ctx: Context, block: int, metric: str, estimate: Any) -> list[tuple[int, MetricRow]]:
    """A label-free estimate as its value row (and ``{metric}_se`` row) on split train; a subsample's size and seed
    are recorded in the params (and its seed in the row)."""
    subset = ctx.labelfree_subset
    drawn = subset.rows is not None
    return [(block, row) for row in estimate.rows(metric=metric, split="train", subset=subset if drawn else None,
                                                  seed=subset.seed if drawn else None)]


def twonn_rows(ctx: Context, pooling: str, block: int) -> list[tuple[int, MetricRow]]:
    from .labelfree import twonn_dimension

    estimate = twonn_dimension(ctx.labelfree_rows(block, pooling), name=ctx.name(block, pooling))
    return _estimate_rows(ctx, block, "twonn_id", estimate)


def spectrum_rows(ctx: Context, pooling: str, block: int) -> list[tuple[int, MetricRow]]:
    """alpha-ReQ and NESum from one eigendecomposition of the subset's covariance."""
    from .labelfree import alpha_req_from_spectrum, covariance_eigenvalues, nesum_from_spectrum
    from .labelfree.spectrum import alpha_req_fits

    eigenvalues = covariance_eigenvalues(ctx.labelfree_rows(block, pooling), name=ctx.name(block, pooling))
    rows = _estimate_rows(ctx, block, "nesum", nesum_from_spectrum(eigenvalues))
    if alpha_req_fits(eigenvalues):  # alpha's fit starts at rank 11: a subset of fewer rows gets no alpha row
        rows = _estimate_rows(ctx, block, "alpha_req", alpha_req_from_spectrum(eigenvalues)) + rows
    return rows


def entropy_rows(ctx: Context, pooling: str, block: int) -> list[tuple[int, MetricRow]]:
    from .labelfree import dataset_entropy

    estimate = dataset_entropy(ctx.labelfree_rows(block, pooling), name=ctx.name(block, pooling))
    return _estimate_rows(ctx, block, "dataset_entropy", estimate)


def learnability_rows(ctx: Context, pooling: str, block: int) -> list[tuple[int, MetricRow]]:
    from .labelfree import cluster_learnability

    estimate = cluster_learnability(ctx.labelfree_rows(block, pooling), seed=ctx.config.seed,
                                    name=ctx.name(block, pooling))
    return _estimate_rows(ctx, block, "cluster_learnability", estimate)


def overlap_rows(ctx: Context, pooling: str, blocks: list[int]) -> list[tuple[int, MetricRow]]:
    """Block b's overlap of its k nearest neighbours with block b+1's (the last block has none): each block's
    neighbour lists are searched once and shared by its two pairs."""
    from .labelfree import block_neighbours, overlap_of_neighbours

    from .labelfree.overlap import DEFAULT_OVERLAP_K

    rows: list[tuple[int, MetricRow]] = []
    previous = None
    k = min(DEFAULT_OVERLAP_K, ctx.labelfree_subset.size - 1)  # small data: every other row
    for block in blocks:
        current = block_neighbours(ctx.labelfree_rows(block, pooling), k=k, name=ctx.name(block, pooling))
        if previous is not None:
            estimate = overlap_of_neighbours(previous[1], current)
            estimate = replace(estimate, params={**estimate.params, "next_block": int(block)})
            rows += _estimate_rows(ctx, previous[0], "neighbourhood_overlap", estimate)
        previous = (block, current)
    return rows
