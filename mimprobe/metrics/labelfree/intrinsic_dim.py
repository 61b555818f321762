"""TwoNN intrinsic dimension of a block's features (Facco et al., 2017, Sci. Rep. 7:12140).

For every point, the ratio ``mu = r2 / r1`` of the Euclidean distances to its second and first nearest neighbours
follows a Pareto law ``F(mu) = 1 - mu^-d`` when the data lie on a d-dimensional manifold with locally constant
density. So ``-log(1 - F(mu))`` is a line of slope d through the origin in ``log(mu)``: the TwoNN estimate is the
least-squares slope of that line over the ``1 - discard_fraction`` smallest ratios (the largest ones are the most
affected by noise; Facco et al. discard 10 %). This is scikit-dimension's ``skdim.id.TwoNN`` (``method="linear"``,
its default, and ``method="mle"``), which the tests run on the same data:

- duplicates (``r1 == 0``) give an undefined ratio and are dropped before the fit, as scikit-dimension does; how
  many were dropped is recorded (``duplicates``);
- ``method="mle"``: the closed-form maximum-likelihood estimate with the discarded ratios treated as censored,
  ``(k - 1) / (sum_{i<=k} log mu_(i) + (N - k) log mu_(k))``.

Standard error: ``d / sqrt(k - 2)`` with k the ratios kept, the exact standard deviation of the censored MLE under
the Pareto model (``log mu`` is exponential with rate d, so the estimate is (k-1)/Gamma(k, d)). The least-squares
slope has no closed form; the same value is reported for it and the tests check by simulation that it is within
a factor 1.5 of its spread. Neighbouring ratios share points, so on real data both are a lower bound.

Nearest neighbours: exact Euclidean search, ``faiss.IndexFlatL2`` on the centred rows in float32 for candidates,
then the candidates' distances recomputed in float64 (a duplicate is then exactly 0, and the ratio of two close
distances keeps its precision). Self is excluded by index, so duplicates of a point count as its neighbours.

Valeriani et al. (NeurIPS 2023, arXiv 2302.00294) read the ID profile across the layers of a transformer: the layers
at the relative minimum of the ID after its early peak carry the most semantic information.
"""

from __future__ import annotations

import faiss
import numpy as np

from ...errors import BadInputError
from .subset import LabelFreeEstimate, float64_rows

TWONN_DISCARD_FRACTION = 0.1   # Facco et al. 2017 and scikit-dimension's default
TWONN_METHODS = ("linear", "mle")
CANDIDATE_MARGIN = 8           # float32 candidates beyond the 2 neighbours (+ self), re-ranked in float64
_CHUNK_ROWS = 512              # rows whose candidate distances are recomputed at a time (d=1024: 46 MB)


def two_nearest_distances(features: np.ndarray, *, name: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distances (r1, r2), each (n,) float64, of every row to its first and second nearest other rows.

    Args:
        features: (n, d) array, n >= 3.
        name: What the features are ("block 5 cls"), for error messages.
    """
    x = float64_rows(features, name=name, min_rows=3)
    centred = x - x.mean(axis=0)  # translation-invariant; keeps float32 search precise under a large offset
    n_samples, dim = centred.shape
    candidates = min(n_samples, 3 + CANDIDATE_MARGIN)
    index = faiss.IndexFlatL2(dim)
    x32 = np.ascontiguousarray(centred, dtype=np.float32)
    index.add(x32)
    _, neighbours = index.search(x32, candidates)  # (n, candidates), self usually first
    r1 = np.empty(n_samples)
    r2 = np.empty(n_samples)
    for start in range(0, n_samples, _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, n_samples)
        idx = neighbours[start:stop]
        diff = centred[np.maximum(idx, 0)] - centred[start:stop, None, :]  # (rows, candidates, d)
        dist = np.sqrt(np.einsum("rcd,rcd->rc", diff, diff))
        dist[(idx < 0) | (idx == np.arange(start, stop)[:, None])] = np.inf  # padding and self (by index)
        dist.sort(axis=1)
        r1[start:stop], r2[start:stop] = dist[:, 0], dist[:, 1]
    return r1, r2


def twonn_from_distances(r1: np.ndarray, r2: np.ndarray, *, discard_fraction: float = TWONN_DISCARD_FRACTION,
                         method: str = "linear") -> LabelFreeEstimate:
    """TwoNN estimate from each point's first and second neighbour distances (both (n,), any order of points).

    Returns:
        value: the intrinsic dimension (NaN when every kept ratio is 1, e.g. a regular grid: the law does not hold);
        standard_error: ``value / sqrt(k - 2)``, k the kept ratios;
        params: ``{"estimator": "twonn", "method", "discard_fraction", "duplicates", "kept"}``.

    Raises:
        BadInputError: Unknown method, discard_fraction outside [0, 1), or fewer than 3 ratios kept.
    """
    if method not in TWONN_METHODS:
        raise BadInputError(f"TwoNN method must be one of {TWONN_METHODS}, got {method!r}")
    if not 0.0 <= discard_fraction < 1.0:
        raise BadInputError(f"TwoNN discard_fraction must be in [0, 1), got {discard_fraction}")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.asarray(r2, dtype=np.float64) / np.asarray(r1, dtype=np.float64)
    finite = np.isfinite(ratios)
    duplicates = int(ratios.size - finite.sum())
    ratios = ratios[finite]
    n_ratios = ratios.size
    kept = int(n_ratios * (1 - discard_fraction))
    if kept < 3:
        raise BadInputError(f"TwoNN needs at least 3 ratios after dropping {duplicates} duplicate points and the "
                            f"largest {discard_fraction:.0%}, got {kept}; use more (distinct) rows")
    log_mu = np.log(np.sort(ratios)[:kept])
    if method == "mle":
        denominator = log_mu.sum() + (n_ratios - kept) * log_mu[-1]
        dimension = (kept - 1) / denominator if denominator > 0 else float("nan")
    else:
        # -log(1 - F_emp) at the kept ratios; F_emp counts every (finite) ratio, as Facco et al. and skdim do
        target = -np.log(1.0 - np.arange(1, kept + 1) / n_ratios)
        squares = float(log_mu @ log_mu)
        dimension = float(log_mu @ target) / squares if squares > 0 else float("nan")
    params = {"estimator": "twonn", "method": method, "discard_fraction": float(discard_fraction),
              "duplicates": duplicates, "kept": kept}
    return LabelFreeEstimate(value=float(dimension), standard_error=float(dimension / np.sqrt(kept - 2)),
                             params=params)


def twonn_dimension(features: np.ndarray, *, discard_fraction: float = TWONN_DISCARD_FRACTION,
                    method: str = "linear", name: str = "features") -> LabelFreeEstimate:
    """TwoNN intrinsic dimension of a (n, d) block's features, n >= 3 (see the module docstring).

    Args:
        features: (n, d) array (a seeded subset of a split: `seeded_subset`).
        discard_fraction: Fraction of the largest ratios left out of the fit (Facco et al.: 0.1).
        method: "linear" (Facco et al.'s fit, scikit-dimension's default) or "mle".
        name: What the features are, for error messages.
    """
    r1, r2 = two_nearest_distances(features, name=name)
    return twonn_from_distances(r1, r2, discard_fraction=discard_fraction, method=method)
