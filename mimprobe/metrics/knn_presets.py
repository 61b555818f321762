"""The k-NN protocols (presets) of the field, in one place: the metric, the profile's options, the headline curves
and the refinement monitor all read them from here.

* ``mim-refiner``: k=10, T=0.07, exp weights, features standardised with the train split's mean and std (+1e-6)
  before L2 (ml-jku/MIM-Refiner ``eval_knn_torchhub.py``);
* ``dino``: k=20, T=0.07, exp weights (facebookresearch/dino ``eval_knn.py``);
* ``dinov2``: k in 10/20/100/200, T=0.07, softmax weights (facebookresearch/dinov2 ``eval/knn.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BadInputError

WEIGHTINGS = ("exp", "softmax", "uniform")
MIN_TEMPERATURE = 0.0015        # exp(1 / T) overflows float64 below 1/709


def check_protocol(ks: Sequence[int], temperatures: Sequence[float], weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise BadInputError(f"unknown k-NN weighting {weighting!r}: use one of {', '.join(WEIGHTINGS)}")
    if not ks or any(int(k) != k or k < 1 for k in ks):
        raise BadInputError(f"k must be positive integers, got {tuple(ks)}")
    # exp(sim / T) with sim <= 1 stays finite in float64 down to T = 1/709
    if not temperatures or any(not np.isfinite(t) or t < MIN_TEMPERATURE for t in temperatures):
        raise BadInputError(f"temperatures must be at least {MIN_TEMPERATURE}, got {tuple(temperatures)}")


@dataclass(frozen=True)
class KnnPreset:
    """One k-NN protocol: which ks and temperatures, how neighbours vote, whether features are standardised."""

    name: str
    ks: tuple[int, ...]
    temperatures: tuple[float, ...] = (0.07,)
    weighting: str = "exp"
    standardize: bool = False   # (x - train mean) / (train std + 1e-6) before L2, MIM-Refiner's protocol
    headline_k: int | None = None   # the k a curve and the best blocks report (None: the first of ks)

    def __post_init__(self) -> None:
        check_protocol(self.ks, self.temperatures, self.weighting)
        if self.headline_k is None:
            object.__setattr__(self, "headline_k", int(self.ks[0]))

    def params(self, k: int, temperature: float) -> dict[str, Any]:
        """What a MetricRow records about the protocol."""
        return {"preset": self.name, "k": int(k), "T": float(temperature), "weighting": self.weighting,
                "standardize": self.standardize}


PRESETS: dict[str, KnnPreset] = {
    "mim-refiner": KnnPreset("mim-refiner", ks=(10,), temperatures=(0.07,), weighting="exp", standardize=True),
    "dino": KnnPreset("dino", ks=(20,), temperatures=(0.07,), weighting="exp"),
    # DINOv2's eval_knn.py nb_knn (10, 20, 100, 200); its README quotes k=20
    "dinov2": KnnPreset("dinov2", ks=(10, 20, 100, 200), temperatures=(0.07,), weighting="softmax", headline_k=20),
}


def get_preset(preset: str | KnnPreset) -> KnnPreset:
    """A preset by name (or the preset itself).

    Raises:
        BadInputError: Unknown name.
    """
    if isinstance(preset, KnnPreset):
        return preset
    if preset not in PRESETS:
        raise BadInputError(f"unknown k-NN preset {preset!r}: use one of {', '.join(PRESETS)}")
    return PRESETS[preset]


