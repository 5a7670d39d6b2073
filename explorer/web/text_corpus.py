"""The offline text "web": Wikipedia lead sections as documents, served by the same local engine.

Layout of a text corpus directory:

    documents.parquet  one row per document: key, title, description, extract, and the hidden
                       ground truth `topic` (never served; only evaluation and the oracle read it)
    doc_emb.npy        (n_docs, 384) float16 MiniLM embeddings of each served document's text
                       (the engine's dense side; the reward's view of target and held-out documents)
    corpus.json        build parameters and counts; written last, so its presence marks a full build

A document is served at /doc/KEY as `document_text(lead)` (title, blank line, extract). The engine
ranks BM25 over its search text (title, description and extract) and MiniLM over its served text
(the encoder reads the first 64 tokens).

The target of a text run is one topic's documents, split three ways with a seeded RNG
(`split_text_target`): a target set the agent is given, a held-out set for perplexity (never
trained on; fetched copies are dropped as contamination), and the rest of the topic, which stays
on the web for the agent to find among the other topics' documents.
"""

from __future__ import annotations

import hashlib
import html
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from explorer.web.corpus import explorer_home
from explorer.web.text_sources import (
    load_wikipedia_leads,
    split_target_text,
    wikipedia_topics,
)

HIDDEN_COLUMNS = ("topic",)
SNIPPET_CHARS = 240


def default_text_corpus_dir(limit_per_topic: int | None = None) -> Path:
    suffix = "" if limit_per_topic is None else f"-{limit_per_topic}-per-topic"
    return explorer_home() / "corpus" / f"wikipedia-leads{suffix}"


def document_key(title: str) -> str:
    return "wiki-" + hashlib.sha1(title.encode("utf-8")).hexdigest()[:12]


def document_text(lead: dict) -> str:
    """What /doc/KEY serves and what the LM trains on: the title, a blank line, the lead."""
    return f"{lead['title']}\n\n{lead['extract'].strip()}\n"


def document_html(lead: dict) -> str:
    """The same document as a web page: its text inside the navigation, header and footer a real
    page has, which the text fetcher's extractor must strip (`search.serve_html`)."""
    title = html.escape(lead["title"])
    paragraphs = "".join(f"<p>{html.escape(p.strip())}</p>" for p in lead["extract"].strip().split("\n") if p.strip())
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>" + title + " - explorer web</title>"
            "</head><body><header><nav><a href=\"/\">Home</a> | <a href=\"/search\">Search</a> | "
            "<a href=\"/random\">Random page</a> | <a href=\"/about\">About</a></nav></header>"
            f"<main><article><h1>{title}</h1>{paragraphs}</article></main>"
            "<footer><p>Text under CC BY-SA 4.0. Served by the explorer local engine.</p>"
            "<p><a href=\"/privacy\">Privacy</a> | <a href=\"/terms\">Terms</a></p></footer></body></html>\n")


def text_sha256(text: str) -> str:
    """Of the text with its whitespace collapsed: a page's extracted text ("Title\\nbody") and the
    document it was made from ("Title\\n\\nbody\\n") are the same document."""
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


def search_text(lead: dict) -> str:
    return f"{lead['title']}. {lead['description']}. {lead['extract']}"


@dataclass(frozen=True, kw_only=True)
class TextCorpusSpec:
    """Which leads go on the web; `limit_per_topic` takes a reproducible slice (tests, quick runs)."""

    topics: tuple[str, ...] | None = None  # None: all 12
    limit_per_topic: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.limit_per_topic is not None and self.limit_per_topic < 1:
            raise ValueError("limit_per_topic must be >= 1")


def select_leads(leads: Sequence[dict], spec: TextCorpusSpec) -> list[dict]:
    """The spec's leads, in title order; per-topic slices are seeded."""
    topics = wikipedia_topics(leads) if spec.topics is None else list(spec.topics)
    unknown = set(topics) - set(wikipedia_topics(leads))
    if unknown:
        raise ValueError(f"unknown topics {sorted(unknown)}; valid: {', '.join(wikipedia_topics(leads))}")
    chosen = []
    for j, topic in enumerate(sorted(topics)):
        of_topic = [d for d in leads if d["topic"] == topic]
        if spec.limit_per_topic is not None and spec.limit_per_topic < len(of_topic):
            rng = np.random.default_rng([spec.seed, j])
            keep = np.sort(rng.choice(len(of_topic), size=spec.limit_per_topic, replace=False))
            of_topic = [of_topic[i] for i in keep]
        chosen.extend(of_topic)
    return sorted(chosen, key=lambda d: d["title"])


def build_text_corpus(out: Path, spec: TextCorpusSpec = TextCorpusSpec(), *, leads: Sequence[dict] | None = None,
                      encoder=None, progress: bool = True) -> TextCorpus:
    """Write a text corpus directory (see module docstring) from the installed leads (or `leads`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    docs = select_leads(load_wikipedia_leads() if leads is None else leads, spec)
    if not docs:
        raise ValueError("the text corpus spec selected no documents")
    rows = [{"key": document_key(d["title"]), "title": d["title"], "description": d["description"],
             "extract": d["extract"], "topic": d["topic"]} for d in docs]
    if len({r["key"] for r in rows}) != len(rows):
        raise ValueError("two documents share a title: keys would collide")
    pq.write_table(pa.Table.from_pylist(rows), out / "documents.parquet")
    if encoder is None:
        from explorer.web.text_encoder import default_encoder
        encoder = default_encoder()
    emb = encoder.encode([document_text(d) for d in docs], progress=progress)  # (n, 384) unit rows
    np.save(out / "doc_emb.npy", emb.astype(np.float16))
    counts = {t: sum(d["topic"] == t for d in docs) for t in wikipedia_topics(docs)}
    meta = {"spec": asdict(spec), "documents": len(rows), "per_topic": counts, "format": 1}
    (out / "corpus.json").write_text(json.dumps(meta, indent=2))
    return TextCorpus(out)


class TextCorpus:
    """Read access to a built text corpus. Offers the attributes `HybridIndex` ranks over
    (`distinct_captions`, `caption_id`, `caption_embeddings`, `keys`, `captions`, `index_of`):
    each document is its own "caption"."""

    media = "text"  # tells the engine to serve /doc/KEY instead of /image/KEY

    def __init__(self, root: Path | str):
        self.root = Path(root)
        if not (self.root / "corpus.json").exists():
            raise FileNotFoundError(f"no complete text corpus at {self.root}: build it with build_text_corpus")
        table = pq.read_table(self.root / "documents.parquet")
        self.keys: list[str] = table["key"].to_pylist()
        self.titles: list[str] = table["title"].to_pylist()
        self.descriptions: list[str] = table["description"].to_pylist()
        self.extracts: list[str] = table["extract"].to_pylist()
        self.hidden = {c: np.asarray(table[c].to_pylist()) for c in HIDDEN_COLUMNS}
        self.meta = json.loads((self.root / "corpus.json").read_text())
        self.index_of = {k: i for i, k in enumerate(self.keys)}
        self.captions = self.titles  # the result title of each item
        self.distinct_captions = [search_text(self.lead(i)) for i in range(len(self))]
        self.caption_id = np.arange(len(self))

    def __len__(self) -> int:
        return len(self.keys)

    def lead(self, i: int) -> dict:
        return {"title": self.titles[i], "description": self.descriptions[i], "topic": str(self.hidden["topic"][i]),
                "extract": self.extracts[i]}

    def documents(self) -> list[dict]:
        """Every document as a lead dict, hidden topic included (for target splits and evaluation)."""
        return [self.lead(i) for i in range(len(self))]

    def caption_embeddings(self) -> np.ndarray:
        return np.load(self.root / "doc_emb.npy").astype(np.float32)

    def document_bytes(self, i: int) -> bytes:
        return document_text(self.lead(i)).encode("utf-8")

    def document_page(self, i: int) -> bytes:
        return document_html(self.lead(i)).encode("utf-8")

    def snippet(self, i: int) -> str:
        text = self.extracts[i].strip()
        return text if len(text) <= SNIPPET_CHARS else text[:SNIPPET_CHARS].rsplit(" ", 1)[0] + " ..."

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class TextTarget:
    """One topic's documents, split for a run (see module docstring)."""

    topic: str
    train: list[dict]     # the agent's target set: trained on, and the reward's reference
    holdout: list[dict]   # perplexity only; copies fetched from the web are dropped
    on_web: list[dict]    # the topic's other documents, left on the web to be found


def split_text_target(docs: Sequence[dict], topic: str, *, holdout_fraction: float = 0.2,
                      target_fraction: float = 0.5, seed: int = 0) -> TextTarget:
    """Held-out split as `split_target_text`; of the rest, a seeded `target_fraction` is the target set."""
    if not 0 < target_fraction <= 1:
        raise ValueError(f"target_fraction must be in (0, 1], got {target_fraction}")
    train, holdout, _ = split_target_text(docs, topic, holdout_fraction=holdout_fraction, seed=seed)
    order = np.random.default_rng([seed, 1]).permutation(len(train))
    n_target = max(1, int(round(target_fraction * len(train))))
    given, left = sorted(order[:n_target].tolist()), sorted(order[n_target:].tolist())
    return TextTarget(topic=topic, train=[train[i] for i in given], holdout=holdout, on_web=[train[i] for i in left])
