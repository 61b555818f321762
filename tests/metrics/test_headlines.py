"""Best blocks with intervals and the set of blocks not distinguishable from the best, on synthetic profiles."""

import json

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest

from mimprobe.metrics.headlines import best_blocks, headline_curve, headlines
from mimprobe.metrics.plot import plot_profile
from mimprobe.metrics.predictions import SamplePredictions
from mimprobe.metrics.profile import COLUMNS, iter_best_lines

KNN_PARAMS = json.dumps({"preset": "mim-refiner", "k": 10, "T": 0.07}, sort_keys=True, separators=(",", ":"))


def _profile(n_test=400, seed=0):
    """k-NN top-1 on test for 6 blocks: accuracies 0.40, 0.55, 0.70, 0.86, 0.88, 0.80; block 3 and 4 differ by
    8 images out of 400, block 5 by 32; low-shot 1-shot means with seed s.d."""
    rng = np.random.default_rng(seed)
    base = rng.random(n_test)
    accuracy = [0.40, 0.55, 0.70, 0.86, 0.88, 0.80]
    predictions = SamplePredictions()
    records = []
    for block, p in enumerate(accuracy):
        hits = base < p  # nested: a better block gets every image a worse one gets right
        predictions.add(split="test", source="test", rows=np.arange(n_test), metric="knn_top1", block=block,
                        pooling="cls", params=KNN_PARAMS, hits=hits)
        records.append(dict(split="test", block=block, pooling="cls", metric="knn_top1", params=KNN_PARAMS,
                            value=hits.mean(), seed=pd.NA))
        shot = json.dumps({"shots": 1})
        records.append(dict(split="test", block=block, pooling="cls", metric="lowshot_top1_mean", params=shot,
                            value=[0.2, 0.3, 0.5, 0.52, 0.49, 0.3][block], seed=pd.NA))
        records.append(dict(split="test", block=block, pooling="cls", metric="lowshot_top1_std", params=shot,
                            value=0.02, seed=pd.NA))
    table = pd.DataFrame.from_records([{**r, "model": "m", "checkpoint": "c", "dataset": "d"} for r in records],
                                      columns=COLUMNS)
    return table, predictions, base


@pytest.mark.parametrize("n_test", [400, 40])
def test_best_block_interval_is_wilson_and_ties_follow_mcnemar(n_test):
    table, predictions, base = _profile(n_test)
    best = best_blocks(table, "mim-refiner", predictions=predictions)
    knn = best[best["metric"].str.startswith("k-NN")].iloc[0]
    curve = table[table["metric"] == "knn_top1"].set_index("block")["value"]
    assert knn["best_block"] == curve.idxmax() and knn["interval"] == "wilson" and knn["n"] == n_test
    k = int((base < [0.40, 0.55, 0.70, 0.86, 0.88, 0.80][knn["best_block"]]).sum())
    reference = binomtest(k, n_test).proportion_ci(method="wilson")
    assert knn["best_low"] == pytest.approx(reference.low) and knn["best_high"] == pytest.approx(reference.high)
    tied = set(knn["tied_blocks"].split(","))
    # block 3 differs from block 4 (0.86 vs 0.88) only on the images in [0.86, 0.88): b = 0, c = that count
    discordant = int(((base >= 0.86) & (base < 0.88)).sum())
    p3 = binomtest(0, discordant, 0.5).pvalue if discordant else 1.0
    assert (p3 >= 0.05) == ("3" in tied)
    assert str(knn["best_block"]) in tied and not {"0", "1"} & tied
    if n_test == 400:  # 8 % of 400 images separate block 5 from 4; at 40 images the test may not tell
        assert "5" not in tied and "3" not in tied


def test_low_shot_bands_are_the_seed_spread_and_overlap_decides_ties():
    table, predictions, _ = _profile()
    best = best_blocks(table, "mim-refiner", predictions=predictions)
    shot = best[best["metric"].str.startswith("1-shot")].iloc[0]
    assert shot["best_block"] == 3 and shot["interval"] == "seed-sd"
    assert shot["best_low"] == pytest.approx(0.50) and shot["best_high"] == pytest.approx(0.54)
    # bands 0.48-0.52 (block 2) and 0.47-0.51 (block 4) overlap 0.50-0.54; 0.28-0.32 does not
    assert shot["tied_blocks"] == "2,3,4"


def test_without_predictions_there_is_no_binomial_interval():
    table, _, _ = _profile()
    best = best_blocks(table, "mim-refiner")
    knn = best[best["metric"].str.startswith("k-NN")].iloc[0]
    assert np.isnan(knn["best_low"]) and knn["tied_blocks"] == "4"
    curve = headline_curve(table, headlines("mim-refiner", table)[0], "cls")
    assert list(curve["block"]) == list(range(6)) and curve["interval"].eq("").all()


def test_console_lines_are_percent_with_interval_and_ties(tmp_path):
    table, predictions, _ = _profile()
    best = best_blocks(table, "mim-refiner", predictions=predictions)
    lines = list(iter_best_lines(best))
    knn = next(line for line in lines if line.startswith("k-NN"))
    value = table[(table["metric"] == "knn_top1") & (table["block"] == 4)]["value"].iloc[0]
    assert f"block  4  {100 * value:.1f} % [" in knn and "95 % CI, n=400" in knn
    assert "± 1 s.d. over seeds" in next(line for line in lines if line.startswith("1-shot"))
    path = tmp_path / "profile.png"
    plot_profile(table, headlines("mim-refiner", table), best, title="t", path=path, predictions=predictions,
                 num_classes=10)
    assert matplotlib.image.imread(path).shape[0] > 200
