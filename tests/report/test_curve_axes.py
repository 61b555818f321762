"""Curve panels span their data (issue 19): a 2-point change fills the panel; the chance level stays named."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mimprobe.metrics.curves import Curve
from mimprobe.report.plots import SideCurve, curve_figure, data_limits

KEY = Curve.of("knn_top1", "test", '{"k":10,"preset":"mim-refiner","T":0.07}')


def _sides(before: list[float], after: list[float]) -> list[SideCurve]:
    blocks = range(len(before))
    return [SideCurve("before", {"cls": pd.Series(before, index=blocks)}, len(before)),
            SideCurve("after", {"cls": pd.Series(after, index=blocks)}, len(after))]


def _texts(axis) -> list[str]:
    legend = axis.get_legend()
    return ([t.get_text() for t in axis.texts] + [axis.get_title()]
            + ([t.get_text() for t in legend.get_texts()] if legend else []))


def test_the_y_axis_follows_the_data_and_names_a_far_chance_level():
    """Data in [0.80, 0.84] with chance 0.10: the axis spans about [78, 86] %, not 10-95; the chance level is named
    in an annotation instead of a line."""
    figure = curve_figure(KEY, ["cls"], _sides([0.80, 0.81, 0.83], [0.80, 0.82, 0.84]), relative=False, chance=0.1)
    axis = figure.axes[0]
    low, high = axis.get_ylim()
    assert 78 <= low <= 80 and 84 <= high <= 86
    assert any("chance 10.0%" in text and "below" in text for text in _texts(axis))
    assert not any(line.get_label().startswith("chance") for line in axis.get_lines())


def test_a_near_chance_level_stays_on_the_axis_as_a_named_line():
    figure = curve_figure(KEY, ["cls"], _sides([0.12, 0.2, 0.3], [0.13, 0.22, 0.35]), relative=False, chance=0.1)
    axis = figure.axes[0]
    low, high = axis.get_ylim()
    assert low < 10 < 35 < high and high < 40
    assert "chance 10.0%" in _texts(axis)


def test_bands_are_inside_the_axis():
    side = SideCurve("before", {"cls": pd.Series([0.5, 0.52], index=[0, 1])}, 2,
                     bands={"cls": (pd.Series([0.45, 0.47], index=[0, 1]), pd.Series([0.55, 0.6], index=[0, 1]),
                                    "95 % Wilson")})
    low, high = curve_figure(KEY, ["cls"], [side], relative=False).axes[0].get_ylim()
    assert 43 <= low <= 45 and 60 <= high <= 62     # [45, 60] padded by 10 % of its span


def test_data_limits_pads_flat_curves_and_ignores_missing_values():
    assert data_limits(np.array([0.5, 0.5, np.nan])) == (0.0, 1.0, False)
    low, high, on_axis = data_limits(np.array([80.0, 84.0]), chance=10.0)
    assert (low, high, on_axis) == (79.6, 84.4, False)
    assert data_limits(np.array([80.0, 84.0]), chance=78.0)[2]
