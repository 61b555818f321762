"""A profile of a store with points inside the blocks: rows per (block, point), the block point's rows equal to a
block-only profile's, per-point best blocks and predictions, old tables without the column, placement on the block
point."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from mimprobe import extract
from mimprobe.metrics.points import best_blocks_by_point, point_rows, with_points
from mimprobe.metrics.predictions import SamplePredictions
from mimprobe.metrics.profile import COLUMNS, ProfileConfig, iter_best_lines
from mimprobe.pipeline.profiling import run_profile
from mimprobe.placement import run_place

DATA = "synthetic:classes=4,train=30,test=10,size=16,seed=1"
CONFIG = ProfileConfig(metrics=("knn", "linear", "rank", "overlap"), poolings=("cls",))


@pytest.fixture(scope="module")
def profiles(tmp_path_factory):
    """(profile with points block, attn and mlp_hidden; profile of the block-only store of the same settings)."""
    root = tmp_path_factory.mktemp("points")
    options = dict(out=root / "stores", img_size=32, pool=("cls",), progress=False)
    with_inner = extract("test_vit", DATA, points="block,attn,mlp_hidden", **options).store
    block_only = extract("test_vit", DATA, **options).store
    return (run_profile(with_inner.path, out=root / "points", config=CONFIG, progress=False),
            run_profile(block_only.path, out=root / "block", config=CONFIG, progress=False))


def test_rows_per_point_and_the_block_point_equals_a_block_only_profile(profiles):
    points, block = profiles
    table = points.table
    assert list(table.columns) == COLUMNS and set(table["point"]) == {"block", "attn", "mlp_hidden"}
    assert set(block.table["point"]) == {"block"}
    sizes = table.groupby("point").size()
    assert sizes["attn"] == sizes["mlp_hidden"] == sizes["block"] == len(block.table)
    key = ["split", "block", "pooling", "metric", "params"]
    ours = point_rows(table).sort_values(key).reset_index(drop=True)
    theirs = block.table.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(ours, theirs)
    # the points are measured on their own arrays: the hidden activation's effective rank is not the block's
    rank = table[table["metric"] == "rankme"].pivot_table(index="block", columns="point", values="value")
    assert not np.allclose(rank["mlp_hidden"], rank["block"])


def test_each_points_predictions_give_its_rows(profiles):
    points, _ = profiles
    table, predictions = points.table, SamplePredictions.load(points.files["predictions"])
    checked = 0
    for row in table[table["metric"].isin(["knn_top1", "linear_top1"]) & (table["split"] == "test")].itertuples():
        hits = predictions.get(metric=row.metric, split=row.split, block=row.block, pooling=row.pooling,
                               params=row.params, point=row.point)
        assert hits is not None and hits.mean() == pytest.approx(row.value), row
        checked += 1
    assert checked == 2 * 3 * 6  # k-NN (the mim-refiner preset: k=10) and linear, 3 points, 6 blocks


def test_best_blocks_per_point_are_the_argmax_of_each_points_curve(profiles, tmp_path):
    points, _ = profiles
    best = points.best
    assert list(best.columns[:5]) == ["metric", "table_metric", "unit", "pooling", "point"]
    table = points.table
    for point in ("block", "attn", "mlp_hidden"):
        record = best[(best["point"] == point) & best["metric"].str.startswith("linear probe")].iloc[0]
        curve = table[(table["point"] == point) & (table["metric"] == "linear_top1")
                      & (table["split"] == "test")].set_index("block")["value"]
        assert record["best_value"] == pytest.approx(curve.max()) and curve[record["best_block"]] == curve.max()
    lines = list(iter_best_lines(best))
    assert any(" mlp_hidden " in line for line in lines) and len(lines) == len(best)
    written = json.loads((points.out / "profile.json").read_text())
    assert written["points"] == ["block", "attn", "mlp_hidden"]
    assert {record["point"] for record in written["best_blocks"]} == {"block", "attn", "mlp_hidden"}


def test_a_table_without_the_point_column_reads_as_the_block_point(profiles):
    _, block = profiles
    old = block.table.drop(columns="point")
    restored = with_points(old)
    assert list(restored.columns) == COLUMNS and set(restored["point"]) == {"block"}
    pd.testing.assert_frame_equal(best_blocks_by_point(old, "mim-refiner").drop(columns="point"),
                                  best_blocks_by_point(block.table, "mim-refiner").drop(columns="point"))


def test_placement_reads_the_block_point(profiles, tmp_path):
    points, block = profiles
    with_points_placement = run_place(points.out, out=tmp_path / "a.json")
    block_placement = run_place(block.out, out=tmp_path / "b.json")
    assert with_points_placement.head_blocks == block_placement.head_blocks
    assert with_points_placement.inputs.curve == block_placement.inputs.curve
    assert len(block_placement.inputs.curve) == 6
    # an older profile folder: its csv has no point column
    old = block.out / "old"
    old.mkdir()
    block.table.drop(columns="point").to_csv(old / "profile.csv", index=False)
    for name in ("profile.json", "predictions.npz"):
        shutil.copy(block.out / name, old / name)
    assert run_place(old, out=tmp_path / "c.json").head_blocks == block_placement.head_blocks


def test_profile_png_draws_each_point_as_a_curve_of_the_same_panel(profiles, monkeypatch, tmp_path):
    import matplotlib.figure

    from mimprobe.metrics.headlines import headlines
    from mimprobe.metrics.plot import plot_profile

    points, _ = profiles
    drawn = {}

    def keep(figure, path, **kwargs):
        for axis in figure.axes:
            if axis.get_legend() is not None:
                drawn[axis.get_title().split(";")[0]] = {line.get_label(): line.get_ydata()
                                                         for line in axis.get_lines()
                                                         if not line.get_label().startswith("_")}

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    table = points.table
    plot_profile(table, headlines("mim-refiner", table), points.best, title="t", path=tmp_path / "p.png",
                 predictions=points.predictions, num_classes=4)
    linear = next(lines for title, lines in drawn.items() if title.startswith("linear probe top-1"))
    assert set(linear) == {"cls, block", "cls, attn", "cls, mlp_hidden", "chance (1/4)"}  # one panel, one legend
    for point in ("block", "attn", "mlp_hidden"):
        curve = table[(table["point"] == point) & (table["metric"] == "linear_top1")
                      & (table["split"] == "test")].sort_values("block")["value"].to_numpy()
        np.testing.assert_allclose(linear[f"cls, {point}"], 100 * curve)


def test_compare_draws_each_point_as_an_extra_curve_and_compares_the_block_point(profiles, monkeypatch, tmp_path):
    from mimprobe.report import CompareConfig, content, run_compare

    points, block = profiles
    drawn = {}
    original = content.plot_curves

    def keep(key, poolings, sides, **kwargs):
        drawn[key] = sides
        return original(key, poolings, sides, **kwargs)

    monkeypatch.setattr(content, "plot_curves", keep)
    result = run_compare([block.out, points.out], out=tmp_path / "report", labels=["plain", "inner"],
                         config=CompareConfig(resamples=50, cka=False))
    linear = next(sides for key, sides in drawn.items() if key.metric == "linear_top1" and key.split == "test")
    assert [side.label for side in linear] == ["plain", "inner, block", "inner, attn", "inner, mlp_hidden"]
    table = points.table
    for side, point in zip(linear[1:], ("block", "attn", "mlp_hidden")):
        expected = table[(table["point"] == point) & (table["metric"] == "linear_top1")
                         & (table["split"] == "test")].set_index("block")["value"].sort_index()
        np.testing.assert_allclose(side.by_pooling["cls"].to_numpy(), expected.to_numpy())
        assert "cls" in side.bands  # Wilson bands from the point's own predictions
    deltas = result.pairs[0].deltas  # the deltas compare the block point: the same numbers on both sides
    assert len(deltas) and np.allclose(deltas["delta"].to_numpy(dtype=float), 0)
