"""Neighbourhood overlap of consecutive blocks: brute-force numpy cosine neighbours, and limiting cases."""

from __future__ import annotations

import numpy as np
import pytest

from mimprobe.errors import BadInputError
from mimprobe.metrics.labelfree import block_neighbours, neighbourhood_overlap, overlap_of_neighbours


def brute_force_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Doimo et al.'s chi_k with full cosine similarity matrices and Python sets."""
    def neighbours(x):
        z = x / np.linalg.norm(x, axis=1, keepdims=True)
        similarity = z @ z.T
        np.fill_diagonal(similarity, -np.inf)  # a sample is not its own neighbour
        return np.argsort(-similarity, axis=1)[:, :k]

    na, nb = neighbours(a), neighbours(b)
    return float(np.mean([len(set(na[i]) & set(nb[i])) / k for i in range(len(a))]))


def consecutive_blocks(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Block b with a decaying spectrum, block b + 1 = a residual update of it (as a transformer block does)."""
    rng = np.random.default_rng(seed)
    block = rng.standard_normal((n, dim)) * np.arange(1, dim + 1) ** -0.5 + 0.2
    update = np.tanh(block @ rng.standard_normal((dim, dim)) / np.sqrt(dim))
    return block, block + 0.3 * update


@pytest.mark.parametrize("k", [1, 10, 30])
def test_equals_brute_force(k):
    a, b = consecutive_blocks(600, 48)
    result = neighbourhood_overlap(a, b, k=k)
    assert result.value == pytest.approx(brute_force_overlap(a, b, k), abs=1e-12)
    assert result.params == {"k": k}
    assert 0.0 < result.value < 1.0


def test_same_neighbourhoods_give_one_and_unrelated_give_about_k_over_n():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((500, 32))
    rotation, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    assert neighbourhood_overlap(a, 2.0 * a @ rotation).value == pytest.approx(1.0)  # cosine-preserving map
    unrelated = neighbourhood_overlap(a, rng.standard_normal((500, 32)), k=30)
    assert unrelated.value == pytest.approx(30 / 499, abs=5 * unrelated.standard_error)


def test_neighbour_lists_are_reused_across_pairs():
    a, b = consecutive_blocks(300, 16, seed=2)
    lists = [block_neighbours(x, k=10) for x in (a, b)]
    assert overlap_of_neighbours(*lists).value == neighbourhood_overlap(a, b, k=10).value


def test_bad_inputs_raise():
    a, b = consecutive_blocks(100, 8)
    with pytest.raises(BadInputError, match="same rows"):
        neighbourhood_overlap(a, b[:50])
    with pytest.raises(BadInputError, match="k >= 1"):
        block_neighbours(a, k=0)
    with pytest.raises(BadInputError):
        block_neighbours(a, k=100)  # leave-one-out leaves 99 candidates
