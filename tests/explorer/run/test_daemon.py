"""The daemon's read-only status endpoint. Its fault guarantees (SIGTERM, SIGKILL, SIGINT, exact
resume) are tested for both modalities in test_faults.py."""

import json

from explorer.run.config import save_config


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
        assert httpx.get(server.url.replace("/status", "/nothing")).status_code == 404
    finally:
        server.stop()
    assert body["iterations_done"] == 1 and body["iterations_budget"] == 2
    assert body["iterations_per_hour"] == 100.0 and body["fetches_per_second"] == 2.0
    assert body["recent_rejected"] == {"decode_error": 2} and body["recent_search_errors"] == ["boom"]
    assert body["last_eval"]["eval_knn_accuracy"] == 0.5
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_status_shows_where_the_last_iteration_spent_its_time(tiny_run):
    from explorer.run.daemon import run_status, status_summary

    split = status_summary(tiny_run)["stage_seconds"]
    assert set(split) >= {"search", "fetch", "reward", "train"} and all(v >= 0 for v in split.values())
    assert "its time: search" in run_status(tiny_run)
