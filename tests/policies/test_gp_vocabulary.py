"""The GP on the real vocabulary's geometry: WordNet nouns of a slice of the web's captions plus
1,500 random nouns, embedded with MiniLM. A concept is relevant when WordNet puts it under
clothing, footwear or bag (the target's kind), and relevant queries yield like real ones do
(a share of target-like results) while every other query yields 0, as most do in the runs."""

import numpy as np
import pytest

from explorer.web.text_encoder import default_encoder
from explorer.web.vocabulary import ConceptVocabulary
from policies import build_policy

KIND = {"clothing", "footwear", "bag", "garment", "apparel", "wear"}
ROUNDS, PER_ROUND = 6, 16


@pytest.fixture(scope="module")
def vocabulary(small_corpus):
    vocab = ConceptVocabulary.from_captions(small_corpus.distinct_captions, n_random=1500, seed=0)
    relevant = np.array([bool(KIND & set(vocab.hypernym_path(i))) for i in range(len(vocab))])
    return vocab, default_encoder().encode(list(vocab.concepts)), relevant


def relevant_found(policy, relevant: np.ndarray, seed: int) -> list[int]:
    """Relevant concepts proposed per round, the policy hearing a yield for every query."""
    rng = np.random.default_rng(1000 + seed)
    found = []
    for _ in range(ROUNDS):
        queries = policy.propose(PER_ROUND)
        hits = [relevant[q.concept] for q in queries]
        policy.update(queries, [float(rng.uniform(0.2, 0.6)) if hit else 0.0 for hit in hits])
        found.append(int(sum(hits)))
    return found


def test_the_vocabulary_has_few_relevant_concepts(vocabulary):
    vocab, _, relevant = vocabulary
    assert 0.005 < relevant.mean() < 0.1, (relevant.sum(), len(vocab))


@pytest.mark.parametrize("acquisition", ["softmax", "ucb"])
def test_gp_finds_twice_the_relevant_concepts_of_random_in_every_seed(vocabulary, acquisition):
    vocab, emb, relevant = vocabulary
    empty_first_round = 0
    for seed in range(6):
        gp = build_policy("gp", concepts=list(vocab.concepts), embeddings=emb, seed=seed,
                          acquisition=acquisition, explore_first=PER_ROUND)
        random = build_policy("random", concepts=list(vocab.concepts), seed=seed)
        gp_found, random_found = relevant_found(gp, relevant, seed), relevant_found(random, relevant, seed)
        empty_first_round += gp_found[0] == 0
        assert sum(gp_found) >= 2 * max(sum(random_found), 1), (seed, gp_found, random_found)
    assert empty_first_round >= 1  # the claim covers seeds whose random first round found nothing


def test_length_scale_is_bounded_by_the_vocabulary_geometry(vocabulary):
    """Below the gap between neighbouring concepts every untried concept would get the prior mean."""
    vocab, emb, relevant = vocabulary
    gp = build_policy("gp", concepts=list(vocab.concepts), embeddings=emb, seed=0, explore_first=PER_ROUND)
    low, high = gp.length_scale_bounds
    assert 0.3 < low < 1.2 and high == 2.0
    relevant_found(gp, relevant, 0)
    assert gp.fitted().length_scale >= low
