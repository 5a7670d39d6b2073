"""A failed search is a missing observation: a tiny run against the local engine behind a loopback
proxy that answers 429 (as SearXNG's limiter does) to the first request of every other new query,
or to every search."""

import json
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from explorer.run.checkpoints import load_latest_checkpoint
from explorer.run.daemon import run_status, status_summary
from explorer.run.experiment import read_metrics, replay_run
from explorer.run.image import ImageLoop


class LimitedEngine:
    """The local engine behind a proxy on 127.0.0.1 that answers 429 to a search for `fails(k)`,
    k the query's place among the distinct queries seen, on its first request only (`every_time`:
    on all of them); everything else is passed through, the engine's URLs rewritten to the proxy's."""

    def __init__(self, engine_url: str, fails, every_time: bool = False):
        proxy, seen, lock = self, {}, threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes, ctype: str):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                url = urlsplit(self.path)
                if url.path == "/search":
                    q = parse_qs(url.query)["q"][0]
                    with lock:
                        first = q not in seen
                        seen.setdefault(q, len(seen))
                    if fails(seen[q]) and (first or every_time):
                        return self._send(429, b'{"error": "Too Many Requests"}', "application/json")
                answer = httpx.get(engine_url + self.path)
                body = answer.content.replace(engine_url.encode(), proxy.url.encode())
                self._send(answer.status_code, body, answer.headers["content-type"])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _config(tiny_experiment, url: str, **changes):
    search = {"backend": "local", "url": url, "results_per_query": 15, "concurrency": 1,
              "options": {"retries": 0, "per_page": 15}}
    return tiny_experiment(search=search, reward={"background_queries": 6, "background_size": 200}, **changes)


@pytest.fixture(scope="module")
def limited_run(tiny_experiment, engine, tmp_path_factory):
    proxy = LimitedEngine(engine.url, fails=lambda k: k % 2 == 1)
    run_dir = tmp_path_factory.mktemp("limited")
    cfg = _config(tiny_experiment, proxy.url)
    loop = ImageLoop(cfg, run_dir, progress=False)
    rows = loop.run(log=lambda line: None)
    loop.close()
    yield run_dir, rows[1:], cfg
    proxy.close()


def test_a_failed_search_gives_the_policy_no_reward(limited_run):
    run_dir, rows, _ = limited_run
    policy_log = load_latest_checkpoint(run_dir).state["policy"]["log"]
    observed = [(q, r) for row in rows for q, r, s in zip(row["queries"], row["query_rewards"], row["query_status"])
                if s != "failed"]
    assert all(s in row["query_status"] for row in rows for s in ("failed", "ok"))
    heard = [(q, round(r, 6)) for q, r in zip(policy_log["texts"], policy_log["rewards"])]
    assert heard == observed  # a failed query is not in it at all (no 0.0 either)
    for row in rows:
        failed = [i for i, s in enumerate(row["query_status"]) if s == "failed"]
        assert all(row["query_rewards"][i] is None and row["results"][i] is None for i in failed)
        assert len(row["search_errors"]) == len(failed) and all("HTTP 429" in e for e in row["search_errors"])
        assert not row["all_searches_failed"]
    with sqlite3.connect(run_dir / "ledger.sqlite") as db:
        failed = db.execute("SELECT reward, n_results, error FROM queries WHERE error IS NOT NULL").fetchall()
        assert failed and all(r is None and n is None and "HTTP 429" in e for r, n, e in failed)
        assert db.execute("SELECT COUNT(*) FROM queries WHERE error IS NULL AND reward IS NULL").fetchone()[0] == 0
    background = json.loads((run_dir / "background.json").read_text())
    assert [n is None for n in background["results"]] == [e is not None for e in background["errors"]]
    assert background["results"].count(None) == 3 and "HTTP 429" in next(e for e in background["errors"] if e)


def test_a_failed_query_is_searched_again_once_in_the_next_iteration(limited_run):
    run_dir, (first, second), cfg = limited_run
    failed_first = [q for q, s in zip(first["queries"], first["query_status"]) if s == "failed"]
    assert first["query_searches"] == [1] * 4
    assert second["queries"][4:] == failed_first and second["query_searches"][4:] == [2] * len(failed_first)
    assert all(s == "ok" for s in second["query_status"][4:])  # the proxy refuses a query's first request only
    still_failed = [q for q, s in zip(second["queries"], second["query_status"]) if s == "failed"]
    state = load_latest_checkpoint(run_dir).state
    assert still_failed and [f[0] for f in state["failed_searches"]] == still_failed
    resumed = ImageLoop(cfg, run_dir, progress=False, resume=True)
    assert [(f.query.text, f.searches) for f in resumed.failed_searches] == [(q, 1) for q in still_failed]
    resumed.close()


def test_the_replay_replays_the_failures(limited_run):
    run_dir, _, _ = limited_run
    assert replay_run(run_dir, progress=False, log=lambda line: None) == []
    replayed = read_metrics(run_dir / "replay-metrics.jsonl")[1:]
    assert [r["query_status"] for r in replayed] == [r["query_status"] for r in read_metrics(run_dir / "metrics.jsonl")[1:]]


def test_an_iteration_whose_searches_all_failed_says_so(tiny_experiment, engine, tmp_path):
    proxy = LimitedEngine(engine.url, fails=lambda k: True, every_time=True)
    lines = []
    try:
        with pytest.warns(UserWarning, match="background queries fetched nothing"):
            loop = ImageLoop(_config(tiny_experiment, proxy.url, iterations=1), tmp_path, progress=False)
        rows = loop.run(log=lines.append)
        loop.close()
    finally:
        proxy.close()
    row = rows[1]
    assert row["all_searches_failed"] and row["query_rewards"] == [None] * 4 and row["query_status"] == ["failed"] * 4
    assert load_latest_checkpoint(tmp_path).state["policy"]["log"]["texts"] == []  # the policy heard nothing
    assert any("all 4 searches failed" in line and "HTTP 429" in line for line in lines)
    assert status_summary(tmp_path)["all_searches_failed"] == [1]
    assert "every search failed in 1 iterations (the last: 1)" in run_status(tmp_path)
