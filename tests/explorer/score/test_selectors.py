"""The text peers (DSIR and the n-gram classifier) on real Wikipedia leads: a topic's documents
against the other topics'."""

import numpy as np
import pytest
from data_selection.hashed_ngram_dsir import get_ngram_counts, wpt
from sklearn.metrics import roc_auc_score

from explorer.score.selectors import DSIR, NgramClassifier, ngram_counts
from explorer.web.text_corpus import document_text

TOPIC = "Mathematics"


@pytest.fixture(scope="module")
def leads():
    """60 target documents, 60 held-out documents of the topic, 240 of the other topics (seeded)."""
    from explorer.web.text_sources import load_wikipedia_leads

    docs = load_wikipedia_leads()
    rng = np.random.default_rng(0)
    on = [document_text(d) for d in docs if d["topic"] == TOPIC]
    off = [document_text(d) for d in docs if d["topic"] != TOPIC]
    on = [on[i] for i in rng.choice(len(on), 120, replace=False)]
    off = [off[i] for i in rng.choice(len(off), 480, replace=False)]
    return {"target": on[:60], "held_on": on[60:], "background": off[:240], "held_off": off[240:]}


def test_counts_are_the_packages_featurizer(leads):
    text = leads["target"][0]
    assert (ngram_counts([text]).toarray()[0] == get_ngram_counts(text, n=2, num_buckets=10_000,
                                                                   tokenizer=wpt.tokenize)).all()
    assert ngram_counts([]).shape == (0, 10_000)


def test_dsir_weights_rank_the_topic_above_the_rest_and_resample_towards_it(leads):
    pool = leads["held_on"] + leads["held_off"]  # 60 of the topic in 300: a 20% share
    dsir = DSIR(ngram_counts(leads["target"]), ngram_counts(leads["background"] + pool))
    w = dsir.log_weights(ngram_counts(pool))
    on = np.r_[np.ones(60), np.zeros(240)]
    assert roc_auc_score(on, w) > 0.75  # 0.80: 60 target documents leave most bigrams unseen (log 1e-8)
    top = DSIR.select(w, 50)
    assert list(top) == sorted(np.argsort(-w)[:50])
    drawn = DSIR.select(w, 50, np.random.default_rng(1))
    assert len(set(drawn)) == 50 and on[drawn].mean() > 0.4  # resampled: twice the pool's share of the topic
    assert (drawn == DSIR.select(w, 50, np.random.default_rng(1))).all()
    assert DSIR.select(w, 0).size == 0 and DSIR.select(w, 1000).size == 300


def test_dsir_target_scores_are_out_of_fold(leads):
    """A target document scored under a distribution fitted without it scores below its in-sample
    weight, and about as a held-out document of the topic does."""
    target = ngram_counts(leads["target"])
    dsir = DSIR(target, ngram_counts(leads["background"]))
    own = dsir.target_scores(folds=5)
    in_sample = dsir.log_weights(target)
    assert (own < in_sample).mean() > 0.9
    held = dsir.log_weights(ngram_counts(leads["held_on"]))
    assert abs(np.median(own) - np.median(held)) < abs(np.median(in_sample) - np.median(held))


def test_the_classifier_ranks_the_topic_above_the_rest_out_of_fold_too(leads):
    clf = NgramClassifier(ngram_counts(leads["target"]), ngram_counts(leads["background"]))
    pool = ngram_counts(leads["held_on"] + leads["held_off"])
    p = clf.scores(pool)
    assert roc_auc_score(np.r_[np.ones(60), np.zeros(240)], p) > 0.9 and ((p >= 0) & (p <= 1)).all()
    own = clf.target_scores(folds=5)
    in_sample = clf.scores(ngram_counts(leads["target"]))
    assert own.mean() < in_sample.mean()
    assert own.shape == (60,) and np.isfinite(own).all()


def test_selectors_refuse_what_they_cannot_fit():
    with pytest.raises(ValueError, match="needs target documents and background documents"):
        NgramClassifier(ngram_counts(["a b"]), ngram_counts([]))
    with pytest.raises(ValueError, match="no n-grams"):
        DSIR(ngram_counts(["alpha beta"]), ngram_counts([""]))
    with pytest.raises(ValueError, match="at least 2 target documents"):
        DSIR(ngram_counts(["alpha beta"]), ngram_counts(["gamma"])).target_scores()
