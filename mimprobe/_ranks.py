"""Where this process stands among the processes ``torchrun`` started, for the commands every rank runs
(`extract`, `profile`): join the process group (NCCL on CUDA, gloo on CPU) only when launched by torchrun.

Ranks share nothing but the filesystem and these collectives: a barrier, an agreement (did every rank succeed?)
and a sum. A worker stops with its launcher: torchrun's agent forwards SIGTERM/SIGINT to its workers, and if the
agent itself dies (``kill -9``, a lost terminal) the kernel sends each worker SIGTERM (`stop_with_the_launcher`),
which stops an extraction (it resumes from its recorded batches) and makes refine save its checkpoint. `mimprobe.refinement.distributed` joins the group through `join` too and adds the refinement's own
helpers (gathers, SyncBatchNorm).
"""

from __future__ import annotations

import ctypes
import datetime
import os
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Rank 0 alone takes the store lock (possibly waiting for another run) and, in `profile`, runs the probes while the
# other ranks wait at a collective: far longer than torch's default 10-30 min timeout.
TIMEOUT = datetime.timedelta(hours=24)


@dataclass(frozen=True)
class Ranks:
    """This process's ``rank`` of ``world_size``, and the device its collectives use."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 takes locks, creates and finalises stores, writes reports and prints."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """torchrun's environment with more than one process (one process behaves as a plain run)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def join(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join torchrun's process group (once per process), or run alone.

    Args:
        device: The resolved device; on CUDA each process takes ``cuda:LOCAL_RANK``.

    Returns:
        (ranks, the device this process computes on).
    """
    if not launched_by_torchrun():
        return Ranks(device=torch.device("cpu")), device
    stop_with_the_launcher()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    collective_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    return Ranks(rank=dist.get_rank(), world_size=dist.get_world_size(), device=collective_device), device


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def stop_with_the_launcher() -> bool:
    """Have the kernel send this process SIGTERM when its parent (torchrun's agent) dies, however it dies (Linux's
    ``prctl(PR_SET_PDEATHSIG)``); otherwise workers killed out of their launcher wait in a collective for the
    24-hour timeout. Returns whether it is armed (False off Linux: stop the workers by their own pids there).
    """
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the launcher died just before: act as the kernel would have
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def current() -> Ranks:
    """The process group already joined (by `join`), or a single process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else \
            torch.device("cpu")
        return Ranks(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)
    return Ranks()


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


def all_succeeded(ranks: Ranks, ok: bool) -> bool:
    """True on every rank when ``ok`` is true on every rank (a rank that fails says so before it raises, so the
    others stop instead of waiting for it at the next barrier)."""
    if not ranks.distributed:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=ranks.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def total(ranks: Ranks, value: int) -> int:
    """The sum of an integer over ranks."""
    if not ranks.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=ranks.device)
    dist.all_reduce(tensor)
    return int(tensor.item())


__all__ = ["Ranks", "all_succeeded", "barrier", "current", "join", "launched_by_torchrun", "total"]
