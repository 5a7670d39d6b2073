"""Count-based unigram and bigram LMs: the floor every LM table is read against.

Both are fitted on the training stream exactly as the LM sees it (documents packed with EOS) and
scored on held-out documents the way `LMLearner.evaluate_perplexity` scores them: the documents
packed with EOS, every token but the first predicted from what precedes it, mean NLL in nats per
token. The unigram is add-one smoothed; the bigram is interpolated absolute discounting (discount
0.75) backed off to that unigram, the standard strong count model (Ney et al. 1994; Chen & Goodman
1999). A neural LM that does not beat the bigram has not learned more than which token tends to
follow which.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def packed(docs: Sequence[Sequence[int]], eos_id: int) -> np.ndarray:
    """The documents as one stream, each followed by EOS (the LM's training and evaluation layout)."""
    if not len(docs):
        return np.zeros(0, np.int64)
    return np.concatenate([np.append(np.asarray(d, dtype=np.int64), eos_id) for d in docs])


class CountBigram:
    """Unigram and bigram counts of a token stream, and both models' held-out losses."""

    def __init__(self, train_docs: Sequence[Sequence[int]], eos_id: int, vocab_size: int, discount: float = 0.75):
        if not 0 < discount < 1:
            raise ValueError(f"discount must be in (0, 1), got {discount}")
        stream = packed(train_docs, eos_id)
        if len(stream) < 2:
            raise ValueError("the training documents hold fewer than two tokens")
        if stream.max() >= vocab_size:
            raise ValueError(f"token id {stream.max()} is not below vocab_size {vocab_size}")
        self.vocab_size, self.eos_id, self.discount = vocab_size, eos_id, discount
        self.tokens = len(stream)
        counts = np.bincount(stream, minlength=vocab_size).astype(np.float64)
        self.unigram = (counts + 1) / (counts.sum() + vocab_size)  # add-one: every id has mass
        codes, pair_counts = np.unique(stream[:-1] * vocab_size + stream[1:], return_counts=True)
        self.codes, self.pair_counts = codes, pair_counts.astype(np.float64)
        self.context = np.bincount(codes // vocab_size, weights=self.pair_counts, minlength=vocab_size)
        self.types = np.bincount(codes // vocab_size, minlength=vocab_size).astype(np.float64)  # N1+(v .)

    def _pair_count(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        codes = prev * self.vocab_size + nxt
        at = np.searchsorted(self.codes, codes).clip(max=len(self.codes) - 1)
        return np.where(self.codes[at] == codes, self.pair_counts[at], 0.0)

    def probabilities(self, prev: np.ndarray, nxt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(unigram, bigram) probabilities of tokens `nxt` after tokens `prev` (same shape)."""
        uni = self.unigram[nxt]
        seen = self.context[prev]
        with np.errstate(divide="ignore", invalid="ignore"):
            discounted = np.maximum(self._pair_count(prev, nxt) - self.discount, 0.0) / seen
            backoff = self.discount * self.types[prev] / seen
            bigram = np.where(seen > 0, discounted + backoff * uni, uni)  # an unseen context: the unigram
        return uni, bigram

    def losses(self, docs: Sequence[Sequence[int]]) -> dict[str, float]:
        """{'unigram', 'bigram'}: mean NLL in nats per predicted token of the packed `docs`."""
        stream = packed(docs, self.eos_id)
        if len(stream) < 2:
            raise ValueError("the held-out documents hold fewer than two tokens")
        if stream.max() >= self.vocab_size:
            raise ValueError(f"token id {stream.max()} is not below vocab_size {self.vocab_size}")
        uni, bigram = self.probabilities(stream[:-1], stream[1:])
        return {"unigram": float(-np.log(uni).mean()), "bigram": float(-np.log(bigram).mean())}


def count_baselines(train_docs: Sequence[Sequence[int]], heldout_docs: Sequence[Sequence[int]], eos_id: int,
                    vocab_size: int) -> dict[str, float]:
    """The unigram's and the bigram's held-out loss (nats per token), fitted on `train_docs`."""
    model = CountBigram(train_docs, eos_id, vocab_size)
    return {**model.losses(heldout_docs), "train_tokens": model.tokens}
