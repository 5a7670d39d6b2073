"""The daemon runs text configs with the image side's guarantees: SIGTERM at a safe point, SIGKILL
at any point, and a resume that ends with the decisions of a run that never stopped."""

import dataclasses
import errno
import signal

import pytest
import torch

from explorer.acquire.cache import ResponseCache
from explorer.run.checkpoints import checkpoint_dir, load_latest_checkpoint
from explorer.run.config import save_config
from explorer.run.daemon import run_status, status_summary
from explorer.run.disk import DiskConfig, folder_usage
from explorer.run.experiment import local_engine_for
from explorer.run.ledger import LEDGER, RunLedger, read_metrics
from explorer.run.loop import compare_decisions
from explorer.run.text import TextLoop
from tests.explorer.run.test_daemon import daemon_env, events, hostless, start_daemon, stop, wait_until
from tests.explorer.run.test_text_loop import text_corpus, tiny_text  # noqa: F401  (text_corpus: a fixture)

ITERATIONS = 3


@pytest.fixture(scope="module")
def unbroken_text(text_corpus, tmp_path_factory):  # noqa: F811
    """The same text config run to the end in this process, never stopped (and its thread count)."""
    from explorer.run.experiment import run_experiment

    run_dir = tmp_path_factory.mktemp("unbroken-text")
    run_experiment(tiny_text(text_corpus, iterations=ITERATIONS), run_dir, progress=False, log=lambda _: None)
    return run_dir, torch.get_num_threads()


def assert_same_as_unbroken_text(run_dir, unbroken_dir) -> None:
    rows, reference = read_metrics(run_dir / "metrics.jsonl"), read_metrics(unbroken_dir / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == list(range(ITERATIONS + 1))
    assert compare_decisions(hostless(reference), hostless(rows), TextLoop.DECISION_KEYS) == []
    assert [r["eval_perplexity"] for r in rows] == [r["eval_perplexity"] for r in reference]
    assert sum(r.get("accepted", 0) for r in rows) > 0  # the comparison covers accepted documents
    mine, theirs = load_latest_checkpoint(run_dir), load_latest_checkpoint(unbroken_dir)
    assert mine.iteration == theirs.iteration == ITERATIONS
    a, b = mine.state["learner"]["model"], theirs.state["learner"]["model"]
    assert all(torch.equal(a[k], b[k]) for k in b), "final weights differ"
    with RunLedger(run_dir / LEDGER) as ledger:
        assert ledger.metrics() == rows
        assert ledger.count("accepted") == sum(r.get("accepted", 0) for r in rows)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_text_daemon_stopped_or_killed_resumes_to_the_same_decisions(text_corpus, unbroken_text, tmp_path,  # noqa: F811
                                                                    sig):
    unbroken_dir, threads = unbroken_text
    config = tmp_path / "text.yaml"
    save_config(tiny_text(text_corpus, iterations=ITERATIONS), config)
    run_dir = tmp_path / "run"
    env = daemon_env(threads)
    proc = start_daemon([str(config), "--out", str(run_dir)], env)
    try:
        wait_until(proc, (checkpoint_dir(run_dir, 1) / "COMPLETE").exists)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        stop(proc)
    if sig == signal.SIGTERM:
        assert proc.returncode == 0 and "received SIGTERM" in out, out
        assert events(run_dir)[-1] == "stop"
    else:
        assert proc.returncode == -signal.SIGKILL
    done = load_latest_checkpoint(run_dir).iteration
    assert 1 <= done < ITERATIONS, "the signal came after the last iteration: nothing left to resume"
    assert f"iterations: {done} of {ITERATIONS}" in run_status(run_dir)

    resumed = start_daemon(["--out", str(run_dir)], env)  # no config: the run folder's own
    try:
        out, _ = resumed.communicate(timeout=600)
    finally:
        stop(resumed)
    assert resumed.returncode == 0, out
    assert f"resumed {run_dir} at iteration {done}" in out
    assert_same_as_unbroken_text(run_dir, unbroken_dir)
    status = status_summary(run_dir)
    assert status["modality"] == "text" and status["last_eval"]["eval_perplexity"] > 0
    assert "documents accepted" in run_status(run_dir)
    assert (run_dir / "tensorboard").is_dir()


def test_text_crash_between_log_and_checkpoint_then_resume_is_exact(text_corpus, unbroken_text,  # noqa: F811
                                                                    tmp_path):
    cfg, crashed = tiny_text(text_corpus, iterations=ITERATIONS), tmp_path / "crashed"
    with local_engine_for(cfg) as url:
        loop = TextLoop(cfg, crashed, engine_url=url, progress=False)
        loop.run(until=2, log=lambda _: None)
        loop.close()
        # A crash after iteration 2 wrote its logs and ledger rows but before its checkpoint was complete:
        (checkpoint_dir(crashed, 2) / "COMPLETE").unlink()
        resumed = TextLoop(cfg, crashed, engine_url=url, progress=False, resume=True)
        assert resumed.iteration == 1 and resumed.resumed_from == checkpoint_dir(crashed, 1)
        assert [r["iteration"] for r in read_metrics(crashed / "metrics.jsonl")] == [0, 1]  # stale line dropped
        assert resumed.ledger.last_iteration() == 1  # stale ledger rows dropped
        resumed.run(log=lambda _: None)
        resumed.close()
    assert_same_as_unbroken_text(crashed, unbroken_text[0])


def test_text_disk_budget_and_a_full_disk_stop_cleanly_and_resume_exactly(text_corpus, unbroken_text,  # noqa: F811
                                                                          tmp_path, monkeypatch):
    """Both stops of the image side, for text: a budget the folder cannot meet (text runs evict
    nothing), then a full disk on the 5th cache write of an iteration; each leaves the checkpoint of
    the last finished iteration, and the run, resumed, ends as the unbroken one."""
    cfg, run_dir = tiny_text(text_corpus, iterations=ITERATIONS), tmp_path / "run"
    with local_engine_for(cfg) as url:
        loop = TextLoop(cfg, run_dir, engine_url=url, progress=False)
        loop.run(until=1, log=lambda _: None)
        loop.close()
        tight = dataclasses.replace(cfg, disk=DiskConfig(max_gb=folder_usage(run_dir)["total"] * 0.5 / 2**30))
        loop = TextLoop(tight, run_dir, engine_url=url, progress=False, resume=True)
        loop.run(log=lambda _: None)
        loop.close()
        assert loop.iteration == 1 and "nothing else may be evicted" in loop.stopped_by

        put, calls = ResponseCache.put, []

        def fill_up(self, key, response):
            calls.append(key)
            if len(calls) == 5:
                raise OSError(errno.ENOSPC, "No space left on device")
            return put(self, key, response)
        monkeypatch.setattr(ResponseCache, "put", fill_up)
        loop = TextLoop(cfg, run_dir, engine_url=url, progress=False, resume=True)
        loop.run(log=lambda _: None)
        loop.close()
        monkeypatch.setattr(ResponseCache, "put", put)
        assert len(calls) >= 5 and loop.iteration == 1 and "the disk is full" in loop.stopped_by
        assert [r["iteration"] for r in read_metrics(run_dir / "metrics.jsonl")] == [0, 1]
        assert not list(run_dir.rglob(".tmp*"))

        loop = TextLoop(cfg, run_dir, engine_url=url, progress=False, resume=True)
        loop.run(log=lambda _: None)
        loop.close()
    assert_same_as_unbroken_text(run_dir, unbroken_text[0])
