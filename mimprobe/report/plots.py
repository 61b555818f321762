"""The report's figures (matplotlib, Agg, no pyplot state): block curves, deltas, CKA heatmap, per-class gains.

Every figure is written as PNG (embedded in report.html, linked from report.md) and SVG. Blocks are 0-based, as
timm's ``blocks.{i}``; curves of models of different depths, and of three or more profiles, are drawn against the
relative depth block / (depth - 1) (`mimprobe.blocks.relative_depth`: 0 the first block, 1 the last).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..blocks import RELATIVE_DEPTH_TEXT, relative_depth
from ..placement import Placement
from .cka import StoreCka
from ..metrics.curves import Curve

DPI = 110
COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


@dataclass(frozen=True)
class SideCurve:
    """One profile's curves of a key: {pooling: (block → value)}, its depth, its placement (if any), the
    uncertainty of each curve: {pooling: (block → low, block → high, what the band is)} (absent: no band), and
    values that read several blocks at once, drawn as horizontal reference lines: {pooling: [(label, value)]}
    (the multi-block readouts beside the linear-probe curve, `mimprobe.metrics.readout.reference_lines`)."""

    label: str
    by_pooling: dict[str, pd.Series]
    num_blocks: int
    placement: Placement | None = None
    bands: dict[str, tuple[pd.Series, pd.Series, str]] = field(default_factory=dict)
    references: dict[str, list[tuple[str, float]]] = field(default_factory=dict)


MARKERS = ("o", "s", "^", "D", "v", "P")
LINESTYLES = ("-", "--", "-.", ":")
READOUT_DASHES = ((0, (1, 1.5)), (0, (5, 2, 1, 2)), (0, (3, 1, 1, 1, 1, 1)), (0, (8, 3)), (0, (1, 3)))
# Rendered text must stay >= 10 CSS px when a figure is scaled to a 390 px phone column (about 350 px of image):
# a figure of width W inches needs fonts of at least 2.1 W points (pt * 110/72 px * 350 / (110 W) >= 10).
CURVE_WIDTH_IN = 4.6
FONT_PT = 10
CKA_ANNOTATED_COLUMNS = 8   # 4.6 in / 8 columns leaves room for "0.93" at 10 pt


class SavedFigure(tuple):
    """``(png, svg)`` of a saved figure, with ``font_px``: its smallest visible text in pixels of the PNG."""

    font_px: float | None

    def __new__(cls, png: Path, svg: Path, font_px: float | None) -> "SavedFigure":
        saved = super().__new__(cls, (png, svg))
        saved.font_px = font_px
        return saved


def save(figure: Figure, stem: Path) -> SavedFigure:
    """Write ``stem.png`` and ``stem.svg`` (without a date, so that reruns give the same SVG)."""
    png, svg = stem.with_suffix(".png"), stem.with_suffix(".svg")
    engine = figure.get_layout_engine()
    if engine is not None:  # lay out once, not once per file (the layout is most of a save's time)
        engine.execute(figure)
        figure.set_layout_engine("none")
    figure.savefig(png, dpi=DPI, metadata={"Software": None})
    figure.savefig(svg, metadata={"Date": None})
    return SavedFigure(png, svg, smallest_text_px(figure))


def smallest_text_px(figure: Figure) -> float | None:
    """The smallest font size among the figure's visible, non-empty texts (titles, labels, ticks, legends,
    annotations), in pixels at the PNG's DPI; None without text."""
    from matplotlib.text import Text

    sizes = [text.get_fontsize() for text in figure.findobj(Text)
             if text.get_visible() and text.get_text().strip()]  # ticks off view share their axis' size
    return min(sizes) * DPI / 72 if sizes else None



def _x(blocks: np.ndarray, num_blocks: int, relative: bool) -> np.ndarray:
    return relative_depth(blocks, num_blocks) if relative else np.asarray(blocks, dtype=float)


def data_limits(values: np.ndarray, *, chance: float | None = None, pad_share: float = 0.1,
                min_span: float = 1.0, chance_stretch: float = 0.5) -> tuple[float, float, bool]:
    """The y range of a curve panel: the data's (curves and bands) padded by ``pad_share`` of its span (a flat
    curve gets ``min_span``), stretched to include ``chance`` only when that widens the data's span by at most
    ``chance_stretch``; else the chance level stays off the axis (the caller names it in an annotation).

    Returns:
        ``(low, high, chance_on_axis)``.
    """
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 1.0, chance is not None
    low, high = float(finite.min()), float(finite.max())
    span = high - low
    chance_on_axis = False
    if chance is not None and np.isfinite(chance):
        reach = max(high, chance) - min(low, chance)
        if reach <= (1 + chance_stretch) * max(span, min_span):
            low, high, span, chance_on_axis = min(low, chance), max(high, chance), reach, True
    pad = pad_share * span if span > 0 else min_span / 2
    return low - pad, high + pad, chance_on_axis


def plot_curves(key: Curve, poolings: list[str], sides: list[SideCurve], *, relative: bool, stem: Path,
                higher_is_better: bool = True, chance: float | None = None) -> tuple[Path, Path]:
    """`curve_figure`, saved as ``stem``.png and .svg."""
    return save(curve_figure(key, poolings, sides, relative=relative, higher_is_better=higher_is_better,
                             chance=chance), stem)


def curve_figure(key: Curve, poolings: list[str], sides: list[SideCurve], *, relative: bool,
                 higher_is_better: bool = True, chance: float | None = None) -> Figure:
    """One panel per pooling (stacked, so that the text stays readable on a phone), every profile's curve on it
    with its uncertainty band; each curve's best block starred, the blocks that carried refinement heads shaded in
    the colour of the profile refined with them. Profiles differ by colour, marker and dash, so identical curves
    stay visible on top of each other.

    Each panel's y axis spans its own data (curves and bands, `data_limits`), so a 2-point change stays visible;
    the chance level (``chance``, a fraction, on accuracies) is drawn when it lies near the data and otherwise
    named in an annotation at the panel's foot. The paired differences of a before/after pair are `delta_figure`,
    laid out beside this one, panel row by panel row.

    With ``relative`` (models of different depths, or three or more profiles: MIM-Refiner's Figure 1, arXiv
    2402.10093) the x axis is `mimprobe.blocks.relative_depth`, 0 the first block and 1 the last of every model, and
    each legend entry names that profile's best block."""
    figure = Figure(figsize=(CURVE_WIDTH_IN, 0.6 + 3.0 * len(poolings)), layout="constrained")
    axes = figure.subplots(len(poolings), 1, squeeze=False)[:, 0]
    scale = 100.0 if key.is_percent else 1.0
    bands_used: set[str] = set()
    for axis, pooling in zip(axes, poolings):
        shown: list[np.ndarray] = []   # every value drawn on this panel, for its y range
        for index, side in enumerate(sides):
            color = COLORS[index % len(COLORS)]
            series = side.by_pooling.get(pooling)
            if series is None or series.empty:
                continue
            x = _x(series.index.to_numpy(), side.num_blocks, relative)
            if side.placement is not None:
                _shade_heads(axis, side.placement.head_blocks, side.num_blocks, relative, color,
                             label=f"head blocks ({side.label})")
            band = side.bands.get(pooling)
            if band is not None:
                low, high = (band[0].reindex(series.index).to_numpy() * scale,
                             band[1].reindex(series.index).to_numpy() * scale)
                if np.isfinite(low).any():
                    axis.fill_between(x, low, high, color=color, alpha=0.16, linewidth=0, zorder=2)
                    bands_used.add(band[2])
                    shown += [low, high]
            shown.append(series.to_numpy() * scale)
            best = int(np.argmax(series.to_numpy()) if higher_is_better else np.argmin(series.to_numpy()))
            # over relative depth the legend names each profile's best block and depth (its star's position)
            name = (f"{side.label} (best: block {int(series.index[best])} of {side.num_blocks})" if relative
                    else side.label)
            axis.plot(x, series.to_numpy() * scale, marker=MARKERS[index % len(MARKERS)], markersize=4 + 1.5 * index,
                      markerfacecolor="none" if index else color, linestyle=LINESTYLES[index % len(LINESTYLES)],
                      color=color, label=name, zorder=3 + index)
            axis.plot([x[best]], [series.to_numpy()[best] * scale], marker="*", markersize=13, color=color,
                      markeredgecolor="black", zorder=8, linestyle="none")
            for number, (name, value) in enumerate(side.references.get(pooling, [])):
                # a multi-block readout: does any single block of this profile's curve reach it?
                axis.axhline(value * scale, color=color, linestyle=READOUT_DASHES[number % len(READOUT_DASHES)],
                             linewidth=1.2, zorder=2, label=f"{name} ({side.label}): {key.format_value(value)}")
                shown.append(np.array([value * scale]))
        level = chance * scale if chance is not None and key.is_percent else None
        low, high, chance_on_axis = data_limits(np.concatenate(shown) if shown else np.array([]), chance=level,
                                                min_span=1.0 if key.is_percent else 0.01)
        axis.set_ylim(low, high)
        if level is not None and chance_on_axis:
            axis.axhline(level, color="grey", linestyle=(0, (4, 3)), linewidth=1,
                         label=f"chance {level:.1f}{'%' if key.is_percent else ''}", zorder=1)
        chance_note = ""
        if level is not None and not chance_on_axis:  # in the panel's title: clear of the curves and the legend
            chance_note = f" (chance {level:.1f}%: {'below' if level < low else 'above'} the axis)"
        axis.set_title(f"{pooling} pooling{chance_note}", fontsize=FONT_PT)
        axis.set_xlabel(RELATIVE_DEPTH_TEXT if relative else "block (0-based)", fontsize=FONT_PT)
        axis.set_ylabel(key.short_name + (" (%)" if key.is_percent else ""), fontsize=FONT_PT)
        axis.grid(alpha=0.3)
        axis.tick_params(labelsize=FONT_PT)
        axis.legend(fontsize=FONT_PT, framealpha=0.85)
        if not relative:
            axis.xaxis.get_major_locator().set_params(integer=True)
    what = "; band: " + ", ".join(sorted(bands_used)) if bands_used else ""
    figure.suptitle(f"{key.title}\n(star: best block{what})", fontsize=FONT_PT)
    return figure


def _shade_heads(axis, head_blocks, num_blocks: int, relative: bool, color: str, *, label: str) -> None:
    """Shade each run of consecutive head blocks (half a block either side), one legend entry per profile."""
    heads = sorted(int(b) for b in head_blocks)
    runs: list[list[int]] = []
    for block in heads:
        if runs and block == runs[-1][-1] + 1:
            runs[-1].append(block)
        else:
            runs.append([block])
    step = 1.0 / max(num_blocks - 1, 1) if relative else 1.0
    for position, run in enumerate(runs):
        left, right = _x(np.array([run[0], run[-1]]), num_blocks, relative)
        axis.axvspan(left - step / 2, right + step / 2, color=color, alpha=0.10, linewidth=0, zorder=0,
                     label=label if position == 0 else None)


def plot_deltas(key: Curve, deltas: pd.DataFrame, *, label: str, stem: Path, level: float,
                poolings: list[str] | None = None) -> tuple[Path, Path]:
    """`delta_figure`, saved as ``stem``.png and .svg."""
    return save(delta_figure(key, deltas, label=label, level=level, poolings=poolings), stem)


def delta_figure(key: Curve, deltas: pd.DataFrame, *, label: str, level: float,
                 poolings: list[str] | None = None) -> Figure:
    """Per-block differences (after minus before) with their paired bootstrap intervals as error bars: one panel per
    pooling, stacked and sized as `curve_figure`'s, so that the two figures side by side put each pooling's
    difference panel beside its curve panel (same row).

    Args:
        key: The curve.
        deltas: Its `PairComparison.deltas` rows (pooling, block, delta, low, high; fractions for accuracies).
        label: "AFTER − BEFORE", the panels' title.
        level: Coverage of the intervals (for the axis label).
        poolings: Panels, top to bottom (default: the poolings of ``deltas`` in order); a pooling without rows gets
            an empty panel, so that rows stay aligned with the curve figure.
    """
    poolings = poolings or list(dict.fromkeys(deltas["pooling"]))
    figure = Figure(figsize=(CURVE_WIDTH_IN, 0.6 + 3.0 * len(poolings)), layout="constrained")
    axes = figure.subplots(len(poolings), 1, squeeze=False)[:, 0]
    scale = 100.0 if key.is_percent else 1.0
    for index, (axis, pooling) in enumerate(zip(axes, poolings)):
        rows = deltas[deltas["pooling"] == pooling].sort_values("block")
        x = rows["block"].to_numpy(dtype=float)
        y = rows["delta"].to_numpy(dtype=float) * scale
        low, high = rows["low"].to_numpy(dtype=float) * scale, rows["high"].to_numpy(dtype=float) * scale
        error = np.vstack([y - low, high - y])
        error = np.where(np.isfinite(error), error, 0.0)
        axis.bar(x, y, width=0.7, color=COLORS[index % len(COLORS)], alpha=0.75)
        if np.isfinite(low).any():
            axis.errorbar(x, y, yerr=error, fmt="none", ecolor="black", elinewidth=0.9, capsize=2)
        axis.axhline(0, color="black", linewidth=0.8)
        axis.set_title(f"{pooling} pooling: {label}", fontsize=FONT_PT)
        axis.set_xlabel("block (0-based)", fontsize=FONT_PT)
        axis.set_ylabel(("difference (points)" if key.is_percent else "difference")
                        + f", {round(level * 100)} % CI", fontsize=FONT_PT)
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.grid(alpha=0.3, axis="y")
        axis.tick_params(labelsize=FONT_PT)
    figure.suptitle(f"{key.title}\n(after − before, paired interval)", fontsize=FONT_PT)
    return figure


def plot_cka(cka: StoreCka, *, label_x: str, label_y: str, stem: Path) -> tuple[Path, Path]:
    """Heatmap of CKA(block i of ``label_x``, block j of ``label_y``), values printed on small grids."""
    rows, columns = cka.values.shape
    figure = Figure(figsize=(CURVE_WIDTH_IN, min(1.8 + 0.3 * rows, 6.0)), layout="constrained")
    axis = figure.subplots()
    image = axis.imshow(cka.values, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
    axis.set_xticks(range(columns), [str(b) for b in cka.blocks_y], fontsize=FONT_PT)
    axis.set_yticks(range(rows), [str(b) for b in cka.blocks_x], fontsize=FONT_PT)
    axis.set_xlabel(f"{label_y}: block (0-based)", fontsize=FONT_PT)
    axis.set_ylabel(f"{label_x}: block (0-based)", fontsize=FONT_PT)
    if columns <= CKA_ANNOTATED_COLUMNS:  # values in the cells only while they stay readable on a phone
        for i in range(rows):
            for j in range(columns):
                value = cka.values[i, j]
                axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=FONT_PT,
                          color="white" if value < 0.6 else "black")
    figure.colorbar(image, ax=axis, label="linear CKA")
    axis.set_title(f"linear CKA, {cka.pooling} features,\n{len(cka.rows):,} {cka.split} images", fontsize=FONT_PT)
    return save(figure, stem)


def plot_class_gains(gains: pd.DataFrame, *, title: str, stem: Path, limit: int = 40) -> tuple[Path, Path]:
    """Horizontal bars of the per-class gain in points, sorted; with many classes the ``limit // 2`` largest gains
    and losses."""
    frame = gains.sort_values("gain")
    if len(frame) > limit:
        frame = pd.concat([frame.head(limit // 2), frame.tail(limit // 2)])
    figure = Figure(figsize=(CURVE_WIDTH_IN, 1.4 + 0.26 * len(frame)), layout="constrained")
    axis = figure.subplots()
    values = frame["gain"].to_numpy() * 100
    axis.barh(range(len(frame)), values, color=[COLORS[2] if v >= 0 else COLORS[3] for v in values])
    axis.set_yticks(range(len(frame)), [str(c) for c in frame["class"]], fontsize=FONT_PT)
    axis.axvline(0, color="black", linewidth=0.8)
    axis.set_xlabel("gain in k-NN top-1 (points)", fontsize=FONT_PT)
    axis.grid(alpha=0.3, axis="x")
    axis.tick_params(labelsize=FONT_PT)
    axis.set_title(title, fontsize=FONT_PT)
    return save(figure, stem)
