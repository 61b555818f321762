"""Wilson intervals and the exact McNemar test against closed forms and scipy."""

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from mimprobe.metrics.intervals import binomial_se, mcnemar_pvalue, wilson_interval


def test_wilson_interval_equals_scipy_on_a_grid():
    for n in (1, 7, 200, 5000):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            reference = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
            low, high = wilson_interval(k, n)
            assert float(low) == pytest.approx(reference.low, abs=1e-12)
            assert float(high) == pytest.approx(reference.high, abs=1e-12)


def test_wilson_interval_closed_forms():
    z = 1.959963984540054
    # no success: [0, z^2 / (n + z^2)]
    low, high = wilson_interval(0, 10)
    assert float(low) == 0 and float(high) == pytest.approx(z * z / (10 + z * z), rel=1e-12)
    # half right: symmetric around 1/2 with half-width z / (2 sqrt(n + z^2))
    low, high = wilson_interval(100, 200)
    half = z / (2 * math.sqrt(200 + z * z))
    assert float(low) == pytest.approx(0.5 - half, rel=1e-12) and float(high) == pytest.approx(0.5 + half, rel=1e-12)
    # vectorised over a curve, NaN for n = 0, and the 99 % interval is wider
    low, high = wilson_interval(np.array([0, 5, 3]), np.array([0, 10, 10]))
    assert np.isnan(low[0]) and np.isnan(high[0]) and np.all(low[1:] < high[1:])
    low99, high99 = wilson_interval(5, 10, level=0.99)
    assert low99 < low[1] and high99 > high[1]


def test_binomial_standard_error():
    assert binomial_se(0.8, 5000) == pytest.approx(math.sqrt(0.8 * 0.2 / 5000))
    assert math.isnan(binomial_se(0.5, 0))


def test_mcnemar_counts_only_the_discordant_images():
    a = np.array([True] * 50 + [False] * 6 + [True] * 0)
    b = np.array([True] * 50 + [True] * 6)
    # 0 images favour a, 6 favour b: two-sided exact p = 2 * 0.5^6
    assert mcnemar_pvalue(a, b) == pytest.approx(2 * 0.5 ** 6)
    assert mcnemar_pvalue(b, a) == pytest.approx(2 * 0.5 ** 6)
    assert mcnemar_pvalue(a, a) == 1.0
    # 3 against 5: sum of the binomial tails, symmetric
    a = np.array([1, 1, 1, 0, 0, 0, 0, 0, 1, 0], bool)
    b = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 0], bool)
    tail = sum(math.comb(8, i) for i in range(4)) / 2 ** 8
    assert mcnemar_pvalue(a, b) == pytest.approx(2 * tail)
    with pytest.raises(ValueError):
        mcnemar_pvalue(a, b[:5])
