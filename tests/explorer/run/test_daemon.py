"""Exact resume and clean stops: the daemon's guarantees, on the small real corpus."""

import json
import os
import signal
import subprocess
import sys
import time
from urllib.parse import urlsplit

import pytest
import torch

from explorer.run.checkpoints import checkpoint_dir, load_latest_checkpoint
from explorer.run.config import load_config, save_config
from explorer.run.daemon import run_status
from explorer.run.experiment import read_metrics
from explorer.run.image import ACQUIRED, ImageLoop
from explorer.run.ledger import LEDGER, RunLedger
from explorer.run.loop import compare_decisions

DECISION_KEYS = ImageLoop.DECISION_KEYS
from learners.shards import ShardStore


def decisions(rows):
    return [{k: r.get(k) for k in DECISION_KEYS} for r in rows if r["iteration"] > 0]


def test_crash_between_log_and_checkpoint_then_resume_is_exact(tiny_experiment, engine, tmp_path):
    cfg = tiny_experiment()
    quiet = {"progress": False}
    straight = tmp_path / "straight"
    ImageLoop(cfg, straight, engine_url=engine.url, **quiet).run(log=lambda s: None)

    crashed = tmp_path / "crashed"
    ImageLoop(cfg, crashed, engine_url=engine.url, **quiet).run(until=1, log=lambda s: None)
    ImageLoop(cfg, crashed, engine_url=engine.url, resume=True, **quiet).run(until=2, log=lambda s: None)
    # A crash after iteration 2 wrote its logs and ledger rows but before its checkpoint was complete:
    (checkpoint_dir(crashed, 2) / "COMPLETE").unlink()
    resumed = ImageLoop(cfg, crashed, engine_url=engine.url, resume=True, **quiet)
    assert resumed.iteration == 1 and resumed.resumed_from == checkpoint_dir(crashed, 1)
    assert [r["iteration"] for r in read_metrics(crashed / "metrics.jsonl")] == [0, 1]  # stale line dropped
    assert resumed.ledger.last_iteration() == 1  # stale ledger rows dropped
    resumed.run(log=lambda s: None)
    resumed.close()

    assert decisions(read_metrics(crashed / "metrics.jsonl")) == decisions(read_metrics(straight / "metrics.jsonl"))
    accepted = [json.loads(x)["url"] for x in (crashed / "accepted.jsonl").read_text().splitlines()]
    assert accepted == [json.loads(x)["url"] for x in (straight / "accepted.jsonl").read_text().splitlines()]
    a = load_latest_checkpoint(straight).state["learner"]["model"]
    b = load_latest_checkpoint(crashed).state["learner"]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with RunLedger(crashed / LEDGER) as ledger:
        assert ledger.metrics() == read_metrics(crashed / "metrics.jsonl")


def accepted_log(run_dir):
    return [json.loads(x) for x in (run_dir / "accepted.jsonl").read_text().splitlines()]


DAEMON_ITERATIONS = 3  # the daemon runs below: stopped or killed during iteration 2, resumed to 3


@pytest.fixture(scope="module")
def unbroken(tiny_experiment, engine, tmp_path_factory):
    """The reference for the daemon tests: the same config run to the end in this process, never
    stopped; and the torch thread count it ran with (the daemons get the same, for equal floats)."""
    run_dir = tmp_path_factory.mktemp("unbroken")
    loop = ImageLoop(tiny_experiment(iterations=DAEMON_ITERATIONS), run_dir, engine_url=engine.url,
                           progress=False)
    try:
        loop.run(log=lambda s: None)
    finally:
        loop.close()
    return run_dir, torch.get_num_threads()


def daemon_env(threads: int) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}


def start_daemon(args: list[str], env: dict) -> subprocess.Popen:
    """`explorer daemon ARGS --quiet` in a new process (its own interpreter: a real process to signal)."""
    return subprocess.Popen([sys.executable, "-m", "explorer.cli", "daemon", *args, "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_until(proc: subprocess.Popen, condition, timeout: float = 300) -> None:
    """Poll `condition` while the daemon runs; fails (with its output) if it exits or times out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not condition():
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()
    assert condition(), f"timed out after {timeout} s"


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.communicate(timeout=30)


def events(run_dir) -> list[str]:
    """The daemon's events so far (a line still being appended is left out)."""
    path = run_dir / "daemon.jsonl"
    found = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            found.append(json.loads(line)["event"])
        except ValueError:
            pass
    return found


def hostless(rows: list[dict]) -> list[dict]:
    """metrics rows with accepted URLs cut to their path: each run's engine listens on its own port."""
    return [{**r, "accepted_urls": [urlsplit(u).path for u in r["accepted_urls"]]} if "accepted_urls" in r else r
            for r in rows]


def assert_same_as_unbroken(run_dir, unbroken_dir) -> None:
    """Decisions (queries, query rewards, accepted URLs, losses), the accepted log and the final
    weights of a stopped-and-resumed run equal those of the run that never stopped."""
    rows, reference = read_metrics(run_dir / "metrics.jsonl"), read_metrics(unbroken_dir / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == list(range(DAEMON_ITERATIONS + 1))
    assert compare_decisions(hostless(reference), hostless(rows), DECISION_KEYS) == []
    assert sum(r["accepted"] for r in rows[1:]) > 0  # the comparison covers accepted items
    strip = lambda log: [(a["iteration"], urlsplit(a["url"]).path, a["sha256"], a["reward"]) for a in log]
    assert strip(accepted_log(run_dir)) == strip(accepted_log(unbroken_dir))
    mine, theirs = load_latest_checkpoint(run_dir), load_latest_checkpoint(unbroken_dir)
    assert mine.iteration == theirs.iteration == DAEMON_ITERATIONS
    a, b = mine.state["learner"], theirs.state["learner"]
    assert a["step"] == b["step"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"]), "final weights differ"
    assert a["mixture"] == b["mixture"]  # the same position in the shards
    assert_same_shards(run_dir, unbroken_dir)
    with RunLedger(run_dir / LEDGER) as ledger:
        assert ledger.metrics() == rows


def assert_same_shards(run_dir, unbroken_dir) -> None:
    """acquired/ of a stopped-and-resumed run holds the same items, in the same order and bytes, as
    the run that never stopped: nothing an interrupted iteration wrote survived."""
    side = load_config(run_dir / "config.yaml").fetch.image_size
    mine = ShardStore(run_dir / ACQUIRED, side, readonly=True)
    theirs = ShardStore(unbroken_dir / ACQUIRED, side, readonly=True)
    assert len(mine) > 0 and mine.keys == theirs.keys and mine.batches == theirs.batches
    assert torch.equal(mine.read(torch.arange(len(mine))), theirs.read(torch.arange(len(theirs))))


def assert_engine_kept_its_port(run_dir) -> None:
    """A resumed daemon restarts the local engine on the port recorded in backend.json (README:
    "restarts the local engine on the recorded port"): every request of the run, before and after
    the restart, went to that host:port, so cache keys and accepted URLs stay valid."""
    recorded = urlsplit(json.loads((run_dir / "backend.json").read_text())["url"]).netloc
    requested = {urlsplit(json.loads(meta.read_text())["request"]["url"]).netloc
                 for meta in (run_dir / "cache" / "requests").rglob("*.json")}
    assert requested == {recorded}
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert {urlsplit(u).netloc for r in rows for u in r.get("accepted_urls", [])} == {recorded}


def test_sigterm_mid_iteration_exits_cleanly_loses_nothing_and_resumes(tiny_experiment, unbroken, tmp_path):
    """Fault (2): SIGTERM while an iteration runs -> exit 0 within 30 s; every accepted item of the
    finished iterations is in accepted.jsonl, the ledger and the checkpoint, and nothing else is.
    Resumed in a new process, the run ends with the decisions and weights of one that never stopped,
    its engine back on the recorded port."""
    unbroken_dir, threads = unbroken
    cfg = tiny_experiment(iterations=DAEMON_ITERATIONS)
    config = tmp_path / "tiny.yaml"
    save_config(cfg, config)
    run_dir = tmp_path / "run"
    env = daemon_env(threads)
    proc = start_daemon([str(config), "--out", str(run_dir)], env)
    try:
        wait_until(proc, (checkpoint_dir(run_dir, 1) / "COMPLETE").exists)  # iteration 1 checkpointed: 2 runs
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        stop(proc)
    assert proc.returncode == 0, out
    assert "received SIGTERM" in out
    rows = read_metrics(run_dir / "metrics.jsonl")
    done = rows[-1]["iteration"]
    checkpoint = load_latest_checkpoint(run_dir)
    assert checkpoint.iteration == done >= 1
    assert done < DAEMON_ITERATIONS, "the stop came after the last iteration: nothing left to resume"
    assert "iterations: %d of %d" % (done, DAEMON_ITERATIONS) in run_status(run_dir)
    accepted = accepted_log(run_dir)
    assert sum(r["accepted"] for r in rows[1:]) == len(accepted) > 0
    assert [a["url"] for a in accepted] == [u for r in rows[1:] for u in r["accepted_urls"]]
    side = load_config(run_dir / "config.yaml").fetch.image_size
    assert ShardStore(run_dir / ACQUIRED, side, readonly=True).keys == \
        [a["sha256"] for a in accepted]  # the shards end where the checkpoint does
    with RunLedger(run_dir / LEDGER) as ledger:
        assert ledger.metrics() == rows
        assert sorted(ledger.db.execute("SELECT url, sha256 FROM accepted").fetchall()) == \
            sorted((a["url"], a["sha256"]) for a in accepted)

    proc = start_daemon(["--out", str(run_dir)], env)  # no config: the run folder's own
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        stop(proc)
    assert proc.returncode == 0, out
    assert f"resumed {run_dir} at iteration {done}" in out and f"finished at iteration {DAEMON_ITERATIONS}" in out
    ev = events(run_dir)
    assert [e for e in ev if e != "iteration"] == ["start", "stop", "resume", "done"]
    assert_same_as_unbroken(run_dir, unbroken_dir)
    assert_engine_kept_its_port(run_dir)


def test_sigkill_of_the_daemon_then_sigint_then_resume_matches_an_unbroken_run(tiny_experiment, unbroken, tmp_path):
    """A real SIGKILL of the daemon process mid-run (no handler, no cleanup), then a resume in a new
    process that SIGINT stops like SIGTERM (exit 0, a consistent run folder), then a second resume
    to the end: the run's decisions and weights are those of a run that never stopped."""
    unbroken_dir, threads = unbroken
    config = tmp_path / "tiny.yaml"
    save_config(tiny_experiment(iterations=DAEMON_ITERATIONS), config)
    run_dir = tmp_path / "run"
    env = daemon_env(threads)

    proc = start_daemon([str(config), "--out", str(run_dir)], env)
    try:
        wait_until(proc, (checkpoint_dir(run_dir, 1) / "COMPLETE").exists)
        time.sleep(0.5)  # into iteration 2
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        stop(proc)
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_latest_checkpoint(run_dir).iteration
    assert 1 <= killed_at < DAEMON_ITERATIONS
    assert events(run_dir)[0] == "start" and "stop" not in events(run_dir)  # no handler ran: it just died

    proc = start_daemon(["--out", str(run_dir)], env)
    try:
        wait_until(proc, lambda: events(run_dir).count("resume") == 1)  # handlers are installed by now
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        stop(proc)
    assert proc.returncode == 0, out
    assert "received SIGINT" in out and "Traceback" not in out and "KeyboardInterrupt" not in out
    assert events(run_dir)[-1] == "stop"
    stopped_at = load_latest_checkpoint(run_dir).iteration
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == list(range(stopped_at + 1))
    assert len(accepted_log(run_dir)) == sum(r["accepted"] for r in rows[1:])
    with RunLedger(run_dir / LEDGER) as ledger:
        assert ledger.metrics() == rows
    assert f"stopped at iteration {stopped_at}" in out

    proc = start_daemon(["--out", str(run_dir)], env)
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        stop(proc)
    assert proc.returncode == 0, out
    assert f"resumed {run_dir} at iteration {stopped_at}" in out
    assert [e for e in events(run_dir) if e != "iteration"] == ["start", "resume", "stop", "resume", "done"]
    assert_same_as_unbroken(run_dir, unbroken_dir)
    assert_engine_kept_its_port(run_dir)


def test_status_endpoint_serves_the_run_summary_read_only(tiny_experiment, tmp_path):
    import httpx

    from explorer.run.daemon import StatusServer

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(tiny_experiment(), run_dir / "config.yaml")
    rows = [{"iteration": 0},
            {"iteration": 1, "seconds": 36.0, "fetched": 72, "accepted": 10, "ssl_loss": 2.5,
             "precision_accepted": 0.9, "rejected": {"decode_error": 2}, "search_errors": ["boom"],
             "eval_knn_accuracy": 0.5, "eval_linear_probe_accuracy": 0.6}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = sorted(p.name for p in run_dir.iterdir())
    server = StatusServer(run_dir)
    try:
        body = httpx.get(server.url).json()
        assert httpx.post(server.url).status_code == 501  # read-only: no other verbs
        assert httpx.get(server.url.replace("/status", "/")).status_code == 404
    finally:
        server.stop()
    assert body["iterations_done"] == 1 and body["iterations_budget"] == 2
    assert body["iterations_per_hour"] == 100.0 and body["fetches_per_second"] == 2.0
    assert body["recent_rejected"] == {"decode_error": 2} and body["recent_search_errors"] == ["boom"]
    assert body["last_eval"]["eval_knn_accuracy"] == 0.5
    assert sorted(p.name for p in run_dir.iterdir()) == before
