"""Assembles an agent's parts from an `ExperimentConfig`: vocabulary, target, learner, policy,
and the hidden ground truth that only evaluation reads."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from explorer.run.config import ExperimentConfig
from explorer.score.target import TargetSet
from explorer.web.corpus import WebCorpus, default_corpus_dir
from explorer.web.vocabulary import ConceptVocabulary
from learners.mixture import TrainingMixture
from learners.moco import MoCoLearner
from policies import QueryPolicy, build_policy, split_policy_options

log = logging.getLogger(__name__)


def open_corpus(cfg: ExperimentConfig) -> WebCorpus:
    return WebCorpus(cfg.corpus or default_corpus_dir())


def _digest(texts) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]


def load_vocabulary(cfg: ExperimentConfig, corpus: WebCorpus | None) -> ConceptVocabulary:
    """The configured vocabulary file, or WordNet nouns found in the web's captions + a random
    sample of the other nouns (cached beside the corpus). Never built from target labels."""
    vc = cfg.vocabulary
    if vc.path:
        return ConceptVocabulary.load(vc.path)
    if corpus is None:
        raise ValueError("vocabulary.path is required when the run has no local corpus")
    cached = corpus.root / f"vocabulary-r{vc.n_random}-s{vc.seed}.json"
    if cached.exists():
        return ConceptVocabulary.load(cached)
    vocab = ConceptVocabulary.from_captions(corpus.distinct_captions, n_random=vc.n_random, seed=vc.seed)
    vocab.save(cached)
    return vocab


def concept_embeddings(vocab: ConceptVocabulary, cache_dir: Path | None, glosses: bool = True) -> np.ndarray:
    """MiniLM embeddings of the concepts (with their WordNet glosses), cached by the texts' digest."""
    from explorer.web.text_encoder import default_encoder

    texts = vocab.descriptions() if glosses else list(vocab.concepts)
    path = cache_dir / f"concept-emb-{_digest(texts)}.npy" if cache_dir else None
    if path is not None and path.exists():
        return np.load(path)
    emb = default_encoder().encode(texts, progress=True)
    if path is not None:
        np.save(path, emb)
    return emb


@dataclass
class GroundTruth:
    """Hidden labels of the local web, for evaluation only: is an image URL target-relevant?"""

    corpus: WebCorpus
    relevant_kinds: frozenset   # hidden sources ('fashion-mnist') or classes ('animals') of the target's kind

    def item(self, url: str) -> int | None:
        return self.corpus.index_of.get(url.rsplit("/", 1)[-1])

    def is_relevant(self, i: int) -> bool:
        h = self.corpus.hidden
        return bool(h["source"][i] in self.relevant_kinds or h["class_name"][i] in self.relevant_kinds)

    def relevant(self, url: str) -> bool | None:
        i = self.item(url)
        return None if i is None else self.is_relevant(i)

    def precision(self, urls: list[str]) -> float | None:
        marks = [m for m in (self.relevant(u) for u in urls) if m is not None]
        return float(np.mean(marks)) if marks else None


def ground_truth(cfg: ExperimentConfig, corpus: WebCorpus | None) -> GroundTruth | None:
    """The local web's hidden truth about the target's kind, or None where there is none to read."""
    kinds = cfg.target.relevant
    if kinds is None and cfg.target.name == "fashion-mnist":
        kinds = ("fashion-mnist",)
    if corpus is None or not kinds:
        return None
    return GroundTruth(corpus, frozenset(kinds))


def oracle_relevance(vocab: ConceptVocabulary, corpus: WebCorpus, truth: GroundTruth, n: int) -> np.ndarray:
    """Evaluation only: share of target-relevant items among each concept's top-n local results."""
    from tqdm import tqdm

    from explorer.web.engine import HybridIndex
    from explorer.web.text_encoder import default_encoder

    path = corpus.root / f"oracle-{_digest(vocab.concepts)}-{_digest(sorted(truth.relevant_kinds))}-{n}.npy"
    if path.exists():
        return np.load(path)
    index = HybridIndex(corpus, default_encoder())
    scores = np.zeros(len(vocab), np.float64)
    for i, text in enumerate(tqdm(vocab.concepts, desc="oracle relevance", unit="concept")):
        hits, _ = index.search(text, 0, n)
        if hits:
            scores[i] = np.mean([truth.is_relevant(x.item) for x in hits])
    np.save(path, scores)
    return scores


LLM_POLICIES = ("ppo", "llm-prompt", "hybrid")


def target_description(cfg: ExperimentConfig) -> str:
    """What the target is, in words, for an LLM policy's prompt (`policy.options.target_description`
    overrides it): the topic on the text side; Fashion-MNIST's own description, or the target folder's
    name and its class subfolders on the image side."""
    if cfg.modality == "text":
        return f"encyclopedia articles on {cfg.text.topic.lower()}"
    if cfg.target.name == "fashion-mnist":
        return "product photos of clothes, shoes and bags on a plain background"
    folder = Path(cfg.target.name)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())[:10] if folder.is_dir() else []
    return f"images like {folder.name}" + (f" ({', '.join(classes)})" if classes else "")


def make_policy(cfg: ExperimentConfig, vocab: ConceptVocabulary, cache_dir: Path | None,
                relevance: Callable[[], np.ndarray] | None) -> QueryPolicy:
    """The configured policy over `vocab` (image and text side alike). Options meant for another
    policy are dropped with a warning; `relevance` gives the oracle its hidden per-concept scores."""
    kwargs, ignored = split_policy_options(cfg.policy.name, dict(cfg.policy.options))
    if ignored:  # e.g. the demo's gp options after `--set policy.name=random`
        log.warning("policy.options %s do not apply to the %s policy and are ignored",
                    ", ".join(ignored), cfg.policy.name)
    if cfg.policy.name in LLM_POLICIES:  # the LM's prompt says what to find
        kwargs.setdefault("target_description", target_description(cfg))
    if cfg.policy.name in ("gp", "hybrid"):  # both rank concepts by their MiniLM embeddings
        kwargs.setdefault("embeddings", concept_embeddings(vocab, cache_dir, cfg.vocabulary.glosses))
    if cfg.policy.name == "oracle":
        if relevance is None:
            raise ValueError("the oracle policy needs the local web's hidden ground truth")
        kwargs["relevance"] = relevance()
    try:
        return build_policy(cfg.policy.name, concepts=list(vocab.concepts), seed=cfg.seed, **kwargs)
    except TypeError as e:
        raise ValueError(f"policy.options: {e}") from e


def build_agent_policy(cfg: ExperimentConfig, vocab: ConceptVocabulary, corpus: WebCorpus | None,
                       truth: GroundTruth | None) -> QueryPolicy:
    relevance = None
    if truth is not None:
        relevance = lambda: oracle_relevance(vocab, corpus, truth, cfg.search.results_per_query)  # noqa: E731
    return make_policy(cfg, vocab, corpus.root if corpus else None, relevance)


def build_learner(cfg: ExperimentConfig, target: TargetSet, store=None) -> MoCoLearner:
    """The learner on a mixture of the target's acquire split (accepted images kept in `store`, by
    default in memory); an unset `learner.total_steps` is the run's own step count, so that the lr
    and momentum schedules end where the run ends."""
    acquire, _ = target.part("acquire")
    learner_cfg = cfg.learner
    if learner_cfg.total_steps is None:
        steps = cfg.train.pretrain_steps + cfg.iterations * cfg.train.steps_per_iteration
        learner_cfg = dataclasses.replace(learner_cfg, total_steps=max(steps, learner_cfg.warmup_steps, 1))
    return MoCoLearner(learner_cfg, mixture=TrainingMixture(acquire, cfg.mixture, store=store))


