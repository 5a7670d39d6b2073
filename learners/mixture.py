"""What the learner trains on: the target set plus what the agent accepted from the web.

Acquired data *adds to* the target instead of replacing part of it. Each batch holds
`target_batch` target images, exactly as training on the target alone would, and on top of them
acquired images in proportion to how many there are relative to the target, capped:

    n_acquired = min(round(target_batch * |acquired| / |target|), round(acquired_cap * target_batch))

so every target image is seen as often as in a target-only run, and an acquired image about as
often as a target image until the cap is reached. Inside a batch no image is drawn twice (a
duplicate in a contrastive batch is a false negative), and the batch is shuffled so that any
contiguous shard of it (one rank's, under DDP) holds both kinds.

Accepted images go into one pool, bounded by `capacity` (reservoir or FIFO eviction); there is no
"newest" part that could go stale when an iteration accepts nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

POOL_POLICIES = ("reservoir", "fifo")


@dataclass(kw_only=True, frozen=True)
class MixtureConfig:
    """How much acquired data a batch adds to the target's, and how much is kept."""

    acquired_cap: float = 1.0  # at most this many acquired images per target image in a batch
    capacity: int = 100_000  # acquired images kept (uint8, 3 KiB each at 32 px)
    pool_policy: str = "reservoir"  # at capacity: "reservoir" keeps a uniform sample, "fifo" the newest
    seed: int = 0  # seeds the reservoir's eviction choices

    def __post_init__(self):
        if not self.acquired_cap >= 0:
            raise ValueError(f"acquired_cap must be >= 0, got {self.acquired_cap}")
        if self.capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {self.capacity}")
        if self.pool_policy not in POOL_POLICIES:
            raise ValueError(f"unknown pool_policy {self.pool_policy!r}; valid: {', '.join(POOL_POLICIES)}")


def _check_images(images: torch.Tensor, side: int | None = None) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 (N, 3, S, S), got {images.dtype} {tuple(images.shape)}")
    if side is not None and images.shape[2:] != (side, side):
        raise ValueError(f"expected {side}x{side} images, got {tuple(images.shape[2:])}")


def acquired_count(target_batch: int, n_target: int, n_acquired: int, cap: float) -> int:
    """Acquired images added to a batch of `target_batch` target images (see the module docstring)."""
    proportional = round(target_batch * n_acquired / n_target)
    return min(proportional, round(cap * target_batch), n_acquired)


class TrainingMixture:
    """The target images and the pool of accepted images, all uint8 (N, 3, S, S) on the CPU."""

    def __init__(self, target: torch.Tensor, config: MixtureConfig | None = None):
        _check_images(target)
        if len(target) == 0:
            raise ValueError("the target set is empty")
        self.config = config or MixtureConfig()
        self.side = target.shape[2]
        self.target = target.cpu().contiguous()
        self.acquired = torch.empty(0, 3, self.side, self.side, dtype=torch.uint8)
        self.seen = 0  # images ever offered to the pool (the reservoir's stream length)
        self.generator = torch.Generator().manual_seed(self.config.seed)

    def add_accepted(self, images: torch.Tensor) -> None:
        """Add accepted images to the pool (evicting by the pool policy beyond capacity)."""
        _check_images(images, self.side)
        images = images.cpu().contiguous()
        capacity = self.config.capacity
        if self.config.pool_policy == "fifo":
            self.acquired = torch.cat([self.acquired, images])[-capacity:] if capacity else self.acquired[:0]
            self.seen += len(images)
            return
        # Reservoir sampling: every image offered so far stays with equal chance capacity / seen.
        room = max(capacity - len(self.acquired), 0)
        self.acquired = torch.cat([self.acquired, images[:room]])
        self.seen += len(images[:room])
        rest = images[room:]
        if len(rest) == 0:
            return
        stream_position = self.seen + torch.arange(1, len(rest) + 1, dtype=torch.float64)
        slots = (torch.rand(len(rest), generator=self.generator, dtype=torch.float64) * stream_position).long()
        self.seen += len(rest)
        for i in (slots < capacity).nonzero().flatten().tolist():  # in stream order: later ones win
            self.acquired[slots[i]] = rest[i]

    def batch_sizes(self, target_batch: int) -> tuple[int, int]:
        """(target images, acquired images) in a batch built around `target_batch` target images."""
        n_target = min(target_batch, len(self.target))
        return n_target, acquired_count(target_batch, len(self.target), len(self.acquired), self.config.acquired_cap)

    def sample(self, target_batch: int, generator: torch.Generator, multiple_of: int = 1) -> torch.Tensor:
        """A shuffled uint8 batch: `target_batch` target images (all of them if fewer) plus the
        acquired share, no image twice; the size is cut to a multiple of `multiple_of` (DDP ranks)."""
        n_target, n_acquired = self.batch_sizes(target_batch)
        excess = (n_target + n_acquired) % multiple_of
        n_acquired, n_target = max(n_acquired - excess, 0), n_target - max(excess - n_acquired, 0)
        if n_target + n_acquired == 0:
            raise ValueError(f"{len(self.target)} target images do not make a batch for {multiple_of} shards")
        parts = [self.target[torch.randperm(len(self.target), generator=generator)[:n_target]]]
        if n_acquired:
            parts.append(self.acquired[torch.randperm(len(self.acquired), generator=generator)[:n_acquired]])
        batch = torch.cat(parts)
        return batch[torch.randperm(len(batch), generator=generator)]

    def state_dict(self) -> dict[str, Any]:
        return {"config": dataclasses.asdict(self.config), "target": self.target, "acquired": self.acquired,
                "seen": self.seen, "generator": self.generator.get_state()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "TrainingMixture":
        mixture = cls(state["target"], MixtureConfig(**state["config"]))
        mixture.load_state_dict(state)
        return mixture

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("target", "acquired"):
            _check_images(state[name])
        self.target, self.acquired = state["target"], state["acquired"]
        self.side = self.target.shape[2]
        self.seen = int(state["seen"])
        self.generator.set_state(state["generator"])
