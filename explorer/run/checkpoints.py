"""Atomic checkpoint directories of a run folder, the last K kept:

    checkpoints/iter-000005/state.pt    the loop's state_dict after iteration 5
    checkpoints/iter-000005/COMPLETE    written last: iteration, sha256 and size of every state file

A directory is built under a temp name (`.tmp-iter-000005-PID`), every file fsynced, COMPLETE
written last, and only then renamed into place, so a name `iter-*` with a COMPLETE marker is a
whole checkpoint. A reader takes the newest one whose files still match their recorded hashes
and falls back to older ones (with a warning) when the newest is incomplete or corrupt. Runs from
before this layout have a single `checkpoint.pt`; it is read when no directory is usable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from learners.checkpoint import fsync_dir

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LEGACY_CHECKPOINT = "checkpoint.pt"
MARKER = "COMPLETE"
STATE = "state.pt"
_NAME = re.compile(r"^iter-(\d{6,})$")


@dataclass(frozen=True)
class LoadedCheckpoint:
    path: Path        # the checkpoint directory, or the legacy checkpoint.pt
    iteration: int
    state: dict


def checkpoint_dir(run_dir: Path, iteration: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"iter-{iteration:06d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_synced(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def write_checkpoint(run_dir: Path, iteration: int, state: dict, keep: int = 3) -> Path:
    """Write `state` as checkpoints/iter-NNNNNN/ atomically, then keep only the newest `keep`
    complete directories. On any error the temp directory is removed and earlier ones are intact."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(run_dir, iteration)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _write_synced(tmp / STATE, lambda f: torch.save(state, f))
        marker = {"iteration": iteration, "time": round(time.time(), 3),
                  "files": {STATE: {"sha256": _sha256(tmp / STATE), "bytes": (tmp / STATE).stat().st_size}}}
        _write_synced(tmp / MARKER, lambda f: f.write(json.dumps(marker).encode()))
        fsync_dir(tmp)
        if final.exists():  # a skipped (corrupt) checkpoint of the iteration that was just redone
            _remove(final)
        os.rename(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, keep)
    return final


def prune_checkpoints(run_dir: Path, keep: int = 1) -> None:
    """Keep only the newest `keep` complete checkpoints of a run. A finished run resumes from its
    last one alone; a benchmark grid that keeps three per run (about 100 MB each for the image
    learner) fills a disk."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = run_dir / CHECKPOINTS
    if root.is_dir():
        _prune(root, keep)


def _remove(path: Path) -> None:
    """Marker first: a removal cut short leaves a directory that no longer counts as complete."""
    (path / MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def _prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete directories; drop older ones and temp dirs of killed writers."""
    complete = [p for _, p in _iteration_dirs(root) if (p / MARKER).exists()]
    for path in complete[keep:]:
        _remove(path)
    for _, path in _iteration_dirs(root):
        if not (path / MARKER).exists():  # what a removal cut short left behind
            shutil.rmtree(path, ignore_errors=True)
    for path in root.glob(".tmp-*"):
        if not path.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(path, ignore_errors=True)


def _iteration_dirs(root: Path) -> list[tuple[int, Path]]:
    """(iteration, path) of every iter-* directory, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def _verify(path: Path) -> dict:
    """The state of one checkpoint directory; raises ValueError naming what is wrong."""
    if not (path / MARKER).exists():
        raise ValueError("no COMPLETE marker (the write was cut short)")
    marker = json.loads((path / MARKER).read_text())
    for name, meta in marker["files"].items():
        if not (path / name).exists():
            raise ValueError(f"{name} is missing")
        if _sha256(path / name) != meta["sha256"]:
            raise ValueError(f"{name} does not match its recorded sha256")
    state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    if int(state["iteration"]) != int(marker["iteration"]):
        raise ValueError(f"state is of iteration {state['iteration']}, marker says {marker['iteration']}")
    return state


def load_latest_checkpoint(run_dir: Path) -> LoadedCheckpoint | None:
    """The newest usable checkpoint of a run folder, or None when it has none. Incomplete or corrupt
    directories are skipped with a warning; a legacy checkpoint.pt is the last resort."""
    run_dir = Path(run_dir)
    for iteration, path in _iteration_dirs(run_dir / CHECKPOINTS):
        try:
            return LoadedCheckpoint(path, iteration, _verify(path))
        except Exception as e:  # noqa: BLE001 - whatever fails to read makes the directory unusable
            log.warning("skipping checkpoint %s: %s", path, e)
    legacy = run_dir / LEGACY_CHECKPOINT
    if legacy.exists():
        state = torch.load(legacy, map_location="cpu", weights_only=True)
        return LoadedCheckpoint(legacy, int(state["iteration"]), state)
    return None


def has_checkpoint(run_dir: Path) -> bool:
    """Whether the folder holds something to resume from (a COMPLETE directory or checkpoint.pt);
    cheap: hashes are checked only when loading."""
    run_dir = Path(run_dir)
    return (run_dir / LEGACY_CHECKPOINT).exists() or any(
        (p / MARKER).exists() for _, p in _iteration_dirs(run_dir / CHECKPOINTS))
