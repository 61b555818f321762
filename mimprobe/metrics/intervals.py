"""How sure a block's accuracy is: Wilson score intervals and the exact McNemar test between two blocks.

An accuracy measured on n evaluation images is a binomial proportion. Its interval here is Wilson's score interval
(Wilson, 1927, JASA 22:209; recommended over the normal "Wald" interval by Brown, Cai and DasGupta, 2001,
Statistical Science 16:101, because it keeps its coverage near 0 and 1 and never leaves [0, 1]); it equals
``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``, computed here in closed form so that whole curves
are handled at once.

Two blocks scored on the same images are compared with the exact McNemar test (McNemar, 1947, Psychometrika
12:153): only the images that one block gets right and the other wrong carry information, and under "equal
accuracy" each such image is equally likely to favour either block, so their count is Binomial(b + c, 1/2).
This paired test is far sharper than asking whether two independent intervals overlap.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest, norm

DEFAULT_LEVEL = 0.95


def wilson_interval(successes: np.ndarray | int, n: np.ndarray | int, *, level: float = DEFAULT_LEVEL
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of ``successes / n``.

    Args:
        successes: Correct predictions, scalar or array.
        n: Trials (evaluation images), broadcastable to ``successes``; where n is 0 the interval is NaN.
        level: Coverage, e.g. 0.95.

    Returns:
        (low, high) float64 arrays of the broadcast shape:
        ``(p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)`` with ``z = Φ⁻¹((1 + level) / 2)``.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    successes, n = np.broadcast_arrays(np.asarray(successes, dtype=np.float64), np.asarray(n, dtype=np.float64))
    z = float(norm.ppf(0.5 + level / 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        p = successes / n
        denominator = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denominator
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
        low, high = np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)
    empty = n <= 0
    return np.where(empty, np.nan, low), np.where(empty, np.nan, high)


def binomial_se(p: float, n: int) -> float:
    """Standard error sqrt(p (1 - p) / n) of an accuracy p measured on n images (NaN for n < 1)."""
    return float(np.sqrt(p * (1 - p) / n)) if n >= 1 else float("nan")


def mcnemar_pvalue(hits_a: np.ndarray, hits_b: np.ndarray) -> float:
    """Two-sided exact McNemar p-value that two classifiers scored on the same images are equally accurate.

    Args:
        hits_a, hits_b: (n,) bool correctness on the same images, in the same order.

    Returns:
        ``binomtest(min(b, c), b + c, 1/2)``'s two-sided p-value, where b and c count the images only ``a``, resp.
        only ``b``, gets right; 1.0 when no image separates them.
    """
    hits_a, hits_b = np.asarray(hits_a, dtype=bool), np.asarray(hits_b, dtype=bool)
    if hits_a.shape != hits_b.shape:
        raise ValueError(f"paired hits need one shape, got {hits_a.shape} and {hits_b.shape}")
    only_a = int(np.count_nonzero(hits_a & ~hits_b))
    only_b = int(np.count_nonzero(~hits_a & hits_b))
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue)
