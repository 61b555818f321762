"""Which rows of a store train, validate and evaluate a profile (`plan_splits`; the rules are in
`mimprobe.metrics.profile`'s docstring), and the check that a k-NN preset fits the banks they leave."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import BadInputError
from ..features.store import FeatureStore
from ._rows import carve_validation

HOLDOUT_FRACTION = 0.2   # of train, evaluated when the data has no test or val split


@dataclass
class SplitPlan:
    train: str
    eval_split: str                           # name written in the table
    train_index: np.ndarray                   # rows of train used as the bank / training set
    eval_source: str                          # store split the evaluation rows come from
    eval_index: np.ndarray
    fit_index: np.ndarray                     # train rows for the fit → val k-NN
    val_index: np.ndarray
    knn_loo: bool                             # k-NN on train with leave-one-out instead of an eval split


def plan_splits(store: FeatureStore, *, val_fraction: float, seed: int) -> SplitPlan:
    """Decide which rows train, validate and evaluate (see the module docstring)."""
    if "train" not in store.splits:
        raise BadInputError(f"store {store.path} has no train split (it has {', '.join(store.splits)})")
    eval_split = next((name for name in ("test", "val") if name in store.splits), None)
    return plan_from_labels(store.labels("train"), labelled=store.labelled, eval_split=eval_split,
                            n_eval=len(store.labels(eval_split)) if eval_split else 0, val_fraction=val_fraction,
                            seed=seed)


def plan_from_labels(labels: np.ndarray, *, labelled: bool, eval_split: str | None, n_eval: int,
                     val_fraction: float, seed: int) -> SplitPlan:
    """`plan_splits` from the (n,) train labels and the evaluation split's name and size."""
    labelled = labelled and (labels >= 0).any()
    fit, val = carve_validation(labels, fraction=val_fraction, seed=seed) if labelled else (np.arange(len(labels)),) * 2
    if eval_split is not None:
        return SplitPlan("train", eval_split, np.arange(len(labels)), eval_split, np.arange(n_eval), fit, val,
                         knn_loo=False)
    train_index, holdout = (carve_validation(labels, fraction=HOLDOUT_FRACTION, seed=seed) if labelled
                            else (np.arange(len(labels)),) * 2)
    if labelled:  # the validation split is carved from the rows outside the hold-out, as the probes carve theirs
        fit, val = (train_index[part] for part in carve_validation(labels[train_index], fraction=val_fraction,
                                                                   seed=seed))
    return SplitPlan("train", "train-holdout", train_index, "train", holdout, fit, val, knn_loo=True)


def check_knn_fits(preset: str, plan: SplitPlan) -> None:
    """Refuse a k-NN preset whose largest k exceeds the smallest neighbour bank of the plan, naming the presets
    and options that would fit (before anything is extracted or measured).

    Raises:
        BadInputError: The preset's largest k is larger than a bank.
    """
    from .knn_presets import PRESETS as KNN_PRESETS
    from .knn_presets import get_preset

    banks = [(f"the fit part of train for k-NN on val ({len(plan.fit_index)} images)", len(plan.fit_index))]
    if plan.knn_loo:
        banks.append((f"train, one left out per query ({len(plan.train_index) - 1} images)", len(plan.train_index) - 1))
    else:
        banks.append((f"train ({len(plan.train_index)} images)", len(plan.train_index)))
    where, smallest = min(banks, key=lambda bank: bank[1])
    k = max(get_preset(preset).ks)
    if k <= smallest:
        return
    fits = [f"{name} (k={max(p.ks)})" for name, p in KNN_PRESETS.items() if max(p.ks) <= smallest]
    choices = (f"--preset {' or '.join(fits)}, " if fits else "") + "more train images, or --metrics without knn"
    raise BadInputError(f"k-NN preset {preset} needs k={k} neighbours but the smallest bank is {where}: use {choices}")
