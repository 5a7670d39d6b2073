"""The run folder's disk budget (explorer/run/disk.py): rejected bodies go first, oldest first; what replay
and training need stays. That a budget that cannot be met, or a full disk, stops a run (of either
modality) in a state that resumes exactly is tested in test_faults.py."""

import json

import pytest

from explorer.acquire.cache import CacheMiss, ResponseCache
from explorer.run.disk import GB, DiskConfig, enforce_budget, folder_usage
from explorer.run.experiment import read_metrics
from explorer.run.image import ImageLoop
from explorer.run.ledger import LEDGER, RunLedger

QUIET = {"progress": False}
# more results and a stricter acceptance than the tiny default: most fetched bodies are rejected
RUN = {"iterations": 3, "search": {"results_per_query": 30}, "reward": {"accept_percentile": 90.0}}


def rejected_bytes(run_dir) -> int:
    cache = ResponseCache(run_dir / "cache")
    with RunLedger(run_dir / LEDGER, readonly=True) as ledger:
        return sum(cache._blob_path(sha).stat().st_size for sha, _ in ledger.rejected_bodies())


def accepted_shas(run_dir) -> list[str]:
    return [json.loads(line)["sha256"] for line in (run_dir / "accepted.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tiny_experiment, engine, tmp_path_factory):
    """A 3-iteration run with no budget, most of its fetched bodies rejected."""
    run_dir = tmp_path_factory.mktemp("straight")
    loop = ImageLoop(tiny_experiment(**RUN), run_dir, engine_url=engine.url, **QUIET)
    loop.run(log=lambda s: None)
    loop.close()
    return run_dir


def test_eviction_removes_rejected_bodies_oldest_first_and_keeps_what_replay_and_training_need(straight, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    rejected = rejected_bytes(run_dir)
    assert rejected > 0
    cache = ResponseCache(run_dir / "cache")
    with RunLedger(run_dir / LEDGER) as ledger:  # (opened first: its shared-memory file counts too)
        budget = DiskConfig(max_gb=(folder_usage(run_dir)["total"] - rejected / 2) / GB)  # half the rejected bodies must go
        order = [sha for sha, _ in ledger.rejected_bodies()]
        done = enforce_budget(run_dir, budget, cache, ledger)
        assert 0 < done["evicted"] < len(order)
        assert done["usage"]["total"] <= budget.max_bytes
        gone = {sha for sha in order if not cache._blob_path(sha).exists()}
        last = dict(ledger.db.execute("SELECT sha256, MAX(iteration) FROM fetches GROUP BY sha256").fetchall())
        assert max(last[sha] for sha in gone) <= min(last[sha] for sha in set(order) - gone)  # least recent first
        assert ledger.evictions()[0] == len(gone)
        assert {sha for sha, _ in ledger.rejected_bodies()} == set(order) - gone  # not offered again
    assert all(cache._blob_path(sha).exists() for sha in accepted_shas(run_dir))  # accepted bodies stay
    searches = [json.loads(p.read_text()) for p in (run_dir / "cache" / "requests").rglob("*.json")]
    searches = [m for m in searches if "/search" in m["request"]["url"]]
    assert searches and all(cache._blob_path(m["body_sha256"]).exists() for m in searches)  # search answers stay
    # an evicted body is a plain miss that names the budget, not a corruption
    with pytest.raises(CacheMiss, match="evicted by the run's disk budget"):
        ImageLoop(load_run_config(run_dir), run_dir, replay=True, **QUIET).run(log=lambda s: None)
    assert not (run_dir / "cache" / "quarantine").exists()


def load_run_config(run_dir):
    from explorer.run.config import load_config

    return load_config(run_dir / "config.yaml")


def test_the_daemon_exits_3_on_its_budget_and_resumes_with_a_larger_one(tiny_experiment, tmp_path):
    """`explorer daemon --max-disk-gb`: too small a budget stops the daemon with exit code 3, an
    event and a status line; resuming with a larger one (kept in the run's config.yaml) finishes."""
    from explorer.run.config import load_config, save_config
    from explorer.run.daemon import EXIT_STOPPED, run_daemon, run_status

    config, run_dir = tmp_path / "tiny.yaml", tmp_path / "run"
    save_config(tiny_experiment(**RUN), config)
    lines = []
    assert run_daemon(config, run_dir, max_disk_gb=1e-6, log=lines.append) == EXIT_STOPPED
    assert any("nothing else may be evicted" in line for line in lines)
    assert json.loads((run_dir / "daemon.jsonl").read_text().splitlines()[-1])["event"] == "stopped"
    assert "disk: " in run_status(run_dir) and "budget" in run_status(run_dir)

    assert run_daemon(None, run_dir, max_disk_gb=1.0, log=lines.append) == 0
    assert load_config(run_dir / "config.yaml").disk.max_gb == 1.0
    assert [r["iteration"] for r in read_metrics(run_dir / "metrics.jsonl")] == [0, 1, 2, 3]
