"""The scikit-learn reference of the linear probes (`--probe sklearn`): the same protocol as
`mimprobe.metrics.linear.evaluate_linear` (scikit-learn's C grid, chosen on the same validation split, widened past
an edge), solved by ``LogisticRegression`` (lbfgs) block by block."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import BadInputError
from ._rows import MetricRow, carve_validation
from .linear import _check_inputs, _finite_float32, _grid_ratio, best_c, widen_grid
from .linear_solver import DEFAULT_C_VALUES, ArrayLike, LinearProbeConfig


def evaluate_linear_sklearn(train_blocks: Mapping[int, ArrayLike], train_labels: ArrayLike,
                            test_blocks: Mapping[int, ArrayLike], test_labels: ArrayLike, *, split: str = "test",
                            c_values: Sequence[float] = DEFAULT_C_VALUES, seed: int = 0, val_fraction: float = 0.1,
                            refit: bool = True, max_iter: int = 1000,
                            widen_points: int = LinearProbeConfig.widen_points,
                            max_widenings: int = LinearProbeConfig.max_widenings) -> dict[int, list[MetricRow]]:
    """Reference probe: scikit-learn ``LogisticRegression`` (lbfgs, multinomial) per block, one fit per C.

    Same protocol, validation split, grid widening (`widen_grid`) and rows as `evaluate_linear`: features
    standardised with the fit split's statistics (``StandardScaler``), C chosen per block on the validation split
    (ties: lowest validation loss, then the smallest C), then, with ``refit``, a final fit on all of train
    standardised with its own statistics. The C values of the grid are fitted in increasing order, each
    warm-started from the previous solution, as ``LogisticRegressionCV`` does along its regularisation path: every
    fit still runs lbfgs to its tolerance, so the solutions are the same.
    """
    return evaluate_linear_sklearn_with_hits(train_blocks, train_labels, test_blocks, test_labels, split=split,
                                             c_values=c_values, seed=seed, val_fraction=val_fraction, refit=refit,
                                             max_iter=max_iter, widen_points=widen_points,
                                             max_widenings=max_widenings)[0]


def evaluate_linear_sklearn_with_hits(train_blocks: Mapping[int, ArrayLike], train_labels: ArrayLike,
                                      test_blocks: Mapping[int, ArrayLike], test_labels: ArrayLike, *,
                                      split: str = "test", c_values: Sequence[float] = DEFAULT_C_VALUES,
                                      seed: int = 0, val_fraction: float = 0.1, refit: bool = True,
                                      max_iter: int = 1000, widen_points: int = LinearProbeConfig.widen_points,
                                      max_widenings: int = LinearProbeConfig.max_widenings
                                      ) -> tuple[dict[int, list[MetricRow]], dict[int, np.ndarray]]:
    """`evaluate_linear_sklearn`'s rows and, per block, the (n_test,) bool test correctness (see
    `evaluate_linear_with_hits`)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    blocks = _check_inputs(train_blocks, train_labels, test_blocks, test_labels)
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    fit_idx, val_idx = carve_validation(train_labels, fraction=val_fraction, seed=seed)
    if len(np.unique(train_labels[fit_idx])) < 2:
        raise BadInputError("the fit split (train minus validation) has fewer than 2 classes: lower val_fraction")
    c_values = sorted(float(c) for c in c_values)
    common = {"probe": "sklearn-lbfgs", "grid_c": c_values, "max_iter": max_iter, "val_fraction": val_fraction,
              "refit": refit}
    rows: dict[int, list[MetricRow]] = {}
    hits: dict[int, np.ndarray] = {}
    for block in blocks:
        train_x = _finite_float32(train_blocks[block], block, "train")
        test_x = _finite_float32(test_blocks[block], block, split)  # checked early, used last
        scaler = StandardScaler().fit(train_x[fit_idx])
        fit_z, val_z = scaler.transform(train_x[fit_idx]), scaler.transform(train_x[val_idx])
        path = LogisticRegression(max_iter=max_iter, warm_start=True)
        y_fit, y_val = train_labels[fit_idx], train_labels[val_idx]

        def scored(model) -> tuple[float, float]:
            probs = model.predict_proba(val_z)                                 # classes sorted, as the probe's
            position = np.searchsorted(model.classes_, y_val).clip(max=len(model.classes_) - 1)
            known = model.classes_[position] == y_val
            loss = -np.log(np.maximum(probs[np.arange(len(y_val)), position], 1e-300))[known].mean()
            return float(model.score(val_z, y_val)), float(loss)

        scores = {c: scored(path.set_params(C=c).fit(fit_z, y_fit)) for c in c_values}
        for _ in range(max_widenings):
            more = widen_grid(scores, ratio=_grid_ratio(c_values), points=widen_points)
            if not more:
                break
            scores.update({c: scored(LogisticRegression(C=c, max_iter=max_iter).fit(fit_z, y_fit)) for c in more})
        chosen = best_c(scores)
        if refit:
            final = make_pipeline(StandardScaler(), LogisticRegression(C=chosen, max_iter=max_iter))
            final.fit(train_x, train_labels)
        else:
            final = make_pipeline(scaler, LogisticRegression(C=chosen, max_iter=max_iter).fit(fit_z, y_fit))
        params = {**common, "grid_c_searched": sorted(scores), "C": chosen}
        rows[block] = [MetricRow(split, "linear_top1", float(final.score(test_x, test_labels)), params, seed),
                       MetricRow("val", "linear_val_top1", scores[chosen][0], params, seed)]
        hits[block] = final.predict(test_x) == test_labels
    return rows, hits
