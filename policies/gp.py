"""Gaussian-process query policy: regress query reward on the sentence embedding of the query.

Concepts whose texts embed close to well-rewarded queries are predicted to be rewarding too, so
the policy moves through the vocabulary towards regions that found useful data. Kernel:
ConstantKernel * RBF + WhiteKernel on MiniLM embeddings (unit vectors), targets standardised;
hyperparameters are fitted by scikit-learn's GaussianProcessRegressor (maximum marginal likelihood).

Acquisition (registry `ACQUISITIONS`):
- "softmax": n distinct draws from softmax(standardised predicted mean / temperature), done as
  Gumbel top-k with the policy RNG;
- "ucb": the n highest mean + beta * std.
By default untried concepts go before any repeat; `repeat_penalty` instead lets repeats compete,
handicapped by that many standard deviations of the score. `explore_share` of every batch (a
quarter by default) is drawn uniformly from the untried concepts: a first round that found nothing
of the target's kind leaves the GP exploiting whatever partial reward it did find (digits, for a
clothing target), and only queries far from everything tried so far get it out
(bench/exp_policy_simulation.py: with it, 60 of 60 simulated seeds find >= 2x random's relevant
images under UCB, 57 of 60 without).

How it stays fast with 80k concepts:
- The fit sees at most `max_observations` points: repeated queries are merged (mean reward) and
  only the most recent distinct queries are kept (rewards drift as the learner changes anyway).
  The optimiser runs a capped number of L-BFGS iterations, so a fit is O(iterations * M^3).
- Prediction for all N concepts does not go through sklearn's `predict`, whose RBF builds the
  (N, M) distance matrix with scipy's cdist: for N=80k, M=200 on the 2-core machine that took
  2.0 s, against 0.08 s for the float32 BLAS matmul used here instead (for unit vectors
  |a - b|^2 = 2 - 2 a.b). The posterior mean is then (N, M) @ alpha with sklearn's fitted
  `alpha_` and `L_`; `bench/bench_policy.py --sklearn-reference` prints both paths.
- The posterior std costs O(N M^2) (a triangular solve) and is computed only when UCB or
  `predict` needs it. Work is chunked over concepts so memory stays O(chunk * M), and predictions
  are cached until the next `update`.
A fit depends only on the log and the seed (the optimiser's random restarts are seeded from both),
so a policy loaded from a `state_dict` refits to the same model and proposes the same batch.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.optimize
from threadpoolctl import threadpool_limits

from policies.base import Query, register_policy
from policies.random_policy import FREE_TEXT, QueryLog, VocabularyPolicy, rank_untried_first


@dataclass(frozen=True, kw_only=True)
class GPConfig:
    acquisition: str = "softmax"  # a key of ACQUISITIONS
    temperature: float = 0.25  # softmax temperature on the standardised predicted reward
    ucb_beta: float = 2.0  # UCB = mean + beta * std, both in reward units
    explore_first: int = 8  # uniform random queries before the GP is trusted
    explore_share: float = 0.25  # share of every later batch drawn uniformly from untried concepts
    repeat_penalty: float | None = None  # None: untried concepts first; else handicap for repeats
    max_observations: int = 256  # the GP is fitted on at most this many distinct queries
    length_scale: float = 0.7  # initial RBF length scale; chord distances on the sphere are in [0, 2]
    # Bounds of the fitted length scale; None: (median nearest-neighbour chord distance of the
    # concepts, 2). Below the typical gap between neighbouring concepts every untried concept
    # would get the prior mean and the GP would propose what the random policy proposes.
    length_scale_bounds: tuple[float, float] | None = None
    # Largest noise variance (standardised reward units) the fit may choose. Rewards of a query are
    # nearly deterministic given the encoder; with a few hits among many zeros the marginal
    # likelihood otherwise can explain the hits away as noise and predict nothing.
    max_noise: float = 0.5
    # Hear the rewards of the run's background queries (random vocabulary queries whose results the
    # reward contrasts with) before the first batch (`observe`): evidence fetched anyway, so a first
    # batch can already follow it instead of being uniform. Better in all 4 pre-registered pairs of
    # BENCHMARKS.md ("own targets on the world web"); on in configs/demo.yaml, off by default so that
    # the other configs' committed results, measured without it, still reproduce.
    observe_background: bool = False
    # After each round, hear the captions of up to this many of its best-scored fetched images
    # (distinct, non-empty, scored above 0) as free-text observations; 0: off. Each is worth what a
    # query returning only images like it would earn (RewardConfig.image_values). A kind the
    # policy's queries only graze (a few shoes among what *photo* fetched) names itself in its
    # captions ("kids' ankle boot"), and the prediction rises at the concepts near those words.
    caption_feedback: int = 0
    optimizer_restarts: int = 1  # extra random starts of the marginal-likelihood optimiser
    optimizer_iterations: int = 60  # L-BFGS iteration cap per start

    def __post_init__(self):
        if self.acquisition not in ACQUISITIONS:
            raise ValueError(f"unknown acquisition {self.acquisition!r}; "
                             f"valid: {', '.join(sorted(ACQUISITIONS))}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.ucb_beta < 0:
            raise ValueError(f"ucb_beta must be >= 0, got {self.ucb_beta}")
        if self.explore_first < 0:
            raise ValueError(f"explore_first must be >= 0, got {self.explore_first}")
        if not 0.0 <= self.explore_share <= 1.0:
            raise ValueError(f"explore_share must be in [0, 1], got {self.explore_share}")
        if self.repeat_penalty is not None and not self.repeat_penalty >= 0:
            raise ValueError(f"repeat_penalty must be None or >= 0, got {self.repeat_penalty}")
        if self.max_observations < 2:
            raise ValueError(f"max_observations must be >= 2, got {self.max_observations}")
        if not 0.05 <= self.length_scale <= 5.0:
            raise ValueError(f"length_scale must lie in [0.05, 5], got {self.length_scale}")
        if self.length_scale_bounds is not None:
            lo, hi = self.length_scale_bounds
            if not 0 < lo <= hi:
                raise ValueError(f"length_scale_bounds must satisfy 0 < low <= high, got {self.length_scale_bounds}")
        if not 0 < self.max_noise <= 10:
            raise ValueError(f"max_noise must be in (0, 10], got {self.max_noise}")
        if self.caption_feedback < 0:
            raise ValueError(f"caption_feedback must be >= 0, got {self.caption_feedback}")
        if self.optimizer_restarts < 0 or self.optimizer_iterations < 1:
            raise ValueError("optimizer_restarts must be >= 0 and optimizer_iterations >= 1")


# ---------------------------------------------------------------- pure GP math

@dataclass(frozen=True)
class FittedGP:
    """A fitted GP in standardised target units: y = target_mean + target_scale * f."""

    points: np.ndarray  # (M, D) float32 unit vectors
    alpha: np.ndarray  # (M,) (K + noise I)^-1 y
    cholesky: np.ndarray  # (M, M) lower factor of K + noise I
    amplitude: float  # prior variance of f
    length_scale: float
    noise: float
    target_mean: float
    target_scale: float


def rbf_on_sphere(a: np.ndarray, b: np.ndarray, amplitude: float, length_scale: float) -> np.ndarray:
    """amplitude * exp(-|a - b|^2 / (2 l^2)) for unit vectors a (B, D), b (M, D) -> (B, M) float64."""
    # -|a - b|^2 / (2 l^2) = (a.b - 1) / l^2; float32 BLAS for the dot, float64 for the rest,
    # updated in place because at (8192, M) every temporary costs as much as the matmul.
    k = (a @ b.T).astype(np.float64)
    np.minimum(k, 1.0, out=k)
    k -= 1.0
    k *= 1.0 / length_scale**2
    np.exp(k, out=k)
    k *= amplitude
    return k


def _bounded_lbfgs(obj_func, initial_theta, bounds, max_iterations: int):
    result = scipy.optimize.minimize(obj_func, initial_theta, method="L-BFGS-B", jac=True,
                                     bounds=bounds, options={"maxiter": max_iterations})
    return result.x, result.fun


def neighbour_gap(vectors: np.ndarray, sample: int = 2000, seed: int = 0) -> float:
    """Median chord distance from a concept to its nearest other concept, over a seeded sample."""
    rows = np.random.default_rng(seed).choice(len(vectors), min(sample, len(vectors)), replace=False)
    nearest = np.empty(len(rows))
    for start in range(0, len(rows), 256):  # (256, N) cosines at a time
        chunk = rows[start:start + 256]
        cos = vectors[chunk] @ vectors.T
        cos[np.arange(len(chunk)), chunk] = -np.inf  # not itself
        nearest[start:start + len(chunk)] = np.minimum(cos.max(axis=1), 1.0)
    return float(np.median(np.sqrt(np.maximum(2.0 - 2.0 * nearest, 0.0))))


def fit_gp(points: np.ndarray, targets: np.ndarray, config: GPConfig, random_state: int,
           length_scale_bounds: tuple[float, float] = (0.05, 5.0)) -> FittedGP:
    """Maximum-marginal-likelihood fit of ConstantKernel * RBF + WhiteKernel on (M, D) unit vectors."""
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

    # The prior mean is the median reward, not the mean: most queries find nothing, and with the mean
    # an untried concept far from everything would be predicted above the ones next to the zeros
    # (mean > 0), so the GP would chase distance instead of the neighbourhoods of its hits.
    mean = float(np.median(targets))
    scale = float(targets.std()) if len(targets) > 1 and targets.std() > 1e-12 else 1.0
    lo, hi = length_scale_bounds
    kernel = (ConstantKernel(1.0, (1e-2, 1e2)) * RBF(float(np.clip(config.length_scale, lo, hi)), (lo, hi))
              + WhiteKernel(0.1, (1e-4, config.max_noise)))
    optimizer = functools.partial(_bounded_lbfgs, max_iterations=config.optimizer_iterations)
    gp = GaussianProcessRegressor(kernel, normalize_y=False, optimizer=optimizer,
                                  n_restarts_optimizer=config.optimizer_restarts,
                                  random_state=random_state)
    # (M, M) algebra is too small to gain from BLAS threads, and on a busy machine spinning
    # threads made a fit 10-30x slower; one thread keeps it at about 1 s for M = 200.
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore")  # hyperparameters at a bound are expected with few points
        gp.fit(points, (targets - mean) / scale)
    signal, white = gp.kernel_.k1, gp.kernel_.k2
    return FittedGP(points=points, alpha=gp.alpha_, cholesky=gp.L_,
                    amplitude=float(signal.k1.constant_value),
                    length_scale=float(signal.k2.length_scale), noise=float(white.noise_level),
                    target_mean=mean, target_scale=scale)


def gp_posterior(gp: FittedGP, vectors: np.ndarray, with_std: bool,
                 chunk: int = 8192) -> tuple[np.ndarray, np.ndarray | None]:
    """Posterior mean and latent std (noise excluded) in reward units at (N, D) unit vectors."""
    mean = np.empty(len(vectors))
    std = np.empty(len(vectors)) if with_std else None
    for start in range(0, len(vectors), chunk):
        rows = slice(start, start + chunk)
        cross = rbf_on_sphere(vectors[rows], gp.points, gp.amplitude, gp.length_scale)  # (B, M)
        mean[rows] = cross @ gp.alpha
        if with_std:
            v = scipy.linalg.solve_triangular(gp.cholesky, cross.T, lower=True, check_finite=False)
            std[rows] = np.sqrt(np.maximum(gp.amplitude - np.einsum("mb,mb->b", v, v), 0.0))
    mean = gp.target_mean + gp.target_scale * mean
    return mean, (None if std is None else gp.target_scale * std)


def standardise(x: np.ndarray) -> np.ndarray:
    spread = x.std()
    return (x - x.mean()) / spread if spread > 1e-12 else np.zeros_like(x)


# ---------------------------------------------------------------- acquisition registry

def _repeat_handicap(tried: np.ndarray, config: GPConfig) -> np.ndarray | float:
    return 0.0 if config.repeat_penalty is None else config.repeat_penalty * tried


def softmax_scores(mean, std, tried, config: GPConfig, rng: np.random.Generator) -> np.ndarray:
    """Gumbel-perturbed logits: their top n are n draws without replacement from the softmax."""
    logits = (standardise(mean) - _repeat_handicap(tried, config)) / config.temperature
    return logits + rng.gumbel(size=len(logits))


def ucb_scores(mean, std, tried, config: GPConfig, rng: np.random.Generator) -> np.ndarray:
    return standardise(mean + config.ucb_beta * std) - _repeat_handicap(tried, config)


@dataclass(frozen=True)
class Acquisition:
    score: Callable[..., np.ndarray]
    needs_std: bool


ACQUISITIONS: dict[str, Acquisition] = {
    "softmax": Acquisition(softmax_scores, needs_std=False),
    "ucb": Acquisition(ucb_scores, needs_std=True),
}


# ---------------------------------------------------------------- the policy

def latest_distinct(log: QueryLog, limit: int) -> tuple[list[int | str], np.ndarray]:
    """Merge repeats of a query (mean reward); keep the `limit` most recently issued ones.

    A vocabulary query is keyed by its concept id, a free-text query by its text.
    """
    totals: dict[int | str, list[float]] = {}
    for concept, text, reward in zip(log.concepts, log.texts, log.rewards):
        key = text if concept == FREE_TEXT else concept
        sums = totals.pop(key, [0.0, 0.0])  # re-insert so dict order follows the latest issue
        totals[key] = [sums[0] + reward, sums[1] + 1.0]
    keys = list(totals)[-limit:]
    return keys, np.array([totals[k][0] / totals[k][1] for k in keys])


@register_policy("gp")
class GPPolicy(VocabularyPolicy):
    """GP regression of reward on query embeddings; proposes by softmax sampling or UCB."""

    config_class = GPConfig

    def __init__(self, concepts: Sequence[str], seed: int = 0, embeddings: np.ndarray | None = None,
                 text_encoder: Callable[[list[str]], np.ndarray] | None = None, **config):
        super().__init__(concepts, seed)
        self.config = GPConfig(**config)
        self._encode = text_encoder
        if embeddings is None:
            embeddings = self._encoder()(self.concepts)
        self.embeddings = _unit_rows(np.asarray(embeddings, dtype=np.float32))  # (N, D)
        if self.embeddings.shape[0] != len(self.concepts):
            raise ValueError(f"{self.embeddings.shape[0]} embeddings for {len(self.concepts)} concepts")
        bounds = self.config.length_scale_bounds
        if bounds is None:  # from the vocabulary's own geometry (fixed for the policy's life)
            bounds = (neighbour_gap(self.embeddings), 2.0) if len(self.concepts) > 1 else (0.05, 5.0)
        self.length_scale_bounds = (min(bounds[0], bounds[1]), bounds[1])
        self.text_vectors: dict[str, np.ndarray] = {}  # free-text query -> (D,) unit vector
        self._log_changed()

    def _encoder(self) -> Callable[[list[str]], np.ndarray]:
        if self._encode is None:
            from explorer.web.text_encoder import default_encoder
            self._encode = default_encoder().encode
        return self._encode

    def _log_changed(self) -> None:
        self._fitted: FittedGP | None = None
        self._prediction: tuple[np.ndarray, np.ndarray | None] | None = None

    def update(self, queries: list[Query], rewards: list[float]) -> None:
        new_texts = sorted({q.text for q in queries if q.concept is None} - set(self.text_vectors))
        vectors = (_unit_rows(np.asarray(self._encoder()(new_texts), dtype=np.float32))
                   if new_texts else [])  # encoded first: a failure leaves the log untouched
        super().update(queries, rewards)
        self.text_vectors.update(zip(new_texts, vectors))
        self._log_changed()

    def observe(self, queries: list[Query], rewards: list[float]) -> bool:
        """Rewards of queries the run issued that the policy did not choose (the background sample's):
        the same evidence as its own, if `observe_background`. Returns whether they were taken."""
        if not self.config.observe_background:
            return False
        self.update(queries, rewards)
        return True

    @property
    def captions_wanted(self) -> int:
        """How many of a round's best-scored captions the loop hands to `observe_captions`."""
        return self.config.caption_feedback

    def observe_captions(self, captions: list[str], values: list[float]) -> bool:
        """Captions of a round's best-scored images, each heard as a free-text query worth `values`,
        if `caption_feedback`. They inform the GP's fit; proposals stay vocabulary concepts."""
        if not self.config.caption_feedback or not captions:
            return False
        self.update([Query(c) for c in captions], values)
        return True

    def fitted(self) -> FittedGP:
        """The GP fitted on the latest distinct observations (refit lazily after each update)."""
        if len(self.log) == 0:
            raise ValueError("the GP has no observations yet")
        if self._fitted is None:
            keys, targets = latest_distinct(self.log, self.config.max_observations)
            points = np.stack([self.text_vectors[k] if isinstance(k, str) else self.embeddings[k]
                               for k in keys])
            # Seeded by (seed, log length): a refit after load_state_dict gives the same model.
            restarts_seed = np.random.SeedSequence([self.seed, len(self.log)])
            random_state = int(restarts_seed.generate_state(1)[0])
            self._fitted = fit_gp(points, targets, self.config, random_state, self.length_scale_bounds)
        return self._fitted

    def predict(self, indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and latent std of the reward of concepts `indices` (default: all)."""
        vectors = self.embeddings if indices is None else self.embeddings[np.asarray(indices)]
        return gp_posterior(self.fitted(), vectors, with_std=True)

    def _predict_all(self, with_std: bool) -> tuple[np.ndarray, np.ndarray | None]:
        if self._prediction is None or (with_std and self._prediction[1] is None):
            self._prediction = gp_posterior(self.fitted(), self.embeddings, with_std)
        return self._prediction

    def propose(self, n: int) -> list[Query]:
        self._check_batch(n)
        tried = self.log.tried
        if len(self.log) < max(1, self.config.explore_first) or np.ptp(self.log.rewards) < 1e-12:
            # Before `explore_first` queries, or while every query earned the same (typically: nothing
            # found yet), the GP has nothing to rank by; UCB would chase the most isolated concepts
            # of the embedding space, so explore uniformly, as the random policy does.
            flat = np.zeros(len(self.concepts))
            return self._queries(rank_untried_first(flat, tried, n, self.rng))
        acquisition = ACQUISITIONS[self.config.acquisition]
        mean, std = self._predict_all(with_std=acquisition.needs_std)
        scores = acquisition.score(mean, std, tried, self.config, self.rng)
        if self.config.repeat_penalty is not None:  # repeats compete, handicapped in `scores`
            tried = np.zeros_like(tried)
        explore = int(round(self.config.explore_share * n))
        chosen = rank_untried_first(scores, tried, n - explore, self.rng)
        if explore:  # the rest uniformly among the concepts not chosen, untried first
            taken, flat = tried.copy(), np.zeros(len(scores))
            taken[chosen], flat[chosen] = True, -np.inf
            chosen = np.concatenate([chosen, rank_untried_first(flat, taken, explore, self.rng)])
        return self._queries(chosen)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["text_vectors"] = {t: v.tolist() for t, v in self.text_vectors.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.text_vectors = {t: np.asarray(v, dtype=np.float32)
                             for t, v in state["text_vectors"].items()}


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (the RBF-by-matmul identity needs it); no copy if already so."""
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.allclose(norms, 1.0, atol=1e-3):
        return x
    return x / np.maximum(norms, 1e-12)
