"""Neighbourhood overlap between consecutive blocks (Doimo, Glielmo, Ansuini & Laio, NeurIPS 2020, arXiv 2007.03506).

"Hierarchical nucleation in deep neural networks" compares two layers l and m through the k nearest neighbours
of every sample in each::

    chi^{l,m}_k = 1/n sum_i  |N_k^l(i) & N_k^m(i)| / k

the mean fraction of a sample's k neighbours that are the same in both representations (1: the neighbourhoods did
not change; about k/n: unrelated). k = 30 is the default of the authors' DADApy (``return_data_overlap``); a
sample is never its own neighbour. mimprobe measures it between block b and block b + 1 on the same rows, with the
exact cosine search of the k-NN metric (`mimprobe.metrics.knn.knn_neighbors`, FAISS inner product on L2-normalised
rows, leave-one-out), so each block's neighbour lists are searched once and shared by its two pairs. (Doimo et al.
use Euclidean distances on the activations; cosine is what every other neighbour metric of mimprobe uses.)
"""

from __future__ import annotations

import numpy as np

from ...errors import BadInputError
from ..knn import knn_neighbors
from .subset import LabelFreeEstimate

DEFAULT_OVERLAP_K = 30   # DADApy's return_data_overlap default (Doimo et al.'s group)
_CHUNK_ROWS = 4096       # rows compared at a time: a (rows, k, k) bool array


def block_neighbours(features: np.ndarray, *, k: int = DEFAULT_OVERLAP_K, threads: int | None = None,
                     name: str = "features") -> np.ndarray:
    """(n, k) int64 indices of every row's k most cosine-similar other rows (exact FAISS search, leave-one-out).

    Raises:
        BadInputError: k < 1 or k >= n (from `knn_neighbors`), bad shape or NaN/Inf.
    """
    if k < 1:
        raise BadInputError(f"{name}: the neighbourhood overlap needs k >= 1, got {k}")
    _, indices = knn_neighbors(features, features, k, exclude_self=True, threads=threads, name=name)
    return indices


def overlap_of_neighbours(neighbours_a: np.ndarray, neighbours_b: np.ndarray) -> LabelFreeEstimate:
    """Mean fraction of shared neighbours, ``1/n sum_i |A_i & B_i| / k``, of two (n, k) neighbour index arrays.

    Each row's indices are assumed distinct (a neighbour list). Returns the value and, as its standard error, the
    standard deviation of the per-row fractions over sqrt(n) (rows share neighbours, so it is a lower bound);
    params ``{"k"}``.
    """
    a, b = np.asarray(neighbours_a), np.asarray(neighbours_b)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] < 2 or a.shape[1] < 1:
        raise BadInputError(f"neighbour lists must be two (n >= 2, k) arrays of one shape, got {a.shape} and {b.shape}")
    n_rows, k = a.shape
    shared = np.empty(n_rows)
    for start in range(0, n_rows, _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, n_rows)
        same = a[start:stop, :, None] == b[start:stop, None, :]  # (rows, k, k)
        shared[start:stop] = same.any(axis=2).sum(axis=1) / k
    return LabelFreeEstimate(value=float(shared.mean()), standard_error=float(shared.std(ddof=1) / np.sqrt(n_rows)),
                             params={"k": int(k)})


def neighbourhood_overlap(features_a: np.ndarray, features_b: np.ndarray, *, k: int = DEFAULT_OVERLAP_K,
                          threads: int | None = None, name: str = "features") -> LabelFreeEstimate:
    """Neighbourhood overlap of the same n rows in two blocks, (n, d_a) and (n, d_b) (see the module docstring)."""
    if np.shape(features_a)[0] != np.shape(features_b)[0]:
        raise BadInputError(f"{name}: the overlap compares the same rows in two blocks, got "
                            f"{np.shape(features_a)[0]} and {np.shape(features_b)[0]} rows")
    return overlap_of_neighbours(block_neighbours(features_a, k=k, threads=threads, name=name),
                                 block_neighbours(features_b, k=k, threads=threads, name=name))
