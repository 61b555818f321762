"""k-NN backends side by side: FAISS on the CPU, torch on the CPU, torch on CUDA (when present).

Run from the repository root::

    python benchmarks/knn_backends.py                       # 50,000 x 10,000 x 768, the issue's GPU check size
    python benchmarks/knn_backends.py --n-train 5000 --n-query 1000 --dim 128   # a quick run
    python benchmarks/knn_backends.py --memory-budget 200000000                  # the bank streamed in shards

Features: seeded, class-structured (100 classes), decaying spectrum (std 1/sqrt(i) along axis i) with a common
offset, float32. Every backend runs ``knn_predict`` with the ``dino`` preset (k=20, T=0.07, exp votes); the table
gives its wall time (best of ``--repeats``) and how many top-1 predictions differ from FAISS', split into queries
whose 20th and 21st similarities are within 1e-6 (which float32 GEMMs alone would order either way; the float64
re-ranking of the candidates should make these 0 too) and the others, which must be 0. Prints a markdown table;
exit status 1 when a prediction away from a near-tie differs.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from mimprobe.metrics.knn import PRESETS, knn_neighbors, knn_predict

GAP = 1e-6


def features(n_train: int, n_query: int, dim: int, num_classes: int, seed: int):
    rng = np.random.default_rng(seed)
    scale = (1.0 / np.sqrt(np.arange(1, dim + 1))).astype(np.float32)
    centers = rng.standard_normal((num_classes, dim)).astype(np.float32) * 0.5
    offset = rng.standard_normal(dim).astype(np.float32)

    def draw(n):
        labels = rng.integers(0, num_classes, n)
        rows = (centers[labels] + rng.standard_normal((n, dim), dtype=np.float32)) * scale + offset
        return rows.astype(np.float32), labels

    (x_train, y_train), (x_query, _) = draw(n_train), draw(n_query)
    return x_train, y_train, x_query


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=50_000)
    parser.add_argument("--n-query", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--memory-budget", type=int, default=None, help="bytes, for every backend")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of FAISS and torch")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    preset = PRESETS["dino"]
    k, temperature = preset.ks[0], preset.temperatures[0]
    x_train, y_train, x_query = features(args.n_train, args.n_query, args.dim, args.classes, args.seed)
    sims, _ = knn_neighbors(x_train, x_query, k + 1, threads=args.threads)
    near_tie = sims[:, k - 1] - sims[:, k] <= GAP
    runs = [("faiss", "cpu")] + [("torch", "cpu")] + ([("torch", "cuda")] if torch.cuda.is_available() else [])
    common = dict(ks=(k,), temperatures=(temperature,), weighting=preset.weighting, num_classes=args.classes,
                  memory_budget=args.memory_budget, threads=args.threads)
    reference, failed = None, False
    print(f"k-NN, dino preset (k={k}), {args.n_train:,} train x {args.n_query:,} queries x {args.dim} dims, "
          f"{args.classes} classes, memory budget {args.memory_budget or 'none'}; "
          f"{int(near_tie.sum())} queries with a near-tie at k\n")
    print("| backend | device | best time (s) | top-1 differing from FAISS: near-ties / others |")
    print("|---|---|---:|---:|")
    for backend, device in runs:
        times = []
        for _ in range(args.repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            predicted = knn_predict(x_train, y_train, x_query, backend=backend, device=device, **common)
            times.append(time.perf_counter() - start)
        top1 = predicted.predictions(k, temperature)
        if reference is None:
            reference = top1
        differ = top1 != reference
        others = int((differ & ~near_tie).sum())
        failed |= others > 0
        print(f"| {backend} | {device} | {min(times):.2f} | {int((differ & near_tie).sum())} / {others} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
