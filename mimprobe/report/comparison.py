"""`compare`: one profile against a reference, block by block, with paired bootstrap intervals and CKA.

Blocks are 0-based (timm's ``blocks.{i}``). Two models of the same depth are compared block by block. Models of
different depths have no block-to-block correspondence: their curves are drawn against relative depth
``(block + 1) / depth`` (1 is the last block), and only the best blocks are compared (with intervals, since they
are still measured on the same images). Profiles of different datasets are refused unless allowed; then nothing
that needs the same images (intervals, CKA) is computed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..errors import BadInputError
from .config import CompareConfig
from ..placement import Placement
from .bootstrap import paired_bootstrap
from .cka import StoreCka, store_cka
from ..metrics.curves import CLASS_METRIC, Curve, curve_rows, protocol_params
from .curves import curve, curve_keys, headline_key
from .inputs import ProfileInput, find_refine_run
from .samples import SampleHits, curve_hits


@dataclass
class PairComparison:
    """One profile (``after``) against the reference (``before``).

    Tables (fractions, not percentages):

    * ``deltas``: key, pooling, block, before, after, delta, low, high (NaN without an interval); same depth only.
    * ``best``: key, pooling, before_block, before_value, after_block, after_value, delta, low, high.
    * ``class_gains``: class, before_block, before, after_block, after, gain (the headline k-NN curve's best
      blocks, ``class_pooling``).
    """

    before: ProfileInput
    after: ProfileInput
    keys: list[Curve]
    poolings: list[str]
    same_depth: bool
    same_data: bool
    deltas: pd.DataFrame
    best: pd.DataFrame
    class_gains: pd.DataFrame
    class_pooling: str | None
    headline: Curve | None
    placement: Placement | None = None
    placement_source: str = ""
    cka: StoreCka | None = None
    cka_note: str = ""
    interval_sources: dict[str, str] = field(default_factory=dict)   # curve title → where the samples came from
    notes: list[str] = field(default_factory=list)

    @property
    def relative_depth(self) -> bool:
        return not self.same_depth


def check_same_data(profiles: list[ProfileInput], *, allow_different_data: bool) -> None:
    """Profiles of different datasets are an error unless allowed.

    Raises:
        BadInputError: Different dataset fingerprints without ``allow_different_data``.
    """
    reference = profiles[0]
    for other in profiles[1:]:
        if other.fingerprint != reference.fingerprint and not allow_different_data:
            raise BadInputError(f"{reference.folder} ({reference.dataset_name}) and {other.folder} "
                                f"({other.dataset_name}) were profiled on different data: profile both on the same "
                                "data, or pass --allow-different-data (no intervals or CKA then)")


def compare(before: ProfileInput, after: ProfileInput, *, config: CompareConfig = CompareConfig(),
            placement: Placement | None = None, placement_source: str = "") -> PairComparison:
    """Compare ``after`` with ``before``: curves, per-block deltas with paired bootstrap intervals, best blocks,
    per-class gains and block-by-block CKA.

    Raises:
        BadInputError: Different data without ``config.allow_different_data``, or no curve in common.
    """
    check_same_data([before, after], allow_different_data=config.allow_different_data)
    same_data = before.fingerprint is not None and before.fingerprint == after.fingerprint
    same_depth = before.num_blocks == after.num_blocks
    rows_before, rows_after = curve_rows(before.table), curve_rows(after.table)
    keys = curve_keys(before.table, after.table, preset=before.preset)
    if not keys:
        raise BadInputError(f"{before.folder} and {after.folder} share no metric: profile both with the same "
                            "--metrics and preset")
    poolings = [p for p in dict.fromkeys(rows_before["pooling"]) if p in set(rows_after["pooling"])]
    notes: list[str] = []
    if not same_depth:
        notes.append(f"{before.label} has {before.num_blocks} blocks and {after.label} {after.num_blocks}: curves are "
                     "compared by relative depth (block + 1) / depth, and only the best blocks are compared")
    if not same_data:
        notes.append(f"{before.label} and {after.label} were profiled on different data ({before.dataset_name}, "
                     f"{after.dataset_name}): no bootstrap intervals and no CKA")
    deltas, best, sources = [], [], {}
    for key in keys:
        for pooling in poolings:
            series_before, series_after = curve(rows_before, key, pooling), curve(rows_after, key, pooling)
            if series_before.empty or series_after.empty:
                continue
            hits = _paired_hits(before, after, key, pooling, rows_before, rows_after) if same_data else None
            if hits is not None:
                sources[key.title] = hits[0].origin if hits[0].origin == hits[1].origin else \
                    f"{hits[0].origin} / {hits[1].origin}"
            if same_depth:
                deltas.append(_block_deltas(key, pooling, series_before, series_after, hits, config))
            best.append(_best_delta(key, pooling, series_before, series_after, hits, config))
    missing = [k.title for k in keys if k.has_samples and k.title not in sources]
    if same_data and missing:
        notes.append("no per-sample results for " + "; ".join(missing) + ": their differences have no interval "
                     "(a profile without its predictions.npz: re-run `mimprobe profile` to get them)")
    headline = headline_key(keys, before.preset)
    class_pooling = _class_pooling(poolings)
    class_gains = _class_gains(before, after, headline, class_pooling, rows_before, rows_after)
    comparison = PairComparison(
        before=before, after=after, keys=keys, poolings=poolings, same_depth=same_depth, same_data=same_data,
        deltas=pd.concat(deltas, ignore_index=True) if deltas else _empty_deltas(), best=pd.DataFrame(best),
        class_gains=class_gains, class_pooling=class_pooling, headline=headline, placement=placement,
        placement_source=placement_source, interval_sources=sources, notes=notes)
    comparison.notes += refinement_warnings(comparison)
    if config.cka:
        comparison.cka, comparison.cka_note = _cka(before, after, config, same_data)
    return comparison


def refinement_warnings(pair: PairComparison) -> list[str]:
    """Warnings that the refinement may not show: its exported EMA barely left the starting weights (the refine run
    folder's ``ema_progress`` below 0.5), or after and before cannot be told apart on any block of the headline
    curve (every block's paired interval holds 0)."""
    from ..refinement.schedules import ema_progress_warning

    warnings = []
    run = find_refine_run(pair.after)
    ema = ema_progress_warning(run.ema_progress) if run is not None else None
    if ema is not None:
        warnings.append(ema.replace("warning: the exported", f"warning: {pair.after.label} comes from a refinement "
                                                             f"({run.folder}) whose exported", 1))
    key, pooling = pair.headline, pair.class_pooling
    if key is not None and not pair.deltas.empty:
        rows = pair.deltas[(pair.deltas["key"] == key) & (pair.deltas["pooling"] == pooling)]
        if no_block_differs(rows):
            warnings.append(f"warning: {pair.after.label} and {pair.before.label} cannot be told apart on any block "
                            f"of {key.title} ({pooling} pooling): every block's paired interval holds 0")
    return warnings


def no_block_differs(deltas: pd.DataFrame) -> bool:
    """Whether every block of a curve's `_block_deltas` rows has a paired interval and each holds 0 (False when
    some block has no interval: nothing can be said then)."""
    low, high = deltas["low"].to_numpy(dtype=float), deltas["high"].to_numpy(dtype=float)
    if len(deltas) == 0 or not (np.isfinite(low).all() and np.isfinite(high).all()):
        return False
    return bool(((low <= 0) & (high >= 0)).all())


def _paired_hits(before: ProfileInput, after: ProfileInput, key: Curve, pooling: str, rows_before: pd.DataFrame,
                 rows_after: pd.DataFrame) -> tuple[SampleHits, SampleHits] | None:
    if not key.has_samples:
        return None
    hits_before = curve_hits(before, key, pooling, _of(rows_before, key, pooling))
    hits_after = curve_hits(after, key, pooling, _of(rows_after, key, pooling))
    if hits_before is None or hits_after is None or not hits_before.pairs_with(hits_after):
        return None
    return hits_before, hits_after


def _of(rows: pd.DataFrame, key: Curve, pooling: str) -> pd.DataFrame:
    return rows[(rows["metric"] == key.metric) & (rows["split"] == key.split) & (rows["curve_params"] == key.params)
                & (rows["pooling"] == pooling)]


def _block_deltas(key: Curve, pooling: str, before: pd.Series, after: pd.Series,
                  hits: tuple[SampleHits, SampleHits] | None, config: CompareConfig) -> pd.DataFrame:
    blocks = [b for b in before.index if b in after.index]
    frame = pd.DataFrame({"key": [key] * len(blocks), "pooling": pooling, "block": blocks,
                          "before": before[blocks].to_numpy(), "after": after[blocks].to_numpy()})
    frame["delta"] = frame["after"] - frame["before"]
    frame["low"], frame["high"] = np.nan, np.nan
    if hits is not None:
        paired = [b for b in blocks if b in hits[0].by_block and b in hits[1].by_block]
        if paired:
            interval = paired_bootstrap(np.stack([hits[0].by_block[b] for b in paired]),
                                        np.stack([hits[1].by_block[b] for b in paired]), resamples=config.resamples,
                                        level=config.level, seed=config.seed)
            where = frame["block"].isin(paired).to_numpy()
            frame.loc[where, "low"], frame.loc[where, "high"] = interval.low, interval.high
    return frame


def _best_delta(key: Curve, pooling: str, before: pd.Series, after: pd.Series,
                hits: tuple[SampleHits, SampleHits] | None, config: CompareConfig) -> dict:
    block_before, value_before = key.best(before)
    block_after, value_after = key.best(after)
    low = high = np.nan
    if hits is not None and block_before in hits[0].by_block and block_after in hits[1].by_block:
        interval = paired_bootstrap(hits[0].by_block[block_before], hits[1].by_block[block_after],
                                    resamples=config.resamples, level=config.level, seed=config.seed)
        low, high = float(interval.low[0]), float(interval.high[0])
    return {"key": key, "pooling": pooling, "before_block": block_before, "before_value": value_before,
            "after_block": block_after, "after_value": value_after, "delta": value_after - value_before, "low": low,
            "high": high}


def _class_pooling(poolings: list[str]) -> str | None:
    if not poolings:
        return None
    return "cls" if "cls" in poolings else poolings[0]


def _class_gains(before: ProfileInput, after: ProfileInput, headline: Curve | None, pooling: str | None,
                 rows_before: pd.DataFrame, rows_after: pd.DataFrame) -> pd.DataFrame:
    """Per-class k-NN accuracy at each side's best block of the headline curve."""
    columns = ["class", "before_block", "before", "after_block", "after", "gain"]
    if headline is None or pooling is None or headline.metric != "knn_top1":
        return pd.DataFrame(columns=columns)
    block_before = headline.best(curve(rows_before, headline, pooling))[0]
    block_after = headline.best(curve(rows_after, headline, pooling))[0]
    per_side = []
    for profile, block in ((before, block_before), (after, block_after)):
        table = profile.table
        rows = table[(table["metric"] == CLASS_METRIC) & (table["split"] == headline.split)
                     & (table["pooling"] == pooling) & (table["block"] == block)]
        keep = [protocol_params(p) == headline.params for p in rows["params"]]
        rows = rows[keep]
        classes = [json.loads(p)["class"] for p in rows["params"]]
        per_side.append(pd.Series(rows["value"].to_numpy(), index=classes))
    common = [c for c in per_side[0].index if c in per_side[1].index]
    if not common:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame({"class": common, "before_block": block_before, "before": per_side[0][common].to_numpy(),
                          "after_block": block_after, "after": per_side[1][common].to_numpy()})
    frame["gain"] = frame["after"] - frame["before"]
    return frame


def _cka(before: ProfileInput, after: ProfileInput, config: CompareConfig,
         same_data: bool) -> tuple[StoreCka | None, str]:
    if not same_data:
        return None, "CKA skipped: the profiles were made on different data (CKA needs the same images)"
    if before.store is None or after.store is None:
        missing = before if before.store is None else after
        return None, (f"CKA skipped: the feature store of {missing.label} ({missing.meta.get('store')}) is not "
                      "available")
    if before.store.manifest["dataset"].get("fingerprint") != after.store.manifest["dataset"].get("fingerprint"):
        return None, "CKA skipped: the two feature stores hold different images (dataset fingerprints differ)"
    poolings = [p for p in before.store.poolings if p in after.store.poolings]
    if not poolings:
        return None, "CKA skipped: the two feature stores share no pooling"
    pooling = config.cka_pooling if config.cka_pooling in poolings else poolings[0]
    split = next((s for s in ("test", "val") if s in before.store.splits and s in after.store.splits), "train")
    try:
        result = store_cka(before.store, after.store, split=split, pooling=pooling, rows=config.cka_rows,
                           seed=config.seed, batch_size=config.cka_batch_size)
    except BadInputError as error:
        return None, f"CKA skipped: {error}"
    note = (f"linear CKA (Kornblith et al. 2019, arXiv 1905.00414) of {pooling} features on {len(result.rows):,} "
            f"rows of the {split} split (seeded subset, seed {config.seed})")
    if pooling != config.cka_pooling:
        note += f"; {config.cka_pooling} pooling is not in both stores"
    return result, note


def _empty_deltas() -> pd.DataFrame:
    return pd.DataFrame(columns=["key", "pooling", "block", "before", "after", "delta", "low", "high"])
