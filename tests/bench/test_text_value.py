"""bench/exp_text_value.py's accepted source: web documents the run's own reward accepts (the planner
benchmark's second calibration trains on them)."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import exp_text_value as value  # noqa: E402
from explorer.run.experiment import local_engine_for  # noqa: E402
from explorer.run.text import TextLoop  # noqa: E402
from tests.explorer.run.test_text_loop import text_corpus, tiny_text  # noqa: E402, F401


def test_accepted_documents_are_those_the_runs_reward_accepts(text_corpus, tmp_path):  # noqa: F811
    cfg = tiny_text(text_corpus, text={"strategy": "train", "reward_encoder": "minilm"},
                    reward={"background_queries": 4, "accept": "value", "accept_percentile": 10, "centre": False,
                            "web_percentile": None, "k": 3})  # plain cosines, as configs/text-base-planner.yaml
    with local_engine_for(cfg) as url:
        loop = TextLoop(cfg, tmp_path, engine_url=url, progress=False)
        texts, on_topic = value.web_documents(loop)
        mask = value.accepted_by_reward(loop, texts, chunk=7)  # chunks: the same answer as all at once
        rewards = loop.space.rewards(loop.encoder.encode(texts))
        threshold = loop.space.calibration.threshold(cfg.reward.accept_percentile)
        assert np.array_equal(mask, rewards >= threshold) and 0 < mask.sum() < len(texts)
        assert on_topic[mask].mean() > on_topic.mean()  # the reward's choice is of the target's kind
        drawn, _ = value.draw_documents(loop, "accepted", 300, seed=0)
        accepted = {tuple(ids) for ids, ok in zip(loop.tokenizer.encode_batch(texts), mask) if ok}
        assert sum(map(len, drawn)) >= 300 and all(tuple(ids) in accepted for ids in drawn)
        loop.close()
