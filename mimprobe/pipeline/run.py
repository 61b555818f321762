"""`run_pipeline`: every step of an analysis from one spec, each in its own folder under the run folder.

    RUN/spec.resolved.toml   the spec with every default filled in (a spec itself: `mimprobe run` reads it)
    RUN/pipeline.json        per step: status, seconds, when it finished (the steps that produced the files)
    RUN/README.md            what was run, the spec's notes (what the run does and does not show), the headline
    RUN/pretrain/            `run_pretrain_mae` (only with [pretrain]): mae.pth
    RUN/profile-before/      `run_profile` of the starting weights: profile.json (+ csv, parquet, png, features/)
    RUN/placement/           `run_place` on profile-before: placement.json
    RUN/refine/              `run_refine` with that placement: refined.safetensors (+ refined.json, log.csv, ...)
    RUN/profile-after/       `run_profile` of refined.safetensors, with the same options
    RUN/compare/             `run_compare` of the two profiles: report.html, compare.json (+ Markdown, plots)

Re-running: a step whose completion marker exists (`Step.markers`, files written last and atomically by the step)
is skipped with a message; the first incomplete step continues where it stopped (pre-training and refinement
resume from their last checkpoint, extraction from its last recorded row); once a step has run, the steps after
it run again, since their inputs may have changed. A run folder that holds another spec's run (or other files)
is refused unless ``overwrite``, which starts again from nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import _threads
from .._run_folder import claim_folder
from .._versions import software_versions
from ..errors import BadInputError, MimprobeError
from . import api
from .spec import Spec, dump_spec, load_spec

RESOLVED_FILE = "spec.resolved.toml"
STATUS_FILE = "pipeline.json"
README_FILE = "README.md"


@dataclass(frozen=True)
class Step:
    """One pipeline step: its folder under the run folder and the files that mark it complete."""

    name: str
    folder: str
    markers: tuple[str, ...]
    title: str


STEPS = (
    Step("pretrain", "pretrain", ("mae.pth",), "MAE pre-training"),
    Step("profile-before", "profile-before", ("profile.json",), "profile every block of the starting weights"),
    Step("place", "placement", ("placement.json",), "place the refinement heads"),
    Step("refine", "refine", ("refined.safetensors", "refined.json"), "NNA refinement"),
    Step("profile-after", "profile-after", ("profile.json",), "profile every block of the refined weights"),
    Step("compare", "compare", ("report.html", "compare.json"), "compare before and after"),
)
_BY_NAME = {step.name: step for step in STEPS}
OWN_ENTRIES = (*(step.folder for step in STEPS), RESOLVED_FILE, STATUS_FILE, README_FILE)


@dataclass
class StepRecord:
    """What one step did in this call: ``ran``, ``resumed`` (continued an interrupted run) or ``skipped``."""

    name: str
    folder: Path
    status: str
    seconds: float = 0.0
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "folder": str(self.folder), "status": self.status,
                "seconds": round(self.seconds, 2), "detail": self.detail}


@dataclass
class PipelineResult:
    """What `run_pipeline` did, where the report is, and the headline numbers before and after."""

    out: Path
    spec: Spec
    steps: list[StepRecord]
    report: Path | None
    headline: list[dict[str, Any]]
    seconds: float

    def summary(self) -> dict[str, Any]:
        return {"name": self.spec.name, "out": str(self.out), "report": str(self.report) if self.report else None,
                "seconds": round(self.seconds, 2), "steps": [step.to_dict() for step in self.steps],
                "headline": self.headline}


def run_pipeline(spec: str | Path | Spec, *, out: str | Path | None = None, overwrite: bool = False,
                 threads: int | None = None, progress: bool = True,
                 log: Callable[[str], None] | None = None) -> PipelineResult:
    """Run an analysis: pretrain (with [pretrain]) → profile → place → refine → profile → compare.

    Args:
        spec: A TOML spec file (`load_spec`) or a `Spec`.
        out: The run folder, instead of the spec's ``out``.
        overwrite: Start again in a run folder that holds another run (or the same one): the pipeline's own files
            and folders there are deleted first.
        threads: CPU threads for the whole run, instead of the spec's ``threads``.
        progress: Announce every step with a rule and show the steps' progress bars (stderr).
        log: Receives one-line messages (default: printed on stderr).

    Returns:
        The steps' records, the report's path and the headline numbers (`headline_rows`).

    Raises:
        BadInputError: A bad spec, a run folder that holds another run, bad inputs of a step.
        MimprobeError: A step stopped early (SIGTERM during refinement): rerun to resume.
    """
    with _threads.cpu_threads(threads):  # --threads binds the whole run, the spec's reading included
        return _run(spec, out=out, overwrite=overwrite, threads=threads, progress=progress, log=log)


def _run(spec: str | Path | Spec, *, out: str | Path | None, overwrite: bool, threads: int | None,
         progress: bool, log: Callable[[str], None] | None) -> PipelineResult:
    source = None if isinstance(spec, Spec) else str(spec)
    spec = spec if isinstance(spec, Spec) else load_spec(spec)
    if out is not None:
        spec = replace(spec, out=str(out))
    if threads is not None:
        spec = replace(spec, threads=threads)
    run_dir = Path(spec.out)
    console = _console()
    say = log or (lambda message: console.print(message, markup=False, highlight=False))
    _prepare_run_dir(run_dir, spec, source=source, overwrite=overwrite)
    _write_readme(run_dir, spec, source=source, headline=[], status=_read_status(run_dir))
    started = time.perf_counter()
    records: list[StepRecord] = []
    steps = [step for step in STEPS if step.name != "pretrain" or spec.pretrain is not None]
    stale = False  # an earlier step ran in this call: later steps' outputs are out of date
    with _threads.cpu_threads(spec.threads):
        for number, step in enumerate(steps, 1):
            folder = run_dir / step.folder
            _announce(console, say, progress, f"{number}/{len(steps)} {step.name}: {step.title}")
            if not stale and _complete(folder, step):
                say(f"done already ({', '.join(step.markers)} in {folder}): skipped")
                records.append(StepRecord(step.name, folder, "skipped"))
                continue
            if stale and _complete(folder, step):
                say("an earlier step ran again, so this one runs again too")
            step_started = time.perf_counter()
            status, detail = _RUNNERS[step.name](spec, run_dir, folder, fresh=stale, progress=progress, say=say)
            record = StepRecord(step.name, folder, status, time.perf_counter() - step_started, detail)
            records.append(record)
            _record_status(run_dir, record)
            say(f"{step.name} {status} in {record.seconds:.1f} s" + (f": {detail}" if detail else ""))
            stale = True
    headline = headline_rows(run_dir)
    report = run_dir / "compare" / "report.html"
    _write_readme(run_dir, spec, source=source, headline=headline, status=_read_status(run_dir))
    result = PipelineResult(out=run_dir, spec=spec, steps=records, report=report if report.is_file() else None,
                            headline=headline, seconds=time.perf_counter() - started)
    _announce(console, say, progress, f"{spec.name}: done in {result.seconds:.0f} s")
    for line in headline_lines(headline):
        say(line)
    say(f"report: {result.report}" if result.report else f"results: {run_dir}")
    return result


# ---------------------------------------------------------------------------------------------------- the steps

def _starting_weights(spec: Spec, run_dir: Path) -> tuple[str | None, bool]:
    """(checkpoint, pretrained) of the model before refinement: the pre-trained MAE when there is one."""
    if spec.pretrain is not None:
        return str(run_dir / _BY_NAME["pretrain"].folder / "mae.pth"), False
    return spec.checkpoint, spec.pretrained


def _pretrain(spec: Spec, run_dir: Path, folder: Path, *, fresh: bool, progress: bool, say) -> tuple[str, str]:
    result = api.pretrain_mae(spec.model, spec.data, out=str(folder), checkpoint=spec.checkpoint,
                              pretrained=spec.pretrained, model_kwargs=spec.model_kwargs, resume=True, progress=progress, log=say,
                              **spec.options("pretrain"))
    losses = result.epoch_losses
    detail = f"{result.epochs} epochs, loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else ""
    return ("resumed" if result.resumed else "ran"), detail


def _profile(spec: Spec, run_dir: Path, folder: Path, *, checkpoint: str | None, pretrained: bool,
             progress: bool, say) -> tuple[str, str]:
    result = api.profile(spec.model, spec.data, out=str(folder), checkpoint=checkpoint, pretrained=pretrained,
                         model_kwargs=spec.model_kwargs, progress=progress, log=say, **spec.options("profile"))
    return "ran", f"{len(result.table):,} rows"


def _profile_before(spec: Spec, run_dir: Path, folder: Path, *, fresh: bool, progress: bool, say) -> tuple[str, str]:
    checkpoint, pretrained = _starting_weights(spec, run_dir)
    return _profile(spec, run_dir, folder, checkpoint=checkpoint, pretrained=pretrained, progress=progress, say=say)


def _profile_after(spec: Spec, run_dir: Path, folder: Path, *, fresh: bool, progress: bool, say) -> tuple[str, str]:
    from ..refinement.checkpoint import EXPORT

    checkpoint = str(run_dir / _BY_NAME["refine"].folder / EXPORT)
    return _profile(spec, run_dir, folder, checkpoint=checkpoint, pretrained=False, progress=progress, say=say)


def _place(spec: Spec, run_dir: Path, folder: Path, *, fresh: bool, progress: bool, say) -> tuple[str, str]:
    from ..placement import PLACEMENT_FILE, note_line

    placement = api.place(str(run_dir / _BY_NAME["profile-before"].folder), out=str(folder / PLACEMENT_FILE),
                          **spec.options("place"))
    say(placement.reason)
    for note in placement.notes:
        say(note_line(note))
    frozen = f"; first {placement.freeze_blocks} blocks frozen" if placement.freeze_blocks else ""
    return "ran", f"heads on blocks {', '.join(map(str, placement.head_blocks))} (0-based){frozen}"


def _refine(spec: Spec, run_dir: Path, folder: Path, *, fresh: bool, progress: bool, say) -> tuple[str, str]:
    from ..placement import PLACEMENT_FILE
    from ..refinement.checkpoint import CHECKPOINT

    checkpoint, pretrained = _starting_weights(spec, run_dir)
    resume = not fresh and (folder / CHECKPOINT).is_file()
    if resume:
        say(f"continuing the interrupted refinement from {folder / CHECKPOINT}")
    result = api.refine(spec.model, spec.data, out=str(folder), checkpoint=checkpoint, pretrained=pretrained,
                        model_kwargs=spec.model_kwargs,
                        placement=str(run_dir / _BY_NAME["place"].folder / PLACEMENT_FILE), device=spec.device,
                        resume=resume, overwrite=not resume, progress=progress, log=say, **spec.options("refine"))
    if result.stopped_early:
        raise MimprobeError(f"refinement stopped at step {result.steps} (checkpoint saved in {folder}): rerun the "
                            "same command to resume")
    loss = f", last loss {result.last_loss:.4f}" if result.last_loss is not None else ""
    return ("resumed" if resume else "ran"), f"{result.steps} steps{loss}"


def _compare(spec: Spec, run_dir: Path, folder: Path, *, fresh: bool, progress: bool, say) -> tuple[str, str]:
    from ..placement import PLACEMENT_FILE

    api.compare([run_dir / _BY_NAME["profile-before"].folder, run_dir / _BY_NAME["profile-after"].folder],
                out=str(folder), labels=["base", "refined"],
                placement=str(run_dir / _BY_NAME["place"].folder / PLACEMENT_FILE), overwrite=True, log=say,
                **spec.options("compare"))
    return "ran", f"wrote {folder / 'report.html'}"


_RUNNERS = {"pretrain": _pretrain, "profile-before": _profile_before, "place": _place, "refine": _refine,
            "profile-after": _profile_after, "compare": _compare}


# ------------------------------------------------------------------------------------------------ the run folder

def _complete(folder: Path, step: Step) -> bool:
    return all((folder / marker).is_file() for marker in step.markers)


def _prepare_run_dir(run_dir: Path, spec: Spec, *, source: str | None, overwrite: bool) -> None:
    """Refuse a folder that holds another run (unless ``overwrite``); write spec.resolved.toml."""
    entries = sorted(path.name for path in run_dir.iterdir()) if run_dir.is_dir() else []
    resolved_path = run_dir / RESOLVED_FILE
    problem = None
    if resolved_path.is_file():
        try:
            saved = load_spec(resolved_path)
        except BadInputError:
            problem = f"a {RESOLVED_FILE} that cannot be read"
        else:
            differences = _differences(saved.resolved(), spec.resolved())
            if differences:
                problem = f"another spec's run ({'; '.join(differences[:3])})"
    elif entries:
        problem = f"other files ({', '.join(entries[:4])}{', ...' if len(entries) > 4 else ''})"
    claim_folder(run_dir, occupied=problem, overwrite=overwrite, own_entries=OWN_ENTRIES, label="run folder",
                 advice="pass --overwrite to start again there, or set another out")
    if not resolved_path.is_file():
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        header = (f"The resolved spec of this run ({'from ' + source if source else 'built in Python'}, {stamp}):\n"
                  "every default filled in; a key that is absent is None. `mimprobe run` reads this file too.")
        resolved_path.write_text(dump_spec(spec, header=header))


def _differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    found = []
    for key in sorted(set(saved) | set(current), key=lambda k: (isinstance(saved.get(k), dict), k)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found += _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            found.append(f"{prefix}{key}: {_short(old)} -> {_short(new)}")
    return found


def _short(value: Any) -> str:
    text = "absent" if value is None else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _read_status(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATUS_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _record_status(run_dir: Path, record: StepRecord) -> None:
    """pipeline.json keeps, per step, the call that produced its files (skips leave it as it was)."""
    status = _read_status(run_dir)
    status.setdefault("steps", {})[record.name] = {
        **record.to_dict(), "folder": record.folder.name,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    status["versions"] = software_versions()
    tmp = run_dir / (STATUS_FILE + ".tmp")
    tmp.write_text(json.dumps(status, indent=1) + "\n")
    tmp.replace(run_dir / STATUS_FILE)


# --------------------------------------------------------------------------------------------------- reporting

def headline_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """The headline curves of both profiles side by side: per curve and pooling, the best block and its value and
    the last block's value, before and after (`mimprobe.metrics.headlines.best_blocks`), with the paired interval of
    the last block's change from the report's table (compare/compare.csv) where the report has one. Empty until
    both profiles exist."""
    import pandas as pd

    from ..metrics.headlines import best_blocks, headlines
    from ..placement import read_profile

    run_dir = Path(run_dir)
    try:
        (table_before, meta, _), (table_after, _, _) = (read_profile(run_dir / _BY_NAME[name].folder)
                                                        for name in ("profile-before", "profile-after"))
    except BadInputError:
        return []
    preset = (meta.get("config") or {}).get("preset") or "mim-refiner"
    curves = {headline.title: headline for headline in headlines(preset, table_before)}
    after = {(row["metric"], row["pooling"]): row for row in best_blocks(table_after, preset).to_dict("records")}
    compare_csv = run_dir / _BY_NAME["compare"].folder / "compare.csv"
    deltas = None
    if compare_csv.is_file():
        deltas = pd.read_csv(compare_csv, dtype={"params": str})
        deltas = deltas[deltas["side"] == "delta"]
    rows = []
    for row in best_blocks(table_before, preset).to_dict("records"):
        match = after.get((row["metric"], row["pooling"]))
        if match is None:
            continue
        curve = curves[row["metric"]]
        entry = {"metric": row["metric"], "table_metric": curve.metric, "split": curve.split,
                 "pooling": row["pooling"], "last_block": row["last_block"],
                 "before_last": row["last_value"], "after_last": match["last_value"],
                 "before_best_block": row["best_block"], "before_best": row["best_value"],
                 "after_best_block": match["best_block"], "after_best": match["best_value"],
                 "last_delta_low": None, "last_delta_high": None}
        if deltas is not None:
            found = deltas[(deltas["metric"] == curve.metric) & (deltas["split"] == curve.split)
                           & (deltas["pooling"] == row["pooling"]) & (deltas["block"] == row["last_block"])]
            found = found[found["params"].map(lambda text: _has_params(text, curve.param_dict))]
            if len(found) == 1 and pd.notna(found["low"].iloc[0]):
                entry["last_delta_low"] = float(found["low"].iloc[0])
                entry["last_delta_high"] = float(found["high"].iloc[0])
        rows.append(entry)
    return rows


def _has_params(text: Any, wanted: dict[str, Any]) -> bool:
    try:
        params = json.loads(text) if isinstance(text, str) and text else {}
    except json.JSONDecodeError:
        return False
    return all(params.get(key) == value for key, value in wanted.items())


def headline_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per k-NN and linear-probe headline on the evaluation split (not the placement's val split): the
    last block's value before -> after with the change and its paired interval, and the best block before -> after."""
    lines = []
    for row in rows:
        if row["table_metric"] not in ("knn_top1", "linear_top1") or row["split"] == "val":
            continue
        delta = 100 * (row["after_last"] - row["before_last"])  # percent and points, as the report and console
        interval = (f", interval {100 * row['last_delta_low']:+.1f} to {100 * row['last_delta_high']:+.1f}"
                    if row["last_delta_low"] is not None else "")
        lines.append(f"{row['metric']} [{row['pooling']}]: last block {row['last_block']} "
                     f"{100 * row['before_last']:.1f} % -> {100 * row['after_last']:.1f} % ({delta:+.1f} points"
                     f"{interval}); best block {row['before_best_block']} ({100 * row['before_best']:.1f} %) -> "
                     f"block {row['after_best_block']} ({100 * row['after_best']:.1f} %)")
    return lines


def _write_readme(run_dir: Path, spec: Spec, *, source: str | None, headline: list[dict[str, Any]],
                  status: dict[str, Any]) -> None:
    lines = [f"# {spec.name}", ""]
    if spec.notes.strip():
        lines += [spec.notes.strip(), ""]
    lines += [f"Run with `mimprobe run {source or run_dir / RESOLVED_FILE}`; the resolved spec is `{RESOLVED_FILE}`. "
              f"Model `{spec.model}`, data `{spec.data}`.", "",
              "| step | folder | status | seconds |", "| --- | --- | --- | ---: |"]
    steps_status = status.get("steps", {})
    for step in STEPS:
        if step.name == "pretrain" and spec.pretrain is None:
            continue
        entry = steps_status.get(step.name, {})
        done = _complete(run_dir / step.folder, step)
        lines.append(f"| {step.name} | `{step.folder}/` | {'complete' if done else 'not complete'} | "
                     f"{entry.get('seconds', '')} |")
    if headline:
        lines += ["", "Headline (0-based blocks; before -> after; the interval is the report's paired bootstrap "
                      "interval of the change):", ""]
        lines += [f"* {line}" for line in headline_lines(headline)]
    lines += ["", "The report: `compare/report.html` (open it in a browser; no network needed)."]
    (run_dir / README_FILE).write_text("\n".join(lines) + "\n")


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _announce(console, say, progress: bool, title: str) -> None:
    if progress:
        console.rule(f"[bold]{title}")
    else:
        say(f"== {title}")
