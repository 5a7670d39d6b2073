"""The text acquisition loop end to end on a small slice of the Wikipedia-leads web, with a nano LM."""

import copy
import json
import math

import numpy as np
import pytest

from explorer.run.checkpoints import has_checkpoint, load_latest_checkpoint
from explorer.run.config import PRIOR_LAW, ExperimentConfig, from_dict, load_config
from explorer.run.experiment import local_engine_for, replay_run, run_experiment
from explorer.run.text import TextLoop
from explorer.score.reward import centred, unit_rows
from explorer.web.text_corpus import (
    TextCorpus,
    TextCorpusSpec,
    build_text_corpus,
    document_text,
    text_sha256,
)
from learners.lm import lm_embeddings

TOPIC = "Biology and health sciences"
# A law whose data term is negligible: the planner would grow the model rather than acquire.
PARAMETER_LIMITED = {"E": 1.0, "A": 1.0e3, "B": 1.0e-6, "alpha": 0.3, "beta": 0.3}
SPEC = TextCorpusSpec(topics=(TOPIC, "Geography", "Mathematics", "Arts", "Technology"), limit_per_topic=24)


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "text-corpus"
    return TextCorpus(root) if (root / "corpus.json").exists() else build_text_corpus(root, SPEC, progress=False)


def tiny_text(corpus, **changes) -> ExperimentConfig:
    text = {"tokenizer_vocab": 512, "lm_size": "nano", "max_lm_size": "nano", "seq_len": 32, "batch_size": 2,
            "warmup_steps": 1, "pretrain_tokens": 128, "tokens_per_iteration": 128, "eval_documents": 4,
            "flop_budget": 1.0e15, "strategy": "acquire", **changes.pop("text", {})}
    return from_dict(ExperimentConfig, {
        "name": "text-tiny", "modality": "text", "iterations": 2, "seed": 0, "corpus": str(corpus.root),
        "vocabulary": {"n_random": 20}, "search": {"results_per_query": 6}, "reward": {"background_queries": 4},
        "policy": {"name": "gp", "queries_per_iteration": 3,
                   "options": {"explore_first": 3, "observe_background": True}},
        "text": text, **changes})


@pytest.fixture(scope="module")
def recorded_run(text_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("text-run")
    run_experiment(tiny_text(text_corpus), run_dir, progress=False, log=lambda _: None)
    return run_dir


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_iterations_write_flops_decisions_and_finite_perplexity(recorded_run):
    rows = _metrics(recorded_run / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert math.isfinite(r["eval_perplexity"]) and r["eval_perplexity"] > 1
        assert r["flops"]["train"] > 0 and r["flops_total"] == pytest.approx(sum(r["flops"].values()))
    assert rows[2]["flops_total"] > rows[1]["flops_total"] > rows[0]["flops_total"]
    for r in rows[1:]:
        assert r["planner_action"] == "acquire"
        assert r["flops"]["query"] > 0 and r["flops"]["fetch"] > 0 and r["flops"]["score"] > 0
        assert len(r["queries"]) == 3 and r["fetched"] > 0
    accepted = [json.loads(line) for line in (recorded_run / "accepted.jsonl").read_text().splitlines()]
    assert len(accepted) == sum(r["accepted"] for r in rows[1:]) > 0
    assert rows[2]["tokens_available"] > rows[0]["tokens_available"]  # accepted text joined the stream
    assert (recorded_run / "tokenizer.model").exists() and has_checkpoint(recorded_run)
    # the count floor of the target's own tokens, on the same held-out documents (learners/ngram.py)
    assert 0 < rows[0]["count_bigram_loss"] < rows[0]["count_unigram_loss"] < math.log(512)
    # the GP heard the background queries before its first batch (as the image loop's does)
    background = json.loads((recorded_run / "background.json").read_text())
    heard = [q for q, r in zip(background["queries"], background["query_rewards"]) if r is not None]
    log = load_latest_checkpoint(recorded_run).state["policy"]["log"]
    assert heard and log["texts"] == heard + rows[1]["queries"] + rows[2]["queries"]


def test_replay_from_the_cache_makes_the_same_decisions(recorded_run):
    assert replay_run(recorded_run, progress=False, log=lambda _: None) == []
    assert len(_metrics(recorded_run / "replay-metrics.jsonl")) == 3


def test_resume_after_a_stop_continues(text_corpus, tmp_path):
    cfg = tiny_text(text_corpus, iterations=2)
    with local_engine_for(cfg) as url:
        first = TextLoop(cfg, tmp_path, engine_url=url, progress=False)
        first.run(until=1, log=lambda _: None)  # as if stopped after iteration 1
        step, spent = first.learner.step, first.flops.total
        first.close()
        resumed = TextLoop(cfg, tmp_path, engine_url=url, progress=False, resume=True)
        assert resumed.iteration == 1 and resumed.learner.step == step and resumed.flops.total == spent
        assert resumed.stream.num_tokens == first.stream.num_tokens
        resumed.run(log=lambda _: None)
        resumed.close()
    rows = _metrics(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [0, 1, 2] and rows[2]["learner_step"] > step
    assert rows[2]["flops_total"] > spent


def test_planner_grows_the_model_when_parameter_limited(text_corpus, tmp_path):
    # any dataset is enough under this law: the planner asks for a bigger model
    cfg = tiny_text(text_corpus, iterations=1, text={"law": PARAMETER_LIMITED, "max_lm_size": "micro",
                                                     "flop_budget": 1.0e16, "strategy": "compute_optimal"})
    rows = run_experiment(cfg, tmp_path, progress=False, log=lambda _: None)
    assert rows[1]["planner_action"] == "grow_model" and rows[1]["grew_to"] == "micro"
    assert rows[1]["n_params"] > rows[0]["n_params"] and "queries" not in rows[1]


def test_planner_restarts_with_more_experts_when_the_routed_law_pays(text_corpus, tmp_path):
    # 4 experts -> 16 lowers the loss by 16^-0.2 / 4^-0.2 under this law; data is worth nothing
    lm = {"router": "sbase", "num_experts": 4, "routed_law": {"a": -0.1, "b": -0.2, "c": 0.0, "d": 1.0},
          "expert_options": [16]}
    cfg = tiny_text(text_corpus, iterations=2, lm=lm, text={"law": PARAMETER_LIMITED, "strategy": "planner"})
    rows = run_experiment(cfg, tmp_path, progress=False, log=lambda _: None)
    assert [r["experts"] for r in rows] == [4, 16, 16]
    assert rows[1]["planner_action"] == "add_experts" and rows[1]["experts_to"] == 16
    assert "restart with 16 experts" in rows[1]["planner"]["reason"]
    assert rows[2]["planner_action"] != "add_experts"  # 16 is the largest option
    assert rows[1]["n_params_total"] > 3 * rows[0]["n_params_total"]  # experts grew 4x ...
    assert rows[1]["n_params"] == rows[0]["n_params"] + 12 * 128 * 5  # ... active: 12 more router rows per layer
    with local_engine_for(cfg) as url:  # the checkpoint holds the 16-expert model
        resumed = TextLoop(cfg, tmp_path, engine_url=url, progress=False, resume=True)
        assert resumed.experts == 16 and resumed.learner.config.num_experts == 16
        resumed.close()


def test_text_config_dispatch_and_strict_keys(text_corpus, tmp_path):
    from explorer.run.config import ConfigError

    path = tmp_path / "t.yaml"
    path.write_text("modality: text\ntext:\n  lm_size: nano\n  flop_budget: 1.0e+13\n")
    assert load_config(path).modality == "text"
    path.write_text("modality: text\ntext:\n  lm_sise: nano\n")
    with pytest.raises(ConfigError, match="text.lm_sise"):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown LM size"):
        from_dict(ExperimentConfig, {"modality": "text", "text": {"lm_size": "huge"}})


def top_k_cosine(candidates: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """Brute-force knn reward: mean cosine of each candidate to its k most similar targets."""
    a = candidates / np.linalg.norm(candidates, axis=1, keepdims=True)
    b = targets / np.linalg.norm(targets, axis=1, keepdims=True)
    sims = np.sort(a.astype(np.float64) @ b.astype(np.float64).T, axis=1)[:, ::-1]
    return sims[:, :min(k, len(b))].mean(axis=1)


def test_lm_hidden_states_as_the_reward_encoder(text_corpus, tmp_path):
    cfg = tiny_text(text_corpus, iterations=1, text={"reward_encoder": "lm"})
    quiet = lambda _: None  # noqa: E731
    with local_engine_for(cfg) as url:
        loop = TextLoop(cfg, tmp_path, engine_url=url, progress=False)
        loop.run(until=0, log=quiet)  # pretraining only
        lm = copy.deepcopy(loop.learner.model)  # the LM that scores iteration 1's documents
        tok, seq_len, k = loop.tokenizer, cfg.text.seq_len, cfg.reward.k
        target_texts = [document_text(d) for d in loop.target.train]
        target_lm = lm_embeddings(lm, tok.encode_batch(target_texts), seq_len)
        target_minilm = loop.encoder.encode(target_texts)
        loop.ensure_background()  # what the first round would fetch first
        background_lm = lm_embeddings(lm, tok.encode_batch(loop.background_sample.items), seq_len)
        rows = loop.run(log=quiet)
    assert [r["iteration"] for r in rows] == [1] and rows[0]["planner_action"] == "acquire"
    assert rows[0]["mean_doc_reward"] is not None and -1 <= rows[0]["mean_doc_reward"] <= 1
    minilm_only = 2 * 1.06e7 * 128  # the MiniLM signature pass per document; the LM forward adds to it
    assert rows[0]["flops"]["score"] > minilm_only * rows[0]["valid"]
    # every accepted document's logged reward is the kNN reward of the LM's embedding of its text,
    # contrasted with the LM's embedding of the background documents, all centred on the mean of the
    # web's first sample (here the background itself)
    assert rows[0]["reward_encoder"] == "learner"
    text_of = {text_sha256(document_text(d)): document_text(d) for d in text_corpus.documents()}
    accepted = [json.loads(line) for line in (tmp_path / "accepted.jsonl").read_text().splitlines()]
    assert accepted and len(accepted) == rows[0]["accepted"]
    texts = [text_of[a["sha256"]] for a in accepted]
    logged = np.array([a["reward"] for a in accepted])
    doc_lm = lm_embeddings(lm, [t[:seq_len] for t in tok.encode_batch(texts)], seq_len)
    centre = unit_rows(background_lm).mean(axis=0)
    doc_lm, target_lm, background_lm = (centred(e, centre) for e in (doc_lm, target_lm, background_lm))
    w = cfg.reward.background_weight
    assert len(loop.background_sample) > 0 and w > 0
    expected = top_k_cosine(doc_lm, target_lm, k) - w * top_k_cosine(doc_lm, background_lm, k)
    assert logged == pytest.approx(expected, abs=2e-5)
    minilm = top_k_cosine(loop.encoder.encode(texts), target_minilm, k)
    assert np.abs(logged - minilm).max() > 0.05  # and not MiniLM's reward


@pytest.mark.parametrize("policy", ["random", "oracle"])
def test_same_policies_drive_the_text_loop(text_corpus, tmp_path, policy):
    cfg = tiny_text(text_corpus, iterations=1, policy={"name": policy, "queries_per_iteration": 3})
    rows = run_experiment(cfg, tmp_path, progress=False, log=lambda _: None)
    assert len(rows[1]["queries"]) == 3 and rows[1]["fetched"] > 0
    if policy == "oracle":  # knows which concepts find the topic: most of what it fetches is on topic
        assert rows[1]["precision_fetched"] > 0.5


def test_run_stops_when_the_flop_budget_is_spent(text_corpus, tmp_path):
    from learners.flops import training_flops

    messages = []
    cfg = tiny_text(text_corpus, iterations=3, text={"flop_budget": 3.0e10, "strategy": "acquire"})
    rows = run_experiment(cfg, tmp_path, progress=False, log=messages.append)
    step = training_flops(rows[0]["n_params"], cfg.text.tokens_per_step)
    assert [r["iteration"] for r in rows] == [0, 1] and rows[1]["flops_remaining"] < step
    assert "budget" in messages[-1] and "spent" in messages[-1]
    # the last iteration trains only the steps the budget still pays for (a round's cost is known only
    # after it, so acquisition may overshoot; training never does); evaluation is not charged
    per_iteration = math.ceil(cfg.text.tokens_per_iteration / cfg.text.tokens_per_step)
    assert rows[1]["learner_step"] - rows[0]["learner_step"] < per_iteration
    charged = {k: v for k, v in rows[1]["flops"].items() if k != "eval"}
    trained = charged["train"] - rows[0]["flops"]["train"]
    before = sum(charged.values()) - trained  # charged when iteration 1 started training
    steps = rows[1]["learner_step"] - rows[0]["learner_step"]
    assert trained == pytest.approx(steps * step) and rows[1]["flops"]["eval"] > 0
    assert steps == min(per_iteration, max(0, int((cfg.text.flop_budget - before) // step)))


@pytest.mark.parametrize("strategy", ["train", "acquire", "grow"])
def test_fixed_strategies_override_the_planner(text_corpus, tmp_path, strategy):
    """The fixed strategies the planner is tested against: target only never queries, always-acquire
    queries even where the planner would grow, grow-only grows and never queries."""
    law = PARAMETER_LIMITED if strategy == "acquire" else dict(PRIOR_LAW)
    cfg = tiny_text(text_corpus, iterations=2, text={"strategy": strategy, "law": law, "max_lm_size": "micro",
                                                     "flop_budget": 1.0e16})
    rows = run_experiment(cfg, tmp_path, progress=False, log=lambda _: None)
    actions = [r["planner_action"] for r in rows[1:]]
    if strategy == "train":
        assert actions == ["train", "train"] and not any("queries" in r for r in rows)
        assert rows[2]["tokens_available"] == rows[0]["tokens_available"]
        assert not (tmp_path / "accepted.jsonl").exists()
    elif strategy == "acquire":
        assert actions == ["acquire", "acquire"] and all(len(r["queries"]) == 3 for r in rows[1:])
    else:  # grow to the largest size allowed at once, then train it
        assert actions == ["grow_model", "train"] and rows[1]["grew_to"] == "micro"
        assert not any("queries" in r for r in rows) and rows[2]["lm_size"] == "micro"
    assert all(r["planner"]["reason"].startswith("fixed strategy") for r in rows[1:])
    # a strategy that never queries fetches no background sample either and pays for no search
    assert (rows[-1]["flops"]["query"] == 0) == (strategy != "acquire")


def test_the_planner_acquires_only_when_the_run_can_use_the_tokens(text_corpus, tmp_path):
    """The planner's first decision uses an optimistic bound on a round (every result accepted), later
    ones what the run's rounds cost and gave. Training 128 tokens per iteration never even covers the
    target once, so new documents cannot lower the loss: it trains. With 32x the training the same
    bound says a round pays, and the second decision is made on the first round's measurement."""
    short = tiny_text(text_corpus, iterations=2, text={"strategy": "planner"})
    rows = run_experiment(short, tmp_path / "short", progress=False, log=lambda _: None)
    assert [r["planner_action"] for r in rows[1:]] == ["train", "train"]
    assert "no round measured yet" in rows[1]["planner"]["reason"] and "does not pay" in rows[1]["planner"]["reason"]
    long = tiny_text(text_corpus, iterations=2, text={"strategy": "planner", "pretrain_tokens": 4096,
                                                      "tokens_per_iteration": 4096})
    rows = run_experiment(long, tmp_path / "long", progress=False, log=lambda _: None)
    assert rows[1]["planner_action"] == "acquire" and "no round measured yet" in rows[1]["planner"]["reason"]
    assert "no round measured" not in rows[2]["planner"]["reason"] and "a round costs" in rows[2]["planner"]["reason"]


def test_unknown_strategy_is_a_config_error():
    from explorer.run.config import ConfigError

    with pytest.raises(ConfigError, match="strategy"):
        from_dict(ExperimentConfig, {"modality": "text", "text": {"strategy": "hoard"}})


def test_the_loop_runs_on_documents_served_as_html(text_corpus, tmp_path):
    """The engine serves web pages (navigation, header, footer around the text); the fetcher keeps
    their main text, which hashes as the document it came from, so copies of target and held-out
    documents are still recognised."""
    import httpx

    cfg = tiny_text(text_corpus, iterations=1, search={"results_per_query": 6, "serve_html": True})
    with local_engine_for(cfg) as url:
        page = httpx.get(f"{url}/doc/{text_corpus.keys[0]}")
        assert page.headers["content-type"].startswith("text/html") and b"<nav>" in page.content
        loop = TextLoop(cfg, tmp_path, engine_url=url, progress=False)
        rows = loop.run(log=lambda _: None)
    assert rows[1]["valid"] > 0 and "bad_content_type" not in rows[1]["rejected"]
    known = {text_sha256(document_text(d)) for d in text_corpus.documents()}
    accepted = [json.loads(line) for line in (tmp_path / "accepted.jsonl").read_text().splitlines()]
    assert accepted and all(a["sha256"] in known for a in accepted)
    assert not any(a["sha256"] in loop.holdout_sha | loop.target_sha for a in accepted)


def test_a_round_whose_searches_all_failed_is_no_evidence_for_the_planner(text_corpus, tmp_path):
    cfg = tiny_text(text_corpus, search={"results_per_query": 6, "options": {"retries": 0}})
    loop = TextLoop(cfg, tmp_path, engine_url="http://127.0.0.1:9", progress=False)  # nothing listens there
    with pytest.warns(UserWarning, match="background queries fetched nothing"):  # fetched before round 1
        rows = loop.run(log=lambda _: None)
    assert [r["planner_action"] for r in rows[1:]] == ["acquire"] * 2
    assert all(r["all_searches_failed"] and "unreachable" in r["search_errors"][0] for r in rows[1:])
    assert loop.rounds == [] and not loop.expected_round().measured  # still the prior's bound, not "adds nothing"
    loop.close()


def test_each_iteration_gets_a_page_of_its_documents_that_rebuilds_the_same(recorded_run):
    import html

    from explorer.run.sheets import rebuild_sheets

    pages = sorted((recorded_run / "sheets").glob("iter-*.html"))
    assert [p.name for p in pages] == ["iter-000001.html", "iter-000002.html"]
    rows = _metrics(recorded_run / "metrics.jsonl")
    accepted = _metrics(recorded_run / "accepted.jsonl")
    for page, row in zip(pages, rows[1:]):
        text = page.read_text()
        titles = [a["title"] for a in accepted if a["iteration"] == row["iteration"]]
        assert text.count("<li>") == len(titles) + len(row["rejected_best"])
        assert all(f"<b>{html.escape(t)}</b>" in text for t in titles)
        assert all(f"{html.escape(repr(q))} query reward" in text for q in {a["queries"][0] for a in accepted
                                                                             if a["iteration"] == row["iteration"]})
        assert "<pre>" in text and "evicted" not in text  # the first lines, read back from cache/
    live = {p.name: p.read_text() for p in pages}
    for p in pages:
        p.unlink()
    assert {p.name: p.read_text() for p in rebuild_sheets(recorded_run)} == live


def test_a_peer_scores_the_documents_in_the_rewards_place(text_corpus, tmp_path):
    """`text.scorer`: DSIR or the n-gram classifier, fitted on the target and the background sample,
    scores the same fetched documents in the reward's place: the first round (random queries, the
    same for all three) gets other query rewards, the log names the peer, its calibration is the
    peer's own out-of-fold scores of the target, and the replay makes the same decisions."""
    from explorer.score.selectors import ngram_counts, peer_space
    from explorer.web.text_corpus import document_text

    rows, spreads = {}, {}
    for scorer in ("knn", "dsir", "classifier"):
        cfg = tiny_text(text_corpus, text={"scorer": scorer}, policy={"name": "random", "queries_per_iteration": 4})
        with local_engine_for(cfg) as url:
            loop = TextLoop(cfg, tmp_path / scorer, engine_url=url, progress=False)
            rows[scorer] = loop.run(log=lambda _: None)
            if scorer != "knn":
                bg = loop.background_sample.items
                space = peer_space(scorer, ngram_counts([document_text(d) for d in loop.target.train]),
                                   ngram_counts(bg), cfg.seed)
                spreads[scorer] = space.calibration.spread()
            loop.close()
    first = {scorer: r[1] for scorer, r in rows.items()}
    assert first["knn"]["queries"] == first["dsir"]["queries"] == first["classifier"]["queries"]
    for peer in ("dsir", "classifier"):
        assert first[peer]["query_rewards"] != first["knn"]["query_rewards"]
        assert [r["reward_encoder"] for r in rows[peer][1:]] == [peer, peer]
        assert rows[peer][-1]["reward_spread"] == pytest.approx(spreads[peer], abs=1e-6)
        assert all(r["above_threshold"] >= r["accepted"] for r in rows[peer][1:])
    assert first["dsir"]["query_rewards"] != first["classifier"]["query_rewards"]
    assert replay_run(tmp_path / "dsir", progress=False, log=lambda _: None) == []


def test_a_run_with_a_base_starts_from_its_weights_and_tokenizer(text_corpus, tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("EXPLORER_HOME", str(tmp_path / "home"))  # the base is built here, not in ~/.cache
    cfg = tiny_text(text_corpus, iterations=1, text={"base": "wordnet", "base_steps": 2, "strategy": "train",
                                                     "max_lm_size": "micro"})
    loop = TextLoop(cfg, tmp_path / "run", engine_url="http://127.0.0.1:9", progress=False)
    base = loop.base("nano")
    assert base.record["tokens_trained"] == 2 * 2 * 32 and base.tokenizer.vocab_size == 512
    assert (tmp_path / "run" / "tokenizer.model").read_bytes() == base.tokenizer.to_bytes()  # the base's
    weights = base.weights()
    assert all(torch.equal(v, weights[k]) for k, v in loop.learner.model.state_dict().items())
    rows = loop.run(log=lambda _: None)
    assert rows[0]["base"] == base.record["key"] and rows[0]["base_flops"] == base.record["flops"]
    # the count floor of what the LM saw before the web: the base's corpus and the target
    assert 0 < rows[0]["count_bigram_base_loss"] < rows[0]["count_unigram_loss"]
    # a grown LM starts from the base of its own size (the same tokenizer)
    loop._learner("micro", 3)
    micro = loop.base("micro")
    assert micro.tokenizer.to_bytes() == base.tokenizer.to_bytes()
    assert all(torch.equal(v, micro.weights()[k]) for k, v in loop.learner.model.state_dict().items())
    loop.close()
    with pytest.raises(ValueError, match="text.base"):
        from_dict(ExperimentConfig, {"modality": "text", "text": {"base": "shakespeare"}})


def test_a_validation_split_keeps_the_weights_of_its_lowest_loss_and_stops_when_it_stalls(text_corpus, tmp_path):
    """The agent holds out part of its target: never trained on, never acquired. Each evaluation scores
    it; the weights of the lowest validation loss are kept (checkpoint, lm-best.pt) and reported with
    their held-out perplexity; with patience 1 a train-only run stops at the first evaluation that
    does not improve (at lr 1e-2 this tiny target overfits by its third iteration)."""
    import torch

    cfg = tiny_text(text_corpus, iterations=8, text={"strategy": "train", "validation_fraction": 0.3, "patience": 1,
                                                     "lr": 1e-2})
    with local_engine_for(cfg) as url:
        loop = TextLoop(cfg, tmp_path, engine_url=url, progress=False)
        held = {text_sha256(document_text(d)) for d in loop.validation}
        assert held and not held & {text_sha256(document_text(d)) for d in loop.target.train}
        assert held <= loop.holdout_sha  # a fetched copy would be dropped like a held-out one
        assert len(loop.stream_documents(len(loop.target.train))) == len(loop.target.train)
        rows = loop.run(log=lambda _: None)
        loop.close()
    assert len(rows) < 9 and rows[-1]["val_stalled"] == 1  # stopped by patience, before the iterations ran out
    best = min(rows, key=lambda r: r["val_loss"])
    assert rows[-1]["best_iteration"] == best["iteration"] < rows[-1]["iteration"]
    assert rows[-1]["best_eval_perplexity"] == best["eval_perplexity"] != rows[-1]["eval_perplexity"]
    assert load_latest_checkpoint(tmp_path).state["best"]["iteration"] == best["iteration"]
    kept = torch.load(tmp_path / "lm-best.pt", weights_only=True)
    with local_engine_for(cfg) as url:  # the kept weights score what was logged for them
        resumed = TextLoop(cfg, tmp_path, engine_url=url, progress=False, resume=True)
        assert resumed.best["iteration"] == best["iteration"] and resumed.finished_early().startswith("stopped")
        resumed.learner.model.load_state_dict(kept["model"])
        assert resumed.evaluate()["val_loss"] == pytest.approx(best["val_loss"], abs=1e-5)
        resumed.close()


def test_a_planner_that_runs_its_rounds_first_trains_once_they_are_done(text_corpus, tmp_path):
    """text.rounds_first: while more rounds are planned an iteration acquires and trains nothing; the
    last planned round trains. Past its overfitting point (max_passes 2, moving a little with the
    unique tokens: 2.04 at 3x the 4096 tokens it was measured on) the planner keeps acquiring."""
    cfg = tiny_text(text_corpus, iterations=4, text={"strategy": "planner", "pretrain_tokens": 4096,
                                                     "tokens_per_iteration": 4096, "max_passes": 2.0,
                                                     "max_passes_exponent": 0.02, "max_passes_at": 4096,
                                                     "rounds_first": True})
    rows = run_experiment(cfg, tmp_path, progress=False, log=lambda _: None)
    assert [r["planner_action"] for r in rows[1:]] == ["acquire"] * 4
    assert all("x(U/4.1e+03)^0.02 beyond" in r["planner"]["reason"] for r in rows[1:])
    deferred = [r for r in rows[1:] if r.get("deferred_training")]
    assert deferred and all(r["planner"]["rounds"] > 1 and r["train_loss"] is None for r in deferred)
    assert all(r["learner_step"] == rows[0]["learner_step"] for r in deferred)
    assert rows[-1]["planner"]["rounds"] == 1 and rows[-1]["learner_step"] > rows[0]["learner_step"]
    with pytest.raises(ValueError, match="rounds_first needs a reward that does not read the LM"):
        tiny_text(text_corpus, text={"rounds_first": True, "reward_encoder": "lm"})
    with pytest.raises(ValueError, match="max_passes_exponent needs max_passes and max_passes_at"):
        tiny_text(text_corpus, text={"max_passes": 2.0, "max_passes_exponent": 0.5})


def test_the_acquire_first_schedule_queries_until_its_share_is_spent_then_trains(text_corpus, tmp_path):
    """The fixed schedule the planner is compared with: rounds back to back (no training between them)
    while less than `acquire_share` of the budget is spent, then training only."""
    cfg = tiny_text(text_corpus, iterations=4, text={"strategy": "acquire_first", "acquire_share": 0.5,
                                                     "flop_budget": 1.6e11})
    rows = run_experiment(cfg, tmp_path, progress=False, log=lambda _: None)
    actions = [r["planner_action"] for r in rows[1:]]
    switch = actions.index("train")
    assert switch >= 1 and set(actions[:switch]) == {"acquire"} and set(actions[switch:]) == {"train"}
    assert all(r.get("deferred_training") and r["learner_step"] == rows[0]["learner_step"] for r in rows[1:switch + 1])
    spent = [cfg.text.flop_budget - r["flops_remaining"] for r in rows]
    assert spent[switch - 1] < 0.8e11 <= spent[switch]  # the round that crossed half the budget was the last
    assert rows[-1]["learner_step"] > rows[0]["learner_step"]
