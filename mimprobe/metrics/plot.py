"""profile.png: one panel per headline metric, the block curves per pooling (and per point, for a store with points
inside the blocks: `mimprobe.metrics.points`) with their uncertainty, the best block marked, the blocks not
distinguishable from it ringed, the chance level of accuracies drawn, and the multi-block readouts (``--readout``)
as labelled horizontal lines in the linear-probe panel."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .curves import Curve  # noqa: E402
from .headlines import headline_curve  # noqa: E402
from .points import POINT, for_point, point_rows, table_points  # noqa: E402
from .readout import reference_lines  # noqa: E402

MARKERS = ("o", "s", "^", "D", "v")
LINESTYLES = ("-", "--", "-.", ":")
# Multi-block readouts (horizontal lines beside the linear-probe curves): colours after the pooling curves' C0-C2
READOUT_COLORS = ("tab:red", "tab:purple", "tab:brown", "tab:olive", "tab:cyan", "tab:pink", "black")
_BAND = {"wilson": "95 % Wilson interval", "seed-sd": "± 1 s.d. over seeds"}


def y_label(headline: Curve) -> str:
    """The panel's y-axis label: what is drawn and in which unit (accuracies, the registry's fractions, in %)."""
    return headline.short_name + (" (%)" if headline.is_percent else "")


def plot_profile(table: pd.DataFrame, headlines: list, best: pd.DataFrame, *, title: str, path: Path,
                 predictions: Any = None, num_classes: int | None = None) -> None:
    """Draw the block curves of every headline (blocks 0-based, as timm's ``blocks.{i}``).

    Args:
        table: The profile's long table; each point of its ``point`` column is an extra curve of every panel,
            labelled "pooling, point" (a table without the column, or with the block point alone: "pooling").
        headlines: The curves to draw (`Curve`, e.g. `headlines`), one panel each.
        best: `best_blocks` (or `best_blocks_by_point`) output: best block and ``tied_blocks`` per headline title,
            pooling (and point).
        title: Figure title.
        path: The PNG to write.
        predictions: The profile's `SamplePredictions`, for the binomial intervals (None: low-shot bands only).
        num_classes: Classes of the data: chance level 1 / num_classes is drawn on accuracy panels.
    """
    count = max(len(headlines), 1)
    columns = min(3, count)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.8 * columns, 3.6 * rows), squeeze=False)
    for axis, headline in zip(axes.flat, headlines):
        scale = 100.0 if headline.is_percent else 1.0
        points = table_points(table)
        series = [(point, pooling) for point in points
                  for pooling in dict.fromkeys(headline.select(point_rows(table, point))["pooling"])]
        bands = set()
        for index, (point, pooling) in enumerate(series):
            rows = point_rows(table, point)
            curve = headline_curve(rows, headline, pooling, predictions=for_point(predictions, point))
            if curve.empty:
                continue
            x, y = curve["block"].to_numpy(), curve["value"].to_numpy() * scale
            # distinct marker and dash per series, so identical curves stay visible on top of each other
            line, = axis.plot(x, y, marker=MARKERS[index % len(MARKERS)], markersize=4,
                              linestyle=LINESTYLES[index % len(LINESTYLES)],
                              label=pooling if points == ["block"] else f"{pooling}, {point}", zorder=3)
            low, high = curve["low"].to_numpy() * scale, curve["high"].to_numpy() * scale
            if np.isfinite(low).any():
                axis.fill_between(x, low, high, color=line.get_color(), alpha=0.18, linewidth=0, zorder=2)
                bands.update(curve["interval"].loc[np.isfinite(low)])
            best_row = best[(best["metric"] == headline.title) & (best["pooling"] == pooling)]
            if POINT in best_row:
                best_row = best_row[best_row[POINT] == point]
            if best_row.empty:
                continue
            block = int(best_row["best_block"].iloc[0])
            tied = [int(b) for b in str(best_row["tied_blocks"].iloc[0]).split(",") if b and int(b) != block] \
                if "tied_blocks" in best_row else []
            at = dict(zip(x.tolist(), y.tolist()))
            if tied:
                axis.plot(tied, [at[b] for b in tied], marker="o", markersize=9, linestyle="none",
                          color=line.get_color(), markerfacecolor="none", zorder=4)  # color: keep the cycle
            axis.plot([block], [at[block]], marker="*", markersize=13, color=line.get_color(),
                      markeredgecolor="black", zorder=5, linestyle="none")
        readouts = [line for found in reference_lines(table, headline.metric, headline.split).values()
                    for line in found]
        for index, (label, value) in enumerate(readouts):
            # every readout as a reference line: does any single block's curve reach it?
            axis.axhline(value * scale, color=READOUT_COLORS[index % len(READOUT_COLORS)],
                         linestyle=(0, (1, 1.5)), linewidth=1.4, zorder=2,
                         label=f"{label}: {headline.format_value(value)}")
        if headline.is_percent and num_classes:
            axis.axhline(100.0 / num_classes, color="grey", linestyle=(0, (4, 3)), linewidth=1,
                         label=f"chance (1/{num_classes})", zorder=1)
        what = "; band: " + ", ".join(_BAND[b] for b in sorted(bands)) if bands else ""
        axis.set_title(headline.title + what, fontsize=9, wrap=True)
        axis.set_xlabel("block (0-based)", fontsize=9)
        axis.set_ylabel(y_label(headline), fontsize=9)
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.grid(alpha=0.3)
        axis.tick_params(labelsize=8)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(headlines):]:
        axis.axis("off")
    figure.suptitle(f"{title}\nstar: best block; rings: blocks not distinguishable from it "
                    "(paired McNemar p >= 0.05, or overlapping bands)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
