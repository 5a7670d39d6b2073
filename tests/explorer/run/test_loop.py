"""The whole loop on a small real slice, offline: a 2-iteration run, then its replay."""

import json
import socket
import sqlite3
from urllib.parse import urlsplit

import numpy as np
import pyarrow.parquet as pq
import pytest

from explorer.run.checkpoints import load_latest_checkpoint
from explorer.run.config import ConfigError, ExperimentConfig, load_config
from explorer.run.experiment import read_metrics, replay_run
from explorer.run.image import ImageLoop
from explorer.run.loop import background_queries, compare_decisions
from explorer.score.reward import RewardConfig, knn_reward, leave_one_out_rewards

# the GP hears the background queries before its first batch (GPConfig.observe_background)
HEARING_GP = {"name": "gp", "queries_per_iteration": 4, "options": {"explore_first": 4, "observe_background": True}}


@pytest.fixture(scope="module")
def recorded_run(tiny_experiment, engine, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    loop = ImageLoop(tiny_experiment(policy=HEARING_GP), run_dir, engine_url=engine.url, progress=False)
    rows = loop.run(log=lambda line: None)
    return run_dir, rows


def test_run_folder_records_everything(recorded_run, small_corpus):
    run_dir, rows = recorded_run
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for name in ("config.yaml", "backend.json", "run.json", "metrics.jsonl", "cache", "ledger.sqlite",
                 "tensorboard", "checkpoints/iter-000001/COMPLETE", "checkpoints/iter-000002/state.pt"):
        assert (run_dir / name).exists(), name
    checkpoint = load_latest_checkpoint(run_dir)
    assert checkpoint.path.name == "iter-000002"
    state = checkpoint.state
    assert state["iteration"] == 2 and state["learner"]["step"] == 2 + 2 * 2
    heard = [r for r in json.loads((run_dir / "background.json").read_text())["query_rewards"] if r is not None]
    assert len(state["policy"]["log"]["rewards"]) == len(heard) + 8  # the background's queries, then its own
    assert load_config(run_dir / "config.yaml").policy.name == "gp"
    for row in rows[1:]:
        assert len(row["queries"]) == len(row["query_rewards"]) == 4
        assert row["fetched"] == row["decoded"] + sum(row["rejected"].values())
        assert row["decoded"] > 0 and 0 <= row["accepted"] <= row["decoded"]
        assert 0.0 <= row["eval_knn_accuracy"] <= 1.0 and row["ssl_loss"] > 0
    accepted = [json.loads(line) for line in (run_dir / "accepted.jsonl").read_text().splitlines()]
    assert len(accepted) == sum(r["accepted"] for r in rows[1:])
    assert len({a["sha256"] for a in accepted}) == len(accepted)  # nothing accepted twice
    # relevance and precision recomputed from the manifest's hidden source column, not via GroundTruth
    manifest = pq.read_table(small_corpus.root / "manifest.parquet", columns=["key", "source"]).to_pydict()
    is_fashion = {k: s == "fashion-mnist" for k, s in zip(manifest["key"], manifest["source"])}

    def truth(url):
        path = urlsplit(url).path
        assert path.startswith("/image/"), url
        return is_fashion[path[len("/image/"):]]
    assert accepted and [a["url"] for a in accepted] == [u for r in rows[1:] for u in r["accepted_urls"]]
    assert [a["relevant"] for a in accepted] == [truth(a["url"]) for a in accepted]
    assert any(a["relevant"] for a in accepted)  # the run found some target-kind items
    for row in rows[1:]:
        marks = [truth(u) for u in row["accepted_urls"]]
        if marks:
            assert row["precision_accepted"] == pytest.approx(sum(marks) / len(marks), abs=1e-12)
        else:
            assert row["precision_accepted"] is None
    with sqlite3.connect(run_dir / "ledger.sqlite") as db:
        for row in rows[1:]:
            decoded = [u for (u,) in db.execute("SELECT url FROM fetches WHERE iteration = ? AND status = 'decoded'",
                                                (row["iteration"],))]
            assert len(decoded) == row["decoded"]
            assert row["precision_fetched"] == pytest.approx(sum(map(truth, decoded)) / len(decoded), abs=1e-12)
    # the accuracies are the evaluator's on the probe split, not placeholders: iteration 0's kNN accuracy
    # on Fashion-MNIST classes is well above chance (0.1) even for a barely trained encoder
    assert rows[0]["eval_knn_accuracy"] > 0.2


def test_the_background_is_the_seeds_draw_shared_by_every_policy(recorded_run, tiny_experiment, engine, tmp_path):
    run_dir, rows = recorded_run
    recorded = json.loads((run_dir / "background.json").read_text())
    cfg = tiny_experiment(policy={"name": "random", "queries_per_iteration": 4})
    loop = ImageLoop(cfg, tmp_path / "random", engine_url=engine.url, progress=False)
    assert recorded["queries"] == background_queries(cfg, loop.vocab)  # the gp run drew what random draws
    assert len(recorded["queries"]) == cfg.reward.background_queries
    assert recorded["decoded"] == len(loop.background_sample) == len(loop.space.background) > 0
    assert loop.web_sample == loop.background_sample.items  # the web's reference: the first sample, kept
    assert background_queries(tiny_experiment(seed=1), loop.vocab) != recorded["queries"]
    # then the sample is a reservoir over everything the run fetched: the checkpoint holds it
    state = load_latest_checkpoint(run_dir).state["background"]
    assert state["seen"] == recorded["decoded"] + sum(r["decoded"] for r in rows[1:])
    assert len(state["items"]) == min(state["seen"], cfg.reward.background_size) > recorded["decoded"]
    # the reward's scale is the target's own rewards contrasted with that background
    space = loop.space
    plain = leave_one_out_rewards(space.index, cfg.reward.k)
    contrasted = plain - cfg.reward.background_weight * knn_reward(space.index.embeddings, space.background, cfg.reward.k)
    np.testing.assert_allclose(space.calibration.reference, np.sort(contrasted), atol=1e-6)


def test_the_gp_hears_the_background_queries_before_its_first_batch(recorded_run):
    """The background queries' rewards (scored like the first round's, each image's own background
    entry left out) go to the GP before it proposes: its log starts with them, and they are in
    background.json for the reader."""
    run_dir, rows = recorded_run
    recorded = json.loads((run_dir / "background.json").read_text())
    log = load_latest_checkpoint(run_dir).state["policy"]["log"]
    heard = [r for r in recorded["query_rewards"] if r is not None]
    assert len(recorded["query_rewards"]) == len(recorded["queries"]) and len(heard) > 0
    assert log["texts"][:len(heard)] == [q for q, r in zip(recorded["queries"], recorded["query_rewards"])
                                         if r is not None]
    np.testing.assert_allclose(log["rewards"][:len(heard)], heard, atol=1e-6)
    assert log["texts"][len(heard):len(heard) + len(rows[1]["queries"])] == rows[1]["queries"]


def test_accept_drops_copies_of_probe_test_earlier_accepts_and_batch_mates(tiny_experiment, engine, tmp_path):
    """The acquisition's filters, which the small corpus never triggers: decontamination against the
    target's probe_test split, de-duplication against earlier iterations and within the batch."""
    import numpy as np
    import torch

    from explorer.run.loop import Candidates
    from explorer.score.reward import image_signature

    loop = ImageLoop(tiny_experiment(), tmp_path, engine_url=engine.url, progress=False)
    probe = loop.target.part("probe_test")[0]
    acquire = loop.target.part("acquire")[0]
    earlier, new, other = acquire[0], acquire[1], acquire[2]
    brighter = (probe[3].int() + 3).clamp(0, 255).to(torch.uint8)  # a re-encoded copy, not byte-identical
    # the batch: a probe_test copy, a near copy of another, an earlier accept, a new image twice, one more
    images = torch.stack([probe[0], brighter, earlier, new, new.clone(), other])
    fresh = image_signature(torch.stack([earlier, new, other]))
    assert (fresh @ image_signature(probe).T).max() < 0.95  # the fresh images copy no probe_test image
    assert (fresh @ fresh.T - np.eye(3)).max() < 0.95  # nor each other
    loop.accepted_sig = image_signature(earlier[None])  # as if accepted in an earlier iteration
    cand = Candidates([f"http://x/{i}.png" for i in range(6)], [f"sha{i}" for i in range(6)], images,
                      [[0]] * 6)
    above = loop.space.calibration.reference.max()  # every one passes the reward rule on its own
    rewards = np.array([above + 0.6, above + 0.5, above + 0.4, above + 0.1, above + 0.3, above + 0.2])
    assert loop.cfg.reward.accept_mask(rewards, loop.space.calibration).all()
    kept = loop.accept(cand, rewards)
    # 0, 1: probe_test copies; 2: accepted before; 3 and 4 are one image: the better-rewarded 4 stays
    assert kept.tolist() == [4, 5]
    loop.close()


def test_replay_makes_identical_decisions_without_network(recorded_run, monkeypatch):
    run_dir, _ = recorded_run

    def no_network(*args, **kwargs):
        raise AssertionError("replay opened a socket")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    recorded_files = {name: (run_dir / name).read_bytes() for name in ("accepted.jsonl", "metrics.jsonl")}
    assert replay_run(run_dir, progress=False, log=lambda line: None) == []
    assert all((run_dir / name).read_bytes() == data for name, data in recorded_files.items())  # untouched
    assert (run_dir / "replay-accepted.jsonl").read_text() == recorded_files["accepted.jsonl"].decode()
    replayed = read_metrics(run_dir / "replay-metrics.jsonl")
    recorded = read_metrics(run_dir / "metrics.jsonl")
    assert [r["queries"] for r in replayed[1:]] == [r["queries"] for r in recorded[1:]]
    assert [r["accepted_urls"] for r in replayed[1:]] == [r["accepted_urls"] for r in recorded[1:]]


def test_compare_decisions_reports_a_changed_query():
    a = [{"iteration": 1, "queries": ["boot"], "query_rewards": [0.5], "accepted_urls": [], "ssl_loss": 1.0}]
    b = [{**a[0], "queries": ["bag"]}]
    assert compare_decisions(a, a, ImageLoop.DECISION_KEYS) == []
    assert "queries differs" in compare_decisions(a, b, ImageLoop.DECISION_KEYS)[0]


def test_replay_of_a_missing_query_names_it(recorded_run, tmp_path):
    import shutil

    run_dir, _ = recorded_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "cache" / "requests")
    with pytest.raises(Exception, match="no cached answer for local search"):
        replay_run(copy, progress=False, log=lambda line: None)


@pytest.mark.parametrize("text, message", [
    ("policy:\n  temprature: 3\n", "unknown key 'policy.temprature'"),
    ("learner:\n  lr: fast\n", "learner.lr: expected float"),
    ("iterations: [1, 2\n", "not valid YAML"),
    ("search:\n  backend: searxng\n", "needs search.url"),
    ("reward:\n  k: 0\n", "k must be >= 1"),
])
def test_malformed_configs_name_the_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("[", r"\[")):
        load_config(path)


def test_shipped_configs_load():
    from pathlib import Path

    from explorer.analysis.sweep import SweepConfig, load_sweep_config

    for path in sorted((Path(__file__).parents[3] / "configs").glob("*.yaml")):
        if path.name.startswith("isoflop"):  # the sweep's own format (explorer sweep), not an experiment
            assert isinstance(load_sweep_config(path), SweepConfig)
            continue
        if path.name.startswith("grid-world"):  # a grid's plan (bench/exp_world_grid.py), checked in tests/bench
            continue
        assert isinstance(load_config(path), ExperimentConfig)


def test_oracle_relevance_reads_the_hidden_truth(small_corpus):
    from explorer.run.assembly import oracle_relevance
    from explorer.run.image import GroundTruth
    from explorer.web.vocabulary import ConceptVocabulary

    vocab = ConceptVocabulary(concepts=("sneaker", "dress", "butterfly", "handwritten digit"), source="test")
    relevance = oracle_relevance(vocab, GroundTruth(small_corpus, frozenset({"fashion-mnist"})), n=10)
    assert relevance[0] >= 0.8 and relevance[1] >= 0.8
    assert relevance[2] <= 0.5 and relevance[3] <= 0.5


def test_a_log_line_torn_by_a_crash_does_not_block_resume(tmp_path):
    """A process killed (or a disk filled) mid-append leaves half a JSON object as the last line."""
    from explorer.run.loop import truncate_logs

    (tmp_path / "accepted.jsonl").write_text('{"iteration": 1, "url": "a"}\n{"iteration": 2, "url": "b"}\n'
                                             '{"iteration": 2, "ur')
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 0}\n{"iteration": 1}\n{"itera')
    truncate_logs(tmp_path, ["accepted.jsonl", "metrics.jsonl"], 1)
    assert (tmp_path / "accepted.jsonl").read_text() == '{"iteration": 1, "url": "a"}\n'
    assert (tmp_path / "metrics.jsonl").read_text() == '{"iteration": 0}\n{"iteration": 1}\n'


def test_a_reward_read_from_the_base_encoder_does_not_move_with_training(tiny_experiment, engine, tmp_path):
    """`reward.encoder: base`: the reward reads the learner as the config builds it, so with the first
    web sample kept as the background the target's own scale is the same in every iteration, while
    the learner trains on (the current encoder's scale moves)."""
    reward = {"background_update": "fixed", "web_percentile": None, "min_spread": 0.0}  # no fallback
    rows = {}
    for encoder in ("base", "learner"):
        loop = ImageLoop(tiny_experiment(iterations=3, reward={**reward, "encoder": encoder}), tmp_path / encoder,
                         engine_url=engine.url, progress=False)
        rows[encoder] = loop.run(log=lambda line: None)[1:]
        loop.close()
    assert [r["reward_encoder"] for r in rows["base"]] == ["base"] * 3
    assert len({r["reward_spread"] for r in rows["base"]}) == 1
    assert [r["reward_encoder"] for r in rows["learner"]] == ["learner"] * 3
    assert len({r["reward_spread"] for r in rows["learner"]}) > 1
    assert rows["base"][-1]["learner_step"] == rows["learner"][-1]["learner_step"]  # the learner trained alike


def test_a_reward_read_from_the_start_encoder_is_the_first_rounds_and_stays(tiny_experiment, engine, tmp_path):
    """`reward.encoder: start`: the reward reads the learner as the first round read it, frozen there:
    round 1 scores exactly as a run that reads the current learner, later rounds keep the target's
    scale while the learner trains on, and a resumed run reads the same encoder from the run folder
    (and refuses to go on without it)."""
    reward = {"background_update": "fixed", "web_percentile": None, "min_spread": 0.0}
    rows = {}
    for encoder in ("start", "learner"):
        loop = ImageLoop(tiny_experiment(iterations=3, reward={**reward, "encoder": encoder}), tmp_path / encoder,
                         engine_url=engine.url, progress=False)
        rows[encoder] = loop.run(until=1 if encoder == "start" else None, log=lambda line: None)[1:]
        loop.close()
    loop = ImageLoop(tiny_experiment(iterations=3, reward={**reward, "encoder": "start"}), tmp_path / "start",
                     engine_url=engine.url, progress=False, resume=True)
    rows["start"] += loop.run(log=lambda line: None)
    loop.close()
    start, learner = rows["start"], rows["learner"]
    assert [r["iteration"] for r in start] == [1, 2, 3]
    assert [r["reward_encoder"] for r in start] == ["start"] * 3
    assert start[0]["query_rewards"] == learner[0]["query_rewards"]  # round 1 read the same encoder
    assert start[0]["reward_spread"] == learner[0]["reward_spread"]
    assert len({r["reward_spread"] for r in start}) == 1  # after the resume too
    assert len({r["reward_spread"] for r in learner}) > 1
    (tmp_path / "start" / "start-encoder.pt").unlink()
    with pytest.raises(FileNotFoundError, match="start-encoder.pt is missing"):
        ImageLoop(tiny_experiment(iterations=4, reward={**reward, "encoder": "start"}), tmp_path / "start",
                  engine_url=engine.url, progress=False, resume=True)


def test_reward_encoder_is_checked():
    with pytest.raises(ValueError, match="unknown reward encoder"):
        RewardConfig(encoder="projector")
    with pytest.raises(ValueError, match="text.reward_encoder"):
        ExperimentConfig(modality="text", reward=RewardConfig(encoder="base"))


def test_the_gp_hears_the_captions_of_the_best_scored_images(tiny_experiment, engine, small_corpus, tmp_path):
    """With `caption_feedback`, each round's best-scored fetched images' captions (distinct, worth
    more than 0, at most that many) go to the GP as free-text observations after its own queries:
    the metrics row lists them, the policy's log holds them, and each is the caption of an image
    decoded in that round."""
    policy = {"name": "gp", "queries_per_iteration": 4, "options": {"explore_first": 4, "caption_feedback": 3}}
    run_dir = tmp_path / "run"
    loop = ImageLoop(tiny_experiment(policy=policy), run_dir, engine_url=engine.url, progress=False)
    rows = loop.run(log=lambda line: None)
    loop.close()
    heard = [row.get("captions_heard", []) for row in rows[1:]]
    assert any(heard)
    manifest = pq.read_table(small_corpus.root / "manifest.parquet", columns=["key", "caption"]).to_pydict()
    caption_of = {k: " ".join(c.split()) for k, c in zip(manifest["key"], manifest["caption"])}
    log = load_latest_checkpoint(run_dir).state["policy"]["log"]
    entries = list(zip(log["concepts"], log["texts"], log["rewards"]))
    at = 0
    with sqlite3.connect(run_dir / "ledger.sqlite") as db:
        for row, pairs in zip(rows[1:], heard):
            assert len(pairs) <= 3 and len({c for c, _ in pairs}) == len(pairs)
            values = [v for _, v in pairs]
            assert all(v > 0 for v in values) and values == sorted(values, reverse=True)
            decoded = {caption_of[urlsplit(u).path[len("/image/"):]] for (u,) in db.execute(
                "SELECT url FROM fetches WHERE iteration = ? AND status = 'decoded'", (row["iteration"],))}
            assert {c for c, _ in pairs} <= decoded
            own = entries[at:at + len(row["queries"])]  # the policy's own queries first, then the captions
            assert [t for _, t, _ in own] == row["queries"] and all(c >= 0 for c, _, _ in own)
            at += len(row["queries"])
            assert [(t, pytest.approx(r)) for c, t, r in entries[at:at + len(pairs)] if c == -1] == [
                (c, pytest.approx(v)) for c, v in pairs]
            at += len(pairs)
    assert at == len(entries)


def test_class_name_queries_search_the_targets_class_names_first(tiny_experiment, engine, small_corpus, tmp_path):
    """With `policy.class_name_queries`, each round starts with the next `queries_per_iteration` of the
    target's class names, searched as free text (not vocabulary concepts); the policy hears their rewards
    as its own, and what they fetch is mostly the target's kind (well above the corpus's share of it)."""
    from explorer.web.sources import FASHION_CLASSES

    cfg = tiny_experiment(policy={"name": "random", "queries_per_iteration": 4, "class_name_queries": True})
    run_dir = tmp_path / "run"
    loop = ImageLoop(cfg, run_dir, engine_url=engine.url, progress=False)
    rows = loop.run(log=lambda line: None)
    loop.close()
    assert [row["queries"] for row in rows[1:]] == [list(FASHION_CLASSES[:4]), list(FASHION_CLASSES[4:8])]
    log = load_latest_checkpoint(run_dir).state["policy"]["log"]
    assert log["texts"] == [q for row in rows[1:] for q in row["queries"]]
    assert log["concepts"] == [-1] * 8  # free text, not vocabulary concepts
    assert log["rewards"] == pytest.approx([r for row in rows[1:] for r in row["query_rewards"]], abs=1e-6)
    sources = pq.read_table(small_corpus.root / "manifest.parquet", columns=["source"])["source"].to_pylist()
    share = sources.count("fashion-mnist") / len(sources)
    assert all(row["precision_fetched"] > max(0.8, 2 * share) for row in rows[1:])


def _results_by_round(run_dir) -> dict[int, set[str]]:
    with sqlite3.connect(run_dir / "ledger.sqlite") as db:
        rows = db.execute("SELECT iteration, url FROM results").fetchall()
    by_round: dict[int, set[str]] = {}
    for iteration, url in rows:
        by_round.setdefault(iteration, set()).add(url)
    return by_round


def test_skip_seen_searches_past_what_earlier_rounds_returned(tiny_experiment, engine, tmp_path):
    """`search.skip_seen`: the class names' rounds overlap (shirt and T-shirt, sandal and ankle boot), so
    without it later rounds bring images earlier ones had; with it no round repeats an earlier round's
    result, its queries go down the engine's list instead (a query's first result is then below the
    top), a resumed run remembers what was returned before the kill (from the ledger), and the replay
    asks the same pages."""
    policy = {"name": "random", "queries_per_iteration": 4, "class_name_queries": True}
    rounds = {}
    for skip in (False, True):
        cfg = tiny_experiment(iterations=3, policy=policy, search={"results_per_query": 15, "skip_seen": skip})
        run_dir = tmp_path / str(skip)
        loop = ImageLoop(cfg, run_dir, engine_url=engine.url, progress=False)
        loop.run(until=2 if skip else None, log=lambda line: None)
        loop.close()
        if skip:
            loop = ImageLoop(cfg, run_dir, engine_url=engine.url, progress=False, resume=True)
            assert loop.seen_urls == set().union(*_results_by_round(run_dir).values())
            loop.run(log=lambda line: None)
            loop.close()
        rounds[skip] = _results_by_round(run_dir)
    assert sorted(rounds[True]) == sorted(rounds[False]) == [1, 2, 3]
    assert rounds[False][3] & (rounds[False][1] | rounds[False][2])  # the top results repeat
    assert rounds[False][2] & rounds[False][1]
    assert not rounds[True][3] & (rounds[True][1] | rounds[True][2])
    assert not rounds[True][2] & rounds[True][1]
    assert rounds[True][1] == rounds[False][1]  # nothing to skip in the first round
    with sqlite3.connect(tmp_path / "True" / "ledger.sqlite") as db:
        firsts = db.execute("SELECT MIN(rank) FROM results WHERE iteration > 1 GROUP BY iteration, query").fetchall()
    assert max(first for (first,) in firsts) > 0
    assert replay_run(tmp_path / "True", progress=False, log=lambda line: None) == []  # the same searches, cached


def test_class_name_queries_need_a_vocabulary_policy_and_class_names():
    from types import SimpleNamespace

    from explorer.run.loop import RunLoop, class_name_texts

    assert class_name_texts(["017.Cardinal", "ankle_boot", "0", "3.5 inch", "ankle boot", " "]) == [
        "Cardinal", "ankle boot", "0", "3.5 inch"]
    from explorer.run.config import from_dict

    cfg = from_dict(ExperimentConfig, {"policy": {"name": "ppo", "class_name_queries": True}})
    with pytest.raises(ValueError, match="class_name_queries needs a vocabulary policy"):
        RunLoop.use_class_names(SimpleNamespace(cfg=cfg, policy=object()), ["sandal"])
    from policies.random_policy import RandomPolicy

    loop = SimpleNamespace(cfg=cfg, policy=RandomPolicy(["a", "b"]))
    with pytest.warns(UserWarning, match="no class names"):
        RunLoop.use_class_names(loop, [])
