"""Benchmark of `mimprobe.extract`: one forward pass for every block, and memory that does not grow with the data.

Run from the repository root::

    python benchmarks/extract.py            # the figures in reports/benchmarks.md (about 6-7 minutes on 2 CPUs)
    python benchmarks/extract.py --help

Measures, in one run, on real CIFAR-10 JPEGs (a subset unpacked into ~/.cache/mimprobe/cifar10, never the repo):

1. Speed. Wall time of ``mimprobe.extract`` over 256 images, every block of vit_small_patch16_224 (random weights,
   224 px, pooling cls, batch 32, workers 0, CPU), divided by the time of one plain ``model.forward_features``
   pass over the same images through the same DataLoader pipeline (SplitDataset + the model's eval transform, so
   both include JPEG decoding), under ``torch.inference_mode``. Goal: at most 1.10.
2. The same ratio for the per-layer approach (thingsvision-style): for each block i, a full ``forward_features``
   pass over all images with a forward hook on ``model.blocks[i]`` that keeps that block's CLS token.
   Warm-up once, then repetitions interleaved (baseline, extract, per-block, ...); medians and ratios of medians.
   The per-block baseline (12 passes, about 3.5 minutes here) runs once by default: ``--per-block-repeats``.
3. Peak resident memory of extracting every block of vit_tiny_patch16_224 at img_size 32 (pooling cls, batch 64)
   for 2,000 and 20,000 images, each in a fresh subprocess that runs only that extraction (the child's VmHWM,
   cross-checked with ``os.wait4``'s ru_maxrss of that child). Goal: difference under 100 MB.

The results replace the ``extract`` section of reports/benchmarks.md (other sections are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (DEFAULT_CIFAR_TAR, DEFAULT_REPORT, CpuMonitor, cifar_subsets,  # noqa: E402
                     default_cache_dir, log, machine_info, machine_line, per_class_counts, publish)

SECTION = "extract"
SPEED_GOAL = 1.10
MEMORY_GOAL_BYTES = 100e6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    speed = parser.add_argument_group("speed (1, 2)")
    speed.add_argument("--speed-model", default="vit_small_patch16_224",
                       help="timm model, random init, its own input size")
    speed.add_argument("--speed-images", type=int, default=256, help="CIFAR-10 train images (first per class)")
    speed.add_argument("--speed-batch-size", type=int, default=32, help="batch size of all three measurements")
    speed.add_argument("--repeats", type=int, default=3, help="repetitions of baseline and extract")
    speed.add_argument("--per-block-repeats", type=int, default=1,
                       help="repetitions of the per-block baseline (each is one full pass per block)")
    memory = parser.add_argument_group("memory (3)")
    memory.add_argument("--memory-model", default="vit_tiny_patch16_224", help="timm model, random init")
    memory.add_argument("--memory-img-size", type=int, default=32, help="extract(img_size=...)")
    memory.add_argument("--memory-batch-size", type=int, default=64, help="extract(batch_size=...)")
    memory.add_argument("--memory-images", type=int, nargs="+", default=[2000, 20000],
                        help="dataset sizes, each extracted in its own fresh subprocess")
    parser.add_argument("--skip-speed", action="store_true", help="only the memory part")
    parser.add_argument("--skip-memory", action="store_true", help="only the speed part")
    parser.add_argument("--cifar-tar", type=Path, default=DEFAULT_CIFAR_TAR, help="CIFAR-10 JPEG archive")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where CIFAR-10 subsets are unpacked (default $MIMPROBE_BENCH_CACHE or ~/.cache/mimprobe)")
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT,
                        help="markdown file; only its extract section is replaced")
    parser.add_argument("--no-report", action="store_true", help="print the section instead of writing it")
    # internal: the memory child
    parser.add_argument("--memory-child", nargs=2, metavar=("DATA", "OUT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- 1 + 2: speed ---------------------------------------------------------------------------------------------

def speed_benchmark(args: argparse.Namespace, data_dir: Path) -> dict:
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from mimprobe import extract, load_data, load_model
    from mimprobe.data import SplitDataset, build_eval_transform
    from mimprobe.models.preprocessing import resolve_eval_data_config

    loaded = load_model(args.speed_model)
    model = loaded.model.eval()
    source = load_data(data_dir)
    split = source.splits["train"]
    n_images, batch_size = len(split), args.speed_batch_size
    data_config = resolve_eval_data_config(model)
    dataset = SplitDataset(split, build_eval_transform(data_config), tuple(data_config["input_size"]))
    num_blocks = len(model.blocks)

    def loader():
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)

    def run_baseline() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            for images, _, errors in loader():
                assert not any(errors), errors
                model.forward_features(images)
        return time.perf_counter() - started

    def run_extract() -> tuple[float, float, dict[int, np.ndarray]]:
        with tempfile.TemporaryDirectory(prefix="mimprobe-bench-") as out:  # fresh: no store to reuse
            started = time.perf_counter()
            result = extract(loaded, source, out=out, blocks=None, pool=("cls",), batch_size=batch_size,
                             workers=0, device="cpu", progress=False)
            wall = time.perf_counter() - started
            assert not result.reused and not result.resumed and result.images == n_images, result.summary()
            assert result.store.blocks == list(range(num_blocks)), result.store.blocks
            features = {b: np.array(result.store.features("train", b, "cls")) for b in (0, num_blocks // 2,
                                                                                        num_blocks - 1)}
        return wall, result.seconds, features

    def run_per_block() -> tuple[float, dict[int, np.ndarray]]:
        features: dict[int, np.ndarray] = {}
        started = time.perf_counter()
        with torch.inference_mode():
            for index in range(num_blocks):
                captured: list[torch.Tensor] = []
                handle = model.blocks[index].register_forward_hook(
                    lambda _module, _inputs, output: captured.append(output[:, 0].clone()))  # CLS pooling
                try:
                    for images, _, _ in loader():
                        model.forward_features(images)
                finally:
                    handle.remove()
                features[index] = torch.cat(captured).float().numpy()
        return time.perf_counter() - started, features

    log(f"speed: {args.speed_model}, {n_images} images, {num_blocks} blocks, input {data_config['input_size']}, "
        f"batch {batch_size}, torch threads {torch.get_num_threads()}; warm-up")
    warm_baseline = run_baseline()
    warm_extract = run_extract()[0]
    log(f"warm-up: baseline {warm_baseline:.2f} s, extract {warm_extract:.2f} s")

    baseline, extract_wall, extract_loop, per_block = [], [], [], []
    monitor = CpuMonitor()
    check = None
    for rep in range(max(args.repeats, args.per_block_repeats)):
        if rep < args.repeats:
            baseline.append(run_baseline())
            log(f"rep {rep + 1}: forward_features {baseline[-1]:.2f} s")
            wall, loop, stored = run_extract()
            extract_wall.append(wall)
            extract_loop.append(loop)
            log(f"rep {rep + 1}: extract {wall:.2f} s (loop {loop:.2f} s)")
        if rep < args.per_block_repeats:
            seconds, hooked = run_per_block()
            per_block.append(seconds)
            log(f"rep {rep + 1}: per-block passes {seconds:.2f} s")
            if check is None and rep < args.repeats:  # extract's stored rows == the hooked block outputs
                diffs = {b: float(np.abs(stored[b].astype(np.float32) - hooked[b]).max()) for b in stored}
                scale = max(float(np.abs(hooked[b]).max()) for b in stored)
                ok = all(np.allclose(stored[b].astype(np.float32), hooked[b], rtol=2e-3, atol=2e-3 * max(scale, 1))
                         for b in stored)
                check = {"blocks": sorted(stored), "max_abs_diff": max(diffs.values()), "max_abs": scale, "ok": ok}
                if not ok:
                    log(f"WARNING: stored features differ from the hooked block outputs: {check}")

    load = monitor.stop()

    def med(values):
        return statistics.median(values) if values else None

    result = {
        "model": args.speed_model, "images": n_images, "blocks": num_blocks, "batch_size": batch_size,
        "input_size": data_config["input_size"], "crop_pct": data_config.get("crop_pct"),
        "interpolation": data_config.get("interpolation"), "per_class": per_class_counts(n_images),
        "warmup": {"baseline": warm_baseline, "extract": warm_extract},
        "baseline": baseline, "extract_wall": extract_wall, "extract_loop": extract_loop, "per_block": per_block,
        "median": {"baseline": med(baseline), "extract_wall": med(extract_wall), "extract_loop": med(extract_loop),
                   "per_block": med(per_block)},
        "check": check, "load": load,
    }
    base = result["median"]["baseline"]
    result["ratio"] = {key: (value / base if value is not None else None)
                       for key, value in result["median"].items()}
    return result


# --- 3: memory ------------------------------------------------------------------------------------------------

def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])  # kB (KiB)
    except OSError:
        pass
    return None


def memory_child(args: argparse.Namespace) -> None:
    """Runs in the fresh subprocess: only this extraction, then its peak memory as one JSON line on stdout."""
    data, out = args.memory_child
    from mimprobe import extract

    started = time.perf_counter()
    result = extract(args.memory_model, data, out=out, img_size=args.memory_img_size, blocks=None,
                     pool=("cls",), batch_size=args.memory_batch_size, workers=0, device="cpu", progress=False)
    wall = time.perf_counter() - started
    assert not result.reused and result.store.complete, result.summary()
    print(json.dumps({
        "images": result.images, "blocks": len(result.store.blocks), "extract_seconds": result.seconds,
        "call_seconds": wall, "vmhwm_kib": _proc_status_kib("VmHWM"), "vmrss_kib": _proc_status_kib("VmRSS"),
        "self_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }), flush=True)
    sys.stderr.flush()
    # Skip interpreter finalisation: tearing down torch's modules raises RSS by ~110 MiB after the work is done,
    # which would show in the wait4 cross-check (ru_maxrss) though it is no part of the extraction.
    os._exit(0)


def run_memory_child(args: argparse.Namespace, data_dir: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="mimprobe-bench-mem-") as tmp:
        out_dir = Path(tmp) / "stores"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", str(data_dir), str(out_dir),
               "--memory-model", args.memory_model, "--memory-img-size", str(args.memory_img_size),
               "--memory-batch-size", str(args.memory_batch_size)]
        stdout_path, stderr_path = Path(tmp) / "stdout", Path(tmp) / "stderr"
        started = time.perf_counter()
        with open(stdout_path, "w") as stdout, open(stderr_path, "w") as stderr:
            proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr)
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (not the max over all children)
            proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"memory child failed ({proc.returncode}): {stderr_path.read_text()[-3000:]}")
        lines = [line for line in stdout_path.read_text().splitlines() if line.startswith("{")]
        report = json.loads(lines[-1])
    report["child_wall_seconds"] = wall
    report["wait4_maxrss_kib"] = usage.ru_maxrss
    return report


def memory_benchmark(args: argparse.Namespace, data_dirs: dict[int, Path]) -> dict:
    runs = {}
    monitor = CpuMonitor()
    for total in args.memory_images:
        log(f"memory: {args.memory_model} img_size {args.memory_img_size}, {total} images, fresh subprocess")
        runs[total] = run_memory_child(args, data_dirs[total])
        r = runs[total]
        log(f"memory: {total} images: VmHWM {r['vmhwm_kib'] / 1024:.1f} MiB, wait4 maxrss "
            f"{r['wait4_maxrss_kib'] / 1024:.1f} MiB, extract {r['extract_seconds']:.1f} s")
    totals = sorted(runs)
    small, large = runs[totals[0]], runs[totals[-1]]
    diff_kib = large["vmhwm_kib"] - small["vmhwm_kib"]
    return {"model": args.memory_model, "img_size": args.memory_img_size, "batch_size": args.memory_batch_size,
            "runs": runs, "small": totals[0], "large": totals[-1], "diff_kib": diff_kib,
            "diff_wait4_kib": large["wait4_maxrss_kib"] - small["wait4_maxrss_kib"], "load": monitor.stop()}


# --- report ---------------------------------------------------------------------------------------------------

def _secs(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def _load_line(what: str, load: dict | None, note: str = "the machine is shared, so absolute times vary; "
               "interleaving keeps the ratios comparable.") -> str:
    if not load or load.get("other_share") is None:
        return "- Machine load from other processes: unknown (no /proc/stat)."
    steal = f", hypervisor steal {100 * load['steal_share']:.1f}%" if load.get("steal_share") is not None else ""
    return (f"- Load during the {what}: other processes used {100 * load['other_share']:.0f}% of the machine's CPU "
            f"capacity{steal} (1-min load average at the end {load['loadavg_1min']:.2f}, this run included); {note}")


def render(args: argparse.Namespace, info: dict, speed: dict | None, memory: dict | None, total_seconds: float,
           command: str) -> str:
    lines = [
        "## Extraction: every block in one pass (`benchmarks/extract.py`)",
        "",
        f"- Machine: {machine_line(info)}",
        f"- Command (from the repository root): `{command}`",
        f"- Whole run: {total_seconds:.0f} s ({total_seconds / 60:.1f} min), including unpacking and warm-up",
        "- Data: real CIFAR-10 JPEGs (32x32) from `../shared/datasets/cifar10-jpg.tar.gz`, the first images per "
        "class of the train split, unpacked into a cache folder outside the repository; random-init weights "
        "(seed 0); CPU, fp32, `torch.inference_mode`, DataLoader with 0 workers (decoding in the timed loop).",
        "",
    ]
    if speed is not None:
        m, r = speed["median"], speed["ratio"]
        speed_ok = r["extract_wall"] <= SPEED_GOAL
        counts = sorted(set(speed["per_class"].values()), reverse=True)
        per_class = "/".join(str(c) for c in counts)
        lines += [
            f"### Speed: all {speed['blocks']} blocks of {speed['model']} vs. one `forward_features` pass",
            "",
            f"{speed['images']} images ({per_class} per class), input {speed['input_size'][1]} px (the model's "
            f"own eval transform: {speed['interpolation']} resize, crop_pct {speed['crop_pct']}), pooling cls, "
            f"batch {speed['batch_size']}. Every timing covers the whole DataLoader loop (JPEG decoding and "
            "transforms included); extract's time is the wall time of the `mimprobe.extract(...)` call with a "
            "fresh `out` folder (store creation and per-batch writes included). Warm-up once (baseline "
            f"{speed['warmup']['baseline']:.2f} s, extract {speed['warmup']['extract']:.2f} s), then "
            f"{max(args.repeats, args.per_block_repeats)} interleaved repetitions (baseline, extract, per-block "
            f"baseline, ...; the per-block baseline, {speed['blocks']} full passes, runs in "
            + ("the first repetition only" if args.per_block_repeats == 1 else
               f"the first {args.per_block_repeats} repetitions")
            + f": `--per-block-repeats {args.per_block_repeats}`); medians, ratios of medians.",
            "",
            "| measurement | runs (s) | median (s) | images/s | ratio to forward_features |",
            "|---|---|---:|---:|---:|",
            f"| plain `model.forward_features`, one pass (baseline) | {_secs(speed['baseline'])} | "
            f"{m['baseline']:.2f} | {speed['images'] / m['baseline']:.1f} | 1.00 |",
            f"| `mimprobe.extract`, all {speed['blocks']} blocks, wall time of the call | "
            f"{_secs(speed['extract_wall'])} | {m['extract_wall']:.2f} | {speed['images'] / m['extract_wall']:.1f} | "
            f"**{r['extract_wall']:.3f}** |",
            f"| ... of which its batch loop (`ExtractResult.seconds`) | {_secs(speed['extract_loop'])} | "
            f"{m['extract_loop']:.2f} | {speed['images'] / m['extract_loop']:.1f} | {r['extract_loop']:.3f} |",
        ]
        if speed["per_block"]:
            lines.append(
                f"| one `forward_features` pass per block, forward hook on `model.blocks[i]` keeping its CLS token "
                f"({speed['blocks']} passes, features kept in memory, nothing written) | {_secs(speed['per_block'])} | "
                f"{m['per_block']:.2f} | {speed['images'] / m['per_block']:.1f} | **{r['per_block']:.2f}** |")
        lines += [
            "",
            f"- Goal `extract` <= {SPEED_GOAL:.2f} x one forward pass: **{'met' if speed_ok else 'NOT met'}** "
            f"({r['extract_wall']:.3f}).",
        ]
        if speed["per_block"]:
            lines.append(f"- The per-layer approach costs {r['per_block']:.2f} x one pass, i.e. "
                         f"{m['per_block'] / m['extract_wall']:.1f} x `mimprobe.extract`.")
        if speed["check"] is not None:
            c = speed["check"]
            lines.append(
                f"- Check: the store's float16 rows of blocks {c['blocks']} equal the hooked per-block CLS outputs "
                f"(max abs difference {c['max_abs_diff']:.2e} for values up to {c['max_abs']:.2f}): "
                f"{'ok' if c['ok'] else 'MISMATCH'}.")
        lines.append(_load_line("timed repetitions", speed["load"]))
        lines.append("")
    if memory is not None:
        mib = 1024.0
        lines += [
            f"### Memory: peak RSS vs. number of images ({memory['model']}, all blocks)",
            "",
            f"img_size {memory['img_size']}, pooling cls, batch {memory['batch_size']}, each size extracted by a "
            "fresh subprocess that runs only that `mimprobe.extract` call; peak = the child's `VmHWM` at its end "
            "(cross-check: `ru_maxrss` of that child from `os.wait4`; the child ends with `os._exit` after reporting, "
            "since "
            "Python's shutdown after importing torch alone adds ~110 MiB to ru_maxrss, and runs before the parent "
            "imports torch, since Linux can carry the parent's RSS at the fork into the child's ru_maxrss).",
            "",
            "| images | per class | peak RSS, VmHWM (MiB) | ru_maxrss via wait4 (MiB) | extract loop (s) | images/s |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for total in sorted(memory["runs"]):
            run = memory["runs"][total]
            counts = sorted(set(per_class_counts(total).values()), reverse=True)
            lines.append(
                f"| {total:,} | {'/'.join(str(c) for c in counts)} | {run['vmhwm_kib'] / mib:.1f} | "
                f"{run['wait4_maxrss_kib'] / mib:.1f} | {run['extract_seconds']:.1f} | "
                f"{run['images'] / run['extract_seconds']:.0f} |")
        diff_bytes = memory["diff_kib"] * 1024
        ok = diff_bytes < MEMORY_GOAL_BYTES
        lines += [
            "",
            f"- Difference {memory['large']:,} vs. {memory['small']:,} images: "
            f"**{memory['diff_kib'] / mib:+.1f} MiB** ({diff_bytes / 1e6:+.1f} MB; wait4 ru_maxrss: "
            f"{memory['diff_wait4_kib'] / mib:+.1f} MiB). Goal under 100 MB: **{'met' if ok else 'NOT met'}**.",
            _load_line("memory runs", memory["load"], "the speeds in this table are informative only."),
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return 0
    started = time.perf_counter()
    command = "python " + shlex.join(sys.argv if argv is None else ["benchmarks/extract.py", *argv])
    cache_dir = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    totals = ([] if args.skip_speed else [args.speed_images]) + ([] if args.skip_memory else args.memory_images)
    log(f"CIFAR-10 subsets {totals} in {cache_dir / 'cifar10'}")
    data_dirs = cifar_subsets(totals, tar_path=args.cifar_tar, cache_dir=cache_dir)
    log(f"data ready ({time.perf_counter() - started:.1f} s)")
    # memory first, while this process has not imported torch: a child's ru_maxrss starts from its parent's RSS
    # at the fork, so a lean parent keeps the wait4 cross-check meaningful (VmHWM is reset by exec anyway)
    memory = None if args.skip_memory else memory_benchmark(args, data_dirs)
    info = machine_info()
    speed = None if args.skip_speed else speed_benchmark(args, data_dirs[args.speed_images])
    total_seconds = time.perf_counter() - started
    body = render(args, info, speed, memory, total_seconds, command)
    raw = {"speed": speed, "memory": memory, "machine": info, "seconds": total_seconds}
    publish(SECTION, body, raw, report=args.report, no_report=args.no_report, total_seconds=total_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
