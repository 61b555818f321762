"""Low-shot: the splits (exact counts, seeds, nesting), accuracy on separable and random data, the aggregates."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import normalize

from mimprobe.errors import BadInputError
from mimprobe.metrics.lowshot import evaluate_lowshot, lowshot_accuracy, lowshot_split, percent_split


def gaussian_classes(n_per_class: int, n_classes: int = 5, dim: int = 32, noise: float = 0.3, seed: int = 0,
                     offset: float = 4.0):
    """Classes around random centres, all shifted by a common offset (which the centring must remove)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, dim)) + offset
    labels = rng.permutation(np.repeat(np.arange(n_classes), n_per_class))
    features = centres[labels] + noise * rng.standard_normal((len(labels), dim))
    return features.astype(np.float32), labels


def train_and_test(noise: float = 0.3, seed: int = 0):
    rng = np.random.default_rng(seed + 100)
    features, labels = gaussian_classes(60, noise=noise, seed=seed)
    order = rng.permutation(len(labels))
    train, test = order[:200], order[200:]
    return features[train], labels[train], features[test], labels[test]


@pytest.mark.parametrize("shots", [1, 2, 5])
def test_split_has_exactly_n_per_class_and_is_seeded(shots):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, size=300)
    indices = lowshot_split(labels, shots, seed=0)
    assert np.bincount(labels[indices], minlength=7).tolist() == [shots] * 7
    assert len(np.unique(indices)) == len(indices) and np.all(np.diff(indices) > 0)
    np.testing.assert_array_equal(lowshot_split(labels, shots, seed=0), indices)
    assert not np.array_equal(lowshot_split(labels, shots, seed=1), indices)


def test_splits_of_one_seed_are_nested():
    labels = np.random.default_rng(1).integers(0, 5, size=400)
    one, two, five = (set(lowshot_split(labels, n, seed=3)) for n in (1, 2, 5))
    assert one < two < five
    assert five <= set(percent_split(labels, 10, seed=3))


def test_percent_split_is_stratified_with_one_image_at_least():
    labels = np.concatenate([np.full(1000, 0), np.full(250, 1), np.full(40, 2), np.full(149, 3), np.full(150, 4)])
    counts = np.bincount(labels[percent_split(labels, 1, seed=0)])
    assert counts.tolist() == [10, 3, 1, 1, 2]  # round half up, at least one per class
    assert not np.array_equal(percent_split(labels, 1, seed=0), percent_split(labels, 1, seed=1))
    assert len(percent_split(labels, 100, seed=0)) == len(labels)


def test_short_classes_give_all_they_have_and_are_recorded():
    labels = np.array([0] * 6 + [1] * 3 + [2] * 5)
    counts = np.bincount(labels[lowshot_split(labels, 5, seed=0)])
    assert counts.tolist() == [5, 3, 5]
    features = np.random.default_rng(0).standard_normal((len(labels), 4)).astype(np.float32)
    rows = evaluate_lowshot(features, labels, features, labels, shots=(2, 5), percents=(), seeds=(0,))
    assert {row.params_json() for row in rows} == {'{"shots":2}', '{"classes_short":1,"shots":5}'}
    with pytest.raises(BadInputError, match="7-shot"):
        lowshot_split(labels, 7, seed=0)


def test_separable_data_is_classified_from_one_shot():
    train, train_labels, test, test_labels = train_and_test(noise=0.3)
    rows = evaluate_lowshot(train, train_labels, test, test_labels)
    per_seed = [row for row in rows if row.metric == "lowshot_top1"]
    assert len(per_seed) == 4 * 3
    assert min(row.value for row in per_seed) > 0.95


def test_random_labels_are_near_chance():
    rng = np.random.default_rng(2)
    train, test = rng.standard_normal((500, 32)), rng.standard_normal((1000, 32))
    train_labels, test_labels = rng.integers(0, 5, 500), rng.integers(0, 5, 1000)
    rows = evaluate_lowshot(train, train_labels, test, test_labels, shots=(5,), percents=(10,))
    means = [row.value for row in rows if row.metric == "lowshot_top1_mean"]
    assert len(means) == 2
    assert all(abs(mean - 0.2) < 0.06 for mean in means)


def test_the_classifier_learns_from_train_labels_only():
    """Test labels shifted by one class: a classifier fitted on train scores ~0; one fitted on test would not."""
    train, train_labels, test, test_labels = train_and_test(noise=0.3)
    rows = evaluate_lowshot(train, train_labels, test, (test_labels + 1) % 5, shots=(5,), percents=())
    assert max(row.value for row in rows if row.metric == "lowshot_top1") < 0.05


def test_splits_index_train_only():
    train_labels = np.repeat(np.arange(4), 10)
    for seed in (0, 1, 2):
        assert lowshot_split(train_labels, 5, seed=seed).max() < len(train_labels)
        assert percent_split(train_labels, 1, seed=seed).max() < len(train_labels)


def test_accuracy_matches_a_written_out_reference():
    train, train_labels, test, test_labels = train_and_test(noise=1.5, seed=3)
    indices = lowshot_split(train_labels, 2, seed=1)
    mean = train[indices].mean(axis=0)
    reference = LogisticRegression(C=0.5, max_iter=1000).fit(normalize(train[indices] - mean), train_labels[indices])
    expected = np.mean(reference.predict(normalize(test - mean)) == test_labels)
    assert lowshot_accuracy(train, train_labels, test, test_labels, indices, C=0.5) == pytest.approx(expected)
    assert 0.3 < expected < 1.0


def test_mean_and_std_rows_are_numpy_mean_and_std_of_the_seeds():
    train, train_labels, test, test_labels = train_and_test(noise=2.0, seed=4)
    rows = evaluate_lowshot(train, train_labels, test, test_labels, shots=(1, 2), percents=(5,), split="val")
    settings = sorted({row.params_json() for row in rows})
    assert settings == ['{"percent":5}', '{"shots":1}', '{"shots":2}']
    for setting in settings:
        group = [row for row in rows if row.params_json() == setting]
        seeds = [row for row in group if row.metric == "lowshot_top1"]
        assert [row.seed for row in seeds] == [0, 1, 2]
        values = np.array([row.value for row in seeds])
        (mean,) = [row for row in group if row.metric == "lowshot_top1_mean"]
        (std,) = [row for row in group if row.metric == "lowshot_top1_std"]
        assert mean.value == pytest.approx(np.mean(values)) and mean.seed is None
        assert std.value == pytest.approx(np.std(values, ddof=1)) and std.seed is None
        assert all(row.split == "val" for row in group)
    assert len({row.value for row in rows if row.metric == "lowshot_top1"}) > 1   # the seeds differ


def test_single_seed_has_no_std_row():
    train, train_labels, test, test_labels = train_and_test()
    rows = evaluate_lowshot(train, train_labels, test, test_labels, shots=(1,), percents=(), seeds=(7,))
    assert [(row.metric, row.seed) for row in rows] == [("lowshot_top1", 7), ("lowshot_top1_mean", None)]


def test_float16_memmap_matches_float32(tmp_path):
    train, train_labels, test, test_labels = train_and_test(noise=1.0)
    np.save(tmp_path / "train.npy", train.astype(np.float16))
    np.save(tmp_path / "test.npy", test.astype(np.float16))
    mapped_train = np.load(tmp_path / "train.npy", mmap_mode="r")
    mapped_test = np.load(tmp_path / "test.npy", mmap_mode="r")
    expected = evaluate_lowshot(train.astype(np.float16).astype(np.float32), train_labels,
                                test.astype(np.float16).astype(np.float32), test_labels, shots=(2,), percents=())
    assert evaluate_lowshot(mapped_train, train_labels, mapped_test, test_labels, shots=(2,), percents=()) == expected


@pytest.mark.parametrize("where", ["train", "test"])
def test_nan_raises_with_the_name(where):
    train, train_labels, test, test_labels = train_and_test()
    (train if where == "train" else test)[:, 3] = np.nan   # every train row, so every split meets one
    with pytest.raises(BadInputError, match=f"block 5 cls {where}"):
        evaluate_lowshot(train, train_labels, test, test_labels, name="block 5 cls")


def test_unlabelled_rows_raise():
    train, train_labels, test, test_labels = train_and_test()
    with pytest.raises(BadInputError, match="unlabelled"):
        evaluate_lowshot(train, np.full_like(train_labels, -1), test, test_labels)
