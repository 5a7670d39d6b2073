"""Loss-spike detection and rollback choice, as plain Python (no torch, no I/O).

Gopher and PaLM handled training-loss spikes by restarting from a checkpoint about 100 steps
before the spike and skipping the data batches seen around it. `SpikeDetector` decides when a
spike is real: a loss at least `factor` times the running mean of the last `window` accepted
losses, sustained for `patience` consecutive steps. Losses flagged as spike candidates do not
enter the running mean, so a spike cannot raise its own threshold. `rollback_target` picks the
snapshot to restart from.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(kw_only=True, frozen=True)
class SpikeConfig:
    enabled: bool = True
    factor: float = 1.5  # spike: loss >= factor * running mean
    window: int = 50  # accepted losses in the running mean; detection starts once it is full
    patience: int = 2  # consecutive spike steps that confirm a spike
    rollback_steps: int = 100  # restart from the newest snapshot at least this many steps back
    snapshot_every: int = 50  # in-memory snapshot period, in optimizer steps

    def __post_init__(self):
        if self.factor <= 1.0:
            raise ValueError(f"factor must be > 1, got {self.factor}")
        if self.window < 1 or self.patience < 1 or self.snapshot_every < 1 or self.rollback_steps < 0:
            raise ValueError("window, patience, snapshot_every must be >= 1 and rollback_steps >= 0")

    @property
    def max_snapshots(self) -> int:
        """Ring length that always holds one snapshot at least `rollback_steps` old."""
        return self.rollback_steps // self.snapshot_every + 2


class SpikeDetector:
    """Running-mean spike test over finite losses; `observe` returns True when a spike is confirmed."""

    def __init__(self, config: SpikeConfig):
        self.config = config
        self.history: deque[float] = deque(maxlen=config.window)
        self.streak = 0  # consecutive spike candidates so far

    @property
    def running_mean(self) -> float:
        return sum(self.history) / len(self.history) if self.history else math.nan

    def is_candidate(self, loss: float) -> bool:
        """Would `loss` count as a spike step against the current history?"""
        full = len(self.history) == self.config.window
        return full and loss >= self.config.factor * self.running_mean

    def observe(self, loss: float) -> bool:
        if not math.isfinite(loss):
            raise ValueError(f"non-finite losses are handled before spike detection, got {loss}")
        if not self.config.enabled:
            self.history.append(loss)
            return False
        if self.is_candidate(loss):
            self.streak += 1
            return self.streak >= self.config.patience
        self.streak = 0
        self.history.append(loss)
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "streak": self.streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque((float(x) for x in state["history"]), maxlen=self.config.window)
        self.streak = int(state["streak"])


def rollback_target(snapshot_steps: Sequence[int], spike_step: int, rollback_steps: int) -> int:
    """Index of the snapshot to restart from: the newest one taken at least `rollback_steps` before
    `spike_step`, else the oldest one (early in training no snapshot is that old)."""
    if not snapshot_steps:
        raise ValueError("no snapshot to roll back to")
    old_enough = [i for i, s in enumerate(snapshot_steps) if s <= spike_step - rollback_steps]
    if old_enough:
        return max(old_enough, key=lambda i: snapshot_steps[i])
    return min(range(len(snapshot_steps)), key=lambda i: snapshot_steps[i])
