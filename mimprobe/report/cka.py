"""Linear centred kernel alignment (CKA) between the blocks of two models, on the same images.

Kornblith, Norouzi, Lee and Hinton, "Similarity of Neural Network Representations Revisited" (ICML 2019,
arXiv 1905.00414), eq. (5): for features X (n, d1) and Y (n, d2) of the same n examples with centred columns,

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)
              = <K, L>_F / (||K||_F ||L||_F),    K = X X^T, L = Y Y^T (centred Gram matrices, HSIC form).

It is 1 for identical representations and invariant to orthogonal transforms and isotropic scaling of either side,
not to arbitrary invertible linear maps, which makes it a similarity of representations rather than of spans.

`cka_matrix` computes every (block of X, block of Y) pair at once in the Gram form, streaming row minibatches of
the Gram matrices: for rows ``r`` it forms ``K_i[r, :] = X_i[r] X_i^T`` for every block and accumulates
``<K_i[r], L_j[r]>`` and ``||K_i[r]||^2``. This is the exact full-batch value (not the unbiased minibatch
estimator of Nguyen et al. 2021, arXiv 2010.15327): memory is ``(blocks_x + blocks_y) * batch_size * n`` Gram
entries plus the features, and the work is ``(blocks_x + blocks_y) * n^2 * d`` multiply-adds, cheaper than the
feature form's ``blocks_x * blocks_y * n * d^2`` for every pair once ``n`` is a subset of a few thousand rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import BadInputError
from ..features.store import FeatureStore

from .config import DEFAULT_BATCH_SIZE, DEFAULT_ROWS  # noqa: E402,F401  (the compare options' defaults)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Full-batch linear CKA of (n, d1) and (n, d2) features in float64, eq. (5) of arXiv 1905.00414.

    The reference for `cka_matrix`; fine for n and d in the thousands.

    Raises:
        BadInputError: Not two 2-D arrays with the same number of rows (at least 2).
    """
    x, y = _check_pair(x, y)
    x = x.astype(np.float64) - x.mean(axis=0, dtype=np.float64)
    y = y.astype(np.float64) - y.mean(axis=0, dtype=np.float64)
    cross = np.linalg.norm(y.T @ x) ** 2
    scale = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(cross / scale) if scale > 0 else float("nan")


def cka_matrix(blocks_x: Sequence[np.ndarray], blocks_y: Sequence[np.ndarray], *,
               batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """Linear CKA of every pair of blocks, (len(blocks_x), len(blocks_y)) float64, in Gram row minibatches.

    Args:
        blocks_x: (n, d_i) features of each block of the first model (any float dtype; centred here in float64,
            multiplied in float32, accumulated in float64).
        blocks_y: (n, d_j) features of each block of the second model, rows matching ``blocks_x``'s.
        batch_size: Gram rows per minibatch.

    Returns:
        ``cka[i, j] = CKA(blocks_x[i], blocks_y[j])``; NaN where a block is constant (zero norm).
    """
    if not len(blocks_x) or not len(blocks_y):
        raise BadInputError("CKA needs at least one block on each side")
    n = int(np.shape(blocks_x[0])[0])
    for block in (*blocks_x, *blocks_y):
        _check_pair(blocks_x[0], block)
    if int(batch_size) < 1:
        raise BadInputError(f"batch_size must be positive, got {batch_size}")
    centred_x = [_centred(block) for block in blocks_x]
    centred_y = [_centred(block) for block in blocks_y]
    cross = np.zeros((len(blocks_x), len(blocks_y)))
    norm_x, norm_y = np.zeros(len(blocks_x)), np.zeros(len(blocks_y))
    for start in range(0, n, int(batch_size)):
        stop = min(start + int(batch_size), n)
        gram_x = np.stack([f[start:stop] @ f.T for f in centred_x]).reshape(len(blocks_x), -1)  # (Lx, b * n)
        gram_y = np.stack([f[start:stop] @ f.T for f in centred_y]).reshape(len(blocks_y), -1)
        gram_x, gram_y = gram_x.astype(np.float64), gram_y.astype(np.float64)
        cross += gram_x @ gram_y.T
        norm_x += np.einsum("ij,ij->i", gram_x, gram_x)
        norm_y += np.einsum("ij,ij->i", gram_y, gram_y)
    with np.errstate(invalid="ignore", divide="ignore"):
        return cross / np.sqrt(norm_x[:, None] * norm_y[None, :])


def subset_rows(n_rows: int, size: int, *, seed: int = 0) -> np.ndarray:
    """Sorted, seeded sample of ``min(size, n_rows)`` distinct row indices (all rows when there are fewer)."""
    if size >= n_rows:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(seed).choice(n_rows, size=size, replace=False))


@dataclass(frozen=True)
class StoreCka:
    """CKA between two FeatureStores: ``values[i, j]`` compares ``blocks_x[i]`` with ``blocks_y[j]``."""

    values: np.ndarray
    blocks_x: tuple[int, ...]
    blocks_y: tuple[int, ...]
    split: str
    pooling: str
    rows: np.ndarray      # the store rows used (seeded subset of the split)
    seed: int


def store_cka(store_x: FeatureStore, store_y: FeatureStore, *, split: str, pooling: str = "cls",
              rows: int = DEFAULT_ROWS, seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE) -> StoreCka:
    """Block-by-block linear CKA of two stores of the same images, on a seeded subset of one split.

    Raises:
        BadInputError: The stores hold different images (dataset fingerprint or row count) or lack the split
            or pooling.
    """
    fingerprints = [store.manifest["dataset"].get("fingerprint") for store in (store_x, store_y)]
    if fingerprints[0] != fingerprints[1]:
        raise BadInputError(f"stores {store_x.path} and {store_y.path} hold different images (dataset "
                            "fingerprints differ): CKA needs the same images on both sides")
    counts = [store.num_rows(split) for store in (store_x, store_y)]
    if len(store_x.labels(split)) != len(store_y.labels(split)) or counts[0] != counts[1]:
        raise BadInputError(f"stores {store_x.path} and {store_y.path} have different rows in split {split}")
    chosen = subset_rows(len(store_x.labels(split)), rows, seed=seed)
    blocks_x = [np.asarray(store_x.features(split, block, pooling)[chosen]) for block in store_x.blocks]
    blocks_y = [np.asarray(store_y.features(split, block, pooling)[chosen]) for block in store_y.blocks]
    values = cka_matrix(blocks_x, blocks_y, batch_size=batch_size)
    return StoreCka(values=values, blocks_x=tuple(store_x.blocks), blocks_y=tuple(store_y.blocks), split=split,
                    pooling=pooling, rows=chosen, seed=seed)


def _centred(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features)
    return (features - features.mean(axis=0, dtype=np.float64)).astype(np.float32)


def _check_pair(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise BadInputError(f"CKA needs (n, d) features of the same n >= 2 rows, got shapes {x.shape} and {y.shape}")
    return x, y
