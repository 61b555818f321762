"""Benchmark of the input pipeline alone: images/s of decoding + the eval transform from an ImageFolder, WebDataset
tar shards and Hugging Face-style parquet files of the same images, next to the model's own forward throughput.

Run from the repository root::

    python benchmarks/input_pipeline.py            # the figures in reports/benchmarks.md (about 10 min on 2 busy CPUs)
    python benchmarks/input_pipeline.py --help

What it measures:

1. The same CIFAR-10 train JPEGs (the first ``--images`` per class order, unpacked into a cache folder outside the
   repository) written three ways: an ImageFolder, tar shards of ``--shard-size`` samples (``train-000000.tar``,
   ``KEY.jpg`` + ``KEY.cls``), and parquet files (``data/train-0000i-of-0000n.parquet``, a struct column ``image``
   with the JPEG bytes, row groups of 100 as the datasets package writes image data).
2. For each layout and each ``--workers`` count: one pass of extraction's own loading path (``load_data``,
   `SplitDataset` with the model's eval transform at 224 px, a DataLoader over consecutive batches of
   ``--batch-size`` as `mimprobe.extract` builds it) with no model; images/s over the whole pass. Repetitions are
   interleaved across layouts; medians. The first batch of every layout is checked to be the same tensor.
3. The model's forward throughput: ``forward_features`` of ``--models`` (random weights) on a batch of
   ``--batch-size`` random 224 px images on the CPU under ``torch.inference_mode`` (warm-up once, then
   ``--model-repeats`` batches; median).

The results replace the ``input_pipeline`` section of reports/benchmarks.md (other sections are kept).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (DEFAULT_CIFAR_TAR, DEFAULT_REPORT, CpuMonitor, cifar_subsets,  # noqa: E402
                     default_cache_dir, log, machine_info, machine_line, publish)

SECTION = "input_pipeline"
LAYOUTS = ("imagefolder", "tar-shards", "parquet")
PARQUET_ROW_GROUP = 100  # rows per row group, as datasets writes image datasets


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="CIFAR-10 train images (first per class)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    parser.add_argument("--parquet-files", type=int, default=4, help="parquet files")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader worker counts")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size of the loader and the model")
    parser.add_argument("--repeats", type=int, default=1, help="passes per layout and worker count")
    parser.add_argument("--warmup", action="store_true", help="one untimed pass of every layout and worker count first")
    parser.add_argument("--models", nargs="+", default=["vit_tiny_patch16_224", "vit_small_patch16_224"],
                        help="timm models whose forward throughput is shown beside the pipeline's")
    parser.add_argument("--model-repeats", type=int, default=3, help="timed forward batches per model")
    parser.add_argument("--cifar-tar", type=Path, default=DEFAULT_CIFAR_TAR, help="CIFAR-10 JPEG archive")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the data are unpacked and converted (default $MIMPROBE_BENCH_CACHE or "
                             "~/.cache/mimprobe)")
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT,
                        help="markdown file; only its input_pipeline section is replaced")
    parser.add_argument("--no-report", action="store_true", help="print the section instead of writing it")
    return parser.parse_args(argv)


def _samples(folder: Path) -> list[tuple[str, bytes, int]]:
    """(key, JPEG bytes, label) in the ImageFolder's order (sorted classes, sorted files)."""
    samples = []
    for label, class_dir in enumerate(sorted(p for p in folder.iterdir() if p.is_dir())):
        for path in sorted(class_dir.glob("*.jpg")):
            samples.append((f"{class_dir.name}_{path.stem}", path.read_bytes(), label))
    return samples


def build_layouts(folder: Path, cache: Path, *, shard_size: int, parquet_files: int) -> dict[str, Path]:
    """The ImageFolder's images as tar shards and parquet files under ``cache`` (rebuilt when absent)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    samples = _samples(folder)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    tar_dir, parquet_dir = cache / "tar", cache / "parquet"
    if not (tar_dir / ".complete").is_file():
        tar_dir.mkdir(parents=True, exist_ok=True)
        for shard, start in enumerate(range(0, len(samples), shard_size)):
            with tarfile.open(tar_dir / f"train-{shard:06d}.tar", "w") as archive:
                for key, data, label in samples[start:start + shard_size]:
                    for name, payload in ((f"{key}.jpg", data), (f"{key}.cls", str(label).encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(payload)
                        archive.addfile(info, io.BytesIO(payload))
        (tar_dir / "classes.txt").write_text("\n".join(classes) + "\n")
        (tar_dir / ".complete").write_text("ok\n")
    if not (parquet_dir / ".complete").is_file():
        (parquet_dir / "data").mkdir(parents=True, exist_ok=True)
        metadata = {b"huggingface": json.dumps({"info": {"features": {
            "image": {"_type": "Image"}, "label": {"names": classes, "_type": "ClassLabel"}}}}).encode()}
        for number, rows in enumerate(np.array_split(np.arange(len(samples)), parquet_files)):
            table = pa.table({
                "image": pa.array([{"bytes": samples[i][1], "path": f"{samples[i][0]}.jpg"} for i in rows],
                                  type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                "label": pa.array([samples[i][2] for i in rows], type=pa.int64()),
            }).replace_schema_metadata(metadata)
            pq.write_table(table, parquet_dir / "data" / f"train-{number:05d}-of-{parquet_files:05d}.parquet",
                           row_group_size=PARQUET_ROW_GROUP)
        (parquet_dir / ".complete").write_text("ok\n")
    return {"imagefolder": folder, "tar-shards": tar_dir, "parquet": parquet_dir}


def pipeline_pass(data: Path, *, workers: int, batch_size: int, data_config: dict) -> tuple[float, int, object]:
    """One pass of extraction's loading path without a model: (seconds, images, first batch)."""
    import torch
    from torch.utils.data import DataLoader

    from mimprobe.data import SplitDataset, build_eval_transform, load_data

    started = time.perf_counter()
    split = load_data(data).splits["train"]  # the loader's setup (listing, fingerprint) is part of the cost
    dataset = SplitDataset(split, build_eval_transform(data_config), tuple(data_config["input_size"]))
    batches = [list(range(start, min(start + batch_size, len(split)))) for start in range(0, len(split), batch_size)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers)
    images, first = 0, None
    for tensor, indices, errors in loader:
        assert not any(errors), [e for e in errors if e][:1]
        first = tensor.clone() if first is None else first
        images += len(indices)
    seconds = time.perf_counter() - started
    assert images == len(split) and isinstance(first, torch.Tensor)
    return seconds, images, first


def model_throughput(name: str, *, batch_size: int, repeats: int) -> dict:
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0).eval()
    images = torch.randn(batch_size, 3, 224, 224)
    runs = []
    with torch.inference_mode():
        model.forward_features(images)  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            model.forward_features(images)
            runs.append(time.perf_counter() - started)
    median = statistics.median(runs)
    return {"model": name, "runs_s": runs, "median_s": median, "images_per_s": batch_size / median}


def summary_lines(runs: dict[str, list[float]], images: int, models: list[dict]) -> list[str]:
    """What the tables say: the layouts' spread against the runs' own, and the slowest pipeline against each model.

    Args:
        runs: ``"layout/workers"`` -> seconds of each pass.
        images: Images per pass.
        models: `model_throughput` results.
    """
    rates = {setting: images / statistics.median(times) for setting, times in runs.items()}
    slowest, fastest = min(rates, key=rates.get), max(rates, key=rates.get)
    noise = max(max(times) / min(times) for times in runs.values())
    lines = [f"- Layouts: medians from {rates[slowest]:,.0f} img/s ({slowest.replace('/', ', ')} worker(s)) to "
             f"{rates[fastest]:,.0f} img/s ({fastest.replace('/', ', ')} worker(s)), a spread of "
             f"{rates[fastest] / rates[slowest]:.2f}x, where the runs of one setting differ by up to {noise:.2f}x "
             "(slowest / fastest run)."]
    for entry in models:
        lines.append(f"- The slowest input pipeline feeds {rates[slowest] / entry['images_per_s']:.0f}x the images "
                     f"per second that `{entry['model']}`'s forward pass consumes here: the model, not the input "
                     "pipeline, bounds extraction on this CPU.")
    return lines


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unavailable"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from mimprobe.data import resolve_eval_data_config

    started = time.perf_counter()
    cache = Path(args.cache_dir) if args.cache_dir is not None else default_cache_dir()
    info = machine_info()
    load_before = uptime()
    folder = cifar_subsets([args.images], tar_path=args.cifar_tar, cache_dir=cache)[args.images]
    layouts = build_layouts(folder, cache / "input-pipeline" / folder.name, shard_size=args.shard_size,
                            parquet_files=args.parquet_files)
    import timm

    data_config = resolve_eval_data_config(timm.create_model(args.models[0], pretrained=False, num_classes=0))
    log(f"eval transform {data_config}; layouts {', '.join(str(p) for p in layouts.values())}")

    monitor = CpuMonitor()
    runs: dict[tuple[str, int], list[float]] = {}
    firsts = {}
    for repeat in range(0 if args.warmup else 1, args.repeats + 1):  # repeat 0: untimed warm-up
        for workers in args.workers:
            for layout in LAYOUTS:
                seconds, images, first = pipeline_pass(layouts[layout], workers=workers,
                                                       batch_size=args.batch_size, data_config=data_config)
                firsts.setdefault(layout, first)
                if repeat:
                    runs.setdefault((layout, workers), []).append(seconds)
                log(f"{'warm-up' if not repeat else f'run {repeat}'}: {layout}, {workers} worker(s): "
                    f"{seconds:.2f} s, {images / seconds:.0f} img/s")
    same_first = all(torch.equal(firsts[layout], firsts["imagefolder"]) for layout in LAYOUTS)
    pipeline_load = monitor.stop()
    monitor = CpuMonitor()
    models = [model_throughput(name, batch_size=args.batch_size, repeats=args.model_repeats) for name in args.models]
    model_load = monitor.stop()
    for entry in models:
        log(f"{entry['model']}: {entry['images_per_s']:.1f} img/s")
    load_after = uptime()

    n = args.images
    rows = []
    for layout in LAYOUTS:
        for workers in args.workers:
            times = runs[(layout, workers)]
            median = statistics.median(times)
            rows.append(f"| {layout} | {workers} | {', '.join(f'{t:.2f}' for t in times)} | {median:.2f} | "
                        f"{n / median:,.0f} |")
    model_rows = [f"| `{m['model']}` `forward_features`, batch {args.batch_size}, 224 px | "
                  f"{', '.join(f'{t:.2f}' for t in m['runs_s'])} | {m['median_s']:.2f} | {m['images_per_s']:,.1f} |"
                  for m in models]
    rates = {f"{k[0]}/{k[1]}": n / statistics.median(v) for k, v in runs.items()}
    shards = len(list(layouts["tar-shards"].glob("*.tar")))
    body = "\n".join([
        "## Input pipeline: ImageFolder, tar shards and parquet (`benchmarks/input_pipeline.py`)",
        "",
        f"- Machine: {machine_line(info)}",
        f"- Load (`uptime`): before `{load_before}`; after `{load_after}`. During the pipeline passes other "
        f"processes used {100 * (pipeline_load['other_share'] or 0):.0f}% of the machine's CPU capacity "
        f"(steal {100 * (pipeline_load['steal_share'] or 0):.1f}%); during the model passes "
        f"{100 * (model_load['other_share'] or 0):.0f}%. The machine is shared: absolute rates vary, the "
        "interleaved layouts stay comparable.",
        f"- Command (from the repository root): `python benchmarks/input_pipeline.py "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}`; whole run "
        f"{time.perf_counter() - started:.0f} s",
        f"- Data: the first {n:,} CIFAR-10 train JPEGs (32x32, {n // 10} per class) from "
        f"`../shared/datasets/cifar10-jpg.tar.gz`, written as an ImageFolder, as {shards} uncompressed tar shards "
        f"of {args.shard_size} samples (`KEY.jpg` + `KEY.cls`) and as {args.parquet_files} parquet files "
        f"(`data/train-*.parquet`, image bytes in a struct column, row groups of {PARQUET_ROW_GROUP}).",
        f"- Each pass: `load_data` (listing and fingerprint included), `SplitDataset` with "
        f"{args.models[0]}'s eval transform ({data_config['interpolation']} resize to "
        f"{data_config['input_size'][1]} px, crop_pct {data_config['crop_pct']}, normalize), a DataLoader over "
        f"consecutive batches of {args.batch_size} as `extract` builds it, no model; worker start-up included. "
        + ("A warm-up pass of every layout and worker count first, then " if args.warmup else
           "No warm-up (the files were just written, so they are in the page cache); ")
        + f"{args.repeats} interleaved repetition(s); medians. "
        f"The first batch is the same tensor from all three layouts: {'yes' if same_first else 'NO'}.",
        "",
        "| layout | DataLoader workers | runs (s) | median (s) | images/s |",
        "|---|---:|---|---:|---:|",
        *rows,
        "",
        "Model forward alone (random weights, CPU, fp32, `torch.inference_mode`, "
        f"{torch.get_num_threads()} torch threads, random input; warm-up once, then {args.model_repeats} batches):",
        "",
        "| model | runs (s) | median (s) | images/s |",
        "|---|---|---:|---:|",
        *model_rows,
        "",
        *summary_lines({f"{k[0]}/{k[1]}": v for k, v in runs.items()}, n, models),
    ])
    raw = {"runs": {f"{k[0]}/{k[1]}": v for k, v in runs.items()}, "images_per_s": rates, "models": models, "same_first_batch": same_first,
           "load": {"pipeline": pipeline_load, "model": model_load, "uptime_before": load_before,
                    "uptime_after": load_after}, "machine": info}
    publish(SECTION, body, raw, report=args.report, no_report=args.no_report,
            total_seconds=time.perf_counter() - started)


if __name__ == "__main__":
    main()
