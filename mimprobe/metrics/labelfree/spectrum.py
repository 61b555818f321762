"""Eigenspectrum of a block's feature covariance: alpha-ReQ (power-law decay) and NESum.

Both read the eigenvalues ``lambda_1 >= lambda_2 >= ...`` of the empirical covariance of the features (centred,
divided by n - 1; the scale cancels in both):

- **alpha-ReQ** (Agrawal, Mondal, Ghosh & Richards, NeurIPS 2022, "alpha-ReQ: Assessing representation quality in
  self-supervised learning by measuring eigenspectrum decay"): the spectrum is close to a power law
  ``lambda_i ~ i^-alpha`` and alpha is its decay coefficient. Fitted as the authors' code does (``get_powerlaw`` of
  reptrix, github.com/arnab39/reptrix, ``reptrix/alpha.py``, itself from Stringer et al. 2019): weighted least
  squares of ``log lambda_i`` on ``[-log i, 1]`` with weights ``1 / i`` over the ranks ``i = 11 .. 100``
  (reptrix's default ``fit_range=np.arange(10, 100)``, 0-based; the first ranks are left out because the head of
  a spectrum is not a power law). The last rank is cut to the number of non-zero eigenvalues when there are
  fewer; the range used is recorded, and so is the fit's R^2 on the log spectrum (reptrix reports it too).
  The paper finds well-generalising representations near alpha = 1 (Stringer et al.'s critical 1/n spectrum).
- **NESum** (He & Ozay, ICML 2022, PMLR 162:8613, "Exploring the gap between collapsed and whitened features in
  self-supervised learning"): ``sum_i lambda_i / lambda_1``, from 1 (collapsed to one direction) to d (whitened).

RankMe (`mimprobe.metrics.rank`) is the third spectral number; it uses the singular values of the features as they
are (not centred), as its paper does.
"""

from __future__ import annotations

import numpy as np

from ...errors import BadInputError
from .subset import LabelFreeEstimate, float64_rows

ALPHA_FIT_RANKS = (11, 100)     # 1-based, inclusive: reptrix's fit_range np.arange(10, 100)
ZERO_EIGENVALUE = 1e-12         # eigenvalues below this fraction of the largest are numerical zeros


def covariance_eigenvalues(features: np.ndarray, *, name: str = "features") -> np.ndarray:
    """Eigenvalues of the (d, d) covariance of a (n, d) array, largest first, float64, clipped at 0.

    Computed on the smaller of the (d, d) covariance and the (n, n) Gram of the centred rows (same non-zero
    eigenvalues), so the result has ``min(n, d)`` entries.
    """
    x = float64_rows(features, name=name)
    centred = x - x.mean(axis=0)
    small = centred.T @ centred if x.shape[0] >= x.shape[1] else centred @ centred.T
    eigenvalues = np.linalg.eigvalsh(small)[::-1] / (x.shape[0] - 1)
    return np.clip(eigenvalues, 0.0, None)


def alpha_req_fits(eigenvalues: np.ndarray, *, fit_ranks: tuple[int, int] = ALPHA_FIT_RANKS) -> bool:
    """Whether the spectrum has the 3 non-zero eigenvalues in the fit range that `alpha_req_from_spectrum` needs."""
    spectrum = np.asarray(eigenvalues, dtype=np.float64)
    largest = float(spectrum[0]) if spectrum.size else 0.0
    non_zero = int(np.count_nonzero(spectrum > ZERO_EIGENVALUE * largest)) if largest > 0 else 0
    return min(int(fit_ranks[1]), non_zero) - int(fit_ranks[0]) + 1 >= 3


def alpha_req_from_spectrum(eigenvalues: np.ndarray, *,
                            fit_ranks: tuple[int, int] = ALPHA_FIT_RANKS) -> LabelFreeEstimate:
    """Power-law decay coefficient alpha of a spectrum (largest first), fitted over ranks ``fit_ranks``.

    Args:
        eigenvalues: (m,) eigenvalues, largest first (`covariance_eigenvalues`).
        fit_ranks: First and last 1-based rank of the fit, inclusive; the last is cut to the non-zero eigenvalues.

    Returns:
        value: alpha; params ``{"first_rank", "last_rank", "fit_r2"}``; no standard error (the fitted points are
        not independent, so the regression's own standard error would mislead).

    Raises:
        BadInputError: fewer than 3 non-zero eigenvalues in the fit range, or a bad range.
    """
    first, last = (int(r) for r in fit_ranks)
    if first < 1 or last <= first:
        raise BadInputError(f"alpha-ReQ fit ranks must satisfy 1 <= first < last, got {fit_ranks}")
    spectrum = np.asarray(eigenvalues, dtype=np.float64)
    largest = float(spectrum[0]) if spectrum.size else 0.0
    non_zero = int(np.count_nonzero(spectrum > ZERO_EIGENVALUE * largest)) if largest > 0 else 0
    last = min(last, non_zero)
    if last - first + 1 < 3:
        raise BadInputError(f"alpha-ReQ fits ranks {first}..{fit_ranks[1]} but the spectrum has {non_zero} non-zero "
                            f"eigenvalues; use more rows or wider features, or lower the first rank")
    ranks = np.arange(first, last + 1, dtype=np.float64)
    log_lambda = np.log(spectrum[first - 1:last])
    design = np.stack([-np.log(ranks), np.ones_like(ranks)], axis=1)  # (points, 2): [-log i, 1]
    weights = 1.0 / ranks
    coefficients = np.linalg.solve(design.T @ (design * weights[:, None]), (design * weights[:, None]).T @ log_lambda)
    alpha = float(coefficients[0])
    residual = log_lambda - design @ coefficients
    spread = float(np.sum((log_lambda - log_lambda.mean()) ** 2))
    fit_r2 = 1.0 - float(residual @ residual) / spread if spread > 0 else 1.0
    return LabelFreeEstimate(value=alpha, params={"first_rank": first, "last_rank": last, "fit_r2": fit_r2})


def nesum_from_spectrum(eigenvalues: np.ndarray) -> LabelFreeEstimate:
    """NESum ``sum_i lambda_i / lambda_1`` of a spectrum (largest first); 0.0 for an all-zero spectrum."""
    spectrum = np.asarray(eigenvalues, dtype=np.float64)
    value = float(spectrum.sum() / spectrum[0]) if spectrum.size and spectrum[0] > 0 else 0.0
    return LabelFreeEstimate(value=value, params={})


def alpha_req(features: np.ndarray, *, fit_ranks: tuple[int, int] = ALPHA_FIT_RANKS,
              name: str = "features") -> LabelFreeEstimate:
    """alpha-ReQ of a (n, d) block's features (see the module docstring)."""
    return alpha_req_from_spectrum(covariance_eigenvalues(features, name=name), fit_ranks=fit_ranks)


def nesum(features: np.ndarray, *, name: str = "features") -> LabelFreeEstimate:
    """NESum of a (n, d) block's features (see the module docstring)."""
    return nesum_from_spectrum(covariance_eigenvalues(features, name=name))
