"""k-NN sharded over 2 gloo processes (torchrun) against the same calls in one process.

The test writes the inputs, launches this file under ``torch.distributed.run`` (the ``__main__`` block below is
the per-rank worker), and compares each rank's neighbours, predictions and rows with one process. Both backends,
a memory budget that streams each rank's shard, leave-one-out (a query's own row sits in either rank's shard),
standardisation (moments merged across ranks), a bank smaller than the world's top-k lists, and a NaN in the
second rank's shard (every rank must raise, none may hang).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mimprobe.errors import BadInputError
from mimprobe.metrics.knn import evaluate_knn_with_hits, knn_neighbors

CLASSES = [str(c) for c in range(6)]


def make_inputs(folder: Path) -> None:
    """Class-structured float16 features saved as .npy (memory-mapped by the workers), plus duplicated rows."""
    rng = np.random.default_rng(0)
    dim, n_train, n_query = 24, 301, 67  # odd sizes: the two shards differ by one row
    centers = rng.standard_normal((6, dim)) * 0.6  # overlapping classes: accuracies well below 1
    y_train, y_query = rng.integers(0, 6, n_train), rng.integers(0, 6, n_query)
    offset = rng.standard_normal(dim) * 2
    np.save(folder / "train.npy", (centers[y_train] + rng.standard_normal((n_train, dim)) + offset).astype(np.float16))
    np.save(folder / "query.npy", (centers[y_query] + rng.standard_normal((n_query, dim)) + offset).astype(np.float16))
    np.save(folder / "y_train.npy", y_train)
    np.save(folder / "y_query.npy", y_query)
    base = rng.standard_normal((30, 8)).astype(np.float32)
    np.save(folder / "twins.npy", np.concatenate([base, base]))  # row i's twin is row i + 30, in the other shard
    bad = np.load(folder / "train.npy").astype(np.float32)
    bad[250, 5] = np.nan  # in rank 1's shard [150, 301)
    np.save(folder / "bad.npy", bad)


class LazyRows:
    """A bank that copies on slicing (as the profile's lazy row subsets do) and records the rows it was asked for."""

    ndim = 2

    def __init__(self, source):
        self.source, self.shape, self.dtype, self.reads = source, source.shape, source.dtype, []

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, index):
        start, stop, _ = index.indices(self.shape[0])
        self.reads.append((start, stop))
        return np.array(self.source[index])


def run_cases(folder: Path, process_group=None) -> dict[str, object]:
    """Every case, as arrays and JSON-able rows, with or without a process group."""
    train = np.load(folder / "train.npy", mmap_mode="r")
    query = np.load(folder / "query.npy", mmap_mode="r")
    y_train, y_query = np.load(folder / "y_train.npy"), np.load(folder / "y_query.npy")
    twins = np.load(folder / "twins.npy")
    group = {"process_group": process_group}
    out: dict[str, object] = {}
    for backend, plan in (("faiss", {}), ("torch", {}), ("faiss", {"memory_budget": 70_000}),
                          ("torch", {"memory_budget": 70_000, "chunk_size": 16})):
        tag = f"{backend}{'-budget' if plan else ''}"
        for exclude_self in (False, True):
            bank_query = train if exclude_self else query
            sims, idx = knn_neighbors(train, bank_query, 9, exclude_self=exclude_self, standardize=True,
                                      backend=backend, **plan, **group)
            out[f"{tag}-loo{int(exclude_self)}-sims"], out[f"{tag}-loo{int(exclude_self)}-idx"] = sims, idx
        if plan:  # room for dinov2's 201 neighbours per query, each rank's shard searched 40 rows at a time
            plan = {**plan, "memory_budget": 3_000_000, "shard_size": 40}
        for preset, exclude_self in (("mim-refiner", False), ("dinov2", True), ("dino", False)):
            rows, hits = evaluate_knn_with_hits(train, y_train, train if exclude_self else query,
                                                y_train if exclude_self else y_query, preset=preset, split="s",
                                                class_names=CLASSES, exclude_self=exclude_self, backend=backend,
                                                **plan, **group)
            out[f"{tag}-{preset}-rows"] = [(r.metric, json.dumps(r.params, sort_keys=True), r.value) for r in rows]
            for (k, t), hit in hits.items():
                out[f"{tag}-{preset}-hits-{k}"] = hit
    out["twins-idx"] = knn_neighbors(twins, twins, 1, exclude_self=True, **group)[1]
    out["tiny-idx"] = knn_neighbors(twins[:3], twins[3:9], 3, backend="torch", **group)[1]  # 1 + 2 bank rows
    out["one-row-sims"] = knn_neighbors(twins[:1], twins[3:9], 1, **group)[0]  # rank 0's shard is empty
    lazy = LazyRows(train)
    out["lazy-idx"] = knn_neighbors(lazy, query, 9, standardize=True, backend="torch", chunk_size=40, **group)[1]
    spans = np.array(lazy.reads)
    out["lazy-reads"] = np.array([spans[:, 0].min(), spans[:, 1].max(), (spans[:, 1] - spans[:, 0]).max()])
    bad = np.load(folder / "bad.npy", mmap_mode="r")
    for case, standardize in (("bad", False), ("bad-standardize", True)):  # fails in the search / the moments
        try:
            knn_neighbors(bad, query, 5, standardize=standardize, **group)
            out[case] = "no error"
        except BadInputError as error:
            out[case] = str(error)
    return out


@pytest.mark.distributed
def test_two_gloo_processes_equal_one_process(tmp_path):
    make_inputs(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               __file__, str(tmp_path)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert finished.returncode == 0, finished.stderr[-3000:]
    single = run_cases(tmp_path)
    for case in ("bad", "bad-standardize"):
        assert single[case].startswith("features: row 250 of the train rows has NaN or Inf")
    assert (single["twins-idx"][:, 0] == (np.arange(60) + 30) % 60).all()
    top1 = [value for metric, _, value in single["faiss-dino-rows"] if metric == "knn_top1"]
    assert 0.3 < top1[0] < 0.9  # a test on easy data would not tell neighbours apart
    for rank in (0, 1):
        sharded = np.load(tmp_path / f"rank{rank}.npz", allow_pickle=False)
        rows = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for key, expected in single.items():
            if key.endswith("-rows"):
                assert [tuple(row) for row in rows[key]] == expected, key
            elif key == "lazy-reads":  # each rank read its own shard only, never all of it at once
                first, last = (0, 150) if rank == 0 else (150, 301)
                assert sharded[key][0] == first and sharded[key][1] == last
                assert sharded[key][2] < last - first, "the shard was read in one piece"
                np.testing.assert_array_equal(expected[:2], [0, 301])
            elif key.startswith("bad"):
                where = "" if rank == 1 else "k-NN failed on rank 1 of the process group: "
                assert rows[key] == where + expected, key
            else:  # neighbours and similarities exactly: every split ranks by float64 products of the same rows
                np.testing.assert_array_equal(sharded[key], expected, err_msg=key)


def test_a_process_group_needs_torch_distributed():
    x = np.random.default_rng(1).standard_normal((20, 4)).astype(np.float32)
    with pytest.raises(BadInputError, match="torch.distributed is not initialised"):
        knn_neighbors(x, x, 3, process_group=object())


if __name__ == "__main__":  # one rank of the torchrun launch in test_two_gloo_processes_equal_one_process
    import torch.distributed as dist

    from mimprobe.metrics.knn import default_process_group

    folder = Path(sys.argv[1])
    dist.init_process_group("gloo")
    world = default_process_group()
    assert world is not None and dist.get_world_size() == 2
    results = run_cases(folder, process_group=world)
    arrays = {key: value for key, value in results.items() if isinstance(value, np.ndarray)}
    np.savez(folder / f"rank{dist.get_rank()}.npz", **arrays)
    others = {key: value for key, value in results.items() if not isinstance(value, np.ndarray)}
    (folder / f"rank{dist.get_rank()}.json").write_text(json.dumps(others))
    dist.barrier()  # no rank tears gloo down while another's last collective is in flight
    dist.destroy_process_group()
