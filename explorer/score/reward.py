"""Reward math: how much a candidate image looks like the target set, and which ones to keep.

The scorer embeds candidates with the current encoder; everything here takes those embeddings
as plain arrays and returns arrays, with no I/O and no global state. Similarity is cosine
similarity: every embedding is L2-normalised on the way in, so a faiss inner-product index
gives cosines directly.

- Image reward (`knn_reward`): the mean cosine similarity of a candidate to its k nearest target
  embeddings, so an image is rewarded for lying in a dense part of the target distribution
  rather than next to a single outlier.
- Contrast with the web (`contrast_reward`): the same similarity to a *background* sample of the
  web, weighted and subtracted, so an image is rewarded for being more like the target than like
  the web the run has seen. Under an encoder adapted to a small target, whole kinds of web images
  (digits next to clothing) sit close to every target image; the background cancels that shared
  similarity (in embedding space, the cross-entropy difference used to select in-domain text).
  The sample (`BackgroundSample`) starts as the results of random vocabulary queries and is a
  uniform reservoir over everything fetched since, so a kind the policy keeps finding is soon
  part of it. The target's own rewards are contrasted the same way, so a background full of the
  target's kind lowers both sides alike. Measured in BENCHMARKS.md, acceptance.
- Calibration (`RewardCalibration`): the target's own leave-one-out rewards under the current
  encoder. A candidate's reward is read as the share of target images that are no more typical of
  the target than it is (`percentile`), which means the same thing whatever the encoder's scale.
- Acceptance by value (`RewardConfig.accept_mask`): a candidate enters training when its reward is
  at least the `accept_percentile`-th percentile of the target's own rewards, so a policy that
  finds nothing target-like adds nothing; the legacy rule (`select_for_training`) keeps a fixed
  fraction of every batch.
- Query reward (`query_yield`, `query_reward`): the target-like yield of a query, its images'
  percentiles summed over the results it was asked for; or an aggregate of the raw rewards.
- Decontamination (`near_duplicates`, `dedupe_within`): drop copies of the probe test split and
  of images already accepted, so gains on the probe are not bought by leaking it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np
import torch
import torch.nn.functional as F

# Rows per faiss search call: 65,536 x 512 float32 is a 128 MiB normalised copy, so a million
# candidates never need more than one chunk of extra memory at a time.
DEFAULT_CHUNK = 65_536


def unit_rows(x: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, D) float32, C-contiguous, each row L2-normalised (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D (N, D) array of embeddings, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


class TargetIndex:
    """Exact cosine k-NN over the target set's embeddings (a faiss IndexFlatIP on unit vectors).

    Exact search on purpose: the target set is small (tens of thousands), and an approximate
    index would add recall noise to every reward.
    """

    def __init__(self, embeddings: np.ndarray):
        self._index: faiss.IndexFlatIP | None = None
        self.embeddings = np.zeros((0, 0), np.float32)
        self.refresh(embeddings)

    def refresh(self, embeddings: np.ndarray) -> None:
        """Replace the target embeddings (N_t, D); call whenever the encoder changes."""
        targets = unit_rows(embeddings)  # (N_t, D)
        if len(targets) == 0:
            raise ValueError("the target set is empty: there is nothing to reward similarity to")
        if not np.isfinite(targets).all():
            raise ValueError("target embeddings contain NaN or inf")
        index = faiss.IndexFlatIP(targets.shape[1])
        index.add(targets)
        self._index, self.embeddings = index, targets

    @property
    def dim(self) -> int:
        return self._index.d

    def __len__(self) -> int:
        return self._index.ntotal

    def knn(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Queries (M, D) -> (sims (M, k') float32, ids (M, k') int64), best first.

        Queries are L2-normalised here, so sims are cosines. k' = min(k, number of targets).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = unit_rows(queries)
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have dim {queries.shape[1]}, the targets have {self.dim}")
        k = min(k, len(self))
        if len(queries) == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return self._index.search(queries, k)


def knn_reward(candidate_emb: np.ndarray, index: TargetIndex, k: int = 10,
               chunk_size: int = DEFAULT_CHUNK) -> np.ndarray:
    """Mean cosine similarity of each candidate (M, D) to its k nearest targets -> (M,) float32.

    Rewards lie in [-1, 1]. Candidates are searched `chunk_size` rows at a time so that only one
    normalised chunk is held besides the input; the result does not depend on the chunk size.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    candidate_emb = np.asarray(candidate_emb)
    rewards = np.empty(len(candidate_emb), dtype=np.float32)
    for start in range(0, len(candidate_emb), chunk_size):
        sims, _ = index.knn(candidate_emb[start:start + chunk_size], k)  # (chunk, k)
        rewards[start:start + chunk_size] = sims.mean(axis=1)
    return rewards


def contrast_reward(candidate_emb: np.ndarray, index: TargetIndex, background: TargetIndex | None, *,
                    k: int = 10, weight: float = 0.5, chunk_size: int = DEFAULT_CHUNK) -> np.ndarray:
    """knn_reward to the target minus `weight` x knn_reward to the background -> (M,) float32.

    With no background (None) or weight 0 this is knn_reward itself."""
    rewards = knn_reward(candidate_emb, index, k, chunk_size)
    if background is None or weight == 0.0:
        return rewards
    return rewards - np.float32(weight) * knn_reward(candidate_emb, background, k, chunk_size)


def leave_one_out_rewards(index: TargetIndex, k: int = 10) -> np.ndarray:
    """knn_reward of every target against the *other* targets -> (N_t,) float32.

    This is what a new image drawn from the target distribution would score, so it is the scale
    on which candidates are judged. A target's own entry is removed by id (not by position, so an
    exact duplicate in the target set still counts as a neighbour)."""
    if len(index) < 2:
        raise ValueError("leave-one-out rewards need at least 2 target images")
    k = min(k, len(index) - 1)
    sims, ids = index.knn(index.embeddings, k + 1)  # (N_t, k+1), usually self first
    return _mean_without(sims, ids == np.arange(len(ids))[:, None])


def _mean_without(sims: np.ndarray, own: np.ndarray) -> np.ndarray:
    """Row means of (N, k+1) neighbour similarities less one entry per row: the first marked in
    `own` (the row's own entry), else the farthest (self not among the k+1: ties) -> (N,) float32."""
    own = own & (np.cumsum(own, axis=1) == 1)  # at most one per row
    own[~own.any(axis=1), -1] = True
    return sims[~own].reshape(len(sims), sims.shape[1] - 1).mean(axis=1).astype(np.float32)


@dataclass(frozen=True)
class RewardCalibration:
    """The target's leave-one-out rewards, sorted: the scale on which candidate rewards are read.

    `offset` >= 0 moves candidates up that scale when the web's own reference accepts at a lower
    reward than the target's (`web_offset`): a target of another style than the web's copies of its
    kind is nearer to itself than any web image can be, so the target's percentile alone would
    refuse all of them."""

    reference: np.ndarray  # (N_t,) sorted ascending
    offset: float = 0.0

    @classmethod
    def of(cls, index: TargetIndex, k: int, background: TargetIndex | None = None,
           weight: float = 0.0) -> "RewardCalibration":
        """Leave-one-out rewards of the targets, contrasted with the background as candidates are."""
        own = leave_one_out_rewards(index, k)
        if background is not None and weight != 0.0:
            own = own - np.float32(weight) * knn_reward(index.embeddings, background, k)
        return cls(np.sort(own))

    def percentile(self, rewards: np.ndarray) -> np.ndarray:
        """(M,) rewards -> (M,) share in [0, 1] of target images whose own reward is <= each one
        (each moved up by `offset`).

        A candidate typical of the target reads ~0.5, one below every target image 0; NaN reads 0."""
        rewards = np.nan_to_num(np.asarray(rewards, dtype=np.float64), nan=-np.inf) + self.offset
        return np.searchsorted(self.reference, rewards, side="right") / len(self.reference)

    def threshold(self, percentile: float) -> float:
        """The reward at the given percentile (0-100) of the target's own rewards (less `offset`)."""
        return float(np.percentile(self.reference, percentile)) - self.offset

    def spread(self) -> float:
        """The target's own rewards from their 10th to their 90th percentile: ~0 when the encoder
        maps every image onto one direction and the reward no longer tells images apart."""
        return float(np.percentile(self.reference, 90) - np.percentile(self.reference, 10))


def web_rewards(background: TargetIndex, index: TargetIndex, k: int, weight: float) -> np.ndarray:
    """The reward of every image of the web's background sample, contrasted like a candidate's
    with the *other* background images (its own entry left out) -> (N_b,) float32."""
    rewards = knn_reward(background.embeddings, index, k)
    if weight == 0.0 or len(background) < 2:
        return rewards
    return rewards - np.float32(weight) * leave_one_out_rewards(background, k)


def web_offset(calibration: RewardCalibration, web: np.ndarray, accept_percentile: float,
               web_percentile: float) -> float:
    """How far the web's `web_percentile`-th reward lies below the target's `accept_percentile`-th
    (0 when above): a candidate that beats that share of the web is read as reaching the target's
    acceptance percentile. On a web full of the target's kind, the web's high percentile lies
    above the target's low one and nothing changes."""
    gap = float(np.percentile(calibration.reference, accept_percentile) - np.percentile(web, web_percentile))
    return max(gap, 0.0)


def mean_pairwise_cosine(emb: np.ndarray) -> float:
    """Mean cosine between distinct rows of (N, D) -> float (1.0: every row points one way)."""
    unit = unit_rows(emb)
    if len(unit) < 2:
        return 1.0
    total = unit.sum(axis=0, dtype=np.float64)
    return float((total @ total - len(unit)) / (len(unit) * (len(unit) - 1)))


def centred(emb: np.ndarray, centre: np.ndarray | None) -> np.ndarray:
    """Unit rows of (N, D) less `centre` (D,), renormalised; `None` leaves them as unit rows.

    Features after a ReLU-like activation share one large mean direction (cosines of 0.7 between
    unrelated images under ImageNet EfficientNet-Lite0; 0.995 after MoCo on a target of blurry
    digits): subtracting the web's mean reads the cosine from what images do *not* share."""
    unit = unit_rows(emb)
    return unit if centre is None else unit_rows(unit - centre.astype(np.float32))


def query_yield(percentiles: list[np.ndarray], requested: int) -> list[float]:
    """Per query: the sum of its images' percentiles over the `requested` results it asked for.

    An image typical of the target adds ~0.5, an unrelated one 0; a result that failed to fetch or
    decode, was accepted before, or never came (the engine returned fewer) adds 0. So a query is
    worth what it yields, and one whose results are all rejected is worth 0 under any encoder."""
    if requested < 1:
        raise ValueError(f"requested must be >= 1, got {requested}")
    return [float(np.sum(p)) / requested for p in percentiles]


def _mean_top(rewards: np.ndarray, top_m: int) -> float:
    # np.partition puts the top_m largest last without a full sort.
    m = min(top_m, len(rewards))
    return float(np.partition(rewards, len(rewards) - m)[-m:].mean())


# How a query's image rewards become one query reward. Each takes (finite, non-empty rewards, top_m).
QUERY_AGGREGATES: dict[str, Callable[[np.ndarray, int], float]] = {
    "mean_top": _mean_top,
    "mean": lambda rewards, top_m: float(rewards.mean()),
    "max": lambda rewards, top_m: float(rewards.max()),
}

QUERY_REWARDS = ("yield", "aggregate")
ACCEPT_RULES = ("value", "top_fraction")
BACKGROUND_UPDATES = ("reservoir", "fixed")
REWARD_ENCODERS = ("learner", "base", "start")

# Reward of a query with no usable images. Cosine 0 means "unrelated": below the reward of any
# image that resembles the target at all, yet not so far below the usual spread of rewards
# (roughly 0.2-0.9) that one empty query dominates a regression fit of the policy the way the
# hard floor of -1 would. Pass empty=-1.0 to make an empty query strictly the worst possible.
EMPTY_QUERY_REWARD = 0.0


def query_reward(image_rewards: np.ndarray, *, how: str = "mean_top", top_m: int = 10,
                 empty: float = EMPTY_QUERY_REWARD) -> float:
    """Aggregate the rewards (n,) of one query's images into a finite query reward.

    how:
      - "mean_top" (default): mean of the top min(top_m, n) rewards. A web search returns a few
        good images among many off-topic ones; the best ones are what the learner will keep, so
        the query is judged by them and not diluted by the junk tail.
      - "mean": mean of all rewards (the plain Internet Explorer query reward).
      - "max": the single best reward.
    Non-finite image rewards are ignored. A query whose search returned nothing, or whose
    images were all rejected (n = 0 after that), gets `empty`, so a policy never sees NaN.
    """
    if how not in QUERY_AGGREGATES:
        raise ValueError(f"unknown query aggregate {how!r}; valid: {sorted(QUERY_AGGREGATES)}")
    if top_m < 1:
        raise ValueError(f"top_m must be >= 1, got {top_m}")
    if not math.isfinite(empty):
        raise ValueError(f"the empty-query reward must be finite, got {empty}")
    rewards = np.asarray(image_rewards, dtype=np.float64).reshape(-1)
    rewards = rewards[np.isfinite(rewards)]
    if len(rewards) == 0:
        return float(empty)
    return QUERY_AGGREGATES[how](rewards, top_m)


def select_for_training(rewards: np.ndarray, *, threshold: float | None, top_fraction: float,
                        min_keep: int = 0) -> np.ndarray:
    """Which candidates (M,) enter training -> bool mask (M,).

    Exactly:
      1. Non-finite rewards are never accepted; let F be the number of finite ones.
      2. Threshold path: if `threshold` is set and at least max(1, min_keep) rewards are
         >= threshold, accept exactly those.
      3. Fallback: otherwise accept the n = min(F, max(ceil(top_fraction * M), min_keep))
         highest rewards; ties are broken by position (earlier first), so exactly n are taken.
    The fallback keeps the data flowing when the encoder's similarity scale drifts below a fixed
    threshold; it always contains every candidate that passed the threshold. M = 0 gives an
    empty mask.
    """
    if not 0.0 <= top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in [0, 1], got {top_fraction}")
    if min_keep < 0:
        raise ValueError(f"min_keep must be >= 0, got {min_keep}")
    rewards = np.asarray(rewards, dtype=np.float64).reshape(-1)
    finite = np.isfinite(rewards)
    if threshold is not None:
        passing = finite & (rewards >= threshold)
        if passing.sum() >= max(1, min_keep):
            return passing
    n_keep = min(int(finite.sum()), max(math.ceil(top_fraction * len(rewards)), min_keep))
    ranked = np.argsort(-np.where(finite, rewards, -np.inf), kind="stable")
    accept = np.zeros(len(rewards), dtype=bool)
    accept[ranked[:n_keep]] = True
    return accept


def near_duplicates(candidate_emb: np.ndarray, reference_emb: np.ndarray,
                    threshold: float = 0.95, chunk_size: int = DEFAULT_CHUNK) -> np.ndarray:
    """Candidates (M, D) whose max cosine to any reference (R, D) is >= threshold -> bool (M,).

    Used to drop candidates that copy the probe test split or an already accepted image.
    An empty reference set flags nothing.
    """
    candidate_emb = np.asarray(candidate_emb)
    if len(reference_emb) == 0 or len(candidate_emb) == 0:
        return np.zeros(len(candidate_emb), dtype=bool)
    reference = TargetIndex(reference_emb)
    flagged = np.empty(len(candidate_emb), dtype=bool)
    for start in range(0, len(candidate_emb), chunk_size):
        sims, _ = reference.knn(candidate_emb[start:start + chunk_size], 1)  # (chunk, 1)
        flagged[start:start + chunk_size] = sims[:, 0] >= threshold
    return flagged


def dedupe_within(candidate_emb: np.ndarray, threshold: float = 0.95,
                  block_size: int = 1024) -> np.ndarray:
    """Greedy in-order dedup of (M, D) -> bool (M,) of items to keep.

    Item j is kept iff no earlier *kept* item has cosine >= threshold with it (so in a chain
    a~b~c where a and c are far apart, a and c are kept and b is dropped). Blocks of rows are
    checked against a faiss index of the items kept so far, then greedily among themselves.
    """
    emb = unit_rows(candidate_emb)
    keep = np.zeros(len(emb), dtype=bool)
    if len(emb) == 0:
        return keep
    kept_index = faiss.IndexFlatIP(emb.shape[1])
    for start in range(0, len(emb), block_size):
        block = emb[start:start + block_size]  # (B, D)
        alive = np.ones(len(block), dtype=bool)
        if kept_index.ntotal:
            sims, _ = kept_index.search(block, 1)
            alive = sims[:, 0] < threshold
        within = block @ block.T  # (B, B) cosines inside the block
        for i in range(len(block)):
            if alive[i]:  # i is kept: it removes every later block item too close to it
                alive[i + 1:] &= within[i, i + 1:] < threshold
        keep[start:start + len(block)] = alive
        kept_index.add(block[alive])
    return keep


class BackgroundSample:
    """A uniform sample of at most `capacity` items among all items added (reservoir sampling,
    Algorithm R). Item n's fate is drawn from a generator seeded by (seed, n), so the sample
    depends only on the seed and the sequence of items added: no generator state to checkpoint.
    Items are opaque (image tensors, document texts)."""

    def __init__(self, capacity: int, seed: int):
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity, self.seed = capacity, seed
        self.items: list = []
        self.seen = 0

    def add(self, items) -> None:
        for item in items:
            if len(self.items) < self.capacity:
                self.items.append(item)
            else:
                j = int(np.random.default_rng([self.seed, self.seen]).integers(0, self.seen + 1))
                if j < self.capacity:
                    self.items[j] = item
            self.seen += 1

    def __len__(self) -> int:
        return len(self.items)

    def state_dict(self) -> dict:
        return {"items": list(self.items), "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.items, self.seen = list(state["items"]), int(state["seen"])


@dataclass(frozen=True)
class RewardSpace:
    """What candidates are rewarded against under one encoder: the target's neighbours, the web's
    background, the centre both are read from, and the calibrated scale (`RewardConfig.space`)."""

    index: TargetIndex
    background: TargetIndex | None
    calibration: RewardCalibration
    centre: np.ndarray | None  # (D,) subtracted from every embedding before cosines, or None
    k: int
    weight: float
    anisotropy: float  # mean pairwise cosine of the target's embeddings as the encoder gives them
    encoder: str = "learner"  # whose embeddings these are ("learner"; "base" after a fallback)

    def rewards(self, candidate_emb: np.ndarray, chunk_size: int = DEFAULT_CHUNK) -> np.ndarray:
        """contrast_reward of candidates (M, D) embedded by the same encoder -> (M,) float32."""
        if len(candidate_emb) == 0:
            return np.zeros(0, np.float32)
        return contrast_reward(centred(candidate_emb, self.centre), self.index, self.background, k=self.k,
                               weight=self.weight, chunk_size=chunk_size)

    def member_rewards(self, member_emb: np.ndarray) -> np.ndarray:
        """The rewards of items that are themselves in the background sample (M, D) -> (M,) float32:
        as `rewards`, with each one's own background entry left out of its contrast (the entry at
        cosine 1, else its farthest of k + 1 neighbours), as a new image of the same kind would score."""
        if len(member_emb) == 0:
            return np.zeros(0, np.float32)
        emb = centred(member_emb, self.centre)
        rewards = knn_reward(emb, self.index, self.k)
        if self.background is None or self.weight == 0.0 or len(self.background) < 2:
            return rewards
        sims, _ = self.background.knn(emb, min(self.k, len(self.background) - 1) + 1)
        return rewards - np.float32(self.weight) * _mean_without(sims, sims >= 1.0 - 1e-4)

    def health(self, min_spread: float) -> dict:
        """The reward's scale, for the log: the target's own spread, the anisotropy, collapsed or not."""
        spread = self.calibration.spread()
        return {"reward_encoder": self.encoder, "reward_spread": round(spread, 6),
                "reward_anisotropy": round(self.anisotropy, 6), "reward_offset": round(self.calibration.offset, 6),
                "reward_collapsed": bool(spread < min_spread)}


@dataclass(kw_only=True, frozen=True)
class RewardConfig:
    """How candidates are rewarded, accepted and decontaminated."""

    k: int = 10
    """Nearest target embeddings averaged into an image's reward."""
    aggregate: str = "mean_top"
    """Query reward from its images' rewards: a key of QUERY_AGGREGATES."""
    top_m: int = 10
    """Images averaged by the 'mean_top' aggregate."""
    query: str = "yield"
    """The query reward: "yield" (`query_yield`: target-like images per result asked for, read on the
    calibrated scale) or "aggregate" (`aggregate` of its images' raw rewards, Internet Explorer's)."""
    background_queries: int = 32
    """Random vocabulary queries issued once when a run starts; what they fetch is the first
    background sample of the web the reward contrasts with (`contrast_reward`)."""
    background_size: int = 2000
    """Items in the background sample: a uniform reservoir over the background queries' results and
    every candidate fetched since (`BackgroundSample`). 0: no background, the reward is the plain
    similarity to the target."""
    background_weight: float = 0.5
    """Weight of the background similarity subtracted from the target similarity. At 0.5, on an
    encoder whose plain reward let 89% of MNIST digits pass as clothing, 48% pass and 97% of the
    target's kind still does (BENCHMARKS.md, acceptance under the contrast)."""
    centre: bool = True
    """Read cosines after subtracting the web sample's mean embedding (`centred`; the target's when
    there is no background): under MoCo on a target of blurry digits every embedding came within
    cosine 0.995 of every other, and uncentred rewards differed in the fourth decimal."""
    web_percentile: float | None = 95.0
    """A candidate that beats this percentile of the web sample's own rewards (the first background
    sample: the results of random vocabulary queries) is read as reaching the target's acceptance
    percentile (`web_offset`), so that a target of another style than the web's copies of its kind
    still accepts them. On a web mostly of the target's kind it changes nothing. None: off."""
    background_update: str = "reservoir"
    """"reservoir": the background is a uniform reservoir over everything fetched (`BackgroundSample`);
    "fixed": it stays the first sample (the random queries' results)."""
    encoder: str = "learner"
    """Image runs: whose embeddings the reward reads. "learner": the current encoder, as it trains
    (Internet Explorer's choice); "base": the learner as the config builds it, before any training
    (ImageNet weights with `learner.pretrained`), which does not drift with what the run accepts;
    "start": the learner as the run's first round read it (after `train.pretrain_steps` on the
    target, or the shared base), frozen there: it ranks the target's kind as the trained-on-target
    encoder does, without the drift that training on the accepted images brings (kept in the run
    folder as start-encoder.pt). Text runs choose with `text.reward_encoder`."""
    min_spread: float = 0.01
    """Below this spread of the target's own rewards (10th to 90th percentile) the reward has
    collapsed: the run says so and reads the base encoder's embeddings for that iteration."""
    empty_query_reward: float = EMPTY_QUERY_REWARD
    """Reward of a query that yields no usable image under the "aggregate" query reward."""
    accept: str = "value"
    """"value": accept an image whose reward is at least the `accept_percentile`-th percentile of the
    target's own leave-one-out rewards (then at most `max_accept` per iteration, best first);
    "top_fraction": the legacy rule of `select_for_training` (threshold, else a fixed fraction)."""
    accept_percentile: float = 10.0
    """Percentile (0-100) of the target's own rewards a candidate must reach under "value". At 10,
    nine in ten images drawn from the target distribution pass while anything less typical of the
    target than its least typical tenth is refused (measured in BENCHMARKS.md, acceptance)."""
    max_accept: int | None = None
    """At most this many images accepted per iteration (the best), None for no cap."""
    accept_threshold: float | None = None
    """"top_fraction" rule: accept images with reward >= this; None uses only the top fraction."""
    accept_top_fraction: float = 0.5
    """"top_fraction" rule: fraction of a batch's candidates (best first) accepted when the threshold fails."""
    min_keep: int = 0
    """"top_fraction" rule: accept at least this many candidates per batch."""
    dedupe_threshold: float = 0.99
    """Cosine of `image_signature`s at or above which two images count as the same (within a
    batch, vs accepted). Measured on Fashion-MNIST: 0.95 would flag 43% of train images as copies
    of some test image, 0.99 flags 1% (the dataset's known near-duplicates)."""
    decontaminate_threshold: float = 0.99
    """Cosine of `image_signature`s at or above which a candidate counts as a copy of a probe
    test image."""
    chunk_size: int = DEFAULT_CHUNK
    """Candidates per faiss search call; bounds the extra memory of scoring."""

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.aggregate not in QUERY_AGGREGATES:
            raise ValueError(f"unknown aggregate {self.aggregate!r}; "
                             f"valid: {sorted(QUERY_AGGREGATES)}")
        if self.top_m < 1:
            raise ValueError(f"top_m must be >= 1, got {self.top_m}")
        if self.query not in QUERY_REWARDS:
            raise ValueError(f"unknown query reward {self.query!r}; valid: {', '.join(QUERY_REWARDS)}")
        if self.accept not in ACCEPT_RULES:
            raise ValueError(f"unknown accept rule {self.accept!r}; valid: {', '.join(ACCEPT_RULES)}")
        if not 0.0 <= self.accept_percentile <= 100.0:
            raise ValueError(f"accept_percentile must be in [0, 100], got {self.accept_percentile}")
        if self.background_queries < 0:
            raise ValueError(f"background_queries must be >= 0, got {self.background_queries}")
        if self.background_size < 0:
            raise ValueError(f"background_size must be >= 0, got {self.background_size}")
        if not 0.0 <= self.background_weight <= 1.0:
            raise ValueError(f"background_weight must be in [0, 1], got {self.background_weight}")
        if self.web_percentile is not None and not 0.0 <= self.web_percentile <= 100.0:
            raise ValueError(f"web_percentile must be None or in [0, 100], got {self.web_percentile}")
        if self.background_update not in BACKGROUND_UPDATES:
            raise ValueError(f"unknown background_update {self.background_update!r}; "
                             f"valid: {', '.join(BACKGROUND_UPDATES)}")
        if self.encoder not in REWARD_ENCODERS:
            raise ValueError(f"unknown reward encoder {self.encoder!r}; valid: {', '.join(REWARD_ENCODERS)}")
        if self.min_spread < 0:
            raise ValueError(f"min_spread must be >= 0, got {self.min_spread}")
        if self.max_accept is not None and self.max_accept < 0:
            raise ValueError(f"max_accept must be None or >= 0, got {self.max_accept}")
        if not math.isfinite(self.empty_query_reward):
            raise ValueError("empty_query_reward must be finite: policies must never see NaN/inf")
        if self.accept_threshold is not None and not -1.0 <= self.accept_threshold <= 1.0:
            raise ValueError(f"accept_threshold is a cosine, in [-1, 1]; got {self.accept_threshold}")
        if not 0.0 <= self.accept_top_fraction <= 1.0:
            raise ValueError(f"accept_top_fraction must be in [0, 1], got {self.accept_top_fraction}")
        if self.min_keep < 0:
            raise ValueError(f"min_keep must be >= 0, got {self.min_keep}")
        for name in ("dedupe_threshold", "decontaminate_threshold"):
            if not -1.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a cosine, in (-1, 1]; got {getattr(self, name)}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")

    def image_rewards(self, candidate_emb: np.ndarray, index: TargetIndex,
                      background: TargetIndex | None = None) -> np.ndarray:
        """contrast_reward with this config's k, background weight and chunk size."""
        return contrast_reward(candidate_emb, index, background, k=self.k, weight=self.background_weight,
                               chunk_size=self.chunk_size)

    def calibrate(self, index: TargetIndex, background: TargetIndex | None = None) -> RewardCalibration:
        """The target's own rewards under this config: the scale candidates are read on."""
        return RewardCalibration.of(index, self.k, background, self.background_weight)

    def space(self, target_emb: np.ndarray, background_emb: np.ndarray | None = None,
              web_emb: np.ndarray | None = None, encoder: str = "learner") -> RewardSpace:
        """The reward space of one encoder: target (N_t, D), background sample (N_b, D) and the
        web's first sample (N_w, D) embeddings (either may be None or empty). The centre is the web
        sample's mean (else the background's, else the target's); the calibration is the target's
        own rewards, offset by the web's reference (`web_offset`) when `web_percentile` is set."""
        has = [e for e in (web_emb, background_emb, target_emb) if e is not None and len(e)]
        centre = unit_rows(has[0]).mean(axis=0) if self.centre else None
        index = TargetIndex(centred(target_emb, centre))
        background = (TargetIndex(centred(background_emb, centre))
                      if background_emb is not None and len(background_emb) else None)
        calibration = self.calibrate(index, background)
        if self.web_percentile is not None and web_emb is not None and len(web_emb) > 1:
            weight = self.background_weight if background is not None else 0.0  # contrasted as candidates are
            web = web_rewards(TargetIndex(centred(web_emb, centre)), index, self.k, weight)
            calibration = RewardCalibration(calibration.reference, web_offset(
                calibration, web, self.accept_percentile, self.web_percentile))
        return RewardSpace(index, background, calibration, centre, self.k, self.background_weight,
                           mean_pairwise_cosine(target_emb), encoder)

    def query_reward(self, image_rewards: np.ndarray) -> float:
        """query_reward with this config's aggregate, top_m and empty-query reward."""
        return query_reward(image_rewards, how=self.aggregate, top_m=self.top_m,
                            empty=self.empty_query_reward)

    def image_values(self, rewards: np.ndarray, calibration: RewardCalibration) -> np.ndarray:
        """(M,) what a query whose results were all like each image would earn, on the scale of
        `query_rewards`: its percentile under `yield`, its reward under `aggregate`."""
        rewards = np.asarray(rewards, np.float64).reshape(-1)
        if self.query == "aggregate":
            return np.where(np.isfinite(rewards), rewards, self.empty_query_reward)
        return calibration.percentile(rewards)

    def query_rewards(self, rewards: np.ndarray, queries_of: list[list[int]], n_queries: int,
                      calibration: RewardCalibration, requested: int) -> list[float]:
        """One reward per query from the rewards (M,) of the candidates and which queries found each."""
        per_query = [[] for _ in range(n_queries)]
        for j, found_by in enumerate(queries_of):
            for qi in found_by:
                per_query[qi].append(rewards[j])
        if self.query == "aggregate":
            return [self.query_reward(np.asarray(r, np.float32)) for r in per_query]
        return query_yield([calibration.percentile(np.asarray(r)) for r in per_query], requested)

    def accept_mask(self, rewards: np.ndarray, calibration: RewardCalibration | None) -> np.ndarray:
        """Which candidates (M,) the reward lets into training -> bool (M,), before de-duplication."""
        rewards = np.asarray(rewards, dtype=np.float64).reshape(-1)
        if self.accept == "top_fraction":
            return select_for_training(rewards, threshold=self.accept_threshold,
                                       top_fraction=self.accept_top_fraction, min_keep=self.min_keep)
        if calibration is None:
            raise ValueError('the "value" accept rule needs the target\'s reward calibration')
        mask = np.isfinite(rewards) & (rewards >= calibration.threshold(self.accept_percentile))
        if self.max_accept is not None and mask.sum() > self.max_accept:
            best = np.argsort(-np.where(mask, rewards, -np.inf), kind="stable")[:self.max_accept]
            mask = np.zeros_like(mask)
            mask[best] = True
        return mask

    def select(self, rewards: np.ndarray, calibration: RewardCalibration | None, signatures,
               accepted: np.ndarray, held_out: np.ndarray | None = None) -> np.ndarray:
        """Indices of the candidates to accept, in order: `accept_mask`, then near-duplicate filters
        within the batch (best first), against `accepted` (signatures of everything accepted so far)
        and against `held_out` (signatures of an evaluation split, at `decontaminate_threshold`).
        `signatures(indices)` gives the candidates' near-duplicate signatures (N, D) unit rows,
        computed only for those the reward chose. Both modalities accept through here."""
        rewards = np.asarray(rewards)
        chosen = np.flatnonzero(self.accept_mask(rewards, calibration)) if len(rewards) else np.zeros(0, int)
        if len(chosen) == 0:
            return chosen
        chosen = chosen[np.argsort(-rewards[chosen], kind="stable")]  # best first for the greedy dedupe
        sig = signatures(chosen)
        keep = dedupe_within(sig, self.dedupe_threshold)
        if len(accepted):
            keep &= ~near_duplicates(sig, accepted, self.dedupe_threshold)
        if held_out is not None and len(held_out):
            keep &= ~near_duplicates(sig, held_out, self.decontaminate_threshold)
        return np.sort(chosen[keep])


def image_signature(images: torch.Tensor, side: int = 16) -> np.ndarray:
    """uint8 (N, 3, S, S) -> (N, side*side) unit vectors of mean-centred grey pixels.

    Near-duplicate tests use this fixed signature, not the learner's embedding: early in training
    the encoder maps most images close together, and a copy must be a copy under any encoder."""
    grey = images.float().mean(1, keepdim=True)
    small = F.interpolate(grey, size=(side, side), mode="area").flatten(1)
    small = small - small.mean(1, keepdim=True)
    sig = F.normalize(small, dim=1)
    # a flat image (every pixel alike) centres to zero: it gets the constant unit vector instead, the
    # same for every flat image and orthogonal to every centred signature, so blank copies count as
    # copies of each other (a query for 'gradient' once brought 40 blank images, all accepted)
    flat = small.abs().amax(dim=1) < 1e-6
    sig[flat] = 1.0 / side
    return sig.numpy().astype(np.float32)
