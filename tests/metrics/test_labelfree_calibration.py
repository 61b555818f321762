"""Calibration of label-free curves: scipy's spearmanr, the bootstrap over images, pick rules, the rule table."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from mimprobe.errors import BadInputError
from mimprobe.metrics.labelfree import (PICKS, RULES, bootstrap_accuracy, bootstrap_indices, calibrate,
                                        first_min_after_peak, pick_block, seeded_subset, spearman_rho, spearman_rows)
from mimprobe.metrics.labelfree.subset import LabelFreeEstimate

LABEL_FREE_METRICS = ("twonn_id", "alpha_req", "nesum", "rankme", "dataset_entropy", "neighbourhood_overlap",
                      "cluster_learnability")


def twelve_block_run(n_images: int = 2000, seed: int = 0):
    """A ViT-like profile: k-NN accuracy rises to block 8 then falls; per-image hits drawn at those rates."""
    rng = np.random.default_rng(seed)
    accuracy = np.array([0.2, 0.28, 0.35, 0.41, 0.47, 0.52, 0.56, 0.59, 0.61, 0.6, 0.57, 0.5])
    hits = rng.uniform(size=(12, n_images)) < accuracy[:, None]
    return accuracy, hits


def test_spearman_equals_scipy_with_and_without_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = rng.standard_normal(12), rng.standard_normal(12)
        assert spearman_rho(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
        tied_x, tied_y = np.round(x), np.round(y * 2) / 2
        assert spearman_rho(tied_x, tied_y) == pytest.approx(spearmanr(tied_x, tied_y).statistic, abs=1e-12)
    rows_x, rows_y = rng.standard_normal((7, 12)), rng.integers(0, 4, (7, 12)).astype(float)
    expected = [spearmanr(a, b).statistic for a, b in zip(rows_x, rows_y)]
    np.testing.assert_allclose(spearman_rows(rows_x, rows_y), expected, atol=1e-12)
    assert np.isnan(spearman_rho(np.ones(5), np.arange(5.0)))


def test_calibration_rho_equals_scipy_on_the_blocks_with_a_value():
    accuracy, hits = twelve_block_run()
    overlap = np.r_[np.linspace(0.3, 0.8, 11) + 0.05 * np.sin(np.arange(11)), np.nan]  # none for the last block
    result = calibrate("neighbourhood_overlap", overlap, hits=hits, n_resamples=200)
    measured = hits.mean(axis=1)
    assert result.rho == pytest.approx(spearmanr(overlap[:11], measured[:11]).statistic, abs=1e-12)
    assert result.n_blocks == 11 and result.picked_block == int(np.nanargmax(overlap))
    assert result.accuracy_lost == pytest.approx(measured.max() - measured[result.picked_block])
    assert result.rho_low <= result.rho <= result.rho_high


def test_bootstrap_accuracy_spread_is_the_binomial_one():
    accuracy, hits = twelve_block_run(n_images=1000)
    replicates = bootstrap_accuracy(hits, n_resamples=2000, seed=1)
    measured = hits.mean(axis=1)
    np.testing.assert_allclose(replicates.mean(axis=0), measured, atol=0.003)
    np.testing.assert_allclose(replicates.std(axis=0), np.sqrt(measured * (1 - measured) / 1000), rtol=0.1)
    # one resample of the images serves every block: block curves move together, as with index resampling
    same = np.vstack([hits[0], hits[0]])
    paired = bootstrap_accuracy(same, n_resamples=50, seed=2)
    np.testing.assert_array_equal(paired[:, 0], paired[:, 1])


def test_interval_narrows_with_more_images_and_is_nan_without_hits():
    overlap_like = np.array([0.5, 0.56, 0.61, 0.6, 0.66, 0.7, 0.69, 0.73, 0.74, 0.76, 0.77, 0.78])
    widths = []
    for n_images in (200, 5000):
        accuracy, hits = twelve_block_run(n_images=n_images, seed=3)
        result = calibrate("nesum", overlap_like, hits=hits, n_resamples=300, seed=4)
        widths.append(result.rho_high - result.rho_low)
    assert widths[1] < widths[0]
    no_hits = calibrate("nesum", overlap_like, accuracy, n_resamples=300)
    assert np.isnan(no_hits.rho_low) and no_hits.n_resamples == 0


def test_label_free_replicates_are_paired_by_position():
    accuracy, hits = twelve_block_run(seed=5)
    curve = accuracy + 0.01 * np.arange(12)
    fixed = calibrate("rankme", curve, hits=hits, n_resamples=100, seed=6)
    replicated = calibrate("rankme", curve, hits=hits, n_resamples=100, seed=6,
                           metric_replicates=np.tile(curve, (100, 1)))
    assert (fixed.rho_low, fixed.rho_high) == (replicated.rho_low, replicated.rho_high)
    assert replicated.labelfree_resampled and not fixed.labelfree_resampled
    with pytest.raises(BadInputError, match="metric_replicates"):
        calibrate("rankme", curve, hits=hits, n_resamples=100, metric_replicates=np.ones((10, 12)))


def test_pick_rules():
    id_profile = np.array([5.0, 9.0, 12.0, 10.0, 7.0, 6.0, 8.0, 7.0, 9.0])  # peak at 2, first minimum after it: 5
    assert first_min_after_peak(id_profile) == 5
    assert pick_block(np.array([8.0, 11.0, 9.0, 7.0, 6.5]), "first_min_after_peak") == 4  # decreasing to the end
    assert pick_block(np.array([3.0, 2.0, 4.0, 6.0]), "first_min_after_peak") == 1  # peak last: global minimum
    assert pick_block(np.array([np.nan, 9.0, 12.0, np.nan, 7.0, 8.0]), "first_min_after_peak") == 4
    assert pick_block(np.array([2.3, 1.4, 0.8, 1.1]), "closest_to_1") == 3
    assert pick_block(np.array([1.0, 3.0, np.nan, 2.0]), "max") == 1
    assert pick_block(np.array([1.0, 3.0, np.nan, 0.5]), "min") == 3
    with pytest.raises(BadInputError, match="unknown pick rule"):
        pick_block(np.ones(3), "median")


def test_rule_table_covers_every_label_free_metric():
    assert set(RULES) == set(LABEL_FREE_METRICS)
    for name, rule in RULES.items():
        assert rule.metric == name and rule.pick in PICKS and rule.source and rule.note
        assert rule.direction in ("higher", "lower", "target", "profile")
    assert RULES["twonn_id"].pick == "first_min_after_peak" and RULES["alpha_req"].pick == "closest_to_1"


def test_oriented_rho_reads_each_rule_in_its_better_direction():
    accuracy, hits = twelve_block_run(seed=7)
    alpha = 1.0 + np.abs(np.arange(12) - 8) * 0.15 + 0.01 * np.arange(12)  # closest to 1 where accuracy peaks
    result = calibrate("alpha_req", alpha, hits=hits, n_resamples=200)
    measured = hits.mean(axis=1)
    assert result.oriented_rho == pytest.approx(spearmanr(-np.abs(alpha - 1), measured).statistic, abs=1e-12)
    assert result.oriented_rho > 0.8 and result.oriented_low <= result.oriented_rho <= result.oriented_high
    id_curve = 40.0 - 10 * measured  # low ID where accuracy is high
    assert calibrate("twonn_id", id_curve, measured).oriented_rho == pytest.approx(1.0)
    assert calibrate("twonn_id", id_curve, measured).rho == pytest.approx(-1.0)


def test_block_numbers_and_accuracy_lost():
    accuracy, _ = twelve_block_run()
    alpha = np.array([3.0, 2.6, 2.2, 1.9, 1.6, 1.4, 1.25, 1.1, 0.97, 0.9, 0.8, 0.7])
    result = calibrate("alpha_req", alpha, accuracy, blocks=list(range(12, 24)))
    assert result.picked_block == 20 and result.best_block == 20 and result.accuracy_lost == 0.0
    result = calibrate("alpha_req", alpha, accuracy, pick="max")
    assert result.picked_block == 0 and result.accuracy_lost == pytest.approx(0.61 - 0.2)


def test_bad_calibration_inputs_raise():
    with pytest.raises(BadInputError, match="at least 3 finite"):
        calibrate("nesum", np.array([1.0, np.nan, np.nan, 2.0]), np.array([0.1, 0.2, 0.3, 0.4]))
    with pytest.raises(BadInputError, match="one length"):
        calibrate("nesum", np.ones(4), np.ones(5))
    with pytest.raises(BadInputError, match="no pick rule"):
        calibrate("mystery", np.arange(4.0), np.arange(4.0))


def test_seeded_subset_and_rows():
    subset = seeded_subset(10_000, size=500, seed=3)
    assert subset.size == 500 and np.array_equal(subset.rows, seeded_subset(10_000, size=500, seed=3).rows)
    assert np.all(np.diff(subset.rows) > 0) and subset.params() == {"subset": 500, "subset_seed": 3}
    everything = seeded_subset(300, size=500, seed=3)
    assert everything.rows is None and everything.params() == {"subset": 300, "subset_seed": None}
    with pytest.raises(BadInputError, match="at least 2"):
        seeded_subset(100, size=1)
    rows = LabelFreeEstimate(4.2, {"method": "linear"}, 0.1).rows(metric="twonn_id", split="train", subset=subset)
    assert [r.metric for r in rows] == ["twonn_id", "twonn_id_se"] and rows[1].value == 0.1
    assert rows[0].params == {"method": "linear", "subset": 500, "subset_seed": 3}
    assert bootstrap_indices(50, n_resamples=4, seed=0).shape == (4, 50)
