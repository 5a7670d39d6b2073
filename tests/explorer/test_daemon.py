"""Exact resume and clean stops: the daemon's guarantees, on the small real corpus."""

import json
import os
import signal
import subprocess
import sys
import time

import torch

from explorer.checkpoints import checkpoint_dir, load_latest_checkpoint
from explorer.config import save_config
from explorer.daemon import run_status
from explorer.ledger import LEDGER, RunLedger
from explorer.loop import DECISION_KEYS, AcquisitionLoop
from explorer.runs import read_metrics


def decisions(rows):
    return [{k: r.get(k) for k in DECISION_KEYS} for r in rows if r["iteration"] > 0]


def test_crash_between_log_and_checkpoint_then_resume_is_exact(tiny_experiment, engine, tmp_path):
    cfg = tiny_experiment()
    quiet = {"progress": False}
    straight = tmp_path / "straight"
    AcquisitionLoop(cfg, straight, engine_url=engine.url, **quiet).run(log=lambda s: None)

    crashed = tmp_path / "crashed"
    AcquisitionLoop(cfg, crashed, engine_url=engine.url, **quiet).run(until=1, log=lambda s: None)
    AcquisitionLoop(cfg, crashed, engine_url=engine.url, resume=True, **quiet).run(until=2, log=lambda s: None)
    # A crash after iteration 2 wrote its logs and ledger rows but before its checkpoint was complete:
    (checkpoint_dir(crashed, 2) / "COMPLETE").unlink()
    resumed = AcquisitionLoop(cfg, crashed, engine_url=engine.url, resume=True, **quiet)
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


def test_sigterm_mid_iteration_exits_cleanly_loses_nothing_and_resumes(tiny_experiment, tmp_path):
    """Fault (2): SIGTERM while an iteration runs -> exit 0 within 30 s; every accepted item of the
    finished iterations is in accepted.jsonl, the ledger and the checkpoint, and nothing else is."""
    cfg = tiny_experiment(iterations=50)
    config = tmp_path / "tiny.yaml"
    save_config(cfg, config)
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "explorer.cli", "daemon", str(config), "--out", str(run_dir),
                             "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:  # iteration 1 checkpointed: 2 is running
            if (checkpoint_dir(run_dir, 1) / "COMPLETE").exists():
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stdout.read()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "received SIGTERM" in out
    rows = read_metrics(run_dir / "metrics.jsonl")
    done = rows[-1]["iteration"]
    checkpoint = load_latest_checkpoint(run_dir)
    assert checkpoint.iteration == done >= 1
    assert "iterations: %d of 50" % done in run_status(run_dir)
    accepted = accepted_log(run_dir)
    assert sum(r["accepted"] for r in rows[1:]) == len(accepted) > 0
    assert [a["url"] for a in accepted] == [u for r in rows[1:] for u in r["accepted_urls"]]
    assert sorted(checkpoint.state["accepted_sha"]) == sorted(a["sha256"] for a in accepted)
    with RunLedger(run_dir / LEDGER) as ledger:
        assert ledger.metrics() == rows
        assert sorted(ledger.db.execute("SELECT url, sha256 FROM accepted").fetchall()) == \
            sorted((a["url"], a["sha256"]) for a in accepted)

    engine_port = json.loads((run_dir / "backend.json").read_text())["url"]
    loop = AcquisitionLoop(cfg, run_dir, engine_url=engine_port, resume=True, progress=False)
    assert loop.iteration == done


def test_status_endpoint_serves_the_run_summary_read_only(tiny_experiment, tmp_path):
    import httpx

    from explorer.daemon import StatusServer

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
