"""Dataset matrix entropy: the Layer-by-Layer formula done naively on the (n, n) Gram matrix, and closed forms."""

from __future__ import annotations

import numpy as np
import pytest

from mimprobe.errors import BadInputError
from mimprobe.metrics.labelfree import dataset_entropy


def naive_gram_entropy(features: np.ndarray, order: float, *, center: bool = False) -> float:
    """Skean et al.'s S_alpha on the (n, n) Gram of the normalised rows, as repitl's matrixAlphaEntropy does it:
    K / tr(K), eigh, keep eigenvalues > 0, then log(sum p^alpha) / (1 - alpha) (the Shannon limit at alpha = 1).
    The only addition: eigenvalues under numpy's matrix_rank tolerance are the exact zeros of the rank-deficient K
    (n > d), returned by eigh as +-1e-16 noise, and are dropped too."""
    z = features - features.mean(axis=0) if center else features
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    gram = z @ z.T
    eigenvalues = np.linalg.eigh(gram / np.trace(gram))[0]
    p = eigenvalues[eigenvalues > eigenvalues.max() * len(eigenvalues) * np.finfo(np.float64).eps]
    p = p / p.sum()
    if order == 1:
        return float(-np.sum(p * np.log(p)))
    return float(np.log(np.sum(np.exp(order * np.log(p)))) / (1 - order))


def decaying_features(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return (rng.standard_normal((n, dim)) * np.arange(1, dim + 1) ** -0.6) @ rotation + 0.3


@pytest.mark.parametrize("order", [1.0, 2.0, 0.5, 3.0])
@pytest.mark.parametrize("n, dim", [(400, 64), (50, 64)])
def test_equals_the_naive_gram_formula(order, n, dim):
    x = decaying_features(n, dim, seed=n)
    assert dataset_entropy(x, order=order).value == pytest.approx(naive_gram_entropy(x, order), rel=1e-9, abs=1e-12)


def test_centred_option_equals_the_naive_formula_on_centred_rows():
    x = decaying_features(300, 48, seed=5)
    assert dataset_entropy(x, center=True).value == pytest.approx(naive_gram_entropy(x, 1.0, center=True), rel=1e-9)
    assert dataset_entropy(x, center=True).value > dataset_entropy(x).value  # the offset made one direction dominate


@pytest.mark.parametrize("order", [1.0, 2.0, 0.5])
def test_orthogonal_design_gives_log_n(order):
    rng = np.random.default_rng(0)
    rows, _ = np.linalg.qr(rng.standard_normal((64, 40)))  # 40 orthonormal columns -> 40 orthonormal rows
    design = rows.T * rng.uniform(0.5, 3.0, size=(40, 1))  # row norms do not matter: rows are normalised
    assert dataset_entropy(design, order=order).value == pytest.approx(np.log(40), rel=1e-12)


def test_tight_frame_with_more_rows_than_dims_gives_log_d():
    rng = np.random.default_rng(1)
    bases = [np.linalg.qr(rng.standard_normal((32, 32)))[0] for _ in range(4)]  # 128 rows, Z^T Z = 4 I
    assert dataset_entropy(np.vstack(bases)).value == pytest.approx(np.log(32), rel=1e-10)


def test_one_direction_gives_zero():
    x = np.outer(np.random.default_rng(2).uniform(1, 2, 100), np.arange(1.0, 9.0))
    assert dataset_entropy(x).value == pytest.approx(0.0, abs=1e-9)


def test_bad_order_raises():
    with pytest.raises(BadInputError, match="order"):
        dataset_entropy(np.eye(4), order=0.0)
