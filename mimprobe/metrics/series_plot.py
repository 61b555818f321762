"""series.png: the profile of a checkpoint series as heatmaps, one per headline curve and pooling: blocks (rows,
0-based) x checkpoints (columns, in training order), the colour the curve's value in its unit, each checkpoint's best
block boxed. It shows where along training the late-block decline of a MIM model appears (the best block moving
away from the last), and how refinement epochs move it."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from .curves import Curve  # noqa: E402
from .plot import y_label  # noqa: E402

ANNOTATED_CELLS = 160   # values printed in the cells up to this many per heatmap (else the colour bar alone)


def _rows(table: pd.DataFrame, headline: Curve, pooling: str) -> pd.DataFrame:
    rows = headline.select(table)
    return rows[rows["pooling"] == pooling]


def series_matrix(table: pd.DataFrame, headline: Curve, pooling: str,
                  checkpoints: list[str]) -> tuple[list[int], np.ndarray]:
    """(blocks, values): the (num_blocks, num_checkpoints) values of one curve, column j from the rows whose
    ``checkpoint`` is ``checkpoints[j]`` (NaN where a checkpoint has no value for a block)."""
    blocks = sorted(int(b) for b in set(_rows(table, headline, pooling)["block"]))
    values = np.full((len(blocks), len(checkpoints)), np.nan)
    row_of = {block: index for index, block in enumerate(blocks)}
    for column, name in enumerate(checkpoints):
        for block, value in headline.values(table[table["checkpoint"] == name], pooling).items():
            values[row_of[int(block)], column] = value
    return blocks, values


def plot_series(table: pd.DataFrame, headlines: list[Curve], *, checkpoints: list[str], title: str,
                path: Path) -> None:
    """Write `series_figure` to ``path`` (PNG)."""
    series_figure(table, headlines, checkpoints=checkpoints, title=title).savefig(path, dpi=110)


def series_figure(table: pd.DataFrame, headlines: list[Curve], *, checkpoints: list[str], title: str) -> Figure:
    """The heatmaps of every headline curve and pooling of a series table: one panel per (headline, pooling), its
    image the (blocks, checkpoints) matrix of `series_matrix` (accuracies in %), in the order of ``headlines``.

    Args:
        table: The series' long table (profile columns, ``checkpoint`` holding the names of ``checkpoints``).
        headlines: The curves, one row of heatmaps each (one heatmap per pooling).
        checkpoints: Checkpoint names in training order (the columns).
        title: Figure title.
    """
    poolings = list(dict.fromkeys(table["pooling"]))
    panels = [(headline, pooling) for headline in headlines for pooling in poolings
              if not _rows(table, headline, pooling).empty]
    columns = min(len(poolings), 2) if len(poolings) > 1 else min(len(panels), 2) or 1
    rows = max(math.ceil(len(panels) / columns), 1)
    width = max(4.2, 1.2 + 0.55 * len(checkpoints))
    figure = Figure(figsize=(width * columns, 3.8 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis, (headline, pooling) in zip(axes.flat, panels):
        blocks, values = series_matrix(table, headline, pooling, checkpoints)
        scale = 100.0 if headline.is_percent else 1.0
        shown = values * scale
        image = axis.imshow(shown, origin="lower", aspect="auto", cmap="viridis", interpolation="nearest")
        figure.colorbar(image, ax=axis, label=y_label(headline))
        if shown.size <= ANNOTATED_CELLS:
            middle = np.nanmean(shown) if np.isfinite(shown).any() else 0.0
            for (row, column), value in np.ndenumerate(shown):
                if np.isfinite(value):
                    axis.text(column, row, f"{value:.1f}" if scale != 1.0 or abs(value) >= 10 else f"{value:.2f}",
                              ha="center", va="center", fontsize=7, color="white" if value < middle else "black")
        for column in range(values.shape[1]):  # each checkpoint's best block, boxed
            finite = np.isfinite(values[:, column])
            if not finite.any():
                continue
            masked = np.where(finite, values[:, column], -np.inf if headline.higher_is_better else np.inf)
            best = int(np.argmax(masked) if headline.higher_is_better else np.argmin(masked))
            axis.add_patch(Rectangle((column - 0.5, best - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.6))
        axis.set_xticks(range(len(checkpoints)), checkpoints, rotation=45, ha="right", fontsize=8)
        axis.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=8)
        axis.set_xlabel("checkpoint (training order)", fontsize=9)
        axis.set_ylabel("block (0-based)", fontsize=9)
        axis.set_title(f"{headline.title}, {pooling}", fontsize=9, wrap=True)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    figure.suptitle(f"{title}\nred box: each checkpoint's best block", fontsize=10)
    return figure
