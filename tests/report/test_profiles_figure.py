"""The compare figures read from their axes (issue 19): three profiles of different depths on one figure per curve
over the relative depth block / (depth - 1), each profile's best block starred and named, its interval a band; and a
before/after pair's difference panels beside its curve panels, one row per pooling."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mimprobe.blocks import relative_depth
import mimprobe.report.plots as plots
from mimprobe.report import CompareConfig, run_compare

CONFIG = CompareConfig(resamples=200, cka=False)


@pytest.fixture
def recorded(monkeypatch):
    """Every figure the report saves, by file stem (the real report path draws them)."""
    figures = {}
    save = plots.save

    def recording(figure, stem):
        figures[stem.name] = figure
        return save(figure, stem)

    monkeypatch.setattr(plots, "save", recording)
    return figures


def _knn_curve(folder, pooling: str) -> pd.Series:
    table = pd.read_parquet(folder / "profile.parquet")
    rows = table[(table["metric"] == "knn_top1") & (table["split"] == "test") & (table["pooling"] == pooling)
                 & table["params"].str.contains('"k":10')]
    return rows.groupby("block")["value"].mean().sort_index()


def test_three_profiles_share_one_relative_depth_axis(profiles, tmp_path, recorded):
    folders = {"base": profiles.before, "refined": profiles.after, "deeper": profiles.deeper}
    run_compare(list(folders.values()), out=tmp_path, labels=list(folders), config=CONFIG)
    stem = next(name for name in recorded if name.startswith("curve_knn_top1-test-k10"))
    axis = recorded[stem].axes[0]                      # the one pooling all three hold: mean
    assert axis.get_xlabel() == "relative depth: block / (depth - 1)"
    curves = {line.get_label(): line for line in axis.get_lines() if line.get_label()[:1] != "_"}
    for label, folder in folders.items():
        values = _knn_curve(folder, "mean")
        depth = len(values)
        best = int(values.idxmax())
        line = curves[f"{label} (best: block {best} of {depth})"]          # the legend names the best block
        x = np.asarray(line.get_xdata(), dtype=float)
        np.testing.assert_allclose(x, np.arange(depth) / (depth - 1))      # 6 and 8 blocks both span 0..1
        assert (x[0], x[-1]) == (0.0, 1.0)
        np.testing.assert_allclose(line.get_ydata(), values.to_numpy() * 100)
        stars = [star for star in axis.get_lines() if star.get_marker() == "*"
                 and star.get_color() == line.get_color()]
        assert len(stars) == 1
        np.testing.assert_allclose([stars[0].get_xdata()[0], stars[0].get_ydata()[0]],
                                   [best / (depth - 1), values.max() * 100])
    assert {len(line.get_xdata()) for line in curves.values()} == {6, 8}
    assert len(axis.collections) >= 3                  # a Wilson band per profile (predictions.npz)
    table = pd.read_parquet(tmp_path / "compare.parquet")
    deeper = table[table["label"] == "deeper"]
    np.testing.assert_allclose(deeper["relative_depth"], deeper["block"] / 7)


def test_relative_depth_is_block_over_depth_minus_one():
    np.testing.assert_allclose(relative_depth([0, 3, 6], 7), [0, 0.5, 1])
    np.testing.assert_allclose(relative_depth([0, 11], 12), [0, 1])
    assert relative_depth(0, 1) == 1.0


def test_a_pairs_differences_sit_beside_its_curves(profiles, tmp_path, recorded):
    result = run_compare([profiles.before, profiles.after], out=tmp_path, labels=["base", "refined"], config=CONFIG)
    pair = result.pairs[0]
    slug = next(name for name in recorded if name.startswith("curve_knn_top1-test-k10"))[len("curve_"):]
    curve, delta = recorded[f"curve_{slug}"], recorded[f"delta_0_{slug}"]
    assert len(curve.axes) == len(delta.axes) == len(pair.poolings) == 2
    assert curve.get_size_inches()[1] == delta.get_size_inches()[1]       # the same rows, side by side
    for axis, pooling in zip(delta.axes, pair.poolings):
        rows = pair.deltas[(pair.deltas["key"].map(lambda key: key.slug) == slug)
                           & (pair.deltas["pooling"] == pooling)].sort_values("block")
        assert axis.get_title().startswith(f"{pooling} pooling")
        heights = [bar.get_height() for bar in axis.patches]
        np.testing.assert_allclose(heights, rows["delta"].to_numpy(dtype=float) * 100)
        assert rows["low"].notna().all()
    markdown = (tmp_path / "report.md").read_text()
    beside = [line for line in markdown.splitlines() if f"(curve_{slug}.png)" in line]
    assert len(beside) == 1 and f"(delta_0_{slug}.png)" in beside[0]
    html = (tmp_path / "report.html").read_text()
    row = html[html.index('<div class="row">'):]
    row = row[:row.index("</div>")]
    assert row.count("<img ") == 2
    differences = html[html.index('id="differences-0"'):]
    assert "<img " not in differences[:differences.index('id="cka-0"')]   # not again in its own section


@pytest.mark.slow  # the same-depth variant of the relative-depth figure test (7 s); CI runs it
def test_three_profiles_of_one_depth_are_drawn_over_relative_depth(profiles, tmp_path, recorded):
    run_compare([profiles.before, profiles.after, profiles.before], out=tmp_path, labels=["a", "b", "c"],
                config=CompareConfig(resamples=20, cka=False))
    stem = next(name for name in recorded if name.startswith("curve_knn_top1-test-k10"))
    for axis in recorded[stem].axes:
        assert axis.get_xlabel() == "relative depth: block / (depth - 1)"
        lines = [line for line in axis.get_lines() if line.get_label().startswith(("a (", "b (", "c ("))]
        assert len(lines) == 3
        for line in lines:
            np.testing.assert_allclose(line.get_xdata(), np.arange(6) / 5)
