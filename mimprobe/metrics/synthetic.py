"""Class-structured features shaped like real transformer features, for tests and benchmarks of the metrics.

Real ViT features have a power-law spectrum (a few strong directions, a long tail of weak ones, condition numbers of
10^3-10^5 after standardisation) and class information in the weak directions too: that is what makes a linear
probe's solver converge slowly (the fidelity issue of the plain-SGD probe). `decaying_spectrum_features` draws such
features without a model, so that a test or benchmark needs no weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def decaying_spectrum_features(*, n_train: int, n_test: int, width: int, separations: Sequence[float],
                               num_classes: int = 10, seed: int = 0, alpha: float = 2.0, beta: float = 0.25,
                               dtype: type = np.float32):
    """One block per entry of ``separations``: ``{block: (n, width)}`` for train and test, plus (n,) labels.

    Block b is ``((m[y] + noise) @ Q^T) * scale + offset``: noise with variance ``i^-alpha`` along the i-th
    direction of a random orthogonal basis Q, class means ``m`` drawn with scale ``i^-(alpha * beta)`` (relatively
    stronger than the noise in the weak directions, so those carry signal and must be fitted) times
    ``separations[b] * sqrt(width) / 4``, and random per-dimension scales (log-normal) and offsets (N(0, 4)).

    Returns:
        ``(train, train_labels, test, test_labels)``: dicts of ``dtype`` arrays and int64 label arrays (balanced,
        shuffled).
    """
    rng = np.random.default_rng(seed)
    train_labels = rng.permutation(np.arange(n_train) % num_classes)
    test_labels = rng.permutation(np.arange(n_test) % num_classes)
    spectrum = (1.0 + np.arange(width)) ** -alpha
    train, test = {}, {}
    for block, separation in enumerate(separations):
        basis = np.linalg.qr(rng.normal(size=(width, width)))[0]
        means = rng.normal(size=(num_classes, width)) * spectrum ** beta * separation * np.sqrt(width) / 4
        scale, offset = np.exp(rng.normal(size=width)), rng.normal(size=width) * 2.0

        def draw(labels: np.ndarray) -> np.ndarray:
            latent = means[labels] + rng.normal(size=(len(labels), width)) * np.sqrt(spectrum)
            return ((latent @ basis.T) * scale + offset).astype(dtype)

        train[block], test[block] = draw(train_labels), draw(test_labels)
    return train, train_labels, test, test_labels
