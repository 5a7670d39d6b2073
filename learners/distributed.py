"""Device and process-group set-up shared by the learners (torchrun: one process per device).

Under torchrun (WORLD_SIZE > 1) a learner joins the process group (NCCL on CUDA, gloo on CPU) and
wraps its module in DistributedDataParallel. Every rank draws the same global batch from the same
generator or cursor and trains on its own rows of it, so the data state, the RNG and a checkpoint
are the same on every rank, and the result does not depend on how many ranks share the batch.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def default_device() -> torch.device:
    """This process's device: the LOCAL_RANK-th GPU when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def distributed_setup(device: torch.device) -> tuple[int, int]:
    """(rank, world size); joins the torchrun process group when WORLD_SIZE > 1."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_slice(batch: int, rank: int, world_size: int) -> slice:
    """This rank's contiguous share of the rows of a global batch of `batch` rows (`world_size` divides it)."""
    per_rank = batch // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


def rank_rows(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous share of a global batch whose length `world_size` divides."""
    return batch[rank_slice(len(batch), rank, world_size)]


def global_mean(value: float, world_size: int, device: torch.device) -> float:
    """The mean of `value` over ranks (itself when there is one rank)."""
    if world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / world_size
