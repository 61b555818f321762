"""Benchmark of the block metrics: FAISS k-NN against DINO's torch k-NN, scikit-learn and the matmul floor; memory.

Run from the repository root::

    python benchmarks/metrics.py            # the figures in reports/benchmarks.md (several minutes on 2 CPUs)
    python benchmarks/metrics.py --quick    # a small smoke run, printed instead of written
    python benchmarks/metrics.py --help

Measures, in one run, on CIFAR-10-sized random features (50,000 train and 10,000 test rows, 10 classes, one
block, widths 192 and 768, float32, seeded):

1. Speed of ``mimprobe.metrics.knn.evaluate_knn`` with the ``dino`` preset (k=20, T=0.07, exp weights), which
   is what the profile runs per block, against
   (i) DINO's ``knn_classifier`` (``eval_knn.py`` of facebookresearch/dino) re-implemented here in torch:
       L2-normalised tensors, the test split in 100 chunks, ``torch.mm(chunk, train.T)``, ``topk(k)``, exp(sim/T)
       weighted one-hot votes. Goal: ours at least 1.5x faster;
   (ii) scikit-learn ``KNeighborsClassifier(algorithm="brute", metric="cosine", n_neighbors=20)`` fit + predict.
       Goal: ours at least 10x faster;
   (iii) the compute floor: 2 * N_train * N_test * D flops at this machine's float32 matmul rate, measured in the
       same run (best of several 4096 x 4096 ``torch.mm``). Goal: ours at >= 80 % of that rate.
   The matmul rate, ours and DINO's are timed in interleaved repetitions, scikit-learn twice; the ratios use
   the best times (on a shared machine other processes only ever add time), medians are shown beside them.
   Ours and DINO's predictions are compared (they must agree).
2. Peak memory of k-NN on a float16 ``np.memmap`` bank on disk, twice the size of the byte budget given to
   ``evaluate_knn(memory_budget=...)``, in a fresh subprocess: VmHWM minus the RSS after imports (the peak is
   reset after imports through /proc/self/clear_refs where the kernel allows it). Goal: at most the budget.
3. The linear probes, by ``benchmarks/_metrics_probe.py`` when it exists (``run(args) -> markdown``).

The results replace the ``metrics`` section of reports/benchmarks.md (other sections are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_REPORT, CpuMonitor, log, machine_info, machine_line, publish  # noqa: E402

SECTION = "metrics"
TORCH_SPEEDUP_GOAL = 1.5
SKLEARN_SPEEDUP_GOAL = 10.0
FLOOR_FRACTION_GOAL = 0.80
MIB = 1024 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    speed = parser.add_argument_group("k-NN speed (1)")
    speed.add_argument("--n-train", type=int, default=50_000, help="train rows (the bank)")
    speed.add_argument("--n-test", type=int, default=10_000, help="test rows (the queries)")
    speed.add_argument("--classes", type=int, default=10, help="number of classes")
    speed.add_argument("--widths", type=int, nargs="+", default=[192, 768], help="feature widths (ViT-Ti, ViT-B)")
    speed.add_argument("--repeats", type=int, default=5,
                       help="interleaved repetitions of the matmul rate, ours and DINO's")
    speed.add_argument("--sklearn-repeats", type=int, default=2, help="repetitions of scikit-learn")
    speed.add_argument("--sklearn-queries", type=int, default=None,
                       help="time scikit-learn on the first N test rows and scale linearly (default: all)")
    speed.add_argument("--matmul-size", type=int, default=4096, help="square float32 torch.mm for the flop rate")
    speed.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                       help="threads of FAISS and torch (scikit-learn uses its BLAS default)")
    memory = parser.add_argument_group("k-NN memory (2)")
    memory.add_argument("--memory-budget-mib", type=float, default=128.0, help="evaluate_knn(memory_budget=...)")
    memory.add_argument("--memory-width", type=int, default=768, help="feature width of the memory-mapped bank")
    memory.add_argument("--memory-queries", type=int, default=10_000, help="float16 memory-mapped query rows")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random features")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (10k/2k rows, 1 repetition, 16 MiB budget); prints instead of writing")
    parser.add_argument("--skip-probe", action="store_true", help="leave out the linear probes (3)")
    parser.add_argument("--skip-speed", action="store_true", help="leave out the k-NN speed part (1)")
    parser.add_argument("--skip-memory", action="store_true", help="leave out the k-NN memory part (2)")
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT,
                        help="markdown file; only its metrics section is replaced")
    parser.add_argument("--no-report", action="store_true", help="print the section instead of writing it")
    # internal: the memory child
    parser.add_argument("--memory-child", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test = min(args.n_train, 10_000), min(args.n_test, 2_000)
        args.repeats, args.sklearn_repeats = 1, 1
        args.memory_budget_mib, args.memory_queries = min(args.memory_budget_mib, 16.0), min(args.memory_queries,
                                                                                            1_000)
        args.no_report = True
    return args


def random_features(n_rows: int, width: int, classes: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.standard_normal((n_rows, width), dtype=np.float32), rng.integers(0, classes, n_rows)


# --- 1: speed -------------------------------------------------------------------------------------------------

def dino_knn_classifier(train_features, train_labels, test_features, test_labels, k, T, num_classes):
    """DINO's ``knn_classifier`` (facebookresearch/dino, eval_knn.py), on L2-normalised torch tensors.

    Returns (top1 %, top5 %, (n_test,) top-1 predictions); the predictions are collected for the agreement check.
    """
    import torch

    top1, top5, total = 0.0, 0.0, 0
    train_features = train_features.t()
    num_test_images, num_chunks = test_labels.shape[0], 100
    imgs_per_chunk = num_test_images // num_chunks
    retrieval_one_hot = torch.zeros(k, num_classes)
    predicted = []
    for idx in range(0, num_test_images, imgs_per_chunk):
        features = test_features[idx: min((idx + imgs_per_chunk), num_test_images), :]
        targets = test_labels[idx: min((idx + imgs_per_chunk), num_test_images)]
        batch_size = targets.shape[0]
        similarity = torch.mm(features, train_features)
        distances, indices = similarity.topk(k, largest=True, sorted=True)
        candidates = train_labels.view(1, -1).expand(batch_size, -1)
        retrieved_neighbors = torch.gather(candidates, 1, indices)
        retrieval_one_hot.resize_(batch_size * k, num_classes).zero_()
        retrieval_one_hot.scatter_(1, retrieved_neighbors.view(-1, 1), 1)
        distances_transform = distances.clone().div_(T).exp_()
        probs = torch.sum(torch.mul(retrieval_one_hot.view(batch_size, -1, num_classes),
                                    distances_transform.view(batch_size, -1, 1)), 1)
        _, predictions = probs.sort(1, True)
        correct = predictions.eq(targets.data.view(-1, 1))
        top1 = top1 + correct.narrow(1, 0, 1).sum().item()
        top5 = top5 + correct.narrow(1, 0, min(5, k)).sum().item()
        total += targets.size(0)
        predicted.append(predictions[:, 0])
    return top1 * 100.0 / total, top5 * 100.0 / total, torch.cat(predicted).numpy()


def matmul_rate(size: int, repeats: int = 5) -> dict:
    """Best float32 flop rate of a square ``torch.mm`` (one warm-up)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - started)
    return {"size": size, "times": times, "flops_per_s": 2 * size ** 3 / min(times)}


def speed_benchmark(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.neighbors import KNeighborsClassifier

    from mimprobe.metrics.knn import PRESETS, evaluate_knn, knn_predict

    torch.set_num_threads(args.threads)
    preset = PRESETS["dino"]
    k, temperature = preset.ks[0], preset.temperatures[0]
    class_names = [f"class{c}" for c in range(args.classes)]
    monitor = CpuMonitor()
    rates = []
    widths = {}
    for width in args.widths:
        x_train, y_train = random_features(args.n_train, width, args.classes, args.seed)
        x_test, y_test = random_features(args.n_test, width, args.classes, args.seed + 1)

        def run_ours() -> tuple[float, float]:
            started = time.perf_counter()
            rows = evaluate_knn(x_train, y_train, x_test, y_test, preset="dino", split="test",
                                class_names=class_names, threads=args.threads)
            seconds = time.perf_counter() - started
            return seconds, next(r.value for r in rows if r.metric == "knn_top1")

        def run_torch() -> tuple[float, float, np.ndarray]:
            started = time.perf_counter()
            train = F.normalize(torch.from_numpy(x_train), dim=1, p=2)
            test = F.normalize(torch.from_numpy(x_test), dim=1, p=2)
            top1, _, predicted = dino_knn_classifier(train, torch.from_numpy(y_train), test, torch.from_numpy(y_test),
                                                     k, temperature, args.classes)
            return time.perf_counter() - started, top1 / 100, predicted

        log(f"width {width}: warm-up")
        run_ours()
        torch_predicted = run_torch()[2]
        ours_predicted = knn_predict(x_train, y_train, x_test, ks=(k,), temperatures=(temperature,),
                                     num_classes=args.classes, threads=args.threads).predictions(k, temperature)
        agreement = float((ours_predicted == torch_predicted).mean())
        ours, torch_times, tops = [], [], {}
        for rep in range(args.repeats):  # matmul rate, ours, DINO's: a busy spell slows neighbours alike
            rates.append(matmul_rate(args.matmul_size, repeats=2))
            seconds, tops["ours"] = run_ours()
            ours.append(seconds)
            seconds, tops["torch"], _ = run_torch()
            torch_times.append(seconds)
            log(f"width {width} rep {rep + 1}: matmul {rates[-1]['flops_per_s'] / 1e9:.1f} GFLOP/s, ours "
                f"{ours[-1]:.2f} s, DINO torch {torch_times[-1]:.2f} s")
        n_sklearn = min(args.sklearn_queries or args.n_test, args.n_test)
        sklearn_runs = []
        for _ in range(args.sklearn_repeats):
            started = time.perf_counter()
            classifier = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric="cosine").fit(x_train, y_train)
            sklearn_predicted = classifier.predict(x_test[:n_sklearn])
            sklearn_runs.append(time.perf_counter() - started)
            log(f"width {width}: scikit-learn {sklearn_runs[-1]:.2f} s on {n_sklearn} queries")
        scale = args.n_test / n_sklearn
        widths[width] = {
            "ours": ours, "torch": torch_times, "sklearn_runs": sklearn_runs, "sklearn_queries": n_sklearn,
            "best": {"ours": min(ours), "torch": min(torch_times), "sklearn": min(sklearn_runs) * scale},
            "median": {"ours": statistics.median(ours), "torch": statistics.median(torch_times),
                       "sklearn": statistics.median(sklearn_runs) * scale},
            "flops": 2 * args.n_train * args.n_test * width,
            "top1": {"ours": tops["ours"], "torch": tops["torch"],
                     "sklearn_uniform": float((sklearn_predicted == y_test[:n_sklearn]).mean())},
            "agreement_with_torch": agreement,
        }
    rate = max(r["flops_per_s"] for r in rates)
    for result in widths.values():
        best, median = result["best"], result["median"]
        result["floor_seconds"] = result["flops"] / rate
        result["floor_fraction"] = result["floor_seconds"] / best["ours"]
        result["speedup_torch"] = best["torch"] / best["ours"]
        result["speedup_sklearn"] = best["sklearn"] / best["ours"]
        result["median_speedup_torch"] = median["torch"] / median["ours"]
        result["median_speedup_sklearn"] = median["sklearn"] / median["ours"]
    return {"preset": preset.params(k, temperature), "widths": widths, "rates": rates, "rate": rate,
            "load": monitor.stop()}


# --- 2: memory ------------------------------------------------------------------------------------------------

def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])  # kB (KiB)
    except OSError:
        pass
    return None


def memory_child(args: argparse.Namespace) -> None:
    """Runs in the fresh subprocess: imports, RSS, reset of the peak, then only the k-NN; one JSON line out."""
    import numpy as np

    from mimprobe.metrics.knn import evaluate_knn, plan_search

    folder = Path(args.memory_child)
    spec = json.loads((folder / "spec.json").read_text())
    train = np.load(folder / "train.npy", mmap_mode="r")
    query = np.load(folder / "query.npy", mmap_mode="r")
    train_labels, query_labels = np.load(folder / "train_labels.npy"), np.load(folder / "query_labels.npy")
    class_names = [f"class{c}" for c in range(spec["classes"])]
    rss_after_imports = _proc_status_kib("VmRSS")
    try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        peak_reset = _proc_status_kib("VmHWM") <= rss_after_imports + 64
    except OSError:
        peak_reset = False
    budget = spec["budget_bytes"]
    plan = plan_search(len(train), len(query), train.shape[1], 20, num_classes=spec["classes"], memory_budget=budget)
    started = time.perf_counter()
    rows = evaluate_knn(train, train_labels, query, query_labels, preset="dino", split="test",
                        class_names=class_names, memory_budget=budget, threads=spec["threads"])
    seconds = time.perf_counter() - started
    print(json.dumps({
        "rss_after_imports_kib": rss_after_imports, "peak_reset": peak_reset, "vmhwm_kib": _proc_status_kib("VmHWM"),
        "vmrss_end_kib": _proc_status_kib("VmRSS"), "seconds": seconds, "chunk_rows": plan.chunk_rows,
        "shard_rows": plan.shard_rows, "top1": next(r.value for r in rows if r.metric == "knn_top1"),
    }), flush=True)
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: nothing after the measurement belongs to it


def memory_benchmark(args: argparse.Namespace) -> dict:
    import numpy as np

    budget = int(args.memory_budget_mib * MIB)
    width = args.memory_width
    n_bank = 2 * budget // (width * 2)  # float16 bank = twice the budget
    monitor = CpuMonitor()
    with tempfile.TemporaryDirectory(prefix="mimprobe-bench-knn-") as tmp:
        folder = Path(tmp)
        rng = np.random.default_rng(args.seed)
        for name, rows in (("train", n_bank), ("query", args.memory_queries)):
            array = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.float16, shape=(rows, width))
            for start in range(0, rows, 16384):
                stop = min(start + 16384, rows)
                array[start:stop] = rng.standard_normal((stop - start, width), dtype=np.float32)
            array.flush()
            del array
            np.save(folder / f"{name}_labels.npy", rng.integers(0, args.classes, rows))
        spec = {"budget_bytes": budget, "classes": args.classes, "threads": args.threads}
        (folder / "spec.json").write_text(json.dumps(spec))
        bank_bytes = (folder / "train.npy").stat().st_size
        log(f"memory: float16 bank {n_bank} x {width} ({bank_bytes / MIB:.0f} MiB on disk), {args.memory_queries} "
            f"queries, budget {budget / MIB:.0f} MiB; fresh subprocess")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", str(folder)]
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"memory child failed ({proc.returncode}): {proc.stderr[-3000:]}")
        report = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    report.update({"budget_bytes": budget, "bank_rows": n_bank, "width": width, "bank_bytes": bank_bytes,
                   "queries": args.memory_queries, "child_wall_seconds": wall, "load": monitor.stop()})
    report["increase_kib"] = report["vmhwm_kib"] - report["rss_after_imports_kib"]
    log(f"memory: peak increase {report['increase_kib'] / 1024:.1f} MiB for a {budget / MIB:.0f} MiB budget "
        f"({report['seconds']:.1f} s)")
    return report


# --- 3: linear probes -----------------------------------------------------------------------------------------

def probe_benchmark(args: argparse.Namespace) -> str:
    try:
        import _metrics_probe
    except ImportError:
        return "not measured in this run (`benchmarks/_metrics_probe.py` is absent)."
    log("linear probes: benchmarks/_metrics_probe.py")
    try:
        return _metrics_probe.run(args)
    except Exception as error:  # its failure must not lose the k-NN figures measured above
        traceback.print_exc()
        return f"not measured in this run: `_metrics_probe.run` failed with {type(error).__name__}: {error}"


# --- report ---------------------------------------------------------------------------------------------------

def _secs(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def _load_line(what: str, load: dict | None) -> str:
    if not load or load.get("other_share") is None:
        return "- Machine load from other processes: unknown (no /proc/stat)."
    steal = f", hypervisor steal {100 * load['steal_share']:.1f}%" if load.get("steal_share") is not None else ""
    return (f"- Load during the {what}: other processes used {100 * load['other_share']:.0f}% of the machine's CPU "
            f"capacity{steal} (1-min load average at the end {load['loadavg_1min']:.2f}, this run included).")


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def render(args: argparse.Namespace, info: dict, speed: dict | None, memory: dict | None, probe: str | None,
           total_seconds: float, command: str) -> str:
    lines = [
        "## Metrics: k-NN with FAISS, and linear probes (`benchmarks/metrics.py`)",
        "",
        f"- Machine: {machine_line(info)}",
        f"- Command (from the repository root): `{command}`",
        f"- Whole run: {total_seconds:.0f} s ({total_seconds / 60:.1f} min)" + (" (`--quick`)" if args.quick else ""),
        f"- Threads: FAISS and torch {args.threads}; scikit-learn with its BLAS default.",
        "",
    ]
    if speed is not None:
        p = speed["preset"]
        lines += [
            "### k-NN speed: CIFAR-10-sized random features",
            "",
            f"{args.n_train:,} train and {args.n_test:,} test rows of seeded standard-normal float32 features, "
            f"{args.classes} classes, one block. Ours: `evaluate_knn(preset=\"dino\")` (k={p['k']}, T={p['T']}, "
            "exp weights): FAISS exact inner-product search (`faiss.knn`, the kernel of `IndexFlatIP.search`) on "
            "L2-normalised rows, the top-k searched once, weighted votes, top-1/top-5/per-class rows; timed from the "
            "float32 arrays to the rows. DINO: its `knn_classifier` in torch (test split in 100 chunks, "
            "`torch.mm` + `topk`, exp(sim/T) one-hot votes), timed with the L2 normalisation. scikit-learn: "
            "`KNeighborsClassifier(algorithm=\"brute\", metric=\"cosine\", n_neighbors=20)` fit + predict "
            "(uniform votes). Floor: 2 x N_train x N_test x D flops at the best float32 rate of "
            f"{speed['rates'][0]['size']}x{speed['rates'][0]['size']} `torch.mm` (best of 2, measured before every "
            f"repetition): **{speed['rate'] / 1e9:.1f} GFLOP/s** (per repetition: "
            + ", ".join(f"{r['flops_per_s'] / 1e9:.0f}" for r in speed["rates"]) + "). "
            f"Warm-up once, then {args.repeats} interleaved repetitions (matmul rate, ours, DINO's), scikit-learn "
            f"{args.sklearn_repeats}x. Ratios from the best times (a shared machine only ever adds time); the "
            "ratio of medians in brackets.",
            "",
            "| width | ours (s) | DINO torch (s) | scikit-learn (s) | floor (s) | vs DINO | vs scikit-learn | "
            "share of matmul rate |",
            "|---:|---|---|---|---:|---:|---:|---:|",
        ]
        for width, r in speed["widths"].items():
            best, median = r["best"], r["median"]
            sk = f"{_secs(r['sklearn_runs'])} (best **{best['sklearn']:.2f}**)"
            if r["sklearn_queries"] < args.n_test:
                sk = (f"{_secs(r['sklearn_runs'])} on {r['sklearn_queries']:,} queries, scaled linearly: best "
                      f"**{best['sklearn']:.2f}**")
            lines.append(
                f"| {width} | {_secs(r['ours'])} (best **{best['ours']:.2f}**, median {median['ours']:.2f}) | "
                f"{_secs(r['torch'])} (best **{best['torch']:.2f}**, median {median['torch']:.2f}) | {sk} | "
                f"{r['floor_seconds']:.2f} | **{r['speedup_torch']:.2f}x** ({r['median_speedup_torch']:.2f}x) | "
                f"**{r['speedup_sklearn']:.1f}x** ({r['median_speedup_sklearn']:.1f}x) | "
                f"**{100 * r['floor_fraction']:.0f}%** |")
        widths = speed["widths"].values()
        torch_ok = all(r["speedup_torch"] >= TORCH_SPEEDUP_GOAL for r in widths)
        sklearn_ok = all(r["speedup_sklearn"] >= SKLEARN_SPEEDUP_GOAL for r in widths)
        floor_ok = all(r["floor_fraction"] >= FLOOR_FRACTION_GOAL for r in widths)
        lines += [
            "",
            f"- Goal at least {TORCH_SPEEDUP_GOAL}x faster than DINO's torch k-NN: **{_met(torch_ok)}** ("
            + ", ".join(f"{w}: {r['speedup_torch']:.2f}x" for w, r in speed["widths"].items()) + ").",
            f"- Goal at least {SKLEARN_SPEEDUP_GOAL:.0f}x faster than scikit-learn: **{_met(sklearn_ok)}** ("
            + ", ".join(f"{w}: {r['speedup_sklearn']:.1f}x" for w, r in speed["widths"].items()) + ").",
            f"- Goal at least {100 * FLOOR_FRACTION_GOAL:.0f}% of the matmul rate: **{_met(floor_ok)}** ("
            + ", ".join(f"{w}: {100 * r['floor_fraction']:.0f}%" for w, r in speed["widths"].items()) + ").",
            "- Check: ours and DINO's predict the same class for "
            + ", ".join(f"{100 * r['agreement_with_torch']:.2f}% (width {w})" for w, r in speed["widths"].items())
            + " of the test rows; top-1 (chance level on random features) ours / DINO / scikit-learn uniform: "
            + "; ".join(f"{w}: {r['top1']['ours']:.4f} / {r['top1']['torch']:.4f} / "
                        f"{r['top1']['sklearn_uniform']:.4f}" for w, r in speed["widths"].items()) + ".",
        ]
        if not sklearn_ok:
            lines.append(
                "- Why the scikit-learn goal can be out of reach: ours runs at about the matmul rate (see the "
                "floor column), so no exact float32 search can be much faster; scikit-learn's brute cosine path "
                "also computes its distances with BLAS, so its time is the same matmul plus an `argpartition` over "
                "every train row for every query. The gap is widest where the matmul is cheapest (small widths).")
        lines.append(_load_line("k-NN timings", speed["load"]))
        lines.append("")
    if memory is not None:
        m = memory
        increase_mib = m["increase_kib"] / 1024
        budget_mib = m["budget_bytes"] / MIB
        reset = ("reset after imports through /proc/self/clear_refs" if m["peak_reset"] else
                 "not resettable here, so the import peak is included")
        lines += [
            "### k-NN memory: a float16 memory-mapped bank twice the budget",
            "",
            f"Bank: {m['bank_rows']:,} x {m['width']} float16 rows in a `.npy` memory map on disk "
            f"({m['bank_bytes'] / MIB:.0f} MiB; {2 * m['bank_bytes'] / MIB:.0f} MiB as float32), "
            f"{m['queries']:,} float16 memory-mapped queries, {args.classes} classes. "
            f"`evaluate_knn(preset=\"dino\", memory_budget={m['budget_bytes']})` ({budget_mib:.0f} MiB) in a fresh "
            f"subprocess: the bank is searched in shards of {m['shard_rows']:,} rows with a merged top-k, queries "
            f"in chunks of {m['chunk_rows']:,} rows, and the read pages of the read-only maps are released after "
            f"each chunk. Peak = VmHWM at the end (peak {reset}) minus VmRSS after the imports "
            f"({m['rss_after_imports_kib'] / 1024:.0f} MiB).",
            "",
            "| budget (MiB) | bank on disk (MiB) | peak RSS increase (MiB) | share of budget | k-NN time (s) |",
            "|---:|---:|---:|---:|---:|",
            f"| {budget_mib:.0f} | {m['bank_bytes'] / MIB:.0f} | **{increase_mib:.1f}** | "
            f"{100 * increase_mib / budget_mib:.0f}% | {m['seconds']:.1f} |",
            "",
            f"- Goal peak increase at most the budget: **{_met(increase_mib <= budget_mib)}**.",
            _load_line("memory run", m["load"]),
            "",
        ]
    lines += ["### Linear probes", "", (probe or "not measured in this run (`--skip-probe`)."), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return 0
    started = time.perf_counter()
    command = "python " + shlex.join(sys.argv if argv is None else ["benchmarks/metrics.py", *argv])
    # memory first, while this process is small (the child is a fresh interpreter either way)
    memory = None if args.skip_memory else memory_benchmark(args)
    speed = None if args.skip_speed else speed_benchmark(args)
    probe = None if args.skip_probe else probe_benchmark(args)
    info = machine_info()
    total_seconds = time.perf_counter() - started
    body = render(args, info, speed, memory, probe, total_seconds, command)
    raw = {"speed": speed, "memory": memory, "machine": info, "seconds": total_seconds}
    publish(SECTION, body, raw, report=args.report, no_report=args.no_report, total_seconds=total_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
