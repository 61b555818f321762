"""TwoNN intrinsic dimension: against scikit-dimension's TwoNN on the same data, and known manifolds."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from mimprobe.errors import BadInputError
from mimprobe.metrics.labelfree import two_nearest_distances, twonn_dimension, twonn_from_distances

skdim = pytest.importorskip("skdim")


def decaying_features(n: int, dim: int, *, seed: int = 0, offset: float = 0.0) -> np.ndarray:
    """Gaussian rows with a power-law covariance spectrum (lambda_i = i^-1), randomly rotated, plus an offset."""
    rng = np.random.default_rng(seed)
    scales = np.arange(1, dim + 1) ** -0.5
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return (rng.standard_normal((n, dim)) * scales) @ rotation + offset


def embed(latent: np.ndarray, dim: int, *, seed: int = 1) -> np.ndarray:
    """Latent coordinates (n, m) mapped isometrically into ``dim`` dimensions by a random orthonormal frame."""
    frame, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, latent.shape[1])))
    return latent @ frame.T


@pytest.mark.parametrize("method", ["linear", "mle"])
def test_equals_scikit_dimension_on_a_decaying_spectrum(method):
    x = decaying_features(1500, 48)  # > 25 dims: skdim's pairwise-distance path
    ours = twonn_dimension(x, method=method)
    reference = skdim.id.TwoNN(method=method).fit(x).dimension_
    assert ours.value == pytest.approx(reference, rel=1e-9)
    assert ours.params["kept"] == int(1500 * 0.9) and ours.params["duplicates"] == 0


def test_duplicates_are_dropped_as_scikit_dimension_does():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((800, 3))
    x = np.vstack([x, x[:25]])  # 25 exact duplicate pairs: 50 points with r1 == 0
    ours = twonn_dimension(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = skdim.id.TwoNN().fit(x).dimension_  # <= 25 dims: skdim's NearestNeighbors path
    assert ours.params["duplicates"] == 50
    assert ours.value == pytest.approx(reference, rel=1e-9)


def test_distances_equal_brute_force_under_a_large_offset():
    x = decaying_features(400, 40, offset=1e4)  # float32 search would lose the ratios without centring
    r1, r2 = two_nearest_distances(x)
    distances = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(distances, np.inf)
    distances.sort(axis=1)
    np.testing.assert_allclose(r1, distances[:, 0], rtol=1e-9)
    np.testing.assert_allclose(r2, distances[:, 1], rtol=1e-9)


@pytest.mark.parametrize("latent_dim", [2, 5])
def test_linear_subspace_gives_its_dimension(latent_dim):
    rng = np.random.default_rng(latent_dim)
    x = embed(rng.uniform(size=(3000, latent_dim)), 60)
    estimate = twonn_dimension(x)
    assert abs(estimate.value - latent_dim) < 4 * estimate.standard_error + 0.1 * latent_dim


def test_nonlinear_manifolds_give_their_dimension():
    rng = np.random.default_rng(7)
    t = rng.uniform(1.5 * np.pi, 4.5 * np.pi, 3000)  # swiss roll: a 2-manifold curled in 3-D
    roll = np.stack([t * np.cos(t), rng.uniform(0, 20, 3000), t * np.sin(t)], axis=1)
    assert twonn_dimension(embed(roll, 50)).value == pytest.approx(2.0, abs=0.25)
    sphere = rng.standard_normal((3000, 5))
    sphere /= np.linalg.norm(sphere, axis=1, keepdims=True)  # S^4: a 4-manifold in R^5
    assert twonn_dimension(embed(sphere, 50)).value == pytest.approx(4.0, abs=0.4)


def test_standard_error_matches_the_spread_of_estimates():
    rng = np.random.default_rng(11)
    dimension, n_points, repeats = 6.0, 400, 300
    estimates = {"mle": [], "linear": []}
    errors = {"mle": [], "linear": []}
    for _ in range(repeats):
        ratios = rng.uniform(size=n_points) ** (-1.0 / dimension)  # Pareto(1, d): the TwoNN law
        for method in estimates:
            result = twonn_from_distances(np.ones(n_points), ratios, method=method)
            estimates[method].append(result.value)
            errors[method].append(result.standard_error)
    spread = np.std(estimates["mle"])
    assert np.mean(errors["mle"]) == pytest.approx(spread, rel=0.15)
    assert np.mean(estimates["mle"]) == pytest.approx(dimension, rel=0.03)
    assert 1 / 1.5 < np.mean(errors["linear"]) / np.std(estimates["linear"]) < 1.5


def test_bad_inputs_raise():
    x = np.random.default_rng(0).standard_normal((50, 4))
    with pytest.raises(BadInputError, match="method"):
        twonn_dimension(x, method="gride")
    with pytest.raises(BadInputError, match="discard_fraction"):
        twonn_dimension(x, discard_fraction=1.0)
    with pytest.raises(BadInputError, match="NaN"):
        twonn_dimension(np.where(np.eye(50, 4) > 0, np.nan, x))
    with pytest.raises(BadInputError, match="at least 3 ratios"):
        twonn_dimension(np.vstack([x[:2], x[:2], x[:2]]))
