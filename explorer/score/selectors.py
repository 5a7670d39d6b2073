"""The data-selection peers a text curator would use instead of search-and-score, on the same documents.

- **DSIR** (data selection with importance resampling): hashed unigram and bigram counts, by the
  `data-selection` package's own featurizer (`get_ngram_counts`: lower case, WordPunct tokens,
  sha256 into 10,000 buckets); a bag-of-n-grams distribution of the target and one of the raw pool;
  a document's log importance weight is sum_b count_b * (log p_target(b) - log p_raw(b)), with the
  package's 1e-8 floor; `select` resamples k documents without replacement by Gumbel top-k on those
  weights, as the package's `resample` does (or the top k, its `top_k=True`).
- **A quality classifier** in the manner of DCLM's fastText filter: a logistic regression on the
  same hashed n-grams (tf-idf weighted, l2-normalised), the target's documents positive and the
  background's negative; a document's score is P(target).

Both give the target's own scores out of fold (`target_scores`): the scale on which a candidate's
score is read, as `explorer.score.reward.RewardCalibration` reads the kNN reward, so that either
can stand where the reward stands (`PeerSpace`, `text.scorer`): the same acceptance rule and query
reward, on the same candidates and downloads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse
from data_selection.hashed_ngram_dsir import get_ngram_counts, wpt
from sklearn.feature_extraction.text import TfidfTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline

from explorer.score.reward import RewardCalibration

NUM_BUCKETS = 10_000  # DSIR's default
NGRAMS = 2  # unigrams and bigrams
LOG_FLOOR = 1e-8  # the package's floor inside both logs


def ngram_counts(texts: Sequence[str], num_buckets: int = NUM_BUCKETS, n: int = NGRAMS) -> scipy.sparse.csr_matrix:
    """(N, num_buckets) hashed n-gram counts of `texts`, as DSIR's featurizer counts them."""
    rows = [scipy.sparse.csr_matrix(get_ngram_counts(t, n=n, num_buckets=num_buckets, tokenizer=wpt.tokenize))
            for t in texts]
    if not rows:
        return scipy.sparse.csr_matrix((0, num_buckets), dtype=np.int64)
    return scipy.sparse.vstack(rows, format="csr")


def _distribution(counts: scipy.sparse.spmatrix) -> np.ndarray:
    total = np.asarray(counts.sum(axis=0), dtype=np.float64).ravel()
    if total.sum() == 0:
        raise ValueError("no n-grams to fit a distribution on (empty documents)")
    return total / total.sum()


def _folds(n: int, folds: int) -> int:
    if n < 2:
        raise ValueError(f"out-of-fold scores need at least 2 target documents, got {n}")
    return min(folds, n)


class DSIR:
    """Hashed n-gram importance weights of documents for a target against a raw pool."""

    def __init__(self, target: scipy.sparse.spmatrix, raw: scipy.sparse.spmatrix):
        """`target`, `raw`: `ngram_counts` of the target's documents and of the raw pool's."""
        if target.shape[1] != raw.shape[1]:
            raise ValueError(f"target and raw counts have {target.shape[1]} and {raw.shape[1]} buckets")
        self.target, self.raw_probs = target, _distribution(raw)
        self.log_diff = self._log_diff(_distribution(target))

    def _log_diff(self, target_probs: np.ndarray) -> np.ndarray:
        return np.log(target_probs + LOG_FLOOR) - np.log(self.raw_probs + LOG_FLOOR)

    def log_weights(self, counts: scipy.sparse.spmatrix) -> np.ndarray:
        """(N,) log importance weights of documents given by their counts."""
        return np.asarray(counts @ self.log_diff, dtype=np.float64).ravel()

    def target_scores(self, folds: int = 5, seed: int = 0) -> np.ndarray:
        """(N_t,) each target document's log weight under a target distribution fitted without it
        (k folds): what a new document of the target would score."""
        n = self.target.shape[0]
        order = np.random.default_rng(seed).permutation(n)
        out = np.empty(n)
        for held in np.array_split(order, _folds(n, folds)):
            rest = np.setdiff1d(order, held)
            out[held] = np.asarray(self.target[held] @ self._log_diff(_distribution(self.target[rest]))).ravel()
        return out

    @staticmethod
    def select(log_weights: np.ndarray, k: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """Indices of k documents resampled without replacement in proportion to their importance
        weights (Gumbel top-k, as the package's `resample`); rng None: the top k by weight."""
        log_weights = np.asarray(log_weights, dtype=np.float64)
        k = min(int(k), len(log_weights))
        if k <= 0:
            return np.zeros(0, dtype=np.int64)
        keys = log_weights + (rng.gumbel(size=log_weights.shape) if rng is not None else 0.0)
        return np.sort(np.argpartition(-keys, k - 1)[:k])


class NgramClassifier:
    """Logistic regression on tf-idf weighted hashed n-grams: target positive, background negative."""

    def __init__(self, target: scipy.sparse.spmatrix, background: scipy.sparse.spmatrix, *, c: float = 1.0,
                 seed: int = 0):
        """`target`, `background`: `ngram_counts` of the target's and of the background's documents."""
        if target.shape[0] == 0 or background.shape[0] == 0:
            raise ValueError("the classifier needs target documents and background documents")
        self.c, self.seed = c, seed
        self.x = scipy.sparse.vstack([target, background], format="csr")
        self.y = np.r_[np.ones(target.shape[0], dtype=int), np.zeros(background.shape[0], dtype=int)]
        self.model = self._fit(self.x, self.y)

    def _fit(self, x, y):
        model = make_pipeline(TfidfTransformer(sublinear_tf=True),
                              LogisticRegression(C=self.c, class_weight="balanced", max_iter=1000,
                                                 random_state=self.seed))
        return model.fit(x, y)

    def scores(self, counts: scipy.sparse.spmatrix) -> np.ndarray:
        """(N,) P(target) of documents given by their counts."""
        if counts.shape[0] == 0:
            return np.zeros(0)
        return self.model.predict_proba(counts)[:, 1]

    def target_scores(self, folds: int = 5) -> np.ndarray:
        """(N_t,) each target document's P(target) from a classifier fitted without it (stratified
        k folds over target and background alike)."""
        n_target = int(self.y.sum())
        k = min(_folds(n_target, folds), int((self.y == 0).sum()))
        if k < 2:
            raise ValueError("out-of-fold scores need at least 2 background documents")
        out = np.empty(n_target)
        for train, held in StratifiedKFold(k, shuffle=True, random_state=self.seed).split(self.x, self.y):
            held = held[self.y[held] == 1]
            out[held] = self._fit(self.x[train], self.y[train]).predict_proba(self.x[held])[:, 1]
        return out


PEERS = ("dsir", "classifier")


@dataclass(frozen=True)
class PeerSpace:
    """A peer's scores standing where the kNN reward space stands in a text run (`text.scorer`):
    candidates come as their `ngram_counts`, and a score is read on the target's own out-of-fold
    scores (`calibration`), so the loop's acceptance rule and query reward apply unchanged."""

    encoder: str  # the peer's name, logged as the reward's encoder
    score: Callable[[scipy.sparse.spmatrix], np.ndarray]
    calibration: RewardCalibration

    def rewards(self, counts: scipy.sparse.spmatrix, chunk_size: int | None = None) -> np.ndarray:
        return np.asarray(self.score(counts), dtype=np.float32)

    def member_rewards(self, counts: scipy.sparse.spmatrix) -> np.ndarray:
        """Scores of the background's own documents (the policy hears the background queries): the
        classifier saw them as negatives, so they read lower than new documents would."""
        return self.rewards(counts)

    def health(self, min_spread: float) -> dict:
        spread = self.calibration.spread()
        return {"reward_encoder": self.encoder, "reward_spread": round(spread, 6), "reward_anisotropy": None,
                "reward_offset": 0.0, "reward_collapsed": bool(spread < min_spread)}


def peer_space(name: str, target: scipy.sparse.spmatrix, background: scipy.sparse.spmatrix,
               seed: int = 0) -> PeerSpace:
    """The peer `name` fitted on the target's and the background's counts: DSIR with the background
    as its raw pool, or the classifier with the background as its negatives."""
    if name == "dsir":
        dsir = DSIR(target, background)
        return PeerSpace(name, dsir.log_weights, RewardCalibration(np.sort(dsir.target_scores(seed=seed))))
    if name == "classifier":
        clf = NgramClassifier(target, background, seed=seed)
        return PeerSpace(name, clf.scores, RewardCalibration(np.sort(clf.target_scores())))
    raise ValueError(f"unknown peer {name!r}; valid: {', '.join(PEERS)}")
