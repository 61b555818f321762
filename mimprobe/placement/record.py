"""`Placement`: the chosen head blocks, the frozen blocks and the reason, with a validated JSON form."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import BadInputError

FORMAT_VERSION = 1
RULES = ("peak", "last-n", "explicit", "label-free")
WARNING_PREFIX = "warning: "


def note_line(note: str) -> str:
    """A placement note as printed: warnings keep their own ``warning:`` prefix, other notes get ``note:``."""
    return note if note.startswith(WARNING_PREFIX) else f"note: {note}"


@dataclass(frozen=True)
class PlacementInputs:
    """What the rule looked at: the validation curve and the options, as recorded in placement.json."""

    metric: str                                  # "knn" or "linear"
    pooling: str
    plateau: float                               # tolerance below the peak, as an accuracy fraction
    metric_name: str | None = None               # the table's metric: "knn_top1" or "linear_val_top1"
    split: str | None = None                     # "val", or "train-loo" when the profile has no validation split
    params_json: str = "{}"                      # the k-NN protocol of the curve (canonical JSON, as in the table)
    curve: tuple[tuple[int, float], ...] = ()    # (block, value) per profiled block; empty when no curve was found
    max_heads: int | None = None
    n: int | None = None
    blocks: tuple[int, ...] | None = None        # as requested (before resolving negative indices)
    freeze: int | float | None = None            # as requested (count or fraction)
    plateau_from: str = "fixed"                  # "standard error" (from val_images) or "fixed" (--plateau, default)
    val_images: int | None = None                # images of the curve's split (predictions.npz), when known

    @property
    def params(self) -> dict[str, Any]:
        return json.loads(self.params_json)

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "metric_name": self.metric_name, "split": self.split, "pooling": self.pooling,
                "params": self.params, "plateau": self.plateau, "max_heads": self.max_heads, "n": self.n,
                "blocks": None if self.blocks is None else list(self.blocks), "freeze": self.freeze,
                "curve": {str(block): value for block, value in self.curve}, "plateau_from": self.plateau_from,
                "val_images": self.val_images}

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> PlacementInputs:
        blocks = payload.get("blocks")
        return cls(metric=str(payload["metric"]), pooling=str(payload["pooling"]), plateau=float(payload["plateau"]),
                   metric_name=payload.get("metric_name"), split=payload.get("split"),
                   params_json=json.dumps(payload.get("params") or {}, sort_keys=True, separators=(",", ":")),
                   curve=tuple((int(block), float(value)) for block, value in (payload.get("curve") or {}).items()),
                   max_heads=payload.get("max_heads"), n=payload.get("n"),
                   blocks=None if blocks is None else tuple(int(b) for b in blocks), freeze=payload.get("freeze"),
                   plateau_from=str(payload.get("plateau_from") or "fixed"),
                   val_images=_optional(payload.get("val_images"), int))


@dataclass(frozen=True)
class Placement:
    """Which blocks get refinement heads (0-based, sorted), how many first blocks stay frozen, and why."""

    rule: str
    num_blocks: int
    head_blocks: tuple[int, ...]
    freeze_blocks: int                          # the first freeze_blocks blocks (0 .. freeze_blocks - 1) are frozen
    reason: str                                 # one sentence for humans (CLI, report)
    inputs: PlacementInputs
    peak_block: int | None = None               # of the validation curve, when the profile has one
    peak_value: float | None = None
    plateau_start: int | None = None
    notes: tuple[str, ...] = ()                 # which k-NN protocol, fallbacks, partial profiles
    model: str | None = None
    source: str | None = None                   # the profile folder it was computed from
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the content of placement.json without ``versions``)."""
        return {"format_version": self.format_version, "rule": self.rule, "model": self.model,
                "source": self.source, "num_blocks": self.num_blocks, "head_blocks": list(self.head_blocks),
                "freeze_blocks": self.freeze_blocks, "peak_block": self.peak_block, "peak_value": self.peak_value,
                "plateau_start": self.plateau_start, "reason": self.reason, "notes": list(self.notes),
                "inputs": self.inputs.to_dict()}

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> Placement:
        """Rebuild and validate a placement; ``versions`` (written by `run_place`) is accepted and ignored.

        Raises:
            BadInputError: A missing or unknown key, a newer format, or blocks that contradict each other.
        """
        if not isinstance(payload, dict):
            raise BadInputError("a placement must be a JSON object; write one with `mimprobe place PROFILE`")
        required = {"format_version", "rule", "num_blocks", "head_blocks", "freeze_blocks", "reason", "inputs"}
        known = required | {"model", "source", "peak_block", "peak_value", "plateau_start", "notes", "versions"}
        missing, unknown = sorted(required - set(payload)), sorted(set(payload) - known)
        if missing or unknown:
            problem = f"missing keys {', '.join(missing)}" if missing else f"unknown keys {', '.join(unknown)}"
            raise BadInputError(f"not a placement: {problem}; write one with `mimprobe place PROFILE`")
        if payload["format_version"] != FORMAT_VERSION:
            raise BadInputError(f"placement format {payload['format_version']!r} is not {FORMAT_VERSION}, the one "
                                "this mimprobe reads: re-run `mimprobe place` with this version")
        try:
            placement = cls(
                rule=str(payload["rule"]), num_blocks=int(payload["num_blocks"]),
                head_blocks=tuple(int(b) for b in payload["head_blocks"]), freeze_blocks=int(payload["freeze_blocks"]),
                reason=str(payload["reason"]), inputs=PlacementInputs.from_dict(payload["inputs"]),
                peak_block=_optional(payload.get("peak_block"), int), peak_value=_optional(payload.get("peak_value"),
                                                                                           float),
                plateau_start=_optional(payload.get("plateau_start"), int),
                notes=tuple(str(note) for note in payload.get("notes") or ()), model=payload.get("model"),
                source=payload.get("source"), format_version=FORMAT_VERSION)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise BadInputError(f"not a valid placement ({type(error).__name__}: {error}); write one with "
                                "`mimprobe place PROFILE`") from None
        _check_consistent(placement)
        return placement


def _optional(value: Any, kind: type) -> Any:
    return None if value is None else kind(value)


def _check_consistent(placement: Placement) -> None:
    heads, num_blocks = placement.head_blocks, placement.num_blocks
    if placement.rule not in RULES:
        raise BadInputError(f"placement rule {placement.rule!r} is unknown: use {', '.join(RULES)}")
    if num_blocks < 1 or not heads or list(heads) != sorted(set(heads)) or not 0 <= heads[0] <= heads[-1] < num_blocks:
        raise BadInputError(f"placement head blocks {list(heads)} are not sorted unique blocks of 0..{num_blocks - 1}: "
                            "re-run `mimprobe place`")
    if not 0 <= placement.freeze_blocks <= heads[0]:
        raise BadInputError(f"placement freezes {placement.freeze_blocks} blocks but block {heads[0]} has a head: "
                            "re-run `mimprobe place`")
