"""`ProfileConfig`: the metric options of a profile (`mimprobe profile`, the ``[profile]`` spec section)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import BadInputError
from ..options import check_options, device_option, option, seed_option
from .knn_presets import PRESETS as KNN_PRESETS
from .readout import READOUTS, parse_readouts
from .registry import FAMILY_NAMES

METRICS = FAMILY_NAMES          # the --metrics words (`mimprobe.metrics.registry`)
PRESETS = tuple(KNN_PRESETS)    # the k-NN protocols (`mimprobe.metrics.knn_presets`)


def parse_bytes(text: str | None) -> int | None:
    """``"512M"``, ``"2G"``, ``"1.5GiB"``, ``"1000000"`` -> bytes (binary units); ``"none"`` -> None.

    Raises:
        BadInputError: Not a size.
    """
    if text is None or text.strip().lower() in ("none", "all", ""):
        return None
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not match:
        raise BadInputError(f"--memory-budget {text!r} is not a size: use e.g. 512M, 2G or none")
    value = float(match.group(1)) * 1024 ** " kmgt".index(match.group(2) or " ")
    if value < 1:
        raise BadInputError(f"--memory-budget {text!r} must be at least 1 byte")
    return int(value)


def parse_metrics(text: str | None) -> tuple[str, ...] | None:
    """``--metrics knn,linear`` -> ("knn", "linear"); ``all`` -> None (every metric the data allows)."""
    if text is None or text.strip() in ("", "all"):
        return None
    metrics = tuple(part.strip() for part in text.split(",") if part.strip())
    if "all" in metrics:
        raise BadInputError("--metrics all cannot be combined with other metrics: give all or a comma list")
    return metrics


@dataclass(frozen=True)
class ProfileConfig:
    """The metric options of a profile (`mimprobe profile`, the ``[profile]`` spec section, `mimprobe.profile`)."""

    metrics: tuple[str, ...] | None = option(None, f"Comma list of {', '.join(METRICS)}, or all (those the data "
                                                   "allows; label-free ones only without labels).", short="-m",
                                             parse=parse_metrics, choices=METRICS, show_default="all")
    preset: str = option("mim-refiner", "k-NN protocol: mim-refiner, dino or dinov2.", choices=PRESETS)
    probe: str = option("batched", "Linear probes: batched (all blocks at once) or sklearn (the reference).",
                        choices=("batched", "sklearn"))
    val_fraction: float = option(0.1, "Share of train carved out (seeded, stratified) as the validation split of "
                                      "k-NN on val, the probes' C and the placement.")
    seed: int = seed_option("the validation split, k-means, probes and subsets")
    device: str = device_option()  # k-NN (cuda: torch search) and the batched linear probe
    # Bytes of feature rows any metric holds at once (k-NN bank/query chunks, the probe's rows): the store's
    # memory maps are read chunk by chunk, so RSS does not grow with the number of rows. 2 GiB holds, e.g.,
    # 60,000 rows of 24 ViT-L blocks (1024 wide, float32) for the probe; None: every split read into memory.
    memory_budget: int | None = option(2 * 1024 ** 3, "Feature rows any metric holds at once, e.g. 512M, 2G, or "
                                                      "none (read every split into memory).", parse=parse_bytes,
                                       minimum=1, show_default="2G")
    rank_samples: int = option(20000, "Train rows for the effective rank (seeded subset).", minimum=1)
    # Evaluation rows for low-shot and clustering (seeded subsample when the split is larger; None: all). Their
    # fits read only the rows they choose from train (n shots or 1 % per class).
    eval_samples: int | None = option(50000, "Evaluation rows for low-shot and clustering (a seeded subset when "
                                             "the split is larger; recorded in the rows' params).", minimum=1)
    # The label-free metrics' neighbour searches grow as n^2: on labelled data the subset is also cut to k-NN's
    # evaluation queries (not below 1,000), so that each search costs less than k-NN's bank x queries
    # (benchmarks/labelfree.py: 1.7x the k-NN metric's time for all of them together on 5,000 x 192 features).
    labelfree_samples: int | None = option(2000, "Train rows for the label-free metrics (TwoNN, spectrum, entropy, "
                                                 "overlap, learnability; a seeded subset, at most the evaluation "
                                                 "split's size (>= 1,000) on labelled data; recorded in the rows' "
                                                 "params).", minimum=4)
    # Multi-block readouts trained beside the per-block linear probes (`mimprobe.metrics.readout`): DINOv2's
    # linear-evaluation inputs need a --norm final store with cls and mean poolings; all is blocks x dim wide.
    readout: tuple[str, ...] = option((), "Multi-block linear readouts, a comma list: last1, last4, last1+avg, "
                                          "last4+avg (DINOv2's: class tokens of the last n blocks, + the last "
                                          "block's mean patch token; need --norm final --pool cls,mean), all (every "
                                          "block concatenated, per pooling), or none.", parse=parse_readouts,
                                      choices=READOUTS, show_default="none")
    poolings: tuple[str, ...] | None = None  # poolings measured; None: every pooling in the store

    def __post_init__(self) -> None:
        if self.metrics is not None:
            object.__setattr__(self, "metrics", tuple(self.metrics))
        readout = parse_readouts(self.readout) if isinstance(self.readout, str) else self.readout
        object.__setattr__(self, "readout", tuple(dict.fromkeys(readout or ())))
        check_options(self)
        if self.readout and self.metrics is not None and "linear" not in self.metrics:
            raise BadInputError(f"--readout {','.join(self.readout)} is trained by the linear probe: add linear to "
                                "--metrics, or drop --readout")
        if not 0 < self.val_fraction < 1:
            raise BadInputError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")


