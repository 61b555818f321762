"""k-NN against a brute-force numpy reference and scikit-learn; standardisation, leave-one-out, chunking, memmaps."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from mimprobe.errors import BadInputError
from mimprobe.metrics.knn import (PRESETS, KnnPreset, chunk_rows_for_budget, evaluate_knn, knn_neighbors,
                                  knn_predict, plan_search, standardization_stats)


def make_data(n_train=300, n_query=80, dim=12, num_classes=6, seed=0, separation=1.5):
    """Class-dependent Gaussian features (so accuracy is above chance), float32."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((num_classes, dim)) * separation
    y_train = rng.integers(0, num_classes, n_train)
    y_query = rng.integers(0, num_classes, n_query)
    x_train = (centers[y_train] + rng.standard_normal((n_train, dim))).astype(np.float32)
    x_query = (centers[y_query] + rng.standard_normal((n_query, dim))).astype(np.float32)
    return x_train, y_train, x_query, y_query


def reference_votes(x_train, y_train, x_query, k, temperature, weighting, num_classes, exclude_self=False):
    """The textbook computation: a full float64 cosine similarity matrix, argsort, weighted votes."""
    a = x_train.astype(np.float64)
    b = x_query.astype(np.float64)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    sims = b @ a.T  # (n_query, n_train)
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    votes = np.zeros((len(b), num_classes))
    for i in range(len(b)):
        order = np.argsort(-sims[i], kind="stable")[:k]
        s = sims[i, order]
        if weighting == "exp":
            w = np.exp(s / temperature)
        elif weighting == "softmax":
            w = np.exp(s / temperature) / np.exp(s / temperature).sum()
        else:
            w = np.ones(k)
        for label, weight in zip(y_train[order], w):
            votes[i, label] += weight
    return votes


def reference_ranking(votes, top=5):
    """Classes by decreasing vote, ties to the lower index (written out with Python's sort)."""
    return np.array([sorted(range(votes.shape[1]), key=lambda c: (-row[c], c))[:top] for row in votes])


@pytest.mark.parametrize("weighting", ["exp", "softmax", "uniform"])
def test_matches_brute_force_reference(weighting):
    x_train, y_train, x_query, _ = make_data()
    ks, temperatures = (1, 5, 20), (0.07, 0.5)
    result = knn_predict(x_train, y_train, x_query, ks=ks, temperatures=temperatures, weighting=weighting,
                         num_classes=6, keep_scores=True)
    for k in ks:
        for t in temperatures:
            expected = reference_votes(x_train, y_train, x_query, k, t, weighting, 6)
            np.testing.assert_allclose(result.scores[(k, t)], expected, rtol=1e-4)
            np.testing.assert_array_equal(result.ranked[(k, t)], reference_ranking(expected))


def test_softmax_ranks_like_exp():
    # softmax divides a query's exp votes by one constant: same ranking, scores summing to 1 (DINOv2 vs DINO)
    x_train, y_train, x_query, _ = make_data(seed=1)
    common = dict(ks=(10, 50), temperatures=(0.07, 1.0), num_classes=6, keep_scores=True)
    exp = knn_predict(x_train, y_train, x_query, weighting="exp", **common)
    softmax = knn_predict(x_train, y_train, x_query, weighting="softmax", **common)
    for key in exp.ranked:
        np.testing.assert_array_equal(exp.ranked[key], softmax.ranked[key])
        np.testing.assert_allclose(softmax.scores[key].sum(axis=1), 1.0, rtol=1e-9)


@pytest.mark.parametrize("k", [1, 4, 15])
def test_uniform_votes_match_sklearn(k):
    x_train, y_train, x_query, _ = make_data(seed=2)
    sk = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(x_train, y_train)
    ours = knn_predict(x_train, y_train, x_query, ks=(k,), weighting="uniform", num_classes=6)
    # ties between classes (likely with uniform votes) go to the lower class in both
    np.testing.assert_array_equal(ours.predictions(k, 0.07), sk.predict(x_query))


def test_exp_votes_match_sklearn_with_exp_weights():
    # scikit-learn's cosine distance is 1 - sim, so weights exp((1 - d) / T) are exactly DINO's exp(sim / T)
    x_train, y_train, x_query, _ = make_data(seed=3)
    t = 0.1
    sk = KNeighborsClassifier(n_neighbors=20, metric="cosine", algorithm="brute",
                              weights=lambda d: np.exp((1 - d) / t)).fit(x_train, y_train)
    ours = knn_predict(x_train, y_train, x_query, ks=(20,), temperatures=(t,), num_classes=6)
    np.testing.assert_array_equal(ours.predictions(20, t), sk.predict(x_query))


def test_sklearn_distance_weights_are_another_rule():
    # weights="distance" (1 / (1 - sim)) is not exp(sim / T): one neighbour of class 0 at sim 0.9 outweighs two
    # of class 1 at sim 0.5 under 1/d (10 vs 4) and under exp at T=0.07, but not under exp at T=10 (1.09 vs 2.10).
    angle = np.arccos([0.9, 0.5, 0.5])
    x_train = np.stack([np.cos(angle), np.sin(angle) * np.array([1, 1, -1])], axis=1).astype(np.float32)
    y_train = np.array([0, 1, 1])
    x_query = np.array([[1.0, 0.0]], np.float32)
    distance = KNeighborsClassifier(n_neighbors=3, metric="cosine", algorithm="brute", weights="distance")
    assert distance.fit(x_train, y_train).predict(x_query)[0] == 0
    sharp = knn_predict(x_train, y_train, x_query, ks=(3,), temperatures=(0.07,), num_classes=2)
    flat = knn_predict(x_train, y_train, x_query, ks=(3,), temperatures=(10.0,), num_classes=2)
    assert sharp.predictions(3, 0.07)[0] == 0
    assert flat.predictions(3, 10.0)[0] == 1


def manual_standardize(x, mean, std):
    return ((x.astype(np.float64) - mean) / std).astype(np.float32)


def test_standardization_uses_train_statistics_only():
    rng = np.random.default_rng(4)
    x_train, y_train, x_query, _ = make_data(seed=4)
    scale = rng.uniform(0.2, 5.0, x_train.shape[1]).astype(np.float32)
    offset = rng.uniform(-3, 3, x_train.shape[1]).astype(np.float32)
    x_train = x_train * scale + offset
    mean = x_train.astype(np.float64).mean(axis=0)
    std = x_train.astype(np.float64).std(axis=0, ddof=1) + 1e-6  # MIM-Refiner: torch's unbiased std + 1e-6
    np.testing.assert_allclose(standardization_stats(x_train, chunk_size=64)[0], mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(standardization_stats(x_train, chunk_size=64)[1], std, rtol=1e-5)
    common = dict(ks=(10,), temperatures=(0.07,), num_classes=6, keep_scores=True)
    for shift in (0.0, 4.0):  # the second query distribution has another mean: the applied statistics must not move
        query = x_query * scale + offset + shift
        ours = knn_predict(x_train, y_train, query, standardize=True, **common)
        with_train_stats = knn_predict(manual_standardize(x_train, mean, std), y_train,
                                       manual_standardize(query, mean, std), **common)
        np.testing.assert_allclose(ours.scores[(10, 0.07)], with_train_stats.scores[(10, 0.07)], rtol=1e-4)
        np.testing.assert_array_equal(ours.ranked[(10, 0.07)], with_train_stats.ranked[(10, 0.07)])
    # standardising the query with its own statistics would be a different classifier
    q_mean, q_std = query.astype(np.float64).mean(axis=0), query.astype(np.float64).std(axis=0, ddof=1) + 1e-6
    with_query_stats = knn_predict(manual_standardize(x_train, mean, std), y_train,
                                   manual_standardize(query, q_mean, q_std), **common)
    assert not np.allclose(ours.scores[(10, 0.07)], with_query_stats.scores[(10, 0.07)], rtol=1e-2)
    assert (ours.ranked[(10, 0.07)][:, 0] != with_query_stats.ranked[(10, 0.07)][:, 0]).any()


@pytest.mark.parametrize("plan", [{}, {"shard_size": 17, "chunk_size": 10}])
def test_leave_one_out_excludes_self_among_duplicates(plan):
    rng = np.random.default_rng(5)
    base = rng.standard_normal((40, 8)).astype(np.float32)
    x = np.concatenate([base, base, base])  # every point three times: self ties with its two twins at sim 1
    labels = np.tile(rng.integers(0, 3, 40), 3)
    sims, idx = knn_neighbors(x, x, 2, exclude_self=True, **plan)
    rows = np.arange(len(x))[:, None]
    assert not (idx == rows).any()
    np.testing.assert_array_equal(np.sort(idx, axis=1), np.sort(np.stack([(rows[:, 0] + 40) % 120,
                                                                           (rows[:, 0] + 80) % 120], 1), axis=1))
    np.testing.assert_allclose(sims, 1.0, atol=1e-6)
    # with k=3 the third neighbour is another point, as in the reference with the diagonal removed
    x_train, y_train, _, _ = make_data(n_train=120, seed=5)
    ours = knn_predict(x_train, y_train, x_train, ks=(3,), temperatures=(0.07,), num_classes=6, exclude_self=True,
                       keep_scores=True, **plan)
    expected = reference_votes(x_train, y_train, x_train, 3, 0.07, "exp", 6, exclude_self=True)
    np.testing.assert_allclose(ours.scores[(3, 0.07)], expected, rtol=1e-4)
    assert knn_predict(x, labels, x, ks=(2,), num_classes=3, exclude_self=True, **plan).predictions(2, 0.07).tolist() \
        == labels.tolist()


@pytest.mark.parametrize("plan", [{}, {"shard_size": 17, "chunk_size": 10}])
@pytest.mark.parametrize("k", [1, 2])
def test_leave_one_out_keeps_the_best_ranked_others_when_twins_push_self_out(plan, k):
    """Four copies of each image, each copy with another label: a query's k + 1 best are often all twins without
    itself (exact ties). Leave-one-out must then keep the k best-ranked others, i.e. the plain search's ranking
    with self removed, not skip the best one, and the k=1 prediction is the best-ranked twin's label."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal((30, 8)).astype(np.float32)
    x = np.concatenate([base] * 4)
    labels = np.repeat(np.arange(4), 30)  # the twins of an image all have different labels
    rows = np.arange(len(x))
    _, plain = knn_neighbors(x, x, k + 1, **plan)
    _, ours = knn_neighbors(x, x, k, exclude_self=True, **plan)
    pushed_out = ~(plain == rows[:, None]).any(axis=1)
    assert pushed_out.sum() >= 30  # the fallback (self not among the k + 1) is reached
    expected = np.stack([[j for j in plain[i] if j != i][:k] for i in rows])
    np.testing.assert_array_equal(ours, expected)
    if k == 1:
        predicted = knn_predict(x, labels, x, ks=(1,), num_classes=4, exclude_self=True, **plan).predictions(1, 0.07)
        np.testing.assert_array_equal(predicted, labels[expected[:, 0]])


def test_chunked_and_sharded_equal_unchunked():
    x_train, y_train, x_query, _ = make_data(n_train=500, n_query=130, seed=6)
    common = dict(ks=(3, 30), temperatures=(0.07, 0.3), num_classes=6, keep_scores=True)
    whole = knn_predict(x_train, y_train, x_query, **common)
    plans = [{"chunk_size": 7}, {"chunk_size": 1000}, {"shard_size": 64}, {"shard_size": 499, "chunk_size": 50},
             {"memory_budget": 70_000}]
    for plan in plans:
        part = knn_predict(x_train, y_train, x_query, **plan, **common)
        for key in whole.ranked:
            np.testing.assert_array_equal(part.ranked[key], whole.ranked[key], err_msg=str(plan))
            np.testing.assert_allclose(part.scores[key], whole.scores[key], rtol=1e-5, err_msg=str(plan))


def test_memory_budget_plans_shards():
    # 10,000 x 64 float32 = 2.56 MB: half of a 1 MB budget cannot hold it, so the bank is sharded
    plan = plan_search(10_000, 500, 64, 21, memory_budget=1_000_000)
    assert plan.sharded(10_000)
    assert plan.shard_rows * 64 * 4 + plan.chunk_rows * (64 * 4 + 21 * 16) + 500 * 21 * 16 <= 1_000_000
    assert not plan_search(1_000, 500, 64, 21, memory_budget=100_000_000).sharded(1_000)
    assert chunk_rows_for_budget(10_000, dim=64, max_k=21) == 10_000 // (64 * 4 + 21 * 16)
    with pytest.raises(BadInputError, match="budget"):
        chunk_rows_for_budget(100, dim=64, max_k=21)


def test_float16_memmap_input(tmp_path):
    x_train, y_train, x_query, _ = make_data(n_train=400, n_query=90, seed=7)
    train_map = np.lib.format.open_memmap(tmp_path / "train.npy", mode="w+", dtype=np.float16, shape=x_train.shape)
    train_map[:] = x_train
    train_map.flush()
    query_map = np.lib.format.open_memmap(tmp_path / "query.npy", mode="w+", dtype=np.float16, shape=x_query.shape)
    query_map[:] = x_query
    query_map.flush()
    del train_map, query_map
    train = np.load(tmp_path / "train.npy", mmap_mode="r")
    query = np.load(tmp_path / "query.npy", mmap_mode="r")
    assert isinstance(train, np.memmap) and train.dtype == np.float16
    common = dict(ks=(5, 20), temperatures=(0.07,), num_classes=6, standardize=True, keep_scores=True)
    in_memory = knn_predict(np.asarray(train, np.float32), y_train, np.asarray(query, np.float32), **common)
    assert plan_search(400, 90, 12, 20, num_classes=6, memory_budget=48_000).sharded(400)
    for plan in ({"chunk_size": 32}, {"memory_budget": 48_000}):
        mapped = knn_predict(train, y_train, query, **plan, **common)
        for key in in_memory.ranked:
            np.testing.assert_array_equal(mapped.ranked[key], in_memory.ranked[key])
            np.testing.assert_allclose(mapped.scores[key], in_memory.scores[key], rtol=1e-5)
    np.testing.assert_array_equal(np.load(tmp_path / "train.npy"), x_train.astype(np.float16))  # untouched


def test_top5_and_per_class_accuracy_against_manual():
    x_train, y_train, x_query, y_query = make_data(n_train=400, n_query=120, num_classes=8, seed=8,
                                                    separation=0.4)
    names = [f"class{c}" for c in range(8)]
    rows = evaluate_knn(x_train, y_train, x_query, y_query, preset="dino", split="test", class_names=names)
    votes = reference_votes(x_train, y_train, x_query, 20, 0.07, "exp", 8)
    ranking = reference_ranking(votes)
    top1 = ranking[:, 0] == y_query
    top5 = (ranking == y_query[:, None]).any(axis=1)
    assert 0 < top1.mean() < top5.mean() < 1  # the test data make top-5 differ from top-1
    params = {"preset": "dino", "k": 20, "T": 0.07, "weighting": "exp", "standardize": False}
    by_metric = {}
    for row in rows:
        assert row.split == "test"
        by_metric.setdefault(row.metric, []).append(row)
    assert by_metric["knn_top1"][0].params == params
    assert by_metric["knn_top1"][0].value == pytest.approx(top1.mean())
    assert by_metric["knn_top5"][0].value == pytest.approx(top5.mean())
    per_class = {row.params["class"]: row.value for row in by_metric["knn_class_top1"]}
    assert per_class == pytest.approx({names[c]: top1[y_query == c].mean() for c in np.unique(y_query)})
    assert all({**params, "class": row.params["class"]} == row.params for row in by_metric["knn_class_top1"])


def test_presets_are_recorded_in_every_row():
    x_train, y_train, x_query, y_query = make_data(n_train=250, seed=9)
    names = [str(c) for c in range(6)]
    assert PRESETS["mim-refiner"] == KnnPreset("mim-refiner", ks=(10,), temperatures=(0.07,), standardize=True)
    rows = evaluate_knn(x_train, y_train, x_query, y_query, preset="dinov2", split="val", class_names=names)
    top1 = [row for row in rows if row.metric == "knn_top1"]
    assert [row.params["k"] for row in top1] == [10, 20, 100, 200]
    assert all(row.params["weighting"] == "softmax" and row.params["preset"] == "dinov2" for row in rows)
    rows = evaluate_knn(x_train, y_train, x_query, y_query, preset="mim-refiner", split="val", class_names=names)
    assert {(row.params["k"], row.params["standardize"]) for row in rows} == {(10, True)}
    with pytest.raises(BadInputError, match="unknown k-NN preset"):
        evaluate_knn(x_train, y_train, x_query, y_query, preset="dinov3", split="val", class_names=names)


def test_k_larger_than_train_split_raises():
    x_train, y_train, x_query, y_query = make_data(n_train=15, seed=10)
    with pytest.raises(BadInputError, match=r"k=20 is larger than the train split \(n=15\): use a smaller k"):
        evaluate_knn(x_train, y_train, x_query, y_query, preset="dino", split="test",
                     class_names=[str(c) for c in range(6)])
    with pytest.raises(BadInputError, match=r"k=15 is larger than the train split \(n=14"):
        knn_predict(x_train, y_train, x_train, ks=(15,), exclude_self=True)
    knn_predict(x_train, y_train, x_train, ks=(14,), exclude_self=True)  # the largest k leave-one-out allows


@pytest.mark.parametrize("where,bad", [("train", np.nan), ("query", np.inf), ("train", -np.inf)])
def test_non_finite_features_raise(where, bad):
    x_train, y_train, x_query, _ = make_data(seed=11)
    target = x_train if where == "train" else x_query
    target[7, 3] = bad
    with pytest.raises(BadInputError, match=f"block 3 \\(cls\\): row 7 of the {where} rows has NaN or Inf"):
        knn_predict(x_train, y_train, x_query, ks=(5,), name="block 3 (cls)")
    with pytest.raises(BadInputError, match="NaN or Inf"):
        knn_predict(x_train, y_train, x_query, ks=(5,), standardize=True, shard_size=50)


def test_bad_inputs_raise():
    x_train, y_train, x_query, _ = make_data(seed=12)
    with pytest.raises(BadInputError, match="dimensions"):
        knn_predict(x_train, y_train, x_query[:, :5], ks=(5,))
    with pytest.raises(BadInputError, match="labels"):
        knn_predict(x_train, y_train[:-1], x_query, ks=(5,))
    with pytest.raises(BadInputError, match="weighting"):
        knn_predict(x_train, y_train, x_query, ks=(5,), weighting="distance")
    with pytest.raises(BadInputError, match="leave-one-out"):
        knn_predict(x_train, y_train, x_query, ks=(5,), exclude_self=True)


def test_threads_bound_faiss_during_the_search_and_are_restored(monkeypatch):
    """``threads`` holds FAISS (and the BLAS/torch pools, `mimprobe._threads.cpu_threads`) to that many threads
    while it searches, and the previous counts come back afterwards."""
    import faiss

    from mimprobe.metrics import knn_search as knn_module

    seen = []
    original = faiss.knn

    def recording(*args, **kwargs):
        seen.append(faiss.omp_get_max_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(knn_module.faiss, "knn", recording)
    before = faiss.omp_get_max_threads()
    rng = np.random.default_rng(0)
    bank, query = rng.normal(size=(50, 8)).astype(np.float32), rng.normal(size=(10, 8)).astype(np.float32)
    target = 1 if before != 1 else 2
    knn_neighbors(bank, query, 3, threads=target)
    assert seen and set(seen) == {target}
    assert faiss.omp_get_max_threads() == before
