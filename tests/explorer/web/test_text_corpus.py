"""The text web: corpus build, the engine serving documents, the text backends, document fetching and rewards."""

import httpx
import numpy as np
import pytest

from explorer.acquire.cache import CacheMode, ResponseCache
from explorer.acquire.documents import build_text_backend, fetch_documents
from explorer.acquire.fetch import FetchConfig, allow_origin
from explorer.score.reward import TargetIndex, knn_reward
from explorer.web.text_corpus import (
    TextCorpus,
    TextCorpusSpec,
    build_text_corpus,
    document_key,
    document_text,
    split_text_target,
)

TOPIC = "Biology and health sciences"
SPEC = TextCorpusSpec(topics=(TOPIC, "Geography", "Mathematics", "Arts", "Technology"), limit_per_topic=24)


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "text-corpus"
    return TextCorpus(root) if (root / "corpus.json").exists() else build_text_corpus(root, SPEC, progress=False)


@pytest.fixture(scope="session")
def text_engine(text_corpus):
    from explorer.web.engine import HybridIndex, SearchServer
    from explorer.web.text_encoder import default_encoder

    server = SearchServer(HybridIndex(text_corpus, default_encoder())).start()
    yield server
    server.stop()


def _topic(corpus, url):
    return corpus.hidden["topic"][corpus.index_of[url.rsplit("/", 1)[-1]]]


def test_corpus_holds_the_slice_with_hidden_topics(text_corpus):
    assert len(text_corpus) == 5 * 24
    assert sorted(text_corpus.meta["per_topic"].values()) == [24] * 5
    i = 7
    assert text_corpus.keys[i] == document_key(text_corpus.titles[i])
    assert text_corpus.document_bytes(i).decode() == document_text(text_corpus.lead(i))
    assert text_corpus.caption_embeddings().shape == (120, 384)


def test_engine_answers_with_documents_of_the_matching_topic(text_engine, text_corpus):
    body = httpx.get(f"{text_engine.url}/search", params={"q": "plant", "format": "json", "per_page": 5}).json()
    results = body["results"]
    assert len(results) == 5 and {"url", "title", "content", "score", "positions"} <= set(results[0])
    assert all("/doc/" in r["url"] and "img_src" not in r for r in results)
    assert [_topic(text_corpus, r["url"]) for r in results].count(TOPIC) >= 4
    math_hits = httpx.get(f"{text_engine.url}/search", params={"q": "theorem algebra equation", "per_page": 3}).json()
    assert _topic(text_corpus, math_hits["results"][0]["url"]) == "Mathematics"
    assert TOPIC not in httpx.get(f"{text_engine.url}/search", params={"q": "cell", "per_page": 50}).text


def test_doc_route_returns_the_document_text(text_engine, text_corpus):
    r = httpx.get(f"{text_engine.url}/doc/{text_corpus.keys[3]}")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert r.text == document_text(text_corpus.lead(3))
    assert httpx.get(f"{text_engine.url}/doc/wiki-nope").status_code == 404
    assert httpx.get(f"{text_engine.url}/image/{text_corpus.keys[3]}").status_code == 404


def test_text_backend_and_fetch_replay_from_the_cache(text_engine, tmp_path):
    cache = ResponseCache(tmp_path / "cache")
    backend = build_text_backend("local-text", cache=cache, url=text_engine.url, per_page=4)
    live = backend.search("mountain river", 4)
    assert len(live) == 4 and all("/doc/" in r.image_url for r in live)
    cfg = allow_origin(FetchConfig(), text_engine.url)
    docs = fetch_documents([r.image_url for r in live], cfg, cache)
    assert all(d.ok and d.text.startswith(r.caption) for d, r in zip(docs, live))
    replayed = build_text_backend("replay", cache=cache, recorded=backend.describe())
    assert replayed.search("mountain river", 4) == live
    again = fetch_documents([r.image_url for r in live], cfg, cache, CacheMode.REPLAY)
    assert [d.sha256 for d in again] == [d.sha256 for d in docs]


def test_fetch_goes_through_the_ssrf_guard(text_engine, tmp_path):
    url = f"{text_engine.url}/doc/anything"
    [refused] = fetch_documents([url], FetchConfig(), ResponseCache(tmp_path / "c"))  # loopback, not allowed
    assert refused.status == "blocked" and not refused.text


def test_target_topic_documents_earn_higher_rewards(text_corpus):
    target = split_text_target(text_corpus.documents(), TOPIC, holdout_fraction=0.2, target_fraction=0.5, seed=0)
    assert {d["topic"] for d in target.train + target.holdout + target.on_web} == {TOPIC}
    assert not {d["title"] for d in target.train} & {d["title"] for d in target.holdout + target.on_web}
    emb = text_corpus.caption_embeddings()
    rows = lambda docs: [text_corpus.index_of[document_key(d["title"])] for d in docs]  # noqa: E731
    index = TargetIndex(emb[rows(target.train)])
    on_topic = knn_reward(emb[rows(target.on_web)], index, k=5)
    off_topic = knn_reward(emb[[i for i, t in enumerate(text_corpus.hidden["topic"]) if t != TOPIC]], index, k=5)
    assert on_topic.mean() > off_topic.mean() + 0.05
    assert np.median(on_topic) > np.quantile(off_topic, 0.75)
