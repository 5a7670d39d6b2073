"""Exact resume and clean stops: the daemon's guarantees, on the small real corpus."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import torch

from explorer.config import save_config
from explorer.daemon import run_status
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
    shutil.copy(crashed / "checkpoint.pt", tmp_path / "after-1.pt")
    AcquisitionLoop(cfg, crashed, engine_url=engine.url, resume=True, **quiet).run(until=2, log=lambda s: None)
    # A crash after iteration 2 wrote its logs but before its checkpoint replaced the old one:
    shutil.copy(tmp_path / "after-1.pt", crashed / "checkpoint.pt")
    resumed = AcquisitionLoop(cfg, crashed, engine_url=engine.url, resume=True, **quiet)
    assert resumed.iteration == 1
    assert [r["iteration"] for r in read_metrics(crashed / "metrics.jsonl")] == [0, 1]  # stale line dropped
    resumed.run(log=lambda s: None)

    assert decisions(read_metrics(crashed / "metrics.jsonl")) == decisions(read_metrics(straight / "metrics.jsonl"))
    accepted = [json.loads(x)["url"] for x in (crashed / "accepted.jsonl").read_text().splitlines()]
    assert accepted == [json.loads(x)["url"] for x in (straight / "accepted.jsonl").read_text().splitlines()]
    a = torch.load(straight / "checkpoint.pt", weights_only=True)["learner"]["model"]
    b = torch.load(crashed / "checkpoint.pt", weights_only=True)["learner"]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_exits_cleanly_and_resumes(tiny_experiment, tmp_path):
    cfg = tiny_experiment(iterations=50)
    config = tmp_path / "tiny.yaml"
    save_config(cfg, config)
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "explorer.cli", "daemon", str(config), "--out", str(run_dir),
                             "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:  # wait for a finished iteration
            metrics = run_dir / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "received SIGTERM" in out
    done = read_metrics(run_dir / "metrics.jsonl")[-1]["iteration"]
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["iteration"] == done
    assert "iterations: %d of 50" % done in run_status(run_dir)

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
