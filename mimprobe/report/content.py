"""The report's content: sections, tables and figures built from the comparisons (shared by HTML and Markdown).

Numbers: accuracies as percentages with 1 decimal, differences with a sign in percentage points, other scores
with 3 decimals (effective rank 1). Blocks are 0-based, as timm's ``blocks.{i}`` (block 11 is the last of 12).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..metrics.headlines import PRIMARY_K, headline_curve, indistinguishable_blocks
from ..metrics.knn import PRESETS as KNN_PRESETS
from ..metrics.points import for_point
from ..placement import note_line
from .comparison import CompareConfig, PairComparison
from ..metrics.curves import Curve, curve_rows
from ..metrics.readout import block_span, readout_records, reference_lines
from .curves import curve
from .document import Bullets, Document, Image, Paragraph, Row, Section, Table
from .inputs import ProfileInput, find_refine_run, weights_phrase
from .plots import SideCurve, plot_cka, plot_class_gains, plot_curves, plot_deltas

CLASS_ROWS = 20   # per-class table: all classes up to this many, else the 10 largest gains and 10 largest losses


def build_document(profiles: list[ProfileInput], pairs: list[PairComparison], *, config: CompareConfig,
                   out: Path, notes: str = "") -> tuple[Document, list[Path]]:
    """The report document and the figure files it wrote into ``out`` (PNG and SVG).

    ``notes``: the author's text about the run (what it does and does not show), shown first, one paragraph per
    blank-line-separated block."""
    figures: list[Path] = []
    reference = profiles[0]
    others = ", ".join(p.label for p in profiles[1:])
    title = f"mimprobe compare: {reference.label} vs {others}"
    intro: list[Paragraph | Bullets] = [Paragraph(" ".join(block.split()), kind="note")
                                        for block in notes.strip().split("\n\n") if block.strip()]
    intro.append(Bullets(tuple(summary_lines(pairs, config)), kind="summary"))
    for pair in pairs:
        intro += [Paragraph(note, kind="note") for note in pair.notes]
    # one before/after pair of the same depth: each curve's paired differences sit beside it (same row)
    beside = pairs[0] if len(pairs) == 1 and pairs[0].same_depth else None
    sections = [_curves_section(profiles, pairs, out, figures, config=config, beside=beside)]
    for index, pair in enumerate(pairs):
        suffix = f": {pair.after.label} vs {pair.before.label}" if len(pairs) > 1 else ""
        sections.append(_best_section(index, pair, suffix, config))
        if pair.same_depth:
            sections.append(_delta_section(index, pair, suffix, config, out, figures,
                                           figures_beside_curves=pair is beside))
        sections.append(_cka_section(index, pair, suffix, out, figures))
        sections.append(_class_section(index, pair, suffix, out, figures))
        sections.append(_placement_section(index, pair, suffix))
    readouts = _readout_section(profiles)
    if readouts is not None:
        sections.append(readouts)
    labelfree = _labelfree_section(profiles)
    if labelfree is not None:
        sections.append(labelfree)
    sections.append(_config_section(profiles))
    sections.append(_method_section(pairs, config))
    return Document(title=title, intro=tuple(intro), sections=tuple(sections)), figures


# --- summary -------------------------------------------------------------------------------------------------

def summary_lines(pairs: list[PairComparison], config: CompareConfig) -> list[str]:
    """The plain-language summary at the top of the report (and of the CLI's output)."""
    lines = []
    for pair in pairs:
        prefix = f"{pair.after.label} vs {pair.before.label}: " if len(pairs) > 1 else ""
        key = pair.headline
        if key is None:
            continue
        best = pair.best[(pair.best["key"] == key) & (pair.best["pooling"] == pair.class_pooling)]
        if best.empty:
            best = pair.best[pair.best["key"] == key]
        row = best.iloc[0]
        interval = _interval_text(row["low"], row["high"], key, config)
        lines.append(
            f"{prefix}best block for {key.title} ({row['pooling']}): {pair.before.label} block {row['before_block']} "
            f"at {key.format_value(row['before_value'])}{key.unit_suffix}, {pair.after.label} block {row['after_block']} at "
            f"{key.format_value(row['after_value'])}{key.unit_suffix}: {key.format_delta(row['delta'])}"
            f"{' points' if key.is_percent else ''}{interval}.")
        ties = [(profile.label, _tied(profile, key, row["pooling"], int(block)))
                for profile, block in ((pair.before, row["before_block"]), (pair.after, row["after_block"]))]
        ties = [(label, blocks) for label, blocks in ties if blocks and len(blocks) > 1]
        if ties:
            lines.append(f"{prefix}blocks not distinguishable from the best (exact McNemar test on the same images, "
                         "p >= 0.05): " + "; ".join(f"{label} {_blocks(blocks)}" for label, blocks in ties) + ".")
        if pair.same_depth and not pair.deltas.empty:
            rows = pair.deltas[(pair.deltas["key"] == key) & (pair.deltas["pooling"] == row["pooling"])]
            if not rows.empty:
                sign = 1 if key.higher_is_better else -1
                gains = rows["delta"] * sign
                top, worst = rows.loc[gains.idxmax()], rows.loc[gains.idxmin()]
                points = " points" if key.is_percent else ""
                if gains.max() > 0:
                    text = (f"{prefix}biggest gain at block {int(top['block'])}: {key.format_delta(top['delta'])}"
                            f"{points} ({key.format_value(top['before'])} → {key.format_value(top['after'])}"
                            f"{key.unit_suffix})")
                else:
                    text = f"{prefix}no block improved on {key.title} ({row['pooling']})"
                if gains.min() < 0:
                    text += (f"; largest drop at block {int(worst['block'])}: {key.format_delta(worst['delta'])}"
                             f"{points}")
                lines.append(text + ".")
        lines += _chance_lines(pair, config, prefix)
        run = find_refine_run(pair.after)
        if run is not None:
            lines.append(f"{prefix}{run.describe()}.")
        if pair.placement is not None:
            placement = pair.placement
            lines.append(f"{prefix}refinement heads were on blocks {_blocks(placement.head_blocks)} (of "
                         f"{placement.num_blocks}; rule {placement.rule}"
                         + (f", first {placement.freeze_blocks} blocks frozen" if placement.freeze_blocks else "")
                         + f"): {placement.reason}")
        else:
            lines.append(f"{prefix}{pair.placement_source}.")
        if pair.relative_depth:
            lines.append(f"{prefix}the models have different depths ({pair.before.num_blocks} and "
                         f"{pair.after.num_blocks} blocks): curves are compared by relative depth.")
    randoms = dict.fromkeys(p.label for pair in pairs for p in (pair.before, pair.after) if p.weights == "random")
    for label in randoms:
        lines.append(f"{label}: random initialisation (no pretrained weights): its curves describe an untrained "
                     "network.")
    lines.append("Blocks are numbered from 0, as in timm's parameter names (blocks.0, blocks.1, ...): block 0 is "
                 "the first transformer block, block L-1 the last of L.")
    return lines


def _tied(profile: ProfileInput, key: Curve, pooling: str, best_block: int) -> list[int] | None:
    """The blocks of a profile's curve not distinguishable from ``best_block`` (`indistinguishable_blocks`)."""
    found = headline_curve(profile.table, key, pooling,
                           predictions=profile.predictions)
    if found.empty or best_block not in set(found["block"]) or found["hits"].isna().all():
        return None
    return indistinguishable_blocks(found, best_block)


def _chance_lines(pair: PairComparison, config: CompareConfig, prefix: str) -> list[str]:
    """How many per-block intervals exclude 0, against how many would by chance if nothing had changed."""
    if pair.deltas.empty:
        return []
    rows = pair.deltas[np.isfinite(pair.deltas["low"].to_numpy(dtype=float))
                       & np.isfinite(pair.deltas["high"].to_numpy(dtype=float))]
    if rows.empty:
        return []
    excluded = int(((rows["low"] > 0) | (rows["high"] < 0)).sum())
    level = round(config.level * 100)
    expected = (1 - config.level) * len(rows)
    return [f"{prefix}{excluded} of the {len(rows)} per-block {level} % intervals exclude 0 "
            f"({int(((rows['low'] > 0)).sum())} above, {int((rows['high'] < 0).sum())} below); if nothing had "
            f"changed, about {expected:.1f} ({100 - level} %) would by chance alone, so count the blocks rather "
            "than trust any single one (neighbouring blocks' intervals are correlated)."]


def _interval_text(low: float, high: float, key: Curve, config: CompareConfig) -> str:
    if not np.isfinite(low) or not np.isfinite(high):
        return " (no interval)"
    return f" ({round(config.level * 100)} % CI {key.format_delta(low)} to {key.format_delta(high)})"


def _blocks(blocks) -> str:
    return ", ".join(str(int(b)) for b in blocks)


# --- sections ------------------------------------------------------------------------------------------------

def _curves_section(profiles: list[ProfileInput], pairs: list[PairComparison], out: Path, figures: list[Path], *,
                    config: CompareConfig, beside: PairComparison | None = None) -> Section:
    """Every curve, all profiles on one figure per curve. Over the relative depth block / (depth - 1) when the
    depths differ or there are three or more profiles (MIM-Refiner's Figure 1); with ``beside`` (a single
    before/after pair of one depth) each curve figure has the pair's difference figure beside it."""
    relative = any(pair.relative_depth for pair in pairs) or len(profiles) >= 3
    keys = [key for key in pairs[0].keys if all(key in pair.keys for pair in pairs)]
    poolings = [p for p in pairs[0].poolings if all(p in pair.poolings for pair in pairs)]
    placements = {pair.after.label: pair.placement for pair in pairs}
    tables = {profile.label: curve_rows(profile.table) for profile in profiles}
    parts: list[Paragraph | Table | Image] = [Paragraph(
        "Every metric and pooling, block by block, all profiles on one axis; a star marks each curve's best block, "
        "shading the blocks that carried refinement heads. Each panel's y axis spans its own data, so small "
        "changes stay visible: the chance level (1 / classes) is the dashed grey line when it lies near the data, "
        "else a note at the panel's foot names it. "
        "Bands: 95 % Wilson intervals over the evaluation images (k-NN and linear top-1 from predictions.npz, "
        "k-means ACC), ± 1 standard deviation over seeds for low-shot means; the other metrics have none. "
        "Horizontal dotted or dashed lines in a profile's colour: its multi-block readouts (--readout), one linear "
        "probe on several blocks at once, beside its per-block linear-probe curve." + (
            " The x axis is the relative depth block / (depth - 1) (0: the first block, 1: the last), so that "
            "models of different depths align; each legend entry names that profile's best block."
            if relative else " Blocks are 0-based.") + (
            f" Beside each curve: {beside.after.label} − {beside.before.label} per block, with its "
            f"{round(config.level * 100)} % paired bootstrap interval (k-NN and linear-probe accuracies)."
            if beside is not None else "") + (
            " Profiles made by `mimprobe profile` with --points add one curve per point inside the blocks (legend "
            "\"profile, point\"); "
            "the differences and best blocks below compare the blocks' outputs." if any(p.points for p in profiles)
            else ""))]
    more: list[Image | Row] = []
    classes = {len(profile.meta.get("classes") or []) for profile in profiles}
    chance = 1.0 / classes.pop() if len(classes) == 1 and 0 not in classes else None
    point_tables = {(profile.label, point): curve_rows(rows) for profile in profiles
                    for point, rows in profile.points.items()}
    for key in keys:
        sides = []
        for profile in profiles:  # the blocks' outputs, then each point inside the blocks as an extra curve
            sides.append(SideCurve(profile.label + (", block" if profile.points else ""),
                                   {p: curve(tables[profile.label], key, p) for p in poolings},
                                   profile.num_blocks, placements.get(profile.label),
                                   {p: band for p in poolings if (band := curve_band(profile, key, p)) is not None},
                                   reference_lines(profile.table, key.metric, key.split)))
            sides += [SideCurve(f"{profile.label}, {point}",
                                {p: curve(point_tables[(profile.label, point)], key, p) for p in poolings},
                                profile.num_blocks, None,
                                {p: band for p in poolings if (band := curve_band(profile, key, p, point)) is not None})
                      for point in profile.points]
        saved = plot_curves(key, poolings, sides, relative=relative, stem=out / f"curve_{key.slug}",
                            higher_is_better=key.higher_is_better, chance=chance)
        png, svg = saved
        figures += [png, svg]
        image: Image | Row = Image(png, key.title + (" (higher is better)" if key.higher_is_better
                                                     else " (lower is better)"), svg, saved.font_px)
        difference = _difference_image(0, beside, key, poolings, config, out, figures) if beside else None
        if difference is not None:
            image = Row((image, difference))
        (parts if is_leading(key, profiles[0].preset) else more).append(image)
    folded = (Section(f"More curves ({len(more)}: other k-NN settings, validation splits, cluster scores, rank)",
                      "curves-more", tuple(more), folded=True),) if more else ()
    return Section("Block curves", "curves", tuple(parts), folded)


LEADING = ("knn_top1", "linear_top1", "lowshot_top1_mean", "cluster_acc")


def is_leading(key: Curve, preset: str) -> bool:
    """The curves that carry the result and lead the report (k-NN of the preset's k, linear probe, low-shot,
    k-means ACC) on the evaluation split; the others are folded."""
    if key.metric not in LEADING or key.split == "val":
        return False
    params = key.param_dict
    return key.metric != "knn_top1" or (params.get("preset", preset) == preset
                                        and params.get("k") == PRIMARY_K.get(preset, params.get("k")))


def curve_band(profile: ProfileInput, key: Curve, pooling: str,
               point: str = "block") -> tuple[pd.Series, pd.Series, str] | None:
    """(block → low, block → high, what the band is) of one profile's curve (of the blocks' outputs, or of a point
    inside them), from its table and predictions.npz (`mimprobe.metrics.headlines.headline_curve`); None when the
    curve has no interval."""
    table = profile.table if point == "block" else profile.points[point]
    found = headline_curve(table, key, pooling, predictions=for_point(profile.predictions, point))
    found = found[np.isfinite(found["low"].to_numpy(dtype=float))]
    if found.empty:
        return None
    what = {"wilson": "95 % Wilson interval", "seed-sd": "± 1 s.d. over seeds"}[found["interval"].iloc[0]]
    return found.set_index("block")["low"], found.set_index("block")["high"], what


def _best_section(index: int, pair: PairComparison, suffix: str, config: CompareConfig) -> Section:
    records = []
    for row in pair.best.to_dict(orient="records"):
        key: Curve = row["key"]
        records.append({
            "metric": key.title, "pooling": row["pooling"],
            f"{pair.before.label}: block, value": f"{row['before_block']}: "
                                                 f"{key.format_value(row['before_value'])}{key.unit_suffix}",
            f"{pair.after.label}: block, value": f"{row['after_block']}: "
                                                f"{key.format_value(row['after_value'])}{key.unit_suffix}",
            f"difference [{round(config.level * 100)} % CI]": key.format_delta(row["delta"])
            + (f" {_ci(row['low'], row['high'], key)}" if np.isfinite(row["low"]) else "")})
    text = ("The best block of each curve on each side (0-based) and its value; the difference is best against "
            "best, with a paired bootstrap interval where per-sample results exist (accuracy differences in "
            "percentage points).")
    if pair.relative_depth:
        text += " The models have different depths, so this is the main block-level comparison."
    return Section(f"Best blocks{suffix}", f"best-blocks-{index}", (
        Paragraph(text), Table(pd.DataFrame.from_records(records), f"best-{index}", text_columns=("pooling",))))


def _difference_image(index: int, pair: PairComparison, key: Curve, poolings: list[str] | None,
                      config: CompareConfig, out: Path, figures: list[Path]) -> Image | None:
    """The pair's per-block differences of one curve (`plot_deltas`, one panel per pooling), or None without rows."""
    rows = pair.deltas[pair.deltas["key"] == key]
    if rows.empty:
        return None
    saved = plot_deltas(key, rows, label=f"{pair.after.label} − {pair.before.label}",
                        stem=out / f"delta_{index}_{key.slug}", level=config.level, poolings=poolings)
    png, svg = saved
    figures += [png, svg]
    return Image(png, f"{key.title}: {pair.after.label} − {pair.before.label} per block, with its paired interval",
                 svg, saved.font_px)


def _delta_section(index: int, pair: PairComparison, suffix: str, config: CompareConfig, out: Path,
                   figures: list[Path], *, figures_beside_curves: bool = False) -> Section:
    parts: list[Paragraph | Table | Image] = [Paragraph(
        f"Per block (0-based): {pair.before.label}, {pair.after.label} and the difference (after minus before; "
        f"accuracies in %, differences in points), with {round(config.level * 100)} % paired bootstrap intervals "
        f"over the same evaluation images ({config.resamples:,} resamples, seed {config.seed}) for k-NN and "
        "linear-probe accuracies." + (" The figures of these differences sit beside their curves under Block curves."
                                      if figures_beside_curves else ""))]
    subsections, more = [], []
    for key in pair.keys:
        rows = pair.deltas[pair.deltas["key"] == key]
        if rows.empty:
            continue
        body: list[Paragraph | Table | Image] = []
        if not figures_beside_curves:  # else the figure sits beside its curve in "Block curves"
            image = _difference_image(index, pair, key, None, config, out, figures)
            if image is not None:
                body.append(image)
        if rows["low"].notna().any():
            source = pair.interval_sources.get(key.title)
            if source:
                body.append(Paragraph(f"Per-sample results: {source}."))
        for pooling in dict.fromkeys(rows["pooling"]):
            body.append(Table(_pooling_deltas(rows[rows["pooling"] == pooling], key, pair, config),
                              f"deltas-{index}-{key.slug}-{pooling}", caption=f"{pooling} pooling"))
        section = Section(key.title, f"differences-{index}-{key.slug}", tuple(body))
        (subsections if is_leading(key, pair.before.preset) else more).append(section)
    if more:
        subsections.append(Section(f"More differences ({len(more)})", f"differences-{index}-more", (),
                                   tuple(more), folded=True))
    return Section(f"Per-block differences{suffix}", f"differences-{index}", tuple(parts), tuple(subsections))


def _pooling_deltas(rows: pd.DataFrame, key: Curve, pair: PairComparison, config: CompareConfig) -> pd.DataFrame:
    """One pooling's blocks: before, after, difference and interval (five columns: they fit a phone's width)."""
    rows = rows.sort_values("block")
    suffix = " (%)" if key.is_percent else ""
    frame = pd.DataFrame({"block": [str(b) for b in rows["block"]],
                          f"{pair.before.label}{suffix}": [key.format_value(v) for v in rows["before"]],
                          f"{pair.after.label}{suffix}": [key.format_value(v) for v in rows["after"]],
                          "difference": [key.format_delta(v) for v in rows["delta"]]})
    if rows["low"].notna().any():
        frame[f"{round(config.level * 100)} % CI"] = [_ci(lo, hi, key) for lo, hi in zip(rows["low"], rows["high"])]
    return frame


def _ci(low: float, high: float, key: Curve) -> str:
    if not np.isfinite(low) or not np.isfinite(high):
        return "–"
    return f"[{key.format_delta(low)}, {key.format_delta(high)}]"


def _cka_section(index: int, pair: PairComparison, suffix: str, out: Path, figures: list[Path]) -> Section:
    if pair.cka is None:
        return Section(f"Similarity of blocks (CKA){suffix}", f"cka-{index}",
                       (Paragraph(pair.cka_note or "CKA was not computed.", kind="note"),))
    saved = plot_cka(pair.cka, label_x=pair.before.label, label_y=pair.after.label, stem=out / f"cka_{index}")
    png, svg = saved
    figures += [png, svg]
    parts: list[Paragraph | Table | Image] = [
        Paragraph(f"Block-by-block {pair.cka_note}: 1 means the two blocks represent the images identically up to "
                  "rotation and scale. Rows: blocks of " f"{pair.before.label}; columns: blocks of {pair.after.label}."),
        Image(png, f"linear CKA, {pair.before.label} (rows) vs {pair.after.label} (columns)", svg, saved.font_px)]
    if pair.same_depth:
        blocks = [b for b in pair.cka.blocks_x if b in pair.cka.blocks_y]
        values = [pair.cka.values[pair.cka.blocks_x.index(b), pair.cka.blocks_y.index(b)] for b in blocks]
        parts.append(Table(pd.DataFrame({"block": [str(b) for b in blocks],
                                         "CKA (same block)": [f"{v:.3f}" for v in values]}), f"cka-diagonal-{index}",
                           caption="CKA of each block with the same block of the other model"))
    return Section(f"Similarity of blocks (CKA){suffix}", f"cka-{index}", tuple(parts))


def _class_section(index: int, pair: PairComparison, suffix: str, out: Path, figures: list[Path]) -> Section:
    title = f"Per-class gains{suffix}"
    gains = pair.class_gains
    if gains.empty or pair.headline is None:
        return Section(title, f"classes-{index}", (Paragraph("No per-class k-NN rows (knn_class_top1) in both "
                                                             "profiles.", kind="note"),))
    block_before, block_after = int(gains["before_block"].iloc[0]), int(gains["after_block"].iloc[0])
    text = (f"k-NN top-1 per class ({pair.class_pooling} pooling, {pair.headline.split} split) at each side's best "
            f"block: {pair.before.label} block {block_before}, {pair.after.label} block {block_after}; gain in "
            "points.")
    ordered = gains.sort_values("gain", ascending=False)
    if len(ordered) > CLASS_ROWS:
        text += f" {len(ordered)} classes: the 10 largest gains and the 10 largest losses are listed (all in " \
                "class_gains.csv)."
        ordered = pd.concat([ordered.head(CLASS_ROWS // 2), ordered.tail(CLASS_ROWS // 2)])
    saved = plot_class_gains(gains, title=f"{pair.after.label} − {pair.before.label}, per class",
                             stem=out / f"classes_{index}")
    png, svg = saved
    figures += [png, svg]
    key = pair.headline
    table = pd.DataFrame({
        "class": [str(c) for c in ordered["class"]],
        f"{pair.before.label} (%)": [key.format_value(v) for v in ordered["before"]],
        f"{pair.after.label} (%)": [key.format_value(v) for v in ordered["after"]],
        "gain (points)": [key.format_delta(v) for v in ordered["gain"]]})
    return Section(title, f"classes-{index}", (Paragraph(text), Table(table, f"class-gains-{index}"),
                                               Image(png, "per-class gain in k-NN top-1 (points)", svg,
                                                     saved.font_px)))


def _placement_section(index: int, pair: PairComparison, suffix: str) -> Section:
    placement = pair.placement
    if placement is None:
        return Section(f"Placement{suffix}", f"placement-{index}", (Paragraph(pair.placement_source, kind="note"),))
    items = [f"head blocks (0-based): {_blocks(placement.head_blocks)} of {placement.num_blocks}",
             f"rule: {placement.rule}; {placement.reason}",
             f"frozen blocks: {placement.freeze_blocks and f'0 to {placement.freeze_blocks - 1}' or 'none'}",
             f"read from: {pair.placement_source}"]
    if placement.peak_block is not None:
        items.append(f"peak of the placement's validation curve: block {placement.peak_block}"
                     + (f" ({100 * placement.peak_value:.1f} %)" if placement.peak_value is not None else "")
                     + (f", plateau from block {placement.plateau_start}" if placement.plateau_start is not None
                        else ""))
    items += [note_line(note) for note in placement.notes]
    return Section(f"Placement{suffix}", f"placement-{index}", (Bullets(tuple(items)),))


def _readout_section(profiles: list[ProfileInput]) -> Section | None:
    """The multi-block readouts (``--readout``) of every profile beside its best single-block linear probe of the
    same pooling; None when no profile has any."""
    found = {profile.label: readout_records(profile.table) for profile in profiles}
    if not any(found.values()):
        return None
    keys = list(dict.fromkeys((r["label"], r["pooling"], block_span(r["blocks"]), "+".join(r["poolings"]))
                              for records in found.values() for r in records))
    frame = []
    for label, pooling, blocks, read in keys:
        record = {"readout": label, "blocks read": f"{blocks} ({read})"}
        for profile in profiles:
            match = [r for r in found[profile.label] if (r["label"], r["pooling"]) == (label, pooling)]
            best = _best_single_block(profile.table, match[0]["split"], pooling) if match else None
            record[f"{profile.label}: top-1"] = f"{100 * match[0]['value']:.1f}%" if match else "–"
            record[f"{profile.label}: best single block"] = (f"{best[0]} ({pooling}): {100 * best[1]:.1f}%"
                                                             if best else "–")
        frame.append(record)
    text = ("Linear probes on several blocks at once, trained in the same pass as the per-block probes (same "
            "validation split and C grid): DINOv2's linear-evaluation inputs (class tokens of the last n blocks "
            "after the final norm, + the last block's mean patch token for +avg) and all blocks concatenated; "
            "beside each, the best single block's linear probe of the same pooling.")
    return Section("Multi-block readouts", "readouts", (
        Paragraph(text), Table(pd.DataFrame.from_records(frame), "readouts", text_columns=("blocks read",))))


def _best_single_block(table: pd.DataFrame, split: str, pooling: str) -> tuple[int, float] | None:
    rows = table[(table["metric"] == "linear_top1") & (table["split"] == split) & (table["pooling"] == pooling)]
    if rows.empty:
        return None
    best = rows.loc[rows["value"].idxmax()]
    return int(best["block"]), float(best["value"])


def _labelfree_section(profiles: list[ProfileInput]) -> Section | None:
    """Label-free vs labelled: per profile, how each label-free curve tracks k-NN top-1 across its blocks (the
    profile's ``calibration`` in profile.json), or None when no profile has one."""
    frames = []
    for profile in profiles:
        records = [record for record in (profile.meta.get("calibration") or []) if record.get("against") == "knn_top1"]
        for record in records:
            low, high = record.get("rho_low"), record.get("rho_high")
            rho = record.get("rho")
            frames.append({"profile": profile.label, "metric": record["metric"], "pooling": record["pooling"],
                           "rho vs k-NN": "undefined (a flat curve)" if rho is None else
                           f"{rho:+.2f}" + (f" [{low:+.2f}, {high:+.2f}]" if low is not None and high is not None
                                            else ""),
                           "pick": f"block {record['picked_block']} ({record['pick']})",
                           "best k-NN block": str(record["best_block"]),
                           "k-NN lost at pick": f"{100 * float(record['accuracy_lost']):.1f} points"})
    if not frames:
        return None
    text = ("Spearman's rho across blocks between each label-free curve (train split, a seeded subset) and k-NN top-1 "
            "on the evaluation split, with its 95 % bootstrap interval over the evaluation images (the label-free "
            "curve held fixed); the block each metric's published rule picks, and the k-NN accuracy lost there "
            "against the best block. An interval that spans 0 means these blocks cannot tell whether the metric "
            "tracks accuracy.")
    return Section("Label-free vs labelled", "label-free", (Paragraph(text),
                                                             Table(pd.DataFrame(frames), "label-free-calibration")))


def _config_section(profiles: list[ProfileInput]) -> Section:
    rows: dict[str, list[str]] = {}

    def put(name: str, values: list[object]) -> None:
        rows[name] = ["–" if v is None or v == "" else str(v) for v in values]

    metas = [p.meta for p in profiles]
    models = [m.get("model") or {} for m in metas]
    datasets = [m.get("dataset") or {} for m in metas]
    configs = [m.get("config") or {} for m in metas]
    put("profile folder", [str(p.folder) for p in profiles])
    put("model", [p.model_name for p in profiles])
    put("weights", [weights_phrase(p) for p in profiles])
    put("checkpoint", [m.get("checkpoint") for m in models])
    put("checkpoint format", [m.get("checkpoint_format") for m in models])
    put("checkpoint sha256", [m.get("checkpoint_sha256") for m in models])
    put("blocks (depth)", [p.num_blocks for p in profiles])
    put("embedding width", [(m.get("structure") or {}).get("embed_dim") for m in models])
    put("dataset", [d.get("name") for d in datasets])
    put("dataset fingerprint", [d.get("fingerprint") for d in datasets])
    put("splits", [", ".join(f"{k} {v:,}" for k, v in (d.get("splits") or {}).items()) for d in datasets])
    put("classes", [len(m.get("classes") or []) for m in metas])
    put("feature store", [m.get("store") for m in metas])
    put("store key", [m.get("store_key") for m in metas])
    put("poolings", [", ".join(m.get("poolings") or []) for m in metas])
    put("k-NN preset", [c.get("preset") for c in configs])
    put("k-NN protocol", [_knn_protocol(c.get("preset")) for c in configs])
    put("linear probe", [c.get("probe") for c in configs])
    put("metrics", [", ".join(c.get("metrics") or ["all"]) for c in configs])
    put("seed", [c.get("seed") for c in configs])
    put("validation fraction", [c.get("val_fraction") for c in configs])
    put("predictions.npz", ["yes" if p.predictions is not None else "no" for p in profiles])
    frame = pd.DataFrame([[name, *values] for name, values in rows.items()],
                         columns=["setting", *[p.label for p in profiles]])
    packages = sorted({name for m in metas for name in (m.get("versions") or {})})
    versions = pd.DataFrame([[name, *[str((m.get("versions") or {}).get(name) or "–") for m in metas]]
                             for name in packages], columns=["package", *[p.label for p in profiles]])
    full = [(p.label, json.dumps(p.meta.get("config") or {}, sort_keys=True)) for p in profiles]
    return Section("Configuration and software", "settings", (
        Paragraph("From each profile's profile.json: the model and weights, the data, the feature store and the "
                  "evaluation protocol, then the software versions."),
        Table(frame, "configuration", text_columns=tuple(p.label for p in profiles)),
        Table(versions, "versions", text_columns=tuple(p.label for p in profiles)),
        Bullets(tuple(f"{label} profile config: {text}" for label, text in full))))


def _knn_protocol(preset: str | None) -> str:
    if preset not in KNN_PRESETS:
        return "–"
    p = KNN_PRESETS[preset]
    return (f"k={'/'.join(map(str, p.ks))}, T={'/'.join(map(str, p.temperatures))}, {p.weighting} weights"
            + (", standardised with train mean/std" if p.standardize else "") + ", cosine (L2-normalised)")


def _method_section(pairs: list[PairComparison], config: CompareConfig) -> Section:
    sources = sorted({source for pair in pairs for source in pair.interval_sources.values()})
    items = [
        "Blocks are 0-based and match timm's blocks.{i} parameter names.",
        f"Intervals: paired percentile bootstrap over the evaluation images ({config.resamples:,} resamples, "
        f"seed {config.seed}, {round(config.level * 100)} % level): the same images are resampled for both models, "
        "so the interval is that of the paired difference. Only k-NN and linear-probe accuracies have per-sample "
        "results; other metrics' differences have no interval.",
        "Per-sample results came from: " + (", ".join(sources) if sources else "none (no intervals)") + ".",
        "CKA: linear centred kernel alignment (Kornblith et al. 2019, arXiv 1905.00414), computed exactly in "
        "minibatches of Gram-matrix rows on a seeded subset of the evaluation split.",
        "Models of different depths, and three or more profiles, are drawn over the relative depth "
        "block / (depth - 1): 0 is the first block, 1 the last.",
        "Files: compare.csv / compare.parquet (the profiles' tables with label and side columns, plus delta rows "
        "with their intervals), class_gains.csv, cka_*.csv, the figures as PNG and SVG, report.md and this page.",
    ]
    return Section("Method and files", "method", (Bullets(tuple(items)),))
