"""NaN/Inf in feature rows: one check, one message, for every metric.

`check_finite` scans rows in their stored dtype (float16 overflow is Inf there) chunk by chunk, releasing a memory
map's pages after each chunk, so a block is read once for it: the profile checks each (block, pooling) once
(`StoreViews.check_finite`) and hands the metrics rows it has checked. `finite_copy` checks a conversion (float64 to
float32 can overflow) of rows a metric holds in memory anyway.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import BadInputError
from ._memory import release_pages

CHUNK_ROWS = 65536


def nonfinite_message(what: str) -> str:
    """The one message: what holds NaN/Inf, and how to extract it again."""
    return (f"{what} has NaN or Inf features: re-extract it with --store-dtype float32 (float16 overflows above "
            "65504) or --precision fp32")


def check_finite(features: Any, *, what: str, chunk_rows: int = CHUNK_ROWS) -> None:
    """Raise on NaN/Inf in (n, d) rows (an array, memory map, lazy row subset or torch tensor), chunk by chunk.

    Raises:
        BadInputError: `nonfinite_message` naming ``what`` (e.g. "block 5 (cls) of split train").
    """
    for start in range(0, len(features), chunk_rows):
        chunk = features[start:start + chunk_rows]
        if hasattr(chunk, "isfinite") or type(chunk).__module__.startswith("torch"):
            import torch

            finite = bool(torch.isfinite(chunk).all())
        else:
            finite = bool(np.isfinite(chunk).all())
        release_pages(chunk)
        if not finite:
            raise BadInputError(nonfinite_message(what))


def finite_copy(features: Any, *, dtype: Any, what: str) -> np.ndarray:
    """A writable, C-contiguous ``dtype`` copy (or view) of rows, checked after the conversion.

    Raises:
        BadInputError: `nonfinite_message` naming ``what``.
    """
    if type(features).__module__.startswith("torch"):
        features = features.detach().cpu().numpy()
    array = np.require(features, dtype=dtype, requirements=("C", "W"))
    if not np.isfinite(array).all():
        raise BadInputError(nonfinite_message(what))
    return array
