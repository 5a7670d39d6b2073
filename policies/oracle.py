"""An evaluation-only upper bound: the policy that already knows which concepts are relevant.

The relevance scores are computed elsewhere from ground truth the agent never sees (for example
the share of a concept's search results that fall in the target classes). This policy is never
used by the agent itself; it exists so reports can show how far a real policy is from the best
query order the vocabulary allows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from policies.base import Query, register_policy
from policies.random_policy import VocabularyPolicy, rank_untried_first


@register_policy("oracle")
class OraclePolicy(VocabularyPolicy):
    """Proposes the highest-relevance concepts not yet tried; ties are broken by the policy RNG."""

    def __init__(self, concepts: Sequence[str], relevance: np.ndarray, seed: int = 0):
        super().__init__(concepts, seed)
        relevance = np.asarray(relevance, dtype=np.float64)
        if relevance.shape != (len(self.concepts),):
            raise ValueError(f"relevance has shape {relevance.shape}, "
                             f"expected ({len(self.concepts)},) for the vocabulary")
        if not np.isfinite(relevance).all():
            raise ValueError("relevance scores must be finite")
        self.relevance = relevance  # (N,) hidden per-concept relevance, not part of state

    def propose(self, n: int) -> list[Query]:
        self._check_batch(n)
        return self._queries(rank_untried_first(self.relevance, self.log.tried, n, self.rng))
