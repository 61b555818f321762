"""Calibration of a label-free block metric against the labelled ones, on the blocks of one model.

Given a label-free curve (one value per block) and a k-NN (or linear) top-1 curve on the same blocks:

- **rho**: Spearman's rank correlation across blocks (`spearman_rho`, equal to ``scipy.stats.spearmanr``; computed
  for many bootstrap replicates at once by `spearman_rows`), of the raw curve and of its `oriented_score` (turned
  so that higher is better by the metric's rule: positive means "the rule's better blocks are the accurate
  ones", whatever the metric's direction). Blocks where the label-free value is NaN (the overlap has none for the
  last block) are left out.
- **interval**: a percentile bootstrap over *images*. The accuracy side is resampled exactly: the caller gives each
  block's per-image top-1 correctness (``hits``, (blocks, images) bool), and every replicate reweights the images by
  multinomial counts (a resample with replacement). The label-free side is recomputed only when the caller provides
  replicates (``metric_replicates``, (resamples, blocks)), because recomputing is costly (every metric on every
  block for every replicate) and is not even defined for the neighbour-based metrics: a resample with replacement
  duplicates rows, and TwoNN, the overlap and CL read duplicates as zero distances. So by default the label-free
  curve is held fixed and the interval says how sure the rank correlation is given the finite evaluation set;
  `bootstrap_indices` gives the row resamples for the spectral metrics (alpha-ReQ, NESum, RankMe, entropy) where
  a caller can afford them. `CalibrationResult.labelfree_resampled` records which was done.
- **pick**: the block each metric's published rule selects (`RULES`, `pick_block`) and the k-NN accuracy lost
  there against the best block.

Everything is a pure function of arrays; the profile decides which curves to pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.stats import rankdata

from ...errors import BadInputError

PICKS = ("max", "min", "closest_to_1", "first_min_after_peak")
DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95
_RESAMPLE_CHUNK = 64   # bootstrap replicates whose image counts are held at a time


@dataclass(frozen=True)
class PickRule:
    """How a label-free metric is read: which way is better, how it picks a block, and who says so."""

    metric: str        # the row name the registry uses
    direction: str     # "higher", "lower", "target" (a value to approach) or "profile" (a shape rule)
    pick: str          # one of PICKS
    source: str        # the published source of the pick rule (or "mimprobe convention")
    note: str          # caveats a reader of the calibration needs


RULES: dict[str, PickRule] = {rule.metric: rule for rule in (
    PickRule("twonn_id", "profile", "first_min_after_peak",
             "Valeriani et al., NeurIPS 2023, arXiv 2302.00294",
             "ID rises to an early peak; the first relative minimum after the peak is the most semantic layer "
             "(shown on iGPT and protein LMs). Lower ID after the peak is better."),
    PickRule("alpha_req", "target", "closest_to_1",
             "Agrawal et al., NeurIPS 2022 (alpha-ReQ)",
             "good generalisation in a band around alpha = 1 (Stringer et al.'s 1/n spectrum); the paper ranks "
             "models, not blocks."),
    PickRule("nesum", "higher", "max",
             "He & Ozay, ICML 2022 (PMLR 162:8613)",
             "measures the distance from collapse; the paper also reports a sweet spot short of full whitening, "
             "so 'highest' is the convention, not a block-level result."),
    PickRule("rankme", "higher", "max",
             "Garrido et al., ICML 2023, arXiv 2210.02885",
             "the authors scope RankMe to comparing runs of one method, not blocks of one model."),
    PickRule("dataset_entropy", "higher", "max",
             "Skean et al., ICML 2025, arXiv 2502.02013",
             "the paper relates layer entropy to task performance; 'highest' follows issue 21, not a published "
             "block-selection rule."),
    PickRule("neighbourhood_overlap", "higher", "max",
             "mimprobe convention (measure: Doimo et al., NeurIPS 2020, arXiv 2007.03506)",
             "no published pick rule; the highest overlap with the next block picks where neighbourhoods have "
             "settled. Undefined for the last block."),
    PickRule("cluster_learnability", "higher", "max",
             "Lu et al., 2022, arXiv 2206.01251 (CLID)",
             "higher CL correlated with better in-distribution accuracy across SSL models, not across blocks."),
)}


@dataclass(frozen=True)
class CalibrationResult:
    """How one label-free curve tracks one labelled curve across the blocks of one model."""

    metric: str
    rho: float                      # Spearman of the raw curve across the blocks with a finite label-free value
    rho_low: float                  # bootstrap percentile interval (NaN without per-image hits)
    rho_high: float
    oriented_rho: float             # Spearman of `oriented_score` (> 0: the rule's "better" tracks accuracy)
    oriented_low: float
    oriented_high: float
    level: float
    n_resamples: int                # replicates with a defined rho
    labelfree_resampled: bool       # True when metric replicates were given (else the curve was held fixed)
    picked_block: int               # block chosen by the metric's rule
    best_block: int                 # block with the highest labelled accuracy
    accuracy_at_pick: float
    best_accuracy: float
    accuracy_lost: float            # best_accuracy - accuracy_at_pick, >= 0
    n_blocks: int                   # blocks used in rho

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row pair of two (rows, m) arrays, (rows,) float64: Pearson's r of average ranks.

    Equals ``scipy.stats.spearmanr(x[i], y[i]).statistic`` row by row (ties get average ranks); NaN for a constant row.
    """
    x, y = np.atleast_2d(np.asarray(x, dtype=np.float64)), np.atleast_2d(np.asarray(y, dtype=np.float64))
    if x.shape != y.shape or x.shape[1] < 2:
        raise BadInputError(f"Spearman's rho needs two curves of one length >= 2, got shapes {x.shape} and {y.shape}")
    rx, ry = rankdata(x, axis=1), rankdata(y, axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    denominator = np.sqrt(np.sum(rx * rx, axis=1) * np.sum(ry * ry, axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.sum(rx * ry, axis=1) / denominator
    return np.where(denominator > 0, rho, np.nan)


def spearman_rho(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho of two curves (m,) (`spearman_rows` for one row)."""
    return float(spearman_rows(np.asarray(x)[None, :], np.asarray(y)[None, :])[0])


def bootstrap_indices(n_items: int, *, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
    """(n_resamples, n_items) int64 row indices drawn with replacement (seeded): resamples for a label-free metric."""
    if n_items < 1 or n_resamples < 1:
        raise BadInputError(f"bootstrap needs n_items >= 1 and n_resamples >= 1, got {n_items}, {n_resamples}")
    return np.random.default_rng(seed).integers(0, n_items, size=(n_resamples, n_items))


def bootstrap_accuracy(hits: np.ndarray, *, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
    """(n_resamples, blocks) accuracies of image resamples with replacement of a (blocks, images) hit matrix.

    Replicate r counts each image by multinomial counts c_r (sum n) and its accuracy is ``hits @ c_r / n``, the
    accuracy of the resampled images, the same images for every block (the blocks are paired).
    """
    hits = np.asarray(hits, dtype=np.float64)
    if hits.ndim != 2 or hits.shape[1] < 1:
        raise BadInputError(f"hits must be a (blocks, images) array, got shape {hits.shape}")
    n_images = hits.shape[1]
    rng = np.random.default_rng(seed)
    replicates = np.empty((n_resamples, hits.shape[0]))
    uniform = np.full(n_images, 1.0 / n_images)
    for start in range(0, n_resamples, _RESAMPLE_CHUNK):
        stop = min(start + _RESAMPLE_CHUNK, n_resamples)
        counts = rng.multinomial(n_images, uniform, size=stop - start).astype(np.float64)  # (chunk, images)
        replicates[start:stop] = counts @ hits.T / n_images
    return replicates


def oriented_score(curve: np.ndarray, pick: str) -> np.ndarray:
    """The curve turned so that higher means better by a pick rule: x (max), -x (min), -|x - 1| (closest_to_1),
    -x (first_min_after_peak: a low intrinsic dimension after the peak is the semantic one)."""
    if pick not in PICKS:
        raise BadInputError(f"unknown pick rule {pick!r}; choose one of {PICKS}")
    values = np.asarray(curve, dtype=np.float64)
    if pick == "max":
        return values
    if pick == "closest_to_1":
        return -np.abs(values - 1.0)
    return -values


def first_min_after_peak(curve: np.ndarray) -> int:
    """Position of the first relative minimum after the global maximum of a curve (NaNs ignored).

    A relative minimum is a point no higher than its finite neighbours (the last point counts when it is no higher
    than the one before). When the peak is the last point there is nothing after it, and the global minimum is
    returned instead.
    """
    values = np.asarray(curve, dtype=np.float64)
    finite = np.flatnonzero(np.isfinite(values))
    if finite.size == 0:
        raise BadInputError("the curve has no finite value to pick a block from")
    series = values[finite]
    peak = int(np.argmax(series))
    if peak == series.size - 1:
        return int(finite[int(np.argmin(series))])
    for i in range(peak + 1, series.size):
        if i == series.size - 1 or series[i] <= series[i + 1]:
            return int(finite[i])
    raise AssertionError("unreachable: the last point is always a candidate")


def pick_block(curve: np.ndarray, pick: str) -> int:
    """Position (0-based, into ``curve``) of the block a pick rule selects; NaN values are never picked.

    Args:
        curve: (blocks,) label-free values.
        pick: "max", "min", "closest_to_1" (alpha-ReQ) or "first_min_after_peak" (TwoNN ID profile).
    """
    if pick not in PICKS:
        raise BadInputError(f"unknown pick rule {pick!r}; choose one of {PICKS}")
    values = np.asarray(curve, dtype=np.float64)
    if not np.isfinite(values).any():
        raise BadInputError("the curve has no finite value to pick a block from")
    if pick == "first_min_after_peak":
        return first_min_after_peak(values)
    if pick == "max":
        return int(np.nanargmax(values))
    if pick == "min":
        return int(np.nanargmin(values))
    return int(np.nanargmin(np.abs(values - 1.0)))


def calibrate(metric: str, metric_curve: np.ndarray, accuracy_curve: np.ndarray | None = None, *,
              blocks: Sequence[int] | None = None, hits: np.ndarray | None = None,
              metric_replicates: np.ndarray | None = None, pick: str | None = None,
              n_resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL, seed: int = 0) -> CalibrationResult:
    """Calibrate one label-free curve against one labelled accuracy curve over the same blocks.

    Args:
        metric: The label-free metric's name (a key of `RULES` unless ``pick`` is given).
        metric_curve: (blocks,) label-free values; NaN where undefined.
        accuracy_curve: (blocks,) top-1 accuracies; None takes ``hits.mean(axis=1)``.
        blocks: Block numbers of the curve positions (default 0..blocks-1), used in the result.
        hits: (blocks, images) per-image top-1 correctness of the labelled probe; enables the interval.
        metric_replicates: (n_resamples, blocks) label-free values recomputed on row resamples, paired with the
            accuracy resamples by position (see the module docstring); None holds the curve fixed.
        pick: Override of the metric's pick rule.
        n_resamples, level, seed: The bootstrap.

    Returns:
        A `CalibrationResult`. Its accuracy loss is measured on the labelled curve given.
    """
    curve = np.asarray(metric_curve, dtype=np.float64)
    if hits is not None:
        hits = np.asarray(hits)
        if hits.ndim != 2 or hits.shape[0] != curve.shape[0]:
            raise BadInputError(f"{metric}: hits must be (blocks={curve.shape[0]}, images), got {hits.shape}")
    if accuracy_curve is None:
        if hits is None:
            raise BadInputError(f"{metric}: give an accuracy curve or per-image hits")
        accuracy_curve = hits.mean(axis=1)
    accuracy = np.asarray(accuracy_curve, dtype=np.float64)
    if curve.ndim != 1 or accuracy.shape != curve.shape:
        raise BadInputError(f"{metric}: the label-free and accuracy curves must be (blocks,) of one length, got "
                            f"{curve.shape} and {accuracy.shape}")
    if not 0 < level < 1:
        raise BadInputError(f"{metric}: level must be in (0, 1), got {level}")
    block_ids = np.arange(curve.size) if blocks is None else np.asarray(blocks)
    if block_ids.shape != curve.shape:
        raise BadInputError(f"{metric}: {curve.size} curve values but {block_ids.size} block numbers")
    rule = pick if pick is not None else RULES[metric].pick if metric in RULES else None
    if rule is None:
        raise BadInputError(f"{metric}: no pick rule known; pass pick= one of {PICKS}")
    used = np.isfinite(curve)
    if used.sum() < 3:
        raise BadInputError(f"{metric}: a rank correlation across blocks needs at least 3 finite values, got "
                            f"{int(used.sum())}")
    rho = spearman_rho(curve[used], accuracy[used])
    oriented_rho = spearman_rho(oriented_score(curve[used], rule), accuracy[used])

    rho_low = rho_high = oriented_low = oriented_high = float("nan")
    defined = 0
    if hits is not None:
        accuracy_replicates = bootstrap_accuracy(hits, n_resamples=n_resamples, seed=seed)[:, used]
        if metric_replicates is None:
            metric_side = np.broadcast_to(curve[used], accuracy_replicates.shape)
        else:
            metric_replicates = np.asarray(metric_replicates, dtype=np.float64)
            if metric_replicates.shape != (n_resamples, curve.size):
                raise BadInputError(f"{metric}: metric_replicates must be (n_resamples={n_resamples}, "
                                    f"blocks={curve.size}), got {metric_replicates.shape}")
            metric_side = metric_replicates[:, used]
        replicates = spearman_rows(metric_side, accuracy_replicates)
        oriented = spearman_rows(oriented_score(metric_side, rule), accuracy_replicates)
        keep = np.isfinite(replicates) & np.isfinite(oriented)
        defined = int(keep.sum())
        if defined:
            tail = (1 - level) / 2 * 100
            rho_low, rho_high = (float(v) for v in np.percentile(replicates[keep], [tail, 100 - tail]))
            oriented_low, oriented_high = (float(v) for v in np.percentile(oriented[keep], [tail, 100 - tail]))

    picked = pick_block(curve, rule)
    best = int(np.argmax(accuracy))
    return CalibrationResult(metric=metric, rho=rho, rho_low=rho_low, rho_high=rho_high, oriented_rho=oriented_rho,
                             oriented_low=oriented_low, oriented_high=oriented_high, level=float(level),
                             n_resamples=defined, labelfree_resampled=metric_replicates is not None,
                             picked_block=int(block_ids[picked]), best_block=int(block_ids[best]),
                             accuracy_at_pick=float(accuracy[picked]), best_accuracy=float(accuracy[best]),
                             accuracy_lost=float(accuracy[best] - accuracy[picked]), n_blocks=int(used.sum()))
