"""Assembles a text agent's parts from an `ExperimentConfig` (modality: text): the text web, the
concept vocabulary, the hidden topic ground truth, the query policy and document embeddings."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from explorer.run import agent
from explorer.run.config import ExperimentConfig
from explorer.web.text_corpus import TextCorpus, TextCorpusSpec, build_text_corpus, default_text_corpus_dir
from explorer.web.vocabulary import ConceptVocabulary
from policies.base import QueryPolicy


def open_text_corpus(cfg: ExperimentConfig, progress: bool = False) -> TextCorpus:
    """`corpus` if set, else the default text web over the installed leads, built on first use."""
    if cfg.corpus:
        return TextCorpus(cfg.corpus)
    root = default_text_corpus_dir(cfg.text.web_limit_per_topic)
    if (root / "corpus.json").exists():
        return TextCorpus(root)
    return build_text_corpus(root, TextCorpusSpec(limit_per_topic=cfg.text.web_limit_per_topic), progress=progress)


def text_vocabulary(cfg: ExperimentConfig, corpus: TextCorpus) -> ConceptVocabulary:
    """The configured vocabulary file, or WordNet nouns in the web's titles and descriptions plus
    `n_random` other nouns (cached beside the corpus). Never built from the target topic alone."""
    vc = cfg.vocabulary
    if vc.path:
        return ConceptVocabulary.load(vc.path)
    cached = corpus.root / f"vocabulary-r{vc.n_random}-s{vc.seed}.json"
    if cached.exists():
        return ConceptVocabulary.load(cached)
    headings = [f"{t} {d}" for t, d in zip(corpus.titles, corpus.descriptions)]
    vocab = ConceptVocabulary.from_captions(headings, n_random=vc.n_random, seed=vc.seed)
    vocab.save(cached)
    return vocab


@dataclass
class TopicTruth:
    """Hidden labels of the text web, for evaluation only: is a document URL on the target topic?"""

    corpus: TextCorpus
    topic: str

    def relevant(self, url: str) -> bool | None:
        i = self.corpus.index_of.get(url.rsplit("/", 1)[-1])
        return None if i is None else bool(self.corpus.hidden["topic"][i] == self.topic)

    def precision(self, urls: Sequence[str]) -> float | None:
        marks = [m for m in (self.relevant(u) for u in urls) if m is not None]
        return float(np.mean(marks)) if marks else None


def text_oracle_relevance(vocab: ConceptVocabulary, corpus: TextCorpus, topic: str, n: int) -> np.ndarray:
    """Evaluation only: share of target-topic documents among each concept's top-n local results."""
    from tqdm import tqdm

    from explorer.web.engine import HybridIndex
    from explorer.web.text_encoder import default_encoder

    digest = hashlib.sha256("\n".join(vocab.concepts).encode()).hexdigest()[:16]
    path = corpus.root / f"oracle-{digest}-{re.sub(r'[^a-z]+', '-', topic.lower())}-{n}.npy"
    if path.exists():
        return np.load(path)
    index = HybridIndex(corpus, default_encoder())
    on_topic = corpus.hidden["topic"] == topic
    scores = np.zeros(len(vocab), np.float64)
    for i, text in enumerate(tqdm(vocab.concepts, desc="oracle relevance", unit="concept")):
        hits, _ = index.search(text, 0, n)
        scores[i] = np.mean([on_topic[h.item] for h in hits]) if hits else 0.0
    np.save(path, scores)
    return scores


def build_text_policy(cfg: ExperimentConfig, vocab: ConceptVocabulary, corpus: TextCorpus) -> QueryPolicy:
    """The same registered policies as the image side, over the text web's vocabulary."""
    return agent.make_policy(cfg, vocab, corpus.root, lambda: text_oracle_relevance(
        vocab, corpus, cfg.text.topic, cfg.search.results_per_query))


@torch.no_grad()
def lm_embeddings(model, token_lists: Sequence[Sequence[int]], max_tokens: int, batch_size: int = 16) -> np.ndarray:
    """(N, H) unit rows: the LM's last hidden states, mean-pooled over each document's first
    `max_tokens` tokens. Right padding is safe under causal attention: real tokens never see it."""
    body = model.model  # the decoder stack without the LM head
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(token_lists), batch_size):
        chunk = [list(t[:max_tokens]) or [0] for t in token_lists[start:start + batch_size]]
        ids = torch.zeros(len(chunk), max(map(len, chunk)), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, tokens in enumerate(chunk):
            ids[j, :len(tokens)] = torch.tensor(tokens)
            mask[j, :len(tokens)] = 1
        ids, mask = ids.to(device), mask.to(device)
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state.float()  # (B, T, H)
        weights = mask.unsqueeze(-1).float()
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        out.append(F.normalize(pooled, dim=-1).cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, model.config.hidden_size), np.float32)
