"""Clustering: Hungarian accuracy against brute force, scores against direct scikit-learn calls, k-means on blobs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.preprocessing import normalize

from mimprobe.errors import BadInputError
from mimprobe.metrics.cluster import cluster_accuracy, evaluate_clustering, kmeans_assign

METRICS = ["cluster_acc", "cluster_nmi", "cluster_ami", "cluster_ari", "cluster_silhouette", "cluster_davies_bouldin"]


def brute_force_accuracy(labels: np.ndarray, assignments: np.ndarray) -> float:
    """Best accuracy over every one-to-one map from clusters to classes."""
    classes, clusters = np.unique(labels), np.unique(assignments)
    best = 0
    if len(clusters) <= len(classes):
        for image in itertools.permutations(classes, len(clusters)):
            mapping = dict(zip(clusters, image))
            best = max(best, sum(mapping[a] == y for a, y in zip(assignments, labels)))
    else:
        for image in itertools.permutations(clusters, len(classes)):
            mapping = dict(zip(image, classes))
            best = max(best, sum(mapping.get(a, -1) == y for a, y in zip(assignments, labels)))
    return best / len(labels)


def blobs(n_per_class: int = 60, n_classes: int = 4, dim: int = 16, noise: float = 0.1, seed: int = 0):
    """Classes around random directions: separated after L2 normalisation, shuffled rows."""
    rng = np.random.default_rng(seed)
    centres = normalize(rng.standard_normal((n_classes, dim)))
    labels = rng.permutation(np.repeat(np.arange(n_classes), n_per_class))
    scale = rng.uniform(0.5, 3.0, size=(len(labels), 1))   # norms vary: only directions carry the class
    features = scale * (centres[labels] + noise * rng.standard_normal((len(labels), dim)))
    return features.astype(np.float32), labels


def test_a_permuted_labelling_has_accuracy_one():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, size=200)
    relabel = rng.permutation(6) + 10   # other ids, other order
    assert cluster_accuracy(labels, relabel[labels]) == 1.0


@pytest.mark.parametrize("n_classes,n_clusters", [(2, 2), (3, 3), (4, 4), (5, 5), (3, 5), (5, 3)])
def test_hungarian_equals_brute_force(n_classes, n_clusters):
    rng = np.random.default_rng(n_classes * 10 + n_clusters)
    for _ in range(5):
        labels = rng.integers(0, n_classes, size=40)
        # correlated with the labels, so the best map is not trivial
        assignments = np.where(rng.random(40) < 0.5, labels % n_clusters, rng.integers(0, n_clusters, size=40))
        assert cluster_accuracy(labels, assignments) == pytest.approx(brute_force_accuracy(labels, assignments))


def test_kmeans_recovers_separated_blobs():
    features, labels = blobs()
    rows = {row.metric: row for row in evaluate_clustering(features, labels, seed=0)}
    assert rows["cluster_acc"].value > 0.95
    assert rows["cluster_nmi"].value > 0.9
    assert rows["cluster_ari"].value > 0.9
    assert rows["cluster_silhouette"].value > 0.5


def test_scores_agree_with_direct_sklearn_calls():
    features, labels = blobs(noise=0.6, seed=1)   # overlapping: scores well inside (0, 1)
    assignments = kmeans_assign(features, 4, restarts=3, seed=0)
    x = normalize(features)
    expected = {
        "cluster_acc": brute_force_accuracy(labels, assignments),
        "cluster_nmi": skm.normalized_mutual_info_score(labels, assignments),
        "cluster_ami": skm.adjusted_mutual_info_score(labels, assignments),
        "cluster_ari": skm.adjusted_rand_score(labels, assignments),
        "cluster_silhouette": skm.silhouette_score(x, assignments, metric="cosine", sample_size=100, random_state=0),
        "cluster_davies_bouldin": skm.davies_bouldin_score(x, assignments),
    }
    rows = evaluate_clustering(features, labels, restarts=3, seed=0, silhouette_sample=100, split="val")
    assert [row.metric for row in rows] == METRICS
    for row in rows:
        assert row.value == pytest.approx(expected[row.metric], rel=1e-5), row.metric
        assert row.split == "val" and row.seed == 0 and row.params == {"k": 4, "restarts": 3}
    assert 0.3 < expected["cluster_acc"] < 0.99


def test_silhouette_uses_every_row_when_the_sample_is_large():
    features, labels = blobs(noise=0.6, seed=2)
    assignments = kmeans_assign(features, 4, seed=0)
    rows = {row.metric: row.value for row in evaluate_clustering(features, labels, silhouette_sample=None)}
    assert rows["cluster_silhouette"] == pytest.approx(
        skm.silhouette_score(normalize(features), assignments, metric="cosine"), rel=1e-5)


def test_the_silhouette_sample_follows_the_seed():
    """With more rows than the silhouette sample, ``seed`` picks the sample: each seed equals scikit-learn's
    ``silhouette_score(sample_size, random_state=seed)`` on that seed's clustering, and two seeds differ."""
    features, labels = blobs(noise=0.6, seed=2)
    values = {}
    for seed in (1, 2):
        assignments = kmeans_assign(features, 4, seed=seed)
        rows = {row.metric: row.value for row in evaluate_clustering(features, labels, seed=seed,
                                                                     silhouette_sample=40)}
        expected = skm.silhouette_score(normalize(features), assignments, metric="cosine", sample_size=40,
                                        random_state=seed)
        assert rows["cluster_silhouette"] == pytest.approx(expected, rel=1e-5)
        values[seed] = rows["cluster_silhouette"]
    assert values[1] != values[2]


def test_seeded_runs_are_identical():
    features, labels = blobs(noise=0.8, seed=3)
    first = evaluate_clustering(features, labels, seed=5)
    assert evaluate_clustering(features, labels, seed=5) == first
    np.testing.assert_array_equal(kmeans_assign(features, 4, seed=5), kmeans_assign(features, 4, seed=5))


def test_float16_memmap_matches_float32(tmp_path):
    features, labels = blobs(noise=0.4, seed=4)
    half = features.astype(np.float16)
    np.save(tmp_path / "x.npy", half)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert evaluate_clustering(mapped, labels) == evaluate_clustering(half.astype(np.float32), labels)


def test_n_clusters_defaults_to_the_number_of_classes():
    features, labels = blobs(n_classes=3)
    assert evaluate_clustering(features, labels)[0].params["k"] == 3
    assert evaluate_clustering(features, labels, n_clusters=6)[0].params["k"] == 6


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_raises_with_the_name(bad):
    features, labels = blobs()
    features[7, 3] = bad
    with pytest.raises(BadInputError, match="block 5 cls"):
        evaluate_clustering(features, labels, name="block 5 cls")


def test_bad_labels_raise():
    features, labels = blobs()
    with pytest.raises(BadInputError, match="unlabelled"):
        evaluate_clustering(features, np.full_like(labels, -1))
    with pytest.raises(BadInputError):
        evaluate_clustering(features, labels[:-1])
    with pytest.raises(BadInputError):
        evaluate_clustering(features[:3], labels[:3], n_clusters=4)
