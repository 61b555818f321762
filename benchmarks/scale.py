"""Scale: peak memory and time of `mimprobe profile` per metric as the store grows, and extraction across processes.

Run from the repository root::

    python benchmarks/scale.py                                  # 20,000 and 200,000 train rows, extraction ratio
    python benchmarks/scale.py --rows 20000 100000 --knn-rows 20000 60000   # k-NN (rows x queries) at other sizes
    python benchmarks/scale.py --parts profile --metrics knn --rows 60000 --merge /tmp/mimprobe-scale/scale-results.json
    python benchmarks/scale.py --rows 2000 4000 --extract-images 400 --no-report    # a smoke run, printed

Profile part: for every size in ``--rows`` a synthetic FeatureStore is written with the store API
(`mimprobe.features.store.create_store`): that many train rows and ``--test-fraction`` of it as a test split,
``--blocks`` blocks of width ``--dim``, float16, ``--classes`` classes whose centres separate more with depth (class
structure, so every metric has something to find). Then ``mimprobe profile STORE --metrics M --memory-budget B``
runs in a fresh process per metric; its peak RSS is the child's own ``ru_maxrss`` (``os.wait4``: the kernel's
VmHWM of that process at exit) and its wall time includes start-up (imports, about 5-15 s here). Goal: peak RSS
growth from the smallest to the largest size below the budget, and time growing at most linearly in rows for every
metric but k-NN (rows x queries; here the queries grow with the rows, and the k-NN on the carved validation split
is quadratic in train rows by design, so k-NN sizes are set apart with ``--knn-rows``).

Extraction part: ``--extract-images`` CIFAR-10 train images (unpacked from the archive into ``--work``) through
``--extract-model`` at 32 px, random init, one process and then ``torchrun --nproc_per_node 2`` (gloo), each
process with one thread (torchrun's default; the one-process run is given the same). Reported: wall times of both
commands and their ratio, and the extraction loop's own seconds.

Every figure is given with the 1-minute load average before and after it (``uptime``): this machine is shared.
Stores are deleted after each size (the 200,000-row store is about 1.9 GB). The results replace the ``scale``
section of reports/benchmarks.md (other sections are kept).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (DEFAULT_CIFAR_TAR, DEFAULT_REPORT, REPO, cifar_subsets, log, machine_info,  # noqa: E402
                     machine_line, publish)

from mimprobe.features.store import (FORMAT_VERSION, MANIFEST, create_store, feature_filename,  # noqa: E402
                                     store_key, write_json_atomic)

SECTION = "scale"
METRICS = ("knn", "linear", "lowshot", "cluster", "rank")
CHUNK = 16384  # rows generated and written at a time


def load() -> float:
    return os.getloadavg()[0]


def write_synthetic_store(path: Path, *, n_train: int, n_test: int, blocks: int, dim: int, classes: int,
                          seed: int = 0, dtype: str = "float16") -> Path:
    """A complete FeatureStore of class-structured random features (one pooling, ``cls``).

    Block ``b``'s rows are ``c_b * centre[label] + noise`` with unit Gaussian noise, per-block random centres and
    a separation ``c_b`` rising from 0.02 to 0.3 per dimension with depth (chance-level early blocks, well
    separated late ones).
    """
    rng = np.random.default_rng(seed)
    splits = {"train": n_train, "test": n_test}
    labels = {name: rng.integers(0, classes, rows) for name, rows in splits.items()}
    fingerprint = hashlib.sha256(json.dumps({"scale": [n_train, n_test, blocks, dim, classes, seed]}).encode())
    key_fields = {"format_version": FORMAT_VERSION, "model": {"name": "synthetic-scale", "weights": "random"},
                  "dataset": fingerprint.hexdigest(), "blocks": list(range(blocks)), "poolings": ["cls"],
                  "norm": "raw", "dtype": dtype, "precision": "fp32"}
    manifest = {
        "format_version": FORMAT_VERSION, "key": store_key(key_fields), "key_fields": key_fields,
        "model": {"name": "synthetic-scale", "weights": "random", "checkpoint": None},
        "dataset": {"name": f"synthetic-scale-{n_train}", "kind": "synthetic", "fingerprint": key_fields["dataset"],
                    "classes": [f"class{i}" for i in range(classes)], "labelled": True, "details": {},
                    "splits": splits},
        "blocks": list(range(blocks)), "poolings": ["cls"], "norm": "raw", "dtype": dtype, "precision": "fp32",
        "feature_dims": {"cls": dim}, "batch_size": CHUNK, "progress": {name: 0 for name in splits},
        "bad_images": [], "complete": False,
    }
    create_store(path, manifest, labels)
    for block in range(blocks):
        separation = 0.02 + 0.28 * block / max(1, blocks - 1)
        centres = rng.standard_normal((classes, dim)).astype(np.float32) * separation
        for name, rows in splits.items():
            features = np.load(path / name / feature_filename(block, "cls"), mmap_mode="r+")
            for start in range(0, rows, CHUNK):
                stop = min(rows, start + CHUNK)
                noise = rng.standard_normal((stop - start, dim), dtype=np.float32)
                features[start:stop] = (centres[labels[name][start:stop]] + noise).astype(dtype)
            features.flush()
            del features
    manifest["progress"] = dict(splits)
    manifest["complete"] = True
    write_json_atomic(path / MANIFEST, manifest)
    return path


def run_measured(command: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run a command in a fresh process; its wall time, stdout and the load before and after."""
    before = load()
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed ({process.returncode}):\n{stderr.decode()[-3000:]}")
    return {"wall_s": wall, "load_before": before, "load_after": load(), "stdout": stdout.decode()}


def _status_kib(pid: int) -> dict[str, int]:
    """RssAnon, RssFile and VmRSS of a live process (KiB), from /proc/<pid>/status; {} once it has exited."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("RssAnon", "RssFile", "VmRSS"):
                values[name] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return values


def run_with_rss(command: list[str], env: dict[str, str], interval: float = 0.1) -> dict[str, float]:
    """Run a command in a fresh process: wall time, peak RSS (its own ``ru_maxrss`` from ``os.wait4``: the kernel's
    VmHWM, which counts the pages of the store's memory maps it touched), and the peaks of its anonymous and
    file-backed resident memory sampled every ``interval`` s (RssAnon: what the process itself holds; RssFile:
    mapped files, i.e. the page cache of the memory maps, which the kernel reclaims under pressure)."""
    import threading

    before = load()
    started = time.perf_counter()
    peaks = {"RssAnon": 0, "RssFile": 0}
    with open(os.devnull, "wb") as devnull, subprocess.Popen(command, cwd=REPO, env=env, stdout=devnull,
                                                               stderr=subprocess.PIPE) as process:
        running = threading.Event()
        running.set()

        def sample() -> None:
            while running.is_set():
                for name, value in _status_kib(process.pid).items():
                    if name in peaks:
                        peaks[name] = max(peaks[name], value)
                time.sleep(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stderr = process.stderr.read()
        _, status, usage = os.wait4(process.pid, 0)
        running.clear()
        sampler.join()
        process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed ({process.returncode}):\n{stderr.decode()[-3000:]}")
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024, "peak_anon_mib": peaks["RssAnon"] / 1024,
            "peak_file_mib": peaks["RssFile"] / 1024, "load_before": before, "load_after": load()}


def profile_part(args: argparse.Namespace, env: dict[str, str]) -> list[dict]:
    results = []
    work = Path(args.work)
    knn_rows = args.rows if args.knn_rows is None else args.knn_rows
    for rows in sorted(set(args.rows) | (set(knn_rows) if "knn" in args.metrics else set())):
        metrics = [m for m in args.metrics if rows in (knn_rows if m == "knn" else args.rows)]
        store = work / f"store-{rows}"
        shutil.rmtree(store, ignore_errors=True)
        n_test = max(1, int(round(rows * args.test_fraction)))
        started = time.perf_counter()
        write_synthetic_store(store, n_train=rows, n_test=n_test, blocks=args.blocks, dim=args.dim,
                              classes=args.classes)
        log(f"wrote {store} ({rows:,} + {n_test:,} rows, {time.perf_counter() - started:.0f} s)")
        for metric in metrics:
            out = work / f"profile-{rows}-{metric}"
            command = [sys.executable, "-m", "mimprobe.cli", "profile", str(store), "--out", str(out), "--metrics",
                       metric, "--memory-budget", args.memory_budget, "--no-progress"]
            measured = run_with_rss(command, env)
            shutil.rmtree(out, ignore_errors=True)
            results.append({"rows": rows, "test_rows": n_test, "metric": metric, **measured})
            log(f"{rows:,} rows, {metric}: {measured['wall_s']:.1f} s, peak RSS {measured['peak_rss_mib']:.0f} MiB "
                f"(anonymous {measured['peak_anon_mib']:.0f}, file-backed {measured['peak_file_mib']:.0f}; load "
                f"{measured['load_before']:.1f} -> {measured['load_after']:.1f})")
            write_json_atomic(work / "scale-partial.json", {"profile": results})  # survives an interruption
        if not args.keep:
            shutil.rmtree(store, ignore_errors=True)
    return results


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def extract_part(args: argparse.Namespace, env: dict[str, str]) -> dict:
    folder = cifar_subsets([args.extract_images], tar_path=Path(args.cifar_tar), cache_dir=Path(args.work))[
        args.extract_images]
    common = ["extract", args.extract_model, str(folder), "--img-size", "32", "--batch-size",
              str(args.extract_batch_size), "--json", "--no-progress"]
    runs = {}
    for name, launcher in (("1 process", [sys.executable, "-m", "mimprobe.cli"]),
                           ("2 processes (torchrun)", [sys.executable, "-m", "torch.distributed.run",
                                                       "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                                                       "--master_port", str(_free_port()), "-m", "mimprobe.cli"])):
        out = Path(args.work) / f"extract-{len(runs)}"
        shutil.rmtree(out, ignore_errors=True)
        measured = run_measured([*launcher, *common, "--out", str(out)], env)
        summary = json.loads(measured.pop("stdout"))
        measured["loop_s"] = summary["seconds"]
        measured["images"] = summary["images_processed"]
        runs[name] = measured
        log(f"extract {name}: {measured['wall_s']:.1f} s wall, loop {measured['loop_s']:.1f} s "
            f"(load {measured['load_before']:.1f} -> {measured['load_after']:.1f})")
        shutil.rmtree(out, ignore_errors=True)
    return runs


def render(args: argparse.Namespace, profile: list[dict], extraction: dict | None, info: dict[str, str],
           earlier_command: str | None = None) -> str:
    budget = args.memory_budget
    lines = ["## Scale: profile memory and time per metric, extraction across processes (`benchmarks/scale.py`)",
             "", f"Machine: {machine_line(info)}.", "",
             f"Command: `python benchmarks/scale.py {shlex.join(sys.argv[1:])}`; every process with "
             f"OMP_NUM_THREADS={args.threads}. Load: the 1-minute load average before -> after each figure "
             "(2 CPUs, shared with other work, so times are noisy)."]
    if args.merge:
        lines += ["", f"Figures this command did not measure come from `--merge {args.merge}`: the raw output of an "
                  f"earlier run of this script, `{earlier_command}` (its own load figures are given)."]
    if profile:
        sizes = sorted({r["rows"] for r in profile})
        lines += ["", f"### `mimprobe profile STORE --metrics M --memory-budget {budget}`, one fresh process each",
                  "", f"Synthetic stores: {args.blocks} blocks x width {args.dim}, float16, {args.classes} classes, "
                  f"test split {args.test_fraction:.0%} of train. Peak RSS: the child's ru_maxrss (VmHWM), which "
                  "includes the pages of the store's memory maps it has touched (page cache mapped into the process, "
                  "reclaimable, shared with the OS cache); anonymous and file-backed: peaks of RssAnon and RssFile "
                  "sampled every 0.1 s (anonymous = what the process itself holds: the budget's subject). Wall: "
                  "whole command, start-up (imports) included.", "",
                  "| metric | train rows | test rows | wall (s) | peak RSS (MiB) | anonymous (MiB) | file-backed (MiB) "
                  "| load |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in profile:
            lines.append(f"| {r['metric']} | {r['rows']:,} | {r['test_rows']:,} | {r['wall_s']:.1f} | "
                         f"{r['peak_rss_mib']:.0f} | {r.get('peak_anon_mib', float('nan')):.0f} | "
                         f"{r.get('peak_file_mib', float('nan')):.0f} | {r['load_before']:.1f} -> "
                         f"{r['load_after']:.1f} |")
        if len(sizes) > 1:
            lines += ["", f"Growth from the smallest to the largest size measured per metric (budget {budget}):", "",
                      "| metric | rows ratio | wall ratio | peak RSS growth (MiB) | anonymous growth (MiB) | "
                      "goal met (anonymous growth < budget; wall ratio <= rows ratio but for k-NN) |",
                      "|---|---:|---:|---:|---:|---|"]
            limit = parse_budget_mib(budget)
            for metric in args.metrics:
                mine = sorted((r for r in profile if r["metric"] == metric), key=lambda r: r["rows"])
                if len(mine) < 2:
                    continue
                small, large = mine[0], mine[-1]
                rows_ratio = large["rows"] / small["rows"]
                wall_ratio = large["wall_s"] / small["wall_s"]
                growth = large["peak_rss_mib"] - small["peak_rss_mib"]
                anon = large.get("peak_anon_mib", float("nan")) - small.get("peak_anon_mib", float("nan"))
                time_ok = metric == "knn" or wall_ratio <= rows_ratio
                met = "yes" if anon < limit and time_ok else "no"
                lines.append(f"| {metric} | {rows_ratio:.1f} | {wall_ratio:.2f} | {growth:+.0f} | {anon:+.0f} | "
                             f"{met} |")
    if extraction:
        one, two = extraction["1 process"], extraction["2 processes (torchrun)"]
        lines += ["", f"### Extraction of {args.extract_images:,} CIFAR-10 images, {args.extract_model} at 32 px "
                  f"(random init, batch {args.extract_batch_size}), 1 vs 2 processes", "",
                  "| run | wall (s) | extraction loop (s, rank 0) | images | load |", "|---|---:|---:|---:|---|"]
        for name, r in extraction.items():
            lines.append(f"| {name} | {r['wall_s']:.1f} | {r['loop_s']:.1f} | {r['images']:,} | "
                         f"{r['load_before']:.1f} -> {r['load_after']:.1f} |")
        lines += ["", f"Ratio 2 processes / 1 process: wall {two['wall_s'] / one['wall_s']:.2f}, extraction loop "
                  f"{two['loop_s'] / one['loop_s']:.2f} (goal <= 0.6 on 2 idle cores)."]
    return "\n".join(lines)


def parse_budget_mib(text: str) -> float:
    from mimprobe.metrics.config import parse_bytes

    value = parse_bytes(text)
    return float("inf") if value is None else value / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000], help="train rows per store")
    parser.add_argument("--knn-rows", type=int, nargs="+", default=None, help="sizes at which k-NN runs (may differ "
                        "from --rows) [default: --rows]")
    parser.add_argument("--merge", default=None, help="raw results JSON of an earlier run (scale-results.json) to "
                        "report with this run's (this run's figures replace the same size and metric)")
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS)
    parser.add_argument("--memory-budget", default="1G")
    parser.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of every child process")
    parser.add_argument("--parts", nargs="+", default=["profile", "extract"], choices=["profile", "extract"])
    parser.add_argument("--extract-images", type=int, default=20_000)
    parser.add_argument("--extract-model", default="vit_tiny_patch16_224")
    parser.add_argument("--extract-batch-size", type=int, default=128)
    parser.add_argument("--cifar-tar", default=str(DEFAULT_CIFAR_TAR))
    parser.add_argument("--work", default="/tmp/mimprobe-scale", help="scratch folder (stores, images)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic stores")
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT)
    parser.add_argument("--no-report", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args(argv)

    Path(args.work).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    earlier = json.loads(Path(args.merge).read_text()) if args.merge else None
    info = machine_info()
    profile = profile_part(args, env) if "profile" in args.parts else []
    extraction = extract_part(args, env) if "extract" in args.parts else None
    if earlier:  # figures of an earlier run (its raw JSON) not measured again now
        measured = {(r["rows"], r["metric"]) for r in profile}
        profile = [r for r in earlier.get("profile", []) if (r["rows"], r["metric"]) not in measured] + profile
        profile.sort(key=lambda r: (r["rows"], METRICS.index(r["metric"])))
        extraction = extraction or earlier.get("extraction")
    command = shlex.join(["python", "benchmarks/scale.py", *sys.argv[1:]])
    write_json_atomic(Path(args.work) / "scale-results.json", {"command": command, "profile": profile,
                                                               "extraction": extraction})
    body = render(args, profile, extraction, info, (earlier or {}).get("command", "unknown"))
    publish(SECTION, body, {"profile": profile, "extraction": extraction}, report=args.report,
            no_report=args.no_report, total_seconds=time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
