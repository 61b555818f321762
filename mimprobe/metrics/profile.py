"""`profile`: every metric for every block and pooling of a FeatureStore, as one long table, plus the best blocks.

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

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._device import resolve_device
from .._messages import progress_display
from .._ranks import current as current_ranks
from .._ranks import join as join_ranks
from .._versions import software_versions
from ..errors import BadInputError
from ..features.store import FeatureStore
from ._rows import MetricRow, carve_validation
from .headlines import best_blocks, headlines

METRICS = ("knn", "linear", "lowshot", "cluster", "rank")
LABEL_FREE = ("rank",)
PRESETS = ("mim-refiner", "dino", "dinov2")
COLUMNS = ["model", "checkpoint", "dataset", "split", "block", "pooling", "metric", "params", "value", "seed"]
HOLDOUT_FRACTION = 0.2
PREDICTIONS_FILE = "predictions.npz"
PREDICTIONS_FORMAT = 1


@dataclass(frozen=True)
class ProfileConfig:
    """Options of one profile."""

    metrics: tuple[str, ...] | None = None   # None: every metric the data allows (label-free only without labels)
    preset: str = "mim-refiner"              # k-NN protocol (k, temperature, standardisation), recorded per row
    probe: str = "batched"                   # "batched": all blocks x grid at once; "sklearn": reference path
    poolings: tuple[str, ...] | None = None  # None: every pooling in the store
    val_fraction: float = 0.1                # of train, for k-NN on val and the probes' selection
    seed: int = 0
    threads: int | None = None               # FAISS / BLAS threads (None: library default)
    device: str = "auto"                     # k-NN (cuda: torch search) and the batched linear probe
    # Bytes of feature rows any metric holds at once (k-NN bank/query chunks, the probe's rows): the store's
    # memory maps are read chunk by chunk, so RSS does not grow with the number of rows. 2 GiB holds, e.g.,
    # 60,000 rows of 24 ViT-L blocks (1024 wide, float32) for the probe; None: every split read into memory.
    memory_budget: int | None = 2 * 1024 ** 3
    rank_samples: int = 20000                # rows used for the effective rank (seeded subsample)
    # Evaluation rows for low-shot and clustering (seeded subsample when the split is larger; None: all). Their
    # fits read only the rows they choose from train (n shots or 1 % per class).
    eval_samples: int | None = 50000

    def __post_init__(self) -> None:
        for name in ("memory_budget", "rank_samples", "eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise BadInputError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


@dataclass
class SamplePredictions:
    """Per-sample top-1 correctness of accuracy rows of the table, grouped by the table's split.

    For a split (``"test"``, ``"val"``, ``"train-loo"``, ...): ``sources[split]`` is the store split its rows come
    from, ``rows[split]`` the (n,) int64 indices of those rows in it (valid rows, as `FeatureStore.features`
    returns them), and ``hits[split][(metric, block, pooling, params)]`` one (n,) bool vector per table row, whose
    mean is that row's ``value`` (``params`` is the row's canonical JSON).

    Saved as ``predictions.npz``: ``format_version``, and per split ``source__SPLIT`` (str), ``rows__SPLIT``
    (n,) int64, ``keys__SPLIT`` (m,) str (JSON ``[metric, block, pooling, params]``), ``hits__SPLIT`` (m, n) bool.
    """

    sources: dict[str, str] = field(default_factory=dict)
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    hits: dict[str, dict[tuple[str, int, str, str], np.ndarray]] = field(default_factory=dict)

    def add(self, *, split: str, source: str, rows: np.ndarray, metric: str, block: int, pooling: str,
            params: str, hits: np.ndarray) -> None:
        """Record one table row's (n,) correctness over the evaluation ``rows`` of store split ``source``."""
        rows, hits = np.asarray(rows, dtype=np.int64), np.asarray(hits, dtype=bool)
        if hits.shape != rows.shape:
            raise ValueError(f"{metric} block {block}: {hits.shape} hits for {rows.shape} rows")
        if split in self.rows and (self.sources[split] != source or not np.array_equal(self.rows[split], rows)):
            raise ValueError(f"split {split!r} was recorded with other evaluation rows")
        self.sources[split], self.rows[split] = source, rows
        self.hits.setdefault(split, {})[(metric, int(block), pooling, params)] = hits

    def get(self, *, metric: str, split: str, block: int, pooling: str, params: str) -> np.ndarray | None:
        """The (n,) correctness of one table row, or None when it was not recorded."""
        return self.hits.get(split, {}).get((metric, int(block), pooling, params))

    def save(self, path: str | Path) -> None:
        arrays: dict[str, np.ndarray] = {"format_version": np.array(PREDICTIONS_FORMAT)}
        for split, entries in self.hits.items():
            keys = list(entries)
            arrays[f"source__{split}"] = np.array(self.sources[split])
            arrays[f"rows__{split}"] = self.rows[split]
            arrays[f"keys__{split}"] = np.array([json.dumps(list(key)) for key in keys], dtype=str)
            arrays[f"hits__{split}"] = (np.stack([entries[key] for key in keys]) if keys
                                        else np.zeros((0, len(self.rows[split])), bool))
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "SamplePredictions":
        """Read ``predictions.npz`` back.

        Raises:
            BadInputError: Not a predictions file of this format.
        """
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError) as error:
            raise BadInputError(f"{path} is not a readable predictions file ({error}): re-run `mimprobe profile`") \
                from None
        if int(arrays.get("format_version", -1)) != PREDICTIONS_FORMAT:
            raise BadInputError(f"{path}: predictions format {arrays.get('format_version')} is not "
                                f"{PREDICTIONS_FORMAT}; re-run `mimprobe profile` with this version")
        loaded = cls()
        for name in arrays:
            if not name.startswith("keys__"):
                continue
            split = name[len("keys__"):]
            loaded.sources[split] = str(arrays[f"source__{split}"])
            loaded.rows[split] = arrays[f"rows__{split}"].astype(np.int64)
            keys = [tuple(json.loads(str(key))) for key in arrays[name]]
            loaded.hits[split] = {(str(m), int(b), str(p), str(q)): hits
                                  for (m, b, p, q), hits in zip(keys, arrays[f"hits__{split}"])}
        return loaded


@dataclass
class SplitPlan:
    train: str
    eval_split: str                           # name written in the table
    train_index: np.ndarray                   # rows of train used as the bank / training set
    eval_source: str                          # store split the evaluation rows come from
    eval_index: np.ndarray
    fit_index: np.ndarray                     # train rows for the fit → val k-NN
    val_index: np.ndarray
    knn_loo: bool                             # k-NN on train with leave-one-out instead of an eval split


def plan_splits(store: FeatureStore, *, val_fraction: float, seed: int) -> SplitPlan:
    """Decide which rows train, validate and evaluate (see the module docstring)."""
    if "train" not in store.splits:
        raise BadInputError(f"store {store.path} has no train split (it has {', '.join(store.splits)})")
    eval_split = next((name for name in ("test", "val") if name in store.splits), None)
    return plan_from_labels(store.labels("train"), labelled=store.labelled, eval_split=eval_split,
                            n_eval=len(store.labels(eval_split)) if eval_split else 0, val_fraction=val_fraction,
                            seed=seed)


def plan_from_labels(labels: np.ndarray, *, labelled: bool, eval_split: str | None, n_eval: int,
                     val_fraction: float, seed: int) -> SplitPlan:
    """`plan_splits` from the (n,) train labels and the evaluation split's name and size."""
    labelled = labelled and (labels >= 0).any()
    fit, val = carve_validation(labels, fraction=val_fraction, seed=seed) if labelled else (np.arange(len(labels)),) * 2
    if eval_split is not None:
        return SplitPlan("train", eval_split, np.arange(len(labels)), eval_split, np.arange(n_eval), fit, val,
                         knn_loo=False)
    train_index, holdout = (carve_validation(labels, fraction=HOLDOUT_FRACTION, seed=seed) if labelled
                            else (np.arange(len(labels)),) * 2)
    if labelled:  # the validation split is carved from the rows outside the hold-out, as the probes carve theirs
        fit, val = (train_index[part] for part in carve_validation(labels[train_index], fraction=val_fraction,
                                                                   seed=seed))
    return SplitPlan("train", "train-holdout", train_index, "train", holdout, fit, val, knn_loo=True)


def check_knn_fits(preset: str, plan: SplitPlan) -> None:
    """Refuse a k-NN preset whose largest k exceeds the smallest neighbour bank of the plan, naming the presets
    and options that would fit (before anything is extracted or measured).

    Raises:
        BadInputError: The preset's largest k is larger than a bank.
    """
    from .knn import PRESETS as KNN_PRESETS, get_preset

    banks = [(f"the fit part of train for k-NN on val ({len(plan.fit_index)} images)", len(plan.fit_index))]
    if plan.knn_loo:
        banks.append((f"train, one left out per query ({len(plan.train_index) - 1} images)", len(plan.train_index) - 1))
    else:
        banks.append((f"train ({len(plan.train_index)} images)", len(plan.train_index)))
    where, smallest = min(banks, key=lambda bank: bank[1])
    k = max(get_preset(preset).ks)
    if k <= smallest:
        return
    fits = [f"{name} (k={max(p.ks)})" for name, p in KNN_PRESETS.items() if max(p.ks) <= smallest]
    choices = (f"--preset {' or '.join(fits)}, " if fits else "") + "more train images, or --metrics without knn"
    raise BadInputError(f"k-NN preset {preset} needs k={k} neighbours but the smallest bank is {where}: use {choices}")


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
    """Measure every block and pooling of a complete store; return the long table (DESIGN.md columns).

    Args:
        predictions: When given, receives the per-sample correctness of every ``knn_top1`` and ``linear_top1``
            row (see `SamplePredictions`).
    """
    from . import cluster, knn, linear, lowshot, rank

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
    if log and config.metrics is None and metrics == LABEL_FREE:
        log("the data has no labels: running the label-free metrics only (rank)")
    plan = plan_splits(store, val_fraction=config.val_fraction, seed=config.seed)
    if "knn" in metrics:
        check_knn_fits(config.preset, plan)
    views = StoreViews(store, plan)
    rows: list[tuple[int, str, MetricRow]] = []
    blocks = store.blocks
    device = resolve_device(config.device)
    knn_device = {"device": device} if str(device).startswith("cuda") else {}
    # Under torchrun every rank runs the k-NN calls, each searching its shard of the bank (merged top-k lists);
    # the linear probe, low-shot, clustering and rank run on rank 0 alone: the probe is memory-bandwidth bound on
    # one GPU and its heads are tiny, so data-parallel would add an all-reduce per step for no gain at this size.
    knn_group = knn.default_process_group() if current_ranks().distributed else None
    if knn_group is not None and not current_ranks().is_main:
        metrics = tuple(m for m in metrics if m == "knn")
    eval_subset = _seeded_subset(len(plan.eval_index), config.eval_samples, seed=config.seed)
    steps = {m: len(blocks) * len(poolings) for m in metrics}

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    # One bar per metric on stderr (plain lines when it is not a terminal), as extract's; each shows the seconds
    # spent in its own metric: the metrics take turns block by block, so a wall clock per bar would count the
    # others' time too.
    with progress_display(lambda console: Progress(
            TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[seconds]:>8.1f} s in this metric"), console=console, disable=not progress),
            enabled=progress) as bar:
        tasks = {m: bar.add_task(m, total=steps[m], seconds=0.0) for m in metrics}
        spent = dict.fromkeys(metrics, 0.0)
        clock = [time.perf_counter()]

        def advance(metric: str, count: int = 1) -> None:
            """Charge the time since the last metric finished to ``metric`` and move its bar."""
            now = time.perf_counter()
            spent[metric] += now - clock[0]
            clock[0] = now
            bar.update(tasks[metric], advance=count, seconds=round(spent[metric], 1))

        for pooling in poolings:
            for block in blocks:
                views.check_finite(block, pooling)
                clock[0] = time.perf_counter()
                name = f"block {block} ({pooling})"
                if "knn" in metrics:
                    common = dict(preset=config.preset, class_names=store.classes, threads=config.threads,
                                  memory_budget=config.memory_budget, name=name, process_group=knn_group,
                                  **knn_device)
                    if plan.knn_loo:
                        found, hits = knn.evaluate_knn_with_hits(
                            views.rows("train", block, pooling), views.labels("train"),
                            views.rows("train", block, pooling), views.labels("train"), split="train-loo",
                            exclude_self=True, **common)
                        _record_knn(predictions, found, hits, source="train", rows=views.positions("train"),
                                    block=block, pooling=pooling)
                    else:
                        found, hits = knn.evaluate_knn_with_hits(
                            views.rows("bank", block, pooling), views.labels("bank"),
                            views.rows("eval", block, pooling), views.labels("eval"), split=plan.eval_split,
                            **common)
                        _record_knn(predictions, found, hits, source=plan.eval_source, rows=plan.eval_index,
                                    block=block, pooling=pooling)
                    val_found, val_hits = knn.evaluate_knn_with_hits(
                        views.rows("fit", block, pooling), views.labels("fit"), views.rows("val", block, pooling),
                        views.labels("val"), split="val", **common)
                    _record_knn(predictions, val_found, val_hits, source="train", rows=plan.val_index, block=block,
                                pooling=pooling)
                    rows += [(block, pooling, row) for row in found + val_found]
                    advance("knn")
                if "lowshot" in metrics:
                    y_bank = views.labels("bank")
                    largest = int(np.bincount(y_bank[y_bank >= 0]).max())
                    shots = tuple(n for n in lowshot.DEFAULT_SHOTS if n <= largest)  # tiny data: fewer settings
                    found = lowshot.evaluate_lowshot(views.rows("bank", block, pooling), y_bank,
                                                     views.sample("eval", eval_subset, block, pooling),
                                                     views.labels("eval")[eval_subset], shots=shots,
                                                     split=plan.eval_split, name=name)
                    rows += [(block, pooling, _with_sample(row, "eval_samples", eval_subset, plan.eval_index))
                             for row in found]
                    advance("lowshot")
                if "cluster" in metrics:
                    found = cluster.evaluate_clustering(views.sample("eval", eval_subset, block, pooling),
                                                        views.labels("eval")[eval_subset], split=plan.eval_split,
                                                        seed=config.seed, name=name)
                    rows += [(block, pooling, _with_sample(row, "eval_samples", eval_subset, plan.eval_index))
                             for row in found]
                    advance("cluster")
                if "rank" in metrics:
                    found = rank.evaluate_rank(views.rows("train", block, pooling), split="train",
                                               max_samples=config.rank_samples, seed=config.seed, name=name)
                    rows += [(block, pooling, row) for row in found]
                    advance("rank")
            if "linear" in metrics:
                clock[0] = time.perf_counter()
                train_blocks = {block: views.rows("bank", block, pooling) for block in blocks}
                eval_blocks = {block: views.rows("eval", block, pooling) for block in blocks}
                if config.probe == "batched":
                    found_by_block, hits_by_block = linear.evaluate_linear_with_hits(
                        train_blocks, views.labels("bank"), eval_blocks, views.labels("eval"), split=plan.eval_split,
                        seed=config.seed, val_fraction=config.val_fraction, device=device,
                        config=linear.LinearProbeConfig(memory_budget=config.memory_budget))
                else:
                    found_by_block, hits_by_block = linear.evaluate_linear_sklearn_with_hits(
                        train_blocks, views.labels("bank"), eval_blocks, views.labels("eval"), split=plan.eval_split,
                        seed=config.seed, val_fraction=config.val_fraction)
                for block, found in found_by_block.items():
                    rows += [(block, pooling, row) for row in found]
                    if predictions is not None:
                        test_row = next(row for row in found if row.metric == "linear_top1")
                        predictions.add(split=plan.eval_split, source=plan.eval_source, rows=plan.eval_index,
                                        metric="linear_top1", block=block, pooling=pooling,
                                        params=test_row.params_json(), hits=hits_by_block[block])
                advance("linear", len(blocks))
    manifest = store.manifest
    identity = {"model": manifest["model"]["name"],
                "checkpoint": manifest["model"].get("checkpoint") or manifest["model"]["weights"],
                "dataset": manifest["dataset"]["name"]}
    records = [{**identity, "split": row.split, "block": block, "pooling": pooling, "metric": row.metric,
                "params": row.params_json(), "value": float(row.value), "seed": row.seed}
               for block, pooling, row in rows]
    table = pd.DataFrame.from_records(records, columns=COLUMNS)
    table["seed"] = table["seed"].astype("Int64")
    return table


class StoreViews:
    """The reading layer of `profile_store`: which rows of which store split each metric sees, read lazily.

    Row sets (`SplitPlan`): ``train`` (every valid train row: rank, leave-one-out k-NN), ``bank`` (the k-NN bank
    and the probes' training rows), ``eval`` (the evaluation rows), ``fit`` and ``val`` (the carved validation
    split and the rest of the bank). `rows` returns the store's memory map itself or a lazy `RowSubset` of it,
    never a copy of a split: the metrics read them chunk by chunk under the memory budget. Rows of images the
    store skipped (label -1) are left out, as `FeatureStore.features` would.
    """

    def __init__(self, store: FeatureStore, plan: SplitPlan):
        self.store, self.plan = store, plan
        valid = {split: np.flatnonzero(store.valid_mask(split)) for split in {"train", plan.eval_source}}
        labels = {split: store.labels(split) for split in valid}
        index = {"train": np.arange(len(labels["train"])), "bank": plan.train_index, "eval": plan.eval_index,
                 "fit": plan.fit_index, "val": plan.val_index}
        self._source = {"train": "train", "bank": "train", "eval": plan.eval_source, "fit": "train", "val": "train"}
        self._positions = index
        self._store_rows = {name: valid[self._source[name]][rows] for name, rows in index.items()}
        self._labels = {name: labels[self._source[name]][rows] for name, rows in index.items()}

    def labels(self, name: str) -> np.ndarray:
        """(m,) labels of row set ``name``."""
        return self._labels[name]

    def positions(self, name: str) -> np.ndarray:
        """(m,) indices of row set ``name`` among its split's valid rows (as the table's predictions record)."""
        return self._positions[name]

    def rows(self, name: str, block: int, pooling: str) -> np.ndarray:
        """(m, d) features of row set ``name``: the memory map, or a lazy `RowSubset` of it."""
        from ._block_rows import lazy_rows

        source = self.store.features(self._source[name], block, pooling, valid_only=False)
        return lazy_rows(source, self._store_rows[name])

    def sample(self, name: str, subset: np.ndarray, block: int, pooling: str) -> np.ndarray:
        """(len(subset), d) float32 copy of the rows at positions ``subset`` of row set ``name``."""
        return np.asarray(self.rows(name, block, pooling)[subset], dtype=np.float32)

    def check_finite(self, block: int, pooling: str, *, chunk_rows: int = 65536) -> None:
        """Fail with a one-line message on NaN/Inf in the block's train or evaluation rows (read chunk by chunk)."""
        from .knn import _release_pages

        for split in dict.fromkeys(("train", self.plan.eval_source)):
            features = self.rows("train" if split == "train" else "eval", block, pooling)
            for start in range(0, len(features), chunk_rows):
                window = features[start:start + chunk_rows]
                finite = np.isfinite(window).all()
                _release_pages(window)
                if not finite:
                    raise BadInputError(
                        f"block {block} ({pooling}) of split {split} has NaN or Inf features: re-extract with "
                        "--store-dtype float32 (float16 overflows above 65504) or --precision fp32")


def _seeded_subset(n: int, size: int | None, *, seed: int) -> np.ndarray:
    """Sorted positions of a seeded random subset of ``size`` of ``n`` rows (every row when ``size`` >= n)."""
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def _with_sample(row: MetricRow, key: str, subset: np.ndarray, whole: np.ndarray) -> MetricRow:
    """The row with ``params[key]`` = the rows it was measured on, when a subsample (recorded, else absent)."""
    if len(subset) == len(whole):
        return row
    return MetricRow(row.split, row.metric, row.value, {**row.params, key: int(len(subset))}, row.seed)


def _record_knn(predictions: SamplePredictions | None, found: list[MetricRow],
                hits: dict[tuple[int, float], np.ndarray], *, source: str, rows: np.ndarray, block: int,
                pooling: str) -> None:
    """File the top-1 correctness of each ``knn_top1`` row of ``found`` under the row's split and params."""
    if predictions is None:
        return
    for row in found:
        if row.metric == "knn_top1":
            predictions.add(split=row.split, source=source, rows=rows, metric=row.metric, block=block,
                            pooling=pooling, params=row.params_json(), hits=hits[(row.params["k"], row.params["T"])])


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

    def summary(self) -> dict[str, Any]:
        return {"out": str(self.out), "store": str(self.store.path), "store_key": self.store.key,
                "rows": len(self.table), "files": self.files, "seconds": round(self.seconds, 2),
                "best_blocks": json.loads(self.best.to_json(orient="records"))}  # NaN -> null


def open_or_extract(target: str | Path, data: str | None, *, features_dir: Path, checkpoint: str | None = None,
                    pretrained: bool = False, extract_options: dict[str, Any] | None = None, progress: bool = True,
                    log: Callable[[str], None] | None = None) -> FeatureStore:
    """A store directory (checked against ``data`` when given), or extract/reuse one for a model name."""
    target_path = Path(str(target))
    if (target_path / "manifest.json").is_file():
        store = FeatureStore.open(target_path)
        if data is not None:
            from ..data import load_data

            source = load_data(data)
            if source.fingerprint != store.manifest["dataset"]["fingerprint"]:
                if source.details.get("root", source.name) == store.manifest["dataset"]["details"].get(
                        "root", store.manifest["dataset"]["name"]):
                    raise BadInputError(f"{data} changed since store {target_path} was extracted from it (images "
                                        "added, removed, replaced or touched): profile the model name with DATA to "
                                        "extract it again, or drop DATA to use the store as it is")
                raise BadInputError(f"store {target_path} was extracted from {store.manifest['dataset']['name']}, "
                                    f"not from {data}: profile the matching store, or drop DATA to use this one")
        return store
    if target_path.exists() and target_path.is_dir():
        raise BadInputError(f"{target_path} is a folder but not a feature store (no manifest.json): give a store "
                            "from `mimprobe extract`, or a timm model name and DATA")
    if data is None:
        raise BadInputError(f"{target} is not a feature store: give a timm model name and DATA, or a store folder")
    from ..features import extract

    result = extract(str(target), data, out=features_dir, checkpoint=checkpoint, pretrained=pretrained,
                     progress=progress, log=log, **(extract_options or {}))
    return result.store


def run_profile(target: str | Path, data: str | None = None, *, out: str | Path, config: ProfileConfig | None = None,
                features_dir: str | Path | None = None, checkpoint: str | None = None, pretrained: bool = False,
                extract_options: dict[str, Any] | None = None, progress: bool = True,
                log: Callable[[str], None] | None = None) -> ProfileResult:
    """Extract (or reuse) a FeatureStore, measure every block, and write profile.{csv,parquet,json,png} and
    predictions.npz (`SamplePredictions`) to ``out``.

    Args:
        target: A timm model name (with ``data``) or a FeatureStore directory.
        data: Data spec (required with a model name; with a store, checked against the store's fingerprint).
        out: Output folder of the profile files.
        config: Metric options.
        features_dir: Where stores are kept (default ``out/features``).
        extract_options: `ExtractConfig` fields (blocks, poolings, img_size, ...).
    """
    from .plot import plot_profile

    config = config or ProfileConfig()
    out = Path(out)
    if data is not None and not (Path(str(target)) / "manifest.json").is_file() and \
            (config.metrics is None or "knn" in config.metrics):
        from ..data import load_data

        data = load_data(data)  # opened once, here and for the extraction
        eval_split = next((name for name in ("test", "val") if name in data.splits), None)
        if "train" in data.splits and data.labelled:  # k-NN checked before anything is extracted or written
            check_knn_fits(config.preset, plan_from_labels(
                data.splits["train"].labels, labelled=True, eval_split=eval_split,
                n_eval=len(data.splits[eval_split]) if eval_split else 0, val_fraction=config.val_fraction,
                seed=config.seed))
    started = time.perf_counter()
    ranks, _ = join_ranks(resolve_device(config.device))  # torchrun: all ranks extract and search; rank 0 writes
    if not ranks.is_main:
        progress, log = False, None
    store = open_or_extract(target, data, features_dir=Path(features_dir) if features_dir else out / "features",
                            checkpoint=checkpoint, pretrained=pretrained, extract_options=extract_options,
                            progress=progress, log=log)
    predictions = SamplePredictions()
    table = profile_store(store, config, progress=progress, log=log, predictions=predictions)
    if not ranks.is_main:  # its k-NN rows only; rank 0 has the whole table and writes the files
        return ProfileResult(table=table, best=pd.DataFrame(), out=out, store=store, files={},
                             seconds=time.perf_counter() - started, predictions=predictions, rank=ranks.rank)
    try:  # only now: every check has passed
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadInputError(f"cannot write to --out {out}: {error.strerror or error}; choose a writable folder") \
            from None
    best = best_blocks(table, config.preset, predictions=predictions)
    files = {"csv": str(out / "profile.csv"), "parquet": str(out / "profile.parquet"),
             "json": str(out / "profile.json"), "png": str(out / "profile.png"),
             "predictions": str(out / PREDICTIONS_FILE)}
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
        "columns": COLUMNS, "best_blocks": json.loads(best.to_json(orient="records")),  # NaN -> null
        "versions": software_versions(), "seconds": round(seconds, 2),
    }
    Path(files["json"]).write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return ProfileResult(table=table, best=best, out=out, store=store, files=files, seconds=seconds,
                         predictions=predictions)


def _title(store: FeatureStore) -> str:
    model = store.manifest["model"]
    weights = Path(model["checkpoint"]).name if model.get("checkpoint") else model["weights"]
    return f"{model['name']} ({weights}) on {Path(store.manifest['dataset']['name']).name}"


def parse_bytes(text: str | None) -> int | None:
    """``"512M"``, ``"2G"``, ``"1.5GiB"``, ``"1000000"`` -> bytes (binary units); ``"none"`` -> None.

    Raises:
        BadInputError: Not a size.
    """
    if text is None or text.strip().lower() in ("none", "all", ""):
        return None
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not match:
        raise BadInputError(f"--memory-budget {text!r} is not a size: use e.g. 512M, 2G or none")
    value = float(match.group(1)) * 1024 ** " kmgt".index(match.group(2) or " ")
    if value < 1:
        raise BadInputError(f"--memory-budget {text!r} must be at least 1 byte")
    return int(value)


def parse_metrics(text: str | None) -> tuple[str, ...] | None:
    if text is None or text.strip() in ("", "all"):
        return None
    return tuple(part.strip() for part in text.split(",") if part.strip())


def iter_best_lines(best: pd.DataFrame) -> Iterable[str]:
    """One console line per best block: accuracies in percent with 1 decimal (as the report), their interval, and
    the blocks not distinguishable from the best."""
    for record in best.to_dict(orient="records"):
        percent = "top-1" in record["metric"] or "ACC" in record["metric"]  # the accuracy headlines' titles
        shown = (lambda v: f"{100 * v:.1f} %") if percent else (lambda v: f"{v:.3g}")
        text = (f"{record['metric']:<48} {record['pooling']:<9} block {record['best_block']:>2}  "
                f"{shown(record['best_value'])}")
        low, high = record.get("best_low"), record.get("best_high")
        if low is not None and high is not None and np.isfinite(low) and np.isfinite(high):
            how = (f"95 % CI, n={record['n']}" if record.get("interval") == "wilson" else "± 1 s.d. over seeds")
            text += f" [{shown(low)}, {shown(high)}; {how}]"
        tied = str(record.get("tied_blocks") or "")
        if "," in tied:
            text += f"  not distinguishable: blocks {tied}"
        yield text + f"  (last block {record['last_block']}: {shown(record['last_value'])})"
