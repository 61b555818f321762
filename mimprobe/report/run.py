"""`run_compare`: read profile folders, compare every one with the first, write the report folder.

OUT receives ``report.html`` (self-contained), ``report.md`` (the same content, figures linked), the figures
(``curve_*``, ``delta_*``, ``cka_*``, ``classes_*`` as PNG and SVG), ``compare.csv``/``compare.parquet`` (the
profiles' long tables with ``label``, ``side`` and ``relative_depth`` columns, plus ``side == "delta"`` rows: per
block, after minus before, with the interval in ``low``/``high``), ``best.csv``, ``class_gains.csv``,
``cka_{i}.csv`` and ``compare.json`` (inputs, options, files, versions), which also marks OUT as this command's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._run_folder import claim_folder
from .._versions import software_versions
from ..errors import BadInputError
from ..metrics.profile import COLUMNS
from .comparison import CompareConfig, PairComparison, check_same_data, compare
from .content import build_document, summary_lines
from .html_report import render_html
from .inputs import ProfileInput, find_placement, load_profile
from .markdown_report import render_markdown

MARKER = "compare.json"


@dataclass
class CompareResult:
    """What `run_compare` produced: the inputs read, one `PairComparison` per compared profile, the merged table
    and the files written."""

    out: Path
    profiles: list[ProfileInput]
    pairs: list[PairComparison]
    table: pd.DataFrame
    files: dict[str, str]
    seconds: float
    lines: list[str]

    def summary_lines(self) -> list[str]:
        """The report's plain-language summary (best blocks, biggest gain, where the heads were)."""
        return list(self.lines)

    def summary(self) -> dict[str, Any]:
        """A JSON-serialisable summary (the CLI's ``--json``); values are fractions, blocks 0-based."""
        pairs = []
        for pair in self.pairs:
            best = [{"metric": row["key"].title, "pooling": row["pooling"], "before_block": int(row["before_block"]),
                     "before_value": row["before_value"], "after_block": int(row["after_block"]),
                     "after_value": row["after_value"], "delta": row["delta"], "low": _num(row["low"]),
                     "high": _num(row["high"])} for row in pair.best.to_dict(orient="records")]
            pairs.append({"before": pair.before.label, "after": pair.after.label, "same_depth": pair.same_depth,
                          "same_data": pair.same_data,
                          "head_blocks": list(pair.placement.head_blocks) if pair.placement else None,
                          "placement_source": pair.placement_source, "best": best, "notes": pair.notes,
                          "cka": pair.cka_note})
        return {"out": str(self.out), "summary": self.summary_lines(), "files": self.files,
                "seconds": round(self.seconds, 2), "comparisons": pairs}


def run_compare(profiles: Sequence[str | Path], *, out: str | Path, labels: Sequence[str] | None = None,
                placement: str | Path | None = None, config: CompareConfig = CompareConfig(),
                overwrite: bool = False, notes: str = "",
                log: Callable[[str], None] | None = None) -> CompareResult:
    """Compare every profile with the first and write the report folder (module docstring).

    Args:
        profiles: Two or more ``mimprobe profile`` folders; the first is the reference ("before").
        out: The report folder.
        labels: A name per profile (default: the folder names, made unique).
        placement: placement.json of the refinement (default: found beside each compared profile's checkpoint).
        config: Bootstrap, CKA and data options.
        overwrite: Write into a folder that is not empty (a previous report's listed files are replaced).
        notes: Text shown at the top of the report (e.g. what the run does and does not show).
        log: Progress messages.

    Raises:
        BadInputError: Fewer than two profiles, a missing profile folder, different data without
            ``config.allow_different_data``, or an OUT that holds another run's files without ``overwrite``.
    """
    started = time.perf_counter()
    paths = [Path(p) for p in profiles]
    if len(paths) < 2:
        raise BadInputError("compare needs at least two profile folders: BEFORE AFTER [MORE...]")
    names = _labels(paths, labels)
    inputs = [load_profile(path, label=name) for path, name in zip(paths, names)]
    check_same_data(inputs, allow_different_data=config.allow_different_data)
    out = Path(out)
    record = {"inputs": [str(p.folder.resolve()) for p in inputs], "labels": names}
    _prepare_out(out, record, overwrite=overwrite)
    pairs = []
    for after in inputs[1:]:
        found, source = find_placement(after, placement)
        if log:
            log(f"comparing {after.label} with {inputs[0].label}")
        pairs.append(compare(inputs[0], after, config=config, placement=found, placement_source=source))
        if log:
            for note in pairs[-1].notes:
                if note.startswith("warning: "):
                    log(note)
    document, figures = build_document(inputs, pairs, config=config, out=out, notes=notes)
    files = {"html": out / "report.html", "markdown": out / "report.md", "csv": out / "compare.csv",
             "parquet": out / "compare.parquet", "best": out / "best.csv", "class_gains": out / "class_gains.csv"}
    files["html"].write_text(render_html(document), encoding="utf-8")
    files["markdown"].write_text(render_markdown(document), encoding="utf-8")
    table = merged_table(inputs, pairs)
    table.to_csv(files["csv"], index=False)
    table.to_parquet(files["parquet"], index=False)
    _best_table(pairs).to_csv(files["best"], index=False)
    _class_table(pairs).to_csv(files["class_gains"], index=False)
    for index, pair in enumerate(pairs):
        if pair.cka is not None:
            files[f"cka_{index}"] = out / f"cka_{index}.csv"
            frame = pd.DataFrame(pair.cka.values, index=pd.Index(pair.cka.blocks_x, name=f"{pair.before.label} block"),
                                 columns=[f"{pair.after.label} block {b}" for b in pair.cka.blocks_y])
            frame.to_csv(files[f"cka_{index}"])
    all_files = {name: str(path) for name, path in files.items()}
    all_files.update({f"figure_{path.stem}_{path.suffix[1:]}": str(path) for path in figures})
    seconds = time.perf_counter() - started
    marker = {**record, "config": asdict(config), "placement": str(placement) if placement else None,
              "files": sorted(Path(p).name for p in all_files.values()), "versions": software_versions(),
              "seconds": round(seconds, 2)}
    (out / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    all_files["json"] = str(out / MARKER)
    return CompareResult(out=out, profiles=inputs, pairs=pairs, table=table, files=all_files, seconds=seconds,
                         lines=summary_lines(pairs, config))


def merged_table(inputs: list[ProfileInput], pairs: list[PairComparison]) -> pd.DataFrame:
    """The profiles' long tables (``label``, ``side`` = before/after, ``relative_depth``) and the per-block delta
    rows (``side`` = delta, label ``AFTER - BEFORE``, ``value`` = after minus before, ``low``/``high`` its
    interval; ``params`` is the curve's protocol without per-block choices)."""
    parts = []
    for index, profile in enumerate(inputs):
        frame = profile.table.copy()
        frame["label"], frame["side"] = profile.label, "before" if index == 0 else "after"
        frame["relative_depth"] = (frame["block"] + 1) / profile.num_blocks
        parts.append(frame)
    for pair in pairs:
        if pair.deltas.empty:
            continue
        deltas = pair.deltas
        keys = deltas["key"]
        frame = pd.DataFrame({
            "model": pair.after.model_name, "checkpoint": pair.after.weights, "dataset": pair.after.dataset_name,
            "split": [k.split for k in keys], "block": deltas["block"].astype(int).to_numpy(),
            "pooling": deltas["pooling"].to_numpy(), "metric": [k.metric for k in keys],
            "params": [k.params for k in keys], "value": deltas["delta"].to_numpy(dtype=float), "seed": pd.NA,
            "label": f"{pair.after.label} - {pair.before.label}", "side": "delta",
            "relative_depth": (deltas["block"].to_numpy(dtype=float) + 1) / pair.after.num_blocks,
            "low": deltas["low"].to_numpy(dtype=float), "high": deltas["high"].to_numpy(dtype=float)})
        parts.append(frame)
    table = pd.concat(parts, ignore_index=True)
    for column in ("low", "high"):
        if column not in table:
            table[column] = np.nan
    table["seed"] = table["seed"].astype("Int64")
    return table[[*COLUMNS, "label", "side", "relative_depth", "low", "high"]]


def _best_table(pairs: list[PairComparison]) -> pd.DataFrame:
    frames = []
    for pair in pairs:
        frame = pair.best.copy()
        frame.insert(0, "after_label", pair.after.label)
        frame.insert(0, "before_label", pair.before.label)
        frame.insert(2, "metric", [k.metric for k in frame["key"]])
        frame.insert(3, "split", [k.split for k in frame["key"]])
        frame.insert(4, "params", [k.params for k in frame["key"]])
        frames.append(frame.drop(columns="key"))
    return pd.concat(frames, ignore_index=True)


def _class_table(pairs: list[PairComparison]) -> pd.DataFrame:
    frames = []
    for pair in pairs:
        frame = pair.class_gains.copy()
        frame.insert(0, "after_label", pair.after.label)
        frame.insert(0, "before_label", pair.before.label)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _labels(paths: list[Path], labels: Sequence[str] | None) -> list[str]:
    if labels is not None:
        labels = [str(label).strip() for label in labels]
        if len(labels) != len(paths) or any(not label for label in labels):
            raise BadInputError(f"give one non-empty label per profile: {len(paths)} profiles, {len(labels)} labels")
        if len(set(labels)) != len(labels):
            raise BadInputError(f"labels must be distinct, got {', '.join(labels)}")
        return labels
    names = [path.resolve().name or str(path) for path in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{name} ({index})" for index, name in enumerate(names)]


def _prepare_out(out: Path, record: dict[str, Any], *, overwrite: bool) -> None:
    """Create OUT, or accept it when it is empty; refuse a folder with files in it (a previous report included)
    unless ``overwrite``, before anything is written. With ``overwrite`` the files a previous compare listed in
    compare.json are removed (figures differ between runs); nothing else is deleted."""
    previous: dict[str, Any] = {}
    occupied = None
    if out.is_dir() and any(out.iterdir()):
        marker = out / MARKER
        try:
            previous = json.loads(marker.read_text()) if marker.is_file() else {}
        except (OSError, json.JSONDecodeError):
            previous = {}
        same = previous and all(previous.get(key) == value for key, value in record.items())
        occupied = ("a report of the same comparison" if same else "another comparison") if previous \
            else "other files"
    # figures differ between runs: --overwrite removes those a previous compare listed, nothing else
    own = [Path(name).name for name in previous.get("files", [])]
    claim_folder(out, occupied=occupied, overwrite=overwrite, own_entries=own,
                 advice="choose an empty folder, or pass --overwrite to write the report there")


def _num(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)
