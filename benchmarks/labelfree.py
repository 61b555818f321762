"""Benchmark: all label-free block metrics together against the k-NN metric, on the same features (issue 21, point 4).

Run from the repository root::

    python benchmarks/labelfree.py --no-report     # print the section instead of writing reports/benchmarks.md
    python benchmarks/labelfree.py --help

Features: ``--blocks`` blocks of seeded synthetic features shaped like a ViT's (``--n-train`` train rows and
``--n-test`` test rows of width ``--width``, ``--classes`` classes): per block, class means whose strength grows with
depth, plus Gaussian noise with a power-law (i^-1) covariance spectrum, in a random basis, plus a common offset.

Timed, once each (one run, as the issue asks; the machine's load over the run is printed beside the numbers):

- k-NN: what the profile runs per block, `mimprobe.metrics.knn.evaluate_knn_with_hits` with the ``mim-refiner``
  preset on train -> test and on fit -> val (the profile's 10 % validation carve);
- label-free, on the train rows (the subset is every train row, ``--subset`` to change): TwoNN ID, the covariance
  spectrum once for alpha-ReQ and NESum, RankMe, dataset entropy, the block's neighbour lists (k = 30) and the
  overlap with the previous block, cluster learnability (k-means with floor(sqrt(n)) clusters, 1-NN on a 50/50
  split).

The goal of issue 21 is label-free total <= 2x the k-NN total.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from mimprobe._threads import cpu_threads

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_REPORT, CpuMonitor, log, machine_info, machine_line, publish  # noqa: E402

SECTION = "labelfree"
RATIO_GOAL = 2.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--n-train", type=int, default=5_000, help="train rows per block")
    parser.add_argument("--n-test", type=int, default=1_000, help="test rows per block (k-NN queries)")
    parser.add_argument("--width", type=int, default=192, help="feature width (ViT-Ti)")
    parser.add_argument("--blocks", type=int, default=12, help="number of blocks")
    parser.add_argument("--classes", type=int, default=10, help="number of classes")
    parser.add_argument("--subset", type=int, default=None, help="label-free subset size (default: every train row)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads of FAISS, BLAS and torch for both sides (mimprobe._threads.cpu_threads); "
                             "1 by default: on a loaded 2-core machine more threads wait for each other (issue 12)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the features and of the metrics")
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT, help="the report whose section is rewritten")
    parser.add_argument("--no-report", action="store_true", help="print the section instead of writing the report")
    return parser.parse_args(argv)


def synthetic_blocks(args: argparse.Namespace) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]:
    """Per block (train, test) float32 features, and the train and test labels."""
    rng = np.random.default_rng(args.seed)
    n = args.n_train + args.n_test
    labels = rng.integers(0, args.classes, n)
    scales = np.arange(1, args.width + 1) ** -0.5
    train, test = [], []
    for block in range(args.blocks):
        strength = 0.3 + 2.0 * block / max(1, args.blocks - 1)
        means = rng.standard_normal((args.classes, args.width)) * strength * scales
        rotation, _ = np.linalg.qr(rng.standard_normal((args.width, args.width)))
        x = ((rng.standard_normal((n, args.width)) * scales + means[labels]) @ rotation + 0.5).astype(np.float32)
        train.append(x[:args.n_train])
        test.append(x[args.n_train:])
    return train, test, labels[:args.n_train], labels[args.n_train:]


def time_knn(train, test, y_train, y_test, args) -> tuple[float, dict]:
    from mimprobe.metrics import knn
    from mimprobe.metrics._rows import carve_validation

    classes = [str(c) for c in range(args.classes)]
    fit, val = carve_validation(y_train, seed=args.seed)
    start = time.perf_counter()
    top1 = []
    for block, (x, q) in enumerate(zip(train, test)):
        rows, _ = knn.evaluate_knn_with_hits(x, y_train, q, y_test, preset="mim-refiner", split="test",
                                             class_names=classes, threads=args.threads, name=f"block {block}")
        knn.evaluate_knn_with_hits(x[fit], y_train[fit], x[val], y_train[val], preset="mim-refiner", split="val",
                                   class_names=classes, threads=args.threads, name=f"block {block}")
        top1.append(next(r.value for r in rows if r.metric == "knn_top1"))
    return time.perf_counter() - start, {"knn_top1": top1}


def time_label_free(train, args) -> tuple[float, dict[str, float], dict]:
    from mimprobe.metrics import labelfree as lf
    from mimprobe.metrics.rank import effective_rank

    subset = lf.seeded_subset(len(train[0]), size=args.subset, seed=args.seed)
    spent: dict[str, float] = defaultdict(float)
    curves: dict[str, list[float]] = defaultdict(list)
    previous = None
    start = time.perf_counter()
    for block, features in enumerate(train):
        x = subset.take(features)
        name = f"block {block}"
        clock = time.perf_counter()

        def charge(metric: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            spent[metric] += now - clock
            clock = now

        curves["twonn_id"].append(lf.twonn_dimension(x, name=name).value)
        charge("twonn_id")
        spectrum = lf.covariance_eigenvalues(x, name=name)
        curves["alpha_req"].append(lf.alpha_req_from_spectrum(spectrum).value)
        curves["nesum"].append(lf.nesum_from_spectrum(spectrum).value)
        charge("alpha_req+nesum")
        curves["rankme"].append(effective_rank(x, name=name))
        charge("rankme")
        curves["dataset_entropy"].append(lf.dataset_entropy(x, name=name).value)
        charge("dataset_entropy")
        neighbours = lf.block_neighbours(x, threads=args.threads, name=name)
        if previous is not None:
            curves["neighbourhood_overlap"].append(lf.overlap_of_neighbours(previous, neighbours).value)
        previous = neighbours
        charge("neighbourhood_overlap")
        curves["cluster_learnability"].append(
            lf.cluster_learnability(x, seed=args.seed, threads=args.threads, name=name).value)
        charge("cluster_learnability")
    return time.perf_counter() - start, dict(spent), dict(curves)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = machine_info()
    log(f"{args.blocks} blocks of {args.n_train} + {args.n_test} rows x {args.width}")
    train, test, y_train, y_test = synthetic_blocks(args)
    monitor = CpuMonitor()
    with cpu_threads(args.threads):
        log("k-NN (mim-refiner preset: test and val) on every block")
        knn_seconds, knn_curves = time_knn(train, test, y_train, y_test, args)
        log(f"k-NN: {knn_seconds:.2f} s; label-free metrics on every block")
        free_seconds, per_metric, curves = time_label_free(train, args)
    load = monitor.stop()
    ratio = free_seconds / knn_seconds
    log(f"label-free: {free_seconds:.2f} s, ratio {ratio:.2f}")

    lines = ["## Label-free metrics vs k-NN (`benchmarks/labelfree.py`)", "",
             f"Machine: {machine_line(info)}.", "",
             f"{args.blocks} blocks of synthetic features, {args.n_train} train + {args.n_test} test rows x "
             f"{args.width}, {args.classes} classes; label-free on {args.subset or args.n_train} train rows; "
             f"{args.threads} CPU thread(s); one run.", "",
             "| what | seconds (all blocks) |", "|---|---:|",
             f"| k-NN, mim-refiner preset, test + val | {knn_seconds:.2f} |"]
    lines += [f"| {metric} | {seconds:.2f} |" for metric, seconds in per_metric.items()]
    lines += [f"| **label-free total** | **{free_seconds:.2f}** |", "",
              f"Ratio label-free / k-NN: **{ratio:.2f}** (goal <= {RATIO_GOAL:g}: "
              f"{'met' if ratio <= RATIO_GOAL else 'NOT met'}).", "",
              f"Load during the run: other processes used {100 * (load['other_share'] or 0):.0f} % of the machine, "
              f"1-min load average {load['loadavg_1min']:.2f} on {os.cpu_count()} CPUs."]
    raw = {"args": vars(args) | {"report": str(args.report)}, "machine": info, "load": load,
           "knn_seconds": knn_seconds, "label_free_seconds": free_seconds, "per_metric_seconds": per_metric,
           "ratio": ratio, "curves": curves | knn_curves}
    publish(SECTION, "\n".join(lines), raw, report=args.report, no_report=args.no_report,
            total_seconds=load["wall_s"])


if __name__ == "__main__":
    main()
