"""`CompareConfig`: the options of a comparison (`mimprobe compare`, the ``[compare]`` spec section)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BadInputError
from ..options import check_options, option, seed_option
from ..choices import POOLINGS

DEFAULT_RESAMPLES = 1000      # paired bootstrap resamples per interval (`mimprobe.report.bootstrap`)
DEFAULT_LEVEL = 0.95          # coverage of the intervals
DEFAULT_ROWS = 2000           # seeded subset of the evaluation split: CKA of 2,000 images is stable to ~0.01
DEFAULT_BATCH_SIZE = 256      # Gram rows per minibatch (`mimprobe.report.cka`)


@dataclass(frozen=True)
class CompareConfig:
    """Options of a comparison."""

    resamples: int = option(DEFAULT_RESAMPLES, "Paired bootstrap resamples per interval.", minimum=1)
    level: float = option(DEFAULT_LEVEL, "Coverage of the intervals.", cli=False)
    seed: int = seed_option("the bootstrap and of the CKA subset")
    cka_rows: int = option(DEFAULT_ROWS, "Evaluation images used for CKA (seeded subset).", minimum=2)
    # falls back to the first pooling both stores hold
    cka_pooling: str = option("cls", "Pooling compared by CKA (cls, mean, cls+mean).", choices=POOLINGS)
    cka_batch_size: int = option(DEFAULT_BATCH_SIZE, "Rows per CKA batch.", cli=False, spec=False, minimum=1)
    cka: bool = option(True, "Block-by-block CKA heatmap of before vs after (it reads the feature stores); "
                             "--no-cka skips it.")
    allow_different_data: bool = option(False, "Compare profiles of different datasets (no intervals, no CKA).")
    notes: str = option("", "Text shown at the top of the report (what the run does and does not show).")

    def __post_init__(self) -> None:
        check_options(self)
        if self.resamples < 1 or not 0 < self.level < 1:
            raise BadInputError(f"--resamples must be at least 1 and the level in (0, 1), got {self.resamples} "
                                f"and {self.level}")
        if self.cka_rows < 2 or self.cka_batch_size < 1:
            raise BadInputError(f"--cka-rows must be at least 2 (got {self.cka_rows}) and the CKA batch size "
                                f"positive (got {self.cka_batch_size})")


