"""A run on many processes (torchrun): rank 0 leads, every other rank trains beside it.

    torchrun --nproc_per_node 8 -m explorer daemon CONFIG --out RUN                     # one node
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        -m explorer daemon CONFIG --out RUN                                              # on each node

Rank 0 runs the loop exactly as one process does: the policy, search, fetch, reward, acceptance and
the whole run folder (config, ledger, logs, shards, checkpoints, the status port). Every other rank
holds only what training needs, its *replica* of the run's training side (`explorer.run.image.
ImageTraining`, `explorer.run.text.TextTraining`): the learner, joined to the process group (DDP,
learners/distributed.py), and the learner's data. Rank 0 announces each operation on that side
(a method marked `@collective`: start, add accepted items, train, embed, restore) by broadcasting
its name and arguments, and every rank runs it, in the same order, so the collectives inside it
(DDP's gradient all-reduce, global BatchNorm statistics, the MoCo negatives, the split embedding)
line up. Each rank trains its rows of every global batch; candidate embedding for the reward is
split over the ranks and gathered.

What reaches the other ranks, by broadcast (no shared file system is assumed, so a second node
needs no copy of the run folder): the config and the target's training images at the start, the
accepted items of every round, and on a resume rank 0's checkpoint with every item it had accepted.
Checkpoints are written once, by rank 0; a resume reads them there and hands them on.

Stopping: torchrun passes SIGTERM / SIGINT to every rank; rank 0 stops at its next safe point (see
explorer/run/daemon.py) and then tells the others to close, so all ranks stop at the same point
(torchrun kills ranks that take more than 30 s). A rank that dies ends the run: the collective rank
0 is in fails, rank 0 exits non-zero with `RankLost` naming the operation, torchrun names the rank
that died, and the run folder resumes from its last checkpoint like after any crash.
"""

from __future__ import annotations

import functools
import signal
import sys

import numpy as np
import torch
import torch.distributed as dist

from learners.distributed import default_device, distributed_setup, leave_process_group

CLOSE = "__close__"
NEW = "__new__"


class RankLost(RuntimeError):
    """Another rank of the process group died or stopped answering."""


def _lost(operation: str, error: BaseException) -> RankLost:
    return RankLost(f"a rank of the process group stopped answering during {operation!r} ({error}); the run "
                    "stops here, and its folder resumes from the last checkpoint: start the same torchrun "
                    "command again (torchrun's report names the rank that failed)")


def _is_peer_failure(error: BaseException) -> bool:
    """Whether an exception raised inside a collective is another rank's failure (not a bug here)."""
    if isinstance(error, (dist.DistError, RankLost)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("connection closed by peer", "connection reset", "gloo", "nccl", "broken pipe"))


class Ranks:
    """This process's place in the run: `rank`, `world_size`, and the broadcast of rank 0's
    operations. `Ranks.alone()` is a process on its own (every operation just runs)."""

    def __init__(self, device: torch.device | None = None, *, join: bool = True):
        self.device = device or default_device()
        if join:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            self.rank, self.world_size = distributed_setup(self.device)
        else:
            self.rank, self.world_size = 0, 1
        self.replica = None
        self._following = False
        self._inside = 0  # depth of collective operations running here (a nested one is not announced again)

    @classmethod
    def alone(cls) -> Ranks:
        return cls(torch.device("cpu"), join=False)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def _broadcast(self, message=None, operation: str = "a broadcast"):
        box = [message]
        try:
            dist.broadcast_object_list(box, src=0)
        except Exception as e:
            raise (_lost(operation, e) if _is_peer_failure(e) else e) from e
        return box[0]

    def announce(self, name: str, args: tuple) -> None:
        """Rank 0: tell the other ranks to run operation `name` with `args` now."""
        if self.distributed and self.leader and not self._following and not self._inside:
            self._broadcast((name, args), name)

    def replicate(self, cls, *args, **local):
        """A `cls(*args, ranks=self)` on every rank (rank 0's is returned): the training side of a
        run, whose `@collective` methods then run on every rank. `local` keyword arguments are rank
        0's alone (e.g. its handle on the run folder's shards); the other ranks build without them."""
        self.announce(NEW, (cls, args))
        self.replica = cls(*args, ranks=self, **local)
        return self.replica

    def follow(self) -> None:
        """Another rank's whole run: build the replica rank 0 builds and run every operation rank 0
        announces, until it closes the run (or fails)."""
        if self.leader:
            raise RuntimeError("rank 0 leads the run; only the other ranks follow it")
        self._following = True
        while True:
            name, args = self._broadcast(operation="waiting for rank 0")
            if name == CLOSE:
                return
            if name == NEW:
                cls, cls_args = args
                self.replica = cls(*cls_args, ranks=self)
            else:
                getattr(type(self.replica), name).__wrapped__(self.replica, *args)

    def close(self) -> None:
        """Rank 0: the run is over (finished, stopped or failed); the other ranks return from `follow`."""
        if self.distributed and self.leader:
            try:
                self._broadcast((CLOSE, ()), CLOSE)
            except RankLost:
                pass  # they are gone already

    def shutdown(self) -> None:
        """Leave the process group (every rank, at the end of the run), together: a rank that left while
        another still received the last broadcast would abort it. The replica (its model under DDP,
        which holds the group) is let go first (`leave_process_group`)."""
        if self.distributed and dist.is_initialized():
            self.replica = None
            leave_process_group()

    def ignore_stop_signals(self) -> dict:
        """A following rank stops when rank 0 does: SIGTERM / SIGINT are noted, not obeyed (rank 0 got
        them too, from torchrun). Returns the previous handlers."""
        def note(signum, frame):
            print(f"rank {self.rank}: received {signal.Signals(signum).name}; stopping with rank 0 at its next safe "
                  "point", file=sys.stderr)
        return {s: signal.signal(s, note) for s in (signal.SIGTERM, signal.SIGINT)}


def collective(method):
    """Marks a method of a run's training side that every rank runs: on rank 0 it is announced to
    the others first; a following rank runs it when announced (`Ranks.follow`). The arguments are
    sent as they are (pickled), so they are what every rank needs, not rank 0's handles."""
    @functools.wraps(method)
    def run(self, *args):
        ranks = self.ranks
        ranks.announce(method.__name__, args)
        ranks._inside += 1
        try:
            return method(self, *args)
        except Exception as e:
            if ranks.distributed and _is_peer_failure(e) and not isinstance(e, RankLost):
                raise _lost(method.__name__, e) from e
            raise
        finally:
            ranks._inside -= 1
    return run


def split_rows(n: int, rank: int, world_size: int) -> slice:
    """Rank `rank`'s contiguous share of `n` rows, as even as can be (the first ranks take one more)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def map_rows(fn, items, ranks: Ranks) -> np.ndarray:
    """`fn` (rows -> array) on this rank's share of `items` (`split_rows`); every rank's results
    concatenated in rank order, on every rank (one process: `fn(items)`)."""
    local = fn(items[split_rows(len(items), ranks.rank, ranks.world_size)])
    if not ranks.distributed:
        return local
    parts = [None] * ranks.world_size
    dist.all_gather_object(parts, local)
    return np.concatenate(parts)
