"""The run plane's guarantees under faults, for both modalities (the same tests, parametrised): a
crash between the logs and the checkpoint, a disk budget the folder cannot meet, a full disk mid
iteration, SIGTERM, SIGKILL and SIGINT of the daemon. Each leaves a run folder
that resumes to the decisions, accepted items, weights and ledger of a run that never stopped."""

import dataclasses
import errno
import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import pytest
import torch

from explorer.acquire.cache import ResponseCache
from explorer.run.checkpoints import checkpoint_dir, load_latest_checkpoint
from explorer.run.config import ExperimentConfig, save_config
from explorer.run.daemon import run_status, status_summary
from explorer.run.disk import DiskConfig, folder_usage
from explorer.run.experiment import local_engine_for
from explorer.run.image import ACQUIRED, ImageLoop
from explorer.run.ledger import LEDGER, RunLedger, read_metrics
from explorer.run.loop import RunLoop, compare_decisions
from explorer.run.text import TextLoop
from learners.shards import ShardStore
from tests.explorer.run.processes import daemon_env, events, hostless, start_daemon, stop, wait_until
from tests.explorer.run.test_text_loop import text_corpus, tiny_text  # noqa: F401  (text_corpus: a fixture)

ITERATIONS = 3  # every run below is stopped, killed or cut during iteration 2 and resumed to 3


@dataclass
class Case:
    """One modality's run under test, and the same run never stopped (its reference)."""

    modality: str
    loop: type[RunLoop]
    config: Callable[[], ExperimentConfig]
    engine_url: str     # an engine serving the modality's small web in this process
    unbroken: Path      # the reference run folder
    threads: int        # the reference's torch thread count (the daemons get the same: equal floats)
    kill_delay: float   # seconds into a resumed daemon's first iteration before a SIGKILL
    enospc_at: int      # the cache write of iteration 2 that finds the disk full

    def start(self, run_dir: Path, **options) -> RunLoop:
        return self.loop(options.pop("cfg", None) or self.config(), run_dir, engine_url=self.engine_url,
                         progress=False, **options)


def _unbroken(case: Case, tmp_path_factory) -> Case:
    run_dir = tmp_path_factory.mktemp(f"unbroken-{case.modality}")
    loop = case.start(run_dir)
    try:
        loop.run(log=lambda _: None)
    finally:
        loop.close()
    return dataclasses.replace(case, unbroken=run_dir, threads=torch.get_num_threads())


@pytest.fixture(scope="module", params=["image", "text"])
def case(request, tmp_path_factory):
    if request.param == "image":
        tiny, engine = request.getfixturevalue("tiny_experiment"), request.getfixturevalue("engine")
        yield _unbroken(Case("image", ImageLoop, lambda: tiny(iterations=ITERATIONS), engine.url, None, 0,
                             kill_delay=0.5, enospc_at=10), tmp_path_factory)
        return
    corpus = request.getfixturevalue("text_corpus")
    config = lambda: tiny_text(corpus, iterations=ITERATIONS)  # noqa: E731
    with local_engine_for(config()) as url:
        yield _unbroken(Case("text", TextLoop, config, url, None, 0, kill_delay=0.0, enospc_at=5), tmp_path_factory)


def accepted_log(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "accepted.jsonl").read_text().splitlines()]


def assert_same_as_unbroken(case: Case, run_dir: Path) -> None:
    """Decisions, evaluations, the accepted log, the final weights and the ledger of a stopped and
    resumed run equal those of the run that never stopped (and, for images, the shards)."""
    rows, reference = read_metrics(run_dir / "metrics.jsonl"), read_metrics(case.unbroken / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == list(range(ITERATIONS + 1))
    assert compare_decisions(hostless(reference), hostless(rows), case.loop.DECISION_KEYS) == []
    evaluations = lambda rs: [{k: v for k, v in r.items() if k.startswith("eval_")} for r in rs]  # noqa: E731
    assert evaluations(rows) == evaluations(reference)
    assert sum(r.get("accepted", 0) for r in rows) > 0  # the comparison covers accepted items
    strip = lambda log: [(a["iteration"], urlsplit(a["url"]).path, a["sha256"], a["reward"]) for a in log]  # noqa: E731
    assert strip(accepted_log(run_dir)) == strip(accepted_log(case.unbroken))
    mine, theirs = load_latest_checkpoint(run_dir), load_latest_checkpoint(case.unbroken)
    assert mine.iteration == theirs.iteration == ITERATIONS
    a, b = mine.state["learner"], theirs.state["learner"]
    assert a["step"] == b["step"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"]), "final weights differ"
    with RunLedger(run_dir / LEDGER) as ledger:
        assert ledger.metrics() == rows
        assert ledger.count("accepted") == len(accepted_log(run_dir))
    if case.modality == "image":
        assert a["mixture"] == b["mixture"]  # the same position in the shards
        assert_same_shards(run_dir, case.unbroken, case.config().fetch.image_size)


def assert_same_shards(run_dir: Path, unbroken_dir: Path, side: int) -> None:
    """acquired/ of a stopped-and-resumed run holds the same items, in the same order and bytes, as
    the run that never stopped: nothing an interrupted iteration wrote survived."""
    mine = ShardStore(run_dir / ACQUIRED, side, readonly=True)
    theirs = ShardStore(unbroken_dir / ACQUIRED, side, readonly=True)
    assert len(mine) > 0 and mine.keys == theirs.keys and mine.batches == theirs.batches
    assert torch.equal(mine.read(torch.arange(len(mine))), theirs.read(torch.arange(len(theirs))))


def assert_engine_kept_its_port(run_dir: Path) -> None:
    """A resumed daemon restarts the local engine on the port recorded in backend.json: every
    request of the run, before and after the restart, went to that host:port, so cache keys and
    accepted URLs stay valid."""
    recorded = urlsplit(json.loads((run_dir / "backend.json").read_text())["url"]).netloc
    requested = {urlsplit(json.loads(meta.read_text())["request"]["url"]).netloc
                 for meta in (run_dir / "cache" / "requests").rglob("*.json")}
    assert requested == {recorded}
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert {urlsplit(u).netloc for r in rows for u in r.get("accepted_urls", [])} == {recorded}


def assert_consistent_up_to_the_checkpoint(case: Case, run_dir: Path) -> int:
    """After a stop: the logs, the ledger and (images) the shards end where the newest checkpoint
    does; every accepted item of the finished iterations is in all of them. Returns its iteration."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    done = load_latest_checkpoint(run_dir).iteration
    assert [r["iteration"] for r in rows] == list(range(done + 1))
    assert 1 <= done < ITERATIONS, "the stop came after the last iteration: nothing left to resume"
    assert f"iterations: {done} of {ITERATIONS}" in run_status(run_dir)
    accepted = accepted_log(run_dir)
    assert [a["url"] for a in accepted] == [u for r in rows[1:] for u in r["accepted_urls"]]
    with RunLedger(run_dir / LEDGER) as ledger:
        assert ledger.metrics() == rows
        assert sorted(ledger.db.execute("SELECT url, sha256 FROM accepted").fetchall()) == \
            sorted((a["url"], a["sha256"]) for a in accepted)
    if case.modality == "image":
        side = case.config().fetch.image_size
        assert ShardStore(run_dir / ACQUIRED, side, readonly=True).keys == [a["sha256"] for a in accepted]
    return done


def test_crash_between_log_and_checkpoint_then_resume_is_exact(case, tmp_path):
    crashed = tmp_path / "crashed"
    loop = case.start(crashed)
    loop.run(until=2, log=lambda _: None)
    loop.close()
    # A crash after iteration 2 wrote its logs and ledger rows but before its checkpoint was complete:
    (checkpoint_dir(crashed, 2) / "COMPLETE").unlink()
    resumed = case.start(crashed, resume=True)
    assert resumed.iteration == 1 and resumed.resumed_from == checkpoint_dir(crashed, 1)
    assert [r["iteration"] for r in read_metrics(crashed / "metrics.jsonl")] == [0, 1]  # stale line dropped
    assert resumed.ledger.last_iteration() == 1  # stale ledger rows dropped
    resumed.run(log=lambda _: None)
    resumed.close()
    assert_same_as_unbroken(case, crashed)


def test_a_disk_budget_or_a_full_disk_stops_cleanly_and_resumes_exactly(case, tmp_path, monkeypatch):
    """A budget the folder cannot meet (it is held before every iteration), then a full disk at a
    cache write of iteration 2: each stop leaves the checkpoint of iteration 1 and no half-written
    file, and the run, resumed with room, ends as the unbroken one."""
    run_dir = tmp_path / "run"
    loop = case.start(run_dir)
    loop.run(until=1, log=lambda _: None)
    loop.close()
    tight = dataclasses.replace(case.config(), disk=DiskConfig(max_gb=folder_usage(run_dir)["total"] * 0.5 / 2**30))
    loop, lines = case.start(run_dir, cfg=tight, resume=True), []
    loop.run(log=lines.append)
    loop.close()
    assert loop.iteration == 1 and "nothing else may be evicted" in loop.stopped_by
    assert any("raise the budget" in line for line in lines)
    assert [r["iteration"] for r in read_metrics(run_dir / "metrics.jsonl")] == [0, 1]

    put, calls = ResponseCache.put, []

    def fill_up(self, key, response):
        calls.append(key)
        if len(calls) == case.enospc_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return put(self, key, response)
    monkeypatch.setattr(ResponseCache, "put", fill_up)
    loop = case.start(run_dir, resume=True)
    loop.run(log=lambda _: None)
    loop.close()
    monkeypatch.setattr(ResponseCache, "put", put)
    assert len(calls) >= case.enospc_at and loop.iteration == 1 and "the disk is full" in loop.stopped_by
    assert [r["iteration"] for r in read_metrics(run_dir / "metrics.jsonl")] == [0, 1]
    assert not list(run_dir.rglob(".tmp*"))

    loop = case.start(run_dir, resume=True)
    loop.run(log=lambda _: None)
    loop.close()
    assert_same_as_unbroken(case, run_dir)


def test_the_daemon_survives_sigterm_sigkill_and_sigint_and_ends_as_an_unbroken_run(case, tmp_path):
    """`explorer daemon` in a process of its own, stopped three ways in turn, each time resumed in a
    new process from the run folder alone (no config):
    1. SIGTERM while iteration 2 runs -> exit 0 within 30 s, the run folder consistent up to the
       checkpoint of iteration 1;
    2. SIGKILL mid-run (no handler, no clean-up);
    3. SIGINT, handled like SIGTERM (exit 0, no traceback, a consistent run folder);
    then a last resume to the end: decisions, weights and ledger of a run that never stopped, the
    local engine back on the recorded port every time."""
    config = tmp_path / f"{case.modality}.yaml"
    save_config(case.config(), config)
    run_dir, env = tmp_path / "run", daemon_env(case.threads)

    proc = start_daemon([str(config), "--out", str(run_dir)], env)
    try:
        wait_until(proc, (checkpoint_dir(run_dir, 1) / "COMPLETE").exists)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        stop(proc)
    assert proc.returncode == 0 and "received SIGTERM" in out, out
    assert events(run_dir)[-1] == "stop"
    done = assert_consistent_up_to_the_checkpoint(case, run_dir)

    proc = start_daemon(["--out", str(run_dir)], env)  # no config: the run folder's own
    try:
        wait_until(proc, lambda: events(run_dir).count("resume") == 1)
        time.sleep(case.kill_delay)  # into the next iteration
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        stop(proc)
    assert proc.returncode == -signal.SIGKILL
    assert done <= load_latest_checkpoint(run_dir).iteration < ITERATIONS
    assert [e for e in events(run_dir) if e != "iteration"] == ["start", "stop", "resume"]  # it just died

    proc = start_daemon(["--out", str(run_dir)], env)
    try:
        wait_until(proc, lambda: events(run_dir).count("resume") == 2)  # handlers are installed by now
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        stop(proc)
    assert proc.returncode == 0, out
    assert "received SIGINT" in out and "Traceback" not in out and "KeyboardInterrupt" not in out
    assert events(run_dir)[-1] == "stop"
    stopped_at = assert_consistent_up_to_the_checkpoint(case, run_dir)
    assert f"stopped at iteration {stopped_at}" in out

    proc = start_daemon(["--out", str(run_dir)], env)
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        stop(proc)
    assert proc.returncode == 0, out
    assert f"resumed {run_dir} at iteration {stopped_at}" in out and f"finished at iteration {ITERATIONS}" in out
    assert [e for e in events(run_dir) if e != "iteration"] == \
        ["start", "stop", "resume", "resume", "stop", "resume", "done"]
    assert_same_as_unbroken(case, run_dir)
    assert_engine_kept_its_port(run_dir)
    status = status_summary(run_dir)
    assert status["modality"] == case.modality and status["last_eval"]
    assert (run_dir / "tensorboard").is_dir()
