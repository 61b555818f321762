"""The report's figures (matplotlib, Agg, no pyplot state): block curves, deltas, CKA heatmap, per-class gains.

Every figure is written as PNG (embedded in report.html, linked from report.md) and SVG. Blocks are 0-based, as
timm's ``blocks.{i}``; curves of models of different depths are drawn against relative depth (block + 1) / depth.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..placement import Placement
from .cka import StoreCka
from .curves import CurveKey

DPI = 110
COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


@dataclass(frozen=True)
class SideCurve:
    """One profile's curves of a key: {pooling: (block → value)}, its depth, and its placement (if any)."""

    label: str
    by_pooling: dict[str, pd.Series]
    num_blocks: int
    placement: Placement | None = None


def save(figure: Figure, stem: Path) -> tuple[Path, Path]:
    """Write ``stem.png`` and ``stem.svg`` (without a date, so that reruns give the same SVG)."""
    png, svg = stem.with_suffix(".png"), stem.with_suffix(".svg")
    engine = figure.get_layout_engine()
    if engine is not None:  # lay out once, not once per file (the layout is most of a save's time)
        engine.execute(figure)
        figure.set_layout_engine("none")
    figure.savefig(png, dpi=DPI, metadata={"Software": None})
    figure.savefig(svg, metadata={"Date": None})
    return png, svg


def _x(blocks: np.ndarray, num_blocks: int, relative: bool) -> np.ndarray:
    return (np.asarray(blocks, dtype=float) + 1) / num_blocks if relative else np.asarray(blocks, dtype=float)


def plot_curves(key: CurveKey, poolings: list[str], sides: list[SideCurve], *, relative: bool, stem: Path,
                higher_is_better: bool = True) -> tuple[Path, Path]:
    """One panel per pooling, every profile's curve on it; each curve's best block starred, head blocks of each
    placement drawn as dotted vertical lines in the colour of the profile that was refined with it."""
    figure = Figure(figsize=(min(4.4 * len(poolings), 13.2), 3.4), layout="constrained")
    axes = figure.subplots(1, len(poolings), squeeze=False)[0]
    scale = 100.0 if key.is_percent else 1.0
    for axis, pooling in zip(axes, poolings):
        for index, side in enumerate(sides):
            color = COLORS[index % len(COLORS)]
            series = side.by_pooling.get(pooling)
            if series is None or series.empty:
                continue
            x = _x(series.index.to_numpy(), side.num_blocks, relative)
            axis.plot(x, series.to_numpy() * scale, marker="o", markersize=3, color=color, label=side.label)
            best = int(np.argmax(series.to_numpy()) if higher_is_better else np.argmin(series.to_numpy()))
            axis.plot([x[best]], [series.to_numpy()[best] * scale], marker="*", markersize=13, color=color,
                      markeredgecolor="black", zorder=5, linestyle="none")
            if side.placement is not None:
                heads = _x(np.asarray(side.placement.head_blocks), side.num_blocks, relative)
                for position, head in enumerate(heads):
                    axis.axvline(head, color=color, linestyle=":", linewidth=1.1, alpha=0.8,
                                 label=f"heads ({side.label})" if position == 0 else None)
        axis.set_title(f"{pooling}", fontsize=9)
        axis.set_xlabel("relative depth (block + 1) / depth" if relative else "block (0-based)", fontsize=8)
        axis.set_ylabel(key.short_name + (" (%)" if key.is_percent else ""), fontsize=8)
        axis.grid(alpha=0.3)
        axis.tick_params(labelsize=8)
        axis.legend(fontsize=7)
        if not relative:
            axis.xaxis.get_major_locator().set_params(integer=True)
    figure.suptitle(f"{key.title}  (star: best block)", fontsize=10)
    return save(figure, stem)


def plot_deltas(key: CurveKey, deltas: pd.DataFrame, *, label: str, stem: Path, level: float) -> tuple[Path, Path]:
    """Per-block differences (after minus before) per pooling, with their bootstrap intervals as error bars."""
    figure = Figure(figsize=(6.4, 3.2), layout="constrained")
    axis = figure.subplots()
    scale = 100.0 if key.is_percent else 1.0
    poolings = list(dict.fromkeys(deltas["pooling"]))
    width = 0.8 / max(len(poolings), 1)
    for index, pooling in enumerate(poolings):
        rows = deltas[deltas["pooling"] == pooling]
        x = rows["block"].to_numpy(dtype=float) + (index - (len(poolings) - 1) / 2) * width
        y = rows["delta"].to_numpy() * scale
        low, high = rows["low"].to_numpy() * scale, rows["high"].to_numpy() * scale
        error = np.vstack([y - low, high - y])
        error = np.where(np.isfinite(error), error, 0.0)
        axis.bar(x, y, width=width, color=COLORS[index % len(COLORS)], alpha=0.75, label=pooling)
        axis.errorbar(x, y, yerr=error, fmt="none", ecolor="black", elinewidth=0.9, capsize=2)
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xlabel("block (0-based)", fontsize=8)
    axis.set_ylabel(("difference (points)" if key.is_percent else "difference")
                    + f", {round(level * 100)} % CI", fontsize=8)
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.grid(alpha=0.3, axis="y")
    axis.tick_params(labelsize=8)
    axis.legend(fontsize=7)
    axis.set_title(f"{label}: {key.title}", fontsize=9)
    return save(figure, stem)


def plot_cka(cka: StoreCka, *, label_x: str, label_y: str, stem: Path) -> tuple[Path, Path]:
    """Heatmap of CKA(block i of ``label_x``, block j of ``label_y``), values printed on small grids."""
    rows, columns = cka.values.shape
    figure = Figure(figsize=(min(2.4 + 0.42 * columns, 12), min(1.8 + 0.36 * rows, 10)), layout="constrained")
    axis = figure.subplots()
    image = axis.imshow(cka.values, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
    axis.set_xticks(range(columns), [str(b) for b in cka.blocks_y], fontsize=7)
    axis.set_yticks(range(rows), [str(b) for b in cka.blocks_x], fontsize=7)
    axis.set_xlabel(f"{label_y}: block (0-based)", fontsize=8)
    axis.set_ylabel(f"{label_x}: block (0-based)", fontsize=8)
    if rows * columns <= 400:
        for i in range(rows):
            for j in range(columns):
                value = cka.values[i, j]
                axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                          color="white" if value < 0.6 else "black")
    figure.colorbar(image, ax=axis, label="linear CKA")
    axis.set_title(f"linear CKA, {cka.pooling} features, {len(cka.rows):,} {cka.split} images", fontsize=9)
    return save(figure, stem)


def plot_class_gains(gains: pd.DataFrame, *, title: str, stem: Path, limit: int = 40) -> tuple[Path, Path]:
    """Horizontal bars of the per-class gain in points, sorted; with many classes the ``limit // 2`` largest gains
    and losses."""
    frame = gains.sort_values("gain")
    if len(frame) > limit:
        frame = pd.concat([frame.head(limit // 2), frame.tail(limit // 2)])
    figure = Figure(figsize=(6.4, 1.2 + 0.22 * len(frame)), layout="constrained")
    axis = figure.subplots()
    values = frame["gain"].to_numpy() * 100
    axis.barh(range(len(frame)), values, color=[COLORS[2] if v >= 0 else COLORS[3] for v in values])
    axis.set_yticks(range(len(frame)), [str(c) for c in frame["class"]], fontsize=7)
    axis.axvline(0, color="black", linewidth=0.8)
    axis.set_xlabel("gain in k-NN top-1 (points)", fontsize=8)
    axis.grid(alpha=0.3, axis="x")
    axis.tick_params(labelsize=8)
    axis.set_title(title, fontsize=9)
    return save(figure, stem)
