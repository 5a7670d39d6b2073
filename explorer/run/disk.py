"""A run folder's disk budget: what it uses, what may be evicted, and when the run must stop.

`disk.max_gb` (default: no budget) bounds the whole run folder. Before every iteration (so after
the last one's checkpoint) and once after the run's last iteration, the loop measures the folder;
over the budget it evicts the bodies of fetched images that were never accepted, least recently
fetched first, until it fits. Search answers,
accepted bodies (and the shards of accepted images), checkpoints, logs and the ledger are never
evicted. When the folder still does not fit, the run stops with `DiskBudgetExceeded`: the
checkpoint of the last iteration is complete, so `explorer daemon --out RUN_DIR` resumes once the
budget is raised (`--max-disk-gb`) or space is freed. A full disk (ENOSPC) stops the run the same
way, abandoning the iteration in progress (every file it writes is atomic or cut back on resume).

Evicted bodies cost exactness of a later replay: `explorer replay` needs every fetched body, and
stops with a CacheMiss naming the evicted URL. `explorer status` shows usage and evictions.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

GB = 1 << 30


@dataclass(kw_only=True, frozen=True)
class DiskConfig:
    max_gb: float | None = None
    """Budget of the run folder in GiB (None: no budget). Rejected image bodies are evicted first."""

    def __post_init__(self):
        if self.max_gb is not None and not self.max_gb > 0:
            raise ValueError(f"disk.max_gb must be > 0 (or null for no budget), got {self.max_gb}")

    @property
    def max_bytes(self) -> int | None:
        return None if self.max_gb is None else int(self.max_gb * GB)


class DiskBudgetExceeded(RuntimeError):
    """The run folder does not fit its budget even with every evictable body gone, or the disk is full."""


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC / EDQUOT from a write, or SQLite's "database or disk is full", anywhere in the chain
    of causes (torch.save wraps the OSError of its file)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(error, sqlite3.OperationalError) and "disk is full" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def folder_usage(run_dir: Path) -> dict[str, int]:
    """Bytes used under the run folder, by its top-level entries (cache, acquired, checkpoints, ...)
    and in total; files only, as `du --apparent-size` counts them."""
    usage: dict[str, int] = {}
    for entry in os.scandir(run_dir):
        size = entry.stat(follow_symlinks=False).st_size if entry.is_file(follow_symlinks=False) else 0
        if entry.is_dir(follow_symlinks=False):
            for root, _, files in os.walk(entry.path):
                for name in files:
                    try:
                        size += os.lstat(os.path.join(root, name)).st_size
                    except FileNotFoundError:  # removed while walking (a pruned checkpoint)
                        pass
        key = entry.name if entry.is_dir(follow_symlinks=False) else "files"
        usage[key] = usage.get(key, 0) + size
    usage["total"] = sum(usage.values())
    return usage


def format_usage(usage: dict[str, int], budget: int | None) -> str:
    parts = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in sorted(usage.items(), key=lambda kv: -kv[1])
                      if k != "total" and v)
    limit = f" of {budget / 2**20:.1f} MiB budget" if budget else " (no budget)"
    return f"{usage['total'] / 2**20:.1f} MiB{limit} ({parts})"


def enforce_budget(run_dir: Path, config: DiskConfig, cache, ledger) -> dict:
    """Evict rejected bodies (oldest iteration first) until the run folder fits `config.max_gb`;
    raises DiskBudgetExceeded when it cannot. Returns {"usage", "evicted", "freed"} of this call."""
    budget = config.max_bytes
    usage = folder_usage(run_dir)
    evicted = freed = 0
    if budget is None or usage["total"] <= budget:
        return {"usage": usage, "evicted": 0, "freed": 0}
    candidates = iter(ledger.rejected_bodies())  # least recently fetched first
    while usage["total"] > budget:
        batch, over = [], usage["total"] - budget
        for sha, last in candidates:
            size = cache.evict_body(sha)
            batch.append((sha, last, size, time.time()))
            freed, evicted = freed + size, evicted + (size > 0)
            over -= size
            if over <= 0:
                break
        if not batch:
            break
        ledger.record_evicted(batch)  # (the ledger's own write counts: measure again)
        usage = folder_usage(run_dir)
    if usage["total"] > budget:
        raise DiskBudgetExceeded(
            f"the run folder {run_dir} uses {format_usage(usage, budget)} after evicting {evicted} rejected bodies "
            f"({freed / 2**20:.1f} MiB); nothing else may be evicted. The last checkpoint is complete: raise "
            f"the budget (explorer daemon --out {run_dir} --max-disk-gb N) or free space, and resume")
    return {"usage": usage, "evicted": evicted, "freed": freed}
