"""`hybrid`: the GP bandit picks seed concepts, the query LM rewrites each into more specific
queries, the GP ranks seeds and rewrites, and PPO trains the LM on the rewrites it issued."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from policies.base import Query, register_policy
from policies.ppo_llm import LLMQueryPolicy
from policies.ppo_update import Rollout
from policies.random_policy import rank_untried_first


@register_policy("hybrid")
class HybridPolicy(LLMQueryPolicy):
    """The GP bandit picks seed concepts, the LM expands them, and the GP ranks the expansions.

    propose(n): (1) the GP bandit proposes n seed concepts with its own acquisition over the
    vocabulary (untried first); (2) for each seed the LM samples `candidates_per_query` expansions
    from the prompt "expand: <seed>" (warm-up teaches the form "<word> <seed>", e.g. "leather boot");
    (3) the seeds and the distinct valid expansions (the tiny LM's descriptor + the seed; a
    pretrained LM's cleaned-up line; an empty or rejected one scores the penalty) are embedded with the text encoder and scored by
    the GP posterior with the GP's acquisition (in random order until the GP has seen
    `explore_first` queries); the n best are issued. update: the GP hears every issued query; PPO
    trains on the LM samples that were issued (on their reward) and on the invalid ones (on the
    penalty); valid samples the GP did not issue have no reward and are dropped.
    GP options go in `gp` (a dict of policies.gp.GPConfig fields); the rest configure the LM.
    """

    defaults: dict = {}  # LLMPolicyConfig's own: ppo's reward and novelty options do not apply here

    def __init__(self, concepts: Sequence[str], seed: int = 0, embeddings: np.ndarray | None = None,
                 text_encoder: Callable[[list[str]], np.ndarray] | None = None, gp: dict | None = None,
                 **config):
        from policies.gp import GPPolicy

        self._text_encoder = text_encoder
        if config.get("found_in_prompt") or config.get("novelty_bonus"):
            raise ValueError("hybrid has no found_in_prompt or novelty_bonus: its prompt is one concept to "
                             "expand and the GP chooses among the expansions (use the ppo policy)")
        super().__init__(concepts, seed, **config)
        self.bandit = GPPolicy(concepts, seed, embeddings=embeddings, text_encoder=self._encode_texts,
                               **(gp or {}))

    def _encode_texts(self, texts: list[str]) -> np.ndarray:
        if self._text_encoder is None:
            from explorer.web.text_encoder import default_encoder
            self._text_encoder = default_encoder().encode
        return self._text_encoder(texts)

    def _warmup_pair(self) -> tuple[str, str]:
        seed, other = (self.concepts[i] for i in self.rng.integers(len(self.concepts), size=2))
        return self._expand_prompt(seed), other.split()[-1]

    def _expand_prompt(self, seed: str) -> str:
        if self.config.pretrained:
            description = self.config.target_description or "the target images"
            return (f"Web search queries that find {description}. Each concept is made a more specific "
                    f"query:\ntree -> oak tree in autumn\ncar -> red sports car\n{seed} ->")
        return self._prompt_text([f"expand: {seed}"])

    def _expansion(self, seed: str, sample: str | None) -> str | None:
        """The query a sample makes of `seed`: the tiny LM writes one descriptor ("leather" ->
        "leather boot"); a pretrained LM writes the whole query, which may reword the seed (a
        first try that demanded the seed's words rejected 60 of 64 samples: "acer rubrum" -> "red maple")."""
        if sample is None:
            return None
        return sample if self.config.pretrained else f"{sample} {seed}"

    def propose(self, n: int) -> list[Query]:
        self._check_batch(n)
        self.stats = {}
        seeds = self.bandit.propose(n)
        k = self.config.candidates_per_query
        prompts, responses, samples = self._sample([self._expand_prompt(s.text) for s in seeds], k)
        texts = [self._expansion(seeds[row // k].text, sample) for row, sample in enumerate(samples)]
        candidates = {s.text: s for s in seeds}
        candidates.update((t, self._query(t)) for t in texts if t is not None and t not in candidates)
        chosen = self._rank(list(candidates), n)
        queries = [candidates[t] for t in chosen]
        issued_before, position = set(self.log.texts), {t: i for i, t in enumerate(chosen)}
        rows, query_index = [], []
        for row, text in enumerate(texts):  # each issued text trains through its first sample only
            query_index.append(position.pop(text, -1) if text is not None else -1)
            if text is None or query_index[-1] >= 0:
                rows.append(row)
        rollout = Rollout(queries, prompts, [k] * len(prompts), responses, query_index, [t is None for t in texts],
                          [t in issued_before for t in texts])
        self.rollout = self._score_samples(rollout.select(rows))
        return queries

    def _rank(self, texts: list[str], n: int) -> list[str]:
        """The n candidate texts the GP bandit scores best (random order while it explores)."""
        from policies.gp import ACQUISITIONS, gp_posterior

        config = self.bandit.config
        if len(self.bandit.log) < max(1, config.explore_first):
            return [texts[i] for i in self.rng.permutation(len(texts))[:n]]
        acquisition = ACQUISITIONS[config.acquisition]
        vectors = np.asarray(self._encode_texts(texts), dtype=np.float32)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)  # GP needs unit rows
        mean, std = gp_posterior(self.bandit.fitted(), vectors, with_std=acquisition.needs_std)
        tried = np.isin(texts, self.bandit.log.texts)
        scores = acquisition.score(mean, std, tried, config, self.rng)
        if config.repeat_penalty is not None:
            tried = np.zeros_like(tried)
        return [texts[i] for i in rank_untried_first(scores, tried, n, self.rng)]

    def update(self, queries: list[Query], rewards: list[float]) -> None:
        self.bandit.update(queries, rewards)
        super().update(queries, rewards)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "bandit": self.bandit.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.bandit.load_state_dict(state["bandit"])
