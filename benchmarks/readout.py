"""Benchmark: the multi-block readouts' linear probes against the per-block probes (issue 20, point 2).

Run from the repository root::

    python benchmarks/readout.py --no-report     # print the section instead of writing reports/benchmarks.md
    python benchmarks/readout.py --help

Features: ``--blocks`` blocks of seeded synthetic features shaped like a ViT's, for the ``cls`` and ``mean``
poolings (``--n-train`` train and ``--n-test`` test rows of width ``--width``, ``--classes`` classes; class means whose
strength grows with depth, power-law noise in a random basis), written as float16 memory maps, as a FeatureStore
holds them, and read from the maps by every probe.

Timed, once each, in one process (one run; the machine's load over the run is printed beside the numbers), all with
`mimprobe.metrics.linear.evaluate_linear_with_hits` and the profile's defaults (9 C values, widened past an edge,
selection on a 10 % validation split, refit on train):

- the per-block probes of one pooling (``cls``: every block, one batched pass);
- each readout alone: DINOv2's ``last1``, ``last4``, ``last1+avg``, ``last4+avg`` and ``all`` (every block's ``cls``
  vector), as `mimprobe.metrics.readout` builds them (lazy concatenations of the maps);
- the per-block probes and every readout in one call, as the profile runs them (``--readout`` with the ``cls``
  pooling's call).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mimprobe._threads import cpu_threads

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_REPORT, CpuMonitor, log, machine_info, machine_line, publish  # noqa: E402

SECTION = "readout"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--n-train", type=int, default=5_000, help="train rows per block")
    parser.add_argument("--n-test", type=int, default=1_000, help="test rows per block")
    parser.add_argument("--width", type=int, default=192, help="feature width (ViT-Ti)")
    parser.add_argument("--blocks", type=int, default=12, help="number of blocks")
    parser.add_argument("--classes", type=int, default=10, help="number of classes")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads of torch and BLAS (mimprobe._threads.cpu_threads); 1 by default: on a "
                             "loaded 2-core machine more threads wait for each other (issue 12)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the features and of the probes")
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT, help="the report whose section is rewritten")
    parser.add_argument("--no-report", action="store_true", help="print the section instead of writing the report")
    return parser.parse_args(argv)


def write_store_like_maps(folder: Path, args: argparse.Namespace) -> tuple[dict, np.ndarray, np.ndarray]:
    """{(split, block, pooling): float16 (n, width) memory map}, and the train and test labels."""
    rng = np.random.default_rng(args.seed)
    n = args.n_train + args.n_test
    labels = rng.integers(0, args.classes, n)
    scales = np.arange(1, args.width + 1) ** -0.5
    maps = {}
    for block in range(args.blocks):
        for pooling in ("cls", "mean"):
            # class signal growing with depth, weak enough that no probe is at 100 %
            strength = (0.02 + 0.12 * block / max(1, args.blocks - 1)) * (0.8 if pooling == "mean" else 1.0)
            means = rng.standard_normal((args.classes, args.width)) * strength * scales
            rotation, _ = np.linalg.qr(rng.standard_normal((args.width, args.width)))
            x = ((rng.standard_normal((n, args.width)) * scales + means[labels]) @ rotation + 0.5)
            for split, rows in (("train", slice(0, args.n_train)), ("test", slice(args.n_train, n))):
                path = folder / f"{split}_{block}_{pooling}.npy"
                np.save(path, x[rows].astype(np.float16))
                maps[(split, block, pooling)] = np.load(path, mmap_mode="r")
    return maps, labels[:args.n_train], labels[args.n_train:]


def timed_probe(train: dict, test: dict, y_train: np.ndarray, y_test: np.ndarray,
                args: argparse.Namespace) -> tuple[float, dict]:
    from mimprobe.metrics.linear import evaluate_linear_with_hits

    start = time.perf_counter()
    rows, _ = evaluate_linear_with_hits(train, y_train, test, y_test, seed=args.seed)
    seconds = time.perf_counter() - start
    return seconds, {str(key): next(r.value for r in found if r.metric == "linear_top1") for key, found in rows.items()}


def main(argv: list[str] | None = None) -> None:
    from mimprobe.metrics.readout import READOUTS, Readout, dinov2_inputs

    args = parse_args(argv)
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="mimprobe-readout-bench-") as folder:
        log(f"{args.blocks} blocks x (cls, mean) of {args.n_train} + {args.n_test} rows x {args.width}, float16 maps")
        maps, y_train, y_test = write_store_like_maps(Path(folder), args)
        readouts = [Readout(name, "cls", dinov2_inputs(name, args.blocks)) for name in READOUTS if name != "all"]
        readouts.append(Readout("all", "cls", tuple((block, "cls") for block in range(args.blocks))))

        def sets(split: str, *, blocks: bool, chosen: list[Readout]) -> dict:
            found = {block: maps[(split, block, "cls")] for block in range(args.blocks)} if blocks else {}
            for readout in chosen:
                found[readout.key] = readout.features(lambda block, pooling: maps[(split, block, pooling)])
            return found

        monitor = CpuMonitor()
        timings: dict[str, float] = {}
        top1: dict[str, float] = {}
        with cpu_threads(args.threads):
            log("per-block probes (cls, every block)")
            timings["per-block"], found = timed_probe(sets("train", blocks=True, chosen=[]),
                                                      sets("test", blocks=True, chosen=[]), y_train, y_test, args)
            top1.update({f"block {key}": value for key, value in found.items()})
            for readout in readouts:
                log(f"readout {readout.name} alone")
                timings[readout.name], found = timed_probe(sets("train", blocks=False, chosen=[readout]),
                                                           sets("test", blocks=False, chosen=[readout]),
                                                           y_train, y_test, args)
                top1.update(found)
            log("per-block probes and every readout in one call (as the profile runs them)")
            timings["together"], _ = timed_probe(sets("train", blocks=True, chosen=readouts),
                                                 sets("test", blocks=True, chosen=readouts), y_train, y_test, args)
        load = monitor.stop()
    widths = {readout.name: args.width * len(readout.inputs) for readout in readouts}
    readout_total = sum(timings[readout.name] for readout in readouts)
    best_block = max((value, key) for key, value in top1.items() if key.startswith("block"))
    lines = ["## Multi-block readouts vs per-block linear probes (`benchmarks/readout.py`)", "",
             f"Machine: {machine_line(info)}.", "",
             f"{args.blocks} blocks of synthetic features (cls and mean poolings, float16 memory maps as in a store), "
             f"{args.n_train} train + {args.n_test} test rows x {args.width}, {args.classes} classes; "
             f"`evaluate_linear_with_hits` with the profile's defaults; {args.threads} CPU thread(s); one run.", "",
             "| what | features | seconds | test top-1 | seconds / per-block probes |", "|---|---:|---:|---:|---:|",
             f"| per-block probes, all {args.blocks} blocks (cls) | {args.width} each | {timings['per-block']:.2f} | "
             f"best block {best_block[1].split()[-1]}: {100 * best_block[0]:.1f} % | 1.00 |"]
    for readout in readouts:
        lines.append(f"| readout {readout.name} alone | {widths[readout.name]} | {timings[readout.name]:.2f} | "
                     f"{100 * top1[readout.key]:.1f} % | {timings[readout.name] / timings['per-block']:.2f} |")
    lines += [f"| **every readout, each alone** | | **{readout_total:.2f}** | | "
              f"**{readout_total / timings['per-block']:.2f}** |",
              f"| per-block probes + every readout in one call (the profile's way) | | {timings['together']:.2f} | | "
              f"{timings['together'] / timings['per-block']:.2f} |", "",
              f"Load during the run: other processes used {100 * (load['other_share'] or 0):.0f} % of the machine, "
              f"1-min load average {load['loadavg_1min']:.2f} on {os.cpu_count()} CPUs.", "",
              "The synthetic blocks are independent draws, so their concatenations gain far more than a real "
              "model's correlated blocks would: the accuracies only show that every probe learned; the times are "
              "the measurement. A readout's time grows with its width squared (its eigenbasis, `eigh` once and two "
              "(heads x width) @ (width x width) products per step), hence `all` (12 x 192) costs most; the "
              "per-block probes share one batched pass."]
    raw = {"args": vars(args) | {"report": str(args.report)}, "machine": info, "load": load, "seconds": timings,
           "widths": widths, "top1": top1}
    publish(SECTION, "\n".join(lines), raw, report=args.report, no_report=args.no_report,
            total_seconds=load["wall_s"])


if __name__ == "__main__":
    main()
