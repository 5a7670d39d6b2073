"""Device and process-group set-up shared by the learners (torchrun: one process per device).

Under torchrun (WORLD_SIZE > 1) a learner joins the process group (NCCL on CUDA, gloo on CPU) and
wraps its module in DistributedDataParallel. Every rank draws the same global batch from the same
generator or cursor and trains on its own rows of it, so the data state, the RNG and a checkpoint
are the same on every rank, and the result does not depend on how many ranks share the batch.
"""

from __future__ import annotations

import gc
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


def leave_process_group() -> None:
    """Leave the process group, every rank together, once nothing holds it: DistributedDataParallel
    modules no longer referenced are collected first, so the group's worker threads are joined here
    and not in the interpreter's teardown, where a rank once aborted ("terminate called without an
    active exception") after a finished run; the barrier keeps a rank from leaving while another
    still waits on it. A rank already gone does not stop the others leaving."""
    if not dist.is_initialized():
        return
    gc.collect()
    try:
        dist.barrier()
    except Exception:  # a rank is gone already: leave anyway
        pass
    dist.destroy_process_group()


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


class _GlobalBatchStats:
    """Mixed into a BatchNorm class by `convert_global_batchnorm`: in training mode under a process
    group of more than one rank, the batch statistics are those of the global batch (summed over
    ranks with an all-reduce that gradients flow back through), as SyncBatchNorm computes them on a
    GPU. torch's SyncBatchNorm has no CPU kernel; this is what gloo ranks use instead, so that N CPU
    ranks train as one process on the same global batch would."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        y = global_batch_norm(self, x)
        if hasattr(self, "act"):  # timm's BatchNormAct2d: dropout and activation after the norm
            y = self.act(self.drop(y))
        return y


def global_batch_norm(bn: torch.nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """`bn` (in training mode) on `x` with the mean and variance of every rank's rows together;
    its running statistics are updated with them (unbiased variance, as BatchNorm does)."""
    import torch.distributed._functional_collectives as funcol

    def all_reduce(t: torch.Tensor) -> torch.Tensor:  # a SUM that gradients flow back through (summed too)
        return funcol.all_reduce(t, "sum", dist.group.WORLD)

    channels, dims = x.shape[1], [0, *range(2, x.ndim)]
    shape = [1, channels] + [1] * (x.ndim - 2)
    xf = x.float()
    count = torch.full((1,), x.numel() // channels, dtype=torch.float32, device=x.device)
    total = all_reduce(torch.cat([xf.sum(dims), count]))  # SUM; its backward all-reduces the gradient too
    n = total[-1]
    mean = total[:channels] / n
    centred = xf - mean.view(shape)  # two passes: E[x^2] - E[x]^2 cancels badly where |mean| >> std
    var = all_reduce((centred * centred).sum(dims)) / n
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            bn.running_mean.lerp_(mean.detach(), factor)
            bn.running_var.lerp_(var.detach() * n / (n - 1).clamp_min(1), factor)
    y = centred * torch.rsqrt(var.view(shape) + bn.eps)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y.to(x.dtype)


_GLOBAL_CLASSES: dict[type, type] = {}


def convert_global_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Every BatchNorm in `module` computes global-batch statistics under a process group (see
    `_GlobalBatchStats`); in place: the modules keep their parameters, buffers and state-dict
    keys, so checkpoints move freely between one process and many."""
    for m in module.modules():
        cls = type(m)
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(m, _GlobalBatchStats):
            if cls not in _GLOBAL_CLASSES:
                _GLOBAL_CLASSES[cls] = type(f"Global{cls.__name__}", (_GlobalBatchStats, cls), {})
            m.__class__ = _GLOBAL_CLASSES[cls]
    return module
