"""learners/ngram.py: the count baselines are proper distributions, score as the LM's evaluation
counts tokens, and a bigram beats a unigram on text with structure."""

import math

import numpy as np
import pytest

from learners.ngram import CountBigram, count_baselines, packed


def test_every_context_gives_a_distribution_that_sums_to_one():
    rng = np.random.default_rng(0)
    docs = [rng.integers(2, 12, size=int(n)).tolist() for n in rng.integers(3, 20, size=30)]
    model = CountBigram(docs, eos_id=1, vocab_size=14)
    nxt = np.arange(14)
    for prev in range(14):  # seen contexts, and 0 and 13, never seen (the unigram then)
        uni, bigram = model.probabilities(np.full(14, prev), nxt)
        assert bigram.sum() == pytest.approx(1.0) and (bigram > 0).all()
    assert model.unigram.sum() == pytest.approx(1.0)


def test_losses_count_the_tokens_the_lm_evaluation_counts():
    docs = [[2, 3, 2, 3], [2, 3]]
    model = CountBigram(docs, eos_id=1, vocab_size=5)
    stream = packed([[2, 3]], 1)  # 2 3 EOS: two predicted tokens
    out = model.losses([[2, 3]])
    uni = -(math.log(model.unigram[3]) + math.log(model.unigram[1])) / (len(stream) - 1)
    assert out["unigram"] == pytest.approx(uni)


def test_the_bigram_beats_the_unigram_where_order_matters_and_not_where_it_does_not():
    rng = np.random.default_rng(1)
    cycle = [[(i % 8) + 2 for i in range(int(start), int(start) + 50)] for start in rng.integers(0, 8, size=40)]
    ordered = count_baselines(cycle[:30], cycle[30:], eos_id=1, vocab_size=10)
    assert ordered["bigram"] < 0.5 * ordered["unigram"]
    shuffled = [rng.integers(2, 10, size=50).tolist() for _ in range(200)]
    iid = count_baselines(shuffled[:150], shuffled[150:], eos_id=1, vocab_size=10)
    assert iid["bigram"] == pytest.approx(iid["unigram"], abs=0.05)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="vocab_size"):
        CountBigram([[5, 6]], eos_id=1, vocab_size=4)
    with pytest.raises(ValueError, match="fewer than two"):
        CountBigram([], eos_id=1, vocab_size=4)
