"""Label-free screening of blocks: the effective rank of their features (RankMe).

RankMe (Garrido et al., 2023, arXiv 2210.02885, Eq. 1-2) is the exponential of the Shannon entropy of the
embedding matrix's normalised singular values::

    RankMe(Z) = exp(-sum_k p_k log p_k),    p_k = sigma_k(Z) / ||sigma(Z)||_1 + eps

with ``Z`` the (n_samples, dim) matrix of embeddings *as they are*: the paper takes the singular values of ``Z``
itself, neither centred nor normalised, so a block whose features share a large common offset scores lower. It
needs no labels, so it can rank blocks of an unlabelled store.
"""

from __future__ import annotations

import numpy as np

from ..errors import BadInputError
from ._rows import MetricRow

RANKME_EPS = 1e-7   # the paper's epsilon (p_k + eps), small enough for float32 embeddings
QR_CHUNK = 4096     # rows converted to float64 at a time, so memory stays bounded by the chunk


def singular_values(features: np.ndarray, *, name: str = "features") -> np.ndarray:
    """Singular values of a (n_samples, dim) matrix, largest first, computed in float64.

    With many more rows than columns the matrix is reduced chunk by chunk to the (dim, dim) triangular factor R of
    its QR decomposition (Z = QR, so Z and R share their singular values), then R goes through an SVD: memory
    stays bounded by the chunk and, unlike the eigenvalues of Z^T Z, the small singular values keep full
    precision (squaring would blur them at 1e-8 of the largest, the scale of RankMe's own eps).

    Raises:
        BadInputError: Not a non-empty 2-D array, or it holds NaN/Inf.
    """
    if features.ndim != 2 or min(features.shape) == 0:
        raise BadInputError(f"{name}: RankMe needs a non-empty 2-D (n_samples, dim) array, got shape {features.shape}")
    n_samples, dim = features.shape
    if n_samples <= dim + QR_CHUNK:
        reduced = _finite_float64(features, name=name)
    else:
        reduced = np.zeros((0, dim), dtype=np.float64)
        for start in range(0, n_samples, QR_CHUNK):
            chunk = _finite_float64(features[start:start + QR_CHUNK], name=name)
            reduced = np.linalg.qr(np.vstack([reduced, chunk]), mode="r")  # (min(rows, dim), dim)
    return np.linalg.svd(reduced, compute_uv=False)


def rankme_from_singular_values(singular: np.ndarray, *, eps: float = RANKME_EPS) -> float:
    """RankMe of a spectrum: exp of the entropy of ``sigma / sum(sigma) + eps`` (arXiv 2210.02885, Eq. 1-2)."""
    total = float(np.sum(singular))
    if total <= 0.0:
        return 0.0  # the zero matrix: no direction at all
    p = singular / total + eps
    return float(np.exp(-np.sum(p * np.log(p))))


def effective_rank(features: np.ndarray, *, max_samples: int | None = None, seed: int = 0,
                   eps: float = RANKME_EPS, name: str = "features") -> float:
    """RankMe effective rank of a block's features (arXiv 2210.02885).

    Args:
        features: (n_samples, dim) array or memory map, any float dtype (float16 stores are read in float64).
            Not centred: RankMe is defined on the embedding matrix itself.
        max_samples: Use a seeded random subset of this many rows to bound the cost (the paper uses 25,600);
            None or a number >= n_samples uses every row. RankMe depends on n when n < dim, so compare blocks
            at the same ``max_samples``.
        seed: Seed of the row subset.
        eps: The paper's epsilon added to every normalised singular value.
        name: What the features are ("block 5 cls"), for error messages.

    Returns:
        A float in [1, min(n_samples, dim)] (up to eps); 0.0 for an all-zero matrix.

    Raises:
        BadInputError: Bad shape, NaN/Inf, or max_samples < 1.
    """
    rows = subsample_rows(features.shape[0], max_samples=max_samples, seed=seed, name=name)
    subset = features if rows is None else features[rows]
    return rankme_from_singular_values(singular_values(subset, name=name), eps=eps)


def subsample_rows(n_samples: int, *, max_samples: int | None, seed: int, name: str = "features") -> np.ndarray | None:
    """Sorted seeded row indices (sorted so a memory map reads forward), or None when every row is used."""
    if max_samples is not None and max_samples < 1:
        raise BadInputError(f"{name}: max_samples must be at least 1 (got {max_samples})")
    if max_samples is None or max_samples >= n_samples:
        return None
    return np.sort(np.random.default_rng(seed).choice(n_samples, size=max_samples, replace=False))


def evaluate_rank(features: np.ndarray, *, split: str, max_samples: int | None = None, seed: int = 0,
                  name: str = "features") -> list[MetricRow]:
    """The ``rankme`` row of one block's features on one split.

    ``params`` records ``max_samples`` only when rows were subsampled; ``seed`` is then the subset's seed,
    otherwise None (the value is deterministic).
    """
    subsampled = max_samples is not None and max_samples < features.shape[0]
    value = effective_rank(features, max_samples=max_samples, seed=seed, name=name)
    params = {"max_samples": int(max_samples)} if subsampled else {}
    return [MetricRow(split=split, metric="rankme", value=value, params=params, seed=seed if subsampled else None)]


def _finite_float64(array: np.ndarray, *, name: str) -> np.ndarray:
    from ._finite import finite_copy

    return finite_copy(array, dtype=np.float64, what=name)
