"""Cluster learnability of a block's features, the CL of CLID (Lu et al., 2022, arXiv 2206.01251).

"Using representation expressiveness and learnability to evaluate self-supervised learning methods" measures how
learnable a representation's own structure is: k-means pseudo-labels are predicted by a k-NN classifier, and its
accuracy is the cluster learnability (CL; CLID adds the TwoNN intrinsic dimension, `intrinsic_dim`).

Protocol here (the paper's text was not available offline; these are the choices of the public CLID
reimplementations we could read, which state them as the paper's Section 3.2):

- pseudo-labels: spherical k-means on the L2-normalised rows (FAISS, exactly as the clustering metric does it:
  `mimprobe.metrics.cluster.kmeans_assign`) with ``n_clusters`` clusters, by default ``floor(sqrt(n))``;
- a seeded 50/50 split of the rows, stratified by pseudo-label where every cluster has two members (not
  leave-one-out: the rows that fit the classifier are never scored);
- a k-NN classifier with ``k_neighbors`` = 1 by default, cosine similarity (the exact FAISS search of the k-NN
  metric, `mimprobe.metrics.knn.knn_neighbors`), one vote per neighbour, ties to the lower pseudo-label (as
  scikit-learn's ``KNeighborsClassifier``), fitted on one half and scored on the other.

The value is the fraction of the scored half whose pseudo-label is predicted; its standard error is the binomial
one of that fraction.
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split

from ...errors import BadInputError
from ..cluster import KMEANS_NITER, kmeans_assign
from ..intervals import binomial_se
from ..knn import class_votes, knn_neighbors, rank_classes
from .subset import LabelFreeEstimate

DEFAULT_CL_NEIGHBORS = 1     # 1-NN, the CLID reimplementations' choice
CL_EVAL_FRACTION = 0.5       # half the rows fit the classifier, the other half is scored


def default_cluster_count(n_samples: int) -> int:
    """floor(sqrt(n)), at least 2: the default number of k-means pseudo-classes."""
    return max(2, int(np.sqrt(n_samples)))


def learnability_split(pseudo_labels: np.ndarray, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (fit_rows, eval_rows): a seeded 50/50 split, stratified by pseudo-label when every cluster has 2 rows."""
    labels = np.asarray(pseudo_labels, dtype=np.int64)
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    fit_rows, eval_rows = train_test_split(np.arange(len(labels)), test_size=CL_EVAL_FRACTION, stratify=stratify,
                                           random_state=seed)
    return np.sort(fit_rows), np.sort(eval_rows)


def knn_accuracy_on_pseudo_labels(features: np.ndarray, pseudo_labels: np.ndarray, *, fit_rows: np.ndarray,
                                  eval_rows: np.ndarray, k_neighbors: int = DEFAULT_CL_NEIGHBORS,
                                  threads: int | None = None, name: str = "features") -> float:
    """Accuracy of a cosine k-NN classifier (uniform votes) fitted on ``fit_rows`` at predicting ``eval_rows``."""
    labels = np.asarray(pseudo_labels, dtype=np.int64)
    _, neighbours = knn_neighbors(features[fit_rows], features[eval_rows], k_neighbors, threads=threads, name=name)
    neighbour_labels = labels[fit_rows][neighbours]  # (n_eval, k)
    votes = class_votes(np.ones(neighbour_labels.shape, np.float32), neighbour_labels, int(labels.max()) + 1,
                        weighting="uniform", temperature=1.0)
    predicted = rank_classes(votes, 1)[:, 0]
    return float(np.mean(predicted == labels[eval_rows]))


def cluster_learnability(features: np.ndarray, *, n_clusters: int | None = None,
                         k_neighbors: int = DEFAULT_CL_NEIGHBORS, restarts: int = 1, niter: int = KMEANS_NITER,
                         seed: int = 0, threads: int | None = None, name: str = "features") -> LabelFreeEstimate:
    """CLID's cluster learnability of a (n, d) block's features (see the module docstring).

    Args:
        features: (n, d) array, n >= 4.
        n_clusters: k-means k; None uses floor(sqrt(n)).
        k_neighbors: Neighbours of the k-NN classifier.
        restarts, niter: FAISS k-means restarts (best objective kept) and Lloyd iterations. One restart by default,
            as scikit-learn's ``KMeans`` (``n_init="auto"``) that the CLID reimplementations call; FAISS seeds with
            random rows rather than k-means++, so raise it where clusters are clear but found badly.
        seed: Seed of k-means and of the split.
        threads: FAISS threads for the neighbour search (None: the library default).
        name: What the features are, for error messages.

    Returns:
        value in [0, 1]; binomial standard error; params ``{"k", "k_neighbors", "restarts", "eval_fraction"}``.
    """
    n_samples = int(np.shape(features)[0])
    if n_samples < 4:
        raise BadInputError(f"{name}: cluster learnability needs at least 4 rows, got {n_samples}")
    k = default_cluster_count(n_samples) if n_clusters is None else int(n_clusters)
    x = np.ascontiguousarray(features, dtype=np.float32)
    pseudo_labels = kmeans_assign(x, k, restarts=restarts, seed=seed, niter=niter, name=name)
    fit_rows, eval_rows = learnability_split(pseudo_labels, seed=seed)
    if k_neighbors < 1 or k_neighbors > len(fit_rows):
        raise BadInputError(f"{name}: cluster learnability needs 1 <= k_neighbors <= {len(fit_rows)} "
                            f"(half the rows), got {k_neighbors}")
    accuracy = knn_accuracy_on_pseudo_labels(x, pseudo_labels, fit_rows=fit_rows, eval_rows=eval_rows,
                                             k_neighbors=k_neighbors, threads=threads, name=name)
    params = {"k": k, "k_neighbors": int(k_neighbors), "restarts": int(restarts),
              "eval_fraction": CL_EVAL_FRACTION}
    return LabelFreeEstimate(value=accuracy, standard_error=binomial_se(accuracy, len(eval_rows)), params=params)
