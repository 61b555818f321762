"""Multi-block readouts (``--readout``) in the reports: reference lines beside the per-block linear-probe curve in
profile.png and the compare report, a table of them, and no curve of their own."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import pandas as pd
import pytest

import mimprobe
from mimprobe.metrics import plot as profile_plot
from mimprobe.metrics.curves import Curve
from mimprobe.metrics.readout import reference_lines
from mimprobe.report import CompareConfig, run_compare
from mimprobe.report.plots import SideCurve, curve_figure

DATA = "synthetic:classes=4,train=20,test=8,size=16"
OPTIONS = {"img_size": 32, "pool": ("cls", "mean"), "norm": "final", "metrics": "knn,linear", "threads": 1,
           "progress": False}


@pytest.fixture(scope="module")
def readout_profiles(tmp_path_factory):
    root = tmp_path_factory.mktemp("readout-profiles")
    features = str(root / "features")
    mimprobe.profile("test_vit", DATA, out=str(root / "a"), features=features, readout="last4+avg,all", **OPTIONS)
    mimprobe.profile("test_vit", DATA, out=str(root / "b"), features=features, readout="last1,last4+avg", **OPTIONS)
    return root / "a", root / "b"


def _readout_value(folder, name: str, pooling: str) -> float:
    table = pd.read_parquet(folder / "profile.parquet")
    rows = table[(table["metric"] == "linear_readout_top1") & (table["pooling"] == pooling)]
    return float(rows[rows["params"].map(lambda p: json.loads(p)["readout"] == name)]["value"].iloc[0])


def test_compare_report_lists_readouts_and_draws_no_curve_of_them(readout_profiles, tmp_path, read_tables):
    a, b = readout_profiles
    result = run_compare([a, b], out=tmp_path / "report", labels=["A", "B"], config=CompareConfig(resamples=50))
    assert not any("readout" in name for name in result.files), "readouts are reference lines, not curves"
    header, *rows = read_tables((tmp_path / "report" / "report.html").read_text())["readouts"]
    table = pd.DataFrame(rows, columns=header).set_index("readout")
    assert table.loc["DINOv2 last4+avg", "A: top-1"] == f"{100 * _readout_value(a, 'last4+avg', 'cls'):.1f}%"
    assert table.loc["DINOv2 last4+avg", "B: top-1"] == f"{100 * _readout_value(b, 'last4+avg', 'cls'):.1f}%"
    assert table.loc["all blocks (cls)", "B: top-1"] == "–"
    assert table.loc["DINOv2 last1", "B: top-1"] == f"{100 * _readout_value(b, 'last1', 'cls'):.1f}%"
    assert table.loc["all blocks (mean)", "blocks read"] == "0-5 (mean)"
    assert table.loc["DINOv2 last4+avg", "blocks read"] == "2-5 (cls+mean)"
    linear = pd.read_parquet(a / "profile.parquet")
    best = linear[(linear["metric"] == "linear_top1") & (linear["pooling"] == "mean")]["value"].max()
    assert table.loc["all blocks (mean)", "A: best single block"].endswith(f"{100 * best:.1f}%")
    assert "Multi-block readouts" in (tmp_path / "report" / "report.md").read_text()


def test_the_curve_figure_draws_each_sides_readouts_as_horizontal_lines(readout_profiles):
    a, _ = readout_profiles
    table = pd.read_parquet(a / "profile.parquet")
    key = Curve.of("linear_top1", "test")
    lines = reference_lines(table, key.metric, key.split)
    assert [label for label, _ in lines["cls"]] == ["DINOv2 last4+avg", "all blocks (cls)"]
    assert reference_lines(table, "knn_top1", "test") == {}
    series = {p: key.values(table, p) for p in ("cls", "mean")}
    figure = curve_figure(key, ["cls", "mean"], [SideCurve("A", series, 6, references=lines)], relative=False)
    drawn = {line.get_label(): line.get_ydata()[0] for axis in figure.axes for line in axis.get_lines()}
    value = _readout_value(a, "last4+avg", "cls")
    assert drawn[f"DINOv2 last4+avg (A): {100 * value:.1f}"] == pytest.approx(100 * value)


def test_profile_png_draws_the_readouts_in_the_linear_panel(readout_profiles, monkeypatch):
    a, _ = readout_profiles
    table = pd.read_parquet(a / "profile.parquet")
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure plot_profile would close
    from mimprobe.metrics.headlines import best_blocks, headlines

    profile_plot.plot_profile(table, headlines("mim-refiner", table), best_blocks(table, "mim-refiner"), title="t",
                              path=a / "again.png")
    panels = {axis.get_title().split(";")[0]: axis for axis in figures[0].axes}
    labels = {line.get_label(): line.get_ydata()[0] for line in panels["linear probe top-1, test"].get_lines()}
    value = _readout_value(a, "last4+avg", "cls")
    assert labels[f"DINOv2 last4+avg: {100 * value:.1f}"] == pytest.approx(100 * value)
    assert any(label.startswith("all blocks (mean): ") for label in labels)
    others = [line.get_label() for title, axis in panels.items() if not title.startswith("linear probe")
              for line in axis.get_lines()]
    assert others and not any("DINOv2" in label or "all blocks" in label for label in others)
