"""What one iteration of `ImageLoop.step()` credits and keeps, recomputed from the run folder:
each query's reward from the images *it* returned (ledger results and fetches, the run's cache),
and the learner's pool and training batches from the accepted log."""

import contextlib
import hashlib
import json
import sqlite3

import numpy as np
import pytest
import torch

from explorer.acquire.validate import to_pipeline_tensor, validate_image
from explorer.run.checkpoints import load_latest_checkpoint
from explorer.run.experiment import read_metrics
from explorer.run.image import ACQUIRED, ImageLoop, build_learner
from explorer.run.ledger import LEDGER
from explorer.score.reward import RewardSpace
from learners.mixture import acquired_count
from learners.shards import ShardStore


def cached_image(run_dir, sha256: str, fetch) -> torch.Tensor:
    """The pipeline image of a body in the run's content-addressed cache, checked against its sha256."""
    body = (run_dir / "cache" / "blobs" / sha256[:2] / sha256).read_bytes()
    assert hashlib.sha256(body).hexdigest() == sha256
    checked = validate_image(body, None, min_side=fetch.min_side, max_side=fetch.max_side,
                             max_pixels=fetch.max_pixels, max_bytes=fetch.max_bytes)
    assert checked.ok, checked
    return to_pipeline_tensor(checked.image, fetch.image_size)


def accepted_log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "accepted.jsonl").read_text().splitlines()]


def ledger_rows(run_dir, iteration: int):
    with contextlib.closing(sqlite3.connect(run_dir / LEDGER)) as db:
        queries = db.execute("SELECT text, reward, n_results FROM queries WHERE iteration = ? ORDER BY position",
                             (iteration,)).fetchall()
        results = db.execute("SELECT query, rank, url FROM results WHERE iteration = ? ORDER BY query, rank",
                             (iteration,)).fetchall()
        fetches = {url: (status, sha) for url, status, sha in
                   db.execute("SELECT url, status, sha256 FROM fetches WHERE iteration = ?", (iteration,))}
    return queries, results, fetches


def test_query_rewards_credit_each_query_with_the_images_it_returned(tiny_experiment, engine, tmp_path,
                                                                     monkeypatch):
    """Per iteration: the images' rewards are recomputed from the cached bodies with the encoder,
    target and background embeddings of before the step; each query's logged reward must be the sum of the calibrated
    rewards of the URLs the ledger says *it* returned and that decoded, per result asked for; and each
    accepted record carries its image's reward and exactly the queries that found it."""
    cfg = tiny_experiment(reward={"min_spread": 0.0})  # the learner's own reward throughout, as recomputed below
    image_rewards = []  # what the loop computed, in its candidate order
    original = RewardSpace.rewards

    def spy(self, emb, *args, **kwargs):
        rewards = original(self, emb, *args, **kwargs)
        image_rewards.append(rewards.copy())
        return rewards
    monkeypatch.setattr(RewardSpace, "rewards", spy)
    loop = ImageLoop(cfg, tmp_path, engine_url=engine.url, progress=False)
    scorer = build_learner(cfg, loop.target)  # embeds with the weights of before each step
    k, requested = cfg.reward.k, cfg.search.results_per_query
    distinct_rewards = set()
    try:
        for it in range(1, cfg.iterations + 1):  # (iteration 0 only evaluates: it changes nothing here)
            weights = {name: v.clone() for name, v in loop.learner.model.state_dict().items()}
            space = loop.space  # centred on the web sample's mean: targets, background, and candidates below
            targets, calibration, centre = space.index.embeddings.copy(), space.calibration, space.centre
            web = space.background.embeddings.copy()  # the background sample under the same encoder
            image_rewards.clear()
            loop.run(until=it, log=lambda s: None)

            row = read_metrics(tmp_path / "metrics.jsonl")[it]
            queries, results, fetches = ledger_rows(tmp_path, it)
            assert [q[0] for q in queries] == row["queries"] and len(queries) == cfg.policy.queries_per_iteration
            assert [q[1] for q in queries] == row["query_rewards"]
            assert [q[2] for q in queries] == row["results"] == [sum(r[0] == qi for r in results)
                                                                 for qi in range(len(queries))]
            returned = list(dict.fromkeys(url for _, _, url in results))  # first-seen order = fetch order
            assert sorted(fetches) == sorted(returned)
            decoded = [url for url in returned if fetches[url][0] == "decoded"]
            assert len(decoded) == row["decoded"] > 0
            (rewards,) = image_rewards
            assert len(rewards) == len(decoded)

            # the loop's rewards belong to these URLs, in this order: recompute them independently
            images = torch.stack([cached_image(tmp_path, fetches[url][1], cfg.fetch) for url in decoded])
            scorer.model.load_state_dict(weights)
            emb = scorer.embed(images) - centre
            emb /= np.linalg.norm(emb, axis=1, keepdims=True)
            sims, web_sims = emb @ targets.T, emb @ web.T  # unit rows: cosines
            mine = (np.sort(sims, axis=1)[:, -k:].mean(axis=1)
                    - cfg.reward.background_weight * np.sort(web_sims, axis=1)[:, -k:].mean(axis=1))
            np.testing.assert_allclose(mine, rewards, atol=1e-4)

            reward_of = dict(zip(decoded, rewards.tolist()))
            share = {url: float((calibration.reference <= r + calibration.offset).mean()) for url, r in reward_of.items()}
            expected = [sum(share.get(url, 0.0) for q, _, url in results if q == qi) / requested
                        for qi in range(len(queries))]
            assert row["query_rewards"] == pytest.approx(expected, abs=2e-6)
            distinct_rewards.update(round(x, 4) for x in expected)

            found_by = {url: [row["queries"][q] for q, _, u in results if u == url] for url in decoded}
            records = [a for a in accepted_log(tmp_path) if a["iteration"] == it]
            assert [a["url"] for a in records] == row["accepted_urls"]
            for a in records:
                assert a["reward"] == round(reward_of[a["url"]], 6)
                assert a["queries"] == found_by[a["url"]]
                assert a["sha256"] == fetches[a["url"]][1]
    finally:
        loop.close()
    assert len(distinct_rewards) > 1  # the queries earned different rewards: a swapped credit shows


def test_accepted_images_are_the_learners_pool_and_training_batches_draw_them(tiny_experiment, engine,
                                                                             tmp_path):
    """After each iteration the learner's pool of acquired images is exactly the accepted images (the
    bodies named by accepted.jsonl's sha256, decoded), the checkpoint holds the same pool, and every
    training batch of the iteration carries the mixture's share of them on top of target images."""
    cfg = tiny_experiment(target={"limit": 300, "acquire_size": 30})  # a small target: every accept is drawn
    loop = ImageLoop(cfg, tmp_path, engine_url=engine.url, progress=False)
    mixture = loop.learner.mixture
    drawn = []  # (iteration, uint8 batch) of every training step after pretraining
    read = mixture.read  # what a step reads of the batch it drew (all of it: one process)

    def spy(*args, **kwargs):
        batch = read(*args, **kwargs)
        drawn.append((loop.iteration, batch.clone()))
        return batch
    mixture.read = spy
    try:
        loop.run(log=lambda s: None)
    finally:
        loop.close()

    accepted = accepted_log(tmp_path)
    assert accepted
    images = torch.stack([cached_image(tmp_path, a["sha256"], cfg.fetch) for a in accepted])
    assert torch.equal(mixture.acquired, images)
    assert load_latest_checkpoint(tmp_path).state["learner"]["mixture"]["position"] == len(images)
    stored = ShardStore(tmp_path / ACQUIRED, cfg.fetch.image_size, readonly=True)  # where the position points
    assert torch.equal(stored.read(torch.arange(len(stored))), images)

    key = lambda image: image.numpy().tobytes()
    target = {key(x) for x in mixture.target}
    pool = [key(x) for x in images]
    assert not set(pool) & target
    target_batch, steps = cfg.learner.batch_size, cfg.train.steps_per_iteration
    assert [it for it, _ in drawn] == [it for it in range(1, cfg.iterations + 1) for _ in range(steps)]
    carried = 0
    for it, batch in drawn:
        n_pool = sum(a["iteration"] <= it for a in accepted)  # accepted up to this iteration's training
        so_far = set(pool[:n_pool])
        assert len(so_far) == n_pool
        share = acquired_count(target_batch, len(mixture.target), n_pool, cfg.mixture.acquired_cap)
        rows = [key(x) for x in batch]
        from_pool = [r for r in rows if r in so_far]
        assert len(from_pool) == share and len(set(from_pool)) == share  # its share, no image twice
        assert all(r in target for r in rows if r not in so_far)
        assert len(rows) == min(target_batch, len(mixture.target)) + share
        carried += share
    assert carried > 0  # training batches did draw accepted images
