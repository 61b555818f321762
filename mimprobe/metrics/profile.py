"""`profile`: every metric for every block, point and pooling of a FeatureStore, as one long table, plus the best
blocks.

A store with points inside the blocks (`mimprobe.features.points`) is measured point by point: every metric treats
(block, point) as it treats a block, and the table's ``point`` column says which (``block`` for the blocks'
outputs; `mimprobe.metrics.points`).

Reads only the FeatureStore (metrics never need the model). Splits:

* ``train`` is the bank / training set. The evaluation split is ``test`` (or ``val``) when the data has one.
* A validation split is carved from train (seeded, stratified): k-NN is also measured fit→val (``split="val"``),
  the signal head placement uses, so that it is never chosen on test.
* Data with a train split only: k-NN runs leave-one-out on train (``train-loo``); linear, low-shot and
  clustering use a seeded, stratified 20 % hold-out of train (``train-holdout``).

Besides the table, `run_profile` writes ``predictions.npz`` (`SamplePredictions`): the per-sample top-1
correctness behind every ``knn_top1`` and ``linear_top1`` row, so that before/after differences can be given
paired bootstrap intervals over the same evaluation images (`mimprobe.report`).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._device import resolve_device
from .._messages import progress_display
from .._ranks import current as current_ranks
from .._run_folder import claim_folder
from .._versions import software_versions
from ..errors import BadInputError
from ..features.store import FeatureStore
from ..metrics.config import METRICS, PRESETS, ProfileConfig  # noqa: F401  (the profile's options)
from ._finite import check_finite
from ._rows import MetricRow
from .families import Context
from .predictions import PREDICTIONS_FILE, SamplePredictions
from .splits import SplitPlan, check_knn_fits, plan_splits
from .labelfree import seeded_subset
from .points import best_blocks_by_point, calibrate_by_point
from .registry import FAMILIES, LABEL_FREE_FAMILIES
from .headlines import headlines

LABEL_FREE = LABEL_FREE_FAMILIES
LABELFREE_FLOOR = 1000   # label-free subsets are not cut below this many rows to match a small evaluation split
COLUMNS = ["model", "checkpoint", "dataset", "split", "block", "point", "pooling", "metric", "params", "value",
           "seed"]


def _resolve_metrics(config: ProfileConfig, store: FeatureStore, labels: np.ndarray) -> tuple[str, ...]:
    labelled = store.labelled and (labels >= 0).any()
    requested = config.metrics
    if requested is not None:
        unknown = [m for m in requested if m not in METRICS]
        if unknown:
            raise BadInputError(f"unknown metric {unknown[0]!r}: use a comma list of {', '.join(METRICS)}")
        if not labelled:
            supervised = [m for m in requested if m not in LABEL_FREE]
            if supervised and len(supervised) == len(requested):
                raise BadInputError(f"the data has no labels, which {', '.join(supervised)} need: use "
                                    f"--metrics {','.join(LABEL_FREE)} or give class folders")
            return tuple(m for m in requested if m in LABEL_FREE)
        metrics = tuple(requested)
    else:
        metrics = METRICS if labelled else LABEL_FREE
    if labelled and any(m not in LABEL_FREE for m in metrics) and len(np.unique(labels[labels >= 0])) < 2:
        raise BadInputError("the train split holds a single class: supervised metrics need at least 2; "
                            "use --metrics rank")
    return metrics


def profile_store(store: FeatureStore, config: ProfileConfig | None = None, *, progress: bool = True,
                  log: Callable[[str], None] | None = None,
                  predictions: SamplePredictions | None = None) -> pd.DataFrame:
    """Measure every block, point and pooling of a complete store; return the long table (DESIGN.md columns, and
    ``point``: `mimprobe.metrics.points`).

    Args:
        predictions: When given, receives the per-sample correctness of every ``knn_top1`` and ``linear_top1``
            row (see `SamplePredictions`).
    """
    config = config or ProfileConfig()
    if config.preset not in PRESETS:
        raise BadInputError(f"unknown preset {config.preset!r}: use {', '.join(PRESETS)}")
    if config.probe not in ("batched", "sklearn"):
        raise BadInputError(f"unknown probe {config.probe!r}: use batched or sklearn")
    if not store.complete:
        raise BadInputError(f"feature store {store.path} is incomplete: rerun `mimprobe extract` to finish it")
    poolings = list(config.poolings or store.poolings)
    missing = [p for p in poolings if p not in store.poolings]
    if missing:
        raise BadInputError(f"pooling {missing[0]} is not in store {store.path}: it has {', '.join(store.poolings)}")
    train_labels_all = store.labels("train")
    metrics = _resolve_metrics(config, store, train_labels_all)
    readouts = {}
    if config.readout:
        from .readout import plan_readouts

        if "linear" not in metrics:
            raise BadInputError(f"--readout {','.join(config.readout)} is trained by the linear probe, which this "
                                "profile does not run (unlabelled data, or --metrics without linear): drop --readout")
        readouts = plan_readouts(config.readout, store=store, poolings=poolings, memory_budget=config.memory_budget)
    if log and config.metrics is None and metrics == LABEL_FREE:
        log(f"the data has no labels: running the label-free metrics only ({', '.join(LABEL_FREE)})")
    plan = plan_splits(store, val_fraction=config.val_fraction, seed=config.seed)
    if "knn" in metrics:
        check_knn_fits(config.preset, plan)
    views = StoreViews(store, plan)
    rows: list[tuple[int, str, str, MetricRow]] = []
    blocks, points = store.blocks, store.points
    # Under torchrun every rank runs the k-NN calls, each searching its shard of the bank (merged top-k lists);
    # the other metrics run on rank 0 alone: the probe is memory-bandwidth bound on one GPU and its heads are
    # tiny, so data-parallel would add an all-reduce per step for no gain at this size.
    from .knn import default_process_group

    knn_group = default_process_group() if current_ranks().distributed else None
    if knn_group is not None and not current_ranks().is_main:
        metrics = tuple(m for m in metrics if m == "knn")
    context = Context(store=store, views=views, plan=plan, config=config, device=resolve_device(config.device),
                      predictions=predictions, knn_group=knn_group, readouts=readouts,
                      eval_subset=_seeded_subset(len(plan.eval_index), config.eval_samples, seed=config.seed),
                      labelfree_subset=seeded_subset(len(views.labels("train")), size=_labelfree_size(config, plan, labelled=store.labelled),
                                                     seed=config.seed) if set(metrics) & set(LABEL_FREE) else None)
    families = [FAMILIES[name] for name in metrics]
    if context.labelfree_subset is not None:
        too_few = [f.name for f in families if f.label_free and context.labelfree_subset.size < f.min_rows]
        if too_few and log:
            log(f"{', '.join(too_few)}: skipped, the train split has {context.labelfree_subset.size} rows (they "
                f"need at least {max(FAMILIES[name].min_rows for name in too_few)})")
        families = [f for f in families if f.name not in too_few]

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    # One bar per metric on stderr (plain lines when it is not a terminal), as extract's; each shows the seconds
    # spent in its own metric: the metrics take turns block by block, so a wall clock per bar would count the
    # others' time too.
    with progress_display(lambda console: Progress(
            TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[seconds]:>8.1f} s in this metric"), console=console, disable=not progress),
            enabled=progress) as bar:
        tasks = {f.name: bar.add_task(f.name, total=len(blocks) * len(poolings) * len(points), seconds=0.0)
                 for f in families}
        spent = dict.fromkeys(tasks, 0.0)

        def run(family, at: Context, pooling: str, where) -> None:
            started = time.perf_counter()
            rows.extend((block, at.point, pooling, row) for block, row in family.compute(at, pooling, where))
            spent[family.name] += time.perf_counter() - started
            bar.update(tasks[family.name], advance=len(where) if isinstance(where, list) else 1,
                       seconds=round(spent[family.name], 1))

        for point in points:  # each point of the blocks is measured as the blocks' outputs are
            at = replace(context, views=views.at(point), point=point)
            for pooling in poolings:
                for block in blocks:
                    at.views.check_finite(block, pooling)  # the one read of each block for NaN/Inf
                    for family in families:
                        if family.scope == "block":
                            run(family, at, pooling, block)
                for family in families:
                    if family.scope == "pooling":
                        run(family, at, pooling, list(blocks))
    manifest = store.manifest
    identity = {"model": manifest["model"]["name"],
                "checkpoint": manifest["model"].get("checkpoint") or manifest["model"]["weights"],
                "dataset": manifest["dataset"]["name"]}
    records = [{**identity, "split": row.split, "block": block, "point": point, "pooling": pooling,
                "metric": row.metric, "params": row.params_json(), "value": float(row.value), "seed": row.seed}
               for block, point, pooling, row in rows]
    table = pd.DataFrame.from_records(records, columns=COLUMNS)
    table["seed"] = table["seed"].astype("Int64")
    return table


class StoreViews:
    """The reading layer of `profile_store`: which rows of which store split each metric sees, read lazily.

    Row sets (`SplitPlan`): ``train`` (every valid train row: rank, leave-one-out k-NN), ``bank`` (the k-NN bank
    and the probes' training rows), ``eval`` (the evaluation rows), ``fit`` and ``val`` (the carved validation
    split and the rest of the bank). `rows` returns the store's memory map itself or a lazy `RowSubset` of it,
    never a copy of a split: the metrics read them chunk by chunk under the memory budget. Rows of images the
    store skipped (label -1) are left out, as `FeatureStore.features` would. A view reads one point of the blocks
    (``point``; `at` gives the same rows of another point).
    """

    def __init__(self, store: FeatureStore, plan: SplitPlan, point: str = "block"):
        self.store, self.plan, self.point = store, plan, point
        valid = {split: np.flatnonzero(store.valid_mask(split)) for split in {"train", plan.eval_source}}
        labels = {split: store.labels(split) for split in valid}
        index = {"train": np.arange(len(labels["train"])), "bank": plan.train_index, "eval": plan.eval_index,
                 "fit": plan.fit_index, "val": plan.val_index}
        self._source = {"train": "train", "bank": "train", "eval": plan.eval_source, "fit": "train", "val": "train"}
        self._positions = index
        self._store_rows = {name: valid[self._source[name]][rows] for name, rows in index.items()}
        self._labels = {name: labels[self._source[name]][rows] for name, rows in index.items()}

    def at(self, point: str) -> "StoreViews":
        """The same row sets, reading the point ``point`` of the blocks."""
        view = copy.copy(self)
        view.point = point
        return view

    def labels(self, name: str) -> np.ndarray:
        """(m,) labels of row set ``name``."""
        return self._labels[name]

    def positions(self, name: str) -> np.ndarray:
        """(m,) indices of row set ``name`` among its split's valid rows (as the table's predictions record)."""
        return self._positions[name]

    def rows(self, name: str, block: int, pooling: str) -> np.ndarray:
        """(m, d) features of row set ``name``: the memory map, or a lazy `RowSubset` of it."""
        from ._block_rows import lazy_rows

        source = self.store.features(self._source[name], block, pooling, point=self.point, valid_only=False)
        return lazy_rows(source, self._store_rows[name])

    def sample(self, name: str, subset: np.ndarray, block: int, pooling: str) -> np.ndarray:
        """(len(subset), d) float32 copy of the rows at positions ``subset`` of row set ``name``."""
        return np.asarray(self.rows(name, block, pooling)[subset], dtype=np.float32)

    def check_finite(self, block: int, pooling: str) -> None:
        """Fail with a one-line message on NaN/Inf in the block's train or evaluation rows: the one read of each
        block for it (the metrics are told the rows are checked)."""
        for split in dict.fromkeys(("train", self.plan.eval_source)):
            where = f"block {block}" + (f" point {self.point}" if self.point != "block" else "")
            check_finite(self.rows("train" if split == "train" else "eval", block, pooling),
                         what=f"{where} ({pooling}) of split {split}")


def _labelfree_size(config: ProfileConfig, plan: SplitPlan, *, labelled: bool) -> int | None:
    """Rows of the label-free subset: ``labelfree_samples``, and on labelled data no more than k-NN's evaluation
    queries (but at least `LABELFREE_FLOOR`). The label-free searches compare the subset with itself (n^2 pairs), k-NN
    the bank with the queries (bank x queries), so a subset no larger than the queries keeps each of them cheaper
    than the k-NN search of the same store."""
    size = config.labelfree_samples
    if size is None or not labelled:
        return size
    return min(size, max(len(plan.eval_index), LABELFREE_FLOOR))


def _seeded_subset(n: int, size: int | None, *, seed: int) -> np.ndarray:
    """Sorted positions of a seeded random subset of ``size`` of ``n`` rows (every row when ``size`` >= n)."""
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


@dataclass
class ProfileResult:
    table: pd.DataFrame
    best: pd.DataFrame
    out: Path
    store: FeatureStore
    files: dict[str, str]
    seconds: float
    predictions: SamplePredictions | None = None
    rank: int = 0                               # under torchrun, ranks other than 0 write nothing
    calibration: pd.DataFrame | None = None     # label-free vs labelled curves (`calibrate_profile`)

    def summary(self) -> dict[str, Any]:
        return {"out": str(self.out), "store": str(self.store.path), "store_key": self.store.key,
                "rows": len(self.table), "files": self.files, "seconds": round(self.seconds, 2),
                "best_blocks": json.loads(self.best.to_json(orient="records"))}  # NaN -> null


def measure_store(store: FeatureStore, *, out: str | Path, config: ProfileConfig | None = None,
                  progress: bool = True, log: Callable[[str], None] | None = None,
                  started: float | None = None) -> ProfileResult:
    """Measure every block of a complete store and write profile.{csv,parquet,json,png} and predictions.npz
    (`SamplePredictions`) to ``out``. Under torchrun every rank measures (k-NN sharded) and rank 0 writes.

    Args:
        store: The feature store.
        out: Output folder of the profile files.
        config: Metric options.
        started: `time.perf_counter` at the start of the whole profile (extraction included), for its seconds.
    """
    from .plot import plot_profile

    config = config or ProfileConfig()
    out = Path(out)
    started = time.perf_counter() if started is None else started
    ranks = current_ranks()
    if not ranks.is_main:
        progress, log = False, None
    predictions = SamplePredictions()
    table = profile_store(store, config, progress=progress, log=log, predictions=predictions)
    if not ranks.is_main:  # its k-NN rows only; rank 0 has the whole table and writes the files
        return ProfileResult(table=table, best=pd.DataFrame(), out=out, store=store, files={},
                             seconds=time.perf_counter() - started, predictions=predictions, rank=ranks.rank)
    claim_folder(out, occupied=None, overwrite=False)  # only now: every check has passed (a profile is rewritten)
    best = best_blocks_by_point(table, config.preset, predictions=predictions)
    calibration = calibrate_by_point(table, preset=config.preset, predictions=predictions, seed=config.seed)
    files = {"csv": str(out / "profile.csv"), "parquet": str(out / "profile.parquet"),
             "json": str(out / "profile.json"), "png": str(out / "profile.png"),
             "predictions": str(out / PREDICTIONS_FILE)}
    if not calibration.empty:
        files["calibration"] = str(out / "calibration.csv")
        calibration.to_csv(files["calibration"], index=False)
    table.to_csv(files["csv"], index=False)
    table.to_parquet(files["parquet"], index=False)
    predictions.save(files["predictions"])
    plot_profile(table, headlines(config.preset, table), best, title=_title(store), path=Path(files["png"]),
                 predictions=predictions, num_classes=len(store.classes) if store.labelled else None)
    seconds = time.perf_counter() - started
    payload = {
        "config": asdict(config), "store": str(store.path), "store_key": store.key,
        "model": store.manifest["model"], "dataset": {k: v for k, v in store.manifest["dataset"].items()
                                                      if k != "classes"},
        "classes": store.classes, "blocks": store.blocks, "poolings": list(config.poolings or store.poolings),
        "points": store.points,
        "columns": COLUMNS, "best_blocks": json.loads(best.to_json(orient="records")),  # NaN -> null
        # label-free vs labelled: each label-free curve against k-NN and linear top-1 (`calibrate_profile`)
        "calibration": json.loads(calibration.to_json(orient="records")),
        "versions": software_versions(), "seconds": round(seconds, 2),
    }
    Path(files["json"]).write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return ProfileResult(table=table, best=best, out=out, store=store, files=files, seconds=seconds,
                         predictions=predictions, calibration=calibration)




def _title(store: FeatureStore) -> str:
    model = store.manifest["model"]
    weights = Path(model["checkpoint"]).name if model.get("checkpoint") else model["weights"]
    return f"{model['name']} ({weights}) on {Path(store.manifest['dataset']['name']).name}"


def iter_best_lines(best: pd.DataFrame) -> Iterable[str]:
    """One console line per best block: accuracies in percent with 1 decimal (as the report), their interval, and
    the blocks not distinguishable from the best."""
    for record in best.to_dict(orient="records"):
        percent = record.get("unit", "fraction") == "fraction"  # the registry's unit of the curve's metric
        shown = (lambda v: f"{100 * v:.1f} %") if percent else (lambda v: f"{v:.3g}")
        point = record.get("point") or "block"
        where = f"block {record['best_block']:>2}" + (f" {point}" if point != "block" else "")
        text = f"{record['metric']:<48} {record['pooling']:<9} {where}  {shown(record['best_value'])}"
        low, high = record.get("best_low"), record.get("best_high")
        if low is not None and high is not None and np.isfinite(low) and np.isfinite(high):
            how = (f"95 % CI, n={record['n']}" if record.get("interval") == "wilson" else "± 1 s.d. over seeds")
            text += f" [{shown(low)}, {shown(high)}; {how}]"
        tied = str(record.get("tied_blocks") or "")
        if "," in tied:
            text += f"  not distinguishable: blocks {tied}"
        yield text + f"  (last block {record['last_block']}: {shown(record['last_value'])})"
