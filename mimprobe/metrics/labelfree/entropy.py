"""Dataset matrix entropy of a block's features (Skean et al., "Layer by Layer", arXiv 2502.02013, ICML 2025).

The matrix-based Renyi entropy of order alpha (Giraldo, Rao & Principe 2015) of the Gram matrix ``K = Z Z^T`` of the
n samples' L2-normalised features Z (n, d)::

    S_alpha(Z) = 1 / (1 - alpha) * log( sum_i (lambda_i(K) / tr(K))^alpha ),    S_1 = -sum_i p_i log p_i

with ``p_i = lambda_i(K) / tr(K)`` (natural log; alpha = 1 is the limit, von Neumann / Shannon, the paper's default).
It ranges from 0 (all rows on one line) to log(min(n, d)) (an orthogonal design: K = I gives log n).

Computed on the (d, d) matrix ``Z^T Z`` when n > d: it has the same non-zero eigenvalues as K, so the cost is
O(n d^2) instead of O(n^2 d) and the memory d^2. Eigenvalues <= 0 are left out, as the authors'
``repitl.matrix_itl.generalizedInformationPotential`` does (github.com/uk-cliplab/representation-itl, used by
github.com/OFSkean/information_flow, ``experiments/utils/metrics/metric_functions.py::compute_entropy``), and so
are the rounding-noise ones below numpy's rank tolerance (exact zeros of a rank-deficient K; they would bias
alpha < 1).

Two differences from that code, on purpose: (1) it clamps the *entries* of the Gram/covariance at 0
(``torch.clamp(cov, min=0)``) before the eigendecomposition, which is in neither the paper's formula nor
equivalent between the (n, n) and (d, d) forms, so it is not done here; (2) its ``normalize`` also centres the rows
on their mean before the L2 normalisation; here centring is an option (``center``, off by default: the paper's
formula is on the normalised rows).
"""

from __future__ import annotations

import numpy as np

from ...errors import BadInputError
from .subset import LabelFreeEstimate, float64_rows

DEFAULT_ENTROPY_ORDER = 1.0   # alpha = 1: the von Neumann (Shannon) limit, Skean et al.'s default


def normalised_rows(features: np.ndarray, *, center: bool = False, name: str = "features") -> np.ndarray:
    """(n, d) float64 rows divided by their L2 norm (after subtracting the column mean when ``center``).

    Zero rows stay zero (they add nothing to the Gram matrix).
    """
    x = float64_rows(features, name=name)
    if center:
        x = x - x.mean(axis=0)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def renyi_entropy_from_eigenvalues(eigenvalues: np.ndarray, *, order: float = DEFAULT_ENTROPY_ORDER) -> float:
    """Matrix-based Renyi entropy of a PSD matrix from its eigenvalues (any order, any scale).

    Eigenvalues at or below ``largest * len * float64 eps`` (numpy's ``matrix_rank`` tolerance) are the exact zeros
    of a rank-deficient matrix returned as rounding noise; they are dropped, since for alpha < 1 their ``p^alpha``
    would add up to a visible error.
    """
    if order <= 0:
        raise BadInputError(f"the entropy order alpha must be > 0, got {order}")
    values = np.asarray(eigenvalues, dtype=np.float64)
    if values.size == 0 or values.max() <= 0:
        return 0.0
    positive = values[values > values.max() * values.size * np.finfo(np.float64).eps]
    p = positive / positive.sum()
    if order == 1.0:
        return float(-np.sum(p * np.log(p)))
    return float(np.log(np.sum(p ** order)) / (1.0 - order))


def dataset_entropy(features: np.ndarray, *, order: float = DEFAULT_ENTROPY_ORDER, center: bool = False,
                    name: str = "features") -> LabelFreeEstimate:
    """Dataset matrix entropy of a (n, d) block's features (see the module docstring).

    Args:
        features: (n, d) array (a seeded subset: the value depends on n, so compare blocks at one subset).
        order: The Renyi order alpha (> 0); 1 is the von Neumann limit.
        center: Subtract the column mean before normalising (the authors' ``normalize``).
        name: What the features are, for error messages.

    Returns:
        value in [0, log min(n, d)]; params ``{"order", "center"}``; no standard error.
    """
    z = normalised_rows(features, center=center, name=name)
    small = z.T @ z if z.shape[0] > z.shape[1] else z @ z.T  # (d, d) or (n, n): one non-zero spectrum
    value = renyi_entropy_from_eigenvalues(np.linalg.eigvalsh(small), order=order)
    return LabelFreeEstimate(value=value, params={"order": float(order), "center": bool(center)})
