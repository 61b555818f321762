"""The metric registry: every metric the profile computes, once.

Two kinds of entries:

* a `Family` is what ``--metrics`` names: one computation over a store's rows (``knn``, ``linear``, ``twonn``, ...),
  with whether it needs labels and how it runs (block by block, or over all blocks of a pooling at once);
* a `MetricInfo` is one kind of row it writes to the profile table (``knn_top1``, ``twonn_id``, ...): its title, its
  direction (which way is better, or how a label-free curve picks a block), its unit (a fraction shown in percent,
  or a number) and its family.

`families` holds the compute functions (each imports its metric's module when called, so reading the registry
loads no FAISS or torch). The profile's options (`ProfileConfig.metrics`), the computation (`mimprobe.metrics.profile.profile_store`), the
console's best blocks, the calibration of label-free metrics and the label-free placement rule all read this
module, never a title. Adding a metric is one `Family` (with its compute function in `families`) and a
`MetricInfo` per row kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import families
from .labelfree.calibration import RULES as PICK_RULES


@dataclass(frozen=True)
class Family:
    """A computation ``--metrics`` names.

    Attributes:
        name: The ``--metrics`` word.
        label_free: Runs without labels.
        scope: ``block`` (called per block and pooling) or ``pooling`` (called once per pooling with every block).
        compute: ``compute(context, pooling, block_or_blocks) -> [(block, MetricRow), ...]`` (see
            `mimprobe.metrics.families`).
        summary: One line for help and docs.
        min_rows: Label-free families: the fewest rows the metric is defined on (TwoNN needs 3 ratios after its
            discarded tail; cluster learnability 2 clusters of 2).
    """

    name: str
    label_free: bool
    scope: str
    compute: Callable[..., list[tuple[int, Any]]]
    summary: str
    min_rows: int = 2   # label-free: fewer rows in the subset and the family is skipped (the profile says so)


@dataclass(frozen=True)
class MetricInfo:
    """One kind of profile row.

    Attributes:
        name: The table's ``metric`` column.
        title: Words for plots, tables and the console.
        family: The `Family` that writes it.
        direction: ``higher`` or ``lower`` is better; label-free metrics may instead pick a block by a shape rule
            (``target``: a value to approach, ``profile``: e.g. the first minimum after the peak; see
            `mimprobe.metrics.labelfree.calibration.RULES`); None for rows that are not curves to rank (spreads,
            standard errors).
        unit: ``fraction`` (shown in percent) or ``number``.
        per_block: Whether the rows form a curve over blocks (every block's own value). False for a value that
            reads several blocks at once (a multi-block readout, `mimprobe.metrics.readout`): curves, headlines,
            best blocks and placement leave it out; reports show it as a reference line.
    """

    name: str
    title: str
    family: str
    direction: str | None = "higher"
    unit: str = "fraction"
    per_block: bool = True

    @property
    def label_free(self) -> bool:
        return FAMILIES[self.family].label_free

    @property
    def pick(self) -> str | None:
        """The published pick rule of a label-free metric (`PICK_RULES`), else None."""
        rule = PICK_RULES.get(self.name)
        return rule.pick if rule is not None else None


FAMILIES: dict[str, Family] = {family.name: family for family in (
    Family("knn", False, "block", families.knn_rows, "k-NN top-1/top-5 (FAISS, the preset's k and temperature)"),
    Family("linear", False, "pooling", families.linear_rows, "linear probes of every block at once, C chosen on val"),
    Family("lowshot", False, "block", families.lowshot_rows, "1/2/5-shot and 1 % label logistic regression, 3 seeds"),
    Family("cluster", False, "block", families.cluster_rows, "k-means (k = classes): ACC, NMI, AMI, ARI"),
    Family("rank", True, "block", families.rank_rows, "effective rank (RankMe)"),
    Family("twonn", True, "block", families.twonn_rows, "TwoNN intrinsic dimension with its standard error",
           min_rows=4),
    Family("spectrum", True, "block", families.spectrum_rows, "alpha-ReQ and NESum of the covariance spectrum"),
    Family("entropy", True, "block", families.entropy_rows, "dataset matrix entropy (Layer by Layer)"),
    Family("overlap", True, "pooling", families.overlap_rows, "neighbourhood overlap with the next block"),
    Family("learnability", True, "block", families.learnability_rows, "cluster learnability (CLID)", min_rows=4),
)}
FAMILY_NAMES = tuple(FAMILIES)   # the --metrics words, in the order they run
METRICS = FAMILY_NAMES
LABEL_FREE_FAMILIES = tuple(name for name, family in FAMILIES.items() if family.label_free)

METRIC_INFO: dict[str, MetricInfo] = {info.name: info for info in (
    MetricInfo("knn_top1", "k-NN top-1", "knn"),
    MetricInfo("knn_top5", "k-NN top-5", "knn"),
    MetricInfo("linear_top1", "linear probe top-1", "linear"),
    MetricInfo("knn_class_top1", "k-NN top-1 of one class", "knn", direction=None),
    MetricInfo("linear_val_top1", "linear probe top-1 (probe selection split)", "linear"),
    MetricInfo("linear_readout_top1", "multi-block readout linear probe top-1", "linear", per_block=False),
    MetricInfo("linear_readout_val_top1", "multi-block readout linear probe top-1 (probe selection split)", "linear",
               per_block=False),
    MetricInfo("lowshot_top1_mean", "low-shot top-1", "lowshot"),
    MetricInfo("lowshot_top1_std", "low-shot top-1 (s.d. over seeds)", "lowshot", direction=None),
    MetricInfo("cluster_acc", "k-means ACC", "cluster"),
    MetricInfo("cluster_nmi", "k-means NMI", "cluster", unit="number"),
    MetricInfo("cluster_ami", "k-means AMI", "cluster", unit="number"),
    MetricInfo("cluster_ari", "k-means ARI", "cluster", unit="number"),
    MetricInfo("cluster_silhouette", "silhouette", "cluster", unit="number"),
    MetricInfo("cluster_davies_bouldin", "Davies-Bouldin", "cluster", direction="lower", unit="number"),
    MetricInfo("rankme", "effective rank (RankMe)", "rank", unit="number"),
    MetricInfo("twonn_id", "TwoNN intrinsic dimension", "twonn", direction="profile", unit="number"),
    MetricInfo("twonn_id_se", "TwoNN intrinsic dimension (standard error)", "twonn", direction=None,
               unit="number"),
    MetricInfo("alpha_req", "alpha-ReQ (spectral decay)", "spectrum", direction="target", unit="number"),
    MetricInfo("nesum", "NESum (normalised eigenvalue sum)", "spectrum", unit="number"),
    MetricInfo("dataset_entropy", "dataset matrix entropy", "entropy", unit="number"),
    MetricInfo("neighbourhood_overlap", "neighbourhood overlap with the next block", "overlap"),
    MetricInfo("neighbourhood_overlap_se", "neighbourhood overlap (standard error)", "overlap", direction=None),
    MetricInfo("cluster_learnability", "cluster learnability (CLID)", "learnability"),
    MetricInfo("cluster_learnability_se", "cluster learnability (standard error)", "learnability", direction=None),
)}


def metric_info(name: str) -> MetricInfo | None:
    """The registry entry of a table's metric name (None for a name it does not know, e.g. an older profile's)."""
    return METRIC_INFO.get(name)


def label_free_curves() -> list[MetricInfo]:
    """The label-free metrics that form a curve over blocks (those with a pick rule), in registry order."""
    return [info for info in METRIC_INFO.values() if info.family in LABEL_FREE_FAMILIES and info.pick is not None]
