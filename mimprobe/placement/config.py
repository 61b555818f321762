"""`PlaceConfig`: the options of a placement (`mimprobe place`, the ``[place]`` spec section, `mimprobe.place`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..blocks import parse_block_spec
from ..choices import POOLINGS
from ..errors import BadInputError
from ..options import check_options, option
from .curve import PLACEMENT_METRICS
from .labelfree import parse_rule
from .record import RULES


def parse_freeze(text: str) -> int | float:
    """``6`` -> 6 blocks (an int); ``0.25`` -> a fraction of the depth (a float, checked by `place`)."""
    try:
        return int(text) if text.strip().lstrip("+-").isdigit() else float(text)
    except ValueError:
        raise BadInputError(f"invalid --freeze {text!r}: give a number of blocks (6) or a fraction (0.25)") from None


def _placement_blocks(text: str) -> int | tuple[int, ...]:
    """``--blocks 8,9,10,11`` or ``8-11`` (rule explicit), ``last:4`` (rule last-n, as an int)."""
    spec = parse_block_spec(text)
    if spec is None:
        raise BadInputError("--blocks all is not a placement: list the blocks (8,9,10,11 or 8-11), or use last:N")
    return spec if isinstance(spec, int) else tuple(spec)


@dataclass(frozen=True)
class PlaceConfig:
    """Where the heads go. ``rule`` defaults to ``peak``, to ``explicit`` with ``blocks`` and to ``last-n`` with ``n``
    (or ``blocks="last:N"``)."""

    rule: str | None = option(None, "peak, last-n, explicit, or label-free[:METRIC] for profiles without labels "
                                    "(default metric twonn_id) [default: peak; explicit with --blocks, last-n "
                                    "with --n].")
    metric: str = option("knn", "Curve of the peak rule: knn (k-NN top-1 on val) or linear (linear-probe top-1 on "
                                "val).", short="-m", choices=PLACEMENT_METRICS)
    pooling: str = option("cls", "Pooling of the curve: cls, mean or cls+mean.", short="-p", choices=POOLINGS)
    max_heads: int | None = option(None, "Peak and label-free rules: at most N heads, spaced evenly to the last block "
                                         "(which always gets one).", minimum=1)
    plateau: float | None = option(None, "Peak rule: blocks within this accuracy fraction of the peak belong to its "
                                         "plateau (0.005 = half a point) [default: 1.96 sqrt(2) standard errors of "
                                         "the validation curve].")
    n: int | None = option(None, "Rule last-n: heads on the last N blocks.", minimum=1)
    blocks: int | tuple[int, ...] | None = option(None, "Explicit 0-based blocks such as 8,9,10,11 or 8-11 (negative "
                                                        "from the end), or last:N.", short="-b",
                                                  parse=_placement_blocks)
    freeze: int | float | None = option(None, "Freeze the first N blocks (6) or a fraction of them (0.25); all before "
                                              "the first head.", parse=parse_freeze)

    def __post_init__(self) -> None:
        blocks = self.blocks
        if isinstance(blocks, Sequence) and not isinstance(blocks, str):
            object.__setattr__(self, "blocks", tuple(int(block) for block in blocks))
        if isinstance(blocks, int) and not isinstance(blocks, bool):  # last:N is rule last-n
            if self.n is not None:
                raise BadInputError("give either --blocks last:N or --n, not both")
            object.__setattr__(self, "n", blocks)
            object.__setattr__(self, "blocks", None)
            object.__setattr__(self, "rule", self.rule or "last-n")
        if self.blocks is not None and self.n is not None:
            raise BadInputError("give either --blocks (rule explicit) or --n (rule last-n), not both")
        check_options(self)
        if self.rule is not None:
            rule, _ = parse_rule(self.rule)
            if rule not in RULES:
                raise BadInputError(f"unknown --rule {self.rule!r}: use {', '.join(RULES[:-1])} or "
                                    "label-free[:METRIC]")
        for name, owner in (("max_heads", "peak"), ("n", "last-n"), ("blocks", "explicit")):
            if getattr(self, name) is not None and self.resolved_rule != owner \
                    and not (name == "max_heads" and self.resolved_rule == "label-free"):
                raise BadInputError(f"--{name.replace('_', '-')} belongs to rule {owner}, not {self.resolved_rule}: "
                                    f"drop it, or use --rule {owner}")

    @property
    def resolved_rule(self) -> str:
        if self.rule is not None:
            return parse_rule(self.rule)[0]
        return "explicit" if self.blocks is not None else "last-n" if self.n is not None else "peak"

    @property
    def labelfree_metric(self) -> str | None:
        """The label-free curve of rule ``label-free[:METRIC]`` (None for the other rules)."""
        return parse_rule(self.rule)[1] if self.rule is not None else None

    def place_options(self) -> dict:
        """Keywords of `mimprobe.placement.place`."""
        return {"rule": self.resolved_rule, "labelfree_metric": self.labelfree_metric, "metric": self.metric,
                "pooling": self.pooling,
                "max_heads": self.max_heads, "plateau": self.plateau, "freeze": self.freeze,
                "blocks": None if self.blocks is None else list(self.blocks), "n": self.n}
