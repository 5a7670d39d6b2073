"""Assembles an agent's parts from an `ExperimentConfig`: vocabulary, target, learner, policy,
and the hidden ground truth that only evaluation reads."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from explorer.config import ExperimentConfig
from explorer.corpus import WebCorpus, default_corpus_dir
from explorer.target import TargetSet
from explorer.vocabulary import ConceptVocabulary
from learners.mixture import TrainingMixture
from learners.moco import MoCoLearner
from policies.base import QueryPolicy, build_policy


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


def concept_embeddings(vocab: ConceptVocabulary, cache_dir: Path | None) -> np.ndarray:
    """MiniLM embeddings of the concept texts, cached by vocabulary digest."""
    from explorer.text_encoder import default_encoder

    path = cache_dir / f"concept-emb-{_digest(vocab.concepts)}.npy" if cache_dir else None
    if path is not None and path.exists():
        return np.load(path)
    emb = default_encoder().encode(list(vocab.concepts), progress=True)
    if path is not None:
        np.save(path, emb)
    return emb


@dataclass
class GroundTruth:
    """Hidden labels of the local web, for evaluation only: is an image URL target-relevant?"""

    corpus: WebCorpus
    relevant_source: str          # e.g. 'fashion-mnist'
    relevant_classes: frozenset   # for users' webs: class folders that are target classes

    def item(self, url: str) -> int | None:
        return self.corpus.index_of.get(url.rsplit("/", 1)[-1])

    def relevant(self, url: str) -> bool | None:
        i = self.item(url)
        if i is None:
            return None
        h = self.corpus.hidden
        return bool(h["source"][i] == self.relevant_source or h["class_name"][i] in self.relevant_classes)

    def precision(self, urls: list[str]) -> float | None:
        marks = [m for m in (self.relevant(u) for u in urls) if m is not None]
        return float(np.mean(marks)) if marks else None


def ground_truth(cfg: ExperimentConfig, corpus: WebCorpus | None, target: TargetSet) -> GroundTruth | None:
    if corpus is None:
        return None
    return GroundTruth(corpus, cfg.target.name, frozenset(target.class_names) if cfg.target.name != "fashion-mnist"
                       else frozenset())


def oracle_relevance(vocab: ConceptVocabulary, corpus: WebCorpus, truth: GroundTruth, n: int) -> np.ndarray:
    """Evaluation only: share of target-relevant items among each concept's top-n local results."""
    from tqdm import tqdm

    from explorer.engine import HybridIndex
    from explorer.text_encoder import default_encoder

    path = corpus.root / f"oracle-{_digest(vocab.concepts)}-{truth.relevant_source}-{n}.npy"
    if path.exists():
        return np.load(path)
    index = HybridIndex(corpus, default_encoder())
    h = corpus.hidden
    scores = np.zeros(len(vocab), np.float64)
    for i, text in enumerate(tqdm(vocab.concepts, desc="oracle relevance", unit="concept")):
        hits, _ = index.search(text, 0, n)
        if hits:
            scores[i] = np.mean([h["source"][x.item] == truth.relevant_source or
                                 h["class_name"][x.item] in truth.relevant_classes for x in hits])
    np.save(path, scores)
    return scores


def build_agent_policy(cfg: ExperimentConfig, vocab: ConceptVocabulary, corpus: WebCorpus | None,
                       truth: GroundTruth | None) -> QueryPolicy:
    kwargs = dict(cfg.policy.options)
    if cfg.policy.name in ("gp", "hybrid"):  # both rank concepts by their MiniLM embeddings
        kwargs.setdefault("embeddings", concept_embeddings(vocab, corpus.root if corpus else None))
    if cfg.policy.name == "oracle":
        if truth is None:
            raise ValueError("the oracle policy needs the local corpus's hidden ground truth")
        kwargs["relevance"] = oracle_relevance(vocab, corpus, truth, cfg.search.results_per_query)
    try:
        return build_policy(cfg.policy.name, concepts=list(vocab.concepts), seed=cfg.seed, **kwargs)
    except TypeError as e:
        raise ValueError(f"policy.options: {e}") from e


def build_learner(cfg: ExperimentConfig, target: TargetSet) -> MoCoLearner:
    acquire, _ = target.part("acquire")
    return MoCoLearner(cfg.learner, mixture=TrainingMixture(acquire, cfg.mixture))


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)
