"""Cluster learnability (CLID's CL): scikit-learn KMeans + KNeighborsClassifier and brute force on the same labels."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import normalize

from mimprobe.errors import BadInputError
from mimprobe.metrics.cluster import kmeans_assign
from mimprobe.metrics.labelfree import cluster_learnability, default_cluster_count, learnability_split


def blobs(n_per: int, n_clusters: int, dim: int, spread: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim))
    return np.vstack([c + spread * rng.standard_normal((n_per, dim)) for c in centres])


def test_clear_clusters_agree_with_scikit_learn():
    x = blobs(60, 10, 16, 0.05)
    # FAISS seeds k-means with random rows (no k-means++), so clear blobs still need restarts to be found
    ours = cluster_learnability(x, n_clusters=10, restarts=10, seed=0)
    assert ours.value == 1.0 and ours.params["k"] == 10
    pseudo = kmeans_assign(x, 10, restarts=10, seed=0)
    reference = KMeans(n_clusters=10, n_init=10, random_state=0).fit_predict(normalize(x))
    assert adjusted_rand_score(reference, pseudo) == pytest.approx(1.0)
    fit_rows, eval_rows = learnability_split(reference, seed=0)
    knn = KNeighborsClassifier(n_neighbors=1, metric="cosine").fit(x[fit_rows], reference[fit_rows])
    assert np.mean(knn.predict(x[eval_rows]) == reference[eval_rows]) == ours.value


@pytest.mark.parametrize("k_neighbors", [1, 5])
def test_overlapping_clusters_equal_scikit_learn_and_brute_force_on_the_same_pseudo_labels(k_neighbors):
    x = blobs(80, 6, 24, 0.9, seed=3)  # overlapping: CL well below 1, so the comparison is not trivial
    result = cluster_learnability(x, n_clusters=12, k_neighbors=k_neighbors, restarts=1, seed=4)
    pseudo = kmeans_assign(x, 12, restarts=1, seed=4)
    fit_rows, eval_rows = learnability_split(pseudo, seed=4)
    knn = KNeighborsClassifier(n_neighbors=k_neighbors, metric="cosine").fit(x[fit_rows], pseudo[fit_rows])
    assert result.value == pytest.approx(np.mean(knn.predict(x[eval_rows]) == pseudo[eval_rows]))
    if k_neighbors == 1:
        z = normalize(x)
        nearest = fit_rows[np.argmax(z[eval_rows] @ z[fit_rows].T, axis=1)]
        assert result.value == pytest.approx(np.mean(pseudo[nearest] == pseudo[eval_rows]))
    assert 0.3 < result.value < 0.98
    assert result.standard_error == pytest.approx(np.sqrt(result.value * (1 - result.value) / len(eval_rows)))


def test_structured_features_are_more_learnable_than_noise():
    rng = np.random.default_rng(5)
    assert cluster_learnability(blobs(50, 8, 32, 0.4)).value > cluster_learnability(
        rng.standard_normal((400, 32))).value + 0.2


def test_split_is_seeded_stratified_and_half():
    labels = np.repeat(np.arange(5), 20)
    fit_rows, eval_rows = learnability_split(labels, seed=1)
    assert len(fit_rows) == len(eval_rows) == 50 and not set(fit_rows) & set(eval_rows)
    assert np.all(np.bincount(labels[eval_rows]) == 10)
    assert np.array_equal(eval_rows, learnability_split(labels, seed=1)[1])
    assert default_cluster_count(5000) == 70 and default_cluster_count(3) == 2


def test_bad_inputs_raise():
    with pytest.raises(BadInputError, match="at least 4 rows"):
        cluster_learnability(np.ones((3, 2)))
    with pytest.raises(BadInputError, match="k_neighbors"):
        cluster_learnability(blobs(10, 2, 4, 0.1), n_clusters=2, k_neighbors=50)
