"""profile.png: one panel per headline metric, the block curves per pooling, the best block marked."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .headlines import select_headline  # noqa: E402


def plot_profile(table: pd.DataFrame, headlines: list, best: pd.DataFrame, *, title: str, path: Path) -> None:
    """Draw the block curves of every headline (blocks 0-based, as timm's ``blocks.{i}``)."""
    count = max(len(headlines), 1)
    columns = min(3, count)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.3 * rows), squeeze=False)
    for axis, headline in zip(axes.flat, headlines):
        selected = select_headline(table, headline)
        for pooling, group in selected.groupby("pooling", sort=False):
            curve = group.groupby("block")["value"].mean()
            line, = axis.plot(curve.index, curve.values, marker="o", markersize=3, label=pooling)
            best_row = best[(best["metric"] == headline.title) & (best["pooling"] == pooling)]
            if not best_row.empty:
                block, value = int(best_row["best_block"].iloc[0]), float(best_row["best_value"].iloc[0])
                axis.plot([block], [value], marker="*", markersize=13, color=line.get_color(),
                          markeredgecolor="black", zorder=5)
        axis.set_title(headline.title, fontsize=9)
        axis.set_xlabel("block (0-based)", fontsize=8)
        axis.grid(alpha=0.3)
        axis.tick_params(labelsize=8)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(headlines):]:
        axis.axis("off")
    figure.suptitle(f"{title}  (best block per pooling: star)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
