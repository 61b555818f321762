"""Paired bootstrap intervals: coverage of no change, exclusion of a large change, the normal approximation."""

from __future__ import annotations

import numpy as np
import pytest

from mimprobe.errors import BadInputError
from mimprobe.report import paired_bootstrap


def _predictions(rng: np.random.Generator, n: int, accuracy: float) -> np.ndarray:
    return rng.random(n) < accuracy


def test_no_change_interval_contains_zero():
    rng = np.random.default_rng(0)
    # Two models with the same true accuracy, wrong on different images: a real difference of 0.
    before, after = _predictions(rng, 2000, 0.7), _predictions(rng, 2000, 0.7)
    interval = paired_bootstrap(before, after, seed=0)
    assert interval.low[0] < 0 < interval.high[0]
    assert interval.delta[0] == pytest.approx(after.mean() - before.mean())
    assert not interval.excludes_zero()[0]


def test_large_change_interval_excludes_zero():
    rng = np.random.default_rng(1)
    before = _predictions(rng, 500, 0.5)
    after = before | _predictions(rng, 500, 0.6)  # fixes about 30 % of the images, breaks none
    interval = paired_bootstrap(before, after, seed=0)
    assert interval.low[0] > 0.2 and interval.excludes_zero()[0]
    worse = paired_bootstrap(after, before, seed=0)  # the same change backwards
    assert worse.high[0] < 0 and worse.delta[0] == pytest.approx(-interval.delta[0])


def test_width_matches_the_normal_approximation_of_a_paired_mean():
    rng = np.random.default_rng(2)
    before = _predictions(rng, 3000, 0.6)
    after = np.where(rng.random(3000) < 0.8, before, _predictions(rng, 3000, 0.7))  # correlated, as real models
    interval = paired_bootstrap(before, after, resamples=2000, seed=3)
    differences = after.astype(float) - before.astype(float)
    half_width = 1.959964 * differences.std(ddof=1) / np.sqrt(len(differences))
    assert (interval.high[0] - interval.low[0]) / 2 == pytest.approx(half_width, rel=0.1)
    # Pairing matters: an unpaired interval (two independent samples) would be much wider here.
    unpaired = 1.959964 * np.sqrt(before.var() / 3000 + after.var() / 3000)
    assert half_width < 0.75 * unpaired


def test_rows_share_draws_and_the_seed_fixes_the_result():
    rng = np.random.default_rng(4)
    before = rng.random((3, 400)) < 0.6
    after = rng.random((3, 400)) < np.array([[0.6], [0.7], [0.9]])
    batched = paired_bootstrap(before, after, resamples=300, seed=7)
    for row in range(3):
        single = paired_bootstrap(before[row], after[row], resamples=300, seed=7)
        assert single.low[0] == pytest.approx(batched.low[row]) and single.high[0] == pytest.approx(batched.high[row])
    again = paired_bootstrap(before, after, resamples=300, seed=7)
    assert np.array_equal(again.low, batched.low) and np.array_equal(again.high, batched.high)
    assert not np.array_equal(paired_bootstrap(before, after, resamples=300, seed=8).low, batched.low)


def test_resampling_by_counts_equals_resampling_indices():
    """The count-vector implementation is the textbook resampling of indices, draw for draw."""
    rng = np.random.default_rng(5)
    before, after = rng.random(50) < 0.5, rng.random(50) < 0.6
    interval = paired_bootstrap(before, after, resamples=200, seed=11)
    draws = np.random.default_rng(11).integers(0, 50, size=(200, 50))  # the same stream, drawn in one call
    differences = after.astype(float) - before.astype(float)
    means = differences[draws].mean(axis=1)
    assert interval.low[0] == pytest.approx(np.quantile(means, 0.025))
    assert interval.high[0] == pytest.approx(np.quantile(means, 0.975))


@pytest.mark.parametrize("before, after", [(np.ones(3), np.ones(4)), (np.ones(0), np.ones(0))])
def test_bad_shapes_are_bad_input(before, after):
    with pytest.raises(BadInputError):
        paired_bootstrap(before, after)
