"""The run ledger (SQLite in WAL mode) and TensorBoard scalars of the acquisition loop: the ledger
agrees with metrics.jsonl, accepted.jsonl and the checkpoint after a run, after a crash and after a
resume; TensorBoard holds every step once even when a resumed run redoes an iteration."""

import json
import shutil
import sqlite3

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from explorer.run.checkpoints import CHECKPOINTS, checkpoint_dir, load_latest_checkpoint
from explorer.run.config import load_config
from explorer.run.daemon import status_summary
from explorer.run.experiment import read_metrics
from explorer.run.image import ACQUIRED, ImageLoop
from explorer.run.ledger import LEDGER, FetchRecord, RunLedger

DECISION_KEYS = ImageLoop.DECISION_KEYS
from learners.shards import ShardStore


def quiet(line):
    pass


ROW = {"iteration": 1, "queries": ["boot", "red bag"], "query_rewards": [0.5, 0.1], "results": [2, 0],
       "fetched": 2, "decoded": 1, "accepted": 1, "seconds": 3.0, "rejected": {"decode_error": 1}}
ITEM = {"iteration": 1, "url": "http://a/1.png", "sha256": "aa", "reward": 0.5, "relevant": True}


def test_an_iteration_is_one_transaction_in_a_wal_ledger(tmp_path):
    ledger = RunLedger(tmp_path / LEDGER)
    assert ledger.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    ledger.record_iteration(ROW, concepts=["boot", None], results=[["http://a/1.png", "http://a/2.png"], []],
                            fetches=[FetchRecord("http://a/1.png", "decoded", "aa"),
                                     FetchRecord("http://a/2.png", "decode_error")], accepted=[ITEM])
    with pytest.raises(sqlite3.IntegrityError):  # fails half-way: the same item accepted twice
        ledger.record_iteration({**ROW, "iteration": 2}, accepted=[{**ITEM, "iteration": 2}] * 2)
    with RunLedger(tmp_path / LEDGER, readonly=True) as reader:  # a reader beside the open writer
        assert reader.last_iteration() == 1 and reader.metrics() == [ROW]  # nothing of iteration 2
        assert reader.summary() == {"iterations_done": 1, "seconds": 3.0, "fetched": 2, "accepted_total": 1,
                                    "queries_issued": 2, "accepted_items": 1, "recent_rejected": {"decode_error": 1}}
        assert reader.db.execute("SELECT concept FROM queries ORDER BY position").fetchall() == [("boot",), (None,)]
        with pytest.raises(sqlite3.OperationalError):
            reader.db.execute("DELETE FROM iterations")
    assert ledger.truncate_after(0) == 1
    assert all(ledger.count(t, after=-1) == 0 for t in ("iterations", "queries", "results", "fetches", "accepted"))
    ledger.import_logs([{"iteration": 0}, ROW], [ITEM])  # a run folder from before the ledger
    assert ledger.metrics() == [{"iteration": 0}, ROW] and ledger.count("accepted") == 1
    ledger.close()


def assert_ledger_matches_logs(run_dir):
    """Every table of the ledger against metrics.jsonl, accepted.jsonl and the newest checkpoint."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    accepted = [json.loads(x) for x in (run_dir / "accepted.jsonl").read_text().splitlines()]
    with RunLedger(run_dir / LEDGER, readonly=True) as ledger:
        db = ledger.db
        assert ledger.metrics() == rows
        assert load_latest_checkpoint(run_dir).iteration == ledger.last_iteration()
        for row in rows[1:]:
            it = row["iteration"]
            queries = db.execute("SELECT text, reward, n_results, concept FROM queries WHERE iteration = ? "
                                 "ORDER BY position", (it,)).fetchall()
            assert [q[:3] for q in queries] == list(zip(row["queries"], row["query_rewards"], row["results"]))
            assert all(q[3] is not None for q in queries)  # the GP policy issues vocabulary concepts
            assert [n for (n,) in db.execute("SELECT COUNT(*) FROM results WHERE iteration = ? GROUP BY query "
                                             "ORDER BY query", (it,))] == [n for n in row["results"] if n]
            statuses = dict(db.execute("SELECT status, COUNT(*) FROM fetches WHERE iteration = ? GROUP BY status",
                                       (it,)).fetchall())
            assert statuses.pop("decoded", 0) == row["decoded"]
            statuses.pop("already_accepted", None)  # known images are neither decoded anew nor rejected
            assert statuses == row["rejected"]
        assert db.execute("SELECT iteration, url, sha256, reward FROM accepted ORDER BY rowid").fetchall() == \
            [(a["iteration"], a["url"], a["sha256"], a["reward"]) for a in accepted]
    store = ShardStore(run_dir / ACQUIRED, load_config(run_dir / "config.yaml").fetch.image_size, readonly=True)
    assert store.keys == [a["sha256"] for a in accepted]
    assert load_latest_checkpoint(run_dir).state["learner"]["mixture"]["position"] == len(accepted)
    return rows


@pytest.fixture(scope="module")
def resumed_run(tiny_experiment, engine, tmp_path_factory):
    """3 iterations keeping 2 checkpoints; then iteration 3's checkpoint is made incomplete (a crash
    after it logged, before its checkpoint was whole) and the run resumes and redoes it."""
    cfg = tiny_experiment(iterations=3)
    run_dir = tmp_path_factory.mktemp("run")
    first = ImageLoop(cfg, run_dir, engine_url=engine.url, progress=False, keep_checkpoints=2)
    first_rows = first.run(log=quiet)
    first.close()
    seen = {"first_rows": first_rows, "first_ledger_agrees": assert_ledger_matches_logs(run_dir) == first_rows,
            "first_checkpoints": sorted(p.name for p in (run_dir / CHECKPOINTS).iterdir())}
    (checkpoint_dir(run_dir, 3) / "COMPLETE").unlink()
    resumed = ImageLoop(cfg, run_dir, engine_url=engine.url, progress=False, keep_checkpoints=2, resume=True)
    seen.update(resumed_at=resumed.iteration, ledger_cut_to=resumed.ledger.last_iteration(),
                metrics_cut_to=read_metrics(run_dir / "metrics.jsonl")[-1]["iteration"])
    resumed.run(log=quiet)
    resumed.close()
    return run_dir, seen


def test_ledger_agrees_with_the_logs_after_a_run_and_after_a_resume(resumed_run):
    run_dir, seen = resumed_run
    assert seen["first_ledger_agrees"]
    assert seen["resumed_at"] == seen["ledger_cut_to"] == seen["metrics_cut_to"] == 2  # incomplete dir skipped
    rows = assert_ledger_matches_logs(run_dir)
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    assert [{k: r.get(k) for k in DECISION_KEYS} for r in rows] == \
        [{k: r.get(k) for k in DECISION_KEYS} for r in seen["first_rows"]]  # the redone iteration is the same


def test_only_the_last_k_checkpoint_directories_are_kept(resumed_run):
    run_dir, seen = resumed_run
    assert seen["first_checkpoints"] == ["iter-000002", "iter-000003"]
    assert sorted(p.name for p in (run_dir / CHECKPOINTS).iterdir()) == ["iter-000002", "iter-000003"]
    assert load_latest_checkpoint(run_dir).state["iteration"] == 3


# metrics.jsonl key -> TensorBoard tag, spelled out here rather than taken from the loop's own table
TAG_OF_KEY = {"eval_knn_accuracy": "eval/knn_accuracy", "eval_linear_probe_accuracy": "eval/linear_probe_accuracy",
              "ssl_loss": "train/ssl_loss", "mean_image_reward": "acquire/mean_image_reward",
              "precision_fetched": "acquire/precision_fetched", "precision_accepted": "acquire/precision_accepted",
              "accepted": "acquire/accepted", "fetched": "acquire/fetched", "decoded": "acquire/decoded",
              "seconds": "time/seconds_per_iteration"}


def test_tensorboard_has_every_scalar_once_per_step_after_a_resume(resumed_run):
    run_dir, _ = resumed_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    expected = {}  # tag -> [(step, value)] straight from the metrics.jsonl rows
    for row in rows:
        for key, tag in TAG_OF_KEY.items():
            if row.get(key) is not None:
                expected.setdefault(tag, []).append((row["iteration"], float(row[key])))
        if row.get("query_rewards"):
            rewards = row["query_rewards"]
            expected.setdefault("acquire/mean_query_reward", []).append((row["iteration"], sum(rewards) / len(rewards)))
    assert {"eval/knn_accuracy", "eval/linear_probe_accuracy", "train/ssl_loss", "acquire/mean_image_reward",
            "acquire/precision_accepted", "acquire/accepted", "acquire/fetched", "acquire/mean_query_reward",
            "time/seconds_per_iteration"} <= set(expected)
    assert [s for s, _ in expected["eval/knn_accuracy"]] == [0, 1, 2, 3]
    assert [s for s, _ in expected["acquire/accepted"]] == [1, 2, 3]
    # the values differ between tags, so a tag written from the wrong key shows
    assert [v for _, v in expected["acquire/accepted"]] != [v for _, v in expected["acquire/fetched"]]
    assert set(events.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in logged] == [s for s, _ in points], tag  # iteration 3 once, not twice
        assert all(abs(a - b) <= 1e-5 * max(1.0, abs(b)) for (_, a), (_, b) in zip(logged, points)), \
            (tag, logged, points)


def test_status_reads_its_counts_from_the_ledger(resumed_run, tmp_path):
    run_dir, _ = resumed_run
    accepted = len((run_dir / "accepted.jsonl").read_text().splitlines())
    for name in ("config.yaml", LEDGER):  # the ledger alone, without metrics.jsonl
        shutil.copy(run_dir / name, tmp_path / name)
    summary = status_summary(tmp_path)
    assert summary["iterations_done"] == 3 and summary["queries_issued"] == 12
    assert summary["accepted_total"] == accepted
    assert summary["last_eval"]["iteration"] == 3


class SimulatedCrash(Exception):
    pass


def test_a_crash_after_the_ledger_commit_before_the_checkpoint_is_cut_back_on_resume(
        tiny_experiment, engine, tmp_path, monkeypatch):
    cfg = tiny_experiment()
    save = ImageLoop.save_checkpoint

    def crash_at_iteration_2(loop):
        if loop.iteration == 2:
            raise SimulatedCrash
        return save(loop)
    monkeypatch.setattr(ImageLoop, "save_checkpoint", crash_at_iteration_2)
    loop = ImageLoop(cfg, tmp_path, engine_url=engine.url, progress=False)
    with pytest.raises(SimulatedCrash):
        loop.run(log=quiet)
    loop.close()
    monkeypatch.undo()
    with RunLedger(tmp_path / LEDGER, readonly=True) as ledger:
        assert ledger.last_iteration() == 2  # committed before the checkpoint that never came
    resumed = ImageLoop(cfg, tmp_path, engine_url=engine.url, progress=False, resume=True)
    assert resumed.iteration == resumed.ledger.last_iteration() == 1
    resumed.run(log=quiet)
    resumed.close()
    assert [r["iteration"] for r in assert_ledger_matches_logs(tmp_path)] == [0, 1, 2]


def test_a_failed_query_has_its_error_and_results_their_first_rank(tmp_path):
    """A ledger from before queries had an `error` column gains it; a failed query is stored with no
    reward and no count, a partial one with both and the error that cut it short."""
    with sqlite3.connect(tmp_path / LEDGER) as old:
        old.execute("CREATE TABLE queries (iteration INTEGER NOT NULL, position INTEGER NOT NULL, text TEXT NOT NULL, "
                    "concept TEXT, reward REAL, n_results INTEGER, PRIMARY KEY (iteration, position))")
    row = {**ROW, "queries": ["boot", "red bag", "shoe"], "query_rewards": [0.5, None, 0.2], "results": [2, None, 1]}
    with RunLedger(tmp_path / LEDGER) as ledger:
        ledger.record_iteration(row, results=[[(0, "http://a/1.png"), (3, "http://a/2.png")], [], [(0, "http://a/3.png")]],
                                errors=[None, "search 'red bag' page 1: HTTP 429", "search 'shoe' page 2: HTTP 429"])
        assert ledger.db.execute("SELECT text, reward, n_results, error FROM queries ORDER BY position").fetchall() == [
            ("boot", 0.5, 2, None), ("red bag", None, None, "search 'red bag' page 1: HTTP 429"),
            ("shoe", 0.2, 1, "search 'shoe' page 2: HTTP 429")]
        assert ledger.db.execute("SELECT query, rank, url FROM results ORDER BY query, rank").fetchall() == [
            (0, 0, "http://a/1.png"), (0, 3, "http://a/2.png"), (2, 0, "http://a/3.png")]
