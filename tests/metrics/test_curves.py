"""The one curve model (`mimprobe.metrics.curves.Curve`): selection, protocol, direction, and that the profile's
headlines, the compare report and placement read the same values through it."""

import json

import numpy as np
import pandas as pd
import pytest

from mimprobe.metrics.curves import Curve, curve_rows, protocol_params, table_curves
from mimprobe.metrics.headlines import best_blocks, headline_curve, headlines
from mimprobe.placement.curve import validation_curve
from mimprobe.report.curves import curve, curve_keys


def _row(split, block, metric, value, pooling="cls", **params):
    return {"split": split, "block": block, "pooling": pooling, "metric": metric,
            "params": json.dumps(params, sort_keys=True), "value": value}


@pytest.fixture
def table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for block in range(6):
        for split in ("val", "test"):
            for k, T in ((10, 0.07), (20, 0.07)):
                rows.append(_row(split, block, "knn_top1", 0.3 + 0.05 * block + 0.01 * k / 10 + rng.normal(0, 0.01),
                                 preset="mim-refiner", k=k, T=T))
        # the probe's C is chosen per block on validation: still one curve
        rows.append(_row("test", block, "linear_top1", 0.4 + 0.03 * block, C=float(10 ** (block % 3))))
        rows.append(_row("val", block, "linear_val_top1", 0.41 + 0.03 * block, C=float(10 ** (block % 3))))
        rows.append(_row("test", block, "cluster_davies_bouldin", 3.0 - 0.4 * abs(block - 2)))
        rows.append(_row("test", block, "knn_class_top1", 0.5, preset="mim-refiner", k=10, T=0.07, **{"class": 1}))
    return pd.DataFrame(rows)


def test_protocol_params_drop_the_per_block_choices_and_the_class():
    assert protocol_params('{"C":1.0,"lr":0.1,"k":10,"class":3,"preset":"x"}') == '{"k":10,"preset":"x"}'
    assert protocol_params(None) == "{}" and protocol_params({}) == "{}"


def test_a_curve_naming_fewer_params_takes_the_rows_that_agree(table):
    named = Curve.of("knn_top1", "test", {"preset": "mim-refiner", "k": 20})
    rows = named.select(table)
    assert len(rows) == 6 and all(json.loads(p)["k"] == 20 for p in rows["params"])
    full = Curve("knn_top1", "test", protocol_params({"preset": "mim-refiner", "k": 20, "T": 0.07}))
    pd.testing.assert_series_equal(named.values(table, "cls"), full.values(table, "cls"))
    assert Curve.of("knn_top1", "test", {"k": 5}).select(table).empty


def test_the_linear_curve_is_one_curve_over_its_per_block_c(table):
    curves = table_curves(table)
    assert [c for c in curves if c.metric == "linear_top1"] == [Curve("linear_top1", "test", "{}")]
    assert Curve("knn_class_top1", "test", protocol_params({"preset": "mim-refiner", "k": 10, "T": 0.07})) \
        not in curves                                  # per-class rows are never a curve
    values = Curve("linear_top1", "test").values(table, "cls")
    np.testing.assert_allclose(values.to_numpy(), 0.4 + 0.03 * np.arange(6))


def test_direction_unit_and_titles_come_from_the_registry(table):
    bouldin = Curve("cluster_davies_bouldin", "test")
    assert not bouldin.higher_is_better and bouldin.unit == "number" and not bouldin.is_percent
    assert bouldin.best(bouldin.values(table, "cls")) == (5, pytest.approx(1.8))   # lower is better
    knn = Curve.of("knn_top1", "test", {"preset": "mim-refiner", "k": 10, "T": 0.07})
    assert knn.title == "k-NN top-1 (mim-refiner, k=10, T=0.07), test"
    assert knn.is_percent and knn.format_value(0.4567) == "45.7" and knn.format_delta(-0.012) == "-1.2"
    assert knn.slug == "knn_top1-test-k10"


def test_profile_report_and_placement_read_the_same_validation_curve(table):
    """One model of a curve: the headline placement curve, the report's curve of the same protocol and placement's
    validation curve hold the same values."""
    headline = next(c for c in headlines("mim-refiner", table) if c.metric == "knn_top1" and c.split == "val")
    from_headline = headline_curve(table, headline, "cls").set_index("block")["value"]
    report_key = next(key for key in curve_keys(table, preset="mim-refiner")
                      if key.metric == "knn_top1" and key.split == "val" and key.param_dict["k"] == 10)
    from_report = curve(curve_rows(table), report_key, "cls")
    placement = validation_curve(table, metric="knn", pooling="cls", k=10)
    from_placement = pd.Series(dict(placement.values))
    np.testing.assert_allclose(from_headline.to_numpy(), from_report.to_numpy())
    np.testing.assert_allclose(from_placement.to_numpy(), from_report.to_numpy())
    assert placement.curve == report_key and placement.params == report_key.param_dict
    best = best_blocks(table, "mim-refiner")
    assert set(best["metric"]) == {c.title for c in headlines("mim-refiner", table)}
