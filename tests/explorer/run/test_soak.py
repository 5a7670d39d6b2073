"""Soak: the daemon runs `--forever` for SOAK_ITERATIONS iterations, killed (SIGKILL) in the middle
and resumed, with every checkpoint kept. Per iteration it records resident memory and the run
folder's size by part; the test asserts that checkpoints stay flat while accepted images pile up
in the shards, that memory stays within a bound, that the folder grows by what it stores (shards
linear in the items accepted), and that the killed run decides exactly as one that never stopped."""

import signal

import pytest
import torch

from explorer.run.checkpoints import CHECKPOINTS, STATE, checkpoint_dir
from explorer.run.config import save_config
from explorer.run.experiment import read_metrics
from explorer.run.image import ACQUIRED, ImageLoop

DECISION_KEYS = ImageLoop.DECISION_KEYS
from learners.shards import ShardStore
from tests.explorer.run.processes import daemon_env, hostless, start_daemon, stop, wait_until

pytestmark = pytest.mark.slow

SOAK_ITERATIONS = 14
KILL_AFTER = 6  # SIGKILL once this iteration's checkpoint is complete (and the next has begun)
REFERENCE_ITERATIONS = 9  # the uninterrupted run the killed one is compared with
CHECKPOINT_TOLERANCE = 0.05  # checkpoint bytes: max / min over iterations 2.. (the issue's +-5%)
# Resident memory may rise this much over the resumed process's iterations. Not zero: measured with
# bench/bench_daemon_storage.py, the loop's resident memory grows, more slowly the longer it runs,
# and about half as much with MALLOC_ARENA_MAX=2 (allocator arenas).
# It fails on a leak of more than ~10 MiB per iteration.
RSS_GROWTH_BOUND = 128 << 20


def soak_config(tiny_experiment, iterations):
    # eval only at the end (evaluation is not what is soaked); a background sample that is full after
    # the first iteration (it is bounded by background_size and held in the checkpoint)
    return tiny_experiment(iterations=iterations, train={**TINY_TRAIN, "eval_every": 1000},
                           reward={"background_size": 48})


TINY_TRAIN = {"pretrain_steps": 2, "steps_per_iteration": 2, "knn_k": 5}


def decisions(rows, upto):
    """Decisions with accepted URLs cut to their path (each run's engine has its own port)."""
    return [{k: r.get(k) for k in DECISION_KEYS} for r in hostless(rows) if 0 < r["iteration"] <= upto]


def test_daemon_soak_flat_checkpoints_bounded_memory_and_exact_kill_resume(tiny_experiment, engine, tmp_path):
    reference = tmp_path / "reference"
    loop = ImageLoop(soak_config(tiny_experiment, REFERENCE_ITERATIONS), reference, engine_url=engine.url,
                           progress=False)
    try:
        loop.run(log=lambda s: None)
    finally:
        loop.close()

    config = tmp_path / "soak.yaml"
    save_config(soak_config(tiny_experiment, SOAK_ITERATIONS), config)
    run_dir = tmp_path / "run"
    env = daemon_env(torch.get_num_threads())  # the reference's thread count: equal floats
    keep = ["--keep-checkpoints", str(SOAK_ITERATIONS + 5), "--forever"]
    proc = start_daemon([str(config), "--out", str(run_dir), *keep], env)
    try:
        wait_until(proc, (checkpoint_dir(run_dir, KILL_AFTER) / "COMPLETE").exists, timeout=600)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        stop(proc)
    proc = start_daemon(["--out", str(run_dir), *keep], env)
    try:
        wait_until(proc, (checkpoint_dir(run_dir, SOAK_ITERATIONS) / "COMPLETE").exists, timeout=900)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        stop(proc)
    assert proc.returncode == 0, out

    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["iteration"] <= SOAK_ITERATIONS]
    assert [r["iteration"] for r in rows] == list(range(SOAK_ITERATIONS + 1))
    # exact: the killed-and-resumed run decided as the one that never stopped
    assert decisions(rows, REFERENCE_ITERATIONS) == decisions(read_metrics(reference / "metrics.jsonl"),
                                                              REFERENCE_ITERATIONS)

    # checkpoints: flat while the shards grow
    sizes = [(checkpoint_dir(run_dir, i) / STATE).stat().st_size for i in range(2, SOAK_ITERATIONS + 1)]
    store = ShardStore(run_dir / ACQUIRED, 32, readonly=True)
    accepted = [sum(r["accepted"] for r in rows[1:i + 1]) for i in range(SOAK_ITERATIONS + 1)]
    assert len(store) >= accepted[SOAK_ITERATIONS] > 3 * accepted[2] > 0  # acquired data grew a lot
    assert max(sizes) <= (1 + CHECKPOINT_TOLERANCE) * min(sizes), sizes

    # memory: the resumed process, from its second iteration on
    rss = [r["rss_bytes"] for r in rows if r["iteration"] > KILL_AFTER + 1]
    assert max(rss) - rss[0] <= RSS_GROWTH_BOUND, [x >> 20 for x in rss]

    # disk: shards linear in the items accepted, checkpoints (SOAK + 5 kept) linear in iterations
    shard_bytes = [r["disk"].get(ACQUIRED, 0) for r in rows[2:]]  # measured before iterations 2..
    per_item = [b / accepted[i - 1] for i, b in zip(range(2, SOAK_ITERATIONS + 1), shard_bytes) if accepted[i - 1]]
    assert max(per_item) <= 1.2 * min(per_item), per_item
    checkpoints = [r["disk"].get(CHECKPOINTS, 0) / max(r["iteration"] - 1, 1) for r in rows[3:]]
    assert max(checkpoints) <= 1.1 * min(checkpoints), checkpoints
