"""The parts both modalities assemble the same way from an `ExperimentConfig`: the concept
vocabulary (WordNet nouns of the web's own headings), its MiniLM embeddings, the hidden ground truth
that only evaluation reads, the oracle's per-concept relevance and the query policy. What differs
(the corpus and target, the learner, the truth's labels) is in the modality's file
(`explorer.run.image`, `explorer.run.text`)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from explorer.run.config import ExperimentConfig
from explorer.web.vocabulary import ConceptVocabulary
from policies import QueryPolicy, build_policy, searches_by_image, split_policy_options

log = logging.getLogger(__name__)

LLM_POLICIES = ("ppo", "llm-prompt", "hybrid")


def digest(texts: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]


def load_vocabulary(cfg: ExperimentConfig, root: Path | None, headings: Callable[[], Sequence[str]]) -> ConceptVocabulary:
    """The configured vocabulary file, or WordNet nouns found in the web's `headings()` (captions,
    titles) plus `vocabulary.n_random` other nouns, cached under `root`. Never built from the
    target's labels or topic."""
    vc = cfg.vocabulary
    if vc.path:
        return ConceptVocabulary.load(vc.path)
    if root is None:
        raise ValueError("vocabulary.path is required when the run has no local corpus")
    cached = Path(root) / f"vocabulary-r{vc.n_random}-s{vc.seed}.json"
    if cached.exists():
        return ConceptVocabulary.load(cached)
    vocab = ConceptVocabulary.from_captions(headings(), n_random=vc.n_random, seed=vc.seed)
    vocab.save(cached)
    return vocab


def concept_embeddings(vocab: ConceptVocabulary, cache_dir: Path | None, glosses: bool = True) -> np.ndarray:
    """MiniLM embeddings of the concepts (with their WordNet glosses), cached by the texts' digest."""
    from explorer.web.text_encoder import default_encoder

    texts = vocab.descriptions() if glosses else list(vocab.concepts)
    path = cache_dir / f"concept-emb-{digest(texts)}.npy" if cache_dir else None
    if path is not None and path.exists():
        return np.load(path)
    emb = default_encoder().encode(texts, progress=True)
    if path is not None:
        np.save(path, emb)
    return emb


class HiddenTruth:
    """Hidden labels of a local web, for evaluation only: is the item behind a URL target-relevant?
    A modality says which of its corpus' items are (`is_relevant`); `name` keys the oracle's cache."""

    corpus: object  # a WebCorpus or TextCorpus: `index_of` (key -> item), `root`
    name: str

    def is_relevant(self, i: int) -> bool:
        raise NotImplementedError

    def item(self, url: str) -> int | None:
        return self.corpus.index_of.get(url.rsplit("/", 1)[-1])

    def relevant(self, url: str) -> bool | None:
        i = self.item(url)
        return None if i is None else self.is_relevant(i)

    def base_rate(self) -> float:
        """The share of the web's items of the target's kind: what a uniform draw finds relevant."""
        return float(np.mean([self.is_relevant(i) for i in range(len(self.corpus))]))

    def precision(self, urls: Sequence[str]) -> float | None:
        marks = [m for m in (self.relevant(u) for u in urls) if m is not None]
        return float(np.mean(marks)) if marks else None

    def separation(self, urls: Sequence[str], rewards: np.ndarray) -> float | None:
        """ROC AUC of `rewards` (M,) for telling the target's kind from the rest among `urls` (M,):
        how well the reward ranks what was fetched (0.5: no better than chance); None while only
        one side is present."""
        from sklearn.metrics import roc_auc_score

        marks = [self.relevant(u) for u in urls]
        known = [j for j, m in enumerate(marks) if m is not None]
        labels = [marks[j] for j in known]
        if len(set(labels)) < 2:
            return None
        return float(roc_auc_score(labels, np.asarray(rewards, np.float64)[known]))


def oracle_relevance(vocab: ConceptVocabulary, truth: HiddenTruth, n: int) -> np.ndarray:
    """Evaluation only: share of target-relevant items among each concept's top-n local results
    (0 for a concept with none), cached beside the corpus."""
    from tqdm import tqdm

    from explorer.web.engine import HybridIndex
    from explorer.web.text_encoder import default_encoder

    path = truth.corpus.root / f"oracle-{digest(vocab.concepts)}-{truth.name}-{n}.npy"
    if path.exists():
        return np.load(path)
    index = HybridIndex(truth.corpus, default_encoder())
    scores = np.zeros(len(vocab), np.float64)
    for i, text in enumerate(tqdm(vocab.concepts, desc="oracle relevance", unit="concept")):
        hits, _ = index.search(text, 0, n)
        if hits:
            scores[i] = np.mean([truth.is_relevant(x.item) for x in hits])
    np.save(path, scores)
    return scores


def make_policy(cfg: ExperimentConfig, vocab: ConceptVocabulary, cache_dir: Path | None,
                truth: HiddenTruth | None, description: str, target_images=None) -> QueryPolicy:
    """The configured policy over `vocab` (image and text side alike). Options meant for another
    policy are dropped with a warning; LLM policies are told the target's `description`; the oracle
    reads `truth`'s per-concept relevance; a policy that queries by example gets `target_images`."""
    kwargs, ignored = split_policy_options(cfg.policy.name, dict(cfg.policy.options))
    if ignored:  # e.g. the demo's gp options after `--set policy.name=random`
        log.warning("policy.options %s do not apply to the %s policy and are ignored",
                    ", ".join(ignored), cfg.policy.name)
    if cfg.policy.name in LLM_POLICIES:  # the LM's prompt says what to find
        kwargs.setdefault("target_description", description)
    if cfg.policy.name in ("gp", "hybrid"):  # both rank concepts by their MiniLM embeddings
        kwargs.setdefault("embeddings", concept_embeddings(vocab, cache_dir, cfg.vocabulary.glosses))
    if cfg.policy.name == "oracle":
        if truth is None:
            raise ValueError("the oracle policy needs the local web's hidden ground truth")
        kwargs["relevance"] = oracle_relevance(vocab, truth, cfg.search.results_per_query)
    if searches_by_image(cfg.policy.name):
        kwargs["target_images"] = target_images
    try:
        return build_policy(cfg.policy.name, concepts=list(vocab.concepts), seed=cfg.seed, **kwargs)
    except TypeError as e:
        raise ValueError(f"policy.options: {e}") from e
