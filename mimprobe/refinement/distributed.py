"""Process-group helpers for refinement under ``torchrun`` (NCCL on GPU, gloo on CPU).

The same command runs with one process or many: `init_distributed` reads torchrun's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and returns a `DistContext` (its `Ranks` and device); without it everything degrades to
single-process no-ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from .._ranks import Ranks, join


@dataclass(frozen=True)
class DistContext:
    """Where this training process stands among torchrun's (`mimprobe._ranks.Ranks`: rank, world size, the device
    of its collectives), and the device it computes on (``cuda:LOCAL_RANK`` under torchrun on GPUs)."""

    ranks: Ranks = Ranks()
    device: torch.device = torch.device("cpu")


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group torchrun set up (backend NCCL for CUDA, gloo for CPU), or run alone: the one
    joining mechanism of every command (`mimprobe._ranks.join`, whose long timeout also covers rank 0 profiling
    alone for ``refine --auto`` while the others wait).

    Args:
        device: The resolved device; for CUDA each process takes ``cuda:LOCAL_RANK``.
    """
    ranks, device = join(device)
    return DistContext(ranks=ranks, device=device)


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor's rows from every process in rank order (no gradient; for queue entries)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every process when ``flag`` is true on any (e.g. one of them received SIGTERM)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def mean_over_processes(value: torch.Tensor) -> torch.Tensor:
    """The mean of a detached tensor over processes (element-wise), for logging."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


class CrossProcessBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the batch of every process, on any device.

    ``torch.nn.SyncBatchNorm`` accepts only GPU inputs, so CPU (gloo) runs use this: the per-feature sum, then the
    per-feature sum of squared deviations from the global mean, are all-reduced with autograd
    (``torch.distributed.nn.functional.all_reduce``). That gives the normalisation and gradients of one BatchNorm
    over the concatenated batch; the two passes keep the variance exact where features sit far from zero
    (``E[x^2] - E[x]^2`` cancels catastrophically in float32 at an offset of 1e4). Outside training or without a
    process group it is a BatchNorm1d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, features)
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        x32 = x.float()
        count = torch.tensor([float(x.shape[0])], device=x.device)
        dist.all_reduce(count)                                         # rows of every process
        mean = all_reduce(x32.sum(0)) / count                          # (features,)
        centred = x32 - mean                                           # (batch, features)
        var = all_reduce((centred * centred).sum(0)) / count           # biased, as BatchNorm normalises
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                # momentum None: a cumulative average, as torch's BatchNorm
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (count / (count - 1).clamp_min(1.0))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        y = centred * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


def convert_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """For several processes: torch's SyncBatchNorm on CUDA, `CrossProcessBatchNorm1d` elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            replacement = CrossProcessBatchNorm1d(child.num_features, eps=child.eps, momentum=child.momentum,
                                                  affine=child.affine,
                                                  track_running_stats=child.track_running_stats)
            replacement.load_state_dict(child.state_dict())
            setattr(module, name, replacement.to(next(child.buffers(), torch.empty(0)).device))
        else:
            convert_batchnorm(child, device)
    return module
