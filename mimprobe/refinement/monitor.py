"""The per-epoch k-NN monitor of a refinement (``--monitor N``): k-NN top-1 of every head block on a small labelled
subset, from the encoder and its EMA, written to monitor.csv."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .._device import autocast, resolve_precision
from .config import RefineConfig
from .distributed import DistContext
from .network import block_cls_tokens


class KnnMonitor:
    """k-NN top-1 of every head block on a small labelled subset, once per epoch (rank 0 computes, all wait)."""

    def __init__(self, source, data_config: dict[str, Any], config: RefineConfig, ctx: DistContext):
        from sklearn.model_selection import train_test_split

        from ..data.dataset import SplitDataset
        from ..data.transforms import build_eval_transform

        self.ctx, self.config = ctx, config
        train = source.splits["train"]
        rng = np.random.default_rng(config.seed)
        take = rng.permutation(len(train))[: config.monitor_images]
        eval_name = next((name for name in ("test", "val") if name in source.splits), None)
        transform = build_eval_transform(data_config)
        size = tuple(data_config["input_size"])
        if eval_name is None:
            bank, query = train_test_split(take, test_size=0.2, random_state=config.seed,
                                           stratify=train.labels[take])
            self.sets = [(SplitDataset(train, transform, size), bank, train.labels[bank]),
                         (SplitDataset(train, transform, size), query, train.labels[query])]
        else:
            evaluation = source.splits[eval_name]
            query = rng.permutation(len(evaluation))[: max(1, config.monitor_images // 4)]
            self.sets = [(SplitDataset(train, transform, size), take, train.labels[take]),
                         (SplitDataset(evaluation, transform, size), query, evaluation.labels[query])]
        self.class_names = list(source.classes)

    @torch.no_grad()
    def _features(self, encoder: nn.Module, dataset, rows: np.ndarray) -> dict[int, np.ndarray]:
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, rows.tolist()), batch_size=128,
                                             num_workers=self.config.num_workers)
        parts: dict[int, list[np.ndarray]] = {b: [] for b in self.config.head_blocks}
        for images, _index, _error in loader:
            with autocast(self.ctx.device, resolve_precision(self.config.precision, self.ctx.device)):
                tokens = block_cls_tokens(encoder, images.to(self.ctx.device), list(self.config.head_blocks))
            for block, value in tokens.items():
                parts[block].append(value.float().cpu().numpy())
        return {block: np.concatenate(chunks) for block, chunks in parts.items()}

    def run(self, trainer: Any, *, epoch: int) -> list[dict[str, Any]]:
        """Rows of monitor.csv for this epoch (``trainer``: the loop, for its step, stage plan, encoder and EMA)."""
        from ..metrics.knn import evaluate_knn

        rows: list[dict[str, Any]] = []
        if self.ctx.ranks.is_main:
            use_ema = trainer.ema is not None
            encoder = trainer.ema.module if use_ema else trainer.network.encoder
            was_training = encoder.training
            encoder.eval()
            (bank_set, bank_rows, bank_labels), (query_set, query_rows, query_labels) = self.sets
            bank = self._features(encoder, bank_set, bank_rows)
            query = self._features(encoder, query_set, query_rows)
            encoder.train(was_training)
            k = min(10, len(bank_rows))
            from dataclasses import replace

            from ..metrics.knn_presets import get_preset

            preset = replace(get_preset("mim-refiner"), ks=(k,), headline_k=k)  # k cut to a small bank
            for block in self.config.head_blocks:
                found = evaluate_knn(bank[block], bank_labels, query[block], query_labels, preset=preset,
                                     split="monitor", class_names=self.class_names)
                top1 = next(row.value for row in found if row.metric == "knn_top1")
                rows.append({"step": trainer.step, "epoch": epoch, "stage": trainer.plan.stage(epoch),
                             "encoder": "ema" if use_ema else "encoder", "block": block, "knn_top1": top1})
        if self.ctx.ranks.distributed:
            torch.distributed.barrier()
        return rows
