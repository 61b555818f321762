"""Low-shot classification: L2 logistic regression fitted on a few labelled train images per class.

Settings: n in {1, 2, 5} images per class and 1 % of the train labels, each on several seeded splits (seeds 0, 1, 2),
scored on the test split. The protocol follows MSN's low-shot evaluation (Assran et al., 2022, arXiv 2204.07141):
L2-regularised multinomial logistic regression on frozen, centred and L2-normalised features, here with
scikit-learn's ``LogisticRegression`` (lbfgs).

Choices:

- **Centring** uses the mean of the selected labelled subset only, never of the whole train set: the unlabelled
  rest would be information a real n-shot learner does not have. The same mean is subtracted from the test
  features, then every row is L2-normalised.
- **Splits** draw one seeded permutation per class and take its first n rows, so for one seed the 1-shot split
  is inside the 2-shot split, which is inside the 5-shot split: differences between settings are not split noise.
- **1 %** takes round(1 % of each class), at least one image per class (a class with no labelled image could
  never be predicted), from the same per-class permutations: about 1 % of the train set, stratified.
- A class with fewer than n images gives all it has; the rows of that setting record how many classes fell short
  (``params["classes_short"]``). When every class falls short the setting is not n-shot at all: BadInputError.
- Accuracy is a fraction in [0, 1]; ``lowshot_top1_std`` is the sample standard deviation over seeds (ddof=1)
  and is left out for a single seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import normalize

from ..errors import BadInputError
from ._rows import MetricRow, finite_float32

# MSN's L2 weight (its logistic_eval.py): cyanure minimises (1/n) sum loss + lambd/2 ||w||^2 with lambd = 2.5e-4 / n,
# i.e. sum loss + 2.5e-4/2 ||w||^2, which is scikit-learn's C * sum loss + 1/2 ||w||^2 at C = 1 / 2.5e-4.
DEFAULT_SHOTS = (1, 2, 5)
LOGREG_C = 4000.0
LOGREG_MAX_ITER = 1000


def lowshot_split(labels: np.ndarray, shots: int, *, seed: int) -> np.ndarray:
    """Sorted indices of ``shots`` seeded train rows per class (all of a class's rows when it has fewer).

    Args:
        labels: (n,) class labels of the train split, all >= 0.
        shots: Images per class, >= 1.
        seed: Same seed, same indices; the split for fewer shots is a prefix of the one for more.

    Raises:
        BadInputError: Unlabelled rows, shots < 1, or every class has fewer than ``shots`` rows.
    """
    if shots < 1:
        raise BadInputError(f"low-shot needs at least 1 image per class (got shots={shots})")
    members = _class_permutations(labels, seed=seed)
    if all(len(rows) < shots for rows in members):
        largest = max(len(rows) for rows in members)
        raise BadInputError(f"{shots}-shot needs a class with {shots} train images but the largest has {largest}; "
                            f"use fewer shots")
    return np.sort(np.concatenate([rows[:shots] for rows in members]))


def percent_split(labels: np.ndarray, percent: float, *, seed: int) -> np.ndarray:
    """Sorted indices of ``percent`` % of each class's train rows (rounded half up, at least one per class), seeded.

    Uses the same per-class permutations as `lowshot_split`, so the splits of one seed are nested.
    """
    if not 0 < percent <= 100:
        raise BadInputError(f"low-shot percent must be in (0, 100] (got {percent})")
    members = _class_permutations(labels, seed=seed)
    return np.sort(np.concatenate([rows[:_percent_quota(len(rows), percent)] for rows in members]))


def lowshot_accuracy(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray,
                     indices: np.ndarray, *, C: float = LOGREG_C, max_iter: int = LOGREG_MAX_ITER,
                     name: str = "features") -> float:
    """Top-1 test accuracy of logistic regression fitted on ``train[indices]`` (centred with their mean, L2-normed).

    Args:
        train: (n_train, dim) array or memory map; only the rows in ``indices`` are read.
        train_labels: (n_train,) labels.
        test: (n_test, dim) features, or the float32 array `evaluate_lowshot` already checked.
        test_labels: (n_test,) labels.
        indices: Rows of train to fit on (from `lowshot_split` / `percent_split`).
        C: Inverse L2 strength of scikit-learn's LogisticRegression.
        max_iter: lbfgs iteration cap.
        name: What the features are ("block 5 cls"), for error messages.
    """
    fit_x = finite_float32(train[indices], name=f"{name} train")
    fit_y = np.asarray(train_labels)[indices]
    if np.unique(fit_y).size < 2:
        raise BadInputError(f"{name}: low-shot needs at least 2 classes in train (got {np.unique(fit_y).size})")
    test_x = finite_float32(test, name=f"{name} test")
    mean = fit_x.mean(axis=0, dtype=np.float64).astype(np.float32)
    classifier = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter)
    classifier.fit(normalize(fit_x - mean), fit_y)
    predictions = classifier.predict(normalize(test_x - mean))
    return float(np.mean(predictions == np.asarray(test_labels)))


def evaluate_lowshot(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray, *,
                     shots: Sequence[int] = DEFAULT_SHOTS, percents: Sequence[float] = (1,),
                     seeds: Sequence[int] = (0, 1, 2), split: str = "test", C: float = LOGREG_C,
                     max_iter: int = LOGREG_MAX_ITER, name: str = "features") -> list[MetricRow]:
    """Low-shot rows of one block's features: every setting on every seed, then mean and spread over seeds.

    Args:
        train: (n_train, dim) train features (array or memory map; float16 is read as float32).
        train_labels: (n_train,) train labels, all >= 0.
        test: (n_test, dim) features of the split scored.
        test_labels: (n_test,) its labels, all >= 0.
        shots: Images per class, one setting each.
        percents: Percentages of the train labels (stratified), one setting each.
        seeds: One split per seed.
        split: Name of the scored split, written in the rows.
        C, max_iter: Logistic regression settings (C defaults to MSN's regularisation, see LOGREG_C).
        name: What the features are ("block 5 cls"), for error messages.

    Returns:
        Per setting: ``lowshot_top1`` for each seed (params ``{"shots": n}`` or ``{"percent": p}``), then
        ``lowshot_top1_mean`` and ``lowshot_top1_std`` (seed None, std with ddof=1, only with >= 2 seeds).
    """
    train_labels = _checked_labels(train_labels, train.shape[0], name=f"{name} train")
    test_labels = _checked_labels(test_labels, test.shape[0], name=f"{name} test")
    if not seeds:
        raise BadInputError("low-shot needs at least one seed")
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1]:
        raise BadInputError(f"{name}: train and test features must be 2-D with one width, "
                            f"got {train.shape} and {test.shape}")
    test_x = finite_float32(test, name=f"{name} test")
    class_sizes = np.bincount(train_labels)
    class_sizes = class_sizes[class_sizes > 0]

    settings: list[tuple[dict, int]] = []   # (params, classes short of their quota)
    for n in shots:
        settings.append(({"shots": int(n)}, int(np.sum(class_sizes < n))))
    for p in percents:
        settings.append(({"percent": _canonical_number(p)}, 0))

    rows: list[MetricRow] = []
    for params, classes_short in settings:
        if classes_short:
            params = {**params, "classes_short": classes_short}
        accuracies = []
        for seed in seeds:
            if "shots" in params:
                indices = lowshot_split(train_labels, params["shots"], seed=seed)
            else:
                indices = percent_split(train_labels, params["percent"], seed=seed)
            accuracy = lowshot_accuracy(train, train_labels, test_x, test_labels, indices, C=C, max_iter=max_iter,
                                        name=name)
            accuracies.append(accuracy)
            rows.append(MetricRow(split=split, metric="lowshot_top1", value=accuracy, params=dict(params),
                                  seed=int(seed)))
        rows.append(MetricRow(split=split, metric="lowshot_top1_mean", value=float(np.mean(accuracies)),
                              params=dict(params)))
        if len(accuracies) >= 2:
            rows.append(MetricRow(split=split, metric="lowshot_top1_std", value=float(np.std(accuracies, ddof=1)),
                                  params=dict(params)))
    return rows


def _class_permutations(labels: np.ndarray, *, seed: int) -> list[np.ndarray]:
    """One seeded permutation of each class's row indices, classes in increasing label order."""
    labels = _checked_labels(labels, len(labels), name="train")
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    classes, starts = np.unique(labels[order], return_index=True)
    return [rng.permutation(rows) for rows in np.split(order, starts[1:])]


def _percent_quota(class_size: int, percent: float) -> int:
    return max(1, min(class_size, math.floor(class_size * percent / 100 + 0.5)))


def _canonical_number(value: float) -> int | float:
    """1.0 -> 1, so params JSON does not depend on how the caller typed the number."""
    return int(value) if float(value).is_integer() else float(value)


def _checked_labels(labels: np.ndarray, n_rows: int, *, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n_rows or labels.size == 0:
        raise BadInputError(f"{name}: expected {n_rows} labels in a non-empty 1-D array, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise BadInputError(f"{name}: labels must be integers, got {labels.dtype}")
    if labels.min() < 0:
        raise BadInputError(f"{name}: low-shot needs class labels, but some rows are unlabelled (-1)")
    return labels
