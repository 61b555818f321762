"""The comparison when the two models peak at different blocks (the usual case after refinement), and CKA on a
seeded subset smaller than the split: the paths the session fixtures (equal best blocks, fewer rows than the CKA
subset) never reach."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from mimprobe.metrics.predictions import SamplePredictions
from mimprobe.report import CompareConfig, linear_cka
from mimprobe.report.bootstrap import paired_bootstrap
from mimprobe.report.cka import store_cka, subset_rows
from mimprobe.report.comparison import compare
from mimprobe.metrics.curves import curve_rows
from mimprobe.report.curves import curve
from mimprobe.report.inputs import load_profile

CONFIG = CompareConfig(resamples=300, cka=False)
HEADLINES = (("knn_top1", "test"), ("linear_top1", "test"))


def _relabel_blocks(profile, mapping: dict[int, int]):
    """The same profile with block b's rows and per-sample results filed under block mapping[b]: a model whose
    blocks behave as this one's, in another order."""
    table = profile.table.copy()
    table["block"] = table["block"].map(mapping)
    old = profile.predictions
    predictions = SamplePredictions(sources=dict(old.sources), rows=dict(old.rows),
                                    hits={split: {(m, mapping[b], p, q): hits for (m, b, p, q), hits in entries.items()}
                                          for split, entries in old.hits.items()})
    return replace(profile, table=table, predictions=predictions)


def _best_blocks(profile) -> dict[tuple[str, str, str], int]:
    rows = curve_rows(profile.table)
    best = {}
    for metric, split in HEADLINES:
        for pooling in ("cls", "mean"):
            selected = rows[(rows["metric"] == metric) & (rows["split"] == split) & (rows["pooling"] == pooling)]
            if metric == "knn_top1":
                selected = selected[selected["params"].str.contains('"k":10')]
            best[(metric, split, pooling)] = int(selected.loc[selected["value"].idxmax(), "block"])
    return best


@pytest.fixture(scope="module")
def shifted_pair(profiles):
    """(before, after) where after's best block differs from before's on every headline curve."""
    before, after = load_profile(profiles.before, label="base"), load_profile(profiles.after, label="refined")
    best_before = _best_blocks(before)
    for shift in range(1, 6):
        moved = _relabel_blocks(after, {b: (b + shift) % 6 for b in range(6)})
        best_after = _best_blocks(moved)
        if all(best_after[key] != best_before[key] for key in best_before):
            return before, moved
    pytest.fail("no block shift separates the best blocks")  # cannot happen with 6 blocks and 4 curves


def _hits_at(profile, key, pooling: str, block: int) -> np.ndarray:
    rows = curve_rows(profile.table)
    row = rows[(rows["metric"] == key.metric) & (rows["split"] == key.split) & (rows["curve_params"] == key.params)
               & (rows["pooling"] == pooling) & (rows["block"] == block)]
    return profile.predictions.get(metric=key.metric, split=key.split, block=block, pooling=pooling,
                                   params=row["params"].item())


def test_best_block_intervals_pair_each_side_at_its_own_best_block(shifted_pair):
    """The best-block difference is after's best against before's best, and its interval is the paired bootstrap
    of exactly those two blocks' per-sample results."""
    before, after = shifted_pair
    pair = compare(before, after, config=CONFIG)
    rows_before, rows_after = curve_rows(before.table), curve_rows(after.table)
    checked = 0
    for record in pair.best.to_dict(orient="records"):
        key, pooling = record["key"], record["pooling"]
        block_before, value_before = key.best(curve(rows_before, key, pooling))
        block_after, value_after = key.best(curve(rows_after, key, pooling))
        assert (record["before_block"], record["after_block"]) == (block_before, block_after)
        assert record["delta"] == pytest.approx(value_after - value_before)
        if not key.has_samples:
            continue
        hits_before, hits_after = _hits_at(before, key, pooling, block_before), _hits_at(after, key, pooling,
                                                                                         block_after)
        assert hits_after.mean() == pytest.approx(value_after)
        expected = paired_bootstrap(hits_before, hits_after, resamples=CONFIG.resamples, level=CONFIG.level,
                                    seed=CONFIG.seed)
        assert (record["low"], record["high"]) == pytest.approx((expected.low[0], expected.high[0]))
        assert record["low"] - 1e-12 <= record["delta"] <= record["high"] + 1e-12
        checked += block_before != block_after
    assert checked >= 4  # at least k-NN and linear on test, cls and mean, peak at different blocks


def test_per_class_gains_read_each_side_at_its_own_best_block(shifted_pair):
    before, after = shifted_pair
    pair = compare(before, after, config=CONFIG)
    gains = pair.class_gains.set_index("class")
    headline, pooling = pair.headline, pair.class_pooling
    assert headline.metric == "knn_top1" and pooling == "cls"
    blocks = [headline.best(curve(curve_rows(side.table), headline, pooling))[0] for side in (before, after)]
    assert blocks[0] != blocks[1]
    assert gains["before_block"].unique().tolist() == [blocks[0]] and gains["after_block"].unique().tolist() == [
        blocks[1]]
    for side, block, column in ((before, blocks[0], "before"), (after, blocks[1], "after")):
        table = side.table
        rows = table[(table["metric"] == "knn_class_top1") & (table["split"] == "test") & (table["pooling"] == pooling)
                     & (table["block"] == block) & table["params"].str.contains('"k":10')]
        assert len(rows) == 4
        for params, value in zip(rows["params"], rows["value"]):
            assert gains.loc[json.loads(params)["class"], column] == value
    np.testing.assert_allclose(gains["gain"], gains["after"] - gains["before"])


def test_cka_on_a_subset_reads_the_same_images_from_both_stores(profiles):
    """32 test images, 16 in the CKA subset: both stores' rows are the same seeded images, so a store against
    itself gives 1 on the diagonal, and each value is linear CKA of those rows."""
    before, after = load_profile(profiles.before).store, load_profile(profiles.after).store
    itself = store_cka(before, before, split="test", rows=16, seed=3)
    assert len(itself.rows) == 16 and len(before.labels("test")) == 32
    np.testing.assert_allclose(np.diag(itself.values), 1.0, atol=1e-6)
    result = store_cka(before, after, split="test", rows=16, seed=3)
    chosen = subset_rows(32, 16, seed=3)
    np.testing.assert_array_equal(result.rows, chosen)
    for i, j in ((0, 0), (2, 5), (5, 1)):
        expected = linear_cka(np.asarray(before.features("test", i, "cls"), np.float64)[chosen],
                              np.asarray(after.features("test", j, "cls"), np.float64)[chosen])
        assert result.values[i, j] == pytest.approx(expected, abs=1e-5)
    other_seed = store_cka(before, after, split="test", rows=16, seed=4)
    assert not np.allclose(other_seed.values, result.values)
