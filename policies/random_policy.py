"""Uniform random exploration over the concept vocabulary, and the plumbing vocabulary policies share.

`RandomPolicy` is the exploration baseline: it draws concepts uniformly without replacement until
the vocabulary is exhausted, then starts drawing from the whole vocabulary again.

The shared parts live here because every other vocabulary policy is "random exploration plus a
score": `QueryLog` is the ordered record of queries and rewards, `rank_untried_first` turns
per-concept scores into a batch, and `VocabularyPolicy` owns the vocabulary, the policy RNG and
the `state_dict` that makes a resumed or replayed run take identical decisions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from policies.base import Query, register_policy

FREE_TEXT = -1  # concept id recorded for a query that did not come from the vocabulary


def vocabulary_digest(concepts: Sequence[str]) -> str:
    """Fingerprint of the vocabulary, so a state is never loaded against a different one."""
    return hashlib.sha1("\n".join(concepts).encode("utf-8")).hexdigest()


def rank_untried_first(scores: np.ndarray, tried: np.ndarray, n: int,
                       rng: np.random.Generator) -> np.ndarray:
    """Indices of the n best concepts: untried before tried, then higher score first.

    Equal scores are ordered by a fresh random key from `rng`, so ties never favour low indices.
    """
    tiebreak = rng.random(len(scores))
    order = np.lexsort((tiebreak, -scores, tried))  # last key is the primary one
    return order[:n]


class QueryLog:
    """Every query a policy heard a reward for, in order; `tried` marks vocabulary concepts used."""

    def __init__(self, num_concepts: int):
        self.num_concepts = num_concepts
        self.clear()

    def clear(self) -> None:
        self.concepts: list[int] = []  # vocabulary index, or FREE_TEXT
        self.texts: list[str] = []
        self.rewards: list[float] = []
        self.tried = np.zeros(self.num_concepts, dtype=bool)

    def __len__(self) -> int:
        return len(self.rewards)

    def record(self, queries: Sequence[Query], rewards: Sequence[float]) -> None:
        if len(queries) != len(rewards):
            raise ValueError(f"{len(queries)} queries but {len(rewards)} rewards")
        rewards = [float(r) for r in rewards]
        if not all(np.isfinite(rewards)):
            raise ValueError(f"rewards must be finite, got {rewards}")
        for q in queries:
            if q.concept is not None and not 0 <= q.concept < self.num_concepts:
                raise ValueError(f"concept {q.concept} outside a vocabulary of {self.num_concepts}")
        for q, r in zip(queries, rewards):
            concept = FREE_TEXT if q.concept is None else int(q.concept)
            self.concepts.append(concept)
            self.texts.append(q.text)
            self.rewards.append(r)
            if concept != FREE_TEXT:
                self.tried[concept] = True

    def state_dict(self) -> dict[str, Any]:
        return {"concepts": list(self.concepts), "texts": list(self.texts),
                "rewards": list(self.rewards)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clear()
        queries = [Query(t, None if c == FREE_TEXT else c)
                   for c, t in zip(state["concepts"], state["texts"])]
        self.record(queries, state["rewards"])


class VocabularyPolicy:
    """Base of the vocabulary policies: concepts, policy RNG, query log and their state_dict.

    Subclasses set `self.config` (a frozen dataclass, or None) and implement `propose`; the hook
    `_log_changed` lets them drop caches derived from the log. `propose(n)` returns n distinct
    concepts (all N when n > N).
    """

    name: str
    config: Any = None

    def __init__(self, concepts: Sequence[str], seed: int = 0):
        if len(concepts) == 0:
            raise ValueError("the concept vocabulary is empty")
        self.concepts = list(concepts)
        self.seed = int(seed)
        self.rng = np.random.default_rng(self.seed)
        self.log = QueryLog(len(self.concepts))
        self._digest = vocabulary_digest(self.concepts)

    def update(self, queries: list[Query], rewards: list[float]) -> None:
        self.log.record(queries, rewards)

    def _queries(self, indices: np.ndarray) -> list[Query]:
        return [Query(self.concepts[i], int(i)) for i in indices]

    def _check_batch(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"propose needs n >= 1, got {n}")

    def state_dict(self) -> dict[str, Any]:
        return {
            "policy": self.name,
            "vocabulary": self._digest,
            "seed": self.seed,
            "rng": self.rng.bit_generator.state,
            "log": self.log.state_dict(),
            "config": None if self.config is None else asdict(self.config),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["policy"] != self.name:
            raise ValueError(f"state of policy {state['policy']!r} loaded into {self.name!r}")
        if state["vocabulary"] != self._digest:
            raise ValueError("state was saved with a different concept vocabulary")
        if self.config is not None:
            # The saved config wins, so the loaded policy decides exactly as the saved one did.
            self.config = type(self.config)(**state["config"])
        self.seed = int(state["seed"])
        self.rng.bit_generator.state = state["rng"]
        self.log.load_state_dict(state["log"])
        self._log_changed()

    def _log_changed(self) -> None:
        """Hook: the log was replaced; drop anything derived from it (fits, cached predictions)."""


@register_policy("random")
class RandomPolicy(VocabularyPolicy):
    """Uniform over the vocabulary without replacement until exhausted, then over all of it."""

    def propose(self, n: int) -> list[Query]:
        self._check_batch(n)
        flat = np.zeros(len(self.concepts))
        return self._queries(rank_untried_first(flat, self.log.tried, n, self.rng))
