"""A run of the knn-retrieval policy against the local engine's image index, then its replay."""

import socket

from explorer.run.experiment import read_metrics, replay_run, run_experiment


def test_knn_retrieval_run_queries_by_target_image_and_replays_exactly(tiny_experiment, tmp_path, monkeypatch):
    cfg = tiny_experiment(policy={"name": "knn-retrieval", "queries_per_iteration": 4})
    run_dir = tmp_path / "run"
    rows = run_experiment(cfg, run_dir, progress=False, log=lambda line: None)
    queries = [q for row in rows[1:] for q in row["queries"]]
    assert len(queries) == len(set(queries)) == 8 and all(q.startswith("image:") for q in queries)
    assert all(row["results"] == [15] * 4 for row in rows[1:])  # k = results_per_query neighbours each
    assert all(row["search_errors"] == [] for row in rows[1:])
    # the target's neighbours under an ImageNet encoder are mostly the target's kind (hidden truth)
    assert all(row["precision_fetched"] > 0.5 for row in rows[1:])

    def no_network(*args, **kwargs):
        raise AssertionError("replay opened a socket")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert replay_run(run_dir, progress=False, log=lambda line: None) == []
    replayed = read_metrics(run_dir / "replay-metrics.jsonl")
    assert [r["queries"] for r in replayed[1:]] == [r["queries"] for r in rows[1:]]
    assert [r["accepted_urls"] for r in replayed[1:]] == [r["accepted_urls"] for r in rows[1:]]
