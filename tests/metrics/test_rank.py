"""RankMe against closed forms (subspaces with known spectra) and a direct SVD."""

from __future__ import annotations

import numpy as np
import pytest

from mimprobe.errors import BadInputError
from mimprobe.metrics._rows import MetricRow
from mimprobe.metrics import rank as rank_module
from mimprobe.metrics.rank import (RANKME_EPS, effective_rank, evaluate_rank, rankme_from_singular_values,
                                   singular_values)


def orthonormal(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q


def rankme_by_svd(features: np.ndarray, eps: float = RANKME_EPS) -> float:
    """The paper's formula, written out on numpy's SVD."""
    s = np.linalg.svd(features.astype(np.float64), compute_uv=False)
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


@pytest.mark.parametrize("rank", [1, 3, 10])
def test_equal_singular_values_give_the_rank(rank):
    rng = np.random.default_rng(0)
    n, d = 2000, 48
    # a random rank-r subspace of R^d, every singular value 5.0
    features = 5.0 * orthonormal(n, rank, rng) @ orthonormal(d, rank, rng).T
    value = effective_rank(features)
    assert value == pytest.approx(rank, rel=1e-3)   # exact up to the eps terms
    assert value == pytest.approx(rankme_by_svd(features), rel=1e-6)


def test_gaussian_latent_subspace_is_close_to_its_dimension():
    rng = np.random.default_rng(1)
    n, d, r = 20_000, 64, 8
    features = (rng.standard_normal((n, r)) @ orthonormal(d, r, rng).T).astype(np.float32)
    assert effective_rank(features) == pytest.approx(r, rel=0.05)


def test_rank_one_matrix():
    rng = np.random.default_rng(2)
    features = np.outer(rng.standard_normal(500), rng.standard_normal(32))
    assert effective_rank(features) == pytest.approx(1.0, abs=1e-3)


def test_uneven_spectrum_matches_direct_svd_and_closed_form():
    rng = np.random.default_rng(3)
    n, d = 3000, 20
    spectrum = np.array([8.0, 4.0, 2.0, 1.0])
    features = orthonormal(n, 4, rng) @ np.diag(spectrum) @ orthonormal(d, 4, rng).T
    p = spectrum / spectrum.sum() + RANKME_EPS
    closed_form = np.exp(-(p * np.log(p)).sum())
    assert effective_rank(features) == pytest.approx(closed_form, rel=1e-4)
    random_features = rng.standard_normal((300, 40)) * np.linspace(0.1, 3.0, 40)
    assert effective_rank(random_features) == pytest.approx(rankme_by_svd(random_features), rel=1e-6)


def test_fewer_rows_than_columns_uses_the_row_gram():
    rng = np.random.default_rng(4)
    features = rng.standard_normal((30, 200))
    assert effective_rank(features) == pytest.approx(rankme_by_svd(features), rel=1e-6)


def test_invariant_to_rotations_of_the_feature_space():
    rng = np.random.default_rng(5)
    features = rng.standard_normal((1000, 32)) * np.geomspace(0.01, 10, 32)
    rotation = orthonormal(32, 32, rng)
    assert effective_rank(features @ rotation) == pytest.approx(effective_rank(features), rel=1e-8)


def test_not_centred_a_common_offset_lowers_the_rank():
    """RankMe is taken on the embedding matrix itself (arXiv 2210.02885), not on centred features."""
    rng = np.random.default_rng(6)
    features = rng.standard_normal((2000, 16))
    shifted = features + 50.0 * np.ones(16)
    assert effective_rank(shifted) < 0.5 * effective_rank(features)
    assert effective_rank(shifted) == pytest.approx(rankme_by_svd(shifted), rel=1e-6)


def test_float16_memmap_is_read(tmp_path):
    rng = np.random.default_rng(7)
    features = (rng.standard_normal((800, 24)) * np.linspace(0.5, 2.0, 24)).astype(np.float16)
    np.save(tmp_path / "x.npy", features)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert effective_rank(mapped) == pytest.approx(rankme_by_svd(features.astype(np.float64)), rel=1e-6)


def test_subsampling_is_seeded():
    rng = np.random.default_rng(8)
    features = rng.standard_normal((500, 64)) * np.linspace(0.1, 2.0, 64)
    a = effective_rank(features, max_samples=40, seed=0)
    assert effective_rank(features, max_samples=40, seed=0) == a
    assert effective_rank(features, max_samples=40, seed=1) != a
    # fewer rows than columns: the rank is bounded by the sample size
    assert a <= 40 + 1e-3
    assert effective_rank(features, max_samples=10_000) == effective_rank(features)


def test_evaluate_rank_rows():
    rng = np.random.default_rng(9)
    features = rng.standard_normal((300, 16))
    assert evaluate_rank(features, split="val") == [
        MetricRow(split="val", metric="rankme", value=effective_rank(features), params={}, seed=None)]
    (row,) = evaluate_rank(features, split="val", max_samples=100, seed=3)
    assert row.params == {"max_samples": 100} and row.seed == 3
    assert row.value == effective_rank(features, max_samples=100, seed=3)


def test_zero_matrix_has_rank_zero():
    assert rankme_from_singular_values(np.zeros(5)) == 0.0


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_raises_with_the_name(bad):
    features = np.ones((10, 4), dtype=np.float32)
    features[3, 2] = bad
    with pytest.raises(BadInputError, match="block 5 cls"):
        effective_rank(features, name="block 5 cls")
    wide = np.ones((3, 8), dtype=np.float32)
    wide[0, 0] = bad
    with pytest.raises(BadInputError, match="NaN or Inf"):
        evaluate_rank(wide, split="test")


def test_bad_shapes_raise():
    with pytest.raises(BadInputError):
        effective_rank(np.ones(5))
    with pytest.raises(BadInputError):
        effective_rank(np.ones((5, 3)), max_samples=0)


def test_chunked_qr_gives_the_exact_spectrum(monkeypatch):
    """The streaming path (QR of chunks) returns numpy's singular values, small ones included."""
    monkeypatch.setattr(rank_module, "QR_CHUNK", 50)
    rng = np.random.default_rng(10)
    n, d, r = 1001, 24, 6
    low_rank = 3.0 * orthonormal(n, r, rng) @ orthonormal(d, r, rng).T
    spread = rng.standard_normal((n, d)) * np.geomspace(1e-3, 10, d)
    for features in (low_rank, spread):
        expected = np.linalg.svd(features, compute_uv=False)
        np.testing.assert_allclose(singular_values(features), expected, rtol=1e-9, atol=1e-12 * expected[0])
        assert effective_rank(features) == pytest.approx(rankme_by_svd(features), rel=1e-9)
    assert effective_rank(low_rank) == pytest.approx(r, rel=1e-3)
