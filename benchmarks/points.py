"""Benchmark of ``--points all`` against ``--points block``: the cost of reading every point inside every block.

Run from the repository root::

    python benchmarks/points.py             # the figures in reports/benchmarks.md (about 2 minutes on 2 CPUs)
    python benchmarks/points.py --help

Measures, in one run:

1. Time. ``mimprobe.extract`` of every block of a small ViT (random weights, ``--img-size``, pooling cls and mean,
   batch 64, CPU, fp32) over synthetic images (no decoding, so the model's own time is what is compared), with
   ``points=block`` and ``points=all`` (block, norm1, attn, norm2, mlp_hidden, mlp: each pooled inside its forward
   hook), each into a fresh store. One warm-up of each, then repetitions alternating block / all in the same
   process; the ratio of the medians. Goal (issue 20): at most 1.25.
2. Peak resident memory of each, in a fresh subprocess that runs only that extraction (``resource.getrusage``'s
   ``ru_maxrss`` of the child).

The results replace the ``points`` section of reports/benchmarks.md (other sections are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_REPORT, CpuMonitor, log, machine_info, machine_line, publish  # noqa: E402

SECTION = "points"
GOAL = 1.25
REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm model, random init")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=400, help="synthetic train images (10 classes)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="alternating repetitions of block and all")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT)
    parser.add_argument("--no-report", action="store_true", help="print the section instead of writing it")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # points of one extraction in a subprocess
    return parser.parse_args(argv)


def _data(args: argparse.Namespace) -> str:
    return f"synthetic:classes=10,train={args.images // 10},test=1,size={args.img_size}"


def _extract(loaded, args: argparse.Namespace, points: str, out: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one extraction into a fresh store."""
    from mimprobe import extract

    started, cpu = time.perf_counter(), time.process_time()
    result = extract(loaded, _data(args), out=out, img_size=args.img_size, points=points, pool="cls,mean",
                     batch_size=args.batch_size, device="cpu", precision="fp32", progress=False)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    assert not result.reused and len(result.store.points) == (1 if points == "block" else 6)
    return seconds, cpu_seconds


def _load(args: argparse.Namespace):
    from mimprobe import load_model

    return load_model(args.model, img_size=args.img_size)


def child(args: argparse.Namespace) -> None:
    """One extraction (``--child POINTS``), then its peak RSS as JSON on stdout."""
    import torch

    torch.set_num_threads(args.threads)
    loaded = _load(args)
    with tempfile.TemporaryDirectory() as out:
        seconds, _ = _extract(loaded, args, args.child, Path(out))
    print(json.dumps({"points": args.child, "seconds": seconds,
                      "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def peak_rss(args: argparse.Namespace, points: str) -> dict:
    command = [sys.executable, __file__, "--child", points, "--model", args.model, "--img-size", str(args.img_size),
               "--images", str(args.images), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    info = machine_info()
    loaded = _load(args)
    times: dict[str, list[float]] = {"block": [], "all": []}
    cpu_times: dict[str, list[float]] = {"block": [], "all": []}
    monitor = CpuMonitor()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats + 1):  # the first of each is the warm-up
            for points in ("block", "all"):
                seconds, cpu_seconds = _extract(loaded, args, points, Path(scratch) / f"{points}-{repeat}")
                log(f"{points}: {seconds:.2f} s, CPU {cpu_seconds:.2f} s" + (" (warm-up)" if repeat == 0 else ""))
                if repeat:
                    times[points].append(seconds)
                    cpu_times[points].append(cpu_seconds)
    load = monitor.stop()
    load_after = os.getloadavg()
    medians = {points: statistics.median(values) for points, values in times.items()}
    ratio = medians["all"] / medians["block"]
    cpu_medians = {points: statistics.median(values) for points, values in cpu_times.items()}
    cpu_ratio = cpu_medians["all"] / cpu_medians["block"]
    memory = {points: peak_rss(args, points) for points in ("block", "all")}
    for points, found in memory.items():
        log(f"{points}: peak RSS {found['max_rss_bytes'] / 2**20:.0f} MiB")
    structure = loaded.model
    images = args.images + 10
    body = "\n".join([
        "## Probe points: `--points all` vs `--points block` (`benchmarks/points.py`)",
        "",
        f"- Machine: {machine_line(info)}; torch threads set to {args.threads}",
        f"- Command (from the repository root): `python benchmarks/points.py`; whole run "
        f"{time.perf_counter() - started:.0f} s",
        f"- Extraction of every block ({len(structure.blocks)}) of {args.model} (random init) at {args.img_size} px, "
        f"{images} synthetic images, pooling cls and mean, batch {args.batch_size}, CPU fp32; each run into a fresh "
        f"store; one warm-up each, then {args.repeats} runs alternating block / all in one process.",
        "",
        "| points | arrays per split | median wall s | median CPU s | runs, wall (s) | peak RSS (fresh process) |",
        "|---|---:|---:|---:|---|---:|",
        *(f"| {name} | {len(structure.blocks) * 2 * count} | {medians[points]:.2f} | {cpu_medians[points]:.2f} | "
          f"{', '.join(f'{t:.2f}' for t in times[points])} | {memory[points]['max_rss_bytes'] / 2**20:.0f} MiB |"
          for points, name, count in (("block", "block", 1), ("all", "all (6 points)", 6))),
        "",
        f"Ratio all / block (medians): wall **{ratio:.3f}**, CPU time of the process **{cpu_ratio:.3f}** (goal <= "
        f"{GOAL}: {'met' if max(ratio, cpu_ratio) <= GOAL else 'NOT met'}). The CPU time is the steadier figure on a "
        "shared machine (one torch thread: it does not count the time other processes held the cores).",
        "",
        f"Load: 1-min load average {load_before[0]:.2f} before and {load_after[0]:.2f} after the timed runs on "
        f"{os.cpu_count()} CPUs; other processes used {100 * (load['other_share'] or 0):.0f} % of the machine "
        "during them.",
    ])
    raw = {"times": times, "medians": medians, "ratio": ratio, "cpu_times": cpu_times, "cpu_medians": cpu_medians,
           "cpu_ratio": cpu_ratio, "memory": memory, "load": load,
           "loadavg_before": load_before, "loadavg_after": load_after, "args": vars(args) | {"report": str(args.report)}}
    publish(SECTION, body, raw, report=args.report, no_report=args.no_report,
            total_seconds=time.perf_counter() - started)


if __name__ == "__main__":
    main()
