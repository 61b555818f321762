"""Per-sample correctness (predictions.npz) behind the profile's accuracy rows: its means are the table's values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mimprobe.metrics import knn, linear, linear_sklearn, linear_solver
from mimprobe.metrics.predictions import PREDICTIONS_FILE, SamplePredictions


def test_profile_predictions_average_to_the_table_values(profiles):
    table = pd.read_parquet(profiles.before / "profile.parquet")
    predictions = SamplePredictions.load(profiles.before / PREDICTIONS_FILE)
    rows = table[table["metric"].isin(["knn_top1", "linear_top1"])]
    assert set(rows["split"]) == {"test", "val"} and len(rows) == 6 * 2 * 3  # blocks x poolings x (knn 2, linear)
    for row in rows.itertuples():
        hits = predictions.get(metric=row.metric, split=row.split, block=row.block, pooling=row.pooling,
                               params=row.params)
        assert hits is not None and hits.dtype == bool
        assert hits.mean() == row.value  # the same counts: exactly equal, not approximately
    assert predictions.sources == {"test": "test", "val": "train"}
    assert np.array_equal(predictions.rows["test"], np.arange(32))
    assert len(predictions.rows["val"]) == 8 and predictions.rows["val"].max() < 80  # 10 % of train, stratified


def test_round_trip_and_refusal_of_mismatched_rows(tmp_path):
    predictions = SamplePredictions()
    hits = np.array([True, False, True])
    predictions.add(split="test", source="test", rows=np.arange(3), metric="knn_top1", block=2, pooling="cls",
                    params='{"k":10}', hits=hits)
    predictions.save(tmp_path / "p.npz")
    loaded = SamplePredictions.load(tmp_path / "p.npz")
    assert np.array_equal(loaded.get(metric="knn_top1", split="test", block=2, pooling="cls", params='{"k":10}'), hits)
    assert loaded.get(metric="knn_top1", split="test", block=3, pooling="cls", params='{"k":10}') is None
    with pytest.raises(ValueError, match="other evaluation rows"):
        predictions.add(split="test", source="test", rows=np.arange(1, 4), metric="knn_top1", block=3, pooling="cls",
                        params='{"k":10}', hits=hits)


def _blobs(seed: int, n: int, classes: int = 3, dim: int = 8):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centres = rng.normal(size=(classes, dim)) * 1.5
    return (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels


def test_knn_hits_are_the_top1_rows():
    train, y_train = _blobs(0, 60)
    query, y_query = _blobs(1, 30)
    preset = knn.KnnPreset("grid", ks=(5, 10), temperatures=(0.07, 0.5), weighting="exp", standardize=True)
    rows, hits = knn.evaluate_knn_with_hits(train, y_train, query, y_query, preset=preset, split="test",
                                            class_names=["a", "b", "c"])
    top1 = [row for row in rows if row.metric == "knn_top1"]
    assert len(top1) == len(hits) == 4  # every (k, T)
    for row in top1:
        k, temperature = row.params["k"], row.params["T"]
        assert hits[(k, temperature)].mean() == row.value
        # each (k, T)'s own predictions, from the plain k-NN classifier, not one setting's copied to all
        predicted = knn.knn_predict(train, y_train, query, ks=(k,), temperatures=(temperature,),
                                    standardize=True).predictions(k, temperature)
        assert np.array_equal(hits[(k, temperature)], predicted == y_query)
    assert len({hits[key].tobytes() for key in hits}) > 1  # the settings disagree somewhere on these blobs


@pytest.mark.parametrize("refit", [True, False])
def test_linear_hits_average_to_the_reported_accuracy(refit):
    train, y_train = _blobs(2, 80)
    test, y_test = _blobs(3, 40)
    blocks_train = {0: train, 1: train[:, ::-1].copy() * 0.5}
    blocks_test = {0: test, 1: test[:, ::-1].copy() * 0.5}
    config = linear.LinearProbeConfig(epochs=5, min_steps=50)
    rows, hits = linear.evaluate_linear_with_hits(blocks_train, y_train, blocks_test, y_test, config=config,
                                                  refit=refit)
    for block in (0, 1):
        assert hits[block].shape == (40,) and hits[block].mean() == rows[block][0].value
    # the hits are the reported head's: a probe trained at the reported weight decay on the reported rows (all of
    # train with refit, the fit split without) classifies the test samples exactly so
    from mimprobe.metrics._rows import carve_validation

    rows_used = np.arange(80) if refit else carve_validation(y_train, fraction=0.1, seed=0)[0]
    for block in (0, 1):
        params = rows[block][0].params
        assert params["weight_decay"] == pytest.approx(1 / (params["C"] * len(rows_used)))
        head = linear_solver.fit_probes({0: blocks_train[block][rows_used]}, y_train[rows_used],
                                 weight_decays=[params["weight_decay"]], epochs=5, min_steps=50)
        np.testing.assert_array_equal(head.correct(blocks_test[block][None], y_test)[0, 0], hits[block])
    sk_rows, sk_hits = linear_sklearn.evaluate_linear_sklearn_with_hits(blocks_train, y_train, blocks_test, y_test,
                                                                c_values=(0.1, 1.0), refit=refit)
    for block in (0, 1):
        assert sk_hits[block].mean() == pytest.approx(sk_rows[block][0].value, abs=1e-12)


def test_diverged_heads_score_no_hit():
    train, y_train = _blobs(4, 40)
    probes = linear_solver.fit_probes({0: train}, y_train, learning_rate=[1e10, 0.3], weight_decays=(0.01, 0.01), epochs=3,
                               min_steps=10)
    correct = probes.correct(train[None], y_train)
    accuracy = probes.score(train[None], y_train)
    assert correct.shape == (1, 2, 40)
    np.testing.assert_array_equal(correct.mean(axis=-1), accuracy)
    assert probes.diverged_.numpy().tolist() == [[True, False]]  # decay with lr 1e10 grows geometrically
    assert not correct[0, 0].any() and correct[0, 1].mean() > 0.5
