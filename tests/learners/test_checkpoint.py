"""Crash safety of checkpoint writes: a kill or a full disk never leaves a broken checkpoint."""

import errno
import multiprocessing
import os
import signal
import time

import pytest
import torch

from learners.checkpoint import atomic_torch_save


def write_forever(path, finished) -> None:
    """Write ~8 MB checkpoints, each tagged with its version in every element, reporting each finished one."""
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool: it would hang
    version = 0
    while True:
        version += 1
        atomic_torch_save({"version": version, "weights": torch.full((2_000_000,), float(version))}, path)
        finished.send(version)


def test_sigkill_during_writes_always_leaves_a_complete_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    rng = torch.Generator().manual_seed(0)
    fork = multiprocessing.get_context("fork")  # forked writers start at once (torch is imported)
    for trial in range(5):
        receiver, sender = fork.Pipe(duplex=False)
        writer = fork.Process(target=write_forever, args=(path, sender), daemon=True)
        writer.start()
        sender.close()
        receiver.recv()  # at least one complete checkpoint exists
        time.sleep(float(torch.rand(1, generator=rng)) * 0.3)  # then kill at a random point
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(timeout=30)
        assert writer.exitcode == -signal.SIGKILL
        state = torch.load(path, weights_only=True)  # never a torn file
        assert (state["weights"] == state["version"]).all(), f"trial {trial}: mixed versions"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "checkpoint.pt"]
    assert all(name.startswith(".tmp-") for name in leftovers)  # only killed writers' temp files


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save({"version": 1}, path)

    def full_disk(obj, f):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_torch_save({"version": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # the temp file was removed
