"""Helpers shared by the benchmark scripts: CIFAR-10 subsets in a cache folder, machine facts, report sections.

Nothing here is part of the ``mimprobe`` package; the benchmarks import it as a sibling module.
"""

from __future__ import annotations

import sys

import json

import datetime as _dt
import os
import platform
import re
import shutil
import tarfile
import time
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CIFAR_TAR = REPO.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"
DEFAULT_REPORT = REPO / "reports" / "benchmarks.md"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_MEMBER = re.compile(r"^(train|test)/([a-z]+)/(\d+\.jpg)$")

REPORT_HEADER = """# Benchmarks

Measured numbers from the scripts in `benchmarks/`. Each script rewrites only its own section (between its
`<!-- name:start -->` and `<!-- name:end -->` markers), so sections can be re-measured independently.
"""


def default_cache_dir() -> Path:
    """``$MIMPROBE_BENCH_CACHE`` or ``~/.cache/mimprobe`` (outside the repository)."""
    env = os.environ.get("MIMPROBE_BENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mimprobe"


def per_class_counts(total: int, classes: Iterable[str] = CIFAR10_CLASSES) -> dict[str, int]:
    """Split ``total`` images over the classes as evenly as possible (earlier classes get the remainder)."""
    classes = list(classes)
    base, extra = divmod(total, len(classes))
    return {name: base + (1 if i < extra else 0) for i, name in enumerate(classes)}


def cifar_subsets(totals: Iterable[int], *, split: str = "train", tar_path: Path = DEFAULT_CIFAR_TAR,
                  cache_dir: Path | None = None) -> dict[int, Path]:
    """ImageFolders (``root/<class>/NNNN.jpg``) of the first images per class of a CIFAR-10 split.

    ``cifar10/{split}-first{total}`` under the cache folder holds ``per_class_counts(total)`` images per class, the
    first ones in the archive's (sorted) order. Missing subsets are unpacked in one streaming pass through the
    archive; a folder is renamed into place only when complete, so an interrupted unpack is redone.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    base = cache_dir / "cifar10"
    wanted = {total: base / f"{split}-first{total}" for total in dict.fromkeys(totals)}
    missing = {total: path for total, path in wanted.items() if not (path / ".complete").is_file()}
    if not missing:
        return wanted
    if not Path(tar_path).is_file():
        raise FileNotFoundError(f"CIFAR-10 archive {tar_path} not found (pass --cifar-tar)")
    base.mkdir(parents=True, exist_ok=True)
    counts = {total: per_class_counts(total) for total in missing}
    partial = {total: path.with_name(path.name + ".partial") for total, path in missing.items()}
    for path in partial.values():
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    needed = {name: max(c[name] for c in counts.values()) for name in CIFAR10_CLASSES}
    seen = dict.fromkeys(CIFAR10_CLASSES, 0)
    with tarfile.open(tar_path, "r|gz") as archive:  # streaming: members in archive order
        for member in archive:
            match = _MEMBER.match(member.name)
            if not member.isfile() or match is None or match.group(1) != split:
                continue
            name, filename = match.group(2), match.group(3)
            if name not in seen or seen[name] >= needed[name]:
                if all(seen[c] >= needed[c] for c in CIFAR10_CLASSES):
                    break
                continue
            position = seen[name]
            seen[name] += 1
            data = archive.extractfile(member).read()
            for total, path in partial.items():
                if position < counts[total][name]:
                    target = path / name / filename
                    target.parent.mkdir(exist_ok=True)
                    target.write_bytes(data)
    short = {c: (seen[c], needed[c]) for c in CIFAR10_CLASSES if seen[c] < needed[c]}
    if short:
        raise RuntimeError(f"{tar_path} has too few {split} images per class: {short}")
    for total, path in partial.items():
        (path / ".complete").write_text(f"{total}\n")
        shutil.rmtree(missing[total], ignore_errors=True)
        path.rename(missing[total])
    return wanted


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_times() -> list[int] | None:
    """The aggregate ``cpu`` line of /proc/stat (user nice system idle iowait irq softirq steal ...), in ticks."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None


def steal_fraction(before: list[int] | None, after: list[int] | None) -> float | None:
    """Share of CPU time stolen by the hypervisor between two `cpu_times` readings (None where unknown)."""
    if not before or not after or len(before) < 8 or len(after) < 8:
        return None
    delta = [a - b for a, b in zip(after[:8], before[:8])]
    total = sum(delta)
    return delta[7] / total if total > 0 else None


class CpuMonitor:
    """How much of the machine other processes used over an interval: a shared VM's load skews timings.

    ``other_share`` is the CPU time of everything but this process (and its waited-for children), as a fraction
    of the machine's capacity (CPUs x wall time); ``steal_share`` the part the hypervisor took.
    """

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.ticks = cpu_times()
        self.own = self._own()

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def stop(self) -> dict[str, float | None]:
        wall = time.perf_counter() - self.started
        own = self._own() - self.own
        after = cpu_times()
        result: dict[str, float | None] = {"wall_s": wall, "own_cpu_s": own, "other_share": None,
                                           "steal_share": steal_fraction(self.ticks, after),
                                           "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
        if self.ticks and after and len(after) >= 8:
            hz = os.sysconf("SC_CLK_TCK")
            delta = [a - b for a, b in zip(after[:8], self.ticks[:8])]
            busy = (sum(delta) - delta[3] - delta[4]) / hz  # all but idle and iowait
            capacity = (os.cpu_count() or 1) * wall
            result["machine_busy_s"] = busy
            result["other_share"] = max(0.0, busy - own) / capacity if capacity > 0 else None
        return result


def machine_info() -> dict[str, str]:
    import timm
    import torch

    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cpu_count": str(os.cpu_count()),
        "affinity": str(len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else "?",
        "torch": torch.__version__,
        "torch_threads": str(torch.get_num_threads()),
        "timm": timm.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def machine_line(info: dict[str, str]) -> str:
    return (f"{info['date']}; {info['cpu']}, {info['cpu_count']} CPUs (usable {info['affinity']}), "
            f"torch {info['torch']} ({info['torch_threads']} threads, default), timm {info['timm']}, "
            f"Python {info['python']}, {info['platform']}")


def write_section(name: str, body: str, report: Path = DEFAULT_REPORT) -> None:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` in the report (append the
    section if the markers are missing; create the file with a short header if it does not exist)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n{body.strip()}\n{end}"
    report = Path(report)
    text = report.read_text() if report.is_file() else REPORT_HEADER
    if start in text and end in text and text.index(start) < text.index(end):
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    report.parent.mkdir(parents=True, exist_ok=True)
    tmp = report.with_name(report.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, report)


def log(message: str) -> None:
    """A timestamped progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def publish(section: str, body: str, raw: dict, *, report: Path, no_report: bool, total_seconds: float) -> None:
    """Print the raw results on stderr, then print the section (``--no-report``) or write it into the report."""
    print(json.dumps(raw, indent=1, default=str), file=sys.stderr)
    if no_report:
        print(body)
    else:
        write_section(section, body, report)
        log(f"wrote section '{section}' of {report} ({total_seconds:.0f} s in all)")
