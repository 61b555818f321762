"""Clustering quality of a block's features: spherical k-means (FAISS) with k = number of classes.

Features are L2-normalised, clustered by ``faiss.Kmeans(spherical=True)`` (the best of ``restarts`` seeded runs by
k-means objective), and the assignment is scored against the labels:

- ``cluster_acc``: accuracy under the best one-to-one cluster-to-class matching (Hungarian algorithm,
  ``scipy.optimize.linear_sum_assignment`` on the contingency table), as in unsupervised clustering papers;
- ``cluster_nmi``, ``cluster_ami``, ``cluster_ari``: scikit-learn's normalised / adjusted mutual information and
  adjusted Rand index;
- ``cluster_silhouette``: scikit-learn's silhouette with the cosine metric on a seeded sample of rows;
- ``cluster_davies_bouldin``: scikit-learn's Davies-Bouldin index (Euclidean, on the normalised features;
  lower is better).
"""

from __future__ import annotations

import faiss
import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn import metrics as skm
from sklearn.preprocessing import normalize

from ..errors import BadInputError
from ._rows import MetricRow, finite_float32

KMEANS_NITER = 30           # Lloyd iterations per restart (faiss' default is 25)
SILHOUETTE_SAMPLE = 5_000   # silhouette is O(n^2): score a seeded sample of rows


def cluster_accuracy(labels: np.ndarray, assignments: np.ndarray) -> float:
    """Clustering accuracy: the fraction of rows whose cluster maps to their class under the best one-to-one map.

    The map maximises the matched rows (Hungarian algorithm on the (classes, clusters) contingency table); with
    more clusters than classes the extra clusters count as wrong, and vice versa.

    Args:
        labels: (n,) integer class labels.
        assignments: (n,) integer cluster ids (any values; only the partition matters).
    """
    labels, assignments = np.asarray(labels), np.asarray(assignments)
    if labels.shape != assignments.shape or labels.ndim != 1 or labels.size == 0:
        raise BadInputError(f"labels and assignments must be non-empty 1-D arrays of one length, "
                            f"got shapes {labels.shape} and {assignments.shape}")
    contingency = skm.cluster.contingency_matrix(labels, assignments)  # (classes, clusters)
    rows, cols = linear_sum_assignment(contingency, maximize=True)
    return float(contingency[rows, cols].sum() / labels.size)


def kmeans_assign(features: np.ndarray, n_clusters: int, *, restarts: int = 3, seed: int = 0,
                  niter: int = KMEANS_NITER, max_points_per_centroid: int | None = None,
                  name: str = "features") -> np.ndarray:
    """Cluster ids (n,) int64 from spherical k-means on the L2-normalised features.

    Args:
        features: (n, dim) array or memory map (float16 is converted to float32).
        n_clusters: k.
        restarts: faiss ``nredo``: independent seeded runs, the best by objective is kept.
        seed: faiss' seed; the same seed gives the same assignment.
        niter: Lloyd iterations per run.
        max_points_per_centroid: faiss trains on a random subset of ``k * max_points_per_centroid`` rows when there
            are more; None trains on every row.
        name: What the features are ("block 5 cls"), for error messages.
    """
    x = normalize(finite_float32(features, name=name))
    return _kmeans_normalised(x, n_clusters, restarts=restarts, seed=seed, niter=niter,
                              max_points_per_centroid=max_points_per_centroid, name=name)


def evaluate_clustering(features: np.ndarray, labels: np.ndarray, *, n_clusters: int | None = None,
                        restarts: int = 3, seed: int = 0, niter: int = KMEANS_NITER,
                        silhouette_sample: int | None = SILHOUETTE_SAMPLE,
                        max_points_per_centroid: int | None = None, split: str = "test",
                        name: str = "features") -> list[MetricRow]:
    """All clustering rows of one block's features on one split.

    Args:
        features: (n, dim) array or memory map.
        labels: (n,) class labels, all >= 0.
        n_clusters: k; None uses the number of distinct labels.
        restarts, seed, niter, max_points_per_centroid: As in `kmeans_assign`.
        silhouette_sample: Rows in the silhouette's seeded sample (seed ``seed``); None or >= n uses every row.
        split: The split the features come from, written in the rows.
        name: What the features are ("block 5 cls"), for error messages.

    Returns:
        Rows ``cluster_acc``, ``cluster_nmi``, ``cluster_ami``, ``cluster_ari``, ``cluster_silhouette``,
        ``cluster_davies_bouldin`` with params ``{"k", "restarts"}`` and ``seed``. The last two are left out when
        k-means put every row in one cluster (both are undefined then).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise BadInputError(f"{name}: {features.shape[0]} feature rows but labels of shape {labels.shape}")
    if labels.size and labels.min() < 0:
        raise BadInputError(f"{name}: clustering scores need class labels, but {split} has unlabelled rows (-1)")
    k = int(n_clusters) if n_clusters is not None else int(np.unique(labels).size)
    x = normalize(finite_float32(features, name=name))
    assignments = _kmeans_normalised(x, k, restarts=restarts, seed=seed, niter=niter,
                                     max_points_per_centroid=max_points_per_centroid, name=name)

    params = {"k": k, "restarts": int(restarts)}
    scores = {
        "cluster_acc": cluster_accuracy(labels, assignments),
        "cluster_nmi": skm.normalized_mutual_info_score(labels, assignments),
        "cluster_ami": skm.adjusted_mutual_info_score(labels, assignments),
        "cluster_ari": skm.adjusted_rand_score(labels, assignments),
    }
    if np.unique(assignments).size >= 2:
        sample = silhouette_sample if silhouette_sample is not None and silhouette_sample < len(x) else None
        scores["cluster_silhouette"] = skm.silhouette_score(x, assignments, metric="cosine",
                                                            sample_size=sample, random_state=seed)
        scores["cluster_davies_bouldin"] = skm.davies_bouldin_score(x, assignments)
    return [MetricRow(split=split, metric=metric, value=float(value), params=dict(params), seed=seed)
            for metric, value in scores.items()]


def _kmeans_normalised(x: np.ndarray, n_clusters: int, *, restarts: int, seed: int, niter: int,
                       max_points_per_centroid: int | None, name: str) -> np.ndarray:
    n_samples, dim = x.shape
    if n_clusters < 2 or n_clusters > n_samples:
        raise BadInputError(f"{name}: k-means needs 2 <= k <= {n_samples} rows, got k={n_clusters}")
    if restarts < 1 or niter < 1:
        raise BadInputError(f"{name}: k-means needs restarts >= 1 and niter >= 1 (got {restarts}, {niter})")
    if max_points_per_centroid is None:
        max_points_per_centroid = -(-n_samples // n_clusters)  # ceil: faiss then trains on every row
    kmeans = faiss.Kmeans(dim, n_clusters, niter=niter, nredo=restarts, seed=seed, spherical=True, verbose=False,
                          max_points_per_centroid=max_points_per_centroid,
                          min_points_per_centroid=1)  # small data is clustered as it is, without FAISS's warning
    kmeans.train(x)
    _, assignments = kmeans.index.search(x, 1)  # spherical: an inner-product index over unit centroids
    return assignments[:, 0].astype(np.int64)
