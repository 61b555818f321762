"""Linear CKA (Kornblith et al. 2019, arXiv 1905.00414): its invariances, and the minibatch Gram computation against
the full-batch feature formula and the HSIC formula with explicit centring matrices."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import ortho_group

from mimprobe.errors import BadInputError
from mimprobe.report import cka_matrix, linear_cka


def _features(seed: int, n: int = 120, d: int = 24) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d) * 3  # correlated, off-centre


def _hsic_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Eq. (3)-(4) of the paper with Gram matrices and H = I - 11^T / n, written independently of the code."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return float(np.trace(k @ l_) / np.sqrt(np.trace(k @ k) * np.trace(l_ @ l_)))


def test_cka_of_a_matrix_with_itself_is_one():
    x = _features(0)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert cka_matrix([x], [x])[0, 0] == pytest.approx(1.0, abs=1e-6)


def test_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    x, y = _features(1), _features(2)
    q = ortho_group.rvs(24, random_state=3)
    reference = linear_cka(x, y)
    assert 0.05 < reference < 0.95
    assert linear_cka(x @ q, y) == pytest.approx(reference, abs=1e-10)
    assert linear_cka(x, 7.5 * y) == pytest.approx(reference, abs=1e-10)
    assert linear_cka(0.01 * x @ q, y @ ortho_group.rvs(24, random_state=4)) == pytest.approx(reference, abs=1e-10)
    assert linear_cka(x + 100.0, y) == pytest.approx(reference, abs=1e-9)  # centring: offsets do not matter


def test_not_invariant_to_anisotropic_scaling():
    """Guards against a formula that would be trivially invariant (e.g. one that whitens)."""
    x = _features(5)
    stretched = x * np.linspace(0.1, 10, x.shape[1])
    assert linear_cka(x, stretched) < 0.99


def test_matches_the_hsic_formula():
    x, y = _features(6, n=60, d=10), _features(7, n=60, d=5)
    assert linear_cka(x, y) == pytest.approx(_hsic_cka(x, y), abs=1e-12)


@pytest.mark.parametrize("batch_size", [1, 7, 32, 120, 1000])
def test_minibatch_matrix_equals_the_full_batch_formula(batch_size):
    blocks_x = [_features(10 + i) for i in range(3)]
    blocks_y = [_features(20 + i, d=16) for i in range(2)] + [blocks_x[1] @ ortho_group.rvs(24, random_state=0)]
    values = cka_matrix(blocks_x, blocks_y, batch_size=batch_size)
    expected = np.array([[linear_cka(x, y) for y in blocks_y] for x in blocks_x])
    assert values.shape == (3, 3)
    np.testing.assert_allclose(values, expected, atol=1e-5)
    assert values[1, 2] == pytest.approx(1.0, abs=1e-5)


def test_float16_inputs_as_stored():
    x = _features(30).astype(np.float16)
    y = _features(31).astype(np.float16)
    assert cka_matrix([x], [y])[0, 0] == pytest.approx(linear_cka(x.astype(np.float64), y.astype(np.float64)),
                                                       abs=1e-5)


def test_rows_must_match():
    with pytest.raises(BadInputError, match="same n"):
        cka_matrix([np.ones((5, 3))], [np.ones((6, 3))])
