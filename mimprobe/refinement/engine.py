"""One NNA refinement's training state and steps (MIM-Refiner, arXiv 2402.10093): the two stages' optimisers
(heads only, then heads and encoder), one optimisation step over the heads' multi-view NNA losses with their
neighbour queues, the EMA of the encoder, and the state a checkpoint saves. `mimprobe.refinement.trainer` runs it.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn

from .._device import autocast
from .augment import MultiViewDataset, collate_views
from .config import RefineConfig
from .distributed import DistContext, gather_no_grad, mean_over_processes
from .loss import multi_view_nna_loss
from .network import RefineNetwork
from .optim import ema_progress, make_ema, param_groups, set_trainable
from .schedules import StagePlan, stage_lr

FORMAT_VERSION = 1        # of checkpoint-last.pth's training state


def _step_generator(seed: int, step: int, rank: int, block: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(int(np.random.SeedSequence([seed, step, rank, block, 7]).generate_state(1)[0]))
    return generator


class Trainer:
    """The mutable training state and one epoch's loop."""

    def __init__(self, *, network: RefineNetwork, queues: nn.ModuleDict, config: RefineConfig, plan: StagePlan,
                 ctx: DistContext, precision: str, dataset: MultiViewDataset, sampler, micro: int,
                 start_weights: dict[str, torch.Tensor]):
        self.network, self.queues, self.config, self.plan, self.ctx = network, queues, config, plan, ctx
        self.start_weights = start_weights   # the encoder's parameters before training (CPU), for ema_progress
        self.precision, self.dataset, self.sampler, self.micro = precision, dataset, sampler, micro
        self.step = 0              # optimiser steps done
        self.epoch = 0             # epoch in progress (or the next one)
        self.batch_in_epoch = 0    # optimiser steps done in this epoch
        self.stage = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.model: nn.Module = network
        self.ema = None
        self._pending_optimizer_state = None

    # -- stages
    def _enter_stage(self, stage: int) -> None:
        if stage == self.stage:
            return
        set_trainable(self.network, stage=stage, freeze_blocks=self.config.freeze_blocks)
        self.network.heads.train()
        groups = param_groups(self.network, self.config, stage)
        self.optimizer = torch.optim.AdamW(groups, lr=self.config.lr, betas=self.config.betas,
                                           fused=self.ctx.device.type in ("cpu", "cuda"))  # one kernel per step
        if self.ctx.ranks.distributed:
            import gc

            from torch.nn.parallel import DistributedDataParallel

            # the previous stage's wrapper must go first: its reducer's gradient hooks are removed with it
            self.model = self.network
            gc.collect()
            ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.network, device_ids=ids, broadcast_buffers=False)
        if stage == 2 and self.ema is None:
            self.ema = make_ema(self.network.encoder, self.config)
        self.stage = stage

    def _update_ema(self) -> None:
        """One EMA update after the optimiser step (the official ``EmaCallback._track_after_update_step``)."""
        if self.config.ema_warmup:
            self.ema.update(self.network.encoder, step=self.step - self.plan.heads_steps)
        else:
            self.ema.update(self.network.encoder)  # no step: timm applies ema_decay itself, from the first update

    # -- one epoch
    def run_epoch(self) -> Iterator[dict[str, Any]]:
        stage = self.plan.stage(self.epoch)
        self._enter_stage(stage)
        if self._pending_optimizer_state is not None:
            self.optimizer.load_state_dict(self._pending_optimizer_state)
            self._pending_optimizer_state = None
        self.sampler.set_epoch(self.epoch)
        self.dataset.set_epoch(self.epoch)
        per_step = self.micro * self.config.accumulate
        order = list(iter(self.sampler))[: self.plan.steps_per_epoch * per_step]
        remaining = order[self.batch_in_epoch * per_step:]
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.micro, sampler=remaining,
                                             num_workers=self.config.num_workers, collate_fn=collate_views,
                                             drop_last=True, pin_memory=self.ctx.device.type == "cuda")
        batches = iter(loader)
        while self.batch_in_epoch < self.plan.steps_per_epoch:
            started = time.perf_counter()
            record = self._train_step([next(batches) for _ in range(self.config.accumulate)], stage)
            seconds = time.perf_counter() - started
            record.update(images_per_second=self.config.batch_size / seconds, seconds=round(seconds, 4))
            if stage == 2 and self.batch_in_epoch == self.plan.steps_per_epoch and self.ctx.ranks.is_main:
                record["ema_progress"] = self.ema_progress()   # once per full-stage epoch, at its last step
            yield record

    def end_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0

    def _train_step(self, micro_batches: list, stage: int) -> dict[str, Any]:
        lr = stage_lr(self.config, self.plan, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        topk = 1 if stage == 1 else self.config.topk
        totals = torch.zeros(len(self.config.head_blocks), device=self.ctx.device)  # per head, detached
        for views, indices in micro_batches:
            views = [v.to(self.ctx.device, non_blocking=True) for v in views]
            indices = indices.to(self.ctx.device)
            with autocast(self.ctx.device, self.precision):
                outputs = self.model(views)
            loss = torch.zeros((), device=self.ctx.device)
            for block in self.config.head_blocks:
                projections, predictions = outputs[block]
                queue = self.queues[str(block)]
                generator = _step_generator(self.config.seed, self.step, self.ctx.ranks.rank, block, self.ctx.device)
                neighbours = [queue.find_neighbours(projections[a].detach().float(), indices, topk=topk,
                                                    generator=generator) for a in range(2)]
                head_loss = multi_view_nna_loss(projections[:2], neighbours, predictions,
                                                temperature=self.config.temperature, num_global=2,
                                                gather=self.ctx.ranks.distributed)
                loss = loss + head_loss  # summed over heads (DESIGN.md)
                totals[self.config.head_blocks.index(block)] += head_loss.detach() / len(micro_batches)
                queue.update(gather_no_grad(projections[0].detach().float()), gather_no_grad(indices))
            (loss / len(micro_batches)).backward()
        if self.config.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.config.clip_grad)
        self.optimizer.step()
        if stage == 2 and self.ema is not None:
            self._update_ema()
        self.step += 1
        self.batch_in_epoch += 1
        per_head = mean_over_processes(totals).tolist()  # one reduction and one device sync per step
        record = {"step": self.step, "stage": stage, "epoch": self.epoch, "loss": sum(per_head), "lr": lr}
        record.update({f"loss_block{b}": value for b, value in zip(self.config.head_blocks, per_head)})
        return record

    # -- state
    def state_dict(self, resolved: dict[str, Any]) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "resolved": resolved, "step": self.step, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "stage": self.stage,
                "encoder": self.network.encoder.state_dict(), "heads": self.network.heads.state_dict(),
                "queues": self.queues.state_dict(),
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "rng": {"torch": torch.get_rng_state()}}

    def load_state(self, state: dict[str, Any]) -> None:
        self.network.encoder.load_state_dict(state["encoder"])
        self.network.heads.load_state_dict(state["heads"])
        self.queues.load_state_dict(state["queues"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        if state["ema"] is not None:
            self.ema = make_ema(self.network.encoder, self.config)
            self.ema.load_state_dict(state["ema"])
        if state["stage"]:
            # rebuild the saved stage's optimiser now if the epoch to run is still in it; else the next stage
            # starts fresh (its optimiser is new by design)
            if self.epoch < self.plan.epochs_heads + self.plan.epochs and self.plan.stage(self.epoch) == state["stage"]:
                self._pending_optimizer_state = state["optimizer"]
        torch.set_rng_state(state["rng"]["torch"])

    def ema_progress(self) -> float | None:
        """`ema_progress` of the current EMA against the current encoder (None without an EMA)."""
        if self.ema is None:
            return None
        return ema_progress(self.start_weights, dict(self.network.encoder.named_parameters()),
                            dict(self.ema.module.named_parameters()))

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA encoder after stage 2 (the evaluated and exported model in MIM-Refiner), else the encoder."""
        module = self.ema.module if self.ema is not None else self.network.encoder
        return module.state_dict()
