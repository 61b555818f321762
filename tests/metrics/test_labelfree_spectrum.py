"""alpha-ReQ and NESum: closed forms on synthetic spectra, a weighted-polyfit reference on sampled features."""

from __future__ import annotations

import numpy as np
import pytest

from mimprobe.errors import BadInputError
from mimprobe.metrics.labelfree import (alpha_req, alpha_req_from_spectrum, covariance_eigenvalues, nesum,
                                        nesum_from_spectrum)


def power_law_features(n: int, dim: int, alpha: float, *, seed: int = 0, offset: float = 0.0) -> np.ndarray:
    """Gaussian rows whose covariance has eigenvalues i^-alpha, in a random basis, plus a common offset."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    scales = np.arange(1, dim + 1) ** (-alpha / 2)
    return (rng.standard_normal((n, dim)) * scales) @ rotation + offset


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_power_law_spectrum_gives_its_exponent(alpha):
    spectrum = np.arange(1, 193, dtype=np.float64) ** -alpha * 3.7  # the scale does not matter
    result = alpha_req_from_spectrum(spectrum)
    assert result.value == pytest.approx(alpha, abs=1e-9)
    assert result.params == {"first_rank": 11, "last_rank": 100, "fit_r2": pytest.approx(1.0)}


def test_sampled_features_match_a_weighted_polyfit_and_the_true_exponent():
    x = power_law_features(20_000, 192, 1.0, offset=5.0)
    eigenvalues = covariance_eigenvalues(x)
    result = alpha_req(x)
    ranks = np.arange(11, 101)
    # independent reference: numpy's weighted polyfit (w multiplies the residual, so w^2 = 1/rank)
    slope, _ = np.polyfit(np.log(ranks), np.log(eigenvalues[10:100]), 1, w=np.sqrt(1.0 / ranks))
    assert result.value == pytest.approx(-slope, rel=1e-9)
    assert result.value == pytest.approx(1.0, abs=0.1)  # sampling noise flattens the tail only slightly at n/d=100


def test_fit_range_is_cut_to_the_non_zero_spectrum():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((60, 192)) * np.arange(1, 193) ** -0.5  # 60 rows: 59 non-zero eigenvalues
    result = alpha_req(x)
    assert result.params["last_rank"] == 59
    with pytest.raises(BadInputError, match="non-zero eigenvalues"):
        alpha_req(x[:12])


def test_covariance_eigenvalues_equal_numpy_cov_both_ways():
    rng = np.random.default_rng(2)
    for n, dim in [(300, 40), (25, 40)]:
        x = rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim)) + 3.0
        expected = np.sort(np.clip(np.linalg.eigvalsh(np.cov(x.T)), 0, None))[::-1][:min(n, dim)]
        np.testing.assert_allclose(covariance_eigenvalues(x), expected, rtol=1e-8, atol=1e-10)


def test_nesum_closed_forms():
    dim = 192
    harmonic = np.sum(1.0 / np.arange(1, dim + 1))
    assert nesum_from_spectrum(1.0 / np.arange(1, dim + 1)).value == pytest.approx(harmonic)
    assert nesum_from_spectrum(np.full(dim, 0.3)).value == pytest.approx(dim)
    assert nesum_from_spectrum(np.r_[2.0, np.zeros(dim - 1)]).value == pytest.approx(1.0)
    assert nesum_from_spectrum(np.zeros(dim)).value == 0.0


def test_nesum_of_features_equals_the_covariance_formula_on_a_decaying_spectrum():
    x = power_law_features(5000, 96, 1.0, seed=4, offset=-2.0)
    eigenvalues = np.linalg.eigvalsh(np.cov(x.T))
    assert nesum(x).value == pytest.approx(eigenvalues.sum() / eigenvalues.max(), rel=1e-9)
    assert nesum(x).value == pytest.approx(np.sum(1.0 / np.arange(1, 97)), rel=0.1)


def test_bad_fit_range_raises():
    with pytest.raises(BadInputError, match="fit ranks"):
        alpha_req_from_spectrum(np.ones(50), fit_ranks=(10, 5))
