"""The torch k-NN backend (chunked matmul + topk, CPU here, CUDA when present) against the FAISS backend.

Both prepare bit-identical float32 rows (`_knn_rows.prepare`) and re-rank their float32 GEMM candidates by float64
similarity (`knn.rescore`), so on the CPU they must return identical neighbours, similarities, votes and rows
(no tolerance), although the two GEMMs round differently; a float64 brute force checks the re-ranking itself on
data made of near-duplicates, where float32 GEMMs misorder neighbours.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mimprobe.errors import BadInputError
from mimprobe.metrics._knn_torch import TorchSearchPlan, plan_torch_search, torch_search
from mimprobe.metrics._knn_rows import prepare as _prepare
from mimprobe.metrics.knn import (PRESETS, evaluate_knn_with_hits, knn_neighbors, knn_predict,
                                  resolve_backend, standardization_stats)


def random_features(n_train=600, n_query=150, dim=32, num_classes=7, seed=0):
    """Isotropic Gaussian features with random labels: the hardest case for neighbour order (no structure)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n_train, dim)).astype(np.float32), rng.integers(0, num_classes, n_train),
            rng.standard_normal((n_query, dim)).astype(np.float32), rng.integers(0, num_classes, n_query))


def spectrum_features(n_train=700, n_query=160, dim=48, num_classes=10, seed=1):
    """Class-structured features with a decaying spectrum (std 1/i along axis i) and a large common offset, as
    ViT block features: most similarities are high and close together, and standardising changes the neighbours."""
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.arange(1, dim + 1)
    centers = rng.standard_normal((num_classes, dim)) * 1.2
    offset = rng.standard_normal(dim) * 3 * scale.sum() / dim

    def draw(n):
        labels = rng.integers(0, num_classes, n)
        return ((centers[labels] + rng.standard_normal((n, dim))) * scale + offset).astype(np.float32), labels

    (x_train, y_train), (x_query, y_query) = draw(n_train), draw(n_query)
    return x_train, y_train, x_query, y_query


def assert_same_neighbors(reference, ours, *, rtol: float = 0.0):
    (ref_sims, ref_idx), (sims, idx) = reference, ours
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sims, ref_sims, rtol=rtol, atol=0)


def assert_backends_agree(train, train_labels, query, query_labels, preset, *, exclude_self=False, **plan):
    preset = PRESETS[preset]
    k = max(preset.ks)
    if plan.pop("budget", None):
        plan = streaming_budget(train, query, k + int(exclude_self))
    common = dict(exclude_self=exclude_self, standardize=preset.standardize)
    # the same neighbours; with a streamed bank the standardisation's moments are summed in other chunks, so the
    # float32 rows (hence their similarities) may differ in the last bit: 1e-6 relative
    assert_same_neighbors(knn_neighbors(train, query, k, **common),
                          knn_neighbors(train, query, k, backend="torch", device="cpu", **common, **plan),
                          rtol=1e-6 if plan and preset.standardize else 0.0)
    names = [str(c) for c in range(int(max(train_labels.max(), query_labels.max())) + 1)]
    args = dict(preset=preset, split="test", class_names=names, exclude_self=exclude_self)
    faiss_rows, faiss_hits = evaluate_knn_with_hits(train, train_labels, query, query_labels, **args)
    torch_rows, torch_hits = evaluate_knn_with_hits(train, train_labels, query, query_labels, backend="torch",
                                                    **args, **plan)
    assert torch_rows == faiss_rows
    assert faiss_hits.keys() == torch_hits.keys()
    for key in faiss_hits:
        np.testing.assert_array_equal(torch_hits[key], faiss_hits[key])
    predict = dict(ks=preset.ks, temperatures=preset.temperatures, weighting=preset.weighting,
                   num_classes=len(names), keep_scores=True, **common)
    faiss_pred = knn_predict(train, train_labels, query, **predict)
    torch_pred = knn_predict(train, train_labels, query, backend="torch", **predict, **plan)
    for key in faiss_pred.ranked:
        np.testing.assert_array_equal(torch_pred.ranked[key], faiss_pred.ranked[key])
        # the float64 re-ranking sums a dot product in each library's order: votes agree to rounding (exp(sim/T)
        # magnifies a 1e-16 similarity difference to ~1e-9 relative), the ranked classes and hits exactly
        np.testing.assert_allclose(torch_pred.scores[key], faiss_pred.scores[key], rtol=1e-7, atol=0)


# the bank whole; query chunks and bank shards that divide nothing; "budget": a memory budget that streams the bank
SMALL_PLANS = [{}, {"chunk_size": 23, "shard_size": 97}, "budget"]


def streaming_budget(train, query, search_k):
    """A memory budget (bytes) under which the torch planner holds about half the bank per shard."""
    bank, results = train.shape[0] * train.shape[1] * 4, len(query) * search_k * 16
    return {"memory_budget": int((results + bank) * 4 / 3), "shard_size": len(train) // 3 + 1}


@pytest.mark.parametrize("plan", SMALL_PLANS)
@pytest.mark.parametrize("preset", ["mim-refiner", "dino", "dinov2"])
def test_torch_equals_faiss_on_random_features(preset, plan):
    assert_backends_agree(*random_features(), preset, **_plan(plan))


@pytest.mark.parametrize("plan", SMALL_PLANS)
@pytest.mark.parametrize("preset", ["mim-refiner", "dino", "dinov2"])
def test_torch_equals_faiss_on_decaying_spectrum_features(preset, plan):
    assert_backends_agree(*spectrum_features(), preset, **_plan(plan))


@pytest.mark.parametrize("plan", SMALL_PLANS)
@pytest.mark.parametrize("preset", ["mim-refiner", "dinov2"])
def test_torch_equals_faiss_leave_one_out(preset, plan):
    x_train, y_train, _, _ = spectrum_features(n_train=500, seed=2)
    assert_backends_agree(x_train, y_train, x_train, y_train, preset, exclude_self=True, **_plan(plan))


def _plan(plan):
    return {"budget": True} if plan == "budget" else plan


def test_small_budget_streams_the_bank():
    plan = plan_torch_search(700, 160, 48, 21, memory_budget=160_000)
    assert plan.sharded(700) and plan.chunk_rows < 160
    per_row = 48 * 8 + 21 * 60
    used = plan.shard_rows * 48 * 4 + 160 * 21 * 16 + plan.chunk_rows * (per_row + 8 * plan.tile_rows)
    assert used <= 160_000
    # without a budget, a (chunk, tile) similarity block is 256 MiB: 8192 queries x 8192 bank rows
    assert plan_torch_search(1_000_000, 50_000, 768, 11) == TorchSearchPlan(8192, 1_000_000, 8192)
    whole = plan_torch_search(700, 160, 48, 21, memory_budget=100_000_000)
    assert not whole.sharded(700) and whole.chunk_rows == 160 and whole.tile_rows == 700
    with pytest.raises(BadInputError, match="raise the budget"):
        plan_torch_search(700, 160, 48, 201, memory_budget=100_000)


def float64_reference(train, query, k, *, exclude_self=False, stats=None):
    """Neighbours by the float64 similarity of the prepared (standardised, L2-normalised float32) rows."""
    a = _prepare(train, 0, len(train), None, stats, 64, "train", "f").astype(np.float64)
    b = _prepare(query, 0, len(query), None, stats, 64, "query", "f").astype(np.float64)
    full = b @ a.T
    if exclude_self:
        np.fill_diagonal(full, -np.inf)
    order = np.argsort(-full, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(full, order, axis=1).astype(np.float32), order


def near_duplicates(seed=7):
    """30 directions, each 12 times with a 1e-7 perturbation: neighbours whose similarities differ by about the
    rounding of a float32 dot product; queries near the directions."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((30, 64))
    train = np.repeat(base, 12, axis=0) * (1 + 1e-7 * rng.standard_normal((360, 64)))
    query = base[rng.integers(0, 30, 40)] + 0.1 * rng.standard_normal((40, 64))
    return train.astype(np.float32), query.astype(np.float32)


def test_near_duplicates_are_ranked_by_float64_similarity():
    import faiss

    train, query = near_duplicates()
    ref_sims, ref_idx = float64_reference(train, query, 5)
    prepared = [_prepare(x, 0, len(x), None, None, 64, "r", "f") for x in (train, query)]
    _, raw = faiss.knn(prepared[1], prepared[0], 5, metric=faiss.METRIC_INNER_PRODUCT)
    assert (raw != ref_idx).any(), "float32 GEMM order should differ from the float64 order on these data"
    for backend, plan in (("faiss", {}), ("torch", {}), ("faiss", {"shard_size": 50}),
                          ("torch", {"shard_size": 50, "chunk_size": 7})):
        sims, idx = knn_neighbors(train, query, 5, backend=backend, **plan)
        np.testing.assert_array_equal(idx, ref_idx, err_msg=f"{backend} {plan}")
        np.testing.assert_array_equal(sims, ref_sims, err_msg=f"{backend} {plan}")


@pytest.mark.parametrize("exclude_self", [False, True])
def test_every_tile_and_shard_merge_is_exact(exclude_self):
    # direct plans with shards, tiles and chunks that do not divide the rows, against the float64 brute force
    x_train, _, x_query, _ = spectrum_features(n_train=211, n_query=53, seed=3)
    query = x_train if exclude_self else x_query
    stats = standardization_stats(x_train)
    ref_sims, ref_idx = float64_reference(x_train, query, 12, exclude_self=exclude_self, stats=stats)
    for plan in (TorchSearchPlan(chunk_rows=10, shard_rows=211, tile_rows=13),
                 TorchSearchPlan(chunk_rows=53, shard_rows=40, tile_rows=7),
                 TorchSearchPlan(chunk_rows=17, shard_rows=29, tile_rows=29)):
        sims = np.empty((len(query), 12), np.float32)
        idx = np.empty((len(query), 12), np.int64)
        for start, s, i in torch_search(x_train, query, 12, exclude_self=exclude_self, stats=stats, plan=plan,
                                        device=torch.device("cpu"), threads=None, name="f"):
            sims[start:start + len(s)], idx[start:start + len(i)] = s, i
        np.testing.assert_array_equal(idx, ref_idx, err_msg=str(plan))
        np.testing.assert_array_equal(sims, ref_sims, err_msg=str(plan))


def test_leave_one_out_drops_self_among_duplicates():
    rng = np.random.default_rng(5)
    base = rng.standard_normal((40, 8)).astype(np.float32)
    x = np.concatenate([base, base, base])  # self ties with its two twins at similarity 1
    for plan in ({}, {"chunk_size": 10, "shard_size": 17}):
        sims, idx = knn_neighbors(x, x, 2, exclude_self=True, backend="torch", **plan)
        rows = np.arange(len(x))
        assert not (idx == rows[:, None]).any()
        np.testing.assert_array_equal(np.sort(idx, axis=1),
                                      np.sort(np.stack([(rows + 40) % 120, (rows + 80) % 120], 1), axis=1))
        np.testing.assert_allclose(sims, 1.0, atol=1e-6)


def test_float16_memmap_and_threads(tmp_path):
    x_train, _, x_query, _ = spectrum_features(n_train=300, n_query=70, seed=6)
    path = tmp_path / "train.npy"
    mapped = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=x_train.shape)
    mapped[:] = x_train
    mapped.flush()
    del mapped
    train = np.load(path, mmap_mode="r")
    threads = torch.get_num_threads()
    in_memory = np.asarray(train, np.float32)
    reference = knn_neighbors(in_memory, x_query, 10, standardize=True)
    torch.set_float32_matmul_precision("high")  # as training code may leave it (TF32 on CUDA)
    try:
        ours = knn_neighbors(train, x_query, 10, standardize=True, backend="torch", memory_budget=400_000,
                             threads=1)
        assert torch.get_float32_matmul_precision() == "high"  # set to "highest" only while searching
    finally:
        torch.set_float32_matmul_precision("highest")
    assert_same_neighbors(reference, ours)
    assert torch.get_num_threads() == threads  # restored


def test_backend_choice_and_bad_devices():
    assert resolve_backend(None, "cpu") == "faiss"
    assert resolve_backend(None, torch.device("cpu")) == "faiss"
    if torch.cuda.is_available():
        assert resolve_backend(None, "cuda") == resolve_backend(None, "auto") == "torch"
    assert resolve_backend("torch", "cpu") == "torch"
    x_train, _, x_query, _ = random_features(n_train=50, n_query=5)
    with pytest.raises(BadInputError, match="unknown k-NN backend 'annoy'"):
        knn_neighbors(x_train, x_query, 3, backend="annoy")
    with pytest.raises(BadInputError, match="FAISS k-NN backend runs on the CPU"):
        knn_neighbors(x_train, x_query, 3, backend="faiss", device="cuda")
    with pytest.raises(BadInputError, match="unknown device"):
        knn_neighbors(x_train, x_query, 3, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(BadInputError, match="no CUDA device is visible"):
            knn_neighbors(x_train, x_query, 3, device="cuda")
        assert resolve_backend(None, "auto") == "faiss"  # auto is the CPU here
    with pytest.raises(BadInputError, match="NaN or Inf"):
        bad = x_train.copy()
        bad[3, 1] = np.nan
        knn_neighbors(bad, x_query, 3, backend="torch")


@pytest.mark.gpu
@pytest.mark.parametrize("plan", [{}, {"memory_budget": 2_200_000}])
def test_cuda_equals_faiss(plan):
    x_train, y_train, x_query, y_query = spectrum_features()
    torch.set_float32_matmul_precision("high")  # as training code leaves it: the search must still be exact
    try:
        reference = knn_neighbors(x_train, x_query, 20)
        sims, idx = knn_neighbors(x_train, x_query, 20, device="cuda", **plan)
        np.testing.assert_array_equal(idx, reference[1])  # float64 re-ranking on the device: ties only at 1e-16
        np.testing.assert_allclose(sims, reference[0], rtol=0, atol=1e-7)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision("highest")


def cifar_block_features(root: Path) -> dict[str, np.ndarray]:
    """cls and mean-token features of every block of a random-init timm test_vit on the CIFAR-10 subset."""
    import timm
    from PIL import Image

    def load(split):
        files = sorted((root / split).glob("*/*"))
        classes = sorted({f.parent.name for f in files})
        images = np.stack([np.asarray(Image.open(f).convert("RGB"), np.float32) for f in files]) / 255.0
        images = torch.from_numpy((images - 0.5) / 0.5).permute(0, 3, 1, 2)  # (n, 3, 32, 32)
        return images, np.array([classes.index(f.parent.name) for f in files])

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, img_size=32).eval()
    out = {}
    for split in ("train", "test"):
        images, labels = load(split)
        with torch.inference_mode():
            blocks = model.forward_intermediates(images, intermediates_only=True, output_fmt="NLC",
                                                 return_prefix_tokens=True)
        out[f"{split}_labels"] = labels
        for b, (tokens, prefix) in enumerate(blocks):
            out[f"{split}_{b}_cls"] = prefix[:, 0].numpy()
            out[f"{split}_{b}_mean"] = tokens.mean(1).numpy()
    return out


def test_torch_equals_faiss_on_real_cifar_features(cifar_subset):
    features = cifar_block_features(cifar_subset)
    y_train, y_test = features["train_labels"], features["test_labels"]
    checked = 0
    for block in (1, 3, 5):
        for pooling in ("cls", "mean"):
            x_train, x_test = features[f"train_{block}_{pooling}"], features[f"test_{block}_{pooling}"]
            for preset in ("mim-refiner", "dino"):
                assert_backends_agree(x_train, y_train, x_test, y_test, preset, budget=True)
                checked += 1
            assert_backends_agree(x_train, y_train, x_train, y_train, "mim-refiner", exclude_self=True,
                                  chunk_size=37, shard_size=61)
    assert checked == 12
