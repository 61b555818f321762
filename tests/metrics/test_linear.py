"""The batched linear probe against scikit-learn, and the protocol's guarantees: selection on validation only,
argmax selection, seeding, independence of the heads, input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from mimprobe.errors import BadInputError
from mimprobe.metrics._rows import carve_validation
from mimprobe.metrics.linear import (BlockwiseLinearProbes, LinearProbeConfig, cosine_lr, evaluate_linear,
                                     evaluate_linear_sklearn, fit_probes, select_grid_point)

NUM_CLASSES = 10
WIDTHS = (32, 48, 64, 32, 48, 64)
SEPARATIONS = (0.3, 0.35, 0.4, 0.5, 0.6, 0.8)  # class-mean scale per block: harder to easier


def make_blocks(*, n_train: int = 2000, n_test: int = 1000, seed: int = 0):
    """Six blocks of class-mean + anisotropic-noise features, of widths 32-64 and growing separability.

    2,000 training samples make a 200-sample validation split: with 60 samples, choosing C or (lr, wd) is
    itself noisy by several points, for scikit-learn as for the batched probe, and the comparison tests nothing.
    """
    rng = np.random.default_rng(seed)
    train_labels = rng.permutation(np.arange(n_train) % NUM_CLASSES)
    test_labels = rng.permutation(np.arange(n_test) % NUM_CLASSES)
    train, test = {}, {}
    for block, (width, separation) in enumerate(zip(WIDTHS, SEPARATIONS)):
        means = rng.normal(size=(NUM_CLASSES, width))
        mixing = rng.normal(size=(width, width)) / np.sqrt(width) * np.linspace(2.0, 0.5, width)
        offset = rng.normal(size=width) * 3.0

        def draw(labels):
            noise = rng.normal(size=(len(labels), width)) @ mixing.T
            return (offset + separation * means[labels] + noise).astype(np.float32)

        train[block], test[block] = draw(train_labels), draw(test_labels)
    return train, train_labels, test, test_labels


@pytest.fixture(scope="module")
def blocks():
    return make_blocks()


@pytest.fixture(scope="module")
def batched_rows(blocks):
    return evaluate_linear(*blocks)


def by_metric(rows):
    return {row.metric: row for row in rows}


def test_rows_format(batched_rows):
    assert sorted(batched_rows) == list(range(6))
    assert all(0.0 <= row.value <= 1.0 for rows in batched_rows.values() for row in rows)  # fractions
    config = LinearProbeConfig()
    for rows in batched_rows.values():
        rows = by_metric(rows)
        assert set(rows) == {"linear_top1", "linear_val_top1"}
        assert rows["linear_top1"].split == "test" and rows["linear_val_top1"].split == "val"
        params = rows["linear_top1"].params
        assert params == rows["linear_val_top1"].params
        assert (params["lr"], params["weight_decay"]) in config.grid()
        assert params["grid_lrs"] == list(config.lrs) and params["refit"] is True
        assert rows["linear_top1"].seed == 0
        rows["linear_top1"].params_json()  # serialisable


def test_matches_sklearn_within_one_point_per_block(blocks, batched_rows):
    reference = evaluate_linear_sklearn(*blocks)
    batched = np.array([by_metric(batched_rows[b])["linear_top1"].value for b in range(6)])
    sklearn = np.array([by_metric(reference[b])["linear_top1"].value for b in range(6)])
    assert sklearn.min() < 0.99 and np.all(sklearn > 0.9), "well separated, but not all trivially"
    np.testing.assert_allclose(batched, sklearn, atol=0.01)  # 1 point


def test_each_head_reaches_the_regularised_optimum():
    """At a fixed weight decay, SGD ends near scikit-learn's exact optimum with C = 1 / (wd * n)."""
    train, labels, _, _ = make_blocks()
    weight_decay = 1e-3
    features = np.stack([train[b] for b in (1, 4)])
    probes = fit_probes(features, labels, lrs=(10.0,), weight_decays=(weight_decay,))
    for i, x in enumerate(features):
        z = (x - x.mean(0)) / x.std(0)
        exact = LogisticRegression(C=1 / (weight_decay * len(labels)), tol=1e-8, max_iter=5000).fit(z, labels)

        def objective(coef, intercept):
            logits = z @ coef.T + intercept
            logits -= logits.max(1, keepdims=True)
            log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
            return -log_probs[np.arange(len(labels)), labels].mean() + weight_decay / 2 * (coef ** 2).sum()

        sgd = objective(probes.coef_[i, 0].numpy(), probes.intercept_[i, 0].numpy())
        optimum = objective(exact.coef_, exact.intercept_)
        assert optimum <= sgd + 1e-6 and sgd - optimum < 2e-3
        agreement = (probes.decision_function(features)[i, 0].argmax(1).numpy() == exact.predict(z)).mean()
        assert agreement > 0.98


def test_selection_never_reads_the_test_split(blocks, batched_rows):
    train, train_labels, test, test_labels = blocks
    rng = np.random.default_rng(1)
    garbage = {b: rng.normal(size=x.shape).astype(np.float32) * 100 for b, x in test.items()}
    poisoned = evaluate_linear(train, train_labels, garbage, np.zeros_like(test_labels))
    for b in range(6):
        clean, dirty = by_metric(batched_rows[b]), by_metric(poisoned[b])
        assert dirty["linear_val_top1"] == clean["linear_val_top1"]  # same chosen point, same value
        assert dirty["linear_top1"].params == clean["linear_top1"].params
    assert any(by_metric(poisoned[b])["linear_top1"].value != by_metric(batched_rows[b])["linear_top1"].value
               for b in range(6))


def test_chosen_point_is_the_argmax_of_validation_accuracy(blocks):
    """Redo the protocol by hand (without refit): the reported point maximises validation accuracy, and the
    reported test accuracy is that point's."""
    train, train_labels, test, test_labels = blocks
    config = LinearProbeConfig()
    rows = evaluate_linear(train, train_labels, test, test_labels, refit=False)
    fit_idx, val_idx = carve_validation(train_labels, fraction=0.1, seed=0)
    for block in range(6):
        probes = fit_probes(train[block][None, fit_idx], train_labels[fit_idx], lrs=config.lrs,
                            weight_decays=config.weight_decays)
        val_accuracy = probes.score(train[block][None, val_idx], train_labels[val_idx])[0]
        test_accuracy = probes.score(test[block][None], test_labels)[0]
        reported = by_metric(rows[block])
        chosen = config.grid().index((reported["linear_top1"].params["lr"],
                                      reported["linear_top1"].params["weight_decay"]))
        assert reported["linear_val_top1"].value == val_accuracy.max() == val_accuracy[chosen]
        assert reported["linear_top1"].value == pytest.approx(test_accuracy[chosen], abs=0.002)  # float noise


def test_select_grid_point_breaks_ties_by_loss_then_order():
    assert select_grid_point(np.array([50.0, 70.0, 60.0]), np.array([0.1, 0.9, 0.2])) == 1
    assert select_grid_point(np.array([70.0, 70.0, 60.0]), np.array([0.9, 0.5, 0.2])) == 1
    assert select_grid_point(np.array([70.0, 70.0]), np.array([0.5, 0.5])) == 0


def test_seeded_runs_are_identical(blocks, batched_rows):
    again = evaluate_linear(*blocks)
    assert again == batched_rows
    first = fit_probes(np.stack([blocks[0][b] for b in (0, 3)]), blocks[1], seed=5)
    second = fit_probes(np.stack([blocks[0][b] for b in (0, 3)]), blocks[1], seed=5)
    assert torch.equal(first.coef_, second.coef_) and torch.equal(first.intercept_, second.intercept_)
    other = fit_probes(np.stack([blocks[0][b] for b in (0, 3)]), blocks[1], seed=6)
    assert not torch.equal(first.coef_, other.coef_)


def test_heads_are_independent_of_the_other_blocks_and_grid_points(blocks):
    train, labels, _, _ = blocks
    together = fit_probes({b: train[b] for b in (0, 3)}, labels, lrs=(0.1, 1.0), weight_decays=(1e-4, 1e-2))
    alone = fit_probes({3: train[3]}, labels, lrs=(1.0,), weight_decays=(1e-2,))
    torch.testing.assert_close(alone.coef_[0, 0], together.coef_[1, 3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alone.intercept_[0, 0], together.intercept_[1, 3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alone.mean_[0], together.mean_[1])


def test_blocks_of_different_widths_are_grouped_and_chunked(blocks):
    train, train_labels, test, test_labels = blocks
    subset = [0, 1, 3]  # widths 32, 48, 32
    whole = evaluate_linear({b: train[b] for b in subset}, train_labels, {b: test[b] for b in subset}, test_labels)
    one_per_pass = evaluate_linear({b: train[b] for b in subset}, train_labels, {b: test[b] for b in subset},
                                   test_labels, config=LinearProbeConfig(blocks_per_pass=1))
    assert list(whole) == subset
    for b in subset:
        for row, other in zip(whole[b], one_per_pass[b]):
            assert row.params["lr"] == other.params["lr"] and row.params["weight_decay"] == other.params["weight_decay"]
            assert row.value == pytest.approx(other.value, abs=0.005)  # float noise may flip a borderline sample


def test_float16_memory_maps_are_read_as_float32(tmp_path, blocks):
    train, train_labels, test, test_labels = blocks
    subset = [0, 3]
    maps = {}
    for name, source in (("train", train), ("test", test)):
        maps[name] = {}
        for b in subset:
            path = tmp_path / f"{name}{b}.npy"
            np.save(path, source[b].astype(np.float16))
            maps[name][b] = np.load(path, mmap_mode="r")
    from_maps = evaluate_linear(maps["train"], train_labels, maps["test"], test_labels)
    from_arrays = evaluate_linear({b: maps["train"][b].astype(np.float32) for b in subset}, train_labels,
                                  {b: maps["test"][b].astype(np.float32) for b in subset}, test_labels)
    assert from_maps == from_arrays


def test_diverged_heads_are_flagged_and_never_chosen(blocks):
    train, train_labels, test, test_labels = blocks
    probes = fit_probes({0: train[0]}, train_labels, lrs=(1.0,), weight_decays=(1e-3, 100.0), epochs=5)
    assert probes.diverged_.tolist() == [[False, True]]
    accuracy, loss = probes.evaluate(np.stack([test[0]]), test_labels)
    assert accuracy[0, 1] == 0 and loss[0, 1] == np.inf
    rows = evaluate_linear({0: train[0]}, train_labels, {0: test[0]}, test_labels,
                           config=LinearProbeConfig(lrs=(1.0,), weight_decays=(1e-3, 100.0), epochs=5))
    assert rows[0][0].params["weight_decay"] == 1e-3


def test_cosine_schedule():
    assert cosine_lr(0, 10) == 1.0
    assert cosine_lr(5, 10) == pytest.approx(0.5)
    assert cosine_lr(10, 10) == pytest.approx(0.0)


@pytest.mark.parametrize("where", ["train", "test"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_features_name_the_block(blocks, where, value):
    train, train_labels, test, test_labels = blocks
    bad = {b: x.copy() for b, x in (train if where == "train" else test).items()}
    bad[4][7, 3] = value
    args = (bad, train_labels, test, test_labels) if where == "train" else (train, train_labels, bad, test_labels)
    with pytest.raises(BadInputError, match=f"block 4: {where} features contain NaN or Inf"):
        evaluate_linear(*args)
    with pytest.raises(BadInputError, match="block 4"):
        evaluate_linear_sklearn(*args)


def test_float16_overflow_is_caught(blocks):
    train, train_labels, test, test_labels = blocks
    overflowed = {b: x.astype(np.float16) for b, x in train.items()}
    overflowed[2][0, 0] = np.float16(np.inf)
    with pytest.raises(BadInputError, match="block 2"):
        evaluate_linear(overflowed, train_labels, test, test_labels)


def test_bad_inputs_raise(blocks):
    train, train_labels, test, test_labels = blocks
    with pytest.raises(BadInputError, match="at least 2 classes"):
        evaluate_linear(train, np.zeros_like(train_labels), test, test_labels)
    with pytest.raises(BadInputError, match="at least 2 classes"):
        evaluate_linear_sklearn(train, np.zeros_like(train_labels), test, test_labels)
    with pytest.raises(BadInputError, match="at least 2 classes"):
        BlockwiseLinearProbes(learning_rates=[0.1], weight_decays=[0.0]).fit(np.stack([train[0]]),
                                                                              np.ones_like(train_labels))
    with pytest.raises(BadInputError, match="different blocks"):
        evaluate_linear(train, train_labels, {0: test[0]}, test_labels)
    with pytest.raises(BadInputError, match="block 0: test features must be"):
        evaluate_linear(train, train_labels, test, test_labels[:-1])
    with pytest.raises(BadInputError, match="integer"):
        evaluate_linear(train, train_labels.astype(float), test, test_labels)
    with pytest.raises(BadInputError, match="negative"):
        evaluate_linear(train, np.where(np.arange(len(train_labels)) == 0, -1, train_labels), test, test_labels)
    with pytest.raises(BadInputError, match="one width"):
        fit_probes({0: train[0], 1: train[1]}, train_labels)
    with pytest.raises(BadInputError, match="same shape"):
        BlockwiseLinearProbes(learning_rates=[0.1, 0.2], weight_decays=[0.0]).fit(np.stack([train[0]]), train_labels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(blocks):
    train, train_labels, test, test_labels = blocks
    subset = {b: train[b] for b in (0, 3)}, train_labels, {b: test[b] for b in (0, 3)}, test_labels
    on_cpu, on_gpu = evaluate_linear(*subset, device="cpu"), evaluate_linear(*subset, device="cuda")
    for b in (0, 3):
        for row, other in zip(on_cpu[b], on_gpu[b]):
            assert row.value == pytest.approx(other.value, abs=0.01)
