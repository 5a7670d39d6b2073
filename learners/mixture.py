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
"newest" part that could go stale when an iteration accepts nothing. The images themselves live in
a store (on disk in a run folder, learners/shards.py); the pool holds their item numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from learners.shards import MemoryStore, ShardStore

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


def target_fingerprint(target: torch.Tensor) -> str:
    """sha256 of the target images' shape and bytes: a resume checks it trains on the same target."""
    digest = hashlib.sha256(str(tuple(target.shape)).encode())
    digest.update(target.contiguous().numpy().tobytes())
    return digest.hexdigest()


def acquired_count(target_batch: int, n_target: int, n_acquired: int, cap: float) -> int:
    """Acquired images added to a batch of `target_batch` target images (see the module docstring)."""
    proportional = round(target_batch * n_acquired / n_target)
    return min(proportional, round(cap * target_batch), n_acquired)


class TrainingMixture:
    """The target images (uint8 (N, 3, S, S) on the CPU) and the pool of accepted images.

    Accepted images are kept in a store (learners/shards.py): on disk in a run folder (`ShardStore`),
    else in memory (`MemoryStore`). The pool is a list of store item numbers, so memory holds
    item numbers, not images; a batch reads its acquired images from the store. The pool is not
    saved: it is the reservoir (or FIFO) run over the store's items in the order they were
    appended, with the seeded generator, so `load_state_dict` rebuilds it from the store's
    position alone and a checkpoint does not grow with what was acquired."""

    def __init__(self, target: torch.Tensor, config: MixtureConfig | None = None,
                 store: MemoryStore | ShardStore | None = None):
        _check_images(target)
        if len(target) == 0:
            raise ValueError("the target set is empty")
        self.config = config or MixtureConfig()
        self.side = target.shape[2]
        self.target = target.cpu().contiguous()
        self.store = store if store is not None else MemoryStore(self.side)
        if self.store.side != self.side:
            raise ValueError(f"the store holds {self.store.side}px images, the target {self.side}px")
        # Changes whenever store item numbers may come to name other images (a reset, a truncation):
        # whoever keeps something per item (learners/view_cache.py) starts again when it changes.
        self.epoch = 0
        self._reset_pool()

    def _reset_pool(self) -> None:
        self.pool = torch.zeros(0, dtype=torch.long)  # store item numbers
        self.seen = 0  # images ever offered to the pool (the reservoir's stream length)
        self.position = 0  # store items this mixture has admitted; anything after it is void
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.epoch += 1

    @property
    def acquired(self) -> torch.Tensor:
        """The pool's images, read from the store (all of them: for inspection and tests)."""
        return self.store.read(self.pool)

    def __len__(self) -> int:
        return len(self.pool)

    def add_accepted(self, images: torch.Tensor, records: list[dict] | None = None) -> None:
        """Write accepted images (and their records, see learners/shards.py) to the store and
        offer them to the pool (evicting by the pool policy beyond capacity)."""
        _check_images(images, self.side)
        if len(self.store) != self.position:  # items of an abandoned attempt (a crash, a fresh start)
            self.store.truncate(self.position)
            self.epoch += 1
        ids = self.store.append(images.cpu().contiguous(), records)
        self._admit(ids)

    def _admit(self, ids: torch.Tensor) -> None:
        self.position += len(ids)
        capacity = self.config.capacity
        if self.config.pool_policy == "fifo":
            self.pool = torch.cat([self.pool, ids])[-capacity:] if capacity else self.pool[:0]
            self.seen += len(ids)
            return
        # Reservoir sampling: every image offered so far stays with equal chance capacity / seen.
        room = max(capacity - len(self.pool), 0)
        self.pool = torch.cat([self.pool, ids[:room]])
        self.seen += len(ids[:room])
        rest = ids[room:]
        if len(rest) == 0:
            return
        stream_position = self.seen + torch.arange(1, len(rest) + 1, dtype=torch.float64)
        slots = (torch.rand(len(rest), generator=self.generator, dtype=torch.float64) * stream_position).long()
        self.seen += len(rest)
        for i in (slots < capacity).nonzero().flatten().tolist():  # in stream order: later ones win
            self.pool[slots[i]] = rest[i]

    def batch_sizes(self, target_batch: int) -> tuple[int, int]:
        """(target images, acquired images) in a batch built around `target_batch` target images."""
        n_target = min(target_batch, len(self.target))
        return n_target, acquired_count(target_batch, len(self.target), len(self.pool), self.config.acquired_cap)

    def draw(self, target_batch: int, generator: torch.Generator,
             multiple_of: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Which images make the next batch: (acquired, index), both of the batch's length, shuffled;
        index is a target row where `acquired` is False, else a store item number. `target_batch`
        target images (all of them if fewer) plus the acquired share, no image twice; the size is cut
        to a multiple of `multiple_of` (DDP ranks)."""
        n_target, n_acquired = self.batch_sizes(target_batch)
        excess = (n_target + n_acquired) % multiple_of
        n_acquired, n_target = max(n_acquired - excess, 0), n_target - max(excess - n_acquired, 0)
        if n_target + n_acquired == 0:
            raise ValueError(f"{len(self.target)} target images do not make a batch for {multiple_of} shards")
        index = [torch.randperm(len(self.target), generator=generator)[:n_target]]
        if n_acquired:
            index.append(self.pool[torch.randperm(len(self.pool), generator=generator)[:n_acquired]])
        acquired = torch.cat([torch.zeros(n_target, dtype=torch.bool), torch.ones(n_acquired, dtype=torch.bool)])
        order = torch.randperm(n_target + n_acquired, generator=generator)
        return acquired[order], torch.cat(index)[order]

    def read(self, acquired: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The uint8 images of a `draw`, in its order."""
        images = torch.empty((len(index), 3, self.side, self.side), dtype=torch.uint8)
        images[~acquired] = self.target[index[~acquired]]
        if acquired.any():
            images[acquired] = self.store.read(index[acquired])
        return images

    def sample(self, target_batch: int, generator: torch.Generator, multiple_of: int = 1) -> torch.Tensor:
        """The images of `draw(target_batch, generator, multiple_of)`: a shuffled uint8 batch."""
        return self.read(*self.draw(target_batch, generator, multiple_of))

    def state_dict(self) -> dict[str, Any]:
        """Config, the target's fingerprint and the store's state: a `ShardStore`'s is its position
        (a few numbers); a `MemoryStore`'s is its images, and then the target is saved too. The pool
        is rebuilt from it on load."""
        state = {"config": dataclasses.asdict(self.config), "target_sha256": target_fingerprint(self.target),
                 "store": self.store.state_dict(), "position": self.position}
        if not self.store.persistent:  # all in memory, all in the state: `from_state_dict` rebuilds it alone
            state["target"] = self.target
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "TrainingMixture":
        """A mixture rebuilt from the state of an in-memory one (it holds the target and the images)."""
        if "target" not in state:
            raise ValueError("this mixture's images are in a run folder's shards: build it with its target and "
                             "ShardStore, then load_state_dict")
        mixture = cls(state["target"], MixtureConfig(**state["config"]))
        mixture.load_state_dict(state)
        return mixture

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "acquired" in state:  # the layout before stores: every image in the state itself
            self._load_legacy(state)
            return
        if state["target_sha256"] != target_fingerprint(self.target):
            raise ValueError("this checkpoint was trained on another target set (its fingerprint differs)")
        if int(state["position"]):
            self.store.load_state_dict(state["store"])
        self.store.truncate(int(state["position"]))  # (position 0: a base checkpoint, whatever its store)
        self._reset_pool()
        start = 0
        for size in self.store.batches:  # admit in the order (and batches) of the run: same pool, same draws
            self._admit(torch.arange(start, start + size))
            start += size
        if self.position != int(state["position"]):
            raise ValueError(f"the store's batches end at item {self.position}, not at {state['position']}")

    def _load_legacy(self, state: dict[str, Any]) -> None:
        """A state saved with its images (base checkpoints from before stores)."""
        _check_images(state["target"])
        if len(state["acquired"]):
            raise ValueError("this checkpoint keeps its acquired images inside it (a run from before shard "
                             "stores); resume it with the version that wrote it, or start the run again")
        self.target, self.side = state["target"], state["target"].shape[2]
        self.store.truncate(0)
        self._reset_pool()
