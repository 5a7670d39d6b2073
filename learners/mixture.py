"""What the learner trains on: the target set, the newest accepted candidates, and a replay buffer.

The agent accepts a batch of web images after each round; those become the "newest" part and the
previous newest move into a bounded replay buffer, so the learner keeps seeing the target set,
emphasises what was just found, and does not forget what it found earlier.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

REPLAY_POLICIES = ("reservoir", "fifo")


@dataclass(kw_only=True, frozen=True)
class MixtureConfig:
    """Sampling ratios and replay capacity. Ratios of empty parts are dropped and the rest renormalised."""

    target_ratio: float = 0.5  # the target set anchors the representation
    newest_ratio: float = 0.3  # the candidates accepted in the latest round
    replay_ratio: float = 0.2  # earlier accepted candidates, against forgetting
    replay_capacity: int = 10_000  # images kept in the replay buffer (uint8, 3 KiB each at 32 px)
    replay_policy: str = "reservoir"  # "reservoir": uniform over all evicted; "fifo": the most recent
    seed: int = 0  # seeds the reservoir's eviction choices

    def __post_init__(self):
        ratios = (self.target_ratio, self.newest_ratio, self.replay_ratio)
        if min(ratios) < 0 or sum(ratios) <= 0:
            raise ValueError(f"ratios must be >= 0 with a positive sum, got {ratios}")
        if self.replay_capacity < 0:
            raise ValueError(f"replay_capacity must be >= 0, got {self.replay_capacity}")
        if self.replay_policy not in REPLAY_POLICIES:
            raise ValueError(f"unknown replay_policy {self.replay_policy!r}; valid: {', '.join(REPLAY_POLICIES)}")


def _check_images(images: torch.Tensor, side: int | None = None) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 (N, 3, S, S), got {images.dtype} {tuple(images.shape)}")
    if side is not None and images.shape[2:] != (side, side):
        raise ValueError(f"expected {side}x{side} images, got {tuple(images.shape[2:])}")


def allocate(batch_size: int, weights: list[float]) -> list[int]:
    """Split `batch_size` into integer counts proportional to `weights` (largest remainders)."""
    total = sum(weights)
    exact = [batch_size * w / total for w in weights]
    counts = [int(e) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: batch_size - sum(counts)]:
        counts[i] += 1
    return counts


class TrainingMixture:
    """Target images + newest accepted + replay buffer, all uint8 (N, 3, S, S) on the CPU."""

    def __init__(self, target: torch.Tensor, config: MixtureConfig | None = None):
        _check_images(target)
        if len(target) == 0:
            raise ValueError("the target set is empty")
        self.config = config or MixtureConfig()
        self.side = target.shape[2]
        self.target = target.cpu().contiguous()
        self.newest = torch.empty(0, 3, self.side, self.side, dtype=torch.uint8)
        self.replay = torch.empty(0, 3, self.side, self.side, dtype=torch.uint8)
        self.seen = 0  # images ever offered to the replay buffer (the reservoir's stream length)
        self.generator = torch.Generator().manual_seed(self.config.seed)

    def parts(self) -> list[torch.Tensor]:
        return [self.target, self.newest, self.replay]

    def add_accepted(self, images: torch.Tensor) -> None:
        """Make `images` the newest part; the previous newest move into the replay buffer."""
        _check_images(images, self.side)
        self._push_replay(self.newest)
        self.newest = images.cpu().contiguous().clone()

    def _push_replay(self, images: torch.Tensor) -> None:
        capacity = self.config.replay_capacity
        if self.config.replay_policy == "fifo":
            self.replay = torch.cat([self.replay, images])[-capacity:] if capacity else self.replay[:0]
            self.seen += len(images)
            return
        # Reservoir sampling: every image offered so far stays with equal chance capacity / seen.
        room = max(capacity - len(self.replay), 0)
        self.replay = torch.cat([self.replay, images[:room]])
        self.seen += len(images[:room])
        rest = images[room:]
        if len(rest) == 0:
            return
        stream_position = self.seen + torch.arange(1, len(rest) + 1, dtype=torch.float64)
        slots = (torch.rand(len(rest), generator=self.generator, dtype=torch.float64) * stream_position).long()
        self.seen += len(rest)
        for i in (slots < capacity).nonzero().flatten().tolist():  # in stream order: later ones win
            self.replay[slots[i]] = rest[i]

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """A uint8 (batch_size, 3, S, S) batch drawn with replacement, part sizes set by the ratios."""
        cfg = self.config
        ratios = [cfg.target_ratio, cfg.newest_ratio, cfg.replay_ratio]
        weights = [r if len(part) else 0.0 for r, part in zip(ratios, self.parts())]
        if sum(weights) == 0:  # only the target remains but its ratio is 0
            weights = [1.0, 0.0, 0.0]
        batches = []
        for part, count in zip(self.parts(), allocate(batch_size, weights)):
            if count:
                batches.append(part[torch.randint(len(part), (count,), generator=generator)])
        return torch.cat(batches)

    def state_dict(self) -> dict[str, Any]:
        return {"config": dataclasses.asdict(self.config), "target": self.target, "newest": self.newest, "replay": self.replay,
                "seen": self.seen, "generator": self.generator.get_state()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "TrainingMixture":
        mixture = cls(state["target"], MixtureConfig(**state["config"]))
        mixture.load_state_dict(state)
        return mixture

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("target", "newest", "replay"):
            _check_images(state[name])
        self.target, self.newest, self.replay = state["target"], state["newest"], state["replay"]
        self.side = self.target.shape[2]
        self.seen = int(state["seen"])
        self.generator.set_state(state["generator"])
