"""Atomic checkpoint directories: keep the last K, skip incomplete or corrupt ones, survive SIGKILL
at any point of a write (fault 1) and a full disk (fault 11)."""

import errno
import logging
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from explorer.run.checkpoints import (
    CHECKPOINTS,
    checkpoint_dir,
    has_checkpoint,
    load_latest_checkpoint,
    prune_checkpoints,
    write_checkpoint,
)


def state(iteration: int, n: int = 10) -> dict:
    return {"iteration": iteration, "weights": torch.full((n,), float(iteration))}


def names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / CHECKPOINTS).iterdir())


def test_keeps_the_last_k_complete_directories(tmp_path):
    for it in range(1, 6):
        write_checkpoint(tmp_path, it, state(it), keep=3)
    assert names(tmp_path) == ["iter-000003", "iter-000004", "iter-000005"]
    assert all(sorted(os.listdir(checkpoint_dir(tmp_path, it))) == ["COMPLETE", "state.pt"] for it in (3, 4, 5))
    latest = load_latest_checkpoint(tmp_path)
    assert latest.iteration == 5 and latest.path == checkpoint_dir(tmp_path, 5)
    assert torch.equal(latest.state["weights"], torch.full((10,), 5.0))
    with pytest.raises(ValueError, match="keep must be >= 1"):
        write_checkpoint(tmp_path, 6, state(6), keep=0)


def test_a_finished_run_keeps_only_its_last_checkpoint(tmp_path):
    for it in range(1, 4):
        write_checkpoint(tmp_path, it, state(it), keep=3)
    prune_checkpoints(tmp_path, keep=1)
    assert names(tmp_path) == ["iter-000003"]
    assert load_latest_checkpoint(tmp_path).iteration == 3
    prune_checkpoints(tmp_path / "no-run-here")  # nothing to prune: no error
    with pytest.raises(ValueError, match="keep must be >= 1"):
        prune_checkpoints(tmp_path, keep=0)


@pytest.mark.parametrize("damage, reason", [
    (lambda d: (d / "COMPLETE").unlink(), "no COMPLETE marker"),
    (lambda d: (d / "state.pt").write_bytes((d / "state.pt").read_bytes()[:100]), "does not match its recorded sha256"),
    (lambda d: (d / "state.pt").unlink(), "state.pt is missing"),
])
def test_an_incomplete_or_corrupt_newest_directory_is_skipped_with_a_warning(tmp_path, caplog, damage, reason):
    for it in (1, 2, 3):
        write_checkpoint(tmp_path, it, state(it))
    damage(checkpoint_dir(tmp_path, 3))
    with caplog.at_level(logging.WARNING, logger="explorer.run.checkpoints"):
        latest = load_latest_checkpoint(tmp_path)
    assert latest.iteration == 2 and latest.state["iteration"] == 2
    assert any("iter-000003" in r.getMessage() and reason in r.getMessage() for r in caplog.records)
    write_checkpoint(tmp_path, 3, state(3))  # the redone iteration replaces the damaged directory
    assert load_latest_checkpoint(tmp_path).iteration == 3


def test_a_legacy_checkpoint_file_is_read_when_no_directory_is_usable(tmp_path):
    assert load_latest_checkpoint(tmp_path) is None and not has_checkpoint(tmp_path)
    torch.save(state(4), tmp_path / "checkpoint.pt")
    assert has_checkpoint(tmp_path)
    legacy = load_latest_checkpoint(tmp_path)
    assert legacy.iteration == 4 and legacy.path == tmp_path / "checkpoint.pt"
    write_checkpoint(tmp_path, 5, state(5))
    assert load_latest_checkpoint(tmp_path).iteration == 5  # directories win over the old file
    (checkpoint_dir(tmp_path, 5) / "COMPLETE").unlink()
    assert load_latest_checkpoint(tmp_path).iteration == 4


def write_forever(run_dir: Path, finished) -> None:
    """A writer as a restarted run would be: continue after the last complete checkpoint, then write
    ~8 MB checkpoints, each tagged with its version in every element, reporting each finished one."""
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool: it would hang
    latest = load_latest_checkpoint(run_dir)
    version = latest.iteration if latest else 0
    while True:
        version += 1
        write_checkpoint(run_dir, version, state(version, n=2_000_000), keep=2)
        finished.send(version)


def test_sigkill_at_random_points_always_leaves_the_last_complete_checkpoint(tmp_path):
    """Fault (1): a writer killed anywhere (torch.save, marker, rename, pruning) never leaves a torn
    checkpoint; a restart loads the newest one the writer finished (or one just renamed into place)."""
    rng = torch.Generator().manual_seed(0)
    fork = multiprocessing.get_context("fork")  # forked writers start at once (torch is imported)
    for trial in range(12):
        receiver, sender = fork.Pipe(duplex=False)
        writer = fork.Process(target=write_forever, args=(tmp_path, sender), daemon=True)
        writer.start()
        sender.close()
        finished = receiver.recv()  # at least one complete checkpoint from this writer
        time.sleep(float(torch.rand(1, generator=rng)) * 0.2)  # then kill it at a random point
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(timeout=30)
        while receiver.poll():
            try:
                finished = receiver.recv()
            except EOFError:
                break
        latest = load_latest_checkpoint(tmp_path)
        assert latest.iteration in (finished, finished + 1), f"trial {trial}"
        assert (latest.state["weights"] == latest.iteration).all(), f"trial {trial}: mixed versions"
    assert latest.iteration > 12  # the writers got past their first checkpoint
    write_checkpoint(tmp_path, latest.iteration + 1, state(latest.iteration + 1), keep=2)
    assert names(tmp_path) == [f"iter-{i:06d}" for i in (latest.iteration, latest.iteration + 1)]  # killed temps gone


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    """Fault (11): ENOSPC while the state is written -> the error surfaces, the temp directory is
    removed and the previous checkpoints are intact and loadable."""
    write_checkpoint(tmp_path, 1, state(1))
    before = {p.name: p.read_bytes() for p in checkpoint_dir(tmp_path, 1).iterdir()}

    def full_disk(obj, f):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_checkpoint(tmp_path, 2, state(2))
    monkeypatch.undo()
    assert names(tmp_path) == ["iter-000001"]  # no temp directory, no iter-000002
    assert {p.name: p.read_bytes() for p in checkpoint_dir(tmp_path, 1).iterdir()} == before
    assert load_latest_checkpoint(tmp_path).iteration == 1
