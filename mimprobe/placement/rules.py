"""`place`: the head blocks of a refinement from a profile table (rules peak, last-n, explicit), and freezing."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..errors import BadInputError
from .curve import LABELS, ValidationCurve, validation_curve
from ..metrics.labelfree.calibration import RULES as PICK_RULES
from .labelfree import DEFAULT_METRIC as DEFAULT_LABEL_FREE
from .labelfree import calibration_caveat, label_free_pick
from .record import RULES, Placement, PlacementInputs

# Half an accuracy point. Blocks closer to the peak than this are indistinguishable on a validation split of a few
# thousand images: the binomial standard error of an accuracy near 80 % on 5,000 images is
# sqrt(0.8 * 0.2 / 5000) = 0.0057, so a smaller tolerance would let noise decide where the plateau starts.
DEFAULT_PLATEAU = 0.005
# Without --plateau the tolerance follows the curve's noise: a block is on the plateau unless it is significantly
# below the peak by a two-sided 95 % two-proportion test, |peak - value| > 1.96 sqrt(2) SE with the binomial
# SE = sqrt(p (1 - p) / n) at the peak on the n validation images (sqrt(2): the difference of two accuracies; the
# blocks share their images, so this is conservative). 5,000 images at 80 % give 1.6 points; 200 at 50 % give 9.8.
SE_MULTIPLIER = 1.959963984540054 * math.sqrt(2)
# A validation curve whose standard error exceeds a point cannot place heads block by block: warn.
NOISY_SE = 0.01
# When no block is distinguishable from the peak (a flat curve within its noise) the curve says nothing about where
# the plateau starts: heads then go on the last third of the blocks, MIM-Refiner's ViT-L layout (8 heads on blocks
# 17-24 of 24, arXiv 2402.10093), instead of on every block.
FLAT_SHARE = 1 / 3
# "Flat": a chi-square test of homogeneity of the block accuracies (each on the same n images, treated as
# independent binomials) does not reject equal accuracy at 5 %, or no block falls outside the plateau.
FLAT_PVALUE = 0.05
_TIE = 1e-9  # float slack when comparing accuracies with peak - plateau (e.g. 0.875 vs 0.88 - 0.005)


def place(table: pd.DataFrame | None, *, num_blocks: int, rule: str = "peak", metric: str = "knn",
          pooling: str = "cls", max_heads: int | None = None, plateau: float | None = None,
          freeze: int | float | None = None, blocks: Sequence[int] | None = None, n: int | None = None,
          preset: str | None = None, k: int | None = None, source: str | None = None,
          val_images: int | None = None, labelfree_metric: str | None = None,
          calibration: list[dict] | None = None) -> Placement:
    """Choose the head blocks (and frozen blocks) of a refinement from a profile table.

    Args:
        table: The profile's long table (``profile.parquet`` / ``.csv``). Required by rule ``peak``; with the other
            rules it may be None, else its validation curve is recorded for the report.
        num_blocks: Depth of the model (block indices are 0..num_blocks-1).
        rule: ``peak``, ``last-n`` or ``explicit`` (see the module docstring).
        metric: ``knn`` (k-NN top-1 on val) or ``linear`` (linear probe top-1 on val).
        pooling: Pooling of the curve (the heads read the CLS token; ``cls`` is MIM-Refiner's signal).
        max_heads: Rule ``peak``: at most this many heads, spaced evenly from the plateau start to the last block.
        plateau: Rule ``peak``: blocks within this accuracy fraction of the peak count as the peak (0.005 = half a
            point). None (default): 1.96 sqrt(2) binomial standard errors of the peak on ``val_images`` images
            (`SE_MULTIPLIER`), or `DEFAULT_PLATEAU` when ``val_images`` is unknown; a curve flat within that noise
            gets heads on its last third of blocks (`FLAT_SHARE`) and a warning.
        freeze: Number of first blocks to freeze (int), or a fraction of the depth in (0, 1).
        blocks: Rule ``explicit``: block indices, negative from the end.
        n: Rule ``last-n``: how many last blocks.
        preset, k: The k-NN protocol when the profile holds several.
        source: Where the table came from (recorded).
        val_images: Images of the curve's validation split (``predictions.npz``'s rows), for the standard error.
        labelfree_metric: Rule ``label-free``: the label-free curve (`mimprobe.placement.labelfree`).
        calibration: The profile's label-free vs k-NN calibration records (profile.json), quoted in the reason.

    Raises:
        BadInputError: An unknown rule, options that do not belong to the rule, a missing metric or validation
            split, out-of-range blocks, heads, counts or freeze.
    """
    if rule not in RULES:
        raise BadInputError(f"unknown placement rule {rule!r}: use {', '.join(RULES)}")
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, (int, np.integer)) or num_blocks < 1:
        raise BadInputError(f"num_blocks must be a positive number of blocks, got {num_blocks!r}")
    num_blocks = int(num_blocks)
    for option, value, owner in (("max_heads", max_heads, "peak"), ("n", n, "last-n"), ("blocks", blocks, "explicit")):
        if value is not None and rule != owner and not (option == "max_heads" and rule == "label-free"):
            raise BadInputError(f"--{option.replace('_', '-')} belongs to rule {owner}, not {rule}: drop it, or use "
                                f"--rule {owner}")
    if max_heads is not None and (isinstance(max_heads, bool) or int(max_heads) != max_heads or max_heads < 1):
        raise BadInputError(f"--max-heads must be a whole number of at least 1, got {max_heads!r}")
    if plateau is not None and (isinstance(plateau, bool) or not math.isfinite(float(plateau)) or not 0 <= plateau < 1):
        raise BadInputError(f"--plateau {plateau!r} must be an accuracy fraction in [0, 1), e.g. 0.005 for half a "
                            "point")
    if rule == "last-n" and n is None:
        raise BadInputError("rule last-n needs --n: the number of last blocks that get heads")
    if rule == "explicit" and blocks is None:
        raise BadInputError("rule explicit needs --blocks, e.g. --blocks 8,9,10,11")

    if rule == "label-free":
        return _label_free_placement(table, num_blocks=num_blocks, metric=labelfree_metric or DEFAULT_LABEL_FREE,
                                     pooling=pooling, max_heads=max_heads, freeze=freeze, calibration=calibration,
                                     source=source)
    curve: ValidationCurve | None = None
    notes: list[str] = []
    if rule == "peak":
        if table is None:
            raise BadInputError("rule peak needs a profile table; give one, or use --rule last-n or --blocks")
        curve = validation_curve(table, metric=metric, pooling=pooling, preset=preset, k=k)
    elif table is not None:
        try:
            curve = validation_curve(table, metric=metric, pooling=pooling, preset=preset, k=k)
        except BadInputError as error:  # the rule does not need the curve; say why it is not recorded
            notes.append(f"no validation curve recorded: {error}")
    notes += list(curve.notes) if curve else []

    peak_block = peak_value = plateau_start = None
    plateau_from, flat = ("fixed" if plateau is not None or not val_images else "standard error"), False
    homogeneity = 1.0
    if curve is not None:
        tolerance = plateau
        if plateau is None:
            peak = max(value for _, value in curve.values)
            tolerance = SE_MULTIPLIER * binomial_se(peak, val_images) if val_images else DEFAULT_PLATEAU
            if not val_images and rule == "peak":
                notes.append(f"the size of the validation split is unknown (no predictions.npz beside the profile): "
                             f"fixed plateau {DEFAULT_PLATEAU * 100:g} points; re-run `mimprobe profile` to get one "
                             "that follows the curve's standard error")
        peak_block, peak_value, plateau_start = _peak_and_plateau(curve.values, tolerance)
        plateau = float(tolerance)
        if val_images:
            se = binomial_se(peak_value, val_images)
            if se > NOISY_SE:
                notes.append(f"warning: the validation split holds {val_images:,} images: one image moves the curve "
                             f"{100 / val_images:.2g} points and its standard error at the peak is {100 * se:.1f} "
                             f"points, so blocks within {100 * SE_MULTIPLIER * se:.1f} points of the peak cannot be "
                             "told apart; profile with more images or a larger --val-fraction")
        if plateau_from == "standard error" and len(curve.values) > 1:
            homogeneity = flat_curve_pvalue([value for _, value in curve.values], val_images)
            flat = plateau_start == curve.values[0][0] or homogeneity >= FLAT_PVALUE
        if curve.values[-1][0] >= num_blocks:
            raise BadInputError(f"the profile has block {curve.values[-1][0]} but the model has {num_blocks} blocks: "
                                "give the profile of this model")
        first_profiled = curve.values[0][0]
        if rule == "peak" and plateau_start == first_profiled and first_profiled > 0:
            notes.append(f"the profile starts at block {first_profiled}: the plateau may begin earlier; profile "
                         "all blocks to know")

    if rule == "peak":
        label, where = LABELS[metric], _split_phrase(curve.split)
        within = (f"{plateau * 100:.1f} points (1.96 sqrt(2) standard errors on {val_images:,} images)"
                  if plateau_from == "standard error" else f"{plateau * 100:g} points")
        start = plateau_start
        if flat:  # --max-heads still caps the count, spaced over these blocks
            start = num_blocks - math.ceil(FLAT_SHARE * num_blocks)
            if homogeneity >= FLAT_PVALUE:
                why = (f"the validation curve does not vary with depth beyond its binomial noise (homogeneity test "
                       f"p = {homogeneity:.2f} over {len(curve.values)} blocks; peak-to-block tolerance "
                       f"{plateau * 100:.1f} points)")
            else:  # it varies, but the tolerance is so wide that the first block already lies on the plateau
                why = (f"the validation curve varies with depth (homogeneity test p = {homogeneity:.2g} over "
                       f"{len(curve.values)} blocks), but every block from the first lies within the peak-to-block "
                       f"tolerance of {plateau * 100:.1f} points")
            notes.append(f"warning: {why}: it cannot say where the plateau starts, so heads go on the last third of "
                         f"the blocks ({start}-{num_blocks - 1}, MIM-Refiner's ViT-L layout) instead of all; profile "
                         "more validation images, or choose with --plateau or --rule last-n")
        heads = _spaced(start, num_blocks - 1, max_heads)
        how = _heads_phrase(heads, start, num_blocks - 1)
        reason = (f"{label} on {where} ({pooling}) peaks at block {peak_block} ({100 * peak_value:.1f} %); the "
                  f"plateau within {within} starts at block {plateau_start}, so " + (
                      ("the curve is flat within its noise" if homogeneity >= FLAT_PVALUE else
                       "the noise cannot locate the plateau's start") + f" and the last third (flat curve) gets the "
                      f"heads: {how}"
                      if flat else how))
    else:
        heads = _requested_blocks(rule, n=n, blocks=blocks, num_blocks=num_blocks)
        reason = (f"rule last-n: heads on the last {len(heads)} blocks ({_span(heads)})" if rule == "last-n" else
                  f"rule explicit: heads on the blocks given ({', '.join(map(str, heads))})")

    if table is not None and rule == "peak":  # where the label-free rule would have put them, for comparison
        try:
            picked, _ = label_free_pick(table, DEFAULT_LABEL_FREE, pooling)
        except BadInputError:
            pass
        else:
            notes.append(f"the label-free rule ({DEFAULT_LABEL_FREE}) would start the heads at block {picked} "
                         f"(this rule: block {heads[0]}); "
                         f"{calibration_caveat(calibration, DEFAULT_LABEL_FREE, pooling)}")
    reason, freeze_blocks = _with_freeze(reason, freeze, num_blocks, heads)
    models = sorted(set(table["model"].dropna().astype(str))) if table is not None and "model" in table else []
    inputs = PlacementInputs(
        metric=metric, pooling=pooling, plateau=float(DEFAULT_PLATEAU if plateau is None else plateau),
        plateau_from=plateau_from, val_images=None if val_images is None else int(val_images),
        metric_name=curve.metric_name if curve else None,
        split=curve.split if curve else None,
        params_json=json.dumps(curve.params if curve else {}, sort_keys=True, separators=(",", ":")),
        curve=curve.values if curve else (), max_heads=None if max_heads is None else int(max_heads),
        n=None if n is None else int(n), blocks=None if blocks is None else tuple(int(b) for b in blocks),
        freeze=None if freeze is None else (float(freeze) if isinstance(freeze, (float, np.floating)) else int(freeze)))
    return Placement(rule=rule, num_blocks=num_blocks, head_blocks=heads, freeze_blocks=freeze_blocks,
                     reason=reason + ".", inputs=inputs, peak_block=peak_block, peak_value=peak_value,
                     plateau_start=plateau_start, notes=tuple(notes), model=models[0] if len(models) == 1 else None,
                     source=source)


def _with_freeze(reason: str, freeze: int | float | None, num_blocks: int,
                 heads: tuple[int, ...]) -> tuple[str, int]:
    """The frozen block count, checked against the first head, and the reason that says it."""
    freeze_blocks = freeze_count(freeze, num_blocks)
    if freeze_blocks > heads[0]:
        raise BadInputError(f"freeze {freeze} keeps blocks 0-{freeze_blocks - 1} frozen but block {heads[0]} has a "
                            f"head: freeze at most {heads[0]} blocks")
    if freeze_blocks:
        share = f", {freeze * 100:g} % of {num_blocks} rounded" if isinstance(freeze, (float, np.floating)) else ""
        reason += f"; the first {freeze_blocks} blocks (0-{freeze_blocks - 1}{share}) stay frozen"
    return reason, freeze_blocks


def _label_free_placement(table: pd.DataFrame | None, *, num_blocks: int, metric: str, pooling: str,
                          max_heads: int | None, freeze: int | float | None, calibration: list[dict] | None,
                          source: str | None) -> Placement:
    """Rule label-free: heads from the block the metric's published rule picks to the last block."""
    if table is None:
        raise BadInputError("rule label-free needs a profile table with label-free rows")
    picked, curve = label_free_pick(table, metric, pooling)
    if curve[-1][0] >= num_blocks:
        raise BadInputError(f"the profile has block {curve[-1][0]} but the model has {num_blocks} blocks: give the "
                            "profile of this model")
    heads = _spaced(picked, num_blocks - 1, max_heads)
    rule_text = PICK_RULES[metric].pick.replace("_", " ")
    reason = (f"label-free rule: {metric} on the train split ({pooling}) picks block {picked} ({rule_text}), so "
              f"{_heads_phrase(heads, picked, num_blocks - 1)}; {calibration_caveat(calibration, metric, pooling)}")
    reason, freeze_blocks = _with_freeze(reason, freeze, num_blocks, heads)
    models = sorted(set(table["model"].dropna().astype(str))) if "model" in table else []
    inputs = PlacementInputs(metric=metric, pooling=pooling, plateau=0.0, metric_name=metric, split="train",
                             curve=curve, max_heads=None if max_heads is None else int(max_heads),
                             freeze=None if freeze is None else (float(freeze) if isinstance(freeze, float)
                                                                 else int(freeze)))
    return Placement(rule="label-free", num_blocks=num_blocks, head_blocks=heads, freeze_blocks=freeze_blocks,
                     reason=reason + ".", inputs=inputs, peak_block=picked,
                     peak_value=dict(curve)[picked], plateau_start=picked,
                     notes=("warning: placed without labels: the label-free pick is a published rule, not a "
                            "measurement of this model's best block",) if not calibration else (),
                     model=models[0] if len(models) == 1 else None, source=source)


def flat_curve_pvalue(values: Sequence[float], n: int) -> float:
    """p-value of Pearson's chi-square test that every block has the same accuracy, each value a proportion of
    ``n`` images: sum((x - mean)^2) / (mean (1 - mean) / n) ~ chi2(blocks - 1) (1.0 for a curve at 0 or 1)."""
    from scipy.special import gammaincc  # chi2 survival function: Q(dof / 2, x / 2); scipy.stats is slower to import

    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if mean <= 0 or mean >= 1:
        return 1.0
    statistic = float(((values - mean) ** 2).sum() / (mean * (1 - mean) / n))
    return float(gammaincc((len(values) - 1) / 2, statistic / 2))


def binomial_se(p: float, n: int) -> float:
    """sqrt(p (1 - p) / n): the standard error of an accuracy p on n images (here, not `mimprobe.metrics`, whose
    package import would load the feature store and torch into `place`)."""
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def _requested_blocks(rule: str, *, n: int | None, blocks: Sequence[int] | None, num_blocks: int) -> tuple[int, ...]:
    """Rules last-n and explicit, through the one definition of "which blocks"."""
    from ..blocks import resolve_blocks  # imports timm (hence torch): only the rules that need it pay for it

    if rule == "last-n":
        if isinstance(n, bool) or int(n) != n:
            raise BadInputError(f"--n must be a whole number of blocks, got {n!r}")
        return tuple(resolve_blocks(int(n), num_blocks))
    if isinstance(blocks, (str, bytes)) or any(isinstance(b, bool) or int(b) != b for b in blocks):
        raise BadInputError(f"--blocks must be whole block numbers, got {blocks!r}")
    return tuple(resolve_blocks([int(b) for b in blocks], num_blocks))


def _peak_and_plateau(values: tuple[tuple[int, float], ...], plateau: float) -> tuple[int, float, int]:
    """The first block of maximal value, its value, and the first block of the contiguous run of blocks at or
    above ``peak - plateau`` that contains the peak (walking backwards over the profiled blocks)."""
    blocks = [block for block, _ in values]
    scores = np.array([value for _, value in values])
    peak = int(np.argmax(scores))  # the first maximum on ties
    start = peak
    while start > 0 and scores[start - 1] >= scores[peak] - plateau - _TIE:
        start -= 1
    return blocks[peak], float(scores[peak]), blocks[start]


def _spaced(start: int, last: int, max_heads: int | None) -> tuple[int, ...]:
    """Blocks start..last, or ``max_heads`` of them evenly spaced with both ends kept (rounded half up)."""
    count = last - start + 1
    if max_heads is None or max_heads >= count:
        return tuple(range(start, last + 1))
    if max_heads == 1:
        return (last,)
    # spacing (count - 1) / (max_heads - 1) >= 1, so rounding never merges two heads; unique() is a safeguard
    spaced = np.floor(np.linspace(start, last, int(max_heads)) + 0.5).astype(int)
    return tuple(int(b) for b in np.unique(spaced))


def _span(blocks: tuple[int, ...]) -> str:
    return f"{blocks[0]}-{blocks[-1]}" if len(blocks) > 1 else str(blocks[0])


def _split_phrase(split: str) -> str:
    if split == "train-loo":
        return "the train split, leave-one-out (the profile has no validation split)"
    return "the validation split"


def _heads_phrase(heads: tuple[int, ...], start: int, last: int) -> str:
    if len(heads) == 1:
        return f"one head goes on the last block, {last}"
    if len(heads) == last - start + 1:
        return f"heads go on every block from {start} to {last} ({len(heads)} heads)"
    return f"{len(heads)} heads are spaced evenly over blocks {start}-{last}, the last block included"


def freeze_count(freeze: int | float | None, num_blocks: int) -> int:
    if freeze is None:
        return 0
    if isinstance(freeze, bool) or not isinstance(freeze, (int, float, np.integer, np.floating)):
        raise BadInputError(f"--freeze must be a number of blocks or a fraction in (0, 1), got {freeze!r}")
    if isinstance(freeze, (float, np.floating)):
        if not 0 < freeze < 1:
            raise BadInputError(f"--freeze {freeze:g} is out of range: give a fraction in (0, 1) such as 0.25, or a "
                                f"whole number of blocks 0..{num_blocks - 1}")
        return int(math.floor(freeze * num_blocks + 0.5))
    if not 0 <= freeze < num_blocks:
        raise BadInputError(f"--freeze {freeze} is out of range: the model has {num_blocks} blocks; freeze "
                            f"0..{num_blocks - 1} of them, or give a fraction such as 0.25")
    return int(freeze)
