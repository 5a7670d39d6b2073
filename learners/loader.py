"""A MoCo learner's batches through a torch DataLoader: planned in the training process, read in workers.

Each step's batch is planned here, in step order, with the learner's own generator (`plan_views`:
which images, then both views' parameters), exactly the draws `MoCoLearner` makes without a
loader. Worker processes read the planned images (target rows, accepted images from the run's
shards; this rank's rows only), the loader pins them when the device is a GPU, and the learner copies
them over without blocking while the previous step computes. The generator is used in the same order
with any number of workers, so the weights are the same with or without them (and a replay stays
exact). Plans run at most `workers * prefetch` steps ahead and never past one `train_steps` call,
since the mixture changes between calls.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from learners.augment import AugmentConfig, ViewParams, sample_view_params
from learners.distributed import rank_slice
from learners.mixture import TrainingMixture


@dataclass
class BatchPlan:
    """One global batch: which images (a `TrainingMixture.draw`) and the parameters of both views."""

    acquired: torch.Tensor
    index: torch.Tensor
    first: ViewParams
    second: ViewParams


def plan_views(mixture: TrainingMixture, batch_size: int, generator: torch.Generator, multiple_of: int,
               augment: AugmentConfig) -> BatchPlan:
    """The draws of one step, in the order the learner makes them: the batch, then view 1, view 2."""
    acquired, index = mixture.draw(batch_size, generator, multiple_of=multiple_of)
    first = sample_view_params(len(index), augment, 0, generator)
    second = sample_view_params(len(index), augment, 1, generator)
    return BatchPlan(acquired, index, first, second)


class _PlannedImages(Dataset):
    """Maps a plan to this rank's rows of its images (uint8, `TrainingMixture.read`); runs in the
    loader's workers."""

    def __init__(self, mixture: TrainingMixture, rank: int, world_size: int):
        self.mixture, self.rank, self.world_size = mixture, rank, world_size

    def __getitem__(self, plan: BatchPlan) -> torch.Tensor:
        rows = rank_slice(len(plan.index), self.rank, self.world_size)
        return self.mixture.read(plan.acquired[rows], plan.index[rows])

    def __len__(self) -> int:  # a DataLoader asks; the plans, not the dataset, say how many
        raise TypeError("planned batches have no length")


def planned_batches(mixture: TrainingMixture, steps: int, plan, rank: int, world_size: int, workers: int,
                    pin: bool, prefetch: int = 2) -> Iterator[tuple[BatchPlan, torch.Tensor]]:
    """`steps` (plan, this rank's images) pairs: `plan()` makes each step's plan, in order, here;
    `workers` processes read the images."""
    plans: collections.deque[BatchPlan] = collections.deque()

    def sampler():
        for _ in range(steps):
            plans.append(plan())
            yield plans[-1]

    loader = DataLoader(_PlannedImages(mixture, rank, world_size), sampler=sampler(), batch_size=None,
                        num_workers=workers, pin_memory=pin, prefetch_factor=prefetch if workers else None)
    for images in loader:
        yield plans.popleft(), images
